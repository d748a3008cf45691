//! ceccm control plane: the REST API, the state store, the reconcilers, the embedded task queue,
//! and the `ceccm` binary's subcommands. See docs/architecture.md.

pub mod agent;
pub mod amqp;
pub mod api;
pub mod astro_fit;
pub mod audit;
pub mod auth;
pub mod content;
pub mod demo;
pub mod error;
pub mod image;
pub mod leader;
pub mod lifecycle;
pub mod logs;
pub mod metrics;
pub mod objects;
pub mod oidc;
pub mod operations;
pub mod predictor;
pub mod queue;
pub mod quota;
pub mod reconcile;
pub mod regions;
pub mod resources;
pub mod scheduling;
pub mod selector;
pub mod server;
pub mod store;
pub mod time;
pub mod tls;
pub mod tokens;
pub mod uplink;
pub mod watch;
pub mod worker;

#[cfg(test)]
mod store_tests;
#[cfg(test)]
mod testing;

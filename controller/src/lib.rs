//! ceccm control plane: the REST API, the state store, the reconcilers, the embedded task queue,
//! and the `ceccm` binary's subcommands. See docs/architecture.md.

pub mod error;
pub mod objects;
pub mod resources;
pub mod selector;
pub mod store;
pub mod time;

#[cfg(test)]
mod store_tests;
#[cfg(test)]
mod testing;

//! End-to-end tests: one integration binary that drives the real `ceccm`, `ceccmctl` and
//! `astro-fit` binaries over loopback. Each area has its own module.

mod amqp;
mod astro_fit;
mod cli;
mod containers;
mod control_plane;
mod federation;
mod sim;
mod support;

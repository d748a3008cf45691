//! See the crate description and docs/architecture.md.

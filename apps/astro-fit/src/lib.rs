//! See the crate description and docs/architecture.md.
pub mod cube;
pub mod edge;
pub mod voronoi;

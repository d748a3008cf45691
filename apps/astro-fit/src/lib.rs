//! See the crate description and docs/architecture.md.
pub mod cube;
pub mod plan;
pub mod prepare;
pub mod voronoi;

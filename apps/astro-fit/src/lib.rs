//! See the crate description and docs/architecture.md.
pub mod cube;
pub mod edge;
pub mod mapplot;
pub mod maps;
pub mod plan;
pub mod prepare;
pub mod voronoi;

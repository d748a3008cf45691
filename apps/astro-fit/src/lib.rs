//! astro-fit: full-spectrum fitting of galaxy spectra and IFS datacubes with stellar
//! population templates, the penalised pixel-fitting method of pPXF (Cappellari & Emsellem
//! 2004; Cappellari 2017, 2023) written from the papers in Rust.

// Fitting core: templates, LOSVD, NNLS, the fitter, populations, 1-D spectra.
pub mod dust;
pub mod error;
pub mod fit;
pub mod fit_spectrum_cmd;
pub mod fits_cards;
pub(crate) mod fits_io;
pub mod gas;
pub mod linalg;
pub mod losvd;
pub mod nnls;
pub mod output;
pub mod plot;
pub mod populations;
pub mod ppxf_inputs;
pub mod spectrum;
pub mod stats;
pub mod synthetic;
pub mod template_archive;
pub mod templates;

// Cubes: reading, preparation, binning, planning, fitting and outputs.
pub mod accuracy;
pub mod cube;
pub mod cube_cmd;
pub mod cubefit;
pub mod mapplot;
pub mod maps;
pub mod plan;
pub mod prepare;
pub mod synth;
pub mod voronoi;
pub mod xcorr;

// TARSIS edge: filtering and compression before data leave the site.
pub mod edge;

pub use error::FitError;
pub use fit::{FitConfig, FitResult, FitScratch, Fitter, LogGrid, Spectrum, Start, TemplateBasis};
pub use template_archive::{TemplateArchiveError, unpack_template_tar, unpack_template_tar_from};
pub use templates::{
    Medium, PrepareConfig, PreparedTemplates, ResolutionCurve, TemplateLibrary, prepare,
};

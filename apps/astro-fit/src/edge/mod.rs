//! TARSIS edge: filter and compress IFS data before it leaves the telescope.
//!
//! Everything here works on [`SpectralCube`], spectra laid out spaxel-major (the samples of one
//! spectrum are contiguous), because every operation (quantisation step from the pixel's own
//! noise, prediction along wavelength, random access by spaxel) walks along wavelength.
//! FITS order (wavelength slowest) is converted at the I/O edge.

pub mod cli;
pub mod codec;
pub mod container;
mod error;
pub mod filter;
pub mod io;
pub mod quantize;
mod spectra;
pub mod tilefits;

pub use error::EdgeError;
pub use spectra::{
    AuxVector, DType, HduHeader, Plane, Role, Samples, SpectralCube, sigma_from_noise,
};

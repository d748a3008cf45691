//! One error type for the fitting core: every bad input becomes a variant with a clear message.

use std::path::PathBuf;

/// Errors of template preparation, spectrum reading and fitting.
#[derive(Debug, thiserror::Error)]
pub enum FitError {
    #[error("reading {path}: {message}")]
    Read { path: PathBuf, message: String },
    #[error("no template files found in {0}")]
    NoTemplates(PathBuf),
    #[error("template {name}: {message}")]
    BadTemplate { name: String, message: String },
    #[error("flux is not finite (NaN or infinite) at pixel {pixel}")]
    NonFiniteFlux { pixel: usize },
    #[error(
        "noise must be finite and positive, got {value} at pixel {pixel} (zero or negative inverse variance?)"
    )]
    BadNoise { pixel: usize, value: f64 },
    #[error(
        "inverse variance must be positive and finite on good pixels, got {value} at pixel {pixel}"
    )]
    BadIvar { pixel: usize, value: f64 },
    #[error(transparent)]
    Cube(#[from] crate::cube::CubeError),
    #[error("no good pixels: every pixel of the spectrum is masked")]
    NoGoodPixels,
    #[error("invalid spectral resolution: {0}")]
    Resolution(String),
    #[error("too few good pixels: {good} good pixels for {params} free parameters")]
    TooFewGoodPixels { good: usize, params: usize },
    #[error(
        "templates cover {tpl_min:.1}-{tpl_max:.1} A but the fit needs {need_min:.1}-{need_max:.1} A (rest frame, including the velocity range)"
    )]
    WavelengthNotCovered {
        tpl_min: f64,
        tpl_max: f64,
        need_min: f64,
        need_max: f64,
    },
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("spectrum has {flux} flux pixels but {other} {what} values")]
    LengthMismatch {
        flux: usize,
        other: usize,
        what: &'static str,
    },
    #[error("linear solve failed: {0}")]
    Numerical(String),
}

impl FitError {
    pub(crate) fn read(path: impl Into<PathBuf>, message: impl ToString) -> Self {
        FitError::Read {
            path: path.into(),
            message: message.to_string(),
        }
    }
}

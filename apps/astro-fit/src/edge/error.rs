use std::path::PathBuf;

/// Everything that can go wrong in the edge filter and compressor.
#[derive(Debug, thiserror::Error)]
pub enum EdgeError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("I/O error while {context}: {source}")]
    Stream {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("FITS error on {path}: {message}")]
    Fits { path: PathBuf, message: String },
    #[error(
        "lossy compression needs per-pixel noise (an IVAR or STAT/variance plane); this cube has none. Use lossless mode instead"
    )]
    NoNoise,
    #[error("invalid parameter: {0}")]
    InvalidParameter(String),
    #[error("invalid cube: {0}")]
    InvalidCube(String),
    #[error("not a TARSIS container (bad magic bytes at the start of the file)")]
    NotAContainer,
    #[error("container truncated in {part}: expected {expected} more bytes, found {found}")]
    Truncated {
        part: String,
        expected: u64,
        found: u64,
    },
    #[error("checksum mismatch in {part}: expected sha256 {expected}, computed {found}")]
    ChecksumMismatch {
        part: String,
        expected: String,
        found: String,
    },
    #[error("corrupt container ({part}): {reason}")]
    Corrupt { part: String, reason: String },
    #[error("spaxel ({x}, {y}) outside the {nx} x {ny} cube")]
    SpaxelOutOfRange {
        x: usize,
        y: usize,
        nx: usize,
        ny: usize,
    },
}

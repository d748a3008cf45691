//! Standard tile-compressed FITS (the FITS tiled image convention, as fpack writes it): one
//! spectrum per tile, RICE_1 with cfitsio's subtractive-dither quantisation for flux, so that
//! funpack, astropy or any cfitsio program reads it without ceccm. Written through cfitsio's
//! extended filename syntax (`file.fits[compress R 1,1,NWAVE; q 4]`).

use std::path::Path;

use super::io::write_fits_with;
use super::{DType, EdgeError, Role, SpectralCube};

/// Quantisation levels, in cfitsio's sense: the step is the tile's noise (estimated by cfitsio
/// from the tile itself) divided by q. Both must be positive: the cfitsio bundled with the
/// fitsio crate (3.49) returns wrong pixels when a process reads a quantised HDU after a
/// losslessly compressed float HDU (GZIP, q 0) of the same file, so every float plane is
/// quantised. IVAR and variance are smooth, so q = 16 keeps them within 0.5% here.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TileOptions {
    pub flux_q: f32,
    pub noise_q: f32,
}

impl Default for TileOptions {
    fn default() -> Self {
        TileOptions {
            flux_q: 4.0,
            noise_q: 16.0,
        }
    }
}

/// The cfitsio compression spec of one plane.
pub fn compression_spec(role: Role, dtype: DType, nwave: usize, opts: &TileOptions) -> String {
    let tile = format!("1,1,{nwave}");
    match dtype {
        DType::F32 | DType::F64 => {
            let q = match role {
                Role::Flux => opts.flux_q,
                Role::Ivar | Role::Variance | Role::Mask | Role::Other => opts.noise_q,
            };
            format!("compress R {tile}; q {q}")
        }
        // RICE_1 handles 8, 16 and 32-bit integers losslessly; 64-bit needs GZIP.
        DType::I64 => format!("compress G {tile}"),
        DType::U8 | DType::I16 | DType::I32 => format!("compress R {tile}"),
    }
}

/// Writes `cube` as tile-compressed FITS at `path`.
pub fn write_tile_compressed(
    cube: &SpectralCube,
    path: &Path,
    opts: &TileOptions,
) -> Result<(), EdgeError> {
    for q in [opts.flux_q, opts.noise_q] {
        if !(q.is_finite() && q > 0.0) {
            return Err(EdgeError::InvalidParameter(format!(
                "FITS quantisation level {q} (must be positive)"
            )));
        }
    }
    write_fits_with(cube, path, |plane| {
        Some(compression_spec(
            plane.role,
            plane.samples.dtype(),
            cube.nwave,
            opts,
        ))
    })
}

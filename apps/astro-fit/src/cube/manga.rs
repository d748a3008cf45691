//! SDSS-IV MaNGA DRP `LOGCUBE`: FLUX, IVAR, MASK (`MANGA_DRP3PIXMASK`), WAVE (vacuum Angstrom),
//! SPECRES (median R per wavelength; SPECRESD is its scatter, not needed for fitting).

use std::path::Path;

use fitsio::FitsFile;

use super::{
    CubeError, CubeFormat, CubeMeta, Layout, MaskKind, NoiseKind, Probe, WavelengthMedium,
    cube_shape, fits_error, pixel_scale_arcsec, read_key_f64, read_key_string, same_shape,
};

/// `MANGA_DRP3PIXMASK` bits (sdssMaskbits.par).
pub const NOCOV: i32 = 1 << 0;
pub const LOWCOV: i32 = 1 << 1;
pub const DEADFIBER: i32 = 1 << 2;
pub const FORESTAR: i32 = 1 << 3;
pub const DONOTUSE: i32 = 1 << 10;

/// Pixels the DAP refuses for fitting. LOWCOV alone is informational: the DRP sets DONOTUSE
/// where coverage is too low to use.
pub const DRP3_BAD_BITS: i32 = NOCOV | DEADFIBER | FORESTAR | DONOTUSE;

const FORMAT: CubeFormat = CubeFormat::MangaLogcube;

pub(crate) fn matches(probe: &Probe) -> bool {
    probe.find("FLUX").is_some() && probe.find("IVAR").is_some() && probe.find("WAVE").is_some()
}

fn index_of(probe: &Probe, path: &Path, name: &str) -> Result<usize, CubeError> {
    probe
        .find(name)
        .map(|h| h.index)
        .ok_or_else(|| CubeError::Layout {
            path: path.to_path_buf(),
            format: FORMAT,
            reason: format!("no {name} extension"),
            hdus: probe.hdus.clone(),
        })
}

fn read_vector(
    file: &mut FitsFile,
    path: &Path,
    index: usize,
    name: &str,
) -> Result<Vec<f64>, CubeError> {
    let hdu = file
        .hdu(index)
        .map_err(|e| fits_error(path, &format!("{name} extension"), e))?;
    hdu.read_image(file)
        .map_err(|e| fits_error(path, &format!("reading {name}"), e))
}

pub(crate) fn layout(file: &mut FitsFile, path: &Path, probe: &Probe) -> Result<Layout, CubeError> {
    let flux = index_of(probe, path, "FLUX")?;
    let ivar = index_of(probe, path, "IVAR")?;
    let wave = index_of(probe, path, "WAVE")?;
    let (nx, ny, nwave) = cube_shape(probe, path, FORMAT, flux)?;
    same_shape(probe, path, FORMAT, flux, ivar)?;
    let mask = match probe.find("MASK") {
        Some(h) => {
            same_shape(probe, path, FORMAT, flux, h.index)?;
            Some((h.index, MaskKind::MangaDrp3))
        }
        None => None,
    };
    let layout_error = |reason: String| CubeError::Layout {
        path: path.to_path_buf(),
        format: FORMAT,
        reason,
        hdus: probe.hdus.clone(),
    };
    let wavelength = read_vector(file, path, wave, "WAVE")?;
    if wavelength.len() != nwave {
        return Err(layout_error(format!(
            "WAVE has {} values for {nwave} planes",
            wavelength.len()
        )));
    }
    if wavelength.windows(2).any(|w| w[1] <= w[0] || w[1].is_nan())
        || wavelength[0].is_nan()
        || wavelength[0] <= 0.0
    {
        return Err(layout_error("WAVE is not positive and increasing".into()));
    }
    let resolution = match probe.find("SPECRES") {
        Some(h) => {
            let r = read_vector(file, path, h.index, "SPECRES")?;
            (r.len() == nwave && r.iter().all(|v| v.is_finite() && *v > 0.0)).then_some(r)
        }
        None => None,
    };
    let flux_hdu = file
        .hdu(flux)
        .map_err(|e| fits_error(path, "FLUX extension", e))?;
    let pixel_scale_arcsec = pixel_scale_arcsec(file, &flux_hdu).unwrap_or(0.5);
    let flux_unit = read_key_string(file, &flux_hdu, "BUNIT").unwrap_or_default();
    let primary = file
        .primary_hdu()
        .map_err(|e| fits_error(path, "primary HDU", e))?;
    let ebv_galactic = read_key_f64(file, &primary, "EBVGAL");
    Ok(Layout {
        flux_hdu: flux,
        noise: Some((ivar, NoiseKind::InverseVariance)),
        mask,
        meta: CubeMeta {
            format: FORMAT,
            nx,
            ny,
            wavelength,
            medium: WavelengthMedium::Vacuum,
            log_sampled: true,
            resolution,
            pixel_scale_arcsec,
            flux_unit,
            noise_stored_as: Some(NoiseKind::InverseVariance),
            ebv_galactic,
            redshift: None,
            celestial_wcs: Vec::new(),
            target: Vec::new(),
        },
    })
}

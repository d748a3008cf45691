//! Thin FITS helpers over `fitsio` for 1-D spectra, images and table columns.

use std::path::Path;

use fitsio::FitsFile;
use fitsio::hdu::FitsHdu;

use crate::error::FitError;

pub(crate) fn open(path: &Path) -> Result<FitsFile, FitError> {
    FitsFile::open(path).map_err(|e| FitError::read(path, e))
}

pub(crate) fn hdu(f: &mut FitsFile, path: &Path, name: &str) -> Result<FitsHdu, FitError> {
    f.hdu(name)
        .map_err(|e| FitError::read(path, format!("extension {name}: {e}")))
}

pub(crate) fn key_f64(
    f: &mut FitsFile,
    hdu: &FitsHdu,
    path: &Path,
    key: &str,
) -> Result<f64, FitError> {
    hdu.read_key::<f64>(f, key)
        .map_err(|e| FitError::read(path, format!("header keyword {key}: {e}")))
}

pub(crate) fn optional_key_f64(f: &mut FitsFile, hdu: &FitsHdu, key: &str) -> Option<f64> {
    hdu.read_key::<f64>(f, key).ok()
}

pub(crate) fn optional_key_str(f: &mut FitsFile, hdu: &FitsHdu, key: &str) -> Option<String> {
    hdu.read_key::<String>(f, key).ok()
}

pub(crate) fn image_f64(
    f: &mut FitsFile,
    hdu: &FitsHdu,
    path: &Path,
) -> Result<Vec<f64>, FitError> {
    hdu.read_image(f)
        .map_err(|e| FitError::read(path, format!("image data: {e}")))
}

pub(crate) fn column_f64(
    f: &mut FitsFile,
    hdu: &FitsHdu,
    path: &Path,
    name: &str,
) -> Result<Vec<f64>, FitError> {
    hdu.read_col(f, name)
        .map_err(|e| FitError::read(path, format!("column {name}: {e}")))
}

/// Wavelengths of a 1-D WCS axis: linear, or log10 when CTYPE1 says WAVE-LOG.
pub(crate) fn axis_wavelengths(
    f: &mut FitsFile,
    hdu: &FitsHdu,
    path: &Path,
    n: usize,
) -> Result<Vec<f64>, FitError> {
    let crval = key_f64(f, hdu, path, "CRVAL1")?;
    let cdelt = match optional_key_f64(f, hdu, "CDELT1") {
        Some(v) => v,
        None => key_f64(f, hdu, path, "CD1_1")?,
    };
    let crpix = optional_key_f64(f, hdu, "CRPIX1").unwrap_or(1.0);
    let log = optional_key_str(f, hdu, "CTYPE1").is_some_and(|c| c.contains("LOG"));
    Ok((0..n)
        .map(|i| {
            let x = crval + (i as f64 + 1.0 - crpix) * cdelt;
            if log { 10f64.powf(x) } else { x }
        })
        .collect())
}

/// A 1-D spectrum in the primary HDU with a linear (or log10) wavelength axis.
pub fn read_linear_spectrum(path: &Path) -> Result<(Vec<f64>, Vec<f64>), FitError> {
    let mut f = open(path)?;
    let hdu = f.primary_hdu().map_err(|e| FitError::read(path, e))?;
    let flux = image_f64(&mut f, &hdu, path)?;
    let wave = axis_wavelengths(&mut f, &hdu, path, flux.len())?;
    Ok((wave, flux))
}

/// A MaStar template: flux, IVAR and SRES on a log10 grid.
pub struct MaStarSpectrum {
    pub wave: Vec<f64>,
    pub flux: Vec<f64>,
    pub ivar: Vec<f64>,
    pub sres: Vec<f64>,
}

pub fn read_mastar(path: &Path) -> Result<MaStarSpectrum, FitError> {
    let mut f = open(path)?;
    let primary = f.primary_hdu().map_err(|e| FitError::read(path, e))?;
    let flux = image_f64(&mut f, &primary, path)?;
    let wave = axis_wavelengths(&mut f, &primary, path, flux.len())?;
    let ivar_hdu = hdu(&mut f, path, "IVAR")?;
    let ivar = image_f64(&mut f, &ivar_hdu, path)?;
    let sres_hdu = hdu(&mut f, path, "SRES")?;
    let sres = image_f64(&mut f, &sres_hdu, path)?;
    if ivar.len() != flux.len() || sres.len() != flux.len() {
        return Err(FitError::read(
            path,
            "IVAR/SRES lengths differ from the flux",
        ));
    }
    Ok(MaStarSpectrum {
        wave,
        flux,
        ivar,
        sres,
    })
}

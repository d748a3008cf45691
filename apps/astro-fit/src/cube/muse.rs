//! ESO MUSE cubes (pipeline `DATACUBE_FINAL`, MPDAF products): DATA, STAT (variance), DQ
//! (optional, non-zero = bad); wavelength from CRVAL3 + CD3_3 (or CDELT3), air (`AWAV`).
//! MUSE files carry no resolution curve: [`udf_lsf_fwhm`] gives the published one.

use std::path::Path;

use fitsio::FitsFile;

use super::{
    CubeError, CubeFormat, CubeMeta, Layout, MaskKind, NoiseKind, Probe, WavelengthMedium,
    cube_shape, fits_error, pixel_scale_arcsec, read_key_string, same_shape,
    spectral_axis_from_wcs,
};

const FORMAT: CubeFormat = CubeFormat::Muse;

/// MUSE line-spread-function FWHM in Angstrom at `lambda` (Angstrom), the polynomial fitted on
/// the Ultra Deep Field by Bacon et al. (2017, A&A 608, A1, eq. 8).
pub fn udf_lsf_fwhm(lambda: f64) -> f64 {
    5.866e-8 * lambda * lambda - 9.187e-4 * lambda + 6.040
}

pub(crate) fn matches(probe: &Probe) -> bool {
    let has_cube = |name: &str| {
        probe
            .find(name)
            .is_some_and(|h| h.shape.as_ref().is_some_and(|s| s.len() == 3))
    };
    has_cube("DATA") && (probe.instrument_is("MUSE") || has_cube("STAT"))
}

pub(crate) fn layout(file: &mut FitsFile, path: &Path, probe: &Probe) -> Result<Layout, CubeError> {
    let data = probe
        .find("DATA")
        .map(|h| h.index)
        .ok_or_else(|| CubeError::Layout {
            path: path.to_path_buf(),
            format: FORMAT,
            reason: "no DATA extension".into(),
            hdus: probe.hdus.clone(),
        })?;
    let (nx, ny, nwave) = cube_shape(probe, path, FORMAT, data)?;
    let noise = match probe.find("STAT") {
        Some(h) => {
            same_shape(probe, path, FORMAT, data, h.index)?;
            Some((h.index, NoiseKind::Variance))
        }
        None => None,
    };
    let mask = match probe.find("DQ") {
        Some(h) => {
            same_shape(probe, path, FORMAT, data, h.index)?;
            Some((h.index, MaskKind::NonZeroBad))
        }
        None => None,
    };
    let hdu = file
        .hdu(data)
        .map_err(|e| fits_error(path, "DATA extension", e))?;
    let axis =
        spectral_axis_from_wcs(file, &hdu, nwave, WavelengthMedium::Air).map_err(|reason| {
            CubeError::Layout {
                path: path.to_path_buf(),
                format: FORMAT,
                reason: format!("spectral WCS of DATA: {reason}"),
                hdus: probe.hdus.clone(),
            }
        })?;
    let pixel_scale_arcsec = pixel_scale_arcsec(file, &hdu).unwrap_or(0.2);
    let flux_unit = read_key_string(file, &hdu, "BUNIT").unwrap_or_default();
    Ok(Layout {
        flux_hdu: data,
        noise,
        mask,
        meta: CubeMeta {
            format: FORMAT,
            nx,
            ny,
            wavelength: axis.wavelength,
            medium: axis.medium,
            log_sampled: axis.log_sampled,
            resolution: None,
            pixel_scale_arcsec,
            flux_unit,
            noise_stored_as: noise.map(|(_, k)| k),
            ebv_galactic: None,
            redshift: None,
        },
    })
}

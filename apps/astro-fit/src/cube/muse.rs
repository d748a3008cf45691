//! ESO MUSE cubes (pipeline `DATACUBE_FINAL`, MPDAF products): DATA, STAT (variance), DQ
//! (optional, non-zero = bad); wavelength from CRVAL3 + CD3_3 (or CDELT3), air (`AWAV`).
//! MUSE files carry no resolution curve: [`udf_lsf_fwhm`] gives the published one.

use std::path::Path;

use fitsio::FitsFile;

use super::{CubeError, CubeFormat, Layout, LinearCubeHdus, Probe, linear_wcs_layout};

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
    linear_wcs_layout(
        file,
        path,
        probe,
        LinearCubeHdus {
            format: FORMAT,
            flux: data,
            variance: "STAT",
            mask: "DQ",
            default_pixel_scale_arcsec: 0.2,
        },
    )
}

//! GTC MEGARA reduced cubes (megaradrp `final_cube`): the cube in the primary HDU, or in an image
//! extension named FLUX, SCI or DATA, with a linear spectral WCS on axis 3 (air wavelengths
//! unless CTYPE3 says `WAVE`); variance in a `VARIANCE` extension and a `MASK` when present.

use std::path::Path;

use fitsio::FitsFile;

use super::{
    CubeError, CubeFormat, CubeMeta, Layout, MaskKind, NoiseKind, Probe, WavelengthMedium,
    cube_shape, fits_error, pixel_scale_arcsec, read_key_string, same_shape,
    spectral_axis_from_wcs,
};

const FORMAT: CubeFormat = CubeFormat::Megara;
const DATA_NAMES: [&str; 3] = ["FLUX", "SCI", "DATA"];

pub(crate) fn matches(probe: &Probe) -> bool {
    probe.instrument_is("MEGARA")
}

fn is_cube(probe: &Probe, index: usize) -> bool {
    probe.hdus[index]
        .shape
        .as_ref()
        .is_some_and(|s| s.len() == 3)
}

pub(crate) fn layout(file: &mut FitsFile, path: &Path, probe: &Probe) -> Result<Layout, CubeError> {
    let data = if is_cube(probe, 0) {
        0
    } else {
        DATA_NAMES
            .iter()
            .find_map(|n| probe.find(n).filter(|h| is_cube(probe, h.index)))
            .map(|h| h.index)
            .ok_or_else(|| CubeError::Layout {
                path: path.to_path_buf(),
                format: FORMAT,
                reason:
                    "no 3-D image in the primary HDU nor in an extension named FLUX, SCI or DATA"
                        .into(),
                hdus: probe.hdus.clone(),
            })?
    };
    let (nx, ny, nwave) = cube_shape(probe, path, FORMAT, data)?;
    let noise = match probe.find("VARIANCE") {
        Some(h) => {
            same_shape(probe, path, FORMAT, data, h.index)?;
            Some((h.index, NoiseKind::Variance))
        }
        None => None,
    };
    let mask = match probe.find("MASK") {
        Some(h) => {
            same_shape(probe, path, FORMAT, data, h.index)?;
            Some((h.index, MaskKind::NonZeroBad))
        }
        None => None,
    };
    let hdu = file
        .hdu(data)
        .map_err(|e| fits_error(path, "cube HDU", e))?;
    let axis =
        spectral_axis_from_wcs(file, &hdu, nwave, WavelengthMedium::Air).map_err(|reason| {
            CubeError::Layout {
                path: path.to_path_buf(),
                format: FORMAT,
                reason: format!("spectral WCS: {reason}"),
                hdus: probe.hdus.clone(),
            }
        })?;
    // MEGARA LCB spaxels are 0.62 arcsec hexagons; megaradrp resamples them to square pixels
    // whose size the WCS gives.
    let pixel_scale_arcsec = pixel_scale_arcsec(file, &hdu).unwrap_or(0.62);
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

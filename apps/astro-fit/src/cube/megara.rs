//! GTC MEGARA reduced cubes (megaradrp `final_cube`): the cube in the primary HDU, or in an image
//! extension named FLUX, SCI or DATA, with a linear spectral WCS on axis 3 (air wavelengths
//! unless CTYPE3 says `WAVE`); variance in a `VARIANCE` extension and a `MASK` when present.

use std::path::Path;

use fitsio::FitsFile;

use super::{CubeError, CubeFormat, Layout, LinearCubeHdus, Probe, linear_wcs_layout};

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
    // MEGARA LCB spaxels are 0.62 arcsec hexagons; megaradrp resamples them to square pixels
    // whose size the WCS gives.
    linear_wcs_layout(
        file,
        path,
        probe,
        LinearCubeHdus {
            format: FORMAT,
            flux: data,
            variance: "VARIANCE",
            mask: "MASK",
            default_pixel_scale_arcsec: 0.62,
        },
    )
}

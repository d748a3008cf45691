//! The prepared inputs of a fit (log-rebinned, resolution-matched templates; rest-frame
//! spectra, noise and good-pixel masks; the settings) in one FITS file, so that pPXF can be run
//! on exactly the arrays astro-fit fits (`scripts/ppxf_bench.py`, `scripts/ppxf_reference.py`).
//! A comparison on these files tests the two fitters, not two ways of preparing templates.

use std::path::Path;

use fitsio::FitsFile;
use fitsio::images::{ImageDescription, ImageType};

use crate::fit::FitConfig;
use crate::spectrum::RestFrameSpectrum;
use crate::templates::PreparedTemplates;

/// Write `templates` and `spectra` (all on one grid) with the fit settings of `cfg` to `path`
/// (overwritten). Extensions: TEMPLATES (ntemp x npix_temp; keywords VELSCALE, VSRATIO,
/// LNLAMT0, LNLAMG0, DEGREE, MDEGREE, MOMENTS, FLUXSCL: the first spectrum's flux scale),
/// GALAXY, NOISE, GOOD, FWHM (nspec x npix; the rest-frame instrumental FWHM in Angstrom at
/// each pixel, 0 where unknown: what gas templates need); with an SSP grid, SSP (ntemp x 4:
/// age in Gyr, [M/H], age index, [M/H] index of each template: what `regul`'s `reg_dim` and
/// population averages need).
pub fn write(
    path: &Path,
    templates: &PreparedTemplates,
    spectra: &[RestFrameSpectrum],
    cfg: &FitConfig,
) -> Result<(), fitsio::errors::Error> {
    let Some(first) = spectra.first() else {
        return Err(fitsio::errors::Error::Message("no spectra to write".into()));
    };
    if path.exists() {
        std::fs::remove_file(path)?;
    }
    let mut f = FitsFile::create(path).open()?;
    let npix = first.grid.npix;
    let mut image = |name: &str, rows: usize, cols: usize, data: Vec<f64>| {
        let desc = ImageDescription {
            data_type: ImageType::Double,
            dimensions: &[rows, cols],
        };
        let hdu = f.create_image(name, &desc)?;
        hdu.write_image(&mut f, &data)?;
        Ok::<_, fitsio::errors::Error>(hdu)
    };
    let hdu = image(
        "TEMPLATES",
        templates.len(),
        templates.npix(),
        templates.spectra.concat(),
    )?;
    let rows = |pick: &dyn Fn(&RestFrameSpectrum) -> Vec<f64>| -> Vec<f64> {
        spectra.iter().flat_map(pick).collect()
    };
    image(
        "GALAXY",
        spectra.len(),
        npix,
        rows(&|s| s.spectrum.flux.clone()),
    )?;
    image(
        "NOISE",
        spectra.len(),
        npix,
        rows(&|s| s.spectrum.noise.clone()),
    )?;
    image(
        "GOOD",
        spectra.len(),
        npix,
        rows(&|s| {
            s.spectrum
                .good
                .iter()
                .map(|g| f64::from(u8::from(*g)))
                .collect()
        }),
    )?;
    image(
        "FWHM",
        spectra.len(),
        npix,
        rows(&|s| {
            (0..npix)
                .map(|i| s.fwhm.as_ref().map_or(0.0, |c| c.at(s.grid.lam(i))))
                .collect()
        }),
    )?;
    if let Some(ssp) = &templates.ssp {
        image(
            "SSP",
            ssp.len(),
            4,
            ssp.iter()
                .flat_map(|p| {
                    [
                        p.age_gyr,
                        p.metallicity,
                        p.age_index as f64,
                        p.metal_index as f64,
                    ]
                })
                .collect(),
        )?;
    }
    hdu.write_key(&mut f, "FLUXSCL", first.flux_scale)?;
    hdu.write_key(&mut f, "VELSCALE", templates.velscale)?;
    hdu.write_key(&mut f, "VSRATIO", templates.velscale_ratio as i64)?;
    hdu.write_key(&mut f, "LNLAMT0", templates.ln_lam0)?;
    hdu.write_key(&mut f, "LNLAMG0", first.grid.ln_lam0)?;
    hdu.write_key(&mut f, "DEGREE", i64::from(cfg.degree))?;
    hdu.write_key(&mut f, "MDEGREE", cfg.mdegree as i64)?;
    hdu.write_key(&mut f, "MOMENTS", cfg.moments as i64)?;
    // pPXF's `regul` (second order over age x [M/H]) when the fit is regularised.
    if cfg.regul > 0.0 {
        hdu.write_key(&mut f, "REGUL", cfg.regul)?;
    }
    // pPXF's `reddening` start (A_V, mag) when the fit has dust; absent otherwise.
    if let Some(av) = cfg.reddening {
        hdu.write_key(&mut f, "REDDENAV", av)?;
    }
    Ok(())
}

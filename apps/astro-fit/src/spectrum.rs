//! Readers of observed 1-D spectra (SDSS COADD tables, 1-D linear FITS such as SAURON, rows
//! of MaNGA-format files and spaxels of MaNGA LOGCUBEs) and their conversion to the
//! rest-frame logarithmic grid the fitter works on, with emission-line masks.

#![allow(clippy::needless_range_loop)] // numeric kernels index several arrays in lockstep

use std::path::Path;

use crate::error::FitError;
use crate::fit::{LogGrid, Spectrum};
use crate::fits_io;
use crate::templates::{C_KMS, Medium, ResolutionCurve, convert_medium, log_rebin};

/// MaNGA DRP 3-D pixel mask bits that make a pixel unusable: the cube reader's definition
/// ([`crate::cube::manga::DRP3_BAD_BITS`]), for rows of MaNGA-format files too.
pub const MANGA_BAD_BITS: i64 = crate::cube::manga::DRP3_BAD_BITS as i64;

/// A spectrum as observed, before de-redshifting and log-rebinning.
#[derive(Debug, Clone, PartialEq)]
pub struct ObservedSpectrum {
    /// Observed-frame pixel-centre wavelengths (Angstrom).
    pub wave: Vec<f64>,
    pub flux: Vec<f64>,
    /// Inverse variance; None when the file has no noise (a constant noise is then assumed).
    pub ivar: Option<Vec<f64>>,
    /// Pixels the file itself flags as usable.
    pub good: Vec<bool>,
    pub medium: Medium,
    /// Whether `wave` is uniform in ln(lambda) already.
    pub log_sampled: bool,
    /// Observed-frame resolution when the file carries it.
    pub fwhm: Option<ResolutionCurve>,
    /// Redshift stored in the file, if any.
    pub redshift: Option<f64>,
}

/// Which spectrum of a multi-spectrum file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Selection {
    /// Row of a MaNGA-format 2-D file.
    pub row: usize,
    /// (x, y) spaxel of a 3-D LOGCUBE.
    pub spaxel: Option<(usize, usize)>,
}

/// Read a spectrum, recognising SDSS (COADD table), MaNGA (WAVE/FLUX/IVAR/MASK images) and
/// 1-D linear FITS layouts.
pub fn read_spectrum(path: &Path, sel: Selection) -> Result<ObservedSpectrum, FitError> {
    // A spaxel: straight to the cube reader (opening the file here first would decompress a
    // .fits.gz cube twice).
    if let Some((x, y)) = sel.spaxel {
        let mut spaxels = read_cube_spaxels(path, &[(x, y)])?;
        return spaxels
            .pop()
            .ok_or_else(|| FitError::read(path, "no spaxel read"));
    }
    let mut f = fits_io::open(path)?;
    if f.hdu("COADD").is_ok() {
        return read_sdss(path);
    }
    if f.hdu("FLUX").is_ok() && f.hdu("WAVE").is_ok() {
        return read_manga(path, sel);
    }
    drop(f);
    let (wave, flux) = match fits_io::read_linear_spectrum(path) {
        Ok(spectrum) => spectrum,
        // Not a 1-D spectrum: say so plainly if it is a cube the cube reader knows.
        Err(e) => match crate::cube::Cube::open(path) {
            Ok(cube) => return Err(needs_spaxel(path, cube.meta().nx, cube.meta().ny)),
            Err(_) => return Err(e),
        },
    };
    let good = flux.iter().map(|v| v.is_finite()).collect();
    Ok(ObservedSpectrum {
        wave,
        good,
        flux,
        ivar: None,
        medium: Medium::Air,
        log_sampled: false,
        fwhm: None,
        redshift: None,
    })
}

/// SDSS spectrum: COADD `flux`, `loglam` (log10 vacuum), `ivar`, `wdisp`; redshift from SPECOBJ.
pub fn read_sdss(path: &Path) -> Result<ObservedSpectrum, FitError> {
    let mut f = fits_io::open(path)?;
    let coadd = fits_io::hdu(&mut f, path, "COADD")?;
    let flux = fits_io::column_f64(&mut f, &coadd, path, "flux")?;
    let loglam = fits_io::column_f64(&mut f, &coadd, path, "loglam")?;
    let ivar = fits_io::column_f64(&mut f, &coadd, path, "ivar")?;
    let wdisp = fits_io::column_f64(&mut f, &coadd, path, "wdisp").ok();
    let redshift = fits_io::hdu(&mut f, path, "SPECOBJ")
        .ok()
        .and_then(|h| h.read_col::<f64>(&mut f, "Z").ok())
        .and_then(|z| z.first().copied());
    let wave: Vec<f64> = loglam.iter().map(|l| 10f64.powf(*l)).collect();
    // wdisp is the instrumental dispersion in pixels: FWHM = 2.355 wdisp dlam.
    let fwhm = wdisp.map(|w| {
        let n = wave.len();
        let fw = (0..n)
            .map(|i| {
                let dlam = if i + 1 < n {
                    wave[i + 1] - wave[i]
                } else {
                    wave[i] - wave[i - 1]
                };
                (8.0 * 2f64.ln()).sqrt() * w[i] * dlam
            })
            .collect();
        ResolutionCurve {
            lam: wave.clone(),
            fwhm: fw,
        }
    });
    // ivar = 0 marks missing data in SDSS files.
    let good = (0..flux.len())
        .map(|i| ivar[i] > 0.0 && flux[i].is_finite())
        .collect();
    Ok(ObservedSpectrum {
        wave,
        flux,
        ivar: Some(ivar),
        good,
        medium: Medium::Vacuum,
        log_sampled: true,
        fwhm,
        redshift,
    })
}

/// One row of a MaNGA-format file (WAVE, FLUX, IVAR, MASK, SRES or SPECRES, optional Z).
pub fn read_manga(path: &Path, sel: Selection) -> Result<ObservedSpectrum, FitError> {
    let mut f = fits_io::open(path)?;
    let wave_hdu = fits_io::hdu(&mut f, path, "WAVE")?;
    let wave = fits_io::image_f64(&mut f, &wave_hdu, path)?;
    let nw = wave.len();
    let flux_hdu = fits_io::hdu(&mut f, path, "FLUX")?;
    let shape = image_shape(&mut f, &flux_hdu, path)?;
    // Index range of the selected spectrum in the flattened (row-major, wavelength-last)
    // array; spaxels of cubes are read by `read_cube_spaxels`.
    let (offset, stride, nspec) = match shape.len() {
        2 => (sel.row * nw, 1, shape[0]),
        1 => (0, 1, 1),
        3 => return Err(needs_spaxel(path, shape[2], shape[1])),
        _ => {
            return Err(FitError::read(
                path,
                format!("unexpected FLUX shape {shape:?}"),
            ));
        }
    };
    if shape.len() == 2 && sel.row >= nspec {
        return Err(FitError::read(
            path,
            format!("row {} requested but the file has {nspec} spectra", sel.row),
        ));
    }
    let pick = |all: Vec<f64>| -> Vec<f64> { (0..nw).map(|i| all[offset + i * stride]).collect() };
    let flux = pick(fits_io::image_f64(&mut f, &flux_hdu, path)?);
    let ivar_hdu = fits_io::hdu(&mut f, path, "IVAR")?;
    let ivar = pick(fits_io::image_f64(&mut f, &ivar_hdu, path)?);
    let mask: Vec<i64> = match f.hdu("MASK") {
        Ok(h) => {
            let all: Vec<i64> = h.read_image(&mut f).map_err(|e| FitError::read(path, e))?;
            (0..nw).map(|i| all[offset + i * stride]).collect()
        }
        Err(_) => vec![0; nw],
    };
    let sres = match f.hdu("SRES").or_else(|_| f.hdu("SPECRES")) {
        Ok(h) => {
            let all: Vec<f64> = h.read_image(&mut f).map_err(|e| FitError::read(path, e))?;
            Some(if all.len() == nw {
                all
            } else {
                pick_row(&all, sel.row, nw)
            })
        }
        Err(_) => None,
    };
    let redshift = f
        .hdu("Z")
        .ok()
        .and_then(|h| h.read_image::<Vec<f64>>(&mut f).ok())
        .and_then(|z| z.get(sel.row).copied());
    let good: Vec<bool> = (0..nw)
        .map(|i| mask[i] & MANGA_BAD_BITS == 0 && ivar[i] > 0.0 && flux[i].is_finite())
        .collect();
    // A fully masked spaxel's SRES is no measurement (spectrum 5 of the MaNGA test file runs
    // linearly from -8100 through zero): it is not read, and the fit reports no good pixels.
    let sres = sres.filter(|_| good.iter().any(|g| *g));
    Ok(ObservedSpectrum {
        fwhm: sres.map(|r| ResolutionCurve::from_resolving_power(&wave, &r)),
        wave,
        flux,
        ivar: Some(ivar),
        good,
        medium: Medium::Vacuum,
        log_sampled: true,
        redshift,
    })
}

/// Spaxels of a datacube in any format the cube reader knows (MaNGA LOGCUBE, MUSE, MEGARA),
/// with its masks, noise and resolution: the same pixels `fit-cube` fits. Rows are read once
/// each, in one band from the lowest to the highest row asked for.
pub fn read_cube_spaxels(
    path: &Path,
    spaxels: &[(usize, usize)],
) -> Result<Vec<ObservedSpectrum>, FitError> {
    let mut cube = crate::cube::Cube::open(path)?;
    let meta = cube.meta().clone();
    if let Some(&(x, y)) = spaxels.iter().find(|(x, y)| *x >= meta.nx || *y >= meta.ny) {
        return Err(FitError::read(
            path,
            format!("spaxel ({x}, {y}) outside the {}x{} cube", meta.nx, meta.ny),
        ));
    }
    let (Some(lo), Some(hi)) = (
        spaxels.iter().map(|s| s.1).min(),
        spaxels.iter().map(|s| s.1).max(),
    ) else {
        return Ok(Vec::new());
    };
    let block = cube.read_rows(lo..hi + 1)?;
    let fwhm = meta.resolution_curve();
    Ok(spaxels
        .iter()
        .map(|&(x, y)| {
            let view = block.spectrum(x, y);
            ObservedSpectrum {
                wave: meta.wavelength.clone(),
                flux: view.flux.iter().map(|v| f64::from(*v)).collect(),
                ivar: Some(view.ivar.iter().map(|v| f64::from(*v)).collect()),
                good: view.good.to_vec(),
                medium: meta.fit_medium(),
                log_sampled: meta.log_sampled,
                fwhm: fwhm.clone(),
                redshift: meta.redshift,
            }
        })
        .collect())
}

/// The error for a whole cube given where one spectrum is expected.
fn needs_spaxel(path: &Path, nx: usize, ny: usize) -> FitError {
    FitError::read(
        path,
        format!("a {nx}x{ny} datacube: choose a spaxel with --spaxel X Y"),
    )
}

fn pick_row(all: &[f64], row: usize, n: usize) -> Vec<f64> {
    all[row * n..(row + 1) * n].to_vec()
}

fn image_shape(
    f: &mut fitsio::FitsFile,
    hdu: &fitsio::hdu::FitsHdu,
    path: &Path,
) -> Result<Vec<usize>, FitError> {
    let _ = f;
    match &hdu.info {
        fitsio::hdu::HduInfo::ImageInfo { shape, .. } => Ok(shape.clone()),
        _ => Err(FitError::read(path, "FLUX is not an image")),
    }
}

/// A spectrum ready for the fitter, with what is needed to prepare matching templates.
#[derive(Debug, Clone)]
pub struct RestFrameSpectrum {
    pub grid: LogGrid,
    pub spectrum: Spectrum,
    /// Rest-frame resolution curve (galaxy medium).
    pub fwhm: Option<ResolutionCurve>,
    pub medium: Medium,
    /// The redshift used to de-redshift.
    pub redshift: f64,
    /// The median the flux and noise were divided by.
    pub flux_scale: f64,
}

impl ObservedSpectrum {
    /// De-redshift by `z` (ln lambda_rest = ln lambda_obs - ln(1+z), so fitted velocities are
    /// relative to z), keep the rest-frame range `lam_range`, log-rebin if linear, normalise by
    /// the median flux, and set the noise from IVAR (or a constant when there is none).
    pub fn to_rest_frame(
        &self,
        z: f64,
        lam_range: Option<(f64, f64)>,
    ) -> Result<RestFrameSpectrum, FitError> {
        let n = self.flux.len();
        if self.wave.len() != n {
            return Err(FitError::LengthMismatch {
                flux: n,
                other: self.wave.len(),
                what: "wavelength",
            });
        }
        if n < 2 {
            return Err(FitError::NoGoodPixels);
        }
        let (mut ln_lam, mut flux, mut ivar, mut good) = if self.log_sampled {
            (
                self.wave.iter().map(|l| l.ln()).collect::<Vec<f64>>(),
                self.flux.clone(),
                self.ivar.clone(),
                self.good.clone(),
            )
        } else {
            // n log pixels over the span of the n linear pixels, borders included.
            let first = 1.5 * self.wave[0] - 0.5 * self.wave[1];
            let last = 1.5 * self.wave[n - 1] - 0.5 * self.wave[n - 2];
            let dv = C_KMS * (last / first).ln() / n as f64;
            // Bad pixels are bridged before rebinning and flagged after it.
            let clean: Vec<f64> = (0..n)
                .map(|i| if self.good[i] { self.flux[i] } else { 0.0 })
                .collect();
            let (ln0, rebinned) = log_rebin(&self.wave, &clean, dv);
            let badness: Vec<f64> = self
                .good
                .iter()
                .map(|g| if *g { 0.0 } else { 1.0 })
                .collect();
            let (_, bad) = log_rebin(&self.wave, &badness, dv);
            let m = rebinned.len();
            let ivar = self.ivar.as_ref().map(|iv| log_rebin(&self.wave, iv, dv).1);
            (
                (0..m).map(|i| ln0 + i as f64 * dv / C_KMS).collect(),
                rebinned,
                ivar,
                bad.iter().map(|b| *b == 0.0).collect(),
            )
        };
        let shift = (1.0 + z).ln();
        for l in ln_lam.iter_mut() {
            *l -= shift;
        }
        if let Some((lo, hi)) = lam_range {
            let keep: Vec<usize> = (0..ln_lam.len())
                .filter(|&i| ln_lam[i] >= lo.ln() && ln_lam[i] <= hi.ln())
                .collect();
            let (Some(&a), Some(&b)) = (keep.first(), keep.last()) else {
                return Err(FitError::Config(format!(
                    "no pixels of the spectrum fall in the rest-frame range {lo}-{hi} A"
                )));
            };
            ln_lam = ln_lam[a..=b].to_vec();
            flux = flux[a..=b].to_vec();
            ivar = ivar.map(|v| v[a..=b].to_vec());
            good = good[a..=b].to_vec();
        }
        let m = ln_lam.len();
        if m < 2 {
            return Err(FitError::NoGoodPixels);
        }
        let velscale = C_KMS * (ln_lam[m - 1] - ln_lam[0]) / (m - 1) as f64;
        let mut pos: Vec<f64> = (0..m)
            .filter(|&i| good[i] && flux[i].is_finite())
            .map(|i| flux[i])
            .collect();
        let flux_scale = if pos.is_empty() {
            1.0
        } else {
            let k = pos.len() / 2;
            let med = *pos.select_nth_unstable_by(k, f64::total_cmp).1;
            if med.abs() > 0.0 { med.abs() } else { 1.0 }
        };
        for v in flux.iter_mut() {
            *v /= flux_scale;
        }
        let spectrum = match ivar {
            Some(iv) => {
                let iv: Vec<f64> = iv.iter().map(|v| v * flux_scale * flux_scale).collect();
                Spectrum::from_ivar(flux, &iv, good)?
            }
            None => Spectrum {
                noise: vec![1.0; m],
                flux,
                good,
            },
        };
        Ok(RestFrameSpectrum {
            grid: LogGrid {
                ln_lam0: ln_lam[0],
                velscale,
                npix: m,
            },
            spectrum,
            fwhm: self.fwhm.as_ref().map(|f| f.deredshift(z)),
            medium: self.medium,
            redshift: z,
            flux_scale,
        })
    }
}

/// Common gas emission lines (air wavelengths, Angstrom): [OII], Hdelta, Hgamma, Hbeta,
/// [OIII], [OI], [NII], Halpha, [SII].
pub const EMISSION_LINES_AIR: [f64; 13] = [
    3726.03, 3728.82, 4101.76, 4340.47, 4861.33, 4958.92, 5006.84, 6300.30, 6548.03, 6583.41,
    6562.80, 6716.47, 6730.85,
];

/// Mask (set false) pixels within `half_width` km/s of the emission lines, for a rest-frame
/// grid in `medium`.
pub fn mask_emission_lines(grid: &LogGrid, medium: Medium, half_width: f64, good: &mut [bool]) {
    for line in EMISSION_LINES_AIR {
        let ln_line = convert_medium(line, Medium::Air, medium).ln();
        for (i, g) in good.iter_mut().enumerate().take(grid.npix) {
            let ln_lam = grid.ln_lam0 + i as f64 * grid.velscale / C_KMS;
            if (ln_lam - ln_line).abs() < half_width / C_KMS {
                *g = false;
            }
        }
    }
}

//! `astro-fit fit-cube`: a whole cube from file to maps, resumable.
//!
//! 1. stream the cube once by planes for S/N and footprint, select spaxels, Voronoi-bin them;
//! 2. plan chunks ([`crate::plan`]) and write `plan.json`;
//! 3. fit the integrated spectrum with every template: its V and sigma start every bin, its
//!    non-zero templates are where each bin's search starts; every bin ends fitted with the
//!    whole library ([`Fitter::fit_from_templates`]), or with those only on request;
//! 4. the planning thread streams the chunks' row bands and builds bin spectra while a rayon
//!    pool fits the previous chunk (one scratch per worker, one shared [`Fitter`]);
//! 5. each finished chunk is written atomically (`chunks/chunk-NNNNN.json` and `.model`):
//!    a rerun with the same settings fits only the chunks without a result file;
//! 6. MAPS FITS, model cube, PNG maps and `summary.json` from the chunk files.
//!
//! The control plane runs the same code as three stages on different workers:
//! [`prepare_plan`] (steps 1-3, writing nothing; [`write_plan`] stores it), [`ChunkFitter`]
//! (steps 4-5 for any chunk, in any order: [`ChunkFitter::read_spectra`],
//! [`ChunkFitter::fit_chunk`], [`FittedChunk::write`]) and [`assemble`] (step 6 but
//! `summary.json`). [`fit_cube`] is those three stages in one process, with the planning
//! thread reading the next chunk while the previous one is fitted.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::sync_channel;
use std::time::Instant;

use indicatif::ProgressBar;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::cube::{Cube, CubeError, CubeFormat, CubeMeta, KeyValue};
use crate::error::FitError;
use crate::fit::{FitConfig, FitResult, FitScratch, Fitter, LogGrid, Start};
use crate::gas::GasTemplates;
use crate::mapplot::{ColorScale, Panel, PlotError, plot_maps};
use crate::maps::{
    BinMap, BinResult, Fitted, GasLineResult, MapsError, MapsHeader, Measured, write_json_atomic,
    write_maps_with, write_model_cube, write_sfh_csv,
};
use crate::plan::{BinSpec, Chunk, ChunkLimits, PlanError, plan_chunks};
use crate::populations::{bootstrap_populations, populations, star_formation_history};
use crate::prepare::{self, BinSpectrum, PrepareConfig, PrepareError};
use crate::spectrum::{ObservedSpectrum, RestFrameSpectrum, mask_emission_lines};
use crate::templates::{self, C_KMS, Medium, PreparedTemplates, ResolutionCurve, TemplateLibrary};
use crate::voronoi::BinningOutcome;
use crate::xcorr::{CrossCorrelation, XcorrScratch};

#[derive(Debug, thiserror::Error)]
pub enum CubeFitError {
    #[error(transparent)]
    Cube(#[from] CubeError),
    #[error(transparent)]
    Prepare(#[from] PrepareError),
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error(transparent)]
    Maps(#[from] MapsError),
    #[error(transparent)]
    Plot(#[from] PlotError),
    #[error("templates: {0}")]
    Templates(#[source] FitError),
    #[error("fit of the integrated spectrum failed: {0}")]
    GlobalFit(#[source] FitError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a readable result file: {message}")]
    BadResultFile { path: PathBuf, message: String },
    #[error(
        "{dir} holds a fit with other settings ({differs}); use a new --out directory or delete it"
    )]
    OtherPlan { dir: PathBuf, differs: String },
    #[error("no redshift: the cube header has none, pass --redshift")]
    NoRedshift,
    #[error(
        "the cube's rest-frame range {cube_min:.0}-{cube_max:.0} A does not overlap the fit range {fit_min:.0}-{fit_max:.0} A"
    )]
    NoFitRange {
        cube_min: f64,
        cube_max: f64,
        fit_min: f64,
        fit_max: f64,
    },
    #[error("thread pool: {0}")]
    Threads(String),
    #[error("chunk {chunk} names bin {bin}, which is not in the plan")]
    NotInPlan { chunk: usize, bin: usize },
    #[error("chunk {chunk} holds spaxel ({x}, {y}), outside its rows or the cube")]
    SpaxelOutsideChunk { chunk: usize, x: u32, y: u32 },
}

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> CubeFitError + '_ {
    move |source| CubeFitError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// What the user asked for; everything here that changes results is part of the plan.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CubeFitOptions {
    pub cube: PathBuf,
    pub templates: PathBuf,
    /// Not part of the plan: a moved output directory still resumes.
    #[serde(skip)]
    pub out: PathBuf,
    pub target_sn: Option<f64>,
    pub moments: usize,
    pub degree: i32,
    pub mdegree: usize,
    pub populations: bool,
    /// pPXF's `regul` over the age x [M/H] grid for every bin (implies populations); 0: none.
    /// Absent from plans when 0.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub regul: f64,
    /// Fit the stellar attenuation A_V (Calzetti 2000) in every bin from this start (pPXF's
    /// `reddening`; not with `mdegree`). Absent from plans when None.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reddening: Option<f64>,
    /// Realisations of the residual bootstrap that gives each bin's light-weighted age and
    /// [M/H] an error (implies populations); 0: none. Absent from plans when 0.
    #[serde(default, skip_serializing_if = "is_zero_usize")]
    pub bootstrap: usize,
    /// Fit each bin with the global fit's templates only, never admitting others (faster;
    /// see `Fitter::fit_from_templates` for the default). Absent from plans when false.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub global_templates_only: bool,
    /// Systemic redshift; `None`: from the cube header.
    pub redshift: Option<f64>,
    /// Rest-frame range to fit, Angstrom.
    pub lam_range: (f64, f64),
    pub min_sn: f64,
    /// Pixels within this many km/s of common gas emission lines are not fitted; 0: none.
    /// Ignored with `gas`.
    pub emission_mask_kms: f64,
    /// Fit the gas emission lines with the stars (pPXF's line list inside the range; Balmer and
    /// forbidden components) instead of masking them. Absent from plans when false.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub gas: bool,
    /// `max_rows` 0: as many rows as fit in [`BAND_BYTES`].
    pub chunk: ChunkLimits,
    #[serde(skip)]
    pub threads: Option<usize>,
    #[serde(skip)]
    pub model_cube: bool,
}

impl CubeFitOptions {
    pub fn new(cube: PathBuf, templates: PathBuf, out: PathBuf) -> Self {
        CubeFitOptions {
            cube,
            templates,
            out,
            target_sn: None,
            moments: 2,
            degree: 4,
            mdegree: 0,
            populations: false,
            regul: 0.0,
            reddening: None,
            bootstrap: 0,
            global_templates_only: false,
            redshift: None,
            lam_range: (3600.0, 7400.0),
            min_sn: 1.0,
            emission_mask_kms: 600.0,
            gas: false,
            chunk: ChunkLimits {
                max_spectra: 64,
                max_rows: 0,
            },
            threads: None,
            model_cube: true,
        }
    }
}

impl CubeFitOptions {
    /// Every template is kept and each bin's ages, [M/H] and star-formation history are
    /// derived: asked for, or implied by regularisation or the bootstrap (whose point they
    /// are).
    pub fn fits_populations(&self) -> bool {
        self.populations || self.regul > 0.0 || self.bootstrap > 0
    }
}

fn is_zero(x: &f64) -> bool {
    *x == 0.0
}

fn is_zero_usize(x: &usize) -> bool {
    *x == 0
}

/// Per-bin star-formation histories next to the MAPS (see [`write_sfh_csv`]), written when
/// populations are fitted.
pub const SFH_FILE: &str = "sfh.csv";

/// Files `assemble` writes only for some settings (gas lines, populations), with what each
/// holds: published where they exist.
pub const OPTIONAL_OUTPUTS: [(&str, &str); 2] = [
    ("emission.png", "images of the main emission lines"),
    (
        SFH_FILE,
        "star-formation history per bin: age, [M/H], light and mass fractions",
    ),
];

/// Pixel data one chunk may read at most (flux, ivar and mask of its band of rows), unless
/// the user sets `chunk.max_rows`.
pub const BAND_BYTES: usize = 256 << 20;

/// The fit of the integrated spectrum.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GlobalFit {
    pub v: f64,
    pub sigma: f64,
    pub chi2: f64,
    /// Templates (by name) each bin is fitted with.
    pub templates: Vec<String>,
    /// Their weights in the global fit (the reference each bin's start is correlated with);
    /// empty in plans written before they were kept, which then start every bin at (v, sigma).
    #[serde(default)]
    pub weights: Vec<f64>,
}

/// `plan.json`: what a rerun must agree with to resume.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CubePlan {
    pub options: CubeFitOptions,
    pub cube_bytes: u64,
    pub redshift: f64,
    pub binning: Option<BinningOutcome>,
    pub bins: Vec<BinSpec>,
    pub chunks: Vec<Chunk>,
    pub global: GlobalFit,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChunkResult {
    pub chunk: usize,
    pub results: Vec<BinResult>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Timings {
    pub prepare_s: f64,
    pub global_fit_s: f64,
    pub fit_s: f64,
    pub outputs_s: f64,
    pub total_s: f64,
}

/// `summary.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CubeFitSummary {
    pub cube: PathBuf,
    pub format: CubeFormat,
    pub nx: usize,
    pub ny: usize,
    pub nwave: usize,
    pub redshift: f64,
    pub spaxels_selected: usize,
    pub bins: usize,
    pub binning: Option<BinningOutcome>,
    pub global: GlobalFit,
    pub chunks: usize,
    pub chunks_resumed: usize,
    pub spectra_fitted_now: usize,
    /// Model evaluations (convolution and NNLS solve) of the spectra fitted now, per fit.
    #[serde(default)]
    pub evaluations_per_fit: f64,
    pub failed_bins: usize,
    pub threads: usize,
    pub spectra_per_second: f64,
    pub median_velocity_error: f64,
    pub median_sigma_error: f64,
    pub timings: Timings,
}

/// How cube spectra become the fitter's rest-frame log-grid spectra, and back: the fitting
/// core's [`ObservedSpectrum::to_rest_frame`] does the de-redshifting, cut and rebinning.
struct GalaxyGrid {
    grid: LogGrid,
    /// Rest-frame resolution and medium, for preparing matching templates.
    fwhm: Option<ResolutionCurve>,
    medium: Medium,
    /// The observed-frame description every bin spectrum shares.
    wavelength: Vec<f64>,
    observed_fwhm: Option<ResolutionCurve>,
    log_sampled: bool,
    dereddening: Option<Vec<f64>>,
    redshift: f64,
    lam_range: (f64, f64),
    emission_mask_kms: f64,
    /// Gas lines are fitted (no emission-line masks).
    gas: bool,
    /// Pixels of the fit grid outside the emission-line masks (the grid is the same for
    /// every spectrum of the cube, so the masks are computed once).
    outside_lines: Option<Vec<bool>>,
}

impl GalaxyGrid {
    fn new(meta: &CubeMeta, options: &CubeFitOptions, redshift: f64) -> Result<Self, CubeFitError> {
        let w = &meta.wavelength;
        let (lo, hi) = options.lam_range;
        let rest = |l: f64| l / (1.0 + redshift);
        let inside = w.iter().filter(|l| (lo..=hi).contains(&rest(**l))).count();
        if inside < 50 {
            return Err(CubeFitError::NoFitRange {
                cube_min: rest(w[0]),
                cube_max: rest(w[w.len() - 1]),
                fit_min: lo,
                fit_max: hi,
            });
        }
        let mut gg = GalaxyGrid {
            grid: LogGrid {
                ln_lam0: 0.0,
                velscale: 0.0,
                npix: 0,
            },
            fwhm: None,
            medium: meta.fit_medium(),
            wavelength: w.clone(),
            observed_fwhm: meta.resolution_curve(),
            log_sampled: meta.log_sampled,
            dereddening: meta.ebv_galactic.filter(|e| *e > 0.0).map(|ebv| {
                w.iter()
                    .map(|l| 10f64.powf(0.4 * ebv * prepare::ccm_extinction_per_ebv(*l)))
                    .collect()
            }),
            redshift,
            lam_range: options.lam_range,
            emission_mask_kms: options.emission_mask_kms,
            gas: options.gas,
            outside_lines: None,
        };
        // The grid is a property of the wavelengths alone: take it from a flat spectrum.
        let flat = BinSpectrum {
            flux: vec![1.0; w.len()],
            ivar: vec![1.0; w.len()],
            good: vec![true; w.len()],
        };
        let rest = gg.rest_frame(&flat).map_err(CubeFitError::GlobalFit)?;
        gg.grid = rest.grid;
        gg.fwhm = rest.fwhm;
        if gg.emission_mask_kms > 0.0 && !gg.gas {
            let mut outside = vec![true; gg.grid.npix];
            mask_emission_lines(&gg.grid, gg.medium, gg.emission_mask_kms, &mut outside);
            gg.outside_lines = Some(outside);
        }
        Ok(gg)
    }

    /// The gas templates of the fit grid, when gas is fitted.
    fn gas_templates(&self) -> Result<Option<GasTemplates>, FitError> {
        if !self.gas {
            return Ok(None);
        }
        GasTemplates::new(&self.grid, self.medium, self.fwhm.as_ref(), None, false).map(Some)
    }

    /// The fitter of `tpl` on this grid with the fit's settings (and gas templates).
    fn fitter(
        &self,
        tpl: &PreparedTemplates,
        options: &CubeFitOptions,
    ) -> Result<Fitter, FitError> {
        let fitter = Fitter::new(tpl, self.grid, fit_config(options))?;
        match self.gas_templates()? {
            Some(gas) => fitter.with_gas(gas),
            None => Ok(fitter),
        }
    }

    /// Converts a fitted gas flux (normalised spectrum, summed over rest-frame log pixels) of
    /// a line at rest wavelength `wave` into the cube's flux unit times Angstrom.
    fn gas_flux_factor(&self, flux_scale: f64, wave: f64) -> f64 {
        flux_scale * wave * (1.0 + self.redshift) * self.grid.velscale / C_KMS
    }

    /// A cube-grid spectrum on the fit's rest-frame log grid (normalised by its median).
    fn rest_frame(&self, s: &BinSpectrum) -> Result<RestFrameSpectrum, FitError> {
        let mut s = s.clone();
        if let Some(f) = &self.dereddening {
            for (k, factor) in f.iter().enumerate() {
                s.flux[k] *= factor;
                s.ivar[k] /= factor * factor;
            }
        }
        let observed = ObservedSpectrum {
            wave: self.wavelength.clone(),
            flux: s.flux,
            ivar: Some(s.ivar),
            good: s.good,
            medium: self.medium,
            log_sampled: self.log_sampled,
            fwhm: self.observed_fwhm.clone(),
            redshift: Some(self.redshift),
        };
        let mut rest = observed.to_rest_frame(self.redshift, Some(self.lam_range))?;
        if let Some(outside) = &self.outside_lines {
            for (good, outside) in rest.spectrum.good.iter_mut().zip(outside) {
                *good &= *outside;
            }
        }
        Ok(rest)
    }

    /// A best fit (rest-frame log grid, normalised) back on the cube's observed grid, in the
    /// cube's flux units and reddened again; zero outside the fitted range.
    fn model_on_cube(&self, rest: &RestFrameSpectrum, bestfit: &[f64]) -> Vec<f32> {
        let mut out = vec![0f32; self.wavelength.len()];
        let d = self.grid.velscale / C_KMS;
        let n = bestfit.len();
        for (i, lam) in self.wavelength.iter().enumerate() {
            let p = ((lam / (1.0 + self.redshift)).ln() - self.grid.ln_lam0) / d;
            if p < -0.5 || p > n as f64 - 0.5 {
                continue;
            }
            let value = if self.log_sampled {
                bestfit[(p.round() as usize).min(n - 1)]
            } else {
                let k = (p.floor().max(0.0) as usize).min(n - 2);
                let f = (p - k as f64).clamp(0.0, 1.0);
                bestfit[k] * (1.0 - f) + bestfit[k + 1] * f
            };
            let red = self.dereddening.as_ref().map_or(1.0, |r| r[i]);
            out[i] = (value * rest.flux_scale / red) as f32;
        }
        out
    }
}

fn prepare_templates(
    lib: &TemplateLibrary,
    gg: &GalaxyGrid,
) -> Result<PreparedTemplates, CubeFitError> {
    let (lo, hi) = (gg.grid.lam(0), gg.grid.lam(gg.grid.npix - 1));
    let mut cfg = templates::PrepareConfig::new(gg.grid.velscale, (lo, hi), gg.medium);
    cfg.galaxy_fwhm = gg.fwhm.clone();
    templates::prepare(lib, &cfg).map_err(CubeFitError::Templates)
}

fn fit_config(options: &CubeFitOptions) -> FitConfig {
    FitConfig {
        moments: options.moments,
        degree: options.degree,
        mdegree: options.mdegree,
        regul: options.regul,
        reddening: options.reddening,
        ..FitConfig::default()
    }
}

fn bin_result(
    bin: usize,
    sn: f64,
    fit: &FitResult,
    tpl: &PreparedTemplates,
    with_pops: bool,
    flux_factor: &dyn Fn(f64) -> f64,
) -> BinResult {
    // Formal errors scaled by sqrt(chi2), as the MaNGA DAP reports them.
    let scale = fit.chi2.max(0.0).sqrt();
    let m = |i: usize, value: f64| Measured {
        value,
        error: fit.errors.get(i).map_or(f64::NAN, |e| e * scale),
    };
    let (pops, sfh) = if with_pops {
        (
            populations(tpl, &fit.weights),
            star_formation_history(tpl, &fit.weights),
        )
    } else {
        (None, None)
    };
    BinResult {
        bin,
        velocity: m(0, fit.v),
        sigma: m(1, fit.sigma),
        h3: fit.h.first().map(|h| m(2, *h)),
        h4: fit.h.get(1).map(|h| m(3, *h)),
        age_lw: pops.as_ref().map(|p| p.light_log_age),
        metallicity_lw: pops.as_ref().map(|p| p.light_metallicity),
        age_mw: pops.as_ref().and_then(|p| p.mass_log_age),
        metallicity_mw: pops.as_ref().and_then(|p| p.mass_metallicity),
        chi2: fit.chi2,
        sn,
        failure: None,
        gas: fit.gas.as_ref().map(|g| {
            g.lines
                .iter()
                .map(|l| {
                    let c = g
                        .components
                        .iter()
                        .find(|c| c.name == l.component)
                        .expect("every line belongs to a component");
                    let f = flux_factor(l.wave);
                    GasLineResult {
                        flux: Measured {
                            value: l.flux * f,
                            error: l.flux_error * f * scale,
                        },
                        vel: Measured {
                            value: c.v,
                            error: c.v_error * scale,
                        },
                        sigma: Measured {
                            value: c.sigma,
                            error: c.sigma_error * scale,
                        },
                    }
                })
                .collect()
        }),
        sfh,
        reddening: fit.reddening.map(|value| Measured {
            value,
            error: fit.reddening_error.map_or(f64::NAN, |e| e * scale),
        }),
        age_lw_error: None,
        metallicity_lw_error: None,
    }
}

/// File names of a chunk's two result files relative to an output directory:
/// `("chunks/chunk-00007.json", "chunks/chunk-00007.model")`. The JSON's presence marks the
/// chunk done; the model file holds its bins' model spectra.
pub fn chunk_files(id: usize) -> (String, String) {
    (
        format!("chunks/chunk-{id:05}.json"),
        format!("chunks/chunk-{id:05}.model"),
    )
}

fn chunk_paths(out: &Path, id: usize) -> (PathBuf, PathBuf) {
    let (json, model) = chunk_files(id);
    (out.join(json), out.join(model))
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), CubeFitError> {
    let tmp = path.with_extension("partial");
    std::fs::write(&tmp, bytes).map_err(io_err(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io_err(path))
}

fn read_chunk_result(path: &Path) -> Result<ChunkResult, CubeFitError> {
    let text = std::fs::read(path).map_err(io_err(path))?;
    serde_json::from_slice(&text).map_err(|e| CubeFitError::BadResultFile {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

/// Models of one chunk (bins in chunk order, each `nwave` f32, little endian).
fn read_chunk_models(path: &Path, nwave: usize) -> Result<Vec<f32>, CubeFitError> {
    let bytes = std::fs::read(path).map_err(io_err(path))?;
    if bytes.len() % (4 * nwave) != 0 {
        return Err(CubeFitError::BadResultFile {
            path: path.to_path_buf(),
            message: format!(
                "{} bytes is not a whole number of {nwave}-pixel models",
                bytes.len()
            ),
        });
    }
    Ok(bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect())
}

/// The plan's file name in an output directory.
pub const PLAN_FILE: &str = "plan.json";

/// Reads `out/plan.json`; `Ok(None)` when there is none.
pub fn load_plan(out: &Path) -> Result<Option<CubePlan>, CubeFitError> {
    let path = out.join(PLAN_FILE);
    if !path.exists() {
        return Ok(None);
    }
    let text = std::fs::read(&path).map_err(io_err(&path))?;
    serde_json::from_slice(&text)
        .map(Some)
        .map_err(|e| CubeFitError::BadResultFile {
            path,
            message: e.to_string(),
        })
}

/// Writes `out/plan.json` atomically, creating `out/chunks/` for the chunks' result files.
pub fn write_plan(out: &Path, plan: &CubePlan) -> Result<(), CubeFitError> {
    let chunks = out.join("chunks");
    std::fs::create_dir_all(&chunks).map_err(io_err(&chunks))?;
    write_json_atomic(&out.join(PLAN_FILE), plan)?;
    Ok(())
}

/// Names of the settings (as serialised into the plan) on which `a` and `b` differ.
fn differences(a: &CubeFitOptions, b: &CubeFitOptions) -> Vec<String> {
    let (a, b) = (
        serde_json::to_value(a).unwrap_or_default(),
        serde_json::to_value(b).unwrap_or_default(),
    );
    let (Some(a), Some(b)) = (a.as_object(), b.as_object()) else {
        return vec!["unreadable options".into()];
    };
    let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
    keys.sort();
    keys.dedup();
    keys.into_iter()
        .filter(|k| a.get(*k) != b.get(*k))
        .cloned()
        .collect()
}

/// Each bin's search starts where its spectrum correlates best with the global fit's stellar
/// model (see [`CrossCorrelation`]); None for plans without the global weights.
fn start_finder(
    global: &GlobalFit,
    names: &[String],
    fitter: &Fitter,
) -> Result<Option<CrossCorrelation>, CubeFitError> {
    if global.weights.len() != global.templates.len() || global.weights.is_empty() {
        return Ok(None);
    }
    let by_name: HashMap<&str, f64> = global
        .templates
        .iter()
        .map(String::as_str)
        .zip(global.weights.iter().copied())
        .collect();
    let weights: Vec<f64> = names
        .iter()
        .map(|n| by_name.get(n.as_str()).copied().unwrap_or(0.0))
        .collect();
    // A reference one pixel wide keeps the correlation peak sharp; its width is calibrated.
    let velscale = fitter.grid().velscale;
    let reference_start = Start::new(global.v, velscale);
    let reference = fitter
        .stellar_model(&weights, &reference_start)
        .map_err(CubeFitError::GlobalFit)?;
    // Spaxels of one galaxy move by a few times the global dispersion (which rotation
    // broadens) at most; a peak further out is more likely noise, and the global start stays.
    let max_offset = (3.0 * global.sigma)
        .max(500.0)
        .min(fitter.config().max_velocity);
    Ok(CrossCorrelation::new(
        &reference,
        reference_start,
        velscale,
        max_offset,
    ))
}

/// Stage 1 (steps 1-3) computed: a plan from one pass over the cube (S/N, footprint, binning,
/// chunks) and the global fit. Writes nothing (`options.out` is ignored), so the control plane
/// can run it anywhere and store the plan where it likes ([`write_plan`]).
pub fn prepare_plan(
    options: &CubeFitOptions,
    cube: &mut Cube,
    lib: &TemplateLibrary,
) -> Result<PreparedPlan, CubeFitError> {
    // The size is how a resumed run recognises its cube without reading it again.
    let cube_bytes = std::fs::metadata(&options.cube)
        .map_err(io_err(&options.cube))?
        .len();
    let t = Instant::now();
    let meta = cube.meta().clone();
    let redshift = options
        .redshift
        .or(meta.redshift)
        .ok_or(CubeFitError::NoRedshift)?;
    let pcfg = PrepareConfig {
        redshift,
        min_sn: options.min_sn,
        ..PrepareConfig::default()
    };
    let planes = (64 << 20) / (meta.nspaxels() * 9).max(1);
    let stats = prepare::spaxel_stats(cube, &pcfg, planes.max(1))?;
    let selected = prepare::select_spaxels(&stats, &pcfg)?;
    let (bins, binning) = prepare::make_bins(&stats, &selected, options.target_sn)?;
    let limits = ChunkLimits {
        max_rows: match options.chunk.max_rows {
            0 => cube.rows_per_block(BAND_BYTES),
            rows => rows,
        },
        ..options.chunk
    };
    let chunks = plan_chunks(&bins, limits)?;
    let prepare_s = t.elapsed().as_secs_f64();

    let t = Instant::now();
    let gg = GalaxyGrid::new(&meta, options, redshift)?;
    let all = prepare_templates(lib, &gg)?;
    let integrated = prepare::integrated_spectrum(cube, &selected, cube.rows_per_block(64 << 20))?;
    let rest = gg
        .rest_frame(&integrated)
        .map_err(CubeFitError::GlobalFit)?;
    let fitter = gg.fitter(&all, options).map_err(CubeFitError::GlobalFit)?;
    let fit = fitter
        .fit(&rest.spectrum, &Start::new(0.0, 150.0))
        .map_err(CubeFitError::GlobalFit)?;
    let (keep, weights): (Vec<String>, Vec<f64>) = all
        .names
        .iter()
        .zip(&fit.weights)
        .filter(|(_, w)| options.fits_populations() || **w > 0.0)
        .map(|(n, w)| (n.clone(), *w))
        .unzip();
    let global_fit_s = t.elapsed().as_secs_f64();
    let plan = CubePlan {
        options: options.clone(),
        cube_bytes,
        redshift,
        binning,
        bins,
        chunks,
        global: GlobalFit {
            v: fit.v,
            sigma: fit.sigma,
            chi2: fit.chi2,
            templates: keep,
            weights,
        },
    };
    Ok(PreparedPlan {
        plan,
        prepare_s,
        global_fit_s,
    })
}

/// The plan of `options.out`: read back when the directory has one with the same settings
/// and cube size (an error when they differ), else computed ([`prepare_plan`]) and written.
/// Returns whether it was computed now.
pub fn make_or_load_plan(
    options: &CubeFitOptions,
    cube: &mut Cube,
    lib: &TemplateLibrary,
) -> Result<(PreparedPlan, bool), CubeFitError> {
    let cube_bytes = std::fs::metadata(&options.cube)
        .map_err(io_err(&options.cube))?
        .len();
    if let Some(plan) = load_plan(&options.out)? {
        let mut differs = differences(&plan.options, options);
        if plan.cube_bytes != cube_bytes {
            differs.push(format!(
                "cube size ({} vs {cube_bytes} bytes)",
                plan.cube_bytes
            ));
        }
        if !differs.is_empty() {
            return Err(CubeFitError::OtherPlan {
                dir: options.out.clone(),
                differs: differs.join(", "),
            });
        }
        let loaded = PreparedPlan {
            plan,
            prepare_s: 0.0,
            global_fit_s: 0.0,
        };
        return Ok((loaded, false));
    }
    let mut prepared = prepare_plan(options, cube, lib)?;
    write_plan(&options.out, &prepared.plan)?;
    // Fit with the plan as written and read back (JSON may move a float by one ulp), as a
    // resumed run and the control plane's workers do: then every path starts the same bins
    // from the same bits.
    if let Some(plan) = load_plan(&options.out)? {
        prepared.plan = plan;
    }
    Ok((prepared, true))
}

/// Stage 1's outcome: the plan and how long its two parts took.
#[derive(Debug, Clone)]
pub struct PreparedPlan {
    pub plan: CubePlan,
    /// Reading the cube for S/N and footprint, binning, chunk planning.
    pub prepare_s: f64,
    /// The fit of the integrated spectrum.
    pub global_fit_s: f64,
}

/// Stage 2: what fitting the chunks of one plan needs (the fit grid, the prepared templates,
/// the fitter, the start finder), built once per (plan, cube grid, library) and reused for
/// any number of chunks, in any order, on any thread. Settings come from `plan.options`; the
/// cube and template paths there are not used (a worker has its own copies).
pub struct ChunkFitter {
    gg: GalaxyGrid,
    tpl: PreparedTemplates,
    fitter: Fitter,
    /// Indices of the global fit's templates in `tpl`: where each bin's search starts.
    first: Vec<usize>,
    /// Where a bin starts when the cross-correlation finds no clear peak.
    start_values: Start,
    xcorr: Option<CrossCorrelation>,
    bins: HashMap<usize, BinSpec>,
    populations: bool,
    bootstrap: usize,
    nwave: usize,
}

impl ChunkFitter {
    pub fn new(
        plan: &CubePlan,
        meta: &CubeMeta,
        lib: TemplateLibrary,
    ) -> Result<ChunkFitter, CubeFitError> {
        let options = &plan.options;
        let gg = GalaxyGrid::new(meta, options, plan.redshift)?;
        let kept: std::collections::HashSet<&str> =
            plan.global.templates.iter().map(String::as_str).collect();
        // Every bin is fitted with the whole library; the global fit's templates are where
        // each bin's search starts (see `Fitter::fit_from_templates`). Or, on request, with
        // those only.
        let lib = if options.global_templates_only {
            let names = lib.names.clone();
            lib.select(|i| kept.contains(names[i].as_str()))
        } else {
            lib
        };
        let first: Vec<usize> = (0..lib.names.len())
            .filter(|&i| kept.contains(lib.names[i].as_str()))
            .collect();
        let tpl = prepare_templates(&lib, &gg)?;
        let fitter = gg.fitter(&tpl, options).map_err(CubeFitError::Templates)?;
        let xcorr = start_finder(&plan.global, &lib.names, &fitter)?;
        Ok(ChunkFitter {
            gg,
            tpl,
            fitter,
            first,
            start_values: Start::new(plan.global.v, plan.global.sigma),
            xcorr,
            bins: plan.bins.iter().map(|b| (b.id, b.clone())).collect(),
            populations: options.fits_populations(),
            bootstrap: options.bootstrap,
            nwave: meta.nwave(),
        })
    }

    /// Reads the chunk's row band from the open cube and combines its bins' spectra (in the
    /// chunk's bin order).
    pub fn read_spectra(
        &self,
        cube: &mut Cube,
        chunk: &Chunk,
    ) -> Result<Vec<BinSpectrum>, CubeFitError> {
        let bins: Vec<&BinSpec> = chunk
            .bins
            .iter()
            .map(|id| {
                self.bins.get(id).ok_or(CubeFitError::NotInPlan {
                    chunk: chunk.id,
                    bin: *id,
                })
            })
            .collect::<Result<_, _>>()?;
        // A spaxel outside the band would index past the block: refuse a chunk that does not
        // hold its own bins (a hand-edited or foreign plan) rather than panic.
        let (nx, ny) = (cube.meta().nx, cube.meta().ny);
        if let Some(s) = bins.iter().flat_map(|b| &b.spaxels).find(|s| {
            s[0] as usize >= nx || s[1] as usize >= ny || !chunk.rows.contains(&(s[1] as usize))
        }) {
            return Err(CubeFitError::SpaxelOutsideChunk {
                chunk: chunk.id,
                x: s[0],
                y: s[1],
            });
        }
        let block = cube.read_rows(chunk.rows.clone())?;
        Ok(bins
            .iter()
            .map(|b| prepare::combine(&block, &b.spaxels))
            .collect())
    }

    /// Fits one chunk's spectra (from [`Self::read_spectra`]) on `pool`, one scratch per
    /// worker thread, incrementing `progress` per spectrum. A bin whose fit fails is recorded
    /// as failed (with zeros for its model), as is a bin without a spectrum.
    pub fn fit_chunk(
        &self,
        chunk: &Chunk,
        spectra: &[BinSpectrum],
        pool: &rayon::ThreadPool,
        progress: &ProgressBar,
    ) -> FittedChunk {
        let evaluations = AtomicUsize::new(0);
        let fitted_ok = AtomicUsize::new(0);
        let fitted: Vec<(BinResult, Vec<f32>)> = pool.install(|| {
            chunk
                .bins
                .par_iter()
                .enumerate()
                .map_init(
                    || {
                        (
                            self.fitter.scratch(),
                            self.xcorr.as_ref().map(|x| x.scratch()),
                        )
                    },
                    |(scratch, xscratch), (k, id)| {
                        let sn = self.bins.get(id).map_or(f64::NAN, |b| b.sn);
                        let outcome = match spectra.get(k) {
                            Some(spec) => self
                                .fit_one(spec, scratch, xscratch.as_mut())
                                .map_err(|e| e.to_string()),
                            None => Err("no spectrum was given for this bin".to_string()),
                        };
                        progress.inc(1);
                        match outcome {
                            Ok((rest, fit)) => {
                                evaluations.fetch_add(fit.evaluations, Ordering::Relaxed);
                                fitted_ok.fetch_add(1, Ordering::Relaxed);
                                let factor =
                                    |wave: f64| self.gg.gas_flux_factor(rest.flux_scale, wave);
                                let mut result =
                                    bin_result(*id, sn, &fit, &self.tpl, self.populations, &factor);
                                if self.populations && self.bootstrap > 0 {
                                    // Seeded by the bin: a rerun gives the same errors.
                                    let errors = bootstrap_populations(
                                        &self.fitter,
                                        scratch,
                                        &self.tpl,
                                        &rest.spectrum,
                                        &fit,
                                        self.bootstrap,
                                        *id as u64,
                                    );
                                    result.age_lw_error = errors.map(|e| e.light_log_age);
                                    result.metallicity_lw_error =
                                        errors.map(|e| e.light_metallicity);
                                }
                                (result, self.gg.model_on_cube(&rest, &fit.bestfit))
                            }
                            Err(why) => (BinResult::failed(*id, sn, why), vec![0.0; self.nwave]),
                        }
                    },
                )
                .collect()
        });
        let mut models = Vec::with_capacity(fitted.len() * self.nwave);
        let mut results = Vec::with_capacity(fitted.len());
        for (r, m) in fitted {
            models.extend_from_slice(&m);
            results.push(r);
        }
        FittedChunk {
            result: ChunkResult {
                chunk: chunk.id,
                results,
            },
            models,
            evaluations: evaluations.into_inner(),
            fitted_ok: fitted_ok.into_inner(),
        }
    }

    fn fit_one(
        &self,
        spec: &BinSpectrum,
        scratch: &mut FitScratch,
        xscratch: Option<&mut XcorrScratch>,
    ) -> Result<(RestFrameSpectrum, FitResult), FitError> {
        let rest = self.gg.rest_frame(spec)?;
        let sp = &rest.spectrum;
        let start = self
            .xcorr
            .as_ref()
            .zip(xscratch)
            .and_then(|(x, xs)| x.start_for(&sp.flux, &sp.good, xs))
            .unwrap_or(self.start_values);
        let fit = self
            .fitter
            .fit_from_templates(scratch, sp, &start, Some(&self.first))?;
        Ok((rest, fit))
    }
}

/// One fitted chunk: its results, its bins' model spectra on the cube's wavelength grid
/// (bins in chunk order, `nwave` each), and the fit statistics for the summary.
#[derive(Debug, Clone)]
pub struct FittedChunk {
    pub result: ChunkResult,
    pub models: Vec<f32>,
    /// Model evaluations (convolution and NNLS solve) of the bins fitted successfully.
    pub evaluations: usize,
    pub fitted_ok: usize,
}

impl FittedChunk {
    /// Writes `chunks/chunk-NNNNN.json` and `.model` under `out`: the model spectra first,
    /// then the JSON whose presence marks the chunk done (each renamed into place, so an
    /// interrupted write leaves the chunk to be refitted, never half a result).
    pub fn write(&self, out: &Path) -> Result<(), CubeFitError> {
        let (json, model) = chunk_paths(out, self.result.chunk);
        if let Some(dir) = json.parent() {
            std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        }
        let bytes: Vec<u8> = self.models.iter().flat_map(|v| v.to_le_bytes()).collect();
        write_atomic(&model, &bytes)?;
        let text = serde_json::to_vec(&self.result)
            .map_err(|e| io_err(&json)(std::io::Error::other(e)))?;
        write_atomic(&json, &text)
    }
}

/// Fits the whole cube as `options` say; see the module documentation. Runs the three stages
/// the control plane runs separately: [`prepare_plan`] (or the saved plan), [`ChunkFitter`]
/// on every chunk without a result, [`assemble`].
pub fn fit_cube(
    options: &CubeFitOptions,
    progress: &ProgressBar,
) -> Result<CubeFitSummary, CubeFitError> {
    let start = Instant::now();
    let mut cube = Cube::open(&options.cube)?;
    let meta = cube.meta().clone();
    let lib = TemplateLibrary::load(&options.templates).map_err(CubeFitError::Templates)?;
    std::fs::create_dir_all(options.out.join("chunks")).map_err(io_err(&options.out))?;
    let (prepared, _) = make_or_load_plan(options, &mut cube, &lib)?;
    let mut timings = Timings {
        prepare_s: prepared.prepare_s,
        global_fit_s: prepared.global_fit_s,
        fit_s: 0.0,
        outputs_s: 0.0,
        total_s: 0.0,
    };
    let plan = prepared.plan;
    let fitter = ChunkFitter::new(&plan, &meta, lib)?;

    let todo: Vec<&Chunk> = plan
        .chunks
        .iter()
        .filter(|c| !chunk_paths(&options.out, c.id).0.exists())
        .collect();
    let resumed = plan.chunks.len() - todo.len();
    let nspectra: usize = todo.iter().map(|c| c.nspectra).sum();
    progress.set_length(nspectra as u64);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(options.threads.unwrap_or(0))
        .build()
        .map_err(|e| CubeFitError::Threads(e.to_string()))?;

    let mut evaluations = 0usize;
    let mut fitted_ok = 0usize;
    let t = Instant::now();
    // This thread reads row bands in chunk order (one band in memory at a time) with the cube
    // already open (a .gz cube is decompressed once); a second thread fits each chunk on the
    // pool and writes it while the next band is read.
    let (tx, rx) = sync_channel::<(&Chunk, Vec<BinSpectrum>)>(1);
    std::thread::scope(|scope| -> Result<(), CubeFitError> {
        let fitting = scope.spawn(|| -> Result<(usize, usize), CubeFitError> {
            let (mut evaluations, mut fitted_ok) = (0, 0);
            for (chunk, spectra) in rx {
                let fitted = fitter.fit_chunk(chunk, &spectra, &pool, progress);
                fitted.write(&options.out)?;
                evaluations += fitted.evaluations;
                fitted_ok += fitted.fitted_ok;
            }
            Ok((evaluations, fitted_ok))
        });
        let mut read = Ok(());
        for chunk in todo {
            match fitter.read_spectra(&mut cube, chunk) {
                // A closed channel means the fitting thread stopped on an error.
                Ok(spectra) => {
                    if tx.send((chunk, spectra)).is_err() {
                        break;
                    }
                }
                Err(e) => {
                    read = Err(e);
                    break;
                }
            }
        }
        drop(tx);
        (evaluations, fitted_ok) = fitting
            .join()
            .map_err(|_| CubeFitError::Threads("the fitting thread panicked".into()))??;
        read
    })?;
    timings.fit_s = t.elapsed().as_secs_f64();
    progress.finish();

    let t = Instant::now();
    let stats = assemble(&options.out, &meta, &plan, options.model_cube)?;
    timings.outputs_s = t.elapsed().as_secs_f64();
    timings.total_s = start.elapsed().as_secs_f64();
    let summary = CubeFitSummary {
        cube: options.cube.clone(),
        format: meta.format,
        nx: meta.nx,
        ny: meta.ny,
        nwave: meta.nwave(),
        redshift: plan.redshift,
        spaxels_selected: plan.bins.iter().map(|b| b.spaxels.len()).sum(),
        bins: plan.bins.len(),
        binning: plan.binning,
        global: plan.global.clone(),
        chunks: plan.chunks.len(),
        chunks_resumed: resumed,
        spectra_fitted_now: nspectra,
        evaluations_per_fit: evaluations as f64 / fitted_ok.max(1) as f64,
        failed_bins: stats.failed,
        threads: pool.current_num_threads(),
        spectra_per_second: if timings.fit_s > 0.0 {
            nspectra as f64 / timings.fit_s
        } else {
            0.0
        },
        median_velocity_error: stats.median_v_err,
        median_sigma_error: stats.median_sigma_err,
        timings,
    };
    write_json_atomic(&options.out.join("summary.json"), &summary)?;
    Ok(summary)
}

/// What [`assemble`] found in the chunk results.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AssembleStats {
    /// Bins whose fit failed.
    pub failed: usize,
    /// Medians of the (sqrt(chi2)-scaled) formal errors over the bins with a result.
    pub median_v_err: f64,
    pub median_sigma_err: f64,
    /// Bins with a result (fitted or failed).
    pub bins: usize,
    /// Chunks of the plan without a result file: their bins are flagged as not fitted.
    pub chunks_missing: usize,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// All chunk results, indexed by bin.
pub fn collect_results(
    out: &Path,
    plan: &CubePlan,
) -> Result<Vec<Option<BinResult>>, CubeFitError> {
    let mut results: Vec<Option<BinResult>> = vec![None; plan.bins.len()];
    for chunk in &plan.chunks {
        let (json, _) = chunk_paths(out, chunk.id);
        if !json.exists() {
            continue;
        }
        for r in read_chunk_result(&json)?.results {
            let slot = results
                .get_mut(r.bin)
                .ok_or_else(|| CubeFitError::BadResultFile {
                    path: json.clone(),
                    message: format!("bin {} is not in the plan", r.bin),
                })?;
            *slot = Some(r);
        }
    }
    Ok(results)
}

/// Where the maps came from, as their primary header names it: the cube and the template
/// library (file or dataset names; a base name is enough).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Provenance {
    pub input: String,
    pub templates: String,
}

impl Provenance {
    /// The base names of the plan's cube and template paths.
    pub fn from_plan(plan: &CubePlan) -> Self {
        let base = |p: &Path| {
            p.file_name()
                .map_or_else(|| p.display().to_string(), |n| n.to_string_lossy().into())
        };
        Provenance {
            input: base(&plan.options.cube),
            templates: base(&plan.options.templates),
        }
    }
}

/// The primary-header cards of the maps: the provenance and every setting that changes the
/// results, so that a MAPS file says how it was made.
fn maps_header(plan: &CubePlan, provenance: &Provenance, gas: Option<&GasTemplates>) -> MapsHeader {
    let o = &plan.options;
    let text = |v: &str| KeyValue::Text(v.to_string());
    let flag = |b: bool| KeyValue::Integer(i64::from(b));
    let card = |k: &str, v: KeyValue, c: &str| (k.to_string(), v, c.to_string());
    let mut cards = vec![
        card("INFILE", text(&provenance.input), "the cube fitted"),
        card(
            "REDSHIFT",
            KeyValue::Number(plan.redshift),
            "systemic z; velocities are relative to it",
        ),
        card(
            "ZSOURCE",
            text(if o.redshift.is_some() {
                "--redshift"
            } else {
                "cube header"
            }),
            "where the redshift came from",
        ),
        card("TPLLIB", text(&provenance.templates), "template library"),
        card(
            "MOMENTS",
            KeyValue::Integer(o.moments as i64),
            "Gauss-Hermite moments fitted",
        ),
        card(
            "DEGREE",
            KeyValue::Integer(i64::from(o.degree)),
            "additive Legendre degree (<0: none)",
        ),
        card(
            "MDEGREE",
            KeyValue::Integer(o.mdegree as i64),
            "multiplicative Legendre degree",
        ),
        card(
            "LAMMIN",
            KeyValue::Number(o.lam_range.0),
            "[Angstrom] rest-frame range fitted, start",
        ),
        card(
            "LAMMAX",
            KeyValue::Number(o.lam_range.1),
            "[Angstrom] rest-frame range fitted, end",
        ),
        card(
            "ELMASK",
            KeyValue::Number(o.emission_mask_kms),
            "[km/s] half-width of emission-line masks",
        ),
    ];
    cards.push(match o.target_sn {
        Some(sn) => card(
            "TARGETSN",
            KeyValue::Number(sn),
            "Voronoi binning target S/N",
        ),
        None => card("TARGETSN", text("none"), "no binning: one spaxel per bin"),
    });
    cards.extend([
        card(
            "MINSN",
            KeyValue::Number(o.min_sn),
            "spaxels below this S/N were not fitted",
        ),
        card(
            "POPULAT",
            flag(o.fits_populations()),
            "1: ages and [M/H] fitted (--populations)",
        ),
        card(
            "REDDEN",
            o.reddening.map_or(text("none"), KeyValue::Number),
            "stellar A_V start, Calzetti 2000 (--reddening)",
        ),
        card(
            "BOOTSTRP",
            KeyValue::Integer(o.bootstrap as i64),
            "bootstrap realisations of age/[M/H] errors",
        ),
        card(
            "REGUL",
            KeyValue::Number(o.regul),
            "pPXF regul over age x [M/H] (0: none)",
        ),
        card(
            "GLOBTPL",
            flag(o.global_templates_only),
            "1: global fit's templates only",
        ),
        card(
            "GASFIT",
            flag(o.gas),
            "1: emission lines fitted with the stars (--gas)",
        ),
    ]);
    MapsHeader {
        fitted: Fitted {
            moments: o.moments,
            populations: o.fits_populations(),
            reddening: o.reddening.is_some(),
        },
        provenance: cards,
        gas_channels: gas.map(GasTemplates::dap_channels).unwrap_or_default(),
    }
}

/// Stage 3: from `plan` and the chunk results under `out/chunks/`, writes `maps.fits`,
/// `model.fits` (when `model_cube`) and `maps.png` into `out`. Chunks without results are
/// written as not fitted (see [`AssembleStats::chunks_missing`]). The maps name the plan's
/// cube and template library by base name; [`assemble_with`] takes other names.
pub fn assemble(
    out: &Path,
    meta: &CubeMeta,
    plan: &CubePlan,
    model_cube: bool,
) -> Result<AssembleStats, CubeFitError> {
    assemble_with(out, meta, plan, model_cube, &Provenance::from_plan(plan))
}

/// [`assemble`], the maps' primary header naming the input and templates as `provenance`
/// says (e.g. the dataset names on the control plane, where the local paths mean nothing).
pub fn assemble_with(
    out: &Path,
    meta: &CubeMeta,
    plan: &CubePlan,
    model_cube: bool,
    provenance: &Provenance,
) -> Result<AssembleStats, CubeFitError> {
    let results = collect_results(out, plan)?;
    let map = BinMap::from_bins(meta.nx, meta.ny, &plan.bins);
    let gas = if plan.options.gas {
        GalaxyGrid::new(meta, &plan.options, plan.redshift)?
            .gas_templates()
            .map_err(CubeFitError::Templates)?
    } else {
        None
    };
    let header = maps_header(plan, provenance, gas.as_ref());
    write_maps_with(&out.join("maps.fits"), meta, &map, &results, &header)?;
    write_sfh_csv(&out.join(SFH_FILE), &results)?;
    if !header.gas_channels.is_empty() {
        gas_png(
            &out.join("emission.png"),
            meta,
            &map,
            &results,
            &header.gas_channels,
        )?;
    }
    if model_cube {
        write_model(out, meta, plan)?;
    }
    let per_spaxel = |f: &dyn Fn(&BinResult) -> Option<f64>| -> Vec<Option<f64>> {
        map.bin_of
            .iter()
            .map(|b| {
                b.and_then(|b| results[b].as_ref())
                    .filter(|r| r.failure.is_none())
                    .and_then(f)
            })
            .collect()
    };
    let mut panels = vec![
        Panel {
            title: "stellar velocity (km/s)".into(),
            values: per_spaxel(&|r| Some(r.velocity.value)),
            scale: ColorScale::Diverging,
            range: None,
        },
        Panel {
            title: "stellar dispersion (km/s)".into(),
            values: per_spaxel(&|r| Some(r.sigma.value)),
            scale: ColorScale::Sequential,
            range: None,
        },
    ];
    if plan.options.fits_populations() {
        panels.push(Panel {
            title: "light-weighted log age (yr)".into(),
            values: per_spaxel(&|r| r.age_lw),
            scale: ColorScale::Sequential,
            range: None,
        });
        panels.push(Panel {
            title: "light-weighted [M/H]".into(),
            values: per_spaxel(&|r| r.metallicity_lw),
            scale: ColorScale::Sequential,
            range: None,
        });
    }
    if plan.options.reddening.is_some() {
        panels.push(Panel {
            title: "stellar A_V (mag)".into(),
            values: per_spaxel(&|r| r.reddening.map(|m| m.value)),
            scale: ColorScale::Sequential,
            range: None,
        });
    }
    panels.push(Panel {
        title: "S/N".into(),
        values: per_spaxel(&|r| Some(r.sn)),
        scale: ColorScale::Sequential,
        range: None,
    });
    panels.push(Panel {
        title: "bins".into(),
        values: map.bin_of.iter().map(|b| b.map(|b| b as f64)).collect(),
        scale: ColorScale::Categorical,
        range: None,
    });
    plot_maps(
        &out.join("maps.png"),
        meta.nx,
        meta.ny,
        meta.pixel_scale_arcsec,
        &panels,
    )?;
    let done: Vec<&BinResult> = results.iter().flatten().collect();
    Ok(AssembleStats {
        failed: done.iter().filter(|r| r.failure.is_some()).count(),
        median_v_err: median(done.iter().map(|r| r.velocity.error).collect()),
        median_sigma_err: median(done.iter().map(|r| r.sigma.error).collect()),
        bins: done.len(),
        chunks_missing: plan
            .chunks
            .iter()
            .filter(|c| !chunk_paths(out, c.id).0.exists())
            .count(),
    })
}

/// PNG maps of the main emission lines: flux of Halpha, Hbeta, [OIII]5007, [NII]6583 (those
/// fitted), and the velocity and dispersion of the Balmer (Halpha or Hbeta) and forbidden
/// ([OIII]5007 or [NII]6583) components.
fn gas_png(
    path: &Path,
    meta: &CubeMeta,
    map: &BinMap,
    results: &[Option<BinResult>],
    channels: &[crate::maps::GasChannel],
) -> Result<(), CubeFitError> {
    let images = crate::maps::gas_images(map, results, channels);
    let n = map.bin_of.len();
    let channel = |name: &str| channels.iter().position(|c| c.name == name);
    let panel = |img: usize, c: usize, title: String, scale: ColorScale| Panel {
        title,
        values: (0..n)
            .map(|i| {
                let k = c * n + i;
                (images[img].mask[k] == 0).then_some(f64::from(images[img].value[k]))
            })
            .collect(),
        scale,
        range: None,
    };
    let mut panels = Vec::new();
    for (name, label) in [
        ("Ha-6564", "Halpha"),
        ("Hb-4862", "Hbeta"),
        ("OIII-5008", "[OIII]5007"),
        ("NII-6585", "[NII]6583"),
    ] {
        if let Some(c) = channel(name) {
            panels.push(panel(0, c, format!("{label} flux"), ColorScale::Sequential));
        }
    }
    for (names, label) in [
        (["Ha-6564", "Hb-4862"], "Balmer"),
        (["OIII-5008", "NII-6585"], "forbidden"),
    ] {
        if let Some(c) = names.iter().find_map(|n| channel(n)) {
            panels.push(panel(
                1,
                c,
                format!("{label} gas velocity (km/s)"),
                ColorScale::Diverging,
            ));
            panels.push(panel(
                2,
                c,
                format!("{label} gas dispersion (km/s)"),
                ColorScale::Sequential,
            ));
        }
    }
    if panels.is_empty() {
        return Ok(());
    }
    plot_maps(path, meta.nx, meta.ny, meta.pixel_scale_arcsec, &panels)?;
    Ok(())
}

/// The model cube, one row band at a time, loading each chunk's models only while its rows
/// are being written (chunks are planned in row order).
fn write_model(out: &Path, meta: &CubeMeta, plan: &CubePlan) -> Result<(), CubeFitError> {
    let nwave = meta.nwave();
    let mut where_is: HashMap<usize, (usize, usize)> = HashMap::new();
    for c in &plan.chunks {
        for (pos, b) in c.bins.iter().enumerate() {
            where_is.insert(*b, (c.id, pos));
        }
    }
    let map = BinMap::from_bins(meta.nx, meta.ny, &plan.bins);
    let mut loaded: HashMap<usize, Vec<f32>> = HashMap::new();
    let band_rows = (32usize << 20) / (meta.nx * nwave * 4).max(1);
    let mut failure: Option<CubeFitError> = None;
    let result = write_model_cube(&out.join("model.fits"), meta, band_rows.max(1), |rows| {
        loaded.retain(|id, _| plan.chunks[*id].rows.end > rows.start);
        let mut band = vec![0f32; rows.len() * meta.nx * nwave];
        for y in rows.clone() {
            for x in 0..meta.nx {
                let Some(bin) = map.bin_of[y * meta.nx + x] else {
                    continue;
                };
                let (chunk, pos) = where_is[&bin];
                let models = match loaded.entry(chunk) {
                    Entry::Occupied(e) => e.into_mut(),
                    Entry::Vacant(e) => {
                        let (_, path) = chunk_paths(out, chunk);
                        if !path.exists() {
                            continue; // not fitted (yet): zeros
                        }
                        match read_chunk_models(&path, nwave) {
                            Ok(m) => e.insert(m),
                            Err(err) => {
                                failure = Some(err);
                                return Err(MapsError::Io {
                                    path,
                                    source: std::io::Error::other("unreadable chunk model"),
                                });
                            }
                        }
                    }
                };
                let s = (y - rows.start) * meta.nx + x;
                band[s * nwave..(s + 1) * nwave]
                    .copy_from_slice(&models[pos * nwave..(pos + 1) * nwave]);
            }
        }
        Ok(band)
    });
    match (result, failure) {
        (_, Some(e)) => Err(e),
        (r, None) => r.map_err(CubeFitError::from),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cube::tests::cube_file;
    use crate::synth::{Footprint, SynthConfig, synthesize};
    use crate::synthetic::shared_data_dir as shared_data;

    /// A small E-MILES subset (symlinks), so debug-build tests stay fast.
    fn template_subset(dir: &Path) -> PathBuf {
        let src = shared_data().join("templates/emiles");
        let out = dir.join("emiles-subset");
        std::fs::create_dir_all(&out).unwrap();
        let mut names: Vec<PathBuf> = std::fs::read_dir(&src)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "fits"))
            .collect();
        names.sort();
        for p in names.iter().step_by(names.len() / 6).take(6) {
            std::os::unix::fs::symlink(p, out.join(p.file_name().unwrap())).unwrap();
        }
        out
    }

    struct Setup {
        _dir: tempfile::TempDir,
        options: CubeFitOptions,
        truth: PathBuf,
    }

    fn setup() -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let templates = template_subset(dir.path());
        let cube = dir.path().join("small-LOGCUBE.fits");
        let truth = dir.path().join("small-truth.csv");
        let config = SynthConfig {
            seed: 3,
            nx: 6,
            ny: 5,
            footprint: Footprint::Square,
            sn_min: 40.0,
            sn_max: 60.0,
            ..SynthConfig::default()
        };
        let reference = cube_file("synthetic-manga-seed7-LOGCUBE.fits.gz");
        synthesize(&config, &templates, &reference, &cube, &truth).unwrap();
        let mut options = CubeFitOptions::new(cube, templates, dir.path().join("out"));
        options.chunk.max_spectra = 8;
        Setup {
            _dir: dir,
            options,
            truth,
        }
    }

    #[test]
    fn fits_a_synthetic_cube_resumes_and_refuses_other_settings() {
        let s = setup();
        let bar = ProgressBar::hidden();
        let first = fit_cube(&s.options, &bar).unwrap();
        assert_eq!(first.bins, 30);
        assert_eq!(first.chunks, 4);
        assert_eq!((first.chunks_resumed, first.spectra_fitted_now), (0, 30));
        assert_eq!(first.failed_bins, 0);
        assert_eq!(first.redshift, 0.018, "redshift from the header");
        // Kinematics match the truth at S/N 40-60.
        let truth = crate::synthetic::read_truth(&s.truth).unwrap();
        let plan = load_plan(&s.options.out).unwrap().unwrap();
        let results = collect_results(&s.options.out, &plan).unwrap();
        let map = BinMap::from_bins(6, 5, &plan.bins);
        for t in &truth {
            let r = results[map.bin_of[t.y * 6 + t.x].unwrap()]
                .as_ref()
                .unwrap();
            assert!(
                (r.velocity.value - t.v).abs() < 15.0,
                "V {} vs {}",
                r.velocity.value,
                t.v
            );
            assert!(
                (r.sigma.value - t.sigma).abs() < 0.15 * t.sigma + 10.0,
                "sigma {} vs {}",
                r.sigma.value,
                t.sigma
            );
        }
        for name in [
            "maps.fits",
            "model.fits",
            "maps.png",
            "summary.json",
            "plan.json",
        ] {
            assert!(s.options.out.join(name).is_file(), "{name} missing");
        }
        crate::maps::tests::astropy_opens(&[
            &s.options.out.join("maps.fits"),
            &s.options.out.join("model.fits"),
        ]);
        // Two moments, no populations: no h3/h4, ages or metallicities in the maps.
        let maps = s.options.out.join("maps.fits");
        let names = crate::maps::tests::extnames(&maps);
        assert_eq!(names.len(), 10, "{names:?}");
        assert!(
            !names
                .iter()
                .any(|n| n.contains("H3") || n.contains("AGE") || n.contains("MH")),
            "{names:?}"
        );
        // The primary header says where the maps came from; every map has the cube's WCS.
        let mut f = fitsio::FitsFile::open(&maps).unwrap();
        let primary = f.primary_hdu().unwrap();
        let key = |f: &mut fitsio::FitsFile, k: &str| -> String { primary.read_key(f, k).unwrap() };
        assert_eq!(key(&mut f, "INFILE"), "small-LOGCUBE.fits");
        assert_eq!(key(&mut f, "TPLLIB"), "emiles-subset");
        assert_eq!(key(&mut f, "PLATEIFU"), "99999-0");
        assert_eq!(key(&mut f, "ZSOURCE"), "cube header");
        assert_eq!(key(&mut f, "TARGETSN"), "none");
        let z: f64 = primary.read_key(&mut f, "REDSHIFT").unwrap();
        let moments: i64 = primary.read_key(&mut f, "MOMENTS").unwrap();
        let elmask: f64 = primary.read_key(&mut f, "ELMASK").unwrap();
        assert_eq!((z, moments, elmask), (0.018, 2, 600.0));
        let vel = f.hdu("STELLAR_VEL").unwrap();
        let crval1: f64 = vel.read_key(&mut f, "CRVAL1").unwrap();
        let cd11: f64 = vel.read_key(&mut f, "CD1_1").unwrap();
        assert_eq!(crval1, 180.0);
        assert!((cd11 / (-0.5 / 3600.0) - 1.0).abs() < 1e-14, "{cd11}");

        let png = s.options.out.join("residuals.png");
        let report =
            crate::accuracy::compare_with_truth(&s.options.out.join("maps.fits"), &s.truth, &png)
                .unwrap();
        assert_eq!((report.compared, report.missing), (30, 0));
        assert!(png.is_file());

        // A lost chunk is refitted, and only it.
        std::fs::remove_file(chunk_paths(&s.options.out, 2).0).unwrap();
        let second = fit_cube(&s.options, &bar).unwrap();
        assert_eq!(second.chunks_resumed, 3);
        assert_eq!(second.spectra_fitted_now, plan.chunks[2].nspectra);
        let again = collect_results(&s.options.out, &plan).unwrap();
        // The refitted chunk agrees with its first fit (to rounding: a worker's scratch
        // history may change the last bits); the others were not touched.
        for (a, b) in again.iter().flatten().zip(results.iter().flatten()) {
            assert!(
                (a.velocity.value - b.velocity.value).abs() < 1e-6,
                "{a:?} {b:?}"
            );
            assert!((a.sigma.value - b.sigma.value).abs() < 1e-6, "{a:?} {b:?}");
        }
        let untouched: Vec<usize> = [0, 1, 3]
            .iter()
            .flat_map(|c| plan.chunks[*c].bins.clone())
            .collect();
        for b in untouched {
            assert_eq!(again[b], results[b]);
        }

        // Other settings on the same directory are refused, naming what differs.
        let mut other = s.options.clone();
        other.moments = 4;
        let err = fit_cube(&other, &bar).unwrap_err();
        assert!(matches!(err, CubeFitError::OtherPlan { .. }), "{err}");
        assert!(err.to_string().contains("moments"), "{err}");
    }

    /// Every image HDU of a FITS file by EXTNAME (the primary, empty, left out), as f64.
    fn fits_planes(path: &Path) -> Vec<(String, Vec<f64>)> {
        let mut f = fitsio::FitsFile::open(path).unwrap();
        let n = f.num_hdus().unwrap();
        (1..n)
            .map(|i| {
                let hdu = f.hdu(i).unwrap();
                let name: String = hdu.read_key(&mut f, "EXTNAME").unwrap();
                let data: Vec<f64> = hdu.read_image(&mut f).unwrap();
                (name, data)
            })
            .collect()
    }

    fn assert_same_planes(a: &Path, b: &Path) {
        let (pa, pb) = (fits_planes(a), fits_planes(b));
        let names = |p: &[(String, Vec<f64>)]| p.iter().map(|x| x.0.clone()).collect::<Vec<_>>();
        assert_eq!(names(&pa), names(&pb), "{}", a.display());
        for ((name, x), (_, y)) in pa.iter().zip(&pb) {
            assert_eq!(x.len(), y.len(), "{name}");
            if name == "BINID" || name.ends_with("_MASK") {
                assert_eq!(x, y, "{name}");
                continue;
            }
            // Fits of the same spectrum may differ in the last bits: a worker's scratch
            // history (which spectra it fitted before, in which order) changes rounding.
            for (k, (u, v)) in x.iter().zip(y).enumerate() {
                let close = (u - v).abs() <= 1e-6 || (u - v).abs() <= 1e-5 * u.abs().max(v.abs());
                assert!(
                    close || (u.is_nan() && v.is_nan()),
                    "{name}[{k}]: {u} vs {v}"
                );
            }
        }
    }

    #[test]
    fn stages_run_apart_in_any_order_give_fit_cubes_maps() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<ChunkFitter>();

        let s = setup();
        let bar = ProgressBar::hidden();
        fit_cube(&s.options, &bar).unwrap();

        // Stage 1 writes nothing, wherever `out` points.
        let mut cube = Cube::open(&s.options.cube).unwrap();
        let meta = cube.meta().clone();
        let lib = TemplateLibrary::load(&s.options.templates).unwrap();
        let mut options = s.options.clone();
        options.out = s.options.out.with_file_name("never-written");
        let prepared = prepare_plan(&options, &mut cube, &lib).unwrap();
        assert!(!options.out.exists());
        let staged = s.options.out.with_file_name("staged");
        write_plan(&staged, &prepared.plan).unwrap();
        let plan = load_plan(&staged).unwrap().unwrap();
        // The same plan as fit-cube's (compared as read back: serde_json's float parsing
        // may be one ulp off what was written, the same way for both).
        let saved = load_plan(&s.options.out).unwrap().unwrap();
        assert_eq!(plan.bins, saved.bins);
        assert_eq!(plan.chunks, saved.chunks);
        assert_eq!(plan.global, saved.global);
        assert_eq!(plan.redshift, saved.redshift);
        // Stage 2, backwards (order does not matter), with the plan's template path unused.
        let mut elsewhere = plan.clone();
        elsewhere.options.templates = PathBuf::from("/nowhere");
        elsewhere.options.cube = PathBuf::from("/nowhere.fits");
        let fitter = ChunkFitter::new(&elsewhere, &meta, lib).unwrap();
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        for chunk in plan.chunks.iter().rev() {
            let spectra = fitter.read_spectra(&mut cube, chunk).unwrap();
            let fitted = fitter.fit_chunk(chunk, &spectra, &pool, &bar);
            assert_eq!(fitted.fitted_ok, chunk.nspectra);
            assert_eq!(fitted.models.len(), chunk.nspectra * meta.nwave());
            fitted.write(&staged).unwrap();
        }
        // Stage 3, naming the inputs as the control plane does (its local paths mean nothing).
        let names = Provenance {
            input: "cube-dataset".into(),
            templates: "templates-dataset".into(),
        };
        let stats = assemble_with(&staged, &meta, &plan, true, &names).unwrap();
        assert_eq!((stats.bins, stats.failed, stats.chunks_missing), (30, 0, 0));
        let mut f = fitsio::FitsFile::open(staged.join("maps.fits")).unwrap();
        let primary = f.primary_hdu().unwrap();
        let input: String = primary.read_key(&mut f, "INFILE").unwrap();
        let templates: String = primary.read_key(&mut f, "TPLLIB").unwrap();
        assert_eq!(
            (input.as_str(), templates.as_str()),
            ("cube-dataset", "templates-dataset")
        );

        for chunk in &plan.chunks {
            let (json, model) = chunk_files(chunk.id);
            let a = read_chunk_result(&s.options.out.join(&json)).unwrap();
            let b = read_chunk_result(&staged.join(&json)).unwrap();
            let bins = |r: &ChunkResult| {
                let mut v: Vec<usize> = r.results.iter().map(|r| r.bin).collect();
                v.sort_unstable();
                v
            };
            assert_eq!(bins(&a), bins(&b), "chunk {}", chunk.id);
            assert_eq!(a.chunk, b.chunk);
            let size = |dir: &Path| std::fs::metadata(dir.join(&model)).unwrap().len();
            assert_eq!(size(&s.options.out), size(&staged), "chunk {}", chunk.id);
        }
        assert_same_planes(&s.options.out.join("maps.fits"), &staged.join("maps.fits"));
        assert_same_planes(
            &s.options.out.join("model.fits"),
            &staged.join("model.fits"),
        );
        assert!(staged.join("maps.png").is_file());
        // A missing chunk is reported, and its bins are flagged as not fitted.
        std::fs::remove_file(staged.join(chunk_files(1).0)).unwrap();
        let stats = assemble(&staged, &meta, &plan, false).unwrap();
        assert_eq!(stats.chunks_missing, 1);
        assert_eq!(stats.bins, 30 - plan.chunks[1].nspectra);
    }

    #[test]
    fn a_chunk_of_another_plan_is_refused() {
        let s = setup();
        let mut cube = Cube::open(&s.options.cube).unwrap();
        let meta = cube.meta().clone();
        let lib = TemplateLibrary::load(&s.options.templates).unwrap();
        let plan = prepare_plan(&s.options, &mut cube, &lib).unwrap().plan;
        let fitter = ChunkFitter::new(&plan, &meta, lib).unwrap();
        let mut foreign = plan.chunks[0].clone();
        foreign.bins.push(999);
        assert!(matches!(
            fitter.read_spectra(&mut cube, &foreign),
            Err(CubeFitError::NotInPlan { bin: 999, .. })
        ));
        let mut shifted = plan.chunks[0].clone();
        shifted.rows = plan.chunks[3].rows.clone();
        assert!(matches!(
            fitter.read_spectra(&mut cube, &shifted),
            Err(CubeFitError::SpaxelOutsideChunk { .. })
        ));
    }

    #[test]
    fn an_unreachable_target_fits_one_bin_and_bad_input_is_an_error() {
        let s = setup();
        let mut options = s.options.clone();
        options.target_sn = Some(1e6);
        options.model_cube = false;
        let summary = fit_cube(&options, &ProgressBar::hidden()).unwrap();
        assert_eq!(summary.bins, 1);
        assert!(matches!(
            summary.binning,
            Some(BinningOutcome::TargetUnreachable { .. })
        ));

        let mut bad = s.options.clone();
        bad.cube = s.options.out.join("nothing.fits");
        assert!(matches!(
            fit_cube(&bad, &ProgressBar::hidden()),
            Err(CubeFitError::Cube(CubeError::Open { .. }))
        ));
        let mut range = s.options.clone();
        range.out = s.options.out.join("range");
        range.lam_range = (20000.0, 30000.0);
        assert!(matches!(
            fit_cube(&range, &ProgressBar::hidden()),
            Err(CubeFitError::NoFitRange { .. })
        ));
    }
}

//! `astro-fit synth`: deterministic synthetic cubes in the MaNGA DRP LOGCUBE format, with a
//! truth table, for tests, demos and users validating their set-up.
//!
//! Each spaxel of a rotating, inclined disc gets a mixture of three SSP templates (Dirichlet
//! weights), a Gaussian LOSVD (V from the disc, sigma from a radial profile), a smooth
//! multiplicative Legendre distortion, and Gaussian noise at an S/N that falls with radius.
//! Templates are broadened to a real MaNGA resolution curve (the SPECRES of a reference
//! LOGCUBE, whose WAVE grid the cube also takes). Everything derives from `seed`: a spaxel's
//! random numbers come from its own ChaCha stream, so the cube does not depend on threads.
//!
//! With `gas`, each spaxel also emits Gaussian lines (Balmer and forbidden, fixed ratios to
//! Halpha, its flux a per-spaxel multiple of the continuum) with their own kinematics, made by
//! the fitting core's gas templates ([`crate::gas`]); their truth goes to a second table.
//!
//! With `dust`, the stars (not the gas) are attenuated by the Calzetti (2000) curve
//! ([`crate::dust`], the curve `--reddening` fits) at a known A_V per spaxel, and the cube has
//! no multiplicative distortion (a fit with dust has no multiplicative polynomial to absorb
//! one). With `sfh`, each spaxel's stars are a smooth star-formation history over the whole SSP
//! grid instead of three SSPs: a Gaussian in log age and [M/H] whose centre falls with radius
//! ([`history_centre`]); the truth table then holds its light-weighted log age and [M/H].
//!
//! Template preparation and the LOSVD convolution are the fitting core's ([`crate::templates`],
//! [`crate::losvd`]): the cube is made with the very operator the fitter inverts.

use std::io::Write;
use std::path::{Path, PathBuf};

use fitsio::FitsFile;
use fitsio::images::{ImageDescription, ImageType};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Gamma, LogNormal, Normal};
use rayon::prelude::*;
use realfft::num_complex::Complex64;
use serde::{Deserialize, Serialize};

use crate::error::FitError;
use crate::fit::legendre_table;
use crate::losvd::{Convolver, GaussHermite, fast_fft_len};
use crate::templates::{self, C_KMS, Medium, PreparedTemplates, ResolutionCurve, TemplateLibrary};

/// Pixels flagged outside the footprint, as the DRP does: NOCOV | LOWCOV | DONOTUSE.
const OUTSIDE_MASK: i32 = 1027;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
pub enum Footprint {
    /// A MaNGA-like hexagonal bundle inscribed in the grid.
    Hexagon,
    /// Every spaxel (an IFU with a square field, e.g. MUSE).
    Square,
}

/// The generator's parameters (written next to the cube as JSON).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SynthConfig {
    pub seed: u64,
    pub nx: usize,
    pub ny: usize,
    pub footprint: Footprint,
    pub redshift: f64,
    /// Kinematic position angle (degrees, counter-clockwise from +y) and inclination.
    pub pa_deg: f64,
    pub inc_deg: f64,
    /// Asymptotic rotation (km/s) and turnover radius (spaxels): V = vmax tanh(R/r_turn).
    pub vmax: f64,
    pub r_turn: f64,
    /// sigma = sigma_outer + sigma_boost exp(-R / sigma_scale), km/s.
    pub sigma_outer: f64,
    pub sigma_boost: f64,
    pub sigma_scale: f64,
    /// S/N per pixel = clip((sn_outer + sn_boost exp(-R / sn_scale)) LN(0, 0.1), sn_min, sn_max).
    pub sn_outer: f64,
    pub sn_boost: f64,
    pub sn_scale: f64,
    pub sn_min: f64,
    pub sn_max: f64,
    /// Amplitude of the multiplicative Legendre (degree 1..3) distortion.
    pub distortion: f64,
    /// Template oversampling for the convolution (pPXF's velscale_ratio).
    pub oversample: usize,
    /// Gas emission lines; None: stars only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gas: Option<GasSynth>,
    /// Central stellar A_V (mag, Calzetti 2000); A_V = dust exp(-R / (min(nx, ny) / 2)).
    /// None: no dust (and the multiplicative distortion stays).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dust: Option<f64>,
    /// Smooth star-formation histories over the SSP grid instead of three SSPs per spaxel.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub sfh: bool,
}

/// Rest-frame range (Angstrom) over which the truth's light fractions are taken: fit-cube's
/// default `--lam-range`, the range whose light the fitted weights describe.
pub const SFH_LIGHT_RANGE: (f64, f64) = (3600.0, 7400.0);

/// Centre (log10 age/yr, [M/H]) of the smooth history at `radius` spaxels: old and
/// metal-rich in the centre, younger and poorer outwards.
pub fn history_centre(radius: f64) -> (f64, f64) {
    (9.9 - 0.08 * radius, 0.1 - 0.05 * radius)
}

/// The smooth history's weights over `ssp` (before normalisation by light): a Gaussian of
/// 0.3 dex in log age and 0.35 dex in [M/H] around [`history_centre`].
pub fn history_weights(ssp: &[templates::SspParams], radius: f64) -> Vec<f64> {
    let (age0, mh0) = history_centre(radius);
    ssp.iter()
        .map(|p| {
            let a = ((p.age_gyr * 1e9).log10() - age0) / 0.3;
            let m = (p.metallicity - mh0) / 0.35;
            (-0.5 * (a * a + m * m)).exp()
        })
        .collect()
}

/// Emission lines of a synthetic cube: Halpha's equivalent width (rest Angstrom, against the
/// spaxel's mean continuum) times a per-spaxel log-normal factor, the other lines in fixed
/// ratios to it ([`GAS_LINES`]); Balmer gas rotating `v_factor` times the stars' disc
/// velocity, forbidden gas offset by `forbidden_dv`, each with its own dispersion.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GasSynth {
    pub halpha_ew: f64,
    pub ew_scatter: f64,
    pub v_factor: f64,
    pub forbidden_dv: f64,
    pub sigma_balmer: f64,
    pub sigma_forbidden: f64,
}

impl Default for GasSynth {
    fn default() -> Self {
        GasSynth {
            halpha_ew: 5.0,
            ew_scatter: 0.3,
            v_factor: 1.2,
            forbidden_dv: -20.0,
            sigma_balmer: 60.0,
            sigma_forbidden: 90.0,
        }
    }
}

/// Lines a synthetic cube emits, with their flux relative to Halpha (a doublet template's
/// flux holds both lines).
pub const GAS_LINES: [(&str, f64); 8] = [
    ("Hgamma", 0.165),
    ("Hbeta", 0.35),
    ("Halpha", 1.0),
    ("[SII]6716", 0.2),
    ("[SII]6731", 0.15),
    ("[OIII]5007_d", 0.8),
    ("[OI]6300_d", 0.05),
    ("[NII]6583_d", 0.6),
];

/// A spaxel's gas: kinematics of the two components and the Halpha equivalent width.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GasTruth {
    pub v_balmer: f64,
    pub sigma_balmer: f64,
    pub v_forbidden: f64,
    pub sigma_forbidden: f64,
    pub halpha_ew: f64,
}

impl Default for SynthConfig {
    fn default() -> Self {
        SynthConfig {
            seed: 7,
            nx: 32,
            ny: 32,
            footprint: Footprint::Hexagon,
            redshift: 0.018,
            pa_deg: 30.0,
            inc_deg: 55.0,
            vmax: 250.0,
            r_turn: 3.0,
            sigma_outer: 50.0,
            sigma_boost: 200.0,
            sigma_scale: 4.0,
            sn_outer: 5.0,
            sn_boost: 55.0,
            sn_scale: 5.0,
            sn_min: 5.0,
            sn_max: 60.0,
            distortion: 0.05,
            oversample: 4,
            gas: None,
            dust: None,
            sfh: false,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SynthError {
    #[error("reading the resolution reference {path}: {message}")]
    Reference { path: PathBuf, message: String },
    #[error("templates: {0}")]
    Templates(#[from] FitError),
    #[error("writing {path}: {message}")]
    Write { path: PathBuf, message: String },
    #[error("invalid parameters: {0}")]
    Config(String),
}

/// What a spaxel is, drawn from the configuration: the truth table's row.
#[derive(Debug, Clone, PartialEq)]
pub struct SpaxelTruth {
    pub x: usize,
    pub y: usize,
    pub inside: bool,
    pub v: f64,
    pub sigma: f64,
    pub sn: f64,
    pub flux_scale: f64,
    pub radius: f64,
    pub templates: [usize; 3],
    pub weights: [f64; 3],
    pub poly: [f64; 3],
    pub gas: Option<GasTruth>,
    /// Stellar A_V (mag, Calzetti 2000); 0 without dust.
    pub a_v: f64,
    /// With `sfh`: the weights of every template (they replace `templates` and `weights`),
    /// normalised so that the spectrum's scale matches a three-SSP spaxel's, and the
    /// history's light-weighted log10(age/yr) and [M/H] over [`SFH_LIGHT_RANGE`].
    pub history: Option<Vec<f64>>,
    pub light_log_age: Option<f64>,
    pub light_metallicity: Option<f64>,
}

fn rng_for(seed: u64, spaxel: usize) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(spaxel as u64 + 1);
    rng
}

/// The truth of spaxel `(x, y)`: geometry is deterministic, the rest comes from its stream.
pub fn spaxel_truth(cfg: &SynthConfig, ntemplates: usize, x: usize, y: usize) -> SpaxelTruth {
    let (cx, cy) = ((cfg.nx as f64 - 1.0) / 2.0, (cfg.ny as f64 - 1.0) / 2.0);
    let (dx, dy) = (x as f64 - cx, y as f64 - cy);
    let inside = match cfg.footprint {
        Footprint::Square => true,
        Footprint::Hexagon => {
            let r = cfg.nx.min(cfg.ny) as f64 / 2.0 - 0.5;
            dx.abs() <= r * 3f64.sqrt() / 2.0 && dy.abs() <= r - dx.abs() / 3f64.sqrt()
        }
    };
    let (pa, inc) = (cfg.pa_deg.to_radians(), cfg.inc_deg.to_radians());
    let major = -dx * pa.sin() + dy * pa.cos();
    let minor = -dx * pa.cos() - dy * pa.sin();
    let radius = major.hypot(minor / inc.cos());
    let cos_theta = if radius > 0.0 { major / radius } else { 0.0 };
    let v = cfg.vmax * (radius / cfg.r_turn).tanh() * inc.sin() * cos_theta;
    let sigma = cfg.sigma_outer + cfg.sigma_boost * (-radius / cfg.sigma_scale).exp();
    let mut rng = rng_for(cfg.seed, y * cfg.nx + x);
    let scatter = LogNormal::new(0.0, 0.1).map_or(1.0, |d| d.sample(&mut rng));
    let sn = ((cfg.sn_outer + cfg.sn_boost * (-radius / cfg.sn_scale).exp()) * scatter)
        .clamp(cfg.sn_min, cfg.sn_max);
    let mut templates = [0usize; 3];
    for t in &mut templates {
        *t = rng.gen_range(0..ntemplates.max(1));
    }
    let gamma = Gamma::new(1.0, 1.0).expect("shape 1 is valid");
    let raw = [0; 3].map(|_| gamma.sample(&mut rng) + 1e-3);
    let total: f64 = raw.iter().sum();
    let weights = raw.map(|w| w / total);
    let poly = [0; 3].map(|_| rng.gen_range(-cfg.distortion..=cfg.distortion));
    // Drawn in any case, so that the rest of the stream does not depend on the dust.
    let poly = if cfg.dust.is_some() { [0.0; 3] } else { poly };
    let a_v = cfg.dust.map_or(0.0, |d| {
        d * (-radius / (cfg.nx.min(cfg.ny) as f64 / 2.0)).exp()
    });
    // Drawn after everything else: a cube with gas has the same stars as one without.
    let gas = cfg.gas.as_ref().map(|g| {
        let factor = LogNormal::new(0.0, g.ew_scatter).map_or(1.0, |d| d.sample(&mut rng));
        let v_balmer = g.v_factor * v;
        GasTruth {
            v_balmer,
            sigma_balmer: g.sigma_balmer,
            v_forbidden: v_balmer + g.forbidden_dv,
            sigma_forbidden: g.sigma_forbidden,
            halpha_ew: g.halpha_ew * factor,
        }
    });
    SpaxelTruth {
        x,
        y,
        inside,
        v,
        sigma,
        sn,
        // Surface brightness falls over a quarter of the field, whatever its size.
        flux_scale: (-radius / (cfg.nx.min(cfg.ny) as f64 / 4.0)).exp(),
        radius,
        templates,
        weights,
        poly,
        gas,
        a_v,
        history: None,
        light_log_age: None,
        light_metallicity: None,
    }
}

/// The reference's wavelength grid and resolution extensions, copied into the new cube.
struct Reference {
    wave: Vec<f64>,
    extensions: Vec<(String, Vec<f64>)>,
}

const RESOLUTION_EXTENSIONS: [&str; 4] = ["SPECRES", "SPECRESD", "PRESPECRES", "PRESPECRESD"];

fn read_reference(path: &Path) -> Result<Reference, SynthError> {
    let err = |message: String| SynthError::Reference {
        path: path.to_path_buf(),
        message,
    };
    let mut f = FitsFile::open(path).map_err(|e| err(e.to_string()))?;
    let mut read = |name: &str| -> Result<Vec<f64>, SynthError> {
        let hdu = f.hdu(name).map_err(|e| err(format!("{name}: {e}")))?;
        hdu.read_image(&mut f)
            .map_err(|e| err(format!("{name}: {e}")))
    };
    let wave = read("WAVE")?;
    let mut extensions = Vec::new();
    for name in RESOLUTION_EXTENSIONS {
        let values = read(name)?;
        if values.len() != wave.len() {
            return Err(err(format!(
                "{name} has {} values for {} wavelengths",
                values.len(),
                wave.len()
            )));
        }
        extensions.push((name.to_string(), values));
    }
    Ok(Reference { wave, extensions })
}

/// Templates convolved with a spaxel's LOSVD, on the galaxy grid: the fitting core's operator.
struct SpectrumModel {
    conv: Convolver,
    spectra: Vec<Vec<Complex64>>,
    npix: usize,
    to_samples: f64,
}

impl SpectrumModel {
    fn new(tpl: &PreparedTemplates, ln_lam0: f64, npix: usize) -> Self {
        let factor = tpl.velscale_ratio;
        let d_t = tpl.d_ln_lam();
        // Same alignment as the fitter: galaxy pixel 0 is the mean of `factor` template samples.
        let block0 = tpl.ln_lam0 + 0.5 * (factor - 1) as f64 * d_t;
        let conv = Convolver::new(
            fast_fft_len(tpl.npix() + 64, 2 * factor),
            factor,
            (ln_lam0 - block0) / d_t,
        );
        let spectra = tpl.spectra.iter().map(|s| conv.spectrum_of(s)).collect();
        SpectrumModel {
            conv,
            spectra,
            npix,
            to_samples: factor as f64 / tpl.velscale,
        }
    }

    fn spectrum(&self, t: &SpaxelTruth) -> Vec<f64> {
        let n = self.conv.n_bins();
        let mut combined = vec![Complex64::new(0.0, 0.0); n];
        let mix: Vec<(usize, f64)> = match &t.history {
            Some(h) => h
                .iter()
                .copied()
                .enumerate()
                .filter(|(_, w)| *w > 0.0)
                .collect(),
            None => t.templates.iter().copied().zip(t.weights).collect(),
        };
        for (j, w) in mix {
            for (c, s) in combined.iter_mut().zip(&self.spectra[j]) {
                *c += s * w;
            }
        }
        let mut kernel = vec![Complex64::new(0.0, 0.0); n];
        let losvd = GaussHermite::gaussian(t.v * self.to_samples, t.sigma * self.to_samples);
        let used = self.conv.losvd_kernel(&losvd, &mut kernel);
        let mut out = vec![0.0; self.npix];
        self.conv
            .apply(&combined, &kernel, used, &mut out, &mut self.conv.scratch());
        out
    }
}

/// What the smooth histories need of the templates: their SSP grid, and each template's light
/// per unit weight (mean flux over [`SFH_LIGHT_RANGE`]) and over the whole prepared range.
struct HistoryTruth {
    ssp: Vec<templates::SspParams>,
    light: Vec<f64>,
    mean_flux: Vec<f64>,
}

impl HistoryTruth {
    fn new(tpl: &PreparedTemplates) -> Result<Self, SynthError> {
        let ssp = tpl.ssp.clone().ok_or_else(|| {
            SynthError::Config("--sfh needs SSP templates on an age x [M/H] grid".into())
        })?;
        let d = tpl.d_ln_lam();
        let (lo, hi) = SFH_LIGHT_RANGE;
        let inside: Vec<bool> = (0..tpl.npix())
            .map(|i| (lo..=hi).contains(&(tpl.ln_lam0 + i as f64 * d).exp()))
            .collect();
        let mean = |s: &[f64], keep: &dyn Fn(usize) -> bool| {
            let (sum, n) = s
                .iter()
                .enumerate()
                .filter(|(i, _)| keep(*i))
                .fold((0.0, 0usize), |(a, n), (_, v)| (a + v, n + 1));
            sum / n.max(1) as f64
        };
        Ok(HistoryTruth {
            light: tpl
                .spectra
                .iter()
                .map(|s| mean(s, &|i| inside[i]))
                .collect(),
            mean_flux: tpl.spectra.iter().map(|s| mean(s, &|_| true)).collect(),
            ssp,
        })
    }

    /// Gives `t` its history at its radius and the history's light-weighted log age and [M/H].
    fn set(&self, t: &mut SpaxelTruth) {
        let mut w = history_weights(&self.ssp, t.radius);
        // Same mean flux as a three-SSP spaxel's mixture of unit total weight.
        let flux: f64 = w.iter().zip(&self.mean_flux).map(|(a, b)| a * b).sum();
        let mean: f64 = self.mean_flux.iter().sum::<f64>() / self.mean_flux.len().max(1) as f64;
        w.iter_mut().for_each(|v| *v *= mean / flux);
        let light: Vec<f64> = w.iter().zip(&self.light).map(|(a, b)| a * b).collect();
        let total: f64 = light.iter().sum();
        let avg = |f: &dyn Fn(&templates::SspParams) -> f64| {
            light
                .iter()
                .zip(&self.ssp)
                .map(|(l, p)| l * f(p))
                .sum::<f64>()
                / total
        };
        t.light_log_age = Some(avg(&|p| (p.age_gyr * 1e9).log10()));
        t.light_metallicity = Some(avg(&|p| p.metallicity));
        t.history = Some(w);
    }
}

/// A spaxel made: its truth, flux, inverse variance and gas line fluxes.
type SynthSpaxel = (SpaxelTruth, Vec<f32>, Vec<f32>, Vec<f64>);

/// Writes the cube to `out` (gzip-compressed when it ends in `.gz`), the truth CSV to `truth`
/// and returns the truth rows. Memory: one band of rows at a time.
pub fn synthesize(
    cfg: &SynthConfig,
    templates_dir: &Path,
    reference: &Path,
    out: &Path,
    truth: &Path,
) -> Result<Vec<SpaxelTruth>, SynthError> {
    if cfg.nx == 0
        || cfg.ny == 0
        || cfg.oversample == 0
        || cfg.sn_min.is_nan()
        || cfg.sn_min <= 0.0
        || cfg.redshift.is_nan()
        || cfg.redshift <= -1.0
    {
        return Err(SynthError::Config(format!(
            "need nx, ny, oversample > 0, sn_min > 0, redshift > -1 (got {}x{}, {}, {}, {})",
            cfg.nx, cfg.ny, cfg.oversample, cfg.sn_min, cfg.redshift
        )));
    }
    if let Some(av) = cfg.dust
        && !(av.is_finite() && (0.0..=crate::fit::MAX_AV).contains(&av))
    {
        return Err(SynthError::Config(format!(
            "dust A_V must be in 0-{} mag, got {av}",
            crate::fit::MAX_AV
        )));
    }
    let reference = read_reference(reference)?;
    let wave = &reference.wave;
    let npix = wave.len();
    let d_ln = (wave[npix - 1] / wave[0]).ln() / (npix - 1) as f64;
    let velscale = C_KMS * d_ln;
    let ln_lam0 = wave[0].ln() - (1.0 + cfg.redshift).ln();
    let lib = TemplateLibrary::load(templates_dir)?;
    let mut pcfg = templates::PrepareConfig::new(
        velscale,
        ((ln_lam0).exp(), (ln_lam0 + d_ln * (npix - 1) as f64).exp()),
        Medium::Vacuum,
    );
    pcfg.velscale_ratio = cfg.oversample;
    let specres = &reference.extensions[0].1;
    pcfg.galaxy_fwhm =
        Some(ResolutionCurve::from_resolving_power(wave, specres).deredshift(cfg.redshift));
    let tpl = templates::prepare(&lib, &pcfg)?;
    let model = SpectrumModel::new(&tpl, ln_lam0, npix);
    let histories = if cfg.sfh {
        Some(HistoryTruth::new(&tpl)?)
    } else {
        None
    };
    let grid = crate::fit::LogGrid {
        ln_lam0,
        velscale,
        npix,
    };
    let gas_tpl = match &cfg.gas {
        Some(_) => {
            let names: Vec<String> = GAS_LINES.iter().map(|(n, _)| n.to_string()).collect();
            Some(crate::gas::GasTemplates::new(
                &grid,
                Medium::Vacuum,
                pcfg.galaxy_fwhm.as_ref(),
                Some(&names),
                false,
            )?)
        }
        None => None,
    };
    let x: Vec<f64> = (0..npix)
        .map(|i| -1.0 + 2.0 * i as f64 / (npix - 1) as f64)
        .collect();
    let legendre = legendre_table(&x, 3);

    let write_err = |path: &Path| {
        let path = path.to_path_buf();
        move |e: fitsio::errors::Error| SynthError::Write {
            path: path.clone(),
            message: e.to_string(),
        }
    };
    let gz = out.extension().is_some_and(|e| e == "gz");
    let plain = if gz {
        out.with_extension("partial")
    } else {
        out.with_extension("fits.partial")
    };
    let _ = std::fs::remove_file(&plain);
    let mut f = FitsFile::create(&plain).open().map_err(write_err(&plain))?;
    let primary = f.primary_hdu().map_err(write_err(&plain))?;
    for (k, v) in [
        ("PLATEIFU", "99999-0"),
        ("MASKNAME", "MANGA_DRP3PIXMASK"),
        ("BUNIT", "1E-17 erg/s/cm^2/Ang/spaxel"),
        ("ORIGIN", "astro-fit synth (SYNTHETIC)"),
    ] {
        primary.write_key(&mut f, k, v).map_err(write_err(&plain))?;
    }
    for (k, v) in [("EBVGAL", 0.0), ("SIMZSYS", cfg.redshift)] {
        primary.write_key(&mut f, k, v).map_err(write_err(&plain))?;
    }
    primary
        .write_key(&mut f, "SIMSEED", cfg.seed as i64)
        .map_err(write_err(&plain))?;
    let dims = [npix, cfg.ny, cfg.nx];
    let mut hdus = Vec::new();
    for (name, kind) in [
        ("FLUX", ImageType::Float),
        ("IVAR", ImageType::Float),
        ("MASK", ImageType::Long),
    ] {
        let hdu = f
            .create_image(
                name,
                &ImageDescription {
                    data_type: kind,
                    dimensions: &dims,
                },
            )
            .map_err(write_err(&plain))?;
        // A made-up pointing (as the seed-7 cube's), so that maps have sky coordinates.
        let wcs: [(&str, f64); 9] = [
            ("CRPIX1", (cfg.nx as f64 + 1.0) / 2.0),
            ("CRPIX2", (cfg.ny as f64 + 1.0) / 2.0),
            ("CRVAL1", 180.0),
            ("CRVAL2", 30.0),
            ("CD1_1", -0.5 / 3600.0),
            ("CD2_2", 0.5 / 3600.0),
            ("CRPIX3", 1.0),
            ("CRVAL3", wave[0] * 1e-10),
            ("CD3_3", wave[0] * d_ln * 1e-10),
        ];
        for (k, v) in wcs {
            hdu.write_key(&mut f, k, v).map_err(write_err(&plain))?;
        }
        for (k, v) in [
            ("CTYPE1", "RA---TAN"),
            ("CTYPE2", "DEC--TAN"),
            ("CTYPE3", "WAVE-LOG"),
            ("CUNIT1", "deg"),
            ("CUNIT2", "deg"),
            ("CUNIT3", "m"),
        ] {
            hdu.write_key(&mut f, k, v).map_err(write_err(&plain))?;
        }
        hdus.push(hdu);
    }
    let ntpl = tpl.len();
    let mut truths = Vec::with_capacity(cfg.nx * cfg.ny);
    // Per spaxel: each gas line's flux summed over pixels, in the cube's units.
    let mut gas_fluxes: Vec<Vec<f64>> = Vec::new();
    let rows_per_band = ((64usize << 20) / (cfg.nx * npix * 12)).max(1);
    for y0 in (0..cfg.ny).step_by(rows_per_band) {
        let rows = y0..(y0 + rows_per_band).min(cfg.ny);
        let band: Vec<SynthSpaxel> = rows
            .clone()
            .flat_map(|y| (0..cfg.nx).map(move |x| (x, y)))
            .collect::<Vec<_>>()
            .into_par_iter()
            .map(|(x, y)| {
                let mut t = spaxel_truth(cfg, ntpl, x, y);
                if !t.inside {
                    return (t, vec![0.0; npix], vec![0.0; npix], Vec::new());
                }
                if let Some(h) = &histories {
                    h.set(&mut t);
                }
                let mut spec = model.spectrum(&t);
                for (k, s) in spec.iter_mut().enumerate() {
                    let distortion: f64 = (0..3).map(|n| t.poly[n] * legendre[n + 1][k]).sum();
                    let dust = if t.a_v > 0.0 {
                        crate::dust::attenuation(grid.lam(k), t.a_v)
                    } else {
                        1.0
                    };
                    *s *= t.flux_scale * (1.0 + distortion) * dust;
                }
                let continuum = spec.iter().sum::<f64>() / npix as f64;
                let noise = continuum / t.sn;
                let mut fluxes = Vec::new();
                if let (Some(gas), Some(g)) = (&gas_tpl, &t.gas) {
                    // Halpha's flux summed over pixels: EW / pixel width at Halpha.
                    let halpha = gas.lines.iter().find(|l| l.name == "Halpha");
                    let pixel = halpha.map_or(1.0, |l| l.wave * velscale / C_KMS);
                    let f_halpha = g.halpha_ew / pixel * continuum;
                    let mut col = vec![0.0; npix];
                    for (l, line) in gas.lines.iter().enumerate() {
                        let ratio = GAS_LINES
                            .iter()
                            .find(|(n, _)| *n == line.name)
                            .map_or(0.0, |(_, r)| *r);
                        let (v, sigma) = match line.kind {
                            crate::gas::GasKind::Balmer => (g.v_balmer, g.sigma_balmer),
                            crate::gas::GasKind::Forbidden => (g.v_forbidden, g.sigma_forbidden),
                        };
                        gas.column(l, v, sigma, &mut col, None);
                        let area: f64 = col.iter().sum();
                        let flux = ratio * f_halpha;
                        for (s, c) in spec.iter_mut().zip(&col) {
                            *s += flux * c / area;
                        }
                        fluxes.push(flux);
                    }
                }
                // Noise has its own per-spaxel stream: the truth does not depend on it.
                let mut rng = rng_for(cfg.seed ^ 0x5eed, y * cfg.nx + x);
                let normal = Normal::new(0.0, noise).expect("noise is finite and positive");
                let flux = spec
                    .iter()
                    .map(|s| (s + normal.sample(&mut rng)) as f32)
                    .collect();
                let ivar = vec![(1.0 / (noise * noise)) as f32; npix];
                (t, flux, ivar, fluxes)
            })
            .collect();
        let nspax = band.len();
        let mut flux = vec![0f32; nspax * npix];
        let mut ivar = vec![0f32; nspax * npix];
        let mut mask = vec![0i32; nspax * npix];
        for (s, (t, fl, iv, _)) in band.iter().enumerate() {
            for k in 0..npix {
                flux[k * nspax + s] = fl[k];
                ivar[k * nspax + s] = iv[k];
                mask[k * nspax + s] = if t.inside { 0 } else { OUTSIDE_MASK };
            }
        }
        let region = [&(0..cfg.nx), &rows, &(0..npix)];
        hdus[0]
            .write_region(&mut f, &region, &flux)
            .map_err(write_err(&plain))?;
        hdus[1]
            .write_region(&mut f, &region, &ivar)
            .map_err(write_err(&plain))?;
        hdus[2]
            .write_region(&mut f, &region, &mask)
            .map_err(write_err(&plain))?;
        for (t, _, _, fluxes) in band {
            truths.push(t);
            gas_fluxes.push(fluxes);
        }
    }
    let vector = |f: &mut FitsFile, name: &str, values: &[f64]| -> Result<(), SynthError> {
        let hdu = f
            .create_image(
                name,
                &ImageDescription {
                    data_type: ImageType::Double,
                    dimensions: &[values.len()],
                },
            )
            .map_err(write_err(&plain))?;
        hdu.write_image(f, values).map_err(write_err(&plain))
    };
    vector(&mut f, "WAVE", wave)?;
    for (name, values) in &reference.extensions {
        vector(&mut f, name, values)?;
    }
    drop(f);
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |e: std::io::Error| SynthError::Write {
            path: path.clone(),
            message: e.to_string(),
        }
    };
    if gz {
        let mut input = std::fs::File::open(&plain).map_err(io(&plain))?;
        let tmp = out.with_extension("gz.partial");
        let output = std::fs::File::create(&tmp).map_err(io(&tmp))?;
        let mut encoder = flate2::write::GzEncoder::new(
            std::io::BufWriter::new(output),
            flate2::Compression::new(6),
        );
        std::io::copy(&mut input, &mut encoder).map_err(io(&tmp))?;
        encoder
            .finish()
            .and_then(|mut w| w.flush())
            .map_err(io(&tmp))?;
        std::fs::remove_file(&plain).map_err(io(&plain))?;
        std::fs::rename(&tmp, out).map_err(io(out))?;
    } else {
        std::fs::rename(&plain, out).map_err(io(out))?;
    }
    write_truth(truth, &truths, &tpl.names).map_err(io(truth))?;
    if let Some(gas) = &gas_tpl {
        let path = gas_truth_path(truth);
        let factor = |wave: f64| wave * (1.0 + cfg.redshift) * velscale / C_KMS;
        write_gas_truth(&path, &truths, &gas_fluxes, gas, &factor).map_err(io(&path))?;
    }
    Ok(truths)
}

/// Where the gas truth of a cube whose truth table is `truth` goes: `X-truth.csv` ->
/// `X-truth-gas.csv`.
pub fn gas_truth_path(truth: &Path) -> PathBuf {
    let stem = truth
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("truth");
    truth.with_file_name(format!("{stem}-gas.csv"))
}

/// The gas truth: per spaxel with signal, x, y, SN, the kinematics of the two components, and
/// one flux column per `EMLINE_GFLUX` channel (named as the MAPS name them; in the cube's flux
/// unit times Angstrom, as the MAPS hold them).
fn write_gas_truth(
    path: &Path,
    truths: &[SpaxelTruth],
    fluxes: &[Vec<f64>],
    gas: &crate::gas::GasTemplates,
    factor: &dyn Fn(f64) -> f64,
) -> std::io::Result<()> {
    let channels = gas.dap_channels();
    let mut w = std::io::BufWriter::new(std::fs::File::create(path)?);
    let names: Vec<&str> = channels.iter().map(|c| c.name.as_str()).collect();
    writeln!(
        w,
        "x,y,SN,V_balmer,sigma_balmer,V_forbidden,sigma_forbidden,{}",
        names.join(",")
    )?;
    let mut rows: Vec<(&SpaxelTruth, &Vec<f64>)> = truths.iter().zip(fluxes).collect();
    rows.sort_by_key(|(t, _)| (t.y, t.x));
    for (t, f) in rows {
        let Some(g) = t.gas.filter(|_| t.inside) else {
            continue;
        };
        let values: Vec<String> = channels
            .iter()
            .map(|c| {
                let line = &gas.lines[c.template];
                format!("{:.6e}", f[c.template] * c.share * factor(line.wave))
            })
            .collect();
        writeln!(
            w,
            "{},{},{:.4},{:.4},{:.4},{:.4},{:.4},{}",
            t.x,
            t.y,
            t.sn,
            g.v_balmer,
            g.sigma_balmer,
            g.v_forbidden,
            g.sigma_forbidden,
            values.join(",")
        )?;
    }
    w.flush()
}

/// The truth table, in the layout of `synthetic-manga-seed7-truth.csv`.
fn write_truth(path: &Path, truths: &[SpaxelTruth], names: &[String]) -> std::io::Result<()> {
    let mut w = std::io::BufWriter::new(std::fs::File::create(path)?);
    writeln!(
        w,
        "x,y,in_footprint,V,sigma,SN,flux_scale,R_spaxel,tpl_idx,tpl_w,poly_leg123,tpl_names,\
         A_V,light_log_age,light_MH"
    )?;
    let mut sorted: Vec<&SpaxelTruth> = truths.iter().collect();
    sorted.sort_by_key(|t| (t.y, t.x));
    for t in sorted {
        if !t.inside {
            writeln!(w, "{},{},0,,,,,,,,,,,,", t.x, t.y)?;
            continue;
        }
        let opt = |v: Option<f64>| v.map_or(String::new(), |v| format!("{v:.5}"));
        // With a smooth history the three drawn SSPs are not used: their columns stay empty.
        let join = |v: &[String]| {
            if t.history.is_some() {
                String::new()
            } else {
                v.join(";")
            }
        };
        writeln!(
            w,
            "{},{},1,{:.4},{:.4},{:.4},{:.4},{:.4},{},{},{},{},{:.5},{},{}",
            t.x,
            t.y,
            t.v,
            t.sigma,
            t.sn,
            t.flux_scale,
            t.radius,
            join(&t.templates.map(|i| i.to_string())),
            join(&t.weights.map(|w| format!("{w:.5}"))),
            join(&t.poly.map(|p| format!("{p:.5}"))),
            join(&t.templates.map(|i| names[i].clone())),
            t.a_v,
            opt(t.light_log_age),
            opt(t.light_metallicity),
        )?;
    }
    w.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truth_is_deterministic_per_seed_and_independent_of_order() {
        let cfg = SynthConfig::default();
        let a = spaxel_truth(&cfg, 150, 10, 12);
        let b = spaxel_truth(&cfg, 150, 10, 12);
        assert_eq!(a, b);
        let other = spaxel_truth(
            &SynthConfig {
                seed: 8,
                ..cfg.clone()
            },
            150,
            10,
            12,
        );
        assert_ne!(a.templates.to_vec(), other.templates.to_vec());
        assert!((a.weights.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        assert!(a.sn >= cfg.sn_min && a.sn <= cfg.sn_max);
        assert!(a.poly.iter().all(|p| p.abs() <= cfg.distortion));
        // The disc: receding and approaching sides mirror each other through the centre.
        let (p, q) = (
            spaxel_truth(&cfg, 150, 4, 20),
            spaxel_truth(&cfg, 150, 27, 11),
        );
        assert!((p.v + q.v).abs() < 1e-9, "{} {}", p.v, q.v);
        assert!((p.sigma - q.sigma).abs() < 1e-9);
    }

    #[test]
    fn the_hexagon_footprint_is_a_bundle_inside_the_grid() {
        let cfg = SynthConfig::default();
        let inside = (0..32)
            .flat_map(|y| (0..32).map(move |x| (x, y)))
            .filter(|&(x, y)| spaxel_truth(&cfg, 1, x, y).inside)
            .count();
        // A hexagon of circumradius 15.5 spaxels: area 3 sqrt(3)/2 r^2 = 624 spaxels.
        assert!((580..680).contains(&inside), "{inside}");
        assert!(!spaxel_truth(&cfg, 1, 0, 0).inside);
        assert!(spaxel_truth(&cfg, 1, 16, 16).inside);
    }

    #[test]
    fn bad_parameters_are_refused() {
        let cfg = SynthConfig {
            nx: 0,
            ..SynthConfig::default()
        };
        let err = synthesize(
            &cfg,
            Path::new("/nonexistent"),
            Path::new("/nonexistent"),
            Path::new("/tmp/x.fits"),
            Path::new("/tmp/x.csv"),
        )
        .unwrap_err();
        assert!(matches!(err, SynthError::Config(_)), "{err}");
        let cfg = SynthConfig::default();
        let err = synthesize(
            &cfg,
            Path::new("/nonexistent"),
            Path::new("/nonexistent.fits"),
            Path::new("/tmp/x.fits"),
            Path::new("/tmp/x.csv"),
        )
        .unwrap_err();
        assert!(matches!(err, SynthError::Reference { .. }), "{err}");
    }
}

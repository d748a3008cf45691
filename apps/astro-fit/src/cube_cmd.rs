//! The cube subcommands of `astro-fit` (`fit-cube`, `synth`, `compare-truth`): their
//! arguments and what they run, so that `main.rs` stays a dispatcher.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};

use crate::cubefit::{CubeFitOptions, fit_cube};
use crate::plan::ChunkLimits;
use crate::synth::{Footprint, SynthConfig, synthesize};

#[derive(Debug, Args)]
pub struct FitCubeArgs {
    /// The cube (.fits or .fits.gz).
    pub cube: PathBuf,
    /// Template library directory (E-MILES, MILES HC or MaStar HC).
    #[arg(long)]
    pub templates: PathBuf,
    /// Output directory; rerunning on it resumes (fits only what is missing).
    #[arg(long)]
    pub out: PathBuf,
    /// Voronoi-bin to this S/N per pixel; without it every spaxel is fitted on its own.
    #[arg(long)]
    pub target_sn: Option<f64>,
    /// Gauss-Hermite moments: 2 (V, sigma), 4 (+h3, h4) or 6.
    #[arg(long, default_value_t = 2)]
    pub moments: usize,
    /// Additive Legendre degree (negative: none).
    #[arg(long, default_value_t = 4, allow_negative_numbers = true)]
    pub degree: i32,
    /// Multiplicative Legendre degree.
    #[arg(long, default_value_t = 0)]
    pub mdegree: usize,
    /// Keep every template and map light- and mass-weighted age and [M/H].
    #[arg(long)]
    pub populations: bool,
    /// Fit each bin with the global fit's templates only (GIST/DAP-style pre-selection):
    /// about twice as fast, but sigma's errors come out too small where a bin needs other
    /// templates. By default every bin ends fitted with the whole library.
    #[arg(long)]
    pub global_templates_only: bool,
    /// Worker threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Systemic redshift (default: from the cube header).
    #[arg(long)]
    pub redshift: Option<f64>,
    /// Rest-frame range to fit, Angstrom.
    #[arg(long, num_args = 2, value_names = ["MIN", "MAX"], default_values_t = [3600.0, 7400.0])]
    pub lam_range: Vec<f64>,
    /// Spaxels below this S/N per pixel are not fitted.
    #[arg(long, default_value_t = 1.0)]
    pub min_sn: f64,
    /// Half-width (km/s) of the masks around gas emission lines; 0 fits them.
    #[arg(long, default_value_t = 600.0)]
    pub emission_mask_kms: f64,
    /// Spectra per chunk (the unit of resumption and of scheduling).
    #[arg(long, default_value_t = 64)]
    pub chunk_spectra: usize,
    /// Do not write the model cube.
    #[arg(long)]
    pub no_model_cube: bool,
}

#[derive(Debug, Args)]
pub struct SynthArgs {
    /// Output cube (.fits, or .fits.gz to compress).
    #[arg(long)]
    pub out: PathBuf,
    /// Truth table (default: next to the cube, `-truth.csv`).
    #[arg(long)]
    pub truth: Option<PathBuf>,
    /// E-MILES template directory.
    #[arg(long)]
    pub templates: PathBuf,
    /// A MaNGA LOGCUBE whose WAVE grid and SPECRES resolution curve the cube takes.
    #[arg(long)]
    pub reference: PathBuf,
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
    #[arg(long, default_value_t = 32)]
    pub nx: usize,
    #[arg(long, default_value_t = 32)]
    pub ny: usize,
    #[arg(long, value_enum, default_value_t = Footprint::Hexagon)]
    pub footprint: Footprint,
    #[arg(long, default_value_t = 0.018)]
    pub redshift: f64,
    /// Asymptotic rotation velocity, km/s.
    #[arg(long, default_value_t = 250.0)]
    pub vmax: f64,
    /// Lowest and highest S/N per pixel.
    #[arg(long, default_value_t = 5.0)]
    pub sn_min: f64,
    #[arg(long, default_value_t = 60.0)]
    pub sn_max: f64,
}

#[derive(Debug, Args)]
pub struct CompareArgs {
    /// MAPS file written by fit-cube.
    pub maps: PathBuf,
    /// Truth table written by synth.
    pub truth: PathBuf,
    /// PNG of fit minus truth for V and sigma.
    #[arg(long)]
    pub png: PathBuf,
}

fn progress_bar() -> ProgressBar {
    let bar = ProgressBar::new(0);
    let style = ProgressStyle::with_template(
        "{elapsed_precise} [{wide_bar}] {pos}/{len} spectra, {per_sec}, ETA {eta}",
    )
    .map(|s| s.progress_chars("=> "));
    if let Ok(style) = style {
        bar.set_style(style);
    }
    bar
}

/// `astro-fit fit-cube`: prints the summary as JSON.
pub fn run_fit_cube(a: &FitCubeArgs) -> anyhow::Result<()> {
    let mut options = CubeFitOptions::new(a.cube.clone(), a.templates.clone(), a.out.clone());
    options.target_sn = a.target_sn;
    options.moments = a.moments;
    options.degree = a.degree;
    options.mdegree = a.mdegree;
    options.populations = a.populations;
    options.threads = a.threads;
    options.redshift = a.redshift;
    options.lam_range = (a.lam_range[0], a.lam_range[1]);
    options.min_sn = a.min_sn;
    options.emission_mask_kms = a.emission_mask_kms;
    options.global_templates_only = a.global_templates_only;
    options.chunk = ChunkLimits {
        max_spectra: a.chunk_spectra,
        ..options.chunk
    };
    options.model_cube = !a.no_model_cube;
    let summary = fit_cube(&options, &progress_bar()).context("fit-cube")?;
    println!("{}", serde_json::to_string_pretty(&summary)?);
    Ok(())
}

/// `astro-fit synth`.
pub fn run_synth(a: &SynthArgs) -> anyhow::Result<()> {
    let config = SynthConfig {
        seed: a.seed,
        nx: a.nx,
        ny: a.ny,
        footprint: a.footprint,
        redshift: a.redshift,
        vmax: a.vmax,
        sn_min: a.sn_min,
        sn_max: a.sn_max,
        ..SynthConfig::default()
    };
    let truth = a.truth.clone().unwrap_or_else(|| {
        let name = a.out.file_name().and_then(|n| n.to_str()).unwrap_or("cube");
        let stem = name
            .trim_end_matches(".gz")
            .trim_end_matches(".fits")
            .trim_end_matches("-LOGCUBE");
        a.out.with_file_name(format!("{stem}-truth.csv"))
    });
    let rows = synthesize(&config, &a.templates, &a.reference, &a.out, &truth).context("synth")?;
    let inside = rows.iter().filter(|t| t.inside).count();
    println!(
        "wrote {} ({inside} spaxels with signal) and {}",
        a.out.display(),
        truth.display()
    );
    Ok(())
}

/// `astro-fit compare-truth`: prints the accuracy per S/N bin as JSON.
pub fn run_compare_truth(a: &CompareArgs) -> anyhow::Result<()> {
    let report =
        crate::accuracy::compare_with_truth(&a.maps, &a.truth, &a.png).context("compare-truth")?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}

//! `astro-fit`: a thin command-line front over the library (see `astro_fit::fit_spectrum_cmd`,
//! `astro_fit::cubefit`, `astro_fit::synth`, `astro_fit::accuracy`, `astro_fit::edge::cli`).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use astro_fit::cubefit::{CubeFitOptions, fit_cube};
use astro_fit::fit_spectrum_cmd::{self, FitSpectrumArgs};
use astro_fit::plan::ChunkLimits;
use astro_fit::synth::{Footprint, SynthConfig, synthesize};
use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};

#[derive(Parser)]
#[command(
    name = "astro-fit",
    version,
    about = "Full-spectrum fitting of galaxy spectra and IFS datacubes, and the TARSIS edge filter/compressor"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Fit one spectrum (SDSS, 1-D linear FITS, MaNGA rows or LOGCUBE spaxels).
    FitSpectrum(FitSpectrumArgs),
    /// Fit every spaxel or Voronoi bin of a cube (MaNGA LOGCUBE, MUSE, MEGARA) and write maps.
    FitCube(FitCubeArgs),
    /// Make a deterministic synthetic MaNGA-format LOGCUBE and its truth table.
    Synth(SynthArgs),
    /// Compare a MAPS file with a synthetic cube's truth table.
    CompareTruth(CompareArgs),
    /// TARSIS edge: filter and compress IFS data before it leaves the telescope.
    #[command(subcommand)]
    Edge(astro_fit::edge::cli::EdgeCommand),
}

#[derive(Args)]
struct FitCubeArgs {
    /// The cube (.fits or .fits.gz).
    cube: PathBuf,
    /// Template library directory (E-MILES, MILES HC or MaStar HC).
    #[arg(long)]
    templates: PathBuf,
    /// Output directory; rerunning on it resumes (fits only what is missing).
    #[arg(long)]
    out: PathBuf,
    /// Voronoi-bin to this S/N per pixel; without it every spaxel is fitted on its own.
    #[arg(long)]
    target_sn: Option<f64>,
    /// Gauss-Hermite moments: 2 (V, sigma), 4 (+h3, h4) or 6.
    #[arg(long, default_value_t = 2)]
    moments: usize,
    /// Additive Legendre degree (negative: none).
    #[arg(long, default_value_t = 4, allow_negative_numbers = true)]
    degree: i32,
    /// Multiplicative Legendre degree.
    #[arg(long, default_value_t = 0)]
    mdegree: usize,
    /// Keep every template and map light- and mass-weighted age and [M/H].
    #[arg(long)]
    populations: bool,
    /// Worker threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Systemic redshift (default: from the cube header).
    #[arg(long)]
    redshift: Option<f64>,
    /// Rest-frame range to fit, Angstrom.
    #[arg(long, num_args = 2, value_names = ["MIN", "MAX"], default_values_t = [3600.0, 7400.0])]
    lam_range: Vec<f64>,
    /// Spaxels below this S/N per pixel are not fitted.
    #[arg(long, default_value_t = 1.0)]
    min_sn: f64,
    /// Half-width (km/s) of the masks around gas emission lines; 0 fits them.
    #[arg(long, default_value_t = 600.0)]
    emission_mask_kms: f64,
    /// Spectra per chunk (the unit of resumption and of scheduling).
    #[arg(long, default_value_t = 64)]
    chunk_spectra: usize,
    /// Do not write the model cube.
    #[arg(long)]
    no_model_cube: bool,
}

#[derive(Args)]
struct SynthArgs {
    /// Output cube (.fits, or .fits.gz to compress).
    #[arg(long)]
    out: PathBuf,
    /// Truth table (default: next to the cube, `-truth.csv`).
    #[arg(long)]
    truth: Option<PathBuf>,
    /// E-MILES template directory.
    #[arg(long)]
    templates: PathBuf,
    /// A MaNGA LOGCUBE whose WAVE grid and SPECRES resolution curve the cube takes.
    #[arg(long)]
    reference: PathBuf,
    #[arg(long, default_value_t = 7)]
    seed: u64,
    #[arg(long, default_value_t = 32)]
    nx: usize,
    #[arg(long, default_value_t = 32)]
    ny: usize,
    #[arg(long, value_enum, default_value_t = Footprint::Hexagon)]
    footprint: Footprint,
    #[arg(long, default_value_t = 0.018)]
    redshift: f64,
    /// Asymptotic rotation velocity, km/s.
    #[arg(long, default_value_t = 250.0)]
    vmax: f64,
    /// Lowest and highest S/N per pixel.
    #[arg(long, default_value_t = 5.0)]
    sn_min: f64,
    #[arg(long, default_value_t = 60.0)]
    sn_max: f64,
}

#[derive(Args)]
struct CompareArgs {
    /// MAPS file written by fit-cube.
    maps: PathBuf,
    /// Truth table written by synth.
    truth: PathBuf,
    /// PNG of fit minus truth for V and sigma.
    #[arg(long)]
    png: PathBuf,
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

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::FitSpectrum(args) => fit_spectrum_cmd::run(&args)?,
        Command::Edge(command) => command.run()?,
        Command::FitCube(a) => {
            let mut options = CubeFitOptions::new(a.cube, a.templates, a.out);
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
            options.chunk = ChunkLimits {
                max_spectra: a.chunk_spectra,
                ..options.chunk
            };
            options.model_cube = !a.no_model_cube;
            let summary = fit_cube(&options, &progress_bar()).context("fit-cube")?;
            println!("{}", serde_json::to_string_pretty(&summary)?);
        }
        Command::Synth(a) => {
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
            let truth = a.truth.unwrap_or_else(|| {
                let name = a.out.file_name().and_then(|n| n.to_str()).unwrap_or("cube");
                let stem = name
                    .trim_end_matches(".gz")
                    .trim_end_matches(".fits")
                    .trim_end_matches("-LOGCUBE");
                a.out.with_file_name(format!("{stem}-truth.csv"))
            });
            let rows =
                synthesize(&config, &a.templates, &a.reference, &a.out, &truth).context("synth")?;
            let inside = rows.iter().filter(|t| t.inside).count();
            println!(
                "wrote {} ({inside} spaxels with signal) and {}",
                a.out.display(),
                truth.display()
            );
        }
        Command::CompareTruth(a) => {
            let report = astro_fit::accuracy::compare_with_truth(&a.maps, &a.truth, &a.png)
                .context("compare-truth")?;
            println!("{}", serde_json::to_string_pretty(&report)?);
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("astro-fit: {e:#}");
            ExitCode::FAILURE
        }
    }
}

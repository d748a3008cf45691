//! The cube subcommands of `astro-fit` (`fit-cube`; its three stages `prepare`, `fit-chunk`,
//! `assemble` as the control plane runs them; `synth`, `compare-truth`): their arguments and
//! what they run, so that `main.rs` stays a dispatcher.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};

use crate::cube::Cube;
use crate::cubefit::{
    ChunkFitter, CubeFitOptions, CubeFitSummary, CubePlan, PLAN_FILE, assemble, chunk_files,
    fit_cube, load_plan, make_or_load_plan,
};
use crate::output::{OutputFormat, file_with_size, human_bytes, print_out};
use crate::plan::ChunkLimits;
use crate::synth::{Footprint, GasSynth, SynthConfig, synthesize};
use crate::templates::TemplateLibrary;
use crate::voronoi::BinningOutcome;

/// Default half-width (km/s) of the emission-line masks, for every subcommand that fits.
pub const EMISSION_MASK_KMS: f64 = 600.0;

/// The options that change a fit's results (they go into `plan.json`): shared by `fit-cube`
/// and `prepare` so that their flags cannot drift apart.
#[derive(Debug, Clone, Args)]
pub struct FitOptionArgs {
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
    /// pPXF's `regul`: regularise every bin's weights over the age x [M/H] grid (implies
    /// --populations; each bin's star-formation history goes to `sfh.csv`).
    #[arg(long, default_value_t = 0.0)]
    pub regul: f64,
    /// Fit the stellar dust attenuation A_V (mag, Calzetti 2000, R_V 4.05) in every bin from
    /// this start, as pPXF's `reddening` (not with --mdegree); the MAPS gain STELLAR_AV.
    #[arg(long, value_name = "AV0")]
    pub reddening: Option<f64>,
    /// Give each bin's light-weighted age and [M/H] an error from this many realisations of a
    /// wild residual bootstrap (pPXF's population example; N refits per bin): the MAPS gain
    /// STELLAR_AGE_LW_IVAR and STELLAR_MH_LW_IVAR. Implies --populations.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub bootstrap: usize,
    /// Fit each bin with the global fit's templates only (GIST/DAP-style pre-selection):
    /// about twice as fast, but sigma's errors come out too small where a bin needs other
    /// templates. By default every bin ends fitted with the whole library.
    #[arg(long)]
    pub global_templates_only: bool,
    /// Systemic redshift (default: from the cube header).
    #[arg(long, alias = "z")]
    pub redshift: Option<f64>,
    /// Rest-frame range to fit, Angstrom.
    #[arg(long, num_args = 2, value_names = ["MIN", "MAX"], default_values_t = [3600.0, 7400.0])]
    pub lam_range: Vec<f64>,
    /// Spaxels below this S/N per pixel are not fitted.
    #[arg(long, default_value_t = 1.0)]
    pub min_sn: f64,
    /// Half-width (km/s) of the masks around gas emission lines; 0 fits them.
    #[arg(long, alias = "line-mask", default_value_t = EMISSION_MASK_KMS)]
    pub emission_mask_kms: f64,
    /// Fit the gas emission lines with the stars (pPXF's line list inside the range, Balmer
    /// and forbidden components) instead of masking them: the MAPS gain EMLINE_GFLUX,
    /// EMLINE_GVEL and EMLINE_GSIGMA, and `emission.png` maps the main lines.
    #[arg(long)]
    pub gas: bool,
    /// Spectra per chunk (the unit of resumption and of scheduling).
    #[arg(long, default_value_t = 64)]
    pub chunk_spectra: usize,
}

impl FitOptionArgs {
    /// `CubeFitOptions` with these settings (threads and model cube left at their defaults).
    pub fn options(&self, cube: PathBuf, templates: PathBuf, out: PathBuf) -> CubeFitOptions {
        let mut options = CubeFitOptions::new(cube, templates, out);
        options.target_sn = self.target_sn;
        options.moments = self.moments;
        options.degree = self.degree;
        options.mdegree = self.mdegree;
        options.populations = self.populations;
        options.regul = self.regul;
        options.reddening = self.reddening;
        options.bootstrap = self.bootstrap;
        options.redshift = self.redshift;
        // clap's num_args = 2 guarantees two values.
        options.lam_range = (self.lam_range[0], self.lam_range[1]);
        options.min_sn = self.min_sn;
        options.emission_mask_kms = self.emission_mask_kms;
        options.global_templates_only = self.global_templates_only;
        options.gas = self.gas;
        options.chunk = ChunkLimits {
            max_spectra: self.chunk_spectra,
            ..options.chunk
        };
        options
    }
}

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
    #[command(flatten)]
    pub fit: FitOptionArgs,
    /// Worker threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Do not write the model cube.
    #[arg(long)]
    pub no_model_cube: bool,
    /// What to print: a summary and the files written (text), or the summary as JSON (json).
    #[arg(short = 'o', long = "output", value_enum, default_value_t)]
    pub output: OutputFormat,
}

#[derive(Debug, Args)]
pub struct PrepareArgs {
    /// The cube (.fits or .fits.gz).
    pub cube: PathBuf,
    /// Template library directory (E-MILES, MILES HC or MaStar HC).
    #[arg(long)]
    pub templates: PathBuf,
    /// Output directory: `plan.json` is written there (kept when it already holds a plan
    /// with the same settings; an error when its settings differ).
    #[arg(long)]
    pub out: PathBuf,
    #[command(flatten)]
    pub fit: FitOptionArgs,
}

#[derive(Debug, Args)]
pub struct FitChunkArgs {
    /// Directory holding `plan.json`; the chunk's result files are written under its `chunks/`.
    #[arg(long)]
    pub plan: PathBuf,
    /// The cube (a local copy of the one the plan was made from).
    #[arg(long)]
    pub cube: PathBuf,
    /// Template library directory (the same library the plan was made with).
    #[arg(long)]
    pub templates: PathBuf,
    /// The chunk's id in the plan.
    #[arg(long)]
    pub chunk: usize,
    /// Worker threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
}

#[derive(Debug, Args)]
pub struct AssembleArgs {
    /// Directory holding `plan.json` and `chunks/`; the maps are written there.
    #[arg(long)]
    pub plan: PathBuf,
    /// The cube (only its header is used: grid and metadata of the maps).
    #[arg(long)]
    pub cube: PathBuf,
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
    /// Add gas emission lines (Balmer and forbidden, with their own kinematics); their truth
    /// goes to `X-truth-gas.csv` next to the truth table.
    #[arg(long)]
    pub gas: bool,
    /// With --gas: median Halpha equivalent width, rest-frame Angstrom.
    #[arg(long, requires = "gas", default_value_t = 5.0)]
    pub halpha_ew: f64,
    /// Attenuate the stars by the Calzetti (2000) curve, A_V = AV exp(-R / half the field)
    /// (the truth table's A_V column); the cube then has no multiplicative distortion.
    #[arg(long, value_name = "AV")]
    pub dust: Option<f64>,
    /// Smooth star-formation histories over the SSP grid (older and richer in the centre)
    /// instead of three SSPs per spaxel; the truth table gains their light-weighted log age
    /// and [M/H] (light over 3600-7400 A, fit-cube's default range).
    #[arg(long)]
    pub sfh: bool,
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
    /// Gas truth table written by `synth --gas` (default: `X-truth-gas.csv` beside the truth
    /// table, when it exists): also compare the EMLINE_G* maps of a `fit-cube --gas`.
    #[arg(long)]
    pub gas_truth: Option<PathBuf>,
    /// What to print: the accuracy per S/N bin as a table (text) or as JSON (json).
    #[arg(short = 'o', long = "output", value_enum, default_value_t)]
    pub output: OutputFormat,
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

/// `astro-fit fit-cube`: prints a summary and the files written, or (`-o json`) the summary
/// as JSON, the files then listed on standard error.
pub fn run_fit_cube(a: &FitCubeArgs) -> anyhow::Result<()> {
    let mut options = a
        .fit
        .options(a.cube.clone(), a.templates.clone(), a.out.clone());
    options.threads = a.threads;
    options.model_cube = !a.no_model_cube;
    let summary = fit_cube(&options, &progress_bar()).context("fit-cube")?;
    let files = fit_cube_files(&a.out, options.model_cube);
    match a.output {
        OutputFormat::Json => {
            print_out(&format!("{}\n", serde_json::to_string_pretty(&summary)?))?;
            eprint!("{files}");
        }
        OutputFormat::Text => print_out(&format!("{}{files}", fit_cube_text(&summary)))?,
    }
    Ok(())
}

fn seconds(s: f64) -> String {
    if s >= 90.0 {
        format!("{} min {:.0} s", (s / 60.0).floor(), s % 60.0)
    } else {
        format!("{s:.1} s")
    }
}

/// The summary of a `fit-cube` run for people: what was fitted, how fast, how well.
pub fn fit_cube_text(s: &CubeFitSummary) -> String {
    let name = s.cube.file_name().map_or_else(
        || s.cube.display().to_string(),
        |n| n.to_string_lossy().into(),
    );
    let binning = match &s.binning {
        None => "one spectrum per spaxel".to_string(),
        Some(BinningOutcome::Binned { .. }) => "Voronoi bins".to_string(),
        Some(BinningOutcome::AllAboveTarget) => {
            "every spaxel above the target S/N: one bin each".to_string()
        }
        Some(BinningOutcome::TargetUnreachable { achieved_sn }) => {
            format!("target S/N out of reach: one bin at S/N {achieved_sn:.1}")
        }
    };
    let t = &s.timings;
    let resumed = if s.chunks_resumed > 0 {
        format!(
            ", {} of {} chunks kept from an earlier run",
            s.chunks_resumed, s.chunks
        )
    } else {
        String::new()
    };
    format!(
        "fitted {name} ({}, {} x {} spaxels, {} wavelengths) at z = {}\n\
         \x20 bins       {} fitted, {} failed ({} spaxels; {binning})\n\
         \x20 speed      {} spectra in {}: {:.1} spectra/s on {} threads{resumed}\n\
         \x20 errors     median {:.1} km/s on V, {:.1} km/s on sigma\n\
         \x20 wall time  {} (prepare {}, global fit {}, bins {}, outputs {})\n",
        s.format,
        s.nx,
        s.ny,
        s.nwave,
        s.redshift,
        s.bins - s.failed_bins,
        s.failed_bins,
        s.spaxels_selected,
        s.spectra_fitted_now,
        seconds(t.fit_s),
        s.spectra_per_second,
        s.threads,
        s.median_velocity_error,
        s.median_sigma_error,
        seconds(t.total_s),
        seconds(t.prepare_s),
        seconds(t.global_fit_s),
        seconds(t.fit_s),
        seconds(t.outputs_s),
    )
}

/// The files a `fit-cube` run leaves in `out`, with their sizes and what they hold.
pub fn fit_cube_files(out: &Path, model_cube: bool) -> String {
    let mut files = vec![
        (
            "maps.fits",
            "MAPS: BINID and each fitted quantity, DAP layout",
        ),
        ("model.fits", "best-fit model cube"),
        ("maps.png", "images of the maps"),
        ("summary.json", "this summary as JSON"),
        ("plan.json", "settings, bins, chunks, global fit"),
    ];
    if !model_cube {
        files.retain(|(name, _)| *name != "model.fits");
    }
    for (name, what) in crate::cubefit::OPTIONAL_OUTPUTS {
        if out.join(name).is_file() {
            files.push((name, what));
        }
    }
    let mut rows: Vec<(String, &str)> = files
        .iter()
        .map(|(name, what)| (file_with_size(&out.join(name)), *what))
        .collect();
    let chunks = out.join("chunks");
    let (count, bytes) = std::fs::read_dir(&chunks)
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|e| {
                    let json = e.path().extension().is_some_and(|x| x == "json");
                    e.metadata().ok().filter(|m| m.is_file()).map(|m| (json, m))
                })
                .fold((0usize, 0u64), |(n, b), (json, m)| {
                    (n + usize::from(json), b + m.len())
                })
        })
        .unwrap_or_default();
    let chunk_note =
        format!("{count} chunks' results and models (a rerun fits only what is missing)");
    rows.push((
        format!("{}/ ({})", chunks.display(), human_bytes(bytes)),
        &chunk_note,
    ));
    let width = rows.iter().map(|(f, _)| f.len()).max().unwrap_or(0);
    let mut text = String::from("wrote:\n");
    for (file, what) in rows {
        text.push_str(&format!("  {file:<width$}  {what}\n"));
    }
    text
}

/// `astro-fit prepare`: stage 1, prints the path of `plan.json`.
pub fn run_prepare(a: &PrepareArgs) -> anyhow::Result<()> {
    let options = a
        .fit
        .options(a.cube.clone(), a.templates.clone(), a.out.clone());
    let mut cube = Cube::open(&a.cube).context("prepare")?;
    let lib = TemplateLibrary::load(&a.templates)
        .with_context(|| format!("prepare: templates {}", a.templates.display()))?;
    // The same rule as fit-cube's: a plan with these settings is kept (so a redelivered task
    // or a later fit-cube on the directory agrees with it), one with others is refused.
    let (prepared, computed) = make_or_load_plan(&options, &mut cube, &lib).context("prepare")?;
    if computed {
        eprintln!(
            "prepare: {} bins in {} chunks (prepare {:.1} s, global fit {:.1} s)",
            prepared.plan.bins.len(),
            prepared.plan.chunks.len(),
            prepared.prepare_s,
            prepared.global_fit_s
        );
    } else {
        eprintln!("prepare: kept the plan already there (same settings)");
    }
    println!("{}", a.out.join(PLAN_FILE).display());
    Ok(())
}

fn read_plan(dir: &Path) -> anyhow::Result<CubePlan> {
    load_plan(dir)?.with_context(|| format!("no {PLAN_FILE} in {}", dir.display()))
}

/// `astro-fit fit-chunk`: stage 2 for one chunk, prints the two files written.
pub fn run_fit_chunk(a: &FitChunkArgs) -> anyhow::Result<()> {
    let plan = read_plan(&a.plan).context("fit-chunk")?;
    let chunk = plan
        .chunks
        .iter()
        .find(|c| c.id == a.chunk)
        .with_context(|| {
            format!(
                "fit-chunk: the plan has no chunk {} (it has {})",
                a.chunk,
                plan.chunks.len()
            )
        })?;
    let mut cube = Cube::open(&a.cube).context("fit-chunk")?;
    let meta = cube.meta().clone();
    let lib = TemplateLibrary::load(&a.templates)
        .with_context(|| format!("fit-chunk: templates {}", a.templates.display()))?;
    let fitter = ChunkFitter::new(&plan, &meta, lib).context("fit-chunk")?;
    let spectra = fitter.read_spectra(&mut cube, chunk).context("fit-chunk")?;
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(a.threads.unwrap_or(0))
        .build()
        .context("fit-chunk: thread pool")?;
    let bar = progress_bar();
    bar.set_length(spectra.len() as u64);
    let fitted = fitter.fit_chunk(chunk, &spectra, &pool, &bar);
    bar.finish_and_clear();
    fitted.write(&a.plan).context("fit-chunk")?;
    let failed = fitted
        .result
        .results
        .iter()
        .filter(|r| r.failure.is_some())
        .count();
    eprintln!(
        "fit-chunk: chunk {}: {} spectra, {failed} failed",
        chunk.id,
        spectra.len()
    );
    let (json, model) = chunk_files(chunk.id);
    println!("{}", a.plan.join(model).display());
    println!("{}", a.plan.join(json).display());
    Ok(())
}

/// `astro-fit assemble`: stage 3, prints each file written.
pub fn run_assemble(a: &AssembleArgs) -> anyhow::Result<()> {
    let plan = read_plan(&a.plan).context("assemble")?;
    let cube = Cube::open(&a.cube).context("assemble")?;
    let stats = assemble(&a.plan, cube.meta(), &plan, !a.no_model_cube).context("assemble")?;
    eprintln!(
        "assemble: {} bins with results, {} failed, {} chunks missing",
        stats.bins, stats.failed, stats.chunks_missing
    );
    let mut files = vec!["maps.fits"];
    if !a.no_model_cube {
        files.push("model.fits");
    }
    files.push("maps.png");
    for f in files {
        println!("{}", a.plan.join(f).display());
    }
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
        gas: a.gas.then(|| GasSynth {
            halpha_ew: a.halpha_ew,
            ..GasSynth::default()
        }),
        dust: a.dust,
        sfh: a.sfh,
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
    if a.gas {
        println!("wrote {}", crate::synth::gas_truth_path(&truth).display());
    }
    Ok(())
}

/// `astro-fit compare-truth`: prints the accuracy per S/N bin as a table or as JSON.
pub fn run_compare_truth(a: &CompareArgs) -> anyhow::Result<()> {
    let report =
        crate::accuracy::compare_with_truth(&a.maps, &a.truth, &a.png).context("compare-truth")?;
    let gas = match &a.gas_truth {
        Some(path) => {
            Some(crate::accuracy::compare_gas_with_truth(&a.maps, path).context("compare-truth")?)
        }
        None => {
            let path = crate::synth::gas_truth_path(&a.truth);
            if path.is_file() {
                match crate::accuracy::compare_gas_with_truth(&a.maps, &path) {
                    Ok(g) => Some(g),
                    Err(e) => {
                        eprintln!("gas not compared: {e}");
                        None
                    }
                }
            } else {
                None
            }
        }
    };
    // Dust and populations where the truth and the maps have them (`synth --dust/--sfh`,
    // `fit-cube --reddening/--regul`).
    let pops = crate::accuracy::compare_populations_with_truth(&a.maps, &a.truth)
        .context("compare-truth")?;
    match a.output {
        OutputFormat::Json => {
            let mut value = serde_json::to_value(&report)?;
            if let (Some(g), Some(obj)) = (&gas, value.as_object_mut()) {
                obj.insert("gas".into(), serde_json::to_value(g)?);
            }
            if let (false, Some(obj)) = (pops.is_empty(), value.as_object_mut()) {
                obj.insert("populations".into(), serde_json::to_value(&pops)?);
            }
            print_out(&format!("{}\n", serde_json::to_string_pretty(&value)?))?;
            eprintln!("wrote {}", file_with_size(&a.png));
        }
        OutputFormat::Text => {
            let mut text = format!(
                "{} spaxels compared with the truth ({} without a fitted value); km/s\n",
                report.compared, report.missing
            );
            text.push_str(&format!(
                "{:<9} {:>5} {:>7} {:>7} {:>6} {:>8} {:>8} {:>8}\n",
                "S/N", "n", "V bias", "V rms", "V pull", "sig bias", "sig rms", "sig pull"
            ));
            let row = |label: String, b: &crate::synthetic::BinAccuracy| {
                if b.count == 0 {
                    return format!("{label:<9} {:>5} {:>7}\n", 0, "-");
                }
                format!(
                    "{label:<9} {:>5} {:>+7.2} {:>7.2} {:>6.2} {:>+8.2} {:>8.2} {:>8.2}\n",
                    b.count,
                    b.v_bias,
                    b.v_rms,
                    b.v_pull_std,
                    b.sigma_bias,
                    b.sigma_rms,
                    b.sigma_pull_std
                )
            };
            for b in &report.by_sn {
                let label = if b.sn_max.is_finite() {
                    format!("{}-{}", b.sn_min, b.sn_max)
                } else {
                    format!("{}+", b.sn_min)
                };
                text.push_str(&row(label, b));
            }
            text.push_str(&row(">= 20".into(), &report.above_sn_20));
            text.push_str("(pull: std of (fit - truth) / error, 1 when the errors are right)\n");
            if let Some(g) = &gas {
                text.push_str(&format!(
                    "gas: {:<10} {:<6} {:<7} {:>5} {:>11} {:>11} {:>9} {:>8}\n",
                    "channel", "", "S/N", "n", "bias", "rms", "pull mean", "pull std"
                ));
                for b in g {
                    let sn = if b.sn_max.is_finite() {
                        format!("{}-{}", b.sn_min, b.sn_max)
                    } else {
                        format!("{}+", b.sn_min)
                    };
                    text.push_str(&format!(
                        "     {:<10} {:<6} {:<7} {:>5} {:>11.4} {:>11.4} {:>+9.2} {:>8.2}\n",
                        b.channel, b.quantity, sn, b.count, b.bias, b.rms, b.pull_mean, b.pull_std
                    ));
                }
            }
            if !pops.is_empty() {
                text.push_str(&format!(
                    "stars: {:<14} {:<7} {:>5} {:>9} {:>9} {:>9} {:>8}\n",
                    "quantity", "S/N", "n", "bias", "rms", "pull mean", "pull std"
                ));
                for b in &pops {
                    let sn = if b.sn_max.is_finite() {
                        format!("{}-{}", b.sn_min, b.sn_max)
                    } else {
                        format!("{}+", b.sn_min)
                    };
                    text.push_str(&format!(
                        "       {:<14} {:<7} {:>5} {:>+9.4} {:>9.4} {:>+9.2} {:>8.2}\n",
                        b.quantity, sn, b.count, b.bias, b.rms, b.pull_mean, b.pull_std
                    ));
                }
            }
            text.push_str(&format!("wrote {}\n", file_with_size(&a.png)));
            print_out(&text)?;
        }
    }
    Ok(())
}

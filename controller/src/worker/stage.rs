//! Runs one stage of an astro-fit application on this worker with the astro-fit library: the
//! same prepare / fit / assemble code `astro-fit fit-cube` runs, so both give the same maps.
//!
//! Inputs arrive as local files from the data plane; outputs are written into a scratch
//! directory and uploaded by the caller. What is costly to set up for a plan (the open cube,
//! the prepared templates, the thread pool) stays warm between the tasks of one application.

use std::path::{Path, PathBuf};
use std::time::Instant;

use astro_fit::cube::{Cube, CubeMeta};
use astro_fit::cubefit::{self, ChunkFitter, CubePlan};
use astro_fit::templates::TemplateLibrary;
use indicatif::ProgressBar;
use serde::{Deserialize, Serialize};

use crate::astro_fit::{AstroFitWork, PLAN_FILE, PrepareReport, Stage};

/// A stage that failed: `permanent` when another attempt would fail the same way (the input
/// is not a cube, the templates do not cover it, ...).
#[derive(Debug)]
pub struct StageError {
    pub message: String,
    pub permanent: bool,
}

impl StageError {
    fn permanent(message: impl std::fmt::Display) -> Self {
        StageError {
            message: message.to_string(),
            permanent: true,
        }
    }

    fn transient(message: impl std::fmt::Display) -> Self {
        StageError {
            message: message.to_string(),
            permanent: false,
        }
    }
}

/// The local inputs of one task.
pub struct StageInputs {
    pub cube: PathBuf,
    pub templates: PathBuf,
    pub plan: Option<PathBuf>,
    /// Chunk result files: (name relative to the output dir, local path).
    pub chunks: Vec<(String, PathBuf)>,
}

/// What a stage made: files to upload (name, local path) and the result to report.
pub struct StageOutput {
    pub files: Vec<(String, PathBuf)>,
    pub result: serde_json::Value,
}

/// Runs stages on a thread of its own, which keeps [`Warm`] between tasks (an open cube is
/// tied to the thread that uses it: cfitsio handles are not `Send`).
#[derive(Default)]
pub struct StageRunner {
    jobs: Option<std::sync::mpsc::Sender<Job>>,
}

struct Job {
    work: AstroFitWork,
    inputs: StageInputs,
    out: PathBuf,
    progress: ProgressBar,
    reply: tokio::sync::oneshot::Sender<Result<StageOutput, StageError>>,
}

impl StageRunner {
    /// Runs one stage on the runner's thread (started on first use); a fit advances
    /// `progress` per spectrum.
    pub async fn run(
        &mut self,
        work: AstroFitWork,
        inputs: StageInputs,
        out: PathBuf,
        progress: ProgressBar,
    ) -> Result<StageOutput, StageError> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let job = Job {
            work,
            inputs,
            out,
            progress,
            reply,
        };
        let jobs = self.jobs.get_or_insert_with(|| {
            let (tx, rx) = std::sync::mpsc::channel::<Job>();
            std::thread::spawn(move || {
                let mut warm: Option<Warm> = None;
                for job in rx {
                    let outcome =
                        run_stage(&job.work, &job.inputs, &job.out, &mut warm, &job.progress);
                    let _ = job.reply.send(outcome);
                }
            });
            tx
        });
        if let Err(std::sync::mpsc::SendError(job)) = jobs.send(job) {
            // The thread is gone (a stage panicked): start a new one for the next task.
            self.jobs = None;
            drop(job);
            return Err(StageError::transient("the stage runner stopped"));
        }
        match answer.await {
            Ok(outcome) => outcome,
            Err(_) => {
                self.jobs = None;
                Err(StageError::transient("the stage panicked"))
            }
        }
    }
}

/// Kept between tasks: everything costly that depends only on the plan and the inputs.
pub struct Warm {
    key: String,
    plan: CubePlan,
    cube: Cube,
    fitter: ChunkFitter,
    pool: rayon::ThreadPool,
}

/// What a fit task reports.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ChunkReport {
    pub chunk: usize,
    pub spectra: usize,
    pub failed: usize,
    pub evaluations_per_fit: f64,
    /// Whether the cube, templates and thread pool were already set up by an earlier task.
    pub warm: bool,
    /// Opening the cube and preparing the templates (0 when warm).
    pub setup_seconds: f64,
    pub read_seconds: f64,
    pub fit_seconds: f64,
}

fn load_plan(path: &Path) -> Result<CubePlan, StageError> {
    let bytes = std::fs::read(path).map_err(StageError::transient)?;
    serde_json::from_slice(&bytes)
        .map_err(|e| StageError::permanent(format!("plan.json is unreadable: {e}")))
}

fn open_cube(path: &Path) -> Result<Cube, StageError> {
    Cube::open(path).map_err(|e| StageError::permanent(format!("the cube: {e}")))
}

fn load_templates(dir: &Path) -> Result<TemplateLibrary, StageError> {
    TemplateLibrary::load(dir).map_err(|e| StageError::permanent(format!("the templates: {e}")))
}

/// Runs `work`'s stage with `inputs`, writing into `out`. Blocking: call it off the async
/// workers.
fn run_stage(
    work: &AstroFitWork,
    inputs: &StageInputs,
    out: &Path,
    warm: &mut Option<Warm>,
    progress: &ProgressBar,
) -> Result<StageOutput, StageError> {
    match work.stage {
        Stage::Prepare => prepare(work, inputs, out),
        Stage::Fit => fit(work, inputs, out, warm, progress),
        Stage::Assemble => assemble(work, inputs, out),
    }
}

fn prepare(
    work: &AstroFitWork,
    inputs: &StageInputs,
    out: &Path,
) -> Result<StageOutput, StageError> {
    let options = work.parameters.options(
        inputs.cube.clone(),
        inputs.templates.clone(),
        out.to_path_buf(),
    );
    let mut cube = open_cube(&inputs.cube)?;
    let lib = load_templates(&inputs.templates)?;
    let prepared = cubefit::prepare_plan(&options, &mut cube, &lib)
        .map_err(|e| StageError::permanent(format!("prepare: {e}")))?;
    let plan = prepared.plan;
    cubefit::write_plan(out, &plan).map_err(StageError::transient)?;
    let templates = if options.global_templates_only {
        plan.global.templates.len()
    } else {
        lib.names.len()
    };
    let report = PrepareReport {
        pixels: cube.meta().nwave() as u64,
        templates: templates as u64,
        bins: plan.bins.len() as u64,
        chunks: plan.chunks.len() as u64,
    };
    Ok(StageOutput {
        files: vec![(PLAN_FILE.into(), out.join(PLAN_FILE))],
        result: serde_json::to_value(report).unwrap_or_default(),
    })
}

fn fit(
    work: &AstroFitWork,
    inputs: &StageInputs,
    out: &Path,
    warm: &mut Option<Warm>,
    progress: &ProgressBar,
) -> Result<StageOutput, StageError> {
    let (Some(plan_path), Some(chunk_id), Some(plan_ref)) = (&inputs.plan, work.chunk, &work.plan)
    else {
        return Err(StageError::permanent("a fit task needs a plan and a chunk"));
    };
    let key = format!(
        "{}/{}/{}/{}",
        plan_ref.sha256,
        work.cube.sha256,
        work.templates
            .as_ref()
            .map_or("bundled", |t| t.sha256.as_str()),
        work.threads
    );
    let was_warm = warm.as_ref().is_some_and(|w| w.key == key);
    let setup = Instant::now();
    if !was_warm {
        *warm = None;
        let plan = load_plan(plan_path)?;
        let cube = open_cube(&inputs.cube)?;
        let lib = load_templates(&inputs.templates)?;
        let fitter = ChunkFitter::new(&plan, cube.meta(), lib)
            .map_err(|e| StageError::permanent(format!("setting up the fit: {e}")))?;
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(work.threads.max(1))
            .build()
            .map_err(StageError::transient)?;
        *warm = Some(Warm {
            key,
            plan,
            cube,
            fitter,
            pool,
        });
    }
    let Some(w) = warm.as_mut() else {
        return Err(StageError::transient("no fitter"));
    };
    let chunk = w
        .plan
        .chunks
        .iter()
        .find(|c| c.id == chunk_id)
        .cloned()
        .ok_or_else(|| StageError::permanent(format!("the plan has no chunk {chunk_id}")))?;
    let setup_seconds = setup.elapsed().as_secs_f64();
    let t = Instant::now();
    let spectra = w
        .fitter
        .read_spectra(&mut w.cube, &chunk)
        .map_err(|e| StageError::permanent(format!("reading chunk {chunk_id}: {e}")))?;
    let read_seconds = t.elapsed().as_secs_f64();
    let t = Instant::now();
    progress.set_length(spectra.len() as u64);
    let fitted = w.fitter.fit_chunk(&chunk, &spectra, &w.pool, progress);
    let fit_seconds = t.elapsed().as_secs_f64();
    fitted.write(out).map_err(StageError::transient)?;
    let (json, model) = cubefit::chunk_files(chunk_id);
    let failed = fitted
        .result
        .results
        .iter()
        .filter(|r| r.failure.is_some())
        .count();
    let report = ChunkReport {
        chunk: chunk_id,
        spectra: chunk.nspectra,
        failed,
        evaluations_per_fit: fitted.evaluations as f64 / fitted.fitted_ok.max(1) as f64,
        warm: was_warm,
        setup_seconds,
        read_seconds,
        fit_seconds,
    };
    Ok(StageOutput {
        files: vec![
            (json.clone(), out.join(&json)),
            (model.clone(), out.join(&model)),
        ],
        result: serde_json::to_value(report).unwrap_or_default(),
    })
}

/// `summary.json` of an application's maps.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AssembleSummary {
    pub cube: String,
    pub nx: usize,
    pub ny: usize,
    pub nwave: usize,
    pub redshift: f64,
    pub bins: usize,
    pub chunks: usize,
    pub failed_bins: usize,
    pub global_v: f64,
    pub global_sigma: f64,
    pub median_velocity_error: f64,
    pub median_sigma_error: f64,
    /// Smallest and largest fitted V and sigma, km/s.
    pub velocity_range: [f64; 2],
    pub sigma_range: [f64; 2],
    /// Median chi2 per degree of freedom of the fitted bins.
    pub median_chi2: f64,
}

fn range(values: impl Iterator<Item = f64>) -> [f64; 2] {
    values
        .filter(|v| v.is_finite())
        .fold([f64::NAN, f64::NAN], |[lo, hi], v| [lo.min(v), hi.max(v)])
}

fn median(mut values: Vec<f64>) -> f64 {
    values.retain(|v| v.is_finite());
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(f64::NAN)
}

fn assemble(
    work: &AstroFitWork,
    inputs: &StageInputs,
    out: &Path,
) -> Result<StageOutput, StageError> {
    let Some(plan_path) = &inputs.plan else {
        return Err(StageError::permanent("an assemble task needs a plan"));
    };
    let plan = load_plan(plan_path)?;
    std::fs::create_dir_all(out.join("chunks")).map_err(StageError::transient)?;
    for (name, path) in &inputs.chunks {
        let target = out.join(name);
        if std::fs::hard_link(path, &target).is_err() {
            std::fs::copy(path, &target).map_err(StageError::transient)?;
        }
    }
    cubefit::write_plan(out, &plan).map_err(StageError::transient)?;
    let cube = open_cube(&inputs.cube)?;
    let meta: &CubeMeta = cube.meta();
    let model_cube = !work.parameters.no_model_cube;
    // The maps name the Datasets they came from, not the worker's cache files.
    let provenance = cubefit::Provenance {
        input: work.cube.name.clone(),
        templates: work.templates.as_ref().map_or_else(
            || "emiles-compact (bundled)".to_string(),
            |t| t.name.clone(),
        ),
    };
    let stats = cubefit::assemble_with(out, meta, &plan, model_cube, &provenance)
        .map_err(|e| StageError::permanent(format!("assemble: {e}")))?;
    if stats.chunks_missing > 0 {
        // Never publish maps with holes: the controller hands over every chunk's files.
        return Err(StageError::permanent(format!(
            "assemble: {} of {} chunks have no result files",
            stats.chunks_missing,
            plan.chunks.len()
        )));
    }
    let results = cubefit::collect_results(out, &plan)
        .map_err(|e| StageError::permanent(format!("assemble: {e}")))?;
    let fitted: Vec<_> = results
        .iter()
        .flatten()
        .filter(|r| r.failure.is_none())
        .collect();
    let summary = AssembleSummary {
        cube: work.cube.name.clone(),
        nx: meta.nx,
        ny: meta.ny,
        nwave: meta.nwave(),
        redshift: plan.redshift,
        bins: plan.bins.len(),
        chunks: plan.chunks.len(),
        failed_bins: stats.failed,
        global_v: plan.global.v,
        global_sigma: plan.global.sigma,
        median_velocity_error: stats.median_v_err,
        median_sigma_error: stats.median_sigma_err,
        velocity_range: range(fitted.iter().map(|r| r.velocity.value)),
        sigma_range: range(fitted.iter().map(|r| r.sigma.value)),
        median_chi2: median(fitted.iter().map(|r| r.chi2).collect()),
    };
    let summary_path = out.join("summary.json");
    std::fs::write(
        &summary_path,
        serde_json::to_vec_pretty(&summary).unwrap_or_default(),
    )
    .map_err(StageError::transient)?;
    let mut files = vec![("maps.fits".to_string(), out.join("maps.fits"))];
    if model_cube {
        files.push(("model.fits".into(), out.join("model.fits")));
    }
    files.push(("maps.png".into(), out.join("maps.png")));
    for (name, _) in cubefit::OPTIONAL_OUTPUTS {
        if out.join(name).is_file() {
            files.push((name.into(), out.join(name)));
        }
    }
    files.push(("summary.json".into(), summary_path));
    Ok(StageOutput {
        files,
        result: serde_json::to_value(&summary).unwrap_or_default(),
    })
}

// ---- a stage in a container --------------------------------------------------------------------

/// What `ceccm stage-run` inside a container is given: the work and where its inputs are.
#[derive(Debug, Serialize, Deserialize)]
pub struct StageJob {
    pub work: AstroFitWork,
    pub cube: PathBuf,
    pub templates: PathBuf,
    pub plan: Option<PathBuf>,
    pub chunks: Vec<(String, PathBuf)>,
}

/// What it leaves in its output directory: the files it made (name, file in the directory)
/// and the result, or why it failed.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
enum StageOutcome {
    Done {
        files: Vec<(String, String)>,
        result: serde_json::Value,
    },
    Failed {
        message: String,
        permanent: bool,
    },
}

const OUTCOME_FILE: &str = "stage-outcome.json";

/// Links the inputs into `dir` (bound read-only at `/in`; the templates at `/templates`) and
/// writes the job there; answers the job's path inside the container.
pub fn container_job(
    work: &AstroFitWork,
    inputs: &StageInputs,
    dir: &Path,
) -> std::io::Result<String> {
    std::fs::create_dir_all(dir.join("chunks"))?;
    let link = |source: &Path, name: &str| -> std::io::Result<PathBuf> {
        let target = dir.join(name);
        if std::fs::hard_link(source, &target).is_err() {
            std::fs::copy(source, &target)?;
        }
        Ok(Path::new("/in").join(name))
    };
    let job = StageJob {
        work: work.clone(),
        cube: link(&inputs.cube, "cube")?,
        templates: PathBuf::from("/templates"),
        plan: inputs
            .plan
            .as_deref()
            .map(|p| link(p, "plan.json"))
            .transpose()?,
        chunks: inputs
            .chunks
            .iter()
            .enumerate()
            .map(|(i, (name, path))| Ok((name.clone(), link(path, &format!("chunks/{i}"))?)))
            .collect::<std::io::Result<_>>()?,
    };
    std::fs::write(
        dir.join("job.json"),
        serde_json::to_vec(&job).map_err(std::io::Error::other)?,
    )?;
    Ok("/in/job.json".into())
}

/// `ceccm stage-run`: runs the job's stage and leaves its outcome in `out`. Fails only when
/// the job cannot be read or the outcome not written.
pub fn run_job(job: &Path, out: &Path) -> anyhow::Result<()> {
    let job: StageJob = serde_json::from_slice(&std::fs::read(job)?)?;
    let inputs = StageInputs {
        cube: job.cube,
        templates: job.templates,
        plan: job.plan,
        chunks: job.chunks,
    };
    // Inside a container the worker follows stderr: the fit's progress goes there.
    let progress = ProgressBar::hidden();
    let narrator = super::live::narrate(progress.clone(), std::io::stderr());
    let outcome = run_stage(&job.work, &inputs, out, &mut None, &progress);
    narrator.stop();
    let outcome = match outcome {
        Ok(output) => StageOutcome::Done {
            files: output
                .files
                .iter()
                .map(|(name, path)| {
                    let file = path.strip_prefix(out).unwrap_or(path);
                    (name.clone(), file.display().to_string())
                })
                .collect(),
            result: output.result,
        },
        Err(e) => StageOutcome::Failed {
            message: e.message,
            permanent: e.permanent,
        },
    };
    std::fs::write(out.join(OUTCOME_FILE), serde_json::to_vec(&outcome)?)?;
    Ok(())
}

/// What the stage in the container left in `out` (on the host): its output, or `(message,
/// permanent)`.
pub fn container_outcome(out: &Path) -> Result<StageOutput, (String, bool)> {
    let outcome: StageOutcome = std::fs::read(out.join(OUTCOME_FILE))
        .map_err(|e| e.to_string())
        .and_then(|bytes| serde_json::from_slice(&bytes).map_err(|e| e.to_string()))
        .map_err(|e| (format!("the stage left no outcome ({e})"), false))?;
    match outcome {
        StageOutcome::Done { files, result } => {
            let mut made = Vec::with_capacity(files.len());
            for (name, file) in files {
                let path = out.join(&file);
                // Only files inside `out` travel on.
                if file.contains("..") || !path.starts_with(out) || !path.is_file() {
                    return Err((
                        format!("the stage reported a file it did not make: {file}"),
                        false,
                    ));
                }
                made.push((name, path));
            }
            Ok(StageOutput {
                files: made,
                result,
            })
        }
        StageOutcome::Failed { message, permanent } => Err((message, permanent)),
    }
}

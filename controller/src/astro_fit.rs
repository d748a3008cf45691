//! The `astro-fit` application on the control plane: its parameters (fit-cube's options in
//! camelCase), the typed work a task carries to a worker, and the pure decision of which stage
//! comes next.
//!
//! An astro-fit application runs in three stages, planned the way `astro-fit fit-cube` plans:
//! `prepare` (one task, near the cube: S/N, footprint, binning, global fit; uploads `plan.json`),
//! `fit` (one task per chunk of the plan; uploads each chunk's result files) and `assemble`
//! (one task: MAPS, model cube, PNG maps, summary). The controller never reads the cube's
//! pixels: it reads the plan's chunk list and hands every task its inputs as content
//! references (dataset name or artifact name, sha256, size) that workers fetch, cache and
//! verify.

use std::path::PathBuf;

use astro_fit::cubefit::CubeFitOptions;
use astro_fit::plan::ChunkLimits;
use ceccm_federation::Violation;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

use crate::resources::TaskState;

/// Dataset formats the astro-fit planner accepts for its inputs.
pub const CUBE_FORMAT: &str = "cube";
pub const TEMPLATES_FORMAT: &str = "templates";

/// Spectra per chunk when the application does not say (fit-cube's default too, so that the
/// same parameters give the same chunks and therefore the same maps either way).
pub const DEFAULT_CHUNK_SPECTRA: usize = 64;

/// `spec.parameters` of an astro-fit application: `astro-fit fit-cube`'s options in camelCase.
/// Absent fields take fit-cube's defaults.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AstroFitParameters {
    /// A Dataset of `spec.format: templates` (a tar of 1-D FITS templates); absent: the compact
    /// E-MILES library bundled with astro-fit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub templates: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub moments: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub degree: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mdegree: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lam_range: Option<[f64; 2]>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub emission_mask_kms: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_sn: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_sn: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redshift: Option<f64>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub populations: bool,
    /// pPXF's `regul` over the age x [M/H] grid (implies `populations`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 0, maximum = 1_000_000)]
    pub regul: Option<f64>,
    /// Fit the stars' attenuation A_V (Calzetti 2000) from this start, magnitudes (not with
    /// `mdegree`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 0, maximum = 10)]
    pub reddening: Option<f64>,
    /// Residual-bootstrap realisations for errors on ages and [M/H] (implies `populations`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 0, maximum = 1000)]
    pub bootstrap: Option<usize>,
    /// Fit the gas emission lines with the stars (MAPS gain EMLINE_G*, `emission.png`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub gas: bool,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub global_templates_only: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chunk_spectra: Option<usize>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub no_model_cube: bool,
}

const PARAMETER_FIELDS: &[&str] = &[
    "templates",
    "moments",
    "degree",
    "mdegree",
    "lamRange",
    "emissionMaskKms",
    "targetSn",
    "minSn",
    "redshift",
    "populations",
    "regul",
    "reddening",
    "bootstrap",
    "gas",
    "globalTemplatesOnly",
    "chunkSpectra",
    "noModelCube",
];

impl AstroFitParameters {
    /// Parses `spec.parameters`, one field at a time so that every violation names its field
    /// (`spec.parameters.moments`), then checks the values' ranges.
    pub fn parse(parameters: Option<&Value>) -> Result<Self, Vec<Violation>> {
        let Some(parameters) = parameters else {
            return Ok(Self::default());
        };
        let Some(fields) = parameters.as_object() else {
            return Err(vec![Violation::new("spec.parameters", "must be an object")]);
        };
        let mut violations = Vec::new();
        for (key, value) in fields {
            if !PARAMETER_FIELDS.contains(&key.as_str()) {
                violations.push(Violation::new(
                    format!("spec.parameters.{key}"),
                    format!(
                        "unknown astro-fit parameter (known: {})",
                        PARAMETER_FIELDS.join(", ")
                    ),
                ));
                continue;
            }
            let single = serde_json::json!({ key.as_str(): value });
            if let Err(e) = serde_json::from_value::<AstroFitParameters>(single) {
                let message = e.to_string();
                let message = message.split(" at line").next().unwrap_or(&message);
                violations.push(Violation::new(format!("spec.parameters.{key}"), message));
            }
        }
        if !violations.is_empty() {
            return Err(violations);
        }
        let parsed: AstroFitParameters = serde_json::from_value(parameters.clone())
            .map_err(|e| vec![Violation::new("spec.parameters", e.to_string())])?;
        let ranges = parsed.range_violations();
        if ranges.is_empty() {
            Ok(parsed)
        } else {
            Err(ranges)
        }
    }

    fn range_violations(&self) -> Vec<Violation> {
        let mut out = Vec::new();
        let mut bad = |field: &str, message: &str| {
            out.push(Violation::new(format!("spec.parameters.{field}"), message))
        };
        if let Some(m) = self.moments
            && ![2, 4, 6].contains(&m)
        {
            bad("moments", "must be 2, 4 or 6");
        }
        if self.degree.is_some_and(|d| d > 30) {
            bad(
                "degree",
                "must be at most 30 (negative: no additive polynomial)",
            );
        }
        if self.mdegree.is_some_and(|d| d > 30) {
            bad("mdegree", "must be 0 to 30");
        }
        if let Some([lo, hi]) = self.lam_range
            && !(lo.is_finite() && hi.is_finite() && lo > 0.0 && lo < hi)
        {
            bad(
                "lamRange",
                "must be [min, max] in Angstrom with 0 < min < max",
            );
        }
        let positive = |v: Option<f64>| v.is_none_or(|v| v.is_finite() && v > 0.0);
        let non_negative = |v: Option<f64>| v.is_none_or(|v| v.is_finite() && v >= 0.0);
        if !non_negative(self.emission_mask_kms) {
            bad("emissionMaskKms", "must be a finite number >= 0");
        }
        if !positive(self.target_sn) {
            bad("targetSn", "must be a finite number > 0");
        }
        if !non_negative(self.min_sn) {
            bad("minSn", "must be a finite number >= 0");
        }
        if self
            .redshift
            .is_some_and(|z| !(z.is_finite() && z > -0.01 && z < 10.0))
        {
            bad("redshift", "must be between -0.01 and 10");
        }
        if self
            .regul
            .is_some_and(|r| !(r.is_finite() && (0.0..=1e6).contains(&r)))
        {
            bad("regul", "must be a number from 0 to 1000000");
        }
        if self
            .reddening
            .is_some_and(|a| !(a.is_finite() && (0.0..=10.0).contains(&a)))
        {
            bad("reddening", "must be A_V from 0 to 10 magnitudes");
        }
        if self.reddening.is_some() && self.mdegree.is_some_and(|d| d > 0) {
            // As pPXF: the attenuation curve takes the multiplicative polynomial's place.
            bad(
                "reddening",
                "cannot be fitted with a multiplicative polynomial (mdegree > 0)",
            );
        }
        if self.bootstrap.is_some_and(|n| n > 1000) {
            bad("bootstrap", "must be 0 to 1000");
        }
        if self
            .chunk_spectra
            .is_some_and(|n| !(1..=100_000).contains(&n))
        {
            bad("chunkSpectra", "must be 1 to 100000");
        }
        if let Some(t) = &self.templates
            && crate::resources::validate_name(t).is_err()
        {
            bad("templates", "is not a valid dataset name");
        }
        out
    }

    /// fit-cube's options for these parameters, with the worker's local copies of the inputs.
    pub fn options(&self, cube: PathBuf, templates: PathBuf, out: PathBuf) -> CubeFitOptions {
        let mut o = CubeFitOptions::new(cube, templates, out);
        o.target_sn = self.target_sn;
        o.moments = self.moments.unwrap_or(o.moments);
        o.degree = self.degree.unwrap_or(o.degree);
        o.mdegree = self.mdegree.unwrap_or(o.mdegree);
        o.populations = self.populations;
        o.regul = self.regul.unwrap_or(o.regul);
        o.reddening = self.reddening;
        o.bootstrap = self.bootstrap.unwrap_or(o.bootstrap);
        o.gas = self.gas;
        o.global_templates_only = self.global_templates_only;
        o.redshift = self.redshift;
        o.lam_range = self.lam_range.map_or(o.lam_range, |[lo, hi]| (lo, hi));
        o.min_sn = self.min_sn.unwrap_or(o.min_sn);
        o.emission_mask_kms = self.emission_mask_kms.unwrap_or(o.emission_mask_kms);
        o.chunk = ChunkLimits {
            max_spectra: self.chunk_spectra.unwrap_or(DEFAULT_CHUNK_SPECTRA),
            ..o.chunk
        };
        o.model_cube = !self.no_model_cube;
        o
    }
}

/// A piece of content a task needs or made: a dataset's content (by dataset name) or an
/// artifact (by file name), pinned by its sha256.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ContentRef {
    #[schema(
        max_length = 255,
        pattern = "^[A-Za-z0-9_-][A-Za-z0-9._-]*(/[A-Za-z0-9_-][A-Za-z0-9._-]*)*$"
    )]
    pub name: String,
    #[schema(pattern = "^[0-9a-f]{64}$")]
    pub sha256: String,
    pub size: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Stage {
    Prepare,
    Fit,
    Assemble,
}

impl Stage {
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Prepare => "prepare",
            Stage::Fit => "fit",
            Stage::Assemble => "assemble",
        }
    }
}

/// What an astro-fit task does, in its `spec.astroFit`: everything the worker needs, pinned.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AstroFitWork {
    pub stage: Stage,
    /// The cube dataset's content.
    pub cube: ContentRef,
    /// The templates dataset's content; absent: the library bundled with astro-fit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub templates: Option<ContentRef>,
    pub parameters: AstroFitParameters,
    /// Threads the fit may use (the application's cores per task).
    pub threads: usize,
    /// `plan.json`, made by the prepare task (fit and assemble stages).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan: Option<ContentRef>,
    /// The chunk of the plan this task fits (fit stage).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chunk: Option<usize>,
    /// Every chunk's result files (assemble stage).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub chunks: Vec<ContentRef>,
}

/// What the prepare task reports with its completion, besides `plan.json`: the facts about
/// one chunk's work the predictor prices (the controller never opens the cube).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct PrepareReport {
    /// Wavelength pixels of the fit grid.
    pub pixels: u64,
    /// Templates each bin is fitted with.
    pub templates: u64,
    pub bins: u64,
    pub chunks: u64,
}

/// The file the prepare task uploads.
pub const PLAN_FILE: &str = "plan.json";

/// One task of an astro-fit application as the stage decision sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct StageTask {
    pub name: String,
    pub stage: Stage,
    pub state: TaskState,
    pub artifacts: Vec<ContentRef>,
    pub error: Option<String>,
}

/// What the application needs next.
#[derive(Debug, Clone, PartialEq)]
pub enum NextStage {
    /// Nothing to create: tasks are queued or running.
    Wait,
    /// The plan is made: create the chunk tasks (those that exist are kept).
    ExpandChunks { plan: ContentRef },
    /// Every chunk is fitted: create the assemble task.
    Assemble {
        plan: ContentRef,
        chunks: Vec<ContentRef>,
    },
    /// The outputs are written.
    Succeed { results: Vec<ContentRef> },
    /// A task used its last attempt, or a finished task lacks what it should have made.
    Fail { reason: String, message: String },
}

/// Per-stage counts, for `status.stages`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct StageStatus {
    pub name: String,
    pub done: u32,
    pub total: u32,
}

/// Which stage comes next, from the application's tasks and the number of chunks its plan has
/// (`None` until the plan is known). Pure: the reconciler gathers and applies.
pub fn next_stage(tasks: &[StageTask], planned_chunks: Option<usize>) -> NextStage {
    if let Some(dead) = tasks.iter().find(|t| t.state == TaskState::DeadLettered) {
        return NextStage::Fail {
            reason: "TaskDeadLettered".into(),
            message: format!(
                "{} stage task {} failed on its last attempt: {}",
                dead.stage.as_str(),
                dead.name,
                dead.error.as_deref().unwrap_or("no error reported")
            ),
        };
    }
    let done = |t: &&StageTask| t.state == TaskState::Done;
    let Some(prepare) = tasks.iter().find(|t| t.stage == Stage::Prepare) else {
        return NextStage::Wait;
    };
    if prepare.state != TaskState::Done {
        return NextStage::Wait;
    }
    let Some(plan) = prepare.artifacts.iter().find(|a| a.name == PLAN_FILE) else {
        return NextStage::Fail {
            reason: "PlanMissing".into(),
            message: format!("prepare task {} finished without {PLAN_FILE}", prepare.name),
        };
    };
    let fits: Vec<&StageTask> = tasks.iter().filter(|t| t.stage == Stage::Fit).collect();
    match planned_chunks {
        Some(n) if fits.len() >= n => {}
        _ => {
            return NextStage::ExpandChunks { plan: plan.clone() };
        }
    }
    if !fits.iter().all(done) {
        return NextStage::Wait;
    }
    match tasks.iter().find(|t| t.stage == Stage::Assemble) {
        None => {
            let mut chunks: Vec<ContentRef> = fits
                .iter()
                .flat_map(|t| t.artifacts.iter().cloned())
                .collect();
            chunks.sort_by(|a, b| a.name.cmp(&b.name));
            NextStage::Assemble {
                plan: plan.clone(),
                chunks,
            }
        }
        Some(assemble) if assemble.state == TaskState::Done => NextStage::Succeed {
            results: assemble.artifacts.clone(),
        },
        Some(_) => NextStage::Wait,
    }
}

/// Counts per stage, in stage order; the fit stage's total is the plan's chunk count once known.
pub fn stage_counts(tasks: &[StageTask], planned_chunks: Option<usize>) -> Vec<StageStatus> {
    [Stage::Prepare, Stage::Fit, Stage::Assemble]
        .into_iter()
        .map(|stage| {
            let of_stage = tasks.iter().filter(|t| t.stage == stage);
            let done = of_stage
                .clone()
                .filter(|t| t.state == TaskState::Done)
                .count() as u32;
            let total = match stage {
                Stage::Fit => planned_chunks.map_or(0, |n| n as u32),
                _ => 1,
            };
            StageStatus {
                name: stage.as_str().into(),
                done,
                total,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn content(name: &str) -> ContentRef {
        ContentRef {
            name: name.into(),
            sha256: format!("{:0>64}", name.len()),
            size: 1,
        }
    }

    fn task(name: &str, stage: Stage, state: TaskState, artifacts: &[&str]) -> StageTask {
        StageTask {
            name: name.into(),
            stage,
            state,
            artifacts: artifacts.iter().map(|a| content(a)).collect(),
            error: None,
        }
    }

    #[test]
    fn parameters_name_the_field_that_is_wrong() {
        let ok = AstroFitParameters::parse(Some(&json!({"moments": 4, "lamRange": [3700, 7000],
            "chunkSpectra": 100, "templates": "emiles"})))
        .unwrap();
        assert_eq!(ok.moments, Some(4));
        let o = ok.options("c".into(), "t".into(), "o".into());
        assert_eq!(
            (o.moments, o.lam_range, o.chunk.max_spectra),
            (4, (3700.0, 7000.0), 100)
        );

        let fields = |v: Value| -> Vec<String> {
            AstroFitParameters::parse(Some(&v))
                .unwrap_err()
                .into_iter()
                .map(|v| v.field)
                .collect()
        };
        assert_eq!(fields(json!({"colour": 1})), ["spec.parameters.colour"]);
        assert_eq!(
            fields(json!({"moments": "four", "degree": 2})),
            ["spec.parameters.moments"]
        );
        assert_eq!(fields(json!({"moments": 3})), ["spec.parameters.moments"]);
        assert_eq!(
            fields(json!({"lamRange": [7000, 3000], "targetSn": -1})),
            ["spec.parameters.lamRange", "spec.parameters.targetSn"]
        );
        assert_eq!(fields(json!([1])), ["spec.parameters"]);
        // Defaults are fit-cube's.
        let d =
            AstroFitParameters::parse(None)
                .unwrap()
                .options("c".into(), "t".into(), "o".into());
        let fit_cube = CubeFitOptions::new("c".into(), "t".into(), "o".into());
        assert_eq!(d, fit_cube);
    }

    #[test]
    fn populations_dust_and_gas_parameters_reach_fit_cube() {
        let p = AstroFitParameters::parse(Some(&json!({"regul": 30, "reddening": 0.1,
            "bootstrap": 10, "gas": true, "degree": -1})))
        .unwrap();
        let o = p.options("c".into(), "t".into(), "o".into());
        assert_eq!(
            (o.regul, o.reddening, o.bootstrap, o.gas),
            (30.0, Some(0.1), 10, true)
        );
        // Regularisation and the bootstrap are about populations: they imply them.
        assert!(o.fits_populations());
        let fields = |v: Value| -> Vec<String> {
            AstroFitParameters::parse(Some(&v))
                .unwrap_err()
                .into_iter()
                .map(|v| v.field)
                .collect()
        };
        assert_eq!(
            fields(json!({"regul": -1, "reddening": 11, "bootstrap": 5000})),
            [
                "spec.parameters.regul",
                "spec.parameters.reddening",
                "spec.parameters.bootstrap"
            ]
        );
        assert_eq!(
            fields(json!({"reddening": 0.2, "mdegree": 8})),
            ["spec.parameters.reddening"]
        );
        assert_eq!(fields(json!({"gas": "yes"})), ["spec.parameters.gas"]);
    }

    #[test]
    fn stages_follow_each_other() {
        use TaskState::*;
        let prepare_running = [task("a-00000", Stage::Prepare, Leased, &[])];
        assert_eq!(next_stage(&prepare_running, None), NextStage::Wait);
        assert_eq!(next_stage(&[], None), NextStage::Wait);

        let prepared = task("a-00000", Stage::Prepare, Done, &[PLAN_FILE]);
        assert_eq!(
            next_stage(std::slice::from_ref(&prepared), None),
            NextStage::ExpandChunks {
                plan: content(PLAN_FILE)
            }
        );
        // A pass cut short after creating some chunk tasks expands again.
        let partial = [prepared.clone(), task("a-00001", Stage::Fit, Queued, &[])];
        assert!(matches!(
            next_stage(&partial, Some(2)),
            NextStage::ExpandChunks { .. }
        ));
        let fitting = [
            prepared.clone(),
            task("a-00001", Stage::Fit, Done, &["chunks/chunk-00001.json"]),
            task("a-00002", Stage::Fit, Leased, &[]),
        ];
        assert_eq!(next_stage(&fitting, Some(2)), NextStage::Wait);
        let fitted = [
            prepared.clone(),
            task("a-00002", Stage::Fit, Done, &["chunks/chunk-00001.json"]),
            task("a-00001", Stage::Fit, Done, &["chunks/chunk-00000.json"]),
        ];
        let NextStage::Assemble { chunks, .. } = next_stage(&fitted, Some(2)) else {
            panic!("expected assemble");
        };
        assert_eq!(chunks[0].name, "chunks/chunk-00000.json", "sorted by name");
        let mut assembled = fitted.to_vec();
        assembled.push(task("a-00003", Stage::Assemble, Done, &["maps.fits"]));
        assert_eq!(
            next_stage(&assembled, Some(2)),
            NextStage::Succeed {
                results: vec![content("maps.fits")]
            }
        );
        let counts = stage_counts(&assembled, Some(2));
        assert_eq!(
            counts.iter().map(|s| (s.done, s.total)).collect::<Vec<_>>(),
            [(1, 1), (2, 2), (1, 1)]
        );
    }

    #[test]
    fn a_dead_task_or_a_missing_plan_fails_the_application() {
        use TaskState::*;
        let mut dead = task("a-00001", Stage::Fit, DeadLettered, &[]);
        dead.error = Some("cube unreadable".into());
        let tasks = [task("a-00000", Stage::Prepare, Done, &[PLAN_FILE]), dead];
        let NextStage::Fail { message, .. } = next_stage(&tasks, Some(1)) else {
            panic!("expected failure");
        };
        assert!(message.contains("a-00001") && message.contains("cube unreadable"));
        let no_plan = [task("a-00000", Stage::Prepare, Done, &[])];
        assert!(matches!(next_stage(&no_plan, None), NextStage::Fail { .. }));
    }
}

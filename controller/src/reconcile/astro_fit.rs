//! The astro-fit planner's I/O shell: gathers the application's datasets and tasks, asks
//! [`crate::astro_fit::next_stage`] what comes next, and turns the answer into an
//! [`ApplicationDecision`] with the `crate::lifecycle` builders (the stage's tasks, placed by
//! the scheduler; the results to publish; the failure with its cause), which
//! `application::apply` applies like any other.

use std::time::Duration;

use serde_json::Value;

use super::application::{apply, place};
use super::{Action, Context, ReconcileError};
use crate::astro_fit::{
    AstroFitParameters, AstroFitWork, CUBE_FORMAT, ContentRef, NextStage, PrepareReport, Stage,
    StageTask, TEMPLATES_FORMAT, next_stage, stage_counts,
};
use crate::lifecycle::{
    self, ApplicationDecision, ApplicationFacts, Event, NewTask, POLL, Publish, set_condition_at,
};
use crate::resources::{AppPhase, Kind, Progress, TaskObject, TaskSpec, TaskState, typed};

/// Label naming a task's stage.
pub const STAGE_LABEL: &str = "ceccm/stage";

/// Why a dataset cannot be used yet (`Wait`) or at all (`Fail`).
enum Input {
    Ready(ContentRef),
    Wait(String),
    Fail(String),
}

async fn dataset_content(
    ctx: &Context,
    name: &str,
    format: &str,
    field: &str,
) -> Result<Input, ReconcileError> {
    let Some(dataset) = ctx.store.get(Kind::Dataset, name).await? else {
        return Ok(Input::Fail(format!(
            "{field}: dataset {name:?} does not exist"
        )));
    };
    let declared = dataset["spec"]["format"].as_str().unwrap_or_default();
    if declared != format {
        return Ok(Input::Fail(format!(
            "{field}: dataset {name:?} has spec.format {declared:?}, not {format:?}"
        )));
    }
    let status = &dataset["status"];
    match (status["sha256"].as_str(), status["size"].as_u64()) {
        (Some(sha256), Some(size)) if status["phase"] == "Ready" => Ok(Input::Ready(ContentRef {
            name: name.to_string(),
            sha256: sha256.to_string(),
            size,
        })),
        _ => Ok(Input::Wait(format!(
            "dataset {name:?} has no content yet (upload it)"
        ))),
    }
}

fn threads(f: &ApplicationFacts) -> usize {
    (f.spec.resources.cpu.round() as usize).max(1)
}

/// The astro-fit planner takes the application's `Scheduling` or `Running` phase.
pub async fn reconcile(
    ctx: &Context,
    object: &Value,
    f: &ApplicationFacts<'_>,
    phase: AppPhase,
) -> Result<Action, ReconcileError> {
    let decision = match phase {
        AppPhase::Scheduling => start(ctx, f).await?,
        _ => follow(ctx, f).await?,
    };
    apply(ctx, object, f.name, decision).await
}

/// Scheduling: the inputs are pinned (by sha256) and the prepare task is placed near the cube.
async fn start(
    ctx: &Context,
    f: &ApplicationFacts<'_>,
) -> Result<ApplicationDecision, ReconcileError> {
    let parameters = match AstroFitParameters::parse(f.spec.parameters.as_ref()) {
        Ok(p) => p,
        Err(violations) => {
            let message = violations
                .iter()
                .map(|v| format!("{}: {}", v.field, v.message))
                .collect::<Vec<_>>()
                .join("; ");
            return Ok(lifecycle::fail(
                f.status,
                "InvalidParameters",
                &message,
                f.now,
            ));
        }
    };
    let cube_name = f
        .spec
        .inputs
        .first()
        .map(|i| i.dataset.clone())
        .unwrap_or_default();
    let mut inputs = vec![dataset_content(ctx, &cube_name, CUBE_FORMAT, "spec.inputs[0]").await?];
    if let Some(t) = &parameters.templates {
        inputs.push(dataset_content(ctx, t, TEMPLATES_FORMAT, "spec.parameters.templates").await?);
    }
    let mut status = f.status.clone();
    let mut refs = Vec::new();
    for input in inputs {
        match input {
            Input::Ready(r) => refs.push(r),
            Input::Fail(message) => {
                return Ok(lifecycle::fail(f.status, "InputUnusable", &message, f.now));
            }
            Input::Wait(message) => {
                set_condition_at(
                    &mut status.conditions,
                    "InputsReady",
                    false,
                    "WaitingForContent",
                    &message,
                    f.now,
                );
                return Ok(ApplicationDecision::update(
                    f.status,
                    status,
                    Action::Requeue(POLL),
                ));
            }
        }
    }
    let mut refs = refs.into_iter();
    let cube = refs.next().expect("the cube is the first input");
    let templates = refs.next();
    set_condition_at(
        &mut status.conditions,
        "InputsReady",
        true,
        "ContentPinned",
        &format!("cube {} (sha256 {:.12})", cube.name, cube.sha256),
        f.now,
    );
    let work = AstroFitWork {
        stage: Stage::Prepare,
        cube,
        templates,
        parameters,
        threads: threads(f),
        plan: None,
        chunk: None,
        chunks: vec![],
    };
    let placement = match place(ctx, f.spec, f.name, None, 1).await? {
        Ok(p) => p,
        Err(why) => return Ok(lifecycle::unschedulable(&status, &why, f.now)),
    };
    let region = placement.assignment[0].clone();
    status.stages = stage_counts(&[], None);
    status.progress = Progress {
        done: 0,
        failed: 0,
        total: 2,
    };
    let prepare = NewTask {
        spec: stage_task(f, 0, work, None),
        region: region.clone(),
        stage: Some(Stage::Prepare),
    };
    Ok(lifecycle::scheduled(
        f,
        status,
        &placement,
        vec![prepare],
        &format!("prepare task on {region}"),
    ))
}

fn stage_task(
    f: &ApplicationFacts,
    index: u32,
    work: AstroFitWork,
    features: Option<ceccm_scheduler::TaskFeatures>,
) -> TaskSpec {
    TaskSpec {
        application: f.name.into(),
        index,
        command: String::new(),
        args: vec![],
        env: Default::default(),
        cores: Some(work.threads as f64),
        astro_fit: Some(work),
        features,
        max_attempts: f.spec.max_attempts,
        image: f.spec.task_image(),
        memory_mib: f.spec.task_memory_mib(),
        active_deadline_seconds: f.spec.task_deadline_seconds,
    }
}

/// Running: the next stage, from the tasks.
async fn follow(
    ctx: &Context,
    f: &ApplicationFacts<'_>,
) -> Result<ApplicationDecision, ReconcileError> {
    let objects = ctx.store.tasks_of(f.name).await?;
    let mut tasks: Vec<TaskObject> = Vec::with_capacity(objects.len());
    for o in &objects {
        tasks.push(typed(o)?);
    }
    let views: Vec<StageTask> = tasks.iter().filter_map(stage_view).collect();
    let mut status = f.status.clone();
    // The chunk count is known once the Planned condition is written, after the chunk tasks.
    let planned = status
        .conditions
        .iter()
        .any(|c| c.condition_type == "Planned" && c.status == "True")
        .then(|| {
            status
                .stages
                .iter()
                .find(|s| s.name == Stage::Fit.as_str())
                .map_or(0, |s| s.total as usize)
        });
    status.energy_joules = tasks
        .iter()
        .filter_map(|t| t.status.as_ref())
        .map(|s| s.energy_joules)
        .sum();
    status.stages = stage_counts(&views, planned);
    let done = views.iter().filter(|t| t.state == TaskState::Done).count() as u32;
    let dead = views
        .iter()
        .filter(|t| t.state == TaskState::DeadLettered)
        .count() as u32;
    status.progress = Progress {
        done,
        failed: dead,
        total: 2 + planned.unwrap_or(0) as u32,
    };
    Ok(match next_stage(&views, planned) {
        NextStage::Wait => ApplicationDecision::update(f.status, status, Action::Requeue(POLL)),
        NextStage::Fail { reason, message } => lifecycle::fail(&status, &reason, &message, f.now),
        NextStage::ExpandChunks { plan } => expand_chunks(ctx, f, status, &tasks, plan).await?,
        NextStage::Assemble { plan, chunks } => {
            let Some(prepare) = prepare_work(&tasks) else {
                return Ok(lifecycle::fail(
                    &status,
                    "PlanMissing",
                    "no prepare task",
                    f.now,
                ));
            };
            let index = 1 + planned.unwrap_or(0) as u32;
            let work = AstroFitWork {
                stage: Stage::Assemble,
                plan: Some(plan),
                chunks,
                chunk: None,
                ..prepare
            };
            let placement = match place(ctx, f.spec, f.name, None, 1).await? {
                Ok(p) => p,
                Err(why) => return Ok(lifecycle::unschedulable(&status, &why, f.now)),
            };
            let region = placement.assignment[0].clone();
            let assemble = NewTask {
                spec: stage_task(f, index, work, None),
                region: region.clone(),
                stage: Some(Stage::Assemble),
            };
            ApplicationDecision {
                status: Some(status),
                events: vec![Event::normal(
                    "Assembling",
                    format!("every chunk fitted; assemble task on {region}"),
                )],
                ..ApplicationDecision::nothing(Action::Requeue(Duration::ZERO))
            }
            .with_tasks(vec![assemble])
        }
        NextStage::Succeed { results } => {
            let message = format!(
                "{} outputs written by {} tasks, {:.1} J",
                results.len(),
                done,
                status.energy_joules
            );
            lifecycle::succeed(
                f,
                status,
                ("Assembled", &message),
                &message,
                Publish::Artifacts(results),
            )
        }
    })
}

fn stage_view(task: &TaskObject) -> Option<StageTask> {
    let work = task.spec.astro_fit.as_ref()?;
    let status = task.status.as_ref();
    Some(StageTask {
        name: task.metadata.name.clone(),
        stage: work.stage,
        state: status.map_or(TaskState::Queued, |s| s.state),
        artifacts: status.map(|s| s.artifacts.clone()).unwrap_or_default(),
        error: status.and_then(|s| s.error.clone()),
    })
}

/// The prepare task's work: every later stage has the same inputs and parameters.
fn prepare_work(tasks: &[TaskObject]) -> Option<AstroFitWork> {
    tasks
        .iter()
        .filter_map(|t| t.spec.astro_fit.clone())
        .find(|w| w.stage == Stage::Prepare)
}

/// What the prepare task reported about the work of one spectrum.
fn prepare_report(tasks: &[TaskObject]) -> Option<PrepareReport> {
    tasks
        .iter()
        .filter(|t| t.spec.astro_fit.as_ref().map(|w| w.stage) == Some(Stage::Prepare))
        .find_map(|t| serde_json::from_value(t.status.as_ref()?.result.clone()?).ok())
}

/// The plan is made: one fit task per chunk, placed together, each with its own features.
async fn expand_chunks(
    ctx: &Context,
    f: &ApplicationFacts<'_>,
    mut status: crate::resources::ApplicationStatus,
    tasks: &[TaskObject],
    plan_ref: ContentRef,
) -> Result<ApplicationDecision, ReconcileError> {
    let path = crate::content::artifact_path(&ctx.data_dir, f.name, &plan_ref.sha256);
    let plan: astro_fit::cubefit::CubePlan = match tokio::fs::read(&path)
        .await
        .map_err(|e| e.to_string())
        .and_then(|bytes| serde_json::from_slice(&bytes).map_err(|e| e.to_string()))
    {
        Ok(plan) => plan,
        Err(e) => {
            let message = format!("the prepare task's plan.json is unreadable: {e}");
            return Ok(lifecycle::fail(&status, "PlanUnreadable", &message, f.now));
        }
    };
    let (Some(prepare), Some(report)) = (prepare_work(tasks), prepare_report(tasks)) else {
        return Ok(lifecycle::fail(
            &status,
            "PlanMissing",
            "the prepare task reported no plan facts",
            f.now,
        ));
    };
    let moments = plan.options.moments as u64;
    let features = |spectra: usize| ceccm_scheduler::TaskFeatures {
        spectra: spectra.max(1) as u64,
        pixels: report.pixels.max(1),
        templates: report.templates.max(1),
        moments,
    };
    let n = plan.chunks.len();
    let mean = plan.chunks.iter().map(|c| c.nspectra).sum::<usize>() / n.max(1);
    let mut fits = Vec::with_capacity(n);
    if n > 0 {
        let placement = match place(ctx, f.spec, f.name, Some(features(mean)), n).await? {
            Ok(p) => p,
            Err(why) => return Ok(lifecycle::unschedulable(&status, &why, f.now)),
        };
        for (chunk, region) in plan.chunks.iter().zip(&placement.assignment) {
            let work = AstroFitWork {
                stage: Stage::Fit,
                plan: Some(plan_ref.clone()),
                chunk: Some(chunk.id),
                chunks: vec![],
                ..prepare.clone()
            };
            fits.push(NewTask {
                spec: stage_task(f, 1 + chunk.id as u32, work, Some(features(chunk.nspectra))),
                region: region.clone(),
                stage: Some(Stage::Fit),
            });
        }
        status.placements = placement.placements;
        status.explanation = Some(placement.explanation);
    }
    if let Some(fit) = status
        .stages
        .iter_mut()
        .find(|s| s.name == Stage::Fit.as_str())
    {
        fit.total = n as u32;
    }
    status.progress.total = 2 + n as u32;
    set_condition_at(
        &mut status.conditions,
        "Planned",
        true,
        "ChunksPlanned",
        &format!(
            "{} bins in {n} chunks of up to {} spectra",
            plan.bins.len(),
            plan.options.chunk.max_spectra
        ),
        f.now,
    );
    let summary: Vec<String> = status
        .placements
        .iter()
        .map(|p| format!("{} chunks on {}", p.tasks, p.region))
        .collect();
    Ok(ApplicationDecision {
        status: Some(status),
        events: vec![Event::normal(
            "Planned",
            format!(
                "{} bins in {n} chunks: {}",
                plan.bins.len(),
                summary.join(", ")
            ),
        )],
        ..ApplicationDecision::nothing(Action::Requeue(Duration::ZERO))
    }
    .with_tasks(fits))
}

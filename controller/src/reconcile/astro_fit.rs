//! The astro-fit planner's I/O shell: gathers the application's datasets and tasks, asks
//! [`crate::astro_fit::next_stage`] what comes next, and applies it (creates the stage's tasks,
//! placed by the scheduler, publishes the results, or fails the application with the cause).

use std::time::Duration;

use serde_json::Value;

use super::application::{create_task, input_view, region_views, transition};
use super::{Action, Context, ReconcileError, set_condition};
use crate::astro_fit::{
    AstroFitParameters, AstroFitWork, CUBE_FORMAT, ContentRef, NextStage, PrepareReport, Stage,
    StageTask, TEMPLATES_FORMAT, next_stage, stage_counts,
};
use crate::objects::{self, EventType};
use crate::resources::{
    AppPhase, ApplicationObject, ApplicationStatus, Kind, Progress, TaskObject, TaskSpec,
    TaskState, typed,
};
use crate::scheduling;
use crate::store::Query;
use crate::time::now_rfc3339;

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

fn threads(app: &ApplicationObject) -> usize {
    (app.spec.resources.cpu.round() as usize).max(1)
}

/// Scheduling: the inputs are pinned (by sha256) and the prepare task is placed near the cube.
pub async fn start(
    ctx: &Context,
    object: &Value,
    app: &ApplicationObject,
    mut status: ApplicationStatus,
) -> Result<Action, ReconcileError> {
    let name = app.metadata.name.as_str();
    let parameters = match AstroFitParameters::parse(app.spec.parameters.as_ref()) {
        Ok(p) => p,
        Err(violations) => {
            let message = violations
                .iter()
                .map(|v| format!("{}: {}", v.field, v.message))
                .collect::<Vec<_>>()
                .join("; ");
            return fail(ctx, object, status, "InvalidParameters", &message).await;
        }
    };
    let cube_name = app
        .spec
        .inputs
        .first()
        .map(|i| i.dataset.clone())
        .unwrap_or_default();
    let mut inputs = vec![dataset_content(ctx, &cube_name, CUBE_FORMAT, "spec.inputs[0]").await?];
    if let Some(t) = &parameters.templates {
        inputs.push(dataset_content(ctx, t, TEMPLATES_FORMAT, "spec.parameters.templates").await?);
    }
    let mut refs = Vec::new();
    for input in inputs {
        match input {
            Input::Ready(r) => refs.push(r),
            Input::Fail(message) => {
                return fail(ctx, object, status, "InputUnusable", &message).await;
            }
            Input::Wait(message) => {
                let before = status.clone();
                set_condition(
                    &mut status.conditions,
                    "InputsReady",
                    false,
                    "WaitingForContent",
                    &message,
                );
                if status != before {
                    write_status(ctx, name, &status).await?;
                }
                return Ok(Action::Requeue(Duration::from_secs(2)));
            }
        }
    }
    let mut refs = refs.into_iter();
    let cube = refs.next().expect("the cube is the first input");
    let templates = refs.next();
    set_condition(
        &mut status.conditions,
        "InputsReady",
        true,
        "ContentPinned",
        &format!("cube {} (sha256 {:.12})", cube.name, cube.sha256),
    );
    let work = AstroFitWork {
        stage: Stage::Prepare,
        cube,
        templates,
        parameters,
        threads: threads(app),
        plan: None,
        chunk: None,
        chunks: vec![],
    };
    let Some(placement) = place(ctx, object, app, &mut status, None, 1).await? else {
        return Ok(Action::Requeue(Duration::from_secs(2)));
    };
    create_task(
        ctx,
        app,
        stage_task(app, 0, work, None),
        &placement.assignment[0],
        &[(STAGE_LABEL, Stage::Prepare.as_str())],
    )
    .await?;
    status.explanation = Some(placement.explanation.clone());
    status.stages = stage_counts(&[], None);
    status.progress = Progress {
        done: 0,
        failed: 0,
        total: 2,
    };
    status.start_time = Some(now_rfc3339());
    set_condition(
        &mut status.conditions,
        "Scheduled",
        true,
        "Scheduled",
        &placement.explanation,
    );
    let message = format!("prepare task on {}", placement.assignment[0]);
    transition(
        ctx,
        object,
        status,
        AppPhase::Running,
        "Scheduled",
        &message,
    )
    .await?;
    Ok(Action::Requeue(Duration::ZERO))
}

fn stage_task(
    app: &ApplicationObject,
    index: u32,
    work: AstroFitWork,
    features: Option<ceccm_scheduler::TaskFeatures>,
) -> TaskSpec {
    TaskSpec {
        application: app.metadata.name.clone(),
        index,
        command: String::new(),
        args: vec![],
        env: Default::default(),
        astro_fit: Some(work),
        features,
        max_attempts: app.spec.max_attempts,
    }
}

/// Places `tasks` tasks; `None` (with the Unschedulable condition written) when nothing fits.
async fn place(
    ctx: &Context,
    object: &Value,
    app: &ApplicationObject,
    status: &mut ApplicationStatus,
    features: Option<ceccm_scheduler::TaskFeatures>,
    tasks: usize,
) -> Result<Option<scheduling::Placement>, ReconcileError> {
    let regions = region_views(ctx).await?;
    let input = input_view(ctx, &app.spec).await?;
    let decided = {
        let predictor = ctx.predictor.read();
        scheduling::place(
            &app.metadata.name,
            &app.spec,
            features,
            tasks,
            &regions,
            &input,
            crate::time::now_millis(),
            &*predictor,
        )
    };
    match decided {
        Ok(p) => Ok(Some(p)),
        Err(unschedulable) => {
            let message = unschedulable.reasons.join("; ");
            let before = status.clone();
            set_condition(
                &mut status.conditions,
                "Scheduled",
                false,
                "Unschedulable",
                &message,
            );
            if *status != before {
                write_status(ctx, &app.metadata.name, status).await?;
                objects::record_event(
                    &ctx.store,
                    object,
                    EventType::Warning,
                    "Unschedulable",
                    &message,
                )
                .await?;
            }
            Ok(None)
        }
    }
}

async fn write_status(
    ctx: &Context,
    name: &str,
    status: &ApplicationStatus,
) -> Result<(), ReconcileError> {
    let value = serde_json::to_value(status).unwrap_or_default();
    objects::update_status(&ctx.store, Kind::Application, name, |s| *s = value).await?;
    Ok(())
}

async fn fail(
    ctx: &Context,
    object: &Value,
    mut status: ApplicationStatus,
    reason: &str,
    message: &str,
) -> Result<Action, ReconcileError> {
    status.completion_time = Some(now_rfc3339());
    set_condition(&mut status.conditions, "Complete", false, reason, message);
    transition(ctx, object, status, AppPhase::Failed, reason, message).await?;
    Ok(Action::AwaitChange)
}

/// Running: the next stage, from the tasks.
pub async fn follow(
    ctx: &Context,
    object: &Value,
    app: &ApplicationObject,
    mut status: ApplicationStatus,
) -> Result<Action, ReconcileError> {
    let name = app.metadata.name.as_str();
    let objects = ctx
        .store
        .list(
            Kind::Task,
            &Query {
                owner: Some(name),
                ..Default::default()
            },
        )
        .await?;
    let mut tasks: Vec<TaskObject> = Vec::with_capacity(objects.len());
    for o in &objects {
        tasks.push(typed(o)?);
    }
    let views: Vec<StageTask> = tasks.iter().filter_map(stage_view).collect();
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
    let before = status.clone();
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
    match next_stage(&views, planned) {
        NextStage::Wait => {
            if status != before {
                write_status(ctx, name, &status).await?;
            }
            Ok(Action::Requeue(Duration::from_secs(2)))
        }
        NextStage::Fail { reason, message } => fail(ctx, object, status, &reason, &message).await,
        NextStage::ExpandChunks { plan } => {
            expand_chunks(ctx, object, app, status, &tasks, plan).await
        }
        NextStage::Assemble { plan, chunks } => {
            let Some(prepare) = prepare_work(&tasks) else {
                return fail(ctx, object, status, "PlanMissing", "no prepare task").await;
            };
            let index = 1 + planned.unwrap_or(0) as u32;
            let work = AstroFitWork {
                stage: Stage::Assemble,
                plan: Some(plan),
                chunks,
                chunk: None,
                ..prepare
            };
            let Some(placement) = place(ctx, object, app, &mut status, None, 1).await? else {
                return Ok(Action::Requeue(Duration::from_secs(2)));
            };
            create_task(
                ctx,
                app,
                stage_task(app, index, work, None),
                &placement.assignment[0],
                &[(STAGE_LABEL, Stage::Assemble.as_str())],
            )
            .await?;
            write_status(ctx, name, &status).await?;
            objects::record_event(
                &ctx.store,
                object,
                EventType::Normal,
                "Assembling",
                &format!(
                    "every chunk fitted; assemble task on {}",
                    placement.assignment[0]
                ),
            )
            .await?;
            Ok(Action::Requeue(Duration::ZERO))
        }
        NextStage::Succeed { results } => {
            crate::content::publish_results(&ctx.data_dir, name, &results).await?;
            status.results = Some(format!("/api/v1/applications/{name}/results"));
            status.completion_time = Some(now_rfc3339());
            let message = format!(
                "{} outputs written by {} tasks, {:.1} J",
                results.len(),
                done,
                status.energy_joules
            );
            set_condition(
                &mut status.conditions,
                "Complete",
                true,
                "Assembled",
                &message,
            );
            transition(
                ctx,
                object,
                status,
                AppPhase::Succeeded,
                "Succeeded",
                &message,
            )
            .await?;
            Ok(Action::AwaitChange)
        }
    }
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
    object: &Value,
    app: &ApplicationObject,
    mut status: ApplicationStatus,
    tasks: &[TaskObject],
    plan_ref: ContentRef,
) -> Result<Action, ReconcileError> {
    let name = app.metadata.name.as_str();
    let path = crate::content::artifact_path(&ctx.data_dir, name, &plan_ref.sha256);
    let plan: astro_fit::cubefit::CubePlan = match tokio::fs::read(&path)
        .await
        .map_err(|e| e.to_string())
        .and_then(|bytes| serde_json::from_slice(&bytes).map_err(|e| e.to_string()))
    {
        Ok(plan) => plan,
        Err(e) => {
            let message = format!("the prepare task's plan.json is unreadable: {e}");
            return fail(ctx, object, status, "PlanUnreadable", &message).await;
        }
    };
    let (Some(prepare), Some(report)) = (prepare_work(tasks), prepare_report(tasks)) else {
        return fail(
            ctx,
            object,
            status,
            "PlanMissing",
            "the prepare task reported no plan facts",
        )
        .await;
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
    let placement = if n == 0 {
        None
    } else {
        match place(ctx, object, app, &mut status, Some(features(mean)), n).await? {
            Some(p) => Some(p),
            None => return Ok(Action::Requeue(Duration::from_secs(2))),
        }
    };
    if let Some(placement) = &placement {
        for (chunk, region) in plan.chunks.iter().zip(&placement.assignment) {
            let work = AstroFitWork {
                stage: Stage::Fit,
                plan: Some(plan_ref.clone()),
                chunk: Some(chunk.id),
                chunks: vec![],
                ..prepare.clone()
            };
            let spec = stage_task(
                app,
                1 + chunk.id as u32,
                work,
                Some(features(chunk.nspectra)),
            );
            create_task(
                ctx,
                app,
                spec,
                region,
                &[(STAGE_LABEL, Stage::Fit.as_str())],
            )
            .await?;
        }
        status.placements = placement.placements.clone();
        status.explanation = Some(placement.explanation.clone());
    }
    if let Some(fit) = status
        .stages
        .iter_mut()
        .find(|s| s.name == Stage::Fit.as_str())
    {
        fit.total = n as u32;
    }
    status.progress.total = 2 + n as u32;
    set_condition(
        &mut status.conditions,
        "Planned",
        true,
        "ChunksPlanned",
        &format!(
            "{} bins in {n} chunks of up to {} spectra",
            plan.bins.len(),
            plan.options.chunk.max_spectra
        ),
    );
    write_status(ctx, name, &status).await?;
    let summary: Vec<String> = status
        .placements
        .iter()
        .map(|p| format!("{} chunks on {}", p.tasks, p.region))
        .collect();
    objects::record_event(
        &ctx.store,
        object,
        EventType::Normal,
        "Planned",
        &format!(
            "{} bins in {n} chunks: {}",
            plan.bins.len(),
            summary.join(", ")
        ),
    )
    .await?;
    Ok(Action::Requeue(Duration::ZERO))
}

//! Application reconciler. Phases: `Pending -> Scheduling -> Running -> Succeeded | Failed`,
//! `Suspended` while `spec.suspend`, `Deleting` once deleted (the `ceccm/release` finalizer is
//! removed after its tasks and results are gone). Every phase change records an event.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{Value, json};

use super::{Action, Context, ReconcileError, set_condition};
use crate::objects::{self, EventType};
use crate::resources::{
    APPLICATION_LABEL, AppKind, AppPhase, ApplicationObject, ApplicationSpec, ApplicationStatus,
    Kind, Progress, RELEASE_FINALIZER, TaskSpec, TaskState, TaskTemplate, typed,
};
use crate::scheduling::{self, InputView, RegionView};
use crate::store::{Change, Query, StoreError};
use crate::time::now_rfc3339;

pub fn reconcile_boxed(
    object: Value,
    ctx: &Context,
) -> std::pin::Pin<Box<dyn Future<Output = Result<Action, ReconcileError>> + Send + '_>> {
    Box::pin(reconcile(object, ctx))
}

/// Task counts of one application, by state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TaskCounts {
    pub total: u32,
    pub done: u32,
    pub dead_lettered: u32,
}

/// Where a running application goes next, from its task counts.
pub fn running_outcome(counts: TaskCounts, expected: u32) -> Option<AppPhase> {
    if counts.dead_lettered > 0 {
        Some(AppPhase::Failed)
    } else if counts.total >= expected && counts.done == expected {
        Some(AppPhase::Succeeded)
    } else {
        None
    }
}

/// The work of a container application: its task templates. (astro-fit applications are
/// planned in stages by `super::astro_fit`.)
pub fn plan_tasks(spec: &ApplicationSpec) -> Result<Vec<TaskTemplate>, String> {
    match spec.app {
        AppKind::Container => Ok(spec.tasks.clone()),
        AppKind::AstroFit => Err("astro-fit applications are planned in stages".into()),
    }
}

pub async fn reconcile(object: Value, ctx: &Context) -> Result<Action, ReconcileError> {
    let app: ApplicationObject = typed(&object)?;
    let name = app.metadata.name.clone();
    let status = app.status.clone().unwrap_or_default();
    let phase = status.phase.unwrap_or(AppPhase::Pending);

    if app.metadata.deletion_timestamp.is_some() {
        return finalize(ctx, &object, &name).await;
    }
    if matches!(
        phase,
        AppPhase::Succeeded | AppPhase::Failed | AppPhase::Cancelled
    ) {
        return Ok(Action::AwaitChange);
    }
    if app.spec.suspend {
        if phase != AppPhase::Suspended {
            let mut next = status.clone();
            set_condition(
                &mut next.conditions,
                "Suspended",
                true,
                "SpecSuspend",
                "spec.suspend is true",
            );
            transition(
                ctx,
                &object,
                next,
                AppPhase::Suspended,
                "Suspended",
                "queued tasks are held",
            )
            .await?;
        }
        return Ok(Action::AwaitChange);
    }
    match phase {
        AppPhase::Suspended => {
            let mut next = status.clone();
            set_condition(
                &mut next.conditions,
                "Suspended",
                false,
                "Resumed",
                "spec.suspend is false",
            );
            // Scheduled work carries on; unscheduled work goes back to scheduling.
            let resume_to = if status.placements.is_empty() {
                AppPhase::Pending
            } else {
                AppPhase::Running
            };
            transition(
                ctx,
                &object,
                next,
                resume_to,
                "Resumed",
                "spec.suspend is false",
            )
            .await?;
            Ok(Action::Requeue(Duration::ZERO))
        }
        AppPhase::Pending => {
            let mut next = status.clone();
            next.observed_generation = app.metadata.generation;
            transition(
                ctx,
                &object,
                next,
                AppPhase::Scheduling,
                "Scheduling",
                "placing tasks on regions",
            )
            .await?;
            Ok(Action::Requeue(Duration::ZERO))
        }
        AppPhase::Scheduling => match app.spec.app {
            AppKind::Container => schedule(ctx, &object, &app, status).await,
            AppKind::AstroFit => super::astro_fit::start(ctx, &object, &app, status).await,
        },
        AppPhase::Running => match app.spec.app {
            AppKind::Container => follow(ctx, &object, &app, status).await,
            AppKind::AstroFit => super::astro_fit::follow(ctx, &object, &app, status).await,
        },
        AppPhase::Succeeded | AppPhase::Failed | AppPhase::Cancelled | AppPhase::Deleting => {
            Ok(Action::AwaitChange)
        }
    }
}

/// Writes the new status with `phase` and records the event.
pub(super) async fn transition(
    ctx: &Context,
    object: &Value,
    mut next: ApplicationStatus,
    phase: AppPhase,
    reason: &str,
    message: &str,
) -> Result<(), ReconcileError> {
    let name = object["metadata"]["name"].as_str().unwrap_or_default();
    next.phase = Some(phase);
    let value = serde_json::to_value(&next).unwrap_or_default();
    objects::update_status(&ctx.store, Kind::Application, name, |s| *s = value).await?;
    let event_type = match phase {
        AppPhase::Failed => EventType::Warning,
        _ => EventType::Normal,
    };
    objects::record_event(&ctx.store, object, event_type, reason, message).await?;
    Ok(())
}

async fn schedule(
    ctx: &Context,
    object: &Value,
    app: &ApplicationObject,
    mut status: ApplicationStatus,
) -> Result<Action, ReconcileError> {
    let name = app.metadata.name.as_str();
    let templates = match plan_tasks(&app.spec) {
        Ok(t) => t,
        Err(message) => {
            set_condition(
                &mut status.conditions,
                "Planned",
                false,
                "PlanningFailed",
                &message,
            );
            transition(
                ctx,
                object,
                status,
                AppPhase::Failed,
                "PlanningFailed",
                &message,
            )
            .await?;
            return Ok(Action::AwaitChange);
        }
    };
    let regions = region_views(ctx).await?;
    let input = input_view(ctx, &app.spec).await?;
    // The predictor answers with the analytic prior until it has learned from telemetry.
    let decided = {
        let predictor = ctx.predictor.read();
        scheduling::place(
            name,
            &app.spec,
            None,
            templates.len(),
            &regions,
            &input,
            crate::time::now_millis(),
            &*predictor,
        )
    };
    let placement = match decided {
        Ok(p) => p,
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
            if status != before {
                let value = serde_json::to_value(&status).unwrap_or_default();
                objects::update_status(&ctx.store, Kind::Application, name, |s| *s = value).await?;
                objects::record_event(
                    &ctx.store,
                    object,
                    EventType::Warning,
                    "Unschedulable",
                    &message,
                )
                .await?;
            }
            return Ok(Action::Requeue(Duration::from_secs(2)));
        }
    };
    // Creating a task that exists changes nothing, so a pass cut short by a restart resumes.
    for (index, (template, region)) in templates.iter().zip(&placement.assignment).enumerate() {
        create_task(
            ctx,
            app,
            command_task(app, index as u32, template),
            region,
            &[],
        )
        .await?;
    }
    status.placements = placement.placements;
    status.explanation = Some(placement.explanation.clone());
    status.progress = Progress {
        done: 0,
        failed: 0,
        total: templates.len() as u32,
    };
    status.start_time = Some(now_rfc3339());
    set_condition(
        &mut status.conditions,
        "Scheduled",
        true,
        "Scheduled",
        &placement.explanation,
    );
    let summary: Vec<String> = status
        .placements
        .iter()
        .map(|p| format!("{} tasks on {}", p.tasks, p.region))
        .collect();
    transition(
        ctx,
        object,
        status,
        AppPhase::Running,
        "Scheduled",
        &summary.join(", "),
    )
    .await?;
    Ok(Action::Requeue(Duration::ZERO))
}

pub fn task_name(application: &str, index: u32) -> String {
    format!("{application}-{index:05}")
}

/// Creates task `index` of `app` with `spec`, queued on `region`. Creating a task that exists
/// changes nothing, so a pass cut short by a restart resumes.
pub(super) async fn create_task(
    ctx: &Context,
    app: &ApplicationObject,
    spec: TaskSpec,
    region: &str,
    extra_labels: &[(&str, &str)],
) -> Result<(), StoreError> {
    let name = task_name(&app.metadata.name, spec.index);
    let mut labels = serde_json::Map::new();
    labels.insert(APPLICATION_LABEL.into(), json!(app.metadata.name));
    for (k, v) in extra_labels {
        labels.insert((*k).into(), json!(v));
    }
    let task = json!({
        "apiVersion": crate::resources::API_VERSION,
        "kind": "Task",
        "metadata": {
            "name": name,
            "uid": uuid::Uuid::new_v4().to_string(),
            "labels": labels,
            "creationTimestamp": now_rfc3339(),
            "generation": 1,
        },
        "spec": spec,
        "status": {"state": "Queued", "attempts": 0, "region": region},
    });
    ctx.store
        .write(Kind::Task, &name, |current| -> Result<Change, StoreError> {
            Ok(match current {
                Some(_) => Change::Keep,
                None => Change::Put(task),
            })
        })
        .await?;
    Ok(())
}

/// The spec of a container application's task `index`.
fn command_task(app: &ApplicationObject, index: u32, template: &TaskTemplate) -> TaskSpec {
    TaskSpec {
        application: app.metadata.name.clone(),
        index,
        command: template.command.clone(),
        args: template.args.clone(),
        env: template.env.clone(),
        astro_fit: None,
        features: None,
        max_attempts: app.spec.max_attempts,
    }
}

pub(super) async fn region_views(ctx: &Context) -> Result<Vec<RegionView>, ReconcileError> {
    let mut views = Vec::new();
    for object in ctx.store.list(Kind::Region, &Default::default()).await? {
        views.push(RegionView::of(typed(&object)?));
    }
    Ok(views)
}

/// Size and place of the application's input datasets (the first input's region counts).
pub(super) async fn input_view(
    ctx: &Context,
    spec: &ApplicationSpec,
) -> Result<InputView, ReconcileError> {
    let mut view = InputView::default();
    for input in &spec.inputs {
        if let Some(dataset) = ctx.store.get(Kind::Dataset, &input.dataset).await? {
            view.bytes += dataset["status"]["size"].as_u64().unwrap_or(0);
            if view.region.is_none() {
                view.region = dataset["spec"]["region"].as_str().map(str::to_string);
            }
        }
    }
    Ok(view)
}

async fn follow(
    ctx: &Context,
    object: &Value,
    app: &ApplicationObject,
    mut status: ApplicationStatus,
) -> Result<Action, ReconcileError> {
    let name = app.metadata.name.as_str();
    let tasks = ctx
        .store
        .list(
            Kind::Task,
            &Query {
                owner: Some(name),
                ..Default::default()
            },
        )
        .await?;
    let mut counts = TaskCounts::default();
    let mut energy = 0.0;
    let mut dead = Vec::new();
    for task in &tasks {
        counts.total += 1;
        energy += task["status"]["energyJoules"].as_f64().unwrap_or(0.0);
        match serde_json::from_value::<TaskState>(task["status"]["state"].clone()) {
            Ok(TaskState::Done) => counts.done += 1,
            Ok(TaskState::DeadLettered) => {
                counts.dead_lettered += 1;
                dead.push(
                    task["metadata"]["name"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string(),
                );
            }
            _ => {}
        }
    }
    let expected = status.progress.total;
    status.progress = Progress {
        done: counts.done,
        failed: counts.dead_lettered,
        total: expected,
    };
    status.energy_joules = energy;
    match running_outcome(counts, expected) {
        Some(AppPhase::Succeeded) => {
            write_results(ctx, name).await?;
            status.results = Some(format!("/api/v1/applications/{name}/results"));
            status.completion_time = Some(now_rfc3339());
            set_condition(
                &mut status.conditions,
                "Complete",
                true,
                "AllTasksDone",
                &format!("{} tasks done", counts.done),
            );
            let message = format!("{} tasks done, {:.1} J", counts.done, energy);
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
        Some(_) => {
            status.completion_time = Some(now_rfc3339());
            let message = format!(
                "tasks dead-lettered after their last attempt: {}",
                dead.join(", ")
            );
            set_condition(
                &mut status.conditions,
                "Complete",
                false,
                "TaskDeadLettered",
                &message,
            );
            transition(
                ctx,
                object,
                status,
                AppPhase::Failed,
                "TaskDeadLettered",
                &message,
            )
            .await?;
            Ok(Action::AwaitChange)
        }
        None => {
            let value = serde_json::to_value(&status).unwrap_or_default();
            objects::update_status(&ctx.store, Kind::Application, name, |s| *s = value).await?;
            Ok(Action::Requeue(Duration::from_secs(2)))
        }
    }
}

/// Directory of an application's result files.
pub fn results_dir(data_dir: &std::path::Path, application: &str) -> std::path::PathBuf {
    data_dir.join("results").join(application)
}

pub const RESULTS_FILE: &str = "results.ndjson";

/// Assembles the per-task results (one line per task, in task order) into the results file.
async fn write_results(ctx: &Context, name: &str) -> Result<(), ReconcileError> {
    let rows = ctx.store.task_results(name).await?;
    let dir = results_dir(&ctx.data_dir, name);
    tokio::fs::create_dir_all(&dir).await?;
    let mut text = String::new();
    for (_, _, body) in rows {
        text.push_str(&body);
        text.push('\n');
    }
    let tmp = dir.join(format!("{RESULTS_FILE}.tmp"));
    tokio::fs::write(&tmp, text).await?;
    tokio::fs::rename(&tmp, dir.join(RESULTS_FILE)).await?;
    Ok(())
}

async fn finalize(ctx: &Context, object: &Value, name: &str) -> Result<Action, ReconcileError> {
    // Idempotent: DELETE has normally set the phase already.
    objects::update_status(&ctx.store, Kind::Application, name, |s| {
        s["phase"] = json!("Deleting")
    })
    .await?;
    let tasks = ctx
        .store
        .list(
            Kind::Task,
            &Query {
                owner: Some(name),
                ..Default::default()
            },
        )
        .await?;
    for task in tasks {
        let task_name = task["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        ctx.store
            .write(Kind::Task, &task_name, |_| -> Result<Change, StoreError> {
                Ok(Change::Delete)
            })
            .await?;
    }
    ctx.store.delete_task_results(name).await?;
    for dir in [
        results_dir(&ctx.data_dir, name),
        crate::content::artifacts_dir(&ctx.data_dir, name),
    ] {
        match tokio::fs::remove_dir_all(dir).await {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e.into()),
            _ => {}
        }
    }
    objects::record_event(
        &ctx.store,
        object,
        EventType::Normal,
        "Released",
        "tasks and results released; the application goes away",
    )
    .await?;
    objects::remove_finalizer(&ctx.store, Kind::Application, name, RELEASE_FINALIZER).await?;
    Ok(Action::AwaitChange)
}

/// Per-region task counts of an application's finished tasks (for summaries).
pub async fn done_by_region(
    ctx_store: &crate::store::Store,
    application: &str,
) -> Result<BTreeMap<String, u32>, StoreError> {
    let tasks = ctx_store
        .list(
            Kind::Task,
            &Query {
                owner: Some(application),
                phase: Some("Done"),
                ..Default::default()
            },
        )
        .await?;
    let mut by_region = BTreeMap::new();
    for task in tasks {
        let region = task["status"]["region"].as_str().unwrap_or("?").to_string();
        *by_region.entry(region).or_insert(0) += 1;
    }
    Ok(by_region)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn running_ends_when_every_task_is_done_or_one_is_dead() {
        let counts = |total, done, dead_lettered| TaskCounts {
            total,
            done,
            dead_lettered,
        };
        assert_eq!(running_outcome(counts(50, 49, 0), 50), None);
        assert_eq!(
            running_outcome(counts(50, 50, 0), 50),
            Some(AppPhase::Succeeded)
        );
        assert_eq!(
            running_outcome(counts(50, 10, 1), 50),
            Some(AppPhase::Failed)
        );
        // Tasks still being created after a restart: not done yet.
        assert_eq!(running_outcome(counts(0, 0, 0), 50), None);
    }
}

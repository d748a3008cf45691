//! The application reconciler's I/O shell: reads the application (and, when the phase asks,
//! its tasks or a placement), lets `lifecycle::decide_application` decide, and applies the
//! decision. The phases and their events are described there.

use std::time::Duration;

use serde_json::{Value, json};

use super::{Action, Context, ReconcileError};
use crate::lifecycle::{
    self, ApplicationDecision, ApplicationFacts, ApplicationStep, NewTask, Publish, TaskTally,
};
use crate::objects;
use crate::resources::{
    APPLICATION_LABEL, AppPhase, ApplicationObject, ApplicationSpec, Kind, RELEASE_FINALIZER,
    TaskSpec, TaskState, TaskStatus, typed,
};
use crate::scheduling::{self, InputView, RegionView};
use crate::store::{Change, StoreError};
use crate::time::{now_millis, now_rfc3339};

pub use crate::lifecycle::task_name;

/// The application controller: an application's own changes, its tasks' and, for those not
/// settled, every region's and dataset's (a placement may fit now, an input may be ready).
pub fn controller() -> super::Controller {
    super::Controller {
        kind: Kind::Application,
        wake: |change| match change.kind {
            Kind::Application => super::changed_object(change),
            Kind::Task => task_application(&change.body),
            Kind::Region | Kind::Dataset => super::Wake::Unsettled,
            Kind::Event | Kind::Token => super::Wake::Nothing,
        },
        settled,
        resync: Duration::from_secs(300),
        reconcile: reconcile_boxed,
    }
}

/// The application a task belongs to.
fn task_application(body: &str) -> super::Wake {
    #[derive(serde::Deserialize)]
    struct Task {
        spec: Spec,
    }
    #[derive(serde::Deserialize)]
    struct Spec {
        application: String,
    }
    serde_json::from_str::<Task>(body).map_or(super::Wake::Nothing, |t| {
        super::Wake::Object(t.spec.application)
    })
}

/// Finished, or suspended by its spec: only a change of its own moves it.
fn settled(object: &Value) -> bool {
    if !object["metadata"]["deletionTimestamp"].is_null() {
        return false;
    }
    match object["status"]["phase"].as_str() {
        Some("Succeeded" | "Failed" | "Cancelled") => true,
        Some("Suspended") => object["spec"]["suspend"] == true,
        _ => false,
    }
}

pub fn reconcile_boxed(
    object: Value,
    ctx: &Context,
) -> std::pin::Pin<Box<dyn Future<Output = Result<Action, ReconcileError>> + Send + '_>> {
    Box::pin(reconcile(object, ctx))
}

/// Gathers what `lifecycle::decide_application` needs, and what the step it returns asks for,
/// then applies the decision.
pub async fn reconcile(object: Value, ctx: &Context) -> Result<Action, ReconcileError> {
    let app: ApplicationObject = typed(&object)?;
    let status = app.status.clone().unwrap_or_default();
    let now = now_rfc3339();
    let facts = ApplicationFacts {
        name: &app.metadata.name,
        spec: &app.spec,
        generation: app.metadata.generation,
        status: &status,
        deleting: app.metadata.deletion_timestamp.is_some(),
        now: &now,
    };
    if facts.phase() == AppPhase::Running && !facts.deleting && !app.spec.suspend {
        place_unplaced(ctx, &object, &app).await?;
    }
    let decision = match lifecycle::decide_application(&facts) {
        ApplicationStep::Apply(decision) => *decision,
        ApplicationStep::Place { tasks } => {
            let placed = place(ctx, &app.spec, &app.metadata.name, None, tasks).await?;
            lifecycle::container_placed(&facts, placed)
        }
        ApplicationStep::TallyTasks => {
            lifecycle::container_running(&facts, &tally(ctx, &app.metadata.name).await?)
        }
        ApplicationStep::AstroFit(phase) => {
            return super::astro_fit::reconcile(ctx, &object, &facts, phase).await;
        }
    };
    apply(ctx, &object, &app.metadata.name, decision).await
}

/// Applies a decision in its order: publish, create tasks, write the status, release, record
/// events, remove the finalizer.
pub(super) async fn apply(
    ctx: &Context,
    object: &Value,
    name: &str,
    decision: ApplicationDecision,
) -> Result<Action, ReconcileError> {
    match &decision.publish {
        Some(Publish::TaskResults) => write_results(ctx, name).await?,
        Some(Publish::Artifacts(results)) => {
            crate::content::publish_results(&ctx.data_dir, name, results).await?
        }
        None => {}
    }
    // Tasks follow their application's owner (`auth::sees`).
    let owner = object["metadata"]["owner"].as_str();
    create_tasks(ctx, name, owner, decision.tasks).await?;
    if let Some(status) = &decision.status {
        let value = serde_json::to_value(status).unwrap_or_default();
        objects::update_status(&ctx.store, Kind::Application, name, |s| *s = value).await?;
    }
    if decision.release {
        release(ctx, name).await?;
    }
    for event in &decision.events {
        objects::record_event(
            &ctx.store,
            object,
            event.kind,
            &event.reason,
            &event.message,
        )
        .await?;
    }
    if decision.release {
        objects::remove_finalizer(&ctx.store, Kind::Application, name, RELEASE_FINALIZER).await?;
    }
    Ok(decision.action)
}

/// Prices a placement of `tasks` tasks with the controller's predictor (the analytic prior
/// until it has learned from telemetry).
pub(super) async fn place(
    ctx: &Context,
    spec: &ApplicationSpec,
    name: &str,
    features: Option<ceccm_scheduler::TaskFeatures>,
    tasks: usize,
) -> Result<Result<scheduling::Placement, scheduling::Unschedulable>, ReconcileError> {
    let regions = region_views(ctx).await?;
    let input = input_view(ctx, spec).await?;
    let predictor = ctx.predictor.read();
    Ok(scheduling::place(
        name,
        spec,
        features,
        tasks,
        &regions,
        &input,
        now_millis(),
        &*predictor,
    ))
}

/// Places the application's tasks that wait without a region (evicted from one, or whose
/// lease expired) through the scheduler, and says where they went and why they moved.
async fn place_unplaced(
    ctx: &Context,
    object: &Value,
    app: &ApplicationObject,
) -> Result<(), ReconcileError> {
    let name = app.metadata.name.as_str();
    let mut unplaced = Vec::new();
    for task in ctx.store.tasks_of(name).await? {
        let task = typed::<TaskSpec, TaskStatus>(&task)?;
        if task
            .status
            .as_ref()
            .is_some_and(|s| s.state == TaskState::Queued && s.region.is_none())
        {
            unplaced.push(task);
        }
    }
    let Some(first) = unplaced.first() else {
        return Ok(());
    };
    let why = first
        .status
        .as_ref()
        .and_then(|s| s.evicted.clone().or_else(|| s.error.clone()))
        .unwrap_or_default();
    let features = first.spec.features;
    let placement = match place(ctx, &app.spec, name, features, unplaced.len()).await? {
        Ok(p) => p,
        Err(unschedulable) => {
            let message = format!(
                "{} tasks wait for a region ({why}): {}",
                unplaced.len(),
                unschedulable.reasons.join("; ")
            );
            objects::record_event(
                &ctx.store,
                object,
                objects::EventType::Warning,
                "FailedScheduling",
                &message,
            )
            .await?;
            return Ok(());
        }
    };
    let mut placed = 0;
    for (task, region) in unplaced.iter().zip(&placement.assignment) {
        let written = ctx
            .store
            .write(
                Kind::Task,
                &task.metadata.name,
                |current| -> Result<Change, ReconcileError> {
                    let Some(mut object) = current else {
                        return Ok(Change::Keep);
                    };
                    let waiting = object["status"]["state"] == "Queued"
                        && object["status"]["region"].is_null();
                    if !waiting {
                        return Ok(Change::Keep);
                    }
                    object["status"]["region"] = json!(region);
                    Ok(Change::Put(object))
                },
            )
            .await?;
        placed += u32::from(written.changed);
    }
    if placed > 0 {
        let summary = placement
            .placements
            .iter()
            .map(|p| format!("{} on {}", p.tasks, p.region))
            .collect::<Vec<_>>()
            .join(", ");
        objects::record_event(
            &ctx.store,
            object,
            objects::EventType::Normal,
            "Rescheduled",
            &format!("{placed} tasks placed again ({why}): {summary}"),
        )
        .await?;
    }
    Ok(())
}

/// Tasks created in one transaction: one commit for this many instead of one each.
const TASKS_PER_COMMIT: usize = 500;

/// Creates `tasks` of application `name`. Creating a task that exists changes nothing, so a
/// pass cut short by a restart resumes.
async fn create_tasks(
    ctx: &Context,
    application: &str,
    owner: Option<&str>,
    tasks: Vec<NewTask>,
) -> Result<(), StoreError> {
    let objects: Vec<(String, Value)> = tasks
        .into_iter()
        .map(|task| new_task(application, owner, task))
        .collect();
    for batch in objects.chunks(TASKS_PER_COMMIT) {
        let mut writes = Vec::with_capacity(batch.len());
        for (name, object) in batch {
            writes.push((name.as_str(), move |current: Option<Value>| {
                Ok::<_, StoreError>(match current {
                    Some(_) => Change::Keep,
                    None => Change::Put(object.clone()),
                })
            }));
        }
        ctx.store.write_many(Kind::Task, writes).await?;
    }
    Ok(())
}

/// Task `task` of `application` as stored: its name and object.
fn new_task(application: &str, owner: Option<&str>, task: NewTask) -> (String, Value) {
    let name = task_name(application, task.spec.index);
    let mut labels = serde_json::Map::new();
    labels.insert(APPLICATION_LABEL.into(), json!(application));
    if let Some(stage) = task.stage {
        labels.insert(super::astro_fit::STAGE_LABEL.into(), json!(stage.as_str()));
    }
    let mut metadata = json!({
        "name": name,
        "uid": uuid::Uuid::new_v4().to_string(),
        "labels": labels,
        "creationTimestamp": now_rfc3339(),
        "generation": 1,
    });
    if let Some(owner) = owner {
        metadata["owner"] = json!(owner);
    }
    let object = json!({
        "apiVersion": crate::resources::API_VERSION,
        "kind": "Task",
        "metadata": metadata,
        "spec": task.spec,
        "status": {"state": "Queued", "attempts": 0, "region": task.region},
    });
    (name, object)
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
            // What moving it costs: an edge-held dataset crosses its uplink encoded.
            let uplink: Option<crate::uplink::DatasetUplink> =
                serde_json::from_value(dataset["status"]["uplink"].clone()).ok();
            view.bytes += match uplink {
                Some(u) => u.moved_bytes(),
                None => dataset["status"]["size"].as_u64().unwrap_or(0),
            };
            if view.region.is_none() {
                view.region = dataset["spec"]["region"].as_str().map(str::to_string);
            }
        }
    }
    Ok(view)
}

/// The application's tasks, by state.
async fn tally(ctx: &Context, name: &str) -> Result<TaskTally, ReconcileError> {
    let tasks = ctx.store.tasks_of(name).await?;
    let mut tally = TaskTally::default();
    for task in &tasks {
        tally.add(
            task["metadata"]["name"].as_str().unwrap_or_default(),
            serde_json::from_value::<TaskState>(task["status"]["state"].clone()).ok(),
            task["status"]["energyJoules"].as_f64().unwrap_or(0.0),
        );
    }
    Ok(tally)
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

/// Deletes the application's tasks, results and artifacts (the finalizer goes after).
async fn release(ctx: &Context, name: &str) -> Result<(), ReconcileError> {
    let tasks = ctx.store.tasks_of(name).await?;
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
    Ok(())
}

//! The embedded task queue: tasks are store objects; workers lease them over HTTP.
//!
//! Life cycle: `Queued -> Leased(worker, deadline) -> Done | Failed (attempts < max -> Queued) |
//! DeadLettered`. The transitions are pure functions over `TaskStatus` in `crate::lifecycle`;
//! the async functions below apply them atomically through the store. A task's result is written once: the first
//! completion wins, later ones (a redelivered task finishing twice) change nothing.

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use utoipa::ToSchema;

use ceccm_scheduler::TelemetrySample;

use crate::error::{ApiError, ErrorCode};
use crate::lifecycle::{
    Outcome, Refusal, on_complete, on_fail, on_heartbeat, on_lease, on_lease_expired, queued_status,
};
use crate::resources::{
    ApplicationObject, ApplicationSpec, Kind, RegionObject, TaskObject, TaskSpec, TaskState,
    TaskStatus, typed,
};
use crate::scheduling::{RegionView, telemetry_sample};
use crate::store::{Change, Query, Store, TaskResultRow, TelemetryRow};
use crate::time::{now_millis, parse_millis};

/// Bounds on what workers may ask for.
pub const MAX_LEASE_SECONDS: u32 = 3600;
/// Task output kept in the store, per stream.
pub const MAX_OUTPUT_BYTES: usize = 64 * 1024;

#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct LeaseRequest {
    #[schema(min_length = 1, max_length = 253)]
    pub worker: String,
    #[schema(max_length = 63, pattern = "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")]
    pub region: String,
    #[serde(default = "default_lease_seconds")]
    #[schema(minimum = 1, maximum = 3600)]
    pub lease_seconds: u32,
    /// Lease this task only: a worker fed by a transport (RabbitMQ, `docs/amqp.md`) claims the
    /// task its message names. Absent: the first queued task of the region.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task: Option<TaskClaim>,
}

/// The task a transport's message names: its name and uid (a task deleted and made again
/// under the same name is another task).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TaskClaim {
    #[schema(min_length = 1, max_length = 253)]
    pub name: String,
    #[schema(min_length = 1, max_length = 64)]
    pub uid: String,
}

/// Why a claimed task cannot be leased. Every refusal is final for the message that named
/// it: the store decides, and a task that needs running again gets a message of its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClaimRefusal {
    /// The name now belongs to another task (deleted and made again).
    OtherTask,
    /// Placed elsewhere (re-placed, evicted) or waiting to be placed again.
    Moved { to: Option<String> },
    /// Leased by a worker already (a duplicate or redelivered message).
    Leased,
    /// Done, or dead-lettered past its attempts.
    Finished(TaskState),
    /// Its application is suspended, cancelled, failed or being deleted: the task is sent
    /// again when the application can run.
    NotRunnable,
}

impl ClaimRefusal {
    /// The `details.reason` of the 409 (the worker's decision reads it).
    pub fn reason(&self) -> &'static str {
        match self {
            ClaimRefusal::OtherTask => "OtherTask",
            ClaimRefusal::Moved { .. } => "Moved",
            ClaimRefusal::Leased => "Leased",
            ClaimRefusal::Finished(TaskState::DeadLettered) => "DeadLettered",
            ClaimRefusal::Finished(_) => "Finished",
            ClaimRefusal::NotRunnable => "NotRunnable",
        }
    }
}

/// Whether the task a message names may be leased by a worker of `region` (pure: the task as
/// stored, and whether its application may run).
pub fn claim_refusal(
    task: &TaskObject,
    claim: &TaskClaim,
    region: &str,
    runnable: bool,
) -> Option<ClaimRefusal> {
    if task.metadata.uid.as_deref() != Some(claim.uid.as_str()) {
        return Some(ClaimRefusal::OtherTask);
    }
    let status = task.status.clone().unwrap_or(queued_status());
    match status.state {
        TaskState::Done | TaskState::DeadLettered | TaskState::Failed => {
            return Some(ClaimRefusal::Finished(status.state));
        }
        TaskState::Leased => return Some(ClaimRefusal::Leased),
        TaskState::Queued => {}
    }
    if status.region.as_deref() != Some(region) {
        return Some(ClaimRefusal::Moved { to: status.region });
    }
    if !runnable {
        return Some(ClaimRefusal::NotRunnable);
    }
    None
}

fn default_lease_seconds() -> u32 {
    30
}

#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HeartbeatRequest {
    #[schema(min_length = 1, max_length = 253)]
    pub worker: String,
    #[serde(default = "default_lease_seconds")]
    #[schema(minimum = 1, maximum = 3600)]
    pub lease_seconds: u32,
}

#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct CompleteRequest {
    pub worker: String,
    /// What the task produced: for command tasks `{exitCode, stdout, stderr}`.
    #[schema(value_type = Object)]
    pub result: Value,
    #[serde(default)]
    #[schema(minimum = 0)]
    pub cpu_seconds: f64,
    /// Wall-clock seconds the task ran, as the worker measured them (> 0). Without it the
    /// predictor learns from the time between the lease and this completion.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(exclusive_minimum = 0)]
    pub seconds: Option<f64>,
    /// Joules the task used, where the worker measures energy (RAPL, metered nodes; > 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(exclusive_minimum = 0)]
    pub joules: Option<f64>,
    /// Files the task made, uploaded before as artifacts; recorded only if this completion
    /// wins (the first one does).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub artifacts: Vec<crate::astro_fit::ContentRef>,
}

#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct FailRequest {
    pub worker: String,
    pub error: String,
    #[serde(default)]
    #[schema(minimum = 0)]
    pub cpu_seconds: f64,
    /// Another attempt would fail the same way (bad input): dead-letter the task now.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub permanent: bool,
    /// Why, as Kubernetes names it (`OOMKilled`, `ImageNotFound`, `ContainerCannotRun`,
    /// `DeadlineExceeded`, `Error`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(pattern = "^(OOMKilled|ImageNotFound|ContainerCannotRun|DeadlineExceeded|Error)$")]
    pub reason: Option<String>,
}

/// The failure reasons a worker may report.
pub const FAILURE_REASONS: [&str; 5] = [
    "OOMKilled",
    "ImageNotFound",
    "ContainerCannotRun",
    "DeadlineExceeded",
    "Error",
];

fn refused(name: &str, refusal: Refusal) -> ApiError {
    let message = match &refusal {
        Refusal::NotQueued => format!("task {name:?} is not queued"),
        Refusal::LeaseLost { holder } => format!(
            "task {name:?} is not leased to this worker (holder: {})",
            holder.as_deref().unwrap_or("none")
        ),
        Refusal::Finished(state) => format!("task {name:?} is already {state:?}"),
    };
    ApiError::new(ErrorCode::Conflict, message).with_details(json!({"kind": "Task", "name": name}))
}

fn task_of(object: &Value) -> Result<TaskObject, ApiError> {
    Ok(typed::<TaskSpec, TaskStatus>(object)?)
}

fn with_status(mut object: Value, status: &TaskStatus) -> Value {
    object["status"] = serde_json::to_value(status).unwrap_or_default();
    object
}

fn check_lease_seconds(seconds: u32) -> Result<i64, ApiError> {
    if !(1..=MAX_LEASE_SECONDS).contains(&seconds) {
        return Err(ApiError::new(
            ErrorCode::Invalid,
            format!("leaseSeconds must be 1 to {MAX_LEASE_SECONDS}"),
        ));
    }
    Ok(i64::from(seconds) * 1000)
}

/// Leases the first queued task of `region` whose application is runnable (not suspended,
/// not being deleted), with a new lease secret for its worker (returned, its sha256 kept in
/// the task's status). `None` when there is nothing to do.
pub async fn lease(
    store: &Store,
    request: &LeaseRequest,
) -> Result<Option<(Value, String)>, ApiError> {
    let lease_ms = check_lease_seconds(request.lease_seconds)?;
    if request.worker.is_empty() || request.worker.len() > 253 {
        return Err(ApiError::new(
            ErrorCode::Invalid,
            "worker must be 1 to 253 characters",
        ));
    }
    // Recorded with the lease: the predictor learns how load at the start slows a task.
    let region = store.get(Kind::Region, &request.region).await?;
    let region_load = region
        .as_ref()
        .and_then(|r| r["status"]["load"].as_f64())
        .filter(|l| l.is_finite());
    if let Some(claim) = &request.task {
        let unschedulable = region
            .as_ref()
            .is_some_and(|r| r["spec"]["unschedulable"] == true);
        return claim_task(store, request, claim, lease_ms, region_load, unschedulable)
            .await
            .map(Some);
    }
    let mut after: Option<String> = None;
    let mut blocked_apps: Vec<String> = Vec::new();
    loop {
        let query = Query {
            phase: Some("Queued"),
            region: Some(&request.region),
            after: after.as_deref(),
            limit: Some(32),
            ..Default::default()
        };
        let candidates = store.list(Kind::Task, &query).await?;
        let Some(last) = candidates.last() else {
            return Ok(None);
        };
        after = last["metadata"]["name"].as_str().map(str::to_string);
        for candidate in candidates {
            let task = task_of(&candidate)?;
            if blocked_apps.contains(&task.spec.application) {
                continue;
            }
            if !application_runnable(store, &task.spec.application).await? {
                blocked_apps.push(task.spec.application);
                continue;
            }
            let name = task.metadata.name.clone();
            let worker = request.worker.clone();
            let (_, secret) = crate::auth::new_token();
            let secret_sha256 = crate::auth::secret_hash(&secret);
            let written = store
                .write(Kind::Task, &name, |current| -> Result<Change, ApiError> {
                    let Some(object) = current else {
                        return Ok(Change::Keep);
                    };
                    let task = task_of(&object)?;
                    match on_lease(
                        &task.status.unwrap_or(queued_status()),
                        &worker,
                        now_millis(),
                        lease_ms,
                    ) {
                        Ok(status) => Ok(Change::Put(with_status(
                            object,
                            &TaskStatus {
                                start_load: region_load,
                                lease_secret_sha256: Some(secret_sha256.clone()),
                                ..status
                            },
                        ))),
                        // Someone else took it between our read and this write.
                        Err(_) => Ok(Change::Keep),
                    }
                })
                .await?;
            if written.changed {
                return Ok(written.object.map(|object| (object, secret)));
            }
        }
    }
}

/// Leases the task a transport's message names, or says why not (404: gone; 409 with
/// `details.reason`, see [`ClaimRefusal`], and `details.regionUnschedulable`).
async fn claim_task(
    store: &Store,
    request: &LeaseRequest,
    claim: &TaskClaim,
    lease_ms: i64,
    region_load: Option<f64>,
    region_unschedulable: bool,
) -> Result<(Value, String), ApiError> {
    let name = claim.name.as_str();
    let Some(object) = store.get(Kind::Task, name).await? else {
        return Err(ApiError::not_found("Task", name));
    };
    let application = task_of(&object)?.spec.application;
    let runnable = application_runnable(store, &application).await?;
    let worker = request.worker.clone();
    let (_, secret) = crate::auth::new_token();
    let secret_sha256 = crate::auth::secret_hash(&secret);
    let written = store
        .write(Kind::Task, name, |current| -> Result<Change, ApiError> {
            let Some(object) = current else {
                return Err(ApiError::not_found("Task", name));
            };
            let task = task_of(&object)?;
            if let Some(refusal) = claim_refusal(&task, claim, &request.region, runnable) {
                return Err(claim_refused(name, &refusal, region_unschedulable));
            }
            let status = task.status.unwrap_or(queued_status());
            let leased =
                on_lease(&status, &worker, now_millis(), lease_ms).map_err(|r| refused(name, r))?;
            Ok(Change::Put(with_status(
                object,
                &TaskStatus {
                    start_load: region_load,
                    lease_secret_sha256: Some(secret_sha256.clone()),
                    ..leased
                },
            )))
        })
        .await?;
    let object = written
        .object
        .ok_or_else(|| ApiError::not_found("Task", name))?;
    Ok((object, secret))
}

fn claim_refused(name: &str, refusal: &ClaimRefusal, region_unschedulable: bool) -> ApiError {
    let message = match refusal {
        ClaimRefusal::OtherTask => format!("task {name:?} is another task now (another uid)"),
        ClaimRefusal::Moved { to: Some(to) } => format!("task {name:?} is placed in {to} now"),
        ClaimRefusal::Moved { to: None } => format!("task {name:?} waits to be placed again"),
        ClaimRefusal::Leased => format!("task {name:?} is leased already"),
        ClaimRefusal::Finished(state) => format!("task {name:?} is already {state:?}"),
        ClaimRefusal::NotRunnable => {
            format!("the application of task {name:?} is suspended, stopped or being deleted")
        }
    };
    ApiError::new(ErrorCode::Conflict, message).with_details(json!({
        "kind": "Task", "name": name, "reason": refusal.reason(),
        "regionUnschedulable": region_unschedulable,
    }))
}

/// Whether an application's tasks may run: not suspended, not being deleted, not cancelled
/// or failed.
pub fn runnable(app: &Value) -> bool {
    let suspended = app["spec"]["suspend"].as_bool().unwrap_or(false);
    let deleting = app["metadata"]["deletionTimestamp"].is_string();
    let stopped = matches!(
        app["status"]["phase"].as_str(),
        Some("Cancelled" | "Failed")
    );
    !suspended && !deleting && !stopped
}

async fn application_runnable(store: &Store, application: &str) -> Result<bool, ApiError> {
    Ok(store
        .get(Kind::Application, application)
        .await?
        .is_some_and(|app| runnable(&app)))
}

/// Applies a transition to one task; 404 if it is gone, 409 if refused.
async fn transition(
    store: &Store,
    name: &str,
    step: impl FnOnce(&TaskObject) -> Result<(TaskStatus, Option<TaskResultRow>), Refusal>,
) -> Result<Value, ApiError> {
    let written = store
        .write(Kind::Task, name, |current| -> Result<Change, ApiError> {
            let Some(object) = current else {
                return Err(ApiError::not_found("Task", name));
            };
            let task = task_of(&object)?;
            let (status, result) = step(&task).map_err(|r| refused(name, r))?;
            let object = with_status(object, &status);
            Ok(match result {
                Some(row) => Change::PutWithResult(object, row),
                None => Change::Put(object),
            })
        })
        .await?;
    Ok(written.object.unwrap_or_default())
}

pub async fn heartbeat(
    store: &Store,
    name: &str,
    request: &HeartbeatRequest,
) -> Result<Value, ApiError> {
    let lease_ms = check_lease_seconds(request.lease_seconds)?;
    transition(store, name, |task| {
        let status = task.status.clone().unwrap_or(queued_status());
        Ok((
            on_heartbeat(&status, &request.worker, now_millis(), lease_ms)?,
            None,
        ))
    })
    .await
}

/// Where a task ran and what its application declares, read before its transition commits.
struct RanOn {
    region: Option<RegionView>,
    application: Option<ApplicationSpec>,
}

impl RanOn {
    /// Joules for `cpu_seconds` of work in the task's region (0 when the region is unknown).
    fn joules(&self, cpu_seconds: f64) -> f64 {
        self.region
            .as_ref()
            .map_or(0.0, |r| r.spec.energy.work_joules(cpu_seconds))
    }
}

/// The task's region, and its application's spec when `with_application` (only a completion's
/// telemetry needs it; a large application is costly to read).
async fn ran_on(store: &Store, name: &str, with_application: bool) -> Result<RanOn, ApiError> {
    let Some(task) = store.get(Kind::Task, name).await? else {
        return Err(ApiError::not_found("Task", name));
    };
    let region = match task["status"]["region"].as_str() {
        Some(region) => store.get(Kind::Region, region).await?,
        None => None,
    };
    let application = match task["spec"]["application"].as_str() {
        Some(app) if with_application => store.get(Kind::Application, app).await?,
        _ => None,
    };
    Ok(RanOn {
        region: region
            .and_then(|r| typed(&r).ok())
            .map(|r: RegionObject| RegionView::of(r)),
        application: application
            .and_then(|a| typed(&a).ok())
            .map(|a: ApplicationObject| a.spec),
    })
}

fn check_cpu(cpu_seconds: f64) -> Result<(), ApiError> {
    if cpu_seconds.is_finite() && cpu_seconds >= 0.0 {
        Ok(())
    } else {
        Err(ApiError::new(
            ErrorCode::Invalid,
            "cpuSeconds must be a finite number >= 0",
        ))
    }
}

/// Measured seconds or joules, when reported, must be usable as telemetry.
fn check_measured(value: Option<f64>, field: &str) -> Result<(), ApiError> {
    match value {
        Some(v) if !(v.is_finite() && v > 0.0) => Err(ApiError::new(
            ErrorCode::Invalid,
            format!("{field} must be a finite number > 0"),
        )
        .with_details(json!({"field": field}))),
        _ => Ok(()),
    }
}

/// A recorded completion: the task as stored, and the telemetry sample stored with it (`None`
/// when the task's region or application is gone, or the sample is unusable).
pub struct Completed {
    pub task: Value,
    pub telemetry: Option<TelemetrySample>,
}

/// The telemetry of a task finishing at `now_ms`: the worker's measured seconds, else the time
/// since its lease. `Err` says why nothing can be learned from it.
pub fn completion_sample(
    ran_on: (&RegionView, &ApplicationSpec),
    features: Option<ceccm_scheduler::TaskFeatures>,
    status: &TaskStatus,
    measured_seconds: Option<f64>,
    measured_joules: Option<f64>,
    now_ms: i64,
) -> Result<TelemetrySample, &'static str> {
    let seconds = match measured_seconds {
        Some(s) => s,
        None => {
            let started = status
                .start_time
                .as_deref()
                .and_then(parse_millis)
                .ok_or("the task has no start time")?;
            (now_ms - started) as f64 / 1000.0
        }
    };
    if ran_on.1.app == crate::resources::AppKind::AstroFit && features.is_none() {
        return Err("an astro-fit prepare or assemble task is not chunk work");
    }
    let mut sample = telemetry_sample(ran_on.0, ran_on.1, features, seconds, measured_joules);
    // The load when the task started describes its run better than the load now.
    if let Some(load) = status.start_load {
        sample.load = load;
    }
    match sample.unusable() {
        Some(reason) => Err(reason),
        None => Ok(sample),
    }
}

pub async fn complete(
    store: &Store,
    name: &str,
    request: CompleteRequest,
) -> Result<Completed, ApiError> {
    check_cpu(request.cpu_seconds)?;
    check_measured(request.seconds, "seconds")?;
    check_measured(request.joules, "joules")?;
    let ran_on = ran_on(store, name, true).await?;
    let joules = ran_on.joules(request.cpu_seconds);
    let mut recorded = None;
    let task = transition(store, name, |task| {
        let status = task.status.clone().unwrap_or(queued_status());
        let now = now_millis();
        let sample = match (&ran_on.region, &ran_on.application) {
            (Some(region), Some(app)) => completion_sample(
                (region, app),
                task.spec.features,
                &status,
                request.seconds,
                request.joules,
                now,
            ),
            _ => Err("the task's region or application is gone"),
        };
        let telemetry = match sample {
            Ok(sample) => {
                let row = TelemetryRow {
                    task_uid: task
                        .metadata
                        .uid
                        .clone()
                        .unwrap_or_else(|| name.to_string()),
                    region: ran_on
                        .region
                        .as_ref()
                        .map(|r| r.name.clone())
                        .unwrap_or_default(),
                    body: serde_json::to_string(&sample).unwrap_or_default(),
                };
                recorded = Some(sample);
                Some(row)
            }
            Err(reason) => {
                tracing::debug!(task = name, reason, "no telemetry recorded");
                None
            }
        };
        let row = TaskResultRow {
            task: name.to_string(),
            application: task.spec.application.clone(),
            index: i64::from(task.spec.index),
            worker: request.worker.clone(),
            body: json!({"task": name, "index": task.spec.index, "worker": request.worker,
                         "result": request.result})
            .to_string(),
            telemetry,
        };
        let done = on_complete(
            &status,
            &request.worker,
            Outcome {
                artifacts: request.artifacts,
                cpu_seconds: request.cpu_seconds,
                joules,
            },
            now,
        )?;
        // The result is opaque to the life cycle: it is kept as the worker sent it.
        let done = TaskStatus {
            result: Some(request.result),
            ..done
        };
        Ok((done, Some(row)))
    })
    .await?;
    Ok(Completed {
        task,
        telemetry: recorded,
    })
}

pub async fn fail(store: &Store, name: &str, request: FailRequest) -> Result<Value, ApiError> {
    check_cpu(request.cpu_seconds)?;
    if let Some(reason) = request
        .reason
        .as_deref()
        .filter(|r| !FAILURE_REASONS.contains(r))
    {
        return Err(ApiError::invalid(
            "Task",
            name,
            &[ceccm_federation::Violation::new(
                "reason",
                format!("{reason:?} is not one of {}", FAILURE_REASONS.join(", ")),
            )],
        ));
    }
    let joules = ran_on(store, name, false)
        .await?
        .joules(request.cpu_seconds);
    transition(store, name, |task| {
        let status = task.status.clone().unwrap_or(queued_status());
        let next = on_fail(
            &status,
            &request.worker,
            task.spec.max_attempts,
            request.permanent,
            &request.error,
            request.cpu_seconds,
            joules,
        )?;
        let next = TaskStatus {
            reason: request.reason.clone(),
            ..next
        };
        Ok((next, None))
    })
    .await
}

/// Requeues (or dead-letters) every task whose lease has expired. Returns how many.
pub async fn expire_leases(store: &Store) -> Result<Vec<Value>, ApiError> {
    let now = now_millis();
    let expired = store
        .list(
            Kind::Task,
            &Query {
                phase: Some("Leased"),
                deadline_before_ms: Some(now),
                ..Default::default()
            },
        )
        .await?;
    if expired.is_empty() {
        return Ok(Vec::new());
    }
    // What each agent's region last heard from its agent (local regions have none).
    let mut agents = std::collections::HashMap::new();
    for region in store.list(Kind::Region, &Default::default()).await? {
        if let (Some(name), Ok(agent)) = (
            region["metadata"]["name"].as_str(),
            serde_json::from_value::<ceccm_federation::region::AgentStatus>(
                region["status"]["agent"].clone(),
            ),
        ) {
            agents.insert(name.to_string(), agent);
        }
    }
    let mut requeued = Vec::new();
    for object in expired {
        let name = object["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let written = store
            .write(Kind::Task, &name, |current| -> Result<Change, ApiError> {
                let Some(object) = current else {
                    return Ok(Change::Keep);
                };
                let task = task_of(&object)?;
                let status = task.status.clone().unwrap_or(queued_status());
                let deadline = status
                    .lease_deadline
                    .as_deref()
                    .and_then(crate::time::parse_millis)
                    .unwrap_or(now);
                let agent = status.region.as_deref().and_then(|r| agents.get(r));
                if !crate::lifecycle::worker_lost_lease(deadline, agent, now) {
                    return Ok(Change::Keep);
                }
                // Decided under the write lock: a heartbeat may have extended it.
                let Some(next) = on_lease_expired(&status, task.spec.max_attempts, now) else {
                    return Ok(Change::Keep);
                };
                Ok(Change::Put(with_status(object, &next)))
            })
            .await?;
        if let (true, Some(object)) = (written.changed, written.object) {
            requeued.push(object);
        }
    }
    Ok(requeued)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ran_on() -> (RegionView, ApplicationSpec) {
        let region: RegionObject = typed(&json!({
            "metadata": {"name": "edge-a"},
            "spec": {"tier": "edge", "driver": "local", "capacity": {"cpu": 4},
                     "energy": {"idleWatts": 40.0, "wattsPerCore": 10.0}},
            "status": {"phase": "Ready", "load": 0.5}
        }))
        .unwrap();
        let app: ApplicationSpec = serde_json::from_value(json!({
            "app": "container", "tasks": [{"command": "true"}], "resources": {"cpu": 2.0},
            "parameters": {"taskFeatures": {"spectra": 500, "pixels": 3681, "templates": 42,
                                            "moments": 4}}
        }))
        .unwrap();
        (RegionView::of(region), app)
    }

    fn task_in(state: TaskState, region: Option<&str>) -> TaskObject {
        typed(&json!({
            "metadata": {"name": "fit-00003", "uid": "u1"},
            "spec": {"application": "fit", "index": 3, "command": "true", "maxAttempts": 3},
            "status": {"state": state, "attempts": 1, "region": region}
        }))
        .unwrap()
    }

    #[test]
    fn a_claim_leases_only_the_named_task_queued_here() {
        let claim = TaskClaim {
            name: "fit-00003".into(),
            uid: "u1".into(),
        };
        let queued = task_in(TaskState::Queued, Some("edge-a"));
        assert_eq!(claim_refusal(&queued, &claim, "edge-a", true), None);
        // A duplicate or redelivered message: leased or finished already.
        assert_eq!(
            claim_refusal(
                &task_in(TaskState::Leased, Some("edge-a")),
                &claim,
                "edge-a",
                true
            ),
            Some(ClaimRefusal::Leased)
        );
        let done = claim_refusal(
            &task_in(TaskState::Done, Some("edge-a")),
            &claim,
            "edge-a",
            true,
        );
        assert_eq!(done, Some(ClaimRefusal::Finished(TaskState::Done)));
        assert_eq!(done.unwrap().reason(), "Finished");
        let dead = claim_refusal(
            &task_in(TaskState::DeadLettered, Some("edge-a")),
            &claim,
            "edge-a",
            true,
        );
        assert_eq!(dead.unwrap().reason(), "DeadLettered");
        // Re-placed elsewhere, or waiting to be placed: not this region's.
        assert_eq!(
            claim_refusal(&queued, &claim, "cloud-b", true),
            Some(ClaimRefusal::Moved {
                to: Some("edge-a".into())
            })
        );
        assert_eq!(
            claim_refusal(&task_in(TaskState::Queued, None), &claim, "edge-a", true),
            Some(ClaimRefusal::Moved { to: None })
        );
        // Another task under the same name.
        let other = TaskClaim {
            uid: "u2".into(),
            ..claim.clone()
        };
        assert_eq!(
            claim_refusal(&queued, &other, "edge-a", true),
            Some(ClaimRefusal::OtherTask)
        );
        // Its application suspended or stopped.
        assert_eq!(
            claim_refusal(&queued, &claim, "edge-a", false),
            Some(ClaimRefusal::NotRunnable)
        );
        let refused = claim_refused("fit-00003", &ClaimRefusal::Leased, true);
        assert_eq!(refused.code, ErrorCode::Conflict);
        assert_eq!(refused.details["reason"], "Leased");
        assert_eq!(refused.details["regionUnschedulable"], true);
        // What the worker makes of it.
        assert_eq!(
            crate::amqp::on_claim(409, &refused.details),
            crate::amqp::ClaimVerdict::SkipAndStop
        );
    }

    #[test]
    fn a_completion_samples_the_region_the_task_and_its_time() {
        let (region, app) = ran_on();
        let leased = on_lease(&queued_status(), "w1", 10_000, 5000).unwrap();
        // No measured time: from the lease to the completion.
        let sample = completion_sample((&region, &app), None, &leased, None, None, 12_500).unwrap();
        assert_eq!(sample.seconds, 2.5);
        assert_eq!(sample.joules, None);
        assert_eq!(sample.cores, 2.0);
        // No load recorded at the lease: the region's load now.
        assert_eq!(sample.load, 0.5);
        let loaded_at_start = TaskStatus {
            start_load: Some(0.25),
            ..leased.clone()
        };
        let sample =
            completion_sample((&region, &app), None, &loaded_at_start, None, None, 12_500).unwrap();
        assert_eq!(sample.load, 0.25);
        assert_eq!(sample.cpu_model.as_deref(), Some("edge-a"));
        assert_eq!(sample.features.spectra, 500);
        assert_eq!(sample.features.moments, 4);
        // (40 W idle / 4 cores + 10 W) x PUE 1.
        assert_eq!(sample.joules_per_cpu_second, 20.0);
        // The worker's measurement wins.
        let measured = completion_sample(
            (&region, &app),
            None,
            &leased,
            Some(1.25),
            Some(9.0),
            12_500,
        )
        .unwrap();
        assert_eq!((measured.seconds, measured.joules), (1.25, Some(9.0)));
        // Nothing to learn from a task with no time, or a clock that went backwards.
        assert!(completion_sample((&region, &app), None, &leased, None, None, 10_000).is_err());
        assert!(completion_sample((&region, &app), None, &leased, None, None, 9_000).is_err());
        assert!(
            completion_sample((&region, &app), None, &queued_status(), None, None, 9_000).is_err()
        );
        assert!(
            completion_sample((&region, &app), None, &leased, Some(f64::NAN), None, 0).is_err()
        );
    }
}

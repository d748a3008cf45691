//! What a user does to a running application besides editing it: cancel it (workers stop,
//! finished chunks are kept, phase `Cancelled`) or retry it (dead-lettered tasks are queued
//! again with fresh attempts; a Failed or Cancelled application runs again). The decisions are
//! pure functions over typed statuses in `crate::lifecycle`; `cancel` and `retry` apply them
//! through the store.

use serde_json::{Value, json};

use crate::error::{ApiError, ErrorCode};
use crate::lifecycle::{can_cancel, can_retry, cancelled, cancelled_task, retried, retried_task};
use crate::objects::{self, EventType};
use crate::resources::{AppPhase, ApplicationStatus, Kind, TaskStatus};
use crate::store::{Change, Query, Store};
use crate::time::now_rfc3339;

fn phase_of(object: &Value) -> AppPhase {
    serde_json::from_value(object["status"]["phase"].clone()).unwrap_or(AppPhase::Pending)
}

fn refused(name: &str, message: String) -> ApiError {
    ApiError::new(ErrorCode::Conflict, message)
        .with_details(json!({"kind": "Application", "name": name}))
}

/// Rewrites each task of `application` that `step` changes.
async fn update_tasks(
    store: &Store,
    application: &str,
    step: fn(&TaskStatus) -> Option<TaskStatus>,
) -> Result<u32, ApiError> {
    let tasks = store.tasks_of(application).await?;
    let mut changed = 0;
    for task in tasks {
        let name = task["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let written = store
            .write(Kind::Task, &name, |current| -> Result<Change, ApiError> {
                let Some(mut object) = current else {
                    return Ok(Change::Keep);
                };
                let Ok(status) = serde_json::from_value::<TaskStatus>(object["status"].clone())
                else {
                    return Ok(Change::Keep);
                };
                Ok(match step(&status) {
                    Some(next) => {
                        object["status"] = serde_json::to_value(next).unwrap_or_default();
                        Change::Put(object)
                    }
                    None => Change::Keep,
                })
            })
            .await?;
        changed += u32::from(written.changed);
    }
    Ok(changed)
}

/// Sets the application's status by `update` if `allowed` accepts its phase (409 otherwise).
async fn update_application(
    store: &Store,
    name: &str,
    allowed: fn(AppPhase) -> Result<(), String>,
    update: impl FnOnce(&mut ApplicationStatus),
) -> Result<Value, ApiError> {
    let written = store
        .write(
            Kind::Application,
            name,
            |current| -> Result<Change, ApiError> {
                let Some(mut object) = current else {
                    return Err(ApiError::not_found("Application", name));
                };
                if object["metadata"]["deletionTimestamp"].is_string() {
                    return Err(refused(name, "the application is being deleted".into()));
                }
                allowed(phase_of(&object)).map_err(|m| refused(name, m))?;
                let mut status: ApplicationStatus =
                    serde_json::from_value(object["status"].clone()).unwrap_or_default();
                update(&mut status);
                object["status"] = serde_json::to_value(status).unwrap_or_default();
                Ok(Change::Put(object))
            },
        )
        .await?;
    Ok(written.object.unwrap_or_default())
}

/// `POST /api/v1/applications/{name}/cancel`.
pub async fn cancel(store: &Store, name: &str) -> Result<Value, ApiError> {
    let object = update_application(store, name, can_cancel, |status| {
        cancelled(status, &now_rfc3339())
    })
    .await?;
    let withdrawn = update_tasks(store, name, cancelled_task).await?;
    objects::record_event(
        store,
        &object,
        EventType::Normal,
        "Cancelled",
        &format!("cancelled; {withdrawn} running task(s) stopped, finished tasks kept"),
    )
    .await?;
    Ok(object)
}

/// `POST /api/v1/applications/{name}/retry`.
pub async fn retry(store: &Store, name: &str) -> Result<Value, ApiError> {
    let has_tasks = !store
        .list(
            Kind::Task,
            &Query {
                owner: Some(name),
                limit: Some(1),
                ..Default::default()
            },
        )
        .await?
        .is_empty();
    let requeued = update_tasks(store, name, retried_task).await?;
    let object =
        update_application(store, name, can_retry, |status| retried(status, has_tasks)).await?;
    objects::record_event(
        store,
        &object,
        EventType::Normal,
        "Retried",
        &format!("{requeued} dead-lettered task(s) queued again"),
    )
    .await?;
    Ok(object)
}

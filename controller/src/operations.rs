//! What a user does to a running application besides editing it: cancel it (workers stop,
//! finished chunks are kept, phase `Cancelled`) or retry it (dead-lettered tasks are queued
//! again with fresh attempts; a Failed or Cancelled application runs again). The decisions are
//! pure functions over typed statuses; `cancel` and `retry` apply them through the store.

use serde_json::{Value, json};

use crate::error::{ApiError, ErrorCode};
use crate::objects::{self, EventType};
use crate::reconcile::set_condition;
use crate::resources::{AppPhase, ApplicationStatus, Kind, TaskState, TaskStatus};
use crate::store::{Change, Query, Store};
use crate::time::now_rfc3339;

/// Whether an application in `phase` can be cancelled.
pub fn can_cancel(phase: AppPhase) -> Result<(), String> {
    match phase {
        AppPhase::Pending | AppPhase::Scheduling | AppPhase::Running | AppPhase::Suspended => {
            Ok(())
        }
        AppPhase::Succeeded | AppPhase::Failed | AppPhase::Cancelled | AppPhase::Deleting => Err(
            format!("the application is {phase:?}: there is nothing to cancel"),
        ),
    }
}

/// Whether an application in `phase` can be retried.
pub fn can_retry(phase: AppPhase) -> Result<(), String> {
    match phase {
        AppPhase::Failed | AppPhase::Cancelled => Ok(()),
        other => Err(format!(
            "the application is {other:?}: only Failed or Cancelled applications are retried"
        )),
    }
}

/// A task of a cancelled application: a lease is withdrawn (its worker's next heartbeat is
/// refused, so it stops); queued and finished tasks stay as they are.
pub fn cancelled_task(status: &TaskStatus) -> Option<TaskStatus> {
    (status.state == TaskState::Leased).then(|| TaskStatus {
        state: TaskState::Queued,
        worker: None,
        lease_deadline: None,
        error: Some("cancelled".into()),
        ..status.clone()
    })
}

/// A task of a retried application: a dead-lettered one is queued with fresh attempts.
pub fn retried_task(status: &TaskStatus) -> Option<TaskStatus> {
    (status.state == TaskState::DeadLettered).then(|| TaskStatus {
        state: TaskState::Queued,
        attempts: 0,
        worker: None,
        lease_deadline: None,
        ..status.clone()
    })
}

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
    let tasks = store
        .list(
            Kind::Task,
            &Query {
                owner: Some(application),
                ..Default::default()
            },
        )
        .await?;
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
        status.phase = Some(AppPhase::Cancelled);
        status.completion_time = Some(now_rfc3339());
        set_condition(
            &mut status.conditions,
            "Complete",
            false,
            "Cancelled",
            "cancelled by a user; finished tasks are kept",
        );
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
    let object = update_application(store, name, can_retry, |status| {
        // Work that was placed carries on; an application that failed before placing any
        // plans again.
        status.phase = Some(if has_tasks {
            AppPhase::Running
        } else {
            AppPhase::Pending
        });
        status.completion_time = None;
        status.conditions.retain(|c| c.condition_type != "Complete");
    })
    .await?;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn status(state: TaskState, attempts: u32) -> TaskStatus {
        serde_json::from_value(json!({"state": state, "attempts": attempts, "worker": "w",
                                      "leaseDeadline": "1970-01-01T00:00:01.000Z"}))
        .unwrap()
    }

    #[test]
    fn cancel_withdraws_leases_and_keeps_finished_work() {
        let leased = cancelled_task(&status(TaskState::Leased, 1)).unwrap();
        assert_eq!((leased.state, leased.worker), (TaskState::Queued, None));
        assert!(cancelled_task(&status(TaskState::Done, 1)).is_none());
        assert!(cancelled_task(&status(TaskState::Queued, 0)).is_none());
        assert!(can_cancel(AppPhase::Running).is_ok());
        assert!(can_cancel(AppPhase::Succeeded).is_err());
        assert!(can_cancel(AppPhase::Cancelled).is_err());
    }

    #[test]
    fn retry_gives_dead_tasks_fresh_attempts() {
        let again = retried_task(&status(TaskState::DeadLettered, 3)).unwrap();
        assert_eq!((again.state, again.attempts), (TaskState::Queued, 0));
        assert!(retried_task(&status(TaskState::Done, 1)).is_none());
        assert!(can_retry(AppPhase::Failed).is_ok());
        assert!(can_retry(AppPhase::Cancelled).is_ok());
        assert!(can_retry(AppPhase::Running).is_err());
    }
}

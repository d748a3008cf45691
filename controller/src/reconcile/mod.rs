//! Reconcilers: one per kind, idempotent, `reconcile(object, ctx) -> Result<Action>`. Each is a
//! thin shell: it gathers from the store, lets `crate::lifecycle` decide, and applies the
//! decision. They read only what the store holds, so after a restart they carry on where the
//! last process stopped.

pub mod application;
pub mod astro_fit;
pub mod region;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ceccm_federation::RegionDriver;
use serde_json::Value;
use tokio::sync::watch;

use crate::predictor::SharedPredictor;
use crate::resources::{Condition, Kind, TaskStatus};
use crate::store::{Store, StoreError};
use crate::time::now_rfc3339;

pub struct Context {
    pub store: Arc<Store>,
    pub driver: Arc<dyn RegionDriver>,
    pub data_dir: PathBuf,
    /// Prices placements; learns from the telemetry the API records.
    pub predictor: SharedPredictor,
    /// How long an agent may be silent before its region turns NotReady.
    pub region_grace: Duration,
}

pub use crate::lifecycle::Action;

#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("writing results: {0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Api(#[from] crate::error::ApiError),
}

impl From<ReconcileError> for crate::error::ApiError {
    fn from(e: ReconcileError) -> Self {
        match e {
            ReconcileError::Store(e) => e.into(),
            ReconcileError::Api(e) => e,
            ReconcileError::Io(e) => {
                crate::error::ApiError::new(crate::error::ErrorCode::Internal, e.to_string())
            }
        }
    }
}

/// Sets a condition now; its transition time moves only when its status does.
pub fn set_condition(
    conditions: &mut Vec<Condition>,
    kind: &str,
    status: bool,
    reason: &str,
    message: &str,
) {
    crate::lifecycle::set_condition_at(conditions, kind, status, reason, message, &now_rfc3339());
}

type ReconcileFn = for<'a> fn(
    Value,
    &'a Context,
) -> std::pin::Pin<
    Box<dyn Future<Output = Result<Action, ReconcileError>> + Send + 'a>,
>;

/// Runs `reconcile` over every object of `kind` whenever one of `wake_on` changes, and at the
/// soonest requeue asked for (at most `resync` apart), until `stop` turns true.
pub async fn run(
    ctx: Arc<Context>,
    kind: Kind,
    wake_on: &'static [Kind],
    resync: Duration,
    reconcile: ReconcileFn,
    mut stop: watch::Receiver<bool>,
) {
    let mut changes = ctx.store.subscribe();
    loop {
        let mut next = resync;
        match ctx.store.list(kind, &Default::default()).await {
            Ok(objects) => {
                for object in objects {
                    let name = object["metadata"]["name"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string();
                    match reconcile(object, &ctx).await {
                        Ok(Action::Requeue(after)) => next = next.min(after),
                        Ok(Action::AwaitChange) => {}
                        Err(e) => {
                            tracing::warn!(kind = kind.as_str(), name, error = %e, "reconcile failed; retrying");
                            next = next.min(Duration::from_millis(500));
                        }
                    }
                }
            }
            Err(e) => tracing::warn!(kind = kind.as_str(), error = %e, "listing failed; retrying"),
        }
        let deadline = tokio::time::sleep(next);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                _ = &mut deadline => break,
                _ = stop.changed() => return,
                change = changes.recv() => match change {
                    Ok(c) if wake_on.contains(&c.kind) => {
                        // Let a burst of changes settle into one pass.
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        break;
                    }
                    Ok(_) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => break,
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                },
            }
        }
        if *stop.borrow() {
            return;
        }
    }
}

/// Requeues expired leases every `every`, until `stop`.
pub async fn expire_leases(ctx: Arc<Context>, every: Duration, mut stop: watch::Receiver<bool>) {
    loop {
        match crate::queue::expire_leases(&ctx.store).await {
            Ok(requeued) => {
                for task in requeued {
                    let Ok(status) = serde_json::from_value::<TaskStatus>(task["status"].clone())
                    else {
                        continue;
                    };
                    let event = crate::lifecycle::lease_expired_event(&status);
                    let _ = crate::objects::record_event(
                        &ctx.store,
                        &task,
                        event.kind,
                        &event.reason,
                        &event.message,
                    )
                    .await;
                }
            }
            Err(e) => tracing::warn!(error = %e, "lease expiry pass failed"),
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.changed() => return,
        }
    }
}

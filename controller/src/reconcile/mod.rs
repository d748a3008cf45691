//! Reconcilers: one per kind, idempotent, `reconcile(object, ctx) -> Result<Action>`. Each is a
//! thin shell: it gathers from the store, lets `crate::lifecycle` decide, and applies the
//! decision. They read only what the store holds, so after a restart they carry on where the
//! last process stopped.

pub mod application;
pub mod astro_fit;
pub mod region;
pub mod workqueue;

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ceccm_federation::RegionDriver;
use serde_json::Value;
use tokio::sync::{broadcast, watch};

use self::workqueue::{BASE_BACKOFF, WorkQueue};

use crate::predictor::SharedPredictor;
use crate::resources::{Condition, Kind, TaskStatus};
use crate::store::{ChangeEvent, Store, StoreError};
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

pub type ReconcileFn = for<'a> fn(
    Value,
    &'a Context,
) -> std::pin::Pin<
    Box<dyn Future<Output = Result<Action, ReconcileError>> + Send + 'a>,
>;

/// Which objects of a controller's kind a committed change concerns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Wake {
    Nothing,
    /// The object of this name.
    Object(String),
    /// Every object not [`Controller::settled`] when last reconciled.
    Unsettled,
    /// Every object.
    All,
}

/// A controller, as kube-runtime's: the kind it reconciles, which of its objects each change
/// concerns, and the reconcile itself, driven by a per-object work queue.
pub struct Controller {
    pub kind: Kind,
    /// Maps a committed change, of any kind, to the objects it concerns.
    pub wake: fn(&ChangeEvent) -> Wake,
    /// Whether an object, as last reconciled, waits on nothing but its own changes (a finished
    /// application): [`Wake::Unsettled`] passes it by.
    pub settled: fn(&Value) -> bool,
    /// How often every object is reconciled whatever changed. Changes and the requeues that
    /// reconciles ask for drive the work; this only bounds how long a missed change can go
    /// unnoticed, so it is long.
    pub resync: Duration,
    pub reconcile: ReconcileFn,
}

/// Runs `controller` until `stop` turns true: the names of changed objects (and those that
/// asked to be requeued, or failed and wait out their backoff) wait in a [`WorkQueue`] and are
/// reconciled one at a time. An idle store costs nothing but the rare resync.
pub async fn run(ctx: Arc<Context>, controller: Controller, mut stop: watch::Receiver<bool>) {
    let kind = controller.kind;
    let mut changes = ctx.store.subscribe();
    let mut queue = WorkQueue::default();
    let mut unsettled: HashSet<String> = HashSet::new();
    let mut resync_at = Instant::now();
    loop {
        if *stop.borrow() {
            return;
        }
        let now = Instant::now();
        if now >= resync_at {
            match ctx.store.names(kind).await {
                Ok(names) => {
                    names.iter().for_each(|n| queue.add(n));
                    resync_at = now + controller.resync;
                }
                Err(e) => {
                    tracing::warn!(kind = kind.as_str(), error = %e, "listing failed; retrying");
                    resync_at = now + BASE_BACKOFF;
                }
            }
        }
        // Every change already announced joins the queue before the next reconcile, so a
        // burst of changes to one object costs one reconcile.
        loop {
            match changes.try_recv() {
                Ok(change) => {
                    wake(&controller, &change, &mut queue, &unsettled, &mut resync_at);
                }
                Err(broadcast::error::TryRecvError::Empty) => break,
                // Changes were missed: every object is looked at again.
                Err(broadcast::error::TryRecvError::Lagged(_)) => resync_at = Instant::now(),
                Err(broadcast::error::TryRecvError::Closed) => return,
            }
        }
        if resync_at <= Instant::now() {
            continue;
        }
        if let Some(name) = queue.pop(Instant::now()) {
            reconcile_one(&ctx, &controller, &name, &mut queue, &mut unsettled).await;
            continue;
        }
        let wake_at = queue.next_due().map_or(resync_at, |due| due.min(resync_at));
        tokio::select! {
            _ = tokio::time::sleep_until(wake_at.into()) => {}
            _ = stop.changed() => return,
            change = changes.recv() => match change {
                Ok(change) => wake(&controller, &change, &mut queue, &unsettled, &mut resync_at),
                Err(broadcast::error::RecvError::Lagged(_)) => resync_at = Instant::now(),
                Err(broadcast::error::RecvError::Closed) => return,
            },
        }
    }
}

fn wake(
    controller: &Controller,
    change: &ChangeEvent,
    queue: &mut WorkQueue,
    unsettled: &HashSet<String>,
    resync_at: &mut Instant,
) {
    match (controller.wake)(change) {
        Wake::Nothing => {}
        Wake::Object(name) => queue.add(&name),
        Wake::Unsettled => unsettled.iter().for_each(|n| queue.add(n)),
        Wake::All => *resync_at = Instant::now(),
    }
}

/// Reconciles the object `name` as the store holds it now, and queues it again as the reconcile
/// asks (or after its backoff, when it failed).
async fn reconcile_one(
    ctx: &Context,
    controller: &Controller,
    name: &str,
    queue: &mut WorkQueue,
    unsettled: &mut HashSet<String>,
) {
    let kind = controller.kind.as_str();
    let object = match ctx.store.get(controller.kind, name).await {
        Ok(Some(object)) => object,
        Ok(None) => {
            queue.forget(name);
            unsettled.remove(name);
            return;
        }
        Err(e) => {
            let backoff = queue.failed(name, Instant::now());
            tracing::warn!(kind, name, error = %e, ?backoff, "reading failed; retrying");
            return;
        }
    };
    if (controller.settled)(&object) {
        unsettled.remove(name);
    } else if !unsettled.contains(name) {
        unsettled.insert(name.to_string());
    }
    match (controller.reconcile)(object, ctx).await {
        Ok(action) => {
            queue.succeeded(name);
            if let Action::Requeue(after) = action {
                queue.add_at(name, Instant::now() + after);
            }
        }
        Err(e) => {
            let backoff = queue.failed(name, Instant::now());
            tracing::warn!(kind, name, error = %e, ?backoff, "reconcile failed; retrying");
        }
    }
}

/// The name of the object a change is about (`Wake::Nothing` if its body has none).
pub fn changed_object(change: &ChangeEvent) -> Wake {
    crate::store::object_head(&change.body).map_or(Wake::Nothing, |(name, _)| Wake::Object(name))
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

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use serde_json::json;

    use super::*;
    use crate::store::Change;

    /// The names the recording reconcile was called with, in order.
    static SEEN: Mutex<Vec<String>> = Mutex::new(Vec::new());

    /// Records each call; fails the first call on an object labelled `fail: once`.
    fn recording(
        object: Value,
        _ctx: &Context,
    ) -> std::pin::Pin<Box<dyn Future<Output = Result<Action, ReconcileError>> + Send + '_>> {
        let name = object["metadata"]["name"].as_str().unwrap().to_string();
        let fail_once = object["metadata"]["labels"]["fail"] == "once";
        Box::pin(async move {
            let mut seen = SEEN.lock().unwrap();
            let first = !seen.contains(&name);
            seen.push(name);
            if fail_once && first {
                return Err(StoreError::Corrupt("failing once, as asked".into()).into());
            }
            Ok(Action::AwaitChange)
        })
    }

    async fn put(store: &Store, kind: Kind, object: Value) {
        let name = object["metadata"]["name"].as_str().unwrap().to_string();
        store
            .write(kind, &name, |_| Ok::<_, StoreError>(Change::Put(object)))
            .await
            .unwrap();
    }

    fn app(name: &str, phase: &str) -> Value {
        json!({"apiVersion": "ceccm/v1", "kind": "Application",
               "metadata": {"name": name, "labels": {}},
               "spec": {"app": "container", "tasks": [{"command": "true"}]},
               "status": {"phase": phase}})
    }

    /// Waits until `n` calls are seen; returns the calls after the first `from`.
    async fn calls(n: usize, from: usize) -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            {
                let seen = SEEN.lock().unwrap();
                if seen.len() >= n {
                    return seen[from..].to_vec();
                }
            }
            assert!(
                Instant::now() < deadline,
                "{n} reconciles expected, saw {:?}",
                SEEN.lock().unwrap()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Each change costs one reconcile of the object it concerns: no re-list of the others.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_application_controller_reconciles_only_what_a_change_concerns() {
        let ts = crate::testing::sqlite().await;
        let store = &ts.store;
        for i in 0..20 {
            let phase = if i < 18 { "Succeeded" } else { "Running" };
            put(store, Kind::Application, app(&format!("app-{i:02}"), phase)).await;
        }
        let controller = Controller {
            reconcile: recording,
            resync: Duration::from_secs(3600),
            ..application::controller()
        };
        let (stop_tx, stop) = watch::channel(false);
        let running = tokio::spawn(run(
            Arc::new(crate::testing::context(&ts)),
            controller,
            stop,
        ));

        // The first pass: every application, once.
        let mut first = calls(20, 0).await;
        first.sort();
        let all: Vec<String> = (0..20).map(|i| format!("app-{i:02}")).collect();
        assert_eq!(first, all);

        // An application's own change.
        put(store, Kind::Application, app("app-05", "Succeeded")).await;
        assert_eq!(calls(21, 20).await, ["app-05"]);

        // A task's change wakes its application.
        let task = json!({"apiVersion": "ceccm/v1", "kind": "Task",
            "metadata": {"name": "app-07-00000"},
            "spec": {"application": "app-07", "index": 0, "command": "true"},
            "status": {"state": "Queued"}});
        put(store, Kind::Task, task).await;
        assert_eq!(calls(22, 21).await, ["app-07"]);

        // A region's change wakes only the unsettled (Running) applications.
        let region = json!({"apiVersion": "ceccm/v1", "kind": "Region",
            "metadata": {"name": "edge"}, "spec": {"tier": "edge"}});
        put(store, Kind::Region, region).await;
        let mut woken = calls(24, 22).await;
        woken.sort();
        assert_eq!(woken, ["app-18", "app-19"]);

        // A deleted application is not reconciled (the next change's is the next call).
        let deleted = store
            .write(Kind::Application, "app-03", |_| {
                Ok::<_, StoreError>(Change::Delete)
            })
            .await
            .unwrap();
        assert!(deleted.changed);
        put(store, Kind::Application, app("app-11", "Failed")).await;
        assert_eq!(calls(25, 24).await, ["app-11"]);

        // A failed reconcile comes back after its backoff, with no change.
        let mut flaky = app("flaky", "Succeeded");
        flaky["metadata"]["labels"]["fail"] = json!("once");
        put(store, Kind::Application, flaky).await;
        assert_eq!(calls(27, 25).await, ["flaky", "flaky"]);

        stop_tx.send(true).unwrap();
        running.await.unwrap();
        ts.cleanup().await;
    }
}

//! The region reconciler's I/O shell: counts the region's queued and leased tasks, reads a
//! sample of the queued ones for the autoscaler, asks its driver for the workers
//! `lifecycle::region_step` wants (`ceccm_scheduler::autoscale` priced by the predictor) (or, for an agent's region, reads the
//! agent's last heartbeat), writes the health, load, power and energy `lifecycle::decide_region`
//! makes of what it saw, and evicts the tasks the region may no longer hold
//! (`lifecycle::eviction_reason`), as Kubernetes' node lifecycle controller does.

use std::collections::HashMap;

use ceccm_federation::region::DriverKind;
use serde_json::Value;

use super::{Action, Context, ReconcileError};
use crate::lifecycle::{self, PoolFacts, RegionFacts, RegionStep, RegionTasks};
use crate::objects::{self, EventType};
use crate::resources::{
    ApplicationObject, Kind, RELEASE_FINALIZER, RegionObject, TaskSpec, TaskStatus, typed,
};
use crate::scheduling::{self, RegionView};
use crate::store::{Change, Query, Store, StoreError};
use crate::time::now_millis;

/// The region controller: a region's own changes and those of the tasks placed on it (its
/// queue sizes its pool of workers).
pub fn controller() -> super::Controller {
    super::Controller {
        kind: Kind::Region,
        wake: |change| match change.kind {
            Kind::Region => super::changed_object(change),
            Kind::Task => task_region(&change.body),
            Kind::Application | Kind::Dataset | Kind::Event | Kind::Token => super::Wake::Nothing,
        },
        // Regions are few, and each asks to be looked at again while it has agents or workers.
        settled: |_| false,
        resync: std::time::Duration::from_secs(60),
        reconcile: reconcile_boxed,
    }
}

/// The region a task is placed on (none yet: no region's pool changes).
fn task_region(body: &str) -> super::Wake {
    #[derive(serde::Deserialize)]
    struct Task {
        #[serde(default)]
        status: Option<Status>,
    }
    #[derive(serde::Deserialize)]
    struct Status {
        #[serde(default)]
        region: Option<String>,
    }
    match serde_json::from_str::<Task>(body) {
        Ok(Task {
            status: Some(Status {
                region: Some(region),
            }),
        }) => super::Wake::Object(region),
        _ => super::Wake::Nothing,
    }
}

pub fn reconcile_boxed(
    object: Value,
    ctx: &Context,
) -> std::pin::Pin<Box<dyn Future<Output = Result<Action, ReconcileError>> + Send + '_>> {
    Box::pin(reconcile(object, ctx))
}

/// The region's queued and leased tasks, and the cores the next one to lease asks for.
pub async fn region_tasks(store: &Store, region: &str) -> Result<RegionTasks, StoreError> {
    let count = |phase| Query {
        phase: Some(phase),
        region: Some(region),
        ..Default::default()
    };
    // What the next task to lease asks for sets how many workers the cores hold.
    let next = store
        .list(
            Kind::Task,
            &Query {
                limit: Some(1),
                ..count("Queued")
            },
        )
        .await?;
    let cores_per_task = next
        .first()
        .and_then(|t| typed::<TaskSpec, TaskStatus>(t).ok())
        .map_or(1.0, |t| t.spec.cores());
    Ok(RegionTasks {
        queued: store.count(Kind::Task, &count("Queued")).await? as u32,
        leased: store.count(Kind::Task, &count("Leased")).await? as u32,
        cores_per_task,
    })
}

/// How many of a region's queued tasks the autoscaler reads; they stand for the whole queue.
pub const QUEUE_SAMPLE: i64 = 256;

/// What the autoscaler needs about `region`'s pool (`queued` tasks wait there, `workers` are
/// up): its snapshot and its queued tasks grouped by application, features and cores. The first
/// [`QUEUE_SAMPLE`] queued tasks are read and their counts scaled to the whole queue.
pub async fn pool_facts(
    store: &Store,
    region: &RegionObject,
    queued: u32,
    workers: u32,
) -> Result<PoolFacts, StoreError> {
    let name = region.metadata.name.as_str();
    let sample = if queued == 0 {
        Vec::new()
    } else {
        store
            .list(
                Kind::Task,
                &Query {
                    phase: Some("Queued"),
                    region: Some(name),
                    limit: Some(QUEUE_SAMPLE),
                    ..Default::default()
                },
            )
            .await?
    };
    let mut applications: HashMap<String, Option<ApplicationObject>> = HashMap::new();
    let mut groups: Vec<(ceccm_scheduler::TaskGroup, u64)> = Vec::new();
    let read = sample.len().max(1) as u64;
    for object in &sample {
        let Ok(task) = typed::<TaskSpec, TaskStatus>(object) else {
            continue;
        };
        let application = task.spec.application.clone();
        if !applications.contains_key(&application) {
            let app = store
                .get(Kind::Application, &application)
                .await?
                .and_then(|a| typed::<_, _>(&a).ok());
            applications.insert(application.clone(), app);
        }
        let Some(Some(app)) = applications.get(&application) else {
            continue;
        };
        let group = scheduling::queued_task_group(&app.spec, task.spec.features, task.spec.cores());
        match groups
            .iter_mut()
            .find(|(g, _)| g.features == group.features && g.resources == group.resources)
        {
            Some((_, n)) => *n += 1,
            None => groups.push((group, 1)),
        }
    }
    // The sample stands for the whole queue.
    for (_, n) in &mut groups {
        *n = (*n * u64::from(queued)).div_ceil(read);
    }
    Ok(PoolFacts {
        region: scheduling::snapshot(&RegionView::of(region.clone())),
        queued: groups,
        workers,
    })
}

pub async fn reconcile(object: Value, ctx: &Context) -> Result<Action, ReconcileError> {
    let region: RegionObject = typed(&object)?;
    let name = region.metadata.name.as_str();
    let deleting = region.metadata.deletion_timestamp.is_some();
    let tasks = if deleting {
        RegionTasks::default()
    } else {
        region_tasks(&ctx.store, name).await?
    };
    let status = region.status.clone().unwrap_or_default();
    // Gather what the autoscaler reads, then decide under the predictor's lock (no await).
    let pool = if deleting {
        PoolFacts {
            region: scheduling::snapshot(&RegionView::of(region.clone())),
            queued: Vec::new(),
            workers: 0,
        }
    } else {
        let up = match region.spec.driver {
            DriverKind::Agent => status.agent.as_ref().map_or(0, |a| a.workers),
            DriverKind::Local | DriverKind::Kubernetes => status.workers,
        };
        pool_facts(&ctx.store, &region, tasks.queued, up).await?
    };
    let step = lifecycle::region_step(
        deleting,
        region.spec.capacity.cpu,
        tasks,
        &pool,
        &*ctx.predictor.read(),
    );
    let workers = match step {
        RegionStep::Release => {
            // Its work goes elsewhere before the region goes.
            evict_all(
                &ctx.store,
                name,
                &format!("region {name} was deleted"),
                true,
            )
            .await?;
            ctx.driver.release(name);
            objects::remove_finalizer(&ctx.store, Kind::Region, name, RELEASE_FINALIZER).await?;
            return Ok(Action::AwaitChange);
        }
        RegionStep::Ensure { workers } => workers,
    };
    let now_ms = now_millis();
    let observed = match region.spec.driver {
        DriverKind::Local => ctx
            .driver
            .ensure(name, &region.spec, workers)
            .map_err(|e| e.to_string()),
        // The agent runs the workers on its host; the server only hears its heartbeats.
        DriverKind::Agent => lifecycle::agent_observation(
            status.agent.as_ref(),
            now_ms,
            ctx.region_grace.as_millis() as i64,
        ),
        DriverKind::Kubernetes => {
            Err(ceccm_federation::DriverError::Unsupported("kubernetes".into()).to_string())
        }
    };
    let decision = lifecycle::decide_region(&RegionFacts {
        spec: &region.spec,
        status: &status,
        tasks,
        observed,
        now_ms,
    });
    let current = decision.status.as_ref().unwrap_or(&status);
    if let Some(new) = &decision.status {
        let value = serde_json::to_value(new).unwrap_or_default();
        objects::update_status(&ctx.store, Kind::Region, name, |s| {
            // The agent's report is the API's to write: keep the newest one.
            let agent = s["agent"].take();
            *s = value;
            if !agent.is_null() {
                s["agent"] = agent;
            }
        })
        .await?;
    }
    if let Some(event) = &decision.event {
        objects::record_event(
            &ctx.store,
            &object,
            event.kind,
            &event.reason,
            &event.message,
        )
        .await?;
    }
    if let Some(since) = lifecycle::not_ready_since(current) {
        let mut tolerations: HashMap<String, Option<u64>> = HashMap::new();
        let mut evicted = 0;
        for task in tasks_of_region(&ctx.store, name).await? {
            let application = task.spec.application.clone();
            let tolerated = match tolerations.get(&application) {
                Some(t) => *t,
                None => {
                    let t = toleration_of(&ctx.store, &application).await?;
                    tolerations.insert(application, t);
                    t
                }
            };
            if let Some(why) = lifecycle::eviction_reason(name, since, tolerated, now_ms) {
                evicted += evict_task(&ctx.store, name, &task.metadata.name, &why).await? as u32;
            }
        }
        if evicted > 0 {
            tracing::info!(region = name, evicted, "evicted tasks of a NotReady region");
        }
    }
    Ok(decision.action)
}

/// How long the application's work stays on a NotReady region (`None`: for ever); a gone
/// application's tasks have nowhere to stay.
async fn toleration_of(store: &Store, application: &str) -> Result<Option<u64>, ReconcileError> {
    Ok(match store.get(Kind::Application, application).await? {
        Some(app) => typed::<_, _>(&app)
            .map(|a: ApplicationObject| a.spec.placement.not_ready_toleration_seconds())
            .unwrap_or(Some(0)),
        None => Some(0),
    })
}

/// The region's queued and leased tasks.
async fn tasks_of_region(
    store: &Store,
    region: &str,
) -> Result<Vec<crate::resources::TaskObject>, ReconcileError> {
    let mut out = Vec::new();
    for phase in ["Queued", "Leased"] {
        let query = Query {
            phase: Some(phase),
            region: Some(region),
            ..Default::default()
        };
        for object in store.list(Kind::Task, &query).await? {
            out.push(typed::<TaskSpec, TaskStatus>(&object)?);
        }
    }
    Ok(out)
}

/// Evicts the region's queued tasks (and its leased ones with `include_leased`) for `why`;
/// returns how many left it.
pub async fn evict_all(
    store: &Store,
    region: &str,
    why: &str,
    include_leased: bool,
) -> Result<u32, ReconcileError> {
    let mut evicted = 0;
    for task in tasks_of_region(store, region).await? {
        let leased = task
            .status
            .as_ref()
            .is_some_and(|s| s.state == crate::resources::TaskState::Leased);
        if include_leased || !leased {
            evicted += evict_task(store, region, &task.metadata.name, why).await? as u32;
        }
    }
    Ok(evicted)
}

/// Takes one task off `region` if it is still there and unfinished; records why on the task.
async fn evict_task(
    store: &Store,
    region: &str,
    task: &str,
    why: &str,
) -> Result<bool, ReconcileError> {
    let written = store
        .write(
            Kind::Task,
            task,
            |current| -> Result<Change, ReconcileError> {
                let Some(mut object) = current else {
                    return Ok(Change::Keep);
                };
                let status: TaskStatus = serde_json::from_value(object["status"].clone())
                    .map_err(|e| StoreError::Corrupt(e.to_string()))?;
                if status.region.as_deref() != Some(region) {
                    return Ok(Change::Keep);
                }
                Ok(match lifecycle::on_evicted(&status, why) {
                    Some(new) => {
                        object["status"] = serde_json::to_value(new).unwrap_or_default();
                        Change::Put(object)
                    }
                    None => Change::Keep,
                })
            },
        )
        .await?;
    if written.changed
        && let Some(object) = &written.object
    {
        objects::record_event(store, object, EventType::Warning, "Evicted", why).await?;
    }
    Ok(written.changed)
}

//! The region reconciler's I/O shell: counts the region's queued and leased tasks, asks its
//! driver for the workers `lifecycle::region_step` wants, and writes the health, load, power
//! and energy `lifecycle::decide_region` makes of what the driver saw.

use ceccm_federation::region::DriverKind;
use serde_json::Value;

use super::{Action, Context, ReconcileError};
use crate::lifecycle::{self, RegionFacts, RegionStep, RegionTasks};
use crate::objects;
use crate::resources::{Kind, RELEASE_FINALIZER, RegionObject, TaskSpec, TaskStatus, typed};
use crate::store::Query;
use crate::time::now_millis;

pub fn reconcile_boxed(
    object: Value,
    ctx: &Context,
) -> std::pin::Pin<Box<dyn Future<Output = Result<Action, ReconcileError>> + Send + '_>> {
    Box::pin(reconcile(object, ctx))
}

pub async fn reconcile(object: Value, ctx: &Context) -> Result<Action, ReconcileError> {
    let region: RegionObject = typed(&object)?;
    let name = region.metadata.name.as_str();
    let deleting = region.metadata.deletion_timestamp.is_some();
    let tasks = if deleting {
        RegionTasks::default()
    } else {
        let count = |phase| Query {
            phase: Some(phase),
            region: Some(name),
            ..Default::default()
        };
        // What the next task to lease asks for sets how many workers the cores hold.
        let next = ctx
            .store
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
        RegionTasks {
            queued: ctx.store.count(Kind::Task, &count("Queued")).await? as u32,
            leased: ctx.store.count(Kind::Task, &count("Leased")).await? as u32,
            cores_per_task,
        }
    };
    let workers = match lifecycle::region_step(deleting, region.spec.capacity.cpu, tasks) {
        RegionStep::Release => {
            ctx.driver.release(name);
            objects::remove_finalizer(&ctx.store, Kind::Region, name, RELEASE_FINALIZER).await?;
            return Ok(Action::AwaitChange);
        }
        RegionStep::Ensure { workers } => workers,
    };
    let observed = match region.spec.driver {
        DriverKind::Local => ctx
            .driver
            .ensure(name, &region.spec, workers)
            .map_err(|e| e.to_string()),
        other => Err(ceccm_federation::DriverError::Unsupported(
            format!("{other:?}").to_lowercase(),
        )
        .to_string()),
    };
    let status = region.status.clone().unwrap_or_default();
    let decision = lifecycle::decide_region(&RegionFacts {
        spec: &region.spec,
        status: &status,
        tasks,
        observed,
        now_ms: now_millis(),
    });
    if let Some(new) = &decision.status {
        let value = serde_json::to_value(new).unwrap_or_default();
        objects::update_status(&ctx.store, Kind::Region, name, |s| *s = value).await?;
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
    Ok(decision.action)
}

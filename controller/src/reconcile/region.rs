//! Region reconciler: asks the region's driver to run as many workers as the region has queued
//! or leased tasks (up to its capacity), and records health, load, power and energy.

use std::time::Duration;

use ceccm_federation::RegionStatus;
use ceccm_federation::region::{Capacity, DriverKind};
use serde_json::Value;

use super::{Action, Context, ReconcileError};
use crate::objects::{self, EventType};
use crate::resources::{Kind, RELEASE_FINALIZER, RegionObject, typed};
use crate::store::Query;
use crate::time::{now_millis, now_rfc3339, parse_millis};

/// A region's status is rewritten at least this often even when nothing else changed.
const HEARTBEAT_MS: i64 = 10_000;

pub fn reconcile_boxed(
    object: Value,
    ctx: &Context,
) -> std::pin::Pin<Box<dyn Future<Output = Result<Action, ReconcileError>> + Send + '_>> {
    Box::pin(reconcile(object, ctx))
}

pub async fn reconcile(object: Value, ctx: &Context) -> Result<Action, ReconcileError> {
    let region: RegionObject = typed(&object)?;
    let name = region.metadata.name.as_str();
    if region.metadata.deletion_timestamp.is_some() {
        ctx.driver.release(name);
        objects::remove_finalizer(&ctx.store, Kind::Region, name, RELEASE_FINALIZER).await?;
        return Ok(Action::AwaitChange);
    }
    let count = |phase| Query {
        phase: Some(phase),
        region: Some(name),
        ..Default::default()
    };
    let queued = ctx.store.count(Kind::Task, &count("Queued")).await? as u32;
    let leased = ctx.store.count(Kind::Task, &count("Leased")).await? as u32;
    let observed = match region.spec.driver {
        DriverKind::Local => ctx.driver.ensure(name, &region.spec, queued + leased),
        other => Err(ceccm_federation::DriverError::Unsupported(
            format!("{other:?}").to_lowercase(),
        )),
    };
    let old = region.status.clone().unwrap_or_default();
    let cpu = region.spec.capacity.cpu.max(1);
    let mut new = RegionStatus {
        heartbeat_time: old.heartbeat_time.clone(),
        allocatable: Some(Capacity {
            cpu: region.spec.capacity.cpu.saturating_sub(leased),
            ..region.spec.capacity.clone()
        }),
        load: f64::from(leased.min(cpu)) / f64::from(cpu),
        power_watts: region.spec.energy.power_watts(f64::from(leased.min(cpu))),
        ..old.clone()
    };
    match observed {
        Ok(seen) => {
            new.phase = Some(if seen.healthy { "Ready" } else { "NotReady" }.into());
            new.message = (!seen.message.is_empty()).then_some(seen.message);
            new.workers = seen.workers;
            new.cpu_seconds = seen.cpu_seconds.max(old.cpu_seconds);
            new.energy_joules = region.spec.energy.work_joules(new.cpu_seconds);
        }
        Err(e) => {
            new.phase = Some("NotReady".into());
            new.message = Some(e.to_string());
            new.workers = 0;
        }
    }
    let stale = old
        .heartbeat_time
        .as_deref()
        .and_then(parse_millis)
        .is_none_or(|t| now_millis() - t >= HEARTBEAT_MS);
    if new != old || stale {
        new.heartbeat_time = Some(now_rfc3339());
        let value = serde_json::to_value(&new).unwrap_or_default();
        objects::update_status(&ctx.store, Kind::Region, name, |s| *s = value).await?;
    }
    if new.phase != old.phase {
        let (event_type, reason) = match new.phase.as_deref() {
            Some("Ready") => (EventType::Normal, "Ready"),
            _ => (EventType::Warning, "NotReady"),
        };
        let message = new
            .message
            .clone()
            .unwrap_or_else(|| format!("{} workers", new.workers));
        objects::record_event(&ctx.store, &object, event_type, reason, &message).await?;
    }
    Ok(Action::Requeue(Duration::from_secs(1)))
}

//! Autoscaling: how many workers a region should run, from the predicted time to drain its queue.
//!
//! The queue's work is the predictor's run time for each queued task on this region, times the
//! workers one task occupies (a four-core task on one-core workers holds four). With `w`
//! workers the queue drains in `work / w` seconds; the region gets the fewest workers that bring
//! that under the target, within its capacity and the policy's bounds: zero when nothing is
//! queued and the policy's minimum is zero. Scaling down is damped (at most half the workers
//! per decision, rounded up, so that a last idle worker does go), as Kubernetes' autoscaler
//! damps it, so that a momentary lull does not tear down a pool that the next burst needs.

use serde::{Deserialize, Serialize};

use crate::model::{RegionSnapshot, Resources, TaskGroup};
use crate::placement::CostModel;

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AutoscalePolicy {
    /// Predicted seconds to drain the queue that the region should stay under.
    pub target_queue_seconds: f64,
    pub min_workers: u64,
    pub max_workers: u64,
    /// What one worker holds while running.
    pub worker: Resources,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ScaleDecision {
    pub workers: u64,
    /// Predicted seconds of work queued, over one worker.
    pub queued_work_seconds: f64,
    /// Predicted seconds to drain the queue with the current workers (infinite with none).
    pub queue_seconds_now: f64,
    /// The same with the decided workers.
    pub queue_seconds_after: f64,
    pub reason: String,
}

/// Workers `region` should run for `queued` (task group, tasks waiting), given `current` workers.
pub fn desired_workers(
    region: &RegionSnapshot,
    queued: &[(&TaskGroup, u64)],
    current: u64,
    policy: &AutoscalePolicy,
    model: &impl CostModel,
) -> ScaleDecision {
    let work: f64 = queued
        .iter()
        .filter(|(_, n)| *n > 0)
        .map(|(group, n)| {
            *n as f64
                * model.task_cost(region, group).seconds
                * workers_per_task(group, &policy.worker)
        })
        .sum();
    let drain = |w: u64| {
        if w == 0 {
            if work > 0.0 { f64::INFINITY } else { 0.0 }
        } else {
            work / w as f64
        }
    };
    let fit = region.capacity.copies_of(&policy.worker);
    let ceiling = policy.max_workers.min(fit).max(policy.min_workers.min(fit));
    let target = policy.target_queue_seconds.max(f64::MIN_POSITIVE);
    let needed = (work / target).ceil().min(u64::MAX as f64) as u64;
    let wanted = needed.clamp(policy.min_workers.min(ceiling), ceiling);
    let (workers, reason) = if wanted >= current {
        let reason = if wanted == current {
            "queue time is on target".to_string()
        } else if needed > ceiling {
            format!("capped at {ceiling} workers (capacity and policy); the queue needs {needed}")
        } else {
            format!(
                "scale up: {needed} workers drain the queue within {:.0} s",
                policy.target_queue_seconds
            )
        };
        (wanted, reason)
    } else {
        let floor = (current / 2).max(wanted);
        (
            floor,
            format!("scale down towards {wanted} workers, at most half per decision"),
        )
    };
    ScaleDecision {
        workers,
        queued_work_seconds: work,
        queue_seconds_now: drain(current),
        queue_seconds_after: drain(workers),
        reason,
    }
}

/// Workers one task of `group` keeps busy: its cores over a worker's, rounded up, at least one
/// (a worker runs one task at a time).
pub fn workers_per_task(group: &TaskGroup, worker: &Resources) -> f64 {
    if worker.cpu_millis == 0 {
        return 1.0;
    }
    (group.resources.cpu_millis as f64 / worker.cpu_millis as f64)
        .ceil()
        .max(1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 7 ms per reference spectrum: round numbers (7 s for 1000 spectra on a reference core).
    fn model() -> AnalyticCostModel {
        AnalyticCostModel {
            seconds_per_spectrum: 0.007,
            ..AnalyticCostModel::default()
        }
    }
    use crate::analytic::AnalyticCostModel;
    use crate::model::{CarbonIntensity, EnergyProfile, Network, Objective, TaskFeatures, Tier};

    fn region(cores: f64) -> RegionSnapshot {
        RegionSnapshot::new(
            "edge-caha",
            Tier::Edge,
            Resources::new(cores, 1 << 20, 0),
            EnergyProfile {
                idle_watts: 10.0,
                watts_per_core: 3.0,
                pue: 1.1,
                carbon_intensity: CarbonIntensity::Constant(150.0),
            },
            Network {
                uplink_mbps: 100.0,
                rtt_ms: 30.0,
            },
        )
    }

    /// Tasks of 1000 reference spectra on one core: 7 s each on a reference region.
    fn group() -> TaskGroup {
        TaskGroup {
            name: "tarsis-night".into(),
            tasks: 1,
            features: TaskFeatures {
                spectra: 1000,
                pixels: 4437,
                templates: 150,
                moments: 2,
            },
            resources: Resources::new(1.0, 1024, 0),
            input: Default::default(),
            constraints: Default::default(),
            objective: Objective::Latency,
            deadline_s: None,
            parallelism: None,
            start_s: 0.0,
        }
    }

    fn policy() -> AutoscalePolicy {
        AutoscalePolicy {
            target_queue_seconds: 70.0,
            min_workers: 1,
            max_workers: 32,
            worker: Resources::new(1.0, 1024, 0),
        }
    }

    #[test]
    fn scales_up_to_meet_the_queue_target() {
        let g = group();
        // 100 tasks x 7 s = 700 s of work: 10 workers drain it in 70 s.
        let d = desired_workers(&region(64.0), &[(&g, 100)], 2, &policy(), &model());
        assert_eq!(d.workers, 10);
        assert!((d.queued_work_seconds - 700.0).abs() < 1e-9);
        assert!((d.queue_seconds_now - 350.0).abs() < 1e-9);
        assert!((d.queue_seconds_after - 70.0).abs() < 1e-9);
        assert!(d.reason.starts_with("scale up: 10 workers"), "{}", d.reason);
    }

    #[test]
    fn a_multi_core_task_counts_as_many_workers() {
        let mut g = group();
        g.resources = Resources::new(4.0, 4096, 0);
        // 7 CPU seconds on four cores: 1.75 s a task; 40 tasks x 1.75 s x 4 one-core workers
        // = 280 s of worker time, which 4 workers drain in 70 s.
        let d = desired_workers(&region(64.0), &[(&g, 40)], 0, &policy(), &model());
        assert!((d.queued_work_seconds - 280.0).abs() < 1e-9, "{d:?}");
        assert_eq!(d.workers, 4);
    }

    #[test]
    fn never_exceeds_capacity_or_the_policy_maximum() {
        let g = group();
        let d = desired_workers(&region(6.0), &[(&g, 1000)], 2, &policy(), &model());
        assert_eq!(d.workers, 6);
        assert!(d.reason.contains("capped at 6 workers"), "{}", d.reason);
        let d = desired_workers(&region(64.0), &[(&g, 100_000)], 2, &policy(), &model());
        assert_eq!(d.workers, 32);
    }

    #[test]
    fn scales_down_at_most_half_per_decision_and_keeps_the_minimum() {
        let g = group();
        let model = model();
        let d = desired_workers(&region(64.0), &[(&g, 0)], 20, &policy(), &model);
        assert_eq!(d.workers, 10);
        let d = desired_workers(&region(64.0), &[], 1, &policy(), &model);
        assert_eq!(d.workers, 1);
        assert_eq!(d.queue_seconds_after, 0.0);
        // With no minimum, an idle pool goes to zero: 4 -> 2 -> 1 -> 0.
        let to_zero = AutoscalePolicy {
            min_workers: 0,
            ..policy()
        };
        let mut workers = 4;
        let mut seen = Vec::new();
        while workers > 0 {
            workers = desired_workers(&region(64.0), &[], workers, &to_zero, &model).workers;
            seen.push(workers);
        }
        assert_eq!(seen, [2, 1, 0]);
        // A slower region needs more workers for the same queue.
        let mut slow = region(64.0);
        slow.cpu_speed = Some(0.5);
        let d = desired_workers(&slow, &[(&g, 100)], 10, &policy(), &model);
        assert_eq!(d.workers, 20);
    }
}

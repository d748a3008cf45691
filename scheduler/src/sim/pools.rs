//! Worker pools in the simulator: what keeping workers up costs when they have nothing to run.
//!
//! The engine charges a task its busy cores' draw plus their share of the region's idle draw
//! (`idle_watts / cores` per busy core, times PUE): a core that runs nothing costs nothing there,
//! as if it were switched off. A worker that is up but idle is not free: it holds its core's
//! share of the idle draw. A worker here is one core's slot (the local driver and the agent run
//! at most one worker per core), and a replica of a job holds as many workers as it has cores.
//! This module replays each region's replicas (when they were placed, started and ended) against
//! two pools and charges the idle workers of each at the same idle share:
//!
//! * **one worker per core**: every core of every region holds a worker from the start of the
//!   trace to its last task (what a pool sized to capacity does);
//! * **autoscaled**: every [`AUTOSCALE_INTERVAL_S`] the region's pool is resized by
//!   [`desired_workers`] from the predicted time to drain the tasks queued on it (the analytic
//!   prior's run times, the model the controller starts from), minimum zero, at most the
//!   region's cores, scaled down by at most half per decision. Between decisions a placement
//!   that needs more workers than are up starts them at once (the engine has already started its
//!   replicas, so the pool never holds fewer workers than the placed replicas need).
//!
//! Outside the model: a worker's start-up time and energy (it would delay the first task of a
//! cold region by seconds), and any draw of a region with no worker at all (taken to be off or
//! lent to other work, as the task energy already assumes).

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use serde::Serialize;

use crate::autoscale::{AutoscalePolicy, desired_workers};
use crate::energy::JOULES_PER_KWH;
use crate::model::{RegionSnapshot, Resources, TaskGroup};
use crate::placement::CostModel;

/// Seconds between two autoscaling decisions of a region.
pub const AUTOSCALE_INTERVAL_S: f64 = 30.0;
/// Predicted seconds to drain a region's queue that the autoscaler aims for.
pub const AUTOSCALE_TARGET_QUEUE_S: f64 = 60.0;

/// One replica of one job on one region, as the engine ran it.
#[derive(Debug, Clone, PartialEq)]
pub struct ReplicaRun {
    pub job: usize,
    /// When the job was placed (the replica's workers are needed from then).
    pub placed: f64,
    /// When its input had arrived and its first task started.
    pub ready: f64,
    /// When its last task ended.
    pub end: f64,
    pub cpu_millis: u64,
    /// Start of each of its tasks, in order (they run back to back from `ready` to `end`).
    pub task_starts: Vec<f64>,
}

/// The idle draw of the two pools over the whole trace, summed over regions.
#[derive(Debug, Clone, PartialEq, Serialize, Default)]
pub struct PoolEnergy {
    /// Idle workers' energy with one worker per core for the whole trace.
    pub per_core_idle_kwh: f64,
    /// Idle workers' energy with pools sized by the autoscaler.
    pub autoscaled_idle_kwh: f64,
    /// Worker-seconds (one-core workers) each pool held, busy or not.
    pub per_core_worker_s: f64,
    pub autoscaled_worker_s: f64,
    /// Core-seconds of tasks (the same under both pools).
    pub busy_core_s: f64,
}

fn workers_for(cpu_millis: u64) -> u64 {
    cpu_millis.div_ceil(1000)
}

/// What the pools of `regions` would cost for the replicas in `runs` (indexed like `regions`),
/// over a trace that ends at `horizon_s`; `model` predicts the queued tasks' run times.
pub fn pool_energy(
    regions: &[RegionSnapshot],
    groups: &[TaskGroup],
    runs: &[Vec<ReplicaRun>],
    horizon_s: f64,
    model: &impl CostModel,
) -> PoolEnergy {
    let mut total = PoolEnergy::default();
    for (region, runs) in regions.iter().zip(runs) {
        let cores = region.capacity.cores();
        // A worker's share of the idle draw: what the task energy charges a busy core on top of
        // the core's own draw.
        let idle_joules_per_worker_s = if cores > 0.0 {
            region.energy.idle_watts / cores * region.energy.pue
        } else {
            0.0
        };
        let busy: f64 = runs
            .iter()
            .map(|r| (r.end - r.ready) * r.cpu_millis as f64 / 1000.0)
            .sum();
        let per_core = cores * horizon_s;
        let autoscaled = autoscaled_worker_seconds(region, groups, runs, model);
        total.busy_core_s += busy;
        total.per_core_worker_s += per_core;
        total.autoscaled_worker_s += autoscaled;
        total.per_core_idle_kwh +=
            (per_core - busy).max(0.0) * idle_joules_per_worker_s / JOULES_PER_KWH;
        total.autoscaled_idle_kwh +=
            (autoscaled - busy).max(0.0) * idle_joules_per_worker_s / JOULES_PER_KWH;
    }
    total
}

/// Worker-seconds one region's autoscaled pool holds while `runs` run on it: decisions every
/// [`AUTOSCALE_INTERVAL_S`] from the first placement until the pool is back to zero with nothing
/// placed, and immediate starts when a placement needs more workers than are up.
fn autoscaled_worker_seconds(
    region: &RegionSnapshot,
    groups: &[TaskGroup],
    runs: &[ReplicaRun],
    model: &impl CostModel,
) -> f64 {
    let policy = AutoscalePolicy {
        target_queue_seconds: AUTOSCALE_TARGET_QUEUE_S,
        min_workers: 0,
        max_workers: workers_for(region.capacity.cpu_millis),
        worker: Resources::new(1.0, 0, 0),
    };
    let mut order: Vec<usize> = (0..runs.len()).collect();
    order.sort_by(|&a, &b| runs[a].placed.total_cmp(&runs[b].placed));
    let mut next_run = 0;
    // Replicas placed and not yet ended, by the time they end.
    let mut ends: BinaryHeap<Reverse<(OrderedEnd, usize)>> = BinaryHeap::new();
    let mut active: Vec<usize> = Vec::new();
    let (mut demand_millis, mut workers) = (0u64, 0u64);
    let (mut now, mut worker_seconds) = (0.0f64, 0.0f64);
    let mut next_tick = f64::INFINITY;
    loop {
        let place_at = order
            .get(next_run)
            .map_or(f64::INFINITY, |&i| runs[i].placed);
        let end_at = ends.peek().map_or(f64::INFINITY, |Reverse((e, _))| e.0);
        let at = place_at.min(end_at).min(next_tick);
        if at == f64::INFINITY {
            break;
        }
        worker_seconds += workers as f64 * (at - now);
        now = at;
        // Ends first, then placements, then the decision: a decision sees what is up at `now`.
        if end_at == at {
            let Reverse((_, i)) = ends.pop().expect("peeked");
            demand_millis -= runs[i].cpu_millis;
        } else if place_at == at {
            let i = order[next_run];
            next_run += 1;
            demand_millis += runs[i].cpu_millis;
            workers = workers.max(workers_for(demand_millis));
            ends.push(Reverse((OrderedEnd(runs[i].end), i)));
            active.push(i);
            if next_tick == f64::INFINITY {
                next_tick = ((now / AUTOSCALE_INTERVAL_S).floor() + 1.0) * AUTOSCALE_INTERVAL_S;
            }
        } else {
            active.retain(|&i| runs[i].end > now);
            let queued: Vec<(&TaskGroup, u64)> = active
                .iter()
                .map(|&i| {
                    let starts = &runs[i].task_starts;
                    let started = starts.partition_point(|&s| s <= now);
                    (&groups[runs[i].job], (starts.len() - started) as u64)
                })
                .collect();
            let decision = desired_workers(region, &queued, workers, &policy, model);
            workers = decision.workers.max(workers_for(demand_millis));
            next_tick = if workers == 0 && active.is_empty() {
                f64::INFINITY
            } else {
                next_tick + AUTOSCALE_INTERVAL_S
            };
        }
    }
    worker_seconds
}

/// A replica's end time, ordered (ends are finite).
#[derive(Debug, Clone, Copy, PartialEq)]
struct OrderedEnd(f64);

impl Eq for OrderedEnd {}
impl PartialOrd for OrderedEnd {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for OrderedEnd {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.total_cmp(&other.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::analytic::AnalyticCostModel;
    use crate::model::{CarbonIntensity, EnergyProfile, Network, Objective, TaskFeatures, Tier};

    fn region() -> RegionSnapshot {
        RegionSnapshot::new(
            "edge-a",
            Tier::Edge,
            Resources::new(8.0, 1 << 16, 0),
            EnergyProfile {
                idle_watts: 80.0,
                watts_per_core: 3.0,
                pue: 1.0,
                carbon_intensity: CarbonIntensity::Constant(100.0),
            },
            Network {
                uplink_mbps: 100.0,
                rtt_ms: 10.0,
            },
        )
    }

    fn group(cores: f64) -> TaskGroup {
        TaskGroup {
            name: "fit".into(),
            tasks: 1,
            features: TaskFeatures {
                spectra: 100,
                pixels: 4437,
                templates: 150,
                moments: 2,
            },
            resources: Resources::new(cores, 1024, 0),
            input: Default::default(),
            constraints: Default::default(),
            objective: Objective::Energy,
            deadline_s: None,
            parallelism: None,
            start_s: 0.0,
        }
    }

    fn run(cores: u64, placed: f64, end: f64, tasks: usize) -> ReplicaRun {
        let step = (end - placed) / tasks as f64;
        ReplicaRun {
            job: 0,
            placed,
            ready: placed,
            end,
            cpu_millis: cores * 1000,
            task_starts: (0..tasks).map(|i| placed + step * i as f64).collect(),
        }
    }

    #[test]
    fn a_worker_stays_up_until_the_decision_after_its_last_task() {
        // One one-core replica busy 0-100 s: its worker goes at the decision of 120 s.
        let runs = vec![vec![run(1, 0.0, 100.0, 4)]];
        let p = pool_energy(
            &[region()],
            &[group(1.0)],
            &runs,
            100.0,
            &AnalyticCostModel::default(),
        );
        assert!((p.busy_core_s - 100.0).abs() < 1e-9, "{p:?}");
        assert!((p.autoscaled_worker_s - 120.0).abs() < 1e-9, "{p:?}");
        assert!((p.per_core_worker_s - 800.0).abs() < 1e-9, "{p:?}");
        // 10 W of idle draw per core: 20 idle worker-seconds against 700.
        let kwh = |joules: f64| joules / JOULES_PER_KWH;
        assert!((p.autoscaled_idle_kwh - kwh(200.0)).abs() < 1e-12, "{p:?}");
        assert!((p.per_core_idle_kwh - kwh(7000.0)).abs() < 1e-12, "{p:?}");
    }

    #[test]
    fn an_idle_pool_halves_at_each_decision_down_to_zero() {
        // Eight cores busy 0-10 s, then nothing: 8 workers until 30 s, 4 until 60, 2, 1, none.
        let runs = vec![vec![run(8, 0.0, 10.0, 1)]];
        let p = pool_energy(
            &[region()],
            &[group(8.0)],
            &runs,
            10.0,
            &AnalyticCostModel::default(),
        );
        assert!(
            (p.autoscaled_worker_s - (8.0 + 4.0 + 2.0 + 1.0) * 30.0).abs() < 1e-9,
            "{p:?}"
        );
    }

    #[test]
    fn a_placement_starts_its_workers_at_once_and_a_later_one_restarts_the_pool() {
        // Two one-core replicas a day apart: the pool goes to zero in between.
        let runs = vec![vec![run(1, 0.0, 10.0, 1), run(1, 86_400.0, 86_410.0, 1)]];
        let p = pool_energy(
            &[region()],
            &[group(1.0)],
            &runs,
            86_410.0,
            &AnalyticCostModel::default(),
        );
        assert!((p.autoscaled_worker_s - 60.0).abs() < 1e-9, "{p:?}");
    }
}

//! A proven lower bound on the energy that any placement policy spends on a trace.
//!
//! The engine's energy of a run is the sum, over every task, of the task's true expected joules
//! on the region that ran it (at that region's load when the task's job was placed) times the
//! task's noise factor, plus the energy of the bytes moved:
//!
//! ```text
//! E = sum_tasks joules(r_t, load_t) x n_t  +  sum_chunks floor(B x k / T) x transfer_joules_per_byte
//! ```
//!
//! where a chunk is the `k` tasks of a job of `T` tasks and `B` input bytes that one region ran.
//! The bound replaces every choice a policy makes by the cheapest one open to it:
//!
//! 1. **Noise.** The factors of job `j` are stream `j` of the seed's generator, drawn in the
//!    order the job's tasks run ([`JobNoise`]); every policy places every job exactly once and
//!    runs all its tasks, so every policy draws exactly the factors `n_j1..n_jT`, and only which
//!    task (hence which region) gets which factor depends on the policy. The bound takes, for
//!    each factor, the cheapest region for a task carrying it, so it holds for the realised run,
//!    whatever the assignment (no expected value is involved).
//! 2. **Regions.** The region a task runs on passed the filter when its job was placed. The
//!    filter's verdict depends on static fields (tier, selectors, taints, data locality,
//!    readiness) and on free capacity, which is never more than at the start of the trace
//!    (allocations only add to the initial ones and are released again). So the feasible set on
//!    the initial snapshot contains every region any policy can use.
//! 3. **Load.** A task's CPU time grows with its region's load, `1 + loadSlowdown x load`; when a
//!    job is placed its own replicas are already allocated, so the load is at least the initial
//!    allocation plus one replica over capacity. The bound uses that least load.
//! 4. **Transfer.** A chunk of `k` tasks moves `floor(B k / T) >= k floor(B / T)` bytes when its
//!    region does not hold the input, so each task off the data's region moves at least
//!    `floor(B / T)` bytes.
//! 5. **Idle draw.** The engine charges a region's idle draw only to busy cores (as their share);
//!    an idle region costs nothing, so there is no energy every policy must pay regardless, and
//!    none is in the bound. (The worker pools' idle draw, [`crate::sim::pools`], is reported
//!    apart and is not part of `energy_kwh`.)
//!
//! Summing the per-task minima gives `E >= bound` for every policy that places every job (a
//! trace that passed its checks leaves none unplaced). The relaxation drops capacity (every task
//! may run on its cheapest region at once) and the coupling of load between jobs; its gap to the
//! best schedule is what the cheapest regions cannot hold at busy times.

use serde::Serialize;

use crate::energy::JOULES_PER_KWH;
use crate::model::{RegionSnapshot, TaskGroup};
use crate::placement::{data_region_index, filter_region};
use crate::sim::engine::JobNoise;
use crate::sim::files::RegionFile;
use crate::sim::truth::true_cost;

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EnergyBound {
    /// The bound on `energy_kwh` of any policy.
    pub energy_kwh: f64,
    /// Of which the tasks' own energy (compute) and the bytes moved.
    pub compute_kwh: f64,
    pub transfer_kwh: f64,
    /// Tasks the bound counts, and those of jobs with no feasible region at all (which no
    /// policy can run either, and which the bound leaves out).
    pub tasks: u64,
    pub infeasible_tasks: u64,
}

/// The least energy any policy can spend on `groups` (in arrival order, indexed as the engine
/// indexes jobs) over `regions`, with the per-task noise of `seed`. See the module's proof.
pub fn energy_lower_bound(regions: &RegionFile, groups: &[TaskGroup], seed: u64) -> EnergyBound {
    let snapshot: Vec<RegionSnapshot> = regions.regions.iter().map(|r| r.spec.clone()).collect();
    let transfer = regions.transfer_joules_per_byte();
    let (mut compute, mut moved, mut tasks, mut infeasible) = (0.0, 0.0, 0u64, 0u64);
    // (joules per unit of noise, transfer joules) of a task of the job on each feasible region.
    let mut options: Vec<(f64, f64)> = Vec::with_capacity(snapshot.len());
    for (job, group) in groups.iter().enumerate() {
        let data_region = data_region_index(&snapshot, group);
        let moves = group.input.bytes > 0 && group.input.region.is_some();
        let bytes_per_task = group.input.bytes.checked_div(group.tasks).unwrap_or(0);
        options.clear();
        for (i, region) in snapshot.iter().enumerate() {
            if filter_region(i, region, group, data_region).is_err() {
                continue;
            }
            let least_load = ((region.allocated.cpu_millis + group.resources.cpu_millis) as f64
                / region.capacity.cpu_millis.max(1) as f64)
                .min(1.0);
            let at_least_load = RegionSnapshot {
                load: least_load,
                ..region.clone()
            };
            let joules = true_cost(&at_least_load, &regions.regions[i].truth, group).joules;
            let transfer_joules = if moves && data_region != Some(i) {
                bytes_per_task as f64 * transfer
            } else {
                0.0
            };
            options.push((joules, transfer_joules));
        }
        if options.is_empty() {
            infeasible += group.tasks;
            continue;
        }
        let mut noise = JobNoise::new(seed, job);
        for _ in 0..group.tasks {
            let n = noise.next_factor();
            let (joules, transfer_joules) = options
                .iter()
                .map(|&(j, t)| (j * n, t))
                .min_by(|a, b| (a.0 + a.1).total_cmp(&(b.0 + b.1)))
                .expect("at least one feasible region");
            compute += joules;
            moved += transfer_joules;
        }
        tasks += group.tasks;
    }
    EnergyBound {
        energy_kwh: (compute + moved) / JOULES_PER_KWH,
        compute_kwh: compute / JOULES_PER_KWH,
        transfer_kwh: moved / JOULES_PER_KWH,
        tasks,
        infeasible_tasks: infeasible,
    }
}

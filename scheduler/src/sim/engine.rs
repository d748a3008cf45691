//! The discrete-event replay.
//!
//! Jobs arrive in trace order. At each arrival (and whenever capacity is released, for jobs
//! that had to wait) the policy splits the job's tasks among regions; the engine allocates the
//! replicas, moves the input (latency + bytes over the slower uplink), runs each replica's tasks
//! back to back at their true cost with per-task noise, and releases the replicas as they finish.
//! Links are not shared between jobs: transfer contention is outside the model.
//!
//! The learned policy sees the telemetry of a task only once the task has finished.

use std::cmp::{Ordering, Reverse};
use std::collections::{BinaryHeap, VecDeque};
use std::time::Instant;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use crate::analytic::AnalyticCostModel;
use crate::energy::JOULES_PER_KWH;
use crate::model::{RegionSnapshot, Resources, TaskGroup};
use crate::placement::{CostModel, data_region_index, filter_region, place};
use crate::predictor::{Predictor, PredictorConfig, PredictorReport, TelemetrySample};
use crate::sim::files::RegionFile;
use crate::sim::pools::{PoolEnergy, ReplicaRun, pool_energy};
use crate::sim::truth::{NOISE_SIGMA, RegionTruth, TruthCostModel, true_cost};

/// How tasks are divided among regions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Policy {
    /// Next region in turn for each task (what a naive dispatcher does).
    RoundRobin,
    /// Each task to the region with the lowest utilisation: the Kubernetes scheduler's default
    /// spreading (LeastAllocated).
    LeastLoaded,
    /// Each task to the fullest region that still has room (MostAllocated).
    BinPacking,
    /// `place` with the analytic cost model.
    GreedyAnalytic,
    /// `place` with the learned predictor, trained online from finished tasks.
    Learned,
    /// `place` with the simulated world's true expected costs: what perfect prediction buys to
    /// the greedy placement. Not optimal (placement is greedy, job by job, and cannot know the
    /// per-task noise): the proven bound is [`crate::sim::bound::energy_lower_bound`].
    OracleGreedy,
}

impl Policy {
    pub const ALL: [Policy; 6] = [
        Policy::RoundRobin,
        Policy::LeastLoaded,
        Policy::BinPacking,
        Policy::GreedyAnalytic,
        Policy::Learned,
        Policy::OracleGreedy,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Policy::RoundRobin => "round-robin",
            Policy::LeastLoaded => "least-loaded",
            Policy::BinPacking => "bin-packing",
            Policy::GreedyAnalytic => "greedy-analytic",
            Policy::Learned => "learned",
            Policy::OracleGreedy => "oracle-greedy",
        }
    }

    pub fn from_name(name: &str) -> Option<Policy> {
        Policy::ALL.into_iter().find(|p| p.name() == name)
    }
}

/// What one policy achieved on the trace.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PolicyResult {
    pub energy_kwh: f64,
    pub carbon_kg: f64,
    /// Jobs that could never be placed (none when the trace passed its checks).
    pub unplaced: u64,
    /// Seconds from the start of the trace until the last task is done.
    pub makespan_s: f64,
    pub deadline_misses: u64,
    pub bytes_moved: u64,
    pub jobs: u64,
    pub tasks: u64,
    /// Mean seconds from a job's arrival until its last task is done.
    pub mean_job_s: f64,
    /// Jobs that found no room on arrival and waited for capacity.
    pub waited: u64,
    /// Wall-clock seconds spent in the policy's decisions.
    pub scheduler_s: f64,
    /// `energy_kwh` over the trace's proven lower bound (set by the report, which holds the
    /// bound).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub energy_over_bound: Option<f64>,
    /// The idle draw of the worker pools that ran this placement: one worker per core against
    /// pools sized by `autoscale::desired_workers`.
    pub pools: PoolEnergy,
    /// The learned predictor's report of its own error (learned policy only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub predictor: Option<PredictorReport>,
}

/// Time-ordered events (`f64` seconds, ties by insertion).
#[derive(Debug, Clone, Copy, PartialEq)]
struct At(f64, u64);

impl Eq for At {}
impl PartialOrd for At {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for At {
    fn cmp(&self, other: &Self) -> Ordering {
        self.0.total_cmp(&other.0).then(self.1.cmp(&other.1))
    }
}

struct Release {
    region: usize,
    resources: Resources,
}

/// A finished task's telemetry, delivered to the predictor at `At`.
struct Pending {
    at: At,
    sample: TelemetrySample,
}
impl PartialEq for Pending {
    fn eq(&self, other: &Self) -> bool {
        self.at == other.at
    }
}
impl Eq for Pending {}
impl PartialOrd for Pending {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Pending {
    fn cmp(&self, other: &Self) -> Ordering {
        self.at.cmp(&other.at)
    }
}

/// Tasks and replicas per region.
type Split = Vec<(usize, u64, u64)>;

enum Decider<'a> {
    Baseline { policy: Policy, cursor: usize },
    Model(Box<dyn CostModel + 'a>),
    Learned(Box<Predictor>),
}

impl Decider<'_> {
    fn decide(&mut self, regions: &[RegionSnapshot], group: &TaskGroup) -> Option<Split> {
        match self {
            Decider::Baseline { policy, cursor } => baseline_split(*policy, cursor, regions, group),
            Decider::Model(model) => placement_split(regions, group, model.as_ref()),
            Decider::Learned(predictor) => placement_split(regions, group, predictor.as_ref()),
        }
    }
}

fn placement_split(
    regions: &[RegionSnapshot],
    group: &TaskGroup,
    model: &dyn CostModel,
) -> Option<Split> {
    let placement = place(regions, group, &model).ok()?;
    Some(
        placement
            .assignments
            .iter()
            .map(|a| (a.region_index, a.tasks, a.replicas))
            .collect(),
    )
}

/// Round-robin, least-loaded and bin packing: task by task over the feasible regions, blind
/// to cost. Once every feasible slot is taken the rest queue in waves, in the same order.
fn baseline_split(
    policy: Policy,
    cursor: &mut usize,
    regions: &[RegionSnapshot],
    group: &TaskGroup,
) -> Option<Split> {
    let data_region = data_region_index(regions, group);
    let feasible: Vec<(usize, u64)> = regions
        .iter()
        .enumerate()
        .filter_map(|(i, r)| {
            filter_region(i, r, group, data_region)
                .ok()
                .map(|f| (i, f.slots))
        })
        .collect();
    if feasible.is_empty() {
        return None;
    }
    let mut assigned = vec![0u64; feasible.len()];
    let need = group.resources.cpu_millis as f64;
    let utilisation = |j: usize, extra: u64| {
        let r = &regions[feasible[j].0];
        (r.allocated.cpu_millis as f64 + extra as f64 * need) / r.capacity.cpu_millis.max(1) as f64
    };
    let start = feasible
        .iter()
        .position(|(i, _)| *i >= *cursor)
        .unwrap_or(0);
    let mut turn = start;
    for task in 0..group.tasks {
        let open = |j: usize| assigned[j] < feasible[j].1;
        let pick = match policy {
            Policy::RoundRobin => {
                let j = (0..feasible.len())
                    .map(|k| (turn + k) % feasible.len())
                    .find(|&j| open(j));
                let j = j.unwrap_or(turn % feasible.len());
                turn = j + 1;
                j
            }
            Policy::LeastLoaded | Policy::BinPacking => {
                let best = (0..feasible.len()).filter(|&j| open(j)).min_by(|&a, &b| {
                    let (ua, ub) = (utilisation(a, assigned[a]), utilisation(b, assigned[b]));
                    let order = if policy == Policy::LeastLoaded {
                        ua.total_cmp(&ub)
                    } else {
                        ub.total_cmp(&ua)
                    };
                    order.then(a.cmp(&b))
                });
                // Every slot taken: the rest wait in waves where tasks already go.
                best.unwrap_or_else(|| {
                    let used: Vec<usize> =
                        (0..feasible.len()).filter(|&j| assigned[j] > 0).collect();
                    used[task as usize % used.len()]
                })
            }
            Policy::GreedyAnalytic | Policy::Learned | Policy::OracleGreedy => {
                unreachable!("placement policies do not split task by task")
            }
        };
        assigned[pick] += 1;
    }
    if policy == Policy::RoundRobin {
        *cursor = feasible[turn % feasible.len()].0;
    }
    Some(
        feasible
            .iter()
            .zip(&assigned)
            .filter(|(_, n)| **n > 0)
            .map(|(&(i, slots), &n)| (i, n, n.min(slots)))
            .collect(),
    )
}

/// A standard normal draw (Box-Muller).
fn normal(rng: &mut ChaCha8Rng) -> f64 {
    let u1: f64 = rng.r#gen::<f64>().max(f64::MIN_POSITIVE);
    let u2: f64 = rng.r#gen();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

/// The per-task noise factors of one job: stream number `job` of the seed's ChaCha generator,
/// one log-normal factor per task in the order the job's tasks run. The factors belong to the
/// job, not to the order in which a policy happens to run jobs, so every policy draws the same
/// factors for a job wherever it puts them (which is what makes the energy bound exact about
/// the noise, see [`crate::sim::bound`]).
pub struct JobNoise(ChaCha8Rng);

impl JobNoise {
    pub fn new(seed: u64, job: usize) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        rng.set_stream(job as u64);
        JobNoise(rng)
    }

    /// The next task's factor on its expected run time and energy.
    pub fn next_factor(&mut self) -> f64 {
        (NOISE_SIGMA * normal(&mut self.0)).exp()
    }
}

struct World<'a> {
    snapshot: Vec<RegionSnapshot>,
    truths: Vec<RegionTruth>,
    transfer_joules_per_byte: f64,
    events: BinaryHeap<Reverse<(At, usize)>>,
    releases: Vec<Option<Release>>,
    free_releases: Vec<usize>,
    telemetry: BinaryHeap<Reverse<Pending>>,
    collect_telemetry: bool,
    seq: u64,
    seed: u64,
    joules: f64,
    carbon_grams: f64,
    bytes_moved: u64,
    makespan: f64,
    misses: u64,
    job_seconds: f64,
    tasks: u64,
    groups: &'a [TaskGroup],
    /// What each region's replicas did, for the worker-pool accounting.
    runs: Vec<Vec<ReplicaRun>>,
}

impl World<'_> {
    fn next_seq(&mut self) -> u64 {
        self.seq += 1;
        self.seq
    }

    fn set_allocated(&mut self, region: usize, allocated: Resources) {
        let r = &mut self.snapshot[region];
        r.allocated = allocated;
        r.load = (allocated.cpu_millis as f64 / r.capacity.cpu_millis.max(1) as f64).min(1.0);
    }

    fn schedule_release(&mut self, at: f64, region: usize, resources: Resources) {
        let slot = match self.free_releases.pop() {
            Some(slot) => {
                self.releases[slot] = Some(Release { region, resources });
                slot
            }
            None => {
                self.releases.push(Some(Release { region, resources }));
                self.releases.len() - 1
            }
        };
        let seq = self.next_seq();
        self.events.push(Reverse((At(at, seq), slot)));
    }

    /// Runs `tasks` tasks of job `job` on `replicas` replicas of `region`, from `now`.
    fn execute(
        &mut self,
        job: usize,
        (region, tasks, replicas): (usize, u64, u64),
        now: f64,
        noise: &mut JobNoise,
    ) -> f64 {
        let groups = self.groups;
        let group = &groups[job];
        let per_replica = group.resources;
        let allocated = Resources {
            cpu_millis: self.snapshot[region].allocated.cpu_millis
                + per_replica.cpu_millis * replicas,
            memory_mib: self.snapshot[region].allocated.memory_mib
                + per_replica.memory_mib * replicas,
            gpu: self.snapshot[region].allocated.gpu + per_replica.gpu * replicas,
        };
        self.set_allocated(region, allocated);
        let r = &self.snapshot[region];
        let data_region = data_region_index(&self.snapshot, group);
        let moves =
            group.input.bytes > 0 && group.input.region.is_some() && data_region != Some(region);
        let mut ready = now;
        if moves {
            let bytes = (group.input.bytes as u128 * tasks as u128 / group.tasks as u128) as u64;
            let source_uplink =
                data_region.map_or(f64::INFINITY, |i| self.snapshot[i].network.uplink_mbps);
            let mbps = r.network.uplink_mbps.min(source_uplink);
            ready += r.network.rtt_ms / 1000.0 + bytes as f64 * 8.0 / (mbps * 1e6);
            self.joules += bytes as f64 * self.transfer_joules_per_byte;
            self.bytes_moved += bytes;
        }
        let cost = true_cost(r, &self.truths[region], group);
        let intensity = r.energy.carbon_intensity.clone();
        let sample_region = self.collect_telemetry.then(|| r.clone());
        let mut finish: f64 = ready;
        for replica in 0..replicas {
            let count = tasks / replicas + u64::from(replica < tasks % replicas);
            let mut t = ready;
            let mut task_starts = Vec::with_capacity(count as usize);
            for _ in 0..count {
                let noise = noise.next_factor();
                let (seconds, joules) = (cost.seconds * noise, cost.joules * noise);
                task_starts.push(t);
                self.joules += joules;
                self.carbon_grams += joules / JOULES_PER_KWH * intensity.at(t + 0.5 * seconds);
                t += seconds;
                if let Some(region) = &sample_region {
                    let seq = self.next_seq();
                    let sample = TelemetrySample::new(region, group, seconds, Some(joules));
                    self.telemetry.push(Reverse(Pending {
                        at: At(t, seq),
                        sample,
                    }));
                }
            }
            self.tasks += count;
            self.runs[region].push(ReplicaRun {
                job,
                placed: now,
                ready,
                end: t,
                cpu_millis: per_replica.cpu_millis,
                task_starts,
            });
            self.schedule_release(t, region, per_replica);
            finish = finish.max(t);
        }
        finish
    }

    /// Places job `job` at `now`; false when no region has room for it now.
    fn try_place(
        &mut self,
        job: usize,
        now: f64,
        decider: &mut Decider,
        scheduler_s: &mut f64,
    ) -> bool {
        if let Decider::Learned(predictor) = decider {
            while let Some(Reverse(p)) = self.telemetry.peek()
                && p.at.0 <= now
            {
                let Reverse(p) = self.telemetry.pop().expect("peeked");
                predictor.observe(p.sample);
            }
        }
        let groups = self.groups;
        let original = &groups[job];
        let delayed;
        let group = if original.start_s == now {
            original
        } else {
            delayed = TaskGroup {
                start_s: now,
                ..original.clone()
            };
            &delayed
        };
        let started = Instant::now();
        let split = decider.decide(&self.snapshot, group);
        *scheduler_s += started.elapsed().as_secs_f64();
        let Some(split) = split else { return false };
        let mut finish: f64 = now;
        let mut noise = JobNoise::new(self.seed, job);
        for chunk in split {
            finish = finish.max(self.execute(job, chunk, now, &mut noise));
        }
        let arrival = self.groups[job].start_s;
        self.makespan = self.makespan.max(finish);
        self.job_seconds += finish - arrival;
        if self.groups[job]
            .deadline_s
            .is_some_and(|d| finish > arrival + d)
        {
            self.misses += 1;
        }
        true
    }

    /// Processes releases up to `until`, retrying waiting jobs after each.
    fn advance(
        &mut self,
        until: f64,
        waiting: &mut VecDeque<usize>,
        decider: &mut Decider,
        scheduler_s: &mut f64,
    ) {
        while let Some(Reverse((At(at, _), _))) = self.events.peek()
            && *at <= until
        {
            let at = *at;
            let Reverse((_, slot)) = self.events.pop().expect("peeked");
            let release = self.releases[slot].take().expect("each release fires once");
            self.free_releases.push(slot);
            let now = self.snapshot[release.region]
                .allocated
                .saturating_sub(&release.resources);
            self.set_allocated(release.region, now);
            let mut still = VecDeque::with_capacity(waiting.len());
            while let Some(job) = waiting.pop_front() {
                if !self.try_place(job, at, decider, scheduler_s) {
                    still.push_back(job);
                }
            }
            *waiting = still;
        }
    }
}

/// Replays `groups` (in arrival order) on `regions` under `policy`. `seed` drives the per-task
/// noise, so every policy of one run sees the same world.
pub fn simulate(
    regions: &RegionFile,
    groups: &[TaskGroup],
    policy: Policy,
    seed: u64,
) -> PolicyResult {
    let snapshot: Vec<RegionSnapshot> = regions.regions.iter().map(|r| r.spec.clone()).collect();
    let truths: Vec<RegionTruth> = regions.regions.iter().map(|r| r.truth).collect();
    let prior: AnalyticCostModel = regions.prior();
    let transfer = regions.transfer_joules_per_byte();
    let mut decider = match policy {
        Policy::RoundRobin | Policy::LeastLoaded | Policy::BinPacking => {
            Decider::Baseline { policy, cursor: 0 }
        }
        Policy::GreedyAnalytic => Decider::Model(Box::new(prior)),
        Policy::Learned => {
            Decider::Learned(Box::new(Predictor::new(prior, PredictorConfig::default())))
        }
        Policy::OracleGreedy => {
            Decider::Model(Box::new(TruthCostModel::new(&snapshot, &truths, transfer)))
        }
    };
    let mut world = World {
        snapshot: snapshot.clone(),
        truths: truths.clone(),
        transfer_joules_per_byte: transfer,
        events: BinaryHeap::new(),
        releases: Vec::new(),
        free_releases: Vec::new(),
        telemetry: BinaryHeap::new(),
        collect_telemetry: policy == Policy::Learned,
        seq: 0,
        seed,
        joules: 0.0,
        carbon_grams: 0.0,
        bytes_moved: 0,
        makespan: 0.0,
        misses: 0,
        job_seconds: 0.0,
        tasks: 0,
        groups,
        runs: vec![Vec::new(); snapshot.len()],
    };
    let mut waiting = VecDeque::new();
    let mut waited = 0;
    let mut scheduler_s = 0.0;
    for (job, group) in groups.iter().enumerate() {
        world.advance(group.start_s, &mut waiting, &mut decider, &mut scheduler_s);
        // Jobs already waiting go first.
        if !waiting.is_empty()
            || !world.try_place(job, group.start_s, &mut decider, &mut scheduler_s)
        {
            waiting.push_back(job);
            waited += 1;
        }
    }
    world.advance(f64::INFINITY, &mut waiting, &mut decider, &mut scheduler_s);
    let predictor = match &decider {
        Decider::Learned(p) => Some(p.report().clone()),
        _ => None,
    };
    let pools = pool_energy(
        &snapshot,
        groups,
        &world.runs,
        world.makespan,
        &regions.prior(),
    );
    PolicyResult {
        energy_kwh: world.joules / JOULES_PER_KWH,
        carbon_kg: world.carbon_grams / 1000.0,
        makespan_s: world.makespan,
        deadline_misses: world.misses,
        unplaced: waiting.len() as u64,
        bytes_moved: world.bytes_moved,
        jobs: groups.len() as u64,
        tasks: world.tasks,
        mean_job_s: if groups.is_empty() {
            0.0
        } else {
            world.job_seconds / groups.len() as f64
        },
        waited,
        scheduler_s,
        energy_over_bound: None,
        pools,
        predictor,
    }
}

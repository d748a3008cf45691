//! Placement of one task group over a snapshot of regions: filter -> score -> select.
//!
//! [`place`] is a pure function: the same snapshot, group and cost model always give the same
//! placement. See the crate documentation for the algorithm.

use std::fmt;

use serde::Serialize;
use serde::ser::SerializeStruct;
use thiserror::Error;

use crate::model::{DataLocality, Objective, RegionSnapshot, Taint, TaintEffect, TaskGroup, Tier};

/// Joules per byte moved between regions when a cost model does not say otherwise:
/// 0.001 kWh/GB, an assumption for the marginal energy of wide-area transfer (routers,
/// transceivers) that [`CostModel::transfer_joules_per_byte`] can override.
pub const DEFAULT_TRANSFER_JOULES_PER_BYTE: f64 = 0.001 * 3.6e6 / 1e9;

/// Predicted cost of running one task, data transfer excluded.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TaskCost {
    /// Wall-clock seconds one task runs on one replica.
    pub seconds: f64,
    /// Energy drawn for that run, site overhead (PUE) included.
    pub joules: f64,
}

/// What placement asks of a predictor.
pub trait CostModel {
    /// Cost of one task of `group` on `region`.
    fn task_cost(&self, region: &RegionSnapshot, group: &TaskGroup) -> TaskCost;

    /// Energy to move one byte of input between regions.
    fn transfer_joules_per_byte(&self) -> f64 {
        DEFAULT_TRANSFER_JOULES_PER_BYTE
    }
}

impl<M: CostModel + ?Sized> CostModel for &M {
    fn task_cost(&self, region: &RegionSnapshot, group: &TaskGroup) -> TaskCost {
        (**self).task_cost(region, group)
    }

    fn transfer_joules_per_byte(&self) -> f64 {
        (**self).transfer_joules_per_byte()
    }
}

/// Why a region cannot take any task of the group.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "reason", rename_all = "camelCase")]
pub enum FilterReason {
    /// The region is not heartbeating or not accepting work.
    NotReady,
    /// The snapshot itself is unusable (negative watts, PUE below 1...).
    InvalidSnapshot {
        problems: Vec<String>,
    },
    TierNotAllowed {
        tier: Tier,
        allowed: Vec<Tier>,
    },
    NotInRegionList {
        allowed: Vec<String>,
    },
    /// The first requirement of the region selector that the region's labels fail.
    SelectorMismatch {
        requirement: String,
    },
    UntoleratedTaint {
        taint: Taint,
    },
    /// `dataLocality: required` and the input lives elsewhere.
    DataElsewhere {
        data_region: String,
    },
    /// Not even one task fits in what is free.
    Insufficient {
        resource: Resource,
        free: f64,
        needed: f64,
    },
    /// The cost model gave a negative, infinite or NaN prediction.
    NoPrediction {
        seconds: f64,
        joules: f64,
    },
}

/// A resource named in an [`FilterReason::Insufficient`] reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum Resource {
    Cpu,
    Memory,
    Gpu,
}

impl fmt::Display for FilterReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FilterReason::NotReady => f.write_str("region is not ready"),
            FilterReason::InvalidSnapshot { problems } => {
                write!(f, "region snapshot is invalid: {}", problems.join("; "))
            }
            FilterReason::TierNotAllowed { tier, allowed } => {
                let allowed: Vec<String> = allowed.iter().map(Tier::to_string).collect();
                write!(
                    f,
                    "tier {tier} is not among the allowed tiers ({})",
                    allowed.join(", ")
                )
            }
            FilterReason::NotInRegionList { allowed } => {
                write!(
                    f,
                    "region is not among the regions the group names ({})",
                    allowed.join(", ")
                )
            }
            FilterReason::SelectorMismatch { requirement } => {
                write!(f, "labels do not match the region selector: {requirement}")
            }
            FilterReason::UntoleratedTaint { taint } => {
                write!(f, "taint {taint} is not tolerated")
            }
            FilterReason::DataElsewhere { data_region } => write!(
                f,
                "input data lives in region {data_region} and dataLocality is required"
            ),
            FilterReason::Insufficient {
                resource,
                free,
                needed,
            } => match resource {
                Resource::Cpu => write!(
                    f,
                    "insufficient cpu: {free} cores free, one task needs {needed} cores"
                ),
                Resource::Memory => write!(
                    f,
                    "insufficient memory: {free} MiB free, one task needs {needed} MiB"
                ),
                Resource::Gpu => {
                    write!(f, "insufficient gpu: {free} free, one task needs {needed}")
                }
            },
            FilterReason::NoPrediction { seconds, joules } => write!(
                f,
                "the cost model gave no usable prediction ({seconds} s, {joules} J per task)"
            ),
        }
    }
}

/// How a feasible region was judged.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RegionScore {
    /// Tasks that may run at once here (free capacity / per-task request, capped by the group).
    pub slots: u64,
    /// Predicted run time of one task.
    pub seconds_per_task: f64,
    /// Predicted energy of one task, moving its input included.
    pub joules_per_task: f64,
    /// Seconds to move one task's input here (0 where the data are).
    pub transfer_seconds_per_task: f64,
    /// 0..100, higher is better for the objective: 100 x best / this, on energy per task
    /// (`energy`), time per task (`latency`), or their mean (`balanced`).
    pub score: f64,
    /// The region carries a `PreferNoSchedule` taint the group does not tolerate: it is used
    /// only after every other feasible region.
    pub avoided: bool,
    /// Tasks this placement gives the region.
    pub tasks: u64,
}

/// Verdict on one region.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    Filtered(Vec<FilterReason>),
    Scored(RegionScore),
}

/// One region's line in an [`Explanation`].
#[derive(Debug, Clone, PartialEq)]
pub struct RegionExplanation {
    pub region: String,
    pub verdict: Verdict,
}

impl fmt::Display for RegionExplanation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.verdict {
            Verdict::Filtered(reasons) => {
                write!(f, "{}: filtered out: ", self.region)?;
                for (i, reason) in reasons.iter().enumerate() {
                    if i > 0 {
                        f.write_str("; ")?;
                    }
                    write!(f, "{reason}")?;
                }
                Ok(())
            }
            Verdict::Scored(s) => {
                write!(
                    f,
                    "{}: {} tasks, score {:.1}: {:.3} s and {:.1} J per task",
                    self.region, s.tasks, s.score, s.seconds_per_task, s.joules_per_task
                )?;
                if s.transfer_seconds_per_task > 0.0 {
                    write!(
                        f,
                        " (input moved in {:.3} s per task)",
                        s.transfer_seconds_per_task
                    )?;
                }
                write!(f, ", {} slots", s.slots)?;
                if s.avoided {
                    f.write_str(", avoided: untolerated PreferNoSchedule taint")?;
                }
                Ok(())
            }
        }
    }
}

/// JSON: `{"region", "verdict": "filtered"|"scored", "message", "reasons"? , "score"?}`.
impl Serialize for RegionExplanation {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut st = s.serialize_struct("RegionExplanation", 4)?;
        st.serialize_field("region", &self.region)?;
        match &self.verdict {
            Verdict::Filtered(reasons) => {
                st.serialize_field("verdict", "filtered")?;
                st.serialize_field("reasons", reasons)?;
            }
            Verdict::Scored(score) => {
                st.serialize_field("verdict", "scored")?;
                st.serialize_field("score", score)?;
            }
        }
        st.serialize_field("message", &self.to_string())?;
        st.end()
    }
}

/// Why the placement is what it is: a summary and one line per region of the snapshot.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Explanation {
    pub objective: Objective,
    pub summary: String,
    /// In snapshot order.
    pub regions: Vec<RegionExplanation>,
}

impl fmt::Display for Explanation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{}", self.summary)?;
        for region in &self.regions {
            writeln!(f, "  {region}")?;
        }
        Ok(())
    }
}

/// Tasks given to one region, with what they are predicted to cost.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Assignment {
    pub region: String,
    /// Position of the region in the snapshot slice.
    #[serde(skip)]
    pub region_index: usize,
    pub tasks: u64,
    /// Tasks running at once; `replicas x group.resources` is what the region must allocate.
    pub replicas: u64,
    /// Seconds until the region's last task is done, input transfer included.
    pub predicted_seconds: f64,
    pub predicted_joules: f64,
    pub predicted_carbon_grams: f64,
    pub bytes_moved: u64,
}

/// The decision for one task group.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Placement {
    pub group: String,
    /// Regions given at least one task, in snapshot order. Their tasks add up to the group's.
    pub assignments: Vec<Assignment>,
    /// When the last task is predicted done, seconds after the decision.
    pub predicted_seconds: f64,
    pub predicted_joules: f64,
    pub predicted_carbon_grams: f64,
    pub bytes_moved: u64,
    /// `None` without a deadline; `Some(false)` when even the fastest split misses it (the
    /// placement is then the fastest one).
    pub deadline_met: Option<bool>,
    pub explanation: Explanation,
}

/// Why a task group cannot be placed at all.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum Unschedulable {
    #[error("task group {group} is invalid: {}", problems.join("; "))]
    InvalidGroup {
        group: String,
        problems: Vec<String>,
    },
    #[error("no region can run task group {group}: {}", summarize(regions))]
    NoFeasibleRegion {
        group: String,
        regions: Vec<RegionExplanation>,
    },
}

impl Unschedulable {
    /// Per-region reasons (empty for an invalid group).
    pub fn regions(&self) -> &[RegionExplanation] {
        match self {
            Unschedulable::InvalidGroup { .. } => &[],
            Unschedulable::NoFeasibleRegion { regions, .. } => regions,
        }
    }
}

fn summarize(regions: &[RegionExplanation]) -> String {
    const SHOWN: usize = 5;
    if regions.is_empty() {
        return "the snapshot holds no regions".into();
    }
    let mut text: Vec<String> = regions
        .iter()
        .take(SHOWN)
        .map(ToString::to_string)
        .collect();
    if regions.len() > SHOWN {
        text.push(format!("and {} more regions", regions.len() - SHOWN));
    }
    text.join("; ")
}

/// Everything placement needs about one feasible region.
#[derive(Debug, Clone, Copy)]
struct Candidate {
    index: usize,
    slots: u64,
    /// Seconds per task.
    run: f64,
    /// Joules per task, transfer included.
    joules: f64,
    /// Transfer seconds per task.
    transfer: f64,
    /// Latency before the first transfer completes (RTT), 0 where the data are.
    latency: f64,
    moves_data: bool,
    avoided: bool,
}

impl Candidate {
    /// Seconds until `n` tasks are done here.
    fn finish(&self, n: u64, slots: u64) -> f64 {
        if n == 0 {
            return 0.0;
        }
        let waves = n.div_ceil(slots) as f64;
        self.latency + n as f64 * self.transfer + waves * self.run
    }

    /// Most tasks that finish within `t` seconds on `slots` replicas.
    fn capacity_within(&self, t: f64, slots: u64) -> u64 {
        if slots == 0 || t < self.finish(1, slots) {
            return 0;
        }
        let mut n = self.approximate_capacity(t - self.latency, slots);
        // The closed form can be one off either way through rounding: settle on the exact bound.
        while n > 0 && self.finish(n, slots) > t {
            n -= 1;
        }
        while n < u64::MAX && self.finish(n + 1, slots) <= t {
            n += 1;
        }
        n
    }

    fn approximate_capacity(&self, budget: f64, slots: u64) -> u64 {
        if self.transfer <= 0.0 {
            if self.run <= 0.0 {
                return u64::MAX;
            }
            return slots.saturating_mul((budget / self.run).floor() as u64);
        }
        if self.run <= 0.0 {
            return (budget / self.transfer).floor() as u64;
        }
        // n tasks in k waves: n <= k*slots and n*transfer + k*run <= budget. The best k is
        // where the two bounds cross.
        let by_waves = |k: u64| -> u64 {
            let left = budget - k as f64 * self.run;
            if left < 0.0 {
                return 0;
            }
            (k.saturating_mul(slots)).min((left / self.transfer).floor() as u64)
        };
        let crossing = budget / (slots as f64 * self.transfer + self.run);
        let k = crossing.floor().max(1.0) as u64;
        by_waves(k).max(by_waves(k.saturating_add(1)))
    }
}

/// Splits `tasks` over candidates (in fill order) so that each finishes within `horizon`,
/// giving each region as much as it can take before the next. Returns tasks and replicas per
/// candidate, or `None` when the horizon is too short for all tasks.
fn fill(
    candidates: &[Candidate],
    tasks: u64,
    parallelism: u64,
    horizon: f64,
    out: &mut Vec<(u64, u64)>,
) -> bool {
    out.clear();
    let mut left = tasks;
    let mut replicas_left = parallelism;
    for c in candidates {
        if left == 0 || replicas_left == 0 {
            break;
        }
        let slots = c.slots.min(replicas_left);
        let n = c.capacity_within(horizon, slots).min(left);
        let replicas = n.min(slots);
        out.push((n, replicas));
        left -= n;
        replicas_left -= replicas;
    }
    left == 0
}

struct Split {
    per_candidate: Vec<(u64, u64)>,
    makespan: f64,
    joules: f64,
}

fn evaluate(candidates: &[Candidate], per_candidate: Vec<(u64, u64)>) -> Split {
    let mut makespan: f64 = 0.0;
    let mut joules = 0.0;
    for (c, &(n, replicas)) in candidates.iter().zip(&per_candidate) {
        if n > 0 {
            makespan = makespan.max(c.finish(n, replicas));
            joules += n as f64 * c.joules;
        }
    }
    Split {
        per_candidate,
        makespan,
        joules,
    }
}

/// The split that fits in `horizon`, if any.
fn split_within(
    candidates: &[Candidate],
    tasks: u64,
    parallelism: u64,
    horizon: f64,
) -> Option<Split> {
    let mut out = Vec::new();
    fill(candidates, tasks, parallelism, horizon, &mut out).then(|| evaluate(candidates, out))
}

/// The split with the earliest finish (energy order breaks ties).
fn fastest_split(candidates: &[Candidate], tasks: u64, parallelism: u64) -> Split {
    // All tasks on the first candidate always fits: an upper bound to bisect from. All of them
    // on the region that would finish them first usually fits too, and is tighter.
    let mut scratch = Vec::with_capacity(candidates.len());
    let first = candidates[0];
    let mut hi = first.finish(tasks, first.slots.min(parallelism));
    let alone = candidates
        .iter()
        .map(|c| c.finish(tasks, c.slots.min(parallelism)))
        .fold(f64::INFINITY, f64::min);
    if alone < hi && fill(candidates, tasks, parallelism, alone, &mut scratch) {
        hi = alone;
    }
    // Nothing finishes before one task on the fastest region.
    let mut lo = candidates
        .iter()
        .map(|c| c.finish(1, 1))
        .fold(f64::INFINITY, f64::min);
    if fill(candidates, tasks, parallelism, lo, &mut scratch) {
        hi = lo;
    }
    for _ in 0..200 {
        if hi - lo <= hi * 1e-9 {
            break;
        }
        let mid = 0.5 * (lo + hi);
        if fill(candidates, tasks, parallelism, mid, &mut scratch) {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    split_within(candidates, tasks, parallelism, hi)
        .expect("the upper bound of the bisection always fits")
}

/// Points of the energy/finish-time trade-off that `balanced` examines.
const BALANCED_STEPS: usize = 24;

fn choose_split(
    candidates: &[Candidate],
    group: &TaskGroup,
    tasks: u64,
    parallelism: u64,
) -> (Split, Option<bool>) {
    let fastest = fastest_split(candidates, tasks, parallelism);
    let deadline = group.deadline_s;
    if let Some(d) = deadline
        && fastest.makespan > d
    {
        return (fastest, Some(false));
    }
    let met = deadline.map(|_| true);
    let horizon = deadline.unwrap_or(f64::INFINITY);
    match group.objective {
        Objective::Latency => (fastest, met),
        Objective::Energy => {
            let cheapest = split_within(candidates, tasks, parallelism, horizon)
                .expect("the fastest split fits, so the deadline horizon does too");
            (cheapest, met)
        }
        Objective::Balanced => {
            let cheapest = split_within(candidates, tasks, parallelism, horizon)
                .expect("the fastest split fits, so the deadline horizon does too");
            if cheapest.makespan <= fastest.makespan
                || fastest.makespan <= 0.0
                || cheapest.joules <= 0.0
            {
                return (cheapest, met);
            }
            let (t_min, e_min) = (fastest.makespan, cheapest.joules);
            let cost = |s: &Split| s.makespan / t_min + s.joules / e_min;
            let ratio = (cheapest.makespan / t_min).powf(1.0 / BALANCED_STEPS as f64);
            let mut best = if cost(&fastest) <= cost(&cheapest) {
                fastest
            } else {
                cheapest
            };
            let mut horizon = t_min;
            for _ in 1..BALANCED_STEPS {
                horizon *= ratio;
                if let Some(s) = split_within(candidates, tasks, parallelism, horizon)
                    && cost(&s) < cost(&best)
                {
                    best = s;
                }
            }
            (best, met)
        }
    }
}

fn group_problems(group: &TaskGroup) -> Vec<String> {
    let mut problems = Vec::new();
    if group.name.is_empty() {
        problems.push("name must not be empty".to_string());
    }
    if let Some(d) = group.deadline_s
        && !(d.is_finite() && d > 0.0)
    {
        problems.push(format!(
            "deadlineS must be a positive number of seconds, got {d}"
        ));
    }
    if group.parallelism == Some(0) {
        problems.push("parallelism must be at least 1".to_string());
    }
    if !group.start_s.is_finite() {
        problems.push(format!("startS must be finite, got {}", group.start_s));
    }
    problems
}

/// Filters one region; `Ok` holds its candidate data, `Err` every reason it cannot be used.
/// A region that passed the filters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Feasible {
    /// Tasks of the group that may run here at once (capped by the group's size and parallelism).
    pub slots: u64,
    /// Carries an untolerated `PreferNoSchedule` taint.
    pub avoided: bool,
    /// Holds the group's input (or the group has none to move).
    pub holds_data: bool,
}

/// Position in `regions` of the region that stores the group's input.
pub fn data_region_index(regions: &[RegionSnapshot], group: &TaskGroup) -> Option<usize> {
    let name = group.input.region.as_ref()?;
    regions.iter().position(|r| &r.name == name)
}

/// The filter step for one region (`index` in the snapshot; `data_region` from
/// [`data_region_index`]): every reason it cannot take a task of `group`, or what it offers.
pub fn filter_region(
    index: usize,
    region: &RegionSnapshot,
    group: &TaskGroup,
    data_region: Option<usize>,
) -> Result<Feasible, Vec<FilterReason>> {
    let mut reasons = Vec::new();
    let problems = region.scalar_problems();
    if !problems.is_empty() {
        return Err(vec![FilterReason::InvalidSnapshot { problems }]);
    }
    if !region.ready {
        reasons.push(FilterReason::NotReady);
    }
    let c = &group.constraints;
    if !c.tiers.is_empty() && !c.tiers.contains(&region.tier) {
        reasons.push(FilterReason::TierNotAllowed {
            tier: region.tier,
            allowed: c.tiers.clone(),
        });
    }
    if !c.regions.is_empty() && !c.regions.contains(&region.name) {
        reasons.push(FilterReason::NotInRegionList {
            allowed: c.regions.clone(),
        });
    }
    if let Some(requirement) = c.region_selector.first_mismatch(&region.labels) {
        reasons.push(FilterReason::SelectorMismatch { requirement });
    }
    let mut avoided = false;
    for taint in &region.taints {
        if c.tolerations.iter().any(|t| t.tolerates(taint)) {
            continue;
        }
        match taint.effect {
            TaintEffect::PreferNoSchedule => avoided = true,
            TaintEffect::NoSchedule | TaintEffect::NoExecute => {
                reasons.push(FilterReason::UntoleratedTaint {
                    taint: taint.clone(),
                })
            }
        }
    }
    let holds_data =
        data_region == Some(index) || group.input.region.is_none() || group.input.bytes == 0;
    if c.data_locality == DataLocality::Required
        && !holds_data
        && let Some(data_region) = &group.input.region
    {
        reasons.push(FilterReason::DataElsewhere {
            data_region: data_region.clone(),
        });
    }
    let free = region.free();
    let need = &group.resources;
    let slots = free.copies_of(need);
    if slots == 0 {
        if free.cpu_millis < need.cpu_millis {
            reasons.push(FilterReason::Insufficient {
                resource: Resource::Cpu,
                free: free.cores(),
                needed: need.cores(),
            });
        }
        if free.memory_mib < need.memory_mib {
            reasons.push(FilterReason::Insufficient {
                resource: Resource::Memory,
                free: free.memory_mib as f64,
                needed: need.memory_mib as f64,
            });
        }
        if free.gpu < need.gpu {
            reasons.push(FilterReason::Insufficient {
                resource: Resource::Gpu,
                free: free.gpu as f64,
                needed: need.gpu as f64,
            });
        }
    }
    if !reasons.is_empty() {
        return Err(reasons);
    }
    Ok(Feasible {
        slots: slots
            .min(group.tasks)
            .min(group.parallelism.unwrap_or(u64::MAX)),
        avoided,
        holds_data,
    })
}

/// Filters one region, then costs it.
fn judge(
    index: usize,
    region: &RegionSnapshot,
    regions: &[RegionSnapshot],
    group: &TaskGroup,
    data_region: Option<usize>,
    model: &impl CostModel,
) -> Result<Candidate, Vec<FilterReason>> {
    let Feasible {
        slots,
        avoided,
        holds_data,
    } = filter_region(index, region, group, data_region)?;
    let cost = model.task_cost(region, group);
    if !(cost.seconds.is_finite()
        && cost.seconds >= 0.0
        && cost.joules.is_finite()
        && cost.joules >= 0.0)
    {
        return Err(vec![FilterReason::NoPrediction {
            seconds: cost.seconds,
            joules: cost.joules,
        }]);
    }
    let (transfer, latency, transfer_joules) = if holds_data {
        (0.0, 0.0, 0.0)
    } else {
        let source_uplink = data_region.map_or(f64::INFINITY, |i| regions[i].network.uplink_mbps);
        let mbps = region.network.uplink_mbps.min(source_uplink);
        let bytes = group.bytes_per_task();
        (
            bytes * 8.0 / (mbps * 1e6),
            region.network.rtt_ms / 1000.0,
            bytes * model.transfer_joules_per_byte(),
        )
    };
    Ok(Candidate {
        index,
        slots,
        run: cost.seconds,
        joules: cost.joules + transfer_joules,
        transfer,
        latency,
        moves_data: !holds_data,
        avoided,
    })
}

/// Places `group` on `regions`, predicting costs with `model`.
///
/// Filters every region (readiness, snapshot validity, tiers, region names, label selector,
/// taints and tolerations, data locality, free capacity for one task), then splits the tasks
/// among the feasible ones for the group's objective and deadline. Deterministic: the result
/// depends only on the arguments.
pub fn place(
    regions: &[RegionSnapshot],
    group: &TaskGroup,
    model: &impl CostModel,
) -> Result<Placement, Unschedulable> {
    let problems = group_problems(group);
    if !problems.is_empty() {
        return Err(Unschedulable::InvalidGroup {
            group: group.name.clone(),
            problems,
        });
    }
    let data_region = data_region_index(regions, group);

    let mut candidates = Vec::new();
    let mut verdicts = Vec::with_capacity(regions.len());
    for (index, region) in regions.iter().enumerate() {
        match judge(index, region, regions, group, data_region, model) {
            Ok(c) => {
                candidates.push(c);
                verdicts.push(None);
            }
            Err(reasons) => verdicts.push(Some(reasons)),
        }
    }
    if candidates.is_empty() && group.tasks > 0 {
        let regions = regions
            .iter()
            .zip(verdicts)
            .map(|(r, v)| RegionExplanation {
                region: r.name.clone(),
                verdict: Verdict::Filtered(v.unwrap_or_default()),
            })
            .collect();
        return Err(Unschedulable::NoFeasibleRegion {
            group: group.name.clone(),
            regions,
        });
    }

    // Fill order: regions to avoid last, then least energy per task, then snapshot order.
    candidates.sort_unstable_by(|a, b| {
        a.avoided
            .cmp(&b.avoided)
            .then(a.joules.total_cmp(&b.joules))
            .then(a.index.cmp(&b.index))
    });
    let parallelism = group.parallelism.unwrap_or(u64::MAX);
    let (split, deadline_met) = if group.tasks == 0 {
        (
            Split {
                per_candidate: Vec::new(),
                makespan: 0.0,
                joules: 0.0,
            },
            group.deadline_s.map(|_| true),
        )
    } else {
        choose_split(&candidates, group, group.tasks, parallelism)
    };

    let scores = score_candidates(&candidates, group.objective);
    let mut tasks_of = vec![(0u64, 0u64); regions.len()];
    for (c, &(n, replicas)) in candidates.iter().zip(&split.per_candidate) {
        tasks_of[c.index] = (n, replicas);
    }
    let mut by_index: Vec<Option<(Candidate, f64)>> = vec![None; regions.len()];
    for (c, score) in candidates.iter().zip(scores) {
        by_index[c.index] = Some((*c, score));
    }

    let mut assignments = Vec::new();
    let mut explained = Vec::with_capacity(regions.len());
    let (mut joules, mut carbon, mut bytes_moved) = (0.0, 0.0, 0u64);
    for (index, (region, verdict)) in regions.iter().zip(verdicts).enumerate() {
        let verdict = match (verdict, by_index[index]) {
            (Some(reasons), _) => Verdict::Filtered(reasons),
            (None, Some((c, score))) => {
                let (n, replicas) = tasks_of[index];
                if n > 0 {
                    let seconds = c.finish(n, replicas);
                    let region_joules = n as f64 * c.joules;
                    let grams = region_joules / 3.6e6
                        * region
                            .energy
                            .carbon_intensity
                            .mean_over(group.start_s, seconds);
                    let moved = if c.moves_data {
                        (group.input.bytes as u128 * n as u128 / group.tasks as u128) as u64
                    } else {
                        0
                    };
                    joules += region_joules;
                    carbon += grams;
                    bytes_moved += moved;
                    assignments.push(Assignment {
                        region: region.name.clone(),
                        region_index: index,
                        tasks: n,
                        replicas,
                        predicted_seconds: seconds,
                        predicted_joules: region_joules,
                        predicted_carbon_grams: grams,
                        bytes_moved: moved,
                    });
                }
                Verdict::Scored(RegionScore {
                    slots: c.slots,
                    seconds_per_task: c.run,
                    joules_per_task: c.joules,
                    transfer_seconds_per_task: c.transfer,
                    score,
                    avoided: c.avoided,
                    tasks: n,
                })
            }
            (None, None) => unreachable!("every region is either filtered or a candidate"),
        };
        explained.push(RegionExplanation {
            region: region.name.clone(),
            verdict,
        });
    }

    let summary = summary_line(
        group,
        &assignments,
        split.makespan,
        joules,
        deadline_met,
        regions.len(),
        candidates.len(),
    );
    Ok(Placement {
        group: group.name.clone(),
        assignments,
        predicted_seconds: split.makespan,
        predicted_joules: joules,
        predicted_carbon_grams: carbon,
        bytes_moved,
        deadline_met,
        explanation: Explanation {
            objective: group.objective,
            summary,
            regions: explained,
        },
    })
}

fn score_candidates(candidates: &[Candidate], objective: Objective) -> Vec<f64> {
    let per_task_time = |c: &Candidate| c.run + c.transfer;
    let best_joules = candidates
        .iter()
        .map(|c| c.joules)
        .fold(f64::INFINITY, f64::min);
    let best_time = candidates
        .iter()
        .map(per_task_time)
        .fold(f64::INFINITY, f64::min);
    let relative = |best: f64, this: f64| {
        if this > 0.0 {
            100.0 * best / this
        } else {
            100.0
        }
    };
    candidates
        .iter()
        .map(|c| {
            let energy = relative(best_joules, c.joules);
            let time = relative(best_time, per_task_time(c));
            match objective {
                Objective::Energy => energy,
                Objective::Latency => time,
                Objective::Balanced => 0.5 * (energy + time),
            }
        })
        .collect()
}

fn summary_line(
    group: &TaskGroup,
    assignments: &[Assignment],
    makespan: f64,
    joules: f64,
    deadline_met: Option<bool>,
    total: usize,
    feasible: usize,
) -> String {
    let mut s = format!(
        "objective {}: {} tasks on {} of {} feasible regions ({} in the snapshot), done in {:.1} s using {:.1} J",
        group.objective,
        group.tasks,
        assignments.len(),
        feasible,
        total,
        makespan,
        joules
    );
    match (deadline_met, group.deadline_s) {
        (Some(true), Some(d)) => s.push_str(&format!("; meets the {d} s deadline")),
        (Some(false), Some(d)) => s.push_str(&format!(
            "; misses the {d} s deadline even on the fastest split, placed for the earliest finish"
        )),
        _ => {}
    }
    s
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
    use crate::model::{
        CarbonIntensity, DataInput, EnergyProfile, LabelRequirement, Network, Resources,
        SelectorOperator, TaskFeatures, Toleration, TolerationOperator,
    };

    fn region(
        name: &str,
        tier: Tier,
        cores: f64,
        watts_per_core: f64,
        speed: f64,
    ) -> RegionSnapshot {
        let mut r = RegionSnapshot::new(
            name,
            tier,
            Resources::new(cores, 64 * 1024, 0),
            EnergyProfile {
                idle_watts: 0.0,
                watts_per_core,
                pue: 1.0,
                carbon_intensity: CarbonIntensity::Constant(300.0),
            },
            Network {
                uplink_mbps: 1000.0,
                rtt_ms: 10.0,
            },
        );
        r.cpu_speed = Some(speed);
        r
    }

    fn group(tasks: u64, objective: Objective) -> TaskGroup {
        TaskGroup {
            name: "cube-7443-12703".into(),
            tasks,
            features: TaskFeatures {
                spectra: 1000,
                pixels: 4437,
                templates: 150,
                moments: 2,
            },
            resources: Resources::new(1.0, 1024, 0),
            input: Default::default(),
            constraints: Default::default(),
            objective,
            deadline_s: None,
            parallelism: None,
            start_s: 0.0,
        }
    }

    /// An efficient slow region and a fast hungry one: 7 s per task at 3 J/s vs 3.5 s at 10 J/s.
    fn pair() -> Vec<RegionSnapshot> {
        vec![
            region("edge-a", Tier::Edge, 4.0, 3.0, 1.0),
            region("cloud-b", Tier::Cloud, 16.0, 10.0, 2.0),
        ]
    }

    fn message(p: &Placement, name: &str) -> String {
        p.explanation
            .regions
            .iter()
            .find(|r| r.region == name)
            .unwrap()
            .to_string()
    }

    #[test]
    fn energy_objective_fills_the_efficient_region_and_latency_spreads() {
        let model = model();
        let energy = place(&pair(), &group(16, Objective::Energy), &model).unwrap();
        assert_eq!(energy.assignments.len(), 1);
        assert_eq!(energy.assignments[0].region, "edge-a");
        assert_eq!(energy.assignments[0].replicas, 4);
        // 4 waves of 7 s.
        assert!(
            (energy.predicted_seconds - 28.0).abs() < 1e-9,
            "{}",
            energy.predicted_seconds
        );

        let latency = place(&pair(), &group(16, Objective::Latency), &model).unwrap();
        let total: u64 = latency.assignments.iter().map(|a| a.tasks).sum();
        assert_eq!(total, 16);
        assert!(latency.predicted_seconds < energy.predicted_seconds);
        assert!(latency.predicted_joules > energy.predicted_joules);
        // Balanced lies between the two on both axes.
        let balanced = place(&pair(), &group(16, Objective::Balanced), &model).unwrap();
        assert!(balanced.predicted_seconds <= energy.predicted_seconds);
        assert!(balanced.predicted_joules <= latency.predicted_joules);
    }

    #[test]
    fn energy_objective_spills_over_only_to_meet_the_deadline() {
        let model = model();
        let mut g = group(16, Objective::Energy);
        g.deadline_s = Some(15.0);
        let p = place(&pair(), &g, &model).unwrap();
        assert_eq!(p.deadline_met, Some(true));
        assert!(p.predicted_seconds <= 15.0);
        // Two waves of 4 on the edge (14 s), the other 8 tasks on the cloud.
        let tasks: Vec<(&str, u64)> = p
            .assignments
            .iter()
            .map(|a| (a.region.as_str(), a.tasks))
            .collect();
        assert_eq!(tasks, [("edge-a", 8), ("cloud-b", 8)]);
        assert!(
            p.explanation.summary.contains("meets the 15 s deadline"),
            "{}",
            p.explanation.summary
        );
    }

    #[test]
    fn an_impossible_deadline_gives_the_fastest_split_and_says_so() {
        let model = model();
        let mut g = group(16, Objective::Energy);
        g.deadline_s = Some(1.0);
        let p = place(&pair(), &g, &model).unwrap();
        let fastest = place(&pair(), &group(16, Objective::Latency), &model).unwrap();
        assert_eq!(p.deadline_met, Some(false));
        assert_eq!(p.predicted_seconds, fastest.predicted_seconds);
        assert!(
            p.explanation.summary.contains("misses the 1 s deadline"),
            "{}",
            p.explanation.summary
        );
    }

    #[test]
    fn input_data_pulls_work_to_its_region() {
        let model = model();
        let mut regions = pair();
        regions[0].network.uplink_mbps = 10.0;
        let mut g = group(4, Objective::Latency);
        g.input.bytes = 4_000_000_000;
        g.input.region = Some("edge-a".into());
        let p = place(&regions, &g, &model).unwrap();
        // A GB per task over 10 Mbps is 800 s: faster to fit everything at the edge.
        assert_eq!(p.assignments.len(), 1);
        assert_eq!(p.assignments[0].region, "edge-a");
        assert_eq!(p.bytes_moved, 0);
        let cloud = message(&p, "cloud-b");
        assert!(
            cloud.contains("input moved in 800.000 s per task"),
            "{cloud}"
        );
    }

    #[test]
    fn filtered_regions_say_why_in_words() {
        let model = model();
        let mut regions = pair();
        regions.push(region("hpc-c", Tier::Hpc, 64.0, 5.0, 1.5));
        regions.push(region("edge-d", Tier::Edge, 8.0, 3.0, 1.0));
        regions.push(region("cloud-e", Tier::Cloud, 8.0, 3.0, 1.0));
        regions[0].ready = false;
        regions[1].taints.push(Taint {
            key: "gpu".into(),
            value: "a100".into(),
            effect: TaintEffect::NoSchedule,
        });
        regions[1].allocated = Resources::new(15.5, 0, 0);
        regions[3].labels.insert("site".into(), "orm".into());
        regions[4].energy.pue = 0.8;
        let mut g = group(8, Objective::Balanced);
        g.constraints.tiers = vec![Tier::Edge, Tier::Cloud];
        g.constraints
            .region_selector
            .match_expressions
            .push(LabelRequirement {
                key: "site".into(),
                operator: SelectorOperator::NotIn,
                values: vec!["orm".into()],
            });
        let err = place(&regions, &g, &model).unwrap_err();
        let lines: Vec<String> = err.regions().iter().map(ToString::to_string).collect();
        assert_eq!(
            lines,
            [
                "edge-a: filtered out: region is not ready",
                "cloud-b: filtered out: taint gpu=a100:NoSchedule is not tolerated; \
                 insufficient cpu: 0.5 cores free, one task needs 1 cores",
                "hpc-c: filtered out: tier hpc is not among the allowed tiers (edge, cloud)",
                "edge-d: filtered out: labels do not match the region selector: site notin (orm)",
                "cloud-e: filtered out: region snapshot is invalid: pue must be >= 1, got 0.8",
            ]
        );
        let text = err.to_string();
        assert!(
            text.starts_with("no region can run task group cube-7443-12703: edge-a: filtered out"),
            "{text}"
        );

        // Tolerating the taint and freeing the cloud makes it the only candidate.
        regions[1].allocated = Resources::default();
        g.constraints.tolerations.push(Toleration {
            key: "gpu".into(),
            operator: TolerationOperator::Exists,
            ..Default::default()
        });
        let p = place(&regions, &g, &model).unwrap();
        assert_eq!(
            p.assignments
                .iter()
                .map(|a| a.region.as_str())
                .collect::<Vec<_>>(),
            ["cloud-b"]
        );
        let line = message(&p, "cloud-b");
        assert!(
            line.starts_with("cloud-b: 8 tasks, score 100.0: 3.500 s and 35.0 J per task"),
            "{line}"
        );
        let json = serde_json::to_value(&p.explanation).unwrap();
        assert_eq!(json["regions"][0]["verdict"], "filtered");
        assert_eq!(json["regions"][0]["reasons"][0]["reason"], "notReady");
        assert_eq!(
            json["regions"][0]["message"],
            "edge-a: filtered out: region is not ready"
        );
        assert_eq!(json["regions"][1]["score"]["tasks"], 8);
    }

    #[test]
    fn required_locality_and_region_lists_filter_with_reasons() {
        let model = model();
        let mut g = group(2, Objective::Energy);
        g.input = DataInput {
            bytes: 1_000_000,
            region: Some("cloud-b".into()),
        };
        g.constraints.data_locality = DataLocality::Required;
        let p = place(&pair(), &g, &model).unwrap();
        assert_eq!(
            message(&p, "edge-a"),
            "edge-a: filtered out: input data lives in region cloud-b and dataLocality is required"
        );
        g.constraints.regions = vec!["edge-a".into()];
        let err = place(&pair(), &g, &model).unwrap_err();
        assert_eq!(
            err.regions()[1].to_string(),
            "cloud-b: filtered out: region is not among the regions the group names (edge-a)"
        );
    }

    #[test]
    fn prefer_no_schedule_regions_come_last() {
        let model = model();
        let mut regions = pair();
        regions[0].taints.push(Taint {
            key: "maintenance".into(),
            value: String::new(),
            effect: TaintEffect::PreferNoSchedule,
        });
        let p = place(&regions, &group(4, Objective::Energy), &model).unwrap();
        assert_eq!(p.assignments[0].region, "cloud-b");
        assert!(message(&p, "edge-a").ends_with("avoided: untolerated PreferNoSchedule taint"));
    }

    #[test]
    fn invalid_groups_are_rejected_with_every_problem() {
        let mut g = group(4, Objective::Energy);
        g.deadline_s = Some(-5.0);
        g.parallelism = Some(0);
        let err = place(&pair(), &g, &model()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "task group cube-7443-12703 is invalid: deadlineS must be a positive number of seconds, got -5; \
             parallelism must be at least 1"
        );
    }

    #[test]
    fn parallelism_caps_replicas_over_all_regions() {
        let mut g = group(40, Objective::Latency);
        g.parallelism = Some(6);
        let p = place(&pair(), &g, &model()).unwrap();
        assert_eq!(p.assignments.iter().map(|a| a.replicas).sum::<u64>(), 6);
        assert_eq!(p.assignments.iter().map(|a| a.tasks).sum::<u64>(), 40);
    }

    #[test]
    fn capacity_within_inverts_finish() {
        let c = Candidate {
            index: 0,
            slots: 3,
            run: 2.0,
            joules: 1.0,
            transfer: 0.7,
            latency: 0.05,
            moves_data: true,
            avoided: false,
        };
        for n in 1..200u64 {
            let t = c.finish(n, 3);
            let cap = c.capacity_within(t, 3);
            assert!(cap >= n, "n {n} cap {cap}");
            assert!(c.finish(cap, 3) <= t + 1e-9);
            assert!(c.finish(cap + 1, 3) > t);
        }
    }
}

//! The plain structs placement decides over: a snapshot of each region and the task group to place.
//!
//! Everything here is data. The controller builds these from its store (Region objects and an
//! Application's task plan); the simulator reads them from YAML. Field names are camelCase on the
//! wire, like the REST API, and unknown fields are rejected.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

/// Seconds in a day: carbon-intensity curves repeat with this period.
pub const DAY_SECONDS: f64 = 86_400.0;

/// Kind of site a region is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Tier {
    /// Small site near the instrument (a telescope's computers).
    Edge,
    /// A public or private cloud site.
    Cloud,
    /// A high-performance computing centre.
    Hpc,
}

impl fmt::Display for Tier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Tier::Edge => "edge",
            Tier::Cloud => "cloud",
            Tier::Hpc => "hpc",
        })
    }
}

/// An amount of compute resources: a region's capacity, what is allocated, or one task's request.
///
/// CPU is kept in millicores so that capacity arithmetic is exact; on the wire it is a number of
/// cores (`cpu: 0.5`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Resources {
    /// CPU in millicores (1000 = one core).
    #[serde(rename = "cpu", with = "quantity::cores")]
    pub cpu_millis: u64,
    #[serde(default, rename = "memoryMiB", with = "quantity::count")]
    pub memory_mib: u64,
    #[serde(default, with = "quantity::count")]
    pub gpu: u64,
}

impl Resources {
    /// `cores` CPU cores (rounded to the millicore), `memory_mib` MiB, `gpu` devices.
    pub fn new(cores: f64, memory_mib: u64, gpu: u64) -> Self {
        Resources {
            cpu_millis: quantity::millis_from_cores(cores),
            memory_mib,
            gpu,
        }
    }

    /// CPU in cores.
    pub fn cores(&self) -> f64 {
        self.cpu_millis as f64 / 1000.0
    }

    /// What is left of `self` once `used` is taken (never below zero).
    pub fn saturating_sub(&self, used: &Resources) -> Resources {
        Resources {
            cpu_millis: self.cpu_millis.saturating_sub(used.cpu_millis),
            memory_mib: self.memory_mib.saturating_sub(used.memory_mib),
            gpu: self.gpu.saturating_sub(used.gpu),
        }
    }

    /// `self` times `n`, saturating.
    pub fn times(&self, n: u64) -> Resources {
        Resources {
            cpu_millis: self.cpu_millis.saturating_mul(n),
            memory_mib: self.memory_mib.saturating_mul(n),
            gpu: self.gpu.saturating_mul(n),
        }
    }

    /// Whether every component of `self` is at most that of `other`.
    pub fn fits_in(&self, other: &Resources) -> bool {
        self.cpu_millis <= other.cpu_millis
            && self.memory_mib <= other.memory_mib
            && self.gpu <= other.gpu
    }

    /// How many copies of `per_copy` fit in `self` (`u64::MAX` when `per_copy` is all zero).
    pub fn copies_of(&self, per_copy: &Resources) -> u64 {
        fn ratio(free: u64, each: u64) -> u64 {
            free.checked_div(each).unwrap_or(u64::MAX)
        }
        ratio(self.cpu_millis, per_copy.cpu_millis)
            .min(ratio(self.memory_mib, per_copy.memory_mib))
            .min(ratio(self.gpu, per_copy.gpu))
    }
}

/// Grams of CO2-equivalent per kWh drawn: a constant, or 24 hourly values (UTC hours 0..23).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum CarbonIntensity {
    Constant(f64),
    Daily(Vec<f64>),
}

impl Default for CarbonIntensity {
    fn default() -> Self {
        CarbonIntensity::Constant(0.0)
    }
}

impl CarbonIntensity {
    /// Intensity (g/kWh) at `t` seconds (only the UTC time of day matters).
    pub fn at(&self, t: f64) -> f64 {
        match self {
            CarbonIntensity::Constant(g) => *g,
            CarbonIntensity::Daily(curve) => curve[hour_of_day(t, curve.len())],
        }
    }

    /// Mean intensity (g/kWh) over `[start, start + duration]`, integrating the hourly steps.
    pub fn mean_over(&self, start: f64, duration: f64) -> f64 {
        match self {
            CarbonIntensity::Constant(g) => *g,
            CarbonIntensity::Daily(curve) => {
                if duration <= 0.0 || curve.is_empty() {
                    return self.at(start);
                }
                let step = DAY_SECONDS / curve.len() as f64;
                // Whole days average the curve; only the remainder needs stepping.
                let days = (duration / DAY_SECONDS).floor();
                let day_mean = curve.iter().sum::<f64>() / curve.len() as f64;
                let mut weighted = days * DAY_SECONDS * day_mean;
                let mut t = start;
                let end = start + (duration - days * DAY_SECONDS);
                while t < end {
                    let next_boundary = ((t / step).floor() + 1.0) * step;
                    let until = next_boundary.min(end);
                    weighted += (until - t) * self.at(t);
                    t = until;
                }
                weighted / duration
            }
        }
    }

    /// Why this curve is unusable, if it is.
    pub fn problem(&self) -> Option<String> {
        let values: &[f64] = match self {
            CarbonIntensity::Constant(g) => std::slice::from_ref(g),
            CarbonIntensity::Daily(curve) => {
                if curve.len() != 24 {
                    return Some(format!(
                        "carbonIntensity must be a number or 24 hourly values, got {} values",
                        curve.len()
                    ));
                }
                curve
            }
        };
        values
            .iter()
            .find(|g| !(g.is_finite() && **g >= 0.0))
            .map(|g| format!("carbonIntensity must be finite and >= 0 g/kWh, got {g}"))
    }
}

fn hour_of_day(t: f64, steps: usize) -> usize {
    let frac = (t / DAY_SECONDS).rem_euclid(1.0);
    ((frac * steps as f64) as usize).min(steps.saturating_sub(1))
}

/// How a region turns compute into energy and carbon.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EnergyProfile {
    /// Power drawn by the region's nodes when idle, all nodes together (W).
    pub idle_watts: f64,
    /// Extra power per busy core (W).
    pub watts_per_core: f64,
    /// Power usage effectiveness of the site (>= 1).
    #[serde(default = "one")]
    pub pue: f64,
    /// gCO2e per kWh.
    #[serde(default)]
    pub carbon_intensity: CarbonIntensity,
}

fn one() -> f64 {
    1.0
}

/// The region's link to the rest of the continuum.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Network {
    pub uplink_mbps: f64,
    #[serde(default)]
    pub rtt_ms: f64,
}

/// What a taint does to tasks that do not tolerate it (Kubernetes semantics).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TaintEffect {
    NoSchedule,
    PreferNoSchedule,
    NoExecute,
}

impl fmt::Display for TaintEffect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TaintEffect::NoSchedule => "NoSchedule",
            TaintEffect::PreferNoSchedule => "PreferNoSchedule",
            TaintEffect::NoExecute => "NoExecute",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Taint {
    pub key: String,
    #[serde(default)]
    pub value: String,
    pub effect: TaintEffect,
}

impl fmt::Display for Taint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.value.is_empty() {
            write!(f, "{}:{}", self.key, self.effect)
        } else {
            write!(f, "{}={}:{}", self.key, self.value, self.effect)
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum TolerationOperator {
    #[default]
    Equal,
    Exists,
}

/// Lets a task run on a region carrying a matching taint. An empty key with `Exists` tolerates
/// every taint; a missing effect matches every effect.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Toleration {
    #[serde(default)]
    pub key: String,
    #[serde(default)]
    pub operator: TolerationOperator,
    #[serde(default)]
    pub value: String,
    #[serde(default)]
    pub effect: Option<TaintEffect>,
}

impl Toleration {
    pub fn tolerates(&self, taint: &Taint) -> bool {
        let key_matches = match self.operator {
            TolerationOperator::Exists => self.key.is_empty() || self.key == taint.key,
            TolerationOperator::Equal => self.key == taint.key && self.value == taint.value,
        };
        key_matches && self.effect.is_none_or(|e| e == taint.effect)
    }
}

/// One state of a region, as the scheduler sees it at decision time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RegionSnapshot {
    pub name: String,
    pub tier: Tier,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub taints: Vec<Taint>,
    /// Heartbeating and accepting work.
    #[serde(default = "yes")]
    pub ready: bool,
    pub capacity: Resources,
    /// Already promised to running work.
    #[serde(default)]
    pub allocated: Resources,
    /// Background utilisation, 0..1.
    #[serde(default)]
    pub load: f64,
    pub energy: EnergyProfile,
    pub network: Network,
    /// Speed of one core relative to the reference core the costs are calibrated on (1.0).
    #[serde(default)]
    pub cpu_speed: Option<f64>,
    /// CPU model name, a feature for the predictor (regions sharing hardware share a model).
    #[serde(default)]
    pub cpu_model: Option<String>,
}

fn yes() -> bool {
    true
}

impl RegionSnapshot {
    /// A ready, unloaded, untainted, unlabelled region with nothing allocated.
    pub fn new(
        name: impl Into<String>,
        tier: Tier,
        capacity: Resources,
        energy: EnergyProfile,
        network: Network,
    ) -> Self {
        RegionSnapshot {
            name: name.into(),
            tier,
            labels: BTreeMap::new(),
            taints: Vec::new(),
            ready: true,
            capacity,
            allocated: Resources::default(),
            load: 0.0,
            energy,
            network,
            cpu_speed: None,
            cpu_model: None,
        }
    }

    /// Relative core speed (1.0 when not declared).
    pub fn speed(&self) -> f64 {
        self.cpu_speed.unwrap_or(1.0)
    }

    /// Capacity not yet allocated.
    pub fn free(&self) -> Resources {
        self.capacity.saturating_sub(&self.allocated)
    }

    /// Every reason this snapshot cannot be used, in words; empty when it is valid.
    pub fn problems(&self) -> Vec<String> {
        let mut problems = self.scalar_problems();
        problems.extend(self.energy.carbon_intensity.problem());
        problems
    }

    /// The checks of [`Self::problems`] but the carbon-intensity values: placement runs these for
    /// every region and decision, and they read no memory beyond the snapshot itself. A snapshot
    /// with a bad curve still places (its carbon figures are then meaningless); region files
    /// reject it on load.
    pub fn scalar_problems(&self) -> Vec<String> {
        // Plain checks, formatting only on failure.
        let mut problems = Vec::new();
        let e = &self.energy;
        let n = &self.network;
        let non_negative = |v: f64| v.is_finite() && v >= 0.0;
        if self.name.is_empty() {
            problems.push("name must not be empty".to_string());
        }
        if !non_negative(e.idle_watts) {
            problems.push(format!("idleWatts must be >= 0, got {}", e.idle_watts));
        }
        if !non_negative(e.watts_per_core) {
            problems.push(format!(
                "wattsPerCore must be >= 0, got {}",
                e.watts_per_core
            ));
        }
        if !(e.pue.is_finite() && e.pue >= 1.0) {
            problems.push(format!("pue must be >= 1, got {}", e.pue));
        }
        if !(n.uplink_mbps.is_finite() && n.uplink_mbps > 0.0) {
            problems.push(format!("uplinkMbps must be > 0, got {}", n.uplink_mbps));
        }
        if !non_negative(n.rtt_ms) {
            problems.push(format!("rttMs must be >= 0, got {}", n.rtt_ms));
        }
        if !(non_negative(self.load) && self.load <= 1.0) {
            problems.push(format!("load must be within 0..1, got {}", self.load));
        }
        if let Some(s) = self.cpu_speed
            && !(s.is_finite() && s > 0.0)
        {
            problems.push(format!("cpuSpeed must be > 0, got {s}"));
        }
        problems
    }
}

/// What one task of a group computes: the predictor's features.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TaskFeatures {
    /// Spectra fitted by one task.
    pub spectra: u64,
    /// Pixels per spectrum.
    pub pixels: u64,
    /// Templates in the library.
    pub templates: u64,
    /// Gauss-Hermite moments fitted (2 = V, sigma; 4 adds h3, h4).
    pub moments: u64,
}

/// Where a group's input lives and how big it is.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DataInput {
    /// Bytes of input for the whole group, split evenly among its tasks.
    #[serde(default)]
    pub bytes: u64,
    /// Region that stores the input; `None` when it is nowhere in particular (nothing to move).
    #[serde(default)]
    pub region: Option<String>,
}

/// How strictly the data's region binds the placement.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum DataLocality {
    /// Any region; moving the input costs time and energy, which scoring counts (data gravity).
    #[default]
    Preferred,
    /// Only the region that holds the input.
    Required,
}

/// `key op values`, as in Kubernetes label selectors.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LabelRequirement {
    pub key: String,
    pub operator: SelectorOperator,
    #[serde(default)]
    pub values: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SelectorOperator {
    In,
    NotIn,
    Exists,
    DoesNotExist,
}

impl LabelRequirement {
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        let value = labels.get(&self.key);
        match self.operator {
            SelectorOperator::In => value.is_some_and(|v| self.values.contains(v)),
            SelectorOperator::NotIn => value.is_none_or(|v| !self.values.contains(v)),
            SelectorOperator::Exists => value.is_some(),
            SelectorOperator::DoesNotExist => value.is_none(),
        }
    }
}

impl fmt::Display for LabelRequirement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.operator {
            SelectorOperator::In => write!(f, "{} in ({})", self.key, self.values.join(",")),
            SelectorOperator::NotIn => write!(f, "{} notin ({})", self.key, self.values.join(",")),
            SelectorOperator::Exists => write!(f, "{}", self.key),
            SelectorOperator::DoesNotExist => write!(f, "!{}", self.key),
        }
    }
}

/// Labels a region must carry (all requirements must hold).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LabelSelector {
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
    #[serde(default)]
    pub match_expressions: Vec<LabelRequirement>,
}

impl LabelSelector {
    /// The first requirement `labels` fail, in selector syntax (`k=v`, `k in (a,b)`, `!k`).
    pub fn first_mismatch(&self, labels: &BTreeMap<String, String>) -> Option<String> {
        for (k, v) in &self.match_labels {
            if labels.get(k) != Some(v) {
                return Some(format!("{k}={v}"));
            }
        }
        self.match_expressions
            .iter()
            .find(|r| !r.matches(labels))
            .map(ToString::to_string)
    }

    pub fn is_empty(&self) -> bool {
        self.match_labels.is_empty() && self.match_expressions.is_empty()
    }
}

/// Where a group may run. Empty lists mean "no restriction".
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Constraints {
    #[serde(default)]
    pub tiers: Vec<Tier>,
    #[serde(default)]
    pub regions: Vec<String>,
    #[serde(default)]
    pub region_selector: LabelSelector,
    #[serde(default)]
    pub tolerations: Vec<Toleration>,
    #[serde(default)]
    pub data_locality: DataLocality,
}

/// What the placement optimises.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Objective {
    /// Least energy that still meets the deadline.
    Energy,
    /// Earliest finish; energy breaks ties.
    Latency,
    /// Best sum of energy and finish time, each relative to its best achievable value.
    #[default]
    Balanced,
}

impl fmt::Display for Objective {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Objective::Energy => "energy",
            Objective::Latency => "latency",
            Objective::Balanced => "balanced",
        })
    }
}

/// The tasks of one batch application (its chunks): identical in shape, placed together.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TaskGroup {
    pub name: String,
    pub tasks: u64,
    /// Features of one task.
    pub features: TaskFeatures,
    /// Resources one running task holds.
    pub resources: Resources,
    #[serde(default)]
    pub input: DataInput,
    #[serde(default)]
    pub constraints: Constraints,
    #[serde(default)]
    pub objective: Objective,
    /// Seconds from `start_s` by which every task should be done.
    #[serde(default)]
    pub deadline_s: Option<f64>,
    /// Most tasks running at once over all regions (`None`: as many as fit).
    #[serde(default)]
    pub parallelism: Option<u64>,
    /// When the decision is made, in UTC seconds (Unix time in the controller, trace time in the
    /// simulator); only its time of day matters, for carbon-intensity curves.
    #[serde(default)]
    pub start_s: f64,
}

impl TaskGroup {
    /// Input bytes one task reads.
    pub fn bytes_per_task(&self) -> f64 {
        if self.tasks == 0 {
            0.0
        } else {
            self.input.bytes as f64 / self.tasks as f64
        }
    }
}

/// Serde helpers for quantities: numbers on the wire, checked to be finite and non-negative so
/// that a negative capacity is rejected with a message that says so.
mod quantity {
    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    pub fn millis_from_cores(cores: f64) -> u64 {
        (cores * 1000.0).round() as u64
    }

    fn non_negative<'de, D: Deserializer<'de>>(d: D, what: &str) -> Result<f64, D::Error> {
        let v = f64::deserialize(d)?;
        if !v.is_finite() || v < 0.0 {
            return Err(D::Error::custom(format!(
                "{what} must be a non-negative number, got {v}"
            )));
        }
        Ok(v)
    }

    pub mod cores {
        use super::*;

        pub fn serialize<S: Serializer>(millis: &u64, s: S) -> Result<S::Ok, S::Error> {
            s.serialize_f64(*millis as f64 / 1000.0)
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
            non_negative(d, "cpu (cores)").map(millis_from_cores)
        }
    }

    pub mod count {
        use super::*;

        pub fn serialize<S: Serializer>(n: &u64, s: S) -> Result<S::Ok, S::Error> {
            s.serialize_u64(*n)
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
            let v = non_negative(d, "memoryMiB and gpu")?;
            if v.fract() != 0.0 {
                return Err(D::Error::custom(format!(
                    "memoryMiB and gpu must be whole numbers, got {v}"
                )));
            }
            Ok(v as u64)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn carbon_curve_mean_integrates_hourly_steps() {
        let mut curve = vec![100.0; 24];
        curve[1] = 300.0;
        let c = CarbonIntensity::Daily(curve);
        assert_eq!(c.at(3600.0 + 10.0), 300.0);
        assert_eq!(c.at(DAY_SECONDS + 3600.0 + 10.0), 300.0);
        // Half an hour at 100 and half an hour at 300.
        assert!((c.mean_over(1800.0, 3600.0) - 200.0).abs() < 1e-9);
        // A whole day averages the curve.
        let day_mean = (23.0 * 100.0 + 300.0) / 24.0;
        assert!((c.mean_over(12_345.0, DAY_SECONDS) - day_mean).abs() < 1e-9);
    }

    #[test]
    fn negative_capacity_is_rejected_with_a_clear_message() {
        let err = yaml_serde::from_str::<Resources>("cpu: -4\nmemoryMiB: 100").unwrap_err();
        assert!(
            err.to_string()
                .contains("must be a non-negative number, got -4"),
            "{err}"
        );
        let err = yaml_serde::from_str::<Resources>("cpu: 4\nmemoryMiB: -1").unwrap_err();
        assert!(err.to_string().contains("got -1"), "{err}");
    }

    #[test]
    fn unknown_fields_are_rejected() {
        let err = yaml_serde::from_str::<Resources>("cpu: 4\ncpus: 1").unwrap_err();
        assert!(err.to_string().contains("unknown field `cpus`"), "{err}");
    }

    #[test]
    fn copies_of_takes_the_scarcest_resource() {
        let free = Resources::new(8.0, 1000, 0);
        assert_eq!(free.copies_of(&Resources::new(1.0, 300, 0)), 3);
        assert_eq!(free.copies_of(&Resources::new(0.5, 0, 0)), 16);
        assert_eq!(free.copies_of(&Resources::new(1.0, 0, 1)), 0);
        assert_eq!(free.copies_of(&Resources::default()), u64::MAX);
    }

    #[test]
    fn tolerations_follow_kubernetes_matching() {
        let taint = Taint {
            key: "gpu".into(),
            value: "a100".into(),
            effect: TaintEffect::NoSchedule,
        };
        let exact = Toleration {
            key: "gpu".into(),
            operator: TolerationOperator::Equal,
            value: "a100".into(),
            effect: None,
        };
        let wrong_value = Toleration {
            value: "v100".into(),
            ..exact.clone()
        };
        let any = Toleration {
            operator: TolerationOperator::Exists,
            ..Toleration::default()
        };
        let other_effect = Toleration {
            effect: Some(TaintEffect::NoExecute),
            ..exact.clone()
        };
        assert!(exact.tolerates(&taint));
        assert!(!wrong_value.tolerates(&taint));
        assert!(any.tolerates(&taint));
        assert!(!other_effect.tolerates(&taint));
    }
}

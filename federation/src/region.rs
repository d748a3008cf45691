//! The Region resource's spec and status, their validation, and the region's power model.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Where a region sits in the continuum.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Tier {
    Edge,
    Cloud,
    Hpc,
}

impl Tier {
    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Edge => "edge",
            Tier::Cloud => "cloud",
            Tier::Hpc => "hpc",
        }
    }
}

/// How the control plane runs work in a region.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum DriverKind {
    /// Worker processes on the control plane's own host.
    Local,
    /// An edge agent that joins with a token.
    Agent,
    /// Jobs in a member Kubernetes cluster.
    Kubernetes,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Capacity {
    /// Cores; for the `local` driver also the most worker processes at once.
    pub cpu: u32,
    #[serde(default, rename = "memoryMiB")]
    pub memory_mib: u64,
    #[serde(default)]
    pub gpu: u32,
}

/// Power model: `(idleWatts + wattsPerCore x busy cores) x pue`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct EnergyProfile {
    #[serde(default)]
    pub idle_watts: f64,
    #[serde(default)]
    pub watts_per_core: f64,
    #[serde(default = "one")]
    pub pue: f64,
    /// gCO2 per kWh.
    #[serde(default)]
    pub carbon_intensity: f64,
}

fn one() -> f64 {
    1.0
}

impl Default for EnergyProfile {
    fn default() -> Self {
        EnergyProfile {
            idle_watts: 0.0,
            watts_per_core: 0.0,
            pue: 1.0,
            carbon_intensity: 0.0,
        }
    }
}

impl EnergyProfile {
    /// Energy drawn by work that used `cpu_seconds` of CPU time: the marginal per-core draw,
    /// scaled by the site's PUE. Idle draw is the site's, not the work's, so it is left out.
    pub fn work_joules(&self, cpu_seconds: f64) -> f64 {
        self.watts_per_core * cpu_seconds * self.pue
    }

    /// Site power while `busy_cores` cores are busy.
    pub fn power_watts(&self, busy_cores: f64) -> f64 {
        (self.idle_watts + self.watts_per_core * busy_cores) * self.pue
    }
}

/// The region's link to the rest of the continuum; an undeclared uplink is taken as 1 Gbps.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Network {
    #[serde(default = "default_uplink_mbps")]
    pub uplink_mbps: f64,
    #[serde(default)]
    pub rtt_ms: f64,
}

fn default_uplink_mbps() -> f64 {
    1000.0
}

impl Default for Network {
    fn default() -> Self {
        Network {
            uplink_mbps: default_uplink_mbps(),
            rtt_ms: 0.0,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Taint {
    pub key: String,
    #[serde(default)]
    pub value: String,
    /// `NoSchedule` or `PreferNoSchedule`.
    pub effect: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RegionSpec {
    pub tier: Tier,
    #[serde(default)]
    pub location: String,
    pub driver: DriverKind,
    pub capacity: Capacity,
    #[serde(default)]
    pub energy: EnergyProfile,
    #[serde(default)]
    pub network: Network,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub taints: Vec<Taint>,
    /// Cordoned (`ceccmctl cordon`): nothing new is placed here; what is queued or running
    /// stays unless the region is drained.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub unschedulable: bool,
    /// How a task runs on the region's hosts: `process` (the worker's own child process or
    /// thread, the default) or `oci` (in an OCI container through runc, from the
    /// application's image, with its resources enforced by cgroups and no network).
    #[serde(default, skip_serializing_if = "Runtime::is_process")]
    pub runtime: Runtime,
}

/// How tasks run on a region's hosts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Runtime {
    #[default]
    Process,
    Oci,
}

impl Runtime {
    pub fn is_process(&self) -> bool {
        *self == Runtime::Process
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Runtime::Process => "process",
            Runtime::Oci => "oci",
        }
    }
}

impl std::str::FromStr for Runtime {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "process" => Ok(Runtime::Process),
            "oci" => Ok(Runtime::Oci),
            _ => Err(format!("{text:?}: expected process or oci")),
        }
    }
}

/// A condition of an object's status, as Kubernetes writes them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    #[serde(rename = "type")]
    pub condition_type: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    pub reason: String,
    pub message: String,
    pub last_transition_time: String,
}

/// What a region's agent last reported (regions with `driver: agent`).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AgentStatus {
    /// The agent's name (its host's, unless given).
    pub name: String,
    /// When the server last heard from it.
    pub heartbeat_time: String,
    /// Since when it has been heard without a gap (reset when it comes back after one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connected_since: Option<String>,
    /// Cores it offers.
    pub cpu: u32,
    /// Worker processes alive on its host.
    pub workers: u32,
    /// CPU time of its workers and their tasks since it started.
    pub cpu_seconds: f64,
    /// Energy its host measured (RAPL) since it started; absent where the host has no meter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub measured_joules: Option<f64>,
}

/// What the control plane observed of a region.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RegionStatus {
    /// `Ready` or `NotReady` (`Deleting` while its finalizer runs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub heartbeat_time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allocatable: Option<Capacity>,
    /// Busy workers over capacity, 0..1.
    #[serde(default)]
    pub load: f64,
    #[serde(default)]
    pub power_watts: f64,
    #[serde(default)]
    pub energy_joules: f64,
    #[serde(default)]
    pub cpu_seconds: f64,
    #[serde(default)]
    pub workers: u32,
    /// `Ready`: whether the region can run work, why, and since when.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// The last report of the region's agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<AgentStatus>,
}

/// One thing wrong with a spec, with the JSON path of the offending field.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Violation {
    pub field: String,
    pub message: String,
}

impl Violation {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Violation {
            field: field.into(),
            message: message.into(),
        }
    }
}

impl RegionSpec {
    /// Checks what serde cannot: ranges and the taint effects.
    pub fn validate(&self) -> Vec<Violation> {
        let mut out = Vec::new();
        if self.capacity.cpu == 0 {
            out.push(Violation::new("spec.capacity.cpu", "must be at least 1"));
        }
        if self.capacity.cpu > 4096 {
            out.push(Violation::new("spec.capacity.cpu", "must be at most 4096"));
        }
        let e = &self.energy;
        for (field, value) in [
            ("spec.energy.idleWatts", e.idle_watts),
            ("spec.energy.wattsPerCore", e.watts_per_core),
            ("spec.energy.carbonIntensity", e.carbon_intensity),
            ("spec.network.rttMs", self.network.rtt_ms),
        ] {
            if !value.is_finite() || value < 0.0 {
                out.push(Violation::new(field, "must be a finite number >= 0"));
            }
        }
        if !self.network.uplink_mbps.is_finite() || self.network.uplink_mbps <= 0.0 {
            out.push(Violation::new(
                "spec.network.uplinkMbps",
                "must be a finite number > 0",
            ));
        }
        if !e.pue.is_finite() || e.pue < 1.0 {
            out.push(Violation::new(
                "spec.energy.pue",
                "must be a finite number >= 1",
            ));
        }
        for (i, taint) in self.taints.iter().enumerate() {
            if taint.key.is_empty() {
                out.push(Violation::new(
                    format!("spec.taints[{i}].key"),
                    "must not be empty",
                ));
            }
            if !matches!(taint.effect.as_str(), "NoSchedule" | "PreferNoSchedule") {
                out.push(Violation::new(
                    format!("spec.taints[{i}].effect"),
                    "must be NoSchedule or PreferNoSchedule",
                ));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(yaml: &str) -> Result<RegionSpec, yaml_serde::Error> {
        yaml_serde::from_str(yaml)
    }

    #[test]
    fn parses_a_minimal_region_with_defaults() {
        let s = spec("tier: edge\ndriver: local\ncapacity: {cpu: 2}\n").unwrap();
        assert_eq!(s.tier, Tier::Edge);
        assert_eq!(s.energy.pue, 1.0);
        assert!(s.validate().is_empty());
    }

    #[test]
    fn rejects_unknown_fields_and_bad_values() {
        assert!(spec("tier: edge\ndriver: local\ncapacity: {cpu: 2}\ncolour: red\n").is_err());
        assert!(spec("tier: moon\ndriver: local\ncapacity: {cpu: 2}\n").is_err());
        let s = spec(
            "tier: cloud\ndriver: local\ncapacity: {cpu: 0}\nenergy: {pue: 0.5}\ntaints: [{key: k, effect: Sometimes}]\n",
        )
        .unwrap();
        let fields: Vec<_> = s.validate().into_iter().map(|v| v.field).collect();
        assert_eq!(
            fields,
            [
                "spec.capacity.cpu",
                "spec.energy.pue",
                "spec.taints[0].effect"
            ]
        );
    }

    #[test]
    fn power_model_scales_with_busy_cores_and_pue() {
        let e = EnergyProfile {
            idle_watts: 10.0,
            watts_per_core: 5.0,
            pue: 1.5,
            carbon_intensity: 0.0,
        };
        assert_eq!(e.power_watts(0.0), 15.0);
        assert_eq!(e.power_watts(2.0), 30.0);
        assert_eq!(e.work_joules(4.0), 30.0);
    }
}

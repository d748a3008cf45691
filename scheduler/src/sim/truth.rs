//! What tasks really cost in the simulated world.
//!
//! Declared region figures (core speed, watts) are what a vendor sheet says; the workload sees
//! something else. The true CPU time of a task is
//!
//! ```text
//! overhead + 12.5 ms x spectra x (pixels/4437)^1.1 x (templates/150)^0.8 x (1 + 0.15 (moments - 2))
//!     x (1 + loadSlowdown x load) / speed
//! ```
//!
//! on `speed` (the region's real speed on this code, e.g. an ARM edge node below its nominal
//! figure, AVX-512 HPC nodes above it), and energy is the power model with the region's real
//! watts. Each task also draws a log-normal noise factor (3 %) that nobody can predict. The
//! analytic prior is linear in pixels and templates and ignores load, overhead and the real
//! speed: the learned predictor has something to learn, and the `oracle-greedy` policy and the
//! energy bound ([`crate::sim::bound`]) know it all (the bound knows the noise too).

use serde::{Deserialize, Serialize};

use crate::analytic::{
    REFERENCE_PIXELS, REFERENCE_SECONDS_PER_SPECTRUM, REFERENCE_TEMPLATES, task_cores,
};
use crate::model::{RegionSnapshot, TaskFeatures, TaskGroup};
use crate::placement::{CostModel, TaskCost};

/// Seconds every task spends starting up (loading templates, reading its chunk).
pub const TASK_OVERHEAD_SECONDS: f64 = 0.05;
/// Standard deviation of the log of the per-task noise factor.
pub const NOISE_SIGMA: f64 = 0.03;

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RegionTruth {
    /// Real core speed on this workload (`None`: as declared).
    #[serde(default)]
    pub speed: Option<f64>,
    /// Real watts per busy core over declared.
    #[serde(default = "one")]
    pub watts_factor: f64,
    /// Fractional slow-down at full load (memory bandwidth, shared caches).
    #[serde(default)]
    pub load_slowdown: f64,
}

fn one() -> f64 {
    1.0
}

impl Default for RegionTruth {
    fn default() -> Self {
        RegionTruth {
            speed: None,
            watts_factor: 1.0,
            load_slowdown: 0.0,
        }
    }
}

impl RegionTruth {
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        if let Some(s) = self.speed
            && !(s.is_finite() && s > 0.0)
        {
            p.push(format!("speed must be > 0, got {s}"));
        }
        if !(self.watts_factor.is_finite() && self.watts_factor > 0.0) {
            p.push(format!(
                "wattsFactor must be > 0, got {}",
                self.watts_factor
            ));
        }
        if !(self.load_slowdown.is_finite() && self.load_slowdown >= 0.0) {
            p.push(format!(
                "loadSlowdown must be >= 0, got {}",
                self.load_slowdown
            ));
        }
        p
    }
}

/// CPU seconds of one task on a reference core, as the simulated world computes them.
pub fn true_reference_cpu_seconds(f: &TaskFeatures) -> f64 {
    REFERENCE_SECONDS_PER_SPECTRUM
        * f.spectra as f64
        * (f.pixels as f64 / REFERENCE_PIXELS).powf(1.1)
        * (f.templates as f64 / REFERENCE_TEMPLATES).powf(0.8)
        * (1.0 + 0.15 * (f.moments as f64 - 2.0))
}

/// Expected cost of one task of `group` on `region` whose truth is `truth` (no noise).
pub fn true_cost(region: &RegionSnapshot, truth: &RegionTruth, group: &TaskGroup) -> TaskCost {
    let speed = truth.speed.unwrap_or_else(|| region.speed());
    let cores = task_cores(group);
    let cpu_seconds = true_reference_cpu_seconds(&group.features)
        * (1.0 + truth.load_slowdown * region.load)
        / speed
        + TASK_OVERHEAD_SECONDS * cores;
    let e = &region.energy;
    let capacity = region.capacity.cores();
    let idle_share = if capacity > 0.0 {
        e.idle_watts / capacity
    } else {
        0.0
    };
    let joules = cpu_seconds * (idle_share + e.watts_per_core * truth.watts_factor) * e.pue;
    TaskCost {
        seconds: cpu_seconds / cores,
        joules,
    }
}

/// The `oracle-greedy` policy's cost model: the simulated world's expected costs. `truths` is indexed
/// like the region slice placement sees.
#[derive(Debug, Clone)]
pub struct TruthCostModel<'a> {
    pub truths: &'a [RegionTruth],
    pub names: std::collections::HashMap<&'a str, usize>,
    pub transfer_joules_per_byte: f64,
}

impl<'a> TruthCostModel<'a> {
    pub fn new(
        regions: &'a [RegionSnapshot],
        truths: &'a [RegionTruth],
        transfer_joules_per_byte: f64,
    ) -> Self {
        let names = regions
            .iter()
            .enumerate()
            .map(|(i, r)| (r.name.as_str(), i))
            .collect();
        TruthCostModel {
            truths,
            names,
            transfer_joules_per_byte,
        }
    }
}

impl CostModel for TruthCostModel<'_> {
    fn task_cost(&self, region: &RegionSnapshot, group: &TaskGroup) -> TaskCost {
        let truth = self
            .names
            .get(region.name.as_str())
            .map_or_else(RegionTruth::default, |&i| self.truths[i]);
        true_cost(region, &truth, group)
    }

    fn transfer_joules_per_byte(&self) -> f64 {
        self.transfer_joules_per_byte
    }
}

//! The analytic cost model: cost per spectrum x region speed, energy from the power model.
//! It is the predictor's prior, and the `greedy-analytic` policy's only model.

use serde::{Deserialize, Serialize};

use crate::energy::modelled_joules;
use crate::model::{RegionSnapshot, TaskFeatures, TaskGroup};
use crate::placement::{CostModel, DEFAULT_TRANSFER_JOULES_PER_BYTE, TaskCost};

/// Pixels per spectrum of the reference configuration: astro-fit's benchmark (a MaNGA spectrum
/// cut to the 3600-10000 A rest frame).
pub const REFERENCE_PIXELS: f64 = 4437.0;
/// Templates of the reference configuration (the 150 E-MILES SSPs).
pub const REFERENCE_TEMPLATES: f64 = 150.0;
/// Seconds one reference core spends on one reference spectrum: astro-fit's measured benchmark
/// (79.9 spectra/s of CPU on one thread, E-MILES 150 templates, 2 moments; BENCHMARKS.md, issue 4).
pub const REFERENCE_SECONDS_PER_SPECTRUM: f64 = 1.0 / 79.9;

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AnalyticCostModel {
    /// CPU seconds per reference spectrum on a reference core.
    pub seconds_per_spectrum: f64,
    pub transfer_joules_per_byte: f64,
}

impl Default for AnalyticCostModel {
    fn default() -> Self {
        AnalyticCostModel {
            seconds_per_spectrum: REFERENCE_SECONDS_PER_SPECTRUM,
            transfer_joules_per_byte: DEFAULT_TRANSFER_JOULES_PER_BYTE,
        }
    }
}

/// Cores one task runs on: its CPU request, or one core when it requests none.
pub fn task_cores(group: &TaskGroup) -> f64 {
    if group.resources.cpu_millis == 0 {
        1.0
    } else {
        group.resources.cores()
    }
}

impl AnalyticCostModel {
    /// CPU seconds of one task on a reference core: linear in spectra, pixels and templates.
    pub fn reference_cpu_seconds(&self, f: &TaskFeatures) -> f64 {
        self.seconds_per_spectrum
            * f.spectra as f64
            * (f.pixels as f64 / REFERENCE_PIXELS)
            * (f.templates as f64 / REFERENCE_TEMPLATES)
    }
}

impl CostModel for AnalyticCostModel {
    fn task_cost(&self, region: &RegionSnapshot, group: &TaskGroup) -> TaskCost {
        let cpu_seconds = self.reference_cpu_seconds(&group.features) / region.speed();
        TaskCost {
            seconds: cpu_seconds / task_cores(group),
            joules: modelled_joules(region, cpu_seconds),
        }
    }

    fn transfer_joules_per_byte(&self) -> f64 {
        self.transfer_joules_per_byte
    }
}

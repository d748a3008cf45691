//! # ceccm-scheduler
//!
//! Decides where the tasks of a batch application run across the cloud-edge continuum. Pure
//! functions over plain structs: no I/O, no HTTP, no dependency on the rest of ceccm.
//!
//! ## Placement API
//!
//! ```text
//! place(&[RegionSnapshot], &TaskGroup, &impl CostModel) -> Result<Placement, Unschedulable>
//! ```
//!
//! * [`RegionSnapshot`]: one region as seen at decision time: `name`, `tier` (edge, cloud, hpc),
//!   `labels`, `taints`, `ready`, `capacity` and `allocated` ([`Resources`]: cpu in millicores,
//!   memory MiB, gpu), background `load` (0..1), `energy` ([`EnergyProfile`]: idle watts, watts
//!   per busy core, PUE, [`CarbonIntensity`] as a constant or a 24-hour curve in gCO2e/kWh),
//!   `network` (uplink Mbps, RTT ms), optional `cpu_speed` (relative to the reference core) and
//!   `cpu_model`.
//! * [`TaskGroup`]: one application's tasks: `tasks` (count), per-task [`TaskFeatures`] (spectra,
//!   pixels, templates, moments) and [`Resources`], the `input` ([`DataInput`]: total bytes and the
//!   region that stores them), [`Constraints`] (allowed tiers, region names, a label selector,
//!   tolerations, [`DataLocality`]), the [`Objective`] (`energy`, `latency`, `balanced`), an
//!   optional deadline in seconds, an optional parallelism cap, and the decision time `start_s`
//!   (its time of day selects the carbon intensity).
//! * [`CostModel`]: predicts one task's run time and energy on a region. [`AnalyticCostModel`] is
//!   the prior (cost per spectrum x region speed, energy from the power model); the learned
//!   predictor implements the same trait.
//! * [`Placement`]: per-region [`Assignment`]s (tasks, replicas running at once, predicted
//!   seconds, joules, grams of CO2e, bytes moved), the totals, whether the deadline is met, and an
//!   [`Explanation`]: a summary plus, for every region of the snapshot, either why it was filtered
//!   out ([`FilterReason`], with human-readable text) or its predicted time and energy per task,
//!   its score and its share of the tasks. Displaying a [`RegionExplanation`] gives the line
//!   `ceccmctl describe` shows; its JSON carries the same text as `message`.
//! * [`Unschedulable`]: the group is invalid, or no region passes the filters; it carries every
//!   region's reasons.
//!
//! ## How a group is placed
//!
//! 1. **Filter** each region: a valid snapshot, ready, tier and name allowed, labels matching the
//!    selector, every `NoSchedule`/`NoExecute` taint tolerated, the input's region when data
//!    locality is required, and room for at least one task in what is free. An untolerated
//!    `PreferNoSchedule` taint does not filter: the region is used after all others.
//! 2. **Score**: the cost model predicts each feasible region's seconds and joules per task; input
//!    that must move adds its transfer time over the slower uplink (plus the RTT) and transfer
//!    energy (data gravity). A region runs at most `free / per-task request` tasks at once and
//!    the rest in waves.
//! 3. **Select**: regions are filled in order of energy per task. `latency` bisects on the finish
//!    time for the earliest one that fits every task; `energy` takes the least energy that meets
//!    the deadline; `balanced` scans the trade-off between the two for the least
//!    `time / fastest time + energy / least energy`. A deadline that even the fastest split
//!    misses gives the fastest split, marked `deadline_met: false`.
//!
//! Replicas never exceed free capacity, every constraint holds, and the result depends only on
//! the arguments (property-tested in `tests/`).
//!
//! ## Beyond placement
//!
//! * [`predictor`]: the learned [`Predictor`] (a [`CostModel`]): analytic prior until enough
//!   telemetry, model choice among linfa regressors by k-fold cross-validation, retraining as
//!   samples arrive, and a [`PredictorReport`] of its held-out error (MAPE).
//! * [`energy`]: the power model, carbon accounting, and RAPL counters where readable.
//! * [`autoscale`]: workers per region from the predicted time to drain its queue.
//! * [`sim`]: the trace simulator behind `ceccm sim` ([`sim::cli::SimArgs`], [`sim::cli::run`]).

pub mod analytic;
pub mod autoscale;
pub mod energy;
pub mod model;
pub mod placement;
pub mod predictor;
pub mod sim;

pub use analytic::AnalyticCostModel;
pub use model::{
    CarbonIntensity, Constraints, DataInput, DataLocality, EnergyProfile, LabelRequirement,
    LabelSelector, Network, Objective, RegionSnapshot, Resources, SelectorOperator, Taint,
    TaintEffect, TaskFeatures, TaskGroup, Tier, Toleration, TolerationOperator,
};
pub use placement::{
    Assignment, CostModel, Explanation, FilterReason, Placement, RegionExplanation, RegionScore,
    Resource, TaskCost, Unschedulable, Verdict, place,
};
pub use predictor::{Predictor, PredictorConfig, PredictorReport, TelemetrySample};

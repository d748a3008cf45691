//! The trace simulator: replays a survey-sized workload over a region set, discrete-event, once
//! per placement policy, and reports energy, carbon, makespan, deadline misses and bytes moved.
//!
//! * [`files`]: the region file and the trace file (YAML), loaded and checked.
//! * [`truth`]: what tasks really cost in the simulated world (hidden from all policies but
//!   `oracle-greedy` and the energy bound).
//! * [`generate`]: the seeded generator of the reference trace and of large region sets.
//! * [`engine`]: the discrete-event replay and the policies.
//! * [`bound`]: a proven lower bound on the energy of any policy on a trace.
//! * [`pools`]: the idle draw of worker pools, one worker per core against autoscaled.
//! * [`report`]: results as JSON or a table, and the energy/job-time plot.
//! * [`cli`]: `ceccm sim`.

pub mod bound;
pub mod cli;
pub mod engine;
pub mod files;
pub mod generate;
pub mod pools;
pub mod report;
pub mod truth;

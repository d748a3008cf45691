//! The simulator on the committed reference region set and trace: the targets of the issue,
//! and bad input rejected with clear messages.

use std::path::{Path, PathBuf};

use ceccm_scheduler::sim::cli::{OutputFormat, SimArgs, SimError, run};
use ceccm_scheduler::sim::files::trace_to_yaml;
use ceccm_scheduler::sim::generate::{TraceSpec, generate_trace};
use ceccm_scheduler::sim::report::SimReport;

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/sim")
}

fn args(regions: PathBuf, trace: PathBuf, policy: &str) -> SimArgs {
    SimArgs {
        regions,
        trace,
        policy: policy.into(),
        output: OutputFormat::Json,
        plot: None,
        seed: None,
    }
}

#[test]
fn reference_trace_meets_the_targets() {
    let dir = tempfile::tempdir().unwrap();
    let mut a = args(
        examples().join("regions.yaml"),
        examples().join("trace.yaml"),
        "all",
    );
    a.plot = Some(dir.path().join("plot.png"));
    let mut out = Vec::new();
    let report = run(&a, &mut out).unwrap();
    let json: serde_json::Value = serde_json::from_slice(&out).unwrap();
    for name in [
        "round-robin",
        "least-loaded",
        "bin-packing",
        "greedy-analytic",
        "learned",
        "oracle-greedy",
    ] {
        for field in [
            "energy_kwh",
            "carbon_kg",
            "makespan_s",
            "deadline_misses",
            "bytes_moved",
            "energy_over_bound",
        ] {
            assert!(
                json["policies"][name][field].is_number(),
                "{name}.{field} missing: {json}"
            );
        }
    }
    assert!(json["lower_bound"]["energy_kwh"].is_number(), "{json}");
    eprintln!("{}", report.table());
    let p = |name: &str| &report.policies[name];
    let learned = p("learned");
    assert!(
        learned.energy_kwh <= 0.75 * p("round-robin").energy_kwh,
        "{}",
        report.table()
    );
    assert!(
        learned.energy_kwh <= 0.75 * p("least-loaded").energy_kwh,
        "{}",
        report.table()
    );
    assert!(
        learned.energy_kwh <= 1.03 * p("oracle-greedy").energy_kwh,
        "{}",
        report.table()
    );
    assert_every_policy_spends_at_least_the_bound(&report);
    assert!(
        learned.energy_over_bound.unwrap() <= 1.10,
        "learned is within 10 % of the proven bound: {}",
        report.table()
    );
    assert!(
        learned.deadline_misses <= p("least-loaded").deadline_misses,
        "{}",
        report.table()
    );
    let predictor = learned.predictor.as_ref().unwrap();
    assert!(
        predictor.runtime.as_ref().unwrap().holdout_mape < 0.10,
        "{predictor:?}"
    );
    let png = std::fs::read(dir.path().join("plot.png")).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
}

/// Every policy's energy is at least the proven bound (up to rounding in the sums), and every
/// policy ran every task.
fn assert_every_policy_spends_at_least_the_bound(report: &SimReport) {
    let bound = report.lower_bound.energy_kwh;
    assert!(bound > 0.0, "{}", report.table());
    for (name, r) in &report.policies {
        assert_eq!(r.unplaced, 0, "{name}: {}", report.table());
        assert!(
            r.energy_kwh >= bound * (1.0 - 1e-9),
            "{name} spends {} kWh, below the bound {bound}:\n{}",
            r.energy_kwh,
            report.table()
        );
        assert!(r.energy_over_bound.unwrap() >= 1.0 - 1e-9);
    }
}

/// A small generated trace on the reference regions, its arrivals squeezed into `span_s` so that
/// jobs compete for the cheap regions when `span_s` is short.
fn small_trace_report(seed: u64, span_s: f64) -> SimReport {
    let dir = tempfile::tempdir().unwrap();
    let mut trace = generate_trace(TraceSpec { seed, scale: 0.02 }, String::new());
    let last = trace.jobs.iter().map(|j| j.at).fold(0.0, f64::max);
    for job in &mut trace.jobs {
        job.at *= span_s / last;
    }
    let mut a = args(
        examples().join("regions.yaml"),
        write(dir.path(), "trace.yaml", &trace_to_yaml(&trace)),
        "all",
    );
    a.seed = Some(seed);
    run(&a, &mut Vec::new()).unwrap()
}

#[test]
fn every_policy_spends_at_least_the_lower_bound_on_small_traces() {
    for (seed, span_s) in [(1, 2.0 * 86_400.0), (2, 3_600.0), (3, 300.0)] {
        let report = small_trace_report(seed, span_s);
        assert_every_policy_spends_at_least_the_bound(&report);
        assert_eq!(report.lower_bound.infeasible_tasks, 0);
        assert_eq!(
            report.lower_bound.tasks, report.policies["learned"].tasks,
            "the bound counts the tasks every policy runs"
        );
    }
}

#[test]
fn with_one_region_and_no_slowdown_the_bound_is_every_policys_energy() {
    // One region, no truth (no load slow-down), data nowhere: no policy has a choice to make, and
    // the bound, which knows the per-task noise, is exact.
    let dir = tempfile::tempdir().unwrap();
    let a = args(
        write(dir.path(), "r.yaml", REGIONS),
        write(dir.path(), "t.yaml", TRACE),
        "all",
    );
    let report = run(&a, &mut Vec::new()).unwrap();
    let bound = report.lower_bound.energy_kwh;
    for (name, r) in &report.policies {
        assert!(
            (r.energy_kwh - bound).abs() <= 1e-9 * bound,
            "{name}: {} kWh against the bound {bound}",
            r.energy_kwh
        );
    }
}

#[test]
fn autoscaled_pools_idle_less_than_one_worker_per_core() {
    let report = small_trace_report(4, 86_400.0);
    for (name, r) in &report.policies {
        let pools = &r.pools;
        assert!(pools.busy_core_s > 0.0, "{name}: {pools:?}");
        // Both pools hold a worker for every busy core-second...
        assert!(
            pools.autoscaled_worker_s >= pools.busy_core_s * (1.0 - 1e-9),
            "{name}: {pools:?}"
        );
        assert!(
            pools.per_core_worker_s >= pools.busy_core_s,
            "{name}: {pools:?}"
        );
        // ...and over a day of sparse arrivals the autoscaled one idles far less.
        assert!(
            pools.autoscaled_idle_kwh < 0.5 * pools.per_core_idle_kwh,
            "{name}: {pools:?}"
        );
    }
}

#[test]
fn with_energy_as_every_objective_the_oracle_reaches_the_bound() {
    // On the reference trace the bound's gap to the best policies comes from the jobs whose
    // objective is latency or balanced (they pay energy for time); ask every job for energy
    // and the greedy oracle lands within 1 % of the bound, so the bound is tight.
    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(examples().join("trace.yaml")).unwrap();
    let energy_only = text
        .replace("objective: latency", "objective: energy")
        .replace("objective: balanced", "objective: energy");
    let a = args(
        examples().join("regions.yaml"),
        write(dir.path(), "trace.yaml", &energy_only),
        "oracle-greedy",
    );
    let report = run(&a, &mut Vec::new()).unwrap();
    let ratio = report.policies["oracle-greedy"].energy_over_bound.unwrap();
    assert!((1.0 - 1e-9..=1.01).contains(&ratio), "{}", report.table());
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

const REGIONS: &str = "
regions:
  - spec:
      name: edge-a
      tier: edge
      capacity: {cpu: 8, memoryMiB: 16384}
      energy: {idleWatts: 10, wattsPerCore: 3, pue: 1.1, carbonIntensity: 100}
      network: {uplinkMbps: 100}
";

const TRACE: &str = "
kinds:
  fit: {pixels: 4563, templates: 150, moments: 2, resources: {cpu: 1, memoryMiB: 1024}, objective: energy}
jobs:
  - {kind: fit, name: a, at: 0, tasks: 4, spectra: 100}
";

fn error_of(regions: &str, trace: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let a = args(
        write(dir.path(), "regions.yaml", regions),
        write(dir.path(), "trace.yaml", trace),
        "all",
    );
    let err: SimError = run(&a, &mut Vec::new()).unwrap_err();
    err.to_string()
}

#[test]
fn a_small_valid_pair_runs() {
    let dir = tempfile::tempdir().unwrap();
    let a = args(
        write(dir.path(), "r.yaml", REGIONS),
        write(dir.path(), "t.yaml", TRACE),
        "learned,oracle-greedy",
    );
    let report = run(&a, &mut Vec::new()).unwrap();
    assert_eq!(report.policies.len(), 2);
    assert_eq!(report.policies["learned"].tasks, 4);
}

#[test]
fn bad_input_is_rejected_with_clear_messages() {
    let unknown = error_of(
        &REGIONS.replace("tier: edge", "tier: edge\n      colour: blue"),
        TRACE,
    );
    assert!(unknown.contains("unknown field `colour`"), "{unknown}");
    let negative = error_of(&REGIONS.replace("cpu: 8", "cpu: -8"), TRACE);
    assert!(
        negative.contains("must be a non-negative number, got -8"),
        "{negative}"
    );
    let pue = error_of(&REGIONS.replace("pue: 1.1", "pue: 0.5"), TRACE);
    assert!(
        pue.contains("region edge-a: pue must be >= 1, got 0.5"),
        "{pue}"
    );
    let trace_field = error_of(
        REGIONS,
        &TRACE.replace("spectra: 100}", "spectra: 100, colour: red}"),
    );
    assert!(
        trace_field.contains("unknown field `colour`"),
        "{trace_field}"
    );
    let kind = error_of(REGIONS, &TRACE.replace("{kind: fit", "{kind: fitt"));
    assert!(
        kind.contains("job 0 (a) names unknown kind \"fitt\""),
        "{kind}"
    );
    let impossible = error_of(
        REGIONS,
        &TRACE.replace(
            "objective: energy",
            "objective: energy, constraints: {tiers: [hpc]}",
        ),
    );
    assert!(
        impossible.contains("job 0 (a) has impossible constraints: no region can run task group a: edge-a: filtered out: tier edge is not among the allowed tiers (hpc)"),
        "{impossible}"
    );
    let too_big = error_of(
        REGIONS,
        &TRACE.replace("resources: {cpu: 1,", "resources: {cpu: 16,"),
    );
    assert!(
        too_big.contains("insufficient cpu: 8 cores free, one task needs 16 cores"),
        "{too_big}"
    );
    let dir = tempfile::tempdir().unwrap();
    let a = args(
        write(dir.path(), "r.yaml", REGIONS),
        write(dir.path(), "t.yaml", TRACE),
        "fastest",
    );
    let policy = run(&a, &mut Vec::new()).unwrap_err().to_string();
    assert!(policy.starts_with("unknown policy \"fastest\""), "{policy}");
}

//! The simulator on the committed reference region set and trace: the targets of the issue,
//! and bad input rejected with clear messages.

use std::path::{Path, PathBuf};

use ceccm_scheduler::sim::cli::{OutputFormat, SimArgs, SimError, run};

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
        "hindsight",
    ] {
        for field in [
            "energy_kwh",
            "carbon_kg",
            "makespan_s",
            "deadline_misses",
            "bytes_moved",
        ] {
            assert!(
                json["policies"][name][field].is_number(),
                "{name}.{field} missing: {json}"
            );
        }
    }
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
        learned.energy_kwh <= 1.03 * p("hindsight").energy_kwh,
        "{}",
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
        "learned,hindsight",
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

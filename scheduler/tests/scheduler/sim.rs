//! The simulator on the committed reference region set and trace: the targets of the issue,
//! and bad input rejected with clear messages.

use std::path::{Path, PathBuf};

use ceccm_scheduler::sim::cli::{OutputFormat, SimArgs, run};

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

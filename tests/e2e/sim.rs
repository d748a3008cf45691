//! `ceccm sim` on the reference region set and trace: JSON with every policy's figures.

use std::process::Command;

use crate::support::{bin, workspace_root};

#[test]
fn sim_prints_every_policy_as_json() {
    let examples = workspace_root().join("examples/sim");
    let out = Command::new(bin("ceccm"))
        .arg("sim")
        .arg("--regions")
        .arg(examples.join("regions.yaml"))
        .arg("--trace")
        .arg(examples.join("trace.yaml"))
        .args(["--policy", "all", "-o", "json"])
        .output()
        .expect("ceccm runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON on stdout");
    let policies = json["policies"].as_object().expect("policies object");
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
        ] {
            assert!(policies[name][field].is_number(), "{name}.{field}: {json}");
        }
    }
    let energy = |name: &str| policies[name]["energy_kwh"].as_f64().unwrap();
    assert!(energy("learned") <= 0.75 * energy("round-robin"));
    assert!(
        json["policies"]["learned"]["predictor"]["runtime"]["holdoutMape"]
            .as_f64()
            .unwrap()
            < 0.10
    );
}

#[test]
fn sim_rejects_an_unknown_policy() {
    let examples = workspace_root().join("examples/sim");
    let out = Command::new(bin("ceccm"))
        .arg("sim")
        .arg("--regions")
        .arg(examples.join("regions.yaml"))
        .arg("--trace")
        .arg(examples.join("trace.yaml"))
        .args(["--policy", "fastest"])
        .output()
        .expect("ceccm runs");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown policy \"fastest\""));
}

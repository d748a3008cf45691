//! The cube subcommands as a user runs them: exit status and messages on bad input.

use std::path::Path;
use std::process::Command;

fn astro_fit(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_astro-fit"))
        .args(args)
        .output()
        .expect("run astro-fit")
}

fn shared(rel: &str) -> String {
    astro_fit::synthetic::shared_data_dir()
        .join(rel)
        .display()
        .to_string()
}

#[test]
fn fit_cube_on_a_truncated_file_fails_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(shared("cubes/subcub_mosaic.fits")).unwrap();
    let cut = dir.path().join("cut.fits");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let out_dir = dir.path().join("out");
    let out = astro_fit(&[
        "fit-cube",
        cut.to_str().unwrap(),
        "--templates",
        &shared("templates/emiles"),
        "--out",
        out_dir.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("truncated"), "{stderr}");
    assert!(!Path::new(&out_dir).join("plan.json").exists());
}

#[test]
fn fit_cube_on_a_non_cube_names_what_it_found() {
    let out = astro_fit(&[
        "fit-cube",
        &shared("spectra/NGC4550_SAURON.fits"),
        "--templates",
        &shared("templates/emiles"),
        "--out",
        tempfile::tempdir().unwrap().path().to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("not a cube astro-fit knows"), "{stderr}");
    assert!(stderr.contains("HDUs found: [0:PRIMARY"), "{stderr}");
}

#[test]
fn synth_refuses_a_reference_without_a_resolution_curve() {
    let dir = tempfile::tempdir().unwrap();
    let out = astro_fit(&[
        "synth",
        "--out",
        dir.path().join("x-LOGCUBE.fits").to_str().unwrap(),
        "--templates",
        &shared("templates/emiles"),
        "--reference",
        &shared("cubes/minicube.fits"),
    ]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("resolution reference"), "{stderr}");
}

/// The science check on the whole seed-7 cube, as a user runs it: every spaxel fitted
/// with the whole library from its correlated start, maps against the truth within the
/// fitting core's bounds. The cube carries a degree-3 multiplicative distortion and no gas,
/// hence `--mdegree 3 --emission-mask-kms 0`.
#[test]
fn seed7_cube_maps_meet_the_fitting_core_bounds() {
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("out");
    let out = astro_fit(&[
        "fit-cube",
        &shared("cubes/synthetic-manga-seed7-LOGCUBE.fits.gz"),
        "--templates",
        &shared("templates/emiles"),
        "--mdegree",
        "3",
        "--emission-mask-kms",
        "0",
        "--out",
        out_dir.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out_dir.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["failed_bins"], 0, "{summary}");
    let evaluations = summary["evaluations_per_fit"].as_f64().unwrap();
    assert!((2.0..20.0).contains(&evaluations), "{summary}");

    let png = dir.path().join("residuals.png");
    let out = astro_fit(&[
        "compare-truth",
        out_dir.join("maps.fits").to_str().unwrap(),
        &shared("cubes/synthetic-manga-seed7-truth.csv"),
        "--png",
        png.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(png.exists());
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["compared"], 652, "{report}");
    let num = |bin: &serde_json::Value, key: &str| bin[key].as_f64().unwrap();
    let spread_ok = |bin: &serde_json::Value| {
        ["v_pull_std", "sigma_pull_std"]
            .iter()
            .all(|k| (0.85..=1.2).contains(&num(bin, k)))
    };
    // The fitting core's bounds (tests/it/fit_core.rs), per S/N bin 5-10, 10-20, 20-40, 40+.
    let v_rms_max = [10.0, 6.0, 4.5, 4.0];
    let sigma_rms_max = [24.0, 15.0, 9.0, 9.0];
    let bins = report["by_sn"].as_array().unwrap();
    assert_eq!(bins.len(), 4);
    for (bin, (v_max, s_max)) in bins.iter().zip(v_rms_max.iter().zip(&sigma_rms_max)) {
        assert!(num(bin, "v_rms") < *v_max, "{bin}");
        assert!(num(bin, "sigma_rms") < *s_max, "{bin}");
        assert!(num(bin, "v_bias").abs() < 0.5 * v_max, "{bin}");
        assert!(num(bin, "sigma_bias").abs() < 0.5 * s_max, "{bin}");
        // 8 spaxels above S/N 40 are too few for a spread; they count in S/N >= 20 below.
        if num(bin, "count") >= 20.0 {
            assert!(spread_ok(bin), "errors do not match the scatter: {bin}");
        }
    }
    assert!(spread_ok(&report["above_sn_20"]), "{report}");
}

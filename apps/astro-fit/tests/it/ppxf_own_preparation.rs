//! astro-fit against pPXF 9.5.2 with pPXF's *own* preparation (its documented SDSS kinematics
//! set-up: `sps_util.sps_lib`, `varsmooth`, `log_rebin`, `determine_goodpixels`; moments 4,
//! additive degree 20) on every real SDSS and MaNGA spectrum of the shared data (issue 17).
//! `scripts/ppxf_own_preparation.py` runs pPXF; this test runs astro-fit with the same settings
//! (read from the script's output) and compares per spectrum: V within 2 km/s, sigma within 1%,
//! h3 and h4 within 0.01, and astro-fit's chi2/DOF no more than 1% above pPXF's.
//!
//! pPXF is a reference tool CI installs (`pip install ppxf==9.5.2 astropy` in `.ci/run`):
//! without it the test fails and says so rather than passing unchecked.

use std::path::Path;
use std::process::Command;

use crate::ppxf_support::{Cli, number, repo_root};
use astro_fit::FitError;
use astro_fit::fit_spectrum_cmd::{FitReport, fit_file};
use astro_fit::synthetic::shared_data_dir;
use clap::Parser;
use serde_json::Value;

const PPXF_VERSION: &str = "9.5.2";

/// Spectra on which the two fitters stop at different points of an almost flat chi2 surface:
/// pPXF fitting astro-fit's own prepared arrays (`--save-inputs`) reproduces the same
/// difference, so it is not the preparation (BENCHMARKS.md, "Issue 17"). For these the test
/// still requires astro-fit's chi2 to be no worse than pPXF's by 1% and prints the kinematics.
const FLAT_CHI2_SURFACE: [(&str, &str); 4] = [
    (
        "NGC3073_SDSS_DR18.fits",
        "sigma ~19 km/s, a quarter of a pixel and below the instrumental dispersion",
    ),
    (
        "MaNGA_multicomp_test_spectra.fits.gz#2",
        "sigma ~50 km/s < velscale: sigma and h4 trade off",
    ),
    (
        "MaNGA_test_spectra.fits.gz#6",
        "two minima (V -36 and -70 km/s) 0.004% apart in chi2; astro-fit finds the deeper",
    ),
    (
        "MaNGA_test_spectra.fits.gz#7",
        "sigma ~30 km/s < velscale: sigma and h4 trade off",
    ),
];

/// pPXF's results, from the reference script; panics with instructions when pPXF is missing.
fn ppxf_results(data: &Path) -> Value {
    let check = Command::new("python3")
        .args(["-c", "import ppxf, astropy; print(ppxf.__version__)"])
        .output();
    let version = match &check {
        Ok(out) if out.status.success() => String::from_utf8_lossy(&out.stdout).trim().to_string(),
        Ok(out) => panic!(
            "python3 cannot import ppxf and astropy ({}): run `pip install ppxf=={PPXF_VERSION} astropy`",
            String::from_utf8_lossy(&out.stderr).trim()
        ),
        Err(e) => panic!(
            "python3 not found ({e}): install it and `pip install ppxf=={PPXF_VERSION} astropy`"
        ),
    };
    assert_eq!(
        version, PPXF_VERSION,
        "the reference is pPXF {PPXF_VERSION}: run `pip install ppxf=={PPXF_VERSION}`"
    );
    let script = repo_root().join("scripts/ppxf_own_preparation.py");
    let out = Command::new("python3")
        .arg(&script)
        .arg("--data")
        .arg(data)
        .output()
        .expect("run python3");
    assert!(
        out.status.success(),
        "{} failed: {}",
        script.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON from the reference script")
}

/// astro-fit on one spectrum with the settings pPXF ran with.
fn astro_fit(data: &Path, settings: &Value, result: &Value) -> anyhow::Result<FitReport> {
    let selection = result["args"].as_array().expect("args in the result");
    let lam_fit = settings["lam_fit"].as_array().expect("lam_fit");
    let start = settings["start"].as_array().expect("start");
    assert_eq!(start[0].as_f64(), Some(0.0), "astro-fit starts at V = 0");
    let mut argv: Vec<String> = vec!["fit-spectrum".into()];
    argv.extend(selection.iter().map(|a| a.as_str().unwrap().to_string()));
    argv.extend([
        "--templates".into(),
        data.join("templates/emiles").display().to_string(),
        "--moments".into(),
        settings["moments"].to_string(),
        "--degree".into(),
        settings["degree"].to_string(),
        "--lam-range".into(),
        lam_fit[0].to_string(),
        lam_fit[1].to_string(),
        "--sigma-start".into(),
        start[1].to_string(),
        "--emission-mask-kms".into(),
        settings["emission_mask_kms"].to_string(),
        // pPXF's own preparation broadens with varsmooth: compare like with like.
        "--template-broadening".into(),
        "ppxf".into(),
    ]);
    fit_file(&Cli::try_parse_from(argv)?.args)
}

#[test]
fn agrees_with_ppxf_own_preparation_on_real_spectra() {
    let data = shared_data_dir();
    let reference = ppxf_results(&data);
    let settings = &reference["settings"];
    let results = reference["results"].as_array().expect("results");
    let mut failures = Vec::new();
    let mut compared = 0;
    for r in results {
        let name = r["name"].as_str().expect("name");
        let got = astro_fit(&data, settings, r);
        if r.get("error").is_some() {
            // pPXF cannot fit it either (e.g. MaNGA spectrum 5, fully masked).
            match got {
                Err(e) if matches!(e.downcast_ref::<FitError>(), Some(FitError::NoGoodPixels)) => {}
                other => failures.push(format!(
                    "{name}: pPXF has no good pixel, astro-fit should say so; got {other:?}"
                )),
            }
            continue;
        }
        let got = match got {
            Ok(got) => got,
            Err(e) => {
                failures.push(format!("{name}: astro-fit failed: {e:#}"));
                continue;
            }
        };
        compared += 1;
        let (v, sigma, h3, h4, chi2) = (
            number(r, "v"),
            number(r, "sigma"),
            number(r, "h3"),
            number(r, "h4"),
            number(r, "chi2"),
        );
        let ppxf_n_good = number(r, "n_good") as usize;
        let line = format!(
            "{name}: astro-fit V {:.2} sigma {:.2} h3 {:.4} h4 {:.4} chi2 {:.4} ({} px); \
             pPXF V {v:.2} sigma {sigma:.2} h3 {h3:.4} h4 {h4:.4} chi2 {chi2:.4} ({ppxf_n_good} px)",
            got.v, got.sigma, got.h[0], got.h[1], got.chi2, got.n_good
        );
        eprintln!("{line}");
        let mut problems = Vec::new();
        // astro-fit masks the lines at their exact vacuum wavelengths, pPXF's example after one
        // median air factor: a mask edge may move by a pixel.
        if got.n_good.abs_diff(ppxf_n_good) > 3 {
            problems.push("fits more than 3 pixels more or fewer than pPXF");
        }
        if got.chi2 > chi2 * 1.01 {
            problems.push("chi2 more than 1% above pPXF's");
        }
        let flat = FLAT_CHI2_SURFACE.iter().find(|(n, _)| *n == name);
        let kinematics_agree = (got.v - v).abs() < 2.0
            && (got.sigma / sigma - 1.0).abs() < 0.01
            && (got.h[0] - h3).abs() < 0.01
            && (got.h[1] - h4).abs() < 0.01;
        match flat {
            Some((_, why)) if !kinematics_agree => eprintln!("  kinematics differ: {why}"),
            _ if !kinematics_agree => problems.push("V, sigma, h3 or h4 outside 2 km/s, 1%, 0.01"),
            _ => {}
        }
        if !problems.is_empty() {
            failures.push(format!("{line}: {}", problems.join("; ")));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
    assert!(compared >= 13, "only {compared} spectra compared");
}

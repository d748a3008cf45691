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

/// The issue's science check on the whole seed-7 cube, as a user runs it: every spaxel fitted
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
        "-o",
        "json",
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

fn sample_cube() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../examples/data/sample-LOGCUBE.fits.gz")
        .display()
        .to_string()
}

/// A user's first `fit-cube`: a short summary and the files written, not 90 lines of JSON;
/// `-o json` prints the JSON summary alone on standard output. The old flag spellings
/// (`--z`, `--line-mask`) still work.
#[test]
fn fit_cube_says_what_it_fitted_and_which_files_it_wrote() {
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("text");
    let out = astro_fit(&[
        "fit-cube",
        &sample_cube(),
        "--templates",
        &shared("templates/emiles"),
        "--out",
        out_dir.to_str().unwrap(),
        "--threads",
        "2",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.lines().count() < 20, "{stdout}");
    for text in [
        "fitted sample-LOGCUBE.fits.gz",
        "136 fitted, 0 failed",
        "spectra/s",
        "median",
        "wall time",
        "wrote:",
        "maps.fits (",
        "model.fits (",
        "maps.png (",
        "summary.json (",
        "plan.json (",
        "chunks/ (",
    ] {
        assert!(stdout.contains(text), "{text:?} missing from:\n{stdout}");
    }
    assert!(
        stdout.contains(&out_dir.join("maps.fits").display().to_string()),
        "{stdout}"
    );

    let json_dir = dir.path().join("json");
    let out = astro_fit(&[
        "fit-cube",
        &sample_cube(),
        "--templates",
        &shared("templates/emiles"),
        "--out",
        json_dir.to_str().unwrap(),
        "--threads",
        "2",
        "--z",
        "0.018",
        "--line-mask",
        "600",
        "-o",
        "json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["bins"], 136, "{summary}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("maps.fits ("), "{stderr}");
    // The same maps as with the new spellings; the header says the redshift was given.
    let mut f = fitsio::FitsFile::open(json_dir.join("maps.fits")).unwrap();
    let primary = f.primary_hdu().unwrap();
    let source: String = primary.read_key(&mut f, "ZSOURCE").unwrap();
    let mask: f64 = primary.read_key(&mut f, "ELMASK").unwrap();
    assert_eq!((source.as_str(), mask), ("--redshift", 600.0));
    let a: Vec<f32> = f.hdu("STELLAR_VEL").unwrap().read_image(&mut f).unwrap();
    let mut g = fitsio::FitsFile::open(out_dir.join("maps.fits")).unwrap();
    let b: Vec<f32> = g.hdu("STELLAR_VEL").unwrap().read_image(&mut g).unwrap();
    // To rounding: a worker's scratch history may change the last bits.
    assert!(
        a.iter().zip(&b).all(|(x, y)| (x - y).abs() <= 1e-3),
        "{a:?} {b:?}"
    );
    assert!(f.hdu("STELLAR_H3").is_err(), "h3 mapped in a 2-moment fit");
}

/// A MaNGA user opens the MAPS with astropy: DAP extension names, sky coordinates on the
/// maps, provenance in the primary header. Skipped (saying so) without astropy.
#[test]
fn a_manga_user_reads_the_maps_with_astropy() {
    if !crate::have("python3", &["-c", "import astropy"]) {
        println!("skipped: python3 with astropy is absent, MAPS not checked with astropy");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cube = dir.path().join("wcs-LOGCUBE.fits");
    let out = astro_fit(&[
        "synth",
        "--out",
        cube.to_str().unwrap(),
        "--templates",
        &shared("templates/emiles"),
        "--reference",
        &shared("cubes/synthetic-manga-seed7-LOGCUBE.fits.gz"),
        "--nx",
        "5",
        "--ny",
        "4",
        "--footprint",
        "square",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out_dir = dir.path().join("fit");
    let out = astro_fit(&[
        "fit-cube",
        cube.to_str().unwrap(),
        "--templates",
        &shared("templates/emiles"),
        "--out",
        out_dir.to_str().unwrap(),
        "--moments",
        "4",
        "--threads",
        "2",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let script = r#"
import sys, warnings
from astropy.io import fits
from astropy.wcs import WCS
maps, cube = sys.argv[1], sys.argv[2]
with fits.open(maps) as h:
    h.verify("exception")
    names = [x.name for x in h[1:]]
    assert names[:5] == ["BINID", "BIN_SNR", "STELLAR_VEL", "STELLAR_VEL_IVAR", "STELLAR_VEL_MASK"], names
    assert "STELLAR_H3" in names and "STELLAR_H4_IVAR" in names, names
    assert "BIN_SNR_IVAR" not in names and "STELLAR_CHI2_IVAR" not in names, names
    assert not any("AGE" in n for n in names), names
    p = h[0].header
    assert p["INFILE"] == "wcs-LOGCUBE.fits" and p["TPLLIB"] == "emiles", p
    assert p["MOMENTS"] == 4 and p["PLATEIFU"] == "99999-0", p
    assert p["CREATOR"].startswith("astro-fit "), p
    ref = WCS(fits.getheader(cube, "FLUX")).celestial
    for x in h[1:]:
        w = WCS(x.header)
        assert w.has_celestial, x.name
        a, b = w.pixel_to_world(2, 3), ref.pixel_to_world(2, 3)
        assert a.separation(b).arcsec < 1e-6, (x.name, a, b)
    print(names)
"#;
    let run = std::process::Command::new("python3")
        .args(["-c", script])
        .arg(out_dir.join("maps.fits"))
        .arg(&cube)
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}{}",
        String::from_utf8_lossy(&run.stdout),
        String::from_utf8_lossy(&run.stderr)
    );
}

/// Gas on a synthetic cube with known truth (issue 17): `synth --gas` emits Balmer and
/// forbidden lines with their own kinematics, `fit-cube --gas` maps them. Per S/N bin with at
/// least 20 spaxels, the fluxes of Halpha, Hbeta, [OIII]5007 and [NII]6583 and the V and sigma
/// of the two gas components against the truth: the pulls' standard deviation in 0.8-1.25
/// (errors as large as the scatter), their mean within 0.3 (no bias beyond a third of an
/// error); RMS printed. Hbeta's flux is the exception, allowed a pull spread up to 1.5: it sits
/// in the stars' deepest Balmer absorption, and where the continuum is bright (S/N 20-40) which
/// templates the non-negative solution keeps moves its flux by more than the covariance of
/// the kept ones says (measured: pull std 1.38, mean +0.28, BENCHMARKS.md "Issue 17").
#[test]
fn synthetic_gas_cube_maps_match_their_truth() {
    let dir = tempfile::tempdir().unwrap();
    let cube = dir.path().join("gas-LOGCUBE.fits");
    let out = astro_fit(&[
        "synth",
        "--out",
        cube.to_str().unwrap(),
        "--templates",
        &shared("templates/emiles"),
        "--reference",
        &shared("cubes/synthetic-manga-seed7-LOGCUBE.fits.gz"),
        "--nx",
        "16",
        "--ny",
        "16",
        "--footprint",
        "square",
        "--seed",
        "17",
        "--gas",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let fit_dir = dir.path().join("fit");
    let out = astro_fit(&[
        "fit-cube",
        cube.to_str().unwrap(),
        "--templates",
        &shared("templates/emiles"),
        "--out",
        fit_dir.to_str().unwrap(),
        "--gas",
        "--threads",
        "2",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(fit_dir.join("emission.png").is_file());

    // The truth table: header names the columns, one row per spaxel.
    let text = std::fs::read_to_string(dir.path().join("gas-truth-gas.csv")).unwrap();
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    let rows: Vec<Vec<f64>> = lines
        .map(|l| l.split(',').map(|v| v.parse().unwrap()).collect())
        .collect();
    let col = |name: &str| header.iter().position(|h| *h == name).unwrap();

    let mut f = fitsio::FitsFile::open(fit_dir.join("maps.fits")).unwrap();
    let hdu = f.hdu("EMLINE_GFLUX").unwrap();
    let mut channels = Vec::new();
    for k in 1.. {
        match hdu.read_key::<String>(&mut f, &format!("C{k}")) {
            Ok(name) => channels.push(name),
            Err(_) => break,
        }
    }
    let (nx, ny) = (16, 16);
    let mut read = |name: &str| -> Vec<f64> {
        let hdu = f.hdu(name).unwrap();
        hdu.read_image::<Vec<f64>>(&mut f).unwrap()
    };
    let planes: Vec<(Vec<f64>, Vec<f64>, Vec<f64>)> =
        ["EMLINE_GFLUX", "EMLINE_GVEL", "EMLINE_GSIGMA"]
            .iter()
            .map(|q| {
                (
                    read(q),
                    read(&format!("{q}_IVAR")),
                    read(&format!("{q}_MASK")),
                )
            })
            .collect();
    let checks: [(&str, usize, &str); 8] = [
        ("Ha-6564", 0, "Ha-6564"),
        ("Hb-4862", 0, "Hb-4862"),
        ("OIII-5008", 0, "OIII-5008"),
        ("NII-6585", 0, "NII-6585"),
        ("Ha-6564", 1, "V_balmer"),
        ("Ha-6564", 2, "sigma_balmer"),
        ("OIII-5008", 1, "V_forbidden"),
        ("OIII-5008", 2, "sigma_forbidden"),
    ];
    let bins = [
        (5.0, 10.0),
        (10.0, 20.0),
        (20.0, 40.0),
        (40.0, f64::INFINITY),
    ];
    let mut failures = Vec::new();
    let mut checked = 0;
    for (channel, q, truth_col) in checks {
        let c = channels
            .iter()
            .position(|n| n == channel)
            .unwrap_or_else(|| panic!("{channel} not in {channels:?}"));
        let (value, ivar, mask) = &planes[q];
        for (lo, hi) in bins {
            let mut pulls = Vec::new();
            let mut sq = 0.0;
            for r in &rows {
                let sn = r[col("SN")];
                if !(lo..hi).contains(&sn) {
                    continue;
                }
                let k = c * nx * ny + r[col("y")] as usize * nx + r[col("x")] as usize;
                if mask[k] != 0.0 || ivar[k] <= 0.0 {
                    continue;
                }
                let d = value[k] - r[col(truth_col)];
                sq += d * d;
                pulls.push(d * ivar[k].sqrt());
            }
            let n = pulls.len();
            if n < 20 {
                continue;
            }
            let mean = pulls.iter().sum::<f64>() / n as f64;
            let std =
                (pulls.iter().map(|p| (p - mean).powi(2)).sum::<f64>() / (n - 1) as f64).sqrt();
            let rms = (sq / n as f64).sqrt();
            eprintln!(
                "{channel:<9} {:<13} S/N {lo}-{hi}: n {n}, rms {rms:.4}, pull mean {mean:+.2} std {std:.2}",
                ["flux", "V", "sigma"][q]
            );
            checked += 1;
            let widest = if channel == "Hb-4862" && q == 0 {
                1.5
            } else {
                1.25
            };
            if !(0.8..=widest).contains(&std) || mean.abs() > 0.3 {
                failures.push(format!(
                    "{channel} {truth_col} S/N {lo}-{hi}: pull mean {mean:.2} std {std:.2} (n {n})"
                ));
            }
        }
    }
    assert!(
        checked >= 16,
        "only {checked} (quantity, S/N bin) pairs with 20 spaxels"
    );
    assert!(failures.is_empty(), "{failures:#?}");

    // `compare-truth` finds the gas truth beside the truth table and reports the same figures.
    let out = astro_fit(&[
        "compare-truth",
        fit_dir.join("maps.fits").to_str().unwrap(),
        dir.path().join("gas-truth.csv").to_str().unwrap(),
        "--png",
        dir.path().join("residuals.png").to_str().unwrap(),
        "-o",
        "json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let gas = report["gas"].as_array().expect("gas in the report");
    let halpha = gas
        .iter()
        .find(|g| g["channel"] == "Ha-6564" && g["quantity"] == "flux" && g["sn_min"] == 10.0)
        .expect("Halpha flux at S/N 10-20");
    let std = halpha["pull_std"].as_f64().unwrap();
    assert!((0.8..=1.25).contains(&std), "{halpha}");
}

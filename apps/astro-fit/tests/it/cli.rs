//! The `astro-fit fit-spectrum` command, run as a real process.

use std::process::Command;

use astro_fit::synthetic::shared_data_dir;

fn astro_fit() -> Command {
    Command::new(env!("CARGO_BIN_EXE_astro-fit"))
}

#[test]
fn fit_spectrum_prints_json_and_draws_a_plot() {
    let data = shared_data_dir();
    let dir = tempfile::tempdir().unwrap();
    let png = dir.path().join("fit.png");
    let out = astro_fit()
        .arg("fit-spectrum")
        .arg(data.join("spectra/NGC4636_SDSS_DR12.fits"))
        .arg("--templates")
        .arg(data.join("templates/emiles"))
        .args(["--lam-range", "3600", "8900", "--emission-mask-kms", "800"])
        .args(["-o", "json", "--plot"])
        .arg(&png)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    // pPXF gives V = 7.2, sigma = 225.3 km/s on this spectrum with these settings.
    assert!((doc["v"].as_f64().unwrap() - 7.2).abs() < 2.0, "{doc}");
    assert!(
        (doc["sigma"].as_f64().unwrap() / 225.3 - 1.0).abs() < 0.03,
        "{doc}"
    );
    assert!(
        doc["populations"]["light_log_age"].as_f64().unwrap() > 9.0,
        "{doc}"
    );
    let bytes = std::fs::read(&png).unwrap();
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
    assert!(bytes.len() > 10_000);
    // Standard output is the JSON alone; what was written is said on standard error.
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("wrote {} (", png.display())),
        "{stderr}"
    );
}

/// One vocabulary across subcommands: `--redshift`, `--emission-mask-kms`, `-o text|json`;
/// the old spellings (`--z`, `--line-mask`, `-o table`) still work, hidden.
#[test]
fn fit_spectrum_speaks_fit_cubes_flags_and_says_what_it_wrote() {
    let data = shared_data_dir();
    let dir = tempfile::tempdir().unwrap();
    let run = |flags: &[&str], png: &std::path::Path| {
        let out = astro_fit()
            .arg("fit-spectrum")
            .arg(data.join("spectra/NGC4550_SAURON.fits"))
            .arg("--templates")
            .arg(data.join("templates/emiles"))
            .args(["--fwhm", "4.2"])
            .args(flags)
            .arg("--plot")
            .arg(png)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{flags:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let new_png = dir.path().join("new.png");
    let new = run(
        &["--redshift", "0.0015", "--emission-mask-kms", "800"],
        &new_png,
    );
    assert!(new.contains("chi2/DOF"), "{new}");
    assert!(
        new.contains(&format!("wrote {} (", new_png.display())),
        "{new}"
    );
    let old_png = dir.path().join("old.png");
    let old = run(
        &["--z", "0.0015", "--line-mask", "800", "-o", "table"],
        &old_png,
    );
    let fit_lines = |t: &str| -> Vec<String> {
        t.lines()
            .filter(|l| !l.starts_with("wrote"))
            .map(String::from)
            .collect()
    };
    assert_eq!(fit_lines(&new), fit_lines(&old));
    // The default emission mask is fit-cube's (600 km/s), not 800.
    let help = astro_fit()
        .args(["fit-spectrum", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8(help.stdout).unwrap();
    assert!(help.contains("--emission-mask-kms"), "{help}");
    assert!(help.contains("[default: 600]"), "{help}");
    assert!(
        !help.contains("--line-mask") && !help.contains("--z "),
        "{help}"
    );
}

#[test]
fn fit_spectrum_table_output_names_the_kinematics() {
    let data = shared_data_dir();
    let out = astro_fit()
        .arg("fit-spectrum")
        .arg(data.join("spectra/MaNGA_test_spectra.fits.gz"))
        .args([
            "--row",
            "1",
            "--moments",
            "4",
            "--lam-range",
            "3800",
            "7000",
            "--templates",
        ])
        .arg(data.join("templates/miles_hc"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    for key in ["V ", "sigma", "h3", "h4", "chi2/DOF"] {
        assert!(text.contains(key), "{key} missing from:\n{text}");
    }
}

#[test]
fn fit_spectrum_fails_clearly_on_a_fully_masked_spectrum_and_bad_options() {
    let data = shared_data_dir();
    let out = astro_fit()
        .arg("fit-spectrum")
        .arg(data.join("spectra/MaNGA_test_spectra.fits.gz"))
        .args(["--row", "5", "--templates"])
        .arg(data.join("templates/emiles"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no good pixels"));

    let out = astro_fit()
        .arg("fit-spectrum")
        .arg(data.join("spectra/NGC4636_SDSS_DR12.fits"))
        .args(["--moments", "3", "--templates"])
        .arg(data.join("templates/emiles"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("moments must be 2, 4 or 6"));

    let out = astro_fit()
        .arg("fit-spectrum")
        .arg(data.join("spectra/does-not-exist.fits"))
        .arg("--templates")
        .arg(data.join("templates/emiles"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("does-not-exist.fits"));
}

/// `--gas` on bad requests: a line outside the fitted range, an unknown line, the compressed
/// basis, gas options without `--gas`: each a clear message, no fit.
#[test]
fn fit_spectrum_gas_refuses_lines_outside_the_range_and_unsupported_settings() {
    let data = shared_data_dir();
    let run = |extra: &[&str]| {
        let out = astro_fit()
            .arg("fit-spectrum")
            .arg(data.join("spectra/NGC3522_SDSS_DR18.fits"))
            .arg("--templates")
            .arg(data.join("templates/emiles"))
            .args(extra)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{extra:?} succeeded");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let err = run(&[
        "--gas",
        "--lam-range",
        "4000",
        "6000",
        "--gas-lines",
        "Halpha",
    ]);
    assert!(
        err.contains("Halpha") && err.contains("outside the fitted range"),
        "{err}"
    );
    let err = run(&["--gas", "--gas-lines", "Hfoo"]);
    assert!(err.contains("unknown emission line \"Hfoo\""), "{err}");
    let err = run(&["--gas", "--compress", "0.01"]);
    assert!(err.contains("exact template basis"), "{err}");
    let err = run(&["--gas-tied"]);
    assert!(err.contains("--gas"), "{err}");
}

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

//! What the comparisons with pPXF share: the fit-spectrum command line, the repository's root,
//! the check that pip's ppxf 9.5.2 is there, and reading a number from JSON.

use std::path::{Path, PathBuf};
use std::process::Command;

use astro_fit::fit_spectrum_cmd::FitSpectrumArgs;
use clap::Parser;
use serde_json::Value;

/// `astro-fit fit-spectrum`'s arguments, parsed as its command line parses them.
#[derive(Parser)]
pub struct Cli {
    #[command(flatten)]
    pub args: FitSpectrumArgs,
}

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Fails (never skips) without pip's ppxf 9.5.2 and astropy: the comparison is the point.
pub fn require_ppxf() {
    let out = Command::new("python3")
        .args(["-c", "import ppxf, astropy; print(ppxf.__version__)"])
        .output()
        .expect("python3 not found: install it and `pip install ppxf==9.5.2 astropy`");
    assert!(
        out.status.success(),
        "python3 cannot import ppxf and astropy ({}): run `pip install ppxf==9.5.2 astropy`",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "9.5.2",
        "the reference is pPXF 9.5.2"
    );
}

pub fn number(v: &Value, key: &str) -> f64 {
    v[key]
        .as_f64()
        .unwrap_or_else(|| panic!("{key} missing in {v}"))
}

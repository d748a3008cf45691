//! Stellar populations with known truth (issue 17, items 3 and 4): regularised weights over the
//! age x [M/H] grid (pPXF's `regul` recipe) and dust attenuation.

use astro_fit::populations::{populations, star_formation_history};
use astro_fit::synthetic::prepare_emiles;
use astro_fit::templates::PreparedTemplates;
use astro_fit::{FitConfig, FitResult, Fitter, Spectrum, Start};
use rand::SeedableRng;
use rand_distr::{Distribution, Normal};

use crate::fit_core::{brightest_spaxel, emiles};

/// A smooth star-formation history over the SSP grid: a Gaussian in log age and [M/H].
fn smooth_history(t: &PreparedTemplates, log_age: f64, mh: f64) -> Vec<f64> {
    t.ssp
        .as_ref()
        .unwrap()
        .iter()
        .map(|p| {
            let a = ((p.age_gyr * 1e9).log10() - log_age) / 0.25;
            let m = (p.metallicity - mh) / 0.35;
            (-0.5 * (a * a + m * m)).exp()
        })
        .collect()
}

/// Sum of the squared second differences of the weights over the age x [M/H] grid (what
/// pPXF's second-order regularisation penalises), relative to the weights' squared norm.
pub fn roughness(t: &PreparedTemplates, w: &[f64]) -> f64 {
    let ssp = t.ssp.as_ref().unwrap();
    let (na, nm) = (t.ages.len(), t.metals.len());
    let mut grid = vec![0.0; na * nm];
    for (j, p) in ssp.iter().enumerate() {
        grid[p.age_index * nm + p.metal_index] = w[j];
    }
    let g = |a: usize, m: usize| grid[a * nm + m];
    let mut sum = 0.0;
    for a in 0..na {
        for m in 0..nm {
            let mut lap = 0.0;
            if a > 0 && a + 1 < na {
                lap += g(a - 1, m) - 2.0 * g(a, m) + g(a + 1, m);
            }
            if m > 0 && m + 1 < nm {
                lap += g(a, m - 1) - 2.0 * g(a, m) + g(a, m + 1);
            }
            sum += lap * lap;
        }
    }
    sum / w.iter().map(|v| v * v).sum::<f64>()
}

/// A noisy spectrum of `weights` on the grid of the synthetic cube's brightest spaxel,
/// attenuated by `a_v` (Calzetti 2000, rest frame), at S/N `sn` per pixel (of the median),
/// with the fitter of `cfg` (no polynomials in the truth).
pub fn synthetic_population_spectrum(
    t: &PreparedTemplates,
    weights: &[f64],
    a_v: f64,
    cfg: &FitConfig,
    sn: f64,
    seed: u64,
) -> (Fitter, Spectrum) {
    let (spec, _) = brightest_spaxel();
    let fitter = Fitter::new(t, spec.grid, cfg.clone()).unwrap();
    let mut model = fitter
        .stellar_model(weights, &Start::new(40.0, 130.0))
        .unwrap();
    for (i, m) in model.iter_mut().enumerate() {
        *m *= astro_fit::dust::attenuation(spec.grid.lam(i), a_v);
    }
    let mut sorted = model.clone();
    sorted.sort_by(f64::total_cmp);
    let median = sorted[sorted.len() / 2];
    model.iter_mut().for_each(|m| *m /= median);
    let noise = 1.0 / sn;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let normal = Normal::new(0.0, noise).unwrap();
    let flux = model.iter().map(|m| m + normal.sample(&mut rng)).collect();
    let spectrum = Spectrum {
        flux,
        noise: vec![noise; model.len()],
        good: spec.spectrum.good.clone(),
    };
    (fitter, spectrum)
}

/// pPXF's recipe (Cappellari 2017 sec. 3.5; its population examples): fit without
/// regularisation, scale the noise so chi2/DOF = 1, then take the largest `regul` whose fit
/// raises chi2 by sqrt(2 N) (N good pixels). Here on a spectrum made from a smooth history at
/// S/N 100: the regularised weights must be far smoother than the unregularised ones, and the
/// light-weighted log age and [M/H] of the regularised solution within 0.1 dex of the truth.
#[test]
fn regul_recipe_raises_chi2_by_sqrt_2n_and_recovers_a_smooth_history() {
    let (spec, _) = brightest_spaxel();
    let t = prepare_emiles(emiles(), &spec, 1).unwrap();
    let truth_w = smooth_history(&t, 9.6, -0.2);
    let truth = populations(&t, &truth_w).unwrap();
    let base = FitConfig {
        degree: -1,
        ..FitConfig::default()
    };
    let (_, mut spectrum) = synthetic_population_spectrum(&t, &truth_w, 0.0, &base, 100.0, 11);
    let fit = |regul: f64, spectrum: &Spectrum| -> FitResult {
        let cfg = FitConfig {
            regul,
            ..base.clone()
        };
        Fitter::new(&t, spec.grid, cfg)
            .unwrap()
            .fit(spectrum, &Start::new(0.0, 150.0))
            .unwrap()
    };
    let plain = fit(0.0, &spectrum);
    // Noise scaled so that the unregularised fit has chi2/DOF = 1.
    let scale = plain.chi2.sqrt();
    spectrum.noise.iter_mut().for_each(|n| *n *= scale);
    let plain = fit(0.0, &spectrum);
    let n_good = plain.good.iter().filter(|g| **g).count() as f64;
    let chi2_total = |r: &FitResult| r.chi2 * r.dof as f64;
    let target = (2.0 * n_good).sqrt();
    // Bisection in log10(regul) for delta chi2 = sqrt(2 N) (delta chi2 grows with regul).
    let (mut lo, mut hi) = (-1.0f64, 5.0f64);
    let mut best = None;
    for _ in 0..12 {
        let mid = 0.5 * (lo + hi);
        let r = fit(10f64.powf(mid), &spectrum);
        let delta = chi2_total(&r) - chi2_total(&plain);
        eprintln!(
            "regul {:.1}: delta chi2 {delta:.1} (target {target:.1})",
            10f64.powf(mid)
        );
        if delta > target {
            hi = mid;
        } else {
            lo = mid;
        }
        best = Some((10f64.powf(mid), delta, r));
        if (delta - target).abs() < 0.05 * target {
            break;
        }
    }
    let (regul, delta, smooth) = best.unwrap();
    assert!(
        (delta - target).abs() < 0.05 * target,
        "regul {regul}: delta chi2 {delta} vs sqrt(2N) {target}"
    );
    let (r_plain, r_smooth) = (
        roughness(&t, &plain.weights),
        roughness(&t, &smooth.weights),
    );
    let pops = populations(&t, &smooth.weights).unwrap();
    let pops_plain = populations(&t, &plain.weights).unwrap();
    eprintln!(
        "regul {regul:.1}, N {n_good}: roughness {r_plain:.3} -> {r_smooth:.4}; \
         light log age truth {:.3}, regul {:.3}, plain {:.3}; [M/H] truth {:.3}, regul {:.3}, plain {:.3}",
        truth.light_log_age,
        pops.light_log_age,
        pops_plain.light_log_age,
        truth.light_metallicity,
        pops.light_metallicity,
        pops_plain.light_metallicity
    );
    assert!(r_smooth < 0.1 * r_plain, "{r_smooth} vs {r_plain}");
    assert!(
        (pops.light_log_age - truth.light_log_age).abs() < 0.1,
        "{pops:?} vs {truth:?}"
    );
    assert!(
        (pops.light_metallicity - truth.light_metallicity).abs() < 0.1,
        "{pops:?} vs {truth:?}"
    );
    // The history table holds every SSP with weight; its fractions sum to one.
    let sfh = star_formation_history(&t, &smooth.weights).unwrap();
    assert_eq!(
        sfh.len(),
        smooth.weights.iter().filter(|w| **w > 0.0).count()
    );
    let light: f64 = sfh.iter().map(|e| e.light).sum();
    let mass: f64 = sfh.iter().map(|e| e.mass).sum();
    assert!((light - 1.0).abs() < 1e-9 && (mass - 1.0).abs() < 1e-9);
    let lw_age: f64 = sfh
        .iter()
        .map(|e| e.light * (e.age_gyr * 1e9).log10())
        .sum();
    assert!((lw_age - pops.light_log_age).abs() < 1e-9);
}

fn sample_cube() -> String {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../examples/data/sample-LOGCUBE.fits.gz")
        .display()
        .to_string()
}

/// `fit-cube --regul` regularises every bin: the MAPS carry the light-weighted age and [M/H]
/// of the regularised solution, the header its strength, and `sfh.csv` each bin's history,
/// whose light fractions sum to one and average to the map's age and [M/H].
#[test]
fn fit_cube_regul_maps_ages_and_writes_each_bins_history() {
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("regul");
    let out = crate::astro_fit(&[
        "fit-cube",
        &sample_cube(),
        "--templates",
        astro_fit::synthetic::shared_data_dir()
            .join("templates/emiles")
            .to_str()
            .unwrap(),
        "--out",
        out_dir.to_str().unwrap(),
        "--threads",
        "2",
        "--regul",
        "100",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("sfh.csv ("), "{stdout}");
    let mut f = fitsio::FitsFile::open(out_dir.join("maps.fits")).unwrap();
    let primary = f.primary_hdu().unwrap();
    let regul: f64 = primary.read_key(&mut f, "REGUL").unwrap();
    assert_eq!(regul, 100.0);
    let binid: Vec<i32> = f.hdu("BINID").unwrap().read_image(&mut f).unwrap();
    let age: Vec<f64> = f.hdu("STELLAR_AGE_LW").unwrap().read_image(&mut f).unwrap();
    let mh: Vec<f64> = f.hdu("STELLAR_MH_LW").unwrap().read_image(&mut f).unwrap();
    assert!(f.hdu("STELLAR_AGE_MW").is_ok());

    let text = std::fs::read_to_string(out_dir.join("sfh.csv")).unwrap();
    let mut lines = text.lines();
    assert_eq!(
        lines.next().unwrap(),
        "bin,age_gyr,log_age,metallicity,light_weight,mass_weight"
    );
    // Per bin: sum of light fractions, light-weighted log age and [M/H], SSPs used.
    let mut per_bin: std::collections::BTreeMap<i32, (f64, f64, f64, f64, usize)> =
        Default::default();
    for line in lines {
        let v: Vec<f64> = line.split(',').map(|x| x.parse().unwrap()).collect();
        let e = per_bin.entry(v[0] as i32).or_default();
        e.0 += v[4];
        e.1 += v[4] * v[2];
        e.2 += v[4] * v[3];
        e.3 += v[5];
        e.4 += 1;
    }
    assert_eq!(per_bin.len(), 136);
    for (bin, (light, lw_age, lw_mh, mass, n)) in &per_bin {
        assert!(
            (light - 1.0).abs() < 1e-4,
            "bin {bin}: light sums to {light}"
        );
        assert!((mass - 1.0).abs() < 1e-4, "bin {bin}: mass sums to {mass}");
        // Regularisation spreads the weights over many SSPs.
        assert!(*n > 10, "bin {bin}: {n} SSPs");
        let k = binid.iter().position(|b| b == bin).unwrap();
        assert!(
            (lw_age - age[k]).abs() < 1e-3,
            "bin {bin}: {lw_age} vs {}",
            age[k]
        );
        assert!(
            (lw_mh - mh[k]).abs() < 1e-3,
            "bin {bin}: {lw_mh} vs {}",
            mh[k]
        );
    }
}

/// pPXF's `reddening`: on spectra made from a smooth history attenuated by A_V = 0.5 with the
/// Calzetti (2000) curve (S/N 50 per pixel, 3600-10000 A, 20 noise realisations), the fitted
/// A_V is within 0.05 mag of the truth on average and each fit's formal error describes the
/// scatter (pull standard deviation in 0.7-1.4).
#[test]
fn reddening_recovers_a_known_calzetti_attenuation() {
    let (spec, _) = brightest_spaxel();
    let t = prepare_emiles(emiles(), &spec, 1).unwrap();
    let truth_w = smooth_history(&t, 9.6, -0.2);
    let cfg = FitConfig {
        degree: -1,
        reddening: Some(0.1),
        ..FitConfig::default()
    };
    let truth_av = 0.5;
    let mut estimates = Vec::new();
    let mut pulls = Vec::new();
    for seed in 0..20 {
        let (fitter, spectrum) =
            synthetic_population_spectrum(&t, &truth_w, truth_av, &cfg, 50.0, 100 + seed);
        let r = fitter.fit(&spectrum, &Start::new(0.0, 150.0)).unwrap();
        let (av, err) = (r.reddening.unwrap(), r.reddening_error.unwrap());
        assert!(err > 0.0 && err < 0.1, "A_V {av} +- {err}");
        estimates.push(av);
        pulls.push((av - truth_av) / (err * r.chi2.sqrt()));
    }
    let n = estimates.len() as f64;
    let mean = estimates.iter().sum::<f64>() / n;
    let pull_mean = pulls.iter().sum::<f64>() / n;
    let pull_std = (pulls.iter().map(|p| (p - pull_mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt();
    eprintln!(
        "A_V truth {truth_av}: mean {mean:.4}, pulls mean {pull_mean:.2} std {pull_std:.2}; {estimates:.3?}"
    );
    assert!((mean - truth_av).abs() < 0.05, "mean A_V {mean}");
    assert!((0.7..1.4).contains(&pull_std), "pull std {pull_std}");
}

/// pPXF refuses `reddening` with a multiplicative polynomial (both shape the continuum):
/// so does the fitter, saying why and what to do.
#[test]
fn reddening_with_a_multiplicative_polynomial_is_a_clear_error() {
    let (spec, _) = brightest_spaxel();
    let t = prepare_emiles(emiles(), &spec, 1).unwrap();
    let cfg = FitConfig {
        mdegree: 4,
        reddening: Some(0.2),
        ..FitConfig::default()
    };
    let err = Fitter::new(&t, spec.grid, cfg).unwrap_err();
    assert!(matches!(err, astro_fit::FitError::Config(_)), "{err}");
    let text = err.to_string();
    assert!(
        text.contains("reddening") && text.contains("mdegree"),
        "{text}"
    );
    let bad_start = FitConfig {
        reddening: Some(-1.0),
        ..FitConfig::default()
    };
    assert!(Fitter::new(&t, spec.grid, bad_start).is_err());
}

/// `fit-cube --reddening` maps A_V with its error (STELLAR_AV, _IVAR, _MASK; the start in the
/// header); with --mdegree it stops before fitting, saying why.
#[test]
fn fit_cube_reddening_maps_av_and_refuses_mdegree() {
    let dir = tempfile::tempdir().unwrap();
    let templates = astro_fit::synthetic::shared_data_dir().join("templates/emiles");
    let out_dir = dir.path().join("dust");
    let args = |out: &std::path::Path, extra: &[&str]| -> std::process::Output {
        let mut a = vec![
            "fit-cube".to_string(),
            sample_cube(),
            "--templates".into(),
            templates.display().to_string(),
            "--out".into(),
            out.display().to_string(),
            "--threads".into(),
            "2".into(),
        ];
        a.extend(extra.iter().map(|s| s.to_string()));
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        crate::astro_fit(&a)
    };
    let refused = args(
        &dir.path().join("no"),
        &["--reddening", "0.1", "--mdegree", "3"],
    );
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("reddening cannot be fitted together with a multiplicative polynomial"),
        "{stderr}"
    );
    let out = args(&out_dir, &["--reddening", "0.1"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut f = fitsio::FitsFile::open(out_dir.join("maps.fits")).unwrap();
    let primary = f.primary_hdu().unwrap();
    let start: f64 = primary.read_key(&mut f, "REDDEN").unwrap();
    assert_eq!(start, 0.1);
    let binid: Vec<i32> = f.hdu("BINID").unwrap().read_image(&mut f).unwrap();
    let av: Vec<f64> = f.hdu("STELLAR_AV").unwrap().read_image(&mut f).unwrap();
    let ivar: Vec<f64> = f
        .hdu("STELLAR_AV_IVAR")
        .unwrap()
        .read_image(&mut f)
        .unwrap();
    let mask: Vec<i32> = f
        .hdu("STELLAR_AV_MASK")
        .unwrap()
        .read_image(&mut f)
        .unwrap();
    let mut fitted = 0;
    for k in (0..binid.len()).filter(|&k| binid[k] >= 0) {
        assert_eq!(mask[k], 0, "spaxel {k}");
        assert!((0.0..=10.0).contains(&av[k]), "spaxel {k}: A_V {}", av[k]);
        assert!(
            ivar[k] > 0.0 || av[k] == 0.0,
            "spaxel {k}: ivar {}",
            ivar[k]
        );
        fitted += 1;
    }
    assert_eq!(fitted, 136);
    let mut v: Vec<f64> = (0..binid.len())
        .filter(|&k| binid[k] >= 0)
        .map(|k| av[k])
        .collect();
    v.sort_by(f64::total_cmp);
    let at_zero = v.iter().filter(|a| **a == 0.0).count();
    let errs: Vec<f64> = (0..binid.len())
        .filter(|&k| binid[k] >= 0 && ivar[k] > 0.0)
        .map(|k| 1.0 / ivar[k].sqrt())
        .collect();
    eprintln!(
        "A_V: median {:.3}, 10-90% {:.3}-{:.3}, {at_zero} at 0; median error {:.3}",
        v[v.len() / 2],
        v[v.len() / 10],
        v[9 * v.len() / 10],
        {
            let mut e = errs.clone();
            e.sort_by(f64::total_cmp);
            e[e.len() / 2]
        }
    );
}

/// Item 4's truth for dust and populations: `synth --dust 0.6 --sfh` (A_V falling from 0.6 at
/// the centre, smooth histories older and richer inwards), `fit-cube --reddening 0.1 --regul
/// 30 --degree -1`, and `compare-truth` reports A_V, light-weighted log age and [M/H] against
/// the truth per S/N bin. Bounds per bin with >= 5 spaxels (measured on this cube, BENCHMARKS.md
/// "Issue 17"): A_V RMS 0.10 / 0.06 / 0.04 / 0.04 mag at S/N 5-10 / 10-20 / 20-40 / 40+, bias
/// within 0.03, pull std 0.6-1.3 where >= 20 spaxels; log age RMS < 0.1 dex, bias within 0.06;
/// [M/H] RMS < 0.15 dex at S/N 5-10 and < 0.1 above, bias within 0.06.
#[test]
fn synthetic_dust_and_history_maps_match_their_truth() {
    let dir = tempfile::tempdir().unwrap();
    let cube = synth_dust_history_cube(dir.path());
    let report = fit_and_compare(dir.path(), &cube, &["--regul", "30"]);
    let pops = report["populations"].as_array().unwrap();
    let mut seen = std::collections::BTreeSet::new();
    for b in pops {
        eprintln!("{b}");
        let q = b["quantity"].as_str().unwrap();
        let num = |k: &str| b[k].as_f64().unwrap_or(f64::NAN);
        let (n, bias, rms, sn) = (num("count"), num("bias"), num("rms"), num("sn_min"));
        if n < 5.0 {
            continue;
        }
        seen.insert(q.to_string());
        let low = sn < 10.0;
        let (rms_max, bias_max) = match q {
            "A_V" => (
                match sn as i64 {
                    5 => 0.10,
                    10 => 0.06,
                    _ => 0.04,
                },
                0.03,
            ),
            "light_log_age" => (0.1, 0.06),
            "light_MH" => (if low { 0.15 } else { 0.1 }, 0.06),
            other => panic!("unexpected quantity {other}"),
        };
        assert!(rms < rms_max, "{q} at S/N {sn}: RMS {rms} >= {rms_max}");
        assert!(bias.abs() < bias_max, "{q} at S/N {sn}: bias {bias}");
        if q == "A_V" && n >= 20.0 {
            let s = num("pull_std");
            assert!((0.6..1.3).contains(&s), "A_V at S/N {sn}: pull std {s}");
        }
    }
    assert_eq!(seen.len(), 3, "{pops:?}");
}

/// `fit-cube --bootstrap 10` (wild residual bootstrap, 10 refits per bin) gives the
/// light-weighted log age and [M/H] maps errors (`_IVAR`) that describe their scatter about
/// the truth of the dust/history cube: pull standard deviation in 0.7-1.5 per S/N bin with
/// >= 20 spaxels (10 realisations estimate each error to ~25%), mean pull within 0.6.
#[test]
fn bootstrap_errors_of_age_and_metallicity_describe_their_scatter() {
    let dir = tempfile::tempdir().unwrap();
    let cube = synth_dust_history_cube(dir.path());
    let report = fit_and_compare(dir.path(), &cube, &["--bootstrap", "10"]);
    let pops = report["populations"].as_array().unwrap();
    let mut checked = 0;
    for b in pops {
        eprintln!("{b}");
        let q = b["quantity"].as_str().unwrap();
        let num = |k: &str| b[k].as_f64().unwrap_or(f64::NAN);
        if q == "A_V" || num("count") < 20.0 {
            continue;
        }
        let (m, s) = (num("pull_mean"), num("pull_std"));
        assert!((0.7..1.5).contains(&s), "{q}: pull std {s}");
        assert!(m.abs() < 0.6, "{q}: pull mean {m}");
        checked += 1;
    }
    assert!(checked >= 6, "{pops:?}");
}

/// `synth --dust 0.6 --sfh` on a 16 x 16 square (seed 23) in `dir`; returns the cube's path.
fn synth_dust_history_cube(dir: &std::path::Path) -> std::path::PathBuf {
    synth_cube(dir, "23", &["--dust", "0.6", "--sfh"])
}

/// `synth` of a 16 x 16 square with `seed` and `extra` flags into `dir/dust-LOGCUBE.fits`
/// (truth `dust-truth.csv`, with --gas also `dust-truth-gas.csv`); returns the cube's path.
fn synth_cube(dir: &std::path::Path, seed: &str, extra: &[&str]) -> std::path::PathBuf {
    let shared = astro_fit::synthetic::shared_data_dir();
    let cube = dir.join("dust-LOGCUBE.fits");
    let templates = shared.join("templates/emiles");
    let reference = shared.join("cubes/synthetic-manga-seed7-LOGCUBE.fits.gz");
    let mut args = vec![
        "synth",
        "--out",
        cube.to_str().unwrap(),
        "--templates",
        templates.to_str().unwrap(),
        "--reference",
        reference.to_str().unwrap(),
        "--nx",
        "16",
        "--ny",
        "16",
        "--footprint",
        "square",
        "--seed",
        seed,
    ];
    args.extend_from_slice(extra);
    let out = crate::astro_fit(&args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    cube
}

/// `fit-cube --reddening 0.1 --degree -1` plus `extra` on `cube`, then `compare-truth -o
/// json` against the cube's truth table; returns the JSON report.
fn fit_and_compare(
    dir: &std::path::Path,
    cube: &std::path::Path,
    extra: &[&str],
) -> serde_json::Value {
    let shared = astro_fit::synthetic::shared_data_dir();
    let fit_dir = dir.join("fit");
    let templates = shared.join("templates/emiles");
    let mut args = vec![
        "fit-cube",
        cube.to_str().unwrap(),
        "--templates",
        templates.to_str().unwrap(),
        "--out",
        fit_dir.to_str().unwrap(),
        "--reddening",
        "0.1",
        "--degree",
        "-1",
        "--threads",
        "2",
    ];
    args.extend_from_slice(extra);
    let out = crate::astro_fit(&args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = crate::astro_fit(&[
        "compare-truth",
        fit_dir.join("maps.fits").to_str().unwrap(),
        dir.join("dust-truth.csv").to_str().unwrap(),
        "--png",
        dir.join("cmp.png").to_str().unwrap(),
        "-o",
        "json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// `fit-spectrum --reddening AV0 --bootstrap N -o json` reports A_V with its error and the
/// bootstrap errors of the population averages (SDSS NGC 3522, an early-type galaxy with
/// little dust).
#[test]
fn fit_spectrum_json_reports_reddening_and_population_errors() {
    let shared = astro_fit::synthetic::shared_data_dir();
    let out = crate::astro_fit(&[
        "fit-spectrum",
        shared
            .join("spectra/NGC3522_SDSS_DR18.fits")
            .to_str()
            .unwrap(),
        "--templates",
        shared.join("templates/emiles").to_str().unwrap(),
        "--reddening",
        "0.1",
        "--degree",
        "-1",
        "--bootstrap",
        "5",
        "-o",
        "json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let av = r["reddening"].as_f64().unwrap();
    let err = r["reddening_error"].as_f64().unwrap();
    assert!((0.0..1.0).contains(&av) && err > 0.0 && err < 0.1, "{r}");
    // V, sigma and A_V are the free non-linear parameters.
    assert_eq!(
        r["dof"].as_u64().unwrap(),
        r["n_good"].as_u64().unwrap() - 3,
        "{r}"
    );
    let e = &r["population_errors"];
    assert_eq!(e["realisations"], 5, "{r}");
    for k in ["light_log_age", "light_metallicity"] {
        let v = e[k].as_f64().unwrap();
        assert!(v > 0.0 && v < 0.2, "{k}: {v}");
    }
    // Without the flags the keys are absent.
    let plain = crate::astro_fit(&[
        "fit-spectrum",
        shared
            .join("spectra/NGC3522_SDSS_DR18.fits")
            .to_str()
            .unwrap(),
        "--templates",
        shared.join("templates/emiles").to_str().unwrap(),
        "-o",
        "json",
    ]);
    let p: serde_json::Value = serde_json::from_slice(&plain.stdout).unwrap();
    assert!(p.get("reddening").is_none() && p.get("population_errors").is_none());
}

/// Gas, regularised populations and dust in one fit (pPXF allows all three together): on a
/// cube with gas lines, smooth histories and A_V up to 0.4 (seed 17), `fit-cube --gas --regul
/// 30 --reddening 0.1 --degree -1` keeps the gas maps' pulls in 0.75-1.3 per S/N bin with >= 20
/// spaxels (fluxes of Halpha, Hbeta, [OIII]5007, [NII]6583; V and sigma of both components),
/// A_V within the bounds of the test without gas, log age RMS < 0.1 dex and [M/H] RMS < 0.15 dex.
#[test]
fn gas_regularised_populations_and_dust_fit_together() {
    let dir = tempfile::tempdir().unwrap();
    let cube = synth_cube(dir.path(), "17", &["--gas", "--sfh", "--dust", "0.4"]);
    let report = fit_and_compare(dir.path(), &cube, &["--gas", "--regul", "30"]);
    let mut checked = 0;
    for b in report["gas"].as_array().unwrap() {
        let num = |k: &str| b[k].as_f64().unwrap_or(f64::NAN);
        let channel = b["channel"].as_str().unwrap();
        if num("count") < 20.0
            || !["Ha-6564", "Hb-4862", "OIII-5008", "NII-6585"].contains(&channel)
        {
            continue;
        }
        let s = num("pull_std");
        assert!((0.75..1.3).contains(&s), "{b}");
        assert!(num("pull_mean").abs() < 0.3, "{b}");
        checked += 1;
    }
    assert!(checked >= 20, "{checked} gas checks");
    for b in report["populations"].as_array().unwrap() {
        let num = |k: &str| b[k].as_f64().unwrap_or(f64::NAN);
        if num("count") < 20.0 {
            continue;
        }
        let (sn, rms) = (num("sn_min"), num("rms"));
        let max = match b["quantity"].as_str().unwrap() {
            "A_V" if sn < 10.0 => 0.10,
            "A_V" if sn < 20.0 => 0.06,
            "A_V" => 0.04,
            "light_log_age" => 0.1,
            _ => 0.15,
        };
        assert!(rms < max, "{b}");
    }
}

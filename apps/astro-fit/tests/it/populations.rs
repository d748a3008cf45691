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

/// A noisy spectrum of `weights` on the grid of the synthetic cube's brightest spaxel, at
/// S/N `sn` per pixel, with the fitter of `cfg` (no polynomials in the truth).
pub fn synthetic_population_spectrum(
    t: &PreparedTemplates,
    weights: &[f64],
    cfg: &FitConfig,
    sn: f64,
    seed: u64,
) -> (Fitter, Spectrum) {
    let (spec, _) = brightest_spaxel();
    let fitter = Fitter::new(t, spec.grid, cfg.clone()).unwrap();
    let mut model = fitter
        .stellar_model(weights, &Start::new(40.0, 130.0))
        .unwrap();
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
    let (_, mut spectrum) = synthetic_population_spectrum(&t, &truth_w, &base, 100.0, 11);
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

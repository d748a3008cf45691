//! The fitting core against real data: the synthetic cube's truth, typed errors on bad input.

use std::sync::OnceLock;

use astro_fit::spectrum::{Selection, read_spectrum};
use astro_fit::synthetic::{
    accuracy_by_sn, accuracy_in, load_spaxels, prepare_emiles, read_truth, shared_data_dir,
};
use astro_fit::{FitConfig, FitError, Fitter, LogGrid, Spectrum, Start, TemplateLibrary};

pub fn emiles() -> &'static TemplateLibrary {
    static LIB: OnceLock<TemplateLibrary> = OnceLock::new();
    LIB.get_or_init(|| TemplateLibrary::load(&shared_data_dir().join("templates/emiles")).unwrap())
}

#[test]
fn synthetic_cube_kinematics_match_the_truth_per_sn_bin() {
    let data = shared_data_dir();
    let truth = read_truth(&data.join("cubes/synthetic-manga-seed7-truth.csv")).unwrap();
    assert_eq!(truth.len(), 652);
    // Every second spaxel below S/N 20 keeps the test quick; all of the rarer brighter ones.
    let rows: Vec<_> = truth
        .into_iter()
        .enumerate()
        .filter(|(i, r)| r.sn >= 20.0 || i % 2 == 0)
        .map(|(_, r)| r)
        .collect();
    let spectra = load_spaxels(
        &data.join("cubes/synthetic-manga-seed7-LOGCUBE.fits.gz"),
        &rows,
        (3600.0, 10000.0),
    )
    .unwrap();
    let templates = prepare_emiles(emiles(), &spectra[0], 1).unwrap();
    // The cube carries a smooth multiplicative distortion (Legendre degree 3): model it.
    let cfg = FitConfig {
        mdegree: 3,
        ..FitConfig::default()
    };
    let fitter = Fitter::new(&templates, spectra[0].grid, cfg).unwrap();
    let mut scratch = fitter.scratch();
    let samples: Vec<_> = rows
        .iter()
        .zip(&spectra)
        .map(|(row, spec)| {
            let r = fitter
                .fit_with(&mut scratch, &spec.spectrum, &Start::new(0.0, 150.0))
                .unwrap();
            (row.clone(), r.v, r.errors[0], r.sigma, r.errors[1])
        })
        .collect();
    // pPXF reaches V RMS ~7, 4, 3, 2.5 and sigma RMS ~16, 10, 6, 6 km/s on such cubes.
    let v_rms_max = [10.0, 6.0, 4.5, 4.0];
    let sigma_rms_max = [24.0, 15.0, 9.0, 9.0];
    for (bin, (v_max, s_max)) in accuracy_by_sn(&samples)
        .iter()
        .zip(v_rms_max.iter().zip(&sigma_rms_max))
    {
        eprintln!("{bin:?}");
        assert!(bin.count >= 5, "{bin:?}");
        assert!(bin.v_rms < *v_max, "V RMS too large: {bin:?}");
        assert!(bin.sigma_rms < *s_max, "sigma RMS too large: {bin:?}");
        assert!(bin.v_bias.abs() < 0.5 * v_max, "V bias: {bin:?}");
        assert!(bin.sigma_bias.abs() < 0.5 * s_max, "sigma bias: {bin:?}");
        // The cube has 8 spaxels above S/N 40: too few to measure a spread; they join the
        // 20-40 bin for that check below.
        if bin.count >= 20 {
            check_error_spread(bin);
        }
    }
    check_error_spread(&accuracy_in(&samples, 20.0, f64::INFINITY));
}

/// Starting the search from a few templates and admitting the rest as the full solution wants
/// them ends at the fit with the whole library.
#[test]
fn a_search_started_from_some_templates_ends_at_the_full_library_fit() {
    let data = shared_data_dir();
    let truth = read_truth(&data.join("cubes/synthetic-manga-seed7-truth.csv")).unwrap();
    // A spread of S/N: every 80th spaxel.
    let rows: Vec<_> = truth.into_iter().step_by(80).collect();
    let spectra = load_spaxels(
        &data.join("cubes/synthetic-manga-seed7-LOGCUBE.fits.gz"),
        &rows,
        (3600.0, 7400.0),
    )
    .unwrap();
    let templates = prepare_emiles(emiles(), &spectra[0], 1).unwrap();
    let fitter = Fitter::new(&templates, spectra[0].grid, FitConfig::default()).unwrap();
    let mut scratch = fitter.scratch();
    // Every tenth template: the spectra mix three random ones, so most need others too.
    let first: Vec<usize> = (0..templates.len()).step_by(10).collect();
    let mut admitted_any = false;
    for spec in &spectra {
        let start = Start::new(0.0, 150.0);
        let full = fitter
            .fit_with(&mut scratch, &spec.spectrum, &start)
            .unwrap();
        let grown = fitter
            .fit_from_templates(&mut scratch, &spec.spectrum, &start, Some(&first))
            .unwrap();
        admitted_any |= grown
            .weights
            .iter()
            .enumerate()
            .any(|(j, w)| *w > 0.0 && j % 10 != 0);
        // Each search stops once a step is predicted to lower chi2 by less than 1e-6 chi2,
        // i.e. within sqrt(1e-6 chi2) ~ 0.055 errors (chi2 ~ 3000) of the minimum along the
        // flattest direction; two searches from different template sets agree within that.
        let close = 0.05;
        assert!(
            (grown.v - full.v).abs() < close * full.errors[0],
            "V {} vs {}",
            grown.v,
            full.v
        );
        assert!(
            (grown.sigma - full.sigma).abs() < close * full.errors[1],
            "sigma {} vs {}",
            grown.sigma,
            full.sigma
        );
        assert!(
            (grown.chi2 / full.chi2 - 1.0).abs() < 1e-6,
            "chi2 {} vs {}",
            grown.chi2,
            full.chi2
        );
    }
    assert!(
        admitted_any,
        "no spectrum needed a template outside the first set"
    );
}

/// (fit - truth)/error must scatter like a unit Gaussian: errors that mean what they say.
fn check_error_spread(bin: &astro_fit::synthetic::BinAccuracy) {
    for pull in [bin.v_pull_std, bin.sigma_pull_std] {
        assert!(
            (0.85..=1.2).contains(&pull),
            "errors do not match the scatter: {bin:?}"
        );
    }
}

/// A small fitter on a synthetic grid inside the E-MILES range, for the bad-input tests.
fn small_fitter() -> (Fitter, LogGrid) {
    let velscale = 69.0;
    let grid = LogGrid {
        ln_lam0: 4800f64.ln(),
        velscale,
        npix: 400,
    };
    let lam_range = (grid.lam(0), grid.lam(grid.npix - 1));
    let lib = emiles().clone().select(|i| i % 30 == 0);
    let cfg = astro_fit::PrepareConfig::new(velscale, lam_range, astro_fit::Medium::Air);
    let templates = astro_fit::prepare(&lib, &cfg).unwrap();
    (
        Fitter::new(&templates, grid, FitConfig::default()).unwrap(),
        grid,
    )
}

fn flat_spectrum(npix: usize) -> Spectrum {
    Spectrum {
        flux: vec![1.0; npix],
        noise: vec![0.01; npix],
        good: vec![true; npix],
    }
}

#[test]
fn non_finite_flux_is_a_typed_error() {
    let (fitter, grid) = small_fitter();
    for bad in [f64::NAN, f64::INFINITY] {
        let mut spec = flat_spectrum(grid.npix);
        spec.flux[17] = bad;
        let err = fitter.fit(&spec, &Start::new(0.0, 100.0)).unwrap_err();
        assert!(
            matches!(err, FitError::NonFiniteFlux { pixel: 17 }),
            "{err}"
        );
    }
    // A masked NaN is fine.
    let mut spec = flat_spectrum(grid.npix);
    spec.flux[17] = f64::NAN;
    spec.good[17] = false;
    assert!(fitter.fit(&spec, &Start::new(0.0, 100.0)).is_ok());
}

#[test]
fn non_positive_inverse_variance_is_a_typed_error() {
    for bad in [0.0, -3.0, f64::NAN] {
        let mut ivar = vec![1.0; 50];
        ivar[9] = bad;
        let err = Spectrum::from_ivar(vec![1.0; 50], &ivar, vec![true; 50]).unwrap_err();
        assert!(matches!(err, FitError::BadIvar { pixel: 9, .. }), "{err}");
    }
    let (fitter, grid) = small_fitter();
    let mut spec = flat_spectrum(grid.npix);
    spec.noise[3] = 0.0;
    let err = fitter.fit(&spec, &Start::new(0.0, 100.0)).unwrap_err();
    assert!(matches!(err, FitError::BadNoise { pixel: 3, .. }), "{err}");
}

#[test]
fn wavelengths_the_templates_do_not_cover_are_a_typed_error() {
    let lib = emiles().clone().select(|i| i < 2);
    let cfg = astro_fit::PrepareConfig::new(69.0, (1000.0, 5000.0), astro_fit::Medium::Air);
    let err = astro_fit::prepare(&lib, &cfg).unwrap_err();
    assert!(
        matches!(err, FitError::WavelengthNotCovered { .. }),
        "{err}"
    );
    assert!(err.to_string().contains("templates cover"), "{err}");
    // Templates prepared for one range, galaxy grid elsewhere.
    let cfg = astro_fit::PrepareConfig::new(69.0, (5000.0, 6000.0), astro_fit::Medium::Air);
    let templates = astro_fit::prepare(&lib, &cfg).unwrap();
    let grid = LogGrid {
        ln_lam0: 6500f64.ln(),
        velscale: 69.0,
        npix: 300,
    };
    let err = Fitter::new(&templates, grid, FitConfig::default()).unwrap_err();
    assert!(
        matches!(err, FitError::WavelengthNotCovered { .. }),
        "{err}"
    );
}

#[test]
fn fewer_good_pixels_than_parameters_is_a_typed_error() {
    let (fitter, grid) = small_fitter();
    let mut spec = flat_spectrum(grid.npix);
    for g in spec.good.iter_mut().skip(5) {
        *g = false;
    }
    let err = fitter.fit(&spec, &Start::new(0.0, 100.0)).unwrap_err();
    assert!(
        matches!(err, FitError::TooFewGoodPixels { good: 5, .. }),
        "{err}"
    );
    spec.good.fill(false);
    let err = fitter.fit(&spec, &Start::new(0.0, 100.0)).unwrap_err();
    assert!(matches!(err, FitError::NoGoodPixels), "{err}");
}

#[test]
fn fully_masked_manga_spectrum_reports_no_good_pixels() {
    let path = shared_data_dir().join("spectra/MaNGA_test_spectra.fits.gz");
    let obs = read_spectrum(
        &path,
        Selection {
            row: 5,
            spaxel: None,
        },
    )
    .unwrap();
    assert!(obs.good.iter().all(|g| !g));
    let z = obs.redshift.unwrap();
    let rest = obs.to_rest_frame(z, Some((3600.0, 8900.0))).unwrap();
    let templates = prepare_emiles(emiles(), &rest, 1).unwrap();
    let fitter = Fitter::new(&templates, rest.grid, FitConfig::default()).unwrap();
    let err = fitter
        .fit(&rest.spectrum, &Start::new(0.0, 150.0))
        .unwrap_err();
    assert!(matches!(err, FitError::NoGoodPixels), "{err}");
    assert_eq!(
        err.to_string(),
        "no good pixels: every pixel of the spectrum is masked"
    );
}

#[test]
fn regularised_fit_spreads_weights_and_gives_population_averages() {
    use astro_fit::populations::populations;
    let (spec, _) = brightest_spaxel();
    let templates = prepare_emiles(emiles(), &spec, 1).unwrap();
    let fit_with_regul = |regul: f64| {
        let cfg = FitConfig {
            mdegree: 3,
            degree: -1,
            regul,
            ..FitConfig::default()
        };
        let fitter = Fitter::new(&templates, spec.grid, cfg).unwrap();
        fitter.fit(&spec.spectrum, &Start::new(0.0, 150.0)).unwrap()
    };
    let plain = fit_with_regul(0.0);
    let smooth = fit_with_regul(100.0);
    let used = |w: &[f64]| w.iter().filter(|v| **v > 0.0).count();
    assert!(
        used(&smooth.weights) > 2 * used(&plain.weights),
        "{} vs {}",
        used(&smooth.weights),
        used(&plain.weights)
    );
    // Regularisation costs little chi2 at this strength.
    assert!(
        smooth.chi2 < 1.2 * plain.chi2,
        "{} vs {}",
        smooth.chi2,
        plain.chi2
    );
    let pops = populations(&templates, &smooth.weights).unwrap();
    let (min_age, max_age) = (
        (templates.ages[0] * 1e9).log10(),
        (templates.ages[templates.ages.len() - 1] * 1e9).log10(),
    );
    assert!(
        (min_age..=max_age).contains(&pops.light_log_age),
        "{pops:?}"
    );
    let mass_age = pops.mass_log_age.unwrap();
    // Old populations carry more mass per unit light.
    assert!(mass_age >= pops.light_log_age - 0.01, "{pops:?}");
    assert!((-1.8..=0.3).contains(&pops.light_metallicity), "{pops:?}");
}

/// The brightest spaxel of the synthetic cube on its rest-frame grid, and its truth.
pub fn brightest_spaxel() -> (
    astro_fit::spectrum::RestFrameSpectrum,
    astro_fit::synthetic::TruthRow,
) {
    let data = shared_data_dir();
    let truth = read_truth(&data.join("cubes/synthetic-manga-seed7-truth.csv")).unwrap();
    let row = truth
        .iter()
        .max_by(|a, b| a.sn.total_cmp(&b.sn))
        .unwrap()
        .clone();
    let mut spectra = load_spaxels(
        &data.join("cubes/synthetic-manga-seed7-LOGCUBE.fits.gz"),
        std::slice::from_ref(&row),
        (3600.0, 10000.0),
    )
    .unwrap();
    (spectra.remove(0), row)
}

#[test]
fn clean_clips_injected_outliers_and_keeps_the_kinematics() {
    let (spec, truth) = brightest_spaxel();
    let templates = prepare_emiles(emiles(), &spec, 1).unwrap();
    let cfg = FitConfig {
        mdegree: 3,
        clean: true,
        ..FitConfig::default()
    };
    let fitter = Fitter::new(&templates, spec.grid, cfg).unwrap();
    let reference = fitter.fit(&spec.spectrum, &Start::new(0.0, 150.0)).unwrap();
    let mut spiky = spec.spectrum.clone();
    let hits: Vec<usize> = (0..25).map(|k| 100 + 167 * k).collect();
    for &i in &hits {
        spiky.flux[i] += 40.0 * spiky.noise[i];
    }
    let cleaned = fitter.fit(&spiky, &Start::new(0.0, 150.0)).unwrap();
    for &i in &hits {
        assert!(!cleaned.good[i], "pixel {i} was not clipped");
    }
    assert!((cleaned.v - reference.v).abs() < 0.3 * reference.errors[0]);
    assert!((cleaned.sigma - reference.sigma).abs() < 0.3 * reference.errors[1]);
    assert!((cleaned.v - truth.v).abs() < 4.0 * cleaned.errors[0]);
}

#[test]
fn oversampled_templates_and_higher_moments_give_consistent_kinematics() {
    let (spec, truth) = brightest_spaxel();
    let fit = |ratio: usize, moments: usize| {
        let templates = prepare_emiles(emiles(), &spec, ratio).unwrap();
        let cfg = FitConfig {
            mdegree: 3,
            moments,
            ..FitConfig::default()
        };
        Fitter::new(&templates, spec.grid, cfg)
            .unwrap()
            .fit(&spec.spectrum, &Start::new(0.0, 150.0))
            .unwrap()
    };
    let base = fit(1, 2);
    let over = fit(3, 2);
    assert!(
        (over.v - base.v).abs() < 0.3 * base.errors[0],
        "{} vs {}",
        over.v,
        base.v
    );
    assert!((over.sigma - base.sigma).abs() < 0.3 * base.errors[1]);
    // The cube's LOSVDs are Gaussian: with the default penalty h3, h4 stay near zero.
    let gh = fit(1, 4);
    assert_eq!(gh.h.len(), 2);
    assert_eq!(gh.errors.len(), 4);
    for (h, e) in gh.h.iter().zip(&gh.errors[2..]) {
        assert!(h.abs() < 3.0 * e + 0.02, "h {h} +- {e}");
    }
    assert!((gh.v - truth.v).abs() < 4.0 * gh.errors[0]);
    assert!((gh.sigma - truth.sigma).abs() < 4.0 * gh.errors[1]);
}

#[test]
fn miles_hc_and_mastar_libraries_load_with_their_media_and_resolution() {
    let data = shared_data_dir();
    let miles = TemplateLibrary::load(&data.join("templates/miles_hc")).unwrap();
    assert_eq!(miles.spectra.len(), 42);
    assert_eq!(miles.medium, astro_fit::Medium::Air);
    assert!((miles.wave[0] - 3540.5).abs() < 1e-6);
    assert!((miles.fwhm.at(5000.0) - 2.5).abs() < 1e-12);
    let mastar = TemplateLibrary::load(&data.join("templates/mastar_hc_v2")).unwrap();
    assert_eq!(mastar.spectra.len(), 65);
    assert_eq!(mastar.medium, astro_fit::Medium::Vacuum);
    assert!((mastar.wave[0] - 10f64.powf(3.5601)).abs() < 1e-6);
    // MaStar resolution R ~ 1800 near 5000 A: FWHM ~ 2.8 A.
    let fwhm = mastar.fwhm.at(5000.0);
    assert!((2.0..4.0).contains(&fwhm), "{fwhm}");
    assert!(mastar.spectra.iter().flatten().all(|v| v.is_finite()));
    let emiles = emiles();
    assert_eq!(emiles.spectra.len(), 150);
    assert_eq!((emiles.ages.len(), emiles.metals.len()), (25, 6));
    assert!(
        emiles
            .ssp
            .as_ref()
            .unwrap()
            .iter()
            .all(|p| p.mass.is_some())
    );
}

//! Stellar populations from template weights: light- and mass-weighted ages and metallicities
//! over an SSP grid (the weights of a regularised fit, Cappellari 2017 sec. 3.5, 2023).

use crate::templates::{PreparedTemplates, SspParams};

/// Weighted population averages. Ages are averaged in log10(age/yr), as pPXF does.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Populations {
    pub light_log_age: f64,
    pub light_metallicity: f64,
    /// None when the library has no mass table.
    pub mass_log_age: Option<f64>,
    pub mass_metallicity: Option<f64>,
}

/// Averages over the SSP grid. SSP spectra are fluxes per unit initial mass divided by a
/// normalisation, so weight / normalisation is initial mass; times the present-day mass in
/// stars and remnants (Vazdekis et al. mass table) it is stellar mass. Light is weight x the
/// mean flux of the prepared template over the fitted range.
pub fn populations(templates: &PreparedTemplates, weights: &[f64]) -> Option<Populations> {
    let ssp = templates.ssp.as_ref()?;
    populations_with(templates, weights, &mean_fluxes(templates), ssp)
}

/// The light of unit weight of each template: its mean flux over the fitted range.
pub fn mean_fluxes(templates: &PreparedTemplates) -> Vec<f64> {
    templates
        .spectra
        .iter()
        .map(|t| t.iter().sum::<f64>() / t.len().max(1) as f64)
        .collect()
}

/// [`populations`] with the templates' mean fluxes computed once (bootstrap loops call it
/// per realisation).
pub fn populations_with(
    templates: &PreparedTemplates,
    weights: &[f64],
    mean_flux: &[f64],
    ssp: &[SspParams],
) -> Option<Populations> {
    let total: f64 = weights.iter().sum();
    if total <= 0.0 || weights.len() != ssp.len() {
        return None;
    }
    let mean = |w: &dyn Fn(usize) -> f64, x: &dyn Fn(usize) -> f64| -> f64 {
        let sum: f64 = (0..ssp.len()).map(w).sum();
        (0..ssp.len()).map(|j| w(j) * x(j)).sum::<f64>() / sum
    };
    let log_age = |j: usize| (ssp[j].age_gyr * 1e9).log10();
    let metal = |j: usize| ssp[j].metallicity;
    let light = |j: usize| weights[j] * mean_flux[j];
    let has_mass = ssp.iter().all(|p| p.mass.is_some());
    let mass = |j: usize| weights[j] / templates.norm[j] * ssp[j].mass.unwrap_or(0.0);
    Some(Populations {
        light_log_age: mean(&light, &log_age),
        light_metallicity: mean(&light, &metal),
        mass_log_age: has_mass.then(|| mean(&mass, &log_age)),
        mass_metallicity: has_mass.then(|| mean(&mass, &metal)),
    })
}

/// One SSP of a bin's star-formation history: its age and [M/H] and the fractions of the
/// bin's light and mass it holds (each summing to 1 over the bin's SSPs).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SfhEntry {
    pub age_gyr: f64,
    pub metallicity: f64,
    pub light: f64,
    /// NaN when the library has no mass table.
    pub mass: f64,
}

/// The star-formation history behind `weights`: every SSP with a positive weight, with its
/// light fraction (weight x mean flux, as [`populations`] weights ages) and mass fraction
/// (weight / normalisation x present-day mass). None without an SSP grid or weight.
pub fn star_formation_history(
    templates: &PreparedTemplates,
    weights: &[f64],
) -> Option<Vec<SfhEntry>> {
    let ssp = templates.ssp.as_ref()?;
    if weights.len() != ssp.len() {
        return None;
    }
    let mean_flux = mean_fluxes(templates);
    let light: Vec<f64> = weights.iter().zip(&mean_flux).map(|(w, f)| w * f).collect();
    let mass: Vec<f64> = (0..ssp.len())
        .map(|j| weights[j] / templates.norm[j] * ssp[j].mass.unwrap_or(f64::NAN))
        .collect();
    let (light_sum, mass_sum): (f64, f64) = (light.iter().sum(), mass.iter().sum());
    if light_sum <= 0.0 {
        return None;
    }
    Some(
        (0..ssp.len())
            .filter(|&j| weights[j] > 0.0)
            .map(|j| SfhEntry {
                age_gyr: ssp[j].age_gyr,
                metallicity: ssp[j].metallicity,
                light: light[j] / light_sum,
                mass: mass[j] / mass_sum,
            })
            .collect(),
    )
}

/// 1-sigma errors of the population averages from a residual bootstrap.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PopulationErrors {
    pub light_log_age: f64,
    pub light_metallicity: f64,
    /// NaN when the library has no mass table.
    pub mass_log_age: f64,
    pub mass_metallicity: f64,
    /// Realisations that were fitted (a failed refit is left out).
    pub realisations: usize,
}

/// Errors of the light- and mass-weighted log age and [M/H] of `fit` by a wild residual
/// bootstrap, as pPXF's population bootstrap example does (Davidson & Flachaire 2008): each
/// realisation is the best fit plus the residuals with random signs on the fitted pixels,
/// refitted with the same fitter (regularisation included) from the fit's kinematics; the
/// errors are the standard deviations of the averages over `n` realisations. Deterministic for
/// a `seed`. None without an SSP grid or with fewer than 2 successful refits.
pub fn bootstrap_populations(
    fitter: &crate::fit::Fitter,
    scratch: &mut crate::fit::FitScratch,
    templates: &PreparedTemplates,
    spectrum: &crate::fit::Spectrum,
    fit: &crate::fit::FitResult,
    n: usize,
    seed: u64,
) -> Option<PopulationErrors> {
    use rand::{Rng, SeedableRng};
    let ssp = templates.ssp.as_ref()?;
    let mean_flux = mean_fluxes(templates);
    let mut start = crate::fit::Start::new(fit.v, fit.sigma);
    for (h, v) in start.h.iter_mut().zip(&fit.h) {
        *h = *v;
    }
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    // One realisation's spectrum, rewritten in place each time.
    let mut sample = crate::fit::Spectrum {
        flux: fit.bestfit.clone(),
        noise: spectrum.noise.clone(),
        good: fit.good.clone(),
    };
    let mut draws: Vec<[f64; 4]> = Vec::with_capacity(n);
    for _ in 0..n {
        for i in 0..sample.flux.len() {
            let resid = spectrum.flux[i] - fit.bestfit[i];
            let sign = if rng.gen_bool(0.5) { 1.0 } else { -1.0 };
            sample.flux[i] = if fit.good[i] {
                fit.bestfit[i] + sign * resid
            } else {
                spectrum.flux[i]
            };
        }
        let Ok(r) = fitter.fit_with(scratch, &sample, &start) else {
            continue;
        };
        if let Some(p) = populations_with(templates, &r.weights, &mean_flux, ssp) {
            draws.push([
                p.light_log_age,
                p.light_metallicity,
                p.mass_log_age.unwrap_or(f64::NAN),
                p.mass_metallicity.unwrap_or(f64::NAN),
            ]);
        }
    }
    if draws.len() < 2 {
        return None;
    }
    let std = |k: usize| {
        let m = draws.iter().map(|d| d[k]).sum::<f64>() / draws.len() as f64;
        (draws.iter().map(|d| (d[k] - m).powi(2)).sum::<f64>() / (draws.len() - 1) as f64).sqrt()
    };
    Some(PopulationErrors {
        light_log_age: std(0),
        light_metallicity: std(1),
        mass_log_age: std(2),
        mass_metallicity: std(3),
        realisations: draws.len(),
    })
}

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

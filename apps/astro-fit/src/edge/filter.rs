//! Spaxel and pixel filtering before compression: nothing is lost silently.
//!
//! - spaxels with no usable pixel (fully masked, non-finite, all zero) are dropped as `empty`;
//! - spaxels whose median S/N is below the floor are dropped as `low_snr` (S/N from the noise
//!   plane, or from the DER_SNR estimate when the cube has none);
//! - a cosmic-ray hit is a pixel far above both the median of its spectral neighbours and the
//!   median of its spatial neighbours at the same wavelength (an emission line is extended in
//!   space, so it fails the second test);
//! - sky-line residuals are pixels near a night-sky line deviating from the local continuum.
//!
//! Decisions go into a new `EDGEFLAG` plane (bits [`FLAG_COSMIC`], [`FLAG_SKY`],
//! [`FLAG_LOW_SNR`], [`FLAG_EMPTY`]) and the JSON report; the file's own mask is left as it was.
//! Without `keep_all`, dropped spaxels get NaN flux and cosmic-ray pixels lose their noise
//! (IVAR 0, variance infinite), so every reader treats them as unusable.

use serde::Serialize;

use super::{EdgeError, Plane, Role, Samples, SpectralCube, sigma_from_noise};

pub const FLAG_COSMIC: u8 = 1;
pub const FLAG_SKY: u8 = 2;
pub const FLAG_LOW_SNR: u8 = 4;
pub const FLAG_EMPTY: u8 = 8;
pub const FLAG_PLANE: &str = "EDGEFLAG";

/// Strong night-sky emission lines (air wavelengths, Angstrom): [O I], Na D, OH bands.
pub const SKY_LINES_AIR: [f64; 14] = [
    5577.34, 5889.95, 5895.92, 6300.30, 6363.78, 6863.96, 7316.28, 7340.88, 7750.64, 7794.11,
    7913.71, 8344.60, 8399.17, 8827.10,
];

/// Vacuum wavelength of an air wavelength (Angstrom; the VALD / Piskunov inversion of the
/// IAU standard), for cubes in vacuum such as MaNGA's.
pub fn air_to_vacuum(air: f64) -> f64 {
    let s2 = (1e4 / air).powi(2);
    air * (1.0
        + 0.000_083_366_242_120_83
        + 0.024_089_268_699_68 / (130.106_592_452_2 - s2)
        + 0.000_159_974_089_489_7 / (38.925_687_932_93 - s2))
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct FilterOptions {
    pub min_snr: f64,
    pub cosmic_sigma: f64,
    /// Half-width of the spectral window compared with a pixel (pixels on each side).
    pub cosmic_half_window: usize,
    pub sky_lines: Vec<f64>,
    /// Half-width of the window around a sky line, Angstrom.
    pub sky_half_width: f64,
    pub sky_sigma: f64,
    pub keep_all: bool,
}

impl Default for FilterOptions {
    fn default() -> Self {
        FilterOptions {
            min_snr: 1.0,
            cosmic_sigma: 8.0,
            cosmic_half_window: 3,
            sky_lines: SKY_LINES_AIR.to_vec(),
            sky_half_width: 3.0,
            sky_sigma: 5.0,
            keep_all: false,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SpaxelReason {
    Empty,
    LowSnr,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    Dropped,
    Flagged,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SpaxelDecision {
    pub x: usize,
    pub y: usize,
    pub reason: SpaxelReason,
    pub action: Action,
    /// Median S/N over the usable pixels (absent for empty spaxels).
    pub median_snr: Option<f64>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CosmicRay {
    pub x: usize,
    pub y: usize,
    pub pixel: usize,
    pub wavelength: Option<f64>,
    /// Excess over the spectral neighbours, in units of the pixel's noise.
    pub excess_sigma: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SkyLineResidual {
    pub line: f64,
    pub spaxels: usize,
    pub pixels: usize,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct FilterReport {
    pub options: FilterOptions,
    pub spaxels_total: usize,
    pub spaxels: Vec<SpaxelDecision>,
    pub cosmic_ray_pixels: usize,
    pub cosmic_rays: Vec<CosmicRay>,
    pub sky_residual_pixels: usize,
    pub sky_lines: Vec<SkyLineResidual>,
    /// Why a step could not run (e.g. no wavelength axis for the sky lines).
    pub notes: Vec<String>,
}

impl FilterReport {
    pub fn dropped_spaxels(&self) -> usize {
        self.spaxels
            .iter()
            .filter(|d| d.action == Action::Dropped)
            .count()
    }

    pub fn flagged_spaxels(&self) -> usize {
        self.spaxels
            .iter()
            .filter(|d| d.action == Action::Flagged)
            .count()
    }
}

fn median(values: &mut [f64]) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mid = values.len() / 2;
    let (_, m, _) = values.select_nth_unstable_by(mid, f64::total_cmp);
    Some(*m)
}

/// DER_SNR noise (Stoehr et al. 2008): robust, from the spectrum alone.
fn der_snr_noise(flux: &[f64]) -> Option<f64> {
    let mut d: Vec<f64> = (2..flux.len().saturating_sub(2))
        .map(|i| (2.0 * flux[i] - flux[i - 2] - flux[i + 2]).abs())
        .filter(|v| v.is_finite())
        .collect();
    median(&mut d)
        .map(|m| 1.482_602 / 6f64.sqrt() * m)
        .filter(|n| *n > 0.0)
}

/// The per-pixel view the filter works on: flux, sigma (`None` = unusable pixel).
struct Pixels {
    flux: Vec<f64>,
    sigma: Vec<Option<f64>>,
}

fn pixels_of(cube: &SpectralCube, flux: &[f32]) -> Pixels {
    let noise = cube.noise_plane();
    let mask = cube.plane(Role::Mask);
    let nwave = cube.nwave;
    let mut sigma = vec![None; flux.len()];
    for s in 0..cube.nspec() {
        let span = s * nwave..(s + 1) * nwave;
        let usable =
            |i: usize| flux[i].is_finite() && !mask.is_some_and(|m| m.samples.is_nonzero(i));
        let fallback = match noise {
            Some(_) => None,
            None => der_snr_noise(
                &span
                    .clone()
                    .filter(|&i| usable(i))
                    .map(|i| f64::from(flux[i]))
                    .collect::<Vec<_>>(),
            ),
        };
        for i in span {
            if !usable(i) {
                continue;
            }
            sigma[i] = match noise {
                Some(Plane {
                    role,
                    samples: Samples::F32(n),
                    ..
                }) => sigma_from_noise(*role, n[i]),
                _ => fallback,
            };
        }
    }
    Pixels {
        flux: flux.iter().map(|&v| f64::from(v)).collect(),
        sigma,
    }
}

fn wavelengths(cube: &SpectralCube) -> Option<&[f64]> {
    cube.aux
        .iter()
        .find(|a| matches!(a.name.as_str(), "WAVE" | "WAVELENGTH") && a.values.len() == cube.nwave)
        .map(|a| a.values.as_slice())
}

/// Filters `cube` in place (adding the `EDGEFLAG` plane) and reports every decision.
pub fn filter_cube(
    cube: &mut SpectralCube,
    opts: &FilterOptions,
) -> Result<FilterReport, EdgeError> {
    cube.validate()?;
    if !(opts.min_snr.is_finite() && opts.cosmic_sigma > 0.0 && opts.sky_sigma > 0.0) {
        return Err(EdgeError::InvalidParameter(
            "S/N floor must be finite and the sigma thresholds positive".into(),
        ));
    }
    let Some(Plane {
        samples: Samples::F32(flux),
        ..
    }) = cube.plane(Role::Flux)
    else {
        return Err(EdgeError::InvalidCube("no f32 flux plane to filter".into()));
    };
    let px = pixels_of(cube, flux);
    let (nx, ny, nwave) = (cube.nx, cube.ny, cube.nwave);
    let mut flags = vec![0u8; px.flux.len()];
    let mut report = FilterReport {
        options: opts.clone(),
        spaxels_total: nx * ny,
        spaxels: Vec::new(),
        cosmic_ray_pixels: 0,
        cosmic_rays: Vec::new(),
        sky_residual_pixels: 0,
        sky_lines: Vec::new(),
        notes: Vec::new(),
    };
    let action = if opts.keep_all {
        Action::Flagged
    } else {
        Action::Dropped
    };
    let wave = wavelengths(cube);

    // Spaxels: empty, then S/N floor.
    let mut drop = vec![false; nx * ny];
    for (s, dropped) in drop.iter_mut().enumerate() {
        let span = s * nwave..(s + 1) * nwave;
        let mut snr: Vec<f64> = span
            .clone()
            .filter_map(|i| px.sigma[i].map(|sg| px.flux[i] / sg))
            .collect();
        let empty = snr.is_empty()
            || span
                .clone()
                .all(|i| px.sigma[i].is_none() || px.flux[i] == 0.0);
        let median_snr = if empty { None } else { median(&mut snr) };
        let reason = match median_snr {
            None => Some((SpaxelReason::Empty, FLAG_EMPTY)),
            Some(m) if m < opts.min_snr => Some((SpaxelReason::LowSnr, FLAG_LOW_SNR)),
            Some(_) => None,
        };
        if let Some((reason, flag)) = reason {
            *dropped = true;
            flags[span].iter_mut().for_each(|f| *f |= flag);
            report.spaxels.push(SpaxelDecision {
                x: s % nx,
                y: s / nx,
                reason,
                action,
                median_snr,
            });
        }
    }

    // Cosmic rays on the spaxels kept.
    let h = opts.cosmic_half_window;
    let mut window = Vec::with_capacity(2 * h);
    let mut neighbours = Vec::with_capacity(8);
    for s in (0..nx * ny).filter(|&s| !drop[s]) {
        let (x, y) = (s % nx, s / nx);
        for k in 0..nwave {
            let i = s * nwave + k;
            let Some(sigma) = px.sigma[i] else { continue };
            window.clear();
            window.extend(
                (k.saturating_sub(h)..(k + h + 1).min(nwave))
                    .filter(|&j| j != k && px.sigma[s * nwave + j].is_some())
                    .map(|j| px.flux[s * nwave + j]),
            );
            if window.len() < h {
                continue;
            }
            let excess = (px.flux[i] - median(&mut window).expect("non-empty")) / sigma;
            if excess <= opts.cosmic_sigma {
                continue;
            }
            neighbours.clear();
            for (dx, dy) in [
                (-1i64, -1i64),
                (0, -1),
                (1, -1),
                (-1, 0),
                (1, 0),
                (-1, 1),
                (0, 1),
                (1, 1),
            ] {
                let (xn, yn) = (x as i64 + dx, y as i64 + dy);
                if xn < 0 || yn < 0 || xn >= nx as i64 || yn >= ny as i64 {
                    continue;
                }
                let j = (yn as usize * nx + xn as usize) * nwave + k;
                if px.sigma[j].is_some() {
                    neighbours.push(px.flux[j]);
                }
            }
            if neighbours.len() < 2 {
                continue;
            }
            let spatial = (px.flux[i] - median(&mut neighbours).expect("non-empty")) / sigma;
            if spatial > opts.cosmic_sigma {
                flags[i] |= FLAG_COSMIC;
                report.cosmic_rays.push(CosmicRay {
                    x,
                    y,
                    pixel: k,
                    wavelength: wave.map(|w| w[k]),
                    excess_sigma: excess,
                });
            }
        }
    }
    report.cosmic_ray_pixels = report.cosmic_rays.len();

    // Sky-line residuals.
    match wave {
        None => report
            .notes
            .push("no wavelength vector (WAVE): sky-line residuals not checked".into()),
        Some(wave) => {
            for &line in &opts.sky_lines {
                let near = |k: &usize| (wave[*k] - line).abs() <= opts.sky_half_width;
                let side = |k: &usize| {
                    let d = (wave[*k] - line).abs();
                    d > opts.sky_half_width && d <= 4.0 * opts.sky_half_width
                };
                let in_line: Vec<usize> = (0..nwave).filter(near).collect();
                if in_line.is_empty() {
                    continue;
                }
                let sides: Vec<usize> = (0..nwave).filter(side).collect();
                let (mut spaxels, mut pixels) = (0, 0);
                for s in (0..nx * ny).filter(|&s| !drop[s]) {
                    let mut cont: Vec<f64> = sides
                        .iter()
                        .filter(|&&k| px.sigma[s * nwave + k].is_some())
                        .map(|&k| px.flux[s * nwave + k])
                        .collect();
                    let Some(cont) = median(&mut cont) else {
                        continue;
                    };
                    let mut hit = false;
                    for &k in &in_line {
                        let i = s * nwave + k;
                        if let Some(sigma) = px.sigma[i]
                            && ((px.flux[i] - cont) / sigma).abs() > opts.sky_sigma
                        {
                            flags[i] |= FLAG_SKY;
                            pixels += 1;
                            hit = true;
                        }
                    }
                    spaxels += usize::from(hit);
                }
                report.sky_residual_pixels += pixels;
                report.sky_lines.push(SkyLineResidual {
                    line,
                    spaxels,
                    pixels,
                });
            }
        }
    }

    if !opts.keep_all {
        apply_drops(cube, &flags);
    }
    cube.planes.retain(|p| p.name != FLAG_PLANE);
    cube.planes.push(Plane {
        name: FLAG_PLANE.into(),
        role: Role::Other,
        samples: Samples::U8(flags),
    });
    Ok(report)
}

/// Dropped spaxels: NaN flux, no noise. Cosmic-ray pixels: no noise.
fn apply_drops(cube: &mut SpectralCube, flags: &[u8]) {
    for plane in &mut cube.planes {
        let Samples::F32(values) = &mut plane.samples else {
            continue;
        };
        for (v, &f) in values.iter_mut().zip(flags) {
            let dropped = f & (FLAG_EMPTY | FLAG_LOW_SNR) != 0;
            let cosmic = f & FLAG_COSMIC != 0;
            *v = match plane.role {
                Role::Flux if dropped => f32::NAN,
                Role::Ivar if dropped || cosmic => 0.0,
                Role::Variance if dropped || cosmic => f32::INFINITY,
                _ => *v,
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::edge::AuxVector;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;
    use rand_distr::StandardNormal;

    const NX: usize = 5;
    const NY: usize = 4;
    const NWAVE: usize = 240;

    /// Continuum at S/N ~20, an emission line in every spaxel (so it is spatially extended),
    /// a sky residual at 5577 A, one empty and one faint spaxel, one cosmic-ray hit.
    fn scene() -> SpectralCube {
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let wave: Vec<f64> = (0..NWAVE).map(|k| 5500.0 + k as f64).collect();
        let mut flux = Vec::new();
        let mut ivar = Vec::new();
        for s in 0..NX * NY {
            let level = if s == 7 { 0.1 } else { 20.0 };
            for (k, w) in wave.iter().enumerate() {
                let line = 30.0 * (-0.5 * ((w - 5650.0) / 1.5).powi(2)).exp();
                let sky = if (w - 5577.0).abs() < 1.0 { 15.0 } else { 0.0 };
                let noise: f64 = rng.sample(StandardNormal);
                flux.push((level + line + sky + noise) as f32);
                ivar.push(if s == 3 || k == 0 { 0.0 } else { 1.0 });
            }
        }
        // Cosmic ray at spaxel (2, 2), pixel 100.
        flux[(2 * NX + 2) * NWAVE + 100] += 60.0;
        SpectralCube {
            nx: NX,
            ny: NY,
            nwave: NWAVE,
            planes: vec![
                Plane {
                    name: "FLUX".into(),
                    role: Role::Flux,
                    samples: Samples::F32(flux),
                },
                Plane {
                    name: "IVAR".into(),
                    role: Role::Ivar,
                    samples: Samples::F32(ivar),
                },
            ],
            aux: vec![AuxVector {
                name: "WAVE".into(),
                values: wave,
            }],
            headers: vec![],
        }
    }

    fn opts(keep_all: bool) -> FilterOptions {
        FilterOptions {
            min_snr: 3.0,
            keep_all,
            ..Default::default()
        }
    }

    #[test]
    fn finds_empty_faint_cosmic_and_sky_but_not_the_emission_line() {
        let mut cube = scene();
        let report = filter_cube(&mut cube, &opts(false)).unwrap();
        let decisions: Vec<(usize, usize, SpaxelReason)> = report
            .spaxels
            .iter()
            .map(|d| (d.x, d.y, d.reason))
            .collect();
        assert_eq!(
            decisions,
            vec![(3, 0, SpaxelReason::Empty), (2, 1, SpaxelReason::LowSnr)]
        );
        assert_eq!(report.dropped_spaxels(), 2);
        let rays: Vec<(usize, usize, usize)> = report
            .cosmic_rays
            .iter()
            .map(|c| (c.x, c.y, c.pixel))
            .collect();
        assert_eq!(rays, vec![(2, 2, 100)]);
        assert_eq!(report.cosmic_rays[0].wavelength, Some(5600.0));
        let sky = report.sky_lines.iter().find(|l| l.line == 5577.34).unwrap();
        assert_eq!(sky.spaxels, NX * NY - 2);
        assert!(
            report
                .sky_lines
                .iter()
                .filter(|l| l.line != 5577.34)
                .all(|l| l.pixels == 0)
        );

        let Samples::F32(flux) = &cube.planes[0].samples else {
            panic!()
        };
        let Samples::F32(ivar) = &cube.planes[1].samples else {
            panic!()
        };
        assert!(
            flux[7 * NWAVE..8 * NWAVE].iter().all(|v| v.is_nan()),
            "faint spaxel dropped"
        );
        assert_eq!(
            ivar[(2 * NX + 2) * NWAVE + 100],
            0.0,
            "cosmic-ray pixel loses its weight"
        );
        let Samples::U8(flags) = &cube.planes[2].samples else {
            panic!()
        };
        assert_eq!(flags[(2 * NX + 2) * NWAVE + 100], FLAG_COSMIC);
        assert_eq!(flags[7 * NWAVE + 50], FLAG_LOW_SNR);
    }

    #[test]
    fn air_to_vacuum_matches_the_oxygen_sky_line() {
        // [O I] 5577.339 A in air is 5578.887 A in vacuum.
        assert!((air_to_vacuum(5577.339) - 5578.887).abs() < 0.002);
    }

    #[test]
    fn keep_all_flags_the_same_things_and_changes_no_pixel() {
        let original = scene();
        let mut flagged = original.clone();
        let report_keep = filter_cube(&mut flagged, &opts(true)).unwrap();
        let report_drop = filter_cube(&mut scene(), &opts(false)).unwrap();
        assert_eq!(report_keep.cosmic_rays, report_drop.cosmic_rays);
        assert_eq!(report_keep.flagged_spaxels(), 2);
        assert_eq!(report_keep.dropped_spaxels(), 0);
        assert_eq!(
            &flagged.planes[..2],
            &original.planes[..],
            "flux and ivar untouched"
        );
        assert_eq!(flagged.planes[2].name, FLAG_PLANE);
    }

    #[test]
    fn without_noise_the_snr_comes_from_the_spectrum_and_bad_options_are_refused() {
        let mut cube = scene();
        cube.planes.remove(1);
        let report = filter_cube(&mut cube, &opts(true)).unwrap();
        assert!(
            report
                .spaxels
                .iter()
                .any(|d| (d.x, d.y, d.reason) == (2, 1, SpaxelReason::LowSnr))
        );
        let bad = FilterOptions {
            cosmic_sigma: 0.0,
            ..Default::default()
        };
        assert!(matches!(
            filter_cube(&mut scene(), &bad),
            Err(EdgeError::InvalidParameter(_))
        ));
        let mut no_wave = scene();
        no_wave.aux.clear();
        let report = filter_cube(&mut no_wave, &opts(true)).unwrap();
        assert!(report.notes[0].contains("sky-line"));
    }
}

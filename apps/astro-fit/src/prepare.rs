//! From a cube to the spectra worth fitting: per-spaxel S/N in a rest-frame window, footprint
//! and quality selection, Galactic extinction, Voronoi binning and combined bin spectra.
//!
//! Everything that touches pixels streams the cube (planes for statistics, row bands for
//! spectra), so memory is bounded by a block, never by the cube.

use std::ops::Range;

use serde::{Deserialize, Serialize};

use crate::cube::{Cube, CubeError, SpaxelBlock};
use crate::plan::BinSpec;
use crate::voronoi::{self, BinningOutcome, VoronoiError};

#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    #[error(transparent)]
    Cube(#[from] CubeError),
    #[error(transparent)]
    Voronoi(#[from] VoronoiError),
    #[error(
        "no usable spaxel: none has {min_good_fraction:.0}% good pixels and S/N >= {min_sn} in {window_used:?} A"
    )]
    NoUsableSpaxels {
        min_good_fraction: f64,
        min_sn: f64,
        window_used: Range<f64>,
    },
    #[error("every wavelength plane of the cube is empty (no good pixel at all)")]
    AllPlanesEmpty,
    #[error("redshift {0} is not usable (must be finite and > -1)")]
    BadRedshift(f64),
}

/// Choices of the preparation step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PrepareConfig {
    /// Rest-frame window (Angstrom) in which S/N is measured.
    pub sn_window_rest: Range<f64>,
    pub redshift: f64,
    /// A spaxel belongs to the footprint when at least this fraction of its pixels is good.
    pub min_good_fraction: f64,
    /// Spaxels below this S/N are left out, as GIST's MIN_SNR does.
    pub min_sn: f64,
}

impl Default for PrepareConfig {
    fn default() -> Self {
        PrepareConfig {
            sn_window_rest: 4800.0..5800.0,
            redshift: 0.0,
            min_good_fraction: 0.8,
            min_sn: 1.0,
        }
    }
}

/// Per-spaxel statistics from one streamed pass over the planes (index `y * nx + x`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SpaxelStats {
    pub nx: usize,
    pub ny: usize,
    /// Mean good flux and sqrt(mean variance) per pixel in the window: per-pixel S/N is
    /// `signal / noise` (0 where the window has no good pixel).
    pub signal: Vec<f64>,
    pub noise: Vec<f64>,
    pub good_fraction: Vec<f64>,
    /// Planes without a single good pixel (all-NaN or fully flagged).
    pub empty_planes: usize,
    /// Observed-frame window actually used (the whole range when the rest window falls outside).
    pub window_used: Range<f64>,
}

impl SpaxelStats {
    pub fn sn(&self, i: usize) -> f64 {
        if self.noise[i] > 0.0 {
            self.signal[i] / self.noise[i]
        } else {
            0.0
        }
    }
}

/// The observed-frame window: the rest window shifted by `redshift`, or the whole cube range
/// when the two do not overlap by at least 20 pixels.
fn observed_window(wave: &[f64], rest: &Range<f64>, redshift: f64) -> Range<usize> {
    let (lo, hi) = (rest.start * (1.0 + redshift), rest.end * (1.0 + redshift));
    let start = wave.partition_point(|w| *w < lo);
    let end = wave.partition_point(|w| *w <= hi);
    if end >= start + 20 {
        start..end
    } else {
        0..wave.len()
    }
}

/// One pass over the cube's planes, `planes_per_block` at a time.
pub fn spaxel_stats(
    cube: &mut Cube,
    config: &PrepareConfig,
    planes_per_block: usize,
) -> Result<SpaxelStats, PrepareError> {
    if !(config.redshift.is_finite() && config.redshift > -1.0) {
        return Err(PrepareError::BadRedshift(config.redshift));
    }
    let meta = cube.meta().clone();
    let (nspax, nwave) = (meta.nspaxels(), meta.nwave());
    let window = observed_window(&meta.wavelength, &config.sn_window_rest, config.redshift);
    let mut sum_flux = vec![0f64; nspax];
    let mut sum_var = vec![0f64; nspax];
    let mut n_window = vec![0u32; nspax];
    let mut n_good = vec![0u32; nspax];
    let mut empty_planes = 0;
    let step = planes_per_block.max(1);
    for start in (0..nwave).step_by(step) {
        let block = cube.read_planes(start..(start + step).min(nwave))?;
        for (local, k) in block.planes.clone().enumerate() {
            let plane = local * nspax..(local + 1) * nspax;
            let good = &block.good[plane.clone()];
            if !good.iter().any(|g| *g) {
                empty_planes += 1;
                continue;
            }
            let in_window = window.contains(&k);
            for (s, i) in plane.enumerate() {
                if block.good[i] {
                    n_good[s] += 1;
                    if in_window {
                        n_window[s] += 1;
                        sum_flux[s] += f64::from(block.flux[i]);
                        sum_var[s] += 1.0 / f64::from(block.ivar[i]);
                    }
                }
            }
        }
    }
    if empty_planes == nwave {
        return Err(PrepareError::AllPlanesEmpty);
    }
    let mean = |sum: &[f64]| -> Vec<f64> {
        sum.iter()
            .zip(&n_window)
            .map(|(s, n)| if *n > 0 { s / f64::from(*n) } else { 0.0 })
            .collect()
    };
    Ok(SpaxelStats {
        nx: meta.nx,
        ny: meta.ny,
        signal: mean(&sum_flux),
        noise: mean(&sum_var).into_iter().map(f64::sqrt).collect(),
        good_fraction: n_good
            .iter()
            .map(|n| f64::from(*n) / nwave as f64)
            .collect(),
        empty_planes,
        window_used: meta.wavelength[window.start]..meta.wavelength[window.end - 1],
    })
}

/// Spaxels inside the footprint, good enough and above the S/N floor.
pub fn select_spaxels(
    stats: &SpaxelStats,
    config: &PrepareConfig,
) -> Result<Vec<usize>, PrepareError> {
    let selected: Vec<usize> = (0..stats.signal.len())
        .filter(|&i| {
            stats.good_fraction[i] >= config.min_good_fraction
                && stats.noise[i] > 0.0
                && stats.sn(i) >= config.min_sn
        })
        .collect();
    if selected.is_empty() {
        return Err(PrepareError::NoUsableSpaxels {
            min_good_fraction: config.min_good_fraction * 100.0,
            min_sn: config.min_sn,
            window_used: stats.window_used.clone(),
        });
    }
    Ok(selected)
}

/// Bins of the selected spaxels: Voronoi to `target_sn` when given, else one bin per spaxel.
pub fn make_bins(
    stats: &SpaxelStats,
    selected: &[usize],
    target_sn: Option<f64>,
) -> Result<(Vec<BinSpec>, Option<BinningOutcome>), PrepareError> {
    let xy = |i: usize| [(i % stats.nx) as u32, (i / stats.nx) as u32];
    let Some(target) = target_sn else {
        let bins = selected
            .iter()
            .enumerate()
            .map(|(id, &i)| BinSpec {
                id,
                spaxels: vec![xy(i)],
                sn: stats.sn(i),
            })
            .collect();
        return Ok((bins, None));
    };
    let x: Vec<f64> = selected.iter().map(|&i| (i % stats.nx) as f64).collect();
    let y: Vec<f64> = selected.iter().map(|&i| (i / stats.nx) as f64).collect();
    // Signal may be negative in noise-dominated spaxels; the binning sums it as is.
    let signal: Vec<f64> = selected.iter().map(|&i| stats.signal[i]).collect();
    let noise: Vec<f64> = selected.iter().map(|&i| stats.noise[i]).collect();
    let binning = voronoi::bin2d(&x, &y, &signal, &noise, target, Some(1.0))?;
    let mut bins: Vec<BinSpec> = (0..binning.nbins())
        .map(|id| BinSpec {
            id,
            spaxels: Vec::new(),
            sn: binning.sn[id],
        })
        .collect();
    for (j, &b) in binning.bin_of.iter().enumerate() {
        bins[b].spaxels.push(xy(selected[j]));
    }
    Ok((bins, Some(binning.outcome)))
}

/// A spectrum ready for fitting: flux, inverse variance and good pixels on the cube's grid.
#[derive(Debug, Clone, PartialEq)]
pub struct BinSpectrum {
    pub flux: Vec<f64>,
    pub ivar: Vec<f64>,
    pub good: Vec<bool>,
}

/// The mean spectrum of `spaxels` taken from `block`. A pixel is good where at least half of
/// the spaxels are good there; its value is the mean of those, so that a missing spaxel does
/// not make a step in the flux.
pub fn combine(block: &SpaxelBlock, spaxels: &[[u32; 2]]) -> BinSpectrum {
    let nwave = block.nwave;
    let mut sum = vec![0f64; nwave];
    let mut var = vec![0f64; nwave];
    let mut count = vec![0u32; nwave];
    for s in spaxels {
        let view = block.spectrum(s[0] as usize, s[1] as usize);
        for k in 0..nwave {
            if view.good[k] {
                sum[k] += f64::from(view.flux[k]);
                var[k] += 1.0 / f64::from(view.ivar[k]);
                count[k] += 1;
            }
        }
    }
    let need = spaxels.len().div_ceil(2).max(1) as u32;
    let mut out = BinSpectrum {
        flux: vec![0.0; nwave],
        ivar: vec![0.0; nwave],
        good: vec![false; nwave],
    };
    for k in 0..nwave {
        if count[k] >= need {
            let n = f64::from(count[k]);
            out.flux[k] = sum[k] / n;
            out.ivar[k] = n * n / var[k];
            out.good[k] = true;
        }
    }
    out
}

/// Mean spectrum of the spaxels `selected` (cube indices), streamed by row bands.
pub fn integrated_spectrum(
    cube: &mut Cube,
    selected: &[usize],
    rows_per_block: usize,
) -> Result<BinSpectrum, PrepareError> {
    let (nx, ny, nwave) = (cube.meta().nx, cube.meta().ny, cube.meta().nwave());
    let mut sum = vec![0f64; nwave];
    let mut var = vec![0f64; nwave];
    let mut count = vec![0u32; nwave];
    let mut chosen = vec![false; nx * ny];
    for &i in selected {
        chosen[i] = true;
    }
    let step = rows_per_block.max(1);
    for y0 in (0..ny).step_by(step) {
        let rows = y0..(y0 + step).min(ny);
        if !rows
            .clone()
            .any(|y| chosen[y * nx..(y + 1) * nx].iter().any(|c| *c))
        {
            continue;
        }
        let block = cube.read_rows(rows.clone())?;
        for y in rows {
            for x in (0..nx).filter(|x| chosen[y * nx + x]) {
                let v = block.spectrum(x, y);
                for k in 0..nwave {
                    if v.good[k] {
                        sum[k] += f64::from(v.flux[k]);
                        var[k] += 1.0 / f64::from(v.ivar[k]);
                        count[k] += 1;
                    }
                }
            }
        }
    }
    let need = (selected.len() as u32).div_ceil(2).max(1);
    Ok(BinSpectrum {
        flux: (0..nwave)
            .map(|k| {
                if count[k] >= need {
                    sum[k] / f64::from(count[k])
                } else {
                    0.0
                }
            })
            .collect(),
        ivar: (0..nwave)
            .map(|k| {
                if count[k] >= need {
                    f64::from(count[k]).powi(2) / var[k]
                } else {
                    0.0
                }
            })
            .collect(),
        good: count.iter().map(|c| *c >= need).collect(),
    })
}

/// A(lambda) / E(B-V) of Cardelli, Clayton & Mathis (1989) with the optical coefficients of
/// O'Donnell (1994), R_V = 3.1; `lambda` in Angstrom. Valid 1000 A - 3.3 micron.
pub fn ccm_extinction_per_ebv(lambda: f64) -> f64 {
    const RV: f64 = 3.1;
    let x = 1e4 / lambda; // inverse micron
    let (a, b) = if x < 1.1 {
        (0.574 * x.powf(1.61), -0.527 * x.powf(1.61))
    } else if x < 3.3 {
        let y = x - 1.82;
        let a = [
            1.0, 0.104, -0.609, 0.701, 1.137, -1.718, -0.827, 1.647, -0.505,
        ];
        let b = [
            0.0, 1.952, 2.908, -3.989, -7.985, 11.102, 5.491, -10.805, 3.347,
        ];
        let poly = |c: &[f64]| c.iter().rev().fold(0.0, |acc, v| acc * y + v);
        (poly(&a), poly(&b))
    } else {
        let (fa, fb) = if x >= 5.9 {
            let d = x - 5.9;
            (
                -0.04473 * d * d - 0.009779 * d.powi(3),
                0.2130 * d * d + 0.1207 * d.powi(3),
            )
        } else {
            (0.0, 0.0)
        };
        (
            1.752 - 0.316 * x - 0.104 / ((x - 4.67).powi(2) + 0.341) + fa,
            -3.090 + 1.825 * x + 1.206 / ((x - 4.62).powi(2) + 0.263) + fb,
        )
    };
    a * RV + b
}

/// Multiplies a spectrum by the Galactic de-reddening `10^(0.4 A_lambda)` (ivar by its inverse
/// square).
pub fn deredden(spectrum: &mut BinSpectrum, wavelength: &[f64], ebv: f64) {
    if ebv == 0.0 {
        return;
    }
    for (k, w) in wavelength.iter().enumerate() {
        let factor = 10f64.powf(0.4 * ebv * ccm_extinction_per_ebv(*w));
        spectrum.flux[k] *= factor;
        spectrum.ivar[k] /= factor * factor;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cube::tests::cube_file;

    #[test]
    fn manga_footprint_and_sn_follow_the_truth_table() {
        let mut cube = Cube::open(cube_file("synthetic-manga-seed7-LOGCUBE.fits.gz")).unwrap();
        let config = PrepareConfig {
            redshift: 0.018,
            ..PrepareConfig::default()
        };
        let stats = spaxel_stats(&mut cube, &config, 500).unwrap();
        let selected = select_spaxels(&stats, &config).unwrap();
        // The truth: 652 spaxels in the footprint, S/N 5..60 per pixel.
        let truth = std::fs::read_to_string(cube_file("synthetic-manga-seed7-truth.csv")).unwrap();
        let mut inside = Vec::new();
        for line in truth.lines().skip(1) {
            let f: Vec<&str> = line.split(',').collect();
            if f[2] == "1" {
                let (x, y): (usize, usize) = (f[0].parse().unwrap(), f[1].parse().unwrap());
                inside.push((y * 32 + x, f[5].parse::<f64>().unwrap()));
            }
        }
        assert_eq!(inside.len(), 652);
        let truth_set: Vec<usize> = inside.iter().map(|(i, _)| *i).collect();
        assert_eq!(selected, truth_set);
        // Measured S/N tracks the generator's (a continuum window, so within ~30%).
        let mut ratios: Vec<f64> = inside.iter().map(|(i, sn)| stats.sn(*i) / sn).collect();
        ratios.sort_by(f64::total_cmp);
        let median = ratios[ratios.len() / 2];
        assert!(
            (0.7..1.3).contains(&median),
            "median measured/true S/N {median}"
        );
        assert!(
            stats.empty_planes < 5,
            "{} empty planes",
            stats.empty_planes
        );
    }

    #[test]
    fn binning_the_muse_minicube_gives_bins_near_target() {
        let mut cube = Cube::open(cube_file("minicube.fits")).unwrap();
        let config = PrepareConfig {
            redshift: 0.0881,
            ..PrepareConfig::default()
        };
        let stats = spaxel_stats(&mut cube, &config, 512).unwrap();
        let selected = select_spaxels(&stats, &config).unwrap();
        let (bins, outcome) = make_bins(&stats, &selected, Some(20.0)).unwrap();
        assert!(
            matches!(outcome, Some(BinningOutcome::Binned { .. })),
            "{outcome:?}"
        );
        let nspax: usize = bins.iter().map(|b| b.spaxels.len()).sum();
        assert_eq!(nspax, selected.len());
        assert!(bins.len() > 3 && bins.len() < selected.len());
        // Combining a bin's spectra gives a mean spectrum with more S/N than its members.
        let big = bins.iter().max_by_key(|b| b.spaxels.len()).unwrap();
        let block = cube.read_rows(big.rows()).unwrap();
        let spec = combine(&block, &big.spaxels);
        assert!(spec.good.iter().filter(|g| **g).count() > 3000);
        let k = spec.good.iter().position(|g| *g).unwrap();
        let member = block.spectrum(big.spaxels[0][0] as usize, big.spaxels[0][1] as usize);
        assert!(spec.ivar[k] > f64::from(member.ivar[k]));
    }

    #[test]
    fn an_all_nan_plane_is_counted_and_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("megara.fits");
        crate::cube::tests::write_megara(&path, 4, 3, 30, 7);
        let mut cube = Cube::open(&path).unwrap();
        let stats = spaxel_stats(&mut cube, &PrepareConfig::default(), 4).unwrap();
        assert_eq!(stats.empty_planes, 1);
        // Window falls outside 6000-6015 A: the whole range is used instead.
        assert_eq!(stats.window_used, 6000.0..6014.5);
        // Spaxel (1, 2) has zero variance everywhere: no good pixel, left out.
        assert_eq!(stats.good_fraction[2 * 4 + 1], 0.0);
        assert!((stats.good_fraction[0] - 29.0 / 30.0).abs() < 1e-12);
        let selected = select_spaxels(&stats, &PrepareConfig::default()).unwrap();
        assert_eq!(selected.len(), 11);
    }

    #[test]
    fn all_planes_empty_and_no_usable_spaxel_are_errors() {
        let stats = SpaxelStats {
            nx: 2,
            ny: 1,
            signal: vec![1.0, 1.0],
            noise: vec![10.0, 10.0],
            good_fraction: vec![1.0, 1.0],
            empty_planes: 0,
            window_used: 5000.0..5100.0,
        };
        let err = select_spaxels(&stats, &PrepareConfig::default()).unwrap_err();
        assert!(matches!(err, PrepareError::NoUsableSpaxels { .. }), "{err}");
    }

    #[test]
    fn extinction_curve_matches_ccm_at_v_and_b() {
        // A_V / E(B-V) = R_V and A_B / E(B-V) = R_V + 1 by construction of the curve.
        assert!((ccm_extinction_per_ebv(5495.0) - 3.1).abs() < 0.05);
        assert!((ccm_extinction_per_ebv(4405.0) - 4.1).abs() < 0.1);
        let mut s = BinSpectrum {
            flux: vec![1.0],
            ivar: vec![1.0],
            good: vec![true],
        };
        deredden(&mut s, &[5495.0], 0.1);
        assert!((s.flux[0] - 10f64.powf(0.4 * 0.31)).abs() < 0.01);
    }
}

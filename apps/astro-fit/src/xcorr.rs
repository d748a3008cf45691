//! Starting kinematics for each spectrum of a cube from its cross-correlation with a reference
//! model (Tonry & Davis 1979): the lag of the correlation peak gives V, and the peak's width,
//! against the width of the reference's own autocorrelation, gives sigma.
//!
//! The reference is the global fit's stellar model, so the templates and the systemic start
//! still come from the global fit (as in GIST and the MaNGA DAP); the correlation only moves
//! each spectrum's start to its own rotation velocity and dispersion. In a rotating disc the
//! global V and sigma can be hundreds of km/s away from a spaxel's, and the non-linear search
//! then spends several model evaluations on the way.

use std::sync::Arc;

use realfft::num_complex::Complex64;
use realfft::{ComplexToReal, RealFftPlanner, RealToComplex};

use crate::fit::Start;
use crate::losvd::fast_fft_len;

/// Half-width, in pixels, of the running mean that takes out the continuum: wide next to the
/// absorption lines, narrow next to the polynomials' scales.
const CONTINUUM_HALF_WIDTH: usize = 40;

/// A reference prepared for correlating spectra of one grid against it.
#[derive(Clone)]
pub struct CrossCorrelation {
    forward: Arc<dyn RealToComplex<f64>>,
    inverse: Arc<dyn ComplexToReal<f64>>,
    /// Spectrum of the reference's line signal (conjugated on use).
    reference: Vec<Complex64>,
    /// Squared width, pixels^2, of the reference's autocorrelation peak.
    reference_width2: f64,
    reference_start: Start,
    velscale: f64,
    max_lag: usize,
    npix: usize,
}

impl std::fmt::Debug for CrossCorrelation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CrossCorrelation")
            .field("npix", &self.npix)
            .field("max_lag", &self.max_lag)
            .field("reference_width2", &self.reference_width2)
            .finish_non_exhaustive()
    }
}

/// Per-thread buffers of [`CrossCorrelation::start_for`].
#[derive(Debug, Clone)]
pub struct XcorrScratch {
    signal: Vec<f64>,
    continuum: Vec<f64>,
    prefix: Vec<(f64, usize)>,
    bins: Vec<Complex64>,
    ccf: Vec<f64>,
    fft: Vec<Complex64>,
}

/// Where the correlation peaks and how wide it is.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Peak {
    lag: f64,
    width2: f64,
}

impl CrossCorrelation {
    /// `reference`: a model on the galaxy grid (no polynomials needed) with the kinematics
    /// `reference_start`; peaks are searched within +-`max_offset` km/s of its V. None when
    /// the reference has no line signal to correlate.
    pub fn new(
        reference: &[f64],
        reference_start: Start,
        velscale: f64,
        max_offset: f64,
    ) -> Option<Self> {
        let npix = reference.len();
        // Zero padding to twice the length keeps the lags of interest free of wrap-around.
        let n = fast_fft_len(2 * npix, 2);
        let mut planner = RealFftPlanner::<f64>::new();
        let forward = planner.plan_fft_forward(n);
        let inverse = planner.plan_fft_inverse(n);
        let max_lag = ((max_offset / velscale).ceil() as usize).min(npix / 2);
        let mut xc = CrossCorrelation {
            forward,
            inverse,
            reference: Vec::new(),
            reference_width2: 0.0,
            reference_start,
            velscale,
            max_lag,
            npix,
        };
        let mut s = xc.scratch();
        let good = vec![true; npix];
        xc.transform(reference, &good, &mut s);
        xc.reference = s.bins.clone();
        // The autocorrelation peaks at lag 0 by construction; its width calibrates sigma.
        let auto = xc.correlate(&mut s)?;
        xc.reference_width2 = auto.width2;
        Some(xc)
    }

    pub fn scratch(&self) -> XcorrScratch {
        XcorrScratch {
            signal: self.forward.make_input_vec(),
            continuum: vec![0.0; self.npix],
            prefix: Vec::with_capacity(self.npix + 1),
            bins: self.forward.make_output_vec(),
            ccf: self.inverse.make_output_vec(),
            fft: {
                let a = self.forward.get_scratch_len();
                let b = self.inverse.get_scratch_len();
                vec![Complex64::new(0.0, 0.0); a.max(b)]
            },
        }
    }

    /// The starting V and sigma for a spectrum on the reference's grid (`good` marks the
    /// pixels to use); None when its correlation has no clear peak within the lag range,
    /// and the caller keeps the global start.
    pub fn start_for(&self, flux: &[f64], good: &[bool], s: &mut XcorrScratch) -> Option<Start> {
        if flux.len() != self.npix || good.len() != self.npix {
            return None;
        }
        self.transform(flux, good, s);
        let peak = self.correlate(s)?;
        let sigma_ref = self.reference_start.sigma / self.velscale;
        // Gaussian widths add in quadrature: the correlation carries sigma^2 + sigma_ref^2,
        // the autocorrelation 2 sigma_ref^2, both on top of the template's own lines.
        let sigma2 = peak.width2 - self.reference_width2 + sigma_ref * sigma_ref;
        // Below half a pixel the width no longer tells sigma apart; start there.
        let sigma = sigma2.max(0.25).sqrt() * self.velscale;
        Some(Start::new(
            self.reference_start.v + peak.lag * self.velscale,
            sigma,
        ))
    }

    /// `s.bins`: spectrum of the line signal of `flux` (flux over a running-mean continuum,
    /// minus one, on good pixels; zero elsewhere and in the padding).
    fn transform(&self, flux: &[f64], good: &[bool], s: &mut XcorrScratch) {
        running_mean(
            flux,
            good,
            CONTINUUM_HALF_WIDTH,
            &mut s.prefix,
            &mut s.continuum,
        );
        s.signal.fill(0.0);
        for i in 0..self.npix {
            let c = s.continuum[i];
            if good[i] && c > 0.0 && flux[i].is_finite() {
                s.signal[i] = flux[i] / c - 1.0;
            }
        }
        self.forward
            .process_with_scratch(&mut s.signal, &mut s.bins, &mut s.fft)
            .expect("buffer sizes come from the plan");
    }

    /// Correlate `s.bins` with the reference and locate the peak.
    fn correlate(&self, s: &mut XcorrScratch) -> Option<Peak> {
        for (b, r) in s.bins.iter_mut().zip(&self.reference) {
            *b *= r.conj();
        }
        let last = s.bins.len() - 1;
        s.bins[0].im = 0.0;
        s.bins[last].im = 0.0;
        self.inverse
            .process_with_scratch(&mut s.bins, &mut s.ccf, &mut s.fft)
            .expect("buffer sizes come from the plan");
        peak(&s.ccf, self.max_lag)
    }
}

/// Tonry & Davis's r below which a peak is not trusted: its height over the noise estimated
/// from the correlation's antisymmetric part about the peak.
const MIN_PEAK_SIGNIFICANCE: f64 = 3.0;

/// Peak of a circular correlation (lag k at index k, lag -k at n - k) within +-`max_lag`:
/// sub-pixel lag from the parabola through the highest sample and its neighbours, width from
/// the Gaussian through them (the parabola of the logarithm). None when the highest sample is
/// on the edge of the range or not significant.
fn peak(ccf: &[f64], max_lag: usize) -> Option<Peak> {
    let n = ccf.len();
    let at = |lag: isize| ccf[lag.rem_euclid(n as isize) as usize];
    let max_lag = max_lag as isize;
    let best = (-max_lag..=max_lag).max_by(|a, b| at(*a).total_cmp(&at(*b)))?;
    // A maximum on the edge of the range is not a peak.
    if best.abs() == max_lag {
        return None;
    }
    let (left, centre, right) = (at(best - 1), at(best), at(best + 1));
    if !(left > 0.0 && centre > 0.0 && right > 0.0) {
        return None;
    }
    // A correlation with a shifted copy of the reference is symmetric about its peak; noise
    // and chance alignments are not (Tonry & Davis 1979, r = h / (sqrt(2) sigma_a)).
    let antisymmetric2 = (1..=max_lag)
        .map(|x| {
            let a = 0.5 * (at(best + x) - at(best - x));
            a * a
        })
        .sum::<f64>()
        / max_lag as f64;
    if centre < MIN_PEAK_SIGNIFICANCE * (2.0 * antisymmetric2).sqrt() {
        return None;
    }
    let curvature = left - 2.0 * centre + right;
    let log_curvature = left.ln() - 2.0 * centre.ln() + right.ln();
    if curvature >= 0.0 || log_curvature >= 0.0 {
        return None;
    }
    Some(Peak {
        lag: best as f64 + 0.5 * (left - right) / curvature,
        width2: -1.0 / log_curvature,
    })
}

/// Mean of the good values within +-`half` pixels (all values where none is good nearby).
fn running_mean(
    values: &[f64],
    good: &[bool],
    half: usize,
    prefix: &mut Vec<(f64, usize)>,
    out: &mut [f64],
) {
    let n = values.len();
    // Prefix sums of the good values and of their count.
    let mut sum = 0.0;
    let mut count = 0usize;
    prefix.clear();
    prefix.push((0.0, 0usize));
    for (&v, &g) in values.iter().zip(good) {
        if g && v.is_finite() {
            sum += v;
            count += 1;
        }
        prefix.push((sum, count));
    }
    for (i, o) in out.iter_mut().enumerate() {
        let lo = i.saturating_sub(half);
        let hi = (i + half + 1).min(n);
        let (s, c) = (prefix[hi].0 - prefix[lo].0, prefix[hi].1 - prefix[lo].1);
        *o = if c > 0 { s / c as f64 } else { 0.0 };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A line spectrum: Gaussian absorption lines of width `sigma` pixels, shifted by `shift`.
    fn lines(npix: usize, shift: f64, sigma: f64) -> Vec<f64> {
        let centres = [150.0, 420.0, 433.0, 700.0, 905.0, 1210.0, 1500.0, 1777.0];
        (0..npix)
            .map(|i| {
                let x = i as f64 - shift;
                let depth: f64 = centres
                    .iter()
                    .map(|c| 0.4 * (-(x - c) * (x - c) / (2.0 * sigma * sigma)).exp())
                    .sum();
                (1.0 + 0.3 * i as f64 / npix as f64) * (1.0 - depth)
            })
            .collect()
    }

    const VELSCALE: f64 = 70.0;
    const NPIX: usize = 2000;

    /// A reference of 2-pixel (140 km/s) lines at `v0`, searched within +-`max_offset` km/s.
    fn reference(v0: f64, max_offset: f64) -> (CrossCorrelation, XcorrScratch) {
        let xc = CrossCorrelation::new(
            &lines(NPIX, 0.0, 2.0),
            Start::new(v0, 2.0 * VELSCALE),
            VELSCALE,
            max_offset,
        )
        .expect("the reference has lines");
        let s = xc.scratch();
        (xc, s)
    }

    #[test]
    fn recovers_the_shift_and_broadening_of_a_line_spectrum() {
        let (velscale, npix) = (VELSCALE, NPIX);
        let (xc, mut s) = reference(10.0, 2000.0);
        let good = vec![true; npix];
        // Shifted by 3.4 pixels and 2.5 pixels wide.
        let observed = lines(npix, 3.4, 2.5);
        let start = xc.start_for(&observed, &good, &mut s).unwrap();
        assert!(
            (start.v - (10.0 + 3.4 * velscale)).abs() < 0.1 * velscale,
            "{start:?}"
        );
        assert!(
            (start.sigma - 2.5 * velscale).abs() < 0.15 * 2.5 * velscale,
            "{start:?}"
        );
    }

    #[test]
    fn masked_pixels_and_noise_do_not_move_the_peak() {
        let (velscale, npix) = (VELSCALE, NPIX);
        let (xc, mut s) = reference(0.0, 1000.0);
        let mut observed = lines(npix, -5.2, 2.0);
        let mut good = vec![true; npix];
        for (i, (f, g)) in observed.iter_mut().zip(good.iter_mut()).enumerate() {
            // Deterministic "noise" and a masked stretch with garbage in it.
            *f += 0.02 * ((i * 7919 % 101) as f64 / 50.0 - 1.0);
            if (600..680).contains(&i) {
                *g = false;
                *f = f64::NAN;
            }
        }
        let start = xc.start_for(&observed, &good, &mut s).unwrap();
        assert!(
            (start.v + 5.2 * velscale).abs() < 0.1 * velscale,
            "{start:?}"
        );
    }

    #[test]
    fn a_flat_spectrum_or_a_shift_beyond_the_range_gives_no_start() {
        let npix = NPIX;
        let (xc, mut s) = reference(0.0, 700.0);
        let good = vec![true; npix];
        assert_eq!(xc.start_for(&vec![1.0; npix], &good, &mut s), None);
        // 30 pixels = 2100 km/s, beyond +-700 km/s: the best lag in range is on its edge or
        // a side lobe, never a start near the true shift.
        if let Some(start) = xc.start_for(&lines(npix, 30.0, 2.0), &good, &mut s) {
            assert!(start.v.abs() <= 700.0, "{start:?}");
        }
        assert_eq!(xc.start_for(&vec![1.0; npix - 1], &good, &mut s), None);
    }

    #[test]
    fn noise_alone_gives_no_start() {
        let (velscale, npix) = (VELSCALE, NPIX);
        let (xc, mut s) = reference(0.0, 700.0);
        let good = vec![true; npix];
        // A linear congruential sequence: white noise around a flat continuum.
        let mut state = 12345u64;
        let noise: Vec<f64> = (0..npix)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                1.0 + 0.1 * ((state >> 33) as f64 / (1u64 << 31) as f64 - 0.5)
            })
            .collect();
        assert_eq!(xc.start_for(&noise, &good, &mut s), None);
        // The same noise on top of the lines: the peak stands out again.
        let observed: Vec<f64> = lines(npix, 2.0, 2.0)
            .iter()
            .zip(&noise)
            .map(|(l, n)| l * n)
            .collect();
        let start = xc.start_for(&observed, &good, &mut s).unwrap();
        assert!(
            (start.v - 2.0 * velscale).abs() < 0.2 * velscale,
            "{start:?}"
        );
    }

    /// A correlation sampled at lags -10..=10 (circularly, n = 64).
    fn sampled(f: impl Fn(f64) -> f64) -> Vec<f64> {
        let mut ccf = vec![0.0; 64];
        for lag in -10isize..=10 {
            ccf[lag.rem_euclid(64) as usize] = f(lag as f64);
        }
        ccf
    }

    #[test]
    fn a_peak_must_be_interior_and_stand_above_the_antisymmetric_noise() {
        let bump = |x: f64| (-(x - 2.3) * (x - 2.3) / 4.0).exp();
        let found = peak(&sampled(bump), 10).unwrap();
        assert!((found.lag - 2.3).abs() < 0.1, "{found:?}");
        // Zero-mean "noise" whose highest sample (lag 2) has positive neighbours: a maximum,
        // but no taller than the noise says a chance one would be.
        let noise = |x: f64| {
            let u = ((x + 11.0) * 7919.0 % 101.0) / 50.0 - 1.0;
            match x as i64 {
                2 => 0.6,
                1 | 3 => 0.55,
                _ => 0.5 * u,
            }
        };
        assert_eq!(peak(&sampled(noise), 10), None);
        // The highest sample on the edge of the range.
        assert_eq!(peak(&sampled(|x| 1.0 + 0.01 * x), 10), None);
    }

    #[test]
    fn running_mean_skips_masked_values() {
        let values = [1.0, 100.0, 3.0, 5.0];
        let good = [true, false, true, true];
        let mut out = [0.0; 4];
        running_mean(&values, &good, 1, &mut Vec::new(), &mut out);
        assert_eq!(out, [1.0, 2.0, 4.0, 4.0]);
    }
}

//! The Gauss-Hermite line-of-sight velocity distribution (LOSVD) and its analytic Fourier
//! transform (Cappellari 2017, eq. 38), plus the FFT convolution engine that applies it to
//! log-rebinned templates, averages oversampled template pixels and decimates to the galaxy grid
//! in Fourier space (exact: the fold of the spectrum is the DFT of the decimated sequence).

#![allow(clippy::needless_range_loop)] // numeric kernels index several arrays in lockstep

use std::f64::consts::PI;
use std::sync::Arc;

use realfft::num_complex::Complex64;
use realfft::{ComplexToReal, RealFftPlanner, RealToComplex};

/// Most Gauss-Hermite terms beyond the Gaussian: h3..h6.
pub const MAX_HERMITE: usize = 4;

/// Gauss-Hermite LOSVD in sample units: centre `v`, dispersion `sigma`, `h[0..nh]` = h3, h4, ...
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GaussHermite {
    pub v: f64,
    pub sigma: f64,
    pub h: [f64; MAX_HERMITE],
    pub nh: usize,
}

impl GaussHermite {
    pub fn gaussian(v: f64, sigma: f64) -> Self {
        GaussHermite {
            v,
            sigma,
            h: [0.0; MAX_HERMITE],
            nh: 0,
        }
    }

    /// The LOSVD in real space at position `x` (van der Marel & Franx 1993 normalisation).
    pub fn eval(&self, x: f64) -> f64 {
        let y = (x - self.v) / self.sigma;
        let g = (-0.5 * y * y).exp() / (self.sigma * (2.0 * PI).sqrt());
        let herm = hermite_values(y);
        let mut series = 1.0;
        for (n, h) in self.h[..self.nh].iter().enumerate() {
            series += h * herm[n + 3] / hermite_norm(n + 3);
        }
        g * series
    }

    /// Analytic Fourier transform at angular frequency `omega` (radians per sample), with the
    /// convention F(w) = sum_x f(x) exp(-i w x): exp(-i w v - (w s)^2/2) (1 + sum (-i)^n h_n H_n(w s)/sqrt(n! 2^n)).
    pub fn fourier(&self, omega: f64) -> Complex64 {
        self.fourier_from_gaussian(omega, self.gaussian_fourier(omega))
    }

    /// The transform of the Gaussian part alone: exp(-i w v - (w s)^2/2).
    fn gaussian_fourier(&self, omega: f64) -> Complex64 {
        let w = omega * self.sigma;
        Complex64::from_polar((-0.5 * w * w).exp(), -omega * self.v)
    }

    /// [`Self::fourier`] given the Gaussian part `base` at `omega`.
    fn fourier_from_gaussian(&self, omega: f64, base: Complex64) -> Complex64 {
        if self.nh == 0 {
            return base;
        }
        let herm = hermite_values(omega * self.sigma);
        let mut poly = Complex64::new(1.0, 0.0);
        for (n, h) in self.h[..self.nh].iter().enumerate() {
            poly += minus_i_pow(n + 3) * (h * herm[n + 3] / hermite_norm(n + 3));
        }
        base * poly
    }

    /// The transform and its derivatives with respect to v, sigma and each h, written into
    /// `out[0]` (value), `out[1]` (d/dv), `out[2]` (d/dsigma), `out[3..3+nh]` (d/dh).
    pub fn fourier_with_derivatives(&self, omega: f64, out: &mut [Complex64]) {
        self.fourier_with_derivatives_from_gaussian(omega, self.gaussian_fourier(omega), out);
    }

    /// [`Self::fourier_with_derivatives`] given the Gaussian part `base` at `omega`.
    fn fourier_with_derivatives_from_gaussian(
        &self,
        omega: f64,
        base: Complex64,
        out: &mut [Complex64],
    ) {
        let w = omega * self.sigma;
        let herm = hermite_values(w);
        let mut poly = Complex64::new(1.0, 0.0);
        let mut dpoly = Complex64::new(0.0, 0.0);
        for (k, h) in self.h[..self.nh].iter().enumerate() {
            let n = k + 3;
            let c = minus_i_pow(n) * (h / hermite_norm(n));
            poly += c * herm[n];
            dpoly += c * (2.0 * n as f64 * herm[n - 1]);
        }
        let value = base * poly;
        out[0] = value;
        out[1] = value * Complex64::new(0.0, -omega);
        out[2] = base * (dpoly - poly * w) * omega;
        for k in 0..self.nh {
            out[3 + k] = base * minus_i_pow(k + 3) * (herm[k + 3] / hermite_norm(k + 3));
        }
    }
}

/// Physicists' Hermite polynomials H_0..H_6 at x.
fn hermite_values(x: f64) -> [f64; 7] {
    let mut h = [0.0; 7];
    h[0] = 1.0;
    h[1] = 2.0 * x;
    for n in 1..6 {
        h[n + 1] = 2.0 * x * h[n] - 2.0 * n as f64 * h[n - 1];
    }
    h
}

fn hermite_norm(n: usize) -> f64 {
    let factorial: f64 = (1..=n).map(|k| k as f64).product();
    (factorial * 2f64.powi(n as i32)).sqrt()
}

fn minus_i_pow(n: usize) -> Complex64 {
    match n % 4 {
        0 => Complex64::new(1.0, 0.0),
        1 => Complex64::new(0.0, -1.0),
        2 => Complex64::new(-1.0, 0.0),
        _ => Complex64::new(0.0, 1.0),
    }
}

/// The Gaussian part of the LOSVD transform, exp(-i w v - (w s)^2/2), at w = k dw for
/// k = 0, 1, 2, ...: two multiplicative recurrences (a fixed rotation, and a ratio that itself
/// shrinks by a fixed factor) instead of an exp and a sincos per bin. Recomputed exactly every
/// `ANCHOR` bins, so rounding grows over at most that many products (about 1e-14 relative).
struct GaussianPhasors<'a> {
    losvd: &'a GaussHermite,
    dw: f64,
    k: usize,
    value: Complex64,
    ratio: f64,
    ratio_step: f64,
    rotation: Complex64,
}

impl<'a> GaussianPhasors<'a> {
    const ANCHOR: usize = 64;

    fn new(losvd: &'a GaussHermite, dw: f64) -> Self {
        let ds = dw * losvd.sigma;
        GaussianPhasors {
            losvd,
            dw,
            k: 0,
            value: Complex64::new(0.0, 0.0),
            ratio: 0.0,
            ratio_step: (-ds * ds).exp(),
            rotation: Complex64::from_polar(1.0, -dw * losvd.v),
        }
    }
}

impl Iterator for GaussianPhasors<'_> {
    type Item = Complex64;

    fn next(&mut self) -> Option<Complex64> {
        let k = self.k;
        if k.is_multiple_of(Self::ANCHOR) {
            self.value = self.losvd.gaussian_fourier(k as f64 * self.dw);
            // g(k+1) / g(k) = exp(-(dw s)^2 (2k + 1) / 2).
            let ds = self.dw * self.losvd.sigma;
            self.ratio = (-0.5 * ds * ds * (2 * k + 1) as f64).exp();
        } else {
            self.value *= self.rotation * self.ratio;
            self.ratio *= self.ratio_step;
        }
        self.k += 1;
        Some(self.value)
    }
}

/// Smallest size >= `n` that is a multiple of `factor` and has only factors 2, 3, 5.
pub fn fast_fft_len(n: usize, factor: usize) -> usize {
    let mut m = n.div_ceil(factor) * factor;
    loop {
        let mut r = m;
        for p in [2, 3, 5] {
            while r.is_multiple_of(p) {
                r /= p;
            }
        }
        if r == 1 && m.is_multiple_of(2) {
            return m;
        }
        m += factor;
    }
}

/// FFT plans and fixed kernels for convolving templates of one library with a LOSVD and
/// resampling to the galaxy grid. Immutable and shared across threads.
#[derive(Clone)]
pub struct Convolver {
    n_fft: usize,
    factor: usize,
    n_dec: usize,
    forward: Arc<dyn RealToComplex<f64>>,
    inverse: Arc<dyn ComplexToReal<f64>>,
    /// Plans of the adjoint: forward on the galaxy grid, inverse on the template grid.
    forward_dec: Arc<dyn RealToComplex<f64>>,
    inverse_full: Arc<dyn ComplexToReal<f64>>,
    /// Pixel-averaging box filter times the shift from template pixel 0 to galaxy pixel 0.
    fixed: Vec<Complex64>,
}

impl std::fmt::Debug for Convolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Convolver")
            .field("n_fft", &self.n_fft)
            .field("factor", &self.factor)
            .finish()
    }
}

/// Reusable buffers of one thread for [`Convolver::apply`].
#[derive(Debug, Clone)]
pub struct ConvolveScratch {
    dec: Vec<Complex64>,
    real: Vec<f64>,
    fft: Vec<Complex64>,
    adj_in: Vec<f64>,
    adj_bins: Vec<Complex64>,
    adj_full: Vec<Complex64>,
    adj_fft: Vec<Complex64>,
}

impl Convolver {
    /// `n_fft`: FFT length in template samples (a multiple of `factor`); `offset`: position, in
    /// template samples, of the first template sample block that lines up with galaxy pixel 0
    /// (galaxy pixel i is the mean of template samples offset + i*factor + 0..factor).
    pub fn new(n_fft: usize, factor: usize, offset: f64) -> Self {
        assert!(factor >= 1 && n_fft.is_multiple_of(2 * factor));
        let mut planner = RealFftPlanner::<f64>::new();
        let forward = planner.plan_fft_forward(n_fft);
        let n_dec = n_fft / factor;
        let inverse = planner.plan_fft_inverse(n_dec);
        let forward_dec = planner.plan_fft_forward(n_dec);
        let inverse_full = planner.plan_fft_inverse(n_fft);
        let fixed = (0..=n_fft / 2)
            .map(|k| {
                let omega = 2.0 * PI * k as f64 / n_fft as f64;
                let boxcar: Complex64 = (0..factor)
                    .map(|m| Complex64::from_polar(1.0, omega * m as f64))
                    .sum::<Complex64>()
                    / factor as f64;
                Complex64::from_polar(1.0, omega * offset) * boxcar
            })
            .collect();
        Convolver {
            n_fft,
            factor,
            n_dec,
            forward,
            inverse,
            forward_dec,
            inverse_full,
            fixed,
        }
    }

    pub fn n_fft(&self) -> usize {
        self.n_fft
    }

    /// Number of complex bins of a template spectrum.
    pub fn n_bins(&self) -> usize {
        self.n_fft / 2 + 1
    }

    /// Length of the decimated (galaxy-grid) output before cropping.
    pub fn n_out(&self) -> usize {
        self.n_dec
    }

    pub fn scratch(&self) -> ConvolveScratch {
        ConvolveScratch {
            dec: vec![Complex64::new(0.0, 0.0); self.n_dec / 2 + 1],
            real: vec![0.0; self.n_dec],
            fft: self.inverse.make_scratch_vec(),
            adj_in: vec![0.0; self.n_dec],
            adj_bins: self.forward_dec.make_output_vec(),
            adj_full: self.inverse_full.make_input_vec(),
            adj_fft: {
                let a = self.forward_dec.get_scratch_len();
                let b = self.inverse_full.get_scratch_len();
                vec![Complex64::new(0.0, 0.0); a.max(b)]
            },
        }
    }

    /// Real FFT of a template zero-padded to the FFT length.
    pub fn spectrum_of(&self, samples: &[f64]) -> Vec<Complex64> {
        let mut input = vec![0.0; self.n_fft];
        let n = samples.len().min(self.n_fft);
        input[..n].copy_from_slice(&samples[..n]);
        let mut out = self.forward.make_output_vec();
        self.forward
            .process(&mut input, &mut out)
            .expect("buffer sizes come from the plan");
        out
    }

    /// Angular frequency of bin k, in radians per template sample.
    pub fn omega(&self, k: usize) -> f64 {
        2.0 * PI * k as f64 / self.n_fft as f64
    }

    /// Fill `kernel[..n_bins]` with the LOSVD transform times the fixed box/shift filter and
    /// return the number of bins that are not negligible.
    pub fn losvd_kernel(&self, losvd: &GaussHermite, kernel: &mut [Complex64]) -> usize {
        let used = self.significant_bins(losvd.sigma);
        let phasors = GaussianPhasors::new(losvd, self.omega(1));
        for (k, (slot, base)) in kernel.iter_mut().zip(phasors).enumerate().take(used) {
            *slot = losvd.fourier_from_gaussian(self.omega(k), base) * self.fixed[k];
        }
        used
    }

    /// Like [`Self::losvd_kernel`] but also writes the derivative kernels:
    /// `derivs[p][k]` for p = v, sigma, h3...
    pub fn losvd_kernel_with_derivatives(
        &self,
        losvd: &GaussHermite,
        kernel: &mut [Complex64],
        derivs: &mut [Vec<Complex64>],
    ) -> usize {
        let used = self.significant_bins(losvd.sigma);
        let mut vals = [Complex64::new(0.0, 0.0); 3 + MAX_HERMITE];
        let npar = 2 + losvd.nh;
        let mut phasors = GaussianPhasors::new(losvd, self.omega(1));
        for k in 0..used {
            let base = phasors.next().unwrap_or_default();
            losvd.fourier_with_derivatives_from_gaussian(self.omega(k), base, &mut vals);
            let fixed = self.fixed[k];
            kernel[k] = vals[0] * fixed;
            for p in 0..npar {
                derivs[p][k] = vals[1 + p] * fixed;
            }
        }
        used
    }

    /// Bins beyond which exp(-(w sigma)^2/2) < 1e-15 (the Hermite factor cannot rescue that).
    fn significant_bins(&self, sigma: f64) -> usize {
        let half = self.n_fft / 2 + 1;
        if sigma <= 0.0 {
            return half;
        }
        let omega_cut = (2.0 * 36.0f64).sqrt() / sigma;
        let k = (omega_cut * self.n_fft as f64 / (2.0 * PI)).ceil() as usize + 1;
        k.min(half)
    }

    /// Multiply `spectrum` by `kernel` on the first `used` bins, fold to the decimated grid,
    /// inverse-transform and write the first `out.len()` galaxy pixels.
    pub fn apply(
        &self,
        spectrum: &[Complex64],
        kernel: &[Complex64],
        used: usize,
        out: &mut [f64],
        scratch: &mut ConvolveScratch,
    ) {
        let half_dec = self.n_dec / 2;
        let n = self.n_fft;
        let dec = &mut scratch.dec;
        dec.fill(Complex64::new(0.0, 0.0));
        // Bins q < used are non-zero; their mirrors N - q fold onto dec bins too.
        for q in 0..used {
            let z = spectrum[q] * kernel[q];
            let k = q % self.n_dec;
            if k <= half_dec {
                dec[k] += z;
            }
            if q > 0 && q < n - q {
                let k2 = (n - q) % self.n_dec;
                if k2 <= half_dec {
                    dec[k2] += z.conj();
                }
            }
        }
        dec[0].im = 0.0;
        dec[half_dec].im = 0.0;
        self.inverse
            .process_with_scratch(dec, &mut scratch.real, &mut scratch.fft)
            .expect("buffer sizes come from the plan");
        // Unnormalised inverse of length n_dec, and the 1/factor of the fold.
        let scale = 1.0 / (self.n_dec * self.factor) as f64;
        for (o, r) in out.iter_mut().zip(&scratch.real) {
            *o = r * scale;
        }
    }
}

impl Convolver {
    /// The adjoint (transpose) of [`Self::apply`] for the same kernel: maps galaxy pixels `u`
    /// (the first `u.len()` of the decimated grid) to template samples `out` (length n_fft),
    /// so that <apply(t), u> = <t, adjoint(u)>. One forward FFT on the galaxy grid and one
    /// inverse FFT on the template grid give the correlation of every template with `u` by
    /// a dot product each, instead of one convolution per template.
    pub fn adjoint(
        &self,
        u: &[f64],
        kernel: &[Complex64],
        used: usize,
        out: &mut [f64],
        scratch: &mut ConvolveScratch,
    ) {
        let s = scratch;
        self.adjoint_bins(u, kernel, used, s);
        s.adj_full[used..].fill(Complex64::new(0.0, 0.0));
        self.inverse_full
            .process_with_scratch(&mut s.adj_full, out, &mut s.adj_fft)
            .expect("buffer sizes come from the plan");
        let scale = 1.0 / self.n_fft as f64;
        for o in out.iter_mut() {
            *o *= scale;
        }
    }

    /// The adjoint left in the Fourier domain, as weights that price templates without an
    /// inverse transform: for every template `t` and its spectrum `T = spectrum_of(t)`,
    /// `<t, adjoint(u)>` equals the dot product of `T`'s first `used` bins, read as
    /// (re, im) pairs, with `out[..2 used]` (Parseval). Only the bins the kernel reaches
    /// count, so a broad LOSVD prices in fewer numbers than the template has samples.
    /// Returns `2 used`.
    pub fn adjoint_weights(
        &self,
        u: &[f64],
        kernel: &[Complex64],
        used: usize,
        out: &mut [f64],
        scratch: &mut ConvolveScratch,
    ) -> usize {
        self.adjoint_bins(u, kernel, used, scratch);
        let scale = 1.0 / self.n_fft as f64;
        for (k, (pair, a)) in out
            .chunks_exact_mut(2)
            .zip(&scratch.adj_full[..used])
            .enumerate()
        {
            // Bins 0 and n/2 are their own mirrors (real); every other bin stands for two.
            let (w, im) = if k == 0 || 2 * k == self.n_fft {
                (scale, 0.0)
            } else {
                (2.0 * scale, a.im)
            };
            pair[0] = w * a.re;
            pair[1] = w * im;
        }
        2 * used
    }

    /// `adj_full[..used]`: the spectrum of the adjoint of `apply` applied to `u`.
    fn adjoint_bins(&self, u: &[f64], kernel: &[Complex64], used: usize, s: &mut ConvolveScratch) {
        s.adj_in.fill(0.0);
        s.adj_in[..u.len()].copy_from_slice(u);
        self.forward_dec
            .process_with_scratch(&mut s.adj_in, &mut s.adj_bins, &mut s.adj_fft)
            .expect("buffer sizes come from the plan");
        // Upsampling by zeros repeats the decimated spectrum periodically.
        let m = self.n_dec;
        for k in 0..used {
            let idx = k % m;
            let v = if idx <= m / 2 {
                s.adj_bins[idx]
            } else {
                s.adj_bins[m - idx].conj()
            };
            s.adj_full[k] = kernel[k].conj() * v;
        }
        s.adj_full[0].im = 0.0;
        let last = s.adj_full.len() - 1;
        if used > last {
            s.adj_full[last].im = 0.0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Direct convolution on a fine sub-grid, then the same averaging/decimation.
    fn direct(
        template: &[f64],
        losvd: &GaussHermite,
        offset: f64,
        factor: usize,
        npix: usize,
    ) -> Vec<f64> {
        // Sample the kernel finely: integrate L over each template sample by sub-sampling.
        let sub = 16;
        let reach = (losvd.v.abs() + 12.0 * losvd.sigma + offset.abs()) as i64 + 2;
        (0..npix)
            .map(|i| {
                let mut acc = 0.0;
                for m in 0..factor {
                    let x = offset + (i * factor + m) as f64;
                    let mut y = 0.0;
                    for (j, t) in template.iter().enumerate() {
                        let d = x - j as f64;
                        if (d - losvd.v).abs() > reach as f64 {
                            continue;
                        }
                        // Average of L over [d-0.5, d+0.5) approximates a band-limited sample.
                        let mut l = 0.0;
                        for s in 0..sub {
                            l += losvd.eval(d - 0.5 + (s as f64 + 0.5) / sub as f64);
                        }
                        y += t * l / sub as f64;
                    }
                    acc += y;
                }
                acc / factor as f64
            })
            .collect()
    }

    fn smooth_template(len: usize, seed: u64) -> Vec<f64> {
        (0..len)
            .map(|j| {
                let x = j as f64 + seed as f64;
                1.0 + 0.3 * (x / 17.0).sin() + 0.2 * (x / 7.3).cos() + 0.1 * (x / 3.1).sin()
            })
            .collect()
    }

    fn fft_convolve(
        template: &[f64],
        losvd: &GaussHermite,
        offset: f64,
        factor: usize,
        npix: usize,
    ) -> Vec<f64> {
        let n_fft = fast_fft_len(template.len() + 64, 2 * factor);
        let conv = Convolver::new(n_fft, factor, offset);
        let spec = conv.spectrum_of(template);
        let mut kernel = vec![Complex64::new(0.0, 0.0); conv.n_bins()];
        let used = conv.losvd_kernel(losvd, &mut kernel);
        let mut out = vec![0.0; npix];
        conv.apply(&spec, &kernel, used, &mut out, &mut conv.scratch());
        out
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]

        #[test]
        fn matches_direct_convolution(v in -6.0f64..6.0, sigma in 2.5f64..6.0, h3 in -0.15f64..0.15,
                                      h4 in -0.15f64..0.15, factor in 1usize..4, seed in 0u64..100) {
            let template = smooth_template(240, seed);
            let mut losvd = GaussHermite::gaussian(v, sigma);
            losvd.h[0] = h3;
            losvd.h[1] = h4;
            losvd.nh = 2;
            let offset = 60.0;
            let npix = (240 - 120) / factor;
            let a = fft_convolve(&template, &losvd, offset, factor, npix);
            let b = direct(&template, &losvd, offset, factor, npix);
            for (x, y) in a.iter().zip(&b) {
                // Sub-pixel averaging of the direct kernel differs from band-limiting by O(1/(24 s^2)).
                prop_assert!((x - y).abs() < 2e-3 * y.abs().max(1.0), "{x} vs {y}");
            }
        }

        #[test]
        fn conserves_flux(v in -3.0f64..3.0, sigma in 0.05f64..8.0, h3 in -0.3f64..0.3) {
            // Periodic template: the circular convolution keeps the total exactly.
            let n = 256;
            let template: Vec<f64> = (0..n).map(|j| 2.0 + (2.0 * PI * 3.0 * j as f64 / n as f64).sin()).collect();
            let mut losvd = GaussHermite::gaussian(v, sigma);
            losvd.h[0] = h3;
            losvd.nh = 1;
            let conv = Convolver::new(n, 1, 0.0);
            let spec = conv.spectrum_of(&template);
            let mut kernel = vec![Complex64::new(0.0, 0.0); conv.n_bins()];
            let used = conv.losvd_kernel(&losvd, &mut kernel);
            let mut out = vec![0.0; n];
            conv.apply(&spec, &kernel, used, &mut out, &mut conv.scratch());
            let before: f64 = template.iter().sum();
            let after: f64 = out.iter().sum();
            prop_assert!((before - after).abs() < 1e-9 * before);
        }

        #[test]
        fn zero_hermite_terms_are_a_gaussian(v in -5.0f64..5.0, sigma in 0.1f64..20.0, omega in 0.0f64..3.1) {
            let mut gh = GaussHermite::gaussian(v, sigma);
            gh.nh = 4;
            let got = gh.fourier(omega);
            let want = Complex64::from_polar((-0.5 * (omega * sigma).powi(2)).exp(), -omega * v);
            prop_assert!((got - want).norm() < 1e-14);
        }

        #[test]
        fn derivatives_match_finite_differences(v in -5.0f64..5.0, sigma in 0.5f64..5.0,
                                                h3 in -0.2f64..0.2, h4 in -0.2f64..0.2, omega in 0.0f64..2.0) {
            let mut gh = GaussHermite::gaussian(v, sigma);
            gh.h[0] = h3;
            gh.h[1] = h4;
            gh.nh = 2;
            let mut d = [Complex64::new(0.0, 0.0); 3 + MAX_HERMITE];
            gh.fourier_with_derivatives(omega, &mut d);
            let eps = 1e-6;
            let fd = |f: &dyn Fn(&mut GaussHermite)| {
                let mut a = gh;
                f(&mut a);
                (a.fourier(omega) - gh.fourier(omega)) / eps
            };
            let dv = fd(&|g| g.v += eps);
            let ds = fd(&|g| g.sigma += eps);
            let dh3 = fd(&|g| g.h[0] += eps);
            let dh4 = fd(&|g| g.h[1] += eps);
            for (a, b) in [(d[1], dv), (d[2], ds), (d[3], dh3), (d[4], dh4)] {
                prop_assert!((a - b).norm() < 1e-4 * (1.0 + b.norm()), "{a} vs {b}");
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(16))]

        /// <L t, u> = <t, L^T u> for the convolve-average-decimate operator.
        #[test]
        fn adjoint_is_the_transpose_and_prices_on_spectra(v in -20.0f64..20.0, sigma in 0.3f64..9.0, factor in 1usize..4,
                                    offset in 0.0f64..40.0, seed in 0u64..1000) {
            let n_fft = fast_fft_len(400, 2 * factor);
            let conv = Convolver::new(n_fft, factor, offset);
            let mut losvd = GaussHermite::gaussian(v, sigma);
            losvd.h[0] = 0.1;
            losvd.nh = 1;
            let mut kernel = vec![Complex64::new(0.0, 0.0); conv.n_bins()];
            let used = conv.losvd_kernel(&losvd, &mut kernel);
            let t: Vec<f64> = (0..350).map(|j| ((j as u64 * 7919 + seed) % 101) as f64 / 50.0 - 1.0).collect();
            let npix = 300 / factor;
            let u: Vec<f64> = (0..npix).map(|i| ((i as u64 * 104_729 + seed) % 97) as f64 / 48.0 - 1.0).collect();
            let mut scratch = conv.scratch();
            let mut lt = vec![0.0; npix];
            conv.apply(&conv.spectrum_of(&t), &kernel, used, &mut lt, &mut scratch);
            let mut ltu = vec![0.0; n_fft];
            conv.adjoint(&u, &kernel, used, &mut ltu, &mut scratch);
            let lhs: f64 = lt.iter().zip(&u).map(|(a, b)| a * b).sum();
            let rhs: f64 = t.iter().zip(&ltu).map(|(a, b)| a * b).sum();
            prop_assert!((lhs - rhs).abs() < 1e-9 * (1.0 + lhs.abs()), "{lhs} vs {rhs}");
            // The same correlation priced on the template's spectrum (Parseval).
            let mut weights = vec![0.0; 2 * conv.n_bins()];
            let len = conv.adjoint_weights(&u, &kernel, used, &mut weights, &mut scratch);
            let spectrum = conv.spectrum_of(&t);
            let pairs: &[f64] = bytemuck::cast_slice(&spectrum);
            let priced: f64 = pairs[..len].iter().zip(&weights).map(|(a, b)| a * b).sum();
            prop_assert!((priced - rhs).abs() < 1e-9 * (1.0 + rhs.abs()), "{priced} vs {rhs}");
        }

        /// The recurrences of the kernel agree with the closed form at every bin, including
        /// sub-pixel and very broad LOSVDs and large shifts.
        #[test]
        fn kernel_recurrence_matches_closed_form(v in -300.0f64..300.0, sigma in 0.01f64..40.0,
                                                 nh in 0usize..=4, n in 100usize..9000) {
            let n_fft = fast_fft_len(n, 2);
            let conv = Convolver::new(n_fft, 1, 3.5);
            let mut losvd = GaussHermite::gaussian(v, sigma);
            losvd.h = [0.1, -0.05, 0.03, 0.02];
            losvd.nh = nh;
            let mut kernel = vec![Complex64::new(0.0, 0.0); conv.n_bins()];
            let mut derivs = vec![vec![Complex64::new(0.0, 0.0); conv.n_bins()]; 2 + nh];
            let used = conv.losvd_kernel(&losvd, &mut kernel);
            let mut with_derivs = vec![Complex64::new(0.0, 0.0); conv.n_bins()];
            conv.losvd_kernel_with_derivatives(&losvd, &mut with_derivs, &mut derivs);
            let mut vals = [Complex64::new(0.0, 0.0); 3 + MAX_HERMITE];
            for k in 0..used {
                let omega = conv.omega(k);
                let exact = losvd.fourier(omega) * conv.fixed[k];
                prop_assert!((kernel[k] - exact).norm() < 1e-12, "bin {k}: {} vs {exact}", kernel[k]);
                prop_assert!((with_derivs[k] - exact).norm() < 1e-12, "bin {k}");
                losvd.fourier_with_derivatives(omega, &mut vals);
                for p in 0..2 + nh {
                    let d = vals[1 + p] * conv.fixed[k];
                    prop_assert!((derivs[p][k] - d).norm() < 1e-12 * (1.0 + d.norm()), "bin {k} derivative {p}");
                }
            }
        }
    }

    #[test]
    fn transform_of_real_space_losvd_matches_analytic() {
        let mut gh = GaussHermite::gaussian(1.3, 2.2);
        gh.h = [0.1, -0.07, 0.05, 0.03];
        gh.nh = 4;
        for omega in [0.0, 0.3, 0.9, 1.7] {
            let mut acc = Complex64::new(0.0, 0.0);
            let dx = 0.01;
            let mut x = -40.0;
            while x < 40.0 {
                acc += gh.eval(x) * Complex64::from_polar(dx, -omega * x);
                x += dx;
            }
            assert!(
                (acc - gh.fourier(omega)).norm() < 1e-6,
                "omega {omega}: {acc} vs {}",
                gh.fourier(omega)
            );
        }
    }

    #[test]
    fn fast_lengths_are_smooth_multiples() {
        assert_eq!(fast_fft_len(1000, 4), 1000);
        assert_eq!(fast_fft_len(1001, 4), 1024);
        assert_eq!(fast_fft_len(7, 1), 8);
    }
}

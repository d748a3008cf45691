//! Penalised pixel fitting (Cappellari & Emsellem 2004; Cappellari 2017): the model is
//! (sum_j w_j T_j * LOSVD) x (1 + multiplicative Legendre) + additive Legendre, w_j >= 0.
//!
//! The non-linear parameters (V, sigma, h3..h6, multiplicative coefficients) are found by a
//! bounded Levenberg-Marquardt on the variable-projection residual: at every trial point the
//! linear weights are solved by NNLS, and the Jacobian is analytic (derivatives of the LOSVD
//! Fourier transform, projected off the active linear columns, Kaufman 1975).
//!
//! Speed comes from a [`Fitter`] built once per template library and galaxy grid: template
//! FFTs precomputed, optionally compressed to an orthonormal basis (the k basis vectors are
//! convolved instead of the n templates; NNLS still constrains the n template weights through a
//! k x n mixing matrix), and all buffers reused from a [`FitScratch`] per thread.

#![allow(clippy::needless_range_loop)] // numeric kernels index several arrays in lockstep

use realfft::num_complex::Complex64;

use crate::error::FitError;
use crate::gas::{GasComponent, GasLineFlux, GasResult, GasTemplates};
use crate::linalg::{axpy, dot, gram, spd_inverse, symmetric_eigen};
use crate::losvd::{ConvolveScratch, Convolver, GaussHermite, MAX_HERMITE, fast_fft_len};
use crate::nnls::{NnlsSolver, NormalMatrix};
use crate::stats::{inverse_normal_cdf, robust_sigma};
use crate::templates::{C_KMS, PreparedTemplates};

/// How templates enter the convolution.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum TemplateBasis {
    /// Convolve every template (the reference computation).
    Exact,
    /// Convolve an orthonormal basis that reproduces every template to `tolerance` (relative
    /// RMS over the fitted range), then map back to template weights.
    Compressed { tolerance: f64 },
}

/// Settings of a fit, shared by all spectra of a [`Fitter`].
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct FitConfig {
    /// Gauss-Hermite moments: 2 (V, sigma), 4 (+h3, h4) or 6 (+h5, h6).
    pub moments: usize,
    /// Additive Legendre degree; negative for none.
    pub degree: i32,
    /// Multiplicative Legendre degree; 0 for none.
    pub mdegree: usize,
    /// Penalty on h3..h6 (Cappellari & Emsellem 2004, eq. 9); None: 0.7 sqrt(500/n_good).
    pub bias: Option<f64>,
    /// Iterative sigma clipping of outliers (pPXF's `clean`).
    pub clean: bool,
    /// Linear regularisation strength over the age x [M/H] grid (pPXF's `regul`); 0 for none.
    pub regul: f64,
    /// Fit the stellar attenuation A_V (mag) of the Calzetti (2000) curve from this start
    /// (pPXF's `reddening`); None: no dust. Excludes the multiplicative polynomial, as in pPXF.
    #[serde(default)]
    pub reddening: Option<f64>,
    pub basis: TemplateBasis,
    /// |V| bound in km/s around the systemic velocity.
    pub max_velocity: f64,
    /// Upper bound of sigma in km/s.
    pub max_sigma: f64,
    pub max_iterations: usize,
}

impl Default for FitConfig {
    fn default() -> Self {
        FitConfig {
            moments: 2,
            degree: 4,
            mdegree: 0,
            bias: None,
            clean: false,
            regul: 0.0,
            reddening: None,
            basis: TemplateBasis::Exact,
            max_velocity: 2000.0,
            max_sigma: 1000.0,
            max_iterations: 60,
        }
    }
}

/// The galaxy's rest-frame logarithmic wavelength grid.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct LogGrid {
    /// ln(lambda/A) at the centre of pixel 0, de-redshifted by the systemic redshift.
    pub ln_lam0: f64,
    /// Pixel width in km/s (c * d ln lambda).
    pub velscale: f64,
    pub npix: usize,
}

impl LogGrid {
    pub fn lam(&self, i: usize) -> f64 {
        (self.ln_lam0 + i as f64 * self.velscale / C_KMS).exp()
    }
}

/// One spectrum on a [`LogGrid`]: flux, 1-sigma noise and the pixels to use.
#[derive(Debug, Clone, PartialEq)]
pub struct Spectrum {
    pub flux: Vec<f64>,
    pub noise: Vec<f64>,
    pub good: Vec<bool>,
}

impl Spectrum {
    /// From inverse variances: every good pixel must have a positive, finite ivar.
    pub fn from_ivar(flux: Vec<f64>, ivar: &[f64], good: Vec<bool>) -> Result<Self, FitError> {
        if ivar.len() != flux.len() {
            return Err(FitError::LengthMismatch {
                flux: flux.len(),
                other: ivar.len(),
                what: "ivar",
            });
        }
        let mut noise = Vec::with_capacity(ivar.len());
        for (i, &v) in ivar.iter().enumerate() {
            if good.get(i).copied().unwrap_or(false) && !(v > 0.0 && v.is_finite()) {
                return Err(FitError::BadIvar { pixel: i, value: v });
            }
            noise.push(if v > 0.0 { 1.0 / v.sqrt() } else { 1.0 });
        }
        Ok(Spectrum { flux, noise, good })
    }

    fn validate(&self, npix: usize) -> Result<usize, FitError> {
        for (len, what) in [(self.noise.len(), "noise"), (self.good.len(), "mask")] {
            if len != self.flux.len() {
                return Err(FitError::LengthMismatch {
                    flux: self.flux.len(),
                    other: len,
                    what,
                });
            }
        }
        if self.flux.len() != npix {
            return Err(FitError::LengthMismatch {
                flux: self.flux.len(),
                other: npix,
                what: "grid",
            });
        }
        let mut n_good = 0;
        for i in 0..npix {
            if !self.good[i] {
                continue;
            }
            if !self.flux[i].is_finite() {
                return Err(FitError::NonFiniteFlux { pixel: i });
            }
            let s = self.noise[i];
            if !(s > 0.0 && s.is_finite()) {
                return Err(FitError::BadNoise { pixel: i, value: s });
            }
            n_good += 1;
        }
        if n_good == 0 {
            return Err(FitError::NoGoodPixels);
        }
        Ok(n_good)
    }
}

/// Starting guess: V and sigma in km/s, optional h3..h6.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Start {
    pub v: f64,
    pub sigma: f64,
    pub h: [f64; MAX_HERMITE],
}

impl Start {
    pub fn new(v: f64, sigma: f64) -> Self {
        Start {
            v,
            sigma,
            h: [0.0; MAX_HERMITE],
        }
    }
}

/// Everything a fit returns.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct FitResult {
    /// V relative to the systemic redshift of the grid, km/s.
    pub v: f64,
    pub sigma: f64,
    /// h3, h4, ... (moments - 2 values).
    pub h: Vec<f64>,
    /// Formal 1-sigma errors of (V, sigma, h3, ...) from the covariance matrix, not scaled
    /// by chi2 (as pPXF's `error`; multiply by sqrt(chi2) when chi2/DOF differs from 1).
    pub errors: Vec<f64>,
    /// chi^2 per degree of freedom on the pixels used.
    pub chi2: f64,
    pub dof: usize,
    /// Template weights (of the normalised templates).
    pub weights: Vec<f64>,
    /// Additive Legendre coefficients.
    pub poly_weights: Vec<f64>,
    /// Multiplicative Legendre coefficients 1..mdegree (the constant is 1).
    pub mpoly_weights: Vec<f64>,
    /// Fitted stellar A_V (mag, Calzetti 2000) and its formal error, with `reddening`.
    pub reddening: Option<f64>,
    pub reddening_error: Option<f64>,
    pub bestfit: Vec<f64>,
    /// The pixels actually fitted (input mask after clipping).
    pub good: Vec<bool>,
    /// Model evaluations (each one convolution of the basis and one NNLS).
    pub evaluations: usize,
    /// Gas kinematics and line fluxes, when the fitter has gas templates.
    pub gas: Option<GasResult>,
}

/// Mixing matrix from basis vectors to templates: T_j = sum_a B_a C[a, j].
#[derive(Debug, Clone)]
enum Mix {
    Identity(usize),
    Dense { k: usize, n: usize, c: Vec<f64> },
}

impl Mix {
    fn basis_len(&self) -> usize {
        match self {
            Mix::Identity(n) => *n,
            Mix::Dense { k, .. } => *k,
        }
    }

    /// u = C w (templates -> basis)
    fn to_basis(&self, w: &[f64], u: &mut [f64]) {
        match self {
            Mix::Identity(_) => u.copy_from_slice(w),
            Mix::Dense { k, n, c } => {
                for a in 0..*k {
                    u[a] = c[a * n..(a + 1) * n]
                        .iter()
                        .zip(w)
                        .map(|(x, y)| x * y)
                        .sum();
                }
            }
        }
    }

    /// out = C^T v (basis -> templates)
    fn to_templates(&self, v: &[f64], out: &mut [f64]) {
        match self {
            Mix::Identity(_) => out.copy_from_slice(v),
            Mix::Dense { k, n, c } => {
                out.fill(0.0);
                for a in 0..*k {
                    let va = v[a];
                    for (o, x) in out.iter_mut().zip(&c[a * n..(a + 1) * n]) {
                        *o += va * x;
                    }
                }
            }
        }
    }
}

/// Normal matrix of [additive polynomials, templates] in factored form.
struct FactoredNormal<'a> {
    np: usize,
    nt: usize,
    k: usize,
    mix: &'a Mix,
    g_pp: &'a [f64],
    /// (np x nt): P^T W A
    g_pt: &'a [f64],
    /// (k x k): B^T W B
    g_bb: &'a [f64],
    /// (k x nt): G_bb C
    gc: &'a [f64],
    reg: Option<&'a [f64]>,
    tmp_u: std::cell::RefCell<(Vec<f64>, Vec<f64>)>,
}

impl NormalMatrix for FactoredNormal<'_> {
    fn dim(&self) -> usize {
        self.np + self.nt
    }

    fn entry(&self, i: usize, j: usize) -> f64 {
        let (np, nt) = (self.np, self.nt);
        match (i < np, j < np) {
            (true, true) => self.g_pp[i * np + j],
            (true, false) => self.g_pt[i * nt + j - np],
            (false, true) => self.g_pt[j * nt + i - np],
            (false, false) => {
                let (ti, tj) = (i - np, j - np);
                let base = match self.mix {
                    Mix::Identity(_) => self.gc[ti * nt + tj],
                    Mix::Dense { k, n, c } => {
                        (0..*k).map(|a| c[a * n + ti] * self.gc[a * nt + tj]).sum()
                    }
                };
                base + self.reg.map_or(0.0, |r| r[ti * nt + tj])
            }
        }
    }

    fn mul(&self, x: &[f64], out: &mut [f64]) {
        let (np, nt, k) = (self.np, self.nt, self.k);
        let (xp, xt) = x.split_at(np);
        let (op, ot) = out.split_at_mut(np);
        for i in 0..np {
            op[i] = (0..np).map(|j| self.g_pp[i * np + j] * xp[j]).sum::<f64>()
                + self.g_pt[i * nt..(i + 1) * nt]
                    .iter()
                    .zip(xt)
                    .map(|(a, b)| a * b)
                    .sum::<f64>();
        }
        let mut tmp = self.tmp_u.borrow_mut();
        let (u, v) = &mut *tmp;
        self.mix.to_basis(xt, u);
        for a in 0..k {
            v[a] = (0..k).map(|b| self.g_bb[a * k + b] * u[b]).sum();
        }
        self.mix.to_templates(v, ot);
        for (j, o) in ot.iter_mut().enumerate() {
            *o += (0..np).map(|i| self.g_pt[i * nt + j] * xp[i]).sum::<f64>();
            if let Some(r) = self.reg {
                *o += r[j * nt..(j + 1) * nt]
                    .iter()
                    .zip(xt)
                    .map(|(a, b)| a * b)
                    .sum::<f64>();
            }
        }
    }
}

/// Mutable state of [`LazyExact`]: columns convolved on demand and cached Gram entries.
struct LazyCells<'a> {
    rhs: &'a mut [f64],
    cols: &'a mut [f64],
    wcols: &'a mut Vec<f64>,
    have: &'a mut [bool],
    gram: &'a mut [f64],
    g_pt: &'a mut [f64],
    weight: &'a [f64],
    conv: &'a mut ConvolveScratch,
    model: &'a mut Vec<f64>,
    adjoint_in: &'a mut [f64],
    pricing: &'a mut [f64],
    /// Gas-template products (nt x n_lines), NaN until needed.
    g_tg: &'a mut [f64],
}

/// Normal matrix of [additive polynomials, all templates] built lazily: a template column is
/// convolved only when NNLS needs its entries (passive set); products with Q go through the
/// adjoint of the convolution.
struct LazyExact<'a> {
    fitter: &'a Fitter,
    np: usize,
    nt: usize,
    npix: usize,
    used: usize,
    weight_sum: f64,
    g_pp: &'a [f64],
    wpoly: &'a [f64],
    wy: &'a [f64],
    good_idx: &'a [usize],
    kernel: &'a [Complex64],
    /// Templates held out (false) never enter: zero scale, no correlation computed.
    allowed: &'a [bool],
    /// Gas lines after the templates: weighted columns (n_lines x good pixels) and products.
    ngl: usize,
    wgas: &'a [f64],
    g_gg: &'a [f64],
    g_pg: &'a [f64],
    cells: std::cell::RefCell<LazyCells<'a>>,
}

impl LazyExact<'_> {
    fn ensure(&self, c: &mut LazyCells<'_>, j: usize) {
        if c.have[j] {
            return;
        }
        let (npix, ng) = (self.npix, self.good_idx.len());
        let col = &mut c.cols[j * npix..(j + 1) * npix];
        self.fitter
            .conv
            .apply(&self.fitter.basis[j], self.kernel, self.used, col, c.conv);
        for (g, &i) in self.good_idx.iter().enumerate() {
            c.wcols[j * ng + g] = col[i] * c.weight[i];
        }
        c.have[j] = true;
    }
}

impl NormalMatrix for LazyExact<'_> {
    fn dim(&self) -> usize {
        self.np + self.nt + self.ngl
    }

    fn entry(&self, i: usize, j: usize) -> f64 {
        let (np, nt, ng) = (self.np, self.nt, self.good_idx.len());
        if i < np && j < np {
            return self.g_pp[i * np + j];
        }
        let nb = np + nt;
        if i >= nb || j >= nb {
            let (g, o) = if i >= nb { (i - nb, j) } else { (j - nb, i) };
            let ngl = self.ngl;
            if o >= nb {
                return self.g_gg[g * ngl + o - nb];
            }
            if o < np {
                return self.g_pg[o * ngl + g];
            }
            let t = o - np;
            let mut c = self.cells.borrow_mut();
            if c.g_tg[t * ngl + g].is_nan() {
                self.ensure(&mut c, t);
                let v = dot(
                    &c.wcols[t * ng..(t + 1) * ng],
                    &self.wgas[g * ng..(g + 1) * ng],
                );
                c.g_tg[t * ngl + g] = v;
            }
            return c.g_tg[t * ngl + g];
        }
        let mut c = self.cells.borrow_mut();
        if i < np || j < np {
            let (l, t) = if i < np { (i, j - np) } else { (j, i - np) };
            if c.g_pt[l * nt + t].is_nan() {
                self.ensure(&mut c, t);
                let v = dot(
                    &self.wpoly[l * ng..(l + 1) * ng],
                    &c.wcols[t * ng..(t + 1) * ng],
                );
                c.g_pt[l * nt + t] = v;
            }
            return c.g_pt[l * nt + t];
        }
        let (ti, tj) = (i - np, j - np);
        if c.gram[ti * nt + tj].is_nan() {
            self.ensure(&mut c, ti);
            self.ensure(&mut c, tj);
            let v = dot(
                &c.wcols[ti * ng..(ti + 1) * ng],
                &c.wcols[tj * ng..(tj + 1) * ng],
            );
            c.gram[ti * nt + tj] = v;
            c.gram[tj * nt + ti] = v;
        }
        c.gram[ti * nt + tj] + self.fitter.reg.as_ref().map_or(0.0, |r| r[ti * nt + tj])
    }

    fn diagonal_hint(&self, i: usize) -> f64 {
        if i < self.np {
            self.g_pp[i * self.np + i]
        } else if i >= self.np + self.nt {
            let g = i - self.np - self.nt;
            self.g_gg[g * self.ngl + g]
        } else if self.allowed[i - self.np] {
            self.weight_sum * self.fitter.mean_square[i - self.np]
        } else {
            0.0
        }
    }

    fn rhs(&self, i: usize, b: &[f64]) -> f64 {
        if i < self.np || i >= self.np + self.nt {
            return b[i];
        }
        let j = i - self.np;
        let ng = self.good_idx.len();
        let mut c = self.cells.borrow_mut();
        if c.rhs[j].is_nan() {
            self.ensure(&mut c, j);
            c.rhs[j] = dot(&c.wcols[j * ng..(j + 1) * ng], self.wy);
        }
        c.rhs[j]
    }

    /// b - Q x = A^T W (y - A x): one residual, one adjoint FFT, a dot product per template.
    fn gradient(&self, b: &[f64], x: &[f64], out: &mut [f64]) {
        self.mul_or_gradient(Some(b), x, out);
    }

    fn mul(&self, x: &[f64], out: &mut [f64]) {
        self.mul_or_gradient(None, x, out);
    }
}

impl LazyExact<'_> {
    /// Q x, or with `b` the gradient b - Q x, through the weighted pixel residual. The
    /// polynomial entries of `b` are exact; the template ones are never needed.
    fn mul_or_gradient(&self, b: Option<&[f64]>, x: &[f64], out: &mut [f64]) {
        let (np, nt, ng) = (self.np, self.nt, self.good_idx.len());
        let mut guard = self.cells.borrow_mut();
        let c = &mut *guard;
        c.model.clear();
        c.model.resize(ng, 0.0);
        for j in 0..nt {
            if x[np + j] != 0.0 {
                self.ensure(c, j);
                axpy(x[np + j], &c.wcols[j * ng..(j + 1) * ng], c.model);
            }
        }
        for l in 0..np {
            axpy(x[l], &self.wpoly[l * ng..(l + 1) * ng], c.model);
        }
        let nb = np + nt;
        for g in 0..self.ngl {
            if x[nb + g] != 0.0 {
                axpy(x[nb + g], &self.wgas[g * ng..(g + 1) * ng], c.model);
            }
        }
        // For the gradient, A^T W (y - A x): turn the model into the residual first.
        let sign = match b {
            Some(_) => {
                for (m, y) in c.model.iter_mut().zip(self.wy) {
                    *m = y - *m;
                }
                -1.0
            }
            None => 1.0,
        };
        for l in 0..np {
            out[l] = dot(&self.wpoly[l * ng..(l + 1) * ng], c.model);
        }
        for g in 0..self.ngl {
            out[nb + g] = dot(&self.wgas[g * ng..(g + 1) * ng], c.model);
        }
        c.adjoint_in.fill(0.0);
        for (g, &i) in self.good_idx.iter().enumerate() {
            c.adjoint_in[i] = c.weight[i] * c.model[g];
        }
        let len = self.fitter.conv.adjoint_weights(
            c.adjoint_in,
            self.kernel,
            self.used,
            c.pricing,
            c.conv,
        );
        for j in 0..nt {
            if !self.allowed[j] {
                out[np + j] = 0.0;
                continue;
            }
            out[np + j] = self.fitter.price(j, &c.pricing[..len]);
            if let Some(r) = &self.fitter.reg {
                out[np + j] += sign * dot(&r[j * nt..(j + 1) * nt], &x[np..nb]);
            }
        }
    }
}

/// A fitter for one template set, one galaxy grid and one configuration; reusable across
/// many spectra and threads (it is immutable; each thread brings a [`FitScratch`]).
#[derive(Debug, Clone)]
pub struct Fitter {
    cfg: FitConfig,
    grid: LogGrid,
    factor: usize,
    nt: usize,
    conv: Convolver,
    basis: Vec<Vec<Complex64>>,
    /// Exact mode: the templates' mean squares (to scale NNLS without convolving every
    /// template).
    mean_square: Vec<f64>,
    mix: Mix,
    /// Additive Legendre polynomials P_0..P_degree on the galaxy pixels.
    poly: Vec<Vec<f64>>,
    /// Multiplicative Legendre polynomials P_1..P_mdegree.
    mpoly: Vec<Vec<f64>>,
    /// With reddening: d ln(attenuation)/d A_V per galaxy pixel (rest frame), so that the
    /// stellar templates are multiplied by exp(A_V x this) in place of the polynomial.
    dust: Option<Vec<f64>>,
    reg: Option<Vec<f64>>,
    /// Gas emission lines fitted with the stars (their own kinematic components).
    gas: Option<GasTemplates>,
}

/// Per-thread working memory of [`Fitter::fit_with`].
#[derive(Debug, Clone)]
pub struct FitScratch {
    conv: ConvolveScratch,
    kernel: Vec<Complex64>,
    dkernel: Vec<Vec<Complex64>>,
    /// Convolved basis on all galaxy pixels (k x npix).
    cols: Vec<f64>,
    /// Weighted (1/noise x mpoly) basis and polynomials on the good pixels.
    wcols: Vec<f64>,
    wpoly: Vec<f64>,
    wy: Vec<f64>,
    good_idx: Vec<usize>,
    mvec: Vec<f64>,
    g_pp: Vec<f64>,
    g_pt: Vec<f64>,
    g_bp: Vec<f64>,
    g_bb: Vec<f64>,
    gc: Vec<f64>,
    rhs: Vec<f64>,
    rhs_b: Vec<f64>,
    x: Vec<f64>,
    u: Vec<f64>,
    nnls: NnlsSolver,
    resid: Vec<f64>,
    stellar: Vec<f64>,
    combined: Vec<Complex64>,
    deriv: Vec<f64>,
    jac: Vec<f64>,
    proj_rhs: Vec<f64>,
    tmp_u: (Vec<f64>, Vec<f64>),
    active: Vec<usize>,
    coef: Vec<f64>,
    tw: Vec<f64>,
    evaluations: usize,
    pixel_chi2: f64,
    /// Exact mode: which template columns this evaluation has convolved, the per-pixel
    /// weight (mpoly / noise, zero off the mask) and the adjoint output.
    have_col: Vec<bool>,
    pixel_weight: Vec<f64>,
    adjoint_in: Vec<f64>,
    pricing: Vec<f64>,
    /// Exact mode: templates NNLS may use in this pass (see [`Fitter::fit_from_templates`]).
    allowed: Vec<bool>,
    /// Kernel bins of the last evaluation (for pricing held-out templates at its solution).
    used_bins: usize,
    /// The last search ended with a check that no held-out template was missing.
    complete_at_exit: bool,
    /// Gas: the line columns on every pixel (n_lines x npix), weighted on the good pixels
    /// (1/noise; the multiplicative polynomial does not apply to gas, as in pPXF), their
    /// products with each other, the polynomials and (lazily, NaN until needed) the templates.
    gas_cols: Vec<f64>,
    wgas: Vec<f64>,
    g_gg: Vec<f64>,
    g_pg: Vec<f64>,
    g_tg: Vec<f64>,
    /// Gas Jacobian: per component d(model)/dV and d(model)/dsigma, and one line's buffers.
    gas_dmodel: Vec<f64>,
    /// Gas weights at the last Jacobian: variance from the linear solution alone, and the
    /// derivative of each weight with respect to each non-linear parameter (npar x n_lines).
    gas_var: Vec<f64>,
    gas_sens: Vec<f64>,
    line_buf: Vec<f64>,
    line_dv: Vec<f64>,
    line_ds: Vec<f64>,
}

impl FitScratch {
    /// Exact mode, at a new point or mask: drop the convolved columns and mark their products
    /// and right-hand sides as not computed. Only entries of columns that were convolved can
    /// have been filled, so only those are reset (the full Gram is nt x nt).
    fn forget_columns(&mut self, np: usize) {
        let nt = self.have_col.len();
        for j in (0..nt).filter(|&j| self.have_col[j]) {
            self.rhs_b[j] = f64::NAN;
            for l in 0..np {
                self.g_pt[l * nt + j] = f64::NAN;
            }
            for i in (0..nt).filter(|&i| self.have_col[i]) {
                self.gc[i * nt + j] = f64::NAN;
            }
        }
        self.have_col.fill(false);
    }
}

/// Parameters in natural units: V, sigma (km/s), h3.., multiplicative coefficients.
type Params = Vec<f64>;

impl Fitter {
    pub fn new(
        templates: &PreparedTemplates,
        grid: LogGrid,
        cfg: FitConfig,
    ) -> Result<Self, FitError> {
        if ![2, 4, 6].contains(&cfg.moments) {
            return Err(FitError::Config(format!(
                "moments must be 2, 4 or 6, got {}",
                cfg.moments
            )));
        }
        if templates.is_empty() {
            return Err(FitError::Config("no templates".into()));
        }
        if let Some(av) = cfg.reddening {
            if cfg.mdegree > 0 {
                return Err(FitError::Config(
                    "reddening cannot be fitted together with a multiplicative polynomial \
                     (mdegree > 0): both shape the stellar continuum, so pPXF forbids the pair; \
                     use --reddening or --mdegree"
                        .into(),
                ));
            }
            if !(av.is_finite() && (0.0..=MAX_AV).contains(&av)) {
                return Err(FitError::Config(format!(
                    "the reddening start must be an A_V in 0-{MAX_AV} mag, got {av}"
                )));
            }
        }
        if !(cfg.regul >= 0.0 && cfg.regul.is_finite()) {
            return Err(FitError::Config(format!(
                "regul must be a finite number >= 0, got {}",
                cfg.regul
            )));
        }
        if (templates.velscale - grid.velscale).abs() > 1e-6 * grid.velscale {
            return Err(FitError::Config(format!(
                "templates were prepared for velscale {} but the galaxy has {}",
                templates.velscale, grid.velscale
            )));
        }
        if grid.npix < 2 {
            return Err(FitError::Config(
                "the galaxy grid needs at least 2 pixels".into(),
            ));
        }
        let factor = templates.velscale_ratio;
        let d_t = templates.d_ln_lam();
        let n_t = templates.npix();
        // Template sample index where galaxy pixel 0's block of `factor` samples starts.
        let block0 = templates.ln_lam0 + 0.5 * (factor - 1) as f64 * d_t;
        let offset = (grid.ln_lam0 - block0) / d_t;
        let reach = (cfg.max_velocity + 900.0) / C_KMS / d_t;
        let last = offset + (grid.npix * factor) as f64;
        if offset - reach < 0.0 || last + reach > n_t as f64 {
            let lam = |x: f64| (templates.ln_lam0 + x * d_t).exp();
            return Err(FitError::WavelengthNotCovered {
                tpl_min: lam(0.0),
                tpl_max: lam(n_t as f64 - 1.0),
                need_min: lam(offset - reach),
                need_max: lam(last + reach),
            });
        }
        let n_fft = fast_fft_len(n_t + 64, 2 * factor);
        let conv = Convolver::new(n_fft, factor, offset);
        let nt = templates.len();
        let (basis_samples, mix) = match cfg.basis {
            TemplateBasis::Exact => (templates.spectra.clone(), Mix::Identity(nt)),
            TemplateBasis::Compressed { tolerance } => compress(&templates.spectra, tolerance),
        };
        let basis = basis_samples.iter().map(|s| conv.spectrum_of(s)).collect();
        let mean_square = match mix {
            Mix::Identity(_) => basis_samples
                .iter()
                .map(|t| t.iter().map(|v| v * v).sum::<f64>() / t.len().max(1) as f64)
                .collect(),
            Mix::Dense { .. } => Vec::new(),
        };
        let x: Vec<f64> = (0..grid.npix)
            .map(|i| -1.0 + 2.0 * i as f64 / (grid.npix - 1) as f64)
            .collect();
        let degree = cfg.degree.max(-1);
        let legendre = legendre_table(&x, (degree.max(cfg.mdegree as i32)).max(0) as usize);
        let poly = legendre[..(degree + 1) as usize].to_vec();
        let mpoly = legendre[1..=cfg.mdegree].to_vec();
        let dust = cfg.reddening.map(|_| {
            (0..grid.npix)
                .map(|i| crate::dust::ln_attenuation_per_av(grid.lam(i)))
                .collect()
        });
        let reg = (cfg.regul > 0.0)
            .then(|| regularisation(templates, cfg.regul))
            .transpose()?;
        Ok(Fitter {
            cfg,
            grid,
            factor,
            nt,
            conv,
            basis,
            mean_square,
            mix,
            poly,
            mpoly,
            dust,
            reg,
            gas: None,
        })
    }

    /// Fit the emission lines of `gas` together with the stars: each gas component adds its V
    /// and sigma to the non-linear parameters and each line a non-negative weight to the linear
    /// ones (pPXF's default `lsq_box` bounds). Needs the exact template basis.
    pub fn with_gas(mut self, gas: GasTemplates) -> Result<Self, FitError> {
        if !matches!(self.mix, Mix::Identity(_)) {
            return Err(FitError::Config(
                "gas emission lines are fitted with the exact template basis only (drop --compress)"
                    .into(),
            ));
        }
        if *gas.grid() != self.grid {
            return Err(FitError::Config(
                "gas templates were built for another galaxy grid".into(),
            ));
        }
        self.gas = Some(gas);
        Ok(self)
    }

    /// The gas templates, if any.
    pub fn gas(&self) -> Option<&GasTemplates> {
        self.gas.as_ref()
    }

    fn n_gas(&self) -> usize {
        self.gas.as_ref().map_or(0, GasTemplates::len)
    }

    fn n_gas_components(&self) -> usize {
        self.gas.as_ref().map_or(0, GasTemplates::n_components)
    }

    /// Index of the first gas parameter (after the stellar moments, the multiplicative
    /// polynomial and, with reddening, A_V).
    fn gas_offset(&self) -> usize {
        self.cfg.moments + self.cfg.mdegree + usize::from(self.dust.is_some())
    }

    /// Index of A_V among the non-linear parameters, with reddening.
    fn reddening_index(&self) -> Option<usize> {
        self.dust
            .as_ref()
            .map(|_| self.cfg.moments + self.cfg.mdegree)
    }

    /// Non-linear parameters: stellar moments, multiplicative coefficients or A_V, (V, sigma)
    /// per gas component.
    fn n_params(&self) -> usize {
        self.gas_offset() + 2 * self.n_gas_components()
    }

    pub fn config(&self) -> &FitConfig {
        &self.cfg
    }

    pub fn grid(&self) -> &LogGrid {
        &self.grid
    }

    /// Number of vectors convolved per model evaluation (templates, or basis vectors).
    pub fn basis_len(&self) -> usize {
        self.mix.basis_len()
    }

    pub fn n_templates(&self) -> usize {
        self.nt
    }

    pub fn scratch(&self) -> FitScratch {
        let k = self.mix.basis_len();
        let npix = self.grid.npix;
        let np = self.poly.len();
        let nb = self.conv.n_bins();
        let npar = self.n_params();
        let ngl = self.n_gas();
        let nlin = np + self.nt + ngl;
        FitScratch {
            conv: self.conv.scratch(),
            kernel: vec![Complex64::new(0.0, 0.0); nb],
            dkernel: vec![vec![Complex64::new(0.0, 0.0); nb]; self.cfg.moments],
            cols: vec![0.0; k * npix],
            wcols: Vec::with_capacity(k * npix),
            wpoly: Vec::with_capacity(np * npix),
            wy: Vec::with_capacity(npix),
            good_idx: Vec::with_capacity(npix),
            mvec: vec![1.0; npix],
            g_pp: vec![0.0; np * np],
            // NaN marks products not computed yet (exact mode fills them on demand).
            g_pt: vec![f64::NAN; np * self.nt],
            g_bp: vec![0.0; k * np],
            g_bb: vec![0.0; k * k],
            gc: vec![f64::NAN; k * self.nt],
            rhs: vec![0.0; nlin],
            rhs_b: vec![f64::NAN; k],
            x: vec![0.0; nlin],
            u: vec![0.0; k],
            nnls: NnlsSolver::default(),
            resid: Vec::with_capacity(npix),
            stellar: vec![0.0; npix],
            combined: vec![Complex64::new(0.0, 0.0); nb],
            deriv: vec![0.0; npix],
            jac: Vec::with_capacity(npar * npix),
            proj_rhs: vec![0.0; nlin],
            tmp_u: (vec![0.0; k], vec![0.0; k]),
            active: Vec::with_capacity(nlin),
            coef: Vec::with_capacity(nlin),
            tw: vec![0.0; self.nt],
            evaluations: 0,
            pixel_chi2: 0.0,
            have_col: vec![false; k],
            pixel_weight: vec![0.0; npix],
            adjoint_in: vec![0.0; npix],
            pricing: vec![0.0; 2 * nb],
            allowed: vec![true; self.nt],
            used_bins: 0,
            complete_at_exit: false,
            gas_cols: vec![0.0; ngl * npix],
            wgas: Vec::with_capacity(ngl * npix),
            g_gg: vec![0.0; ngl * ngl],
            g_pg: vec![0.0; np * ngl],
            g_tg: vec![f64::NAN; self.nt * ngl],
            gas_dmodel: vec![0.0; 2 * self.n_gas_components() * npix],
            gas_var: vec![f64::NAN; ngl],
            gas_sens: vec![0.0; npar * ngl],
            line_buf: vec![0.0; if ngl > 0 { npix } else { 0 }],
            line_dv: vec![0.0; if ngl > 0 { npix } else { 0 }],
            line_ds: vec![0.0; if ngl > 0 { npix } else { 0 }],
        }
    }

    /// The templates mixed by `weights` (one per template) and convolved with the LOSVD of
    /// `start`, on the galaxy grid: a stellar model without polynomials.
    pub fn stellar_model(&self, weights: &[f64], start: &Start) -> Result<Vec<f64>, FitError> {
        if weights.len() != self.nt {
            return Err(FitError::Config(format!(
                "{} weights for {} templates",
                weights.len(),
                self.nt
            )));
        }
        let mut s = self.scratch();
        let mut p = vec![start.v, start.sigma.max(self.min_sigma())];
        p.extend_from_slice(&start.h[..self.cfg.moments - 2]);
        let used = self.conv.losvd_kernel(&self.losvd(&p), &mut s.kernel);
        self.mix.to_basis(weights, &mut s.u);
        self.combine_basis(&s.u, used, &mut s.combined);
        let mut model = vec![0.0; self.grid.npix];
        self.conv
            .apply(&s.combined, &s.kernel, used, &mut model, &mut s.conv);
        Ok(model)
    }

    /// `combined[..used]` = the spectra of the basis weighted by `u` (a mixed template's
    /// spectrum, on the bins a kernel reaches).
    fn combine_basis(&self, u: &[f64], used: usize, combined: &mut [Complex64]) {
        combined[..used].fill(Complex64::new(0.0, 0.0));
        for (b, &ua) in self.basis.iter().zip(u).filter(|(_, ua)| **ua != 0.0) {
            for (c, z) in combined[..used].iter_mut().zip(&b[..used]) {
                *c += z * ua;
            }
        }
    }

    /// Fit one spectrum (allocates a scratch; use [`Self::fit_with`] in loops).
    pub fn fit(&self, spectrum: &Spectrum, start: &Start) -> Result<FitResult, FitError> {
        self.fit_with(&mut self.scratch(), spectrum, start)
    }

    /// Fit one spectrum reusing `scratch`.
    pub fn fit_with(
        &self,
        s: &mut FitScratch,
        spectrum: &Spectrum,
        start: &Start,
    ) -> Result<FitResult, FitError> {
        self.fit_from_templates(s, spectrum, start, None)
    }

    /// Fit one spectrum, searching the kinematics with the templates `first` only (e.g. those
    /// a global fit used), then admitting every other template whose chi2 gradient at that
    /// solution is positive (one adjoint correlation of the residual prices them all) and
    /// searching again, until none is. The result is the fit
    /// with all templates: at the end the weights are the NNLS optimum over the whole library
    /// (its optimality conditions hold for every template) at kinematics where the gradient of
    /// chi2 vanishes. It is faster when `first` holds most of what each spectrum needs, since
    /// each step of the search correlates only the admitted templates with the residual.
    /// `None`, an empty list or the compressed basis search with all templates from the start.
    pub fn fit_from_templates(
        &self,
        s: &mut FitScratch,
        spectrum: &Spectrum,
        start: &Start,
        first: Option<&[usize]>,
    ) -> Result<FitResult, FitError> {
        s.allowed.fill(true);
        if let (Some(first), Mix::Identity(_)) = (first, &self.mix)
            && !first.is_empty()
        {
            s.allowed.fill(false);
            for &j in first {
                if let Some(a) = s.allowed.get_mut(j) {
                    *a = true;
                }
            }
        }
        let n_good = spectrum.validate(self.grid.npix)?;
        let npar = self.n_params();
        let n_lin = self.poly.len() + 1;
        if n_good <= npar + n_lin {
            return Err(FitError::TooFewGoodPixels {
                good: n_good,
                params: npar + n_lin,
            });
        }
        if start.sigma.is_nan() || start.sigma <= 0.0 || !start.v.is_finite() {
            return Err(FitError::Config(format!(
                "start must have finite V and positive sigma, got V={} sigma={}",
                start.v, start.sigma
            )));
        }
        s.evaluations = 0;
        s.x.fill(0.0);
        let bias = if self.cfg.moments > 2 {
            self.cfg
                .bias
                .unwrap_or(0.7 * (500.0 / n_good as f64).sqrt())
        } else {
            0.0
        };
        let mut good = spectrum.good.clone();
        let mut params: Params = vec![0.0; npar];
        params[0] = start.v.clamp(-self.cfg.max_velocity, self.cfg.max_velocity);
        params[1] = start.sigma.clamp(self.min_sigma(), self.cfg.max_sigma);
        for k in 2..self.cfg.moments {
            params[k] = start.h[k - 2].clamp(-0.3, 0.3);
        }
        if let (Some(r), Some(av)) = (self.reddening_index(), self.cfg.reddening) {
            params[r] = av.clamp(0.0, MAX_AV);
        }
        if let Some(gas) = &self.gas {
            let off = self.gas_offset();
            for c in 0..gas.n_components() {
                params[off + 2 * c] = params[0];
                params[off + 2 * c + 1] =
                    gas.sigma_start.clamp(self.min_sigma(), self.cfg.max_sigma);
            }
        }
        let mut cov;
        let mut pass = 0;
        loop {
            // Held-out templates are priced at the start of the first search as well: from a
            // start near the solution (cube fits correlate one, see `xcorr`), most of what the
            // spectrum needs enters before the search rather than after it.
            let price_at_start = pass == 0;
            (params, cov) =
                self.levenberg_marquardt(s, spectrum, &good, params, bias, price_at_start)?;
            // The search checks for missing templates as it converges; a search that stopped
            // otherwise (step limits) is checked here.
            while !s.complete_at_exit
                && self
                    .admit_missing_templates(s, spectrum, &params)?
                    .is_some()
            {
                (params, cov) =
                    self.levenberg_marquardt(s, spectrum, &good, params, bias, false)?;
            }
            pass += 1;
            if !self.cfg.clean || pass == 2 {
                break;
            }
            let cleaned = self.clean_mask(s, spectrum, &good, &params)?;
            if cleaned == good {
                break;
            }
            good = cleaned;
        }
        // The scratch holds the solution at `params` on the final mask; chi2 has no penalty.
        let chi2_sum = s.pixel_chi2;
        let errors: Vec<f64> = (0..self.cfg.moments)
            .map(|i| cov.get(i * npar + i).map_or(0.0, |v| v.max(0.0).sqrt()))
            .collect();
        let n_used = s.good_idx.len();
        let gas = self.gas_result(s, &params, &cov);
        let gas_free = gas.as_ref().map_or(0, |g| {
            g.components
                .iter()
                .map(|c| usize::from(c.v_error > 0.0) + usize::from(c.sigma_error > 0.0))
                .sum()
        });
        let reddening_error = self
            .reddening_index()
            .map(|r| cov.get(r * npar + r).map_or(0.0, |v| v.max(0.0).sqrt()));
        let dust_free = usize::from(reddening_error.is_some_and(|e| e > 0.0));
        let dof = n_used
            .saturating_sub(errors.iter().filter(|e| **e > 0.0).count() + gas_free + dust_free)
            .max(1);
        let bestfit = self.model_all_pixels(s);
        let np = self.poly.len();
        let nt = self.nt;
        Ok(FitResult {
            v: params[0],
            sigma: params[1],
            h: params[2..self.cfg.moments].to_vec(),
            errors,
            chi2: chi2_sum / dof as f64,
            dof,
            weights: s.x[np..np + nt].to_vec(),
            poly_weights: s.x[..np].to_vec(),
            mpoly_weights: params[self.cfg.moments..self.cfg.moments + self.cfg.mdegree].to_vec(),
            reddening: self.reddening_index().map(|r| params[r]),
            reddening_error,
            bestfit,
            good,
            evaluations: s.evaluations,
            gas,
        })
    }

    /// Gas kinematics, fluxes and their errors from the scratch at the solution `params` with
    /// covariance `cov`. A line's flux is its fitted template summed over every pixel (pPXF's
    /// `gas_flux`). Its error is formal (not scaled by chi2) and, unlike pPXF's
    /// `gas_flux_error` (the gas columns alone), includes the covariance with the stellar
    /// templates, the polynomials and the kinematics: pPXF's would be too small where lines
    /// blend (Halpha and [NII]) or their width is uncertain. Lines at zero weight get pPXF's.
    fn gas_result(&self, s: &FitScratch, params: &[f64], cov: &[f64]) -> Option<GasResult> {
        let gas = self.gas.as_ref()?;
        let npix = self.grid.npix;
        let npar = params.len();
        let ngl = gas.len();
        let nb = self.poly.len() + self.nt;
        let off = self.gas_offset();
        let err = |i: usize| cov.get(i * npar + i).map_or(0.0, |v| v.max(0.0).sqrt());
        let components = gas
            .components
            .iter()
            .enumerate()
            .map(|(c, name)| GasComponent {
                name: (*name).to_string(),
                v: params[off + 2 * c],
                sigma: params[off + 2 * c + 1],
                v_error: err(off + 2 * c),
                sigma_error: err(off + 2 * c + 1),
            })
            .collect();
        // Lines with a column on the fitted pixels; the others have no flux (pPXF: NaN).
        let live: Vec<usize> = (0..ngl).filter(|&l| s.g_gg[l * ngl + l] > 0.0).collect();
        let m = live.len();
        let mut q = vec![0.0; m * m];
        for (a, &la) in live.iter().enumerate() {
            for (b, &lb) in live.iter().enumerate() {
                q[a * m + b] = s.g_gg[la * ngl + lb];
            }
        }
        let inv = spd_inverse(&q, m);
        let mut bestfit = vec![0.0; npix];
        let mut lines = Vec::with_capacity(ngl);
        for (l, line) in gas.lines.iter().enumerate() {
            let col = &s.gas_cols[l * npix..(l + 1) * npix];
            let w = s.x[nb + l];
            axpy(w, col, &mut bestfit);
            let integral = col.iter().sum::<f64>().abs();
            let (flux, flux_error) = match live.iter().position(|&x| x == l) {
                // A fitted line: the variance of its weight from the linear solution with the
                // stars and polynomials, plus what the kinematics' covariance adds through the
                // weight's dependence on them (Gauss-Newton covariance of all parameters).
                Some(_) if s.gas_var[l].is_finite() => {
                    let sens = |q: usize| s.gas_sens[q * ngl + l];
                    let mut var = s.gas_var[l];
                    for q in 0..npar {
                        for r in 0..npar {
                            var += sens(q) * cov[q * npar + r] * sens(r);
                        }
                    }
                    (integral * w, integral * var.max(0.0).sqrt())
                }
                // A line at zero: pPXF's error, from the gas columns alone.
                Some(a) => (
                    integral * w,
                    inv.as_ref()
                        .map_or(f64::NAN, |inv| integral * inv[a * m + a].max(0.0).sqrt()),
                ),
                None => (f64::NAN, f64::NAN),
            };
            lines.push(GasLineFlux {
                name: line.name.clone(),
                component: gas.components[gas.component[l]].to_string(),
                wave: line.wave,
                flux,
                flux_error,
            });
        }
        Some(GasResult {
            components,
            lines,
            bestfit,
        })
    }

    /// With templates held out of the search and the scratch at the solution for `p`: price
    /// every held-out template (its chi2 gradient at the restricted solution, from one adjoint
    /// convolution of the residual) and admit those that would lower chi2. When some are
    /// admitted, the weights are solved again at `p` and the new chi2 (without the h penalty)
    /// is returned; None when the restricted solution is already the optimum over the whole
    /// library (no held-out template has a positive gradient: NNLS's optimality conditions).
    fn admit_missing_templates(
        &self,
        s: &mut FitScratch,
        spectrum: &Spectrum,
        p: &[f64],
    ) -> Result<Option<f64>, FitError> {
        if s.allowed.iter().all(|a| *a) || self.admit_by_gradient(s) == 0 {
            return Ok(None);
        }
        // Same point, same mask: the convolved columns and their products still hold.
        self.evaluate_again(s, spectrum, p).map(Some)
    }

    /// Admit the held-out templates whose gradient at the scratch's solution is positive
    /// (relative to the largest, as NNLS judges optimality); returns how many.
    fn admit_by_gradient(&self, s: &mut FitScratch) -> usize {
        let np = self.poly.len();
        s.adjoint_in.fill(0.0);
        for (g, &i) in s.good_idx.iter().enumerate() {
            s.adjoint_in[i] = s.pixel_weight[i] * s.resid[g];
        }
        let len = self.conv.adjoint_weights(
            &s.adjoint_in,
            &s.kernel,
            s.used_bins,
            &mut s.pricing,
            &mut s.conv,
        );
        // Gradients scaled as NNLS scales its variables (unit diagonal).
        let mut largest = 0.0f64;
        for j in (0..self.nt).filter(|&j| !s.allowed[j]) {
            let mut g = self.price(j, &s.pricing[..len]);
            if let Some(r) = &self.reg {
                g -= dot(&r[j * self.nt..(j + 1) * self.nt], &s.x[np..np + self.nt]);
            }
            let g = g / self.mean_square[j].max(f64::MIN_POSITIVE).sqrt();
            s.tw[j] = g;
            largest = largest.max(g.abs());
        }
        let mut admitted = 0;
        for j in 0..self.nt {
            if !s.allowed[j] && s.tw[j] > 1e-10 * largest {
                s.allowed[j] = true;
                admitted += 1;
            }
        }
        admitted
    }

    /// Correlation of template `j` with the residual behind `weights` (from
    /// [`Convolver::adjoint_weights`]), computed on the template's spectrum.
    fn price(&self, j: usize, weights: &[f64]) -> f64 {
        let spectrum: &[f64] = bytemuck::cast_slice(&self.basis[j]);
        dot(&spectrum[..weights.len()], weights)
    }

    fn min_sigma(&self) -> f64 {
        // pPXF's lower bound: 0.01 pixel.
        0.01 * self.grid.velscale
    }

    fn bounds(&self, i: usize) -> (f64, f64) {
        match i {
            0 => (-self.cfg.max_velocity, self.cfg.max_velocity),
            1 => (self.min_sigma(), self.cfg.max_sigma),
            i if i < self.cfg.moments => (-0.3, 0.3),
            i if i < self.cfg.moments + self.cfg.mdegree => (-1.0, 1.0),
            i if Some(i) == self.reddening_index() => (0.0, MAX_AV),
            i if (i - self.gas_offset()).is_multiple_of(2) => {
                (-self.cfg.max_velocity, self.cfg.max_velocity)
            }
            _ => (self.min_sigma(), self.cfg.max_sigma),
        }
    }

    fn losvd(&self, p: &[f64]) -> GaussHermite {
        let to_samples = self.factor as f64 / self.grid.velscale;
        let mut gh = GaussHermite::gaussian(p[0] * to_samples, p[1] * to_samples);
        gh.nh = self.cfg.moments - 2;
        gh.h[..gh.nh].copy_from_slice(&p[2..self.cfg.moments]);
        gh
    }

    /// Collect the good pixels and their weights.
    fn set_mask(&self, s: &mut FitScratch, spectrum: &Spectrum, good: &[bool]) {
        s.good_idx.clear();
        s.good_idx.extend((0..self.grid.npix).filter(|&i| good[i]));
        s.wy.clear();
        s.wy.extend(
            s.good_idx
                .iter()
                .map(|&i| spectrum.flux[i] / spectrum.noise[i]),
        );
        let np = self.poly.len();
        let ng = s.good_idx.len();
        s.wpoly.clear();
        for p in &self.poly {
            s.wpoly
                .extend(s.good_idx.iter().map(|&i| p[i] / spectrum.noise[i]));
        }
        for a in 0..np {
            for b in 0..np {
                s.g_pp[a * np + b] = dot(
                    &s.wpoly[a * ng..(a + 1) * ng],
                    &s.wpoly[b * ng..(b + 1) * ng],
                );
            }
        }
        s.rhs[..np].iter_mut().enumerate().for_each(|(a, r)| {
            *r = dot(&s.wpoly[a * ng..(a + 1) * ng], &s.wy);
        });
    }

    /// Convolve the basis for `p`, solve the linear weights, fill the residuals; returns chi^2.
    fn evaluate(
        &self,
        s: &mut FitScratch,
        spectrum: &Spectrum,
        p: &[f64],
    ) -> Result<f64, FitError> {
        self.evaluate_cached(s, spectrum, p, false)
    }

    /// [`Self::evaluate`] at the point and mask of the previous evaluation (after templates
    /// were admitted): the columns convolved then, and their products, are kept.
    fn evaluate_again(
        &self,
        s: &mut FitScratch,
        spectrum: &Spectrum,
        p: &[f64],
    ) -> Result<f64, FitError> {
        self.evaluate_cached(s, spectrum, p, true)
    }

    fn evaluate_cached(
        &self,
        s: &mut FitScratch,
        spectrum: &Spectrum,
        p: &[f64],
        same_point: bool,
    ) -> Result<f64, FitError> {
        s.evaluations += 1;
        let k = self.mix.basis_len();
        let npix = self.grid.npix;
        let np = self.poly.len();
        let nt = self.nt;
        let ng = s.good_idx.len();
        let gh = self.losvd(p);
        let used = self.conv.losvd_kernel(&gh, &mut s.kernel);
        s.used_bins = used;
        // The stellar continuum's multiplier: the dust attenuation, or the multiplicative
        // polynomial clipped like pPXF's.
        if let (Some(dust), Some(r)) = (&self.dust, self.reddening_index()) {
            let av = p[r];
            for (m, d) in s.mvec.iter_mut().zip(dust) {
                *m = (av * d).exp();
            }
        } else {
            for i in 0..npix {
                let m: f64 = 1.0
                    + self
                        .mpoly
                        .iter()
                        .zip(&p[self.cfg.moments..])
                        .map(|(poly, c)| c * poly[i])
                        .sum::<f64>();
                s.mvec[i] = m.max(0.1);
            }
        }
        if !same_point {
            self.gas_columns(s, spectrum, p);
        }
        if let Mix::Identity(_) = self.mix {
            self.solve_exact(s, spectrum, used, same_point)?;
        } else {
            self.solve_compressed(s, spectrum, used)?;
        }
        // Residuals on the good pixels.
        self.mix.to_basis(&s.x[np..np + nt], &mut s.u);
        s.resid.clear();
        s.resid.extend_from_slice(&s.wy);
        for a in 0..k {
            // Exact mode convolves only templates with weight; skip the others.
            if s.u[a] != 0.0 {
                axpy(-s.u[a], &s.wcols[a * ng..(a + 1) * ng], &mut s.resid);
            }
        }
        for l in 0..np {
            axpy(-s.x[l], &s.wpoly[l * ng..(l + 1) * ng], &mut s.resid);
        }
        for l in 0..self.n_gas() {
            let w = s.x[np + nt + l];
            if w != 0.0 {
                axpy(-w, &s.wgas[l * ng..(l + 1) * ng], &mut s.resid);
            }
        }
        // The pixels' chi2 only. With regularisation the weights minimise chi2 + penalty, but
        // the non-linear search minimises the pixels' chi2 at those weights, as pPXF's does
        // (its penalty rows enter the linear solve only): that is the function whose gradient
        // the Jacobian's projection (through the regularised normal matrix) approximates.
        // Accepting steps on chi2 + penalty while stepping along this gradient stopped between
        // the two objectives' minima (0.007-0.02 mag from pPXF's A_V with --regul and
        // --reddening together).
        let chi2 = dot(&s.resid, &s.resid);
        s.pixel_chi2 = chi2;
        Ok(chi2)
    }

    /// Gas line columns at the gas kinematics of `p` on every pixel, weighted on the good
    /// pixels, with their products (polynomials, each other, right-hand side); products with
    /// template columns are forgotten (computed on demand).
    fn gas_columns(&self, s: &mut FitScratch, spectrum: &Spectrum, p: &[f64]) {
        let Some(gas) = &self.gas else {
            return;
        };
        let npix = self.grid.npix;
        let np = self.poly.len();
        let nb = np + self.nt;
        let ngl = gas.len();
        let ng = s.good_idx.len();
        let off = self.gas_offset();
        for l in 0..ngl {
            let c = gas.component[l];
            gas.column(
                l,
                p[off + 2 * c],
                p[off + 2 * c + 1],
                &mut s.gas_cols[l * npix..(l + 1) * npix],
                None,
            );
        }
        s.wgas.clear();
        for l in 0..ngl {
            let col = &s.gas_cols[l * npix..(l + 1) * npix];
            s.wgas
                .extend(s.good_idx.iter().map(|&i| col[i] / spectrum.noise[i]));
        }
        for a in 0..ngl {
            let wa = &s.wgas[a * ng..(a + 1) * ng];
            for b in a..ngl {
                let v = dot(wa, &s.wgas[b * ng..(b + 1) * ng]);
                s.g_gg[a * ngl + b] = v;
                s.g_gg[b * ngl + a] = v;
            }
            for l in 0..np {
                s.g_pg[l * ngl + a] = dot(&s.wpoly[l * ng..(l + 1) * ng], wa);
            }
            s.rhs[nb + a] = dot(wa, &s.wy);
        }
        s.g_tg.fill(f64::NAN);
    }

    /// Linear solve with the compressed basis: all k basis columns, Gram in factored form.
    fn solve_compressed(
        &self,
        s: &mut FitScratch,
        spectrum: &Spectrum,
        used: usize,
    ) -> Result<(), FitError> {
        let k = self.mix.basis_len();
        let npix = self.grid.npix;
        let np = self.poly.len();
        let nt = self.nt;
        let ng = s.good_idx.len();
        for a in 0..k {
            let out = &mut s.cols[a * npix..(a + 1) * npix];
            self.conv
                .apply(&self.basis[a], &s.kernel, used, out, &mut s.conv);
        }
        s.wcols.clear();
        for a in 0..k {
            let col = &s.cols[a * npix..(a + 1) * npix];
            s.wcols.extend(
                s.good_idx
                    .iter()
                    .map(|&i| col[i] * s.mvec[i] / spectrum.noise[i]),
            );
        }
        // Small Gram matrices.
        gram(&s.wcols, k, ng, &mut s.g_bb);
        for a in 0..k {
            let ca = &s.wcols[a * ng..(a + 1) * ng];
            for l in 0..np {
                s.g_bp[a * np + l] = dot(ca, &s.wpoly[l * ng..(l + 1) * ng]);
            }
            s.rhs_b[a] = dot(ca, &s.wy);
        }
        // Expand to templates: G_pt = G_pb C, gc = G_bb C, rhs_t = C^T rhs_b.
        for l in 0..np {
            for a in 0..k {
                s.u[a] = s.g_bp[a * np + l];
            }
            self.mix
                .to_templates(&s.u, &mut s.g_pt[l * nt..(l + 1) * nt]);
        }
        for a in 0..k {
            let row = &s.g_bb[a * k..(a + 1) * k];
            self.mix.to_templates(row, &mut s.gc[a * nt..(a + 1) * nt]);
        }
        self.mix.to_templates(&s.rhs_b, &mut s.rhs[np..]);
        let normal = FactoredNormal {
            np,
            nt,
            k,
            mix: &self.mix,
            g_pp: &s.g_pp,
            g_pt: &s.g_pt,
            g_bb: &s.g_bb,
            gc: &s.gc,
            reg: self.reg.as_deref(),
            tmp_u: std::cell::RefCell::new(std::mem::take(&mut s.tmp_u)),
        };
        let solved = s.nnls.solve(&normal, &s.rhs, np, &mut s.x);
        s.tmp_u = normal.tmp_u.into_inner();
        solved.map_err(FitError::Numerical)?;
        Ok(())
    }

    /// Exact linear solve: NNLS over every template, convolving only the templates that
    /// enter the passive set; the gradient for all others comes from one adjoint FFT and a
    /// dot product per template. With `same_point`, the columns and products cached by the
    /// previous solve (same kernel, weights and mask) are reused.
    fn solve_exact(
        &self,
        s: &mut FitScratch,
        spectrum: &Spectrum,
        used: usize,
        same_point: bool,
    ) -> Result<(), FitError> {
        let npix = self.grid.npix;
        let np = self.poly.len();
        let nt = self.nt;
        if !same_point {
            s.forget_columns(np);
            s.pixel_weight.fill(0.0);
            for &i in &s.good_idx {
                s.pixel_weight[i] = s.mvec[i] / spectrum.noise[i];
            }
            s.wcols.resize(nt * s.good_idx.len(), 0.0);
        }
        let weight_sum: f64 = s.pixel_weight.iter().map(|w| w * w).sum();
        let lazy = LazyExact {
            fitter: self,
            np,
            nt,
            npix,
            used,
            weight_sum,
            g_pp: &s.g_pp,
            wpoly: &s.wpoly,
            wy: &s.wy,
            good_idx: &s.good_idx,
            kernel: &s.kernel,
            allowed: &s.allowed,
            ngl: self.n_gas(),
            wgas: &s.wgas,
            g_gg: &s.g_gg,
            g_pg: &s.g_pg,
            cells: std::cell::RefCell::new(LazyCells {
                rhs: &mut s.rhs_b,
                cols: &mut s.cols,
                wcols: &mut s.wcols,
                have: &mut s.have_col,
                gram: &mut s.gc,
                g_pt: &mut s.g_pt,
                weight: &s.pixel_weight,
                conv: &mut s.conv,
                model: &mut s.resid,
                adjoint_in: &mut s.adjoint_in,
                pricing: &mut s.pricing,
                g_tg: &mut s.g_tg,
            }),
        };
        let solved = s.nnls.solve(&lazy, &s.rhs, np, &mut s.x);
        solved.map(|_| ()).map_err(FitError::Numerical)
    }

    /// Best-fit model on every pixel of the grid from the last evaluation.
    fn model_all_pixels(&self, s: &mut FitScratch) -> Vec<f64> {
        let npix = self.grid.npix;
        let k = self.mix.basis_len();
        let np = self.poly.len();
        s.stellar.fill(0.0);
        for a in (0..k).filter(|&a| s.u[a] != 0.0) {
            axpy(s.u[a], &s.cols[a * npix..(a + 1) * npix], &mut s.stellar);
        }
        let mut model: Vec<f64> = s.stellar.iter().zip(&s.mvec).map(|(t, m)| t * m).collect();
        for (poly, &c) in self.poly.iter().zip(&s.x[..np]) {
            axpy(c, poly, &mut model);
        }
        for l in 0..self.n_gas() {
            let w = s.x[np + self.nt + l];
            if w != 0.0 {
                axpy(w, &s.gas_cols[l * npix..(l + 1) * npix], &mut model);
            }
        }
        model
    }

    /// Jacobian of the weighted residuals (rows: good pixels) with respect to the free
    /// parameters, projected off the active linear columns.
    fn jacobian(&self, s: &mut FitScratch, spectrum: &Spectrum, p: &[f64]) {
        let npix = self.grid.npix;
        let k = self.mix.basis_len();
        let np = self.poly.len();
        let nt = self.nt;
        let ng = s.good_idx.len();
        let nkin = self.cfg.moments;
        let npar = self.n_params();
        let off = self.gas_offset();
        let nb = np + nt;
        let ngl = self.n_gas();
        let gh = self.losvd(p);
        let used = self
            .conv
            .losvd_kernel_with_derivatives(&gh, &mut s.kernel, &mut s.dkernel);
        self.gas_derivatives(s, p);
        // The best-fit stellar template before convolution.
        self.combine_basis(&s.u, used, &mut s.combined);
        // Unmultiplied stellar model for the multiplicative derivatives.
        s.stellar.fill(0.0);
        for a in 0..k {
            if s.u[a] != 0.0 {
                axpy(s.u[a], &s.cols[a * npix..(a + 1) * npix], &mut s.stellar);
            }
        }
        // Active linear columns (polynomials and positive weights) and their normal matrix.
        s.active.clear();
        s.active.extend(0..np);
        s.active
            .extend((0..nt).filter(|&j| s.x[np + j] > 0.0).map(|j| j + np));
        s.active
            .extend((0..ngl).filter(|&g| s.x[nb + g] > 0.0).map(|g| g + nb));
        let active_inverse = self.active_inverse(s);
        let m = s.active.len();
        // Gas weights' variance from the linear solution with every active column (NaN:
        // inactive line) and, per parameter below, their sensitivity to it.
        s.gas_var.fill(f64::NAN);
        s.gas_sens.fill(0.0);
        for (a, &idx) in s.active.iter().enumerate() {
            if idx >= nb {
                s.gas_var[idx - nb] = active_inverse[a * m + a];
            }
        }
        s.jac.clear();
        let to_samples = self.factor as f64 / self.grid.velscale;
        for q in 0..npar {
            if q < nkin {
                self.conv
                    .apply(&s.combined, &s.dkernel[q], used, &mut s.deriv, &mut s.conv);
                // d/dV and d/dsigma in km/s: chain rule from samples.
                let scale = if q < 2 { to_samples } else { 1.0 };
                for i in 0..npix {
                    s.deriv[i] *= scale * s.mvec[i];
                }
            } else if q < nkin + self.cfg.mdegree {
                let poly = &self.mpoly[q - nkin];
                for i in 0..npix {
                    s.deriv[i] = poly[i] * s.stellar[i];
                }
            } else if q < off {
                // A_V: d/dA_V of stellar x exp(A_V d) is stellar x multiplier x d.
                let dust = self.dust.as_deref().unwrap_or_default();
                for i in 0..npix {
                    s.deriv[i] = dust[i] * s.mvec[i] * s.stellar[i];
                }
            } else {
                let d = &s.gas_dmodel[(q - off) * npix..(q - off + 1) * npix];
                s.deriv.copy_from_slice(d);
            }
            let start = s.jac.len();
            s.jac
                .extend(s.good_idx.iter().map(|&i| -s.deriv[i] / spectrum.noise[i]));
            // Project off the span of the active columns: X (X^T X)^-1 X^T j.
            let jq = &s.jac[start..start + ng];
            for l in 0..np {
                s.proj_rhs[l] = dot(&s.wpoly[l * ng..(l + 1) * ng], jq);
            }
            let exact = matches!(self.mix, Mix::Identity(_));
            for a in 0..k {
                // Exact mode: only the active templates' columns exist (and matter).
                s.tmp_u.0[a] = if exact && s.x[np + a] <= 0.0 {
                    0.0
                } else {
                    dot(&s.wcols[a * ng..(a + 1) * ng], jq)
                };
            }
            self.mix.to_templates(&s.tmp_u.0, &mut s.proj_rhs[np..nb]);
            // With regularisation the weights' derivative has a second part, -M dX^T r (M the
            // inverse of the regularised normal matrix, dX the columns' derivative): dropped
            // without regularisation, where X^T r = 0 makes its share of the gradient vanish,
            // but at a regularised solution X^T r = R w, and without it the search can stop
            // short of the minimum along A_V and the age mix. Kept for the stellar kinematics
            // and A_V in exact mode (the template columns' derivatives priced through the
            // adjoint of the derivative kernel).
            if exact && self.reg.is_some() && (q < nkin || Some(q) == self.reddening_index()) {
                s.adjoint_in.fill(0.0);
                let dust = self.dust.as_deref().unwrap_or_default();
                for (g, &i) in s.good_idx.iter().enumerate() {
                    let factor = match q {
                        0 | 1 => to_samples,
                        q if q < nkin => 1.0,
                        _ => dust[i],
                    };
                    s.adjoint_in[i] = s.pixel_weight[i] * s.resid[g] * factor;
                }
                let kernel = if q < nkin { &s.dkernel[q] } else { &s.kernel };
                let len = self.conv.adjoint_weights(
                    &s.adjoint_in,
                    kernel,
                    used,
                    &mut s.pricing,
                    &mut s.conv,
                );
                for j in 0..nt {
                    if s.x[np + j] > 0.0 {
                        s.proj_rhs[np + j] += self.price(j, &s.pricing[..len]);
                    }
                }
            }
            for g in 0..ngl {
                s.proj_rhs[nb + g] = if s.x[nb + g] > 0.0 {
                    dot(&s.wgas[g * ng..(g + 1) * ng], jq)
                } else {
                    0.0
                };
            }
            s.coef.clear();
            for a in 0..m {
                let c: f64 = (0..m)
                    .map(|b| active_inverse[a * m + b] * s.proj_rhs[s.active[b]])
                    .sum();
                s.coef.push(c);
            }
            for (a, &idx) in s.active.iter().enumerate() {
                if idx >= nb {
                    s.gas_sens[q * ngl + idx - nb] = s.coef[a];
                }
            }
            s.tw.fill(0.0);
            for (c, &idx) in s.active.iter().enumerate() {
                if idx >= np && idx < nb {
                    s.tw[idx - np] = s.coef[c];
                }
            }
            self.mix.to_basis(&s.tw, &mut s.tmp_u.1);
            let jq = &mut s.jac[start..start + ng];
            for (c, &idx) in s.active.iter().enumerate() {
                if idx >= nb {
                    let g = idx - nb;
                    axpy(-s.coef[c], &s.wgas[g * ng..(g + 1) * ng], jq);
                }
            }
            for a in 0..k {
                if s.tmp_u.1[a] != 0.0 {
                    axpy(-s.tmp_u.1[a], &s.wcols[a * ng..(a + 1) * ng], jq);
                }
            }
            for l in 0..np {
                axpy(-s.coef[l], &s.wpoly[l * ng..(l + 1) * ng], jq);
            }
        }
    }

    /// d(model)/dV and d(model)/dsigma of each gas component at the scratch's gas weights
    /// (`gas_dmodel`, 2 rows of npix per component).
    fn gas_derivatives(&self, s: &mut FitScratch, p: &[f64]) {
        let Some(gas) = &self.gas else {
            return;
        };
        let npix = self.grid.npix;
        let nb = self.poly.len() + self.nt;
        let off = self.gas_offset();
        s.gas_dmodel.fill(0.0);
        for l in 0..gas.len() {
            let w = s.x[nb + l];
            if w == 0.0 {
                continue;
            }
            let c = gas.component[l];
            gas.column(
                l,
                p[off + 2 * c],
                p[off + 2 * c + 1],
                &mut s.line_buf,
                Some((&mut s.line_dv, &mut s.line_ds)),
            );
            axpy(
                w,
                &s.line_dv,
                &mut s.gas_dmodel[2 * c * npix..(2 * c + 1) * npix],
            );
            axpy(
                w,
                &s.line_ds,
                &mut s.gas_dmodel[(2 * c + 1) * npix..(2 * c + 2) * npix],
            );
        }
    }

    /// Inverse of the normal matrix restricted to the active columns.
    fn active_inverse(&self, s: &FitScratch) -> Vec<f64> {
        let np = self.poly.len();
        let nt = self.nt;
        let k = self.mix.basis_len();
        let normal = FactoredNormal {
            np,
            nt,
            k,
            mix: &self.mix,
            g_pp: &s.g_pp,
            g_pt: &s.g_pt,
            g_bb: &s.g_bb,
            gc: &s.gc,
            reg: self.reg.as_deref(),
            tmp_u: std::cell::RefCell::new((Vec::new(), Vec::new())),
        };
        let m = s.active.len();
        let nb = np + nt;
        let ngl = self.n_gas();
        let ng = s.good_idx.len();
        // Gas entries: products kept by the evaluation, or computed here for active templates
        // (whose columns the evaluation convolved).
        let gas_entry = |i: usize, j: usize| -> f64 {
            let (g, o) = if i >= nb { (i - nb, j) } else { (j - nb, i) };
            if o >= nb {
                s.g_gg[g * ngl + o - nb]
            } else if o < np {
                s.g_pg[o * ngl + g]
            } else {
                let t = o - np;
                let v = s.g_tg[t * ngl + g];
                if v.is_nan() {
                    dot(
                        &s.wcols[t * ng..(t + 1) * ng],
                        &s.wgas[g * ng..(g + 1) * ng],
                    )
                } else {
                    v
                }
            }
        };
        let mut q = vec![0.0; m * m];
        for (a, &i) in s.active.iter().enumerate() {
            for (c, &j) in s.active.iter().enumerate() {
                q[a * m + c] = if i >= nb || j >= nb {
                    gas_entry(i, j)
                } else {
                    normal.entry(i, j)
                };
            }
            q[a * m + a] *= 1.0 + 1e-12;
        }
        spd_inverse(&q, m).unwrap_or_else(|| vec![0.0; m * m])
    }

    /// Bounded Levenberg-Marquardt; returns the parameters and their covariance (npar x npar).
    /// With templates held out, they are priced (and admitted) near and at the minimum, and
    /// with `price_at_start` also at the starting point.
    fn levenberg_marquardt(
        &self,
        s: &mut FitScratch,
        spectrum: &Spectrum,
        good: &[bool],
        mut p: Params,
        bias: f64,
        price_at_start: bool,
    ) -> Result<(Params, Vec<f64>), FitError> {
        self.set_mask(s, spectrum, good);
        let npar = p.len();
        let ng = s.good_idx.len();
        let nkin = self.cfg.moments;
        let penalty = |s: &FitScratch, p: &[f64]| -> (f64, f64) {
            if bias <= 0.0 {
                return (0.0, 0.0);
            }
            let scale = (ng as f64).sqrt() * bias * robust_sigma(&s.resid);
            let d2: f64 = p[2..nkin].iter().map(|h| h * h).sum();
            (scale, scale * scale * d2)
        };
        let mut chi2 = self.evaluate(s, spectrum, &p)?;
        if price_at_start && let Some(full_chi2) = self.admit_missing_templates(s, spectrum, &p)? {
            chi2 = full_chi2;
        }
        let (mut pen_scale, pen) = penalty(s, &p);
        chi2 += pen;
        let mut lambda = 1e-3;
        let mut jtj = vec![0.0; npar * npar];
        let mut jtr = vec![0.0; npar];
        let mut need_jac = true;
        let mut best_x = s.x.clone();
        let mut state_at_p = true;
        let mut checked_near = false;
        s.complete_at_exit = false;
        for _iter in 0..self.cfg.max_iterations {
            if need_jac {
                self.jacobian(s, spectrum, &p);
                for a in 0..npar {
                    for b in 0..npar {
                        jtj[a * npar + b] =
                            dot(&s.jac[a * ng..(a + 1) * ng], &s.jac[b * ng..(b + 1) * ng]);
                    }
                    jtr[a] = dot(&s.jac[a * ng..(a + 1) * ng], &s.resid);
                }
                for a in 2..nkin {
                    jtj[a * npar + a] += pen_scale * pen_scale;
                    jtr[a] += pen_scale * pen_scale * p[a];
                }
                need_jac = false;
            }
            // Solve (J^T J + lambda diag) delta = -J^T r, then project into the bounds.
            let mut a = jtj.clone();
            for i in 0..npar {
                a[i * npar + i] += lambda * jtj[i * npar + i].max(1e-30);
            }
            let Some(inv) = spd_inverse(&a, npar) else {
                lambda *= 10.0;
                if lambda > 1e12 {
                    break;
                }
                continue;
            };
            let mut trial = p.clone();
            let mut step_size = 0.0f64;
            for i in 0..npar {
                let delta: f64 = -(0..npar).map(|j| inv[i * npar + j] * jtr[j]).sum::<f64>();
                let (lo, hi) = self.bounds(i);
                trial[i] = (p[i] + delta).clamp(lo, hi);
                let err = inv[i * npar + i].max(0.0).sqrt().max(1e-12);
                step_size = step_size.max(((trial[i] - p[i]) / err).abs());
            }
            // chi2 reduction the linearised model predicts for the step: -(2 d.J^T r + d.J^T J d).
            let predicted: f64 = -(0..npar)
                .map(|i| {
                    let d = trial[i] - p[i];
                    let jd: f64 = (0..npar)
                        .map(|j| jtj[i * npar + j] * (trial[j] - p[j]))
                        .sum();
                    d * (2.0 * jtr[i] + jd)
                })
                .sum::<f64>();
            let tolerance = 1e-6 * chi2.max(1.0);
            // Converged without trying the step: an undamped step from the current solution
            // would move the parameters by less than 2% of their errors and lower chi2 by
            // less than the tolerance (the test the step's outcome would face), so evaluating
            // it would only confirm the minimum.
            let at_minimum =
                state_at_p && lambda <= 1e-2 && step_size < 0.02 && predicted < tolerance;
            let mut converged = at_minimum;
            if !at_minimum {
                let prev_x = s.x.clone();
                let mut trial_chi2 = self.evaluate(s, spectrum, &trial)?;
                state_at_p = false;
                let (trial_scale, trial_pen) = penalty(s, &trial);
                trial_chi2 += trial_pen;
                if trial_chi2 > chi2 {
                    // Restore the accepted state's linear solution as the warm start.
                    s.x = prev_x;
                    lambda *= 10.0;
                    if lambda > 1e10 {
                        break;
                    }
                    continue;
                }
                let improvement = chi2 - trial_chi2;
                p = trial;
                chi2 = trial_chi2;
                pen_scale = trial_scale;
                best_x.clone_from(&s.x);
                state_at_p = true;
                lambda = (lambda * 0.1).max(1e-9);
                need_jac = true;
                // Converged: the step moved the parameters by a tiny fraction of their errors,
                // or barely lowered chi2.
                converged = step_size < 1e-3 || improvement < tolerance;
                let first_time_near = step_size < 0.1 && !checked_near;
                if !converged && !first_time_near {
                    continue;
                }
            }
            // With templates held out: once near the minimum, and again at it, let in those the
            // full solution wants here, and go on from the lower chi2.
            if !s.allowed.iter().all(|a| *a) {
                checked_near = true;
                if let Some(full_chi2) = self.admit_missing_templates(s, spectrum, &p)? {
                    let (scale, pen) = penalty(s, &p);
                    chi2 = full_chi2 + pen;
                    pen_scale = scale;
                    best_x.clone_from(&s.x);
                    need_jac = true;
                    continue;
                }
                s.complete_at_exit = converged;
            }
            if converged {
                break;
            }
        }
        // Leave the scratch (columns, weights, residuals) at the solution, with its Jacobian.
        if !state_at_p {
            s.x = best_x;
            self.evaluate(s, spectrum, &p)?;
            need_jac = true;
        }
        if need_jac {
            self.jacobian(s, spectrum, &p);
        }
        for a in 0..npar {
            for b in 0..npar {
                jtj[a * npar + b] = dot(&s.jac[a * ng..(a + 1) * ng], &s.jac[b * ng..(b + 1) * ng]);
            }
        }
        let cov = spd_inverse(&jtj, npar).unwrap_or_else(|| vec![0.0; npar * npar]);
        Ok((p, cov))
    }

    /// pPXF's `clean`: clip pixels deviating more than the Gaussian expectation of ~one
    /// outlier, re-solving the linear weights, until the mask stops changing.
    fn clean_mask(
        &self,
        s: &mut FitScratch,
        spectrum: &Spectrum,
        good: &[bool],
        p: &[f64],
    ) -> Result<Vec<bool>, FitError> {
        let original: Vec<usize> = (0..self.grid.npix).filter(|&i| good[i]).collect();
        let clip = -inverse_normal_cdf(0.5 / original.len() as f64);
        let mut current = good.to_vec();
        for _ in 0..5 {
            self.set_mask(s, spectrum, &current);
            self.evaluate(s, spectrum, p)?;
            let sigma = robust_sigma(&s.resid);
            let model = self.model_all_pixels(s);
            let mut next = vec![false; self.grid.npix];
            for &i in &original {
                let err = (spectrum.flux[i] - model[i]) / spectrum.noise[i];
                next[i] = err.abs() < clip * sigma;
            }
            if next == current {
                break;
            }
            current = next;
        }
        Ok(current)
    }
}

/// Upper bound of the fitted A_V, mag (lower bound 0: dust does not brighten).
pub const MAX_AV: f64 = 10.0;

/// Legendre polynomials P_0..P_deg at each x.
pub fn legendre_table(x: &[f64], deg: usize) -> Vec<Vec<f64>> {
    let mut table = vec![vec![1.0; x.len()]];
    if deg >= 1 {
        table.push(x.to_vec());
    }
    for n in 1..deg {
        let next: Vec<f64> = (0..x.len())
            .map(|i| {
                ((2 * n + 1) as f64 * x[i] * table[n][i] - n as f64 * table[n - 1][i])
                    / (n + 1) as f64
            })
            .collect();
        table.push(next);
    }
    table
}

/// Orthonormal basis of the templates by eigen-decomposition of their Gram matrix, truncated
/// once every template is reproduced to `tolerance` (relative RMS).
fn compress(spectra: &[Vec<f64>], tolerance: f64) -> (Vec<Vec<f64>>, Mix) {
    let n = spectra.len();
    let len = spectra[0].len();
    let mut gram = vec![0.0; n * n];
    for i in 0..n {
        for j in i..n {
            let v = dot(&spectra[i], &spectra[j]);
            gram[i * n + j] = v;
            gram[j * n + i] = v;
        }
    }
    let (values, vectors) = symmetric_eigen(&gram, n);
    // Squared residual of template j with k components: G_jj - sum_{a<k} (s_a V_ja)^2.
    let mut k = n;
    let mut resid: Vec<f64> = (0..n).map(|j| gram[j * n + j]).collect();
    for a in 0..n {
        let lam = values[a].max(0.0);
        for (j, r) in resid.iter_mut().enumerate() {
            *r -= lam * vectors[j * n + a].powi(2);
        }
        let worst = (0..n)
            .map(|j| (resid[j].max(0.0) / gram[j * n + j].max(f64::MIN_POSITIVE)).sqrt())
            .fold(0.0, f64::max);
        if worst < tolerance {
            k = a + 1;
            break;
        }
    }
    let mut basis = vec![vec![0.0; len]; k];
    let mut c = vec![0.0; k * n];
    for a in 0..k {
        let sv = values[a].max(f64::MIN_POSITIVE).sqrt();
        for j in 0..n {
            let v = vectors[j * n + a];
            c[a * n + j] = sv * v;
            let coef = v / sv;
            for (b, t) in basis[a].iter_mut().zip(&spectra[j]) {
                *b += coef * t;
            }
        }
    }
    (basis, Mix::Dense { k, n, c })
}

/// regul^2 D^T D for the second-order (Laplacian) regularisation over the age x [M/H] grid.
fn regularisation(templates: &PreparedTemplates, regul: f64) -> Result<Vec<f64>, FitError> {
    let ssp = templates.ssp.as_ref().ok_or_else(|| {
        FitError::Config("regularisation needs templates on an age x metallicity grid".into())
    })?;
    let (na, nm) = (templates.ages.len(), templates.metals.len());
    let nt = templates.len();
    let mut index = vec![None; na * nm];
    for (j, p) in ssp.iter().enumerate() {
        index[p.age_index * nm + p.metal_index] = Some(j);
    }
    if index.iter().any(Option::is_none) {
        return Err(FitError::Config(
            "regularisation needs a complete age x metallicity grid".into(),
        ));
    }
    let at = |a: usize, m: usize| index[a * nm + m].unwrap_or(0);
    let mut dtd = vec![0.0; nt * nt];
    let mut row = vec![0.0; nt];
    for a in 0..na {
        for m in 0..nm {
            row.fill(0.0);
            if a > 0 && a + 1 < na {
                row[at(a - 1, m)] += regul;
                row[at(a, m)] -= 2.0 * regul;
                row[at(a + 1, m)] += regul;
            }
            if m > 0 && m + 1 < nm {
                row[at(a, m - 1)] += regul;
                row[at(a, m)] -= 2.0 * regul;
                row[at(a, m + 1)] += regul;
            }
            for i in 0..nt {
                if row[i] == 0.0 {
                    continue;
                }
                for j in 0..nt {
                    dtd[i * nt + j] += row[i] * row[j];
                }
            }
        }
    }
    Ok(dtd)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fitter_is_shared_across_threads_and_scratch_moves_between_them() {
        fn shared<T: Send + Sync>() {}
        fn movable<T: Send>() {}
        shared::<Fitter>();
        movable::<FitScratch>();
    }

    #[test]
    fn legendre_polynomials_match_closed_forms() {
        let x = [-1.0, -0.3, 0.0, 0.5, 1.0];
        let t = legendre_table(&x, 3);
        for (i, &v) in x.iter().enumerate() {
            assert!((t[2][i] - 0.5 * (3.0 * v * v - 1.0)).abs() < 1e-14);
            assert!((t[3][i] - 0.5 * (5.0 * v * v * v - 3.0 * v)).abs() < 1e-14);
        }
    }

    #[test]
    fn compressed_basis_reproduces_templates_within_tolerance() {
        let spectra: Vec<Vec<f64>> = (0..6)
            .map(|j| {
                (0..200)
                    .map(|i| {
                        1.0 + 0.1 * j as f64 * (i as f64 / 9.0).sin()
                            + 0.05 * ((i * (j + 1)) as f64 / 5.0).cos()
                    })
                    .collect()
            })
            .collect();
        let (basis, mix) = compress(&spectra, 1e-6);
        let Mix::Dense { k, n, c } = mix else {
            panic!("expected a dense mix")
        };
        assert!(k <= 6 && n == 6 && basis.len() == k);
        for j in 0..n {
            let approx: Vec<f64> = (0..200)
                .map(|i| (0..k).map(|a| basis[a][i] * c[a * n + j]).sum())
                .collect();
            let err: f64 = approx
                .iter()
                .zip(&spectra[j])
                .map(|(a, b)| (a - b).powi(2))
                .sum::<f64>()
                .sqrt();
            let norm: f64 = spectra[j].iter().map(|v| v * v).sum::<f64>().sqrt();
            assert!(err < 1e-6 * norm, "template {j}: {err}");
        }
    }
}

//! Non-negative least squares on the normal equations, with leading unconstrained variables
//! (the additive polynomial) and a warm start from a previous passive set (Lawson & Hanson
//! 1974 active-set method, applied to Q = A^T A and b = A^T y).
//!
//! The fitter builds Q from a small orthonormal basis, so working on Q instead of A costs
//! O(n_passive^3) per step, independent of the number of pixels.

#![allow(clippy::needless_range_loop)] // numeric kernels index several arrays in lockstep

use crate::linalg::{cholesky, cholesky_solve};

/// A symmetric positive semi-definite normal matrix Q = A^T A, given by its entries and its
/// product with a vector, so callers can keep it in factored form.
pub trait NormalMatrix {
    fn dim(&self) -> usize;
    fn entry(&self, i: usize, j: usize) -> f64;
    /// out = Q x
    fn mul(&self, x: &[f64], out: &mut [f64]);
    /// A positive estimate of Q[i, i] used only to scale the problem (the solution does not
    /// depend on it); lazily built matrices can avoid computing every column.
    fn diagonal_hint(&self, i: usize) -> f64 {
        self.entry(i, i)
    }
    /// out = b - Q x, the negative gradient of the objective.
    fn gradient(&self, b: &[f64], x: &[f64], out: &mut [f64]) {
        self.mul(x, out);
        for (o, bi) in out.iter_mut().zip(b) {
            *o = bi - *o;
        }
    }
    /// Entry i of the right-hand side; lazily built problems may compute it on demand
    /// (then `b[i]` may be a placeholder).
    fn rhs(&self, i: usize, b: &[f64]) -> f64 {
        b[i]
    }
}

/// A dense row-major normal matrix.
#[derive(Debug, Clone, Copy)]
pub struct DenseNormal<'a> {
    pub q: &'a [f64],
    pub n: usize,
}

impl NormalMatrix for DenseNormal<'_> {
    fn dim(&self) -> usize {
        self.n
    }

    fn entry(&self, i: usize, j: usize) -> f64 {
        self.q[i * self.n + j]
    }

    fn mul(&self, x: &[f64], out: &mut [f64]) {
        for (i, o) in out.iter_mut().enumerate().take(self.n) {
            *o = self.q[i * self.n..(i + 1) * self.n]
                .iter()
                .zip(x)
                .map(|(a, b)| a * b)
                .sum();
        }
    }
}

/// Reusable buffers for [`NnlsSolver::solve`].
#[derive(Debug, Clone, Default)]
pub struct NnlsSolver {
    scale: Vec<f64>,
    unscaled: Vec<f64>,
    product: Vec<f64>,
    factor: Vec<f64>,
    rhs: Vec<f64>,
    z: Vec<f64>,
    grad: Vec<f64>,
    passive: Vec<bool>,
    index: Vec<usize>,
}

/// Outcome of one solve: `x` and how many passive-set changes it took.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NnlsStats {
    pub iterations: usize,
}

impl NnlsSolver {
    /// Minimise x^T Q x / 2 - b^T x subject to x[j] >= 0 for j >= `n_free`.
    /// On entry, the positive entries of `x` (if any) seed the passive set; on exit `x` holds
    /// the solution.
    pub fn solve(
        &mut self,
        q: &dyn NormalMatrix,
        b: &[f64],
        n_free: usize,
        x: &mut [f64],
    ) -> Result<NnlsStats, String> {
        let n = b.len();
        debug_assert_eq!(q.dim(), n);
        self.resize(n);
        // Equilibrate: unit diagonal keeps polynomials and templates on one footing.
        for i in 0..n {
            let d = q.diagonal_hint(i);
            self.scale[i] = if d > 0.0 { 1.0 / d.sqrt() } else { 0.0 };
        }
        for i in 0..n {
            self.passive[i] = i < n_free || (x[i] > 0.0 && self.scale[i] > 0.0);
            x[i] = 0.0;
        }
        let mut tol: Option<f64> = None;
        let mut iterations = 0;
        let max_iter = 3 * n + 30;

        // Warm start: drop seeded variables that come out non-positive until the passive-set
        // solution is feasible; that is a valid starting point for Lawson-Hanson.
        loop {
            self.solve_passive(q, b, n)?;
            let mut dropped = false;
            for i in n_free..n {
                if self.passive[i] && self.z[i] <= 0.0 {
                    self.passive[i] = false;
                    dropped = true;
                }
            }
            if !dropped {
                break;
            }
        }
        for i in 0..n {
            x[i] = if self.passive[i] { self.z[i] } else { 0.0 };
        }
        loop {
            // Gradient of the objective's negative, scaled: w = b - Q x.
            for i in 0..n {
                self.unscaled[i] = x[i] * self.scale[i];
            }
            q.gradient(b, &self.unscaled, &mut self.product);
            for i in 0..n {
                self.grad[i] = self.scale[i] * self.product[i];
            }
            // Optimality is judged relative to the first gradient's size.
            let tol = *tol.get_or_insert_with(|| {
                1e-11
                    * self
                        .grad
                        .iter()
                        .fold(0.0f64, |m, v| m.max(v.abs()))
                        .max(f64::MIN_POSITIVE)
            });
            let mut best = None;
            let mut best_w = tol;
            for i in n_free..n {
                if !self.passive[i] && self.scale[i] > 0.0 && self.grad[i] > best_w {
                    best_w = self.grad[i];
                    best = Some(i);
                }
            }
            let Some(enter) = best else { break };
            iterations += 1;
            if iterations > max_iter {
                break;
            }
            self.passive[enter] = true;
            self.solve_passive(q, b, n)?;
            if self.z[enter] <= 0.0 {
                // Rounding: the entering variable cannot move; stop rather than cycle.
                self.passive[enter] = false;
                break;
            }
            self.restore_feasibility(q, b, n, n_free, x, &mut iterations, max_iter)?;
        }
        for i in 0..n {
            x[i] *= self.scale[i];
        }
        Ok(NnlsStats { iterations })
    }

    fn resize(&mut self, n: usize) {
        self.scale.resize(n, 0.0);
        self.unscaled.resize(n, 0.0);
        self.product.resize(n, 0.0);
        self.factor.resize(n * n, 0.0);
        self.rhs.resize(n, 0.0);
        self.z.resize(n, 0.0);
        self.grad.resize(n, 0.0);
        self.passive.resize(n, false);
    }

    /// Inner Lawson-Hanson loop: move from x towards the passive-set solution z, dropping
    /// variables that hit zero, until z is feasible.
    #[allow(clippy::too_many_arguments)]
    fn restore_feasibility(
        &mut self,
        q: &dyn NormalMatrix,
        b: &[f64],
        n: usize,
        n_free: usize,
        x: &mut [f64],
        iterations: &mut usize,
        max_iter: usize,
    ) -> Result<(), String> {
        loop {
            // Step length to the first passive variable that would turn negative.
            let mut blocking = None;
            let mut alpha = 1.0f64;
            for i in n_free..n {
                if self.passive[i] && self.z[i] <= 0.0 {
                    let denom = x[i] - self.z[i];
                    let a = if denom > 0.0 { x[i] / denom } else { 0.0 };
                    if blocking.is_none() || a < alpha {
                        alpha = a;
                        blocking = Some(i);
                    }
                }
            }
            let Some(blocking) = blocking else {
                for i in 0..n {
                    x[i] = if self.passive[i] { self.z[i] } else { 0.0 };
                }
                return Ok(());
            };
            *iterations += 1;
            if *iterations > max_iter {
                return Err("NNLS did not converge".into());
            }
            for i in 0..n {
                if self.passive[i] {
                    x[i] += alpha * (self.z[i] - x[i]);
                }
            }
            x[blocking] = 0.0;
            for i in n_free..n {
                if self.passive[i] && x[i] <= 0.0 {
                    self.passive[i] = false;
                    x[i] = 0.0;
                }
            }
            self.solve_passive(q, b, n)?;
        }
    }

    /// z = Q_PP^{-1} b_P (zero outside P), with a tiny ridge against exact collinearity.
    fn solve_passive(&mut self, q: &dyn NormalMatrix, b: &[f64], n: usize) -> Result<(), String> {
        self.index.clear();
        self.index.extend((0..n).filter(|&i| self.passive[i]));
        let m = self.index.len();
        for (a, &i) in self.index.iter().enumerate() {
            for (c, &j) in self.index.iter().enumerate() {
                self.factor[a * m + c] = q.entry(i, j) * self.scale[i] * self.scale[j];
            }
            self.factor[a * m + a] += 1e-12;
            self.rhs[a] = q.rhs(i, b) * self.scale[i];
        }
        if !cholesky(&mut self.factor[..m * m], m) {
            return Err("normal equations are not positive definite".into());
        }
        cholesky_solve(&self.factor[..m * m], m, &mut self.rhs[..m]);
        self.z.fill(0.0);
        for (a, &i) in self.index.iter().enumerate() {
            self.z[i] = self.rhs[a];
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::{Rng, SeedableRng};

    fn normal_equations(a: &[Vec<f64>], y: &[f64]) -> (Vec<f64>, Vec<f64>) {
        let n = a.len();
        let mut q = vec![0.0; n * n];
        let mut b = vec![0.0; n];
        for i in 0..n {
            for j in 0..n {
                q[i * n + j] = a[i].iter().zip(&a[j]).map(|(u, v)| u * v).sum();
            }
            b[i] = a[i].iter().zip(y).map(|(u, v)| u * v).sum();
        }
        (q, b)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// KKT: x >= 0 on constrained entries; gradient zero on free and positive entries,
        /// and pointing into the constraint (b - Qx <= 0) where x = 0.
        #[test]
        fn kkt_conditions_hold(seed in 0u64..10_000, n_free in 0usize..3, ncol in 1usize..12,
                               warm in proptest::bool::ANY) {
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
            let nrow = 40;
            let a: Vec<Vec<f64>> = (0..n_free + ncol)
                .map(|_| (0..nrow).map(|_| rng.gen_range(-1.0..1.0)).collect())
                .collect();
            let y: Vec<f64> = (0..nrow).map(|_| rng.gen_range(-2.0..2.0)).collect();
            let (q, b) = normal_equations(&a, &y);
            let n = n_free + ncol;
            let mut x: Vec<f64> = if warm { (0..n).map(|_| rng.gen_range(-1.0..1.0)).collect() } else { vec![0.0; n] };
            NnlsSolver::default().solve(&DenseNormal { q: &q, n }, &b, n_free, &mut x).unwrap();
            let scale = b.iter().fold(1.0f64, |m, v| m.max(v.abs()));
            for i in 0..n {
                let g: f64 = b[i] - (0..n).map(|j| q[i * n + j] * x[j]).sum::<f64>();
                if i < n_free || x[i] > 0.0 {
                    prop_assert!(g.abs() < 1e-8 * scale, "gradient {g} at active {i}");
                } else {
                    prop_assert!(x[i] == 0.0);
                    prop_assert!(g < 1e-8 * scale, "gradient {g} at bound {i}");
                }
            }
        }
    }

    #[test]
    fn recovers_a_nonnegative_solution_exactly() {
        let a = vec![
            vec![1.0, 0.0, 1.0, 2.0],
            vec![0.0, 1.0, 1.0, 0.5],
            vec![1.0, 1.0, 0.0, 1.0],
        ];
        let truth = [2.0, 0.0, 0.5];
        let y: Vec<f64> = (0..4)
            .map(|r| (0..3).map(|c| a[c][r] * truth[c]).sum())
            .collect();
        let (q, b) = normal_equations(&a, &y);
        let mut x = vec![0.0; 3];
        NnlsSolver::default()
            .solve(&DenseNormal { q: &q, n: 3 }, &b, 0, &mut x)
            .unwrap();
        for (got, want) in x.iter().zip(truth) {
            assert!((got - want).abs() < 1e-9);
        }
    }
}

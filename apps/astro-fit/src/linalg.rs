//! Small dense linear algebra for the fitter: Cholesky solves on symmetric positive definite
//! systems (row-major, n x n) and a cyclic Jacobi eigen-decomposition for the template basis.

#![allow(clippy::needless_range_loop)] // numeric kernels index several arrays in lockstep

/// In-place Cholesky factorisation of the leading `n x n` block of `a` (row-major, stride `n`).
/// Returns false when the matrix is not positive definite to working precision.
pub fn cholesky(a: &mut [f64], n: usize) -> bool {
    for j in 0..n {
        let mut d = a[j * n + j];
        for k in 0..j {
            d -= a[j * n + k] * a[j * n + k];
        }
        if d.is_nan() || d <= 0.0 {
            return false;
        }
        let d = d.sqrt();
        a[j * n + j] = d;
        for i in j + 1..n {
            let mut s = a[i * n + j];
            for k in 0..j {
                s -= a[i * n + k] * a[j * n + k];
            }
            a[i * n + j] = s / d;
        }
    }
    true
}

/// Solve L L^T x = b in place given the factor from [`cholesky`].
pub fn cholesky_solve(l: &[f64], n: usize, b: &mut [f64]) {
    for i in 0..n {
        let mut s = b[i];
        for k in 0..i {
            s -= l[i * n + k] * b[k];
        }
        b[i] = s / l[i * n + i];
    }
    for i in (0..n).rev() {
        let mut s = b[i];
        for k in i + 1..n {
            s -= l[k * n + i] * b[k];
        }
        b[i] = s / l[i * n + i];
    }
}

/// Inverse of a symmetric positive definite matrix (row-major), or None if singular.
pub fn spd_inverse(a: &[f64], n: usize) -> Option<Vec<f64>> {
    let mut l = a.to_vec();
    if !cholesky(&mut l, n) {
        return None;
    }
    let mut inv = vec![0.0; n * n];
    let mut col = vec![0.0; n];
    for j in 0..n {
        col.fill(0.0);
        col[j] = 1.0;
        cholesky_solve(&l, n, &mut col);
        for i in 0..n {
            inv[i * n + j] = col[i];
        }
    }
    Some(inv)
}

/// Eigen-decomposition of a symmetric matrix by cyclic Jacobi rotations. Returns the
/// eigenvalues in decreasing order and the eigenvectors as columns (row-major n x n).
pub fn symmetric_eigen(a: &[f64], n: usize) -> (Vec<f64>, Vec<f64>) {
    let mut m = a.to_vec();
    let mut v = vec![0.0; n * n];
    for i in 0..n {
        v[i * n + i] = 1.0;
    }
    let total: f64 = m.iter().map(|x| x * x).sum::<f64>().max(f64::MIN_POSITIVE);
    for _sweep in 0..100 {
        let off: f64 = (0..n)
            .flat_map(|i| (0..n).filter(move |&j| j != i).map(move |j| (i, j)))
            .map(|(i, j)| m[i * n + j] * m[i * n + j])
            .sum();
        if off <= 1e-30 * total {
            break;
        }
        for p in 0..n {
            for q in p + 1..n {
                let apq = m[p * n + q];
                if apq.abs() <= 1e-300 {
                    continue;
                }
                let theta = (m[q * n + q] - m[p * n + p]) / (2.0 * apq);
                let t = theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt());
                let t = if theta == 0.0 { 1.0 } else { t };
                let c = 1.0 / (t * t + 1.0).sqrt();
                let s = t * c;
                for k in 0..n {
                    let mkp = m[k * n + p];
                    let mkq = m[k * n + q];
                    m[k * n + p] = c * mkp - s * mkq;
                    m[k * n + q] = s * mkp + c * mkq;
                }
                for k in 0..n {
                    let mpk = m[p * n + k];
                    let mqk = m[q * n + k];
                    m[p * n + k] = c * mpk - s * mqk;
                    m[q * n + k] = s * mpk + c * mqk;
                }
                for k in 0..n {
                    let vkp = v[k * n + p];
                    let vkq = v[k * n + q];
                    v[k * n + p] = c * vkp - s * vkq;
                    v[k * n + q] = s * vkp + c * vkq;
                }
            }
        }
    }
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&i, &j| m[j * n + j].total_cmp(&m[i * n + i]));
    let values = order.iter().map(|&i| m[i * n + i]).collect();
    let mut vectors = vec![0.0; n * n];
    for (new, &old) in order.iter().enumerate() {
        for k in 0..n {
            vectors[k * n + new] = v[k * n + old];
        }
    }
    (values, vectors)
}

/// Dot product with eight independent partial sums (lanes vectorise; no reassociation needed
/// from the compiler). Runs with the widest vector instructions the CPU has (`pulp` detects
/// them at run time); the summation order, hence the result, is the same on every CPU.
pub fn dot(a: &[f64], b: &[f64]) -> f64 {
    pulp::Arch::new().dispatch(|| dot_lanes(a, b))
}

#[inline(always)]
fn dot_lanes(a: &[f64], b: &[f64]) -> f64 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0.0f64; 8];
    let mut ca = a.chunks_exact(8);
    let mut cb = b.chunks_exact(8);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    let tail: f64 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    (acc[0] + acc[4]) + (acc[1] + acc[5]) + (acc[2] + acc[6]) + (acc[3] + acc[7]) + tail
}

/// Gram matrix G = X^T X of `k` columns of length `n` stored one after another in `cols`,
/// written to `out` (k x k, row-major). Blocks of 2 x 2 columns with 2 lanes keep the partial
/// sums in registers, so each pixel value is loaded once per block instead of once per pair.
pub fn gram(cols: &[f64], k: usize, n: usize, out: &mut [f64]) {
    pulp::Arch::new().dispatch(|| gram_blocks(cols, k, n, out));
}

#[inline(always)]
fn gram_blocks(cols: &[f64], k: usize, n: usize, out: &mut [f64]) {
    let col = |a: usize| &cols[a * n..(a + 1) * n];
    let mut a = 0;
    while a < k {
        let a2 = (a + 1).min(k - 1);
        let mut b = a;
        while b < k {
            let b2 = (b + 1).min(k - 1);
            let (x0, x1, y0, y1) = (col(a), col(a2), col(b), col(b2));
            let mut acc = [[0.0f64; 4]; 4];
            let pairs = n / 4;
            for p in 0..pairs {
                let i = 4 * p;
                for l in 0..4 {
                    let (u0, u1, v0, v1) = (x0[i + l], x1[i + l], y0[i + l], y1[i + l]);
                    acc[0][l] += u0 * v0;
                    acc[1][l] += u0 * v1;
                    acc[2][l] += u1 * v0;
                    acc[3][l] += u1 * v1;
                }
            }
            let mut sums = [0.0f64; 4];
            for (s, lanes) in sums.iter_mut().zip(&acc) {
                *s = (lanes[0] + lanes[2]) + (lanes[1] + lanes[3]);
            }
            for i in 4 * pairs..n {
                sums[0] += x0[i] * y0[i];
                sums[1] += x0[i] * y1[i];
                sums[2] += x1[i] * y0[i];
                sums[3] += x1[i] * y1[i];
            }
            for (idx, (r, c)) in [(a, b), (a, b2), (a2, b), (a2, b2)].into_iter().enumerate() {
                out[r * k + c] = sums[idx];
                out[c * k + r] = sums[idx];
            }
            b += 2;
        }
        a += 2;
    }
}

/// y += alpha x, with the widest vector instructions the CPU has.
pub fn axpy(alpha: f64, x: &[f64], y: &mut [f64]) {
    pulp::Arch::new().dispatch(|| {
        for (yi, xi) in y.iter_mut().zip(x) {
            *yi += alpha * xi;
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cholesky_solves_and_inverts() {
        let a = [4.0, 2.0, 0.6, 2.0, 5.0, 1.0, 0.6, 1.0, 3.0];
        let inv = spd_inverse(&a, 3).unwrap();
        for i in 0..3 {
            for j in 0..3 {
                let s: f64 = (0..3).map(|k| a[i * 3 + k] * inv[k * 3 + j]).sum();
                assert!((s - if i == j { 1.0 } else { 0.0 }).abs() < 1e-12);
            }
        }
        assert!(spd_inverse(&[1.0, 2.0, 2.0, 1.0], 2).is_none());
    }

    #[test]
    fn blocked_gram_matches_dot_products() {
        for (k, n) in [(1, 5), (3, 7), (4, 9), (5, 13)] {
            let cols: Vec<f64> = (0..k * n)
                .map(|i| ((i * 37 % 11) as f64 - 5.0) * 0.3)
                .collect();
            let mut g = vec![0.0; k * k];
            gram(&cols, k, n, &mut g);
            for a in 0..k {
                for b in 0..k {
                    let want = dot(&cols[a * n..(a + 1) * n], &cols[b * n..(b + 1) * n]);
                    assert!((g[a * k + b] - want).abs() < 1e-12, "k={k} n={n} ({a},{b})");
                }
            }
        }
    }

    #[test]
    fn jacobi_reconstructs_the_matrix() {
        let n = 5;
        let a: Vec<f64> = (0..n * n)
            .map(|k| {
                let (i, j) = (k / n, k % n);
                1.0 / (1.0 + i as f64 + j as f64)
            })
            .collect();
        let (vals, vecs) = symmetric_eigen(&a, n);
        assert!(vals.windows(2).all(|w| w[0] >= w[1]));
        for i in 0..n {
            for j in 0..n {
                let s: f64 = (0..n)
                    .map(|k| vecs[i * n + k] * vals[k] * vecs[j * n + k])
                    .sum();
                assert!((s - a[i * n + j]).abs() < 1e-12);
            }
        }
    }
}

//! Robust statistics used by the fitter.

/// Biweight scale of values around zero (Hoaglin, Mosteller & Tukey 1983, ch. 12B), the
/// estimator pPXF uses for clipping and for the h3..h6 penalty.
pub fn robust_sigma(y: &[f64]) -> f64 {
    if y.is_empty() {
        return 0.0;
    }
    let mut abs: Vec<f64> = y.iter().map(|v| v.abs()).collect();
    let mid = abs.len() / 2;
    let mad = *abs.select_nth_unstable_by(mid, f64::total_cmp).1;
    if mad == 0.0 {
        return 0.0;
    }
    let (mut num, mut den) = (0.0, 0.0);
    for &d in y {
        let u2 = (d / (9.0 * mad)).powi(2);
        if u2 < 1.0 {
            let u1 = 1.0 - u2;
            num += (d * u1 * u1).powi(2);
            den += u1 * (1.0 - 5.0 * u2);
        }
    }
    let n = y.len() as f64;
    (n * num / (den * (den - 1.0))).sqrt()
}

/// Inverse of the standard normal CDF (Acklam's rational approximation, relative error < 1.2e-9).
pub fn inverse_normal_cdf(p: f64) -> f64 {
    const A: [f64; 6] = [
        -3.969683028665376e1,
        2.209460984245205e2,
        -2.759285104469687e2,
        1.38357751867269e2,
        -3.066479806614716e1,
        2.506628277459239,
    ];
    const B: [f64; 5] = [
        -5.447609879822406e1,
        1.615858368580409e2,
        -1.556989798598866e2,
        6.680131188771972e1,
        -1.328068155288572e1,
    ];
    const C: [f64; 6] = [
        -7.784894002430293e-3,
        -3.223964580411365e-1,
        -2.400758277161838,
        -2.549732539343734,
        4.374664141464968,
        2.938163982698783,
    ];
    const D: [f64; 4] = [
        7.784695709041462e-3,
        3.224671290700398e-1,
        2.445134137142996,
        3.754408661907416,
    ];
    let p = p.clamp(1e-300, 1.0 - 1e-16);
    let tail = |q: f64| {
        (((((C[0] * q + C[1]) * q + C[2]) * q + C[3]) * q + C[4]) * q + C[5])
            / ((((D[0] * q + D[1]) * q + D[2]) * q + D[3]) * q + 1.0)
    };
    if p < 0.02425 {
        tail((-2.0 * p.ln()).sqrt())
    } else if p > 1.0 - 0.02425 {
        -tail((-2.0 * (1.0 - p).ln()).sqrt())
    } else {
        let q = p - 0.5;
        let r = q * q;
        (((((A[0] * r + A[1]) * r + A[2]) * r + A[3]) * r + A[4]) * r + A[5]) * q
            / (((((B[0] * r + B[1]) * r + B[2]) * r + B[3]) * r + B[4]) * r + 1.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_distr::{Distribution, Normal};

    #[test]
    fn quantiles_match_known_values() {
        assert!((inverse_normal_cdf(0.975) - 1.959963985).abs() < 1e-7);
        assert!((inverse_normal_cdf(1e-4) + 3.719016485).abs() < 1e-6);
        assert!(inverse_normal_cdf(0.5).abs() < 1e-12);
    }

    #[test]
    fn biweight_scale_of_gaussian_noise_is_one_and_ignores_outliers() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let normal = Normal::new(0.0, 1.0).unwrap();
        let mut y: Vec<f64> = (0..20000).map(|_| normal.sample(&mut rng)).collect();
        assert!((robust_sigma(&y) - 1.0).abs() < 0.03);
        for v in y.iter_mut().take(200) {
            *v = 1e3;
        }
        assert!((robust_sigma(&y) - 1.0).abs() < 0.05);
    }
}

//! Dust attenuation of the stellar continuum: the Calzetti et al. (2000, ApJ 533, 682) curve,
//! as pPXF's `reddening` applies it to the stellar templates.

/// R'_V of the stellar continuum (Calzetti et al. 2000, eq. 5).
pub const CALZETTI_RV: f64 = 4.05;

/// Calzetti et al. (2000) eq. 4: k'(lambda) for a rest-frame wavelength in Angstrom,
/// 2.659 (-2.156 + 1.509/l - 0.198/l^2 + 0.011/l^3) + R'_V for 0.12 <= l < 0.63 micron and
/// 2.659 (-1.857 + 1.040/l) + R'_V for 0.63 <= l <= 2.20 micron. Outside 0.12-2.20 micron the
/// two forms are extrapolated, and k' is floored at 0 (beyond ~2.9 micron the second form
/// turns negative, which would brighten the spectrum), as pPXF does.
pub fn calzetti_k(lam_angstrom: f64) -> f64 {
    let x = 1e4 / lam_angstrom; // 1 / lambda in micron^-1
    let k = if lam_angstrom >= 6300.0 {
        2.659 * (-1.857 + 1.040 * x) + CALZETTI_RV
    } else {
        2.659 * (-2.156 + x * (1.509 + x * (-0.198 + x * 0.011))) + CALZETTI_RV
    };
    k.max(0.0)
}

/// The fraction of the flux at `lam_angstrom` that a screen of `a_v` magnitudes (A_V) lets
/// through: 10^(-0.4 A_V k'(lambda) / R'_V) (Calzetti et al. 2000, eq. 2 with A_V =
/// E_s(B-V) R'_V).
pub fn attenuation(lam_angstrom: f64, a_v: f64) -> f64 {
    10f64.powf(-0.4 * a_v * calzetti_k(lam_angstrom) / CALZETTI_RV)
}

/// d ln(attenuation) / d A_V at `lam_angstrom`: the attenuation is exp(A_V x this), which is
/// how the fitter evaluates it and its derivative (one exp per pixel).
pub fn ln_attenuation_per_av(lam_angstrom: f64) -> f64 {
    -0.4 * std::f64::consts::LN_10 * calzetti_k(lam_angstrom) / CALZETTI_RV
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn curve_matches_the_papers_values() {
        // At V (5500 A) k' = R'_V: A_V is the attenuation in V.
        assert!((calzetti_k(5500.0) - CALZETTI_RV).abs() < 0.01);
        // Calzetti (2000) eq. 4 by hand at 0.40 and 1.00 micron.
        let k04 = 2.659 * (-2.156 + 1.509 / 0.4 - 0.198 / 0.16 + 0.011 / 0.064) + 4.05;
        assert!((calzetti_k(4000.0) - k04).abs() < 1e-12);
        assert!((calzetti_k(10000.0) - (2.659 * (-1.857 + 1.040) + 4.05)).abs() < 1e-12);
        // The two forms meet at 0.63 micron to within the paper's rounding.
        assert!((calzetti_k(6299.999) - calzetti_k(6300.0)).abs() < 0.03);
        // Bluer light is attenuated more; never brightened.
        assert!(calzetti_k(3600.0) > calzetti_k(5000.0));
        assert!(calzetti_k(5000.0) > calzetti_k(9000.0));
        assert_eq!(calzetti_k(1e6), 0.0);
        let a = attenuation(4500.0, 0.5);
        assert!(
            (a - (ln_attenuation_per_av(4500.0) * 0.5).exp()).abs() < 1e-12,
            "{a}"
        );
        assert!((attenuation(5500.0, 1.0) - 10f64.powf(-0.4)).abs() < 1e-3);
    }
}

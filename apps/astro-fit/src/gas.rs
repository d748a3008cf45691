//! Gas emission lines fitted together with the stars (Cappellari 2017, sec. 3.3 and 4; pPXF's
//! `emission_lines` with `tie_balmer=False`, `limit_doublets=False`).
//!
//! Every line is a Gaussian of the instrumental width at its wavelength (the line-spread
//! function), broadened by the Gaussian LOSVD of its kinematic component and integrated over
//! each galaxy pixel in ln lambda. The convolution of two Gaussians is a Gaussian, and the mean
//! over the `velscale_ratio` template samples of a galaxy pixel of pixel-integrated samples is
//! the integral over the galaxy pixel, so a column is a difference of normal CDFs: the same
//! numbers pPXF obtains with FFTs of its sampled templates (up to aliasing, which vanishes for
//! lines wider than a pixel), with analytic derivatives in V and sigma.
//!
//! Doublets with a fixed ratio ([OIII], [OI], [NII]) are one template holding both lines, named
//! after the stronger one with `_d` as pPXF names them. Lines whose names start with `[` are
//! forbidden; the others (the Balmer series, He lines) share the `balmer` component, as in
//! pPXF's examples.

use crate::error::FitError;
use crate::fit::LogGrid;
use crate::templates::{C_KMS, Medium, ResolutionCurve, convert_medium};

/// pPXF's FWHM-to-sigma factor.
const FWHM_TO_SIGMA: f64 = 2.355;

/// Which kinematic component a line belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum GasKind {
    Balmer,
    Forbidden,
}

struct LineDef {
    name: &'static str,
    /// Vacuum wavelengths (Angstrom) of the lines in the template.
    waves: &'static [f64],
    /// Relative fluxes of those lines.
    ratios: &'static [f64],
    /// Index (in `waves`) of the line the template is named after.
    named: usize,
}

/// The lines of pPXF 9.5's `emission_lines` (tie_balmer=False, limit_doublets=False), in its
/// order, with the vacuum wavelengths it uses.
const CATALOGUE: &[LineDef] = &[
    LineDef {
        name: "H10",
        waves: &[3798.983],
        ratios: &[1.0],
        named: 0,
    },
    LineDef {
        name: "H9",
        waves: &[3836.479],
        ratios: &[1.0],
        named: 0,
    },
    LineDef {
        name: "H8",
        waves: &[3890.158],
        ratios: &[1.0],
        named: 0,
    },
    LineDef {
        name: "Heps",
        waves: &[3971.202],
        ratios: &[1.0],
        named: 0,
    },
    LineDef {
        name: "Hdelta",
        waves: &[4102.899],
        ratios: &[1.0],
        named: 0,
    },
    LineDef {
        name: "Hgamma",
        waves: &[4341.691],
        ratios: &[1.0],
        named: 0,
    },
    LineDef {
        name: "Hbeta",
        waves: &[4862.691],
        ratios: &[1.0],
        named: 0,
    },
    LineDef {
        name: "Halpha",
        waves: &[6564.632],
        ratios: &[1.0],
        named: 0,
    },
    LineDef {
        name: "[OII]3726",
        waves: &[3727.092],
        ratios: &[1.0],
        named: 0,
    },
    LineDef {
        name: "[OII]3729",
        waves: &[3729.875],
        ratios: &[1.0],
        named: 0,
    },
    LineDef {
        name: "[SII]6716",
        waves: &[6718.294],
        ratios: &[1.0],
        named: 0,
    },
    LineDef {
        name: "[SII]6731",
        waves: &[6732.674],
        ratios: &[1.0],
        named: 0,
    },
    LineDef {
        name: "[NeIII]3968",
        waves: &[3968.59],
        ratios: &[1.0],
        named: 0,
    },
    LineDef {
        name: "[NeIII]3869",
        waves: &[3869.86],
        ratios: &[1.0],
        named: 0,
    },
    LineDef {
        name: "HeII4687",
        waves: &[4687.015],
        ratios: &[1.0],
        named: 0,
    },
    LineDef {
        name: "HeI5876",
        waves: &[5877.243],
        ratios: &[1.0],
        named: 0,
    },
    LineDef {
        name: "[OIII]5007_d",
        waves: &[4960.295, 5008.240],
        ratios: &[0.33, 1.0],
        named: 1,
    },
    LineDef {
        name: "[OI]6300_d",
        waves: &[6302.040, 6365.535],
        ratios: &[1.0, 0.33],
        named: 0,
    },
    LineDef {
        name: "[NII]6583_d",
        waves: &[6549.860, 6585.271],
        ratios: &[0.33, 1.0],
        named: 1,
    },
];

/// Names of every line astro-fit can fit, in pPXF's order.
pub fn line_names() -> Vec<&'static str> {
    CATALOGUE.iter().map(|d| d.name).collect()
}

/// One gas template on a galaxy grid.
#[derive(Debug, Clone, PartialEq)]
pub struct GasLine {
    pub name: String,
    pub kind: GasKind,
    /// Rest wavelength of the named line in the galaxy's medium, Angstrom.
    pub wave: f64,
    /// ln lambda of each line of the template (galaxy medium).
    centers: Vec<f64>,
    /// Vacuum wavelength of each line (Angstrom), for channel names.
    vacuum: Vec<f64>,
    ratios: Vec<f64>,
    /// Instrumental sigma of each line in ln lambda.
    sigma_inst: Vec<f64>,
}

/// The gas templates of a fit and their kinematic components.
#[derive(Debug, Clone, PartialEq)]
pub struct GasTemplates {
    pub lines: Vec<GasLine>,
    /// Component of each line (index into `components`).
    pub component: Vec<usize>,
    /// Component names: `balmer`, `forbidden`, or `gas` when their kinematics are tied.
    pub components: Vec<&'static str>,
    /// Starting dispersion of the gas, km/s.
    pub sigma_start: f64,
    grid: LogGrid,
}

impl GasTemplates {
    /// The lines `names` (default: every catalogue line whose named wavelength lies inside the
    /// grid, as pPXF selects them) for a rest-frame grid in `medium` with the instrumental
    /// resolution `fwhm` (rest-frame Angstrom; None: lines are delta functions and the fitted
    /// sigma includes the instrument). With `tied`, all lines share one component.
    pub fn new(
        grid: &LogGrid,
        medium: Medium,
        fwhm: Option<&ResolutionCurve>,
        names: Option<&[String]>,
        tied: bool,
    ) -> Result<Self, FitError> {
        let (lo, hi) = (grid.lam(0), grid.lam(grid.npix.saturating_sub(1)));
        let to_medium = |w: f64| convert_medium(w, Medium::Vacuum, medium);
        let inside = |d: &LineDef| {
            let w = to_medium(d.waves[d.named]);
            lo < w && w < hi
        };
        let picked: Vec<&LineDef> = match names {
            None => CATALOGUE.iter().filter(|d| inside(d)).collect(),
            Some(names) => {
                let mut out = Vec::new();
                for n in names {
                    let d = CATALOGUE.iter().find(|d| d.name == n).ok_or_else(|| {
                        FitError::Config(format!(
                            "unknown emission line {n:?}; known: {}",
                            line_names().join(", ")
                        ))
                    })?;
                    if !inside(d) {
                        return Err(FitError::Config(format!(
                            "emission line {n} ({:.1} A) is outside the fitted range {lo:.1}-{hi:.1} A (rest frame)",
                            to_medium(d.waves[d.named])
                        )));
                    }
                    if !out.iter().any(|o: &&LineDef| o.name == d.name) {
                        out.push(d);
                    }
                }
                out
            }
        };
        if picked.is_empty() {
            return Err(FitError::Config(format!(
                "no emission line inside the fitted range {lo:.1}-{hi:.1} A (rest frame)"
            )));
        }
        let mut lines = Vec::with_capacity(picked.len());
        for d in picked {
            let waves: Vec<f64> = d.waves.iter().map(|&w| to_medium(w)).collect();
            let mut sigma_inst = Vec::with_capacity(waves.len());
            for &w in &waves {
                let f = fwhm.map_or(0.0, |c| c.at(w));
                if !(f.is_finite() && f >= 0.0) {
                    return Err(FitError::Resolution(format!(
                        "FWHM {f} A at the emission line {} ({w:.1} A)",
                        d.name
                    )));
                }
                sigma_inst.push(f / FWHM_TO_SIGMA / w);
            }
            lines.push(GasLine {
                name: d.name.to_string(),
                kind: if d.name.starts_with('[') {
                    GasKind::Forbidden
                } else {
                    GasKind::Balmer
                },
                wave: waves[d.named],
                centers: waves.iter().map(|w| w.ln()).collect(),
                vacuum: d.waves.to_vec(),
                ratios: d.ratios.to_vec(),
                sigma_inst,
            });
        }
        let (component, components) = if tied {
            (vec![0; lines.len()], vec!["gas"])
        } else {
            let mut names: Vec<&'static str> = Vec::new();
            let mut component = Vec::with_capacity(lines.len());
            for kind in [GasKind::Balmer, GasKind::Forbidden] {
                if lines.iter().any(|l| l.kind == kind) {
                    names.push(match kind {
                        GasKind::Balmer => "balmer",
                        GasKind::Forbidden => "forbidden",
                    });
                }
            }
            for l in &lines {
                let name = match l.kind {
                    GasKind::Balmer => "balmer",
                    GasKind::Forbidden => "forbidden",
                };
                component.push(names.iter().position(|n| *n == name).unwrap_or(0));
            }
            (component, names)
        };
        Ok(GasTemplates {
            lines,
            component,
            components,
            sigma_start: 50.0,
            grid: *grid,
        })
    }

    pub fn len(&self) -> usize {
        self.lines.len()
    }

    pub fn is_empty(&self) -> bool {
        self.lines.is_empty()
    }

    pub fn n_components(&self) -> usize {
        self.components.len()
    }

    /// One channel per physical line, as the MaNGA DAP names its emission-line channels
    /// (ion, `-`, vacuum wavelength truncated to the Angstrom: `Ha-6564`, `OIII-5008`), with
    /// the gas template holding it and the line's share of that template's flux.
    pub fn dap_channels(&self) -> Vec<crate::maps::GasChannel> {
        let mut out = Vec::new();
        for (t, line) in self.lines.iter().enumerate() {
            let total: f64 = line.ratios.iter().sum();
            for (w, r) in line.vacuum.iter().zip(&line.ratios) {
                out.push(crate::maps::GasChannel {
                    name: format!("{}-{}", dap_ion(&line.name), w.floor() as i64),
                    template: t,
                    share: r / total,
                });
            }
        }
        out
    }

    pub(crate) fn grid(&self) -> &LogGrid {
        &self.grid
    }

    /// Write line `l` at velocity `v` and dispersion `sigma` (km/s) into `col` (every pixel of
    /// the grid), and with `deriv` its derivatives in V and sigma (per km/s).
    pub(crate) fn column(
        &self,
        l: usize,
        v: f64,
        sigma: f64,
        col: &mut [f64],
        mut deriv: Option<(&mut [f64], &mut [f64])>,
    ) {
        let g = &self.grid;
        let d = g.velscale / C_KMS;
        col.fill(0.0);
        if let Some((dv, ds)) = deriv.as_mut() {
            dv.fill(0.0);
            ds.fill(0.0);
        }
        let line = &self.lines[l];
        let sg = sigma / C_KMS;
        let inv_sqrt_2pi = 1.0 / (2.0 * std::f64::consts::PI).sqrt();
        let phi = |z: f64| inv_sqrt_2pi * (-0.5 * z * z).exp();
        let cdf = |z: f64| 0.5 * libm::erfc(-z / std::f64::consts::SQRT_2);
        for ((&c, &ratio), &si) in line.centers.iter().zip(&line.ratios).zip(&line.sigma_inst) {
            let mu = c + v / C_KMS;
            let s = (si * si + sg * sg).sqrt().max(1e-3 * d);
            let reach = 9.0 * s + d;
            let first = (((mu - reach - g.ln_lam0) / d).floor().max(0.0)) as usize;
            let last = ((mu + reach - g.ln_lam0) / d).ceil();
            if last < 0.0 || first >= g.npix {
                continue;
            }
            let last = (last as usize).min(g.npix - 1);
            let ds_dsigma = sg / C_KMS / s;
            let mut za = (g.ln_lam0 + (first as f64 - 0.5) * d - mu) / s;
            let (mut fa, mut pa) = (cdf(za), phi(za));
            for i in first..=last {
                let zb = za + d / s;
                let (fb, pb) = (cdf(zb), phi(zb));
                col[i] += ratio * (fb - fa);
                if let Some((dv, ds)) = deriv.as_mut() {
                    // dF/dmu = -(phi(zb) - phi(za))/s; dF/ds = -(zb phi(zb) - za phi(za))/s.
                    dv[i] -= ratio * (pb - pa) / s / C_KMS;
                    ds[i] -= ratio * (zb * pb - za * pa) / s * ds_dsigma;
                }
                za = zb;
                fa = fb;
                pa = pb;
            }
        }
    }
}

/// The DAP's ion label of a pPXF template name.
fn dap_ion(name: &str) -> String {
    match name {
        "H10" => "Hthe".into(),
        "H9" => "Heta".into(),
        "H8" => "Hzet".into(),
        "Heps" => "Heps".into(),
        "Hdelta" => "Hdel".into(),
        "Hgamma" => "Hgam".into(),
        "Hbeta" => "Hb".into(),
        "Halpha" => "Ha".into(),
        _ => name
            .trim_start_matches('[')
            .split(|c: char| c == ']' || c.is_ascii_digit())
            .next()
            .unwrap_or(name)
            .to_string(),
    }
}

/// Gas kinematics of one component.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct GasComponent {
    pub name: String,
    pub v: f64,
    pub sigma: f64,
    pub v_error: f64,
    pub sigma_error: f64,
}

/// Flux of one gas template (both lines of a doublet), in the spectrum's units summed over
/// pixels (pPXF's `gas_flux`); NaN when the line has no fitted pixel.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct GasLineFlux {
    pub name: String,
    pub component: String,
    /// Rest wavelength of the named line, Angstrom (galaxy medium).
    pub wave: f64,
    #[serde(serialize_with = "nan_as_null")]
    pub flux: f64,
    #[serde(serialize_with = "nan_as_null")]
    pub flux_error: f64,
}

fn nan_as_null<S: serde::Serializer>(v: &f64, s: S) -> Result<S::Ok, S::Error> {
    if v.is_finite() {
        s.serialize_f64(*v)
    } else {
        s.serialize_none()
    }
}

/// The gas part of a fit.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct GasResult {
    pub components: Vec<GasComponent>,
    pub lines: Vec<GasLineFlux>,
    /// The best-fitting gas spectrum alone, every pixel (pPXF's `gas_bestfit`).
    #[serde(skip)]
    pub bestfit: Vec<f64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grid() -> LogGrid {
        LogGrid {
            ln_lam0: 3600f64.ln(),
            velscale: 69.0,
            npix: 3800,
        }
    }

    #[test]
    fn columns_integrate_to_the_line_ratios_and_derivatives_match_differences() {
        let g = grid();
        let fwhm = ResolutionCurve::constant(2.7);
        let gas = GasTemplates::new(&g, Medium::Vacuum, Some(&fwhm), None, false).unwrap();
        assert_eq!(gas.components, vec!["balmer", "forbidden"]);
        let l = gas
            .lines
            .iter()
            .position(|l| l.name == "[OIII]5007_d")
            .unwrap();
        let mut col = vec![0.0; g.npix];
        let (mut dv, mut ds) = (vec![0.0; g.npix], vec![0.0; g.npix]);
        gas.column(l, 30.0, 80.0, &mut col, Some((&mut dv, &mut ds)));
        let sum: f64 = col.iter().sum();
        assert!((sum - 1.33).abs() < 1e-9, "{sum}");
        let (mut plus, mut minus) = (vec![0.0; g.npix], vec![0.0; g.npix]);
        for (q, d) in [(0usize, &dv), (1, &ds)] {
            let h = 1e-3;
            let (v1, s1, v2, s2) = if q == 0 {
                (30.0 + h, 80.0, 30.0 - h, 80.0)
            } else {
                (30.0, 80.0 + h, 30.0, 80.0 - h)
            };
            gas.column(l, v1, s1, &mut plus, None);
            gas.column(l, v2, s2, &mut minus, None);
            for i in 0..g.npix {
                let fd = (plus[i] - minus[i]) / (2.0 * h);
                assert!(
                    (fd - d[i]).abs() < 1e-7,
                    "param {q} pixel {i}: {fd} vs {}",
                    d[i]
                );
            }
        }
    }

    #[test]
    fn channels_are_named_as_the_dap_names_them() {
        let g = grid();
        let gas = GasTemplates::new(&g, Medium::Vacuum, None, None, false).unwrap();
        let ch = gas.dap_channels();
        let names: Vec<&str> = ch.iter().map(|c| c.name.as_str()).collect();
        for n in [
            "Ha-6564",
            "Hb-4862",
            "OIII-4960",
            "OIII-5008",
            "NII-6585",
            "SII-6732",
            "OI-6302",
            "HeI-5877",
            "Hthe-3798",
        ] {
            assert!(names.contains(&n), "{n} missing from {names:?}");
        }
        let oiii: Vec<_> = ch.iter().filter(|c| c.name.starts_with("OIII")).collect();
        assert_eq!(oiii[0].template, oiii[1].template);
        assert!((oiii[0].share + oiii[1].share - 1.0).abs() < 1e-12);
        assert!((oiii[1].share / oiii[0].share - 1.0 / 0.33).abs() < 1e-9);
    }

    #[test]
    fn named_lines_outside_the_range_or_unknown_are_errors() {
        let g = LogGrid {
            ln_lam0: 4000f64.ln(),
            velscale: 69.0,
            npix: 1000,
        };
        let err = GasTemplates::new(&g, Medium::Vacuum, None, Some(&["Halpha".into()]), false)
            .unwrap_err()
            .to_string();
        assert!(err.contains("outside the fitted range"), "{err}");
        let err = GasTemplates::new(&g, Medium::Vacuum, None, Some(&["Hfoo".into()]), false)
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown emission line"), "{err}");
        let tied = GasTemplates::new(&g, Medium::Vacuum, None, None, true).unwrap();
        assert_eq!(tied.n_components(), 1);
        assert!(tied.lines.iter().any(|l| l.name == "Hbeta"));
        assert!(!tied.lines.iter().any(|l| l.name == "Halpha"));
    }
}

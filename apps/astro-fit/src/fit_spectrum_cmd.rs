//! `astro-fit fit-spectrum`: fit one spectrum from a file and print the kinematics.

use std::path::PathBuf;

use anyhow::Context;

use crate::error::FitError;
use crate::fit::{FitConfig, Fitter, Start, TemplateBasis};
use crate::gas::{GasResult, GasTemplates};
use crate::populations::{PopulationErrors, Populations, bootstrap_populations, populations};
use crate::spectrum::RestFrameSpectrum;
use crate::spectrum::{Selection, mask_emission_lines, read_spectrum};
use crate::templates::{
    Broadening, PrepareConfig, PreparedTemplates, ResolutionCurve, TemplateLibrary, prepare,
};

pub use crate::output::OutputFormat;
use crate::output::{file_with_size, print_out};

/// Fit one spectrum: SDSS spectrum tables (COADD), 1-D linear FITS (e.g. SAURON), rows of
/// MaNGA-format files or spaxels of MaNGA LOGCUBEs.
#[derive(Debug, Clone, clap::Args)]
pub struct FitSpectrumArgs {
    /// Spectrum file.
    pub file: PathBuf,
    /// Template library folder (E-MILES, MILES-HC or MaStar HC layout).
    #[arg(long)]
    pub templates: PathBuf,
    /// Redshift to de-redshift by (V is measured relative to it); default: the file's.
    #[arg(long, alias = "z")]
    pub redshift: Option<f64>,
    /// Gauss-Hermite moments: 2, 4 or 6.
    #[arg(long, default_value_t = 2, value_parser = parse_moments)]
    pub moments: usize,
    /// Additive Legendre degree (-1 for none).
    #[arg(long, default_value_t = 4, allow_hyphen_values = true)]
    pub degree: i32,
    /// Multiplicative Legendre degree (0 for none).
    #[arg(long, default_value_t = 0)]
    pub mdegree: usize,
    /// Rest-frame wavelength range to fit, Angstrom.
    #[arg(long, num_args = 2, value_names = ["MIN", "MAX"])]
    pub lam_range: Option<Vec<f64>>,
    /// Row of a MaNGA-format file.
    #[arg(long, default_value_t = 0)]
    pub row: usize,
    /// Spaxel of a LOGCUBE.
    #[arg(long, num_args = 2, value_names = ["X", "Y"])]
    pub spaxel: Option<Vec<usize>>,
    /// Instrumental FWHM (Angstrom, observed frame) when the file carries no resolution.
    #[arg(long)]
    pub fwhm: Option<f64>,
    /// Template oversampling factor (pPXF's velscale_ratio).
    #[arg(long, default_value_t = 1)]
    pub velscale_ratio: usize,
    /// How templates are broadened to the spectrum's resolution: `exact` (Gaussian kernels of
    /// exactly the resolution difference) or `ppxf` (pPXF 9.5's varsmooth, which broadens
    /// sub-pixel widths more; for comparisons with pPXF's own preparation).
    #[arg(long, value_enum, default_value_t = Broadening::Exact)]
    pub template_broadening: Broadening,
    /// Half-width (km/s) of the masks around gas emission lines; 0 fits them.
    #[arg(long, alias = "line-mask", default_value_t = crate::cube_cmd::EMISSION_MASK_KMS)]
    pub emission_mask_kms: f64,
    /// Iteratively clip outliers (pPXF's clean).
    #[arg(long)]
    pub clean: bool,
    /// Regularisation strength over the age x [M/H] grid (SSP libraries).
    #[arg(long, default_value_t = 0.0)]
    pub regul: f64,
    /// Fit the stellar dust attenuation A_V (mag, Calzetti 2000 curve, R_V 4.05) starting
    /// from this value, as pPXF's `reddening` (not with --mdegree).
    #[arg(long, value_name = "AV0")]
    pub reddening: Option<f64>,
    /// Errors of the population averages from this many realisations of a wild residual
    /// bootstrap (pPXF's population example): N refits with the same settings.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub bootstrap: usize,
    /// Starting dispersion, km/s.
    #[arg(long, default_value_t = 150.0)]
    pub sigma_start: f64,
    /// Convolve a compressed orthonormal basis reproducing every template to this relative
    /// tolerance instead of the exact templates (faster for large libraries, approximate).
    #[arg(long)]
    pub compress: Option<f64>,
    /// Fit the gas emission lines with the stars (Gaussian templates at the instrumental
    /// resolution; kinematic components `balmer` and `forbidden`) instead of masking them.
    #[arg(long)]
    pub gas: bool,
    /// With --gas: one kinematic component for all lines (tied Balmer and forbidden V, sigma).
    #[arg(long, requires = "gas")]
    pub gas_tied: bool,
    /// With --gas: the lines to fit, as pPXF names them (e.g. Halpha,[NII]6583_d); default:
    /// every line of pPXF's list inside the fitted range.
    #[arg(long, requires = "gas", value_delimiter = ',')]
    pub gas_lines: Option<Vec<String>>,
    /// With --gas: starting dispersion of the gas, km/s.
    #[arg(long, requires = "gas", default_value_t = 50.0)]
    pub gas_sigma_start: f64,
    /// Write a PNG of data, model, residuals and masked regions.
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// Write the prepared inputs (rest-frame spectrum, noise, mask, log-rebinned templates,
    /// settings) to this FITS file, e.g. to run pPXF on exactly the same arrays.
    #[arg(long)]
    pub save_inputs: Option<PathBuf>,
    /// What to print: the fit as a table (text) or as JSON (json).
    #[arg(short = 'o', long = "output", value_enum, default_value_t)]
    pub output: OutputFormat,
}

fn parse_moments(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(m @ (2 | 4 | 6)) => Ok(m),
        _ => Err(format!("moments must be 2, 4 or 6, got {s}")),
    }
}

/// What `fit-spectrum` reports.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FitReport {
    pub file: String,
    pub redshift: f64,
    pub velscale: f64,
    pub npix: usize,
    pub n_good: usize,
    pub v: f64,
    pub sigma: f64,
    pub h: Vec<f64>,
    pub errors: Vec<f64>,
    pub chi2: f64,
    pub dof: usize,
    pub n_templates_used: usize,
    pub populations: Option<Populations>,
    /// With --gas: kinematics per gas component and flux per line. Fluxes are the fitted line
    /// summed over pixels in the file's flux units (pPXF's `gas_flux`; multiply by the pixel
    /// width in Angstrom at the line for an integrated flux), errors formal.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gas: Option<GasResult>,
    /// With --reddening: the fitted stellar A_V (mag, Calzetti 2000) and its formal error.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reddening: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reddening_error: Option<f64>,
    /// With --bootstrap: standard deviations of the population averages over the realisations.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub population_errors: Option<PopulationErrors>,
}

pub fn run(args: &FitSpectrumArgs) -> anyhow::Result<()> {
    let report = fit_file(args)?;
    let written: Vec<String> = [&args.plot, &args.save_inputs]
        .into_iter()
        .flatten()
        .map(|p| format!("wrote {}", file_with_size(p)))
        .collect();
    match args.output {
        OutputFormat::Json => {
            print_out(&format!("{}\n", serde_json::to_string_pretty(&report)?))?;
            // Standard output holds the JSON only.
            for line in written {
                eprintln!("{line}");
            }
        }
        OutputFormat::Text => {
            let mut text = table(&report);
            for line in written {
                text.push_str(&line);
                text.push('\n');
            }
            print_out(&text)?;
        }
    }
    Ok(())
}

/// What a fit of one spectrum file needs, prepared: the spectrum on its rest-frame grid, the
/// templates, the fitter (with gas templates under --gas) and the start.
pub struct PreparedFit {
    pub rest: RestFrameSpectrum,
    pub templates: PreparedTemplates,
    pub fitter: Fitter,
    pub start: Start,
    pub redshift: f64,
}

pub fn fit_file(args: &FitSpectrumArgs) -> anyhow::Result<FitReport> {
    let PreparedFit {
        rest,
        templates,
        fitter,
        start,
        redshift: z,
    } = prepare_fit(args)?;
    let fit = fitter.fit(&rest.spectrum, &start)?;
    let errors = (args.bootstrap > 0)
        .then(|| {
            bootstrap_populations(
                &fitter,
                &mut fitter.scratch(),
                &templates,
                &rest.spectrum,
                &fit,
                args.bootstrap,
                0,
            )
        })
        .flatten();
    let mut r = report(args, &rest, &templates, fit, z)?;
    r.population_errors = errors;
    Ok(r)
}

/// Read the spectrum, prepare templates (and gas templates), build the fitter.
pub fn prepare_fit(args: &FitSpectrumArgs) -> anyhow::Result<PreparedFit> {
    let sel = Selection {
        row: args.row,
        spaxel: args.spaxel.as_ref().map(|s| (s[0], s[1])),
    };
    // Reading errors name the file themselves.
    let mut obs = read_spectrum(&args.file, sel)?;
    if let Some(fwhm) = args.fwhm {
        obs.fwhm = Some(ResolutionCurve::constant(fwhm));
    }
    let z = args.redshift.or(obs.redshift).unwrap_or(0.0);
    let lam_range = args.lam_range.as_ref().map(|r| (r[0], r[1]));
    let mut rest = obs.to_rest_frame(z, lam_range)?;
    // With gas, the lines are fitted, not masked.
    if args.emission_mask_kms > 0.0 && !args.gas {
        mask_emission_lines(
            &rest.grid,
            rest.medium,
            args.emission_mask_kms,
            &mut rest.spectrum.good,
        );
    }
    // Nothing to fit: say so before loading and broadening templates.
    if !rest.spectrum.good.iter().any(|g| *g) {
        return Err(FitError::NoGoodPixels.into());
    }
    let library = TemplateLibrary::load(&args.templates)
        .with_context(|| format!("templates in {}", args.templates.display()))?;
    let grid = rest.grid;
    let mut prep = PrepareConfig::new(
        grid.velscale,
        (grid.lam(0), grid.lam(grid.npix - 1)),
        rest.medium,
    );
    prep.velscale_ratio = args.velscale_ratio;
    prep.galaxy_fwhm = rest.fwhm.clone();
    prep.broadening = args.template_broadening;
    let templates = prepare(&library, &prep)?;
    let cfg = FitConfig {
        moments: args.moments,
        degree: args.degree,
        mdegree: args.mdegree,
        clean: args.clean,
        regul: args.regul,
        reddening: args.reddening,
        basis: match args.compress {
            Some(tolerance) => TemplateBasis::Compressed { tolerance },
            None => TemplateBasis::Exact,
        },
        ..FitConfig::default()
    };
    if let Some(path) = &args.save_inputs {
        crate::ppxf_inputs::write(path, &templates, std::slice::from_ref(&rest), &cfg)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    let mut fitter = Fitter::new(&templates, grid, cfg)?;
    if args.gas {
        let mut gas = GasTemplates::new(
            &grid,
            rest.medium,
            rest.fwhm.as_ref(),
            args.gas_lines.as_deref(),
            args.gas_tied,
        )?;
        gas.sigma_start = args.gas_sigma_start;
        fitter = fitter.with_gas(gas)?;
    }
    Ok(PreparedFit {
        rest,
        templates,
        fitter,
        start: Start::new(0.0, args.sigma_start),
        redshift: z,
    })
}

fn report(
    args: &FitSpectrumArgs,
    rest: &RestFrameSpectrum,
    templates: &PreparedTemplates,
    mut fit: crate::fit::FitResult,
    z: f64,
) -> anyhow::Result<FitReport> {
    let grid = rest.grid;
    if let Some(path) = &args.plot {
        let title = format!(
            "{}: V = {:.1} km/s, sigma = {:.1} km/s, chi2/DOF = {:.3}",
            args.file
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            fit.v,
            fit.sigma,
            fit.chi2
        );
        crate::plot::plot_fit(path, &grid, &rest.spectrum, &fit, &title)?;
    }
    // Fluxes in the file's units (the fit ran on the spectrum divided by its median).
    if let Some(gas) = fit.gas.as_mut() {
        for line in &mut gas.lines {
            line.flux *= rest.flux_scale;
            line.flux_error *= rest.flux_scale;
        }
    }
    Ok(FitReport {
        file: args.file.display().to_string(),
        redshift: z,
        velscale: grid.velscale,
        npix: grid.npix,
        n_good: fit.good.iter().filter(|g| **g).count(),
        n_templates_used: fit.weights.iter().filter(|w| **w > 0.0).count(),
        populations: populations(templates, &fit.weights),
        v: fit.v,
        sigma: fit.sigma,
        h: fit.h,
        errors: fit.errors,
        chi2: fit.chi2,
        dof: fit.dof,
        gas: fit.gas,
        reddening: fit.reddening,
        reddening_error: fit.reddening_error,
        population_errors: None,
    })
}

/// The fit as people read it.
fn table(r: &FitReport) -> String {
    use std::fmt::Write;
    let mut t = String::new();
    let names = ["V", "sigma", "h3", "h4", "h5", "h6"];
    let values: Vec<f64> = [r.v, r.sigma]
        .into_iter()
        .chain(r.h.iter().copied())
        .collect();
    let _ = writeln!(t, "file       {}", r.file);
    let _ = writeln!(t, "redshift   {}", r.redshift);
    let _ = writeln!(
        t,
        "pixels     {} ({} fitted), velscale {:.3} km/s",
        r.npix, r.n_good, r.velscale
    );
    for (i, v) in values.iter().enumerate() {
        let unit = if i < 2 { " km/s" } else { "" };
        let _ = writeln!(
            t,
            "{:<10} {:>10.3} +- {:.3}{unit}",
            names[i], v, r.errors[i]
        );
    }
    if let (Some(av), Some(e)) = (r.reddening, r.reddening_error) {
        let _ = writeln!(t, "{:<10} {av:>10.3} +- {e:.3} mag (Calzetti 2000)", "A_V");
    }
    let _ = writeln!(t, "chi2/DOF   {:.4} (DOF {})", r.chi2, r.dof);
    let _ = writeln!(t, "templates  {} with positive weight", r.n_templates_used);
    if let Some(p) = &r.populations {
        let _ = writeln!(
            t,
            "light-weighted log age {:.3}, [M/H] {:+.3}",
            p.light_log_age, p.light_metallicity
        );
        if let Some(e) = &r.population_errors {
            let _ = writeln!(
                t,
                "  bootstrap errors ({} realisations): log age +- {:.3}, [M/H] +- {:.3}",
                e.realisations, e.light_log_age, e.light_metallicity
            );
        }
        if let (Some(a), Some(m)) = (p.mass_log_age, p.mass_metallicity) {
            let _ = writeln!(t, "mass-weighted  log age {a:.3}, [M/H] {m:+.3}");
        }
    }
    if let Some(g) = &r.gas {
        for c in &g.components {
            let _ = writeln!(
                t,
                "gas {:<10} V {:>9.2} +- {:.2} km/s, sigma {:>8.2} +- {:.2} km/s",
                c.name, c.v, c.v_error, c.sigma, c.sigma_error
            );
        }
        for l in &g.lines {
            let _ = writeln!(
                t,
                "line {:<14} ({:<9}) flux {:>12.5e} +- {:.3e}",
                l.name, l.component, l.flux, l.flux_error
            );
        }
    }
    t
}

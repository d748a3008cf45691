//! PNG plot of a fit: data, best-fit model, residuals and the masked regions; with gas, the
//! stellar model and the gas emission lines apart.

use std::path::Path;

use plotters::prelude::*;
use plotters::style::FontStyle;

use crate::fit::{FitResult, LogGrid, Spectrum};

/// Register the embedded DejaVu font once (plotters' ab_glyph backend has no system fonts).
fn register_font() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // The font is valid TrueType shipped inside the dejavu crate.
        let _ = plotters::style::register_font(
            "sans-serif",
            FontStyle::Normal,
            dejavu::sans::regular(),
        );
    });
}

#[derive(Debug, thiserror::Error)]
#[error("plotting {path}: {message}")]
pub struct PlotError {
    path: String,
    message: String,
}

/// Draw `spectrum` and `fit` on `grid` into a PNG at `path`.
pub fn plot_fit(
    path: &Path,
    grid: &LogGrid,
    spectrum: &Spectrum,
    fit: &FitResult,
    title: &str,
) -> Result<(), PlotError> {
    register_font();
    let err = |e: &dyn std::fmt::Display| PlotError {
        path: path.display().to_string(),
        message: e.to_string(),
    };
    let lam: Vec<f64> = (0..grid.npix).map(|i| grid.lam(i)).collect();
    let used: Vec<usize> = (0..grid.npix).filter(|&i| fit.good[i]).collect();
    let resid: Vec<f64> = (0..grid.npix)
        .map(|i| spectrum.flux[i] - fit.bestfit[i])
        .collect();
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for &i in &used {
        lo = lo.min(fit.bestfit[i]).min(spectrum.flux[i]);
        hi = hi.max(fit.bestfit[i]).max(spectrum.flux[i]);
    }
    // Residuals sit below the spectrum, offset by a fifth of its range.
    let offset = lo - 0.15 * (hi - lo);
    let rmax = used
        .iter()
        .map(|&i| resid[i].abs())
        .fold(0.0f64, f64::max)
        .min(0.3 * (hi - lo));
    let y0 = offset - rmax - 0.05 * (hi - lo);
    let y1 = hi + 0.05 * (hi - lo);
    if !(y0.is_finite() && y1.is_finite() && y1 > y0) {
        return Err(err(&"nothing to plot: no finite fitted pixels"));
    }
    let root = BitMapBackend::new(path, (1400, 700)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d(lam[0]..lam[grid.npix - 1], y0..y1)
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc("rest-frame wavelength (A)")
        .y_desc("relative flux")
        .label_style(("sans-serif", 15))
        .draw()
        .map_err(|e| err(&e))?;
    // Masked runs of pixels as grey bands.
    let mut i = 0;
    while i < grid.npix {
        if fit.good[i] {
            i += 1;
            continue;
        }
        let start = i;
        while i < grid.npix && !fit.good[i] {
            i += 1;
        }
        let (a, b) = (lam[start.saturating_sub(1)], lam[i.min(grid.npix - 1)]);
        chart
            .draw_series(std::iter::once(Rectangle::new(
                [(a, y0), (b, y1)],
                RGBColor(225, 225, 225).filled(),
            )))
            .map_err(|e| err(&e))?;
    }
    let series = |values: &[f64], shift: f64| -> Vec<(f64, f64)> {
        (0..grid.npix)
            .filter(|&i| values[i].is_finite())
            .map(|i| (lam[i], values[i] + shift))
            .collect()
    };
    chart
        .draw_series(LineSeries::new(
            series(&spectrum.flux, 0.0),
            BLACK.stroke_width(1),
        ))
        .map_err(|e| err(&e))?
        .label("data")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], BLACK));
    match &fit.gas {
        None => {
            chart
                .draw_series(LineSeries::new(
                    series(&fit.bestfit, 0.0),
                    RED.stroke_width(2),
                ))
                .map_err(|e| err(&e))?
                .label("model")
                .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], RED));
        }
        Some(gas) => {
            // Stars (model less gas) over the data; the gas lines alone on the residuals'
            // baseline, so that each can be judged against the data.
            let stars: Vec<f64> = fit
                .bestfit
                .iter()
                .zip(&gas.bestfit)
                .map(|(m, g)| m - g)
                .collect();
            chart
                .draw_series(LineSeries::new(series(&stars, 0.0), RED.stroke_width(2)))
                .map_err(|e| err(&e))?
                .label("stars")
                .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], RED));
            chart
                .draw_series(LineSeries::new(
                    series(&fit.bestfit, 0.0),
                    MAGENTA.mix(0.6).stroke_width(1),
                ))
                .map_err(|e| err(&e))?
                .label("stars + gas")
                .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], MAGENTA));
            chart
                .draw_series(LineSeries::new(
                    series(&gas.bestfit, offset),
                    BLUE.stroke_width(2),
                ))
                .map_err(|e| err(&e))?
                .label("gas (offset)")
                .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], BLUE));
        }
    }
    let good_resid: Vec<(f64, f64)> = used.iter().map(|&i| (lam[i], resid[i] + offset)).collect();
    chart
        .draw_series(
            good_resid
                .iter()
                .map(|&p| Circle::new(p, 1, GREEN.filled())),
        )
        .map_err(|e| err(&e))?
        .label("residuals (offset)")
        .legend(|(x, y)| Circle::new((x + 10, y), 3, GREEN.filled()));
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .label_font(("sans-serif", 15))
        .draw()
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

//! PNG maps: one panel per quantity, spaxels drawn at their sky position (arcsec from the
//! cube centre), a colour bar per panel; a diverging scale centred on zero where the sign means
//! something (velocity, residuals), a sequential one otherwise, random colours for bin ids.

use std::path::{Path, PathBuf};
use std::sync::Once;

use plotters::prelude::*;
use plotters::style::{FontStyle, register_font};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ColorScale {
    /// Symmetric about zero, blue - white - red.
    Diverging,
    /// Dark blue to yellow (viridis-like).
    Sequential,
    /// Distinct colours per integer value (bin ids).
    Categorical,
}

/// One map: values row-major (`y * nx + x`), `None` where nothing is to be shown.
#[derive(Debug, Clone)]
pub struct Panel {
    pub title: String,
    pub values: Vec<Option<f64>>,
    pub scale: ColorScale,
    /// Colour-scale limits; `None`: 2nd-98th percentile (symmetric for diverging).
    pub range: Option<(f64, f64)>,
}

#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    #[error("drawing {path}: {message}")]
    Draw { path: PathBuf, message: String },
    #[error("panel '{title}' has {got} values for a {nx}x{ny} map")]
    Shape {
        title: String,
        got: usize,
        nx: usize,
        ny: usize,
    },
}

const FONT: &str = "sans-serif";

fn register_embedded_font() {
    static ONCE: Once = Once::new();
    // The DejaVu font ships inside the binary: no system fonts needed.
    ONCE.call_once(|| {
        let _ = register_font(FONT, FontStyle::Normal, dejavu::sans::regular());
    });
}

fn lerp_stops(stops: &[(u8, u8, u8)], t: f64) -> RGBColor {
    let t = t.clamp(0.0, 1.0) * (stops.len() - 1) as f64;
    let i = (t.floor() as usize).min(stops.len() - 2);
    let f = t - i as f64;
    let mix = |a: u8, b: u8| (f64::from(a) + (f64::from(b) - f64::from(a)) * f).round() as u8;
    let (a, b) = (stops[i], stops[i + 1]);
    RGBColor(mix(a.0, b.0), mix(a.1, b.1), mix(a.2, b.2))
}

fn color(scale: ColorScale, t: f64, raw: f64) -> RGBColor {
    match scale {
        ColorScale::Diverging => lerp_stops(
            &[
                (33, 102, 172),
                (146, 197, 222),
                (247, 247, 247),
                (244, 165, 130),
                (178, 24, 43),
            ],
            t,
        ),
        ColorScale::Sequential => lerp_stops(
            &[
                (68, 1, 84),
                (59, 82, 139),
                (33, 145, 140),
                (94, 201, 98),
                (253, 231, 37),
            ],
            t,
        ),
        ColorScale::Categorical => {
            // Golden-angle hues: neighbouring ids get distant colours.
            let h = (raw * 0.618_033_988_75).fract();
            let c = HSLColor(h, 0.65, 0.55).to_rgba();
            RGBColor(c.0, c.1, c.2)
        }
    }
}

/// Colour-scale limits of a panel.
pub fn limits(panel: &Panel) -> (f64, f64) {
    if let Some(r) = panel.range {
        return r;
    }
    let mut v: Vec<f64> = panel
        .values
        .iter()
        .flatten()
        .copied()
        .filter(|x| x.is_finite())
        .collect();
    if v.is_empty() {
        return (0.0, 1.0);
    }
    v.sort_by(f64::total_cmp);
    let pick = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
    let (lo, hi) = match panel.scale {
        ColorScale::Categorical => (v[0], v[v.len() - 1]),
        _ => (pick(0.02), pick(0.98)),
    };
    let (lo, hi) = if panel.scale == ColorScale::Diverging {
        let m = lo.abs().max(hi.abs());
        (-m, m)
    } else {
        (lo, hi)
    };
    if hi > lo {
        (lo, hi)
    } else {
        (lo - 0.5, lo + 0.5)
    }
}

/// Decimals that keep colour-bar ticks short yet distinct over a range of `span`.
fn tick_decimals(span: f64) -> usize {
    match span {
        s if s >= 20.0 => 0,
        s if s >= 2.0 => 1,
        _ => 2,
    }
}

/// Draws `panels` on a grid into a PNG at `path`.
pub fn plot_maps(
    path: &Path,
    nx: usize,
    ny: usize,
    pixel_scale: f64,
    panels: &[Panel],
) -> Result<(), PlotError> {
    register_embedded_font();
    for p in panels {
        if p.values.len() != nx * ny {
            return Err(PlotError::Shape {
                title: p.title.clone(),
                got: p.values.len(),
                nx,
                ny,
            });
        }
    }
    let err = |e: &dyn std::fmt::Display| PlotError::Draw {
        path: path.to_path_buf(),
        message: e.to_string(),
    };
    let cols = panels.len().clamp(1, 3);
    let rows = panels.len().div_ceil(cols).max(1);
    let (pw, ph) = (460u32, 400u32);
    let root = BitMapBackend::new(path, (pw * cols as u32, ph * rows as u32)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let areas = root.split_evenly((rows, cols));
    // Arcsec offsets from the cube centre; x grows to the east (left), as on the sky.
    let half_x = nx as f64 * pixel_scale / 2.0;
    let half_y = ny as f64 * pixel_scale / 2.0;
    for (panel, area) in panels.iter().zip(areas) {
        let (map_area, bar_area) = area.split_horizontally(pw - 80);
        let (lo, hi) = limits(panel);
        let mut chart = ChartBuilder::on(&map_area)
            .caption(&panel.title, (FONT, 18))
            .margin(8)
            .x_label_area_size(36)
            .y_label_area_size(44)
            .build_cartesian_2d(half_x..-half_x, -half_y..half_y)
            .map_err(|e| err(&e))?;
        chart
            .configure_mesh()
            .disable_mesh()
            .x_desc("ΔRA (arcsec)")
            .y_desc("ΔDec (arcsec)")
            .label_style((FONT, 12))
            .axis_desc_style((FONT, 13))
            .draw()
            .map_err(|e| err(&e))?;
        let cells = (0..ny)
            .flat_map(|y| (0..nx).map(move |x| (x, y)))
            .filter_map(|(x, y)| {
                let v = panel.values[y * nx + x]?;
                if !v.is_finite() {
                    return None;
                }
                let t = (v - lo) / (hi - lo);
                // Pixel x = 0 is at the east (positive ΔRA) edge, as in a FITS image with CD1_1 < 0.
                let x0 = half_x - x as f64 * pixel_scale;
                let y0 = -half_y + y as f64 * pixel_scale;
                Some(Rectangle::new(
                    [(x0, y0), (x0 - pixel_scale, y0 + pixel_scale)],
                    color(panel.scale, t, v).filled(),
                ))
            });
        chart.draw_series(cells).map_err(|e| err(&e))?;

        let mut bar = ChartBuilder::on(&bar_area)
            .margin_top(36)
            .margin_bottom(44)
            .margin_left(4)
            .set_label_area_size(LabelAreaPosition::Right, 52)
            .build_cartesian_2d(0.0..1.0, lo..hi)
            .map_err(|e| err(&e))?;
        let decimals = tick_decimals(hi - lo);
        bar.configure_mesh()
            .disable_mesh()
            .disable_x_axis()
            .y_labels(6)
            .y_label_formatter(&|v| format!("{v:.decimals$}"))
            .label_style((FONT, 11))
            .draw()
            .map_err(|e| err(&e))?;
        let steps = 64;
        bar.draw_series((0..steps).map(|i| {
            let a = lo + (hi - lo) * i as f64 / steps as f64;
            let b = lo + (hi - lo) * (i + 1) as f64 / steps as f64;
            let t = (i as f64 + 0.5) / steps as f64;
            Rectangle::new(
                [(0.0, a), (1.0, b)],
                color(panel.scale, t, (a + b) / 2.0).filled(),
            )
        }))
        .map_err(|e| err(&e))?;
    }
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn diverging_limits_are_symmetric_and_colours_span_the_scale() {
        let p = Panel {
            title: "V".into(),
            values: vec![Some(-100.0), Some(40.0), None, Some(f64::NAN)],
            scale: ColorScale::Diverging,
            range: None,
        };
        let (lo, hi) = limits(&p);
        assert_eq!(lo, -hi);
        assert!(hi >= 40.0);
        assert_ne!(
            color(ColorScale::Diverging, 0.0, 0.0),
            color(ColorScale::Diverging, 1.0, 0.0)
        );
        assert_eq!(
            color(ColorScale::Diverging, 0.5, 0.0),
            RGBColor(247, 247, 247)
        );
    }

    #[test]
    fn writes_a_png_with_every_panel() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("maps.png");
        let values: Vec<Option<f64>> = (0..20)
            .map(|i| (i != 3).then_some(i as f64 - 10.0))
            .collect();
        let panels = [
            ColorScale::Diverging,
            ColorScale::Sequential,
            ColorScale::Categorical,
        ]
        .map(|scale| Panel {
            title: format!("{scale:?}"),
            values: values.clone(),
            scale,
            range: None,
        });
        plot_maps(&path, 5, 4, 0.5, &panels).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(&bytes[1..4], b"PNG");
        let bad = Panel {
            values: vec![None; 3],
            ..panels[0].clone()
        };
        assert!(matches!(
            plot_maps(&path, 5, 4, 0.5, &[bad]),
            Err(PlotError::Shape { got: 3, .. })
        ));
    }
}

//! Results of a simulation: JSON, a table, and the energy/makespan plot.

use std::collections::BTreeMap;
use std::path::Path;

use plotters::prelude::*;
use plotters::style::FontStyle;
use serde::Serialize;
use thiserror::Error;

use crate::sim::engine::{Policy, PolicyResult};

/// `{"policies": {"round-robin": {...}, ...}, "trace": {...}}`.
#[derive(Debug, Clone, Serialize)]
pub struct SimReport {
    pub policies: BTreeMap<&'static str, PolicyResult>,
    pub trace: TraceSummary,
}

#[derive(Debug, Clone, Serialize)]
pub struct TraceSummary {
    pub regions: usize,
    pub jobs: usize,
    pub tasks: u64,
    pub seed: Option<u64>,
}

impl SimReport {
    pub fn new(results: Vec<(Policy, PolicyResult)>, trace: TraceSummary) -> Self {
        SimReport {
            policies: results.into_iter().map(|(p, r)| (p.name(), r)).collect(),
            trace,
        }
    }

    /// A fixed-width table, one policy a row, in the order of [`Policy::ALL`].
    pub fn table(&self) -> String {
        let mut out = format!(
            "{:<16} {:>12} {:>11} {:>12} {:>9} {:>14} {:>11} {:>10}\n",
            "POLICY",
            "ENERGY_KWH",
            "CARBON_KG",
            "MAKESPAN_S",
            "MISSES",
            "BYTES_MOVED",
            "MEAN_JOB_S",
            "SCHED_S"
        );
        for policy in Policy::ALL {
            if let Some(r) = self.policies.get(policy.name()) {
                out.push_str(&format!(
                    "{:<16} {:>12.3} {:>11.3} {:>12.1} {:>9} {:>14} {:>11.1} {:>10.3}\n",
                    policy.name(),
                    r.energy_kwh,
                    r.carbon_kg,
                    r.makespan_s,
                    r.deadline_misses,
                    r.bytes_moved,
                    r.mean_job_s,
                    r.scheduler_s
                ));
            }
        }
        if let Some(report) = self
            .policies
            .get(Policy::Learned.name())
            .and_then(|r| r.predictor.as_ref())
            && let Some(runtime) = &report.runtime
        {
            out.push_str(&format!(
                "\npredictor: {} after {} samples ({} trainings); run-time MAPE on held-out telemetry {:.2}% \
                 (analytic prior {:.2}%)",
                runtime.model,
                report.samples,
                report.trainings,
                100.0 * runtime.holdout_mape,
                100.0 * report.prior_holdout_mape.unwrap_or(f64::NAN)
            ));
            if let Some(energy) = &report.energy {
                out.push_str(&format!(
                    "; energy MAPE {:.2}% ({})",
                    100.0 * energy.holdout_mape,
                    energy.model
                ));
            }
            out.push('\n');
        }
        out
    }
}

#[derive(Debug, Error)]
pub enum PlotError {
    #[error("cannot load the embedded DejaVu font")]
    Font,
    #[error("cannot draw {path}: {message}")]
    Draw { path: String, message: String },
}

/// Scatter of energy (kWh) against makespan (s), one labelled point per policy.
pub fn plot(report: &SimReport, path: &Path) -> Result<(), PlotError> {
    plotters::style::register_font("sans-serif", FontStyle::Normal, dejavu::sans::regular())
        .map_err(|_| PlotError::Font)?;
    let fail = |e: &dyn std::fmt::Display| PlotError::Draw {
        path: path.display().to_string(),
        message: e.to_string(),
    };
    let points: Vec<(&str, f64, f64)> = Policy::ALL
        .iter()
        .filter_map(|p| {
            report
                .policies
                .get(p.name())
                .map(|r| (p.name(), r.makespan_s, r.energy_kwh))
        })
        .collect();
    let (mut x0, mut x1, mut y0, mut y1) =
        (f64::INFINITY, f64::NEG_INFINITY, 0.0f64, f64::NEG_INFINITY);
    for &(_, x, y) in &points {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y1 = y1.max(y);
    }
    // Makespans of a long trace differ by seconds: the axis spans the spread, not from zero.
    let pad = ((x1 - x0) * 0.25).max(1.0);
    let (x0, x1) = (x0 - pad, x1 + pad);
    y1 = (y1 * 1.15).max(y0 + 1e-9);
    y0 = y0.min(0.0);

    let root = BitMapBackend::new(path, (960, 640)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| fail(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!(
                "ceccm sim: energy against makespan ({} jobs, {} tasks)",
                report.trace.jobs, report.trace.tasks
            ),
            ("sans-serif", 22),
        )
        .margin(20)
        .x_label_area_size(50)
        .y_label_area_size(80)
        .build_cartesian_2d(x0..x1, y0..y1)
        .map_err(|e| fail(&e))?;
    chart
        .configure_mesh()
        .x_desc("makespan (s)")
        .y_desc("energy (kWh)")
        .label_style(("sans-serif", 16))
        .draw()
        .map_err(|e| fail(&e))?;
    let palette = [RED, BLUE, MAGENTA, CYAN, GREEN, BLACK];
    for (i, &(name, x, y)) in points.iter().enumerate() {
        let color = palette[i % palette.len()];
        // Labels alternate sides so that close points stay readable.
        let dx = if i % 2 == 0 { 12 } else { -190 };
        let label = format!("{name} {y:.2} kWh");
        chart
            .draw_series(std::iter::once(
                EmptyElement::at((x, y))
                    + Circle::new((0, 0), 7, color.filled())
                    + Text::new(label, (dx, -8), ("sans-serif", 15).into_font()),
            ))
            .map_err(|e| fail(&e))?
            .label(name)
            .legend(move |(lx, ly)| Circle::new((lx, ly), 5, color.filled()));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .label_font(("sans-serif", 15))
        .draw()
        .map_err(|e| fail(&e))?;
    root.present().map_err(|e| fail(&e))?;
    Ok(())
}

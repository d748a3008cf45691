//! Results of a simulation: JSON, a table, and the plot of energy against mean job time.

use std::collections::BTreeMap;
use std::path::Path;

use plotters::prelude::*;
use plotters::style::FontStyle;
use serde::Serialize;
use thiserror::Error;

use crate::sim::bound::EnergyBound;
use crate::sim::engine::{Policy, PolicyResult};

/// `{"policies": {"round-robin": {...}, ...}, "lower_bound": {...}, "trace": {...}}`.
#[derive(Debug, Clone, Serialize)]
pub struct SimReport {
    pub policies: BTreeMap<&'static str, PolicyResult>,
    /// The proven lower bound on any policy's `energy_kwh` ([`crate::sim::bound`]).
    pub lower_bound: EnergyBound,
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
    /// The report of `results`, each policy's energy set against `lower_bound`.
    pub fn new(
        results: Vec<(Policy, PolicyResult)>,
        lower_bound: EnergyBound,
        trace: TraceSummary,
    ) -> Self {
        let policies = results
            .into_iter()
            .map(|(p, mut r)| {
                r.energy_over_bound =
                    (lower_bound.energy_kwh > 0.0).then(|| r.energy_kwh / lower_bound.energy_kwh);
                (p.name(), r)
            })
            .collect();
        SimReport {
            policies,
            lower_bound,
            trace,
        }
    }

    /// A fixed-width table, one policy a row, in the order of [`Policy::ALL`], then the bound.
    pub fn table(&self) -> String {
        let mut out = format!(
            "{:<16} {:>11} {:>8} {:>10} {:>12} {:>7} {:>13} {:>10} {:>9} {:>12} {:>12}\n",
            "POLICY",
            "ENERGY_KWH",
            "E/BOUND",
            "CARBON_KG",
            "MAKESPAN_S",
            "MISSES",
            "BYTES_MOVED",
            "MEAN_JOB_S",
            "SCHED_S",
            "IDLE_1PC_KWH",
            "IDLE_AUTO_KWH"
        );
        for policy in Policy::ALL {
            if let Some(r) = self.policies.get(policy.name()) {
                out.push_str(&format!(
                    "{:<16} {:>11.3} {:>8.3} {:>10.3} {:>12.1} {:>7} {:>13} {:>10.1} {:>9.3} {:>12.2} {:>12.2}\n",
                    policy.name(),
                    r.energy_kwh,
                    r.energy_over_bound.unwrap_or(f64::NAN),
                    r.carbon_kg,
                    r.makespan_s,
                    r.deadline_misses,
                    r.bytes_moved,
                    r.mean_job_s,
                    r.scheduler_s,
                    r.pools.per_core_idle_kwh,
                    r.pools.autoscaled_idle_kwh,
                ));
            }
        }
        let b = &self.lower_bound;
        out.push_str(&format!(
            "{:<16} {:>11.3} {:>8.3}   (proven: each task on its cheapest feasible region at least load; \
             compute {:.3} kWh, transfer {:.3} kWh)\n",
            "lower-bound", b.energy_kwh, 1.0, b.compute_kwh, b.transfer_kwh
        ));
        out.push_str(
            "IDLE_1PC_KWH: idle workers' draw with one worker per core all trace long; \
             IDLE_AUTO_KWH: with pools sized by autoscale::desired_workers (not in ENERGY_KWH)\n",
        );
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

/// Energy (kWh) against mean job time (s), one labelled point per policy, with the proven lower
/// bound on energy as a dashed line. Makespan is no axis: on a trace that spans days it is set
/// by the last arrival and differs by seconds between policies, while the time a job waits for
/// its results is what a policy trades against energy. The energy axis spans the data and the
/// bound (not from zero), so that the policies' distances to the bound can be read.
pub fn plot(report: &SimReport, path: &Path) -> Result<(), PlotError> {
    plotters::style::register_font("sans-serif", FontStyle::Normal, dejavu::sans::regular())
        .map_err(|_| PlotError::Font)?;
    let fail = |e: &dyn std::fmt::Display| PlotError::Draw {
        path: path.display().to_string(),
        message: e.to_string(),
    };
    let points: Vec<(Policy, f64, f64)> = Policy::ALL
        .iter()
        .filter_map(|&p| {
            report
                .policies
                .get(p.name())
                .map(|r| (p, r.mean_job_s, r.energy_kwh))
        })
        .collect();
    let bound = report.lower_bound.energy_kwh;
    let (mut x1, mut y0, mut y1) = (0.0f64, bound, bound);
    for &(_, x, y) in &points {
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    let y_pad = ((y1 - y0) * 0.08).max(y1.abs() * 0.01).max(1e-9);
    let (y0, y1) = ((y0 - y_pad).max(0.0), y1 + y_pad);
    // Job times start at zero: a policy's job time is read against no waiting at all.
    let x1 = (x1 * 1.3).max(1e-9);

    let root = BitMapBackend::new(path, (1000, 660)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| fail(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!(
                "ceccm sim: energy against mean job time ({} jobs, {} tasks)",
                report.trace.jobs, report.trace.tasks
            ),
            ("sans-serif", 22),
        )
        .margin(20)
        .x_label_area_size(50)
        .y_label_area_size(80)
        .build_cartesian_2d(0.0..x1, y0..y1)
        .map_err(|e| fail(&e))?;
    chart
        .configure_mesh()
        .x_desc("mean job time, arrival to last task done (s)")
        .y_desc("energy (kWh)")
        .label_style(("sans-serif", 16))
        .draw()
        .map_err(|e| fail(&e))?;
    let grey = RGBColor(90, 90, 90);
    chart
        .draw_series(DashedLineSeries::new(
            [(0.0, bound), (x1, bound)],
            10,
            6,
            grey.stroke_width(2),
        ))
        .map_err(|e| fail(&e))?;
    chart
        .draw_series(std::iter::once(
            EmptyElement::at((x1 * 0.55, bound))
                + Text::new(
                    format!("proven lower bound on energy: {bound:.3} kWh"),
                    (0, -22),
                    ("sans-serif", 15).into_font().color(&grey),
                ),
        ))
        .map_err(|e| fail(&e))?;
    let palette = [
        RED,
        BLUE,
        MAGENTA,
        RGBColor(0, 150, 170),
        RGBColor(0, 150, 0),
        BLACK,
    ];
    let x_near = x1 * 0.06;
    let y_near = (y1 - y0) * 0.05;
    let mut labelled: Vec<(f64, f64)> = Vec::new();
    for (i, &(policy, x, y)) in points.iter().enumerate() {
        let color = palette[i % palette.len()];
        // Points that sit on top of each other get their labels stacked below the first.
        let crowd = labelled
            .iter()
            .filter(|(lx, ly)| (lx - x).abs() < x_near && (ly - y).abs() < y_near)
            .count() as i32;
        labelled.push((x, y));
        let ratio = report.policies[policy.name()]
            .energy_over_bound
            .map_or(String::new(), |r| format!(", {r:.3}x bound"));
        let label = format!("{} {y:.3} kWh{ratio}", policy.name());
        // Labels of points in the right third go to their left, so that they stay in the frame
        // (about 7 px a character at this size).
        let dx = if x > x1 * 0.6 {
            -12 - 7 * label.chars().count() as i32
        } else {
            12
        };
        // The oracle is a ring, so that a policy on the same spot still shows through.
        let style = if policy == Policy::OracleGreedy {
            color.stroke_width(2)
        } else {
            color.filled()
        };
        let radius = if policy == Policy::OracleGreedy {
            10
        } else {
            7
        };
        chart
            .draw_series(std::iter::once(
                EmptyElement::at((x, y))
                    + Circle::new((0, 0), radius, style)
                    + Text::new(
                        label,
                        (dx, -8 + 18 * crowd),
                        ("sans-serif", 15).into_font().color(&color),
                    ),
            ))
            .map_err(|e| fail(&e))?;
    }
    root.present().map_err(|e| fail(&e))?;
    Ok(())
}

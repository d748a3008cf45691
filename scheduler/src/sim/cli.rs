//! `ceccm sim --regions FILE --trace FILE --policy P|all [-o json|table] [--plot out.png]`:
//! every policy's figures, and the proven lower bound on energy they are measured against.

use std::io::Write;
use std::path::PathBuf;

use clap::{Args, ValueEnum};
use thiserror::Error;

use crate::sim::bound::energy_lower_bound;
use crate::sim::engine::{Policy, simulate};
use crate::sim::files::{InputError, load_regions, load_trace};
use crate::sim::report::{PlotError, SimReport, TraceSummary, plot};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    Table,
    Json,
}

/// Replay a trace over a region set under one or every placement policy.
#[derive(Debug, Clone, Args)]
pub struct SimArgs {
    /// Region file (YAML): the regions, their declared figures and their simulated truth.
    #[arg(long)]
    pub regions: PathBuf,
    /// Trace file (YAML): job kinds and jobs.
    #[arg(long)]
    pub trace: PathBuf,
    /// round-robin, least-loaded, bin-packing, greedy-analytic, learned, oracle-greedy, a
    /// comma-separated list of them, or all.
    #[arg(long, default_value = "all")]
    pub policy: String,
    #[arg(short = 'o', long = "output", value_enum, default_value = "table")]
    pub output: OutputFormat,
    /// Write a PNG plot of energy against mean job time, with the energy bound.
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// Seed of the per-task noise (default: the trace's seed).
    #[arg(long)]
    pub seed: Option<u64>,
}

#[derive(Debug, Error)]
pub enum SimError {
    #[error(transparent)]
    Input(#[from] InputError),
    #[error(
        "unknown policy {0:?}: expected round-robin, least-loaded, bin-packing, greedy-analytic, learned, oracle-greedy or all"
    )]
    UnknownPolicy(String),
    #[error(transparent)]
    Plot(#[from] PlotError),
    #[error("cannot write the report: {0}")]
    Write(#[from] std::io::Error),
}

/// The policies named by `--policy`.
pub fn parse_policies(text: &str) -> Result<Vec<Policy>, SimError> {
    if text == "all" {
        return Ok(Policy::ALL.to_vec());
    }
    let mut policies = Vec::new();
    for name in text.split(',').map(str::trim) {
        let p = Policy::from_name(name).ok_or_else(|| SimError::UnknownPolicy(name.to_string()))?;
        if !policies.contains(&p) {
            policies.push(p);
        }
    }
    Ok(policies)
}

/// Runs the simulation the arguments describe and writes the report to `out`.
pub fn run(args: &SimArgs, out: &mut dyn Write) -> Result<SimReport, SimError> {
    let policies = parse_policies(&args.policy)?;
    let regions = load_regions(&args.regions)?;
    let (trace, groups) = load_trace(&args.trace, &regions)?;
    let seed = args.seed.or(trace.seed).unwrap_or(0);
    // One thread per policy: the replays are independent.
    let results = std::thread::scope(|scope| {
        let handles: Vec<_> = policies
            .iter()
            .map(|&p| {
                let (regions, groups) = (&regions, &groups);
                scope.spawn(move || (p, simulate(regions, groups, p, seed)))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("a replay does not panic"))
            .collect::<Vec<_>>()
    });
    let tasks = groups.iter().map(|g| g.tasks).sum();
    let report = SimReport::new(
        results,
        energy_lower_bound(&regions, &groups, seed),
        TraceSummary {
            regions: regions.regions.len(),
            jobs: groups.len(),
            tasks,
            seed: trace.seed,
        },
    );
    match args.output {
        OutputFormat::Json => {
            serde_json::to_writer_pretty(&mut *out, &report).map_err(std::io::Error::from)?;
            writeln!(out)?;
        }
        OutputFormat::Table => write!(out, "{}", report.table())?,
    }
    if let Some(path) = &args.plot {
        plot(&report, path)?;
    }
    Ok(report)
}

//! Writes a simulator trace: `gen-trace --seed 7 [--scale 1.0] -o examples/sim/trace.yaml`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use ceccm_scheduler::sim::files::trace_to_yaml;
use ceccm_scheduler::sim::generate::{TraceSpec, generate_trace};
use clap::Parser;

/// Generate a survey-sized trace for `ceccm sim`.
#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// Multiplies every job count (1.0: the reference trace).
    #[arg(long, default_value_t = 1.0)]
    scale: f64,
    #[arg(short = 'o', long)]
    out: PathBuf,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let command = format!(
        "cargo run --release -p ceccm-scheduler --bin gen-trace -- --seed {} --scale {} -o {}",
        args.seed,
        args.scale,
        args.out.display()
    );
    let trace = generate_trace(
        TraceSpec {
            seed: args.seed,
            scale: args.scale,
        },
        command,
    );
    match std::fs::write(&args.out, trace_to_yaml(&trace))
        .with_context(|| format!("writing {}", args.out.display()))
    {
        Ok(()) => {
            let tasks: u64 = trace.jobs.iter().map(|j| j.tasks).sum();
            eprintln!(
                "wrote {} jobs, {tasks} tasks to {}",
                trace.jobs.len(),
                args.out.display()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

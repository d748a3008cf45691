//! Scheduler throughput: placements per second on one core with 1,000 regions, and the time to
//! replay a trace of a million tasks over 500 regions.
//!
//! `cargo run --release -p ceccm-scheduler --bin bench-placement [-- --seconds 2 --runs 5]`

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context;
use ceccm_scheduler::sim::engine::{Policy, simulate};
use ceccm_scheduler::sim::files::{RegionFile, load_regions};
use ceccm_scheduler::sim::generate::{TraceSpec, generate_trace, scale_regions};
use ceccm_scheduler::sim::truth::true_cost;
use ceccm_scheduler::{
    CostModel, Predictor, PredictorConfig, RegionSnapshot, TaskGroup, TelemetrySample, place,
};
use clap::Parser;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

#[derive(Parser)]
struct Args {
    /// The reference region set the large sets are copied from.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/sim/regions.yaml"))]
    regions: PathBuf,
    /// Seconds per placement measurement.
    #[arg(long, default_value_t = 2.0)]
    seconds: f64,
    /// Measurements per model (the median is reported).
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Regions for the placement measurement.
    #[arg(long, default_value_t = 1000)]
    placement_regions: usize,
    /// Regions and trace scale for the replay (scale 16 is about a million tasks).
    #[arg(long, default_value_t = 500)]
    replay_regions: usize,
    #[arg(long, default_value_t = 16.0)]
    replay_scale: f64,
    /// Skip the replay.
    #[arg(long)]
    no_replay: bool,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Tasks and groups placed per second, single thread, cycling through `groups`.
fn placements_per_second(
    snapshot: &[RegionSnapshot],
    groups: &[TaskGroup],
    model: &impl CostModel,
    seconds: f64,
) -> (f64, f64) {
    let started = Instant::now();
    let (mut tasks, mut placed) = (0u64, 0u64);
    for group in groups.iter().cycle() {
        if let Ok(p) = place(snapshot, group, model) {
            tasks += p.assignments.iter().map(|a| a.tasks).sum::<u64>();
            placed += 1;
        }
        if placed % 64 == 0 && started.elapsed().as_secs_f64() >= seconds {
            break;
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    (tasks as f64 / elapsed, placed as f64 / elapsed)
}

fn busy_snapshot(regions: &RegionFile, seed: u64) -> Vec<RegionSnapshot> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    regions
        .regions
        .iter()
        .map(|r| {
            let mut s = r.spec.clone();
            let used = rng.gen_range(0.0..0.7);
            s.allocated.cpu_millis = (s.capacity.cpu_millis as f64 * used) as u64 / 1000 * 1000;
            s.load = used;
            s
        })
        .collect()
}

/// Telemetry drawn from the simulated world's costs: 3,000 finished tasks, the predictor's window.
fn telemetry(
    regions: &RegionFile,
    snapshot: &[RegionSnapshot],
    groups: &[TaskGroup],
) -> Vec<TelemetrySample> {
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    (0..3000)
        .map(|i| {
            let r = rng.gen_range(0..snapshot.len());
            let g = &groups[i % groups.len()];
            let cost = true_cost(&snapshot[r], &regions.regions[r].truth, g);
            TelemetrySample::new(&snapshot[r], g, cost.seconds, Some(cost.joules))
        })
        .collect()
}

/// A predictor trained online on `samples`, as it learns while tasks finish.
fn trained_predictor(regions: &RegionFile, samples: &[TelemetrySample]) -> Predictor {
    let mut p = Predictor::new(regions.prior(), PredictorConfig::default());
    for sample in samples {
        p.observe(sample.clone());
    }
    p
}

/// Seconds to learn `samples` online (every retraining included) and to restore them at once,
/// as the controller does from its store at start-up (one training).
fn training_seconds(regions: &RegionFile, samples: &[TelemetrySample]) -> (f64, f64, usize) {
    let started = Instant::now();
    let online = trained_predictor(regions, samples);
    let online_s = started.elapsed().as_secs_f64();
    let started = Instant::now();
    let mut restored = Predictor::new(regions.prior(), PredictorConfig::default());
    restored.restore(samples.len(), samples.iter().cloned());
    (
        online_s,
        started.elapsed().as_secs_f64(),
        online.report().trainings,
    )
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> anyhow::Result<()> {
    let args = Args::parse();
    let reference = load_regions(&args.regions).with_context(|| "loading the reference regions")?;
    let trace = generate_trace(
        TraceSpec {
            seed: 7,
            scale: 1.0,
        },
        String::new(),
    );

    let regions = scale_regions(&reference, args.placement_regions, 1);
    let groups = trace
        .task_groups(&regions)
        .map_err(|p| anyhow::anyhow!(p.join("; ")))?;
    let snapshot = busy_snapshot(&regions, 2);
    let tasks_per_group = groups.iter().map(|g| g.tasks).sum::<u64>() as f64 / groups.len() as f64;
    println!(
        "placement: {} regions (0-70 % allocated), {} task groups of the reference trace ({tasks_per_group:.2} tasks each), one thread, median of {} x {} s",
        regions.regions.len(),
        groups.len(),
        args.runs,
        args.seconds
    );
    let samples = telemetry(&regions, &snapshot, &groups);
    let predictor = trained_predictor(&regions, &samples);
    let models: [(&str, &dyn CostModel); 2] =
        [("analytic", &regions.prior()), ("learned", &predictor)];
    for (name, model) in models {
        let runs: Vec<(f64, f64)> = (0..args.runs)
            .map(|_| placements_per_second(&snapshot, &groups, &model, args.seconds))
            .collect();
        println!(
            "  {name:<9} {:>10.0} task placements/s  {:>9.0} group placements/s",
            median(runs.iter().map(|r| r.0).collect()),
            median(runs.iter().map(|r| r.1).collect())
        );
    }

    let runs: Vec<(f64, f64, usize)> = (0..args.runs)
        .map(|_| training_seconds(&regions, &samples))
        .collect();
    println!(
        "training on {} samples: online {:.1} ms ({} trainings), restored at start-up {:.1} ms (1 training)",
        samples.len(),
        1e3 * median(runs.iter().map(|r| r.0).collect()),
        runs[0].2,
        1e3 * median(runs.iter().map(|r| r.1).collect()),
    );

    if args.no_replay {
        return Ok(());
    }
    let regions = scale_regions(&reference, args.replay_regions, 3);
    let started = Instant::now();
    let big = generate_trace(
        TraceSpec {
            seed: 7,
            scale: args.replay_scale,
        },
        String::new(),
    );
    let groups = big
        .task_groups(&regions)
        .map_err(|p| anyhow::anyhow!(p.join("; ")))?;
    let tasks: u64 = groups.iter().map(|g| g.tasks).sum();
    println!(
        "replay: {} jobs, {tasks} tasks over {} regions (trace generated and checked in {:.1} s)",
        groups.len(),
        regions.regions.len(),
        started.elapsed().as_secs_f64()
    );
    for policy in [Policy::LeastLoaded, Policy::GreedyAnalytic, Policy::Learned] {
        let started = Instant::now();
        let result = simulate(&regions, &groups, policy, 7);
        println!(
            "  {:<16} {:>6.1} s wall ({:.1} s in placement), {:.0} tasks/s, energy {:.1} kWh",
            policy.name(),
            started.elapsed().as_secs_f64(),
            result.scheduler_s,
            result.tasks as f64 / started.elapsed().as_secs_f64(),
            result.energy_kwh
        );
    }
    Ok(())
}

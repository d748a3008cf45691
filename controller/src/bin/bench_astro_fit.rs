//! `ceccm-bench-astro-fit`: one cube fitted by `astro-fit fit-cube` alone and through the
//! control plane (an in-process server, two local regions of one core each, so both use the
//! same two threads), alternating, with the same parameters. Reports the wall times, their
//! ratio, and the dispatch overhead per chunk task: lease -> fit start (inputs fetched, the
//! fitter set up), fit end -> completion (artifacts uploaded), completion -> the worker's next
//! lease. Then the predictor's state after the jobs.
//!
//! ```sh
//! cargo build --release --bin ceccm --bin astro-fit --bin ceccm-bench-astro-fit
//! target/release/astro-fit synth --out /tmp/manga71.fits.gz --nx 71 --ny 71 --seed 13 \
//!   --templates ../shared/data/templates/emiles \
//!   --reference ../shared/data/cubes/synthetic-manga-seed7-LOGCUBE.fits.gz
//! target/release/ceccm-bench-astro-fit --cube /tmp/manga71.fits.gz \
//!   --templates ../shared/data/templates/emiles --rounds 3
//! ```

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use ceccm_controller::server::{ServerOptions, start};
use ceccm_controller::time::parse_millis;
use clap::Parser;
use serde_json::{Value, json};

#[derive(Parser)]
#[command(about = "astro-fit through the control plane against fit-cube alone")]
struct Args {
    /// The cube (.fits or .fits.gz).
    #[arg(long)]
    cube: PathBuf,
    /// Template library directory (uploaded as a tar Dataset for the control plane).
    #[arg(long)]
    templates: PathBuf,
    /// Alternating rounds of (fit-cube, control plane).
    #[arg(long, default_value_t = 1)]
    rounds: usize,
    /// Spectra per chunk (both ways).
    #[arg(long, default_value_t = 64)]
    chunk_spectra: usize,
    /// Threads: fit-cube's --threads, and as many one-core local regions.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Scratch directory (default: a temporary one).
    #[arg(long)]
    work: Option<PathBuf>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("ceccm-bench-astro-fit: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ceccm-bench-astro-fit: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// A sibling binary of this one (the workers are `ceccm`, the reference is `astro-fit`).
fn sibling(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let path = exe.with_file_name(name);
    if !path.is_file() {
        bail!("{} not found: build it first", path.display());
    }
    Ok(path)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.retain(|x| x.is_finite());
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => 0.5 * (v[n / 2 - 1] + v[n / 2]),
    }
}

fn fit_cube_alone(args: &Args, out: &Path) -> anyhow::Result<f64> {
    let started = Instant::now();
    let output = Command::new(sibling("astro-fit")?)
        .arg("fit-cube")
        .arg(&args.cube)
        .arg("--templates")
        .arg(&args.templates)
        .arg("--out")
        .arg(out)
        .args(["--chunk-spectra", &args.chunk_spectra.to_string()])
        .args(["--threads", &args.threads.to_string()])
        .output()?;
    let seconds = started.elapsed().as_secs_f64();
    if !output.status.success() {
        bail!(
            "fit-cube failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(seconds)
}

fn template_tar(dir: &Path, out: &Path) -> anyhow::Result<Vec<u8>> {
    let mut names: Vec<String> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".fits") || n.ends_with(".txt"))
        .collect();
    names.sort();
    let status = Command::new("tar")
        .arg("-cf")
        .arg(out)
        .arg("-C")
        .arg(dir)
        .args(&names)
        .status()?;
    if !status.success() {
        bail!("tar failed");
    }
    Ok(std::fs::read(out)?)
}

struct Plane {
    wall: f64,
    /// Per chunk task: lease -> fit start, fit end -> completion (ms).
    before_fit_ms: Vec<f64>,
    after_fit_ms: Vec<f64>,
    /// Per worker: completion -> its next lease (ms).
    between_ms: Vec<f64>,
    chunks: usize,
    predictor: Value,
    /// Per stage: first lease and last completion, seconds after the application was applied.
    timeline: Vec<(String, f64, f64)>,
    /// Sums over the chunk tasks of what the workers report, seconds.
    sums: std::collections::BTreeMap<&'static str, f64>,
}

async fn send(request: reqwest::RequestBuilder) -> anyhow::Result<Value> {
    let response = request.send().await?;
    let status = response.status();
    let body: Value = response.json().await.unwrap_or(Value::Null);
    if !status.is_success() {
        bail!("{status}: {body}");
    }
    Ok(body)
}

async fn through_control_plane(
    args: &Args,
    dir: &Path,
    cube: &'static [u8],
    tar: &'static [u8],
) -> anyhow::Result<Plane> {
    let server = start(ServerOptions {
        region_grace: ceccm_controller::server::DEFAULT_REGION_GRACE,
        transport: Default::default(),
        listen: "127.0.0.1:0".parse()?,
        data_dir: dir.to_path_buf(),
        database_url: None,
        lease_seconds: 30,
        worker_program: sibling("ceccm")?,
        anonymous_metrics: false,
        tls: Default::default(),
        tls_client_ca: None,
        oidc: None,
        user_quota_bytes: None,
    })
    .await?;
    let base = format!("{}/api/v1", server.url());
    let outcome = async {
        let client = ceccm_controller::tokens::admin_client(dir)?;
        for i in 0..args.threads {
            let name = format!("local-{i}");
            send(client.put(format!("{base}/regions/{name}")).json(&json!({
                "metadata": {"name": name},
                "spec": {"tier": "cloud", "driver": "local", "capacity": {"cpu": 1},
                         "energy": {"idleWatts": 20, "wattsPerCore": 10}}})))
            .await?;
        }
        for (name, format, bytes) in [("cube", "cube", cube), ("templates", "templates", tar)] {
            send(client.put(format!("{base}/datasets/{name}")).json(&json!({
                "metadata": {"name": name}, "spec": {"format": format}})))
            .await?;
            send(
                client
                    .put(format!("{base}/datasets/{name}/content"))
                    .body(bytes),
            )
            .await?;
        }
        let started = Instant::now();
        let applied_ms = ceccm_controller::time::now_millis();
        send(client.put(format!("{base}/applications/fit")).json(&json!({
            "metadata": {"name": "fit"},
            "spec": {"app": "astro-fit", "inputs": [{"dataset": "cube"}],
                     "parameters": {"templates": "templates",
                                    "chunkSpectra": args.chunk_spectra},
                     "resources": {"cpu": 1}}})))
        .await?;
        loop {
            let app = send(client.get(format!("{base}/applications/fit"))).await?;
            match app["status"]["phase"].as_str() {
                Some("Succeeded") => break,
                Some("Failed") => bail!("the application failed: {}", app["status"]),
                _ => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
        let wall = started.elapsed().as_secs_f64();
        let tasks = send(client.get(format!(
            "{base}/tasks?labelSelector=ceccm/application%3Dfit"
        )))
        .await?;
        let items = tasks["items"].as_array().cloned().unwrap_or_default();
        let mut plane = Plane {
            wall,
            before_fit_ms: vec![],
            after_fit_ms: vec![],
            between_ms: vec![],
            chunks: 0,
            predictor: send(client.get(format!("{base}/predictor"))).await?,
            timeline: vec![],
            sums: Default::default(),
        };
        for stage in ["prepare", "fit", "assemble"] {
            let spans: Vec<(i64, i64)> = items
                .iter()
                .filter(|t| t["metadata"]["labels"]["ceccm/stage"] == stage)
                .filter_map(|t| {
                    let s = t["status"]["startTime"].as_str().and_then(parse_millis)?;
                    let e = t["status"]["completionTime"]
                        .as_str()
                        .and_then(parse_millis)?;
                    Some((s, e))
                })
                .collect();
            if let (Some(first), Some(last)) = (
                spans.iter().map(|s| s.0).min(),
                spans.iter().map(|s| s.1).max(),
            ) {
                plane.timeline.push((
                    stage.to_string(),
                    (first - applied_ms) as f64 / 1000.0,
                    (last - applied_ms) as f64 / 1000.0,
                ));
            }
        }
        let millis = |t: &Value, key: &str| t["status"][key].as_str().and_then(parse_millis);
        let mut by_worker: std::collections::BTreeMap<String, Vec<(i64, i64)>> = Default::default();
        for t in &items {
            let (Some(start), Some(end)) = (millis(t, "startTime"), millis(t, "completionTime"))
            else {
                continue;
            };
            let worker = t["status"]["worker"].as_str().unwrap_or("?").to_string();
            by_worker.entry(worker).or_default().push((start, end));
            let result = &t["status"]["result"];
            if let (Some(read), Some(fit)) = (
                result["readSeconds"].as_f64(),
                result["fitSeconds"].as_f64(),
            ) {
                plane.chunks += 1;
                for key in [
                    "fetchSeconds",
                    "setupSeconds",
                    "readSeconds",
                    "fitSeconds",
                    "uploadSeconds",
                ] {
                    *plane.sums.entry(key).or_default() += result[key].as_f64().unwrap_or(0.0);
                }
                // The worker reports fetch, setup, read and fit; the rest of the time from the
                // lease to the recorded completion is the upload and the report.
                let busy_ms = (end - start) as f64;
                let seconds = |key: &str| 1000.0 * result[key].as_f64().unwrap_or(0.0);
                let before = seconds("fetchSeconds") + seconds("setupSeconds");
                plane.before_fit_ms.push(before);
                plane
                    .after_fit_ms
                    .push((busy_ms - before - 1000.0 * (read + fit)).max(0.0));
            }
        }
        for t in &items {
            let stage = &t["metadata"]["labels"]["ceccm/stage"];
            if stage == "assemble" || stage == "prepare" {
                let r = &t["status"]["result"];
                println!(
                    "{} task: fetch {:.2} s ({} downloads, {} linked from the server's store, {} cache hits), upload {:.2} s",
                    stage.as_str().unwrap_or("?"),
                    r["fetchSeconds"].as_f64().unwrap_or(f64::NAN),
                    r["transfers"]["downloaded"].as_array().map_or(0, Vec::len),
                    r["transfers"]["linked"].as_array().map_or(0, Vec::len),
                    r["transfers"]["cacheHits"],
                    r["uploadSeconds"].as_f64().unwrap_or(f64::NAN)
                );
            }
        }
        for spans in by_worker.values_mut() {
            spans.sort_unstable();
            for pair in spans.windows(2) {
                plane.between_ms.push((pair[1].0 - pair[0].1) as f64);
            }
        }
        Ok(plane)
    }
    .await;
    server.shutdown().await;
    outcome
}

async fn run(args: Args) -> anyhow::Result<()> {
    let scratch = match &args.work {
        Some(dir) => {
            std::fs::create_dir_all(dir)?;
            tempfile::tempdir_in(dir)?
        }
        None => tempfile::tempdir()?,
    };
    let cube: &'static [u8] = Box::leak(
        std::fs::read(&args.cube)
            .with_context(|| format!("reading {}", args.cube.display()))?
            .into_boxed_slice(),
    );
    let tar: &'static [u8] = Box::leak(
        template_tar(&args.templates, &scratch.path().join("templates.tar"))?.into_boxed_slice(),
    );
    println!(
        "cube {} ({} bytes), templates {}, {} threads, chunks of {} spectra",
        args.cube.display(),
        cube.len(),
        args.templates.display(),
        args.threads,
        args.chunk_spectra
    );
    let (mut alone, mut plane_walls) = (Vec::new(), Vec::new());
    let mut last = None;
    for round in 0..args.rounds {
        let dir = scratch.path().join(format!("round-{round}"));
        let a = fit_cube_alone(&args, &dir.join("fit-cube"))?;
        let p = through_control_plane(&args, &dir.join("ceccm"), cube, tar).await?;
        println!(
            "round {round}: fit-cube {a:.2} s, control plane {:.2} s ({} chunk tasks), ratio {:.3}",
            p.wall,
            p.chunks,
            p.wall / a
        );
        alone.push(a);
        plane_walls.push(p.wall);
        last = Some(p);
    }
    let (a, p) = (median(alone), median(plane_walls));
    println!(
        "median of {} rounds: fit-cube alone {a:.2} s, through the control plane {p:.2} s, ratio {:.3}",
        args.rounds,
        p / a
    );
    if let Some(plane) = last {
        println!(
            "dispatch per chunk task (last round, medians): lease -> fit start {:.1} ms, fit end -> completion {:.1} ms, completion -> next lease {:.1} ms",
            median(plane.before_fit_ms),
            median(plane.after_fit_ms),
            median(plane.between_ms)
        );
        let stages: Vec<String> = plane
            .timeline
            .iter()
            .map(|(stage, from, to)| format!("{stage} {from:.2}-{to:.2} s"))
            .collect();
        println!("stages (last round, from the apply): {}", stages.join(", "));
        let sums: Vec<String> = plane
            .sums
            .iter()
            .map(|(k, v)| format!("{} {v:.2} s", k.trim_end_matches("Seconds")))
            .collect();
        println!(
            "chunk tasks, summed over workers (last round): {}",
            sums.join(", ")
        );
        let r = &plane.predictor;
        println!(
            "predictor after the job: state {}, {} samples, model {}, run-time MAPE {}, prior MAPE {}",
            r["state"], r["samples"], r["model"], r["runtimeMape"], r["priorRuntimeMape"]
        );
    }
    Ok(())
}

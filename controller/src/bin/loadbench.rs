//! `ceccm-loadbench`: load on the REST API over loopback, against an in-process server on
//! SQLite. Reports requests/s and p50/p99 latency for GET of one object (open loop at a fixed
//! rate, and closed loop), LIST of 1,000 objects and apply (PUT that changes the object).
//!
//! `cargo run --release -p ceccm-controller --bin ceccm-loadbench -- [--seconds 10] [--rate 5000]`

use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use ceccm_controller::server::{ServerOptions, start};
use clap::Parser;
use serde_json::json;
use tokio::sync::Mutex;

#[derive(Parser)]
#[command(about = "Load benchmark of the ceccm REST API on SQLite")]
struct Args {
    /// Seconds per scenario.
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// Open-loop GET rate (requests per second).
    #[arg(long, default_value_t = 5000)]
    rate: u32,
    /// Concurrent requests in the closed-loop scenarios.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Objects stored (and listed).
    #[arg(long, default_value_t = 1000)]
    objects: usize,
}

struct Report {
    name: String,
    requests: usize,
    errors: usize,
    elapsed: Duration,
    latencies_us: Vec<u64>,
}

impl Report {
    fn print(&mut self) {
        self.latencies_us.sort_unstable();
        let pct = |p: f64| {
            let l = &self.latencies_us;
            if l.is_empty() {
                return f64::NAN;
            }
            l[((l.len() - 1) as f64 * p).round() as usize] as f64 / 1000.0
        };
        println!(
            "{:<28} {:>9.0} req/s   p50 {:>7.3} ms   p99 {:>7.3} ms   ({} requests, {} errors)",
            self.name,
            self.requests as f64 / self.elapsed.as_secs_f64(),
            pct(0.50),
            pct(0.99),
            self.requests,
            self.errors
        );
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("ceccm-loadbench: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ceccm-loadbench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let server = start(ServerOptions {
        region_grace: ceccm_controller::server::DEFAULT_REGION_GRACE,
        transport: Default::default(),
        listen: "127.0.0.1:0".parse()?,
        data_dir: dir.path().to_path_buf(),
        database_url: None,
        lease_seconds: 30,
        worker_program: std::env::current_exe()?,
        anonymous_metrics: false,
        tls: Default::default(),
        tls_client_ca: None,
        oidc: None,
        user_quota_bytes: None,
    })
    .await?;
    let base = server.url();
    let token = ceccm_controller::auth::read_admin_token(dir.path())?;
    let client = ceccm_controller::tokens::client_with_token(
        reqwest::Client::builder().pool_max_idle_per_host(256),
        &token,
    )?;
    let dataset = |i: usize, note: &str| {
        json!({"apiVersion": "ceccm/v1", "kind": "Dataset",
               "metadata": {"name": format!("cube-{i:05}"), "labels": {"survey": "manga"}},
               "spec": {"format": "fits", "description": note}})
    };
    for i in 0..args.objects {
        let response = client
            .put(format!("{base}/api/v1/datasets/cube-{i:05}"))
            .json(&dataset(i, "seed"))
            .send()
            .await?;
        if !response.status().is_success() {
            bail!("seeding failed: {}", response.status());
        }
    }
    let listed: serde_json::Value = client
        .get(format!("{base}/api/v1/datasets"))
        .send()
        .await?
        .json()
        .await?;
    let n = listed["items"].as_array().context("list answer")?.len();
    println!(
        "server {base}, SQLite (WAL) in {}, {n} datasets stored",
        dir.path().display()
    );
    if let Ok(load) = std::fs::read_to_string("/proc/loadavg") {
        let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
        println!("host: {cores} cores, load average {}", load.trim());
    }
    println!(
        "{} s per scenario, closed loops with {} concurrent requests\n",
        args.seconds, args.concurrency
    );
    let duration = Duration::from_secs_f64(args.seconds);

    let get_url = format!("{base}/api/v1/datasets/cube-00042");
    open_loop(&client, &get_url, args.rate, duration)
        .await
        .print();
    let c = client.clone();
    let url = get_url.clone();
    closed_loop("get (closed loop)", args.concurrency, duration, move |_| {
        let (c, url) = (c.clone(), url.clone());
        async move {
            c.get(url)
                .send()
                .await
                .is_ok_and(|r| r.status().is_success())
        }
    })
    .await
    .print();
    let c = client.clone();
    let url = format!("{base}/api/v1/datasets");
    closed_loop(
        &format!("list {n} (closed loop)"),
        args.concurrency.min(4),
        duration,
        move |_| {
            let (c, url) = (c.clone(), url.clone());
            async move {
                match c.get(url).send().await {
                    Ok(r) if r.status().is_success() => r.bytes().await.is_ok(),
                    _ => false,
                }
            }
        },
    )
    .await
    .print();
    let c = client.clone();
    let base2 = base.clone();
    closed_loop(
        "apply (closed loop)",
        args.concurrency,
        duration,
        move |k| {
            let (c, base) = (c.clone(), base2.clone());
            // Each apply changes the object, so every request is a real write.
            let i = k % args.objects;
            let body = dataset(i, &format!("revision {k}"));
            async move {
                c.put(format!("{base}/api/v1/datasets/cube-{i:05}"))
                    .json(&body)
                    .send()
                    .await
                    .is_ok_and(|r| r.status().is_success())
            }
        },
    )
    .await
    .print();
    server.shutdown().await;
    Ok(())
}

/// Sends GETs at `rate` per second regardless of answers (open loop). Latency counts from when
/// the dispatcher releases the request, waiting for a connection slot included (so a server that
/// falls behind shows its queueing), but not the timer's 1 ms wake-up granularity.
async fn open_loop(client: &reqwest::Client, url: &str, rate: u32, duration: Duration) -> Report {
    let results = Arc::new(Mutex::new((Vec::new(), 0usize)));
    let start = Instant::now();
    let total = (f64::from(rate) * duration.as_secs_f64()) as u64;
    let mut handles = Vec::with_capacity(total as usize);
    // Bounds open connections when the server falls behind; waiting for a slot still counts.
    let slots = Arc::new(tokio::sync::Semaphore::new(256));
    for k in 0..total {
        let planned = start + Duration::from_secs_f64(k as f64 / f64::from(rate));
        if let Some(wait) = planned.checked_duration_since(Instant::now()) {
            tokio::time::sleep(wait).await;
        }
        let dispatched = Instant::now();
        let (client, url, results) = (client.clone(), url.to_string(), results.clone());
        let slots = slots.clone();
        handles.push(tokio::spawn(async move {
            let Ok(_slot) = slots.acquire().await else {
                return;
            };
            let ok = client
                .get(url)
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            let latency = dispatched.elapsed().as_micros() as u64;
            let mut r = results.lock().await;
            if ok {
                r.0.push(latency);
            } else {
                r.1 += 1;
            }
        }));
    }
    for h in handles {
        let _ = h.await;
    }
    let elapsed = start.elapsed();
    let (latencies_us, errors) = std::mem::take(&mut *results.lock().await);
    Report {
        name: format!("get @ {rate}/s (open loop)"),
        requests: latencies_us.len() + errors,
        errors,
        elapsed,
        latencies_us,
    }
}

async fn closed_loop<F, Fut>(
    name: &str,
    concurrency: usize,
    duration: Duration,
    request: F,
) -> Report
where
    F: Fn(usize) -> Fut + Send + Sync + Clone + 'static,
    Fut: Future<Output = bool> + Send,
{
    let start = Instant::now();
    let counter = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut handles = Vec::new();
    for _ in 0..concurrency {
        let (request, counter) = (request.clone(), counter.clone());
        handles.push(tokio::spawn(async move {
            let (mut latencies, mut errors) = (Vec::new(), 0usize);
            while start.elapsed() < duration {
                let k = counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let sent = Instant::now();
                if request(k).await {
                    latencies.push(sent.elapsed().as_micros() as u64);
                } else {
                    errors += 1;
                }
            }
            (latencies, errors)
        }));
    }
    let mut report = Report {
        name: name.to_string(),
        requests: 0,
        errors: 0,
        elapsed: Duration::ZERO,
        latencies_us: Vec::new(),
    };
    for h in handles {
        if let Ok((latencies, errors)) = h.await {
            report.latencies_us.extend(latencies);
            report.errors += errors;
        }
    }
    report.elapsed = start.elapsed();
    report.requests = report.latencies_us.len() + report.errors;
    report
}

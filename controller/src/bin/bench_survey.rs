//! `ceccm-bench-survey`: the control plane holding a survey (issue 18). An in-process `ceccm
//! server` (SQLite in a temporary directory, or a fresh schema of the PostgreSQL database given)
//! stores N applications of about 4.5 KB each (24 host-command tasks, as
//! `examples/batch-app.yaml`, held by `spec.suspend`, so nothing runs), applied through the API,
//! and once every one has settled (phase `Suspended`) measures:
//!
//! - the idle server's CPU (this process's user + system time over a quiet interval, in % of a
//!   core: the client is silent meanwhile) and its resident memory;
//! - from one client, one request at a time: GET of an application, PUT that changes one (a
//!   committed write each), and a `labelSelector` list that picks 100 of them (`plate=pNN`);
//! - with `--tasks N`, one application of N tasks (`true` each) on a local region: the time from
//!   its apply to all its tasks created and queued.
//!
//! `cargo run --release -p ceccm-controller --bin ceccm-bench-survey -- [--applications 10000]
//! [--seconds 10] [--idle-seconds 10] [--tasks N] [--database-url postgres://...]`

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use ceccm_controller::resources::Kind;
use ceccm_controller::server::{ServerOptions, start};
use ceccm_controller::store::Query;
use ceccm_controller::worker::process_cpu_seconds;
use clap::Parser;
use serde_json::{Value, json};

#[derive(Parser)]
#[command(about = "The ceccm control plane holding a survey's applications")]
struct Args {
    /// Applications stored.
    #[arg(long, default_value_t = 10_000)]
    applications: usize,
    /// Seconds per request scenario.
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// Seconds over which the idle server's CPU is measured.
    #[arg(long, default_value_t = 10.0)]
    idle_seconds: f64,
    /// Then one application of this many tasks (`true` each, on a local region): the time from
    /// its apply to all its tasks created and queued. 0: skip.
    #[arg(long, default_value_t = 0)]
    tasks: usize,
    /// A PostgreSQL database to use (a schema of its own is made, and dropped at the end),
    /// instead of SQLite.
    #[arg(long)]
    database_url: Option<String>,
}

/// Applications per `plate` label value: a selector on one plate picks this many.
const PER_PLATE: usize = 100;

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("ceccm-bench-survey: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ceccm-bench-survey: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn name(i: usize) -> String {
    format!("galaxy-{i:05}")
}

/// An application of about 4.5 KB: 24 chunks of host-command work, suspended.
fn application(i: usize, revision: usize) -> Value {
    let tasks: Vec<Value> = (0..24)
        .map(|chunk| {
            let terms = 3_000_000 + 200_000 * chunk;
            json!({"command": "awk", "args": [format!(
                "BEGIN {{ s = 0; for (i = 1; i <= {terms}; i++) s += 1 / (i * i); \
                 printf \"chunk {chunk:02}: sum 1/n^2 over {terms} terms = %.9f\\n\", s }}"
            )]})
        })
        .collect();
    json!({"apiVersion": "ceccm/v1", "kind": "Application",
           "metadata": {"name": name(i), "labels": {
               "survey": "manga",
               "plate": format!("p{:02}", i / PER_PLATE),
               "revision": revision.to_string()}},
           "spec": {"app": "container", "type": "batch", "suspend": true,
                    "placement": {"tiers": ["edge", "cloud"]}, "tasks": tasks}})
}

async fn run(args: Args) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let schema = match &args.database_url {
        Some(base) => Some(create_schema(base).await?),
        None => None,
    };
    let server = start(ServerOptions {
        region_grace: ceccm_controller::server::DEFAULT_REGION_GRACE,
        transport: Default::default(),
        listen: "127.0.0.1:0".parse()?,
        data_dir: dir.path().to_path_buf(),
        database_url: schema.as_ref().map(|(_, url)| url.clone()),
        lease_seconds: 30,
        // Workers are not measured here: the local region's exit at once.
        worker_program: "/bin/true".into(),
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
        reqwest::Client::builder().pool_max_idle_per_host(64),
        &token,
    )?;
    let store = server.store.clone();
    let n = args.applications;
    println!(
        "server {base}, {}, {n} applications",
        if schema.is_some() {
            "PostgreSQL"
        } else {
            "SQLite (WAL)"
        }
    );
    if let Ok(load) = std::fs::read_to_string("/proc/loadavg") {
        let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
        println!("host: {cores} cores, load average {}", load.trim());
    }
    let rss_before = resident_kib()?;

    // Applied through the API, 16 at a time, as a survey's submission script would.
    let seeding = Instant::now();
    let bar = indicatif::ProgressBar::new(n as u64);
    let mut next = 0;
    let mut in_flight = tokio::task::JoinSet::new();
    while next < n || !in_flight.is_empty() {
        while next < n && in_flight.len() < 16 {
            let (c, url, body) = (
                client.clone(),
                format!("{base}/api/v1/applications/{}", name(next)),
                application(next, 0),
            );
            in_flight.spawn(async move { c.put(url).json(&body).send().await });
            next += 1;
        }
        if let Some(done) = in_flight.join_next().await {
            let response = done??;
            if !response.status().is_success() {
                bail!(
                    "applying failed: {} {}",
                    response.status(),
                    response.text().await.unwrap_or_default()
                );
            }
            bar.inc(1);
        }
    }
    bar.finish_and_clear();
    let applied = seeding.elapsed();
    let suspended = Query {
        phase: Some("Suspended"),
        ..Default::default()
    };
    let deadline = Instant::now() + Duration::from_secs(1800);
    while (store.count(Kind::Application, &suspended).await? as usize) < n {
        if Instant::now() > deadline {
            bail!("the applications did not all settle in 30 minutes");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let settled = seeding.elapsed();
    let (_, rows) = store.list_raw(Kind::Application, &Query::default()).await?;
    let json_bytes: usize = rows.iter().map(|(_, body)| body.len()).sum();
    drop(rows);
    println!(
        "applied in {:.1} s, all Suspended after {:.1} s; {:.0} bytes of JSON per application",
        applied.as_secs_f64(),
        settled.as_secs_f64(),
        json_bytes as f64 / n as f64
    );

    // Idle: the client says nothing; whatever the process spends is the server's.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let cpu_start = process_cpu_seconds(false);
    let idle_start = Instant::now();
    tokio::time::sleep(Duration::from_secs_f64(args.idle_seconds)).await;
    let idle_cpu = (process_cpu_seconds(false) - cpu_start) / idle_start.elapsed().as_secs_f64();
    let rss = resident_kib()?;

    let duration = Duration::from_secs_f64(args.seconds);
    let get = one_at_a_time(duration, |k| {
        let url = format!("{base}/api/v1/applications/{}", name(k * 7919 % n));
        let c = client.clone();
        async move {
            let r = c.get(url).send().await?;
            ensure_ok(r).await.map(|_| ())
        }
    })
    .await?;
    let put = one_at_a_time(duration, |k| {
        let i = k * 7919 % n;
        let url = format!("{base}/api/v1/applications/{}", name(i));
        let body = application(i, k + 1);
        let c = client.clone();
        async move {
            let r = c.put(url).json(&body).send().await?;
            ensure_ok(r).await.map(|_| ())
        }
    })
    .await?;
    let plates = n.div_ceil(PER_PLATE);
    let list = one_at_a_time(duration, |k| {
        let url = format!(
            "{base}/api/v1/applications?labelSelector=plate%3Dp{:02}",
            k * 31 % plates
        );
        let c = client.clone();
        async move {
            let r = ensure_ok(c.get(url).send().await?).await?;
            let list: Value = r.json().await?;
            let found = list["items"].as_array().map_or(0, Vec::len);
            if found == 0 || found > PER_PLATE {
                bail!("the selector picked {found} applications");
            }
            Ok(())
        }
    })
    .await?;

    println!();
    println!("| measure | value |");
    println!("|---|---:|");
    println!(
        "| idle server CPU (% of a core) | {:.2} |",
        100.0 * idle_cpu
    );
    println!(
        "| resident memory (MB; {:.0} MB before seeding) | {:.0} |",
        rss_before as f64 / 1024.0,
        rss as f64 / 1024.0
    );
    println!(
        "| resident memory added per application (KB) | {:.1} |",
        rss.saturating_sub(rss_before) as f64 / n as f64
    );
    for (what, report) in [
        ("GET one application", &get),
        ("PUT one application (a write)", &put),
        ("list labelSelector plate=pNN (100 of N)", &list),
    ] {
        println!(
            "| {what}: p50 / p99 (ms), {} requests | {:.3} / {:.3} |",
            report.len(),
            percentile(report, 0.50),
            percentile(report, 0.99)
        );
    }
    if args.tasks > 0 {
        let region = json!({"apiVersion": "ceccm/v1", "kind": "Region",
            "metadata": {"name": "bench"},
            "spec": {"tier": "cloud", "driver": "local", "capacity": {"cpu": 1}}});
        ensure_ok(
            client
                .put(format!("{base}/api/v1/regions/bench"))
                .json(&region)
                .send()
                .await?,
        )
        .await?;
        let tasks: Vec<Value> = (0..args.tasks)
            .map(|_| json!({"command": "true"}))
            .collect();
        let batch = json!({"apiVersion": "ceccm/v1", "kind": "Application",
            "metadata": {"name": "survey-batch"},
            "spec": {"app": "container", "type": "batch", "tasks": tasks}});
        let applied = Instant::now();
        ensure_ok(
            client
                .put(format!("{base}/api/v1/applications/survey-batch"))
                .json(&batch)
                .send()
                .await?,
        )
        .await?;
        let of_batch = Query {
            owner: Some("survey-batch"),
            ..Default::default()
        };
        let deadline = Instant::now() + Duration::from_secs(3600);
        while (store.count(Kind::Task, &of_batch).await? as usize) < args.tasks {
            if Instant::now() > deadline {
                bail!("the tasks were not all created in an hour");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let elapsed = applied.elapsed().as_secs_f64();
        println!(
            "| one application of {} tasks: apply to all created and queued (s) | {elapsed:.2} |",
            args.tasks
        );
        println!(
            "| tasks created per second | {:.0} |",
            args.tasks as f64 / elapsed
        );
    }
    server.shutdown().await;
    if let Some((base, (name, _))) = args.database_url.as_ref().zip(schema) {
        drop_schema(base, &name).await?;
    }
    Ok(())
}

async fn ensure_ok(response: reqwest::Response) -> anyhow::Result<reqwest::Response> {
    if !response.status().is_success() {
        bail!(
            "{}: {}",
            response.status(),
            response.text().await.unwrap_or_default()
        );
    }
    Ok(response)
}

/// Latencies (ms) of `request(0)`, `request(1)`, ... sent one after another for `duration`.
async fn one_at_a_time<F, Fut>(duration: Duration, request: F) -> anyhow::Result<Vec<f64>>
where
    F: Fn(usize) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let start = Instant::now();
    let mut latencies = Vec::new();
    while start.elapsed() < duration {
        let sent = Instant::now();
        request(latencies.len()).await?;
        latencies.push(sent.elapsed().as_secs_f64() * 1e3);
    }
    latencies.sort_by(f64::total_cmp);
    Ok(latencies)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// This process's resident memory, in KiB.
fn resident_kib() -> anyhow::Result<u64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .context("VmRSS in /proc/self/status")?;
    Ok(line
        .split_whitespace()
        .nth(1)
        .context("VmRSS value")?
        .parse()?)
}

/// A fresh schema of the database at `base`, and the URL that uses it.
async fn create_schema(base: &str) -> anyhow::Result<(String, String)> {
    use sqlx::Connection;
    let schema = format!("bench{}", uuid::Uuid::new_v4().simple());
    let mut conn = sqlx::PgConnection::connect(base).await?;
    sqlx::query(&format!("CREATE SCHEMA {schema}"))
        .execute(&mut conn)
        .await?;
    let separator = if base.contains('?') { '&' } else { '?' };
    let url = format!("{base}{separator}options=-c%20search_path%3D{schema}");
    Ok((schema, url))
}

async fn drop_schema(base: &str, schema: &str) -> anyhow::Result<()> {
    use sqlx::Connection;
    let mut conn = sqlx::PgConnection::connect(base).await?;
    sqlx::query(&format!("DROP SCHEMA {schema} CASCADE"))
        .execute(&mut conn)
        .await?;
    Ok(())
}

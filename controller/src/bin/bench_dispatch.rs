//! `ceccm-bench-dispatch`: dispatch throughput and per-task overhead of the task transports.
//!
//! An in-process server on SQLite holds N no-op tasks queued in one region (written straight
//! into the store, as the planner writes them, for an application marked finished so that its
//! reconciler stays idle); W in-process workers then take them as real workers do and report
//! each done, and nothing else runs: the figures are the transport's and the API's cost per
//! task.
//!
//! - `embedded`: `POST /tasks:lease`, then `POST /tasks/{name}/complete`.
//! - `amqp://...`: the server publishes each task to `ceccm.<region>` (confirmed); a worker
//!   consumes (manual acks, `--prefetch`), claims the task by name and uid (`POST /tasks:lease`
//!   with `task`), completes it, then acknowledges the message.
//!
//! `cargo run --release -p ceccm-controller --bin ceccm-bench-dispatch -- --tasks 100000
//! --workers 8 --transport embedded` (or `--transport amqp://guest:guest@127.0.0.1:5672/%2f`)

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use ceccm_controller::amqp::{TaskMessage, Transport, queue_name};
use ceccm_controller::resources::Kind;
use ceccm_controller::server::{ServerOptions, start};
use ceccm_controller::store::Change;
use clap::Parser;
use futures::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use serde_json::json;

#[derive(Parser)]
#[command(about = "Dispatch throughput of the embedded queue and of RabbitMQ")]
struct Args {
    #[arg(long, default_value_t = 100_000)]
    tasks: usize,
    /// Concurrent workers (in-process).
    #[arg(long, default_value_t = 8)]
    workers: usize,
    /// `embedded` or an amqp:// URL.
    #[arg(long, default_value = "embedded")]
    transport: Transport,
    /// Deliveries each RabbitMQ worker holds ahead (basic.qos).
    #[arg(long, default_value_t = 4)]
    prefetch: u16,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("ceccm-bench-dispatch: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ceccm-bench-dispatch: {e:#}");
            ExitCode::FAILURE
        }
    }
}

struct Bench {
    client: reqwest::Client,
    base: String,
    region: String,
    tasks: usize,
    done: AtomicUsize,
    /// Per-task dispatch time (lease or claim, complete, ack), microseconds.
    latencies_us: std::sync::Mutex<Vec<u64>>,
}

impl Bench {
    fn finished(&self) -> bool {
        self.done.load(Ordering::Relaxed) >= self.tasks
    }

    fn record(&self, task: &str, started: Instant) {
        let _ = task;
        self.done.fetch_add(1, Ordering::Relaxed);
        self.latencies_us
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(started.elapsed().as_micros() as u64);
    }

    async fn complete(&self, worker: &str, name: &str, secret: &str) -> anyhow::Result<()> {
        let answer = self
            .client
            .post(format!("{}/api/v1/tasks/{name}/complete", self.base))
            .header("x-ceccm-lease-secret", secret)
            .json(&json!({"worker": worker, "result": {}}))
            .send()
            .await?;
        if !answer.status().is_success() {
            bail!("complete {name}: {}", answer.status());
        }
        Ok(())
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let server = start(ServerOptions {
        listen: "127.0.0.1:0".parse()?,
        data_dir: dir.path().to_path_buf(),
        database_url: None,
        lease_seconds: 300,
        // The region's own workers would take the tasks: start nothing that does.
        worker_program: "/bin/true".into(),
        anonymous_metrics: false,
        tls: Default::default(),
        tls_client_ca: None,
        oidc: None,
        user_quota_bytes: None,
        region_grace: ceccm_controller::server::DEFAULT_REGION_GRACE,
        transport: args.transport.clone(),
    })
    .await?;
    let token = std::fs::read_to_string(dir.path().join("admin.token"))?;
    let client = reqwest::Client::builder()
        .default_headers(
            [(
                reqwest::header::AUTHORIZATION,
                format!("Bearer {}", token.trim()).parse()?,
            )]
            .into_iter()
            .collect(),
        )
        .pool_max_idle_per_host(args.workers * 2)
        .build()?;
    let base = server.url();
    let region = format!("bench-{}", std::process::id());
    let put = |path: String, body: serde_json::Value| {
        let request = client.put(format!("{base}/api/v1/{path}")).json(&body);
        async move {
            let answer = request.send().await?;
            if !answer.status().is_success() {
                bail!(
                    "{}: {}",
                    answer.status(),
                    answer.text().await.unwrap_or_default()
                );
            }
            anyhow::Ok(())
        }
    };
    put(
        format!("regions/{region}"),
        json!({"apiVersion": "ceccm/v1", "kind": "Region", "metadata": {"name": region},
               "spec": {"tier": "cloud", "driver": "local", "capacity": {"cpu": 1}}}),
    )
    .await
    .context("region")?;
    // The tasks' application, marked finished so that its reconciler (which would tally
    // all N tasks on every change) stays out of the figures: they are the transport's.
    let application = json!({
        "apiVersion": "ceccm/v1", "kind": "Application",
        "metadata": {"name": "bench", "uid": uuid::Uuid::new_v4().to_string(), "generation": 1},
        "spec": {"app": "container", "tasks": [{"command": "true"}]},
        "status": {"phase": "Succeeded"},
    });
    server
        .store
        .write(
            Kind::Application,
            "bench",
            |_| -> Result<Change, ceccm_controller::store::StoreError> {
                Ok(Change::Put(application))
            },
        )
        .await?;

    // The N tasks, queued in the region, as the planner writes them.
    let writing = Instant::now();
    for index in 1..=args.tasks {
        let name = format!("bench-{index:05}");
        let object = json!({
            "apiVersion": "ceccm/v1", "kind": "Task",
            "metadata": {"name": name, "uid": uuid::Uuid::new_v4().to_string(),
                         "labels": {"ceccm/application": "bench"}, "generation": 1},
            "spec": {"application": "bench", "index": index, "command": "true",
                     "maxAttempts": 3},
            "status": {"state": "Queued", "attempts": 0, "region": region},
        });
        server
            .store
            .write(
                Kind::Task,
                &name,
                |_| -> Result<Change, ceccm_controller::store::StoreError> {
                    Ok(Change::Put(object))
                },
            )
            .await?;
    }
    let written = writing.elapsed();
    println!(
        "transport {}: {} tasks written to the store in {:.1} s",
        match &args.transport {
            Transport::Embedded => "embedded".to_string(),
            Transport::Amqp(url) => url.to_string(),
        },
        args.tasks,
        written.as_secs_f64()
    );
    if let Transport::Amqp(url) = &args.transport {
        // All published (and confirmed) before the workers start.
        let connection = ceccm_controller::amqp::connect(url, "bench").await?;
        let channel = connection.create_channel().await?;
        let deadline = Instant::now() + Duration::from_secs(900);
        loop {
            let queued = channel
                .queue_declare(
                    queue_name(&region).as_str().into(),
                    QueueDeclareOptions::durable().passive(),
                    FieldTable::default(),
                )
                .await
                .map(|q| q.message_count() as usize)
                .unwrap_or(0);
            if queued >= args.tasks {
                break;
            }
            if Instant::now() > deadline {
                bail!("only {queued} messages published in 900 s");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        println!(
            "  {} messages published and confirmed {:.1} s after the first write ({:.0} msg/s overall)",
            args.tasks,
            writing.elapsed().as_secs_f64(),
            args.tasks as f64 / writing.elapsed().as_secs_f64()
        );
        let _ = connection.close(200, "bench".into()).await;
    }

    let bench = Arc::new(Bench {
        client,
        base,
        region: region.clone(),
        tasks: args.tasks,
        done: AtomicUsize::new(0),
        latencies_us: Default::default(),
    });
    let draining = Instant::now();
    let mut workers = Vec::new();
    for w in 0..args.workers {
        let bench = bench.clone();
        let transport = args.transport.clone();
        let prefetch = args.prefetch;
        workers.push(tokio::spawn(async move {
            let worker = format!("bench-worker-{w}");
            match transport {
                Transport::Embedded => embedded_worker(&bench, &worker).await,
                Transport::Amqp(url) => amqp_worker(&bench, &worker, &url, prefetch).await,
            }
        }));
    }
    for worker in workers {
        worker.await??;
    }
    let elapsed = draining.elapsed().as_secs_f64();
    let mut latencies =
        std::mem::take(&mut *bench.latencies_us.lock().unwrap_or_else(|e| e.into_inner()));
    latencies.sort_unstable();
    let pct =
        |p: f64| latencies[((latencies.len() - 1) as f64 * p).round() as usize] as f64 / 1000.0;
    let mean = latencies.iter().sum::<u64>() as f64 / latencies.len() as f64 / 1000.0;
    println!(
        "  drained {} tasks with {} workers in {:.1} s: {:.0} tasks/s; per task {:.2} ms mean \
         (p50 {:.2} ms, p99 {:.2} ms) of a worker's time",
        latencies.len(),
        args.workers,
        elapsed,
        latencies.len() as f64 / elapsed,
        mean,
        pct(0.5),
        pct(0.99)
    );
    if let Transport::Amqp(url) = &args.transport {
        let connection = ceccm_controller::amqp::connect(url, "bench").await?;
        let channel = connection.create_channel().await?;
        let _ = channel
            .queue_delete(queue_name(&region).as_str().into(), Default::default())
            .await;
        let _ = connection.close(200, "bench".into()).await;
    }
    server.shutdown().await;
    Ok(())
}

async fn embedded_worker(bench: &Bench, worker: &str) -> anyhow::Result<()> {
    while !bench.finished() {
        let started = Instant::now();
        let answer = bench
            .client
            .post(format!("{}/api/v1/tasks:lease", bench.base))
            .json(&json!({"worker": worker, "region": bench.region, "leaseSeconds": 300}))
            .send()
            .await?;
        match answer.status().as_u16() {
            204 => tokio::time::sleep(Duration::from_millis(5)).await,
            200 => {
                let secret = answer
                    .headers()
                    .get("x-ceccm-lease-secret")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_string();
                let task: serde_json::Value = answer.json().await?;
                let name = task["metadata"]["name"].as_str().unwrap_or_default();
                bench.complete(worker, name, &secret).await?;
                bench.record(name, started);
            }
            other => bail!("lease: {other}"),
        }
    }
    Ok(())
}

async fn amqp_worker(
    bench: &Bench,
    worker: &str,
    url: &ceccm_controller::amqp::AmqpUrl,
    prefetch: u16,
) -> anyhow::Result<()> {
    let connection = ceccm_controller::amqp::connect(url, worker).await?;
    let channel = connection.create_channel().await?;
    channel
        .basic_qos(prefetch.max(1), BasicQosOptions::default())
        .await?;
    let mut consumer = channel
        .basic_consume(
            queue_name(&bench.region).as_str().into(),
            worker.into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    while !bench.finished() {
        let Ok(next) = tokio::time::timeout(Duration::from_millis(100), consumer.next()).await
        else {
            continue;
        };
        let Some(delivery) = next else { break };
        let delivery = delivery?;
        let started = Instant::now();
        let message = TaskMessage::decode(&delivery.data)?;
        let answer = bench
            .client
            .post(format!("{}/api/v1/tasks:lease", bench.base))
            .json(
                &json!({"worker": worker, "region": bench.region, "leaseSeconds": 300,
                          "task": {"name": message.task, "uid": message.uid}}),
            )
            .send()
            .await?;
        match answer.status().as_u16() {
            200 => {
                let secret = answer
                    .headers()
                    .get("x-ceccm-lease-secret")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_string();
                bench.complete(worker, &message.task, &secret).await?;
                delivery.ack(BasicAckOptions::default()).await?;
                bench.record(&message.task, started);
            }
            // A duplicate: dropped.
            404 | 409 => {
                delivery.ack(BasicAckOptions::default()).await?;
            }
            other => bail!("claim: {other}"),
        }
    }
    let _ = connection.close(200, "bench done".into()).await;
    Ok(())
}

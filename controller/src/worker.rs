//! `ceccm worker`: leases tasks of one region over HTTP, runs each task's command as a child
//! process, heartbeats while it runs, and reports the result (or the failure) with the
//! captured output and the CPU time it used.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::queue::MAX_OUTPUT_BYTES;

#[derive(Debug, Clone)]
pub struct WorkerOptions {
    pub server: String,
    pub region: String,
    pub worker_id: String,
    pub lease_seconds: u32,
    /// Leave after this long without work.
    pub idle_exit: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("HTTP: {0}")]
    Http(#[from] reqwest::Error),
    #[error("server answered {status}: {body}")]
    Status { status: u16, body: String },
}

pub async fn run(options: WorkerOptions) -> anyhow::Result<()> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()?;
    let parent = std::os::unix::process::parent_id();
    let mut idle_since = Instant::now();
    let mut backoff = Duration::from_millis(50);
    loop {
        // A worker whose server died (it was re-parented) has nobody to report to.
        if std::os::unix::process::parent_id() != parent {
            return Ok(());
        }
        match lease(&client, &options).await {
            Ok(Some(task)) => {
                run_task(&client, &options, &task).await;
                idle_since = Instant::now();
                backoff = Duration::from_millis(50);
            }
            Ok(None) => {
                if idle_since.elapsed() >= options.idle_exit {
                    return Ok(());
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_millis(500));
            }
            Err(e) => {
                tracing::warn!(error = %e, "lease failed");
                if idle_since.elapsed() >= options.idle_exit {
                    return Err(e.into());
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}

async fn post(
    client: &reqwest::Client,
    url: String,
    body: Value,
) -> Result<Option<Value>, WorkerError> {
    let response = client.post(url).json(&body).send().await?;
    let status = response.status();
    if status == reqwest::StatusCode::NO_CONTENT {
        return Ok(None);
    }
    if !status.is_success() {
        return Err(WorkerError::Status {
            status: status.as_u16(),
            body: response.text().await.unwrap_or_default(),
        });
    }
    Ok(Some(response.json().await?))
}

async fn lease(client: &reqwest::Client, o: &WorkerOptions) -> Result<Option<Value>, WorkerError> {
    post(
        client,
        format!("{}/api/v1/tasks:lease", o.server),
        json!({"worker": o.worker_id, "region": o.region, "leaseSeconds": o.lease_seconds}),
    )
    .await
}

/// CPU seconds used by this process's waited-for children so far.
fn children_cpu_seconds() -> f64 {
    std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|stat| {
            let rest = &stat[stat.rfind(')')? + 1..];
            let fields: Vec<&str> = rest.split_whitespace().collect();
            // cutime and cstime are fields 16 and 17; `rest` starts at field 3.
            let ticks: f64 =
                fields.get(13)?.parse::<f64>().ok()? + fields.get(14)?.parse::<f64>().ok()?;
            Some(ticks / 100.0)
        })
        .unwrap_or(0.0)
}

fn truncated(bytes: &[u8]) -> String {
    let cut = &bytes[..bytes.len().min(MAX_OUTPUT_BYTES)];
    String::from_utf8_lossy(cut).into_owned()
}

async fn run_task(client: &reqwest::Client, o: &WorkerOptions, task: &Value) {
    let name = task["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let spec = &task["spec"];
    let mut command = tokio::process::Command::new(spec["command"].as_str().unwrap_or_default());
    command
        .args(
            spec["args"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str),
        )
        .envs(
            spec["env"]
                .as_object()
                .into_iter()
                .flatten()
                .filter_map(|(k, v)| Some((k, v.as_str()?))),
        )
        .env("CECCM_TASK", &name)
        .env("CECCM_TASK_INDEX", spec["index"].to_string())
        .env("CECCM_REGION", &o.region)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    let cpu_before = children_cpu_seconds();
    let base = format!("{}/api/v1/tasks/{name}", o.server);
    let heartbeat_every = Duration::from_millis(u64::from(o.lease_seconds) * 1000 / 3)
        .max(Duration::from_millis(100));
    // Wall time of the command itself, the predictor's target (lease and report latency excluded).
    let started = Instant::now();
    let output = command.output();
    tokio::pin!(output);
    let mut ticker = tokio::time::interval(heartbeat_every);
    ticker.tick().await;
    let outcome = loop {
        tokio::select! {
            out = &mut output => break out,
            _ = ticker.tick() => {
                let beat = post(client, format!("{base}/heartbeat"),
                    json!({"worker": o.worker_id, "leaseSeconds": o.lease_seconds})).await;
                if let Err(WorkerError::Status { status: 404 | 409, .. }) = beat {
                    // The lease is gone (expired and handed on, or the task deleted): stop.
                    tracing::warn!(task = name, "lease lost; abandoning the task");
                    return;
                }
            }
        }
    };
    let cpu_seconds = (children_cpu_seconds() - cpu_before).max(0.0);
    // A command too quick for the clock reports nothing measured rather than zero seconds.
    let seconds = Some(started.elapsed().as_secs_f64()).filter(|s| *s > 0.0);
    let report = match outcome {
        Ok(out) if out.status.success() => post(
            client,
            format!("{base}/complete"),
            json!({"worker": o.worker_id, "cpuSeconds": cpu_seconds, "seconds": seconds, "result": {
                "exitCode": 0, "stdout": truncated(&out.stdout), "stderr": truncated(&out.stderr)}}),
        ),
        Ok(out) => post(
            client,
            format!("{base}/fail"),
            json!({"worker": o.worker_id, "cpuSeconds": cpu_seconds, "error": format!(
                "exit status {}: {}", out.status, truncated(&out.stderr).trim_end())}),
        ),
        Err(e) => post(
            client,
            format!("{base}/fail"),
            json!({"worker": o.worker_id, "cpuSeconds": cpu_seconds,
                   "error": format!("could not start {:?}: {e}", spec["command"])}),
        ),
    };
    if let Err(e) = report.await {
        tracing::warn!(task = name, error = %e, "reporting the outcome failed");
    }
}

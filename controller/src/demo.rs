//! `ceccm demo`: the main job on the embedded default. Starts a server in this process on a free
//! loopback port over a fresh data directory, applies the two local regions and the sample batch
//! application from `examples/` through the REST API, follows the application to `Succeeded`
//! while printing progress, and prints a summary.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use serde::Deserialize;
use serde_json::Value;

use crate::server::{ServerOptions, start};

pub const REGIONS_YAML: &str = include_str!("../../examples/local-regions.yaml");
pub const APPLICATION_YAML: &str = include_str!("../../examples/batch-app.yaml");

pub struct DemoOptions {
    pub data_dir: PathBuf,
    pub timeout: Duration,
}

/// Parses a multi-document YAML manifest into JSON objects.
pub fn manifests(text: &str) -> anyhow::Result<Vec<Value>> {
    let mut out = Vec::new();
    for document in yaml_serde::Deserializer::from_str(text) {
        let value = Value::deserialize(document).context("parsing a manifest")?;
        if !value.is_null() {
            out.push(value);
        }
    }
    Ok(out)
}

/// PUTs each manifest to its collection (apply). Returns the applied objects.
pub async fn apply_all(
    client: &reqwest::Client,
    base: &str,
    objects: &[Value],
) -> anyhow::Result<Vec<Value>> {
    let mut applied = Vec::new();
    for object in objects {
        let plural = match object["kind"].as_str() {
            Some("Region") => "regions",
            Some("Application") => "applications",
            Some("Dataset") => "datasets",
            other => bail!("cannot apply kind {other:?}"),
        };
        let name = object["metadata"]["name"]
            .as_str()
            .context("manifest without metadata.name")?;
        let response = client
            .put(format!("{base}/api/v1/{plural}/{name}"))
            .json(object)
            .send()
            .await?;
        let status = response.status();
        let body: Value = response.json().await?;
        if !status.is_success() {
            bail!(
                "applying {plural}/{name} failed ({status}): {}",
                body["error"]["message"]
            );
        }
        applied.push(body);
    }
    Ok(applied)
}

pub async fn run(options: DemoOptions) -> anyhow::Result<()> {
    if options.data_dir.exists() {
        std::fs::remove_dir_all(&options.data_dir)
            .with_context(|| format!("clearing {}", options.data_dir.display()))?;
    }
    let server = start(ServerOptions {
        listen: "127.0.0.1:0".parse()?,
        data_dir: options.data_dir.clone(),
        database_url: None,
        lease_seconds: 10,
        worker_program: std::env::current_exe()?,
    })
    .await?;
    let base = server.url();
    println!(
        "ceccm demo: server at {base}, store {}",
        options.data_dir.join("ceccm.db").display()
    );
    let outcome = follow(&base, options.timeout).await;
    server.shutdown().await;
    outcome
}

async fn follow(base: &str, timeout: Duration) -> anyhow::Result<()> {
    let client = reqwest::Client::new();
    let regions = apply_all(&client, base, &manifests(REGIONS_YAML)?).await?;
    for r in &regions {
        println!(
            "applied region {} ({} tier, {} cores)",
            r["metadata"]["name"].as_str().unwrap_or("?"),
            r["spec"]["tier"].as_str().unwrap_or("?"),
            r["spec"]["capacity"]["cpu"]
        );
    }
    let apps = apply_all(&client, base, &manifests(APPLICATION_YAML)?).await?;
    let name = apps[0]["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    println!(
        "applied application {name} ({} tasks)",
        apps[0]["spec"]["tasks"].as_array().map_or(0, Vec::len)
    );
    let started = Instant::now();
    let mut last_line = String::new();
    let mut placement_shown = false;
    let app = loop {
        let app: Value = client
            .get(format!("{base}/api/v1/applications/{name}"))
            .send()
            .await?
            .json()
            .await?;
        let status = &app["status"];
        let phase = status["phase"].as_str().unwrap_or("Pending").to_string();
        let line = format!(
            "[{:>5.1}s] {phase:<10} {}/{} tasks done",
            started.elapsed().as_secs_f64(),
            status["progress"]["done"].as_u64().unwrap_or(0),
            status["progress"]["total"].as_u64().unwrap_or(0)
        );
        if line.split_once(']').map(|(_, rest)| rest)
            != last_line.split_once(']').map(|(_, rest)| rest)
        {
            println!("{line}");
            last_line = line;
        }
        if !placement_shown && let Some(explanation) = status["explanation"].as_str() {
            placement_shown = true;
            println!("placement: {}", explanation.replace('\n', "\n           "));
        }
        match phase.as_str() {
            "Succeeded" => break app,
            "Failed" => bail!("application {name} failed: {}", status["conditions"]),
            _ => {}
        }
        if started.elapsed() > timeout {
            bail!("application {name} did not finish within {timeout:?} (phase {phase})");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let tasks: Value = client
        .get(format!(
            "{base}/api/v1/tasks?labelSelector=ceccm/application={name}"
        ))
        .send()
        .await?
        .json()
        .await?;
    let mut per_region = std::collections::BTreeMap::<String, (u32, f64, f64)>::new();
    let items = tasks["items"].as_array().cloned().unwrap_or_default();
    for task in &items {
        let entry = per_region
            .entry(task["status"]["region"].as_str().unwrap_or("?").to_string())
            .or_default();
        entry.0 += 1;
        entry.1 += task["status"]["cpuSeconds"].as_f64().unwrap_or(0.0);
        entry.2 += task["status"]["energyJoules"].as_f64().unwrap_or(0.0);
    }
    let index: Value = client
        .get(format!("{base}/api/v1/applications/{name}/results"))
        .send()
        .await?
        .json()
        .await?;
    println!("\nsummary of application {name}");
    println!(
        "  phase          Succeeded in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    println!("  tasks          {} done", items.len());
    for region in &regions {
        let name = region["metadata"]["name"].as_str().unwrap_or("?");
        let (n, cpu, joules) = per_region.get(name).copied().unwrap_or_default();
        println!("  region {name:<16} {n:>3} tasks, {cpu:>6.2} CPU s, {joules:>7.1} J");
    }
    println!(
        "  energy         {:.1} J",
        app["status"]["energyJoules"].as_f64().unwrap_or(0.0)
    );
    for file in index["files"].as_array().into_iter().flatten() {
        println!(
            "  result         {base}/api/v1/applications/{name}/results/{} ({} bytes, sha256 {})",
            file["name"].as_str().unwrap_or("?"),
            file["size"],
            file["sha256"].as_str().unwrap_or("?")
        );
    }
    if items.is_empty() {
        bail!("the application succeeded without tasks");
    }
    Ok(())
}

//! `ceccm demo`: the main job on the embedded default. Starts a server in this process on a free
//! loopback port over a fresh data directory of its own (it never reuses or deletes one),
//! applies the two local regions from `examples/`, uploads the repository's sample cube and the
//! template library bundled with astro-fit as Datasets, applies the astro-fit Application of
//! `examples/`, follows its stages with a progress bar each, downloads the maps and prints
//! what a user asks first: where the maps are, V and sigma ranges, median chi2, energy per
//! region (predicted and measured), wall time, and the accuracy against the sample's truth.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use serde::Deserialize;
use serde_json::Value;

use crate::server::{ServerOptions, start};

pub const REGIONS_YAML: &str = include_str!("../../examples/local-regions.yaml");
pub const DATASETS_YAML: &str = include_str!("../../examples/astro-fit-datasets.yaml");
pub const APPLICATION_YAML: &str = include_str!("../../examples/astro-fit-app.yaml");
/// The sample cube and its truth table (examples/data, see DATA.md), inside the binary so the
/// main job needs nothing beside it.
pub const SAMPLE_CUBE: &[u8] = include_bytes!("../../examples/data/sample-LOGCUBE.fits.gz");
pub const SAMPLE_TRUTH: &[u8] = include_bytes!("../../examples/data/sample-truth.csv");

pub struct DemoOptions {
    /// Must not exist, or be empty; default: a new `ceccm-demo/RUN` under the current directory.
    pub data_dir: Option<PathBuf>,
    pub timeout: Duration,
}

/// The demo's own data directory: a new one, never an existing directory with content (a
/// server's state must not be touched).
pub fn fresh_data_dir(requested: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    let dir = match requested {
        Some(dir) => dir,
        None => {
            let stamp = crate::time::now_rfc3339().replace([':', '.'], "-");
            PathBuf::from("ceccm-demo").join(format!("run-{stamp}"))
        }
    };
    if let Ok(mut entries) = std::fs::read_dir(&dir)
        && entries.next().is_some()
    {
        bail!(
            "{} exists and is not empty; the demo runs on a new directory of its own and never \
             reuses or deletes one (pass another --data-dir, or none)",
            dir.display()
        );
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
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
        let request = client
            .put(format!("{base}/api/v1/{plural}/{name}"))
            .json(object);
        applied.push(checked(request, &format!("applying {plural}/{name}")).await?);
    }
    Ok(applied)
}

pub async fn run(options: DemoOptions) -> anyhow::Result<()> {
    let data_dir = fresh_data_dir(options.data_dir)?;
    let server = start(ServerOptions {
        region_grace: crate::server::DEFAULT_REGION_GRACE,
        transport: Default::default(),
        listen: "127.0.0.1:0".parse()?,
        data_dir: data_dir.clone(),
        database_url: None,
        lease_seconds: 10,
        worker_program: std::env::current_exe()?,
        anonymous_metrics: false,
        tls: Default::default(),
        tls_client_ca: None,
        oidc: None,
        user_quota_bytes: None,
    })
    .await?;
    let base = server.url();
    println!(
        "ceccm demo: server at {base}, store {}",
        data_dir.join("ceccm.db").display()
    );
    let outcome = follow(&base, &data_dir, options.timeout).await;
    server.shutdown().await;
    outcome
}

/// Sends `request`; its JSON body, or an error naming `what` with the server's message.
async fn checked(request: reqwest::RequestBuilder, what: &str) -> anyhow::Result<Value> {
    let response = request.send().await?;
    let status = response.status();
    let body: Value = response.json().await?;
    if !status.is_success() {
        bail!("{what} failed ({status}): {}", body["error"]["message"]);
    }
    Ok(body)
}

async fn upload(
    client: &reqwest::Client,
    base: &str,
    dataset: &str,
    bytes: &'static [u8],
) -> anyhow::Result<Value> {
    let request = client
        .put(format!("{base}/api/v1/datasets/{dataset}/content"))
        .header("content-type", "application/octet-stream")
        .body(bytes);
    checked(request, &format!("uploading {dataset}")).await
}

async fn get(client: &reqwest::Client, url: String) -> anyhow::Result<Value> {
    checked(client.get(&url), &format!("GET {url}")).await
}

/// A line above the progress bars, or on stdout when they are hidden (not a terminal).
fn say(progress: &indicatif::MultiProgress, line: String) {
    if progress.is_hidden() {
        println!("{line}");
    } else {
        let _ = progress.println(line);
    }
}

fn stage_bar(progress: &indicatif::MultiProgress, name: &str) -> indicatif::ProgressBar {
    let bar = progress.add(indicatif::ProgressBar::new(0));
    if let Ok(style) =
        indicatif::ProgressStyle::with_template("{prefix:>9} [{wide_bar}] {pos}/{len} tasks {msg}")
    {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_prefix(name.to_string());
    bar
}

async fn follow(base: &str, data_dir: &std::path::Path, timeout: Duration) -> anyhow::Result<()> {
    // The demo acts as the administrator its server made (DATA_DIR/admin.token).
    let client = crate::tokens::admin_client(data_dir)?;
    let regions = apply_all(&client, base, &manifests(REGIONS_YAML)?).await?;
    for r in &regions {
        println!(
            "applied region {} ({} tier, {} cores)",
            r["metadata"]["name"].as_str().unwrap_or("?"),
            r["spec"]["tier"].as_str().unwrap_or("?"),
            r["spec"]["capacity"]["cpu"]
        );
    }
    let datasets = apply_all(&client, base, &manifests(DATASETS_YAML)?).await?;
    for (dataset, bytes) in datasets.iter().zip([
        SAMPLE_CUBE,
        astro_fit::template_archive::COMPACT_EMILES_TAR_GZ,
    ]) {
        let name = dataset["metadata"]["name"].as_str().unwrap_or_default();
        let stored = upload(&client, base, name, bytes).await?;
        println!(
            "uploaded dataset {name} ({}, {} bytes, sha256 {:.12})",
            dataset["spec"]["format"].as_str().unwrap_or("?"),
            stored["status"]["size"],
            stored["status"]["sha256"].as_str().unwrap_or("?")
        );
    }
    let apps = apply_all(&client, base, &manifests(APPLICATION_YAML)?).await?;
    let name = apps[0]["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    println!(
        "applied application {name} (astro-fit on dataset {}, parameters {})",
        apps[0]["spec"]["inputs"][0]["dataset"]
            .as_str()
            .unwrap_or("?"),
        apps[0]["spec"]["parameters"]
    );
    let started = Instant::now();
    let progress = indicatif::MultiProgress::new();
    let bars: Vec<(String, indicatif::ProgressBar)> = ["prepare", "fit", "assemble"]
        .into_iter()
        .map(|stage| (stage.to_string(), stage_bar(&progress, stage)))
        .collect();
    let mut last_line = String::new();
    let mut explained = String::new();
    let app = loop {
        let app = get(&client, format!("{base}/api/v1/applications/{name}")).await?;
        let status = &app["status"];
        let phase = status["phase"].as_str().unwrap_or("Pending").to_string();
        let mut stages = Vec::new();
        for stage in status["stages"].as_array().into_iter().flatten() {
            let stage_name = stage["name"].as_str().unwrap_or("?");
            let (done, total) = (
                stage["done"].as_u64().unwrap_or(0),
                stage["total"].as_u64().unwrap_or(0),
            );
            if let Some((_, bar)) = bars.iter().find(|(n, _)| n == stage_name) {
                bar.set_length(total);
                bar.set_position(done);
            }
            stages.push(format!("{stage_name} {done}/{total}"));
        }
        let line = format!("{phase:<10} {}", stages.join(", "));
        if line != last_line {
            say(
                &progress,
                format!("[{:>5.1}s] {line}", started.elapsed().as_secs_f64()),
            );
            last_line = line;
        }
        if let Some(explanation) = status["explanation"].as_str()
            && explanation != explained
        {
            say(
                &progress,
                format!("placement: {}", explanation.replace('\n', "\n           ")),
            );
            explained = explanation.to_string();
        }
        match phase.as_str() {
            "Succeeded" => break app,
            "Failed" => {
                let why: Vec<String> = status["conditions"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter(|c| c["status"] == "False")
                    .map(|c| format!("{}: {}", c["reason"], c["message"]))
                    .collect();
                bail!("application {name} failed: {}", why.join("; "));
            }
            _ => {}
        }
        if started.elapsed() > timeout {
            bail!("application {name} did not finish within {timeout:?} (phase {phase})");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    for (_, bar) in &bars {
        bar.finish();
    }
    let wall = started.elapsed().as_secs_f64();
    summarise(&client, base, data_dir, &name, &app, &regions, wall).await
}

async fn summarise(
    client: &reqwest::Client,
    base: &str,
    data_dir: &std::path::Path,
    name: &str,
    app: &Value,
    regions: &[Value],
    wall: f64,
) -> anyhow::Result<()> {
    let tasks = get(
        client,
        format!("{base}/api/v1/tasks?labelSelector=ceccm/application={name}"),
    )
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
    let out = data_dir.join("maps");
    std::fs::create_dir_all(&out)?;
    let index = get(client, format!("{base}/api/v1/applications/{name}/results")).await?;
    for file in index["files"].as_array().into_iter().flatten() {
        let file = file["name"].as_str().unwrap_or_default();
        let bytes = client
            .get(format!("{base}/api/v1/applications/{name}/results/{file}"))
            .send()
            .await?
            .error_for_status()?
            .bytes()
            .await?;
        std::fs::write(out.join(file), &bytes)?;
    }
    let summary: Value = serde_json::from_slice(&std::fs::read(out.join("summary.json"))?)?;
    println!("\nsummary of application {name}");
    println!("  phase          Succeeded in {wall:.1} s (wall time, upload to maps)");
    println!(
        "  tasks          {} (1 prepare, {} fit, 1 assemble)",
        items.len(),
        items.len().saturating_sub(2)
    );
    println!("  maps           {}", out.join("maps.fits").display());
    println!(
        "                 also model.fits, maps.png and summary.json in {}",
        out.display()
    );
    let range = |key: &str| -> String {
        let r = &summary[key];
        format!(
            "{:.1} to {:.1} km/s",
            r[0].as_f64().unwrap_or(f64::NAN),
            r[1].as_f64().unwrap_or(f64::NAN)
        )
    };
    println!(
        "  bins           {} fitted, {} failed",
        summary["bins"], summary["failedBins"]
    );
    println!("  V              {}", range("velocityRange"));
    println!("  sigma          {}", range("sigmaRange"));
    println!(
        "  median chi2    {:.3} (per degree of freedom)",
        summary["medianChi2"].as_f64().unwrap_or(f64::NAN)
    );
    println!(
        "  energy         predicted by the scheduler for the fit chunks, measured for every task:"
    );
    let placements = app["status"]["placements"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    for region in regions {
        let region = region["metadata"]["name"].as_str().unwrap_or("?");
        let (n, cpu, joules) = per_region.get(region).copied().unwrap_or_default();
        let predicted = placements
            .iter()
            .find(|p| p["region"] == region)
            .and_then(|p| p["predictedJoules"].as_f64());
        println!(
            "    {region:<16} {n:>3} tasks, {cpu:>6.2} CPU s, measured {joules:>7.1} J, predicted {}",
            predicted.map_or("-".to_string(), |j| format!("{j:.1} J"))
        );
    }
    println!(
        "                 measured: the region's power model x the CPU seconds of its tasks (no \
         RAPL here);\n                 predicted: the scheduler's estimate for the chunks it \
         placed, which also\n                 counts the region's idle power for their \
         duration, so it reads higher"
    );
    let truth = out.join("sample-truth.csv");
    std::fs::write(&truth, SAMPLE_TRUTH)?;
    let report = astro_fit::accuracy::compare_with_truth(
        &out.join("maps.fits"),
        &truth,
        &out.join("residuals.png"),
    )?;
    println!(
        "  accuracy       against the sample's truth ({} spaxels; residual maps in {}):",
        report.compared,
        out.join("residuals.png").display()
    );
    println!("    S/N          n   V bias   V rms  sigma bias  sigma rms  (km/s)");
    for b in &report.by_sn {
        if b.count == 0 {
            continue;
        }
        println!(
            "    {:>4.0}-{:<6} {:>3} {:>8.2} {:>7.2} {:>11.2} {:>10.2}",
            b.sn_min,
            if b.sn_max.is_finite() {
                format!("{:.0}", b.sn_max)
            } else {
                "inf".into()
            },
            b.count,
            b.v_bias,
            b.v_rms,
            b.sigma_bias,
            b.sigma_rms
        );
    }
    if items.is_empty() {
        bail!("the application succeeded without tasks");
    }
    Ok(())
}

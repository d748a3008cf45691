//! `upload` and `download`: dataset content in, application results (or dataset content) out,
//! streamed with a progress bar on stderr (hidden when stderr is not a terminal) and checked
//! against the server's sha256.

use std::io::IsTerminal;
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex};

use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::client::{Client, encode};
use crate::error::{Result, failed, usage};
use crate::kinds;
use crate::manifest::API_VERSION;
use crate::output;
use crate::results::Index;
use crate::table::bytes;

const CHUNK: usize = 256 * 1024;

fn progress_bar(total: u64, message: String) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(total);
    let style = ProgressStyle::with_template(
        "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
    )
    .map(|s| s.progress_chars("=> "))
    .unwrap_or_else(|_| ProgressStyle::default_bar());
    bar.set_style(style);
    bar.set_message(message);
    bar
}

pub async fn upload(client: &Client, kind: &str, name: &str, file: &Path) -> Result<()> {
    let kind = kinds::resolve(kind)?;
    if kind.kind != "Dataset" {
        return Err(usage!("only datasets take uploads, not {}", kind.plural));
    }
    let source = tokio::fs::File::open(file)
        .await
        .map_err(|e| usage!("cannot open {}: {e}", file.display()))?;
    let size = source
        .metadata()
        .await
        .map_err(|e| usage!("cannot read {}: {e}", file.display()))?
        .len();
    match client.get(kind, name).await {
        Ok(_) => {}
        Err(e) if e.is_not_found() => {
            let dataset = json!({"apiVersion": API_VERSION, "kind": "Dataset",
                                 "metadata": {"name": name}, "spec": {}});
            client.apply(kind, name, &dataset, false).await?;
        }
        Err(e) => return Err(e),
    }

    let bar = progress_bar(size, format!("dataset/{name}"));
    let hasher = Arc::new(Mutex::new(Sha256::new()));
    let (stream_bar, stream_hasher) = (bar.clone(), Arc::clone(&hasher));
    let chunks = futures::stream::unfold(Some(source), move |state| {
        let (bar, hasher) = (stream_bar.clone(), Arc::clone(&stream_hasher));
        async move {
            let mut source = state?;
            let mut buffer = vec![0u8; CHUNK];
            match source.read(&mut buffer).await {
                Ok(0) => None,
                Ok(n) => {
                    buffer.truncate(n);
                    if let Ok(mut h) = hasher.lock() {
                        h.update(&buffer);
                    }
                    bar.inc(n as u64);
                    Some((Ok::<_, std::io::Error>(buffer), Some(source)))
                }
                Err(e) => Some((Err(e), None)),
            }
        }
    });
    let path = format!("datasets/{}/content", encode(name));
    let answer = client
        .put_bytes(&path, reqwest::Body::wrap_stream(chunks), size)
        .await;
    bar.finish_and_clear();
    let answer = answer?;
    let local = hasher
        .lock()
        .map(|h| hex::encode(h.clone().finalize()))
        .map_err(|_| failed!("checksum state lost"))?;
    let remote = answer
        .pointer("/status/sha256")
        .and_then(Value::as_str)
        .unwrap_or_default();
    if !remote.is_empty() && remote != local {
        return Err(failed!(
            "dataset/{name}: the server stored sha256 {remote} but {} has {local}",
            file.display()
        ));
    }
    output::print(&format!(
        "dataset/{name} uploaded ({}, sha256 {local})\n",
        bytes(size as f64)
    ))
}

/// A file to download: its name, where the API serves it, its size and checksum.
struct RemoteFile {
    name: String,
    path: String,
    size: u64,
    sha256: Option<String>,
}

pub async fn download(client: &Client, target: &str, to: Option<&Path>) -> Result<()> {
    let (kind, name) = kinds::split_ref(target)?;
    let name =
        name.ok_or_else(|| usage!("name what to download: application/NAME or dataset/NAME"))?;
    let files = match kind.kind {
        "Application" => {
            let files = remote_results(name, crate::results::fetch_index(client, name).await?);
            if files.is_empty() {
                let phase = client
                    .get(kind, name)
                    .await?
                    .pointer("/status/phase")
                    .and_then(Value::as_str)
                    .unwrap_or("unknown")
                    .to_string();
                return Err(failed!(
                    "application/{name} has no results yet (phase {phase})"
                ));
            }
            files
        }
        "Dataset" => {
            let dataset = client.get(kind, name).await?;
            let file = RemoteFile {
                name: name.to_string(),
                path: format!("datasets/{}/content", encode(name)),
                size: dataset
                    .pointer("/status/size")
                    .and_then(Value::as_u64)
                    .unwrap_or(0),
                sha256: dataset
                    .pointer("/status/sha256")
                    .and_then(Value::as_str)
                    .map(str::to_string),
            };
            vec![file]
        }
        _ => {
            return Err(usage!(
                "download takes application/NAME or dataset/NAME, not {target}"
            ));
        }
    };
    let dir = to.map_or_else(|| PathBuf::from(name), Path::to_path_buf);
    tokio::fs::create_dir_all(&dir)
        .await
        .map_err(|e| failed!("cannot create {}: {e}", dir.display()))?;
    let total: u64 = files.iter().map(|f| f.size).sum();
    let bar = progress_bar(total, format!("{}/{name}", kind.singular));
    let mut written = Vec::new();
    for file in &files {
        let destination = dir.join(safe_relative(&file.name)?);
        let result = fetch(client, &destination, file, &bar).await;
        if let Err(e) = result {
            bar.abandon();
            return Err(e);
        }
        written.push(destination);
    }
    bar.finish_and_clear();
    let mut text: String = written
        .iter()
        .map(|p| format!("{}\n", p.display()))
        .collect();
    text.push_str(&format!(
        "{}/{name}: {} file(s), {} written to {}\n",
        kind.singular,
        files.len(),
        bytes(total as f64),
        dir.display()
    ));
    output::print(&text)
}

/// The files of an application's results index, each with the path it is served at.
fn remote_results(application: &str, index: Index) -> Vec<RemoteFile> {
    let base = crate::results::index_path(application);
    index
        .files
        .into_iter()
        .map(|f| {
            let segments: Vec<String> = f.name.split('/').map(encode).collect();
            RemoteFile {
                path: format!("{base}/{}", segments.join("/")),
                name: f.name,
                size: f.size,
                sha256: f.sha256,
            }
        })
        .collect()
}

/// A server-given file name as a path that stays inside the download directory.
fn safe_relative(name: &str) -> Result<PathBuf> {
    let path = Path::new(name);
    let normal = path.components().all(|c| matches!(c, Component::Normal(_)));
    if name.is_empty() || !normal {
        return Err(failed!(
            "refusing to write result file \"{name}\": it leaves the download directory"
        ));
    }
    Ok(path.to_path_buf())
}

/// Streams one file to `destination` through a `.part` file, checking its sha256.
async fn fetch(
    client: &Client,
    destination: &Path,
    file: &RemoteFile,
    bar: &ProgressBar,
) -> Result<()> {
    if let Some(parent) = destination.parent() {
        tokio::fs::create_dir_all(parent)
            .await
            .map_err(|e| failed!("cannot create {}: {e}", parent.display()))?;
    }
    let partial = destination.with_extension(match destination.extension() {
        Some(ext) => format!("{}.part", ext.to_string_lossy()),
        None => "part".into(),
    });
    let mut out = tokio::fs::File::create(&partial)
        .await
        .map_err(|e| failed!("cannot write {}: {e}", partial.display()))?;
    let mut response = client.stream(&file.path, &[]).await?;
    let mut hasher = Sha256::new();
    while let Some(chunk) = client.chunk(&mut response).await? {
        hasher.update(&chunk);
        out.write_all(&chunk)
            .await
            .map_err(|e| failed!("cannot write {}: {e}", partial.display()))?;
        bar.inc(chunk.len() as u64);
    }
    out.flush()
        .await
        .map_err(|e| failed!("cannot write {}: {e}", partial.display()))?;
    let got = hex::encode(hasher.finalize());
    if let Some(expected) = file.sha256.as_deref().filter(|s| !s.is_empty())
        && expected != got
    {
        let _ = tokio::fs::remove_file(&partial).await;
        return Err(failed!(
            "{}: sha256 {got} does not match the server's {expected}",
            file.name
        ));
    }
    tokio::fs::rename(&partial, destination)
        .await
        .map_err(|e| failed!("cannot write {}: {e}", destination.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn result_names_stay_inside_the_directory() {
        assert_eq!(safe_relative("maps.fits").unwrap(), Path::new("maps.fits"));
        assert_eq!(safe_relative("png/v.png").unwrap(), Path::new("png/v.png"));
        for bad in ["", "../x", "/etc/passwd", "a/../../b", "./x"] {
            assert!(safe_relative(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn every_file_of_the_results_index_is_fetched_from_its_own_path() {
        let index = crate::results::parse_index(json!({"files": [
            {"name": "maps.fits", "size": 10, "sha256": "ab"},
            {"name": "maps.png", "size": 3, "sha256": "cd"},
            {"name": "model.fits", "size": 4, "sha256": "ef"},
            {"name": "summary.json"}]}))
        .unwrap();
        let files = remote_results("m51", index);
        let paths: Vec<&str> = files.iter().map(|f| f.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "applications/m51/results/maps.fits",
                "applications/m51/results/maps.png",
                "applications/m51/results/model.fits",
                "applications/m51/results/summary.json"
            ]
        );
        assert_eq!(
            (files[0].size, files[0].sha256.as_deref()),
            (10, Some("ab"))
        );
        assert_eq!((files[3].size, files[3].sha256.as_deref()), (0, None));
    }
}

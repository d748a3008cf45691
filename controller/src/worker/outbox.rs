//! The worker's durable outbox: what a finished task reports (its outcome and the files it
//! made) is written to disk before anything is sent, then sent, then removed. A worker cut off
//! from the control plane (an edge site whose uplink is down) keeps its results there and sends
//! them when the link is back, whichever of the region's workers gets there first.
//!
//! Sending is idempotent: artifacts are content-addressed (storing one twice stores it once)
//! and the first completion of a task wins, so an entry whose report the server refuses as
//! already decided (409), no longer this worker's (403) or about a task that is gone (404) is
//! dropped, as answered. The outbox is bounded: a worker takes no new work while it holds more
//! than its limit, and says so.

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::data::{DataError, DataPlane};
use crate::queue::{CompleteRequest, FailRequest};

/// What a finished task tells the server.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "camelCase")]
pub enum Report {
    Complete(CompleteRequest),
    Fail(FailRequest),
}

/// One task's report, as kept on disk (`ENTRY/report.json`, its files beside it).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Entry {
    pub task: String,
    /// The lease's secret, which the server asks of every report on the task.
    pub lease_secret: String,
    pub report: Report,
    /// `(artifact name, file name in the entry's directory)`, uploaded before the report.
    pub files: Vec<(String, String)>,
}

#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    #[error("outbox {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("outbox entry {path} is unreadable: {reason}")]
    Corrupt { path: PathBuf, reason: String },
}

/// How one attempt to send an entry ended.
#[derive(Debug, PartialEq)]
pub enum Sent {
    /// The server took it (or had decided already): the entry is gone. `dead_lettered`: the
    /// task is dead-lettered now (a failure report of its last attempt).
    Delivered { dead_lettered: bool },
    /// The server answered that the report no longer counts (`status`): the entry is gone.
    Refused { status: u16 },
    /// The server could not be reached or failed: the entry stays for the next try.
    Kept,
}

pub struct Outbox {
    dir: PathBuf,
    max_bytes: u64,
}

const REPORT: &str = "report.json";
/// A report the server has not answered in this long is kept for the next try (a link that
/// is down answers nothing at all).
const REPORT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20);

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> OutboxError + '_ {
    move |source| OutboxError::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl Outbox {
    pub fn new(dir: PathBuf, max_bytes: u64) -> Outbox {
        Outbox { dir, max_bytes }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Bytes held, all entries together.
    pub fn bytes(&self) -> u64 {
        fn size(path: &Path) -> u64 {
            match std::fs::symlink_metadata(path) {
                Ok(m) if m.is_dir() => std::fs::read_dir(path)
                    .map(|entries| entries.flatten().map(|e| size(&e.path())).sum())
                    .unwrap_or(0),
                Ok(m) => m.len(),
                Err(_) => 0,
            }
        }
        size(&self.dir)
    }

    /// Whether it holds more than its limit: the worker takes no new work until it drains.
    pub fn is_full(&self) -> bool {
        self.bytes() > self.max_bytes
    }

    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    /// Keeps `entry` with its `files` (moved in, renamed to their artifact names): the entry
    /// appears whole or not at all (written aside, synced, then renamed into place).
    pub fn put(&self, entry: &Entry, files: &[(String, PathBuf)]) -> Result<PathBuf, OutboxError> {
        std::fs::create_dir_all(&self.dir).map_err(io(&self.dir))?;
        let id = uuid::Uuid::new_v4().simple().to_string();
        let staging = self.dir.join(format!(".{}-{}.part", entry.task, &id[..8]));
        let done = self.dir.join(format!("{}-{}", entry.task, &id[..8]));
        std::fs::create_dir(&staging).map_err(io(&staging))?;
        let mut kept = entry.clone();
        kept.files.clear();
        for (i, (name, path)) in files.iter().enumerate() {
            let file = format!("file-{i}");
            let target = staging.join(&file);
            if std::fs::rename(path, &target).is_err() {
                std::fs::copy(path, &target).map_err(io(path))?;
            }
            kept.files.push((name.clone(), file));
        }
        let report = staging.join(REPORT);
        let text = serde_json::to_vec(&kept).map_err(|e| OutboxError::Corrupt {
            path: report.clone(),
            reason: e.to_string(),
        })?;
        std::fs::write(&report, text).map_err(io(&report))?;
        for path in std::fs::read_dir(&staging).map_err(io(&staging))?.flatten() {
            std::fs::File::open(path.path())
                .and_then(|f| f.sync_all())
                .map_err(io(&path.path()))?;
        }
        std::fs::rename(&staging, &done).map_err(io(&done))?;
        std::fs::File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io(&self.dir))?;
        Ok(done)
    }

    /// The entries waiting, oldest first.
    pub fn entries(&self) -> Vec<PathBuf> {
        let Ok(read) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut entries: Vec<(std::time::SystemTime, PathBuf)> = read
            .flatten()
            .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
            .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
            .collect();
        entries.sort();
        entries.into_iter().map(|(_, p)| p).collect()
    }

    /// Sends every entry it can, oldest first; stops at the first the server cannot take now.
    /// Returns how many left the outbox.
    /// Before a worker takes more work: sends what waits and says whether there is room. While
    /// the outbox stays full the worker takes nothing (`Ok(false)`, after a short pause: ask
    /// again), until it has been idle for `idle_exit` (`idle` so far), when it gives up.
    pub async fn room_for_work(
        &self,
        data: &DataPlane,
        client: &reqwest::Client,
        server: &str,
        idle: std::time::Duration,
        idle_exit: std::time::Duration,
    ) -> anyhow::Result<bool> {
        if !self.entries().is_empty() {
            self.flush(data, client, server).await;
        }
        if !self.is_full() {
            return Ok(true);
        }
        tracing::error!(
            outbox = %self.dir().display(),
            bytes = self.bytes(),
            limit = self.max_bytes(),
            "the outbox is full: taking no work until the server takes what it holds"
        );
        if idle >= idle_exit {
            anyhow::bail!(
                "the outbox {} is full ({} bytes, limit {})",
                self.dir().display(),
                self.bytes(),
                self.max_bytes()
            );
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        Ok(false)
    }

    pub async fn flush(&self, data: &DataPlane, client: &reqwest::Client, server: &str) -> usize {
        let mut gone = 0;
        for entry in self.entries() {
            match send(&entry, data, client, server).await {
                Ok(Sent::Delivered { .. } | Sent::Refused { .. }) => gone += 1,
                Ok(Sent::Kept) => break,
                // Another worker is sending it, or it vanished meanwhile.
                Err(OutboxError::Io { .. }) => continue,
                Err(e) => {
                    tracing::error!(error = %e, "an outbox entry cannot be read; it stays for an operator");
                    continue;
                }
            }
        }
        gone
    }
}

/// Sends one entry under its lock: its files as artifacts, then its report.
pub async fn send(
    dir: &Path,
    data: &DataPlane,
    client: &reqwest::Client,
    server: &str,
) -> Result<Sent, OutboxError> {
    let lock_path = dir.join(".lock");
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(io(&lock_path))?;
    if lock.try_lock().is_err() {
        return Err(OutboxError::Io {
            path: lock_path,
            source: std::io::Error::other("being sent by another worker"),
        });
    }
    let report_path = dir.join(REPORT);
    let text = std::fs::read(&report_path).map_err(io(&report_path))?;
    let mut entry: Entry = serde_json::from_slice(&text).map_err(|e| OutboxError::Corrupt {
        path: report_path.clone(),
        reason: e.to_string(),
    })?;
    let uploading = Instant::now();
    let mut artifacts = Vec::with_capacity(entry.files.len());
    for (name, file) in &entry.files {
        match data
            .upload(&entry.task, &entry.lease_secret, &dir.join(file), name)
            .await
        {
            Ok(stored) => artifacts.push(stored),
            Err(DataError::Status { status, .. }) if matches!(status, 403 | 404 | 409) => {
                return finish(dir, &entry.task, Sent::Refused { status });
            }
            Err(e) => {
                tracing::info!(task = entry.task, error = %e, "artifact upload failed; kept in the outbox");
                return Ok(Sent::Kept);
            }
        }
    }
    let (path, body) = match &mut entry.report {
        Report::Complete(request) => {
            request.artifacts = artifacts;
            if let Some(fields) = request.result.as_object_mut() {
                fields.insert(
                    "uploadSeconds".into(),
                    uploading.elapsed().as_secs_f64().into(),
                );
            }
            ("complete", serde_json::to_value(&*request))
        }
        Report::Fail(request) => ("fail", serde_json::to_value(&*request)),
    };
    let body = body.unwrap_or_default();
    let answer = client
        .post(format!("{server}/api/v1/tasks/{}/{path}", entry.task))
        .header(crate::api::LEASE_SECRET_HEADER, &entry.lease_secret)
        .timeout(REPORT_TIMEOUT)
        .json(&body)
        .send()
        .await;
    let sent = match answer {
        Ok(response) if response.status().is_success() => {
            let task: serde_json::Value = response.json().await.unwrap_or_default();
            Sent::Delivered {
                dead_lettered: task["status"]["state"] == "DeadLettered",
            }
        }
        Ok(response) if matches!(response.status().as_u16(), 403 | 404 | 409) => Sent::Refused {
            status: response.status().as_u16(),
        },
        Ok(response) => {
            tracing::info!(
                task = entry.task,
                status = response.status().as_u16(),
                "report not taken; kept in the outbox"
            );
            Sent::Kept
        }
        Err(e) => {
            tracing::info!(task = entry.task, error = %e, "server unreachable; report kept in the outbox");
            Sent::Kept
        }
    };
    match sent {
        Sent::Kept => Ok(Sent::Kept),
        other => finish(dir, &entry.task, other),
    }
}

fn finish(dir: &Path, task: &str, sent: Sent) -> Result<Sent, OutboxError> {
    if let Sent::Refused { status } = sent {
        tracing::info!(
            task,
            status,
            "the server no longer counts this report (decided already, or the task moved): dropped"
        );
    }
    std::fs::remove_dir_all(dir).map_err(io(dir))?;
    Ok(sent)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(task: &str) -> Entry {
        Entry {
            task: task.into(),
            lease_secret: "s".into(),
            report: Report::Complete(CompleteRequest {
                worker: "w".into(),
                result: serde_json::json!({"chi2": 1.0}),
                cpu_seconds: 1.0,
                seconds: Some(1.0),
                joules: None,
                artifacts: Vec::new(),
            }),
            files: Vec::new(),
        }
    }

    #[tokio::test]
    async fn a_result_is_kept_whole_until_the_server_takes_it() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = Outbox::new(dir.path().join("outbox"), 1000);
        assert!(outbox.entries().is_empty());
        let made = dir.path().join("chunk.json");
        std::fs::write(&made, vec![b'x'; 600]).unwrap();
        let kept = outbox
            .put(
                &entry("job-00001"),
                &[("chunk-00001.json".into(), made.clone())],
            )
            .unwrap();
        // Moved in with its report; nothing half-written is listed.
        assert!(!made.exists());
        assert_eq!(outbox.entries(), std::slice::from_ref(&kept));
        let back: Entry =
            serde_json::from_slice(&std::fs::read(kept.join(REPORT)).unwrap()).unwrap();
        assert_eq!(back.files, [("chunk-00001.json".into(), "file-0".into())]);
        assert!(!outbox.is_full());
        let other = dir.path().join("other");
        std::fs::write(&other, vec![b'y'; 600]).unwrap();
        outbox
            .put(&entry("job-00002"), &[("b".into(), other)])
            .unwrap();
        // Over its bound: the worker takes no more work.
        assert!(outbox.is_full(), "{} bytes", outbox.bytes());

        // Nobody answers on this port: both entries stay.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let server = format!("http://{}", listener.local_addr().unwrap());
        drop(listener);
        let client = reqwest::Client::new();
        let data = DataPlane::new(client.clone(), &server, dir.path().join("cache"), None);
        assert_eq!(outbox.flush(&data, &client, &server).await, 0);
        assert_eq!(outbox.entries().len(), 2);
        // An entry another worker is sending is left to it.
        let held = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(kept.join(".lock"))
            .unwrap();
        held.lock().unwrap();
        assert!(matches!(
            send(&kept, &data, &client, &server).await,
            Err(OutboxError::Io { .. })
        ));
    }
}

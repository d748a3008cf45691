//! The audit log: every mutating request, with who made it and how it ended, one JSON line per
//! request in `DATA_DIR/audit.log` (append-only), read back by administrators through
//! `GET /api/v1/audit` (`ceccmctl get audit`).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// One audited request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AuditEntry {
    pub time: String,
    pub user: String,
    pub role: String,
    pub method: String,
    /// The request's path (never its query or body, which may hold secrets or data).
    pub path: String,
    pub status: u16,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct AuditList {
    pub items: Vec<AuditEntry>,
}

pub fn log_path(data_dir: &Path) -> PathBuf {
    data_dir.join("audit.log")
}

/// Whether a request changes anything (and so is audited).
pub fn mutating(method: &axum::http::Method) -> bool {
    !matches!(
        *method,
        axum::http::Method::GET | axum::http::Method::HEAD | axum::http::Method::OPTIONS
    )
}

/// Appends `entry` (one line, written in one `write` on a file opened for appending, so that
/// concurrent requests never interleave inside a line).
pub async fn record(data_dir: &Path, entry: &AuditEntry) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(entry).map_err(std::io::Error::other)?;
    line.push(b'\n');
    let path = log_path(data_dir);
    tokio::task::spawn_blocking(move || {
        use std::io::Write;
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?
            .write_all(&line)
    })
    .await
    .map_err(std::io::Error::other)?
}

/// The newest `limit` entries, oldest first (from the log's last MiB at most).
pub async fn tail(data_dir: &Path, limit: usize) -> std::io::Result<Vec<AuditEntry>> {
    const WINDOW: u64 = 1 << 20;
    let path = log_path(data_dir);
    tokio::task::spawn_blocking(move || {
        use std::io::{Read, Seek, SeekFrom};
        let mut file = match std::fs::File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let size = file.metadata()?.len();
        file.seek(SeekFrom::Start(size.saturating_sub(WINDOW)))?;
        let mut text = String::new();
        file.read_to_string(&mut text)?;
        let mut entries: Vec<AuditEntry> = text
            .lines()
            .rev()
            .filter_map(|l| serde_json::from_str(l).ok())
            .take(limit)
            .collect();
        entries.reverse();
        Ok(entries)
    })
    .await
    .map_err(std::io::Error::other)?
}

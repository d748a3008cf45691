//! Per-user storage quotas (`ceccm server --user-quota-bytes N`).
//!
//! What a user stores is the content of the Datasets they own and the artifacts of the
//! Applications they own (`metadata.owner`), whoever uploaded them: a region's workers upload
//! artifacts on behalf of the application's owner. An upload that would take the owner past
//! the quota is refused with `403 Forbidden` naming the user, the quota and what is used, and
//! nothing of it is kept. The uploads of one owner are checked one at a time, so two cannot
//! both fit in the same remainder.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use serde_json::json;

use crate::error::{ApiError, ErrorCode};
use crate::resources::Kind;
use crate::store::{Query, Store};

/// The quota, and one lock per owner for the uploads being checked against it (shared by
/// clones).
#[derive(Debug, Clone, Default)]
pub struct Quotas {
    limit: Option<u64>,
    locks: Arc<Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>>,
}

/// What an upload may still add for its owner, held until the upload is stored.
pub struct Allowance {
    pub owner: String,
    pub limit: u64,
    pub used: u64,
    _turn: tokio::sync::OwnedMutexGuard<()>,
}

impl Allowance {
    pub fn remaining(&self) -> u64 {
        self.limit.saturating_sub(self.used)
    }

    /// The refusal of an upload of `adding` bytes (`None`: more than the remainder, size not
    /// yet known).
    pub fn exceeded(&self, adding: Option<u64>) -> ApiError {
        let what = adding.map_or_else(
            || "this upload".to_string(),
            |n| format!("an upload of {n} bytes"),
        );
        ApiError::new(
            ErrorCode::Forbidden,
            format!(
                "exceeded quota: user {:?} stores {} of {} bytes, and {what} does not fit in \
                 the {} left (delete datasets or applications to make room)",
                self.owner,
                self.used,
                self.limit,
                self.remaining()
            ),
        )
        .with_details(json!({
            "reason": "QuotaExceeded",
            "user": self.owner,
            "quotaBytes": self.limit,
            "usedBytes": self.used,
        }))
    }
}

impl Quotas {
    pub fn new(limit: Option<u64>) -> Quotas {
        Quotas {
            limit,
            locks: Arc::default(),
        }
    }

    pub fn limit(&self) -> Option<u64> {
        self.limit
    }

    /// `None` without a quota or an owner; otherwise what `owner` may still add, counting
    /// everything they store but dataset `replacing` (whose content an upload replaces).
    pub async fn allowance(
        &self,
        store: &Store,
        data_dir: &Path,
        owner: Option<&str>,
        replacing: Option<&str>,
    ) -> Result<Option<Allowance>, ApiError> {
        let (Some(limit), Some(owner)) = (self.limit, owner) else {
            return Ok(None);
        };
        let lock = {
            let mut locks = self.locks.lock().unwrap_or_else(|p| p.into_inner());
            locks.entry(owner.to_string()).or_default().clone()
        };
        let turn = lock.lock_owned().await;
        let used = used_bytes(store, data_dir, owner, replacing).await?;
        Ok(Some(Allowance {
            owner: owner.to_string(),
            limit,
            used,
            _turn: turn,
        }))
    }
}

/// Bytes `owner` stores: their datasets' content (but `replacing`'s) and their applications'
/// artifacts.
pub async fn used_bytes(
    store: &Store,
    data_dir: &Path,
    owner: &str,
    replacing: Option<&str>,
) -> Result<u64, ApiError> {
    // The store's owner column indexes tasks and events; datasets and applications carry
    // their owner in metadata (both kinds are mirrored in memory: no database round trip).
    let owned = |o: &serde_json::Value| o["metadata"]["owner"].as_str() == Some(owner);
    let datasets: u64 = store
        .list(Kind::Dataset, &Query::default())
        .await?
        .iter()
        .filter(|d| owned(d) && d["metadata"]["name"].as_str() != replacing)
        .filter_map(|d| d["status"]["size"].as_u64())
        .sum();
    let mut artifacts = 0u64;
    let applications = store.list(Kind::Application, &Query::default()).await?;
    for application in applications.iter().filter(|a| owned(a)) {
        let Some(name) = application["metadata"]["name"].as_str() else {
            continue;
        };
        artifacts += directory_bytes(&crate::content::artifacts_dir(data_dir, name)).await?;
    }
    Ok(datasets.saturating_add(artifacts))
}

/// Bytes of the files stored in `dir` (uploads in progress, dot-files, not counted); 0 when it
/// does not exist.
async fn directory_bytes(dir: &Path) -> Result<u64, ApiError> {
    let mut entries = match tokio::fs::read_dir(dir).await {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(io_error(dir, e)),
    };
    let mut total = 0u64;
    while let Some(entry) = entries.next_entry().await.map_err(|e| io_error(dir, e))? {
        if entry.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        let meta = entry.metadata().await.map_err(|e| io_error(dir, e))?;
        if meta.is_file() {
            total = total.saturating_add(meta.len());
        }
    }
    Ok(total)
}

fn io_error(dir: &Path, e: std::io::Error) -> ApiError {
    ApiError::new(
        ErrorCode::Internal,
        format!("reading {} for the quota: {e}", dir.display()),
    )
}

//! The worker's data plane: a task's inputs (dataset content and artifacts of earlier stages)
//! fetched from the control plane into the region's cache, keyed and verified by sha256, and
//! its outputs uploaded as content-addressed artifacts.
//!
//! The cache is shared by every worker of a region: a file lock per sha256 makes one worker
//! download while the others wait, so a second task in the region never downloads again.

use std::path::{Path, PathBuf};

use std::sync::Mutex;

use futures::StreamExt;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use crate::astro_fit::ContentRef;

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("HTTP: {0}")]
    Http(#[from] reqwest::Error),
    #[error("{what}: the server answered {status}: {body}")]
    Status {
        what: String,
        status: u16,
        body: String,
    },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// The content is not what the task was planned with: retrying cannot help.
    #[error(
        "{what} changed since it was planned: expected sha256 {expected} ({size} bytes), got {actual} ({got} bytes)"
    )]
    Changed {
        what: String,
        expected: String,
        actual: String,
        size: u64,
        got: u64,
    },
}

impl DataError {
    /// Whether another attempt could succeed.
    pub fn permanent(&self) -> bool {
        matches!(self, DataError::Changed { .. })
            || matches!(self, DataError::Status { status, .. } if *status == 404 || *status == 422)
    }
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> DataError {
    let what = what.into();
    move |source| DataError::Io { what, source }
}

/// What a task moved: the content it downloaded (by name) and how much it found cached.
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Transfers {
    pub downloaded: Vec<String>,
    pub downloaded_bytes: u64,
    pub cache_hits: u64,
}

/// One fetch: `Some(bytes)` downloaded, `None` found in the cache.
type Fetch = (String, Option<u64>);

pub struct DataPlane {
    client: reqwest::Client,
    server: String,
    cache: PathBuf,
    /// Every fetch of this worker, in order; a task reports those since its start.
    fetches: Mutex<Vec<Fetch>>,
}

/// Holds a lock file while alive (the lock is released when the file closes).
struct CacheLock(#[allow(dead_code)] std::fs::File);

async fn lock(path: PathBuf) -> Result<CacheLock, DataError> {
    let what = format!("locking {}", path.display());
    tokio::task::spawn_blocking(move || {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)?;
        file.lock()?;
        Ok(CacheLock(file))
    })
    .await
    .map_err(|e| DataError::Io {
        what: what.clone(),
        source: std::io::Error::other(e),
    })?
    .map_err(io(what))
}

impl DataPlane {
    pub fn new(client: reqwest::Client, server: &str, cache: PathBuf) -> Self {
        DataPlane {
            client,
            server: server.to_string(),
            cache,
            fetches: Mutex::new(Vec::new()),
        }
    }

    /// A mark in this worker's fetches, for [`DataPlane::transfers_since`].
    pub fn mark(&self) -> usize {
        self.fetches.lock().map_or(0, |f| f.len())
    }

    /// What was fetched since `mark`.
    pub fn transfers_since(&self, mark: usize) -> Transfers {
        let mut t = Transfers::default();
        if let Ok(fetches) = self.fetches.lock() {
            for (name, bytes) in fetches.iter().skip(mark) {
                match bytes {
                    Some(b) => {
                        t.downloaded.push(name.clone());
                        t.downloaded_bytes += b;
                    }
                    None => t.cache_hits += 1,
                }
            }
        }
        t
    }

    fn record(&self, name: &str, downloaded: Option<u64>) {
        if let Ok(mut fetches) = self.fetches.lock() {
            fetches.push((name.to_string(), downloaded));
        }
    }

    pub fn cache_dir(&self) -> &Path {
        &self.cache
    }

    /// A dataset's content, as pinned by `r`.
    pub async fn dataset(&self, r: &ContentRef) -> Result<PathBuf, DataError> {
        let url = format!("{}/api/v1/datasets/{}/content", self.server, r.name);
        self.fetch(&url, r, &format!("dataset {:?}", r.name)).await
    }

    /// An artifact of `application`, as pinned by `r`.
    pub async fn artifact(&self, application: &str, r: &ContentRef) -> Result<PathBuf, DataError> {
        let url = format!(
            "{}/api/v1/applications/{application}/artifacts/{}",
            self.server, r.sha256
        );
        self.fetch(&url, r, &format!("artifact {:?}", r.name)).await
    }

    async fn fetch(&self, url: &str, r: &ContentRef, what: &str) -> Result<PathBuf, DataError> {
        tokio::fs::create_dir_all(&self.cache)
            .await
            .map_err(io(format!("creating {}", self.cache.display())))?;
        let path = self.cache.join(&r.sha256);
        if tokio::fs::metadata(&path).await.is_ok() {
            self.record(&r.name, None);
            return Ok(path);
        }
        let _lock = lock(self.cache.join(format!("{}.lock", r.sha256))).await?;
        // Another worker of the region may have fetched it while this one waited.
        if tokio::fs::metadata(&path).await.is_ok() {
            self.record(&r.name, None);
            return Ok(path);
        }
        let response = self.client.get(url).send().await?;
        let status = response.status();
        if !status.is_success() {
            return Err(DataError::Status {
                what: what.to_string(),
                status: status.as_u16(),
                body: response.text().await.unwrap_or_default(),
            });
        }
        let tmp = self.cache.join(format!("{}.part", r.sha256));
        let mut file = tokio::fs::File::create(&tmp)
            .await
            .map_err(io(format!("creating {}", tmp.display())))?;
        let mut hasher = Sha256::new();
        let mut size = 0u64;
        let mut body = response.bytes_stream();
        while let Some(chunk) = body.next().await {
            let chunk = chunk?;
            size += chunk.len() as u64;
            hasher.update(&chunk);
            file.write_all(&chunk)
                .await
                .map_err(io(format!("writing {}", tmp.display())))?;
        }
        // No fsync: an entry is verified when it is downloaded, and the cache can always be
        // fetched again; the server keeps the durable copy.
        file.flush()
            .await
            .map_err(io(format!("writing {}", tmp.display())))?;
        drop(file);
        let actual = hex::encode(hasher.finalize());
        if actual != r.sha256 || size != r.size {
            let _ = tokio::fs::remove_file(&tmp).await;
            return Err(DataError::Changed {
                what: what.to_string(),
                expected: r.sha256.clone(),
                actual,
                size: r.size,
                got: size,
            });
        }
        tokio::fs::rename(&tmp, &path)
            .await
            .map_err(io(format!("storing {}", path.display())))?;
        self.record(&r.name, Some(size));
        Ok(path)
    }

    /// A derived form of cached content (a decompressed cube, an unpacked template library),
    /// made once per region by `make(source, target)` under the content's lock.
    pub async fn derived(
        &self,
        source: &Path,
        suffix: &str,
        make: impl FnOnce(&Path, &Path) -> Result<(), String> + Send + 'static,
    ) -> Result<PathBuf, String> {
        let name = source
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let target = self.cache.join(format!("{name}.{suffix}"));
        if tokio::fs::metadata(&target).await.is_ok() {
            return Ok(target);
        }
        let _lock = lock(self.cache.join(format!("{name}.{suffix}.lock")))
            .await
            .map_err(|e| e.to_string())?;
        if tokio::fs::metadata(&target).await.is_ok() {
            return Ok(target);
        }
        let (source, made, suffix) = (source.to_path_buf(), target.clone(), suffix.to_string());
        tokio::task::spawn_blocking(move || {
            let tmp = made.with_extension(format!("{suffix}.part"));
            let _ = std::fs::remove_dir_all(&tmp);
            let _ = std::fs::remove_file(&tmp);
            make(&source, &tmp)?;
            std::fs::rename(&tmp, &made).map_err(|e| format!("storing {}: {e}", made.display()))
        })
        .await
        .map_err(|e| e.to_string())??;
        Ok(target)
    }

    /// Uploads `path` as an artifact of `task` named `name`; the server checks the sha256.
    pub async fn upload(
        &self,
        task: &str,
        path: &Path,
        name: &str,
    ) -> Result<ContentRef, DataError> {
        let bytes = bytes::Bytes::from(
            tokio::fs::read(path)
                .await
                .map_err(io(format!("reading {}", path.display())))?,
        );
        let sha256 = hex::encode(Sha256::digest(&bytes));
        let size = bytes.len() as u64;
        let response = self
            .client
            .put(format!(
                "{}/api/v1/tasks/{task}/artifacts/{sha256}",
                self.server
            ))
            .header("content-type", "application/octet-stream")
            .body(bytes.clone())
            .send()
            .await?;
        let status = response.status();
        if !status.is_success() {
            return Err(DataError::Status {
                what: format!("uploading {name}"),
                status: status.as_u16(),
                body: response.text().await.unwrap_or_default(),
            });
        }
        // What this region made is in its cache too: a later task here (the assemble task
        // after the region's chunks) finds it without a download.
        let cached = self.cache.join(&sha256);
        if tokio::fs::metadata(&cached).await.is_err()
            && tokio::fs::hard_link(path, &cached).await.is_err()
        {
            let tmp = self
                .cache
                .join(format!("{sha256}.{}.part", std::process::id()));
            if tokio::fs::write(&tmp, &bytes).await.is_ok() {
                let _ = tokio::fs::rename(&tmp, &cached).await;
            }
        }
        Ok(ContentRef {
            name: name.to_string(),
            sha256,
            size,
        })
    }
}

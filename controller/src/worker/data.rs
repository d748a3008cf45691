//! The worker's data plane: a task's inputs (dataset content and artifacts of earlier stages)
//! fetched from the control plane into the region's cache, keyed and verified by sha256, and
//! its outputs uploaded as content-addressed artifacts.
//!
//! The cache is shared by every worker of a region: a file lock per sha256 makes one worker
//! download while the others wait, so a second task in the region never downloads again.
//!
//! A worker of the local driver runs on the server's own host and disk: it hard-links an input
//! from the server's store into its region's cache instead of downloading a copy (still
//! verified by sha256), as a kubelet mounts a local volume rather than copying it.

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
    /// Whether the server was out of reach or failing, so the same request may succeed later.
    pub fn transient(&self) -> bool {
        matches!(self, DataError::Http(_))
            || matches!(self, DataError::Status { status, .. } if *status >= 500)
    }

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

/// What a task moved: the content it downloaded (by name), what it linked from the server's
/// store on the same host, and how much it found cached.
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Transfers {
    pub downloaded: Vec<String>,
    pub downloaded_bytes: u64,
    pub linked: Vec<String>,
    pub linked_bytes: u64,
    pub cache_hits: u64,
}

/// How one input reached the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fetched {
    Downloaded(u64),
    Linked(u64),
    Cached,
}

type Fetch = (String, Fetched);

pub struct DataPlane {
    client: reqwest::Client,
    server: String,
    cache: PathBuf,
    /// The server's data directory, when this worker shares its host and file system.
    server_store: Option<PathBuf>,
    /// Every fetch of this worker, in order; a task reports those since its start.
    fetches: Mutex<Vec<Fetch>>,
}

/// The cached content `sha256`: the original, or the uplink copy of an edge-held dataset.
async fn cached(cache: &Path, sha256: &str) -> Option<PathBuf> {
    let original = cache.join(sha256);
    if tokio::fs::metadata(&original).await.is_ok() {
        return Some(original);
    }
    let encoded = cache.join(format!(
        "{sha256}.{}",
        crate::uplink::UplinkEncoding::Tarsis.as_str()
    ));
    tokio::fs::metadata(&encoded).await.ok().map(|_| encoded)
}

/// `(encoding, sha256 of the bytes)` when the server answered with an encoded copy of `r`
/// (identity copies are the content itself); a copy of other content is refused.
fn encoded_representation(
    headers: &reqwest::header::HeaderMap,
    r: &ContentRef,
    what: &str,
) -> Result<Option<(String, String)>, DataError> {
    use crate::uplink::{CONTENT_SHA256_HEADER, ENCODED_SHA256_HEADER, ENCODING_HEADER};
    let header = |h: &str| headers.get(h).and_then(|v| v.to_str().ok());
    let Some(encoding) = header(ENCODING_HEADER).filter(|e| *e != "identity") else {
        return Ok(None);
    };
    let stands_for = header(CONTENT_SHA256_HEADER).unwrap_or_default();
    let encoded = header(ENCODED_SHA256_HEADER).unwrap_or_default();
    if stands_for != r.sha256 || encoding != crate::uplink::UplinkEncoding::Tarsis.as_str() {
        return Err(DataError::Changed {
            what: format!("{what} ({encoding} copy)"),
            expected: r.sha256.clone(),
            actual: stands_for.to_string(),
            size: r.size,
            got: 0,
        });
    }
    Ok(Some((encoding.to_string(), encoded.to_string())))
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
    pub fn new(
        client: reqwest::Client,
        server: &str,
        cache: PathBuf,
        server_store: Option<PathBuf>,
    ) -> Self {
        DataPlane {
            client,
            server: server.to_string(),
            cache,
            server_store,
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
            for (name, fetched) in fetches.iter().skip(mark) {
                match *fetched {
                    Fetched::Downloaded(bytes) => {
                        t.downloaded.push(name.clone());
                        t.downloaded_bytes += bytes;
                    }
                    Fetched::Linked(bytes) => {
                        t.linked.push(name.clone());
                        t.linked_bytes += bytes;
                    }
                    Fetched::Cached => t.cache_hits += 1,
                }
            }
        }
        t
    }

    fn record(&self, name: &str, fetched: Fetched) {
        if let Ok(mut fetches) = self.fetches.lock() {
            fetches.push((name.to_string(), fetched));
        }
    }

    pub fn cache_dir(&self) -> &Path {
        &self.cache
    }

    /// A dataset's content, as pinned by `r`.
    pub async fn dataset(&self, r: &ContentRef) -> Result<PathBuf, DataError> {
        let url = format!("{}/api/v1/datasets/{}/content", self.server, r.name);
        let local = (self.server_store.as_deref())
            .map(|store| crate::content::dataset_path(store, &r.name));
        self.fetch(&url, local, r, &format!("dataset {:?}", r.name))
            .await
    }

    /// An artifact of `application`, as pinned by `r`.
    pub async fn artifact(&self, application: &str, r: &ContentRef) -> Result<PathBuf, DataError> {
        let url = format!(
            "{}/api/v1/applications/{application}/artifacts/{}",
            self.server, r.sha256
        );
        let local = (self.server_store.as_deref())
            .map(|store| crate::content::artifact_path(store, application, &r.sha256));
        self.fetch(&url, local, r, &format!("artifact {:?}", r.name))
            .await
    }

    /// Puts `path` into the region's cache under its sha256 and asks the server to take it
    /// from there. `None`: the server cannot (another file system, another host): send it.
    async fn hand_over(
        &self,
        task: &str,
        lease_secret: &str,
        path: &Path,
        name: &str,
    ) -> Result<Option<ContentRef>, DataError> {
        let file = path.to_path_buf();
        let (sha256, size) =
            tokio::task::spawn_blocking(move || crate::content::sha256_file(&file))
                .await
                .map_err(|e| DataError::Io {
                    what: format!("hashing {}", path.display()),
                    source: std::io::Error::other(e),
                })?
                .map_err(io(format!("hashing {}", path.display())))?;
        let cached = self.cache.join(&sha256);
        if tokio::fs::metadata(&cached).await.is_err()
            && tokio::fs::hard_link(path, &cached).await.is_err()
        {
            return Ok(None);
        }
        let response = self
            .client
            .put(format!(
                "{}/api/v1/tasks/{task}/artifacts/{sha256}",
                self.server
            ))
            .header(crate::api::CONTENT_FROM_HEADER, "region-cache")
            .header(crate::api::LEASE_SECRET_HEADER, lease_secret)
            .send()
            .await?;
        let status = response.status();
        if status.is_success() {
            return Ok(Some(ContentRef {
                name: name.to_string(),
                sha256,
                size,
            }));
        }
        if status.is_client_error() && status.as_u16() != 422 {
            return Ok(None);
        }
        Err(DataError::Status {
            what: format!("handing over {name}"),
            status: status.as_u16(),
            body: response.text().await.unwrap_or_default(),
        })
    }

    /// Hard-links `source` (the server's stored copy) into the cache as `r`, if it is on this
    /// file system and holds exactly `r`'s content. `false`: download it instead.
    async fn link(&self, source: &Path, r: &ContentRef) -> bool {
        let tmp = self
            .cache
            .join(format!("{}.{}.link", r.sha256, std::process::id()));
        let _ = tokio::fs::remove_file(&tmp).await;
        if tokio::fs::hard_link(source, &tmp).await.is_err() {
            return false;
        }
        // The server renames a new upload over a dataset's file, so the inode linked here
        // never changes; it may already be newer content than the task was planned with.
        let check = tmp.clone();
        let same = tokio::task::spawn_blocking(move || crate::content::sha256_file(&check))
            .await
            .ok()
            .and_then(Result::ok)
            .is_some_and(|(sha256, size)| sha256 == r.sha256 && size == r.size);
        let path = self.cache.join(&r.sha256);
        if same && tokio::fs::rename(&tmp, &path).await.is_ok() {
            return true;
        }
        let _ = tokio::fs::remove_file(&tmp).await;
        false
    }

    async fn fetch(
        &self,
        url: &str,
        local: Option<PathBuf>,
        r: &ContentRef,
        what: &str,
    ) -> Result<PathBuf, DataError> {
        tokio::fs::create_dir_all(&self.cache)
            .await
            .map_err(io(format!("creating {}", self.cache.display())))?;
        let path = self.cache.join(&r.sha256);
        if let Some(found) = cached(&self.cache, &r.sha256).await {
            self.record(&r.name, Fetched::Cached);
            return Ok(found);
        }
        let _lock = lock(self.cache.join(format!("{}.lock", r.sha256))).await?;
        // Another worker of the region may have fetched it while this one waited.
        if let Some(found) = cached(&self.cache, &r.sha256).await {
            self.record(&r.name, Fetched::Cached);
            return Ok(found);
        }
        if let Some(source) = local
            && self.link(&source, r).await
        {
            self.record(&r.name, Fetched::Linked(r.size));
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
        // An edge-held dataset comes as its uplink copy: it must stand for the pinned content,
        // and its own bytes are checked against the sha256 the server received.
        let encoded = encoded_representation(response.headers(), r, what)?;
        let (path, expected, expected_size) = match &encoded {
            None => (path, r.sha256.clone(), Some(r.size)),
            Some((encoding, sha256)) => (
                self.cache.join(format!("{}.{encoding}", r.sha256)),
                sha256.clone(),
                None,
            ),
        };
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
        if actual != expected || expected_size.is_some_and(|n| n != size) {
            let _ = tokio::fs::remove_file(&tmp).await;
            return Err(DataError::Changed {
                what: what.to_string(),
                expected,
                actual,
                size: expected_size.unwrap_or(0),
                got: size,
            });
        }
        tokio::fs::rename(&tmp, &path)
            .await
            .map_err(io(format!("storing {}", path.display())))?;
        self.record(&r.name, Fetched::Downloaded(size));
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
    /// A worker on the server's host hands it over through its region's cache instead.
    pub async fn upload(
        &self,
        task: &str,
        lease_secret: &str,
        path: &Path,
        name: &str,
    ) -> Result<ContentRef, DataError> {
        if self.server_store.is_some()
            && let Some(stored) = self.hand_over(task, lease_secret, path, name).await?
        {
            return Ok(stored);
        }
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
            .header(crate::api::LEASE_SECRET_HEADER, lease_secret)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::{ServerOptions, start};

    /// A server on loopback holding one dataset `cube` with `content`.
    async fn server_with_dataset(
        content: &[u8],
    ) -> (crate::server::RunningServer, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let server = start(ServerOptions {
            region_grace: crate::server::DEFAULT_REGION_GRACE,
            transport: Default::default(),
            listen: "127.0.0.1:0".parse().unwrap(),
            data_dir: dir.path().join("server"),
            database_url: None,
            lease_seconds: 30,
            worker_program: "/nonexistent".into(),
            anonymous_metrics: false,
            tls: Default::default(),
            tls_client_ca: None,
            oidc: None,
            user_quota_bytes: None,
        })
        .await
        .unwrap();
        let http = crate::tokens::admin_client(&dir.path().join("server")).unwrap();
        let created = http
            .post(format!("{}/api/v1/datasets", server.url()))
            .json(&serde_json::json!({
                "apiVersion": "ceccm/v1", "kind": "Dataset",
                "metadata": {"name": "cube"}, "spec": {"format": "cube"}
            }))
            .send()
            .await
            .unwrap();
        assert!(
            created.status().is_success(),
            "{}",
            created.text().await.unwrap()
        );
        let uploaded = http
            .put(format!("{}/api/v1/datasets/cube/content", server.url()))
            .body(content.to_vec())
            .send()
            .await
            .unwrap();
        assert!(
            uploaded.status().is_success(),
            "{}",
            uploaded.text().await.unwrap()
        );
        (server, dir)
    }

    fn pinned(content: &[u8]) -> ContentRef {
        ContentRef {
            name: "cube".into(),
            sha256: hex::encode(Sha256::digest(content)),
            size: content.len() as u64,
        }
    }

    #[tokio::test]
    async fn a_remote_region_downloads_once_and_a_local_one_links_the_servers_copy() {
        let content = b"SIMPLE  =                    T".repeat(1000);
        let (server, dir) = server_with_dataset(&content).await;
        let http = crate::tokens::admin_client(&dir.path().join("server")).unwrap();

        let remote = DataPlane::new(http.clone(), &server.url(), dir.path().join("remote"), None);
        let path = remote.dataset(&pinned(&content)).await.unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), content);
        let again = remote.dataset(&pinned(&content)).await.unwrap();
        assert_eq!(again, path);
        let t = remote.transfers_since(0);
        assert_eq!(
            (t.downloaded, t.downloaded_bytes),
            (vec!["cube".to_string()], content.len() as u64)
        );
        assert_eq!((t.linked_bytes, t.cache_hits), (0, 1));

        let local = DataPlane::new(
            http,
            &server.url(),
            dir.path().join("local"),
            Some(dir.path().join("server")),
        );
        let path = local.dataset(&pinned(&content)).await.unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), content);
        let t = local.transfers_since(0);
        assert_eq!(
            (t.linked, t.downloaded_bytes),
            (vec!["cube".to_string()], 0)
        );
        use std::os::unix::fs::MetadataExt;
        let stored = crate::content::dataset_path(&dir.path().join("server"), "cube");
        assert_eq!(
            std::fs::metadata(&path).unwrap().ino(),
            std::fs::metadata(stored).unwrap().ino(),
            "the local region's cache shares the server's copy"
        );
        server.shutdown().await;
    }

    #[tokio::test]
    async fn content_changed_since_planning_is_refused_by_link_and_download_alike() {
        let planned = b"planned content".repeat(100);
        let (server, dir) = server_with_dataset(b"uploaded again since").await;
        let http = crate::tokens::admin_client(&dir.path().join("server")).unwrap();
        for store in [None, Some(dir.path().join("server"))] {
            let cache = dir
                .path()
                .join(if store.is_some() { "local" } else { "remote" });
            let data = DataPlane::new(http.clone(), &server.url(), cache.clone(), store);
            let err = data.dataset(&pinned(&planned)).await.unwrap_err();
            assert!(
                matches!(err, DataError::Changed { .. }) && err.permanent(),
                "{err}"
            );
            // Nothing unverified is left in the cache under the planned sha256.
            assert!(!cache.join(&pinned(&planned).sha256).exists());
        }
        server.shutdown().await;
    }
}

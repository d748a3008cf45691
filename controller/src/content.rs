//! Dataset content and result files: streamed to and from files under the data directory,
//! size-limited and checksummed (sha256) on the way in.

use std::path::{Path, PathBuf};

use axum::body::{Body, Bytes};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::api::{ApiConfig, ResultFile};
use crate::error::{ApiError, ErrorCode};
use crate::resources::Kind;
use crate::store::Store;

/// Where the server keeps a dataset's content.
pub fn dataset_path(data_dir: &Path, name: &str) -> PathBuf {
    data_dir.join("datasets").join(name)
}

fn io_error(what: &str, e: std::io::Error) -> ApiError {
    ApiError::new(ErrorCode::Internal, format!("{what}: {e}"))
}

/// Stores the content of dataset `name` (`declared`: the request's Content-Length), within
/// the upload limit and its owner's quota.
pub async fn upload_dataset(
    store: &Store,
    config: &ApiConfig,
    name: &str,
    declared: Option<u64>,
    body: Body,
) -> Result<Value, ApiError> {
    let Some(object) = store.get(Kind::Dataset, name).await? else {
        return Err(ApiError::not_found("Dataset", name));
    };
    if object["metadata"]["deletionTimestamp"].is_string() {
        return Err(ApiError::new(
            ErrorCode::Conflict,
            format!("dataset {name:?} is being deleted"),
        ));
    }
    let owner = object["metadata"]["owner"].as_str();
    let allowance = (config.quotas)
        .allowance(store, &config.data_dir, owner, Some(name))
        .await?;
    let limit = upload_limit(config, allowance.as_ref(), declared)?;
    let dir = config.data_dir.join("datasets");
    tokio::fs::create_dir_all(&dir)
        .await
        .map_err(|e| io_error("creating the dataset directory", e))?;
    let tmp = dir.join(format!(".{name}.{}.upload", uuid::Uuid::new_v4().simple()));
    let outcome = receive(body, &tmp, limit).await;
    let (size, sha256) = match outcome {
        Ok(done) => done,
        Err(e) => {
            let _ = tokio::fs::remove_file(&tmp).await;
            return Err(over_quota(config, allowance.as_ref(), e));
        }
    };
    tokio::fs::rename(&tmp, dataset_path(&config.data_dir, name))
        .await
        .map_err(|e| io_error("storing the dataset", e))?;
    let patch = json!({"status": {"phase": "Ready", "size": size, "sha256": sha256,
                                  "uploadTime": crate::time::now_rfc3339()}});
    crate::objects::patch_status(store, Kind::Dataset, name, patch).await
}

/// The most an upload may bring: the upload limit, or what the owner's quota leaves if less
/// (refused at once when the declared length does not fit).
fn upload_limit(
    config: &ApiConfig,
    allowance: Option<&crate::quota::Allowance>,
    declared: Option<u64>,
) -> Result<u64, ApiError> {
    let Some(allowance) = allowance else {
        return Ok(config.max_upload_bytes);
    };
    if let Some(n) = declared.filter(|n| *n > allowance.remaining()) {
        return Err(allowance.exceeded(Some(n)));
    }
    Ok(config.max_upload_bytes.min(allowance.remaining()))
}

/// An upload cut off by the quota's remainder (not the upload limit) is over quota.
fn over_quota(
    config: &ApiConfig,
    allowance: Option<&crate::quota::Allowance>,
    error: ApiError,
) -> ApiError {
    match allowance {
        Some(a)
            if error.code == ErrorCode::PayloadTooLarge
                && a.remaining() < config.max_upload_bytes =>
        {
            a.exceeded(None)
        }
        _ => error,
    }
}

pub(crate) async fn receive(
    body: Body,
    path: &Path,
    limit: u64,
) -> Result<(u64, String), ApiError> {
    let mut file = tokio::fs::File::create(path)
        .await
        .map_err(|e| io_error("creating the upload file", e))?;
    let mut hasher = Sha256::new();
    let mut size: u64 = 0;
    let mut stream = body.into_data_stream();
    while let Some(chunk) = stream.next().await {
        let chunk =
            chunk.map_err(|e| ApiError::bad_request(format!("reading the upload failed: {e}")))?;
        size += chunk.len() as u64;
        if size > limit {
            return Err(ApiError::new(
                ErrorCode::PayloadTooLarge,
                format!("upload exceeds the limit of {limit} bytes"),
            )
            .with_details(json!({"limitBytes": limit})));
        }
        hasher.update(&chunk);
        file.write_all(&chunk)
            .await
            .map_err(|e| io_error("writing the upload", e))?;
    }
    file.sync_all()
        .await
        .map_err(|e| io_error("syncing the upload", e))?;
    Ok((size, hex::encode(hasher.finalize())))
}

pub async fn download_dataset(
    store: &Store,
    config: &ApiConfig,
    name: &str,
) -> Result<Response, ApiError> {
    let Some(object) = store.get(Kind::Dataset, name).await? else {
        return Err(ApiError::not_found("Dataset", name));
    };
    let status: crate::resources::DatasetStatus =
        serde_json::from_value(object["status"].clone()).unwrap_or_default();
    if status.uplink.is_some() {
        return crate::uplink::serve_held(store, &config.data_dir, name, &status).await;
    }
    stream_file(
        &dataset_path(&config.data_dir, name),
        &format!("content of dataset {name:?}"),
    )
    .await
}

pub async fn remove_dataset_content(data_dir: &Path, name: &str) -> Result<(), ApiError> {
    match tokio::fs::remove_file(dataset_path(data_dir, name)).await {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(io_error("removing dataset content", e))
        }
        _ => Ok(()),
    }
}

/// Streams a file in 64 KiB chunks; 404 naming `what` when it does not exist.
pub async fn stream_file(path: &Path, what: &str) -> Result<Response, ApiError> {
    let file = match tokio::fs::File::open(path).await {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(ApiError::new(
                ErrorCode::NotFound,
                format!("{what} not found"),
            ));
        }
        Err(e) => return Err(io_error("opening the file", e)),
    };
    let size = file
        .metadata()
        .await
        .map_err(|e| io_error("reading file metadata", e))?
        .len();
    let stream = futures::stream::unfold(file, |mut file| async move {
        let mut buf = vec![0u8; 64 * 1024];
        match file.read(&mut buf).await {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((Ok::<_, std::io::Error>(Bytes::from(buf)), file))
            }
            Err(e) => Some((Err(e), file)),
        }
    });
    Ok((
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_string()),
            (header::CONTENT_LENGTH, size.to_string()),
        ],
        Body::from_stream(stream),
    )
        .into_response())
}

/// The files in a results directory with their size and sha256 (none if it does not exist).
pub async fn list_results(dir: &Path) -> Result<Vec<ResultFile>, ApiError> {
    // Published artifacts come with their index: no need to hash a large model cube again.
    if let Ok(text) = tokio::fs::read(dir.join(RESULTS_INDEX)).await
        && let Ok(files) = serde_json::from_slice::<Vec<ResultFile>>(&text)
    {
        return Ok(files);
    }
    let mut entries = match tokio::fs::read_dir(dir).await {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
        Err(e) => return Err(io_error("listing results", e)),
    };
    let mut files = Vec::new();
    while let Some(entry) = entries
        .next_entry()
        .await
        .map_err(|e| io_error("listing results", e))?
    {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.ends_with(".tmp") || name.starts_with('.') {
            continue;
        }
        let bytes = tokio::fs::read(entry.path())
            .await
            .map_err(|e| io_error("reading a result", e))?;
        files.push(ResultFile {
            name,
            size: bytes.len() as u64,
            sha256: hex::encode(Sha256::digest(&bytes)),
        });
    }
    files.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(files)
}

/// Where an application's artifacts live: content-addressed by sha256, so an artifact is
/// written once whoever uploads it, and a redelivered task's identical upload changes nothing.
pub fn artifact_path(data_dir: &Path, application: &str, sha256: &str) -> PathBuf {
    data_dir.join("artifacts").join(application).join(sha256)
}

pub fn artifacts_dir(data_dir: &Path, application: &str) -> PathBuf {
    data_dir.join("artifacts").join(application)
}

fn check_sha256(sha256: &str) -> Result<(), ApiError> {
    if sha256.len() == 64
        && sha256
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        Ok(())
    } else {
        Err(ApiError::bad_request(format!(
            "{sha256:?} is not a sha256 (64 lowercase hex digits)"
        )))
    }
}

/// Where an artifact's bytes come from.
pub enum ArtifactSource {
    /// The request body.
    Body(Body),
    /// The cache of the region holding the task, on this host (`cache_root(data_dir)/REGION/
    /// SHA256`): a worker of the local driver hands over what it made by name instead of
    /// sending it, and the server links it after checking its hash.
    RegionCache,
}

/// Root of the local driver's region caches (one directory per region) on the server's host.
pub fn cache_root(data_dir: &Path) -> PathBuf {
    data_dir.join("cache")
}

/// Stores one artifact of `task`'s application under its sha256. The content must hash to
/// `sha256` (422 otherwise, and nothing is kept); an artifact already stored is not written
/// again. Returns its size.
pub async fn upload_artifact(
    store: &Store,
    config: &ApiConfig,
    task: &str,
    sha256: &str,
    declared: Option<u64>,
    source: ArtifactSource,
) -> Result<u64, ApiError> {
    check_sha256(sha256)?;
    let Some(object) = store.get(Kind::Task, task).await? else {
        return Err(ApiError::not_found("Task", task));
    };
    let application = object["spec"]["application"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let path = artifact_path(&config.data_dir, &application, sha256);
    if let Ok(meta) = tokio::fs::metadata(&path).await {
        return Ok(meta.len());
    }
    // Artifacts count against the quota of the application's owner, whoever uploads them.
    let owner = store
        .get(Kind::Application, &application)
        .await?
        .and_then(|a| a["metadata"]["owner"].as_str().map(str::to_string));
    let allowance = (config.quotas)
        .allowance(store, &config.data_dir, owner.as_deref(), None)
        .await?;
    let from_body = matches!(source, ArtifactSource::Body(_));
    let limit = upload_limit(config, allowance.as_ref(), declared.filter(|_| from_body))?;
    let dir = artifacts_dir(&config.data_dir, &application);
    tokio::fs::create_dir_all(&dir)
        .await
        .map_err(|e| io_error("creating the artifact directory", e))?;
    let tmp = dir.join(format!(
        ".{sha256}.{}.upload",
        uuid::Uuid::new_v4().simple()
    ));
    let outcome = match source {
        ArtifactSource::Body(body) => receive(body, &tmp, limit).await,
        ArtifactSource::RegionCache => {
            let region = object["status"]["region"].as_str().unwrap_or_default();
            take_from_region_cache(&config.data_dir, region, sha256, &tmp).await
        }
    };
    let (size, actual) = match outcome {
        Ok(done) => done,
        Err(e) => {
            let _ = tokio::fs::remove_file(&tmp).await;
            return Err(over_quota(config, allowance.as_ref(), e));
        }
    };
    // Linked from a region's cache, its size is known only now.
    if let Some(a) = allowance.as_ref().filter(|a| size > a.remaining()) {
        let _ = tokio::fs::remove_file(&tmp).await;
        return Err(a.exceeded(Some(size)));
    }
    if actual != sha256 {
        let _ = tokio::fs::remove_file(&tmp).await;
        return Err(ApiError::new(
            ErrorCode::Invalid,
            format!("the upload hashes to {actual}, not {sha256}: corrupted on the way?"),
        )
        .with_details(json!({"expected": sha256, "actual": actual})));
    }
    tokio::fs::rename(&tmp, &path)
        .await
        .map_err(|e| io_error("storing the artifact", e))?;
    Ok(size)
}

/// Links `region`'s cached `sha256` to `tmp`, made durable, and returns its size and hash.
async fn take_from_region_cache(
    data_dir: &Path,
    region: &str,
    sha256: &str,
    tmp: &Path,
) -> Result<(u64, String), ApiError> {
    let plain = !region.is_empty() && !region.starts_with('.') && !region.contains('/');
    if !plain {
        return Err(ApiError::new(
            ErrorCode::Conflict,
            "the task is not held by a region: upload the content in the body",
        ));
    }
    let source = cache_root(data_dir).join(region).join(sha256);
    let tmp = tmp.to_path_buf();
    let (region, sha256) = (region.to_string(), sha256.to_string());
    tokio::task::spawn_blocking(move || {
        if let Err(e) = std::fs::hard_link(&source, &tmp) {
            return Err(ApiError::new(
                ErrorCode::NotFound,
                format!(
                    "{sha256} is not in the cache of region {region:?} on the server's host \
                     ({e}): upload the content in the body"
                ),
            ));
        }
        // The worker wrote it without syncing; the store will name it as a task's output.
        std::fs::File::open(&tmp)
            .and_then(|f| f.sync_all())
            .map_err(|e| io_error("syncing the artifact", e))?;
        let (actual, size) = sha256_file(&tmp).map_err(|e| io_error("reading the artifact", e))?;
        Ok((size, actual))
    })
    .await
    .map_err(|e| ApiError::new(ErrorCode::Internal, e.to_string()))?
}

/// The sha256 (hex) and size of a file, read in 1 MiB blocks.
pub fn sha256_file(path: &Path) -> std::io::Result<(String, u64)> {
    use std::io::Read;
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut block = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = file.read(&mut block)?;
        if n == 0 {
            break;
        }
        hasher.update(&block[..n]);
        size += n as u64;
    }
    Ok((hex::encode(hasher.finalize()), size))
}

/// Streams an artifact of `application`.
pub async fn download_artifact(
    config: &ApiConfig,
    application: &str,
    sha256: &str,
) -> Result<Response, ApiError> {
    check_sha256(sha256)?;
    stream_file(
        &artifact_path(&config.data_dir, application, sha256),
        &format!("artifact {sha256} of application {application:?}"),
    )
    .await
}

/// Every artifact a completion names must be stored, with the size it claims (422 otherwise):
/// a task is never marked done with outputs that are not there.
pub async fn check_artifacts(
    data_dir: &Path,
    application: &str,
    artifacts: &[crate::astro_fit::ContentRef],
) -> Result<(), ApiError> {
    for a in artifacts {
        check_sha256(&a.sha256)?;
        let safe = !a.name.is_empty()
            && a.name.len() <= 255
            && a.name.split('/').all(|part| {
                !part.is_empty()
                    && !part.starts_with('.')
                    && part
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
            });
        if !safe {
            return Err(ApiError::new(
                ErrorCode::Invalid,
                format!(
                    "artifact name {:?} is not a relative path of plain names",
                    a.name
                ),
            )
            .with_details(json!({"field": "artifacts", "name": a.name})));
        }
        let size = tokio::fs::metadata(artifact_path(data_dir, application, &a.sha256))
            .await
            .map(|m| m.len())
            .ok();
        if size != Some(a.size) {
            return Err(ApiError::new(
                ErrorCode::Invalid,
                format!(
                    "artifact {:?} ({}) is not stored with {} bytes; upload it first",
                    a.name, a.sha256, a.size
                ),
            )
            .with_details(json!({"field": "artifacts", "name": a.name})));
        }
    }
    Ok(())
}

/// Copies an application's final artifacts into its results directory under their names
/// (hard links where the file system allows), replacing what an interrupted pass left.
pub async fn publish_results(
    data_dir: &Path,
    application: &str,
    artifacts: &[crate::astro_fit::ContentRef],
) -> Result<(), std::io::Error> {
    let dir = crate::reconcile::application::results_dir(data_dir, application);
    tokio::fs::create_dir_all(&dir).await?;
    let mut index = Vec::with_capacity(artifacts.len());
    for a in artifacts {
        let name = Path::new(&a.name)
            .file_name()
            .ok_or_else(|| std::io::Error::other(format!("bad artifact name {:?}", a.name)))?;
        let target = dir.join(name);
        let _ = tokio::fs::remove_file(&target).await;
        let source = artifact_path(data_dir, application, &a.sha256);
        if tokio::fs::hard_link(&source, &target).await.is_err() {
            tokio::fs::copy(&source, &target).await?;
        }
        index.push(ResultFile {
            name: name.to_string_lossy().into_owned(),
            size: a.size,
            sha256: a.sha256.clone(),
        });
    }
    index.sort_by(|a, b| a.name.cmp(&b.name));
    let tmp = dir.join(format!("{RESULTS_INDEX}.tmp"));
    tokio::fs::write(
        &tmp,
        serde_json::to_vec(&index).map_err(std::io::Error::other)?,
    )
    .await?;
    tokio::fs::rename(&tmp, dir.join(RESULTS_INDEX)).await
}

/// The index of published artifacts in a results directory (their sizes and sha256 as the
/// workers uploaded and the server checked them).
const RESULTS_INDEX: &str = ".index.json";

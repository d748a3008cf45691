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

fn dataset_path(data_dir: &Path, name: &str) -> PathBuf {
    data_dir.join("datasets").join(name)
}

fn io_error(what: &str, e: std::io::Error) -> ApiError {
    ApiError::new(ErrorCode::Internal, format!("{what}: {e}"))
}

pub async fn upload_dataset(
    store: &Store,
    config: &ApiConfig,
    name: &str,
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
    let dir = config.data_dir.join("datasets");
    tokio::fs::create_dir_all(&dir)
        .await
        .map_err(|e| io_error("creating the dataset directory", e))?;
    let tmp = dir.join(format!(".{name}.{}.upload", uuid::Uuid::new_v4().simple()));
    let outcome = receive(body, &tmp, config.max_upload_bytes).await;
    let (size, sha256) = match outcome {
        Ok(done) => done,
        Err(e) => {
            let _ = tokio::fs::remove_file(&tmp).await;
            return Err(e);
        }
    };
    tokio::fs::rename(&tmp, dataset_path(&config.data_dir, name))
        .await
        .map_err(|e| io_error("storing the dataset", e))?;
    let patch = json!({"status": {"phase": "Ready", "size": size, "sha256": sha256,
                                  "uploadTime": crate::time::now_rfc3339()}});
    crate::objects::patch_status(store, Kind::Dataset, name, patch).await
}

async fn receive(body: Body, path: &Path, limit: u64) -> Result<(u64, String), ApiError> {
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
    if store.get_raw(Kind::Dataset, name).await?.is_none() {
        return Err(ApiError::not_found("Dataset", name));
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
        if name.ends_with(".tmp") {
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

//! Datasets that live at an edge region, and what crosses that region's uplink.
//!
//! A telescope's cubes are made at the telescope. Its agent holds them in `DIR/datasets/NAME`
//! (files moved in whole; names as Datasets name them) and announces each with its heartbeat:
//! sha256, size, and the size it will have on the uplink. A Dataset declared with
//! `spec.region: R` takes the announcement of R's agent as its content: `Ready`, pinned by the
//! original's sha256, with `status.uplink` saying where it is. Tasks placed at R read the
//! original from the agent's cache; placement prices the other regions with the encoded size.
//!
//! When a task elsewhere first asks the server for the content, the server answers 503 and
//! marks the request; the next heartbeat of R's agent carries the order to send it, and the
//! agent sends its encoded copy: TARSIS-compressed (noise-bounded, every header card kept)
//! where the file is a cube, else the bytes as they are. The server keeps that copy and serves
//! it with headers naming the encoding and the content it stands for; the receiving worker
//! checks both and decodes it once per region. Bytes, time and encoding land in
//! `status.uplink`.
//!
//! The decisions are pure ([`announce`], [`uploads_wanted`], [`requested`]); the I/O around
//! them is at the end of the server's part and in the agent's part ([`EdgeDatasets`]).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime};

use axum::body::Body;
use axum::http::{HeaderMap, HeaderValue};
use axum::response::Response;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

use crate::auth::Principal;
use crate::error::{ApiError, ErrorCode};
use crate::resources::{DatasetSpec, DatasetStatus, Kind, validate_name};
use crate::store::{Change, Query, Store};

/// How an encoded representation was made (response and upload header).
pub const ENCODING_HEADER: &str = "x-ceccm-encoding";
/// The sha256 of the content a representation stands for (the pinned original).
pub const CONTENT_SHA256_HEADER: &str = "x-ceccm-content-sha256";
/// The sha256 of the representation's own bytes.
pub const ENCODED_SHA256_HEADER: &str = "x-ceccm-encoded-sha256";

/// The most datasets one heartbeat may announce (so that it stays within the API's JSON body
/// limit); an agent holding more announces them in turns.
pub const MAX_ANNOUNCED: usize = 100;

/// How a dataset crosses the uplink.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum UplinkEncoding {
    /// TARSIS: flux within 0.05 sigma of the original, variance within 1%, everything else
    /// (masks, wavelengths, every header card of every HDU) exact.
    Tarsis,
    /// The bytes as they are.
    Identity,
}

impl UplinkEncoding {
    pub fn as_str(self) -> &'static str {
        match self {
            UplinkEncoding::Tarsis => "tarsis",
            UplinkEncoding::Identity => "identity",
        }
    }

    fn parse(text: &str) -> Option<Self> {
        match text {
            "tarsis" => Some(UplinkEncoding::Tarsis),
            "identity" => Some(UplinkEncoding::Identity),
            _ => None,
        }
    }
}

/// A dataset an agent holds, as its heartbeat announces it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HeldDataset {
    #[schema(pattern = "^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")]
    pub name: String,
    #[schema(pattern = "^[0-9a-f]{64}$")]
    pub sha256: String,
    pub size: u64,
    pub encoding: UplinkEncoding,
    /// Bytes the uplink will carry.
    pub encoded_size: u64,
}

impl HeldDataset {
    fn violation(&self) -> Option<String> {
        if validate_name(&self.name).is_err() {
            return Some(format!("{:?} is not a valid dataset name", self.name));
        }
        if !is_sha256(&self.sha256) {
            return Some(format!("{}: sha256 must be 64 hex digits", self.name));
        }
        // Sizes are int64 on the wire (and in the store).
        if self.size > i64::MAX as u64 || self.encoded_size > i64::MAX as u64 {
            return Some(format!("{}: sizes must be at most 2^63 - 1", self.name));
        }
        None
    }
}

fn is_sha256(text: &str) -> bool {
    text.len() == 64 && text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// `status.uplink` of a Dataset whose content an edge region's agent holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DatasetUplink {
    /// The region whose agent holds the original.
    pub region: String,
    pub encoding: UplinkEncoding,
    /// Bytes the uplink carries (`status.size` is the original's).
    pub encoded_size: u64,
    /// When a task in another region first asked for the content.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_time: Option<String>,
    /// The server's copy: sha256 of the encoded bytes, once they arrived.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encoded_sha256: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transfer_time: Option<String>,
    /// Seconds the server took to receive the encoded bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transfer_seconds: Option<f64>,
}

impl DatasetUplink {
    /// Bytes placement prices moving the content to another region with.
    pub fn moved_bytes(&self) -> u64 {
        self.encoded_size
    }
}

/// What a region's announcement of one dataset does to it.
#[derive(Debug, Clone, PartialEq)]
pub enum Announcement {
    Unchanged,
    /// The dataset takes this status.
    Adopt(DatasetStatus),
    /// Not taken, and why (told to the agent).
    Refuse(String),
}

/// What `region`'s agent announcing `held` does to a Dataset with `spec` and `status`. The
/// edge is the home of a dataset that declares it: its announcement replaces content that
/// was uploaded to the server; new content (another sha256) drops an earlier transfer.
pub fn announce(
    spec: &DatasetSpec,
    status: &DatasetStatus,
    deleting: bool,
    region: &str,
    held: &HeldDataset,
    now: &str,
) -> Announcement {
    if deleting {
        return Announcement::Refuse(format!("dataset {:?} is being deleted", held.name));
    }
    if spec.region.as_deref() != Some(region) {
        return Announcement::Refuse(format!(
            "dataset {:?} declares spec.region {:?}, not {region:?}",
            held.name,
            spec.region.as_deref().unwrap_or("")
        ));
    }
    let same_content = status.sha256.as_deref() == Some(held.sha256.as_str())
        && status.size == Some(held.size)
        && status.phase.as_deref() == Some("Ready");
    let here = status.uplink.as_ref().filter(|u| u.region == region);
    match here {
        Some(u)
            if same_content
                && u.encoding == held.encoding
                && u.encoded_size == held.encoded_size =>
        {
            Announcement::Unchanged
        }
        // The same content, encoded another way (the agent's --uplink-encoding changed): the
        // server's copy is stale, a pending request stands.
        Some(u) if same_content => Announcement::Adopt(DatasetStatus {
            uplink: Some(DatasetUplink {
                region: region.into(),
                encoding: held.encoding,
                encoded_size: held.encoded_size,
                request_time: u.request_time.clone(),
                encoded_sha256: None,
                transfer_time: None,
                transfer_seconds: None,
            }),
            ..status.clone()
        }),
        _ => Announcement::Adopt(DatasetStatus {
            phase: Some("Ready".into()),
            size: Some(held.size),
            sha256: Some(held.sha256.clone()),
            upload_time: Some(now.into()),
            uplink: Some(DatasetUplink {
                region: region.into(),
                encoding: held.encoding,
                encoded_size: held.encoded_size,
                request_time: None,
                encoded_sha256: None,
                transfer_time: None,
                transfer_seconds: None,
            }),
        }),
    }
}

/// The datasets `region`'s agent should send: asked for, not yet on the server.
pub fn uploads_wanted<'a>(
    datasets: impl IntoIterator<Item = (&'a str, &'a DatasetStatus)>,
    region: &str,
) -> Vec<String> {
    datasets
        .into_iter()
        .filter(|(_, status)| {
            status.uplink.as_ref().is_some_and(|u| {
                u.region == region && u.request_time.is_some() && u.encoded_sha256.is_none()
            })
        })
        .map(|(name, _)| name.to_string())
        .collect()
}

/// The status after a task asked for content its region's agent has not sent yet (`None`:
/// already asked, or the content is not at an edge).
pub fn requested(status: &DatasetStatus, now: &str) -> Option<DatasetStatus> {
    let uplink = status.uplink.as_ref()?;
    if uplink.request_time.is_some() || uplink.encoded_sha256.is_some() {
        return None;
    }
    Some(DatasetStatus {
        uplink: Some(DatasetUplink {
            request_time: Some(now.into()),
            ..uplink.clone()
        }),
        ..status.clone()
    })
}

// ---- the server -------------------------------------------------------------------------------

fn typed_status(object: &Value) -> DatasetStatus {
    serde_json::from_value(object["status"].clone()).unwrap_or_default()
}

fn with_status(mut object: Value, status: &DatasetStatus) -> Change {
    object["status"] = serde_json::to_value(status).unwrap_or_default();
    Change::Put(object)
}

/// Refuses a malformed announcement before anything of the heartbeat is recorded.
pub fn check_announcements(region: &str, held: &[HeldDataset]) -> Result<(), ApiError> {
    if held.len() > MAX_ANNOUNCED {
        return Err(ApiError::invalid(
            "Region",
            region,
            &[ceccm_federation::Violation::new(
                "datasets",
                "must hold at most 100 items",
            )],
        ));
    }
    if let Some(why) = held.iter().find_map(HeldDataset::violation) {
        return Err(ApiError::invalid(
            "Region",
            region,
            &[ceccm_federation::Violation::new("datasets", &why)],
        ));
    }
    Ok(())
}

/// Takes `region`'s announcements; answers what it should send and what it announced in
/// vain (with the reason).
pub async fn take_announcements(
    store: &Store,
    region: &str,
    held: &[HeldDataset],
) -> Result<(Vec<String>, Vec<String>), ApiError> {
    check_announcements(region, held)?;
    let mut refused = Vec::new();
    let now = crate::time::now_rfc3339();
    for h in held {
        let outcome = store
            .write(
                Kind::Dataset,
                &h.name,
                |current| -> Result<Change, ApiError> {
                    let Some(object) = current else {
                        return Err(ApiError::not_found("Dataset", &h.name));
                    };
                    let spec: DatasetSpec = serde_json::from_value(object["spec"].clone())
                        .unwrap_or(DatasetSpec {
                            format: None,
                            region: None,
                            description: None,
                        });
                    let deleting = object["metadata"]["deletionTimestamp"].is_string();
                    match announce(&spec, &typed_status(&object), deleting, region, h, &now) {
                        Announcement::Unchanged => Ok(Change::Keep),
                        Announcement::Adopt(status) => Ok(with_status(object, &status)),
                        Announcement::Refuse(why) => Err(ApiError::new(ErrorCode::Conflict, why)),
                    }
                },
            )
            .await;
        match outcome {
            Ok(_) => {}
            Err(e) if e.code == ErrorCode::NotFound => {
                refused.push(format!("dataset {:?} is not declared", h.name));
            }
            Err(e) if e.code == ErrorCode::Conflict => refused.push(e.message),
            Err(e) => return Err(e),
        }
    }
    let datasets: Vec<(String, DatasetStatus)> = store
        .list(Kind::Dataset, &Query::default())
        .await?
        .iter()
        .map(|d| {
            (
                d["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                typed_status(d),
            )
        })
        .collect();
    let wanted = uploads_wanted(datasets.iter().map(|(n, s)| (n.as_str(), s)), region);
    Ok((wanted, refused))
}

/// `GET /api/v1/datasets/{name}/content` of a dataset its edge holds: the server's encoded
/// copy with headers saying what it is, or 503 after asking the edge for it.
pub async fn serve_held(
    store: &Store,
    data_dir: &Path,
    name: &str,
    status: &DatasetStatus,
) -> Result<Response, ApiError> {
    let (Some(uplink), Some(sha256)) = (&status.uplink, &status.sha256) else {
        return Err(ApiError::new(
            ErrorCode::Internal,
            format!("dataset {name:?} is not held at an edge"),
        ));
    };
    if let Some(encoded) = &uplink.encoded_sha256 {
        let mut response = crate::content::stream_file(
            &crate::content::dataset_path(data_dir, name),
            &format!("content of dataset {name:?}"),
        )
        .await?;
        let headers = response.headers_mut();
        for (header, value) in [
            (ENCODING_HEADER, uplink.encoding.as_str()),
            (CONTENT_SHA256_HEADER, sha256.as_str()),
            (ENCODED_SHA256_HEADER, encoded.as_str()),
        ] {
            if let Ok(value) = HeaderValue::from_str(value) {
                headers.insert(header, value);
            }
        }
        return Ok(response);
    }
    let now = crate::time::now_rfc3339();
    store
        .write(Kind::Dataset, name, |current| -> Result<Change, ApiError> {
            let Some(object) = current else {
                return Err(ApiError::not_found("Dataset", name));
            };
            match requested(&typed_status(&object), &now) {
                Some(status) => Ok(with_status(object, &status)),
                None => Ok(Change::Keep),
            }
        })
        .await?;
    Err(ApiError::new(
        ErrorCode::Unavailable,
        format!(
            "the content of dataset {name:?} is at region {:?}; its agent was asked to send it \
             (try again shortly)",
            uplink.region
        ),
    )
    .with_details(serde_json::json!({"region": uplink.region})))
}

/// `PUT /api/v1/datasets/{name}/uplink`: the encoded copy `who` (the agent of the region
/// holding the dataset) sends. Checked against what was announced before it is kept.
pub async fn receive(
    store: &Store,
    config: &crate::api::ApiConfig,
    who: &Principal,
    name: &str,
    headers: &HeaderMap,
    body: Body,
) -> Result<Value, ApiError> {
    let started = Instant::now();
    let header = |h: &str| headers.get(h).and_then(|v| v.to_str().ok());
    let Some(encoding) = header(ENCODING_HEADER).and_then(UplinkEncoding::parse) else {
        return Err(ApiError::bad_request(format!(
            "{ENCODING_HEADER} must be tarsis or identity"
        )));
    };
    let Some(content) = header(CONTENT_SHA256_HEADER).filter(|s| is_sha256(s)) else {
        return Err(ApiError::bad_request(format!(
            "{CONTENT_SHA256_HEADER} must be the sha256 (64 hex digits) of the content sent"
        )));
    };
    let Some(object) = store.get(Kind::Dataset, name).await? else {
        return Err(ApiError::not_found("Dataset", name));
    };
    let status = typed_status(&object);
    let Some(uplink) = &status.uplink else {
        return Err(ApiError::new(
            ErrorCode::Conflict,
            format!("dataset {name:?} is not held by an agent"),
        ));
    };
    who.acts_for(&uplink.region)?;
    if status.sha256.as_deref() != Some(content) || uplink.encoding != encoding {
        return Err(ApiError::new(
            ErrorCode::Conflict,
            format!(
                "dataset {name:?} is now {} content {:.12}, not {} content {content:.12}",
                uplink.encoding.as_str(),
                status.sha256.as_deref().unwrap_or(""),
                encoding.as_str()
            ),
        ));
    }
    let dir = config.data_dir.join("datasets");
    tokio::fs::create_dir_all(&dir)
        .await
        .map_err(|e| ApiError::new(ErrorCode::Internal, format!("creating {dir:?}: {e}")))?;
    let tmp = dir.join(format!(".{name}.{}.uplink", uuid::Uuid::new_v4().simple()));
    let checked = async {
        let (size, sha256) = crate::content::receive(body, &tmp, config.max_upload_bytes).await?;
        check_representation(&tmp, encoding, content, &sha256).await?;
        Ok::<_, ApiError>((size, sha256))
    }
    .await;
    let (size, encoded_sha256) = match checked {
        Ok(done) => done,
        Err(e) => {
            let _ = tokio::fs::remove_file(&tmp).await;
            return Err(e);
        }
    };
    let seconds = started.elapsed().as_secs_f64();
    tokio::fs::rename(&tmp, crate::content::dataset_path(&config.data_dir, name))
        .await
        .map_err(|e| ApiError::new(ErrorCode::Internal, format!("storing the dataset: {e}")))?;
    let now = crate::time::now_rfc3339();
    let written =
        store
            .write(Kind::Dataset, name, |current| -> Result<Change, ApiError> {
                let Some(object) = current else {
                    return Err(ApiError::not_found("Dataset", name));
                };
                let mut status = typed_status(&object);
                // Announced anew while the bytes travelled: they are not the content now.
                let Some(u) = status.uplink.as_mut().filter(|u| {
                    u.encoding == encoding && status.sha256.as_deref() == Some(content)
                }) else {
                    return Err(ApiError::new(
                        ErrorCode::Conflict,
                        format!("dataset {name:?} changed while its content was sent"),
                    ));
                };
                u.encoded_size = size;
                u.encoded_sha256 = Some(encoded_sha256.clone());
                u.transfer_time = Some(now.clone());
                u.transfer_seconds = Some(seconds);
                Ok(with_status(object, &status))
            })
            .await?;
    Ok(written.object.unwrap_or(Value::Null))
}

/// Refuses bytes that cannot be what the header says: an identity copy must hash to the
/// content, a TARSIS copy must be a readable container.
async fn check_representation(
    path: &Path,
    encoding: UplinkEncoding,
    content: &str,
    sha256: &str,
) -> Result<(), ApiError> {
    let invalid = |message: String| ApiError::new(ErrorCode::Invalid, message);
    match encoding {
        UplinkEncoding::Identity if sha256 != content => Err(invalid(format!(
            "the bytes hash to {sha256}, not to the content's {content}"
        ))),
        UplinkEncoding::Identity => Ok(()),
        UplinkEncoding::Tarsis => {
            let path = path.to_path_buf();
            tokio::task::spawn_blocking(move || {
                let file = std::fs::File::open(&path).map_err(|e| e.to_string())?;
                ::astro_fit::edge::container::ContainerReader::new(std::io::BufReader::new(file))
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            })
            .await
            .map_err(|e| invalid(e.to_string()))?
            .map_err(|e| invalid(format!("not a TARSIS container: {e}")))
        }
    }
}

// ---- the agent --------------------------------------------------------------------------------

/// What the agent knows of one file of its datasets directory.
struct Known {
    modified: SystemTime,
    len: u64,
    held: HeldDataset,
    /// What goes on the uplink: the encoded copy, or the original.
    send: PathBuf,
}

/// An agent's datasets: the files in its datasets directory, hashed, linked into its cache
/// (where its workers find them by sha256) and encoded for the uplink once per content.
pub struct EdgeDatasets {
    dir: PathBuf,
    cache: PathBuf,
    encoding: UplinkEncoding,
    known: HashMap<String, Known>,
}

impl EdgeDatasets {
    pub fn new(dir: PathBuf, cache: PathBuf, encoding: UplinkEncoding) -> Self {
        EdgeDatasets {
            dir,
            cache,
            encoding,
            known: HashMap::new(),
        }
    }

    /// Looks at the directory again; new or changed files are hashed and encoded (blocking:
    /// call it off the async workers). Hidden files (being written) are skipped.
    pub fn scan(&mut self) -> Vec<HeldDataset> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            self.known.clear();
            return Vec::new();
        };
        let mut seen = Vec::new();
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Ok(meta) = entry.metadata() else { continue };
            if name.starts_with('.') || !meta.is_file() {
                continue;
            }
            if validate_name(&name).is_err() {
                tracing::warn!(file = name, "not a valid dataset name; skipped");
                continue;
            }
            let modified = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
            let fresh = self
                .known
                .get(&name)
                .is_some_and(|k| k.modified == modified && k.len == meta.len());
            if !fresh {
                match self.take(&entry.path(), &name) {
                    Ok((held, send)) => {
                        tracing::info!(
                            dataset = name,
                            bytes = held.size,
                            uplink_bytes = held.encoded_size,
                            encoding = held.encoding.as_str(),
                            "holding dataset"
                        );
                        self.known.insert(
                            name.clone(),
                            Known {
                                modified,
                                len: meta.len(),
                                held,
                                send,
                            },
                        );
                    }
                    Err(e) => {
                        tracing::warn!(dataset = name, error = %e, "cannot take the dataset");
                        self.known.remove(&name);
                        continue;
                    }
                }
            }
            seen.push(name);
        }
        self.known.retain(|name, _| seen.contains(name));
        let mut held: Vec<HeldDataset> = self.known.values().map(|k| k.held.clone()).collect();
        held.sort_by(|a, b| a.name.cmp(&b.name));
        held
    }

    /// The file to send for `name`, with what it is.
    pub fn to_send(&self, name: &str) -> Option<(PathBuf, HeldDataset)> {
        self.known
            .get(name)
            .map(|k| (k.send.clone(), k.held.clone()))
    }

    fn take(&self, path: &Path, name: &str) -> Result<(HeldDataset, PathBuf), String> {
        let (sha256, size) = crate::content::sha256_file(path).map_err(|e| e.to_string())?;
        std::fs::create_dir_all(&self.cache).map_err(|e| e.to_string())?;
        let cached = self.cache.join(&sha256);
        if !cached.exists() {
            let tmp = self
                .cache
                .join(format!("{sha256}.{}.take", std::process::id()));
            std::fs::hard_link(path, &tmp)
                .or_else(|_| std::fs::copy(path, &tmp).map(|_| ()))
                .and_then(|_| std::fs::rename(&tmp, &cached))
                .map_err(|e| format!("putting it into the cache: {e}"))?;
        }
        let (encoding, send) = match self.encoding {
            UplinkEncoding::Identity => (UplinkEncoding::Identity, cached),
            UplinkEncoding::Tarsis => match encode_tarsis(&cached, &self.cache, &sha256) {
                Ok(encoded) => (UplinkEncoding::Tarsis, encoded),
                Err(e) => {
                    tracing::info!(dataset = name, reason = %e, "not a cube: sent as it is");
                    (UplinkEncoding::Identity, cached)
                }
            },
        };
        let encoded_size = std::fs::metadata(&send).map_err(|e| e.to_string())?.len();
        Ok((
            HeldDataset {
                name: name.into(),
                sha256,
                size,
                encoding,
                encoded_size,
            },
            send,
        ))
    }
}

/// TARSIS-compresses the cube `source` (content `sha256`) into the cache, once.
fn encode_tarsis(source: &Path, cache: &Path, sha256: &str) -> Result<PathBuf, String> {
    use ::astro_fit::edge::container::{CompressOptions, compress};
    let target = cache.join(format!("{sha256}.tarsis"));
    if target.exists() {
        return Ok(target);
    }
    let cube = ::astro_fit::edge::io::read_fits_cube(source).map_err(|e| e.to_string())?;
    let tmp = cache.join(format!("{sha256}.{}.tarsis.part", std::process::id()));
    let written = (|| {
        let mut out = std::io::BufWriter::new(std::fs::File::create(&tmp)?);
        compress(&cube, &CompressOptions::default(), &mut out)
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        std::io::Write::flush(&mut out)?;
        drop(out);
        std::fs::rename(&tmp, &target)
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(format!("compressing: {e}"));
    }
    Ok(target)
}

/// Sends `name`'s uplink copy to the server.
pub async fn send(
    client: &reqwest::Client,
    server: &str,
    name: &str,
    path: &Path,
    held: &HeldDataset,
) -> anyhow::Result<DatasetStatus> {
    let file = tokio::fs::File::open(path).await?;
    let response = client
        .put(format!("{server}/api/v1/datasets/{name}/uplink"))
        .header("content-type", "application/octet-stream")
        .header("content-length", held.encoded_size)
        .header(ENCODING_HEADER, held.encoding.as_str())
        .header(CONTENT_SHA256_HEADER, &held.sha256)
        .body(reqwest::Body::from(file))
        .send()
        .await?;
    let status = response.status();
    if !status.is_success() {
        let body = response.text().await.unwrap_or_default();
        anyhow::bail!("the server answered {status}: {body}");
    }
    let object: Value = response.json().await?;
    Ok(typed_status(&object))
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    const B: &str = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";

    fn spec(region: Option<&str>) -> DatasetSpec {
        DatasetSpec {
            format: Some("manga-logcube".into()),
            region: region.map(str::to_string),
            description: None,
        }
    }

    fn held(sha256: &str, encoding: UplinkEncoding, encoded_size: u64) -> HeldDataset {
        HeldDataset {
            name: "cube".into(),
            sha256: sha256.into(),
            size: 1000,
            encoding,
            encoded_size,
        }
    }

    fn adopted(a: Announcement) -> DatasetStatus {
        match a {
            Announcement::Adopt(status) => status,
            other => panic!("expected Adopt, got {other:?}"),
        }
    }

    #[test]
    fn the_home_region_announces_content_and_a_repeat_changes_nothing() {
        let h = held(A, UplinkEncoding::Tarsis, 60);
        let status = adopted(announce(
            &spec(Some("edge")),
            &DatasetStatus::default(),
            false,
            "edge",
            &h,
            "t0",
        ));
        assert_eq!(status.phase.as_deref(), Some("Ready"));
        assert_eq!(status.sha256.as_deref(), Some(A));
        assert_eq!(status.size, Some(1000));
        let uplink = status.uplink.clone().unwrap();
        assert_eq!((uplink.region.as_str(), uplink.encoded_size), ("edge", 60));
        assert_eq!(uplink.moved_bytes(), 60);
        assert_eq!(
            announce(&spec(Some("edge")), &status, false, "edge", &h, "t1"),
            Announcement::Unchanged
        );
    }

    #[test]
    fn another_region_or_a_dataset_being_deleted_is_refused() {
        let h = held(A, UplinkEncoding::Tarsis, 60);
        let other = announce(
            &spec(Some("cloud")),
            &DatasetStatus::default(),
            false,
            "edge",
            &h,
            "t",
        );
        assert!(matches!(other, Announcement::Refuse(ref why) if why.contains("\"cloud\"")));
        let undeclared = announce(
            &spec(None),
            &DatasetStatus::default(),
            false,
            "edge",
            &h,
            "t",
        );
        assert!(matches!(undeclared, Announcement::Refuse(_)));
        let deleting = announce(
            &spec(Some("edge")),
            &DatasetStatus::default(),
            true,
            "edge",
            &h,
            "t",
        );
        assert!(matches!(deleting, Announcement::Refuse(ref why) if why.contains("deleted")));
    }

    #[test]
    fn a_request_becomes_an_order_until_the_copy_arrives_and_new_content_starts_over() {
        let h = held(A, UplinkEncoding::Tarsis, 60);
        let announced = adopted(announce(
            &spec(Some("edge")),
            &DatasetStatus::default(),
            false,
            "edge",
            &h,
            "t0",
        ));
        assert!(uploads_wanted([("cube", &announced)], "edge").is_empty());
        let asked = requested(&announced, "t1").expect("first request marks it");
        assert_eq!(requested(&asked, "t2"), None, "asked once");
        assert_eq!(uploads_wanted([("cube", &asked)], "edge"), vec!["cube"]);
        assert!(uploads_wanted([("cube", &asked)], "cloud").is_empty());
        let mut arrived = asked.clone();
        arrived.uplink.as_mut().unwrap().encoded_sha256 = Some(B.into());
        assert!(uploads_wanted([("cube", &arrived)], "edge").is_empty());
        assert_eq!(requested(&arrived, "t3"), None);
        // The same content encoded another way: the copy is stale, the request stands.
        let identity = adopted(announce(
            &spec(Some("edge")),
            &arrived,
            false,
            "edge",
            &held(A, UplinkEncoding::Identity, 1000),
            "t4",
        ));
        let u = identity.uplink.clone().unwrap();
        assert_eq!(
            (u.encoded_sha256, u.request_time),
            (None, Some("t1".into()))
        );
        assert_eq!(uploads_wanted([("cube", &identity)], "edge"), vec!["cube"]);
        // New content: pinned anew, nothing asked for yet.
        let renewed = adopted(announce(
            &spec(Some("edge")),
            &arrived,
            false,
            "edge",
            &held(B, UplinkEncoding::Tarsis, 70),
            "t5",
        ));
        assert_eq!(renewed.sha256.as_deref(), Some(B));
        assert_eq!(renewed.upload_time.as_deref(), Some("t5"));
        assert!(uploads_wanted([("cube", &renewed)], "edge").is_empty());
    }

    #[test]
    fn content_on_the_server_is_not_asked_of_an_edge() {
        let uploaded = DatasetStatus {
            phase: Some("Ready".into()),
            size: Some(10),
            sha256: Some(A.into()),
            upload_time: Some("t".into()),
            uplink: None,
        };
        assert_eq!(requested(&uploaded, "t1"), None);
        assert!(uploads_wanted([("cube", &uploaded)], "edge").is_empty());
    }

    #[test]
    fn announcements_name_what_is_wrong() {
        let mut h = held(A, UplinkEncoding::Tarsis, 1);
        assert_eq!(h.violation(), None);
        h.sha256 = "xyz".into();
        assert!(h.violation().unwrap().contains("sha256"));
        h.sha256 = A.into();
        h.size = 1 << 63;
        assert!(h.violation().unwrap().contains("2^63"));
        h.size = 1;
        h.name = "Not_A_Name".into();
        assert!(h.violation().unwrap().contains("not a valid dataset name"));
    }
}

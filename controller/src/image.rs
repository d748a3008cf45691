//! Images without a registry: an OCI image layout (`DATA_DIR/images`, the layout `skopeo` and
//! `umoci` read) holding images built from this project's own binaries.
//!
//! `ceccm image build astro-fit` makes the astro-fit worker image `FROM scratch`: one layer with
//! the `ceccm` binary (which runs astro-fit's stages and the container probe), `astro-fit` when
//! it sits beside it, the shared libraries they load (from `ldd`), and a minimal `/etc`. Layers
//! are written with fixed owners and times, so the same binaries give the same digest.
//! A runtime unpacks an image once into `DATA_DIR/images/unpacked/DIGEST` and runs containers
//! on that root file system, read-only.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The image astro-fit applications run in unless they name another.
pub const ASTRO_FIT_IMAGE: &str = "astro-fit";
/// Where the image puts the `ceccm` binary.
pub const CECCM_IN_IMAGE: &str = "/usr/local/bin/ceccm";

const REF_NAME: &str = "org.opencontainers.image.ref.name";
const MANIFEST_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
const CONFIG_TYPE: &str = "application/vnd.oci.image.config.v1+json";
const LAYER_TYPE: &str = "application/vnd.oci.image.layer.v1.tar";
const INDEX_TYPE: &str = "application/vnd.oci.image.index.v1+json";

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("image {0:?} is not in the image store (build it: ceccm image build astro-fit)")]
    NotFound(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the image store is corrupt: {0}")]
    Corrupt(String),
    #[error("{0}")]
    Invalid(String),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ImageError {
    let what = what.into();
    move |source| ImageError::Io { what, source }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    pub media_type: String,
    pub digest: String,
    pub size: u64,
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub annotations: std::collections::BTreeMap<String, String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Index {
    schema_version: u32,
    #[serde(default)]
    manifests: Vec<Descriptor>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Manifest {
    schema_version: u32,
    media_type: String,
    config: Descriptor,
    layers: Vec<Descriptor>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct ImageConfig {
    architecture: String,
    os: String,
    config: RunConfig,
    rootfs: RootFs,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct RunConfig {
    entrypoint: Vec<String>,
    env: Vec<String>,
    working_dir: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct RootFs {
    #[serde(rename = "type")]
    kind: String,
    diff_ids: Vec<String>,
}

/// An OCI image layout on disk.
pub struct ImageStore {
    dir: PathBuf,
}

impl ImageStore {
    pub fn new(dir: PathBuf) -> ImageStore {
        ImageStore { dir }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn blob(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
        self.dir.join("blobs/sha256").join(hex)
    }

    fn put_blob(&self, bytes: &[u8]) -> Result<String, ImageError> {
        let digest = format!("sha256:{}", hex::encode(Sha256::digest(bytes)));
        let path = self.blob(&digest);
        if !path.exists() {
            write_atomically(&path, bytes)?;
        }
        Ok(digest)
    }

    fn index(&self) -> Result<Index, ImageError> {
        match std::fs::read(self.dir.join("index.json")) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| ImageError::Corrupt(format!("index.json: {e}"))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Index {
                schema_version: 2,
                manifests: Vec::new(),
            }),
            Err(e) => Err(io("reading index.json")(e)),
        }
    }

    /// The manifest named `reference` (`NAME:TAG`, or `NAME` for its latest tag).
    pub fn resolve(&self, reference: &str) -> Result<Descriptor, ImageError> {
        let index = self.index()?;
        let wanted = |d: &&Descriptor| {
            d.annotations.get(REF_NAME).is_some_and(|name| {
                name == reference || name.split_once(':').is_some_and(|(n, _)| n == reference)
            })
        };
        index
            .manifests
            .iter()
            .rev()
            .find(wanted)
            .cloned()
            .ok_or_else(|| ImageError::NotFound(reference.to_string()))
    }

    /// Adds `manifest` under `reference`, replacing what the name held.
    fn tag(&self, reference: &str, mut manifest: Descriptor) -> Result<(), ImageError> {
        std::fs::create_dir_all(&self.dir).map_err(io("creating the image store"))?;
        let layout = self.dir.join("oci-layout");
        if !layout.exists() {
            write_atomically(&layout, br#"{"imageLayoutVersion":"1.0.0"}"#)?;
        }
        let mut index = self.index()?;
        index
            .manifests
            .retain(|d| d.annotations.get(REF_NAME).map(String::as_str) != Some(reference));
        manifest
            .annotations
            .insert(REF_NAME.into(), reference.into());
        index.manifests.push(manifest);
        let bytes = serde_json::to_vec_pretty(&index).expect("the index serialises");
        write_atomically(&self.dir.join("index.json"), &bytes)
    }

    /// Takes the images of `archive`: an OCI image layout as a tar (`skopeo copy
    /// oci-archive:`, `buildah push ... oci-archive:`) or a `docker save` tarball, either
    /// possibly gzipped. Every blob is checked against its digest before anything is tagged: a
    /// damaged archive changes nothing. `tag` names the image when the archive holds one and
    /// names none (or renames it). Answers each reference taken and its manifest.
    pub fn import(
        &self,
        archive: &Path,
        tag: Option<&str>,
    ) -> Result<Vec<(String, Descriptor)>, ImageError> {
        std::fs::create_dir_all(&self.dir).map_err(io("creating the image store"))?;
        let unpacked = tempfile::Builder::new()
            .prefix(".import-")
            .tempdir_in(&self.dir)
            .map_err(io("making room to unpack the archive"))?;
        let file = File::open(archive).map_err(io(format!("reading {}", archive.display())))?;
        let reader: Box<dyn Read> = if is_gzip(archive) {
            Box::new(flate2::read::GzDecoder::new(file))
        } else {
            Box::new(file)
        };
        // `unpack` keeps every entry inside the directory (no `..`, no absolute paths).
        tar::Archive::new(reader)
            .unpack(unpacked.path())
            .map_err(|e| {
                ImageError::Invalid(format!(
                    "{} is not a tar archive of an image: {e}",
                    archive.display()
                ))
            })?;
        let root = unpacked.path();
        let found = if root.join("oci-layout").exists() {
            self.take_oci_layout(root)?
        } else if root.join("manifest.json").exists() {
            self.take_docker_save(root)?
        } else {
            return Err(ImageError::Invalid(format!(
                "{} holds neither an OCI image layout (oci-layout) nor a docker save \
                 (manifest.json)",
                archive.display()
            )));
        };
        let named: Vec<(String, Descriptor)> = match (tag, found.as_slice()) {
            (Some(tag), [(_, manifest)]) => vec![(tag.to_string(), manifest.clone())],
            (Some(_), _) => {
                return Err(ImageError::Invalid(format!(
                    "--tag names one image and the archive holds {}",
                    found.len()
                )));
            }
            (None, _) => found
                .into_iter()
                .map(|(name, manifest)| {
                    name.map(|n| (n, manifest)).ok_or_else(|| {
                        ImageError::Invalid(
                            "an image in the archive has no name: give --tag".into(),
                        )
                    })
                })
                .collect::<Result<_, _>>()?,
        };
        for (name, _) in &named {
            if !valid_reference(name) {
                return Err(ImageError::Invalid(format!(
                    "{name:?} is not an image reference (NAME[:TAG], lower-case name)"
                )));
            }
        }
        for (name, manifest) in &named {
            self.tag(name, manifest.clone())?;
        }
        Ok(named)
    }

    /// An OCI layout's manifests (an image index inside is followed to its linux/amd64
    /// manifest), each blob copied in once checked.
    fn take_oci_layout(
        &self,
        root: &Path,
    ) -> Result<Vec<(Option<String>, Descriptor)>, ImageError> {
        let index: Index = read_json(&root.join("index.json"))?;
        let mut found = Vec::new();
        for entry in index.manifests {
            let name = entry.annotations.get(REF_NAME).cloned();
            let manifest = if entry.media_type == INDEX_TYPE {
                let inner: Index = read_json(&layout_blob(root, &entry.digest)?)?;
                inner
                    .manifests
                    .into_iter()
                    .find(|m| m.media_type == MANIFEST_TYPE)
                    .ok_or_else(|| {
                        ImageError::Invalid(format!("index {} has no image manifest", entry.digest))
                    })?
            } else {
                entry
            };
            let path = layout_blob(root, &manifest.digest)?;
            let parsed: Manifest = read_json(&path)?;
            for blob in std::iter::once(&parsed.config).chain(&parsed.layers) {
                self.put_checked_blob(&layout_blob(root, &blob.digest)?, &blob.digest)?;
            }
            self.put_checked_blob(&path, &manifest.digest)?;
            found.push((
                name,
                Descriptor {
                    annotations: Default::default(),
                    ..manifest
                },
            ));
        }
        Ok(found)
    }

    /// A `docker save` tarball's images as OCI manifests: its config and layer files become
    /// blobs, each `RepoTags` entry a name.
    fn take_docker_save(
        &self,
        root: &Path,
    ) -> Result<Vec<(Option<String>, Descriptor)>, ImageError> {
        #[derive(Deserialize)]
        #[serde(rename_all = "PascalCase")]
        struct Saved {
            config: String,
            #[serde(default)]
            repo_tags: Option<Vec<String>>,
            layers: Vec<String>,
        }
        let saved: Vec<Saved> = read_json(&root.join("manifest.json"))?;
        let mut found = Vec::new();
        for image in saved {
            let config = self.put_file_blob(&inside(root, &image.config)?, CONFIG_TYPE)?;
            let mut layers = Vec::new();
            for layer in &image.layers {
                let path = inside(root, layer)?;
                let media_type = if is_gzip(&path) {
                    format!("{LAYER_TYPE}+gzip")
                } else {
                    LAYER_TYPE.to_string()
                };
                layers.push(self.put_file_blob(&path, &media_type)?);
            }
            let descriptor = self.put_manifest(config, layers)?;
            match image.repo_tags.unwrap_or_default() {
                tags if tags.is_empty() => found.push((None, descriptor)),
                tags => found.extend(tags.into_iter().map(|t| (Some(t), descriptor.clone()))),
            }
        }
        Ok(found)
    }

    /// Stores the image manifest of `config` and `layers`; answers its descriptor.
    fn put_manifest(
        &self,
        config: Descriptor,
        layers: Vec<Descriptor>,
    ) -> Result<Descriptor, ImageError> {
        let manifest = Manifest {
            schema_version: 2,
            media_type: MANIFEST_TYPE.into(),
            config,
            layers,
        };
        let bytes = serde_json::to_vec(&manifest).expect("the manifest serialises");
        Ok(Descriptor {
            media_type: MANIFEST_TYPE.into(),
            size: bytes.len() as u64,
            digest: self.put_blob(&bytes)?,
            annotations: Default::default(),
        })
    }

    /// Copies `path` in as the blob `digest`, once its content hashes to it.
    fn put_checked_blob(&self, path: &Path, digest: &str) -> Result<(), ImageError> {
        let stored = self.put_file_blob(path, "")?;
        if stored.digest != digest {
            return Err(ImageError::Invalid(format!(
                "blob {digest} holds content of digest {}: the archive is damaged",
                stored.digest
            )));
        }
        Ok(())
    }

    /// Stores the file at `path` as a blob, streamed and hashed; answers its descriptor.
    fn put_file_blob(&self, path: &Path, media_type: &str) -> Result<Descriptor, ImageError> {
        let blobs = self.dir.join("blobs/sha256");
        std::fs::create_dir_all(&blobs).map_err(io("creating the image store"))?;
        let tmp = tempfile::NamedTempFile::new_in(&blobs).map_err(io("writing a blob"))?;
        let mut source = File::open(path).map_err(|e| {
            ImageError::Invalid(format!("the archive lacks {}: {e}", path.display()))
        })?;
        let mut hashing = HashingWriter::new(tmp.reopen().map_err(io("writing a blob"))?);
        std::io::copy(&mut source, &mut hashing).map_err(io("writing a blob"))?;
        let (file, hex, size) = hashing.finish();
        let digest = format!("sha256:{hex}");
        let target = self.blob(&digest);
        if !target.exists() {
            file.sync_all().map_err(io("writing a blob"))?;
            tmp.persist(&target)
                .map_err(|e| io("storing a blob")(e.error))?;
        }
        Ok(Descriptor {
            media_type: media_type.into(),
            digest,
            size,
            annotations: Default::default(),
        })
    }

    /// Builds the astro-fit image from `ceccm` (this program) and its neighbours.
    pub fn build_astro_fit(&self, ceccm: &Path, version: &str) -> Result<Descriptor, ImageError> {
        let mut files: Vec<(PathBuf, PathBuf)> = vec![(ceccm.into(), CECCM_IN_IMAGE.into())];
        if let Some(astro_fit) = ceccm.parent().map(|d| d.join("astro-fit"))
            && astro_fit.exists()
        {
            files.push((astro_fit, "/usr/local/bin/astro-fit".into()));
        }
        let mut libraries: Vec<PathBuf> = Vec::new();
        for (binary, _) in &files {
            for library in shared_libraries(binary)? {
                if !libraries.contains(&library) {
                    libraries.push(library);
                }
            }
        }
        files.extend(libraries.into_iter().map(|l| (l.clone(), l)));
        let etc = [
            (
                "etc/passwd",
                "root:x:0:0:root:/:/sbin/nologin\nnobody:x:65534:65534:nobody:/:/sbin/nologin\n",
            ),
            ("etc/group", "root:x:0:\nnobody:x:65534:\n"),
        ];
        let layer = self.layer(&files, &etc)?;
        let config = ImageConfig {
            architecture: "amd64".into(),
            os: "linux".into(),
            config: RunConfig {
                entrypoint: vec![CECCM_IN_IMAGE.into()],
                env: vec!["PATH=/usr/local/bin".into()],
                working_dir: "/".into(),
            },
            rootfs: RootFs {
                kind: "layers".into(),
                diff_ids: vec![layer.digest.clone()],
            },
        };
        let config_bytes = serde_json::to_vec(&config).expect("the config serialises");
        let config = Descriptor {
            media_type: CONFIG_TYPE.into(),
            size: config_bytes.len() as u64,
            digest: self.put_blob(&config_bytes)?,
            annotations: Default::default(),
        };
        let descriptor = self.put_manifest(config, vec![layer])?;
        self.tag(&format!("{ASTRO_FIT_IMAGE}:{version}"), descriptor.clone())?;
        Ok(descriptor)
    }

    /// One uncompressed layer of `files` (host path, path in the image) and small text files.
    fn layer(
        &self,
        files: &[(PathBuf, PathBuf)],
        texts: &[(&str, &str)],
    ) -> Result<Descriptor, ImageError> {
        let blobs = self.dir.join("blobs/sha256");
        std::fs::create_dir_all(&blobs).map_err(io("creating the image store"))?;
        let tmp = blobs.join(format!(".layer.{}.part", std::process::id()));
        let file = File::create(&tmp).map_err(io("writing a layer"))?;
        let mut tar = tar::Builder::new(HashingWriter::new(file));
        tar.mode(tar::HeaderMode::Deterministic);
        let mut dirs: Vec<String> = ["tmp", "in", "out", "templates", "proc", "dev", "sys", "etc"]
            .iter()
            .map(|d| d.to_string())
            .collect();
        for (_, inside) in files {
            let mut parent = inside.parent();
            while let Some(p) = parent.filter(|p| *p != Path::new("/")) {
                let d = p.to_string_lossy().trim_start_matches('/').to_string();
                if !dirs.contains(&d) {
                    dirs.push(d);
                }
                parent = p.parent();
            }
        }
        dirs.sort();
        for dir in &dirs {
            let mut header = tar::Header::new_gnu();
            header.set_entry_type(tar::EntryType::Directory);
            header.set_mode(if dir == "tmp" { 0o1777 } else { 0o755 });
            header.set_size(0);
            tar.append_data(&mut header, format!("{dir}/"), std::io::empty())
                .map_err(io("writing a layer"))?;
        }
        for (host, inside) in files {
            let name = inside.to_string_lossy().trim_start_matches('/').to_string();
            let mut source = File::open(host).map_err(io(format!("reading {}", host.display())))?;
            let meta = source
                .metadata()
                .map_err(io(format!("reading {}", host.display())))?;
            let mut header = tar::Header::new_gnu();
            header.set_size(meta.len());
            header.set_mode(0o755);
            tar.append_data(&mut header, name, &mut source)
                .map_err(io("writing a layer"))?;
        }
        for (name, text) in texts {
            let mut header = tar::Header::new_gnu();
            header.set_size(text.len() as u64);
            header.set_mode(0o644);
            tar.append_data(&mut header, name, text.as_bytes())
                .map_err(io("writing a layer"))?;
        }
        let hashing = tar.into_inner().map_err(io("writing a layer"))?;
        let (file, digest, size) = hashing.finish();
        file.sync_all().map_err(io("writing a layer"))?;
        let digest = format!("sha256:{digest}");
        std::fs::rename(&tmp, self.blob(&digest)).map_err(io("storing a layer"))?;
        Ok(Descriptor {
            media_type: LAYER_TYPE.into(),
            digest,
            size,
            annotations: Default::default(),
        })
    }

    /// The root file system of `reference`, unpacked once (under a lock) and kept.
    pub fn rootfs(&self, reference: &str) -> Result<PathBuf, ImageError> {
        let manifest = self.resolve(reference)?;
        let hex = manifest.digest.trim_start_matches("sha256:").to_string();
        let unpacked = self.dir.join("unpacked");
        let target = unpacked.join(&hex);
        if target.exists() {
            return Ok(target);
        }
        std::fs::create_dir_all(&unpacked).map_err(io("creating the unpacked images"))?;
        let lock =
            File::create(unpacked.join(format!("{hex}.lock"))).map_err(io("locking the image"))?;
        lock.lock().map_err(io("locking the image"))?;
        if target.exists() {
            return Ok(target);
        }
        let manifest: Manifest = serde_json::from_slice(
            &std::fs::read(self.blob(&manifest.digest)).map_err(io("reading the manifest"))?,
        )
        .map_err(|e| ImageError::Corrupt(format!("manifest {}: {e}", manifest.digest)))?;
        let tmp = unpacked.join(format!(".{hex}.part"));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).map_err(io("unpacking the image"))?;
        for layer in &manifest.layers {
            let file = File::open(self.blob(&layer.digest))
                .map_err(io(format!("reading layer {}", layer.digest)))?;
            let reader: Box<dyn Read> = if layer.media_type.ends_with("+gzip") {
                Box::new(flate2::read::GzDecoder::new(file))
            } else {
                Box::new(file)
            };
            let mut archive = tar::Archive::new(reader);
            archive.set_preserve_permissions(true);
            archive
                .unpack(&tmp)
                .map_err(io(format!("unpacking layer {}", layer.digest)))?;
        }
        std::fs::rename(&tmp, &target).map_err(io("storing the unpacked image"))?;
        Ok(target)
    }
}

/// Whether `name` may name an image here (the pattern `ApplicationSpec.image` accepts).
fn valid_reference(name: &str) -> bool {
    let (repository, tag) = match name.rsplit_once(':') {
        Some((r, t)) if !r.is_empty() && !t.contains('/') => (r, Some(t)),
        _ => (name, None),
    };
    let first_ok = repository
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    first_ok
        && repository.len() <= 128
        && repository
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "._/-".contains(c))
        && tag.is_none_or(|t| {
            (1..=128).contains(&t.len())
                && t.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
        })
}

/// Whether the file starts with gzip's magic number.
pub(crate) fn is_gzip(path: &Path) -> bool {
    let mut magic = [0u8; 2];
    File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok()
        && magic == [0x1f, 0x8b]
}

/// A path the archive names, kept inside it.
fn inside(root: &Path, name: &str) -> Result<PathBuf, ImageError> {
    let relative = Path::new(name);
    if relative.is_absolute()
        || relative
            .components()
            .any(|c| matches!(c, std::path::Component::ParentDir))
    {
        return Err(ImageError::Invalid(format!(
            "the archive names {name:?}, outside itself"
        )));
    }
    Ok(root.join(relative))
}

/// The blob `digest` of the OCI layout at `root`.
fn layout_blob(root: &Path, digest: &str) -> Result<PathBuf, ImageError> {
    match digest.strip_prefix("sha256:") {
        Some(hex) if hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()) => {
            Ok(root.join("blobs/sha256").join(hex))
        }
        _ => Err(ImageError::Invalid(format!(
            "{digest:?} is not a sha256 digest"
        ))),
    }
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, ImageError> {
    let bytes = std::fs::read(path)
        .map_err(|e| ImageError::Invalid(format!("the archive lacks {}: {e}", path.display())))?;
    serde_json::from_slice(&bytes)
        .map_err(|e| ImageError::Invalid(format!("{} is malformed: {e}", path.display())))
}

/// The shared libraries `binary` loads, as `ldd` lists them (a static binary has none).
fn shared_libraries(binary: &Path) -> Result<Vec<PathBuf>, ImageError> {
    let output = std::process::Command::new("ldd")
        .arg(binary)
        .output()
        .map_err(io("running ldd"))?;
    let text = String::from_utf8_lossy(&output.stdout);
    Ok(text
        .lines()
        .filter_map(|line| {
            let path = match line.split_once("=>") {
                Some((_, rest)) => rest.split_whitespace().next()?,
                None => line.split_whitespace().next()?,
            };
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect())
}

fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), ImageError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
    let tmp = dir.join(format!(
        ".{}.{}.part",
        path.file_name().unwrap_or_default().to_string_lossy(),
        std::process::id()
    ));
    let mut file = File::create(&tmp).map_err(io(format!("writing {}", path.display())))?;
    file.write_all(bytes)
        .and_then(|_| file.sync_all())
        .map_err(io(format!("writing {}", path.display())))?;
    std::fs::rename(&tmp, path).map_err(io(format!("storing {}", path.display())))
}

/// Counts and hashes what goes through it.
struct HashingWriter {
    inner: File,
    hasher: Sha256,
    size: u64,
}

impl HashingWriter {
    fn new(inner: File) -> Self {
        HashingWriter {
            inner,
            hasher: Sha256::new(),
            size: 0,
        }
    }

    fn finish(self) -> (File, String, u64) {
        (self.inner, hex::encode(self.hasher.finalize()), self.size)
    }
}

impl Write for HashingWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.size += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tar of `dir`'s files (names relative to it), gzipped when asked.
    fn tar_of(dir: &Path, out: &Path, gzip: bool) {
        let file = File::create(out).unwrap();
        let writer: Box<dyn Write> = if gzip {
            Box::new(flate2::write::GzEncoder::new(
                file,
                flate2::Compression::fast(),
            ))
        } else {
            Box::new(file)
        };
        let mut tar = tar::Builder::new(writer);
        tar.append_dir_all(".", dir).unwrap();
        tar.into_inner().unwrap().flush().unwrap();
    }

    /// A one-layer image holding `hello.txt`, in the store at `dir`, tagged `name`.
    fn small_image(dir: &Path, name: &str) -> Descriptor {
        let store = ImageStore::new(dir.to_path_buf());
        let layer = store.layer(&[], &[("hello.txt", "hello\n")]).unwrap();
        let config = br#"{"architecture":"amd64","os":"linux","config":{},"rootfs":{"type":"layers","diff_ids":[]}}"#;
        let config = Descriptor {
            media_type: CONFIG_TYPE.into(),
            size: config.len() as u64,
            digest: store.put_blob(config).unwrap(),
            annotations: Default::default(),
        };
        let descriptor = store.put_manifest(config, vec![layer]).unwrap();
        store.tag(name, descriptor.clone()).unwrap();
        descriptor
    }

    #[test]
    fn an_oci_archive_is_imported_and_runs_from_its_layers() {
        let dir = tempfile::tempdir().unwrap();
        let made = small_image(&dir.path().join("elsewhere"), "example/hello:1");
        let archive = dir.path().join("hello.oci.tar.gz");
        tar_of(&dir.path().join("elsewhere"), &archive, true);
        let store = ImageStore::new(dir.path().join("images"));
        let taken = store.import(&archive, None).unwrap();
        assert_eq!(taken.len(), 1);
        assert_eq!(taken[0].0, "example/hello:1");
        assert_eq!(
            taken[0].1.digest, made.digest,
            "the same manifest, byte for byte"
        );
        let rootfs = store.rootfs("example/hello").unwrap();
        assert_eq!(
            std::fs::read_to_string(rootfs.join("hello.txt")).unwrap(),
            "hello\n"
        );
        // Renamed on the way in.
        let taken = store.import(&archive, Some("local/greeter:2")).unwrap();
        assert_eq!(
            store.resolve("local/greeter:2").unwrap().digest,
            taken[0].1.digest
        );
    }

    #[test]
    fn a_docker_save_tarball_becomes_an_oci_image() {
        let dir = tempfile::tempdir().unwrap();
        // What `docker save` writes: manifest.json, the config, one directory per layer.
        let saved = dir.path().join("saved");
        std::fs::create_dir_all(saved.join("abc")).unwrap();
        let layer_files = dir.path().join("layer");
        std::fs::create_dir_all(&layer_files).unwrap();
        std::fs::write(layer_files.join("greeting"), "from docker\n").unwrap();
        tar_of(&layer_files, &saved.join("abc/layer.tar"), false);
        std::fs::write(
            saved.join("cfg.json"),
            br#"{"architecture":"amd64","os":"linux"}"#,
        )
        .unwrap();
        std::fs::write(
            saved.join("manifest.json"),
            br#"[{"Config":"cfg.json","RepoTags":["docker.io/library/greeter:latest"],"Layers":["abc/layer.tar"]}]"#,
        )
        .unwrap();
        let archive = dir.path().join("greeter.tar");
        tar_of(&saved, &archive, false);
        let store = ImageStore::new(dir.path().join("images"));
        let taken = store.import(&archive, None).unwrap();
        assert_eq!(taken[0].0, "docker.io/library/greeter:latest");
        let rootfs = store.rootfs("docker.io/library/greeter").unwrap();
        assert_eq!(
            std::fs::read_to_string(rootfs.join("greeting")).unwrap(),
            "from docker\n"
        );
    }

    #[test]
    fn a_damaged_or_foreign_archive_is_refused_and_nothing_is_tagged() {
        let dir = tempfile::tempdir().unwrap();
        let layout = dir.path().join("elsewhere");
        let made = small_image(&layout, "example/hello:1");
        let manifest: Manifest = serde_json::from_slice(
            &std::fs::read(ImageStore::new(layout.clone()).blob(&made.digest)).unwrap(),
        )
        .unwrap();
        // One byte of the layer changed after it was hashed.
        let layer = ImageStore::new(layout.clone()).blob(&manifest.layers[0].digest);
        let mut bytes = std::fs::read(&layer).unwrap();
        bytes[600] ^= 1;
        std::fs::write(&layer, bytes).unwrap();
        let archive = dir.path().join("damaged.tar");
        tar_of(&layout, &archive, false);
        let store = ImageStore::new(dir.path().join("images"));
        let error = store.import(&archive, None).unwrap_err().to_string();
        assert!(error.contains("damaged"), "{error}");
        assert!(matches!(
            store.resolve("example/hello"),
            Err(ImageError::NotFound(_))
        ));

        let text = dir.path().join("notes.txt");
        std::fs::write(&text, "not an image").unwrap();
        let error = store.import(&text, None).unwrap_err().to_string();
        assert!(
            error.contains("not a tar archive") || error.contains("neither"),
            "{error}"
        );

        let intact = dir.path().join("intact");
        small_image(&intact, "example/hello:1");
        let archive = dir.path().join("intact.tar");
        tar_of(&intact, &archive, false);
        let error = store
            .import(&archive, Some("Bad Name"))
            .unwrap_err()
            .to_string();
        assert!(error.contains("not an image reference"), "{error}");
        assert!(matches!(
            store.resolve("example/hello"),
            Err(ImageError::NotFound(_))
        ));
    }

    #[test]
    fn an_image_of_this_test_binary_is_stored_resolved_and_unpacked_with_its_libraries() {
        let dir = tempfile::tempdir().unwrap();
        let store = ImageStore::new(dir.path().join("images"));
        assert!(matches!(
            store.resolve("astro-fit"),
            Err(ImageError::NotFound(_))
        ));
        let exe = std::env::current_exe().unwrap();
        let built = store.build_astro_fit(&exe, "test").unwrap();
        assert_eq!(store.resolve("astro-fit").unwrap().digest, built.digest);
        assert_eq!(
            store.resolve("astro-fit:test").unwrap().digest,
            built.digest
        );
        // The same binaries, the same digest.
        let again = store.build_astro_fit(&exe, "test").unwrap();
        assert_eq!(again.digest, built.digest);
        let rootfs = store.rootfs("astro-fit").unwrap();
        let inside = rootfs.join(CECCM_IN_IMAGE.trim_start_matches('/'));
        assert_eq!(
            std::fs::metadata(&inside).unwrap().len(),
            std::fs::metadata(&exe).unwrap().len()
        );
        for library in shared_libraries(&exe).unwrap() {
            let copied = rootfs.join(library.to_string_lossy().trim_start_matches('/'));
            assert!(copied.exists(), "{} in the image", library.display());
        }
        assert!(rootfs.join("etc/passwd").exists());
        let index: Index =
            serde_json::from_slice(&std::fs::read(store.dir().join("index.json")).unwrap())
                .unwrap();
        assert_eq!(index.manifests.len(), 1, "a rebuild replaces the tag");
    }
}

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
        let manifest = Manifest {
            schema_version: 2,
            media_type: MANIFEST_TYPE.into(),
            config: Descriptor {
                media_type: CONFIG_TYPE.into(),
                size: config_bytes.len() as u64,
                digest: self.put_blob(&config_bytes)?,
                annotations: Default::default(),
            },
            layers: vec![layer],
        };
        let manifest_bytes = serde_json::to_vec(&manifest).expect("the manifest serialises");
        let descriptor = Descriptor {
            media_type: MANIFEST_TYPE.into(),
            size: manifest_bytes.len() as u64,
            digest: self.put_blob(&manifest_bytes)?,
            annotations: Default::default(),
        };
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

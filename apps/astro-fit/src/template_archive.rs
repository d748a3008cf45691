//! Template libraries as tar archives (gzipped or plain): how users upload them and how the
//! compact default library ships in the repo (`data/emiles-compact.tar.gz`).
//!
//! Unpacking is written for archives from strangers: only plain files at the top level are
//! written (no directories, links, devices, absolute paths or `..`), never over an existing
//! file, and the whole archive is bounded in size and entries, decompressed bytes included
//! (a gzip bomb stops at the bound). On any error the files written so far are removed.

use std::fs::OpenOptions;
use std::io::{BufRead, BufReader, Read};
use std::path::{Component, Path, PathBuf};

use flate2::read::GzDecoder;
use tar::{Archive, EntryType};

/// The compact E-MILES library that ships with astro-fit (30 SSPs, 3300-7700 A; see
/// `DATA.md`), for a job that must run with nothing outside the repository. Unpack it with
/// [`unpack_template_tar_from`]. (A `const`: it costs nothing in binaries that do not use it.)
pub const COMPACT_EMILES_TAR_GZ: &[u8] = include_bytes!("../data/emiles-compact.tar.gz");

/// Largest total size of the files of an archive [`unpack_template_tar`] accepts: the full
/// E-MILES library is about 30 MB, MaStar HC about 0.3 GB.
pub const MAX_UNPACKED_BYTES: u64 = 2 << 30;

/// Most files an archive may hold.
pub const MAX_ENTRIES: usize = 10_000;

/// Room for headers, padding and long-name records on top of the files' bytes.
const HEADER_ALLOWANCE: u64 = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum TemplateArchiveError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("not a readable tar archive: {0}")]
    Unreadable(#[source] std::io::Error),
    #[error("archive entry {name:?} refused: {reason}")]
    Refused { name: String, reason: &'static str },
    #[error("archive holds {name:?} twice")]
    Duplicate { name: String },
    #[error("archive entry {name:?} ends early ({got} of {size} bytes)")]
    Truncated { name: String, got: u64, size: u64 },
    #[error("archive is larger than {limit} bytes unpacked")]
    TooLarge { limit: u64 },
    #[error("archive holds more than {limit} files")]
    TooManyEntries { limit: usize },
    #[error("archive holds no files")]
    Empty,
}

/// Unpacks the template archive at `archive` (tar or tar.gz) into `dest` (created if needed),
/// with [`MAX_UNPACKED_BYTES`]. Returns the names of the files written, in archive order.
pub fn unpack_template_tar(
    archive: &Path,
    dest: &Path,
) -> Result<Vec<String>, TemplateArchiveError> {
    let file = std::fs::File::open(archive).map_err(|source| TemplateArchiveError::Io {
        path: archive.to_path_buf(),
        source,
    })?;
    unpack_template_tar_from(file, dest, MAX_UNPACKED_BYTES)
}

/// Unpacks a template archive (tar or tar.gz, told apart by the gzip magic) read from
/// `reader` (a file, or `&[u8]` such as [`COMPACT_EMILES_TAR_GZ`]) into `dest`, refusing it
/// when its files hold more than `max_bytes`. Returns the names of the files written.
pub fn unpack_template_tar_from(
    reader: impl Read,
    dest: &Path,
    max_bytes: u64,
) -> Result<Vec<String>, TemplateArchiveError> {
    std::fs::create_dir_all(dest).map_err(|source| TemplateArchiveError::Io {
        path: dest.to_path_buf(),
        source,
    })?;
    let mut written = Vec::new();
    let outcome = unpack(reader, dest, max_bytes, &mut written);
    if outcome.is_err() {
        // Leave no half library behind: a caller may otherwise load what is there.
        for name in &written {
            let _ = std::fs::remove_file(dest.join(name));
        }
    }
    outcome.map(|()| written)
}

fn unpack(
    reader: impl Read,
    dest: &Path,
    max_bytes: u64,
    written: &mut Vec<String>,
) -> Result<(), TemplateArchiveError> {
    let mut buffered = BufReader::new(reader);
    let gzipped = buffered
        .fill_buf()
        .map_err(TemplateArchiveError::Unreadable)?
        .starts_with(&[0x1f, 0x8b]);
    let stream: Box<dyn Read> = if gzipped {
        Box::new(GzDecoder::new(buffered))
    } else {
        Box::new(buffered)
    };
    // The tar reader trusts sizes in headers (long names are read whole into memory): bound
    // the decompressed stream itself, so no header can make it read or allocate without end.
    let bounded = Bounded {
        inner: stream,
        left: max_bytes.saturating_add(HEADER_ALLOWANCE),
    };
    let mut archive = Archive::new(bounded);
    let too_large = |e: std::io::Error| {
        if is_limit(&e) {
            TemplateArchiveError::TooLarge { limit: max_bytes }
        } else {
            TemplateArchiveError::Unreadable(e)
        }
    };
    let mut total = 0u64;
    for entry in archive.entries().map_err(too_large)? {
        let mut entry = entry.map_err(too_large)?;
        let raw_name = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        let refuse = |reason| TemplateArchiveError::Refused {
            name: raw_name.clone(),
            reason,
        };
        let kind = entry.header().entry_type();
        let name = match kind {
            // pax global headers carry metadata only.
            EntryType::XGlobalHeader => continue,
            // `tar -C dir .` writes "./" first: the top level itself is fine, nothing below.
            EntryType::Directory => match top_level_name(&raw_name) {
                Ok(None) => continue,
                Ok(Some(_)) => return Err(refuse("directories are not allowed")),
                Err(reason) => return Err(refuse(reason)),
            },
            EntryType::Regular => match top_level_name(&raw_name) {
                Ok(Some(name)) => name,
                Ok(None) => return Err(refuse("a file needs a name")),
                Err(reason) => return Err(refuse(reason)),
            },
            EntryType::Symlink | EntryType::Link => return Err(refuse("links are not allowed")),
            _ => return Err(refuse("only plain files are allowed")),
        };
        // macOS tar adds "._NAME" resource forks: not templates, and a library reader would
        // trip over them.
        if name.starts_with('.') {
            continue;
        }
        if written.len() >= MAX_ENTRIES {
            return Err(TemplateArchiveError::TooManyEntries { limit: MAX_ENTRIES });
        }
        let size = entry.size();
        total = total.saturating_add(size);
        if total > max_bytes {
            return Err(TemplateArchiveError::TooLarge { limit: max_bytes });
        }
        let path = dest.join(&name);
        // create_new: never overwrite, and never follow a link planted at that name.
        let mut file = match OpenOptions::new().write(true).create_new(true).open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(if written.contains(&name) {
                    TemplateArchiveError::Duplicate { name }
                } else {
                    TemplateArchiveError::Io { path, source: e }
                });
            }
            Err(source) => return Err(TemplateArchiveError::Io { path, source }),
        };
        written.push(name.clone());
        let got = std::io::copy(&mut entry, &mut file).map_err(|e| {
            if is_limit(&e) {
                TemplateArchiveError::TooLarge { limit: max_bytes }
            } else {
                TemplateArchiveError::Io {
                    path: path.clone(),
                    source: e,
                }
            }
        })?;
        if got != size {
            return Err(TemplateArchiveError::Truncated { name, got, size });
        }
    }
    if written.is_empty() {
        return Err(TemplateArchiveError::Empty);
    }
    Ok(())
}

/// The file name of a top-level entry (`Ok(None)` for the top level itself, `./`), or why the
/// path is refused.
fn top_level_name(raw: &str) -> Result<Option<String>, &'static str> {
    if raw.contains('\0') || raw.contains('\\') {
        return Err("odd characters in the name");
    }
    let mut name = None;
    for c in Path::new(raw).components() {
        match c {
            Component::CurDir => {}
            Component::Normal(n) if name.is_none() => {
                name = Some(n.to_str().ok_or("the name is not UTF-8")?.to_string());
            }
            Component::Normal(_) => return Err("nested paths are not allowed"),
            Component::ParentDir => return Err("`..` is not allowed"),
            Component::RootDir | Component::Prefix(_) => {
                return Err("absolute paths are not allowed");
            }
        }
    }
    if name.as_ref().is_some_and(|n| n.len() > 255) {
        return Err("the name is too long");
    }
    Ok(name)
}

/// A reader that fails (with [`LimitExceeded`]) once it has given `left` bytes.
struct Bounded<R> {
    inner: R,
    left: u64,
}

#[derive(Debug)]
struct LimitExceeded;

impl std::fmt::Display for LimitExceeded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("archive exceeds its size bound")
    }
}

impl std::error::Error for LimitExceeded {}

impl<R: Read> Read for Bounded<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.left == 0 {
            // Only an error if there is more: an archive ending exactly at the bound is fine.
            let mut probe = [0u8; 1];
            return match self.inner.read(&mut probe)? {
                0 => Ok(0),
                _ => Err(std::io::Error::other(LimitExceeded)),
            };
        }
        let n = buf
            .len()
            .min(usize::try_from(self.left).unwrap_or(usize::MAX));
        let got = self.inner.read(&mut buf[..n])?;
        self.left -= got as u64;
        Ok(got)
    }
}

/// Whether `e` (or an error it wraps: the tar reader adds context) is the size bound.
fn is_limit(e: &std::io::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = e.get_ref().map(|r| r as _);
    while let Some(s) = source {
        if s.is::<LimitExceeded>() {
            return true;
        }
        source = match s.downcast_ref::<std::io::Error>() {
            Some(io) => io.get_ref().map(|r| r as _),
            None => s.source(),
        };
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// A tar with raw headers, so that names a well-behaved builder refuses (`../x`, `/etc/x`)
    /// can be written.
    fn tar_of(entries: &[(&str, EntryType, &[u8])]) -> Vec<u8> {
        let mut out = Vec::new();
        for (name, kind, data) in entries {
            let mut h = tar::Header::new_gnu();
            // Write the name bytes directly: `set_path` would refuse `..`.
            let bytes = name.as_bytes();
            h.as_old_mut().name[..bytes.len()].copy_from_slice(bytes);
            h.set_entry_type(*kind);
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            if *kind == EntryType::Symlink {
                h.set_link_name("/etc/passwd").unwrap();
            }
            h.set_cksum();
            out.extend_from_slice(h.as_bytes());
            out.extend_from_slice(data);
            out.resize(out.len().div_ceil(512) * 512, 0);
        }
        out.resize(out.len() + 1024, 0);
        out
    }

    fn gzip(bytes: &[u8]) -> Vec<u8> {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(bytes).unwrap();
        gz.finish().unwrap()
    }

    fn listing(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn unpacks_plain_and_gzipped_archives_of_top_level_files() {
        let tar = tar_of(&[
            ("./", EntryType::Directory, b""),
            ("./a.fits", EntryType::Regular, b"AAAA"),
            ("b.fits", EntryType::Regular, b"BB"),
            ("._a.fits", EntryType::Regular, b"resource fork"),
        ]);
        for bytes in [tar.clone(), gzip(&tar)] {
            let dir = tempfile::tempdir().unwrap();
            let names = unpack_template_tar_from(&bytes[..], dir.path(), 1 << 20).unwrap();
            assert_eq!(names, ["a.fits", "b.fits"]);
            assert_eq!(listing(dir.path()), ["a.fits", "b.fits"]);
            assert_eq!(std::fs::read(dir.path().join("a.fits")).unwrap(), b"AAAA");
        }
    }

    #[test]
    fn refuses_escapes_links_directories_and_leaves_nothing_behind() {
        let cases: [(&str, EntryType, &str); 6] = [
            ("../x", EntryType::Regular, "`..`"),
            ("ok/../../x", EntryType::Regular, "`..`"),
            ("/etc/x", EntryType::Regular, "absolute"),
            ("sub/x.fits", EntryType::Regular, "nested"),
            ("sub/", EntryType::Directory, "directories"),
            ("link.fits", EntryType::Symlink, "links"),
        ];
        for (bad, kind, why) in cases {
            let parent = tempfile::tempdir().unwrap();
            let dest = parent.path().join("lib");
            let tar = tar_of(&[
                ("good.fits", EntryType::Regular, b"1234"),
                (bad, kind, b"evil"),
            ]);
            let err = unpack_template_tar_from(&gzip(&tar)[..], &dest, 1 << 20).unwrap_err();
            assert!(
                matches!(err, TemplateArchiveError::Refused { .. }),
                "{bad}: {err}"
            );
            assert!(err.to_string().contains(why), "{bad}: {err}");
            assert!(listing(&dest).is_empty(), "{bad}: files left behind");
            assert_eq!(listing(parent.path()), ["lib"], "{bad}: escaped");
        }
        let hard = tar_of(&[("h.fits", EntryType::Link, b"")]);
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            unpack_template_tar_from(&hard[..], dir.path(), 1 << 20),
            Err(TemplateArchiveError::Refused { .. })
        ));
    }

    #[test]
    fn refuses_archives_over_the_bound_duplicates_and_garbage() {
        let big = vec![7u8; 3000];
        let tar = tar_of(&[
            ("a.fits", EntryType::Regular, &big),
            ("b.fits", EntryType::Regular, &big),
        ]);
        let dir = tempfile::tempdir().unwrap();
        let err = unpack_template_tar_from(&gzip(&tar)[..], dir.path(), 5000).unwrap_err();
        assert!(
            matches!(err, TemplateArchiveError::TooLarge { limit: 5000 }),
            "{err}"
        );
        assert!(listing(dir.path()).is_empty());

        let twice = tar_of(&[
            ("a.fits", EntryType::Regular, b"1"),
            ("./a.fits", EntryType::Regular, b"2"),
        ]);
        let err = unpack_template_tar_from(&twice[..], dir.path(), 1 << 20).unwrap_err();
        assert!(
            matches!(err, TemplateArchiveError::Duplicate { .. }),
            "{err}"
        );
        assert!(listing(dir.path()).is_empty());

        // An existing file is not overwritten (nor followed, were it a link).
        std::fs::write(dir.path().join("a.fits"), b"mine").unwrap();
        let one = tar_of(&[("a.fits", EntryType::Regular, b"theirs")]);
        assert!(unpack_template_tar_from(&one[..], dir.path(), 1 << 20).is_err());
        assert_eq!(std::fs::read(dir.path().join("a.fits")).unwrap(), b"mine");

        let empty = tar_of(&[]);
        let other = tempfile::tempdir().unwrap();
        assert!(matches!(
            unpack_template_tar_from(&empty[..], other.path(), 1 << 20),
            Err(TemplateArchiveError::Empty)
        ));
        let garbage = vec![0x42u8; 2048];
        assert!(matches!(
            unpack_template_tar_from(&garbage[..], other.path(), 1 << 20),
            Err(TemplateArchiveError::Unreadable(_))
        ));
    }

    #[test]
    fn the_compact_library_unpacks_and_loads() {
        let dir = tempfile::tempdir().unwrap();
        let names = unpack_template_tar_from(COMPACT_EMILES_TAR_GZ, dir.path(), 1 << 30).unwrap();
        assert_eq!(names.len(), 31, "30 SSPs and the mass table");
        let lib = crate::templates::TemplateLibrary::load(dir.path()).unwrap();
        assert_eq!(lib.names.len(), 30);
        assert_eq!((lib.ages.len(), lib.metals.len()), (10, 3));
        assert!(lib.wave[0] <= 3301.0 && *lib.wave.last().unwrap() >= 7699.0);
        let ssp = lib.ssp.as_ref().unwrap();
        assert!(
            ssp.iter().all(|s| s.mass.is_some()),
            "masses from the table"
        );
    }
}

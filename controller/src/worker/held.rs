//! The leases a region's workers hold, kept on disk (`CACHE/REGION/held/TASK.json`) so that a
//! host that restarts while cut off from the server finds the tasks it had leased and works
//! through them, reporting through the outbox when the link is back (KubeEdge #4441: an edge
//! node rebooted offline never restarted its pods).
//!
//! Each file is locked (`flock`) by the worker that holds the lease for as long as it does;
//! the lock goes with the process, so a file nobody locks belongs to a worker that is gone,
//! and the next worker of the region claims it. A lease is written aside, synced, locked and
//! only then renamed into place, so no other worker can claim it in between.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::resources::TaskObject;

/// A lease as kept: the task and the secret its reports carry.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KeptLease {
    pub task: TaskObject,
    pub secret: String,
}

/// This worker's hold on one kept lease; dropping it without [`Claim::release`] leaves the
/// file for another worker (as a crash would).
#[derive(Debug)]
pub struct Claim {
    path: PathBuf,
    _lock: File,
}

impl Claim {
    /// The lease is done with (its result is in the outbox, or the server took it back).
    pub fn release(self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

pub struct HeldLeases {
    dir: PathBuf,
}

impl HeldLeases {
    pub fn new(dir: PathBuf) -> HeldLeases {
        HeldLeases { dir }
    }

    fn path(&self, task: &str) -> PathBuf {
        self.dir.join(format!("{task}.json"))
    }

    /// Keeps `lease` on disk, claimed by this worker.
    pub fn keep(&self, lease: &KeptLease) -> std::io::Result<Claim> {
        std::fs::create_dir_all(&self.dir)?;
        let name = &lease.task.metadata.name;
        let tmp = self
            .dir
            .join(format!(".{name}.{}.part", uuid::Uuid::new_v4().simple()));
        let mut file = File::create(&tmp)?;
        file.write_all(&serde_json::to_vec(lease).map_err(std::io::Error::other)?)?;
        file.sync_all()?;
        file.lock()?;
        let path = self.path(name);
        std::fs::rename(&tmp, &path)?;
        File::open(&self.dir)?.sync_all()?;
        Ok(Claim { path, _lock: file })
    }

    /// Claims up to `most` leases whose workers are gone, oldest first.
    pub fn claim_orphans(&self, most: usize) -> Vec<(KeptLease, Claim)> {
        let mut claimed = Vec::new();
        for path in self.files() {
            if claimed.len() >= most {
                break;
            }
            let Ok(file) = File::open(&path) else {
                continue;
            };
            if file.try_lock().is_err() {
                continue;
            }
            // Released (removed) by its worker between the listing and the lock.
            if !path.exists() {
                continue;
            }
            match std::fs::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|bytes| serde_json::from_slice(&bytes).map_err(|e| e.to_string()))
            {
                Ok(lease) => claimed.push((lease, Claim { path, _lock: file })),
                Err(e) => {
                    tracing::error!(file = %path.display(), error = %e, "a kept lease is unreadable; dropped");
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
        claimed
    }

    /// How many kept leases no live worker holds.
    pub fn orphans(&self) -> usize {
        self.files()
            .iter()
            .filter(|path| {
                File::open(path).is_ok_and(|f| {
                    let free = f.try_lock().is_ok();
                    drop(f);
                    free
                })
            })
            .count()
    }

    fn files(&self) -> Vec<PathBuf> {
        let Ok(read) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut files: Vec<(std::time::SystemTime, PathBuf)> = read
            .flatten()
            .filter(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                !name.starts_with('.') && name.ends_with(".json")
            })
            .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
            .collect();
        files.sort();
        files.into_iter().map(|(_, p)| p).collect()
    }
}

/// Where a region's workers keep their leases.
pub fn held_dir(cache_dir: &Path) -> PathBuf {
    cache_dir.join("held")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(name: &str) -> KeptLease {
        let task: TaskObject = serde_json::from_value(serde_json::json!({
            "apiVersion": "ceccm/v1", "kind": "Task", "metadata": {"name": name},
            "spec": {"application": "job", "index": 0, "command": "true", "maxAttempts": 1}
        }))
        .unwrap();
        KeptLease {
            task,
            secret: format!("secret-of-{name}"),
        }
    }

    #[test]
    fn a_live_workers_leases_are_its_own_and_a_gone_workers_are_claimed_once() {
        let dir = tempfile::tempdir().unwrap();
        let held = HeldLeases::new(dir.path().join("held"));
        let mine = held.keep(&lease("job-00000")).unwrap();
        assert_eq!(held.orphans(), 0, "held by a live worker");
        assert!(held.claim_orphans(10).is_empty());
        // The worker dies: its lock goes with it.
        drop(mine);
        let gone = held.keep(&lease("job-00001")).unwrap();
        drop(gone);
        assert_eq!(held.orphans(), 2);
        let claimed = held.claim_orphans(1);
        assert_eq!(claimed.len(), 1);
        assert_eq!(claimed[0].0.task.metadata.name, "job-00000", "oldest first");
        assert_eq!(claimed[0].0.secret, "secret-of-job-00000");
        assert_eq!(held.orphans(), 1, "claimed by this worker now");
        let rest = held.claim_orphans(10);
        assert_eq!(rest.len(), 1);
        for (_, claim) in claimed.into_iter().chain(rest) {
            claim.release();
        }
        assert_eq!(held.orphans(), 0);
        assert!(held.files().is_empty(), "released leases leave no file");
    }

    #[test]
    fn an_unreadable_lease_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let held = HeldLeases::new(dir.path().to_path_buf());
        std::fs::write(dir.path().join("job-00009.json"), b"{not json").unwrap();
        assert!(held.claim_orphans(5).is_empty());
        assert!(!dir.path().join("job-00009.json").exists());
    }
}

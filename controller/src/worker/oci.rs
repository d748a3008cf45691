//! Runs one task's process in an OCI container through runc, as a kubelet runs a pod's
//! container through its runtime: the image's root file system read-only, the task's inputs
//! bound read-only, one output directory writable, no network (a network namespace of its own
//! with only loopback), memory and CPU limited by the container's cgroup.
//!
//! The worker outside fetches the inputs and sends the outputs; the container sees nothing else
//! of the host. `runc create` then `start`, and the worker, a child subreaper, waits for the
//! container's init itself: its exit status, and whether the cgroup's OOM killer ended it
//! (`OOMKilled`), are read before `runc delete` removes the cgroup.

// Three system calls have no safe wrapper in std: geteuid, prctl(PR_SET_CHILD_SUBREAPER)
// and waitpid on a process that is not a `Child` of ours until runc hands it over.
#![allow(unsafe_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde::Serialize;

/// A bind mount into the container.
#[derive(Debug, Clone)]
pub struct Bind {
    pub source: PathBuf,
    pub destination: String,
    pub writable: bool,
}

/// What to run, and in what.
#[derive(Debug, Clone)]
pub struct ContainerRun {
    /// Unique on the host (runc's container id and the cgroup's name).
    pub id: String,
    pub rootfs: PathBuf,
    pub args: Vec<String>,
    pub env: Vec<String>,
    pub binds: Vec<Bind>,
    pub memory_limit_bytes: Option<u64>,
    /// Cores (CFS quota over a 100 ms period).
    pub cpus: Option<f64>,
    /// Where the container's stdout and stderr go.
    pub stdout: PathBuf,
    pub stderr: PathBuf,
    /// How long it may run (a pod's `activeDeadlineSeconds`); past it, it is killed.
    pub deadline: Option<std::time::Duration>,
}

/// How the container ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContainerEnd {
    Exited(i32),
    /// The cgroup's OOM killer ended it.
    OomKilled,
    Signalled(i32),
    /// Killed because it ran past its deadline.
    DeadlineExceeded,
}

#[derive(Debug, thiserror::Error)]
pub enum OciError {
    #[error("runc is not installed (the oci runtime needs it)")]
    NoRuntime,
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("runc {step} failed: {stderr}")]
    Runc { step: String, stderr: String },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> OciError {
    let what = what.into();
    move |source| OciError::Io { what, source }
}

// ---- the runtime spec (the parts of runtime-spec 1.0 that are used) --------------------------

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Spec {
    oci_version: &'static str,
    process: Process,
    root: Root,
    hostname: String,
    mounts: Vec<Mount>,
    linux: Linux,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Process {
    terminal: bool,
    user: User,
    args: Vec<String>,
    env: Vec<String>,
    cwd: String,
    no_new_privileges: bool,
    capabilities: Capabilities,
}

#[derive(Serialize)]
struct User {
    uid: u32,
    gid: u32,
}

/// No capabilities at all: the task needs none.
#[derive(Serialize, Default)]
struct Capabilities {
    bounding: Vec<String>,
    effective: Vec<String>,
    permitted: Vec<String>,
}

#[derive(Serialize)]
struct Root {
    path: String,
    readonly: bool,
}

#[derive(Serialize)]
struct Mount {
    destination: String,
    #[serde(rename = "type")]
    kind: String,
    source: String,
    options: Vec<String>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Linux {
    namespaces: Vec<Namespace>,
    resources: Resources,
    cgroups_path: String,
    masked_paths: Vec<String>,
    readonly_paths: Vec<String>,
}

#[derive(Serialize)]
struct Namespace {
    #[serde(rename = "type")]
    kind: &'static str,
}

#[derive(Serialize)]
struct Resources {
    #[serde(skip_serializing_if = "Option::is_none")]
    memory: Option<Memory>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cpu: Option<Cpu>,
}

#[derive(Serialize)]
struct Memory {
    limit: i64,
}

#[derive(Serialize)]
struct Cpu {
    quota: i64,
    period: u64,
}

fn mount(destination: &str, kind: &str, source: &str, options: &[&str]) -> Mount {
    Mount {
        destination: destination.into(),
        kind: kind.into(),
        source: source.into(),
        options: options.iter().map(|o| o.to_string()).collect(),
    }
}

/// The cgroup (under each v1 hierarchy, or the v2 tree) runc makes for container `id`.
fn cgroup_path(id: &str) -> String {
    format!("/ceccm/{id}")
}

fn spec(run: &ContainerRun) -> Spec {
    let mut mounts = vec![
        mount("/proc", "proc", "proc", &[]),
        mount(
            "/dev",
            "tmpfs",
            "tmpfs",
            &["nosuid", "strictatime", "mode=755", "size=65536k"],
        ),
        mount(
            "/sys",
            "sysfs",
            "sysfs",
            &["nosuid", "noexec", "nodev", "ro"],
        ),
        mount(
            "/sys/fs/cgroup",
            "cgroup",
            "cgroup",
            &["nosuid", "noexec", "nodev", "relatime", "ro"],
        ),
        mount("/tmp", "tmpfs", "tmpfs", &["nosuid", "nodev", "size=1g"]),
    ];
    for bind in &run.binds {
        let mode = if bind.writable { "rw" } else { "ro" };
        mounts.push(Mount {
            destination: bind.destination.clone(),
            kind: "bind".into(),
            source: bind.source.display().to_string(),
            options: vec!["rbind".into(), mode.into(), "nosuid".into(), "nodev".into()],
        });
    }
    Spec {
        oci_version: "1.0.2",
        process: Process {
            terminal: false,
            user: User { uid: 0, gid: 0 },
            args: run.args.clone(),
            env: run.env.clone(),
            cwd: "/".into(),
            no_new_privileges: true,
            capabilities: Capabilities::default(),
        },
        root: Root {
            path: run.rootfs.display().to_string(),
            readonly: true,
        },
        hostname: run.id.chars().take(63).collect(),
        mounts,
        linux: Linux {
            // A network namespace of its own: loopback only, no way out.
            namespaces: ["pid", "network", "ipc", "uts", "mount"]
                .into_iter()
                .map(|kind| Namespace { kind })
                .collect(),
            resources: Resources {
                memory: run.memory_limit_bytes.map(|limit| Memory {
                    limit: limit as i64,
                }),
                cpu: run.cpus.map(|cores| Cpu {
                    quota: (cores * 100_000.0).round().max(1_000.0) as i64,
                    period: 100_000,
                }),
            },
            cgroups_path: cgroup_path(&run.id),
            masked_paths: [
                "/proc/kcore",
                "/proc/keys",
                "/proc/timer_list",
                "/sys/firmware",
            ]
            .iter()
            .map(|p| p.to_string())
            .collect(),
            readonly_paths: ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys"]
                .iter()
                .map(|p| p.to_string())
                .collect(),
        },
    }
}

/// Whether runc can be used here (installed, and this process may make namespaces).
pub fn available() -> bool {
    which("runc").is_some() && unsafe { libc::geteuid() } == 0
}

fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_string_lossy()
        .split(':')
        .chain(["/usr/sbin", "/sbin"])
        .map(|dir| Path::new(dir).join(program))
        .find(|p| p.is_file())
}

fn runc(root: &Path) -> Result<Command, OciError> {
    let program = which("runc").ok_or(OciError::NoRuntime)?;
    let mut command = Command::new(program);
    command.arg("--root").arg(root);
    Ok(command)
}

fn checked(mut command: Command, step: &str) -> Result<Vec<u8>, OciError> {
    let output = command
        .stdin(Stdio::null())
        .output()
        .map_err(io(format!("running runc {step}")))?;
    if !output.status.success() {
        return Err(OciError::Runc {
            step: step.into(),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        });
    }
    Ok(output.stdout)
}

/// Whether the OOM killer ended a process of the container's memory cgroup.
fn oom_killed(id: &str) -> bool {
    let v1 = Path::new("/sys/fs/cgroup/memory")
        .join(cgroup_path(id).trim_start_matches('/'))
        .join("memory.oom_control");
    let v2 = Path::new("/sys/fs/cgroup")
        .join(cgroup_path(id).trim_start_matches('/'))
        .join("memory.events");
    [v1, v2].iter().any(|file| {
        std::fs::read_to_string(file).is_ok_and(|text| {
            text.lines().any(|line| {
                line.strip_prefix("oom_kill ")
                    .and_then(|n| n.trim().parse::<u64>().ok())
                    .is_some_and(|n| n > 0)
            })
        })
    })
}

/// Kills a container's init once its deadline has passed, unless stood down first.
struct Watchdog {
    cancel: std::sync::mpsc::Sender<()>,
    thread: std::thread::JoinHandle<bool>,
}

impl Watchdog {
    fn start(pid: libc::pid_t, deadline: std::time::Duration) -> Watchdog {
        let (cancel, cancelled) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            match cancelled.recv_timeout(deadline) {
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                    // The init of the container's pid namespace: the kernel kills the rest.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                    true
                }
                _ => false,
            }
        });
        Watchdog { cancel, thread }
    }

    /// Stops the watchdog; says whether it had fired.
    fn stand_down(self) -> bool {
        let _ = self.cancel.send(());
        self.thread.join().unwrap_or(false)
    }
}

/// Runs the container to its end (blocking: call it off the async workers). `state_dir` holds
/// runc's state and the bundle.
pub fn run(run: &ContainerRun, state_dir: &Path) -> Result<ContainerEnd, OciError> {
    // The container's init is re-parented to this process when `runc create` exits, so that
    // its exit status can be waited for here (as containerd's shim does).
    unsafe {
        libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0);
    }
    let root = state_dir.join("runc");
    let bundle = state_dir.join("bundles").join(&run.id);
    std::fs::create_dir_all(&root).map_err(io("creating runc's state directory"))?;
    std::fs::create_dir_all(&bundle).map_err(io("creating the bundle"))?;
    let config = serde_json::to_vec_pretty(&spec(run)).expect("the runtime spec serialises");
    std::fs::write(bundle.join("config.json"), config).map_err(io("writing config.json"))?;
    let stdout = std::fs::File::create(&run.stdout).map_err(io("creating the output file"))?;
    let stderr = std::fs::File::create(&run.stderr).map_err(io("creating the output file"))?;
    let ended = (|| {
        let mut create = runc(&root)?;
        create
            .args(["create", "--bundle"])
            .arg(&bundle)
            .arg(&run.id)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr);
        let status = create.status().map_err(io("running runc create"))?;
        if !status.success() {
            return Err(OciError::Runc {
                step: "create".into(),
                stderr: std::fs::read_to_string(&run.stderr).unwrap_or_default(),
            });
        }
        let mut state = runc(&root)?;
        state.args(["state", &run.id]);
        let state: serde_json::Value =
            serde_json::from_slice(&checked(state, "state")?).map_err(|e| OciError::Runc {
                step: "state".into(),
                stderr: e.to_string(),
            })?;
        let pid = state["pid"].as_i64().unwrap_or(0) as libc::pid_t;
        let mut start = runc(&root)?;
        start.args(["start", &run.id]);
        checked(start, "start")?;
        let watchdog = run.deadline.map(|deadline| Watchdog::start(pid, deadline));
        // Wait for the end without reaping: the pid stays the container's until the watchdog
        // has stood down, so it can never kill another process that took the pid.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        let waited = unsafe {
            libc::waitid(
                libc::P_PID,
                pid as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOWAIT,
            )
        };
        let expired = watchdog.is_some_and(Watchdog::stand_down);
        let mut status = 0;
        if waited != 0 || unsafe { libc::waitpid(pid, &mut status, 0) } != pid {
            return Err(io("waiting for the container")(
                std::io::Error::last_os_error(),
            ));
        }
        Ok(if expired {
            ContainerEnd::DeadlineExceeded
        } else if oom_killed(&run.id) {
            ContainerEnd::OomKilled
        } else if libc::WIFEXITED(status) {
            ContainerEnd::Exited(libc::WEXITSTATUS(status))
        } else {
            ContainerEnd::Signalled(libc::WTERMSIG(status))
        })
    })();
    if let Ok(mut delete) = runc(&root) {
        delete.args(["delete", "--force", &run.id]);
        let _ = checked(delete, "delete");
    }
    let _ = std::fs::remove_dir_all(&bundle);
    ended
}

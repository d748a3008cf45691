//! What every end-to-end test needs: the workspace's binaries, a real `ceccm server` on a free
//! loopback port with its own data directory, the shared data, and polling with a deadline.
//!
//! Contract with `ceccm server`: once bound it prints one line `ceccm listening on http://ADDR`
//! on stdout (so `--listen 127.0.0.1:0` gives a free port without a bind race).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{OnceLock, mpsc};
use std::time::{Duration, Instant};

/// A binary of this workspace, built (once per test run) next to the test executable.
///
/// `cargo test` builds a package's binaries only for that package's own integration tests, so
/// the binaries of the other packages could be stale or missing here: build them first.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("path of the test executable");
    // target/<profile>/deps/e2e-HASH -> target/<profile>/NAME
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test executable lives in target/<profile>/deps");
    build_binaries(profile_dir);
    profile_dir.join(format!("{name}{}", std::env::consts::EXE_SUFFIX))
}

fn build_binaries(profile_dir: &Path) {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let mut command = Command::new(cargo);
        command.current_dir(workspace_root()).args([
            "build",
            "--bins",
            "-p",
            "ceccm-controller",
            "-p",
            "ceccmctl",
            "-p",
            "astro-fit",
        ]);
        if profile_dir
            .file_name()
            .is_some_and(|name| name == "release")
        {
            command.arg("--release");
        }
        let output = command.output().expect("run cargo build for the binaries");
        assert!(
            output.status.success(),
            "building the binaries failed:\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
    });
}

/// `../shared/data` beside the workspace, or `$CECCM_SHARED_DATA`.
pub fn shared_data() -> PathBuf {
    std::env::var_os("CECCM_SHARED_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("../shared/data"))
}

pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Calls `probe` until it returns `Some`, or panics naming `what` once `timeout` has passed.
pub fn wait_until<T>(what: &str, timeout: Duration, mut probe: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = probe() {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Processes whose parent is `pid`.
pub fn children_of(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(child) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // pid (comm) state ppid ...: comm may hold spaces, so read after its closing paren.
        let parent = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if parent == Some(pid) {
            out.push(child);
        }
    }
    out
}

/// The administrator token the e2e servers are provisioned with (written to
/// `DATA_DIR/admin.token` before a first start, as an operator may; the server otherwise makes
/// its own). `Http` and ceccmctl in these tests present it.
pub const ADMIN_TOKEN: &str =
    "ceccm_00000000000e2ead_e2e0e2e0e2e0e2e0e2e0e2e0e2e0e2e0e2e0e2e0e2e0e2e0e2e0e2e0e2e0e2e0";

/// The lines a child process prints, as they come: read on a thread of their own, so a test
/// can wait for one with a deadline while the process goes on.
pub fn lines_of(stdout: std::process::ChildStdout) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    rx
}

/// Waits for a line that `wanted` accepts; answers it and every line before it.
pub fn wait_for_line(
    lines: &mpsc::Receiver<String>,
    timeout: Duration,
    wanted: impl Fn(&str) -> bool,
) -> (String, Vec<String>) {
    let deadline = Instant::now() + timeout;
    let mut before = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) if wanted(&line) => return (line, before),
            Ok(line) => before.push(line),
            Err(e) => panic!("no such line within {timeout:?} ({e}); lines so far: {before:#?}"),
        }
    }
}

/// Writes [`ADMIN_TOKEN`] as `data_dir`'s administrator token unless it has one.
pub fn provision_admin_token(data_dir: &Path) {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::create_dir_all(data_dir).expect("data dir");
    let path = data_dir.join("admin.token");
    if !path.exists() {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .expect("admin.token");
        std::io::Write::write_all(&mut file, ADMIN_TOKEN.as_bytes()).expect("admin.token");
    }
}

/// A running `ceccm server`, killed when dropped.
pub struct Server {
    child: Child,
    /// Base URL, e.g. `http://127.0.0.1:41234`.
    pub url: String,
    pub data_dir: PathBuf,
}

impl Server {
    /// Starts a server on a free loopback port over `data_dir` (SQLite there unless `extra_args`
    /// names `--database-url`).
    pub fn start(data_dir: &Path, extra_args: &[&str]) -> Server {
        provision_admin_token(data_dir);
        Server::start_unprovisioned(data_dir, extra_args)
    }

    /// Starts a server that makes its own administrator token if `data_dir` has none.
    pub fn start_unprovisioned(data_dir: &Path, extra_args: &[&str]) -> Server {
        Server::spawn(
            Command::new(bin("ceccm")),
            data_dir,
            "127.0.0.1:0",
            extra_args,
        )
    }

    /// Starts a server inside network namespace `netns` (`ip netns exec`), listening on
    /// `listen`; its URL is the announced one (callers outside the namespace use its address).
    pub fn start_in_netns(
        netns: &str,
        data_dir: &Path,
        listen: &str,
        extra_args: &[&str],
    ) -> Server {
        provision_admin_token(data_dir);
        let mut command = Command::new("ip");
        command.args(["netns", "exec", netns]).arg(bin("ceccm"));
        Server::spawn(command, data_dir, listen, extra_args)
    }

    fn spawn(mut command: Command, data_dir: &Path, listen: &str, extra_args: &[&str]) -> Server {
        let mut child = command
            .arg("server")
            .args(["--listen", listen, "--data-dir"])
            .arg(data_dir)
            .args(extra_args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn ceccm server");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        // Keep draining stdout for the server's whole life so that it never blocks on a full pipe.
        std::thread::spawn(move || {
            let mut announced = false;
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if !announced && let Some(url) = line.strip_prefix("ceccm listening on ") {
                    announced = true;
                    let _ = tx.send(url.trim().to_string());
                }
            }
        });
        let url = match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(url) => url,
            Err(_) => {
                let _ = child.kill();
                panic!("ceccm server did not announce its address within 60 s");
            }
        };
        Server {
            child,
            url,
            data_dir: data_dir.to_path_buf(),
        }
    }

    pub fn api(&self, path: &str) -> String {
        format!("{}/api/v1/{}", self.url, path.trim_start_matches('/'))
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Kills the server process at once (SIGKILL), as a crash would.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

//! A running task's output, sent to the server while the task runs (the part of an agent that
//! `kubectl logs -f` reaches through the kubelet). Sending is best effort: the result carries
//! the whole output, so a link that is down only delays or thins what followers see live, and
//! never holds up the work.

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use indicatif::ProgressBar;

use crate::api::{LOG_OFFSET_HEADER, LogReceived};
use crate::logs::LIVE_CHUNK_LIMIT;

/// How often a running task's new output is sent.
const SEND_EVERY: Duration = Duration::from_secs(1);

/// Most unsent output a worker keeps while the server is out of reach; older bytes go first
/// (the server marks them lost: the result still has them).
const UNSENT_LIMIT: usize = 1024 * 1024;

/// Where a running task's output appears: files its process writes (stdout, stderr) and the
/// progress of a fit. Shared between the work and the loop that sends it.
#[derive(Clone, Default)]
pub struct LiveOutput(Arc<Mutex<Sources>>);

#[derive(Default)]
struct Sources {
    /// What was read of files that are gone, not yet gathered.
    read_ahead: Vec<u8>,
    /// Each file and how much of it was read.
    files: Vec<(PathBuf, u64)>,
    /// A fit's progress bar and the position last told.
    progress: Option<(ProgressBar, u64)>,
}

impl LiveOutput {
    /// The task writes to `path`: what it appends becomes output.
    pub fn follow_file(&self, path: PathBuf) {
        self.sources().files.push((path, 0));
    }

    /// A bar the task advances: each change becomes a line `fitted N/M spectra`.
    pub fn follow_progress(&self, bar: ProgressBar) {
        self.sources().progress = Some((bar, 0));
    }

    fn sources(&self) -> std::sync::MutexGuard<'_, Sources> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The process has ended and its files are about to go (with its scratch directory):
    /// reads what is left of them now.
    pub fn close_files(&self) {
        let mut sources = self.sources();
        let mut rest = Vec::new();
        read_files(&mut sources.files, &mut rest);
        sources.files.clear();
        sources.read_ahead.extend(rest);
    }

    /// Appends what appeared since the last call to `out`.
    fn gather(&self, out: &mut Vec<u8>) {
        let mut sources = self.sources();
        out.append(&mut sources.read_ahead);
        read_files(&mut sources.files, out);
        if let Some((bar, told)) = &mut sources.progress
            && let Some(line) = progress_line(bar, told)
        {
            out.extend_from_slice(line.as_bytes());
        }
    }
}

/// Appends what each file gained since it was last read.
fn read_files(files: &mut [(PathBuf, u64)], out: &mut Vec<u8>) {
    for (path, read) in files {
        // A file not made yet (the process is starting) has nothing to say.
        let Ok(mut file) = std::fs::File::open(&*path) else {
            continue;
        };
        if file.seek(SeekFrom::Start(*read)).is_ok()
            && let Ok(n) = file.read_to_end(out)
        {
            *read += n as u64;
        }
    }
}

/// `fitted N/M spectra` when the bar moved since `told`.
fn progress_line(bar: &ProgressBar, told: &mut u64) -> Option<String> {
    let position = bar.position();
    (position != *told).then(|| {
        *told = position;
        format!(
            "fitted {position}/{} spectra\n",
            bar.length().unwrap_or_default()
        )
    })
}

/// Writes the bar's progress to `out` as lines while a stage runs: how a stage in a container
/// tells the worker outside, which follows the container's stderr.
pub fn narrate(bar: ProgressBar, mut out: impl Write + Send + 'static) -> Narrator {
    let stop = Arc::new(AtomicBool::new(false));
    let stopped = stop.clone();
    let thread = std::thread::spawn(move || {
        let mut told = 0;
        let tick = Duration::from_millis(100);
        let mut waited = Duration::ZERO;
        loop {
            let last = stopped.load(Ordering::Acquire);
            if (last || waited >= SEND_EVERY)
                && let Some(line) = progress_line(&bar, &mut told)
            {
                let _ = out.write_all(line.as_bytes()).and_then(|()| out.flush());
                waited = Duration::ZERO;
            }
            if last {
                return;
            }
            std::thread::sleep(tick);
            waited += tick;
        }
    });
    Narrator { stop, thread }
}

/// Stops a [`narrate`] thread once it has told the last progress.
pub struct Narrator {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<()>,
}

impl Narrator {
    pub fn stop(self) {
        self.stop.store(true, Ordering::Release);
        let _ = self.thread.join();
    }
}

/// How long one chunk may take to be taken before the server counts as out of reach.
const SEND_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the worker waits, once the work has ended, for the last lines to be taken.
const LAST_LINES_WAIT: Duration = Duration::from_secs(3);

/// A running task's output on its way to the server: a task of its own, so that a slow or
/// cut link never holds up the work, its heartbeat or its report. Dropped, it stops.
pub struct LogStream {
    task: tokio::task::JoinHandle<()>,
    finish: Option<tokio::sync::oneshot::Sender<()>>,
    /// Whether the last chunk was taken: a worker cut off does not wait on the link before
    /// reporting.
    taken: Arc<AtomicBool>,
}

impl LogStream {
    pub fn start(
        client: &reqwest::Client,
        server: &str,
        task: &str,
        secret: &str,
        output: LiveOutput,
    ) -> Self {
        let mut sender = LogSender {
            client: client.clone(),
            url: format!("{server}/api/v1/tasks/{task}/log"),
            secret: secret.to_string(),
            output,
            unsent: Vec::new(),
            base: 0,
            taken: Arc::new(AtomicBool::new(true)),
        };
        let taken = sender.taken.clone();
        let (finish, finished) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let mut ticker = tokio::time::interval(SEND_EVERY);
            tokio::pin!(finished);
            loop {
                tokio::select! {
                    _ = ticker.tick() => sender.send().await,
                    _ = &mut finished => return sender.send().await,
                }
            }
        });
        LogStream {
            task,
            finish: Some(finish),
            taken,
        }
    }

    /// The work has ended: sends the last of the output, waiting a little for it unless the
    /// server was out of reach (the result carries the whole output anyway).
    pub async fn finish(mut self) {
        if let Some(finish) = self.finish.take() {
            let _ = finish.send(());
        }
        if self.taken.load(Ordering::Acquire) {
            let _ = tokio::time::timeout(LAST_LINES_WAIT, &mut self.task).await;
        }
    }
}

impl Drop for LogStream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Bytes `base..` of a task's output wait in `unsent` until the server says it has them.
struct LogSender {
    client: reqwest::Client,
    url: String,
    secret: String,
    output: LiveOutput,
    unsent: Vec<u8>,
    base: u64,
    taken: Arc<AtomicBool>,
}

impl LogSender {
    /// Gathers new output and sends what the server does not have yet, in chunks.
    async fn send(&mut self) {
        self.output.gather(&mut self.unsent);
        if self.unsent.len() > UNSENT_LIMIT {
            let dropped = self.unsent.len() - UNSENT_LIMIT;
            self.unsent.drain(..dropped);
            self.base += dropped as u64;
        }
        while !self.unsent.is_empty() {
            let chunk = self.unsent[..self.unsent.len().min(LIVE_CHUNK_LIMIT)].to_vec();
            let answer = self
                .client
                .post(&self.url)
                .timeout(SEND_TIMEOUT)
                .header(crate::api::LEASE_SECRET_HEADER, &self.secret)
                .header(LOG_OFFSET_HEADER, self.base)
                .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
                .body(chunk)
                .send()
                .await;
            let received = match answer {
                Ok(response) if response.status().is_success() => response
                    .json::<LogReceived>()
                    .await
                    .ok()
                    .map(|r| r.received),
                // Refused (the lease is gone: the heartbeat decides what that means for the
                // task) or out of reach: the output waits for the next turn.
                _ => None,
            };
            self.taken.store(received.is_some(), Ordering::Release);
            let Some(received) = received else {
                return;
            };
            let taken = received
                .saturating_sub(self.base)
                .min(self.unsent.len() as u64);
            if taken == 0 {
                return;
            }
            self.unsent.drain(..taken as usize);
            self.base += taken;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_is_gathered_once_from_files_and_progress() {
        let dir = tempfile::tempdir().unwrap();
        let stdout = dir.path().join("stdout");
        let live = LiveOutput::default();
        live.follow_file(stdout.clone());
        let bar = ProgressBar::hidden();
        bar.set_length(4);
        live.follow_progress(bar.clone());
        let mut out = Vec::new();
        live.gather(&mut out);
        assert!(out.is_empty(), "no file and no progress yet");

        std::fs::write(&stdout, "first\n").unwrap();
        bar.inc(2);
        live.gather(&mut out);
        assert_eq!(String::from_utf8_lossy(&out), "first\nfitted 2/4 spectra\n");

        out.clear();
        live.gather(&mut out);
        assert!(out.is_empty(), "nothing new: nothing gathered");

        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(&stdout)
            .unwrap();
        file.write_all(b"second\n").unwrap();
        live.gather(&mut out);
        assert_eq!(String::from_utf8_lossy(&out), "second\n");

        // The process ended and its directory is going: what is left is read first.
        file.write_all(b"last\n").unwrap();
        live.close_files();
        drop(dir);
        out.clear();
        live.gather(&mut out);
        assert_eq!(String::from_utf8_lossy(&out), "last\n");
    }

    /// A writer the test reads back while the narrator holds its own handle.
    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);

    impl Write for Shared {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_narrator_tells_the_last_progress_when_stopped() {
        let bar = ProgressBar::hidden();
        bar.set_length(3);
        let told = Shared::default();
        let narrator = narrate(bar.clone(), told.clone());
        bar.inc(3);
        narrator.stop();
        let text = String::from_utf8(told.0.lock().unwrap().clone()).unwrap();
        assert!(text.ends_with("fitted 3/3 spectra\n"), "{text:?}");
    }
}

//! Application logs: per task a header line, its output and its last error. A running task's
//! output is what its worker has sent so far ([`LiveLogs`]); a finished task's is the one its
//! result carries. With `follow`, the stream stays open until the application ends: running
//! tasks' lines as they arrive, prefixed `[TASK] ` as `kubectl logs --prefix` does, and each
//! task's section once it has finished.

use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use serde_json::Value;
use tokio::sync::mpsc;

use crate::error::ApiError;
use crate::resources::Kind;
use crate::store::Store;

/// The log section of one finished task: its header, the output its result carries, its error.
pub fn section(task: &Value) -> String {
    let mut text = header_line(task);
    for stream in ["stdout", "stderr"] {
        if let Some(out) = task["status"]["result"][stream]
            .as_str()
            .filter(|s| !s.is_empty())
        {
            push_text(&mut text, out);
        }
    }
    text.push_str(&error_line(task));
    text
}

fn header_line(task: &Value) -> String {
    let status = &task["status"];
    format!(
        "==> {} [{}] worker={} attempts={}\n",
        task["metadata"]["name"].as_str().unwrap_or_default(),
        status["state"].as_str().unwrap_or("?"),
        status["worker"].as_str().unwrap_or("-"),
        status["attempts"]
    )
}

fn error_line(task: &Value) -> String {
    task["status"]["error"]
        .as_str()
        .map(|error| format!("error: {error}\n"))
        .unwrap_or_default()
}

/// Appends `out`, ending it with a newline.
fn push_text(text: &mut String, out: &str) {
    text.push_str(out);
    if !out.ends_with('\n') {
        text.push('\n');
    }
}

fn finished(task: &Value) -> bool {
    matches!(
        task["status"]["state"].as_str(),
        Some("Done" | "DeadLettered")
    )
}

async fn tasks_of(
    store: &Store,
    application: &str,
    only: Option<&str>,
) -> Result<Vec<Value>, ApiError> {
    let tasks = store.tasks_of(application).await?;
    Ok(tasks
        .into_iter()
        .filter(|t| only.is_none_or(|o| t["metadata"]["name"] == o))
        .collect())
}

pub async fn logs(
    store: Arc<Store>,
    live: Arc<LiveLogs>,
    application: String,
    only: Option<String>,
    follow: bool,
) -> Result<Response, ApiError> {
    if store
        .get_raw(Kind::Application, &application)
        .await?
        .is_none()
    {
        return Err(ApiError::not_found("Application", &application));
    }
    let content_type = [(header::CONTENT_TYPE, "text/plain; charset=utf-8")];
    if !follow {
        let text: String = tasks_of(&store, &application, only.as_deref())
            .await?
            .iter()
            .map(|task| section_so_far(&live, task))
            .collect();
        return Ok((content_type, text).into_response());
    }
    let mut changes = store.subscribe();
    let mut more_output = live.subscribe();
    let (tx, rx) = mpsc::channel::<Result<Bytes, Infallible>>(64);
    tokio::spawn(async move {
        let mut follower = Follower::default();
        loop {
            // Read the phase first: tasks finished before the application did are then all seen.
            let phase = match store.get(Kind::Application, &application).await {
                Ok(Some(app)) => app["status"]["phase"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                _ => return,
            };
            let Ok(tasks) = tasks_of(&store, &application, only.as_deref()).await else {
                return;
            };
            let text = follower.next(&live, &tasks);
            if !text.is_empty() && tx.send(Ok(Bytes::from(text))).await.is_err() {
                return;
            }
            if matches!(phase.as_str(), "Succeeded" | "Failed") {
                return;
            }
            tokio::select! {
                _ = tx.closed() => return,
                _ = changes.recv() => {}
                _ = more_output.changed() => {}
                _ = tokio::time::sleep(Duration::from_secs(2)) => {}
            }
        }
    });
    Ok((
        content_type,
        Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx)),
    )
        .into_response())
}

/// A task's section as it stands: a running task's output is what has arrived so far.
fn section_so_far(live: &LiveLogs, task: &Value) -> String {
    if finished(task) {
        return section(task);
    }
    let mut text = header_line(task);
    let name = task["metadata"]["name"].as_str().unwrap_or_default();
    if let Some(output) = live
        .read(name, &LogRun::of(task), 0)
        .filter(|o| !o.is_empty())
    {
        push_text(&mut text, &String::from_utf8_lossy(&output));
    }
    text.push_str(&error_line(task));
    text
}

/// What one `logs?follow` stream has shown.
#[derive(Default)]
struct Follower {
    /// Per task: the run whose output is being shown, the bytes of it shown, and the start of
    /// a line not yet complete (held back so every line carries its prefix once).
    streamed: HashMap<String, (LogRun, usize, Vec<u8>)>,
    finished_shown: HashSet<String>,
}

impl Follower {
    /// The text to send next, given the application's tasks now.
    fn next(&mut self, live: &LiveLogs, tasks: &[Value]) -> String {
        let mut text = String::new();
        for task in tasks {
            let name = task["metadata"]["name"].as_str().unwrap_or_default();
            if self.finished_shown.contains(name) {
                continue;
            }
            let done = finished(task);
            let streamed_any = self.stream(live, name, LogRun::of(task), done, &mut text);
            if done {
                self.finished_shown.insert(name.to_string());
                if streamed_any {
                    // Its output is above, line by line: the section says how it ended.
                    text.push_str(&header_line(task));
                    text.push_str(&error_line(task));
                } else {
                    text.push_str(&section(task));
                }
            }
        }
        text
    }

    /// Adds the complete lines of `name`'s output that arrived since the last call (all of it
    /// when `flush`); says whether any of this run's output was ever shown.
    fn stream(
        &mut self,
        live: &LiveLogs,
        name: &str,
        run: LogRun,
        flush: bool,
        text: &mut String,
    ) -> bool {
        let entry = self
            .streamed
            .entry(name.to_string())
            .or_insert_with(|| (run.clone(), 0, Vec::new()));
        if entry.0 != run {
            *entry = (run.clone(), 0, Vec::new());
        }
        let (_, shown, partial) = entry;
        if let Some(fresh) = live.read(name, &run, *shown) {
            *shown += fresh.len();
            partial.extend_from_slice(&fresh);
        }
        let complete = if flush {
            partial.len()
        } else {
            partial
                .iter()
                .rposition(|b| *b == b'\n')
                .map_or(0, |i| i + 1)
        };
        for line in String::from_utf8_lossy(&partial[..complete]).lines() {
            text.push_str(&format!("[{name}] {line}\n"));
        }
        partial.drain(..complete);
        *shown > 0
    }
}

/// Largest part of one running task's output the server keeps; the whole output arrives with
/// the task's result.
pub const LIVE_LOG_LIMIT: usize = 1024 * 1024;
/// Largest chunk a worker sends at once.
pub const LIVE_CHUNK_LIMIT: usize = 64 * 1024;
/// How long a finished task's live output stays for followers that have not caught up.
const FINISHED_KEPT: Duration = Duration::from_secs(60);

/// Which run of a task a chunk belongs to: a new attempt, or a task recreated under the same
/// name, starts a new log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogRun {
    pub uid: String,
    pub attempt: u64,
}

impl LogRun {
    pub fn of(task: &Value) -> Self {
        LogRun {
            uid: task["metadata"]["uid"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
            attempt: task["status"]["attempts"].as_u64().unwrap_or_default(),
        }
    }
}

/// The output a worker has sent of one run so far.
#[derive(Debug)]
struct LiveLog {
    run: LogRun,
    text: Vec<u8>,
    /// Bytes of the worker's stream accounted for: what is in `text`, lost or cut.
    received: u64,
    cut: bool,
    finished: Option<std::time::Instant>,
}

impl LiveLog {
    fn new(run: LogRun) -> Self {
        LiveLog {
            run,
            text: Vec::new(),
            received: 0,
            cut: false,
            finished: None,
        }
    }

    /// Appends the part of `chunk` (bytes `offset..` of the worker's stream) not yet received.
    /// A chunk sent again (its answer was lost) adds nothing; bytes that never arrived (the
    /// worker's own buffer overflowed while the link was down) are marked, not hidden.
    fn append(&mut self, offset: u64, chunk: &[u8]) {
        let end = offset + chunk.len() as u64;
        if end <= self.received {
            return;
        }
        let fresh = if offset >= self.received {
            if offset > self.received {
                let lost = offset - self.received;
                self.push(format!("[... {lost} bytes of output not received ...]\n").as_bytes());
            }
            chunk
        } else {
            &chunk[(self.received - offset) as usize..]
        };
        self.push(fresh);
        self.received = end;
    }

    fn push(&mut self, bytes: &[u8]) {
        if self.cut {
            return;
        }
        let room = LIVE_LOG_LIMIT.saturating_sub(self.text.len());
        if bytes.len() <= room {
            self.text.extend_from_slice(bytes);
        } else {
            self.text.extend_from_slice(&bytes[..room]);
            self.text.extend_from_slice(
                format!(
                    "\n[... live output cut at {} KiB: the whole output comes with the result ...]\n",
                    LIVE_LOG_LIMIT / 1024
                )
                .as_bytes(),
            );
            self.cut = true;
        }
    }
}

/// The output of running tasks as their workers send it, held in memory: what `logs?follow`
/// shows while a task runs. It is a view, not a record: a server restart forgets it, and each
/// task's result carries its whole output.
#[derive(Debug)]
pub struct LiveLogs {
    logs: std::sync::Mutex<HashMap<String, LiveLog>>,
    /// Bumped on every change, for followers to wait on.
    version: tokio::sync::watch::Sender<u64>,
}

impl Default for LiveLogs {
    fn default() -> Self {
        LiveLogs {
            logs: Default::default(),
            version: tokio::sync::watch::channel(0).0,
        }
    }
}

impl LiveLogs {
    /// Takes bytes `offset..` of `task`'s output in `run`; answers how many bytes of the stream
    /// the server now accounts for (the worker forgets what lies before).
    pub fn append(&self, task: &str, run: LogRun, offset: u64, chunk: &[u8]) -> u64 {
        let mut logs = self.logs.lock().unwrap_or_else(|e| e.into_inner());
        logs.retain(|_, log| log.finished.is_none_or(|at| at.elapsed() < FINISHED_KEPT));
        let log = logs
            .entry(task.to_string())
            .or_insert_with(|| LiveLog::new(run.clone()));
        if log.run != run {
            *log = LiveLog::new(run);
        }
        log.append(offset, chunk);
        let received = log.received;
        drop(logs);
        self.version.send_modify(|v| *v += 1);
        received
    }

    /// The task's run ended (completed, failed or taken back): its log stays a short while for
    /// followers, then goes.
    pub fn finish(&self, task: &str) {
        let mut logs = self.logs.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(log) = logs.get_mut(task) {
            log.finished.get_or_insert_with(std::time::Instant::now);
        }
        drop(logs);
        self.version.send_modify(|v| *v += 1);
    }

    /// The output of `task`'s `run` from byte `from` of what is kept.
    pub fn read(&self, task: &str, run: &LogRun, from: usize) -> Option<Vec<u8>> {
        let logs = self.logs.lock().unwrap_or_else(|e| e.into_inner());
        logs.get(task)
            .filter(|log| &log.run == run)
            .map(|log| log.text.get(from..).unwrap_or_default().to_vec())
    }

    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.version.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn run(attempt: u64) -> LogRun {
        LogRun {
            uid: "u1".into(),
            attempt,
        }
    }

    fn task(state: &str, attempts: u64) -> Value {
        json!({"metadata": {"name": "t", "uid": "u1"},
               "status": {"state": state, "attempts": attempts, "worker": "w",
                          "result": {"stdout": "a\nb\n"}}})
    }

    fn kept(logs: &LiveLogs, run: &LogRun) -> String {
        String::from_utf8(logs.read("t", run, 0).unwrap()).unwrap()
    }

    #[test]
    fn chunks_sent_again_add_nothing_and_lost_bytes_are_marked() {
        let logs = LiveLogs::default();
        assert_eq!(logs.append("t", run(1), 0, b"hello "), 6);
        // The answer was lost and the worker sends the same bytes, and more, again.
        assert_eq!(logs.append("t", run(1), 0, b"hello world\n"), 12);
        assert_eq!(logs.append("t", run(1), 6, b"world\n"), 12);
        assert_eq!(kept(&logs, &run(1)), "hello world\n");
        // The worker's own buffer overflowed while the link was down.
        assert_eq!(logs.append("t", run(1), 20, b"late\n"), 25);
        assert_eq!(
            kept(&logs, &run(1)),
            "hello world\n[... 8 bytes of output not received ...]\nlate\n"
        );
        // Another attempt starts a new log; the old one is no longer shown.
        assert_eq!(logs.append("t", run(2), 0, b"again\n"), 6);
        assert_eq!(logs.read("t", &run(1), 0), None);
        assert_eq!(kept(&logs, &run(2)), "again\n");
    }

    #[test]
    fn a_runs_log_is_cut_at_its_limit_once() {
        let logs = LiveLogs::default();
        let chunk = vec![b'x'; LIVE_CHUNK_LIMIT];
        let mut offset = 0;
        for _ in 0..(LIVE_LOG_LIMIT / LIVE_CHUNK_LIMIT + 2) {
            offset = logs.append("t", run(1), offset, &chunk);
        }
        let text = kept(&logs, &run(1));
        assert_eq!(text.matches("live output cut").count(), 1);
        assert!(text.len() < LIVE_LOG_LIMIT + 200, "{}", text.len());
        assert_eq!(
            offset,
            ((LIVE_LOG_LIMIT / LIVE_CHUNK_LIMIT + 2) * LIVE_CHUNK_LIMIT) as u64
        );
    }

    #[test]
    fn a_follower_shows_whole_lines_once_then_how_the_task_ended() {
        let logs = LiveLogs::default();
        let mut follower = Follower::default();
        assert_eq!(follower.next(&logs, &[task("Leased", 1)]), "");
        logs.append("t", run(1), 0, b"a\nb");
        // The unfinished line waits for its end.
        assert_eq!(follower.next(&logs, &[task("Leased", 1)]), "[t] a\n");
        assert_eq!(follower.next(&logs, &[task("Leased", 1)]), "");
        logs.append("t", run(1), 3, b"\n");
        logs.finish("t");
        // Done: the rest of the lines, then the header without the output again.
        assert_eq!(
            follower.next(&logs, &[task("Done", 1)]),
            "[t] b\n==> t [Done] worker=w attempts=1\n"
        );
        assert_eq!(follower.next(&logs, &[task("Done", 1)]), "");
    }

    #[test]
    fn a_task_never_streamed_shows_its_results_output() {
        let logs = LiveLogs::default();
        let mut follower = Follower::default();
        assert_eq!(
            follower.next(&logs, &[task("Done", 1)]),
            "==> t [Done] worker=w attempts=1\na\nb\n"
        );
        // Without follow: a running task shows what has arrived so far.
        logs.append("t", run(1), 0, b"so far");
        assert_eq!(
            section_so_far(&logs, &task("Leased", 1)),
            "==> t [Leased] worker=w attempts=1\nso far\n"
        );
    }
}

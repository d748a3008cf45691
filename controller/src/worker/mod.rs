//! `ceccm worker`: leases tasks of one region over HTTP and runs them: a command task as a
//! child process, an astro-fit task's stage with the astro-fit library (inputs fetched and
//! cached by the data plane, outputs uploaded as artifacts). It heartbeats while a task runs
//! and reports the result (or the failure) with the CPU time it used. Requests and answers are
//! the server's own typed wire structs.

pub mod amqp;
pub mod data;
pub mod held;
pub mod live;
pub mod oci;
pub mod outbox;
pub mod stage;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::astro_fit::AstroFitWork;
use crate::queue::{
    CompleteRequest, FailRequest, HeartbeatRequest, LeaseRequest, MAX_OUTPUT_BYTES,
};
use crate::resources::{TaskObject, TaskSpec};
use ceccm_federation::region::Runtime;
use data::DataPlane;

#[derive(Debug, Clone)]
pub struct WorkerOptions {
    pub server: String,
    pub region: String,
    pub worker_id: String,
    pub lease_seconds: u32,
    /// Leave after this long without work.
    pub idle_exit: Duration,
    /// The region's cache of inputs (shared by the region's workers), and scratch space.
    pub cache_dir: PathBuf,
    /// The server's data directory, for a worker on the server's own host (the local
    /// driver's): inputs are hard-linked from it rather than downloaded.
    pub server_data_dir: Option<PathBuf>,
    /// A CA to trust for an https server (`--ca-file`, `$CECCM_CA_FILE`).
    pub ca_file: Option<PathBuf>,
    /// Most bytes of unsent results kept in the region's outbox before the worker stops
    /// taking work.
    pub outbox_max_bytes: u64,
    /// Tasks leased ahead of the one running (their leases renewed with it), so that a worker
    /// cut off from the server keeps working through them.
    pub prefetch: u32,
    /// How tasks run: this worker's own processes, or OCI containers (the region's runtime).
    pub runtime: Runtime,
    /// The OCI image layout containers are made from.
    pub image_store: PathBuf,
    /// How tasks arrive: leased from the server (embedded), or consumed from RabbitMQ.
    pub transport: crate::amqp::Transport,
}

/// The default bound of a region's outbox.
pub const DEFAULT_OUTBOX_MAX_BYTES: u64 = 4 << 30;

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("HTTP: {0}")]
    Http(#[from] reqwest::Error),
    #[error("server answered {status}: {body}")]
    Status { status: u16, body: String },
}

/// The environment variable a worker finds its token in.
pub const TOKEN_ENV: &str = "CECCM_TOKEN";

/// The default cache of a region's workers: `DATA_DIR/cache/REGION` for the local driver.
pub fn default_cache_dir(region: &str) -> PathBuf {
    std::env::temp_dir().join("ceccm-cache").join(region)
}

pub async fn run(options: WorkerOptions) -> anyhow::Result<()> {
    let token = std::env::var(TOKEN_ENV).map_err(|_| {
        anyhow::anyhow!(
            "a worker needs its region's token in ${TOKEN_ENV} (the local driver sets it)"
        )
    })?;
    let client = crate::tokens::client_with_token(
        crate::tls::trusting(
            reqwest::Client::builder().timeout(Duration::from_secs(300)),
            options.ca_file.as_deref(),
        )?,
        &token,
    )?;
    let data = DataPlane::new(
        client.clone(),
        &options.server,
        options.cache_dir.clone(),
        options.server_data_dir.clone(),
    );
    // Results kept while the server was out of reach go first, whichever worker kept them.
    let outbox = outbox::Outbox::new(options.cache_dir.join("outbox"), options.outbox_max_bytes);
    outbox.flush(&data, &client, &options.server).await;
    let mut warm = stage::StageRunner::default();
    if let crate::amqp::Transport::Amqp(url) = &options.transport {
        return amqp::consume(&client, &options, &data, &outbox, &mut warm, url).await;
    }
    let parent = std::os::unix::process::parent_id();
    let mut idle_since = Instant::now();
    let mut backoff = Duration::from_millis(50);
    let mut held: std::collections::VecDeque<Leased> = std::collections::VecDeque::new();
    let kept = held::HeldLeases::new(held::held_dir(&options.cache_dir));
    loop {
        // A worker whose server died (it was re-parented) has nobody to report to.
        if std::os::unix::process::parent_id() != parent {
            return Ok(());
        }
        if !outbox
            .room_for_work(
                &data,
                &client,
                &options.server,
                idle_since.elapsed(),
                options.idle_exit,
            )
            .await?
        {
            continue;
        }
        // Lease the next task, and as many ahead as asked, while the server answers.
        // `asked`: why the topping up stopped (nothing queued, or the server out of reach).
        let mut asked = Ok(());
        // Leases a gone worker of the region held (its host restarted, perhaps while cut
        // off) come before new ones.
        let room = (options.prefetch as usize + 1).saturating_sub(held.len());
        let orphans = kept.claim_orphans(room);
        let adopted = !orphans.is_empty();
        for (lease, claim) in orphans {
            tracing::info!(
                task = lease.task.metadata.name,
                "taking over a lease a gone worker held"
            );
            held.push_back(Leased {
                task: lease.task,
                secret: lease.secret,
                claim: Some(claim),
            });
        }
        if adopted {
            // Where the server answers, a lease it handed on meanwhile is not run again.
            renew_ahead(&client, &options, &mut held, Duration::from_secs(5)).await;
        }
        while held.len() <= options.prefetch as usize {
            match lease(&client, &options).await {
                Ok(Some(mut leased)) => {
                    let lease = held::KeptLease {
                        task: leased.task.clone(),
                        secret: leased.secret.clone(),
                    };
                    match kept.keep(&lease) {
                        Ok(claim) => leased.claim = Some(claim),
                        Err(e) => tracing::warn!(error = %e, "cannot keep the lease on disk"),
                    }
                    held.push_back(leased)
                }
                Ok(None) => break,
                Err(e) => {
                    asked = Err(e);
                    break;
                }
            }
        }
        if let Some(next) = held.pop_front() {
            run_task(
                &client, &options, &data, &outbox, &mut warm, next, &mut held,
            )
            .await;
            idle_since = Instant::now();
            backoff = Duration::from_millis(50);
            continue;
        }
        match asked {
            Ok(()) => {
                if idle_since.elapsed() >= options.idle_exit {
                    return Ok(());
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_millis(500));
            }
            Err(e) => {
                tracing::warn!(error = %e, "lease failed");
                if idle_since.elapsed() >= options.idle_exit {
                    return Err(e.into());
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}

/// A task this worker leased, with the lease's secret (sent with every report on it) and its
/// hold on the lease's copy on disk.
struct Leased {
    task: TaskObject,
    secret: String,
    claim: Option<held::Claim>,
}

impl Leased {
    /// Done with the lease: its copy on disk goes.
    fn release(self) {
        if let Some(claim) = self.claim {
            claim.release();
        }
    }
}

async fn post<B: Serialize, R: DeserializeOwned>(
    client: &reqwest::Client,
    url: String,
    lease_secret: &str,
    body: &B,
) -> Result<Option<R>, WorkerError> {
    let response = client
        .post(url)
        .header(crate::api::LEASE_SECRET_HEADER, lease_secret)
        .json(body)
        .send()
        .await?;
    match answered(response).await? {
        Some(response) => Ok(Some(response.json().await?)),
        None => Ok(None),
    }
}

/// A successful answer (`None` for 204 No Content), or the server's refusal as an error.
async fn answered(response: reqwest::Response) -> Result<Option<reqwest::Response>, WorkerError> {
    let status = response.status();
    if status == reqwest::StatusCode::NO_CONTENT {
        return Ok(None);
    }
    if !status.is_success() {
        return Err(WorkerError::Status {
            status: status.as_u16(),
            body: response.text().await.unwrap_or_default(),
        });
    }
    Ok(Some(response))
}

async fn lease(client: &reqwest::Client, o: &WorkerOptions) -> Result<Option<Leased>, WorkerError> {
    let request = LeaseRequest {
        worker: o.worker_id.clone(),
        region: o.region.clone(),
        lease_seconds: o.lease_seconds,
        task: None,
    };
    let response = client
        .post(format!("{}/api/v1/tasks:lease", o.server))
        .timeout(Duration::from_secs(10))
        .json(&request)
        .send()
        .await?;
    let Some(response) = answered(response).await? else {
        return Ok(None);
    };
    let secret = response
        .headers()
        .get(crate::api::LEASE_SECRET_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    Ok(Some(Leased {
        task: response.json().await?,
        secret,
        claim: None,
    }))
}

/// CPU seconds used by this process and its waited-for children so far.
fn cpu_seconds() -> f64 {
    process_cpu_seconds(true)
}

/// CPU seconds (user + system) this process has used so far, with those of its waited-for
/// children if `with_children` (0 where `/proc` cannot tell).
pub fn process_cpu_seconds(with_children: bool) -> f64 {
    std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|stat| {
            let rest = &stat[stat.rfind(')')? + 1..];
            let fields: Vec<&str> = rest.split_whitespace().collect();
            // utime, stime, cutime and cstime are fields 14-17; `rest` starts at field 3.
            let last = if with_children { 15 } else { 13 };
            let ticks: f64 = fields
                .get(11..last)?
                .iter()
                .map(|f| f.parse::<f64>().unwrap_or(0.0))
                .sum();
            // /proc counts in USER_HZ, 100 on Linux whatever the kernel's tick.
            Some(ticks / 100.0)
        })
        .unwrap_or(0.0)
}

fn truncated(bytes: &[u8]) -> String {
    let cut = &bytes[..bytes.len().min(MAX_OUTPUT_BYTES)];
    String::from_utf8_lossy(cut).into_owned()
}

/// How a task ended, as the worker reports it.
enum Ending {
    Done {
        result: serde_json::Value,
        /// `(artifact name, file)`: what the task made, uploaded before the completion.
        files: Vec<(String, PathBuf)>,
        /// Holds the files until they are in the outbox.
        scratch: Option<tempfile::TempDir>,
    },
    Failed {
        error: String,
        permanent: bool,
        /// Kubernetes' name for it, where there is one (`OOMKilled`, ...).
        reason: Option<&'static str>,
    },
}

/// What became of a task's report (a transport acknowledges its message by it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reported {
    /// The server took it; `dead_lettered` when it was the task's last failed attempt.
    Taken { dead_lettered: bool },
    /// The server no longer counts it (decided already, or the task moved).
    Refused,
    /// Kept in the outbox until the server takes it.
    Kept,
    /// The lease was lost while the task ran: nothing was reported.
    LeaseLost,
    /// The report could not be kept (the outbox failed): the lease will expire.
    Lost,
}

async fn run_task(
    client: &reqwest::Client,
    o: &WorkerOptions,
    data: &DataPlane,
    outbox: &outbox::Outbox,
    warm: &mut stage::StageRunner,
    leased: Leased,
    ahead: &mut std::collections::VecDeque<Leased>,
) -> Reported {
    let Leased {
        task,
        secret,
        claim,
    } = leased;
    let release = move || {
        if let Some(claim) = claim {
            claim.release();
        }
    };
    let name = task.metadata.name.clone();
    let base = format!("{}/api/v1/tasks/{name}", o.server);
    let heartbeat_every = Duration::from_millis(u64::from(o.lease_seconds) * 1000 / 3)
        .max(Duration::from_millis(100));
    let cpu_before = cpu_seconds();
    // Wall time of the work itself, the predictor's target (lease and report latency excluded).
    let started = Instant::now();
    let output = live::LiveOutput::default();
    let log = live::LogStream::start(client, &o.server, &name, &secret, output.clone());
    let work = async {
        let run = async {
            match &task.spec.astro_fit {
                Some(fit) => run_astro_fit(o, data, warm, &task.spec, fit, &name, &output).await,
                None => run_command(o, &task.spec, &name, &output).await,
            }
        };
        // A container is killed by its own watchdog (oci.rs); here, dropping the work kills
        // a command's process. An astro-fit stage on the worker's own thread cannot be
        // killed: its answer is dropped, and the thread is busy until the stage ends.
        match task
            .spec
            .deadline()
            .filter(|_| o.runtime == Runtime::Process)
        {
            Some(deadline) => tokio::time::timeout(deadline, run)
                .await
                .unwrap_or_else(|_| deadline_exceeded(deadline)),
            None => run.await,
        }
    };
    tokio::pin!(work);
    let mut ticker = tokio::time::interval(heartbeat_every);
    ticker.tick().await;
    let ending = loop {
        tokio::select! {
            ending = &mut work => break ending,
            _ = ticker.tick() => {
                let request = HeartbeatRequest {
                    worker: o.worker_id.clone(),
                    lease_seconds: o.lease_seconds,
                };
                // Bounded: a link that is down must not hold up the work's own ending.
                let beat = tokio::time::timeout(
                    heartbeat_every,
                    post::<_, serde_json::Value>(client, format!("{base}/heartbeat"), &secret, &request),
                )
                .await
                .unwrap_or(Ok(None));
                if let Err(WorkerError::Status { status: 404 | 409, .. }) = beat {
                    // The lease is gone (expired and handed on, or the task deleted): stop.
                    tracing::warn!(task = name, "lease lost; abandoning the task");
                    release();
                    return Reported::LeaseLost;
                }
                renew_ahead(client, o, ahead, heartbeat_every).await;
            }
        }
    };
    let cpu = (cpu_seconds() - cpu_before).max(0.0);
    // A task too quick for the clock reports nothing measured rather than zero seconds.
    let seconds = Some(started.elapsed().as_secs_f64()).filter(|s| *s > 0.0);
    // The last lines before the result, so that followers see them in order.
    log.finish().await;
    let (report, files, _scratch) = match ending {
        Ending::Done {
            result,
            files,
            scratch,
        } => (
            outbox::Report::Complete(CompleteRequest {
                worker: o.worker_id.clone(),
                result,
                cpu_seconds: cpu,
                seconds,
                joules: None,
                artifacts: Vec::new(),
            }),
            files,
            scratch,
        ),
        Ending::Failed {
            error,
            permanent,
            reason,
        } => (
            outbox::Report::Fail(FailRequest {
                worker: o.worker_id.clone(),
                error,
                cpu_seconds: cpu,
                permanent,
                reason: reason.map(str::to_string),
            }),
            Vec::new(),
            None,
        ),
    };
    // On disk first: a result survives the link, the worker and the host's power going down.
    let entry = outbox::Entry {
        task: name.clone(),
        lease_secret: secret,
        report,
        files: Vec::new(),
    };
    let kept = match outbox.put(&entry, &files) {
        Ok(kept) => kept,
        Err(e) => {
            tracing::error!(task = name, error = %e, "cannot keep the task's result in the outbox");
            return Reported::Lost;
        }
    };
    // The outbox has the result now: the lease's own copy is no longer needed.
    release();
    match outbox::send(&kept, data, client, &o.server).await {
        Ok(outbox::Sent::Kept) => {
            tracing::warn!(
                task = name,
                "server out of reach: the result waits in the outbox"
            );
            Reported::Kept
        }
        Ok(outbox::Sent::Delivered { dead_lettered }) => Reported::Taken { dead_lettered },
        Ok(outbox::Sent::Refused { .. }) => Reported::Refused,
        Err(e) => {
            tracing::warn!(task = name, error = %e, "sending the result failed");
            Reported::Kept
        }
    }
}

/// Renews the leases of the tasks held ahead; drops those the server took back.
async fn renew_ahead(
    client: &reqwest::Client,
    o: &WorkerOptions,
    ahead: &mut std::collections::VecDeque<Leased>,
    within: Duration,
) {
    let request = HeartbeatRequest {
        worker: o.worker_id.clone(),
        lease_seconds: o.lease_seconds,
    };
    let mut kept = std::collections::VecDeque::with_capacity(ahead.len());
    while let Some(leased) = ahead.pop_front() {
        let url = format!(
            "{}/api/v1/tasks/{}/heartbeat",
            o.server, leased.task.metadata.name
        );
        let beat = tokio::time::timeout(
            within,
            post::<_, serde_json::Value>(client, url, &leased.secret, &request),
        )
        .await
        .unwrap_or(Ok(None));
        match beat {
            Err(WorkerError::Status {
                status: 404 | 409, ..
            }) => {
                tracing::info!(
                    task = leased.task.metadata.name,
                    "a task held ahead was taken back"
                );
                leased.release();
            }
            _ => kept.push_back(leased),
        }
    }
    *ahead = kept;
}

async fn run_command(
    o: &WorkerOptions,
    spec: &TaskSpec,
    name: &str,
    live: &live::LiveOutput,
) -> Ending {
    match (o.runtime, &spec.image) {
        (Runtime::Oci, Some(image)) => {
            return run_command_in_container(o, spec, name, image, live).await;
        }
        (Runtime::Oci, None) => {
            return Ending::Failed {
                error: format!(
                    "region {} runs containers and the task names no image",
                    o.region
                ),
                permanent: true,
                reason: Some("ContainerCannotRun"),
            };
        }
        (Runtime::Process, _) => {}
    }
    // Output goes to files, not pipes, so that it can be sent while the command runs.
    let scratch = match tempfile::Builder::new()
        .prefix(&format!("{name}-"))
        .tempdir_in(&o.cache_dir)
    {
        Ok(dir) => dir,
        Err(e) => return failed(format!("scratch directory: {e}"), false),
    };
    let (stdout, stderr) = output_files(scratch.path());
    let files =
        std::fs::File::create(&stdout).and_then(|out| Ok((out, std::fs::File::create(&stderr)?)));
    let (out_file, err_file) = match files {
        Ok(files) => files,
        Err(e) => return failed(format!("output files: {e}"), false),
    };
    live.follow_file(stdout.clone());
    live.follow_file(stderr.clone());
    let status = tokio::process::Command::new(&spec.command)
        .args(&spec.args)
        .envs(&spec.env)
        .env("CECCM_TASK", name)
        .env("CECCM_TASK_INDEX", spec.index.to_string())
        .env("CECCM_REGION", &o.region)
        .stdin(std::process::Stdio::null())
        .stdout(out_file)
        .stderr(err_file)
        .process_group(0)
        .kill_on_drop(true)
        .spawn();
    let status = match status {
        Ok(mut child) => {
            let _group = child.id().map(ProcessGroup);
            child.wait().await
        }
        Err(e) => Err(e),
    };
    live.close_files();
    let read = |p: &std::path::Path| truncated(&std::fs::read(p).unwrap_or_default());
    match status {
        Ok(status) if status.success() => Ending::Done {
            result: serde_json::json!({"exitCode": 0, "stdout": read(&stdout),
                                       "stderr": read(&stderr)}),
            files: Vec::new(),
            scratch: None,
        },
        Ok(status) => Ending::Failed {
            error: format!("exit status {status}: {}", read(&stderr).trim_end()),
            permanent: false,
            reason: Some("Error"),
        },
        Err(e) => Ending::Failed {
            error: format!("could not start {:?}: {e}", spec.command),
            permanent: false,
            reason: Some("ContainerCannotRun"),
        },
    }
}

/// A command's process group, killed whole when the task ends or is abandoned (its deadline
/// passed, its lease was lost): what a shell started goes with it, as a container's processes
/// go with the container.
struct ProcessGroup(u32);

impl Drop for ProcessGroup {
    #[allow(unsafe_code)]
    fn drop(&mut self) {
        if let Ok(group) = libc::pid_t::try_from(self.0) {
            // SAFETY: killpg takes plain integers; a group with no processes left is ESRCH.
            unsafe { libc::killpg(group, libc::SIGKILL) };
        }
    }
}

/// Where a task's process (or container) in `scratch` writes its stdout and stderr.
fn output_files(scratch: &std::path::Path) -> (PathBuf, PathBuf) {
    (scratch.join("stdout"), scratch.join("stderr"))
}

/// A unique container id for `task` on this host.
fn container_id(o: &WorkerOptions, task: &str) -> String {
    format!("{}-{task}-{}", o.worker_id, uuid::Uuid::new_v4().simple())
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        .take(128)
        .collect()
}

/// Runs `run` in a container (off the async workers) and says how it ended, as a task.
async fn contained(
    o: &WorkerOptions,
    image: &str,
    mut run: oci::ContainerRun,
) -> Result<(oci::ContainerEnd, String, String), Ending> {
    let store = crate::image::ImageStore::new(o.image_store.clone());
    let image = image.to_string();
    let state = o.cache_dir.join("containers");
    tokio::task::spawn_blocking(move || {
        run.rootfs = match store.rootfs(&image) {
            Ok(rootfs) => rootfs,
            Err(e @ crate::image::ImageError::NotFound(_)) => {
                return Err(Ending::Failed {
                    error: e.to_string(),
                    permanent: false,
                    reason: Some("ImageNotFound"),
                });
            }
            Err(e) => return Err(failed_because(e, "ContainerCannotRun")),
        };
        let end = oci::run(&run, &state).map_err(|e| failed_because(e, "ContainerCannotRun"))?;
        let read = |p: &std::path::Path| truncated(&std::fs::read(p).unwrap_or_default());
        Ok((end, read(&run.stdout), read(&run.stderr)))
    })
    .await
    .unwrap_or_else(|e| Err(failed(format!("the container runner stopped: {e}"), false)))
}

/// What an ending other than exit status 0 means for the task.
fn container_failure(end: oci::ContainerEnd, memory_mib: Option<u64>, stderr: &str) -> Ending {
    match end {
        oci::ContainerEnd::OomKilled => Ending::Failed {
            error: format!(
                "the container went past its memory limit ({} MiB)",
                memory_mib.map_or("no".into(), |m| m.to_string())
            ),
            permanent: false,
            reason: Some("OOMKilled"),
        },
        oci::ContainerEnd::Exited(code) => Ending::Failed {
            error: format!("exit status {code}: {}", stderr.trim_end()),
            permanent: false,
            reason: Some("Error"),
        },
        oci::ContainerEnd::DeadlineExceeded => Ending::Failed {
            error: "the container ran past its deadline and was killed".into(),
            permanent: false,
            reason: Some("DeadlineExceeded"),
        },
        oci::ContainerEnd::Signalled(signal) => Ending::Failed {
            error: format!("killed by signal {signal}: {}", stderr.trim_end()),
            permanent: false,
            reason: Some("Error"),
        },
    }
}

fn deadline_exceeded(deadline: Duration) -> Ending {
    Ending::Failed {
        error: format!(
            "ran past its deadline ({} s) and was stopped",
            deadline.as_secs()
        ),
        permanent: false,
        reason: Some("DeadlineExceeded"),
    }
}

fn failed_because(error: impl std::fmt::Display, reason: &'static str) -> Ending {
    Ending::Failed {
        error: error.to_string(),
        permanent: false,
        reason: Some(reason),
    }
}

/// A command task in its image: nothing of the host but a scratch `/out`.
async fn run_command_in_container(
    o: &WorkerOptions,
    spec: &TaskSpec,
    name: &str,
    image: &str,
    live: &live::LiveOutput,
) -> Ending {
    let scratch = match tempfile::Builder::new()
        .prefix(&format!("{name}-"))
        .tempdir_in(&o.cache_dir)
    {
        Ok(dir) => dir,
        Err(e) => return failed(format!("scratch directory: {e}"), false),
    };
    let out = scratch.path().join("out");
    if let Err(e) = std::fs::create_dir_all(&out) {
        return failed(format!("scratch directory: {e}"), false);
    }
    let mut env: Vec<String> = spec.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
    env.extend([
        "PATH=/usr/local/bin".to_string(),
        format!("CECCM_TASK={name}"),
        format!("CECCM_TASK_INDEX={}", spec.index),
        format!("CECCM_REGION={}", o.region),
    ]);
    let run = oci::ContainerRun {
        id: container_id(o, name),
        rootfs: PathBuf::new(),
        args: std::iter::once(spec.command.clone())
            .chain(spec.args.iter().cloned())
            .collect(),
        env,
        binds: vec![oci::Bind {
            source: out,
            destination: "/out".into(),
            writable: true,
        }],
        memory_limit_bytes: spec.memory_mib.map(|m| m << 20),
        cpus: Some(spec.cores()),
        stdout: output_files(scratch.path()).0,
        stderr: output_files(scratch.path()).1,
        deadline: spec.deadline(),
    };
    live.follow_file(run.stdout.clone());
    live.follow_file(run.stderr.clone());
    let ended = contained(o, image, run).await;
    live.close_files();
    match ended {
        Err(ending) => ending,
        Ok((oci::ContainerEnd::Exited(0), stdout, stderr)) => Ending::Done {
            result: serde_json::json!({"exitCode": 0, "stdout": stdout, "stderr": stderr}),
            files: Vec::new(),
            scratch: None,
        },
        Ok((end, _, stderr)) => container_failure(end, spec.memory_mib, &stderr),
    }
}

fn failed(error: impl std::fmt::Display, permanent: bool) -> Ending {
    Ending::Failed {
        error: error.to_string(),
        permanent,
        reason: None,
    }
}

/// Fetches the stage's inputs, runs it off the async workers, uploads what it made.
async fn run_astro_fit(
    o: &WorkerOptions,
    data: &DataPlane,
    warm: &mut stage::StageRunner,
    spec: &TaskSpec,
    work: &AstroFitWork,
    name: &str,
    live: &live::LiveOutput,
) -> Ending {
    let fetching = Instant::now();
    let mark = data.mark();
    let inputs = match fetch_inputs(data, &spec.application, work).await {
        Ok(inputs) => inputs,
        Err(e) => return e,
    };
    let fetch_seconds = fetching.elapsed().as_secs_f64();
    let scratch = match tempfile::Builder::new()
        .prefix(&format!("{name}-"))
        .tempdir_in(data.cache_dir())
    {
        Ok(dir) => dir,
        Err(e) => return failed(format!("scratch directory: {e}"), false),
    };
    let output = match o.runtime {
        Runtime::Process => {
            let progress = indicatif::ProgressBar::hidden();
            live.follow_progress(progress.clone());
            match warm
                .run(work.clone(), inputs, scratch.path().to_path_buf(), progress)
                .await
            {
                Ok(output) => output,
                Err(e) => return failed(e.message, e.permanent),
            }
        }
        Runtime::Oci => {
            let image = spec
                .image
                .clone()
                .unwrap_or_else(|| crate::image::ASTRO_FIT_IMAGE.into());
            let (stdout, stderr) = output_files(scratch.path());
            live.follow_file(stdout);
            live.follow_file(stderr);
            let staged = stage_in_container(o, spec, work, inputs, scratch.path(), name, &image);
            let staged = staged.await;
            live.close_files();
            match staged {
                Ok(output) => output,
                Err(ending) => return ending,
            }
        }
    };
    tracing::debug!(task = name, region = o.region, "stage done");
    let mut result = output.result;
    if let Some(fields) = result.as_object_mut() {
        // Where the task's time went besides the science, for the dispatch overhead.
        fields.insert("fetchSeconds".into(), fetch_seconds.into());
        // What this task downloaded and found in the region's cache.
        fields.insert(
            "transfers".into(),
            serde_json::to_value(data.transfers_since(mark)).unwrap_or_default(),
        );
    }
    Ending::Done {
        result,
        files: output
            .files
            .iter()
            .map(|(file, path)| (file.clone(), path.clone()))
            .collect(),
        scratch: Some(scratch),
    }
}

/// An astro-fit stage in its image: the inputs (linked into `scratch/in`, and the templates)
/// bound read-only, `scratch/out` writable; `ceccm stage-run` inside writes the stage's files
/// and what it reports there.
async fn stage_in_container(
    o: &WorkerOptions,
    spec: &TaskSpec,
    work: &AstroFitWork,
    inputs: stage::StageInputs,
    scratch: &std::path::Path,
    name: &str,
    image: &str,
) -> Result<stage::StageOutput, Ending> {
    let inside = stage::container_job(work, &inputs, &scratch.join("in"))
        .map_err(|e| failed(format!("staging the inputs: {e}"), false))?;
    let out = scratch.join("out");
    std::fs::create_dir_all(&out).map_err(|e| failed(format!("scratch directory: {e}"), false))?;
    let run = oci::ContainerRun {
        id: container_id(o, name),
        rootfs: PathBuf::new(),
        args: vec![
            crate::image::CECCM_IN_IMAGE.into(),
            "stage-run".into(),
            "--job".into(),
            inside,
            "--out".into(),
            "/out".into(),
        ],
        env: vec!["PATH=/usr/local/bin".into()],
        binds: vec![
            oci::Bind {
                source: scratch.join("in"),
                destination: "/in".into(),
                writable: false,
            },
            oci::Bind {
                source: inputs.templates.clone(),
                destination: "/templates".into(),
                writable: false,
            },
            oci::Bind {
                source: out.clone(),
                destination: "/out".into(),
                writable: true,
            },
        ],
        memory_limit_bytes: spec.memory_mib.map(|m| m << 20),
        cpus: Some(spec.cores()),
        stdout: output_files(scratch).0,
        stderr: output_files(scratch).1,
        deadline: spec.deadline(),
    };
    match contained(o, image, run).await? {
        (oci::ContainerEnd::Exited(_), _, stderr) => {
            stage::container_outcome(&out).map_err(|(message, permanent)| Ending::Failed {
                error: if message.is_empty() { stderr } else { message },
                permanent,
                reason: Some("Error"),
            })
        }
        (end, _, stderr) => Err(container_failure(end, spec.memory_mib, &stderr)),
    }
}

async fn fetch_inputs(
    data: &DataPlane,
    application: &str,
    work: &AstroFitWork,
) -> Result<stage::StageInputs, Ending> {
    let fetch_failed = |e: data::DataError| failed(&e, e.permanent());
    let cube = patiently(|| data.dataset(&work.cube))
        .await
        .map_err(fetch_failed)?;
    // A gzipped cube is decompressed once per region: every chunk reads only its rows.
    let cube = if crate::image::is_gzip(&cube) {
        data.derived(&cube, "fits", |gz, fits| {
            let mut input = flate2::read::MultiGzDecoder::new(
                std::fs::File::open(gz).map_err(|e| e.to_string())?,
            );
            let mut output = std::fs::File::create(fits).map_err(|e| e.to_string())?;
            std::io::copy(&mut input, &mut output)
                .map(|_| ())
                .map_err(|e| format!("decompressing the cube: {e}"))
        })
        .await
        .map_err(|e| failed(e, true))?
    } else if is_tarsis(&cube) {
        // An edge-held cube's uplink copy: decoded once per region back into FITS.
        data.derived(&cube, "fits", |container, fits| {
            use ::astro_fit::edge::{container::StreamDecoder, io::write_fits_cube};
            let file = std::fs::File::open(container).map_err(|e| e.to_string())?;
            let cube = StreamDecoder::new(std::io::BufReader::new(file))
                .and_then(StreamDecoder::into_cube)
                .map_err(|e| format!("decoding the cube's TARSIS copy: {e}"))?;
            write_fits_cube(&cube, fits).map_err(|e| format!("writing the decoded cube: {e}"))
        })
        .await
        .map_err(|e| failed(e, true))?
    } else {
        cube
    };
    let templates = match &work.templates {
        Some(t) => {
            let tar = patiently(|| data.dataset(t)).await.map_err(fetch_failed)?;
            data.derived(&tar, "templates", |tar, dir| {
                ::astro_fit::unpack_template_tar(tar, dir)
                    .map(|_| ())
                    .map_err(|e| format!("the templates dataset: {e}"))
            })
            .await
            .map_err(|e| failed(e, true))?
        }
        None => bundled_templates(data)
            .await
            .map_err(|e| failed(e, false))?,
    };
    let plan = match &work.plan {
        Some(p) => Some(
            patiently(|| data.artifact(application, p))
                .await
                .map_err(fetch_failed)?,
        ),
        None => None,
    };
    // Many small files: several downloads at once, so that their round trips overlap.
    let chunks: Vec<(String, PathBuf)> = futures::stream::iter(&work.chunks)
        .map(|c| async move {
            Ok((
                c.name.clone(),
                patiently(|| data.artifact(application, c)).await?,
            ))
        })
        .buffered(8)
        .collect::<Vec<Result<_, data::DataError>>>()
        .await
        .into_iter()
        .collect::<Result<_, _>>()
        .map_err(fetch_failed)?;
    Ok(stage::StageInputs {
        cube,
        templates,
        plan,
        chunks,
    })
}

/// How long a worker waits for the server to come back before an input it cannot fetch fails
/// the attempt.
const FETCH_PATIENCE: Duration = Duration::from_secs(600);

/// Runs `fetch` again while the server is out of reach or failing (a cut link, a control plane
/// restarting): inputs that cannot be fetched now are not a failed attempt. The task's lease
/// is renewed meanwhile, or left to its region's toleration while the link is down.
async fn patiently<T, F, Fut>(mut fetch: F) -> Result<T, data::DataError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, data::DataError>>,
{
    let deadline = Instant::now() + FETCH_PATIENCE;
    let mut wait = Duration::from_secs(1);
    loop {
        match fetch().await {
            Err(e) if e.transient() && Instant::now() + wait < deadline => {
                tracing::warn!(error = %e, "fetching an input failed; trying again");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(30));
            }
            other => return other,
        }
    }
}

fn is_tarsis(path: &std::path::Path) -> bool {
    use std::io::Read;
    let mut magic = [0u8; 8];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok()
        && ::astro_fit::edge::container::is_container(&magic)
}

/// The template library bundled with astro-fit, unpacked once into the region's cache.
async fn bundled_templates(data: &DataPlane) -> Result<PathBuf, String> {
    use sha2::Digest;
    let bytes = ::astro_fit::template_archive::COMPACT_EMILES_TAR_GZ;
    let sha = hex::encode(sha2::Sha256::digest(bytes));
    let marker = data.cache_dir().join(&sha);
    if tokio::fs::metadata(&marker).await.is_err() {
        tokio::fs::create_dir_all(data.cache_dir())
            .await
            .map_err(|e| e.to_string())?;
        let tmp = data
            .cache_dir()
            .join(format!("{sha}.{}.part", std::process::id()));
        tokio::fs::write(&tmp, bytes)
            .await
            .map_err(|e| e.to_string())?;
        tokio::fs::rename(&tmp, &marker)
            .await
            .map_err(|e| e.to_string())?;
    }
    data.derived(&marker, "templates", |tar, dir| {
        ::astro_fit::unpack_template_tar(tar, dir)
            .map(|_| ())
            .map_err(|e| e.to_string())
    })
    .await
}

/// `ceccm probe`: what a process sees from where it runs (inside a container, for tests and
/// operators). `read PATH` prints a file; `alloc MIB` touches that much memory; `memory-limit`
/// prints the memory limit of its cgroup.
pub fn probe(what: &str, arg: Option<&str>) -> anyhow::Result<()> {
    match (what, arg) {
        ("read", Some(path)) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| anyhow::anyhow!("cannot read {path}: {e}"))?;
            print!("{text}");
            Ok(())
        }
        ("alloc", Some(mib)) => {
            let mib: usize = mib.parse()?;
            let mut blocks = Vec::with_capacity(mib);
            for i in 0..mib {
                // Touched, so that the pages are really used.
                blocks.push(vec![(i % 251) as u8 + 1; 1 << 20]);
            }
            println!("allocated {} MiB", blocks.len());
            Ok(())
        }
        ("memory-limit", None) => {
            let limit = [
                "/sys/fs/cgroup/memory/memory.limit_in_bytes",
                "/sys/fs/cgroup/memory.max",
            ]
            .iter()
            .find_map(|p| std::fs::read_to_string(p).ok())
            .ok_or_else(|| anyhow::anyhow!("no memory cgroup to read"))?;
            println!("{}", limit.trim());
            Ok(())
        }
        ("sleep", Some(seconds)) => {
            println!("sleeping {seconds} s");
            std::thread::sleep(Duration::from_secs_f64(seconds.parse()?));
            Ok(())
        }
        _ => anyhow::bail!("probe read PATH | alloc MIB | memory-limit | sleep SECONDS"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(status: u16) -> data::DataError {
        data::DataError::Status {
            what: "fetching the cube".into(),
            status,
            body: String::new(),
        }
    }

    // Waits 1 s, then 2 s, between the tries: three seconds of real time.
    #[tokio::test]
    async fn an_input_is_fetched_again_while_the_server_fails_but_not_when_it_refuses() {
        let calls = std::cell::Cell::new(0);
        let fetched = patiently(|| {
            calls.set(calls.get() + 1);
            let n = calls.get();
            async move { if n < 3 { Err(status(503)) } else { Ok(n) } }
        })
        .await;
        assert_eq!(fetched.unwrap(), 3);
        calls.set(0);
        let refused: Result<u32, _> = patiently(|| {
            calls.set(calls.get() + 1);
            async { Err(status(404)) }
        })
        .await;
        assert!(matches!(
            refused,
            Err(data::DataError::Status { status: 404, .. })
        ));
        assert_eq!(calls.get(), 1, "a refusal is final");
        assert!(status(502).transient() && !status(422).transient());
    }
}

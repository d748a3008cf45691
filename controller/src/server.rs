//! `ceccm server`: the store, the API, the reconcilers and the local region driver in one
//! process.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ceccm_federation::RegionDriver;
use ceccm_federation::local::{LocalDriver, WorkerCommand};
use tokio::sync::watch;

use crate::api::{ApiConfig, AppState};
use crate::auth::Role;
use crate::predictor::SharedPredictor;
use crate::reconcile::{self, Context};
use crate::store::Store;
use ceccm_scheduler::PredictorConfig;

/// Kubernetes' node-monitor grace period: an agent silent this long makes its region NotReady.
pub const DEFAULT_REGION_GRACE: Duration = Duration::from_secs(40);

/// How often the TLS files are checked for a change.
pub const TLS_RELOAD_CHECK: Duration = Duration::from_secs(1);

#[derive(Debug, Clone)]
pub struct ServerOptions {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub database_url: Option<String>,
    /// Lease length the local driver's workers ask for.
    pub lease_seconds: u32,
    /// The program the local driver starts as a worker (normally this `ceccm` binary).
    pub worker_program: PathBuf,
    /// Whether `/metrics` answers without a token (for a scraper without credentials).
    pub anonymous_metrics: bool,
    /// Plain HTTP, or https (`crate::tls`).
    pub tls: crate::tls::TlsMode,
    /// With https: the CA whose client certificates authenticate (mTLS, optional for clients).
    pub tls_client_ca: Option<PathBuf>,
    /// OIDC ID tokens accepted besides ceccm's own (`crate::oidc`).
    pub oidc: Option<crate::oidc::OidcConfig>,
    /// Bytes each user may store (datasets and artifacts, `crate::quota`); none: no quota.
    pub user_quota_bytes: Option<u64>,
    /// How long an agent may be silent before its region turns NotReady.
    pub region_grace: Duration,
    /// How tasks reach workers: the embedded queue (default) or RabbitMQ (`crate::amqp`);
    /// the local driver's workers are given the same.
    pub transport: crate::amqp::Transport,
}

/// A started server: its address, and the handles to stop it.
pub struct RunningServer {
    pub addr: SocketAddr,
    /// Whether it serves https.
    pub tls: bool,
    pub store: Arc<Store>,
    stop: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    driver: Arc<dyn RegionDriver>,
    /// Held while the server runs on SQLite: one server per data directory.
    _data_dir: Option<DataDirLock>,
}

/// The data directory's `server.lock`, locked (`flock`) by the server that uses the directory
/// and naming it: a second server on the same directory would run a second set of workers on
/// the same caches and, on SQLite, a second writer on the same store. The kernel releases the
/// lock when the holder exits, however it exits.
pub struct DataDirLock {
    file: std::fs::File,
}

/// What a second server reports when the data directory is taken.
#[derive(Debug, thiserror::Error)]
#[error(
    "another ceccm server is using the data directory {dir} ({holder}): stop it, or give this \
     one its own --data-dir"
)]
pub struct DataDirTaken {
    pub dir: String,
    pub holder: String,
}

impl DataDirLock {
    pub const FILE: &str = "server.lock";

    pub fn take(data_dir: &std::path::Path) -> anyhow::Result<DataDirLock> {
        let path = data_dir.join(Self::FILE);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)?;
        match file.try_lock() {
            Ok(()) => Ok(DataDirLock { file }),
            Err(std::fs::TryLockError::WouldBlock) => {
                let holder = std::fs::read_to_string(&path).unwrap_or_default();
                Err(DataDirTaken {
                    dir: data_dir.display().to_string(),
                    holder: Some(holder.trim())
                        .filter(|h| !h.is_empty())
                        .unwrap_or("a server still starting")
                        .to_string(),
                }
                .into())
            }
            Err(std::fs::TryLockError::Error(e)) => Err(e.into()),
        }
    }

    /// Writes who holds it, for the next one to read.
    fn record(&mut self, url: &str) -> std::io::Result<()> {
        use std::io::{Seek, Write};
        self.file.set_len(0)?;
        self.file.rewind()?;
        writeln!(
            self.file,
            "pid {}, serving {url}, since {}",
            std::process::id(),
            crate::time::now_rfc3339()
        )?;
        self.file.sync_all()
    }
}

impl RunningServer {
    pub fn url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    /// Stops serving, stops every worker, and closes the store.
    pub async fn shutdown(self) {
        // Workers first, so that none is left asking a server that no longer answers.
        self.driver.release_all();
        let _ = self.stop.send(true);
        for task in self.tasks {
            let _ = task.await;
        }
        self.driver.release_all();
        self.store.close().await;
    }
}

pub async fn start(options: ServerOptions) -> anyhow::Result<RunningServer> {
    std::fs::create_dir_all(&options.data_dir)?;
    // On PostgreSQL servers may share a data directory (artifacts are content-addressed and
    // written atomically); on SQLite the directory holds the store, and one server uses it.
    let on_postgres = options
        .database_url
        .as_deref()
        .is_some_and(|url| url.starts_with("postgres://") || url.starts_with("postgresql://"));
    let mut data_dir_lock = match on_postgres {
        false => Some(DataDirLock::take(&options.data_dir)?),
        true => None,
    };
    let store = Arc::new(Store::open(&options.data_dir, options.database_url.as_deref()).await?);
    let backfilled = crate::objects::backfill_owners(&store).await?;
    if backfilled > 0 {
        tracing::info!(
            objects = backfilled,
            "tasks and events stored before they carried an owner now have their owner's"
        );
    }
    let listener = tokio::net::TcpListener::bind(options.listen).await?;
    let addr = listener.local_addr()?;
    let admin = crate::tokens::ensure_admin_token(&options.data_dir)?;
    if options.tls_client_ca.is_some() && options.tls == crate::tls::TlsMode::Plain {
        anyhow::bail!(
            "--tls-client-ca needs https: give --tls-cert and --tls-key, or --tls-self-signed"
        );
    }
    let tls = crate::tls::prepare(
        &options.tls,
        &options.data_dir,
        options.tls_client_ca.as_deref(),
    )
    .await?;
    let oidc = match options.oidc.clone() {
        Some(config) => Some(Arc::new(crate::oidc::Verifier::new(config).await?)),
        None => None,
    };
    // The local driver's workers trust what the server serves with.
    let mut worker_env = Vec::new();
    if let Some(tls) = &tls {
        worker_env.push((
            crate::tls::CA_FILE_ENV.to_string(),
            tls.trust.display().to_string(),
        ));
    }
    let join = crate::tokens::ensure_join_token(&options.data_dir)?;
    // The local driver's workers act for their regions with a token made for this run only.
    let (_, worker_token) = crate::auth::new_token();
    let workers = crate::tokens::StaticToken::new(&worker_token, "local-driver", Role::Worker)
        .ok_or_else(|| anyhow::anyhow!("a new worker token does not parse"))?;
    let driver: Arc<dyn RegionDriver> = Arc::new(LocalDriver::new(WorkerCommand {
        program: options.worker_program.clone(),
        args: vec![
            "worker".into(),
            "--server".into(),
            crate::tls::local_url(addr, tls.is_some()),
            "--lease-seconds".into(),
            options.lease_seconds.to_string(),
            "--cache-root".into(),
            crate::content::cache_root(&options.data_dir)
                .display()
                .to_string(),
            "--server-data-dir".into(),
            options.data_dir.display().to_string(),
        ],
        env: [
            (crate::worker::TOKEN_ENV.into(), worker_token),
            // In the environment, not the arguments: the URL may hold a password.
            (crate::amqp::TRANSPORT_ENV.into(), options.transport.arg()),
        ]
        .into_iter()
        .chain(worker_env)
        .collect(),
    }));
    // Learned from the telemetry of every task finished before this start.
    let predictor = SharedPredictor::load(&store, PredictorConfig::default()).await?;
    let state = AppState {
        store: store.clone(),
        config: Arc::new(ApiConfig {
            static_tokens: vec![admin, join, workers],
            anonymous_metrics: options.anonymous_metrics,
            quotas: crate::quota::Quotas::new(options.user_quota_bytes),
            oidc,
            client_certificates: options.tls_client_ca.is_some(),
            ..ApiConfig::new(options.data_dir.clone())
        }),
        metrics: Default::default(),
        predictor: predictor.clone(),
        live_logs: Default::default(),
    };
    let ctx = Arc::new(Context {
        store: store.clone(),
        driver: driver.clone(),
        data_dir: options.data_dir.clone(),
        predictor,
        region_grace: options.region_grace,
    });
    let (stop, stopped) = watch::channel(false);
    let mut tasks = Vec::new();
    let app = crate::api::app(state);
    let mut serve_stop = stopped.clone();
    let serves_tls = tls.is_some();
    match tls {
        None => tasks.push(tokio::spawn(async move {
            let shutdown = async move {
                let _ = serve_stop.changed().await;
            };
            if let Err(e) = axum::serve(listener, app)
                .with_graceful_shutdown(shutdown)
                .await
            {
                tracing::error!(error = %e, "HTTP server failed");
            }
        })),
        Some(tls) => {
            // New connections get the certificate files' new contents (or on SIGHUP).
            tasks.push(tokio::spawn(crate::tls::reload_on_change(
                tls.config.clone(),
                tls.files.clone(),
                TLS_RELOAD_CHECK,
                stopped.clone(),
            )));
            let handle = axum_server::Handle::new();
            let server = axum_server::from_tcp_rustls(listener.into_std()?, tls.config)?
                .handle(handle.clone());
            tasks.push(tokio::spawn(async move {
                let _ = serve_stop.changed().await;
                // As axum::serve's: stop accepting, let requests in flight finish (a
                // followed stream is cut after a grace period).
                handle.graceful_shutdown(Some(Duration::from_secs(5)));
            }));
            tasks.push(tokio::spawn(async move {
                if let Err(e) = server.serve(app.into_make_service()).await {
                    tracing::error!(error = %e, "HTTPS server failed");
                }
            }));
        }
    }
    tasks.push(tokio::spawn(
        store
            .clone()
            .follow_other_writers(Duration::from_millis(250), stopped.clone()),
    ));
    let transport = options.transport.clone();
    let lead_store = store.clone();
    let lead_driver = driver.clone();
    tasks.push(tokio::spawn(crate::leader::campaign(
        store.clone(),
        stopped,
        move |term_ended| {
            run_controllers(
                ctx.clone(),
                lead_store.clone(),
                lead_driver.clone(),
                transport.clone(),
                term_ended,
            )
        },
    )));
    let scheme = if serves_tls { "https" } else { "http" };
    if let Some(lock) = &mut data_dir_lock {
        lock.record(&format!("{scheme}://{addr}"))?;
    }
    Ok(RunningServer {
        addr,
        tls: serves_tls,
        store,
        stop,
        tasks,
        driver,
        _data_dir: data_dir_lock,
    })
}

/// What the leading server runs (`crate::leader`) until its term ends: the reconcilers (and,
/// through the region reconciler, the local driver's workers), the RabbitMQ publisher and the
/// lease sweeper. When the term ends the local workers go too: the next leader starts its own.
async fn run_controllers(
    ctx: Arc<Context>,
    store: Arc<Store>,
    driver: Arc<dyn RegionDriver>,
    transport: crate::amqp::Transport,
    term_ended: watch::Receiver<bool>,
) {
    let mut controllers = vec![
        tokio::spawn(reconcile::run(
            ctx.clone(),
            reconcile::region::controller(),
            term_ended.clone(),
        )),
        tokio::spawn(reconcile::run(
            ctx.clone(),
            reconcile::application::controller(),
            term_ended.clone(),
        )),
        tokio::spawn(reconcile::expire_leases(
            ctx,
            Duration::from_millis(500),
            term_ended.clone(),
        )),
    ];
    if let crate::amqp::Transport::Amqp(url) = transport {
        controllers.push(tokio::spawn(crate::amqp::publish(store, url, term_ended)));
    }
    for controller in controllers {
        let _ = controller.await;
    }
    driver.release_all();
}

/// `ceccm server`: runs until Ctrl-C or SIGTERM.
pub async fn serve(options: ServerOptions) -> anyhow::Result<()> {
    let server = start(options).await?;
    // The e2e harness and scripts read this exact line to learn the port.
    println!("ceccm listening on {}", server.url());
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down");
    server.shutdown().await;
    Ok(())
}

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
use crate::resources::Kind;
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
    let store = Arc::new(Store::open(&options.data_dir, options.database_url.as_deref()).await?);
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
    tasks.push(tokio::spawn(reconcile::run(
        ctx.clone(),
        Kind::Region,
        &[Kind::Region, Kind::Task],
        Duration::from_secs(1),
        reconcile::region::reconcile_boxed,
        stopped.clone(),
    )));
    tasks.push(tokio::spawn(reconcile::run(
        ctx.clone(),
        Kind::Application,
        &[Kind::Application, Kind::Task, Kind::Region],
        Duration::from_secs(2),
        reconcile::application::reconcile_boxed,
        stopped.clone(),
    )));
    if let crate::amqp::Transport::Amqp(url) = &options.transport {
        tasks.push(tokio::spawn(crate::amqp::publish(
            store.clone(),
            url.clone(),
            stopped.clone(),
        )));
    }
    tasks.push(tokio::spawn(reconcile::expire_leases(
        ctx,
        Duration::from_millis(500),
        stopped,
    )));
    Ok(RunningServer {
        addr,
        tls: serves_tls,
        store,
        stop,
        tasks,
        driver,
    })
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

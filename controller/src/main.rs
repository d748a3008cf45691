//! `ceccm`: the control plane binary. A thin dispatcher; each subcommand lives in the library.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "ceccm",
    version,
    about = "Control plane for the cloud-edge continuum of astronomy"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum ImageCommand {
    /// Builds an image from this program and its neighbours into DATA_DIR/images.
    Build {
        /// The image: astro-fit (the worker image: ceccm and astro-fit, nothing else).
        name: String,
        #[arg(long, default_value = ".ceccm-data")]
        data_dir: PathBuf,
    },
    /// Takes the images of an OCI archive (an OCI image layout as a tar) or a `docker save`
    /// tarball, either possibly gzipped, into DATA_DIR/images. Every blob is checked against
    /// its digest first; a damaged archive changes nothing.
    Import {
        file: PathBuf,
        /// Names the image (NAME:TAG) when the archive holds one.
        #[arg(long)]
        tag: Option<String>,
        #[arg(long, default_value = ".ceccm-data")]
        data_dir: PathBuf,
    },
}

#[derive(Subcommand)]
enum Command {
    /// Serve the REST API, run the reconcilers and the local regions' workers.
    Server {
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
        #[arg(long, default_value = ".ceccm-data")]
        data_dir: PathBuf,
        /// `postgres://...` selects PostgreSQL; default: SQLite in the data directory.
        #[arg(long, env = "CECCM_DATABASE_URL")]
        database_url: Option<String>,
        /// Lease length the local workers ask for.
        #[arg(long, default_value_t = 30)]
        lease_seconds: u32,
        /// Serve `/metrics` without a token (every other route but /healthz and /readyz
        /// needs one; the administrator's is written to DATA_DIR/admin.token).
        #[arg(long)]
        metrics_anonymous: bool,
        #[command(flatten)]
        tls: ceccm_controller::tls::TlsArgs,
        #[command(flatten)]
        oidc: ceccm_controller::oidc::OidcArgs,
        /// Bytes each user may store: their datasets' content and their applications'
        /// artifacts (default: no quota)
        #[arg(long, value_name = "BYTES")]
        user_quota_bytes: Option<u64>,
        /// Seconds an agent may go unheard before its region turns NotReady (Kubernetes'
        /// node-monitor grace period).
        #[arg(long, default_value_t = 40)]
        region_grace: u64,
        /// How tasks reach workers: `embedded` (the queue in the store, leased over HTTP) or
        /// `amqp://USER:PASSWORD@HOST:PORT/VHOST` (RabbitMQ: one quorum queue per region,
        /// docs/amqp.md)
        #[arg(
            long,
            env = "CECCM_TRANSPORT",
            default_value = "embedded",
            hide_env_values = true
        )]
        transport: ceccm_controller::amqp::Transport,
    },
    /// Lease and run tasks of one region (started by the local region driver).
    Worker {
        #[arg(long)]
        server: String,
        #[arg(long)]
        region: String,
        /// Default: REGION-PID.
        #[arg(long)]
        worker_id: Option<String>,
        #[arg(long, default_value_t = 30)]
        lease_seconds: u32,
        /// Leave after this many seconds without work.
        #[arg(long, default_value_t = 5.0)]
        idle_exit_seconds: f64,
        /// Root of the regions' input caches: this worker uses ROOT/REGION, shared with the
        /// region's other workers (default: under the system's temporary directory; the local
        /// driver passes DATA_DIR/cache).
        #[arg(long)]
        cache_root: Option<PathBuf>,
        /// The server's data directory, when this worker runs on the server's host (the local
        /// driver passes it): inputs are hard-linked from the server's store, then verified,
        /// instead of downloaded.
        #[arg(long)]
        server_data_dir: Option<PathBuf>,
        /// PEM file of a CA to trust for an https server, besides the built-in roots
        #[arg(long, env = "CECCM_CA_FILE", value_name = "FILE")]
        ca_file: Option<PathBuf>,
        /// Most bytes of results kept in the region's outbox (ROOT/REGION/outbox) while the
        /// server is out of reach; past it the worker takes no work.
        #[arg(long, default_value_t = ceccm_controller::worker::DEFAULT_OUTBOX_MAX_BYTES)]
        outbox_max_bytes: u64,
        /// Tasks leased ahead of the running one, worked through while the server is out of
        /// reach (agents pass their --prefetch).
        #[arg(long, default_value_t = 0)]
        prefetch: u32,
        /// How tasks run: process (this worker's own children) or oci (runc containers from
        /// the image store); the local driver passes the region's spec.runtime.
        #[arg(long, default_value = "process")]
        runtime: ceccm_federation::region::Runtime,
        /// The OCI image layout containers are made from (default: beside the cache root,
        /// ROOT/../images, i.e. DATA_DIR/images for the local driver and agents).
        #[arg(long, value_name = "DIR")]
        image_store: Option<PathBuf>,
        /// `embedded` (lease from the server) or the RabbitMQ URL to consume the region's
        /// queue from (the server's local driver sets it)
        #[arg(
            long,
            env = "CECCM_TRANSPORT",
            default_value = "embedded",
            hide_env_values = true
        )]
        transport: ceccm_controller::amqp::Transport,
    },
    /// Manage the local OCI image store (no registry): `ceccm image build astro-fit`.
    Image {
        #[command(subcommand)]
        command: ImageCommand,
    },
    /// Runs one astro-fit stage inside a container (what `runtime: oci` workers start).
    #[command(hide = true)]
    StageRun {
        #[arg(long)]
        job: PathBuf,
        #[arg(long)]
        out: PathBuf,
    },
    /// Looks at the world from inside a container (for tests and operators): `read PATH`,
    /// `alloc MIB`, `memory-limit`.
    #[command(hide = true)]
    Probe { what: String, arg: Option<String> },
    /// Run a remote region's workers on this host (an edge or cloud site), like `k3s agent`.
    Agent {
        #[arg(long)]
        server: String,
        #[arg(long)]
        region: String,
        /// The server's join token (its DATA_DIR/join.token); needed to join the first time.
        #[arg(long, env = "CECCM_JOIN_TOKEN")]
        token: Option<String>,
        #[arg(long, default_value = ".ceccm-agent")]
        data_dir: PathBuf,
        /// Cores offered (default: this host's).
        #[arg(long)]
        cpu: Option<u32>,
        /// Tier of the region, if the join makes it: edge, cloud or hpc.
        #[arg(long, default_value = "edge")]
        tier: String,
        #[arg(long, default_value = "")]
        location: String,
        /// The agent's name (default: the host's).
        #[arg(long)]
        name: Option<String>,
        #[arg(long, default_value_t = 2.0)]
        heartbeat_seconds: f64,
        #[arg(long, default_value_t = 30)]
        lease_seconds: u32,
        /// Tasks each worker leases ahead of the one it runs, worked through while the
        /// server is out of reach.
        #[arg(long, default_value_t = 1)]
        prefetch: u32,
        /// PEM file of the server's CA (an https server with a self-signed CA), besides the
        /// built-in roots; its workers trust it too
        #[arg(long, env = "CECCM_CA_FILE", value_name = "FILE")]
        ca_file: Option<PathBuf>,
        /// Directory of the datasets this site holds (one file per Dataset, named as it is;
        /// move files in whole); default: DATA_DIR/datasets.
        #[arg(long, value_name = "DIR")]
        datasets: Option<PathBuf>,
        /// How held cubes cross the uplink when a task elsewhere needs them: tarsis
        /// (noise-bounded compression, every header card kept) or identity (as they are).
        #[arg(long, value_enum, default_value = "tarsis")]
        uplink_encoding: ceccm_controller::uplink::UplinkEncoding,
        /// How its workers run tasks: process, or oci (runc containers from DATA_DIR/images;
        /// build the image there with `ceccm image build astro-fit --data-dir DATA_DIR`).
        #[arg(long, default_value = "process")]
        runtime: ceccm_federation::region::Runtime,
        /// `embedded` or the RabbitMQ URL this site's workers consume the region's queue from
        #[arg(
            long,
            env = "CECCM_TRANSPORT",
            default_value = "embedded",
            hide_env_values = true
        )]
        transport: ceccm_controller::amqp::Transport,
    },
    /// The main job: a server with two local regions fits the sample cube with astro-fit.
    Demo {
        /// A new (or empty) directory for the demo's server; default: ceccm-demo/run-TIME.
        #[arg(long)]
        data_dir: Option<PathBuf>,
        #[arg(long, default_value_t = 600)]
        timeout_seconds: u64,
    },
    /// Replay a trace over a region set under the placement policies (trace simulator).
    Sim(ceccm_scheduler::sim::cli::SimArgs),
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .init();
    let cli = Cli::parse();
    // The simulator is synchronous and needs no runtime.
    if let Command::Sim(args) = &cli.command {
        return match ceccm_scheduler::sim::cli::run(args, &mut std::io::stdout().lock()) {
            Ok(_) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("ceccm: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("ceccm: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = runtime.block_on(async {
        match cli.command {
            Command::Server {
                listen,
                data_dir,
                database_url,
                lease_seconds,
                metrics_anonymous,
                tls,
                oidc,
                user_quota_bytes,
                region_grace,
                transport,
            } => {
                let oidc = oidc.config()?;
                ceccm_controller::server::serve(ceccm_controller::server::ServerOptions {
                    listen,
                    data_dir,
                    database_url,
                    lease_seconds,
                    worker_program: std::env::current_exe()?,
                    anonymous_metrics: metrics_anonymous,
                    tls: tls.mode(),
                    tls_client_ca: tls.tls_client_ca.clone(),
                    oidc,
                    user_quota_bytes,
                    region_grace: Duration::from_secs(region_grace),
                    transport,
                })
                .await
            }
            Command::Worker {
                server,
                region,
                worker_id,
                lease_seconds,
                idle_exit_seconds,
                cache_root,
                server_data_dir,
                ca_file,
                outbox_max_bytes,
                prefetch,
                runtime,
                image_store,
                transport,
            } => {
                let image_store = image_store.unwrap_or_else(|| {
                    cache_root
                        .as_deref()
                        .and_then(|root| root.parent())
                        .unwrap_or(std::path::Path::new("."))
                        .join("images")
                });
                let worker_id =
                    worker_id.unwrap_or_else(|| format!("{region}-{}", std::process::id()));
                ceccm_controller::worker::run(ceccm_controller::worker::WorkerOptions {
                    server: server.trim_end_matches('/').to_string(),
                    worker_id,
                    lease_seconds,
                    idle_exit: Duration::from_secs_f64(idle_exit_seconds.max(0.0)),
                    cache_dir: cache_root.map_or_else(
                        || ceccm_controller::worker::default_cache_dir(&region),
                        |root| root.join(&region),
                    ),
                    region,
                    server_data_dir,
                    ca_file,
                    outbox_max_bytes,
                    prefetch,
                    runtime,
                    image_store,
                    transport,
                })
                .await
            }
            Command::Image {
                command: ImageCommand::Build { name, data_dir },
            } => {
                if name != ceccm_controller::image::ASTRO_FIT_IMAGE {
                    anyhow::bail!("{name:?}: the images ceccm builds are: astro-fit");
                }
                let store = ceccm_controller::image::ImageStore::new(data_dir.join("images"));
                let built =
                    store.build_astro_fit(&std::env::current_exe()?, env!("CARGO_PKG_VERSION"))?;
                println!(
                    "astro-fit:{} {} in {}",
                    env!("CARGO_PKG_VERSION"),
                    built.digest,
                    store.dir().display()
                );
                Ok(())
            }
            Command::Image {
                command:
                    ImageCommand::Import {
                        file,
                        tag,
                        data_dir,
                    },
            } => {
                let store = ceccm_controller::image::ImageStore::new(data_dir.join("images"));
                for (name, manifest) in store.import(&file, tag.as_deref())? {
                    println!("{name} {} in {}", manifest.digest, store.dir().display());
                }
                Ok(())
            }
            Command::StageRun { job, out } => ceccm_controller::worker::stage::run_job(&job, &out),
            Command::Probe { what, arg } => ceccm_controller::worker::probe(&what, arg.as_deref()),
            Command::Agent {
                server,
                region,
                token,
                data_dir,
                cpu,
                tier,
                location,
                name,
                heartbeat_seconds,
                lease_seconds,
                prefetch,
                ca_file,
                datasets,
                uplink_encoding,
                runtime,
                transport,
            } => {
                let tier = serde_json::from_value(serde_json::Value::String(tier.clone()))
                    .map_err(|_| anyhow::anyhow!("--tier {tier:?}: edge, cloud or hpc"))?;
                ceccm_controller::agent::run(ceccm_controller::agent::AgentOptions {
                    server: server.trim_end_matches('/').to_string(),
                    region,
                    join_token: token,
                    data_dir: data_dir.clone(),
                    cpu,
                    tier,
                    location,
                    name,
                    heartbeat: Duration::from_secs_f64(heartbeat_seconds.clamp(0.1, 60.0)),
                    lease_seconds,
                    prefetch,
                    ca_file,
                    datasets: datasets.unwrap_or_else(|| data_dir.join("datasets")),
                    uplink_encoding,
                    runtime,
                    transport,
                    worker_program: std::env::current_exe()?,
                })
                .await
            }
            Command::Sim(_) => unreachable!("handled before the runtime starts"),
            Command::Demo {
                data_dir,
                timeout_seconds,
            } => {
                ceccm_controller::demo::run(ceccm_controller::demo::DemoOptions {
                    data_dir,
                    timeout: Duration::from_secs(timeout_seconds),
                })
                .await
            }
        }
    });
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ceccm: {e:#}");
            ExitCode::FAILURE
        }
    }
}

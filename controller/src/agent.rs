//! `ceccm agent`: what an operator runs at a remote site (as `k3s agent` or KubeEdge's edgecore).
//!
//! It joins its region with the server's join token (once; the token bound to its region that
//! the server answers with is kept in `DATA_DIR/agent.token`, mode 0600), then heartbeats every
//! few seconds with its capacity, workers, CPU time and measured energy. Each heartbeat answers
//! with the workers the region's queue wants, and the agent runs them on its own host with the
//! local driver: the same `ceccm worker` processes, leasing and reporting over HTTP with the
//! agent's token, caching inputs by sha256 under `DATA_DIR/cache`. It holds its site's datasets
//! (`--datasets DIR`), announces them, and sends their uplink copies when the server asks
//! ([`crate::uplink`]).

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ceccm_federation::RegionDriver;
use ceccm_federation::local::{LocalDriver, WorkerCommand};
use ceccm_federation::region::{Capacity, DriverKind, RegionSpec, Tier};

use crate::regions::{AgentOrders, AgentReport, JoinRequest, JoinResponse};
use crate::uplink::{EdgeDatasets, HeldDataset};

/// Names of the datasets being sent.
type Sending = Arc<Mutex<HashSet<String>>>;

/// The agent's own token in its data directory.
pub const AGENT_TOKEN_FILE: &str = "agent.token";

#[derive(Debug, Clone)]
pub struct AgentOptions {
    pub server: String,
    pub region: String,
    /// The server's join token; needed for the first start (and to join again after the
    /// agent's token was revoked).
    pub join_token: Option<String>,
    pub data_dir: PathBuf,
    /// Cores offered (default: this host's).
    pub cpu: Option<u32>,
    /// Tier and location of a region the join makes.
    pub tier: Tier,
    pub location: String,
    /// Default: the host's name.
    pub name: Option<String>,
    pub heartbeat: Duration,
    pub lease_seconds: u32,
    /// Tasks each worker leases ahead, to work through while cut off.
    pub prefetch: u32,
    /// The server's CA, for an https server with a certificate of its own (its workers get
    /// it too).
    pub ca_file: Option<PathBuf>,
    /// The datasets this site holds, one file each (see [`crate::uplink`]).
    pub datasets: PathBuf,
    pub uplink_encoding: crate::uplink::UplinkEncoding,
    /// How its workers run tasks (`oci`: in runc containers from `DATA_DIR/images`).
    pub runtime: ceccm_federation::region::Runtime,
    /// How this site's workers get tasks: leased from the server, or from RabbitMQ.
    pub transport: crate::amqp::Transport,
    /// The program run as a worker (this `ceccm` binary).
    pub worker_program: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("the server refused the agent's token and no join token was given (--token)")]
    NoJoinToken,
    #[error("joining region {region}: the server answered {status}: {body}")]
    Join {
        region: String,
        status: u16,
        body: String,
    },
    #[error("HTTP: {0}")]
    Http(#[from] reqwest::Error),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Runs the agent until SIGTERM or Ctrl-C, then stops its workers.
pub async fn run(options: AgentOptions) -> anyhow::Result<()> {
    std::fs::create_dir_all(&options.data_dir)?;
    let cpu = options.cpu.unwrap_or_else(host_cores).max(1);
    let name = options.name.clone().unwrap_or_else(host_name);
    let mut token = match read_token(&options.data_dir)? {
        Some(token) => token,
        None => join(&options, &name, cpu).await?,
    };
    let mut link = Link::new(&options, &token)?;
    let held = watch_datasets(&options);
    let kept = crate::worker::held::HeldLeases::new(crate::worker::held::held_dir(
        &options.data_dir.join("cache").join(&options.region),
    ));
    let sending = Arc::new(Mutex::new(HashSet::new()));
    let mut meter = Rapl::open();
    let mut turn = 0;
    let mut wanted = 0;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut reachable = true;
    loop {
        let seen = link
            .driver
            .ensure(&options.region, &link.spec(cpu), wanted)?;
        let report = AgentReport {
            agent: name.clone(),
            cpu,
            workers: seen.workers,
            cpu_seconds: seen.cpu_seconds,
            measured_joules: meter.as_mut().and_then(Rapl::joules),
            datasets: held
                .lock()
                .map(|h| announced_now(&h, &mut turn))
                .unwrap_or_default(),
        };
        match link.heartbeat(&report).await {
            Ok(orders) => {
                if !reachable {
                    tracing::warn!(region = options.region, "the server answers again");
                    reachable = true;
                }
                wanted = orders.wanted_workers;
                for why in &orders.refused_datasets {
                    tracing::warn!(region = options.region, "{why}");
                }
                for name in orders.uploads {
                    link.send_dataset(&options.server, name, &held, &sending);
                }
                if wanted > seen.workers {
                    link.driver
                        .ensure(&options.region, &link.spec(cpu), wanted)?;
                }
            }
            Err(Refused::Unauthorized) => {
                // Another agent joined for this region, or the server lost its store: join
                // again with the join token, and restart the workers with the new token.
                tracing::warn!(
                    region = options.region,
                    "agent token refused; joining again"
                );
                std::fs::remove_file(options.data_dir.join(AGENT_TOKEN_FILE)).ok();
                token = join(&options, &name, cpu).await?;
                link.driver.release_all();
                link = Link::new(&options, &token)?;
            }
            Err(Refused::Other(e)) => {
                // Cut off: the workers finish what they hold and keep the results in the
                // region's outbox. Leases whose workers are gone (this host restarted while
                // cut off) get workers of their own; nothing else starts until the server
                // answers again.
                wanted = kept.orphans().min(cpu as usize) as u32;
                if wanted > seen.workers {
                    link.driver
                        .ensure(&options.region, &link.spec(cpu), wanted)?;
                }
                if reachable {
                    tracing::warn!(region = options.region, error = %e, "heartbeat failed; workers go on");
                    reachable = false;
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(options.heartbeat) => {}
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
        }
    }
    link.driver.release_all();
    Ok(())
}

/// What the agent holds: each dataset with the file its uplink copy is in.
type Held = Arc<Mutex<Vec<(HeldDataset, PathBuf)>>>;

/// The datasets this heartbeat announces: all of them, or, past what one heartbeat may carry,
/// the next window of them in turn.
fn announced_now(held: &[(HeldDataset, PathBuf)], turn: &mut usize) -> Vec<HeldDataset> {
    let most = crate::uplink::MAX_ANNOUNCED;
    if held.len() <= most {
        return held.iter().map(|(d, _)| d.clone()).collect();
    }
    let start = *turn % held.len();
    *turn = start + most;
    held.iter()
        .cycle()
        .skip(start)
        .take(most)
        .map(|(d, _)| d.clone())
        .collect()
}

/// Looks at the datasets directory every few seconds, off the heartbeat's path (a new cube is
/// hashed and compressed before it is announced).
fn watch_datasets(options: &AgentOptions) -> Held {
    let held: Held = Arc::default();
    let mut datasets = EdgeDatasets::new(
        options.datasets.clone(),
        // The region's cache, where its workers look for content by sha256.
        options.data_dir.join("cache").join(&options.region),
        options.uplink_encoding,
    );
    let (shared, every) = (held.clone(), options.heartbeat);
    tokio::spawn(async move {
        loop {
            let Ok((back, found)) = tokio::task::spawn_blocking(move || {
                let found = datasets.scan();
                let found: Vec<_> = found
                    .into_iter()
                    .filter_map(|d| datasets.to_send(&d.name).map(|(path, _)| (d, path)))
                    .collect();
                (datasets, found)
            })
            .await
            else {
                tracing::error!("the datasets watcher stopped");
                return;
            };
            datasets = back;
            if let Ok(mut h) = shared.lock() {
                *h = found;
            }
            tokio::time::sleep(every).await;
        }
    });
    held
}

/// The agent's connection to the server: its client and its workers.
struct Link {
    runtime: ceccm_federation::region::Runtime,
    client: reqwest::Client,
    /// For dataset copies, which may take long over a slow uplink.
    uplink: reqwest::Client,
    heartbeat_url: String,
    driver: LocalDriver,
}

enum Refused {
    Unauthorized,
    Other(anyhow::Error),
}

impl Link {
    fn new(options: &AgentOptions, token: &str) -> anyhow::Result<Link> {
        let client = crate::tokens::client_with_token(
            crate::tls::trusting(
                reqwest::Client::builder().timeout(Duration::from_secs(10)),
                options.ca_file.as_deref(),
            )?,
            token,
        )?;
        let uplink = crate::tokens::client_with_token(
            crate::tls::trusting(
                reqwest::Client::builder().connect_timeout(Duration::from_secs(10)),
                options.ca_file.as_deref(),
            )?,
            token,
        )?;
        let driver = LocalDriver::new(WorkerCommand {
            program: options.worker_program.clone(),
            args: vec![
                "worker".into(),
                "--server".into(),
                options.server.clone(),
                "--lease-seconds".into(),
                options.lease_seconds.to_string(),
                "--prefetch".into(),
                options.prefetch.to_string(),
                "--cache-root".into(),
                options.data_dir.join("cache").display().to_string(),
            ],
            env: [
                (crate::worker::TOKEN_ENV.to_string(), token.to_string()),
                (
                    crate::amqp::TRANSPORT_ENV.to_string(),
                    options.transport.arg(),
                ),
            ]
            .into_iter()
            .chain(options.ca_file.as_ref().map(|ca| {
                (
                    crate::tls::CA_FILE_ENV.to_string(),
                    ca.display().to_string(),
                )
            }))
            .collect(),
        });
        Ok(Link {
            runtime: options.runtime,
            client,
            uplink,
            heartbeat_url: format!(
                "{}/api/v1/regions/{}/heartbeat",
                options.server, options.region
            ),
            driver,
        })
    }

    /// The region as this host runs it: worker processes here.
    fn spec(&self, cpu: u32) -> RegionSpec {
        RegionSpec {
            tier: Tier::Edge,
            location: String::new(),
            driver: DriverKind::Local,
            capacity: Capacity {
                cpu,
                memory_mib: 0,
                gpu: 0,
            },
            energy: Default::default(),
            network: Default::default(),
            taints: Vec::new(),
            unschedulable: false,
            runtime: self.runtime,
        }
    }

    /// Sends `name`'s uplink copy in the background, unless it is already on its way.
    fn send_dataset(&self, server: &str, name: String, held: &Held, sending: &Sending) {
        let Some((dataset, path)) = held
            .lock()
            .ok()
            .and_then(|h| h.iter().find(|(d, _)| d.name == name).cloned())
        else {
            return;
        };
        if !sending.lock().is_ok_and(|mut s| s.insert(name.clone())) {
            return;
        }
        let (client, server, sending) = (self.uplink.clone(), server.to_string(), sending.clone());
        tokio::spawn(async move {
            match crate::uplink::send(&client, &server, &name, &path, &dataset).await {
                Ok(status) => {
                    let seconds = status.uplink.and_then(|u| u.transfer_seconds);
                    tracing::info!(
                        dataset = name,
                        bytes = dataset.size,
                        sent = dataset.encoded_size,
                        encoding = dataset.encoding.as_str(),
                        seconds,
                        "dataset sent"
                    );
                }
                // The order stands while the server still wants it: the next heartbeat
                // asks again.
                Err(e) => tracing::warn!(dataset = name, error = %e, "sending the dataset failed"),
            }
            if let Ok(mut s) = sending.lock() {
                s.remove(&name);
            }
        });
    }

    async fn heartbeat(&self, report: &AgentReport) -> Result<AgentOrders, Refused> {
        let response = self
            .client
            .post(&self.heartbeat_url)
            .json(report)
            .send()
            .await
            .map_err(|e| Refused::Other(e.into()))?;
        let status = response.status();
        if status == reqwest::StatusCode::UNAUTHORIZED {
            return Err(Refused::Unauthorized);
        }
        if !status.is_success() {
            let body = response.text().await.unwrap_or_default();
            return Err(Refused::Other(anyhow::anyhow!(
                "server answered {status}: {body}"
            )));
        }
        response.json().await.map_err(|e| Refused::Other(e.into()))
    }
}

/// Exchanges the join token for the agent's own token and keeps it in the data directory.
async fn join(options: &AgentOptions, name: &str, cpu: u32) -> Result<String, AgentError> {
    let join_token = options
        .join_token
        .as_deref()
        .ok_or(AgentError::NoJoinToken)?;
    let builder = crate::tls::trusting(
        reqwest::Client::builder().timeout(Duration::from_secs(30)),
        options.ca_file.as_deref(),
    )
    .map_err(|e| std::io::Error::other(e.to_string()))?;
    let client = crate::tokens::client_with_token(builder, join_token)
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    let request = JoinRequest {
        region: options.region.clone(),
        agent: name.to_string(),
        cpu,
        memory_mib: 0,
        tier: Some(options.tier),
        location: options.location.clone(),
    };
    let response = client
        .post(format!("{}/api/v1/agents:join", options.server))
        .json(&request)
        .send()
        .await?;
    let status = response.status();
    if !status.is_success() {
        return Err(AgentError::Join {
            region: options.region.clone(),
            status: status.as_u16(),
            body: response.text().await.unwrap_or_default(),
        });
    }
    let joined: JoinResponse = response.json().await?;
    crate::tokens::write_private(
        &options.data_dir.join(AGENT_TOKEN_FILE),
        &format!("{}\n", joined.token),
    )?;
    tracing::info!(region = joined.region, created = joined.created, "joined");
    Ok(joined.token)
}

fn read_token(data_dir: &Path) -> std::io::Result<Option<String>> {
    match std::fs::read_to_string(data_dir.join(AGENT_TOKEN_FILE)) {
        Ok(text) => Ok(Some(text.trim().to_string())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

fn host_cores() -> u32 {
    std::thread::available_parallelism().map_or(1, |n| n.get() as u32)
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "agent".into())
}

/// The host's package energy counters (Intel RAPL through powercap), where it exposes them.
pub struct Rapl {
    domains: Vec<RaplDomain>,
}

struct RaplDomain {
    path: PathBuf,
    max_uj: u64,
    last_uj: u64,
    total_uj: u128,
}

impl Rapl {
    /// The package domains of `/sys/class/powercap`, or `None` where there are none readable.
    pub fn open() -> Option<Rapl> {
        let mut domains = Vec::new();
        for entry in std::fs::read_dir("/sys/class/powercap").ok()?.flatten() {
            let name = entry.file_name().to_string_lossy().to_string();
            // Packages are intel-rapl:N; their parts (intel-rapl:N:M) are inside them.
            if !name.starts_with("intel-rapl:") || name.matches(':').count() != 1 {
                continue;
            }
            let path = entry.path().join("energy_uj");
            let read = |p: &Path| std::fs::read_to_string(p).ok()?.trim().parse::<u64>().ok();
            if let (Some(now), Some(max)) =
                (read(&path), read(&entry.path().join("max_energy_range_uj")))
            {
                domains.push(RaplDomain {
                    path,
                    max_uj: max,
                    last_uj: now,
                    total_uj: 0,
                });
            }
        }
        (!domains.is_empty()).then_some(Rapl { domains })
    }

    /// Joules the packages drew since [`Rapl::open`], counter wrap-arounds included.
    pub fn joules(&mut self) -> Option<f64> {
        for d in &mut self.domains {
            let now = std::fs::read_to_string(&d.path)
                .ok()?
                .trim()
                .parse::<u64>()
                .ok()?;
            let delta = if now >= d.last_uj {
                now - d.last_uj
            } else {
                d.max_uj.saturating_sub(d.last_uj) + now
            };
            d.total_uj += u128::from(delta);
            d.last_uj = now;
        }
        Some(self.domains.iter().map(|d| d.total_uj as f64).sum::<f64>() / 1e6)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn past_what_one_heartbeat_carries_the_datasets_are_announced_in_turns() {
        let held: Vec<(HeldDataset, PathBuf)> = (0..250)
            .map(|i| {
                let d = HeldDataset {
                    name: format!("cube-{i:03}"),
                    sha256: "a".repeat(64),
                    size: 1,
                    encoding: crate::uplink::UplinkEncoding::Identity,
                    encoded_size: 1,
                };
                (d, PathBuf::new())
            })
            .collect();
        let mut turn = 0;
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..3 {
            let window = announced_now(&held, &mut turn);
            assert_eq!(window.len(), crate::uplink::MAX_ANNOUNCED);
            seen.extend(window.into_iter().map(|d| d.name));
        }
        assert_eq!(
            seen.len(),
            250,
            "every dataset announced within three heartbeats"
        );
        let few = &held[..10];
        assert_eq!(announced_now(few, &mut turn).len(), 10);
    }
}

//! Federation end to end: `ceccm agent` processes run their regions' work as other hosts would
//! (each with its own data directory and cache), join with the server's join token, and when
//! one of them dies its work is placed elsewhere. The same scenario runs twice: on loopback, and
//! (as root, with iproute2) with the control plane and each agent in network namespaces of
//! their own, the edge's uplink shaped by `tc netem`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::control_plane::{Http, assert_each_result_once, wait_for_phase};
use crate::support::{Server, bin, children_of, wait_until};

/// A running `ceccm agent` (in a network namespace when given), killed with its workers when
/// dropped, as a host that dies takes its processes with it.
struct Agent {
    child: Child,
    data_dir: PathBuf,
}

impl Agent {
    fn start(
        netns: Option<&str>,
        server: &str,
        region: &str,
        tier: &str,
        join: &str,
        dir: &Path,
    ) -> Agent {
        Agent::start_with(netns, server, region, tier, join, dir, &[])
    }

    fn start_with(
        netns: Option<&str>,
        server: &str,
        region: &str,
        tier: &str,
        join: &str,
        dir: &Path,
        extra_args: &[&str],
    ) -> Agent {
        let mut command = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(bin("ceccm"));
                c
            }
            None => Command::new(bin("ceccm")),
        };
        let child = command
            .args([
                "agent", "--server", server, "--region", region, "--tier", tier,
            ])
            .args([
                "--cpu",
                "1",
                "--heartbeat-seconds",
                "0.5",
                "--lease-seconds",
                "3",
            ])
            .args(extra_args)
            .arg("--data-dir")
            .arg(dir)
            .env("CECCM_JOIN_TOKEN", join)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn ceccm agent");
        Agent {
            child,
            data_dir: dir.to_path_buf(),
        }
    }

    /// SIGKILL to the agent and every worker it started: the host is gone.
    fn kill_host(&mut self) {
        let agent = self.child.id();
        // Under `ip netns exec` the agent is the exec'd process itself (same pid).
        let workers = children_of(agent);
        let _ = self.child.kill();
        for pid in workers {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
        }
        let _ = self.child.wait();
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill_host();
    }
}

/// Where the agents run (a network namespace, or none) and the server's URL as each sees it;
/// the test reaches the server at `Server::url`.
struct Topology {
    edge: (Option<String>, String),
    cloud: (Option<String>, String),
}

fn region_phase(http: &Http, server: &str, name: &str) -> Option<Value> {
    let (status, body) = http.send(http.client.get(format!("{server}/api/v1/regions/{name}")));
    (status == 200).then_some(body)
}

/// An edge agent (`DIR/edge-agent`) and a cloud agent (`DIR/cloud-agent`) joined with the
/// server's join token, once both regions are Ready.
fn join_two_agents(server: &Server, topology: &Topology, dir: &Path) -> (Agent, Agent) {
    let http = Http::new();
    let join = std::fs::read_to_string(server.data_dir.join("join.token"))
        .unwrap()
        .trim()
        .to_string();
    let start = |(netns, url): &(Option<String>, String), region: &str, tier: &str| {
        Agent::start(
            netns.as_deref(),
            url,
            region,
            tier,
            &join,
            &dir.join(format!("{tier}-agent")),
        )
    };
    let agents = (
        start(&topology.edge, "edge-site", "edge"),
        start(&topology.cloud, "cloud-site", "cloud"),
    );
    for region in ["edge-site", "cloud-site"] {
        wait_until(&format!("{region} Ready"), Duration::from_secs(60), || {
            let r = region_phase(&http, &server.url, region)?;
            (r["status"]["phase"] == "Ready").then_some(())
        });
    }
    agents
}

/// Two agents join; a job spreads over both; the cloud host dies mid-job; its tasks are
/// placed on the edge once the grace and the toleration have passed, and the job completes
/// with each result once. Returns the seconds from the loss to the last task re-placed.
fn cloud_host_dies_mid_job(server: &Server, topology: &Topology, dir: &Path) -> f64 {
    let http = Http::new();
    let url = &server.url;
    let (_edge, mut cloud) = join_two_agents(server, topology, dir);
    // The agent keeps its own token, readable by it alone.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(cloud.data_dir.join("agent.token"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);

    let tasks: Vec<Value> = (0..8)
        .map(|i| json!({"command": "sh", "args": ["-c", format!("sleep 1; echo out-{i}")]}))
        .collect();
    let app = json!({"apiVersion": "ceccm/v1", "kind": "Application", "metadata": {"name": "spread"},
        "spec": {"app": "container", "tasks": tasks, "maxAttempts": 5, "objective": "latency",
                 "placement": {"regions": ["edge-site", "cloud-site"], "tolerations": [
                     {"key": "ceccm/not-ready", "operator": "Exists", "effect": "NoExecute",
                      "tolerationSeconds": 1}]}}});
    let (status, body) = http.send(
        http.client
            .put(format!("{url}/api/v1/applications/spread"))
            .json(&app),
    );
    assert!(status == 200 || status == 201, "{status} {body}");
    let list = format!("{url}/api/v1/tasks?labelSelector=ceccm/application%3Dspread");
    // Both sites at work, the cloud holding a task.
    wait_until(
        "tasks on both sites, one leased on the cloud",
        Duration::from_secs(60),
        || {
            let tasks = http.get(&list);
            let items = tasks["items"].as_array()?;
            let on = |r: &str| items.iter().any(|t| t["status"]["region"] == r);
            let leased_in_cloud = items
                .iter()
                .any(|t| t["status"]["region"] == "cloud-site" && t["status"]["state"] == "Leased");
            (on("edge-site") && leased_in_cloud).then_some(())
        },
    );

    let lost = Instant::now();
    cloud.kill_host();
    wait_until(
        "the cloud's tasks placed elsewhere",
        Duration::from_secs(60),
        || {
            let tasks = http.get(&list);
            let stranded = tasks["items"]
                .as_array()?
                .iter()
                .any(|t| t["status"]["region"] == "cloud-site" && t["status"]["state"] != "Done");
            (!stranded).then_some(())
        },
    );
    let replaced = lost.elapsed().as_secs_f64();

    wait_for_phase(
        &http,
        server,
        "spread",
        "Succeeded",
        Duration::from_secs(120),
    );
    assert_each_result_once(&http, server, "spread", 8);
    let cloud_region = region_phase(&http, url, "cloud-site").unwrap();
    assert_eq!(cloud_region["status"]["phase"], "NotReady");
    let ready = &cloud_region["status"]["conditions"][0];
    assert_eq!(
        (ready["type"].as_str(), ready["status"].as_str()),
        (Some("Ready"), Some("False"))
    );
    assert!(
        ready["message"]
            .as_str()
            .unwrap()
            .contains("not heard from"),
        "{ready}"
    );
    let events = http.get(&format!(
        "{url}/api/v1/events?fieldSelector=involvedObject.kind%3DApplication,involvedObject.name%3Dspread"
    ));
    assert!(
        events["items"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["reason"] == "Rescheduled"),
        "{events}"
    );
    let edge = region_phase(&http, url, "edge-site").unwrap();
    assert_eq!(edge["status"]["phase"], "Ready");
    replaced
}

#[test]
fn a_dead_agents_work_is_placed_on_another_agent_and_the_job_completes() {
    let dir = tempfile::tempdir().unwrap();
    let sites = sites(
        dir.path(),
        false,
        &["--region-grace", "2", "--lease-seconds", "3"],
    )
    .unwrap();
    let seconds = cloud_host_dies_mid_job(&sites.server, &sites.topology, dir.path());
    eprintln!(
        "loopback: the lost region's tasks were all re-placed {seconds:.1} s after its host died"
    );
}

#[test]
fn an_agent_with_a_wrong_join_token_is_refused_and_nothing_is_made() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path().join("server").as_path(), &[]);
    let wrong =
        "ceccm_0000000000000bad_0000000000000000000000000000000000000000000000000000000000000000";
    let output = Command::new(bin("ceccm"))
        .args([
            "agent",
            "--server",
            &server.url,
            "--region",
            "rogue",
            "--cpu",
            "1",
        ])
        .arg("--data-dir")
        .arg(dir.path().join("agent"))
        .env("CECCM_JOIN_TOKEN", wrong)
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("401"), "{stderr}");
    assert!(!dir.path().join("agent/agent.token").exists());
    let http = Http::new();
    assert!(region_phase(&http, &server.url, "rogue").is_none());
}

/// Network namespaces made for one test, removed when dropped: `cp` (the control plane)
/// linked to the test's namespace, and `edge` and `cloud` each linked to `cp`. Each set has
/// its own names and its own `10.N.0.0/16` addresses, so tests running at once never meet.
struct Namespaces {
    names: Vec<String>,
    /// `10.{net}.0.2`: the control plane as the test reaches it; `10.{net}.1.1`, `10.{net}.2.1`:
    /// as the edge and the cloud reach it.
    net: u32,
}

impl Namespaces {
    /// `None` when this process may not make namespaces (not root, or no iproute2).
    fn make() -> Option<Namespaces> {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tag = format!("ce{}x{n}", std::process::id() % 10_000);
        let net = 100 + (std::process::id() % 50) * 2 + n;
        let cp = format!("{tag}-cp");
        let ok = Command::new("ip")
            .args(["netns", "add", &cp])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            return None;
        }
        let ns = Namespaces {
            names: vec![cp.clone(), format!("{tag}-edge"), format!("{tag}-cloud")],
            net,
        };
        let sh = |script: &str| {
            let status = Command::new("sh").args(["-ec", script]).status().unwrap();
            assert!(status.success(), "{script}");
        };
        let (edge, cloud) = (&ns.names[1], &ns.names[2]);
        sh(&format!(
            "ip netns add {edge}; ip netns add {cloud}
             for n in {cp} {edge} {cloud}; do ip -n $n link set lo up; done
             ip link add {tag}h type veth peer name h0 netns {cp}
             ip addr add 10.{net}.0.1/24 dev {tag}h; ip link set {tag}h up
             ip -n {cp} addr add 10.{net}.0.2/24 dev h0; ip -n {cp} link set h0 up
             ip -n {cp} link add e0 type veth peer name up0 netns {edge}
             ip -n {cp} addr add 10.{net}.1.1/24 dev e0; ip -n {cp} link set e0 up
             ip -n {edge} addr add 10.{net}.1.2/24 dev up0; ip -n {edge} link set up0 up
             ip -n {cp} link add c0 type veth peer name up0 netns {cloud}
             ip -n {cp} addr add 10.{net}.2.1/24 dev c0; ip -n {cp} link set c0 up
             ip -n {cloud} addr add 10.{net}.2.2/24 dev up0; ip -n {cloud} link set up0 up"
        ));
        // The edge's uplink: 20 Mbit/s each way and 40 ms round trip with netem; where the
        // kernel has no netem, the rate alone with a token bucket.
        let shaped = |ns: &str, dev: &str, qdisc: &str| {
            Command::new("sh")
                .args([
                    "-c",
                    &format!("ip netns exec {ns} tc qdisc replace dev {dev} root {qdisc}"),
                ])
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        };
        for (name, dev) in [(edge.as_str(), "up0"), (cp.as_str(), "e0")] {
            if shaped(name, dev, "netem delay 20ms rate 20mbit") {
                continue;
            }
            eprintln!(
                "no netem in this kernel: {name}/{dev} shaped to 20 Mbit/s by tbf, without delay"
            );
            assert!(
                shaped(name, dev, "tbf rate 20mbit burst 32kbit latency 400ms"),
                "tc tbf on {name}"
            );
        }
        Some(ns)
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        for name in &self.names {
            let _ = Command::new("ip").args(["netns", "del", name]).status();
        }
    }
}

/// A control plane and the two sites' view of it: in network namespaces (edge uplink shaped)
/// when `isolated` and this process may make them, else all on loopback.
struct Sites {
    server: Server,
    topology: Topology,
    // Dropped after the server and agents: the namespaces go last.
    _namespaces: Option<Namespaces>,
}

fn sites(dir: &Path, isolated: bool, server_args: &[&str]) -> Option<Sites> {
    sites_listening(dir, isolated, "0.0.0.0:0", server_args)
}

/// [`sites`] with the control plane on `listen` in its namespace (a fixed port lets it be
/// restarted where the agents look for it).
fn sites_listening(
    dir: &Path,
    isolated: bool,
    listen: &str,
    server_args: &[&str],
) -> Option<Sites> {
    if !isolated {
        let server = Server::start(dir.join("server").as_path(), server_args);
        let url = server.url.clone();
        return Some(Sites {
            server,
            topology: Topology {
                edge: (None, url.clone()),
                cloud: (None, url),
            },
            _namespaces: None,
        });
    }
    let namespaces = Namespaces::make()?;
    let net = namespaces.net;
    let mut server = Server::start_in_netns(
        &namespaces.names[0],
        dir.join("server").as_path(),
        listen,
        server_args,
    );
    let port = server.url.rsplit(':').next().unwrap().to_string();
    // The test reaches the control plane's namespace through its own link.
    server.url = format!("http://10.{net}.0.2:{port}");
    let topology = Topology {
        edge: (
            Some(namespaces.names[1].clone()),
            format!("http://10.{net}.1.1:{port}"),
        ),
        cloud: (
            Some(namespaces.names[2].clone()),
            format!("http://10.{net}.2.1:{port}"),
        ),
    };
    Some(Sites {
        server,
        topology,
        _namespaces: Some(namespaces),
    })
}

#[test]
fn across_network_namespaces_with_a_shaped_edge_uplink_a_dead_cloud_agents_work_moves() {
    let dir = tempfile::tempdir().unwrap();
    let Some(sites) = sites(
        dir.path(),
        true,
        &["--region-grace", "2", "--lease-seconds", "3"],
    ) else {
        eprintln!("skipped: needs root and iproute2 to make network namespaces (ip netns add)");
        return;
    };
    let seconds = cloud_host_dies_mid_job(&sites.server, &sites.topology, dir.path());
    eprintln!(
        "netns: the lost region's tasks were all re-placed {seconds:.1} s after its host died"
    );
}

/// A task running on an edge agent's host (across namespaces when the test may make them):
/// `ceccmctl logs -f` shows its lines while it runs, as `kubectl logs -f` reaches a pod on a
/// node through its kubelet.
#[test]
fn an_edge_agents_running_task_streams_its_lines_to_logs_follow() {
    let dir = tempfile::tempdir().unwrap();
    let sites = sites(dir.path(), true, &[])
        .or_else(|| sites(dir.path(), false, &[]))
        .unwrap();
    let (_edge, _cloud) = join_two_agents(&sites.server, &sites.topology, dir.path());
    let http = Http::new();
    let url = &sites.server.url;
    let app = json!({"apiVersion": "ceccm/v1", "kind": "Application", "metadata": {"name": "edgelog"},
        "spec": {"app": "container", "maxAttempts": 1, "placement": {"regions": ["edge-site"]},
                 "tasks": [{"command": "sh", "args": ["-c", "echo from $CECCM_REGION; sleep 6; echo bye"]}]}});
    let (status, body) = http.send(
        http.client
            .put(format!("{url}/api/v1/applications/edgelog"))
            .json(&app),
    );
    assert!(status == 200 || status == 201, "{status} {body}");
    let mut follow = Command::new(bin("ceccmctl"))
        .args(["logs", "edgelog", "-f", "--server", url])
        .env("CECCM_CONFIG", dir.path().join("ceccmctl.yaml"))
        .env("CECCM_TOKEN", crate::support::ADMIN_TOKEN)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let lines = crate::support::lines_of(follow.stdout.take().unwrap());
    let (line, _) =
        crate::support::wait_for_line(&lines, Duration::from_secs(60), |l| l.contains("from"));
    assert_eq!(line, "[edgelog-00000] from edge-site");
    let task = http.get(&format!("{url}/api/v1/tasks/edgelog-00000"));
    assert_eq!(task["status"]["region"], "edge-site");
    assert_ne!(task["status"]["state"], "Done", "{task}");
    let (line, _) =
        crate::support::wait_for_line(&lines, Duration::from_secs(60), |l| l.contains("bye"));
    assert_eq!(line, "[edgelog-00000] bye");
    let (header, _) =
        crate::support::wait_for_line(&lines, Duration::from_secs(60), |l| l.starts_with("==>"));
    assert!(header.starts_with("==> edgelog-00000 [Done]"), "{header}");
    assert!(follow.wait().unwrap().success());
}

/// The astro-fit seed-7 job spread over an edge and a cloud agent (in network namespaces when
/// the test may make them); the cloud host dies while it fits a chunk. Its chunks are fitted
/// again at the edge, each chunk's files are recorded once, and the maps are those of
/// `astro-fit fit-cube` on one host.
#[test]
fn an_astro_fit_job_over_two_agents_outlives_the_cloud_host_with_the_same_maps() {
    use crate::astro_fit::{
        assert_chunks_written_once, assert_same_maps, download, fit_tasks, seed7_reference,
        start_seed7_job_with,
    };
    let dir = tempfile::tempdir().unwrap();
    let args = ["--region-grace", "3", "--lease-seconds", "5"];
    let sites = sites(dir.path(), true, &args).unwrap_or_else(|| {
        eprintln!("no network namespaces (needs root): the agents run on loopback");
        sites(dir.path(), false, &args).unwrap()
    });
    let (server, topology) = (&sites.server, &sites.topology);
    let http = Http::new();
    let (_edge, mut cloud) = join_two_agents(server, topology, dir.path());
    start_seed7_job_with(
        &http,
        server,
        dir.path(),
        json!({"objective": "latency", "placement": {"tolerations": [
            {"key": "ceccm/not-ready", "operator": "Exists", "effect": "NoExecute",
             "tolerationSeconds": 2}]}}),
    );
    // A chunk in flight on the cloud while the edge has chunks too.
    wait_until(
        "chunks on both sites, one fitting on the cloud",
        Duration::from_secs(600),
        || {
            let tasks = fit_tasks(&http, server);
            let on = |r: &str| tasks.iter().any(|t| t["status"]["region"] == r);
            let fitting_in_cloud = tasks
                .iter()
                .any(|t| t["status"]["region"] == "cloud-site" && t["status"]["state"] == "Leased");
            (on("edge-site") && fitting_in_cloud).then_some(())
        },
    );
    cloud.kill_host();
    wait_for_phase(
        &http,
        server,
        "seed7",
        "Succeeded",
        Duration::from_secs(900),
    );
    let tasks = fit_tasks(&http, server);
    let moved = tasks
        .iter()
        .filter(|t| t["status"]["evicted"].is_string())
        .count();
    assert!(moved >= 1, "a chunk left the dead cloud: {tasks:?}");
    assert!(
        tasks.iter().all(|t| t["status"]["state"] == "Done"),
        "every chunk fitted"
    );
    assert_chunks_written_once(&http, server, 7);
    // The inputs reached the agents' own caches over HTTP, verified by sha256.
    let cached = std::fs::read_dir(dir.path().join("edge-agent/cache/edge-site"))
        .unwrap()
        .count();
    assert!(cached >= 2, "cube and templates cached at the edge");
    let maps = download(&http, server, "seed7", "maps.fits", dir.path());
    assert_same_maps(&seed7_reference(dir.path()), &maps);
}

/// Issue 14 item 4: the cube lives at the edge (a plain FITS file in its agent's datasets
/// directory, as a telescope's pipeline writes it). The chunks placed in the cloud need it: the
/// server asks the edge, whose agent sends a TARSIS copy over the shaped uplink, and the
/// cloud's workers decode it. The job completes; `status.uplink` records the bytes and the
/// time; the maps differ from the uncompressed single-host fit by a small fraction of their
/// errors. Then the edge agent restarts with `--uplink-encoding identity` and the same content
/// crosses the uplink as it is: the bytes and the time without TARSIS, over the same link.
#[test]
fn a_cube_held_at_the_edge_crosses_the_uplink_tarsis_encoded() {
    use crate::astro_fit::{download, fit_tasks, seed7_reference, start_seed7_job_with};
    let dir = tempfile::tempdir().unwrap();
    let args = ["--region-grace", "10", "--lease-seconds", "10"];
    let sites = sites(dir.path(), true, &args).unwrap_or_else(|| {
        eprintln!("no network namespaces (needs root): the agents run on loopback");
        sites(dir.path(), false, &args).unwrap()
    });
    let (server, topology) = (&sites.server, &sites.topology);
    let http = Http::new();
    let held = dir.path().join("edge-agent/datasets");
    std::fs::create_dir_all(&held).unwrap();
    let cube = crate::support::shared_data().join("cubes/synthetic-manga-seed7-LOGCUBE.fits.gz");
    let fits = std::fs::File::create(held.join(".seed7-edge.part")).unwrap();
    let unzipped = Command::new("gzip")
        .arg("-dc")
        .arg(&cube)
        .stdout(fits)
        .status()
        .unwrap();
    assert!(unzipped.success());
    // Moved in whole, as the agent expects.
    std::fs::rename(held.join(".seed7-edge.part"), held.join("seed7-edge")).unwrap();
    let (_edge, _cloud) = join_two_agents(server, topology, dir.path());
    crate::astro_fit::dataset(&http, server, "seed7-edge", "cube", Some("edge-site"));
    let dataset = |http: &Http| http.get(&server.api("datasets/seed7-edge"));
    let announced = wait_until(
        "the edge announces the cube",
        Duration::from_secs(120),
        || {
            let d = dataset(&http);
            (d["status"]["phase"] == "Ready").then_some(d)
        },
    );
    let size = announced["status"]["size"].as_u64().unwrap();
    assert_eq!(announced["status"]["uplink"]["region"], "edge-site");
    assert_eq!(announced["status"]["uplink"]["encoding"], "tarsis");
    assert!(announced["status"]["uplink"]["encodedSha256"].is_null());

    start_seed7_job_with(
        &http,
        server,
        dir.path(),
        json!({"inputs": [{"dataset": "seed7-edge"}], "objective": "latency",
               "placement": {"regions": ["edge-site", "cloud-site"]}}),
    );
    wait_for_phase(
        &http,
        server,
        "seed7",
        "Succeeded",
        Duration::from_secs(900),
    );
    let tasks = fit_tasks(&http, server);
    let in_cloud = tasks
        .iter()
        .filter(|t| t["status"]["region"] == "cloud-site")
        .count();
    assert!(in_cloud >= 1, "chunks fitted in the cloud: {tasks:?}");
    let sent = dataset(&http);
    let uplink = &sent["status"]["uplink"];
    let encoded = uplink["encodedSize"].as_u64().unwrap();
    let seconds = uplink["transferSeconds"].as_f64().unwrap();
    assert!(uplink["encodedSha256"].is_string(), "{sent}");
    assert!(uplink["requestTime"].is_string(), "{sent}");
    assert!(
        encoded * 8 <= size,
        "at least 8x fewer bytes: {encoded} of {size}"
    );
    // The cloud holds the TARSIS copy and the FITS decoded from it, not the original.
    let sha256 = sent["status"]["sha256"].as_str().unwrap();
    let cloud_cache = dir.path().join("cloud-agent/cache/cloud-site");
    assert!(cloud_cache.join(format!("{sha256}.tarsis")).exists());
    assert!(cloud_cache.join(format!("{sha256}.tarsis.fits")).exists());
    assert!(!cloud_cache.join(sha256).exists());

    let maps = download(&http, server, "seed7", "maps.fits", dir.path());
    let (v, s) = pulls_against(&seed7_reference(dir.path()), &maps);
    // The edge's chunks read the original: only the bins fitted from the copy can move.
    let moved: Vec<(f64, f64)> = v
        .iter()
        .zip(&s)
        .filter(|(dv, ds)| **dv > 0.0 || **ds > 0.0)
        .map(|(dv, ds)| (*dv, *ds))
        .collect();
    let (mv, ms): (Vec<f64>, Vec<f64>) = moved.iter().copied().unzip();
    let max = |x: &[f64]| x.iter().copied().fold(0.0, f64::max);
    eprintln!(
        "uplink, tarsis: {size} -> {encoded} bytes ({:.2}x) in {seconds:.2} s; {in_cloud} of {} \
         chunks fitted in the cloud; maps against the uncompressed single-host fit: {} of {} \
         bins changed, |change| / error among them: V median {:.4} max {:.4}, sigma median \
         {:.4} max {:.4}",
        size as f64 / encoded as f64,
        tasks.len(),
        moved.len(),
        v.len(),
        median(&mv),
        max(&mv),
        median(&ms),
        max(&ms),
    );
    assert!(
        !moved.is_empty(),
        "the cloud's bins were fitted from the copy"
    );
    assert!(median(&mv) < 0.1 && median(&ms) < 0.1, "{moved:?}");
    assert!(max(&mv) < 1.0 && max(&ms) < 1.0, "{moved:?}");

    // The same content as it is: the edge agent restarts with the identity encoding; the
    // request stands, so the server asks again and keeps the new copy.
    drop(_edge);
    let join = std::fs::read_to_string(server.data_dir.join("join.token")).unwrap();
    let (netns, url) = &topology.edge;
    let _edge = Agent::start_with(
        netns.as_deref(),
        url,
        "edge-site",
        "edge",
        join.trim(),
        &dir.path().join("edge-agent"),
        &["--uplink-encoding", "identity"],
    );
    let plain = wait_until(
        "the edge sends the cube as it is",
        Duration::from_secs(300),
        || {
            let d = dataset(&http);
            let u = &d["status"]["uplink"];
            (u["encoding"] == "identity" && u["encodedSha256"].is_string()).then_some(d)
        },
    );
    let uplink = &plain["status"]["uplink"];
    assert_eq!(uplink["encodedSha256"], plain["status"]["sha256"]);
    assert_eq!(uplink["encodedSize"].as_u64(), Some(size));
    let plain_seconds = uplink["transferSeconds"].as_f64().unwrap();
    eprintln!(
        "uplink, identity: {size} bytes in {plain_seconds:.2} s; tarsis moved {:.2}x fewer \
         bytes in {:.2}x less time",
        size as f64 / encoded as f64,
        plain_seconds / seconds
    );
}

fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Per bin with a finite fit in both MAPS files: |V_b - V_a| and |sigma_b - sigma_a| in units
/// of `a`'s formal errors (from its IVAR).
fn pulls_against(a: &Path, b: &Path) -> (Vec<f64>, Vec<f64>) {
    let read = |path: &Path, hdu: &str| -> Vec<f64> {
        let mut f = fitsio::FitsFile::open(path).unwrap();
        let h = f.hdu(hdu).unwrap();
        h.read_image(&mut f).unwrap()
    };
    let pulls = |name: &str| -> Vec<f64> {
        let (va, vb) = (read(a, name), read(b, name));
        let ivar = read(a, &format!("{name}_IVAR"));
        let mut seen = std::collections::BTreeSet::new();
        let binid = read(a, "BINID");
        assert_eq!(binid, read(b, "BINID"), "the same bins");
        va.iter()
            .zip(&vb)
            .zip(&ivar)
            .zip(&binid)
            .filter(|(((x, y), w), bin)| {
                x.is_finite() && y.is_finite() && **w > 0.0 && seen.insert(bin.to_bits())
            })
            .map(|(((x, y), w), _)| (x - y).abs() * w.sqrt())
            .collect()
    };
    (pulls("STELLAR_VEL"), pulls("STELLAR_SIGMA"))
}

/// Entries waiting in a region's outbox at an agent.
fn outbox_entries(agent_dir: &Path, region: &str) -> usize {
    files_in(agent_dir, region, "outbox")
}

/// The leases an agent's workers keep on disk for `region` (`CACHE/REGION/held`).
fn held_leases(agent_dir: &Path, region: &str) -> usize {
    files_in(agent_dir, region, "held")
}

/// Files (not those being written, which start with a dot) in the agent's `CACHE/REGION/DIR`.
fn files_in(agent_dir: &Path, region: &str, dir: &str) -> usize {
    std::fs::read_dir(agent_dir.join("cache").join(region).join(dir))
        .map(|d| {
            d.flatten()
                .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
                .count()
        })
        .unwrap_or(0)
}

/// Issue 14 (a) and (c): the edge's uplink is cut mid-job (for `CECCM_E2E_OUTAGE_SECONDS`,
/// default 120). The edge host restarts while cut off and goes on fitting what it held, keeping
/// its results in its outbox; the control plane is restarted meanwhile; when the link is back the edge syncs: every chunk is written once,
/// none is fitted twice, and the maps are `fit-cube`'s on one host. Needs root (it cuts a link
/// between network namespaces).
#[test]
fn an_edge_cut_off_keeps_fitting_and_syncs_once_back_across_a_control_plane_restart() {
    use crate::astro_fit::{
        assert_chunks_written_once, assert_same_maps, download, fit_tasks, seed7_reference,
        start_seed7_job_with,
    };
    let outage = Duration::from_secs(
        std::env::var("CECCM_E2E_OUTAGE_SECONDS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(120),
    );
    let dir = tempfile::tempdir().unwrap();
    let args = ["--region-grace", "3", "--lease-seconds", "6"];
    let listen = "0.0.0.0:18080";
    let Some(sites) = sites_listening(dir.path(), true, listen, &args) else {
        eprintln!("skipped: needs root and iproute2 to cut a link between network namespaces");
        return;
    };
    let Sites {
        mut server,
        topology,
        _namespaces: namespaces,
    } = sites;
    let ns = namespaces.as_ref().unwrap();
    let http = Http::new();
    let edge_dir = dir.path().join("edge-agent");
    let (mut edge, _cloud) = join_two_agents(&server, &topology, dir.path());
    // Tolerating NotReady for ever: the edge's work stays the edge's while it is cut off.
    start_seed7_job_with(
        &http,
        &server,
        dir.path(),
        json!({"objective": "latency", "placement": {"tolerations": [
            {"key": "ceccm/not-ready", "operator": "Exists", "effect": "NoExecute"}]}}),
    );
    // Cut while the edge fits a chunk with its inputs in its cache (after its first chunk): a
    // download cut short is a failed attempt, fitted again once the link is back.
    let on_edge = wait_until(
        "a second chunk fitting at the edge",
        Duration::from_secs(600),
        || {
            let tasks = fit_tasks(&http, &server);
            let edge = |state: &str| {
                tasks
                    .iter()
                    .filter(|t| {
                        t["status"]["region"] == "edge-site" && t["status"]["state"] == state
                    })
                    .map(|t| t["metadata"]["name"].as_str().unwrap().to_string())
                    .next()
            };
            edge("Done").and(edge("Leased"))
        },
    );
    let link = |state: &str| {
        let status = Command::new("ip")
            .args(["-n", &ns.names[0], "link", "set", "e0", state])
            .status()
            .unwrap();
        assert!(status.success(), "link {state}");
    };
    let cut = Instant::now();
    link("down");
    wait_until("the edge NotReady", Duration::from_secs(30), || {
        let r = region_phase(&http, &server.url, "edge-site")?;
        (r["status"]["phase"] == "NotReady").then_some(())
    });
    // What the edge holds now (the chunk it fits and those its worker leased ahead) it
    // finishes while cut off: every result waits in its outbox. Counted on the edge's disk, not
    // the server's: a lease the server granted as the link went down, whose answer never
    // arrived, the edge cannot know of (it expires, and is fitted again once the link is back).
    let held = held_leases(&edge_dir, "edge-site");
    let leased_on_server = fit_tasks(&http, &server)
        .iter()
        .filter(|t| t["status"]["region"] == "edge-site" && t["status"]["state"] == "Leased")
        .count();
    eprintln!("the edge keeps {held} leases; the server counts {leased_on_server} leased to it");
    assert!(held >= 1, "the edge keeps no lease on disk");
    // KubeEdge #4441: the edge host restarts while cut off (agent and workers killed, the
    // chunk being fitted lost). The agent back up cannot reach the server, yet it restarts the
    // work its region holds from the leases kept on disk.
    edge.kill_host();
    let join = std::fs::read_to_string(server.data_dir.join("join.token")).unwrap();
    let (edge_netns, edge_url) = &topology.edge;
    let _edge = Agent::start(
        edge_netns.as_deref(),
        edge_url,
        "edge-site",
        "edge",
        join.trim(),
        &edge_dir,
    );
    wait_until(
        "the edge's results kept in its outbox",
        outage.max(Duration::from_secs(600)),
        || (outbox_entries(&edge_dir, "edge-site") >= held).then_some(()),
    );
    eprintln!("the edge, restarted while cut off, fitted the {held} chunks it held");
    // The control plane restarts while the edge is away.
    let data_dir = server.data_dir.clone();
    let url = server.url.clone();
    server.kill();
    server = Server::start_in_netns(&ns.names[0], &data_dir, listen, &args);
    server.url = url;
    // A new client: the old one's pooled connections went with the old process.
    let http = Http::new();
    let held = http.get(&server.api(&format!("tasks/{on_edge}")));
    assert_eq!(
        held["status"]["state"], "Leased",
        "the edge keeps its lease: {held}"
    );
    if let Some(left) = outage.checked_sub(cut.elapsed()) {
        std::thread::sleep(left);
    }
    link("up");
    wait_for_phase(
        &http,
        &server,
        "seed7",
        "Succeeded",
        Duration::from_secs(900),
    );
    assert_eq!(
        outbox_entries(&edge_dir, "edge-site"),
        0,
        "the outbox drained"
    );
    let synced = http.get(&server.api(&format!("tasks/{on_edge}")));
    assert_eq!(synced["status"]["state"], "Done");
    assert_eq!(synced["status"]["region"], "edge-site");
    assert_eq!(
        synced["status"]["attempts"], 1,
        "fitted once, offline: {synced}"
    );
    assert_chunks_written_once(&http, &server, 7);
    // KubeEdge #3567 (a message flood on reconnect): the restarted server counted every
    // request since it started. Each of the job's 9 tasks reports once at most, and what the
    // edge kept is not sent again and again.
    let metrics = http.get_text(&format!("{}/metrics", server.url));
    let requests = |route: &str, refused: bool| -> u64 {
        metrics
            .lines()
            .filter(|l| l.starts_with("ceccm_http_requests_total{"))
            .filter(|l| l.contains(&format!("route=\"{route}\"")))
            .filter(|l| l.contains("status=\"2") != refused)
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    };
    let completions = requests("/api/v1/tasks/{name}/complete", false)
        + requests("/api/v1/tasks/{name}/complete", true);
    let refused_reports = requests("/api/v1/tasks/{name}/complete", true)
        + requests("/api/v1/tasks/{name}/fail", true)
        + requests("/api/v1/tasks/{name}/artifacts/{sha256}", true);
    eprintln!(
        "after the restart: {completions} completion requests, {refused_reports} reports refused"
    );
    assert!(completions <= 9, "{metrics}");
    assert!(refused_reports <= 3, "{metrics}");
    let maps = download(&http, &server, "seed7", "maps.fits", dir.path());
    assert_same_maps(&seed7_reference(dir.path()), &maps);
    eprintln!(
        "edge cut off for {:.0} s, control plane restarted meanwhile: synced",
        outage.as_secs_f64()
    );
}

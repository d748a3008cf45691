//! The RabbitMQ transport end to end (`ceccm server --transport amqp://...`, docs/amqp.md):
//! batches and the seed-7 astro-fit job through the shared broker of `$CECCM_TEST_AMQP_URL`
//! (skipped, saying so, when it is unset), and a broker of the test's own killed and restarted
//! mid-job. The machine's shared broker is never stopped or reconfigured: the tests use
//! region names of their own, so their queues (`ceccm.<region>`) are theirs alone, and delete
//! them when done.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use lapin::options::{
    BasicAckOptions, BasicGetOptions, BasicPublishOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use serde_json::{Value, json};

use crate::astro_fit::{
    assert_chunks_written_once, assert_same_maps, download, seed7_reference, start_seed7_job_with,
};
use crate::control_plane::{Http, assert_each_result_once, wait_for_phase};
use crate::support::{Server, wait_until};

/// The shared broker's URL, or `None` (after saying why) when the environment has none.
pub(crate) fn shared_broker(test: &str) -> Option<String> {
    match std::env::var("CECCM_TEST_AMQP_URL") {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            eprintln!(
                "SKIPPED {test}: CECCM_TEST_AMQP_URL is not set (.ci/run starts RabbitMQ and \
                 sets it to amqp://guest:guest@127.0.0.1:5672/%2f)"
            );
            None
        }
    }
}

/// Two region names no other test (or run) uses: on a shared broker, queues are named after
/// regions.
pub(crate) fn unique_regions() -> [String; 2] {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let tag = format!("q{}-{n}", std::process::id());
    [format!("{tag}-edge"), format!("{tag}-cloud")]
}

fn region(name: &str, tier: &str) -> Value {
    json!({"apiVersion": "ceccm/v1", "kind": "Region", "metadata": {"name": name},
           "spec": {"tier": tier, "driver": "local", "capacity": {"cpu": 2},
                    "energy": {"idleWatts": 10, "wattsPerCore": 5, "pue": 1.2}}})
}

/// `n` tasks that each sleep, then print `out-INDEX` (what `assert_each_result_once` checks).
fn batch(name: &str, n: usize, sleep: &str) -> Value {
    let tasks: Vec<Value> = (0..n)
        .map(|i| json!({"command": "sh", "args": ["-c", format!("sleep {sleep}; echo out-{i}")]}))
        .collect();
    json!({"apiVersion": "ceccm/v1", "kind": "Application", "metadata": {"name": name},
           "spec": {"app": "container", "tasks": tasks, "maxAttempts": 5}})
}

/// A server whose tasks travel through `url`, with two regions of this test's own.
fn start(data_dir: &Path, http: &Http, url: &str) -> (Server, [String; 2]) {
    let server = Server::start(data_dir, &["--lease-seconds", "2", "--transport", url]);
    let regions = unique_regions();
    http.apply(&server, "regions", &region(&regions[0], "edge"));
    http.apply(&server, "regions", &region(&regions[1], "cloud"));
    (server, regions)
}

fn queue_arguments(dead_letter: bool) -> FieldTable {
    let mut arguments = FieldTable::default();
    arguments.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    if dead_letter {
        arguments.insert(
            "x-dead-letter-exchange".into(),
            AMQPValue::LongString("ceccm.dead-letter".into()),
        );
    }
    arguments
}

/// Runs `f` on a channel to the broker at `url`.
fn with_channel<T>(
    http: &Http,
    url: &str,
    f: impl AsyncFnOnce(&lapin::Channel) -> lapin::Result<T>,
) -> T {
    http.runtime.block_on(async {
        let connection = lapin::Connection::connect(url, lapin::ConnectionProperties::default())
            .await
            .expect("connect to the broker");
        let channel = connection.create_channel().await.expect("channel");
        let out = f(&channel).await.expect("broker operation");
        let _ = connection.close(200, "done".into()).await;
        out
    })
}

/// Messages ready in a queue (declared passively: it must exist).
fn ready_messages(http: &Http, url: &str, queue: &str) -> u32 {
    with_channel(http, url, async |channel| {
        let declared = channel
            .queue_declare(
                queue.into(),
                QueueDeclareOptions::durable().passive(),
                FieldTable::default(),
            )
            .await?;
        Ok(declared.message_count())
    })
}

pub(crate) fn delete_queues(http: &Http, url: &str, regions: &[String]) {
    with_channel(http, url, async |channel| {
        for region in regions {
            channel
                .queue_delete(
                    format!("ceccm.{region}").as_str().into(),
                    QueueDeleteOptions::default(),
                )
                .await?;
        }
        Ok(())
    });
}

fn wait_for_failed(http: &Http, server: &Server, app: &str) {
    wait_until(&format!("{app} to fail"), Duration::from_secs(120), || {
        let object = http.get(&server.api(&format!("applications/{app}")));
        (object["status"]["phase"] == "Failed").then_some(())
    });
}

/// Through the shared broker: a batch runs each task once, a malformed message is dropped
/// without stopping the worker, and a task past its attempts is dead-lettered in the store and
/// its message routed to `ceccm.dead-letter`.
#[test]
fn a_batch_through_rabbitmq_runs_each_task_once_and_dead_letters_the_hopeless() {
    let Some(url) = shared_broker("a_batch_through_rabbitmq_runs_each_task_once") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let http = Http::new();
    let (server, regions) = start(dir.path(), &http, &url);
    // A message no producer of ours would send: the region's workers must drop it and go on.
    for region in &regions {
        with_channel(&http, &url, async |channel| {
            let queue = format!("ceccm.{region}");
            channel
                .queue_declare(
                    queue.as_str().into(),
                    QueueDeclareOptions::durable(),
                    queue_arguments(true),
                )
                .await?;
            channel
                .basic_publish(
                    "".into(),
                    queue.as_str().into(),
                    BasicPublishOptions::default(),
                    b"{\"version\": 1, \"task\": ",
                    lapin::BasicProperties::default(),
                )
                .await?
                .await?;
            Ok(())
        });
    }
    http.apply(&server, "applications", &batch("rabbit", 40, "0.1"));
    let hopeless = json!({"apiVersion": "ceccm/v1", "kind": "Application",
        "metadata": {"name": "hopeless"},
        "spec": {"app": "container", "tasks": [{"command": "sh", "args": ["-c", "exit 3"]}],
                 "maxAttempts": 2}});
    http.apply(&server, "applications", &hopeless);

    wait_for_phase(
        &http,
        &server,
        "rabbit",
        "Succeeded",
        Duration::from_secs(180),
    );
    assert_each_result_once(&http, &server, "rabbit", 40);
    wait_for_failed(&http, &server, "hopeless");
    let task = http.get(&server.api("tasks/hopeless-00000"));
    assert_eq!(task["status"]["state"], "DeadLettered", "{task}");
    assert_eq!(task["status"]["attempts"], 2, "{task}");
    let uid = task["metadata"]["uid"].as_str().unwrap().to_string();

    // The dead-lettered task's message reached the dead-letter queue, with RabbitMQ's x-death.
    // (Other messages met there are older runs' and are dropped.)
    let dead = wait_until(
        "the message in ceccm.dead-letter",
        Duration::from_secs(30),
        || {
            with_channel(&http, &url, async |channel| {
                while let Some(message) = channel
                    .basic_get("ceccm.dead-letter".into(), BasicGetOptions::default())
                    .await?
                {
                    let body: Value =
                        serde_json::from_slice(&message.delivery.data).unwrap_or(Value::Null);
                    let headers = message.delivery.properties.headers().clone();
                    message
                        .delivery
                        .acker
                        .ack(BasicAckOptions::default())
                        .await?;
                    if body["uid"] == uid.as_str() {
                        return Ok(Some((body, headers)));
                    }
                }
                Ok(None)
            })
        },
    );
    assert_eq!(dead.0["task"], "hopeless-00000", "{}", dead.0);
    assert_eq!(dead.0["version"], 1);
    let headers = dead.1.expect("headers");
    assert!(
        headers.contains_key("x-death"),
        "dead-lettered by RabbitMQ: {headers:?}"
    );

    // The tasks went through the regions' queues, and nothing is left in them.
    let placed: Vec<String> = http
        .get(&server.api("tasks?labelSelector=ceccm/application%3Drabbit"))["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["status"]["region"].as_str().unwrap().to_string())
        .collect();
    assert!(placed.iter().all(|r| regions.contains(r)), "{placed:?}");
    for region in placed.iter().collect::<std::collections::BTreeSet<_>>() {
        wait_until(
            &format!("ceccm.{region} to be empty"),
            Duration::from_secs(30),
            || (ready_messages(&http, &url, &format!("ceccm.{region}")) == 0).then_some(()),
        );
    }
    server.kill();
    delete_queues(&http, &url, &regions);
}

/// The seed-7 astro-fit job through RabbitMQ gives the maps `astro-fit fit-cube` gives (and so
/// the embedded queue's, which its own tests compare with the same reference).
#[test]
fn the_seed7_job_through_rabbitmq_gives_the_embedded_maps() {
    let Some(url) = shared_broker("the_seed7_job_through_rabbitmq_gives_the_embedded_maps") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let http = Http::new();
    let (server, regions) = start(&dir.path().join("server"), &http, &url);
    start_seed7_job_with(&http, &server, dir.path(), json!({}));
    let app = wait_for_phase(
        &http,
        &server,
        "seed7",
        "Succeeded",
        Duration::from_secs(600),
    );
    assert_eq!(app["status"]["progress"]["total"], 9);
    assert_chunks_written_once(&http, &server, 7);
    let maps = download(&http, &server, "seed7", "maps.fits", dir.path());
    assert_same_maps(&seed7_reference(dir.path()), &maps);
    server.kill();
    delete_queues(&http, &url, &regions);
}

/// A RabbitMQ node of the test's own: its own name, ports, data and logs under a temporary
/// directory, no plugins. Killed with its process group.
struct Node {
    base: PathBuf,
    name: String,
    port: u16,
    dist_port: u16,
    child: Option<Child>,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn rabbitmq_server() -> Option<PathBuf> {
    // The Debian wrapper in /usr/sbin switches to the rabbitmq user; the script it runs does not.
    let direct = PathBuf::from("/usr/lib/rabbitmq/bin/rabbitmq-server");
    if direct.exists() {
        return Some(direct);
    }
    let found = Command::new("sh")
        .args(["-c", "command -v rabbitmq-server"])
        .output()
        .ok()?;
    let path = String::from_utf8_lossy(&found.stdout).trim().to_string();
    (!path.is_empty()).then(|| PathBuf::from(path))
}

impl Node {
    fn start(base: &Path) -> Node {
        std::fs::create_dir_all(base).unwrap();
        std::fs::write(base.join("enabled_plugins"), "[].\n").unwrap();
        std::fs::write(base.join("rabbitmq.conf"), "").unwrap();
        let mut node = Node {
            base: base.to_path_buf(),
            name: format!("ceccm-test-{}@localhost", std::process::id()),
            port: free_port(),
            dist_port: free_port(),
            child: None,
        };
        node.restart();
        node
    }

    fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    /// Starts the node (again, over the same data) and waits until it takes connections.
    fn restart(&mut self) {
        use std::os::unix::process::CommandExt;
        let base = &self.base;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(base.join("node.out"))
            .unwrap();
        let child = Command::new(rabbitmq_server().expect("rabbitmq-server"))
            .env("RABBITMQ_NODENAME", &self.name)
            .env("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1")
            .env("RABBITMQ_NODE_PORT", self.port.to_string())
            .env("RABBITMQ_DIST_PORT", self.dist_port.to_string())
            .env("RABBITMQ_MNESIA_BASE", base.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", base.join("log"))
            .env("RABBITMQ_CONFIG_FILE", base.join("rabbitmq.conf"))
            .env(
                "RABBITMQ_ADVANCED_CONFIG_FILE",
                base.join("advanced.config"),
            )
            .env(
                "RABBITMQ_ENABLED_PLUGINS_FILE",
                base.join("enabled_plugins"),
            )
            .env("RABBITMQ_PLUGINS_EXPAND_DIR", base.join("plugins-expand"))
            .env("RABBITMQ_PID_FILE", base.join("node.pid"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .process_group(0)
            .spawn()
            .expect("start rabbitmq-server");
        self.child = Some(child);
        let port = self.port;
        let out = base.join("node.out");
        wait_until(
            "the test's RabbitMQ node to listen",
            Duration::from_secs(120),
            || {
                if let Some(child) = self.child.as_mut()
                    && let Ok(Some(status)) = child.try_wait()
                {
                    panic!(
                        "the test's RabbitMQ node exited ({status}): {}",
                        std::fs::read_to_string(&out).unwrap_or_default()
                    );
                }
                std::net::TcpStream::connect(("127.0.0.1", port))
                    .ok()
                    .map(|_| ())
            },
        );
    }

    /// SIGKILL to the node's whole process group (the script and its beam), as a crash would.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-s", "KILL", "--", &format!("-{}", child.id())])
                .status();
            let _ = child.wait();
        }
        let port = self.port;
        wait_until(
            "the test's RabbitMQ node to stop listening",
            Duration::from_secs(30),
            || {
                std::net::TcpStream::connect(("127.0.0.1", port))
                    .is_err()
                    .then_some(())
            },
        );
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-s", "KILL", "--", &format!("-{}", child.id())])
                .status();
            let _ = child.wait();
        }
    }
}

/// A broker of the test's own is killed (SIGKILL) mid-job and started again: the job
/// completes with each task's result exactly once.
#[test]
fn a_broker_killed_and_restarted_mid_job_loses_and_duplicates_nothing() {
    if rabbitmq_server().is_none() {
        eprintln!(
            "SKIPPED a_broker_killed_and_restarted_mid_job: rabbitmq-server is not installed"
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let http = Http::new();
    let mut node = Node::start(&dir.path().join("rabbitmq"));
    let (server, _regions) = start(&dir.path().join("server"), &http, &node.url());
    http.apply(&server, "applications", &batch("survivor", 60, "1"));
    wait_until(
        "some tasks done, some still to do",
        Duration::from_secs(120),
        || {
            let app = http.get(&server.api("applications/survivor"));
            let done = app["status"]["progress"]["done"].as_u64()?;
            (done >= 8).then_some(())
        },
    );
    let before = http.get(&server.api("applications/survivor"))["status"]["progress"]["done"]
        .as_u64()
        .unwrap();
    assert!(
        before < 60,
        "the job ended before the broker could be killed"
    );
    node.kill();
    node.restart();
    let app = wait_for_phase(
        &http,
        &server,
        "survivor",
        "Succeeded",
        Duration::from_secs(300),
    );
    assert_eq!(app["status"]["progress"]["done"], 60);
    assert_each_result_once(&http, &server, "survivor", 60);
    server.kill();
}

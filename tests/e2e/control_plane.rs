//! The control plane end to end: a real `ceccm server` with two local regions runs batch
//! applications through worker processes, survives a killed worker and a killed server.

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::{Value, json};

use crate::support::{Server, children_of, wait_until, workspace_root};

/// Blocking JSON calls over a private runtime (the polling helpers are synchronous).
pub(crate) struct Http {
    pub(crate) runtime: tokio::runtime::Runtime,
    pub(crate) client: reqwest::Client,
}

impl Http {
    pub(crate) fn new() -> Http {
        Http {
            runtime: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap(),
            client: reqwest::Client::builder()
                .default_headers(
                    [(
                        reqwest::header::AUTHORIZATION,
                        format!("Bearer {}", crate::support::ADMIN_TOKEN)
                            .parse()
                            .unwrap(),
                    )]
                    .into_iter()
                    .collect(),
                )
                .build()
                .unwrap(),
        }
    }

    pub(crate) fn send(&self, request: reqwest::RequestBuilder) -> (u16, Value) {
        self.runtime.block_on(async {
            let response = request.send().await.expect("request");
            let status = response.status().as_u16();
            let text = response.text().await.unwrap_or_default();
            (
                status,
                serde_json::from_str(&text).unwrap_or(Value::String(text)),
            )
        })
    }

    pub(crate) fn get(&self, url: &str) -> Value {
        let (status, body) = self.send(self.client.get(url));
        assert_eq!(status, 200, "GET {url}: {body}");
        body
    }

    pub(crate) fn get_text(&self, url: &str) -> String {
        self.runtime.block_on(async {
            self.client
                .get(url)
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap()
        })
    }

    /// Applies `object` (PUT); returns it as stored.
    pub(crate) fn apply(&self, server: &Server, plural: &str, object: &Value) -> Value {
        let name = object["metadata"]["name"].as_str().unwrap();
        let (status, body) = self.send(
            self.client
                .put(server.api(&format!("{plural}/{name}")))
                .json(object),
        );
        assert!(
            status == 200 || status == 201,
            "apply {plural}/{name}: {status} {body}"
        );
        body
    }
}

pub(crate) fn regions() -> [Value; 2] {
    let region = |name: &str, tier: &str| {
        json!({"apiVersion": "ceccm/v1", "kind": "Region", "metadata": {"name": name},
               "spec": {"tier": tier, "driver": "local", "capacity": {"cpu": 2},
                        "energy": {"idleWatts": 10, "wattsPerCore": 5, "pue": 1.2}}})
    };
    [region("edge-a", "edge"), region("cloud-b", "cloud")]
}

/// `n` tasks that each sleep, then print `out-INDEX`.
fn batch(name: &str, n: usize, sleep: &str) -> Value {
    let tasks: Vec<Value> = (0..n)
        .map(|i| json!({"command": "sh", "args": ["-c", format!("sleep {sleep}; echo out-{i}")]}))
        .collect();
    json!({"apiVersion": "ceccm/v1", "kind": "Application", "metadata": {"name": name},
           "spec": {"app": "container", "tasks": tasks, "maxAttempts": 5}})
}

pub(crate) fn start_with_regions(dir: &std::path::Path, http: &Http) -> Server {
    let server = Server::start(dir, &["--lease-seconds", "2"]);
    for region in regions() {
        http.apply(&server, "regions", &region);
    }
    server
}

pub(crate) fn wait_for_phase(
    http: &Http,
    server: &Server,
    app: &str,
    phase: &str,
    timeout: Duration,
) -> Value {
    wait_until(&format!("{app} to reach {phase}"), timeout, || {
        let object = http.get(&server.api(&format!("applications/{app}")));
        let now = object["status"]["phase"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        assert_ne!(now, "Failed", "application failed: {}", object["status"]);
        (now == phase).then_some(object)
    })
}

/// Every task is Done, and the results file holds each task's own output exactly once.
pub(crate) fn assert_each_result_once(http: &Http, server: &Server, app: &str, n: usize) {
    let tasks = http.get(&server.api(&format!("tasks?labelSelector=ceccm/application%3D{app}")));
    let items = tasks["items"].as_array().unwrap();
    assert_eq!(items.len(), n);
    assert!(items.iter().all(|t| t["status"]["state"] == "Done"));
    let index = http.get(&server.api(&format!("applications/{app}/results")));
    assert_eq!(index["files"][0]["name"], "results.ndjson");
    let text = http.get_text(&server.api(&format!("applications/{app}/results/results.ndjson")));
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), n, "one result line per task");
    let mut seen = BTreeSet::new();
    for line in &lines {
        let i = line["index"].as_u64().unwrap() as usize;
        assert!(seen.insert(i), "task {i} has two results");
        assert_eq!(line["result"]["stdout"], format!("out-{i}\n"));
    }
    assert_eq!(seen.len(), n);
}

/// A schema of its own in the test database (`$CECCM_TEST_POSTGRES_URL`), dropped when done.
struct PgSchema {
    base: String,
    name: String,
}

impl PgSchema {
    fn make() -> Option<PgSchema> {
        let base = std::env::var("CECCM_TEST_POSTGRES_URL").ok()?;
        let name = format!("ha{}", std::process::id());
        let schema = PgSchema { base, name };
        schema.psql(&format!(
            "DROP SCHEMA IF EXISTS {0} CASCADE; CREATE SCHEMA {0}",
            schema.name
        ));
        Some(schema)
    }

    fn psql(&self, sql: &str) {
        let status = std::process::Command::new("psql")
            .args([self.base.as_str(), "-qc", sql])
            .env("PGOPTIONS", "--client-min-messages=warning")
            .status()
            .unwrap();
        assert!(status.success(), "psql {sql}");
    }

    fn url(&self) -> String {
        let separator = if self.base.contains('?') { '&' } else { '?' };
        format!(
            "{}{separator}options=-c%20search_path%3D{}",
            self.base, self.name
        )
    }
}

impl Drop for PgSchema {
    fn drop(&mut self) {
        self.psql(&format!("DROP SCHEMA IF EXISTS {} CASCADE", self.name));
    }
}

/// Two servers on one PostgreSQL store: both answer alike; exactly one runs the controllers
/// (its local driver's workers are its children); killed with SIGKILL mid-job, the other takes
/// over within the takeover deadline and the job completes with each result once.
#[test]
fn two_servers_on_one_postgres_agree_and_the_survivor_leads_once_the_leader_is_killed() {
    let Some(schema) = PgSchema::make() else {
        eprintln!("skipped: needs CECCM_TEST_POSTGRES_URL (.ci/run sets it)");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let url = schema.url();
    let args = ["--database-url", url.as_str(), "--lease-seconds", "3"];
    let first = Server::start(&dir.path().join("first"), &args);
    let second = Server::start(&dir.path().join("second"), &args);
    let http = Http::new();
    // A write acknowledged by one server is read on the other at once: at its resource version
    // or a later one (the leader's region reconciler writes the status meanwhile).
    let version = |o: &Value| -> u64 {
        o["metadata"]["resourceVersion"]
            .as_str()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no resourceVersion: {o}"))
    };
    for (i, region) in regions().iter().enumerate() {
        let (writer, reader) = if i == 0 {
            (&first, &second)
        } else {
            (&second, &first)
        };
        let written = http.apply(writer, "regions", region);
        let name = written["metadata"]["name"].as_str().unwrap();
        let read = http.get(&reader.api(&format!("regions/{name}")));
        assert_eq!(read["metadata"]["uid"], written["metadata"]["uid"]);
        assert!(
            version(&read) >= version(&written),
            "read {read} before the write {written}"
        );
        let listed = http.get(&reader.api("regions"));
        let items = listed["items"].as_array().unwrap();
        assert!(
            items.iter().any(|r| r["metadata"]["name"] == name),
            "{listed}"
        );
        assert!(version(&listed) >= version(&written), "{listed}");
    }
    http.apply(&second, "applications", &batch("ha", 16, "0.5"));

    let leader_is_first = wait_until(
        "one server running workers",
        Duration::from_secs(60),
        || {
            let (a, b) = (children_of(first.pid()), children_of(second.pid()));
            match (a.is_empty(), b.is_empty()) {
                (false, true) => Some(true),
                (true, false) => Some(false),
                _ => None,
            }
        },
    );
    let (leader, survivor) = if leader_is_first {
        (first, second)
    } else {
        (second, first)
    };
    let list = survivor.api("tasks?labelSelector=ceccm/application%3Dha");
    wait_until("some tasks done, not all", Duration::from_secs(60), || {
        let tasks = http.get(&list);
        let done = tasks["items"]
            .as_array()?
            .iter()
            .filter(|t| t["status"]["state"] == "Done")
            .count();
        (2..16).contains(&done).then_some(())
    });
    let killed = std::time::Instant::now();
    leader.kill();
    wait_until(
        "the survivor running workers",
        Duration::from_secs(20),
        || (!children_of(survivor.pid()).is_empty()).then_some(()),
    );
    eprintln!(
        "the survivor led {:.1} s after the leader was killed",
        killed.elapsed().as_secs_f64()
    );
    wait_for_phase(
        &http,
        &survivor,
        "ha",
        "Succeeded",
        Duration::from_secs(120),
    );
    assert_each_result_once(&http, &survivor, "ha", 16);
}

/// One server per data directory: a second one on the same directory exits non-zero, naming
/// the server that holds it, and changes nothing; once the first has gone, it starts.
#[test]
fn a_second_server_on_the_same_data_directory_refuses_to_start_and_names_the_first() {
    let dir = tempfile::tempdir().unwrap();
    let first = Server::start(dir.path(), &[]);
    let second = std::process::Command::new(crate::support::bin("ceccm"))
        .args(["server", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!second.status.success());
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(stderr.contains("another ceccm server"), "{stderr}");
    assert!(stderr.contains(&first.url), "names the first: {stderr}");
    // The first still serves.
    let http = Http::new();
    let (status, _) = http.send(http.client.get(first.api("regions")));
    assert_eq!(status, 200);
    first.kill();
    let again = Server::start(dir.path(), &[]);
    let (status, _) = http.send(http.client.get(again.api("regions")));
    assert_eq!(status, 200);
}

#[test]
fn fifty_tasks_succeed_although_a_worker_is_killed_mid_task() {
    let dir = tempfile::tempdir().unwrap();
    let http = Http::new();
    let server = start_with_regions(dir.path(), &http);
    http.apply(&server, "applications", &batch("fifty", 50, "0.4"));

    // A task in flight: its worker id is REGION-PID.
    let (task, pid) = wait_until("a leased task", Duration::from_secs(60), || {
        let tasks = http.get(&server.api("tasks?labelSelector=ceccm/application%3Dfifty"));
        tasks["items"].as_array()?.iter().find_map(|t| {
            let worker = t["status"]["worker"].as_str()?;
            (t["status"]["state"] == "Leased").then(|| {
                let pid = worker.rsplit('-').next().unwrap().to_string();
                (t["metadata"]["name"].as_str().unwrap().to_string(), pid)
            })
        })
    });
    let killed = std::process::Command::new("kill")
        .args(["-KILL", &pid])
        .status()
        .unwrap();
    assert!(killed.success(), "kill worker {pid}");

    let app = wait_for_phase(
        &http,
        &server,
        "fifty",
        "Succeeded",
        Duration::from_secs(180),
    );
    assert_eq!(app["status"]["progress"]["done"], 50);
    assert!(app["status"]["energyJoules"].as_f64().unwrap() >= 0.0);
    // Where the tasks run is the scheduler's choice; each must run in one of the two regions.
    let placements = app["status"]["placements"].as_array().unwrap();
    let placed: u64 = placements
        .iter()
        .map(|p| p["tasks"].as_u64().unwrap())
        .sum();
    assert_eq!(placed, 50);
    assert!(
        placements
            .iter()
            .all(|p| ["edge-a", "cloud-b"].contains(&p["region"].as_str().unwrap()))
    );
    let redelivered = http.get(&server.api(&format!("tasks/{task}")));
    assert!(
        redelivered["status"]["attempts"].as_u64().unwrap() >= 2,
        "{redelivered}"
    );
    assert!(
        !redelivered["status"]["worker"]
            .as_str()
            .unwrap()
            .ends_with(&format!("-{pid}"))
    );
    let events = http.get(&server.api(&format!(
        "events?fieldSelector=involvedObject.kind%3DTask,involvedObject.name%3D{task}"
    )));
    assert!(
        events["items"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["reason"] == "LeaseExpired")
    );
    assert_each_result_once(&http, &server, "fifty", 50);
}

#[test]
fn a_restarted_server_finishes_the_work_without_loss_or_duplicates() {
    let dir = tempfile::tempdir().unwrap();
    let http = Http::new();
    let server = start_with_regions(dir.path(), &http);
    http.apply(&server, "applications", &batch("resume", 30, "0.3"));
    wait_until(
        "some tasks done and some running",
        Duration::from_secs(60),
        || {
            let app = http.get(&server.api("applications/resume"));
            let leased =
                http.get(&server.api("tasks?labelSelector=ceccm/application%3Dresume"))["items"]
                    .as_array()?
                    .iter()
                    .any(|t| t["status"]["state"] == "Leased");
            (app["status"]["progress"]["done"].as_u64()? >= 3 && leased).then_some(())
        },
    );
    let data_dir = server.data_dir.clone();
    server.kill();

    let restarted = Server::start(&data_dir, &["--lease-seconds", "2"]);
    let app = wait_for_phase(
        &http,
        &restarted,
        "resume",
        "Succeeded",
        Duration::from_secs(180),
    );
    assert_eq!(app["status"]["progress"]["done"], 30);
    assert_each_result_once(&http, &restarted, "resume", 30);
}

#[test]
fn the_examples_apply_and_their_regions_become_ready() {
    let dir = tempfile::tempdir().unwrap();
    let http = Http::new();
    let server = Server::start(dir.path(), &[]);
    let mut names = Vec::new();
    for file in ["examples/local-regions.yaml", "examples/batch-app.yaml"] {
        let text = std::fs::read_to_string(workspace_root().join(file)).unwrap();
        for document in text.split("\n---\n") {
            let object: Value = yaml_serde::from_str(document).unwrap();
            let plural = match object["kind"].as_str().unwrap() {
                "Region" => "regions",
                "Application" => "applications",
                other => panic!("unexpected kind {other} in {file}"),
            };
            // Dry run first: validated, answered, not stored.
            let name = object["metadata"]["name"].as_str().unwrap().to_string();
            let (status, body) = http.send(
                http.client
                    .put(server.api(&format!("{plural}/{name}?dryRun=All")))
                    .json(&object),
            );
            assert_eq!(status, 201, "{file}: {body}");
            if plural == "regions" {
                http.apply(&server, plural, &object);
                names.push(name);
            }
        }
    }
    assert_eq!(names.len(), 2);
    for name in names {
        wait_until(
            &format!("region {name} Ready"),
            Duration::from_secs(30),
            || {
                let region = http.get(&server.api(&format!("regions/{name}")));
                (region["status"]["phase"] == "Ready").then_some(())
            },
        );
    }
    let (status, _) = http.send(http.client.get(server.api("applications/sample-batch")));
    assert_eq!(status, 404, "a dry run stores nothing");
}

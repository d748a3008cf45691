//! Tasks in OCI containers (issue 15): a region with `runtime: oci` runs each task's process in
//! a runc container made from the astro-fit image, built by `ceccm image build` from this
//! project's own binaries into the server's image store. Needs root and runc (`.ci/run`
//! installs runc); skipped with a message otherwise.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::{Value, json};

use crate::control_plane::{Http, wait_for_phase};
use crate::support::{Server, bin, wait_until};

fn runc_usable() -> bool {
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
    let runc = ["/usr/sbin/runc", "/usr/bin/runc", "/sbin/runc"]
        .iter()
        .any(|p| Path::new(p).exists());
    root && runc
}

/// A server whose one region runs containers, with the astro-fit image in its store.
fn oci_server(dir: &Path, http: &Http) -> Server {
    oci_server_with(dir, http, "boxed", &[])
}

/// [`oci_server`] with its region named `region` and more server arguments.
fn oci_server_with(dir: &Path, http: &Http, region: &str, args: &[&str]) -> Server {
    let mut server_args = vec!["--lease-seconds", "10"];
    server_args.extend(args);
    let server = Server::start(dir, &server_args);
    let built = Command::new(bin("ceccm"))
        .args(["image", "build", "astro-fit", "--data-dir"])
        .arg(dir)
        .output()
        .unwrap();
    assert!(
        built.status.success(),
        "{}",
        String::from_utf8_lossy(&built.stderr)
    );
    http.apply(
        &server,
        "regions",
        &json!({"apiVersion": "ceccm/v1", "kind": "Region", "metadata": {"name": region},
                "spec": {"tier": "cloud", "driver": "local", "runtime": "oci",
                         "capacity": {"cpu": 2, "memoryMiB": 8192}}}),
    );
    server
}

fn probe(http: &Http, server: &Server, name: &str, args: &[&str], memory_mib: u64) -> Value {
    let mut command = vec!["/usr/local/bin/ceccm", "probe"];
    command.extend(args);
    http.apply(
        server,
        "applications",
        &json!({"apiVersion": "ceccm/v1", "kind": "Application", "metadata": {"name": name},
                "spec": {"app": "container", "image": "astro-fit", "maxAttempts": 1,
                         "resources": {"cpu": 1, "memoryMiB": memory_mib},
                         "placement": {"regions": ["boxed"]},
                         "tasks": [{"command": command[0], "args": &command[1..]}]}}),
    );
    first_task_when_finished(http, server, name)
}

fn first_task_when_finished(http: &Http, server: &Server, name: &str) -> Value {
    wait_until(
        &format!("{name} finished"),
        Duration::from_secs(120),
        || {
            let app = http.get(&server.api(&format!("applications/{name}")));
            matches!(
                app["status"]["phase"].as_str(),
                Some("Succeeded" | "Failed")
            )
            .then_some(())
        },
    );
    http.get(&server.api(&format!("tasks/{name}-00000")))
}

#[test]
fn a_task_in_a_container_sees_only_its_mounts_and_its_memory_limit_ends_it_oomkilled() {
    if !runc_usable() {
        eprintln!("skipped: needs root and runc");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let http = Http::new();
    let server = oci_server(&dir.path().join("server"), &http);

    // A file of the host, outside every mount: not there for the container.
    let secret = dir.path().join("server/admin.token");
    assert!(secret.exists());
    let read = probe(
        &http,
        &server,
        "read-host",
        &["read", secret.to_str().unwrap()],
        128,
    );
    assert_eq!(read["status"]["state"], "DeadLettered", "{read}");
    assert_eq!(read["status"]["reason"], "Error", "{read}");
    let error = read["status"]["error"].as_str().unwrap();
    assert!(error.contains("cannot read"), "{error}");
    assert!(!error.contains("ceccm_"), "no token leaked: {error}");

    // Its cgroup carries the application's memory limit.
    let limit = probe(&http, &server, "limit", &["memory-limit"], 96);
    assert_eq!(limit["status"]["state"], "Done", "{limit}");
    assert_eq!(
        limit["status"]["result"]["stdout"].as_str().unwrap().trim(),
        (96u64 << 20).to_string()
    );

    // Past it, the kernel ends the task, and the task says so as Kubernetes would.
    let oom = probe(&http, &server, "oom", &["alloc", "512"], 64);
    assert_eq!(oom["status"]["state"], "DeadLettered", "{oom}");
    assert_eq!(oom["status"]["reason"], "OOMKilled", "{oom}");

    // Past its deadline, it is killed (it would sleep far longer than the wait allows).
    http.apply(
        &server,
        "applications",
        &json!({"apiVersion": "ceccm/v1", "kind": "Application", "metadata": {"name": "slow"},
                "spec": {"app": "container", "image": "astro-fit", "maxAttempts": 1,
                         "taskDeadlineSeconds": 2, "placement": {"regions": ["boxed"]},
                         "tasks": [{"command": "/usr/local/bin/ceccm", "args": ["probe", "sleep", "600"]}]}}),
    );
    let slow = first_task_when_finished(&http, &server, "slow");
    assert_eq!(slow["status"]["state"], "DeadLettered", "{slow}");
    assert_eq!(slow["status"]["reason"], "DeadlineExceeded", "{slow}");

    // An image the store does not have.
    http.apply(
        &server,
        "applications",
        &json!({"apiVersion": "ceccm/v1", "kind": "Application", "metadata": {"name": "noimage"},
                "spec": {"app": "container", "image": "nowhere", "maxAttempts": 1,
                         "placement": {"regions": ["boxed"]},
                         "tasks": [{"command": "/bin/true"}]}}),
    );
    let task = first_task_when_finished(&http, &server, "noimage");
    assert_eq!(task["status"]["reason"], "ImageNotFound", "{task}");
}

/// The seed-7 astro-fit job on a region whose tasks run in containers, its tasks travelling
/// through RabbitMQ (the shared broker of `$CECCM_TEST_AMQP_URL`; the embedded queue where
/// there is none, saying so), gives the maps of `astro-fit fit-cube` on one host: the maps the
/// process runtime with the embedded queue gives (`tests/e2e/astro_fit.rs`).
#[test]
fn the_astro_fit_job_in_containers_through_rabbitmq_gives_the_same_maps() {
    use crate::amqp::{delete_queues, shared_broker, unique_regions};
    use crate::astro_fit::{
        assert_chunks_written_once, assert_same_maps, download, seed7_reference,
        start_seed7_job_with,
    };
    if !runc_usable() {
        eprintln!("skipped: needs root and runc");
        return;
    }
    let broker =
        shared_broker("the_astro_fit_job_in_containers_through_rabbitmq_gives_the_same_maps");
    let [region, _] = unique_regions();
    let transport: Vec<&str> = broker
        .as_deref()
        .map(|url| vec!["--transport", url])
        .unwrap_or_default();
    let dir = tempfile::tempdir().unwrap();
    let http = Http::new();
    let server = oci_server_with(&dir.path().join("server"), &http, &region, &transport);
    start_seed7_job_with(
        &http,
        &server,
        dir.path(),
        json!({"placement": {"regions": [region]}, "resources": {"cpu": 1, "memoryMiB": 2048}}),
    );
    wait_for_phase(
        &http,
        &server,
        "seed7",
        "Succeeded",
        Duration::from_secs(900),
    );
    assert_chunks_written_once(&http, &server, 7);
    let maps = download(&http, &server, "seed7", "maps.fits", dir.path());
    assert_same_maps(&seed7_reference(dir.path()), &maps);
    server.kill();
    if let Some(url) = broker {
        delete_queues(&http, &url, &[region]);
    }
}

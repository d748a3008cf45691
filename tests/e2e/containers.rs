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
    let server = Server::start(dir, &["--lease-seconds", "10"]);
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
        &json!({"apiVersion": "ceccm/v1", "kind": "Region", "metadata": {"name": "boxed"},
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

/// The seed-7 astro-fit job on a region whose tasks run in containers gives the maps of
/// `astro-fit fit-cube` on one host.
#[test]
fn the_astro_fit_job_in_containers_gives_the_same_maps() {
    use crate::astro_fit::{assert_same_maps, download, seed7_reference, start_seed7_job_with};
    if !runc_usable() {
        eprintln!("skipped: needs root and runc");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let http = Http::new();
    let server = oci_server(&dir.path().join("server"), &http);
    start_seed7_job_with(
        &http,
        &server,
        dir.path(),
        json!({"placement": {"regions": ["boxed"]}, "resources": {"cpu": 1, "memoryMiB": 2048}}),
    );
    wait_for_phase(
        &http,
        &server,
        "seed7",
        "Succeeded",
        Duration::from_secs(900),
    );
    let maps = download(&http, &server, "seed7", "maps.fits", dir.path());
    assert_same_maps(&seed7_reference(dir.path()), &maps);
}

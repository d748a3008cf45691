//! astro-fit through the control plane: a cube and a template library uploaded as Datasets, an
//! astro-fit Application over two local regions, its maps downloaded and compared with
//! `astro-fit fit-cube`'s maps of the same cube and parameters; bad input refused or failed
//! with its cause.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::{Value, json};

use crate::control_plane::{Http, regions, wait_for_phase};
use crate::support::{Server, bin, shared_data, wait_until, workspace_root};

/// A server with the two local regions; leases of 5 s, so that a worker starved of CPU by the
/// other tests fitting in parallel keeps its lease, while a killed one loses it soon.
fn start_with_regions(dir: &Path, http: &Http) -> Server {
    let server = Server::start(dir, LEASE);
    for region in regions() {
        http.apply(&server, "regions", &region);
    }
    server
}

const LEASE: &[&str] = &["--lease-seconds", "5"];

fn sample_cube() -> PathBuf {
    workspace_root().join("examples/data/sample-LOGCUBE.fits.gz")
}

/// A plain tar of the FITS templates in `dir` (entries are bare file names).
fn template_tar(dir: &Path, out: &Path) -> PathBuf {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".fits") || n.ends_with(".txt"))
        .collect();
    names.sort();
    let tar = out.join("templates.tar");
    let status = Command::new("tar")
        .arg("-cf")
        .arg(&tar)
        .arg("-C")
        .arg(dir)
        .args(&names)
        .status()
        .expect("run tar");
    assert!(status.success());
    tar
}

/// The names of the artifacts the tasks' completions recorded, one per file and completion.
fn artifact_names(tasks: &[Value]) -> Vec<String> {
    tasks
        .iter()
        .flat_map(|t| {
            t["status"]["artifacts"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        })
        .map(|a| a["name"].as_str().unwrap().to_string())
        .collect()
}

pub(crate) fn dataset(
    http: &Http,
    server: &Server,
    name: &str,
    format: &str,
    region: Option<&str>,
) {
    let mut spec = json!({"format": format});
    if let Some(r) = region {
        spec["region"] = json!(r);
    }
    http.apply(
        server,
        "datasets",
        &json!({"apiVersion": "ceccm/v1", "kind": "Dataset", "metadata": {"name": name},
                "spec": spec}),
    );
}

fn upload(http: &Http, server: &Server, name: &str, file: &Path) {
    let bytes = std::fs::read(file).unwrap();
    let (status, body) = http.send(
        http.client
            .put(server.api(&format!("datasets/{name}/content")))
            .body(bytes),
    );
    assert_eq!(status, 200, "upload {name}: {body}");
}

fn astro_fit_app(name: &str, cube: &str, parameters: Value) -> Value {
    json!({"apiVersion": "ceccm/v1", "kind": "Application", "metadata": {"name": name},
           "spec": {"app": "astro-fit", "inputs": [{"dataset": cube}], "parameters": parameters,
                    "resources": {"cpu": 1}, "maxAttempts": 5}})
}

pub(crate) fn download(http: &Http, server: &Server, app: &str, file: &str, to: &Path) -> PathBuf {
    let bytes = http.runtime.block_on(async {
        let response = http
            .client
            .get(server.api(&format!("applications/{app}/results/{file}")))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{file} of {app}");
        response.bytes().await.unwrap()
    });
    let path = to.join(file);
    std::fs::write(&path, &bytes).unwrap();
    path
}

/// Every image HDU of two MAPS files, by name: BINID identical, every value equal to float32
/// precision (a spectrum fitted twice may differ in its last bits with the scratch history of
/// the thread that fitted it).
pub(crate) fn assert_same_maps(a: &Path, b: &Path) {
    use fitsio::hdu::HduInfo;
    let mut fa = fitsio::FitsFile::open(a).unwrap();
    let mut fb = fitsio::FitsFile::open(b).unwrap();
    let mut compared = 0;
    for index in 1.. {
        let Ok(ha) = fa.hdu(index) else { break };
        let name: String = ha.read_key(&mut fa, "EXTNAME").unwrap();
        let hb = fb
            .hdu(name.as_str())
            .unwrap_or_else(|_| panic!("{name} missing"));
        let HduInfo::ImageInfo { shape, .. } = &ha.info else {
            continue;
        };
        assert_eq!(
            Some(shape),
            match &hb.info {
                HduInfo::ImageInfo { shape, .. } => Some(shape),
                _ => None,
            },
            "{name}"
        );
        let va: Vec<f64> = ha.read_image(&mut fa).unwrap();
        let vb: Vec<f64> = hb.read_image(&mut fb).unwrap();
        for (i, (x, y)) in va.iter().zip(&vb).enumerate() {
            let same = if name == "BINID" {
                x == y
            } else {
                (x.is_nan() && y.is_nan()) || (x - y).abs() <= 1e-5 * x.abs().max(y.abs()) + 1e-6
            };
            assert!(same, "{name}[{i}]: {x} vs {y}");
        }
        compared += 1;
    }
    assert!(compared >= 5, "only {compared} image HDUs compared");
}

#[test]
fn a_cube_fitted_through_the_control_plane_gives_fit_cubes_maps() {
    let dir = tempfile::tempdir().unwrap();
    let http = Http::new();
    let server = start_with_regions(&dir.path().join("server"), &http);
    let emiles = shared_data().join("templates/emiles");
    let tar = template_tar(&emiles, dir.path());
    dataset(&http, &server, "cube", "cube", Some("edge-a"));
    dataset(&http, &server, "emiles", "templates", None);
    upload(&http, &server, "cube", &sample_cube());
    upload(&http, &server, "emiles", &tar);
    let parameters = json!({"templates": "emiles", "chunkSpectra": 16});
    http.apply(
        &server,
        "applications",
        &astro_fit_app("fit", "cube", parameters),
    );
    let app = wait_for_phase(&http, &server, "fit", "Succeeded", Duration::from_secs(600));
    let status = &app["status"];
    let stages: Vec<(String, u64, u64)> = status["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["name"].as_str().unwrap().to_string(),
                s["done"].as_u64().unwrap(),
                s["total"].as_u64().unwrap(),
            )
        })
        .collect();
    // 136 spaxels in chunks of 16.
    assert_eq!(
        stages,
        [
            ("prepare".to_string(), 1, 1),
            ("fit".to_string(), 9, 9),
            ("assemble".to_string(), 1, 1)
        ]
    );
    let index = http.get(&server.api("applications/fit/results"));
    let names: Vec<&str> = index["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        ["maps.fits", "maps.png", "model.fits", "summary.json"]
    );
    // Every chunk's artifact was written once: one completion per task, each naming its files.
    let tasks = http.get(&server.api("tasks?labelSelector=ceccm/application%3Dfit"));
    let mut chunk_files: Vec<String> = artifact_names(tasks["items"].as_array().unwrap())
        .into_iter()
        .filter(|n| n.starts_with("chunks/"))
        .collect();
    chunk_files.sort();
    let before = chunk_files.len();
    chunk_files.dedup();
    assert_eq!((before, chunk_files.len()), (18, 18));

    // The data plane fetched the cube once per region that ran a task: later tasks there
    // found it in the region's cache. Local regions share the server's host, so they link
    // the server's copy rather than download one.
    let items = tasks["items"].as_array().unwrap();
    let regions: std::collections::BTreeSet<&str> = items
        .iter()
        .map(|t| t["status"]["region"].as_str().unwrap())
        .collect();
    let fetched_cube = |how: &str| {
        items
            .iter()
            .filter(|t| {
                t["status"]["result"]["transfers"][how]
                    .as_array()
                    .is_some_and(|names| names.contains(&json!("cube")))
            })
            .count()
    };
    assert_eq!(
        (fetched_cube("linked"), fetched_cube("downloaded")),
        (regions.len(), 0),
        "{regions:?}"
    );
    let hits: u64 = items
        .iter()
        .filter_map(|t| t["status"]["result"]["transfers"]["cacheHits"].as_u64())
        .sum();
    assert!(
        hits >= 9,
        "later tasks found their inputs cached ({hits} hits)"
    );

    let maps = download(&http, &server, "fit", "maps.fits", dir.path());
    // The index gives what was uploaded and checked; the file served is that file.
    use sha2::Digest;
    let served = hex::encode(sha2::Sha256::digest(std::fs::read(&maps).unwrap()));
    assert_eq!(index["files"][0]["sha256"], served.as_str());
    let reference = dir.path().join("fit-cube");
    let output = Command::new(bin("astro-fit"))
        .arg("fit-cube")
        .arg(sample_cube())
        .arg("--templates")
        .arg(&emiles)
        .arg("--out")
        .arg(&reference)
        .args(["--chunk-spectra", "16", "--threads", "1"])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_same_maps(&reference.join("maps.fits"), &maps);

    // The predictor learned from the chunks' telemetry (9 fit tasks; prepare and assemble are
    // not chunk work).
    let predictor = http.get(&server.api("predictor"));
    assert_eq!(predictor["samples"], 9, "{predictor}");
}

/// `source` with every FLUX value NaN (the other HDUs as they are).
fn write_nan_cube(source: &Path, out: &Path) {
    let mut src = fitsio::FitsFile::open(source).unwrap();
    let mut dst = fitsio::FitsFile::create(out).open().unwrap();
    for index in 0.. {
        let Ok(hdu) = src.hdu(index) else { break };
        hdu.copy_to(&mut src, &mut dst).unwrap();
    }
    drop(dst);
    let mut dst = fitsio::FitsFile::edit(out).unwrap();
    let flux = dst.hdu("FLUX").unwrap();
    let values: Vec<f32> = flux.read_image(&mut dst).unwrap();
    let nan = vec![f32::NAN; values.len()];
    flux.write_image(&mut dst, &nan).unwrap();
}

fn wait_for_failure(http: &Http, server: &Server, app: &str) -> String {
    wait_until(&format!("{app} to fail"), Duration::from_secs(300), || {
        let object = http.get(&server.api(&format!("applications/{app}")));
        let status = &object["status"];
        assert_ne!(status["phase"], "Succeeded", "{app} succeeded: {status}");
        (status["phase"] == "Failed").then(|| {
            status["conditions"]
                .as_array()
                .unwrap()
                .iter()
                .find(|c| c["type"] == "Complete")
                .map(|c| c["message"].as_str().unwrap_or_default().to_string())
                .unwrap_or_default()
        })
    })
}

#[test]
fn bad_astro_fit_input_is_refused_or_fails_with_its_cause() {
    let dir = tempfile::tempdir().unwrap();
    let http = Http::new();
    let server = start_with_regions(&dir.path().join("server"), &http);
    dataset(&http, &server, "cube", "cube", None);
    upload(&http, &server, "cube", &sample_cube());

    // Known at apply: 422 naming the field.
    let refused = |app: Value, field: &str| {
        let (status, body) = http.send(
            http.client
                .put(server.api(&format!(
                    "applications/{}",
                    app["metadata"]["name"].as_str().unwrap()
                )))
                .json(&app),
        );
        assert_eq!(status, 422, "{body}");
        let fields: Vec<&str> = body["error"]["details"]["causes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["field"].as_str().unwrap())
            .collect();
        assert_eq!(fields, [field], "{body}");
    };
    refused(
        astro_fit_app("a", "cube", json!({"templates": "nothing"})),
        "spec.parameters.templates",
    );
    refused(
        astro_fit_app("b", "cube", json!({"moments": "two"})),
        "spec.parameters.moments",
    );
    refused(
        astro_fit_app("c", "cube", json!({"lamda": [1, 2]})),
        "spec.parameters.lamda",
    );
    refused(
        astro_fit_app("d", "nocube", json!({})),
        "spec.inputs[0].dataset",
    );

    // Known only once a worker reads it: the application fails, naming the cause, after one
    // attempt (bad input is not retried), and no results are published.
    let fails = |app: &str, cube: &str, parameters: Value| -> String {
        http.apply(
            &server,
            "applications",
            &astro_fit_app(app, cube, parameters),
        );
        wait_for_failure(&http, &server, app)
    };
    let bad_cube = |name: &str, format: &str, file: &Path| -> String {
        dataset(&http, &server, name, format, None);
        upload(&http, &server, name, file);
        fails(name, name, json!({}))
    };
    let message = bad_cube(
        "png",
        "cube",
        &workspace_root().join("docs/images/seed7-maps.png"),
    );
    assert!(
        message.contains("prepare") && message.contains("cube"),
        "{message}"
    );
    let index = http.get(&server.api("applications/png/results"));
    assert_eq!(index["files"], json!([]));
    let tasks = http.get(&server.api("tasks?labelSelector=ceccm/application%3Dpng"));
    assert_eq!(tasks["items"][0]["status"]["attempts"], 1);

    // A truncated FITS file.
    let truncated = dir.path().join("truncated.fits.gz");
    let bytes = std::fs::read(sample_cube()).unwrap();
    std::fs::write(&truncated, &bytes[..bytes.len() / 3]).unwrap();
    let message = bad_cube("half", "cube", &truncated);
    assert!(message.contains("cube"), "{message}");

    // A cube without a single usable spectrum (every flux NaN).
    let nan_cube = dir.path().join("nan-LOGCUBE.fits");
    write_nan_cube(&sample_cube(), &nan_cube);
    let message = bad_cube("nan", "cube", &nan_cube);
    assert!(message.contains("prepare"), "{message}");

    // A fit range the cube and templates do not cover.
    let message = fails("range", "cube", json!({"lamRange": [20000, 30000]}));
    assert!(message.contains("range"), "{message}");

    // A dataset declared as something else is not taken as a cube.
    let message = bad_cube("table", "csv", &sample_cube());
    assert!(message.contains("spec.format"), "{message}");
}

/// The seed-7 cube (652 spectra) in chunks of 100 spectra with the whole E-MILES library: each
/// chunk fits long enough for a worker or the server to be killed while it runs.
fn start_seed7_job(http: &Http, server: &Server, dir: &Path) {
    start_seed7_job_with(http, server, dir, json!({}));
}

/// [`start_seed7_job`] with `spec` merged into the application's spec (placement, objective).
pub(crate) fn start_seed7_job_with(http: &Http, server: &Server, dir: &Path, spec: Value) {
    let tar = template_tar(&shared_data().join("templates/emiles"), dir);
    dataset(http, server, "seed7", "cube", None);
    dataset(http, server, "emiles", "templates", None);
    upload(
        http,
        server,
        "seed7",
        &shared_data().join("cubes/synthetic-manga-seed7-LOGCUBE.fits.gz"),
    );
    upload(http, server, "emiles", &tar);
    let mut app = astro_fit_app(
        "seed7",
        "seed7",
        json!({"templates": "emiles", "chunkSpectra": 100, "moments": 4}),
    );
    for (key, value) in spec.as_object().into_iter().flatten() {
        app["spec"][key] = value.clone();
    }
    http.apply(server, "applications", &app);
}

pub(crate) fn seed7_reference(dir: &Path) -> PathBuf {
    let out = dir.join("fit-cube");
    let output = Command::new(bin("astro-fit"))
        .arg("fit-cube")
        .arg(shared_data().join("cubes/synthetic-manga-seed7-LOGCUBE.fits.gz"))
        .arg("--templates")
        .arg(shared_data().join("templates/emiles"))
        .arg("--out")
        .arg(&out)
        .args(["--chunk-spectra", "100", "--moments", "4", "--threads", "1"])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    out.join("maps.fits")
}

pub(crate) fn fit_tasks(http: &Http, server: &Server) -> Vec<Value> {
    let tasks =
        http.get(&server.api("tasks?labelSelector=ceccm/application%3Dseed7,ceccm/stage%3Dfit"));
    tasks["items"].as_array().cloned().unwrap_or_default()
}

/// Each chunk's files are recorded once, by the one completion that counted.
pub(crate) fn assert_chunks_written_once(http: &Http, server: &Server, chunks: usize) {
    let tasks = fit_tasks(http, server);
    assert_eq!(tasks.len(), chunks);
    let mut names = artifact_names(&tasks);
    names.sort();
    let all = names.len();
    names.dedup();
    assert_eq!((all, names.len()), (2 * chunks, 2 * chunks));
}

#[test]
fn a_worker_killed_mid_chunk_changes_nothing_in_the_maps() {
    let dir = tempfile::tempdir().unwrap();
    let http = Http::new();
    let server = start_with_regions(&dir.path().join("server"), &http);
    start_seed7_job(&http, &server, dir.path());
    // Kill the worker of a chunk while it fits (its id is REGION-PID); a chunk that finished
    // between the look and the kill does not count, so look again.
    let killed = wait_until(
        "a worker killed mid-chunk",
        Duration::from_secs(300),
        || {
            let leased = fit_tasks(&http, &server)
                .into_iter()
                .find(|t| t["status"]["state"] == "Leased")?;
            let worker = leased["status"]["worker"].as_str()?.to_string();
            let pid = worker.rsplit('-').next()?.to_string();
            Command::new("kill").args(["-9", &pid]).status().ok()?;
            let name = leased["metadata"]["name"].as_str()?.to_string();
            let now = http.get(&server.api(&format!("tasks/{name}")));
            (now["status"]["state"] != "Done" || now["status"]["worker"] != worker.as_str())
                .then_some(name)
        },
    );
    wait_for_phase(
        &http,
        &server,
        "seed7",
        "Succeeded",
        Duration::from_secs(600),
    );
    let task = http.get(&server.api(&format!("tasks/{killed}")));
    assert!(
        task["status"]["attempts"].as_u64().unwrap() >= 2,
        "the killed chunk was fitted again: {}",
        task["status"]
    );
    assert_chunks_written_once(&http, &server, 7);
    let maps = download(&http, &server, "seed7", "maps.fits", dir.path());
    assert_same_maps(&seed7_reference(dir.path()), &maps);
}

#[test]
fn a_server_killed_mid_job_resumes_to_the_same_maps() {
    let dir = tempfile::tempdir().unwrap();
    let http = Http::new();
    let data_dir = dir.path().join("server");
    let server = start_with_regions(&data_dir, &http);
    start_seed7_job(&http, &server, dir.path());
    wait_until("a chunk fitted", Duration::from_secs(300), || {
        fit_tasks(&http, &server)
            .iter()
            .any(|t| t["status"]["state"] == "Done")
            .then_some(())
    });
    server.kill();
    // Same data directory, a new process (and port): the store says where the job stood.
    let server = Server::start(&data_dir, LEASE);
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
}

/// README line 1: `ceccm demo` fits the sample cube through the control plane with nothing
/// outside the repository, says where the maps are and how accurate they are, and never
/// touches a directory that already holds something.
#[test]
fn the_main_job_fits_the_sample_cube_and_spares_existing_directories() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("demo");
    let output = Command::new(bin("ceccm"))
        .args(["demo", "--data-dir"])
        .arg(&data_dir)
        .current_dir(dir.path())
        .env("CECCM_SHARED_DATA", dir.path().join("nowhere"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    for expected in [
        "Succeeded",
        "136 fitted, 0 failed",
        "median chi2",
        "predicted",
        "accuracy",
    ] {
        assert!(stdout.contains(expected), "{expected:?} missing:\n{stdout}");
    }
    let maps = data_dir.join("maps");
    for file in [
        "maps.fits",
        "model.fits",
        "maps.png",
        "summary.json",
        "residuals.png",
    ] {
        assert!(maps.join(file).is_file(), "{file} missing");
    }

    // A second run on the same directory is refused and leaves it as it was.
    let before = std::fs::read_dir(&data_dir).unwrap().count();
    let again = Command::new(bin("ceccm"))
        .args(["demo", "--data-dir"])
        .arg(&data_dir)
        .output()
        .unwrap();
    assert!(!again.status.success());
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("not empty"),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    assert_eq!(std::fs::read_dir(&data_dir).unwrap().count(), before);
    assert!(maps.join("maps.fits").is_file());
}

/// After a job of enough chunks the placement predictor has learned from their telemetry and
/// reports its error on the newest ones (60 samples train it).
#[test]
fn the_predictor_learns_from_astro_fit_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let http = Http::new();
    let server = start_with_regions(&dir.path().join("server"), &http);
    dataset(&http, &server, "cube", "cube", None);
    upload(&http, &server, "cube", &sample_cube());
    // 136 spectra in chunks of 2: 68 chunk tasks, with the bundled library.
    http.apply(
        &server,
        "applications",
        &astro_fit_app("many", "cube", json!({"chunkSpectra": 2})),
    );
    wait_for_phase(
        &http,
        &server,
        "many",
        "Succeeded",
        Duration::from_secs(600),
    );
    let predictor = http.get(&server.api("predictor"));
    assert_eq!(predictor["samples"], 68, "{predictor}");
    assert_eq!(predictor["state"], "learned", "{predictor}");
    let mape = predictor["runtimeMape"].as_f64().unwrap();
    assert!(mape.is_finite() && mape >= 0.0, "{predictor}");
    assert_ne!(predictor["model"], "analytic-prior", "{predictor}");
}

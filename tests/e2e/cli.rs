//! `ceccmctl` driven through its binary: exit codes, messages and output, first without a
//! server (usage errors, config contexts, completion, an unreachable server), then against a
//! real `ceccm server` on a free loopback port.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use crate::support::bin;

/// A `ceccmctl` with its own config file and no server settings inherited from the caller.
struct Ctl {
    home: tempfile::TempDir,
}

impl Ctl {
    fn new() -> Ctl {
        Ctl {
            home: tempfile::tempdir().expect("temp dir"),
        }
    }

    fn config_path(&self) -> PathBuf {
        self.home.path().join("ceccm").join("config.yaml")
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(bin("ceccmctl"));
        command
            .args(args)
            .env("CECCM_CONFIG", self.config_path())
            .env_remove("CECCM_SERVER")
            .env_remove("CECCM_TOKEN")
            .env_remove("CECCM_CA_FILE")
            .current_dir(self.home.path())
            .stdin(Stdio::null());
        command
    }

    fn run(&self, args: &[&str]) -> Run {
        Run::from(self.command(args).output().expect("run ceccmctl"))
    }
}

/// What one run printed and how it exited.
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl From<Output> for Run {
    fn from(output: Output) -> Run {
        Run {
            code: output.status.code().expect("exited, not killed"),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }
}

impl Run {
    #[track_caller]
    fn expect(self, code: i32) -> Run {
        assert_eq!(
            self.code, code,
            "exit code\n--- stdout\n{}\n--- stderr\n{}",
            self.stdout, self.stderr
        );
        self
    }
}

/// An address on loopback where nothing listens (bound, then released).
fn closed_address() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let address = listener.local_addr().expect("address");
    drop(listener);
    format!("http://{address}")
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write manifest");
    path.display().to_string()
}

#[test]
fn usage_errors_exit_2_and_send_nothing() {
    let ctl = Ctl::new();
    // Nothing listens there: a usage error must be found before any request is tried.
    let server = closed_address();
    let run = ctl.run(&["get", "pods", "--server", &server]).expect(2);
    assert!(
        run.stderr.contains("unknown kind \"pods\""),
        "{}",
        run.stderr
    );
    ctl.run(&["frobnicate"]).expect(2);
    ctl.run(&["get"]).expect(2);
    ctl.run(&["get", "rg", "-o", "xml"]).expect(2);

    let broken = write(
        ctl.home.path(),
        "broken.yaml",
        "apiVersion: ceccm/v1\nkind: Region\nmetadata:\n  name: a\n---\napiVersion: ceccm/v1\nkind: Region\nmetadata:\n  name: [b\n",
    );
    let run = ctl
        .run(&["apply", "-f", &broken, "--server", &server])
        .expect(2);
    assert!(
        run.stderr.contains(&format!("{broken}:")) && run.stderr.contains("YAML syntax error"),
        "{}",
        run.stderr
    );
    assert!(run.stdout.is_empty(), "{}", run.stdout);

    let pod = write(
        ctl.home.path(),
        "pod.yaml",
        "apiVersion: ceccm/v1\nkind: Pod\nmetadata:\n  name: p\n",
    );
    let run = ctl
        .run(&["apply", "-f", &pod, "--server", &server])
        .expect(2);
    assert!(
        run.stderr.contains("unknown kind \"Pod\""),
        "{}",
        run.stderr
    );
    assert!(run.stderr.contains("nothing was applied"), "{}", run.stderr);

    let missing = ctl.home.path().join("absent.yaml");
    let run = ctl
        .run(&["apply", "-f", &missing.display().to_string()])
        .expect(2);
    assert!(run.stderr.contains("absent.yaml"), "{}", run.stderr);
}

#[test]
fn an_unreachable_server_is_named_with_how_to_set_it() {
    let ctl = Ctl::new();
    let server = closed_address();
    let run = ctl.run(&["get", "regions", "--server", &server]).expect(1);
    assert!(run.stderr.contains(&server), "{}", run.stderr);
    assert!(
        run.stderr.contains("--server") && run.stderr.contains("CECCM_SERVER"),
        "{}",
        run.stderr
    );
    assert!(!run.stderr.contains("panicked"), "{}", run.stderr);
}

#[test]
fn contexts_live_in_the_config_file_and_yield_to_flags_and_env() {
    let ctl = Ctl::new();
    let (from_context, from_env, from_flag) =
        (closed_address(), closed_address(), closed_address());
    ctl.run(&["config", "current-context"]).expect(2);
    let run = ctl
        .run(&[
            "config",
            "set-context",
            "lab",
            "--server",
            &from_context,
            "--token",
            "s3cret",
            "--current",
        ])
        .expect(0);
    assert_eq!(run.stdout, "Context \"lab\" created.\n");
    assert!(ctl.config_path().exists());
    ctl.run(&[
        "config",
        "set-context",
        "other",
        "--server",
        "http://127.0.0.1:1",
    ])
    .expect(0);
    assert_eq!(
        ctl.run(&["config", "current-context"]).expect(0).stdout,
        "lab\n"
    );

    let view = ctl.run(&["config", "view"]).expect(0).stdout;
    assert!(
        view.contains("REDACTED") && !view.contains("s3cret"),
        "{view}"
    );
    let raw = ctl.run(&["config", "view", "--raw"]).expect(0).stdout;
    assert!(raw.contains("s3cret"), "{raw}");

    let contexts = ctl.run(&["config", "get-contexts"]).expect(0).stdout;
    let expected = format!(
        "CURRENT   NAME    SERVER\n*         lab     {from_context}\n          other   http://127.0.0.1:1\n"
    );
    assert_eq!(contexts, expected);

    // The current context decides, $CECCM_SERVER beats it, --server beats both.
    let run = ctl.run(&["get", "rg"]).expect(1);
    assert!(run.stderr.contains(&from_context), "{}", run.stderr);
    let run = Run::from(
        ctl.command(&["get", "rg"])
            .env("CECCM_SERVER", &from_env)
            .output()
            .unwrap(),
    )
    .expect(1);
    assert!(run.stderr.contains(&from_env), "{}", run.stderr);
    let run = Run::from(
        ctl.command(&["get", "rg", "--server", &from_flag])
            .env("CECCM_SERVER", &from_env)
            .output()
            .unwrap(),
    )
    .expect(1);
    assert!(run.stderr.contains(&from_flag), "{}", run.stderr);

    let run = ctl.run(&["config", "use-context", "other"]).expect(0);
    assert_eq!(run.stdout, "Switched to context \"other\".\n");
    ctl.run(&["config", "use-context", "nowhere"]).expect(2);

    // Without CECCM_CONFIG the file lives under $XDG_CONFIG_HOME.
    let xdg = ctl.home.path().join("xdg");
    Run::from(
        ctl.command(&["config", "set-context", "x", "--server", "h:1", "--current"])
            .env_remove("CECCM_CONFIG")
            .env("XDG_CONFIG_HOME", &xdg)
            .output()
            .unwrap(),
    )
    .expect(0);
    let written = std::fs::read_to_string(xdg.join("ceccm/config.yaml")).expect("config file");
    assert!(written.contains("server: h:1"), "{written}");
    let run = ctl.run(&["get", "rg", "--context", "nowhere"]).expect(2);
    assert!(run.stderr.contains("\"nowhere\""), "{}", run.stderr);
}

#[test]
fn completion_scripts_for_each_shell() {
    let ctl = Ctl::new();
    for (shell, marker) in [
        ("bash", "complete -F"),
        ("zsh", "#compdef ceccmctl"),
        ("fish", "complete -c ceccmctl"),
    ] {
        let run = ctl.run(&["completion", shell]).expect(0);
        assert!(run.stdout.contains(marker), "{shell}: {}", run.stdout);
        for subcommand in ["apply", "describe", "download", "top"] {
            assert!(
                run.stdout.contains(subcommand),
                "{shell} lacks {subcommand}"
            );
        }
    }
    ctl.run(&["completion", "powershell-core"]).expect(2);
}

#[test]
fn apply_help_documents_all_or_nothing() {
    let run = Ctl::new().run(&["apply", "--help"]).expect(0);
    assert!(run.stdout.contains("All or nothing"), "{}", run.stdout);
    assert!(run.stdout.contains("--continue-on-error"), "{}", run.stdout);
}

// ---------------------------------------------------------------------------------------------
// Against a real server.

use std::io::{BufRead, BufReader};
use std::sync::mpsc;
use std::time::Duration;

use crate::support::{Server, shared_data, wait_until, workspace_root};

const REGIONS: &str = "\
apiVersion: ceccm/v1
kind: Region
metadata:
  name: edge-caha
  labels: {site: calar-alto}
spec:
  tier: edge
  location: Calar Alto
  driver: agent
  capacity: {cpu: 8, memoryMiB: 16384}
  energy: {idleWatts: 20, wattsPerCore: 6, pue: 1.1}
---
apiVersion: ceccm/v1
kind: Region
metadata:
  name: cloud-a
  labels: {site: madrid}
spec:
  tier: cloud
  location: Madrid
  driver: agent
  capacity: {cpu: 64, memoryMiB: 262144}
  energy: {idleWatts: 200, wattsPerCore: 9, pue: 1.4}
";

const DATASET: &str = "\
apiVersion: ceccm/v1
kind: Dataset
metadata:
  name: cube-a
spec:
  format: fits
  description: a MUSE cube
";

/// A server over a fresh data directory, and a ceccmctl pointed at it by `--server`.
struct Setup {
    ctl: Ctl,
    server: Server,
    _data: tempfile::TempDir,
}

impl Setup {
    fn new() -> Setup {
        let data = tempfile::tempdir().expect("data dir");
        let server = Server::start(data.path(), &[]);
        Setup {
            ctl: Ctl::new(),
            server,
            _data: data,
        }
    }

    fn run(&self, args: &[&str]) -> Run {
        Run::from(self.command(args).output().expect("run ceccmctl"))
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut command = self.ctl.command(args);
        command.args(["--server", &self.server.url]);
        command.env("CECCM_TOKEN", crate::support::ADMIN_TOKEN);
        command
    }

    fn manifest(&self, name: &str, text: &str) -> String {
        write(self.ctl.home.path(), name, text)
    }

    /// Polls until the region reconciler has filled in every region's status.
    fn wait_for_regions_reconciled(&self) {
        wait_until("regions reconciled", Duration::from_secs(30), || {
            let list = self.json(&["get", "regions"]);
            let items = list["items"].as_array()?;
            items
                .iter()
                .all(|r| r.pointer("/status/allocatable").is_some())
                .then_some(())
        });
    }

    fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut all = args.to_vec();
        all.extend(["-o", "json"]);
        serde_json::from_str(&self.run(&all).expect(0).stdout).expect("-o json prints JSON")
    }
}

/// Compares with `tests/e2e/golden/NAME`; `UPDATE_GOLDEN=1` rewrites the file instead.
#[track_caller]
fn golden(name: &str, actual: &str) {
    let path = workspace_root().join("tests/e2e/golden").join(name);
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, actual).unwrap();
        return;
    }
    let expected = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (UPDATE_GOLDEN=1 writes it)", path.display()));
    assert_eq!(
        actual,
        expected,
        "output differs from {} (UPDATE_GOLDEN=1 rewrites it)\n--- actual\n{actual}",
        path.display()
    );
}

/// Replaces the cells of the `varying` columns (times, measured energy) with `<header>`,
/// keeping every other column at its offset, so that goldens check layout but not the clock.
fn normalise(table: &str, varying: &[&str]) -> String {
    let mut lines = table.lines();
    let Some(header) = lines.next() else {
        return String::new();
    };
    let starts: Vec<usize> = header
        .char_indices()
        .filter(|&(i, c)| c != ' ' && (i == 0 || header[..i].ends_with("   ")))
        .map(|(i, _)| i)
        .collect();
    let title = |column: usize| {
        let end = starts.get(column + 1).copied().unwrap_or(header.len());
        header[starts[column]..end].trim_end()
    };
    let replaced: Vec<usize> = (0..starts.len())
        .filter(|&c| varying.contains(&title(c)))
        .collect();
    let mut out = format!("{header}\n");
    for line in lines {
        let mut line = line.to_string();
        for &column in replaced.iter().rev() {
            let start = starts[column].min(line.len());
            let end = starts
                .get(column + 1)
                .copied()
                .unwrap_or(line.len())
                .min(line.len());
            let placeholder = format!("<{}>", title(column).to_lowercase());
            let cell = if column + 1 < starts.len() {
                format!("{placeholder:<width$}", width = end - start)
            } else {
                placeholder
            };
            line.replace_range(start..end, &cell);
        }
        out.push_str(&line);
        out.push('\n');
    }
    out
}

/// `describe` output with the uid, resourceVersion and creation time replaced.
fn normalise_describe(text: &str) -> String {
    text.lines()
        .map(|line| {
            for field in ["UID:", "Resource Version:", "Created:"] {
                if let Some(rest) = line.strip_prefix(field) {
                    let value = rest.trim_start();
                    let at = line.len() - value.len();
                    let name = field.trim_end_matches(':').to_lowercase();
                    return format!("{}<{name}>\n", &line[..at]);
                }
            }
            format!("{line}\n")
        })
        .collect()
}

fn normalise_ages(table: &str) -> String {
    normalise(table, &["AGE", "LAST SEEN"])
}

#[test]
fn apply_twice_is_unchanged_and_keeps_the_resource_version() {
    let s = Setup::new();
    let file = s.manifest("objects.yaml", &format!("{REGIONS}---\n{DATASET}"));
    let run = s.run(&["apply", "-f", &file]).expect(0);
    assert_eq!(
        run.stdout,
        "region/edge-caha created\nregion/cloud-a created\ndataset/cube-a created\n"
    );
    // Region reconcilers write status (and so resourceVersion) on their own; nothing but
    // users writes a dataset without content, so its resourceVersion shows what apply did.
    let dataset = s.json(&["get", "dataset", "cube-a"]);
    let region = s.json(&["get", "region", "edge-caha"]);

    let run = s.run(&["apply", "-f", &file]).expect(0);
    assert_eq!(
        run.stdout,
        "region/edge-caha unchanged\nregion/cloud-a unchanged\ndataset/cube-a unchanged\n"
    );
    let dataset_after = s.json(&["get", "ds/cube-a"]);
    assert_eq!(
        dataset["metadata"]["resourceVersion"], dataset_after["metadata"]["resourceVersion"],
        "a no-op apply must not bump resourceVersion"
    );
    let region_after = s.json(&["get", "rg/edge-caha"]);
    assert_eq!(
        region["metadata"]["generation"],
        region_after["metadata"]["generation"]
    );

    // A directory applies each of its manifests, in name order.
    let dir = s.ctl.home.path().join("manifests");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("1-regions.yaml"), REGIONS).unwrap();
    std::fs::write(dir.join("2-dataset.yml"), DATASET).unwrap();
    std::fs::write(dir.join("README.txt"), "not a manifest").unwrap();
    let run = s
        .run(&["apply", "-f", &dir.display().to_string()])
        .expect(0);
    assert_eq!(
        run.stdout,
        "region/edge-caha unchanged\nregion/cloud-a unchanged\ndataset/cube-a unchanged\n"
    );

    let relabelled = s.manifest(
        "relabel.yaml",
        &REGIONS.replace("site: madrid", "site: getafe"),
    );
    let run = s.run(&["apply", "-f", &relabelled]).expect(0);
    assert_eq!(
        run.stdout,
        "region/edge-caha unchanged\nregion/cloud-a configured\n"
    );
    let cloud = s.json(&["get", "regions", "cloud-a"]);
    assert_eq!(cloud["metadata"]["labels"]["site"], "getafe");

    // JSON from stdin, and the server-side dry run stores nothing.
    let json = r#"{"apiVersion":"ceccm/v1","kind":"Dataset","metadata":{"name":"cube-b"},"spec":{"format":"fits"}}"#;
    let mut child = s
        .command(&["apply", "-f", "-", "--dry-run=server"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), json.as_bytes()).unwrap();
    let run = Run::from(child.wait_with_output().unwrap()).expect(0);
    assert_eq!(run.stdout, "dataset/cube-b created (server dry run)\n");
    let run = s.run(&["get", "ds", "cube-b"]).expect(1);
    assert!(
        run.stderr.starts_with("Error from server (NotFound): "),
        "{}",
        run.stderr
    );
}

#[test]
fn nothing_is_applied_from_a_file_with_an_invalid_later_document() {
    let s = Setup::new();
    let bad = format!(
        "{REGIONS}---\napiVersion: ceccm/v1\nkind: Region\nmetadata:\n  name: hpc-x\nspec:\n  tier: hpc\n  driver: agent\n  capacity: {{cpu: 4}}\n  colour: blue\n"
    );
    let file = s.manifest("bad.yaml", &bad);
    let run = s.run(&["apply", "-f", &file]).expect(1);
    assert!(
        run.stderr.contains("colour"),
        "the unknown field is named: {}",
        run.stderr
    );
    assert!(run.stderr.contains("(document 3)"), "{}", run.stderr);
    assert!(
        run.stderr.ends_with(
            "error: nothing was applied: 1 of 3 document(s) rejected \
             (use --continue-on-error to apply the others)\n"
        ),
        "{}",
        run.stderr
    );
    assert_eq!(run.stdout, "");
    let run = s.run(&["get", "regions"]).expect(0);
    assert_eq!(run.stdout, "");
    assert_eq!(run.stderr, "No resources found.\n");
    let empty = s.json(&["get", "regions"]);
    assert_eq!(empty["kind"], "List");
    assert_eq!(empty["items"], serde_json::json!([]));

    let run = s
        .run(&["apply", "-f", &file, "--continue-on-error"])
        .expect(1);
    assert_eq!(
        run.stdout,
        "region/edge-caha created\nregion/cloud-a created\n"
    );
    assert!(run.stderr.contains("colour"), "{}", run.stderr);
    assert!(
        run.stderr
            .lines()
            .next()
            .unwrap_or_default()
            .starts_with(&format!(
                "Error from server (BadRequest): {file} (document 3) region/hpc-x: "
            )),
        "{}",
        run.stderr
    );
    let names = s.run(&["get", "rg", "-o", "name"]).expect(0).stdout;
    let mut names: Vec<&str> = names.lines().collect();
    names.sort();
    assert_eq!(names, ["region/cloud-a", "region/edge-caha"]);
}

#[test]
fn objects_may_name_regions_created_by_the_same_apply() {
    let s = Setup::new();
    // The dataset comes first in the file and names a region that does not exist yet.
    let text = format!(
        "{DATASET}  region: cloud-a\n---\n{}---\n{REGIONS}",
        "apiVersion: ceccm/v1\nkind: Application\nmetadata:\n  name: pinned\nspec:\n  app: container\n  tasks: [{command: \"true\"}]\n  placement: {regions: [edge-caha]}\n"
    );
    let file = s.manifest("together.yaml", &text);
    let run = s.run(&["apply", "-f", &file, "--dry-run=server"]).expect(0);
    assert!(
        run.stdout
            .contains("dataset/cube-a created (server dry run)"),
        "{}",
        run.stdout
    );
    s.run(&["get", "rg", "edge-caha"]).expect(1);
    let run = s.run(&["apply", "-f", &file]).expect(0);
    assert_eq!(
        run.stdout,
        "region/edge-caha created\nregion/cloud-a created\ndataset/cube-a created\napplication/pinned created\n"
    );
    let dataset = s.json(&["get", "ds", "cube-a"]);
    assert_eq!(dataset["spec"]["region"], "cloud-a");
    // A region that exists nowhere is still the server's to reject, and nothing is stored.
    let typo = s.manifest(
        "typo.yaml",
        &format!("{DATASET}  region: nowhere\n").replace("cube-a", "cube-z"),
    );
    let run = s.run(&["apply", "-f", &typo]).expect(1);
    assert!(run.stderr.contains("nowhere"), "{}", run.stderr);
    s.run(&["get", "ds", "cube-z"]).expect(1);
}

#[test]
fn server_errors_exit_1_with_the_message() {
    let s = Setup::new();
    let run = s.run(&["get", "app", "nope"]).expect(1);
    assert!(
        run.stderr.starts_with("Error from server (NotFound): ") && run.stderr.contains("nope"),
        "{}",
        run.stderr
    );
    assert!(!run.stderr.contains("panicked"), "{}", run.stderr);
    let run = s.run(&["delete", "app", "nope"]).expect(1);
    assert!(run.stderr.contains("NotFound"), "{}", run.stderr);
    s.run(&["delete", "app", "nope", "--ignore-not-found"])
        .expect(0);
    let run = s.run(&["describe", "ds", "nope"]).expect(1);
    assert!(run.stderr.contains("NotFound"), "{}", run.stderr);
}

#[test]
fn tables_match_the_goldens() {
    let s = Setup::new();
    let regions = s.manifest("regions.yaml", REGIONS);
    s.run(&["apply", "-f", &regions]).expect(0);
    let dataset = s.manifest(
        "ds.yaml",
        "apiVersion: ceccm/v1\nkind: Dataset\nmetadata:\n  name: cube-a\nspec:\n  format: fits\n  region: edge-caha\n",
    );
    s.run(&["apply", "-f", &dataset]).expect(0);

    s.wait_for_regions_reconciled();
    let table = s.run(&["get", "regions"]).expect(0).stdout;
    golden("get-regions.txt", &normalise_ages(&table));
    let wide = s
        .run(&["get", "rg", "-o", "wide", "-l", "site=calar-alto"])
        .expect(0)
        .stdout;
    golden("get-regions-wide.txt", &normalise_ages(&wide));
    let top = s.run(&["top", "regions"]).expect(0).stdout;
    golden("top-regions.txt", &top);
    let datasets = s.run(&["get", "ds", "-o", "wide"]).expect(0).stdout;
    golden("get-datasets-wide.txt", &normalise_ages(&datasets));
    let describe = s.run(&["describe", "dataset", "cube-a"]).expect(0).stdout;
    golden("describe-dataset.txt", &normalise_describe(&describe));
}

#[test]
fn get_watch_follows_the_stream() {
    let s = Setup::new();
    let regions = s.manifest("regions.yaml", REGIONS);
    s.run(&["apply", "-f", &regions]).expect(0);
    let mut child = s
        .command(&["get", "rg", "-w"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let (tx, rx) = mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut seen = Vec::new();
    let mut wait_for = |what: &str, prefix: &str| {
        wait_until(what, Duration::from_secs(30), || {
            seen.extend(rx.try_iter());
            seen.iter()
                .position(|l: &String| l.starts_with(prefix))
                .map(|i| seen.remove(i))
        })
    };
    wait_for("the header", "NAME");
    wait_for("the listed region", "edge-caha ");
    let third = s.manifest(
        "hpc.yaml",
        "apiVersion: ceccm/v1\nkind: Region\nmetadata:\n  name: hpc-x\nspec:\n  tier: hpc\n  driver: agent\n  capacity: {cpu: 4}\n",
    );
    s.run(&["apply", "-f", &third]).expect(0);
    let row = wait_for("the added region", "hpc-x ");
    assert!(row.contains(" hpc "), "{row}");
    s.run(&["delete", "rg", "hpc-x", "--wait=false"]).expect(0);
    wait_for("the deleted region", "hpc-x ");
    let _ = child.kill();
    let _ = child.wait();
}

const LOCAL_REGION: &str = "\
apiVersion: ceccm/v1
kind: Region
metadata:
  name: edge-local
spec:
  tier: edge
  driver: local
  capacity: {cpu: 2, memoryMiB: 2048}
  energy: {idleWatts: 10, wattsPerCore: 5}
";

/// A batch application of `tasks` tasks, each echoing `NAME says I`.
fn echo_app(name: &str, tasks: usize) -> String {
    let mut text = format!(
        "apiVersion: ceccm/v1\nkind: Application\nmetadata:\n  name: {name}\nspec:\n  app: container\n  type: batch\n  tasks:\n"
    );
    for i in 0..tasks {
        text.push_str(&format!(
            "    - command: sh\n      args: [\"-c\", \"echo {name} says {i}\"]\n"
        ));
    }
    text
}

impl Setup {
    /// Polls `get KIND NAME -o json` until `/status/phase` is `phase`.
    fn wait_for_phase(&self, kind: &str, name: &str, phase: &str) -> serde_json::Value {
        wait_until(
            &format!("{kind}/{name} to be {phase}"),
            Duration::from_secs(60),
            || {
                let object = self.json(&["get", kind, name]);
                (object.pointer("/status/phase") == Some(&serde_json::json!(phase)))
                    .then_some(object)
            },
        )
    }
}

#[test]
fn an_application_runs_and_its_logs_and_results_come_back() {
    let s = Setup::new();
    let region = s.manifest("region.yaml", LOCAL_REGION);
    s.run(&["apply", "-f", &region]).expect(0);
    let app = s.manifest("app.yaml", &echo_app("hello", 3));
    s.run(&["apply", "-f", &app]).expect(0);
    s.wait_for_phase("app", "hello", "Succeeded");

    let table = s.run(&["get", "apps"]).expect(0).stdout;
    golden(
        "get-applications.txt",
        &normalise(&table, &["AGE", "ENERGY"]),
    );
    let tasks = s.run(&["get", "tasks"]).expect(0).stdout;
    golden("get-tasks.txt", &normalise_ages(&tasks));
    let tasks = s.run(&["get", "tasks", "-o", "name"]).expect(0).stdout;
    assert_eq!(
        tasks,
        "task/hello-00000\ntask/hello-00001\ntask/hello-00002\n"
    );

    let logs = s.run(&["logs", "application/hello"]).expect(0).stdout;
    for i in 0..3 {
        assert!(logs.contains(&format!("hello says {i}\n")), "{logs}");
    }
    let one = s.run(&["logs", "hello", "--task", "1"]).expect(0).stdout;
    assert!(
        one.contains("hello says 1") && !one.contains("hello says 0"),
        "{one}"
    );
    let run = s.run(&["logs", "region/edge-local"]).expect(2);
    assert!(run.stderr.contains("application/NAME"), "{}", run.stderr);

    let to = s.ctl.home.path().join("results");
    let run = s
        .run(&[
            "download",
            "application/hello",
            "--to",
            &to.display().to_string(),
        ])
        .expect(0);
    assert_eq!(
        run.stderr, "",
        "no progress bar when stderr is not a terminal"
    );
    assert!(
        run.stdout.contains("application/hello: 1 file(s)"),
        "{}",
        run.stdout
    );
    let results = std::fs::read_to_string(to.join("results.ndjson")).expect("results file");
    assert!(results.contains("hello says 2"), "{results}");

    let top = s.run(&["top", "apps"]).expect(0).stdout;
    assert!(top.starts_with("NAME    PHASE       PROGRESS   REGIONS      ENERGY\nhello   Succeeded   3/3        edge-local   "), "{top}");
    // Each finished task taught the predictor one sample; 60 are needed before it trains.
    let top = s.run(&["top", "predictor"]).expect(0).stdout;
    golden("top-predictor.txt", &top);

    let describe = s.run(&["describe", "app", "hello"]).expect(0).stdout;
    assert!(
        describe.starts_with("Name:             hello\nKind:             Application\n"),
        "{describe}"
    );
    let conditions = describe
        .split("Conditions:\n")
        .nth(1)
        .expect("a conditions table");
    assert!(conditions.contains("\n  Scheduled   True "), "{describe}");
    let events = describe.split("Events:\n").nth(1).expect("an events table");
    assert!(events.starts_with("  Type     Reason"), "{describe}");
    assert!(events.contains("Normal   Scheduled"), "{describe}");

    let events = s
        .run(&[
            "get",
            "events",
            "--field-selector",
            "involvedObject.kind=Application,involvedObject.name=hello",
        ])
        .expect(0)
        .stdout;
    assert!(
        events.starts_with("LAST SEEN   TYPE     REASON"),
        "{events}"
    );
    assert!(
        events
            .lines()
            .skip(1)
            .all(|l| l.contains("application/hello")),
        "{events}"
    );
}

#[test]
fn delete_waits_for_finalizers_unless_told_not_to() {
    let s = Setup::new();
    let region = s.manifest("region.yaml", LOCAL_REGION);
    s.run(&["apply", "-f", &region]).expect(0);
    let first = s.manifest("first.yaml", &echo_app("first", 2));
    let second = s.manifest("second.yaml", &echo_app("second", 2));
    s.run(&["apply", "-f", &first, "-f", &second]).expect(0);
    s.wait_for_phase("app", "first", "Succeeded");
    let before = s.json(&["get", "app", "first"]);
    assert_eq!(
        before["metadata"]["finalizers"],
        serde_json::json!(["ceccm/release"])
    );

    let run = s
        .run(&["delete", "app", "first", "--timeout", "60s"])
        .expect(0);
    assert_eq!(run.stdout, "application/first deleted\n");
    // Waiting means the object is gone when delete returns, not merely marked.
    s.run(&["get", "app", "first"]).expect(1);

    let run = s.run(&["delete", "-f", &second, "--wait=false"]).expect(0);
    assert!(
        run.stdout == "application/second deletion requested (finalizers pending: ceccm/release)\n"
            || run.stdout == "application/second deleted\n",
        "{}",
        run.stdout
    );
    wait_until("second to be gone", Duration::from_secs(60), || {
        (s.run(&["get", "app", "second"]).code == 1).then_some(())
    });

    let run = s
        .run(&["delete", "rg", "edge-local", "--dry-run=server"])
        .expect(0);
    assert_eq!(run.stdout, "region/edge-local deleted (server dry run)\n");
    s.run(&["get", "rg", "edge-local"]).expect(0);
    let run = s.run(&["delete", "tasks", "x"]).expect(2);
    assert!(run.stderr.contains("read-only"), "{}", run.stderr);
}

#[test]
fn datasets_upload_and_download_byte_for_byte() {
    let s = Setup::new();
    // A real MUSE cube (3.5 MiB): many chunks of the upload stream.
    let file = shared_data().join("cubes/subcub_mosaic.fits");
    let content = std::fs::read(&file).expect("the shared MUSE cube");

    let run = s
        .run(&["upload", "dataset", "cube", &file.display().to_string()])
        .expect(0);
    assert_eq!(
        run.stderr, "",
        "no progress bar when stderr is not a terminal"
    );
    let dataset = s.json(&["get", "ds", "cube"]);
    let sha = dataset["status"]["sha256"]
        .as_str()
        .expect("sha256 in status");
    assert_eq!(
        run.stdout,
        format!("dataset/cube uploaded (3.5MiB, sha256 {sha})\n")
    );
    assert_eq!(dataset["status"]["size"], content.len());
    assert_eq!(dataset["status"]["phase"], "Ready");

    let to = s.ctl.home.path().join("back");
    let run = s
        .run(&["download", "ds/cube", "--to", &to.display().to_string()])
        .expect(0);
    assert!(
        run.stdout
            .contains("dataset/cube: 1 file(s), 3.5MiB written to "),
        "{}",
        run.stdout
    );
    assert_eq!(std::fs::read(to.join("cube")).unwrap(), content);

    let run = s
        .run(&["upload", "app", "cube", &file.display().to_string()])
        .expect(2);
    assert!(run.stderr.contains("only datasets"), "{}", run.stderr);
    let run = s
        .run(&["upload", "dataset", "cube", "/nonexistent/file"])
        .expect(2);
    assert!(run.stderr.contains("/nonexistent/file"), "{}", run.stderr);
    let run = s.run(&["download", "application/none"]).expect(1);
    assert!(run.stderr.contains("NotFound"), "{}", run.stderr);

    // What get -o yaml prints, apply reads back, changing nothing.
    let yaml = s.run(&["get", "ds", "cube", "-o", "yaml"]).expect(0).stdout;
    let again = s.manifest("cube.yaml", &yaml);
    let run = s.run(&["apply", "-f", &again]).expect(0);
    assert_eq!(run.stdout, "dataset/cube unchanged\n");
}

#[test]
fn logs_follow_streams_until_the_application_finishes() {
    let s = Setup::new();
    let app = s.manifest("app.yaml", &echo_app("later", 2));
    // No region yet: the application waits, and so must `logs -f`.
    s.run(&["apply", "-f", &app]).expect(0);
    let child = s
        .command(&["logs", "application/later", "-f"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let region = s.manifest("region.yaml", LOCAL_REGION);
    s.run(&["apply", "-f", &region]).expect(0);
    let run = Run::from(child.wait_with_output().unwrap()).expect(0);
    assert!(
        run.stdout.contains("later says 0") && run.stdout.contains("later says 1"),
        "{}",
        run.stdout
    );
}

#[test]
fn logs_follow_shows_a_running_tasks_lines_as_they_come_and_each_once() {
    let s = Setup::new();
    let region = s.manifest("region.yaml", LOCAL_REGION);
    s.run(&["apply", "-f", &region]).expect(0);
    let app = s.manifest(
        "app.yaml",
        &script_app("live", "echo first; sleep 6; echo second >&2", 1),
    );
    s.run(&["apply", "-f", &app]).expect(0);
    let mut child = s
        .command(&["logs", "live", "-f"])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let lines = crate::support::lines_of(child.stdout.take().unwrap());
    let (line, _) =
        crate::support::wait_for_line(&lines, Duration::from_secs(30), |l| l.contains("first"));
    assert_eq!(line, "[live-00000] first");
    // The task sleeps for seconds after that line: it reached us while it ran.
    let task = s.json(&["get", "task", "live-00000"]);
    assert_ne!(task["status"]["state"], "Done", "{task}");

    let (line, before) =
        crate::support::wait_for_line(&lines, Duration::from_secs(30), |l| l.contains("second"));
    assert_eq!(line, "[live-00000] second");
    assert!(before.is_empty(), "{before:?}");
    let (header, before) =
        crate::support::wait_for_line(&lines, Duration::from_secs(30), |l| l.starts_with("==>"));
    assert!(header.starts_with("==> live-00000 [Done]"), "{header}");
    assert!(before.is_empty(), "{before:?}");
    // The stream ends with the application, and nothing came twice.
    let rest: Vec<String> = lines.iter().collect();
    assert!(rest.is_empty(), "{rest:?}");
    assert!(child.wait().unwrap().success());

    // Afterwards the logs are the result's: the whole output once, under its header.
    let logs = s.run(&["logs", "live"]).expect(0).stdout;
    assert_eq!(logs.matches("first").count(), 1, "{logs}");
    assert!(logs.contains("first\nsecond\n"), "{logs}");
}

#[test]
fn a_task_past_its_deadline_is_stopped_and_describe_says_deadline_exceeded() {
    let s = Setup::new();
    let region = s.manifest("region.yaml", LOCAL_REGION);
    s.run(&["apply", "-f", &region]).expect(0);
    // The shell waits on its child: both must go.
    let app = script_app("late", "echo started; sleep 607", 2) + "  taskDeadlineSeconds: 1\n";
    let app = s.manifest("app.yaml", &app);
    s.run(&["apply", "-f", &app]).expect(0);
    // Two attempts, each stopped after a second: long before the 607 s it would sleep.
    let task = wait_until("the task dead-lettered", Duration::from_secs(60), || {
        let run = s.run(&["get", "task", "late-00000", "-o", "json"]);
        let task: serde_json::Value = serde_json::from_str(&run.stdout).ok()?;
        (task["status"]["state"] == "DeadLettered").then_some(task)
    });
    assert_eq!(task["status"]["reason"], "DeadlineExceeded", "{task}");
    assert_eq!(task["status"]["attempts"], 2, "{task}");
    let described = s.run(&["describe", "task/late-00000"]).expect(0).stdout;
    assert!(described.contains("DeadlineExceeded"), "{described}");
    // Nothing of it is left running on the host.
    let left: Vec<String> = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|p| std::fs::read(p.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.contains("sleep 607"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

/// A batch application of one task running `script` under `sh -c`, tried at most `attempts`
/// times.
fn script_app(name: &str, script: &str, attempts: u32) -> String {
    format!(
        "apiVersion: ceccm/v1\nkind: Application\nmetadata:\n  name: {name}\nspec:\n  app: container\n  type: batch\n  maxAttempts: {attempts}\n  tasks:\n    - command: sh\n      args: [\"-c\", \"{script}\"]\n"
    )
}

#[test]
fn results_list_the_files_and_describe_shows_what_the_tasks_measured() {
    let s = Setup::new();
    let region = s.manifest("region.yaml", LOCAL_REGION);
    s.run(&["apply", "-f", &region]).expect(0);
    let app = s.manifest("app.yaml", &echo_app("hello", 3));
    s.run(&["apply", "-f", &app]).expect(0);
    s.wait_for_phase("app", "hello", "Succeeded");

    let index = s.json(&["results", "app/hello"]);
    let files = index["files"].as_array().expect("a files list");
    assert_eq!(files.len(), 1, "{index}");
    assert_eq!(files[0]["name"], "results.ndjson");
    let sha = files[0]["sha256"].as_str().expect("a sha256");
    let size = files[0]["size"].as_u64().expect("a size");
    assert!(size < 1024, "three short lines: {size}");
    let table = s.run(&["results", "application", "hello"]).expect(0).stdout;
    assert_eq!(
        table,
        format!(
            "NAME             SIZE   SHA256\nresults.ndjson   {:<4}   {sha}\n",
            format!("{size}B")
        )
    );
    for spelling in [
        &["results", "apps", "hello", "-o", "name"][..],
        &["results", "hello", "-o", "name"],
    ] {
        assert_eq!(
            s.run(spelling).expect(0).stdout,
            "results.ndjson\n",
            "{spelling:?}"
        );
    }
    let yaml = s
        .run(&["results", "app/hello", "-o", "yaml"])
        .expect(0)
        .stdout;
    assert!(yaml.contains(&format!("sha256: {sha}")), "{yaml}");
    let run = s.run(&["results", "rg/edge-local"]).expect(2);
    assert!(
        run.stderr.contains("only applications have results"),
        "{}",
        run.stderr
    );
    let run = s.run(&["results", "app/nope"]).expect(1);
    assert!(
        run.stderr.starts_with("Error from server (NotFound): "),
        "{}",
        run.stderr
    );

    let describe = s.run(&["describe", "app", "hello"]).expect(0).stdout;
    assert!(
        describe.contains("\nProgress:         3/3 tasks done\n"),
        "{describe}"
    );
    assert!(
        describe.contains("\nPlacements:\n  Region       Tasks   Predicted Time"),
        "{describe}"
    );
    let measured = describe
        .split("\nMeasured:\n")
        .nth(1)
        .expect("a measured table");
    assert!(
        measured.starts_with("  Region       Tasks   CPU Time   Energy\n"),
        "{describe}"
    );
    assert!(measured.contains("\n  edge-local   3       "), "{describe}");
    let results = describe
        .split("\nResults:\n")
        .nth(1)
        .expect("a results table");
    assert!(
        results.starts_with(&format!(
            "  Name             Size\n  ----             ----\n  results.ndjson   {size}B\n"
        )),
        "{describe}"
    );

    // An application deleted and created again under its name starts a history of its own.
    let scheduled = |describe: &str| {
        let events = describe.split("\nEvents:\n").nth(1).unwrap_or_default();
        events.lines().filter(|l| l.contains(" Scheduled ")).count()
    };
    assert_eq!(scheduled(&describe), 1, "{describe}");
    s.run(&["delete", "app", "hello", "--timeout", "60s"])
        .expect(0);
    s.run(&["apply", "-f", &app]).expect(0);
    s.wait_for_phase("app", "hello", "Succeeded");
    let describe = s.run(&["describe", "app/hello"]).expect(0).stdout;
    assert_eq!(scheduled(&describe), 1, "{describe}");
}

impl Setup {
    /// A server started with `args` besides the usual ones.
    fn with_server_args(args: &[&str]) -> Setup {
        let data = tempfile::tempdir().expect("data dir");
        Setup {
            server: Server::start(data.path(), args),
            ctl: Ctl::new(),
            _data: data,
        }
    }
}

/// Follows `ceccmctl ARGS` in the background, its stdout lines sent as they come.
fn follow(command: &mut Command) -> (std::process::Child, mpsc::Receiver<String>) {
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn ceccmctl");
    let (tx, rx) = mpsc::channel();
    let stdout = child.stdout.take().expect("piped stdout");
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    (child, rx)
}

#[test]
fn get_watch_prints_a_row_only_when_it_changed() {
    // Short leases: the worker heartbeats its task every second, a write to the task that its
    // row does not show.
    let s = Setup::with_server_args(&["--lease-seconds", "3"]);
    let region = s.manifest("region.yaml", LOCAL_REGION);
    s.run(&["apply", "-f", &region]).expect(0);
    let (mut rows_child, rows) = follow(&mut s.command(&["get", "tasks", "-w"]));
    let (mut json_child, json) = follow(&mut s.command(&["get", "tasks", "-w", "-o", "json"]));
    let app = s.manifest("app.yaml", &script_app("slow", "sleep 4", 1));
    s.run(&["apply", "-f", &app]).expect(0);
    let mut printed: Vec<String> = Vec::new();
    wait_until("the Done row", Duration::from_secs(60), || {
        printed.extend(rows.try_iter());
        printed.iter().any(|r| r.contains(" Done ")).then_some(())
    });
    // Every write to the task, heartbeats included, is one object on the JSON watch.
    let mut versions = 0;
    wait_until("the Done object", Duration::from_secs(30), || {
        for line in json.try_iter() {
            versions += usize::from(line.trim_start().starts_with("\"resourceVersion\""));
            if line.contains("\"state\": \"Done\"") {
                return Some(());
            }
        }
        None
    });
    for child in [&mut rows_child, &mut json_child] {
        let _ = child.kill();
        let _ = child.wait();
    }
    // The row without its AGE: what must differ from the row printed before.
    let cells = |row: &str| {
        let mut cells: Vec<String> = row.split_whitespace().map(str::to_string).collect();
        cells.pop();
        cells
    };
    let task_rows: Vec<Vec<String>> = printed
        .iter()
        .filter(|r| r.starts_with("slow-00000 "))
        .map(|r| cells(r))
        .collect();
    for pair in task_rows.windows(2) {
        assert_ne!(pair[0], pair[1], "a row printed twice:\n{printed:#?}");
    }
    // ... though the task was written more often than that: the heartbeats were left out.
    assert!(
        versions > task_rows.len(),
        "the worker heartbeated ({versions} versions, {} rows):\n{printed:#?}",
        task_rows.len()
    );
}

#[test]
fn cancel_and_retry_an_application() {
    // Short leases: a cancelled task's worker hears of it at its next heartbeat, within a
    // second, and frees its slot for the next application.
    let s = Setup::with_server_args(&["--lease-seconds", "3"]);
    let region = s.manifest("region.yaml", LOCAL_REGION);
    s.run(&["apply", "-f", &region]).expect(0);

    // Fails on its first run, succeeds on the next: only a retry gets it there.
    let marker = s.ctl.home.path().join("ran-once");
    let script = format!(
        "if [ -e {0} ]; then echo second run; else touch {0}; exit 3; fi",
        marker.display()
    );
    let failing = s.manifest("failing.yaml", &script_app("failing", &script, 1));
    s.run(&["apply", "-f", &failing]).expect(0);
    s.wait_for_phase("app", "failing", "Failed");
    let run = s.run(&["retry", "apps", "failing"]).expect(0);
    assert_eq!(run.stdout, "application/failing retried\n");
    s.wait_for_phase("app", "failing", "Succeeded");
    let run = s.run(&["retry", "app/failing"]).expect(1);
    assert!(
        run.stderr.starts_with("Error from server (Conflict): "),
        "{}",
        run.stderr
    );

    let slow = s.manifest("slow.yaml", &script_app("slow", "sleep 30", 1));
    s.run(&["apply", "-f", &slow]).expect(0);
    s.wait_for_phase("app", "slow", "Running");
    let run = s.run(&["cancel", "app/slow"]).expect(0);
    assert_eq!(run.stdout, "application/slow cancelled\n");
    s.wait_for_phase("app", "slow", "Cancelled");
    let run = s.run(&["cancel", "application", "slow"]).expect(1);
    assert!(
        run.stderr.starts_with("Error from server (Conflict): "),
        "{}",
        run.stderr
    );

    // Several at once: each refusal is reported, and the command fails at the end.
    let run = s.run(&["cancel", "app/nope", "app/slow"]).expect(1);
    assert_eq!(run.stdout, "");
    assert!(
        run.stderr.contains("NotFound") && run.stderr.contains("Conflict"),
        "{}",
        run.stderr
    );
    let run = s.run(&["cancel", "rg/edge-local"]).expect(2);
    assert!(
        run.stderr.contains("only applications can be cancelled"),
        "{}",
        run.stderr
    );
    s.run(&["retry"]).expect(2);
}

/// A server on a fresh data directory makes its administrator token (0600); ceccmctl without a
/// token is refused; the administrator makes a viewer token that reads but cannot write, and
/// revokes it.
#[test]
fn tokens_are_made_used_and_revoked_through_ceccmctl() {
    use std::os::unix::fs::PermissionsExt;
    let data = tempfile::tempdir().expect("data dir");
    let server = Server::start_unprovisioned(data.path(), &[]);
    let token_file = data.path().join("admin.token");
    let mode = std::fs::metadata(&token_file).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "admin.token is private");
    let admin = std::fs::read_to_string(&token_file)
        .unwrap()
        .trim()
        .to_string();
    let ctl = Ctl::new();
    let run_as = |token: Option<&str>, args: &[&str]| {
        let mut command = ctl.command(args);
        command.args(["--server", &server.url]);
        if let Some(token) = token {
            command.env("CECCM_TOKEN", token);
        }
        Run::from(command.output().expect("run ceccmctl"))
    };
    let anonymous = run_as(None, &["get", "regions"]);
    assert_ne!(anonymous.code, 0);
    assert!(
        anonymous.stderr.contains("authentication required"),
        "{}",
        anonymous.stderr
    );

    let made = run_as(
        Some(&admin),
        &["create", "token", "ana", "--role", "viewer", "--ttl", "1h"],
    )
    .expect(0);
    let viewer = made.stdout.trim().to_string();
    assert!(viewer.starts_with("ceccm_"), "{}", made.stdout);
    assert!(made.stderr.contains("role viewer"), "{}", made.stderr);
    run_as(Some(&viewer), &["get", "regions"]).expect(0);
    let manifest = write(ctl.home.path(), "regions.yaml", REGIONS);
    let refused = run_as(Some(&viewer), &["apply", "-f", &manifest]);
    assert_ne!(refused.code, 0);
    assert!(refused.stderr.contains("may not"), "{}", refused.stderr);
    let refused = run_as(
        Some(&viewer),
        &["create", "token", "eve", "--role", "admin"],
    );
    assert_ne!(refused.code, 0);

    // The refusals are in the audit log, with the user who was refused.
    let audit = run_as(Some(&admin), &["get", "audit"]).expect(0);
    assert!(
        audit
            .stdout
            .lines()
            .any(|l| l.contains("ana") && l.contains("403")),
        "{}",
        audit.stdout
    );
    run_as(Some(&viewer), &["get", "audit"]).expect(1);
    let listed = run_as(Some(&admin), &["get", "tokens"]).expect(0);
    assert!(
        listed.stdout.contains("ana") && listed.stdout.contains("viewer"),
        "{}",
        listed.stdout
    );
    assert!(
        !listed.stdout.contains(&viewer[23..]),
        "no secret is listed"
    );
    let id = listed
        .stdout
        .lines()
        .find(|l| l.contains("ana"))
        .and_then(|l| l.split_whitespace().next())
        .unwrap()
        .to_string();
    run_as(Some(&admin), &["delete", "token", &id]).expect(0);
    let revoked = run_as(Some(&viewer), &["get", "regions"]);
    assert_ne!(revoked.code, 0);
    assert!(revoked.stderr.contains("not valid"), "{}", revoked.stderr);
}

/// A server with `--tls-self-signed`: ceccmctl trusting its CA (by flag, environment or context)
/// reads and applies, and the local driver's workers run an application to completion over
/// https; without the CA, or with another server's, ceccmctl refuses naming certificate
/// verification; plain http to the https port gets nothing.
#[test]
fn ceccmctl_and_workers_speak_tls_to_a_self_signed_server() {
    use std::os::unix::fs::PermissionsExt;
    let s = Setup::with_server_args(&["--tls-self-signed", "--tls-san", "ceccm.example.org"]);
    assert!(s.server.url.starts_with("https://"), "{}", s.server.url);
    let ca = s.server.data_dir.join("tls").join("ca.crt");
    let ca_key = s.server.data_dir.join("tls").join("ca.key");
    let mode = std::fs::metadata(&ca_key).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "the CA's key is private");
    let ca = ca.display().to_string();

    // Nothing trusted but the built-in roots: refused before any request is sent.
    let refused = s.run(&["get", "regions"]).expect(1);
    assert!(
        refused
            .stderr
            .contains("TLS certificate verification failed")
            && refused.stderr.contains("--ca-file"),
        "{}",
        refused.stderr
    );
    // Another server's CA is refused the same way.
    let other_data = tempfile::tempdir().expect("data dir");
    let other = Server::start(other_data.path(), &["--tls-self-signed"]);
    let other_ca = other.data_dir.join("tls").join("ca.crt");
    let wrong = s
        .run(&[
            "get",
            "regions",
            "--ca-file",
            &other_ca.display().to_string(),
        ])
        .expect(1);
    assert!(
        wrong.stderr.contains("TLS certificate verification failed"),
        "{}",
        wrong.stderr
    );
    drop(other);
    // Plain http to the https port gets no answer.
    let plain = s.server.url.replacen("https://", "http://", 1);
    let mut command = s.ctl.command(&["get", "regions", "--server", &plain]);
    command.env("CECCM_TOKEN", crate::support::ADMIN_TOKEN);
    let plain = Run::from(command.output().expect("run ceccmctl"));
    assert_eq!(plain.code, 1, "{}", plain.stderr);
    assert!(plain.stdout.is_empty(), "{}", plain.stdout);

    // The right CA: by flag, by environment, by context.
    s.run(&["get", "regions", "--ca-file", &ca]).expect(0);
    let mut command = s.command(&["get", "regions"]);
    command.env("CECCM_CA_FILE", &ca);
    Run::from(command.output().expect("run ceccmctl")).expect(0);
    s.ctl
        .run(&[
            "config",
            "set-context",
            "tls",
            "--server",
            &s.server.url,
            "--certificate-authority",
            &ca,
            "--current",
        ])
        .expect(0);
    let mut command = s.ctl.command(&["get", "regions"]);
    command.env("CECCM_TOKEN", crate::support::ADMIN_TOKEN);
    Run::from(command.output().expect("run ceccmctl")).expect(0);
    // Skipping verification works too, and says so.
    let insecure = s
        .run(&["get", "regions", "--insecure-skip-tls-verify"])
        .expect(0);
    assert!(
        insecure.stderr.contains("not verified"),
        "{}",
        insecure.stderr
    );

    // Workers lease, report and finish over https, trusting the CA the server hands them.
    let region = s.manifest("region.yaml", LOCAL_REGION);
    s.run(&["apply", "-f", &region, "--ca-file", &ca]).expect(0);
    let app = s.manifest("app.yaml", &echo_app("secure", 2));
    s.run(&["apply", "-f", &app, "--ca-file", &ca]).expect(0);
    wait_until(
        "app/secure to succeed over TLS",
        Duration::from_secs(60),
        || {
            let run = s.run(&["get", "app", "secure", "-o", "json", "--ca-file", &ca]);
            let object: serde_json::Value = serde_json::from_str(&run.stdout).ok()?;
            (object.pointer("/status/phase") == Some(&serde_json::json!("Succeeded"))).then_some(())
        },
    );
    let logs = s.run(&["logs", "secure", "--ca-file", &ca]).expect(0);
    assert!(logs.stdout.contains("secure says 1"), "{}", logs.stdout);

    // An agent pinning another CA cannot join; pinning the server's, it joins over https and
    // its workers run the work placed on its region.
    let join = std::fs::read_to_string(s.server.data_dir.join("join.token")).unwrap();
    let agent_dir = tempfile::tempdir().unwrap();
    let agent = |ca_file: &str| {
        let mut command = Command::new(bin("ceccm"));
        command
            .args(["agent", "--server", &s.server.url, "--region", "tls-site"])
            .args([
                "--cpu",
                "1",
                "--heartbeat-seconds",
                "0.5",
                "--ca-file",
                ca_file,
            ])
            .arg("--data-dir")
            .arg(agent_dir.path())
            .env("CECCM_JOIN_TOKEN", join.trim())
            .stdin(Stdio::null());
        command
    };
    let refused = agent(&other_ca.display().to_string()).output().unwrap();
    assert!(!refused.status.success());
    assert!(!agent_dir.path().join("agent.token").exists());
    let mut joined = agent(&ca).stdout(Stdio::null()).spawn().unwrap();
    let phase_over_tls = |kind: &str, name: &str, phase: &str| {
        wait_until(
            &format!("{kind}/{name} {phase}"),
            Duration::from_secs(60),
            || {
                let run = s.run(&["get", kind, name, "-o", "json", "--ca-file", &ca]);
                let object: serde_json::Value = serde_json::from_str(&run.stdout).ok()?;
                (object.pointer("/status/phase") == Some(&serde_json::json!(phase))).then_some(())
            },
        )
    };
    phase_over_tls("region", "tls-site", "Ready");
    let pinned = echo_app("at-the-edge", 2).replace(
        "  type: batch\n",
        "  type: batch\n  placement: {regions: [tls-site]}\n",
    );
    let pinned = s.manifest("pinned.yaml", &pinned);
    s.run(&["apply", "-f", &pinned, "--ca-file", &ca]).expect(0);
    phase_over_tls("application", "at-the-edge", "Succeeded");
    let _ = joined.kill();
    let _ = joined.wait();
}

/// A CA made by the test (rcgen), and certificates it issues.
struct TestCa {
    pem: String,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

impl TestCa {
    fn new(name: &str) -> TestCa {
        let params = || {
            let mut params = rcgen::CertificateParams::default();
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, name);
            params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            params.key_usages = vec![
                rcgen::KeyUsagePurpose::KeyCertSign,
                rcgen::KeyUsagePurpose::DigitalSignature,
            ];
            params
        };
        let key = rcgen::KeyPair::generate().unwrap();
        let pem = params().self_signed(&key).unwrap().pem();
        TestCa {
            pem,
            issuer: rcgen::Issuer::new(params(), key),
        }
    }

    /// A certificate and its key (PEM): a client's with CN and O values, or a server's for
    /// loopback when `organizations` is empty.
    fn issue(&self, cn: &str, organizations: &[&str]) -> (String, String) {
        let server = organizations.is_empty();
        let names = if server {
            vec!["127.0.0.1".to_string(), "localhost".to_string()]
        } else {
            Vec::new()
        };
        let mut params = rcgen::CertificateParams::new(names).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        for o in organizations {
            params
                .distinguished_name
                .push(rcgen::DnType::OrganizationName, *o);
        }
        params.extended_key_usages = vec![if server {
            rcgen::ExtendedKeyUsagePurpose::ServerAuth
        } else {
            rcgen::ExtendedKeyUsagePurpose::ClientAuth
        }];
        params.use_authority_key_identifier_extension = true;
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

/// A server with `--tls-client-ca`: ceccmctl presenting a certificate that CA signed acts,
/// without a token, as the certificate's CN with the role of its O; without a certificate or
/// a token it is refused. Then the server's certificate files are replaced under it, and new
/// connections get the new certificate without a restart.
#[test]
fn ceccmctl_authenticates_with_a_client_certificate_and_the_server_reloads_its_certificate() {
    let certs = tempfile::tempdir().expect("dir");
    let clients = TestCa::new("site clients");
    let client_ca = write(certs.path(), "clients.crt", &clients.pem);
    let (cert, key) = clients.issue("ana", &["astro", "user"]);
    let ana_cert = write(certs.path(), "ana.crt", &cert);
    let ana_key = write(certs.path(), "ana.key", &key);
    let s = Setup::with_server_args(&["--tls-self-signed", "--tls-client-ca", &client_ca]);
    let server_ca = s.server.data_dir.join("tls").join("ca.crt");
    let server_ca = server_ca.display().to_string();
    let as_ana = |ca: &str, args: &[&str]| {
        let mut command = s.ctl.command(args);
        command.args(["--server", &s.server.url, "--ca-file", ca]);
        command.args(["--client-certificate", &ana_cert, "--client-key", &ana_key]);
        Run::from(command.output().expect("run ceccmctl"))
    };

    let dataset = s.manifest("dataset.yaml", DATASET);
    as_ana(&server_ca, &["apply", "-f", &dataset]).expect(0);
    let shown = as_ana(&server_ca, &["get", "ds", "cube-a", "-o", "json"]).expect(0);
    let shown: serde_json::Value = serde_json::from_str(&shown.stdout).unwrap();
    assert_eq!(shown["metadata"]["owner"], "ana", "{shown}");
    // Neither certificate nor token.
    let mut command = s.ctl.command(&["get", "ds"]);
    command.args(["--server", &s.server.url, "--ca-file", &server_ca]);
    let anonymous = Run::from(command.output().expect("run ceccmctl"));
    assert_ne!(anonymous.code, 0);
    assert!(
        anonymous.stderr.contains("authentication required"),
        "{}",
        anonymous.stderr
    );
    // The same from a context that holds the certificate.
    s.ctl
        .run(&[
            "config",
            "set-context",
            "mtls",
            "--server",
            &s.server.url,
            "--ca-file",
            &server_ca,
            "--client-certificate",
            &ana_cert,
            "--client-key",
            &ana_key,
            "--current",
        ])
        .expect(0);
    let listed = s.ctl.run(&["get", "ds", "-o", "name"]).expect(0);
    assert!(listed.stdout.contains("cube-a"), "{}", listed.stdout);
    // O=user: no regions.
    let region = s.manifest("region.yaml", LOCAL_REGION);
    let refused = as_ana(&server_ca, &["apply", "-f", &region]);
    assert_ne!(refused.code, 0);
    assert!(refused.stderr.contains("may not"), "{}", refused.stderr);

    // The server's certificate is replaced (key first, then certificate) by one from another
    // CA; new connections get it, with no restart.
    let rotated = TestCa::new("rotated server CA");
    let rotated_ca = write(certs.path(), "rotated.crt", &rotated.pem);
    let (cert, key) = rotated.issue("ceccm server", &[]);
    let tls = s.server.data_dir.join("tls");
    std::fs::write(tls.join("server.key"), key).unwrap();
    std::fs::write(tls.join("server.crt"), cert).unwrap();
    wait_until(
        "the new server certificate to be served",
        Duration::from_secs(30),
        || (as_ana(&rotated_ca, &["get", "ds"]).code == 0).then_some(()),
    );
    let stale = as_ana(&server_ca, &["get", "ds"]);
    assert_ne!(stale.code, 0);
    assert!(
        stale.stderr.contains("TLS certificate verification failed"),
        "{}",
        stale.stderr
    );
}

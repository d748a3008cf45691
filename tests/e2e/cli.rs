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

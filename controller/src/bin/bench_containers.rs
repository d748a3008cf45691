//! `ceccm-bench-containers`: what running a task in a runc container costs over running it as
//! a process. The same no-op task (`ceccm probe alloc 0`) runs `--tasks` times each way,
//! alternating: as a child process of this program, and in a container made from the
//! astro-fit image (built into a temporary image store from `--ceccm`) with the oci runtime's
//! own code (`worker::oci::run`: spec, `runc create`, `start`, wait, `delete`). Reports medians
//! and their difference, the container start overhead per task. Needs root and runc.
//!
//! ```sh
//! cargo build --release --bin ceccm --bin ceccm-bench-containers
//! sudo target/release/ceccm-bench-containers --ceccm target/release/ceccm --tasks 50
//! ```

use std::path::PathBuf;
use std::process::{Command, ExitCode, Stdio};
use std::time::Instant;

use anyhow::bail;
use ceccm_controller::image::{ASTRO_FIT_IMAGE, CECCM_IN_IMAGE, ImageStore};
use ceccm_controller::worker::oci::{self, ContainerEnd, ContainerRun};
use clap::Parser;

#[derive(Parser)]
#[command(about = "container start overhead per task: runc against a plain process")]
struct Args {
    /// The ceccm binary the image is built from (and the process runs).
    #[arg(long)]
    ceccm: PathBuf,
    #[arg(long, default_value_t = 50)]
    tasks: usize,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn run(args: Args) -> anyhow::Result<()> {
    if !oci::available() {
        bail!("needs root and runc");
    }
    let dir = tempfile::tempdir()?;
    let store = ImageStore::new(dir.path().join("images"));
    let built = Instant::now();
    let image = store.build_astro_fit(&args.ceccm, "bench")?;
    let rootfs = store.rootfs(ASTRO_FIT_IMAGE)?;
    eprintln!(
        "image {} built and unpacked in {:.2} s",
        image.digest,
        built.elapsed().as_secs_f64()
    );
    let (mut process, mut container) = (Vec::new(), Vec::new());
    for i in 0..args.tasks {
        let t = Instant::now();
        let status = Command::new(&args.ceccm)
            .args(["probe", "alloc", "0"])
            .stdout(Stdio::null())
            .status()?;
        if !status.success() {
            bail!("the process failed: {status}");
        }
        process.push(t.elapsed().as_secs_f64());
        let t = Instant::now();
        let end = oci::run(
            &ContainerRun {
                id: format!("bench-{}-{i}", std::process::id()),
                rootfs: rootfs.clone(),
                args: vec![
                    CECCM_IN_IMAGE.into(),
                    "probe".into(),
                    "alloc".into(),
                    "0".into(),
                ],
                env: vec!["PATH=/usr/local/bin".into()],
                binds: Vec::new(),
                memory_limit_bytes: Some(256 << 20),
                cpus: Some(1.0),
                stdout: dir.path().join("stdout"),
                stderr: dir.path().join("stderr"),
                deadline: None,
            },
            dir.path(),
        )?;
        if end != ContainerEnd::Exited(0) {
            bail!("the container ended {end:?}");
        }
        container.push(t.elapsed().as_secs_f64());
    }
    let (p, c) = (median(process), median(container));
    println!("tasks each way: {}", args.tasks);
    println!("process:   median {:.1} ms per task", p * 1e3);
    println!("container: median {:.1} ms per task", c * 1e3);
    println!(
        "container start overhead: {:.1} ms per task ({:.1}x the process)",
        (c - p) * 1e3,
        c / p
    );
    Ok(())
}

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ceccm-bench-containers: {e:#}");
            ExitCode::FAILURE
        }
    }
}

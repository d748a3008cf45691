//! The `local` driver: a region's workers are `ceccm worker` processes on this host, children of
//! the server, at most `capacity.cpu` of them at once.
//!
//! Each worker runs in its own process group so that releasing a region also stops the task
//! command a worker is running. Workers leave by themselves when idle, so the driver only ever
//! starts processes; it stops them on release.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;

use crate::driver::{DriverError, RegionDriver, RegionObservation};
use crate::region::{DriverKind, RegionSpec, Runtime};

/// How to start one worker: `program args... --region NAME`.
#[derive(Debug, Clone)]
pub struct WorkerCommand {
    pub program: PathBuf,
    pub args: Vec<String>,
    /// Environment of each worker (credentials go here, not in the arguments `ps` shows).
    pub env: Vec<(String, String)>,
}

#[derive(Default)]
struct Pool {
    workers: Vec<Worker>,
    /// CPU seconds of workers that have exited (their last reading).
    retired_cpu_seconds: f64,
}

struct Worker {
    child: Child,
    last_cpu_seconds: f64,
}

pub struct LocalDriver {
    command: WorkerCommand,
    pools: Mutex<HashMap<String, Pool>>,
    /// What this host can give a region: a region never gets more workers than cores, whatever
    /// its declared `capacity.cpu` (a region of 4096 "cores" must not start 4096 processes).
    host_cores: u32,
}

impl LocalDriver {
    pub fn new(command: WorkerCommand) -> Self {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        LocalDriver::with_host_cores(command, u32::try_from(cores).unwrap_or(u32::MAX))
    }

    /// A driver that gives each region at most `host_cores` workers.
    pub fn with_host_cores(command: WorkerCommand, host_cores: u32) -> Self {
        LocalDriver {
            command,
            pools: Mutex::new(HashMap::new()),
            host_cores: host_cores.max(1),
        }
    }

    fn spawn(&self, region: &str, runtime: Runtime) -> Result<Child, DriverError> {
        use std::os::unix::process::CommandExt;
        Command::new(&self.command.program)
            .args(&self.command.args)
            .args(["--region", region])
            .args(["--runtime", runtime.as_str()])
            .envs(self.command.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .process_group(0)
            .spawn()
            .map_err(|source| DriverError::Spawn {
                region: region.to_string(),
                source,
            })
    }

    /// Process ids of the region's live workers (for operators and tests).
    pub fn worker_pids(&self, region: &str) -> Vec<u32> {
        let pools = self.pools.lock().unwrap_or_else(|e| e.into_inner());
        pools
            .get(region)
            .map(|p| p.workers.iter().map(|w| w.child.id()).collect())
            .unwrap_or_default()
    }
}

impl RegionDriver for LocalDriver {
    fn ensure(
        &self,
        region: &str,
        spec: &RegionSpec,
        wanted_workers: u32,
    ) -> Result<RegionObservation, DriverError> {
        if spec.driver != DriverKind::Local {
            return Err(DriverError::Unsupported(
                format!("{:?}", spec.driver).to_lowercase(),
            ));
        }
        let mut pools = self.pools.lock().unwrap_or_else(|e| e.into_inner());
        let pool = pools.entry(region.to_string()).or_default();
        let mut alive = Vec::with_capacity(pool.workers.len());
        for mut worker in pool.workers.drain(..) {
            match worker.child.try_wait() {
                Ok(None) => {
                    if let Some(cpu) = process_cpu_seconds(worker.child.id()) {
                        worker.last_cpu_seconds = cpu;
                    }
                    alive.push(worker);
                }
                Ok(Some(_)) | Err(_) => pool.retired_cpu_seconds += worker.last_cpu_seconds,
            }
        }
        pool.workers = alive;
        let wanted = wanted_workers.min(spec.capacity.cpu).min(self.host_cores) as usize;
        let mut message = String::new();
        while pool.workers.len() < wanted {
            match self.spawn(region, spec.runtime) {
                Ok(child) => pool.workers.push(Worker {
                    child,
                    last_cpu_seconds: 0.0,
                }),
                Err(e) => {
                    message = e.to_string();
                    break;
                }
            }
        }
        let live_cpu: f64 = pool.workers.iter().map(|w| w.last_cpu_seconds).sum();
        Ok(RegionObservation {
            healthy: message.is_empty(),
            message,
            workers: pool.workers.len() as u32,
            cpu_seconds: pool.retired_cpu_seconds + live_cpu,
        })
    }

    fn release(&self, region: &str) {
        let pool = {
            let mut pools = self.pools.lock().unwrap_or_else(|e| e.into_inner());
            pools.remove(region)
        };
        for mut worker in pool.map(|p| p.workers).unwrap_or_default() {
            stop(&mut worker.child);
        }
    }

    fn release_all(&self) {
        let pools: Vec<Pool> = {
            let mut pools = self.pools.lock().unwrap_or_else(|e| e.into_inner());
            pools.drain().map(|(_, p)| p).collect()
        };
        for mut worker in pools.into_iter().flat_map(|p| p.workers) {
            stop(&mut worker.child);
        }
    }
}

/// Kills a worker and whatever task it runs (its process group), then reaps it.
fn stop(child: &mut Child) {
    // The group may already be gone: nothing to stop then.
    let _ = rustix::process::kill_process_group(
        rustix::process::Pid::from_child(child),
        rustix::process::Signal::KILL,
    );
    let _ = child.kill();
    let _ = child.wait();
}

/// Kernel clock ticks per second for /proc times (USER_HZ, 100 on every mainstream Linux).
const CLOCK_TICKS_PER_SECOND: f64 = 100.0;

/// CPU time of a process and of its children it has waited for, from `/proc/PID/stat`.
/// `None` where /proc is not available or the process is gone.
pub fn process_cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat_cpu_seconds(&stat)
}

/// utime + stime + cutime + cstime (fields 14-17) of a `/proc/PID/stat` line.
fn parse_stat_cpu_seconds(stat: &str) -> Option<f64> {
    // The command name (field 2) may contain spaces; fields after it follow the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state), so field N is at index N - 3.
    let ticks: Option<f64> = (14..=17)
        .map(|n| fields.get(n - 3)?.parse::<f64>().ok())
        .sum();
    Some(ticks? / CLOCK_TICKS_PER_SECOND)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::region::{Capacity, Tier};

    fn spec(cpu: u32) -> RegionSpec {
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
            taints: vec![],
            unschedulable: false,
            runtime: Default::default(),
        }
    }

    #[test]
    fn parses_cpu_fields_of_proc_stat_even_with_spaces_in_the_name() {
        let line = "42 (my worker) S 1 42 42 0 -1 4194560 100 0 0 0 150 50 30 20 20 0 1 0 100 0 0";
        assert_eq!(parse_stat_cpu_seconds(line), Some(2.5));
        assert_eq!(parse_stat_cpu_seconds("garbage"), None);
    }

    #[test]
    fn reads_cpu_time_of_this_process() {
        let cpu = process_cpu_seconds(std::process::id()).expect("/proc is available");
        assert!(cpu >= 0.0);
    }

    #[test]
    fn a_region_never_gets_more_workers_than_the_host_has_cores() {
        let driver = LocalDriver::with_host_cores(
            WorkerCommand {
                program: "sh".into(),
                args: vec!["-c".into(), "sleep 30".into(), "worker".into()],
                env: vec![],
            },
            2,
        );
        let seen = driver.ensure("huge", &spec(4096), 4096).unwrap();
        assert_eq!(seen.workers, 2);
        assert_eq!(driver.worker_pids("huge").len(), 2);
        driver.release("huge");
    }

    #[test]
    fn starts_at_most_capacity_workers_and_replaces_exited_ones() {
        // `sleep` stands in for `ceccm worker`: the driver only needs a long-lived process.
        let driver = LocalDriver::with_host_cores(
            WorkerCommand {
                program: "sh".into(),
                args: vec!["-c".into(), "sleep 30".into(), "worker".into()],
                env: vec![],
            },
            64,
        );
        let seen = driver.ensure("edge-a", &spec(2), 5).unwrap();
        assert!(seen.healthy);
        assert_eq!(seen.workers, 2);
        let pids = driver.worker_pids("edge-a");
        assert_eq!(pids.len(), 2);
        rustix::process::kill_process_group(
            rustix::process::Pid::from_raw(pids[0] as i32).unwrap(),
            rustix::process::Signal::KILL,
        )
        .unwrap();
        // Reaping happens on the next pass; the killed worker is replaced.
        let replaced = crate::tests_support::poll(|| {
            driver.ensure("edge-a", &spec(2), 5).unwrap();
            let now = driver.worker_pids("edge-a");
            (now.len() == 2 && !now.contains(&pids[0])).then_some(now)
        });
        assert!(replaced.contains(&pids[1]));
        driver.release("edge-a");
        assert!(driver.worker_pids("edge-a").is_empty());
    }

    #[test]
    fn other_drivers_are_reported_unsupported() {
        let driver = LocalDriver::new(WorkerCommand {
            program: "true".into(),
            args: vec![],
            env: vec![],
        });
        let mut agent = spec(1);
        agent.driver = DriverKind::Agent;
        assert!(matches!(
            driver.ensure("far", &agent, 1),
            Err(DriverError::Unsupported(_))
        ));
    }
}

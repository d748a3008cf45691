//! The simulator's inputs.
//!
//! Region file:
//!
//! ```yaml
//! transferKwhPerGb: 0.001          # energy to move data between regions
//! regions:
//!   - spec: {name: edge-caha, tier: edge, capacity: {cpu: 32, memoryMiB: 131072}, ...}
//!     truth: {speed: 0.55}         # what the workload really gets (see `truth`)
//! ```
//!
//! Trace file: job kinds (the shape shared by all jobs of a survey) and the jobs themselves.
//!
//! ```yaml
//! seed: 7
//! command: cargo run --release -p ceccm-scheduler --bin gen-trace -- --seed 7 -o trace.yaml
//! kinds:
//!   manga: {pixels: 4563, templates: 150, moments: 4, resources: {cpu: 4, memoryMiB: 4096},
//!           objective: energy, deadlineS: 86400, constraints: {}}
//! jobs:
//!   - {kind: manga, name: manga-8485-1901, at: 12.5, tasks: 5, spectra: 480, bytes: 219000000, data: cloud-sas}
//! ```

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::analytic::AnalyticCostModel;
use crate::energy::JOULES_PER_KWH;
use crate::model::{
    Constraints, DataInput, Objective, RegionSnapshot, Resources, TaskFeatures, TaskGroup,
};
use crate::placement::{DEFAULT_TRANSFER_JOULES_PER_BYTE, Unschedulable, place};
use crate::sim::truth::RegionTruth;

#[derive(Debug, Error)]
pub enum InputError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}: {}", problems.join("; "))]
    Invalid {
        path: PathBuf,
        problems: Vec<String>,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SimRegion {
    pub spec: RegionSnapshot,
    #[serde(default)]
    pub truth: RegionTruth,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RegionFile {
    #[serde(default = "default_transfer_kwh_per_gb")]
    pub transfer_kwh_per_gb: f64,
    pub regions: Vec<SimRegion>,
}

fn default_transfer_kwh_per_gb() -> f64 {
    DEFAULT_TRANSFER_JOULES_PER_BYTE * 1e9 / JOULES_PER_KWH
}

impl RegionFile {
    /// Joules per byte moved.
    pub fn transfer_joules_per_byte(&self) -> f64 {
        self.transfer_kwh_per_gb * JOULES_PER_KWH / 1e9
    }

    /// The cost model every policy but `oracle-greedy` starts from.
    pub fn prior(&self) -> AnalyticCostModel {
        AnalyticCostModel {
            transfer_joules_per_byte: self.transfer_joules_per_byte(),
            ..AnalyticCostModel::default()
        }
    }

    /// Every problem with the region set, in words.
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if self.regions.is_empty() {
            problems.push("the region set is empty".to_string());
        }
        if !(self.transfer_kwh_per_gb.is_finite() && self.transfer_kwh_per_gb >= 0.0) {
            problems.push(format!(
                "transferKwhPerGb must be >= 0, got {}",
                self.transfer_kwh_per_gb
            ));
        }
        let mut names = HashSet::new();
        for r in &self.regions {
            let name = &r.spec.name;
            if !names.insert(name.as_str()) {
                problems.push(format!("region {name} is declared twice"));
            }
            problems.extend(
                r.spec
                    .problems()
                    .into_iter()
                    .map(|p| format!("region {name}: {p}")),
            );
            problems.extend(
                r.truth
                    .problems()
                    .into_iter()
                    .map(|p| format!("region {name}: truth: {p}")),
            );
        }
        problems
    }
}

/// What all jobs of one kind (a survey, a use) share.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct JobKind {
    pub pixels: u64,
    pub templates: u64,
    pub moments: u64,
    /// Per task.
    pub resources: Resources,
    #[serde(default)]
    pub constraints: Constraints,
    #[serde(default)]
    pub objective: Objective,
    #[serde(default)]
    pub deadline_s: Option<f64>,
}

/// One job of the trace: a task group arriving at `at` seconds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Job {
    pub kind: String,
    pub name: String,
    pub at: f64,
    pub tasks: u64,
    /// Spectra per task.
    pub spectra: u64,
    /// Input bytes of the whole job.
    #[serde(default)]
    pub bytes: u64,
    /// Region holding the input.
    #[serde(default)]
    pub data: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TraceFile {
    /// The generator's seed, and the command that wrote this file.
    #[serde(default)]
    pub seed: Option<u64>,
    #[serde(default)]
    pub command: Option<String>,
    pub kinds: BTreeMap<String, JobKind>,
    pub jobs: Vec<Job>,
}

impl TraceFile {
    /// The jobs as task groups, in arrival order; the problems of any job that cannot become one
    /// or that no region could ever run (checked against the empty region set).
    pub fn task_groups(&self, regions: &RegionFile) -> Result<Vec<TaskGroup>, Vec<String>> {
        let mut problems = Vec::new();
        let empty: Vec<RegionSnapshot> = regions.regions.iter().map(|r| r.spec.clone()).collect();
        let prior = regions.prior();
        let mut groups = Vec::with_capacity(self.jobs.len());
        for (i, job) in self.jobs.iter().enumerate() {
            let Some(kind) = self.kinds.get(&job.kind) else {
                problems.push(format!(
                    "job {i} ({}) names unknown kind {:?}",
                    job.name, job.kind
                ));
                continue;
            };
            if !(job.at.is_finite() && job.at >= 0.0) {
                problems.push(format!(
                    "job {i} ({}): at must be >= 0 seconds, got {}",
                    job.name, job.at
                ));
                continue;
            }
            if job.tasks == 0 || job.spectra == 0 {
                problems.push(format!(
                    "job {i} ({}): tasks and spectra must be at least 1",
                    job.name
                ));
                continue;
            }
            let group = TaskGroup {
                name: job.name.clone(),
                tasks: job.tasks,
                features: TaskFeatures {
                    spectra: job.spectra,
                    pixels: kind.pixels,
                    templates: kind.templates,
                    moments: kind.moments,
                },
                resources: kind.resources,
                input: DataInput {
                    bytes: job.bytes,
                    region: job.data.clone(),
                },
                constraints: kind.constraints.clone(),
                objective: kind.objective,
                deadline_s: kind.deadline_s,
                parallelism: None,
                start_s: job.at,
            };
            if let Some(data) = &job.data
                && !empty.iter().any(|r| &r.name == data)
            {
                problems.push(format!(
                    "job {i} ({}): data region {data} is not in the region file",
                    job.name
                ));
                continue;
            }
            // A job that cannot run even on idle regions would wait forever.
            match place(&empty, &group, &prior) {
                Ok(_) => groups.push(group),
                Err(Unschedulable::InvalidGroup { problems: p, .. }) => {
                    problems.push(format!("job {i} ({}): {}", job.name, p.join("; ")))
                }
                Err(e @ Unschedulable::NoFeasibleRegion { .. }) => problems.push(format!(
                    "job {i} ({}) has impossible constraints: {e}",
                    job.name
                )),
            }
            if problems.len() >= 20 {
                problems.push("(stopped after 20 problems)".to_string());
                break;
            }
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        groups.sort_by(|a, b| a.start_s.total_cmp(&b.start_s));
        Ok(groups)
    }
}

fn read(path: &Path) -> Result<String, InputError> {
    std::fs::read_to_string(path).map_err(|source| InputError::Read {
        path: path.to_owned(),
        source,
    })
}

fn parse<T: for<'de> Deserialize<'de>>(path: &Path, text: &str) -> Result<T, InputError> {
    yaml_serde::from_str(text).map_err(|e| InputError::Parse {
        path: path.to_owned(),
        message: e.to_string(),
    })
}

/// Reads and checks a region file.
pub fn load_regions(path: &Path) -> Result<RegionFile, InputError> {
    let file: RegionFile = parse(path, &read(path)?)?;
    let problems = file.problems();
    if problems.is_empty() {
        Ok(file)
    } else {
        Err(InputError::Invalid {
            path: path.to_owned(),
            problems,
        })
    }
}

/// Reads a trace file and turns it into task groups checked against `regions`.
pub fn load_trace(
    path: &Path,
    regions: &RegionFile,
) -> Result<(TraceFile, Vec<TaskGroup>), InputError> {
    let trace: TraceFile = parse(path, &read(path)?)?;
    let groups = trace
        .task_groups(regions)
        .map_err(|problems| InputError::Invalid {
            path: path.to_owned(),
            problems,
        })?;
    Ok((trace, groups))
}

/// The trace as YAML: the header through serde, then one flow mapping per job so that a
/// survey-sized trace stays a readable, diffable file of one line per job.
pub fn trace_to_yaml(trace: &TraceFile) -> String {
    #[derive(Serialize)]
    struct Header<'a> {
        seed: Option<u64>,
        command: &'a Option<String>,
        kinds: &'a BTreeMap<String, JobKind>,
    }
    let header = Header {
        seed: trace.seed,
        command: &trace.command,
        kinds: &trace.kinds,
    };
    let mut out = yaml_serde::to_string(&header).expect("plain data serialises");
    out.push_str("jobs:\n");
    for j in &trace.jobs {
        out.push_str(&format!(
            "- {{kind: {}, name: {}, at: {}, tasks: {}, spectra: {}, bytes: {}",
            j.kind, j.name, j.at, j.tasks, j.spectra, j.bytes
        ));
        if let Some(d) = &j.data {
            out.push_str(&format!(", data: {d}"));
        }
        out.push_str("}\n");
    }
    out
}

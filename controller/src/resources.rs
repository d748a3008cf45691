//! The resource kinds, their typed specs, and what the API checks before anything is stored:
//! names (DNS-1123 labels), unknown fields (rejected by serde), value ranges.

use std::collections::BTreeMap;

use ceccm_federation::region::{RegionSpec, Tier};
use ceccm_federation::{RegionStatus, Violation};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use utoipa::ToSchema;

use crate::error::{ApiError, ErrorCode};

pub const API_VERSION: &str = "ceccm/v1";
/// Finalizer that holds an application or region until its resources are released.
pub const RELEASE_FINALIZER: &str = "ceccm/release";
/// Label every task carries: the application it belongs to.
pub const APPLICATION_LABEL: &str = "ceccm/application";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Region,
    Application,
    Dataset,
    Task,
    Event,
    /// A bearer token's record (`crate::tokens`): only through `/api/v1/tokens`, never the
    /// generic object routes, so it is not in [`Kind::ALL`].
    Token,
}

impl Kind {
    pub const ALL: [Kind; 5] = [
        Kind::Region,
        Kind::Application,
        Kind::Dataset,
        Kind::Task,
        Kind::Event,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Region => "Region",
            Kind::Application => "Application",
            Kind::Dataset => "Dataset",
            Kind::Task => "Task",
            Kind::Event => "Event",
            Kind::Token => "Token",
        }
    }

    pub fn plural(self) -> &'static str {
        match self {
            Kind::Region => "regions",
            Kind::Application => "applications",
            Kind::Dataset => "datasets",
            Kind::Task => "tasks",
            Kind::Event => "events",
            Kind::Token => "tokens",
        }
    }

    pub fn from_plural(plural: &str) -> Result<Kind, ApiError> {
        Kind::ALL
            .into_iter()
            .find(|k| k.plural() == plural)
            .ok_or_else(|| {
                ApiError::new(
                    ErrorCode::NotFound,
                    format!("no resource type {plural:?}; known: regions, applications, datasets, tasks, events"),
                )
            })
    }

    /// Users create and change these; tasks and events belong to the control plane.
    pub fn user_writable(self) -> bool {
        matches!(self, Kind::Region | Kind::Application | Kind::Dataset)
    }

    /// Kinds whose deletion waits for the release finalizer.
    pub fn has_release_finalizer(self) -> bool {
        matches!(self, Kind::Region | Kind::Application)
    }
}

/// The columns the store indexes, taken from an object.
pub struct IndexColumns {
    pub phase: Option<String>,
    pub owner: Option<String>,
    pub region: Option<String>,
    pub deadline_ms: Option<i64>,
}

impl IndexColumns {
    pub fn of(kind: Kind, object: &Value) -> IndexColumns {
        let text = |v: &Value| v.as_str().map(str::to_string);
        let status = &object["status"];
        match kind {
            Kind::Task => IndexColumns {
                phase: text(&status["state"]),
                owner: text(&object["spec"]["application"]),
                region: text(&status["region"]),
                deadline_ms: status["leaseDeadline"]
                    .as_str()
                    .and_then(crate::time::parse_millis),
            },
            Kind::Event => IndexColumns {
                phase: text(&object["type"]),
                owner: match (
                    object["involvedObject"]["kind"].as_str(),
                    object["involvedObject"]["name"].as_str(),
                ) {
                    (Some(k), Some(n)) => Some(format!("{k}/{n}")),
                    _ => None,
                },
                region: None,
                deadline_ms: None,
            },
            _ => IndexColumns {
                phase: text(&status["phase"]),
                owner: None,
                region: None,
                deadline_ms: None,
            },
        }
    }
}

/// DNS-1123 label: 1-63 of `[a-z0-9-]`, starting and ending alphanumeric.
pub fn validate_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 63 {
        return Err("must be 1 to 63 characters".into());
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Err("must consist of lower-case letters, digits and '-'".into());
    }
    if name.starts_with('-') || name.ends_with('-') {
        return Err("must start and end with a letter or digit".into());
    }
    Ok(())
}

/// Label keys: optional DNS prefix and `/`, then 1-63 of `[A-Za-z0-9._-]`; values up to 63.
fn validate_label(key: &str, value: &str) -> Result<(), String> {
    let name = key.rsplit_once('/').map_or(key, |(prefix, name)| {
        if prefix.is_empty() || prefix.len() > 253 {
            ""
        } else {
            name
        }
    });
    let ok = |s: &str| {
        s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    };
    if name.is_empty() || name.len() > 63 || !ok(name) {
        return Err(format!("label key {key:?} is not a valid label name"));
    }
    if value.len() > 63 || !ok(value) {
        return Err(format!("label value {value:?} of {key:?} is not valid"));
    }
    Ok(())
}

/// Metadata as users send it. System fields are accepted (so that `get -o yaml | apply` round
/// trips) but the server owns them.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ObjectMeta {
    pub name: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub creation_timestamp: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deletion_timestamp: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub finalizers: Vec<String>,
    /// The user who created the object (set by the server from the caller's token; what a
    /// client sends here is replaced).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
}

/// An object as sent in a POST or PUT body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Incoming<S> {
    #[serde(default)]
    api_version: Option<String>,
    #[serde(default)]
    kind: Option<String>,
    metadata: ObjectMeta,
    spec: S,
    /// Ignored: status belongs to the control plane (`PATCH .../status`).
    #[serde(default, rename = "status")]
    _status: Option<serde::de::IgnoredAny>,
}

/// A checked object from a request: metadata, and the spec in its canonical JSON form.
#[derive(Debug, Clone)]
pub struct Submitted {
    pub metadata: ObjectMeta,
    pub spec: Value,
    /// Names of regions the spec refers to; each must exist.
    pub referenced_regions: Vec<String>,
    /// Datasets the spec refers to and that must exist (astro-fit's cube and templates), with
    /// the field that names each.
    pub referenced_datasets: Vec<(String, String)>,
}

/// Parses and checks a request body for `kind`: shape and unknown fields (400), names and
/// values (422).
pub fn parse_submitted(kind: Kind, body: Value) -> Result<Submitted, ApiError> {
    match kind {
        Kind::Region => submit::<RegionSpec>(kind, body, |s| (s.validate(), vec![], vec![])),
        Kind::Application => submit::<ApplicationSpec>(kind, body, |s| {
            let datasets = match s.app {
                AppKind::AstroFit => s.referenced_datasets(),
                AppKind::Container => vec![],
            };
            (s.validate(), s.placement.regions.clone(), datasets)
        }),
        Kind::Dataset => submit::<DatasetSpec>(kind, body, |s| {
            (s.validate(), s.region.iter().cloned().collect(), vec![])
        }),
        Kind::Task | Kind::Event | Kind::Token => Err(read_only(kind)),
    }
}

pub fn read_only(kind: Kind) -> ApiError {
    ApiError::new(
        ErrorCode::Forbidden,
        format!(
            "{} are managed by the control plane and read-only",
            kind.plural()
        ),
    )
}

fn submit<S>(
    kind: Kind,
    body: Value,
    check: impl FnOnce(&S) -> (Vec<Violation>, Vec<String>, Vec<(String, String)>),
) -> Result<Submitted, ApiError>
where
    S: serde::de::DeserializeOwned + Serialize,
{
    let incoming: Incoming<S> = serde_json::from_value(body).map_err(|e| {
        ApiError::bad_request(format!("malformed {}: {e}", kind.as_str()))
            .with_details(json!({"kind": kind.as_str()}))
    })?;
    let name = incoming.metadata.name.clone();
    let mut violations = Vec::new();
    if let Some(v) = &incoming.api_version
        && v != API_VERSION
    {
        violations.push(Violation::new(
            "apiVersion",
            format!("must be {API_VERSION}"),
        ));
    }
    if let Some(k) = &incoming.kind
        && k != kind.as_str()
    {
        violations.push(Violation::new("kind", format!("must be {}", kind.as_str())));
    }
    if let Err(e) = validate_name(&name) {
        violations.push(Violation::new("metadata.name", e));
    }
    for (key, value) in &incoming.metadata.labels {
        if let Err(e) = validate_label(key, value) {
            violations.push(Violation::new("metadata.labels", e));
        }
    }
    let (spec_violations, referenced_regions, referenced_datasets) = check(&incoming.spec);
    violations.extend(spec_violations);
    if !violations.is_empty() {
        return Err(ApiError::invalid(kind.as_str(), &name, &violations));
    }
    let spec = serde_json::to_value(&incoming.spec)
        .map_err(|e| ApiError::new(ErrorCode::Internal, e.to_string()))?;
    Ok(Submitted {
        metadata: incoming.metadata,
        spec,
        referenced_regions,
        referenced_datasets,
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum AppKind {
    /// Generic batch work: `spec.tasks` lists the commands.
    Container,
    /// The IFS full-spectrum fitter; its planner turns parameters into tasks.
    AstroFit,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum AppType {
    #[default]
    Batch,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Objective {
    Energy,
    Latency,
    #[default]
    Balanced,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TaskTemplate {
    pub command: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct DatasetRef {
    pub dataset: String,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Resources {
    #[serde(default)]
    pub cpu: f64,
    #[serde(default, rename = "memoryMiB")]
    pub memory_mib: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Toleration {
    /// Empty with `operator: Exists`: every key.
    #[serde(default)]
    pub key: String,
    /// `Exists` or `Equal`; absent: `Equal` when a value is given, else `Exists`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operator: Option<String>,
    #[serde(default)]
    pub value: String,
    #[serde(default)]
    pub effect: String,
    /// With `NoExecute`: how long work stays bound to a region after the taint appears (e.g.
    /// `ceccm/not-ready`); absent: for ever.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub toleration_seconds: Option<u64>,
}

/// Taint of a region that is not Ready (its agent silent, its driver failing), as Kubernetes
/// taints a node `node.kubernetes.io/not-ready:NoExecute`.
pub const NOT_READY_TAINT: &str = "ceccm/not-ready";
/// Taint of a cordoned region (`spec.unschedulable`), as Kubernetes' `node.kubernetes.io/unschedulable`.
pub const UNSCHEDULABLE_TAINT: &str = "ceccm/unschedulable";
/// How long an application's work stays on a NotReady region when it declares no toleration
/// for `ceccm/not-ready` (Kubernetes' DefaultTolerationSeconds).
pub const DEFAULT_NOT_READY_TOLERATION_SECONDS: u64 = 300;

impl Toleration {
    /// Whether this toleration matches a taint `key=value:effect`.
    pub fn tolerates(&self, key: &str, value: &str, effect: &str) -> bool {
        let exists = match self.operator.as_deref() {
            Some("Exists") => true,
            Some(_) => false,
            None => self.value.is_empty(),
        };
        let key_matches = self.key == key || (self.key.is_empty() && exists);
        let value_matches = exists || self.value == value;
        let effect_matches = self.effect.is_empty() || self.effect == effect;
        key_matches && value_matches && effect_matches
    }
}

impl PlacementConstraints {
    /// How many seconds this work stays on a region that turned NotReady: `None` for ever.
    pub fn not_ready_toleration_seconds(&self) -> Option<u64> {
        match self
            .tolerations
            .iter()
            .find(|t| t.tolerates(NOT_READY_TAINT, "", "NoExecute"))
        {
            Some(t) => t.toleration_seconds,
            None => Some(DEFAULT_NOT_READY_TOLERATION_SECONDS),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PlacementConstraints {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tiers: Vec<Tier>,
    /// Region names the work may run in (empty: any).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub regions: Vec<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub region_selector: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
    #[serde(default)]
    pub data_locality: bool,
}

pub const MAX_TASKS: usize = 100_000;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ApplicationSpec {
    pub app: AppKind,
    #[serde(default, rename = "type")]
    pub app_type: AppType,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tasks: Vec<TaskTemplate>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Object)]
    pub parameters: Option<Value>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub inputs: Vec<DatasetRef>,
    #[serde(default)]
    pub resources: Resources,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parallelism: Option<u32>,
    #[serde(default)]
    pub placement: PlacementConstraints,
    #[serde(default)]
    pub objective: Objective,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline: Option<String>,
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    #[serde(default)]
    pub suspend: bool,
    /// The OCI image (in the image store of the region's hosts) its tasks run in on regions
    /// with `runtime: oci`; astro-fit applications default to `astro-fit`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(pattern = "^[a-z0-9][a-z0-9._/-]{0,127}(:[A-Za-z0-9._-]{1,128})?$")]
    pub image: Option<String>,
    /// How long each attempt of a task may run, as a pod's `activeDeadlineSeconds`: past it the
    /// worker kills it and the attempt fails with reason `DeadlineExceeded` (retried by
    /// `maxAttempts` like any failure). Absent: no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1, maximum = 2_592_000)]
    pub task_deadline_seconds: Option<u64>,
}

impl ApplicationSpec {
    /// The image its tasks run in on an `oci` region.
    pub fn task_image(&self) -> Option<String> {
        self.image.clone().or_else(|| {
            (self.app == AppKind::AstroFit).then(|| crate::image::ASTRO_FIT_IMAGE.to_string())
        })
    }

    /// The memory limit of each task, where the application declares one.
    pub fn task_memory_mib(&self) -> Option<u64> {
        Some(self.resources.memory_mib).filter(|m| *m > 0)
    }
}

/// The longest `taskDeadlineSeconds`: 30 days.
pub const MAX_TASK_DEADLINE_SECONDS: u64 = 30 * 24 * 3600;

fn default_max_attempts() -> u32 {
    3
}

impl ApplicationSpec {
    pub fn validate(&self) -> Vec<Violation> {
        let mut out = Vec::new();
        if self.app == AppKind::Container && self.tasks.is_empty() {
            out.push(Violation::new(
                "spec.tasks",
                "a container batch application needs at least one task",
            ));
        }
        if self.tasks.len() > MAX_TASKS {
            out.push(Violation::new(
                "spec.tasks",
                format!("at most {MAX_TASKS} tasks"),
            ));
        }
        for (i, t) in self.tasks.iter().enumerate() {
            if t.command.trim().is_empty() {
                out.push(Violation::new(
                    format!("spec.tasks[{i}].command"),
                    "must not be empty",
                ));
            }
        }
        if !(1..=100).contains(&self.max_attempts) {
            out.push(Violation::new("spec.maxAttempts", "must be 1 to 100"));
        }
        if self
            .task_deadline_seconds
            .is_some_and(|s| !(1..=MAX_TASK_DEADLINE_SECONDS).contains(&s))
        {
            out.push(Violation::new(
                "spec.taskDeadlineSeconds",
                format!("must be 1 to {MAX_TASK_DEADLINE_SECONDS} (30 days)"),
            ));
        }
        if self.parallelism == Some(0) {
            out.push(Violation::new("spec.parallelism", "must be at least 1"));
        }
        if !self.resources.cpu.is_finite() || self.resources.cpu < 0.0 {
            out.push(Violation::new(
                "spec.resources.cpu",
                "must be a finite number >= 0",
            ));
        }
        if let Some(d) = &self.deadline
            && crate::time::parse_millis(d).is_none()
        {
            out.push(Violation::new(
                "spec.deadline",
                "must be an RFC 3339 UTC time",
            ));
        }
        for (i, r) in self.placement.regions.iter().enumerate() {
            if validate_name(r).is_err() {
                out.push(Violation::new(
                    format!("spec.placement.regions[{i}]"),
                    "is not a valid region name",
                ));
            }
        }
        for (i, t) in self.placement.tolerations.iter().enumerate() {
            // An unknown effect would tolerate every taint of the key: refuse it.
            if !["", "NoSchedule", "PreferNoSchedule", "NoExecute"].contains(&t.effect.as_str()) {
                out.push(Violation::new(
                    format!("spec.placement.tolerations[{i}].effect"),
                    "must be NoSchedule, PreferNoSchedule, NoExecute or empty (every effect)",
                ));
            }
            if !matches!(t.operator.as_deref(), None | Some("Exists" | "Equal")) {
                out.push(Violation::new(
                    format!("spec.placement.tolerations[{i}].operator"),
                    "must be Exists or Equal",
                ));
            }
            if t.operator.as_deref() == Some("Exists") && !t.value.is_empty() {
                out.push(Violation::new(
                    format!("spec.placement.tolerations[{i}].value"),
                    "must be empty with operator Exists",
                ));
            }
            if t.key.is_empty() && t.operator.as_deref() == Some("Equal") {
                out.push(Violation::new(
                    format!("spec.placement.tolerations[{i}].key"),
                    "must be given with operator Equal",
                ));
            }
            if t.toleration_seconds.is_some() && !t.effect.is_empty() && t.effect != "NoExecute" {
                out.push(Violation::new(
                    format!("spec.placement.tolerations[{i}].tolerationSeconds"),
                    "applies only to the NoExecute effect",
                ));
            }
        }
        for (i, input) in self.inputs.iter().enumerate() {
            if validate_name(&input.dataset).is_err() {
                out.push(Violation::new(
                    format!("spec.inputs[{i}].dataset"),
                    "is not a valid dataset name",
                ));
            }
        }
        if self.app == AppKind::AstroFit {
            out.extend(self.validate_astro_fit());
        } else if let Err(message) = crate::scheduling::declared_features(self) {
            out.push(Violation::new(
                format!(
                    "spec.parameters.{}",
                    crate::scheduling::TASK_FEATURES_PARAMETER
                ),
                message,
            ));
        }
        out
    }
}

impl ApplicationSpec {
    /// An astro-fit application is planned from its parameters and its one cube.
    fn validate_astro_fit(&self) -> Vec<Violation> {
        let mut out = Vec::new();
        if !self.tasks.is_empty() {
            out.push(Violation::new(
                "spec.tasks",
                "an astro-fit application is planned from spec.parameters; give no tasks",
            ));
        }
        if self.inputs.len() != 1 {
            out.push(Violation::new(
                "spec.inputs",
                "an astro-fit application needs exactly one input: [{dataset: CUBE}]",
            ));
        }
        if let Err(violations) =
            crate::astro_fit::AstroFitParameters::parse(self.parameters.as_ref())
        {
            out.extend(violations);
        }
        out
    }

    /// Datasets the spec names, with the field naming each: its inputs and, for astro-fit,
    /// its templates.
    pub fn referenced_datasets(&self) -> Vec<(String, String)> {
        let mut names: Vec<(String, String)> = self
            .inputs
            .iter()
            .enumerate()
            .map(|(i, input)| (format!("spec.inputs[{i}].dataset"), input.dataset.clone()))
            .collect();
        if self.app == AppKind::AstroFit
            && let Ok(p) = crate::astro_fit::AstroFitParameters::parse(self.parameters.as_ref())
            && let Some(templates) = p.templates
        {
            names.push(("spec.parameters.templates".into(), templates));
        }
        names
    }
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct DatasetSpec {
    /// E.g. `fits`, `manga-logcube`, `csv`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<String>,
    /// Region whose storage holds the data (data locality).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

impl DatasetSpec {
    pub fn validate(&self) -> Vec<Violation> {
        match &self.region {
            Some(r) if validate_name(r).is_err() => {
                vec![Violation::new("spec.region", "is not a valid region name")]
            }
            _ => vec![],
        }
    }
}

/// Spec of a task: one unit of an application's work, either a command (container
/// applications) or one stage of an astro-fit application (`astroFit`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct TaskSpec {
    pub application: String,
    pub index: u32,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub command: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub astro_fit: Option<crate::astro_fit::AstroFitWork>,
    /// What this task computes, for the predictor (astro-fit chunks know it from the plan);
    /// absent: the application's `parameters.taskFeatures`, else a reference chunk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub features: Option<ceccm_scheduler::TaskFeatures>,
    /// Cores the task uses (the application's `resources.cpu`; astro-fit: its threads): a
    /// region runs as many workers as its cores hold such tasks. Absent: one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cores: Option<f64>,
    pub max_attempts: u32,
    /// The OCI image the task runs in on a region with `runtime: oci` (astro-fit tasks: the
    /// application's image, `astro-fit` by default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Memory the task may use (its container's cgroup limit), from the application's
    /// `resources.memoryMiB`.
    #[serde(default, rename = "memoryMiB", skip_serializing_if = "Option::is_none")]
    pub memory_mib: Option<u64>,
    /// How long one attempt may run (the application's `taskDeadlineSeconds`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active_deadline_seconds: Option<u64>,
}

impl TaskSpec {
    /// How long one attempt may run.
    pub fn deadline(&self) -> Option<std::time::Duration> {
        self.active_deadline_seconds
            .map(std::time::Duration::from_secs)
    }

    /// The cores this task occupies while it runs (at least one).
    pub fn cores(&self) -> f64 {
        self.cores
            .filter(|c| c.is_finite() && *c >= 1.0)
            .unwrap_or(1.0)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub enum TaskState {
    Queued,
    Leased,
    Done,
    Failed,
    DeadLettered,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct TaskStatus {
    pub state: TaskState,
    #[serde(default)]
    pub attempts: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_deadline: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<String>,
    /// The region's load (0..1) when this attempt was leased: a feature of its telemetry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_load: Option<f64>,
    /// sha256 of the secret the lease handed to its worker (`x-ceccm-lease-secret`): only the
    /// holder of this attempt's lease may report on it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_secret_sha256: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<String>,
    #[serde(default)]
    pub cpu_seconds: f64,
    #[serde(default)]
    pub energy_joules: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Object)]
    pub result: Option<Value>,
    /// Files the completing attempt uploaded (content-addressed, written once).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub artifacts: Vec<crate::astro_fit::ContentRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Why the last attempt failed, as Kubernetes names it: `OOMKilled`, `ImageNotFound`,
    /// `ContainerCannotRun`, `DeadlineExceeded` or `Error`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Why the task was last taken off a region (deleted, drained, NotReady past the
    /// application's toleration); it then waits, without a region, to be placed again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub evicted: Option<String>,
}

pub use ceccm_federation::region::Condition;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct PlacementStatus {
    pub region: String,
    pub tasks: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub predicted_seconds: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub predicted_joules: Option<f64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub enum AppPhase {
    Pending,
    Scheduling,
    Running,
    Succeeded,
    Failed,
    /// Stopped by a user (`cancel`); finished tasks are kept, `retry` resumes.
    Cancelled,
    Suspended,
    Deleting,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Progress {
    pub done: u32,
    pub failed: u32,
    pub total: u32,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ApplicationStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<AppPhase>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub placements: Vec<PlacementStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub explanation: Option<String>,
    #[serde(default)]
    pub progress: Progress,
    /// Staged applications (astro-fit): each stage's tasks done and total.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stages: Vec<crate::astro_fit::StageStatus>,
    #[serde(default)]
    pub energy_joules: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub results: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DatasetStatus {
    /// `Pending` until content is uploaded, then `Ready`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upload_time: Option<String>,
    /// Set when the content lives at an edge region's agent (which announced it) rather than
    /// on the server: what crosses the region's uplink, and when it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uplink: Option<crate::uplink::DatasetUplink>,
}

/// The envelope every object has, for the OpenAPI document.
#[derive(Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ApiObject {
    pub api_version: String,
    pub kind: String,
    pub metadata: ObjectMeta,
    /// RegionSpec, ApplicationSpec, DatasetSpec or TaskSpec, by kind.
    #[schema(value_type = Object)]
    pub spec: Value,
    /// RegionStatus, ApplicationStatus, DatasetStatus or TaskStatus, by kind.
    #[schema(value_type = Object)]
    pub status: Value,
}

/// The body of `PATCH /api/v1/{plural}/{name}/status`, for the OpenAPI document.
#[derive(Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StatusPatch {
    /// Merged into the object's status (JSON merge patch, RFC 7386).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Object)]
    pub status: Option<Value>,
    /// A precondition: the patch applies only to this version (409 otherwise).
    pub metadata: Option<StatusPatchMeta>,
}

#[derive(Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct StatusPatchMeta {
    pub resource_version: Option<String>,
}

/// Typed views of stored objects, for the reconcilers (and the workers' kept leases).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Typed<S, T> {
    pub metadata: ObjectMeta,
    pub spec: S,
    #[serde(default = "Option::default")]
    pub status: Option<T>,
}

pub type RegionObject = Typed<RegionSpec, RegionStatus>;
pub type ApplicationObject = Typed<ApplicationSpec, ApplicationStatus>;
pub type TaskObject = Typed<TaskSpec, TaskStatus>;

pub fn typed<S: serde::de::DeserializeOwned, T: serde::de::DeserializeOwned>(
    object: &Value,
) -> Result<Typed<S, T>, crate::store::StoreError> {
    serde_json::from_value(object.clone())
        .map_err(|e| crate::store::StoreError::Corrupt(format!("{e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tolerations_match_taints_as_kubernetes_matches_them() {
        let t = |yaml: &str| -> Toleration { yaml_serde::from_str(yaml).unwrap() };
        let not_ready = t("{key: ceccm/not-ready, operator: Exists, effect: NoExecute}");
        assert!(not_ready.tolerates(NOT_READY_TAINT, "", "NoExecute"));
        assert!(!not_ready.tolerates(NOT_READY_TAINT, "", "NoSchedule"));
        assert!(!not_ready.tolerates("other", "", "NoExecute"));
        let everything = t("{operator: Exists}");
        assert!(everything.tolerates("anything", "v", "NoExecute"));
        let equal = t("{key: site, value: vlt, effect: NoSchedule}");
        assert!(equal.tolerates("site", "vlt", "NoSchedule"));
        assert!(!equal.tolerates("site", "gtc", "NoSchedule"));
        // An empty key without Exists matches only an empty key.
        assert!(!t("{key: '', operator: Equal, value: x}").tolerates("site", "x", "NoSchedule"));

        let constraints =
            |yaml: &str| -> PlacementConstraints { yaml_serde::from_str(yaml).unwrap() };
        assert_eq!(
            constraints("{}").not_ready_toleration_seconds(),
            Some(DEFAULT_NOT_READY_TOLERATION_SECONDS)
        );
        assert_eq!(
            constraints("{tolerations: [{key: ceccm/not-ready, operator: Exists, effect: NoExecute, tolerationSeconds: 7}]}")
                .not_ready_toleration_seconds(),
            Some(7)
        );
        // Without tolerationSeconds: for ever (an edge-pinned job).
        assert_eq!(
            constraints(
                "{tolerations: [{key: ceccm/not-ready, operator: Exists, effect: NoExecute}]}"
            )
            .not_ready_toleration_seconds(),
            None
        );
    }

    #[test]
    fn malformed_tolerations_are_named() {
        let spec: ApplicationSpec = yaml_serde::from_str(
            "app: container\ntasks: [{command: 'true'}]\nplacement: {tolerations: [\
             {key: a, operator: Sometimes}, {key: b, operator: Exists, value: v}, \
             {operator: Equal, value: v}, {key: c, effect: NoSchedule, tolerationSeconds: 5}]}\n",
        )
        .unwrap();
        let fields: Vec<String> = spec.validate().into_iter().map(|v| v.field).collect();
        assert_eq!(
            fields,
            [
                "spec.placement.tolerations[0].operator",
                "spec.placement.tolerations[1].value",
                "spec.placement.tolerations[2].key",
                "spec.placement.tolerations[3].tolerationSeconds",
            ]
        );
    }

    #[test]
    fn names_follow_dns_1123_labels() {
        for ok in ["a", "edge-1", "x".repeat(63).as_str()] {
            assert!(validate_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", "-a", "a-", "A", "a_b", "a.b", "x".repeat(64).as_str()] {
            assert!(validate_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn application_body_is_checked_and_canonicalised() {
        let body = json!({"apiVersion": "ceccm/v1", "kind": "Application",
            "metadata": {"name": "job", "labels": {"team": "ifs"}},
            "spec": {"app": "container", "tasks": [{"command": "echo", "args": ["1"]}],
                     "placement": {"regions": ["edge-a"]}}});
        let s = parse_submitted(Kind::Application, body).unwrap();
        assert_eq!(s.spec["maxAttempts"], 3);
        assert_eq!(s.spec["type"], "batch");
        assert_eq!(s.referenced_regions, ["edge-a"]);
    }

    #[test]
    fn unknown_fields_are_bad_requests_and_bad_values_are_invalid() {
        let unknown = json!({"metadata": {"name": "job"},
            "spec": {"app": "container", "tasks": [{"command": "x"}], "colour": 1}});
        let e = parse_submitted(Kind::Application, unknown).unwrap_err();
        assert_eq!(e.code, ErrorCode::BadRequest);
        assert!(e.message.contains("colour"), "{}", e.message);

        let invalid = json!({"metadata": {"name": "Job_1"},
            "spec": {"app": "container", "tasks": [], "maxAttempts": 0}});
        let e = parse_submitted(Kind::Application, invalid).unwrap_err();
        assert_eq!(e.code, ErrorCode::Invalid);
        let fields: Vec<&str> = e.details["causes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["field"].as_str().unwrap())
            .collect();
        assert_eq!(fields, ["metadata.name", "spec.tasks", "spec.maxAttempts"]);
    }

    #[test]
    fn tasks_and_events_cannot_be_submitted() {
        let e = parse_submitted(Kind::Task, json!({})).unwrap_err();
        assert_eq!(e.code, ErrorCode::Forbidden);
    }

    #[test]
    fn index_columns_come_from_status() {
        let task = json!({"spec": {"application": "job"},
            "status": {"state": "Leased", "region": "edge-a", "leaseDeadline": "1970-01-01T00:00:01.000Z"}});
        let ix = IndexColumns::of(Kind::Task, &task);
        assert_eq!(ix.phase.as_deref(), Some("Leased"));
        assert_eq!(ix.owner.as_deref(), Some("job"));
        assert_eq!(ix.deadline_ms, Some(1000));
        let ev =
            json!({"type": "Normal", "involvedObject": {"kind": "Application", "name": "job"}});
        assert_eq!(
            IndexColumns::of(Kind::Event, &ev).owner.as_deref(),
            Some("Application/job")
        );
    }
}

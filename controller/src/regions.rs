//! Region operations beyond create/read/update/delete: an agent joining its region, the agent's
//! heartbeat (which answers with the workers its region needs), and draining a region.
//!
//! As in k3s, an agent first presents the server's join token (`DATA_DIR/join.token`); the
//! server answers with a token bound to the agent's region, and the agent uses only that one
//! from then on. That token may lease and report only its region's tasks and heartbeat only its
//! region (Kubernetes' NodeRestriction).

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use utoipa::ToSchema;

use ceccm_federation::region::{AgentStatus, DriverKind, Tier};

use crate::auth::Role;
use crate::error::{ApiError, ErrorCode};
use crate::lifecycle::{self, RegionStep};
use crate::objects::{self, EventType};
use crate::predictor::SharedPredictor;
use crate::reconcile::region::{evict_all, pool_facts, region_tasks};
use crate::resources::{Kind, RegionObject, parse_submitted, typed, validate_name};
use crate::store::{Change, Store};

/// `POST /api/v1/agents:join`.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct JoinRequest {
    /// The region the agent runs. Made (`driver: agent`) if it does not exist.
    #[schema(pattern = "^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")]
    pub region: String,
    /// The agent's name (its host's, unless given).
    #[schema(min_length = 1, max_length = 253)]
    pub agent: String,
    /// Cores the agent offers (1..4096).
    #[schema(minimum = 1, maximum = 4096)]
    pub cpu: u32,
    #[serde(default, rename = "memoryMiB")]
    #[schema(maximum = 1_073_741_824)]
    pub memory_mib: u64,
    /// Tier of a region the join makes (default `edge`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tier: Option<Tier>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub location: String,
}

/// The answer to a join: the agent's own token (shown once).
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct JoinResponse {
    pub region: String,
    /// The user the token acts as (`agent-REGION`).
    pub user: String,
    pub token: String,
    /// Whether the join made the region.
    pub created: bool,
}

/// `POST /api/v1/regions/{name}/heartbeat`: what the agent reports of its host.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AgentReport {
    #[schema(min_length = 1, max_length = 253)]
    pub agent: String,
    /// Cores the agent offers now.
    #[schema(minimum = 1, maximum = 4096)]
    pub cpu: u32,
    /// Worker processes alive.
    #[schema(maximum = 65_536)]
    pub workers: u32,
    /// CPU time of its workers and their tasks since the agent started (>= 0).
    #[schema(minimum = 0)]
    pub cpu_seconds: f64,
    /// Energy its host measured (RAPL) since the agent started, where it can.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 0)]
    pub measured_joules: Option<f64>,
    /// The datasets the agent holds (its `DIR/datasets`), for Datasets that declare the region;
    /// at most 100 a heartbeat (an agent holding more announces them in turns).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schema(max_items = 100)]
    pub datasets: Vec<crate::uplink::HeldDataset>,
}

/// The answer to a heartbeat: what the region's queue asks of the agent.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AgentOrders {
    pub queued: u32,
    pub leased: u32,
    /// Workers the agent should run now (its cores permitting): those of its leased tasks
    /// and what the autoscaler wants for its queue.
    pub wanted_workers: u32,
    /// Datasets a task elsewhere asked for: the agent sends their uplink copies.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub uploads: Vec<String>,
    /// Announced datasets the server did not take, and why.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub refused_datasets: Vec<String>,
}

/// The answer to a drain.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct DrainResult {
    pub region: String,
    /// Queued tasks taken off the region now (they are placed elsewhere).
    pub evicted: u32,
    /// Tasks still running there; the drain is complete when none remain.
    pub running: u32,
}

/// Bounds of what an agent reports (the OpenAPI document states them too).
const MAX_AGENT_WORKERS: u32 = 65_536;
const MAX_MEMORY_MIB: u64 = 1 << 30;

fn invalid(kind: &str, name: &str, field: &str, message: &str) -> ApiError {
    ApiError::invalid(
        kind,
        name,
        &[ceccm_federation::Violation::new(field, message)],
    )
}

/// An agent joins `request.region`: the region is made if absent (an existing one must use the
/// agent driver), earlier agent tokens of the region are revoked, and a new one is minted.
pub async fn join(store: &Store, request: &JoinRequest) -> Result<JoinResponse, ApiError> {
    let region = request.region.as_str();
    if validate_name(region).is_err() {
        return Err(invalid(
            "Region",
            region,
            "region",
            "must be a DNS-1123 label",
        ));
    }
    if request.memory_mib > MAX_MEMORY_MIB {
        return Err(invalid(
            "Region",
            region,
            "memoryMiB",
            "must be at most 1073741824 (1 PiB)",
        ));
    }
    if request.agent.is_empty() || request.agent.len() > 253 {
        return Err(invalid(
            "Region",
            region,
            "agent",
            "must be 1 to 253 characters",
        ));
    }
    let created = match store.get(Kind::Region, region).await? {
        Some(existing) => {
            if existing["metadata"]["deletionTimestamp"].is_string() {
                return Err(ApiError::new(
                    ErrorCode::Conflict,
                    format!("region {region:?} is being deleted"),
                ));
            }
            if existing["spec"]["driver"] != "agent" {
                return Err(ApiError::new(
                    ErrorCode::Conflict,
                    format!(
                        "region {region:?} is run by the {} driver, not by an agent",
                        existing["spec"]["driver"].as_str().unwrap_or("?")
                    ),
                ));
            }
            false
        }
        None => {
            let document = json!({
                "apiVersion": crate::resources::API_VERSION,
                "kind": "Region",
                "metadata": {"name": region, "labels": {"ceccm/registered-by": "agent"}},
                "spec": {
                    "tier": request.tier.unwrap_or(Tier::Edge),
                    "location": request.location,
                    "driver": DriverKind::Agent,
                    "capacity": {"cpu": request.cpu, "memoryMiB": request.memory_mib},
                },
            });
            let mut submitted = parse_submitted(Kind::Region, document)?;
            submitted.metadata.owner = Some(agent_user(region));
            match objects::create(store, Kind::Region, submitted, false).await {
                Ok(_) => true,
                // Another agent of the same region joined meanwhile.
                Err(e) if e.code == ErrorCode::AlreadyExists => false,
                Err(e) => return Err(e),
            }
        }
    };
    let replaced = crate::tokens::revoke_agents_of(store, region).await?;
    let minted = crate::tokens::mint(
        store,
        &agent_user(region),
        Role::Agent,
        None,
        Some(region.into()),
    )
    .await?;
    if let Some(object) = store.get(Kind::Region, region).await? {
        let message = if replaced > 0 {
            format!(
                "agent {} joined, replacing the region's earlier agent",
                request.agent
            )
        } else {
            format!("agent {} joined", request.agent)
        };
        objects::record_event(store, &object, EventType::Normal, "AgentJoined", &message).await?;
    }
    Ok(JoinResponse {
        region: region.to_string(),
        user: agent_user(region),
        token: minted.token.unwrap_or_default(),
        created,
    })
}

/// The user an agent of `region` acts as.
pub fn agent_user(region: &str) -> String {
    format!("agent-{region}")
}

/// Records an agent's heartbeat in its region's status and answers with the workers wanted.
pub async fn heartbeat(
    store: &Store,
    predictor: &SharedPredictor,
    region: &str,
    report: &AgentReport,
) -> Result<AgentOrders, ApiError> {
    let bad = |field: &str, message: &str| invalid("Region", region, field, message);
    if report.agent.is_empty() || report.agent.len() > 253 {
        return Err(bad("agent", "must be 1 to 253 characters"));
    }
    if report.workers > MAX_AGENT_WORKERS {
        return Err(bad("workers", "must be at most 65536"));
    }
    crate::uplink::check_announcements(region, &report.datasets)?;
    if !(1..=4096).contains(&report.cpu) {
        return Err(bad("cpu", "must be 1 to 4096"));
    }
    if !report.cpu_seconds.is_finite() || report.cpu_seconds < 0.0 {
        return Err(bad("cpuSeconds", "must be a finite number >= 0"));
    }
    if report
        .measured_joules
        .is_some_and(|j| !j.is_finite() || j < 0.0)
    {
        return Err(bad("measuredJoules", "must be a finite number >= 0"));
    }
    let now_ms = crate::time::now_millis();
    let mut agent = AgentStatus {
        name: report.agent.clone(),
        heartbeat_time: crate::time::format_millis(now_ms),
        connected_since: None,
        cpu: report.cpu,
        workers: report.workers,
        cpu_seconds: report.cpu_seconds,
        measured_joules: report.measured_joules,
    };
    let written = store
        .write(
            Kind::Region,
            region,
            |current| -> Result<Change, ApiError> {
                let Some(mut object) = current else {
                    return Err(ApiError::not_found("Region", region));
                };
                let previous: Option<AgentStatus> =
                    serde_json::from_value(object["status"]["agent"].clone()).ok();
                let since = lifecycle::connected_since(previous.as_ref(), now_ms);
                agent.connected_since = Some(crate::time::format_millis(since));
                let agent_value = serde_json::to_value(&agent).unwrap_or_default();
                if object["spec"]["driver"] != "agent" {
                    return Err(ApiError::new(
                        ErrorCode::Conflict,
                        format!("region {region:?} is not run by an agent"),
                    ));
                }
                if !object["status"].is_object() {
                    object["status"] = json!({});
                }
                object["status"]["agent"] = agent_value;
                Ok(Change::Put(object))
            },
        )
        .await?;
    let object = written.object.unwrap_or(Value::Null);
    let capacity = object["spec"]["capacity"]["cpu"].as_u64().unwrap_or(1) as u32;
    let deleting = object["metadata"]["deletionTimestamp"].is_string();
    let tasks = region_tasks(store, region).await?;
    let region_object: RegionObject = typed(&object)?;
    let pool = pool_facts(store, &region_object, tasks.queued, report.workers).await?;
    let step = lifecycle::region_step(
        deleting,
        capacity.min(report.cpu),
        tasks,
        &pool,
        &*predictor.read(),
    );
    let wanted_workers = match step {
        RegionStep::Release => 0,
        RegionStep::Ensure { workers } => workers,
    };
    let (uploads, refused_datasets) =
        crate::uplink::take_announcements(store, region, &report.datasets).await?;
    Ok(AgentOrders {
        queued: tasks.queued,
        leased: tasks.leased,
        wanted_workers,
        uploads,
        refused_datasets,
    })
}

/// Cordons `region` and takes its queued tasks off it (they are placed elsewhere); running
/// ones finish there. Repeat until `running` is 0, as `kubectl drain` waits for its pods.
pub async fn drain(store: &Store, region: &str) -> Result<DrainResult, ApiError> {
    store
        .write(
            Kind::Region,
            region,
            |current| -> Result<Change, ApiError> {
                let Some(mut object) = current else {
                    return Err(ApiError::not_found("Region", region));
                };
                if object["spec"]["unschedulable"] == true {
                    return Ok(Change::Keep);
                }
                object["spec"]["unschedulable"] = json!(true);
                let generation = object["metadata"]["generation"].as_i64().unwrap_or(1);
                object["metadata"]["generation"] = json!(generation + 1);
                Ok(Change::Put(object))
            },
        )
        .await?;
    let evicted = evict_all(store, region, &format!("region {region} drained"), false).await?;
    let running = region_tasks(store, region).await?.leased;
    Ok(DrainResult {
        region: region.to_string(),
        evicted,
        running,
    })
}

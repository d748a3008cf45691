//! The one call site where an application's tasks are placed on regions: builds the
//! scheduler's snapshot of the regions and the application's task group, and calls
//! `ceccm_scheduler::place` (filter -> score -> select) with the analytic cost model.

use std::collections::BTreeMap;

use ceccm_federation::RegionSpec;
use ceccm_federation::region::Tier;
use ceccm_scheduler as sched;

use crate::resources::{ApplicationSpec, Objective, PlacementStatus};

/// Per-task features assumed for generic container work, which says nothing about its cost: one
/// reference chunk (100 MaNGA-like spectra against 150 templates, about 0.7 s of a core).
const GENERIC_TASK: sched::TaskFeatures = sched::TaskFeatures {
    spectra: 100,
    pixels: 4563,
    templates: 150,
    moments: 2,
};

/// A region as the controller sees it.
#[derive(Debug, Clone)]
pub struct RegionView {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub spec: RegionSpec,
    pub ready: bool,
    /// 0..1.
    pub load: f64,
}

/// Where an application's input lives and how big it is.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct InputView {
    pub bytes: u64,
    pub region: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Placement {
    pub placements: Vec<PlacementStatus>,
    /// The region of each task, by task index.
    pub assignment: Vec<String>,
    pub explanation: String,
}

/// Why no region can take the application: one reason per region.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unschedulable {
    pub reasons: Vec<String>,
}

fn tier(t: Tier) -> sched::Tier {
    match t {
        Tier::Edge => sched::Tier::Edge,
        Tier::Cloud => sched::Tier::Cloud,
        Tier::Hpc => sched::Tier::Hpc,
    }
}

fn taint_effect(effect: &str) -> Option<sched::TaintEffect> {
    match effect {
        "NoSchedule" => Some(sched::TaintEffect::NoSchedule),
        "PreferNoSchedule" => Some(sched::TaintEffect::PreferNoSchedule),
        "NoExecute" => Some(sched::TaintEffect::NoExecute),
        _ => None,
    }
}

fn snapshot(region: &RegionView) -> sched::RegionSnapshot {
    let spec = &region.spec;
    sched::RegionSnapshot {
        name: region.name.clone(),
        tier: tier(spec.tier),
        labels: region.labels.clone(),
        taints: spec
            .taints
            .iter()
            .filter_map(|t| {
                Some(sched::Taint {
                    key: t.key.clone(),
                    value: t.value.clone(),
                    effect: taint_effect(&t.effect)?,
                })
            })
            .collect(),
        ready: region.ready,
        capacity: sched::Resources::new(
            f64::from(spec.capacity.cpu),
            spec.capacity.memory_mib,
            u64::from(spec.capacity.gpu),
        ),
        // Work queues in the region rather than reserving it: nothing is held back.
        allocated: sched::Resources::default(),
        load: region.load.clamp(0.0, 1.0),
        energy: sched::EnergyProfile {
            idle_watts: spec.energy.idle_watts,
            watts_per_core: spec.energy.watts_per_core,
            pue: spec.energy.pue,
            carbon_intensity: sched::CarbonIntensity::Constant(spec.energy.carbon_intensity),
        },
        network: sched::Network {
            uplink_mbps: spec.network.uplink_mbps,
            rtt_ms: spec.network.rtt_ms,
        },
        cpu_speed: None,
        cpu_model: None,
    }
}

fn task_group(
    name: &str,
    app: &ApplicationSpec,
    tasks: usize,
    input: &InputView,
    now_ms: i64,
) -> sched::TaskGroup {
    let p = &app.placement;
    sched::TaskGroup {
        name: name.to_string(),
        tasks: tasks as u64,
        features: GENERIC_TASK,
        resources: sched::Resources::new(app.resources.cpu, app.resources.memory_mib, 0),
        input: sched::DataInput {
            bytes: input.bytes,
            region: input.region.clone(),
        },
        constraints: sched::Constraints {
            tiers: p.tiers.iter().map(|t| tier(*t)).collect(),
            regions: p.regions.clone(),
            region_selector: sched::LabelSelector {
                match_labels: p.region_selector.clone(),
                match_expressions: vec![],
            },
            tolerations: p
                .tolerations
                .iter()
                .map(|t| sched::Toleration {
                    key: t.key.clone(),
                    operator: if t.value.is_empty() {
                        sched::TolerationOperator::Exists
                    } else {
                        sched::TolerationOperator::Equal
                    },
                    value: t.value.clone(),
                    effect: taint_effect(&t.effect),
                })
                .collect(),
            data_locality: if p.data_locality {
                sched::DataLocality::Required
            } else {
                sched::DataLocality::Preferred
            },
        },
        objective: match app.objective {
            Objective::Energy => sched::Objective::Energy,
            Objective::Latency => sched::Objective::Latency,
            Objective::Balanced => sched::Objective::Balanced,
        },
        deadline_s: app
            .deadline
            .as_deref()
            .and_then(crate::time::parse_millis)
            .map(|d| ((d - now_ms) as f64 / 1000.0).max(0.0)),
        parallelism: app.parallelism.map(u64::from),
        start_s: now_ms as f64 / 1000.0,
    }
}

pub fn place(
    name: &str,
    app: &ApplicationSpec,
    tasks: usize,
    regions: &[RegionView],
    input: &InputView,
    now_ms: i64,
) -> Result<Placement, Unschedulable> {
    let snapshots: Vec<sched::RegionSnapshot> = regions.iter().map(snapshot).collect();
    let group = task_group(name, app, tasks, input, now_ms);
    let decided =
        sched::place(&snapshots, &group, &sched::AnalyticCostModel::default()).map_err(|e| {
            let mut reasons: Vec<String> = e.regions().iter().map(ToString::to_string).collect();
            if reasons.is_empty() {
                reasons.push(e.to_string());
            }
            Unschedulable { reasons }
        })?;
    let mut assignment = Vec::with_capacity(tasks);
    let mut placements = Vec::new();
    for a in &decided.assignments {
        assignment.extend(std::iter::repeat_n(a.region.clone(), a.tasks as usize));
        placements.push(PlacementStatus {
            region: a.region.clone(),
            tasks: a.tasks as u32,
            predicted_seconds: Some(a.predicted_seconds),
            predicted_joules: Some(a.predicted_joules),
        });
    }
    Ok(Placement {
        placements,
        assignment,
        explanation: decided.explanation.to_string().trim_end().to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ceccm_federation::region::{Capacity, DriverKind, Taint};

    fn region(name: &str, tier: Tier, cpu: u32, ready: bool) -> RegionView {
        RegionView {
            name: name.into(),
            labels: BTreeMap::new(),
            spec: RegionSpec {
                tier,
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
            },
            ready,
            load: 0.0,
        }
    }

    fn app(yaml: &str) -> ApplicationSpec {
        yaml_serde::from_str(yaml).unwrap()
    }

    #[test]
    fn every_task_gets_a_ready_region_and_the_decision_is_explained() {
        let spec = app("app: container\ntasks: [{command: 'true'}]\n");
        let regions = [
            region("edge", Tier::Edge, 2, true),
            region("cloud", Tier::Cloud, 2, true),
            region("down", Tier::Cloud, 8, false),
        ];
        let p = place("job", &spec, 10, &regions, &InputView::default(), 0).unwrap();
        assert_eq!(p.assignment.len(), 10);
        assert!(p.assignment.iter().all(|r| r != "down"));
        assert_eq!(p.placements.iter().map(|p| p.tasks).sum::<u32>(), 10);
        assert!(p.placements.iter().all(|p| p.predicted_seconds.is_some()));
        assert!(p.explanation.contains("down"), "{}", p.explanation);
    }

    #[test]
    fn constraints_exclude_regions_with_a_reason_each() {
        let mut tainted = region("tainted", Tier::Edge, 2, true);
        tainted.spec.taints.push(Taint {
            key: "telescope".into(),
            value: "observing".into(),
            effect: "NoSchedule".into(),
        });
        let regions = [tainted, region("cloud", Tier::Cloud, 2, true)];
        let spec = app("app: container\ntasks: [{command: 'true'}]\nplacement: {tiers: [edge]}\n");
        let err = place("job", &spec, 3, &regions, &InputView::default(), 0).unwrap_err();
        assert_eq!(err.reasons.len(), 2);
        assert!(
            err.reasons[0].starts_with("tainted") && err.reasons[0].contains("taint"),
            "{:?}",
            err.reasons
        );
        assert!(
            err.reasons[1].starts_with("cloud") && err.reasons[1].contains("tier"),
            "{:?}",
            err.reasons
        );
        let tolerant = app(
            "app: container\ntasks: [{command: 'true'}]\nplacement: {tiers: [edge], tolerations: [{key: telescope}]}\n",
        );
        let p = place("job", &tolerant, 3, &regions, &InputView::default(), 0).unwrap();
        assert_eq!(p.assignment, ["tainted", "tainted", "tainted"]);
    }
}

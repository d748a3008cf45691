//! The one call site where an application's tasks are placed on regions: builds the
//! scheduler's snapshot of the regions and the application's task group, and calls
//! `ceccm_scheduler::place` (filter -> score -> select) with the cost model it is given (the
//! controller's learned predictor, which answers with the analytic prior until trained). The
//! same snapshot and task group describe a finished task's telemetry sample, so the predictor
//! learns from exactly what it is later asked about.

use std::collections::BTreeMap;

use ceccm_federation::RegionSpec;
use ceccm_federation::region::Tier;
use ceccm_scheduler as sched;

use crate::resources::{ApplicationSpec, Objective, PlacementStatus, RegionObject};

/// Per-task features assumed for generic container work, which says nothing about its cost: one
/// reference chunk (100 MaNGA-like spectra against 150 templates, about 0.7 s of a core).
const GENERIC_TASK: sched::TaskFeatures = sched::TaskFeatures {
    spectra: 100,
    pixels: 4563,
    templates: 150,
    moments: 2,
};

/// Where an application declares what one of its tasks computes, in `spec.parameters`:
/// `{spectra, pixels, templates, moments}` per task (astro-fit chunks know them).
pub const TASK_FEATURES_PARAMETER: &str = "taskFeatures";
/// Region label naming its CPU model. Without it the region's name stands for its hardware, so
/// the predictor still learns each region's own speed from its telemetry.
pub const CPU_MODEL_LABEL: &str = "ceccm/cpu-model";
/// Region label with its core speed relative to the reference core (e.g. `"1.3"`).
pub const CPU_SPEED_LABEL: &str = "ceccm/cpu-speed";

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

impl RegionView {
    pub fn of(region: RegionObject) -> Self {
        let status = region.status.unwrap_or_default();
        RegionView {
            ready: status.phase.as_deref() == Some("Ready")
                && region.metadata.deletion_timestamp.is_none(),
            load: status.load,
            name: region.metadata.name,
            labels: region.metadata.labels,
            spec: region.spec,
        }
    }
}

/// The per-task features `spec.parameters.taskFeatures` declares; `Ok(None)` when absent.
pub fn declared_features(app: &ApplicationSpec) -> Result<Option<sched::TaskFeatures>, String> {
    let Some(value) = app
        .parameters
        .as_ref()
        .and_then(|p| p.get(TASK_FEATURES_PARAMETER))
    else {
        return Ok(None);
    };
    let features: sched::TaskFeatures = serde_json::from_value(value.clone()).map_err(|e| {
        format!("{e} (expected {{spectra, pixels, templates, moments}}, whole numbers)")
    })?;
    if features.spectra == 0 || features.pixels == 0 || features.templates == 0 {
        return Err("spectra, pixels and templates must be at least 1".into());
    }
    Ok(Some(features))
}

fn task_features(app: &ApplicationSpec) -> sched::TaskFeatures {
    // Validation rejects malformed declarations; anything else is generic work.
    declared_features(app)
        .ok()
        .flatten()
        .unwrap_or(GENERIC_TASK)
}

/// A cost model that can say what it is, for the placement's explanation.
pub trait Pricing: sched::CostModel {
    /// Completes "priced by ...".
    fn pricing(&self) -> String;
}

impl Pricing for sched::AnalyticCostModel {
    fn pricing(&self) -> String {
        "the analytic prior".into()
    }
}

impl Pricing for sched::Predictor {
    fn pricing(&self) -> String {
        let report = self.report();
        match (&report.runtime, self.trained()) {
            (Some(runtime), true) => format!(
                "the learned model {} (held-out run-time MAPE {:.1}% over {} tasks{}; trained \
                 on {} samples)",
                runtime.model,
                100.0 * runtime.holdout_mape,
                runtime.holdout_samples,
                report
                    .prior_holdout_mape
                    .map(|m| format!(", prior {:.1}%", 100.0 * m))
                    .unwrap_or_default(),
                runtime.trained_on,
            ),
            _ => format!(
                "the analytic prior ({} of {} telemetry samples needed to learn)",
                report.samples,
                self.config().min_samples
            ),
        }
    }
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

/// The region as the scheduler and the predictor see it.
pub fn snapshot(region: &RegionView) -> sched::RegionSnapshot {
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
            // A cordoned region is tainted as Kubernetes taints a cordoned node, so the
            // explanation names why it was passed over.
            .chain(spec.unschedulable.then(|| sched::Taint {
                key: crate::resources::UNSCHEDULABLE_TAINT.into(),
                value: String::new(),
                effect: sched::TaintEffect::NoSchedule,
            }))
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
        cpu_speed: region
            .labels
            .get(CPU_SPEED_LABEL)
            .and_then(|s| s.parse::<f64>().ok())
            .filter(|s| s.is_finite() && *s > 0.0),
        cpu_model: Some(
            region
                .labels
                .get(CPU_MODEL_LABEL)
                .unwrap_or(&region.name)
                .clone(),
        ),
    }
}

fn task_group(
    name: &str,
    app: &ApplicationSpec,
    features: Option<sched::TaskFeatures>,
    tasks: usize,
    input: &InputView,
    now_ms: i64,
) -> sched::TaskGroup {
    let p = &app.placement;
    sched::TaskGroup {
        name: name.to_string(),
        tasks: tasks as u64,
        features: features.unwrap_or_else(|| task_features(app)),
        // A local worker runs one task per core slot: no request means one core.
        resources: sched::Resources::new(
            if app.resources.cpu > 0.0 {
                app.resources.cpu
            } else {
                1.0
            },
            app.resources.memory_mib,
            0,
        ),
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
                    operator: match t.operator.as_deref() {
                        Some("Exists") => sched::TolerationOperator::Exists,
                        Some(_) => sched::TolerationOperator::Equal,
                        None if t.value.is_empty() => sched::TolerationOperator::Exists,
                        None => sched::TolerationOperator::Equal,
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

/// One queued task of `app` as the autoscaler prices it (the same task group its telemetry
/// sample would describe), `cores` wide.
pub fn queued_task_group(
    app: &ApplicationSpec,
    features: Option<sched::TaskFeatures>,
    cores: f64,
) -> sched::TaskGroup {
    let mut group = task_group("", app, features, 1, &InputView::default(), 0);
    group.resources.cpu_millis = sched::Resources::new(cores.max(1.0), 0, 0).cpu_millis;
    group
}

/// The telemetry sample of one finished task of `app` that ran `seconds` on `region` (as the
/// controller saw the region when the task finished).
pub fn telemetry_sample(
    region: &RegionView,
    app: &ApplicationSpec,
    features: Option<sched::TaskFeatures>,
    seconds: f64,
    joules: Option<f64>,
) -> sched::TelemetrySample {
    let group = task_group("", app, features, 1, &InputView::default(), 0);
    sched::TelemetrySample::new(&snapshot(region), &group, seconds, joules)
}

/// Places `tasks` tasks of `app` on `regions`, costed by `model`; the explanation ends with
/// which model priced it. `features` describes one task when the planner knows it (astro-fit
/// chunks); otherwise the application's declaration or a reference chunk.
#[allow(clippy::too_many_arguments)]
pub fn place<M: Pricing + ?Sized>(
    name: &str,
    app: &ApplicationSpec,
    features: Option<sched::TaskFeatures>,
    tasks: usize,
    regions: &[RegionView],
    input: &InputView,
    now_ms: i64,
    model: &M,
) -> Result<Placement, Unschedulable> {
    let snapshots: Vec<sched::RegionSnapshot> = regions.iter().map(snapshot).collect();
    let group = task_group(name, app, features, tasks, input, now_ms);
    let decided = sched::place(&snapshots, &group, &model).map_err(|e| {
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
        explanation: format!(
            "{}\npriced by {}",
            decided.explanation.to_string().trim_end(),
            model.pricing()
        ),
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
                unschedulable: false,
                runtime: Default::default(),
            },
            ready,
            load: 0.0,
        }
    }

    const PRIOR: sched::AnalyticCostModel = sched::AnalyticCostModel {
        seconds_per_spectrum: sched::analytic::REFERENCE_SECONDS_PER_SPECTRUM,
        transfer_joules_per_byte: sched::placement::DEFAULT_TRANSFER_JOULES_PER_BYTE,
    };

    fn app(yaml: &str) -> ApplicationSpec {
        yaml_serde::from_str(yaml).unwrap()
    }

    #[test]
    fn declared_task_features_price_the_work_and_malformed_ones_are_reported() {
        let generic = app("app: container\ntasks: [{command: 'true'}]\n");
        let big = app(
            "app: container\ntasks: [{command: 'true'}]\nparameters: {taskFeatures: {spectra: 1000, pixels: 4563, templates: 150, moments: 2}}\n",
        );
        assert_eq!(declared_features(&generic), Ok(None));
        assert_eq!(declared_features(&big).unwrap().unwrap().spectra, 1000);
        let regions = [region("cloud", Tier::Cloud, 2, true)];
        let seconds = |spec: &ApplicationSpec| {
            place(
                "job",
                spec,
                None,
                1,
                &regions,
                &InputView::default(),
                0,
                &PRIOR,
            )
            .unwrap()
            .placements[0]
                .predicted_seconds
                .unwrap()
        };
        let ratio = seconds(&big) / seconds(&generic);
        assert!((ratio - 10.0).abs() < 1e-6, "{ratio}");
        for bad in [
            "{spectra: 0, pixels: 1, templates: 1, moments: 2}",
            "{spectra: -3, pixels: 1, templates: 1, moments: 2}",
            "{spectra: 1}",
        ] {
            let spec = app(&format!(
                "app: container\ntasks: [{{command: 'true'}}]\nparameters: {{taskFeatures: {bad}}}\n"
            ));
            assert!(declared_features(&spec).is_err(), "{bad}");
        }
    }

    #[test]
    fn region_labels_declare_cpu_model_and_speed_and_the_name_stands_in_for_the_model() {
        let mut labelled = region("hpc", Tier::Hpc, 4, true);
        labelled
            .labels
            .insert(CPU_MODEL_LABEL.into(), "xeon-8480".into());
        labelled.labels.insert(CPU_SPEED_LABEL.into(), "2".into());
        let s = snapshot(&labelled);
        assert_eq!(s.cpu_model.as_deref(), Some("xeon-8480"));
        assert_eq!(s.cpu_speed, Some(2.0));
        labelled.labels.insert(CPU_SPEED_LABEL.into(), "-1".into());
        assert_eq!(snapshot(&labelled).cpu_speed, None);
        let plain = snapshot(&region("edge", Tier::Edge, 2, true));
        assert_eq!(plain.cpu_model.as_deref(), Some("edge"));
        assert_eq!(plain.cpu_speed, None);
    }

    #[test]
    fn the_explanation_names_the_model_that_priced_it() {
        let spec = app("app: container\ntasks: [{command: 'true'}]\n");
        let regions = [region("cloud", Tier::Cloud, 2, true)];
        let p = place(
            "job",
            &spec,
            None,
            1,
            &regions,
            &InputView::default(),
            0,
            &PRIOR,
        )
        .unwrap();
        assert!(
            p.explanation.ends_with("priced by the analytic prior"),
            "{}",
            p.explanation
        );
        let predictor = sched::Predictor::new(PRIOR, sched::PredictorConfig::default());
        let p = place(
            "job",
            &spec,
            None,
            1,
            &regions,
            &InputView::default(),
            0,
            &predictor,
        )
        .unwrap();
        assert!(
            p.explanation.ends_with(
                "priced by the analytic prior (0 of 60 telemetry samples needed to learn)"
            ),
            "{}",
            p.explanation
        );
    }

    #[test]
    fn every_task_gets_a_ready_region_and_the_decision_is_explained() {
        let spec = app("app: container\ntasks: [{command: 'true'}]\n");
        let regions = [
            region("edge", Tier::Edge, 2, true),
            region("cloud", Tier::Cloud, 2, true),
            region("down", Tier::Cloud, 8, false),
        ];
        let p = place(
            "job",
            &spec,
            None,
            10,
            &regions,
            &InputView::default(),
            0,
            &PRIOR,
        )
        .unwrap();
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
        let err = place(
            "job",
            &spec,
            None,
            3,
            &regions,
            &InputView::default(),
            0,
            &PRIOR,
        )
        .unwrap_err();
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
        let p = place(
            "job",
            &tolerant,
            None,
            3,
            &regions,
            &InputView::default(),
            0,
            &PRIOR,
        )
        .unwrap();
        assert_eq!(p.assignment, ["tainted", "tainted", "tainted"]);
    }
}

//! Property tests of `place`: capacity is never exceeded, constraints always hold, every region
//! filtered out really is infeasible, and the result is a function of the snapshot.

use std::collections::BTreeMap;

use ceccm_scheduler::{
    AnalyticCostModel, CarbonIntensity, Constraints, DataInput, DataLocality, EnergyProfile,
    LabelRequirement, LabelSelector, Network, Objective, RegionSnapshot, Resources,
    SelectorOperator, Taint, TaintEffect, TaskFeatures, TaskGroup, Tier, Toleration,
    TolerationOperator, Unschedulable, Verdict, place,
};
use proptest::prelude::*;

const SITES: [&str; 3] = ["orm", "caha", "paranal"];

fn tier() -> impl Strategy<Value = Tier> {
    prop_oneof![Just(Tier::Edge), Just(Tier::Cloud), Just(Tier::Hpc)]
}

fn effect() -> impl Strategy<Value = TaintEffect> {
    prop_oneof![
        Just(TaintEffect::NoSchedule),
        Just(TaintEffect::PreferNoSchedule),
        Just(TaintEffect::NoExecute)
    ]
}

fn taint() -> impl Strategy<Value = Taint> {
    (
        prop::sample::select(vec!["gpu", "maintenance"]),
        prop::sample::select(vec!["", "yes"]),
        effect(),
    )
        .prop_map(|(k, v, effect)| Taint {
            key: k.into(),
            value: v.into(),
            effect,
        })
}

fn region(index: usize) -> impl Strategy<Value = RegionSnapshot> {
    (
        tier(),
        prop::option::of(prop::sample::select(SITES.to_vec())),
        prop::collection::vec(taint(), 0..2),
        prop::bool::weighted(0.9),
        (1u64..64_000, 0u64..64_000, 0u64..4),
        (0.0f64..1.0, 0.0f64..1.0),
        (0.0f64..500.0, 0.5f64..20.0, 1.0f64..2.0, 0.0f64..800.0),
        (1.0f64..10_000.0, 0.0f64..200.0, 0.3f64..3.0),
    )
        .prop_map(
            move |(
                tier,
                site,
                taints,
                ready,
                (cpu, mem, gpu),
                (cpu_used, mem_used),
                energy,
                net,
            )| {
                let (idle_watts, watts_per_core, pue, carbon) = energy;
                let capacity = Resources {
                    cpu_millis: cpu,
                    memory_mib: mem,
                    gpu,
                };
                let mut r = RegionSnapshot::new(
                    format!("region-{index}"),
                    tier,
                    capacity,
                    EnergyProfile {
                        idle_watts,
                        watts_per_core,
                        pue,
                        carbon_intensity: CarbonIntensity::Constant(carbon),
                    },
                    Network {
                        uplink_mbps: net.0,
                        rtt_ms: net.1,
                    },
                );
                r.allocated = Resources {
                    cpu_millis: (cpu as f64 * cpu_used) as u64,
                    memory_mib: (mem as f64 * mem_used) as u64,
                    gpu: 0,
                };
                if let Some(site) = site {
                    r.labels.insert("site".into(), site.into());
                }
                r.taints = taints;
                r.ready = ready;
                r.cpu_speed = Some(net.2);
                r
            },
        )
}

fn regions() -> impl Strategy<Value = Vec<RegionSnapshot>> {
    (1usize..12).prop_flat_map(|n| (0..n).map(region).collect::<Vec<_>>())
}

fn constraints(region_count: usize) -> impl Strategy<Value = Constraints> {
    (
        prop::collection::vec(tier(), 0..3),
        prop::collection::vec(
            (0..region_count.max(1)).prop_map(|i| format!("region-{i}")),
            0..3,
        ),
        prop::option::of((
            prop::sample::select(vec![
                SelectorOperator::In,
                SelectorOperator::NotIn,
                SelectorOperator::Exists,
                SelectorOperator::DoesNotExist,
            ]),
            prop::collection::vec(prop::sample::select(SITES.to_vec()), 1..3),
        )),
        prop::option::of(prop::sample::select(SITES.to_vec())),
        prop::collection::vec(
            (
                prop::sample::select(vec!["", "gpu", "maintenance"]),
                prop::bool::ANY,
                prop::option::of(effect()),
            ),
            0..2,
        ),
        prop::bool::weighted(0.2),
    )
        .prop_map(
            |(tiers, regions, expression, match_label, tolerations, required)| {
                let mut region_selector = LabelSelector::default();
                if let Some((operator, values)) = expression {
                    region_selector.match_expressions.push(LabelRequirement {
                        key: "site".into(),
                        operator,
                        values: values.into_iter().map(String::from).collect(),
                    });
                }
                if let Some(site) = match_label {
                    region_selector.match_labels =
                        BTreeMap::from([("site".to_string(), site.to_string())]);
                }
                Constraints {
                    tiers,
                    regions,
                    region_selector,
                    tolerations: tolerations
                        .into_iter()
                        .map(|(key, exists, effect)| Toleration {
                            key: key.into(),
                            operator: if exists {
                                TolerationOperator::Exists
                            } else {
                                TolerationOperator::Equal
                            },
                            value: "yes".into(),
                            effect,
                        })
                        .collect(),
                    data_locality: if required {
                        DataLocality::Required
                    } else {
                        DataLocality::Preferred
                    },
                }
            },
        )
}

fn objective() -> impl Strategy<Value = Objective> {
    prop_oneof![
        Just(Objective::Energy),
        Just(Objective::Latency),
        Just(Objective::Balanced)
    ]
}

fn group(region_count: usize) -> impl Strategy<Value = TaskGroup> {
    (
        0u64..300,
        (1u64..5000, 500u64..6000, 1u64..300),
        (0u64..8000, 0u64..16_000, 0u64..2),
        (0u64..10_000_000_000, prop::option::of(0..region_count + 1)),
        constraints(region_count),
        objective(),
        prop::option::of(1.0f64..5000.0),
        prop::option::of(1u64..50),
        0.0f64..200_000.0,
    )
        .prop_map(
            move |(
                tasks,
                (spectra, pixels, templates),
                (cpu, mem, gpu),
                (bytes, at),
                constraints,
                objective,
                deadline_s,
                parallelism,
                start_s,
            )| {
                TaskGroup {
                    name: "group".into(),
                    tasks,
                    features: TaskFeatures {
                        spectra,
                        pixels,
                        templates,
                        moments: 2,
                    },
                    resources: Resources {
                        cpu_millis: cpu,
                        memory_mib: mem,
                        gpu,
                    },
                    // Index region_count names a region outside the snapshot.
                    input: DataInput {
                        bytes,
                        region: at.map(|i| format!("region-{i}")),
                    },
                    constraints,
                    objective,
                    deadline_s,
                    parallelism,
                    start_s,
                }
            },
        )
}

fn case() -> impl Strategy<Value = (Vec<RegionSnapshot>, TaskGroup)> {
    regions().prop_flat_map(|regions| {
        let n = regions.len();
        (Just(regions), group(n))
    })
}

/// Written independently of the scheduler: can `region` take one task of `group`?
fn feasible(region: &RegionSnapshot, group: &TaskGroup) -> bool {
    let c = &group.constraints;
    let holds_data = group.input.bytes == 0
        || group
            .input
            .region
            .as_ref()
            .is_none_or(|name| *name == region.name);
    let free = region.capacity.saturating_sub(&region.allocated);
    region.ready
        && (c.tiers.is_empty() || c.tiers.contains(&region.tier))
        && (c.regions.is_empty() || c.regions.contains(&region.name))
        && c.region_selector
            .match_labels
            .iter()
            .all(|(k, v)| region.labels.get(k) == Some(v))
        && c.region_selector
            .match_expressions
            .iter()
            .all(|r| r.matches(&region.labels))
        && region.taints.iter().all(|t| {
            t.effect == TaintEffect::PreferNoSchedule
                || c.tolerations.iter().any(|tol| tol.tolerates(t))
        })
        && (c.data_locality == DataLocality::Preferred || holds_data)
        && group.resources.fits_in(&free)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    #[test]
    fn placement_respects_capacity_and_constraints((regions, group) in case()) {
        let model = AnalyticCostModel::default();
        match place(&regions, &group, &model) {
            Ok(p) => {
                prop_assert_eq!(p.assignments.iter().map(|a| a.tasks).sum::<u64>(), group.tasks);
                let replicas: u64 = p.assignments.iter().map(|a| a.replicas).sum();
                prop_assert!(replicas <= group.parallelism.unwrap_or(u64::MAX));
                for a in &p.assignments {
                    let region = &regions[a.region_index];
                    prop_assert_eq!(&region.name, &a.region);
                    prop_assert!(a.tasks > 0 && a.replicas >= 1 && a.replicas <= a.tasks);
                    let free = region.capacity.saturating_sub(&region.allocated);
                    prop_assert!(group.resources.times(a.replicas).fits_in(&free), "over capacity: {:?}", a);
                    prop_assert!(feasible(region, &group), "constraint violated on {}", region.name);
                    prop_assert!(a.predicted_seconds <= p.predicted_seconds);
                }
                if let (Some(true), Some(d)) = (p.deadline_met, group.deadline_s) {
                    prop_assert!(p.predicted_seconds <= d);
                }
                prop_assert_eq!(p.explanation.regions.len(), regions.len());
                for (region, line) in regions.iter().zip(&p.explanation.regions) {
                    prop_assert_eq!(&region.name, &line.region);
                    let scored = matches!(line.verdict, Verdict::Scored(_));
                    prop_assert_eq!(scored, feasible(region, &group), "{}", line);
                }
            }
            Err(Unschedulable::NoFeasibleRegion { regions: lines, .. }) => {
                prop_assert!(group.tasks > 0);
                prop_assert_eq!(lines.len(), regions.len());
                for (region, line) in regions.iter().zip(&lines) {
                    prop_assert!(!feasible(region, &group), "{} was feasible", region.name);
                    let Verdict::Filtered(reasons) = &line.verdict else { panic!("scored line in an error") };
                    prop_assert!(!reasons.is_empty());
                }
            }
            Err(e @ Unschedulable::InvalidGroup { .. }) => prop_assert!(false, "generated groups are valid: {}", e),
        }
    }

    #[test]
    fn placement_is_deterministic((regions, group) in case()) {
        let model = AnalyticCostModel::default();
        let first = place(&regions, &group, &model);
        let again = place(&regions.clone(), &group.clone(), &model);
        prop_assert_eq!(first, again);
    }
}

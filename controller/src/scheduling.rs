//! The one call site where an application's tasks are placed on regions.
//!
//! Until `ceccm-scheduler`'s placement lands, this holds only the feasibility check needed to
//! run work at all (ready regions matching `placement.regions`, `placement.tiers`,
//! `regionSelector` and taints) and splits tasks over the feasible regions in proportion to their
//! CPU capacity. Scoring by predicted time and energy is the scheduler's job.

use std::collections::BTreeMap;

use ceccm_federation::RegionSpec;

use crate::resources::{ApplicationSpec, PlacementStatus};

/// A region as the scheduler sees it.
#[derive(Debug, Clone)]
pub struct RegionView {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub spec: RegionSpec,
    pub ready: bool,
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

/// Why `region` cannot run `app`, or `None` if it can.
fn infeasibility(app: &ApplicationSpec, region: &RegionView) -> Option<String> {
    let p = &app.placement;
    let name = &region.name;
    if !p.regions.is_empty() && !p.regions.contains(name) {
        return Some(format!("{name}: not in placement.regions"));
    }
    if !p.tiers.is_empty() && !p.tiers.contains(&region.spec.tier) {
        return Some(format!(
            "{name}: tier {} not in placement.tiers",
            region.spec.tier.as_str()
        ));
    }
    if let Some((k, v)) = p
        .region_selector
        .iter()
        .find(|(k, v)| region.labels.get(*k) != Some(*v))
    {
        return Some(format!("{name}: label {k}={v} not matched"));
    }
    if let Some(taint) = region.spec.taints.iter().find(|t| {
        t.effect == "NoSchedule"
            && !p
                .tolerations
                .iter()
                .any(|tol| tol.key == t.key && (tol.value.is_empty() || tol.value == t.value))
    }) {
        return Some(format!(
            "{name}: taint {}={} not tolerated",
            taint.key, taint.value
        ));
    }
    if !region.ready {
        return Some(format!("{name}: not ready"));
    }
    None
}

pub fn place(
    app: &ApplicationSpec,
    tasks: usize,
    regions: &[RegionView],
) -> Result<Placement, Unschedulable> {
    let (feasible, reasons): (Vec<&RegionView>, Vec<String>) =
        regions
            .iter()
            .fold((Vec::new(), Vec::new()), |(mut ok, mut why), r| {
                match infeasibility(app, r) {
                    None => ok.push(r),
                    Some(reason) => why.push(reason),
                }
                (ok, why)
            });
    if feasible.is_empty() {
        let reasons = if reasons.is_empty() {
            vec!["no regions are declared".to_string()]
        } else {
            reasons
        };
        return Err(Unschedulable { reasons });
    }
    let shares = proportional_split(
        tasks,
        &feasible
            .iter()
            .map(|r| r.spec.capacity.cpu)
            .collect::<Vec<_>>(),
    );
    let mut assignment = Vec::with_capacity(tasks);
    let mut placements = Vec::new();
    for (region, share) in feasible.iter().zip(&shares) {
        assignment.extend(std::iter::repeat_n(region.name.clone(), *share));
        if *share > 0 {
            placements.push(PlacementStatus {
                region: region.name.clone(),
                tasks: *share as u32,
                predicted_seconds: None,
                predicted_joules: None,
            });
        }
    }
    let names: Vec<&str> = feasible.iter().map(|r| r.name.as_str()).collect();
    let mut explanation = format!(
        "feasible regions: {}; tasks split in proportion to CPU capacity",
        names.join(", ")
    );
    if !reasons.is_empty() {
        explanation.push_str(&format!("; excluded: {}", reasons.join("; ")));
    }
    Ok(Placement {
        placements,
        assignment,
        explanation,
    })
}

/// Splits `n` by `weights` (largest remainder), so the parts sum to `n`.
fn proportional_split(n: usize, weights: &[u32]) -> Vec<usize> {
    let total: u64 = weights.iter().map(|&w| u64::from(w)).sum();
    if total == 0 {
        return vec![0; weights.len()];
    }
    let mut parts: Vec<usize> = weights
        .iter()
        .map(|&w| (n as u64 * u64::from(w) / total) as usize)
        .collect();
    let mut order: Vec<usize> = (0..weights.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(n as u64 * u64::from(weights[i]) % total));
    let missing = n - parts.iter().sum::<usize>();
    for &i in order.iter().take(missing) {
        parts[i] += 1;
    }
    parts
}

#[cfg(test)]
mod tests {
    use super::*;
    use ceccm_federation::region::{Capacity, DriverKind, Taint, Tier};

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
        }
    }

    fn app(yaml: &str) -> ApplicationSpec {
        yaml_serde::from_str(yaml).unwrap()
    }

    #[test]
    fn splits_over_feasible_regions_by_capacity() {
        let spec = app("app: container\ntasks: [{command: 'true'}]\n");
        let regions = [
            region("edge", Tier::Edge, 1, true),
            region("cloud", Tier::Cloud, 3, true),
            region("down", Tier::Cloud, 8, false),
        ];
        let p = place(&spec, 10, &regions).unwrap();
        let counts: Vec<(&str, u32)> = p
            .placements
            .iter()
            .map(|p| (p.region.as_str(), p.tasks))
            .collect();
        assert_eq!(counts, [("edge", 3), ("cloud", 7)]);
        assert_eq!(p.assignment.len(), 10);
        assert!(p.explanation.contains("down: not ready"));
    }

    #[test]
    fn constraints_exclude_regions_with_reasons() {
        let mut tainted = region("tainted", Tier::Edge, 2, true);
        tainted.spec.taints.push(Taint {
            key: "telescope".into(),
            value: "observing".into(),
            effect: "NoSchedule".into(),
        });
        let regions = [tainted, region("cloud", Tier::Cloud, 2, true)];
        let spec = app("app: container\ntasks: [{command: 'true'}]\nplacement: {tiers: [edge]}\n");
        let err = place(&spec, 3, &regions).unwrap_err();
        assert_eq!(
            err.reasons,
            [
                "tainted: taint telescope=observing not tolerated",
                "cloud: tier cloud not in placement.tiers"
            ]
        );
        let tolerant = app(
            "app: container\ntasks: [{command: 'true'}]\nplacement: {tiers: [edge], tolerations: [{key: telescope}]}\n",
        );
        assert_eq!(
            place(&tolerant, 3, &regions).unwrap().placements[0].tasks,
            3
        );
    }

    #[test]
    fn proportional_split_sums_to_n() {
        assert_eq!(proportional_split(50, &[2, 2]), [25, 25]);
        assert_eq!(proportional_split(5, &[1, 1, 1]).iter().sum::<usize>(), 5);
        assert_eq!(proportional_split(0, &[3]), [0]);
    }
}

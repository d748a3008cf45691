//! The seeded generator of survey-sized traces, and of large region sets for scale tests.
//!
//! Figures the reference trace rests on (per job kind):
//!
//! * **MaNGA**: a reprocessing campaign of 10,000 datacubes submitted over the first day. Each
//!   plate carries 17 IFUs (2 x 19, 4 x 37, 4 x 61, 2 x 91, 5 x 127 fibres); the spectra fitted per
//!   cube grow with the bundle, from about 700 to 4,300 (a few thousand on average), 4,563 pixels
//!   each. The LOGCUBE holds FLUX, IVAR and MASK (12 bytes a pixel) for about 1.6x the fitted
//!   spaxels. The cubes sit at the SDSS archive (`cloud-sas`).
//! * **MUSE**: 300 cubes of about 90,000 spectra (300 x 300 spaxels), 3,681 pixels, DATA and STAT
//!   (8 bytes a pixel, 2.6 GB a cube), at the ESO archive (`cloud-eso`), over two days.
//! * **MEGARA**: 1,720 fibre spectra per exposure, about 4,300 pixels, 30 exposures each night at
//!   the GTC (`edge-gtc`).
//! * **TARSIS**: each night ends with a burst of 60 cubes (assumed 4,000 spectra of 3,000 pixels)
//!   arriving at Calar Alto (`edge-caha`), wanted within half an hour.
//! * **Interactive**: 1,000 small fits (20 to 400 spectra, MILES 42 templates) during European
//!   working hours, wanted within a minute.

use std::collections::BTreeMap;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::model::{Constraints, Objective, Resources, Tier, Toleration, TolerationOperator};
use crate::sim::files::{Job, JobKind, RegionFile, TraceFile};

const HOUR: f64 = 3600.0;

/// How big a trace to generate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TraceSpec {
    pub seed: u64,
    /// Multiplies every job count (1.0: the reference trace).
    pub scale: f64,
}

fn kinds() -> BTreeMap<String, JobKind> {
    let batch = Constraints {
        // Survey reprocessing may use the HPC site's batch partition.
        tolerations: vec![Toleration {
            key: "hpc".into(),
            operator: TolerationOperator::Exists,
            ..Default::default()
        }],
        ..Default::default()
    };
    let kind = |pixels,
                templates,
                moments,
                cores,
                memory,
                objective,
                deadline: f64,
                constraints: &Constraints| JobKind {
        pixels,
        templates,
        moments,
        resources: Resources::new(cores, memory, 0),
        constraints: constraints.clone(),
        objective,
        deadline_s: Some(deadline),
    };
    let interactive = Constraints {
        tiers: vec![Tier::Edge, Tier::Cloud],
        ..Default::default()
    };
    BTreeMap::from([
        (
            "manga".into(),
            kind(
                4563,
                150,
                4,
                4.0,
                4096,
                Objective::Energy,
                24.0 * HOUR,
                &batch,
            ),
        ),
        (
            "muse".into(),
            kind(
                3681,
                150,
                4,
                8.0,
                16384,
                Objective::Balanced,
                12.0 * HOUR,
                &batch,
            ),
        ),
        (
            "megara".into(),
            kind(
                4300,
                150,
                2,
                2.0,
                2048,
                Objective::Balanced,
                HOUR,
                &Constraints::default(),
            ),
        ),
        (
            "tarsis".into(),
            kind(
                3000,
                150,
                2,
                4.0,
                4096,
                Objective::Latency,
                0.5 * HOUR,
                &Constraints::default(),
            ),
        ),
        (
            "interactive".into(),
            kind(
                4563,
                42,
                2,
                1.0,
                1024,
                Objective::Latency,
                60.0,
                &interactive,
            ),
        ),
    ])
}

fn count(n: f64, scale: f64) -> usize {
    (n * scale).round() as usize
}

/// Splits `spectra` into tasks of at most `chunk`: (tasks, spectra per task).
fn chunks(spectra: u64, chunk: u64) -> (u64, u64) {
    let tasks = spectra.div_ceil(chunk).max(1);
    (tasks, spectra.div_ceil(tasks))
}

/// The trace for `spec`: two days of the workloads described in the module documentation.
pub fn generate_trace(spec: TraceSpec, command: String) -> TraceFile {
    let mut rng = ChaCha8Rng::seed_from_u64(spec.seed);
    let mut jobs = Vec::new();
    let days = 2;

    // MaNGA: 17 IFUs per plate, fibres -> fitted spectra.
    const BUNDLES: [(u64, u64, u32); 5] = [
        (19, 700, 2),
        (37, 1300, 4),
        (61, 2100, 4),
        (91, 3100, 2),
        (127, 4300, 5),
    ];
    let manga = count(10_000.0, spec.scale);
    for i in 0..manga {
        let plate = 7443 + i / 17;
        let mut pick = rng.gen_range(0..17);
        let &(fibres, typical, _) = BUNDLES
            .iter()
            .find(|b| {
                let hit = pick < b.2;
                pick = pick.saturating_sub(b.2);
                hit
            })
            .expect("weights add up to 17");
        let spectra = (typical as f64 * rng.gen_range(0.85..1.15)) as u64;
        let (tasks, per_task) = chunks(spectra, 600);
        jobs.push(Job {
            kind: "manga".into(),
            name: format!("manga-{plate}-{fibres}{:02}", i % 17),
            at: rng.gen_range(0.0..24.0 * HOUR),
            tasks,
            spectra: per_task,
            bytes: (spectra as f64 * 1.6) as u64 * 4563 * 12,
            data: Some("cloud-sas".into()),
        });
    }
    // MUSE: large cubes at the ESO archive.
    for i in 0..count(300.0, spec.scale) {
        let spectra = (90_000.0 * rng.gen_range(0.9..1.1)) as u64;
        let (tasks, per_task) = chunks(spectra, 2000);
        jobs.push(Job {
            kind: "muse".into(),
            name: format!("muse-{i:05}"),
            at: rng.gen_range(0.0..days as f64 * 24.0 * HOUR),
            tasks,
            spectra: per_task,
            bytes: spectra * 3681 * 8,
            data: Some("cloud-eso".into()),
        });
    }
    for night in 0..days {
        let dusk = night as f64 * 24.0 * HOUR + 20.0 * HOUR;
        // MEGARA exposures through the night at La Palma.
        for i in 0..count(30.0, spec.scale) {
            jobs.push(Job {
                kind: "megara".into(),
                name: format!("megara-n{night}-{i:04}"),
                at: dusk + rng.gen_range(0.0..10.0 * HOUR),
                tasks: 2,
                spectra: 860,
                bytes: 1720 * 4300 * 8,
                data: Some("edge-gtc".into()),
            });
        }
        // TARSIS: the night's cubes arrive together at dawn.
        let dawn = dusk + 9.5 * HOUR;
        let mut at = dawn;
        for i in 0..count(60.0, spec.scale) {
            at += rng.gen_range(0.0..10.0);
            let spectra = (4000.0 * rng.gen_range(0.9..1.1)) as u64;
            let (tasks, per_task) = chunks(spectra, 1000);
            jobs.push(Job {
                kind: "tarsis".into(),
                name: format!("tarsis-n{night}-{i:04}"),
                at,
                tasks,
                spectra: per_task,
                bytes: spectra * 3000 * 8,
                data: Some("edge-caha".into()),
            });
        }
    }
    // Interactive fits during European working hours.
    for i in 0..count(1000.0, spec.scale) {
        let day = rng.gen_range(0..days) as f64;
        let spectra = rng.gen_range(20..=400);
        jobs.push(Job {
            kind: "interactive".into(),
            name: format!("fit-{i:05}"),
            at: day * 24.0 * HOUR + rng.gen_range(8.0 * HOUR..20.0 * HOUR),
            tasks: 1,
            spectra,
            bytes: spectra * 4563 * 12,
            data: None,
        });
    }
    jobs.sort_by(|a, b| a.at.total_cmp(&b.at).then(a.name.cmp(&b.name)));
    for job in &mut jobs {
        // Millisecond resolution keeps the file short.
        job.at = (job.at * 1000.0).round() / 1000.0;
    }
    TraceFile {
        seed: Some(spec.seed),
        command: Some(command),
        kinds: kinds(),
        jobs,
    }
}

/// `n` regions: copies of `reference` (the first copy keeps the names the trace refers to),
/// each with capacity and declared speed varied by up to 20 %.
pub fn scale_regions(reference: &RegionFile, n: usize, seed: u64) -> RegionFile {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let base = &reference.regions;
    let regions = (0..n)
        .map(|i| {
            let mut r = base[i % base.len()].clone();
            let copy = i / base.len();
            if copy > 0 {
                r.spec.name = format!("{}-{copy}", r.spec.name);
                let f = rng.gen_range(0.8..1.2);
                r.spec.capacity.cpu_millis =
                    ((r.spec.capacity.cpu_millis as f64 * f) as u64).max(1000);
                r.spec.cpu_speed = r.spec.cpu_speed.map(|s| s * rng.gen_range(0.9..1.1));
            }
            r
        })
        .collect();
    RegionFile {
        transfer_kwh_per_gb: reference.transfer_kwh_per_gb,
        regions,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_gives_the_same_trace() {
        let a = generate_trace(
            TraceSpec {
                seed: 7,
                scale: 0.05,
            },
            String::new(),
        );
        let b = generate_trace(
            TraceSpec {
                seed: 7,
                scale: 0.05,
            },
            String::new(),
        );
        let c = generate_trace(
            TraceSpec {
                seed: 8,
                scale: 0.05,
            },
            String::new(),
        );
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert!(a.jobs.windows(2).all(|w| w[0].at <= w[1].at));
    }

    #[test]
    fn the_reference_trace_has_survey_sized_workloads() {
        let t = generate_trace(
            TraceSpec {
                seed: 7,
                scale: 1.0,
            },
            String::new(),
        );
        let of = |kind: &str| t.jobs.iter().filter(|j| j.kind == kind).collect::<Vec<_>>();
        let manga = of("manga");
        assert_eq!(manga.len(), 10_000);
        let mean: f64 = manga
            .iter()
            .map(|j| (j.tasks * j.spectra) as f64)
            .sum::<f64>()
            / manga.len() as f64;
        assert!(
            (2000.0..3500.0).contains(&mean),
            "a few thousand spectra a cube, got {mean}"
        );
        let muse = of("muse");
        assert!(
            muse.iter()
                .all(|j| (80_000..=102_000).contains(&(j.tasks * j.spectra)))
        );
        assert!(of("megara").iter().all(|j| j.tasks * j.spectra == 1720));
        // TARSIS bursts come at dawn, at the edge.
        assert!(
            of("tarsis")
                .iter()
                .all(|j| j.data.as_deref() == Some("edge-caha"))
        );
        assert_eq!(of("interactive").len(), 1000);
    }
}

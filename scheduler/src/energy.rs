//! Energy and carbon: the region power model, and RAPL counters where the host has them.
//!
//! A task's energy is `cpu_seconds x (idle_watts / cores + watts_per_core) x PUE`: the busy cores'
//! extra draw plus their share of the region's idle draw, scaled by the site's overhead. Where the
//! host exposes Intel RAPL (`/sys/class/powercap/intel-rapl:*`), measured package energy replaces
//! the model ([`EnergyMeter::detect`]).

use std::fs;
use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::model::{EnergyProfile, RegionSnapshot};

/// Joules per kWh.
pub const JOULES_PER_KWH: f64 = 3.6e6;

/// Energy (J) of `cpu_seconds` of work on `region`, by the region's power model.
pub fn modelled_joules(region: &RegionSnapshot, cpu_seconds: f64) -> f64 {
    joules_per_cpu_second(&region.energy, region.capacity.cores()) * cpu_seconds
}

/// Watts x PUE that one busy core costs: its own draw plus its share of the idle draw.
pub fn joules_per_cpu_second(profile: &EnergyProfile, capacity_cores: f64) -> f64 {
    let idle_share = if capacity_cores > 0.0 {
        profile.idle_watts / capacity_cores
    } else {
        0.0
    };
    (idle_share + profile.watts_per_core) * profile.pue
}

/// Grams of CO2e for `joules` drawn on `region` during `[start_s, start_s + seconds]`.
pub fn carbon_grams(region: &RegionSnapshot, joules: f64, start_s: f64, seconds: f64) -> f64 {
    joules / JOULES_PER_KWH * region.energy.carbon_intensity.mean_over(start_s, seconds)
}

/// Where the powercap tree lives on Linux.
pub const POWERCAP_ROOT: &str = "/sys/class/powercap";

#[derive(Debug, Error)]
pub enum RaplError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} does not hold a counter: {text:?}")]
    Parse { path: PathBuf, text: String },
}

/// One RAPL package domain: a counter in microjoules that wraps at `max_range_uj`.
#[derive(Debug, Clone, PartialEq)]
struct RaplDomain {
    energy_path: PathBuf,
    max_range_uj: u64,
}

/// Reads the package-level RAPL counters (`intel-rapl:N`, not the `intel-rapl:N:M` sub-domains,
/// which the packages already include).
#[derive(Debug, Clone, PartialEq)]
pub struct RaplReader {
    domains: Vec<RaplDomain>,
}

/// Counter values at one instant, one per package.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RaplSample(Vec<u64>);

fn read_counter(path: &Path) -> Result<u64, RaplError> {
    let text = fs::read_to_string(path).map_err(|source| RaplError::Read {
        path: path.to_owned(),
        source,
    })?;
    text.trim().parse().map_err(|_| RaplError::Parse {
        path: path.to_owned(),
        text: text.trim().to_owned(),
    })
}

impl RaplReader {
    /// The package domains under `root` (normally [`POWERCAP_ROOT`]); `None` when there are
    /// none or their counters cannot be read (RAPL is often root-only).
    pub fn discover(root: &Path) -> Option<RaplReader> {
        let mut names: Vec<String> = fs::read_dir(root)
            .ok()?
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| {
                n.strip_prefix("intel-rapl:")
                    .is_some_and(|rest| !rest.contains(':'))
            })
            .collect();
        names.sort();
        let mut domains = Vec::new();
        for name in names {
            let dir = root.join(&name);
            let energy_path = dir.join("energy_uj");
            read_counter(&energy_path).ok()?;
            let max_range_uj = read_counter(&dir.join("max_energy_range_uj")).unwrap_or(u64::MAX);
            domains.push(RaplDomain {
                energy_path,
                max_range_uj,
            });
        }
        (!domains.is_empty()).then_some(RaplReader { domains })
    }

    pub fn sample(&self) -> Result<RaplSample, RaplError> {
        self.domains
            .iter()
            .map(|d| read_counter(&d.energy_path))
            .collect::<Result<_, _>>()
            .map(RaplSample)
    }

    /// Joules drawn by all packages between two samples, counting one wrap of each counter.
    pub fn joules_between(&self, before: &RaplSample, after: &RaplSample) -> f64 {
        let micro: u64 = self
            .domains
            .iter()
            .zip(before.0.iter().zip(&after.0))
            .map(|(d, (&b, &a))| {
                if a >= b {
                    a - b
                } else {
                    d.max_range_uj - b + a
                }
            })
            .sum();
        micro as f64 / 1e6
    }
}

/// How a worker measures the energy of a task it ran.
#[derive(Debug, Clone, PartialEq)]
pub enum EnergyMeter {
    Rapl(RaplReader),
    /// No readable RAPL: the region's power model.
    PowerModel,
}

impl EnergyMeter {
    /// RAPL under `root` when readable, otherwise the power model.
    pub fn detect(root: &Path) -> EnergyMeter {
        RaplReader::discover(root).map_or(EnergyMeter::PowerModel, EnergyMeter::Rapl)
    }

    pub fn is_measured(&self) -> bool {
        matches!(self, EnergyMeter::Rapl(_))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{CarbonIntensity, Network, Resources, Tier};

    fn write(dir: &Path, name: &str, text: &str) {
        fs::create_dir_all(dir).unwrap();
        fs::write(dir.join(name), text).unwrap();
    }

    #[test]
    fn rapl_reads_packages_and_handles_wrap() {
        let root = tempfile::tempdir().unwrap();
        let p0 = root.path().join("intel-rapl:0");
        let p1 = root.path().join("intel-rapl:1");
        write(&p0, "energy_uj", "1000000\n");
        write(&p0, "max_energy_range_uj", "262143328850\n");
        write(&p1, "energy_uj", "262143000000\n");
        write(&p1, "max_energy_range_uj", "262143328850\n");
        // A sub-domain (dram) is part of its package and must not be counted twice.
        write(&root.path().join("intel-rapl:0:0"), "energy_uj", "5\n");
        let meter = EnergyMeter::detect(root.path());
        let EnergyMeter::Rapl(reader) = meter else {
            panic!("RAPL not found: {meter:?}")
        };
        let before = reader.sample().unwrap();
        write(&p0, "energy_uj", "3500000\n"); // +2.5 J
        write(&p1, "energy_uj", "671150\n"); // wrapped: +328850 + 671150 uJ = 1 J
        let after = reader.sample().unwrap();
        assert!((reader.joules_between(&before, &after) - 3.5).abs() < 1e-9);
    }

    #[test]
    fn falls_back_to_the_power_model_without_rapl() {
        let root = tempfile::tempdir().unwrap();
        assert_eq!(EnergyMeter::detect(root.path()), EnergyMeter::PowerModel);
        assert_eq!(
            EnergyMeter::detect(&root.path().join("missing")),
            EnergyMeter::PowerModel
        );
        // A counter that is present but unreadable as a number is no meter either.
        write(&root.path().join("intel-rapl:0"), "energy_uj", "denied");
        assert_eq!(EnergyMeter::detect(root.path()), EnergyMeter::PowerModel);
    }

    #[test]
    fn power_model_counts_idle_share_busy_cores_and_pue() {
        let region = RegionSnapshot::new(
            "r",
            Tier::Cloud,
            Resources::new(10.0, 0, 0),
            EnergyProfile {
                idle_watts: 50.0,
                watts_per_core: 10.0,
                pue: 1.5,
                carbon_intensity: CarbonIntensity::Constant(400.0),
            },
            Network {
                uplink_mbps: 1000.0,
                rtt_ms: 1.0,
            },
        );
        // (50/10 + 10) W x 1.5 = 22.5 J per cpu-second.
        assert!((modelled_joules(&region, 2.0) - 45.0).abs() < 1e-12);
        // 3.6 MJ = 1 kWh at 400 g/kWh.
        assert!((carbon_grams(&region, 3.6e6, 0.0, 10.0) - 400.0).abs() < 1e-9);
    }
}

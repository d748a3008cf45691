//! The interface between the control plane and whatever runs a region's workers.

use crate::region::RegionSpec;

#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    #[error("driver {0:?} is not available in this control plane")]
    Unsupported(String),
    #[error("could not start a worker for region {region}: {source}")]
    Spawn {
        region: String,
        #[source]
        source: std::io::Error,
    },
}

/// What a driver saw of its region on one pass.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RegionObservation {
    /// False when the region cannot run work now; `message` says why.
    pub healthy: bool,
    pub message: String,
    /// Worker processes alive now.
    pub workers: u32,
    /// CPU time used by the region's workers and their tasks since the driver started.
    pub cpu_seconds: f64,
}

/// Runs a region's workers. Calls are idempotent: `ensure` converges the region towards
/// `wanted_workers` and reports what it saw; `release` stops everything the driver holds.
pub trait RegionDriver: Send + Sync {
    fn ensure(
        &self,
        region: &str,
        spec: &RegionSpec,
        wanted_workers: u32,
    ) -> Result<RegionObservation, DriverError>;

    fn release(&self, region: &str);

    /// Stops every region's workers (server shutdown).
    fn release_all(&self);
}

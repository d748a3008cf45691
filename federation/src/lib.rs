//! ceccm federation: the Region model, the drivers that run a region's workers, and the `local`
//! driver (worker processes on this host) that is the embedded default's compute.

pub mod driver;
pub mod local;
pub mod region;

pub use driver::{DriverError, RegionDriver, RegionObservation};
pub use region::{RegionSpec, RegionStatus, Violation};

#[cfg(test)]
mod tests_support {
    use std::time::{Duration, Instant};

    /// Polls `probe` every 20 ms until it returns `Some`, for at most 10 s.
    pub fn poll<T>(mut probe: impl FnMut() -> Option<T>) -> T {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(v) = probe() {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "condition not reached within 10 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

//! The controller's learned predictor: one `ceccm_scheduler::Predictor` shared by the task
//! queue, which feeds it each finished task's telemetry, and the application reconciler, which
//! prices placements with it. It is rebuilt from the store's telemetry at start-up, so a
//! restarted controller predicts as well as the one before it.

use std::sync::{Arc, RwLock, RwLockReadGuard};

use ceccm_scheduler::{AnalyticCostModel, Predictor, PredictorConfig, TelemetrySample};

use crate::store::{Store, StoreError};

#[derive(Clone)]
pub struct SharedPredictor(Arc<RwLock<Predictor>>);

impl Default for SharedPredictor {
    fn default() -> Self {
        SharedPredictor::new(PredictorConfig::default())
    }
}

impl SharedPredictor {
    /// A predictor with no telemetry: the analytic prior.
    pub fn new(config: PredictorConfig) -> Self {
        SharedPredictor(Arc::new(RwLock::new(Predictor::new(
            AnalyticCostModel::default(),
            config,
        ))))
    }

    /// A predictor trained on the newest samples the store holds (as many as its window keeps).
    pub async fn load(store: &Store, config: PredictorConfig) -> Result<Self, StoreError> {
        let (count, bodies) = store.telemetry(config.window as i64).await?;
        let mut samples = Vec::with_capacity(bodies.len());
        for body in &bodies {
            match serde_json::from_str::<TelemetrySample>(body) {
                Ok(sample) => samples.push(sample),
                // One unreadable row must not keep the controller from starting.
                Err(e) => tracing::warn!(error = %e, "skipping an unreadable telemetry sample"),
            }
        }
        let shared = SharedPredictor::new(config);
        // One training, before the server takes requests.
        shared.write().restore(count.max(0) as usize, samples);
        Ok(shared)
    }

    /// Learns from one finished task (retraining when the predictor's rule says so), off the
    /// async workers: a retraining takes milliseconds to tens of milliseconds.
    pub async fn observe(&self, sample: TelemetrySample) {
        let shared = self.clone();
        if let Err(e) = tokio::task::spawn_blocking(move || shared.write().observe(sample)).await {
            tracing::warn!(error = %e, "observing a telemetry sample failed");
        }
    }

    /// The predictor, for pricing a placement. Hold the guard only for the decision.
    pub fn read(&self) -> RwLockReadGuard<'_, Predictor> {
        // A panic while training leaves the previous model, which is still a valid one.
        self.0.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Predictor> {
        self.0.write().unwrap_or_else(|e| e.into_inner())
    }
}

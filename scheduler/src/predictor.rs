//! The learned energy/load predictor.
//!
//! It predicts one task's run time and energy on a region from the task's features (spectra,
//! pixels, templates, moments, cores) and the region's (declared core speed, CPU model, current
//! load, power model). Until [`PredictorConfig::min_samples`] finished tasks have been observed
//! it answers with the analytic prior. From then on it retrains as telemetry arrives (each time
//! the sample count has grown by half, and at least every [`PredictorConfig::retrain_every`]
//! samples): it holds out the most recent fifth of the samples, picks a regressor among linfa's
//! (ordinary least squares and elastic net on log features, least squares on the prior's
//! prediction) by k-fold cross-validation on the rest,
//! reports the chosen model's error (MAPE) on the held-out part, and refits it on all samples.
//!
//! Energy: when telemetry carries measured joules (RAPL, metered nodes), a second model learns
//! them the same way; otherwise energy is the region's power model applied to the predicted
//! CPU time.

use std::collections::{BTreeMap, VecDeque};

use linfa::prelude::*;
use linfa_elasticnet::ElasticNet;
use linfa_linear::LinearRegression;
use ndarray::{Array1, Array2, ArrayView1};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::analytic::{AnalyticCostModel, task_cores};
use crate::energy::{joules_per_cpu_second, modelled_joules};
use crate::model::{RegionSnapshot, TaskFeatures, TaskGroup};
use crate::placement::{CostModel, TaskCost};

/// One finished task: what it was, where it ran, what it cost. Its JSON is what the controller
/// stores, so that a restarted controller retrains from the same samples.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TelemetrySample {
    pub features: TaskFeatures,
    /// Cores the task ran on.
    pub cores: f64,
    /// The region's declared relative core speed.
    pub speed: f64,
    pub cpu_model: Option<String>,
    /// The region's load when the task started.
    pub load: f64,
    /// The region's power-model joules per busy CPU second.
    pub joules_per_cpu_second: f64,
    /// Measured wall-clock seconds.
    pub seconds: f64,
    /// Measured joules, when the region measures them.
    pub joules: Option<f64>,
}

impl TelemetrySample {
    /// A sample of a task of `group` that ran on `region` (as it was when the task started).
    pub fn new(
        region: &RegionSnapshot,
        group: &TaskGroup,
        seconds: f64,
        joules: Option<f64>,
    ) -> Self {
        TelemetrySample {
            features: group.features,
            cores: task_cores(group),
            speed: region.speed(),
            cpu_model: region.cpu_model.clone(),
            load: region.load,
            joules_per_cpu_second: joules_per_cpu_second(&region.energy, region.capacity.cores()),
            seconds,
            joules,
        }
    }

    /// Why the predictor cannot learn from this sample, if it cannot.
    pub fn unusable(&self) -> Option<&'static str> {
        let positive = |v: f64| v.is_finite() && v > 0.0;
        if !positive(self.seconds) {
            Some("seconds must be a finite number > 0")
        } else if !positive(self.cores) {
            Some("cores must be a finite number > 0")
        } else if !positive(self.speed) {
            Some("the region's speed must be a finite number > 0")
        } else if !(self.joules_per_cpu_second.is_finite() && self.joules_per_cpu_second >= 0.0) {
            // Zero is a region that declares no power model: its run times still teach.
            Some("the region's joules per CPU second must be a finite number >= 0")
        } else if self.features.spectra == 0
            || self.features.pixels == 0
            || self.features.templates == 0
        {
            Some("spectra, pixels and templates must be > 0")
        } else if !self.load.is_finite() {
            Some("load must be finite")
        } else {
            None
        }
    }

    fn usable(&self) -> bool {
        self.unusable().is_none()
    }
}

/// The inputs of one prediction, borrowed from a region and a group or from a sample.
#[derive(Debug, Clone, Copy)]
struct Inputs<'a> {
    features: TaskFeatures,
    cores: f64,
    speed: f64,
    cpu_model: Option<&'a str>,
    load: f64,
    joules_per_cpu_second: f64,
}

impl<'a> Inputs<'a> {
    fn of_sample(s: &'a TelemetrySample) -> Self {
        Inputs {
            features: s.features,
            cores: s.cores,
            speed: s.speed,
            cpu_model: s.cpu_model.as_deref(),
            load: s.load,
            joules_per_cpu_second: s.joules_per_cpu_second,
        }
    }

    fn of(region: &'a RegionSnapshot, group: &TaskGroup) -> Self {
        Inputs {
            features: group.features,
            cores: task_cores(group),
            speed: region.speed(),
            cpu_model: region.cpu_model.as_deref(),
            load: region.load,
            joules_per_cpu_second: joules_per_cpu_second(&region.energy, region.capacity.cores()),
        }
    }

    fn prior_seconds(&self, prior: &AnalyticCostModel) -> f64 {
        prior.reference_cpu_seconds(&self.features) / (self.speed * self.cores)
    }
}

/// Floor of the power-model feature before its logarithm: a region without a power model
/// declares 0 J per CPU second. Far below any real core (a few watts at least).
const MIN_JOULES_PER_CPU_SECOND: f64 = 1e-3;

/// Most CPU models given their own indicator column; the rest share none.
const MAX_CPU_MODELS: usize = 12;
const BASE_LOG_COLUMNS: usize = 8;
const MAX_COLUMNS: usize = BASE_LOG_COLUMNS + MAX_CPU_MODELS;

/// How raw inputs become a row of the design matrix, and the target its scale.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
enum Space {
    /// Logarithms of the multiplicative features (and the indicator of each CPU model); the
    /// target is the log of seconds or joules.
    Log,
    /// The prior's prediction, scaled by load and by each CPU model; the target is seconds.
    Prior,
}

#[derive(Debug, Clone)]
struct Encoder {
    space: Space,
    cpu_models: Vec<String>,
    /// Columns kept after dropping constant and collinear ones.
    kept: Vec<usize>,
    mean: Vec<f64>,
    scale: Vec<f64>,
}

impl Encoder {
    fn full_row(
        &self,
        x: &Inputs,
        prior: &AnalyticCostModel,
        row: &mut [f64; MAX_COLUMNS],
    ) -> usize {
        let model_index = x
            .cpu_model
            .and_then(|m| self.cpu_models.iter().position(|c| c == m));
        match self.space {
            Space::Log => {
                let f = &x.features;
                row[..BASE_LOG_COLUMNS].copy_from_slice(&[
                    (f.spectra as f64).ln(),
                    (f.pixels as f64).ln(),
                    (f.templates as f64).ln(),
                    f.moments as f64,
                    x.cores.ln(),
                    x.speed.ln(),
                    x.load,
                    x.joules_per_cpu_second.max(MIN_JOULES_PER_CPU_SECOND).ln(),
                ]);
                for (i, slot) in row[BASE_LOG_COLUMNS..BASE_LOG_COLUMNS + self.cpu_models.len()]
                    .iter_mut()
                    .enumerate()
                {
                    *slot = if model_index == Some(i) { 1.0 } else { 0.0 };
                }
                BASE_LOG_COLUMNS + self.cpu_models.len()
            }
            Space::Prior => {
                let p = x.prior_seconds(prior);
                row[0] = p;
                row[1] = p * x.load;
                for (i, slot) in row[2..2 + self.cpu_models.len()].iter_mut().enumerate() {
                    *slot = if model_index == Some(i) { p } else { 0.0 };
                }
                2 + self.cpu_models.len()
            }
        }
    }

    /// Fits the column set and standardisation on `inputs`.
    fn fit(space: Space, inputs: &[Inputs], prior: &AnalyticCostModel) -> Encoder {
        let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
        for x in inputs {
            if let Some(m) = x.cpu_model {
                *counts.entry(m).or_default() += 1;
            }
        }
        let mut by_count: Vec<(&str, usize)> = counts.into_iter().collect();
        by_count.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
        let cpu_models = by_count
            .into_iter()
            .take(MAX_CPU_MODELS)
            .map(|(m, _)| m.to_string())
            .collect();
        let mut encoder = Encoder {
            space,
            cpu_models,
            kept: Vec::new(),
            mean: Vec::new(),
            scale: Vec::new(),
        };
        let mut row = [0.0; MAX_COLUMNS];
        let mut columns: Vec<Vec<f64>> = Vec::new();
        for x in inputs {
            let width = encoder.full_row(x, prior, &mut row);
            columns.resize_with(width, Vec::new);
            for (c, v) in columns.iter_mut().zip(&row[..width]) {
                c.push(*v);
            }
        }
        // Keep a column only if it adds a direction that the intercept and the kept columns do not
        // span (Gram-Schmidt on centred columns): least squares then stays full rank.
        let mut basis: Vec<Vec<f64>> = Vec::new();
        for (j, column) in columns.iter().enumerate() {
            let n = column.len() as f64;
            let mean = column.iter().sum::<f64>() / n;
            let mut residual: Vec<f64> = column.iter().map(|v| v - mean).collect();
            let norm0 = residual.iter().map(|v| v * v).sum::<f64>().sqrt();
            if norm0 <= 1e-12 * (1.0 + mean.abs()) * n.sqrt() {
                continue;
            }
            for b in &basis {
                let dot: f64 = residual.iter().zip(b).map(|(r, q)| r * q).sum();
                residual.iter_mut().zip(b).for_each(|(r, q)| *r -= dot * q);
            }
            let norm = residual.iter().map(|v| v * v).sum::<f64>().sqrt();
            if norm <= 1e-6 * norm0 {
                continue;
            }
            residual.iter_mut().for_each(|r| *r /= norm);
            basis.push(residual);
            encoder.kept.push(j);
            encoder.mean.push(mean);
            encoder.scale.push(norm0 / n.sqrt());
        }
        encoder
    }

    /// The standardised kept columns of `x`, written into `out`.
    fn encode(&self, x: &Inputs, prior: &AnalyticCostModel, out: &mut [f64; MAX_COLUMNS]) -> usize {
        let mut row = [0.0; MAX_COLUMNS];
        self.full_row(x, prior, &mut row);
        for (i, &j) in self.kept.iter().enumerate() {
            out[i] = (row[j] - self.mean[i]) / self.scale[i];
        }
        self.kept.len()
    }

    fn matrix(&self, inputs: &[Inputs], prior: &AnalyticCostModel) -> Array2<f64> {
        let width = self.kept.len();
        let mut m = Array2::zeros((inputs.len(), width));
        let mut row = [0.0; MAX_COLUMNS];
        for (i, x) in inputs.iter().enumerate() {
            self.encode(x, prior, &mut row);
            m.row_mut(i).assign(&ArrayView1::from(&row[..width]));
        }
        m
    }
}

/// The regressors model selection chooses among.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ModelKind {
    /// linfa-linear ordinary least squares on log features.
    LinearLog,
    /// linfa-elasticnet on log features.
    ElasticNetLog,
    /// linfa-linear least squares on the prior's prediction (per CPU model, times load).
    LinearPrior,
}

impl ModelKind {
    pub const ALL: [ModelKind; 3] = [
        ModelKind::LinearLog,
        ModelKind::ElasticNetLog,
        ModelKind::LinearPrior,
    ];

    pub fn name(self) -> &'static str {
        match self {
            ModelKind::LinearLog => "linear-regression-log",
            ModelKind::ElasticNetLog => "elastic-net-log",
            ModelKind::LinearPrior => "linear-regression-prior",
        }
    }

    fn space(self) -> Space {
        match self {
            ModelKind::LinearPrior => Space::Prior,
            ModelKind::LinearLog | ModelKind::ElasticNetLog => Space::Log,
        }
    }
}

/// Every candidate predicts through a linear form over the encoded row (then `exp` in log
/// space): a prediction costs a dot product, which keeps placement fast with thousands of regions.
#[derive(Debug, Clone)]
struct Trained {
    encoder: Encoder,
    weights: Vec<f64>,
    intercept: f64,
}

/// What a head predicts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    Seconds,
    Joules,
}

fn target_of(s: &TelemetrySample, target: Target) -> Option<f64> {
    match target {
        Target::Seconds => Some(s.seconds),
        Target::Joules => s.joules.filter(|j| j.is_finite() && *j > 0.0),
    }
}

impl Trained {
    fn fit(
        kind: ModelKind,
        inputs: &[Inputs],
        targets: &[f64],
        prior: &AnalyticCostModel,
    ) -> Option<Trained> {
        let encoder = Encoder::fit(kind.space(), inputs, prior);
        let x = encoder.matrix(inputs, prior);
        let y: Array1<f64> = match kind {
            ModelKind::LinearLog | ModelKind::ElasticNetLog => {
                targets.iter().map(|t| t.ln()).collect()
            }
            ModelKind::LinearPrior => targets.iter().copied().collect(),
        };
        let data = Dataset::new(x, y);
        let (weights, intercept) = match kind {
            ModelKind::LinearLog | ModelKind::LinearPrior => {
                let m = LinearRegression::new().fit(&data).ok()?;
                (m.params().to_vec(), m.intercept())
            }
            ModelKind::ElasticNetLog => {
                let m = ElasticNet::params()
                    .penalty(1e-4)
                    .l1_ratio(0.5)
                    .tolerance(1e-3)
                    .max_iterations(200)
                    .fit(&data)
                    .ok()?;
                (m.hyperplane().to_vec(), m.intercept())
            }
        };
        let trained = Trained {
            encoder,
            weights,
            intercept,
        };
        // A model that predicts nonsense on its own training data is no candidate.
        inputs
            .first()
            .map(|x| trained.predict(x, prior))
            .filter(|p| p.is_finite() && *p > 0.0)?;
        Some(trained)
    }

    fn predict(&self, x: &Inputs, prior: &AnalyticCostModel) -> f64 {
        let mut row = [0.0; MAX_COLUMNS];
        let width = self.encoder.encode(x, prior, &mut row);
        let raw = self.intercept
            + self
                .weights
                .iter()
                .zip(&row[..width])
                .map(|(w, v)| w * v)
                .sum::<f64>();
        match self.encoder.space {
            Space::Log => raw.exp(),
            // A linear model can dip below zero far from its data; a task never takes no time.
            Space::Prior => raw.max(1e-3 * x.prior_seconds(prior)),
        }
    }
}

/// Mean absolute percentage error, as a fraction.
pub fn mape(
    predicted: impl IntoIterator<Item = f64>,
    actual: impl IntoIterator<Item = f64>,
) -> f64 {
    let (mut sum, mut n) = (0.0, 0usize);
    for (p, a) in predicted.into_iter().zip(actual) {
        sum += ((p - a) / a).abs();
        n += 1;
    }
    if n == 0 { f64::NAN } else { sum / n as f64 }
}

/// How the predictor judges itself, for `ceccm sim` and the API.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HeadReport {
    /// The regressor in use.
    pub model: &'static str,
    /// Mean cross-validated MAPE of every candidate that could be fitted.
    pub cv_mape: BTreeMap<&'static str, f64>,
    /// MAPE of the chosen model on the most recent samples, which it was not trained on.
    pub holdout_mape: f64,
    pub holdout_samples: usize,
    pub trained_on: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PredictorReport {
    /// `prior` until the first training, then `learned`.
    pub state: &'static str,
    /// Samples observed so far.
    pub samples: usize,
    pub trainings: usize,
    /// MAPE of the prior on the same held-out samples, for comparison.
    pub prior_holdout_mape: Option<f64>,
    pub runtime: Option<HeadReport>,
    pub energy: Option<HeadReport>,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PredictorConfig {
    /// Samples before the first training.
    pub min_samples: usize,
    /// Folds of the cross-validation.
    pub folds: usize,
    /// Most recent samples kept for training.
    pub window: usize,
    /// Retrain at least every this many new samples.
    pub retrain_every: usize,
    /// Most recent training samples the cross-validation uses (model choice needs fewer
    /// samples than the final fit; this bounds the cost of a retraining).
    pub cv_samples: usize,
}

impl Default for PredictorConfig {
    fn default() -> Self {
        PredictorConfig {
            min_samples: 60,
            folds: 5,
            window: 3000,
            retrain_every: 50_000,
            cv_samples: 600,
        }
    }
}

/// The learned predictor; a [`CostModel`].
#[derive(Debug, Clone)]
pub struct Predictor {
    prior: AnalyticCostModel,
    config: PredictorConfig,
    samples: VecDeque<TelemetrySample>,
    observed: usize,
    observed_at_training: usize,
    runtime: Option<Trained>,
    energy: Option<Trained>,
    report: PredictorReport,
}

impl Predictor {
    pub fn new(prior: AnalyticCostModel, config: PredictorConfig) -> Self {
        Predictor {
            prior,
            config,
            samples: VecDeque::new(),
            observed: 0,
            observed_at_training: 0,
            runtime: None,
            energy: None,
            report: PredictorReport {
                state: "prior",
                samples: 0,
                trainings: 0,
                prior_holdout_mape: None,
                runtime: None,
                energy: None,
            },
        }
    }

    pub fn report(&self) -> &PredictorReport {
        &self.report
    }

    pub fn config(&self) -> &PredictorConfig {
        &self.config
    }

    /// Whether predictions come from a trained model rather than the prior.
    pub fn trained(&self) -> bool {
        self.runtime.is_some()
    }

    /// Rebuilds the state of a predictor that had observed `observed` samples, of which `recent`
    /// are the newest (oldest first), with one training instead of replaying every retraining
    /// the samples once caused. Unusable samples are skipped.
    pub fn restore(&mut self, observed: usize, recent: impl IntoIterator<Item = TelemetrySample>) {
        let mut restored = 0;
        for sample in recent.into_iter().filter(TelemetrySample::usable) {
            self.samples.push_back(sample);
            if self.samples.len() > self.config.window {
                self.samples.pop_front();
            }
            restored += 1;
        }
        self.observed += observed.max(restored);
        self.report.samples = self.observed;
        if self.observed >= self.config.min_samples && self.samples.len() >= self.config.min_samples
        {
            self.retrain();
        }
    }

    /// Records a finished task; retrains when enough new samples have arrived. Unusable samples
    /// (non-positive times, NaN) are ignored. Returns whether it retrained.
    pub fn observe(&mut self, sample: TelemetrySample) -> bool {
        if !sample.usable() {
            return false;
        }
        self.samples.push_back(sample);
        if self.samples.len() > self.config.window {
            self.samples.pop_front();
        }
        self.observed += 1;
        self.report.samples = self.observed;
        let due = if self.observed_at_training == 0 {
            self.observed >= self.config.min_samples
        } else {
            let grown = self.observed >= self.observed_at_training + self.observed_at_training / 2;
            grown || self.observed - self.observed_at_training >= self.config.retrain_every
        };
        if due {
            self.retrain();
        }
        due
    }

    /// Trains both heads on the current window.
    pub fn retrain(&mut self) {
        self.observed_at_training = self.observed;
        self.report.trainings += 1;
        let samples: Vec<&TelemetrySample> = self.samples.iter().collect();
        if let Some((trained, report, prior_mape)) = self.train_head(&samples, Target::Seconds) {
            self.runtime = Some(trained);
            self.report.runtime = Some(report);
            self.report.prior_holdout_mape = Some(prior_mape);
            self.report.state = "learned";
        }
        if let Some((trained, report, _)) = self.train_head(&samples, Target::Joules) {
            self.energy = Some(trained);
            self.report.energy = Some(report);
        }
    }

    fn train_head(
        &self,
        samples: &[&TelemetrySample],
        target: Target,
    ) -> Option<(Trained, HeadReport, f64)> {
        let rows: Vec<(Inputs, f64)> = samples
            .iter()
            .filter_map(|s| Some((Inputs::of_sample(s), target_of(s, target)?)))
            .collect();
        if rows.len() < self.config.min_samples {
            return None;
        }
        let holdout = (rows.len() / 5).max(1);
        let (train, test) = rows.split_at(rows.len() - holdout);
        let train_x: Vec<Inputs> = train.iter().map(|r| r.0).collect();
        let train_y: Vec<f64> = train.iter().map(|r| r.1).collect();
        let mut cv_mape = BTreeMap::new();
        let cv_from = train_x.len().saturating_sub(self.config.cv_samples);
        for kind in ModelKind::ALL {
            if let Some(m) = self.cross_validate(kind, &train_x[cv_from..], &train_y[cv_from..]) {
                cv_mape.insert(kind.name(), m);
            }
        }
        let best = ModelKind::ALL
            .into_iter()
            .filter_map(|k| cv_mape.get(k.name()).map(|m| (k, *m)))
            .min_by(|a, b| a.1.total_cmp(&b.1).then(a.0.cmp(&b.0)))?
            .0;
        let on_train = Trained::fit(best, &train_x, &train_y, &self.prior)?;
        let holdout_mape = mape(
            test.iter().map(|(x, _)| on_train.predict(x, &self.prior)),
            test.iter().map(|r| r.1),
        );
        let prior_mape = mape(
            test.iter().map(|(x, _)| match target {
                Target::Seconds => x.prior_seconds(&self.prior),
                Target::Joules => x.prior_seconds(&self.prior) * x.cores * x.joules_per_cpu_second,
            }),
            test.iter().map(|r| r.1),
        );
        let all_x: Vec<Inputs> = rows.iter().map(|r| r.0).collect();
        let all_y: Vec<f64> = rows.iter().map(|r| r.1).collect();
        let deployed = Trained::fit(best, &all_x, &all_y, &self.prior)?;
        let report = HeadReport {
            model: best.name(),
            cv_mape,
            holdout_mape,
            holdout_samples: test.len(),
            trained_on: rows.len(),
        };
        Some((deployed, report, prior_mape))
    }

    /// Mean MAPE over k folds of a fixed shuffle (seeded: training is reproducible).
    fn cross_validate(&self, kind: ModelKind, x: &[Inputs], y: &[f64]) -> Option<f64> {
        let k = self.config.folds.max(2);
        if x.len() < 2 * k {
            return None;
        }
        let mut order: Vec<usize> = (0..x.len()).collect();
        order.shuffle(&mut ChaCha8Rng::seed_from_u64(0x5eed));
        let mut total = 0.0;
        for fold in 0..k {
            let (mut fit_x, mut fit_y, mut test) = (Vec::new(), Vec::new(), Vec::new());
            for (pos, &i) in order.iter().enumerate() {
                if pos % k == fold {
                    test.push(i);
                } else {
                    fit_x.push(x[i]);
                    fit_y.push(y[i]);
                }
            }
            let m = Trained::fit(kind, &fit_x, &fit_y, &self.prior)?;
            total += mape(
                test.iter().map(|&i| m.predict(&x[i], &self.prior)),
                test.iter().map(|&i| y[i]),
            );
        }
        let mean = total / k as f64;
        mean.is_finite().then_some(mean)
    }
}

impl CostModel for Predictor {
    fn task_cost(&self, region: &RegionSnapshot, group: &TaskGroup) -> TaskCost {
        let Some(runtime) = &self.runtime else {
            return self.prior.task_cost(region, group);
        };
        let x = Inputs::of(region, group);
        let seconds = runtime.predict(&x, &self.prior);
        let joules = match &self.energy {
            Some(energy) => energy.predict(&x, &self.prior),
            None => modelled_joules(region, seconds * x.cores),
        };
        TaskCost { seconds, joules }
    }

    fn transfer_joules_per_byte(&self) -> f64 {
        self.prior.transfer_joules_per_byte
    }
}

#[cfg(test)]
mod tests {
    use rand::Rng;

    use super::*;
    use crate::model::{CarbonIntensity, EnergyProfile, Network, Objective, Resources, Tier};

    /// Regions of three CPU models whose real speed on this workload differs from the declared one.
    fn regions() -> Vec<(RegionSnapshot, f64)> {
        let specs = [
            ("ampere-altra", 0.7, 0.55),
            ("epyc-7763", 1.0, 1.1),
            ("xeon-8480", 1.3, 1.2),
        ];
        specs
            .iter()
            .enumerate()
            .map(|(i, &(cpu, declared, real))| {
                let mut r = RegionSnapshot::new(
                    format!("r{i}"),
                    Tier::Cloud,
                    Resources::new(64.0, 1 << 18, 0),
                    EnergyProfile {
                        idle_watts: 100.0 + 50.0 * i as f64,
                        watts_per_core: 4.0 + i as f64,
                        pue: 1.2,
                        carbon_intensity: CarbonIntensity::Constant(200.0),
                    },
                    Network {
                        uplink_mbps: 1000.0,
                        rtt_ms: 5.0,
                    },
                );
                r.cpu_speed = Some(declared);
                r.cpu_model = Some(cpu.into());
                (r, real)
            })
            .collect()
    }

    fn group(rng: &mut impl Rng) -> TaskGroup {
        TaskGroup {
            name: "g".into(),
            tasks: 1,
            features: TaskFeatures {
                spectra: rng.gen_range(20..4000),
                pixels: *[1720u64, 3681, 4563].get(rng.gen_range(0..3)).unwrap(),
                templates: *[42u64, 150].get(rng.gen_range(0..2)).unwrap(),
                moments: *[2u64, 4].get(rng.gen_range(0..2)).unwrap(),
            },
            resources: Resources::new(*[1.0, 2.0, 4.0].get(rng.gen_range(0..3)).unwrap(), 1024, 0),
            input: Default::default(),
            constraints: Default::default(),
            objective: Objective::Energy,
            deadline_s: None,
            parallelism: None,
            start_s: 0.0,
        }
    }

    /// The "real" cost: not the prior's form (sub-linear in templates, moments and load matter).
    fn truth(
        region: &RegionSnapshot,
        real_speed: f64,
        g: &TaskGroup,
        rng: &mut impl Rng,
    ) -> (f64, f64) {
        let f = &g.features;
        let cpu = 0.007
            * f.spectra as f64
            * (f.pixels as f64 / 4563.0).powf(1.1)
            * (f.templates as f64 / 150.0).powf(0.8)
            * (1.0 + 0.2 * (f.moments as f64 - 2.0))
            * (1.0 + 0.3 * region.load)
            / real_speed;
        let noise = 1.0 + 0.03 * (rng.r#gen::<f64>() - 0.5) * 2.0;
        let seconds = cpu / task_cores(g) * noise;
        (
            seconds,
            modelled_joules(region, seconds * task_cores(g)) * 1.1,
        )
    }

    fn telemetry(n: usize, seed: u64) -> Vec<(RegionSnapshot, TaskGroup, TelemetrySample)> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let regions = regions();
        (0..n)
            .map(|_| {
                let (mut region, real) = regions[rng.gen_range(0..regions.len())].clone();
                region.load = rng.gen_range(0.0..0.9);
                let g = group(&mut rng);
                let (seconds, joules) = truth(&region, real, &g, &mut rng);
                let sample = TelemetrySample::new(&region, &g, seconds, Some(joules));
                (region, g, sample)
            })
            .collect()
    }

    #[test]
    fn answers_with_the_prior_until_trained() {
        let prior = AnalyticCostModel::default();
        let mut p = Predictor::new(prior, PredictorConfig::default());
        let data = telemetry(59, 1);
        for (_, _, s) in data.iter().cloned() {
            assert!(!p.observe(s));
        }
        let (region, g, _) = &data[0];
        assert_eq!(p.task_cost(region, g), prior.task_cost(region, g));
        assert_eq!(p.report().state, "prior");
        // Garbage telemetry is ignored, not learned from.
        let mut bad = data[0].2.clone();
        bad.seconds = f64::NAN;
        assert!(!p.observe(bad));
        assert_eq!(p.report().samples, 59);
    }

    #[test]
    fn learns_runtime_and_energy_within_ten_percent_on_held_out_telemetry() {
        let mut p = Predictor::new(AnalyticCostModel::default(), PredictorConfig::default());
        let mut trainings = 0;
        for (_, _, s) in telemetry(800, 2) {
            trainings += usize::from(p.observe(s));
        }
        // 60, 90, 135, 202, 303, 454, 681.
        assert_eq!(trainings, 7);
        let report = p.report().clone();
        assert_eq!(report.state, "learned");
        let runtime = report.runtime.as_ref().unwrap();
        assert!(runtime.holdout_mape < 0.10, "{report:?}");
        assert!(
            runtime.holdout_mape < report.prior_holdout_mape.unwrap() / 2.0,
            "{report:?}"
        );
        assert!(runtime.cv_mape.len() >= 3, "{report:?}");
        assert!(
            report.energy.as_ref().unwrap().holdout_mape < 0.10,
            "{report:?}"
        );

        // Fresh telemetry it has never seen.
        let fresh = telemetry(300, 3);
        let predicted: Vec<TaskCost> = fresh.iter().map(|(r, g, _)| p.task_cost(r, g)).collect();
        let seconds = mape(
            predicted.iter().map(|c| c.seconds),
            fresh.iter().map(|f| f.2.seconds),
        );
        let joules = mape(
            predicted.iter().map(|c| c.joules),
            fresh.iter().map(|f| f.2.joules.unwrap()),
        );
        assert!(seconds < 0.10, "runtime MAPE {seconds}");
        assert!(joules < 0.10, "energy MAPE {joules}");
    }

    #[test]
    fn restoring_stored_samples_trains_once_and_keeps_the_retraining_schedule() {
        let data: Vec<TelemetrySample> = telemetry(101, 5).into_iter().map(|d| d.2).collect();
        let mut bad = data[0].clone();
        bad.seconds = -1.0;
        assert_eq!(bad.unusable(), Some("seconds must be a finite number > 0"));
        assert_eq!(data[0].unusable(), None);

        let mut p = Predictor::new(AnalyticCostModel::default(), PredictorConfig::default());
        p.restore(100, data[..100].iter().cloned().chain([bad]));
        assert!(p.trained());
        assert_eq!(p.report().state, "learned");
        assert_eq!(p.report().trainings, 1);
        assert_eq!(p.report().samples, 100);
        // Trained at 100: the next training comes at 150, not at the next sample.
        assert!(!p.observe(data[100].clone()));

        let mut few = Predictor::new(AnalyticCostModel::default(), PredictorConfig::default());
        few.restore(10, data[..10].iter().cloned());
        assert!(!few.trained());
        assert_eq!(few.report().state, "prior");
        assert_eq!(few.report().samples, 10);
    }

    #[test]
    fn collinear_and_constant_features_are_dropped() {
        let data = telemetry(100, 4);
        let prior = AnalyticCostModel::default();
        let inputs: Vec<Inputs> = data.iter().map(|d| Inputs::of_sample(&d.2)).collect();
        let encoder = Encoder::fit(Space::Log, &inputs, &prior);
        // Three CPU models each fix the declared speed and power: ln speed is kept, then the
        // power-model column and two of the three indicators add nothing new.
        assert_eq!(encoder.cpu_models.len(), 3);
        assert_eq!(
            encoder.kept.len(),
            BASE_LOG_COLUMNS - 1 + 1,
            "{:?}",
            encoder.kept
        );
    }
}

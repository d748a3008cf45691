//! The synthetic MaNGA cube with known truth (shared data): reading the truth table, preparing
//! E-MILES templates for its grid, and accuracy statistics per S/N bin. Used by the accuracy
//! test and the benchmark.

use std::path::{Path, PathBuf};

use crate::error::FitError;
use crate::fit::LogGrid;
use crate::spectrum::{RestFrameSpectrum, read_cube_spaxels};
use crate::templates::{PrepareConfig, PreparedTemplates, TemplateLibrary, prepare};

/// Systemic redshift of the synthetic cube (its params JSON).
pub const SYNTHETIC_Z: f64 = 0.018;

/// The shared data folder: `$CECCM_SHARED_DATA`, else `<workspace>/../shared/data`.
pub fn shared_data_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("CECCM_SHARED_DATA") {
        return PathBuf::from(dir);
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data")
}

/// One spaxel of the truth table.
#[derive(Debug, Clone, PartialEq)]
pub struct TruthRow {
    pub x: usize,
    pub y: usize,
    pub v: f64,
    pub sigma: f64,
    pub sn: f64,
}

/// Spaxels inside the footprint, in file order.
pub fn read_truth(path: &Path) -> Result<Vec<TruthRow>, FitError> {
    let text = std::fs::read_to_string(path).map_err(|e| FitError::read(path, e))?;
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap_or_default().split(',').collect();
    let col = |name: &str| {
        header
            .iter()
            .position(|h| *h == name)
            .ok_or_else(|| FitError::read(path, format!("no column {name}")))
    };
    let (cx, cy, cin, cv, cs, csn) = (
        col("x")?,
        col("y")?,
        col("in_footprint")?,
        col("V")?,
        col("sigma")?,
        col("SN")?,
    );
    let mut rows = Vec::new();
    for (n, line) in lines.enumerate() {
        let f: Vec<&str> = line.split(',').collect();
        if f.get(cin) != Some(&"1") {
            continue;
        }
        let num = |i: usize| -> Result<f64, FitError> {
            f.get(i).and_then(|v| v.parse().ok()).ok_or_else(|| {
                FitError::read(path, format!("line {}: bad number in column {i}", n + 2))
            })
        };
        rows.push(TruthRow {
            x: num(cx)? as usize,
            y: num(cy)? as usize,
            v: num(cv)?,
            sigma: num(cs)?,
            sn: num(csn)?,
        });
    }
    Ok(rows)
}

/// Spectra of `rows` on the rest-frame grid, cut to `lam_range`, plus the shared grid.
pub fn load_spaxels(
    cube: &Path,
    rows: &[TruthRow],
    lam_range: (f64, f64),
) -> Result<Vec<RestFrameSpectrum>, FitError> {
    let spaxels: Vec<(usize, usize)> = rows.iter().map(|r| (r.x, r.y)).collect();
    read_cube_spaxels(cube, &spaxels)?
        .iter()
        .map(|s| s.to_rest_frame(SYNTHETIC_Z, Some(lam_range)))
        .collect()
}

/// E-MILES prepared for a rest-frame spectrum's grid and resolution.
pub fn prepare_emiles(
    library: &TemplateLibrary,
    spec: &RestFrameSpectrum,
    velscale_ratio: usize,
) -> Result<PreparedTemplates, FitError> {
    let grid: &LogGrid = &spec.grid;
    let mut cfg = PrepareConfig::new(
        grid.velscale,
        (grid.lam(0), grid.lam(grid.npix - 1)),
        spec.medium,
    );
    cfg.velscale_ratio = velscale_ratio;
    cfg.galaxy_fwhm = spec.fwhm.clone();
    prepare(library, &cfg)
}

/// Bias, RMS and the spread of the normalised deviations in one S/N bin.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct BinAccuracy {
    pub sn_min: f64,
    pub sn_max: f64,
    pub count: usize,
    pub v_bias: f64,
    pub v_rms: f64,
    pub v_pull_std: f64,
    pub sigma_bias: f64,
    pub sigma_rms: f64,
    pub sigma_pull_std: f64,
}

/// S/N bins of the accuracy requirement.
pub const SN_BINS: [(f64, f64); 4] = [
    (5.0, 10.0),
    (10.0, 20.0),
    (20.0, 40.0),
    (40.0, f64::INFINITY),
];

/// A fitted spaxel: (truth, fitted V, V error, fitted sigma, sigma error).
pub type FittedSpaxel = (TruthRow, f64, f64, f64, f64);

/// (truth, fitted V, V error, fitted sigma, sigma error) per spaxel -> statistics per S/N bin.
pub fn accuracy_by_sn(samples: &[FittedSpaxel]) -> Vec<BinAccuracy> {
    SN_BINS
        .iter()
        .map(|&(lo, hi)| accuracy_in(samples, lo, hi))
        .collect()
}

/// Statistics of the spaxels with lo <= S/N < hi.
pub fn accuracy_in(samples: &[FittedSpaxel], lo: f64, hi: f64) -> BinAccuracy {
    let sel: Vec<_> = samples
        .iter()
        .filter(|s| s.0.sn >= lo && s.0.sn < hi)
        .collect();
    let n = sel.len().max(1) as f64;
    let stats = |d: Vec<f64>| {
        let bias = d.iter().sum::<f64>() / n;
        let rms = (d.iter().map(|v| v * v).sum::<f64>() / n).sqrt();
        (bias, rms)
    };
    let std = |d: Vec<f64>| {
        let mean = d.iter().sum::<f64>() / n;
        (d.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0).max(1.0)).sqrt()
    };
    let (v_bias, v_rms) = stats(sel.iter().map(|s| s.1 - s.0.v).collect());
    let (sigma_bias, sigma_rms) = stats(sel.iter().map(|s| s.3 - s.0.sigma).collect());
    BinAccuracy {
        sn_min: lo,
        sn_max: hi,
        count: sel.len(),
        v_bias,
        v_rms,
        v_pull_std: std(sel.iter().map(|s| (s.1 - s.0.v) / s.2).collect()),
        sigma_bias,
        sigma_rms,
        sigma_pull_std: std(sel.iter().map(|s| (s.3 - s.0.sigma) / s.4).collect()),
    }
}

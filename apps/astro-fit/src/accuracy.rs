//! Fitted maps against a synthetic cube's truth: residual maps (PNG) and accuracy per S/N bin.

use std::path::{Path, PathBuf};

use fitsio::FitsFile;
use serde::Serialize;

use crate::error::FitError;
use crate::mapplot::{ColorScale, Panel, PlotError, plot_maps};
use crate::synthetic::{BinAccuracy, accuracy_by_sn, accuracy_in, read_truth};

#[derive(Debug, thiserror::Error)]
pub enum AccuracyError {
    #[error("truth table: {0}")]
    Truth(#[from] FitError),
    #[error(transparent)]
    Plot(#[from] PlotError),
    #[error("reading {path}: {message}")]
    Maps { path: PathBuf, message: String },
    #[error("truth spaxel ({x}, {y}) is outside the {nx}x{ny} maps")]
    Outside {
        x: usize,
        y: usize,
        nx: usize,
        ny: usize,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AccuracyReport {
    pub compared: usize,
    /// Truth spaxels without a fitted value (masked in the MAPS).
    pub missing: usize,
    pub by_sn: Vec<BinAccuracy>,
    /// S/N 20 and above together: where the spread of (fit - truth) / error is judged when the
    /// brightest bin alone is too small to measure one (8 spaxels on the seed-7 cube).
    pub above_sn_20: BinAccuracy,
}

fn read_map(f: &mut FitsFile, path: &Path, name: &str) -> Result<Vec<f64>, AccuracyError> {
    let err = |e: fitsio::errors::Error| AccuracyError::Maps {
        path: path.to_path_buf(),
        message: format!("{name}: {e}"),
    };
    let hdu = f.hdu(name).map_err(err)?;
    let v: Vec<f64> = hdu.read_image(f).map_err(err)?;
    Ok(v)
}

/// Compares `maps` (a MAPS file written by `fit-cube`) with `truth` and draws the V and sigma
/// residual maps into `png`.
pub fn compare_with_truth(
    maps: &Path,
    truth: &Path,
    png: &Path,
) -> Result<AccuracyReport, AccuracyError> {
    let truth = read_truth(truth)?;
    let mut f = FitsFile::open(maps).map_err(|e| AccuracyError::Maps {
        path: maps.to_path_buf(),
        message: e.to_string(),
    })?;
    let vel = read_map(&mut f, maps, "STELLAR_VEL")?;
    let sig = read_map(&mut f, maps, "STELLAR_SIGMA")?;
    let vmask = read_map(&mut f, maps, "STELLAR_VEL_MASK")?;
    let vivar = read_map(&mut f, maps, "STELLAR_VEL_IVAR")?;
    let sivar = read_map(&mut f, maps, "STELLAR_SIGMA_IVAR")?;
    let hdu = f.hdu("BINID").map_err(|e| AccuracyError::Maps {
        path: maps.to_path_buf(),
        message: e.to_string(),
    })?;
    let (nx, ny) = match &hdu.info {
        fitsio::hdu::HduInfo::ImageInfo { shape, .. } if shape.len() == 2 => (shape[1], shape[0]),
        _ => {
            return Err(AccuracyError::Maps {
                path: maps.to_path_buf(),
                message: "BINID is not a 2-D image".into(),
            });
        }
    };
    let scale = f
        .primary_hdu()
        .and_then(|p| p.read_key::<f64>(&mut f, "PIXSCALE"))
        .unwrap_or(0.5);
    let mut dv_map = vec![None; nx * ny];
    let mut ds_map = vec![None; nx * ny];
    let mut rows = Vec::new();
    let mut missing = 0;
    for t in truth {
        if t.x >= nx || t.y >= ny {
            return Err(AccuracyError::Outside {
                x: t.x,
                y: t.y,
                nx,
                ny,
            });
        }
        let i = t.y * nx + t.x;
        if vmask[i] != 0.0 {
            missing += 1;
            continue;
        }
        let (dv, ds) = (vel[i] - t.v, sig[i] - t.sigma);
        dv_map[i] = Some(dv);
        ds_map[i] = Some(ds);
        let err = |ivar: f64| {
            if ivar > 0.0 {
                1.0 / ivar.sqrt()
            } else {
                f64::NAN
            }
        };
        rows.push((t, vel[i], err(vivar[i]), sig[i], err(sivar[i])));
    }
    let panel = |title: &str, values| Panel {
        title: title.into(),
        values,
        scale: ColorScale::Diverging,
        range: None,
    };
    plot_maps(
        png,
        nx,
        ny,
        scale,
        &[
            panel("V fit - truth (km/s)", dv_map),
            panel("σ fit - truth (km/s)", ds_map),
        ],
    )?;
    Ok(AccuracyReport {
        compared: rows.len(),
        missing,
        by_sn: accuracy_by_sn(&rows),
        above_sn_20: accuracy_in(&rows, 20.0, f64::INFINITY),
    })
}

/// Gas maps against a synthetic cube's gas truth (`synth --gas`), one quantity of one channel
/// in one S/N bin: RMS of fit - truth and the mean and spread of (fit - truth) / error.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GasAccuracy {
    pub channel: String,
    /// `flux` (EMLINE_GFLUX), `V` (EMLINE_GVEL) or `sigma` (EMLINE_GSIGMA).
    pub quantity: String,
    pub sn_min: f64,
    pub sn_max: f64,
    pub count: usize,
    pub bias: f64,
    pub rms: f64,
    pub pull_mean: f64,
    pub pull_std: f64,
}

/// Compares the `EMLINE_G*` extensions of `maps` with the gas truth table `truth`
/// (`X-truth-gas.csv`): the flux of every channel the truth holds, and V and sigma of the
/// Balmer (`Ha-6564`) and forbidden (`OIII-5008`) components, per continuum S/N bin (5-10,
/// 10-20, 20-40, 40+; bins without spaxels left out).
pub fn compare_gas_with_truth(
    maps: &Path,
    truth: &Path,
) -> Result<Vec<GasAccuracy>, AccuracyError> {
    let text = std::fs::read_to_string(truth)
        .map_err(|e| AccuracyError::Truth(FitError::read(truth, e)))?;
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap_or_default().split(',').collect();
    let mut rows = Vec::new();
    for (n, line) in lines.enumerate() {
        let values: Result<Vec<f64>, _> = line.split(',').map(str::parse::<f64>).collect();
        match values {
            Ok(v) if v.len() == header.len() => rows.push(v),
            _ => {
                return Err(AccuracyError::Truth(FitError::read(
                    truth,
                    format!("line {}: expected {} numbers", n + 2, header.len()),
                )));
            }
        }
    }
    let col = |name: &str| {
        header
            .iter()
            .position(|h| *h == name)
            .ok_or_else(|| AccuracyError::Truth(FitError::read(truth, format!("no column {name}"))))
    };
    let (cx, cy, csn) = (col("x")?, col("y")?, col("SN")?);
    let mut f = FitsFile::open(maps).map_err(|e| AccuracyError::Maps {
        path: maps.to_path_buf(),
        message: e.to_string(),
    })?;
    let hdu = f.hdu("EMLINE_GFLUX").map_err(|e| AccuracyError::Maps {
        path: maps.to_path_buf(),
        message: format!("EMLINE_GFLUX: {e} (fit the cube with --gas)"),
    })?;
    let (nx, ny) = match &hdu.info {
        fitsio::hdu::HduInfo::ImageInfo { shape, .. } if shape.len() == 3 => (shape[2], shape[1]),
        _ => {
            return Err(AccuracyError::Maps {
                path: maps.to_path_buf(),
                message: "EMLINE_GFLUX is not a 3-D image".into(),
            });
        }
    };
    let mut channels = Vec::new();
    for k in 1.. {
        match hdu.read_key::<String>(&mut f, &format!("C{k}")) {
            Ok(name) => channels.push(name),
            Err(_) => break,
        }
    }
    let mut planes = Vec::new();
    for q in ["EMLINE_GFLUX", "EMLINE_GVEL", "EMLINE_GSIGMA"] {
        planes.push((
            read_map(&mut f, maps, q)?,
            read_map(&mut f, maps, &format!("{q}_IVAR"))?,
            read_map(&mut f, maps, &format!("{q}_MASK"))?,
        ));
    }
    // (channel, quantity index, truth column)
    let mut checks: Vec<(String, usize, usize)> = Vec::new();
    for name in &channels {
        if let Ok(t) = col(name) {
            checks.push((name.clone(), 0, t));
        }
        let component = match name.as_str() {
            "Ha-6564" => Some("balmer"),
            "OIII-5008" => Some("forbidden"),
            _ => None,
        };
        if let Some(comp) = component {
            checks.push((name.clone(), 1, col(&format!("V_{comp}"))?));
            checks.push((name.clone(), 2, col(&format!("sigma_{comp}"))?));
        }
    }
    let bins = [
        (5.0, 10.0),
        (10.0, 20.0),
        (20.0, 40.0),
        (40.0, f64::INFINITY),
    ];
    let mut out = Vec::new();
    for (channel, q, t) in checks {
        let c = channels.iter().position(|n| *n == channel).unwrap_or(0);
        let (value, ivar, mask) = &planes[q];
        for (lo, hi) in bins {
            let (mut d, mut p) = (Vec::new(), Vec::new());
            for r in &rows {
                if !(lo..hi).contains(&r[csn]) {
                    continue;
                }
                let (x, y) = (r[cx] as usize, r[cy] as usize);
                if x >= nx || y >= ny {
                    return Err(AccuracyError::Outside { x, y, nx, ny });
                }
                let k = c * nx * ny + y * nx + x;
                if mask[k] != 0.0 || ivar[k] <= 0.0 {
                    continue;
                }
                d.push(value[k] - r[t]);
                p.push((value[k] - r[t]) * ivar[k].sqrt());
            }
            if d.is_empty() {
                continue;
            }
            let n = d.len() as f64;
            let pull_mean = p.iter().sum::<f64>() / n;
            let pull_std = (p.iter().map(|v| (v - pull_mean).powi(2)).sum::<f64>()
                / (n - 1.0).max(1.0))
            .sqrt();
            out.push(GasAccuracy {
                channel: channel.clone(),
                quantity: ["flux", "V", "sigma"][q].to_string(),
                sn_min: lo,
                sn_max: hi,
                count: d.len(),
                bias: d.iter().sum::<f64>() / n,
                rms: (d.iter().map(|v| v * v).sum::<f64>() / n).sqrt(),
                pull_mean,
                pull_std,
            });
        }
    }
    Ok(out)
}

/// Stellar populations and dust against a synthetic cube's truth (`synth --dust`, `--sfh`):
/// one quantity in one S/N bin. Pulls only where the map has errors (A_V, and ages and [M/H]
/// with `fit-cube --bootstrap`); NaN otherwise.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PopulationAccuracy {
    /// `A_V` (STELLAR_AV, mag), `light_log_age` (STELLAR_AGE_LW, log10 yr) or `light_MH`
    /// (STELLAR_MH_LW, dex).
    pub quantity: String,
    pub sn_min: f64,
    pub sn_max: f64,
    pub count: usize,
    pub bias: f64,
    pub rms: f64,
    pub pull_mean: f64,
    pub pull_std: f64,
}

/// Compares the A_V and light-weighted age and [M/H] maps of `maps` with the truth table's
/// `A_V`, `light_log_age` and `light_MH` columns, per S/N bin (5-10, 10-20, 20-40, 40+).
/// A quantity is compared when the maps hold it and the truth has values for it (tables
/// written before these columns, or without `--sfh`, have none): an empty list means nothing
/// to compare.
pub fn compare_populations_with_truth(
    maps: &Path,
    truth: &Path,
) -> Result<Vec<PopulationAccuracy>, AccuracyError> {
    let text = std::fs::read_to_string(truth)
        .map_err(|e| AccuracyError::Truth(FitError::read(truth, e)))?;
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap_or_default().split(',').collect();
    let col = |name: &str| header.iter().position(|h| *h == name);
    let (Some(cx), Some(cy), Some(cin), Some(csn)) =
        (col("x"), col("y"), col("in_footprint"), col("SN"))
    else {
        return Err(AccuracyError::Truth(FitError::read(
            truth,
            "no x, y, in_footprint or SN column",
        )));
    };
    // (x, y, S/N, the row's fields)
    let mut rows: Vec<(usize, usize, f64, Vec<&str>)> = Vec::new();
    for (n, line) in lines.enumerate() {
        let f: Vec<&str> = line.split(',').collect();
        if f.get(cin) != Some(&"1") {
            continue;
        }
        let num = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok());
        match (num(cx), num(cy), num(csn)) {
            (Some(x), Some(y), Some(sn)) => rows.push((x as usize, y as usize, sn, f)),
            _ => {
                return Err(AccuracyError::Truth(FitError::read(
                    truth,
                    format!("line {}: bad x, y or SN", n + 2),
                )));
            }
        }
    }
    let mut f = FitsFile::open(maps).map_err(|e| AccuracyError::Maps {
        path: maps.to_path_buf(),
        message: e.to_string(),
    })?;
    let hdu = f.hdu("BINID").map_err(|e| AccuracyError::Maps {
        path: maps.to_path_buf(),
        message: e.to_string(),
    })?;
    let (nx, ny) = match &hdu.info {
        fitsio::hdu::HduInfo::ImageInfo { shape, .. } if shape.len() == 2 => (shape[1], shape[0]),
        _ => {
            return Err(AccuracyError::Maps {
                path: maps.to_path_buf(),
                message: "BINID is not a 2-D image".into(),
            });
        }
    };
    let bins = [
        (5.0, 10.0),
        (10.0, 20.0),
        (20.0, 40.0),
        (40.0, f64::INFINITY),
    ];
    let mut out = Vec::new();
    for (quantity, map, has_ivar) in [
        ("A_V", "STELLAR_AV", true),
        ("light_log_age", "STELLAR_AGE_LW", false),
        ("light_MH", "STELLAR_MH_LW", false),
    ] {
        let Some(c) = col(quantity) else { continue };
        if f.hdu(map).is_err() {
            continue;
        }
        let value = read_map(&mut f, maps, map)?;
        let mask = read_map(&mut f, maps, &format!("{map}_MASK"))?;
        // Ages and [M/H] have errors only with `fit-cube --bootstrap`.
        let ivar_name = format!("{map}_IVAR");
        let ivar = if has_ivar || f.hdu(ivar_name.as_str()).is_ok() {
            Some(read_map(&mut f, maps, &ivar_name)?)
        } else {
            None
        };
        for (lo, hi) in bins {
            let (mut d, mut p) = (Vec::new(), Vec::new());
            for (x, y, sn, fields) in &rows {
                let Some(t) = fields.get(c).and_then(|v| v.parse::<f64>().ok()) else {
                    continue;
                };
                if !(lo..hi).contains(sn) {
                    continue;
                }
                if *x >= nx || *y >= ny {
                    return Err(AccuracyError::Outside {
                        x: *x,
                        y: *y,
                        nx,
                        ny,
                    });
                }
                let k = y * nx + x;
                if mask[k] != 0.0 {
                    continue;
                }
                d.push(value[k] - t);
                if let Some(iv) = ivar.as_ref().filter(|iv| iv[k] > 0.0) {
                    p.push((value[k] - t) * iv[k].sqrt());
                }
            }
            if d.is_empty() {
                continue;
            }
            let n = d.len() as f64;
            let (pull_mean, pull_std) = if p.len() >= 2 {
                let m = p.iter().sum::<f64>() / p.len() as f64;
                let s =
                    (p.iter().map(|v| (v - m).powi(2)).sum::<f64>() / (p.len() - 1) as f64).sqrt();
                (m, s)
            } else {
                (f64::NAN, f64::NAN)
            };
            out.push(PopulationAccuracy {
                quantity: quantity.to_string(),
                sn_min: lo,
                sn_max: hi,
                count: d.len(),
                bias: d.iter().sum::<f64>() / n,
                rms: (d.iter().map(|v| v * v).sum::<f64>() / n).sqrt(),
                pull_mean,
                pull_std,
            });
        }
    }
    Ok(out)
}

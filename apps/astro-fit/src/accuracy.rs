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

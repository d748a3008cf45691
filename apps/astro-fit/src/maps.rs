//! Science outputs of a cube fit: a MAPS FITS file in the spirit of the MaNGA DAP (one image
//! extension per quantity with `_IVAR` and `_MASK` companions), a model cube, and a JSON summary.

use std::path::{Path, PathBuf};

use fitsio::FitsFile;
use fitsio::images::{ImageDescription, ImageType};
use serde::{Deserialize, Serialize};

use crate::cube::CubeMeta;

/// Per-spaxel mask bits of the MAPS extensions (a subset of `MANGA_DAPPIXMASK`, same meaning).
pub const MASK_NOCOV: i32 = 1 << 0;
pub const MASK_NOVALUE: i32 = 1 << 4;
pub const MASK_FITFAILED: i32 = 1 << 7;
pub const MASK_DONOTUSE: i32 = 1 << 30;

/// A value with its 1-sigma error (NaN error: unknown).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Measured {
    pub value: f64,
    pub error: f64,
}

/// Everything measured for one bin, in the units of the MAPS file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BinResult {
    pub bin: usize,
    /// km/s relative to the systemic redshift (pPXF convention).
    pub velocity: Measured,
    pub sigma: Measured,
    pub h3: Option<Measured>,
    pub h4: Option<Measured>,
    /// log10(age / yr) and [M/H], light- and mass-weighted, when populations were fitted.
    pub age_lw: Option<f64>,
    pub metallicity_lw: Option<f64>,
    pub age_mw: Option<f64>,
    pub metallicity_mw: Option<f64>,
    /// Reduced chi^2 of the fit.
    pub chi2: f64,
    pub sn: f64,
    /// Why the fit failed, when it did (other fields are then NaN).
    pub failure: Option<String>,
}

impl BinResult {
    pub fn failed(bin: usize, sn: f64, why: String) -> Self {
        let nan = Measured {
            value: f64::NAN,
            error: f64::NAN,
        };
        BinResult {
            bin,
            velocity: nan,
            sigma: nan,
            h3: None,
            h4: None,
            age_lw: None,
            metallicity_lw: None,
            age_mw: None,
            metallicity_mw: None,
            chi2: f64::NAN,
            sn,
            failure: Some(why),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MapsError {
    #[error("writing {path}: {message}")]
    Fits { path: PathBuf, message: String },
    #[error("writing {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("bin id map has {got} values for a {nx}x{ny} cube")]
    BadBinMap { got: usize, nx: usize, ny: usize },
    #[error("result for bin {bin} but only {nbins} bins exist")]
    UnknownBin { bin: usize, nbins: usize },
}

fn fits_err(path: &Path) -> impl Fn(fitsio::errors::Error) -> MapsError + '_ {
    move |e| MapsError::Fits {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

/// Spatial layout of the maps: the bin of every spaxel (`None` outside what was fitted).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BinMap {
    pub nx: usize,
    pub ny: usize,
    pub bin_of: Vec<Option<usize>>,
}

impl BinMap {
    pub fn from_bins(nx: usize, ny: usize, bins: &[crate::plan::BinSpec]) -> Self {
        let mut bin_of = vec![None; nx * ny];
        for b in bins {
            for s in &b.spaxels {
                bin_of[s[1] as usize * nx + s[0] as usize] = Some(b.id);
            }
        }
        BinMap { nx, ny, bin_of }
    }
}

/// One quantity of the MAPS file: how to extract it from a result, its unit.
struct Quantity {
    name: &'static str,
    unit: &'static str,
    get: fn(&BinResult) -> Option<Measured>,
}

fn plain(v: Option<f64>) -> Option<Measured> {
    v.map(|value| Measured {
        value,
        error: f64::NAN,
    })
}

const QUANTITIES: [Quantity; 10] = [
    Quantity {
        name: "STELLAR_VEL",
        unit: "km/s",
        get: |r| Some(r.velocity),
    },
    Quantity {
        name: "STELLAR_SIGMA",
        unit: "km/s",
        get: |r| Some(r.sigma),
    },
    Quantity {
        name: "STELLAR_H3",
        unit: "",
        get: |r| r.h3,
    },
    Quantity {
        name: "STELLAR_H4",
        unit: "",
        get: |r| r.h4,
    },
    Quantity {
        name: "STELLAR_AGE_LW",
        unit: "log10(yr)",
        get: |r| plain(r.age_lw),
    },
    Quantity {
        name: "STELLAR_MH_LW",
        unit: "dex",
        get: |r| plain(r.metallicity_lw),
    },
    Quantity {
        name: "STELLAR_AGE_MW",
        unit: "log10(yr)",
        get: |r| plain(r.age_mw),
    },
    Quantity {
        name: "STELLAR_MH_MW",
        unit: "dex",
        get: |r| plain(r.metallicity_mw),
    },
    Quantity {
        name: "STELLAR_CHI2",
        unit: "",
        get: |r| plain(Some(r.chi2)),
    },
    Quantity {
        name: "BIN_SNR",
        unit: "",
        get: |r| plain(Some(r.sn)),
    },
];

/// The MAPS quantities as images (value, ivar, mask), row-major `y * nx + x`.
pub struct MapImages {
    pub name: &'static str,
    pub unit: &'static str,
    pub value: Vec<f32>,
    pub ivar: Vec<f32>,
    pub mask: Vec<i32>,
}

/// Spreads per-bin results over the spaxel grid.
pub fn map_images(
    map: &BinMap,
    results: &[Option<BinResult>],
) -> Result<Vec<MapImages>, MapsError> {
    if map.bin_of.len() != map.nx * map.ny {
        return Err(MapsError::BadBinMap {
            got: map.bin_of.len(),
            nx: map.nx,
            ny: map.ny,
        });
    }
    if let Some(bin) = map.bin_of.iter().flatten().find(|b| **b >= results.len()) {
        return Err(MapsError::UnknownBin {
            bin: *bin,
            nbins: results.len(),
        });
    }
    Ok(QUANTITIES
        .iter()
        .map(|q| {
            let n = map.bin_of.len();
            let mut img = MapImages {
                name: q.name,
                unit: q.unit,
                value: vec![0.0; n],
                ivar: vec![0.0; n],
                mask: vec![MASK_NOCOV | MASK_DONOTUSE; n],
            };
            for (i, bin) in map.bin_of.iter().enumerate() {
                let Some(bin) = bin else { continue };
                let Some(result) = &results[*bin] else {
                    img.mask[i] = MASK_NOVALUE | MASK_DONOTUSE;
                    continue;
                };
                match (q.get)(result) {
                    _ if result.failure.is_some() => img.mask[i] = MASK_FITFAILED | MASK_DONOTUSE,
                    Some(m) if m.value.is_finite() => {
                        img.value[i] = m.value as f32;
                        img.ivar[i] = if m.error.is_finite() && m.error > 0.0 {
                            (1.0 / (m.error * m.error)) as f32
                        } else {
                            0.0
                        };
                        img.mask[i] = 0;
                    }
                    _ => img.mask[i] = MASK_NOVALUE | MASK_DONOTUSE,
                }
            }
            img
        })
        .collect())
}

fn write_image<T>(
    f: &mut FitsFile,
    path: &Path,
    name: &str,
    kind: ImageType,
    dims: &[usize],
    data: &[T],
    keys: &[(&str, String)],
) -> Result<(), MapsError>
where
    T: fitsio::images::WriteImage,
{
    let hdu = f
        .create_image(
            name,
            &ImageDescription {
                data_type: kind,
                dimensions: dims,
            },
        )
        .map_err(fits_err(path))?;
    hdu.write_image(f, data).map_err(fits_err(path))?;
    for (k, v) in keys {
        hdu.write_key(f, k, v.as_str()).map_err(fits_err(path))?;
    }
    Ok(())
}

/// Writes `path` (replacing it): primary header with the cube's metadata, then BINID and, per
/// quantity, `Q`, `Q_IVAR`, `Q_MASK`. Written to a temporary name and renamed, so a reader
/// never sees half a file.
pub fn write_maps(
    path: &Path,
    meta: &CubeMeta,
    map: &BinMap,
    results: &[Option<BinResult>],
) -> Result<(), MapsError> {
    let images = map_images(map, results)?;
    let tmp = path.with_extension("fits.partial");
    let _ = std::fs::remove_file(&tmp);
    let mut f = FitsFile::create(&tmp).open().map_err(fits_err(&tmp))?;
    let primary = f.primary_hdu().map_err(fits_err(&tmp))?;
    primary
        .write_key(&mut f, "AUTHOR", "astro-fit")
        .map_err(fits_err(&tmp))?;
    primary
        .write_key(&mut f, "CUBEFMT", meta.format.to_string().as_str())
        .map_err(fits_err(&tmp))?;
    primary
        .write_key(&mut f, "PIXSCALE", meta.pixel_scale_arcsec)
        .map_err(fits_err(&tmp))?;
    let dims = [map.ny, map.nx];
    let binid: Vec<i32> = map
        .bin_of
        .iter()
        .map(|b| b.map_or(-1, |b| b as i32))
        .collect();
    write_image(
        &mut f,
        &tmp,
        "BINID",
        ImageType::Long,
        &dims,
        &binid,
        &[("BUNIT", String::new())],
    )?;
    for img in &images {
        let unit = [("BUNIT", img.unit.to_string())];
        write_image(
            &mut f,
            &tmp,
            img.name,
            ImageType::Float,
            &dims,
            &img.value,
            &unit,
        )?;
        write_image(
            &mut f,
            &tmp,
            &format!("{}_IVAR", img.name),
            ImageType::Float,
            &dims,
            &img.ivar,
            &[],
        )?;
        let masks = [("MASKNAME", "MANGA_DAPPIXMASK".to_string())];
        write_image(
            &mut f,
            &tmp,
            &format!("{}_MASK", img.name),
            ImageType::Long,
            &dims,
            &img.mask,
            &masks,
        )?;
    }
    drop(f);
    std::fs::rename(&tmp, path).map_err(|source| MapsError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Streams a model cube to disk: MODEL (x, y, wavelength) filled one row band at a time, then
/// WAVE. `model_of_row_band(rows)` returns the band's models spectrum-contiguous, as
/// [`crate::cube::SpaxelBlock`] lays them out (zeros where nothing was fitted).
pub fn write_model_cube(
    path: &Path,
    meta: &CubeMeta,
    rows_per_band: usize,
    mut model_of_row_band: impl FnMut(std::ops::Range<usize>) -> Result<Vec<f32>, MapsError>,
) -> Result<(), MapsError> {
    let (nx, ny, nwave) = (meta.nx, meta.ny, meta.nwave());
    let tmp = path.with_extension("fits.partial");
    let _ = std::fs::remove_file(&tmp);
    let mut f = FitsFile::create(&tmp).open().map_err(fits_err(&tmp))?;
    let hdu = f
        .create_image(
            "MODEL",
            &ImageDescription {
                data_type: ImageType::Float,
                dimensions: &[nwave, ny, nx],
            },
        )
        .map_err(fits_err(&tmp))?;
    hdu.write_key(&mut f, "BUNIT", meta.flux_unit.as_str())
        .map_err(fits_err(&tmp))?;
    let step = rows_per_band.max(1);
    for y0 in (0..ny).step_by(step) {
        let rows = y0..(y0 + step).min(ny);
        let band = model_of_row_band(rows.clone())?;
        let nspax = rows.len() * nx;
        // Back to file order [k][y][x].
        let mut file_order = vec![0f32; band.len()];
        for s in 0..nspax {
            for k in 0..nwave {
                file_order[k * nspax + s] = band[s * nwave + k];
            }
        }
        hdu.write_region(&mut f, &[&(0..nx), &rows, &(0..nwave)], &file_order)
            .map_err(fits_err(&tmp))?;
    }
    write_image(
        &mut f,
        &tmp,
        "WAVE",
        ImageType::Double,
        &[nwave],
        &meta.wavelength,
        &[("BUNIT", "Angstrom".to_string())],
    )?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(|source| MapsError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Writes `value` as pretty JSON to `path` atomically (temporary file, then rename).
pub fn write_json_atomic<T: Serialize>(path: &Path, value: &T) -> Result<(), MapsError> {
    let io = |source| MapsError::Io {
        path: path.to_path_buf(),
        source,
    };
    let tmp = path.with_extension("json.partial");
    let text = serde_json::to_vec_pretty(value).map_err(|e| io(std::io::Error::other(e)))?;
    std::fs::write(&tmp, text).map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::cube::{CubeFormat, WavelengthMedium};

    pub(crate) fn meta(nx: usize, ny: usize, nwave: usize) -> CubeMeta {
        CubeMeta {
            format: CubeFormat::MangaLogcube,
            nx,
            ny,
            wavelength: (0..nwave).map(|k| 4000.0 + k as f64).collect(),
            medium: WavelengthMedium::Vacuum,
            log_sampled: false,
            resolution: None,
            pixel_scale_arcsec: 0.5,
            flux_unit: "1E-17 erg/s/cm^2/Ang/spaxel".into(),
            noise_stored_as: None,
            ebv_galactic: None,
            redshift: None,
        }
    }

    fn result(bin: usize, v: f64) -> BinResult {
        BinResult {
            bin,
            velocity: Measured {
                value: v,
                error: 2.0,
            },
            sigma: Measured {
                value: 100.0,
                error: 4.0,
            },
            h3: None,
            h4: None,
            age_lw: Some(9.5),
            metallicity_lw: Some(-0.2),
            age_mw: None,
            metallicity_mw: None,
            chi2: 1.1,
            sn: 30.0,
            failure: None,
        }
    }

    /// Opens every FITS with astropy when Python has it; says so and returns false otherwise.
    pub(crate) fn astropy_opens(paths: &[&Path]) -> bool {
        let has = std::process::Command::new("python3")
            .args(["-c", "import astropy"])
            .output()
            .is_ok_and(|o| o.status.success());
        if !has {
            println!(
                "skipped: python3 with astropy is absent, FITS files not checked with astropy"
            );
            return false;
        }
        for p in paths {
            let script = "import sys; from astropy.io import fits\n\
                          with fits.open(sys.argv[1]) as h:\n    h.verify('exception')\n    [x.data for x in h]\n    print(len(h))";
            let out = std::process::Command::new("python3")
                .args(["-c", script])
                .arg(p)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "astropy cannot read {}: {}",
                p.display(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        true
    }

    #[test]
    fn maps_spread_bins_and_flag_what_was_not_fitted() {
        // 3x2 grid: bins 0 and 1 fitted, bin 2 failed, spaxel 5 outside.
        let map = BinMap {
            nx: 3,
            ny: 2,
            bin_of: vec![Some(0), Some(0), Some(1), Some(2), Some(3), None],
        };
        let results = vec![
            Some(result(0, -50.0)),
            Some(result(1, 80.0)),
            Some(BinResult::failed(2, 3.0, "no good pixels".into())),
            None,
        ];
        let imgs = map_images(&map, &results).unwrap();
        let vel = imgs.iter().find(|i| i.name == "STELLAR_VEL").unwrap();
        assert_eq!(vel.value[..3], [-50.0, -50.0, 80.0]);
        assert_eq!(vel.ivar[0], 0.25);
        assert_eq!(vel.mask[..3], [0, 0, 0]);
        assert_eq!(vel.mask[3], MASK_FITFAILED | MASK_DONOTUSE);
        assert_eq!(vel.mask[4], MASK_NOVALUE | MASK_DONOTUSE);
        assert_eq!(vel.mask[5], MASK_NOCOV | MASK_DONOTUSE);
        let h3 = imgs.iter().find(|i| i.name == "STELLAR_H3").unwrap();
        assert_eq!(h3.mask[0], MASK_NOVALUE | MASK_DONOTUSE);
        let bad = BinMap {
            nx: 1,
            ny: 1,
            bin_of: vec![Some(9)],
        };
        assert!(matches!(
            map_images(&bad, &results),
            Err(MapsError::UnknownBin { bin: 9, .. })
        ));
    }

    #[test]
    fn maps_and_model_cube_are_valid_fits() {
        let dir = tempfile::tempdir().unwrap();
        let meta = meta(3, 2, 5);
        let map = BinMap {
            nx: 3,
            ny: 2,
            bin_of: vec![Some(0), Some(0), Some(1), Some(1), None, Some(0)],
        };
        let maps = dir.path().join("maps.fits");
        write_maps(
            &maps,
            &meta,
            &map,
            &[Some(result(0, 10.0)), Some(result(1, 20.0))],
        )
        .unwrap();
        let model = dir.path().join("model.fits");
        // Model value = 1000 y + 100 x + k, to check the band writer's ordering.
        write_model_cube(&model, &meta, 1, |rows| {
            let mut out = Vec::new();
            for y in rows {
                for x in 0..3 {
                    out.extend((0..5).map(|k| (1000 * y + 100 * x + k) as f32));
                }
            }
            Ok(out)
        })
        .unwrap();
        let mut f = FitsFile::open(&maps).unwrap();
        let hdu = f.hdu("STELLAR_VEL").unwrap();
        let v: Vec<f32> = hdu.read_image(&mut f).unwrap();
        assert_eq!(v, vec![10.0, 10.0, 20.0, 20.0, 0.0, 10.0]);
        let binid: Vec<i32> = f.hdu("BINID").unwrap().read_image(&mut f).unwrap();
        assert_eq!(binid, vec![0, 0, 1, 1, -1, 0]);
        let mut m = FitsFile::open(&model).unwrap();
        let hdu = m.hdu("MODEL").unwrap();
        let px: Vec<f32> = hdu
            .read_region(&mut m, &[&(2..3), &(1..2), &(4..5)])
            .unwrap();
        assert_eq!(px, vec![1204.0]);
        astropy_opens(&[&maps, &model]);
    }
}

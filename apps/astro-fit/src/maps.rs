//! Science outputs of a cube fit: a MAPS FITS file in the layout of the MaNGA DAP's (one image
//! extension per fitted quantity with `_IVAR` and `_MASK` companions where they carry
//! something, the cube's celestial WCS on every map, the fit's provenance in the primary
//! header), a model cube, and a JSON summary.

use std::path::{Path, PathBuf};

use fitsio::FitsFile;
use fitsio::hdu::FitsHdu;
use fitsio::images::{ImageDescription, ImageType};
use serde::{Deserialize, Serialize};

use crate::cube::{CubeMeta, KeyValue};
use crate::populations::SfhEntry;

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
    /// Gas fitted with the stars: per gas template, in the order of the fit's templates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gas: Option<Vec<GasLineResult>>,
    /// The star-formation history (SSPs with positive weight) when populations were fitted;
    /// `assemble` writes every bin's into `sfh.csv`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sfh: Option<Vec<SfhEntry>>,
    /// Stellar attenuation A_V (mag, Calzetti 2000) when fitted (`--reddening`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reddening: Option<Measured>,
    /// Bootstrap errors (`--bootstrap`) of `age_lw` and `metallicity_lw`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub age_lw_error: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metallicity_lw_error: Option<f64>,
}

/// One gas template of one bin: its flux (both lines of a doublet; in the cube's flux unit
/// times Angstrom), and the V and sigma (km/s) of its kinematic component.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct GasLineResult {
    pub flux: Measured,
    pub vel: Measured,
    pub sigma: Measured,
}

/// One channel of the `EMLINE_G*` extensions: a physical line, named as the MaNGA DAP names
/// its channels (`Ha-6564`, `OIII-5008`), taken from gas template `template`, holding `share`
/// of its flux (a doublet's template holds two lines in a fixed ratio).
#[derive(Debug, Clone, PartialEq)]
pub struct GasChannel {
    pub name: String,
    pub template: usize,
    pub share: f64,
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
            gas: None,
            sfh: None,
            reddening: None,
            age_lw_error: None,
            metallicity_lw_error: None,
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

/// Which quantities a fit measured: the MAPS file holds those only (a quantity that was not
/// fitted is absent, never a plane of zeros that would look like a measurement).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fitted {
    /// Gauss-Hermite moments fitted: 2 (V, sigma) or 4 and 6 (also h3, h4; h5 and h6 are not
    /// mapped).
    pub moments: usize,
    /// Light-weighted log age and [M/H]; the mass-weighted ones too where the library gives
    /// masses (some bin has them).
    pub populations: bool,
    /// Stellar attenuation A_V (`--reddening`).
    pub reddening: bool,
}

impl Fitted {
    /// What `results` say was measured (for callers without the fit's settings).
    pub fn from_results(results: &[Option<BinResult>]) -> Self {
        let done = || results.iter().flatten();
        Fitted {
            moments: if done().any(|r| r.h3.is_some()) { 4 } else { 2 },
            populations: done().any(|r| r.age_lw.is_some()),
            reddening: done().any(|r| r.reddening.is_some()),
        }
    }
}

/// What a MAPS file's primary header says besides the cube's metadata: which quantities were
/// fitted and where they came from (`(keyword, value, comment)`, written in this order).
#[derive(Debug, Clone, PartialEq)]
pub struct MapsHeader {
    pub fitted: Fitted,
    pub provenance: Vec<(String, KeyValue, String)>,
    /// Channels of the emission-line extensions; empty: gas was not fitted.
    pub gas_channels: Vec<GasChannel>,
}

impl MapsHeader {
    /// No provenance; the quantities from the results.
    pub fn from_results(results: &[Option<BinResult>]) -> Self {
        MapsHeader {
            fitted: Fitted::from_results(results),
            provenance: Vec::new(),
            gas_channels: Vec::new(),
        }
    }
}

/// When a quantity is in the MAPS file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Needs {
    Always,
    /// moments >= 4.
    HigherMoments,
    Populations,
    /// Populations, and some bin has mass-weighted values.
    MassWeighted,
    Reddening,
}

/// One quantity of the MAPS file: how to extract it from a result, its unit, and which
/// companions it has (an `_IVAR` plane only with errors, an `_MASK` plane only where being
/// measured or not is per spaxel).
struct Quantity {
    name: &'static str,
    unit: &'static str,
    ivar_unit: &'static str,
    get: fn(&BinResult) -> Option<Measured>,
    ivar: bool,
    mask: bool,
    needs: Needs,
}

/// A value with an error that only some fits measure (NaN: none).
fn with_error(v: Option<f64>, error: Option<f64>) -> Option<Measured> {
    v.map(|value| Measured {
        value,
        error: error.unwrap_or(f64::NAN),
    })
}

/// Quantities whose `_IVAR` is written only when some bin has an error for them (the
/// light-weighted age and [M/H] with `--bootstrap`): otherwise it would be a plane of zeros.
const IVAR_WHEN_MEASURED: [&str; 2] = ["STELLAR_AGE_LW", "STELLAR_MH_LW"];

fn plain(v: Option<f64>) -> Option<Measured> {
    v.map(|value| Measured {
        value,
        error: f64::NAN,
    })
}

/// In the MaNGA DAP's order: bin S/N, then the stellar kinematics, the fit quality, the
/// populations, then the dust (not a DAP quantity: the DAP fits no stellar attenuation).
const QUANTITIES: [Quantity; 11] = [
    Quantity {
        name: "BIN_SNR",
        unit: "",
        ivar_unit: "",
        get: |r| plain(Some(r.sn)),
        ivar: false,
        mask: false,
        needs: Needs::Always,
    },
    Quantity {
        name: "STELLAR_VEL",
        unit: "km/s",
        ivar_unit: "(km/s)^{-2}",
        get: |r| Some(r.velocity),
        ivar: true,
        mask: true,
        needs: Needs::Always,
    },
    Quantity {
        name: "STELLAR_SIGMA",
        unit: "km/s",
        ivar_unit: "(km/s)^{-2}",
        get: |r| Some(r.sigma),
        ivar: true,
        mask: true,
        needs: Needs::Always,
    },
    Quantity {
        name: "STELLAR_H3",
        unit: "",
        ivar_unit: "",
        get: |r| r.h3,
        ivar: true,
        mask: true,
        needs: Needs::HigherMoments,
    },
    Quantity {
        name: "STELLAR_H4",
        unit: "",
        ivar_unit: "",
        get: |r| r.h4,
        ivar: true,
        mask: true,
        needs: Needs::HigherMoments,
    },
    Quantity {
        name: "STELLAR_CHI2",
        unit: "",
        ivar_unit: "",
        get: |r| plain(Some(r.chi2)),
        ivar: false,
        mask: true,
        needs: Needs::Always,
    },
    Quantity {
        name: "STELLAR_AGE_LW",
        unit: "log10(yr)",
        ivar_unit: "log10(yr)^-2",
        get: |r| with_error(r.age_lw, r.age_lw_error),
        ivar: false,
        mask: true,
        needs: Needs::Populations,
    },
    Quantity {
        name: "STELLAR_MH_LW",
        unit: "dex",
        ivar_unit: "dex^-2",
        get: |r| with_error(r.metallicity_lw, r.metallicity_lw_error),
        ivar: false,
        mask: true,
        needs: Needs::Populations,
    },
    Quantity {
        name: "STELLAR_AGE_MW",
        unit: "log10(yr)",
        ivar_unit: "",
        get: |r| plain(r.age_mw),
        ivar: false,
        mask: true,
        needs: Needs::MassWeighted,
    },
    Quantity {
        name: "STELLAR_MH_MW",
        unit: "dex",
        ivar_unit: "",
        get: |r| plain(r.metallicity_mw),
        ivar: false,
        mask: true,
        needs: Needs::MassWeighted,
    },
    Quantity {
        name: "STELLAR_AV",
        unit: "mag",
        ivar_unit: "mag^-2",
        get: |r| r.reddening,
        ivar: true,
        mask: true,
        needs: Needs::Reddening,
    },
];

/// The MAPS quantities as images, row-major `y * nx + x`: the value, its inverse variance
/// where it has errors, its `MANGA_DAPPIXMASK` mask where it has one.
pub struct MapImages {
    pub name: &'static str,
    pub unit: &'static str,
    pub ivar_unit: &'static str,
    pub value: Vec<f32>,
    pub ivar: Option<Vec<f32>>,
    pub mask: Option<Vec<i32>>,
}

/// Spreads per-bin results over the spaxel grid, for the quantities that were `fitted`.
pub fn map_images(
    map: &BinMap,
    results: &[Option<BinResult>],
    fitted: Fitted,
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
    let mass_weighted = results.iter().flatten().any(|r| r.age_mw.is_some());
    let wanted = |needs: Needs| match needs {
        Needs::Always => true,
        Needs::HigherMoments => fitted.moments >= 4,
        Needs::Populations => fitted.populations,
        Needs::MassWeighted => fitted.populations && mass_weighted,
        Needs::Reddening => fitted.reddening,
    };
    Ok(QUANTITIES
        .iter()
        .filter(|q| wanted(q.needs))
        .map(|q| {
            let n = map.bin_of.len();
            let mut value = vec![0f32; n];
            let mut ivar = vec![0f32; n];
            let mut mask = vec![MASK_NOCOV | MASK_DONOTUSE; n];
            for (i, bin) in map.bin_of.iter().enumerate() {
                let Some(bin) = bin else { continue };
                let Some(result) = &results[*bin] else {
                    mask[i] = MASK_NOVALUE | MASK_DONOTUSE;
                    continue;
                };
                // A failed fit's S/N is still its bin's S/N.
                let failed = result.failure.is_some() && q.mask;
                match (q.get)(result) {
                    _ if failed => mask[i] = MASK_FITFAILED | MASK_DONOTUSE,
                    Some(m) if m.value.is_finite() => {
                        value[i] = m.value as f32;
                        ivar[i] = if m.error.is_finite() && m.error > 0.0 {
                            (1.0 / (m.error * m.error)) as f32
                        } else {
                            0.0
                        };
                        mask[i] = 0;
                    }
                    _ => mask[i] = MASK_NOVALUE | MASK_DONOTUSE,
                }
            }
            MapImages {
                name: q.name,
                unit: q.unit,
                ivar_unit: q.ivar_unit,
                value,
                ivar: (q.ivar
                    || (IVAR_WHEN_MEASURED.contains(&q.name) && ivar.iter().any(|v| *v > 0.0)))
                .then_some(ivar),
                mask: q.mask.then_some(mask),
            }
        })
        .collect())
}

/// The MaNGA DAP's Gaussian emission-line extensions, one channel per line, as images of
/// `channels.len() * nx * ny` values (channel-major, then `y * nx + x`).
pub struct GasImages {
    pub name: &'static str,
    pub unit: &'static str,
    pub ivar_unit: &'static str,
    pub value: Vec<f32>,
    pub ivar: Vec<f32>,
    pub mask: Vec<i32>,
}

/// `EMLINE_GFLUX`, `EMLINE_GVEL` and `EMLINE_GSIGMA` with their inverse variances and masks.
pub fn gas_images(
    map: &BinMap,
    results: &[Option<BinResult>],
    channels: &[GasChannel],
) -> Vec<GasImages> {
    type Get = fn(&GasLineResult) -> Measured;
    let quantities: [(&'static str, &'static str, &'static str, Get, bool); 3] = [
        (
            "EMLINE_GFLUX",
            "cube flux unit * Angstrom",
            "(cube flux unit * Angstrom)^{-2}",
            |g| g.flux,
            true,
        ),
        ("EMLINE_GVEL", "km/s", "(km/s)^{-2}", |g| g.vel, false),
        ("EMLINE_GSIGMA", "km/s", "(km/s)^{-2}", |g| g.sigma, false),
    ];
    let n = map.bin_of.len();
    quantities
        .iter()
        .map(|&(name, unit, ivar_unit, get, scaled)| {
            let mut value = vec![0f32; channels.len() * n];
            let mut ivar = vec![0f32; channels.len() * n];
            let mut mask = vec![MASK_NOCOV | MASK_DONOTUSE; channels.len() * n];
            for (c, ch) in channels.iter().enumerate() {
                for (i, bin) in map.bin_of.iter().enumerate() {
                    let k = c * n + i;
                    let Some(bin) = bin else { continue };
                    let Some(result) = results.get(*bin).and_then(Option::as_ref) else {
                        mask[k] = MASK_NOVALUE | MASK_DONOTUSE;
                        continue;
                    };
                    if result.failure.is_some() {
                        mask[k] = MASK_FITFAILED | MASK_DONOTUSE;
                        continue;
                    }
                    let Some(m) = result
                        .gas
                        .as_ref()
                        .and_then(|g| g.get(ch.template))
                        .map(get)
                        .filter(|m| m.value.is_finite())
                    else {
                        mask[k] = MASK_NOVALUE | MASK_DONOTUSE;
                        continue;
                    };
                    let f = if scaled { ch.share } else { 1.0 };
                    value[k] = (m.value * f) as f32;
                    let e = m.error * f;
                    ivar[k] = if e.is_finite() && e > 0.0 {
                        (1.0 / (e * e)) as f32
                    } else {
                        0.0
                    };
                    mask[k] = 0;
                }
            }
            GasImages {
                name,
                unit,
                ivar_unit,
                value,
                ivar,
                mask,
            }
        })
        .collect()
}

/// A header card to write: keyword, value, comment (empty: none).
type Card = (String, KeyValue, String);

fn card(key: &str, value: KeyValue, comment: &str) -> Card {
    (key.to_string(), value, comment.to_string())
}

fn text(v: &str) -> KeyValue {
    KeyValue::Text(v.to_string())
}

fn write_card(f: &mut FitsFile, hdu: &FitsHdu, path: &Path, c: &Card) -> Result<(), MapsError> {
    let (key, value, comment) = c;
    let comment = comment.as_str();
    let written = match (value, comment.is_empty()) {
        (KeyValue::Text(v), true) => hdu.write_key(f, key, v.as_str()),
        (KeyValue::Text(v), false) => hdu.write_key(f, key, (v.as_str(), comment)),
        (KeyValue::Integer(v), true) => hdu.write_key(f, key, *v),
        (KeyValue::Integer(v), false) => hdu.write_key(f, key, (*v, comment)),
        (KeyValue::Number(v), true) => hdu.write_key(f, key, *v),
        (KeyValue::Number(v), false) => hdu.write_key(f, key, (*v, comment)),
    };
    written.map_err(fits_err(path))
}

fn write_image<T>(
    f: &mut FitsFile,
    path: &Path,
    name: &str,
    kind: ImageType,
    dims: &[usize],
    data: &[T],
    cards: &[Card],
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
    for c in cards {
        write_card(f, &hdu, path, c)?;
    }
    Ok(())
}

/// The current UTC time as FITS `DATE` (`YYYY-MM-DDThh:mm:ss`).
pub fn utc_now_fits() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    fits_date(secs)
}

/// `YYYY-MM-DDThh:mm:ss` of `secs` after 1970-01-01T00:00:00 UTC (proleptic Gregorian).
fn fits_date(secs: u64) -> String {
    let (days, rest) = ((secs / 86_400) as i64, secs % 86_400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60
    )
}

/// Writes `path` (replacing it) with the quantities in `fitted` only, the layout of the MaNGA
/// DAP's MAPS files: a primary header with the cube's metadata and `header`'s provenance,
/// then BINID and, per quantity, `Q`, `Q_IVAR` (where it has errors) and `Q_MASK` (where it
/// has a mask, `MANGA_DAPPIXMASK` bits). Every map carries the cube's celestial WCS. Written to
/// a temporary name and renamed, so a reader never sees half a file.
pub fn write_maps_with(
    path: &Path,
    meta: &CubeMeta,
    map: &BinMap,
    results: &[Option<BinResult>],
    header: &MapsHeader,
) -> Result<(), MapsError> {
    let images = map_images(map, results, header.fitted)?;
    let tmp = path.with_extension("fits.partial");
    let _ = std::fs::remove_file(&tmp);
    let mut f = FitsFile::create(&tmp).open().map_err(fits_err(&tmp))?;
    let primary = f.primary_hdu().map_err(fits_err(&tmp))?;
    let mut cards = vec![
        card("AUTHOR", text("astro-fit"), ""),
        card(
            "CREATOR",
            text(concat!("astro-fit ", env!("CARGO_PKG_VERSION"))),
            "program that wrote this file",
        ),
        card(
            "DATE",
            text(&utc_now_fits()),
            "UTC date and time this file was written",
        ),
        card(
            "CUBEFMT",
            text(&meta.format.to_string()),
            "format of the cube",
        ),
        card(
            "PIXSCALE",
            KeyValue::Number(meta.pixel_scale_arcsec),
            "[arcsec] spaxel size",
        ),
    ];
    cards.extend(
        meta.target
            .iter()
            .map(|c| card(&c.key, c.value.clone(), "from the cube's header")),
    );
    cards.extend(header.provenance.iter().cloned());
    for c in &cards {
        write_card(&mut f, &primary, &tmp, c)?;
    }
    let wcs: Vec<Card> = meta
        .celestial_wcs
        .iter()
        .map(|c| card(&c.key, c.value.clone(), ""))
        .collect();
    let with_wcs = |mut own: Vec<Card>| {
        own.extend(wcs.iter().cloned());
        own
    };
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
        &with_wcs(vec![
            card("BUNIT", text(""), ""),
            card("HDUCLAS1", text("IMAGE"), ""),
            card(
                "HDUCLAS2",
                text("DATA"),
                "bin of each spaxel, -1: not fitted",
            ),
        ]),
    )?;
    for img in &images {
        let ivar_name = format!("{}_IVAR", img.name);
        let mask_name = format!("{}_MASK", img.name);
        let mut own = vec![
            card("BUNIT", text(img.unit), ""),
            card("HDUCLAS1", text("IMAGE"), ""),
            card("HDUCLAS2", text("DATA"), ""),
        ];
        if img.ivar.is_some() {
            own.push(card("ERRDATA", text(&ivar_name), "inverse variance"));
        }
        if img.mask.is_some() {
            own.push(card("QUALDATA", text(&mask_name), "MANGA_DAPPIXMASK bits"));
        }
        write_image(
            &mut f,
            &tmp,
            img.name,
            ImageType::Float,
            &dims,
            &img.value,
            &with_wcs(own),
        )?;
        if let Some(ivar) = &img.ivar {
            write_image(
                &mut f,
                &tmp,
                &ivar_name,
                ImageType::Float,
                &dims,
                ivar,
                &with_wcs(vec![
                    card("BUNIT", text(img.ivar_unit), ""),
                    card("HDUCLAS1", text("IMAGE"), ""),
                    card("HDUCLAS2", text("ERROR"), ""),
                    card("HDUCLAS3", text("INVMSE"), ""),
                    card("SCIDATA", text(img.name), ""),
                ]),
            )?;
        }
        if let Some(mask) = &img.mask {
            write_image(
                &mut f,
                &tmp,
                &mask_name,
                ImageType::Long,
                &dims,
                mask,
                &with_wcs(vec![
                    card("HDUCLAS1", text("IMAGE"), ""),
                    card("HDUCLAS2", text("QUALITY"), ""),
                    card("HDUCLAS3", text("FLAG32BIT"), ""),
                    card("SCIDATA", text(img.name), ""),
                    card("MASKNAME", text("MANGA_DAPPIXMASK"), ""),
                ]),
            )?;
        }
    }
    let channels = &header.gas_channels;
    if !channels.is_empty() {
        let gdims = [channels.len(), map.ny, map.nx];
        // Channel names in C1, C2, ... as the DAP writes them.
        let names: Vec<Card> = channels
            .iter()
            .enumerate()
            .map(|(k, c)| card(&format!("C{}", k + 1), text(&c.name), "Data in channel"))
            .collect();
        let with = |mut own: Vec<Card>| {
            own.extend(names.iter().cloned());
            with_wcs(own)
        };
        for img in gas_images(map, results, channels) {
            let ivar_name = format!("{}_IVAR", img.name);
            let mask_name = format!("{}_MASK", img.name);
            write_image(
                &mut f,
                &tmp,
                img.name,
                ImageType::Float,
                &gdims,
                &img.value,
                &with(vec![
                    card("BUNIT", text(img.unit), ""),
                    card("HDUCLAS1", text("CUBE"), ""),
                    card("HDUCLAS2", text("DATA"), ""),
                    card("ERRDATA", text(&ivar_name), "inverse variance"),
                    card("QUALDATA", text(&mask_name), "MANGA_DAPPIXMASK bits"),
                ]),
            )?;
            write_image(
                &mut f,
                &tmp,
                &ivar_name,
                ImageType::Float,
                &gdims,
                &img.ivar,
                &with(vec![
                    card("BUNIT", text(img.ivar_unit), ""),
                    card("HDUCLAS1", text("CUBE"), ""),
                    card("HDUCLAS2", text("ERROR"), ""),
                    card("HDUCLAS3", text("INVMSE"), ""),
                    card("SCIDATA", text(img.name), ""),
                ]),
            )?;
            write_image(
                &mut f,
                &tmp,
                &mask_name,
                ImageType::Long,
                &gdims,
                &img.mask,
                &with(vec![
                    card("HDUCLAS1", text("CUBE"), ""),
                    card("HDUCLAS2", text("QUALITY"), ""),
                    card("HDUCLAS3", text("FLAG32BIT"), ""),
                    card("SCIDATA", text(img.name), ""),
                    card("MASKNAME", text("MANGA_DAPPIXMASK"), ""),
                ]),
            )?;
        }
    }
    drop(f);
    std::fs::rename(&tmp, path).map_err(|source| MapsError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// [`write_maps_with`] without provenance, the quantities taken from `results`.
pub fn write_maps(
    path: &Path,
    meta: &CubeMeta,
    map: &BinMap,
    results: &[Option<BinResult>],
) -> Result<(), MapsError> {
    write_maps_with(path, meta, map, results, &MapsHeader::from_results(results))
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
        &[card("BUNIT", text("Angstrom"), "")],
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

/// Header of `sfh.csv`.
pub const SFH_CSV_HEADER: &str = "bin,age_gyr,log_age,metallicity,light_weight,mass_weight";

/// Writes every bin's star-formation history as CSV (one row per bin and SSP with positive
/// weight: [`SFH_CSV_HEADER`]; light and mass weights are fractions of the bin's total, each
/// summing to 1 over its rows; `log_age` is log10(age/yr), [M/H] in dex; mass NaN without a
/// mass table). Returns the rows written; writes nothing when no bin has a history.
pub fn write_sfh_csv(path: &Path, results: &[Option<BinResult>]) -> Result<usize, MapsError> {
    use std::fmt::Write as _;
    let io = |source| MapsError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut text = String::new();
    let mut rows = 0;
    for r in results.iter().flatten().filter(|r| r.failure.is_none()) {
        for e in r.sfh.iter().flatten() {
            // Writing to a String cannot fail.
            let _ = writeln!(
                text,
                "{},{},{:.6},{},{:.6e},{:.6e}",
                r.bin,
                e.age_gyr,
                (e.age_gyr * 1e9).log10(),
                e.metallicity,
                e.light,
                e.mass
            );
            rows += 1;
        }
    }
    if rows == 0 {
        return Ok(0);
    }
    let tmp = path.with_extension("csv.partial");
    std::fs::write(&tmp, format!("{SFH_CSV_HEADER}\n{text}")).map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)?;
    Ok(rows)
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
            celestial_wcs: Vec::new(),
            target: Vec::new(),
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
            gas: None,
            sfh: None,
            reddening: None,
            age_lw_error: None,
            metallicity_lw_error: None,
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
        let four = Fitted {
            moments: 4,
            populations: false,
            reddening: false,
        };
        let imgs = map_images(&map, &results, four).unwrap();
        let vel = imgs.iter().find(|i| i.name == "STELLAR_VEL").unwrap();
        assert_eq!(vel.value[..3], [-50.0, -50.0, 80.0]);
        let (ivar, mask) = (vel.ivar.as_ref().unwrap(), vel.mask.as_ref().unwrap());
        assert_eq!(ivar[0], 0.25);
        assert_eq!(mask[..3], [0, 0, 0]);
        assert_eq!(mask[3], MASK_FITFAILED | MASK_DONOTUSE);
        assert_eq!(mask[4], MASK_NOVALUE | MASK_DONOTUSE);
        assert_eq!(mask[5], MASK_NOCOV | MASK_DONOTUSE);
        let h3 = imgs.iter().find(|i| i.name == "STELLAR_H3").unwrap();
        assert_eq!(h3.mask.as_ref().unwrap()[0], MASK_NOVALUE | MASK_DONOTUSE);
        // The S/N of a failed fit is still its bin's; S/N has no error and no mask.
        let sn = imgs.iter().find(|i| i.name == "BIN_SNR").unwrap();
        assert_eq!(sn.value[..5], [30.0, 30.0, 30.0, 3.0, 0.0]);
        assert!(sn.ivar.is_none() && sn.mask.is_none());
        let chi2 = imgs.iter().find(|i| i.name == "STELLAR_CHI2").unwrap();
        assert!(chi2.ivar.is_none() && chi2.mask.is_some());
        let bad = BinMap {
            nx: 1,
            ny: 1,
            bin_of: vec![Some(9)],
        };
        assert!(matches!(
            map_images(&bad, &results, four),
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

    /// Names of the HDUs of a FITS file after the primary, in order.
    pub(crate) fn extnames(path: &Path) -> Vec<String> {
        let mut f = FitsFile::open(path).unwrap();
        let n = f.num_hdus().unwrap();
        (1..n)
            .map(|i| f.hdu(i).unwrap().read_key(&mut f, "EXTNAME").unwrap())
            .collect()
    }

    #[test]
    fn only_what_was_fitted_is_mapped_and_only_companions_that_carry_something() {
        let dir = tempfile::tempdir().unwrap();
        let meta = meta(2, 1, 5);
        let map = BinMap {
            nx: 2,
            ny: 1,
            bin_of: vec![Some(0), None],
        };
        let path = dir.path().join("maps.fits");
        let results = [Some(result(0, 10.0))];
        let header = |moments, populations| MapsHeader {
            fitted: Fitted {
                moments,
                populations,
                reddening: false,
            },
            provenance: vec![(
                "INFILE".into(),
                KeyValue::Text("x-LOGCUBE.fits".into()),
                "the cube fitted".into(),
            )],
            gas_channels: Vec::new(),
        };
        write_maps_with(&path, &meta, &map, &results, &header(2, false)).unwrap();
        let kinematics = [
            "BINID",
            "BIN_SNR",
            "STELLAR_VEL",
            "STELLAR_VEL_IVAR",
            "STELLAR_VEL_MASK",
            "STELLAR_SIGMA",
            "STELLAR_SIGMA_IVAR",
            "STELLAR_SIGMA_MASK",
        ];
        let mut two = kinematics.to_vec();
        two.extend(["STELLAR_CHI2", "STELLAR_CHI2_MASK"]);
        assert_eq!(extnames(&path), two);
        let mut f = FitsFile::open(&path).unwrap();
        let primary = f.primary_hdu().unwrap();
        let infile: String = primary.read_key(&mut f, "INFILE").unwrap();
        assert_eq!(infile, "x-LOGCUBE.fits");
        let creator: String = primary.read_key(&mut f, "CREATOR").unwrap();
        assert_eq!(creator, concat!("astro-fit ", env!("CARGO_PKG_VERSION")));
        let date: String = primary.read_key(&mut f, "DATE").unwrap();
        assert_eq!((date.len(), &date[4..5], &date[10..11]), (19, "-", "T"));
        drop(f);

        // Populations with light weights only (the library gave no masses): no MW maps.
        write_maps_with(&path, &meta, &map, &results, &header(4, true)).unwrap();
        let mut four = kinematics.to_vec();
        four.extend([
            "STELLAR_H3",
            "STELLAR_H3_IVAR",
            "STELLAR_H3_MASK",
            "STELLAR_H4",
            "STELLAR_H4_IVAR",
            "STELLAR_H4_MASK",
            "STELLAR_CHI2",
            "STELLAR_CHI2_MASK",
            "STELLAR_AGE_LW",
            "STELLAR_AGE_LW_MASK",
            "STELLAR_MH_LW",
            "STELLAR_MH_LW_MASK",
        ]);
        assert_eq!(extnames(&path), four);
        // The old entry point takes the quantities from the results.
        write_maps(&path, &meta, &map, &results).unwrap();
        let names = extnames(&path);
        assert!(names.contains(&"STELLAR_AGE_LW".to_string()), "{names:?}");
        assert!(!names.contains(&"STELLAR_H3".to_string()), "{names:?}");
        astropy_opens(&[&path]);
    }

    #[test]
    fn fits_dates_are_utc_calendar_dates() {
        assert_eq!(fits_date(0), "1970-01-01T00:00:00");
        assert_eq!(fits_date(951_782_400), "2000-02-29T00:00:00");
        assert_eq!(fits_date(1_798_761_599), "2026-12-31T23:59:59");
    }

    /// The celestial WCS of a real MUSE cube (CD matrix and CDELT both present, RADESYS ICRS)
    /// is on every map, and astropy finds the same sky position for a spaxel in the maps as in
    /// the cube.
    #[test]
    fn maps_carry_the_cubes_celestial_wcs() {
        let cube_path = crate::cube::tests::cube_file("minicube.fits");
        let cube = crate::cube::Cube::open(&cube_path).unwrap();
        let meta = cube.meta().clone();
        let keys: Vec<&str> = meta.celestial_wcs.iter().map(|c| c.key.as_str()).collect();
        for k in [
            "CTYPE1", "CTYPE2", "CRPIX1", "CRVAL2", "CD1_1", "CD2_2", "RADESYS",
        ] {
            assert!(keys.contains(&k), "{k} missing from {keys:?}");
        }
        assert!(!keys.contains(&"CDELT1"), "CD wins over CDELT: {keys:?}");
        assert!(!keys.iter().any(|k| k.ends_with('3')), "{keys:?}");
        assert_eq!(
            meta.target,
            [crate::cube::HeaderCard {
                key: "OBJECT".into(),
                value: KeyValue::Text("Abell 478".into()),
            }]
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("maps.fits");
        let n = meta.nx * meta.ny;
        let map = BinMap {
            nx: meta.nx,
            ny: meta.ny,
            bin_of: (0..n).map(|i| (i % 3 != 0).then_some(0)).collect(),
        };
        write_maps(&path, &meta, &map, &[Some(result(0, 1.0))]).unwrap();
        let mut f = FitsFile::open(&path).unwrap();
        let object: String = f.primary_hdu().unwrap().read_key(&mut f, "OBJECT").unwrap();
        assert_eq!(object, "Abell 478");
        for name in extnames(&path) {
            let hdu = f.hdu(name.as_str()).unwrap();
            let ctype: String = hdu.read_key(&mut f, "CTYPE1").unwrap();
            assert_eq!(ctype, "RA---TAN", "{name}");
        }
        drop(f);
        if !astropy_opens(&[&path]) {
            return;
        }
        let script = "import sys, warnings\n\
                      from astropy.io import fits\n\
                      from astropy.wcs import WCS, FITSFixedWarning\n\
                      warnings.simplefilter('ignore', FITSFixedWarning)\n\
                      cube = WCS(fits.getheader(sys.argv[1], 'DATA')).celestial\n\
                      with fits.open(sys.argv[2]) as h:\n\
                      \x20   for x in h[1:]:\n\
                      \x20       w = WCS(x.header)\n\
                      \x20       assert w.has_celestial, x.name\n\
                      \x20       for px in [(0, 0), (39, 0), (12.5, 33)]:\n\
                      \x20           a, b = w.pixel_to_world(*px), cube.pixel_to_world(*px)\n\
                      \x20           assert a.separation(b).arcsec < 1e-6, (x.name, px, a, b)\n\
                      print(cube.pixel_to_world(0, 0))";
        let out = std::process::Command::new("python3")
            .args(["-c", script])
            .arg(&cube_path)
            .arg(&path)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

//! IFS datacubes: format detection, metadata and streamed reading.
//!
//! A [`Cube`] is an open file plus its [`CubeMeta`]; pixel data are never held whole.
//! Callers read either blocks of spatial rows ([`Cube::read_rows`], every spectrum of those
//! rows, spectrum-contiguous) or blocks of wavelength planes ([`Cube::read_planes`], images,
//! the file's own order). Memory therefore stays bounded by the block size, whatever the cube.
//!
//! Conventions, the same for every format:
//! - noise is **inverse variance** (`ivar`, f32); 0 means "no information";
//! - `good[i]` is false where the file's mask flags the pixel, the flux is not finite or the
//!   ivar is not positive; such pixels carry flux 0 and ivar 0 so sums need no test;
//! - wavelengths are in Angstrom, in the medium the file declares ([`WavelengthMedium`]);
//! - spectral resolution, where the file has it, is R = lambda / FWHM per wavelength pixel.

pub mod manga;
mod mapped;
pub mod megara;
pub mod muse;

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

use fitsio::FitsFile;
use fitsio::hdu::{FitsHdu, HduInfo};
use serde::{Deserialize, Serialize};

/// The instruments and pipelines whose cubes astro-fit reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CubeFormat {
    /// SDSS-IV MaNGA DRP `LOGCUBE` (FLUX, IVAR, MASK, WAVE, SPECRES).
    MangaLogcube,
    /// ESO MUSE pipeline / MPDAF cube (DATA, STAT as variance, optional DQ).
    Muse,
    /// GTC MEGARA reduced cube (megaradrp): cube in the primary or a named image HDU.
    Megara,
}

impl fmt::Display for CubeFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CubeFormat::MangaLogcube => "MaNGA LOGCUBE",
            CubeFormat::Muse => "MUSE",
            CubeFormat::Megara => "MEGARA",
        })
    }
}

/// Medium in which wavelengths are given. Mixing them shifts velocities by about 83 km/s.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum WavelengthMedium {
    Vacuum,
    Air,
}

/// How the file stores the noise (the [`Cube`] always hands out inverse variance).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum NoiseKind {
    InverseVariance,
    Variance,
}

/// How the file's quality extension is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum MaskKind {
    /// MaNGA `MANGA_DRP3PIXMASK`: see [`manga::DRP3_BAD_BITS`].
    MangaDrp3,
    /// Any non-zero value is bad (MUSE DQ, MEGARA masks).
    NonZeroBad,
}

/// What a cube is, without its pixels.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CubeMeta {
    pub format: CubeFormat,
    /// Spatial size: columns (FITS NAXIS1) and rows (NAXIS2); spaxel index = y * nx + x.
    pub nx: usize,
    pub ny: usize,
    /// Wavelength of every spectral pixel, Angstrom.
    pub wavelength: Vec<f64>,
    pub medium: WavelengthMedium,
    /// True when the pixels are uniform in ln(lambda) (MaNGA LOGCUBE), false when linear.
    pub log_sampled: bool,
    /// Spectral resolution R = lambda / FWHM per pixel, where the file provides it.
    pub resolution: Option<Vec<f64>>,
    /// Spaxel size, arcsec.
    pub pixel_scale_arcsec: f64,
    pub flux_unit: String,
    pub noise_stored_as: Option<NoiseKind>,
    /// Galactic E(B-V) from the header, where given.
    pub ebv_galactic: Option<f64>,
    /// Systemic redshift from the primary header (`Z`, `REDSHIFT`, or a synthetic cube's
    /// `SIMZSYS`), where given.
    pub redshift: Option<f64>,
    /// The celestial WCS of the flux HDU (axes 1 and 2: CTYPE, CRPIX, CRVAL, CD or PC and
    /// CDELT, CUNIT, RADESYS, EQUINOX, ...), for the 2-D maps; empty when the file has none.
    #[serde(default)]
    pub celestial_wcs: Vec<HeaderCard>,
    /// What the file says the target is: `PLATEIFU`, `MANGAID`, `OBJECT` as found (primary
    /// header first, then the flux HDU's).
    #[serde(default)]
    pub target: Vec<HeaderCard>,
}

/// A header keyword and its value, copied from one FITS header to another.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HeaderCard {
    pub key: String,
    pub value: KeyValue,
}

/// A FITS keyword value: text, an integer or a real number.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum KeyValue {
    Text(String),
    Integer(i64),
    Number(f64),
}

/// Keywords of a 2-D celestial WCS on axes 1 and 2 with text values; all the others of
/// [`CELESTIAL_NUMBERS`] are numbers.
const CELESTIAL_TEXT: [&str; 5] = ["CTYPE1", "CTYPE2", "CUNIT1", "CUNIT2", "RADESYS"];
const CELESTIAL_NUMBERS: [&str; 6] = ["CRPIX1", "CRPIX2", "CRVAL1", "CRVAL2", "LONPOLE", "LATPOLE"];
const CD_MATRIX: [&str; 4] = ["CD1_1", "CD1_2", "CD2_1", "CD2_2"];
const PC_MATRIX: [&str; 4] = ["PC1_1", "PC1_2", "PC2_1", "PC2_2"];

/// The celestial part of the WCS of `hdu` (nothing unless CTYPE1 and CTYPE2 are there). A CD
/// matrix wins over CDELT/PC (as in the FITS standard; MUSE cubes carry both). EQUINOX and
/// RADESYS (or the older RADECSYS) fall back to the primary header.
fn read_celestial_wcs(file: &mut FitsFile, hdu: &FitsHdu, primary: &FitsHdu) -> Vec<HeaderCard> {
    let text = |file: &mut FitsFile, h: &FitsHdu, key: &str| {
        h.read_key::<String>(file, key)
            .ok()
            .map(|v| v.trim().to_string())
    };
    if text(file, hdu, "CTYPE1").is_none() || text(file, hdu, "CTYPE2").is_none() {
        return Vec::new();
    }
    let mut cards = Vec::new();
    let push_text = |cards: &mut Vec<HeaderCard>, key: &str, value: Option<String>| {
        if let Some(v) = value {
            cards.push(HeaderCard {
                key: key.to_string(),
                value: KeyValue::Text(v),
            });
        }
    };
    for key in CELESTIAL_TEXT {
        let mut value = text(file, hdu, key);
        if key == "RADESYS" {
            value = value
                .or_else(|| text(file, hdu, "RADECSYS"))
                .or_else(|| text(file, primary, "RADESYS"))
                .or_else(|| text(file, primary, "RADECSYS"));
        }
        push_text(&mut cards, key, value);
    }
    let number = |file: &mut FitsFile, h: &FitsHdu, key: &str| {
        read_key_f64(file, h, key).filter(|v| v.is_finite())
    };
    let has_cd = CD_MATRIX.iter().any(|k| number(file, hdu, k).is_some());
    let mut numbers: Vec<&str> = CELESTIAL_NUMBERS.to_vec();
    if has_cd {
        numbers.extend(CD_MATRIX);
    } else {
        numbers.extend(["CDELT1", "CDELT2", "CROTA2"]);
        numbers.extend(PC_MATRIX);
    }
    for key in numbers {
        if let Some(v) = number(file, hdu, key) {
            cards.push(HeaderCard {
                key: key.to_string(),
                value: KeyValue::Number(v),
            });
        }
    }
    if let Some(v) = number(file, hdu, "EQUINOX").or_else(|| number(file, primary, "EQUINOX")) {
        cards.push(HeaderCard {
            key: "EQUINOX".into(),
            value: KeyValue::Number(v),
        });
    }
    cards
}

/// `PLATEIFU`, `MANGAID` and `OBJECT`, where the primary header or the flux HDU has them.
fn read_target(file: &mut FitsFile, hdu: &FitsHdu, primary: &FitsHdu) -> Vec<HeaderCard> {
    ["PLATEIFU", "MANGAID", "OBJECT"]
        .iter()
        .filter_map(|key| {
            let value = read_key_string(file, primary, key)
                .or_else(|| read_key_string(file, hdu, key))
                .filter(|v| !v.is_empty())?;
            Some(HeaderCard {
                key: key.to_string(),
                value: KeyValue::Text(value),
            })
        })
        .collect()
}

impl CubeMeta {
    /// The fitting core's name for the wavelength medium.
    pub fn fit_medium(&self) -> crate::templates::Medium {
        match self.medium {
            WavelengthMedium::Vacuum => crate::templates::Medium::Vacuum,
            WavelengthMedium::Air => crate::templates::Medium::Air,
        }
    }

    /// The instrumental resolution (observed frame): the file's resolving power, else the
    /// MUSE UDF line-spread function for MUSE cubes; None when neither is known.
    pub fn resolution_curve(&self) -> Option<crate::templates::ResolutionCurve> {
        match (&self.resolution, self.format) {
            (Some(r), _) => Some(crate::templates::ResolutionCurve::from_resolving_power(
                &self.wavelength,
                r,
            )),
            (None, CubeFormat::Muse) => Some(crate::templates::ResolutionCurve {
                lam: self.wavelength.clone(),
                fwhm: self
                    .wavelength
                    .iter()
                    .map(|l| muse::udf_lsf_fwhm(*l))
                    .collect(),
            }),
            (None, _) => None,
        }
    }

    pub fn nwave(&self) -> usize {
        self.wavelength.len()
    }
    pub fn nspaxels(&self) -> usize {
        self.nx * self.ny
    }
}

/// One HDU as found in a file, for error messages and format detection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HduSummary {
    pub index: usize,
    pub name: String,
    /// FITS axis order (NAXIS1 first); empty for a header-only HDU, `None` for a table.
    pub shape: Option<Vec<usize>>,
}

impl fmt::Display for HduSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = if self.name.is_empty() {
            "<unnamed>"
        } else {
            &self.name
        };
        match &self.shape {
            Some(shape) if shape.is_empty() => write!(f, "{}:{name}(no data)", self.index),
            Some(shape) => {
                let dims: Vec<String> = shape.iter().map(usize::to_string).collect();
                write!(f, "{}:{name}({})", self.index, dims.join("x"))
            }
            None => write!(f, "{}:{name}(table)", self.index),
        }
    }
}

fn join<T: fmt::Display>(items: &[T]) -> String {
    items
        .iter()
        .map(T::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

#[derive(Debug, thiserror::Error)]
pub enum CubeError {
    #[error("cannot open {path}: {message}")]
    Open { path: PathBuf, message: String },
    #[error("{path} is truncated or corrupt (data end before the header says): {message}")]
    Truncated { path: PathBuf, message: String },
    #[error("{path}: {context}: {message}")]
    Fits {
        path: PathBuf,
        context: String,
        message: String,
    },
    #[error(
        "{path} is not a cube astro-fit knows (MaNGA LOGCUBE, MUSE, MEGARA); HDUs found: [{}]; keywords found: [{}]",
        join(.hdus), .keywords.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(", ")
    )]
    UnknownFormat {
        path: PathBuf,
        hdus: Vec<HduSummary>,
        keywords: Vec<(String, String)>,
    },
    #[error("{path} looks like a {format} cube but its layout is wrong: {reason}; HDUs found: [{}]", join(.hdus))]
    Layout {
        path: PathBuf,
        format: CubeFormat,
        reason: String,
        hdus: Vec<HduSummary>,
    },
    #[error("rows {}..{} are outside the cube's {ny} rows", .requested.start, .requested.end)]
    RowsOutOfRange { requested: Range<usize>, ny: usize },
    #[error("planes {}..{} are outside the cube's {nwave} wavelength planes", .requested.start, .requested.end)]
    PlanesOutOfRange {
        requested: Range<usize>,
        nwave: usize,
    },
}

/// cfitsio status codes that mean the bytes ran out or could not be decoded.
const TRUNCATION_STATUSES: [i32; 6] = [
    107, // END_OF_FILE
    108, // READ_ERROR
    252, // BAD_HEADER_FILL? (1st keyword not SIMPLE) on a cut header block
    253, // NO_END
    414, // DATA_DECOMPRESSION_ERR
    112, // FILE_NOT_OPENED from a broken gzip stream
];

pub(crate) fn fits_error(path: &Path, context: &str, err: fitsio::errors::Error) -> CubeError {
    match err {
        fitsio::errors::Error::Fits(e) if TRUNCATION_STATUSES.contains(&e.status) => {
            CubeError::Truncated {
                path: path.to_path_buf(),
                message: format!("{context}: {} (cfitsio status {})", e.message, e.status),
            }
        }
        other => CubeError::Fits {
            path: path.to_path_buf(),
            context: context.to_string(),
            message: other.to_string(),
        },
    }
}

/// Where a cube's arrays live in its file, decided by the format modules.
#[derive(Debug, Clone)]
pub(crate) struct Layout {
    pub flux_hdu: usize,
    pub noise: Option<(usize, NoiseKind)>,
    pub mask: Option<(usize, MaskKind)>,
    pub meta: CubeMeta,
}

/// What format detection sees of a file: its HDUs and a few primary keywords.
#[derive(Debug, Clone)]
pub(crate) struct Probe {
    pub hdus: Vec<HduSummary>,
    pub instrument: Option<String>,
    pub keywords: Vec<(String, String)>,
}

impl Probe {
    pub fn find(&self, name: &str) -> Option<&HduSummary> {
        self.hdus.iter().find(|h| h.name.eq_ignore_ascii_case(name))
    }
    pub fn instrument_is(&self, name: &str) -> bool {
        self.instrument
            .as_deref()
            .is_some_and(|i| i.trim().eq_ignore_ascii_case(name))
    }
}

const PROBED_KEYWORDS: [&str; 5] = ["INSTRUME", "TELESCOP", "ORIGIN", "CTYPE3", "NAXIS"];

fn probe(file: &mut FitsFile, path: &Path) -> Result<Probe, CubeError> {
    let n = file
        .num_hdus()
        .map_err(|e| fits_error(path, "counting HDUs", e))?;
    let mut hdus = Vec::with_capacity(n);
    let mut keywords = Vec::new();
    for index in 0..n {
        let hdu = file
            .hdu(index)
            .map_err(|e| fits_error(path, &format!("reading HDU {index}"), e))?;
        let name = if index == 0 {
            hdu.name(file)
                .ok()
                .filter(|n| !n.is_empty())
                .unwrap_or_else(|| "PRIMARY".into())
        } else {
            hdu.name(file).unwrap_or_default()
        };
        let shape = match &hdu.info {
            HduInfo::ImageInfo { shape, .. } => Some(shape.iter().rev().copied().collect()),
            _ => None,
        };
        for key in PROBED_KEYWORDS {
            if let Some(v) = read_key_string(file, &hdu, key) {
                keywords.push((format!("{}[{index}]", key), v));
            }
        }
        hdus.push(HduSummary { index, name, shape });
    }
    // A file cut short (or a gzip stream that ends early) still lists the HDUs it got to:
    // the last one's data then end early.
    if let Some(last) = hdus
        .last()
        .filter(|h| h.shape.as_ref().is_some_and(|s| !s.is_empty()))
    {
        // The header's axes are untrusted: their product may overflow, or be 0 (an empty
        // image has no end to read).
        let npix = (last.shape.iter().flatten()).try_fold(1usize, |n, &axis| n.checked_mul(axis));
        let Some(npix) = npix else {
            return Err(CubeError::Open {
                path: path.to_path_buf(),
                message: format!("HDU {last} declares more pixels than can be addressed"),
            });
        };
        if npix > 0 {
            let hdu = file
                .hdu(last.index)
                .map_err(|e| fits_error(path, "reading the last HDU", e))?;
            let _: Vec<f32> = hdu
                .read_section(file, npix - 1, npix)
                .map_err(|e| fits_error(path, &format!("reading the end of HDU {last}"), e))?;
        }
    }
    let primary = file
        .primary_hdu()
        .map_err(|e| fits_error(path, "reading the primary HDU", e))?;
    let instrument = read_key_string(file, &primary, "INSTRUME");
    Ok(Probe {
        hdus,
        instrument,
        keywords,
    })
}

/// A header value as text, whatever its FITS type; `None` where the key is absent.
pub(crate) fn read_key_string(file: &mut FitsFile, hdu: &FitsHdu, key: &str) -> Option<String> {
    if let Ok(s) = hdu.read_key::<String>(file, key) {
        return Some(s.trim().to_string());
    }
    hdu.read_key::<f64>(file, key).ok().map(|v| v.to_string())
}

pub(crate) fn read_key_f64(file: &mut FitsFile, hdu: &FitsHdu, key: &str) -> Option<f64> {
    hdu.read_key::<f64>(file, key).ok()
}

/// Spaxel size in arcsec from a celestial CD matrix or CDELT1/2 (degrees).
pub(crate) fn pixel_scale_arcsec(file: &mut FitsFile, hdu: &FitsHdu) -> Option<f64> {
    let cd = |k: &str, file: &mut FitsFile| read_key_f64(file, hdu, k);
    let det = match (cd("CD1_1", file), cd("CD2_2", file)) {
        (Some(a), Some(d)) => {
            let b = cd("CD1_2", file).unwrap_or(0.0);
            let c = cd("CD2_1", file).unwrap_or(0.0);
            a * d - b * c
        }
        _ => {
            let d1 = cd("CDELT1", file)?;
            let d2 = cd("CDELT2", file)?;
            d1 * d2
        }
    };
    let scale = det.abs().sqrt() * 3600.0;
    (scale.is_finite() && scale > 0.0).then_some(scale)
}

/// A linear (or log, `WAVE-LOG`) spectral WCS on axis 3, in Angstrom, with its medium.
pub(crate) struct SpectralAxis {
    pub wavelength: Vec<f64>,
    pub medium: WavelengthMedium,
    pub log_sampled: bool,
}

pub(crate) fn spectral_axis_from_wcs(
    file: &mut FitsFile,
    hdu: &FitsHdu,
    nwave: usize,
    default_medium: WavelengthMedium,
) -> Result<SpectralAxis, String> {
    let crval = read_key_f64(file, hdu, "CRVAL3").ok_or("CRVAL3 missing")?;
    let crpix = read_key_f64(file, hdu, "CRPIX3").unwrap_or(1.0);
    let step = read_key_f64(file, hdu, "CD3_3")
        .or_else(|| read_key_f64(file, hdu, "CDELT3"))
        .ok_or("neither CD3_3 nor CDELT3 present")?;
    let unit = read_key_string(file, hdu, "CUNIT3").unwrap_or_else(|| "Angstrom".into());
    let to_angstrom = match unit.to_ascii_lowercase().as_str() {
        "angstrom" | "a" | "ang" | "angstroms" | "" => 1.0,
        "nm" => 10.0,
        "um" => 1e4,
        "m" => 1e10,
        other => return Err(format!("unknown CUNIT3 '{other}'")),
    };
    let ctype = read_key_string(file, hdu, "CTYPE3").unwrap_or_default();
    let (medium, log_sampled) = match ctype.to_ascii_uppercase().as_str() {
        "AWAV" => (WavelengthMedium::Air, false),
        "AWAV-LOG" => (WavelengthMedium::Air, true),
        "WAVE" => (WavelengthMedium::Vacuum, false),
        "WAVE-LOG" => (WavelengthMedium::Vacuum, true),
        "" | "LINEAR" => (default_medium, false),
        other => return Err(format!("unsupported CTYPE3 '{other}'")),
    };
    if !(step.is_finite() && step > 0.0 && crval.is_finite() && crval > 0.0) {
        return Err(format!(
            "non-physical spectral WCS CRVAL3={crval} step={step}"
        ));
    }
    let wavelength = (0..nwave)
        .map(|k| {
            let offset = (k as f64 + 1.0 - crpix) * step;
            if log_sampled {
                // FITS -LOG: lambda = crval * exp(offset / crval)
                crval * (offset / crval).exp() * to_angstrom
            } else {
                (crval + offset) * to_angstrom
            }
        })
        .collect();
    Ok(SpectralAxis {
        wavelength,
        medium,
        log_sampled,
    })
}

/// Every spectrum of a block of rows, spectrum-contiguous: pixel `k` of spaxel `s` (local
/// index `(y - rows.start) * nx + x`) is at `s * nwave + k`.
#[derive(Debug, Clone)]
pub struct SpaxelBlock {
    pub rows: Range<usize>,
    pub nx: usize,
    pub nwave: usize,
    pub flux: Vec<f32>,
    pub ivar: Vec<f32>,
    pub good: Vec<bool>,
}

/// One spectrum borrowed from a block.
#[derive(Debug, Clone, Copy)]
pub struct SpectrumView<'a> {
    pub flux: &'a [f32],
    pub ivar: &'a [f32],
    pub good: &'a [bool],
}

impl SpaxelBlock {
    pub fn len(&self) -> usize {
        self.rows.len() * self.nx
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Spectrum of the cube spaxel `(x, y)`; `y` must be inside `rows`.
    pub fn spectrum(&self, x: usize, y: usize) -> SpectrumView<'_> {
        let s = (y - self.rows.start) * self.nx + x;
        let r = s * self.nwave..(s + 1) * self.nwave;
        SpectrumView {
            flux: &self.flux[r.clone()],
            ivar: &self.ivar[r.clone()],
            good: &self.good[r],
        }
    }
}

/// Images of a block of wavelength planes, in the file's order: pixel `(x, y)` of plane `k`
/// (local `k - planes.start`) is at `(k_local * ny + y) * nx + x`.
#[derive(Debug, Clone)]
pub struct PlaneBlock {
    pub planes: Range<usize>,
    pub nx: usize,
    pub ny: usize,
    pub flux: Vec<f32>,
    pub ivar: Vec<f32>,
    pub good: Vec<bool>,
}

/// Flux, inverse variance and good-pixel flags of one region, in file order.
type Pixels = (Vec<f32>, Vec<f32>, Vec<bool>);

/// An open cube. Not `Sync`: cfitsio handles are per thread; open one per reader.
pub struct Cube {
    path: PathBuf,
    file: FitsFile,
    layout: Layout,
    /// The memory `file` reads from, for a plain file; declared after `file` so that it is
    /// dropped after it.
    _mapped: Option<mapped::Mapped>,
}

impl fmt::Debug for Cube {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cube")
            .field("path", &self.path)
            .field("meta", &self.layout.meta)
            .finish_non_exhaustive()
    }
}

/// Deflate cannot shrink data more than about 1032:1.
const DEFLATE_MAX_RATIO: u64 = 1032;

/// cfitsio recognises compressed files by their first bytes, whatever their name, and
/// decompresses them into memory it allocates at once, sized from the file's own trailer (for
/// gzip: the last 4 bytes, plus 4 GiB for every time that is below the file's size). A file
/// that lies there made it allocate 4 GiB (found by the `fits_cube` fuzz target). Refuse a gzip
/// trailer deflate cannot produce, and the compressions astro-fit does not read.
fn check_compression(path: &Path) -> Result<(), CubeError> {
    use std::io::{Read, Seek, SeekFrom};
    let refuse = |message: String| CubeError::Open {
        path: path.to_path_buf(),
        message,
    };
    let mut file = std::fs::File::open(path).map_err(|e| refuse(e.to_string()))?;
    let len = file.metadata().map_err(|e| refuse(e.to_string()))?.len();
    let mut magic = [0u8; 2];
    if file.read_exact(&mut magic).is_err() {
        // Too short to be anything: cfitsio says what it is not.
        return Ok(());
    }
    match magic {
        [0x1f, 0x8b] => {
            let mut trailer = [0u8; 4];
            file.seek(SeekFrom::End(-4))
                .and_then(|_| file.read_exact(&mut trailer))
                .map_err(|_| refuse("a gzip stream too short to hold its trailer".into()))?;
            // As cfitsio reads it: the size modulo 2^32, raised past the compressed size.
            let mut declared = u64::from(u32::from_le_bytes(trailer));
            while declared < len {
                declared += 1 << 32;
            }
            let most = len
                .saturating_mul(DEFLATE_MAX_RATIO)
                .saturating_add(1 << 16);
            if declared > most {
                return Err(refuse(format!(
                    "its gzip trailer declares {declared} bytes uncompressed from {len}, more \
                     than deflate can hold: the file is corrupt"
                )));
            }
            Ok(())
        }
        [0x1f, 0x1e] | [0x1f, 0x9d] | [0x1f, 0xa0] | [b'P', b'K'] => Err(refuse(
            "it is compressed with pack, compress, LZH or zip; astro-fit reads plain or \
             gzip-compressed FITS"
                .into(),
        )),
        _ => Ok(()),
    }
}

impl Cube {
    /// Opens a cube (plain or `.gz`), detects its format and reads its metadata. Pixel data are
    /// not read, except the last pixel of each array, so that a truncated file fails here.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, CubeError> {
        let path = path.as_ref().to_path_buf();
        if !path.is_file() {
            return Err(CubeError::Open {
                message: "no such file".into(),
                path,
            });
        }
        check_compression(&path)?;
        let mut file = FitsFile::open(&path).map_err(|e| match fits_error(&path, "open", e) {
            CubeError::Fits { path, message, .. } => CubeError::Open { path, message },
            other => other,
        })?;
        let probe = probe(&mut file, &path)?;
        let layout = if manga::matches(&probe) {
            manga::layout(&mut file, &path, &probe)?
        } else if muse::matches(&probe) {
            muse::layout(&mut file, &path, &probe)?
        } else if megara::matches(&probe) {
            megara::layout(&mut file, &path, &probe)?
        } else {
            return Err(CubeError::UnknownFormat {
                path,
                hdus: probe.hdus,
                keywords: probe.keywords,
            });
        };
        let mut layout = layout;
        let primary = file
            .primary_hdu()
            .map_err(|e| fits_error(&path, "reading the primary HDU", e))?;
        layout.meta.redshift = ["Z", "REDSHIFT", "SIMZSYS"]
            .iter()
            .find_map(|k| read_key_f64(&mut file, &primary, k))
            .filter(|z| z.is_finite() && *z > -1.0);
        let flux = file
            .hdu(layout.flux_hdu)
            .map_err(|e| fits_error(&path, "reading the flux HDU", e))?;
        layout.meta.celestial_wcs = read_celestial_wcs(&mut file, &flux, &primary);
        layout.meta.target = read_target(&mut file, &flux, &primary);
        let mut cube = Cube {
            path,
            file,
            layout,
            _mapped: None,
        };
        cube.check_complete()?;
        // Checked complete through cfitsio's file driver, a plain file is read from here on
        // through a memory map (a gzipped one is already in memory).
        let gzipped = (cube.path.extension()).is_some_and(|e| e.eq_ignore_ascii_case("gz"));
        if !gzipped && let Some((file, mapped)) = mapped::open(&cube.path) {
            cube.file = file;
            cube._mapped = Some(mapped);
        }
        Ok(cube)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn meta(&self) -> &CubeMeta {
        &self.layout.meta
    }

    fn hdu(&mut self, index: usize) -> Result<FitsHdu, CubeError> {
        self.file
            .hdu(index)
            .map_err(|e| fits_error(&self.path, &format!("HDU {index}"), e))
    }

    /// Reads the last pixel of every array: cheap, and catches files cut short.
    fn check_complete(&mut self) -> Result<(), CubeError> {
        let n = self.meta().nspaxels() * self.meta().nwave();
        let mut hdus = vec![self.layout.flux_hdu];
        hdus.extend(self.layout.noise.map(|(h, _)| h));
        hdus.extend(self.layout.mask.map(|(h, _)| h));
        for index in hdus {
            let hdu = self.hdu(index)?;
            let _: Vec<f32> = hdu.read_section(&mut self.file, n - 1, n).map_err(|e| {
                fits_error(&self.path, &format!("reading the end of HDU {index}"), e)
            })?;
        }
        Ok(())
    }

    /// Reads a FITS region (axis-1 range first) of one HDU as `T`.
    fn read_region<T>(
        &mut self,
        index: usize,
        ranges: &[&Range<usize>],
    ) -> Result<Vec<T>, CubeError>
    where
        Vec<T>: fitsio::images::ReadImage,
    {
        let hdu = self.hdu(index)?;
        hdu.read_region(&mut self.file, ranges)
            .map_err(|e| fits_error(&self.path, &format!("reading HDU {index}"), e))
    }

    /// Flux, ivar and quality of a region in file order, already combined into the
    /// conventions of this module.
    fn read_combined(&mut self, ranges: &[&Range<usize>]) -> Result<Pixels, CubeError> {
        let mut flux: Vec<f32> = self.read_region(self.layout.flux_hdu, ranges)?;
        let mut ivar: Vec<f32> = match self.layout.noise {
            Some((index, kind)) => {
                let mut noise: Vec<f32> = self.read_region(index, ranges)?;
                if kind == NoiseKind::Variance {
                    for v in &mut noise {
                        *v = if *v > 0.0 && v.is_finite() {
                            1.0 / *v
                        } else {
                            0.0
                        };
                    }
                }
                noise
            }
            // No noise in the file: unit weights, the fit's chi2 is then relative.
            None => vec![1.0; flux.len()],
        };
        let mask: Option<(Vec<i32>, MaskKind)> = match self.layout.mask {
            Some((index, kind)) => Some((self.read_region(index, ranges)?, kind)),
            None => None,
        };
        let mut good = vec![true; flux.len()];
        for i in 0..flux.len() {
            let flagged = match &mask {
                Some((m, MaskKind::MangaDrp3)) => m[i] & manga::DRP3_BAD_BITS != 0,
                Some((m, MaskKind::NonZeroBad)) => m[i] != 0,
                None => false,
            };
            if flagged || !flux[i].is_finite() || !(ivar[i] > 0.0 && ivar[i].is_finite()) {
                good[i] = false;
                flux[i] = 0.0;
                ivar[i] = 0.0;
            }
        }
        Ok((flux, ivar, good))
    }

    /// Every spectrum of the rows `rows` (all columns), spectrum-contiguous.
    pub fn read_rows(&mut self, rows: Range<usize>) -> Result<SpaxelBlock, CubeError> {
        let (nx, ny, nwave) = (self.meta().nx, self.meta().ny, self.meta().nwave());
        if rows.start >= rows.end || rows.end > ny {
            return Err(CubeError::RowsOutOfRange {
                requested: rows,
                ny,
            });
        }
        let (flux, ivar, good) = self.read_combined(&[&(0..nx), &rows, &(0..nwave)])?;
        // File order is [k][y][x]; turn it into [y][x][k] so each spectrum is contiguous.
        let nspax = rows.len() * nx;
        let transpose = |src: &[f32]| {
            let mut out = vec![0f32; src.len()];
            for k in 0..nwave {
                let plane = &src[k * nspax..(k + 1) * nspax];
                for (s, v) in plane.iter().enumerate() {
                    out[s * nwave + k] = *v;
                }
            }
            out
        };
        let mut good_t = vec![false; good.len()];
        for k in 0..nwave {
            for s in 0..nspax {
                good_t[s * nwave + k] = good[k * nspax + s];
            }
        }
        Ok(SpaxelBlock {
            flux: transpose(&flux),
            ivar: transpose(&ivar),
            good: good_t,
            rows,
            nx,
            nwave,
        })
    }

    /// The images of the wavelength planes `planes`, in file order.
    pub fn read_planes(&mut self, planes: Range<usize>) -> Result<PlaneBlock, CubeError> {
        let (nx, ny, nwave) = (self.meta().nx, self.meta().ny, self.meta().nwave());
        if planes.start >= planes.end || planes.end > nwave {
            return Err(CubeError::PlanesOutOfRange {
                requested: planes,
                nwave,
            });
        }
        let (flux, ivar, good) = self.read_combined(&[&(0..nx), &(0..ny), &planes])?;
        Ok(PlaneBlock {
            planes,
            nx,
            ny,
            flux,
            ivar,
            good,
        })
    }

    /// How many rows to read at once so that a block holds about `bytes` of pixel data.
    pub fn rows_per_block(&self, bytes: usize) -> usize {
        let per_row = self.meta().nx * self.meta().nwave() * 9; // f32 flux + f32 ivar + bool
        (bytes / per_row.max(1)).clamp(1, self.meta().ny.max(1))
    }
}

/// The validation every format applies to its flux HDU: a 3-D image of at least 1x1x2.
pub(crate) fn cube_shape(
    probe: &Probe,
    path: &Path,
    format: CubeFormat,
    index: usize,
) -> Result<(usize, usize, usize), CubeError> {
    let hdu = &probe.hdus[index];
    match hdu.shape.as_deref() {
        Some([nx, ny, nwave]) if *nx > 0 && *ny > 0 && *nwave > 1 => Ok((*nx, *ny, *nwave)),
        _ => Err(CubeError::Layout {
            path: path.to_path_buf(),
            format,
            reason: format!("HDU {hdu} is not a 3-D cube (x, y, wavelength)"),
            hdus: probe.hdus.clone(),
        }),
    }
}

/// A companion array (noise, mask) must have the flux's shape.
pub(crate) fn same_shape(
    probe: &Probe,
    path: &Path,
    format: CubeFormat,
    flux: usize,
    other: usize,
) -> Result<(), CubeError> {
    if probe.hdus[flux].shape == probe.hdus[other].shape {
        Ok(())
    } else {
        Err(CubeError::Layout {
            path: path.to_path_buf(),
            format,
            reason: format!(
                "HDU {} does not have the shape of the flux HDU {}",
                probe.hdus[other], probe.hdus[flux]
            ),
            hdus: probe.hdus.clone(),
        })
    }
}

/// Where a linear-WCS cube keeps its arrays (MUSE, MEGARA): the flux HDU, the names of the
/// optional variance and mask companions, and the spaxel size when the WCS does not give one.
pub(crate) struct LinearCubeHdus {
    pub format: CubeFormat,
    pub flux: usize,
    pub variance: &'static str,
    pub mask: &'static str,
    pub default_pixel_scale_arcsec: f64,
}

/// The layout of a 3-D cube with a linear spectral WCS (air wavelengths unless CTYPE3 says
/// otherwise), a variance and a non-zero-is-bad mask, each optional and shaped like the flux.
pub(crate) fn linear_wcs_layout(
    file: &mut FitsFile,
    path: &Path,
    probe: &Probe,
    hdus: LinearCubeHdus,
) -> Result<Layout, CubeError> {
    let LinearCubeHdus { format, flux, .. } = hdus;
    let (nx, ny, nwave) = cube_shape(probe, path, format, flux)?;
    let companion = |name: &str| match probe.find(name) {
        Some(h) => same_shape(probe, path, format, flux, h.index).map(|()| Some(h.index)),
        None => Ok(None),
    };
    let noise = companion(hdus.variance)?.map(|index| (index, NoiseKind::Variance));
    let mask = companion(hdus.mask)?.map(|index| (index, MaskKind::NonZeroBad));
    let hdu = file
        .hdu(flux)
        .map_err(|e| fits_error(path, "flux HDU", e))?;
    let axis =
        spectral_axis_from_wcs(file, &hdu, nwave, WavelengthMedium::Air).map_err(|reason| {
            CubeError::Layout {
                path: path.to_path_buf(),
                format,
                reason: format!("spectral WCS of HDU {}: {reason}", probe.hdus[flux]),
                hdus: probe.hdus.clone(),
            }
        })?;
    let pixel_scale_arcsec =
        pixel_scale_arcsec(file, &hdu).unwrap_or(hdus.default_pixel_scale_arcsec);
    let flux_unit = read_key_string(file, &hdu, "BUNIT").unwrap_or_default();
    Ok(Layout {
        flux_hdu: flux,
        noise,
        mask,
        meta: CubeMeta {
            format,
            nx,
            ny,
            wavelength: axis.wavelength,
            medium: axis.medium,
            log_sampled: axis.log_sampled,
            resolution: None,
            pixel_scale_arcsec,
            flux_unit,
            noise_stored_as: noise.map(|(_, k)| k),
            ebv_galactic: None,
            redshift: None,
            celestial_wcs: Vec::new(),
            target: Vec::new(),
        },
    })
}

#[cfg(test)]
pub(crate) mod tests;

use serde::{Deserialize, Serialize};

use super::EdgeError;

/// What a plane means, which decides how it may be compressed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Measured flux: quantised against its noise in lossy mode.
    Flux,
    /// Inverse variance (MaNGA IVAR): kept to a bounded relative error in lossy mode.
    Ivar,
    /// Variance (MUSE STAT): kept to a bounded relative error in lossy mode.
    Variance,
    /// Quality bits: always lossless; a non-zero value marks a pixel as masked.
    Mask,
    /// Anything else: always lossless.
    Other,
}

/// Element type of a plane, as stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    U8,
    I16,
    I32,
    I64,
    F32,
    F64,
}

impl DType {
    pub fn width(self) -> usize {
        match self {
            DType::U8 => 1,
            DType::I16 => 2,
            DType::I32 | DType::F32 => 4,
            DType::I64 | DType::F64 => 8,
        }
    }
}

/// The samples of one plane, spaxel-major.
#[derive(Clone, Debug, PartialEq)]
pub enum Samples {
    U8(Vec<u8>),
    I16(Vec<i16>),
    I32(Vec<i32>),
    I64(Vec<i64>),
    F32(Vec<f32>),
    F64(Vec<f64>),
}

macro_rules! per_variant {
    ($self:expr, $v:ident => $body:expr) => {
        match $self {
            Samples::U8($v) => $body,
            Samples::I16($v) => $body,
            Samples::I32($v) => $body,
            Samples::I64($v) => $body,
            Samples::F32($v) => $body,
            Samples::F64($v) => $body,
        }
    };
}

impl Samples {
    pub fn dtype(&self) -> DType {
        match self {
            Samples::U8(_) => DType::U8,
            Samples::I16(_) => DType::I16,
            Samples::I32(_) => DType::I32,
            Samples::I64(_) => DType::I64,
            Samples::F32(_) => DType::F32,
            Samples::F64(_) => DType::F64,
        }
    }

    pub fn len(&self) -> usize {
        per_variant!(self, v => v.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Little-endian bytes of the samples in `range` (sample indices).
    pub fn le_bytes(&self, range: std::ops::Range<usize>) -> Vec<u8> {
        let mut out = Vec::with_capacity(range.len() * self.dtype().width());
        per_variant!(self, v => for x in &v[range] {
            out.extend_from_slice(&x.to_le_bytes());
        });
        out
    }

    /// Samples from little-endian bytes; the length must be a whole number of samples.
    pub fn from_le_bytes(dtype: DType, bytes: &[u8]) -> Result<Samples, EdgeError> {
        let width = dtype.width();
        if !bytes.len().is_multiple_of(width) {
            return Err(EdgeError::InvalidCube(format!(
                "{} bytes is not a whole number of {dtype:?} samples",
                bytes.len()
            )));
        }
        macro_rules! collect {
            ($t:ty, $variant:ident) => {
                Samples::$variant(
                    bytes
                        .chunks_exact(width)
                        .map(|c| <$t>::from_le_bytes(c.try_into().expect("chunk of width")))
                        .collect(),
                )
            };
        }
        Ok(match dtype {
            DType::U8 => Samples::U8(bytes.to_vec()),
            DType::I16 => collect!(i16, I16),
            DType::I32 => collect!(i32, I32),
            DType::I64 => collect!(i64, I64),
            DType::F32 => collect!(f32, F32),
            DType::F64 => collect!(f64, F64),
        })
    }

    /// Whether sample `i` is non-zero (for mask planes).
    pub fn is_nonzero(&self, i: usize) -> bool {
        match self {
            Samples::U8(v) => v[i] != 0,
            Samples::I16(v) => v[i] != 0,
            Samples::I32(v) => v[i] != 0,
            Samples::I64(v) => v[i] != 0,
            Samples::F32(v) => v[i] != 0.0,
            Samples::F64(v) => v[i] != 0.0,
        }
    }
}

/// One named plane of a cube (FLUX, IVAR, MASK, ...).
#[derive(Clone, Debug, PartialEq)]
pub struct Plane {
    pub name: String,
    pub role: Role,
    pub samples: Samples,
}

/// A 1-D vector that travels with the cube (the wavelength axis, resolution curves).
#[derive(Clone, Debug, PartialEq)]
pub struct AuxVector {
    pub name: String,
    pub values: Vec<f64>,
}

/// The header of one HDU (`hdu` is its EXTNAME, or `PRIMARY`) as its 80-character cards, in
/// order, without the cards that describe the data layout (a writer writes those for the data
/// it writes): every keyword, comment, `HISTORY` and `CONTINUE` card travels as it was.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HduHeader {
    pub hdu: String,
    pub cards: Vec<String>,
}

/// A datacube as the edge code sees it: `nx * ny` spectra of `nwave` samples, spaxel-major
/// (spaxel `s = y * nx + x`, sample `k` of it at `s * nwave + k`).
#[derive(Clone, Debug, PartialEq)]
pub struct SpectralCube {
    pub nx: usize,
    pub ny: usize,
    pub nwave: usize,
    pub planes: Vec<Plane>,
    pub aux: Vec<AuxVector>,
    /// The headers of the file's HDUs, every card but the layout's.
    pub headers: Vec<HduHeader>,
}

impl SpectralCube {
    pub fn nspec(&self) -> usize {
        self.nx * self.ny
    }

    /// Checks that every plane has `nx * ny * nwave` samples and plane names are unique.
    pub fn validate(&self) -> Result<(), EdgeError> {
        let expected = self.nspec() * self.nwave;
        for (i, plane) in self.planes.iter().enumerate() {
            if plane.samples.len() != expected {
                return Err(EdgeError::InvalidCube(format!(
                    "plane {} has {} samples, expected {} x {} x {} = {expected}",
                    plane.name,
                    plane.samples.len(),
                    self.nx,
                    self.ny,
                    self.nwave
                )));
            }
            if self.planes[..i].iter().any(|p| p.name == plane.name) {
                return Err(EdgeError::InvalidCube(format!(
                    "two planes are named {}",
                    plane.name
                )));
            }
        }
        Ok(())
    }

    pub fn plane(&self, role: Role) -> Option<&Plane> {
        self.planes.iter().find(|p| p.role == role)
    }

    /// The noise plane (IVAR or variance), if the cube has one.
    pub fn noise_plane(&self) -> Option<&Plane> {
        self.planes
            .iter()
            .find(|p| matches!(p.role, Role::Ivar | Role::Variance))
    }

    /// Raw size of the samples in bytes (what an uncompressed copy would hold).
    pub fn raw_bytes(&self) -> usize {
        self.planes
            .iter()
            .map(|p| p.samples.len() * p.samples.dtype().width())
            .sum::<usize>()
            + self.aux.iter().map(|a| a.values.len() * 8).sum::<usize>()
    }
}

/// Standard deviation of one pixel from its noise sample, or `None` when the noise says the
/// pixel carries no information (zero or non-finite IVAR, non-positive variance).
pub fn sigma_from_noise(role: Role, noise: f32) -> Option<f64> {
    let n = f64::from(noise);
    let sigma = match role {
        Role::Ivar if n > 0.0 => 1.0 / n.sqrt(),
        Role::Variance if n > 0.0 => n.sqrt(),
        _ => return None,
    };
    (sigma.is_finite() && sigma > 0.0).then_some(sigma)
}

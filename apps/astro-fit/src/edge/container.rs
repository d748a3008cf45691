//! The self-describing TARSIS container.
//!
//! ```text
//! "TARSISC\x01"
//! u32 header length | header (JSON) | sha256(header)
//! u64 aux length    | aux vectors (lossless sections, u64-length-prefixed) | sha256(aux)
//! per block:  "BLK\x01" | u32 block number | u64 payload length | sha256(payload) | payload
//! "IDX\x01" | u32 index length | index (JSON: offset and length of each block) | sha256(index)
//! u64 offset of "IDX\x01" | "TARSEND\x01"
//! ```
//!
//! A block holds `spectra_per_block` consecutive spaxels, every plane of them. The header comes
//! first and every block carries its own length and checksum, so a reader can decode from a
//! pipe block by block ([`StreamDecoder`]); the index at the end gives random access by spaxel
//! or block ([`ContainerReader`]). Every length and checksum failure names the part and what was
//! expected.

use std::io::{Read, Seek, SeekFrom, Write};

use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::codec::{self, Filter, FilterChoice};
use super::quantize::{self, FluxQuantizer, QuantizedSpectrum};
use super::{AuxVector, DType, EdgeError, HduHeader, Plane, Role, Samples, SpectralCube};

const MAGIC: &[u8; 8] = b"TARSISC\x01";
const BLOCK_MAGIC: &[u8; 4] = b"BLK\x01";

/// Whether a file starting with `prefix` (its first 8 bytes) is a TARSIS container.
pub fn is_container(prefix: &[u8]) -> bool {
    prefix.starts_with(MAGIC)
}
const INDEX_MAGIC: &[u8; 4] = b"IDX\x01";
const END_MAGIC: &[u8; 8] = b"TARSEND\x01";
/// 2: every HDU's whole header (`headers`), where 1 kept 27 chosen keywords.
const FORMAT_VERSION: u32 = 2;
/// Headers and indexes larger than this are corruption, not data.
const MAX_META_BYTES: u64 = 64 << 20;

/// Lossless, or noise-bounded lossy for flux and noise.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Mode {
    Lossless,
    Lossy {
        /// Largest flux error allowed, in units of the pixel's noise sigma.
        max_error_sigma: f64,
        /// Largest relative error allowed on IVAR / variance.
        noise_rel_error: f64,
    },
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CompressOptions {
    pub mode: Mode,
    pub spectra_per_block: usize,
    pub zstd_level: i32,
    pub filter: FilterChoice,
    /// Seed of the subtractive dither (recorded in the header).
    pub seed: u64,
}

impl Default for CompressOptions {
    fn default() -> Self {
        CompressOptions {
            // 0.05 sigma keeps fitted V and sigma within 0.1 of their formal errors for 99% of
            // spaxels (science-edge, BENCHMARKS.md); 0.125 sigma (fpack q=4 fidelity) does not.
            mode: Mode::Lossy {
                max_error_sigma: 0.05,
                noise_rel_error: 0.01,
            },
            spectra_per_block: 32,
            zstd_level: 3,
            // Measured (BENCHMARKS.md): within 0.1% of trying every filter, at half the cost.
            filter: FilterChoice::Fixed(Filter::XorShuffle),
            seed: 0x7A25_15ED,
        }
    }
}

/// How one plane is stored.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Encoding {
    Lossless,
    /// Mantissa rounded to `mantissa_bits`, then lossless.
    NoiseRounded {
        rel_error: f64,
        mantissa_bits: u32,
    },
    /// Dithered quantisation against the plane named `noise_plane`.
    QuantizedFlux {
        max_error_sigma: f64,
        noise_plane: String,
        noise_role: Role,
        noise_mantissa_bits: u32,
        seed: u64,
        predictor_taps: usize,
    },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PlaneHeader {
    pub name: String,
    pub role: Role,
    pub dtype: DType,
    pub encoding: Encoding,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AuxHeader {
    pub name: String,
    pub len: usize,
}

/// The container header: enough to decode any block without reading another.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Header {
    pub format: String,
    pub version: u32,
    pub nx: usize,
    pub ny: usize,
    pub nwave: usize,
    pub spectra_per_block: usize,
    pub planes: Vec<PlaneHeader>,
    pub aux: Vec<AuxHeader>,
    /// Every HDU's header cards but the layout's.
    pub headers: Vec<HduHeader>,
}

impl Header {
    pub fn nspec(&self) -> usize {
        self.nx * self.ny
    }

    pub fn n_blocks(&self) -> usize {
        self.nspec().div_ceil(self.spectra_per_block)
    }

    /// Spaxels held by block `b`.
    pub fn block_spectra(&self, b: usize) -> std::ops::Range<usize> {
        let start = b * self.spectra_per_block;
        start..(start + self.spectra_per_block).min(self.nspec())
    }

    fn block_part(&self, b: usize) -> String {
        let r = self.block_spectra(b);
        format!("block {b} (spaxels {}..{})", r.start, r.end)
    }

    fn validate(&self) -> Result<(), EdgeError> {
        let bad = |reason: String| EdgeError::Corrupt {
            part: "header".into(),
            reason,
        };
        if self.format != "tarsis-edge" || self.version != FORMAT_VERSION {
            return Err(bad(format!(
                "format {} version {} (this reader handles tarsis-edge {FORMAT_VERSION})",
                self.format, self.version
            )));
        }
        if self.spectra_per_block == 0 || self.nwave == 0 {
            return Err(bad("zero spectra per block or zero wavelengths".into()));
        }
        for p in &self.planes {
            if let Encoding::QuantizedFlux { noise_plane, .. } = &p.encoding {
                let noise = self.planes.iter().find(|n| &n.name == noise_plane);
                if !noise.is_some_and(|n| n.dtype == DType::F32) {
                    return Err(bad(format!(
                        "plane {} refers to missing noise plane {noise_plane}",
                        p.name
                    )));
                }
            }
            if !matches!(p.encoding, Encoding::Lossless) && p.dtype != DType::F32 {
                return Err(bad(format!("lossy plane {} is not f32", p.name)));
            }
        }
        Ok(())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct BlockEntry {
    pub offset: u64,
    pub len: u64,
}

/// What compression did, for reports and benchmarks.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct CompressSummary {
    pub raw_bytes: u64,
    pub compressed_bytes: u64,
    pub blocks: usize,
    /// Flux pixels stored verbatim (masked, non-finite, no valid noise).
    pub exception_pixels: u64,
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn f32_plane<'a>(cube: &'a SpectralCube, name: &str) -> &'a [f32] {
    match &cube
        .planes
        .iter()
        .find(|p| p.name == name)
        .map(|p| &p.samples)
    {
        Some(Samples::F32(v)) => v,
        _ => &[],
    }
}

/// Decides the header (how each plane is stored) from the cube and the options.
pub fn plan(cube: &SpectralCube, opts: &CompressOptions) -> Result<Header, EdgeError> {
    cube.validate()?;
    if opts.spectra_per_block == 0 {
        return Err(EdgeError::InvalidParameter(
            "spectra per block must be at least 1".into(),
        ));
    }
    if cube.nwave == 0 || cube.nspec() == 0 {
        return Err(EdgeError::InvalidCube("the cube has no pixels".into()));
    }
    let noise = match opts.mode {
        Mode::Lossless => None,
        Mode::Lossy {
            max_error_sigma,
            noise_rel_error,
        } => {
            let noise = cube
                .noise_plane()
                .filter(|p| p.samples.dtype() == DType::F32)
                .ok_or(EdgeError::NoNoise)?;
            let bits = quantize::mantissa_bits_for(noise_rel_error)?;
            FluxQuantizer {
                max_error_sigma,
                noise_role: noise.role,
                noise_mantissa_bits: bits,
                seed: opts.seed,
            }
            .validate()?;
            Some((noise, bits, max_error_sigma, noise_rel_error))
        }
    };
    let planes = cube
        .planes
        .iter()
        .map(|p| {
            let f32_data = p.samples.dtype() == DType::F32;
            let encoding = match (noise, p.role) {
                (Some((n, bits, _, rel)), _) if p.name == n.name => Encoding::NoiseRounded {
                    rel_error: rel,
                    mantissa_bits: bits,
                },
                (Some((n, bits, m, _)), Role::Flux) if f32_data => Encoding::QuantizedFlux {
                    max_error_sigma: m,
                    noise_plane: n.name.clone(),
                    noise_role: n.role,
                    noise_mantissa_bits: bits,
                    seed: opts.seed,
                    predictor_taps: quantize::PREDICTOR_TAPS,
                },
                _ => Encoding::Lossless,
            };
            PlaneHeader {
                name: p.name.clone(),
                role: p.role,
                dtype: p.samples.dtype(),
                encoding,
            }
        })
        .collect();
    Ok(Header {
        format: "tarsis-edge".into(),
        version: FORMAT_VERSION,
        nx: cube.nx,
        ny: cube.ny,
        nwave: cube.nwave,
        spectra_per_block: opts.spectra_per_block,
        planes,
        aux: cube
            .aux
            .iter()
            .map(|a| AuxHeader {
                name: a.name.clone(),
                len: a.values.len(),
            })
            .collect(),
        headers: cube.headers.clone(),
    })
}

fn push_section(out: &mut Vec<u8>, section: &[u8]) {
    out.extend_from_slice(&(section.len() as u64).to_le_bytes());
    out.extend_from_slice(section);
}

fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn bits_to_bytes(bits: &[bool]) -> Vec<u8> {
    let mut out = vec![0u8; bits.len().div_ceil(8)];
    for (i, _) in bits.iter().enumerate().filter(|(_, b)| **b) {
        out[i / 8] |= 1 << (i % 8);
    }
    out
}

/// Encodes block `b` of `cube` under `header`; returns the payload and its exception count.
fn encode_block(
    cube: &SpectralCube,
    header: &Header,
    b: usize,
    opts: &CompressOptions,
) -> Result<(Vec<u8>, u64), EdgeError> {
    let spectra = header.block_spectra(b);
    let samples = spectra.start * cube.nwave..spectra.end * cube.nwave;
    let mask = cube.plane(Role::Mask);
    let mut payload = Vec::new();
    let mut exceptions = 0u64;
    let lossless = |raw: &[u8], width| codec::encode(raw, width, opts.filter, opts.zstd_level);
    for (plane, ph) in cube.planes.iter().zip(&header.planes) {
        match &ph.encoding {
            Encoding::Lossless => {
                let raw = plane.samples.le_bytes(samples.clone());
                push_section(&mut payload, &lossless(&raw, ph.dtype.width())?);
            }
            Encoding::NoiseRounded { mantissa_bits, .. } => {
                let rounded: Vec<f32> = f32_plane(cube, &ph.name)[samples.clone()]
                    .iter()
                    .map(|&v| quantize::round_mantissa(v, *mantissa_bits))
                    .collect();
                push_section(&mut payload, &lossless(&f32_bytes(&rounded), 4)?);
            }
            Encoding::QuantizedFlux {
                max_error_sigma,
                noise_plane,
                noise_role,
                noise_mantissa_bits,
                seed,
                ..
            } => {
                let q = FluxQuantizer {
                    max_error_sigma: *max_error_sigma,
                    noise_role: *noise_role,
                    noise_mantissa_bits: *noise_mantissa_bits,
                    seed: *seed,
                };
                let flux = &f32_plane(cube, &ph.name)[samples.clone()];
                let noise = &f32_plane(cube, noise_plane)[samples.clone()];
                let noise_rec: Vec<f32> = noise
                    .iter()
                    .map(|&v| quantize::round_mantissa(v, *noise_mantissa_bits))
                    .collect();
                let mut residuals = Vec::with_capacity(flux.len());
                let mut flags = Vec::with_capacity(flux.len());
                let mut verbatim = Vec::new();
                let mut spectrum = QuantizedSpectrum::default();
                for (i, s) in spectra.clone().enumerate() {
                    let span = i * cube.nwave..(i + 1) * cube.nwave;
                    let first_pixel = (s * cube.nwave) as u64;
                    q.encode_spectrum(
                        &flux[span.clone()],
                        &noise[span.clone()],
                        &noise_rec[span.clone()],
                        |k| {
                            mask.is_some_and(|m| {
                                m.samples.is_nonzero(samples.start + span.start + k)
                            })
                        },
                        first_pixel,
                        &mut spectrum,
                    );
                    residuals.extend(spectrum.residuals.iter().flat_map(|r| r.to_le_bytes()));
                    flags.extend_from_slice(&spectrum.exception);
                    verbatim.extend_from_slice(&spectrum.exception_values);
                }
                exceptions += verbatim.len() as u64;
                let mut section = Vec::new();
                push_section(
                    &mut section,
                    &codec::encode_with(&residuals, 4, Filter::Shuffle, opts.zstd_level)?,
                );
                push_section(
                    &mut section,
                    &codec::encode_with(&bits_to_bytes(&flags), 1, Filter::None, opts.zstd_level)?,
                );
                push_section(&mut section, &lossless(&f32_bytes(&verbatim), 4)?);
                push_section(&mut payload, &section);
            }
        }
    }
    Ok((payload, exceptions))
}

/// Writes to the output while counting bytes (block offsets for the index).
struct CountingWriter<'a, W: Write> {
    inner: &'a mut W,
    written: u64,
}

impl<W: Write> CountingWriter<'_, W> {
    fn put(&mut self, bytes: &[u8]) -> Result<(), EdgeError> {
        self.inner.write_all(bytes).map_err(|e| EdgeError::Stream {
            context: "writing the container".into(),
            source: e,
        })?;
        self.written += bytes.len() as u64;
        Ok(())
    }
}

/// Compresses `cube` into `out`.
pub fn compress(
    cube: &SpectralCube,
    opts: &CompressOptions,
    out: &mut impl Write,
) -> Result<CompressSummary, EdgeError> {
    let header = plan(cube, opts)?;
    let header_json = serde_json::to_vec(&header).expect("header serialises");
    let mut w = CountingWriter {
        inner: out,
        written: 0,
    };
    w.put(MAGIC)?;
    w.put(&(header_json.len() as u32).to_le_bytes())?;
    w.put(&header_json)?;
    w.put(&sha256(&header_json))?;

    let mut aux = Vec::new();
    for a in &cube.aux {
        let raw: Vec<u8> = a.values.iter().flat_map(|v| v.to_le_bytes()).collect();
        push_section(
            &mut aux,
            &codec::encode(&raw, 8, FilterChoice::Best, opts.zstd_level)?,
        );
    }
    w.put(&(aux.len() as u64).to_le_bytes())?;
    w.put(&aux)?;
    w.put(&sha256(&aux))?;

    let mut summary = CompressSummary {
        raw_bytes: cube.raw_bytes() as u64,
        blocks: header.n_blocks(),
        ..Default::default()
    };
    let mut index = Vec::with_capacity(header.n_blocks());
    // Encode a batch of blocks in parallel, write them in order, and keep memory bounded.
    let batch = rayon::current_num_threads().max(1) * 4;
    for first in (0..header.n_blocks()).step_by(batch) {
        let encoded: Vec<(Vec<u8>, u64)> = (first..(first + batch).min(header.n_blocks()))
            .into_par_iter()
            .map(|b| encode_block(cube, &header, b, opts))
            .collect::<Result<_, _>>()?;
        for (i, (payload, exceptions)) in encoded.into_iter().enumerate() {
            summary.exception_pixels += exceptions;
            index.push(BlockEntry {
                offset: w.written,
                len: payload.len() as u64,
            });
            w.put(BLOCK_MAGIC)?;
            w.put(&((first + i) as u32).to_le_bytes())?;
            w.put(&(payload.len() as u64).to_le_bytes())?;
            w.put(&sha256(&payload))?;
            w.put(&payload)?;
        }
    }
    let index_json = serde_json::to_vec(&index).expect("index serialises");
    let index_offset = w.written;
    w.put(INDEX_MAGIC)?;
    w.put(&(index_json.len() as u32).to_le_bytes())?;
    w.put(&index_json)?;
    w.put(&sha256(&index_json))?;
    w.put(&index_offset.to_le_bytes())?;
    w.put(END_MAGIC)?;
    summary.compressed_bytes = w.written;
    Ok(summary)
}

/// Reads exactly `n` bytes of `part`, naming the part and the shortfall when the input ends.
fn read_part(r: &mut impl Read, n: u64, part: &str) -> Result<Vec<u8>, EdgeError> {
    let mut buf = Vec::new();
    r.take(n)
        .read_to_end(&mut buf)
        .map_err(|e| EdgeError::Stream {
            context: format!("reading {part}"),
            source: e,
        })?;
    if (buf.len() as u64) < n {
        return Err(EdgeError::Truncated {
            part: part.to_string(),
            expected: n,
            found: buf.len() as u64,
        });
    }
    Ok(buf)
}

fn read_u32(r: &mut impl Read, part: &str) -> Result<u32, EdgeError> {
    let b = read_part(r, 4, part)?;
    Ok(u32::from_le_bytes(b.try_into().expect("4 bytes")))
}

fn read_u64(r: &mut impl Read, part: &str) -> Result<u64, EdgeError> {
    let b = read_part(r, 8, part)?;
    Ok(u64::from_le_bytes(b.try_into().expect("8 bytes")))
}

fn verify(bytes: &[u8], expected: &[u8], part: &str) -> Result<(), EdgeError> {
    let found = sha256(bytes);
    if found.as_slice() != expected {
        return Err(EdgeError::ChecksumMismatch {
            part: part.to_string(),
            expected: hex(expected),
            found: hex(&found),
        });
    }
    Ok(())
}

fn expect_magic(r: &mut impl Read, magic: &[u8], part: &str) -> Result<(), EdgeError> {
    let got = read_part(r, magic.len() as u64, part)?;
    if got != magic {
        return Err(EdgeError::Corrupt {
            part: part.to_string(),
            reason: format!("expected marker {:?}, found {:?}", magic, got),
        });
    }
    Ok(())
}

fn read_checked_meta(r: &mut impl Read, len: u64, part: &str) -> Result<Vec<u8>, EdgeError> {
    if len > MAX_META_BYTES {
        return Err(EdgeError::Corrupt {
            part: part.to_string(),
            reason: format!("length {len} is implausible"),
        });
    }
    let bytes = read_part(r, len, part)?;
    let sum = read_part(r, 32, &format!("{part} checksum"))?;
    verify(&bytes, &sum, part)?;
    Ok(bytes)
}

fn split_sections<'a>(
    mut bytes: &'a [u8],
    count: usize,
    part: &str,
) -> Result<Vec<&'a [u8]>, EdgeError> {
    let mut out = Vec::with_capacity(count);
    for i in 0..count {
        let corrupt = |reason: String| EdgeError::Corrupt {
            part: format!("{part}, section {i}"),
            reason,
        };
        if bytes.len() < 8 {
            return Err(corrupt("missing section length".into()));
        }
        let len = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes"));
        bytes = &bytes[8..];
        if len > bytes.len() as u64 {
            return Err(corrupt(format!(
                "section of {len} bytes but only {} remain",
                bytes.len()
            )));
        }
        let (section, rest) = bytes.split_at(len as usize);
        out.push(section);
        bytes = rest;
    }
    if !bytes.is_empty() {
        return Err(EdgeError::Corrupt {
            part: part.to_string(),
            reason: format!("{} trailing bytes", bytes.len()),
        });
    }
    Ok(out)
}

/// The decoded planes of one block, in header order.
#[derive(Clone, Debug, PartialEq)]
pub struct Block {
    pub index: usize,
    pub spectra: std::ops::Range<usize>,
    pub planes: Vec<Samples>,
}

/// Decodes block `b` from its verified payload.
pub fn decode_block(header: &Header, b: usize, payload: &[u8]) -> Result<Block, EdgeError> {
    let part = header.block_part(b);
    let spectra = header.block_spectra(b);
    let n = spectra.len() * header.nwave;
    let sections = split_sections(payload, header.planes.len(), &part)?;
    let mut planes: Vec<Option<Samples>> = vec![None; header.planes.len()];
    // Noise and lossless planes first: quantised flux needs its noise plane decoded.
    let order = (0..header.planes.len())
        .filter(|&i| !matches!(header.planes[i].encoding, Encoding::QuantizedFlux { .. }));
    let flux_planes = (0..header.planes.len())
        .filter(|&i| matches!(header.planes[i].encoding, Encoding::QuantizedFlux { .. }));
    for i in order.chain(flux_planes) {
        let ph = &header.planes[i];
        let plane_part = format!("{part}, plane {}", ph.name);
        let samples = match &ph.encoding {
            Encoding::Lossless | Encoding::NoiseRounded { .. } => {
                let raw = codec::decode(
                    sections[i],
                    ph.dtype.width(),
                    n * ph.dtype.width(),
                    &plane_part,
                )?;
                Samples::from_le_bytes(ph.dtype, &raw)?
            }
            Encoding::QuantizedFlux {
                max_error_sigma,
                noise_plane,
                noise_role,
                noise_mantissa_bits,
                seed,
                predictor_taps,
            } => {
                if *predictor_taps != quantize::PREDICTOR_TAPS {
                    return Err(EdgeError::Corrupt {
                        part: plane_part,
                        reason: format!("predictor with {predictor_taps} taps is not supported"),
                    });
                }
                let noise_index = header
                    .planes
                    .iter()
                    .position(|p| &p.name == noise_plane)
                    .expect("validated header");
                let Some(Samples::F32(noise)) = &planes[noise_index] else {
                    return Err(EdgeError::Corrupt {
                        part: plane_part,
                        reason: "noise plane is not f32".into(),
                    });
                };
                let q = FluxQuantizer {
                    max_error_sigma: *max_error_sigma,
                    noise_role: *noise_role,
                    noise_mantissa_bits: *noise_mantissa_bits,
                    seed: *seed,
                };
                decode_flux(&q, sections[i], noise, header, &spectra, &plane_part)?
            }
        };
        planes[i] = Some(samples);
    }
    Ok(Block {
        index: b,
        spectra,
        planes: planes
            .into_iter()
            .map(|p| p.expect("every plane decoded"))
            .collect(),
    })
}

fn decode_flux(
    q: &FluxQuantizer,
    section: &[u8],
    noise: &[f32],
    header: &Header,
    spectra: &std::ops::Range<usize>,
    part: &str,
) -> Result<Samples, EdgeError> {
    let n = spectra.len() * header.nwave;
    let parts = split_sections(section, 3, part)?;
    let residual_bytes = codec::decode(parts[0], 4, n * 4, &format!("{part} residuals"))?;
    let residuals: Vec<u32> = residual_bytes
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes")))
        .collect();
    let flag_bytes = codec::decode(parts[1], 1, n.div_ceil(8), &format!("{part} exception map"))?;
    let flags: Vec<bool> = (0..n)
        .map(|i| flag_bytes[i / 8] >> (i % 8) & 1 == 1)
        .collect();
    let n_exceptions = flags.iter().filter(|&&f| f).count();
    let verbatim = codec::decode(parts[2], 4, n_exceptions * 4, &format!("{part} exceptions"))?;
    let mut values = verbatim
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")));
    let mut flux = vec![0f32; n];
    for (i, s) in spectra.clone().enumerate() {
        let span = i * header.nwave..(i + 1) * header.nwave;
        q.decode_spectrum(
            &residuals[span.clone()],
            &flags[span.clone()],
            &mut values,
            &noise[span.clone()],
            (s * header.nwave) as u64,
            &mut flux[span],
        )
        .map_err(|reason| EdgeError::Corrupt {
            part: part.to_string(),
            reason,
        })?;
    }
    Ok(Samples::F32(flux))
}

fn read_preamble(r: &mut impl Read) -> Result<(Header, Vec<AuxVector>), EdgeError> {
    let magic = read_part(r, MAGIC.len() as u64, "file magic")?;
    if magic != MAGIC {
        return Err(EdgeError::NotAContainer);
    }
    let len = read_u32(r, "header length")?;
    let header_json = read_checked_meta(r, u64::from(len), "header")?;
    let header: Header = serde_json::from_slice(&header_json).map_err(|e| EdgeError::Corrupt {
        part: "header".into(),
        reason: e.to_string(),
    })?;
    header.validate()?;
    let aux_len = read_u64(r, "aux length")?;
    let aux_bytes = read_checked_meta(r, aux_len, "aux vectors")?;
    let sections = split_sections(&aux_bytes, header.aux.len(), "aux vectors")?;
    let aux = header
        .aux
        .iter()
        .zip(sections)
        .map(|(a, s)| {
            let raw = codec::decode(s, 8, a.len * 8, &format!("aux vector {}", a.name))?;
            match Samples::from_le_bytes(DType::F64, &raw)? {
                Samples::F64(values) => Ok(AuxVector {
                    name: a.name.clone(),
                    values,
                }),
                _ => unreachable!("F64 decodes to F64"),
            }
        })
        .collect::<Result<_, EdgeError>>()?;
    Ok((header, aux))
}

/// Reads block `b` (marker, number, length, checksum, payload) from the current position.
fn read_block_payload(r: &mut impl Read, header: &Header, b: usize) -> Result<Vec<u8>, EdgeError> {
    let part = header.block_part(b);
    expect_magic(r, BLOCK_MAGIC, &format!("{part} marker"))?;
    let number = read_u32(r, &format!("{part} number"))?;
    if number as usize != b {
        return Err(EdgeError::Corrupt {
            part,
            reason: format!("found block number {number}"),
        });
    }
    let len = read_u64(r, &format!("{part} length"))?;
    // Quantised flux may hold residuals and verbatim values for every sample: 2 x width + 1.
    let per_sample: u64 = header
        .planes
        .iter()
        .map(|p| 2 * p.dtype.width() as u64 + 1)
        .sum();
    let plausible = per_sample * (header.spectra_per_block * header.nwave) as u64 + (1 << 20);
    if len > plausible {
        return Err(EdgeError::Corrupt {
            part,
            reason: format!("payload length {len} is implausible"),
        });
    }
    let sum = read_part(r, 32, &format!("{part} checksum"))?;
    let payload = read_part(r, len, &part)?;
    verify(&payload, &sum, &part)?;
    Ok(payload)
}

/// Decodes a container front to back from any reader (a pipe, a socket): one block at a time.
pub struct StreamDecoder<R: Read> {
    reader: R,
    pub header: Header,
    pub aux: Vec<AuxVector>,
    next: usize,
    finished: bool,
}

impl<R: Read> StreamDecoder<R> {
    pub fn new(mut reader: R) -> Result<Self, EdgeError> {
        let (header, aux) = read_preamble(&mut reader)?;
        Ok(StreamDecoder {
            reader,
            header,
            aux,
            next: 0,
            finished: false,
        })
    }

    /// The next block, or `None` after the last one (whose end-of-file index is then checked).
    pub fn next_block(&mut self) -> Result<Option<Block>, EdgeError> {
        if self.finished {
            return Ok(None);
        }
        let b = self.next;
        if b == self.header.n_blocks() {
            self.finished = true;
            expect_magic(&mut self.reader, INDEX_MAGIC, "index marker")?;
            let len = read_u32(&mut self.reader, "index length")?;
            read_checked_meta(&mut self.reader, u64::from(len), "index")?;
            read_u64(&mut self.reader, "trailer")?;
            expect_magic(&mut self.reader, END_MAGIC, "end marker")?;
            return Ok(None);
        }
        let payload = read_block_payload(&mut self.reader, &self.header, b)?;
        self.next += 1;
        decode_block(&self.header, b, &payload).map(Some)
    }

    /// Decodes everything into a cube.
    pub fn into_cube(mut self) -> Result<SpectralCube, EdgeError> {
        let h = self.header.clone();
        let n = h.nspec() * h.nwave;
        let mut planes: Vec<Samples> = h.planes.iter().map(|p| empty_samples(p.dtype, n)).collect();
        while let Some(block) = self.next_block()? {
            let range = block.spectra.start * h.nwave..block.spectra.end * h.nwave;
            for (dst, src) in planes.iter_mut().zip(block.planes) {
                splice(dst, range.clone(), src);
            }
        }
        Ok(SpectralCube {
            nx: h.nx,
            ny: h.ny,
            nwave: h.nwave,
            planes: h
                .planes
                .iter()
                .zip(planes)
                .map(|(p, samples)| Plane {
                    name: p.name.clone(),
                    role: p.role,
                    samples,
                })
                .collect(),
            aux: self.aux,
            headers: h.headers.clone(),
        })
    }
}

fn empty_samples(dtype: DType, n: usize) -> Samples {
    match dtype {
        DType::U8 => Samples::U8(vec![0; n]),
        DType::I16 => Samples::I16(vec![0; n]),
        DType::I32 => Samples::I32(vec![0; n]),
        DType::I64 => Samples::I64(vec![0; n]),
        DType::F32 => Samples::F32(vec![0.0; n]),
        DType::F64 => Samples::F64(vec![0.0; n]),
    }
}

fn splice(dst: &mut Samples, range: std::ops::Range<usize>, src: Samples) {
    match (dst, src) {
        (Samples::U8(d), Samples::U8(s)) => d[range].copy_from_slice(&s),
        (Samples::I16(d), Samples::I16(s)) => d[range].copy_from_slice(&s),
        (Samples::I32(d), Samples::I32(s)) => d[range].copy_from_slice(&s),
        (Samples::I64(d), Samples::I64(s)) => d[range].copy_from_slice(&s),
        (Samples::F32(d), Samples::F32(s)) => d[range].copy_from_slice(&s),
        (Samples::F64(d), Samples::F64(s)) => d[range].copy_from_slice(&s),
        _ => unreachable!("block planes are decoded with the header's dtypes"),
    }
}

/// Random access to a container in a seekable file: any block or spaxel alone.
pub struct ContainerReader<R: Read + Seek> {
    reader: R,
    pub header: Header,
    pub aux: Vec<AuxVector>,
    pub index: Vec<BlockEntry>,
}

impl<R: Read + Seek> ContainerReader<R> {
    pub fn new(mut reader: R) -> Result<Self, EdgeError> {
        let (header, aux) = read_preamble(&mut reader)?;
        let seek_err = |e| EdgeError::Stream {
            context: "seeking in the container".into(),
            source: e,
        };
        let end = reader.seek(SeekFrom::End(0)).map_err(seek_err)?;
        if end < 16 {
            return Err(EdgeError::Truncated {
                part: "trailer".into(),
                expected: 16,
                found: end,
            });
        }
        reader.seek(SeekFrom::Start(end - 16)).map_err(seek_err)?;
        let index_offset = read_u64(&mut reader, "trailer")?;
        expect_magic(&mut reader, END_MAGIC, "end marker (file truncated?)")?;
        if index_offset >= end {
            return Err(EdgeError::Corrupt {
                part: "trailer".into(),
                reason: format!("index offset {index_offset} beyond the end of file ({end})"),
            });
        }
        reader
            .seek(SeekFrom::Start(index_offset))
            .map_err(seek_err)?;
        expect_magic(&mut reader, INDEX_MAGIC, "index marker")?;
        let len = read_u32(&mut reader, "index length")?;
        let json = read_checked_meta(&mut reader, u64::from(len), "index")?;
        let index: Vec<BlockEntry> =
            serde_json::from_slice(&json).map_err(|e| EdgeError::Corrupt {
                part: "index".into(),
                reason: e.to_string(),
            })?;
        if index.len() != header.n_blocks() {
            return Err(EdgeError::Corrupt {
                part: "index".into(),
                reason: format!(
                    "{} blocks listed, header implies {}",
                    index.len(),
                    header.n_blocks()
                ),
            });
        }
        Ok(ContainerReader {
            reader,
            header,
            aux,
            index,
        })
    }

    pub fn read_block(&mut self, b: usize) -> Result<Block, EdgeError> {
        let entry = *self.index.get(b).ok_or_else(|| {
            EdgeError::InvalidParameter(format!(
                "block {b} (the container has {})",
                self.index.len()
            ))
        })?;
        self.reader
            .seek(SeekFrom::Start(entry.offset))
            .map_err(|e| EdgeError::Stream {
                context: format!("seeking to block {b}"),
                source: e,
            })?;
        let payload = read_block_payload(&mut self.reader, &self.header, b)?;
        decode_block(&self.header, b, &payload)
    }

    /// Every plane of spaxel (x, y), decoding only the block that holds it.
    pub fn read_spaxel(&mut self, x: usize, y: usize) -> Result<Vec<(String, Samples)>, EdgeError> {
        let (nx, ny) = (self.header.nx, self.header.ny);
        if x >= nx || y >= ny {
            return Err(EdgeError::SpaxelOutOfRange { x, y, nx, ny });
        }
        let s = y * nx + x;
        let block = self.read_block(s / self.header.spectra_per_block)?;
        let nwave = self.header.nwave;
        let offset = (s - block.spectra.start) * nwave;
        let bytes_of = |samples: &Samples, dtype: DType| {
            Samples::from_le_bytes(dtype, &samples.le_bytes(offset..offset + nwave))
        };
        self.header
            .planes
            .iter()
            .zip(&block.planes)
            .map(|(p, samples)| Ok((p.name.clone(), bytes_of(samples, p.dtype)?)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::edge::sigma_from_noise;
    use proptest::prelude::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// A small cube with a continuum, noise from IVAR, some masked and odd pixels.
    fn noisy_cube(nx: usize, ny: usize, nwave: usize, seed: u64) -> SpectralCube {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let n = nx * ny * nwave;
        let mut flux = Vec::with_capacity(n);
        let mut ivar = Vec::with_capacity(n);
        let mut mask = Vec::with_capacity(n);
        for s in 0..nx * ny {
            let level = rng.gen_range(0.5f32..50.0);
            for k in 0..nwave {
                let sigma = 0.2 + 0.01 * (k % 17) as f32;
                flux.push(
                    level * (1.0 + 0.2 * (k as f32 * 0.05).sin())
                        + sigma * rng.gen_range(-2.0f32..2.0),
                );
                ivar.push(1.0 / (sigma * sigma));
                mask.push(i32::from(s % 7 == 3 && k < 5) * 1024);
            }
        }
        flux[3] = f32::NAN;
        flux[4] = f32::INFINITY;
        flux[5] = -0.0;
        ivar[6] = 0.0;
        SpectralCube {
            nx,
            ny,
            nwave,
            planes: vec![
                Plane {
                    name: "FLUX".into(),
                    role: Role::Flux,
                    samples: Samples::F32(flux),
                },
                Plane {
                    name: "IVAR".into(),
                    role: Role::Ivar,
                    samples: Samples::F32(ivar),
                },
                Plane {
                    name: "MASK".into(),
                    role: Role::Mask,
                    samples: Samples::I32(mask),
                },
            ],
            aux: vec![AuxVector {
                name: "WAVE".into(),
                values: (0..nwave)
                    .map(|k| 3600.0 * 1.0001f64.powi(k as i32))
                    .collect(),
            }],
            headers: vec![HduHeader {
                hdu: "FLUX".into(),
                cards: vec![
                    "BUNIT   = '1E-17 erg/s/cm^2/Ang/spaxel'".into(),
                    "HISTORY made for a test".into(),
                ],
            }],
        }
    }

    fn to_bytes(cube: &SpectralCube, opts: &CompressOptions) -> Vec<u8> {
        let mut out = Vec::new();
        let summary = compress(cube, opts, &mut out).unwrap();
        assert_eq!(summary.compressed_bytes, out.len() as u64);
        out
    }

    fn lossless() -> CompressOptions {
        CompressOptions {
            mode: Mode::Lossless,
            spectra_per_block: 3,
            ..Default::default()
        }
    }

    fn f32s(cube: &SpectralCube, name: &str) -> Vec<f32> {
        f32_plane(cube, name).to_vec()
    }

    fn arbitrary_f32() -> impl Strategy<Value = f32> {
        prop_oneof![
            6 => -1e5f32..1e5f32,
            1 => Just(f32::NAN),
            1 => Just(f32::from_bits(0xffc0_0001)),
            1 => Just(f32::NEG_INFINITY),
            1 => Just(-0.0f32),
            1 => any::<f32>(),
        ]
    }

    fn random_cube() -> impl Strategy<Value = SpectralCube> {
        (1usize..5, 1usize..4, 1usize..40).prop_flat_map(|(nx, ny, nwave)| {
            let n = nx * ny * nwave;
            (
                prop::collection::vec(arbitrary_f32(), n),
                prop::collection::vec(arbitrary_f32(), n),
                prop::collection::vec(any::<i32>(), n),
                prop::collection::vec(any::<u8>(), n),
                prop::collection::vec(any::<f64>(), 0..20),
            )
                .prop_map(move |(flux, stat, mask, dq, wave)| SpectralCube {
                    nx,
                    ny,
                    nwave,
                    planes: vec![
                        Plane {
                            name: "DATA".into(),
                            role: Role::Flux,
                            samples: Samples::F32(flux),
                        },
                        Plane {
                            name: "STAT".into(),
                            role: Role::Variance,
                            samples: Samples::F32(stat),
                        },
                        Plane {
                            name: "MASK".into(),
                            role: Role::Mask,
                            samples: Samples::I32(mask),
                        },
                        Plane {
                            name: "DQ".into(),
                            role: Role::Other,
                            samples: Samples::U8(dq),
                        },
                    ],
                    aux: vec![AuxVector {
                        name: "WAVE".into(),
                        values: wave,
                    }],
                    headers: vec![],
                })
        })
    }

    fn bits_equal(a: &SpectralCube, b: &SpectralCube) -> bool {
        let bits = |c: &SpectralCube| -> Vec<Vec<u8>> {
            c.planes
                .iter()
                .map(|p| p.samples.le_bytes(0..p.samples.len()))
                .collect()
        };
        let aux = |c: &SpectralCube| -> Vec<Vec<u64>> {
            c.aux
                .iter()
                .map(|a| a.values.iter().map(|v| v.to_bits()).collect())
                .collect()
        };
        (a.nx, a.ny, a.nwave) == (b.nx, b.ny, b.nwave)
            && bits(a) == bits(b)
            && aux(a) == aux(b)
            && a.headers == b.headers
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn lossless_round_trips_random_cubes_bit_for_bit(
            cube in random_cube(),
            per_block in 1usize..5,
            filter in prop_oneof![
                Just(FilterChoice::Best),
                prop::sample::select(Filter::ALL.to_vec()).prop_map(FilterChoice::Fixed),
            ],
        ) {
            let opts = CompressOptions { mode: Mode::Lossless, spectra_per_block: per_block, filter, ..Default::default() };
            let bytes = to_bytes(&cube, &opts);
            let back = StreamDecoder::new(bytes.as_slice()).unwrap().into_cube().unwrap();
            prop_assert!(bits_equal(&cube, &back));
        }

        #[test]
        fn any_truncation_is_an_error_never_a_panic_or_a_cube(cut in 0usize..10_000) {
            let cube = noisy_cube(3, 2, 50, 1);
            let bytes = to_bytes(&cube, &lossless());
            let cut = cut % bytes.len();
            prop_assert!(StreamDecoder::new(&bytes[..cut]).and_then(|d| d.into_cube()).is_err());
            prop_assert!(ContainerReader::new(std::io::Cursor::new(&bytes[..cut])).is_err());
        }
    }

    #[test]
    fn lossy_keeps_every_pixel_within_the_bound_and_the_rest_exact() {
        let cube = noisy_cube(5, 4, 300, 2);
        let opts = CompressOptions {
            spectra_per_block: 6,
            ..Default::default()
        };
        let bytes = to_bytes(&cube, &opts);
        let back = StreamDecoder::new(bytes.as_slice())
            .unwrap()
            .into_cube()
            .unwrap();
        let (flux, ivar) = (f32s(&cube, "FLUX"), f32s(&cube, "IVAR"));
        let (flux2, ivar2) = (f32s(&back, "FLUX"), f32s(&back, "IVAR"));
        let mask = &cube.planes[2].samples;
        let mut quantised = 0;
        for i in 0..flux.len() {
            let rel = (f64::from(ivar2[i]) / f64::from(ivar[i]) - 1.0).abs();
            assert!(
                ivar[i] == 0.0 && ivar2[i] == 0.0 || rel <= 0.01,
                "ivar {i}: {rel}"
            );
            match sigma_from_noise(Role::Ivar, ivar[i]) {
                Some(sigma) if flux[i].is_finite() && !mask.is_nonzero(i) => {
                    quantised += 1;
                    let err = (f64::from(flux2[i]) - f64::from(flux[i])).abs();
                    assert!(err <= 0.125 * sigma, "pixel {i}: {err} > 0.125 * {sigma}");
                }
                _ => assert_eq!(flux2[i].to_bits(), flux[i].to_bits(), "pixel {i}"),
            }
        }
        assert!(quantised > flux.len() * 9 / 10);
        assert_eq!(back.planes[2], cube.planes[2], "mask is lossless");
        assert_eq!(back.aux, cube.aux);
        assert_eq!(back.headers, cube.headers);
        assert!(
            bytes.len() * 3 < cube.raw_bytes(),
            "{} of {}",
            bytes.len(),
            cube.raw_bytes()
        );
    }

    #[test]
    fn lossy_without_noise_is_refused() {
        let mut cube = noisy_cube(2, 2, 10, 3);
        cube.planes.remove(1);
        let err = compress(&cube, &CompressOptions::default(), &mut Vec::new()).unwrap_err();
        assert!(matches!(err, EdgeError::NoNoise));
        assert!(err.to_string().contains("IVAR or STAT"));
    }

    #[test]
    fn random_access_and_streaming_agree_with_the_whole_cube() {
        let cube = noisy_cube(4, 3, 40, 4);
        let bytes = to_bytes(
            &cube,
            &CompressOptions {
                spectra_per_block: 5,
                ..Default::default()
            },
        );
        let whole = StreamDecoder::new(bytes.as_slice())
            .unwrap()
            .into_cube()
            .unwrap();
        let mut reader = ContainerReader::new(std::io::Cursor::new(&bytes)).unwrap();
        for (x, y) in [(0, 0), (3, 2), (1, 1), (2, 0)] {
            let s = y * 4 + x;
            for (name, samples) in reader.read_spaxel(x, y).unwrap() {
                let plane = whole.planes.iter().find(|p| p.name == name).unwrap();
                assert_eq!(
                    samples.le_bytes(0..40),
                    plane.samples.le_bytes(s * 40..(s + 1) * 40)
                );
            }
        }
        assert!(matches!(
            reader.read_spaxel(4, 0),
            Err(EdgeError::SpaxelOutOfRange { .. })
        ));
        let mut stream = StreamDecoder::new(bytes.as_slice()).unwrap();
        let mut seen = Vec::new();
        while let Some(block) = stream.next_block().unwrap() {
            seen.push(block.spectra);
        }
        assert_eq!(seen, vec![0..5, 5..10, 10..12]);
    }

    #[test]
    fn corruption_names_the_block_and_the_expected_checksum() {
        let cube = noisy_cube(4, 3, 40, 5);
        let bytes = to_bytes(&cube, &lossless());
        let reader = ContainerReader::new(std::io::Cursor::new(&bytes)).unwrap();
        let entry = reader.index[2];
        let mut bad = bytes.clone();
        // Flip a bit inside block 2's payload (after marker, number, length and checksum).
        bad[(entry.offset + 4 + 4 + 8 + 32 + 5) as usize] ^= 0x10;
        let err = StreamDecoder::new(bad.as_slice())
            .unwrap()
            .into_cube()
            .unwrap_err();
        match &err {
            EdgeError::ChecksumMismatch {
                part,
                expected,
                found,
            } => {
                assert_eq!(part, "block 2 (spaxels 6..9)");
                assert_ne!(expected, found);
                assert_eq!(expected.len(), 64);
            }
            other => panic!("unexpected {other}"),
        }
        let mut reader = ContainerReader::new(std::io::Cursor::new(&bad)).unwrap();
        assert!(reader.read_block(1).is_ok(), "other blocks stay readable");
        assert!(
            reader
                .read_spaxel(2, 1)
                .unwrap_err()
                .to_string()
                .contains("block 2")
        );

        let mut bad_header = bytes.clone();
        bad_header[20] ^= 1;
        let err = StreamDecoder::new(bad_header.as_slice()).err().unwrap();
        assert!(
            matches!(&err, EdgeError::ChecksumMismatch { part, .. } if part == "header"),
            "{err}"
        );

        let cut = (entry.offset + 60) as usize;
        let err = StreamDecoder::new(&bytes[..cut])
            .unwrap()
            .into_cube()
            .unwrap_err();
        match &err {
            EdgeError::Truncated {
                part,
                expected,
                found,
            } => {
                assert_eq!(part, "block 2 (spaxels 6..9)");
                assert_eq!(*expected, entry.len);
                assert_eq!(*found, 60 - 48);
            }
            other => panic!("unexpected {other}"),
        }
        assert!(matches!(
            StreamDecoder::new(&b"SIMPLE  =                    T"[..])
                .err()
                .unwrap(),
            EdgeError::NotAContainer
        ));
    }
}

//! bench-edge: TARSIS edge compression against fpack/funpack and zstd, in the same run.
//!
//! For every cube in the shared data (and a MUSE-size synthetic cube generated here): ratio on
//! the whole FITS file, MB/s in (compression) and out (decompression), and the flux error in
//! units of each pixel's noise (median, 99th percentile, max), for
//! - TARSIS lossy (`--max-error-sigma 0.125`, 1% noise) and lossless containers,
//! - fpack default (RICE, row tiles, q = 4) and fpack with one-spectrum tiles (`-t 1,1,NWAVE
//!   -q 4`), timed with funpack,
//! - zstd -3 on the FITS file,
//! - our tile-compressed FITS writer (cfitsio, q = 4, one-spectrum tiles).
//!
//! Run: `cargo run --release -p astro-fit --bin bench-edge` (see BENCHMARKS.md).

use std::fs::File;
use std::io::{BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use astro_fit::edge::codec::{Filter, FilterChoice};
use astro_fit::edge::container::{self, CompressOptions, Mode, StreamDecoder};
use astro_fit::edge::io::{read_fits_cube, write_fits_cube};
use astro_fit::edge::tilefits::{TileOptions, write_tile_compressed};
use astro_fit::edge::{AuxVector, HduHeader, Plane, Role, Samples, SpectralCube, sigma_from_noise};
use clap::Parser;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;
use rayon::prelude::*;

/// The bound at which our fidelity matches fpack's best setting here (q = 4, one-spectrum
/// tiles): the comparison point of the issue, looser than our default (0.05 sigma).
const FPACK_Q4_FIDELITY: Mode = Mode::Lossy {
    max_error_sigma: 0.125,
    noise_rel_error: 0.01,
};

#[derive(Debug, Parser)]
#[command(about = "TARSIS edge compression against fpack/funpack and zstd")]
struct Args {
    /// Directory of input cubes (default: <workspace>/../shared/data/cubes or
    /// $CECCM_SHARED_DATA/cubes).
    #[arg(long)]
    cubes: Option<PathBuf>,
    /// Scratch directory (FITS copies, fpack output).
    #[arg(long, default_value = "target/bench-edge")]
    work: PathBuf,
    /// Spatial size of the synthetic cube (MUSE: 300 x 300); 0 skips it.
    #[arg(long, default_value_t = 300)]
    synthetic_spaxels: usize,
    /// Wavelength pixels of the synthetic cube (MUSE: 3681).
    #[arg(long, default_value_t = 3681)]
    synthetic_nwave: usize,
    /// Timed repetitions (the median is reported).
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// fpack with one-spectrum tiles is run (once) only on files up to this size: its funpack
    /// takes minutes per 50 MB.
    #[arg(long, default_value_t = 120)]
    fpack_tiles_max_mb: u64,
}

/// Flux error in units of the pixel's noise, and the worst relative change of the noise.
#[derive(Debug, Clone, Copy, Default)]
struct Fidelity {
    median: f64,
    p99: f64,
    max: f64,
    rms: f64,
    over_one_sigma: f64,
    noise_rel_max: f64,
}

#[derive(Debug)]
struct Row {
    cube: String,
    method: String,
    raw: u64,
    packed: u64,
    compress_s: f64,
    decompress_s: f64,
    fidelity: Option<Fidelity>,
    note: String,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn timed<T>(repeat: usize, mut f: impl FnMut() -> Result<T>) -> Result<(T, f64)> {
    let mut times = Vec::with_capacity(repeat);
    let mut last = None;
    for _ in 0..repeat.max(1) {
        let t = Instant::now();
        last = Some(f()?);
        times.push(t.elapsed().as_secs_f64());
    }
    Ok((last.expect("at least one run"), median(times)))
}

fn f32_of(cube: &SpectralCube, name: &str) -> Option<Vec<f32>> {
    match &cube.planes.iter().find(|p| p.name == name)?.samples {
        Samples::F32(v) => Some(v.clone()),
        _ => None,
    }
}

/// Accumulates |error| / sigma over blocks of spectra.
#[derive(Default)]
struct ErrorAccumulator {
    errors: Vec<f32>,
    noise_rel_max: f64,
}

impl ErrorAccumulator {
    fn add(&mut self, role: Role, flux: &[f32], noise: &[f32], flux2: &[f32], noise2: &[f32]) {
        for i in 0..flux.len() {
            let Some(sigma) = sigma_from_noise(role, noise[i]) else {
                continue;
            };
            if !flux[i].is_finite() {
                continue;
            }
            let e = (f64::from(flux2[i]) - f64::from(flux[i])).abs() / sigma;
            self.errors
                .push(if e.is_nan() { f32::INFINITY } else { e as f32 });
            let rel = (f64::from(noise2[i]) / f64::from(noise[i]) - 1.0).abs();
            self.noise_rel_max = self.noise_rel_max.max(rel);
        }
    }

    fn finish(mut self) -> Fidelity {
        if self.errors.is_empty() {
            return Fidelity::default();
        }
        let n = self.errors.len();
        let rms = (self
            .errors
            .iter()
            .map(|e| f64::from(*e).powi(2))
            .sum::<f64>()
            / n as f64)
            .sqrt();
        let over = self.errors.iter().filter(|e| **e > 1.0).count() as f64 / n as f64;
        self.errors.par_sort_unstable_by(f32::total_cmp);
        let at = |q: f64| f64::from(self.errors[((n - 1) as f64 * q).round() as usize]);
        Fidelity {
            median: at(0.5),
            p99: at(0.99),
            max: at(1.0),
            rms,
            over_one_sigma: over,
            noise_rel_max: self.noise_rel_max,
        }
    }
}

fn noise_of(cube: &SpectralCube) -> Result<(String, Role, String)> {
    let flux = cube
        .plane(Role::Flux)
        .context("cube has no flux plane")?
        .name
        .clone();
    let noise = cube.noise_plane().context("cube has no noise plane")?;
    Ok((flux, noise.role, noise.name.clone()))
}

fn fidelity_of(original: &SpectralCube, restored: &SpectralCube) -> Result<Fidelity> {
    let (flux, role, noise) = noise_of(original)?;
    let mut acc = ErrorAccumulator::default();
    let get = |c: &SpectralCube, n: &str| f32_of(c, n).with_context(|| format!("plane {n}"));
    acc.add(
        role,
        &get(original, &flux)?,
        &get(original, &noise)?,
        &get(restored, &flux)?,
        &get(restored, &noise)?,
    );
    Ok(acc.finish())
}

/// Decodes a container block by block (streaming), comparing each block with the original.
fn streamed_fidelity(original: &SpectralCube, packed: &[u8]) -> Result<Fidelity> {
    let (flux, role, noise) = noise_of(original)?;
    let (of, on) = (
        f32_of(original, &flux).unwrap(),
        f32_of(original, &noise).unwrap(),
    );
    let mut decoder = StreamDecoder::new(packed)?;
    let fi = decoder
        .header
        .planes
        .iter()
        .position(|p| p.name == flux)
        .unwrap();
    let ni = decoder
        .header
        .planes
        .iter()
        .position(|p| p.name == noise)
        .unwrap();
    let nwave = original.nwave;
    let mut acc = ErrorAccumulator::default();
    while let Some(block) = decoder.next_block()? {
        let r = block.spectra.start * nwave..block.spectra.end * nwave;
        let (Samples::F32(f2), Samples::F32(n2)) = (&block.planes[fi], &block.planes[ni]) else {
            bail!("flux or noise is not f32");
        };
        acc.add(role, &of[r.clone()], &on[r], f2, n2);
    }
    Ok(acc.finish())
}

/// Streams the container and compares every block with the original, bit for bit.
fn check_bit_exact(original: &SpectralCube, packed: &[u8]) -> Result<()> {
    let mut decoder = StreamDecoder::new(packed)?;
    let nwave = original.nwave;
    while let Some(block) = decoder.next_block()? {
        let r = block.spectra.start * nwave..block.spectra.end * nwave;
        for (plane, decoded) in original.planes.iter().zip(&block.planes) {
            if plane.samples.le_bytes(r.clone()) != decoded.le_bytes(0..decoded.len()) {
                bail!(
                    "lossless round trip differs in block {} of {}",
                    block.index,
                    plane.name
                );
            }
        }
    }
    Ok(())
}

fn decode_all(packed: &[u8]) -> Result<usize> {
    let mut decoder = StreamDecoder::new(packed)?;
    let mut blocks = 0;
    while decoder.next_block()?.is_some() {
        blocks += 1;
    }
    Ok(blocks)
}

fn run_tool(program: &str, args: &[&str]) -> Result<()> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("running {program} (apt-get install libcfitsio-bin)"))?;
    if !out.status.success() {
        bail!(
            "{program} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

fn file_size(p: &Path) -> Result<u64> {
    Ok(std::fs::metadata(p)
        .with_context(|| p.display().to_string())?
        .len())
}

struct Bench<'a> {
    args: &'a Args,
    /// Timed repetitions for the cube at hand.
    repeat: usize,
    rows: Vec<Row>,
}

impl Bench<'_> {
    fn ours(&mut self, name: &str, cube: &SpectralCube, raw: u64, evaluate: bool) -> Result<()> {
        let repeat = self.repeat;
        for (label, mode) in [
            ("TARSIS lossy 0.125 sigma", FPACK_Q4_FIDELITY),
            ("TARSIS lossless", Mode::Lossless),
        ] {
            let opts = CompressOptions {
                mode,
                ..CompressOptions::default()
            };
            for threads in [rayon::current_num_threads(), 1] {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()?;
                let (packed, compress_s) = pool.install(|| {
                    timed(repeat, || {
                        let mut out = Vec::new();
                        container::compress(cube, &opts, &mut out)?;
                        Ok(out)
                    })
                })?;
                let (_, decompress_s) = timed(repeat, || decode_all(&packed))?;
                let fidelity = if threads == 1 || !evaluate {
                    None
                } else if mode == Mode::Lossless {
                    check_bit_exact(cube, &packed).with_context(|| name.to_string())?;
                    Some(Fidelity::default())
                } else {
                    Some(streamed_fidelity(cube, &packed)?)
                };
                self.rows.push(Row {
                    cube: name.into(),
                    method: format!(
                        "{label} ({threads} thread{})",
                        if threads == 1 { "" } else { "s" }
                    ),
                    raw,
                    packed: packed.len() as u64,
                    compress_s,
                    decompress_s,
                    fidelity,
                    note: "in memory (codec only)".into(),
                });
            }
        }
        Ok(())
    }

    /// The lossless filter alternatives (one run each), lossless and lossy.
    fn filters(&mut self, name: &str, cube: &SpectralCube, raw: u64) -> Result<()> {
        let choices = Filter::ALL
            .into_iter()
            .map(FilterChoice::Fixed)
            .chain([FilterChoice::Best]);
        for filter in choices {
            for mode in [Mode::Lossless, FPACK_Q4_FIDELITY] {
                let opts = CompressOptions {
                    mode,
                    filter,
                    ..CompressOptions::default()
                };
                let (packed, compress_s) = timed(1, || {
                    let mut out = Vec::new();
                    container::compress(cube, &opts, &mut out)?;
                    Ok(out)
                })?;
                let (_, decompress_s) = timed(1, || decode_all(&packed))?;
                let label = match filter {
                    FilterChoice::Fixed(f) => format!("{f:?}"),
                    FilterChoice::Best => "best of all, per section".into(),
                };
                let kind = if mode == Mode::Lossless {
                    "lossless"
                } else {
                    "lossy"
                };
                self.rows.push(Row {
                    cube: name.into(),
                    method: format!("filter {label}, {kind}"),
                    raw,
                    packed: packed.len() as u64,
                    compress_s,
                    decompress_s,
                    fidelity: None,
                    note: "filter alternatives, 1 run".into(),
                });
            }
        }
        Ok(())
    }

    /// Ours from file to file, as the CLI does it (FITS read + compress + write; read +
    /// decompress + FITS write), to compare with fpack/funpack on equal terms.
    fn ours_file_to_file(&mut self, name: &str, fits: &Path, raw: u64) -> Result<()> {
        let work = &self.args.work;
        let packed = work.join(format!("{name}.tarsis"));
        let back = work.join(format!("{name}.tarsis.fits"));
        let (_, compress_s) = timed(self.repeat, || {
            let cube = read_fits_cube(fits)?;
            let mut out = std::io::BufWriter::new(File::create(&packed)?);
            let opts = CompressOptions {
                mode: FPACK_Q4_FIDELITY,
                ..CompressOptions::default()
            };
            container::compress(&cube, &opts, &mut out)?;
            out.flush()?;
            Ok(())
        })?;
        let (_, decompress_s) = timed(self.repeat, || {
            let cube = StreamDecoder::new(BufReader::new(File::open(&packed)?))?.into_cube()?;
            write_fits_cube(&cube, &back)?;
            Ok(())
        })?;
        self.rows.push(Row {
            cube: name.into(),
            method: "TARSIS lossy 0.125 sigma, file to file".into(),
            raw,
            packed: file_size(&packed)?,
            compress_s,
            decompress_s,
            fidelity: None,
            note: "FITS in, FITS out".into(),
        });
        Ok(())
    }

    fn fpack(&mut self, name: &str, cube: &SpectralCube, fits: &Path, tiles: bool) -> Result<()> {
        let work = &self.args.work;
        let suffix = if tiles { "q4tiles" } else { "default" };
        let packed = work.join(format!("{name}.{suffix}.fz"));
        let back = work.join(format!("{name}.{suffix}.fits"));
        let tile = format!("1,1,{}", cube.nwave);
        let mut fargs: Vec<&str> = Vec::new();
        if tiles {
            fargs.extend(["-t", &tile, "-q", "4"]);
        }
        let (p, b, f) = (
            packed.to_str().unwrap(),
            back.to_str().unwrap(),
            fits.to_str().unwrap(),
        );
        fargs.extend(["-O", p, f]);
        // One-spectrum tiles make funpack take minutes: those run once.
        let repeat = if tiles { 1 } else { self.repeat };
        let (_, compress_s) = timed(repeat, || {
            let _ = std::fs::remove_file(&packed);
            run_tool("fpack", &fargs)
        })?;
        let (_, decompress_s) = timed(repeat, || {
            let _ = std::fs::remove_file(&back);
            run_tool("funpack", &["-O", b, p])
        })?;
        let fidelity = if file_size(fits)? < 1 << 30 {
            Some(fidelity_of(cube, &read_fits_cube(&back)?)?)
        } else {
            None
        };
        self.rows.push(Row {
            cube: name.into(),
            method: if tiles {
                format!("fpack -t {tile} -q 4 / funpack")
            } else {
                "fpack (default) / funpack".into()
            },
            raw: file_size(fits)?,
            packed: file_size(&packed)?,
            compress_s,
            decompress_s,
            fidelity,
            note: format!("{repeat} run(s)"),
        });
        Ok(())
    }

    /// fpack refuses some files (64-bit integer images, such as the MUSE mosaic's FIELDMAP):
    /// then it runs on a copy holding only the cube's planes, and the row says so.
    fn fpack_or_note(&mut self, name: &str, cube: &SpectralCube, fits: &Path, tiles: bool) {
        let Err(e) = self.fpack(name, cube, fits, tiles) else {
            return;
        };
        let reason = format!("{e:#}")
            .lines()
            .last()
            .unwrap_or_default()
            .to_string();
        eprintln!("{name}: fpack failed ({reason}); retrying on a copy with the cube planes only");
        let copy = self.args.work.join(format!("{name}.planes.fits"));
        let retry = write_fits_cube(cube, &copy)
            .map_err(anyhow::Error::from)
            .and_then(|()| self.fpack(name, cube, &copy, tiles));
        match retry {
            Ok(()) => {
                if let Some(row) = self.rows.last_mut() {
                    row.note = format!("on a copy without the HDUs fpack refuses ({reason})");
                }
            }
            Err(e) => eprintln!("{name}: fpack failed again: {e:#}"),
        }
    }

    fn zstd(&mut self, name: &str, fits: &Path) -> Result<()> {
        let raw = file_size(fits)?;
        let (packed, compress_s) = timed(self.repeat, || {
            let mut enc = zstd::stream::Encoder::new(Vec::new(), 3)?;
            std::io::copy(&mut BufReader::new(File::open(fits)?), &mut enc)?;
            Ok(enc.finish()?)
        })?;
        let (restored, decompress_s) = timed(self.repeat, || {
            let mut dec = zstd::stream::Decoder::new(packed.as_slice())?;
            Ok(std::io::copy(&mut dec, &mut std::io::sink())?)
        })?;
        if restored != raw {
            bail!("zstd restored {restored} of {raw} bytes");
        }
        self.rows.push(Row {
            cube: name.into(),
            method: "zstd -3 (FITS file)".into(),
            raw,
            packed: packed.len() as u64,
            compress_s,
            decompress_s,
            fidelity: Some(Fidelity::default()),
            note: "lossless, 1 thread".into(),
        });
        Ok(())
    }

    fn tile_fits(&mut self, name: &str, cube: &SpectralCube, raw: u64) -> Result<()> {
        let path = self.args.work.join(format!("{name}.tile.fits"));
        let (_, compress_s) = timed(self.repeat, || {
            write_tile_compressed(cube, &path, &TileOptions::default())?;
            Ok(())
        })?;
        let (back, decompress_s) = timed(self.repeat, || Ok(read_fits_cube(&path)?))?;
        self.rows.push(Row {
            cube: name.into(),
            method: "ours: tile-compressed FITS (RICE_1, q 4, 1-spectrum tiles)".into(),
            raw,
            packed: file_size(&path)?,
            compress_s,
            decompress_s,
            fidelity: Some(fidelity_of(cube, &back)?),
            note: "cfitsio; noise q 16".into(),
        });
        Ok(())
    }
}

/// Absorption and emission features (rest air wavelength, depth or amplitude relative to the
/// continuum) of the synthetic galaxy.
const ABSORPTION: [(f64, f64); 9] = [
    (4861.3, 0.25),
    (5175.4, 0.20),
    (5269.0, 0.12),
    (5335.0, 0.10),
    (5892.9, 0.15),
    (6562.8, 0.20),
    (8498.0, 0.25),
    (8542.1, 0.35),
    (8662.1, 0.30),
];
const EMISSION: [(f64, f64); 4] = [(4958.9, 0.3), (5006.8, 0.9), (6562.8, 1.2), (6583.4, 0.5)];
const SKY: [f64; 12] = [
    5577.3, 5889.9, 6300.3, 6363.8, 6863.9, 7316.3, 7340.9, 7750.6, 7794.1, 7913.7, 8344.6, 8827.1,
];

/// A MUSE-like cube: 0.2" spaxels, 1.25 A pixels from 4750 A, NaN outside a tilted square
/// field (DQ = 1 there), an exponential-disc galaxy rotating at up to 200 km/s with stellar
/// absorption and nebular emission, sky-dominated variance with sky-line residual noise, and a
/// sprinkling of cosmic-ray residuals flagged in DQ.
fn synthetic_muse(n: usize, nwave: usize) -> SpectralCube {
    let wave: Vec<f64> = (0..nwave).map(|k| 4750.0 + 1.25 * k as f64).collect();
    let sky: Vec<f64> = wave
        .iter()
        .map(|w| {
            2.0 + SKY
                .iter()
                .map(|l| 300.0 * (-0.5 * ((w - l) / 1.1).powi(2)).exp())
                .sum::<f64>()
        })
        .collect();
    let c = n as f64 / 2.0;
    let spectra: Vec<(Vec<f32>, Vec<f32>, Vec<u8>)> = (0..n * n)
        .into_par_iter()
        .map(|s| {
            let mut rng = ChaCha8Rng::seed_from_u64(s as u64);
            let (x, y) = ((s % n) as f64 - c, (s / n) as f64 - c);
            let tilt = 5f64.to_radians();
            let (u, v) = (
                x * tilt.cos() + y * tilt.sin(),
                -x * tilt.sin() + y * tilt.cos(),
            );
            if u.abs() > 0.47 * n as f64 || v.abs() > 0.47 * n as f64 {
                return (
                    vec![f32::NAN; nwave],
                    vec![f32::NAN; nwave],
                    vec![1u8; nwave],
                );
            }
            let r = (x * x + (y / 0.7).powi(2)).sqrt();
            let level = 40.0 * (-r / (0.12 * n as f64)).exp() + 0.3;
            let velocity = 200.0 * (r / 15.0).tanh() * (x / r.max(1e-9));
            let z = 1.0 + velocity / 299_792.458;
            let (mut flux, mut stat, mut dq) = (Vec::new(), Vec::new(), vec![0u8; nwave]);
            for k in 0..nwave {
                let rest = wave[k] / z;
                let mut spec = level * (rest / 6000.0).powf(-0.8);
                for (l, depth) in ABSORPTION {
                    spec *= 1.0 - depth * (-0.5 * ((rest - l) / 3.0).powi(2)).exp();
                }
                for (l, amp) in EMISSION {
                    spec += amp * level * (-0.5 * ((rest - l) / 1.5).powi(2)).exp();
                }
                let variance = sky[k] + 0.5 * spec.max(0.0) + 0.5;
                let noise: f64 = rng.sample(StandardNormal);
                let mut value = spec + variance.sqrt() * noise;
                if rng.gen_bool(2e-5) {
                    value += 500.0;
                    dq[k] = 2;
                }
                flux.push(value as f32);
                stat.push(variance as f32);
            }
            (flux, stat, dq)
        })
        .collect();
    let mut flux = Vec::with_capacity(n * n * nwave);
    let mut stat = Vec::with_capacity(n * n * nwave);
    let mut dq = Vec::with_capacity(n * n * nwave);
    for (f, v, d) in spectra {
        flux.extend(f);
        stat.extend(v);
        dq.extend(d);
    }
    // FITS cards, as cfitsio would read them from a MUSE file.
    let card = |key: &str, value: String| format!("{key:<8}= {value:>20}");
    let wcs: Vec<String> = vec![
        card("CTYPE3", "'AWAV    '".into()),
        card("CUNIT3", "'Angstrom'".into()),
        card("CRVAL3", "4750.".into()),
        card("CRPIX3", "1.".into()),
        card("CD3_3", "1.25".into()),
        card("CD1_1", format!("{:E}", -0.2 / 3600.0)),
        card("CD2_2", format!("{:E}", 0.2 / 3600.0)),
    ];
    let mut headers = vec![HduHeader {
        hdu: "PRIMARY".into(),
        cards: vec![card("INSTRUME", "'MUSE    '".into())],
    }];
    for hdu in ["DATA", "STAT"] {
        headers.push(HduHeader {
            hdu: hdu.into(),
            cards: wcs.clone(),
        });
    }
    SpectralCube {
        nx: n,
        ny: n,
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
                name: "DQ".into(),
                role: Role::Mask,
                samples: Samples::U8(dq),
            },
        ],
        aux: vec![AuxVector {
            name: "WAVELENGTH".into(),
            values: wave,
        }],
        headers,
    }
}

fn shared_cubes() -> PathBuf {
    std::env::var_os("CECCM_SHARED_DATA")
        .map_or_else(
            || Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data"),
            PathBuf::from,
        )
        .join("cubes")
}

/// The input as a plain FITS file (gunzipped into the work directory when needed).
fn plain_fits(path: &Path, work: &Path) -> Result<PathBuf> {
    let name = path.file_name().unwrap().to_string_lossy().to_string();
    let Some(stem) = name.strip_suffix(".gz") else {
        return Ok(path.to_path_buf());
    };
    let out = work.join(stem);
    let mut dec = flate2::read::GzDecoder::new(BufReader::new(File::open(path)?));
    let mut bytes = Vec::new();
    dec.read_to_end(&mut bytes)?;
    std::fs::write(&out, bytes)?;
    Ok(out)
}

fn mb(bytes: u64, seconds: f64) -> String {
    if seconds > 0.0 {
        format!("{:.0}", bytes as f64 / 1e6 / seconds)
    } else {
        "-".into()
    }
}

fn print_table(rows: &[Row]) {
    println!(
        "| cube | method | raw MB | ratio | compress MB/s | decompress MB/s | decompress s | err/sigma median | p99 | max | RMS | >1 sigma | noise rel. max | note |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for r in rows {
        let fid = match r.fidelity {
            Some(f) => format!(
                "{:.4} | {:.4} | {:.4} | {:.4} | {:.2}% | {:.4}",
                f.median,
                f.p99,
                f.max,
                f.rms,
                100.0 * f.over_one_sigma,
                f.noise_rel_max
            ),
            None => "- | - | - | - | - | -".into(),
        };
        println!(
            "| {} | {} | {:.1} | {:.2} | {} | {} | {:.3} | {} | {} |",
            r.cube,
            r.method,
            r.raw as f64 / 1e6,
            r.raw as f64 / r.packed as f64,
            mb(r.raw, r.compress_s),
            mb(r.raw, r.decompress_s),
            r.decompress_s,
            fid,
            r.note
        );
    }
}

fn run(args: &Args) -> Result<()> {
    std::fs::create_dir_all(&args.work)?;
    let dir = args.cubes.clone().unwrap_or_else(shared_cubes);
    let mut inputs: Vec<PathBuf> = std::fs::read_dir(&dir)
        .with_context(|| dir.display().to_string())?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let n = p.to_string_lossy();
            n.ends_with(".fits") || n.ends_with(".fits.gz")
        })
        .collect();
    inputs.sort();
    let mut bench = Bench {
        args,
        repeat: args.repeat,
        rows: Vec::new(),
    };
    eprintln!("rayon threads: {}", rayon::current_num_threads());
    for input in &inputs {
        let name = input
            .file_name()
            .unwrap()
            .to_string_lossy()
            .trim_end_matches(".gz")
            .trim_end_matches(".fits")
            .to_string();
        eprintln!("== {name}");
        let fits = plain_fits(input, &args.work)?;
        let raw = file_size(&fits)?;
        let cube = read_fits_cube(&fits)?;
        bench.ours(&name, &cube, raw, true)?;
        bench.ours_file_to_file(&name, &fits, raw)?;
        bench.filters(&name, &cube, raw)?;
        bench.tile_fits(&name, &cube, raw)?;
        bench.zstd(&name, &fits)?;
        bench.fpack_or_note(&name, &cube, &fits, false);
        if raw <= args.fpack_tiles_max_mb << 20 {
            bench.fpack_or_note(&name, &cube, &fits, true);
        }
    }
    if args.synthetic_spaxels > 0 {
        let (n, nwave) = (args.synthetic_spaxels, args.synthetic_nwave);
        let name = format!("synthetic-muse-{n}x{n}x{nwave}");
        eprintln!("== {name}: generating");
        let cube = synthetic_muse(n, nwave);
        let fits = args.work.join(format!("{name}.fits"));
        write_fits_cube(&cube, &fits)?;
        let raw = file_size(&fits)?;
        // Gigabytes: one timed run each.
        bench.repeat = 1;
        bench.ours(&name, &cube, raw, true)?;
        bench.zstd(&name, &fits)?;
        bench.fpack_or_note(&name, &cube, &fits, false);
        if raw <= args.fpack_tiles_max_mb << 20 {
            bench.fpack_or_note(&name, &cube, &fits, true);
        }
        drop(cube);
        std::fs::remove_file(&fits)?;
    }
    println!();
    print_table(&bench.rows);
    Ok(())
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench-edge: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

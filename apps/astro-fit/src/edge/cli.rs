//! `astro-fit edge ...`: the command-line face of the edge filter and compressor.

use std::fs::File;
use std::io::{BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Args, Subcommand};
use serde_json::json;

use super::codec::{Filter, FilterChoice};
use super::container::{self, CompressOptions, ContainerReader, Mode, StreamDecoder};
use super::filter::{FilterOptions, SKY_LINES_AIR, air_to_vacuum, filter_cube};
use super::io::{read_fits_cube, write_fits_cube};
use super::tilefits::{TileOptions, write_tile_compressed};
use super::{EdgeError, Samples};
use crate::cube::{Cube, WavelengthMedium};
use crate::output::{file_with_size, parse_out_file};

#[derive(Debug, Subcommand)]
pub enum EdgeCommand {
    /// Drop or flag what carries no science (low S/N, empty spaxels, cosmic rays, sky
    /// residuals); write the filtered cube and a JSON report of every decision.
    Filter(FilterArgs),
    /// Compress a cube (FITS) into a TARSIS container, or into tile-compressed FITS.
    Compress(CompressArgs),
    /// Decompress a TARSIS container to FITS, or print one spaxel.
    Decompress(DecompressArgs),
    /// Show a container's header and index, verifying every checksum.
    Inspect(InspectArgs),
}

#[derive(Debug, Args)]
pub struct FilterArgs {
    /// Input cube (MaNGA LOGCUBE, MUSE, MEGARA; .fits or .fits.gz).
    pub input: PathBuf,
    /// Filtered cube (FITS).
    #[arg(long, alias = "output", short_alias = 'o', value_parser = parse_out_file)]
    pub out: PathBuf,
    /// JSON report of what was dropped or flagged, and why.
    #[arg(long)]
    pub report: PathBuf,
    /// Spaxels whose median S/N is below this are dropped.
    #[arg(long, default_value_t = FilterOptions::default().min_snr)]
    pub min_snr: f64,
    /// A pixel this many robust sigmas above both its spectral and spatial neighbours is a
    /// cosmic-ray hit.
    #[arg(long, default_value_t = FilterOptions::default().cosmic_sigma)]
    pub cosmic_sigma: f64,
    /// Comma-separated sky-line wavelengths (Angstrom, same medium as the cube) to check for
    /// residuals; default: the strong night-sky lines, converted to vacuum for vacuum cubes.
    #[arg(long, value_delimiter = ',')]
    pub sky_lines: Option<Vec<f64>>,
    /// Only flag (in the mask and the report); change no pixel and drop no spaxel.
    #[arg(long)]
    pub keep_all: bool,
}

#[derive(Debug, Args)]
pub struct CompressArgs {
    /// Input cube (FITS).
    pub input: PathBuf,
    /// Output: a TARSIS container, or tile-compressed FITS with --fits.
    #[arg(long, alias = "output", short_alias = 'o', value_parser = parse_out_file)]
    pub out: PathBuf,
    /// Lossless: every bit of every plane is kept.
    #[arg(long, conflicts_with_all = ["max_error_sigma", "noise_rel_error"])]
    pub lossless: bool,
    /// Largest flux error, in units of each pixel's own noise sigma [default: 0.05].
    #[arg(long)]
    pub max_error_sigma: Option<f64>,
    /// Largest relative error of IVAR / variance.
    #[arg(long)]
    pub noise_rel_error: Option<f64>,
    /// Spaxels per block (the unit of random access and of checksums).
    #[arg(long, default_value_t = CompressOptions::default().spectra_per_block)]
    pub spectra_per_block: usize,
    /// zstd level.
    #[arg(long, default_value_t = CompressOptions::default().zstd_level)]
    pub level: i32,
    /// Byte filter before zstd for lossless sections (default: xor-shuffle).
    #[arg(long, value_enum, conflicts_with = "best_filter")]
    pub filter: Option<Filter>,
    /// Try every filter on every section and keep the smallest (slower compression).
    #[arg(long)]
    pub best_filter: bool,
    /// Seed of the quantisation dither.
    #[arg(long, default_value_t = CompressOptions::default().seed)]
    pub seed: u64,
    /// Write standard tile-compressed FITS (RICE_1, one spectrum per tile) instead.
    #[arg(long)]
    pub fits: bool,
    /// With --fits: cfitsio quantisation level q for flux (step = tile noise / q).
    #[arg(long, default_value_t = TileOptions::default().flux_q, requires = "fits")]
    pub fits_q: f32,
    /// With --fits: q for IVAR/variance.
    #[arg(long, default_value_t = TileOptions::default().noise_q, requires = "fits")]
    pub fits_noise_q: f32,
}

#[derive(Debug, Args)]
pub struct DecompressArgs {
    /// TARSIS container (`-` reads standard input, streaming).
    pub input: PathBuf,
    /// Output FITS cube.
    #[arg(long, alias = "output", short_alias = 'o', value_parser = parse_out_file,
          required_unless_present = "spaxel")]
    pub out: Option<PathBuf>,
    /// Print only spaxel X,Y as JSON (reads one block).
    #[arg(long, value_name = "X,Y", value_parser = parse_xy)]
    pub spaxel: Option<(usize, usize)>,
}

fn parse_xy(text: &str) -> Result<(usize, usize), String> {
    let (x, y) = text
        .split_once(',')
        .ok_or_else(|| format!("expected X,Y, got {text:?}"))?;
    let parse = |v: &str| v.trim().parse::<usize>().map_err(|e| format!("{v:?}: {e}"));
    Ok((parse(x)?, parse(y)?))
}

#[derive(Debug, Args)]
pub struct InspectArgs {
    pub input: PathBuf,
}

fn open(path: &Path) -> Result<BufReader<File>, EdgeError> {
    File::open(path)
        .map(BufReader::new)
        .map_err(|e| EdgeError::Io {
            path: path.to_path_buf(),
            source: e,
        })
}

impl EdgeCommand {
    pub fn run(self) -> anyhow::Result<()> {
        match self {
            EdgeCommand::Filter(a) => run_filter(a),
            EdgeCommand::Compress(a) => run_compress(a),
            EdgeCommand::Decompress(a) => run_decompress(a),
            EdgeCommand::Inspect(a) => run_inspect(a),
        }
    }
}

fn run_filter(a: FilterArgs) -> anyhow::Result<()> {
    let mut cube = read_fits_cube(&a.input)?;
    let mut opts = FilterOptions {
        min_snr: a.min_snr,
        cosmic_sigma: a.cosmic_sigma,
        keep_all: a.keep_all,
        ..FilterOptions::default()
    };
    match a.sky_lines {
        Some(lines) => opts.sky_lines = lines,
        None if Cube::open(&a.input)?.meta().medium == WavelengthMedium::Vacuum => {
            opts.sky_lines = SKY_LINES_AIR.iter().map(|&l| air_to_vacuum(l)).collect();
        }
        None => {}
    }
    let report = filter_cube(&mut cube, &opts)?;
    write_fits_cube(&cube, &a.out)?;
    let text = serde_json::to_string_pretty(&report)?;
    std::fs::write(&a.report, text).with_context(|| format!("writing {}", a.report.display()))?;
    eprintln!(
        "{}: {} spaxels dropped, {} flagged; {} cosmic-ray pixels, {} sky-residual pixels",
        a.input.display(),
        report.dropped_spaxels(),
        report.flagged_spaxels(),
        report.cosmic_ray_pixels,
        report.sky_residual_pixels
    );
    eprintln!("wrote {}", file_with_size(&a.out));
    eprintln!("wrote {}", file_with_size(&a.report));
    Ok(())
}

fn run_compress(a: CompressArgs) -> anyhow::Result<()> {
    let cube = read_fits_cube(&a.input)?;
    if a.fits {
        let opts = TileOptions {
            flux_q: a.fits_q,
            noise_q: a.fits_noise_q,
        };
        write_tile_compressed(&cube, &a.out, &opts)?;
        let size = std::fs::metadata(&a.out)?.len();
        eprintln!(
            "{} -> {}: {} bytes (ratio {:.2} on the pixel data)",
            a.input.display(),
            a.out.display(),
            size,
            cube.raw_bytes() as f64 / size as f64
        );
        return Ok(());
    }
    let defaults = CompressOptions::default();
    let mode = if a.lossless {
        Mode::Lossless
    } else {
        let Mode::Lossy {
            max_error_sigma,
            noise_rel_error,
        } = defaults.mode
        else {
            unreachable!("the default mode is lossy")
        };
        Mode::Lossy {
            max_error_sigma: a.max_error_sigma.unwrap_or(max_error_sigma),
            noise_rel_error: a.noise_rel_error.unwrap_or(noise_rel_error),
        }
    };
    let opts = CompressOptions {
        mode,
        spectra_per_block: a.spectra_per_block,
        zstd_level: a.level,
        filter: match (a.best_filter, a.filter) {
            (true, _) => FilterChoice::Best,
            (false, Some(f)) => FilterChoice::Fixed(f),
            (false, None) => defaults.filter,
        },
        seed: a.seed,
    };
    let file = File::create(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let mut out = BufWriter::new(file);
    let summary = container::compress(&cube, &opts, &mut out)?;
    out.flush()?;
    eprintln!(
        "{} -> {}: {} -> {} bytes (ratio {:.2}), {} blocks, {} flux pixels kept verbatim",
        a.input.display(),
        a.out.display(),
        summary.raw_bytes,
        summary.compressed_bytes,
        summary.raw_bytes as f64 / summary.compressed_bytes as f64,
        summary.blocks,
        summary.exception_pixels
    );
    Ok(())
}

fn samples_json(samples: &Samples) -> serde_json::Value {
    match samples {
        Samples::U8(v) => json!(v),
        Samples::I16(v) => json!(v),
        Samples::I32(v) => json!(v),
        Samples::I64(v) => json!(v),
        // JSON has no NaN: non-finite values become null.
        Samples::F32(v) => json!(v),
        Samples::F64(v) => json!(v),
    }
}

/// Prints to stdout, returning an error (not panicking) when the reader has gone away.
fn print_stdout(text: &str) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{text}")?;
    out.flush()?;
    Ok(())
}

fn run_decompress(a: DecompressArgs) -> anyhow::Result<()> {
    if let Some((x, y)) = a.spaxel {
        let mut reader = ContainerReader::new(open(&a.input)?)?;
        let planes = reader.read_spaxel(x, y)?;
        let map: serde_json::Map<String, serde_json::Value> = planes
            .iter()
            .map(|(name, s)| (name.clone(), samples_json(s)))
            .collect();
        return print_stdout(&json!({"x": x, "y": y, "planes": map}).to_string());
    }
    let output = a.out.expect("clap requires --out without --spaxel");
    let cube = if a.input.as_os_str() == "-" {
        StreamDecoder::new(std::io::stdin().lock())?.into_cube()?
    } else {
        StreamDecoder::new(open(&a.input)?)?.into_cube()?
    };
    write_fits_cube(&cube, &output)?;
    eprintln!(
        "{} -> {}: {} x {} x {} cube, {} planes",
        if a.input.as_os_str() == "-" {
            "standard input".to_string()
        } else {
            a.input.display().to_string()
        },
        file_with_size(&output),
        cube.nx,
        cube.ny,
        cube.nwave,
        cube.planes.len()
    );
    Ok(())
}

fn run_inspect(a: InspectArgs) -> anyhow::Result<()> {
    let mut reader = ContainerReader::new(open(&a.input)?)?;
    let mut blocks_ok = 0;
    for b in 0..reader.index.len() {
        reader.read_block(b)?;
        blocks_ok += 1;
    }
    let size = std::fs::metadata(&a.input)?.len();
    let raw: usize = reader
        .header
        .planes
        .iter()
        .map(|p| p.dtype.width() * reader.header.nspec() * reader.header.nwave)
        .sum::<usize>()
        + reader.aux.iter().map(|v| v.values.len() * 8).sum::<usize>();
    let report = json!({
        "file": a.input,
        "bytes": size,
        "ratio": raw as f64 / size as f64,
        "header": reader.header,
        "blocks": reader.index.len(),
        "blocks_verified": blocks_ok,
    });
    print_stdout(&serde_json::to_string_pretty(&report)?)
}

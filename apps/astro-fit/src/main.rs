//! `astro-fit`: a thin command-line dispatcher over the library.

use std::process::ExitCode;

use astro_fit::cube_cmd::{
    self, AssembleArgs, CompareArgs, FitChunkArgs, FitCubeArgs, PrepareArgs, SynthArgs,
};
use astro_fit::fit_spectrum_cmd::{self, FitSpectrumArgs};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "astro-fit",
    version,
    about = "Full-spectrum fitting of galaxy spectra and IFS datacubes, and the TARSIS edge filter/compressor"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Fit one spectrum (SDSS, 1-D linear FITS, MaNGA rows or LOGCUBE spaxels).
    FitSpectrum(FitSpectrumArgs),
    /// Fit every spaxel or Voronoi bin of a cube (MaNGA LOGCUBE, MUSE, MEGARA) and write maps.
    FitCube(FitCubeArgs),
    /// fit-cube's first stage: read the cube once (S/N, binning, chunks, global fit) and
    /// write OUT/plan.json.
    Prepare(PrepareArgs),
    /// fit-cube's second stage for one chunk of a plan: write its chunks/chunk-N files.
    FitChunk(FitChunkArgs),
    /// fit-cube's last stage: maps, model cube and PNG from a plan and its chunk files.
    Assemble(AssembleArgs),
    /// Make a deterministic synthetic MaNGA-format LOGCUBE and its truth table.
    Synth(SynthArgs),
    /// Compare a MAPS file with a synthetic cube's truth table.
    CompareTruth(CompareArgs),
    /// TARSIS edge: filter and compress IFS data before it leaves the telescope.
    #[command(subcommand)]
    Edge(astro_fit::edge::cli::EdgeCommand),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::FitSpectrum(args) => fit_spectrum_cmd::run(&args),
        Command::FitCube(args) => cube_cmd::run_fit_cube(&args),
        Command::Prepare(args) => cube_cmd::run_prepare(&args),
        Command::FitChunk(args) => cube_cmd::run_fit_chunk(&args),
        Command::Assemble(args) => cube_cmd::run_assemble(&args),
        Command::Synth(args) => cube_cmd::run_synth(&args),
        Command::CompareTruth(args) => cube_cmd::run_compare_truth(&args),
        Command::Edge(command) => command.run(),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("astro-fit: {e:#}");
            ExitCode::FAILURE
        }
    }
}

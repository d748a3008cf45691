//! `astro-fit`: a thin dispatcher over the library's command groups.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "astro-fit",
    version,
    about = "IFS datacube fitting and the TARSIS edge filter/compressor"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// TARSIS edge: filter and compress IFS data before it leaves the telescope.
    #[command(subcommand)]
    Edge(astro_fit::edge::cli::EdgeCommand),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Edge(command) => command.run(),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("astro-fit: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

//! The `barge` binary: parse arguments, set up logging, run the command, map failures
//! to one line and an exit code.

mod cli;
mod commands;
mod demo;

use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    commands::init_logging(&cli.command);
    match commands::run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("barge: {e:#}");
            ExitCode::from(commands::exit_code(&e))
        }
    }
}

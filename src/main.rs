//! The `barge` binary: parse arguments, set up logging, run the command, map failures
//! to one line and an exit code.

mod cli;

use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = cli::Cli::parse_from(args());
    cli::commands::init_logging(&cli.command);
    match cli::commands::run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("barge: {e:#}");
            ExitCode::from(cli::commands::exit_code(&e))
        }
    }
}

/// The arguments; invoked through a link named `barge-zdb-hook` (what 0-db's `--hook`
/// can point at), `barge zdb-hook` is meant.
fn args() -> Vec<std::ffi::OsString> {
    let mut args: Vec<_> = std::env::args_os().collect();
    let called = args.first().map(std::path::Path::new).and_then(|p| p.file_name());
    if called.is_some_and(|n| n == "barge-zdb-hook") {
        args.insert(1, "zdb-hook".into());
    }
    args
}

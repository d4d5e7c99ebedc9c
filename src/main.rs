//! The `kms-plugin` binary: parses the command line and hands over to [`kms_plugin::cli`].

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = kms_plugin::cli::Cli::parse();
    kms_plugin::cli::run(cli)
}

//! The `kms-plugin` binary: parses the command line and hands over to [`kms_plugin::cmd`].

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = kms_plugin::cmd::Cli::parse();
    kms_plugin::cmd::run(cli)
}

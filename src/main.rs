//! The `kms-plugin` binary: parses the command line and hands over to [`kms_plugin::cmd`].

use std::process::ExitCode;

use clap::Parser;

/// Freed heap memory never keeps a DEK seed or key (see the README's security section).
#[global_allocator]
static ALLOC: kms_plugin::zeroizing_alloc::ZeroizingAlloc =
    kms_plugin::zeroizing_alloc::ZeroizingAlloc;

fn main() -> ExitCode {
    let cli = kms_plugin::cmd::Cli::parse();
    kms_plugin::cmd::run(cli)
}

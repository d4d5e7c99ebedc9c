//! Shell completions and man pages, generated from the clap definitions so they never drift
//! from the command line. Packagers run them at build time (docs/OPERATIONS.md).

use std::path::Path;
use std::process::ExitCode;

use clap::CommandFactory;

use super::{Cli, fail};

/// `kms-plugin completions SHELL`: the completion script on stdout.
pub fn completions(shell: clap_complete::Shell) -> ExitCode {
    let mut command = Cli::command();
    let mut out = Vec::new();
    clap_complete::generate(shell, &mut command, "kms-plugin", &mut out);
    write_stdout(&out)
}

/// `kms-plugin man [--dir DIR]`: kms-plugin(1) on stdout, or every page into `dir`.
pub fn man(dir: Option<&Path>) -> ExitCode {
    let command = Cli::command();
    let Some(dir) = dir else {
        let mut out = Vec::new();
        return match clap_mangen::Man::new(command).render(&mut out) {
            Ok(()) => write_stdout(&out),
            Err(e) => fail(&format!("cannot render the man page: {e}")),
        };
    };
    match clap_mangen::generate_to(command, dir) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&format!(
            "cannot write man pages into {}: {e}",
            dir.display()
        )),
    }
}

fn write_stdout(bytes: &[u8]) -> ExitCode {
    use std::io::Write;
    match std::io::stdout().lock().write_all(bytes) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(e) => fail(&format!("cannot write to stdout: {e}")),
    }
}

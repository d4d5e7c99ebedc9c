//! Command line: `serve`, `status`, `check`, `keygen`, `rotate`, `reload`. This module
//! holds the clap definitions and the output helpers; each subcommand is one module with
//! one `run` function, which `main.rs` reaches through [`run`].

pub mod check;
pub mod docs;
pub mod keygen;
pub mod reload;
pub mod rotate;
pub mod serve;
pub mod status;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};

use crate::client;
use crate::config;

/// `println!` for command output, through [`write_out`].
macro_rules! say {
    ($($arg:tt)*) => {
        write_out(format_args!($($arg)*))
    };
}
pub(crate) use say;

/// Kubernetes KMS v2 plugin: envelope encryption of kube-apiserver's DEKs.
#[derive(Debug, Parser)]
#[command(name = "kms-plugin", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

/// Output of `status` and `check`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Lines for a person.
    Text,
    /// One JSON object, for scripts and monitoring.
    Json,
}

/// Log output format.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the plugin. Without --config it runs on the embedded default: a file root key
    /// in the state directory, created on first start.
    Serve {
        /// TOML configuration file.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Socket path or @name (overrides the config file).
        #[arg(long)]
        socket: Option<String>,
        /// Directory of the embedded default's root key (default /var/lib/kms-plugin). Only
        /// without --config: a config file names each key's path itself.
        #[arg(long, conflicts_with = "config")]
        state_dir: Option<PathBuf>,
        /// Threads that serve calls. One serves tens of thousands of calls a second; more
        /// add a cross-thread wake-up to each call. Root key calls that block (PKCS#11, key
        /// files) run on a separate pool either way.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=1024))]
        worker_threads: u16,
    },
    /// Ask a running plugin for its status; exits 0 only if it is healthy.
    Status {
        /// Socket path or @name of the running plugin.
        #[arg(long, default_value = config::DEFAULT_SOCKET)]
        socket: String,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Make another configured root key the active one: checks it works, rewrites the config
    /// file (old active becomes retired), reloads the running plugin and waits for it.
    Rotate {
        /// TOML configuration file of the running plugin.
        #[arg(long)]
        config: PathBuf,
        /// The NAME of the [keys.NAME] entry to make active.
        #[arg(long)]
        to: String,
        /// Socket of the running plugin (default: the config file's).
        #[arg(long)]
        socket: Option<String>,
    },
    /// Ask a running plugin to reload its config file.
    Reload {
        /// Socket path or @name of the running plugin.
        #[arg(long, default_value = config::DEFAULT_SOCKET)]
        socket: String,
        /// Allow dropping root keys that may still protect data.
        #[arg(long)]
        force: bool,
    },
    /// Validate a config file and prove every root key it names with a checked wrap + unwrap
    /// round trip, without serving: run it before a reload or an upgrade. Exits 0 only if
    /// all work.
    Check {
        /// TOML configuration file.
        #[arg(long)]
        config: PathBuf,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Create the root key a [keys.NAME] entry describes, if it does not exist yet.
    Keygen {
        /// TOML configuration file.
        #[arg(long)]
        config: PathBuf,
        /// The NAME of the [keys.NAME] entry.
        #[arg(long)]
        key: String,
    },
    /// Print a shell completion script (for packagers: see docs/OPERATIONS.md).
    #[command(hide = true)]
    Completions {
        /// The shell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the man page kms-plugin(1), or write it and one page per subcommand into a
    /// directory (for packagers: see docs/OPERATIONS.md).
    #[command(hide = true)]
    Man {
        /// Directory for kms-plugin.1 and kms-plugin-SUBCOMMAND.1.
        #[arg(long)]
        dir: Option<PathBuf>,
    },
}

/// Runs a parsed command line.
pub fn run(cli: Cli) -> ExitCode {
    // Generated from these definitions; no runtime, no log.
    match &cli.command {
        Command::Completions { shell } => return docs::completions(*shell),
        Command::Man { dir } => return docs::man(dir.as_deref()),
        _ => {}
    }
    // Held to the end of `run`: dropping it flushes what is still queued.
    let _log = init_logging(cli.log_format);
    if matches!(cli.command, Command::Serve { .. })
        && let Err(e) = crate::process::harden()
    {
        return fail_serve(&format!(
            "cannot disable core dumps (PR_SET_DUMPABLE, RLIMIT_CORE): {e}"
        ));
    }
    let workers = match cli.command {
        Command::Serve { worker_threads, .. } => usize::from(worker_threads),
        // The client commands make a handful of calls.
        _ => 1,
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tell(format_args!(
                "kms-plugin: cannot start the async runtime: {e}"
            ));
            return ExitCode::from(2);
        }
    };
    let code = runtime.block_on(async {
        match cli.command {
            Command::Serve {
                config,
                socket,
                state_dir,
                worker_threads: _,
            } => {
                serve::run(&serve::ServeArgs {
                    config,
                    socket,
                    state_dir,
                })
                .await
            }
            Command::Status { socket, output } => status::run(&socket, output).await,
            Command::Keygen { config, key } => keygen::run(&config, &key).await,
            Command::Check { config, output } => check::run(&config, output).await,
            Command::Rotate { config, to, socket } => rotate::run(&config, &to, socket).await,
            Command::Reload { socket, force } => reload::run(&socket, force).await,
            Command::Completions { .. } | Command::Man { .. } => ExitCode::SUCCESS,
        }
    });
    // Dropping the runtime would wait for every blocking task, and a root call stuck in a
    // hung HSM (at start-up or later) never returns: exit without it.
    runtime.shutdown_timeout(Duration::from_millis(500));
    code
}

/// An answer the plugin's Admin service gives (a refused reload, a uid outside admin_uids),
/// rather than a connection that failed before any answer.
pub(crate) fn refused_by_plugin(status: &tonic::Status) -> bool {
    matches!(
        status.code(),
        tonic::Code::FailedPrecondition | tonic::Code::PermissionDenied
    )
}

/// A command that got no answer from the plugin says why, as far as one more connection can
/// tell: nothing listens there, or a plugin closed the connection unread (its allow-list).
pub(crate) async fn unreachable_plugin(socket: &str, why: &str) -> ExitCode {
    match client::diagnose(socket).await {
        client::NoAnswer::NotListening(e) => tell(format_args!(
            "kms-plugin: no plugin answers on {socket}: nothing listens there ({e}); is the \
             plugin running, and is this its socket?"
        )),
        client::NoAnswer::ClosedBeforeAnswering => {
            // SO_PEERCRED reports the effective uid.
            let uid = crate::secure_path::euid();
            tell(format_args!(
                "kms-plugin: a plugin listens on {socket} but closed the connection before \
                 answering: this uid ({uid}) is probably not in its allowed_uids (or it has \
                 max_connections open); run this command as an allowed user (sudo -u \
                 kms-plugin ...) or add {uid} to allowed_uids"
            ));
        }
        client::NoAnswer::Other => tell(format_args!(
            "kms-plugin: the call to the plugin on {socket} failed: {why}"
        )),
    }
    ExitCode::from(2)
}

/// A failed command other than `serve`: one line on stderr, for a person.
pub(crate) fn fail(message: &str) -> ExitCode {
    tell(format_args!("kms-plugin: {message}"));
    ExitCode::from(1)
}

/// A failed `serve`: one log line (text or JSON, as configured), for journald and log
/// collectors. Not also on stderr: the log is stderr, and the message would appear twice.
pub(crate) fn fail_serve(message: &str) -> ExitCode {
    tracing::error!("{message}");
    ExitCode::from(1)
}

/// Writes one line to stderr; a closed stderr is not worth a panic.
fn tell(line: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}

/// Writes one line to stdout. A closed stdout (`kms-plugin status | head -1`) ends the output
/// quietly: the command finishes and exits as it would have, where `println!` panics.
pub(crate) fn write_out(line: std::fmt::Arguments<'_>) {
    use std::io::Write;
    if let Err(e) = writeln!(std::io::stdout().lock(), "{line}")
        && e.kind() != std::io::ErrorKind::BrokenPipe
    {
        tell(format_args!("kms-plugin: cannot write to stdout: {e}"));
    }
}

/// Sets up the log on stderr, written by a worker thread ([`crate::log_writer`]): a slow or
/// stuck reader (journald, a full pipe) never delays a call. Lines beyond its buffer are
/// dropped and counted ([`crate::metrics::log_lines_dropped`]). The returned guard writes
/// out the log when dropped.
fn init_logging(format: LogFormat) -> Option<crate::log_writer::Guard> {
    // Colour only on a terminal: journald and log collectors get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    match crate::log_writer::LogWriter::spawn(std::io::stderr()) {
        Ok((writer, guard)) => {
            crate::metrics::count_dropped_log_lines(writer.dropped());
            let audit = writer.clone();
            // Encrypt's and Decrypt's info line, byte for byte what the subscriber would
            // write; not with colours, which only the subscriber adds.
            if let Some(static_filter) = install_subscriber(format, ansi, writer)
                && !ansi
            {
                crate::audit_line::install(audit, matches!(format, LogFormat::Json), static_filter);
            }
            Some(guard)
        }
        Err(e) => {
            tell(format_args!(
                "kms-plugin: cannot start the log writer thread ({e}); logging straight to stderr"
            ));
            install_subscriber(format, ansi, std::io::stderr);
            None
        }
    }
}

/// The global tracing subscriber, level from `KMS_PLUGIN_LOG` (default info). Returns
/// whether its filter is static (no span or field directive, so target and level alone
/// decide), or `None` when a subscriber was already installed.
fn install_subscriber<W>(format: LogFormat, ansi: bool, writer: W) -> Option<bool>
where
    W: for<'a> tracing_subscriber::fmt::MakeWriter<'a> + Send + Sync + 'static,
{
    let (filter, text) = std::env::var("KMS_PLUGIN_LOG")
        .ok()
        .and_then(|text| Some((tracing_subscriber::EnvFilter::try_new(&text).ok()?, text)))
        .unwrap_or_else(|| (tracing_subscriber::EnvFilter::new("info"), "info".into()));
    // Span and field directives are the ones in brackets (`target[span{field}]=level`).
    let static_filter = !text.contains('[');
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(writer);
    let installed = match format {
        LogFormat::Text => builder.try_init().is_ok(),
        LogFormat::Json => builder.json().try_init().is_ok(),
    };
    installed.then_some(static_filter)
}

//! Command line: `serve`, `status`, `keygen`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use tokio::signal::unix::{Signal, SignalKind, signal};

use crate::config::{self, Config, Source};
use crate::keyring::roots::{Root, UnwrapRate};
use crate::plugin::Plugin;
use crate::proto::admin::InfoRequest;
use crate::proto::v2::StatusRequest;
use crate::server::{self, socket::Endpoint};
use crate::{client, root};

/// `println!` for command output, through [`write_out`].
macro_rules! say {
    ($($arg:tt)*) => {
        write_out(format_args!($($arg)*))
    };
}

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
    },
    /// Ask a running plugin for its status; exits 0 only if it is healthy.
    Status {
        /// Socket path or @name of the running plugin.
        #[arg(long, default_value = config::DEFAULT_SOCKET)]
        socket: String,
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
}

/// Runs a parsed command line.
pub fn run(cli: Cli) -> ExitCode {
    // Held to the end of `run`: dropping it flushes what is still queued.
    let _log = init_logging(cli.log_format);
    if matches!(cli.command, Command::Serve { .. })
        && let Err(e) = crate::process::harden()
    {
        return fail_serve(&format!(
            "cannot disable core dumps (PR_SET_DUMPABLE, RLIMIT_CORE): {e}"
        ));
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
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
            } => serve(config.as_deref(), socket, state_dir).await,
            Command::Status { socket } => status(&socket).await,
            Command::Keygen { config, key } => keygen(&config, &key).await,
            Command::Check { config } => check(&config).await,
            Command::Rotate { config, to, socket } => rotate(&config, &to, socket).await,
            Command::Reload { socket, force } => reload(&socket, force).await,
        }
    });
    // Dropping the runtime would wait for every blocking task, and a root call stuck in a
    // hung HSM (at start-up or later) never returns: exit without it.
    runtime.shutdown_timeout(Duration::from_millis(500));
    code
}

async fn serve(
    config_path: Option<&Path>,
    socket: Option<String>,
    state_dir: Option<PathBuf>,
) -> ExitCode {
    // First, before anything slow (roots, PKCS#11 login, the first KMS call): SIGTERM or
    // SIGINT during start-up stops cleanly, and an early SIGHUP does not kill.
    let (term, int, mut hup) = match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    ) {
        (Ok(term), Ok(int), Ok(hup)) => (term, int, hup),
        (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => {
            return fail_serve(&format!("cannot install signal handlers: {e}"));
        }
    };
    let mut shutdown = Box::pin(shutdown_signal(term, int));
    let started = tokio::select! {
        started = start_up(config_path, socket, state_dir) => started,
        () = &mut shutdown => {
            tracing::info!("stopped during start-up");
            return ExitCode::SUCCESS;
        }
    };
    let (plugin, config, endpoint, access) = match started {
        Ok(started) => started,
        Err(code) => return code,
    };
    tokio::spawn({
        let plugin = plugin.clone();
        async move {
            while hup.recv().await.is_some() {
                tracing::info!("SIGHUP received; reloading the configuration");
                let _ = plugin.reload(false).await;
            }
        }
    });
    match server::serve(plugin, &endpoint, config.socket_mode, access, shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail_serve(&e.to_string()),
    }
}

/// Everything before serving: config, state directory, roots, metrics listener.
async fn start_up(
    config_path: Option<&Path>,
    socket: Option<String>,
    state_dir: Option<PathBuf>,
) -> Result<(std::sync::Arc<Plugin>, Config, Endpoint, server::Access), ExitCode> {
    // --state-dir only with the embedded default (clap refuses it next to --config, and
    // Config::load refuses `state_dir` in the file): one place decides where its key lives.
    let (config, source) = match config_path {
        Some(path) => match Config::load(path) {
            Ok(config) => (config, Source::File(path.to_path_buf())),
            Err(e) => return Err(fail_serve(&e.to_string())),
        },
        None => {
            let dir = state_dir
                .clone()
                .unwrap_or_else(|| PathBuf::from(config::DEFAULT_STATE_DIR));
            (Config::embedded(&dir), Source::Embedded)
        }
    };
    // --socket is not written into the config: a reload compares the file with the file.
    let endpoint = Endpoint::parse(
        socket
            .as_deref()
            .or(config.socket.as_deref())
            .unwrap_or(config::DEFAULT_SOCKET),
    );
    // Who may call is settled before anything slow: an abstract socket without an
    // allow-list stops here.
    let access = match server::Access::from_config(&config, &endpoint) {
        Ok(access) => access,
        Err(e) => return Err(fail_serve(&e)),
    };
    if source == Source::Embedded {
        if let Some(dir) = &config.state_dir
            && let Err(e) = root::file::prepare_state_dir(dir)
        {
            return Err(fail_serve(&e.to_string()));
        }
        let key = &config.keys[config::DEFAULT_KEY_NAME];
        match root::create(key).await {
            Ok(true) => tracing::info!("created a new root key for the embedded default"),
            Ok(false) => {}
            Err(e) => return Err(fail_serve(&e.to_string())),
        }
    }
    let plugin = match Plugin::start(&config, source).await {
        Ok(plugin) => plugin,
        Err(e) => return Err(fail_serve(&format!("cannot start: {e}"))),
    };
    if let Some(addr) = config.metrics_listen {
        match server::metrics_http::bind(addr, plugin.clone()).await {
            Ok(serve_metrics) => {
                tokio::spawn(serve_metrics);
            }
            Err(e) => return Err(fail_serve(&format!("cannot serve metrics on {addr}: {e}"))),
        }
    }
    Ok((plugin, config, endpoint, access))
}

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal(mut term: Signal, mut int: Signal) {
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
}

async fn status(socket: &str) -> ExitCode {
    let connected = tokio::time::timeout(Duration::from_secs(5), client::connect(socket)).await;
    let channel = match connected {
        Ok(Ok(channel)) => channel,
        Ok(Err(e)) => return unreachable_plugin(socket, &e.to_string()).await,
        Err(_) => return unreachable_plugin(socket, "timed out").await,
    };
    let status = match client::kms(channel.clone()).status(StatusRequest {}).await {
        Ok(r) => r.into_inner(),
        Err(e) => return unreachable_plugin(socket, e.message()).await,
    };
    say!("version: {}", status.version);
    say!("healthz: {}", status.healthz);
    say!("key_id:  {}", status.key_id);
    if let Ok(info) = client::admin(channel).info(InfoRequest {}).await {
        let info = info.into_inner();
        say!(
            "config:  {} (pid {}, kms-plugin {})",
            info.config_source,
            info.pid,
            info.plugin_version
        );
        if let Some(k) = info.local_kek {
            say!(
                "local KEK: {} of {} encryptions, {}s of {}s",
                k.encryptions,
                k.max_encryptions,
                k.age_seconds,
                k.max_age_seconds
            );
        }
        say!(
            "cache:   {} of {} unwrapped local KEKs",
            info.cache_entries,
            info.cache_capacity
        );
        for r in info.roots {
            let last = match r.last_decrypt_unix {
                0 => "never since start".to_string(),
                t => {
                    let now = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(t, |d| d.as_secs() as i64);
                    format!("unix time {t} ({}s ago)", (now - t).max(0))
                }
            };
            say!(
                "root {} ({}, {}): key_id {} state {}; wraps {} unwraps {} failures {}; decrypts {}, last {}",
                r.name,
                r.provider,
                r.role,
                r.key_id,
                r.state,
                r.wrap_calls,
                r.unwrap_calls,
                r.failed_calls,
                r.decrypts,
                last
            );
            if r.throttled_unwraps > 0 {
                say!(
                    "  {} Decrypt unwraps refused: unwrap budget spent ([cache] unwraps_per_second)",
                    r.throttled_unwraps
                );
            }
            if !r.last_error.is_empty() {
                say!("  last error: {}", r.last_error);
            }
        }
    }
    if status.healthz == "ok" {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

async fn rotate(config_path: &Path, to: &str, socket: Option<String>) -> ExitCode {
    // The keys and PIN files belong to the plugin's service user (keygen runs as it), and
    // rotate runs as root: trust that user's files, as the plugin itself does.
    let early_socket = socket.clone().or_else(|| {
        Config::load(config_path)
            .ok()
            .and_then(|c| c.socket)
            .or_else(|| Some(config::DEFAULT_SOCKET.to_string()))
    });
    if let Some(uid) = early_socket.and_then(|s| client::plugin_uid(&s).ok()) {
        crate::secure_path::trust_service_user(uid);
    }
    let (old_text, new_text, new_config) = match crate::rotate::prepare(config_path, to).await {
        Ok(prepared) => prepared,
        Err(e) => return fail(&e.to_string()),
    };
    let socket = socket
        .or_else(|| new_config.socket.clone())
        .unwrap_or_else(|| config::DEFAULT_SOCKET.to_string());
    let mut kms = match client::connect(&socket).await {
        Ok(channel) => channel,
        Err(e) => return unreachable_plugin(&socket, &e.to_string()).await,
    };
    let old_key_id = match client::kms(kms.clone()).status(StatusRequest {}).await {
        Ok(status) => status.into_inner().key_id,
        Err(e) => return unreachable_plugin(&socket, e.message()).await,
    };
    let old_name = new_config.kek.retired.last().cloned().unwrap_or_default();
    if let Err(e) = crate::rotate::write_atomically(config_path, &new_text) {
        return fail(&e.to_string());
    }
    let reloaded = client::admin(kms.clone())
        .reload(crate::proto::admin::ReloadRequest { force: false })
        .await;
    let new_key_id = match reloaded {
        Ok(r) => {
            let r = r.into_inner();
            if !r.needs_restart.is_empty() {
                say!(
                    "note: {} changed in the config file and needs a restart of the plugin",
                    r.needs_restart.join(", ")
                );
            }
            r.key_id
        }
        Err(e) => {
            let restored = crate::rotate::write_atomically(config_path, &old_text);
            let what = match restored {
                Ok(()) => "the config file was restored".to_string(),
                Err(r) => format!("restoring the config file failed too: {r}"),
            };
            let outcome = if refused_by_plugin(&e) {
                "the plugin refused the new configuration"
            } else {
                "the reload call to the plugin failed"
            };
            return fail(&format!("{outcome} ({what}): {}", e.message()));
        }
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let status = client::kms(kms.clone()).status(StatusRequest {}).await;
        if status.is_ok_and(|s| s.into_inner().key_id == new_key_id) {
            break;
        }
        if tokio::time::Instant::now() > deadline {
            return fail("the plugin did not report the new key_id within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        if let Ok(channel) = client::connect(&socket).await {
            kms = channel;
        }
    }
    say!(
        "{}",
        crate::rotate::next_steps(&old_name, &old_key_id, to, &new_key_id, &socket).trim_end()
    );
    ExitCode::SUCCESS
}

async fn reload(socket: &str, force: bool) -> ExitCode {
    let channel = match client::connect(socket).await {
        Ok(channel) => channel,
        Err(e) => return unreachable_plugin(socket, &e.to_string()).await,
    };
    match client::admin(channel)
        .reload(crate::proto::admin::ReloadRequest { force })
        .await
    {
        Ok(r) => {
            let r = r.into_inner();
            say!("reloaded; active key_id {}", r.key_id);
            if !r.needs_restart.is_empty() {
                say!(
                    "applied, but {} changed and needs a restart of the plugin (the running value stays)",
                    r.needs_restart.join(", ")
                );
            }
            ExitCode::SUCCESS
        }
        Err(e) if refused_by_plugin(&e) => fail(&format!("reload refused: {}", e.message())),
        Err(e) => unreachable_plugin(socket, e.message()).await,
    }
}

async fn keygen(config_path: &Path, name: &str) -> ExitCode {
    let config = match Config::load(config_path) {
        Ok(config) => config,
        Err(e) => return fail(&e.to_string()),
    };
    let Some(key) = config.keys.get(name) else {
        return fail(&format!(
            "{} has no [keys.{name}] entry",
            config_path.display()
        ));
    };
    let created = match root::create(key).await {
        Ok(created) => created,
        Err(e) => return fail(&format!("key \"{name}\": {e}")),
    };
    match root::open(name, key).await {
        Ok(opened) => {
            let what = if created { "created" } else { "already exists" };
            say!(
                "key \"{name}\" ({}) {what}: key_id {}",
                key.provider(),
                opened.key_id()
            );
            ExitCode::SUCCESS
        }
        Err(e) => fail(&format!("key \"{name}\": {e}")),
    }
}

async fn check(config_path: &Path) -> ExitCode {
    let config = match Config::load(config_path) {
        Ok(config) => config,
        Err(e) => return fail(&e.to_string()),
    };
    say!("config {}: valid", config_path.display());
    let rate = UnwrapRate::from(&config.cache);
    let (mut total, mut failed) = (0, 0);
    for (name, role) in config.roles() {
        let Some(key) = config.keys.get(name) else {
            continue; // validation guarantees an entry per role
        };
        total += 1;
        let proven = async {
            let opened = root::open(name, key).await?;
            let root = Root::new(name, role, opened, Default::default(), rate);
            root.probe().await.map(|()| root.key_id().clone())
        };
        let label = format!("key \"{name}\" ({}, {})", key.provider(), role.as_str());
        match proven.await {
            Ok(key_id) => say!("{label}: ok, round trip works; key_id {key_id}"),
            Err(e) => {
                failed += 1;
                say!("{label}: FAILED: {e}");
            }
        }
    }
    if failed == 0 {
        say!("all {total} root keys work");
        ExitCode::SUCCESS
    } else {
        say!("{failed} of {total} root keys do not work");
        ExitCode::from(1)
    }
}

/// An answer the plugin's Admin service gives (a refused reload, a uid outside admin_uids),
/// rather than a connection that failed before any answer.
fn refused_by_plugin(status: &tonic::Status) -> bool {
    matches!(
        status.code(),
        tonic::Code::FailedPrecondition | tonic::Code::PermissionDenied
    )
}

/// A command that got no answer from the plugin says why, as far as one more connection can
/// tell: nothing listens there, or a plugin closed the connection unread (its allow-list).
async fn unreachable_plugin(socket: &str, why: &str) -> ExitCode {
    match client::diagnose(socket).await {
        client::NoAnswer::NotListening(e) => tell(format_args!(
            "kms-plugin: no plugin answers on {socket}: nothing listens there ({e}); is the \
             plugin running, and is this its socket?"
        )),
        client::NoAnswer::ClosedBeforeAnswering => {
            // SAFETY: geteuid has no preconditions; SO_PEERCRED reports the effective uid.
            let uid = unsafe { libc::geteuid() };
            tell(format_args!(
                "kms-plugin: a plugin listens on {socket} but closed the connection before \
                 answering: this uid ({uid}) is probably not in its allowed_uids (or it has \
                 max_connections open); run this command as an allowed user (sudo -u \
                 kms-plugin ...) or add {uid} to allowed_uids"
            ))
        }
        client::NoAnswer::Other => tell(format_args!(
            "kms-plugin: the call to the plugin on {socket} failed: {why}"
        )),
    }
    ExitCode::from(2)
}

/// A failed command other than `serve`: one line on stderr, for a person.
fn fail(message: &str) -> ExitCode {
    tell(format_args!("kms-plugin: {message}"));
    ExitCode::from(1)
}

/// A failed `serve`: one log line (text or JSON, as configured), for journald and log
/// collectors. Not also on stderr: the log is stderr, and the message would appear twice.
fn fail_serve(message: &str) -> ExitCode {
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
fn write_out(line: std::fmt::Arguments<'_>) {
    use std::io::Write;
    if let Err(e) = writeln!(std::io::stdout().lock(), "{line}")
        && e.kind() != std::io::ErrorKind::BrokenPipe
    {
        tell(format_args!("kms-plugin: cannot write to stdout: {e}"));
    }
}

/// Sets up the log on stderr, written by a worker thread: a slow or stuck reader (journald,
/// a full pipe) never delays a call. Lines beyond the buffer are dropped and counted
/// ([`crate::metrics::log_lines_dropped`]). The returned guard flushes the log when dropped.
fn init_logging(format: LogFormat) -> tracing_appender::non_blocking::WorkerGuard {
    let filter = tracing_subscriber::EnvFilter::try_from_env("KMS_PLUGIN_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colour only on a terminal: journald and log collectors get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(LOG_BUFFER_LINES)
        .thread_name("kms-plugin-log")
        .finish(std::io::stderr());
    crate::metrics::count_dropped_log_lines(writer.error_counter());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(writer);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
    guard
}

/// Log lines held for the writer thread (a few MiB at most).
const LOG_BUFFER_LINES: usize = 16 * 1024;

//! `kms-plugin serve`: the wiring config → plugin → server, as library functions that
//! tests can call too.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use tokio::signal::unix::{Signal, SignalKind, signal};

use super::fail_serve;
use crate::config::{self, Config, Source};
use crate::plugin::Plugin;
use crate::root;
use crate::server::{self, socket::Endpoint};

/// What `serve` takes from the command line.
#[derive(Debug, Clone, Default)]
pub struct ServeArgs {
    /// TOML configuration file; `None` runs the embedded default.
    pub config: Option<PathBuf>,
    /// Socket path or @name, overriding the config file's.
    pub socket: Option<String>,
    /// Directory of the embedded default's root key (only without `config`).
    pub state_dir: Option<PathBuf>,
}

/// A plugin that has started and is ready to serve.
pub struct Started {
    /// The plugin.
    pub plugin: Arc<Plugin>,
    /// The configuration it runs on.
    pub config: Config,
    /// Where it serves.
    pub endpoint: Endpoint,
    /// Who may call.
    pub access: server::Access,
}

/// Runs the plugin until SIGTERM or SIGINT; SIGHUP reloads the config file.
pub async fn run(args: &ServeArgs) -> ExitCode {
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
        started = start_up(args) => started,
        () = &mut shutdown => {
            tracing::info!("stopped during start-up");
            return ExitCode::SUCCESS;
        }
    };
    let Started {
        plugin,
        config,
        endpoint,
        access,
    } = match started {
        Ok(started) => started,
        Err(e) => return fail_serve(&e),
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

/// Everything before serving: config, state directory, roots, metrics listener. The error
/// is the one line `serve` logs before it exits 1.
pub async fn start_up(args: &ServeArgs) -> Result<Started, String> {
    let ServeArgs {
        config: config_path,
        socket,
        state_dir,
    } = args;
    // --state-dir only with the embedded default (clap refuses it next to --config, and
    // Config::load refuses `state_dir` in the file): one place decides where its key lives.
    let (config, source) = match config_path.as_deref() {
        Some(path) => match Config::load(path) {
            Ok(config) => (config, Source::File(path.to_path_buf())),
            Err(e) => return Err(e.to_string()),
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
        Err(e) => return Err(e),
    };
    if source == Source::Embedded {
        if let Some(dir) = &config.state_dir
            && let Err(e) = root::file::prepare_state_dir(dir)
        {
            return Err(e.to_string());
        }
        let key = &config.keys[config::DEFAULT_KEY_NAME];
        match root::create(key).await {
            Ok(true) => tracing::info!("created a new root key for the embedded default"),
            Ok(false) => {}
            Err(e) => return Err(e.to_string()),
        }
    }
    let plugin = match Plugin::start(&config, source).await {
        Ok(plugin) => plugin,
        Err(e) => return Err(format!("cannot start: {e}")),
    };
    if let Some(addr) = config.metrics_listen {
        match server::metrics_http::bind(addr, plugin.clone()).await {
            Ok(serve_metrics) => {
                tokio::spawn(serve_metrics);
            }
            Err(e) => return Err(format!("cannot serve metrics on {addr}: {e}")),
        }
    }
    Ok(Started {
        plugin,
        config,
        endpoint,
        access,
    })
}

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal(mut term: Signal, mut int: Signal) {
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
}

//! Serving: the socket, our accept loop and our HTTP/2 server on it, who may call, systemd
//! readiness and a graceful stop (stop accepting, finish calls in flight, remove the socket).

pub mod accept;
pub mod http2;
pub mod metrics_http;
pub mod peer;
pub mod socket;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio_stream::StreamExt;
use tonic::service::interceptor::InterceptedService;

use crate::config::Config;
use crate::h2authority::AuthorityFix;
use crate::plugin::Plugin;
use crate::proto::admin::admin_server::AdminServer;
use crate::proto::v2::key_management_service_server::KeyManagementServiceServer;
use crate::service::Service;
use peer::{AdminCheck, PeerCheck};
use socket::{Endpoint, SocketError};

/// Largest request accepted: a Decrypt carries at most 1 KiB of ciphertext and 32 KiB of
/// annotations, so anything near tonic's 4 MiB default is garbage or abuse.
pub const MAX_REQUEST_BYTES: usize = 128 * 1024;

/// How long calls in flight get to finish after SIGTERM.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// How long responses get to flush once no call is in flight.
const FLUSH_GRACE: Duration = Duration::from_millis(200);

/// Who may call, and how many at once.
#[derive(Debug, Clone)]
pub struct Access {
    /// `allowed_uids`, checked when a connection is accepted.
    pub peers: PeerCheck,
    /// `admin_uids`, checked on each Admin call.
    pub admin: AdminCheck,
    /// `max_connections`.
    pub max_connections: usize,
}

impl Access {
    /// The policy of `config` on `endpoint`; refuses an abstract socket without
    /// `allowed_uids`.
    pub fn from_config(config: &Config, endpoint: &Endpoint) -> Result<Self, String> {
        Ok(Self {
            peers: PeerCheck::new(endpoint, config.allowed_uids.as_deref())?,
            admin: AdminCheck::new(config.admin_uids.as_deref()),
            max_connections: config.max_connections,
        })
    }
}

/// Serves `plugin` on `endpoint` until `shutdown` resolves.
pub async fn serve(
    plugin: Arc<Plugin>,
    endpoint: &Endpoint,
    mode: u32,
    access: Access,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), SocketError> {
    let listener = socket::listen(endpoint, mode)?;
    // kube-apiserver 1.27-1.31 and grpcio send the socket path as `:authority`, which h2
    // rejects; every connection goes through the rewriter that makes it `localhost`.
    tracing::info!(
        socket = %endpoint,
        key_id = %plugin.keyring().key_id(),
        allowed_uids = %uid_list(access.peers.allowed()),
        admin_uids = %uid_list(Some(access.admin.allowed())),
        max_connections = access.max_connections,
        "serving KMS v2"
    );
    let incoming = accept::Incoming::new(listener, access.peers, access.max_connections)
        .map(AuthorityFix::new);
    let service = Service::new(plugin.clone());
    crate::systemd::ready(&plugin.keyring());
    let watchdog = crate::systemd::watchdog_interval().map(|interval| {
        let plugin = plugin.clone();
        tokio::spawn(crate::systemd::keep_alive(interval, move || {
            plugin.keyring()
        }))
    });
    let watcher = tokio::spawn(plugin.clone().watch());

    let (stopping_tx, stopping_rx) = tokio::sync::oneshot::channel::<()>();
    let routes = http2::Routes::new(
        KeyManagementServiceServer::new(service.clone())
            .max_decoding_message_size(MAX_REQUEST_BYTES),
        InterceptedService::new(
            AdminServer::new(service).max_decoding_message_size(MAX_REQUEST_BYTES),
            access.admin,
        ),
    );
    let server = http2::serve(incoming, routes, async move {
        shutdown.await;
        let _ = stopping_tx.send(());
    });
    tokio::pin!(server);
    let finished = tokio::select! {
        () = &mut server => true,
        drained = async {
            let _ = stopping_rx.await;
            tracing::info!("shutting down: no new connections, finishing calls in flight");
            crate::systemd::stopping();
            // Idle HTTP/2 connections (kube-apiserver keeps one open) would hold a graceful
            // shutdown for the whole timeout: stop as soon as no call is in flight.
            tokio::time::timeout(DRAIN_TIMEOUT, plugin.calls_drained()).await
        } => {
            match drained {
                Ok(()) => tracing::info!("no calls in flight; exiting"),
                Err(_) => tracing::warn!("calls still in flight after {DRAIN_TIMEOUT:?}; exiting anyway"),
            }
            false
        }
    };
    if !finished {
        // The last responses may still be on their way out: give the connections a moment
        // to flush and close.
        let _ = tokio::time::timeout(FLUSH_GRACE, &mut server).await;
    }
    socket::remove(endpoint);
    watcher.abort();
    if let Some(watchdog) = watchdog {
        watchdog.abort();
    }
    plugin.stop();
    Ok(())
}

/// `[0, 998]`, or what no list means, for the start-up log line (not a Rust Debug value).
fn uid_list(uids: Option<&std::collections::BTreeSet<u32>>) -> String {
    match uids {
        None => "any (the socket file's mode decides)".to_string(),
        Some(uids) => {
            let shown: Vec<String> = uids.iter().map(u32::to_string).collect();
            format!("[{}]", shown.join(", "))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uid_lists_are_logged_plainly() {
        assert_eq!(uid_list(Some(&[12345, 0].into())), "[0, 12345]");
        assert_eq!(uid_list(None), "any (the socket file's mode decides)");
    }
}

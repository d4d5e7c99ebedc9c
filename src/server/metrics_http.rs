//! `GET /metrics` (for Prometheus) and the probes `/livez`, `/readyz` and `/healthz` over
//! plain HTTP/1.1 on `metrics_listen`. Off by default, and loopback-only unless
//! `metrics_allow_remote` (see [`crate::config::Config`]): it shows key_ids and health, never
//! key material, but has no authentication.
//!
//! The probes answer from memory, like Status (never a root call per request): `/livez` is
//! 200 while the process serves at all; `/readyz` (and its alias `/healthz`) is 200 while an
//! Encrypt would succeed, else 503 with Status's healthz reason as the one-line body.
//!
//! A client gets [`HEADER_READ_TIMEOUT`] to send its request headers and one request per
//! connection; at most [`MAX_CONNECTIONS`] are open at once, more are closed on accept.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::sync::Semaphore;

use super::accept::{Backoff, Throttle};
use crate::plugin::Plugin;

/// Time a client has to send its request line and headers.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Most metrics connections open at once (a scraper needs one).
pub const MAX_CONNECTIONS: usize = 16;

/// Binds `addr` and serves metrics until the task is dropped.
pub async fn bind(
    addr: SocketAddr,
    plugin: Arc<Plugin>,
) -> std::io::Result<impl std::future::Future<Output = ()>> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(listen = %listener.local_addr()?, "serving metrics");
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    Ok(async move {
        let mut backoff = Backoff::default();
        let (mut full, mut failed) = (Throttle::default(), Throttle::default());
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(e) => {
                    if let Some(pause) = backoff.after(&e) {
                        if let Some(total) = failed.hit() {
                            tracing::warn!(error = %e, failures_total = total, "metrics: cannot accept; backing off");
                        }
                        tokio::time::sleep(pause).await;
                    }
                    continue;
                }
            };
            backoff.reset();
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                if let Some(total) = full.hit() {
                    tracing::warn!(
                        max_connections = MAX_CONNECTIONS,
                        refused_total = total,
                        "metrics: connection refused, too many open"
                    );
                }
                continue;
            };
            let plugin = plugin.clone();
            tokio::spawn(async move {
                let service = service_fn(move |request| respond(request, plugin.clone()));
                let _ = http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(HEADER_READ_TIMEOUT)
                    .keep_alive(false)
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
                drop(slot);
            });
        }
    })
}

async fn respond(
    request: Request<Incoming>,
    plugin: Arc<Plugin>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    const PROMETHEUS: &str = "text/plain; version=0.0.4";
    const TEXT: &str = "text/plain; charset=utf-8";
    let (status, content_type, body) = match (request.method(), request.uri().path()) {
        (&Method::GET | &Method::HEAD, "/metrics") => (
            StatusCode::OK,
            PROMETHEUS,
            plugin.metrics().render(&plugin.keyring()),
        ),
        (&Method::GET | &Method::HEAD, "/livez") => (StatusCode::OK, TEXT, "ok\n".to_string()),
        (&Method::GET | &Method::HEAD, "/readyz" | "/healthz") => {
            let health = plugin.keyring().health();
            let status = if health.is_ready() {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            (
                status,
                TEXT,
                format!("{}\n", health.healthz().replace('\n', " ")),
            )
        }
        (&Method::GET | &Method::HEAD, _) => (
            StatusCode::NOT_FOUND,
            TEXT,
            "not found; try /metrics, /livez, /readyz or /healthz\n".to_string(),
        ),
        _ => (
            StatusCode::METHOD_NOT_ALLOWED,
            TEXT,
            "only GET and HEAD\n".to_string(),
        ),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(content_type),
    );
    Ok(response)
}

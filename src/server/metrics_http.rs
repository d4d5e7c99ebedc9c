//! `GET /metrics` over plain HTTP/1.1 on `metrics_listen` (for Prometheus). Off by default,
//! and loopback-only unless `metrics_allow_remote` (see [`crate::config::Config`]): it shows
//! key_ids and health, never key material, but has no authentication.
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
use hyper::{Request, Response, StatusCode};
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
    let (status, body) = if request.uri().path() == "/metrics" {
        (StatusCode::OK, plugin.metrics().render(&plugin.keyring()))
    } else {
        (
            StatusCode::NOT_FOUND,
            "not found; try /metrics\n".to_string(),
        )
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    Ok(response)
}

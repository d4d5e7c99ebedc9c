//! `GET /metrics` over plain HTTP/1.1 on `metrics_listen` (for Prometheus). Off by default;
//! bind it to loopback or a pod IP — it shows key_ids and health, never key material.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;

use crate::plugin::Plugin;

/// Binds `addr` and serves metrics until the task is dropped.
pub async fn bind(
    addr: SocketAddr,
    plugin: Arc<Plugin>,
) -> std::io::Result<impl std::future::Future<Output = ()>> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(listen = %listener.local_addr()?, "serving metrics");
    Ok(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let plugin = plugin.clone();
            tokio::spawn(async move {
                let service = service_fn(move |request| respond(request, plugin.clone()));
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
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

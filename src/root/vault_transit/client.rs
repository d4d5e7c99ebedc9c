//! HTTP to Vault: hyper's client over rustls with ring (the stack the AWS SDK already
//! brings), JSON bodies, the namespace header, and the one place where Vault's answers are
//! classified into [`ErrorKind`]s.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Buf;
use http::header::{CONTENT_TYPE, HeaderValue, RETRY_AFTER};
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use secrecy::{ExposeSecret, SecretString};
use tokio::time::Instant;
use zeroize::Zeroizing;

use super::config::VaultSettings;
use crate::root::ErrorKind;

/// Largest response body read: Vault's answers here are a few hundred bytes.
const MAX_BODY: usize = 64 * 1024;

/// A failed Vault call. `detail` never holds a token, secret_id or key material.
#[derive(Debug, Clone)]
pub struct VaultError {
    /// The class (the plugin-wide kinds: retry, health and gRPC code follow from it).
    pub kind: ErrorKind,
    /// What happened, for operators.
    pub detail: String,
    /// Vault's Retry-After, when it sent one.
    pub retry_after: Option<Duration>,
}

impl VaultError {
    /// An error without Retry-After.
    pub fn new(kind: ErrorKind, detail: impl Into<String>) -> Self {
        Self {
            kind,
            detail: detail.into(),
            retry_after: None,
        }
    }

    /// The same error with `context: ` in front of the detail.
    pub fn context(mut self, context: &str) -> Self {
        self.detail = format!("{context}: {}", self.detail);
        self
    }
}

impl std::fmt::Display for VaultError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.detail)
    }
}

/// Classifies a non-2xx answer from Vault from its status, Retry-After header and the
/// `errors` array of its body. The one place that knows Vault's error texts.
pub fn classify(
    status: StatusCode,
    retry_after: Option<Duration>,
    errors: &[String],
) -> VaultError {
    let text = if errors.is_empty() {
        format!("Vault answered {status}")
    } else {
        format!("Vault answered {status}: {}", errors.join("; ").trim())
    };
    let has = |needle: &str| errors.iter().any(|e| e.contains(needle));
    let kind = match status.as_u16() {
        429 => ErrorKind::RateLimited,
        503 if retry_after.is_some() => ErrorKind::RateLimited,
        403 => ErrorKind::Denied,
        404 if has("no handler for route") => ErrorKind::Misconfigured,
        404 => ErrorKind::KeyDisabled,
        400 if has("encryption key not found") || has("disallowed by policy") => {
            ErrorKind::KeyDisabled
        }
        400 if has("message authentication failed") || has("invalid ciphertext") => {
            ErrorKind::NotAuthentic
        }
        // 412: a performance standby has not caught up yet; 5xx: sealed, standby, overload.
        412 | 500..=599 => ErrorKind::Unavailable,
        _ => ErrorKind::Misconfigured,
    };
    VaultError {
        kind,
        detail: text,
        retry_after,
    }
}

/// A request body that wipes itself when hyper drops it (it carries key material).
struct SecretBuf {
    bytes: Zeroizing<Vec<u8>>,
    pos: usize,
}

impl Buf for SecretBuf {
    fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }

    fn chunk(&self) -> &[u8] {
        &self.bytes[self.pos..]
    }

    fn advance(&mut self, cnt: usize) {
        self.pos = (self.pos + cnt).min(self.bytes.len());
    }
}

/// One Vault server (address, namespace, TLS) over a pooled HTTP client.
pub struct VaultClient {
    http: Client<HttpsConnector<HttpConnector>, Full<SecretBuf>>,
    address: String,
    namespace: Option<HeaderValue>,
}

impl VaultClient {
    /// Builds the client, reading the CA bundle and client certificate now so that a bad
    /// file is a start-up error naming it.
    pub fn new(settings: &VaultSettings) -> Result<Self, VaultError> {
        let tls = tls_config(settings)?;
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let namespace = match &settings.namespace {
            Some(ns) => Some(HeaderValue::from_str(ns).map_err(|_| {
                VaultError::new(
                    ErrorKind::Misconfigured,
                    format!("namespace \"{ns}\" is not a valid header value"),
                )
            })?),
            None => None,
        };
        Ok(Self {
            http: Client::builder(TokioExecutor::new())
                .pool_idle_timeout(Duration::from_secs(60))
                .build(https),
            address: settings.address.clone(),
            namespace,
        })
    }

    /// The server's address, for messages.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// One HTTP exchange with `/v1/{path}`, bounded by `deadline`. Returns the body of a
    /// 2xx answer (wiped when dropped: it may carry a plaintext key or a token).
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        token: Option<&SecretString>,
        body: Option<&Zeroizing<Vec<u8>>>,
        deadline: Instant,
    ) -> Result<Zeroizing<Vec<u8>>, VaultError> {
        let uri = format!("{}/v1/{path}", self.address);
        let mut builder = Request::builder()
            .method(method)
            .uri(&uri)
            .header("X-Vault-Request", "true");
        if let Some(ns) = &self.namespace {
            builder = builder.header("X-Vault-Namespace", ns.clone());
        }
        if let Some(token) = token {
            let mut value = HeaderValue::from_str(token.expose_secret()).map_err(|_| {
                VaultError::new(
                    ErrorKind::CredentialsRejected,
                    "the Vault token holds characters not allowed in an HTTP header",
                )
            })?;
            value.set_sensitive(true);
            builder = builder.header("X-Vault-Token", value);
        }
        let bytes = match body {
            Some(b) => {
                builder = builder.header(CONTENT_TYPE, "application/json");
                b.clone()
            }
            None => Zeroizing::new(Vec::new()),
        };
        let request = builder
            .body(Full::new(SecretBuf { bytes, pos: 0 }))
            .map_err(|e| {
                VaultError::new(
                    ErrorKind::Misconfigured,
                    format!("cannot build request to {uri}: {e}"),
                )
            })?;
        let exchange = async {
            let response = self
                .http
                .request(request)
                .await
                .map_err(|e| transport_error(&self.address, &e))?;
            let status = response.status();
            let retry_after = response
                .headers()
                .get(RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(Duration::from_secs);
            let mut body = Limited::new(response.into_body(), MAX_BODY);
            let mut bytes = Zeroizing::new(Vec::new());
            while let Some(frame) = body.frame().await {
                let frame = frame.map_err(|e| {
                    VaultError::new(
                        ErrorKind::Unavailable,
                        format!("reading Vault's answer from {}: {e}", self.address),
                    )
                })?;
                if let Some(data) = frame.data_ref() {
                    bytes.extend_from_slice(data);
                }
            }
            if status.is_success() {
                return Ok(bytes);
            }
            let errors = serde_json::from_slice::<ErrorBody>(&bytes)
                .map(|b| b.errors)
                .unwrap_or_default();
            Err(classify(status, retry_after, &errors))
        };
        match tokio::time::timeout_at(deadline, exchange).await {
            Ok(result) => result,
            Err(_) => Err(VaultError::new(
                ErrorKind::Unavailable,
                format!("no answer from Vault at {} in time", self.address),
            )),
        }
    }
}

#[derive(serde::Deserialize)]
struct ErrorBody {
    #[serde(default)]
    errors: Vec<String>,
}

/// Connection failures are transient, except a certificate Vault's listener or ours cannot
/// pass: retrying will not fix the CA bundle.
fn transport_error(address: &str, e: &(dyn std::error::Error + 'static)) -> VaultError {
    let chain = crate::root::error::error_chain(e);
    let kind = if chain.contains("certificate") || chain.contains("CertificateRequired") {
        ErrorKind::Misconfigured
    } else {
        ErrorKind::Unavailable
    };
    VaultError::new(kind, format!("cannot reach Vault at {address}: {chain}"))
}

/// rustls with ring, the configured (or system) roots and the client certificate.
fn tls_config(settings: &VaultSettings) -> Result<rustls::ClientConfig, VaultError> {
    let mut roots = rustls::RootCertStore::empty();
    match &settings.tls.ca_file {
        Some(path) => {
            let certs = read_certs(path, "ca_file")?;
            for cert in certs {
                roots.add(cert).map_err(|e| {
                    VaultError::new(
                        ErrorKind::Misconfigured,
                        format!("ca_file {}: {e}", path.display()),
                    )
                })?;
            }
        }
        None => {
            let native = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(native.certs);
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| VaultError::new(ErrorKind::Misconfigured, format!("TLS set-up: {e}")))?
        .with_root_certificates(roots);
    match &settings.tls.client_cert {
        Some((cert_path, key_path)) => {
            let certs = read_certs(cert_path, "client_cert_file")?;
            let pem = read_file(key_path, "client_key_file")?;
            let key = PrivateKeyDer::from_pem_slice(&pem).map_err(|e| {
                VaultError::new(
                    ErrorKind::Misconfigured,
                    format!(
                        "client_key_file {} holds no PEM private key ({e})",
                        key_path.display()
                    ),
                )
            })?;
            builder.with_client_auth_cert(certs, key).map_err(|e| {
                VaultError::new(
                    ErrorKind::Misconfigured,
                    format!(
                        "client_cert_file {} and client_key_file {}: {e}",
                        cert_path.display(),
                        key_path.display()
                    ),
                )
            })
        }
        None => Ok(builder.with_no_client_auth()),
    }
}

fn read_file(path: &Path, field: &str) -> Result<Zeroizing<Vec<u8>>, VaultError> {
    std::fs::read(path).map(Zeroizing::new).map_err(|e| {
        VaultError::new(
            ErrorKind::Misconfigured,
            format!("cannot read {field} {}: {e}", path.display()),
        )
    })
}

fn read_certs(path: &Path, field: &str) -> Result<Vec<CertificateDer<'static>>, VaultError> {
    let pem = read_file(path, field)?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<_, _>>()
        .map_err(|e| {
            VaultError::new(
                ErrorKind::Misconfigured,
                format!("{field} {}: {e}", path.display()),
            )
        })?;
    if certs.is_empty() {
        return Err(VaultError::new(
            ErrorKind::Misconfigured,
            format!("{field} {} holds no PEM certificate", path.display()),
        ));
    }
    Ok(certs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kind(status: u16, retry: Option<u64>, errors: &[&str]) -> ErrorKind {
        let errors: Vec<String> = errors
            .iter()
            .map(std::string::ToString::to_string)
            .collect();
        classify(
            StatusCode::from_u16(status).expect("status"),
            retry.map(Duration::from_secs),
            &errors,
        )
        .kind
    }

    #[test]
    fn vault_answers_are_classified() {
        assert_eq!(kind(403, None, &["permission denied"]), ErrorKind::Denied);
        assert_eq!(kind(429, None, &[]), ErrorKind::RateLimited);
        assert_eq!(kind(503, Some(2), &[]), ErrorKind::RateLimited);
        assert_eq!(
            kind(503, None, &["Vault is sealed"]),
            ErrorKind::Unavailable
        );
        assert_eq!(kind(500, None, &["internal error"]), ErrorKind::Unavailable);
        assert_eq!(kind(412, None, &[]), ErrorKind::Unavailable);
        assert_eq!(kind(404, None, &[]), ErrorKind::KeyDisabled);
        assert_eq!(
            kind(404, None, &["no handler for route \"transit2/keys/k\""]),
            ErrorKind::Misconfigured
        );
        assert_eq!(
            kind(400, None, &["encryption key not found"]),
            ErrorKind::KeyDisabled
        );
        assert_eq!(
            kind(
                400,
                None,
                &["ciphertext or signature version is disallowed by policy (too old)"]
            ),
            ErrorKind::KeyDisabled
        );
        assert_eq!(
            kind(400, None, &["cipher: message authentication failed"]),
            ErrorKind::NotAuthentic
        );
        assert_eq!(
            kind(400, None, &["invalid ciphertext: no prefix"]),
            ErrorKind::NotAuthentic
        );
        assert_eq!(
            kind(400, None, &["something new"]),
            ErrorKind::Misconfigured
        );
        assert!(ErrorKind::Unavailable.is_transient() && ErrorKind::RateLimited.is_transient());
        assert!(!ErrorKind::Denied.is_transient());
    }

    #[test]
    fn the_detail_quotes_vault() {
        let e = classify(
            StatusCode::SERVICE_UNAVAILABLE,
            None,
            &["Vault is sealed".into()],
        );
        assert_eq!(
            e.detail,
            "Vault answered 503 Service Unavailable: Vault is sealed"
        );
    }
}

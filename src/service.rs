//! The gRPC services: KMS v2 for kube-apiserver, Admin for operators. Each handler
//! validates sizes, calls the keyring, logs one line, and maps errors to status codes in
//! [`to_status`], the one place that decides what a client is told.

use std::sync::Arc;
use std::time::Duration;

use tonic::{Request, Response, Status};
use zeroize::Zeroize;

use crate::keyring::{Decrypted, KeyringError, RootReport};
use crate::metrics::Op;
use crate::plugin::Plugin;
use crate::proto::admin::admin_server::Admin;
use crate::proto::admin::{
    InfoRequest, InfoResponse, LocalKekInfo, ReloadRequest, ReloadResponse, RootInfo,
};
use crate::proto::v2::key_management_service_server::KeyManagementService;
use crate::proto::v2::{
    DecryptRequest, DecryptResponse, EncryptRequest, EncryptResponse, StatusRequest, StatusResponse,
};
use crate::root::ErrorKind;

/// Decrypt waits at most this long for a root when the client sent no deadline.
const DEFAULT_DEADLINE: Duration = Duration::from_secs(3);
/// tonic enforces the client's deadline too, answering `Cancelled`; the handler gives up this
/// much earlier so the caller gets `DeadlineExceeded` with a reason instead.
const DEADLINE_MARGIN: Duration = Duration::from_millis(20);

/// Both services over one plugin.
#[derive(Clone)]
pub struct Service {
    plugin: Arc<Plugin>,
}

impl Service {
    /// Serves `plugin`.
    pub fn new(plugin: Arc<Plugin>) -> Self {
        Self { plugin }
    }

    /// One log line and the metrics for a finished Encrypt or Decrypt.
    fn log_call<T>(
        &self,
        op: Op,
        uid: &str,
        key_id: &str,
        result: &Result<T, KeyringError>,
        started: std::time::Instant,
    ) {
        let elapsed = started.elapsed();
        self.plugin.metrics().observe(op, result.is_ok(), elapsed);
        let micros = elapsed.as_micros() as u64;
        let op = match op {
            Op::Encrypt => "encrypt",
            Op::Decrypt => "decrypt",
            Op::Status => "status",
        };
        match result {
            // The audit line, formatted without tracing's formatter when that gives the
            // same bytes (see audit_line); tracing's filter still decides whether it is due.
            Ok(_) if crate::audit_line::write_ok(op, uid, key_id, micros) => {}
            Ok(_) => {
                let (uid, key_id) = (loggable(uid), loggable(key_id));
                tracing::info!(op, uid = %uid, key_id = %key_id, outcome = "ok", micros);
            }
            Err(e) => {
                let (uid, key_id) = (loggable(uid), loggable(key_id));
                tracing::warn!(op, uid = %uid, key_id = %key_id, outcome = "error", error = %e, micros);
            }
        }
    }
}

#[tonic::async_trait]
impl KeyManagementService for Service {
    async fn status(&self, _: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        let started = std::time::Instant::now();
        let keyring = self.plugin.keyring();
        let health = keyring.health();
        let key_id = keyring.key_id().to_string();
        tracing::debug!(op = "status", key_id = %key_id, healthz = %health.healthz());
        self.plugin
            .metrics()
            .observe(Op::Status, health.is_ready(), started.elapsed());
        Ok(Response::new(StatusResponse {
            version: keyring.api_version().as_str().to_string(),
            healthz: health.healthz().to_string(),
            key_id,
        }))
    }

    async fn encrypt(
        &self,
        request: Request<EncryptRequest>,
    ) -> Result<Response<EncryptResponse>, Status> {
        let _in_flight = self.plugin.call_started();
        let started = std::time::Instant::now();
        let mut request = request.into_inner();
        let keyring = self.plugin.keyring();
        let result = keyring.encrypt(&request.plaintext);
        // Our copy of the DEK seed; transport buffers are tonic's and freed by it.
        request.plaintext.zeroize();
        self.log_call(
            Op::Encrypt,
            &request.uid,
            keyring.key_id().as_str(),
            &result,
            started,
        );
        let sealed = result.map_err(|e| to_status(&e))?;
        Ok(Response::new(EncryptResponse {
            ciphertext: sealed.ciphertext,
            key_id: sealed.key_id,
            annotations: sealed.annotations,
        }))
    }

    async fn decrypt(
        &self,
        request: Request<DecryptRequest>,
    ) -> Result<Response<DecryptResponse>, Status> {
        let _in_flight = self.plugin.call_started();
        let started = std::time::Instant::now();
        let (metadata, _, request) = request.into_parts();
        let keyring = self.plugin.keyring();
        let cached =
            keyring.decrypt_cached(&request.key_id, &request.ciphertext, &request.annotations);
        let result = match cached {
            Ok(Decrypted::Plaintext(plaintext)) => Ok(plaintext),
            Err(e) => Err(e),
            // Only a root call can take long: the deadline is armed for it alone. Boxed, so
            // that the root call's large future is not part of every call's future (which
            // is allocated, moved and zeroed on free for cache hits too).
            Ok(Decrypted::NeedsRoot(unwrap)) => {
                let deadline = grpc_timeout(&metadata)
                    .map_or(DEFAULT_DEADLINE, |d| d.saturating_sub(DEADLINE_MARGIN));
                match Box::pin(tokio::time::timeout(deadline, unwrap.finish())).await {
                    Ok(result) => result,
                    Err(_) => {
                        self.plugin
                            .metrics()
                            .observe(Op::Decrypt, false, started.elapsed());
                        tracing::warn!(op = "decrypt", uid = %loggable(&request.uid), "deadline exceeded waiting for a root key");
                        return Err(Status::deadline_exceeded(
                            "timed out waiting for the root key",
                        ));
                    }
                }
            }
        };
        self.log_call(Op::Decrypt, &request.uid, &request.key_id, &result, started);
        let mut plaintext = result.map_err(|e| to_status(&e))?;
        Ok(Response::new(DecryptResponse {
            // Moved, not copied, into the response: tonic frees it after encoding, and the
            // zeroizing allocator wipes every freed block.
            plaintext: std::mem::take(&mut *plaintext),
        }))
    }
}

#[tonic::async_trait]
impl Admin for Service {
    async fn info(&self, _: Request<InfoRequest>) -> Result<Response<InfoResponse>, Status> {
        let keyring = self.plugin.keyring();
        let (roots, local_kek) = keyring.info();
        let cache = keyring.cache();
        Ok(Response::new(InfoResponse {
            version: keyring.api_version().as_str().to_string(),
            healthz: keyring.health().healthz().to_string(),
            key_id: keyring.key_id().to_string(),
            roots: roots.into_iter().map(root_info).collect(),
            local_kek: Some(LocalKekInfo {
                encryptions: local_kek.encryptions,
                max_encryptions: local_kek.max_encryptions,
                age_seconds: local_kek.age_seconds,
                max_age_seconds: local_kek.max_age_seconds,
            }),
            cache_entries: cache.len() as u64,
            cache_capacity: cache.capacity() as u64,
            config_source: self.plugin.source().to_string(),
            pid: std::process::id(),
            plugin_version: env!("CARGO_PKG_VERSION").to_string(),
        }))
    }

    async fn reload(
        &self,
        request: Request<ReloadRequest>,
    ) -> Result<Response<ReloadResponse>, Status> {
        let force = request.into_inner().force;
        match self.plugin.reload(force).await {
            Ok(reloaded) => Ok(Response::new(ReloadResponse {
                key_id: reloaded.key_id.to_string(),
                needs_restart: reloaded
                    .needs_restart
                    .iter()
                    .map(std::string::ToString::to_string)
                    .collect(),
            })),
            // The operator's own configuration problem: tell them all of it.
            Err(e) => Err(Status::failed_precondition(e.to_string())),
        }
    }
}

/// The one mapping from keyring errors to what a client sees. Messages name the problem
/// and never carry key material or request data.
pub fn to_status(error: &KeyringError) -> Status {
    let message = error.to_string();
    match error {
        KeyringError::InvalidRequest(_) | KeyringError::Envelope(_) => {
            Status::invalid_argument(message)
        }
        KeyringError::UnknownKeyId => Status::failed_precondition(message),
        KeyringError::NotReady(_) => Status::unavailable(message),
        // The one mapping from root failure kinds to gRPC codes.
        KeyringError::Root { kind, .. } => match kind {
            ErrorKind::Unavailable | ErrorKind::RateLimited => Status::unavailable(message),
            ErrorKind::Throttled => Status::resource_exhausted(message),
            ErrorKind::Denied
            | ErrorKind::KeyDisabled
            | ErrorKind::CredentialsRejected
            | ErrorKind::Misconfigured => Status::failed_precondition(message),
            ErrorKind::NotAuthentic => Status::invalid_argument(message),
        },
    }
}

/// A root as the Admin protocol shows it.
fn root_info(root: RootReport) -> RootInfo {
    RootInfo {
        name: root.name,
        provider: root.provider.to_string(),
        key_id: root.key_id,
        role: root.role.to_string(),
        state: root.state.to_string(),
        last_error: root.last_error,
        last_decrypt_unix: root.last_decrypt_unix,
        wrap_calls: root.wrap_calls,
        unwrap_calls: root.unwrap_calls,
        failed_calls: root.failed_calls,
        decrypts: root.decrypts,
        throttled_unwraps: root.throttled_unwraps,
    }
}

/// Caller-supplied strings in logs: bounded and printable only. Formatted straight into the
/// log line (no String per field per call).
fn loggable(text: &str) -> Loggable<'_> {
    Loggable(text)
}

/// See [`loggable`].
struct Loggable<'a>(&'a str);

impl std::fmt::Display for Loggable<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use std::fmt::Write;
        let end = self
            .0
            .char_indices()
            .nth(crate::audit_line::MAX_LOGGED_CHARS)
            .map_or(self.0.len(), |(i, _)| i);
        let text = self.0.get(..end).unwrap_or_default();
        // Printable runs are written whole, each other character as `?`.
        let mut start = 0;
        for (i, c) in text.char_indices() {
            if !c.is_ascii_graphic() {
                f.write_str(text.get(start..i).unwrap_or_default())?;
                f.write_char('?')?;
                start = i + c.len_utf8();
            }
        }
        f.write_str(text.get(start..).unwrap_or_default())
    }
}

/// The client's deadline from the `grpc-timeout` header (`<digits><H|M|S|m|u|n>`).
fn grpc_timeout(metadata: &tonic::metadata::MetadataMap) -> Option<Duration> {
    let value = metadata.get("grpc-timeout")?.to_str().ok()?;
    let split = value.len().checked_sub(1)?;
    let (digits, unit) = value.split_at(split);
    if digits.is_empty() || digits.len() > 8 {
        return None;
    }
    let amount: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(amount.checked_mul(3600)?),
        "M" => Duration::from_secs(amount.checked_mul(60)?),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::EnvelopeError;
    use tonic::Code;

    #[test]
    fn status_codes() {
        let cases = [
            (KeyringError::InvalidRequest("x"), Code::InvalidArgument),
            (
                KeyringError::Envelope(EnvelopeError::Authentication),
                Code::InvalidArgument,
            ),
            (KeyringError::UnknownKeyId, Code::FailedPrecondition),
            (
                KeyringError::Root {
                    name: "a".into(),
                    kind: ErrorKind::Denied,
                },
                Code::FailedPrecondition,
            ),
            (
                KeyringError::Root {
                    name: "a".into(),
                    kind: ErrorKind::Unavailable,
                },
                Code::Unavailable,
            ),
            (KeyringError::NotReady("x".into()), Code::Unavailable),
            (
                KeyringError::Root {
                    name: "a".into(),
                    kind: ErrorKind::Throttled,
                },
                Code::ResourceExhausted,
            ),
        ];
        for (error, code) in cases {
            assert_eq!(to_status(&error).code(), code, "{error}");
        }
    }

    #[test]
    fn grpc_timeout_parsing() {
        let mut m = tonic::metadata::MetadataMap::new();
        assert_eq!(grpc_timeout(&m), None);
        for (text, want) in [
            ("3S", Some(Duration::from_secs(3))),
            ("2999999u", Some(Duration::from_micros(2_999_999))),
            ("100m", Some(Duration::from_millis(100))),
            ("1H", Some(Duration::from_secs(3600))),
            ("S", None),
            ("123456789S", None),
            ("5x", None),
        ] {
            m.insert("grpc-timeout", text.parse().expect("ascii"));
            assert_eq!(grpc_timeout(&m), want, "{text}");
        }
    }

    #[test]
    fn audit_line_shows_caller_strings_as_loggable_does() {
        for text in [
            "a\nb\u{7}c",
            "é x\u{1}",
            &"é".repeat(100),
            &"x".repeat(500),
            "k-1.a_b",
        ] {
            let mut out = Vec::new();
            crate::audit_line::push_loggable(&mut out, text, false);
            assert_eq!(out, loggable(text).to_string().as_bytes(), "{text}");
        }
    }

    #[test]
    fn loggable_strips_control_characters_and_bounds_length() {
        assert_eq!(loggable("a\nb\u{7}c").to_string(), "a?b?c");
        assert_eq!(loggable("é x\u{1}").to_string(), "??x?");
        assert_eq!(loggable(&"é".repeat(100)).to_string(), "?".repeat(80));
        assert_eq!(loggable(&"x".repeat(500)).to_string().len(), 80);
    }
}

//! One authenticated Vault operation: retried with jittered backoff while Vault is
//! unavailable or rate-limits, within the configured budget; on a 403, the token is
//! acquired again once, and a second refusal is told apart (bad token or missing policy).

use std::time::Duration;

use http::Method;
use rand::Rng;
use tokio::time::Instant;
use zeroize::Zeroizing;

use super::auth::{Auth, json_body};
use super::client::{VaultClient, VaultError};
use crate::root::ErrorKind;

const BASE_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_millis(800);

/// A Vault client with its credentials and time budget.
pub struct Session {
    /// HTTP.
    pub client: VaultClient,
    /// Credentials.
    pub auth: Auth,
    /// Budget of one operation.
    pub budget: Duration,
}

impl Session {
    /// Runs `method /v1/{path}` with the plugin's token and returns the 2xx body.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<&Zeroizing<Vec<u8>>>,
    ) -> Result<Zeroizing<Vec<u8>>, VaultError> {
        let deadline = Instant::now() + self.budget;
        let mut attempts = 0u32;
        let mut reauthenticated = false;
        loop {
            attempts += 1;
            let outcome = match self.auth.token(&self.client, deadline).await {
                Ok(token) => {
                    self.client
                        .send(method.clone(), path, Some(&token), body, deadline)
                        .await
                }
                Err(e) => Err(e),
            };
            let error = match outcome {
                Ok(answer) => return Ok(answer),
                Err(e) => e,
            };
            match error.kind {
                ErrorKind::Denied if !reauthenticated => {
                    // The token may have expired or been revoked: get a new one, once.
                    reauthenticated = true;
                    self.auth.invalidate().await;
                    continue;
                }
                ErrorKind::Denied => return Err(self.explain_denial(error, deadline).await),
                kind if kind.is_transient() => {
                    let delay = error.retry_after.unwrap_or_else(|| backoff(attempts));
                    if Instant::now() + delay >= deadline {
                        return Err(VaultError::new(
                            kind,
                            format!(
                                "{} (after {attempts} attempt(s) within {} ms)",
                                error.detail,
                                self.budget.as_millis()
                            ),
                        ));
                    }
                    tracing::debug!(path, attempt = attempts, error = %error, "retrying Vault call");
                    tokio::time::sleep(delay).await;
                }
                _ => return Err(error),
            }
        }
    }

    /// A fresh token was refused too: if Vault does not know the token at all, the
    /// credentials are at fault; otherwise its policy lacks a capability on the path.
    async fn explain_denial(&self, error: VaultError, deadline: Instant) -> VaultError {
        let lookup = match self.auth.token(&self.client, deadline).await {
            Ok(token) => {
                self.client
                    .send(
                        Method::GET,
                        "auth/token/lookup-self",
                        Some(&token),
                        None,
                        deadline,
                    )
                    .await
            }
            Err(e) => Err(e),
        };
        match lookup {
            Err(e) if e.kind == ErrorKind::Denied || e.kind == ErrorKind::CredentialsRejected => {
                VaultError::new(
                    ErrorKind::CredentialsRejected,
                    format!(
                        "Vault refused the plugin's token (invalid, expired or revoked; {}): {}",
                        self.auth.describe(),
                        error.detail
                    ),
                )
            }
            _ => VaultError::new(
                ErrorKind::Denied,
                format!(
                    "permission denied: the token's policy lacks a capability this call needs ({})",
                    error.detail
                ),
            ),
        }
    }
}

/// An empty JSON object body.
pub fn empty_body() -> Zeroizing<Vec<u8>> {
    json_body(&serde_json::json!({}))
}

/// Exponential backoff with equal jitter, so that many plugins do not retry in lockstep.
fn backoff(attempt: u32) -> Duration {
    let exp = BASE_BACKOFF.saturating_mul(1u32 << attempt.saturating_sub(1).min(10));
    let half = exp.min(MAX_BACKOFF) / 2;
    half + half.mul_f64(rand::thread_rng().r#gen::<f64>())
}

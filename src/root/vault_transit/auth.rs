//! The plugin's Vault token: read from a file (re-read when the file changes, so that a
//! Vault Agent sidecar can renew or replace it), or got by an AppRole or TLS certificate
//! login, renewed at two thirds of its TTL and acquired again when Vault refuses it.
//! Tokens and secret_ids stay in [`SecretString`]s: never in logs, errors or Debug.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, SystemTime};

use http::Method;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use tokio::sync::Mutex;
use tokio::time::Instant;
use zeroize::Zeroizing;

use super::client::{VaultClient, VaultError};
use super::config::AuthSettings;
use crate::root::ErrorKind;

/// Largest token or secret_id file read.
const MAX_SECRET_FILE: u64 = 16 * 1024;

/// Where the current token came from, and when to look again.
enum Origin {
    /// A token file with its identity when read.
    File(FileStamp),
    /// A login; `renew_at` is None for a token that never expires.
    Login {
        renew_at: Option<Instant>,
        expires_at: Option<Instant>,
        renewable: bool,
    },
}

/// What tells a replaced or rewritten token file apart.
#[derive(Debug, Clone, PartialEq, Eq)]
struct FileStamp {
    modified: Option<SystemTime>,
    len: u64,
    inode: u64,
    device: u64,
}

struct Cached {
    token: SecretString,
    origin: Origin,
}

/// The plugin's way to a valid Vault token.
pub struct Auth {
    settings: AuthSettings,
    state: Mutex<Option<Cached>>,
}

impl Auth {
    /// No token is fetched until the first call.
    pub fn new(settings: AuthSettings) -> Self {
        Self {
            settings,
            state: Mutex::new(None),
        }
    }

    /// The method, as in the config (`token`, `approle`, `cert`).
    pub fn method(&self) -> &'static str {
        match self.settings {
            AuthSettings::Token { .. } => "token",
            AuthSettings::AppRole { .. } => "approle",
            AuthSettings::Cert { .. } => "cert",
        }
    }

    /// Where the credentials come from, for messages (paths only, never contents).
    pub fn describe(&self) -> String {
        match &self.settings {
            AuthSettings::Token { token_file } => {
                format!("auth = \"token\", token_file {}", token_file.display())
            }
            AuthSettings::AppRole { role_id_file, .. } => format!(
                "auth = \"approle\", role_id_file {}",
                role_id_file.display()
            ),
            AuthSettings::Cert { mount, .. } => format!("auth = \"cert\" at auth/{mount}"),
        }
    }

    /// A token to send now: the cached one unless the token file changed or the login
    /// token is due for renewal (then renewed, or a new login when it cannot be).
    pub async fn token(
        &self,
        client: &VaultClient,
        deadline: Instant,
    ) -> Result<SecretString, VaultError> {
        let mut state = self.state.lock().await;
        if let Some(cached) = state.as_ref() {
            match &cached.origin {
                Origin::File(stamp) => {
                    if let AuthSettings::Token { token_file } = &self.settings
                        && stamp_of(token_file).ok().as_ref() == Some(stamp)
                    {
                        return Ok(cached.token.clone());
                    }
                }
                Origin::Login { renew_at, .. } => {
                    if renew_at.is_none_or(|at| Instant::now() < at) {
                        return Ok(cached.token.clone());
                    }
                }
            }
        }
        let fresh = self.refresh(state.take(), client, deadline).await?;
        let token = fresh.token.clone();
        *state = Some(fresh);
        Ok(token)
    }

    /// Forgets the token after Vault refused it (403): the next [`Auth::token`] re-reads
    /// the file or logs in again.
    pub async fn invalidate(&self) {
        *self.state.lock().await = None;
    }

    /// When the background renewer should next renew the login token; `None` for a token
    /// file or a token that never expires.
    pub async fn renew_at(&self) -> Option<Instant> {
        match self.state.lock().await.as_ref() {
            Some(Cached {
                origin: Origin::Login { renew_at, .. },
                ..
            }) => *renew_at,
            _ => None,
        }
    }

    /// Renews or replaces the current token, or reads the file again.
    async fn refresh(
        &self,
        previous: Option<Cached>,
        client: &VaultClient,
        deadline: Instant,
    ) -> Result<Cached, VaultError> {
        match &self.settings {
            AuthSettings::Token { token_file } => read_token_file(token_file).await,
            AuthSettings::AppRole { .. } | AuthSettings::Cert { .. } => {
                if let Some(Cached {
                    token,
                    origin:
                        Origin::Login {
                            renewable: true,
                            expires_at,
                            ..
                        },
                }) = previous
                    && expires_at.is_none_or(|at| Instant::now() < at)
                {
                    match renew_self(client, &token, deadline).await {
                        Ok(renewed) => return Ok(renewed),
                        // Expired, revoked or at its max TTL: log in again below.
                        Err(e) => {
                            tracing::info!(error = %e, "Vault token renewal failed; logging in again");
                        }
                    }
                }
                self.login(client, deadline).await
            }
        }
    }

    async fn login(&self, client: &VaultClient, deadline: Instant) -> Result<Cached, VaultError> {
        let (mount, body, what) = match &self.settings {
            AuthSettings::AppRole {
                mount,
                role_id_file,
                secret_id_file,
            } => {
                let role_id = read_secret_file(role_id_file, "role_id_file").await?;
                let secret_id = read_secret_file(secret_id_file, "secret_id_file").await?;
                let body = json_body(&serde_json::json!({
                    "role_id": role_id.expose_secret(),
                    "secret_id": secret_id.expose_secret(),
                }));
                (mount, body, "AppRole")
            }
            AuthSettings::Cert { mount, role } => {
                let body = match role {
                    Some(name) => json_body(&serde_json::json!({ "name": name })),
                    None => json_body(&serde_json::json!({})),
                };
                (mount, body, "TLS certificate")
            }
            AuthSettings::Token { .. } => {
                return Err(VaultError::new(
                    ErrorKind::Misconfigured,
                    "token auth has no login",
                ));
            }
        };
        let path = format!("auth/{mount}/login");
        let answer = client
            .send(Method::POST, &path, None, Some(&body), deadline)
            .await
            .map_err(|e| match e.kind {
                // A refused login is the credentials' fault, whatever the status.
                ErrorKind::Denied
                | ErrorKind::Misconfigured
                | ErrorKind::KeyDisabled
                | ErrorKind::NotAuthentic => {
                    VaultError::new(ErrorKind::CredentialsRejected, e.detail)
                }
                _ => e,
            })
            .map_err(|e| e.context(&format!("{what} login at {path}")))?;
        let login: AuthAnswer = parse(&answer, &path)?;
        tracing::info!(
            method = self.method(),
            ttl_seconds = login.auth.lease_duration,
            "logged in to Vault"
        );
        Ok(login.auth.into_cached())
    }
}

/// POST auth/token/renew-self.
async fn renew_self(
    client: &VaultClient,
    token: &SecretString,
    deadline: Instant,
) -> Result<Cached, VaultError> {
    let path = "auth/token/renew-self";
    let answer = client
        .send(
            Method::POST,
            path,
            Some(token),
            Some(&json_body(&serde_json::json!({}))),
            deadline,
        )
        .await?;
    let renewed: AuthAnswer = parse(&answer, path)?;
    tracing::debug!(
        ttl_seconds = renewed.auth.lease_duration,
        "renewed the Vault token"
    );
    Ok(renewed.auth.into_cached())
}

#[derive(Deserialize)]
struct AuthAnswer {
    auth: AuthData,
}

#[derive(Deserialize)]
struct AuthData {
    client_token: SecretString,
    #[serde(default)]
    lease_duration: u64,
    #[serde(default)]
    renewable: bool,
}

impl AuthData {
    fn into_cached(self) -> Cached {
        let now = Instant::now();
        let ttl = Duration::from_secs(self.lease_duration);
        let (renew_at, expires_at) = if self.lease_duration == 0 {
            (None, None)
        } else {
            (Some(now + ttl * 2 / 3), Some(now + ttl))
        };
        Cached {
            token: self.client_token,
            origin: Origin::Login {
                renew_at,
                expires_at,
                renewable: self.renewable,
            },
        }
    }
}

/// Parses a JSON answer; a body of another shape is Vault misbehaving (or not Vault).
pub fn parse<T: for<'de> Deserialize<'de>>(body: &[u8], path: &str) -> Result<T, VaultError> {
    serde_json::from_slice(body).map_err(|e| {
        VaultError::new(
            ErrorKind::Unavailable,
            format!("unexpected answer to {path} (is the address a Vault server?): {e}"),
        )
    })
}

/// Serializes a request body into a buffer wiped on drop.
pub fn json_body(value: &serde_json::Value) -> Zeroizing<Vec<u8>> {
    let mut bytes = Zeroizing::new(Vec::with_capacity(256));
    // Writing a Value to a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *bytes, value);
    bytes
}

fn stamp_of(path: &Path) -> std::io::Result<FileStamp> {
    let meta = std::fs::metadata(path)?;
    Ok(FileStamp {
        modified: meta.modified().ok(),
        len: meta.len(),
        inode: meta.ino(),
        device: meta.dev(),
    })
}

async fn read_token_file(path: &Path) -> Result<Cached, VaultError> {
    // The stamp is taken first: a write racing the read makes the next call read again.
    let stamp = stamp_of(path).map_err(|e| file_error(path, "token_file", &e))?;
    let token = read_secret_file(path, "token_file").await?;
    Ok(Cached {
        token,
        origin: Origin::File(stamp),
    })
}

/// Reads a small file holding one secret; surrounding whitespace is dropped.
async fn read_secret_file(path: &Path, field: &str) -> Result<SecretString, VaultError> {
    let meta = tokio::fs::metadata(path)
        .await
        .map_err(|e| file_error(path, field, &e))?;
    if meta.len() > MAX_SECRET_FILE {
        return Err(VaultError::new(
            ErrorKind::Misconfigured,
            format!(
                "{field} {} is {} bytes, too long for a token or id",
                path.display(),
                meta.len()
            ),
        ));
    }
    let bytes = Zeroizing::new(
        tokio::fs::read(path)
            .await
            .map_err(|e| file_error(path, field, &e))?,
    );
    let text = std::str::from_utf8(&bytes)
        .map_err(|_| {
            VaultError::new(
                ErrorKind::Misconfigured,
                format!("{field} {} is not UTF-8 text", path.display()),
            )
        })?
        .trim();
    if text.is_empty() {
        return Err(VaultError::new(
            ErrorKind::CredentialsRejected,
            format!("{field} {} is empty", path.display()),
        ));
    }
    Ok(SecretString::from(text))
}

fn file_error(path: &Path, field: &str, e: &std::io::Error) -> VaultError {
    VaultError::new(
        ErrorKind::Misconfigured,
        format!("cannot read {field} {}: {e}", path.display()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn secret_files_are_trimmed_and_empty_ones_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("token");
        std::fs::write(&path, "  s.abc\n").expect("write");
        let token = read_secret_file(&path, "token_file").await.expect("read");
        assert_eq!(token.expose_secret(), "s.abc");
        std::fs::write(&path, "\n").expect("write");
        let err = read_secret_file(&path, "token_file")
            .await
            .expect_err("empty");
        assert!(err.detail.contains("is empty"), "{err}");
        let err = read_secret_file(&dir.path().join("none"), "role_id_file")
            .await
            .expect_err("missing");
        assert!(err.detail.starts_with("cannot read role_id_file"), "{err}");
    }

    #[test]
    fn a_login_is_renewed_at_two_thirds_of_its_ttl() {
        let cached = AuthData {
            client_token: SecretString::from("t"),
            lease_duration: 300,
            renewable: true,
        }
        .into_cached();
        let Origin::Login {
            renew_at,
            expires_at,
            ..
        } = cached.origin
        else {
            panic!("a login");
        };
        let renew_at = renew_at.expect("expiring");
        let expires_at = expires_at.expect("expiring");
        assert_eq!(expires_at - renew_at, Duration::from_secs(100));
    }
}

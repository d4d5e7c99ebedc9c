//! The configured root keys with their roles, and what each has been doing: call
//! counters, health, the last Decrypt that used it. Every root call goes through here, so
//! the counters are exact whatever the provider.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::config::Role;
use crate::root::{KeyId, RootError, RootKey, WrapContext};
use crate::secret::Key256;

/// A configured root key.
pub struct Root {
    /// The `[keys.NAME]` entry.
    pub name: String,
    /// What it is used for.
    pub role: Role,
    key: Arc<dyn RootKey>,
    ctx: WrapContext,
    /// Counters and health, kept across reloads for the same key_id.
    pub stats: Arc<RootStats>,
}

/// Health of a root as seen from its last calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RootHealth {
    /// The last call succeeded (or none was made yet).
    Ok,
    /// The last call failed in a way that may pass (network, throttling).
    Degraded,
    /// The root refused (access denied, disabled key): needs an operator.
    Rejected,
}

impl RootHealth {
    /// The name `kms-plugin status` prints.
    pub fn as_str(self) -> &'static str {
        match self {
            RootHealth::Ok => "ok",
            RootHealth::Degraded => "degraded",
            RootHealth::Rejected => "rejected",
        }
    }
}

/// Counters of one root key.
#[derive(Default)]
pub struct RootStats {
    /// Wrap calls made to the root.
    pub wraps: AtomicU64,
    /// Unwrap calls made to the root.
    pub unwraps: AtomicU64,
    /// Calls that failed.
    pub failures: AtomicU64,
    /// Decrypt RPCs served under this key_id.
    pub decrypts: AtomicU64,
    /// Unix time of the last Decrypt under this key_id; 0 if none since start.
    pub last_decrypt_unix: AtomicI64,
    health: Mutex<(Option<RootHealth>, String)>,
}

impl RootStats {
    /// Current health and the last error message (empty when healthy).
    pub fn health(&self) -> (RootHealth, String) {
        let guard = self.health.lock().unwrap_or_else(PoisonError::into_inner);
        (guard.0.unwrap_or(RootHealth::Ok), guard.1.clone())
    }

    fn record<T>(&self, result: &Result<T, RootError>) {
        let update = match result {
            Ok(_) => (RootHealth::Ok, String::new()),
            // A blob that fails to authenticate says nothing about the root's health.
            Err(RootError::Authentication) => return,
            Err(e @ RootError::Unavailable(_)) => (RootHealth::Degraded, e.to_string()),
            Err(e) => (RootHealth::Rejected, e.to_string()),
        };
        if result.is_err() {
            self.failures.fetch_add(1, Ordering::Relaxed);
        }
        let mut guard = self.health.lock().unwrap_or_else(PoisonError::into_inner);
        *guard = (Some(update.0), update.1);
    }

    /// Records that a Decrypt was served under this key_id.
    pub fn note_decrypt(&self) {
        self.decrypts.fetch_add(1, Ordering::Relaxed);
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        self.last_decrypt_unix.store(now, Ordering::Relaxed);
    }
}

impl Root {
    /// Wraps an opened root key with its role.
    pub fn new(name: &str, role: Role, key: Arc<dyn RootKey>, stats: Arc<RootStats>) -> Self {
        let ctx = WrapContext::new(key.key_id());
        Self {
            name: name.to_string(),
            role,
            key,
            ctx,
            stats,
        }
    }

    /// The root's key_id.
    pub fn key_id(&self) -> &KeyId {
        self.key.key_id()
    }

    /// The provider name.
    pub fn provider(&self) -> &'static str {
        self.key.provider()
    }

    /// Wraps a local KEK, counting the call.
    pub async fn wrap(&self, kek: &Key256) -> Result<Vec<u8>, RootError> {
        self.stats.wraps.fetch_add(1, Ordering::Relaxed);
        let result = self.key.wrap(kek, &self.ctx).await;
        self.stats.record(&result);
        result
    }

    /// Unwraps a local KEK, counting the call.
    pub async fn unwrap(&self, wrapped: &[u8]) -> Result<Key256, RootError> {
        self.stats.unwraps.fetch_add(1, Ordering::Relaxed);
        let result = self.key.unwrap(wrapped, &self.ctx).await;
        self.stats.record(&result);
        result
    }

    /// A wrap + unwrap round trip of a throwaway key: proves the root works end to end.
    pub async fn probe(&self) -> Result<(), RootError> {
        let kek = Key256::generate();
        let wrapped = self.wrap(&kek).await?;
        let back = self.unwrap(&wrapped).await?;
        if back.expose() == kek.expose() {
            Ok(())
        } else {
            Err(RootError::Config(format!(
                "root key \"{}\" returned a different key on unwrap",
                self.name
            )))
        }
    }
}

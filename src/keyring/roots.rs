//! The configured root keys with their roles, and what each has been doing: call
//! counters, health, the last Decrypt that used it. Every root call goes through here, so
//! the counters are exact whatever the provider, and so does the rule that a wrapped copy
//! is trusted only once the same root has unwrapped it back to the same key.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use subtle::ConstantTimeEq;

use super::limit::UnwrapBudget;
use crate::config::{CacheConfig, Role};
use crate::metrics::RootOp;
use crate::root::{ErrorKind, HealthEffect, KeyId, RootError, RootKey, WrapContext};
use crate::secret::Key256;

/// A configured root key.
pub struct Root {
    /// The `[keys.NAME]` entry.
    pub name: String,
    /// What it is used for.
    pub role: Role,
    key: Arc<dyn RootKey>,
    ctx: WrapContext,
    /// Unwraps that Decrypt may ask of this root.
    budget: UnwrapBudget,
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
    /// Decrypt unwraps refused because the root's unwrap budget was spent.
    pub throttled: AtomicU64,
    health: Mutex<HealthState>,
}

#[derive(Default)]
struct HealthState {
    /// From the last call: `None` before any.
    last: Option<(RootHealth, String)>,
    /// Set when a wrapped copy did not round-trip; only a good round trip clears it, not
    /// an unrelated successful call.
    broken: Option<String>,
}

impl RootStats {
    /// Current health and the last error message (empty when healthy).
    pub fn health(&self) -> (RootHealth, String) {
        let guard = self.health.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(why) = &guard.broken {
            return (RootHealth::Rejected, why.clone());
        }
        guard
            .last
            .clone()
            .unwrap_or((RootHealth::Ok, String::new()))
    }

    /// Records the outcome of a call; logs once per change of state or reason.
    fn record<T>(&self, name: &str, result: &Result<T, RootError>) {
        let update = match result {
            Ok(_) => (RootHealth::Ok, String::new()),
            Err(e) => match e.kind().health_effect() {
                // A blob that fails to authenticate says nothing about the root's health.
                HealthEffect::None => return,
                HealthEffect::Degraded => (RootHealth::Degraded, e.to_string()),
                HealthEffect::Rejected => (RootHealth::Rejected, e.to_string()),
            },
        };
        if result.is_err() {
            self.failures.fetch_add(1, Ordering::Relaxed);
        }
        let mut guard = self.health.lock().unwrap_or_else(PoisonError::into_inner);
        // The first success is no news; every other change of state or reason is.
        let first_ok = guard.last.is_none() && update.0 == RootHealth::Ok;
        if guard.last.as_ref() != Some(&update) && !first_ok {
            log_change(name, &update);
        }
        guard.last = Some(update);
    }

    /// Marks the root broken (`Some`) or proven by a round trip (`None`).
    fn set_broken(&self, name: &str, why: Option<String>) {
        let mut guard = self.health.lock().unwrap_or_else(PoisonError::into_inner);
        if guard.broken != why {
            match &why {
                Some(why) => {
                    tracing::error!(root = name, error = %why, "root key is broken: no local KEK it wraps will be used");
                }
                None if guard.broken.is_some() => {
                    tracing::info!(root = name, "root key round trip works again");
                }
                None => {}
            }
        }
        guard.broken = why;
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

fn log_change(name: &str, (health, why): &(RootHealth, String)) {
    match health {
        RootHealth::Ok => tracing::info!(root = name, "root key calls succeed again"),
        RootHealth::Degraded => tracing::warn!(root = name, error = %why, "root key degraded"),
        RootHealth::Rejected => tracing::error!(root = name, error = %why, "root key rejected"),
    }
}

/// How many unwraps Decrypt may ask of one root: `burst` at once, then `per_second`.
#[derive(Debug, Clone, Copy)]
pub struct UnwrapRate {
    /// Sustained unwraps per second.
    pub per_second: u32,
    /// Unwraps allowed at once after a quiet period.
    pub burst: u32,
}

impl From<&CacheConfig> for UnwrapRate {
    fn from(cache: &CacheConfig) -> Self {
        Self {
            per_second: cache.unwraps_per_second,
            burst: cache.unwrap_burst,
        }
    }
}

impl Root {
    /// Wraps an opened root key with its role.
    pub fn new(
        name: &str,
        role: Role,
        key: Arc<dyn RootKey>,
        stats: Arc<RootStats>,
        rate: UnwrapRate,
    ) -> Self {
        let ctx = WrapContext::new(key.key_id());
        Self {
            name: name.to_string(),
            role,
            key,
            ctx,
            budget: UnwrapBudget::new(rate.per_second, rate.burst),
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

    /// Wraps a local KEK, counting and timing the call.
    pub async fn wrap(&self, kek: &Key256) -> Result<Vec<u8>, RootError> {
        self.stats.wraps.fetch_add(1, Ordering::Relaxed);
        let started = Instant::now();
        let result = self.key.wrap(kek, &self.ctx).await;
        self.observe(RootOp::Wrap, started, &result);
        result
    }

    /// Unwraps a local KEK, counting and timing the call.
    pub async fn unwrap(&self, wrapped: &[u8]) -> Result<Key256, RootError> {
        self.unwrap_under(&self.ctx, wrapped).await
    }

    /// Unwraps a copy bound to `ctx`: this root's own, or an older key_id's it answers to.
    async fn unwrap_under(&self, ctx: &WrapContext, wrapped: &[u8]) -> Result<Key256, RootError> {
        self.stats.unwraps.fetch_add(1, Ordering::Relaxed);
        let started = Instant::now();
        let result = self.key.unwrap(wrapped, ctx).await;
        self.observe(RootOp::Unwrap, started, &result);
        result
    }

    /// Health, latency and error kind of one finished root call.
    fn observe<T>(&self, op: RootOp, started: Instant, result: &Result<T, RootError>) {
        crate::metrics::observe_root_call(
            &self.name,
            self.key_id().as_str(),
            op,
            started.elapsed(),
            result.as_ref().err().map(|e| e.kind().metric_label()),
        );
        self.stats.record(&self.name, result);
    }

    /// Unwraps a copy that a Decrypt request carries, annotated with `key_id` (this root's,
    /// or an older one it still answers to), within this root's unwrap budget. `None` when
    /// the budget is spent: no root call was made.
    pub async fn unwrap_for_decrypt(
        &self,
        key_id: &KeyId,
        wrapped: &[u8],
    ) -> Option<Result<Key256, RootError>> {
        if !self.budget.take().await {
            self.stats.throttled.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        if key_id == self.key_id() {
            return Some(self.unwrap(wrapped).await);
        }
        // A copy made before the root's source rotated the key: bound to that key_id.
        Some(self.unwrap_under(&WrapContext::new(key_id), wrapped).await)
    }

    /// Whether copies annotated with `key_id` are this root's (see [`RootKey::answers_to`]).
    pub fn answers_to(&self, key_id: &str) -> bool {
        self.key_id().as_str() == key_id
            || KeyId::parse(key_id).is_some_and(|id| self.key.answers_to(&id))
    }

    /// Re-reads the root's source; true when it should be opened again (a new key_id).
    pub async fn refresh(&self) -> bool {
        match self.key.refresh().await {
            Ok(changed) => changed,
            // The probe that follows records the root's health.
            Err(e) => {
                tracing::debug!(root = %self.name, error = %e, "cannot refresh root key");
                false
            }
        }
    }

    /// Wraps a local KEK and has the same root unwrap the copy again, comparing in
    /// constant time: a copy is trusted only once it has been shown to open. A copy that
    /// does not (a token that replaced the IV, a KMS that answered garbage) marks the root
    /// broken, which fails Status until a round trip works again.
    pub async fn wrap_checked(&self, kek: &Key256) -> Result<Vec<u8>, RootError> {
        let wrapped = self.wrap(kek).await?;
        let why = match self.unwrap(&wrapped).await {
            Ok(back) if bool::from(back.expose_secret().ct_eq(kek.expose_secret())) => {
                self.stats.set_broken(&self.name, None);
                return Ok(wrapped);
            }
            Ok(_) => "unwraps to a different key",
            Err(e) if e.kind() == ErrorKind::NotAuthentic => {
                "does not unwrap (authentication failed)"
            }
            Err(e) => return Err(e),
        };
        let why = format!(
            "a copy it has just wrapped {why}; nothing it wraps can be trusted \
             (for PKCS#11: does the token replace the GCM IV or lack the mechanism?)"
        );
        self.stats.set_broken(&self.name, Some(why.clone()));
        Err(RootError::new(ErrorKind::Misconfigured, why))
    }

    /// A checked wrap + unwrap round trip of a throwaway key: proves the root works end to
    /// end.
    pub async fn probe(&self) -> Result<(), RootError> {
        self.wrap_checked(&Key256::generate()).await.map(drop)
    }
}

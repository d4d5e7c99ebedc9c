//! An in-memory root key for unit tests (`#[cfg(test)]` only: never in a release binary
//! nor in the config): the file root's AES-256-GCM under a random key that never touches
//! a disk, a switch that makes every call fail with a chosen [`ErrorKind`], and call
//! counters.

use std::sync::Mutex;
use std::sync::PoisonError;
use std::sync::atomic::{AtomicU64, Ordering};

use super::file::FileRoot;
use super::{BoxFuture, ErrorKind, KeyId, RootError, RootKey, WrapContext};
use crate::secret::Key256;

/// A root key that lives only in this process.
pub struct MemoryRoot {
    inner: FileRoot,
    fail: Mutex<Option<ErrorKind>>,
    /// Wrap calls made (failed ones included).
    pub wraps: AtomicU64,
    /// Unwrap calls made (failed ones included).
    pub unwraps: AtomicU64,
}

impl MemoryRoot {
    /// A root with a fresh random key (so a distinct key_id).
    pub fn new() -> Self {
        Self {
            inner: FileRoot::from_key(&Key256::generate()),
            fail: Mutex::new(None),
            wraps: AtomicU64::new(0),
            unwraps: AtomicU64::new(0),
        }
    }

    /// From now on every call fails with `kind` (`None`: calls work again).
    pub fn fail_with(&self, kind: Option<ErrorKind>) {
        *self.fail.lock().unwrap_or_else(PoisonError::into_inner) = kind;
    }

    fn check(&self) -> Result<(), RootError> {
        match *self.fail.lock().unwrap_or_else(PoisonError::into_inner) {
            Some(kind) => Err(RootError::new(kind, "memory root told to fail")),
            None => Ok(()),
        }
    }
}

impl Default for MemoryRoot {
    fn default() -> Self {
        Self::new()
    }
}

impl RootKey for MemoryRoot {
    fn provider(&self) -> &'static str {
        "memory"
    }

    fn key_id(&self) -> &KeyId {
        self.inner.key_id()
    }

    fn wrap<'a>(
        &'a self,
        kek: &'a Key256,
        ctx: &'a WrapContext,
    ) -> BoxFuture<'a, Result<Vec<u8>, RootError>> {
        self.wraps.fetch_add(1, Ordering::Relaxed);
        Box::pin(async move {
            self.check()?;
            self.inner.wrap(kek, ctx).await
        })
    }

    fn unwrap<'a>(
        &'a self,
        wrapped: &'a [u8],
        ctx: &'a WrapContext,
    ) -> BoxFuture<'a, Result<Key256, RootError>> {
        self.unwraps.fetch_add(1, Ordering::Relaxed);
        Box::pin(async move {
            // Like a remote call, let other tasks run meanwhile (single flight is tested so).
            tokio::task::yield_now().await;
            self.check()?;
            self.inner.unwrap(wrapped, ctx).await
        })
    }
}

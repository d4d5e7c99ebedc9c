//! An in-memory root key for unit tests (`#[cfg(test)]` only: never in a release binary
//! nor in the config): the file root's AES-256-GCM under a random key that never touches
//! a disk, a switch that makes every call fail with a chosen [`ErrorKind`], one that
//! corrupts the copies it wraps, call counters, and versions (as a Vault Transit key has):
//! a successor with the same key under a new key_id that still answers to the old one.

use std::sync::Mutex;
use std::sync::PoisonError;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use super::file::FileRoot;
use super::{BoxFuture, ErrorKind, KeyId, RootError, RootKey, WrapContext};
use crate::secret::Key256;

/// A root key that lives only in this process.
pub struct MemoryRoot {
    inner: FileRoot,
    key: Key256,
    key_id: KeyId,
    /// key_ids of earlier versions, which this root still unwraps for.
    older: Vec<KeyId>,
    /// What the next `refresh` reports: the source rotated the key.
    rotated: AtomicBool,
    fail: Mutex<Option<ErrorKind>>,
    corrupt: AtomicBool,
    /// Wrap calls made (failed ones included).
    pub wraps: AtomicU64,
    /// Unwrap calls made (failed ones included).
    pub unwraps: AtomicU64,
}

impl MemoryRoot {
    /// A root with a fresh random key (so a distinct key_id).
    pub fn new() -> Self {
        let key = Key256::generate();
        let inner = FileRoot::from_key(&key);
        let key_id = inner.key_id().clone();
        Self::versioned(inner, key, key_id, Vec::new())
    }

    fn versioned(inner: FileRoot, key: Key256, key_id: KeyId, older: Vec<KeyId>) -> Self {
        Self {
            inner,
            key,
            key_id,
            older,
            rotated: AtomicBool::new(false),
            fail: Mutex::new(None),
            corrupt: AtomicBool::new(false),
            wraps: AtomicU64::new(0),
            unwraps: AtomicU64::new(0),
        }
    }

    /// From now on `refresh` reports that the key was rotated at its source.
    pub fn mark_rotated(&self) {
        self.rotated.store(true, Ordering::SeqCst);
    }

    /// The root as opened again after a rotation at its source: the same key (so old
    /// copies open), a new key_id, answering to this one's key_ids too.
    pub fn next_version(&self) -> Self {
        let key = Key256::from_slice(self.key.expose_secret()).expect("32 bytes");
        let inner = FileRoot::from_key(&key);
        let mut older = self.older.clone();
        older.push(self.key_id.clone());
        let key_id = KeyId::derive("memory", format!("{} next", self.key_id).as_bytes());
        Self::versioned(inner, key, key_id, older)
    }

    /// From now on every call fails with `kind` (`None`: calls work again).
    pub fn fail_with(&self, kind: Option<ErrorKind>) {
        *self.fail.lock().unwrap_or_else(PoisonError::into_inner) = kind;
    }

    /// While on, wraps return a copy with one bit flipped, as a token that replaced the
    /// GCM IV would: a copy that does not unwrap.
    pub fn corrupt_wraps(&self, on: bool) {
        self.corrupt.store(on, Ordering::SeqCst);
    }

    fn check(&self) -> Result<(), RootError> {
        match *self.fail.lock().unwrap_or_else(PoisonError::into_inner) {
            Some(kind) => Err(RootError::new(
                kind,
                format!("memory root: {} (injected)", kind.metric_label()),
            )),
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
        &self.key_id
    }

    fn refresh(&self) -> BoxFuture<'_, Result<bool, RootError>> {
        Box::pin(async move {
            self.check()?;
            Ok(self.rotated.load(Ordering::SeqCst))
        })
    }

    fn answers_to(&self, key_id: &KeyId) -> bool {
        key_id == &self.key_id || self.older.contains(key_id)
    }

    fn wrap<'a>(
        &'a self,
        kek: &'a Key256,
        ctx: &'a WrapContext,
    ) -> BoxFuture<'a, Result<Vec<u8>, RootError>> {
        self.wraps.fetch_add(1, Ordering::Relaxed);
        Box::pin(async move {
            self.check()?;
            let mut wrapped = self.inner.wrap(kek, ctx).await?;
            if self.corrupt.load(Ordering::SeqCst)
                && let Some(first) = wrapped.first_mut()
            {
                *first ^= 1;
            }
            Ok(wrapped)
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

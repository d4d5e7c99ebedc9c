//! An in-memory root key for unit tests (`#[cfg(test)]` only: never in a release binary
//! nor in the config). AES-256-GCM under a random key like the file root, plus a switch
//! that makes every call fail with a chosen [`ErrorKind`], and call counters.

use std::sync::Mutex;
use std::sync::PoisonError;
use std::sync::atomic::{AtomicU64, Ordering};

use aes_gcm::aead::{Aead, Payload};
use aes_gcm::{AeadCore, Aes256Gcm, KeyInit, Nonce};
use rand::RngCore;
use rand::rngs::OsRng;
use zeroize::Zeroizing;

use super::{BoxFuture, ErrorKind, KeyId, RootError, RootKey, WrapContext};
use crate::secret::{KEY_LEN, Key256};

const NONCE_LEN: usize = 12;

/// A root key that lives only in this process.
pub struct MemoryRoot {
    cipher: Aes256Gcm,
    key_id: KeyId,
    fail: Mutex<Option<ErrorKind>>,
    /// Wrap calls made (failed ones included).
    pub wraps: AtomicU64,
    /// Unwrap calls made (failed ones included).
    pub unwraps: AtomicU64,
}

impl MemoryRoot {
    /// A root with a fresh random key and key_id.
    pub fn new() -> Self {
        let key = Key256::generate();
        let mut id = [0u8; 16];
        OsRng.fill_bytes(&mut id);
        Self {
            cipher: Aes256Gcm::new(key.expose_secret().into()),
            key_id: KeyId::derive("memory", &id),
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
        &self.key_id
    }

    fn wrap<'a>(
        &'a self,
        kek: &'a Key256,
        ctx: &'a WrapContext,
    ) -> BoxFuture<'a, Result<Vec<u8>, RootError>> {
        Box::pin(async move {
            self.wraps.fetch_add(1, Ordering::Relaxed);
            self.check()?;
            let nonce = Aes256Gcm::generate_nonce(&mut OsRng);
            let aad = ctx.aad();
            let body = self
                .cipher
                .encrypt(
                    &nonce,
                    Payload {
                        msg: kek.expose_secret(),
                        aad: &aad,
                    },
                )
                .map_err(|_| RootError::new(ErrorKind::Misconfigured, "AES-GCM wrap failed"))?;
            Ok([nonce.as_slice(), &body].concat())
        })
    }

    fn unwrap<'a>(
        &'a self,
        wrapped: &'a [u8],
        ctx: &'a WrapContext,
    ) -> BoxFuture<'a, Result<Key256, RootError>> {
        Box::pin(async move {
            self.unwraps.fetch_add(1, Ordering::Relaxed);
            self.check()?;
            let not_authentic = || RootError::bare(ErrorKind::NotAuthentic);
            if wrapped.len() != NONCE_LEN + KEY_LEN + 16 {
                return Err(not_authentic());
            }
            let (nonce, body) = wrapped.split_at(NONCE_LEN);
            let aad = ctx.aad();
            let plain = Zeroizing::new(
                self.cipher
                    .decrypt(
                        Nonce::from_slice(nonce),
                        Payload {
                            msg: body,
                            aad: &aad,
                        },
                    )
                    .map_err(|_| not_authentic())?,
            );
            Key256::from_slice(&plain).ok_or_else(not_authentic)
        })
    }
}

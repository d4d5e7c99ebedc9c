//! Root keys: the key-encryption keys that live outside the plugin (a file, an HSM, a
//! cloud KMS) and wrap the plugin's local KEKs. Everything else sees only the [`RootKey`]
//! trait, [`RootError`] and its [`ErrorKind`].
//!
//! One folder per provider (`file/`, `pkcs11/`, `aws_kms/`, `vault_transit/`), each with its `config.rs`
//! (the `[keys.NAME]` fields, parsed into a validated `Config`), its root type and the
//! classification of its own errors. Each `Config` implements [`Provider`]; [`provider`]
//! is the one place that lists them. Adding a provider: a folder, a variant of
//! [`KeyConfig`], and a line in [`provider`]. A provider whose Cargo feature is left out
//! still parses, and fails to open with "not in this build".

pub mod aws_kms;
pub mod error;
pub mod file;
mod gcm;
#[cfg(test)]
pub mod memory;
pub mod pkcs11;
pub mod validated;
pub mod vault_transit;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

pub use error::{ErrorKind, HealthEffect, RootError};

use crate::config::KeyConfig;
use crate::envelope::annotations::is_label;
use crate::envelope::fingerprint;
use crate::secret::Key256;

/// A boxed future, so that root keys can be trait objects.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A root key as the rest of the plugin sees it. Calls are rare (one wrap per local KEK,
/// one unwrap per distinct local KEK after a start), so they may be slow and remote.
pub trait RootKey: Send + Sync {
    /// The provider name, as in the config file (`file`, `pkcs11`, `aws-kms`,
    /// `vault-transit`).
    fn provider(&self) -> &'static str;

    /// The stable, public identity of this root: the Status key_id while it is active.
    fn key_id(&self) -> &KeyId;

    /// Wraps a local KEK. The result must unwrap only with the same `ctx`.
    fn wrap<'a>(
        &'a self,
        kek: &'a Key256,
        ctx: &'a WrapContext,
    ) -> BoxFuture<'a, Result<Vec<u8>, RootError>>;

    /// Unwraps what [`RootKey::wrap`] returned under the same `ctx`.
    fn unwrap<'a>(
        &'a self,
        wrapped: &'a [u8],
        ctx: &'a WrapContext,
    ) -> BoxFuture<'a, Result<Key256, RootError>>;

    /// Re-reads, at each periodic root check, what this root's key_id depends on at its
    /// source (a Vault Transit key's versions). `Ok(true)` when the root, opened now, would
    /// have another key_id (the key was rotated there): the plugin then opens it again.
    /// Roots whose key_id cannot change keep this default.
    fn refresh(&self) -> BoxFuture<'_, Result<bool, RootError>> {
        Box::pin(async { Ok(false) })
    }

    /// Whether copies wrapped under `key_id` are this root's to unwrap: its own key_id, or
    /// one it had before its source rotated the key (older Transit key versions).
    fn answers_to(&self, key_id: &KeyId) -> bool {
        key_id == self.key_id()
    }
}

/// A local KEK from what an unwrap decrypted: anything but 32 bytes means the blob was not
/// one of ours.
pub(crate) fn unwrapped_key(plain: &[u8]) -> Result<Key256, RootError> {
    Key256::from_slice(plain).ok_or_else(|| RootError::bare(ErrorKind::NotAuthentic))
}

/// What a wrapped local KEK is bound to: this plugin's purpose and the root's key_id.
/// GCM-based providers use [`WrapContext::aad`]; AWS KMS sends [`WrapContext::pairs`] as
/// its EncryptionContext.
#[derive(Debug, Clone)]
pub struct WrapContext {
    key_id: KeyId,
}

impl WrapContext {
    /// The purpose every wrapped local KEK is bound to.
    pub const PURPOSE: &'static str = "kms-plugin-local-kek-v1";

    /// The context for wrapping under the root with `key_id`.
    pub fn new(key_id: &KeyId) -> Self {
        Self {
            key_id: key_id.clone(),
        }
    }

    /// The key_id the wrapped copy is bound to.
    pub fn key_id(&self) -> &KeyId {
        &self.key_id
    }

    /// Associated data for providers that wrap with an AEAD.
    pub fn aad(&self) -> Vec<u8> {
        let mut aad = Vec::with_capacity(Self::PURPOSE.len() + 1 + self.key_id.0.len());
        aad.extend_from_slice(Self::PURPOSE.as_bytes());
        aad.push(0);
        aad.extend_from_slice(self.key_id.0.as_bytes());
        aad
    }

    /// Key/value pairs for providers that take an encryption context.
    pub fn pairs(&self) -> [(&'static str, &str); 2] {
        [
            ("kms-plugin/purpose", Self::PURPOSE),
            ("kms-plugin/key-id", self.key_id.as_str()),
        ]
    }
}

/// A root key's public identity: `<provider>-<32 hex digits>`, a DNS label so that it can
/// name the annotation that carries the copy it wrapped.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyId(String);

impl KeyId {
    /// Derives a key_id from a provider's identity material (a check value, an ARN):
    /// a hash, so nothing private shows and distinct identities get distinct ids.
    pub fn derive(provider_tag: &str, identity: &[u8]) -> Self {
        let hash = fingerprint(b"kms-plugin key_id v1", [provider_tag.as_bytes(), identity]);
        Self(format!("{provider_tag}-{}", hex::encode(&hash[..16])))
    }

    /// Accepts a key_id string from a request only if it has the shape this plugin emits.
    pub fn parse(text: &str) -> Option<Self> {
        is_label(text).then(|| Self(text.to_string()))
    }

    /// The wire string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for KeyId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// What every provider's config offers: its name and how to open or create its root.
pub trait Provider: Send + Sync {
    /// The provider name, as in `provider = "..."`.
    fn name(&self) -> &'static str;

    /// Opens the root key. Fails with a message naming what is wrong (missing,
    /// unreadable, wrong permissions, rejected, not in this build).
    fn open(&self) -> BoxFuture<'_, Result<Arc<dyn RootKey>, RootError>>;

    /// Creates the key if it does not exist yet (`kms-plugin keygen`); returns whether it
    /// created one.
    fn create(&self) -> BoxFuture<'_, Result<bool, RootError>>;
}

/// Implements [`Provider`] for the `Config` of a provider behind a Cargo feature: its
/// root type's `open(&Config)` and `create(&Config)` when the feature is in the build, a
/// "not in this build" error when it is not (the config still parses).
macro_rules! feature_gated_provider {
    ($config:ty, $name:literal, $feature:literal, $root:ident) => {
        impl $crate::root::Provider for $config {
            fn name(&self) -> &'static str {
                $name
            }

            fn open(
                &self,
            ) -> $crate::root::BoxFuture<
                '_,
                Result<std::sync::Arc<dyn $crate::root::RootKey>, $crate::root::RootError>,
            > {
                #[cfg(feature = $feature)]
                return Box::pin(async move {
                    let root = $root::open(self).await?;
                    Ok(std::sync::Arc::new(root) as std::sync::Arc<dyn $crate::root::RootKey>)
                });
                #[cfg(not(feature = $feature))]
                Box::pin(async move { Err($crate::root::not_built($name)) })
            }

            fn create(&self) -> $crate::root::BoxFuture<'_, Result<bool, $crate::root::RootError>> {
                #[cfg(feature = $feature)]
                return Box::pin($root::create(self));
                #[cfg(not(feature = $feature))]
                Box::pin(async move { Err($crate::root::not_built($name)) })
            }
        }
    };
}
use feature_gated_provider;

/// The provider behind a `[keys.NAME]` entry: the one dispatch over [`KeyConfig`].
pub fn provider(config: &KeyConfig) -> &dyn Provider {
    match config {
        KeyConfig::File(c) => c,
        KeyConfig::Pkcs11(c) => c,
        KeyConfig::AwsKms(c) => c,
        KeyConfig::VaultTransit(c) => c,
    }
}

/// Opens the root key a `[keys.NAME]` entry describes.
pub async fn open(name: &str, config: &KeyConfig) -> Result<Arc<dyn RootKey>, RootError> {
    let opened = provider(config).open().await?;
    tracing::debug!(key = name, provider = opened.provider(), key_id = %opened.key_id(), "opened root key");
    Ok(opened)
}

/// Creates the key a `[keys.NAME]` entry describes if it does not exist yet
/// (`kms-plugin keygen`). Returns whether it created one.
pub async fn create(config: &KeyConfig) -> Result<bool, RootError> {
    provider(config).create().await
}

/// The error for a provider whose Cargo feature was left out of this build.
#[cfg_attr(all(feature = "aws-kms", feature = "pkcs11"), allow(dead_code))]
fn not_built(provider: &str) -> RootError {
    RootError::new(
        ErrorKind::Misconfigured,
        format!(
            "provider \"{provider}\" is not in this build of kms-plugin (rebuild with --features {provider})"
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_ids_are_labels_and_distinct() {
        let a = KeyId::derive("file", b"one");
        let b = KeyId::derive("file", b"two");
        let c = KeyId::derive("aws", b"one");
        assert_ne!(a, b);
        assert_ne!(a, c);
        assert!(a.as_str().starts_with("file-"));
        assert_eq!(a.as_str().len(), "file-".len() + 32);
        assert_eq!(KeyId::parse(a.as_str()), Some(a.clone()));
        assert_eq!(KeyId::derive("file", b"one"), a);
    }

    #[test]
    fn parse_rejects_foreign_shapes() {
        for bad in ["", "UPPER", "a/b", "x.y", &"a".repeat(64)] {
            assert!(KeyId::parse(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn a_provider_left_out_of_the_build_says_how_to_get_it() {
        let e = not_built("aws-kms");
        assert_eq!(e.kind(), ErrorKind::Misconfigured);
        assert!(
            e.to_string().contains(
                "\"aws-kms\" is not in this build of kms-plugin (rebuild with --features aws-kms)"
            ),
            "{e}"
        );
    }

    #[test]
    fn context_binds_key_id() {
        let a = WrapContext::new(&KeyId::derive("file", b"a"));
        let b = WrapContext::new(&KeyId::derive("file", b"b"));
        assert_ne!(a.aad(), b.aad());
        assert_eq!(a.pairs()[0].1, WrapContext::PURPOSE);
    }
}

//! The three Transit calls the plugin makes: read the key's metadata, encrypt and decrypt
//! (always with associated data).

use std::collections::BTreeMap;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use http::Method;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use zeroize::Zeroizing;

use super::auth::{json_body, parse};
use super::client::VaultError;
use super::session::Session;
use crate::root::ErrorKind;
use crate::secret::Key256;

/// Transit key types that take `associated_data` (AEADs).
pub const AEAD_TYPES: &[&str] = &[
    "aes128-gcm96",
    "aes256-gcm96",
    "chacha20-poly1305",
    "xchacha20-poly1305",
];

/// What `GET {mount}/keys/{key}` says, as far as the plugin cares.
#[derive(Debug, Clone, Deserialize)]
pub struct KeyMeta {
    /// Key type, e.g. `aes256-gcm96`.
    #[serde(rename = "type")]
    pub key_type: String,
    /// Whether encryption needs a derivation context.
    #[serde(default)]
    pub derived: bool,
    /// Encrypt allowed.
    #[serde(default)]
    pub supports_encryption: bool,
    /// Decrypt allowed.
    #[serde(default)]
    pub supports_decryption: bool,
    /// Newest version: what new local KEKs are wrapped under.
    pub latest_version: u32,
    /// Oldest version Vault still decrypts.
    #[serde(default)]
    pub min_decryption_version: u32,
    /// OpenBao: a soft-deleted key refuses use until restored.
    #[serde(default)]
    pub soft_deleted: bool,
    /// Version number → its creation time (Unix seconds for symmetric keys; an object
    /// holding it for other types).
    #[serde(default)]
    pub keys: BTreeMap<String, serde_json::Value>,
}

impl KeyMeta {
    /// The creation identity of `version`: how a deleted and re-created key of the same
    /// name is told apart. `None` when Vault no longer lists the version.
    pub fn created(&self, version: u32) -> Option<String> {
        self.keys.get(&version.to_string()).map(|v| match v {
            serde_json::Value::Object(o) => o
                .get("creation_time")
                .map(std::string::ToString::to_string)
                .unwrap_or_else(|| v.to_string()),
            other => other.to_string(),
        })
    }

    /// The versions Vault lists (not trimmed), oldest first. Those below
    /// `min_decryption_version` are kept too, so that Vault's refusal names the key.
    pub fn listed(&self) -> Vec<u32> {
        let mut versions: Vec<u32> = self.keys.keys().filter_map(|v| v.parse().ok()).collect();
        versions.sort_unstable();
        versions
    }

    /// Refuses a key the plugin cannot use safely; the message names the key and why.
    pub fn check_usable(&self, key: &str) -> Result<(), VaultError> {
        if !AEAD_TYPES.contains(&self.key_type.as_str()) {
            return Err(VaultError::new(
                ErrorKind::Misconfigured,
                format!(
                    "Transit key \"{key}\" is of type {}, which cannot bind associated data; \
                     create a key of type {} (aes256-gcm96 is Transit's default)",
                    self.key_type,
                    AEAD_TYPES.join(", ")
                ),
            ));
        }
        if self.derived {
            return Err(VaultError::new(
                ErrorKind::Misconfigured,
                format!(
                    "Transit key \"{key}\" is derived (needs a context per call); create one with derived=false"
                ),
            ));
        }
        if self.soft_deleted {
            return Err(VaultError::new(
                ErrorKind::KeyDisabled,
                format!(
                    "Transit key \"{key}\" is soft-deleted; restore it or configure another key"
                ),
            ));
        }
        if !(self.supports_encryption && self.supports_decryption) {
            return Err(VaultError::new(
                ErrorKind::Misconfigured,
                format!("Transit key \"{key}\" does not support both encryption and decryption"),
            ));
        }
        if self.created(self.latest_version).is_none() {
            return Err(VaultError::new(
                ErrorKind::Unavailable,
                format!(
                    "Vault lists no creation time for version {} of Transit key \"{key}\"",
                    self.latest_version
                ),
            ));
        }
        Ok(())
    }
}

#[derive(Deserialize)]
struct Answer<T> {
    data: T,
}

#[derive(Deserialize)]
struct Encrypted {
    ciphertext: String,
    #[serde(default)]
    key_version: Option<u32>,
}

#[derive(Deserialize)]
struct Decrypted {
    plaintext: SecretString,
}

/// Reads the key's metadata.
pub async fn read_key(session: &Session, mount: &str, key: &str) -> Result<KeyMeta, VaultError> {
    let path = format!("{mount}/keys/{key}");
    let body = session.call(Method::GET, &path, None).await?;
    let answer: Answer<KeyMeta> = parse(&body, &path)?;
    Ok(answer.data)
}

/// Encrypts `kek` under `version` of the key with `aad`; returns Vault's `vault:vN:...`.
pub async fn encrypt(
    session: &Session,
    mount: &str,
    key: &str,
    version: u32,
    kek: &Key256,
    aad: &[u8],
) -> Result<String, VaultError> {
    let path = format!("{mount}/encrypt/{key}");
    let plaintext = Zeroizing::new(STANDARD.encode(kek.expose_secret()));
    let body = json_body(&serde_json::json!({
        "plaintext": plaintext.as_str(),
        "associated_data": STANDARD.encode(aad),
        // Pinned: a rotation between reading the metadata and this call must not put the
        // copy under a version other than the key_id it is bound to.
        "key_version": version,
    }));
    let answer = session.call(Method::POST, &path, Some(&body)).await?;
    let out: Answer<Encrypted> = parse(&answer, &path)?;
    if out.data.key_version.is_some_and(|v| v != version)
        || version_of(&out.data.ciphertext) != Some(version)
    {
        return Err(VaultError::new(
            ErrorKind::Unavailable,
            format!(
                "Vault encrypted under another version of \"{key}\" than the requested {version}"
            ),
        ));
    }
    Ok(out.data.ciphertext)
}

/// Decrypts a `vault:vN:...` ciphertext with `aad` into a 32-byte key.
pub async fn decrypt(
    session: &Session,
    mount: &str,
    key: &str,
    ciphertext: &str,
    aad: &[u8],
) -> Result<Key256, VaultError> {
    let path = format!("{mount}/decrypt/{key}");
    let body = json_body(&serde_json::json!({
        "ciphertext": ciphertext,
        "associated_data": STANDARD.encode(aad),
    }));
    let answer = session.call(Method::POST, &path, Some(&body)).await?;
    let out: Answer<Decrypted> = parse(&answer, &path)?;
    let plain = Zeroizing::new(
        STANDARD
            .decode(out.data.plaintext.expose_secret())
            .map_err(|_| {
                VaultError::new(ErrorKind::NotAuthentic, "Vault's plaintext is not base64")
            })?,
    );
    Key256::from_slice(&plain).ok_or_else(|| {
        VaultError::new(ErrorKind::NotAuthentic, "the unwrapped key is not 32 bytes")
    })
}

/// The key version a `vault:vN:...` ciphertext names.
pub fn version_of(ciphertext: &str) -> Option<u32> {
    let rest = ciphertext.strip_prefix("vault:v")?;
    let (version, body) = rest.split_once(':')?;
    if body.is_empty() || version.starts_with('0') {
        return None;
    }
    version.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ciphertext_versions_are_parsed_strictly() {
        assert_eq!(version_of("vault:v1:abc"), Some(1));
        assert_eq!(version_of("vault:v12:abc"), Some(12));
        for bad in [
            "vault:v:abc",
            "vault:v01:abc",
            "vault:v1:",
            "vault:vx:a",
            "v1:abc",
            "",
        ] {
            assert_eq!(version_of(bad), None, "{bad}");
        }
    }

    fn meta(json: serde_json::Value) -> KeyMeta {
        serde_json::from_value(json).expect("metadata")
    }

    #[test]
    fn unusable_keys_are_refused_by_name() {
        let good = serde_json::json!({
            "type": "aes256-gcm96", "derived": false, "supports_encryption": true,
            "supports_decryption": true, "latest_version": 2, "min_decryption_version": 1,
            "keys": {"1": 1700000000, "2": 1700000100}
        });
        meta(good.clone()).check_usable("k").expect("usable");
        assert_eq!(meta(good.clone()).listed(), [1, 2]);
        let with = |field: &str, value: serde_json::Value| {
            let mut m = good.clone();
            m[field] = value;
            meta(m).check_usable("k").expect_err(field).detail
        };
        let e = with("type", "rsa-2048".into());
        assert!(
            e.contains("\"k\" is of type rsa-2048") && e.contains("aes256-gcm96"),
            "{e}"
        );
        assert!(with("derived", true.into()).contains("derived"));
        assert!(with("soft_deleted", true.into()).contains("soft-deleted"));
        assert!(with("supports_encryption", false.into()).contains("encryption"));
    }
}

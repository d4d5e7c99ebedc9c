//! `[keys.NAME]` with `provider = "pkcs11"`: where the token, the key and the PIN are.

use std::path::PathBuf;

use serde::Deserialize;

use crate::root::validated::{Check, Validated};

/// `provider = "pkcs11"` as written in the config file. Holds where the PIN is, never the
/// PIN itself. Parsed into [`Config`], which is what the rest of the plugin uses.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fields {
    /// Path of the PKCS#11 module (shared library), e.g. `/usr/lib/softhsm/libsofthsm2.so`.
    pub module: PathBuf,
    /// Label of the token holding the key (or give `slot`).
    #[serde(default)]
    pub token_label: Option<String>,
    /// Slot number of the token (or give `token_label`).
    #[serde(default)]
    pub slot: Option<u64>,
    /// CKA_LABEL of the AES key (rsa-oaep: of both halves of the RSA key pair).
    pub key_label: String,
    /// CKA_ID of the key (or pair), in hex, to tell apart keys sharing a label.
    #[serde(default)]
    pub key_id_hex: Option<String>,
    /// File holding the user PIN (a trailing newline is ignored).
    #[serde(default)]
    pub pin_file: Option<PathBuf>,
    /// Name of the environment variable holding the user PIN.
    #[serde(default)]
    pub pin_env: Option<String>,
    /// Accept a key that is extractable or not sensitive (not recommended).
    #[serde(default)]
    pub allow_extractable: bool,
    /// Most milliseconds one wrap or unwrap may take, waiting for a free session included;
    /// a hung token then fails the call as unavailable instead of holding it forever.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// How local KEKs are wrapped: with an AES-256 key (`aes-gcm`), or with an RSA key pair
    /// (`rsa-oaep`: a TPM's tpm2-pkcs11, smart-card HSMs), see `root::pkcs11::rsa_oaep`.
    #[serde(default)]
    pub mechanism: Mechanism,
    /// rsa-oaep: the OAEP hash (and MGF1 hash) used for new wraps.
    #[serde(default)]
    pub oaep_hash: OaepHash,
    /// rsa-oaep: modulus size `kms-plugin keygen` generates (2048 to 4096).
    #[serde(default = "default_rsa_bits")]
    pub rsa_bits: u32,
}

/// `mechanism` of a pkcs11 key.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mechanism {
    /// CKM_AES_GCM with an AES-256 secret key.
    #[default]
    AesGcm,
    /// CKM_RSA_PKCS_OAEP with an RSA private key (2048 bits or more).
    RsaOaep,
}

/// `oaep_hash` of an rsa-oaep key. SHA-1 only for tokens that cannot do better (SoftHSM2
/// 2.6): OAEP's security does not rest on the hash's collision resistance.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OaepHash {
    /// SHA-256 for OAEP and MGF1.
    #[default]
    Sha256,
    /// SHA-1 for OAEP and MGF1.
    Sha1,
}

fn default_timeout_ms() -> u64 {
    2500
}

fn default_rsa_bits() -> u32 {
    3072
}

/// A validated `provider = "pkcs11"` entry: exactly one token selector, exactly one PIN
/// source, a key label, a hex CKA_ID if any, a timeout in range.
pub type Config = Validated<Fields>;

impl Check for Fields {
    fn check(&self) -> Result<(), String> {
        if self.token_label.is_some() == self.slot.is_some() {
            return Err("a pkcs11 key needs exactly one of token_label and slot".into());
        }
        if self.pin_file.is_some() == self.pin_env.is_some() {
            return Err(
                "a pkcs11 key needs exactly one of pin_file and pin_env (never a PIN literal)"
                    .into(),
            );
        }
        if self.key_label.is_empty() {
            return Err("a pkcs11 key needs a non-empty key_label".into());
        }
        if let Some(id) = &self.key_id_hex
            && (id.is_empty() || hex::decode(id).is_err())
        {
            return Err(format!("key_id_hex \"{id}\" is not a non-empty hex string"));
        }
        if !(1..60_000).contains(&self.timeout_ms) {
            return Err(format!(
                "timeout_ms = {} is out of range: give 1 to 59999 milliseconds (default 2500)",
                self.timeout_ms
            ));
        }
        if !(2048..=4096).contains(&self.rsa_bits) {
            return Err(format!(
                "rsa_bits = {} is out of range: give 2048 to 4096 (default 3072)",
                self.rsa_bits
            ));
        }
        Ok(())
    }
}

impl Config {
    /// The token as named in messages.
    pub fn token_name(&self) -> String {
        match (&self.token_label, self.slot) {
            (Some(label), _) => format!("token \"{label}\""),
            (None, Some(slot)) => format!("the token in slot {slot}"),
            (None, None) => "the token".into(),
        }
    }

    /// The key's CKA_ID, if the entry names one.
    pub fn key_cka_id(&self) -> Option<Vec<u8>> {
        self.key_id_hex.as_deref().and_then(|h| hex::decode(h).ok())
    }
}

#[cfg(test)]
mod tests {
    use crate::config::KeyConfig;
    use crate::config::test_support::{error_of, key_entry};

    const PKCS11: &str = r#"
        [kek]
        active = "hsm"
        [keys.hsm]
        provider = "pkcs11"
        module = "/usr/lib/softhsm/libsofthsm2.so"
        token_label = "kms"
        key_label = "root"
        pin_file = "/etc/kms-plugin/pin"
    "#;

    fn pkcs11(text: &str) -> super::Config {
        let KeyConfig::Pkcs11(p) = key_entry(text, "hsm") else {
            panic!("not pkcs11")
        };
        p
    }

    #[test]
    fn pkcs11_config_parses_and_validates() {
        let p = pkcs11(PKCS11);
        assert_eq!(p.token_label.as_deref(), Some("kms"));
        assert!(!p.allow_extractable);
        assert_eq!(p.timeout_ms, 2500);
        assert_eq!(p.mechanism, super::Mechanism::AesGcm);
        assert_eq!(p.oaep_hash, super::OaepHash::Sha256);
        assert_eq!(p.rsa_bits, 3072);
        let rsa = pkcs11(&PKCS11.replace(
            "key_label",
            "mechanism = \"rsa-oaep\"\noaep_hash = \"sha1\"\nrsa_bits = 2048\nkey_label",
        ));
        assert_eq!(
            (rsa.mechanism, rsa.oaep_hash, rsa.rsa_bits),
            (super::Mechanism::RsaOaep, super::OaepHash::Sha1, 2048)
        );
        assert!(
            error_of(&PKCS11.replace("key_label", "mechanism = \"rsa\"\nkey_label"))
                .contains("expected `aes-gcm` or `rsa-oaep`")
        );
        assert!(
            error_of(&PKCS11.replace("key_label", "rsa_bits = 1024\nkey_label"))
                .contains("rsa_bits")
        );
        assert!(
            error_of(&PKCS11.replace("key_label", "pin = \"1234\"\nkey_label")).contains("pin")
        );
        assert!(
            error_of(&PKCS11.replace("token_label = \"kms\"", "token_label = \"kms\"\nslot = 1"))
                .contains("exactly one of token_label")
        );
        assert!(
            error_of(&PKCS11.replace("pin_file", "pin_env = \"PIN\"\npin_file"))
                .contains("exactly one of pin_file")
        );
        assert!(
            error_of(&PKCS11.replace("key_label", "key_id_hex = \"zz\"\nkey_label"))
                .contains("hex")
        );
        let with_timeout =
            |ms: &str| PKCS11.replace("key_label", &format!("timeout_ms = {ms}\nkey_label"));
        assert_eq!(pkcs11(&with_timeout("800")).timeout_ms, 800);
        for bad in ["0", "60000"] {
            let e = error_of(&with_timeout(bad));
            assert!(
                e.contains("[keys.hsm]: timeout_ms") && e.contains("1 to 59999"),
                "{e}"
            );
        }
    }
}

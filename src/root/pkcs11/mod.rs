//! `provider = "pkcs11"`: the root key is an AES-256 secret key inside a PKCS#11 token
//! (an HSM, or SoftHSM2). Local KEKs are wrapped inside the token with CKM_AES_GCM; the
//! key never leaves it, so the plugin's memory holds only unwrapped local KEKs.
//!
//! Wrapped blob: 12-byte IV || 32-byte ciphertext || 16-byte tag, with
//! [`WrapContext::aad`](crate::root::WrapContext::aad) as associated data. The IV stored is the one in the IV buffer after
//! C_Encrypt: FIPS HSMs ignore the caller's IV and write back the one they generated. The
//! key_id is derived from a check value the token computes (see `check_value`), so it
//! follows the key material, not its label: a key deleted and re-created under the same
//! label gets a new key_id.
//!
//! Every token call has a deadline (`timeout_ms`, start-up `STARTUP_TIMEOUT`) and holds
//! one of `MAX_SESSIONS` permits for as long as its thread is in the token, so a hung HSM
//! ties up at most that many threads and costs callers an error, not a hang.

pub mod config;
#[cfg(feature = "pkcs11")]
mod root;
#[cfg(feature = "pkcs11")]
mod session;
#[cfg(all(test, feature = "pkcs11"))]
mod tests;

pub use config::Config;
#[cfg(feature = "pkcs11")]
pub use root::Pkcs11Root;

super::feature_gated_provider!(Config, "pkcs11", "pkcs11", Pkcs11Root);

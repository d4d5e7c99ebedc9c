//! Root key backends for the provider-generic suites (`tests/contract.rs`,
//! `tests/rotation.rs`): each makes fresh keys of one provider for the real plugin binary,
//! and [`for_each_provider!`] is the one list of them both suites run over.

use std::future::Future;
use std::path::Path;

#[cfg(feature = "aws-kms")]
pub mod aws;
pub mod file;
pub mod pkcs11;
pub mod tpm;
#[cfg(feature = "vault-transit")]
pub mod vault;

/// How to give the plugin a root key of one provider.
pub trait Backend: Sync {
    /// Creates a fresh root key and returns the TOML body of its `[keys.NAME]` entry.
    fn new_key(&self, dir: &Path, name: &str) -> impl Future<Output = String> + Send;
    /// Environment variables the plugin process needs for this provider.
    fn env(&self) -> Vec<(String, String)>;
    /// Destroys the key made by `new_key(dir, name)` for good (disaster-recovery tests).
    fn lose_key(&self, dir: &Path, name: &str) -> impl Future<Output = ()> + Send;
    /// Whether the plugin notices a lost key (false where the emulator still serves it).
    const LOSS_REFUSED: bool = true;
}

/// The provider table: calls `$suite!(module_name, backend_expression)` once per provider,
/// and each suite macro generates `mod module_name` with its tests for that backend (the
/// expression is evaluated once per test, so a backend may start an emulator per test).
///
/// To run every suite over a new provider: implement [`Backend`] in a new file of this
/// folder (`pub mod` it above, behind its cargo feature if it has one) and add its row here.
#[macro_export]
macro_rules! for_each_provider {
    ($suite:ident) => {
        $suite!(file, $crate::support::backends::file::FileBackend);
        $suite!(pkcs11, $crate::support::backends::pkcs11::SoftHsmBackend);
        $suite!(
            pkcs11_rsa_oaep,
            $crate::support::backends::pkcs11::SoftHsmRsaBackend
        );
        $suite!(tpm, $crate::support::backends::tpm::TpmBackend::start());
        #[cfg(feature = "aws-kms")]
        $suite!(aws, $crate::support::backends::aws::AwsBackend::start());
        #[cfg(feature = "vault-transit")]
        $suite!(
            vault_transit,
            $crate::support::backends::vault::VaultBackend::start()
        );
    };
}

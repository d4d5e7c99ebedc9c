//! The provider contract against `provider = "pkcs11"`, `mechanism = "rsa-oaep"` in a
//! software TPM 2.0 (one swtpm per test).

mod backends;
mod common;
mod contract;
mod softhsm;
#[path = "support/swtpm.rs"]
mod swtpm;
#[path = "backends/tpm.rs"]
mod tpm;

contract_tests!(tpm::TpmBackend::start());

//! The provider contract against `provider = "pkcs11"` on a real SoftHSM2 token.

mod backends;
mod common;
mod contract;
mod softhsm;

contract_tests!(backends::pkcs11::SoftHsmBackend);

/// The same contract over `mechanism = "rsa-oaep"` on SoftHSM2.
mod rsa_oaep {
    use super::*;

    contract_tests!(backends::pkcs11::SoftHsmRsaBackend);
}

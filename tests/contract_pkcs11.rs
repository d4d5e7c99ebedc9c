//! The provider contract against `provider = "pkcs11"` on a real SoftHSM2 token.

mod backends;
mod common;
mod contract;
mod softhsm;

contract_tests!(backends::pkcs11::SoftHsmBackend);

//! Root key backends for the provider-generic suites (`contract`, `rotation`): each makes
//! fresh keys of one provider for the real plugin binary.

#![allow(dead_code)] // each test binary uses some of them

pub mod file;
pub mod pkcs11;

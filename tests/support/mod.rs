//! The harness every integration test binary shares (`mod support;`): the real binary
//! ([`Plugin`], CLI runs), gRPC calls to it, config files, its log, and root key backends
//! (file keys, SoftHSM2 tokens with the FIPS-like shim, a software TPM, a moto KMS emulator,
//! an OpenBao server).

// Shared by several test binaries, each of which uses only part of it.
#![allow(dead_code)]

pub mod backends;
mod config;
mod grpc;
mod log;
#[cfg(feature = "aws-kms")]
pub mod moto;
#[cfg(feature = "vault-transit")]
pub mod openbao;
mod plugin;
pub mod softhsm;
pub mod swtpm;

pub use config::*;
pub use grpc::*;
pub use plugin::*;

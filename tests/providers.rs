//! What is particular to one root key provider, through the real binary: PIN, token and key
//! errors and a FIPS-like token (SoftHSM2), a software TPM's failed decryptions and power
//! cuts, KMS call counts, outages and a hung KMS (moto), Vault tokens, AppRole, cert auth,
//! sealing and Transit rotation (OpenBao).
//! What every provider must do is in `tests/contract.rs`.
#![allow(unsafe_code)] // tests drive processes and limits through libc (kill, pipe, rlimit, getuid)
#![allow(missing_docs)] // test harness items are shared between modules, not a documented API

mod support;

mod providers {
    #[cfg(feature = "aws-kms")]
    mod aws_kms;
    #[cfg(feature = "aws-kms")]
    mod aws_stall;
    mod pkcs11;
    mod tpm;
    #[cfg(feature = "vault-transit")]
    mod vault_transit;
}

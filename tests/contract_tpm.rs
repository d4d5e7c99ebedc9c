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

/// A wrapped key whose OAEP part was altered makes the TPM refuse the decryption; the next
/// genuine unwrap (cold cache after a restart) must still work. tpm2-pkcs11 leaves the
/// operation active on a session after a failed C_Decrypt, so that session must not be
/// reused.
#[tokio::test]
async fn a_refused_tpm_decryption_does_not_poison_later_unwraps() {
    let backend = tpm::TpmBackend::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut plugin = contract::start(&backend, dir.path(), "").await;
    let mut client = plugin.client().await;
    let seed = common::seed();
    let sealed = common::encrypt(&mut client, &seed).await;
    drop(client);
    plugin.kill9();
    plugin.restart().await;
    let mut client = plugin.client().await;

    let mut forged = common::decrypt_request(&sealed);
    let value = forged.annotations.values_mut().next().expect("annotation");
    // The middle of the annotation is inside the 256-byte OAEP ciphertext.
    let middle = value.len() / 2;
    value[middle] ^= 1;
    let err = client.decrypt(forged).await.expect_err("forged copy");
    assert_eq!(
        err.code(),
        tonic::Code::InvalidArgument,
        "{}",
        err.message()
    );
    assert_eq!(
        common::decrypt(&mut client, &sealed).await,
        seed,
        "genuine request after a refused TPM decryption"
    );
}

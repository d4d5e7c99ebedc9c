//! `provider = "pkcs11"`, `mechanism = "rsa-oaep"` in a software TPM 2.0 (swtpm behind
//! tpm2-abrmd, tpm2-pkcs11), end to end through the real binary: what the generic suites
//! do not cover. The contract and rotation suites run over it as the `tpm` row.

use std::path::Path;

use kms_plugin::proto::v2::EncryptResponse;

use crate::support::backends::Backend;
use crate::support::backends::tpm::TpmBackend;
use crate::support::{self, Plugin};

async fn start(backend: &TpmBackend, dir: &Path) -> Plugin {
    let socket = support::socket_in(dir);
    let key = backend.new_key(dir, "main").await;
    let config = support::write_config(dir, &socket, "main", &[("main", key)], "");
    let config = config.to_string_lossy().into_owned();
    Plugin::start(&socket, &["--config", &config], &backend.env(), dir).await
}

/// A plugin that sealed one seed and was then killed and restarted, so that opening it
/// needs a TPM decryption (the cache is empty); with the response and the seed.
async fn sealed_then_restarted(
    backend: &TpmBackend,
    dir: &Path,
) -> (Plugin, EncryptResponse, Vec<u8>) {
    let mut plugin = start(backend, dir).await;
    let (sealed, seed) = support::batch(&plugin, 1).await.remove(0);
    plugin.kill9();
    plugin.restart().await;
    (plugin, sealed, seed)
}

/// A wrapped key whose OAEP part was altered makes the TPM refuse the decryption; the next
/// genuine unwrap (cold cache after a restart) must still work. tpm2-pkcs11 leaves the
/// operation active on a session after a failed C_Decrypt, so that session must not be
/// reused.
#[tokio::test]
async fn a_refused_tpm_decryption_does_not_poison_later_unwraps() {
    let backend = TpmBackend::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let (plugin, sealed, seed) = sealed_then_restarted(&backend, dir.path()).await;
    let mut client = plugin.client().await;

    let mut forged = support::decrypt_request(&sealed);
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
        support::decrypt(&mut client, &sealed).await,
        seed,
        "genuine request after a refused TPM decryption"
    );
}

/// The plugin dies without a clean shutdown, then the TPM loses power (swtpm and its
/// resource manager killed and started again on the same state): the key and every
/// ciphertext survive, under the same key_id.
#[tokio::test]
async fn ciphertexts_survive_a_tpm_power_cut_and_a_plugin_kill() {
    let mut backend = TpmBackend::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut plugin = start(&backend, dir.path()).await;
    let id = support::status(&mut plugin.client().await).await.key_id;
    let batch = support::batch(&plugin, 5).await;

    plugin.kill9();
    backend.tpm.reboot();
    plugin.restart().await;
    let mut client = plugin.client().await;
    assert_eq!(support::status(&mut client).await.key_id, id);
    for (sealed, seed) in &batch {
        assert_eq!(&support::decrypt(&mut client, sealed).await, seed);
    }
}

/// The TPM goes away under a running plugin with a cold cache: Decrypt fails as unavailable
/// (retryable), not as a forged copy. tpm2-pkcs11 keeps its connection to tpm2-abrmd for the
/// life of the process, so after the resource manager restarts the plugin must restart too
/// (on a node, /dev/tpmrm0 does not go away); then the same request decrypts.
#[tokio::test]
async fn a_vanished_tpm_is_unavailable_not_a_forgery() {
    let mut backend = TpmBackend::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut plugin, sealed, seed) = sealed_then_restarted(&backend, dir.path()).await;
    let mut client = plugin.client().await;

    backend.tpm.stop();
    let err = client
        .decrypt(support::decrypt_request(&sealed))
        .await
        .expect_err("no TPM");
    assert_eq!(err.code(), tonic::Code::Unavailable, "{}", err.message());
    backend.tpm.start_again();
    plugin.kill9();
    plugin.restart().await;
    let mut client = plugin.client().await;
    assert_eq!(support::decrypt(&mut client, &sealed).await, seed);
}

//! Root key rotation between a file key and an rsa-oaep key in a software TPM 2.0, and the
//! TPM key across a plugin kill -9 and a TPM power cut (swtpm and its resource manager
//! killed and started again on the same state).

mod backends;
mod common;
mod contract;
mod rotation;
mod softhsm;
#[path = "support/swtpm.rs"]
mod swtpm;
#[path = "backends/tpm.rs"]
mod tpm;

use backends::file::FileBackend;
use tpm::TpmBackend;

rotation_tests!(FileBackend, TpmBackend::start());

#[tokio::test]
async fn ciphertexts_survive_a_tpm_power_cut_and_a_plugin_kill() {
    let mut backend = TpmBackend::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut plugin = contract::start(&backend, dir.path(), "").await;
    let id = rotation::key_id(&plugin).await;
    let sealed = rotation::batch(&plugin, 5).await;

    // The plugin dies without a clean shutdown, then the TPM loses power under it.
    plugin.kill9();
    backend.tpm.reboot();
    plugin.restart().await;
    assert_eq!(rotation::key_id(&plugin).await, id, "key_id after reboot");
    rotation::all_decrypt(&plugin, &sealed).await;
}

//! `provider = "pkcs11"` end to end: the real `kms-plugin` binary on a real SoftHSM2 token,
//! spoken to over its socket by a real tonic client.

mod common;
mod softhsm;

use std::path::Path;
use std::process::Command;

use common::Plugin;
use softhsm::{PIN, SoftHsm};

/// A token "kms" with a PIN file, and a config whose active key is `key_label` on it.
fn setup(hsm: &SoftHsm, dir: &Path, pin: &str, key_label: &str) -> (String, String) {
    let socket = common::socket_in(dir);
    let pin_file = hsm.pin_file(dir, pin);
    let body = softhsm::key_body("kms", key_label, &pin_file);
    let config = common::write_config(dir, &socket, "hsm", &[("hsm", body)], "");
    (socket, config.to_string_lossy().into_owned())
}

fn keygen(hsm: &SoftHsm, config: &str) -> (bool, String, String) {
    let out = common::run_cli(&["keygen", "--config", config, "--key", "hsm"], &hsm.env());
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    (out.status.success(), stdout, stderr)
}

/// The key_id printed by `kms-plugin keygen`.
fn printed_key_id(stdout: &str) -> String {
    stdout
        .split("key_id ")
        .nth(1)
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|| panic!("no key_id in {stdout:?}"))
}

#[tokio::test]
async fn serve_encrypt_decrypt_and_survive_sigkill() {
    let dir = tempfile::tempdir().expect("tempdir");
    let hsm = SoftHsm::new();
    hsm.init_token("kms");
    let (socket, config) = setup(&hsm, dir.path(), PIN, "root");

    let (ok, stdout, stderr) = keygen(&hsm, &config);
    assert!(ok, "keygen failed: {stderr}");
    assert!(stdout.contains("created"), "{stdout}");
    let key_id = printed_key_id(&stdout);
    assert!(key_id.starts_with("pkcs11-"), "{key_id}");
    let (ok, stdout, stderr) = keygen(&hsm, &config);
    assert!(ok, "second keygen failed: {stderr}");
    assert!(stdout.contains("already exists"), "{stdout}");
    assert_eq!(
        printed_key_id(&stdout),
        key_id,
        "key_id stable across processes"
    );

    let mut plugin = Plugin::start(&socket, &["--config", &config], &hsm.env(), dir.path()).await;
    let mut client = plugin.client().await;
    let status = common::status(&mut client).await;
    assert_eq!(status.healthz, "ok");
    assert_eq!(status.key_id, key_id);
    let seed = common::seed();
    let sealed = common::encrypt(&mut client, &seed).await;
    assert_eq!(sealed.key_id, key_id);
    assert_eq!(common::decrypt(&mut client, &sealed).await, seed);

    plugin.kill9();
    plugin.restart().await;
    let mut client = plugin.client().await;
    assert_eq!(common::status(&mut client).await.key_id, key_id);
    assert_eq!(
        common::decrypt(&mut client, &sealed).await,
        seed,
        "decrypt after restart must unwrap the local KEK in the token"
    );
    let again = common::encrypt(&mut client, &seed).await;
    assert_eq!(common::decrypt(&mut client, &again).await, seed);
    assert!(
        !plugin.output().contains(PIN),
        "the PIN appears in the plugin's output"
    );
}

#[tokio::test]
async fn wrong_pin_makes_serve_exit_naming_the_pin() {
    let dir = tempfile::tempdir().expect("tempdir");
    let hsm = SoftHsm::new();
    hsm.init_token("kms");
    let (_, good) = setup(&hsm, dir.path(), PIN, "root");
    let (ok, _, stderr) = keygen(&hsm, &good);
    assert!(ok, "keygen failed: {stderr}");

    let (_, bad) = setup(&hsm, dir.path(), "wrong-pin-0000", "root");
    let out = common::run_cli(&["serve", "--config", &bad], &hsm.env());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "serve started with a wrong PIN");
    assert!(
        stderr.contains("PIN rejected by token \"kms\""),
        "stderr: {stderr}"
    );
    assert!(
        !stderr.contains("wrong-pin-0000"),
        "the PIN leaked: {stderr}"
    );

    let (ok, _, stderr) = keygen(&hsm, &bad);
    assert!(!ok);
    assert!(stderr.contains("PIN rejected"), "keygen stderr: {stderr}");
}

#[tokio::test]
async fn missing_key_or_token_makes_serve_exit_with_the_reason() {
    let dir = tempfile::tempdir().expect("tempdir");
    let hsm = SoftHsm::new();
    hsm.init_token("kms");
    let (_, config) = setup(&hsm, dir.path(), PIN, "never-generated");
    let out = common::run_cli(&["serve", "--config", &config], &hsm.env());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("no AES key labelled \"never-generated\" on token \"kms\""),
        "stderr: {stderr}"
    );

    let text = std::fs::read_to_string(&config)
        .expect("config")
        .replace("token_label = \"kms\"", "token_label = \"elsewhere\"");
    std::fs::write(&config, text).expect("config");
    let out = common::run_cli(&["serve", "--config", &config], &hsm.env());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("no token labelled \"elsewhere\""),
        "stderr: {stderr}"
    );
}

#[tokio::test]
async fn pin_env_and_an_independent_look_at_the_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let hsm = SoftHsm::new();
    hsm.init_token("kms");
    let socket = common::socket_in(dir.path());
    let body = format!(
        "provider = \"pkcs11\"\nmodule = \"{}\"\ntoken_label = \"kms\"\nkey_label = \"by-env\"\nkey_id_hex = \"4b4d53\"\npin_env = \"KMS_HSM_PIN\"",
        softhsm::module().display()
    );
    let config = common::write_config(dir.path(), &socket, "hsm", &[("hsm", body)], "");
    let config = config.to_string_lossy().into_owned();
    let mut env = hsm.env();
    env.push(("KMS_HSM_PIN".into(), PIN.into()));
    let out = common::run_cli(&["keygen", "--config", &config, "--key", "hsm"], &env);
    assert!(
        out.status.success(),
        "keygen: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let plugin = Plugin::start(&socket, &["--config", &config], &env, dir.path()).await;
    let mut client = plugin.client().await;
    let seed = common::seed();
    let sealed = common::encrypt(&mut client, &seed).await;
    assert_eq!(common::decrypt(&mut client, &sealed).await, seed);

    // pkcs11-tool (OpenSC), not our code, reports the key's attributes.
    let out = Command::new("pkcs11-tool")
        .args(["--module", &softhsm::module().to_string_lossy()])
        .args(["--token-label", "kms", "--login", "--pin", PIN])
        .args(["--list-objects", "--type", "secrkey"])
        .envs(hsm.env())
        .output()
        .unwrap_or_else(|e| panic!("cannot run pkcs11-tool ({e}): install opensc"));
    let listing = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "pkcs11-tool: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(listing.contains("by-env"), "{listing}");
    assert!(listing.contains("AES length 32"), "{listing}");
    assert!(listing.contains("4b4d53"), "CKA_ID set: {listing}");
    assert!(listing.contains("never extractable"), "{listing}");
    assert!(listing.contains("always sensitive"), "{listing}");
    // And its value cannot be read out.
    let out = Command::new("pkcs11-tool")
        .args(["--module", &softhsm::module().to_string_lossy()])
        .args(["--token-label", "kms", "--login", "--pin", PIN])
        .args(["--read-object", "--type", "secrkey", "--label", "by-env"])
        .envs(hsm.env())
        .output()
        .expect("pkcs11-tool");
    assert!(
        !out.status.success() && out.stdout.is_empty(),
        "key value readable: {:?}",
        out.stdout
    );
}

//! Upgrades: ciphertexts that an earlier build returned must decrypt with this one. Each
//! folder of `tests/compat/` holds the root key material an earlier build made (a file root
//! key, the embedded default's state directory, SoftHSM2 token files, a software TPM's state
//! and its tpm2-pkcs11 store), the config it ran with,
//! and what its Encrypts returned (`sealed.json`); the tests start the current binary on a copy
//! and Decrypt every recorded answer. A change to the envelope, the wrapped-KEK layout of any
//! provider or the key_id derivation fails here, where the round-trip suites cannot see it
//! (they encrypt and decrypt with the same build).
//!
//! AWS KMS and Vault Transit keep their key material in the service (moto and `bao -dev` hold
//! it in memory only), so they have no folder here; their blobs are the service's own format.
//!
//! New fixtures (after a release, keeping the old folders):
//! `cargo test --test operations upgrade::make_fixtures -- --ignored`, with `COMPAT_TAG` naming
//! the folder suffix and `COMPAT_CASES` (comma-separated stems, e.g. `tpm-rsa-oaep`) which
//! cases to record (default all).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use kms_plugin::proto::v2::{DecryptRequest, EncryptResponse};
use serde_json::{Value, json};

use crate::support::softhsm::{self, SoftHsm};
use crate::support::swtpm::{self, SwTpm};
use crate::support::{self, Plugin, encrypt, seed, status, uid};

const COMPAT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/compat");

/// One recorded Encrypt: what was sent and what came back.
struct Sealed {
    plaintext: Vec<u8>,
    response: EncryptResponse,
}

impl Sealed {
    fn to_json(&self) -> Value {
        let annotations: HashMap<&String, String> = self
            .response
            .annotations
            .iter()
            .map(|(k, v)| (k, hex::encode(v)))
            .collect();
        json!({
            "plaintext": hex::encode(&self.plaintext),
            "ciphertext": hex::encode(&self.response.ciphertext),
            "key_id": self.response.key_id,
            "annotations": annotations,
        })
    }

    fn from_json(v: &Value) -> Self {
        let bytes = |field: &str| hex::decode(v[field].as_str().expect(field)).expect(field);
        let annotations = v["annotations"]
            .as_object()
            .expect("annotations")
            .iter()
            .map(|(k, v)| {
                (
                    k.clone(),
                    hex::decode(v.as_str().expect("hex")).expect("hex"),
                )
            })
            .collect();
        Self {
            plaintext: bytes("plaintext"),
            response: EncryptResponse {
                ciphertext: bytes("ciphertext"),
                key_id: v["key_id"].as_str().expect("key_id").to_string(),
                annotations,
            },
        }
    }
}

/// Copies `from` into `to` with owner-only modes, as the plugin's file checks require (git
/// keeps no modes).
fn copy_private(from: &Path, to: &Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(to).expect("mkdir");
    std::fs::set_permissions(to, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    for entry in std::fs::read_dir(from).expect("read fixture dir") {
        let entry = entry.expect("dir entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("file type").is_dir() {
            copy_private(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).expect("copy fixture file");
            std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o600))
                .expect("chmod");
        }
    }
}

/// The config text with this machine's paths in place of the placeholders.
fn localize(template: &str, dir: &Path, socket: &str) -> String {
    template
        .replace("@DIR@", &dir.to_string_lossy())
        .replace("@SOCKET@", socket)
        .replace("@MODULE@", &softhsm::module().to_string_lossy())
        .replace("@TPM_MODULE@", swtpm::MODULE)
}

/// A SoftHSM2 config over the token files in `dir/tokens`, and the environment naming it.
fn softhsm_env(dir: &Path) -> Vec<(String, String)> {
    let conf = softhsm::token::write_conf(dir);
    vec![("SOFTHSM2_CONF".into(), conf.to_string_lossy().into_owned())]
}

/// Starts the current binary on a copy of fixture `case`, checks its key_id is the one the
/// earlier build reported, and decrypts every recorded answer.
async fn decrypts_what_an_earlier_build_sealed(case: &str) {
    let fixture = Path::new(COMPAT).join(case);
    let recorded: Value = serde_json::from_str(
        &std::fs::read_to_string(fixture.join("sealed.json")).expect("sealed.json"),
    )
    .expect("sealed.json is JSON");
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("tempdir");
    copy_private(&fixture.join("files"), dir.path());
    let socket = support::socket_in(dir.path());
    let mut env = Vec::new();
    let mut _tpm = None; // kept alive while the plugin runs
    if dir.path().join("tokens").exists() {
        env = softhsm_env(dir.path());
        std::fs::write(dir.path().join("pin"), format!("{}\n", softhsm::PIN)).expect("pin");
    }
    if dir.path().join("tpm").exists() {
        let tpm = SwTpm::restore(&dir.path().join("tpm"));
        env = tpm.env();
        std::fs::write(dir.path().join("pin"), format!("{}\n", swtpm::PIN)).expect("pin");
        _tpm = Some(tpm);
    }
    let plugin = match recorded["config"].as_str() {
        Some(template) => {
            let config = dir.path().join("config.toml");
            std::fs::write(&config, localize(template, dir.path(), &socket)).expect("config");
            let config = config.to_string_lossy().into_owned();
            Plugin::start(&socket, &["--config", &config], &env, dir.path()).await
        }
        None => Plugin::embedded(dir.path(), &socket).await,
    };
    let mut client = plugin.client().await;
    assert_eq!(
        status(&mut client).await.key_id,
        recorded["key_id"].as_str().expect("key_id"),
        "{case}: the key_id derived from the same root key changed"
    );
    let sealed = recorded["sealed"].as_array().expect("sealed");
    assert!(!sealed.is_empty(), "{case}: no recorded answers");
    for (i, v) in sealed.iter().enumerate() {
        let s = Sealed::from_json(v);
        let plaintext = client
            .decrypt(DecryptRequest {
                ciphertext: s.response.ciphertext.clone(),
                uid: uid(),
                key_id: s.response.key_id.clone(),
                annotations: s.response.annotations.clone(),
            })
            .await
            .unwrap_or_else(|e| panic!("{case}: recorded answer {i} no longer decrypts: {e}"))
            .into_inner()
            .plaintext;
        assert_eq!(plaintext, s.plaintext, "{case}: answer {i}");
    }
}

#[tokio::test]
async fn the_embedded_default_decrypts_an_earlier_builds_ciphertexts() {
    decrypts_what_an_earlier_build_sealed("embedded-0.1.0").await;
}

#[tokio::test]
async fn file_roots_with_a_backup_copy_decrypt_an_earlier_builds_ciphertexts() {
    decrypts_what_an_earlier_build_sealed("file-also-wrap-0.1.0").await;
}

#[tokio::test]
async fn pkcs11_aes_gcm_decrypts_an_earlier_builds_ciphertexts() {
    decrypts_what_an_earlier_build_sealed("pkcs11-aes-gcm-0.1.0").await;
}

#[tokio::test]
async fn pkcs11_rsa_oaep_decrypts_an_earlier_builds_ciphertexts() {
    decrypts_what_an_earlier_build_sealed("pkcs11-rsa-oaep-0.1.0").await;
}

#[tokio::test]
async fn tpm_rsa_oaep_decrypts_an_earlier_builds_ciphertexts() {
    decrypts_what_an_earlier_build_sealed("tpm-rsa-oaep-0.1.0").await;
}

/// Where a case's key lives besides files: nowhere, a SoftHSM2 token or a software TPM
/// (each with a token labelled `compat`).
#[derive(Clone, Copy, PartialEq)]
enum Token {
    None,
    SoftHsm,
    Tpm,
}

/// The cases `make_fixtures` records: folder stem, config template (None: the embedded
/// default), the token it needs.
const CASES: &[(&str, Option<&str>, Token)] = &[
    ("embedded", None, Token::None),
    (
        "file-also-wrap",
        Some(
            "socket = \"@SOCKET@\"\n[kek]\nactive = \"main\"\nalso_wrap = [\"backup\"]\n\n\
             [keys.main]\nprovider = \"file\"\npath = \"@DIR@/keys/main.key\"\n\n\
             [keys.backup]\nprovider = \"file\"\npath = \"@DIR@/keys/backup.key\"\n",
        ),
        Token::None,
    ),
    (
        "pkcs11-aes-gcm",
        Some(
            "socket = \"@SOCKET@\"\n[kek]\nactive = \"main\"\n\n[keys.main]\n\
             provider = \"pkcs11\"\nmodule = \"@MODULE@\"\ntoken_label = \"compat\"\n\
             key_label = \"main\"\npin_file = \"@DIR@/pin\"\n",
        ),
        Token::SoftHsm,
    ),
    (
        "pkcs11-rsa-oaep",
        Some(
            "socket = \"@SOCKET@\"\n[kek]\nactive = \"main\"\n\n[keys.main]\n\
             provider = \"pkcs11\"\nmodule = \"@MODULE@\"\ntoken_label = \"compat\"\n\
             key_label = \"main\"\npin_file = \"@DIR@/pin\"\nmechanism = \"rsa-oaep\"\n\
             oaep_hash = \"sha1\"\nrsa_bits = 2048\n",
        ),
        Token::SoftHsm,
    ),
    (
        // The default oaep_hash (SHA-256), as the TPM tests use it.
        "tpm-rsa-oaep",
        Some(
            "socket = \"@SOCKET@\"\n[kek]\nactive = \"main\"\n\n[keys.main]\n\
             provider = \"pkcs11\"\nmodule = \"@TPM_MODULE@\"\ntoken_label = \"compat\"\n\
             key_label = \"main\"\npin_file = \"@DIR@/pin\"\nmechanism = \"rsa-oaep\"\n\
             rsa_bits = 2048\n",
        ),
        Token::Tpm,
    ),
];

/// Records the fixtures above with the binary built from this tree.
#[tokio::test]
#[ignore = "writes tests/compat/; run by hand after a release"]
async fn make_fixtures() {
    let tag = std::env::var("COMPAT_TAG").unwrap_or_else(|_| env!("CARGO_PKG_VERSION").into());
    let only = std::env::var("COMPAT_CASES").ok();
    for &(stem, template, token) in CASES {
        if only
            .as_ref()
            .is_some_and(|o| !o.split(',').any(|c| c == stem))
        {
            continue;
        }
        let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("tempdir");
        let files = dir.path().join("files");
        std::fs::create_dir(&files).expect("mkdir");
        let socket = support::socket_in(dir.path());
        let mut env = Vec::new();
        let (mut _hsm, mut tpm) = (None, None); // kept alive while the plugin runs
        match token {
            Token::None => {}
            Token::SoftHsm => {
                let hsm = SoftHsm::new();
                env = hsm.env();
                hsm.init_token("compat");
                _hsm = Some(hsm);
                std::fs::write(files.join("pin"), format!("{}\n", softhsm::PIN)).expect("pin");
            }
            Token::Tpm => {
                let t = SwTpm::start();
                env = t.env();
                t.add_token("compat");
                tpm = Some(t);
                std::fs::write(files.join("pin"), format!("{}\n", swtpm::PIN)).expect("pin");
            }
        }
        let plugin = match template {
            Some(template) => {
                let config = files.join("config.toml");
                std::fs::write(&config, localize(template, &files, &socket)).expect("config");
                for key in ["main", "backup"] {
                    if template.contains(&format!("[keys.{key}]")) {
                        support::keygen(&config, key, &env);
                    }
                }
                let config = config.to_string_lossy().into_owned();
                Plugin::start(&socket, &["--config", &config], &env, dir.path()).await
            }
            None => Plugin::embedded(&files, &socket).await,
        };
        let mut client = plugin.client().await;
        let key_id = status(&mut client).await.key_id;
        let mut sealed = Vec::new();
        for _ in 0..3 {
            let plaintext = seed();
            let response = encrypt(&mut client, &plaintext).await;
            sealed.push(
                Sealed {
                    plaintext,
                    response,
                }
                .to_json(),
            );
        }
        drop(plugin);
        let out = PathBuf::from(COMPAT).join(format!("{stem}-{tag}"));
        let _ = std::fs::remove_dir_all(&out);
        std::fs::create_dir_all(out.join("files")).expect("mkdir fixture");
        if let Some(mut tpm) = tpm {
            // The TPM's persistent state and the tpm2-pkcs11 store, swtpm stopped first.
            tpm.stop();
            tpm.save(&out.join("files/tpm"));
        }
        if token == Token::SoftHsm {
            // The SoftHSM2 token files (the config and the plugin's log are not part of it).
            let hsm_tokens = _hsm.as_ref().map(|h| h.env()[0].1.clone()).expect("hsm");
            let tokens = Path::new(&hsm_tokens).with_file_name("tokens");
            copy_private(&tokens, &out.join("files/tokens"));
        }
        for keep in ["keys", "state"] {
            if files.join(keep).exists() {
                copy_private(&files.join(keep), &out.join("files").join(keep));
            }
        }
        let record = json!({
            "made_by": format!("kms-plugin {} ({})", env!("CARGO_PKG_VERSION"), git_head()),
            "config": template,
            "key_id": key_id,
            "sealed": sealed,
        });
        std::fs::write(
            out.join("sealed.json"),
            serde_json::to_string_pretty(&record).expect("json") + "\n",
        )
        .expect("write sealed.json");
    }
}

fn git_head() -> String {
    std::process::Command::new("git")
        .args([
            "-C",
            env!("CARGO_MANIFEST_DIR"),
            "rev-parse",
            "--short",
            "HEAD",
        ])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

//! `provider = "pkcs11"` keys on real SoftHSM2 tokens. All keys of a test binary share one
//! SoftHSM config (the plugin's environment is per backend); each key gets its own token.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use super::Backend;
use crate::support;
use crate::support::softhsm::{self, SoftHsm};

pub struct SoftHsmBackend;

pub fn hsm() -> &'static SoftHsm {
    static HSM: OnceLock<SoftHsm> = OnceLock::new();
    HSM.get_or_init(SoftHsm::new)
}

/// The token each key was made on, by (dir, name).
fn tokens() -> &'static Mutex<HashMap<(PathBuf, String), String>> {
    static TOKENS: OnceLock<Mutex<HashMap<(PathBuf, String), String>>> = OnceLock::new();
    TOKENS.get_or_init(Default::default)
}

impl Backend for SoftHsmBackend {
    async fn new_key(&self, dir: &Path, name: &str) -> String {
        let token = hsm().new_token();
        let pin_file = hsm().pin_file(dir, softhsm::PIN);
        let body = softhsm::key_body(&token, name, &pin_file);
        let config = support::write_config(dir, "unused", name, &[(name, body.clone())], "");
        support::keygen(&config, name, &hsm().env());
        tokens()
            .lock()
            .expect("tokens")
            .insert((dir.to_path_buf(), name.to_string()), token);
        body
    }

    fn env(&self) -> Vec<(String, String)> {
        hsm().env()
    }

    async fn lose_key(&self, dir: &Path, name: &str) {
        let token = tokens()
            .lock()
            .expect("tokens")
            .get(&(dir.to_path_buf(), name.to_string()))
            .cloned()
            .expect("key made by this backend");
        let out = std::process::Command::new("pkcs11-tool")
            .args(["--module", &softhsm::module().to_string_lossy()])
            .args(["--token-label", &token, "--login", "--pin", softhsm::PIN])
            .args(["--delete-object", "--type", "secrkey", "--label", name])
            .envs(hsm().env())
            .output()
            .expect("run pkcs11-tool (apt-get install opensc)");
        assert!(
            out.status.success(),
            "delete key: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

//! `provider = "pkcs11"`, `mechanism = "rsa-oaep"` keys in a software TPM (swtpm behind
//! tpm2-abrmd, tpm2-pkcs11), one TPM per backend value (so one per test).

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;

use super::Backend;
use crate::support;
use crate::support::swtpm::{self, SwTpm};

pub struct TpmBackend {
    pub tpm: SwTpm,
    /// The token each key name was made on.
    tokens: Mutex<HashMap<String, String>>,
}

impl TpmBackend {
    pub fn start() -> Self {
        Self {
            tpm: SwTpm::start(),
            tokens: Mutex::default(),
        }
    }
}

impl Backend for TpmBackend {
    async fn new_key(&self, dir: &Path, name: &str) -> String {
        let token = self.tpm.new_token();
        let body = swtpm::key_body(&token, name, &self.tpm.pin_file(dir));
        let config = support::write_config(dir, "unused", name, &[(name, body.clone())], "");
        support::keygen(&config, name, &self.tpm.env());
        self.tokens
            .lock()
            .expect("tokens")
            .insert(name.to_string(), token);
        body
    }

    fn env(&self) -> Vec<(String, String)> {
        self.tpm.env()
    }

    async fn lose_key(&self, _dir: &Path, name: &str) {
        let token = self.tokens.lock().expect("tokens")[name].clone();
        for kind in ["privkey", "pubkey"] {
            let out = self.tpm.pkcs11_tool(&[
                "--token-label",
                &token,
                "--login",
                "--pin",
                swtpm::PIN,
                "--delete-object",
                "--type",
                kind,
                "--label",
                name,
            ]);
            assert!(
                out.status.success(),
                "delete {kind}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

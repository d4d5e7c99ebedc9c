//! `provider = "vault-transit"` keys on a real OpenBao dev server (`bao`), one server per
//! backend value. The plugin gets a token with only the policy the README gives (encrypt,
//! decrypt and read of its key), in a token file.

use std::path::Path;

use super::Backend;
use crate::support::openbao::{self, OpenBao};

pub struct VaultBackend {
    pub bao: OpenBao,
}

impl VaultBackend {
    pub fn start() -> Self {
        Self {
            bao: OpenBao::start(),
        }
    }
}

impl Backend for VaultBackend {
    async fn new_key(&self, dir: &Path, name: &str) -> String {
        self.bao.create_key(name, "aes256-gcm96");
        let token = self.bao.plugin_token(name, "24h");
        std::fs::create_dir_all(dir).expect("dir");
        let file = openbao::secret_file(dir, &format!("vault-token-{name}"), &token);
        self.bao.key_body(name, &file)
    }

    fn env(&self) -> Vec<(String, String)> {
        Vec::new()
    }

    async fn lose_key(&self, _dir: &Path, name: &str) {
        self.bao.delete_key(name);
    }
}

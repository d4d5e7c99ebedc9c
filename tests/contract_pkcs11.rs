//! The provider contract against `provider = "pkcs11"` on a real SoftHSM2 token.

mod common;
mod contract;
mod softhsm;

use std::path::Path;
use std::sync::OnceLock;

use contract::Backend;
use softhsm::SoftHsm;

/// All cases share one SoftHSM config (the plugin's environment is per backend, not per
/// case); each key gets a token of its own.
struct SoftHsmBackend;

fn hsm() -> &'static SoftHsm {
    static HSM: OnceLock<SoftHsm> = OnceLock::new();
    HSM.get_or_init(SoftHsm::new)
}

impl Backend for SoftHsmBackend {
    async fn new_key(&self, dir: &Path, name: &str) -> String {
        let token = hsm().new_token();
        let pin_file = hsm().pin_file(dir, softhsm::PIN);
        let body = softhsm::key_body(&token, name, &pin_file);
        let config = common::write_config(dir, "unused", name, &[(name, body.clone())], "");
        common::keygen(&config, name, &hsm().env());
        body
    }

    fn env(&self) -> Vec<(String, String)> {
        hsm().env()
    }
}

contract_tests!(SoftHsmBackend);

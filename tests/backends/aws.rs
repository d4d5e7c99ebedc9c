//! `provider = "aws-kms"` keys on a real moto KMS emulator, one moto per backend value.
//! Not listed in `backends/mod.rs` (that would make every test binary start moto's helper);
//! the aws test binaries include it with `#[path]`.

use std::path::Path;

use crate::contract::Backend;
use crate::moto::{self, Moto};

pub struct AwsBackend {
    moto: Moto,
}

impl AwsBackend {
    pub fn start() -> Self {
        Self {
            moto: Moto::start(),
        }
    }
}

impl Backend for AwsBackend {
    async fn new_key(&self, _dir: &Path, name: &str) -> String {
        let endpoint = self.moto.endpoint();
        let arn = moto::create_key(&moto::client(&endpoint)).await;
        let client = moto::client(&endpoint);
        // An alias per name, so that lose_key can find the key again.
        client
            .create_alias()
            .alias_name(format!("alias/{name}"))
            .target_key_id(&arn)
            .send()
            .await
            .expect("CreateAlias");
        format!(
            "provider = \"aws-kms\"\nkey_id = \"{arn}\"\nregion = \"{}\"\nendpoint = \"{endpoint}\"\nallow_http = true",
            moto::REGION
        )
    }

    fn env(&self) -> Vec<(String, String)> {
        moto::plugin_env()
    }

    async fn lose_key(&self, _dir: &Path, name: &str) {
        // What an operator would do to destroy it. moto only marks the key PendingDeletion
        // (it does not refuse Encrypt/Decrypt then); the recovery tests drop the lost key
        // from the config, so that difference does not matter to them.
        let client = moto::client(&self.moto.endpoint());
        client
            .schedule_key_deletion()
            .key_id(format!("alias/{name}"))
            .pending_window_in_days(7)
            .send()
            .await
            .expect("ScheduleKeyDeletion");
    }
}

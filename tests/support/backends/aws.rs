//! `provider = "aws-kms"` keys on a real moto KMS emulator, one moto per backend value.
//! Built with the `aws-kms` feature only.

use std::path::Path;

use super::Backend;
use crate::support::moto::{self, Moto};

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
    /// moto keeps serving a key PendingDeletion (AWS refuses it).
    const LOSS_REFUSED: bool = false;

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
        // (it does not refuse Encrypt/Decrypt then, as AWS does); the plugin refuses to open
        // a key that is not Enabled, and the recovery tests drop the lost key from the
        // config, so that difference does not matter to them.
        let client = moto::client(&self.moto.endpoint());
        // ScheduleKeyDeletion takes a key id, not an alias (moto: not an ARN either).
        let key_id = client
            .describe_key()
            .key_id(format!("alias/{name}"))
            .send()
            .await
            .expect("DescribeKey")
            .key_metadata()
            .map(|m| m.key_id().to_string())
            .expect("key id");
        client
            .schedule_key_deletion()
            .key_id(&key_id)
            .pending_window_in_days(7)
            .send()
            .await
            .expect("ScheduleKeyDeletion");
        let state = client
            .describe_key()
            .key_id(&key_id)
            .send()
            .await
            .expect("DescribeKey")
            .key_metadata()
            .and_then(|m| m.key_state().cloned());
        assert_eq!(state, Some(aws_sdk_kms::types::KeyState::PendingDeletion));
    }
}

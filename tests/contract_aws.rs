//! The provider contract against `provider = "aws-kms"`, on a real moto emulator (one
//! per test).

#![cfg(feature = "aws-kms")]

mod common;
mod contract;
#[path = "support/moto.rs"]
mod moto;

use std::path::Path;

use contract::Backend;
use moto::Moto;

struct AwsBackend {
    moto: Moto,
}

impl AwsBackend {
    fn start() -> Self {
        Self {
            moto: Moto::start(),
        }
    }
}

impl Backend for AwsBackend {
    async fn new_key(&self, _dir: &Path, _name: &str) -> String {
        let endpoint = self.moto.endpoint();
        let arn = moto::create_key(&moto::client(&endpoint)).await;
        format!(
            "provider = \"aws-kms\"\nkey_id = \"{arn}\"\nregion = \"{}\"\nendpoint = \"{endpoint}\"",
            moto::REGION
        )
    }

    fn env(&self) -> Vec<(String, String)> {
        let mut env: Vec<(String, String)> = moto::CREDENTIAL_ENV
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        env.push(("AWS_CONFIG_FILE".into(), "/nonexistent".into()));
        env.push(("AWS_SHARED_CREDENTIALS_FILE".into(), "/nonexistent".into()));
        env.push(("AWS_EC2_METADATA_DISABLED".into(), "true".into()));
        env
    }
}

contract_tests!(AwsBackend::start());

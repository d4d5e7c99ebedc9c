//! `kms-plugin check`: validates a config file and proves every root key it names with a
//! checked round trip, without serving.

use std::path::Path;
use std::process::ExitCode;

use super::{Output, fail, say, write_out};
use crate::config::Config;
use crate::keyring::roots::{Root, UnwrapRate};
use crate::root;

/// Checks the config file and every root key in it; prints lines or one JSON object.
pub async fn run(config_path: &Path, output: Output) -> ExitCode {
    let json = output == Output::Json;
    let config = match Config::load(config_path) {
        Ok(config) => config,
        Err(e) if json => {
            say!(
                "{}",
                serde_json::json!({
                    "config": config_path.display().to_string(),
                    "valid": false,
                    "error": e.to_string(),
                    "ok": false,
                    "keys": [],
                })
            );
            return ExitCode::from(1);
        }
        Err(e) => return fail(&e.to_string()),
    };
    if !json {
        say!("config {}: valid", config_path.display());
    }
    let rate = UnwrapRate::from(&config.cache);
    let (mut total, mut failed) = (0, 0);
    let mut keys = Vec::new();
    for (name, role) in config.roles() {
        let Some(key) = config.keys.get(name) else {
            continue; // validation guarantees an entry per role
        };
        total += 1;
        let proven = async {
            let opened = root::open(name, key).await?;
            let root = Root::new(name, role, opened, Default::default(), rate);
            root.probe().await.map(|()| root.key_id().clone())
        };
        let label = format!("key \"{name}\" ({}, {})", key.provider(), role.as_str());
        let result = proven.await;
        keys.push(serde_json::json!({
            "name": name,
            "provider": key.provider(),
            "role": role.as_str(),
            "ok": result.is_ok(),
            "key_id": result.as_ref().ok().map(ToString::to_string),
            "error": result.as_ref().err().map(ToString::to_string),
        }));
        match result {
            Ok(key_id) if !json => say!("{label}: ok, round trip works; key_id {key_id}"),
            Ok(_) => {}
            Err(e) => {
                failed += 1;
                if !json {
                    say!("{label}: FAILED: {e}");
                }
            }
        }
    }
    if json {
        say!(
            "{}",
            serde_json::json!({
                "config": config_path.display().to_string(),
                "valid": true,
                "ok": failed == 0,
                "keys": keys,
            })
        );
    } else if failed == 0 {
        say!("all {total} root keys work");
    } else {
        say!("{failed} of {total} root keys do not work");
    }
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

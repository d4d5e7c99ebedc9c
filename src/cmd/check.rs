//! `kms-plugin check`: validates a config file and proves every root key it names with a
//! checked round trip, without serving.

use std::path::Path;
use std::process::ExitCode;

use super::{fail, say, write_out};
use crate::config::Config;
use crate::keyring::roots::{Root, UnwrapRate};
use crate::root;

/// Checks the config file and every root key in it.
pub async fn run(config_path: &Path) -> ExitCode {
    let config = match Config::load(config_path) {
        Ok(config) => config,
        Err(e) => return fail(&e.to_string()),
    };
    say!("config {}: valid", config_path.display());
    let rate = UnwrapRate::from(&config.cache);
    let (mut total, mut failed) = (0, 0);
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
        match proven.await {
            Ok(key_id) => say!("{label}: ok, round trip works; key_id {key_id}"),
            Err(e) => {
                failed += 1;
                say!("{label}: FAILED: {e}");
            }
        }
    }
    if failed == 0 {
        say!("all {total} root keys work");
        ExitCode::SUCCESS
    } else {
        say!("{failed} of {total} root keys do not work");
        ExitCode::from(1)
    }
}

//! `kms-plugin keygen`: creates the root key a `[keys.NAME]` entry describes, if it does
//! not exist yet.

use std::path::Path;
use std::process::ExitCode;

use super::{fail, say, write_out};
use crate::config::Config;
use crate::root;

/// Creates (or finds) key `name` of the config file and prints its key_id.
pub async fn run(config_path: &Path, name: &str) -> ExitCode {
    let config = match Config::load(config_path) {
        Ok(config) => config,
        Err(e) => return fail(&e.to_string()),
    };
    let Some(key) = config.keys.get(name) else {
        return fail(&format!(
            "{} has no [keys.{name}] entry",
            config_path.display()
        ));
    };
    let created = match root::create(key).await {
        Ok(created) => created,
        Err(e) => return fail(&format!("key \"{name}\": {e}")),
    };
    match root::open(name, key).await {
        Ok(opened) => {
            let what = if created { "created" } else { "already exists" };
            say!(
                "key \"{name}\" ({}) {what}: key_id {}",
                key.provider(),
                opened.key_id()
            );
            ExitCode::SUCCESS
        }
        Err(e) => fail(&format!("key \"{name}\": {e}")),
    }
}

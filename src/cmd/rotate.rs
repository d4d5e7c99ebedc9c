//! `kms-plugin rotate`: make another configured root key the active one, safely.
//!
//! 1. prove the new root works (wrap + unwrap round trip) from this process;
//! 2. rewrite the config file atomically (temp file + rename), keeping comments and layout:
//!    the new root becomes `active`, the old active joins `retired`;
//! 3. ask the running plugin to reload (Admin `Reload`); if it refuses, put the old file back;
//! 4. wait until Status reports the new key_id, and print the next steps.

mod edit;

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use super::{fail, refused_by_plugin, say, unreachable_plugin, write_out};
use crate::client;
use crate::config::{self, Config};
use crate::proto::v2::StatusRequest;

/// Makes key `to` the active one of the config file and of the plugin running on it.
pub async fn run(config_path: &Path, to: &str, socket: Option<String>) -> ExitCode {
    // The keys and PIN files belong to the plugin's service user (keygen runs as it), and
    // rotate runs as root: trust that user's files, as the plugin itself does.
    let early_socket = socket.clone().or_else(|| {
        Config::load(config_path)
            .ok()
            .and_then(|c| c.socket)
            .or_else(|| Some(config::DEFAULT_SOCKET.to_string()))
    });
    if let Some(uid) = early_socket.and_then(|s| client::plugin_uid(&s).ok()) {
        crate::secure_path::trust_service_user(uid);
    }
    let (old_text, new_text, new_config) = match edit::prepare(config_path, to).await {
        Ok(prepared) => prepared,
        Err(e) => return fail(&e.to_string()),
    };
    let socket = socket
        .or_else(|| new_config.socket.clone())
        .unwrap_or_else(|| config::DEFAULT_SOCKET.to_string());
    let mut kms = match client::connect(&socket).await {
        Ok(channel) => channel,
        Err(e) => return unreachable_plugin(&socket, &e.to_string()).await,
    };
    let old_key_id = match client::kms(kms.clone()).status(StatusRequest {}).await {
        Ok(status) => status.into_inner().key_id,
        Err(e) => return unreachable_plugin(&socket, e.message()).await,
    };
    let old_name = new_config.kek.retired.last().cloned().unwrap_or_default();
    if let Err(e) = edit::write_atomically(config_path, &new_text) {
        return fail(&e.to_string());
    }
    let reloaded = client::admin(kms.clone())
        .reload(crate::proto::admin::ReloadRequest { force: false })
        .await;
    let new_key_id = match reloaded {
        Ok(r) => {
            let r = r.into_inner();
            if !r.needs_restart.is_empty() {
                say!(
                    "note: {} changed in the config file and needs a restart of the plugin",
                    r.needs_restart.join(", ")
                );
            }
            r.key_id
        }
        Err(e) => {
            let restored = edit::write_atomically(config_path, &old_text);
            let what = match restored {
                Ok(()) => "the config file was restored".to_string(),
                Err(r) => format!("restoring the config file failed too: {r}"),
            };
            let outcome = if refused_by_plugin(&e) {
                "the plugin refused the new configuration"
            } else {
                "the reload call to the plugin failed"
            };
            return fail(&format!("{outcome} ({what}): {}", e.message()));
        }
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let status = client::kms(kms.clone()).status(StatusRequest {}).await;
        if status.is_ok_and(|s| s.into_inner().key_id == new_key_id) {
            break;
        }
        if tokio::time::Instant::now() > deadline {
            return fail("the plugin did not report the new key_id within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        if let Ok(channel) = client::connect(&socket).await {
            kms = channel;
        }
    }
    say!(
        "{}",
        edit::next_steps(&old_name, &old_key_id, to, &new_key_id, &socket).trim_end()
    );
    ExitCode::SUCCESS
}

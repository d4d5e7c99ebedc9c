//! `kms-plugin reload`: asks a running plugin to reload its config file.

use std::process::ExitCode;

use super::{fail, refused_by_plugin, say, unreachable_plugin, write_out};
use crate::client;

/// Reloads the plugin on `socket`; `force` allows dropping keys that may protect data.
pub async fn run(socket: &str, force: bool) -> ExitCode {
    let channel = match client::connect(socket).await {
        Ok(channel) => channel,
        Err(e) => return unreachable_plugin(socket, &e.to_string()).await,
    };
    match client::admin(channel)
        .reload(crate::proto::admin::ReloadRequest { force })
        .await
    {
        Ok(r) => {
            let r = r.into_inner();
            say!("reloaded; active key_id {}", r.key_id);
            if !r.needs_restart.is_empty() {
                say!(
                    "applied, but {} changed and needs a restart of the plugin (the running value stays)",
                    r.needs_restart.join(", ")
                );
            }
            ExitCode::SUCCESS
        }
        Err(e) if refused_by_plugin(&e) => fail(&format!("reload refused: {}", e.message())),
        Err(e) => unreachable_plugin(socket, e.message()).await,
    }
}

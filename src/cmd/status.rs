//! `kms-plugin status`: asks a running plugin for its health and detail; exits 0 only
//! if it is healthy.

use std::process::ExitCode;
use std::time::Duration;

use super::{say, unreachable_plugin, write_out};
use crate::client;
use crate::keyring::HEALTHZ_OK;
use crate::proto::admin::InfoRequest;
use crate::proto::v2::StatusRequest;

/// Prints the plugin's Status and Admin Info.
pub async fn run(socket: &str) -> ExitCode {
    let connected = tokio::time::timeout(Duration::from_secs(5), client::connect(socket)).await;
    let channel = match connected {
        Ok(Ok(channel)) => channel,
        Ok(Err(e)) => return unreachable_plugin(socket, &e.to_string()).await,
        Err(_) => return unreachable_plugin(socket, "timed out").await,
    };
    let status = match client::kms(channel.clone()).status(StatusRequest {}).await {
        Ok(r) => r.into_inner(),
        Err(e) => return unreachable_plugin(socket, e.message()).await,
    };
    say!("version: {}", status.version);
    say!("healthz: {}", status.healthz);
    say!("key_id:  {}", status.key_id);
    if let Ok(info) = client::admin(channel).info(InfoRequest {}).await {
        let info = info.into_inner();
        say!(
            "config:  {} (pid {}, kms-plugin {})",
            info.config_source,
            info.pid,
            info.plugin_version
        );
        if let Some(k) = info.local_kek {
            say!(
                "local KEK: {} of {} encryptions, {}s of {}s",
                k.encryptions,
                k.max_encryptions,
                k.age_seconds,
                k.max_age_seconds
            );
        }
        say!(
            "cache:   {} of {} unwrapped local KEKs",
            info.cache_entries,
            info.cache_capacity
        );
        for r in info.roots {
            let last = match r.last_decrypt_unix {
                0 => "never since start".to_string(),
                t => {
                    let now = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(t, |d| d.as_secs() as i64);
                    format!("unix time {t} ({}s ago)", (now - t).max(0))
                }
            };
            say!(
                "root {} ({}, {}): key_id {} state {}; wraps {} unwraps {} failures {}; decrypts {}, last {}",
                r.name,
                r.provider,
                r.role,
                r.key_id,
                r.state,
                r.wrap_calls,
                r.unwrap_calls,
                r.failed_calls,
                r.decrypts,
                last
            );
            if r.throttled_unwraps > 0 {
                say!(
                    "  {} Decrypt unwraps refused: unwrap budget spent ([cache] unwraps_per_second)",
                    r.throttled_unwraps
                );
            }
            if !r.last_error.is_empty() {
                say!("  last error: {}", r.last_error);
            }
        }
    }
    if status.healthz == HEALTHZ_OK {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

//! Telling systemd (`Type=notify`) what the plugin is doing, through the `sd-notify` crate:
//! READY=1 once the socket serves, RELOADING=1 (with MONOTONIC_USEC, which systemd 253+
//! requires) and READY=1 around every reload, STOPPING=1 at shutdown, a STATUS= line with the
//! key_id and health for `systemctl status`, and WATCHDOG=1 keep-alives when the unit sets
//! `WatchdogSec=`. Outside systemd (no NOTIFY_SOCKET) every call is a no-op.

use std::time::Duration;

use sd_notify::NotifyState;

use crate::keyring::Keyring;

/// Sends `states`; a failure is logged, never fatal (the plugin serves without systemd).
fn send(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!(error = %e, "cannot notify systemd");
    }
}

/// The STATUS= text: what `systemctl status kms-plugin` shows.
fn status_line(keyring: &Keyring) -> String {
    format!(
        "key_id {}; healthz {}",
        keyring.key_id(),
        keyring.health().healthz()
    )
}

/// Start-up is complete: the socket accepts calls.
pub fn ready(keyring: &Keyring) {
    send(&[
        NotifyState::Ready,
        NotifyState::Status(&status_line(keyring)),
    ]);
}

/// A reload starts.
pub fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => send(&[NotifyState::Reloading, now]),
        Err(e) => tracing::warn!(error = %e, "cannot read the monotonic clock for systemd"),
    }
}

/// A reload ended (applied or refused: either way the plugin serves again).
pub fn reloaded(keyring: &Keyring) {
    ready(keyring);
}

/// Shutdown starts.
pub fn stopping() {
    send(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
}

/// Half the watchdog interval, if the unit asked for keep-alives (`WatchdogSec=`).
pub fn watchdog_interval() -> Option<Duration> {
    sd_notify::watchdog_enabled().map(|timeout| timeout / 2)
}

/// Sends WATCHDOG=1 (with a fresh STATUS=) every `interval`, for as long as the runtime
/// runs: a wedged runtime stops the keep-alives and systemd restarts the service.
pub async fn keep_alive(interval: Duration, keyring: impl Fn() -> std::sync::Arc<Keyring>) {
    let mut tick = tokio::time::interval(interval);
    loop {
        tick.tick().await;
        send(&[
            NotifyState::Watchdog,
            NotifyState::Status(&status_line(&keyring())),
        ]);
    }
}

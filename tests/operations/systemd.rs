//! The plugin under systemd `Type=notify`, with the test as the service manager: it binds
//! the NOTIFY_SOCKET datagram socket and reads what the real binary sends.

use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use crate::support::{self, Plugin};

/// Reads notifications until one contains `wanted`, returning it (fails after 10 s).
fn expect(socket: &UnixDatagram, wanted: &str, seen: &mut Vec<String>) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        if let Ok(n) = socket.recv(&mut buf) {
            let message = String::from_utf8_lossy(&buf[..n]).into_owned();
            seen.push(message.clone());
            if message.lines().any(|l| l == wanted) {
                return message;
            }
        }
    }
    panic!("no `{wanted}` from the plugin; got {seen:?}");
}

#[tokio::test]
async fn notifies_ready_reloading_watchdog_and_stopping() {
    let dir = tempfile::tempdir().expect("tempdir");
    let notify = dir.path().join("notify.sock");
    let manager = UnixDatagram::bind(&notify).expect("bind NOTIFY_SOCKET");
    manager
        .set_read_timeout(Some(Duration::from_millis(200)))
        .expect("timeout");
    let socket = support::socket_in(dir.path());
    let config = support::file_root_config(dir.path(), &socket, "");
    let env = vec![
        (
            "NOTIFY_SOCKET".to_string(),
            notify.to_string_lossy().into_owned(),
        ),
        ("WATCHDOG_USEC".to_string(), "400000".to_string()),
    ];
    let mut plugin = Plugin::start(&socket, &["--config", &config], &env, dir.path()).await;
    let key_id = support::status(&mut plugin.client().await).await.key_id;
    let mut seen = Vec::new();

    let ready = expect(&manager, "READY=1", &mut seen);
    assert!(
        ready.contains(&format!("STATUS=key_id {key_id}; healthz ok")),
        "{ready}"
    );
    // WatchdogSec: keep-alives at half the interval.
    expect(&manager, "WATCHDOG=1", &mut seen);
    let started = Instant::now();
    expect(&manager, "WATCHDOG=1", &mut seen);
    assert!(
        started.elapsed() < Duration::from_millis(400),
        "keep-alives too slow"
    );

    plugin.signal(libc::SIGHUP);
    let reloading = expect(&manager, "RELOADING=1", &mut seen);
    assert!(
        reloading.lines().any(|l| l.starts_with("MONOTONIC_USEC=")),
        "systemd 253+ needs MONOTONIC_USEC with RELOADING=1: {reloading}"
    );
    expect(&manager, "READY=1", &mut seen);

    plugin.signal(libc::SIGTERM);
    expect(&manager, "STOPPING=1", &mut seen);
    assert!(plugin.wait_exit(Duration::from_secs(10)).success());
}

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

/// `kms-plugin.socket`: the real binary under Debian's `systemd-socket-activate`, which binds
/// the socket, waits for the first connection and execs the plugin with LISTEN_FDS=1.
#[tokio::test]
async fn serves_on_the_socket_systemd_passes() {
    use std::os::unix::process::CommandExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = support::socket_in(dir.path());
    let run = std::path::Path::new(&socket).parent().expect("socket dir");
    std::fs::create_dir(run).expect("mkdir");
    let config = support::file_root_config(dir.path(), &socket, "");
    let log_path = dir.path().join("activated.log");
    let log = std::fs::File::create(&log_path).expect("log");
    let mut activator = std::process::Command::new("systemd-socket-activate");
    activator
        .args([
            "--listen",
            &socket,
            "-E",
            "KMS_PLUGIN_LOG=debug",
            support::BIN,
        ])
        .args(["serve", "--config", &config])
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone().expect("log"))
        .stderr(log);
    // SAFETY: umask(2) is async-signal-safe; the socket is made 0600, as SocketMode=0600.
    unsafe {
        activator.pre_exec(|| {
            libc::umask(0o177);
            Ok(())
        });
    }
    let mut child = match activator.spawn() {
        Ok(child) => child,
        Err(e) => panic!(
            "cannot run systemd-socket-activate ({e}): install Debian's systemd package \
             (tests/run-all.sh does)"
        ),
    };
    let output = || std::fs::read_to_string(&log_path).unwrap_or_default();
    // Connecting is what makes systemd-socket-activate start the plugin.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut client = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            panic!("exited with {status} before serving:\n{}", output());
        }
        if let Ok(Ok(client)) =
            tokio::time::timeout(Duration::from_secs(5), support::connect(&socket)).await
        {
            break client;
        }
        assert!(Instant::now() < deadline, "not serving:\n{}", output());
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let status = support::status(&mut client).await;
    assert_eq!(status.healthz, "ok");
    let seed = support::seed();
    let sealed = support::encrypt(&mut client, &seed).await;
    assert_eq!(support::decrypt(&mut client, &sealed).await, seed);

    // The plugin says so, and the one listener on the path is descriptor 3 of the plugin
    // (systemd-socket-activate exec()s it in place: same pid).
    // The log is written by the plugin's writer thread: wait for the line.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut log = output();
    while !log.contains("listening on the socket systemd passed") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
        log = output();
    }
    assert!(
        log.contains("listening on the socket systemd passed (socket activation)")
            && log.contains("fd=3"),
        "{log}"
    );
    let fd3 = std::fs::read_link(format!("/proc/{}/fd/3", child.id())).expect("fd 3");
    let inode = fd3
        .to_string_lossy()
        .strip_prefix("socket:[")
        .and_then(|s| s.strip_suffix(']'))
        .expect("fd 3 is a socket")
        .to_string();
    let table = std::fs::read_to_string("/proc/net/unix").expect("/proc/net/unix");
    // Columns: Num RefCount Protocol Flags Type St Inode Path; flag 0x10000 is listening
    // (accepted connections show the path too).
    let listeners: Vec<Vec<&str>> = table
        .lines()
        .filter(|l| l.ends_with(&format!(" {socket}")))
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .filter(|fields| fields[3] == "00010000")
        .collect();
    assert_eq!(listeners.len(), 1, "{listeners:?}");
    assert_eq!(
        listeners[0][6], inode,
        "the listener is not fd 3: {listeners:?}"
    );

    // SIGTERM: the plugin stops, and leaves the socket to systemd (it never removes it).
    // SAFETY: kill(2) on our own child's pid has no memory-safety preconditions.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        assert!(Instant::now() < deadline, "did not stop:\n{}", output());
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status}:\n{}", output());
    assert!(
        std::path::Path::new(&socket).exists(),
        "systemd's socket removed"
    );
}

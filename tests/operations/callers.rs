//! Connection floods against the real binary on a loopback Unix socket: the connection cap,
//! the accept loop's back-off when the process is out of file descriptors, and the
//! preface timeout. A well-behaved client that is already connected keeps being served.

use std::io::Read;
use std::time::{Duration, Instant};

use kms_plugin::proto::v2::key_management_service_client::KeyManagementServiceClient;
use tokio::net::UnixStream;
use tonic::transport::Channel;

use super::metrics::{free_addr, sample};
use crate::support::{self, Plugin};

/// Status, Encrypt and Decrypt on an existing connection.
async fn round_trip(client: &mut KeyManagementServiceClient<Channel>) {
    assert_eq!(support::status(client).await.healthz, "ok");
    let seed = support::seed();
    let sealed = support::encrypt(client, &seed).await;
    assert_eq!(support::decrypt(client, &sealed).await, seed);
}

/// Opens up to `n` connections without blocking (a full backlog fails the connect).
async fn flood(socket: &str, n: usize) -> Vec<UnixStream> {
    let mut held = Vec::with_capacity(n);
    for _ in 0..n {
        if let Ok(Ok(conn)) =
            tokio::time::timeout(Duration::from_millis(100), UnixStream::connect(socket)).await
        {
            held.push(conn);
        }
    }
    held
}

/// A new client that can call, once the plugin has worked through its backlog.
async fn new_client_is_served(plugin: &mut Plugin, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        if let Ok(Ok(mut client)) =
            tokio::time::timeout(Duration::from_secs(2), support::connect(&plugin.socket)).await
            && client
                .status(kms_plugin::proto::v2::StatusRequest {})
                .await
                .is_ok()
        {
            round_trip(&mut client).await;
            return;
        }
        assert!(plugin.try_wait().is_none(), "died:\n{}", plugin.output());
        assert!(
            Instant::now() < deadline,
            "no new client served after the flood:\n{}",
            plugin.output()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Raises this test process's descriptor limit to its hard limit (CI often starts at 1024
/// soft) and returns how many connections a flood may open while leaving room for the other
/// tests running in this process.
fn flood_budget(wanted: usize) -> usize {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write only the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
            libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        }
    }
    wanted.min((lim.rlim_cur as usize).saturating_sub(512))
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("fd dir")
        .count()
}

/// utime + stime of the process, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    let after_name = &stat[stat.rfind(')').expect("comm") + 2..];
    let fields: Vec<&str> = after_name.split(' ').collect();
    // Fields 14 and 15 of stat(5); `after_name` starts at field 3.
    fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime")
}

fn count_lines(log: &str, text: &str) -> usize {
    log.lines().filter(|l| l.contains(text)).count()
}

#[tokio::test]
async fn connections_over_max_connections_are_closed_at_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = support::socket_in(dir.path());
    let addr = free_addr();
    let extra = format!("max_connections = 4\nmetrics_listen = \"{addr}\"");
    let config = support::file_root_config(dir.path(), &socket, &extra);
    let mut plugin = Plugin::start(&socket, &["--config", &config], &[], dir.path()).await;
    let mut client = plugin.client().await;
    round_trip(&mut client).await;

    let held = flood(&socket, 300).await;
    assert!(held.len() >= 250, "only {} connected", held.len());
    let (mut closed, mut admitted) = (0, 0);
    // Every connection stays open until all are read: closing one would free its slot.
    let mut held: Vec<std::os::unix::net::UnixStream> = held
        .into_iter()
        .map(|c| c.into_std().expect("std"))
        .collect();
    for conn in &mut held {
        conn.set_nonblocking(false).expect("blocking");
        conn.set_read_timeout(Some(Duration::from_millis(500)))
            .expect("timeout");
        let mut buf = [0; 64];
        match conn.read(&mut buf) {
            Ok(0) => closed += 1,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => closed += 1,
            Ok(_) => admitted += 1, // the server's SETTINGS: served within the cap
            Err(_) => {}            // still in the backlog
        }
    }
    assert!(closed >= 250, "only {closed} closed at once");
    assert!(
        admitted <= 4,
        "{admitted} admitted over max_connections = 4:\n{}",
        plugin.output()
    );
    round_trip(&mut client).await;
    drop(held);
    plugin
        .wait_for_output("connection refused: max_connections")
        .await;
    let log = plugin.output();
    let lines = count_lines(&log, "connection refused: max_connections");
    assert!((1..=3).contains(&lines), "{lines} lines:\n{log}");
    let refused = sample(
        &addr,
        "kms_plugin_connections_refused_total{reason=\"max_connections\"}",
    );
    assert!(refused >= closed, "{refused} counted, {closed} closed");
    drop(client);
    new_client_is_served(&mut plugin, Duration::from_secs(30)).await;
}

/// Out of descriptors, accept() fails with EMFILE until a connection closes; the plugin must
/// back off instead of retrying in a busy loop, and recover once the flood is gone.
#[tokio::test]
async fn out_of_descriptors_the_plugin_backs_off_and_recovers() {
    const NOFILE: u64 = 256;
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = support::socket_in(dir.path());
    let config = support::file_root_config(dir.path(), &socket, "max_connections = 1024");
    let mut plugin = Plugin::start(&socket, &["--config", &config], &[], dir.path()).await;
    let pid = plugin.pid().expect("pid");
    let limit = format!("--nofile={NOFILE}:{NOFILE}");
    let out = std::process::Command::new("prlimit")
        .args(["--pid", &pid.to_string(), &limit])
        .output()
        .expect("prlimit (util-linux)");
    assert!(out.status.success(), "{out:?}");
    let mut client = plugin.client().await;
    round_trip(&mut client).await;

    let budget = flood_budget(1500);
    assert!(
        budget > NOFILE as usize + 128,
        "test fd limit too low for a flood"
    );
    let held = flood(&socket, budget).await;
    assert!(
        held.len() > NOFILE as usize,
        "only {} connected",
        held.len()
    );
    plugin
        .wait_for_output("cannot accept connections; backing off")
        .await;

    let ticks = cpu_ticks(pid);
    let started = Instant::now();
    for _ in 0..10 {
        round_trip(&mut client).await;
        assert!(open_fds(pid) <= NOFILE as usize);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // SAFETY: sysconf has no memory-safety preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let busy = (cpu_ticks(pid) - ticks) as f64 / hz / started.elapsed().as_secs_f64();
    // A spinning accept loop keeps a core busy; backing off costs next to nothing.
    assert!(
        busy < 0.5,
        "plugin used {busy:.2} of a core while out of fds"
    );
    let log = plugin.output();
    assert!(
        count_lines(&log, "backing off") <= 3,
        "accept errors flood the log:\n{log}"
    );

    drop(held);
    new_client_is_served(&mut plugin, Duration::from_secs(60)).await;
    round_trip(&mut client).await;
    assert!(open_fds(pid) <= NOFILE as usize);
}

/// A connection that never sends the HTTP/2 preface is closed, freeing its slot.
#[tokio::test]
async fn silent_connections_are_closed_after_the_preface_timeout() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = support::socket_in(dir.path());
    let config = support::file_root_config(dir.path(), &socket, "max_connections = 2");
    let mut plugin = Plugin::start(&socket, &["--config", &config], &[], dir.path()).await;
    let started = Instant::now();
    let mut silent = Vec::new();
    for _ in 0..2 {
        let conn = std::os::unix::net::UnixStream::connect(&socket).expect("connect");
        conn.set_read_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        silent.push(conn);
    }
    for conn in &mut silent {
        let mut got = Vec::new();
        let _ = conn.read_to_end(&mut got);
    }
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_secs(4) && waited < Duration::from_secs(20),
        "silent connections closed after {waited:?}"
    );
    new_client_is_served(&mut plugin, Duration::from_secs(10)).await;
}

//! Files, configuration and process hardening, through the real binary: ownership and
//! permission checks of the state directory, key and PIN files; reload reporting settings
//! that need a restart; no core dumps or ptrace; signals during a slow start-up; a stopping
//! plugin leaving a newer instance's socket alone.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::{self, Plugin};

/// A uid and gid no file in the test belongs to (nobody's).
const OTHER: u32 = 65534;

fn chmod(path: impl AsRef<Path>, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

fn chown(path: impl AsRef<Path>, uid: u32) {
    std::os::unix::fs::chown(path, Some(uid), None).expect("chown (the suite runs as root)");
}

/// Runs `serve` with `args`, which must fail; returns its output.
fn serve_fails(dir: &Path, args: &[&str]) -> String {
    let socket = support::socket_in(dir);
    let mut all = vec!["--socket", &socket];
    all.extend_from_slice(args);
    Plugin::start_fails(&socket, &all, &[], dir)
}

#[tokio::test]
async fn state_dirs_other_users_can_change_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("state");
    std::fs::create_dir(&state).expect("mkdir");
    let state_arg = state.to_string_lossy().into_owned();

    chmod(&state, 0o777);
    let out = serve_fails(dir.path(), &["--state-dir", &state_arg]);
    assert!(
        out.contains(&format!("state directory {state_arg}"))
            && out.contains(&format!("chmod 700 {state_arg}")),
        "{out}"
    );
    assert_eq!(
        std::fs::read_dir(&state).expect("ls").count(),
        0,
        "no key made"
    );

    chmod(&state, 0o700);
    chown(&state, OTHER);
    let out = serve_fails(dir.path(), &["--state-dir", &state_arg]);
    assert!(
        out.contains(&format!("owned by uid {OTHER}")) && out.contains("chown 0"),
        "{out}"
    );

    // The parent is writable by others and not sticky: the state dir could be swapped.
    chown(&state, 0);
    chmod(dir.path(), 0o777);
    let out = serve_fails(dir.path(), &["--state-dir", &state_arg]);
    assert!(out.contains("chmod go-w"), "{out}");
}

#[tokio::test]
async fn a_state_dir_the_plugin_creates_in_a_sticky_dir_is_private_and_used() {
    // Like `--state-dir /tmp/kms-plugin/state`: /tmp is world-writable but sticky.
    let dir = tempfile::tempdir().expect("tempdir");
    chmod(dir.path(), 0o1777);
    let socket = support::socket_in(dir.path());
    let plugin = Plugin::embedded(dir.path(), &socket).await;
    let state = std::fs::metadata(dir.path().join("state")).expect("state dir");
    assert_eq!(state.permissions().mode() & 0o7777, 0o700);
    assert_eq!(state.uid(), unsafe { libc::geteuid() });
    assert_eq!(
        support::status(&mut plugin.client().await).await.healthz,
        "ok"
    );
}

#[tokio::test]
async fn key_files_other_users_own_or_can_write_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = support::socket_in(dir.path());
    let key = dir.path().join("keys/main.key");
    let body = format!("provider = \"file\"\npath = \"{}\"", key.display());
    let config = support::write_config(dir.path(), &socket, "main", &[("main", body)], "");
    support::keygen(&config, "main", &[]);
    let config = config.to_string_lossy().into_owned();

    chown(&key, OTHER);
    let out = serve_fails(dir.path(), &["--config", &config]);
    assert!(
        out.contains(&format!("root key file {}", key.display()))
            && out.contains(&format!("owned by uid {OTHER}"))
            && out.contains(&format!("chown 0 {}", key.display())),
        "{out}"
    );

    chown(&key, 0);
    chmod(&key, 0o620);
    let out = serve_fails(dir.path(), &["--config", &config]);
    assert!(
        out.contains(&format!("chmod 600 {}", key.display())),
        "{out}"
    );

    // The key's directory, writable by its group: the file could be swapped.
    chmod(&key, 0o600);
    chmod(dir.path().join("keys"), 0o770);
    let out = serve_fails(dir.path(), &["--config", &config]);
    assert!(out.contains("chmod go-w"), "{out}");
}

#[tokio::test]
async fn pin_files_other_users_own_or_can_write_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = support::socket_in(dir.path());
    let pin = dir.path().join("hsm.pin");
    std::fs::write(&pin, "1234\n").expect("pin");
    // The PIN file is read before the module is loaded; no token is needed to see a refusal.
    let body = format!(
        "provider = \"pkcs11\"\nmodule = \"/usr/lib/softhsm/libsofthsm2.so\"\ntoken_label = \"none\"\n\
         key_label = \"k\"\npin_file = \"{}\"",
        pin.display()
    );
    let config = support::write_config(dir.path(), &socket, "hsm", &[("hsm", body)], "");
    let config = config.to_string_lossy().into_owned();

    chmod(&pin, 0o666);
    let out = serve_fails(dir.path(), &["--config", &config]);
    assert!(
        out.contains(&format!("PIN file {}", pin.display()))
            && out.contains(&format!("chmod 600 {}", pin.display())),
        "{out}"
    );

    chmod(&pin, 0o600);
    chown(&pin, OTHER);
    let out = serve_fails(dir.path(), &["--config", &config]);
    assert!(
        out.contains(&format!("owned by uid {OTHER}")) && out.contains("chown 0"),
        "{out}"
    );
    assert!(!out.contains("1234"), "PIN in the output");
}

#[tokio::test]
async fn reload_reports_settings_that_need_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = support::socket_in(dir.path());
    let key = dir.path().join("keys/main.key");
    let body = format!("provider = \"file\"\npath = \"{}\"", key.display());
    let keys = [("main", body)];
    let config = support::write_config(dir.path(), &socket, "main", &keys, "");
    support::keygen(&config, "main", &[]);
    let config_arg = config.to_string_lossy().into_owned();
    let mut plugin = Plugin::start(&socket, &["--config", &config_arg], &[], dir.path()).await;

    // Start-up-only settings change, and one that a reload applies.
    let changed = "socket_mode = \"0660\"\napi_version = \"v2beta1\"\n\
                   metrics_listen = \"127.0.0.1:9\"\n[cache]\ncapacity = 7\n\
                   [local_kek]\nmax_age_seconds = 3600\n";
    support::write_config(dir.path(), &socket, "main", &keys, changed);
    let out = support::run_cli(&["reload", "--socket", &socket], &[]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let named = "socket_mode, metrics_listen, api_version, [cache] capacity";
    assert!(
        stdout.contains(&format!("applied, but {named} changed and needs a restart")),
        "{stdout}"
    );
    plugin.wait_for_output("after a restart").await;
    let log = plugin.output();
    assert!(
        log.contains("WARN") && log.contains(named) && log.contains("after a restart"),
        "{log}"
    );
    // The running values stay; the rest is applied.
    let mut client = plugin.client().await;
    assert_eq!(support::status(&mut client).await.version, "v2");
    assert_eq!(
        std::fs::metadata(&socket)
            .expect("socket")
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
    let info = kms_plugin::client::admin(kms_plugin::client::connect(&socket).await.expect("c"))
        .info(kms_plugin::proto::admin::InfoRequest {})
        .await
        .expect("info")
        .into_inner();
    assert_eq!(info.local_kek.expect("local kek").max_age_seconds, 3600);

    // Nothing start-up-only differs: nothing to report.
    support::write_config(dir.path(), &socket, "main", &keys, "");
    let out = support::run_cli(&["reload", "--socket", &socket], &[]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && !stdout.contains("restart"),
        "{stdout}"
    );
}

#[tokio::test]
async fn a_stopping_plugin_leaves_a_newer_instances_socket() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = support::socket_in(dir.path());
    let mut old = Plugin::embedded(dir.path(), &socket).await;
    // Someone removes the old instance's socket file and a new instance binds the path.
    std::fs::remove_file(&socket).expect("rm socket");
    let newer = Plugin::embedded(dir.path(), &socket).await;
    old.signal(libc::SIGTERM);
    assert!(old.wait_exit(Duration::from_secs(10)).success());
    assert!(
        Path::new(&socket).exists(),
        "the newer instance's socket was removed"
    );
    assert_eq!(
        support::status(&mut newer.client().await).await.healthz,
        "ok"
    );
}

#[tokio::test]
async fn sigterm_during_a_slow_start_up_exits_cleanly_and_promptly() {
    // A "KMS" that accepts connections and never answers: the first wrap at start-up
    // hangs for the configured 60 s budget.
    let blackhole = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = blackhole.local_addr().expect("addr").port();
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = support::socket_in(dir.path());
    let body = format!(
        "provider = \"aws-kms\"\nkey_id = \"arn:aws:kms:us-east-1:111122223333:key/00000000-0000-0000-0000-000000000000\"\n\
         region = \"us-east-1\"\nendpoint = \"http://127.0.0.1:{port}\"\nallow_http = true\n\
         timeout_ms = 60000\nattempt_timeout_ms = 60000"
    );
    let config = support::write_config(dir.path(), &socket, "aws", &[("aws", body)], "");
    let config = config.to_string_lossy().into_owned();
    let env = support::aws_offline_env();
    let mut plugin = Plugin::spawn(&socket, &["--config", &config], &env, dir.path());
    // Wait until start-up is inside the KMS call.
    blackhole.set_nonblocking(true).expect("nonblocking");
    let deadline = Instant::now() + Duration::from_secs(20);
    let _held = loop {
        match blackhole.accept() {
            Ok((conn, _)) => break conn,
            Err(_) => {
                assert!(
                    Instant::now() < deadline,
                    "no KMS call:\n{}",
                    plugin.output()
                );
                assert!(plugin.try_wait().is_none(), "exited:\n{}", plugin.output());
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    };
    let signalled = Instant::now();
    plugin.signal(libc::SIGTERM);
    let status = plugin.wait_exit(Duration::from_secs(10));
    assert!(
        status.success(),
        "exit status {status}:\n{}",
        plugin.output()
    );
    assert!(
        signalled.elapsed() < Duration::from_secs(5),
        "took {:?}",
        signalled.elapsed()
    );
    assert!(
        plugin.output().contains("stopped during start-up"),
        "{}",
        plugin.output()
    );
    assert!(!Path::new(&socket).exists(), "no socket was bound");
}

#[tokio::test]
async fn the_plugin_cannot_be_core_dumped_or_traced_by_its_own_user() {
    // Run as an unprivileged user: a dumpable process's /proc/PID files belong to its
    // user; a non-dumpable one's to root, and so does the right to ptrace it.
    let dir = tempfile::tempdir().expect("tempdir");
    std::os::unix::fs::chown(dir.path(), Some(OTHER), Some(OTHER)).expect("chown");
    let socket = support::socket_in(dir.path());
    let state = dir.path().join("state");
    let log = std::fs::File::create(dir.path().join("plugin.log")).expect("log");
    let mut child = Command::new(support::BIN)
        .args(["serve", "--socket", &socket, "--state-dir"])
        .arg(&state)
        .uid(OTHER)
        .gid(OTHER)
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("spawn");
    let deadline = Instant::now() + Duration::from_secs(30);
    while support::connect(&socket).await.is_err() {
        assert!(child.try_wait().expect("wait").is_none(), "plugin exited");
        assert!(Instant::now() < deadline, "not ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let proc_dir = format!("/proc/{}", child.id());
    let status = std::fs::read_to_string(format!("{proc_dir}/status")).expect("status");
    assert!(
        status
            .lines()
            .any(|l| l.starts_with("Uid:") && l.contains(&OTHER.to_string())),
        "{status}"
    );
    let owner = std::fs::metadata(format!("{proc_dir}/status"))
        .expect("meta")
        .uid();
    assert_eq!(
        owner, 0,
        "/proc files owned by the plugin's user: it is dumpable"
    );
    let limits = std::fs::read_to_string(format!("{proc_dir}/limits")).expect("limits");
    let core = limits
        .lines()
        .find(|l| l.starts_with("Max core file size"))
        .expect("core limit line");
    assert_eq!(
        core.split_whitespace().skip(4).take(2).collect::<Vec<_>>(),
        ["0", "0"],
        "{core}"
    );
    let _ = child.kill();
    let _ = child.wait();
}

//! What an operator following the README trips over (issue 17), through the real binary:
//! `--state-dir` with `--config`, a closed stdout, errors printed once, a refused uid told
//! why, what the log shows at the default level.

use std::os::fd::{FromRawFd, OwnedFd};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::support::{self, BIN, Plugin};

/// A pipe whose read end is already closed: whatever writes to the returned end gets EPIPE,
/// as `kms-plugin status | head -1` does once `head` has exited.
fn closed_pipe() -> Stdio {
    let mut fds = [0; 2];
    // SAFETY: pipe(2) fills the two-element array it is given.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0, "pipe");
    // SAFETY: both descriptors were just created by pipe(2) and are owned here only.
    let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    drop(read);
    Stdio::from(write)
}

/// `kms-plugin ARGS` with stdout closed: its exit code and stderr.
fn run_with_closed_stdout(args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(BIN)
        .args(args)
        .stdin(Stdio::null())
        .stdout(closed_pipe())
        .stderr(Stdio::piped())
        .output()
        .expect("run kms-plugin");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn a_closed_stdout_ends_the_output_without_a_panic() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = support::socket_in(dir.path());
    let config = support::file_root_config(dir.path(), &socket, "");
    let _plugin = Plugin::start(&socket, &["--config", &config], &[], dir.path()).await;
    // Each command exits as it would with a reader: status healthy 0, keygen 0, reload 0.
    for args in [
        vec!["status", "--socket", &socket],
        vec!["keygen", "--config", &config, "--key", "main"],
        vec!["reload", "--socket", &socket],
        vec!["--help"],
    ] {
        let (code, stderr) = run_with_closed_stdout(&args);
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
        assert_eq!(code, Some(0), "{args:?}: {stderr}");
    }
}

/// `kms-plugin serve ARGS`, which must exit within 20 s: its exit code and output.
fn serve_expecting_exit(dir: &std::path::Path, args: &[&str]) -> (Option<i32>, String) {
    let mut plugin = Plugin::spawn("", args, &[], dir);
    let code = plugin.wait_exit(Duration::from_secs(20)).code();
    (code, plugin.output())
}

#[tokio::test]
async fn state_dir_has_one_meaning_the_embedded_defaults_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = support::socket_in(dir.path());
    let config = support::file_root_config(dir.path(), &socket, "");
    let state = dir.path().join("state").to_string_lossy().into_owned();

    // With a config file, --state-dir would have no effect: refused, not ignored.
    let (code, err) =
        serve_expecting_exit(dir.path(), &["--config", &config, "--state-dir", &state]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("--state-dir") && err.contains("--config"),
        "{err}"
    );
    // So is `state_dir` in the file.
    let text = std::fs::read_to_string(&config).expect("read config");
    let with_state_dir = dir.path().join("with-state-dir.toml");
    std::fs::write(&with_state_dir, format!("state_dir = \"{state}\"\n{text}")).expect("write");
    let (code, err) =
        serve_expecting_exit(dir.path(), &["--config", &with_state_dir.to_string_lossy()]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("state_dir is only used without --config") && err.contains("remove"),
        "{err}"
    );
    assert!(!dir.path().join("state").exists());

    // Without --config it is where the embedded default keeps its root key.
    let plugin = Plugin::embedded(dir.path(), &socket).await;
    assert!(dir.path().join("state/root.key").is_file());
    drop(plugin);
}

#[tokio::test]
async fn a_failing_serve_prints_its_error_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = support::socket_in(dir.path());
    let key = dir
        .path()
        .join("missing.key")
        .to_string_lossy()
        .into_owned();
    let body = format!("provider = \"file\"\npath = \"{key}\"");
    let config = support::write_config(dir.path(), &socket, "main", &[("main", body)], "");
    let out = support::run_cli(&["serve", "--config", &config.to_string_lossy()], &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(
        err.matches("cannot open root key file").count(),
        1,
        "stderr:\n{err}"
    );
    assert!(err.contains(&key), "{err}");
    // A client command's error is one line too.
    let out = support::run_cli(
        &["keygen", "--config", "/nonexistent.toml", "--key", "x"],
        &[],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.matches("cannot read config file").count(), 1, "{err}");
}

/// A uid outside `allowed_uids` is told that a plugin is there and why it hung up, not that
/// nothing answers; a socket nobody listens on is told apart.
#[tokio::test]
async fn a_refused_uid_is_told_it_is_not_in_allowed_uids() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = support::socket_in(dir.path());
    let me = support::my_uid();
    assert_ne!(me, 12345, "the test needs a uid other than 12345");
    let keys: Vec<(&str, String)> = ["main", "next"]
        .into_iter()
        .map(|name| {
            let path = dir.path().join(format!("{name}.key"));
            (
                name,
                format!("provider = \"file\"\npath = \"{}\"", path.display()),
            )
        })
        .collect();
    let config =
        support::write_config(dir.path(), &socket, "main", &keys, "allowed_uids = [12345]");
    support::keygen(&config, "main", &[]);
    support::keygen(&config, "next", &[]);
    let config = config.to_string_lossy().into_owned();
    let before = std::fs::read_to_string(&config).expect("read config");
    let mut plugin = Plugin::spawn(&socket, &["--config", &config], &[], dir.path());
    plugin.wait_for_output("serving KMS v2").await;
    for args in [
        vec!["status", "--socket", &socket],
        vec!["reload", "--socket", &socket],
        vec!["rotate", "--config", &config, "--to", "next"],
    ] {
        let out = support::run_cli(&args, &[]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(
            err.contains(&format!(
                "a plugin listens on {socket} but closed the connection before answering"
            )) && err.contains(&format!("uid ({me})"))
                && err.contains("allowed_uids"),
            "{args:?}: {err}"
        );
        assert!(!err.contains("no plugin answers"), "{err}");
    }
    // rotate stopped before it wrote anything.
    assert_eq!(
        std::fs::read_to_string(&config).expect("read config"),
        before
    );

    let out = support::run_cli(&["status", "--socket", &format!("{socket}.none")], &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("no plugin answers") && err.contains("nothing listens there"),
        "{err}"
    );
    assert!(plugin.try_wait().is_none(), "{}", plugin.output());
}

/// The log of a plugin that served a Status, an Encrypt and a Decrypt with `KMS_PLUGIN_LOG`
/// set to `filter` (unset for `None`), after a clean stop.
async fn log_of_three_calls(dir: &std::path::Path, filter: Option<&str>) -> String {
    let socket = support::socket_in(dir);
    let state = dir.join("state").to_string_lossy().into_owned();
    let log_path = dir.join("calls.log");
    let log = std::fs::File::create(&log_path).expect("log");
    let mut command = Command::new(BIN);
    command
        .args(["serve", "--socket", &socket, "--state-dir", &state])
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log"))
        .stderr(log);
    match filter {
        Some(filter) => command.env("KMS_PLUGIN_LOG", filter),
        None => command.env_remove("KMS_PLUGIN_LOG"),
    };
    let mut child = command.spawn().expect("spawn");
    let mut client = loop {
        if let Ok(mut client) = support::connect(&socket).await
            && client
                .status(kms_plugin::proto::v2::StatusRequest {})
                .await
                .is_ok()
        {
            break client;
        }
        assert!(child.try_wait().expect("wait").is_none(), "plugin exited");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    support::status(&mut client).await;
    let seed = support::seed();
    let sealed = support::encrypt(&mut client, &seed).await;
    assert_eq!(support::decrypt(&mut client, &sealed).await, seed);
    // A clean stop flushes the log writer's queue (SIGKILL could lose its last lines).
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let _ = child.wait();
    std::fs::read_to_string(&log_path).expect("read log")
}

/// The README's logging promise at the default level (no KMS_PLUGIN_LOG): one line per
/// Encrypt and Decrypt; Status, polled by every apiserver, only at debug.
#[tokio::test]
async fn default_log_level_logs_encrypt_and_decrypt_but_not_status() {
    let dir = tempfile::tempdir().expect("tempdir");
    let text = log_of_three_calls(dir.path(), None).await;
    assert!(text.contains("op=\"encrypt\""), "{text}");
    assert!(text.contains("op=\"decrypt\""), "{text}");
    assert!(!text.contains("op=\"status\""), "{text}");

    // At debug, Status is logged too.
    let socket = support::socket_in(dir.path());
    let mut plugin = Plugin::embedded(dir.path(), &socket).await;
    support::status(&mut plugin.client().await).await;
    plugin.wait_for_output("op=\"status\"").await;
}

/// The audit lines follow KMS_PLUGIN_LOG, whether the filter is decided once at start (by
/// target and level alone) or asked on each call (span directives, in brackets).
#[tokio::test]
async fn audit_lines_follow_the_log_filter() {
    for (filter, logged) in [
        ("warn", false),
        ("info,kms_plugin::service=warn", false),
        ("warn,kms_plugin::service=info", true),
        // Dynamic: no call runs inside a span named `reload`.
        ("warn,kms_plugin::service[reload]=info", false),
        ("info,kms_plugin::service[reload]=trace", true),
    ] {
        let dir = tempfile::tempdir().expect("tempdir");
        let text = log_of_three_calls(dir.path(), Some(filter)).await;
        for op in ["encrypt", "decrypt"] {
            let line = format!("op=\"{op}\"");
            assert_eq!(text.contains(&line), logged, "{filter}: {op}\n{text}");
        }
    }
}

/// The install the README describes: the plugin runs as its own user, who owns the keys
/// (`keygen` runs as that user); `rotate` runs as root and must accept those keys.
#[tokio::test]
async fn rotate_as_root_uses_keys_the_service_user_owns() {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    const SERVICE: u32 = 4242;
    assert_eq!(support::my_uid(), 0, "the suite runs as root");
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let (keys, run) = (dir.path().join("lib"), dir.path().join("run"));
    for d in [&keys, &run] {
        std::fs::create_dir(d).expect("mkdir");
        std::os::unix::fs::chown(d, Some(SERVICE), Some(SERVICE)).expect("chown");
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    }
    let socket = run.join("kms.sock").to_string_lossy().into_owned();
    let entries: Vec<(&str, String)> = ["main", "next"]
        .into_iter()
        .map(|name| {
            let path = keys.join(format!("{name}.key"));
            (
                name,
                format!("provider = \"file\"\npath = \"{}\"", path.display()),
            )
        })
        .collect();
    let config = support::write_config(dir.path(), &socket, "main", &entries, "");
    let config = config.to_string_lossy().into_owned();
    let as_service = |args: &[&str]| {
        let mut command = Command::new(BIN);
        command
            .args(args)
            .uid(SERVICE)
            .gid(SERVICE)
            .stdin(Stdio::null());
        command
    };
    for name in ["main", "next"] {
        let out = as_service(&["keygen", "--config", &config, "--key", name])
            .output()
            .expect("keygen");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let log = std::fs::File::create(dir.path().join("serve.log")).expect("log");
    let mut child = as_service(&["serve", "--config", &config])
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("spawn");
    let before = loop {
        if let Ok(mut client) = support::connect(&socket).await
            && let Ok(status) = client.status(kms_plugin::proto::v2::StatusRequest {}).await
        {
            break status.into_inner().key_id;
        }
        assert!(child.try_wait().expect("wait").is_none(), "plugin exited");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let out = support::run_cli(&["rotate", "--config", &config, "--to", "next"], &[]);
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        std::fs::read_to_string(dir.path().join("serve.log")).unwrap_or_default()
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("\"next\"") && !text.contains(&format!("(key_id {before}) is now")),
        "{text}"
    );
    let rotated = std::fs::read_to_string(&config).expect("read config");
    assert!(rotated.contains("active = \"next\""), "{rotated}");
}

/// `kms-plugin check` proves every root a config names, without serving.
#[test]
fn check_proves_every_root_and_fails_on_any() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = support::socket_in(dir.path());
    let key = |name: &str| {
        let path = dir.path().join(format!("{name}.key"));
        format!("provider = \"file\"\npath = \"{}\"", path.display())
    };
    let config = support::write_config(
        dir.path(),
        &socket,
        "main",
        &[("main", key("main")), ("backup", key("backup"))],
        "",
    );
    let text = std::fs::read_to_string(&config).expect("config");
    std::fs::write(
        &config,
        text.replace(
            "[kek]\nactive = \"main\"\n",
            "[kek]\nactive = \"main\"\nalso_wrap = [\"backup\"]\n",
        ),
    )
    .expect("write config");
    support::keygen(&config, "main", &[]);
    let config = config.to_string_lossy().into_owned();

    let out = support::run_cli(&["check", "--config", &config], &[]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains("key \"main\" (file, active): ok, round trip works; key_id file-"),
        "{stdout}"
    );
    assert!(
        stdout.contains("key \"backup\" (file, also-wrap): FAILED"),
        "{stdout}"
    );
    assert!(stdout.contains("1 of 2 root keys do not work"), "{stdout}");
    let out = support::run_cli(&["check", "--config", &config, "--output", "json"], &[]);
    assert_eq!(out.status.code(), Some(1));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    assert_eq!(report["valid"], true);
    assert_eq!(report["ok"], false);
    assert_eq!(report["keys"][0]["name"], "main");
    assert_eq!(report["keys"][0]["role"], "active");
    assert_eq!(report["keys"][0]["ok"], true);
    assert!(
        report["keys"][0]["key_id"]
            .as_str()
            .is_some_and(|k| k.starts_with("file-"))
    );
    assert_eq!(report["keys"][1]["name"], "backup");
    assert_eq!(report["keys"][1]["ok"], false);
    assert!(
        report["keys"][1]["error"]
            .as_str()
            .is_some_and(|e| !e.is_empty())
    );

    support::keygen(dir.path().join("config.toml").as_path(), "backup", &[]);
    let out = support::run_cli(&["check", "--config", &config], &[]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(stdout.contains("all 2 root keys work"), "{stdout}");
    assert!(!socket_exists(&socket), "check must not serve");

    std::fs::write(&config, "not toml [").expect("write");
    let out = support::run_cli(&["check", "--config", &config], &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(!String::from_utf8_lossy(&out.stderr).is_empty());
    let out = support::run_cli(&["check", "--config", &config, "--output", "json"], &[]);
    assert_eq!(out.status.code(), Some(1));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    assert_eq!(report["valid"], false);
    assert!(
        report["error"]
            .as_str()
            .is_some_and(|e| e.contains("config")),
        "{report}"
    );
}

/// `status --output json`: Status and the Admin detail as one object, for scripts.
#[tokio::test]
async fn status_prints_json() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = support::socket_in(dir.path());
    let config = support::file_root_config(dir.path(), &socket, "");
    let plugin = Plugin::start(&socket, &["--config", &config], &[], dir.path()).await;
    let key_id = support::status(&mut plugin.client().await).await.key_id;
    let out = support::run_cli(&["status", "--socket", &socket, "--output", "json"], &[]);
    assert!(out.status.success());
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    assert_eq!(report["healthy"], true);
    assert_eq!(report["healthz"], "ok");
    assert_eq!(report["key_id"], key_id.as_str());
    assert_eq!(report["info"]["roots"][0]["name"], "main");
    assert_eq!(report["info"]["roots"][0]["state"], "ok");
    assert_eq!(report["info"]["local_kek"]["encryptions"], 0);
}

/// Completions and man pages come from the clap definitions, for packagers.
#[test]
fn completions_and_man_pages_are_generated() {
    let out = support::run_cli(&["completions", "bash"], &[]);
    let script = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && script.contains("kms-plugin"),
        "{script}"
    );
    assert!(
        script.contains("--output"),
        "status/check options missing: {script}"
    );
    let out = support::run_cli(&["man"], &[]);
    let page = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && page.contains(".TH kms-plugin 1"),
        "{page}"
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let out = support::run_cli(&["man", "--dir", &dir.path().to_string_lossy()], &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for page in ["kms-plugin.1", "kms-plugin-serve.1", "kms-plugin-check.1"] {
        assert!(dir.path().join(page).exists(), "no {page}");
    }
    // Packaging aids, not commands for operators.
    let out = support::run_cli(&["--help"], &[]);
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(
        !help.contains("completions") && !help.contains("\n  man "),
        "{help}"
    );
}

fn socket_exists(socket: &str) -> bool {
    std::path::Path::new(socket).exists()
}

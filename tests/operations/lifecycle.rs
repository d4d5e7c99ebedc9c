//! Start-up, shutdown and socket hygiene of the real binary on its embedded default.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use super::metrics::{free_addr, sample};
use crate::support::{self, Plugin};

fn mode_of(path: impl AsRef<Path>) -> u32 {
    std::fs::metadata(path)
        .expect("metadata")
        .permissions()
        .mode()
        & 0o777
}

#[tokio::test]
async fn embedded_default_creates_a_private_root_key_and_socket() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = support::socket_in(dir.path());
    let plugin = Plugin::embedded(dir.path(), &socket).await;
    let key = dir.path().join("state/root.key");
    assert_eq!(std::fs::metadata(&key).expect("key file").len(), 32);
    assert_eq!(mode_of(&key), 0o600);
    assert_eq!(mode_of(dir.path().join("state")), 0o700);
    assert_eq!(mode_of(&socket), 0o600);
    assert_eq!(mode_of(dir.path().join("run")), 0o700);
    let mut client = plugin.client().await;
    let status = support::status(&mut client).await;
    assert_eq!(status.healthz, "ok");
    assert!(status.key_id.starts_with("file-"), "{}", status.key_id);
    let log = plugin.output();
    let key_bytes = std::fs::read(&key).expect("read key");
    assert!(
        !log.contains(&hex::encode(&key_bytes)),
        "key bytes in the log"
    );
}

#[tokio::test]
async fn key_id_is_stable_across_instances_and_differs_per_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket_a = dir.path().join("a.sock").to_string_lossy().into_owned();
    let socket_b = dir.path().join("b.sock").to_string_lossy().into_owned();
    let a = Plugin::embedded(dir.path(), &socket_a).await;
    // A second instance on the same state directory shares the root key...
    let b = Plugin::embedded(dir.path(), &socket_b).await;
    let id_a = support::status(&mut a.client().await).await.key_id;
    let id_b = support::status(&mut b.client().await).await.key_id;
    assert_eq!(id_a, id_b);
    // ...and decrypts what the first one encrypted.
    let seed = support::seed();
    let sealed = support::encrypt(&mut a.client().await, &seed).await;
    assert_eq!(support::decrypt(&mut b.client().await, &sealed).await, seed);

    let other = tempfile::tempdir().expect("tempdir");
    let socket_c = support::socket_in(other.path());
    let c = Plugin::embedded(other.path(), &socket_c).await;
    assert_ne!(support::status(&mut c.client().await).await.key_id, id_a);
}

#[tokio::test]
async fn refuses_a_root_key_file_others_can_read() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = support::socket_in(dir.path());
    drop(Plugin::embedded(dir.path(), &socket).await);
    let key = dir.path().join("state/root.key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let state = dir.path().join("state").to_string_lossy().into_owned();
    let mut plugin = Plugin::spawn(
        &socket,
        &["--socket", &socket, "--state-dir", &state],
        &[],
        dir.path(),
    );
    let status = plugin.wait_exit(Duration::from_secs(10));
    assert!(!status.success());
    assert!(plugin.output().contains("chmod 600"), "{}", plugin.output());
}

#[tokio::test]
async fn stale_socket_after_a_crash_is_replaced() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = support::socket_in(dir.path());
    let mut plugin = Plugin::embedded(dir.path(), &socket).await;
    let seed = support::seed();
    let sealed = support::encrypt(&mut plugin.client().await, &seed).await;
    plugin.kill9();
    assert!(
        Path::new(&socket).exists(),
        "SIGKILL leaves the socket file behind"
    );
    plugin.restart().await;
    assert_eq!(
        support::decrypt(&mut plugin.client().await, &sealed).await,
        seed
    );
    plugin.wait_for_output("stale socket").await;
}

#[tokio::test]
async fn a_live_plugin_on_the_socket_is_left_alone() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = support::socket_in(dir.path());
    let first = Plugin::embedded(dir.path(), &socket).await;
    let state = dir.path().join("state").to_string_lossy().into_owned();
    let other_log = dir.path().join("second");
    std::fs::create_dir(&other_log).expect("mkdir");
    let args = ["--socket", &socket, "--state-dir", &state];
    Plugin::start_fails_with(&socket, &args, &[], &other_log, "already serving");
    // The first plugin still serves on its socket.
    assert_eq!(
        support::status(&mut first.client().await).await.healthz,
        "ok"
    );
}

#[tokio::test]
async fn a_path_that_is_not_a_socket_is_refused_and_kept() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("kms.sock");
    std::fs::write(&socket, b"not a socket").expect("write");
    let socket = socket.to_string_lossy().into_owned();
    let state = dir.path().join("state").to_string_lossy().into_owned();
    let args = ["--socket", &socket, "--state-dir", &state];
    Plugin::start_fails_with(&socket, &args, &[], dir.path(), "not a socket");
    assert_eq!(std::fs::read(&socket).expect("kept"), b"not a socket");
}

#[tokio::test]
async fn sigterm_stops_cleanly_and_removes_the_socket() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = support::socket_in(dir.path());
    let mut plugin = Plugin::embedded(dir.path(), &socket).await;
    let mut client = plugin.client().await;
    support::encrypt(&mut client, &support::seed()).await;
    // The client keeps its connection open, as kube-apiserver does: an idle connection must
    // not hold the stop for the whole 5 s drain timeout.
    let signalled = std::time::Instant::now();
    plugin.signal(libc::SIGTERM);
    let status = plugin.wait_exit(Duration::from_secs(10));
    assert!(status.success(), "exit status {status}");
    assert!(
        signalled.elapsed() < Duration::from_secs(3),
        "took {:?}",
        signalled.elapsed()
    );
    assert!(!Path::new(&socket).exists(), "socket removed on shutdown");
    assert!(
        plugin.output().contains("no calls in flight"),
        "{}",
        plugin.output()
    );
    drop(client);
}

/// On SIGTERM every open connection, an idle one too, gets an HTTP/2 GOAWAY with NO_ERROR
/// before the plugin exits: the client knows to reconnect instead of calling into a
/// closing socket.
#[tokio::test]
async fn sigterm_sends_goaway_on_idle_connections() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const SETTINGS: u8 = 0x4;
    const GOAWAY: u8 = 0x7;

    /// The next frame's type and payload, or `None` at EOF.
    async fn frame(conn: &mut tokio::net::UnixStream) -> Option<(u8, Vec<u8>)> {
        let mut head = [0u8; 9];
        conn.read_exact(&mut head).await.ok()?;
        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        let mut payload = vec![0; len];
        conn.read_exact(&mut payload).await.ok()?;
        Some((head[3], payload))
    }

    let dir = tempfile::tempdir().expect("tempdir");
    let socket = support::socket_in(dir.path());
    let mut plugin = Plugin::embedded(dir.path(), &socket).await;
    let mut conn = tokio::net::UnixStream::connect(&socket)
        .await
        .expect("connect");
    // The client preface and an empty SETTINGS frame; the server answers with its SETTINGS.
    let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    hello.extend_from_slice(&[0, 0, 0, SETTINGS, 0, 0, 0, 0, 0]);
    conn.write_all(&hello).await.expect("preface");
    let first = tokio::time::timeout(Duration::from_secs(5), frame(&mut conn))
        .await
        .expect("server SETTINGS in time");
    assert_eq!(first.map(|(kind, _)| kind), Some(SETTINGS));

    plugin.signal(libc::SIGTERM);
    let goaway = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some((kind, payload)) = frame(&mut conn).await {
            if kind == GOAWAY {
                return Some(payload);
            }
        }
        None
    })
    .await
    .expect("the connection ended in time")
    .unwrap_or_else(|| panic!("closed without a GOAWAY; {}", plugin.output()));
    // Last stream id (4 bytes), then the error code: NO_ERROR.
    assert_eq!(goaway.get(4..8), Some(&[0u8, 0, 0, 0][..]), "{goaway:?}");
    let status = plugin.wait_exit(Duration::from_secs(10));
    assert!(status.success(), "exit status {status}");
}

/// A service or method the plugin does not serve gets UNIMPLEMENTED, and the plugin serves
/// on.
#[tokio::test]
async fn unknown_services_and_methods_are_unimplemented() {
    use kms_plugin::proto::v2::{StatusRequest, StatusResponse};
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = support::socket_in(dir.path());
    let plugin = Plugin::embedded(dir.path(), &socket).await;
    let channel = kms_plugin::client::connect(&socket).await.expect("connect");
    for path in [
        "/v2.KeyManagementService/Nope",
        "/v1beta1.KeyManagementService/Encrypt",
        "/grpc.health.v1.Health/Check",
        "/v2.KeyManagementServiceX/Status",
    ] {
        let mut grpc = tonic::client::Grpc::new(channel.clone());
        grpc.ready().await.expect("ready");
        let err = grpc
            .unary(
                tonic::Request::new(StatusRequest {}),
                http::uri::PathAndQuery::from_static(path),
                tonic_prost::ProstCodec::<StatusRequest, StatusResponse>::default(),
            )
            .await
            .expect_err(path);
        assert_eq!(err.code(), tonic::Code::Unimplemented, "{path}: {err:?}");
    }
    let mut client = plugin.client().await;
    assert_eq!(support::status(&mut client).await.healthz, "ok");
}

#[tokio::test]
async fn sighup_does_not_kill_the_plugin() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = support::socket_in(dir.path());
    let mut plugin = Plugin::embedded(dir.path(), &socket).await;
    plugin.signal(libc::SIGHUP);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(plugin.try_wait().is_none(), "SIGHUP killed the plugin");
    assert_eq!(
        support::status(&mut plugin.client().await).await.healthz,
        "ok"
    );
}

#[tokio::test]
async fn abstract_socket_serves() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = format!("@kms-plugin-test-{}", rand::random::<u64>());
    let allowed = format!("allowed_uids = [{}]", support::my_uid());
    let config = support::file_root_config(dir.path(), &socket, &allowed);
    let plugin = Plugin::start(&socket, &["--config", &config], &[], dir.path()).await;
    let mut client = plugin.client().await;
    let seed = support::seed();
    let sealed = support::encrypt(&mut client, &seed).await;
    assert_eq!(support::decrypt(&mut client, &sealed).await, seed);
}

/// An abstract socket has no file mode: without an allow-list any local process could call.
#[tokio::test]
async fn abstract_socket_without_allowed_uids_is_refused_at_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = format!("@kms-plugin-test-{}", rand::random::<u64>());
    let state = dir.path().join("state").to_string_lossy().into_owned();
    let args = ["--socket", &socket, "--state-dir", &state];
    let err = Plugin::start_fails_with(&socket, &args, &[], dir.path(), "abstract socket");
    assert!(
        err.contains("no file permissions") && err.contains("Set allowed_uids"),
        "{err}"
    );
    assert!(
        !dir.path().join("state/root.key").exists(),
        "refused before any work"
    );
    let config = support::file_root_config(dir.path(), &socket, "");
    let args = ["--config", &config];
    Plugin::start_fails_with(&socket, &args, &[], dir.path(), "allowed_uids");
}

#[tokio::test]
async fn status_command_reports_health_and_detail() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = support::socket_in(dir.path());
    let plugin = Plugin::embedded(dir.path(), &socket).await;
    let key_id = support::status(&mut plugin.client().await).await.key_id;
    let out = support::run_cli(&["status", "--socket", &socket], &[]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("healthz: ok"), "{text}");
    assert!(text.contains(&key_id), "{text}");
    assert!(text.contains("root default (file, active)"), "{text}");

    let missing = dir
        .path()
        .join("nothing.sock")
        .to_string_lossy()
        .into_owned();
    let out = support::run_cli(&["status", "--socket", &missing], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no plugin answers"));
}

#[tokio::test]
async fn bad_config_files_are_rejected_with_the_reason() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("bad.toml");
    std::fs::write(
        &config,
        "[kek]\nactive = \"main\"\n[keys.main]\nprovider = \"file\"\npath = \"/x\"\ntypo = 1\n",
    )
    .expect("write");
    let out = support::run_cli(&["serve", "--config", &config.to_string_lossy()], &[]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("typo") && err.contains("bad.toml"), "{err}");

    let out = support::run_cli(&["serve", "--config", "/nonexistent/kms.toml"], &[]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read config file"));
}

/// A uid off `allowed_uids` loses its connection before the plugin reads or writes a byte:
/// no HTTP/2 settings, no gRPC status.
#[tokio::test]
async fn callers_outside_allowed_uids_are_closed_at_accept() {
    use std::io::{Read, Write};
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = support::socket_in(dir.path());
    let me = support::my_uid();
    let addr = free_addr();
    let other = format!(
        "allowed_uids = [{}]\nmetrics_listen = \"{addr}\"",
        me.wrapping_add(12345)
    );
    let config = support::file_root_config(dir.path(), &socket, &other);
    let mut plugin = Plugin::spawn(&socket, &["--config", &config], &[], dir.path());
    plugin.wait_for_output("serving KMS v2").await;
    for _ in 0..20 {
        let mut conn = std::os::unix::net::UnixStream::connect(&socket).expect("connect");
        conn.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        // The client preface and an empty SETTINGS frame, as every gRPC client starts.
        let _ = conn.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0");
        let mut got = Vec::new();
        match conn.read_to_end(&mut got) {
            Ok(_) => {}
            Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}"),
        }
        assert!(got.is_empty(), "the plugin answered: {got:?}");
    }
    let answered = match support::connect(&socket).await {
        Ok(mut client) => client
            .status(kms_plugin::proto::v2::StatusRequest {})
            .await
            .is_ok(),
        Err(_) => false,
    };
    assert!(!answered, "a refused uid got a Status");
    let out = support::run_cli(&["status", "--socket", &socket], &[]);
    assert!(!out.status.success());
    // The log is written by the plugin's writer thread: wait for the line.
    plugin
        .wait_for_output("connection refused: peer uid not in allowed_uids")
        .await;
    let log = plugin.output();
    let refusals: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("connection refused: peer uid not in allowed_uids"))
        .collect();
    // Logged with the uid, but not once per connection: 20+ refusals, a line per 5 s.
    assert!((1..=2).contains(&refusals.len()), "{log}");
    assert!(refusals[0].contains(&format!("uid={me}")), "{log}");
    // Every refusal is counted in the metrics, by its reason.
    let refused = |reason: &str| {
        sample(
            &addr,
            &format!("kms_plugin_connections_refused_total{{reason=\"{reason}\"}}"),
        )
    };
    assert!(refused("peer_uid") >= 20, "{}", refused("peer_uid"));
    assert_eq!(
        (refused("no_credentials"), refused("max_connections")),
        (0, 0)
    );
    assert!(plugin.try_wait().is_none(), "{log}");
}

/// Admin (Info, Reload) has its own allow-list; the KMS service does not depend on it.
#[tokio::test]
async fn admin_service_refuses_uids_outside_admin_uids() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = support::socket_in(dir.path());
    let me = support::my_uid();
    let extra = format!(
        "allowed_uids = [{me}]\nadmin_uids = [{}]",
        me.wrapping_add(12345)
    );
    let config = support::file_root_config(dir.path(), &socket, &extra);
    let plugin = Plugin::start(&socket, &["--config", &config], &[], dir.path()).await;
    let mut client = plugin.client().await;
    assert_eq!(support::status(&mut client).await.healthz, "ok");
    let seed = support::seed();
    let sealed = support::encrypt(&mut client, &seed).await;
    assert_eq!(support::decrypt(&mut client, &sealed).await, seed);

    let channel = kms_plugin::client::connect(&socket).await.expect("connect");
    let mut admin = kms_plugin::client::admin(channel);
    let err = admin
        .info(kms_plugin::proto::admin::InfoRequest {})
        .await
        .expect_err("info refused");
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    assert!(err.message().contains("admin_uids"), "{}", err.message());
    let err = admin
        .reload(kms_plugin::proto::admin::ReloadRequest { force: false })
        .await
        .expect_err("reload refused");
    assert_eq!(err.code(), tonic::Code::PermissionDenied);

    let out = support::run_cli(&["reload", "--socket", &socket], &[]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("admin_uids"));
    // `status` still reports health from the KMS service, just without the admin detail.
    let out = support::run_cli(&["status", "--socket", &socket], &[]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("healthz: ok"),
        "{text}"
    );
    assert!(!text.contains("root main"), "{text}");
}

/// The default admin_uids (root and the plugin's user) let the operator commands work.
#[tokio::test]
async fn reload_command_works_by_default() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = support::socket_in(dir.path());
    let config = support::file_root_config(dir.path(), &socket, "");
    let _plugin = Plugin::start(&socket, &["--config", &config], &[], dir.path()).await;
    let out = support::run_cli(&["reload", "--socket", &socket], &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("reloaded"));
}

#[tokio::test]
async fn every_call_is_logged_as_json_without_secrets() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = support::socket_in(dir.path());
    let state = dir.path().join("state").to_string_lossy().into_owned();
    let args = [
        "--log-format",
        "json",
        "--socket",
        &socket,
        "--state-dir",
        &state,
    ];
    let mut plugin = Plugin::start(&socket, &args, &[], dir.path()).await;
    let mut client = plugin.client().await;
    let seed = support::seed();
    let sealed = client
        .encrypt(kms_plugin::proto::v2::EncryptRequest {
            plaintext: seed.clone(),
            uid: "uid-enc-1".into(),
        })
        .await
        .expect("encrypt")
        .into_inner();
    let mut request = support::decrypt_request(&sealed);
    request.uid = "uid-dec-1".into();
    client.decrypt(request.clone()).await.expect("decrypt");
    request.uid = "uid-dec-2".into();
    request.ciphertext[3] ^= 1;
    assert!(client.decrypt(request).await.is_err());
    plugin.signal(libc::SIGTERM);
    assert!(plugin.wait_exit(Duration::from_secs(10)).success());

    let log = plugin.output();
    let key = std::fs::read(dir.path().join("state/root.key")).expect("key");
    let mut seen = Vec::new();
    for line in log.lines() {
        // Every line is one JSON object; no key, seed or ciphertext bytes in any encoding.
        assert!(
            line.starts_with('{') && line.ends_with('}'),
            "not JSON: {line}"
        );
        for secret in [&key[..], &seed[..], &sealed.ciphertext[..]] {
            assert!(
                !line.contains(&hex::encode(secret)),
                "secret bytes in: {line}"
            );
            assert!(
                !line.contains(&format!("{:?}", &secret[..8])),
                "secret bytes in: {line}"
            );
            for encoded in base64_forms(secret) {
                assert!(!line.contains(&encoded), "secret bytes (base64) in: {line}");
            }
        }
        if let Some(uid) = ["uid-enc-1", "uid-dec-1", "uid-dec-2"]
            .iter()
            .find(|u| line.contains(*u))
        {
            seen.push(*uid);
            assert!(line.contains(&sealed.key_id), "{line}");
            assert!(line.contains("\"outcome\""), "{line}");
            assert!(line.contains("\"micros\""), "{line}");
        }
    }
    assert_eq!(seen, ["uid-enc-1", "uid-dec-1", "uid-dec-2"], "{log}");
    assert!(
        log.contains("\"op\":\"encrypt\"") && log.contains("\"op\":\"decrypt\""),
        "{log}"
    );
    assert!(log.contains("\"outcome\":\"error\""), "{log}");
}

/// The harness's `restart()` does not paper over a plugin that died by itself.
#[tokio::test]
#[should_panic(expected = "had already exited")]
async fn restart_refuses_a_plugin_that_died_unseen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = support::socket_in(dir.path());
    let mut plugin = Plugin::embedded(dir.path(), &socket).await;
    let pid = plugin.pid().expect("running") as i32;
    // SAFETY: kill(2) on our own child's pid has no memory-safety preconditions.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    while plugin.try_wait().is_none() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    plugin.restart().await;
}

/// What any base64 encoding (standard or URL-safe alphabet, padded or not) of a buffer that
/// contains `secret` must contain: for each of the three alignments, the encoding of the
/// whole 3-byte groups of `secret` from that offset.
fn base64_forms(secret: &[u8]) -> Vec<String> {
    const STANDARD: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut forms = Vec::new();
    for offset in 0..3 {
        let groups = secret.get(offset..).unwrap_or_default().chunks_exact(3);
        let mut text = String::new();
        for g in groups {
            let n = u32::from(g[0]) << 16 | u32::from(g[1]) << 8 | u32::from(g[2]);
            for shift in [18, 12, 6, 0] {
                text.push(char::from(STANDARD[(n >> shift & 63) as usize]));
            }
        }
        if !text.is_empty() {
            forms.push(text.replace('+', "-").replace('/', "_"));
            forms.push(text);
        }
    }
    forms
}

#[test]
fn base64_forms_match_a_known_encoding() {
    // base64("xyzsecret-bytes!") = "eHl6c2VjcmV0LWJ5dGVzIQ==": each alignment of the secret
    // inside it is found.
    let whole = "eHl6c2VjcmV0LWJ5dGVzIQ==";
    for (at, secret) in [
        (0, &b"xyzsecret"[..]),
        (1, b"yzsecret-by"),
        (2, b"zsecret-byt"),
    ] {
        assert!(
            base64_forms(secret)
                .iter()
                .any(|f| whole.contains(f.as_str())),
            "offset {at}"
        );
    }
}

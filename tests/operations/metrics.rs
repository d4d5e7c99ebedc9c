//! Prometheus metrics of the real binary, scraped over HTTP like Prometheus would.

use std::io::{Read, Write};

use crate::support::{self, Plugin};

/// The whole HTTP/1.1 response to `method path`.
fn request(addr: &str, method: &str, path: &str) -> String {
    let mut stream = std::net::TcpStream::connect(addr).expect("connect to metrics");
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .expect("send");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("read");
    response
}

pub(super) fn scrape(addr: &str, path: &str) -> String {
    request(addr, "GET", path)
}

/// The value of the sample `series` (name and labels, as exposed) at `addr`.
pub(super) fn sample(addr: &str, series: &str) -> u64 {
    let text = scrape(addr, "/metrics");
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no {series} in:\n{text}"));
    line.parse()
        .unwrap_or_else(|e| panic!("{series} {line}: {e}"))
}

/// Status line and body of `method path`.
fn probe(addr: &str, method: &str, path: &str) -> (String, String) {
    let response = request(addr, method, path);
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let status = head.lines().next().unwrap_or_default().to_string();
    (status, body.to_string())
}

/// A loopback address nothing listens on yet.
pub(super) fn free_addr() -> String {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    format!("127.0.0.1:{port}")
}

#[tokio::test]
async fn metrics_count_calls_roots_and_health() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = support::socket_in(dir.path());
    let addr = free_addr();
    let key = dir.path().join("main.key").to_string_lossy().into_owned();
    let body = format!("provider = \"file\"\npath = \"{key}\"");
    let extra = format!("metrics_listen = \"{addr}\"");
    let config = support::write_config(dir.path(), &socket, "main", &[("main", body)], &extra);
    support::keygen(&config, "main", &[]);
    let config = config.to_string_lossy().into_owned();
    let plugin = Plugin::start(&socket, &["--config", &config], &[], dir.path()).await;

    let mut client = plugin.client().await;
    let key_id = support::status(&mut client).await.key_id;
    let mut sealed = Vec::new();
    for _ in 0..3 {
        sealed.push(support::encrypt(&mut client, &support::seed()).await);
    }
    for s in &sealed[..2] {
        support::decrypt(&mut client, s).await;
    }
    let mut bad = support::decrypt_request(&sealed[2]);
    bad.ciphertext[5] ^= 1;
    assert!(client.decrypt(bad).await.is_err());
    // A forged wrapped copy: one root unwrap that fails to authenticate, then refused from
    // the negative cache without a root call.
    let mut forged = support::decrypt_request(&sealed[2]);
    for wrapped in forged.annotations.values_mut() {
        wrapped[20] ^= 1;
    }
    for _ in 0..2 {
        assert!(client.decrypt(forged.clone()).await.is_err());
    }

    let response = scrape(&addr, "/metrics");
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    for line in [
        "kms_plugin_requests_total{op=\"encrypt\",outcome=\"ok\"} 3".to_string(),
        "kms_plugin_requests_total{op=\"decrypt\",outcome=\"ok\"} 2".to_string(),
        "kms_plugin_requests_total{op=\"decrypt\",outcome=\"error\"} 3".to_string(),
        "kms_plugin_request_duration_seconds_count{op=\"encrypt\"} 3".to_string(),
        format!("kms_plugin_healthy{{key_id=\"{key_id}\"}} 1"),
        format!("kms_plugin_root_calls_total{{root=\"main\",key_id=\"{key_id}\",op=\"wrap\"}} 1"),
        // The unwrap that proved the local KEK's wrapped copy opens, and the forged copy's.
        format!("kms_plugin_root_calls_total{{root=\"main\",key_id=\"{key_id}\",op=\"unwrap\"}} 2"),
        format!(
            "kms_plugin_root_call_duration_seconds_count{{root=\"main\",key_id=\"{key_id}\",op=\"unwrap\"}} 2"
        ),
        format!(
            "kms_plugin_root_call_errors_total{{root=\"main\",key_id=\"{key_id}\",kind=\"not_authentic\"}} 1"
        ),
        // Two good Decrypts and the one with a bad ciphertext found their local KEK cached.
        "kms_plugin_cache_hits_total 3".to_string(),
        "kms_plugin_cache_misses_total 2".to_string(),
        "kms_plugin_cache_negative_hits_total 1".to_string(),
        "kms_plugin_cache_failed_entries 1".to_string(),
        format!(
            "kms_plugin_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        ),
        format!("kms_plugin_root_unwraps_throttled_total{{root=\"main\",key_id=\"{key_id}\"}} 0"),
        format!("kms_plugin_root_state{{root=\"main\",key_id=\"{key_id}\",state=\"ok\"}} 1"),
        format!("kms_plugin_decrypts_total{{root=\"main\",key_id=\"{key_id}\"}} 2"),
        "kms_plugin_local_kek_encryptions 3".to_string(),
        // Far from 80 % of either limit: no successor yet.
        "kms_plugin_local_kek_successor_ready 0".to_string(),
    ] {
        assert!(
            response.lines().any(|l| l == line),
            "missing `{line}` in:\n{response}"
        );
    }
    assert!(
        response
            .to_ascii_lowercase()
            .contains("content-type: application/openmetrics-text; version=1.0.0"),
        "{response}"
    );
    assert!(response.ends_with("# EOF\n"), "{response}");
    // Every sample line is `name{labels} number` or `name number`.
    for line in response.split("\r\n\r\n").nth(1).expect("body").lines() {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let value = line.rsplit(' ').next().expect("value");
        assert!(value.parse::<f64>().is_ok(), "bad sample: {line}");
    }
    assert!(scrape(&addr, "/other").starts_with("HTTP/1.1 404"));
}

/// Slow or idle HTTP clients are cut off, and the listener stays loopback-only by default.
#[tokio::test]
async fn metrics_listener_times_out_half_requests_and_refuses_remote_by_default() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = support::socket_in(dir.path());
    let addr = free_addr();

    // Non-loopback without the opt-in: refused at load, with the reason and the fix.
    let port = addr.rsplit(':').next().unwrap_or_default();
    let remote = format!("metrics_listen = \"0.0.0.0:{port}\"");
    let body = "provider = \"file\"\npath = \"/nonexistent/main.key\"".to_string();
    let config = support::write_config(dir.path(), &socket, "main", &[("main", body)], &remote);
    let out = support::run_cli(&["serve", "--config", &config.to_string_lossy()], &[]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("not a loopback address") && err.contains("metrics_allow_remote = true"),
        "{err}"
    );

    let extra = format!("metrics_listen = \"{addr}\"");
    let config = support::file_root_config(dir.path(), &socket, &extra);
    let plugin = Plugin::start(&socket, &["--config", &config], &[], dir.path()).await;
    let mut half = std::net::TcpStream::connect(&addr).expect("connect");
    half.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
        .expect("send half");
    half.set_read_timeout(Some(std::time::Duration::from_secs(30)))
        .expect("timeout");
    let started = std::time::Instant::now();
    let mut rest = Vec::new();
    // hyper closes the connection (possibly with a 408) once the header timeout passes.
    let _ = half.read_to_end(&mut rest);
    assert!(
        started.elapsed() < std::time::Duration::from_secs(20),
        "half a request held the connection for {:?}",
        started.elapsed()
    );
    let rest = String::from_utf8_lossy(&rest);
    assert!(
        rest.is_empty() || rest.starts_with("HTTP/1.1 408"),
        "{rest}"
    );
    assert!(scrape(&addr, "/metrics").starts_with("HTTP/1.1 200"));

    // Idle connections fill the cap; one more is closed at once; the idle ones time out.
    let idle: Vec<_> = (0..kms_plugin::server::metrics_http::MAX_CONNECTIONS)
        .map(|_| std::net::TcpStream::connect(&addr).expect("connect"))
        .collect();
    std::thread::sleep(std::time::Duration::from_millis(200));
    let mut extra = std::net::TcpStream::connect(&addr).expect("connect");
    extra
        .set_read_timeout(Some(std::time::Duration::from_secs(2)))
        .expect("timeout");
    let mut buf = [0; 16];
    match extra.read(&mut buf) {
        Ok(n) => assert_eq!(n, 0, "over the cap but answered"),
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}"),
    }
    std::thread::sleep(kms_plugin::server::metrics_http::HEADER_READ_TIMEOUT);
    assert!(scrape(&addr, "/metrics").starts_with("HTTP/1.1 200"));
    drop(idle);
    drop(plugin);
}

#[tokio::test]
async fn health_probes_follow_status_without_root_calls() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = support::socket_in(dir.path());
    let addr = free_addr();
    let config =
        support::file_root_config(dir.path(), &socket, &format!("metrics_listen = \"{addr}\""));
    let plugin = Plugin::start(&socket, &["--config", &config], &[], dir.path()).await;
    let calls = |info: &kms_plugin::proto::admin::InfoResponse| {
        info.roots
            .iter()
            .map(|r| r.wrap_calls + r.unwrap_calls)
            .sum::<u64>()
    };
    let before = calls(&support::info(&plugin).await);
    for path in ["/livez", "/readyz", "/healthz"] {
        for _ in 0..20 {
            assert_eq!(
                probe(&addr, "GET", path),
                ("HTTP/1.1 200 OK".to_string(), "ok\n".to_string()),
                "{path}"
            );
        }
    }
    assert_eq!(
        calls(&support::info(&plugin).await),
        before,
        "a probe called a root"
    );
    assert!(
        probe(&addr, "POST", "/readyz")
            .0
            .starts_with("HTTP/1.1 405")
    );
    assert!(probe(&addr, "GET", "/nope").0.starts_with("HTTP/1.1 404"));
    drop(plugin);

    // A plugin that cannot make its first local KEK (its KMS does not answer) is alive but
    // not ready, and says why, as Status does.
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = support::socket_in(dir.path());
    let addr = free_addr();
    let dead = free_addr();
    let body = format!(
        "provider = \"aws-kms\"\nkey_id = \"arn:aws:kms:us-east-1:123456789012:key/\
         00000000-1111-2222-3333-444444444444\"\nregion = \"us-east-1\"\n\
         endpoint = \"http://{dead}\"\nallow_http = true\ntimeout_ms = 500\nattempt_timeout_ms = 200"
    );
    let extra = format!("metrics_listen = \"{addr}\"");
    let config = support::write_config(dir.path(), &socket, "main", &[("main", body)], &extra);
    let env = support::aws_offline_env();
    let config = config.to_string_lossy().into_owned();
    let plugin = Plugin::start(&socket, &["--config", &config], &env, dir.path()).await;
    let healthz = support::status(&mut plugin.client().await).await.healthz;
    assert_ne!(healthz, "ok");
    assert_eq!(probe(&addr, "GET", "/livez").0, "HTTP/1.1 200 OK");
    for path in ["/readyz", "/healthz"] {
        let (status, body) = probe(&addr, "GET", path);
        assert_eq!(status, "HTTP/1.1 503 Service Unavailable", "{path}");
        assert_eq!(body, format!("{healthz}\n"), "{path}");
    }
}

/// The log is written by a worker thread: a reader that stops reading (a stuck journald, a
/// full pipe) costs dropped, counted log lines, never a stalled Encrypt.
#[tokio::test]
async fn a_log_reader_that_stops_reading_never_stalls_a_call() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = support::socket_in(dir.path());
    let addr = free_addr();
    let config =
        support::file_root_config(dir.path(), &socket, &format!("metrics_listen = \"{addr}\""));
    // stderr is a pipe that nobody reads: it fills after about 64 KiB of log.
    let mut child = std::process::Command::new(support::BIN)
        .args(["serve", "--config", &config])
        .env("KMS_PLUGIN_LOG", "debug")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn kms-plugin");
    let _unread = child.stderr.take();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let mut client = loop {
        if let Ok(Ok(mut client)) =
            tokio::time::timeout(std::time::Duration::from_secs(2), support::connect(&socket)).await
            && client
                .status(kms_plugin::proto::v2::StatusRequest {})
                .await
                .is_ok()
        {
            break client;
        }
        assert!(std::time::Instant::now() < deadline, "plugin not ready");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    // At debug level each call logs several lines: 6,000 calls write far more than the pipe
    // and the writer's 16 Ki-line buffer hold.
    for i in 0..6000 {
        let request = kms_plugin::proto::v2::EncryptRequest {
            plaintext: support::seed(),
            uid: support::uid(),
        };
        let call = tokio::time::timeout(std::time::Duration::from_secs(5), client.encrypt(request));
        match call.await {
            Ok(Ok(_)) => {}
            Ok(Err(status)) => panic!("Encrypt {i} failed: {status:?}"),
            Err(_) => panic!("Encrypt {i} stalled behind a full log pipe"),
        }
    }
    let (_, body) = probe(&addr, "GET", "/metrics");
    let dropped: u64 = body
        .lines()
        .find_map(|l| l.strip_prefix("kms_plugin_log_lines_dropped_total "))
        .and_then(|v| v.parse().ok())
        .expect("dropped-lines counter");
    assert!(dropped > 0, "nothing dropped: did the pipe ever fill?");
    let _ = child.kill();
    let _ = child.wait();
}

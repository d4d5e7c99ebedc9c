//! `provider = "pkcs11"` end to end: the real `kms-plugin` binary on a real SoftHSM2 token,
//! spoken to over its socket by a real tonic client.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::support::softhsm::{self, Fips, PIN, SoftHsm};
use crate::support::{self, Plugin};

/// A directory for the plugin's files and a fresh SoftHSM2 with a token "kms".
fn token_kms() -> (TempDir, SoftHsm) {
    let hsm = SoftHsm::new();
    hsm.init_token("kms");
    (tempfile::tempdir().expect("tempdir"), hsm)
}

/// `kms-plugin serve --config CONFIG`, which must fail: its stderr.
fn serve_fails(hsm: &SoftHsm, config: &str) -> String {
    let out = support::run_cli(&["serve", "--config", config], &hsm.env());
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "serve started: {stderr}");
    stderr
}

/// A token "kms" with a PIN file, and a config whose active key is `key_label` on it.
fn setup(hsm: &SoftHsm, dir: &Path, pin: &str, key_label: &str) -> (String, String) {
    let socket = support::socket_in(dir);
    let pin_file = hsm.pin_file(dir, pin);
    let body = softhsm::key_body("kms", key_label, &pin_file);
    let config = support::write_config(dir, &socket, "hsm", &[("hsm", body)], "");
    (socket, config.to_string_lossy().into_owned())
}

fn keygen(hsm: &SoftHsm, config: &str) -> (bool, String, String) {
    let out = support::run_cli(&["keygen", "--config", config, "--key", "hsm"], &hsm.env());
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    (out.status.success(), stdout, stderr)
}

/// The key_id printed by `kms-plugin keygen`.
fn printed_key_id(stdout: &str) -> String {
    stdout
        .split("key_id ")
        .nth(1)
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|| panic!("no key_id in {stdout:?}"))
}

#[tokio::test]
async fn serve_encrypt_decrypt_and_survive_sigkill() {
    let (dir, hsm) = token_kms();
    let (socket, config) = setup(&hsm, dir.path(), PIN, "root");

    let (ok, stdout, stderr) = keygen(&hsm, &config);
    assert!(ok, "keygen failed: {stderr}");
    assert!(stdout.contains("created"), "{stdout}");
    let key_id = printed_key_id(&stdout);
    assert!(key_id.starts_with("pkcs11-"), "{key_id}");
    let (ok, stdout, stderr) = keygen(&hsm, &config);
    assert!(ok, "second keygen failed: {stderr}");
    assert!(stdout.contains("already exists"), "{stdout}");
    assert_eq!(
        printed_key_id(&stdout),
        key_id,
        "key_id stable across processes"
    );

    let mut plugin = Plugin::start(&socket, &["--config", &config], &hsm.env(), dir.path()).await;
    let mut client = plugin.client().await;
    let status = support::status(&mut client).await;
    assert_eq!(status.healthz, "ok");
    assert_eq!(status.key_id, key_id);
    let seed = support::seed();
    let sealed = support::encrypt(&mut client, &seed).await;
    assert_eq!(sealed.key_id, key_id);
    assert_eq!(support::decrypt(&mut client, &sealed).await, seed);

    plugin.kill9();
    plugin.restart().await;
    let mut client = plugin.client().await;
    assert_eq!(support::status(&mut client).await.key_id, key_id);
    assert_eq!(
        support::decrypt(&mut client, &sealed).await,
        seed,
        "decrypt after restart must unwrap the local KEK in the token"
    );
    let again = support::encrypt(&mut client, &seed).await;
    assert_eq!(support::decrypt(&mut client, &again).await, seed);
    assert!(
        !plugin.output().contains(PIN),
        "the PIN appears in the plugin's output"
    );
}

#[tokio::test]
async fn wrong_pin_makes_serve_exit_naming_the_pin() {
    let (dir, hsm) = token_kms();
    let (_, good) = setup(&hsm, dir.path(), PIN, "root");
    let (ok, _, stderr) = keygen(&hsm, &good);
    assert!(ok, "keygen failed: {stderr}");

    let (_, bad) = setup(&hsm, dir.path(), "wrong-pin-0000", "root");
    let stderr = serve_fails(&hsm, &bad);
    assert!(
        stderr.contains("PIN rejected by token \"kms\""),
        "stderr: {stderr}"
    );
    assert!(
        !stderr.contains("wrong-pin-0000"),
        "the PIN leaked: {stderr}"
    );

    let (ok, _, stderr) = keygen(&hsm, &bad);
    assert!(!ok);
    assert!(stderr.contains("PIN rejected"), "keygen stderr: {stderr}");
}

#[tokio::test]
async fn missing_key_or_token_makes_serve_exit_with_the_reason() {
    let (dir, hsm) = token_kms();
    let (_, config) = setup(&hsm, dir.path(), PIN, "never-generated");
    let stderr = serve_fails(&hsm, &config);
    assert!(
        stderr.contains("no AES key labelled \"never-generated\" on token \"kms\""),
        "stderr: {stderr}"
    );

    let text = std::fs::read_to_string(&config)
        .expect("config")
        .replace("token_label = \"kms\"", "token_label = \"elsewhere\"");
    std::fs::write(&config, text).expect("config");
    let stderr = serve_fails(&hsm, &config);
    assert!(
        stderr.contains("no token labelled \"elsewhere\""),
        "stderr: {stderr}"
    );
}

#[tokio::test]
async fn two_tokens_with_one_label_are_refused_and_slot_picks_one() {
    let (dir, hsm) = token_kms();
    let (_, config) = setup(&hsm, dir.path(), PIN, "root");
    let (ok, stdout, stderr) = keygen(&hsm, &config);
    assert!(ok, "keygen failed: {stderr}");
    let key_id = printed_key_id(&stdout);
    // A second `--init-token --label kms`, as an operator retrying might do.
    hsm.init_token("kms");

    let stderr = serve_fails(&hsm, &config);
    assert!(
        stderr.contains("2 tokens are labelled \"kms\""),
        "stderr: {stderr}"
    );
    let (ok, stdout, keygen_err) = keygen(&hsm, &config);
    assert!(!ok, "keygen chose a token: {stdout}");
    assert!(keygen_err.contains("2 tokens are labelled"), "{keygen_err}");

    // The slots the message names: configured by slot, exactly one holds the key.
    let slots: Vec<u64> = stderr
        .split("(slots ")
        .nth(1)
        .and_then(|rest| rest.split(')').next())
        .unwrap_or_else(|| panic!("no slots in {stderr}"))
        .split(", ")
        .map(|id| id.parse().expect("slot id"))
        .collect();
    assert_eq!(slots.len(), 2, "{stderr}");
    let text = std::fs::read_to_string(&config).expect("config");
    let mut served = Vec::new();
    for slot in slots {
        let by_slot = text.replace("token_label = \"kms\"", &format!("slot = {slot}"));
        std::fs::write(&config, by_slot).expect("config");
        let out = support::run_cli(&["check", "--config", &config], &hsm.env());
        if out.status.success() {
            served.push(String::from_utf8_lossy(&out.stdout).into_owned());
        }
    }
    assert_eq!(served.len(), 1, "{served:?}");
    assert!(served[0].contains(&key_id), "{}", served[0]);
}

#[tokio::test]
async fn pin_env_and_an_independent_look_at_the_key() {
    let (dir, hsm) = token_kms();
    let socket = support::socket_in(dir.path());
    let body = format!(
        "provider = \"pkcs11\"\nmodule = \"{}\"\ntoken_label = \"kms\"\nkey_label = \"by-env\"\nkey_id_hex = \"4b4d53\"\npin_env = \"KMS_HSM_PIN\"",
        softhsm::module().display()
    );
    let config = support::write_config(dir.path(), &socket, "hsm", &[("hsm", body)], "");
    let config = config.to_string_lossy().into_owned();
    let mut env = hsm.env();
    env.push(("KMS_HSM_PIN".into(), PIN.into()));
    let out = support::run_cli(&["keygen", "--config", &config, "--key", "hsm"], &env);
    assert!(
        out.status.success(),
        "keygen: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let plugin = Plugin::start(&socket, &["--config", &config], &env, dir.path()).await;
    let mut client = plugin.client().await;
    let seed = support::seed();
    let sealed = support::encrypt(&mut client, &seed).await;
    assert_eq!(support::decrypt(&mut client, &sealed).await, seed);

    // pkcs11-tool (OpenSC), not our code, reports the key's attributes.
    let out = Command::new("pkcs11-tool")
        .args(["--module", &softhsm::module().to_string_lossy()])
        .args(["--token-label", "kms", "--login", "--pin", PIN])
        .args(["--list-objects", "--type", "secrkey"])
        .envs(hsm.env())
        .output()
        .unwrap_or_else(|e| panic!("cannot run pkcs11-tool ({e}): install opensc"));
    let listing = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "pkcs11-tool: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(listing.contains("by-env"), "{listing}");
    assert!(listing.contains("AES length 32"), "{listing}");
    assert!(listing.contains("4b4d53"), "CKA_ID set: {listing}");
    assert!(listing.contains("never extractable"), "{listing}");
    assert!(listing.contains("always sensitive"), "{listing}");
    // And its value cannot be read out.
    let out = Command::new("pkcs11-tool")
        .args(["--module", &softhsm::module().to_string_lossy()])
        .args(["--token-label", "kms", "--login", "--pin", PIN])
        .args(["--read-object", "--type", "secrkey", "--label", "by-env"])
        .envs(hsm.env())
        .output()
        .expect("pkcs11-tool");
    assert!(
        !out.status.success() && out.stdout.is_empty(),
        "key value readable: {:?}",
        out.stdout
    );
}

/// A token "kms" with a key made through plain SoftHSM2 (`kms-plugin keygen`), and a config
/// that uses the same key through the FIPS-like module. Returns (socket, config, key_id
/// printed by keygen).
fn fips_setup(hsm: &SoftHsm, dir: &Path, extra: &str) -> (String, String, String) {
    let (_, plain) = setup(hsm, dir, PIN, "root");
    let (ok, stdout, stderr) = keygen(hsm, &plain);
    assert!(ok, "keygen failed: {stderr}");
    let key_id = printed_key_id(&stdout);
    let socket = support::socket_in(dir);
    let pin_file = hsm.pin_file(dir, PIN);
    let body = softhsm::key_body_via(&softhsm::fips_module(), "kms", "root", &pin_file, extra);
    let config = support::write_config(dir, &socket, "hsm", &[("hsm", body)], "");
    (socket, config.to_string_lossy().into_owned(), key_id)
}

fn env_with(hsm: &SoftHsm, fips: &Fips) -> Vec<(String, String)> {
    let mut env = hsm.env();
    env.extend(fips.env());
    env
}

#[tokio::test]
async fn a_token_that_chooses_the_gcm_iv_unwraps_after_a_restart() {
    // CloudHSM and Luna ignore the IV in CK_GCM_PARAMS and write back their own: the wrap
    // must store that one, or the local KEK cannot be unwrapped by the next process.
    let (dir, hsm) = token_kms();
    let (socket, config, key_id) = fips_setup(&hsm, dir.path(), "");
    let env = env_with(&hsm, &Fips::default());
    let mut plugin = Plugin::start(&socket, &["--config", &config], &env, dir.path()).await;
    let mut client = plugin.client().await;
    assert_eq!(
        support::status(&mut client).await.key_id,
        key_id,
        "ECB still gives the key_id"
    );
    let seed = support::seed();
    let sealed = support::encrypt(&mut client, &seed).await;

    plugin.kill9();
    plugin.restart().await;
    let mut client = plugin.client().await;
    let plain = client
        .decrypt(support::decrypt_request(&sealed))
        .await
        .unwrap_or_else(|e| {
            panic!(
                "decrypt after restart on an IV-choosing token: {e}\n{}",
                plugin.output()
            )
        })
        .into_inner()
        .plaintext;
    assert_eq!(plain, seed);
}

#[tokio::test]
async fn a_token_that_chooses_the_gcm_iv_and_refuses_ecb_keeps_the_key_id() {
    // The check value falls back past ECB; GCM is useless when the token picks the IV, so
    // it must be CBC with a zero IV, which equals the ECB value: the key_id is the one the
    // plain module gives, on every run.
    let (dir, hsm) = token_kms();
    let (socket, config, key_id) = fips_setup(&hsm, dir.path(), "");
    let fips = Fips {
        refuse_ecb: true,
        ..Fips::default()
    };
    let mut plugin = Plugin::start(
        &socket,
        &["--config", &config],
        &env_with(&hsm, &fips),
        dir.path(),
    )
    .await;
    let mut client = plugin.client().await;
    assert_eq!(support::status(&mut client).await.key_id, key_id);
    let seed = support::seed();
    let sealed = support::encrypt(&mut client, &seed).await;
    assert_eq!(sealed.key_id, key_id);

    plugin.kill9();
    plugin.restart().await;
    let mut client = plugin.client().await;
    assert_eq!(
        support::status(&mut client).await.key_id,
        key_id,
        "key_id changed across a restart"
    );
    assert_eq!(support::decrypt(&mut client, &sealed).await, seed);
}

/// Decrypt: the plaintext or the status, and how long it took.
async fn timed_decrypt(
    plugin: &Plugin,
    sealed: &kms_plugin::proto::v2::EncryptResponse,
) -> (Result<Vec<u8>, tonic::Status>, Duration) {
    let mut client = plugin.client().await;
    let started = Instant::now();
    let result = client
        .decrypt(support::decrypt_request(sealed))
        .await
        .map(|r| r.into_inner().plaintext);
    (result, started.elapsed())
}

/// Decrypt over plain HTTP/2 with a `grpc-timeout` header of `ms`; returns the grpc-status.
/// (tonic's client enforces a deadline itself and cancels the call before the plugin's
/// answer arrives.)
async fn decrypt_with_deadline_header(
    socket: &str,
    sealed: &kms_plugin::proto::v2::EncryptResponse,
    ms: u64,
) -> i32 {
    let io = tokio::net::UnixStream::connect(socket)
        .await
        .expect("connect");
    let (client, connection) = h2::client::handshake(io).await.expect("h2 handshake");
    tokio::spawn(connection);
    let mut client = client.ready().await.expect("h2 ready");
    let request = http::Request::post("http://localhost/v2.KeyManagementService/Decrypt")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("grpc-timeout", format!("{ms}m"))
        .body(())
        .expect("request");
    let (response, mut send) = client.send_request(request, false).expect("send");
    let message = prost::Message::encode_to_vec(&support::decrypt_request(sealed));
    let mut frame = vec![0u8];
    frame.extend_from_slice(&(message.len() as u32).to_be_bytes());
    frame.extend_from_slice(&message);
    send.send_data(frame.into(), true).expect("send body");
    let response = response.await.expect("response");
    let status = |headers: &http::HeaderMap| {
        headers
            .get("grpc-status")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<i32>().ok())
    };
    if let Some(code) = status(response.headers()) {
        return code; // a trailers-only response
    }
    let mut body = response.into_body();
    while let Some(chunk) = body.data().await {
        chunk.expect("response body");
    }
    let trailers = body.trailers().await.expect("trailers").unwrap_or_default();
    status(&trailers).expect("grpc-status")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_token_costs_callers_an_error_not_a_hang() {
    let (dir, hsm) = token_kms();
    let (socket, config, _) = fips_setup(&hsm, dir.path(), "timeout_ms = 1000");
    let stall = dir.path().join("stall");
    let fips = Fips {
        stall_file: Some(stall.clone()),
        ..Fips::default()
    };
    let env = env_with(&hsm, &fips);
    let mut plugin = Plugin::start(&socket, &["--config", &config], &env, dir.path()).await;
    // Each start makes a new local KEK, so what an earlier run sealed needs an unwrap.
    let seed = support::seed();
    let first = support::encrypt(&mut plugin.client().await, &seed).await;
    plugin.restart().await;
    let second = support::encrypt(&mut plugin.client().await, &seed).await;
    plugin.restart().await;
    let cached = support::encrypt(&mut plugin.client().await, &seed).await;

    std::fs::write(&stall, "").expect("stall file");
    // No client deadline: the plugin's own (3 s) is longer than timeout_ms, so the root
    // call's timeout answers.
    let (result, took) = timed_decrypt(&plugin, &first).await;
    let status = result.expect_err("decrypt through a hung token succeeded");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_millis(2900),
        "answered after {took:?}, expected about timeout_ms = 1000"
    );
    // The log is written by a worker thread: wait for the line rather than race it.
    plugin
        .wait_for_output("did not answer within 1000 ms")
        .await;
    let log = plugin.output();
    assert!(log.contains("kms"), "the log names the token:\n{log}");
    // What needs no token call answers at once.
    let mut client = plugin.client().await;
    let status = tokio::time::timeout(Duration::from_secs(1), support::status(&mut client))
        .await
        .expect("Status waits on the hung token");
    assert_eq!(status.healthz, "ok");
    let (result, _) = tokio::time::timeout(Duration::from_secs(1), timed_decrypt(&plugin, &cached))
        .await
        .expect("a Decrypt of a cached local KEK waits on the hung token");
    assert_eq!(result.expect("decrypt cached"), seed);
    // A client deadline shorter than timeout_ms is the client's: DeadlineExceeded from the
    // plugin's handler, or Cancelled when tonic's own grpc-timeout layer answers first.
    let started = Instant::now();
    let code = decrypt_with_deadline_header(&plugin.socket, &first, 300).await;
    assert!(
        code == tonic::Code::DeadlineExceeded as i32 || code == tonic::Code::Cancelled as i32,
        "grpc-status {code}"
    );
    assert!(
        started.elapsed() < Duration::from_millis(900),
        "took {:?}",
        started.elapsed()
    );
    // Every call that hangs keeps its session permit, so however many calls come, at most
    // 4 (the session pool) threads are ever stuck in the token; the rest time out waiting.
    for _ in 0..6 {
        let (result, took) = timed_decrypt(&plugin, &first).await;
        assert_eq!(
            result.expect_err("succeeded").code(),
            tonic::Code::Unavailable
        );
        assert!(took < Duration::from_millis(2900), "took {took:?}");
    }
    let stuck = std::fs::read_to_string(&stall)
        .expect("stall file")
        .lines()
        .count();
    assert!(
        (1..=4).contains(&stuck),
        "{stuck} threads entered the hung token; at most 4 may"
    );

    // The token comes back: so does the plugin.
    std::fs::remove_file(&stall).expect("unstall");
    let (result, _) = timed_decrypt(&plugin, &first).await;
    assert_eq!(result.expect("decrypt after the token recovered"), seed);

    // SIGTERM while a call hangs in the token: the plugin still exits promptly.
    std::fs::write(&stall, "").expect("stall file");
    let pending = {
        let socket = plugin.socket.clone();
        let second = second.clone();
        tokio::spawn(async move {
            let mut client = support::connect(&socket).await.expect("connect");
            client.decrypt(support::decrypt_request(&second)).await
        })
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while std::fs::read_to_string(&stall)
        .unwrap_or_default()
        .is_empty()
    {
        assert!(
            Instant::now() < deadline,
            "the Decrypt never reached the token"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    plugin.signal(libc::SIGTERM);
    let exited = plugin.wait_exit(Duration::from_secs(5));
    assert!(exited.success(), "exit status {exited}");
    let _ = pending.await;
    std::fs::remove_file(&stall).expect("unstall");
}

#[tokio::test]
async fn a_hung_token_at_start_up_fails_serve_in_30_s() {
    let (dir, hsm) = token_kms();
    let (_, config, _) = fips_setup(&hsm, dir.path(), "");
    let stall = dir.path().join("stall");
    std::fs::write(&stall, "").expect("stall file");
    let fips = Fips {
        stall_file: Some(stall.clone()),
        ..Fips::default()
    };
    let started = Instant::now();
    let out = support::run_cli(&["serve", "--config", &config], &env_with(&hsm, &fips));
    let took = started.elapsed();
    std::fs::remove_file(&stall).expect("unstall");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "serve started on a hung token");
    assert!(
        stderr.contains("token \"kms\" did not answer within 30 s"),
        "stderr: {stderr}"
    );
    assert!(
        took < Duration::from_secs(40),
        "serve took {took:?} to give up"
    );
}

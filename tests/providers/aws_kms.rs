//! The aws-kms provider against a real KMS emulator (moto), through the real binary,
//! socket and tonic client.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use aws_sdk_kms::primitives::Blob;
use kms_plugin::envelope::annotations::wrapped_kek_key;
use kms_plugin::proto::v2::EncryptRequest;
use kms_plugin::root::WrapContext;
use tempfile::TempDir;
use tonic::Code;

use crate::support::moto::{self, Moto};
use crate::support::{self, Plugin};

fn env() -> Vec<(String, String)> {
    moto::plugin_env()
}

fn key_body(arn: &str, endpoint: &str, extra: &str) -> String {
    format!(
        "provider = \"aws-kms\"\nkey_id = \"{arn}\"\nregion = \"{}\"\nendpoint = \"{endpoint}\"\nallow_http = true\n{extra}",
        moto::REGION
    )
}

/// Writes the config (active key first) and starts the plugin.
async fn start(dir: &Path, keys: &[(&str, String)], extra: &str) -> Plugin {
    let config = write(dir, keys, extra);
    Plugin::start(
        &support::socket_in(dir),
        &["--config", &config],
        &env(),
        dir,
    )
    .await
}

/// A plugin whose one root "main" is the key `arn`, reached at `endpoint`.
async fn start_main(dir: &Path, arn: &str, endpoint: &str, extra: &str) -> Plugin {
    start(dir, &[("main", key_body(arn, endpoint, ""))], extra).await
}

/// Writes the config (active key first); returns its path.
fn write(dir: &Path, keys: &[(&str, String)], extra: &str) -> String {
    let socket = support::socket_in(dir);
    let config = support::write_config(dir, &socket, keys[0].0, keys, extra);
    config.to_string_lossy().into_owned()
}

/// A moto KMS emulator with one key, that key's ARN, and a directory for the plugin's files.
async fn kms_with_a_key() -> (Moto, String, TempDir) {
    let moto = Moto::start();
    let arn = moto::create_key(&moto::client(&moto.endpoint())).await;
    (moto, arn, tempfile::tempdir().expect("tempdir"))
}

async fn calls(plugin: &Plugin, name: &str) -> (u64, u64) {
    let info = support::info(plugin).await;
    let r = support::root_info(&info, name);
    (r.wrap_calls, r.unwrap_calls)
}

async fn healthz(plugin: &Plugin) -> String {
    support::status(&mut plugin.client().await).await.healthz
}

#[tokio::test]
async fn seeds_round_trip_and_survive_sigkill_restart() {
    let (moto, arn, dir) = kms_with_a_key().await;
    let mut plugin = start_main(dir.path(), &arn, &moto.endpoint(), "").await;
    let status = support::status(&mut plugin.client().await).await;
    assert_eq!(status.healthz, "ok");
    assert!(status.key_id.starts_with("aws-"), "{}", status.key_id);

    let sealed = support::batch(&plugin, 10).await;
    for (s, _) in &sealed {
        assert_eq!(s.key_id, status.key_id);
    }
    support::all_decrypt(&plugin, &sealed).await;

    // The plugin logs at debug level in tests (SDK included): the secret never shows.
    assert!(!plugin.output().contains(moto::SECRET_ACCESS_KEY));

    plugin.restart().await;
    assert_eq!(
        support::status(&mut plugin.client().await).await.key_id,
        status.key_id
    );
    support::all_decrypt(&plugin, &sealed).await;
}

#[tokio::test]
async fn kms_is_called_once_per_local_kek_not_per_request() {
    let (moto, arn, dir) = kms_with_a_key().await;
    let mut plugin = start_main(dir.path(), &arn, &moto.endpoint(), "").await;

    let sealed = support::batch(&plugin, 20).await;
    support::all_decrypt(&plugin, &sealed).await;
    support::all_decrypt(&plugin, &sealed).await;
    // One Encrypt for the first local KEK and one Decrypt proving its copy opens; nothing
    // per request: the fresh local KEK is cached.
    assert_eq!(calls(&plugin, "main").await, (1, 1));

    plugin.restart().await;
    assert_eq!(
        calls(&plugin, "main").await,
        (1, 1),
        "start-up wraps (and checks) one new local KEK"
    );
    support::all_decrypt(&plugin, &sealed).await;
    support::all_decrypt(&plugin, &sealed).await;
    // 20 ciphertexts under one local KEK, decrypted twice: one more KMS Decrypt.
    assert_eq!(calls(&plugin, "main").await, (1, 2));
}

#[tokio::test]
async fn wrong_encryption_context_is_refused() {
    let moto = Moto::start();
    let kms = moto::client(&moto.endpoint());
    let arn = moto::create_key(&kms).await;
    let other_arn = moto::create_key(&kms).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let context_a = "[keys.main.encryption_context]\ncluster = \"a\"\n";
    let body = |ctx: &str| key_body(&arn, &moto.endpoint(), ctx);
    let mut plugin = start(dir.path(), &[("main", body(context_a))], "").await;
    let sealed = support::batch(&plugin, 3).await;
    let key_id = sealed[0].0.key_id.clone();
    let wrapped = sealed[0].0.annotations[&wrapped_kek_key(&key_id)].clone();

    // Directly at KMS: the wrapped local KEK opens only with the full context.
    let parsed = kms_plugin::root::KeyId::parse(&key_id).expect("key_id");
    let mut context: HashMap<String, String> = WrapContext::new(&parsed)
        .pairs()
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    context.insert("cluster".into(), "a".into());
    let decrypt = |ctx: Option<HashMap<String, String>>, key: &str| {
        kms.decrypt()
            .key_id(key)
            .ciphertext_blob(Blob::new(wrapped.clone()))
            .set_encryption_context(ctx)
            .send()
    };
    let ok = decrypt(Some(context.clone()), &arn)
        .await
        .expect("decrypt with the full context");
    assert_eq!(ok.plaintext().map(|p| p.as_ref().len()), Some(32));
    let code = |e: &aws_sdk_kms::error::SdkError<_>| {
        aws_sdk_kms::error::ProvideErrorMetadata::code(e)
            .unwrap_or("")
            .to_string()
    };
    let none = decrypt(None, &arn).await.expect_err("no context");
    assert_eq!(code(&none), "InvalidCiphertextException");
    let mut other_plugin = context.clone();
    other_plugin.insert(
        "kms-plugin/key-id".into(),
        "aws-00000000000000000000000000000000".into(),
    );
    let foreign = decrypt(Some(other_plugin), &arn)
        .await
        .expect_err("another key_id");
    assert_eq!(code(&foreign), "InvalidCiphertextException");
    // Pinned to another key: refused (real KMS says IncorrectKeyException, moto AccessDenied).
    let pinned = decrypt(Some(context), &other_arn)
        .await
        .expect_err("other key");
    assert!(
        ["IncorrectKeyException", "AccessDeniedException"].contains(&code(&pinned).as_str()),
        "{}",
        code(&pinned)
    );

    // Through the plugin: the same key with another configured context cannot open them.
    write(
        dir.path(),
        &[(
            "main",
            body("[keys.main.encryption_context]\ncluster = \"b\"\n"),
        )],
        "",
    );
    plugin.restart().await;
    let mut client = plugin.client().await;
    let err = client
        .decrypt(support::decrypt_request(&sealed[0].0))
        .await
        .expect_err("wrong context must fail");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert_eq!(
        healthz(&plugin).await,
        "ok",
        "a bad blob says nothing about the root"
    );
}

#[tokio::test]
async fn unknown_key_fails_clearly() {
    let (moto, arn, dir) = kms_with_a_key().await;
    let ghost = "arn:aws:kms:us-east-1:123456789012:key/00000000-1111-2222-3333-444444444444";

    // As the active key: start-up fails, naming the key and the reason.
    let socket = support::socket_in(dir.path());
    let config = write(
        dir.path(),
        &[("ghost", key_body(ghost, &moto.endpoint(), ""))],
        "",
    );
    let args = ["--config", &config];
    let output = Plugin::start_fails_with(&socket, &args, &env(), dir.path(), "\"ghost\"");
    assert!(
        output.contains("not found") && output.contains("NotFoundException"),
        "{output}"
    );

    // As a retired key: the plugin runs; a Decrypt that needs it fails with
    // FailedPrecondition (never Internal) and the active key stays healthy.
    let keys = [
        ("main", key_body(&arn, &moto.endpoint(), "")),
        ("ghost", key_body(ghost, &moto.endpoint(), "")),
    ];
    let path = PathBuf::from(write(dir.path(), &keys, ""));
    let text = std::fs::read_to_string(&path).expect("config");
    let text = text.replace(
        "active = \"main\"\n",
        "active = \"main\"\nretired = [\"ghost\"]\n",
    );
    std::fs::write(&path, text).expect("config");
    let config = path.to_string_lossy().into_owned();
    let plugin = Plugin::start(&socket, &["--config", &config], &env(), dir.path()).await;
    let info = support::info(&plugin).await;
    let ghost_id = support::root_info(&info, "ghost").key_id.clone();
    let sealed = support::batch(&plugin, 1).await;
    let mut request = support::decrypt_request(&sealed[0].0);
    let wrapped = request
        .annotations
        .drain()
        .map(|(_, v)| v)
        .next()
        .expect("wrapped copy");
    request
        .annotations
        .insert(wrapped_kek_key(&ghost_id), wrapped);
    request.key_id = ghost_id;
    let err = plugin
        .client()
        .await
        .decrypt(request)
        .await
        .expect_err("ghost key");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    let info = support::info(&plugin).await;
    let ghost_root = support::root_info(&info, "ghost");
    assert_eq!(ghost_root.state, "rejected");
    assert!(
        ghost_root.last_error.contains("not found"),
        "{}",
        ghost_root.last_error
    );
    assert_eq!(healthz(&plugin).await, "ok");
}

#[tokio::test]
async fn kms_outage_keeps_cached_keys_and_recovers() {
    let (moto, arn, dir) = kms_with_a_key().await;
    // The plugin reaches moto through a proxy we can cut; moto keeps its keys.
    let proxy = moto::Proxy::start(moto.port).await;
    let extra = "[local_kek]\nmax_encryptions = 1000\n[health]\nretry_interval_seconds = 1\n";
    let plugin = start_main(dir.path(), &arn, &proxy.endpoint(), extra).await;
    let before = support::batch(&plugin, 1).await;

    proxy.set_up(false);
    // The current local KEK seals its remaining 999 values; its successor (due at 800) cannot
    // be made, which is degraded, not failed, until the current one is spent.
    let mut client = plugin.client().await;
    let mut during = Vec::new();
    let failure = loop {
        let seed = support::seed();
        let request = EncryptRequest {
            plaintext: seed.clone(),
            uid: support::uid(),
        };
        match client.encrypt(request).await {
            Ok(sealed) => during.push((sealed.into_inner(), seed)),
            Err(status) => break status,
        }
        if during.len() == 900 {
            assert_eq!(healthz(&plugin).await, "ok", "degraded is not failed");
        }
        assert!(during.len() <= 999, "Encrypt kept working without KMS");
    };
    assert_eq!(
        during.len(),
        999,
        "a local KEK seals exactly max_encryptions"
    );
    assert_eq!(failure.code(), Code::Unavailable, "{failure:?}");
    assert_ne!(healthz(&plugin).await, "ok");
    // Once the successor's KMS Encrypt has spent its budget, Status names the key and why.
    let health = support::eventually(
        Duration::from_secs(10),
        "healthz naming the key",
        async || {
            let health = healthz(&plugin).await;
            if health.contains("\"main\"") {
                Ok(health)
            } else {
                Err(health)
            }
        },
    )
    .await;
    assert!(
        health.contains("aws-kms") && health.contains("KMS Encrypt"),
        "{health}"
    );
    eprintln!("healthz during the outage: {health}");
    // Everything already unwrapped still decrypts.
    support::all_decrypt(&plugin, &before).await;
    support::all_decrypt(&plugin, &during).await;

    proxy.set_up(true);
    support::eventually(Duration::from_secs(15), "recovered", async || {
        let health = healthz(&plugin).await;
        if health == "ok" { Ok(()) } else { Err(health) }
    })
    .await;
    let after = support::batch(&plugin, 2).await;
    support::all_decrypt(&plugin, &after).await;
    support::all_decrypt(&plugin, &before).await;
}

#[tokio::test]
async fn keygen_checks_the_key_in_aws_and_creates_nothing() {
    let (moto, arn, dir) = kms_with_a_key().await;
    let ghost = "arn:aws:kms:us-east-1:123456789012:key/00000000-1111-2222-3333-444444444444";
    let keys = [
        ("main", key_body(&arn, &moto.endpoint(), "")),
        ("ghost", key_body(ghost, &moto.endpoint(), "")),
    ];
    let config = write(dir.path(), &keys, "");

    let kms = moto::client(&moto.endpoint());
    let keys_before = key_ids(&kms).await;
    assert_eq!(keys_before.len(), 1, "{keys_before:?}");

    let out = support::run_cli(&["keygen", "--config", &config, "--key", "main"], &env());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("already exists") && stdout.contains("key_id aws-"),
        "{stdout}"
    );

    let out = support::run_cli(&["keygen", "--config", &config, "--key", "ghost"], &env());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("created in AWS"), "{stderr}");
    assert_eq!(key_ids(&kms).await, keys_before, "keygen created a KMS key");
}

/// Every key id in the emulator (ListKeys, all pages).
async fn key_ids(kms: &aws_sdk_kms::Client) -> Vec<String> {
    let mut ids = Vec::new();
    let mut marker = None;
    loop {
        let page = kms
            .list_keys()
            .set_marker(marker)
            .send()
            .await
            .expect("ListKeys");
        ids.extend(
            page.keys()
                .iter()
                .filter_map(|k| k.key_id().map(String::from)),
        );
        marker = page.next_marker().map(String::from);
        if marker.is_none() {
            break;
        }
    }
    ids.sort();
    ids
}

/// SIGTERM while a Decrypt waits on KMS: the call still gets the plugin's own answer (here
/// Unavailable after the retry budget), not a dropped connection, and then the plugin exits 0.
#[tokio::test]
async fn sigterm_lets_a_call_in_flight_finish() {
    let (moto, arn, dir) = kms_with_a_key().await;
    let proxy = moto::Proxy::start(moto.port).await;
    let mut plugin = start_main(dir.path(), &arn, &proxy.endpoint(), "").await;
    let sealed = support::encrypt(&mut plugin.client().await, &support::seed()).await;
    // A restart empties the cache; with KMS cut, Decrypt spends its retry budget (2.5 s).
    plugin.restart().await;
    proxy.set_up(false);
    let mut client = plugin.client().await;
    let call = tokio::spawn(async move { client.decrypt(support::decrypt_request(&sealed)).await });
    // In flight: the plugin has tried KMS for it and is waiting to try again.
    plugin.wait_for_output("retrying KMS call").await;
    assert!(!call.is_finished(), "the Decrypt is no longer in flight");
    plugin.signal(libc::SIGTERM);
    let answer = call.await.expect("task").expect_err("KMS is down");
    assert_eq!(answer.code(), Code::Unavailable, "{answer:?}");
    assert!(
        answer.message().contains("root key \"main\""),
        "not the plugin's answer: {answer:?}"
    );
    let status = plugin.wait_exit(Duration::from_secs(10));
    assert!(status.success(), "{status}\n{}", plugin.output());
}

//! Root key rotation through the real binary, from a file key to a key of every provider of
//! the table in `support::backends` (`for_each_provider!`): `kms-plugin rotate` under load,
//! dropping a retired key, and `also_wrap` disaster recovery after losing either key. Each
//! generic test is `PROVIDER::CASE`; provider- and config-specific cases are in `rotation/`.
#![allow(unsafe_code)] // tests drive processes and limits through libc (kill, pipe, rlimit, getuid)
#![allow(missing_docs)] // test harness items are shared between modules, not a documented API

mod support;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use kms_plugin::proto::v2::EncryptRequest;
use tonic::Code;

use support::backends::Backend;
use support::{Plugin, all_decrypt, batch};

/// A plugin with root keys `a` (active) and `b` (configured as `kek_extra` says).
pub struct Setup {
    pub dir: tempfile::TempDir,
    pub plugin: Plugin,
    pub config: PathBuf,
    pub a: String,
    pub b: String,
    pub env: Vec<(String, String)>,
}

/// Starts a plugin with a fresh key `a` of backend `ka` (active) and `b` of backend `kb`.
pub async fn two_keys<A: Backend, B: Backend>(ka: &A, kb: &B, kek_extra: &str) -> Setup {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = ka.new_key(dir.path(), "a").await;
    let b = kb.new_key(dir.path(), "b").await;
    let mut env = ka.env();
    env.extend(kb.env().into_iter().filter(|v| !ka.env().contains(v)));
    let socket = support::socket_in(dir.path());
    let config = write_config(
        dir.path(),
        &socket,
        &format!("active = \"a\"\n{kek_extra}"),
        &[("a", &a), ("b", &b)],
    );
    let plugin = Plugin::start(
        &socket,
        &["--config", &config.to_string_lossy()],
        &env,
        dir.path(),
    )
    .await;
    Setup {
        dir,
        plugin,
        config,
        a,
        b,
        env,
    }
}

/// Writes the config file: `kek` is the body of `[kek]`, `keys` the `[keys.NAME]` bodies.
pub fn write_config(dir: &Path, socket: &str, kek: &str, keys: &[(&str, &str)]) -> PathBuf {
    let mut text =
        format!("socket = \"{socket}\"\n[health]\nretry_interval_seconds = 1\n\n[kek]\n{kek}\n");
    for (name, body) in keys {
        text.push_str(&format!("\n[keys.{name}]\n{body}\n"));
    }
    let path = dir.join("config.toml");
    std::fs::write(&path, text).expect("write config");
    path
}

pub async fn key_id(plugin: &Plugin) -> String {
    support::status(&mut plugin.client().await).await.key_id
}

/// Generates `mod $provider` with the rotation tests from a file key (`a`) to a key of
/// `$backend` (`b`).
macro_rules! rotation_tests {
    ($provider:ident, $backend:expr) => {
        mod $provider {
            use $crate::support::backends::file::FileBackend;

            // Two workers: the load keeps running while the CLI runs on a blocking thread.
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn rotate_command_under_load_switches_key_id_and_keeps_old_data() {
                super::rotate_under_load(&FileBackend, &$backend).await
            }
            #[tokio::test]
            async fn dropping_a_retired_key_needs_force_and_names_the_key_id() {
                super::dropping_needs_force(&FileBackend, &$backend).await
            }
            #[tokio::test]
            async fn also_wrap_keeps_data_readable_when_the_active_root_is_lost() {
                super::also_wrap_recovery(&FileBackend, &$backend).await
            }
            /// The same with the roles swapped: the key of `$backend`'s provider is the one lost.
            #[tokio::test]
            async fn also_wrap_keeps_data_readable_when_the_second_providers_root_is_lost() {
                super::also_wrap_recovery(&$backend, &FileBackend).await
            }
        }
    };
}

for_each_provider!(rotation_tests);

/// Rotation cases that need one particular provider or a hand-edited config file.
mod rotation {
    #[cfg(feature = "aws-kms")]
    mod kms_outage;
    mod reload;
    mod wrong_pin;
}

async fn rotate_under_load<A: Backend, B: Backend>(ka: &A, kb: &B) {
    let mut s = two_keys(ka, kb, "").await;
    let old_id = key_id(&s.plugin).await;
    let old_batch = batch(&s.plugin, 10).await;

    // A client keeps calling Encrypt and Decrypt, like an apiserver, during the rotation.
    let stop = Arc::new(AtomicBool::new(false));
    let (calls, failures) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let load = {
        let (stop, calls, failures) = (stop.clone(), calls.clone(), failures.clone());
        let mut client = s.plugin.client().await;
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let seed = support::seed();
                let request = EncryptRequest {
                    plaintext: seed.clone(),
                    uid: support::uid(),
                };
                let ok = match client.encrypt(request).await {
                    Ok(r) => client
                        .decrypt(support::decrypt_request(&r.into_inner()))
                        .await
                        .is_ok_and(|d| d.into_inner().plaintext == seed),
                    Err(_) => false,
                };
                calls.fetch_add(1, Ordering::Relaxed);
                if !ok {
                    failures.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    };

    // The load is running before the rotation starts.
    while calls.load(Ordering::Relaxed) < 5 {
        assert!(!load.is_finished(), "load task ended");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let socket = s.plugin.socket.clone();
    let config = s.config.to_string_lossy().into_owned();
    let before = calls.load(Ordering::Relaxed);
    let out = tokio::task::spawn_blocking({
        let (socket, env) = (socket.clone(), s.env.clone());
        move || {
            support::run_cli(
                &[
                    "rotate", "--config", &config, "--to", "b", "--socket", &socket,
                ],
                &env,
            )
        }
    })
    .await
    .expect("rotate task");
    let during = calls.load(Ordering::Relaxed) - before;
    let failed_during = failures.load(Ordering::Relaxed);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "rotate: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Calls finished between the CLI's start and its end: the load overlapped the rotation.
    assert!(during > 0, "no call completed while `rotate` ran");
    assert_eq!(failed_during, 0, "calls failed during rotation");
    assert!(
        stdout.contains("kubectl get secrets --all-namespaces -o json | kubectl replace -f -"),
        "{stdout}"
    );
    assert!(stdout.contains("--force"), "{stdout}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    load.await.expect("load task");
    assert_eq!(
        failures.load(Ordering::Relaxed),
        0,
        "calls failed after the rotation"
    );

    let new_id = key_id(&s.plugin).await;
    assert_ne!(new_id, old_id);
    let new_batch = batch(&s.plugin, 10).await;
    assert!(
        new_batch.iter().all(|(r, _)| r.key_id == new_id),
        "Encrypt returns the new key_id"
    );
    all_decrypt(&s.plugin, &old_batch).await;

    // The file says so, with the old key retired; a crash and restart keep everything readable.
    let text = std::fs::read_to_string(&s.config).expect("config");
    assert!(
        text.contains("active = \"b\"") && text.contains("retired = [\"a\"]"),
        "{text}"
    );
    s.plugin.kill9();
    s.plugin.restart().await;
    assert_eq!(key_id(&s.plugin).await, new_id);
    all_decrypt(&s.plugin, &old_batch).await;
    all_decrypt(&s.plugin, &new_batch).await;

    // `status` shows per key when a Decrypt last needed it.
    let out = support::run_cli(&["status", "--socket", &socket], &[]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(", retired): key_id") && text.contains("decrypts 10, last unix time"),
        "{text}"
    );
}

async fn dropping_needs_force<A: Backend, B: Backend>(ka: &A, kb: &B) {
    let s = two_keys(ka, kb, "").await;
    let id_a = key_id(&s.plugin).await;
    let under_a = batch(&s.plugin, 2).await;
    let socket = s.plugin.socket.clone();
    let config = s.config.to_string_lossy().into_owned();
    let out = support::run_cli(
        &[
            "rotate", "--config", &config, "--to", "b", "--socket", &socket,
        ],
        &s.env,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Drop key a from the config: a plain reload refuses and names a's key_id.
    write_config(s.dir.path(), &socket, "active = \"b\"", &[("b", &s.b)]);
    let out = support::run_cli(&["reload", "--socket", &socket], &[]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&id_a) && err.contains("--force"), "{err}");
    all_decrypt(&s.plugin, &under_a).await;

    let out = support::run_cli(&["reload", "--socket", &socket, "--force"], &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let err = s
        .plugin
        .client()
        .await
        .decrypt(support::decrypt_request(&under_a[0].0))
        .await
        .expect_err("key a is gone");
    assert_eq!(err.code(), Code::FailedPrecondition);
}

async fn also_wrap_recovery<A: Backend, B: Backend>(ka: &A, kb: &B) {
    let mut s = two_keys(ka, kb, "also_wrap = [\"b\"]").await;
    let id_a = key_id(&s.plugin).await;
    let sealed = batch(&s.plugin, 5).await;
    assert_eq!(
        sealed[0].0.annotations.len(),
        2,
        "one wrapped copy per root"
    );
    assert!(sealed.iter().all(|(r, _)| r.key_id == id_a));

    // Disaster: key a is lost. The admin makes b active and drops a; the plugin restarts.
    s.plugin.kill9();
    ka.lose_key(s.dir.path(), "a").await;
    if A::LOSS_REFUSED {
        assert_old_config_fails(&s).await;
    }
    write_config(
        s.dir.path(),
        &s.plugin.socket,
        "active = \"b\"",
        &[("b", &s.b)],
    );
    s.plugin.restart().await;
    assert_ne!(key_id(&s.plugin).await, id_a);
    // Data written under a's key_id still decrypts through b's copy.
    all_decrypt(&s.plugin, &sealed).await;
}

/// The loss is real: the old configuration, with the lost key active, either does not start
/// or starts unhealthy (a provider may wait for its root to come back).
async fn assert_old_config_fails(s: &Setup) {
    let lost = s.dir.path().join("lost");
    std::fs::create_dir_all(&lost).expect("mkdir");
    let config = s.config.to_string_lossy().into_owned();
    let mut old = Plugin::spawn(&s.plugin.socket, &["--config", &config], &s.env, &lost);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = old.try_wait() {
            assert!(!status.success(), "{}", old.output());
            return;
        }
        if let Ok(mut client) = support::connect(&old.socket).await
            && let Ok(status) = client.status(kms_plugin::proto::v2::StatusRequest {}).await
        {
            let healthz = status.into_inner().healthz;
            assert_ne!(healthz, "ok", "the lost key still works:\n{}", old.output());
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "neither exited nor answered:\n{}",
            old.output()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

//! KEK rotation through the real binary: `kms-plugin rotate` under load, SIGHUP and file
//! reloads, refused configurations, dropped keys, and `also_wrap` disaster recovery.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use common::Plugin;
use kms_plugin::proto::v2::EncryptResponse;
use tonic::Code;

fn file_key(dir: &Path, name: &str) -> String {
    format!(
        "provider = \"file\"\npath = \"{}\"",
        dir.join(format!("keys/{name}.key")).display()
    )
}

/// A plugin with keys `a` (active) and `b` (configured, unused); both key files exist.
async fn two_keys(dir: &Path, kek_extra: &str) -> (Plugin, PathBuf) {
    let socket = common::socket_in(dir);
    let config = write(dir, &socket, "active = \"a\"", kek_extra);
    common::keygen(&config, "a", &[]);
    common::keygen(&config, "b", &[]);
    let plugin = Plugin::start(&socket, &["--config", &config.to_string_lossy()], &[], dir).await;
    (plugin, config)
}

fn write(dir: &Path, socket: &str, active: &str, kek_extra: &str) -> PathBuf {
    let text = format!(
        "socket = \"{socket}\"\n[health]\nretry_interval_seconds = 1\n\n[kek]\n{active}\n{kek_extra}\n\n[keys.a]\n{}\n\n[keys.b]\n{}\n",
        file_key(dir, "a"),
        file_key(dir, "b")
    );
    let path = dir.join("config.toml");
    std::fs::write(&path, text).expect("write config");
    path
}

async fn batch(plugin: &Plugin, n: usize) -> Vec<(EncryptResponse, Vec<u8>)> {
    let mut client = plugin.client().await;
    let mut out = Vec::new();
    for _ in 0..n {
        let seed = common::seed();
        out.push((common::encrypt(&mut client, &seed).await, seed));
    }
    out
}

async fn all_decrypt(plugin: &Plugin, batch: &[(EncryptResponse, Vec<u8>)]) {
    let mut client = plugin.client().await;
    for (sealed, seed) in batch {
        assert_eq!(&common::decrypt(&mut client, sealed).await, seed);
    }
}

async fn key_id(plugin: &Plugin) -> String {
    common::status(&mut plugin.client().await).await.key_id
}

#[tokio::test]
async fn rotate_command_under_load_switches_key_id_and_keeps_old_data() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut plugin, config) = two_keys(dir.path(), "").await;
    let old_id = key_id(&plugin).await;
    let old_batch = batch(&plugin, 10).await;

    // A client keeps calling Status/Encrypt/Decrypt like an apiserver during the rotation.
    let stop = Arc::new(AtomicBool::new(false));
    let (calls, failures) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let load = {
        let (stop, calls, failures) = (stop.clone(), calls.clone(), failures.clone());
        let mut client = plugin.client().await;
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let seed = common::seed();
                let ok = match client
                    .encrypt(kms_plugin::proto::v2::EncryptRequest {
                        plaintext: seed.clone(),
                        uid: common::uid(),
                    })
                    .await
                {
                    Ok(r) => {
                        let r = r.into_inner();
                        client
                            .decrypt(common::decrypt_request(&r))
                            .await
                            .is_ok_and(|d| d.into_inner().plaintext == seed)
                    }
                    Err(_) => false,
                };
                calls.fetch_add(1, Ordering::Relaxed);
                if !ok {
                    failures.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    };

    let socket = plugin.socket.clone();
    let out = common::run_cli(
        &[
            "rotate",
            "--config",
            &config.to_string_lossy(),
            "--to",
            "b",
            "--socket",
            &socket,
        ],
        &[],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "rotate: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("kubectl get secrets --all-namespaces -o json | kubectl replace -f -"),
        "{stdout}"
    );
    assert!(stdout.contains("--force"), "{stdout}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    load.await.expect("load task");
    assert!(calls.load(Ordering::Relaxed) > 10);
    assert_eq!(
        failures.load(Ordering::Relaxed),
        0,
        "calls failed during rotation"
    );

    let new_id = key_id(&plugin).await;
    assert_ne!(new_id, old_id);
    let new_batch = batch(&plugin, 10).await;
    assert!(
        new_batch.iter().all(|(s, _)| s.key_id == new_id),
        "Encrypt returns the new key_id"
    );
    all_decrypt(&plugin, &old_batch).await;

    // The file now says so, with the old key retired; a crash and restart keep everything readable.
    let text = std::fs::read_to_string(&config).expect("config");
    assert!(
        text.contains("active = \"b\"") && text.contains("retired = [\"a\"]"),
        "{text}"
    );
    plugin.kill9();
    plugin.restart().await;
    assert_eq!(key_id(&plugin).await, new_id);
    all_decrypt(&plugin, &old_batch).await;
    all_decrypt(&plugin, &new_batch).await;

    // status shows per-key last Decrypt use.
    let out = common::run_cli(&["status", "--socket", &socket], &[]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("root a (file, retired)") && text.contains("decrypts 10, last unix time"),
        "{text}"
    );
}

#[tokio::test]
async fn broken_configs_leave_the_old_one_serving() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (plugin, config) = two_keys(dir.path(), "").await;
    let id = key_id(&plugin).await;
    let sealed = batch(&plugin, 3).await;
    let good = std::fs::read_to_string(&config).expect("config");

    // Bad TOML, via SIGHUP.
    std::fs::write(&config, "this is [not toml").expect("write");
    plugin.signal(libc::SIGHUP);
    // A missing key file, via the Admin reload.
    std::fs::write(
        &config,
        good.replace("active = \"a\"", "active = \"c\"").replace(
            "[keys.b]",
            "[keys.c]\nprovider = \"file\"\npath = \"/nonexistent/c.key\"\n\n[keys.b]",
        ),
    )
    .expect("write");
    let out = common::run_cli(&["reload", "--socket", &plugin.socket], &[]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/nonexistent/c.key"), "{err}");
    // rotate to a key whose file is missing: refused before anything changes.
    std::fs::write(&config, &good).expect("write");
    std::fs::remove_file(dir.path().join("keys/b.key")).expect("rm");
    let before = std::fs::read_to_string(&config).expect("config");
    let out = common::run_cli(
        &["rotate", "--config", &config.to_string_lossy(), "--to", "b"],
        &[],
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("does not work, nothing was changed"));
    assert_eq!(std::fs::read_to_string(&config).expect("config"), before);

    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(key_id(&plugin).await, id);
    assert_eq!(
        common::status(&mut plugin.client().await).await.healthz,
        "ok"
    );
    all_decrypt(&plugin, &sealed).await;
    assert!(
        plugin.output().contains("reload refused"),
        "{}",
        plugin.output()
    );
}

#[tokio::test]
async fn dropping_a_retired_key_needs_force_and_names_the_key_id() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (plugin, config) = two_keys(dir.path(), "").await;
    let id_a = key_id(&plugin).await;
    let under_a = batch(&plugin, 2).await;
    let out = common::run_cli(
        &[
            "rotate",
            "--config",
            &config.to_string_lossy(),
            "--to",
            "b",
            "--socket",
            &plugin.socket,
        ],
        &[],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Drop key a from the config: a plain reload refuses and names a's key_id.
    let socket = plugin.socket.clone();
    let text = format!(
        "socket = \"{socket}\"\n[kek]\nactive = \"b\"\n\n[keys.b]\n{}\n",
        file_key(dir.path(), "b")
    );
    std::fs::write(&config, &text).expect("write");
    let out = common::run_cli(&["reload", "--socket", &socket], &[]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&id_a) && err.contains("--force"), "{err}");
    all_decrypt(&plugin, &under_a).await;

    let out = common::run_cli(&["reload", "--socket", &socket, "--force"], &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let err = plugin
        .client()
        .await
        .decrypt(common::decrypt_request(&under_a[0].0))
        .await
        .expect_err("a is gone");
    assert_eq!(err.code(), Code::FailedPrecondition);
}

#[tokio::test]
async fn editing_the_config_file_reloads_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (plugin, config) = two_keys(dir.path(), "").await;
    let old_id = key_id(&plugin).await;
    let text = std::fs::read_to_string(&config).expect("config");
    std::fs::write(
        &config,
        text.replace("active = \"a\"", "active = \"b\"\nretired = [\"a\"]"),
    )
    .expect("write");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while key_id(&plugin).await == old_id {
        assert!(
            tokio::time::Instant::now() < deadline,
            "file change not picked up:\n{}",
            plugin.output()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn also_wrap_keeps_data_readable_when_the_active_root_is_lost() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut plugin, config) = two_keys(dir.path(), "also_wrap = [\"b\"]").await;
    let id_a = key_id(&plugin).await;
    let sealed = batch(&plugin, 5).await;
    assert_eq!(
        sealed[0].0.annotations.len(),
        2,
        "one wrapped copy per root"
    );
    assert!(sealed.iter().all(|(s, _)| s.key_id == id_a));

    // Disaster: key a is gone. The admin makes b active and drops a; the plugin restarts.
    plugin.kill9();
    std::fs::remove_file(dir.path().join("keys/a.key")).expect("rm");
    let socket = plugin.socket.clone();
    let text = format!(
        "socket = \"{socket}\"\n[kek]\nactive = \"b\"\n\n[keys.b]\n{}\n",
        file_key(dir.path(), "b")
    );
    std::fs::write(&config, text).expect("write");
    plugin.restart().await;
    assert_ne!(key_id(&plugin).await, id_a);
    // Data written under a's key_id still decrypts through b's copy.
    all_decrypt(&plugin, &sealed).await;
}

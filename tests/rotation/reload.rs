//! Reloads and rotations with two file keys whose config or key files are edited by hand:
//! broken configs, SIGHUP, the file watcher, an unreadable retired key.

use std::time::Duration;

use crate::support::backends::file::FileBackend;
use crate::support::{self, Plugin};
use crate::{Setup, all_decrypt, batch, key_id};

async fn two_keys(kek_extra: &str) -> Setup {
    crate::two_keys(&FileBackend, &FileBackend, kek_extra).await
}

#[tokio::test]
async fn broken_configs_leave_the_old_one_serving() {
    let s = two_keys("").await;
    let (dir, plugin, config) = (&s.dir, &s.plugin, s.config.clone());
    let id = key_id(plugin).await;
    let sealed = batch(plugin, 3).await;
    let good = std::fs::read_to_string(&config).expect("config");

    // Bad TOML, via SIGHUP: refused (by the SIGHUP reload itself, not an earlier one).
    std::fs::write(&config, "this is [not toml").expect("write");
    plugin.signal(libc::SIGHUP);
    wait_for_sighup_reload(plugin, "reload refused").await;
    // A missing key file, via the Admin reload.
    std::fs::write(
        &config,
        good.replace("active = \"a\"", "active = \"c\"").replace(
            "[keys.b]",
            "[keys.c]\nprovider = \"file\"\npath = \"/nonexistent/c.key\"\n\n[keys.b]",
        ),
    )
    .expect("write");
    let out = support::run_cli(&["reload", "--socket", &plugin.socket], &[]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/nonexistent/c.key"), "{err}");
    // rotate to a key whose file is missing: refused before anything changes.
    std::fs::write(&config, &good).expect("write");
    std::fs::remove_file(dir.path().join("keys/b.key")).expect("rm");
    let before = std::fs::read_to_string(&config).expect("config");
    let out = support::run_cli(
        &["rotate", "--config", &config.to_string_lossy(), "--to", "b"],
        &[],
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("does not work, nothing was changed"));
    assert_eq!(std::fs::read_to_string(&config).expect("config"), before);

    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(key_id(plugin).await, id);
    assert_eq!(
        support::status(&mut plugin.client().await).await.healthz,
        "ok"
    );
    all_decrypt(plugin, &sealed).await;
}

/// What the plugin logs when SIGHUP starts a reload.
const SIGHUP_LINE: &str = "SIGHUP received; reloading";

/// Waits until the reload started by the last SIGHUP logged `outcome`. A reload the file
/// watcher started meanwhile logs one too, so the log after the SIGHUP line must hold more
/// `outcome`s than watcher reloads.
async fn wait_for_sighup_reload(plugin: &Plugin, outcome: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let log = plugin.output();
        if let Some(at) = log.rfind(SIGHUP_LINE) {
            let after = &log[at..];
            if after.matches(outcome).count() > after.matches("config file changed").count() {
                return;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no `{outcome}` from the SIGHUP reload in:\n{log}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// SIGHUP alone applies a change. The file watcher is out of play: it reloads only when the
/// file's text differs from the text last tried, and this text was already tried (and
/// refused, b's key file being unreadable then). Fixing the key file changes no config text,
/// so only the SIGHUP can bring the new active key in.
#[tokio::test]
async fn sighup_applies_a_config_the_watcher_will_not_retry() {
    use std::os::unix::fs::PermissionsExt;

    let s = two_keys("").await;
    let (plugin, config) = (&s.plugin, s.config.clone());
    let old_id = key_id(plugin).await;
    let sealed = batch(plugin, 3).await;

    // Make b active while its key file has the wrong mode: refused, the text recorded.
    let b_key = s.dir.path().join("keys/b.key");
    std::fs::set_permissions(&b_key, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let text = std::fs::read_to_string(&config).expect("config");
    std::fs::write(
        &config,
        text.replace("active = \"a\"", "active = \"b\"\nretired = [\"a\"]"),
    )
    .expect("write");
    let out = support::run_cli(&["reload", "--socket", &plugin.socket], &[]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("chmod 600"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Fixed. More than one watch interval (2 s) later, nothing has reloaded it by itself.
    std::fs::set_permissions(&b_key, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(key_id(plugin).await, old_id, "{}", plugin.output());
    assert!(!plugin.output().contains(SIGHUP_LINE));

    plugin.signal(libc::SIGHUP);
    wait_for_sighup_reload(plugin, "configuration reloaded").await;
    let info = support::info(plugin).await;
    let b_id = support::root_info(&info, "b").key_id.clone();
    assert_ne!(b_id, old_id);
    assert_eq!(key_id(plugin).await, b_id);
    let seed = support::seed();
    let fresh = support::encrypt(&mut plugin.client().await, &seed).await;
    assert_eq!(fresh.key_id, b_id);
    all_decrypt(plugin, &sealed).await;
}

#[tokio::test]
async fn editing_the_config_file_reloads_it() {
    let s = two_keys("").await;
    let (plugin, config) = (&s.plugin, s.config.clone());
    let old_id = key_id(plugin).await;
    let text = std::fs::read_to_string(&config).expect("config");
    std::fs::write(
        &config,
        text.replace("active = \"a\"", "active = \"b\"\nretired = [\"a\"]"),
    )
    .expect("write");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while key_id(plugin).await == old_id {
        assert!(
            tokio::time::Instant::now() < deadline,
            "file change not picked up:\n{}",
            plugin.output()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn a_retired_key_that_cannot_be_opened_does_not_stop_the_plugin() {
    use std::os::unix::fs::PermissionsExt;

    let mut s = two_keys("").await;
    let under_a = batch(&s.plugin, 3).await;
    s.plugin.kill9();
    // b is retired and its key file became unreadable for the plugin (wrong mode).
    let b_key = s.dir.path().join("keys/b.key");
    let socket = s.plugin.socket.clone();
    crate::write_config(
        s.dir.path(),
        &socket,
        "active = \"a\"\nretired = [\"b\"]",
        &[("a", &s.a), ("b", &s.b)],
    );
    std::fs::set_permissions(&b_key, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    s.plugin.restart().await;
    assert_eq!(
        support::status(&mut s.plugin.client().await).await.healthz,
        "ok"
    );
    all_decrypt(&s.plugin, &under_a).await;
    let out = support::run_cli(&["status", "--socket", &socket], &[]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("root b (file, retired)") && text.contains("state unavailable"),
        "{text}"
    );
    assert!(text.contains("chmod 600"), "{text}");

    // Fixed, a reload brings it back (a reload itself never skips a root).
    std::fs::set_permissions(&b_key, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let out = support::run_cli(&["reload", "--socket", &socket], &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = support::run_cli(&["status", "--socket", &socket], &[]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!text.contains("state unavailable"), "{text}");
}

//! `provider = "vault-transit"` against a real OpenBao server (`bao server -dev`): what only
//! Vault does (Transit rotation, tokens, AppRole, cert auth, sealed or stopped servers).
//! The provider contract and rotation suites run over it through `support::backends`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use kms_plugin::proto::admin::RootInfo;
use tempfile::TempDir;

use crate::support::openbao::{self, OpenBao};
use crate::support::{self, Plugin};

/// Writes a config with one root "main" whose `[keys.main]` is `body`, and `extra`
/// top-level settings; returns the socket and the config path.
fn write_main(dir: &Path, body: String, extra: &str) -> (String, String) {
    let socket = support::socket_in(dir);
    let config = support::write_config(dir, &socket, "main", &[("main", body)], extra);
    (socket, config.to_string_lossy().into_owned())
}

/// A running plugin with one root "main" whose `[keys.main]` is `body`.
async fn start_with(dir: &Path, body: String, extra: &str) -> Plugin {
    let (socket, config) = write_main(dir, body, extra);
    Plugin::start(&socket, &["--config", &config], &[], dir).await
}

/// A dev OpenBao server with a Transit key "main" of `key_type`, and a directory for the
/// plugin's files.
fn vault(key_type: &str) -> (OpenBao, TempDir) {
    let bao = OpenBao::start();
    bao.create_key("main", key_type);
    (bao, tempfile::tempdir().expect("tempdir"))
}

/// A token file in `dir` holding `token`.
fn token_file(dir: &TempDir, token: &str) -> PathBuf {
    openbao::secret_file(dir.path(), "token", token)
}

/// A plugin with one Vault root "main" on Transit key "main", token from `token_file`.
async fn start_plugin(bao: &OpenBao, dir: &TempDir, token_file: &Path, extra: &str) -> Plugin {
    start_with(dir.path(), bao.key_body("main", token_file), extra).await
}

fn config_path(dir: &Path) -> String {
    dir.join("config.toml").to_string_lossy().into_owned()
}

/// Start-up with one root "main" whose `[keys.main]` is `body` fails, saying `message`;
/// returns the output.
fn start_fails_with(dir: &Path, body: String, message: &str) -> String {
    let (socket, config) = write_main(dir, body, "");
    Plugin::start_fails_with(&socket, &["--config", &config], &[], dir, message)
}

/// Waits until root "main" is in a state `accept` takes; returns it.
async fn wait_for_main(
    plugin: &Plugin,
    limit: Duration,
    what: &str,
    accept: impl Fn(&RootInfo) -> bool,
) -> RootInfo {
    support::eventually(limit, what, async || {
        let root = support::root(plugin, "main").await;
        if accept(&root) {
            Ok(root)
        } else {
            Err(format!("{root:?}\n{}", plugin.output()))
        }
    })
    .await
}

async fn round_trip(plugin: &Plugin) -> (kms_plugin::proto::v2::EncryptResponse, Vec<u8>) {
    let seed = support::seed();
    let sealed = support::encrypt(&mut plugin.client().await, &seed).await;
    assert_eq!(
        support::decrypt(&mut plugin.client().await, &sealed).await,
        seed
    );
    (sealed, seed)
}

/// The steady state makes no Vault call per Encrypt or Decrypt: OpenBao's audit log
/// counts every request.
#[tokio::test]
async fn steady_state_makes_no_vault_calls() {
    let (bao, dir) = vault("aes256-gcm96");
    let token = token_file(&dir, &bao.plugin_token("main", "1h"));
    let audit = bao.audit_log();
    let plugin = start_plugin(&bao, &dir, &token, "").await;
    let _ = round_trip(&plugin).await;
    let encrypts = bao.audited(&audit, "transit/encrypt/main");
    let decrypts = bao.audited(&audit, "transit/decrypt/main");
    assert!(
        encrypts >= 1 && decrypts >= 1,
        "the first local KEK is wrapped and proven"
    );
    let mut client = plugin.client().await;
    for _ in 0..50 {
        let seed = support::seed();
        let sealed = support::encrypt(&mut client, &seed).await;
        assert_eq!(support::decrypt(&mut client, &sealed).await, seed);
    }
    assert_eq!(bao.audited(&audit, "transit/encrypt/main"), encrypts);
    assert_eq!(bao.audited(&audit, "transit/decrypt/main"), decrypts);
}

/// A wrong token is a clear start-up error that names the key and the cause, and shows
/// no token.
#[tokio::test]
async fn wrong_token_is_a_clear_startup_error() {
    let (bao, dir) = vault("aes256-gcm96");
    let token = token_file(&dir, "s.not-a-valid-token-1234");
    let output = start_fails_with(
        dir.path(),
        bao.key_body("main", &token),
        "Vault refused the plugin's token",
    );
    assert!(
        output.contains("[keys.main]") || output.contains("\"main\""),
        "{output}"
    );
    assert!(!output.contains("not-a-valid-token"), "{output}");
}

/// A token whose policy lacks a capability is told apart from a bad token.
#[tokio::test]
async fn missing_policy_is_reported_as_permission_denied() {
    let (bao, dir) = vault("aes256-gcm96");
    bao.create_key("other", "aes256-gcm96");
    // A valid token for another key only.
    let token = token_file(&dir, &bao.plugin_token("other", "1h"));
    start_fails_with(
        dir.path(),
        bao.key_body("main", &token),
        "permission denied: the token's policy lacks",
    );
}

/// A key type that cannot bind associated data is refused at start, naming type and key.
#[tokio::test]
async fn key_type_without_associated_data_is_refused() {
    let (bao, dir) = vault("rsa-2048");
    let token = token_file(&dir, openbao::ROOT_TOKEN);
    start_fails_with(
        dir.path(),
        bao.key_body("main", &token),
        "\"main\" is of type rsa-2048, which cannot bind associated data",
    );
}

/// The token file is re-read when it changes: a revoked token replaced by a new one (as
/// Vault Agent does) is picked up without a restart.
#[tokio::test]
async fn replaced_token_file_is_picked_up() {
    let (bao, dir) = vault("aes256-gcm96");
    let first = bao.plugin_token("main", "1h");
    let token = token_file(&dir, &first);
    let plugin = start_plugin(
        &bao,
        &dir,
        &token,
        "[local_kek]\nmax_encryptions = 1000\nprepare_at_percent = 1\n",
    )
    .await;
    let _ = round_trip(&plugin).await;
    bao.bao(&["token", "revoke", &first]);
    let second = bao.plugin_token("main", "1h");
    // Written beside and renamed over, as an agent does: a new inode.
    let fresh = openbao::secret_file(dir.path(), "token.new", &second);
    std::fs::rename(&fresh, &token).expect("rename");
    // Enough Encrypts to need a new local KEK, wrapped with the new token.
    let mut client = plugin.client().await;
    for _ in 0..20 {
        let _ = support::encrypt(&mut client, &support::seed()).await;
    }
    wait_for_main(
        &plugin,
        Duration::from_secs(20),
        "a new wrap with the new token",
        |root| root.wrap_calls >= 2 && root.state == "ok",
    )
    .await;
    assert!(!plugin.output().contains(&second), "token in the log");
}

/// AppRole: the plugin logs in with role_id and secret_id from files; a short token TTL is
/// renewed in the background before it expires.
#[tokio::test]
async fn approle_login_works_and_the_token_is_renewed() {
    let (bao, dir) = vault("aes256-gcm96");
    let audit = bao.audit_log();
    let (role_id, secret_id) = bao.approle("main", "3s");
    let role_file = openbao::secret_file(dir.path(), "role-id", &role_id);
    let secret_file = openbao::secret_file(dir.path(), "secret-id", &secret_id);
    let body = format!(
        "provider = \"vault-transit\"\naddress = \"{}\"\nallow_http = true\nkey = \"main\"\nauth = \"approle\"\nrole_id_file = \"{}\"\nsecret_id_file = \"{}\"",
        bao.address(),
        role_file.display(),
        secret_file.display()
    );
    let plugin = start_with(dir.path(), body, "").await;
    let (sealed, seed) = round_trip(&plugin).await;
    assert_eq!(bao.audited(&audit, "auth/approle/login"), 1);
    // 3 s TTL: renewed at 2 s, 4 s, ...
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(
        bao.audited(&audit, "auth/token/renew-self") >= 1,
        "{}",
        plugin.output()
    );
    // A fresh start needs Vault: the renewed token still works.
    let mut plugin = plugin;
    plugin.restart().await;
    assert_eq!(
        support::decrypt(&mut plugin.client().await, &sealed).await,
        seed
    );
    let output = plugin.output();
    assert!(
        !output.contains(&secret_id) && !output.contains(&role_id),
        "secret in the log"
    );
}

/// A deleted key is reported by name; Status turns unhealthy once the plugin must wrap.
#[tokio::test]
async fn deleted_key_is_reported_by_name() {
    let (bao, dir) = vault("aes256-gcm96");
    let token = token_file(&dir, openbao::ROOT_TOKEN);
    let plugin = start_plugin(
        &bao,
        &dir,
        &token,
        "[health]\nroot_check_interval_seconds = 1\n",
    )
    .await;
    let _ = round_trip(&plugin).await;
    bao.delete_key("main");
    support::eventually(Duration::from_secs(20), "deletion noticed", async || {
        let healthz = support::status(&mut plugin.client().await).await.healthz;
        if healthz == "ok" {
            return Err(plugin.output());
        }
        assert!(healthz.contains("Transit key \"main\""), "{healthz}");
        assert!(healthz.contains("does not exist"), "{healthz}");
        Ok(())
    })
    .await;
    // Even with upsert rights (the root token), the plugin never re-creates the key.
    assert!(bao.run(&["read", "transit/keys/main"]).stdout.is_empty());
}

/// A key deleted and re-created under the same name gets a new key_id.
#[tokio::test]
async fn recreated_key_gets_a_new_key_id() {
    let (bao, dir) = vault("aes256-gcm96");
    let token = token_file(&dir, openbao::ROOT_TOKEN);
    let mut plugin = start_plugin(&bao, &dir, &token, "").await;
    let first = support::status(&mut plugin.client().await).await.key_id;
    plugin.restart().await;
    assert_eq!(
        support::status(&mut plugin.client().await).await.key_id,
        first,
        "stable across restarts"
    );
    bao.delete_key("main");
    // Creation times are in seconds: make sure the new key's differs.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    bao.create_key("main", "aes256-gcm96");
    plugin.restart().await;
    let second = support::status(&mut plugin.client().await).await.key_id;
    assert!(second.starts_with("vault-"), "{second}");
    assert_ne!(second, first);
}

/// Vault stopped (SIGSTOP: connections hang): cached local KEKs keep serving, Encrypt
/// included; Status stays ok while the current local KEK is usable (an unreachable root
/// is degraded, not failed), `kms-plugin status` shows the root degraded naming Vault,
/// and it recovers when Vault is back.
#[tokio::test]
async fn stopped_vault_keeps_cached_keys_serving() {
    let (bao, dir) = vault("aes256-gcm96");
    let token = token_file(&dir, &bao.plugin_token("main", "1h"));
    let extra = "[health]\nroot_check_interval_seconds = 1\nretry_interval_seconds = 1\n";
    let plugin = start_plugin(&bao, &dir, &token, extra).await;
    let mut batch = Vec::new();
    for _ in 0..5 {
        batch.push(round_trip(&plugin).await);
    }
    bao.freeze(true);
    let mut client = plugin.client().await;
    for (sealed, seed) in &batch {
        assert_eq!(&support::decrypt(&mut client, sealed).await, seed);
    }
    let fresh = support::seed();
    let sealed = support::encrypt(&mut client, &fresh).await;
    assert_eq!(support::decrypt(&mut client, &sealed).await, fresh);
    let root = wait_for_main(
        &plugin,
        Duration::from_secs(20),
        "stopped Vault noticed",
        |r| r.state == "degraded",
    )
    .await;
    assert!(
        root.last_error.contains("Vault at http://127.0.0.1"),
        "{root:?}"
    );
    assert_eq!(support::status(&mut client).await.healthz, "ok");
    bao.freeze(false);
    wait_for_main(&plugin, Duration::from_secs(30), "recovery", |r| {
        r.state == "ok"
    })
    .await;
}

/// A sealed Vault (503) makes the root degraded with Vault's reason while cached local
/// KEKs keep serving; unsealing heals it without a restart.
#[tokio::test]
async fn sealed_vault_is_unavailable_not_rejected() {
    let (bao, dir) = vault("aes256-gcm96");
    let token = token_file(&dir, &bao.plugin_token("main", "1h"));
    let extra = "[health]\nroot_check_interval_seconds = 1\nretry_interval_seconds = 1\n";
    let plugin = start_plugin(&bao, &dir, &token, extra).await;
    let (sealed, seed) = round_trip(&plugin).await;
    bao.seal(true);
    // While sealing, a probe may first time out (an unavailable root too); the reason must
    // come to name the seal.
    let root = wait_for_main(&plugin, Duration::from_secs(20), "sealing reported", |r| {
        r.state != "ok" && (r.state != "degraded" || r.last_error.contains("Vault is sealed"))
    })
    .await;
    assert_eq!(root.state, "degraded", "{root:?}");
    let mut client = plugin.client().await;
    assert_eq!(support::decrypt(&mut client, &sealed).await, seed);
    assert_eq!(support::status(&mut client).await.healthz, "ok");
    bao.seal(false);
    wait_for_main(
        &plugin,
        Duration::from_secs(30),
        "recovery after unseal",
        |r| r.state == "ok",
    )
    .await;
}

/// Vault active with a file key in also_wrap: Vault is lost for good (the server killed,
/// its keys gone); a restart with the file key active still decrypts everything.
#[tokio::test]
async fn also_wrap_file_key_survives_losing_vault() {
    let (mut bao, dir) = vault("aes256-gcm96");
    let token = token_file(&dir, &bao.plugin_token("main", "1h"));
    let file_key = dir.path().join("backup.key");
    let file_body = format!("provider = \"file\"\npath = \"{}\"", file_key.display());
    let socket = support::socket_in(dir.path());
    let keys = [
        ("vault", bao.key_body("main", &token)),
        ("backup", file_body),
    ];
    let config = support::write_config(dir.path(), &socket, "vault", &keys, "");
    support::keygen(&config, "backup", &[]);
    // also_wrap goes into [kek]: write_config only sets `active`.
    let text = std::fs::read_to_string(&config).expect("config");
    std::fs::write(
        &config,
        text.replace(
            "active = \"vault\"\n",
            "active = \"vault\"\nalso_wrap = [\"backup\"]\n",
        ),
    )
    .expect("config");
    let cfg = config_path(dir.path());
    let mut plugin = Plugin::start(&socket, &["--config", &cfg], &[], dir.path()).await;
    let mut batch = Vec::new();
    for _ in 0..5 {
        batch.push(round_trip(&plugin).await);
    }
    plugin.kill9();
    bao.kill();
    // The operator makes the backup active and drops the lost Vault key.
    let keys = [("backup", keys[1].1.clone())];
    support::write_config(dir.path(), &socket, "backup", &keys, "");
    plugin.restart().await;
    let mut client = plugin.client().await;
    for (sealed, seed) in &batch {
        assert_eq!(&support::decrypt(&mut client, sealed).await, seed);
    }
    assert_eq!(support::status(&mut client).await.healthz, "ok");
}

/// TLS certificate auth against `bao server -dev-tls`: the plugin trusts the server through
/// ca_file and logs in with its client certificate.
#[tokio::test]
async fn cert_auth_login_works_over_tls() {
    let bao = OpenBao::start_tls();
    let dir = tempfile::tempdir().expect("tempdir");
    bao.create_key("main", "aes256-gcm96");
    let (cert, key) = bao.cert_auth("main");
    let body = format!(
        "provider = \"vault-transit\"\naddress = \"{}\"\nkey = \"main\"\nca_file = \"{}\"\nauth = \"cert\"\nclient_cert_file = \"{}\"\nclient_key_file = \"{}\"\ncert_role = \"kms-main\"",
        bao.address(),
        bao.ca_file().display(),
        cert.display(),
        key.display()
    );
    let plugin = start_with(dir.path(), body.clone(), "").await;
    let _ = round_trip(&plugin).await;
    assert_eq!(bao.audited(&bao.audit_log(), "auth/cert/login"), 1);
    drop(plugin);

    // Without ca_file the system roots do not know the dev server's CA: a clear error.
    let untrusting: String = body
        .lines()
        .filter(|l| !l.starts_with("ca_file"))
        .collect::<Vec<_>>()
        .join("\n");
    start_fails_with(dir.path(), untrusting, "certificate");
}

/// `bao write -f transit/keys/main/rotate` is noticed without a restart: the key_id
/// changes, new local KEKs are wrapped under the new version, and ciphertexts made under
/// the old version still decrypt, cached or not (after a restart).
#[tokio::test]
async fn transit_rotation_changes_key_id_and_old_ciphertexts_decrypt() {
    let (bao, dir) = vault("aes256-gcm96");
    let token = token_file(&dir, &bao.plugin_token("main", "1h"));
    let extra = "[health]\nroot_check_interval_seconds = 1\nretry_interval_seconds = 1\n";
    let mut plugin = start_plugin(&bao, &dir, &token, extra).await;
    let old_id = support::status(&mut plugin.client().await).await.key_id;
    let mut before = Vec::new();
    for _ in 0..3 {
        before.push(round_trip(&plugin).await);
    }
    assert!(
        before[0]
            .0
            .annotations
            .values()
            .any(|v| v.starts_with(b"vault:v1:"))
    );

    bao.rotate_key("main");
    let new_id = support::eventually(Duration::from_secs(30), "rotation noticed", async || {
        let id = support::status(&mut plugin.client().await).await.key_id;
        if id == old_id {
            Err(plugin.output())
        } else {
            Ok(id)
        }
    })
    .await;
    assert!(new_id.starts_with("vault-"), "{new_id}");
    let (after, seed) = round_trip(&plugin).await;
    assert_eq!(after.key_id, new_id);
    let copy = after
        .annotations
        .iter()
        .find(|(k, _)| k.contains(&new_id))
        .map(|(_, v)| v);
    assert!(
        copy.is_some_and(|v| v.starts_with(b"vault:v2:")),
        "{:?}",
        after.annotations.keys()
    );
    let mut client = plugin.client().await;
    for (sealed, seed) in &before {
        assert_eq!(&support::decrypt(&mut client, sealed).await, seed);
    }

    // Without the cache: the v1 copies are unwrapped by Vault under their own key_id.
    plugin.restart().await;
    let mut client = plugin.client().await;
    assert_eq!(
        support::status(&mut client).await.key_id,
        new_id,
        "stable across restarts"
    );
    for (sealed, seed) in &before {
        assert_eq!(&support::decrypt(&mut client, sealed).await, seed);
    }
    assert_eq!(support::decrypt(&mut client, &after).await, seed);
}

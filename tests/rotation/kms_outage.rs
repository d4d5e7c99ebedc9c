//! An AWS KMS root (moto behind a proxy that can cut the network) with an offline file key
//! in `also_wrap`: a KMS outage after a restart.

use crate::support::backends::file::FileBackend;
use crate::support::{self, moto};

/// AWS KMS active with an offline file key in `also_wrap`: the KMS region goes down and the
/// plugin restarts (its cache gone). Everything still decrypts through the offline copy,
/// Status says why a new local KEK cannot be made, and it recovers when KMS is back.
#[tokio::test]
async fn kms_outage_after_restart_decrypts_through_the_also_wrap_root() {
    use crate::support::backends::Backend;

    let moto = moto::Moto::start();
    let proxy = moto::Proxy::start(moto.port).await;
    let arn = moto::create_key(&moto::client(&moto.endpoint())).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let aws = format!(
        "provider = \"aws-kms\"\nkey_id = \"{arn}\"\nregion = \"{}\"\nendpoint = \"{}\"\nallow_http = true",
        moto::REGION,
        proxy.endpoint()
    );
    let offline = FileBackend.new_key(dir.path(), "offline").await;
    let socket = support::socket_in(dir.path());
    let config = crate::write_config(
        dir.path(),
        &socket,
        "active = \"aws\"\nalso_wrap = [\"offline\"]",
        &[("aws", &aws), ("offline", &offline)],
    );
    let config = config.to_string_lossy().into_owned();
    let mut plugin = support::Plugin::start(
        &socket,
        &["--config", &config],
        &moto::plugin_env(),
        dir.path(),
    )
    .await;
    let sealed = crate::batch(&plugin, 5).await;

    proxy.set_up(false);
    plugin.kill9();
    plugin.restart().await;
    let started = std::time::Instant::now();
    crate::all_decrypt(&plugin, &sealed).await;
    // One wait for KMS (the first Decrypt), then the offline copy is cached.
    assert!(
        started.elapsed() < std::time::Duration::from_secs(6),
        "{:?}",
        started.elapsed()
    );
    let healthz = support::status(&mut plugin.client().await).await.healthz;
    assert_ne!(healthz, "ok");
    assert!(healthz.contains("\"aws\""), "{healthz}");

    proxy.set_up(true);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while support::status(&mut plugin.client().await).await.healthz != "ok" {
        assert!(
            std::time::Instant::now() < deadline,
            "no recovery:\n{}",
            plugin.output()
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    let seed = support::seed();
    let fresh = support::encrypt(&mut plugin.client().await, &seed).await;
    assert_eq!(
        support::decrypt(&mut plugin.client().await, &fresh).await,
        seed
    );
}

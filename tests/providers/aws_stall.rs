//! A hung AWS KMS: moto is SIGSTOPped, so connections are accepted (by the kernel) and
//! requests are never answered, as with a KMS endpoint that stalls. Nothing that does not
//! need KMS may wait on it, and what needs it must fail within the plugin's KMS budget.

use std::future::Future;
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use kms_plugin::proto::v2::EncryptResponse;
use tonic::Code;

use crate::support::moto::{self, Moto};
use crate::support::{self, Plugin};

/// Status, and Encrypt/Decrypt of cached keys, are answered from memory.
const PROMPT: Duration = Duration::from_secs(1);
/// The plugin's KMS budget (`timeout_ms`, default 2.5 s) plus slack for a debug build.
const KMS_BUDGET: Duration = Duration::from_millis(2500);
const SLACK: Duration = Duration::from_millis(1500);

/// Keeps moto stopped while alive; SIGCONT on drop, so a failing test leaves nothing stopped
/// (moto itself is killed when `Moto` drops, after this guard).
struct Stalled(u32);

impl Stalled {
    fn stop(moto: &Moto) -> Self {
        signal(moto.pid(), libc::SIGSTOP);
        Stalled(moto.pid())
    }
}

impl Drop for Stalled {
    fn drop(&mut self) {
        signal(self.0, libc::SIGCONT);
    }
}

fn signal(pid: u32, sig: i32) {
    // SAFETY: kill(2) on our own child's pid has no memory-safety preconditions.
    let rc = unsafe { libc::kill(pid as i32, sig) };
    assert_eq!(rc, 0, "kill({pid}, {sig}) failed");
}

/// Runs `call`, failing the test if it takes longer than `limit`; returns its result and
/// how long it took.
async fn within<T>(limit: Duration, what: &str, call: impl Future<Output = T>) -> (T, Duration) {
    let started = Instant::now();
    match tokio::time::timeout(limit, call).await {
        Ok(out) => (out, started.elapsed()),
        Err(_) => panic!("{what} did not return within {limit:?} while KMS hangs"),
    }
}

/// `kms-plugin reload`, killed and failed if it takes longer than `limit`.
fn reload_within(socket: &str, limit: Duration) -> (ExitStatus, String) {
    let mut child = Command::new(support::BIN)
        .args(["reload", "--socket", socket])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run kms-plugin reload");
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("kms-plugin reload did not return within {limit:?} while KMS hangs");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let out = child.wait_with_output().expect("reload output");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (status, text)
}

async fn start(dir: &Path, arn: &str, endpoint: &str) -> Plugin {
    let body = format!(
        "provider = \"aws-kms\"\nkey_id = \"{arn}\"\nregion = \"{}\"\nendpoint = \"{endpoint}\"\nallow_http = true",
        moto::REGION
    );
    let socket = support::socket_in(dir);
    let config = support::write_config(dir, &socket, "main", &[("main", body)], "");
    let config = config.to_string_lossy().into_owned();
    Plugin::start(&socket, &["--config", &config], &moto::plugin_env(), dir).await
}

async fn encrypt(plugin: &Plugin) -> (Vec<u8>, EncryptResponse) {
    let seed = support::seed();
    let sealed = support::encrypt(&mut plugin.client().await, &seed).await;
    (seed, sealed)
}

#[tokio::test]
async fn hung_kms_stalls_only_what_needs_it() {
    let moto = Moto::start();
    let arn = moto::create_key(&moto::client(&moto.endpoint())).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut plugin = start(dir.path(), &arn, &moto.endpoint()).await;

    // Two ciphertexts under local KEKs of earlier runs: after the restarts only KMS can
    // unwrap them. The restarts happen while KMS answers (each start wraps a local KEK).
    let (seed_a, old_a) = encrypt(&plugin).await;
    plugin.restart().await;
    let (_, old_b) = encrypt(&plugin).await;
    plugin.restart().await;
    // Fresh data: its local KEK is cached (this Decrypt needs no KMS call).
    let (seed_c, cached) = encrypt(&plugin).await;
    assert_eq!(
        support::decrypt(&mut plugin.client().await, &cached).await,
        seed_c
    );
    let key_id = cached.key_id.clone();

    let stalled = Stalled::stop(&moto);

    // A Decrypt that needs KMS starts hanging; everything else must not wait for it.
    let uncached = {
        let mut client = plugin.client().await;
        let request = support::decrypt_request(&old_a);
        tokio::spawn(async move {
            let started = Instant::now();
            let result = client.decrypt(request).await;
            (result, started.elapsed())
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;

    let (status, took) = within(PROMPT, "Status", async {
        support::status(&mut plugin.client().await).await
    })
    .await;
    assert_eq!(status.healthz, "ok", "Status took {took:?}");
    assert_eq!(status.key_id, key_id);

    let ((seed, fresh), _) = within(PROMPT, "Encrypt", encrypt(&plugin)).await;
    assert_eq!(fresh.key_id, key_id);
    for (seed, sealed) in [(&seed, &fresh), (&seed_c, &cached)] {
        let (plain, _) = within(PROMPT, "Decrypt of a cached key", async {
            support::decrypt(&mut plugin.client().await, sealed).await
        })
        .await;
        assert_eq!(&plain, seed);
    }

    // The uncached Decrypt fails within the KMS budget, with a retryable code.
    let (joined, _) = within(KMS_BUDGET + SLACK, "Decrypt needing KMS", uncached).await;
    let (result, took) = joined.expect("decrypt task");
    let err = result.expect_err("KMS hangs, the key is not cached");
    assert!(
        matches!(err.code(), Code::Unavailable | Code::DeadlineExceeded),
        "{err:?}"
    );
    assert!(took < KMS_BUDGET + SLACK, "took {took:?}");
    eprintln!(
        "Decrypt needing a hung KMS: {:?} after {took:?}",
        err.code()
    );

    // A failed unwrap is an outage, not a broken active root: Status stays ok and prompt.
    let (status, _) = within(PROMPT, "Status after the failed unwrap", async {
        support::status(&mut plugin.client().await).await
    })
    .await;
    assert_eq!(status.healthz, "ok");

    // A reload needs KMS (it proves the active root with a round trip): it must return
    // within a bounded time, refused or applied, and leave the plugin serving.
    let started = Instant::now();
    let (reload_status, text) = reload_within(&plugin.socket, 3 * KMS_BUDGET + SLACK);
    eprintln!(
        "reload while KMS hangs: {reload_status} after {:?}: {}",
        started.elapsed(),
        text.trim()
    );
    assert!(
        reload_status.success() || text.contains("reload refused"),
        "{reload_status}: {text}"
    );
    let (status, _) = within(PROMPT, "Status after the reload", async {
        support::status(&mut plugin.client().await).await
    })
    .await;
    assert_eq!(status.healthz, "ok");

    // KMS answers again: the same plugin unwraps the old local KEK.
    drop(stalled);
    let deadline = Instant::now() + Duration::from_secs(15);
    let plain = loop {
        match plugin
            .client()
            .await
            .decrypt(support::decrypt_request(&old_a))
            .await
        {
            Ok(response) => break response.into_inner().plaintext,
            Err(e) => {
                assert!(
                    Instant::now() < deadline,
                    "no recovery after SIGCONT: {e:?}"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    assert_eq!(plain, seed_a);
    assert_eq!(
        support::status(&mut plugin.client().await).await.healthz,
        "ok"
    );

    // SIGTERM while a Decrypt waits on a hung KMS: the plugin still exits promptly.
    let _stalled = Stalled::stop(&moto);
    let in_flight = {
        let mut client = plugin.client().await;
        let request = support::decrypt_request(&old_b);
        tokio::spawn(async move { client.decrypt(request).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    plugin.signal(libc::SIGTERM);
    let exit = plugin.wait_exit(KMS_BUDGET + Duration::from_secs(3));
    eprintln!(
        "exit after SIGTERM with KMS hung: {exit} after {:?}",
        started.elapsed()
    );
    assert!(exit.success(), "{exit}\n{}", plugin.output());
    let (answer, _) = within(PROMPT, "the call in flight at SIGTERM", in_flight).await;
    let err = answer.expect("decrypt task").expect_err("KMS hangs");
    assert!(
        matches!(err.code(), Code::Unavailable | Code::DeadlineExceeded),
        "{err:?}"
    );
}

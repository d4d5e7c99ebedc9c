//! The keyring over in-memory roots ([`MemoryRoot`]): rotation by count and by age (on
//! tokio's paused clock), the successor, retired roots, the unwrap cache, and health.

use std::path::Path;
use std::sync::atomic::Ordering;

use super::*;
use crate::root::RootKey;
use crate::root::memory::MemoryRoot;

/// A keyring over `roots` (name, role, root), first active, with `adjust`ed settings and
/// a fresh cache.
pub(super) fn keyring(
    roots: &[(&str, Role, &Arc<MemoryRoot>)],
    adjust: impl FnOnce(&mut Config),
) -> Arc<Keyring> {
    let mut config = Config::embedded(Path::new("/nonexistent"));
    adjust(&mut config);
    let rate = UnwrapRate::from(&config.cache);
    let roots = roots
        .iter()
        .map(|(name, role, root)| {
            let key: Arc<dyn RootKey> = Arc::<MemoryRoot>::clone(root);
            Arc::new(Root::new(name, *role, key, Default::default(), rate))
        })
        .collect();
    let cache = Arc::new(KekCache::new(config.cache.capacity));
    Arc::new(Keyring::assemble(&config, roots, Vec::new(), cache).expect("keyring"))
}

fn unwraps(root: &MemoryRoot) -> u64 {
    root.unwraps.load(Ordering::SeqCst)
}

/// The local KEK in use, to tell one from its successor.
fn current(keyring: &Keyring) -> Arc<LocalKek> {
    keyring.current().expect("a local KEK")
}

#[tokio::test(start_paused = true)]
async fn local_keks_are_replaced_by_age_with_the_successor_made_ahead() {
    let a = Arc::new(MemoryRoot::new());
    let ring = keyring(&[("a", Role::Active, &a)], |c| {
        c.local_kek.max_age_seconds = 300;
        c.local_kek.prepare_at_percent = 80;
    });
    ring.start().await.expect("start");
    tokio::spawn(ring.clone().maintain());
    let first = current(&ring);
    // 80% of 300 s: the successor is made and waits; the first key still seals.
    tokio::time::sleep(Duration::from_secs(241)).await;
    assert!(ring.has_prepared(), "successor prepared at 80% of the age");
    assert!(ring.info().1.successor_ready, "reported (metrics, alerts)");
    assert!(Arc::ptr_eq(&first, &current(&ring)));
    // At the age limit the prepared successor takes over: no root call is needed for it.
    let wraps = a.wraps.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert!(!Arc::ptr_eq(&first, &current(&ring)), "promoted at 300 s");
    assert!(!ring.has_prepared(), "the successor is in use");
    assert!(!ring.info().1.successor_ready);
    assert_eq!(
        a.wraps.load(Ordering::SeqCst),
        wraps,
        "made ahead, not at the limit"
    );
    assert!(ring.encrypt(b"seed").is_ok());
    ring.stop();
}

#[tokio::test]
async fn local_keks_are_replaced_by_count() {
    let a = Arc::new(MemoryRoot::new());
    let ring = keyring(&[("a", Role::Active, &a)], |c| {
        c.local_kek.max_encryptions = 1000;
    });
    ring.start().await.expect("start");
    let first = current(&ring);
    for _ in 0..1000 {
        ring.encrypt(b"seed").expect("encrypt");
    }
    assert!(ring.spent(&first));
    // With no successor made yet, Encrypt fails instead of overusing the key.
    assert!(matches!(
        ring.encrypt(b"seed"),
        Err(KeyringError::NotReady(_))
    ));
    ring.rotate().await.expect("rotate");
    assert!(!Arc::ptr_eq(&first, &current(&ring)));
    assert!(ring.encrypt(b"seed").is_ok());
}

#[tokio::test]
async fn retired_roots_still_decrypt_and_the_cache_saves_unwraps() {
    let a = Arc::new(MemoryRoot::new());
    let b = Arc::new(MemoryRoot::new());
    let old = keyring(&[("a", Role::Active, &a)], |_| {});
    old.start().await.expect("start");
    let sealed = old.encrypt(b"secret seed").expect("encrypt");
    // Rotated: b active, a retired; a fresh cache must unwrap through a, once.
    let new = keyring(&[("b", Role::Active, &b), ("a", Role::Retired, &a)], |_| {});
    new.start().await.expect("start");
    let before = unwraps(&a);
    for _ in 0..3 {
        let plain = new
            .decrypt(&sealed.key_id, &sealed.ciphertext, &sealed.annotations)
            .await
            .expect("decrypt under the retired root");
        assert_eq!(plain.as_slice(), b"secret seed");
    }
    assert_eq!(unwraps(&a) - before, 1, "one miss, then hits");
    assert_ne!(new.key_id(), old.key_id());
}

#[tokio::test]
async fn concurrent_decrypts_of_one_local_kek_unwrap_once() {
    let a = Arc::new(MemoryRoot::new());
    let writer = keyring(&[("a", Role::Active, &a)], |_| {});
    writer.start().await.expect("start");
    let sealed = Arc::new(writer.encrypt(b"seed").expect("encrypt"));
    let reader = keyring(&[("a", Role::Active, &a)], |_| {});
    let before = unwraps(&a);
    let calls: Vec<_> = (0..16)
        .map(|_| {
            let (reader, sealed) = (reader.clone(), sealed.clone());
            tokio::spawn(async move {
                reader
                    .decrypt(&sealed.key_id, &sealed.ciphertext, &sealed.annotations)
                    .await
                    .map(|p| p.to_vec())
            })
        })
        .collect();
    for call in calls {
        assert_eq!(call.await.expect("join").expect("decrypt"), b"seed");
    }
    assert_eq!(unwraps(&a) - before, 1, "single flight");
}

#[tokio::test]
async fn a_forged_copy_is_unwrapped_once_then_refused_from_the_negative_cache() {
    let a = Arc::new(MemoryRoot::new());
    let ring = keyring(&[("a", Role::Active, &a)], |_| {});
    ring.start().await.expect("start");
    let mut sealed = ring.encrypt(b"seed").expect("encrypt");
    for copy in sealed.annotations.values_mut() {
        if let Some(last) = copy.last_mut() {
            *last ^= 1;
        }
    }
    // Not in the cache (another process's copy, say): a cold keyring must unwrap it.
    let cold = keyring(&[("a", Role::Active, &a)], |_| {});
    let before = unwraps(&a);
    for _ in 0..5 {
        let got = cold
            .decrypt(&sealed.key_id, &sealed.ciphertext, &sealed.annotations)
            .await;
        assert!(matches!(
            got,
            Err(KeyringError::Envelope(EnvelopeError::Authentication))
        ));
    }
    assert_eq!(unwraps(&a) - before, 1);
}

#[tokio::test]
async fn health_follows_the_error_kind_of_the_last_probe() {
    let a = Arc::new(MemoryRoot::new());
    let ring = keyring(&[("a", Role::Active, &a)], |_| {});
    ring.start().await.expect("start");
    assert_eq!(ring.health(), Health::Ok);
    for kind in [ErrorKind::Unavailable, ErrorKind::RateLimited] {
        a.fail_with(Some(kind));
        ring.probe_wrappers().await;
        let health = ring.health();
        assert!(
            matches!(health, Health::Degraded { .. }),
            "{kind:?}: {health:?}"
        );
        assert_eq!(health.healthz(), HEALTHZ_OK);
        assert!(health.is_ready());
    }
    for kind in [
        ErrorKind::Denied,
        ErrorKind::KeyDisabled,
        ErrorKind::CredentialsRejected,
        ErrorKind::Misconfigured,
    ] {
        a.fail_with(Some(kind));
        ring.probe_wrappers().await;
        let health = ring.health();
        assert!(!health.is_ready(), "{kind:?}: {health:?}");
        assert!(
            health.healthz().contains("active root key \"a\" rejected"),
            "{health:?}"
        );
    }
    a.fail_with(None);
    ring.probe_wrappers().await;
    assert_eq!(ring.health(), Health::Ok);
}

#[tokio::test]
async fn a_failed_unwrap_names_the_kind_for_the_grpc_layer() {
    let a = Arc::new(MemoryRoot::new());
    let writer = keyring(&[("a", Role::Active, &a)], |_| {});
    writer.start().await.expect("start");
    let sealed = writer.encrypt(b"seed").expect("encrypt");
    let reader = keyring(&[("a", Role::Active, &a)], |_| {});
    a.fail_with(Some(ErrorKind::KeyDisabled));
    let got = reader
        .decrypt(&sealed.key_id, &sealed.ciphertext, &sealed.annotations)
        .await;
    assert!(
        matches!(&got, Err(KeyringError::Root { name, kind: ErrorKind::KeyDisabled }) if name == "a"),
        "{:?}",
        got.err()
    );
}

#[tokio::test]
async fn a_root_rotated_at_its_source_is_reported_and_its_older_copies_still_open() {
    let v1 = Arc::new(MemoryRoot::new());
    let ring = keyring(&[("vault", Role::Active, &v1)], |_| {});
    ring.start().await.expect("start");
    let sealed = ring.encrypt(b"seed").expect("encrypt");
    ring.probe_wrappers().await;
    assert!(!ring.take_root_changed(), "nothing changed yet");
    v1.mark_rotated();
    ring.probe_wrappers().await;
    assert!(ring.take_root_changed());
    assert!(!ring.take_root_changed(), "reported once per change");

    // What the plugin's reload then opens: the same key under its new version's key_id.
    let v2 = Arc::new(v1.next_version());
    let new = keyring(&[("vault", Role::Active, &v2)], |_| {});
    new.start().await.expect("start");
    assert_ne!(new.key_id(), ring.key_id());
    assert!(
        new.answers_to(ring.key_id()),
        "the reload must not count v1 as dropped"
    );
    let before = unwraps(&v2);
    let plain = new
        .decrypt(&sealed.key_id, &sealed.ciphertext, &sealed.annotations)
        .await
        .expect("a v1 copy opens under the key_id it was wrapped with");
    assert_eq!(plain.as_slice(), b"seed");
    assert_eq!(unwraps(&v2) - before, 1);
    let fresh = new.encrypt(b"fresh").expect("encrypt");
    assert_eq!(&fresh.key_id, new.key_id().as_str());

    // A root that does not answer to v1 cannot open it, even with the same key.
    let other = Arc::new(MemoryRoot::new());
    let unrelated = keyring(&[("other", Role::Active, &other)], |_| {});
    unrelated.start().await.expect("start");
    assert!(!unrelated.answers_to(ring.key_id()));
}

//! The keyring over in-memory roots (the file root's AES-GCM) whose switches play a broken
//! root: a token that hands back copies that do not unwrap, a KMS that refuses or is down.

use rand::RngCore;

use super::memory_tests::keyring;
use super::*;
use crate::root::memory::MemoryRoot;

struct Fixture {
    keyring: Arc<Keyring>,
    roots: Vec<Arc<MemoryRoot>>,
}

/// A keyring whose roots are fresh in-memory keys named `names` (first active, the rest
/// `also_wrap`), each with its failure switches.
async fn fixture(names: &[&str], adjust: impl FnOnce(&mut Config)) -> Fixture {
    let roots: Vec<Arc<MemoryRoot>> = names.iter().map(|_| Arc::default()).collect();
    let spec: Vec<_> = names
        .iter()
        .zip(&roots)
        .enumerate()
        .map(|(i, (name, root))| {
            let role = if i == 0 { Role::Active } else { Role::AlsoWrap };
            (*name, role, root)
        })
        .collect();
    Fixture {
        keyring: keyring(&spec, adjust),
        roots,
    }
}

fn unwraps(keyring: &Keyring, name: &str) -> u64 {
    let (roots, _) = keyring.info();
    roots
        .iter()
        .find(|r| r.name == name)
        .map(|r| r.unwrap_calls)
        .expect("root in info")
}

#[tokio::test]
async fn a_copy_that_does_not_unwrap_is_never_used() {
    let f = fixture(&["main"], |_| {}).await;
    f.roots[0].corrupt_wraps(true);
    let error = f.keyring.start().await.expect_err("start must refuse");
    assert!(!error.is_transient(), "{error}");
    assert!(error.to_string().contains("key \"main\""), "{error}");
    let health = f.keyring.health();
    assert_ne!(health.healthz(), "ok");
    assert!(
        health.healthz().contains("\"main\""),
        "{}",
        health.healthz()
    );
    assert!(matches!(
        f.keyring.encrypt(b"seed"),
        Err(KeyringError::NotReady(_))
    ));
    assert!(f.keyring.cache().is_empty(), "an unproven key was cached");
    let (roots, _) = f.keyring.info();
    assert_eq!(roots[0].state, "rejected");
}

#[tokio::test]
async fn a_broken_also_wrap_root_fails_health_but_the_proven_kek_keeps_serving() {
    let f = fixture(&["main", "backup"], |_| {}).await;
    f.keyring.start().await.expect("start");
    let before = f.keyring.encrypt(b"seed").expect("encrypt");
    f.roots[1].corrupt_wraps(true);
    assert!(
        f.keyring.rotate().await.is_err(),
        "successor must be refused"
    );
    let health = f.keyring.health();
    assert!(
        health.healthz().contains("also-wrap root key \"backup\""),
        "{}",
        health.healthz()
    );
    // Encrypt goes on under the current, proven local KEK (same wrapped copies).
    let after = f.keyring.encrypt(b"seed").expect("encrypt");
    assert_eq!(after.annotations, before.annotations);
    assert!(!f.keyring.has_prepared(), "an unproven successor was kept");
    // Once the root round-trips again, the successor is made and health recovers.
    f.roots[1].corrupt_wraps(false);
    f.keyring.rotate().await.expect("rotate");
    assert_eq!(f.keyring.health().healthz(), "ok");
    assert!(f.keyring.has_prepared());
}

#[tokio::test]
async fn probes_report_refusals_as_unhealthy_and_outages_as_degraded() {
    let f = fixture(&["main"], |_| {}).await;
    f.keyring.start().await.expect("start");
    f.roots[0].fail_with(Some(ErrorKind::Unavailable));
    f.keyring.probe_wrappers().await;
    assert_eq!(
        f.keyring.health().healthz(),
        "ok",
        "unreachable is degraded"
    );
    assert_eq!(f.keyring.info().0[0].state, "degraded");
    f.roots[0].fail_with(Some(ErrorKind::Denied));
    f.keyring.probe_wrappers().await;
    let health = f.keyring.health();
    let healthz = health.healthz();
    assert!(
        healthz.contains("active root key \"main\" rejected")
            && healthz.contains("denied (injected)"),
        "{healthz}"
    );
    f.roots[0].fail_with(None);
    f.keyring.probe_wrappers().await;
    assert_eq!(f.keyring.health().healthz(), "ok");
}

#[tokio::test]
async fn forged_copies_cost_a_bounded_number_of_unwraps_and_evict_nothing() {
    let f = fixture(&["main"], |c| {
        c.cache.capacity = 2;
        c.cache.unwraps_per_second = 10;
        c.cache.unwrap_burst = 5;
    })
    .await;
    f.keyring.start().await.expect("start");
    let sealed = f.keyring.encrypt(b"a DEK seed").expect("encrypt");
    let key_id = sealed.key_id.clone();
    let (name, copy) = sealed.annotations.iter().next().expect("annotation");
    let before = unwraps(&f.keyring, "main");

    let started = std::time::Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..10_000 {
        let keyring = f.keyring.clone();
        let (key_id, ciphertext) = (key_id.clone(), sealed.ciphertext.clone());
        let mut forged = vec![0u8; copy.len()];
        rand::thread_rng().fill_bytes(&mut forged);
        let annotations = HashMap::from([(name.clone(), forged)]);
        tasks.push(tokio::spawn(async move {
            let result = keyring.decrypt(&key_id, &ciphertext, &annotations).await;
            (result.map(drop), annotations)
        }));
    }
    let mut refused = Vec::new();
    let mut throttled = 0;
    for task in tasks {
        match task.await.expect("join") {
            (Err(KeyringError::Envelope(EnvelopeError::Authentication)), annotations) => {
                refused.push(annotations);
            }
            (
                Err(KeyringError::Root {
                    kind: ErrorKind::Throttled,
                    ..
                }),
                _,
            ) => throttled += 1,
            (other, _) => panic!("forged copy: {:?}", other.err()),
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    let calls = unwraps(&f.keyring, "main") - before;
    let bound = 5 + (10.0 * elapsed).ceil() as u64;
    assert!(
        calls >= 5 && calls <= bound,
        "{calls} unwraps in {elapsed:.2} s"
    );
    assert_eq!(calls, refused.len() as u64);
    assert_eq!(throttled + refused.len(), 10_000);

    // The good key was never pushed out of the (two-entry) cache: no root call for it.
    let plain = f
        .keyring
        .decrypt(&key_id, &sealed.ciphertext, &sealed.annotations)
        .await
        .expect("genuine decrypt");
    assert_eq!(plain.as_slice(), b"a DEK seed");
    // A forged copy seen once is refused from memory.
    for annotations in &refused {
        let again = f
            .keyring
            .decrypt(&key_id, &sealed.ciphertext, annotations)
            .await;
        assert!(matches!(again, Err(KeyringError::Envelope(_))));
    }
    assert_eq!(unwraps(&f.keyring, "main") - before, calls);
    assert_eq!(f.keyring.health().healthz(), "ok");
}

#[tokio::test]
async fn each_local_kek_seals_exactly_max_encryptions_and_its_successor_is_ready() {
    let f = fixture(&["main"], |c| {
        c.local_kek.max_encryptions = 1000;
        c.local_kek.prepare_at_percent = 80;
    })
    .await;
    f.keyring.start().await.expect("start");
    tokio::spawn(f.keyring.clone().maintain());
    let mut sealed_by: Vec<(HashMap<String, Vec<u8>>, u64)> = Vec::new();
    for i in 1..=3000u64 {
        let sealed = f.keyring.encrypt(b"seed").expect("encrypt never waits");
        match sealed_by.last_mut() {
            Some((annotations, n)) if *annotations == sealed.annotations => *n += 1,
            _ => sealed_by.push((sealed.annotations, 1)),
        }
        let (_, local) = f.keyring.info();
        assert!(local.encryptions <= 1000, "{} of 1000", local.encryptions);
        if i % 1000 == 800 {
            // The successor is due now: let the background task make it.
            let deadline = Instant::now() + Duration::from_secs(5);
            while !f.keyring.has_prepared() {
                assert!(Instant::now() < deadline, "no successor after {i} seals");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    }
    let counts: Vec<u64> = sealed_by.iter().map(|(_, n)| *n).collect();
    assert_eq!(counts, [1000, 1000, 1000]);
    f.keyring.stop();
}

#[test]
fn the_successor_threshold_is_exact() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    for (max, percent, want) in [
        (1000, 80, 800),
        (1500, 80, 1200),
        (1001, 80, 801),
        (1000, 1, 10),
    ] {
        let f = runtime.block_on(fixture(&["main"], |c| {
            c.local_kek.max_encryptions = max;
            c.local_kek.prepare_at_percent = percent;
        }));
        assert_eq!(f.keyring.prepare_count(), want, "{max} at {percent} %");
    }
}

/// The cache is keyed by the annotations digest: a hit needs the exact wrapped bytes (and
/// key_ids) the key was cached with. One changed byte in a copy is a miss that goes to the
/// root (and fails there), never a hit on the cached local KEK.
#[tokio::test]
async fn a_cache_hit_needs_the_exact_wrapped_copies() {
    let f = fixture(&["main", "backup"], |_| {}).await;
    f.keyring.start().await.expect("start");
    let sealed = f.keyring.encrypt(b"seed").expect("encrypt");
    let key_id = f.keyring.key_id().to_string();
    let before = (unwraps(&f.keyring, "main"), unwraps(&f.keyring, "backup"));
    assert_eq!(
        f.keyring
            .decrypt(&key_id, &sealed.ciphertext, &sealed.annotations)
            .await
            .expect("hit")
            .as_slice(),
        b"seed"
    );
    assert_eq!(
        (unwraps(&f.keyring, "main"), unwraps(&f.keyring, "backup")),
        before,
        "a hit made a root call"
    );
    for name in sealed.annotations.keys() {
        let mut changed = sealed.annotations.clone();
        if let Some(copy) = changed.get_mut(name) {
            copy[0] ^= 1;
        }
        let got = f
            .keyring
            .decrypt(&key_id, &sealed.ciphertext, &changed)
            .await;
        assert!(got.is_err(), "{name}");
    }
    let after = (unwraps(&f.keyring, "main"), unwraps(&f.keyring, "backup"));
    assert!(
        after.0 + after.1 > before.0 + before.1,
        "a changed copy was served from the cache"
    );
}

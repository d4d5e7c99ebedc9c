//! What a local-KEK rotation costs, in process, per root (file key, SoftHSM2 AES-GCM and
//! RSA-OAEP, a software TPM, AWS KMS on moto, Vault Transit on OpenBao):
//!
//! - `rotation/make_local_kek/ROOT` (criterion): making a successor — a random key, wrapped
//!   by the root, the copy unwrapped again to prove it opens, the cipher put in the cache.
//!   This is what the background upkeep does once the current key reaches
//!   `prepare_at_percent` of its limits; Encrypt never waits for it. (Nothing is persisted:
//!   the wrapped copies travel in each ciphertext's annotations.) Measured through
//!   `Keyring::start`, which runs the same rotation step (with a current key that is not
//!   spent, its result becomes the prepared successor).
//! - switch-over (printed, median and p90 of `ROTATION_CYCLES` (default 100) cycles): the
//!   Encrypt that finds the current key spent and promotes the prepared successor, against
//!   the Encrypt just before it (`max_encryptions = 1000`, successor made beforehand as the
//!   upkeep would). Timed call by call: criterion cannot hide the 1000 Encrypts and the
//!   rotation each switch-over needs.
//!
//! Run: `cargo bench --bench rotation` (env: `ROTATION_ROOTS` e.g. `file,pkcs11` (default
//! all), `ROTATION_CYCLES`). Roots whose server or module is not installed are skipped with
//! a message.
#![allow(missing_docs)]
#![allow(unsafe_code)] // the shared test harness signals its processes; set_var, see main

#[path = "../tests/support/mod.rs"]
mod support;

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::Criterion;
use kms_plugin::config::Config;
use kms_plugin::keyring::cache::KekCache;
use kms_plugin::keyring::{Keyring, Retired};
use support::backends::Backend;
use tempfile::TempDir;

/// One root, opened in this process.
struct Root {
    name: &'static str,
    keyring: Arc<Keyring>,
    _dir: TempDir,
}

/// A fresh key of `backend` and its config (all keys are made before any root is opened
/// here: SoftHSM2 lists its tokens once, when this process first loads it).
async fn make<B: Backend>(name: &'static str, backend: &B) -> (&'static str, Config, TempDir) {
    let dir = common::workdir(&format!("rotation-{name}-"));
    let body = backend.new_key(dir.path(), "main").await;
    let socket = common::path_str(&dir.path().join("unused.sock"));
    let path = support::write_config(
        dir.path(),
        &socket,
        "main",
        &[("main", body)],
        "[local_kek]\nmax_encryptions = 1000\n[health]\nroot_check_interval_seconds = 0\n",
    );
    (name, Config::load(&path).expect("config"), dir)
}

async fn open((name, config, dir): (&'static str, Config, TempDir)) -> Root {
    let cache = Arc::new(KekCache::new(config.cache.capacity));
    let keyring = Keyring::open(&config, cache, &Default::default(), Retired::Require)
        .await
        .expect("open the root");
    keyring.start().await.expect("first local KEK");
    Root {
        name,
        keyring: Arc::new(keyring),
        _dir: dir,
    }
}

/// Encrypt until one seal is left on the current key; make the successor (as the upkeep
/// does at 80 %); time the last normal Encrypt and the one that switches over.
async fn cycle(keyring: &Keyring, seed: &[u8]) -> (Duration, Duration) {
    let max = keyring.info().1.max_encryptions;
    while keyring.info().1.encryptions + 1 < max {
        keyring.encrypt(seed).expect("encrypt");
    }
    keyring.start().await.expect("successor");
    assert!(keyring.info().1.successor_ready, "successor not prepared");
    let t = Instant::now();
    let normal = keyring.encrypt(seed).expect("encrypt");
    let normal_took = t.elapsed();
    let t = Instant::now();
    let switched = keyring.encrypt(seed).expect("encrypt at the switch-over");
    let switch_took = t.elapsed();
    assert_ne!(
        normal.annotations, switched.annotations,
        "the timed call did not switch local KEKs"
    );
    (normal_took, switch_took)
}

fn main() {
    if !common::invoked_as_bench() {
        return;
    }
    let only: String = common::env_or("ROTATION_ROOTS", String::new());
    let cycles: usize = common::env_or("ROTATION_CYCLES", 100);
    let wanted = |name: &str| {
        if !common::selected(name, &only) {
            return false;
        }
        match common::missing(name) {
            Some(why) => {
                println!("{name}: SKIPPED ({why})");
                false
            }
            None => true,
        }
    };
    // Servers first, and their environment set for the roots this process opens, before
    // any other thread exists (set_var is only sound then).
    let tpm = wanted("tpm").then(support::backends::tpm::TpmBackend::start);
    #[cfg(feature = "aws-kms")]
    let aws = wanted("aws").then(support::backends::aws::AwsBackend::start);
    #[cfg(feature = "vault-transit")]
    let vault = wanted("vault").then(support::backends::vault::VaultBackend::start);
    let (pkcs11, rsa) = (wanted("pkcs11"), wanted("pkcs11_rsa_oaep"));
    let mut env = Vec::new();
    if pkcs11 || rsa {
        env.extend(support::backends::pkcs11::hsm().env());
    }
    if let Some(tpm) = &tpm {
        env.extend(tpm.env());
    }
    #[cfg(feature = "aws-kms")]
    if let Some(aws) = &aws {
        env.extend(aws.env());
    }
    for (key, value) in env {
        // SAFETY: no thread of this process reads the environment yet (the servers above
        // are child processes; moto's log reader only reads a pipe).
        unsafe { std::env::set_var(key, value) };
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let roots: Vec<Root> = rt.block_on(async {
        let mut keys = Vec::new();
        if wanted("file") {
            keys.push(make("file", &support::backends::file::FileBackend).await);
        }
        if pkcs11 {
            keys.push(make("pkcs11", &support::backends::pkcs11::SoftHsmBackend).await);
        }
        if rsa {
            let backend = support::backends::pkcs11::SoftHsmRsaBackend;
            keys.push(make("pkcs11_rsa_oaep", &backend).await);
        }
        if let Some(tpm) = &tpm {
            keys.push(make("tpm", tpm).await);
        }
        #[cfg(feature = "aws-kms")]
        if let Some(aws) = &aws {
            keys.push(make("aws", aws).await);
        }
        #[cfg(feature = "vault-transit")]
        if let Some(vault) = &vault {
            keys.push(make("vault", vault).await);
        }
        let mut roots = Vec::new();
        for key in keys {
            roots.push(open(key).await);
        }
        roots
    });

    let mut criterion = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .configure_from_args();
    let mut group = criterion.benchmark_group("rotation");
    for root in &roots {
        group.bench_function(format!("make_local_kek/{}", root.name), |b| {
            b.to_async(&rt)
                .iter(|| async { root.keyring.start().await.expect("rotate") });
        });
    }
    group.finish();
    criterion.final_summary();

    let seed = [7u8; 32];
    println!("Encrypt at the switch-over vs the Encrypt before it ({cycles} cycles):");
    for root in &roots {
        let (mut normal, mut switch) = (Vec::new(), Vec::new());
        rt.block_on(async {
            for _ in 0..cycles {
                let (n, s) = cycle(&root.keyring, &seed).await;
                normal.push(n);
                switch.push(s);
            }
        });
        println!(
            "  {:<16} normal {} | switch-over {} | max switch-over {}",
            root.name,
            common::summary(&normal),
            common::summary(&switch),
            common::show(switch.iter().max().copied().unwrap_or_default())
        );
    }
}

//! Cold Decrypt after a restart, per root: the release plugin on a real root (file key,
//! SoftHSM2 AES-GCM and RSA-OAEP, a software TPM, AWS KMS on moto, Vault Transit on
//! OpenBao) makes an Encrypt and stops; then, K times, it starts again and the bench times
//! start-up until Status answers "ok", a first call (an Encrypt, which calls no root), the
//! first Decrypt (a cache miss: one root unwrap of the local KEK) and warm Decrypts after it
//! (cache hits).
//!
//! Run: `cargo bench --bench cold` (env: `COLD_K` restarts per root (default 10),
//! `COLD_ROOTS` e.g. `file,pkcs11` (default all)). A root whose server or module is not
//! installed is skipped with a message naming what is missing.
#![allow(missing_docs)]
#![allow(unsafe_code)] // the shared test harness signals its processes through libc

#[path = "../tests/support/mod.rs"]
mod support;

mod common;

use std::time::{Duration, Instant};

use common::{Served, summary};
use support::backends::Backend;

/// Warm Decrypts timed after each cold one.
const WARM_PER_RUN: usize = 5;

struct Times {
    ready: Vec<Duration>,
    first_encrypt: Vec<Duration>,
    cold: Vec<Duration>,
    warm: Vec<Duration>,
}

async fn run<B: Backend>(root: &str, backend: B, k: usize) -> Times {
    let dir = common::workdir(&format!("cold-{root}-"));
    let body = backend.new_key(dir.path(), "main").await;
    let socket = support::socket_in(dir.path());
    let config = support::write_config(dir.path(), &socket, "main", &[("main", body)], "");
    let env = backend.env();
    let mut served = Served::start(&config, &socket, &env, dir.path(), 0).await;
    let seed = support::seed();
    let sealed = support::encrypt(&mut served.client, &seed).await;
    let request = support::decrypt_request(&sealed);
    served.stop();
    let mut times = Times {
        ready: Vec::new(),
        first_encrypt: Vec::new(),
        cold: Vec::new(),
        warm: Vec::new(),
    };
    for run in 1..=k {
        let mut served = Served::start(&config, &socket, &env, dir.path(), run as u32).await;
        times.ready.push(served.ready_after);
        // The first call of a new process pays for lazy set-up (first log line, first
        // request on the connection); an Encrypt (no root call) takes that share, so the
        // first Decrypt shows the unwrap.
        let t = Instant::now();
        support::encrypt(&mut served.client, &support::seed()).await;
        times.first_encrypt.push(t.elapsed());
        for i in 0..=WARM_PER_RUN {
            let t = Instant::now();
            let plaintext = served
                .client
                .decrypt(request.clone())
                .await
                .expect("decrypt")
                .into_inner()
                .plaintext;
            let took = t.elapsed();
            assert_eq!(plaintext, seed, "Decrypt returned another seed");
            if i == 0 {
                times.cold.push(took);
            } else {
                times.warm.push(took);
            }
        }
        served.stop();
    }
    times
}

fn report(root: &str, times: &Times) {
    println!("{root}");
    println!("  start-up to ready   {}", summary(&times.ready));
    println!("  first call: Encrypt {}", summary(&times.first_encrypt));
    println!("  first Decrypt       {}", summary(&times.cold));
    println!("  warm Decrypt        {}", summary(&times.warm));
}

async fn bench() {
    let k: usize = common::env_or("COLD_K", 10);
    let only: String = common::env_or("COLD_ROOTS", String::new());
    println!(
        "cold Decrypt after restart: {k} restarts per root, {WARM_PER_RUN} warm Decrypts after each"
    );
    macro_rules! root {
        ($name:literal, $backend:expr) => {
            if common::selected($name, &only) {
                match common::missing($name) {
                    Some(why) => println!("{}: SKIPPED ({why})", $name),
                    None => report($name, &run($name, $backend, k).await),
                }
            }
        };
    }
    root!("file", support::backends::file::FileBackend);
    root!("pkcs11", support::backends::pkcs11::SoftHsmBackend);
    root!(
        "pkcs11_rsa_oaep",
        support::backends::pkcs11::SoftHsmRsaBackend
    );
    root!("tpm", support::backends::tpm::TpmBackend::start());
    #[cfg(feature = "aws-kms")]
    root!("aws", support::backends::aws::AwsBackend::start());
    #[cfg(feature = "vault-transit")]
    root!("vault", support::backends::vault::VaultBackend::start());
}

fn main() {
    common::run_bench(bench);
}

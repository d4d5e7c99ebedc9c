//! Decrypt and memory with many cached local KEKs, end to end: the release plugin on a file
//! root with `[cache] capacity` above N makes N distinct local KEKs, and the bench reports
//! RSS and Decrypt latency with 1 and with N keys cached, for the first and the last key.
//!
//! How the N local KEKs are made: `[local_kek] max_encryptions` is at least 1000 (config
//! bounds), so rotating by count would take N × 1000 Encrypts (10 M calls for N = 10,000).
//! Instead each key comes from a config reload (the Admin Reload RPC, what `kms-plugin
//! reload` sends): a reload makes a fresh local KEK through the same path as a rotation
//! (generate, wrap, unwrap the copy again, cache it) and keeps the cache, then one Encrypt
//! seals a seed under it. After a restart the same N ciphertexts are Decrypted once each:
//! N cache misses (one root unwrap each), after which all N are cached again.
//!
//! Run: `cargo bench --bench cache_scale` (env: `SCALE_KEYS` (default 10000),
//! `SCALE_REPEAT` timed Decrypts per probe (default 200)).
#![allow(missing_docs)]
#![allow(unsafe_code)] // the shared test harness signals its processes through libc

#[path = "../tests/support/mod.rs"]
mod support;

mod common;

use std::time::{Duration, Instant};

use common::{Client, Served, show, summary};
use kms_plugin::proto::admin::ReloadRequest;
use kms_plugin::proto::v2::DecryptRequest;
use support::backends::Backend;

async fn decrypt(client: &mut Client, request: &DecryptRequest) -> Duration {
    let t = Instant::now();
    client.decrypt(request.clone()).await.expect("decrypt");
    t.elapsed()
}

/// Median latency of Decrypt of the first and of the last key, `repeat` times each,
/// interleaved so that load changes hit both alike.
async fn first_vs_last(client: &mut Client, requests: &[DecryptRequest], repeat: usize) -> String {
    let (mut first, mut last) = (Vec::new(), Vec::new());
    let (Some(a), Some(b)) = (requests.first(), requests.last()) else {
        return String::new();
    };
    for _ in 0..repeat {
        first.push(decrypt(client, a).await);
        last.push(decrypt(client, b).await);
    }
    format!(
        "first key {} | last key {}",
        summary(&first),
        summary(&last)
    )
}

/// Decrypts every request once, in order; returns the latencies.
async fn sweep(client: &mut Client, requests: &[DecryptRequest]) -> Vec<Duration> {
    let mut times = Vec::with_capacity(requests.len());
    for request in requests {
        times.push(decrypt(client, request).await);
    }
    times
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

async fn bench() {
    let n: usize = common::env_or("SCALE_KEYS", 10_000);
    let repeat: usize = common::env_or("SCALE_REPEAT", 200);
    let capacity = (n + 16).min(kms_plugin::config::MAX_CACHE_CAPACITY);
    assert!(
        capacity >= n,
        "SCALE_KEYS={n} is above the largest [cache] capacity ({capacity})"
    );
    let dir = common::workdir("cache-scale-");
    let body = support::backends::file::FileBackend
        .new_key(dir.path(), "main")
        .await;
    let socket = support::socket_in(dir.path());
    // Unwrap budget high enough for N misses in a row (the default 10/s would take N/10 s).
    let extra = format!(
        "[cache]\ncapacity = {capacity}\nunwraps_per_second = 10000\nunwrap_burst = 10000\n"
    );
    let config = support::write_config(dir.path(), &socket, "main", &[("main", body)], &extra);

    let mut served = Served::start(&config, &socket, &[], dir.path(), 0).await;
    let rss_start = served.rss_kib();
    let channel = kms_plugin::client::connect(&socket).await.expect("connect");
    let mut admin = kms_plugin::client::admin(channel);
    let started = Instant::now();
    let mut requests: Vec<DecryptRequest> = Vec::with_capacity(n);
    for i in 0..n {
        if i > 0 {
            admin
                .reload(ReloadRequest { force: false })
                .await
                .expect("reload");
        }
        let sealed = support::encrypt(&mut served.client, &support::seed()).await;
        if let Some(previous) = requests.last() {
            assert_ne!(
                previous.annotations, sealed.annotations,
                "a reload must make a new local KEK"
            );
        }
        requests.push(support::decrypt_request(&sealed));
    }
    let made = started.elapsed();
    let rss_made = served.rss_kib();
    println!(
        "{n} local KEKs made by {} reloads in {:.1} s ({} per reload + Encrypt); RSS {} at start, {} after",
        n - 1,
        made.as_secs_f64(),
        show(made / n as u32),
        mib(rss_start),
        mib(rss_made)
    );
    let hits = sweep(&mut served.client, &requests).await;
    println!(
        "Decrypt of each, all {n} cached (made here): {}; RSS {}",
        summary(&hits),
        mib(served.rss_kib())
    );
    println!(
        "  cache hit with {n} cached: {}",
        first_vs_last(&mut served.client, &requests, repeat).await
    );
    served.stop();

    let mut served = Served::start(&config, &socket, &[], dir.path(), 1).await;
    let rss_ready = served.rss_kib();
    let one = &requests[..1];
    let first_miss = decrypt(&mut served.client, &one[0]).await;
    let mut with_one = Vec::new();
    for _ in 0..repeat {
        with_one.push(decrypt(&mut served.client, &one[0]).await);
    }
    println!(
        "after a restart: RSS {} at ready; first Decrypt (miss) {}; cache hit with 1 cached: {}",
        mib(rss_ready),
        show(first_miss),
        summary(&with_one)
    );
    let started = Instant::now();
    let misses = sweep(&mut served.client, &requests[1..]).await;
    let took = started.elapsed();
    let rss_full = served.rss_kib();
    println!(
        "Decrypt of each other key once (a miss each, one file-root unwrap): {} in {:.1} s; RSS {} ({:.2} KiB more per cached key)",
        summary(&misses),
        took.as_secs_f64(),
        mib(rss_full),
        rss_full.saturating_sub(rss_ready) as f64 / n as f64
    );
    println!(
        "  cache hit with {n} cached: {}",
        first_vs_last(&mut served.client, &requests, repeat).await
    );
    let again = sweep(&mut served.client, &requests).await;
    println!(
        "Decrypt of each again (all hits): {}; RSS {}",
        summary(&again),
        mib(served.rss_kib())
    );
    served.stop();
}

fn main() {
    common::run_bench(bench);
}

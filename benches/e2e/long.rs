//! Memory over a long run (`E2E_LONG_CALLS=1000000 cargo bench --bench e2e`): the release
//! plugin gets that many calls from the grpc-go client, Encrypt of a fresh random seed then
//! Decrypt of the answer (checked), in chunks on connections that are opened for the chunk
//! and closed after it; the plugin's RSS is sampled after each chunk. Prints the samples and
//! the growth: the mean of the last quarter of the samples against the first quarter, after
//! a warm-up of the first tenth of the calls.

use std::time::Instant;

use crate::{env_or, go, plugin_command, report, rss_kib, spawn, status_kib, target_dir};

pub fn run(calls: u64) {
    let every: u64 = env_or("E2E_LONG_EVERY", 25_000);
    let connections: usize = env_or("E2E_LONG_CONNECTIONS", 4);
    let callers: usize = env_or("E2E_LONG_CALLERS", 16);
    assert!(
        go::available(),
        "E2E_LONG_CALLS drives the plugin with the grpc-go client: it needs `go` on PATH"
    );
    let programs = go::build(&target_dir().join("e2e/go"));
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("plugin.sock");
    let mut plugin = spawn(
        plugin_command(dir.path(), &socket),
        &dir.path().join("plugin.log"),
    );
    let mut client = go::Client::start(&programs.client, &socket);
    let pid = plugin.id();
    let load_before = report::load_average();
    println!(
        "e2e long run: {calls} calls (Encrypt + Decrypt round trips), {callers} callers over \
         {connections} connections opened and closed every {every} calls; {}; load average {load_before}",
        report::machine()
    );
    println!("{:>10} {:>10}", "calls", "RSS KiB");
    let first = rss_kib(pid);
    println!(
        "{:>10} {:>10}",
        0,
        first.map_or("?".into(), |v| v.to_string())
    );
    let started = Instant::now();
    let mut samples: Vec<(u64, u64)> = Vec::new();
    client.long(calls, connections, every, callers, |done| {
        let rss = rss_kib(pid);
        println!(
            "{done:>10} {:>10}",
            rss.map_or("?".into(), |v| v.to_string())
        );
        if let Some(rss) = rss {
            samples.push((done, rss));
        }
    });
    let elapsed = started.elapsed().as_secs_f64();
    let peak = status_kib(pid, "VmHWM:");
    let _ = plugin.kill();
    let _ = plugin.wait();

    let measured: Vec<u64> = samples
        .iter()
        .filter(|(done, _)| *done > calls / 10)
        .map(|(_, rss)| *rss)
        .collect();
    let quarter = measured.len() / 4;
    let mean = |s: &[u64]| s.iter().sum::<u64>() as f64 / s.len().max(1) as f64;
    println!(
        "\n{calls} calls in {elapsed:.0} s ({:.0} calls/s); load average {load_before} before, {} after",
        calls as f64 / elapsed,
        report::load_average()
    );
    if quarter == 0 {
        println!("too few samples for a growth figure: lower E2E_LONG_EVERY");
        return;
    }
    let (head, tail) = (
        mean(&measured[..quarter]),
        mean(&measured[measured.len() - quarter..]),
    );
    println!(
        "plugin RSS: {} KiB at start, mean {head:.0} KiB over the first quarter after warm-up \
         (the first tenth of the calls), {tail:.0} KiB over the last quarter: growth {:+.0} KiB \
         ({:+.2} %); peak (VmHWM) {} KiB",
        first.map_or("?".into(), |v| v.to_string()),
        tail - head,
        (tail - head) / head * 100.0,
        peak.map_or("?".into(), |v| v.to_string())
    );
}

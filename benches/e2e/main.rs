//! End-to-end throughput and latency: the release plugin (embedded default config: file
//! root, per-call audit log at info, written to a file) against an empty tonic KMS v2 handler
//! (`baseline.rs`), each in its own process on a Unix socket, driven by a tonic client over
//! one HTTP/2 connection per server (as kube-apiserver does). Rounds interleave the two
//! servers; each prints ops/s, p50 and p99 per op and concurrency, and the ratios
//! plugin/baseline.
//!
//! Run: `cargo bench --bench e2e` (env: `E2E_ROUNDS` (default 5), `E2E_SECONDS` per
//! measurement (default 2), `E2E_CONCURRENCY` (default `1,16`), `E2E_PLUGIN` another plugin
//! binary, e.g. a copy from before a change).
//!
//! Two helper modes of the same binary: `--serve-baseline SOCKET` runs the baseline
//! server, `--calls SOCKET encrypt|decrypt N` makes N sequential calls (for callgrind).
#![allow(missing_docs)]

mod baseline;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kms_plugin::proto::v2::key_management_service_client::KeyManagementServiceClient;
use kms_plugin::proto::v2::{DecryptRequest, EncryptRequest, StatusRequest};
use tonic::transport::Channel;

type Client = KeyManagementServiceClient<Channel>;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Op {
    Encrypt,
    Decrypt,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::Encrypt => "Encrypt",
            Op::Decrypt => "Decrypt",
        }
    }
}

/// What one call sends: a 32-byte seed to Encrypt, or what Encrypt returned to Decrypt.
#[derive(Clone)]
struct Calls {
    encrypt: EncryptRequest,
    decrypt: DecryptRequest,
}

impl Calls {
    async fn new(client: &mut Client) -> Self {
        let encrypt = EncryptRequest {
            plaintext: vec![7; 32],
            uid: "00000000-0000-0000-0000-000000000000".into(),
        };
        let sealed = client
            .encrypt(encrypt.clone())
            .await
            .expect("first encrypt")
            .into_inner();
        let decrypt = DecryptRequest {
            ciphertext: sealed.ciphertext,
            uid: encrypt.uid.clone(),
            key_id: sealed.key_id,
            annotations: sealed.annotations,
        };
        Self { encrypt, decrypt }
    }

    async fn call(&self, client: &mut Client, op: Op) {
        match op {
            Op::Encrypt => {
                client.encrypt(self.encrypt.clone()).await.expect("encrypt");
            }
            Op::Decrypt => {
                client.decrypt(self.decrypt.clone()).await.expect("decrypt");
            }
        }
    }
}

struct Server {
    name: &'static str,
    child: Child,
    client: Client,
    calls: Calls,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Latencies (ns) and elapsed time of one (server, op, concurrency) across rounds.
#[derive(Default)]
struct Samples {
    latencies: Vec<u64>,
    elapsed: Duration,
}

impl Samples {
    fn ops_per_second(&self) -> f64 {
        self.latencies.len() as f64 / self.elapsed.as_secs_f64()
    }

    fn percentile(&mut self, p: f64) -> Duration {
        self.latencies.sort_unstable();
        let last = self.latencies.len().saturating_sub(1);
        let i = ((last as f64) * p).round() as usize;
        Duration::from_nanos(self.latencies.get(i).copied().unwrap_or(0))
    }
}

async fn connect(socket: &Path) -> Client {
    for _ in 0..1200 {
        if let Ok(channel) = kms_plugin::client::connect(&socket.to_string_lossy()).await {
            let mut client = KeyManagementServiceClient::new(channel);
            if client.status(StatusRequest {}).await.is_ok() {
                return client;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("no server answered on {}", socket.display());
}

/// `concurrency` callers share one connection for `seconds`, each calling back to back.
async fn measure(server: &Server, op: Op, concurrency: usize, seconds: f64) -> Samples {
    let until = Instant::now() + Duration::from_secs_f64(seconds);
    let started = Instant::now();
    let calls = Arc::new(server.calls.clone());
    let tasks: Vec<_> = (0..concurrency)
        .map(|_| {
            let mut client = server.client.clone();
            let calls = calls.clone();
            tokio::spawn(async move {
                let mut latencies = Vec::with_capacity(1 << 16);
                while Instant::now() < until {
                    let t = Instant::now();
                    calls.call(&mut client, op).await;
                    latencies.push(t.elapsed().as_nanos() as u64);
                }
                latencies
            })
        })
        .collect();
    let mut samples = Samples::default();
    for task in tasks {
        samples.latencies.extend(task.await.expect("caller"));
    }
    samples.elapsed = started.elapsed();
    samples
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn spawn(mut command: Command, log: &Path) -> Child {
    let log = std::fs::File::create(log).expect("log file");
    command
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log file"))
        .stderr(log)
        .spawn()
        .expect("spawn server")
}

async fn start(dir: &Path) -> (Server, Server) {
    let plugin_socket = dir.join("plugin.sock");
    // E2E_PLUGIN: another build of the plugin (e.g. a copy from before a change).
    let binary = std::env::var_os("E2E_PLUGIN").map_or_else(
        || PathBuf::from(env!("CARGO_BIN_EXE_kms-plugin")),
        PathBuf::from,
    );
    let mut plugin = Command::new(binary);
    plugin.arg("serve").arg("--socket").arg(&plugin_socket);
    plugin.arg("--state-dir").arg(dir.join("state"));
    plugin.env_remove("KMS_PLUGIN_LOG"); // the default: one info line per Encrypt/Decrypt
    let plugin = spawn(plugin, &dir.join("plugin.log"));

    let baseline_socket = dir.join("baseline.sock");
    let mut baseline = Command::new(std::env::current_exe().expect("own path"));
    baseline.arg("--serve-baseline").arg(&baseline_socket);
    let baseline = spawn(baseline, &dir.join("baseline.log"));

    let mut plugin_client = connect(&plugin_socket).await;
    let mut baseline_client = connect(&baseline_socket).await;
    let plugin_calls = Calls::new(&mut plugin_client).await;
    let baseline_calls = Calls::new(&mut baseline_client).await;
    (
        Server {
            name: "plugin",
            child: plugin,
            client: plugin_client,
            calls: plugin_calls,
        },
        Server {
            name: "baseline",
            child: baseline,
            client: baseline_client,
            calls: baseline_calls,
        },
    )
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

async fn bench() {
    let rounds: usize = env_or("E2E_ROUNDS", 5);
    let seconds: f64 = env_or("E2E_SECONDS", 2.0);
    let concurrency: Vec<usize> = std::env::var("E2E_CONCURRENCY")
        .unwrap_or_else(|_| "1,16".into())
        .split(',')
        .filter_map(|c| c.trim().parse().ok())
        .collect();
    let dir = tempfile::tempdir().expect("tempdir");
    let (plugin, baseline) = start(dir.path()).await;
    println!(
        "e2e: {rounds} rounds x {seconds} s per (server, op, concurrency); plugin log: {}",
        dir.path().join("plugin.log").display()
    );
    let ops = [Op::Encrypt, Op::Decrypt];
    // Warm-up: connections, allocator, caches.
    for op in ops {
        for server in [&plugin, &baseline] {
            measure(server, op, 4, 0.5).await;
        }
    }
    let rss_start = plugin.child.id();
    let rss_start = rss_kib(rss_start);
    let mut results: Vec<((Op, usize), [Samples; 2])> = Vec::new();
    for &op in &ops {
        for &c in &concurrency {
            results.push(((op, c), Default::default()));
        }
    }
    for round in 0..rounds {
        for ((op, c), samples) in &mut results {
            // Alternate which server goes first, so drifts in machine load hit both.
            let order: [usize; 2] = if round % 2 == 0 { [0, 1] } else { [1, 0] };
            for i in order {
                let server = if i == 0 { &plugin } else { &baseline };
                let s = measure(server, *op, *c, seconds).await;
                samples[i].latencies.extend(s.latencies);
                samples[i].elapsed += s.elapsed;
            }
        }
        eprintln!("round {} of {rounds} done", round + 1);
    }
    println!(
        "{:<8} {:>4} {:<9} {:>10} {:>9} {:>9}",
        "op", "conc", "server", "ops/s", "p50 ms", "p99 ms"
    );
    let mut ratios = Vec::new();
    for ((op, c), samples) in &mut results {
        let mut row = Vec::new();
        for (i, s) in samples.iter_mut().enumerate() {
            let name = if i == 0 { plugin.name } else { baseline.name };
            let (ops, p50, p99) = (s.ops_per_second(), s.percentile(0.5), s.percentile(0.99));
            println!(
                "{:<8} {:>4} {:<9} {:>10.0} {:>9.3} {:>9.3}",
                op.name(),
                c,
                name,
                ops,
                ms(p50),
                ms(p99)
            );
            row.push((ops, p50, p99));
        }
        ratios.push((
            *op,
            *c,
            row[0].0 / row[1].0,
            ms(row[0].1) / ms(row[1].1),
            ms(row[0].2) / ms(row[1].2),
        ));
    }
    println!("\nplugin / baseline (target: ops/s >= 0.95, p50 <= 1.05)");
    println!(
        "{:<8} {:>4} {:>8} {:>8} {:>8}",
        "op", "conc", "ops/s", "p50", "p99"
    );
    for (op, c, ops, p50, p99) in ratios {
        println!(
            "{:<8} {:>4} {:>8.3} {:>8.3} {:>8.3}",
            op.name(),
            c,
            ops,
            p50,
            p99
        );
    }
    let rss_end = rss_kib(plugin.child.id());
    println!(
        "\nplugin RSS: {} KiB after warm-up, {} KiB at the end",
        rss_start.map_or("?".into(), |v| v.to_string()),
        rss_end.map_or("?".into(), |v| v.to_string())
    );
}

/// `N` sequential calls of `op` on `socket` (one Encrypt first, to have a Decrypt request).
async fn calls(socket: &Path, op: Op, n: usize) {
    let mut client = connect(socket).await;
    let calls = Calls::new(&mut client).await;
    for _ in 0..n {
        calls.call(&mut client, op).await;
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--serve-baseline") {
        let socket = PathBuf::from(args.get(i + 1).expect("--serve-baseline SOCKET"));
        if let Err(e) = baseline::serve(&socket) {
            eprintln!("baseline: {e}");
            std::process::exit(1);
        }
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    if let Some(i) = args.iter().position(|a| a == "--calls") {
        let socket = PathBuf::from(args.get(i + 1).expect("--calls SOCKET OP N"));
        let op = match args.get(i + 2).map(String::as_str) {
            Some("decrypt") => Op::Decrypt,
            _ => Op::Encrypt,
        };
        let n = args.get(i + 3).and_then(|n| n.parse().ok()).unwrap_or(1000);
        rt.block_on(calls(&socket, op, n));
        return;
    }
    // `cargo test --benches` runs bench targets with no `--bench`: do nothing then.
    if !args.iter().any(|a| a == "--bench") {
        return;
    }
    rt.block_on(bench());
}

//! End-to-end throughput and latency: the release plugin (embedded default config: file
//! root, per-call audit log at info, written to a file) against an empty tonic KMS v2 handler
//! (`baseline.rs`) and, when Go is installed, the `go-kms` peer (`go/peer`: the upstream
//! k8s.io/kms Go service framework with in-memory AES-GCM), each in its own process on a Unix
//! socket. The client is grpc-go dialing as kube-apiserver does (`go/client`, built into
//! target/e2e/go when `go` is on PATH) or tonic (`E2E_CLIENT=tonic`), one HTTP/2 connection
//! per server. Every instance starts all servers and clients afresh, and rounds within it
//! interleave the servers, rotating which goes first; a second copy of the baseline
//! (`baseline-2`, an A/A control) shows how far noise alone moves a ratio. The bench prints
//! ops/s, p50 and p99 per op, concurrency and server (summed over instances and rounds), the
//! ratios to the baseline, and writes a Markdown table and an SVG chart (`report.rs`).
//!
//! Run: `cargo bench --bench e2e`. Env: `E2E_INSTANCES` (default 4), `E2E_ROUNDS` per
//! instance (default 2), `E2E_SECONDS` per measurement (default 1.5), `E2E_CONCURRENCY`
//! (default `1,4,16,64`), `E2E_CLIENT` (`go` or `tonic`), `E2E_PEERS` (`go-kms` or `none`),
//! `E2E_CONTROL` (`0` leaves out `baseline-2`), `E2E_CHART` (where the SVG goes, the table
//! next to it; default target/e2e/e2e.svg), `E2E_PLUGIN` another plugin binary (e.g. a copy
//! from before a change). `E2E_LONG_CALLS=N` instead runs the memory check of `long.rs`.
//!
//! Two helper modes of the same binary: `--serve-baseline SOCKET` runs the baseline
//! server, `--calls SOCKET encrypt|decrypt N` makes N sequential calls (for callgrind).
#![allow(missing_docs)]

mod baseline;
mod go;
mod long;
mod report;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kms_plugin::proto::v2::key_management_service_client::KeyManagementServiceClient;
use kms_plugin::proto::v2::{DecryptRequest, EncryptRequest, StatusRequest};
use tokio::runtime::Runtime;
use tonic::transport::Channel;

type Client = KeyManagementServiceClient<Channel>;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Op {
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

/// How the bench talks to a server: a grpc-go client process (the default when `go` is on
/// PATH) or a tonic client in this process; either way one connection per server.
enum Driver {
    Go(go::Client),
    Tonic(Box<(Client, Calls)>),
}

struct Server {
    name: &'static str,
    child: Child,
    driver: Driver,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    fn measure(&mut self, rt: &Runtime, op: Op, concurrency: usize, seconds: f64) -> Samples {
        match &mut self.driver {
            Driver::Go(client) => client.measure(op, concurrency, seconds),
            Driver::Tonic(tonic) => {
                let (client, calls) = &**tonic;
                rt.block_on(measure(client, calls, op, concurrency, seconds))
            }
        }
    }
}

/// Latencies (ns) and elapsed time of one (server, op, concurrency) across rounds, and its
/// calls/s in each instance.
#[derive(Default)]
pub struct Samples {
    latencies: Vec<u64>,
    elapsed: Duration,
    per_instance: Vec<f64>,
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
async fn measure(
    client: &Client,
    calls: &Calls,
    op: Op,
    concurrency: usize,
    seconds: f64,
) -> Samples {
    let until = Instant::now() + Duration::from_secs_f64(seconds);
    let started = Instant::now();
    let calls = Arc::new(calls.clone());
    let tasks: Vec<_> = (0..concurrency)
        .map(|_| {
            let mut client = client.clone();
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
    status_kib(pid, "VmRSS:")
}

fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
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

/// Which client, which peers, from E2E_CLIENT and E2E_PEERS (Go by default when it exists).
struct Setup {
    go: Option<go::Programs>,
    go_client: bool,
    peer: bool,
}

impl Setup {
    fn from_env() -> Self {
        let have_go = go::available();
        let client = std::env::var("E2E_CLIENT").unwrap_or_default();
        let go_client = match client.as_str() {
            "" => have_go,
            "go" => true,
            "tonic" => false,
            other => panic!("E2E_CLIENT={other}: use go or tonic"),
        };
        let peers = std::env::var("E2E_PEERS")
            .unwrap_or_else(|_| if have_go { "go-kms" } else { "none" }.into());
        let peer = match peers.as_str() {
            "go-kms" => true,
            "" | "none" => false,
            other => panic!("E2E_PEERS={other}: use go-kms or none"),
        };
        assert!(
            have_go || !(go_client || peer),
            "E2E_CLIENT=go and E2E_PEERS=go-kms need `go` on PATH (apt-get install golang-go)"
        );
        let go = (go_client || peer).then(|| go::build(&target_dir().join("e2e/go")));
        Self {
            go,
            go_client,
            peer,
        }
    }

    fn client_name(&self) -> &'static str {
        if self.go_client {
            "grpc-go v1.82.1 (as kube-apiserver v1.37), one connection per server"
        } else {
            "tonic, one connection per server"
        }
    }

    /// Spawns `command` serving on `socket` and connects this run's client to it.
    fn server(&self, rt: &Runtime, name: &'static str, command: Command, socket: &Path) -> Server {
        let log = socket.with_extension("log");
        let child = spawn(command, &log);
        let driver = match &self.go {
            Some(go) if self.go_client => Driver::Go(go::Client::start(&go.client, socket)),
            _ => rt.block_on(async {
                let mut client = connect(socket).await;
                let calls = Calls::new(&mut client).await;
                Driver::Tonic(Box::new((client, calls)))
            }),
        };
        Server {
            name,
            child,
            driver,
        }
    }
}

/// `target/`, from the directory cargo gives benches for scratch files (`target/tmp`).
fn target_dir() -> PathBuf {
    let tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
    tmp.parent().unwrap_or(tmp).to_path_buf()
}

fn plugin_command(dir: &Path, socket: &Path) -> Command {
    // E2E_PLUGIN: another build of the plugin (e.g. a copy from before a change).
    let binary = std::env::var_os("E2E_PLUGIN").map_or_else(
        || PathBuf::from(env!("CARGO_BIN_EXE_kms-plugin")),
        PathBuf::from,
    );
    let mut plugin = Command::new(binary);
    plugin.arg("serve").arg("--socket").arg(socket);
    plugin.arg("--state-dir").arg(dir.join("state"));
    plugin.env_remove("KMS_PLUGIN_LOG"); // the default: one info line per Encrypt/Decrypt
    plugin
}

fn start(rt: &Runtime, setup: &Setup, dir: &Path, control: bool) -> Vec<Server> {
    let socket = dir.join("plugin.sock");
    let plugin = setup.server(rt, "plugin", plugin_command(dir, &socket), &socket);

    let baseline = |name: &'static str| {
        let socket = dir.join(format!("{name}.sock"));
        let mut command = Command::new(std::env::current_exe().expect("own path"));
        command.arg("--serve-baseline").arg(&socket);
        setup.server(rt, name, command, &socket)
    };
    let mut servers = vec![plugin, baseline("baseline")];
    if let (Some(go), true) = (&setup.go, setup.peer) {
        let socket = dir.join("go-kms.sock");
        let mut peer = Command::new(&go.peer);
        peer.arg("-socket").arg(&socket);
        servers.push(setup.server(rt, "go-kms", peer, &socket));
    }
    if control {
        // The same baseline again: its ratio to the first is what this machine's noise
        // alone does to a ratio.
        servers.push(baseline("baseline-2"));
    }
    servers
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// The E2E_* settings in effect, as a command line to paste.
fn command_line(settings: &[(&str, String)]) -> String {
    let mut line: Vec<String> = settings.iter().map(|(k, v)| format!("{k}={v}")).collect();
    line.push("cargo bench --bench e2e".into());
    line.join(" ")
}

fn bench(rt: &Runtime) {
    if let Some(calls) = std::env::var("E2E_LONG_CALLS")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        return long::run(calls);
    }
    let instances: usize = env_or("E2E_INSTANCES", 4).max(1);
    let rounds: usize = env_or("E2E_ROUNDS", 2).max(1);
    let seconds: f64 = env_or("E2E_SECONDS", 1.5);
    let control = env_or("E2E_CONTROL", 1u8) != 0;
    let concurrency_list = std::env::var("E2E_CONCURRENCY").unwrap_or_else(|_| "1,4,16,64".into());
    let concurrency: Vec<usize> = concurrency_list
        .split(',')
        .filter_map(|c| c.trim().parse().ok())
        .collect();
    let load_before = report::load_average();
    let setup = Setup::from_env();
    let command = command_line(&[
        ("E2E_INSTANCES", instances.to_string()),
        ("E2E_ROUNDS", rounds.to_string()),
        ("E2E_SECONDS", seconds.to_string()),
        ("E2E_CONCURRENCY", concurrency_list.clone()),
        (
            "E2E_CLIENT",
            if setup.go_client { "go" } else { "tonic" }.into(),
        ),
        (
            "E2E_PEERS",
            if setup.peer { "go-kms" } else { "none" }.into(),
        ),
        ("E2E_CONTROL", u8::from(control).to_string()),
    ]);
    println!(
        "e2e: {instances} instances x {rounds} rounds x {seconds} s per (server, op, \
         concurrency); client: {}",
        setup.client_name()
    );
    let ops = [Op::Encrypt, Op::Decrypt];
    let mut names: Vec<&'static str> = Vec::new();
    let mut results: Vec<((Op, usize), Vec<Samples>)> = Vec::new();
    let mut rss = (None, None);
    // Each instance starts every server and client afresh: how a process happens to land
    // (threads on cores, memory layout) moved one instance's ratio by up to ±10 % in A/A
    // runs of two identical baselines, far more than rounds within one instance vary.
    for instance in 0..instances {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut servers = start(rt, &setup, dir.path(), control);
        if names.is_empty() {
            names = servers.iter().map(|s| s.name).collect();
            for &op in &ops {
                for &c in &concurrency {
                    results.push(((op, c), names.iter().map(|_| Samples::default()).collect()));
                }
            }
        }
        let n = servers.len();
        // Warm-up: connections, allocator, caches.
        for op in ops {
            for server in &mut servers {
                server.measure(rt, op, 4, 0.5);
            }
        }
        let plugin = servers[0].child.id();
        if instance + 1 == instances {
            rss.0 = rss_kib(plugin);
        }
        let marks: Vec<Vec<(usize, Duration)>> = results
            .iter()
            .map(|(_, samples)| {
                samples
                    .iter()
                    .map(|s| (s.latencies.len(), s.elapsed))
                    .collect()
            })
            .collect();
        for round in 0..rounds {
            for ((op, c), samples) in &mut results {
                // Rotate which server goes first, so drifts in machine load hit all of them.
                for k in 0..n {
                    let i = (k + round + instance) % n;
                    let s = servers[i].measure(rt, *op, *c, seconds);
                    samples[i].latencies.extend(s.latencies);
                    samples[i].elapsed += s.elapsed;
                }
            }
        }
        for ((_, samples), marks) in results.iter_mut().zip(&marks) {
            for (s, (calls, elapsed)) in samples.iter_mut().zip(marks) {
                let seconds = s.elapsed.saturating_sub(*elapsed).as_secs_f64();
                let calls = s.latencies.len().saturating_sub(*calls) as f64;
                s.per_instance.push(calls / seconds);
            }
        }
        if instance + 1 == instances {
            rss.1 = rss_kib(plugin);
        }
        eprintln!("instance {} of {instances} done", instance + 1);
    }
    let mut rows = Vec::new();
    for ((op, c), samples) in &mut results {
        for (name, s) in names.iter().zip(samples.iter_mut()) {
            rows.push(report::Row {
                op: op.name(),
                callers: *c,
                server: (*name).into(),
                ops: s.ops_per_second(),
                p50_ms: ms(s.percentile(0.5)),
                p99_ms: ms(s.percentile(0.99)),
                per_instance: std::mem::take(&mut s.per_instance),
            });
        }
    }
    print_rows(&rows);
    let run = report::Run {
        rows,
        servers: names.iter().map(ToString::to_string).collect(),
        command,
        client: setup.client_name().into(),
        load_before,
        load_after: report::load_average(),
        rss_kib: rss,
    };
    println!(
        "\nplugin RSS (last instance): {} KiB after warm-up, {} KiB at the end",
        rss.0.map_or("?".into(), |v| v.to_string()),
        rss.1.map_or("?".into(), |v| v.to_string())
    );
    write_report(&run);
}

fn print_rows(rows: &[report::Row]) {
    println!(
        "{:<8} {:>4} {:<9} {:>10} {:>9} {:>9} {:>8} {:>8} {:>11}",
        "op", "conc", "server", "ops/s", "p50 ms", "p99 ms", "ops/base", "p50/base", "instances"
    );
    for r in rows {
        let base = rows
            .iter()
            .find(|b| b.op == r.op && b.callers == r.callers && b.server == "baseline");
        let (ops, p50) = base.map_or((f64::NAN, f64::NAN), |b| {
            (r.ops / b.ops, r.p50_ms / b.p50_ms)
        });
        // Lowest and highest ops/base of one instance: how far a single instance strays.
        let (low, high) = base.map_or((f64::NAN, f64::NAN), |b| {
            r.per_instance
                .iter()
                .zip(&b.per_instance)
                .map(|(r, b)| r / b)
                .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), x| {
                    (lo.min(x), hi.max(x))
                })
        });
        println!(
            "{:<8} {:>4} {:<9} {:>10.0} {:>9.3} {:>9.3} {:>8.3} {:>8.3} {:>5.2}-{:<5.2}",
            r.op, r.callers, r.server, r.ops, r.p50_ms, r.p99_ms, ops, p50, low, high
        );
    }
    println!(
        "(target for the plugin: ops/base >= 0.95, p50/base <= 1.05; baseline-2, the same \
         baseline again, shows how far noise alone moves a ratio; instances: the lowest and \
         highest ops/base of a single instance)"
    );
}

/// The chart to E2E_CHART (default target/e2e/e2e.svg), the table next to it (.md).
fn write_report(run: &report::Run) {
    let svg = std::env::var_os("E2E_CHART")
        .map_or_else(|| target_dir().join("e2e/e2e.svg"), PathBuf::from);
    if let Some(parent) = svg.parent().filter(|p| !p.as_os_str().is_empty())
        && let Err(e) = std::fs::create_dir_all(parent)
    {
        eprintln!("cannot create {}: {e}", parent.display());
        return;
    }
    let md = svg.with_extension("md");
    match std::fs::write(&md, report::markdown(run)) {
        Ok(()) => println!("table: {}", md.display()),
        Err(e) => eprintln!("cannot write {}: {e}", md.display()),
    }
    match report::chart(run, &svg) {
        Ok(()) => println!("chart: {}", svg.display()),
        Err(e) => eprintln!("cannot draw {}: {e}", svg.display()),
    }
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
    bench(&rt);
}

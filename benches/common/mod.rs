//! What the end-to-end root benchmarks (`cold`, `cache_scale`, `rotation`) share: the real
//! release plugin as a child process, timed start-up, latency summaries, RSS, and which
//! external root servers are installed (a missing one is skipped with a message, never
//! silently).
#![allow(dead_code)] // each bench target uses part of it

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kms_plugin::proto::v2::StatusRequest;
use kms_plugin::proto::v2::key_management_service_client::KeyManagementServiceClient;
use tonic::transport::Channel;

pub type Client = KeyManagementServiceClient<Channel>;

/// `cargo test --benches` runs bench targets without `--bench`: they must do nothing then.
pub fn invoked_as_bench() -> bool {
    std::env::args().any(|a| a == "--bench")
}

/// Runs `bench` on a multi-threaded runtime when invoked by `cargo bench`; nothing otherwise.
pub fn run_bench<F: std::future::Future>(bench: impl FnOnce() -> F) {
    if !invoked_as_bench() {
        return;
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(bench());
}

pub fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The root kinds a bench may run; `only` is a comma-separated list (env) or empty for all.
pub fn selected(name: &str, only: &str) -> bool {
    only.is_empty() || only.split(',').any(|s| s.trim() == name)
}

/// Whether `program` is on PATH.
pub fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
}

/// Why a root's external dependency is missing (`None` when everything is installed).
pub fn missing(root: &str) -> Option<String> {
    let need: &[&str] = match root {
        "pkcs11" | "pkcs11_rsa_oaep" => &["softhsm2-util", "pkcs11-tool"],
        "aws" => &["moto_server"],
        "vault" => &["bao"],
        "tpm" => &[
            "swtpm",
            "tpm2_getcap",
            "pkcs11-tool",
            "tpm2-abrmd",
            "tpm2_ptool",
            "dbus-daemon",
        ],
        _ => &[],
    };
    let absent: Vec<&str> = need.iter().copied().filter(|p| !on_path(p)).collect();
    if !absent.is_empty() {
        return Some(format!("{} not installed", absent.join(", ")));
    }
    let modules: &[&str] = match root {
        "pkcs11" | "pkcs11_rsa_oaep" => &[
            "/usr/lib/softhsm/libsofthsm2.so",
            "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
            "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
            "/usr/local/lib/softhsm/libsofthsm2.so",
        ],
        "tpm" => &[crate::support::swtpm::MODULE],
        _ => return None,
    };
    let found = std::env::var_os("SOFTHSM2_MODULE").is_some() && root != "tpm"
        || modules.iter().any(|m| Path::new(m).exists());
    (!found).then(|| format!("{} not found", modules.join(" or ")))
}

/// Median, p90 and count of a set of durations.
pub fn summary(samples: &[Duration]) -> String {
    if samples.is_empty() {
        return "no samples".into();
    }
    format!(
        "median {} p90 {} (n={})",
        show(percentile(samples, 0.5)),
        show(percentile(samples, 0.9)),
        samples.len()
    )
}

pub fn percentile(samples: &[Duration], p: f64) -> Duration {
    let mut sorted = samples.to_vec();
    sorted.sort_unstable();
    let last = sorted.len().saturating_sub(1);
    sorted
        .get(((last as f64) * p).round() as usize)
        .copied()
        .unwrap_or_default()
}

/// A duration in the unit that reads best (µs below 10 ms, with decimals below 10 µs).
pub fn show(d: Duration) -> String {
    if d < Duration::from_micros(10) {
        format!("{:.2} µs", d.as_secs_f64() * 1e6)
    } else if d < Duration::from_millis(10) {
        format!("{:.0} µs", d.as_secs_f64() * 1e6)
    } else {
        format!("{:.1} ms", d.as_secs_f64() * 1e3)
    }
}

pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// The release plugin (`cargo bench` builds it), `serve --config FILE`, logging as shipped
/// (info: one audit line per Encrypt/Decrypt) to `<dir>/plugin-N.log`.
pub struct Served {
    child: Child,
    pub socket: String,
    pub client: Client,
    /// From spawn to the first Status that answers "ok".
    pub ready_after: Duration,
}

impl Served {
    pub async fn start(
        config: &Path,
        socket: &str,
        env: &[(String, String)],
        dir: &Path,
        run: u32,
    ) -> Self {
        let log_path = dir.join(format!("plugin-{run}.log"));
        let log = std::fs::File::create(&log_path).expect("log file");
        let started = Instant::now();
        let mut child = Command::new(env!("CARGO_BIN_EXE_kms-plugin"))
            .arg("serve")
            .arg("--config")
            .arg(config)
            .envs(env.iter().cloned())
            .env_remove("KMS_PLUGIN_LOG")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log file"))
            .stderr(log)
            .spawn()
            .expect("spawn kms-plugin");
        let deadline = started + Duration::from_secs(60);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "kms-plugin exited ({status}) before it was ready:\n{}",
                    std::fs::read_to_string(&log_path).unwrap_or_default()
                );
            }
            if let Ok(channel) = kms_plugin::client::connect(socket).await {
                let mut client = kms_plugin::client::kms(channel);
                if let Ok(status) = client.status(StatusRequest {}).await
                    && status.get_ref().healthz == "ok"
                {
                    return Self {
                        ready_after: started.elapsed(),
                        child,
                        socket: socket.to_string(),
                        client,
                    };
                }
            }
            assert!(
                Instant::now() < deadline,
                "kms-plugin not ready after 60 s:\n{}",
                std::fs::read_to_string(&log_path).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn rss_kib(&self) -> u64 {
        rss_kib(self.pid()).unwrap_or(0)
    }

    /// SIGTERM (a graceful stop, as systemd does) and wait for the exit.
    pub fn stop(mut self) {
        // SAFETY: kill(2) on our own child's pid has no memory-safety preconditions.
        #[allow(unsafe_code)]
        let rc = unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        assert_eq!(rc, 0, "kill failed");
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.child.try_wait().ok().flatten().is_none() {
            assert!(Instant::now() < deadline, "kms-plugin did not stop in 20 s");
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A fresh directory for one root's run, under cargo's target tmp dir (kept off /tmp's
/// tmpfs size limits, and SoftHSM's token directories live there too).
pub fn workdir(prefix: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .expect("tempdir")
}

pub fn path_str(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

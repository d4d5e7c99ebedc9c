//! Prometheus metrics: calls and latency per RPC, root key calls and health, the local KEK
//! and the cache. Counters are plain atomics updated on the request path; everything else
//! is read from the keyring when scraped. Served by `server::metrics_http` when
//! `metrics_listen` is set.

use std::fmt::Write;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tracing_appender::non_blocking::ErrorCounter;

use crate::keyring::Keyring;

/// The RPCs measured.
#[derive(Debug, Clone, Copy)]
pub enum Op {
    /// Status.
    Status = 0,
    /// Encrypt.
    Encrypt = 1,
    /// Decrypt.
    Decrypt = 2,
}

const OPS: [&str; 3] = ["status", "encrypt", "decrypt"];
/// Histogram bucket upper bounds, in seconds: Encrypt/Decrypt are µs-scale when cached and
/// bounded by the 3 s apiserver deadline when a root is slow.
const BUCKETS: [f64; 14] = [
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 2.5,
];

#[derive(Default)]
struct Histogram {
    buckets: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl Histogram {
    /// Observations at or below each bound (Prometheus buckets are cumulative).
    fn cumulative(&self) -> [u64; BUCKETS.len()] {
        let mut sum = 0;
        self.buckets.each_ref().map(|bucket| {
            sum += bucket.load(Ordering::Relaxed);
            sum
        })
    }
}

/// The log writer's count of lines it dropped (its buffer was full).
static LOG_DROPS: OnceLock<ErrorCounter> = OnceLock::new();

/// Registers the log writer's drop counter (once, when logging is set up).
pub fn count_dropped_log_lines(counter: ErrorCounter) {
    let _ = LOG_DROPS.set(counter);
}

/// Log lines dropped so far because the log's reader did not keep up.
pub fn log_lines_dropped() -> u64 {
    LOG_DROPS.get().map_or(0, |c| c.dropped_lines() as u64)
}

/// The request counters. One per process, shared by the services.
#[derive(Default)]
pub struct Metrics {
    ok: [AtomicU64; 3],
    errors: [AtomicU64; 3],
    latency: [Histogram; 3],
}

impl Metrics {
    /// Records one call.
    pub fn observe(&self, op: Op, ok: bool, elapsed: Duration) {
        let i = op as usize;
        let counter = if ok { &self.ok[i] } else { &self.errors[i] };
        counter.fetch_add(1, Ordering::Relaxed);
        let h = &self.latency[i];
        // One atomic add in the narrowest bucket; `render` sums them into Prometheus's
        // cumulative form (adding to every wider bucket here cost up to 14 atomics a call).
        let seconds = elapsed.as_secs_f64();
        if let Some(bucket) = BUCKETS
            .iter()
            .position(|bound| seconds <= *bound)
            .and_then(|i| h.buckets.get(i))
        {
            bucket.fetch_add(1, Ordering::Relaxed);
        }
        h.count.fetch_add(1, Ordering::Relaxed);
        h.sum_micros
            .fetch_add(elapsed.as_micros() as u64, Ordering::Relaxed);
    }

    /// The Prometheus text exposition of these counters and of `keyring`'s state.
    pub fn render(&self, keyring: &Keyring) -> String {
        let mut out = String::with_capacity(4096);
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        out.push_str("# HELP kms_plugin_requests_total KMS v2 calls served, by outcome.\n");
        out.push_str("# TYPE kms_plugin_requests_total counter\n");
        for (i, op) in OPS.iter().enumerate() {
            let _ = writeln!(
                out,
                "kms_plugin_requests_total{{op=\"{op}\",outcome=\"ok\"}} {}",
                load(&self.ok[i])
            );
            let _ = writeln!(
                out,
                "kms_plugin_requests_total{{op=\"{op}\",outcome=\"error\"}} {}",
                load(&self.errors[i])
            );
        }
        out.push_str("# HELP kms_plugin_request_duration_seconds Time to serve a KMS v2 call.\n");
        out.push_str("# TYPE kms_plugin_request_duration_seconds histogram\n");
        for (i, op) in OPS.iter().enumerate() {
            let h = &self.latency[i];
            for (bound, below) in BUCKETS.iter().zip(h.cumulative()) {
                let _ = writeln!(
                    out,
                    "kms_plugin_request_duration_seconds_bucket{{op=\"{op}\",le=\"{bound}\"}} {below}"
                );
            }
            let count = load(&h.count);
            let _ = writeln!(
                out,
                "kms_plugin_request_duration_seconds_bucket{{op=\"{op}\",le=\"+Inf\"}} {count}"
            );
            let _ = writeln!(
                out,
                "kms_plugin_request_duration_seconds_sum{{op=\"{op}\"}} {}",
                load(&h.sum_micros) as f64 / 1e6
            );
            let _ = writeln!(
                out,
                "kms_plugin_request_duration_seconds_count{{op=\"{op}\"}} {count}"
            );
        }

        let health = keyring.health();
        out.push_str("# HELP kms_plugin_healthy 1 when Status reports healthz \"ok\".\n");
        out.push_str("# TYPE kms_plugin_healthy gauge\n");
        let _ = writeln!(
            out,
            "kms_plugin_healthy{{key_id=\"{}\"}} {}",
            keyring.key_id(),
            u8::from(health.is_ready())
        );

        let (roots, local) = keyring.info();
        let families: [(&str, &str, &str); 7] = [
            (
                "kms_plugin_root_calls_total",
                "counter",
                "Calls to a root key, by kind (wrap, unwrap).",
            ),
            (
                "kms_plugin_root_failures_total",
                "counter",
                "Root key calls that failed.",
            ),
            (
                "kms_plugin_root_unwraps_throttled_total",
                "counter",
                "Decrypt unwraps refused without a root call: the root's unwrap budget was spent.",
            ),
            (
                "kms_plugin_root_state",
                "gauge",
                "1 for the root's current state (ok, degraded, rejected; unavailable: could not be opened).",
            ),
            (
                "kms_plugin_decrypts_total",
                "counter",
                "Decrypt calls served under a root's key_id since start.",
            ),
            (
                "kms_plugin_last_decrypt_timestamp_seconds",
                "gauge",
                "When a Decrypt last used a root's key_id (0: never since start).",
            ),
            (
                "kms_plugin_root_info",
                "gauge",
                "Configured root keys and their roles.",
            ),
        ];
        for (name, kind, help) in families {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for r in &roots {
                let labels = format!("root=\"{}\",key_id=\"{}\"", r.name, r.key_id);
                match name {
                    "kms_plugin_root_calls_total" => {
                        let _ = writeln!(out, "{name}{{{labels},kind=\"wrap\"}} {}", r.wrap_calls);
                        let _ =
                            writeln!(out, "{name}{{{labels},kind=\"unwrap\"}} {}", r.unwrap_calls);
                    }
                    "kms_plugin_root_failures_total" => {
                        let _ = writeln!(out, "{name}{{{labels}}} {}", r.failed_calls);
                    }
                    "kms_plugin_root_unwraps_throttled_total" => {
                        let _ = writeln!(out, "{name}{{{labels}}} {}", r.throttled_unwraps);
                    }
                    "kms_plugin_root_state" => {
                        for state in ["ok", "degraded", "rejected", "unavailable"] {
                            let _ = writeln!(
                                out,
                                "{name}{{{labels},state=\"{state}\"}} {}",
                                u8::from(r.state == state)
                            );
                        }
                    }
                    "kms_plugin_decrypts_total" => {
                        let _ = writeln!(out, "{name}{{{labels}}} {}", r.decrypts);
                    }
                    "kms_plugin_last_decrypt_timestamp_seconds" => {
                        let _ = writeln!(out, "{name}{{{labels}}} {}", r.last_decrypt_unix);
                    }
                    _ => {
                        let _ = writeln!(
                            out,
                            "{name}{{{labels},provider=\"{}\",role=\"{}\"}} 1",
                            r.provider, r.role
                        );
                    }
                }
            }
        }
        let gauges = [
            (
                "kms_plugin_local_kek_encryptions",
                "Encryptions under the current local KEK.",
                local.encryptions,
            ),
            (
                "kms_plugin_local_kek_max_encryptions",
                "Encryptions allowed under one local KEK.",
                local.max_encryptions,
            ),
            (
                "kms_plugin_local_kek_age_seconds",
                "Age of the current local KEK.",
                local.age_seconds,
            ),
            (
                "kms_plugin_local_kek_max_age_seconds",
                "Age at which a local KEK stops sealing.",
                local.max_age_seconds,
            ),
            (
                "kms_plugin_cache_entries",
                "Unwrapped local KEKs in memory.",
                keyring.cache().len() as u64,
            ),
            (
                "kms_plugin_cache_failed_entries",
                "Wrapped keys remembered as not authenticating (refused without a root call).",
                keyring.cache().failed_len() as u64,
            ),
        ];
        for (name, help, value) in gauges {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}"
            );
        }
        let _ = writeln!(
            out,
            "# HELP kms_plugin_log_lines_dropped_total Log lines dropped because the log's reader \
             (journald, a pipe) did not keep up.\n# TYPE kms_plugin_log_lines_dropped_total \
             counter\nkms_plugin_log_lines_dropped_total {}",
            log_lines_dropped()
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let m = Metrics::default();
        m.observe(Op::Encrypt, true, Duration::from_micros(80));
        m.observe(Op::Encrypt, false, Duration::from_millis(3));
        let h = &m.latency[Op::Encrypt as usize];
        let cumulative = h.cumulative();
        let at = |bound: f64| {
            let i = BUCKETS.iter().position(|b| *b == bound).expect("bucket");
            cumulative[i]
        };
        assert_eq!(at(0.00005), 0);
        assert_eq!(at(0.0001), 1);
        assert_eq!(at(0.0025), 1);
        assert_eq!(at(0.005), 2);
        assert_eq!(at(2.5), 2);
        assert_eq!(h.count.load(Ordering::Relaxed), 2);
        assert_eq!(m.ok[1].load(Ordering::Relaxed), 1);
        assert_eq!(m.errors[1].load(Ordering::Relaxed), 1);
    }
}

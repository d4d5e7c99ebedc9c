//! Prometheus metrics on the `prometheus-client` crate (OpenMetrics text): calls and latency
//! per RPC, root key calls (latency and errors by kind, per root), root health, the local
//! KEK, the cache, connections refused at accept, the log and the build. Counters and
//! histograms are updated on the request path (atomics); everything else is read from the
//! keyring when scraped. Served
//! by `server::metrics_http` when `metrics_listen` is set. Every metric is listed in
//! README.md ("Metrics and health probes").

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, OnceLock};
use std::time::Duration;

use prometheus_client::encoding::{EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::{Registry, Unit};

use crate::keyring::Keyring;

/// The content type of [`Metrics::render`]'s text.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The RPCs measured.
#[derive(Debug, Clone, Copy)]
pub enum Op {
    /// Status.
    Status,
    /// Encrypt.
    Encrypt,
    /// Decrypt.
    Decrypt,
}

impl Op {
    fn label(self) -> &'static str {
        match self {
            Op::Status => "status",
            Op::Encrypt => "encrypt",
            Op::Decrypt => "decrypt",
        }
    }
}

/// A call to a root key.
#[derive(Debug, Clone, Copy)]
pub enum RootOp {
    /// Wrap a local KEK.
    Wrap,
    /// Unwrap a local KEK.
    Unwrap,
}

impl RootOp {
    fn label(self) -> &'static str {
        match self {
            RootOp::Wrap => "wrap",
            RootOp::Unwrap => "unwrap",
        }
    }
}

/// Why a connection to the KMS socket was closed at accept, before any byte was read.
#[derive(Debug, Clone, Copy)]
pub enum Refusal {
    /// The peer's uid is not in `allowed_uids`.
    PeerUid,
    /// The kernel did not report the peer's credentials.
    NoCredentials,
    /// `max_connections` connections were open.
    MaxConnections,
}

impl Refusal {
    const ALL: [Refusal; 3] = [
        Refusal::PeerUid,
        Refusal::NoCredentials,
        Refusal::MaxConnections,
    ];

    fn label(self) -> &'static str {
        match self {
            Refusal::PeerUid => "peer_uid",
            Refusal::NoCredentials => "no_credentials",
            Refusal::MaxConnections => "max_connections",
        }
    }
}

/// RPC latency buckets, in seconds: Encrypt/Decrypt are µs-scale when cached and bounded by
/// the 3 s apiserver deadline when a root is slow.
const CALL_BUCKETS: [f64; 14] = [
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 2.5,
];
/// Root call latency buckets, in seconds: a file root takes µs, an HSM ms, a cloud KMS
/// tens of ms, and a struggling one up to its timeout.
const ROOT_BUCKETS: [f64; 14] = [
    0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

/// A label value, escaped as the exposition format requires (`\`, `"`, newline): root
/// names come from the config file. (`prometheus-client` writes label values verbatim.)
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Escaped(String);

impl From<&str> for Escaped {
    fn from(value: &str) -> Self {
        Self(value.to_string())
    }
}

impl EncodeLabelValue for Escaped {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        use std::fmt::Write;
        for c in self.0.chars() {
            match c {
                '\\' => encoder.write_str("\\\\")?,
                '"' => encoder.write_str("\\\"")?,
                '\n' => encoder.write_str("\\n")?,
                c => encoder.write_char(c)?,
            }
        }
        Ok(())
    }
}

/// A metric's labels, in order.
type Labels = Vec<(&'static str, Escaped)>;

fn labels<const N: usize>(pairs: [(&'static str, &str); N]) -> Labels {
    pairs
        .into_iter()
        .map(|(k, v)| (k, Escaped::from(v)))
        .collect()
}

fn call_histogram() -> Histogram {
    Histogram::new(CALL_BUCKETS)
}

fn root_histogram() -> Histogram {
    Histogram::new(ROOT_BUCKETS)
}

/// Process-wide series recorded below the plugin (root calls, cache): labelled by root
/// name and key_id, so keyrings before and after a reload stay apart.
struct Shared {
    root_duration: Family<Labels, Histogram, fn() -> Histogram>,
    root_errors: Family<Labels, Counter>,
    cache_hits: Counter,
    cache_misses: Counter,
    negative_hits: Counter,
    /// One series per [`Refusal`], indexed by its discriminant.
    refused: [Counter; 3],
}

static SHARED: LazyLock<Shared> = LazyLock::new(|| Shared {
    root_duration: Family::new_with_constructor(root_histogram),
    root_errors: Family::default(),
    cache_hits: Counter::default(),
    cache_misses: Counter::default(),
    negative_hits: Counter::default(),
    refused: Default::default(),
});

/// Records one call to a root key: its latency, and its error kind
/// (`ErrorKind::metric_label`) if it failed.
pub fn observe_root_call(
    root: &str,
    key_id: &str,
    op: RootOp,
    elapsed: Duration,
    error: Option<&'static str>,
) {
    let series = labels([("root", root), ("key_id", key_id), ("op", op.label())]);
    SHARED
        .root_duration
        .get_or_create(&series)
        .observe(elapsed.as_secs_f64());
    if let Some(kind) = error {
        let series = labels([("root", root), ("key_id", key_id), ("kind", kind)]);
        SHARED.root_errors.get_or_create(&series).inc();
    }
}

/// A Decrypt found its local KEK in the cache.
pub fn cache_hit() {
    SHARED.cache_hits.inc();
}

/// A Decrypt's local KEK was not cached (a root unwrap follows, or joins one in flight).
pub fn cache_miss() {
    SHARED.cache_misses.inc();
}

/// A wrapped copy already known not to authenticate was refused without a root call.
pub fn negative_cache_hit() {
    SHARED.negative_hits.inc();
}

/// A connection was closed at accept for `reason`.
pub fn connection_refused(reason: Refusal) {
    SHARED.refused[reason as usize].inc();
}

/// The log writer's count of lines it dropped (its buffer was full, or a write failed).
static LOG_DROPS: OnceLock<Arc<AtomicU64>> = OnceLock::new();

/// Registers the log writer's drop counter (once, when logging is set up).
pub fn count_dropped_log_lines(counter: Arc<AtomicU64>) {
    let _ = LOG_DROPS.set(counter);
}

/// Log lines dropped so far because the log's reader did not keep up.
pub fn log_lines_dropped() -> u64 {
    LOG_DROPS.get().map_or(0, |c| c.load(Ordering::Relaxed))
}

/// The request counters. One per process, shared by the services.
pub struct Metrics {
    requests: Family<Labels, Counter>,
    duration: Family<Labels, Histogram, fn() -> Histogram>,
    /// Each op's series, looked up once: a call then costs atomic adds, not label
    /// allocations and a map lookup under a lock.
    series: [OpSeries; 3],
}

/// One op's request counters and latency histogram (handles into the families above).
struct OpSeries {
    ok: Counter,
    error: Counter,
    duration: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        let requests: Family<Labels, Counter> = Family::default();
        let duration: Family<Labels, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(call_histogram);
        let series = [Op::Status, Op::Encrypt, Op::Decrypt].map(|op| {
            let counter = |outcome| {
                requests
                    .get_or_create(&labels([("op", op.label()), ("outcome", outcome)]))
                    .clone()
            };
            OpSeries {
                ok: counter("ok"),
                error: counter("error"),
                duration: duration
                    .get_or_create(&labels([("op", op.label())]))
                    .clone(),
            }
        });
        Self {
            requests,
            duration,
            series,
        }
    }
}

/// A gauge's value from a count that may exceed `i64` (it never does in practice).
fn gauge_value(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

impl Metrics {
    /// Records one call.
    pub fn observe(&self, op: Op, ok: bool, elapsed: Duration) {
        let series = &self.series[op as usize];
        if ok { &series.ok } else { &series.error }.inc();
        series.duration.observe(elapsed.as_secs_f64());
    }

    /// The OpenMetrics text exposition ([`CONTENT_TYPE`]) of these counters, the shared
    /// ones and `keyring`'s state.
    pub fn render(&self, keyring: &Keyring) -> String {
        let mut registry = Registry::with_prefix("kms_plugin");
        registry.register(
            "requests",
            "KMS v2 calls served, by operation and outcome",
            self.requests.clone(),
        );
        registry.register_with_unit(
            "request_duration",
            "Time to serve a KMS v2 call",
            Unit::Seconds,
            self.duration.clone(),
        );
        registry.register_with_unit(
            "root_call_duration",
            "Time of one root key call (an HSM or KMS operation), by root and operation",
            Unit::Seconds,
            SHARED.root_duration.clone(),
        );
        registry.register(
            "root_call_errors",
            "Root key calls that failed, by root and error kind",
            SHARED.root_errors.clone(),
        );
        registry.register(
            "cache_hits",
            "Decrypts whose local KEK was cached",
            SHARED.cache_hits.clone(),
        );
        registry.register(
            "cache_misses",
            "Decrypts whose local KEK had to be unwrapped by a root",
            SHARED.cache_misses.clone(),
        );
        registry.register(
            "cache_negative_hits",
            "Wrapped keys refused without a root call: known not to authenticate",
            SHARED.negative_hits.clone(),
        );
        // Every reason is listed, at 0 until it happens, so alerts see a series from the start.
        let refused: Family<Labels, Counter> = Family::default();
        for reason in Refusal::ALL {
            refused
                .get_or_create(&labels([("reason", reason.label())]))
                .inc_by(SHARED.refused[reason as usize].get());
        }
        registry.register(
            "connections_refused",
            "Connections to the KMS socket closed at accept, by reason (peer_uid, no_credentials, max_connections)",
            refused,
        );
        self.register_keyring(&mut registry, keyring);
        let dropped: Counter = Counter::default();
        dropped.inc_by(log_lines_dropped());
        registry.register(
            "log_lines_dropped",
            "Log lines dropped because the log's reader (journald, a pipe) did not keep up",
            dropped,
        );
        registry.register(
            "build",
            "The running build",
            Info::new(labels([("version", env!("CARGO_PKG_VERSION"))])),
        );
        let mut out = String::with_capacity(8192);
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
        out
    }

    /// Series read from the keyring at scrape time.
    fn register_keyring(&self, registry: &mut Registry, keyring: &Keyring) {
        let healthy: Family<Labels, Gauge> = Family::default();
        healthy
            .get_or_create(&labels([("key_id", keyring.key_id().as_str())]))
            .set(i64::from(keyring.health().is_ready()));
        registry.register(
            "healthy",
            "1 when Status reports healthz \"ok\" (an Encrypt would succeed)",
            healthy,
        );

        let (roots, local) = keyring.info();
        let calls: Family<Labels, Counter> = Family::default();
        let throttled: Family<Labels, Counter> = Family::default();
        let state: Family<Labels, Gauge> = Family::default();
        let decrypts: Family<Labels, Counter> = Family::default();
        let last_decrypt: Family<Labels, Gauge> = Family::default();
        let info: Family<Labels, Gauge> = Family::default();
        for r in &roots {
            let root = [("root", r.name.as_str()), ("key_id", r.key_id.as_str())];
            let with = |name: &'static str, value: &str| {
                let mut l = labels(root);
                l.push((name, Escaped::from(value)));
                l
            };
            calls
                .get_or_create(&with("op", "wrap"))
                .inc_by(r.wrap_calls);
            calls
                .get_or_create(&with("op", "unwrap"))
                .inc_by(r.unwrap_calls);
            throttled
                .get_or_create(&labels(root))
                .inc_by(r.throttled_unwraps);
            for s in ["ok", "degraded", "rejected", "unavailable"] {
                state
                    .get_or_create(&with("state", s))
                    .set(i64::from(r.state == s));
            }
            decrypts.get_or_create(&labels(root)).inc_by(r.decrypts);
            last_decrypt
                .get_or_create(&labels(root))
                .set(r.last_decrypt_unix);
            let mut l = with("provider", r.provider);
            l.push(("role", Escaped::from(r.role)));
            info.get_or_create(&l).set(1);
        }
        registry.register(
            "root_calls",
            "Calls to a root key, by operation (each is one HSM or KMS call)",
            calls,
        );
        registry.register(
            "root_unwraps_throttled",
            "Decrypt unwraps refused without a root call: the root's unwrap budget was spent",
            throttled,
        );
        registry.register(
            "root_state",
            "1 for the root's current state (ok, degraded, rejected; unavailable: could not be opened)",
            state,
        );
        registry.register(
            "decrypts",
            "Decrypt calls served under a root's key_id since start",
            decrypts,
        );
        registry.register_with_unit(
            "last_decrypt_timestamp",
            "When a Decrypt last used a root's key_id (Unix time; 0: never since start)",
            Unit::Seconds,
            last_decrypt,
        );
        registry.register("root_info", "Configured root keys: provider and role", info);

        let gauges: [(&str, &str, Option<Unit>, u64); 7] = [
            (
                "local_kek_successor_ready",
                "1 when the next local KEK is made and proven, ready to take over at the limit",
                None,
                u64::from(local.successor_ready),
            ),
            (
                "local_kek_encryptions",
                "Encryptions under the current local KEK",
                None,
                local.encryptions,
            ),
            (
                "local_kek_max_encryptions",
                "Encryptions allowed under one local KEK",
                None,
                local.max_encryptions,
            ),
            (
                "local_kek_age",
                "Age of the current local KEK",
                Some(Unit::Seconds),
                local.age_seconds,
            ),
            (
                "local_kek_max_age",
                "Age at which a local KEK stops sealing",
                Some(Unit::Seconds),
                local.max_age_seconds,
            ),
            (
                "cache_entries",
                "Unwrapped local KEKs in memory",
                None,
                keyring.cache().len() as u64,
            ),
            (
                "cache_failed_entries",
                "Wrapped keys remembered as not authenticating (the negative cache)",
                None,
                keyring.cache().failed_len() as u64,
            ),
        ];
        for (name, help, unit, value) in gauges {
            let gauge: Gauge = Gauge::default();
            gauge.set(gauge_value(value));
            match unit {
                Some(unit) => registry.register_with_unit(name, help, unit, gauge),
                None => registry.register(name, help, gauge),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative_and_counters_by_outcome() {
        let m = Metrics::default();
        m.observe(Op::Encrypt, true, Duration::from_micros(80));
        m.observe(Op::Encrypt, false, Duration::from_millis(3));
        let mut registry = Registry::with_prefix("kms_plugin");
        registry.register_with_unit("d", "", Unit::Seconds, m.duration.clone());
        registry.register("requests", "", m.requests.clone());
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
        for line in [
            "kms_plugin_d_seconds_bucket{le=\"0.00005\",op=\"encrypt\"} 0",
            "kms_plugin_d_seconds_bucket{le=\"0.0001\",op=\"encrypt\"} 1",
            "kms_plugin_d_seconds_bucket{le=\"0.0025\",op=\"encrypt\"} 1",
            "kms_plugin_d_seconds_bucket{le=\"0.005\",op=\"encrypt\"} 2",
            "kms_plugin_d_seconds_count{op=\"encrypt\"} 2",
            "kms_plugin_requests_total{op=\"encrypt\",outcome=\"ok\"} 1",
            "kms_plugin_requests_total{op=\"encrypt\",outcome=\"error\"} 1",
        ] {
            assert!(text.lines().any(|l| l == line), "no {line} in\n{text}");
        }
    }

    #[test]
    fn label_values_are_escaped() {
        let family: Family<Labels, Counter> = Family::default();
        family
            .get_or_create(&labels([("root", "a\"b\\c\nd")]))
            .inc();
        let mut registry = Registry::default();
        registry.register("x", "", family);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
        assert!(text.contains(r#"x_total{root="a\"b\\c\nd"} 1"#), "{text}");
    }
}

//! The running plugin: the keyring in force and where its configuration came from.
//!
//! A reload (SIGHUP, a changed config file, or the Admin `Reload` call that
//! `kms-plugin rotate` makes) builds a complete new keyring beside the old one: every root
//! opens, and the first local KEK is wrapped by every wrapping root and each copy unwrapped
//! again (the new active root's round trip). Only then is it swapped in, atomically; on any failure
//! the old keyring keeps serving. Calls in flight finish on the keyring they started with.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use crate::config::{Config, ConfigError, Source};
use crate::envelope::fingerprint;
use crate::keyring::cache::KekCache;
use crate::keyring::{Keyring, Retired};
use crate::metrics::Metrics;
use crate::root::{KeyId, RootError};

/// How often the config file is checked for changes.
const WATCH_INTERVAL: Duration = Duration::from_secs(2);

/// Why a reload was refused. The old configuration keeps serving in every case.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The plugin runs on the embedded default: there is no file to reload.
    #[error("the plugin runs on the embedded default; there is no config file to reload")]
    NoConfigFile,
    /// The new file does not parse or validate.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A root of the new configuration cannot be opened or does not work.
    #[error("{0}")]
    Root(#[from] RootError),
    /// The new configuration drops root keys that may still protect data.
    #[error(
        "the new configuration drops root key(s) {0}; data written under these key_ids becomes \
         unreadable unless another configured root holds a copy. Rewrite all Secrets first, then \
         reload with --force"
    )]
    WouldDrop(String),
}

/// A reload that was applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reloaded {
    /// The active key_id after the reload.
    pub key_id: KeyId,
    /// Changed settings that were not applied because they take effect only at start-up.
    pub needs_restart: Vec<&'static str>,
}

/// Settings read only at start-up (the socket is bound, the listener and cache made once).
/// Returns the names of those that differ, and puts the running values into `new` so that
/// the configuration in force says what really runs.
fn keep_start_up_settings(old: &Config, new: &mut Config) -> Vec<&'static str> {
    let mut changed = Vec::new();
    macro_rules! keep {
        ($name:literal, $($field:ident).+) => {
            if new.$($field).+ != old.$($field).+ {
                changed.push($name);
                new.$($field).+ = old.$($field).+.clone();
            }
        };
    }
    keep!("socket", socket);
    keep!("socket_mode", socket_mode);
    keep!("allowed_uids", allowed_uids);
    keep!("admin_uids", admin_uids);
    keep!("max_connections", max_connections);
    keep!("metrics_listen", metrics_listen);
    keep!("metrics_allow_remote", metrics_allow_remote);
    keep!("api_version", api_version);
    keep!("[cache] capacity", cache.capacity);
    changed
}

/// Shared state of a running plugin.
pub struct Plugin {
    keyring: RwLock<Arc<Keyring>>,
    metrics: Metrics,
    in_flight: Calls,
    source: Source,
    /// The configuration in force; the lock also serializes reloads.
    loaded: tokio::sync::Mutex<Loaded>,
}

struct Loaded {
    config: Config,
    /// Hash of the file text last tried, so a bad file is not retried until it changes.
    last_seen: [u8; 32],
}

impl Plugin {
    /// Opens the roots of `config`, makes the first local KEK and starts upkeep.
    pub async fn start(config: &Config, source: Source) -> Result<Arc<Self>, RootError> {
        let cache = Arc::new(KekCache::new(config.cache.capacity));
        let keyring =
            Arc::new(Keyring::open(config, cache, &Default::default(), Retired::Skip).await?);
        keyring.start().await?;
        tokio::spawn(keyring.clone().maintain());
        let last_seen = match &source {
            Source::File(path) => hash_file(path).unwrap_or_default(),
            Source::Embedded => [0; 32],
        };
        Ok(Arc::new(Self {
            keyring: RwLock::new(keyring),
            metrics: Metrics::default(),
            in_flight: Calls::default(),
            source,
            loaded: tokio::sync::Mutex::new(Loaded {
                config: config.clone(),
                last_seen,
            }),
        }))
    }

    /// The keyring in force. Callers hold it for one call.
    pub fn keyring(&self) -> Arc<Keyring> {
        self.keyring
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The request counters.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Counts a KMS call as in flight until the guard drops (for a graceful stop).
    pub fn call_started(&self) -> InFlight<'_> {
        self.in_flight.start()
    }

    /// Resolves once no call is in flight.
    pub async fn calls_drained(&self) {
        self.in_flight.drained().await;
    }

    /// Where the configuration came from.
    pub fn source(&self) -> &Source {
        &self.source
    }

    /// Stops background work (at shutdown).
    pub fn stop(&self) {
        self.keyring().stop();
    }

    /// Re-reads the config file and swaps it in if it works. `force` allows dropping roots.
    pub async fn reload(&self, force: bool) -> Result<Reloaded, ReloadError> {
        let Source::File(path) = &self.source else {
            return Err(ReloadError::NoConfigFile);
        };
        let mut loaded = self.loaded.lock().await;
        crate::systemd::reloading();
        loaded.last_seen = hash_file(path).unwrap_or_default();
        let result = self
            .try_reload(&loaded.config, Config::load(path), force)
            .await;
        match &result {
            Ok((config, reloaded)) => {
                tracing::info!(config = %path.display(), key_id = %reloaded.key_id, "configuration reloaded");
                if !reloaded.needs_restart.is_empty() {
                    tracing::warn!(
                        config = %path.display(),
                        fields = %reloaded.needs_restart.join(", "),
                        "changed settings take effect only after a restart; the running values stay"
                    );
                }
                loaded.config = config.clone();
            }
            Err(e) => {
                tracing::error!(config = %path.display(), error = %e, "reload refused; the previous configuration keeps serving");
            }
        }
        crate::systemd::reloaded(&self.keyring());
        result.map(|(_, reloaded)| reloaded)
    }

    async fn try_reload(
        &self,
        old: &Config,
        new: Result<Config, ConfigError>,
        force: bool,
    ) -> Result<(Config, Reloaded), ReloadError> {
        let mut new = new?;
        let needs_restart = keep_start_up_settings(old, &mut new);
        let current = self.keyring();
        let keyring = Arc::new(
            Keyring::open(&new, current.cache(), &current.stats(), Retired::Require).await?,
        );
        let dropped: Vec<String> = current
            .key_ids()
            .filter(|id| !keyring.answers_to(id))
            .map(std::string::ToString::to_string)
            .collect();
        if !dropped.is_empty() {
            if !force {
                return Err(ReloadError::WouldDrop(dropped.join(", ")));
            }
            tracing::warn!(key_ids = %dropped.join(", "), "forced reload drops root keys");
        }
        // Wraps the first local KEK under every wrapping root and unwraps each copy again:
        // the new active root is proven before anything is swapped.
        keyring.start_strict().await?;
        tokio::spawn(keyring.clone().maintain());
        let key_id = keyring.key_id().clone();
        let old = std::mem::replace(
            &mut *self.keyring.write().unwrap_or_else(PoisonError::into_inner),
            keyring,
        );
        old.stop();
        Ok((
            new,
            Reloaded {
                key_id,
                needs_restart,
            },
        ))
    }

    /// Reloads whenever the config file's content changes (edits, ConfigMap symlink swaps),
    /// or a root check found a root rotated at its source (a new Vault Transit version).
    pub async fn watch(self: Arc<Self>) {
        let Source::File(path) = self.source.clone() else {
            return;
        };
        let mut tick = tokio::time::interval(WATCH_INTERVAL);
        loop {
            tick.tick().await;
            if self.keyring().take_root_changed() {
                tracing::info!(
                    "a root key was rotated at its source; reloading to use its new version"
                );
                let _ = self.reload(false).await;
                continue;
            }
            let Some(hash) = hash_file(&path) else {
                continue;
            };
            if hash == self.loaded.lock().await.last_seen {
                continue;
            }
            tracing::info!(config = %path.display(), "config file changed; reloading");
            let _ = self.reload(false).await;
        }
    }
}

/// KMS calls in flight: one atomic add and one subtract per call; the notify is woken only
/// when the count falls to zero while a stop waits for it (a watch channel here cost a dozen
/// mutex round trips a call, and the notify's lock is a round trip of its own).
#[derive(Default)]
struct Calls {
    count: AtomicUsize,
    /// Set once a stop waits in [`Calls::drained`]; never cleared.
    waiting: AtomicBool,
    drained: tokio::sync::Notify,
}

impl Calls {
    fn start(&self) -> InFlight<'_> {
        self.count.fetch_add(1, Ordering::AcqRel);
        InFlight(self)
    }

    async fn drained(&self) {
        // SeqCst here and in `InFlight::drop`: either this sees the count at zero or the
        // last call's drop sees `waiting` and notifies.
        self.waiting.store(true, Ordering::SeqCst);
        loop {
            // Registered before the check, so a call ending in between is not missed.
            let notified = self.drained.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.count.load(Ordering::SeqCst) == 0 {
                return;
            }
            notified.await;
        }
    }
}

/// A call in flight; see [`Plugin::call_started`].
pub struct InFlight<'a>(&'a Calls);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if self.0.count.fetch_sub(1, Ordering::SeqCst) == 1 && self.0.waiting.load(Ordering::SeqCst)
        {
            self.0.drained.notify_waiters();
        }
    }
}

fn hash_file(path: &std::path::Path) -> Option<[u8; 32]> {
    std::fs::read(path)
        .ok()
        .map(|text| fingerprint(b"kms-plugin config", [&text]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::root;

    #[tokio::test]
    async fn drained_waits_for_the_last_call_in_flight() {
        let calls = Calls::default();
        calls.drained().await; // none in flight
        let first = calls.start();
        let second = calls.start();
        let drained = calls.drained();
        tokio::pin!(drained);
        let wait = Duration::from_millis(50);
        assert!(tokio::time::timeout(wait, &mut drained).await.is_err());
        drop(first);
        assert!(tokio::time::timeout(wait, &mut drained).await.is_err());
        drop(second);
        tokio::time::timeout(wait, &mut drained)
            .await
            .expect("drained once the last call ended");
    }

    /// The last call ends while a stop starts waiting, on another thread: the stop must
    /// see either the count at zero or the notification, every time.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn drained_never_misses_a_racing_last_call() {
        for _ in 0..300 {
            let calls = Arc::new(Calls::default());
            let (started, in_flight) = std::sync::mpsc::channel();
            let busy = {
                let calls = calls.clone();
                std::thread::spawn(move || {
                    let last = calls.start();
                    let _ = started.send(());
                    for _ in 0..50 {
                        drop(calls.start());
                    }
                    drop(last);
                })
            };
            in_flight.recv().expect("a call started");
            let waiter = {
                let calls = calls.clone();
                tokio::spawn(async move { calls.drained().await })
            };
            busy.join().expect("thread");
            tokio::time::timeout(Duration::from_secs(5), waiter)
                .await
                .expect("drained after the last call ended")
                .expect("task");
        }
    }

    /// A config file with file roots `a` and `b` in `dir`, `active` active, `retired`
    /// retired, plus `extra` top-level lines.
    fn config_text(dir: &std::path::Path, active: &str, retired: &[&str], extra: &str) -> String {
        let list: Vec<String> = retired.iter().map(|r| format!("\"{r}\"")).collect();
        let mut text = format!(
            "{extra}\n[kek]\nactive = \"{active}\"\nretired = [{}]\n",
            list.join(",")
        );
        for name in std::iter::once(&active).chain(retired) {
            text.push_str(&format!(
                "[keys.{name}]\nprovider = \"file\"\npath = \"{}\"\n",
                dir.join(format!("{name}.key")).display()
            ));
        }
        text
    }

    #[test]
    fn start_up_settings_are_kept_and_reported_the_rest_applies() {
        let dir = Path::new("/nonexistent");
        let old = Config::parse(&config_text(dir, "a", &[], "")).expect("old");
        let mut new = Config::parse(&config_text(
            dir,
            "b",
            &["a"],
            "socket_mode = \"0660\"\nadmin_uids = [0]\n[local_kek]\nmax_age_seconds = 3600",
        ))
        .expect("new");
        let changed = keep_start_up_settings(&old, &mut new);
        assert_eq!(changed, ["socket_mode", "admin_uids"]);
        assert_eq!((new.socket_mode, new.admin_uids), (0o600, None));
        assert_eq!(new.kek.active, "b", "roles apply");
        assert_eq!(new.kek.retired, ["a"]);
        assert_eq!(new.local_kek.max_age_seconds, 3600, "lifetimes apply");
    }

    use std::path::Path;

    #[tokio::test]
    async fn a_reload_applies_role_changes_and_refuses_to_drop_keys_unless_forced() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("kms.toml");
        let write = |text: String| std::fs::write(&path, text).expect("write config");
        write(config_text(dir.path(), "a", &["b"], ""));
        let config = Config::load(&path).expect("config");
        for key in config.keys.values() {
            root::create(key).await.expect("create key");
        }
        let b_id = root::open("b", &config.keys["b"])
            .await
            .expect("b")
            .key_id()
            .clone();
        let plugin = Plugin::start(&config, Source::File(path.clone()))
            .await
            .expect("start");
        let a_id = plugin.keyring().key_id().clone();

        write(config_text(
            dir.path(),
            "b",
            &["a"],
            "socket_mode = \"0660\"",
        ));
        let reloaded = plugin.reload(false).await.expect("reload");
        assert_eq!(reloaded.key_id, b_id);
        assert_eq!(reloaded.needs_restart, ["socket_mode"]);
        assert_eq!(plugin.keyring().key_id(), &b_id);

        write(config_text(dir.path(), "b", &[], ""));
        match plugin.reload(false).await {
            Err(ReloadError::WouldDrop(ids)) => assert_eq!(ids, a_id.to_string()),
            other => panic!("dropped a key without --force: {other:?}"),
        }
        assert_eq!(
            plugin.keyring().key_ids().count(),
            2,
            "old keyring still serves"
        );
        plugin.reload(true).await.expect("forced reload");
        assert_eq!(plugin.keyring().key_ids().count(), 1);
        plugin.stop();
    }
}

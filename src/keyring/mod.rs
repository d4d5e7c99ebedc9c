//! The keyring: the configured root keys, the local KEK that seals new data, and the cache
//! of unwrapped local KEKs that opens old data. It is the heart of the plugin; the gRPC
//! layer only translates requests into calls here.
//!
//! Life of a local KEK: [`Keyring::start`] (and later the background [`Keyring::maintain`]
//! task) generates a random key, has the active root and every `also_wrap` root wrap it
//! and unwrap the copy again (a copy is trusted only once it has been shown to open), and
//! only then makes it current. Encrypt never waits on a root: the successor is made and
//! proven in the background once the current key reaches `prepare_at_percent` of either
//! limit, waits as *prepared*, and takes over when the current key reaches the limit itself
//! (`max_encryptions` seals or `max_age_seconds`). If no root can wrap one by then, Encrypt
//! fails and Status says why.

pub mod cache;
pub mod limit;
pub mod roots;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;
use zeroize::Zeroizing;

use crate::config::{ApiVersion, Config, LocalKekConfig, Role};
use crate::envelope::annotations::{self, MAX_TOTAL_LEN, wrapped_kek_key};
use crate::envelope::{
    AssociatedData, EnvelopeError, KekCipher, MAX_PLAINTEXT_LEN, associated_data, check_format,
};
use crate::root::{self, ErrorKind, KeyId, RootError};
use crate::secret::Key256;
use cache::KekCache;
use roots::{Root, RootHealth, RootStats, UnwrapRate};

/// kube-apiserver rejects longer key_ids; anything longer cannot be one of ours.
const MAX_KEY_ID_LEN: usize = 1024;
/// The Status `healthz` of a healthy plugin (the KMS v2 contract).
pub const HEALTHZ_OK: &str = "ok";
/// Status strings are shown on the apiserver's health endpoints: keep them short.
const MAX_HEALTHZ_LEN: usize = 400;

/// Why a request failed, in terms the gRPC layer maps to status codes.
#[derive(Debug, thiserror::Error)]
pub enum KeyringError {
    /// The request itself is malformed (sizes, empty fields).
    #[error("{0}")]
    InvalidRequest(&'static str),
    /// The ciphertext or annotations are malformed or fail authentication.
    #[error(transparent)]
    Envelope(#[from] EnvelopeError),
    /// No configured root key matches the request's key_id or annotations.
    #[error("key_id is not one this plugin has configured")]
    UnknownKeyId,
    /// A root key call failed (or was not made: [`ErrorKind::Throttled`]); the kind
    /// decides the gRPC code.
    #[error("{}", root_failure(name, *kind))]
    Root {
        /// The `[keys.NAME]` entry.
        name: String,
        /// Why.
        kind: ErrorKind,
    },
    /// No local KEK can be used for Encrypt right now; the text says why.
    #[error("cannot encrypt now: {0}")]
    NotReady(String),
}

/// The caller's message for a failed root call: which key, and whether to retry.
fn root_failure(name: &str, kind: ErrorKind) -> String {
    match kind {
        ErrorKind::Throttled => {
            format!("too many uncached keys to unwrap under root key \"{name}\"; retry shortly")
        }
        ErrorKind::Unavailable | ErrorKind::RateLimited => {
            format!("root key \"{name}\" is unavailable")
        }
        ErrorKind::Denied
        | ErrorKind::KeyDisabled
        | ErrorKind::CredentialsRejected
        | ErrorKind::Misconfigured
        | ErrorKind::NotAuthentic => format!("root key \"{name}\" rejected the request"),
    }
}

/// What to do with a retired root key that cannot be opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retired {
    /// Start without it (plugin start-up: availability first).
    Skip,
    /// Refuse the whole configuration (reload: never half-apply).
    Require,
}

/// What Encrypt returns.
pub struct Encrypted {
    /// The sealed DEK seed.
    pub ciphertext: Vec<u8>,
    /// The active key_id (always what Status reports).
    pub key_id: String,
    /// The wrapped copies of the local KEK.
    pub annotations: HashMap<String, Vec<u8>>,
}

/// The keyring's health, as Status, `/readyz`, systemd and metrics report it
/// (../shared/KMSV2.md §8).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    /// Encrypt works and every wrapping root answered its last call.
    Ok,
    /// Encrypt works, but a wrapping root is unreachable for now: logged and shown by
    /// `kms-plugin status`; Status stays "ok" while the current local KEK lasts.
    Degraded {
        /// Which root, and its last error.
        reason: String,
    },
    /// Encrypt fails now, or a wrapping root refuses and needs an operator.
    Unhealthy {
        /// Why, short enough for the apiserver's health endpoints.
        reason: String,
    },
}

impl Health {
    /// The Status `healthz` string: "ok", or why not.
    pub fn healthz(&self) -> &str {
        match self {
            Health::Ok | Health::Degraded { .. } => HEALTHZ_OK,
            Health::Unhealthy { reason } => reason,
        }
    }

    /// True when `/readyz` answers 200 (Status reports "ok"), false for 503.
    pub fn is_ready(&self) -> bool {
        match self {
            Health::Ok | Health::Degraded { .. } => true,
            Health::Unhealthy { .. } => false,
        }
    }
}

/// One root key as `kms-plugin status` and metrics show it (the admin layer turns it into
/// the protocol's `RootInfo`).
#[derive(Debug, Clone, Default)]
pub struct RootReport {
    /// The `[keys.NAME]` entry.
    pub name: String,
    /// Its provider.
    pub provider: &'static str,
    /// Its key_id; empty when it could not be opened.
    pub key_id: String,
    /// What it is used for: "active", "also-wrap" or "retired".
    pub role: &'static str,
    /// "ok", "degraded", "rejected", or "unavailable" when it could not be opened.
    pub state: &'static str,
    /// The last error, empty when healthy.
    pub last_error: String,
    /// Unix time of the last Decrypt under its key_id; 0 if none since start.
    pub last_decrypt_unix: i64,
    /// Wrap calls made to it.
    pub wrap_calls: u64,
    /// Unwrap calls made to it.
    pub unwrap_calls: u64,
    /// Calls that failed.
    pub failed_calls: u64,
    /// Decrypt RPCs served under its key_id.
    pub decrypts: u64,
    /// Decrypt unwraps refused because its unwrap budget was spent.
    pub throttled_unwraps: u64,
}

/// The current local KEK's use against its limits.
pub struct LocalKekReport {
    /// Seals made.
    pub encryptions: u64,
    /// `[local_kek] max_encryptions`.
    pub max_encryptions: u64,
    /// Seconds since it took over.
    pub age_seconds: u64,
    /// `[local_kek] max_age_seconds`.
    pub max_age_seconds: u64,
    /// Its successor is made and proven, ready to take over at the limit.
    pub successor_ready: bool,
}

/// A local KEK in use for Encrypt.
struct LocalKek {
    sealer: Sealer,
    /// When it took over (its age limit counts from here).
    created: Instant,
    /// Seals made; never above `max_encryptions`.
    encryptions: AtomicU64,
}

/// A local KEK wrapped by every wrapping root, each copy proven: all Encrypt needs.
struct Sealer {
    cipher: Arc<KekCipher>,
    aad: AssociatedData,
    annotations: HashMap<String, Vec<u8>>,
}

impl Sealer {
    fn into_current(self) -> LocalKek {
        LocalKek {
            sealer: self,
            created: Instant::now(),
            encryptions: AtomicU64::new(0),
        }
    }
}

/// The keyring. Shared as `Arc<Keyring>`; a reload builds a new one and swaps it in.
pub struct Keyring {
    api_version: ApiVersion,
    active: Arc<Root>,
    /// Active first, then `also_wrap`: every new local KEK is wrapped by all of them.
    wrappers: Vec<Arc<Root>>,
    /// Every configured root in role order (active, also-wrap, retired).
    roots: Vec<Arc<Root>>,
    /// Retired roots that could not be opened at start-up, as `status` shows them.
    unopened: Vec<RootReport>,
    limits: LocalKekConfig,
    probe_interval: Option<Duration>,
    retry_interval: Duration,
    current: RwLock<Option<Arc<LocalKek>>>,
    /// The successor, made and proven ahead of time; takes over when `current` is spent.
    prepared: Mutex<Option<Sealer>>,
    /// Why the last attempt to make a local KEK failed; `None` after a success.
    rotation_error: Mutex<Option<RootError>>,
    cache: Arc<KekCache>,
    wake: Notify,
    stopped: AtomicBool,
    /// Set by a root check that found a root's key_id changed (see `take_root_changed`).
    root_changed: AtomicBool,
}

impl Keyring {
    /// Opens every root key of `config`. `cache` and `stats` carry over from the keyring
    /// this one replaces (both are keyed by key_id, so they stay valid).
    ///
    /// With [`Retired::Skip`] (start-up), a retired root that cannot be opened is left out
    /// and reported instead of stopping the plugin: only data under that key is unreadable
    /// until it is fixed and the config reloaded. Active and also-wrap roots must open.
    pub async fn open(
        config: &Config,
        cache: Arc<KekCache>,
        stats: &HashMap<KeyId, Arc<RootStats>>,
        retired: Retired,
    ) -> Result<Self, RootError> {
        let mut roots: Vec<Arc<Root>> = Vec::new();
        let mut unopened = Vec::new();
        let rate = UnwrapRate::from(&config.cache);
        for (name, role) in config.roles() {
            let Some(key_config) = config.keys.get(name) else {
                return Err(RootError::new(
                    ErrorKind::Misconfigured,
                    format!("no [keys.{name}] entry"),
                ));
            };
            let key = match root::open(name, key_config).await {
                Ok(key) => key,
                Err(e) => {
                    let e = name_error(name, key_config.provider(), e);
                    if role != Role::Retired || retired == Retired::Require {
                        return Err(e);
                    }
                    tracing::error!(key = name, error = %e, "retired root key cannot be opened; data under it stays unreadable until it is fixed and the config reloaded");
                    unopened.push(RootReport {
                        name: name.to_string(),
                        provider: key_config.provider(),
                        role: role.as_str(),
                        state: "unavailable",
                        last_error: e.to_string(),
                        ..RootReport::default()
                    });
                    continue;
                }
            };
            if let Some(twin) = roots.iter().find(|r| r.key_id() == key.key_id()) {
                return Err(RootError::new(
                    ErrorKind::Misconfigured,
                    format!(
                        "keys \"{}\" and \"{name}\" are the same root key (key_id {})",
                        twin.name,
                        key.key_id()
                    ),
                ));
            }
            let stats = stats.get(key.key_id()).cloned().unwrap_or_default();
            roots.push(Arc::new(Root::new(name, role, key, stats, rate)));
        }
        // Opening a root moved its key schedule through stack temporaries of this thread.
        crate::secret::wipe_stack();
        Self::assemble(config, roots, unopened, cache)
    }

    /// A keyring over roots already opened, in role order (active first).
    fn assemble(
        config: &Config,
        roots: Vec<Arc<Root>>,
        unopened: Vec<RootReport>,
        cache: Arc<KekCache>,
    ) -> Result<Self, RootError> {
        let active = roots
            .first()
            .cloned()
            .ok_or_else(|| RootError::new(ErrorKind::Misconfigured, "no active root key"))?;
        let wrappers = roots
            .iter()
            .filter(|r| r.role != Role::Retired)
            .cloned()
            .collect();
        let interval = config.health.root_check_interval_seconds;
        Ok(Self {
            api_version: config.api_version,
            active,
            wrappers,
            roots,
            limits: config.local_kek.clone(),
            probe_interval: (interval > 0).then(|| Duration::from_secs(interval)),
            retry_interval: Duration::from_secs(config.health.retry_interval_seconds.max(1)),
            unopened,
            current: RwLock::new(None),
            prepared: Mutex::new(None),
            rotation_error: Mutex::new(None),
            cache,
            wake: Notify::new(),
            stopped: AtomicBool::new(false),
            root_changed: AtomicBool::new(false),
        })
    }

    /// Makes the first local KEK. A transient root failure is not fatal: the plugin serves
    /// (Decrypt through other roots, an honest Status) and [`Keyring::maintain`] retries.
    /// A refusal or misconfiguration is returned, so start-up fails with a clear reason.
    pub async fn start(&self) -> Result<(), RootError> {
        match self.rotate().await {
            Err(e) if !e.is_transient() => Err(e),
            _ => Ok(()),
        }
    }

    /// For a reload: the new configuration must work completely before it is swapped in,
    /// so any failure to make the first local KEK is an error here.
    pub async fn start_strict(&self) -> Result<(), RootError> {
        self.rotate().await
    }

    /// The key_ids of every configured root.
    pub fn key_ids(&self) -> impl Iterator<Item = &KeyId> {
        self.roots.iter().map(|r| r.key_id())
    }

    /// Statistics by key_id, to carry over into a reloaded keyring.
    pub fn stats(&self) -> HashMap<KeyId, Arc<RootStats>> {
        self.roots
            .iter()
            .map(|r| (r.key_id().clone(), r.stats.clone()))
            .collect()
    }

    /// The shared cache.
    pub fn cache(&self) -> Arc<KekCache> {
        self.cache.clone()
    }

    /// The active key_id.
    pub fn key_id(&self) -> &KeyId {
        self.active.key_id()
    }

    /// The version string Status reports.
    pub fn api_version(&self) -> ApiVersion {
        self.api_version
    }

    /// Seals a DEK seed under the current local KEK. Never calls a root.
    pub fn encrypt(&self, plaintext: &[u8]) -> Result<Encrypted, KeyringError> {
        if plaintext.is_empty() {
            return Err(KeyringError::InvalidRequest("plaintext is empty"));
        }
        if plaintext.len() > MAX_PLAINTEXT_LEN {
            return Err(KeyringError::InvalidRequest(
                "plaintext is too large: at most 995 bytes fit kube-apiserver's 1 KiB ciphertext limit",
            ));
        }
        let kek = self
            .take_turn()
            .ok_or_else(|| KeyringError::NotReady(self.encrypt_blocker()))?;
        let sealer = &kek.sealer;
        Ok(Encrypted {
            ciphertext: sealer.cipher.seal(&sealer.aad, plaintext),
            key_id: self.key_id().to_string(),
            annotations: sealer.annotations.clone(),
        })
    }

    /// The local KEK that seals one more value, its count taken. When the current one is
    /// spent, its prepared successor takes over; `None` if there is none.
    fn take_turn(&self) -> Option<Arc<LocalKek>> {
        // Twice at most: the current key, then the successor that replaced it.
        for _ in 0..2 {
            let kek = self.current()?;
            if kek.created.elapsed() < self.max_age() {
                let max = self.limits.max_encryptions;
                let taken =
                    kek.encryptions
                        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                            (n < max).then_some(n + 1)
                        });
                if let Ok(before) = taken {
                    if before + 1 == self.prepare_count() {
                        self.wake.notify_one();
                    }
                    return Some(kek);
                }
            }
            if !self.promote(&kek) {
                self.wake.notify_one();
                return None;
            }
        }
        None
    }

    /// Replaces the spent `spent` with the prepared successor. False if there is none.
    fn promote(&self, spent: &Arc<LocalKek>) -> bool {
        let mut current = self.current.write().unwrap_or_else(PoisonError::into_inner);
        if current.as_ref().is_some_and(|now| !Arc::ptr_eq(now, spent)) {
            return true; // another caller promoted it first
        }
        let Some(next) = self
            .prepared
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        else {
            return false;
        };
        *current = Some(Arc::new(next.into_current()));
        tracing::info!(key_id = %self.key_id(), "local KEK reached its limit; its prepared successor took over");
        // Time to prepare the next one.
        self.wake.notify_one();
        true
    }

    /// Opens a ciphertext that Encrypt returned, under this or any earlier configuration
    /// whose roots are still configured. Tries the root named by `key_id` first, then any
    /// other configured root that holds a copy of the local KEK.
    pub async fn decrypt(
        &self,
        key_id: &str,
        ciphertext: &[u8],
        annotations: &HashMap<String, Vec<u8>>,
    ) -> Result<Zeroizing<Vec<u8>>, KeyringError> {
        match self.decrypt_cached(key_id, ciphertext, annotations)? {
            Decrypted::Plaintext(plaintext) => Ok(plaintext),
            Decrypted::NeedsRoot(unwrap) => unwrap.finish().await,
        }
    }

    /// [`Keyring::decrypt`] as far as it goes without a root call: every check, then the
    /// cache. The usual Decrypt ends here, synchronously (no timer, no task state); a
    /// cache miss returns the root unwrap still to do, for the caller to bound in time.
    pub fn decrypt_cached<'a>(
        &'a self,
        key_id: &'a str,
        ciphertext: &'a [u8],
        annotations: &'a HashMap<String, Vec<u8>>,
    ) -> Result<Decrypted<'a>, KeyringError> {
        check_format(ciphertext)?;
        if key_id.is_empty() || key_id.len() > MAX_KEY_ID_LEN {
            return Err(KeyringError::InvalidRequest(
                "key_id must be 1 to 1024 bytes",
            ));
        }
        let copies = annotations::wrapped_copies(annotations)?;
        // The copies a configured root can open (a root may answer to older key_ids), the
        // requested key_id's copy first; put in a Vec only when a root must be called.
        let known = || {
            copies
                .as_slice()
                .iter()
                .filter_map(|c| Some((self.root_by_key_id(c.key_id)?, *c)))
        };
        let requested = self.root_by_key_id(key_id);
        let has_requested_copy = copies.as_slice().iter().any(|c| c.key_id == key_id);
        let Some(first_root) = requested
            .filter(|_| has_requested_copy)
            .or_else(|| known().next().map(|(root, _)| root))
        else {
            return Err(KeyringError::UnknownKeyId);
        };
        // The annotations digest is bound into the associated data and keys the cache
        // (see cache.rs: it covers every copy's exact bytes and key_id).
        let set = copies.digest();
        let opening = Opening {
            requested,
            aad: associated_data(key_id, &set),
            ciphertext,
        };
        // Already unwrapped, through any copy: with the preferred root down, Decrypt must
        // not wait for it on every call once another root has opened the local KEK.
        if let Some(cipher) = self.cache.get(&set) {
            crate::metrics::cache_hit();
            return opening.open(&cipher, first_root).map(Decrypted::Plaintext);
        }
        crate::metrics::cache_miss();
        let mut candidates: Vec<(&Arc<Root>, KeyId, &[u8])> = known()
            .filter_map(|(root, c)| Some((root, KeyId::parse(c.key_id)?, c.wrapped)))
            .collect();
        candidates.sort_by_key(|(_, id, _)| id.as_str() != key_id);
        Ok(Decrypted::NeedsRoot(Box::new(RootUnwrap {
            keyring: self,
            candidates,
            set,
            opening,
        })))
    }

    /// What Status reports. In-memory only: never calls a root.
    pub fn health(&self) -> Health {
        if let Some(reason) = self.unhealthy_reason() {
            return Health::Unhealthy {
                reason: short(reason),
            };
        }
        let degraded = self.wrappers.iter().find_map(|root| {
            let (health, error) = root.stats.health();
            (health != RootHealth::Ok).then(|| {
                format!(
                    "{} root key \"{}\" degraded: {error}",
                    root.role.as_str(),
                    root.name
                )
            })
        });
        match degraded {
            Some(reason) => Health::Degraded {
                reason: short(reason),
            },
            None => Health::Ok,
        }
    }

    /// Detail for `kms-plugin status`: every configured root, then the local KEK.
    pub fn info(&self) -> (Vec<RootReport>, LocalKekReport) {
        let roots = self
            .roots
            .iter()
            .map(|r| {
                let (health, last_error) = r.stats.health();
                RootReport {
                    name: r.name.clone(),
                    provider: r.provider(),
                    key_id: r.key_id().to_string(),
                    role: r.role.as_str(),
                    state: health.as_str(),
                    last_error,
                    last_decrypt_unix: r.stats.last_decrypt_unix.load(Ordering::Relaxed),
                    wrap_calls: r.stats.wraps.load(Ordering::Relaxed),
                    unwrap_calls: r.stats.unwraps.load(Ordering::Relaxed),
                    failed_calls: r.stats.failures.load(Ordering::Relaxed),
                    decrypts: r.stats.decrypts.load(Ordering::Relaxed),
                    throttled_unwraps: r.stats.throttled.load(Ordering::Relaxed),
                }
            })
            .chain(self.unopened.iter().cloned())
            .collect();
        let current = self.current();
        let local = LocalKekReport {
            encryptions: current
                .as_ref()
                .map_or(0, |k| k.encryptions.load(Ordering::Relaxed)),
            max_encryptions: self.limits.max_encryptions,
            age_seconds: current
                .as_ref()
                .map_or(0, |k| k.created.elapsed().as_secs()),
            max_age_seconds: self.limits.max_age_seconds,
            successor_ready: self.has_prepared(),
        };
        (roots, local)
    }

    /// Background upkeep until [`Keyring::stop`]: replaces the local KEK before it runs out,
    /// retries after root failures, and probes the wrapping roots now and then.
    pub async fn maintain(self: Arc<Self>) {
        let mut next_probe = self.probe_interval.map(|i| Instant::now() + i);
        while !self.stopped.load(Ordering::Acquire) {
            if let Some(kek) = self.current()
                && self.spent(&kek)
            {
                self.promote(&kek);
            }
            let now = Instant::now();
            let mut wake_at = match self.successor_due() {
                None => now,
                Some(at) => at,
            };
            if wake_at <= now {
                match self.rotate().await {
                    Ok(()) => continue,
                    Err(_) => wake_at = now + self.retry_interval,
                }
            }
            let degraded = self
                .wrappers
                .iter()
                .any(|r| r.stats.health().0 != RootHealth::Ok);
            if degraded {
                let soon = now + self.retry_interval;
                next_probe = Some(next_probe.map_or(soon, |at| at.min(soon)));
            }
            if let Some(at) = next_probe {
                if at <= now {
                    self.probe_wrappers().await;
                    next_probe = self.probe_interval.map(|i| Instant::now() + i);
                    continue;
                }
                wake_at = wake_at.min(at);
            }
            tokio::select! {
                _ = tokio::time::sleep_until(wake_at) => {}
                _ = self.wake.notified() => {}
            }
        }
    }

    /// Ends [`Keyring::maintain`] (after a reload replaced this keyring, or at shutdown).
    pub fn stop(&self) {
        self.stopped.store(true, Ordering::Release);
        self.wake.notify_one();
    }

    /// Makes a new local KEK wrapped (and proven) by every wrapping root: current if there
    /// is none or it is spent, otherwise the prepared successor.
    async fn rotate(&self) -> Result<(), RootError> {
        let result = self.make_local_kek().await;
        let mut error = self
            .rotation_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        match result {
            Ok(kek) => {
                let mut current = self.current.write().unwrap_or_else(PoisonError::into_inner);
                if current.as_ref().is_none_or(|k| self.spent(k)) {
                    *current = Some(Arc::new(kek.into_current()));
                    tracing::info!(key_id = %self.key_id(), "new local KEK in use");
                } else {
                    *self.prepared.lock().unwrap_or_else(PoisonError::into_inner) = Some(kek);
                    tracing::info!(key_id = %self.key_id(), "successor local KEK prepared");
                }
                *error = None;
                Ok(())
            }
            Err(e) => {
                // Retried every retry interval: log when the reason changes, not each time.
                if error.as_ref().map(ToString::to_string) != Some(e.to_string()) {
                    tracing::error!(key_id = %self.key_id(), error = %e, "cannot make a new local KEK");
                }
                *error = Some(e.clone());
                Err(e)
            }
        }
    }

    async fn make_local_kek(&self) -> Result<Sealer, RootError> {
        let kek = Key256::generate();
        let mut annotations = HashMap::with_capacity(self.wrappers.len());
        let mut ids = Vec::with_capacity(self.wrappers.len());
        for root in &self.wrappers {
            let wrapped = root
                .wrap_checked(&kek)
                .await
                .map_err(|e| name_error(&root.name, root.provider(), e))?;
            ids.push(KekCache::id(root.key_id().as_str(), &wrapped));
            annotations.insert(wrapped_kek_key(root.key_id().as_str()), wrapped);
        }
        if annotations::total_len(&annotations) > MAX_TOTAL_LEN {
            return Err(RootError::new(
                ErrorKind::Misconfigured,
                "wrapped keys exceed kube-apiserver's 32 KiB annotation limit: fewer also_wrap roots",
            ));
        }
        let cipher = Arc::new(KekCipher::new(&kek));
        // The key schedule passed through stack temporaries on its way into the Arc.
        crate::secret::wipe_stack();
        let set = annotations::digest(&annotations);
        self.cache.insert(set, &ids, cipher.clone());
        Ok(Sealer {
            aad: associated_data(self.key_id().as_str(), &set),
            cipher,
            annotations,
        })
    }

    /// Round trips through every wrapping root; failures land in each root's health (and
    /// so in Status, `kms-plugin status`, metrics and, once per change, the log).
    async fn probe_wrappers(&self) {
        for root in &self.wrappers {
            if root.refresh().await {
                self.root_changed.store(true, Ordering::Release);
            }
            let _ = root.probe().await;
        }
    }

    /// True once since a root check found a root's key_id changed at its source (a Vault
    /// Transit key rotated): the plugin then reloads, opening it under its new key_id.
    pub fn take_root_changed(&self) -> bool {
        self.root_changed.swap(false, Ordering::AcqRel)
    }

    /// Whether a copy annotated with `key_id` opens under a configured root.
    pub fn answers_to(&self, key_id: &KeyId) -> bool {
        self.root_by_key_id(key_id.as_str()).is_some()
    }

    /// When the background task has work next: the successor of the current local KEK is
    /// due (`None` = now), or a prepared one must take over when the current one ages out.
    fn successor_due(&self) -> Option<Instant> {
        let kek = self.current()?;
        if self.has_prepared() {
            return Some(kek.created + self.max_age());
        }
        if self.spent(&kek) || kek.encryptions.load(Ordering::Relaxed) >= self.prepare_count() {
            return None;
        }
        let at = kek.created + self.prepare_age();
        (at > Instant::now()).then_some(at)
    }

    /// True once `kek` may seal nothing more.
    fn spent(&self, kek: &LocalKek) -> bool {
        kek.encryptions.load(Ordering::Relaxed) >= self.limits.max_encryptions
            || kek.created.elapsed() >= self.max_age()
    }

    fn has_prepared(&self) -> bool {
        self.prepared
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_some()
    }

    fn current(&self) -> Option<Arc<LocalKek>> {
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Seals after which the successor is made: `prepare_at_percent` of `max_encryptions`,
    /// rounded up, exactly (no overflow: both are bounded at load).
    fn prepare_count(&self) -> u64 {
        let percent = u64::from(self.limits.prepare_at_percent);
        (self.limits.max_encryptions * percent).div_ceil(100).max(1)
    }

    /// Age at which the successor is made.
    fn prepare_age(&self) -> Duration {
        let percent = u64::from(self.limits.prepare_at_percent);
        Duration::from_millis(self.limits.max_age_seconds * 1000 * percent / 100)
    }

    fn max_age(&self) -> Duration {
        Duration::from_secs(self.limits.max_age_seconds)
    }

    /// The root with `key_id`, else one that answers to it (an older Transit version).
    fn root_by_key_id(&self, key_id: &str) -> Option<&Arc<Root>> {
        self.roots
            .iter()
            .find(|r| r.key_id().as_str() == key_id)
            .or_else(|| self.roots.iter().find(|r| r.answers_to(key_id)))
    }

    fn rotation_error(&self) -> Option<RootError> {
        self.rotation_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn rotation_reason(&self) -> String {
        self.rotation_error().map_or_else(
            || "its successor is still being made".into(),
            |e| e.to_string(),
        )
    }

    /// Why an Encrypt would fail right now.
    fn encrypt_blocker(&self) -> String {
        match self.current() {
            None => format!("no local KEK: {}", self.rotation_reason()),
            Some(_) => format!(
                "local KEK used up and no successor: {}",
                self.rotation_reason()
            ),
        }
    }

    fn unhealthy_reason(&self) -> Option<String> {
        let usable = self
            .current()
            .is_some_and(|k| !self.spent(&k) || self.has_prepared());
        if !usable {
            return Some(self.encrypt_blocker());
        }
        // A wrapping root that refuses or is broken cannot wrap the successor: that needs
        // an operator now, not when the current local KEK runs out. A root that is merely
        // unreachable is degraded, not failed (see ../shared/KMSV2.md §8).
        for root in &self.wrappers {
            let (health, error) = root.stats.health();
            if health == RootHealth::Rejected {
                return Some(format!(
                    "{} root key \"{}\" rejected: {error}",
                    root.role.as_str(),
                    root.name
                ));
            }
        }
        self.rotation_error()
            .filter(|e| !e.is_transient())
            .map(|e| format!("cannot make the next local KEK: {e}"))
    }
}

/// Cuts a health reason to [`MAX_HEALTHZ_LEN`] bytes, on a character boundary.
fn short(mut reason: String) -> String {
    if reason.len() > MAX_HEALTHZ_LEN {
        let mut cut = MAX_HEALTHZ_LEN;
        while !reason.is_char_boundary(cut) {
            cut -= 1;
        }
        reason.truncate(cut);
    }
    reason
}

/// Prefixes a root error with the key's name so operators know which key failed.
fn name_error(name: &str, provider: &str, e: RootError) -> RootError {
    e.context(&format!("key \"{name}\" ({provider})"))
}

#[cfg(test)]
mod memory_tests;

/// What [`Keyring::decrypt_cached`] got to.
pub enum Decrypted<'a> {
    /// Opened with a cached local KEK.
    Plaintext(Zeroizing<Vec<u8>>),
    /// Not cached: a root must unwrap a copy first.
    /// Boxed: a miss is rare, and the hit path should not move this much.
    NeedsRoot(Box<RootUnwrap<'a>>),
}

/// The rest of a Decrypt whose local KEK is not cached: one root unwrap (shared with
/// concurrent callers), then the open.
pub struct RootUnwrap<'a> {
    keyring: &'a Keyring,
    candidates: Vec<(&'a Arc<Root>, KeyId, &'a [u8])>,
    set: cache::SetId,
    opening: Opening<'a>,
}

/// What opening the ciphertext needs, whichever way the local KEK was found.
struct Opening<'a> {
    requested: Option<&'a Arc<Root>>,
    aad: AssociatedData,
    ciphertext: &'a [u8],
}

impl Opening<'_> {
    fn open(
        &self,
        cipher: &KekCipher,
        root: &Arc<Root>,
    ) -> Result<Zeroizing<Vec<u8>>, KeyringError> {
        let plaintext =
            cipher
                .open(&self.aad, self.ciphertext)
                .map_err(|e| match self.requested {
                    // The copy came from a configured root but the key_id is not ours: the
                    // key_id is what is wrong.
                    None => KeyringError::UnknownKeyId,
                    Some(_) => KeyringError::Envelope(e),
                })?;
        self.requested.unwrap_or(root).stats.note_decrypt();
        Ok(plaintext)
    }
}

impl RootUnwrap<'_> {
    /// Unwraps a copy (the requested root's first), caches the local KEK and opens.
    pub async fn finish(self: Box<Self>) -> Result<Zeroizing<Vec<u8>>, KeyringError> {
        let Self {
            keyring,
            candidates,
            set,
            opening,
        } = *self;
        let mut failure = None;
        for (root, copy_id, wrapped) in candidates {
            let id = KekCache::id(copy_id.as_str(), wrapped);
            let unwrapped = keyring
                .cache
                .get_or_unwrap(set, id, || async {
                    match root.unwrap_for_decrypt(&copy_id, wrapped).await {
                        Some(key) => key.map(|k| KekCipher::new(&k)),
                        None => Err(RootError::bare(ErrorKind::Throttled)),
                    }
                })
                .await;
            // An unwrap's key schedule passed through stack temporaries (see make_local_kek).
            crate::secret::wipe_stack();
            match unwrapped {
                Ok(cipher) => return opening.open(&cipher, root),
                Err(e) => {
                    // Root health changes are logged by the root itself; a forged or
                    // throttled copy is the caller's doing and must not flood the log.
                    tracing::debug!(root = %root.name, key_id = %root.key_id(), error = %e, "cannot unwrap local KEK");
                    failure = Some(match e.kind() {
                        ErrorKind::NotAuthentic => {
                            KeyringError::Envelope(EnvelopeError::Authentication)
                        }
                        kind => KeyringError::Root {
                            name: root.name.clone(),
                            kind,
                        },
                    });
                }
            }
        }
        Err(failure.unwrap_or(KeyringError::UnknownKeyId))
    }
}

#[cfg(test)]
mod tests;

//! The TOML configuration file, and the embedded default used when there is none.
//!
//! ```toml
//! socket = "/run/kms-plugin/kms.sock"   # or "@name" for an abstract socket
//! [kek]
//! active = "main"
//! [keys.main]
//! provider = "file"
//! path = "/var/lib/kms-plugin/main.key"
//! ```
//!
//! Every table denies unknown fields: a typo is a start-up error, not a silently ignored
//! setting.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::envelope::annotations;
use crate::root;

/// Where the socket lives when neither the config file nor `--socket` names one.
pub const DEFAULT_SOCKET: &str = "/run/kms-plugin/kms.sock";
/// Where the embedded default keeps its root key.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/kms-plugin";
/// File name of the embedded default's root key inside the state directory.
pub const DEFAULT_ROOT_KEY_FILE: &str = "root.key";
/// Name of the embedded default's root key entry.
pub const DEFAULT_KEY_NAME: &str = "default";

/// Why `state_dir` in a config file is refused rather than silently unused.
const STATE_DIR_IN_FILE: &str = "state_dir is only used without --config (the embedded default \
     keeps its root key there); with a config file each [keys.NAME] names its own path: remove \
     state_dir";

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Socket path, or `@name` for a Linux abstract socket.
    #[serde(default)]
    pub socket: Option<String>,
    /// Permission bits of the socket file, as an octal string such as "0600".
    #[serde(default = "default_socket_mode", deserialize_with = "octal_mode")]
    pub socket_mode: u32,
    /// User ids allowed to connect, checked when a connection is accepted (SO_PEERCRED).
    /// Default: anyone who can open the socket file (mode `socket_mode`). Required for an
    /// abstract socket, which has no file mode.
    #[serde(default)]
    pub allowed_uids: Option<Vec<u32>>,
    /// User ids allowed to call the Admin service (Info, Reload), checked per call.
    /// Default: root and the plugin's own user.
    #[serde(default)]
    pub admin_uids: Option<Vec<u32>>,
    /// Most connections open at once; more are closed as soon as they are accepted.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Address for Prometheus metrics over HTTP (`GET /metrics`), e.g. "127.0.0.1:9464";
    /// off when absent. Must be a loopback address unless `metrics_allow_remote`.
    #[serde(default)]
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Allows a non-loopback `metrics_listen` (plain HTTP, no authentication).
    #[serde(default)]
    pub metrics_allow_remote: bool,
    /// Directory of the embedded default's root key (`--state-dir`). A config file names
    /// each key's path itself, so a file that sets `state_dir` is refused, not ignored.
    #[serde(default)]
    pub state_dir: Option<PathBuf>,
    /// The `version` Status reports: "v2" (kube-apiserver 1.29+) or "v2beta1" (1.27, 1.28).
    #[serde(default)]
    pub api_version: ApiVersion,
    /// Which root keys do what.
    pub kek: KekConfig,
    /// The root keys, by name.
    #[serde(deserialize_with = "keys_by_name")]
    pub keys: BTreeMap<String, KeyConfig>,
    /// Lifetime of a local KEK.
    #[serde(default)]
    pub local_kek: LocalKekConfig,
    /// Cache of unwrapped local KEKs.
    #[serde(default)]
    pub cache: CacheConfig,
    /// Background checks of the root keys.
    #[serde(default)]
    pub health: HealthConfig,
}

/// `[kek]`: the roles of the root keys.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KekConfig {
    /// The root key that wraps new local KEKs; its key_id is the one Status reports.
    pub active: String,
    /// Root keys kept for Decrypt only.
    #[serde(default)]
    pub retired: Vec<String>,
    /// Root keys that wrap every new local KEK as well, for disaster recovery.
    #[serde(default)]
    pub also_wrap: Vec<String>,
}

/// `[keys.NAME]`: one root key, by provider. Each variant is the provider's own config
/// type (in `src/root/<provider>/config.rs`); this file knows none of their fields.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "provider", rename_all = "kebab-case")]
pub enum KeyConfig {
    /// A 32-byte key in a file (mode 0600).
    File(root::file::Config),
    /// A symmetric AWS KMS key, by ARN.
    AwsKms(root::aws_kms::Config),
    /// An AES-256 key inside a PKCS#11 token (HSM, SoftHSM2).
    Pkcs11(root::pkcs11::Config),
    /// A HashiCorp Vault / OpenBao Transit key.
    VaultTransit(root::vault_transit::Config),
}

impl KeyConfig {
    /// The provider name as written in the config file.
    pub fn provider(&self) -> &'static str {
        root::provider(self).name()
    }
}

/// Parses `[keys]` entry by entry, so that a provider's error names the entry it is about.
fn keys_by_name<'de, D: serde::Deserializer<'de>>(
    de: D,
) -> Result<BTreeMap<String, KeyConfig>, D::Error> {
    let raw = BTreeMap::<String, toml::Value>::deserialize(de)?;
    raw.into_iter()
        .map(|(name, value)| match KeyConfig::deserialize(value) {
            Ok(key) => Ok((name, key)),
            Err(e) => Err(serde::de::Error::custom(format!("[keys.{name}]: {e}"))),
        })
        .collect()
}

/// `[local_kek]`: when a local KEK is replaced.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LocalKekConfig {
    /// Encryptions under one local KEK before it must be replaced.
    pub max_encryptions: u64,
    /// Seconds a local KEK may be used for Encrypt.
    pub max_age_seconds: u64,
    /// Fraction (percent) of either limit at which the successor is prepared.
    pub prepare_at_percent: u8,
}

impl Default for LocalKekConfig {
    fn default() -> Self {
        // kube-apiserver calls Encrypt only per DEK seed (start-up, key_id change, reload), so
        // counts stay tiny; the count limit is a safety net far below the 2^32 random-nonce
        // bound of AES-GCM. A week of age keeps the number of distinct local KEKs (one root
        // unwrap each after a restart) small, and preparing the successor at 80% leaves more
        // than a day to ride out a root KMS outage before Encrypt would fail.
        Self {
            max_encryptions: 1 << 20,
            max_age_seconds: 7 * 24 * 3600,
            prepare_at_percent: 80,
        }
    }
}

/// `[cache]`: unwrapped local KEKs kept in memory.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    /// Most local KEKs held unwrapped at once (each 32 bytes plus cipher state).
    pub capacity: usize,
    /// Root unwraps per second that Decrypt may cause, per root (cache misses only).
    pub unwraps_per_second: u32,
    /// Root unwraps allowed at once after a quiet period, per root.
    pub unwrap_burst: u32,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            capacity: 1024,
            unwraps_per_second: 10,
            unwrap_burst: 20,
        }
    }
}

/// `[health]`: background checks.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthConfig {
    /// Seconds between round-trip probes of the active root while healthy (0 = never);
    /// each probe is a paid call for a cloud KMS. While degraded it retries every 10 s.
    pub root_check_interval_seconds: u64,
    /// Seconds between retries after a root call failed (making a local KEK, probing).
    pub retry_interval_seconds: u64,
}

impl Default for HealthConfig {
    fn default() -> Self {
        Self {
            root_check_interval_seconds: 3600,
            retry_interval_seconds: 5,
        }
    }
}

/// The KMS API version string Status reports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub enum ApiVersion {
    /// Accepted by kube-apiserver 1.29 and later.
    #[default]
    #[serde(rename = "v2")]
    V2,
    /// The only value kube-apiserver 1.27 and 1.28 accept.
    #[serde(rename = "v2beta1")]
    V2Beta1,
}

impl ApiVersion {
    /// The wire string.
    pub fn as_str(self) -> &'static str {
        match self {
            ApiVersion::V2 => "v2",
            ApiVersion::V2Beta1 => "v2beta1",
        }
    }
}

/// A configuration problem, with the file it came from.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema.
    #[error("config file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message (line, column, field).
        message: String,
    },
    /// The file parsed but its settings contradict each other.
    #[error("config file {path}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
}

/// Where a configuration came from, for messages and `kms-plugin status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A file given by `--config`.
    File(PathBuf),
    /// No file: the embedded default.
    Embedded,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::File(path) => write!(f, "{}", path.display()),
            Source::Embedded => f.write_str("embedded default"),
        }
    }
}

impl Config {
    /// Reads, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text).map_err(|e| e.with_path(path))
    }

    /// Parses and validates config text. Errors carry an empty path; `load` fills it in.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: PathBuf::new(),
            message: e.to_string(),
        })?;
        if config.state_dir.is_some() {
            return Err(ConfigError::Invalid {
                path: PathBuf::new(),
                message: STATE_DIR_IN_FILE.into(),
            });
        }
        config.validate().map_err(|message| ConfigError::Invalid {
            path: PathBuf::new(),
            message,
        })?;
        Ok(config)
    }

    /// The embedded default: one file root key in the state directory.
    pub fn embedded(state_dir: &Path) -> Self {
        let mut keys = BTreeMap::new();
        keys.insert(
            DEFAULT_KEY_NAME.to_string(),
            KeyConfig::File(root::file::Config {
                path: state_dir.join(DEFAULT_ROOT_KEY_FILE),
            }),
        );
        Config {
            socket: None,
            socket_mode: default_socket_mode(),
            allowed_uids: None,
            admin_uids: None,
            max_connections: default_max_connections(),
            metrics_listen: None,
            metrics_allow_remote: false,
            state_dir: Some(state_dir.to_path_buf()),
            api_version: ApiVersion::default(),
            kek: KekConfig {
                active: DEFAULT_KEY_NAME.to_string(),
                retired: Vec::new(),
                also_wrap: Vec::new(),
            },
            keys,
            local_kek: LocalKekConfig::default(),
            cache: CacheConfig::default(),
            health: HealthConfig::default(),
        }
    }

    /// Names of every root key with a role, active first, then also-wrap, then retired.
    pub fn roles(&self) -> impl Iterator<Item = (&str, Role)> {
        std::iter::once((self.kek.active.as_str(), Role::Active))
            .chain(
                self.kek
                    .also_wrap
                    .iter()
                    .map(|n| (n.as_str(), Role::AlsoWrap)),
            )
            .chain(self.kek.retired.iter().map(|n| (n.as_str(), Role::Retired)))
    }

    fn validate(&self) -> Result<(), String> {
        let mut seen = std::collections::BTreeSet::new();
        for (name, _) in self.roles() {
            if !self.keys.contains_key(name) {
                return Err(format!(
                    "[kek] names key \"{name}\", but there is no [keys.{name}]"
                ));
            }
            if !seen.insert(name) {
                return Err(format!("[kek] names key \"{name}\" more than once"));
            }
        }
        // Each wrapping root adds one annotation of at most MAX_WRAPPED_LEN bytes plus a
        // 63-byte key; kube-apiserver refuses annotations over 32 KiB in all.
        let per_copy = annotations::MAX_WRAPPED_LEN + 64;
        if (1 + self.kek.also_wrap.len()) * per_copy > annotations::MAX_TOTAL_LEN {
            return Err(format!(
                "[kek] also_wrap lists {} keys; at most {} fit kube-apiserver's 32 KiB annotation limit",
                self.kek.also_wrap.len(),
                annotations::MAX_TOTAL_LEN / per_copy - 1
            ));
        }
        if self.keys.len() > MAX_KEYS {
            return Err(format!(
                "[keys] has {} entries; at most {MAX_KEYS} are allowed",
                self.keys.len()
            ));
        }
        self.check_bounds()?;
        if let Some(socket) = &self.socket
            && (socket.is_empty() || socket == "@")
        {
            return Err("socket must be a path or @name".into());
        }
        if self.allowed_uids.as_ref().is_some_and(Vec::is_empty) {
            return Err(
                "allowed_uids is empty, so nobody could call; list the callers' uids or remove it"
                    .into(),
            );
        }
        if !(1..=MAX_CONNECTIONS_LIMIT).contains(&self.max_connections) {
            return Err(format!(
                "max_connections must be 1 to {MAX_CONNECTIONS_LIMIT} (each kube-apiserver keeps one)"
            ));
        }
        if let Some(addr) = self.metrics_listen
            && !addr.ip().is_loopback()
            && !self.metrics_allow_remote
        {
            return Err(format!(
                "metrics_listen = \"{addr}\" is not a loopback address: metrics are plain HTTP \
                 without authentication and show key_ids, root health and call rates to anyone \
                 who can reach the port. Use 127.0.0.1 (or ::1), or set \
                 metrics_allow_remote = true if the port is firewalled or meant for a pod IP"
            ));
        }
        Ok(())
    }
}

/// Most `[keys.NAME]` entries: each is opened (and for a retired one, kept) at every load.
pub const MAX_KEYS: usize = 64;
/// Most `allowed_uids` entries.
pub const MAX_ALLOWED_UIDS: usize = 1024;

/// `field` must lie in `range`; the error names the field and the range.
fn in_range<T: PartialOrd + fmt::Display>(
    field: &str,
    value: T,
    range: std::ops::RangeInclusive<T>,
    why: &str,
) -> Result<(), String> {
    if range.contains(&value) {
        return Ok(());
    }
    Err(format!(
        "{field} = {value} is out of range: it must be {} to {}{why}",
        range.start(),
        range.end()
    ))
}

impl Config {
    /// Bounds of every number, so that no later arithmetic (`Instant + Duration`, percent
    /// of a limit) can overflow and nothing grows without limit.
    fn check_bounds(&self) -> Result<(), String> {
        let lk = &self.local_kek;
        // Lower bounds: every local KEK costs each wrapping root a wrap and an unwrap (paid
        // KMS calls), and every one ever made is another unwrap after a restart.
        in_range(
            "[local_kek] max_encryptions",
            lk.max_encryptions,
            MIN_LOCAL_KEK_ENCRYPTIONS..=1 << 32,
            " (fewer would make a new local KEK, and root calls, every few Encrypts; \
             2^32 is the AES-GCM random-nonce bound)",
        )?;
        in_range(
            "[local_kek] max_age_seconds",
            lk.max_age_seconds,
            MIN_LOCAL_KEK_AGE_SECONDS..=MAX_LOCAL_KEK_AGE_SECONDS,
            " (five minutes to one year)",
        )?;
        in_range(
            "[local_kek] prepare_at_percent",
            lk.prepare_at_percent,
            1..=100,
            "",
        )?;
        in_range(
            "[cache] capacity",
            self.cache.capacity,
            1..=MAX_CACHE_CAPACITY,
            "",
        )?;
        in_range(
            "[cache] unwraps_per_second",
            self.cache.unwraps_per_second,
            1..=10_000,
            "",
        )?;
        in_range(
            "[cache] unwrap_burst",
            self.cache.unwrap_burst,
            1..=10_000,
            "",
        )?;
        in_range(
            "[health] root_check_interval_seconds",
            self.health.root_check_interval_seconds,
            0..=MAX_CHECK_INTERVAL_SECONDS,
            " (0 = never; 30 days at most)",
        )?;
        in_range(
            "[health] retry_interval_seconds",
            self.health.retry_interval_seconds,
            1..=MAX_RETRY_INTERVAL_SECONDS,
            "",
        )?;
        if self.socket_mode & !0o777 != 0 {
            return Err(format!(
                "socket_mode = \"{:o}\" must be permission bits from \"0000\" to \"0777\", like \"0600\"",
                self.socket_mode
            ));
        }
        if self.socket_mode & 0o600 != 0o600 {
            return Err(format!(
                "socket_mode = \"{:04o}\" must give the owner read and write (at least \"0600\")",
                self.socket_mode
            ));
        }
        if let Some(uids) = &self.allowed_uids
            && uids.len() > MAX_ALLOWED_UIDS
        {
            return Err(format!(
                "allowed_uids lists {} uids; at most {MAX_ALLOWED_UIDS} are allowed",
                uids.len()
            ));
        }
        Ok(())
    }
}

/// Fewest `[local_kek] max_encryptions`.
pub const MIN_LOCAL_KEK_ENCRYPTIONS: u64 = 1000;
/// Shortest `[local_kek] max_age_seconds`: five minutes.
pub const MIN_LOCAL_KEK_AGE_SECONDS: u64 = 300;
/// Longest `[local_kek] max_age_seconds`: one year.
pub const MAX_LOCAL_KEK_AGE_SECONDS: u64 = 366 * 24 * 3600;
/// Largest `[cache] capacity` (about 1.2 KiB of RSS per cached key, measured by `cargo bench
/// --bench cache_scale`: some 80 MiB when full).
pub const MAX_CACHE_CAPACITY: usize = 65536;
/// Longest `[health] root_check_interval_seconds`: 30 days.
pub const MAX_CHECK_INTERVAL_SECONDS: u64 = 30 * 24 * 3600;
/// Longest `[health] retry_interval_seconds`: one hour.
pub const MAX_RETRY_INTERVAL_SECONDS: u64 = 3600;

/// What a root key is used for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Wraps new local KEKs; its key_id is the Status key_id.
    Active,
    /// Wraps every new local KEK too.
    AlsoWrap,
    /// Decrypt only.
    Retired,
}

impl Role {
    /// The name `kms-plugin status` prints.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Active => "active",
            Role::AlsoWrap => "also-wrap",
            Role::Retired => "retired",
        }
    }
}

impl ConfigError {
    fn with_path(self, file: &Path) -> Self {
        match self {
            ConfigError::Parse { message, .. } => ConfigError::Parse {
                path: file.to_path_buf(),
                message,
            },
            ConfigError::Invalid { message, .. } => ConfigError::Invalid {
                path: file.to_path_buf(),
                message,
            },
            read @ ConfigError::Read { .. } => read,
        }
    }
}

fn default_socket_mode() -> u32 {
    0o600
}

/// Upper bound of `max_connections`: each open connection costs buffers and a descriptor.
pub const MAX_CONNECTIONS_LIMIT: usize = 1024;

fn default_max_connections() -> usize {
    64
}

fn octal_mode<'de, D: serde::Deserializer<'de>>(de: D) -> Result<u32, D::Error> {
    let text = String::deserialize(de)?;
    u32::from_str_radix(text.trim_start_matches("0o"), 8).map_err(|_| {
        serde::de::Error::custom(format!("\"{text}\" is not an octal mode like \"0600\""))
    })
}

/// Parse helpers for the config tests here and in each provider's `config.rs`.
#[cfg(test)]
pub(crate) mod test_support {
    use super::Config;

    /// Parses `text`, which must be valid.
    pub(crate) fn parse(text: &str) -> Config {
        match Config::parse(text) {
            Ok(c) => c,
            Err(e) => panic!("refused: {e}\n{text}"),
        }
    }

    /// The `[keys.NAME]` entry `name` of `text`, which must be valid.
    pub(crate) fn key_entry(text: &str, name: &str) -> super::KeyConfig {
        let mut config = parse(text);
        config
            .keys
            .remove(name)
            .unwrap_or_else(|| panic!("no [keys.{name}] in {text}"))
    }

    /// The error `text` is refused with.
    pub(crate) fn error_of(text: &str) -> String {
        match Config::parse(text) {
            Ok(_) => panic!("accepted: {text}"),
            Err(e) => e.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::test_support::error_of;
    use super::*;

    const MINIMAL: &str = r#"
        socket = "/run/kms-plugin/kms.sock"
        [kek]
        active = "main"
        [keys.main]
        provider = "file"
        path = "/var/lib/kms-plugin/main.key"
    "#;

    #[test]
    fn minimal_config_parses_with_defaults() {
        let c = Config::parse(MINIMAL).expect("valid");
        assert_eq!(c.socket.as_deref(), Some("/run/kms-plugin/kms.sock"));
        assert_eq!(c.socket_mode, 0o600);
        assert_eq!(c.api_version, ApiVersion::V2);
        assert_eq!(c.kek.active, "main");
        assert!(matches!(&c.keys["main"], KeyConfig::File(f) if f.path.ends_with("main.key")));
        assert_eq!(c.local_kek.max_encryptions, 1 << 20);
    }

    #[test]
    fn options_parse() {
        let text = MINIMAL.replace(
            "[kek]",
            "socket_mode = \"0660\"\napi_version = \"v2beta1\"\n[kek]",
        );
        let c = Config::parse(&text).expect("valid");
        assert_eq!(c.socket_mode, 0o660);
        assert_eq!(c.api_version, ApiVersion::V2Beta1);
    }

    #[test]
    fn unknown_fields_are_rejected_everywhere() {
        assert!(error_of(&format!("typo = 1\n{MINIMAL}")).contains("typo"));
        assert!(error_of(&MINIMAL.replace("active", "activ")).contains("activ"));
        assert!(error_of(&format!("{MINIMAL}\nextra = 1")).contains("extra"));
    }

    #[test]
    fn unknown_provider_is_rejected() {
        assert!(error_of(&MINIMAL.replace("\"file\"", "\"vault\"")).contains("vault"));
    }

    #[test]
    fn dangling_and_duplicate_roles_are_rejected() {
        assert!(
            error_of(&MINIMAL.replace("active = \"main\"", "active = \"nope\"")).contains("nope")
        );
        let dup = MINIMAL.replace(
            "active = \"main\"",
            "active = \"main\"\nretired = [\"main\"]",
        );
        assert!(error_of(&dup).contains("more than once"));
    }

    #[test]
    fn caller_settings_parse_and_validate() {
        let c = Config::parse(MINIMAL).expect("valid");
        assert_eq!(c.max_connections, 64);
        assert!(c.admin_uids.is_none() && !c.metrics_allow_remote);
        let text = MINIMAL.replace(
            "[kek]",
            "allowed_uids = [0, 998]\nadmin_uids = [0]\nmax_connections = 8\n\
             metrics_listen = \"127.0.0.1:9464\"\n[kek]",
        );
        let c = Config::parse(&text).expect("valid");
        assert_eq!(c.allowed_uids, Some(vec![0, 998]));
        assert_eq!(c.admin_uids, Some(vec![0]));
        assert_eq!(c.max_connections, 8);
        let with = |extra: &str| MINIMAL.replace("[kek]", &format!("{extra}\n[kek]"));
        assert!(error_of(&with("max_connections = 0")).contains("max_connections"));
        assert!(error_of(&with("max_connections = 100000")).contains("max_connections"));
        assert!(error_of(&with("allowed_uids = []")).contains("nobody"));
        let remote = "metrics_listen = \"0.0.0.0:9464\"";
        let err = error_of(&with(remote));
        assert!(
            err.contains("loopback") && err.contains("metrics_allow_remote"),
            "{err}"
        );
        let allowed = with(&format!("{remote}\nmetrics_allow_remote = true"));
        assert!(
            Config::parse(&allowed)
                .expect("opted in")
                .metrics_allow_remote
        );
        assert!(Config::parse(&with("metrics_listen = \"[::1]:9464\"")).is_ok());
    }

    #[test]
    fn bad_values_are_rejected() {
        assert!(
            error_of(&MINIMAL.replace("[kek]", "socket_mode = \"rw\"\n[kek]")).contains("octal")
        );
        assert!(
            error_of(&format!("{MINIMAL}\n[local_kek]\nmax_encryptions = 0"))
                .contains("max_encryptions")
        );
        assert!(error_of(&format!("{MINIMAL}\n[cache]\ncapacity = 0")).contains("capacity"));
        for bad in [
            "unwraps_per_second = 0",
            "unwrap_burst = 0",
            "unwrap_burst = 10001",
        ] {
            let field = bad.split(' ').next().unwrap_or_default();
            assert!(
                error_of(&format!("{MINIMAL}\n[cache]\n{bad}")).contains(field),
                "{bad}"
            );
        }
        assert!(error_of(&MINIMAL.replace("/run/kms-plugin/kms.sock", "")).contains("socket"));
        assert!(
            error_of("not toml [").contains("TOML") || error_of("not toml [").contains("expected")
        );
    }

    /// Each numeric setting, with the first value out of range on each side.
    #[test]
    fn numbers_out_of_range_are_rejected_with_field_and_range() {
        let cases: &[(&str, &str, &str)] = &[
            ("[local_kek]", "max_encryptions = 0", "1000 to 4294967296"),
            ("[local_kek]", "max_encryptions = 999", "1000 to 4294967296"),
            (
                "[local_kek]",
                "max_encryptions = 4294967297",
                "1000 to 4294967296",
            ),
            ("[local_kek]", "max_age_seconds = 299", "300 to 31622400"),
            (
                "[local_kek]",
                "max_age_seconds = 31622401",
                "300 to 31622400",
            ),
            (
                "[local_kek]",
                "max_age_seconds = 9223372036854775807",
                "300 to 31622400",
            ),
            ("[local_kek]", "prepare_at_percent = 0", "1 to 100"),
            ("[local_kek]", "prepare_at_percent = 101", "1 to 100"),
            ("[cache]", "capacity = 0", "1 to 65536"),
            ("[cache]", "capacity = 65537", "1 to 65536"),
            (
                "[health]",
                "root_check_interval_seconds = 2592001",
                "0 to 2592000",
            ),
            ("[health]", "retry_interval_seconds = 0", "1 to 3600"),
            ("[health]", "retry_interval_seconds = 3601", "1 to 3600"),
        ];
        for (table, line, range) in cases {
            let err = error_of(&format!("{MINIMAL}\n{table}\n{line}"));
            let field = line.split(' ').next().expect("field");
            assert!(
                err.contains(&format!("{table} {field}")) && err.contains(range),
                "{line}: {err}"
            );
        }
        let at_bounds = format!(
            "{MINIMAL}\n[local_kek]\nmax_encryptions = 4294967296\nmax_age_seconds = 31622400\n\
             [cache]\ncapacity = 65536\n[health]\nroot_check_interval_seconds = 0\n\
             retry_interval_seconds = 3600"
        );
        assert!(Config::parse(&at_bounds).is_ok());
        // Too large for the integer type at all: a parse error naming the field, no panic.
        let err = error_of(&format!("{MINIMAL}\n[local_kek]\nprepare_at_percent = 300"));
        assert!(err.contains("prepare_at_percent"), "{err}");
        let err = error_of(&format!("{MINIMAL}\n[cache]\ncapacity = -1"));
        assert!(err.contains("capacity"), "{err}");
    }

    #[test]
    fn socket_mode_and_list_sizes_are_bounded() {
        let mode = |m: &str| MINIMAL.replace("[kek]", &format!("socket_mode = \"{m}\"\n[kek]"));
        assert!(error_of(&mode("1777")).contains("\"0000\" to \"0777\""));
        assert!(error_of(&mode("0400")).contains("owner read and write"));
        assert!(Config::parse(&mode("0660")).is_ok());
        let uids: Vec<String> = (0..=MAX_ALLOWED_UIDS).map(|u| u.to_string()).collect();
        let many = MINIMAL.replace(
            "[kek]",
            &format!("allowed_uids = [{}]\n[kek]", uids.join(",")),
        );
        assert!(error_of(&many).contains("at most 1024"));
        let mut keys = MINIMAL.to_string();
        for i in 0..MAX_KEYS {
            keys.push_str(&format!(
                "\n[keys.k{i}]\nprovider = \"file\"\npath = \"/k{i}\"\n"
            ));
        }
        assert!(error_of(&keys).contains("at most 64"));
    }

    #[test]
    fn too_many_also_wrap_keys_are_rejected() {
        let mut text =
            MINIMAL.replace("active = \"main\"", "active = \"main\"\nalso_wrap = [ALSO]");
        let names: Vec<String> = (0..7).map(|i| format!("k{i}")).collect();
        for name in &names {
            text.push_str(&format!(
                "\n[keys.{name}]\nprovider = \"file\"\npath = \"/{name}\"\n"
            ));
        }
        let list = |n: usize| {
            names[..n]
                .iter()
                .map(|k| format!("\"{k}\""))
                .collect::<Vec<_>>()
                .join(",")
        };
        assert!(Config::parse(&text.replace("ALSO", &list(6))).is_ok());
        assert!(error_of(&text.replace("ALSO", &list(7))).contains("32 KiB"));
    }

    #[test]
    fn state_dir_in_a_file_is_refused_with_the_reason() {
        let text = "state_dir = \"/var/lib/x\"\n[kek]\nactive = \"a\"\n[keys.a]\nprovider = \"file\"\npath = \"/a\"\n";
        let err = Config::parse(text).expect_err("refused").to_string();
        assert!(
            err.contains("state_dir") && err.contains("--config"),
            "{err}"
        );
        assert!(Config::parse(&text.replace("state_dir = \"/var/lib/x\"\n", "")).is_ok());
    }

    #[test]
    fn embedded_default_is_valid() {
        let c = Config::embedded(Path::new("/tmp/state"));
        assert!(c.validate().is_ok());
        assert!(
            matches!(&c.keys[DEFAULT_KEY_NAME], KeyConfig::File(f) if f.path == Path::new("/tmp/state/root.key"))
        );
    }
}

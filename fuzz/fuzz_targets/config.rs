//! The config file parser, validation included: arbitrary text given to `Config::parse`
//! must never panic (a config reload runs in the serving process), and every config it
//! accepts must satisfy what the rest of the plugin relies on.
#![no_main]

use std::time::{Duration, Instant};

use kms_plugin::config::{
    Config, KeyConfig, MAX_CACHE_CAPACITY, MAX_CHECK_INTERVAL_SECONDS, MAX_KEYS,
    MAX_LOCAL_KEK_AGE_SECONDS, MAX_RETRY_INTERVAL_SECONDS, Role,
};
use kms_plugin::root::pkcs11;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let config = match Config::parse(text) {
        Ok(config) => config,
        Err(e) => {
            assert!(!e.to_string().is_empty());
            return;
        }
    };

    // Every role names a configured key, once; the active key comes first.
    let roles: Vec<(&str, Role)> = config.roles().collect();
    assert_eq!(
        roles.first(),
        Some(&(config.kek.active.as_str(), Role::Active))
    );
    for (i, (name, _)) in roles.iter().enumerate() {
        assert!(
            config.keys.contains_key(*name),
            "role names missing key {name:?}"
        );
        assert!(
            roles[..i].iter().all(|(other, _)| other != name),
            "{name:?} has two roles"
        );
    }
    for key in config.keys.values() {
        if let KeyConfig::Pkcs11(p) = key {
            // Parsing went through the provider's checks: running them again agrees.
            assert!(pkcs11::Config::new(pkcs11::config::Fields::clone(p)).is_ok());
            assert!(!p.token_name().is_empty());
        }
        if let KeyConfig::AwsKms(a) = key {
            assert!(a.attempt_timeout_ms <= a.timeout_ms);
        }
    }
    // Every number within its published bounds, so later arithmetic cannot overflow.
    assert!(config.keys.len() <= MAX_KEYS);
    let cache = &config.cache;
    assert!((1..=MAX_CACHE_CAPACITY).contains(&cache.capacity));
    assert!(cache.unwraps_per_second >= 1 && cache.unwrap_burst >= 1);
    let lk = &config.local_kek;
    assert!(lk.max_encryptions >= 1 && lk.max_encryptions <= 1 << 32);
    assert!((1..=MAX_LOCAL_KEK_AGE_SECONDS).contains(&lk.max_age_seconds));
    assert!((1..=100).contains(&lk.prepare_at_percent));
    let health = &config.health;
    assert!(health.root_check_interval_seconds <= MAX_CHECK_INTERVAL_SECONDS);
    assert!((1..=MAX_RETRY_INTERVAL_SECONDS).contains(&health.retry_interval_seconds));
    let now = Instant::now();
    for seconds in [
        lk.max_age_seconds,
        health.root_check_interval_seconds,
        health.retry_interval_seconds,
    ] {
        assert!(now.checked_add(Duration::from_secs(seconds)).is_some());
    }
    assert_eq!(config.socket_mode & !0o777, 0);
    assert_eq!(config.socket_mode & 0o600, 0o600);
    assert!(
        config
            .socket
            .as_deref()
            .is_none_or(|s| !s.is_empty() && s != "@")
    );

    // Parsing is deterministic.
    let again = Config::parse(text).map(|c| format!("{c:?}"));
    assert_eq!(again.ok(), Some(format!("{config:?}")));
});

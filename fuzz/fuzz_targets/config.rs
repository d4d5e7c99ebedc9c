//! The config file parser, validation included: arbitrary text given to `Config::parse`
//! must never panic (a config reload runs in the serving process), and every config it
//! accepts must satisfy what the rest of the plugin relies on.
#![no_main]

use kms_plugin::config::{Config, KeyConfig, Role};
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
            assert!(p.validate().is_ok());
            assert!(!p.token_name().is_empty());
        }
        if let KeyConfig::AwsKms(a) = key {
            assert!(a.attempt_timeout_ms <= a.timeout_ms);
        }
    }
    assert!(config.cache.capacity >= 1);
    let lk = &config.local_kek;
    assert!(lk.max_encryptions >= 1 && lk.max_encryptions <= 1 << 32);
    assert!(lk.max_age_seconds >= 1);
    assert!((1..=100).contains(&lk.prepare_at_percent));
    assert_eq!(config.socket_mode & !0o777, 0);
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

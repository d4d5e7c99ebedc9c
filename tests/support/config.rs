//! Configuration files, sockets and environments for the plugin under test.

use std::path::{Path, PathBuf};

use super::keygen;

/// Writes a config file for one or more root keys and returns its path.
/// `keys` are `(name, body)` pairs; `body` is the TOML under `[keys.NAME]`.
pub fn write_config(
    dir: &Path,
    socket: &str,
    active: &str,
    keys: &[(&str, String)],
    extra: &str,
) -> PathBuf {
    let mut text = format!("socket = \"{socket}\"\n{extra}\n[kek]\nactive = \"{active}\"\n");
    for (name, body) in keys {
        text.push_str(&format!("\n[keys.{name}]\n{body}\n"));
    }
    let path = dir.join("config.toml");
    std::fs::write(&path, text).expect("write config");
    path
}

/// Dummy AWS credentials and no host credential sources: for a plugin whose AWS KMS endpoint
/// is a test address (no emulator needed).
pub fn aws_offline_env() -> Vec<(String, String)> {
    [
        ("AWS_ACCESS_KEY_ID", "testing"),
        ("AWS_SECRET_ACCESS_KEY", "testing"),
        ("AWS_CONFIG_FILE", "/nonexistent"),
        ("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent"),
        ("AWS_EC2_METADATA_DISABLED", "true"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

/// A socket path inside `dir`.
pub fn socket_in(dir: &Path) -> String {
    dir.join("run/kms.sock").to_string_lossy().into_owned()
}

/// This process's uid (the tests run as root in CI, but need not).
pub fn my_uid() -> u32 {
    // SAFETY: getuid(2) cannot fail and touches no memory.
    unsafe { libc::getuid() }
}

/// A config file with one new file root key "main" in `dir`, `extra` top-level settings and
/// the given socket; returns its path.
pub fn file_root_config(dir: &Path, socket: &str, extra: &str) -> String {
    let key = dir.join("main.key").to_string_lossy().into_owned();
    let body = format!("provider = \"file\"\npath = \"{key}\"");
    let config = write_config(dir, socket, "main", &[("main", body)], extra);
    keygen(&config, "main", &[]);
    config.to_string_lossy().into_owned()
}

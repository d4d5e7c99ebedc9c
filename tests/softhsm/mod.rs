//! SoftHSM2 tokens for the pkcs11 tests. Each `SoftHsm` has its own config and token
//! directory; the plugin under test gets `SOFTHSM2_CONF` through its environment, so this
//! test process never initialises SoftHSM itself. Missing SoftHSM is a failure, not a skip.

#![allow(dead_code)] // each test binary uses a different part

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

/// The user PIN of every test token; distinctive, so tests can check it never leaks.
pub const PIN: &str = "pin-Zq7x9Wk";
pub const SO_PIN: &str = "so-4471";

pub struct SoftHsm {
    dir: tempfile::TempDir,
    conf: PathBuf,
    next: AtomicU32,
}

/// The SoftHSM2 module path, or a panic saying how to get it.
pub fn module() -> PathBuf {
    if let Ok(path) = std::env::var("SOFTHSM2_MODULE") {
        return PathBuf::from(path);
    }
    [
        "/usr/lib/softhsm/libsofthsm2.so",
        "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
        "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
        "/usr/local/lib/softhsm/libsofthsm2.so",
    ]
    .iter()
    .map(PathBuf::from)
    .find(|p| p.exists())
    .unwrap_or_else(|| {
        panic!(
            "libsofthsm2.so not found: install softhsm2 (apt-get install softhsm2) or set SOFTHSM2_MODULE"
        )
    })
}

impl SoftHsm {
    /// A fresh, empty token directory with its own softhsm2.conf.
    pub fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("softhsm")
            .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
            .expect("tempdir");
        let tokens = dir.path().join("tokens");
        std::fs::create_dir(&tokens).expect("token dir");
        let conf = dir.path().join("softhsm2.conf");
        std::fs::write(
            &conf,
            format!(
                "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
                tokens.display()
            ),
        )
        .expect("softhsm2.conf");
        Self {
            dir,
            conf,
            next: AtomicU32::new(0),
        }
    }

    /// The environment a process needs to see these tokens.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![(
            "SOFTHSM2_CONF".into(),
            self.conf.to_string_lossy().into_owned(),
        )]
    }

    /// Initialises a new token labelled `label` with [`PIN`].
    pub fn init_token(&self, label: &str) {
        let out = Command::new("softhsm2-util")
            .args([
                "--init-token",
                "--free",
                "--label",
                label,
                "--so-pin",
                SO_PIN,
                "--pin",
                PIN,
            ])
            .envs(self.env())
            .output()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run softhsm2-util ({e}): install softhsm2 (apt-get install softhsm2)"
                )
            });
        assert!(
            out.status.success(),
            "softhsm2-util --init-token failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// A new token with a unique label.
    pub fn new_token(&self) -> String {
        let label = format!("kms-{}", self.next.fetch_add(1, Ordering::Relaxed));
        self.init_token(&label);
        label
    }

    /// Writes `pin` to a file in `dir` the way an operator would (`echo PIN > file`).
    pub fn pin_file(&self, dir: &Path, pin: &str) -> PathBuf {
        let path = dir.join(format!("pin-{}", self.next.fetch_add(1, Ordering::Relaxed)));
        std::fs::write(&path, format!("{pin}\n")).expect("pin file");
        path
    }
}

/// The TOML body of a `[keys.NAME]` entry for key `key_label` on token `token`.
pub fn key_body(token: &str, key_label: &str, pin_file: &Path) -> String {
    format!(
        "provider = \"pkcs11\"\nmodule = \"{}\"\ntoken_label = \"{token}\"\nkey_label = \"{key_label}\"\npin_file = \"{}\"",
        module().display(),
        pin_file.display()
    )
}

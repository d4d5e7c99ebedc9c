//! SoftHSM2 tokens for the pkcs11 tests. Each `SoftHsm` has its own config and token
//! directory; the plugin under test gets `SOFTHSM2_CONF` through its environment, so this
//! test process never initialises SoftHSM itself. Missing SoftHSM is a failure, not a skip.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};

// std-only parts shared with the library's unit tests.
#[path = "softhsm_token.rs"]
pub mod token;
pub use token::module;

/// The user PIN of every test token; distinctive, so tests can check it never leaks.
pub const PIN: &str = "pin-Zq7x9Wk";
pub const SO_PIN: &str = "so-4471";

pub struct SoftHsm {
    dir: tempfile::TempDir,
    conf: PathBuf,
    next: AtomicU32,
}

impl SoftHsm {
    /// A fresh, empty token directory with its own softhsm2.conf.
    pub fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("softhsm")
            .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
            .expect("tempdir");
        let conf = token::write_conf(dir.path());
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
        token::init_token(&self.conf, label, SO_PIN, PIN);
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

/// What the FIPS-like test module (`fips_shim.c`) does on top of SoftHSM2.
#[derive(Default)]
pub struct Fips {
    /// Refuse CKM_AES_ECB, as some HSMs' FIPS mode does.
    pub refuse_ecb: bool,
    /// Hang in C_Encrypt and C_Decrypt while this file exists.
    pub stall_file: Option<PathBuf>,
}

impl Fips {
    /// The environment the plugin process (which loads the module) needs.
    pub fn env(&self) -> Vec<(String, String)> {
        let mut env = vec![(
            "FIPS_SHIM_TARGET".to_string(),
            module().to_string_lossy().into_owned(),
        )];
        if self.refuse_ecb {
            env.push(("FIPS_SHIM_REFUSE_ECB".into(), "1".into()));
        }
        if let Some(path) = &self.stall_file {
            env.push((
                "FIPS_SHIM_STALL_FILE".into(),
                path.to_string_lossy().into_owned(),
            ));
        }
        env
    }
}

/// Where Debian's libp11-kit-dev puts the PKCS#11 header the shim is built against.
const PKCS11_HEADER_DIR: &str = "/usr/include/p11-kit-1/p11-kit";

/// A PKCS#11 module that forwards to SoftHSM2 but behaves like a FIPS HSM: it writes its
/// own random IV into CK_GCM_PARAMS.pIv, and, as [`Fips`] says, refuses ECB or hangs.
/// Compiled from `fips_shim.c` once per test process; a missing compiler or header is a
/// failure naming the package to install.
pub fn fips_module() -> PathBuf {
    static SHIM: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    let (_, path) = SHIM.get_or_init(|| {
        assert!(
            Path::new(PKCS11_HEADER_DIR).join("pkcs11.h").exists(),
            "{PKCS11_HEADER_DIR}/pkcs11.h not found: install libp11-kit-dev (apt-get install libp11-kit-dev)"
        );
        let dir = tempfile::Builder::new()
            .prefix("fips-shim")
            .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
            .expect("tempdir");
        let out = dir.path().join("libfips_shim.so");
        let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/fips_shim.c");
        let built = Command::new("cc")
            .args(["-shared", "-fPIC", "-O1", "-Wall", "-Werror", "-I", PKCS11_HEADER_DIR])
            .arg("-o")
            .arg(&out)
            .arg(&source)
            .output()
            .unwrap_or_else(|e| panic!("cannot run cc ({e}): install gcc (apt-get install gcc)"));
        assert!(
            built.status.success(),
            "cc {} failed:\n{}",
            source.display(),
            String::from_utf8_lossy(&built.stderr)
        );
        (dir, out)
    });
    path.clone()
}

/// Like [`key_body`], for the key seen through `module` (e.g. [`fips_module`]), with extra
/// TOML lines (`timeout_ms = ...`).
pub fn key_body_via(
    module: &Path,
    token: &str,
    key_label: &str,
    pin_file: &Path,
    extra: &str,
) -> String {
    format!(
        "provider = \"pkcs11\"\nmodule = \"{}\"\ntoken_label = \"{token}\"\nkey_label = \"{key_label}\"\npin_file = \"{}\"\n{extra}",
        module.display(),
        pin_file.display()
    )
}

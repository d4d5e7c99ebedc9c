//! Finding SoftHSM2 and making its tokens: std only, so that both the integration tests
//! (`support::softhsm`) and the library's unit tests (`src/root/pkcs11/tests.rs`, through
//! `#[path]`) use this one copy. Missing SoftHSM is a failure naming the package, not a skip.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The SoftHSM2 module path (`SOFTHSM2_MODULE`, or where distributions put it), or a panic
/// saying how to get it.
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

/// Writes a softhsm2.conf in `dir` whose tokens live in `dir/tokens` (made if missing);
/// returns its path.
pub fn write_conf(dir: &Path) -> PathBuf {
    let tokens = dir.join("tokens");
    std::fs::create_dir_all(&tokens).expect("token dir");
    let conf = dir.join("softhsm2.conf");
    std::fs::write(
        &conf,
        format!(
            "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
            tokens.display()
        ),
    )
    .expect("softhsm2.conf");
    conf
}

/// Initialises a new token labelled `label` in the first free slot of the tokens `conf`
/// describes.
pub fn init_token(conf: &Path, label: &str, so_pin: &str, pin: &str) {
    // Two `--init-token --free` at once in one token directory can pick the same free
    // slot ("Could not get info about the token in slot 0"): one at a time per process.
    static INIT: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = INIT
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let out = Command::new("softhsm2-util")
        .args([
            "--init-token",
            "--free",
            "--label",
            label,
            "--so-pin",
            so_pin,
            "--pin",
            pin,
        ])
        .env("SOFTHSM2_CONF", conf)
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run softhsm2-util ({e}): install softhsm2 (apt-get install softhsm2)")
        });
    assert!(
        out.status.success(),
        "softhsm2-util --init-token failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

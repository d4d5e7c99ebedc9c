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
    // softhsm2-util 2.6 reads every token's info to pick a free slot and again, after
    // C_InitToken and C_InitPIN, to report the token's new slot. A token that another
    // process (a parallel test's keygen) is writing at that moment can fail to load, and
    // the tool then exits with this error, before or after it made the token. So on this
    // error look for the label: made means done (a retry would make a second token with
    // the same label), absent means try again. Any other failure is final.
    const SCAN_RACE: &str = "Could not get info about the token in slot";
    for attempt in 1..=5 {
        let out = softhsm2_util(
            conf,
            &[
                "--init-token",
                "--free",
                "--label",
                label,
                "--so-pin",
                so_pin,
                "--pin",
                pin,
            ],
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        if out.status.success() {
            return;
        }
        assert!(
            stderr.contains(SCAN_RACE),
            "softhsm2-util --init-token failed: {stderr}"
        );
        match user_pin_set(conf, label) {
            Some(true) => return,
            Some(false) => panic!("token {label} was made without its user PIN: {stderr}"),
            None => std::thread::sleep(std::time::Duration::from_millis(50 * attempt)),
        }
    }
    panic!("softhsm2-util --init-token kept failing to read the other tokens in {conf:?}");
}

/// Whether the token labelled `label` has its user PIN set; `None` if there is no such
/// token. `--show-slots` skips a token it cannot read, and nobody else writes a token
/// this process is making, so the answer for `label` is reliable.
fn user_pin_set(conf: &Path, label: &str) -> Option<bool> {
    let out = softhsm2_util(conf, &["--show-slots"]);
    let listing = String::from_utf8_lossy(&out.stdout);
    listing.split("\nSlot ").find_map(|slot| {
        let field = |name: &str| {
            slot.lines()
                .find_map(|line| line.trim().strip_prefix(name))
                .map(str::trim)
        };
        (field("Label:") == Some(label)).then(|| field("User PIN init.:") == Some("yes"))
    })
}

fn softhsm2_util(conf: &Path, args: &[&str]) -> std::process::Output {
    Command::new("softhsm2-util")
        .args(args)
        .env("SOFTHSM2_CONF", conf)
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run softhsm2-util ({e}): install softhsm2 (apt-get install softhsm2)")
        })
}

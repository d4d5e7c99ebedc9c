//! A software TPM 2.0 for the tests: Debian's `swtpm` on loopback TCP, `tpm2-abrmd` in
//! front of it as the resource manager (on a private D-Bus session bus), and a tpm2-pkcs11
//! token store, all in one temp directory and killed on drop.
//!
//! The resource manager matters: without one (direct `swtpm:` TCTI), a plugin killed with
//! -9 leaves its transient objects loaded and swtpm's three object slots fill up ("out of
//! memory for object contexts"). tpm2-abrmd flushes a client's objects when it goes away,
//! as the kernel's /dev/tpmrm0 does on a real node.

use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// tpm2-pkcs11 as Debian installs it (libtpm2-pkcs11-1).
pub const MODULE: &str = "/usr/lib/x86_64-linux-gnu/pkcs11/libtpm2_pkcs11.so";
/// The user PIN of every test token; distinctive, so tests can check it never leaks.
pub const PIN: &str = "tpm-pin-Rk4v";
const SO_PIN: &str = "tpm-so-8812";
const PACKAGES: &str = "apt-get install swtpm swtpm-tools tpm2-tools tpm2-abrmd libtpm2-pkcs11-1 libtpm2-pkcs11-tools dbus";

pub struct SwTpm {
    dir: tempfile::TempDir,
    /// swtpm, tpm2-abrmd, dbus-daemon: killed in reverse order on drop.
    children: Vec<Child>,
    port: u16,
    next: AtomicU32,
}

/// Starts `command`, its output going to `<dir>/<what>.log` for failure messages.
fn spawn(dir: &Path, command: &mut Command, what: &str) -> Child {
    let log = std::fs::File::create(dir.join(format!("{what}.log"))).expect("log file");
    command
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log file"))
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {what} ({e}): {PACKAGES}"))
}

/// The logs of the daemons, for failure messages.
fn logs(dir: &Path) -> String {
    ["swtpm", "dbus-daemon", "tpm2-abrmd"]
        .iter()
        .map(|what| {
            let text = std::fs::read_to_string(dir.join(format!("{what}.log"))).unwrap_or_default();
            format!("--- {what}:\n{text}")
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Copies the files of `from` into a new directory `to`, leaving out swtpm's lock file.
fn copy_files(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in std::fs::read_dir(from).expect("read TPM dir") {
        let entry = entry.expect("dir entry");
        if entry.file_type().expect("file type").is_file() && entry.file_name() != ".lock" {
            std::fs::copy(entry.path(), to.join(entry.file_name())).expect("copy TPM file");
        }
    }
}

fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// Polls `ready` every 50 ms for up to `limit`, failing with `what` and the daemons' logs.
fn wait(dir: &Path, what: &str, limit: Duration, mut ready: impl FnMut() -> bool) {
    let start = Instant::now();
    while !ready() {
        assert!(
            start.elapsed() < limit,
            "{what} not ready after {limit:?}\n{}",
            logs(dir)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

impl SwTpm {
    /// A fresh TPM with an initialised tpm2-pkcs11 store (no token yet).
    pub fn start() -> Self {
        let tpm = Self::boot_on(|dir| {
            for sub in ["state", "store"] {
                std::fs::create_dir(dir.join(sub)).expect("mkdir");
            }
        });
        tpm.ptool(&["init"]);
        tpm
    }

    /// A TPM booted on copies of the state and store [`SwTpm::save`] wrote to `from`: the
    /// same seeds, persistent primary key and tokens (an upgrade test's recorded TPM).
    pub fn restore(from: &Path) -> Self {
        Self::boot_on(|dir| {
            for sub in ["state", "store"] {
                copy_files(&from.join(sub), &dir.join(sub));
            }
        })
    }

    /// Boots the TPM and its daemons in a new directory that `fill` gives its `state` and
    /// `store`.
    fn boot_on(fill: impl FnOnce(&Path)) -> Self {
        assert!(Path::new(MODULE).exists(), "{MODULE} not found: {PACKAGES}");
        let dir = tempfile::Builder::new()
            .prefix("swtpm")
            .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
            .expect("tempdir");
        fill(dir.path());
        let mut tpm = Self {
            dir,
            children: Vec::new(),
            port: 0,
            next: AtomicU32::new(0),
        };
        tpm.boot();
        tpm
    }

    /// Copies the TPM's persistent state (swtpm's state directory) and the tpm2-pkcs11
    /// store to `to/state` and `to/store`. Call after [`SwTpm::stop`]: swtpm writes its
    /// permanent state as it changes, so nothing is lost by killing it first.
    pub fn save(&self, to: &Path) {
        for sub in ["state", "store"] {
            copy_files(&self.dir.path().join(sub), &to.join(sub));
        }
    }

    /// Starts swtpm (on the existing state), D-Bus and tpm2-abrmd.
    fn boot(&mut self) {
        let state = self.dir.path().join("state");
        let bus = self.dir.path().join("bus");
        let _ = std::fs::remove_file(&bus);
        // swtpm cannot listen on a kernel-chosen port: take free ones, retry on a race.
        let mut attempts = 0;
        let swtpm = loop {
            attempts += 1;
            // The swtpm TCTI expects the control port right after the server port.
            let port = free_port();
            let ctrl = port.wrapping_add(1);
            if ctrl == 0 || TcpListener::bind((Ipv4Addr::LOCALHOST, ctrl)).is_err() {
                continue;
            }
            let mut child = spawn(
                self.dir.path(),
                Command::new("swtpm")
                    .args(["socket", "--tpm2", "--tpmstate"])
                    .arg(format!("dir={}", state.display()))
                    .args([
                        "--server",
                        &format!("type=tcp,port={port},bindaddr=127.0.0.1"),
                    ])
                    .args([
                        "--ctrl",
                        &format!("type=tcp,port={ctrl},bindaddr=127.0.0.1"),
                    ])
                    .args(["--flags", "not-need-init,startup-clear"]),
                "swtpm",
            );
            let start = Instant::now();
            let up = loop {
                if let Ok(Some(_)) = child.try_wait() {
                    break false;
                }
                if std::net::TcpStream::connect((Ipv4Addr::LOCALHOST, port)).is_ok() {
                    break true;
                }
                assert!(
                    start.elapsed() < Duration::from_secs(10),
                    "swtpm does not listen"
                );
                std::thread::sleep(Duration::from_millis(20));
            };
            if up {
                self.port = port;
                break child;
            }
            assert!(attempts < 5, "swtpm exited 5 times (port races?)");
        };
        self.children.push(swtpm);
        // A private session bus: tpm2-abrmd registers a well-known name on it.
        self.children.push(spawn(
            self.dir.path(),
            Command::new("dbus-daemon")
                .args(["--session", "--nofork", "--nopidfile"])
                .arg(format!("--address=unix:path={}", bus.display())),
            "dbus-daemon",
        ));
        wait(
            self.dir.path(),
            "dbus-daemon",
            Duration::from_secs(10),
            || bus.exists(),
        );
        // --allow-root: the test machine runs as root; --flush-all: a restarted TPM may
        // hold objects of a resource manager that was killed.
        self.children.push(spawn(
            self.dir.path(),
            Command::new("tpm2-abrmd")
                .args(["--session", "--allow-root", "--flush-all"])
                .arg(format!("--tcti=swtpm:host=127.0.0.1,port={}", self.port))
                .env("DBUS_SESSION_BUS_ADDRESS", self.bus_address()),
            "tpm2-abrmd",
        ));
        let env = self.env();
        wait(
            self.dir.path(),
            "tpm2-abrmd",
            Duration::from_secs(20),
            || {
                Command::new("tpm2_getcap")
                    .arg("properties-fixed")
                    .envs(env.iter().cloned())
                    .env("TPM2TOOLS_TCTI", "tabrmd:bus_type=session")
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .unwrap_or_else(|e| panic!("cannot run tpm2_getcap ({e}): {PACKAGES}"))
                    .success()
            },
        );
    }

    /// Stops everything without saving state, as a power cut would, and boots again on the
    /// same TPM state and token store.
    pub fn reboot(&mut self) {
        self.stop();
        self.boot();
    }

    /// Boots again after [`SwTpm::stop`].
    pub fn start_again(&mut self) {
        self.boot();
    }

    /// Kills swtpm, tpm2-abrmd and D-Bus: the TPM is gone until [`SwTpm::start_again`].
    pub fn stop(&mut self) {
        while let Some(mut child) = self.children.pop() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn bus_address(&self) -> String {
        format!("unix:path={}", self.dir.path().join("bus").display())
    }

    /// The environment a process needs to reach this TPM through tpm2-pkcs11.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            ("DBUS_SESSION_BUS_ADDRESS".into(), self.bus_address()),
            ("TPM2_PKCS11_TCTI".into(), "tabrmd:bus_type=session".into()),
            (
                "TPM2_PKCS11_STORE".into(),
                self.dir.path().join("store").to_string_lossy().into_owned(),
            ),
        ]
    }

    fn ptool(&self, args: &[&str]) {
        let store = self.dir.path().join("store");
        let out = Command::new("tpm2_ptool")
            .args(args)
            .arg(format!("--path={}", store.display()))
            .envs(self.env())
            .env("TPM2TOOLS_TCTI", "tabrmd:bus_type=session")
            .output()
            .unwrap_or_else(|e| panic!("cannot run tpm2_ptool ({e}): {PACKAGES}"));
        assert!(
            out.status.success(),
            "tpm2_ptool {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// A new token with a unique label and [`PIN`], as an operator makes one.
    pub fn new_token(&self) -> String {
        let label = format!("tpm-{}", self.next.fetch_add(1, Ordering::Relaxed));
        self.add_token(&label);
        label
    }

    /// A new token labelled `label`, with [`PIN`].
    pub fn add_token(&self, label: &str) {
        self.ptool(&[
            "addtoken",
            "--pid=1",
            &format!("--label={label}"),
            &format!("--userpin={PIN}"),
            &format!("--sopin={SO_PIN}"),
        ]);
    }

    /// Writes the PIN to a file in `dir` the way an operator would.
    pub fn pin_file(&self, dir: &Path) -> PathBuf {
        let path = dir.join(format!(
            "tpm-pin-{}",
            self.next.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::write(&path, format!("{PIN}\n")).expect("pin file");
        path
    }

    /// Runs pkcs11-tool on this TPM's store (to destroy keys behind the plugin's back).
    pub fn pkcs11_tool(&self, args: &[&str]) -> std::process::Output {
        Command::new("pkcs11-tool")
            .args(["--module", MODULE])
            .args(args)
            .envs(self.env())
            .output()
            .expect("run pkcs11-tool (apt-get install opensc)")
    }
}

impl Drop for SwTpm {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The TOML body of an rsa-oaep `[keys.NAME]` entry for the pair `key_label` on `token`.
/// 2048 bits: what every TPM generates, and quick on swtpm.
pub fn key_body(token: &str, key_label: &str, pin_file: &Path) -> String {
    format!(
        "provider = \"pkcs11\"\nmodule = \"{MODULE}\"\ntoken_label = \"{token}\"\nkey_label = \"{key_label}\"\npin_file = \"{}\"\nmechanism = \"rsa-oaep\"\nrsa_bits = 2048",
        pin_file.display()
    )
}

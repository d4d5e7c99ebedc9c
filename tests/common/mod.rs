//! Test harness: runs the real `kms-plugin` binary on a real Unix socket and talks to it
//! with a real tonic client.
#![allow(unsafe_code)] // tests drive processes and limits through libc (kill, pipe, rlimit, getuid)
#![allow(dead_code)] // each test binary uses a different part of the harness

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use kms_plugin::proto::admin::{InfoRequest, InfoResponse, RootInfo};
use kms_plugin::proto::v2::key_management_service_client::KeyManagementServiceClient;
use kms_plugin::proto::v2::{
    DecryptRequest, EncryptRequest, EncryptResponse, StatusRequest, StatusResponse,
};
use tonic::transport::Channel;

pub const BIN: &str = env!("CARGO_BIN_EXE_kms-plugin");

/// A running plugin process. Killed on drop.
pub struct Plugin {
    child: Option<Child>,
    pub socket: String,
    args: Vec<String>,
    env: Vec<(String, String)>,
    log: PathBuf,
    runs: u32,
    /// The test saw the current run exit (kill9, wait_exit): a restart is expected.
    exit_awaited: bool,
}

impl Plugin {
    /// Starts `kms-plugin serve <args>` with `env`, logging to `<log_dir>/plugin-N.log`,
    /// and waits until Status answers.
    pub async fn start(
        socket: &str,
        args: &[&str],
        env: &[(String, String)],
        log_dir: &Path,
    ) -> Self {
        let mut plugin = Self::spawn(socket, args, env, log_dir);
        plugin.wait_ready().await;
        plugin
    }

    /// `kms-plugin serve --socket S --state-dir <dir>/state`: the embedded default.
    pub async fn embedded(dir: &Path, socket: &str) -> Self {
        let state = dir.join("state").to_string_lossy().into_owned();
        Self::start(
            socket,
            &["--socket", socket, "--state-dir", &state],
            &[],
            dir,
        )
        .await
    }

    /// Starts the process without waiting for it.
    pub fn spawn(socket: &str, args: &[&str], env: &[(String, String)], log_dir: &Path) -> Self {
        let mut plugin = Plugin {
            child: None,
            socket: socket.to_string(),
            args: args.iter().map(std::string::ToString::to_string).collect(),
            env: env.to_vec(),
            log: log_dir.to_path_buf(),
            runs: 0,
            exit_awaited: false,
        };
        plugin.launch();
        plugin
    }

    fn launch(&mut self) {
        self.runs += 1;
        self.exit_awaited = false;
        let log = std::fs::File::create(self.log_path()).expect("log file");
        let child = Command::new(BIN)
            .arg("serve")
            .args(&self.args)
            .envs(self.env.iter().cloned())
            .env("KMS_PLUGIN_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log file"))
            .stderr(log)
            .spawn()
            .expect("spawn kms-plugin");
        self.child = Some(child);
    }

    fn log_path(&self) -> PathBuf {
        self.log.join(format!("plugin-{}.log", self.runs))
    }

    /// Everything the current run wrote to stdout and stderr.
    pub fn output(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Polls until Status answers (or the process dies, which fails the test).
    pub async fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.try_wait() {
                panic!(
                    "kms-plugin exited with {status} before becoming ready:\n{}",
                    self.output()
                );
            }
            if let Ok(Ok(mut client)) =
                tokio::time::timeout(Duration::from_secs(2), connect(&self.socket)).await
                && client.status(StatusRequest {}).await.is_ok()
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "kms-plugin not ready after 30 s:\n{}",
                self.output()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A fresh client connection.
    pub async fn client(&self) -> KeyManagementServiceClient<Channel> {
        connect(&self.socket).await.expect("connect to plugin")
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Waits until the current run's output contains `text` (for plugins whose Status this
    /// test may not call).
    pub async fn wait_for_output(&mut self, text: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.output().contains(text) {
            assert!(self.try_wait().is_none(), "exited:\n{}", self.output());
            assert!(
                Instant::now() < deadline,
                "no `{text}` in:\n{}",
                self.output()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The process's exit status if it has exited.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().expect("try_wait"))
    }

    /// Sends a signal to the process.
    pub fn signal(&self, signal: i32) {
        if let Some(child) = &self.child {
            // SAFETY: kill(2) on our own child's pid has no memory-safety preconditions.
            let rc = unsafe { libc::kill(child.id() as i32, signal) };
            assert_eq!(rc, 0, "kill failed");
        }
    }

    /// SIGKILL: a crash, leaving the socket file behind.
    pub fn kill9(&mut self) {
        self.signal(libc::SIGKILL);
        self.wait_exit(Duration::from_secs(10));
    }

    /// Waits for the process to exit.
    pub fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.try_wait() {
                self.exit_awaited = true;
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "kms-plugin did not exit within {limit:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts the same command line again and waits until ready. Fails the test if the
    /// plugin had died by itself (a crash must not be papered over by the restart).
    pub async fn restart(&mut self) {
        match self.try_wait() {
            None => self.kill9(),
            Some(status) if !self.exit_awaited => panic!(
                "kms-plugin had already exited ({status}) before the restart:\n{}",
                self.output()
            ),
            Some(_) => {}
        }
        self.launch();
        self.wait_ready().await;
    }
}

impl Drop for Plugin {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Connects a KMS v2 client to `socket`.
pub async fn connect(
    socket: &str,
) -> Result<KeyManagementServiceClient<Channel>, tonic::transport::Error> {
    Ok(kms_plugin::client::kms(
        kms_plugin::client::connect(socket).await?,
    ))
}

/// `kms-plugin keygen --config C --key NAME`, which must succeed.
pub fn keygen(config: &Path, name: &str, env: &[(String, String)]) {
    let config = config.to_string_lossy();
    let out = run_cli(&["keygen", "--config", &config, "--key", name], env);
    assert!(
        out.status.success(),
        "keygen {name}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs `kms-plugin <args>` to completion.
pub fn run_cli(args: &[&str], env: &[(String, String)]) -> std::process::Output {
    Command::new(BIN)
        .args(args)
        .envs(env.iter().cloned())
        .stdin(Stdio::null())
        .output()
        .expect("run kms-plugin")
}

/// What `kms-plugin status` shows: the Admin service's Info.
pub async fn info(plugin: &Plugin) -> InfoResponse {
    let channel = kms_plugin::client::connect(&plugin.socket)
        .await
        .expect("connect");
    kms_plugin::client::admin(channel)
        .info(InfoRequest {})
        .await
        .expect("info")
        .into_inner()
}

/// The root named `name` in `info`.
pub fn root_info<'a>(info: &'a InfoResponse, name: &str) -> &'a RootInfo {
    info.roots
        .iter()
        .find(|r| r.name == name)
        .expect("root in Info")
}

pub async fn status(client: &mut KeyManagementServiceClient<Channel>) -> StatusResponse {
    client
        .status(StatusRequest {})
        .await
        .expect("status")
        .into_inner()
}

pub async fn encrypt(
    client: &mut KeyManagementServiceClient<Channel>,
    plaintext: &[u8],
) -> EncryptResponse {
    client
        .encrypt(EncryptRequest {
            plaintext: plaintext.to_vec(),
            uid: uid(),
        })
        .await
        .expect("encrypt")
        .into_inner()
}

pub fn decrypt_request(sealed: &EncryptResponse) -> DecryptRequest {
    DecryptRequest {
        ciphertext: sealed.ciphertext.clone(),
        uid: uid(),
        key_id: sealed.key_id.clone(),
        annotations: sealed.annotations.clone(),
    }
}

pub async fn decrypt(
    client: &mut KeyManagementServiceClient<Channel>,
    sealed: &EncryptResponse,
) -> Vec<u8> {
    client
        .decrypt(decrypt_request(sealed))
        .await
        .expect("decrypt")
        .into_inner()
        .plaintext
}

/// A random-looking per-call id, as the apiserver sends.
pub fn uid() -> String {
    format!("{:032x}", rand::random::<u128>())
}

/// A random 32-byte DEK seed.
pub fn seed() -> Vec<u8> {
    (0..32).map(|_| rand::random::<u8>()).collect()
}

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

//! The real `kms-plugin` binary: a serving process on a real Unix socket ([`Plugin`]) and
//! one-shot CLI runs; waiting for a condition in it by polling.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use kms_plugin::proto::v2::StatusRequest;
use kms_plugin::proto::v2::key_management_service_client::KeyManagementServiceClient;
use tonic::transport::Channel;

use super::connect;

pub const BIN: &str = env!("CARGO_BIN_EXE_kms-plugin");

/// A running plugin process. Killed on drop.
pub struct Plugin {
    child: Option<Child>,
    pub socket: String,
    args: Vec<String>,
    env: Vec<(String, String)>,
    pub(super) log: PathBuf,
    pub(super) runs: u32,
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
            args: args.iter().map(ToString::to_string).collect(),
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

    /// Runs `kms-plugin serve <args>` (logging to `log_dir`, as [`Plugin::start`]), which
    /// must fail at start-up within 20 s; returns its output.
    pub fn start_fails(
        socket: &str,
        args: &[&str],
        env: &[(String, String)],
        log_dir: &Path,
    ) -> String {
        let mut plugin = Self::spawn(socket, args, env, log_dir);
        let status = plugin.wait_exit(Duration::from_secs(20));
        let output = plugin.output();
        assert!(!status.success(), "started:\n{output}");
        output
    }

    /// [`Plugin::start_fails`], with `message` in the output; returns the output for
    /// further checks.
    pub fn start_fails_with(
        socket: &str,
        args: &[&str],
        env: &[(String, String)],
        log_dir: &Path,
        message: &str,
    ) -> String {
        let output = Self::start_fails(socket, args, env, log_dir);
        assert!(output.contains(message), "no {message:?} in:\n{output}");
        output
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

/// Polls `probe` every 200 ms until it returns `Ok`, and returns that value. Once `limit`
/// has passed, fails the test naming `what` was awaited and the last `Err` (what was seen
/// instead).
pub async fn eventually<T>(
    limit: Duration,
    what: &str,
    mut probe: impl AsyncFnMut() -> Result<T, String>,
) -> T {
    let deadline = Instant::now() + limit;
    loop {
        let seen = match probe().await {
            Ok(value) => return value,
            Err(seen) => seen,
        };
        assert!(
            Instant::now() < deadline,
            "{what}: not within {limit:?}; last seen: {seen}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
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

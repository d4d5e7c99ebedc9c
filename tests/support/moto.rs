//! A real moto KMS emulator (`moto_server`) for the tests, and a TCP proxy in front of it
//! that can cut the network without losing moto's in-memory keys.

use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use aws_sdk_kms::Client;
use aws_sdk_kms::config::{BehaviorVersion, Credentials, Region};
use tokio::sync::watch;

pub const REGION: &str = "us-east-1";

/// A secret moto accepts (it checks none) and that must never show in the plugin's logs.
pub const SECRET_ACCESS_KEY: &str = "kms-plugin-test-secret-do-not-log";

/// The dummy credentials moto accepts; the plugin gets them through the environment.
pub const CREDENTIAL_ENV: [(&str, &str); 3] = [
    ("AWS_ACCESS_KEY_ID", "testing"),
    ("AWS_SECRET_ACCESS_KEY", SECRET_ACCESS_KEY),
    ("AWS_REGION", REGION),
];

/// The environment of a plugin that talks to moto: dummy credentials only, and the host's
/// AWS files and instance metadata kept out of the credential chain.
pub fn plugin_env() -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = CREDENTIAL_ENV
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    env.push(("AWS_CONFIG_FILE".into(), "/nonexistent".into()));
    env.push(("AWS_SHARED_CREDENTIALS_FILE".into(), "/nonexistent".into()));
    env.push(("AWS_EC2_METADATA_DISABLED".into(), "true".into()));
    env
}

/// A running `moto_server`, killed on drop.
pub struct Moto {
    child: Child,
    pub port: u16,
}

impl Moto {
    /// Starts moto on a port the kernel picks (no race with other tests for a "free" port)
    /// and waits until it says where it listens. Fails with moto's own output if it exits or
    /// stays silent.
    pub fn start() -> Moto {
        let mut child = Command::new("moto_server")
            .args(["-H", "127.0.0.1", "-p", "0"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("moto_server must be installed: pip install 'moto[server]'");
        let stderr = child.stderr.take().expect("piped stderr");
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        // Keeps draining moto's request log so that it never blocks on a full pipe.
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                let _ = tx.send(line);
            }
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut seen = Vec::new();
        let port = loop {
            match rx.recv_timeout(Duration::from_millis(200)) {
                Ok(line) => {
                    let port = line
                        .split_once("Running on http://127.0.0.1:")
                        .and_then(|(_, port)| port.trim().parse::<u16>().ok());
                    seen.push(line);
                    if let Some(port) = port {
                        break port;
                    }
                }
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                    let status = child.wait().expect("wait for moto_server");
                    panic!(
                        "moto_server exited ({status}) before listening:\n{}",
                        seen.join("\n")
                    );
                }
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!(
                    "moto_server did not listen within 30 s:\n{}",
                    seen.join("\n")
                );
            }
        };
        let moto = Moto { child, port };
        wait_for_port(port, Duration::from_secs(10));
        moto
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The moto_server process id (to SIGSTOP it: a KMS that accepts connections but hangs).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A free TCP port on 127.0.0.1 (bound and released; fine for tests).
pub fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// Polls until something accepts connections on `port`.
pub fn wait_for_port(port: u16, limit: Duration) {
    let start = Instant::now();
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
        assert!(
            start.elapsed() < limit,
            "nothing listens on port {port} after {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// An SDK client for the tests themselves (creating, disabling keys).
pub fn client(endpoint: &str) -> Client {
    let conf = aws_sdk_kms::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new(REGION))
        .credentials_provider(Credentials::new("testing", "testing", None, None, "test"))
        .endpoint_url(endpoint)
        .http_client(
            aws_smithy_http_client::Builder::new()
                .tls_provider(aws_smithy_http_client::tls::Provider::Rustls(
                    aws_smithy_http_client::tls::rustls_provider::CryptoMode::Ring,
                ))
                .build_https(),
        )
        .build();
    Client::from_conf(conf)
}

/// Creates a symmetric key and returns its ARN.
pub async fn create_key(client: &Client) -> String {
    let out = client.create_key().send().await.expect("CreateKey");
    out.key_metadata()
        .expect("metadata")
        .arn()
        .expect("arn")
        .to_string()
}

/// A TCP proxy on its own port forwarding to `target`; `set_up(false)` drops every open
/// connection and refuses new ones, as a network outage would.
pub struct Proxy {
    pub port: u16,
    up: Arc<watch::Sender<bool>>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    pub async fn start(target: u16) -> Proxy {
        let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .expect("bind proxy");
        let port = listener.local_addr().expect("addr").port();
        let up = Arc::new(watch::channel(true).0);
        let up2 = up.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    return;
                };
                if !*up2.borrow() {
                    drop(inbound);
                    continue;
                }
                let mut down = up2.subscribe();
                tokio::spawn(async move {
                    let Ok(mut outbound) =
                        tokio::net::TcpStream::connect((Ipv4Addr::LOCALHOST, target)).await
                    else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = down.wait_for(|up| !*up) => {}
                    }
                });
            }
        });
        Proxy { port, up, task }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn set_up(&self, up: bool) {
        self.up.send_replace(up);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

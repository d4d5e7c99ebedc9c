//! `provider = "vault-transit"`: the `[keys.NAME]` fields, and their validation into
//! [`VaultSettings`], the only shape the rest of this provider sees.
//!
//! ```toml
//! [keys.vault]
//! provider = "vault-transit"
//! address = "https://vault.example.com:8200"
//! key = "kms-plugin"              # the Transit key name
//! mount = "transit"               # default
//! namespace = "team-a"            # optional (Vault Enterprise / OpenBao namespaces)
//! ca_file = "/etc/kms-plugin/vault-ca.pem"
//! auth = "approle"                # "token" (default), "approle" or "cert"
//! role_id_file = "/etc/kms-plugin/vault-role-id"
//! secret_id_file = "/etc/kms-plugin/vault-secret-id"
//! ```

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::root::validated::{Check, Validated};

/// `[keys.NAME]` with `provider = "vault-transit"` as written. Holds where the credentials
/// are, never a token or secret_id itself. Parsed into [`Config`].
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fields {
    /// Base URL of Vault, e.g. `https://vault.example.com:8200`. https unless `allow_http`.
    pub address: String,
    /// Accept a plain `http://` address (a dev server on loopback; never a real Vault: the
    /// token and the local KEKs would cross the network in clear).
    #[serde(default)]
    pub allow_http: bool,
    /// Mount path of the Transit secrets engine.
    #[serde(default = "default_mount")]
    pub mount: String,
    /// Name of the Transit key.
    pub key: String,
    /// Vault namespace, sent as `X-Vault-Namespace`.
    #[serde(default)]
    pub namespace: Option<String>,
    /// PEM bundle of the CAs that may sign Vault's certificate; default: the system's.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate (chain) presented to Vault: required for `auth = "cert"`,
    /// allowed with the others when Vault's listener asks for one.
    #[serde(default)]
    pub client_cert_file: Option<PathBuf>,
    /// PEM private key of `client_cert_file`.
    #[serde(default)]
    pub client_key_file: Option<PathBuf>,
    /// How the plugin gets its Vault token.
    #[serde(default)]
    pub auth: AuthMethod,
    /// `auth = "token"`: file holding the token, re-read when it changes (Vault Agent).
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// `auth = "approle"`: file holding the role_id.
    #[serde(default)]
    pub role_id_file: Option<PathBuf>,
    /// `auth = "approle"`: file holding the secret_id.
    #[serde(default)]
    pub secret_id_file: Option<PathBuf>,
    /// `auth = "cert"`: the cert auth role to log in with (default: any that matches).
    #[serde(default)]
    pub cert_role: Option<String>,
    /// Mount path of the auth method (default `approle` or `cert`).
    #[serde(default)]
    pub auth_mount: Option<String>,
    /// Total time budget of one Vault operation, retries and a re-login included, in
    /// milliseconds. Kept below kube-apiserver's default 3 s deadline.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
}

/// `auth = ...`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthMethod {
    /// A token in `token_file`, renewed by someone else (Vault Agent, an operator).
    #[default]
    Token,
    /// AppRole login with `role_id_file` and `secret_id_file`.
    Approle,
    /// TLS certificate login with `client_cert_file` and `client_key_file`.
    Cert,
}

fn default_mount() -> String {
    "transit".into()
}

fn default_timeout_ms() -> u64 {
    2500
}

/// How the plugin authenticates, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthSettings {
    /// A token file.
    Token {
        /// The file.
        token_file: PathBuf,
    },
    /// AppRole.
    AppRole {
        /// Auth mount path.
        mount: String,
        /// The role_id file.
        role_id_file: PathBuf,
        /// The secret_id file.
        secret_id_file: PathBuf,
    },
    /// TLS certificate auth (the client certificate is in [`TlsSettings`]).
    Cert {
        /// Auth mount path.
        mount: String,
        /// Role name, if any.
        role: Option<String>,
    },
}

/// TLS material, as paths (read when the client is built).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TlsSettings {
    /// CA bundle; `None` = system roots.
    pub ca_file: Option<PathBuf>,
    /// Client certificate and key.
    pub client_cert: Option<(PathBuf, PathBuf)>,
}

/// A validated `vault-transit` key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VaultSettings {
    /// Base URL without a trailing slash.
    pub address: String,
    /// Transit mount, without slashes at either end.
    pub mount: String,
    /// Transit key name.
    pub key: String,
    /// Namespace, without slashes at either end.
    pub namespace: Option<String>,
    /// TLS.
    pub tls: TlsSettings,
    /// Authentication.
    pub auth: AuthSettings,
    /// Budget of one operation.
    pub timeout: Duration,
}

/// A validated `provider = "vault-transit"` entry; [`Fields::settings`] gives the shape
/// the provider works with.
pub type Config = Validated<Fields>;

impl Check for Fields {
    fn check(&self) -> Result<(), String> {
        self.settings().map(drop)
    }
}

impl Fields {
    /// Checks every field and returns the settings; errors name the field and the fix.
    /// Cannot fail for a [`Config`] (parsing ran the same checks).
    pub fn settings(&self) -> Result<VaultSettings, String> {
        let address = self.address.trim_end_matches('/');
        let (scheme, rest) = address
            .split_once("://")
            .ok_or_else(|| format!("address must be an https:// URL, not \"{address}\""))?;
        match scheme.to_ascii_lowercase().as_str() {
            "https" => {}
            "http" if self.allow_http => {}
            "http" => {
                return Err(format!(
                    "address \"{address}\" is plain http: the Vault token and the local KEKs \
                     would cross the network unencrypted; use https://, or set \
                     allow_http = true (only for a dev server on loopback)"
                ));
            }
            _ => {
                return Err(format!(
                    "address must be an https:// URL, not \"{address}\""
                ));
            }
        }
        if rest.is_empty()
            || rest.contains(['/', '?', '#', '@'])
            || address.parse::<http::Uri>().is_err()
        {
            return Err(format!(
                "address must be scheme://host[:port] with no path, query or user, not \"{address}\""
            ));
        }
        let mount = path_segments("mount", &self.mount)?;
        let key = name("key", &self.key)?;
        let namespace = match &self.namespace {
            Some(ns) => Some(path_segments("namespace", ns)?),
            None => None,
        };
        let client_cert = match (&self.client_cert_file, &self.client_key_file) {
            (Some(cert), Some(key)) => Some((cert.clone(), key.clone())),
            (None, None) => None,
            _ => {
                return Err(
                    "client_cert_file and client_key_file go together: give both or neither".into(),
                );
            }
        };
        let auth = self.auth_settings(client_cert.is_some())?;
        if !(100..=60_000).contains(&self.timeout_ms) {
            return Err(format!(
                "timeout_ms = {} is out of range: give 100 to 60000 milliseconds (default 2500)",
                self.timeout_ms
            ));
        }
        Ok(VaultSettings {
            address: address.to_string(),
            mount,
            key,
            namespace,
            tls: TlsSettings {
                ca_file: self.ca_file.clone(),
                client_cert,
            },
            auth,
            timeout: Duration::from_millis(self.timeout_ms),
        })
    }

    fn auth_settings(&self, has_client_cert: bool) -> Result<AuthSettings, String> {
        // Each method takes exactly its own fields: a leftover one is a likely mistake.
        let given = [
            ("token_file", self.token_file.is_some(), AuthMethod::Token),
            (
                "role_id_file",
                self.role_id_file.is_some(),
                AuthMethod::Approle,
            ),
            (
                "secret_id_file",
                self.secret_id_file.is_some(),
                AuthMethod::Approle,
            ),
            ("cert_role", self.cert_role.is_some(), AuthMethod::Cert),
        ];
        let method = match self.auth {
            AuthMethod::Token => "token",
            AuthMethod::Approle => "approle",
            AuthMethod::Cert => "cert",
        };
        for (field, present, owner) in given {
            if present && owner != self.auth {
                return Err(format!("{field} does not apply to auth = \"{method}\""));
            }
        }
        let auth_mount = match &self.auth_mount {
            Some(m) => Some(path_segments("auth_mount", m)?),
            None => None,
        };
        Ok(match self.auth {
            AuthMethod::Token => {
                if auth_mount.is_some() {
                    return Err("auth_mount does not apply to auth = \"token\"".into());
                }
                AuthSettings::Token {
                    token_file: self.token_file.clone().ok_or(
                        "auth = \"token\" needs token_file (a file holding the token, e.g. \
                         written by Vault Agent; never the token itself)",
                    )?,
                }
            }
            AuthMethod::Approle => match (&self.role_id_file, &self.secret_id_file) {
                (Some(role), Some(secret)) => AuthSettings::AppRole {
                    mount: auth_mount.unwrap_or_else(|| "approle".into()),
                    role_id_file: role.clone(),
                    secret_id_file: secret.clone(),
                },
                _ => return Err("auth = \"approle\" needs role_id_file and secret_id_file".into()),
            },
            AuthMethod::Cert => {
                if !has_client_cert {
                    return Err("auth = \"cert\" needs client_cert_file and client_key_file".into());
                }
                let role = match &self.cert_role {
                    Some(r) => Some(name("cert_role", r)?),
                    None => None,
                };
                AuthSettings::Cert {
                    mount: auth_mount.unwrap_or_else(|| "cert".into()),
                    role,
                }
            }
        })
    }
}

/// Longest `key` or `cert_role`, and each name of a mount or namespace path.
const MAX_NAME_LEN: usize = 128;
/// Longest `mount`, `namespace` or `auth_mount` (slashes at the ends dropped). They go with
/// every Vault call (in the path, in `X-Vault-Namespace`): a config must not make each
/// request carry kilobytes.
const MAX_PATH_LEN: usize = 256;

/// One name as Vault allows it in a path: letters, digits, `-`, `_`, `.`; not `.` or `..`.
/// Nothing else, so a name cannot add a path segment, a query or a percent-escape.
fn name(field: &str, value: &str) -> Result<String, String> {
    if value.len() > MAX_NAME_LEN {
        return Err(format!(
            "{field} is {} bytes long: give at most {MAX_NAME_LEN} letters, digits, '-', '_' or '.'",
            value.len()
        ));
    }
    let ok = !value.is_empty()
        && value != "."
        && value != ".."
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    if ok {
        Ok(value.to_string())
    } else {
        Err(format!(
            "{field} {value:?} must be 1 to {MAX_NAME_LEN} letters, digits, '-', '_' or '.'"
        ))
    }
}

/// A path of names separated by `/` (a mount, a namespace); slashes at the ends dropped.
fn path_segments(field: &str, value: &str) -> Result<String, String> {
    let trimmed = value.trim_matches('/');
    if trimmed.is_empty() {
        return Err(format!("{field} must not be empty"));
    }
    if trimmed.len() > MAX_PATH_LEN {
        return Err(format!(
            "{field} is {} bytes long: give at most {MAX_PATH_LEN} (names of letters, digits, \
             '-', '_' or '.' separated by '/')",
            trimmed.len()
        ));
    }
    for part in trimmed.split('/') {
        name(field, part).map_err(|_| {
            format!("{field} {value:?} must be names of 1 to {MAX_NAME_LEN} letters, digits, '-', '_' or '.' separated by '/'")
        })?;
    }
    Ok(trimmed.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<VaultSettings, String> {
        let config: Config = toml::from_str(text).map_err(|e| e.to_string())?;
        config.settings()
    }

    const BASE: &str = "address = \"https://vault.example:8200/\"\nkey = \"kms\"\n";

    #[test]
    fn token_file_is_the_default_auth() {
        let s = parse(&format!("{BASE}token_file = \"/run/vault/token\"")).expect("valid");
        assert_eq!(s.address, "https://vault.example:8200");
        assert_eq!(s.mount, "transit");
        assert_eq!(s.key, "kms");
        assert_eq!(s.namespace, None);
        assert_eq!(s.timeout, Duration::from_millis(2500));
        assert_eq!(
            s.auth,
            AuthSettings::Token {
                token_file: "/run/vault/token".into()
            }
        );
    }

    #[test]
    fn approle_and_cert_take_their_own_fields() {
        let s = parse(&format!(
            "{BASE}auth = \"approle\"\nrole_id_file = \"/r\"\nsecret_id_file = \"/s\"\nauth_mount = \"/ar/\"\nmount = \"/kv/transit/\"\nnamespace = \"a/b\""
        ))
        .expect("valid");
        assert_eq!(s.mount, "kv/transit");
        assert_eq!(s.namespace.as_deref(), Some("a/b"));
        assert_eq!(
            s.auth,
            AuthSettings::AppRole {
                mount: "ar".into(),
                role_id_file: "/r".into(),
                secret_id_file: "/s".into()
            }
        );
        let s = parse(&format!(
            "{BASE}auth = \"cert\"\nclient_cert_file = \"/c\"\nclient_key_file = \"/k\"\ncert_role = \"kms\""
        ))
        .expect("valid");
        assert_eq!(
            s.auth,
            AuthSettings::Cert {
                mount: "cert".into(),
                role: Some("kms".into())
            }
        );
        assert_eq!(s.tls.client_cert, Some(("/c".into(), "/k".into())));
    }

    #[test]
    fn mistakes_are_refused_with_the_field_named() {
        let cases = [
            (
                "address = \"http://v:8200\"\nkey = \"k\"\ntoken_file = \"/t\"",
                "allow_http",
            ),
            (
                "address = \"v:8200\"\nkey = \"k\"\ntoken_file = \"/t\"",
                "https:// URL",
            ),
            (
                "address = \"https://v/x\"\nkey = \"k\"\ntoken_file = \"/t\"",
                "no path",
            ),
            (
                "address = \"https://v\"\nkey = \"../k\"\ntoken_file = \"/t\"",
                "key \"../k\"",
            ),
            (
                "address = \"https://v\"\nkey = \"k\"\nmount = \"a/../b\"\ntoken_file = \"/t\"",
                "mount",
            ),
            ("address = \"https://v\"\nkey = \"k\"", "needs token_file"),
            (
                "address = \"https://v\"\nkey = \"k\"\nauth = \"approle\"\nrole_id_file = \"/r\"",
                "secret_id_file",
            ),
            (
                "address = \"https://v\"\nkey = \"k\"\nauth = \"cert\"",
                "client_cert_file",
            ),
            (
                "address = \"https://v\"\nkey = \"k\"\ntoken_file = \"/t\"\nrole_id_file = \"/r\"",
                "role_id_file does not apply",
            ),
            (
                "address = \"https://v\"\nkey = \"k\"\ntoken_file = \"/t\"\nclient_key_file = \"/k\"",
                "go together",
            ),
            (
                "address = \"https://v\"\nkey = \"k\"\ntoken_file = \"/t\"\ntimeout_ms = 5",
                "timeout_ms",
            ),
            (
                "address = \"https://v\"\nkey = \"k\"\ntoken = \"s.secret\"",
                "unknown field",
            ),
            (
                "address = \"https://v\"\nkey = \"k\"\nauth = \"ldap\"",
                "unknown variant",
            ),
        ];
        for (text, expected) in cases {
            let err = parse(text).expect_err(text);
            assert!(err.contains(expected), "{text}: {err}");
        }
        let ok = parse(
            "address = \"http://127.0.0.1:8200\"\nallow_http = true\nkey = \"k\"\ntoken_file = \"/t\"",
        );
        assert!(ok.is_ok(), "{ok:?}");
    }

    const TOKEN: &str = "address = \"https://v\"\ntoken_file = \"/t\"\n";

    /// The error for `field = value` (with a valid key when the field is not the key), or
    /// None if accepted.
    fn refused(field: &str, value: &str) -> Option<String> {
        let key = if field == "key" { "" } else { "key = \"k\"\n" };
        parse(&format!("{TOKEN}{key}{field} = \"{value}\"")).err()
    }

    #[test]
    fn key_is_one_name_of_at_most_128_bytes() {
        assert_eq!(refused("key", &"k".repeat(128)), None);
        let err = refused("key", &"k".repeat(129)).expect("129 bytes refused");
        assert!(
            err.contains("key is 129 bytes long: give at most 128"),
            "{err}"
        );
        let err = name("key", &"k".repeat(10_000)).expect_err("10,000 bytes refused");
        assert!(!err.contains("kkkk"), "the value is not echoed: {err}");
        for bad in ["a/b", "k?x=1", "k#f", "k%2F", "k y", "..", "k\\n"] {
            let err = refused("key", bad).expect(bad);
            assert!(err.contains("must be 1 to 128 letters"), "{bad}: {err}");
        }
    }

    #[test]
    fn mount_is_at_most_256_bytes_of_names() {
        let at_limit = ["m".repeat(128), "m".repeat(127)].join("/");
        assert_eq!(refused("mount", &format!("/{at_limit}/")), None);
        let err = refused("mount", &format!("{at_limit}x")).expect("257 bytes refused");
        assert!(
            err.contains("mount is 257 bytes long: give at most 256"),
            "{err}"
        );
        let many = vec!["m"; 200].join("/");
        let err = refused("mount", &many).expect("many short names refused");
        assert!(err.contains("mount is 399 bytes long"), "{err}");
        for bad in ["a//b", "a/../b", "t?x", "t%2e", "t x"] {
            let err = refused("mount", bad).expect(bad);
            assert!(err.contains("separated by '/'"), "{bad}: {err}");
        }
    }

    #[test]
    fn namespace_is_at_most_256_bytes_of_names() {
        let at_limit = ["n".repeat(128), "n".repeat(127)].join("/");
        assert_eq!(refused("namespace", &at_limit), None);
        let err = refused("namespace", &format!("{at_limit}n")).expect("257 bytes refused");
        assert!(
            err.contains("namespace is 257 bytes long: give at most 256"),
            "{err}"
        );
        for bad in ["team a", "a/./b", "ns\\r\\nX-Vault-Token: x", "ns:1"] {
            let err = refused("namespace", bad).expect(bad);
            assert!(err.contains("separated by '/'"), "{bad}: {err}");
        }
        // The message escapes what it quotes (the config parser's own snippet aside).
        let err = path_segments("namespace", "ns\r\nX-Vault-Token: x").expect_err("CRLF");
        assert!(err.contains(r#""ns\r\nX-Vault-Token: x""#), "{err}");
    }
}

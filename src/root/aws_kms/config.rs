//! `[keys.NAME]` with `provider = "aws-kms"`: which key, where, and the call budget.

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::root::validated::{Check, Validated};

/// Encryption-context keys with this prefix belong to the plugin.
pub const RESERVED_CONTEXT_PREFIX: &str = "kms-plugin/";
/// Most `encryption_context` pairs an entry may add. The context goes with every KMS call
/// (and into every CloudTrail record), so its size is bounded when the config is read.
pub const MAX_CONTEXT_PAIRS: usize = 16;
/// Longest `encryption_context` key or value, in bytes.
pub const MAX_CONTEXT_ENTRY_LEN: usize = 256;

/// `provider = "aws-kms"` as written in the config file. Credentials come only from the
/// standard AWS chain (environment, profile, web identity / IRSA, instance metadata), never
/// from this file. Parsed into [`Config`], which is what the rest of the plugin uses.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fields {
    /// The full key ARN (`arn:aws:kms:REGION:ACCOUNT:key/ID`). Aliases are refused: an
    /// alias can be repointed, which would silently change the key behind a key_id.
    pub key_id: String,
    /// The AWS region of the key.
    pub region: String,
    /// Endpoint URL override (VPC or FIPS endpoint, an emulator). Must be https:// unless
    /// `allow_http` is set.
    #[serde(default)]
    pub endpoint: Option<String>,
    /// Accept a plain `http://` endpoint (an emulator on loopback; never a real KMS: the
    /// wrapped keys and credentials would cross the network in clear).
    #[serde(default)]
    pub allow_http: bool,
    /// Extra EncryptionContext pairs sent with every call, on top of the plugin's own.
    #[serde(default)]
    pub encryption_context: BTreeMap<String, String>,
    /// Total time budget of one KMS operation, retries included, in milliseconds. Kept
    /// below kube-apiserver's default 3 s deadline.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Time limit of a single attempt (connect + request), in milliseconds.
    #[serde(default = "default_attempt_timeout_ms")]
    pub attempt_timeout_ms: u64,
}

fn default_timeout_ms() -> u64 {
    2500
}

fn default_attempt_timeout_ms() -> u64 {
    1000
}

/// A validated `provider = "aws-kms"` entry: a full key ARN in `region`, an https://
/// endpoint (or http:// with `allow_http`), no reserved context keys, budgets in range.
pub type Config = Validated<Fields>;

impl Check for Fields {
    fn check(&self) -> Result<(), String> {
        let fields = self;
        let arn = &fields.key_id;
        // arn:PARTITION:kms:REGION:ACCOUNT:key/ID
        let parts: Vec<&str> = arn.splitn(6, ':').collect();
        let is_key_arn = parts.len() == 6
            && parts[0] == "arn"
            && !parts[1].is_empty()
            && parts[2] == "kms"
            && !parts[4].is_empty()
            && parts[5]
                .strip_prefix("key/")
                .is_some_and(|id| !id.is_empty() && !id.contains('/'));
        if !is_key_arn {
            let hint = if arn.contains("alias/") {
                "aliases are not accepted because they can be repointed to another key; "
            } else {
                ""
            };
            return Err(format!(
                "key_id must be a full key ARN like arn:aws:kms:REGION:ACCOUNT:key/ID, not \"{arn}\" \
                 ({hint}find it with `aws kms describe-key --key-id ... --query KeyMetadata.Arn`)"
            ));
        }
        if fields.region.is_empty() {
            return Err("region must not be empty".into());
        }
        if parts[3] != fields.region {
            return Err(format!(
                "region \"{}\" differs from the region in the key ARN (\"{}\")",
                fields.region, parts[3]
            ));
        }
        if let Some(endpoint) = &fields.endpoint {
            check_endpoint(endpoint, fields.allow_http)?;
        }
        if fields.encryption_context.len() > MAX_CONTEXT_PAIRS {
            return Err(format!(
                "encryption_context has {} pairs, more than the {MAX_CONTEXT_PAIRS} allowed: \
                 it is sent with every KMS call; keep a few short pairs that identify the cluster",
                fields.encryption_context.len()
            ));
        }
        for (key, value) in &fields.encryption_context {
            if key.len() > MAX_CONTEXT_ENTRY_LEN || value.len() > MAX_CONTEXT_ENTRY_LEN {
                let shown: String = key.chars().take(40).collect();
                return Err(format!(
                    "encryption_context pair \"{shown}\" is longer than {MAX_CONTEXT_ENTRY_LEN} bytes \
                     in its key or value: it is sent with every KMS call; shorten it"
                ));
            }
            if key.is_empty() {
                return Err("encryption_context keys must not be empty".into());
            }
            if key.starts_with(RESERVED_CONTEXT_PREFIX) {
                return Err(format!(
                    "encryption_context key \"{key}\" is reserved: keys starting with \"{RESERVED_CONTEXT_PREFIX}\" are the plugin's own"
                ));
            }
        }
        if !(100..=60_000).contains(&fields.timeout_ms) {
            return Err("timeout_ms must be 100 to 60000".into());
        }
        if fields.attempt_timeout_ms < 50 || fields.attempt_timeout_ms > fields.timeout_ms {
            return Err("attempt_timeout_ms must be at least 50 and at most timeout_ms".into());
        }
        Ok(())
    }
}

fn check_endpoint(endpoint: &str, allow_http: bool) -> Result<(), String> {
    let scheme = endpoint
        .split_once("://")
        .map(|(s, _)| s.to_ascii_lowercase());
    match scheme.as_deref() {
        Some("https") => Ok(()),
        Some("http") if allow_http => Ok(()),
        Some("http") => Err(format!(
            "endpoint \"{endpoint}\" is plain http: wrapped keys and request signatures \
             would cross the network unencrypted; use https://, or set allow_http = true \
             (only for an emulator on loopback)"
        )),
        _ => Err(format!(
            "endpoint must be an https:// URL, not \"{endpoint}\""
        )),
    }
}

#[cfg(test)]
mod tests {
    use crate::config::KeyConfig;
    use crate::config::test_support::{error_of, key_entry};

    const AWS: &str = r#"
        [kek]
        active = "aws"
        [keys.aws]
        provider = "aws-kms"
        key_id = "arn:aws:kms:eu-west-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab"
        region = "eu-west-1"
    "#;

    fn aws(text: &str) -> super::Config {
        let KeyConfig::AwsKms(k) = key_entry(text, "aws") else {
            panic!("not aws-kms")
        };
        k
    }

    #[test]
    fn aws_kms_parses_with_defaults_and_options() {
        let k = aws(AWS);
        assert_eq!(k.region, "eu-west-1");
        assert_eq!((k.timeout_ms, k.attempt_timeout_ms), (2500, 1000));
        assert!(k.endpoint.is_none() && k.encryption_context.is_empty());

        let text = format!(
            "{AWS}\nendpoint = \"https://kms-fips.eu-west-1.amazonaws.com\"\ntimeout_ms = 2000\n\
             [keys.aws.encryption_context]\ncluster = \"prod\"\n"
        );
        let k = aws(&text);
        assert_eq!(k.encryption_context["cluster"], "prod");
        assert_eq!(k.timeout_ms, 2000);
    }

    #[test]
    fn aws_kms_bad_settings_are_rejected() {
        let arn = "arn:aws:kms:eu-west-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab";
        let alias = AWS.replace(arn, "arn:aws:kms:eu-west-1:111122223333:alias/k8s");
        assert!(error_of(&alias).contains("aliases are not accepted"));
        assert!(error_of(&AWS.replace(arn, "alias/k8s")).contains("full key ARN"));
        assert!(
            error_of(&AWS.replace(arn, "1234abcd-12ab-34cd-56ef-1234567890ab"))
                .contains("full key ARN")
        );
        assert!(
            error_of(&AWS.replace("region = \"eu-west-1\"", "region = \"us-east-1\""))
                .contains("differs")
        );
        assert!(error_of(&format!("{AWS}\nendpoint = \"kms.local\"")).contains("endpoint"));
        assert!(error_of(&format!("{AWS}\ntimeout_ms = 10")).contains("timeout_ms"));
        assert!(
            error_of(&format!("{AWS}\nattempt_timeout_ms = 5000")).contains("attempt_timeout_ms")
        );
        assert!(error_of(&format!("{AWS}\naccess_key_id = \"AKIA\"")).contains("access_key_id"));
        let clash =
            format!("{AWS}\n[keys.aws.encryption_context]\n\"kms-plugin/purpose\" = \"x\"\n");
        assert!(error_of(&clash).contains("reserved"));
    }

    #[test]
    fn encryption_context_is_bounded() {
        let pairs = |n: usize, len: usize| {
            let mut text = format!("{AWS}\n[keys.aws.encryption_context]\n");
            for i in 0..n {
                text.push_str(&format!("k{i} = \"{}\"\n", "v".repeat(len)));
            }
            text
        };
        let most = aws(&pairs(
            super::MAX_CONTEXT_PAIRS,
            super::MAX_CONTEXT_ENTRY_LEN,
        ));
        assert_eq!(most.encryption_context.len(), super::MAX_CONTEXT_PAIRS);
        let e = error_of(&pairs(super::MAX_CONTEXT_PAIRS + 1, 1));
        assert!(
            e.contains("[keys.aws]") && e.contains("17 pairs, more than the 16 allowed"),
            "{e}"
        );
        let e = error_of(&pairs(1, super::MAX_CONTEXT_ENTRY_LEN + 1));
        assert!(e.contains("pair \"k0\" is longer than 256 bytes"), "{e}");
        let long_key = format!(
            "{AWS}\n[keys.aws.encryption_context]\n{} = \"v\"\n",
            "k".repeat(super::MAX_CONTEXT_ENTRY_LEN + 1)
        );
        let e = error_of(&long_key);
        assert!(e.contains("longer than 256 bytes"), "{e}");
        assert!(
            !e.contains(&"k".repeat(41)),
            "the message quotes at most 40 characters: {e}"
        );
    }

    #[test]
    fn aws_endpoint_must_be_https_unless_http_is_allowed() {
        let https = format!("{AWS}\nendpoint = \"https://kms.internal:8443\"");
        assert!(aws(&https).endpoint.is_some());
        let http = format!("{AWS}\nendpoint = \"http://127.0.0.1:5000\"");
        let err = error_of(&http);
        assert!(
            err.contains("[keys.aws]") && err.contains("plain http") && err.contains("allow_http"),
            "{err}"
        );
        assert!(error_of(&http.replace("http://", "HTTP://")).contains("allow_http"));
        assert!(aws(&format!("{http}\nallow_http = true")).allow_http);
        // allow_http does not make other schemes acceptable.
        let ftp = format!("{AWS}\nendpoint = \"ftp://x\"\nallow_http = true");
        assert!(error_of(&ftp).contains("must be an https:// URL"));
    }
}

//! The AWS KMS root key: the client, Encrypt/Decrypt with retries, error classification.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::time::Duration;

use aws_config::BehaviorVersion;
use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_sdk_kms::Client;
use aws_sdk_kms::config::Region;
use aws_sdk_kms::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_kms::primitives::Blob;
use aws_sdk_kms::types::{KeySpec, KeyState, KeyUsageType};
use aws_smithy_http_client::tls::{self, rustls_provider::CryptoMode};
use rand::Rng;
use tokio::time::Instant;
use zeroize::Zeroizing;

use super::Config;
use crate::envelope::annotations::MAX_WRAPPED_LEN;
use crate::root::{BoxFuture, ErrorKind, KeyId, RootError, RootKey, WrapContext, unwrapped_key};
use crate::secret::Key256;

/// First backoff step; doubles per attempt up to [`MAX_BACKOFF`].
const BASE_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_millis(800);

/// A root key held in AWS KMS.
pub struct AwsKmsRoot {
    client: Client,
    arn: String,
    key_id: KeyId,
    extra_context: BTreeMap<String, String>,
    budget: Duration,
}

impl AwsKmsRoot {
    /// Builds the client. Makes no KMS call: the config holds the full key ARN, and
    /// credentials are resolved lazily on the first call.
    pub async fn open(config: &Config) -> Result<Self, RootError> {
        let attempt = Duration::from_millis(config.attempt_timeout_ms);
        let budget = Duration::from_millis(config.timeout_ms);
        // One TLS stack (rustls) and one crypto backend (ring) for the whole binary.
        let http = aws_smithy_http_client::Builder::new()
            .tls_provider(tls::Provider::Rustls(CryptoMode::Ring))
            .build_https();
        let timeouts = TimeoutConfig::builder()
            .connect_timeout(attempt)
            .operation_attempt_timeout(attempt)
            .operation_timeout(budget)
            .build();
        let shared = aws_config::defaults(BehaviorVersion::latest())
            .region(Region::new(config.region.clone()))
            .http_client(http)
            .timeout_config(timeouts)
            // Retries are ours (see `call`), so that the budget and the classification of
            // errors are explicit and the same for every call.
            .retry_config(RetryConfig::disabled())
            .load()
            .await;
        let mut kms = aws_sdk_kms::config::Builder::from(&shared);
        // Only the KMS client gets the override: STS (web identity) must keep its own.
        if let Some(endpoint) = &config.endpoint {
            // Config validation refuses this too; a config built in code must not slip by.
            if !config.allow_http && !endpoint.to_ascii_lowercase().starts_with("https://") {
                return Err(RootError::new(
                    ErrorKind::Misconfigured,
                    format!(
                        "AWS KMS endpoint {endpoint} is not https:// (set allow_http = true only for an emulator)"
                    ),
                ));
            }
            kms = kms.endpoint_url(endpoint);
        }
        Ok(Self {
            client: Client::from_conf(kms.build()),
            arn: config.key_id.clone(),
            // ARNs are never reused and identical on every instance.
            key_id: KeyId::derive("aws", config.key_id.as_bytes()),
            extra_context: config.encryption_context.clone(),
            budget,
        })
    }

    /// `kms-plugin keygen`: keys are created in AWS, not by the plugin. This checks with
    /// DescribeKey that the configured key exists and can wrap, and returns `Ok(false)`.
    pub async fn create(config: &Config) -> Result<bool, RootError> {
        let root = Self::open(config).await?;
        let out = root
            .call("DescribeKey", || root.client.describe_key().key_id(&root.arn).send())
            .await
            .map_err(|e| match e.kind() {
                // DescribeKey answers for disabled keys: this one does not exist.
                ErrorKind::KeyDisabled => RootError::new(
                    ErrorKind::Misconfigured,
                    format!(
                        "{}; AWS KMS keys are created in AWS (aws kms create-key), not by kms-plugin keygen",
                        e.detail()
                    ),
                ),
                _ => e,
            })?;
        let Some(meta) = out.key_metadata() else {
            return Err(RootError::new(
                ErrorKind::Unavailable,
                "DescribeKey returned no key metadata",
            ));
        };
        // A field left out is taken as AWS's default (moto omits KeyUsage).
        let usage_ok = meta
            .key_usage()
            .is_none_or(|u| *u == KeyUsageType::EncryptDecrypt);
        let spec_ok = meta
            .key_spec()
            .is_none_or(|s| *s == KeySpec::SymmetricDefault);
        if !(usage_ok && spec_ok) {
            return Err(RootError::new(
                ErrorKind::Misconfigured,
                format!(
                    "{} is not a symmetric encrypt/decrypt key (usage {}, spec {}; need \
                 ENCRYPT_DECRYPT, SYMMETRIC_DEFAULT)",
                    root.arn,
                    name_or_unknown(
                        meta.key_usage()
                            .map(aws_sdk_kms::types::KeyUsageType::as_str)
                    ),
                    name_or_unknown(meta.key_spec().map(aws_sdk_kms::types::KeySpec::as_str)),
                ),
            ));
        }
        if meta.key_state() != Some(&KeyState::Enabled) {
            return Err(RootError::new(
                ErrorKind::Denied,
                not_enabled_message(&root.arn, meta.key_state()),
            ));
        }
        Ok(false)
    }

    /// The EncryptionContext: the plugin's pairs (purpose, key_id) plus the configured ones.
    fn context(&self, ctx: &WrapContext) -> HashMap<String, String> {
        let mut map: HashMap<String, String> = self.extra_context.clone().into_iter().collect();
        for (k, v) in ctx.pairs() {
            map.insert(k.to_string(), v.to_string());
        }
        map
    }

    /// Runs one KMS operation, retrying transient failures with jittered exponential
    /// backoff until the budget is spent. Never retries forever.
    async fn call<T, E, F, Fut>(&self, op: &'static str, mut attempt_fn: F) -> Result<T, RootError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, SdkError<E>>>,
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        let deadline = Instant::now() + self.budget;
        let mut attempts = 0u32;
        loop {
            attempts += 1;
            let remaining = deadline.saturating_duration_since(Instant::now());
            let outcome = tokio::time::timeout(remaining, attempt_fn()).await;
            let (kind, reason) = match outcome {
                Ok(Ok(value)) => return Ok(value),
                Ok(Err(e)) => match classify(&e) {
                    Class::Retry(kind, reason) => (kind, reason),
                    Class::Fail(err) => return Err(err),
                },
                Err(_) => (ErrorKind::Unavailable, "no answer".to_string()),
            };
            let delay = backoff(attempts);
            if Instant::now() + delay >= deadline {
                return Err(RootError::new(
                    kind,
                    format!(
                        "KMS {op} of {} failed after {attempts} attempt(s) within {} ms: {reason}",
                        self.arn,
                        self.budget.as_millis()
                    ),
                ));
            }
            tracing::debug!(op, attempt = attempts, reason = %reason, "retrying KMS call");
            tokio::time::sleep(delay).await;
        }
    }
}

impl RootKey for AwsKmsRoot {
    fn provider(&self) -> &'static str {
        "aws-kms"
    }

    fn key_id(&self) -> &KeyId {
        &self.key_id
    }

    fn wrap<'a>(
        &'a self,
        kek: &'a Key256,
        ctx: &'a WrapContext,
    ) -> BoxFuture<'a, Result<Vec<u8>, RootError>> {
        Box::pin(async move {
            let context = self.context(ctx);
            let out = self
                .call("Encrypt", || {
                    // The SDK takes an owned buffer; it lives only for the request.
                    self.client
                        .encrypt()
                        .key_id(&self.arn)
                        .plaintext(Blob::new(kek.expose_secret().to_vec()))
                        .set_encryption_context(Some(context.clone()))
                        .send()
                })
                .await?;
            match out.ciphertext_blob {
                // Decrypt refuses annotations longer than this: never hand out such a copy.
                Some(blob) if blob.as_ref().len() > MAX_WRAPPED_LEN => Err(RootError::new(
                    ErrorKind::Misconfigured,
                    format!(
                        "KMS Encrypt returned {} bytes, more than the {MAX_WRAPPED_LEN} an annotation may hold",
                        blob.as_ref().len()
                    ),
                )),
                Some(blob) if !blob.as_ref().is_empty() => Ok(blob.into_inner()),
                _ => Err(RootError::new(
                    ErrorKind::Unavailable,
                    "KMS Encrypt returned no ciphertext",
                )),
            }
        })
    }

    fn unwrap<'a>(
        &'a self,
        wrapped: &'a [u8],
        ctx: &'a WrapContext,
    ) -> BoxFuture<'a, Result<Key256, RootError>> {
        Box::pin(async move {
            if wrapped.is_empty() {
                return Err(RootError::bare(ErrorKind::NotAuthentic));
            }
            let context = self.context(ctx);
            let mut out = self
                .call("Decrypt", || {
                    // KeyId pins the key: a blob made under another key is refused by KMS
                    // (IncorrectKeyException) instead of being decrypted with that key.
                    self.client
                        .decrypt()
                        .key_id(&self.arn)
                        .ciphertext_blob(Blob::new(wrapped.to_vec()))
                        .set_encryption_context(Some(context.clone()))
                        .send()
                })
                .await?;
            // Take the SDK's copy of the plaintext so that it is wiped when dropped.
            let plain = Zeroizing::new(
                out.plaintext
                    .take()
                    .map(Blob::into_inner)
                    .unwrap_or_default(),
            );
            unwrapped_key(&plain)
        })
    }
}

/// What to do with a failed attempt.
#[derive(Debug)]
enum Class {
    /// Transient: retry within the budget; the kind is the error's once the budget is
    /// spent, the text says why.
    Retry(ErrorKind, String),
    /// Final.
    Fail(RootError),
}

/// Error codes that mean "slow down".
const RATE_LIMIT_CODES: &[&str] = &[
    "ThrottlingException",
    "LimitExceededException",
    "RequestLimitExceeded",
];

/// Error codes that mean "try again shortly".
const TRANSIENT_CODES: &[&str] = &[
    "KMSInternalException",
    "DependencyTimeoutException",
    "KeyUnavailableException",
    "ServiceUnavailableException",
    "InternalFailure",
];

fn classify<E>(e: &SdkError<E>) -> Class
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    match e {
        SdkError::ServiceError(service) => {
            let code = e.code().unwrap_or("unknown error");
            let message = e.message().unwrap_or("");
            let text = if message.is_empty() {
                code.to_string()
            } else {
                format!("{code}: {message}")
            };
            let status = service.raw().status().as_u16();
            classify_code(code, status, text)
        }
        // Timeouts, connection failures, truncated responses: the network, not the key.
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => {
            Class::Retry(ErrorKind::Unavailable, crate::root::error::error_chain(e))
        }
        // Building the request failed, usually because no credentials could be found
        // (an IRSA token not mounted yet): an operator may need to act, but it can pass.
        _ => Class::Fail(RootError::new(
            ErrorKind::Unavailable,
            format!(
                "cannot send the KMS request: {}",
                crate::root::error::error_chain(e)
            ),
        )),
    }
}

/// "ARN is in state Disabled, not Enabled": AWS's name of the state, never a Rust value.
fn not_enabled_message(arn: &str, state: Option<&KeyState>) -> String {
    format!(
        "{arn} is in state {}, not Enabled",
        name_or_unknown(state.map(aws_sdk_kms::types::KeyState::as_str))
    )
}

/// An enum name as AWS spells it, or "unknown" when DescribeKey left the field out.
fn name_or_unknown(name: Option<&str>) -> &str {
    name.unwrap_or("unknown")
}

/// Classifies an AWS error by its code (the SDK's error metadata, never its message).
fn classify_code(code: &str, status: u16, text: String) -> Class {
    let fail = |kind, detail| Class::Fail(RootError::new(kind, detail));
    match code {
        c if RATE_LIMIT_CODES.contains(&c) => Class::Retry(ErrorKind::RateLimited, text),
        c if TRANSIENT_CODES.contains(&c) => Class::Retry(ErrorKind::Unavailable, text),
        "AccessDeniedException" => fail(
            ErrorKind::Denied,
            format!("access denied by AWS KMS ({text})"),
        ),
        "UnrecognizedClientException" | "InvalidSignatureException" => fail(
            ErrorKind::CredentialsRejected,
            format!("access denied by AWS KMS ({text})"),
        ),
        "DisabledException" | "KMSInvalidStateException" | "NotFoundException" => fail(
            ErrorKind::KeyDisabled,
            format!("key disabled, pending deletion or not found ({text})"),
        ),
        "InvalidCiphertextException" | "IncorrectKeyException" => {
            Class::Fail(RootError::bare(ErrorKind::NotAuthentic))
        }
        // Credentials may be refreshed by the provider chain before the next attempt, so
        // this stays transient (unavailable once the budget is spent).
        "ExpiredTokenException" | "ExpiredToken" => Class::Retry(ErrorKind::Unavailable, text),
        _ if status >= 500 => Class::Retry(ErrorKind::Unavailable, text),
        _ => fail(ErrorKind::Misconfigured, text),
    }
}

/// Exponential backoff with "equal jitter": half fixed, half random, so that many
/// plugins restarted together do not retry in lockstep.
fn backoff(attempt: u32) -> Duration {
    let exp = BASE_BACKOFF.saturating_mul(1u32 << attempt.saturating_sub(1).min(10));
    let step = exp.min(MAX_BACKOFF);
    let half = step / 2;
    half + half.mul_f64(rand::thread_rng().r#gen::<f64>())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_is_jittered_and_capped() {
        for attempt in 1..40 {
            let d = backoff(attempt);
            let step = BASE_BACKOFF
                .saturating_mul(1u32 << (attempt - 1).min(10))
                .min(MAX_BACKOFF);
            assert!(d >= step / 2 && d <= step, "attempt {attempt}: {d:?}");
        }
        assert!(backoff(1) <= Duration::from_millis(50));
        assert!(backoff(30) <= MAX_BACKOFF);
    }

    #[test]
    fn a_key_not_enabled_is_named_by_its_aws_state() {
        let arn = "arn:aws:kms:eu-west-1:111122223333:key/k";
        assert_eq!(
            not_enabled_message(arn, Some(&KeyState::Disabled)),
            format!("{arn} is in state Disabled, not Enabled")
        );
        assert_eq!(
            not_enabled_message(arn, Some(&KeyState::PendingDeletion)),
            format!("{arn} is in state PendingDeletion, not Enabled")
        );
        assert_eq!(
            not_enabled_message(arn, None),
            format!("{arn} is in state unknown, not Enabled")
        );
    }

    fn kind(code: &str, status: u16) -> String {
        match classify_code(code, status, code.to_string()) {
            Class::Retry(kind, _) => format!("retry {}", kind.metric_label()),
            Class::Fail(e) => format!("{} {}", e.kind().metric_label(), e.detail()),
        }
    }

    #[test]
    fn error_codes_are_classified() {
        assert_eq!(kind("ThrottlingException", 400), "retry rate_limited");
        for code in ["KMSInternalException", "DependencyTimeoutException"] {
            assert_eq!(kind(code, 400), "retry unavailable", "{code}");
        }
        assert_eq!(kind("SomethingNew", 503), "retry unavailable");
        assert!(kind("AccessDeniedException", 400).starts_with("denied access denied"));
        assert!(kind("UnrecognizedClientException", 400).starts_with("credentials_rejected"));
        for code in [
            "DisabledException",
            "KMSInvalidStateException",
            "NotFoundException",
        ] {
            assert!(
                kind(code, 400).starts_with("key_disabled key disabled"),
                "{code}"
            );
        }
        assert_eq!(kind("InvalidCiphertextException", 400), "not_authentic ");
        assert_eq!(kind("IncorrectKeyException", 400), "not_authentic ");
        assert!(kind("ValidationException", 400).starts_with("misconfigured"));
    }
}

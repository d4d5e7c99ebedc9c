//! Why a root key call failed: a kind, which decides everything the plugin does about it,
//! and the provider's detail, which is only shown. Providers classify where their own
//! error (an SDK error variant, a CKR_ code) is in hand; nobody matches on message text.

use std::fmt;

/// The failure classes of a root key call. Every decision taken on a root error (retry,
/// gRPC code, health, metric label) is an exhaustive `match` on this enum.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The root cannot be reached right now (network, timeout, token absent, sealed or
    /// not ready). Transient.
    Unavailable,
    /// The remote asked the plugin to slow down. Transient.
    RateLimited,
    /// Permission or policy refused the call. Needs an operator.
    Denied,
    /// The key is disabled, deleted, pending deletion or not found at the remote.
    KeyDisabled,
    /// Authentication to the root failed: wrong PIN, invalid or expired token.
    CredentialsRejected,
    /// The root is misconfigured (file mode or length, bad config, missing object).
    Misconfigured,
    /// The wrapped key does not authenticate under this root and context: tampered, or
    /// wrapped by another key. Says nothing about the root's health.
    NotAuthentic,
    /// Not a root's answer: the plugin made no call because this root's unwrap budget for
    /// Decrypt is spent (`[cache] unwraps_per_second`).
    Throttled,
}

/// What a failed call means for the root's health (`kms-plugin status`, metrics, Status).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HealthEffect {
    /// None: the failure is the caller's (a forged blob) or the plugin's own budget.
    None,
    /// The root is degraded: it may pass without an operator.
    Degraded,
    /// The root refuses: an operator must act.
    Rejected,
}

impl ErrorKind {
    /// True when the same call may succeed later without operator action.
    pub fn is_transient(self) -> bool {
        match self {
            ErrorKind::Unavailable | ErrorKind::RateLimited | ErrorKind::Throttled => true,
            ErrorKind::Denied
            | ErrorKind::KeyDisabled
            | ErrorKind::CredentialsRejected
            | ErrorKind::Misconfigured
            | ErrorKind::NotAuthentic => false,
        }
    }

    /// What a failure of this kind does to the root's health.
    pub fn health_effect(self) -> HealthEffect {
        match self {
            ErrorKind::NotAuthentic | ErrorKind::Throttled => HealthEffect::None,
            ErrorKind::Unavailable | ErrorKind::RateLimited => HealthEffect::Degraded,
            ErrorKind::Denied
            | ErrorKind::KeyDisabled
            | ErrorKind::CredentialsRejected
            | ErrorKind::Misconfigured => HealthEffect::Rejected,
        }
    }

    /// The snake_case label metrics use for this kind.
    pub fn metric_label(self) -> &'static str {
        match self {
            ErrorKind::Unavailable => "unavailable",
            ErrorKind::RateLimited => "rate_limited",
            ErrorKind::Denied => "denied",
            ErrorKind::KeyDisabled => "key_disabled",
            ErrorKind::CredentialsRejected => "credentials_rejected",
            ErrorKind::Misconfigured => "misconfigured",
            ErrorKind::NotAuthentic => "not_authentic",
            ErrorKind::Throttled => "throttled",
        }
    }

    /// The human text that prefixes an error's detail.
    pub fn text(self) -> &'static str {
        match self {
            ErrorKind::Unavailable => "root key unavailable",
            ErrorKind::RateLimited => "root key is rate limiting requests",
            ErrorKind::Denied => "root key denied the request",
            ErrorKind::KeyDisabled => "root key disabled, deleted or not found",
            ErrorKind::CredentialsRejected => "credentials for the root key rejected",
            ErrorKind::Misconfigured => "root key misconfigured",
            ErrorKind::NotAuthentic => "wrapped key does not authenticate under this root key",
            ErrorKind::Throttled => "unwrap budget of this root key is spent; retry shortly",
        }
    }
}

/// A failed root key call: its kind and the provider's detail for operators and logs.
/// Never carries key material, PINs or tokens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RootError {
    kind: ErrorKind,
    detail: String,
}

impl RootError {
    /// An error of `kind`; `detail` names what failed and, where it can, how to fix it.
    pub fn new(kind: ErrorKind, detail: impl Into<String>) -> Self {
        Self {
            kind,
            detail: detail.into(),
        }
    }

    /// An error whose kind says it all (no provider detail).
    pub fn bare(kind: ErrorKind) -> Self {
        Self::new(kind, String::new())
    }

    /// The failure class.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The provider's detail, without the kind's text.
    pub fn detail(&self) -> &str {
        &self.detail
    }

    /// True when the same call may succeed later without operator action.
    pub fn is_transient(&self) -> bool {
        self.kind.is_transient()
    }

    /// The same error with `context` (such as which key) in front of its detail.
    #[must_use]
    pub fn context(self, context: &str) -> Self {
        let detail = if self.detail.is_empty() {
            context.to_string()
        } else {
            format!("{context}: {}", self.detail)
        };
        Self { detail, ..self }
    }
}

impl fmt::Display for RootError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.detail.is_empty() {
            f.write_str(self.kind.text())
        } else {
            write!(f, "{}: {}", self.kind.text(), self.detail)
        }
    }
}

impl std::error::Error for RootError {}

/// A provider error's message with its sources, "outer: inner: innermost", each part once and
/// without a Debug dump: these messages end up in the 400-byte Status healthz string.
#[cfg(any(feature = "aws-kms", feature = "vault-transit"))]
pub(crate) fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        let part = inner.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = inner.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_prefixes_the_kind() {
        let e = RootError::new(ErrorKind::Denied, "AccessDeniedException");
        assert_eq!(
            e.to_string(),
            "root key denied the request: AccessDeniedException"
        );
        assert_eq!(e.kind(), ErrorKind::Denied);
        assert_eq!(
            RootError::bare(ErrorKind::NotAuthentic).to_string(),
            "wrapped key does not authenticate under this root key"
        );
        let named = e.context("key \"a\" (file)");
        assert_eq!(named.detail(), "key \"a\" (file): AccessDeniedException");
    }

    #[test]
    fn only_remote_hiccups_and_the_budget_are_transient() {
        assert!(ErrorKind::Unavailable.is_transient());
        assert!(ErrorKind::RateLimited.is_transient());
        assert!(ErrorKind::Throttled.is_transient());
        assert!(!ErrorKind::CredentialsRejected.is_transient());
        assert_eq!(ErrorKind::RateLimited.metric_label(), "rate_limited");
        assert_eq!(ErrorKind::NotAuthentic.health_effect(), HealthEffect::None);
        assert_eq!(
            ErrorKind::KeyDisabled.health_effect(),
            HealthEffect::Rejected
        );
    }
}

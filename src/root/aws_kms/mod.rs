//! `provider = "aws-kms"`: a symmetric AWS KMS key wraps local KEKs with Encrypt/Decrypt.
//!
//! Calls are rare (one Encrypt per local KEK, one Decrypt per distinct local KEK after a
//! start) and opening makes none, so the plugin starts while KMS is down and steady state
//! costs nothing. Every call has a total time budget below kube-apiserver's 3 s deadline;
//! transient failures are retried inside it with jittered exponential backoff.

pub mod config;
#[cfg(feature = "aws-kms")]
mod root;

pub use config::Config;
#[cfg(feature = "aws-kms")]
pub use root::AwsKmsRoot;

super::feature_gated_provider!(Config, "aws-kms", "aws-kms", AwsKmsRoot);

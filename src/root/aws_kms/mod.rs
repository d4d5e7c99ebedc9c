//! `provider = "aws-kms"`: a symmetric AWS KMS key wraps local KEKs with Encrypt/Decrypt.
//!
//! Calls are rare (one Encrypt per local KEK, one Decrypt per distinct local KEK after a
//! start) and opening makes none, so the plugin starts while KMS is down and steady state
//! costs nothing. Every call has a total time budget below kube-apiserver's 3 s deadline;
//! transient failures are retried inside it with jittered exponential backoff.

pub mod config;
#[cfg(feature = "aws-kms")]
mod root;

use std::sync::Arc;

pub use config::Config;
#[cfg(feature = "aws-kms")]
pub use root::AwsKmsRoot;

use super::{BoxFuture, Provider, RootError, RootKey};

impl Provider for Config {
    fn name(&self) -> &'static str {
        "aws-kms"
    }

    fn open(&self) -> BoxFuture<'_, Result<Arc<dyn RootKey>, RootError>> {
        #[cfg(feature = "aws-kms")]
        return Box::pin(
            async move { Ok(Arc::new(AwsKmsRoot::open(self).await?) as Arc<dyn RootKey>) },
        );
        #[cfg(not(feature = "aws-kms"))]
        Box::pin(async move { Err(super::not_built(self.name())) })
    }

    fn create(&self) -> BoxFuture<'_, Result<bool, RootError>> {
        #[cfg(feature = "aws-kms")]
        return Box::pin(AwsKmsRoot::create(self));
        #[cfg(not(feature = "aws-kms"))]
        Box::pin(async move { Err(super::not_built(self.name())) })
    }
}

//! Code generated from `proto/` by `build.rs`.

use std::fmt;

/// The KMS v2 API exactly as kube-apiserver speaks it (`package v2`).
#[allow(missing_docs)] // generated; the .proto file documents it
pub mod v2 {
    tonic::include_proto!("v2");
}

/// The operator API served beside it (`kms-plugin status`, `kms-plugin rotate`).
#[allow(missing_docs)] // generated; the .proto file documents it
pub mod admin {
    tonic::include_proto!("kmsplugin.admin.v1");
}

// Messages that carry plaintext print only its length.
impl fmt::Debug for v2::EncryptRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EncryptRequest")
            .field("plaintext_len", &self.plaintext.len())
            .field("uid", &self.uid)
            .finish()
    }
}

impl fmt::Debug for v2::DecryptResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DecryptResponse")
            .field("plaintext_len", &self.plaintext.len())
            .finish()
    }
}

//! `provider = "file"`: a 32-byte root key in a file readable only by the plugin's user.
//! It wraps local KEKs with AES-256-GCM. This is the embedded default; it needs no cloud
//! account, and protects etcd backups as long as the key file is kept off them.

pub mod config;
mod root;

use std::sync::Arc;

pub use config::Config;
pub use root::{FileRoot, create_private_dir, prepare_state_dir};

use super::{BoxFuture, Provider, RootError, RootKey};

impl Provider for Config {
    fn name(&self) -> &'static str {
        "file"
    }

    fn open(&self) -> BoxFuture<'_, Result<Arc<dyn RootKey>, RootError>> {
        Box::pin(async move { Ok(Arc::new(FileRoot::open(&self.path).await?) as Arc<dyn RootKey>) })
    }

    fn create(&self) -> BoxFuture<'_, Result<bool, RootError>> {
        Box::pin(FileRoot::create(&self.path))
    }
}

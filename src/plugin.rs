//! The running plugin: the keyring in force and where its configuration came from.
//! A reload builds a complete new keyring beside the old one, proves it, and swaps it in
//! atomically; calls in flight finish on the keyring they started with.

use std::sync::{Arc, PoisonError, RwLock};

use crate::config::{Config, Source};
use crate::keyring::Keyring;
use crate::keyring::cache::KekCache;
use crate::root::RootError;

/// Shared state of a running plugin.
pub struct Plugin {
    keyring: RwLock<Arc<Keyring>>,
    source: Source,
}

impl Plugin {
    /// Opens the roots of `config`, makes the first local KEK and starts upkeep.
    pub async fn start(config: &Config, source: Source) -> Result<Arc<Self>, RootError> {
        let cache = Arc::new(KekCache::new(config.cache.capacity));
        let keyring = Arc::new(Keyring::open(config, cache, &Default::default()).await?);
        keyring.start().await?;
        tokio::spawn(keyring.clone().maintain());
        Ok(Arc::new(Self {
            keyring: RwLock::new(keyring),
            source,
        }))
    }

    /// The keyring in force. Callers hold it for one call.
    pub fn keyring(&self) -> Arc<Keyring> {
        self.keyring
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Where the configuration came from.
    pub fn source(&self) -> &Source {
        &self.source
    }

    /// Stops background work (at shutdown).
    pub fn stop(&self) {
        self.keyring().stop();
    }
}

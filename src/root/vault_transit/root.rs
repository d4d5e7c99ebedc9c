//! The root key: opening reads the Transit key's metadata (type, versions). The key_id
//! stands for one version of one key, named by namespace, mount, key name, version and that
//! version's creation time (so a deleted and re-created key gets a new key_id), never by the
//! address, which may differ between the instances of one HA cluster. Calls are rare (one
//! wrap per local KEK, one unwrap per distinct local KEK after a start): the steady state
//! makes none.

use std::collections::BTreeMap;
use std::sync::{Arc, PoisonError, RwLock, Weak};
use std::time::Duration;

use tokio::time::Instant;

use super::auth::Auth;
use super::client::{VaultClient, VaultError};
use super::config::{Config, VaultSettings};
use super::session::Session;
use super::transit::{self, KeyMeta};
use crate::envelope::annotations::MAX_WRAPPED_LEN;
use crate::root::ErrorKind;
use crate::root::{BoxFuture, KeyId, RootError, RootKey, WrapContext};
use crate::secret::Key256;

/// How often the renewer looks again when no renewal is scheduled (a token file, a token
/// that never expires): no Vault call is made then.
const IDLE_RECHECK: Duration = Duration::from_secs(60);
/// Wait before a failed renewal is tried again.
const RENEW_RETRY: Duration = Duration::from_secs(10);

impl From<VaultError> for RootError {
    fn from(e: VaultError) -> Self {
        RootError::new(e.kind, e.detail)
    }
}

/// A root key held in Vault Transit.
pub struct VaultTransitRoot {
    inner: Arc<Inner>,
    key_id: KeyId,
    /// The version new local KEKs are wrapped under.
    version: u32,
    /// That version's creation time when opened: tells a re-created key apart.
    created: String,
    renewer: tokio::task::JoinHandle<()>,
}

struct Inner {
    session: Session,
    settings: VaultSettings,
    /// The key's versions Vault lists, with their key_ids.
    versions: RwLock<BTreeMap<u32, KeyId>>,
}

impl VaultTransitRoot {
    /// Validates the settings, reads the key's metadata (the token is checked on the way)
    /// and refuses a key that cannot bind associated data.
    pub async fn open(config: &Config) -> Result<Self, RootError> {
        let settings: VaultSettings = config
            .settings()
            .map_err(|e| RootError::new(ErrorKind::Misconfigured, e))?;
        let client = VaultClient::new(&settings)?;
        let session = Session {
            client,
            auth: Auth::new(settings.auth.clone()),
            budget: settings.timeout,
        };
        let inner = Arc::new(Inner {
            session,
            settings,
            versions: RwLock::new(BTreeMap::new()),
        });
        let meta = inner.read_meta().await?;
        let version = meta.latest_version;
        let created = meta.created(version).unwrap_or_default();
        inner.remember(&meta);
        let key_id = inner.version(version).ok_or_else(|| {
            RootError::new(ErrorKind::Unavailable, "Vault lists no latest key version")
        })?;
        let renewer = tokio::spawn(renew_loop(Arc::downgrade(&inner)));
        Ok(Self {
            inner,
            key_id,
            version,
            created,
            renewer,
        })
    }

    /// `kms-plugin keygen`: Transit keys are created in Vault (`bao write -f
    /// transit/keys/NAME`), not by the plugin. Checks that the configured key exists and is
    /// usable, and returns `Ok(false)`.
    pub async fn create(config: &Config) -> Result<bool, RootError> {
        Self::open(config).await.map_err(|e| match e.kind() {
            ErrorKind::KeyDisabled => e.context(&format!(
                "Transit keys are created in Vault (vault write -f {}/keys/{}), not by kms-plugin keygen",
                config.mount, config.key
            )),
            _ => e,
        })?;
        Ok(false)
    }
}

impl VaultTransitRoot {
    /// Reads the key's metadata again (the keyring's periodic root check): learns new
    /// versions and forgets trimmed ones. True when this root no longer stands for the
    /// key's latest version (rotated, or deleted and re-created): the keyring then opens it
    /// again, under the new version's key_id.
    pub async fn refresh_versions(&self) -> Result<bool, RootError> {
        let inner = &self.inner;
        let meta = inner.read_meta().await?;
        inner.remember(&meta);
        let changed = meta.latest_version != self.version
            || meta.created(self.version).as_ref() != Some(&self.created);
        if changed {
            tracing::info!(key = %inner.label(), version = meta.latest_version, "Transit key rotated or re-created; the root will be opened again under its latest version");
        }
        Ok(changed)
    }

    /// True for the key_id of any version of this key Vault lists: copies wrapped before
    /// a Transit rotation still open.
    pub fn answers_to_version(&self, key_id: &KeyId) -> bool {
        self.inner
            .versions
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .any(|v| v == key_id)
    }
}

impl Inner {
    /// "Transit key \"k\" at mount \"transit\" (namespace \"ns\")", for messages.
    fn label(&self) -> String {
        let s = &self.settings;
        match &s.namespace {
            Some(ns) => format!(
                "Transit key \"{}\" at mount \"{}\" in namespace \"{ns}\"",
                s.key, s.mount
            ),
            None => format!("Transit key \"{}\" at mount \"{}\"", s.key, s.mount),
        }
    }

    async fn read_meta(&self) -> Result<KeyMeta, VaultError> {
        let s = &self.settings;
        let meta = transit::read_key(&self.session, &s.mount, &s.key)
            .await
            .map_err(|e| {
                let label = self.label();
                match e.kind {
                    ErrorKind::KeyDisabled => VaultError::new(
                        ErrorKind::KeyDisabled,
                        format!(
                            "{label} does not exist on {} ({})",
                            self.session.client.address(),
                            e.detail
                        ),
                    ),
                    _ => e.context(&format!(
                        "reading {label} on {}",
                        self.session.client.address()
                    )),
                }
            })?;
        meta.check_usable(&s.key)?;
        Ok(meta)
    }

    /// Records every version Vault lists, with its key_id.
    fn remember(&self, meta: &KeyMeta) {
        let mut versions = self
            .versions
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        versions.clear();
        for v in meta.listed() {
            if let Some(created) = meta.created(v) {
                let key_id = self.key_id_for(v, &created);
                versions.insert(v, key_id);
            }
        }
    }

    fn version(&self, v: u32) -> Option<KeyId> {
        self.versions
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&v)
            .cloned()
    }

    fn key_id_for(&self, version: u32, created: &str) -> KeyId {
        let s = &self.settings;
        let identity = [
            s.namespace.as_deref().unwrap_or(""),
            &s.mount,
            &s.key,
            &version.to_string(),
            created,
        ]
        .join("\0");
        KeyId::derive("vault", identity.as_bytes())
    }
}

/// Keeps a login token alive: renews it at two thirds of its TTL, logs in again when it
/// cannot be renewed. Ends when the root is dropped.
async fn renew_loop(inner: Weak<Inner>) {
    let mut retry_at: Option<Instant> = None;
    loop {
        let due = {
            let Some(inner) = inner.upgrade() else { return };
            inner.session.auth.renew_at().await
        };
        let wake = match (due, retry_at) {
            (Some(due), Some(retry)) => due.max(retry),
            (Some(due), None) => due,
            (None, _) => Instant::now() + IDLE_RECHECK,
        };
        tokio::time::sleep_until(wake).await;
        let Some(inner) = inner.upgrade() else { return };
        if inner
            .session
            .auth
            .renew_at()
            .await
            .is_none_or(|at| Instant::now() < at)
        {
            continue;
        }
        let deadline = Instant::now() + inner.session.budget;
        match inner
            .session
            .auth
            .token(&inner.session.client, deadline)
            .await
        {
            Ok(_) => retry_at = None,
            Err(e) => {
                tracing::warn!(key = %inner.label(), error = %e, "cannot renew the Vault token; retrying");
                retry_at = Some(Instant::now() + RENEW_RETRY);
            }
        }
    }
}

impl Drop for VaultTransitRoot {
    fn drop(&mut self) {
        self.renewer.abort();
    }
}

impl RootKey for VaultTransitRoot {
    fn provider(&self) -> &'static str {
        "vault-transit"
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
            let inner = &self.inner;
            // Wraps are rare: check first that the key is still the one the key_id names
            // (encrypt on a deleted key would silently re-create it with upsert rights).
            let meta = inner.read_meta().await?;
            if meta.created(self.version).as_ref() != Some(&self.created) {
                return Err(RootError::new(
                    ErrorKind::KeyDisabled,
                    format!(
                        "{} was deleted and re-created since the plugin opened it; it is not the \
                     key key_id {} names (reload the plugin to use the new key)",
                        inner.label(),
                        self.key_id
                    ),
                ));
            }
            let s = &inner.settings;
            let ciphertext = transit::encrypt(
                &inner.session,
                &s.mount,
                &s.key,
                self.version,
                kek,
                &ctx.aad(),
            )
            .await
            .map_err(|e| e.context(&format!("encrypting with {}", inner.label())))?;
            if ciphertext.len() > MAX_WRAPPED_LEN {
                return Err(RootError::new(
                    ErrorKind::Misconfigured,
                    format!(
                        "Vault returned a {}-byte ciphertext, more than the {MAX_WRAPPED_LEN} an annotation may hold",
                        ciphertext.len()
                    ),
                ));
            }
            Ok(ciphertext.into_bytes())
        })
    }

    fn unwrap<'a>(
        &'a self,
        wrapped: &'a [u8],
        ctx: &'a WrapContext,
    ) -> BoxFuture<'a, Result<Key256, RootError>> {
        Box::pin(async move {
            let inner = &self.inner;
            let Some(ciphertext) = std::str::from_utf8(wrapped).ok() else {
                return Err(RootError::bare(ErrorKind::NotAuthentic));
            };
            // The copy must be under the version its key_id stands for (this root's, or an
            // older version's after a Transit rotation); Vault picks the version from the
            // ciphertext, so this pins it.
            let Some(version) = transit::version_of(ciphertext) else {
                return Err(RootError::bare(ErrorKind::NotAuthentic));
            };
            if inner.version(version).as_ref() != Some(ctx.key_id()) {
                return Err(RootError::bare(ErrorKind::NotAuthentic));
            }
            let s = &inner.settings;
            transit::decrypt(&inner.session, &s.mount, &s.key, ciphertext, &ctx.aad())
                .await
                .map_err(|e| match e.kind {
                    ErrorKind::NotAuthentic => RootError::bare(ErrorKind::NotAuthentic),
                    _ => e
                        .context(&format!("decrypting with {}", inner.label()))
                        .into(),
                })
        })
    }

    fn refresh(&self) -> BoxFuture<'_, Result<bool, RootError>> {
        Box::pin(self.refresh_versions())
    }

    fn answers_to(&self, key_id: &KeyId) -> bool {
        self.answers_to_version(key_id)
    }
}

//! The PKCS#11 root key: opening, wrapping and unwrapping in the token, with deadlines,
//! and the classification of CKR_ codes into [`ErrorKind`]s.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use cryptoki::error::{Error, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;
use rand::RngCore;
use rand::rngs::OsRng;
use tokio::sync::Semaphore;
use zeroize::Zeroizing;

use super::config::Mechanism as WrapMechanism;
use super::session::{MAX_SESSIONS, Token, describe, is_session_lost};
use super::{Config, rsa_oaep};
use crate::root::{
    BoxFuture, ErrorKind, KeyId, RootError, RootKey, WrapContext, gcm, unwrapped_key,
};
use crate::secret::{KEY_LEN, Key256};

use crate::root::gcm::{IV_LEN, TAG_LEN};
/// The block the token encrypts to give the check value the key_id is derived from.
pub(super) const CHECK_BLOCK: &[u8; 16] = b"kms-plugin kcv 1";
/// Most time start-up work (load the module, log in, find the key, its check value; or
/// generate it) may take, so a hung token cannot hang `serve`, `keygen` or a reload.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);

/// A root key in a PKCS#11 token.
pub struct Pkcs11Root {
    pub(super) inner: Arc<Inner>,
    key_id: KeyId,
    /// Set for `mechanism = "rsa-oaep"`.
    rsa: Option<rsa_oaep::RsaKey>,
}

/// The token objects a root uses. For AES both are the one secret key; for RSA, the public
/// key wraps and the private key unwraps.
#[derive(Debug, Clone, Copy)]
pub(super) struct Keys {
    pub(super) wrap: ObjectHandle,
    pub(super) unwrap: ObjectHandle,
}

pub(super) struct Inner {
    pub(super) token: Token,
    /// Handles of the key objects; found again after a session loss.
    key: Mutex<Keys>,
    /// The check value of the key at start-up: a re-found key must match it.
    check: Vec<u8>,
    /// Bounds concurrent token calls to the session pool size. A call holds its permit
    /// until its thread leaves the token, even after its caller gave up on it.
    permits: Arc<Semaphore>,
    /// Deadline of one call: waiting for a permit plus the token call.
    timeout: Duration,
}

/// How a token call failed.
pub(super) enum Failure {
    /// Already classified (session could not be recovered, key replaced, ...).
    Root(RootError),
    /// The operation itself failed; the caller decides what that means.
    Token(Error),
}

impl Pkcs11Root {
    /// Loads the module, logs in to the token and finds the key, refusing one that could
    /// leave the token unless `allow_extractable` is set.
    pub async fn open(config: &Config) -> Result<Self, RootError> {
        let timeout = Duration::from_millis(config.timeout_ms);
        let name = config.token_name();
        let config = config.clone();
        let (token, key, check, rsa) = blocking(&name, "opening the key", move || {
            let token = Token::new(&config)?;
            let session = token.open_session()?;
            let (key, check, rsa) = match config.mechanism {
                WrapMechanism::AesGcm => {
                    let (key, check) = locate_aes(&session, &token)?;
                    (key, check, None)
                }
                WrapMechanism::RsaOaep => {
                    let (keys, identity, shape) = rsa_oaep::locate(&session, &token)?;
                    let rsa = rsa_oaep::open(&session, &token, keys, shape)?;
                    (keys, identity, Some(rsa))
                }
            };
            token.put(session);
            Ok((token, key, check, rsa))
        })
        .await?;
        let key_id = KeyId::derive("pkcs11", &check);
        Ok(Self {
            inner: Arc::new(Inner {
                token,
                key: Mutex::new(key),
                check,
                permits: Arc::new(Semaphore::new(MAX_SESSIONS)),
                timeout,
            }),
            key_id,
            rsa,
        })
    }

    /// Generates the key in the token if there is none with its label (and CKA_ID).
    /// Returns whether it created one.
    pub async fn create(config: &Config) -> Result<bool, RootError> {
        if config.mechanism == WrapMechanism::RsaOaep {
            return rsa_oaep::create(config).await;
        }
        let name = config.token_name();
        let config = config.clone();
        blocking(&name, "generating the key", move || {
            let token = Token::new(&config)?;
            let session = token.open_session()?;
            if !find_keys(&session, &config)
                .map_err(|e| lookup_error(&token, &e))?
                .is_empty()
            {
                return Ok(false);
            }
            let mut template = vec![
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::KeyType(KeyType::AES),
                Attribute::ValueLen((KEY_LEN as u64).into()),
                Attribute::Token(true),
                Attribute::Private(true),
                Attribute::Sensitive(true),
                Attribute::Extractable(false),
                Attribute::Encrypt(true),
                Attribute::Decrypt(true),
                Attribute::Label(config.key_label.as_bytes().to_vec()),
            ];
            if let Some(id) = key_cka_id(&config) {
                template.push(Attribute::Id(id));
            }
            session
                .generate_key(&Mechanism::AesKeyGen, &template)
                .map_err(|e| {
                    RootError::new(
                        ErrorKind::Misconfigured,
                        format!(
                            "cannot generate an AES-256 key on {}: {}",
                            token.name(),
                            describe(&e)
                        ),
                    )
                })?;
            Ok(true)
        })
        .await
    }

    /// Runs `op` on a pooled session, off the async threads, within `timeout_ms`. After a
    /// lost session or a stale key handle it opens a fresh session, finds the key again and
    /// retries once.
    pub(super) async fn run<T, F>(&self, op: F) -> Result<T, Failure>
    where
        T: Send + 'static,
        F: Fn(&Session, Keys) -> Result<T, Error> + Send + 'static,
    {
        let inner = Arc::clone(&self.inner);
        let call = async move {
            let permit = Arc::clone(&inner.permits)
                .acquire_owned()
                .await
                .map_err(|_| {
                    Failure::Root(RootError::new(
                        ErrorKind::Unavailable,
                        "session pool closed",
                    ))
                })?;
            // The permit moves into the thread: a call hung in the token keeps it after we
            // give up waiting, so at most MAX_SESSIONS threads can ever be stuck there and
            // later calls time out waiting for a permit instead of piling up threads.
            tokio::task::spawn_blocking(move || {
                let _permit = permit;
                inner.run_blocking(op)
            })
            .await
            .map_err(|e| {
                Failure::Root(RootError::new(
                    ErrorKind::Unavailable,
                    format!("token call panicked or was cancelled: {e}"),
                ))
            })?
        };
        let timeout = self.inner.timeout;
        match tokio::time::timeout(timeout, call).await {
            Ok(result) => result,
            Err(_) => {
                let name = self.inner.token.name();
                tracing::warn!(token = %name, timeout_ms = timeout.as_millis() as u64, "PKCS#11 call timed out");
                Err(Failure::Root(RootError::new(
                    ErrorKind::Unavailable,
                    format!(
                        "{name} did not answer within {} ms (timeout_ms); the HSM may be hung or \
                     overloaded",
                        timeout.as_millis()
                    ),
                )))
            }
        }
    }
}

impl Inner {
    fn run_blocking<T>(
        &self,
        op: impl Fn(&Session, Keys) -> Result<T, Error>,
    ) -> Result<T, Failure> {
        let key = *self.key.lock().unwrap_or_else(PoisonError::into_inner);
        let first = match self.token.take() {
            Ok(session) => match op(&session, key) {
                Ok(value) => {
                    self.token.put(session);
                    return Ok(value);
                }
                Err(e) if is_session_lost(&e) => describe(&e),
                // The session is dropped, not pooled: tpm2-pkcs11 1.9 leaves the operation
                // active after a failed C_Decrypt (CKR_OPERATION_ACTIVE on the next call).
                Err(e) => return Err(Failure::Token(e)),
            },
            Err(e) => e.to_string(),
        };
        tracing::warn!(token = %self.token.name(), error = %first, "PKCS#11 session lost; reconnecting");
        self.token.clear();
        let unavailable = |why: String| {
            Failure::Root(RootError::new(
                ErrorKind::Unavailable,
                format!("{} is unavailable: {why}", self.token.name()),
            ))
        };
        let session = self.token.open_session().map_err(|e| match e.kind() {
            // A PIN that worked at start-up and fails now was changed or locked: an operator
            // must act, retrying will not help.
            ErrorKind::CredentialsRejected => Failure::Root(e),
            _ => unavailable(e.detail().to_string()),
        })?;
        let key = self.refind_key(&session)?;
        match op(&session, key) {
            Ok(value) => {
                self.token.put(session);
                Ok(value)
            }
            Err(e) if is_session_lost(&e) => Err(unavailable(describe(&e))),
            // Dropped, not pooled: see above.
            Err(e) => Err(Failure::Token(e)),
        }
    }

    /// Finds the key again on a fresh session and checks it is still the same key material.
    fn refind_key(&self, session: &Session) -> Result<Keys, Failure> {
        let (key, check) = match self.token.config().mechanism {
            WrapMechanism::AesGcm => {
                let key = find_key(session, &self.token).map_err(Failure::Root)?;
                let check = check_value(session, key).map_err(|why| {
                    Failure::Root(RootError::new(
                        ErrorKind::Unavailable,
                        format!("{} is unavailable: {why}", self.token.name()),
                    ))
                })?;
                (
                    Keys {
                        wrap: key,
                        unwrap: key,
                    },
                    check,
                )
            }
            WrapMechanism::RsaOaep => {
                let (keys, identity, _) =
                    rsa_oaep::locate(session, &self.token).map_err(Failure::Root)?;
                (keys, identity)
            }
        };
        if check != self.check {
            return Err(Failure::Root(RootError::new(
                ErrorKind::KeyDisabled,
                format!(
                    "the key labelled \"{}\" on {} is no longer the key this plugin started with \
                 (deleted and re-created?); restart the plugin to adopt the new key",
                    self.token.config().key_label,
                    self.token.name()
                ),
            )));
        }
        *self.key.lock().unwrap_or_else(PoisonError::into_inner) = key;
        Ok(key)
    }
}

impl RootKey for Pkcs11Root {
    fn provider(&self) -> &'static str {
        "pkcs11"
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
            if let Some(rsa) = &self.rsa {
                return self.wrap_rsa(rsa, kek, ctx).await;
            }
            let aad = ctx.aad();
            let plain = Zeroizing::new(*kek.expose_secret());
            let (iv, body) = self
                .run(move |session, keys| {
                    let mut iv = [0u8; IV_LEN];
                    OsRng.fill_bytes(&mut iv);
                    let body = {
                        // GcmParams points at `iv` itself; a FIPS token ignores our IV and
                        // writes the one it generated there, so read it after the call.
                        let params = GcmParams::new(&mut iv, &aad, ((TAG_LEN * 8) as u64).into())?;
                        session.encrypt(&Mechanism::AesGcm(params), keys.wrap, plain.as_slice())?
                    };
                    Ok((iv, body))
                })
                .await
                .map_err(|f| self.failure(f, "wrap"))?;
            if body.len() != KEY_LEN + TAG_LEN {
                return Err(RootError::new(
                    ErrorKind::Unavailable,
                    format!(
                        "{} returned {} bytes for an AES-GCM wrap, expected {}",
                        self.inner.token.name(),
                        body.len(),
                        KEY_LEN + TAG_LEN
                    ),
                ));
            }
            Ok([&iv[..], &body].concat())
        })
    }

    fn unwrap<'a>(
        &'a self,
        wrapped: &'a [u8],
        ctx: &'a WrapContext,
    ) -> BoxFuture<'a, Result<Key256, RootError>> {
        Box::pin(async move {
            if let Some(rsa) = &self.rsa {
                return self.unwrap_rsa(rsa, wrapped, ctx).await;
            }
            let (iv, body) = gcm::split(wrapped)?;
            let body = body.to_vec();
            let aad = ctx.aad();
            let plain = self
                .run(move |session, keys| {
                    let mut iv = iv;
                    let params = GcmParams::new(&mut iv, &aad, ((TAG_LEN * 8) as u64).into())?;
                    session
                        .decrypt(&Mechanism::AesGcm(params), keys.unwrap, &body)
                        .map(Zeroizing::new)
                })
                .await
                .map_err(|f| match f {
                    // SoftHSM 2.6 reports a GCM tag mismatch as CKR_GENERAL_ERROR; others
                    // use CKR_ENCRYPTED_DATA_INVALID. The blob is well-formed, so either
                    // means it does not authenticate under this key and context.
                    Failure::Token(Error::Pkcs11(
                        RvError::GeneralError
                        | RvError::EncryptedDataInvalid
                        | RvError::EncryptedDataLenRange
                        | RvError::DataInvalid,
                        _,
                    )) => RootError::bare(ErrorKind::NotAuthentic),
                    other => self.failure(other, "unwrap"),
                })?;
            unwrapped_key(&plain)
        })
    }
}

impl Pkcs11Root {
    pub(super) fn failure(&self, failure: Failure, what: &str) -> RootError {
        match failure {
            Failure::Root(e) => e,
            Failure::Token(e) => {
                let why = format!("{what} on {}: {}", self.inner.token.name(), describe(&e));
                match e {
                    Error::Pkcs11(RvError::KeyFunctionNotPermitted, _) => {
                        RootError::new(ErrorKind::Denied, why)
                    }
                    Error::Pkcs11(
                        RvError::KeyTypeInconsistent
                        | RvError::MechanismInvalid
                        | RvError::MechanismParamInvalid,
                        _,
                    ) => RootError::new(ErrorKind::Misconfigured, why),
                    Error::Pkcs11(RvError::PinExpired | RvError::PinLocked, _) => {
                        RootError::new(ErrorKind::CredentialsRejected, why)
                    }
                    _ => RootError::new(ErrorKind::Unavailable, why),
                }
            }
        }
    }
}

/// Runs start-up work on `token` off the async threads, within [`STARTUP_TIMEOUT`]. A
/// thread stuck in a hung token is left behind; the caller gets an error.
pub(super) async fn blocking<T: Send + 'static>(
    token: &str,
    what: &str,
    work: impl FnOnce() -> Result<T, RootError> + Send + 'static,
) -> Result<T, RootError> {
    match tokio::time::timeout(STARTUP_TIMEOUT, tokio::task::spawn_blocking(work)).await {
        Ok(done) => done.map_err(|e| {
            RootError::new(
                ErrorKind::Misconfigured,
                format!("PKCS#11 start-up task failed: {e}"),
            )
        })?,
        Err(_) => Err(RootError::new(
            ErrorKind::Unavailable,
            format!(
                "{token} did not answer within {} s while {what}; check that the HSM is up and \
             reachable",
                STARTUP_TIMEOUT.as_secs()
            ),
        )),
    }
}

/// Finds the AES key, checks its attributes, and computes its check value.
fn locate_aes(session: &Session, token: &Token) -> Result<(Keys, Vec<u8>), RootError> {
    let key = find_key(session, token)?;
    check_attributes(session, key, token)?;
    let check = check_value(session, key).map_err(|why| {
        RootError::new(
            ErrorKind::Misconfigured,
            format!(
                "the key labelled \"{}\" on {} cannot give a check value: {why}",
                token.config().key_label,
                token.name(),
            ),
        )
    })?;
    Ok((
        Keys {
            wrap: key,
            unwrap: key,
        },
        check,
    ))
}

fn key_cka_id(config: &Config) -> Option<Vec<u8>> {
    config
        .key_id_hex
        .as_deref()
        .and_then(|h| hex::decode(h).ok())
}

/// AES secret keys with the configured label (and CKA_ID).
fn find_keys(session: &Session, config: &Config) -> Result<Vec<ObjectHandle>, Error> {
    let mut template = vec![
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::AES),
        Attribute::Label(config.key_label.as_bytes().to_vec()),
    ];
    if let Some(id) = key_cka_id(config) {
        template.push(Attribute::Id(id));
    }
    session.find_objects(&template)
}

fn lookup_error(token: &Token, e: &Error) -> RootError {
    RootError::new(
        ErrorKind::Unavailable,
        format!("cannot search {} for keys: {}", token.name(), describe(e)),
    )
}

/// The one key the config names, or a message saying what is missing.
fn find_key(session: &Session, token: &Token) -> Result<ObjectHandle, RootError> {
    let config = token.config();
    let keys = find_keys(session, config).map_err(|e| lookup_error(token, &e))?;
    let with_id = match &config.key_id_hex {
        Some(id) => format!(" with CKA_ID {id}"),
        None => String::new(),
    };
    match keys.as_slice() {
        [key] => Ok(*key),
        [] => Err(RootError::new(
            ErrorKind::KeyDisabled,
            format!(
                "no AES key labelled \"{}\"{with_id} on {} (create it with `kms-plugin keygen`)",
                config.key_label,
                token.name()
            ),
        )),
        more => Err(RootError::new(
            ErrorKind::Misconfigured,
            format!(
                "{} AES keys labelled \"{}\"{with_id} on {}; set key_id_hex to pick one",
                more.len(),
                config.key_label,
                token.name()
            ),
        )),
    }
}

/// Refuses keys that are not AES-256, cannot encrypt and decrypt, or could leave the token.
fn check_attributes(session: &Session, key: ObjectHandle, token: &Token) -> Result<(), RootError> {
    let config = token.config();
    let attrs = session
        .get_attributes(
            key,
            &[
                AttributeType::ValueLen,
                AttributeType::Sensitive,
                AttributeType::Extractable,
                AttributeType::Encrypt,
                AttributeType::Decrypt,
            ],
        )
        .map_err(|e| {
            RootError::new(
                ErrorKind::Misconfigured,
                format!(
                    "cannot read the attributes of key \"{}\" on {}: {}",
                    config.key_label,
                    token.name(),
                    describe(&e)
                ),
            )
        })?;
    let (mut len, mut sensitive, mut extractable, mut encrypt, mut decrypt) =
        (None, None, None, false, false);
    for attr in attrs {
        match attr {
            Attribute::ValueLen(n) => len = Some(u64::from(n)),
            Attribute::Sensitive(b) => sensitive = Some(b),
            Attribute::Extractable(b) => extractable = Some(b),
            Attribute::Encrypt(b) => encrypt = b,
            Attribute::Decrypt(b) => decrypt = b,
            _ => {}
        }
    }
    let named = format!(
        "the key labelled \"{}\" on {}",
        config.key_label,
        token.name()
    );
    if len != Some(KEY_LEN as u64) {
        return Err(RootError::new(
            ErrorKind::Misconfigured,
            format!("{named} is not an AES-256 key (CKA_VALUE_LEN {len:?}, need {KEY_LEN})"),
        ));
    }
    if !(encrypt && decrypt) {
        return Err(RootError::new(
            ErrorKind::Misconfigured,
            format!("{named} needs CKA_ENCRYPT and CKA_DECRYPT set"),
        ));
    }
    if !config.allow_extractable {
        // Unknown (unreadable) counts as unsafe: the point of an HSM is that the key stays in it.
        if extractable != Some(false) {
            return Err(RootError::new(
                ErrorKind::Misconfigured,
                format!(
                    "{named} is extractable (CKA_EXTRACTABLE is not false), so it could be exported \
                 from the token; generate a non-extractable key or set allow_extractable = true"
                ),
            ));
        }
        if sensitive != Some(true) {
            return Err(RootError::new(
                ErrorKind::Misconfigured,
                format!(
                    "{named} is not sensitive (CKA_SENSITIVE is not true), so its value can be read \
                 out of the token; generate a sensitive key or set allow_extractable = true"
                ),
            ));
        }
    }
    Ok(())
}

/// A value that identifies the key material without revealing it: the token encrypts a
/// fixed block, and the key_id is a hash of the result. It must be the same on every run, or
/// data wrapped before a restart becomes unreadable, so it never depends on an IV the token
/// may choose, and the steps below only move on after a refusal (deterministic per token):
///
/// 1. AES-ECB of the block: what existing deployments' key_ids come from.
/// 2. Tokens that refuse ECB: AES-GCM with an all-zero IV over no plaintext, the block as
///    AAD (a pure tag, prefixed `g`), the value earlier versions used there. Kept only if the
///    IV buffer is still all-zero after the call: FIPS HSMs ignore the caller's IV and write
///    back a random one, which would make the tag differ on every run.
/// 3. Tokens that replace the GCM IV or refuse these GCM parameters: AES-CBC with an all-zero
///    IV over the one block, which is the ECB value itself (AES(K, block XOR 0)), so such a
///    token gives the same key_id as one that allows ECB.
///
/// The error says what the token refused, for start-up and reconnect messages.
pub(super) fn check_value(session: &Session, key: ObjectHandle) -> Result<Vec<u8>, String> {
    let refused_ecb = match session.encrypt(&Mechanism::AesEcb, key, CHECK_BLOCK) {
        Ok(check) => return Ok(check),
        Err(e @ Error::Pkcs11(RvError::MechanismInvalid | RvError::KeyFunctionNotPermitted, _)) => {
            e
        }
        Err(e) => return Err(describe(&e)),
    };
    let refused = |e: &Error| {
        matches!(
            e,
            Error::Pkcs11(
                RvError::MechanismInvalid
                    | RvError::MechanismParamInvalid
                    | RvError::KeyFunctionNotPermitted,
                _
            )
        )
    };
    match gcm_check_value(session, key) {
        Ok(Some(check)) => return Ok(check),
        Ok(None) => {}
        Err(e) if refused(&e) => {}
        Err(e) => return Err(describe(&e)),
    }
    cbc_check_value(session, key).map_err(|e| {
        if refused(&e) {
            format!(
                "the token refused AES-ECB ({}), AES-GCM with a caller-chosen IV, and AES-CBC \
                 ({}); it must allow one of them on this key",
                describe(&refused_ecb),
                describe(&e)
            )
        } else {
            describe(&e)
        }
    })
}

/// Step 2 of [`check_value`]: `None` if the token replaced the all-zero IV.
pub(super) fn gcm_check_value(
    session: &Session,
    key: ObjectHandle,
) -> Result<Option<Vec<u8>>, Error> {
    let mut iv = [0u8; IV_LEN];
    let tag = {
        let params = GcmParams::new(&mut iv, CHECK_BLOCK, 128.into())?;
        session.encrypt(&Mechanism::AesGcm(params), key, &[])?
    };
    if iv != [0u8; IV_LEN] {
        return Ok(None);
    }
    let mut check = Vec::with_capacity(1 + tag.len());
    check.push(b'g');
    check.extend_from_slice(&tag);
    Ok(Some(check))
}

/// Step 3 of [`check_value`]: equal to the ECB value.
pub(super) fn cbc_check_value(session: &Session, key: ObjectHandle) -> Result<Vec<u8>, Error> {
    session.encrypt(&Mechanism::AesCbc([0u8; 16]), key, CHECK_BLOCK)
}

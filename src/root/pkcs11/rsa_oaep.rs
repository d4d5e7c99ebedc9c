//! `mechanism = "rsa-oaep"`: the root key is an RSA key pair in the token, for tokens that
//! have no AES-GCM: a TPM 2.0 through tpm2-pkcs11, smart-card HSMs. The private key
//! decrypts inside the token; the public key object encrypts.
//!
//! Wrapped blob:
//!
//! ```text
//! version (1) || OAEP(seed) (modulus length) || nonce (12) || AES-256-GCM(K, local KEK) (32 + 16)
//! K   = HMAC-SHA256(key = S, "kms-plugin rsa-oaep wrap v1" || seed || ctx)
//! AAD = version || OAEP(seed) || ctx            where ctx = WrapContext::aad()
//! S   = SHA-256("kms-plugin rsa-oaep binding v1" || RSASSA-PKCS1-v1_5-SHA256(private key, BIND))
//! ```
//!
//! `S` is computed once at start-up by the token (a PKCS#1 v1.5 signature is deterministic)
//! and held in memory like a local KEK. Without it, anyone who has the public key could make
//! a blob that unwraps to a local KEK of their choice; with it, making a blob that
//! authenticates needs the private key, as with an AES-GCM root.
//!
//! `seed` is 32 fresh random bytes per wrap, encrypted to the public key with
//! CKM_RSA_PKCS_OAEP (SHA-256 and MGF1-SHA-256, or SHA-1 for both when `oaep_hash = "sha1"`;
//! the version byte says which, so changing the setting keeps old blobs readable) and an
//! empty OAEP label. The context is bound by K and the AAD, not by the OAEP label: SoftHSM2
//! 2.6 refuses any label and tpm2-pkcs11 passes it to a TPM that wants it NUL-terminated,
//! so one construction that needs no label works on every token. A blob moved to another
//! key_id or context, or made without S, derives another K and fails the GCM tag; a flipped
//! bit in the OAEP part fails OAEP decoding in the token or, if it were to decode, the tag
//! (the AAD covers it); a flipped bit elsewhere fails the tag.
//!
//! The key_id comes from the public key (modulus and exponent), so it is stable across
//! restarts and differs for a re-created key pair.

use aes_gcm::{Aes256Gcm, KeyInit};
use cryptoki::error::{Error, RvError};
use cryptoki::mechanism::rsa::{PkcsMgfType, PkcsOaepParams, PkcsOaepSource};
use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use super::Config;
use super::config::OaepHash;
use super::root::{Failure, Keys, Pkcs11Root, blocking};
use super::session::{Token, describe};
use crate::root::gcm::{self, SEALED_LEN};
use crate::root::{ErrorKind, RootError, WrapContext};
use crate::secret::{KEY_LEN, Key256};

/// Smallest modulus accepted, whatever `allow_extractable` says.
const MIN_BITS: usize = 2048;
const SEED_LEN: usize = 32;
/// First byte of a blob: format 1 with OAEP over SHA-256 ...
const V1_SHA256: u8 = 1;
/// ... or over SHA-1.
const V1_SHA1: u8 = 2;
const DERIVE_LABEL: &[u8] = b"kms-plugin rsa-oaep wrap v1";
/// What the private key signs to give S.
const BIND_MESSAGE: &[u8] = b"kms-plugin rsa-oaep binding v1: sign only to derive the wrap secret";
const BIND_LABEL: &[u8] = b"kms-plugin rsa-oaep binding v1";

/// What the plugin knows of the key pair once it is found.
#[derive(Debug, Clone, Copy)]
pub(super) struct RsaShape {
    /// Modulus length in bytes: the length of every OAEP ciphertext.
    modulus_len: usize,
    /// The hash new wraps use.
    hash: OaepHash,
}

/// An opened key pair: its shape and the secret S only its private key can compute.
pub(super) struct RsaKey {
    shape: RsaShape,
    secret: Key256,
}

fn oaep(hash: OaepHash) -> Mechanism<'static> {
    let (alg, mgf) = match hash {
        OaepHash::Sha256 => (MechanismType::SHA256, PkcsMgfType::MGF1_SHA256),
        OaepHash::Sha1 => (MechanismType::SHA1, PkcsMgfType::MGF1_SHA1),
    };
    Mechanism::RsaPkcsOaep(PkcsOaepParams::new(alg, mgf, PkcsOaepSource::empty()))
}

fn version(hash: OaepHash) -> u8 {
    match hash {
        OaepHash::Sha256 => V1_SHA256,
        OaepHash::Sha1 => V1_SHA1,
    }
}

fn hash_of(version: u8) -> Option<OaepHash> {
    match version {
        V1_SHA256 => Some(OaepHash::Sha256),
        V1_SHA1 => Some(OaepHash::Sha1),
        _ => None,
    }
}

/// The AES-GCM cipher for one blob: K from S, the seed (always [`SEED_LEN`] bytes) and the
/// context.
fn cipher(secret: &Key256, seed: &[u8], ctx_aad: &[u8]) -> Result<Aes256Gcm, RootError> {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret.expose_secret())
        .map_err(|_| RootError::new(ErrorKind::Unavailable, "HMAC refused the key length"))?;
    mac.update(DERIVE_LABEL);
    mac.update(seed);
    mac.update(ctx_aad);
    let mut k = Zeroizing::new([0u8; KEY_LEN]);
    k.copy_from_slice(&mac.finalize().into_bytes());
    Ok(Aes256Gcm::new((&*k).into()))
}

/// AAD of the GCM layer: everything in the blob before the nonce, then the context.
fn gcm_aad(head: &[u8], ctx_aad: &[u8]) -> Vec<u8> {
    let mut aad = Vec::with_capacity(head.len() + ctx_aad.len());
    aad.extend_from_slice(head);
    aad.extend_from_slice(ctx_aad);
    aad
}

/// Completes a blob whose `head` (version || OAEP(seed)) is known.
pub(super) fn seal(
    head: Vec<u8>,
    secret: &Key256,
    seed: &[u8],
    ctx_aad: &[u8],
    kek: &Key256,
) -> Result<Vec<u8>, RootError> {
    let aad = gcm_aad(&head, ctx_aad);
    gcm::seal(head, &cipher(secret, seed, ctx_aad)?, &aad, kek)
}

/// The local KEK in a blob whose seed the token has decrypted.
fn open_sealed(
    blob: &[u8],
    head_len: usize,
    secret: &Key256,
    seed: &[u8],
    ctx_aad: &[u8],
) -> Result<Key256, RootError> {
    let (head, sealed) = blob.split_at(head_len);
    gcm::open(
        &cipher(secret, seed, ctx_aad)?,
        &gcm_aad(head, ctx_aad),
        sealed,
    )
}

impl Pkcs11Root {
    pub(super) async fn wrap_rsa(
        &self,
        rsa: &RsaKey,
        kek: &Key256,
        ctx: &WrapContext,
    ) -> Result<Vec<u8>, RootError> {
        let seed = std::sync::Arc::new(Key256::generate());
        let for_token = std::sync::Arc::clone(&seed);
        let hash = rsa.shape.hash;
        let encrypted = self
            .run(move |session, keys| {
                session.encrypt(&oaep(hash), keys.wrap, for_token.expose_secret())
            })
            .await
            .map_err(|f| self.rsa_failure(f, "wrap"))?;
        if encrypted.len() != rsa.shape.modulus_len {
            return Err(RootError::new(
                ErrorKind::Unavailable,
                format!(
                    "{} returned {} bytes for an RSA-OAEP encryption, expected {}",
                    self.inner.token.name(),
                    encrypted.len(),
                    rsa.shape.modulus_len
                ),
            ));
        }
        let mut head = Vec::with_capacity(1 + encrypted.len() + SEALED_LEN);
        head.push(version(hash));
        head.extend_from_slice(&encrypted);
        seal(head, &rsa.secret, seed.expose_secret(), &ctx.aad(), kek)
    }

    pub(super) async fn unwrap_rsa(
        &self,
        rsa: &RsaKey,
        wrapped: &[u8],
        ctx: &WrapContext,
    ) -> Result<Key256, RootError> {
        let head_len = 1 + rsa.shape.modulus_len;
        if wrapped.len() != head_len + SEALED_LEN {
            return Err(RootError::bare(ErrorKind::NotAuthentic));
        }
        let hash = hash_of(wrapped[0]).ok_or_else(|| RootError::bare(ErrorKind::NotAuthentic))?;
        let encrypted = wrapped[1..head_len].to_vec();
        let decrypted = self
            .run(move |session, keys| {
                session
                    .decrypt(&oaep(hash), keys.unwrap, &encrypted)
                    .map(Zeroizing::new)
            })
            .await;
        let seed = match decrypted {
            Ok(seed) => seed,
            // OAEP decoding failed, or the token could not run the decryption at all:
            // tpm2-pkcs11 reports both a blob the TPM refuses and a TPM it cannot reach as
            // CKR_GENERAL_ERROR. A round trip with a probe of our own tells them apart, so
            // that a TPM outage is retried instead of the blob being remembered as forged.
            Err(Failure::Token(
                e @ Error::Pkcs11(
                    RvError::GeneralError
                    | RvError::EncryptedDataInvalid
                    | RvError::EncryptedDataLenRange
                    | RvError::DataInvalid
                    | RvError::DataLenRange,
                    _,
                ),
            )) => {
                let shape = rsa.shape;
                let probe = self
                    .run(move |session, keys| probe_round_trip(session, keys, shape))
                    .await;
                return Err(match probe {
                    Ok(true) => RootError::bare(ErrorKind::NotAuthentic),
                    Ok(false) => RootError::new(
                        ErrorKind::Unavailable,
                        format!(
                            "unwrap on {}: {}, and the token decrypted a probe wrongly",
                            self.inner.token.name(),
                            describe(&e)
                        ),
                    ),
                    Err(f) => {
                        let why = self.rsa_failure(f, "unwrap probe");
                        RootError::new(
                            ErrorKind::Unavailable,
                            format!(
                                "unwrap on {}: {}; {}",
                                self.inner.token.name(),
                                describe(&e),
                                why.detail()
                            ),
                        )
                    }
                });
            }
            // The blob names an OAEP hash other than the configured one (which the
            // start-up self-test proved) and the token refuses it: anyone can write that
            // byte, so it says nothing about the root's health.
            Err(Failure::Token(Error::Pkcs11(
                RvError::ArgumentsBad | RvError::MechanismInvalid | RvError::MechanismParamInvalid,
                _,
            ))) if hash != rsa.shape.hash => return Err(RootError::bare(ErrorKind::NotAuthentic)),
            Err(other) => return Err(self.rsa_failure(other, "unwrap")),
        };
        if seed.len() != SEED_LEN {
            return Err(RootError::bare(ErrorKind::NotAuthentic));
        }
        open_sealed(wrapped, head_len, &rsa.secret, &seed, &ctx.aad())
    }

    /// Like [`Pkcs11Root::failure`], plus the refusals that mean this token cannot do
    /// these OAEP parameters.
    fn rsa_failure(&self, failure: Failure, what: &str) -> RootError {
        match failure {
            Failure::Token(
                e @ Error::Pkcs11(RvError::ArgumentsBad | RvError::MechanismParamInvalid, _),
            ) => RootError::new(
                ErrorKind::Misconfigured,
                format!(
                    "{what} on {}: {}; the token refuses these RSA-OAEP parameters{}",
                    self.inner.token.name(),
                    describe(&e),
                    SHA1_HINT
                ),
            ),
            other => self.failure(other, what),
        }
    }
}

const SHA1_HINT: &str =
    " (tokens such as SoftHSM2 2.6 do OAEP only with SHA-1: set oaep_hash = \"sha1\")";

/// Encrypts random bytes with the public key and decrypts them with the private key:
/// whether the token's decryption works right now.
fn probe_round_trip(session: &Session, keys: Keys, shape: RsaShape) -> Result<bool, Error> {
    let probe = Key256::generate();
    let encrypted = session.encrypt(&oaep(shape.hash), keys.wrap, probe.expose_secret())?;
    let decrypted = Zeroizing::new(session.decrypt(&oaep(shape.hash), keys.unwrap, &encrypted)?);
    Ok(decrypted.as_slice() == probe.expose_secret())
}

/// RSA key objects of `class` with the configured label (and CKA_ID).
fn find(
    session: &Session,
    config: &Config,
    class: ObjectClass,
) -> Result<Vec<ObjectHandle>, Error> {
    let mut template = vec![
        Attribute::Class(class),
        Attribute::KeyType(KeyType::RSA),
        Attribute::Label(config.key_label.as_bytes().to_vec()),
    ];
    if let Some(id) = config.key_cka_id() {
        template.push(Attribute::Id(id));
    }
    session.find_objects(&template)
}

/// The one object of `class` the config names.
fn find_one(
    session: &Session,
    token: &Token,
    class: ObjectClass,
) -> Result<ObjectHandle, RootError> {
    let config = token.config();
    let what = if class == ObjectClass::PRIVATE_KEY {
        "RSA private key"
    } else {
        "RSA public key"
    };
    let found = find(session, config, class).map_err(|e| {
        RootError::new(
            ErrorKind::Unavailable,
            format!("cannot search {} for keys: {}", token.name(), describe(&e)),
        )
    })?;
    let with_id = match &config.key_id_hex {
        Some(id) => format!(" with CKA_ID {id}"),
        None => String::new(),
    };
    match found.as_slice() {
        [one] => Ok(*one),
        [] => Err(RootError::new(
            ErrorKind::KeyDisabled,
            format!(
                "no {what} labelled \"{}\"{with_id} on {} (create the pair with `kms-plugin keygen`)",
                config.key_label,
                token.name()
            ),
        )),
        more => Err(RootError::new(
            ErrorKind::Misconfigured,
            format!(
                "{} {what}s labelled \"{}\"{with_id} on {}; set key_id_hex to pick one",
                more.len(),
                config.key_label,
                token.name()
            ),
        )),
    }
}

/// A big-endian integer without leading zero bytes, so tokens that pad agree.
fn trimmed(bytes: &[u8]) -> &[u8] {
    let start = bytes.iter().position(|b| *b != 0).unwrap_or(bytes.len());
    &bytes[start..]
}

/// Finds the key pair, refuses one that is too small, mismatched or could leave the token,
/// and returns its handles, the identity the key_id derives from, and its shape.
pub(super) fn locate(
    session: &Session,
    token: &Token,
) -> Result<(Keys, Vec<u8>, RsaShape), RootError> {
    let config = token.config();
    let private = find_one(session, token, ObjectClass::PRIVATE_KEY)?;
    let public = find_one(session, token, ObjectClass::PUBLIC_KEY)?;
    let named = format!(
        "the RSA key pair labelled \"{}\" on {}",
        config.key_label,
        token.name()
    );
    let read = |handle, types: &[AttributeType]| {
        session.get_attributes(handle, types).map_err(|e| {
            RootError::new(
                ErrorKind::Unavailable,
                format!("cannot read the attributes of {named}: {}", describe(&e)),
            )
        })
    };
    let (mut modulus, mut exponent, mut encrypt) = (Vec::new(), Vec::new(), false);
    for attr in read(
        public,
        &[
            AttributeType::Modulus,
            AttributeType::PublicExponent,
            AttributeType::Encrypt,
        ],
    )? {
        match attr {
            Attribute::Modulus(m) => modulus = m,
            Attribute::PublicExponent(e) => exponent = e,
            Attribute::Encrypt(b) => encrypt = b,
            _ => {}
        }
    }
    let (mut private_modulus, mut sensitive, mut extractable, mut decrypt) =
        (None, None, None, false);
    for attr in read(
        private,
        &[
            AttributeType::Modulus,
            AttributeType::Sensitive,
            AttributeType::Extractable,
            AttributeType::Decrypt,
        ],
    )? {
        match attr {
            Attribute::Modulus(m) => private_modulus = Some(m),
            Attribute::Sensitive(b) => sensitive = Some(b),
            Attribute::Extractable(b) => extractable = Some(b),
            Attribute::Decrypt(b) => decrypt = b,
            _ => {}
        }
    }
    let modulus = trimmed(&modulus);
    let exponent = trimmed(&exponent);
    let bits = modulus
        .first()
        .map_or(0, |top| modulus.len() * 8 - top.leading_zeros() as usize);
    if bits < MIN_BITS {
        return Err(RootError::new(
            ErrorKind::Misconfigured,
            format!(
                "{named} has a {bits}-bit modulus; rsa-oaep needs at least {MIN_BITS} bits \
             (re-create it with `kms-plugin keygen`, rsa_bits = 2048 or more)"
            ),
        ));
    }
    if exponent.is_empty() {
        return Err(RootError::new(
            ErrorKind::Misconfigured,
            format!("{named}: the public key has no public exponent"),
        ));
    }
    if private_modulus.is_some_and(|m| trimmed(&m) != modulus) {
        return Err(RootError::new(
            ErrorKind::Misconfigured,
            format!(
                "{named}: the public and the private key have different moduli, so they are not \
             one pair; give the pair its own label or CKA_ID (key_id_hex)"
            ),
        ));
    }
    if !(encrypt && decrypt) {
        return Err(RootError::new(
            ErrorKind::Misconfigured,
            format!(
                "{named} needs CKA_ENCRYPT on the public key and CKA_DECRYPT on the private key"
            ),
        ));
    }
    if !config.allow_extractable {
        // Unknown (unreadable) counts as unsafe, as for AES keys.
        if extractable != Some(false) {
            return Err(RootError::new(
                ErrorKind::Misconfigured,
                format!(
                    "{named}: the private key is extractable (CKA_EXTRACTABLE is not false), so it \
                 could be exported from the token; generate a non-extractable key or set \
                 allow_extractable = true"
                ),
            ));
        }
        if sensitive != Some(true) {
            return Err(RootError::new(
                ErrorKind::Misconfigured,
                format!(
                    "{named}: the private key is not sensitive (CKA_SENSITIVE is not true), so its \
                 value can be read out of the token; generate a sensitive key or set \
                 allow_extractable = true"
                ),
            ));
        }
    }
    let mut identity = Vec::with_capacity(16 + modulus.len() + exponent.len());
    identity.extend_from_slice(b"rsa-oaep\0");
    identity.extend_from_slice(&(modulus.len() as u32).to_be_bytes());
    identity.extend_from_slice(modulus);
    identity.extend_from_slice(exponent);
    let keys = Keys {
        wrap: public,
        unwrap: private,
    };
    let shape = RsaShape {
        modulus_len: modulus.len(),
        hash: config.oaep_hash,
    };
    Ok((keys, identity, shape))
}

/// Opens the pair found by [`locate`]: one OAEP round trip, so a token that cannot do the
/// configured parameters, or keys that are not one pair, fail `serve` and `keygen` with a
/// clear message instead of the first Encrypt; then the secret S.
pub(super) fn open(
    session: &Session,
    token: &Token,
    keys: Keys,
    shape: RsaShape,
) -> Result<RsaKey, RootError> {
    round_trip(session, token, keys, shape)?;
    let signature = Zeroizing::new(
        session
            .sign(&Mechanism::Sha256RsaPkcs, keys.unwrap, BIND_MESSAGE)
            .map_err(|e| {
                RootError::new(
                    ErrorKind::Misconfigured,
                    format!(
                        "{}: the private key labelled \"{}\" cannot sign with \
                     CKM_SHA256_RSA_PKCS ({}); rsa-oaep needs CKA_SIGN on it to derive the \
                     secret that authenticates wrapped keys (`kms-plugin keygen` sets it)",
                        token.name(),
                        token.config().key_label,
                        describe(&e)
                    ),
                )
            })?,
    );
    let mut hash = Sha256::new();
    hash.update(BIND_LABEL);
    hash.update(signature.as_slice());
    let secret = Key256::from_slice(&hash.finalize())
        .ok_or_else(|| RootError::new(ErrorKind::Unavailable, "SHA-256 gave a short digest"))?;
    Ok(RsaKey { shape, secret })
}

fn round_trip(
    session: &Session,
    token: &Token,
    keys: Keys,
    rsa: RsaShape,
) -> Result<(), RootError> {
    let probe = Key256::generate();
    let refused = |step: &str, e: Error| {
        let hint = match e {
            Error::Pkcs11(
                RvError::ArgumentsBad | RvError::MechanismParamInvalid | RvError::MechanismInvalid,
                _,
            ) if rsa.hash == OaepHash::Sha256 => SHA1_HINT,
            _ => "",
        };
        RootError::new(
            ErrorKind::Misconfigured,
            format!(
                "{} cannot {step} with RSA-OAEP ({}) using the key pair labelled \"{}\": {}{hint}",
                token.name(),
                match rsa.hash {
                    OaepHash::Sha256 => "SHA-256",
                    OaepHash::Sha1 => "SHA-1",
                },
                token.config().key_label,
                describe(&e)
            ),
        )
    };
    let encrypted = session
        .encrypt(&oaep(rsa.hash), keys.wrap, probe.expose_secret())
        .map_err(|e| refused("encrypt", e))?;
    let decrypted = Zeroizing::new(
        session
            .decrypt(&oaep(rsa.hash), keys.unwrap, &encrypted)
            .map_err(|e| refused("decrypt", e))?,
    );
    if decrypted.as_slice() != probe.expose_secret() {
        return Err(RootError::new(
            ErrorKind::Misconfigured,
            format!(
                "{}: the private key labelled \"{}\" does not decrypt what its public key encrypts",
                token.name(),
                token.config().key_label
            ),
        ));
    }
    Ok(())
}

/// `kms-plugin keygen` for rsa-oaep: generates the pair unless a private key with the
/// label (and CKA_ID) exists. Returns whether it created one.
pub(super) async fn create(config: &Config) -> Result<bool, RootError> {
    let name = config.token_name();
    let config = config.clone();
    blocking(&name, "generating the RSA key pair", move || {
        let token = Token::new(&config)?;
        let session = token.open_session()?;
        let existing = find(&session, &config, ObjectClass::PRIVATE_KEY).map_err(|e| {
            RootError::new(
                ErrorKind::Unavailable,
                format!("cannot search {} for keys: {}", token.name(), describe(&e)),
            )
        })?;
        if !existing.is_empty() {
            return Ok(false);
        }
        let label = Attribute::Label(config.key_label.as_bytes().to_vec());
        let mut public = vec![
            Attribute::Token(true),
            Attribute::Encrypt(true),
            Attribute::ModulusBits(u64::from(config.rsa_bits).into()),
            Attribute::PublicExponent(vec![0x01, 0x00, 0x01]),
            label.clone(),
        ];
        let mut private = vec![
            Attribute::Token(true),
            Attribute::Private(true),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::Decrypt(true),
            // For S (see the module comment), never for signing anything else.
            Attribute::Sign(true),
            label,
        ];
        if let Some(id) = config.key_cka_id() {
            public.push(Attribute::Id(id.clone()));
            private.push(Attribute::Id(id));
        }
        session
            .generate_key_pair(&Mechanism::RsaPkcsKeyPairGen, &public, &private)
            .map_err(|e| {
                let hint = match e {
                    Error::Pkcs11(
                        RvError::KeySizeRange
                        | RvError::AttributeValueInvalid
                        | RvError::TemplateInconsistent,
                        _,
                    ) if config.rsa_bits != 2048 => {
                        " (many TPMs generate only 2048-bit keys: set rsa_bits = 2048)"
                    }
                    _ => "",
                };
                RootError::new(
                    ErrorKind::Misconfigured,
                    format!(
                        "cannot generate an RSA-{} key pair on {}: {}{hint}",
                        config.rsa_bits,
                        token.name(),
                        describe(&e)
                    ),
                )
            })?;
        Ok(true)
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::root::KeyId;

    fn ctx(n: &[u8]) -> Vec<u8> {
        WrapContext::new(&KeyId::derive("pkcs11", n)).aad()
    }

    /// The GCM layer alone (the token's part stands in as fixed bytes): the context and
    /// every byte of the blob are authenticated.
    #[test]
    fn sealed_blob_is_bound_to_context_and_every_byte() {
        let secret = Key256::generate();
        let seed = Key256::generate();
        let kek = Key256::generate();
        let head = {
            let mut h = vec![V1_SHA256];
            h.extend_from_slice(&[0x5a; 256]);
            h
        };
        let blob = seal(head, &secret, seed.expose_secret(), &ctx(b"a"), &kek).expect("seal");
        assert_eq!(blob.len(), 1 + 256 + SEALED_LEN);
        let opened =
            open_sealed(&blob, 257, &secret, seed.expose_secret(), &ctx(b"a")).expect("open");
        assert_eq!(opened.expose_secret(), kek.expose_secret());
        assert!(matches!(
            open_sealed(&blob, 257, &secret, seed.expose_secret(), &ctx(b"b")),
            Err(e) if e.kind() == ErrorKind::NotAuthentic
        ));
        let other = Key256::generate();
        assert!(open_sealed(&blob, 257, &secret, other.expose_secret(), &ctx(b"a")).is_err());
        // S is what a forger with only the public key lacks.
        assert!(matches!(
            open_sealed(&blob, 257, &other, seed.expose_secret(), &ctx(b"a")),
            Err(e) if e.kind() == ErrorKind::NotAuthentic
        ));
        for i in 0..blob.len() {
            let mut bad = blob.clone();
            bad[i] ^= 0x01;
            assert!(
                matches!(
                    open_sealed(&bad, 257, &secret, seed.expose_secret(), &ctx(b"a")),
                    Err(e) if e.kind() == ErrorKind::NotAuthentic
                ),
                "flipped byte {i} accepted"
            );
        }
    }

    #[test]
    fn version_byte_names_the_hash() {
        for hash in [OaepHash::Sha256, OaepHash::Sha1] {
            assert_eq!(hash_of(version(hash)), Some(hash));
        }
        assert_eq!(hash_of(0), None);
        assert_eq!(hash_of(3), None);
    }
}

//! The AES-256-GCM sealed local KEK that the `file` root stores and `pkcs11` makes in its
//! token (and that ends its rsa-oaep blobs): a 12-byte IV, the 32-byte encrypted key and
//! the 16-byte tag, with the caller's associated data. One layout, checked in one place.

use aes_gcm::aead::{Aead, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use rand::RngCore;
use rand::rngs::OsRng;
use zeroize::Zeroizing;

use super::{ErrorKind, RootError, unwrapped_key};
use crate::secret::{KEY_LEN, Key256};

pub(crate) const IV_LEN: usize = 12;
pub(crate) const TAG_LEN: usize = 16;
/// IV + encrypted key + tag.
pub(crate) const SEALED_LEN: usize = IV_LEN + KEY_LEN + TAG_LEN;

/// The IV and the rest (encrypted key and tag) of a sealed key; not authentic if `sealed`
/// is not [`SEALED_LEN`] bytes.
pub(crate) fn split(sealed: &[u8]) -> Result<([u8; IV_LEN], &[u8]), RootError> {
    if sealed.len() != SEALED_LEN {
        return Err(RootError::bare(ErrorKind::NotAuthentic));
    }
    let (iv, body) = sealed.split_at(IV_LEN);
    let mut out = [0u8; IV_LEN];
    out.copy_from_slice(iv);
    Ok((out, body))
}

/// Appends to `out` `kek` sealed under `cipher` with `aad` and a fresh random IV.
pub(crate) fn seal(
    mut out: Vec<u8>,
    cipher: &Aes256Gcm,
    aad: &[u8],
    kek: &Key256,
) -> Result<Vec<u8>, RootError> {
    let mut iv = [0u8; IV_LEN];
    OsRng.fill_bytes(&mut iv);
    let payload = Payload {
        msg: kek.expose_secret(),
        aad,
    };
    let body = cipher
        .encrypt(Nonce::from_slice(&iv), payload)
        .map_err(|_| RootError::new(ErrorKind::Unavailable, "AES-GCM refused to encrypt"))?;
    out.reserve(SEALED_LEN);
    out.extend_from_slice(&iv);
    out.extend_from_slice(&body);
    Ok(out)
}

/// The local KEK in `sealed` ([`seal`]'s output), if it authenticates under `cipher` and
/// `aad`.
pub(crate) fn open(cipher: &Aes256Gcm, aad: &[u8], sealed: &[u8]) -> Result<Key256, RootError> {
    let (iv, body) = split(sealed)?;
    let payload = Payload { msg: body, aad };
    let plain = Zeroizing::new(
        cipher
            .decrypt(Nonce::from_slice(&iv), payload)
            .map_err(|_| RootError::bare(ErrorKind::NotAuthentic))?,
    );
    unwrapped_key(&plain)
}

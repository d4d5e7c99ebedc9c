//! The envelope: how a DEK seed from kube-apiserver is sealed under a local KEK.
//!
//! Wire format of the `ciphertext` this plugin returns (version 1):
//!
//! ```text
//! [0x01][12-byte nonce][AES-256-GCM ciphertext + 16-byte tag]
//! ```
//!
//! The associated data binds the format version, the key_id the response carried and a
//! digest of every annotation (the wrapped copies of the local KEK), so a ciphertext cannot
//! be replayed under another key_id or next to another wrapped KEK. The annotations carry
//! the local KEK wrapped by each root key; see [`annotations`].

pub mod annotations;

use std::mem::ManuallyDrop;

use aes_gcm::aead::{Aead, AeadInPlace, Payload};
use aes_gcm::{AeadCore, Aes256Gcm, KeyInit, Nonce};
use sha2::{Digest, Sha256};
use zeroize::{Zeroize, Zeroizing};

use crate::secret::Key256;

/// The first byte of every ciphertext this version writes.
pub const FORMAT_V1: u8 = 1;
const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;
/// Bytes a sealed value adds to its plaintext.
pub const OVERHEAD: usize = 1 + NONCE_LEN + TAG_LEN;
/// kube-apiserver discards an EncryptResponse whose ciphertext is longer than this.
pub const MAX_CIPHERTEXT_LEN: usize = 1024;
/// The largest plaintext whose ciphertext still fits the apiserver's limit.
pub const MAX_PLAINTEXT_LEN: usize = MAX_CIPHERTEXT_LEN - OVERHEAD;

/// Why a ciphertext could not be opened. Client-safe: no variant carries secret data.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EnvelopeError {
    /// Empty, too short or too long to be a ciphertext of this plugin.
    #[error("ciphertext has an invalid length")]
    BadLength,
    /// The first byte names a format this version does not know.
    #[error("unknown ciphertext format version {0}")]
    UnknownVersion(u8),
    /// GCM authentication failed: tampered data, wrong key_id or wrong annotations.
    #[error("ciphertext failed authentication")]
    Authentication,
    /// No annotation carries a wrapped local KEK.
    #[error("annotations carry no wrapped key")]
    MissingWrappedKek,
    /// An annotation this plugin never writes, or one whose value cannot be a wrapped key.
    #[error("unexpected or malformed annotation")]
    BadAnnotation,
}

/// A local KEK ready to seal and open: the expanded AES-256-GCM key schedule. The associated
/// data is the caller's: [`associated_data`] for the key_id and annotations a ciphertext
/// travels with.
///
/// Wiped on drop: the `zeroize` features of `aes` and `ghash` clear the round keys, but
/// polyval 0.6's run-time-detected backend keeps the GHASH key H in a `ManuallyDrop` union
/// that nothing drops, so the whole cipher's storage is zeroed here after its own drop.
pub struct KekCipher(ManuallyDrop<Aes256Gcm>);

impl Drop for KekCipher {
    #[allow(unsafe_code)] // zeroizes the AES key schedule in place, see SAFETY
    fn drop(&mut self) {
        let size = std::mem::size_of::<Aes256Gcm>();
        let storage = std::ptr::from_mut::<Aes256Gcm>(&mut self.0).cast::<u8>();
        // SAFETY: dropped exactly once, here; afterwards the storage is plain bytes this
        // struct owns, never read as an `Aes256Gcm` again, so overwriting them is sound.
        unsafe {
            ManuallyDrop::drop(&mut self.0);
            std::slice::from_raw_parts_mut(storage, size).zeroize();
        }
    }
}

impl KekCipher {
    /// Expands `kek`; the caller may drop its copy afterwards.
    pub fn new(kek: &Key256) -> Self {
        Self(ManuallyDrop::new(Aes256Gcm::new(
            kek.expose_secret().into(),
        )))
    }

    /// Seals `plaintext` with a fresh random nonce. The caller enforces [`MAX_PLAINTEXT_LEN`].
    pub fn seal(&self, aad: &[u8], plaintext: &[u8]) -> Vec<u8> {
        // A GCM nonce must never repeat under one key; it need not be secret (it is sent in
        // the ciphertext). rand's ThreadRng is a CSPRNG (ChaCha12 seeded from the OS, reseeded
        // every 64 KiB of output) and gives that like OsRng does, without OsRng's getrandom(2)
        // per Encrypt: one syscall per call was a third of the syscalls a call cost.
        let nonce = Aes256Gcm::generate_nonce(&mut rand::thread_rng());
        // Encrypted in place in the output buffer: one allocation, no intermediate copy.
        let mut out = Vec::with_capacity(OVERHEAD + plaintext.len());
        out.push(FORMAT_V1);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(plaintext);
        let body = out.get_mut(1 + NONCE_LEN..).unwrap_or_default();
        match self.0.encrypt_in_place_detached(&nonce, aad, body) {
            Ok(tag) => out.extend_from_slice(&tag),
            // AES-GCM encryption fails only for inputs of ~64 GiB; ours are under 1 KiB.
            Err(_) => unreachable!("AES-GCM cannot fail on a {} byte input", plaintext.len()),
        }
        out
    }

    /// Opens a ciphertext produced by [`KekCipher::seal`] with the same associated data.
    pub fn open(&self, aad: &[u8], ciphertext: &[u8]) -> Result<Zeroizing<Vec<u8>>, EnvelopeError> {
        check_format(ciphertext)?;
        let (nonce, body) = ciphertext[1..].split_at(NONCE_LEN);
        self.0
            .decrypt(Nonce::from_slice(nonce), Payload { msg: body, aad })
            .map(Zeroizing::new)
            .map_err(|_| EnvelopeError::Authentication)
    }
}

/// Cheap structural checks done before any key is looked up or unwrapped.
pub fn check_format(ciphertext: &[u8]) -> Result<(), EnvelopeError> {
    match ciphertext.first() {
        None => Err(EnvelopeError::BadLength),
        Some(&FORMAT_V1) if (OVERHEAD..=MAX_CIPHERTEXT_LEN).contains(&ciphertext.len()) => Ok(()),
        Some(&FORMAT_V1) => Err(EnvelopeError::BadLength),
        Some(&other) => Err(EnvelopeError::UnknownVersion(other)),
    }
}

/// The associated data of a ciphertext: on the stack (no allocation per Decrypt) for
/// key_ids up to 74 bytes, which is every key_id this plugin makes.
pub type AssociatedData = smallvec::SmallVec<[u8; 128]>;

/// `"kms-plugin envelope" || version || len(key_id) || key_id || annotations digest`.
pub fn associated_data(key_id: &str, annotations_digest: &[u8; 32]) -> AssociatedData {
    const DOMAIN: &[u8] = b"kms-plugin envelope";
    let mut aad = AssociatedData::with_capacity(DOMAIN.len() + 1 + 2 + key_id.len() + 32);
    aad.extend_from_slice(DOMAIN);
    aad.push(FORMAT_V1);
    // key_id is at most 1024 bytes (validated), so the length fits in u16.
    aad.extend_from_slice(&(key_id.len() as u16).to_be_bytes());
    aad.extend_from_slice(key_id.as_bytes());
    aad.extend_from_slice(annotations_digest);
    aad
}

/// A short, stable, non-secret fingerprint of bytes, used for key_ids and cache keys:
/// SHA-256 over the domain and each part, each preceded by its length.
pub fn fingerprint(domain: &[u8], parts: impl IntoIterator<Item = impl AsRef<[u8]>>) -> [u8; 32] {
    let mut hash = Sha256::new();
    hash.update((domain.len() as u64).to_be_bytes());
    hash.update(domain);
    for part in parts {
        let part = part.as_ref();
        hash.update((part.len() as u64).to_be_bytes());
        hash.update(part);
    }
    hash.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Bound(KekCipher, AssociatedData);

    impl Bound {
        fn seal(&self, pt: &[u8]) -> Vec<u8> {
            self.0.seal(&self.1, pt)
        }
        fn open(&self, ct: &[u8]) -> Result<Zeroizing<Vec<u8>>, EnvelopeError> {
            self.0.open(&self.1, ct)
        }
    }

    fn bound(byte: u8, key_id: &str, digest: u8) -> Bound {
        let kek = Key256::from_slice(&[byte; 32]).expect("32 bytes");
        Bound(KekCipher::new(&kek), associated_data(key_id, &[digest; 32]))
    }

    fn key(byte: u8) -> Bound {
        bound(byte, "file-0123", 9)
    }

    #[test]
    fn round_trip_and_layout() {
        let k = key(1);
        let sealed = k.seal(&[42; 32]);
        assert_eq!(sealed.len(), 32 + OVERHEAD);
        assert_eq!(sealed[0], FORMAT_V1);
        assert_eq!(k.open(&sealed).expect("opens").as_slice(), &[42; 32]);
    }

    #[test]
    fn same_plaintext_gives_distinct_ciphertexts() {
        let k = key(1);
        assert_ne!(k.seal(b"seed"), k.seal(b"seed"));
    }

    #[test]
    fn nonces_do_not_repeat_across_threads() {
        // Each thread has its own nonce generator: they must not share a seed.
        let k = std::sync::Arc::new(key(1));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let k = k.clone();
                std::thread::spawn(move || {
                    (0..20_000)
                        .map(|_| {
                            let sealed = k.seal(b"seed");
                            <[u8; 12]>::try_from(&sealed[1..13]).expect("12-byte nonce")
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let mut seen = std::collections::HashSet::new();
        for t in threads {
            for nonce in t.join().expect("thread") {
                assert!(seen.insert(nonce), "nonce repeated");
            }
        }
        assert_eq!(seen.len(), 8 * 20_000);
    }

    #[test]
    fn binding_to_key_id_and_annotations() {
        let sealed = bound(1, "file-a", 0).seal(b"x");
        let other_id = bound(1, "file-b", 0);
        let other_annotations = bound(1, "file-a", 1);
        assert_eq!(other_id.open(&sealed), Err(EnvelopeError::Authentication));
        assert_eq!(
            other_annotations.open(&sealed),
            Err(EnvelopeError::Authentication)
        );
    }

    #[test]
    fn every_flipped_bit_is_rejected() {
        let k = key(3);
        let sealed = k.seal(&[5; 32]);
        for i in 1..sealed.len() {
            for bit in 0..8 {
                let mut bad = sealed.clone();
                bad[i] ^= 1 << bit;
                assert_eq!(k.open(&bad), Err(EnvelopeError::Authentication), "byte {i}");
            }
        }
    }

    #[test]
    fn malformed_inputs() {
        let k = key(4);
        assert_eq!(k.open(&[]), Err(EnvelopeError::BadLength));
        assert_eq!(k.open(&[FORMAT_V1; 5]), Err(EnvelopeError::BadLength));
        assert_eq!(k.open(&[7; 40]), Err(EnvelopeError::UnknownVersion(7)));
        let mut sealed = k.seal(&[1; 32]);
        sealed.truncate(sealed.len() - 1);
        assert_eq!(k.open(&sealed), Err(EnvelopeError::Authentication));
        let too_long = [FORMAT_V1; MAX_CIPHERTEXT_LEN + 1];
        assert_eq!(k.open(&too_long), Err(EnvelopeError::BadLength));
    }

    #[test]
    fn largest_plaintext_fits_the_apiserver_limit() {
        let sealed = key(5).seal(&[0; MAX_PLAINTEXT_LEN]);
        assert_eq!(sealed.len(), MAX_CIPHERTEXT_LEN);
    }

    #[test]
    fn associated_data_layout_for_short_and_longest_key_ids() {
        for key_id in [
            "file-0123",
            &"k".repeat(74),
            &"k".repeat(75),
            &"k".repeat(1024),
        ] {
            let aad = associated_data(key_id, &[9; 32]);
            let mut want = b"kms-plugin envelope\x01".to_vec();
            want.extend_from_slice(&(key_id.len() as u16).to_be_bytes());
            want.extend_from_slice(key_id.as_bytes());
            want.extend_from_slice(&[9; 32]);
            assert_eq!(aad.as_slice(), want, "{}", key_id.len());
            assert_eq!(aad.spilled(), key_id.len() > 74, "{}", key_id.len());
        }
    }

    #[test]
    fn fingerprint_is_length_prefixed() {
        assert_ne!(
            fingerprint(b"d", [&b"ab"[..], b"c"]),
            fingerprint(b"d", [&b"a"[..], b"bc"])
        );
    }
}

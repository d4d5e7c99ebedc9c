//! Key material types. They zeroize on drop, never print their bytes and cannot be
//! cloned; PINs and tokens use [`secrecy::SecretString`] directly.

use std::fmt;

use rand::RngCore;
use rand::rngs::OsRng;
use secrecy::{ExposeSecret, SecretBox};
use zeroize::{Zeroize, ZeroizeOnDrop};

/// Length of every symmetric key this plugin handles (AES-256).
pub const KEY_LEN: usize = 32;

/// A 256-bit symmetric key: a local KEK or a file-held root key.
///
/// On [`secrecy::SecretBox`]: boxed so moves copy a pointer, not the key; zeroized on drop;
/// no `Clone`; Debug never prints the bytes; reading them takes an explicit
/// [`Key256::expose_secret`].
pub struct Key256(SecretBox<[u8; KEY_LEN]>);

impl Key256 {
    /// A fresh key from the operating system's CSPRNG.
    pub fn generate() -> Self {
        Self(SecretBox::init_with_mut(|key: &mut [u8; KEY_LEN]| {
            OsRng.fill_bytes(key);
        }))
    }

    /// Copies a key out of `bytes`; `None` unless it is exactly 32 bytes long.
    /// The caller stays responsible for zeroizing its own buffer.
    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        if bytes.len() != KEY_LEN {
            return None;
        }
        Some(Self(SecretBox::init_with_mut(|key: &mut [u8; KEY_LEN]| {
            key.copy_from_slice(bytes);
        })))
    }

    /// The raw key bytes, for handing to a cipher.
    pub fn expose_secret(&self) -> &[u8; KEY_LEN] {
        self.0.expose_secret()
    }
}

/// Zeroes [`STACK_WIPE_LEN`] bytes of stack below the caller's frame.
///
/// Building a cipher from a key moves the expanded key schedule through stack temporaries
/// (a return value, a move into its box) that nothing zeroes; they stay in the dead frames
/// below the caller until deeper calls happen to overwrite them. Call this after key
/// material was handled in nested calls on the current thread (opening root keys).
#[inline(never)]
pub fn wipe_stack() {
    let mut scratch = [0u8; STACK_WIPE_LEN];
    scratch.zeroize();
    std::hint::black_box(&scratch);
}

/// How much stack [`wipe_stack`] clears: more than opening a root key uses, also in a
/// debug build.
pub const STACK_WIPE_LEN: usize = 256 * 1024;

/// The inner [`SecretBox`] zeroizes the key when dropped.
impl ZeroizeOnDrop for Key256 {}

impl fmt::Debug for Key256 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Key256(<redacted>)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_prints_key_bytes() {
        let key = Key256::from_slice(&[0xAB; KEY_LEN]).expect("32 bytes");
        let shown = format!("{key:?}");
        assert_eq!(shown, "Key256(<redacted>)");
        assert!(!shown.to_lowercase().contains("ab"));
    }

    #[test]
    fn from_slice_rejects_wrong_lengths() {
        assert!(Key256::from_slice(&[0; 31]).is_none());
        assert!(Key256::from_slice(&[0; 33]).is_none());
        assert!(Key256::from_slice(&[]).is_none());
    }

    #[test]
    fn generated_keys_differ() {
        assert_ne!(
            Key256::generate().expose_secret(),
            Key256::generate().expose_secret()
        );
    }
}

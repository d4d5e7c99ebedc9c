//! Key material types. They zeroize on drop and never print their bytes.

use std::fmt;

use rand::RngCore;
use rand::rngs::OsRng;
use zeroize::{Zeroize, ZeroizeOnDrop};

/// Length of every symmetric key this plugin handles (AES-256).
pub const KEY_LEN: usize = 32;

/// A 256-bit symmetric key: a local KEK or a file-held root key.
///
/// Boxed so moves copy a pointer, not the key; zeroized on drop.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct Key256(Box<[u8; KEY_LEN]>);

impl Key256 {
    /// A fresh key from the operating system's CSPRNG.
    pub fn generate() -> Self {
        let mut key = Self(Box::new([0u8; KEY_LEN]));
        OsRng.fill_bytes(key.0.as_mut_slice());
        key
    }

    /// Copies a key out of `bytes`; `None` unless it is exactly 32 bytes long.
    /// The caller stays responsible for zeroizing its own buffer.
    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        let mut key = Self(Box::new([0u8; KEY_LEN]));
        if bytes.len() != KEY_LEN {
            return None;
        }
        key.0.copy_from_slice(bytes);
        Some(key)
    }

    /// The raw key bytes, for handing to a cipher.
    pub fn expose(&self) -> &[u8; KEY_LEN] {
        &self.0
    }
}

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
    fn zeroize_clears_the_bytes() {
        let mut key = Key256::from_slice(&[7; KEY_LEN]).expect("32 bytes");
        key.zeroize();
        assert_eq!(key.expose(), &[0u8; KEY_LEN]);
    }

    #[test]
    fn generated_keys_differ() {
        assert_ne!(Key256::generate().expose(), Key256::generate().expose());
    }
}

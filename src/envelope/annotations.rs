//! The annotations an EncryptResponse carries: one wrapped copy of the local KEK per root
//! key that wrapped it, under the key `<root key_id>.kek.kms-plugin.dev`.
//!
//! kube-apiserver re-validates annotation keys on every etcd read, so every key written
//! must be a fully qualified domain name (see [`is_valid_key`]) and the total size must
//! stay under 32 KiB.

use std::cell::RefCell;
use std::collections::HashMap;

use super::{EnvelopeError, fingerprint};

/// Parent domain of every annotation key this plugin writes.
pub const DOMAIN: &str = "kek.kms-plugin.dev";
/// kube-apiserver's limit on the sum of annotation key and value lengths.
pub const MAX_TOTAL_LEN: usize = 32 * 1024;
/// Upper bound on one wrapped key (an AWS KMS blob is ~200 bytes, GCM-wrapped keys 60).
pub const MAX_WRAPPED_LEN: usize = 4096;
/// More copies than any sane `also_wrap` list needs; bounds Decrypt's work.
pub const MAX_COPIES: usize = 16;

/// The annotation key for the copy wrapped by the root with `key_id`.
pub fn wrapped_kek_key(key_id: &str) -> String {
    format!("{key_id}.{DOMAIN}")
}

/// One wrapped copy of the local KEK in a request's annotations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WrappedCopy<'a> {
    /// The annotation key, `<key_id>.kek.kms-plugin.dev`.
    pub annotation: &'a str,
    /// The key_id of the root that wrapped it.
    pub key_id: &'a str,
    /// The wrapped local KEK.
    pub wrapped: &'a [u8],
}

const NO_COPY: WrappedCopy<'static> = WrappedCopy {
    annotation: "",
    key_id: "",
    wrapped: &[],
};

/// A request's wrapped copies (at most [`MAX_COPIES`]), held without a heap allocation:
/// Decrypt parses them on every call.
pub struct Copies<'a> {
    items: [WrappedCopy<'a>; MAX_COPIES],
    len: usize,
}

impl<'a> Copies<'a> {
    /// The copies, in the annotations map's order.
    pub fn as_slice(&self) -> &[WrappedCopy<'a>] {
        self.items.get(..self.len).unwrap_or_default()
    }

    /// The same value as [`digest`] of the annotations these copies came from.
    pub fn digest(&self) -> [u8; 32] {
        let mut sorted = self.items;
        let sorted = sorted.get_mut(..self.len).unwrap_or_default();
        sorted.sort_unstable_by(|a, b| a.annotation.cmp(b.annotation));
        let compute = || digest_sorted(sorted.iter().map(|c| (c.annotation, c.wrapped)));
        RECENT
            .try_with(|recent| match recent.try_borrow_mut() {
                Ok(mut recent) => recent.digest(sorted, compute),
                Err(_) => compute(),
            })
            .unwrap_or_else(|_| compute())
    }
}

/// Digests a thread remembers.
const RECENT_DIGESTS: usize = 4;
/// Copies larger than this in all are digested every time (real ones are a few hundred
/// bytes), which bounds what a thread keeps.
const RECENT_MAX_BYTES: usize = 4096;

thread_local! {
    /// Nearly every Decrypt carries the copies of one of a few local KEKs, and SHA-256 over
    /// them was the largest piece of a cached Decrypt's work.
    static RECENT: RefCell<RecentDigests> = const { RefCell::new(RecentDigests::new()) };
}

/// The digests of the last few sets of copies seen on this thread, each with the exact
/// bytes it was computed over: a hit is the digest of equal bytes, so it is the digest.
struct RecentDigests {
    entries: [Option<Recent>; RECENT_DIGESTS],
    /// The entry replaced next.
    next: usize,
}

struct Recent {
    /// (annotation, wrapped) of each copy, sorted by annotation.
    copies: Vec<(Box<str>, Box<[u8]>)>,
    digest: [u8; 32],
}

impl RecentDigests {
    const fn new() -> Self {
        Self {
            entries: [const { None }; RECENT_DIGESTS],
            next: 0,
        }
    }

    /// The digest of `sorted`: remembered, or computed by `compute` (and remembered).
    fn digest(
        &mut self,
        sorted: &[WrappedCopy<'_>],
        compute: impl FnOnce() -> [u8; 32],
    ) -> [u8; 32] {
        let same = |recent: &Recent| {
            recent.copies.len() == sorted.len()
                && recent
                    .copies
                    .iter()
                    .zip(sorted)
                    .all(|((annotation, wrapped), c)| {
                        **annotation == *c.annotation && **wrapped == *c.wrapped
                    })
        };
        if let Some(recent) = self.entries.iter().flatten().find(|r| same(r)) {
            return recent.digest;
        }
        let digest = compute();
        let bytes: usize = sorted
            .iter()
            .map(|c| c.annotation.len() + c.wrapped.len())
            .sum();
        if bytes <= RECENT_MAX_BYTES
            && let Some(slot) = self.entries.get_mut(self.next)
        {
            *slot = Some(Recent {
                copies: sorted
                    .iter()
                    .map(|c| (c.annotation.into(), c.wrapped.into()))
                    .collect(),
                digest,
            });
            self.next = (self.next + 1) % RECENT_DIGESTS;
        }
        digest
    }
}

/// Splits request annotations into the wrapped copies of the local KEK.
/// Rejects anything this plugin never writes: the annotations are authenticated as a
/// whole anyway, so a foreign entry can only mean tampering or a wrong plugin.
pub fn wrapped_copies(annotations: &HashMap<String, Vec<u8>>) -> Result<Copies<'_>, EnvelopeError> {
    if annotations.len() > MAX_COPIES {
        return Err(EnvelopeError::BadAnnotation);
    }
    let mut copies = Copies {
        items: [NO_COPY; MAX_COPIES],
        len: 0,
    };
    for ((key, value), slot) in annotations.iter().zip(copies.items.iter_mut()) {
        let key_id = key
            .strip_suffix(DOMAIN)
            .and_then(|rest| rest.strip_suffix('.'))
            .filter(|id| is_label(id))
            .ok_or(EnvelopeError::BadAnnotation)?;
        if value.is_empty() || value.len() > MAX_WRAPPED_LEN {
            return Err(EnvelopeError::BadAnnotation);
        }
        *slot = WrappedCopy {
            annotation: key,
            key_id,
            wrapped: value,
        };
        copies.len += 1;
    }
    if copies.len == 0 {
        return Err(EnvelopeError::MissingWrappedKek);
    }
    Ok(copies)
}

/// Order-independent digest of all annotations, bound into every ciphertext.
pub fn digest(annotations: &HashMap<String, Vec<u8>>) -> [u8; 32] {
    let mut entries: Vec<_> = annotations.iter().collect();
    entries.sort_unstable_by(|a, b| a.0.cmp(b.0));
    digest_sorted(entries.into_iter().map(|(k, v)| (k.as_str(), v.as_slice())))
}

/// The digest of entries already sorted by key: each key, then its value.
fn digest_sorted<'a>(entries: impl Iterator<Item = (&'a str, &'a [u8])>) -> [u8; 32] {
    fingerprint(
        b"kms-plugin annotations v1",
        entries.flat_map(|(k, v)| [k.as_bytes(), v]),
    )
}

/// Sum of key and value lengths, as kube-apiserver counts it.
pub fn total_len(annotations: &HashMap<String, Vec<u8>>) -> usize {
    annotations.iter().map(|(k, v)| k.len() + v.len()).sum()
}

/// kube-apiserver's rule for annotation keys: after dropping one trailing dot, a lowercase
/// RFC 1123 subdomain of at least two labels, each at most 63 characters, 253 in all.
pub fn is_valid_key(key: &str) -> bool {
    let name = key.strip_suffix('.').unwrap_or(key);
    name.len() <= 253 && name.split('.').count() >= 2 && name.split('.').all(is_label)
}

/// One RFC 1123 label: `[a-z0-9]([-a-z0-9]*[a-z0-9])?`, at most 63 characters.
pub fn is_label(label: &str) -> bool {
    let bytes = label.as_bytes();
    let edge_ok = |b: &u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    !bytes.is_empty()
        && bytes.len() <= 63
        && bytes.first().is_some_and(edge_ok)
        && bytes.last().is_some_and(edge_ok)
        // Without an early exit (checked on every Decrypt): vectorised.
        && bytes.iter().fold(0u8, |bad, &b| {
            bad | u8::from(b.wrapping_sub(b'a') > b'z' - b'a')
                & u8::from(b.wrapping_sub(b'0') > 9)
                & u8::from(b != b'-')
        }) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_characters_for_every_byte() {
        for b in 0..=u8::MAX {
            let inner = b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-';
            let Ok(text) = std::str::from_utf8(&[b]).map(str::to_owned) else {
                continue;
            };
            let middle = format!("a{}{text}b", "x".repeat(40));
            assert_eq!(is_label(&middle), inner, "{b:#x} inside");
            assert_eq!(is_label(&text), inner && b != b'-', "{b:#x} alone");
        }
    }

    #[test]
    fn apiserver_key_rule() {
        for good in ["a.b", "kek.kms-plugin.dev", "x1-2.y.", "0.0"] {
            assert!(is_valid_key(good), "{good}");
        }
        let long_label = format!("{}.dev", "a".repeat(64));
        let long_name = format!("{}.dev", vec!["a".repeat(60); 5].join("."));
        for bad in [
            "",
            "single",
            "a/b.c",
            "A.b",
            "-a.b",
            "a-.b",
            "a..b",
            "a.b..",
            "a_b.c",
            &long_label,
            &long_name,
        ] {
            assert!(!is_valid_key(bad), "{bad}");
        }
    }

    #[test]
    fn emitted_keys_are_valid_for_every_provider_key_id() {
        let id = format!("aws-{}", "f".repeat(32));
        for key_id in [
            "file-0123456789abcdef0123456789abcdef",
            "pkcs11-00",
            id.as_str(),
        ] {
            let key = wrapped_kek_key(key_id);
            assert!(is_valid_key(&key), "{key}");
        }
    }

    #[test]
    fn copies_are_parsed_and_foreign_keys_rejected() {
        let mut map = HashMap::new();
        map.insert(wrapped_kek_key("file-ab"), vec![1, 2, 3]);
        map.insert(wrapped_kek_key("aws-cd"), vec![4]);
        let parsed = wrapped_copies(&map).expect("valid");
        let mut copies: Vec<_> = parsed
            .as_slice()
            .iter()
            .map(|c| (c.key_id, c.wrapped))
            .collect();
        copies.sort();
        assert_eq!(
            copies,
            vec![("aws-cd", &[4u8][..]), ("file-ab", &[1, 2, 3][..])]
        );
        assert_eq!(parsed.digest(), digest(&map));
        assert_eq!(parsed.digest(), digest(&map), "remembered");

        let mut foreign = map.clone();
        foreign.insert("other.example.com".into(), vec![1]);
        assert_eq!(
            wrapped_copies(&foreign).err(),
            Some(EnvelopeError::BadAnnotation)
        );

        let mut empty_value = HashMap::new();
        empty_value.insert(wrapped_kek_key("file-ab"), vec![]);
        assert_eq!(
            wrapped_copies(&empty_value).err(),
            Some(EnvelopeError::BadAnnotation)
        );

        let mut bad_label = HashMap::new();
        bad_label.insert(format!("Bad.{DOMAIN}"), vec![1]);
        assert_eq!(
            wrapped_copies(&bad_label).err(),
            Some(EnvelopeError::BadAnnotation)
        );

        assert_eq!(
            wrapped_copies(&HashMap::new()).err(),
            Some(EnvelopeError::MissingWrappedKek)
        );
    }

    #[test]
    fn digest_ignores_order_but_not_content() {
        let mut a = HashMap::new();
        a.insert("x.a".to_string(), vec![1]);
        a.insert("y.a".to_string(), vec![2]);
        let mut b = HashMap::new();
        b.insert("y.a".to_string(), vec![2]);
        b.insert("x.a".to_string(), vec![1]);
        assert_eq!(digest(&a), digest(&b));
        b.insert("y.a".to_string(), vec![3]);
        assert_ne!(digest(&a), digest(&b));
    }

    #[test]
    fn remembered_digests_are_the_digests_of_exactly_those_bytes() {
        let key_a = wrapped_kek_key("file-a");
        let key_b = wrapped_kek_key("file-b");
        let mut maps = Vec::new();
        for byte in 0..3u8 {
            for len in [1, 60, 61] {
                let mut one = HashMap::new();
                one.insert(key_a.clone(), vec![byte; len]);
                maps.push(one.clone());
                one.insert(key_b.clone(), vec![byte; len]);
                maps.push(one.clone());
                // Same bytes, moved between the copies: a different digest.
                one.insert(key_a.clone(), vec![byte; len + 1]);
                one.insert(key_b.clone(), vec![byte; len - 1 + usize::from(len == 1)]);
                maps.push(one);
            }
        }
        let mut last_byte_differs = maps[1].clone();
        if let Some(v) = last_byte_differs.get_mut(&key_b) {
            *v.last_mut().expect("not empty") ^= 1;
        }
        maps.push(last_byte_differs);
        // Rounds over more sets than a thread remembers, so entries are replaced; each set
        // twice in a row, so the second is found; and each set right after every other
        // remembered one, so a near miss is never taken for a hit.
        for _ in 0..2 {
            for (i, map) in maps.iter().enumerate() {
                let copies = wrapped_copies(map).expect("valid");
                assert_eq!(copies.digest(), digest(map));
                assert_eq!(copies.digest(), digest(map));
                for other in maps.iter().skip(i).take(RECENT_DIGESTS) {
                    let other_copies = wrapped_copies(other).expect("valid");
                    assert_eq!(other_copies.digest(), digest(other));
                    assert_eq!(copies.digest(), digest(map));
                }
            }
        }
        let digests: std::collections::HashSet<_> = maps.iter().map(digest).collect();
        assert_eq!(digests.len(), maps.len(), "every set has its own digest");
        // Oversized copies are digested, not remembered.
        let mut big = HashMap::new();
        big.insert(key_a, vec![9; MAX_WRAPPED_LEN]);
        big.insert(key_b, vec![8; MAX_WRAPPED_LEN]);
        let copies = wrapped_copies(&big).expect("valid");
        assert_eq!(copies.digest(), digest(&big));
        assert_eq!(copies.digest(), digest(&big));
    }
}

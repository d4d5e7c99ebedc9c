//! The annotations an EncryptResponse carries: one wrapped copy of the local KEK per root
//! key that wrapped it, under the key `<root key_id>.kek.kms-plugin.dev`.
//!
//! kube-apiserver re-validates annotation keys on every etcd read, so every key written
//! must be a fully qualified domain name (see [`is_valid_key`]) and the total size must
//! stay under 32 KiB.

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

/// Splits request annotations into `(root key_id, wrapped local KEK)` pairs.
/// Rejects anything this plugin never writes: the annotations are authenticated as a
/// whole anyway, so a foreign entry can only mean tampering or a wrong plugin.
pub fn wrapped_copies(
    annotations: &HashMap<String, Vec<u8>>,
) -> Result<Vec<(&str, &[u8])>, EnvelopeError> {
    if annotations.len() > MAX_COPIES {
        return Err(EnvelopeError::BadAnnotation);
    }
    let mut copies = Vec::with_capacity(annotations.len());
    for (key, value) in annotations {
        let key_id = key
            .strip_suffix(DOMAIN)
            .and_then(|rest| rest.strip_suffix('.'))
            .filter(|id| is_label(id))
            .ok_or(EnvelopeError::BadAnnotation)?;
        if value.is_empty() || value.len() > MAX_WRAPPED_LEN {
            return Err(EnvelopeError::BadAnnotation);
        }
        copies.push((key_id, value.as_slice()));
    }
    if copies.is_empty() {
        return Err(EnvelopeError::MissingWrappedKek);
    }
    Ok(copies)
}

/// Order-independent digest of all annotations, bound into every ciphertext.
pub fn digest(annotations: &HashMap<String, Vec<u8>>) -> [u8; 32] {
    let mut entries: Vec<_> = annotations.iter().collect();
    entries.sort_unstable_by(|a, b| a.0.cmp(b.0));
    let parts: Vec<&[u8]> = entries
        .iter()
        .flat_map(|(k, v)| [k.as_bytes(), v.as_slice()])
        .collect();
    fingerprint(b"kms-plugin annotations v1", &parts)
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
        && bytes.iter().all(|b| edge_ok(b) || *b == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let mut copies = wrapped_copies(&map).expect("valid");
        copies.sort();
        assert_eq!(
            copies,
            vec![("aws-cd", &[4u8][..]), ("file-ab", &[1, 2, 3][..])]
        );

        let mut foreign = map.clone();
        foreign.insert("other.example.com".into(), vec![1]);
        assert_eq!(wrapped_copies(&foreign), Err(EnvelopeError::BadAnnotation));

        let mut empty_value = HashMap::new();
        empty_value.insert(wrapped_kek_key("file-ab"), vec![]);
        assert_eq!(
            wrapped_copies(&empty_value),
            Err(EnvelopeError::BadAnnotation)
        );

        let mut bad_label = HashMap::new();
        bad_label.insert(format!("Bad.{DOMAIN}"), vec![1]);
        assert_eq!(
            wrapped_copies(&bad_label),
            Err(EnvelopeError::BadAnnotation)
        );

        assert_eq!(
            wrapped_copies(&HashMap::new()),
            Err(EnvelopeError::MissingWrappedKek)
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
}

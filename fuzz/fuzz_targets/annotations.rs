//! Decrypt's annotations, as they come back from etcd: `wrapped_copies`, `digest`,
//! `total_len` and the key rules must never panic on any map. Also checks that every copy
//! accepted names a valid RFC 1123 label and an annotation key kube-apiserver accepts, that
//! the digest ignores order but not content, and that one trailing dot never changes
//! whether a key is valid.
//!
//! Input: records of `[key length: 1 byte][key][value length: 2 bytes, big endian][value]`;
//! keys are read as lossy UTF-8 (protobuf map keys are strings).
#![no_main]

use std::collections::HashMap;

use kms_plugin::envelope::EnvelopeError;
use kms_plugin::envelope::annotations::{
    DOMAIN, MAX_COPIES, MAX_WRAPPED_LEN, digest, is_label, is_valid_key, total_len, wrapped_copies,
    wrapped_kek_key,
};
use libfuzzer_sys::fuzz_target;

/// Splits the input into (key, value) records; a short tail is ignored.
fn records(mut data: &[u8]) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    while let Some((&key_len, rest)) = data.split_first() {
        let Some((key, rest)) = rest.split_at_checked(usize::from(key_len)) else {
            break;
        };
        let Some(([hi, lo], rest)) = rest.split_first_chunk::<2>() else {
            break;
        };
        let value_len = usize::from(u16::from_be_bytes([*hi, *lo]) & 0x1fff);
        let Some((value, rest)) = rest.split_at_checked(value_len) else {
            break;
        };
        out.push((String::from_utf8_lossy(key).into_owned(), value.to_vec()));
        data = rest;
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let entries = records(data);
    let map: HashMap<String, Vec<u8>> = entries.iter().cloned().collect();

    match wrapped_copies(&map) {
        Ok(copies) => {
            let list = copies.as_slice();
            assert_eq!(list.len(), map.len());
            assert!(!list.is_empty() && list.len() <= MAX_COPIES);
            for copy in list {
                assert!(is_label(copy.key_id), "{:?}", copy.key_id);
                let key = wrapped_kek_key(copy.key_id);
                assert_eq!(key, copy.annotation);
                assert!(is_valid_key(&key), "{key:?}");
                assert_eq!(map.get(&key).map(Vec::as_slice), Some(copy.wrapped));
                assert!(!copy.wrapped.is_empty() && copy.wrapped.len() <= MAX_WRAPPED_LEN);
            }
            // The stack-sorted digest Decrypt uses equals the one a new local KEK gets.
            assert_eq!(copies.digest(), digest(&map));
        }
        Err(EnvelopeError::MissingWrappedKek) => assert!(map.is_empty()),
        Err(EnvelopeError::BadAnnotation) => {
            // Some entry is not one of ours, or there are too many.
            assert!(
                map.len() > MAX_COPIES
                    || map.iter().any(|(k, v)| {
                        v.is_empty()
                            || v.len() > MAX_WRAPPED_LEN
                            || !k
                                .strip_suffix(DOMAIN)
                                .and_then(|rest| rest.strip_suffix('.'))
                                .is_some_and(is_label)
                    })
            );
        }
        Err(other) => panic!("unexpected error {other:?}"),
    }

    // The digest depends on the content only, not on insertion order.
    let reversed: HashMap<String, Vec<u8>> = entries.iter().rev().cloned().collect();
    let d = digest(&map);
    if reversed == map {
        assert_eq!(d, digest(&reversed));
    }
    let sum: usize = map.iter().map(|(k, v)| k.len() + v.len()).sum();
    assert_eq!(total_len(&map), sum);
    if let Some((key, value)) = map.iter().next() {
        let mut changed = map.clone();
        let mut longer = value.clone();
        longer.push(0);
        changed.insert(key.clone(), longer);
        assert_ne!(d, digest(&changed));
    }

    for key in map.keys() {
        if !key.ends_with('.') {
            assert_eq!(
                is_valid_key(key),
                is_valid_key(&format!("{key}.")),
                "{key:?}"
            );
        }
    }
});

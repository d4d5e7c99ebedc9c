//! Feeds arbitrary bytes, split into arbitrary chunks, to the `:authority`
//! rewriter. Checks: no panic, the result does not depend on how the input
//! is chunked, `feed_in_place` gives what `feed` gives, and a connection that
//! never needed a rewrite passes through byte-identical. Also runs the HPACK
//! decoder on the raw bytes, and checks that `Decoder::judge` agrees with it.
#![no_main]

use kms_plugin::h2authority::Rewriter;
use kms_plugin::h2authority::frame::PREFACE;
use kms_plugin::h2authority::hpack::Decoder;
use libfuzzer_sys::fuzz_target;

/// The decoder's dynamic table, newest entry first, and its size.
fn table(d: &Decoder) -> (Vec<(Vec<u8>, Vec<u8>)>, usize) {
    let t = d.table();
    let entries = (0..t.len())
        .filter_map(|i| t.get(62 + i).ok())
        .map(|(n, v)| (n.to_vec(), v.to_vec()))
        .collect();
    (entries, t.size())
}

fuzz_target!(|data: &[u8]| {
    let Some((&ctl, rest)) = data.split_first() else {
        return;
    };
    // Decoder::judge agrees with decoding: the same verdict and error, and the table left
    // as decoding leaves it (or untouched, for a block with a bad field).
    let mut decoded = Decoder::default();
    let mut fields = Vec::new();
    let decoded_result = decoded.decode(rest, &mut fields);
    let bad = |n: &[u8], v: &[u8]| n == b":authority" && v.first() == Some(&b'/');
    let mut judged = Decoder::default();
    match judged.judge(rest, bad) {
        Ok(false) => {
            assert!(decoded_result.is_ok());
            assert!(!fields.iter().any(|f| bad(&f.name, &f.value)));
            assert_eq!(table(&judged), table(&decoded));
        }
        Ok(true) => {
            assert_eq!(table(&judged), table(&Decoder::default()));
            let mut again = Vec::new();
            assert_eq!(judged.decode(rest, &mut again), decoded_result);
            if decoded_result.is_ok() {
                assert!(fields.iter().any(|f| bad(&f.name, &f.value)));
                assert_eq!(again, fields);
                assert_eq!(table(&judged), table(&decoded));
            }
        }
        Err(e) => assert_eq!(decoded_result, Err(e)),
    }

    // Usually start with a valid preface so the fuzzer reaches the frames.
    let mut input = Vec::with_capacity(rest.len() + PREFACE.len());
    if ctl & 0x80 == 0 {
        input.extend_from_slice(PREFACE);
    }
    input.extend_from_slice(rest);

    let mut whole = Rewriter::new();
    let mut expected = Vec::new();
    let whole_result = whole.feed(&input, &mut expected);

    let mut chunked = Rewriter::new();
    let mut got = Vec::new();
    let mut chunked_result = Ok(());
    // The same chunks through feed_in_place: what passed in place, then what it appended.
    let mut in_place = Rewriter::new();
    let mut in_place_got = Vec::new();
    let mut remaining = &input[..];
    let mut k = usize::from(ctl);
    while !remaining.is_empty() {
        k = k.wrapping_mul(31).wrapping_add(7);
        let n = (k % 23 + 1).min(remaining.len());
        let (chunk, tail) = remaining.split_at(n);
        remaining = tail;
        chunked_result = chunked.feed(chunk, &mut got);
        let mut appended = Vec::new();
        let in_place_result = in_place.feed_in_place(chunk, &mut appended).map(|passed| {
            in_place_got.extend_from_slice(&chunk[..passed]);
            in_place_got.extend(appended);
        });
        assert_eq!(chunked_result, in_place_result);
        if chunked_result.is_err() {
            break;
        }
    }

    assert_eq!(whole_result, chunked_result);
    if whole_result.is_ok() {
        assert_eq!(expected, got);
        assert_eq!(expected, in_place_got);
        assert_eq!(whole.is_reencoding(), chunked.is_reencoding());
        if !whole.is_reencoding() {
            // Incomplete header blocks are held back; the rest is verbatim.
            assert!(input.starts_with(&expected));
        }
    }
});

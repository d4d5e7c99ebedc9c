//! HPACK Huffman decoding (RFC 7541 §5.2, Appendix B).
//!
//! The RFC code is canonical: codes of equal length are consecutive and
//! ordered by symbol, so the code lengths alone define it. From them a
//! compile-time step table is built: the states are the 256 internal nodes of
//! the code tree, and one lookup consumes four input bits (at most one symbol
//! ends within four bits, as every code is at least five long). That is two
//! lookups per input byte instead of eight bit steps of the canonical decoder,
//! which stays, for tests, as the reference the table is checked against.

use super::HpackError;

/// Symbol value of the end-of-string marker, which must never appear in data.
const EOS: u16 = 256;
/// Longest code length in the table (EOS and a few control bytes).
const MAX_CODE_LEN: usize = 30;

/// Code length in bits for each symbol 0..=255 and EOS (256), RFC 7541 Appendix B.
#[rustfmt::skip]
const CODE_LENGTHS: [u8; 257] = [
    13, 23, 28, 28, 28, 28, 28, 28, 28, 24, 30, 28, 28, 30, 28, 28,
    28, 28, 28, 28, 28, 28, 30, 28, 28, 28, 28, 28, 28, 28, 28, 28,
    6, 10, 10, 12, 13, 6, 8, 11, 10, 10, 8, 11, 8, 6, 6, 6,
    5, 5, 5, 6, 6, 6, 6, 6, 6, 6, 7, 8, 15, 6, 12, 10,
    13, 6, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7,
    7, 7, 7, 7, 7, 7, 7, 7, 8, 7, 8, 13, 19, 13, 14, 6,
    15, 5, 6, 5, 6, 5, 6, 6, 6, 5, 7, 7, 6, 6, 6, 5,
    6, 7, 6, 5, 5, 6, 7, 7, 7, 7, 7, 15, 11, 14, 13, 28,
    20, 22, 20, 20, 22, 22, 22, 23, 22, 23, 23, 23, 23, 23, 24, 23,
    24, 24, 22, 23, 24, 23, 23, 23, 23, 21, 22, 23, 22, 23, 23, 24,
    22, 21, 20, 22, 22, 23, 23, 21, 23, 22, 22, 24, 21, 22, 23, 23,
    21, 21, 22, 21, 23, 22, 23, 23, 20, 22, 22, 22, 23, 22, 22, 23,
    26, 26, 20, 19, 22, 23, 22, 25, 26, 26, 26, 27, 27, 26, 24, 25,
    19, 21, 26, 27, 27, 26, 27, 24, 21, 21, 26, 26, 28, 27, 27, 27,
    20, 24, 20, 21, 22, 21, 21, 23, 22, 22, 25, 25, 24, 24, 26, 23,
    26, 27, 26, 26, 27, 27, 27, 27, 27, 28, 27, 27, 27, 27, 27, 26,
    30,
];

/// Canonical-code decoding tables derived from [`CODE_LENGTHS`] at compile time.
struct Canonical {
    /// Number of codes of each length (index = length in bits).
    counts: [u16; MAX_CODE_LEN + 1],
    /// Symbols ordered by (code length, symbol), i.e. by code value.
    symbols: [u16; 257],
}

const CANONICAL: Canonical = build_canonical();

const fn build_canonical() -> Canonical {
    let mut counts = [0u16; MAX_CODE_LEN + 1];
    let mut s = 0;
    while s < CODE_LENGTHS.len() {
        counts[CODE_LENGTHS[s] as usize] += 1;
        s += 1;
    }
    // Position of the first symbol of each length in `symbols`.
    let mut next = [0u16; MAX_CODE_LEN + 2];
    let mut len = 1;
    while len <= MAX_CODE_LEN {
        next[len + 1] = next[len] + counts[len];
        len += 1;
    }
    let mut symbols = [0u16; 257];
    let mut s = 0;
    while s < CODE_LENGTHS.len() {
        let len = CODE_LENGTHS[s] as usize;
        symbols[next[len] as usize] = s as u16;
        next[len] += 1;
        s += 1;
    }
    Canonical { counts, symbols }
}

/// Decodes a Huffman-coded string literal, appending the bytes to `out`.
///
/// Rejects EOS inside the data and padding that is longer than 7 bits or not
/// all ones (RFC 7541 §5.2).
pub fn decode(src: &[u8], out: &mut Vec<u8>) -> Result<(), HpackError> {
    // Every symbol is at least 5 bits, so the output is at most 8/5 of the input.
    out.reserve(src.len().saturating_mul(8) / 5);
    let mut state = 0u8;
    for &byte in src {
        for nibble in [byte >> 4, byte & 0x0f] {
            let step = STEPS.next[usize::from(state)][usize::from(nibble)];
            if step.flags & STEP_EOS != 0 {
                return Err(HpackError::HuffmanEos);
            }
            if step.flags & STEP_EMIT != 0 {
                out.push(step.symbol);
            }
            state = step.state;
        }
    }
    if !STEPS.can_end[usize::from(state)] {
        return Err(HpackError::HuffmanPadding);
    }
    Ok(())
}

/// Internal nodes of the code tree: 257 leaves (256 bytes and EOS) need 256.
const NODES: usize = 256;
/// A step ends a symbol: `symbol` is output.
const STEP_EMIT: u8 = 1;
/// A step reads the EOS code: the string is invalid.
const STEP_EOS: u8 = 2;

/// What four input bits do from one state.
#[derive(Clone, Copy)]
struct Step {
    /// The state after the four bits (0 is the root: between symbols).
    state: u8,
    /// The symbol output, with [`STEP_EMIT`].
    symbol: u8,
    /// [`STEP_EMIT`], [`STEP_EOS`].
    flags: u8,
}

/// The nibble decoder's tables.
struct Steps {
    /// `next[state][nibble]`.
    next: [[Step; 16]; NODES],
    /// Whether a string may end in this state: the bits read since the last
    /// symbol are at most 7, all ones (a prefix of EOS used as padding).
    can_end: [bool; NODES],
}

const STEPS: Steps = build_steps();

/// The code tree from the canonical codes, then every (state, nibble) walked.
const fn build_steps() -> Steps {
    // children[node][bit]: < NODES an internal node, >= NODES the leaf of symbol
    // `child - NODES`; 0 (the root, never a child) means not yet set.
    let mut children = [[0u16; 2]; NODES];
    let mut depth = [0u8; NODES];
    let mut ones = [true; NODES];
    let mut used = 1;
    let mut len = 1;
    let mut code: u32 = 0;
    let mut prev_len = 0;
    let mut at = 0;
    while len <= MAX_CODE_LEN {
        let mut k: u16 = 0;
        while k < CANONICAL.counts[len] {
            if prev_len != 0 {
                code = (code + 1) << (len - prev_len);
            }
            prev_len = len;
            let symbol = CANONICAL.symbols[at];
            at += 1;
            k += 1;
            // Walk the code's bits from the root, adding internal nodes as needed.
            let mut node = 0;
            let mut i = len;
            while i > 1 {
                i -= 1;
                let bit = ((code >> i) & 1) as usize;
                if children[node][bit] == 0 {
                    children[node][bit] = used as u16;
                    depth[used] = depth[node] + 1;
                    ones[used] = ones[node] && bit == 1;
                    used += 1;
                }
                node = children[node][bit] as usize;
            }
            children[node][(code & 1) as usize] = NODES as u16 + symbol;
        }
        len += 1;
    }
    assert!(used == NODES, "the Huffman code is not complete");
    let empty = Step {
        state: 0,
        symbol: 0,
        flags: 0,
    };
    let mut next = [[empty; 16]; NODES];
    let mut can_end = [false; NODES];
    let mut state = 0;
    while state < NODES {
        can_end[state] = depth[state] <= 7 && ones[state];
        let mut nibble = 0;
        while nibble < 16 {
            let mut node = state;
            let mut step = empty;
            let mut bit = 4;
            while bit > 0 {
                bit -= 1;
                let child = children[node][(nibble >> bit) & 1] as usize;
                if child < NODES {
                    node = child;
                } else if child - NODES == EOS as usize {
                    step.flags |= STEP_EOS;
                    node = 0;
                } else {
                    assert!(step.flags & STEP_EMIT == 0, "two symbols in four bits");
                    step.flags |= STEP_EMIT;
                    step.symbol = (child - NODES) as u8;
                    node = 0;
                }
            }
            step.state = node as u8;
            next[state][nibble] = step;
            nibble += 1;
        }
        state += 1;
    }
    Steps { next, can_end }
}

/// The canonical bit-at-a-time decoder: the reference [`decode`] is tested against.
#[cfg(test)]
fn decode_bitwise(src: &[u8], out: &mut Vec<u8>) -> Result<(), HpackError> {
    // Every symbol is at least 5 bits, so the output is at most 8/5 of the input.
    out.reserve(src.len().saturating_mul(8) / 5);
    // State of the code being read: value so far, first code of the current
    // length, index of that code in `symbols`, bits read, all bits ones.
    let mut code: u32 = 0;
    let mut first: u32 = 0;
    let mut index: u32 = 0;
    let mut len: usize = 0;
    let mut all_ones = true;
    for &byte in src {
        for shift in (0..8).rev() {
            let bit = u32::from((byte >> shift) & 1);
            code |= bit;
            len += 1;
            all_ones &= bit == 1;
            let count = u32::from(*CANONICAL.counts.get(len).ok_or(HpackError::BadHuffman)?);
            if code < first + count {
                let at = (index + (code - first)) as usize;
                let symbol = *CANONICAL.symbols.get(at).ok_or(HpackError::BadHuffman)?;
                if symbol == EOS {
                    return Err(HpackError::HuffmanEos);
                }
                // Symbols other than EOS are < 256 by construction.
                out.push(symbol as u8);
                code = 0;
                first = 0;
                index = 0;
                len = 0;
                all_ones = true;
            } else {
                index += count;
                first = (first + count) << 1;
                code <<= 1;
            }
        }
    }
    if len > 7 || !all_ones {
        return Err(HpackError::HuffmanPadding);
    }
    Ok(())
}

/// Canonical code values, derived from the lengths; used by tests to encode.
#[cfg(test)]
pub(crate) fn codes() -> [(u32, u8); 257] {
    let mut out = [(0u32, 0u8); 257];
    let mut code: u32 = 0;
    let mut prev_len: u8 = 0;
    let mut at = 0usize;
    for len in 1..=MAX_CODE_LEN as u8 {
        for _ in 0..CANONICAL.counts[len as usize] {
            if prev_len != 0 {
                code = (code + 1) << (len - prev_len);
            }
            prev_len = len;
            out[CANONICAL.symbols[at] as usize] = (code, len);
            at += 1;
        }
    }
    out
}

/// Huffman-encodes `src` (test helper for building client header blocks).
#[cfg(test)]
pub(crate) fn encode(src: &[u8], out: &mut Vec<u8>) {
    let table = codes();
    let mut acc: u64 = 0;
    let mut bits: u32 = 0;
    for &b in src {
        let (code, len) = table[b as usize];
        acc = (acc << len) | u64::from(code);
        bits += u32::from(len);
        while bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    if bits > 0 {
        let pad = 8 - bits;
        out.push(((acc << pad) | ((1 << pad) - 1)) as u8);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dec(src: &[u8]) -> Result<Vec<u8>, HpackError> {
        let mut out = Vec::new();
        decode(src, &mut out).map(|()| out)
    }

    #[test]
    fn kraft_sum_is_exactly_one() {
        // A complete prefix code: sum of 2^-len over all symbols is 1.
        let sum: u64 = CODE_LENGTHS.iter().map(|&l| 1u64 << (30 - l)).sum();
        assert_eq!(sum, 1 << 30);
    }

    #[test]
    fn spot_check_codes_against_rfc() {
        let c = codes();
        assert_eq!(c[b'0' as usize], (0x0, 5));
        assert_eq!(c[b'a' as usize], (0x3, 5));
        assert_eq!(c[b' ' as usize], (0x14, 6));
        assert_eq!(c[b'&' as usize], (0xf8, 8));
        assert_eq!(c[0], (0x1ff8, 13));
        assert_eq!(c[1], (0x7fffd8, 23));
        assert_eq!(c[255], (0x3ffffee, 26));
        assert_eq!(c[256], (0x3fffffff, 30));
    }

    #[test]
    fn rfc_c4_strings() {
        let www = [
            0xf1, 0xe3, 0xc2, 0xe5, 0xf2, 0x3a, 0x6b, 0xa0, 0xab, 0x90, 0xf4, 0xff,
        ];
        assert_eq!(dec(&www).unwrap(), b"www.example.com");
        assert_eq!(
            dec(&[0xa8, 0xeb, 0x10, 0x64, 0x9c, 0xbf]).unwrap(),
            b"no-cache"
        );
        assert_eq!(
            dec(&[0x25, 0xa8, 0x49, 0xe9, 0x5b, 0xb8, 0xe8, 0xb4, 0xbf]).unwrap(),
            b"custom-value"
        );
    }

    #[test]
    fn round_trip_all_bytes() {
        let all: Vec<u8> = (0..=255u8).chain((0..=255u8).rev()).collect();
        let mut enc = Vec::new();
        encode(&all, &mut enc);
        assert_eq!(dec(&enc).unwrap(), all);
    }

    #[test]
    fn empty_is_empty() {
        assert_eq!(dec(&[]).unwrap(), b"");
    }

    #[test]
    fn rejects_eos() {
        // EOS (30 ones) followed by 2 padding ones.
        assert_eq!(dec(&[0xff, 0xff, 0xff, 0xff]), Err(HpackError::HuffmanEos));
    }

    #[test]
    fn rejects_bad_padding() {
        // 'a' = 00011, then padding 000 (not ones).
        assert_eq!(dec(&[0x18]), Err(HpackError::HuffmanPadding));
        // 'a' then a full byte of ones: 11 bits of padding.
        assert_eq!(dec(&[0x1f, 0xff]), Err(HpackError::HuffmanPadding));
        // Correct: 'a' + 111.
        assert_eq!(dec(&[0x1f]).unwrap(), b"a");
    }

    fn unhex(s: &str) -> Vec<u8> {
        let s: String = s.chars().filter(|c| !c.is_whitespace()).collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
            .collect()
    }

    fn bitwise(src: &[u8]) -> Result<Vec<u8>, HpackError> {
        let mut out = Vec::new();
        decode_bitwise(src, &mut out).map(|()| out)
    }

    #[test]
    fn rfc_c6_response_strings() {
        // RFC 7541 C.6.1-C.6.3, the Huffman-coded string literals.
        let cases = [
            ("6402", "302"),
            ("aec3 771a 4b", "private"),
            (
                "d07a be94 1054 d444 a820 0595 040b 8166 e082 a62d 1bff",
                "Mon, 21 Oct 2013 20:13:21 GMT",
            ),
            (
                "9d29 ad17 1863 c78f 0b97 c8e9 ae82 ae43 d3",
                "https://www.example.com",
            ),
            ("640e ff", "307"),
            (
                "d07a be94 1054 d444 a820 0595 040b 8166 e084 a62d 1bff",
                "Mon, 21 Oct 2013 20:13:22 GMT",
            ),
            ("9bd9 ab", "gzip"),
            (
                "94e7 821d d7f2 e6c7 b335 dfdf cd5b 3960 d5af 2708 7f36 72c1 ab27 0fb5 291f 9587 \
                 3160 65c0 03ed 4ee5 b106 3d50 07",
                "foo=ASDJKHQKBZXOQWEOPIUAXQWEOIU; max-age=3600; version=1",
            ),
        ];
        for (coded, plain) in cases {
            let coded = unhex(coded);
            assert_eq!(dec(&coded).expect(plain), plain.as_bytes());
            assert_eq!(bitwise(&coded).expect(plain), plain.as_bytes());
        }
    }

    #[test]
    fn every_symbol_alone_with_its_padding_rules() {
        let table = codes();
        for symbol in 0..=255u8 {
            let mut enc = Vec::new();
            encode(&[symbol], &mut enc);
            assert_eq!(dec(&enc).expect("decodes"), [symbol], "symbol {symbol}");
            // A padding bit set to zero is never taken as padding: the bits are refused, or
            // (a zero can start a short code, '9' is 011111) read as another symbol.
            let pad = (8 - u32::from(table[usize::from(symbol)].1) % 8) % 8;
            for bit in 0..pad {
                let mut bad = enc.clone();
                *bad.last_mut().expect("a byte") &= !(1 << bit);
                let got = dec(&bad);
                assert_ne!(got, Ok(vec![symbol]), "{symbol} {bit}");
                assert_eq!(got, bitwise(&bad), "{symbol} {bit}");
            }
            if pad > 0 {
                // All padding zero: refused, or read as more symbols ('0' is 00000).
                let mut zeros = enc.clone();
                *zeros.last_mut().expect("a byte") &= !((1u8 << pad) - 1);
                let got = dec(&zeros);
                assert_ne!(got, Ok(vec![symbol]), "{symbol}");
                assert_eq!(got, bitwise(&zeros), "{symbol}");
            }
            // A whole extra byte of ones is more than 7 bits of padding.
            let mut long = enc.clone();
            long.push(0xff);
            assert_eq!(dec(&long), Err(HpackError::HuffmanPadding), "{symbol}");
        }
    }

    #[test]
    fn table_decoder_matches_the_canonical_one() {
        // Deterministic xorshift: random bytes (mostly invalid), and valid encodings of
        // random text cut at every length (ending inside a code, in padding, etc.).
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..20_000 {
            let len = (next() % 12) as usize;
            let input: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            assert_eq!(dec(&input), bitwise(&input), "{input:02x?}");
        }
        for _ in 0..2_000 {
            let len = (next() % 24) as usize;
            let text: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            let mut enc = Vec::new();
            encode(&text, &mut enc);
            assert_eq!(dec(&enc).expect("valid"), text);
            for cut in 0..enc.len() {
                assert_eq!(
                    dec(&enc[..cut]),
                    bitwise(&enc[..cut]),
                    "{:02x?}",
                    &enc[..cut]
                );
            }
        }
    }
}

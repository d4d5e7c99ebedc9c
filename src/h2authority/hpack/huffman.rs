//! HPACK Huffman decoding (RFC 7541 §5.2, Appendix B).
//!
//! The RFC code is canonical: codes of equal length are consecutive and
//! ordered by symbol. So the code lengths alone define it, and decoding can
//! walk one bit at a time with per-length counts (the classic canonical
//! decoder), without storing the codes themselves.

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
}

//! HPACK header block decoding (RFC 7541 §5, §6).

use std::ops::ControlFlow;

use super::table::{DynamicTable, ENTRY_OVERHEAD};
use super::{Field, FieldList, HpackError, huffman};

/// Initial dynamic table size: the SETTINGS_HEADER_TABLE_SIZE default (RFC 9113 §6.5.2).
pub const DEFAULT_TABLE_SIZE: usize = 4096;
/// Largest dynamic table size update we accept from a client.
pub const MAX_TABLE_SIZE: usize = 64 * 1024;
/// Cap on the decoded header list, counted as in SETTINGS_MAX_HEADER_LIST_SIZE.
/// Needed because indexed fields can expand a small block enormously.
pub const MAX_HEADER_LIST_SIZE: usize = 1024 * 1024;

/// Decoder whose dynamic table mirrors the one of the peer's encoder.
#[derive(Debug)]
pub struct Decoder {
    table: DynamicTable,
    max_table_size: usize,
    max_list_size: usize,
    /// A literal field's name and value, decoded.
    literal: Vec<u8>,
}

/// Takes a block's fields as they are decoded.
pub trait FieldSink {
    /// One field. `Break` ends decoding at this field.
    fn field(&mut self, name: &[u8], value: &[u8], never_indexed: bool) -> ControlFlow<()>;
}

impl FieldSink for FieldList {
    fn field(&mut self, name: &[u8], value: &[u8], never_indexed: bool) -> ControlFlow<()> {
        let bytes = self.bytes_mut();
        let start = bytes.len();
        bytes.extend_from_slice(name);
        let name_end = bytes.len();
        bytes.extend_from_slice(value);
        self.finish(start, name_end, never_indexed);
        ControlFlow::Continue(())
    }
}

/// Stops at the first field `bad` picks.
struct FirstBad<F>(F);

impl<F: FnMut(&[u8], &[u8]) -> bool> FieldSink for FirstBad<F> {
    fn field(&mut self, name: &[u8], value: &[u8], _: bool) -> ControlFlow<()> {
        if (self.0)(name, value) {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    }
}

impl Default for Decoder {
    fn default() -> Self {
        Self::new(MAX_TABLE_SIZE, MAX_HEADER_LIST_SIZE)
    }
}

impl Decoder {
    /// A decoder accepting table size updates up to `max_table_size` and
    /// decoded header lists up to `max_list_size`.
    pub fn new(max_table_size: usize, max_list_size: usize) -> Self {
        Self {
            table: DynamicTable::new(DEFAULT_TABLE_SIZE.min(max_table_size)),
            max_table_size,
            max_list_size,
            literal: Vec::new(),
        }
    }

    /// The mirrored dynamic table (for tests and diagnostics).
    pub fn table(&self) -> &DynamicTable {
        &self.table
    }

    /// Decodes one complete header block, appending its fields to `fields`.
    ///
    /// On error the dynamic table may be partly updated; the connection must
    /// then be dropped.
    pub fn decode(&mut self, block: &[u8], fields: &mut Vec<Field>) -> Result<(), HpackError> {
        let mut list = FieldList::default();
        self.decode_list(block, &mut list)?;
        fields.extend(list.iter().map(|f| Field {
            name: f.name.to_vec(),
            value: f.value.to_vec(),
            never_indexed: f.never_indexed,
        }));
        Ok(())
    }

    /// [`Decoder::decode`] into a reusable [`FieldList`] (appended to): no allocation per
    /// field, only for entries added to the dynamic table.
    pub fn decode_list(&mut self, block: &[u8], list: &mut FieldList) -> Result<(), HpackError> {
        self.decode_into(block, list).map(|_| ())
    }

    /// Whether a complete header block has a field that `bad` picks, decoded without
    /// keeping its fields (nothing is copied for an indexed field).
    ///
    /// On `Ok(false)` the dynamic table is updated as by [`Decoder::decode_list`]. On
    /// `Ok(true)` it is as it was before the block, so that the caller can decode the
    /// block again, keeping its fields. On error it may be partly updated, as with
    /// `decode_list`.
    pub fn judge(
        &mut self,
        block: &[u8],
        bad: impl FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<bool, HpackError> {
        self.table.checkpoint();
        let result = self.decode_into(block, &mut FirstBad(bad));
        match result {
            Ok(ControlFlow::Break(())) => self.table.rollback(),
            Ok(ControlFlow::Continue(())) | Err(_) => self.table.release(),
        }
        result.map(|flow| flow.is_break())
    }

    /// Decodes one complete header block into `sink`, updating the dynamic table, until
    /// the sink breaks (the field it broke at is not added to the table).
    fn decode_into(
        &mut self,
        block: &[u8],
        sink: &mut impl FieldSink,
    ) -> Result<ControlFlow<()>, HpackError> {
        let mut src = block;
        let mut list_size: usize = 0;
        let mut seen_field = false;
        while let Some(&first) = src.first() {
            let (field_len, flow) = if first & 0x80 != 0 {
                // §6.1 indexed header field.
                let index = decode_int(&mut src, 7)?;
                let (name, value) = self.table.get(index)?;
                (name.len() + value.len(), sink.field(name, value, false))
            } else if first & 0xe0 == 0x20 {
                // §6.3 dynamic table size update: only before the first field.
                if seen_field {
                    return Err(HpackError::SizeUpdateNotAtStart);
                }
                let size = decode_int(&mut src, 5)?;
                if size > self.max_table_size {
                    return Err(HpackError::TableSizeTooLarge {
                        requested: size,
                        limit: self.max_table_size,
                    });
                }
                self.table.set_max_size(size);
                continue;
            } else {
                // §6.2 literals: 01 = incremental indexing (6-bit prefix),
                // 0000 = without indexing, 0001 = never indexed (4-bit prefix).
                let (prefix, indexing, never_indexed) = if first & 0xc0 == 0x40 {
                    (6, true, false)
                } else {
                    (4, false, first & 0x10 != 0)
                };
                let name_index = decode_int(&mut src, prefix)?;
                let literal = &mut self.literal;
                literal.clear();
                if name_index == 0 {
                    decode_string(&mut src, literal)?;
                } else {
                    literal.extend_from_slice(self.table.get(name_index)?.0);
                }
                let name_end = literal.len();
                decode_string(&mut src, literal)?;
                let (name, value) = literal.split_at(name_end);
                let flow = sink.field(name, value, never_indexed);
                if indexing && flow.is_continue() {
                    self.table.insert(name, value);
                }
                (literal.len(), flow)
            };
            seen_field = true;
            list_size = list_size
                .saturating_add(field_len)
                .saturating_add(ENTRY_OVERHEAD);
            if list_size > self.max_list_size {
                return Err(HpackError::HeaderListTooLarge {
                    limit: self.max_list_size,
                });
            }
            if flow.is_break() {
                return Ok(flow);
            }
        }
        Ok(ControlFlow::Continue(()))
    }
}

/// Decodes an integer with an N-bit prefix (§5.1), advancing `src`.
/// Values above `u32::MAX` are rejected.
pub fn decode_int(src: &mut &[u8], prefix_bits: u8) -> Result<usize, HpackError> {
    let (&first, rest) = src.split_first().ok_or(HpackError::Truncated)?;
    let mask: u8 = if prefix_bits >= 8 {
        0xff
    } else {
        (1u8 << prefix_bits) - 1
    };
    let mut value = u64::from(first & mask);
    *src = rest;
    if value < u64::from(mask) {
        return usize::try_from(value).map_err(|_| HpackError::IntegerOverflow);
    }
    let mut shift: u32 = 0;
    loop {
        let (&byte, rest) = src.split_first().ok_or(HpackError::Truncated)?;
        *src = rest;
        // Beyond 5 continuation bytes the value cannot fit in 32 bits.
        if shift > 28 {
            return Err(HpackError::IntegerOverflow);
        }
        value += u64::from(byte & 0x7f) << shift;
        if value > u64::from(u32::MAX) {
            return Err(HpackError::IntegerOverflow);
        }
        if byte & 0x80 == 0 {
            return usize::try_from(value).map_err(|_| HpackError::IntegerOverflow);
        }
        shift += 7;
    }
}

/// Decodes a string literal (§5.2), Huffman-coded or raw, advancing `src` and appending
/// the string to `out`.
fn decode_string(src: &mut &[u8], out: &mut Vec<u8>) -> Result<(), HpackError> {
    let huffman_coded = src.first().ok_or(HpackError::Truncated)? & 0x80 != 0;
    let len = decode_int(src, 7)?;
    if len > src.len() {
        return Err(HpackError::Truncated);
    }
    let (data, rest) = src.split_at(len);
    *src = rest;
    if huffman_coded {
        huffman::decode(data, out)
    } else {
        out.extend_from_slice(data);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every entry of the dynamic table, newest first.
    fn entries(d: &Decoder) -> Vec<(Vec<u8>, Vec<u8>)> {
        let t = d.table();
        (0..t.len())
            .map(|i| {
                t.get(62 + i)
                    .map(|(n, v)| (n.to_vec(), v.to_vec()))
                    .unwrap()
            })
            .collect()
    }

    #[test]
    fn judging_a_block_agrees_with_decoding_it() {
        use crate::h2authority::test_support::IndexingEncoder;
        let bad = |n: &[u8], v: &[u8]| n == b":authority" && v.first() == Some(&b'/');
        for huffman in [false, true] {
            let mut enc = IndexingEncoder::new(huffman);
            let (mut decoded, mut judged) = (Decoder::default(), Decoder::default());
            for i in 0..400usize {
                // Authorities repeat (indexed) and change (literals that evict); one in
                // seven is bad, in various positions of the block.
                let authority = if i % 7 == 3 {
                    format!("/run/{}.sock", i % 5)
                } else {
                    format!("h{}", i % 9)
                };
                let timeout = format!("{}u", 2_999_000 + i * 37);
                let big = "v".repeat(i % 300);
                let mut fields = vec![(":method", "POST"), ("grpc-timeout", timeout.as_str())];
                fields.insert(i % 3, (":authority", authority.as_str()));
                if i % 4 == 0 {
                    fields.push(("x-big", big.as_str()));
                }
                let block = enc.encode(&fields);

                let mut want = FieldList::default();
                decoded.decode_list(&block, &mut want).unwrap();
                let want_bad = want.iter().any(|f| bad(f.name, f.value));
                let before = entries(&judged);
                let verdict = judged.judge(&block, bad).unwrap();
                assert_eq!(verdict, want_bad, "block {i}");
                if verdict {
                    assert_eq!(entries(&judged), before, "block {i}: rolled back");
                    let mut got = FieldList::default();
                    judged.decode_list(&block, &mut got).unwrap();
                    assert!(got.iter().eq(want.iter()), "block {i}");
                }
                assert_eq!(entries(&judged), entries(&decoded), "block {i}");
                assert_eq!(judged.table().size(), decoded.table().size());
            }
        }
    }

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.chars().filter(|c| !c.is_whitespace()).collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    fn fields(list: &[(&str, &str)]) -> Vec<Field> {
        list.iter()
            .map(|(n, v)| Field {
                name: n.as_bytes().to_vec(),
                value: v.as_bytes().to_vec(),
                never_indexed: false,
            })
            .collect()
    }

    fn decode_one(d: &mut Decoder, block: &[u8]) -> Result<Vec<Field>, HpackError> {
        let mut out = Vec::new();
        d.decode(block, &mut out).map(|()| out)
    }

    #[test]
    fn integers_rfc_c1() {
        // C.1.1: 10 with a 5-bit prefix.
        assert_eq!(decode_int(&mut &[0b0000_1010][..], 5).unwrap(), 10);
        // C.1.2: 1337 with a 5-bit prefix.
        let mut src = &[0b0001_1111, 0b1001_1010, 0b0000_1010, 0xaa][..];
        assert_eq!(decode_int(&mut src, 5).unwrap(), 1337);
        assert_eq!(src, &[0xaa]);
        // C.1.3: 42 with an 8-bit prefix.
        assert_eq!(decode_int(&mut &[42][..], 8).unwrap(), 42);
    }

    #[test]
    fn integer_errors() {
        assert_eq!(decode_int(&mut &[][..], 5), Err(HpackError::Truncated));
        assert_eq!(
            decode_int(&mut &[0x1f, 0x80][..], 5),
            Err(HpackError::Truncated)
        );
        let big = [0x1f, 0xff, 0xff, 0xff, 0xff, 0x0f];
        assert_eq!(
            decode_int(&mut &big[..], 5),
            Err(HpackError::IntegerOverflow)
        );
        let long = [0x1f, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x01];
        assert_eq!(
            decode_int(&mut &long[..], 5),
            Err(HpackError::IntegerOverflow)
        );
        // u32::MAX itself is fine: 31 + 0xffffffe0.
        let max = [0x1f, 0xe0, 0xff, 0xff, 0xff, 0x0f];
        assert_eq!(decode_int(&mut &max[..], 5).unwrap(), u32::MAX as usize);
    }

    #[test]
    fn rfc_c2_single_fields() {
        let mut d = Decoder::default();
        // C.2.1 literal with indexing.
        let b = hex("400a 6375 7374 6f6d 2d6b 6579 0d63 7573 746f 6d2d 6865 6164 6572");
        assert_eq!(
            decode_one(&mut d, &b).unwrap(),
            fields(&[("custom-key", "custom-header")])
        );
        assert_eq!(d.table().size(), 55);
        // C.2.2 literal without indexing.
        let mut d = Decoder::default();
        let b = hex("040c 2f73 616d 706c 652f 7061 7468");
        assert_eq!(
            decode_one(&mut d, &b).unwrap(),
            fields(&[(":path", "/sample/path")])
        );
        assert_eq!(d.table().len(), 0);
        // C.2.3 never indexed.
        let b = hex("1008 7061 7373 776f 7264 0673 6563 7265 74");
        let got = decode_one(&mut d, &b).unwrap();
        assert_eq!(got[0].value, b"secret");
        assert!(got[0].never_indexed);
        assert_eq!(d.table().len(), 0);
        // C.2.4 indexed.
        assert_eq!(
            decode_one(&mut d, &[0x82]).unwrap(),
            fields(&[(":method", "GET")])
        );
    }

    fn check_requests(blocks: [&str; 3]) {
        let mut d = Decoder::default();
        let r1 = decode_one(&mut d, &hex(blocks[0])).unwrap();
        assert_eq!(
            r1,
            fields(&[
                (":method", "GET"),
                (":scheme", "http"),
                (":path", "/"),
                (":authority", "www.example.com"),
            ])
        );
        assert_eq!(d.table().size(), 57);
        let r2 = decode_one(&mut d, &hex(blocks[1])).unwrap();
        assert_eq!(
            r2,
            fields(&[
                (":method", "GET"),
                (":scheme", "http"),
                (":path", "/"),
                (":authority", "www.example.com"),
                ("cache-control", "no-cache"),
            ])
        );
        assert_eq!(d.table().size(), 110);
        let r3 = decode_one(&mut d, &hex(blocks[2])).unwrap();
        assert_eq!(
            r3,
            fields(&[
                (":method", "GET"),
                (":scheme", "https"),
                (":path", "/index.html"),
                (":authority", "www.example.com"),
                ("custom-key", "custom-value"),
            ])
        );
        assert_eq!(d.table().size(), 164);
        assert_eq!(d.table().len(), 3);
    }

    #[test]
    fn rfc_c3_requests_without_huffman() {
        check_requests([
            "8286 8441 0f77 7777 2e65 7861 6d70 6c65 2e63 6f6d",
            "8286 84be 5808 6e6f 2d63 6163 6865",
            "8287 85bf 400a 6375 7374 6f6d 2d6b 6579 0c63 7573 746f 6d2d 7661 6c75 65",
        ]);
    }

    #[test]
    fn rfc_c4_requests_with_huffman() {
        check_requests([
            "8286 8441 8cf1 e3c2 e5f2 3a6b a0ab 90f4 ff",
            "8286 84be 5886 a8eb 1064 9cbf",
            "8287 85bf 4088 25a8 49e9 5ba9 7d7f 8925 a849 e95b b8e8 b4bf",
        ]);
    }

    #[test]
    fn rfc_c5_responses_with_eviction() {
        // C.5: 256-byte table; the third response evicts older entries.
        let mut d = Decoder::default();
        let set = hex("3fe1 01"); // size update to 256, then C.5.1 follows.
        let r1 = hex(
            "4803 3330 3258 0770 7269 7661 7465 611d 4d6f 6e2c 2032 3120 4f63 7420 3230 3133 \
             2032 303a 3133 3a32 3120 474d 546e 1768 7474 7073 3a2f 2f77 7777 2e65 7861 6d70 \
             6c65 2e63 6f6d",
        );
        let mut b1 = set.clone();
        b1.extend_from_slice(&r1);
        assert_eq!(decode_one(&mut d, &b1).unwrap().len(), 4);
        assert_eq!(d.table().size(), 222);
        let r2 = decode_one(&mut d, &hex("4803 3330 37c1 c0bf")).unwrap();
        assert_eq!(r2[0].value, b"307");
        assert_eq!(r2[3].value, b"https://www.example.com");
        assert_eq!(d.table().size(), 222);
        assert_eq!(d.table().len(), 4);
    }

    #[test]
    fn malformed_blocks_are_errors() {
        let cases: &[(&[u8], HpackError)] = &[
            (&[0x80], HpackError::InvalidIndex(0)),
            (&[0xbe], HpackError::InvalidIndex(62)),
            (&[0xff, 0xff, 0x7f], HpackError::InvalidIndex(127 + 0x3fff)),
            (&[0x41], HpackError::Truncated),
            (&[0x41, 0x05, b'a'], HpackError::Truncated),
            (&[0x40, 0x01], HpackError::Truncated),
            (&[0x40], HpackError::Truncated),
            (&[0x7e, 0x00, 0x00], HpackError::InvalidIndex(62)),
            // Huffman value 'a' with zero padding.
            (&[0x41, 0x81, 0x18], HpackError::HuffmanPadding),
            // Huffman value that is all EOS.
            (
                &[0x41, 0x84, 0xff, 0xff, 0xff, 0xff],
                HpackError::HuffmanEos,
            ),
            (&[0x82, 0x20], HpackError::SizeUpdateNotAtStart),
            (
                &[0x3f, 0xe1, 0xff, 0x07],
                HpackError::TableSizeTooLarge {
                    requested: 131_072,
                    limit: MAX_TABLE_SIZE,
                },
            ),
        ];
        for (block, want) in cases {
            let mut d = Decoder::default();
            let got = decode_one(&mut d, block);
            assert_eq!(got, Err(*want), "block {block:02x?}");
        }
    }

    #[test]
    fn header_list_size_is_bounded() {
        // One 4000-byte entry referenced over and over expands far past the cap.
        let mut d = Decoder::new(MAX_TABLE_SIZE, 64 * 1024);
        let mut block = vec![0x40, 0x01, b'x', 0x7f, 0xa1, 0x1e];
        block.extend(std::iter::repeat_n(b'v', 4000));
        block.extend(std::iter::repeat_n(0xbe, 100));
        assert_eq!(
            decode_one(&mut d, &block),
            Err(HpackError::HeaderListTooLarge { limit: 64 * 1024 })
        );
    }

    #[test]
    fn reused_field_list_matches_owned_fields() {
        let blocks = [
            "8286 8441 8cf1 e3c2 e5f2 3a6b a0ab 90f4 ff",
            "8286 84be 5886 a8eb 1064 9cbf",
            "8287 85bf 4088 25a8 49e9 5ba9 7d7f 8925 a849 e95b b8e8 b4bf",
            "1008 7061 7373 776f 7264 0673 6563 7265 74",
        ];
        let (mut owned, mut borrowed) = (Decoder::default(), Decoder::default());
        let mut list = FieldList::default();
        for block in blocks {
            let want = decode_one(&mut owned, &hex(block)).unwrap();
            list.clear();
            borrowed.decode_list(&hex(block), &mut list).unwrap();
            let got: Vec<Field> = list
                .iter()
                .map(|f| Field {
                    name: f.name.to_vec(),
                    value: f.value.to_vec(),
                    never_indexed: f.never_indexed,
                })
                .collect();
            assert_eq!(got, want, "{block}");
            assert_eq!(borrowed.table().size(), owned.table().size());
        }
        list.release(0);
        assert!(list.is_empty());
    }
}

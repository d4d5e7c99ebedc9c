//! Stateless HPACK encoding: never adds to nor reads the dynamic table.
//!
//! After the rewriter has changed one header block, the server's dynamic
//! table no longer matches the client's. Encoding only with the static table
//! and literals-without-indexing keeps it frozen and never references it.

use super::table::STATIC;
use super::{Field, FieldRef};

/// Appends the HPACK encoding of `fields` to `out` without using the dynamic table.
pub fn encode_block(fields: &[Field], out: &mut Vec<u8>) {
    encode_fields(fields.iter().map(Field::as_ref), out);
}

/// [`encode_block`] of borrowed fields (a [`super::FieldList`]'s).
pub fn encode_fields<'a>(fields: impl IntoIterator<Item = FieldRef<'a>>, out: &mut Vec<u8>) {
    for field in fields {
        encode_field(field, out);
    }
}

fn encode_field(field: FieldRef<'_>, out: &mut Vec<u8>) {
    let mut name_index = 0;
    for (i, (name, value)) in STATIC.iter().enumerate() {
        if *name == field.name {
            if *value == field.value && !field.never_indexed {
                // §6.1 indexed field, static entry (1-based).
                encode_int(i + 1, 7, 0x80, out);
                return;
            }
            if name_index == 0 {
                name_index = i + 1;
            }
        }
    }
    // §6.2.2 without indexing (0000) or §6.2.3 never indexed (0001), 4-bit prefix.
    let flags = if field.never_indexed { 0x10 } else { 0x00 };
    encode_int(name_index, 4, flags, out);
    if name_index == 0 {
        encode_raw_string(field.name, out);
    }
    encode_raw_string(field.value, out);
}

/// §5.2 string literal, not Huffman-coded.
fn encode_raw_string(s: &[u8], out: &mut Vec<u8>) {
    encode_int(s.len(), 7, 0x00, out);
    out.extend_from_slice(s);
}

/// §5.1 integer with an N-bit prefix; `flags` fills the bits above the prefix.
pub fn encode_int(mut value: usize, prefix_bits: u8, flags: u8, out: &mut Vec<u8>) {
    let max = (1usize << prefix_bits) - 1;
    if value < max {
        out.push(flags | value as u8);
        return;
    }
    out.push(flags | max as u8);
    value -= max;
    while value >= 0x80 {
        out.push((value & 0x7f) as u8 | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

#[cfg(test)]
mod tests {
    use super::super::Decoder;
    use super::*;

    fn f(n: &str, v: &str, never: bool) -> Field {
        Field {
            name: n.as_bytes().to_vec(),
            value: v.as_bytes().to_vec(),
            never_indexed: never,
        }
    }

    #[test]
    fn integer_examples() {
        let mut out = Vec::new();
        encode_int(10, 5, 0, &mut out);
        encode_int(1337, 5, 0, &mut out);
        encode_int(42, 8, 0, &mut out);
        assert_eq!(out, [0x0a, 0x1f, 0x9a, 0x0a, 0x2a]);
    }

    #[test]
    fn uses_static_table_only() {
        let fields = vec![
            f(":method", "POST", false),
            f(":path", "/v2.KeyManagementService/Encrypt", false),
            f(":authority", "localhost", false),
            f("x-custom", "v", false),
            f("authorization", "secret", true),
            f(":method", "GET", true),
        ];
        let mut out = Vec::new();
        encode_block(&fields, &mut out);
        // :method POST is static index 3.
        assert_eq!(out[0], 0x83);
        // :path uses static name 4, without indexing.
        assert_eq!(out[1], 0x04);

        let mut d = Decoder::default();
        let mut got = Vec::new();
        d.decode(&out, &mut got).unwrap();
        assert_eq!(got, fields);
        assert_eq!(d.table().len(), 0, "must not add to the dynamic table");
    }
}

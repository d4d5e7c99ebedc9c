//! Just enough HPACK (RFC 7541) for the `:authority` fix: a full decoder that
//! mirrors the client's dynamic table, and an encoder that never touches the
//! dynamic table.

pub mod decode;
pub mod encode;
pub mod huffman;
pub mod table;

pub use decode::Decoder;
pub use encode::{encode_block, encode_fields};

/// One decoded header field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Field {
    /// Field name.
    pub name: Vec<u8>,
    /// Field value.
    pub value: Vec<u8>,
    /// Sent as "literal never indexed": intermediaries must keep it that way (§6.2.3).
    pub never_indexed: bool,
}

impl Field {
    /// The field as a [`FieldRef`].
    pub fn as_ref(&self) -> FieldRef<'_> {
        FieldRef {
            name: &self.name,
            value: &self.value,
            never_indexed: self.never_indexed,
        }
    }
}

/// A decoded header field borrowed from a [`FieldList`] (or a [`Field`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FieldRef<'a> {
    /// Field name.
    pub name: &'a [u8],
    /// Field value.
    pub value: &'a [u8],
    /// Sent as "literal never indexed".
    pub never_indexed: bool,
}

/// The fields of one header block, all names and values in one byte buffer. Reused from
/// block to block, it allocates nothing once its buffers have grown: the rewriter decodes
/// every request's headers, and two `Vec`s per field were most of its cost.
#[derive(Debug, Default)]
pub struct FieldList {
    bytes: Vec<u8>,
    spans: Vec<Span>,
}

/// Where one field's name and value are in [`FieldList::bytes`]: `start..name_end` and
/// `name_end..value_end`.
#[derive(Debug, Clone, Copy)]
struct Span {
    start: usize,
    name_end: usize,
    value_end: usize,
    never_indexed: bool,
}

impl FieldList {
    /// Empties the list, keeping its buffers.
    pub fn clear(&mut self) {
        self.bytes.clear();
        self.spans.clear();
    }

    /// Empties the list and gives back buffer capacity above `bytes` (an idle connection
    /// stays small after an unusually large block).
    pub fn release(&mut self, bytes: usize) {
        self.clear();
        self.bytes.shrink_to(bytes);
        self.spans.shrink_to(bytes / 64);
    }

    /// Number of fields.
    pub fn len(&self) -> usize {
        self.spans.len()
    }

    /// True when the list holds no field.
    pub fn is_empty(&self) -> bool {
        self.spans.is_empty()
    }

    /// The fields in block order.
    pub fn iter(&self) -> impl Iterator<Item = FieldRef<'_>> + '_ {
        self.spans.iter().map(|s| FieldRef {
            name: self.bytes.get(s.start..s.name_end).unwrap_or_default(),
            value: self.bytes.get(s.name_end..s.value_end).unwrap_or_default(),
            never_indexed: s.never_indexed,
        })
    }

    /// The byte buffer names and values are appended to.
    fn bytes_mut(&mut self) -> &mut Vec<u8> {
        &mut self.bytes
    }

    /// Ends a field whose name starts at `start` and ends at `name_end`, and whose value
    /// is the rest of the buffer.
    fn finish(&mut self, start: usize, name_end: usize, never_indexed: bool) {
        self.spans.push(Span {
            start,
            name_end,
            value_end: self.bytes.len(),
            never_indexed,
        });
    }
}

/// Malformed or over-limit HPACK input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HpackError {
    /// The block ended inside a field representation, integer or string.
    #[error("truncated header block")]
    Truncated,
    /// An integer needed more bits than we accept (values are capped at `u32::MAX`).
    #[error("HPACK integer overflow")]
    IntegerOverflow,
    /// Index 0, or an index past the end of the static plus dynamic table.
    #[error("invalid table index {0}")]
    InvalidIndex(usize),
    /// A Huffman string contained the EOS symbol.
    #[error("EOS symbol in Huffman string")]
    HuffmanEos,
    /// A Huffman string ended with more than 7 padding bits or padding that is not all ones.
    #[error("invalid Huffman padding")]
    HuffmanPadding,
    /// A Huffman code longer than any in the table (cannot happen with a complete code).
    #[error("invalid Huffman code")]
    BadHuffman,
    /// A dynamic table size update above the cap we accept.
    #[error("dynamic table size {requested} exceeds limit {limit}")]
    TableSizeTooLarge {
        /// Size asked for.
        requested: usize,
        /// Our cap.
        limit: usize,
    },
    /// A dynamic table size update after the first field of a block (§4.2).
    #[error("dynamic table size update after a header field")]
    SizeUpdateNotAtStart,
    /// The decoded header list (name + value + 32 per field) exceeds the cap.
    #[error("decoded header list exceeds {limit} bytes")]
    HeaderListTooLarge {
        /// Our cap, in bytes.
        limit: usize,
    },
}

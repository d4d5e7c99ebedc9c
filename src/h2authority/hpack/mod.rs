//! Just enough HPACK (RFC 7541) for the `:authority` fix: a full decoder that
//! mirrors the client's dynamic table, and an encoder that never touches the
//! dynamic table.

pub mod decode;
pub mod encode;
pub mod huffman;
pub mod table;

pub use decode::Decoder;
pub use encode::encode_block;

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

//! Errors of the `:authority` rewriter. Any error means the client's byte
//! stream cannot be safely forwarded, so the connection must be closed.

use super::hpack::HpackError;

/// Why the rewriter gave up on a connection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RewriteError {
    /// The stream did not begin with the HTTP/2 client connection preface.
    #[error("connection does not start with the HTTP/2 client preface")]
    BadPreface,
    /// HEADERS plus CONTINUATION payloads of one header block exceed the limit.
    #[error("header block exceeds {limit} bytes")]
    HeaderBlockTooLarge {
        /// The limit, in bytes.
        limit: usize,
    },
    /// A HEADERS frame too short for its PADDED / PRIORITY fields, or whose
    /// padding is longer than its payload.
    #[error("malformed HEADERS frame on stream {stream_id}")]
    MalformedHeaders {
        /// The frame's stream.
        stream_id: u32,
    },
    /// A CONTINUATION outside a header block, or any other frame (or another
    /// stream's CONTINUATION) while a header block is open (RFC 9113 §6.10).
    #[error("unexpected frame type {kind:#x} on stream {stream_id}")]
    UnexpectedFrame {
        /// The frame type.
        kind: u8,
        /// The frame's stream.
        stream_id: u32,
    },
    /// The header block is not valid HPACK or exceeds an HPACK limit.
    #[error("HPACK: {0}")]
    Hpack(#[from] HpackError),
}

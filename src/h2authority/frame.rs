//! The bits of HTTP/2 framing (RFC 9113 §4.1, §6.2, §6.10) the rewriter needs.

/// The client connection preface (RFC 9113 §3.4).
pub const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Length of every frame header.
pub const HEADER_LEN: usize = 9;
/// Smallest legal SETTINGS_MAX_FRAME_SIZE: safe for any peer.
pub const MAX_PAYLOAD: usize = 16_384;

/// Frame type HEADERS.
pub const TYPE_HEADERS: u8 = 0x1;
/// Frame type CONTINUATION.
pub const TYPE_CONTINUATION: u8 = 0x9;

/// Flag END_STREAM.
pub const FLAG_END_STREAM: u8 = 0x1;
/// Flag END_HEADERS: the header block ends with this frame.
pub const FLAG_END_HEADERS: u8 = 0x4;
/// Flag PADDED: a pad length byte and padding surround the payload.
pub const FLAG_PADDED: u8 = 0x8;
/// Flag PRIORITY: the HEADERS payload starts with the priority fields.
pub const FLAG_PRIORITY: u8 = 0x20;

/// Length of the PRIORITY fields in a HEADERS frame.
pub const PRIORITY_LEN: usize = 5;

/// A parsed frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// Payload length.
    pub length: usize,
    /// Frame type.
    pub kind: u8,
    /// Flags.
    pub flags: u8,
    /// Stream id with the reserved bit cleared.
    pub stream_id: u32,
}

impl FrameHeader {
    /// Reads a frame header from its 9 bytes.
    pub fn parse(b: &[u8; HEADER_LEN]) -> Self {
        Self {
            length: (usize::from(b[0]) << 16) | (usize::from(b[1]) << 8) | usize::from(b[2]),
            kind: b[3],
            flags: b[4],
            stream_id: u32::from_be_bytes([b[5], b[6], b[7], b[8]]) & 0x7fff_ffff,
        }
    }

    /// Appends the 9-byte encoding; `length` must fit in 24 bits.
    pub fn write(&self, out: &mut Vec<u8>) {
        let len = (self.length as u32).to_be_bytes();
        out.extend_from_slice(&len[1..]);
        out.push(self.kind);
        out.push(self.flags);
        out.extend_from_slice(&(self.stream_id & 0x7fff_ffff).to_be_bytes());
    }
}

/// Writes a header block as one HEADERS frame plus CONTINUATION frames, each
/// with at most [`MAX_PAYLOAD`] bytes of payload. END_STREAM and PRIORITY go
/// on the HEADERS frame, END_HEADERS on the last frame, and nothing is padded.
pub fn write_header_block(
    out: &mut Vec<u8>,
    stream_id: u32,
    end_stream: bool,
    priority: Option<[u8; PRIORITY_LEN]>,
    block: &[u8],
) {
    let prio_len = if priority.is_some() { PRIORITY_LEN } else { 0 };
    let first_len = block.len().min(MAX_PAYLOAD - prio_len);
    let (first, mut rest) = block.split_at(first_len);
    let mut flags = 0;
    if end_stream {
        flags |= FLAG_END_STREAM;
    }
    if priority.is_some() {
        flags |= FLAG_PRIORITY;
    }
    if rest.is_empty() {
        flags |= FLAG_END_HEADERS;
    }
    FrameHeader {
        length: prio_len + first.len(),
        kind: TYPE_HEADERS,
        flags,
        stream_id,
    }
    .write(out);
    if let Some(p) = priority {
        out.extend_from_slice(&p);
    }
    out.extend_from_slice(first);
    while !rest.is_empty() {
        let (chunk, tail) = rest.split_at(rest.len().min(MAX_PAYLOAD));
        rest = tail;
        FrameHeader {
            length: chunk.len(),
            kind: TYPE_CONTINUATION,
            flags: if rest.is_empty() { FLAG_END_HEADERS } else { 0 },
            stream_id,
        }
        .write(out);
        out.extend_from_slice(chunk);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(mut b: &[u8]) -> Vec<(FrameHeader, Vec<u8>)> {
        let mut v = Vec::new();
        while !b.is_empty() {
            let h = FrameHeader::parse(b[..9].try_into().unwrap());
            v.push((h, b[9..9 + h.length].to_vec()));
            b = &b[9 + h.length..];
        }
        v
    }

    #[test]
    fn header_round_trip() {
        let h = FrameHeader {
            length: 0x01_0203,
            kind: 9,
            flags: 4,
            stream_id: 0x7fff_fffe,
        };
        let mut out = Vec::new();
        h.write(&mut out);
        assert_eq!(FrameHeader::parse(out[..].try_into().unwrap()), h);
    }

    #[test]
    fn small_block_is_one_frame() {
        let mut out = Vec::new();
        write_header_block(&mut out, 3, true, None, b"abc");
        let f = frames(&out);
        assert_eq!(f.len(), 1);
        assert_eq!(f[0].0.flags, FLAG_END_STREAM | FLAG_END_HEADERS);
        assert_eq!(f[0].1, b"abc");
    }

    #[test]
    fn large_block_is_split() {
        let block: Vec<u8> = (0..40_000u32).map(|i| i as u8).collect();
        let mut out = Vec::new();
        write_header_block(&mut out, 5, true, Some([1, 2, 3, 4, 5]), &block);
        let f = frames(&out);
        assert_eq!(f.len(), 3);
        assert_eq!(f[0].0.kind, TYPE_HEADERS);
        assert_eq!(f[0].0.flags, FLAG_END_STREAM | FLAG_PRIORITY);
        assert_eq!(f[0].0.length, MAX_PAYLOAD);
        assert_eq!(f[1].0.kind, TYPE_CONTINUATION);
        assert_eq!(f[1].0.flags, 0);
        assert_eq!(f[2].0.flags, FLAG_END_HEADERS);
        assert!(
            f.iter()
                .all(|(h, _)| h.stream_id == 5 && h.length <= MAX_PAYLOAD)
        );
        let mut joined = f[0].1[5..].to_vec();
        joined.extend_from_slice(&f[1].1);
        joined.extend_from_slice(&f[2].1);
        assert_eq!(joined, block);
    }
}

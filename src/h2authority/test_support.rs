//! Test helpers: a client-side HPACK encoder that uses incremental indexing
//! (like grpc-go's) and frame builders / parsers.

use std::collections::VecDeque;

use super::frame::{FrameHeader, HEADER_LEN, TYPE_CONTINUATION, TYPE_HEADERS};
use super::hpack::encode::encode_int;
use super::hpack::table::STATIC;
use super::hpack::{Decoder, Field, huffman};

/// HPACK encoder that indexes every literal it sends.
pub struct IndexingEncoder {
    /// Newest first, like the decoder's table.
    entries: VecDeque<(Vec<u8>, Vec<u8>)>,
    size: usize,
    max: usize,
    pub huffman: bool,
}

impl IndexingEncoder {
    pub fn new(huffman: bool) -> Self {
        Self {
            entries: VecDeque::new(),
            size: 0,
            max: 4096,
            huffman,
        }
    }

    fn find(&self, name: &[u8], value: &[u8]) -> (Option<usize>, Option<usize>) {
        let mut name_idx = None;
        let all = STATIC.iter().map(|(n, v)| (*n, *v)).chain(
            self.entries
                .iter()
                .map(|(n, v)| (n.as_slice(), v.as_slice())),
        );
        for (i, (n, v)) in all.enumerate() {
            if n == name {
                if v == value {
                    return (Some(i + 1), Some(i + 1));
                }
                name_idx.get_or_insert(i + 1);
            }
        }
        (None, name_idx)
    }

    fn string(&self, s: &[u8], out: &mut Vec<u8>) {
        if self.huffman {
            let mut h = Vec::new();
            huffman::encode(s, &mut h);
            encode_int(h.len(), 7, 0x80, out);
            out.extend_from_slice(&h);
        } else {
            encode_int(s.len(), 7, 0, out);
            out.extend_from_slice(s);
        }
    }

    pub fn encode(&mut self, fields: &[(&str, &str)]) -> Vec<u8> {
        let mut out = Vec::new();
        for (name, value) in fields {
            let (name, value) = (name.as_bytes(), value.as_bytes());
            match self.find(name, value) {
                (Some(i), _) => encode_int(i, 7, 0x80, &mut out),
                (None, name_idx) => {
                    encode_int(name_idx.unwrap_or(0), 6, 0x40, &mut out);
                    if name_idx.is_none() {
                        self.string(name, &mut out);
                    }
                    self.string(value, &mut out);
                    self.insert(name.to_vec(), value.to_vec());
                }
            }
        }
        out
    }

    fn insert(&mut self, name: Vec<u8>, value: Vec<u8>) {
        let sz = name.len() + value.len() + 32;
        while self.size + sz > self.max {
            match self.entries.pop_back() {
                Some((n, v)) => self.size -= n.len() + v.len() + 32,
                None => break,
            }
        }
        if sz <= self.max {
            self.size += sz;
            self.entries.push_front((name, value));
        }
    }
}

pub fn frame(kind: u8, flags: u8, stream_id: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    FrameHeader {
        length: payload.len(),
        kind,
        flags,
        stream_id,
    }
    .write(&mut out);
    out.extend_from_slice(payload);
    out
}

/// Splits a parsed byte stream (after the preface) into frames.
pub fn parse_frames(mut b: &[u8]) -> Vec<(FrameHeader, Vec<u8>)> {
    let mut v = Vec::new();
    while !b.is_empty() {
        let h = FrameHeader::parse(b[..HEADER_LEN].try_into().unwrap());
        v.push((h, b[HEADER_LEN..HEADER_LEN + h.length].to_vec()));
        b = &b[HEADER_LEN + h.length..];
    }
    v
}

/// Decodes the header blocks of a frame stream the way a server would,
/// returning (stream id, fields) per block, and the other frames' types.
pub fn server_view(stream: &[u8]) -> (Vec<(u32, Vec<Field>)>, Vec<u8>) {
    let mut dec = Decoder::default();
    let mut blocks = Vec::new();
    let mut others = Vec::new();
    let mut frag = Vec::new();
    for (h, p) in parse_frames(stream) {
        match h.kind {
            TYPE_HEADERS | TYPE_CONTINUATION => {
                let mut p = &p[..];
                if h.kind == TYPE_HEADERS {
                    let mut pad = 0;
                    if h.flags & 0x8 != 0 {
                        pad = p[0] as usize;
                        p = &p[1..];
                    }
                    if h.flags & 0x20 != 0 {
                        p = &p[5..];
                    }
                    p = &p[..p.len() - pad];
                }
                frag.extend_from_slice(p);
                if h.flags & 0x4 != 0 {
                    let mut fields = Vec::new();
                    dec.decode(&frag, &mut fields).unwrap();
                    blocks.push((h.stream_id, fields));
                    frag.clear();
                }
            }
            k => others.push(k),
        }
    }
    (blocks, others)
}

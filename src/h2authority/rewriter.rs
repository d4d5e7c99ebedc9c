//! Sans-IO rewriter for the client-to-server half of an HTTP/2 connection.

use super::error::RewriteError;
use super::frame::{
    FLAG_END_HEADERS, FLAG_END_STREAM, FLAG_PADDED, FLAG_PRIORITY, FrameHeader, HEADER_LEN,
    PREFACE, PRIORITY_LEN, TYPE_CONTINUATION, TYPE_HEADERS, write_header_block,
};
use super::hpack::{Decoder, FieldList, FieldRef, encode_fields};

/// Limit on the summed HEADERS + CONTINUATION payloads of one header block.
pub const MAX_HEADER_BLOCK: usize = 64 * 1024;
/// What an unparsable `:authority` is replaced with.
pub const REPLACEMENT_AUTHORITY: &[u8] = b"localhost";
/// Reusable buffers above this capacity are released after each header block.
const KEEP_CAPACITY: usize = 16 * 1024;
/// Longest `:authority` remembered as valid (a client sends the same one on every request).
const REMEMBER_AUTHORITY: usize = 255;

/// Rewrites invalid `:authority` values in the client's byte stream.
///
/// Feed it the bytes read from the client in chunks of any size; it appends
/// what the HTTP/2 server should read to `out`. Frames other than HEADERS and
/// CONTINUATION are streamed through as they arrive; header blocks are
/// collected (up to [`MAX_HEADER_BLOCK`]) and decoded with a decoder that
/// mirrors the client's HPACK state. While every `:authority` parses, blocks
/// are forwarded verbatim. The first invalid one switches the connection to
/// re-encoding every later block without the dynamic table, since the
/// server's table no longer mirrors the client's.
#[derive(Debug)]
pub struct Rewriter {
    state: State,
    decoder: Decoder,
    reencode: bool,
    rewritten: u64,
    /// The header block being collected, if any.
    block: Option<Block>,
    /// Payload of the current HEADERS / CONTINUATION frame.
    payload: Vec<u8>,
    /// Frames of the current block as received, for verbatim forwarding.
    raw: Vec<u8>,
    /// Header block fragments of the current block, padding removed.
    fragment: Vec<u8>,
    /// The decoded fields of the current block.
    fields: FieldList,
    encoded: Vec<u8>,
    /// The last `:authority` that parsed, so that the same value is not parsed again.
    valid_authority: Vec<u8>,
    failed: Option<RewriteError>,
}

#[derive(Debug)]
enum State {
    Preface {
        matched: usize,
    },
    FrameHeader {
        buf: [u8; HEADER_LEN],
        got: usize,
    },
    Passthrough {
        remaining: usize,
    },
    BlockPayload {
        header: FrameHeader,
        remaining: usize,
    },
}

const NEXT_FRAME: State = State::FrameHeader {
    buf: [0; HEADER_LEN],
    got: 0,
};

#[derive(Debug)]
struct Block {
    stream_id: u32,
    end_stream: bool,
    priority: Option<[u8; PRIORITY_LEN]>,
    payload_total: usize,
}

impl Default for Rewriter {
    fn default() -> Self {
        Self::new()
    }
}

impl Rewriter {
    /// A rewriter at the start of a connection, expecting the client preface.
    pub fn new() -> Self {
        Self {
            state: State::Preface { matched: 0 },
            decoder: Decoder::default(),
            reencode: false,
            rewritten: 0,
            block: None,
            payload: Vec::new(),
            raw: Vec::new(),
            fragment: Vec::new(),
            fields: FieldList::default(),
            encoded: Vec::new(),
            valid_authority: Vec::new(),
            failed: None,
        }
    }

    /// Whether the connection has switched to re-encoding header blocks.
    pub fn is_reencoding(&self) -> bool {
        self.reencode
    }

    /// Number of header blocks whose `:authority` was replaced.
    pub fn rewritten_blocks(&self) -> u64 {
        self.rewritten
    }

    /// The error that stopped this rewriter, if any.
    pub fn error(&self) -> Option<&RewriteError> {
        self.failed.as_ref()
    }

    /// Processes the next chunk of client bytes, appending output to `out`.
    ///
    /// After an error the rewriter stays failed (every call returns the same
    /// error) and whatever this call appended to `out` must be discarded
    /// along with the connection.
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<(), RewriteError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        let result = self.feed_inner(input, out);
        if let Err(e) = &result {
            self.failed = Some(e.clone());
        }
        result
    }

    /// [`Rewriter::feed`] without copying what passes unchanged. Returns `n`: the server
    /// is to read `input[..n]` as it is, followed by what this call appended to `out`.
    ///
    /// Whole frames that need no change are judged where they lie: DATA and other frames,
    /// and a header block that arrives whole in one HEADERS frame (how clients send a
    /// request) while every `:authority` on the connection parsed. From the first frame
    /// that cannot be judged so (a frame cut by the end of `input`, CONTINUATION, padding
    /// or priority, a block to re-encode, anything malformed) the rest of `input` goes
    /// through [`Rewriter::feed`]. The same errors as `feed`, and the rewriter stays failed.
    pub fn feed_in_place(
        &mut self,
        input: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<usize, RewriteError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        let result = self
            .pass_in_place(input, out)
            .and_then(|(passed, consumed)| {
                let rest = input.get(consumed..).unwrap_or_default();
                self.feed_inner(rest, out).map(|()| passed)
            });
        if let Err(e) = &result {
            self.failed = Some(e.clone());
        }
        result
    }

    /// The in-place walk of [`Rewriter::feed_in_place`]: returns how many leading bytes
    /// pass as they are, and how many it consumed (more when it re-encoded a block, which
    /// is then in `out`).
    fn pass_in_place(
        &mut self,
        input: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(usize, usize), RewriteError> {
        let mut pos = 0;
        while let Some(rest) = input.get(pos..).filter(|rest| !rest.is_empty()) {
            match &mut self.state {
                State::Passthrough { remaining } => {
                    let n = (*remaining).min(rest.len());
                    pos += n;
                    *remaining -= n;
                    if *remaining == 0 {
                        self.state = NEXT_FRAME;
                    }
                }
                State::FrameHeader { got: 0, .. } if self.block.is_none() => {
                    let Some((raw, after)) = rest.split_first_chunk::<HEADER_LEN>() else {
                        break;
                    };
                    let h = FrameHeader::parse(raw);
                    if h.kind == TYPE_CONTINUATION {
                        break;
                    }
                    if h.kind != TYPE_HEADERS {
                        pos += HEADER_LEN;
                        if h.length > 0 {
                            self.state = State::Passthrough {
                                remaining: h.length,
                            };
                        }
                        continue;
                    }
                    // A whole block, on a connection whose blocks still pass as they are.
                    let judgeable = !self.reencode
                        && h.flags & FLAG_END_HEADERS != 0
                        && h.flags & (FLAG_PADDED | FLAG_PRIORITY) == 0
                        && h.length <= MAX_HEADER_BLOCK;
                    let Some(fragment) = after.get(..h.length).filter(|_| judgeable) else {
                        break;
                    };
                    let end = pos + HEADER_LEN + h.length;
                    let invalid = judge_block(
                        &mut self.decoder,
                        &mut self.fields,
                        &mut self.valid_authority,
                        false,
                        fragment,
                    )?;
                    let reencode = self.must_reencode(invalid);
                    if reencode {
                        let end_stream = h.flags & FLAG_END_STREAM != 0;
                        self.write_reencoded(h.stream_id, end_stream, None, out);
                    }
                    self.fields.release(KEEP_CAPACITY);
                    if reencode {
                        return Ok((pos, end));
                    }
                    pos = end;
                }
                _ => break,
            }
        }
        Ok((pos, pos))
    }

    fn feed_inner(&mut self, mut input: &[u8], out: &mut Vec<u8>) -> Result<(), RewriteError> {
        while !input.is_empty() {
            match &mut self.state {
                State::Preface { matched } => {
                    let want = PREFACE.get(*matched..).unwrap_or_default();
                    let n = want.len().min(input.len());
                    let (chunk, rest) = input.split_at(n);
                    if want.get(..n) != Some(chunk) {
                        return Err(RewriteError::BadPreface);
                    }
                    out.extend_from_slice(chunk);
                    input = rest;
                    *matched += n;
                    if *matched >= PREFACE.len() {
                        self.state = NEXT_FRAME;
                    }
                }
                State::FrameHeader { buf, got } => {
                    let n = (HEADER_LEN - *got).min(input.len());
                    let (chunk, rest) = input.split_at(n);
                    if let Some(dst) = buf.get_mut(*got..*got + n) {
                        dst.copy_from_slice(chunk);
                    }
                    input = rest;
                    *got += n;
                    if *got == HEADER_LEN {
                        let raw = *buf;
                        self.state = NEXT_FRAME;
                        self.on_frame_header(raw, out)?;
                    }
                }
                State::Passthrough { remaining } => {
                    let n = (*remaining).min(input.len());
                    let (chunk, rest) = input.split_at(n);
                    out.extend_from_slice(chunk);
                    input = rest;
                    *remaining -= n;
                    if *remaining == 0 {
                        self.state = NEXT_FRAME;
                    }
                }
                State::BlockPayload { header, remaining } => {
                    let n = (*remaining).min(input.len());
                    let (chunk, rest) = input.split_at(n);
                    self.payload.extend_from_slice(chunk);
                    input = rest;
                    *remaining -= n;
                    if *remaining == 0 {
                        let header = *header;
                        self.state = NEXT_FRAME;
                        self.on_block_payload(header, out)?;
                    }
                }
            }
        }
        Ok(())
    }

    fn on_frame_header(
        &mut self,
        raw: [u8; HEADER_LEN],
        out: &mut Vec<u8>,
    ) -> Result<(), RewriteError> {
        let h = FrameHeader::parse(&raw);
        let unexpected = RewriteError::UnexpectedFrame {
            kind: h.kind,
            stream_id: h.stream_id,
        };
        // RFC 9113 §6.10: nothing may interleave with an open header block.
        let open_total = match &self.block {
            Some(b) if h.kind == TYPE_CONTINUATION && h.stream_id == b.stream_id => b.payload_total,
            Some(_) => return Err(unexpected),
            None if h.kind == TYPE_CONTINUATION => return Err(unexpected),
            None => 0,
        };
        if h.kind != TYPE_HEADERS && h.kind != TYPE_CONTINUATION {
            out.extend_from_slice(&raw);
            if h.length > 0 {
                self.state = State::Passthrough {
                    remaining: h.length,
                };
            }
            return Ok(());
        }
        let total = open_total.saturating_add(h.length);
        if total > MAX_HEADER_BLOCK {
            return Err(RewriteError::HeaderBlockTooLarge {
                limit: MAX_HEADER_BLOCK,
            });
        }
        if h.kind == TYPE_HEADERS {
            self.raw.clear();
            self.fragment.clear();
            self.block = Some(Block {
                stream_id: h.stream_id,
                end_stream: h.flags & FLAG_END_STREAM != 0,
                priority: None,
                payload_total: 0,
            });
        }
        if let Some(b) = &mut self.block {
            b.payload_total = total;
        }
        self.raw.extend_from_slice(&raw);
        self.payload.clear();
        if h.length == 0 {
            self.on_block_payload(h, out)
        } else {
            self.state = State::BlockPayload {
                header: h,
                remaining: h.length,
            };
            Ok(())
        }
    }

    fn on_block_payload(&mut self, h: FrameHeader, out: &mut Vec<u8>) -> Result<(), RewriteError> {
        self.raw.extend_from_slice(&self.payload);
        let mut frag: &[u8] = &self.payload;
        if h.kind == TYPE_HEADERS {
            let malformed = RewriteError::MalformedHeaders {
                stream_id: h.stream_id,
            };
            let mut pad = 0;
            if h.flags & FLAG_PADDED != 0 {
                let (&p, rest) = frag.split_first().ok_or_else(|| malformed.clone())?;
                pad = usize::from(p);
                frag = rest;
            }
            if h.flags & FLAG_PRIORITY != 0 {
                if frag.len() < PRIORITY_LEN {
                    return Err(malformed);
                }
                let (prio, rest) = frag.split_at(PRIORITY_LEN);
                if let (Some(b), Ok(p)) = (&mut self.block, prio.try_into()) {
                    b.priority = Some(p);
                }
                frag = rest;
            }
            let keep = frag.len().checked_sub(pad).ok_or(malformed)?;
            frag = frag.get(..keep).unwrap_or_default();
        }
        self.fragment.extend_from_slice(frag);
        if h.flags & FLAG_END_HEADERS != 0 {
            self.finish_block(out)?;
        }
        Ok(())
    }

    fn finish_block(&mut self, out: &mut Vec<u8>) -> Result<(), RewriteError> {
        let Some(block) = self.block.take() else {
            return Ok(());
        };
        let invalid = judge_block(
            &mut self.decoder,
            &mut self.fields,
            &mut self.valid_authority,
            self.reencode,
            &self.fragment,
        )?;
        if self.must_reencode(invalid) {
            self.write_reencoded(block.stream_id, block.end_stream, block.priority, out);
        } else {
            out.extend_from_slice(&self.raw);
        }
        self.release_buffers();
        Ok(())
    }

    /// Records a decoded block's verdict; true when the block must be re-encoded (its own
    /// `:authority` does not parse, or an earlier one on this connection did not).
    fn must_reencode(&mut self, invalid_authority: bool) -> bool {
        if invalid_authority {
            self.reencode = true;
            self.rewritten += 1;
        }
        self.reencode
    }

    /// Writes the decoded block's fields, `:authority` fixed, as a new header block.
    fn write_reencoded(
        &mut self,
        stream_id: u32,
        end_stream: bool,
        priority: Option<[u8; PRIORITY_LEN]>,
        out: &mut Vec<u8>,
    ) {
        self.encoded.clear();
        let fixed = self.fields.iter().map(|f| {
            if is_invalid_authority(f.name, f.value) {
                FieldRef {
                    value: REPLACEMENT_AUTHORITY,
                    ..f
                }
            } else {
                f
            }
        });
        encode_fields(fixed, &mut self.encoded);
        write_header_block(out, stream_id, end_stream, priority, &self.encoded);
    }

    /// Keeps an idle connection small after an unusually large header block.
    fn release_buffers(&mut self) {
        self.fields.release(KEEP_CAPACITY);
        for buf in [
            &mut self.payload,
            &mut self.raw,
            &mut self.fragment,
            &mut self.encoded,
        ] {
            buf.clear();
            buf.shrink_to(KEEP_CAPACITY);
        }
    }
}

/// Decodes one whole header block; true when one of its `:authority` values does not
/// parse. The block's fields are in `fields` when this returns true or when `reencoding`;
/// otherwise the block was only judged, with nothing of it copied. `valid` is the last
/// `:authority` that parsed, updated here.
fn judge_block(
    decoder: &mut Decoder,
    fields: &mut FieldList,
    valid: &mut Vec<u8>,
    reencoding: bool,
    fragment: &[u8],
) -> Result<bool, RewriteError> {
    let bad = |name: &[u8], value: &[u8]| {
        // `valid` is empty until a value parsed (an empty one never does).
        if name != b":authority" || (!valid.is_empty() && value == valid.as_slice()) {
            return false;
        }
        let invalid = is_invalid_authority(name, value);
        if !invalid && value.len() <= REMEMBER_AUTHORITY {
            valid.clear();
            valid.extend_from_slice(value);
        }
        invalid
    };
    // A block with a bad `:authority` leaves the decoder's table as it was: decode it again.
    if !reencoding && !decoder.judge(fragment, bad)? {
        return Ok(false);
    }
    fields.clear();
    decoder.decode_list(fragment, fields)?;
    Ok(fields.iter().any(|f| is_invalid_authority(f.name, f.value)))
}

/// An `:authority` that h2 would refuse (and so must be replaced).
fn is_invalid_authority(name: &[u8], value: &[u8]) -> bool {
    name == b":authority" && http::uri::Authority::try_from(value).is_err()
}

#[cfg(test)]
mod tests;

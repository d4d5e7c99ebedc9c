use super::*;
use crate::h2authority::frame::{MAX_PAYLOAD, TYPE_HEADERS};
use crate::h2authority::hpack::HpackError;
use crate::h2authority::test_support::{IndexingEncoder, frame, parse_frames, server_view};

const DATA: u8 = 0x0;
const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;

fn request(authority: &str, seq: usize) -> Vec<(&'static str, String)> {
    vec![
        (":method", "POST".into()),
        (":scheme", "http".into()),
        (":path", "/v2.KeyManagementService/Encrypt".into()),
        (":authority", authority.into()),
        ("content-type", "application/grpc".into()),
        ("user-agent", "grpc-go/1.58.3".into()),
        ("te", "trailers".into()),
        ("x-seq", seq.to_string()),
    ]
}

fn encode(enc: &mut IndexingEncoder, fields: &[(&'static str, String)]) -> Vec<u8> {
    let f: Vec<(&str, &str)> = fields.iter().map(|(n, v)| (*n, v.as_str())).collect();
    enc.encode(&f)
}

/// A client byte stream exercising padding, priority, CONTINUATION, DATA
/// and trailers, with one request per authority.
fn client_stream(authorities: &[&str]) -> Vec<u8> {
    let mut enc = IndexingEncoder::new(true);
    let mut s = PREFACE.to_vec();
    s.extend(frame(SETTINGS, 0, 0, &[0, 4, 0, 0, 0x10, 0])); // INITIAL_WINDOW_SIZE
    for (i, auth) in authorities.iter().enumerate() {
        let id = 2 * i as u32 + 1;
        let block = encode(&mut enc, &request(auth, i));
        match i % 3 {
            0 => s.extend(frame(TYPE_HEADERS, 0x4 | 0x1, id, &block)),
            1 => {
                // PADDED + PRIORITY, then split across a CONTINUATION.
                let mut p = vec![3, 0, 0, 0, 0, 15];
                p.extend_from_slice(&block[..4]);
                p.extend_from_slice(&[0, 0, 0]);
                s.extend(frame(TYPE_HEADERS, 0x8 | 0x20, id, &p));
                s.extend(frame(0x9, 0x4, id, &block[4..]));
            }
            _ => {
                s.extend(frame(TYPE_HEADERS, 0x4, id, &block));
                s.extend(frame(DATA, 0, id, b"hello"));
                s.extend(frame(PING, 0, 0, &[7; 8]));
                let trailers = enc.encode(&[("x-trailer", "t")]);
                s.extend(frame(TYPE_HEADERS, 0x4 | 0x1, id, &trailers));
            }
        }
    }
    s
}

fn run_chunked(input: &[u8], chunk: usize) -> Result<Vec<u8>, RewriteError> {
    let mut r = Rewriter::new();
    let mut out = Vec::new();
    for c in input.chunks(chunk) {
        r.feed(c, &mut out)?;
    }
    Ok(out)
}

/// [`run_chunked`] through `feed_in_place`: the output and how many bytes passed in place.
fn run_in_place(input: &[u8], chunk: usize) -> Result<(Vec<u8>, usize), RewriteError> {
    let mut r = Rewriter::new();
    let (mut out, mut in_place) = (Vec::new(), 0);
    for c in input.chunks(chunk) {
        let mut appended = Vec::new();
        let passed = r.feed_in_place(c, &mut appended)?;
        out.extend_from_slice(&c[..passed]);
        out.extend(appended);
        in_place += passed;
    }
    Ok((out, in_place))
}

/// `feed_in_place` gives what `feed` gives, byte for byte and error for error.
fn assert_in_place_matches_feed(input: &[u8], chunk: usize) {
    let in_place = run_in_place(input, chunk).map(|(out, _)| out);
    assert_eq!(in_place, run_chunked(input, chunk), "chunk {chunk}");
}

fn authorities_seen(out: &[u8]) -> Vec<String> {
    let (blocks, _) = server_view(&out[PREFACE.len()..]);
    blocks
        .iter()
        .flat_map(|(_, f)| f.iter())
        .filter(|f| f.name == b":authority")
        .map(|f| String::from_utf8(f.value.clone()).unwrap())
        .collect()
}

#[test]
fn valid_authorities_pass_through_byte_identical() {
    let input = client_stream(&["localhost", "kms.local:8443", "127.0.0.1", "localhost"]);
    for chunk in [1, 2, 7, 9, 24, 100, input.len()] {
        assert_eq!(run_chunked(&input, chunk).unwrap(), input, "chunk {chunk}");
    }
}

#[test]
fn in_place_feeding_matches_feed() {
    let valid = client_stream(&["localhost", "kms.local:8443", "127.0.0.1", "localhost"]);
    let invalid = client_stream(&["localhost", "/run/kms.sock", "", "localhost", "x"]);
    let first_invalid = client_stream(&["/run/kms.sock", "localhost", "localhost"]);
    for input in [&valid, &invalid, &first_invalid] {
        for chunk in [1, 2, 7, 9, 10, 24, 33, 100, 333, input.len()] {
            assert_in_place_matches_feed(input, chunk);
        }
    }
    // Cut anywhere in the stream, including inside frame headers and header blocks.
    for cut in 1..valid.len() {
        let mut r = Rewriter::new();
        let mut out = Vec::new();
        let (a, b) = valid.split_at(cut);
        for part in [a, b] {
            let mut appended = Vec::new();
            let passed = r.feed_in_place(part, &mut appended).unwrap();
            out.extend_from_slice(&part[..passed]);
            out.extend(appended);
        }
        assert_eq!(out, valid, "cut at {cut}");
    }
}

#[test]
fn whole_requests_pass_in_place_without_a_copy() {
    let mut enc = IndexingEncoder::new(true);
    let mut r = Rewriter::new();
    let mut out = Vec::new();
    let mut start = PREFACE.to_vec();
    start.extend(frame(SETTINGS, 0, 0, &[]));
    assert_eq!(r.feed_in_place(&start, &mut out), Ok(0));
    assert_eq!(out, start, "the preface goes through feed");
    for i in 0..50 {
        // A request as grpc-go writes it: HEADERS and DATA in one write.
        let id = 2 * i as u32 + 1;
        let mut read = frame(
            TYPE_HEADERS,
            0x4,
            id,
            &encode(&mut enc, &request("localhost", i)),
        );
        read.extend(frame(DATA, 0x1, id, b"request bytes"));
        read.extend(frame(PING, 0, 0, &[1; 8]));
        out.clear();
        assert_eq!(
            r.feed_in_place(&read, &mut out),
            Ok(read.len()),
            "request {i}"
        );
        assert!(out.is_empty());
    }
    // The first unparsable authority: the bytes before its block pass, the block is
    // re-encoded, and later blocks are re-encoded too.
    let mut read = frame(PING, 0, 0, &[2; 8]);
    let ping = read.len();
    read.extend(frame(
        TYPE_HEADERS,
        0x5,
        101,
        &encode(&mut enc, &request("/kms.sock", 0)),
    ));
    read.extend(frame(
        TYPE_HEADERS,
        0x5,
        103,
        &encode(&mut enc, &request("localhost", 0)),
    ));
    out.clear();
    assert_eq!(r.feed_in_place(&read, &mut out), Ok(ping));
    assert!(r.is_reencoding());
    let mut whole = PREFACE.to_vec();
    whole.extend(out);
    assert_eq!(authorities_seen(&whole), ["localhost", "localhost"]);
}

#[test]
fn the_remembered_valid_authority_never_lets_an_invalid_one_pass() {
    // A value is parsed only when it differs from the last one that parsed: an empty
    // value on a fresh connection (nothing remembered yet) and a change after a run of
    // valid ones must both still be caught, in place and through `feed`.
    let cases: [(&[&str], &[&str]); 3] = [
        (&["", "localhost"], &["localhost", "localhost"]),
        (
            &["kms.local:8443", "kms.local:8443", "/run/kms.sock"],
            &["kms.local:8443", "kms.local:8443", "localhost"],
        ),
        (
            &["localhost", "127.0.0.1", "localhost", ""],
            &["localhost", "127.0.0.1", "localhost", "localhost"],
        ),
    ];
    for (sent, seen) in cases {
        let input = client_stream(sent);
        let (whole, _) = run_in_place(&input, input.len()).unwrap();
        assert_eq!(authorities_seen(&whole), seen, "{sent:?}");
        assert_eq!(run_chunked(&input, 7).unwrap(), whole, "{sent:?}");
    }
}

#[test]
fn invalid_authorities_are_rewritten() {
    let auths = [
        "kms.local:8443",
        "/var/run/kms/kms.sock",
        "%2Ftmp%2Fkms.sock",
        "",
        "/var/run/kms/kms.sock",
        "kms.local:8443",
    ];
    let input = client_stream(&auths);
    let whole = run_chunked(&input, input.len()).unwrap();
    assert_eq!(run_chunked(&input, 1).unwrap(), whole);
    assert_eq!(run_chunked(&input, 5).unwrap(), whole);
    assert_eq!(
        authorities_seen(&whole),
        [
            "kms.local:8443",
            "localhost",
            "localhost",
            "localhost",
            "localhost",
            "kms.local:8443"
        ]
    );
    // Everything else arrives intact, in order.
    let (blocks, others) = server_view(&whole[PREFACE.len()..]);
    let (want_blocks, want_others) = server_view(&input[PREFACE.len()..]);
    assert_eq!(others, want_others);
    assert_eq!(blocks.len(), want_blocks.len());
    for ((id, got), (want_id, want)) in blocks.iter().zip(&want_blocks) {
        assert_eq!(id, want_id);
        assert_eq!(got.len(), want.len());
        for (g, w) in got.iter().zip(want) {
            assert_eq!(g.name, w.name);
            if g.name != b":authority" {
                assert_eq!(g.value, w.value);
            }
        }
    }
    // The rewritten HEADERS frame keeps PRIORITY and loses PADDED.
    let frames = parse_frames(&whole[PREFACE.len()..]);
    let h = frames
        .iter()
        .filter(|(h, _)| h.kind == TYPE_HEADERS)
        .nth(1)
        .unwrap();
    assert_eq!(h.0.flags & 0x28, 0x20, "PRIORITY kept, PADDED dropped");
}

#[test]
fn priority_and_flags_survive_rewrite() {
    let mut enc = IndexingEncoder::new(false);
    let block = encode(&mut enc, &request("/sock", 0));
    let mut p = vec![2, 0x80, 0, 0, 3, 9];
    p.extend_from_slice(&block);
    p.extend_from_slice(&[0, 0]);
    let mut input = PREFACE.to_vec();
    input.extend(frame(TYPE_HEADERS, 0x8 | 0x20 | 0x4 | 0x1, 1, &p));
    let out = run_chunked(&input, 3).unwrap();
    let frames = parse_frames(&out[PREFACE.len()..]);
    assert_eq!(frames.len(), 1);
    let (h, payload) = &frames[0];
    assert_eq!(h.flags, 0x20 | 0x4 | 0x1);
    assert_eq!(&payload[..5], &[0x80, 0, 0, 3, 9]);
}

#[test]
fn large_rewritten_block_is_split_into_legal_frames() {
    let mut enc = IndexingEncoder::new(false);
    let big = "v".repeat(40_000);
    let mut fields = request("", 0);
    fields.push(("x-big", big.clone()));
    let block = encode(&mut enc, &fields);
    let mut input = PREFACE.to_vec();
    for (i, chunk) in block.chunks(10_000).enumerate() {
        let last = (i + 1) * 10_000 >= block.len();
        let kind = if i == 0 { TYPE_HEADERS } else { 0x9 };
        input.extend(frame(kind, if last { 0x4 } else { 0 }, 1, chunk));
    }
    let out = run_chunked(&input, 4096).unwrap();
    let frames = parse_frames(&out[PREFACE.len()..]);
    assert!(frames.len() >= 3);
    assert!(frames.iter().all(|(h, _)| h.length <= MAX_PAYLOAD));
    let (blocks, _) = server_view(&out[PREFACE.len()..]);
    assert_eq!(blocks[0].1.last().unwrap().value, big.as_bytes());
    assert_eq!(authorities_seen(&out), ["localhost"]);
}

#[test]
fn huge_data_frame_is_streamed_not_buffered() {
    let mut r = Rewriter::new();
    let mut out = Vec::new();
    r.feed(PREFACE, &mut out).unwrap();
    // DATA frame claiming 16 MiB - 1: bytes flow out as they come in.
    r.feed(&[0xff, 0xff, 0xff, DATA, 0, 0, 0, 0, 1], &mut out)
        .unwrap();
    out.clear();
    let chunk = [0xabu8; 4096];
    for _ in 0..100 {
        r.feed(&chunk, &mut out).unwrap();
        assert_eq!(out.len(), chunk.len());
        out.clear();
    }
}

#[test]
fn bad_preface_is_rejected() {
    assert_eq!(
        run_chunked(b"GET / HTTP/1.1\r\n\r\n", 1),
        Err(RewriteError::BadPreface)
    );
    assert_eq!(
        run_chunked(b"PRI * HTTP/2.0\r\n\r\nSX", 3),
        Err(RewriteError::BadPreface)
    );
}

fn after_preface(frames: &[Vec<u8>]) -> Result<Vec<u8>, RewriteError> {
    let mut input = PREFACE.to_vec();
    for f in frames {
        input.extend_from_slice(f);
    }
    run_chunked(&input, 1)
}

#[test]
fn protocol_violations_are_errors() {
    let ok_block = [0x82, 0x86, 0x84];
    assert_eq!(
        after_preface(&[frame(0x9, 0x4, 1, &ok_block)]),
        Err(RewriteError::UnexpectedFrame {
            kind: 0x9,
            stream_id: 1
        })
    );
    assert_eq!(
        after_preface(&[
            frame(TYPE_HEADERS, 0, 1, &ok_block),
            frame(DATA, 0, 1, b"x")
        ]),
        Err(RewriteError::UnexpectedFrame {
            kind: DATA,
            stream_id: 1
        })
    );
    assert_eq!(
        after_preface(&[
            frame(TYPE_HEADERS, 0, 1, &ok_block),
            frame(0x9, 0x4, 3, &ok_block)
        ]),
        Err(RewriteError::UnexpectedFrame {
            kind: 0x9,
            stream_id: 3
        })
    );
    // Pad length 5 with only 3 bytes after it.
    assert_eq!(
        after_preface(&[frame(TYPE_HEADERS, 0x8 | 0x4, 1, &[5, 0x82, 0x86, 0x84])]),
        Err(RewriteError::MalformedHeaders { stream_id: 1 })
    );
    // PRIORITY flag without the 5 bytes.
    assert_eq!(
        after_preface(&[frame(TYPE_HEADERS, 0x20 | 0x4, 1, &[0x82])]),
        Err(RewriteError::MalformedHeaders { stream_id: 1 })
    );
    // PADDED with an empty payload.
    assert_eq!(
        after_preface(&[frame(TYPE_HEADERS, 0x8 | 0x4, 1, &[])]),
        Err(RewriteError::MalformedHeaders { stream_id: 1 })
    );
    assert_eq!(
        after_preface(&[frame(TYPE_HEADERS, 0x4, 1, &[0x80])]),
        Err(RewriteError::Hpack(HpackError::InvalidIndex(0)))
    );
}

#[test]
fn oversized_header_block_is_rejected_before_buffering() {
    let mut r = Rewriter::new();
    let mut out = Vec::new();
    r.feed(PREFACE, &mut out).unwrap();
    let first = frame(TYPE_HEADERS, 0, 1, &vec![0x82; 60_000]);
    r.feed(&first, &mut out).unwrap();
    // A CONTINUATION header announcing 10 000 more bytes fails at once.
    let err = r.feed(&[0x00, 0x27, 0x10, 0x9, 0x4, 0, 0, 0, 1], &mut out);
    assert_eq!(
        err,
        Err(RewriteError::HeaderBlockTooLarge {
            limit: MAX_HEADER_BLOCK
        })
    );
    // The rewriter stays failed.
    assert!(r.feed(b"", &mut out).is_err());
    assert!(r.error().is_some());
    // A single frame over the limit fails on its header alone.
    let mut r = Rewriter::new();
    r.feed(PREFACE, &mut out).unwrap();
    assert!(
        r.feed(&[0x01, 0, 1, TYPE_HEADERS, 4, 0, 0, 0, 1], &mut out)
            .is_err()
    );
}

#[test]
fn garbage_never_panics() {
    // Cheap deterministic pseudo-random soak; the fuzz target goes further.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for round in 0..2000 {
        let mut input = PREFACE.to_vec();
        let len = (round % 300) + 1;
        for _ in 0..len {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            input.push(x as u8);
        }
        // Bias towards HEADERS frames with small lengths.
        if round % 2 == 0 && input.len() > 33 {
            input[24] = 0;
            input[25] = 0;
            input[27] = TYPE_HEADERS;
        }
        let _ = run_chunked(&input, (round % 13) + 1);
        assert_in_place_matches_feed(&input, (round % 13) + 1);
        assert_in_place_matches_feed(&input, input.len());
    }
}

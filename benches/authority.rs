//! Cost of the `:authority` rewriter per request header block, for a
//! grpc-go style KMS request: valid authority (verbatim passthrough) versus
//! a socket-path authority (decode, rewrite, re-encode); through `feed` and
//! through `feed_in_place`, the path the server's reads take.
#![allow(missing_docs)] // criterion_group! defines an undocumented pub fn

use criterion::{BatchSize, Criterion, Throughput, black_box, criterion_group, criterion_main};
use kms_plugin::h2authority::Rewriter;
use kms_plugin::h2authority::frame::{FLAG_END_HEADERS, FLAG_END_STREAM, FrameHeader, PREFACE};
use kms_plugin::h2authority::hpack::encode::encode_int;

fn string(s: &str, out: &mut Vec<u8>) {
    encode_int(s.len(), 7, 0, out);
    out.extend_from_slice(s.as_bytes());
}

/// First request on a connection: literals with incremental indexing, as
/// grpc-go sends them. Leaves the dynamic table (newest first) as
/// te(62), user-agent(63), content-type(64), :authority(65), :path(66).
fn first_block(authority: &str) -> Vec<u8> {
    let mut b = vec![0x83, 0x86]; // :method POST, :scheme http
    b.push(0x44); // :path, literal with indexing, static name 4
    string("/v2.KeyManagementService/Encrypt", &mut b);
    b.push(0x41); // :authority, static name 1
    string(authority, &mut b);
    b.push(0x5f); // content-type, static name 31
    string("application/grpc", &mut b);
    b.push(0x7a); // user-agent, static name 58
    string("grpc-go/1.58.3", &mut b);
    b.push(0x40); // te, new name
    string("te", &mut b);
    string("trailers", &mut b);
    b
}

/// Later requests: everything indexed, plus a grpc-timeout literal that is
/// not indexed, so the block stays valid when sent again and again.
fn steady_block() -> Vec<u8> {
    let mut b = vec![0x83, 0x86, 0xc2, 0xc1, 0xc0, 0xbf, 0xbe];
    b.push(0x00); // grpc-timeout, literal without indexing, new name
    string("grpc-timeout", &mut b);
    string("2999871u", &mut b);
    b
}

fn headers_frame(block: &[u8]) -> Vec<u8> {
    let mut f = Vec::new();
    FrameHeader {
        length: block.len(),
        kind: 0x1,
        flags: FLAG_END_HEADERS | FLAG_END_STREAM,
        stream_id: 1,
    }
    .write(&mut f);
    f.extend_from_slice(block);
    f
}

/// A rewriter that has seen the preface and the first request.
fn warmed(authority: &str) -> Rewriter {
    let mut r = Rewriter::new();
    let mut out = Vec::new();
    r.feed(PREFACE, &mut out).expect("preface");
    r.feed(&headers_frame(&first_block(authority)), &mut out)
        .expect("first request");
    r
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("authority_rewriter");
    g.throughput(Throughput::Elements(1));
    let steady = headers_frame(&steady_block());
    for (name, authority) in [
        ("passthrough", "localhost"),
        ("rewrite", "/var/run/kms/kms.sock"),
    ] {
        let mut r = warmed(authority);
        assert_eq!(r.is_reencoding(), name == "rewrite");
        let mut out = Vec::with_capacity(1024);
        g.bench_function(format!("steady_request/{name}"), |b| {
            b.iter(|| {
                out.clear();
                r.feed(black_box(&steady), &mut out).expect("valid block");
                black_box(out.len())
            });
        });
        g.bench_function(format!("steady_request_in_place/{name}"), |b| {
            b.iter(|| {
                out.clear();
                let passed = r
                    .feed_in_place(black_box(&steady), &mut out)
                    .expect("valid block");
                black_box(passed + out.len())
            });
        });
        let first = headers_frame(&first_block(authority));
        g.bench_function(format!("first_request_new_connection/{name}"), |b| {
            b.iter_batched(
                || {
                    let mut r = Rewriter::new();
                    r.feed(PREFACE, &mut Vec::new()).expect("preface");
                    r
                },
                |mut r| {
                    let mut out = Vec::new();
                    r.feed(black_box(&first), &mut out).expect("valid block");
                    out.len()
                },
                BatchSize::SmallInput,
            );
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);

//! End to end: a real `h2` server behind [`AuthorityFix`], and a hand-rolled
//! client that sends what grpc-go and grpcio send (h2's own client cannot
//! send an unparsable `:authority`).

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::AuthorityFix;
use super::frame::{FrameHeader, PREFACE};
use super::test_support::{IndexingEncoder, frame};

const HEADERS: u8 = 0x1;
const DATA: u8 = 0x0;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const GOAWAY: u8 = 0x7;

/// Authorities sent, one request each, all on one connection.
const AUTHORITIES: [&str; 9] = [
    "kms.local:8443",
    "kms.local:8443",
    "/var/run/kms/kms.sock",
    "/var/run/kms/kms.sock",
    "%2Ftmp%2Fkms.sock",
    "",
    "localhost",
    "kms.local:8443",
    "/var/run/kms/kms.sock",
];

fn is_valid(a: &str) -> bool {
    http::uri::Authority::try_from(a).is_ok()
}

/// What the server saw: (x-seq, authority, path, body, trailer).
type Seen = Vec<(usize, String, String, Vec<u8>, Option<String>)>;

async fn serve<T: AsyncRead + AsyncWrite + Unpin>(io: T) -> Seen {
    let mut conn = h2::server::handshake(io).await.unwrap();
    let mut handlers = Vec::new();
    // Requests are handled in tasks: the body only arrives while `accept`
    // keeps driving the connection.
    while let Some(next) = conn.accept().await {
        let Ok((req, respond)) = next else { break };
        handlers.push(tokio::spawn(handle(req, respond)));
    }
    let mut seen = Seen::new();
    for h in handlers {
        seen.push(h.await.unwrap());
    }
    seen
}

async fn handle(
    req: http::Request<h2::RecvStream>,
    mut respond: h2::server::SendResponse<bytes::Bytes>,
) -> (usize, String, String, Vec<u8>, Option<String>) {
    let (parts, mut body) = req.into_parts();
    let seq = parts.headers["x-seq"].to_str().unwrap().parse().unwrap();
    let mut data = Vec::new();
    while let Some(chunk) = body.data().await {
        data.extend_from_slice(&chunk.unwrap());
    }
    let trailer = body
        .trailers()
        .await
        .unwrap()
        .and_then(|t| t.get("x-trailer").map(|v| v.to_str().unwrap().to_owned()));
    respond
        .send_response(http::Response::new(()), true)
        .unwrap();
    (
        seq,
        parts
            .uri
            .authority()
            .map(std::string::ToString::to_string)
            .unwrap_or_default(),
        parts.uri.path().to_owned(),
        data,
        trailer,
    )
}

/// Sends every request, then reads until each stream got a response or a
/// reset. Returns (stream id, RST_STREAM error code or None for a response).
async fn client<T: AsyncRead + AsyncWrite + Unpin>(io: T) -> Vec<(u32, Option<u32>)> {
    let (mut rd, mut wr) = tokio::io::split(io);
    let mut enc = IndexingEncoder::new(true);
    let mut out = PREFACE.to_vec();
    out.extend(frame(SETTINGS, 0, 0, &[]));
    for (i, auth) in AUTHORITIES.iter().enumerate() {
        let id = 2 * i as u32 + 1;
        let seq = i.to_string();
        // A changing large header forces evictions from the 4 KiB table.
        let pad = format!("{i}").repeat(900);
        let block = enc.encode(&[
            (":method", "POST"),
            (":scheme", "http"),
            (":path", "/v2.KeyManagementService/Status"),
            (":authority", auth),
            ("content-type", "application/grpc"),
            ("user-agent", "grpc-go/1.58.3"),
            ("te", "trailers"),
            ("x-seq", &seq),
            ("x-pad", &pad),
        ]);
        if i % 2 == 0 {
            out.extend(frame(HEADERS, 0x4 | 0x1, id, &block));
        } else {
            // With a body and trailers; the block split over a CONTINUATION.
            let (a, b) = block.split_at(block.len() / 2);
            out.extend(frame(HEADERS, 0, id, a));
            out.extend(frame(0x9, 0x4, id, b));
            out.extend(frame(DATA, 0, id, b"\0\0\0\0\x02hi"));
            let trailers = enc.encode(&[("x-trailer", "done")]);
            out.extend(frame(HEADERS, 0x4 | 0x1, id, &trailers));
        }
    }
    wr.write_all(&out).await.unwrap();

    let mut outcome: Vec<(u32, Option<u32>)> = Vec::new();
    while outcome.len() < AUTHORITIES.len() {
        let mut head = [0u8; 9];
        if rd.read_exact(&mut head).await.is_err() {
            break;
        }
        let h = FrameHeader::parse(&head);
        let mut payload = vec![0; h.length];
        rd.read_exact(&mut payload).await.unwrap();
        match h.kind {
            SETTINGS if h.flags & 0x1 == 0 => {
                wr.write_all(&frame(SETTINGS, 0x1, 0, &[])).await.unwrap();
            }
            HEADERS if !outcome.iter().any(|(id, _)| *id == h.stream_id) => {
                outcome.push((h.stream_id, None));
            }
            RST_STREAM if !outcome.iter().any(|(id, _)| *id == h.stream_id) => {
                let code = u32::from_be_bytes(payload[..4].try_into().unwrap());
                outcome.push((h.stream_id, Some(code)));
            }
            GOAWAY => break,
            _ => {}
        }
    }
    wr.shutdown().await.unwrap();
    outcome.sort();
    outcome
}

async fn run(fix: bool) -> (Seen, Vec<(u32, Option<u32>)>) {
    let (client_io, server_io) = tokio::io::duplex(256 * 1024);
    let server = tokio::spawn(async move {
        if fix {
            serve(AuthorityFix::new(server_io)).await
        } else {
            serve(server_io).await
        }
    });
    let outcome = tokio::time::timeout(Duration::from_secs(10), client(client_io))
        .await
        .expect("client timed out");
    let mut seen = tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .expect("server timed out")
        .unwrap();
    seen.sort();
    (seen, outcome)
}

#[tokio::test]
async fn h2_server_accepts_every_request_with_fix() {
    let (seen, outcome) = run(true).await;
    assert_eq!(seen.len(), AUTHORITIES.len(), "{seen:?}");
    for (seq, authority, path, body, trailer) in &seen {
        let sent = AUTHORITIES[*seq];
        let want = if is_valid(sent) { sent } else { "localhost" };
        assert_eq!(authority, want, "request {seq}");
        assert_eq!(path, "/v2.KeyManagementService/Status");
        if seq % 2 == 1 {
            assert_eq!(body, b"\0\0\0\0\x02hi");
            assert_eq!(trailer.as_deref(), Some("done"));
        }
    }
    assert!(outcome.iter().all(|(_, rst)| rst.is_none()), "{outcome:?}");
}

#[tokio::test]
async fn h2_server_resets_path_authority_without_fix() {
    let (seen, outcome) = run(false).await;
    let accepted: Vec<usize> = seen.iter().map(|s| s.0).collect();
    let want: Vec<usize> = (0..AUTHORITIES.len())
        .filter(|&i| is_valid(AUTHORITIES[i]))
        .collect();
    assert_eq!(accepted, want);
    // Request 2 (`/var/run/kms/kms.sock`, stream 5) is reset with PROTOCOL_ERROR.
    assert!(outcome.contains(&(5, Some(0x1))), "{outcome:?}");
}

#[tokio::test]
async fn wrapped_stream_fails_reads_on_garbage() {
    let (mut client_io, server_io) = tokio::io::duplex(1024);
    let mut fixed = AuthorityFix::new(server_io);
    client_io
        .write_all(b"GET / HTTP/1.1\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 64];
    let err = fixed.read(&mut buf).await.unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidData);
    assert!(fixed.rewriter().error().is_some());
}

#[tokio::test]
async fn adapter_handles_tiny_reads_and_writes() {
    let mut enc = IndexingEncoder::new(true);
    let mut input = PREFACE.to_vec();
    input.extend(frame(SETTINGS, 0, 0, &[]));
    let block = enc.encode(&[(":method", "GET"), (":authority", "/var/run/kms/kms.sock")]);
    input.extend(frame(HEADERS, 0x5, 1, &block));
    let mut expected = Vec::new();
    super::Rewriter::new().feed(&input, &mut expected).unwrap();

    let (mut client_io, server_io) = tokio::io::duplex(16);
    let mut fixed = AuthorityFix::new(server_io);
    let writer = tokio::spawn(async move {
        for b in &input {
            client_io.write_all(&[*b]).await.unwrap();
        }
        client_io
    });
    let mut got = vec![0u8; expected.len()];
    for slot in got.chunks_mut(1) {
        fixed.read_exact(slot).await.unwrap();
    }
    assert_eq!(got, expected);
    assert_eq!(fixed.rewriter().rewritten_blocks(), 1);
    // Writes go straight through.
    fixed.write_all(b"pong").await.unwrap();
    let mut client_io = writer.await.unwrap();
    let mut back = [0u8; 4];
    client_io.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, b"pong");
}

/// `AuthorityFix<UnixStream>` meets `serve_with_incoming`'s bounds and
/// reports the Unix peer like the bare stream does.
#[tokio::test]
async fn unix_stream_wrapper_is_connected() {
    use tonic::transport::server::{Connected, UdsConnectInfo};

    fn assert_serve_bounds<IO>()
    where
        IO: AsyncRead + AsyncWrite + Connected + Unpin + Send + 'static,
    {
    }
    assert_serve_bounds::<AuthorityFix<tokio::net::UnixStream>>();

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kms.sock");
    let listener = tokio::net::UnixListener::bind(&path).unwrap();
    let _client = tokio::net::UnixStream::connect(&path).await.unwrap();
    let (conn, _) = listener.accept().await.unwrap();
    let fixed = AuthorityFix::new(conn);
    let info: UdsConnectInfo = fixed.connect_info();
    assert!(info.peer_cred.is_some());
}

//! The accept loop of the KMS socket, in place of tonic's (which skips accept errors and
//! spins when the process runs out of file descriptors).
//!
//! Each accepted connection is checked before any byte of it is read:
//! - the peer's uid against `allowed_uids` ([`PeerCheck`]);
//! - the number of open connections against `max_connections`.
//!
//! A refused connection is closed at once; refusals are counted (also in the
//! `connections_refused` metric, by reason) and logged at most once per
//! [`LOG_EVERY`], so a flood cannot fill the log. An admitted connection holds its slot until
//! it closes, and is closed if it has not sent the HTTP/2 connection preface within
//! [`PREFACE_TIMEOUT`], so junk connections held open cannot keep the slots.
//! Out of descriptors or memory, the loop backs off (100 ms, doubling to 1 s) instead of
//! retrying at once.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Sleep;
use tonic::transport::server::{Connected, UdsConnectInfo};

use super::peer::{PeerCheck, Refused};
use crate::metrics::{self, Refusal};

/// How long a new connection may take to send the 24-byte HTTP/2 connection preface
/// (clients send it right after connecting).
pub const PREFACE_TIMEOUT: Duration = Duration::from_secs(5);
/// Length of `PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n`.
const PREFACE_LEN: usize = 24;
/// At most one log line per kind of refusal in this interval.
pub const LOG_EVERY: Duration = Duration::from_secs(5);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(1);

/// The accepted, admitted connections of a listener, as a stream. Accept errors are handled
/// (and backed off) here, so it yields only connections.
pub struct Incoming {
    listener: UnixListener,
    peers: PeerCheck,
    slots: Arc<Semaphore>,
    max_connections: usize,
    backoff: Backoff,
    sleeping: Option<Pin<Box<Sleep>>>,
    refused_uid: Throttle,
    refused_full: Throttle,
    accept_failed: Throttle,
}

impl Incoming {
    /// Accepts on `listener`, admitting the peers `peers` allows, at most `max_connections`
    /// at a time.
    pub fn new(listener: UnixListener, peers: PeerCheck, max_connections: usize) -> Self {
        Self {
            listener,
            peers,
            slots: Arc::new(Semaphore::new(max_connections)),
            max_connections,
            backoff: Backoff::default(),
            sleeping: None,
            refused_uid: Throttle::default(),
            refused_full: Throttle::default(),
            accept_failed: Throttle::default(),
        }
    }

    /// Admits or closes one accepted connection.
    fn admit(&mut self, stream: UnixStream) -> Option<Conn> {
        match self.peers.admit(&stream) {
            Ok(()) => {}
            Err(refused) => {
                metrics::connection_refused(match refused {
                    Refused::Uid(_) => Refusal::PeerUid,
                    Refused::NoCredentials => Refusal::NoCredentials,
                });
                if let Some(total) = self.refused_uid.hit() {
                    match refused {
                        Refused::Uid(uid) => tracing::warn!(
                            uid,
                            refused_total = total,
                            "connection refused: peer uid not in allowed_uids"
                        ),
                        Refused::NoCredentials => tracing::warn!(
                            refused_total = total,
                            "connection refused: the kernel did not report the peer's credentials"
                        ),
                    }
                }
                return None;
            }
        }
        let Ok(slot) = self.slots.clone().try_acquire_owned() else {
            metrics::connection_refused(Refusal::MaxConnections);
            if let Some(total) = self.refused_full.hit() {
                tracing::warn!(
                    max_connections = self.max_connections,
                    refused_total = total,
                    "connection refused: max_connections connections are open"
                );
            }
            return None;
        };
        tracing::debug!(
            open = self.max_connections - self.slots.available_permits(),
            "connection accepted"
        );
        Some(Conn::new(stream, slot, PREFACE_TIMEOUT))
    }
}

impl tokio_stream::Stream for Incoming {
    type Item = Conn;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            if let Some(sleep) = &mut this.sleeping {
                ready!(sleep.as_mut().poll(cx));
                this.sleeping = None;
            }
            // Refused connections loop here; accept's cooperative budget makes it yield.
            match ready!(this.listener.poll_accept(cx)) {
                Ok((stream, _)) => {
                    this.backoff.reset();
                    if let Some(conn) = this.admit(stream) {
                        return Poll::Ready(Some(conn));
                    }
                }
                Err(e) => {
                    let Some(pause) = this.backoff.after(&e) else {
                        continue; // this one connection failed; the next may not
                    };
                    if let Some(total) = this.accept_failed.hit() {
                        tracing::warn!(error = %e, failures_total = total, pause_ms = pause.as_millis() as u64,
                            "cannot accept connections; backing off");
                    }
                    this.sleeping = Some(Box::pin(tokio::time::sleep(pause)));
                }
            }
        }
    }
}

/// Pause after accept errors: none for errors of one connection, growing pauses for running
/// out of descriptors or memory (and anything unknown), so the loop never spins.
#[derive(Debug, Default)]
pub(crate) struct Backoff {
    next: Option<Duration>,
}

impl Backoff {
    /// The pause before the next accept after `error`, or `None` to retry at once.
    pub(crate) fn after(&mut self, error: &io::Error) -> Option<Duration> {
        let per_connection = [
            libc::ECONNABORTED,
            libc::ECONNRESET,
            libc::EINTR,
            libc::EPROTO,
            libc::EPERM,
            libc::EAGAIN,
        ];
        if error
            .raw_os_error()
            .is_some_and(|code| per_connection.contains(&code))
        {
            return None;
        }
        let pause = self.next.unwrap_or(BACKOFF_MIN);
        self.next = Some((pause * 2).min(BACKOFF_MAX));
        Some(pause)
    }

    /// An accept succeeded: the next failure starts over at the shortest pause.
    pub(crate) fn reset(&mut self) {
        self.next = None;
    }
}

/// Counts events and says when one may be logged: the first, then at most one per
/// [`LOG_EVERY`]. Returns the total so far when a line may be written.
#[derive(Debug, Default)]
pub(crate) struct Throttle {
    total: u64,
    last: Option<Instant>,
}

impl Throttle {
    pub(crate) fn hit(&mut self) -> Option<u64> {
        self.total += 1;
        let now = Instant::now();
        if self.last.is_some_and(|t| now.duration_since(t) < LOG_EVERY) {
            return None;
        }
        self.last = Some(now);
        Some(self.total)
    }
}

/// An admitted connection: holds a `max_connections` slot until dropped, and fails reads if
/// the HTTP/2 preface has not arrived in time.
pub struct Conn {
    stream: UnixStream,
    _slot: OwnedSemaphorePermit,
    /// Preface bytes still to come.
    preface_left: usize,
    preface_deadline: Option<Pin<Box<Sleep>>>,
}

impl Conn {
    fn new(stream: UnixStream, slot: OwnedSemaphorePermit, timeout: Duration) -> Self {
        Self {
            stream,
            _slot: slot,
            preface_left: PREFACE_LEN,
            preface_deadline: Some(Box::pin(tokio::time::sleep(timeout))),
        }
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(deadline) = &mut this.preface_deadline
            && deadline.as_mut().poll(cx).is_ready()
        {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "no HTTP/2 connection preface within the time limit",
            )));
        }
        let before = buf.filled().len();
        ready!(Pin::new(&mut this.stream).poll_read(cx, buf))?;
        if this.preface_deadline.is_some() {
            let got = buf.filled().len() - before;
            this.preface_left = this.preface_left.saturating_sub(got);
            if this.preface_left == 0 {
                this.preface_deadline = None;
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

/// Gives the Admin service's interceptor the peer's credentials.
impl Connected for Conn {
    type ConnectInfo = UdsConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.stream.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::socket::Endpoint;
    use std::path::PathBuf;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_stream::StreamExt;

    fn conn(timeout: Duration) -> (Conn, UnixStream, Arc<Semaphore>) {
        let (server, client) = UnixStream::pair().expect("pair");
        let slots = Arc::new(Semaphore::new(1));
        let slot = slots.clone().try_acquire_owned().expect("slot");
        (Conn::new(server, slot, timeout), client, slots)
    }

    #[tokio::test]
    async fn silent_connections_time_out_before_the_preface() {
        let (mut conn, mut client, slots) = conn(Duration::from_millis(200));
        client
            .write_all(b"PRI * HTTP/2.0\r\n")
            .await
            .expect("write");
        let mut buf = [0; 64];
        assert_eq!(conn.read(&mut buf).await.expect("partial preface"), 16);
        let err = conn.read(&mut buf).await.expect_err("timed out");
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(slots.available_permits(), 0);
        drop(conn);
        assert_eq!(slots.available_permits(), 1, "closing frees the slot");
    }

    #[tokio::test]
    async fn no_deadline_once_the_preface_is_in() {
        let (mut conn, mut client, _slots) = conn(Duration::from_millis(100));
        client
            .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            .await
            .expect("write");
        let mut buf = [0; 64];
        assert_eq!(conn.read(&mut buf).await.expect("preface"), 24);
        tokio::time::sleep(Duration::from_millis(300)).await;
        client.write_all(b"x").await.expect("write");
        assert_eq!(conn.read(&mut buf).await.expect("later bytes"), 1);
    }

    #[test]
    fn backoff_grows_to_a_second_and_resets() {
        let mut b = Backoff::default();
        let emfile = io::Error::from_raw_os_error(libc::EMFILE);
        let pauses: Vec<_> = (0..6).filter_map(|_| b.after(&emfile)).collect();
        assert_eq!(pauses[0], BACKOFF_MIN);
        assert!(pauses.windows(2).all(|w| w[0] <= w[1]));
        assert_eq!(pauses[5], BACKOFF_MAX);
        b.reset();
        assert_eq!(b.after(&emfile), Some(BACKOFF_MIN));
        assert_eq!(
            b.after(&io::Error::from_raw_os_error(libc::ECONNABORTED)),
            None
        );
    }

    #[test]
    fn throttle_counts_every_hit_and_logs_the_first() {
        let mut t = Throttle::default();
        assert_eq!(t.hit(), Some(1));
        assert_eq!(t.hit(), None);
        assert_eq!(t.hit(), None);
        t.last = Some(Instant::now() - LOG_EVERY);
        assert_eq!(t.hit(), Some(4));
    }

    fn listen(allowed: Option<&[u32]>, cap: usize) -> (tempfile::TempDir, PathBuf, Incoming) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("k.sock");
        let listener = UnixListener::bind(&path).expect("bind");
        let peers = PeerCheck::new(&Endpoint::Path(path.clone()), allowed).expect("ok");
        (dir, path, Incoming::new(listener, peers, cap))
    }

    #[tokio::test]
    #[allow(unsafe_code)] // getuid(2), see SAFETY
    async fn off_the_list_is_closed_unread() {
        // SAFETY: getuid(2) cannot fail and touches no memory.
        let me = unsafe { libc::getuid() };
        let (_dir, path, mut incoming) = listen(Some(&[me.wrapping_add(1)]), 4);
        let mut client = UnixStream::connect(&path).await.expect("connect");
        client.write_all(b"PRI * HTTP/2.0").await.expect("write");
        let next = tokio::time::timeout(Duration::from_millis(300), incoming.next()).await;
        assert!(next.is_err(), "refused peer admitted");
        let mut buf = [0; 8];
        match client.read(&mut buf).await {
            Ok(n) => assert_eq!(n, 0, "EOF"),
            Err(e) => assert_eq!(e.kind(), io::ErrorKind::ConnectionReset),
        }
    }

    #[tokio::test]
    async fn over_the_cap_is_closed_unread() {
        let (_dir, path, mut incoming) = listen(None, 1);
        let _first = UnixStream::connect(&path).await.expect("connect");
        let held = incoming.next().await.expect("conn");
        let mut second = UnixStream::connect(&path).await.expect("connect");
        let mut third = UnixStream::connect(&path).await.expect("connect");
        // Both are over the cap: accepted and closed, so reads see EOF.
        let next = tokio::time::timeout(Duration::from_millis(300), incoming.next()).await;
        assert!(next.is_err(), "nothing admitted over the cap");
        let mut buf = [0; 8];
        assert_eq!(second.read(&mut buf).await.expect("eof"), 0);
        assert_eq!(third.read(&mut buf).await.expect("eof"), 0);
        drop(held);
        let _fourth = UnixStream::connect(&path).await.expect("connect");
        assert!(incoming.next().await.is_some(), "slot freed");
    }
}

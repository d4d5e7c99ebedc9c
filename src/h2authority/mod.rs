//! Connection-level fix for clients that send a Unix socket path as the
//! HTTP/2 `:authority`.
//!
//! kube-apiserver 1.27–1.31 (grpc-go) sends e.g. `/var/run/kms/kms.sock`,
//! Python grpcio a percent-encoded path, some clients an empty value. The
//! `h2` crate under tonic parses `:authority` as an `http::uri::Authority`
//! and resets every stream whose value does not parse, so every KMS call
//! fails. [`AuthorityFix`] sits between the accepted socket and the HTTP/2
//! server and rewrites such values to `localhost` (see [`Rewriter`]).
//!
//! ```no_run
//! # async fn serve() -> Result<(), Box<dyn std::error::Error>> {
//! use kms_plugin::h2authority::AuthorityFix;
//! use tokio_stream::StreamExt;
//!
//! let listener = tokio::net::UnixListener::bind("/tmp/kms.sock")?;
//! let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener)
//!     .map(|conn| conn.map(AuthorityFix::new));
//! // tonic::transport::Server::builder()
//! //     .add_service(service)
//! //     .serve_with_incoming(incoming)
//! //     .await?;
//! # drop(incoming);
//! # Ok(())
//! # }
//! ```

mod error;
pub mod frame;
pub mod hpack;
mod rewriter;

#[cfg(test)]
mod e2e_tests;
#[cfg(test)]
mod test_support;

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

pub use error::RewriteError;
pub use hpack::HpackError;
pub use rewriter::{MAX_HEADER_BLOCK, REPLACEMENT_AUTHORITY, Rewriter};

/// Logged (at debug) the first time a connection's `:authority` is rewritten.
pub const REWROTE_LOG: &str = "rewrote an unparsable :authority to localhost on this connection";

/// Capacity the rewriter's output buffer keeps between uses.
const KEEP_PENDING: usize = 16 * 1024;

/// Wraps a client connection so that reads see a rewritten `:authority`.
///
/// Reads land in the server's buffer and go through a [`Rewriter`], which
/// leaves what needs no change where it is; writes, flushes and shutdown go
/// straight to the inner stream. A rewrite error surfaces as an
/// [`io::ErrorKind::InvalidData`] read error, so the server drops the
/// connection. Pending output is drained before more is read, which keeps
/// the per-connection memory bounded.
#[derive(Debug)]
pub struct AuthorityFix<S> {
    inner: S,
    rewriter: Rewriter,
    pending: Vec<u8>,
    pending_pos: usize,
}

impl<S> AuthorityFix<S> {
    /// Wraps the accepted connection `inner`.
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            rewriter: Rewriter::new(),
            pending: Vec::new(),
            pending_pos: 0,
        }
    }

    /// The wrapped connection.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The wrapped connection, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// The wrapped connection, unwrapped.
    pub fn into_inner(self) -> S {
        self.inner
    }

    /// The rewriter's state, e.g. to log whether a connection was rewritten.
    pub fn rewriter(&self) -> &Rewriter {
        &self.rewriter
    }
}

fn invalid_data(e: &RewriteError) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e.clone())
}

impl<S: AsyncRead + Unpin> AsyncRead for AuthorityFix<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            let pending = this.pending.get(this.pending_pos..).unwrap_or_default();
            if !pending.is_empty() {
                let n = pending.len().min(buf.remaining());
                buf.put_slice(pending.get(..n).unwrap_or_default());
                this.pending_pos += n;
                if this.pending_pos >= this.pending.len() {
                    // Request bytes (DEK seeds) must not outlive their call here.
                    this.pending.fill(0);
                    this.pending.clear();
                    this.pending_pos = 0;
                    this.pending.shrink_to(KEEP_PENDING);
                }
                return Poll::Ready(Ok(()));
            }
            if let Some(e) = this.rewriter.error() {
                return Poll::Ready(Err(invalid_data(e)));
            }
            if buf.remaining() == 0 {
                return Poll::Ready(Ok(()));
            }
            // Read straight into the server's buffer: what passes unchanged (nearly every
            // byte) is judged there and never copied.
            let start = buf.filled().len();
            ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
            if buf.filled().len() == start {
                return Poll::Ready(Ok(())); // EOF
            }
            let rewritten_before = this.rewriter.rewritten_blocks();
            let read = buf.filled_mut().get_mut(start..).unwrap_or_default();
            let fed = this.rewriter.feed_in_place(read, &mut this.pending);
            let passed = fed.as_ref().map_or(0, |n| *n);
            // The rest was consumed (into the rewriter or `pending`): the server must not
            // read it here, and no copy of request bytes stays behind.
            read.get_mut(passed..).unwrap_or_default().fill(0);
            buf.set_filled(start + passed);
            if let Err(e) = fed {
                this.pending.fill(0);
                this.pending.clear();
                return Poll::Ready(Err(invalid_data(&e)));
            }
            // Once per connection: shows which clients need the rewrite (the value itself
            // is not logged; it is whatever the client sent).
            if rewritten_before == 0 && this.rewriter.rewritten_blocks() > 0 {
                tracing::debug!("{REWROTE_LOG}");
            }
            if passed > 0 {
                return Poll::Ready(Ok(()));
            }
            // Nothing passed in place: what this read gave is in `pending`, or held by the
            // rewriter (part of a header block); hand that out or read on.
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for AuthorityFix<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// Passes the wrapped stream's peer information through (e.g. `AuthorityFix<UnixStream>`
/// yields `UdsConnectInfo`), for tonic's `serve_with_incoming` and the plugin's own server.
impl<S: tonic::transport::server::Connected> tonic::transport::server::Connected
    for AuthorityFix<S>
{
    type ConnectInfo = S::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.get_ref().connect_info()
    }
}

//! TLS for the admin listener (`admin = "tls:ADDR:PORT"`): an async stream
//! over rustls' buffered `ServerConnection`.
//!
//! The public listener keeps no rustls buffers per idle connection
//! (src/tls/); the admin listener serves a handful of long-lived backend
//! connections, where rustls' own buffers (a few KiB each) cost nothing
//! worth saving, so this is the plain buffered API behind
//! `AsyncRead`/`AsyncWrite`. The handshake runs on the first read, which
//! the AUTH deadline bounds (admin/server.rs).

use std::io::{self, Read, Write};
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use futures_lite::{AsyncRead, AsyncWrite};
use rustls::ServerConnection;

/// Ciphertext read from the socket at a time.
const CIPHERTEXT_CHUNK_BYTES: usize = 16 * 1024;
/// Ciphertext held that rustls has not taken: rustls takes whole records as
/// they come (at most ~16 KiB each), so more than this means it stopped.
const CIPHERTEXT_HELD_BYTES_MAX: usize = 4 * CIPHERTEXT_CHUNK_BYTES;

pub struct TlsStream<S> {
    io: S,
    tls: ServerConnection,
    /// Ciphertext read but not yet taken by rustls.
    incoming: Vec<u8>,
    /// Ciphertext rustls produced, not yet written to the socket.
    outgoing: Vec<u8>,
    /// The socket reached end of file.
    io_eof: bool,
}

impl<S: AsyncRead + AsyncWrite + Unpin> TlsStream<S> {
    pub fn new(io: S, tls: ServerConnection) -> Self {
        TlsStream { io, tls, incoming: Vec::new(), outgoing: Vec::new(), io_eof: false }
    }

    /// Writes what rustls has to send (handshake messages, records).
    fn poll_write_ciphertext(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            if self.outgoing.is_empty() {
                if !self.tls.wants_write() {
                    return Poll::Ready(Ok(()));
                }
                self.tls.write_tls(&mut self.outgoing)?;
                continue;
            }
            let written = ready!(Pin::new(&mut self.io).poll_write(cx, &self.outgoing))?;
            if written == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.outgoing.drain(..written);
        }
    }

    /// Hands buffered ciphertext to rustls; false when none is buffered.
    fn feed_ciphertext(&mut self) -> io::Result<bool> {
        if self.incoming.is_empty() {
            return Ok(false);
        }
        let mut unread = &self.incoming[..];
        let taken = self.tls.read_tls(&mut unread)?;
        self.incoming.drain(..taken);
        // A TLS error ends the connection: the caller drops it on a read
        // error, so the peer sees the close, not rustls' alert.
        self.tls.process_new_packets().map_err(|error| io::Error::new(io::ErrorKind::InvalidData, error))?;
        Ok(taken > 0)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for TlsStream<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buffer: &mut [u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        loop {
            match this.tls.reader().read(buffer) {
                // 0: the peer sent close_notify.
                Ok(count) => return Poll::Ready(Ok(count)),
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
                Err(error) => return Poll::Ready(Err(error)),
            }
            // Handshake replies (and alerts) go out before waiting for more.
            ready!(this.poll_write_ciphertext(cx))?;
            if this.feed_ciphertext()? {
                continue;
            }
            if this.incoming.len() >= CIPHERTEXT_HELD_BYTES_MAX {
                return Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, "TLS input not taken")));
            }
            if this.io_eof {
                // Closed without close_notify: an end of file all the same
                // (admin frames are length-prefixed: truncation is visible).
                return Poll::Ready(Ok(0));
            }
            let start = this.incoming.len();
            this.incoming.resize(start + CIPHERTEXT_CHUNK_BYTES, 0);
            let read = Pin::new(&mut this.io).poll_read(cx, &mut this.incoming[start..]);
            let count = match read {
                Poll::Ready(Ok(count)) => count,
                Poll::Ready(Err(error)) => {
                    this.incoming.truncate(start);
                    return Poll::Ready(Err(error));
                }
                Poll::Pending => {
                    this.incoming.truncate(start);
                    return Poll::Pending;
                }
            };
            this.incoming.truncate(start + count);
            if count == 0 {
                this.io_eof = true;
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for TlsStream<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buffer: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        // Earlier records first, so rustls never holds more than one write's worth.
        ready!(this.poll_write_ciphertext(cx))?;
        let accepted = this.tls.writer().write(buffer)?;
        // Best effort now; what is left goes out on the next write or flush.
        if let Poll::Ready(Err(error)) = this.poll_write_ciphertext(cx) {
            return Poll::Ready(Err(error));
        }
        Poll::Ready(Ok(accepted))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_write_ciphertext(cx))?;
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.tls.send_close_notify();
        ready!(this.poll_write_ciphertext(cx))?;
        Pin::new(&mut this.io).poll_close(cx)
    }
}

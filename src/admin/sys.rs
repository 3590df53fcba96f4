//! The admin gateway's system calls: `kometa-sys`, and waiting for
//! readability through glommio's reactor (the gateway's executor runs
//! its connection tasks).

pub use kometa_sys::*;

use std::os::fd::{FromRawFd, RawFd};

/// Waits until `fd` (an epoll set, eventfd or listening socket) is readable,
/// through glommio's io_uring reactor, so the executor sleeps meanwhile.
///
/// glommio has no public "wait for readability" call; its `UnixStream` arms
/// exactly that (an io_uring POLL_ADD) when built from a descriptor. We build
/// a throwaway one on a `dup` of `fd` and wait for its first read attempt: on
/// a descriptor that is not a connected socket the read fails at once
/// (ENOTSOCK/ENOTCONN) after the poll completes, which is our signal.
/// Dropping it closes only the duplicate. One dup per sleep, not per event.
pub async fn readable(fd: RawFd) {
    use futures_lite::AsyncRead;
    use std::pin::Pin;

    // SAFETY: dup of a valid descriptor; returns a new fd or -1.
    let duplicate = unsafe { libc::dup(fd) };
    if duplicate < 0 {
        // Out of descriptors: fall back to a short sleep so the shard keeps going.
        glommio::timer::sleep(std::time::Duration::from_millis(1)).await;
        return;
    }
    // SAFETY: `duplicate` is a fresh descriptor that the stream now owns and closes.
    let mut stream = unsafe { <glommio::net::UnixStream as FromRawFd>::from_raw_fd(duplicate) };
    let _ = std::future::poll_fn(|cx| Pin::new(&mut stream).poll_read(cx, &mut [])).await;
}

/// Accepts connections on a non-blocking listener until the executor ends,
/// handing each to `admit` (which enforces its listener's cap). `what`
/// names the listener in the (rate-limited) log line of a failed accept.
pub async fn accept_each(listener_fd: RawFd, what: &'static str, mut admit: impl FnMut(std::os::fd::OwnedFd)) {
    loop {
        readable(listener_fd).await;
        loop {
            match accept(listener_fd) {
                Ok(fd) => admit(fd),
                Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(error) if error.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(error) => {
                    crate::limited!(WARN, %error, listener = what, "accept failed; retrying in 100 ms");
                    glommio::timer::sleep(std::time::Duration::from_millis(100)).await;
                    break;
                }
            }
        }
    }
}

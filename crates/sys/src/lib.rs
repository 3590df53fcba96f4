//! Thin, checked wrappers over the Linux socket, epoll and timer system
//! calls that Kometa's shards and its load generator drive directly. Every
//! function returns `io::Result`; none panics on a peer's behaviour. This is
//! the one crate of the workspace where `unsafe` meets the kernel's ABI:
//! each call says why it is sound.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

fn check(result: libc::c_int) -> io::Result<libc::c_int> {
    if result < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(result)
    }
}

fn check_size(result: libc::ssize_t) -> io::Result<usize> {
    if result < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(result as usize)
    }
}

/// Non-blocking receive into `buffer`. `Ok(0)` is end of stream.
pub fn recv(fd: RawFd, buffer: &mut [u8]) -> io::Result<usize> {
    // SAFETY: buffer is valid for writes of its length.
    check_size(unsafe { libc::recv(fd, buffer.as_mut_ptr().cast(), buffer.len(), libc::MSG_DONTWAIT) })
}

/// Reads away (a bounded amount of) input nobody will use, before a close:
/// unread input makes close() send a reset instead of a FIN, and a reset can
/// destroy a response the peer has not read yet. A peer that keeps sending
/// past the bound gets the reset.
pub fn discard_unread_input(fd: RawFd) {
    const READS_MAX: usize = 4;
    let mut sink = [0u8; 4096];
    for _ in 0..READS_MAX {
        match recv(fd, &mut sink) {
            Ok(count) if count > 0 => continue,
            _ => break,
        }
    }
}

/// Sets an integer socket option (`setsockopt` with a C int).
pub fn set_int_option(fd: RawFd, level: libc::c_int, name: libc::c_int, value: libc::c_int) -> io::Result<()> {
    // SAFETY: setsockopt with a pointer to a live c_int and its size.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    check_size(rc as isize).map(drop)
}

/// Sends our FIN; the socket can still be read.
pub fn shutdown_write(fd: RawFd) -> io::Result<()> {
    // SAFETY: plain syscall on a descriptor we own.
    check_size(unsafe { libc::shutdown(fd, libc::SHUT_WR) } as isize).map(drop)
}

/// Non-blocking send; never raises SIGPIPE.
pub fn send(fd: RawFd, bytes: &[u8]) -> io::Result<usize> {
    // SAFETY: bytes is valid for reads of its length.
    check_size(unsafe { libc::send(fd, bytes.as_ptr().cast(), bytes.len(), libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) })
}

/// Most slices one gathered write takes.
pub const IOVECS_MAX: usize = 64;

/// Non-blocking gathered send of up to `IOVECS_MAX` slices.
pub fn send_vectored<'a>(fd: RawFd, chunks: impl Iterator<Item = &'a [u8]>) -> io::Result<usize> {
    let mut iovecs: [libc::iovec; IOVECS_MAX] =
        [libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 }; IOVECS_MAX];
    let mut count = 0;
    for chunk in chunks.take(IOVECS_MAX) {
        iovecs[count] = libc::iovec { iov_base: chunk.as_ptr() as *mut libc::c_void, iov_len: chunk.len() };
        count += 1;
    }
    // SAFETY: a zeroed msghdr is valid; we point it at `count` initialised iovecs
    // whose buffers outlive the call.
    let mut message: libc::msghdr = unsafe { std::mem::zeroed() };
    message.msg_iov = iovecs.as_mut_ptr();
    message.msg_iovlen = count as _;
    // SAFETY: message references valid iovecs for the duration of the call.
    check_size(unsafe { libc::sendmsg(fd, &message, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) })
}

/// Accepts one connection, non-blocking and close-on-exec.
pub fn accept(listener: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: null address pointers are allowed; the result is a new fd or -1.
    let fd = check(unsafe {
        libc::accept4(listener, std::ptr::null_mut(), std::ptr::null_mut(), libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC)
    })?;
    // SAFETY: fd is a fresh descriptor we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The IP address of a connected socket's peer (`getpeername`).
pub fn peer_address(fd: RawFd) -> io::Result<std::net::IpAddr> {
    // SAFETY: a zeroed sockaddr_storage is a valid value of the type.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut length = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: storage is writable for `length` bytes; the kernel writes at
    // most that and sets `length` to what it wrote.
    check(unsafe { libc::getpeername(fd, (&mut storage as *mut libc::sockaddr_storage).cast(), &mut length) })?;
    match i32::from(storage.ss_family) {
        libc::AF_INET => {
            // SAFETY: the family says the storage holds a sockaddr_in.
            let address = unsafe { &*(&storage as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            Ok(std::net::Ipv4Addr::from(u32::from_be(address.sin_addr.s_addr)).into())
        }
        libc::AF_INET6 => {
            // SAFETY: the family says the storage holds a sockaddr_in6.
            let address = unsafe { &*(&storage as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            Ok(std::net::Ipv6Addr::from(address.sin6_addr.s6_addr).into())
        }
        _ => Err(io::Error::new(io::ErrorKind::Unsupported, "not an IP socket")),
    }
}

pub const EPOLLIN: u32 = libc::EPOLLIN as u32;
pub const EPOLLOUT: u32 = libc::EPOLLOUT as u32;
pub const EPOLLRDHUP: u32 = libc::EPOLLRDHUP as u32;
pub const EPOLLHUP: u32 = libc::EPOLLHUP as u32;
pub const EPOLLERR: u32 = libc::EPOLLERR as u32;
pub const EPOLLET: u32 = libc::EPOLLET as u32;

/// An epoll set. A shard registers its connections once, edge-triggered for
/// input and output, so an idle connection costs no syscalls at all; the
/// load generator uses it level-triggered.
pub struct Epoll {
    fd: OwnedFd,
}

impl Epoll {
    pub fn new() -> io::Result<Epoll> {
        // SAFETY: returns a new fd or -1.
        let fd = check(unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) })?;
        // SAFETY: fresh descriptor we own.
        Ok(Epoll { fd: unsafe { OwnedFd::from_raw_fd(fd) } })
    }

    pub fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    fn control(&self, op: libc::c_int, fd: RawFd, events: u32, token: u64) -> io::Result<()> {
        let mut event = libc::epoll_event { events, u64: token };
        // SAFETY: event is a valid epoll_event.
        check(unsafe { libc::epoll_ctl(self.fd(), op, fd, &mut event) }).map(|_| ())
    }

    pub fn add(&self, fd: RawFd, events: u32, token: u64) -> io::Result<()> {
        self.control(libc::EPOLL_CTL_ADD, fd, events, token)
    }

    pub fn modify(&self, fd: RawFd, events: u32, token: u64) -> io::Result<()> {
        self.control(libc::EPOLL_CTL_MOD, fd, events, token)
    }

    pub fn delete(&self, fd: RawFd) -> io::Result<()> {
        self.control(libc::EPOLL_CTL_DEL, fd, 0, 0)
    }

    /// Collects ready events without blocking.
    pub fn poll(&self, events: &mut [libc::epoll_event]) -> io::Result<usize> {
        self.wait(events, 0)
    }

    /// Waits up to `timeout_ms` (-1: no limit) and fills `events`; an
    /// interrupted wait returns no events (the caller checks its own state).
    pub fn wait(&self, events: &mut [libc::epoll_event], timeout_ms: i32) -> io::Result<usize> {
        let capacity = events.len().min(i32::MAX as usize) as libc::c_int;
        // SAFETY: events has room for `capacity` entries.
        let count = unsafe { libc::epoll_wait(self.fd(), events.as_mut_ptr(), capacity, timeout_ms) };
        if count < 0 {
            let error = io::Error::last_os_error();
            if error.kind() == io::ErrorKind::Interrupted {
                return Ok(0);
            }
            return Err(error);
        }
        Ok(count as usize)
    }
}

/// Sleeps until `epoll` has events, without taking them: an outer epoll set
/// that holds only `epoll` (level-triggered) tells when it is readable.
pub struct Sleeper {
    outer: Epoll,
}

impl Sleeper {
    pub fn new(epoll: &Epoll) -> io::Result<Sleeper> {
        let outer = Epoll::new()?;
        outer.add(epoll.fd(), EPOLLIN, 0)?;
        Ok(Sleeper { outer })
    }

    /// Blocks the thread until the inner set is readable or `timeout_ms` passes.
    pub fn sleep(&self, timeout_ms: i32) {
        let mut event = libc::epoll_event { events: 0, u64: 0 };
        // SAFETY: one valid epoll_event.
        unsafe { libc::epoll_wait(self.outer.fd(), &mut event, 1, timeout_ms) };
    }
}

/// A periodic timer in the epoll set: the shard's sweep tick, without a
/// timer to arm and cancel on every sleep.
pub struct Ticker {
    fd: OwnedFd,
}

impl Ticker {
    pub fn new(interval: std::time::Duration) -> io::Result<Ticker> {
        // SAFETY: returns a new descriptor or -1.
        let fd = check(unsafe { libc::timerfd_create(libc::CLOCK_MONOTONIC, libc::TFD_NONBLOCK | libc::TFD_CLOEXEC) })?;
        // SAFETY: a fresh descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let spec = libc::timespec {
            tv_sec: interval.as_secs() as libc::time_t,
            tv_nsec: interval.subsec_nanos() as libc::c_long,
        };
        let value = libc::itimerspec { it_interval: spec, it_value: spec };
        // SAFETY: a valid itimerspec for our timerfd; the old value is not wanted.
        check(unsafe { libc::timerfd_settime(fd.as_raw_fd(), 0, &value, std::ptr::null_mut()) })?;
        Ok(Ticker { fd })
    }

    pub fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Consumes the expirations so the descriptor reads as idle again.
    pub fn drain(&self) {
        let mut expirations: u64 = 0;
        // SAFETY: reads 8 bytes into a u64 from our timerfd (EAGAIN when none).
        unsafe { libc::read(self.fd(), (&mut expirations as *mut u64).cast(), 8) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_address_of_an_accepted_socket() {
        for local in ["127.0.0.1:0", "[::1]:0"] {
            let Ok(listener) = std::net::TcpListener::bind(local) else { continue };
            let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
            let (accepted, _) = listener.accept().unwrap();
            let seen = peer_address(accepted.as_raw_fd()).unwrap();
            assert_eq!(seen, client.local_addr().unwrap().ip());
        }
        let file = std::fs::File::open("/dev/null").unwrap();
        assert!(peer_address(file.as_raw_fd()).is_err());
    }
}

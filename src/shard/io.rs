//! The shard's I/O driver: where readiness comes from. Two behind one small
//! interface, chosen by `io.driver`:
//!
//! - **epoll**: an edge-triggered epoll set per shard; sleeping blocks in
//!   `epoll_wait` on an outer set holding it.
//! - **io_uring**: one ring per shard (SINGLE_ISSUER, DEFER_TASKRUN where
//!   the kernel has them). Sockets are armed once with a *multishot poll*
//!   (readiness, like edge-triggered epoll, without an epoll_ctl system call
//!   per socket: registrations of a tick go in one submit), and the listener
//!   with a *multishot accept* (accepted sockets arrive as completions, no
//!   accept system call each). A tick with nothing to submit and no
//!   completion pending makes no system call at all.
//!
//! Both are readiness drivers: the shard then reads into its per-shard
//! scratch buffer and writes with `send`/`writev` itself, so an idle socket
//! holds no buffer (multishot *recv* with provided buffers would cost
//! ~865 B of kernel memory per armed socket against ~256 B for a multishot
//! poll, measured: docs/benchmarks.md), and a write completes or pushes
//! back at once, which the outbox relies on.

use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};

use super::sys::{self, Epoll, Sleeper};

/// Readiness bits (the epoll ones; io_uring polls report the same).
pub const READABLE: u32 = sys::EPOLLIN;
pub const WRITABLE: u32 = sys::EPOLLOUT;
pub const PEER_CLOSED: u32 = sys::EPOLLRDHUP;
pub const HANG_UP: u32 = sys::EPOLLHUP;
pub const ERROR: u32 = sys::EPOLLERR;

/// What a socket is watched for.
const SOCKET_INTEREST: u32 = READABLE | WRITABLE | PEER_CLOSED;

pub use crate::config::DriverKind;

/// One thing the driver reports.
#[derive(Debug)]
pub enum IoEvent {
    /// A watched descriptor is ready (`flags`: the bits above).
    Ready { token: u64, flags: u32 },
    /// The listener accepted a socket (io_uring).
    Accepted(OwnedFd),
    /// Accepting stopped on this error (io_uring: EMFILE and the like); the
    /// shard pauses and starts again later.
    AcceptFailed(io::Error),
    /// A socket's watch ended by itself (io_uring: a multishot poll that
    /// completed); the shard arms it again if the connection lives.
    WatchEnded { token: u64 },
}

pub enum Driver {
    Epoll(EpollDriver),
    Uring(Box<UringDriver>),
}

impl Driver {
    /// The driver `kind` asks for. With `Auto`, io_uring when it can be set
    /// up, else epoll, with the reason (for the one log line).
    pub fn new(kind: DriverKind) -> io::Result<(Driver, Option<String>)> {
        match kind {
            DriverKind::Epoll => Ok((Driver::Epoll(EpollDriver::new()?), None)),
            DriverKind::IoUring => Ok((Driver::Uring(Box::new(UringDriver::new()?)), None)),
            DriverKind::Auto => match UringDriver::new() {
                Ok(uring) => Ok((Driver::Uring(Box::new(uring)), None)),
                Err(error) => {
                    let reason = format!("io_uring unavailable ({error}); using epoll");
                    Ok((Driver::Epoll(EpollDriver::new()?), Some(reason)))
                }
            },
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Driver::Epoll(_) => "epoll",
            Driver::Uring(_) => "io_uring",
        }
    }

    /// Watches a connection's socket for input, output room and the peer's FIN.
    pub fn watch_socket(&mut self, fd: RawFd, token: u64) -> io::Result<()> {
        match self {
            Driver::Epoll(driver) => driver.epoll.add(fd, SOCKET_INTEREST | sys::EPOLLET, token),
            Driver::Uring(driver) => driver.poll(fd, SOCKET_INTEREST, token),
        }
    }

    /// Stops watching a socket before it is closed (`closing`) or handed to
    /// another shard. io_uring: a poll holds the file open until removed.
    /// epoll: closing the last descriptor removes it, no call needed.
    pub fn unwatch_socket(&mut self, fd: RawFd, token: u64, closing: bool) {
        match self {
            Driver::Epoll(_) if closing => {}
            Driver::Epoll(driver) => {
                let _ = driver.epoll.delete(fd);
            }
            Driver::Uring(driver) => driver.remove_poll(token),
        }
    }

    /// Watches a wake-up descriptor (eventfd, timerfd) for input.
    pub fn watch_readable(&mut self, fd: RawFd, token: u64) -> io::Result<()> {
        match self {
            Driver::Epoll(driver) => driver.epoll.add(fd, READABLE, token),
            Driver::Uring(driver) => driver.poll(fd, READABLE, token),
        }
    }

    /// Starts accepting on `listener`: epoll reports it readable under
    /// `token` (the shard then calls accept); io_uring accepts by itself.
    pub fn start_accepting(&mut self, listener: RawFd, token: u64) -> io::Result<()> {
        match self {
            Driver::Epoll(driver) => match driver.epoll.modify(listener, READABLE, token) {
                Err(error) if error.raw_os_error() == Some(libc::ENOENT) => driver.epoll.add(listener, READABLE, token),
                other => other,
            },
            Driver::Uring(driver) => driver.accept(listener, token),
        }
    }

    /// Stops accepting (a pause after EMFILE, or shutdown).
    pub fn stop_accepting(&mut self, listener: RawFd, token: u64) {
        match self {
            Driver::Epoll(driver) => {
                let _ = driver.epoll.modify(listener, 0, token);
            }
            Driver::Uring(driver) => driver.cancel(token),
        }
    }

    /// Adds what is ready now to `events` (at most `max`); never blocks.
    pub fn poll(&mut self, events: &mut Vec<IoEvent>, max: usize) -> io::Result<()> {
        match self {
            Driver::Epoll(driver) => driver.poll(events, max),
            Driver::Uring(driver) => driver.complete(events, max),
        }
    }

    /// Blocks the thread until something is ready or `timeout_ms` passes,
    /// without taking the events (the next `poll` does).
    pub fn wait(&mut self, timeout_ms: i32) {
        match self {
            Driver::Epoll(driver) => driver.sleeper.sleep(timeout_ms),
            Driver::Uring(driver) => driver.wait(timeout_ms),
        }
    }

    /// Sends what was queued for the kernel (io_uring registrations). The
    /// shard calls it before it sleeps; `poll` does it too.
    pub fn flush(&mut self) {
        if let Driver::Uring(driver) = self {
            driver.submit();
        }
    }
}

/// Today's path: an edge-triggered epoll set.
pub struct EpollDriver {
    epoll: Epoll,
    sleeper: Sleeper,
    buffer: Vec<libc::epoll_event>,
}

impl EpollDriver {
    fn new() -> io::Result<EpollDriver> {
        let epoll = Epoll::new()?;
        let sleeper = Sleeper::new(&epoll)?;
        Ok(EpollDriver { epoll, sleeper, buffer: Vec::new() })
    }

    fn poll(&mut self, events: &mut Vec<IoEvent>, max: usize) -> io::Result<()> {
        self.buffer.resize(max.max(1), libc::epoll_event { events: 0, u64: 0 });
        let count = self.epoll.poll(&mut self.buffer)?;
        events.extend(self.buffer[..count].iter().map(|e| IoEvent::Ready { token: e.u64, flags: e.events }));
        Ok(())
    }
}

/// user_data of requests whose completion means nothing to the shard.
const USER_DATA_IGNORED: u64 = u64::MAX;
/// Marks the user_data of a poll removal (the rest is the poll's token) and
/// of a cancellation (an accept's). Shard tokens never set these bits
/// (connection generations stay below 2^30).
const REMOVAL: u64 = 1 << 63;
const CANCELLATION: u64 = 1 << 62;
/// Submission queue entries; registrations beyond it in one tick are
/// submitted in several goes.
const SQ_ENTRIES: u32 = 4096;
/// Completion queue entries: room for bursts (a broadcast wakes many
/// sockets at once); the kernel keeps overflow (FEAT_NODROP) until drained.
const CQ_ENTRIES: u32 = 65_536;

/// io_uring: multishot polls for sockets and wake-ups, multishot accept.
pub struct UringDriver {
    ring: io_uring::IoUring,
    /// The multishot accept running (listener, token): its completions
    /// become `Accepted`.
    accepting: Option<(RawFd, u64)>,
    /// The kernel flags pending deferred work (TASKRUN_FLAG): a tick with
    /// nothing to submit, no completion and no flag makes no system call.
    taskrun_flag: bool,
}

impl UringDriver {
    fn new() -> io::Result<UringDriver> {
        let mut builder = io_uring::IoUring::builder();
        builder.setup_cqsize(CQ_ENTRIES).setup_single_issuer().setup_defer_taskrun().setup_taskrun_flag();
        let (ring, taskrun_flag) = match builder.build(SQ_ENTRIES) {
            Ok(ring) => (ring, true),
            // Before 6.1: no DEFER_TASKRUN/SINGLE_ISSUER; COOP_TASKRUN (5.19) then.
            Err(error) if error.raw_os_error() == Some(libc::EINVAL) => {
                (io_uring::IoUring::builder().setup_cqsize(CQ_ENTRIES).setup_coop_taskrun().build(SQ_ENTRIES)?, false)
            }
            Err(error) => return Err(error),
        };
        if !ring.params().is_feature_nodrop() || !ring.params().is_feature_fast_poll() {
            return Err(io::Error::new(io::ErrorKind::Unsupported, "kernel too old for Kometa's io_uring driver"));
        }
        let mut driver = UringDriver { ring, accepting: None, taskrun_flag };
        driver.probe()?;
        Ok(driver)
    }

    /// Checks that multishot poll and accept exist (5.19+) before relying on them.
    fn probe(&mut self) -> io::Result<()> {
        let mut probe = io_uring::Probe::new();
        self.ring.submitter().register_probe(&mut probe)?;
        let needed = [io_uring::opcode::PollAdd::CODE, io_uring::opcode::AcceptMulti::CODE];
        if needed.iter().all(|code| probe.is_supported(*code)) {
            Ok(())
        } else {
            Err(io::Error::new(io::ErrorKind::Unsupported, "io_uring lacks multishot poll or accept"))
        }
    }

    fn push(&mut self, entry: io_uring::squeue::Entry) {
        loop {
            // SAFETY: the entries built here reference no memory of ours
            // (descriptors and masks only), so nothing must outlive them.
            if unsafe { self.ring.submission().push(&entry) }.is_ok() {
                return;
            }
            // Queue full: hand what is there to the kernel and try again.
            if self.ring.submit().is_err() {
                return;
            }
        }
    }

    fn poll(&mut self, fd: RawFd, mask: u32, token: u64) -> io::Result<()> {
        let entry = io_uring::opcode::PollAdd::new(io_uring::types::Fd(fd), mask).multi(true).build().user_data(token);
        self.push(entry);
        Ok(())
    }

    fn remove_poll(&mut self, token: u64) {
        debug_assert_eq!(token & REMOVAL, 0);
        let entry = io_uring::opcode::PollRemove::new(token).build().user_data(REMOVAL | token);
        self.push(entry);
        // Submitted now: the socket is closed once the poll lets go of it.
        self.submit();
    }

    fn accept(&mut self, listener: RawFd, token: u64) -> io::Result<()> {
        let entry = io_uring::opcode::AcceptMulti::new(io_uring::types::Fd(listener))
            .flags(libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC)
            .build()
            .user_data(token);
        self.accepting = Some((listener, token));
        self.push(entry);
        Ok(())
    }

    fn cancel(&mut self, token: u64) {
        if self.accepting.is_some_and(|(_, accepting)| accepting == token) {
            self.accepting = None;
        }
        let entry = io_uring::opcode::AsyncCancel::new(token).build().user_data(CANCELLATION | token);
        self.push(entry);
        self.submit();
    }

    fn submit(&mut self) {
        // EBUSY/EBADR: completions must be taken first; the next poll does.
        let _ = self.ring.submit();
    }

    fn wait(&mut self, timeout_ms: i32) {
        let timeout = io_uring::types::Timespec::from(std::time::Duration::from_millis(timeout_ms.max(0) as u64));
        let args = io_uring::types::SubmitArgs::new().timespec(&timeout);
        // ETIME (timed out) and EINTR are the ordinary ways out.
        let _ = self.ring.submitter().submit_with_args(1, &args);
    }

    /// Submits what is queued and takes up to `max` completions.
    fn complete(&mut self, events: &mut Vec<IoEvent>, max: usize) -> io::Result<()> {
        let pending_sq = !self.ring.submission().is_empty();
        let taskrun = self.ring.submission().taskrun();
        let overflow = self.ring.submission().cq_overflow();
        let maybe_pending = !self.taskrun_flag && self.ring.completion().is_empty();
        if pending_sq || taskrun || overflow || maybe_pending {
            // DEFER_TASKRUN: completions are only posted by an enter that
            // asks for events; with none pending this costs one system call,
            // like epoll_wait.
            let to_submit = self.ring.submission().len() as u32;
            // SAFETY: enter with no argument structure; the queued entries
            // reference no memory of ours.
            let result = unsafe {
                self.ring.submitter().enter::<libc::sigset_t>(
                    to_submit,
                    0,
                    io_uring::EnterFlags::GETEVENTS.bits(),
                    None,
                )
            };
            match result {
                Ok(_) => {}
                Err(error) if matches!(error.raw_os_error(), Some(libc::EINTR | libc::EBUSY | libc::EBADR)) => {}
                Err(error) => return Err(error),
            }
        }
        let accepting = self.accepting;
        let mut accept_ended = None;
        let mut retry_removals = Vec::new();
        for entry in self.ring.completion().take(max) {
            let token = entry.user_data();
            if token == USER_DATA_IGNORED {
                continue;
            }
            let result = entry.result();
            if token & (REMOVAL | CANCELLATION) != 0 {
                // EALREADY: the request was completing (a multishot poll
                // with a wake-up in flight) and goes on; ask again once its
                // completion is taken. ENOENT: it had ended already. Until
                // a poll is removed it keeps its socket open.
                if result == -libc::EALREADY {
                    retry_removals.push(token);
                }
                continue;
            }
            let more = io_uring::cqueue::more(entry.flags());
            if let Some((listener, accept_token)) = accepting.filter(|(_, t)| *t == token) {
                if result >= 0 {
                    // SAFETY: a successful accept completion carries a new descriptor we now own.
                    events.push(IoEvent::Accepted(unsafe { OwnedFd::from_raw_fd(result) }));
                } else if result != -libc::ECANCELED {
                    // EMFILE and the like: the shard pauses, then starts again.
                    events.push(IoEvent::AcceptFailed(io::Error::from_raw_os_error(-result)));
                }
                if !more {
                    accept_ended = Some((listener, accept_token, result >= 0));
                }
                continue;
            }
            if result > 0 {
                events.push(IoEvent::Ready { token, flags: result as u32 });
            } else if result < 0 && result != -libc::ECANCELED && more {
                events.push(IoEvent::Ready { token, flags: ERROR });
            }
            if !more {
                events.push(IoEvent::WatchEnded { token });
            }
        }
        for removal in retry_removals {
            let token = removal & !(REMOVAL | CANCELLATION);
            if removal & CANCELLATION != 0 {
                self.cancel(token);
            } else {
                self.remove_poll(token);
            }
        }
        if let Some((listener, token, ended_cleanly)) = accept_ended {
            self.accepting = None;
            // It may end by itself (the kernel's choice): go on accepting. After
            // an error the shard pauses and starts it again.
            if ended_cleanly {
                self.accept(listener, token)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;

    fn drivers() -> Vec<Driver> {
        let mut drivers = vec![Driver::new(DriverKind::Epoll).expect("epoll").0];
        // Where the kernel refuses io_uring (seccomp, io_uring_disabled) only epoll is tested here.
        if let Ok((uring, None)) = Driver::new(DriverKind::IoUring) {
            drivers.push(uring);
        }
        drivers
    }

    fn poll_until(driver: &mut Driver, mut wanted: impl FnMut(&IoEvent) -> bool) -> bool {
        for _ in 0..100 {
            let mut events = Vec::new();
            driver.poll(&mut events, 64).expect("poll");
            if events.iter().any(&mut wanted) {
                return true;
            }
            driver.wait(10);
        }
        false
    }

    #[test]
    fn sockets_report_readiness_edge_by_edge() {
        for mut driver in drivers() {
            let (ours, mut theirs) = UnixStream::pair().expect("pair");
            ours.set_nonblocking(true).expect("nonblocking");
            driver.watch_socket(ours.as_raw_fd_for_test(), 7).expect("watch");
            theirs.write_all(b"x").expect("write");
            assert!(
                poll_until(&mut driver, |e| matches!(e, IoEvent::Ready { token: 7, flags } if flags & READABLE != 0)),
                "{}: no readable event",
                driver.name()
            );
            // Another write is another edge.
            let mut sink = [0u8; 8];
            let _ = (&ours).read(&mut sink);
            theirs.write_all(b"y").expect("write");
            assert!(
                poll_until(&mut driver, |e| matches!(e, IoEvent::Ready { token: 7, flags } if flags & READABLE != 0)),
                "{}: no second readable event",
                driver.name()
            );
        }
    }

    /// io_uring: a poll holds its file open until removed; a socket closed
    /// after `unwatch_socket` must really close (the peer sees its end),
    /// also when the poll had a wake-up in flight (removal then says
    /// EALREADY and is asked again).
    #[test]
    fn an_unwatched_socket_closes_for_real() {
        for mut driver in drivers() {
            for round in 0..20u64 {
                let (ours, mut theirs) = UnixStream::pair().expect("pair");
                ours.set_nonblocking(true).expect("nonblocking");
                let token = 100 + round;
                driver.watch_socket(ours.as_raw_fd_for_test(), token).expect("watch");
                let mut events = Vec::new();
                driver.poll(&mut events, 64).expect("poll");
                // A wake-up in flight (not yet taken) when the removal arrives.
                theirs.write_all(b"x").expect("write");
                driver.unwatch_socket(ours.as_raw_fd_for_test(), token, true);
                drop(ours);
                theirs.set_read_timeout(Some(std::time::Duration::from_millis(20))).expect("timeout");
                let mut closed = false;
                for _ in 0..100 {
                    let mut events = Vec::new();
                    driver.poll(&mut events, 64).expect("poll");
                    let mut buffer = [0u8; 8];
                    if matches!(theirs.read(&mut buffer), Ok(0)) {
                        closed = true;
                        break;
                    }
                }
                assert!(closed, "{}: the socket stayed open after it was closed", driver.name());
            }
        }
    }

    trait RawForTest {
        fn as_raw_fd_for_test(&self) -> RawFd;
    }

    impl RawForTest for UnixStream {
        fn as_raw_fd_for_test(&self) -> RawFd {
            std::os::fd::AsRawFd::as_raw_fd(self)
        }
    }
}

//! Thin wrappers over the Linux calls the load generator needs: the
//! system-wide monotonic clock, epoll, signals and CPU accounting.

use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, Ordering};

/// CLOCK_MONOTONIC in nanoseconds. It is one clock for every process on the
/// host, so a worker can subtract a timestamp the parent wrote into a
/// publication.
pub fn monotonic_ns() -> u64 {
    let mut time = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `time` is a valid timespec to write into; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut time) };
    (time.tv_sec as u64).saturating_mul(1_000_000_000).saturating_add(time.tv_nsec as u64)
}

/// The server's epoll wrapper; the load generator registers level-triggered
/// (a connection that still has bytes after one read is reported again,
/// which keeps the loop fair).
pub use kometa_sys::Epoll;

pub const READABLE: u32 = libc::EPOLLIN as u32;
pub const WRITABLE: u32 = libc::EPOLLOUT as u32;
pub const HANGUP: u32 = (libc::EPOLLHUP | libc::EPOLLERR) as u32;

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_stop_signal(_signal: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

/// Makes SIGINT and SIGTERM set a flag instead of killing the process, so a
/// run that is interrupted still closes its sockets and prints a report.
pub fn install_stop_handler() {
    for signal in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe;
        // `action` is fully initialised before sigaction reads it.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_stop_signal as *const () as usize;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(signal, &action, std::ptr::null_mut());
        }
    }
}

pub fn stop_requested() -> bool {
    STOP.load(Ordering::Relaxed)
}

/// CPU time (user + system) of this process, or of its waited-for children.
pub fn cpu_ns(children: bool) -> u64 {
    let who = if children { libc::RUSAGE_CHILDREN } else { libc::RUSAGE_SELF };
    // SAFETY: `usage` is a valid rusage to write into.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(who, &mut usage);
        usage
    };
    let micros = |t: libc::timeval| (t.tv_sec as u64).saturating_mul(1_000_000).saturating_add(t.tv_usec as u64);
    micros(usage.ru_utime).saturating_add(micros(usage.ru_stime)).saturating_mul(1000)
}

pub fn stderr_is_tty() -> bool {
    // SAFETY: isatty only inspects the descriptor.
    unsafe { libc::isatty(libc::STDERR_FILENO) == 1 }
}

pub fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl on a descriptor this process owns.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags < 0 || libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The soft limit on open files of this process.
pub fn open_files_limit() -> u64 {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: `limit` is a valid rlimit to write into.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } < 0 {
        return 1024;
    }
    limit.rlim_cur
}

/// Raises the soft open-files limit to the hard limit (workers need all of it).
pub fn raise_open_files_limit() {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: valid rlimit pointers; failure leaves the limit as it was.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

/// Opts this process out of transparent huge pages. The binary's allocator
/// (mimalloc) marks its arena `MADV_HUGEPAGE`, and with THP in `madvise`
/// mode khugepaged then backs it with 2 MiB pages: a worker holding 15,000
/// idle clients measured 12 MiB of RSS, all of it huge pages, which is what
/// the generator's memory per connection would report. Best effort, as in
/// the server.
pub fn disable_transparent_huge_pages() {
    // SAFETY: PR_SET_THP_DISABLE takes plain integers and changes only a flag of this process.
    unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
}

/// A short stable name for a socket error, used as a key in the report.
pub fn error_kind(error: &io::Error) -> String {
    match error.raw_os_error() {
        Some(libc::ECONNREFUSED) => "refused".into(),
        Some(libc::ECONNRESET) | Some(libc::EPIPE) => "reset".into(),
        Some(libc::ETIMEDOUT) => "timeout".into(),
        Some(libc::EADDRNOTAVAIL) => "no_source_port".into(),
        Some(libc::EADDRINUSE) => "address_in_use".into(),
        Some(libc::EMFILE) | Some(libc::ENFILE) => "fd_limit".into(),
        Some(libc::ENETUNREACH) | Some(libc::EHOSTUNREACH) => "unreachable".into(),
        Some(libc::ENOBUFS) | Some(libc::ENOMEM) => "no_memory".into(),
        Some(errno) => format!("errno_{errno}"),
        None => match error.kind() {
            io::ErrorKind::UnexpectedEof => "eof".into(),
            io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => "timeout".into(),
            _ => "io".into(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn monotonic_clock_advances() {
        let a = monotonic_ns();
        std::thread::sleep(std::time::Duration::from_millis(2));
        let b = monotonic_ns();
        assert!(b >= a + 1_000_000, "{a} {b}");
    }

    #[test]
    fn error_kinds_are_stable_names() {
        assert_eq!(error_kind(&io::Error::from_raw_os_error(libc::ECONNREFUSED)), "refused");
        assert_eq!(error_kind(&io::Error::from_raw_os_error(libc::EADDRNOTAVAIL)), "no_source_port");
        assert_eq!(error_kind(&io::Error::from_raw_os_error(libc::EPROTO)), format!("errno_{}", libc::EPROTO));
    }
}

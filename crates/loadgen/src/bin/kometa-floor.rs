//! `kometa-floor`: the floor for fan-out benchmarks (scripts/bench-peers.sh).
//!
//! The least a WebSocket broadcast can cost: it accepts upgrades on any path,
//! holds the sockets, and on `POST /pub/...` encodes the body once as a text
//! frame and writes it to every socket with `send` in a plain loop. No
//! channels, no queues, no backpressure (a socket that cannot take the frame
//! at once is counted and skipped). One thread per core, each with its own
//! SO_REUSEPORT listener and epoll set, like Kometa's shards; a publication
//! reaches the other threads through a queue and an eventfd.
//!
//! ```text
//! kometa-floor [--listen 127.0.0.1:0] [--threads N]
//! ```

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use kometa_protocol::http::{parse_head, HeadLimits, Method};
use kometa_protocol::ws;
use socket2::{Domain, Socket, Type};

const HEAD_LIMITS: HeadLimits = HeadLimits { head_bytes_max: 16 * 1024, headers_max: 64 };
const BODY_BYTES_MAX: usize = 1 << 20;
const TOKEN_LISTENER: u64 = u64::MAX;
const TOKEN_WAKE: u64 = u64::MAX - 1;

/// What every thread shares: their wake-ups and inboxes, and counters.
struct Shared {
    inboxes: Vec<Mutex<Vec<Arc<[u8]>>>>,
    wakeups: Vec<OwnedFd>,
    sockets: AtomicUsize,
    skipped: AtomicU64,
}

enum State {
    /// Reading an HTTP request (upgrade or publish).
    Http(Vec<u8>),
    WebSocket,
}

fn check(result: libc::c_int) -> io::Result<libc::c_int> {
    if result < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(result)
    }
}

fn epoll_add(epoll: RawFd, fd: RawFd, token: u64) -> io::Result<()> {
    let mut event = libc::epoll_event { events: (libc::EPOLLIN | libc::EPOLLRDHUP) as u32, u64: token };
    // SAFETY: a valid epoll_event for a valid epoll descriptor.
    check(unsafe { libc::epoll_ctl(epoll, libc::EPOLL_CTL_ADD, fd, &mut event) }).map(|_| ())
}

fn send(fd: RawFd, bytes: &[u8]) -> isize {
    // SAFETY: bytes is valid for reads of its length.
    unsafe { libc::send(fd, bytes.as_ptr().cast(), bytes.len(), libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) }
}

fn listener(address: SocketAddr) -> io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(address), Type::STREAM, None)?;
    socket.set_reuse_port(true)?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&address.into())?;
    socket.listen(4096)?;
    Ok(socket)
}

fn run_thread(index: usize, listener: Socket, shared: Arc<Shared>) -> io::Result<()> {
    // SAFETY: returns a new descriptor or -1.
    let epoll = unsafe { OwnedFd::from_raw_fd(check(libc::epoll_create1(libc::EPOLL_CLOEXEC))?) };
    epoll_add(epoll.as_raw_fd(), listener.as_raw_fd(), TOKEN_LISTENER)?;
    epoll_add(epoll.as_raw_fd(), shared.wakeups[index].as_raw_fd(), TOKEN_WAKE)?;
    let mut sockets: slab::Slab<(OwnedFd, State)> = slab::Slab::new();
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 256];
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        // SAFETY: events is a valid buffer of its length.
        let count = unsafe { libc::epoll_wait(epoll.as_raw_fd(), events.as_mut_ptr(), events.len() as i32, -1) };
        if count < 0 {
            continue;
        }
        for event in &events[..count as usize] {
            match event.u64 {
                TOKEN_LISTENER => loop {
                    // SAFETY: null addresses are allowed; returns a new descriptor or -1.
                    let fd = unsafe {
                        libc::accept4(
                            listener.as_raw_fd(),
                            std::ptr::null_mut(),
                            std::ptr::null_mut(),
                            libc::SOCK_NONBLOCK,
                        )
                    };
                    if fd < 0 {
                        break;
                    }
                    // SAFETY: a fresh descriptor we own.
                    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
                    let key = sockets.vacant_entry().key();
                    if epoll_add(epoll.as_raw_fd(), fd.as_raw_fd(), key as u64).is_ok() {
                        sockets.insert((fd, State::Http(Vec::new())));
                    }
                },
                TOKEN_WAKE => {
                    let mut value = 0u64;
                    // SAFETY: reads 8 bytes into a u64 from our eventfd.
                    unsafe { libc::read(shared.wakeups[index].as_raw_fd(), (&mut value as *mut u64).cast(), 8) };
                    let frames = std::mem::take(&mut *shared.inboxes[index].lock().unwrap_or_else(|e| e.into_inner()));
                    for frame in frames {
                        // The floor: one send per socket, nothing else.
                        for (_, (fd, state)) in sockets.iter() {
                            if matches!(state, State::WebSocket) && send(fd.as_raw_fd(), &frame) != frame.len() as isize
                            {
                                shared.skipped.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                }
                token => {
                    let key = token as usize;
                    let closed = match sockets.get_mut(key) {
                        Some((fd, state)) => serve(fd.as_raw_fd(), state, &mut buffer, &shared),
                        None => false,
                    };
                    if closed {
                        let (_, state) = sockets.remove(key);
                        if matches!(state, State::WebSocket) {
                            shared.sockets.fetch_sub(1, Ordering::Relaxed);
                        }
                    }
                }
            }
        }
    }
}

/// Reads from one socket; returns true when it closed.
fn serve(fd: RawFd, state: &mut State, buffer: &mut [u8], shared: &Shared) -> bool {
    loop {
        // SAFETY: buffer is valid for writes of its length.
        let read = unsafe { libc::recv(fd, buffer.as_mut_ptr().cast(), buffer.len(), libc::MSG_DONTWAIT) };
        if read == 0 {
            return true;
        }
        if read < 0 {
            return io::Error::last_os_error().kind() != io::ErrorKind::WouldBlock;
        }
        let State::Http(pending) = state else { continue };
        pending.extend_from_slice(&buffer[..read as usize]);
        loop {
            let request = match parse_head(pending, HEAD_LIMITS) {
                Ok(Some(request)) => request,
                Ok(None) => break,
                Err(_) => return true,
            };
            if request.method == Method::Post {
                let body_len = request.content_length.unwrap_or(0) as usize;
                if body_len > BODY_BYTES_MAX {
                    return true;
                }
                let end = request.head_len + body_len;
                if pending.len() < end {
                    break;
                }
                let frame: Arc<[u8]> = ws::encode_frame(ws::OPCODE_TEXT, &pending[request.head_len..end]).into();
                for (inbox, wakeup) in shared.inboxes.iter().zip(&shared.wakeups) {
                    inbox.lock().unwrap_or_else(|e| e.into_inner()).push(Arc::clone(&frame));
                    let one = 1u64;
                    // SAFETY: writes 8 bytes from a u64 to an eventfd.
                    unsafe { libc::write(wakeup.as_raw_fd(), (&one as *const u64).cast(), 8) };
                }
                let body = shared.sockets.load(Ordering::Relaxed).to_string();
                let response = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}", body.len());
                send(fd, response.as_bytes());
                pending.drain(..end);
            } else {
                let Ok(upgrade) = ws::check_upgrade(&request, &[], true) else { return true };
                let mut response = Vec::new();
                ws::write_upgrade_response(&mut response, &upgrade);
                send(fd, &response);
                shared.sockets.fetch_add(1, Ordering::Relaxed);
                *state = State::WebSocket;
                break;
            }
        }
    }
}

fn main() {
    let mut address: SocketAddr = SocketAddr::from(([127, 0, 0, 1], 0));
    let mut threads = std::thread::available_parallelism().map_or(1, usize::from);
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match (arg.as_str(), args.next()) {
            ("--listen", Some(value)) => address = value.parse().expect("--listen ADDR:PORT"),
            ("--threads", Some(value)) => threads = value.parse().expect("--threads N"),
            _ => {
                eprintln!("usage: kometa-floor [--listen ADDR:PORT] [--threads N]");
                std::process::exit(2);
            }
        }
    }
    let first = listener(address).expect("listen");
    let bound = first.local_addr().ok().and_then(|a| a.as_socket()).expect("address");
    let mut listeners = vec![first];
    for _ in 1..threads {
        listeners.push(listener(bound).expect("listen"));
    }
    let shared = Arc::new(Shared {
        inboxes: (0..threads).map(|_| Mutex::new(Vec::new())).collect(),
        wakeups: (0..threads)
            .map(|_| {
                // SAFETY: returns a new descriptor or -1 (checked).
                let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
                assert!(fd >= 0, "eventfd");
                // SAFETY: a fresh descriptor we own.
                unsafe { OwnedFd::from_raw_fd(fd) }
            })
            .collect(),
        sockets: AtomicUsize::new(0),
        skipped: AtomicU64::new(0),
    });
    println!("floor ready listen={bound} threads={threads}");
    let handles: Vec<_> = listeners
        .into_iter()
        .enumerate()
        .map(|(index, listener)| {
            let shared = Arc::clone(&shared);
            std::thread::spawn(move || run_thread(index, listener, shared))
        })
        .collect();
    for handle in handles {
        if let Ok(Err(error)) = handle.join() {
            eprintln!("floor: {error}");
        }
    }
}

//! One connection to one Redis, used for everything: commands, scripts and
//! pub/sub (RESP3 lets one connection do both). Kometa drives it itself with
//! redis-rs's command packing and parser rather than one of redis-rs's
//! connection types, for one property those do not give: **order**. Redis
//! writes replies and pub/sub pushes to a connection in the order it ran
//! them; a single reader that hands every value on in that order lets a
//! shard that gets a reply know it has already got every publication made
//! before it (docs/cluster.md, "Ordering"). redis-rs's multiplexed
//! connection resolves replies and pushes through different channels, and
//! its standalone connection cannot SSUBSCRIBE.
//!
//! Threads: a connect thread opens the socket, says HELLO 3, loads the
//! scripts, then becomes the connection's reader, blocking in the parser
//! and posting each value to the gateway. The gateway writes commands with
//! non-blocking sends from its own thread and keeps what the socket does
//! not take yet; it never waits on Redis.

use std::io::{BufReader, Write};
use std::net::{Shutdown, SocketAddr, TcpStream, ToSocketAddrs};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::Sender;
use redis::{ConnectionAddr, IntoConnectionInfo, Value};

use super::scripts::SCRIPTS;
use crate::bus::Wakeup;

/// Bytes the reader takes from the socket per read.
const READ_BUFFER_BYTES: usize = 256 * 1024;

/// Where and how to connect, from a `redis://` URL.
#[derive(Debug, Clone)]
pub struct Target {
    pub url: String,
    host: String,
    port: u16,
    db: i64,
    username: Option<String>,
    password: Option<String>,
}

impl Target {
    pub fn parse(url: &str) -> Result<Target, String> {
        let info = url.into_connection_info().map_err(|e| format!("`{url}`: {e}"))?;
        let (host, port) = match info.addr() {
            ConnectionAddr::Tcp(host, port) => (host.clone(), *port),
            _ => return Err(format!("`{url}`: only redis://HOST:PORT is supported")),
        };
        let settings = info.redis_settings();
        Ok(Target {
            url: url.to_owned(),
            host,
            port,
            db: settings.db(),
            username: settings.username().map(str::to_owned),
            password: settings.password().map(str::to_owned),
        })
    }

    /// The URL without a password, for logs and /health.
    pub fn display(&self) -> String {
        format!("redis://{}:{}/{}", self.host, self.port, self.db)
    }
}

/// What the reader and connect threads tell the gateway. `generation`
/// tells a live connection of an instance from earlier ones.
#[derive(Debug)]
pub enum LinkEvent {
    Connected { instance: usize, generation: u64, link: Link },
    ConnectFailed { instance: usize, generation: u64, error: String },
    Value { instance: usize, generation: u64, value: Value },
    Closed { instance: usize, generation: u64, error: String },
}

/// Where link events go: a queue and the gateway's wake-up.
#[derive(Clone)]
pub struct EventSink {
    pub sender: Sender<LinkEvent>,
    pub wakeup: Arc<Wakeup>,
}

impl EventSink {
    fn post(&self, event: LinkEvent) -> bool {
        let sent = self.sender.send(event).is_ok();
        self.wakeup.wake();
        sent
    }
}

/// The gateway's side of a connection: the socket for writing, and the
/// bytes not yet written.
#[derive(Debug)]
pub struct Link {
    stream: TcpStream,
    output: Vec<u8>,
    /// Bytes of `output` already written.
    written: usize,
    /// Redis 7+: sharded pub/sub (SSUBSCRIBE/SPUBLISH).
    pub sharded_pubsub: bool,
    /// This Redis process's run id: it changes when Redis restarts (from a
    /// snapshot, perhaps older than what nodes saw) or fails over to a
    /// replica. Channels whose epoch was written under another run id get a
    /// new epoch (scripts.rs), so reused offsets never pass for old ones.
    pub run_id: String,
}

impl Link {
    /// Queues a command; it goes out on the next `flush`.
    pub fn queue(&mut self, command: &redis::Cmd) {
        command.write_packed_command(&mut self.output);
    }

    /// Writes what the socket takes without blocking (`sys::send` uses
    /// MSG_DONTWAIT, while the reader thread blocks in recv on the same
    /// socket). Returns false when the connection is broken.
    pub fn flush(&mut self) -> bool {
        while self.written < self.output.len() {
            match kometa_sys::send(self.stream.as_raw_fd(), &self.output[self.written..]) {
                Ok(sent) => self.written += sent,
                Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(error) if error.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => return false,
            }
        }
        if self.written == self.output.len() {
            self.output.clear();
            self.written = 0;
            if self.output.capacity() > 1 << 20 {
                self.output.shrink_to(64 * 1024);
            }
        }
        true
    }

    /// Bytes queued but not yet written.
    pub fn unwritten(&self) -> usize {
        self.output.len() - self.written
    }

    pub fn fd(&self) -> std::os::fd::RawFd {
        self.stream.as_raw_fd()
    }

    /// Ends the connection; its reader thread then reports `Closed`.
    pub fn close(&self) {
        let _ = self.stream.shutdown(Shutdown::Both);
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.close();
    }
}

/// Opens a connection on a thread of its own, which then reads it until it
/// closes. Every outcome arrives as a `LinkEvent`, except a thread that
/// cannot start: that is the caller's error (posting it from the gateway's
/// own thread could wait on the queue only the gateway drains).
pub fn spawn(
    instance: usize,
    generation: u64,
    target: Target,
    timeout: Duration,
    client_name: String,
    sink: EventSink,
) -> Result<(), String> {
    let spawned = std::thread::Builder::new().name(format!("kometa-redis-{instance}")).spawn({
        let sink = sink.clone();
        move || match open(&target, timeout, &client_name) {
            Err(error) => {
                sink.post(LinkEvent::ConnectFailed { instance, generation, error });
            }
            Ok((link, reader)) => {
                if sink.post(LinkEvent::Connected { instance, generation, link }) {
                    read_until_closed(instance, generation, reader, &sink);
                }
            }
        }
    });
    spawned.map(drop).map_err(|error| format!("cannot start a thread: {error}"))
}

fn resolve(target: &Target) -> Result<SocketAddr, String> {
    (target.host.as_str(), target.port)
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {}: {e}", target.host))?
        .next()
        .ok_or_else(|| format!("{} resolves to no address", target.host))
}

/// Connects, switches to RESP3, authenticates, selects the database and
/// loads the scripts, all within `timeout`.
fn open(target: &Target, timeout: Duration, client_name: &str) -> Result<(Link, BufReader<TcpStream>), String> {
    let address = resolve(target)?;
    let stream =
        TcpStream::connect_timeout(&address, timeout).map_err(|e| format!("cannot connect to {address}: {e}"))?;
    let _ = stream.set_nodelay(true);
    stream.set_read_timeout(Some(timeout)).map_err(|e| e.to_string())?;
    stream.set_write_timeout(Some(timeout)).map_err(|e| e.to_string())?;

    let mut hello = redis::cmd("HELLO");
    hello.arg(3);
    if let Some(password) = &target.password {
        hello.arg("AUTH").arg(target.username.as_deref().unwrap_or("default")).arg(password);
    }
    hello.arg("SETNAME").arg(client_name);
    let mut handshake: Vec<redis::Cmd> = vec![hello];
    if target.db != 0 {
        let mut select = redis::cmd("SELECT");
        select.arg(target.db);
        handshake.push(select);
    }
    for script in SCRIPTS.all() {
        let mut load = redis::cmd("SCRIPT");
        load.arg("LOAD").arg(script.source);
        handshake.push(load);
    }
    let mut info = redis::cmd("INFO");
    info.arg("server");
    handshake.push(info);
    let mut bytes = Vec::new();
    for command in &handshake {
        command.write_packed_command(&mut bytes);
    }
    (&stream).write_all(&bytes).map_err(|e| format!("cannot write to {address}: {e}"))?;

    let mut reader = BufReader::with_capacity(READ_BUFFER_BYTES, stream.try_clone().map_err(|e| e.to_string())?);
    let mut parser = redis::Parser::new();
    let mut version = String::new();
    let mut run_id = String::new();
    for (index, _) in handshake.iter().enumerate() {
        let value = parser.parse_value(&mut reader).map_err(|e| format!("{address}: {e}"))?;
        if let Value::ServerError(error) = &value {
            let what = if index == 0 { "HELLO 3 (Redis 6.2 or later is needed)" } else { "handshake" };
            return Err(format!("{address}: {what} refused: {error:?}"));
        }
        if index == 0 {
            version = hello_version(&value).unwrap_or_default();
        }
        if index == handshake.len() - 1 {
            run_id = info_field(&value, "run_id").unwrap_or_default();
        }
    }
    if run_id.is_empty() {
        return Err(format!("{address}: INFO server gave no run_id"));
    }
    stream.set_read_timeout(None).map_err(|e| e.to_string())?;
    let major: u32 = version.split('.').next().and_then(|v| v.parse().ok()).unwrap_or(0);
    tracing::info!(redis = %target.display(), %version, "connected to Redis");
    Ok((Link { stream, output: Vec::new(), written: 0, sharded_pubsub: major >= 7, run_id }, reader))
}

/// A `field:value` line of an INFO reply.
fn info_field(value: &Value, field: &str) -> Option<String> {
    let text = match value {
        Value::BulkString(bytes) => String::from_utf8_lossy(bytes).into_owned(),
        Value::VerbatimString { text, .. } => text.clone(),
        Value::SimpleString(text) => text.clone(),
        _ => return None,
    };
    let prefix = format!("{field}:");
    text.lines().find_map(|line| line.strip_prefix(&prefix).map(|v| v.trim().to_owned()))
}

/// The `version` field of a HELLO reply.
fn hello_version(value: &Value) -> Option<String> {
    let Value::Map(fields) = value else { return None };
    fields.iter().find_map(|(key, value)| match (key, value) {
        (Value::BulkString(key), Value::BulkString(version)) if key == b"version" => {
            String::from_utf8(version.clone()).ok()
        }
        (Value::SimpleString(key), Value::SimpleString(version)) if key == "version" => Some(version.clone()),
        (Value::BulkString(key), Value::SimpleString(version)) if key == b"version" => Some(version.clone()),
        _ => None,
    })
}

fn read_until_closed(instance: usize, generation: u64, mut reader: BufReader<TcpStream>, sink: &EventSink) {
    let mut parser = redis::Parser::new();
    loop {
        match parser.parse_value(&mut reader) {
            Ok(value) => {
                if !sink.post(LinkEvent::Value { instance, generation, value }) {
                    return;
                }
            }
            Err(error) => {
                sink.post(LinkEvent::Closed { instance, generation, error: error.to_string() });
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_from_urls() {
        let target = Target::parse("redis://:secret@127.0.0.1:6380/2").unwrap();
        assert_eq!((target.host.as_str(), target.port, target.db), ("127.0.0.1", 6380, 2));
        assert_eq!(target.password.as_deref(), Some("secret"));
        assert_eq!(target.display(), "redis://127.0.0.1:6380/2");
        assert!(Target::parse("redis+unix:///tmp/r.sock").is_err());
        assert!(Target::parse("nonsense").is_err());
    }
}

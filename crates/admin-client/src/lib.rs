//! A blocking client for Kometa's admin socket (docs/admin-protocol.md):
//! what the `kometa` CLI, the load generator and the tests use, and a
//! reference for clients in other languages. Frames come from
//! `kometa-protocol`; this crate adds the socket.

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use kometa_protocol::admin::{
    decode_error, decode_published, json_payload, opcode, split_frame, stats_scope, AdminError, FrameWriter, RawFrame,
    STATUS_ERROR, STATUS_OK,
};
use serde::{Deserialize, Deserializer};

pub use kometa_protocol::admin::Published;

/// Where the admin listener is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdminAddress {
    /// A Unix socket, created with mode 0600.
    Unix(PathBuf),
    /// TCP; requires `admin_key`.
    Tcp(SocketAddr),
    /// TCP with TLS; requires `admin_key`. `host` is a name or an address
    /// (IPv6 in brackets): the client checks the server's certificate
    /// against it; the server binds what it resolves to.
    Tls { host: String, port: u16 },
}

impl AdminAddress {
    /// Parses `unix:PATH`, `tcp:ADDR:PORT` or `tls:HOST:PORT`.
    pub fn parse(text: &str) -> Result<AdminAddress, String> {
        if let Some(path) = text.strip_prefix("unix:") {
            if path.is_empty() {
                return Err("unix: needs a path, for example unix:/run/kometa/admin.sock".into());
            }
            Ok(AdminAddress::Unix(PathBuf::from(path)))
        } else if let Some(address) = text.strip_prefix("tcp:") {
            address
                .parse()
                .map(AdminAddress::Tcp)
                .map_err(|_| format!("`{address}` is not an ADDR:PORT socket address"))
        } else if let Some(address) = text.strip_prefix("tls:") {
            let parsed = address.rsplit_once(':').and_then(|(host, port)| Some((host, port.parse::<u16>().ok()?)));
            match parsed {
                Some((host, port)) if !host.is_empty() => Ok(AdminAddress::Tls { host: host.to_owned(), port }),
                _ => Err(format!("`{address}` is not HOST:PORT (IPv6 in brackets)")),
            }
        } else {
            Err(format!("`{text}` must start with unix:, tcp: or tls:"))
        }
    }

    /// `tls:`: the socket addresses the host resolves to.
    pub fn resolve_tls(host: &str, port: u16) -> io::Result<Vec<SocketAddr>> {
        use std::net::ToSocketAddrs;
        let bare = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
        Ok((bare, port).to_socket_addrs()?.collect())
    }
}

impl fmt::Display for AdminAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AdminAddress::Unix(path) => write!(f, "unix:{}", path.display()),
            AdminAddress::Tcp(address) => write!(f, "tcp:{address}"),
            AdminAddress::Tls { host, port } => write!(f, "tls:{host}:{port}"),
        }
    }
}

impl<'de> Deserialize<'de> for AdminAddress {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        AdminAddress::parse(&text).map_err(serde::de::Error::custom)
    }
}

/// The default admin socket path: in `$XDG_RUNTIME_DIR` when set (per-user,
/// private), else in the temp directory.
pub fn default_admin_address() -> AdminAddress {
    let directory = std::env::var_os("XDG_RUNTIME_DIR")
        .map(PathBuf::from)
        .filter(|dir| dir.is_dir())
        .unwrap_or_else(std::env::temp_dir);
    AdminAddress::Unix(directory.join("kometa-admin.sock"))
}

/// Replies larger than this are refused by the client (a STATS document of
/// a few hundred shards is well under it).
const REPLY_BYTES_MAX: usize = 64 << 20;

#[derive(Debug)]
pub enum ClientError {
    Io(io::Error),
    /// The server answered with an error.
    Server(AdminError),
    /// The server's reply did not follow the protocol.
    Protocol(String),
}

impl fmt::Display for ClientError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientError::Io(error) => write!(f, "admin socket: {error}"),
            ClientError::Server(error) => write!(f, "server error {error}"),
            ClientError::Protocol(what) => write!(f, "admin protocol: {what}"),
        }
    }
}

impl std::error::Error for ClientError {}

impl From<io::Error> for ClientError {
    fn from(error: io::Error) -> Self {
        ClientError::Io(error)
    }
}

impl From<AdminError> for ClientError {
    fn from(error: AdminError) -> Self {
        ClientError::Protocol(error.to_string())
    }
}

enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>),
}

impl Read for Stream {
    fn read(&mut self, buffer: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(stream) => stream.read(buffer),
            Stream::Tcp(stream) => stream.read(buffer),
            Stream::Tls(stream) => stream.read(buffer),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buffer: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(stream) => stream.write(buffer),
            Stream::Tcp(stream) => stream.write(buffer),
            Stream::Tls(stream) => stream.write(buffer),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Unix(stream) => stream.flush(),
            Stream::Tcp(stream) => stream.flush(),
            Stream::Tls(stream) => stream.flush(),
        }
    }
}

mod tls {
    use std::io;
    use std::net::TcpStream;
    use std::path::Path;
    use std::sync::Arc;
    use std::time::Duration;

    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, ServerName};

    use super::AdminAddress;

    fn invalid(message: String) -> io::Error {
        io::Error::new(io::ErrorKind::InvalidInput, message)
    }

    /// A TLS connection to `host:port`, the certificate checked for `host`.
    pub fn connect(
        host: &str,
        port: u16,
        timeout: Duration,
        ca_file: Option<&Path>,
    ) -> io::Result<rustls::StreamOwned<rustls::ClientConnection, TcpStream>> {
        let mut roots = rustls::RootCertStore::empty();
        match ca_file {
            Some(path) => {
                let certificates = CertificateDer::pem_file_iter(path)
                    .map_err(|e| invalid(format!("KOMETA_ADMIN_CA: cannot read {}: {e}", path.display())))?;
                for certificate in certificates {
                    let certificate =
                        certificate.map_err(|e| invalid(format!("KOMETA_ADMIN_CA: {}: {e}", path.display())))?;
                    roots.add(certificate).map_err(|e| invalid(format!("KOMETA_ADMIN_CA: {}: {e}", path.display())))?;
                }
                if roots.is_empty() {
                    return Err(invalid(format!("KOMETA_ADMIN_CA: {} holds no certificate", path.display())));
                }
            }
            None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
        }
        #[allow(deprecated)] // ring, as the server: see src/tls/mod.rs
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| invalid(format!("tls: {e}")))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let bare = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
        let name = ServerName::try_from(bare.to_owned())
            .map_err(|_| invalid(format!("`{host}` is not a host name or address")))?;
        let connection =
            rustls::ClientConnection::new(Arc::new(config), name).map_err(|e| invalid(format!("tls: {e}")))?;
        let mut last_error = None;
        for address in AdminAddress::resolve_tls(host, port)? {
            match TcpStream::connect_timeout(&address, timeout) {
                Ok(socket) => {
                    socket.set_read_timeout(Some(timeout))?;
                    socket.set_write_timeout(Some(timeout))?;
                    socket.set_nodelay(true)?;
                    let mut stream = rustls::StreamOwned::new(connection, socket);
                    // The handshake now, so a wrong certificate fails here, clearly.
                    while stream.conn.is_handshaking() {
                        stream
                            .conn
                            .complete_io(&mut stream.sock)
                            .map_err(|e| io::Error::new(e.kind(), format!("TLS handshake with {host}:{port}: {e}")))?;
                    }
                    return Ok(stream);
                }
                Err(error) => {
                    last_error = Some(io::Error::new(error.kind(), format!("cannot connect to {address}: {error}")))
                }
            }
        }
        Err(last_error.unwrap_or_else(|| invalid(format!("{host} resolves to no address"))))
    }
}

/// One decoded reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub opcode: u8,
    pub request_id: u32,
    /// The OK payload, or the server's error.
    pub result: Result<Vec<u8>, AdminError>,
}

pub struct AdminClient {
    stream: Stream,
    next_request_id: u32,
    input: Vec<u8>,
}

impl AdminClient {
    /// Connects, and authenticates when `key` is given. A `tls:` address
    /// is checked against the CA certificates in the PEM file named by
    /// `KOMETA_ADMIN_CA` when set, else against the public web roots.
    pub fn connect(address: &AdminAddress, key: Option<&str>, timeout: Duration) -> Result<AdminClient, ClientError> {
        let ca_file = std::env::var_os("KOMETA_ADMIN_CA").map(PathBuf::from);
        AdminClient::connect_with_ca(address, key, timeout, ca_file.as_deref())
    }

    /// `connect`, with the CA file for a `tls:` address given (None: the
    /// public web roots).
    pub fn connect_with_ca(
        address: &AdminAddress,
        key: Option<&str>,
        timeout: Duration,
        ca_file: Option<&std::path::Path>,
    ) -> Result<AdminClient, ClientError> {
        let stream = match address {
            AdminAddress::Unix(path) => {
                let stream = UnixStream::connect(path)
                    .map_err(|e| io::Error::new(e.kind(), format!("cannot connect to {}: {e}", path.display())))?;
                stream.set_read_timeout(Some(timeout))?;
                stream.set_write_timeout(Some(timeout))?;
                Stream::Unix(stream)
            }
            AdminAddress::Tcp(socket) => {
                let stream = TcpStream::connect_timeout(socket, timeout)
                    .map_err(|e| io::Error::new(e.kind(), format!("cannot connect to {socket}: {e}")))?;
                stream.set_read_timeout(Some(timeout))?;
                stream.set_write_timeout(Some(timeout))?;
                stream.set_nodelay(true)?;
                Stream::Tcp(stream)
            }
            AdminAddress::Tls { host, port } => Stream::Tls(Box::new(tls::connect(host, *port, timeout, ca_file)?)),
        };
        let mut client = AdminClient { stream, next_request_id: 1, input: Vec::new() };
        if let Some(key) = key {
            client.call(opcode::AUTH, |w| {
                w.str16(key);
            })?;
        }
        Ok(client)
    }

    /// Sends one request without waiting; returns its request id. Read the
    /// replies (`receive`) while sending more: the server answers a batch
    /// before it reads on, so an unbounded run of sends can deadlock once
    /// both socket buffers fill.
    pub fn send(&mut self, op: u8, payload: impl FnOnce(&mut FrameWriter)) -> io::Result<u32> {
        let request_id = self.next_request_id;
        self.next_request_id = self.next_request_id.wrapping_add(1);
        let mut writer = FrameWriter::request(op, request_id);
        payload(&mut writer);
        self.stream.write_all(&writer.finish())?;
        Ok(request_id)
    }

    /// Sends raw bytes (tests use this for malformed frames).
    pub fn send_raw(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes)
    }

    /// Reads the next reply, in the order requests were sent.
    pub fn receive(&mut self) -> Result<Reply, ClientError> {
        loop {
            if let Some((frame, used)) =
                split_frame(&self.input, REPLY_BYTES_MAX).map_err(|e| ClientError::Protocol(e.0))?
            {
                let reply = decode_reply(frame)?;
                self.input.drain(..used);
                return Ok(reply);
            }
            let mut chunk = [0u8; 16 * 1024];
            let count = self.stream.read(&mut chunk)?;
            if count == 0 {
                return Err(ClientError::Io(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "server closed the admin connection",
                )));
            }
            self.input.extend_from_slice(&chunk[..count]);
        }
    }

    /// Sends a request and returns its OK payload.
    pub fn call(&mut self, op: u8, payload: impl FnOnce(&mut FrameWriter)) -> Result<Vec<u8>, ClientError> {
        let request_id = self.send(op, payload)?;
        let reply = self.receive()?;
        if reply.request_id != request_id {
            return Err(ClientError::Protocol(format!(
                "reply for request {} while waiting for {request_id}",
                reply.request_id
            )));
        }
        reply.result.map_err(ClientError::Server)
    }

    pub fn ping(&mut self) -> Result<(), ClientError> {
        self.call(opcode::PING, |_| {}).map(|_| ())
    }

    /// Publishes `data` (JSON) to `channel` as `event`.
    pub fn publish(&mut self, channel: &str, event: &str, data: &[u8]) -> Result<Published, ClientError> {
        let payload = self.call(opcode::PUBLISH, |w| {
            w.str16(channel).str16(event).bytes32(data);
        })?;
        Ok(decode_published(&payload)?)
    }

    /// Publishes `data` to each of `channels` (one offset in each):
    /// `{"results":[{"channel":…,"offset":…,…} or {"channel":…,"error":{…}}]}`.
    pub fn publish_many(
        &mut self,
        channels: &[&str],
        event: &str,
        data: &[u8],
    ) -> Result<serde_json::Value, ClientError> {
        // More than u16::MAX channels cannot be said; the server's own cap
        // (limits.query_items_max) is far below it.
        let channels = &channels[..channels.len().min(usize::from(u16::MAX))];
        self.call_json(opcode::PUBLISH_MANY, |w| {
            w.u16(channels.len() as u16);
            for channel in channels {
                w.str16(channel);
            }
            w.str16(event).bytes32(data);
        })
    }

    /// Server statistics as a JSON document.
    pub fn stats(&mut self) -> Result<serde_json::Value, ClientError> {
        self.call_json(opcode::STATS, |_| {})
    }

    /// This node's statistics only (in cluster mode STATS sums every node's):
    /// a per-node probe that asks nothing of Redis or the other nodes.
    pub fn stats_node(&mut self) -> Result<serde_json::Value, ClientError> {
        self.call_json(opcode::STATS, |w| {
            w.u8(stats_scope::NODE);
        })
    }

    /// Re-reads the server's configuration, as SIGHUP does:
    /// `{"reloaded":true,"restart_needed":[keys]}`, or `BadArgument` naming
    /// the key when the file is refused (the running one stays).
    pub fn reload(&mut self) -> Result<serde_json::Value, ClientError> {
        self.call_json(opcode::RELOAD, |_| {})
    }

    /// Sends a request whose OK payload is a JSON document.
    pub fn call_json(
        &mut self,
        op: u8,
        payload: impl FnOnce(&mut FrameWriter),
    ) -> Result<serde_json::Value, ClientError> {
        Ok(json_payload(&self.call(op, payload)?)?)
    }

    /// A message to each user's connections (stored in their inboxes).
    pub fn send_user(&mut self, users: &[&str], event: &str, data: &[u8]) -> Result<serde_json::Value, ClientError> {
        self.call_json(opcode::SEND_USER, |w| {
            write_users(w, users);
            w.str16(event).bytes32(data);
        })
    }

    /// One page of a channel's members; `cursor` "" starts at the beginning, `limit` 0 means the server's maximum.
    pub fn presence(&mut self, channel: &str, cursor: &str, limit: u32) -> Result<serde_json::Value, ClientError> {
        self.call_json(opcode::PRESENCE, |w| {
            w.str16(channel).str16(cursor).u32(limit);
        })
    }

    pub fn presence_stats(&mut self, channel: &str) -> Result<serde_json::Value, ClientError> {
        self.call_json(opcode::PRESENCE_STATS, |w| {
            w.str16(channel);
        })
    }

    pub fn user_status(&mut self, users: &[&str]) -> Result<serde_json::Value, ClientError> {
        self.call_json(opcode::USER_STATUS, |w| write_users(w, users))
    }

    pub fn channel_info(&mut self, channel: &str) -> Result<serde_json::Value, ClientError> {
        self.call_json(opcode::CHANNEL_INFO, |w| {
            w.str16(channel);
        })
    }

    pub fn channels(&mut self, prefix: &str, cursor: &str, limit: u32) -> Result<serde_json::Value, ClientError> {
        self.call_json(opcode::CHANNELS, |w| {
            w.str16(prefix).str16(cursor).u32(limit);
        })
    }

    /// Publications after offset `since` (0: all retained), at most `limit` (0: the server's maximum).
    pub fn history(&mut self, channel: &str, since: u64, limit: u32) -> Result<serde_json::Value, ClientError> {
        self.call_json(opcode::HISTORY, |w| {
            w.str16(channel).u64(since).u32(limit);
        })
    }

    /// Closes every connection of `user` (`code` 0: 4003); with
    /// `revoke_before_s` > 0, tokens issued before that Unix time are refused.
    pub fn disconnect(
        &mut self,
        user: &str,
        code: u16,
        reason: &str,
        revoke_before_s: u64,
    ) -> Result<serde_json::Value, ClientError> {
        self.call_json(opcode::DISCONNECT, |w| {
            w.str16(user).u16(code).str16(reason).u64(revoke_before_s);
        })
    }
}

fn write_users(writer: &mut FrameWriter, users: &[&str]) {
    writer.u16(users.len().min(usize::from(u16::MAX)) as u16);
    for user in users.iter().take(usize::from(u16::MAX)) {
        writer.str16(user);
    }
}

fn decode_reply(frame: RawFrame<'_>) -> Result<Reply, ClientError> {
    let result = match frame.first {
        STATUS_OK => Ok(frame.payload.to_vec()),
        STATUS_ERROR => Err(decode_error(frame.payload)),
        status => return Err(ClientError::Protocol(format!("unknown reply status {status}"))),
    };
    Ok(Reply { opcode: frame.second, request_id: frame.request_id, result })
}

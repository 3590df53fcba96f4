//! The publisher: paced (or as fast as the server takes them) publications
//! carrying their send time, through Kometa's admin socket or an HTTP POST
//! endpoint, with a bounded window of requests in flight.

use std::collections::{BTreeMap, VecDeque};
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use kometa_admin_client::AdminAddress;
use kometa_admin_client::AdminClient;
use kometa_protocol::admin::decode_published;
use kometa_protocol::admin::opcode;

use super::hist::{Latency, Percentiles};
use super::ramp;
use super::scan::write_publication;
use super::sys;
use super::target::Rate;
use super::wire::Groups;

/// How long the publisher waits for one reply before giving up.
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest HTTP response head or body the publisher reads.
const HTTP_RESPONSE_BYTES_MAX: usize = 1 << 20;
/// A publication sent later than this after its slot counts as late.
const LATE_NS: u64 = 1_000_000;

/// The server's answer to one publication.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Accepted {
        offset: Option<u64>,
        subscribers: Option<u64>,
    },
    /// Not published; the kind names why (`overloaded`, `http_503`, …).
    Rejected(String),
}

/// Something that publishes, pipelined: replies come in request order.
pub trait Publisher {
    /// Publishes `data` to the broadcast channel (`group` None) or to a
    /// group channel (`--groups`; only the admin publisher has them).
    fn send(&mut self, group: Option<u32>, data: &[u8]) -> Result<(), String>;
    fn receive(&mut self) -> Result<Reply, String>;
}

/// Kometa's admin socket.
pub struct AdminPublisher {
    client: AdminClient,
    channel: String,
    /// `--groups`: the group channels, by group.
    group_channels: Vec<String>,
    event: String,
}

impl AdminPublisher {
    pub fn connect(
        address: &AdminAddress,
        key: Option<&str>,
        channel: &str,
        groups: Groups,
        event: &str,
    ) -> Result<Self, String> {
        let client = AdminClient::connect(address, key, REPLY_TIMEOUT).map_err(|e| e.to_string())?;
        let group_channels = (0..groups.count).map(|g| Groups::channel_name(channel, g)).collect();
        Ok(AdminPublisher { client, channel: channel.to_string(), group_channels, event: event.to_string() })
    }
}

impl Publisher for AdminPublisher {
    fn send(&mut self, group: Option<u32>, data: &[u8]) -> Result<(), String> {
        let channel = match group {
            None => &self.channel,
            Some(g) => self.group_channels.get(g as usize).ok_or_else(|| format!("no group channel {g}"))?,
        };
        let event = &self.event;
        self.client
            .send(opcode::PUBLISH, |w| {
                w.str16(channel).str16(event).bytes32(data);
            })
            .map(|_| ())
            .map_err(|e| format!("admin socket: {e}"))
    }

    fn receive(&mut self) -> Result<Reply, String> {
        let reply = self.client.receive().map_err(|e| e.to_string())?;
        match reply.result {
            Ok(payload) => {
                let published = decode_published(&payload).map_err(|e| e.to_string())?;
                Ok(Reply::Accepted { offset: Some(published.offset), subscribers: Some(published.subscribers) })
            }
            Err(error) => Ok(Reply::Rejected(error.code.as_str().to_string())),
        }
    }
}

/// HTTP POST over one keep-alive connection written by hand, pipelined.
pub struct HttpPublisher {
    address: SocketAddr,
    authority: String,
    path: String,
    stream: Option<TcpStream>,
    input: Vec<u8>,
}

impl HttpPublisher {
    pub fn new(address: SocketAddr, authority: &str, path: &str) -> HttpPublisher {
        HttpPublisher { address, authority: authority.into(), path: path.into(), stream: None, input: Vec::new() }
    }

    fn stream(&mut self) -> Result<&mut TcpStream, String> {
        if self.stream.is_none() {
            let stream = TcpStream::connect_timeout(&self.address, REPLY_TIMEOUT)
                .map_err(|e| format!("publish connection to {}: {e}", self.address))?;
            let _ = stream.set_nodelay(true);
            let _ = stream.set_read_timeout(Some(REPLY_TIMEOUT));
            let _ = stream.set_write_timeout(Some(REPLY_TIMEOUT));
            self.input.clear();
            self.stream = Some(stream);
        }
        self.stream.as_mut().ok_or_else(|| "no publish connection".to_string())
    }
}

impl Publisher for HttpPublisher {
    /// One URL, one channel: `--groups` is refused with `--publish-url`.
    fn send(&mut self, _group: Option<u32>, data: &[u8]) -> Result<(), String> {
        let mut request = format!(
            "POST {} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nAccept: application/json\r\nContent-Length: {}\r\n\r\n",
            self.path,
            self.authority,
            data.len()
        )
        .into_bytes();
        request.extend_from_slice(data);
        let stream = self.stream()?;
        if let Err(error) = stream.write_all(&request) {
            self.stream = None;
            return Err(format!("publish request: {error}"));
        }
        Ok(())
    }

    fn receive(&mut self) -> Result<Reply, String> {
        loop {
            if let Some((status, used, close)) = parse_http_response(&self.input)? {
                self.input.drain(..used);
                if close {
                    // Requests pipelined behind this one are lost; the next send reconnects.
                    self.stream = None;
                }
                return Ok(if (200..300).contains(&status) {
                    Reply::Accepted { offset: None, subscribers: None }
                } else {
                    Reply::Rejected(format!("http_{status}"))
                });
            }
            if self.input.len() > HTTP_RESPONSE_BYTES_MAX {
                return Err("publish response too large".into());
            }
            let Some(stream) = self.stream.as_mut() else {
                return Err("publish connection closed by the server".into());
            };
            let mut chunk = [0u8; 16 * 1024];
            match stream.read(&mut chunk) {
                Ok(0) => {
                    self.stream = None;
                    return Err("publish connection closed by the server".into());
                }
                Ok(count) => self.input.extend_from_slice(&chunk[..count]),
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                Err(error) => {
                    self.stream = None;
                    return Err(format!("publish response: {error}"));
                }
            }
        }
    }
}

/// One complete response at the start of `input`: (status, bytes used,
/// whether the server closes the connection after it). None: need more.
fn parse_http_response(input: &[u8]) -> Result<Option<(u16, usize, bool)>, String> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut response = httparse::Response::new(&mut headers);
    let head_len = match response.parse(input) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(error) => return Err(format!("bad publish response: {error}")),
    };
    let status = response.code.unwrap_or(0);
    let header = |name: &str| {
        response.headers.iter().find(|h| h.name.eq_ignore_ascii_case(name)).map(|h| String::from_utf8_lossy(h.value))
    };
    let close = header("connection").is_some_and(|v| v.eq_ignore_ascii_case("close"));
    let body = &input[head_len..];
    // 1xx, 204 and 304 have no body.
    if (100..200).contains(&status) || status == 204 || status == 304 {
        return Ok(Some((status, head_len, close)));
    }
    if header("transfer-encoding").is_some_and(|v| v.to_ascii_lowercase().contains("chunked")) {
        return Ok(chunked_body_len(body)?.map(|len| (status, head_len + len, close)));
    }
    let length: usize = match header("content-length") {
        Some(value) => value.trim().parse().map_err(|_| format!("bad Content-Length `{value}`"))?,
        None => return Err("publish response without Content-Length or chunked body".into()),
    };
    if length > HTTP_RESPONSE_BYTES_MAX {
        return Err("publish response too large".into());
    }
    Ok((body.len() >= length).then_some((status, head_len + length, close)))
}

/// Length of a complete chunked body (with its final CRLF), or None.
fn chunked_body_len(body: &[u8]) -> Result<Option<usize>, String> {
    let mut at = 0;
    loop {
        let Some(line_end) = body[at..].windows(2).position(|w| w == b"\r\n") else {
            return Ok(None);
        };
        let line = std::str::from_utf8(&body[at..at + line_end]).map_err(|_| "bad chunk size line")?;
        let size_text = line.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_text, 16).map_err(|_| format!("bad chunk size `{size_text}`"))?;
        if size > HTTP_RESPONSE_BYTES_MAX {
            return Err("publish response chunk too large".into());
        }
        at += line_end + 2;
        if size == 0 {
            // Trailers, then an empty line.
            loop {
                let Some(end) = body[at..].windows(2).position(|w| w == b"\r\n") else {
                    return Ok(None);
                };
                at += end + 2;
                if end == 0 {
                    return Ok(Some(at));
                }
            }
        }
        if body.len() < at + size + 2 {
            return Ok(None);
        }
        at += size + 2;
    }
}

/// How to publish.
#[derive(Debug, Clone, Copy)]
pub struct PublishPlan {
    pub rate: Rate,
    pub duration_ms: u64,
    pub publications_max: u64,
    /// Requests in flight at most.
    pub window: usize,
    pub payload_bytes: usize,
    /// Publication `seq` goes to `groups.of_publication(seq)`.
    pub groups: Groups,
    /// Nothing but the first publication for this long, so it reaches every
    /// subscriber alone (with groups: the broadcast to everyone, before the
    /// group channels' turns). The duration starts after it.
    pub pause_after_first_ms: u64,
}

impl PublishPlan {
    /// When publication `seq` is due, in nanoseconds after the start:
    /// `seq / rate`, and the pause on top for every one after the first.
    fn slot_ns(&self, seq: u64) -> u64 {
        let pause_ns = if seq == 0 { 0 } else { self.pause_after_first_ms.saturating_mul(1_000_000) };
        let paced_ns = match self.rate {
            Rate::Max => 0,
            Rate::PerSecond(rate) => (seq as f64 * 1e9 / rate).ceil() as u64,
        };
        pause_ns.saturating_add(paced_ns)
    }

    /// Publications due `elapsed_ns` after the start (at most `publications_max`).
    fn due(&self, elapsed_ns: u64) -> u64 {
        let pause_ns = self.pause_after_first_ms.saturating_mul(1_000_000);
        if elapsed_ns < pause_ns {
            return self.publications_max.min(1);
        }
        match self.rate {
            Rate::Max => self.publications_max,
            Rate::PerSecond(rate) => ramp::due(self.publications_max, rate, elapsed_ns - pause_ns),
        }
    }
}

/// What the publisher did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PublishOutcome {
    pub sent: u64,
    pub accepted: u64,
    pub rejected: BTreeMap<String, u64>,
    /// The error that stopped publishing early.
    pub error: Option<String>,
    /// Offsets of the broadcast channel.
    pub first_offset: Option<u64>,
    pub final_offset: Option<u64>,
    /// With groups: each group channel's last accepted offset, by group.
    pub group_final_offsets: Vec<Option<u64>>,
    /// Subscriber counts the server reported (Kometa).
    pub subscribers_min: Option<u64>,
    pub subscribers_max: Option<u64>,
    /// Sent more than 1 ms after their slot (the publisher or the server was behind).
    pub late: u64,
    pub started_ns: u64,
    pub ended_ns: u64,
    /// From sending a publication to the server's reply.
    pub ack: Percentiles,
}

impl PublishOutcome {
    fn account(&mut self, group: Option<u32>, reply: Reply) {
        match reply {
            Reply::Accepted { offset, subscribers } => {
                self.accepted += 1;
                match (offset, group) {
                    (Some(offset), None) => {
                        self.first_offset = Some(self.first_offset.map_or(offset, |o| o.min(offset)));
                        self.final_offset = Some(self.final_offset.map_or(offset, |o| o.max(offset)));
                    }
                    (Some(offset), Some(g)) => {
                        if let Some(slot) = self.group_final_offsets.get_mut(g as usize) {
                            *slot = Some(slot.map_or(offset, |o| o.max(offset)));
                        }
                    }
                    (None, _) => {}
                }
                if let Some(count) = subscribers {
                    self.subscribers_min = Some(self.subscribers_min.map_or(count, |c| c.min(count)));
                    self.subscribers_max = Some(self.subscribers_max.map_or(count, |c| c.max(count)));
                }
            }
            Reply::Rejected(kind) => *self.rejected.entry(kind).or_default() += 1,
        }
    }
}

/// Takes the oldest outstanding reply: its acknowledgement latency and
/// what it said.
fn take_reply(
    publisher: &mut dyn Publisher,
    in_flight: &mut VecDeque<(u64, Option<u32>)>,
    ack: &mut Latency,
    outcome: &mut PublishOutcome,
) -> Result<(), String> {
    let reply = publisher.receive()?;
    let group = match in_flight.pop_front() {
        Some((sent_ns, group)) => {
            ack.record_ns(sys::monotonic_ns().saturating_sub(sent_ns));
            group
        }
        None => None,
    };
    outcome.account(group, reply);
    Ok(())
}

/// Publishes until the duration, the count or a stop signal, then collects
/// every outstanding reply. `stop` is polled between publications.
pub fn publish(publisher: &mut dyn Publisher, plan: &PublishPlan, stop: &dyn Fn() -> bool) -> PublishOutcome {
    let mut outcome = PublishOutcome {
        started_ns: sys::monotonic_ns(),
        group_final_offsets: vec![None; plan.groups.count as usize],
        ..Default::default()
    };
    let start = outcome.started_ns;
    let end = start
        .saturating_add(plan.pause_after_first_ms.saturating_mul(1_000_000))
        .saturating_add(plan.duration_ms.saturating_mul(1_000_000));
    let window = plan.window.max(1);
    // Send times and groups of the requests in flight, oldest first (replies come in order).
    let mut in_flight: VecDeque<(u64, Option<u32>)> = VecDeque::with_capacity(window);
    let mut ack = Latency::new();
    let mut data = Vec::with_capacity(plan.payload_bytes + 64);
    let mut seq: u64 = 0;
    loop {
        let now = sys::monotonic_ns();
        if now >= end || seq >= plan.publications_max || stop() {
            break;
        }
        let due = plan.due(now - start);
        if seq < due && in_flight.len() < window {
            if matches!(plan.rate, Rate::PerSecond(_)) && now > start + plan.slot_ns(seq) + LATE_NS {
                outcome.late += 1;
            }
            let sent_ns = sys::monotonic_ns();
            write_publication(&mut data, sent_ns, seq, plan.payload_bytes);
            let group = plan.groups.of_publication(seq);
            if let Err(error) = publisher.send(group, &data) {
                outcome.error = Some(error);
                break;
            }
            in_flight.push_back((sent_ns, group));
            seq += 1;
            outcome.sent += 1;
            continue;
        }
        if !in_flight.is_empty() {
            if let Err(error) = take_reply(publisher, &mut in_flight, &mut ack, &mut outcome) {
                outcome.error = Some(error);
                in_flight.clear();
                break;
            }
            continue;
        }
        // Nothing in flight and nothing due: sleep until the next slot.
        if seq >= due {
            let wake_ns = (start + plan.slot_ns(seq)).min(end);
            let now = sys::monotonic_ns();
            if wake_ns > now {
                std::thread::sleep(Duration::from_nanos((wake_ns - now).min(50_000_000)));
            }
        }
    }
    while !in_flight.is_empty() {
        if let Err(error) = take_reply(publisher, &mut in_flight, &mut ack, &mut outcome) {
            outcome.error.get_or_insert(error);
            break;
        }
    }
    outcome.ended_ns = sys::monotonic_ns();
    outcome.ack = ack.summary();
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scan::scan_push;

    /// Accepts everything except every `reject_every`-th publication; checks
    /// the window is never exceeded.
    struct Fake {
        sent: Vec<Vec<u8>>,
        in_flight: usize,
        window: usize,
        reject_every: usize,
        replies: usize,
        groups_sent: Vec<Option<u32>>,
    }

    impl Fake {
        fn new(window: usize, reject_every: usize) -> Fake {
            Fake { sent: vec![], in_flight: 0, window, reject_every, replies: 0, groups_sent: vec![] }
        }
    }

    impl Publisher for Fake {
        fn send(&mut self, group: Option<u32>, data: &[u8]) -> Result<(), String> {
            self.groups_sent.push(group);
            self.in_flight += 1;
            assert!(self.in_flight <= self.window, "window exceeded");
            self.sent.push(data.to_vec());
            Ok(())
        }
        fn receive(&mut self) -> Result<Reply, String> {
            assert!(self.in_flight > 0, "receive with nothing in flight");
            self.in_flight -= 1;
            self.replies += 1;
            if self.reject_every > 0 && self.replies % self.reject_every == 0 {
                return Ok(Reply::Rejected("overloaded".into()));
            }
            Ok(Reply::Accepted { offset: Some(self.replies as u64 + 10), subscribers: Some(3) })
        }
    }

    #[test]
    fn max_rate_respects_the_window_and_the_count() {
        let mut fake = Fake::new(8, 10);
        let plan = PublishPlan {
            rate: Rate::Max,
            duration_ms: 60_000,
            publications_max: 100,
            window: 8,
            payload_bytes: 64,
            groups: Groups::default(),
            pause_after_first_ms: 0,
        };
        let outcome = publish(&mut fake, &plan, &|| false);
        assert_eq!(outcome.sent, 100);
        assert_eq!(outcome.accepted, 90);
        assert_eq!(outcome.rejected.get("overloaded"), Some(&10));
        assert_eq!((outcome.first_offset, outcome.final_offset), (Some(11), Some(109)));
        assert_eq!((outcome.subscribers_min, outcome.subscribers_max), (Some(3), Some(3)));
        assert_eq!(fake.in_flight, 0);
        assert_eq!(outcome.ack.count, 100);
        // Sequence numbers run 0..100 and timestamps never go backwards.
        let fields: Vec<_> = fake.sent.iter().map(|d| scan_push(d, false)).collect();
        assert!(fields.iter().enumerate().all(|(i, f)| f.seq == Some(i as u64)));
        assert!(fields.windows(2).all(|w| w[0].sent_ns <= w[1].sent_ns));
        assert!(fake.sent.iter().all(|d| d.len() == 64));
    }

    #[test]
    fn paced_rate_stops_at_the_duration() {
        let mut fake = Fake::new(4, 0);
        let plan = PublishPlan {
            rate: Rate::PerSecond(100.0),
            duration_ms: 200,
            publications_max: 1_000,
            window: 4,
            payload_bytes: 0,
            groups: Groups::default(),
            pause_after_first_ms: 0,
        };
        let outcome = publish(&mut fake, &plan, &|| false);
        // 100/s for 0.2 s: about 20, never more than 21 (the first is due at once).
        assert!(outcome.sent <= 21 && outcome.sent >= 10, "{outcome:?}");
        assert_eq!(outcome.accepted, outcome.sent);
    }

    #[test]
    fn groups_take_turns_and_keep_their_own_final_offsets() {
        let mut fake = Fake::new(2, 0);
        let plan = PublishPlan {
            rate: Rate::Max,
            duration_ms: 60_000,
            publications_max: 7,
            window: 2,
            payload_bytes: 0,
            groups: Groups { count: 2 },
            pause_after_first_ms: 0,
        };
        let outcome = publish(&mut fake, &plan, &|| false);
        assert_eq!(fake.groups_sent, [None, Some(0), Some(1), None, Some(0), Some(1), None]);
        // The fake answers offset 10 + reply number: the broadcast channel got
        // replies 1, 4 and 7, group 0 replies 2 and 5, group 1 replies 3 and 6.
        assert_eq!((outcome.first_offset, outcome.final_offset), (Some(11), Some(17)));
        assert_eq!(outcome.group_final_offsets, [Some(15), Some(16)]);
        assert_eq!(outcome.accepted, 7);
    }

    #[test]
    fn the_first_publication_gets_the_pause_to_itself() {
        let plan = |rate, pause_after_first_ms| PublishPlan {
            rate,
            duration_ms: 1_000,
            publications_max: 100,
            window: 1,
            payload_bytes: 0,
            groups: Groups::default(),
            pause_after_first_ms,
        };
        let ms = 1_000_000;
        // Without a pause: one every 1/rate from the start, as before.
        let paced = plan(Rate::PerSecond(10.0), 0);
        assert_eq!((paced.due(0), paced.due(99 * ms), paced.due(100 * ms)), (1, 1, 2));
        assert_eq!((paced.slot_ns(0), paced.slot_ns(1)), (0, 100 * ms));
        // With 5 s: only the first until then, the second at 5.1 s.
        let paused = plan(Rate::PerSecond(10.0), 5_000);
        assert_eq!((paused.due(4_999 * ms), paused.due(5_000 * ms), paused.due(5_100 * ms)), (1, 1, 2));
        assert_eq!((paused.slot_ns(0), paused.slot_ns(1), paused.slot_ns(3)), (0, 5_100 * ms, 5_300 * ms));
        let max = plan(Rate::Max, 2_000);
        assert_eq!((max.due(0), max.due(2_000 * ms)), (1, 100));
        // Publishing ends the duration after the pause.
        let mut fake = Fake::new(1, 0);
        let short = PublishPlan { duration_ms: 150, ..plan(Rate::PerSecond(20.0), 200) };
        let started = sys::monotonic_ns();
        let outcome = publish(&mut fake, &short, &|| false);
        // The first at once, then 20/s from 0.25 s to 0.35 s: two or three more.
        assert!((3..=4).contains(&outcome.sent), "{outcome:?}");
        assert!(sys::monotonic_ns() - started >= 300 * ms);
    }

    #[test]
    fn stop_ends_publishing() {
        let mut fake = Fake::new(4, 0);
        let plan = PublishPlan {
            rate: Rate::Max,
            duration_ms: 60_000,
            publications_max: 1_000,
            window: 4,
            payload_bytes: 0,
            groups: Groups::default(),
            pause_after_first_ms: 0,
        };
        let outcome = publish(&mut fake, &plan, &|| true);
        assert_eq!(outcome.sent, 0);
    }

    #[test]
    fn http_responses_by_length_chunked_and_close() {
        let response = b"HTTP/1.1 202 Accepted\r\nContent-Length: 5\r\n\r\nhelloHTTP/1.1 500";
        assert_eq!(parse_http_response(response).unwrap(), Some((202, 49, false)));
        assert_eq!(parse_http_response(&response[..45]).unwrap(), None);
        let chunked =
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\nnext";
        let used = chunked.len() - 4;
        assert_eq!(parse_http_response(chunked).unwrap(), Some((200, used, true)));
        assert_eq!(parse_http_response(&chunked[..used - 1]).unwrap(), None);
        assert_eq!(parse_http_response(b"HTTP/1.1 204 No Content\r\n\r\n").unwrap(), Some((204, 27, false)));
        assert!(parse_http_response(b"HTTP/1.1 200 OK\r\n\r\n").is_err());
        assert!(parse_http_response(b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n").is_err());
        assert!(chunked_body_len(b"zz\r\n").is_err());
    }
}

//! HTTP sessions (SSE and long-polling): the state that lets a client keep
//! its subscriptions across short disconnects. Every message the session
//! sends gets a sequence number and stays in a bounded buffer until the
//! client acknowledges it (long-poll cursor) or, for SSE, as a replay ring
//! for a reconnecting `EventSource`.

use std::collections::VecDeque;
use std::sync::Arc;

use super::sockjs::{SockJsRequest, SockJsSession};
use crate::hub::index::ConnKey;
use crate::hub::publication::Publication;

/// One buffered message: a shared publication or JSON for this session only.
#[derive(Debug, Clone)]
pub enum BufItem {
    Publication(Arc<Publication>),
    Json(Box<[u8]>),
}

impl BufItem {
    pub fn json(&self) -> &[u8] {
        match self {
            BufItem::Publication(publication) => publication.json(),
            BufItem::Json(json) => json,
        }
    }
}

/// Messages after this sequence were dropped from a full buffer before the
/// client acknowledged them: the session cannot be resumed exactly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lost;

/// Numbered messages, oldest first, bounded by count and bytes.
#[derive(Debug)]
pub struct SessionBuffer {
    entries: VecDeque<(u64, BufItem)>,
    bytes: usize,
    /// Sequence of the next message (the first is 1).
    next_seq: u64,
    /// Highest sequence the client acknowledged.
    acked: u64,
    /// Highest sequence dropped before it was acknowledged (0: none).
    lost_through: u64,
}

impl Default for SessionBuffer {
    fn default() -> Self {
        SessionBuffer { entries: VecDeque::new(), bytes: 0, next_seq: 1, acked: 0, lost_through: 0 }
    }
}

impl SessionBuffer {
    /// Appends a message and returns its sequence. Past the limits the
    /// oldest messages are dropped (and remembered as lost if unacknowledged).
    pub fn push(&mut self, item: BufItem, messages_max: usize, bytes_max: usize) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.bytes += item.json().len();
        self.entries.push_back((seq, item));
        while self.entries.len() > messages_max || (self.bytes > bytes_max && self.entries.len() > 1) {
            if let Some((dropped, item)) = self.entries.pop_front() {
                self.bytes -= item.json().len();
                if dropped > self.acked {
                    self.lost_through = self.lost_through.max(dropped);
                }
            }
        }
        seq
    }

    /// The client has everything up to `seq`; forget it. Sequences the
    /// session never sent are ignored.
    pub fn ack(&mut self, seq: u64) {
        let seq = seq.min(self.next_seq - 1);
        self.acked = self.acked.max(seq);
        while self.entries.front().is_some_and(|(s, _)| *s <= seq) {
            if let Some((_, item)) = self.entries.pop_front() {
                self.bytes -= item.json().len();
            }
        }
    }

    /// Messages after `seq`, or `Lost` if some of them were dropped.
    pub fn after(&self, seq: u64) -> Result<impl Iterator<Item = &(u64, BufItem)>, Lost> {
        if self.lost_through > seq {
            return Err(Lost);
        }
        // Sequences in the buffer are consecutive (pushed at the back, dropped
        // at the front), so the first one after `seq` is found by arithmetic,
        // not a scan: SSE asks this for every message it forwards.
        let first = self.entries.front().map_or(self.next_seq, |(first, _)| *first);
        let skip = (seq + 1).saturating_sub(first).min(self.entries.len() as u64) as usize;
        debug_assert!(self.entries.get(skip).is_none_or(|(next, _)| *next > seq));
        Ok(self.entries.range(skip..))
    }

    /// Sequence of the newest message (0 before the first).
    pub fn last_seq(&self) -> u64 {
        self.next_seq - 1
    }

    pub fn has_after(&self, seq: u64) -> bool {
        self.last_seq() > seq
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionKind {
    Sse,
    LongPoll,
    /// A SockJS session (`HttpSession::sockjs` says more).
    SockJs,
}

/// The connection (stream or poll) currently serving a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attachment {
    pub key: ConnKey,
    pub generation: u32,
}

/// An HTTP session; lives in a connection slot without a socket.
#[derive(Debug)]
pub struct HttpSession {
    /// `s{shard}.{key}.{generation}.{secret}`: routes requests to the
    /// session's shard and slot; the secret makes it unguessable.
    pub id: Box<str>,
    pub kind: SessionKind,
    pub buffer: SessionBuffer,
    pub attached: Option<Attachment>,
    /// Commands from `POST /cmd` waiting to run (bounded).
    pub commands: VecDeque<Box<[u8]>>,
    /// The SockJS side of a `SessionKind::SockJs` session.
    pub sockjs: Option<Box<SockJsSession>>,
}

impl HttpSession {
    pub fn new(id: Box<str>, kind: SessionKind) -> HttpSession {
        HttpSession {
            id,
            kind,
            buffer: SessionBuffer::default(),
            attached: None,
            commands: VecDeque::new(),
            sockjs: None,
        }
    }
}

/// What role an entry of the connection slab plays for HTTP sessions.
#[derive(Debug)]
pub enum HttpRole {
    /// The session itself (no socket).
    Session(HttpSession),
    /// The socket streaming a session's events (SSE).
    Stream { session: ConnKey, generation: u32 },
    /// The socket waiting for a session's messages (long-poll), with what
    /// its answer needs: the cursor it asked with, keep-alive and CORS.
    Poll { session: ConnKey, generation: u32, cursor: u64, keep_alive: bool, cors: Option<Box<str>> },
    /// A request (poll, stream or WebSocket) serving a SockJS session.
    SockJs(Box<SockJsRequest>),
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn json(text: &str) -> BufItem {
        BufItem::Json(text.as_bytes().into())
    }

    #[test]
    fn ack_and_after() {
        let mut buffer = SessionBuffer::default();
        for n in 0..5 {
            assert_eq!(buffer.push(json(&n.to_string()), 10, 1000), n + 1);
        }
        buffer.ack(2);
        let seqs: Vec<u64> = buffer.after(2).unwrap().map(|(s, _)| *s).collect();
        assert_eq!(seqs, vec![3, 4, 5]);
        assert_eq!(buffer.after(4).unwrap().count(), 1);
        assert!(buffer.has_after(4));
        assert!(!buffer.has_after(5));
        buffer.ack(99);
        assert!(buffer.is_empty());
        assert_eq!(buffer.push(json("x"), 10, 1000), 6, "sequences keep counting");
    }

    #[test]
    fn overflow_of_unacknowledged_messages_is_lost() {
        let mut buffer = SessionBuffer::default();
        for n in 0..5 {
            buffer.push(json(&n.to_string()), 3, 1000);
        }
        assert_eq!(buffer.len(), 3);
        assert_eq!(buffer.after(1).err(), Some(Lost));
        assert!(buffer.after(2).is_ok());
        // Acknowledged messages dropping out is not a loss.
        let mut ring = SessionBuffer::default();
        for n in 0..5 {
            let seq = ring.push(json(&n.to_string()), 3, 1000);
            ring.ack(seq);
        }
        assert!(ring.after(4).is_ok());
    }

    #[test]
    fn byte_limit() {
        let mut buffer = SessionBuffer::default();
        buffer.push(json("aaaaaaaaaa"), 100, 15);
        buffer.push(json("bbbbbbbbbb"), 100, 15);
        assert_eq!(buffer.len(), 1);
        assert_eq!(buffer.bytes(), 10);
    }

    proptest! {
        /// The buffer stays within its bounds, and what it returns after a
        /// cursor is exactly the unacknowledged tail, or `Lost`.
        #[test]
        fn bounded_and_exact(ops in proptest::collection::vec((any::<bool>(), 0u64..40), 1..300)) {
            let mut buffer = SessionBuffer::default();
            let mut acked = 0;
            for (push, value) in ops {
                if push {
                    buffer.push(json("12345"), 8, 30);
                } else {
                    let cursor = value.min(buffer.last_seq());
                    acked = acked.max(cursor);
                    buffer.ack(cursor);
                }
                prop_assert!(buffer.len() <= 8 && buffer.bytes() <= 30);
                match buffer.after(acked) {
                    Ok(tail) => {
                        let seqs: Vec<u64> = tail.map(|(s, _)| *s).collect();
                        let expected: Vec<u64> = (acked + 1..=buffer.last_seq()).collect();
                        prop_assert_eq!(seqs, expected);
                    }
                    Err(Lost) => prop_assert!(buffer.last_seq() - acked > 6),
                }
            }
        }
    }
}

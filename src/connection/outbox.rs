//! A connection's bounded outbox: what could not be written because the
//! socket pushed back. It exists only while there is something in it
//! (invariant 1): the common case writes straight to the socket.

use std::collections::VecDeque;
use std::sync::Arc;

use crate::hub::publication::Publication;

/// Which encoding of a shared publication a connection needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wire {
    WebSocket,
    Sse,
}

/// One queued message.
#[derive(Debug, Clone)]
pub enum OutItem {
    /// A publication shared with every other subscriber.
    Publication(Arc<Publication>, Wire),
    /// Bytes for this connection only (replies, control frames, HTTP heads).
    Owned(Box<[u8]>),
}

impl OutItem {
    pub fn bytes(&self) -> &[u8] {
        match self {
            OutItem::Publication(publication, Wire::WebSocket) => publication.ws_frame(),
            OutItem::Publication(publication, Wire::Sse) => publication.sse_event(),
            OutItem::Owned(bytes) => bytes,
        }
    }
}

/// Outcome of queueing a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    Queued,
    /// Queueing it would pass `outbox_bytes_max` or `outbox_messages_max`:
    /// the connection is a slow consumer and must be closed. Nothing was queued.
    OverLimit,
}

/// Queued messages, oldest first; the first may be partly written.
#[derive(Debug, Default)]
pub struct Outbox {
    items: VecDeque<OutItem>,
    /// Bytes of the front item already written to the socket.
    front_written: usize,
    /// Bytes still to write over all items.
    pending_bytes: usize,
}

impl Outbox {
    /// An outbox holding `item` with its first `written` bytes already sent.
    pub fn with_partial(item: OutItem, written: usize) -> Self {
        let len = item.bytes().len();
        debug_assert!(written < len);
        let mut items = VecDeque::with_capacity(4);
        items.push_back(item);
        Outbox { items, front_written: written, pending_bytes: len - written }
    }

    /// Queues `item` unless that passes a limit.
    pub fn push(&mut self, item: OutItem, bytes_max: usize, messages_max: usize) -> Admission {
        let len = item.bytes().len();
        if self.items.len() >= messages_max || self.pending_bytes + len > bytes_max {
            return Admission::OverLimit;
        }
        self.pending_bytes += len;
        self.items.push_back(item);
        Admission::Queued
    }

    /// Queues `item` regardless of limits (a close frame after a slow-consumer cut).
    pub fn push_unbounded(&mut self, item: OutItem) {
        self.pending_bytes += item.bytes().len();
        self.items.push_back(item);
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    pub fn pending_bytes(&self) -> usize {
        self.pending_bytes
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// The unwritten bytes, in order, at most `max_chunks` slices (for writev).
    pub fn chunks(&self, max_chunks: usize) -> impl Iterator<Item = &[u8]> + Clone {
        self.items.iter().take(max_chunks).enumerate().map(|(i, item)| {
            let bytes = item.bytes();
            if i == 0 {
                &bytes[self.front_written..]
            } else {
                bytes
            }
        })
    }

    /// Marks `written` bytes as sent, dropping finished items.
    pub fn advance(&mut self, mut written: usize) {
        debug_assert!(written <= self.pending_bytes);
        self.pending_bytes -= written.min(self.pending_bytes);
        while written > 0 {
            let Some(front) = self.items.front() else { break };
            let remaining = front.bytes().len() - self.front_written;
            if written >= remaining {
                written -= remaining;
                self.items.pop_front();
                self.front_written = 0;
            } else {
                self.front_written += written;
                written = 0;
            }
        }
    }

    /// Drops every queued message except a partly written front one (which
    /// must be finished or the stream is corrupt). Used before a close frame
    /// to a slow consumer.
    pub fn cut_after_front(&mut self) {
        let keep = usize::from(self.front_written > 0);
        while self.items.len() > keep {
            if let Some(item) = self.items.pop_back() {
                self.pending_bytes -= item.bytes().len();
            }
        }
        if keep == 0 {
            debug_assert_eq!(self.pending_bytes, 0);
            self.pending_bytes = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owned(bytes: &[u8]) -> OutItem {
        OutItem::Owned(bytes.into())
    }

    fn collect(outbox: &Outbox) -> Vec<u8> {
        outbox.chunks(usize::MAX).flat_map(|c| c.to_vec()).collect()
    }

    #[test]
    fn partial_writes_resume_mid_item() {
        let mut outbox = Outbox::with_partial(owned(b"hello"), 2);
        assert_eq!(outbox.push(owned(b" world"), 100, 10), Admission::Queued);
        assert_eq!(collect(&outbox), b"llo world");
        outbox.advance(4);
        assert_eq!(collect(&outbox), b"world");
        assert_eq!(outbox.len(), 1);
        outbox.advance(5);
        assert!(outbox.is_empty());
        assert_eq!(outbox.pending_bytes(), 0);
    }

    #[test]
    fn limits_refuse_without_queueing() {
        let mut outbox = Outbox::default();
        assert_eq!(outbox.push(owned(&[0; 60]), 100, 10), Admission::Queued);
        assert_eq!(outbox.push(owned(&[0; 60]), 100, 10), Admission::OverLimit);
        assert_eq!(outbox.pending_bytes(), 60);
        assert_eq!(outbox.push(owned(&[0; 10]), 100, 1), Admission::OverLimit);
    }

    #[test]
    fn cut_keeps_a_partly_written_front() {
        let mut outbox = Outbox::with_partial(owned(b"abc"), 1);
        outbox.push(owned(b"def"), 100, 10);
        outbox.cut_after_front();
        assert_eq!(collect(&outbox), b"bc");
        let mut outbox = Outbox::default();
        outbox.push(owned(b"abc"), 100, 10);
        outbox.cut_after_front();
        assert!(outbox.is_empty());
        assert_eq!(outbox.pending_bytes(), 0);
    }
}

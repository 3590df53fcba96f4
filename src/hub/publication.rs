//! A publication, encoded once and shared by reference count.
//!
//! Server frames are not masked, so the same WebSocket frame bytes fit every
//! subscriber on every shard. The owner shard builds it; every other shard
//! and connection only holds an `Arc` to it (invariant 2 in DESIGN.md).

use std::sync::{Arc, OnceLock};
use std::time::Instant;

use kometa_protocol::json::ObjectWriter;
use kometa_protocol::ws::{FrameBuilder, OPCODE_TEXT, SERVER_HEADER_BYTES_MAX};

/// One message published to a channel.
#[derive(Debug)]
pub struct Publication {
    /// The channel name, shared with the owner's channel state.
    pub channel: Arc<str>,
    /// Position within the channel's current epoch; strictly increasing.
    /// 0 for pushes outside the sequence (presence events); the inbox
    /// sequence for user messages.
    pub offset: u64,
    /// The push as a WebSocket text frame; the JSON starts at
    /// `SERVER_HEADER_BYTES_MAX` and the frame at `frame_start`.
    buffer: Box<[u8]>,
    frame_start: u8,
    /// The SSE encoding (`id:`/`data:` lines), built on first use by an SSE
    /// subscriber and then shared like the WebSocket frame.
    sse: OnceLock<Box<[u8]>>,
    /// The channel epoch, for SSE event ids.
    pub epoch: Arc<str>,
    /// A push of presence counts: only for subscriptions that asked for them.
    pub presence_counts: bool,
    /// When the owner accepted it (built it: in cluster mode, when it came
    /// back from Redis): the start of the publish-to-write histogram.
    pub accepted_at: Instant,
}

/// What a publication says, before it gets an offset.
#[derive(Debug, Clone, Copy)]
pub struct PushFields<'a> {
    pub channel: &'a str,
    pub event: &'a str,
    /// Validated JSON, re-emitted verbatim.
    pub data: &'a [u8],
    /// The publishing user, for client publications.
    pub user: Option<&'a str>,
}

impl Publication {
    /// Encodes `{"channel":…,"event":…,"offset":…,"data":…[,"user":…]}` once.
    pub fn encode(channel: Arc<str>, epoch: Arc<str>, offset: u64, fields: PushFields<'_>) -> Publication {
        debug_assert_eq!(&*channel, fields.channel);
        Publication::build(
            channel,
            epoch,
            offset,
            fields.data.len() + fields.channel.len() + fields.event.len(),
            |object| {
                object
                    .str("channel", fields.channel)
                    .str("event", fields.event)
                    .u64("offset", offset)
                    .raw("data", fields.data);
                if let Some(user) = fields.user {
                    object.str("user", user);
                }
            },
        )
    }

    /// A channel event outside the channel's offset sequence (presence
    /// join/leave): `{"channel":…,"event":…,"data":…}`, offset 0, no history.
    pub fn channel_event(channel: Arc<str>, event: &str, data: &[u8]) -> Publication {
        let name = Arc::clone(&channel);
        Publication::build(channel, "".into(), 0, data.len() + name.len() + event.len(), |object| {
            object.str("channel", &name).str("event", event).raw("data", data);
        })
    }

    /// The channel's presence counts, for subscriptions that asked for them:
    /// `{"channel":…,"event":"presence_counts","data":{"users":…,"connections":…,"anonymous":…}}`.
    pub fn presence_counts(channel: Arc<str>, users: u64, connections: u64, anonymous: u64) -> Publication {
        let mut data = Vec::with_capacity(64);
        let mut object = ObjectWriter::new(&mut data);
        object.u64("users", users).u64("connections", connections).u64("anonymous", anonymous);
        object.finish();
        let mut publication = Publication::channel_event(channel, "presence_counts", &data);
        publication.presence_counts = true;
        publication
    }

    /// Cluster mode: subscribers missed publications of `channel` up to
    /// `offset` that cannot be had (`reason` as in a resume reply):
    /// `{"channel":…,"recovered":false,"reason":…,"epoch":…,"offset":…}`.
    /// Outside the offsets (0), like an event; the client should refetch.
    pub fn loss_notice(channel: Arc<str>, epoch: &str, offset: u64, reason: &str) -> Publication {
        let name = Arc::clone(&channel);
        Publication::build(channel, "".into(), 0, name.len() + epoch.len() + 64, |object| {
            object
                .str("channel", &name)
                .bool("recovered", false)
                .str("reason", reason)
                .str("epoch", epoch)
                .u64("offset", offset);
        })
    }

    /// A message to a user: `{"inbox":SEQ,"event":…,"data":…}`, where SEQ is
    /// the inbox sequence to acknowledge (absent when it was not stored).
    /// `channel` is empty and `offset` is the sequence (0 when not stored).
    pub fn user_message(seq: Option<u64>, event: &str, data: &[u8]) -> Publication {
        Publication::build("".into(), "".into(), seq.unwrap_or(0), data.len() + event.len(), |object| {
            if let Some(seq) = seq {
                object.u64("inbox", seq);
            }
            object.str("event", event).raw("data", data);
        })
    }

    fn build(
        channel: Arc<str>,
        epoch: Arc<str>,
        offset: u64,
        size_hint: usize,
        fields: impl FnOnce(&mut ObjectWriter<'_>),
    ) -> Publication {
        let mut builder = FrameBuilder::with_capacity(64 + size_hint);
        let mut object = ObjectWriter::new(builder.payload());
        fields(&mut object);
        object.finish();
        let (buffer, frame_start) = builder.finish(OPCODE_TEXT);
        debug_assert!(frame_start < SERVER_HEADER_BYTES_MAX);
        Publication {
            channel,
            offset,
            buffer: buffer.into_boxed_slice(),
            frame_start: frame_start as u8,
            sse: OnceLock::new(),
            epoch,
            presence_counts: false,
            accepted_at: Instant::now(),
        }
    }

    /// The complete WebSocket frame.
    pub fn ws_frame(&self) -> &[u8] {
        &self.buffer[usize::from(self.frame_start)..]
    }

    /// The push as JSON (the frame's payload).
    pub fn json(&self) -> &[u8] {
        &self.buffer[SERVER_HEADER_BYTES_MAX..]
    }

    /// The push as one SSE event, `id: EPOCH:OFFSET` so a reconnecting
    /// EventSource resumes with `Last-Event-ID`.
    pub fn sse_event(&self) -> &[u8] {
        self.sse.get_or_init(|| {
            let json = self.json();
            let mut event = Vec::with_capacity(json.len() + self.channel.len() + self.epoch.len() + 48);
            event.extend_from_slice(b"id: ");
            event.extend_from_slice(self.channel.as_bytes());
            event.push(b'@');
            event.extend_from_slice(self.epoch.as_bytes());
            event.push(b':');
            event.extend_from_slice(self.offset.to_string().as_bytes());
            event.extend_from_slice(b"\ndata: ");
            // JSON from serde_json never contains a raw newline outside strings,
            // and strings escape it, so one data line holds the whole push.
            event.extend_from_slice(json);
            event.extend_from_slice(b"\n\n");
            event.into_boxed_slice()
        })
    }

    /// Heap bytes this publication holds (for history accounting).
    pub fn bytes(&self) -> usize {
        self.buffer.len() + self.sse.get().map_or(0, |s| s.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_frame_and_json_once() {
        let publication = Publication::encode(
            "news".into(),
            "e1".into(),
            18,
            PushFields { channel: "news", event: "update", data: br#"{"x":1}"#, user: None },
        );
        assert_eq!(publication.json(), br#"{"channel":"news","event":"update","offset":18,"data":{"x":1}}"#);
        let frame = publication.ws_frame();
        assert_eq!(frame[0], 0x81);
        assert_eq!(usize::from(frame[1]), publication.json().len());
        assert_eq!(&frame[2..], publication.json());
        let sse = std::str::from_utf8(publication.sse_event()).unwrap();
        assert!(sse.starts_with("id: news@e1:18\ndata: {"));
        assert!(sse.ends_with("}\n\n"));
    }

    #[test]
    fn events_and_user_messages() {
        let join = Publication::channel_event("track_room".into(), "join", br#"{"user":"42"}"#);
        assert_eq!(join.json(), br#"{"channel":"track_room","event":"join","data":{"user":"42"}}"#);
        assert_eq!(join.offset, 0);
        let message = Publication::user_message(Some(7), "notice", b"1");
        assert_eq!(message.json(), br#"{"inbox":7,"event":"notice","data":1}"#);
        let transient = Publication::user_message(None, "notice", b"1");
        assert_eq!(transient.json(), br#"{"event":"notice","data":1}"#);
    }

    #[test]
    fn client_publications_carry_the_user() {
        let publication = Publication::encode(
            "web_chat".into(),
            "e".into(),
            1,
            PushFields { channel: "web_chat", event: "msg", data: b"\"hi\"", user: Some("42") },
        );
        let value: serde_json::Value = serde_json::from_slice(publication.json()).unwrap();
        assert_eq!(value["user"], "42");
        assert_eq!(value["data"], "hi");
    }
}

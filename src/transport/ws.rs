//! WebSocket input on an open connection: frames to events, control frames
//! answered here, text messages handed to the client protocol.

use crate::hub::index::ConnKey;
use crate::session::{Flags, Phase};
use crate::shard::Shard;
use kometa_protocol::ws::{self, DecodeLimits, Event, MessageKind};

impl Shard {
    /// Decodes one frame from the start of `input` and acts on it; returns
    /// the bytes used, or `None` when the frame is not complete yet.
    pub(crate) fn ws_input(&mut self, key: ConnKey, generation: u32, input: &mut [u8]) -> Option<usize> {
        let limits = DecodeLimits { message_bytes_max: self.config.limits.client_message_bytes_max };
        let conn = self.conn_mut(key, generation)?;
        let closing = conn.session.phase == Phase::Closing;
        let mut fragments = conn.session.rx.as_mut().and_then(|rx| rx.fragments.take());
        let decoded = ws::decode_frame(input, &mut fragments, limits);
        if let Some(fragments) = fragments {
            conn.session.rx.get_or_insert_with(Default::default).fragments = Some(fragments);
        }
        match decoded {
            Ok(None) => None,
            Err(violation) => {
                // Fail the connection (RFC 6455 §7.1.7): our close frame (if
                // not sent yet), then our FIN, and what follows is not decoded
                // any more (it would be read as frames: more violations, and
                // a reset that could destroy the close frame). Input is read
                // away until the peer's FIN, bounded by close_timeout_ms.
                if !closing {
                    self.metrics.protocol_errors += 1;
                    tracing::debug!(
                        shard = self.id,
                        key,
                        code = violation.code,
                        reason = violation.reason,
                        "websocket protocol violation"
                    );
                    self.close_websocket(key, violation.code, violation.reason);
                }
                self.end_after_flush_lingering(key);
                Some(input.len())
            }
            Ok(Some(decoded)) => {
                if let Some(event) = decoded.event {
                    self.ws_event(key, generation, event, closing);
                }
                Some(decoded.consumed)
            }
        }
    }

    fn ws_event(&mut self, key: ConnKey, generation: u32, event: Event<'_>, closing: bool) {
        match event {
            Event::Ping(payload) => {
                if !closing {
                    self.send_owned(key, ws::encode_frame(ws::OPCODE_PONG, payload));
                }
            }
            // Any input already counts as liveness.
            Event::Pong(_) => {}
            Event::Close(code, _reason) => {
                let Some(conn) = self.conn_mut(key, generation) else { return };
                if conn.session.flags.contains(Flags::CLOSE_SENT) {
                    // The peer answered our close: the handshake is complete.
                    self.end_after_flush(key);
                    return;
                }
                // Echo the peer's code (RFC 6455 §5.5.1); the server then
                // closes the TCP connection first (§7.1.1).
                let reply = match code {
                    Some(code) => ws::encode_close(code, ""),
                    None => ws::encode_frame(ws::OPCODE_CLOSE, &[]),
                };
                conn.session.flags.insert(Flags::CLOSE_SENT);
                conn.session.phase = Phase::Closing;
                self.send_owned(key, reply);
                self.end_after_flush(key);
            }
            Event::Message(kind, payload) => {
                if closing {
                    return;
                }
                self.metrics.messages_in += 1;
                let echo = self.conn_mut(key, generation).is_some_and(|conn| conn.session.flags.contains(Flags::ECHO));
                if echo {
                    let opcode = if kind == MessageKind::Text { ws::OPCODE_TEXT } else { ws::OPCODE_BINARY };
                    self.send_owned(key, ws::encode_frame(opcode, &payload));
                    return;
                }
                match kind {
                    MessageKind::Text => self.client_command(key, generation, &payload),
                    MessageKind::Binary => {
                        self.metrics.protocol_errors += 1;
                        self.close_websocket(
                            key,
                            ws::close::UNSUPPORTED_DATA,
                            "binary messages are not supported; send JSON text",
                        );
                    }
                }
            }
        }
    }
}

//! The shard's coarse timer: one sweep over all connections every
//! `sweep_interval_ms`, spread over ticks, instead of a timer per
//! connection (invariant 7). It sends pings, closes silent connections and
//! enforces handshake and close deadlines; less often it expires channel
//! history and drops idle channels.

use std::sync::Arc;

use super::{Shard, SWEEP_CONNS_PER_TICK};
use crate::hub::index::ConnKey;
use crate::session::{Phase, TimerAction};
use crate::util::unix_time_ms;
use kometa_protocol::ws;

/// Owned channels are swept at most this often (history TTLs are minutes).
const CHANNEL_SWEEP_INTERVAL_MS: u64 = 5_000;
/// A ping with an empty payload.
const PING_FRAME: [u8; 2] = [0x80 | ws::OPCODE_PING, 0];

impl Shard {
    /// Examines up to `SWEEP_CONNS_PER_TICK` connections; returns how many.
    pub(crate) fn sweep(&mut self) -> usize {
        let start = self.sweep_cursor;
        let capacity = self.conns.capacity();
        let end = (start + SWEEP_CONNS_PER_TICK).min(capacity);
        let timeouts = self.config.timeouts.clone();
        let unix_s = unix_time_ms() / 1000;
        for index in start..end {
            let now_ms = self.now_ms;
            let Some(conn) = self.conns.get_mut(index) else { continue };
            let key = index as ConnKey;
            let token_expired = conn
                .session
                .identity
                .as_ref()
                .is_some_and(|identity| identity.expires_at_s.is_some_and(|exp| unix_s >= exp));
            if token_expired && matches!(conn.session.phase, Phase::WebSocket | Phase::Session) {
                self.close_websocket(key, ws::close::TOKEN_EXPIRED, "token expired");
                continue;
            }
            let has_partial_input = conn.session.rx.is_some();
            let action = conn.session.on_timer(now_ms, &timeouts);
            match action {
                TimerAction::Nothing => {}
                TimerAction::SendPing => self.send_owned(key, PING_FRAME.to_vec()),
                TimerAction::Close(code, reason) => self.close_websocket(key, code, reason),
                TimerAction::Heartbeat => self.sse_heartbeat(key),
                TimerAction::PollTimeout => self.poll_timeout(key),
                TimerAction::SessionExpired => self.close_conn(key),
                TimerAction::HttpTimeout if has_partial_input => {
                    self.respond(key, 408, &[], "request head not received in time", false, true);
                    // The client may still be sending: see Phase::Lingering.
                    self.end_after_flush_lingering(key);
                }
                // An idle keep-alive connection: close quietly.
                TimerAction::HttpTimeout | TimerAction::Drop => self.close_conn(key),
            }
        }
        self.sweep_cursor = end;
        if end >= capacity {
            self.sweep_cursor = 0;
            self.next_sweep_ms = self.now_ms + timeouts.sweep_interval_ms;
            if self.now_ms >= self.next_channel_sweep_ms {
                self.next_channel_sweep_ms = self.now_ms + CHANNEL_SWEEP_INTERVAL_MS.max(timeouts.sweep_interval_ms);
                let config = Arc::clone(&self.config);
                let dropped = if self.is_cluster() {
                    self.cluster_sweep_channels();
                    0
                } else {
                    self.owned.sweep(self.now_ms, |name| config.namespace_for(name))
                };
                self.users.sweep(unix_time_ms());
                if dropped > 0 {
                    tracing::trace!(shard = self.id, dropped, "idle channels dropped");
                }
            }
        }
        end - start
    }
}

//! The shard's coarse timer: one sweep over all connections every
//! `sweep_interval_ms`, spread over ticks, instead of a timer per
//! connection (invariant 7). It sends pings, closes silent connections and
//! enforces handshake, message and close deadlines; less often it expires
//! channel history, drops idle channels and prunes its share of the
//! process-wide limit tables.

use std::sync::Arc;

use super::conn::SocketIo;
use super::{Shard, SWEEP_CONNS_PER_TICK};
use crate::connection::{Context, Phase, Timer};
use crate::hub::index::ConnKey;
use crate::util::unix_time_ms;
use kometa_protocol::ws;

/// Owned channels are swept at most this often (history TTLs are minutes).
const CHANNEL_SWEEP_INTERVAL_MS: u64 = 5_000;

impl Shard {
    /// Examines up to `SWEEP_CONNS_PER_TICK` connections; returns how many.
    pub(crate) fn sweep(&mut self) -> usize {
        let start = self.sweep_cursor;
        let capacity = self.conns.capacity();
        let end = (start + SWEEP_CONNS_PER_TICK).min(capacity);
        let sweep_interval_ms = self.config.timeouts.sweep_interval_ms;
        let unix_s = unix_time_ms() / 1000;
        for index in start..end {
            let now_ms = self.now_ms;
            let Some(conn) = self.conns.get_mut(index) else { continue };
            let key = index as ConnKey;
            let token_expired = conn
                .state
                .identity
                .as_ref()
                .is_some_and(|identity| identity.expires_at_s.is_some_and(|exp| unix_s >= exp));
            if token_expired && matches!(conn.state.phase(), Phase::WebSocket | Phase::Session) {
                self.close_websocket(key, ws::close::TOKEN_EXPIRED, "token expired");
                continue;
            }
            let cx = Context { now_ms, limits: &self.config.limits, timeouts: &self.config.timeouts };
            let queued_before = conn.state.output_messages();
            let mut io = SocketIo::new(conn.raw_fd(), conn.tls.as_deref_mut(), &mut self.tls_sealed, &mut self.metrics);
            let timer = conn.state.on_timer(&mut io, &cx);
            let queued_after = conn.state.output_messages();
            self.outbox_moved(queued_before, queued_after);
            match timer {
                Timer::Nothing => {}
                Timer::PollTimeout => self.poll_timeout(key),
                Timer::Close => self.close_conn(key),
            }
        }
        self.sweep_cursor = end;
        if end >= capacity {
            self.sweep_cursor = 0;
            self.next_sweep_ms = self.now_ms + sweep_interval_ms;
            if self.id == 0 {
                // Counts of rate-limited warnings whose call sites went quiet.
                crate::log::report_suppressed();
            }
            self.sockjs_sweep();
            if self.now_ms >= self.next_channel_sweep_ms {
                self.next_channel_sweep_ms = self.now_ms + CHANNEL_SWEEP_INTERVAL_MS.max(sweep_interval_ms);
                let config = Arc::clone(&self.config);
                let dropped = if self.is_cluster() {
                    self.cluster_sweep_channels();
                    0
                } else {
                    self.owned.sweep(self.now_ms, |name| config.namespace_for(name))
                };
                self.users.sweep(unix_time_ms());
                // This shard's share of the process-wide limit tables.
                let limiter = &self.shared.limiter;
                limiter.prune(self.id, self.shard_count(), limiter.now_ms());
                if dropped > 0 {
                    tracing::trace!(shard = self.id, dropped, "idle channels dropped");
                }
            }
        }
        end - start
    }
}

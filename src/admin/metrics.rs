//! `GET /metrics` (`metrics.listen`): each shard's figures, gathered over
//! the bus the way `STATS` gathers its counters (`Query::Metrics`), plus the
//! gateway's own, exposed with the Prometheus project's `prometheus-client`
//! crate: OpenMetrics text when the scraper asks for it (`Accept:
//! application/openmetrics-text`, as Prometheus does), else the Prometheus
//! text format 0.0.4. This node only, also in cluster mode (Prometheus
//! scrapes every node). docs/metrics.md lists every metric.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::atomic::Ordering;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};

use crate::admin::gateway::Gateway;
use crate::admin::http::{Request, Response};
use crate::admin::ops;
use crate::bus::metrics::{RefusalCounts, RefusalReason, ShardMetrics, Transport, HANDSHAKE_LABELS, LATENCY_BOUNDS_US};
use crate::bus::query::{merge_metrics, Query};
use crate::limits::{LimitKind, LimitRefusals};
use kometa_protocol::http::Method;

const OPENMETRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Answers one request on the metrics listener.
pub async fn respond(gateway: &Rc<RefCell<Gateway>>, request: &Request) -> Response {
    let text = |status: u16, message: &str| {
        Response::new(status, "text/plain; charset=utf-8", format!("{message}\n").into_bytes())
    };
    if request.path != "/metrics" {
        return text(404, "not found: the metrics are at /metrics");
    }
    if request.method != Method::Get {
        return text(405, "use GET").with_header("Allow", "GET");
    }
    let snapshot = match gather(gateway).await {
        Some(snapshot) => snapshot,
        None => return text(503, "server is shutting down"),
    };
    let openmetrics = request.accept.as_deref().is_some_and(|accept| accept.contains("application/openmetrics-text"));
    let mut registry = Registry::default();
    registry.register_collector(Box::new(snapshot));
    let mut body = String::new();
    let (encoded, content_type) = if openmetrics {
        (prometheus_client::encoding::text::encode(&mut body, &registry), OPENMETRICS_CONTENT_TYPE)
    } else {
        (
            prometheus_client::encoding::prometheus_text::encode(&mut body, &registry),
            prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
        )
    };
    match encoded {
        Ok(()) => Response::new(200, content_type, body.into_bytes()),
        Err(_) => text(500, "metrics could not be encoded"),
    }
}

/// Every shard's figures and the gateway's; None when shutting down.
async fn gather(gateway: &Rc<RefCell<Gateway>>) -> Option<Snapshot> {
    let count = gateway.borrow().shard_count();
    let receiver = ops::send_queries(gateway, (0..count).map(|shard| (shard, Query::Metrics)).collect());
    let shards = merge_metrics(receiver.await.ok()?);
    let gateway = gateway.borrow();
    let mut refusals = gateway.refusals;
    let mut limits = gateway.shared.admin_refusals.snapshot();
    for shard in &shards {
        refusals.add(&shard.refusals);
        limits.merge(&shard.stats.limit_refusals);
    }
    Some(Snapshot {
        shards,
        refusals,
        limits,
        connections_open: gateway.shared.connections.load(Ordering::Relaxed) as u64,
        connections_max: gateway.shared.connections_max as u64,
        backend_calls: gateway.shared.backend_calls.samples(),
        breakers_open: gateway.shared.backend_calls.breakers_open.load(Ordering::Relaxed),
        backend_enabled: gateway.config.rpc.enabled(),
    })
}

/// One scrape's numbers, encoded by `Collector::encode`.
#[derive(Debug)]
struct Snapshot {
    shards: Vec<ShardMetrics>,
    /// Over the shards and the gateway.
    refusals: RefusalCounts,
    limits: LimitRefusals,
    connections_open: u64,
    connections_max: u64,
    /// (kind, via, outcome, count) of backend calls.
    backend_calls: Vec<(&'static str, &'static str, &'static str, u64)>,
    breakers_open: u64,
    /// Whether the backend thread runs (`[rpc]`): its families are shown only then.
    backend_enabled: bool,
}

/// Encodes one family: `values` gives each sample's labels and value.
fn family(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    kind: MetricType,
    samples: impl IntoIterator<Item = (Vec<(&'static str, String)>, u64)>,
) -> Result<(), std::fmt::Error> {
    let mut metric = encoder.encode_descriptor(name, help, None, kind)?;
    for (labels, value) in samples {
        let sample = metric.encode_family(&labels)?;
        match kind {
            MetricType::Counter => ConstCounter::new(value).encode(sample)?,
            _ => ConstGauge::new(i64::try_from(value).unwrap_or(i64::MAX)).encode(sample)?,
        }
    }
    Ok(())
}

fn shard_label(shard: &ShardMetrics) -> Vec<(&'static str, String)> {
    vec![("shard", shard.stats.shard.to_string())]
}

impl Snapshot {
    /// A family with one sample per shard.
    fn per_shard(
        &self,
        encoder: &mut DescriptorEncoder,
        name: &str,
        help: &str,
        kind: MetricType,
        value: impl Fn(&ShardMetrics) -> u64,
    ) -> Result<(), std::fmt::Error> {
        family(encoder, name, help, kind, self.shards.iter().map(|s| (shard_label(s), value(s))))
    }

    /// A family with one sample per shard and value of a second label.
    fn per_shard_by(
        &self,
        encoder: &mut DescriptorEncoder,
        (name, help): (&str, &str),
        kind: MetricType,
        label: &'static str,
        values: impl Fn(&ShardMetrics) -> Vec<(&'static str, u64)>,
    ) -> Result<(), std::fmt::Error> {
        let samples = self.shards.iter().flat_map(|s| {
            values(s).into_iter().map(move |(value_label, value)| {
                let mut labels = shard_label(s);
                labels.push((label, value_label.to_owned()));
                (labels, value)
            })
        });
        family(encoder, name, help, kind, samples)
    }
}

impl Collector for Snapshot {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        use MetricType::{Counter, Gauge};
        let e = &mut encoder;
        self.per_shard_by(
            e,
            ("kometa_connections", "Open client sockets, by transport (websocket, sse, long_poll, http) and shard."),
            Gauge,
            "transport",
            |s| Transport::ALL.iter().map(|t| (t.label(), s.sockets[*t as usize])).collect(),
        )?;
        family(
            e,
            "kometa_connections_max",
            "The process's connection cap (connections_max, lowered to what the open-files limit allows).",
            Gauge,
            [(Vec::new(), self.connections_max)],
        )?;
        family(
            e,
            "kometa_connections_open",
            "Open client sockets over all shards.",
            Gauge,
            [(Vec::new(), self.connections_open)],
        )?;
        self.per_shard(e, "kometa_connections_accepted", "Client sockets accepted.", Counter, |s| {
            s.stats.connections_accepted
        })?;
        self.per_shard_by(
            e,
            ("kometa_handshakes", "Handshakes completed: WebSocket upgrades, new SSE, long-poll and SockJS sessions."),
            Counter,
            "transport",
            |s| HANDSHAKE_LABELS.iter().copied().zip(s.handshakes).collect(),
        )?;
        self.per_shard_by(
            e,
            ("kometa_tls_handshakes", "TLS handshakes on the public listener (tls.cert_file), by outcome."),
            Counter,
            "outcome",
            |s| vec![("completed", s.stats.tls_handshakes), ("failed", s.stats.tls_failures)],
        )?;
        self.per_shard_by(
            e,
            (
                "kometa_http_sessions",
                "SSE, long-poll and SockJS sessions (they outlive their requests by timeouts.session_grace_ms).",
            ),
            Gauge,
            "kind",
            |s| vec![("sse", s.sessions_sse), ("long_poll", s.sessions_long_poll), ("sockjs", s.sessions_sockjs)],
        )?;
        self.per_shard(e, "kometa_authenticated_connections", "Connections with a verified user token.", Gauge, |s| {
            s.stats.authenticated
        })?;
        self.per_shard(e, "kometa_users_online", "Users this shard owns that have a connection.", Gauge, |s| {
            s.stats.users_online
        })?;
        self.per_shard(e, "kometa_subscriptions", "Subscriptions of this shard's connections.", Gauge, |s| {
            s.stats.subscriptions
        })?;
        self.per_shard(
            e,
            "kometa_channels",
            "Channels this shard owns (epoch, offsets, history, presence).",
            Gauge,
            |s| s.stats.channels_owned,
        )?;
        self.per_shard(e, "kometa_channels_local", "Channels with subscribers on this shard.", Gauge, |s| {
            s.stats.channels_local
        })?;
        self.per_shard(e, "kometa_messages_in", "Client messages received.", Counter, |s| s.stats.messages_in)?;
        self.per_shard(
            e,
            "kometa_messages_out",
            "Messages written to clients (pushes, replies, control).",
            Counter,
            |s| s.stats.messages_out,
        )?;
        self.per_shard(
            e,
            "kometa_publications_accepted",
            "Publications this shard accepted as their channel's owner (assigned an offset).",
            Counter,
            |s| s.stats.publications,
        )?;
        family(
            e,
            "kometa_publications_refused",
            "Publications refused to their publisher (backend or client), by reason.",
            Counter,
            RefusalReason::ALL.iter().map(|r| (vec![("reason", r.label().to_owned())], self.refusals.get(*r))),
        )?;
        self.per_shard(
            e,
            "kometa_deliveries",
            "Publications and user messages written or queued to client connections.",
            Counter,
            |s| s.deliveries,
        )?;
        self.per_shard(
            e,
            "kometa_slow_consumers_closed",
            "Connections closed (1008) because their outbox passed limits.outbox_bytes_max or outbox_messages_max.",
            Counter,
            |s| s.stats.slow_consumers_closed,
        )?;
        self.per_shard(
            e,
            "kometa_protocol_errors",
            "Connections closed for a protocol violation (WebSocket 1002/1007/1009, bad HTTP).",
            Counter,
            |s| s.stats.protocol_errors,
        )?;
        family(
            e,
            "kometa_limit_refusals",
            "Refusals by the limit that made them (kind: the setting's name).",
            Counter,
            LimitKind::ALL.iter().map(|k| (vec![("kind", k.name().to_owned())], self.limits.get(*k))),
        )?;
        self.per_shard(e, "kometa_bus_queue_depth", "Messages waiting in the bus queues to this shard.", Gauge, |s| {
            s.bus_inbound
        })?;
        self.per_shard(
            e,
            "kometa_bus_overflow_depth",
            "Messages this shard holds because a bus queue was full (past half of limits.bus_overflow_max it sheds load).",
            Gauge,
            |s| s.bus_overflow,
        )?;
        self.per_shard(
            e,
            "kometa_bus_overflowed",
            "Messages that ever waited in a bus overflow deque.",
            Counter,
            |s| s.stats.bus_overflowed,
        )?;
        self.per_shard(
            e,
            "kometa_fanout_backlog",
            "Deliveries queued on this shard, not yet written (limits.fanout_backlog_max).",
            Gauge,
            |s| s.stats.fanout_backlog,
        )?;
        self.per_shard(e, "kometa_outbox_bytes", "Bytes waiting in connection outboxes.", Gauge, |s| {
            s.stats.outbox_bytes
        })?;
        self.per_shard(
            e,
            "kometa_history_publications",
            "Publications kept in the history of channels this shard owns.",
            Gauge,
            |s| s.history_publications,
        )?;
        self.per_shard(
            e,
            "kometa_inbox_messages",
            "Messages waiting in the inboxes of users this shard owns.",
            Gauge,
            |s| s.inbox_messages,
        )?;
        self.per_shard(e, "kometa_inbox_users", "Users this shard owns with a non-empty inbox.", Gauge, |s| {
            s.inbox_users
        })?;
        let mut metric = e.encode_descriptor(
            "kometa_publish_to_write",
            "From the owner's acceptance of a publication to its last write on a shard (per shard with subscribers).",
            Some(&Unit::Seconds),
            MetricType::Histogram,
        )?;
        for shard in &self.shards {
            let labels = shard_label(shard);
            let mut sample = metric.encode_family(&labels)?;
            let histogram = &shard.publish_to_write;
            let buckets: Vec<(f64, u64)> = LATENCY_BOUNDS_US
                .iter()
                .map(|&bound_us| bound_us as f64 / 1e6)
                .chain(std::iter::once(f64::INFINITY))
                .zip(histogram.buckets)
                .collect();
            sample.encode_histogram::<prometheus_client::encoding::NoLabelSet>(
                histogram.sum_us as f64 / 1e6,
                histogram.count,
                &buckets,
                None,
            )?;
        }
        if self.backend_enabled {
            family(
                e,
                "kometa_backend_calls",
                "Calls to the backend answered (rpc and the connect, subscribe and publish proxies), by kind, \
                 route (webhook, handler on an admin connection, or none) and outcome (ok, backend_error, \
                 timeout, unavailable).",
                Counter,
                self.backend_calls.iter().map(|&(kind, via, outcome, count)| {
                    (vec![("kind", kind.to_owned()), ("via", via.to_owned()), ("outcome", outcome.to_owned())], count)
                }),
            )?;
            family(
                e,
                "kometa_backend_breakers_open",
                "Webhook URLs whose circuit breaker is open or waiting for its trial call (calls fail at once).",
                Gauge,
                [(Vec::new(), self.breakers_open)],
            )?;
        }
        Ok(())
    }
}

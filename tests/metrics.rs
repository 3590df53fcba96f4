//! `/metrics` over a real socket, parsed by the Prometheus project's own
//! Python parsers (`tests/parse_metrics.py`, `prometheus_client` from
//! `scripts/install-test-deps.sh`), and the counters checked after real
//! actions; the log's format and its rate limit on peer-caused warnings.

mod common;

use std::io::Read;
use std::time::{Duration, Instant};

use common::{http_at, metric_value as value, repo, scrape_metrics as scrape, Server};
use serde_json::Value;

fn family_type(metrics: &Value, name: &str) -> String {
    metrics[name]["type"].as_str().unwrap_or_else(|| panic!("no family {name}")).to_owned()
}

const CONFIG: &str = "[metrics]\nlisten = \"127.0.0.1:0\"\n\
    [limits]\nchannels_per_connection_max = 3\npublication_data_bytes_max = 16384\noutbox_bytes_max = 65536\n\
    admin_frame_bytes_max = 65536\n";

#[test]
fn counters_move_after_connect_subscribe_publish_and_a_slow_consumer() {
    let server = Server::start(2, CONFIG);
    let before = scrape(&server, true);
    for (name, kind) in [
        ("kometa_connections", "gauge"),
        ("kometa_handshakes", "counter"),
        ("kometa_subscriptions", "gauge"),
        ("kometa_publications_accepted", "counter"),
        ("kometa_publications_refused", "counter"),
        ("kometa_deliveries", "counter"),
        ("kometa_slow_consumers_closed", "counter"),
        ("kometa_limit_refusals", "counter"),
        ("kometa_bus_queue_depth", "gauge"),
        ("kometa_fanout_backlog", "gauge"),
        ("kometa_history_publications", "gauge"),
        ("kometa_inbox_messages", "gauge"),
        ("kometa_publish_to_write_seconds", "histogram"),
    ] {
        assert_eq!(family_type(&before, name), kind, "{name}");
    }
    assert_eq!(value(&before, "kometa_connections", &[("transport", "websocket")]), 0.0);
    assert_eq!(value(&before, "kometa_connections", &[("shard", "1")]), 0.0);
    assert_eq!(value(&before, "kometa_handshakes_total", &[("transport", "websocket")]), 0.0);

    // Connect and subscribe.
    let mut client = server.client();
    client.subscribe("news");
    let connected = scrape(&server, false);
    assert_eq!(value(&connected, "kometa_connections", &[("transport", "websocket")]), 1.0);
    assert_eq!(value(&connected, "kometa_handshakes_total", &[("transport", "websocket")]), 1.0);
    assert_eq!(value(&connected, "kometa_subscriptions", &[]), 1.0);
    assert_eq!(value(&connected, "kometa_channels", &[]), 1.0);

    // Publish: accepted by the owner, delivered once, timed once.
    server.publish("news", "update", r#"{"n":1}"#);
    assert_eq!(client.recv()["data"]["n"], 1);
    let published = scrape(&server, true);
    assert_eq!(value(&published, "kometa_publications_accepted_total", &[]), 1.0);
    assert_eq!(value(&published, "kometa_deliveries_total", &[]), 1.0);
    assert_eq!(value(&published, "kometa_publish_to_write_seconds_count", &[]), 1.0);
    assert_eq!(value(&published, "kometa_publish_to_write_seconds_bucket", &[("le", "+Inf")]), 1.0);
    assert_eq!(value(&published, "kometa_history_publications", &[]), 1.0);

    // A subscription past limits.channels_per_connection_max.
    client.subscribe("a");
    client.subscribe("b");
    let refused = client.request(serde_json::json!({"op": "subscribe", "channel": "c", "id": 9}));
    assert_eq!(refused["error"]["code"], "too_many_channels", "{refused}");
    let limited = scrape(&server, false);
    assert_eq!(value(&limited, "kometa_limit_refusals_total", &[("kind", "channels_per_connection_max")]), 1.0);
    assert_eq!(value(&limited, "kometa_limit_refusals_total", &[("kind", "connections_max")]), 0.0);

    // A subscriber that never reads, closed at its outbox cap.
    let slow = common::slow_subscriber(&server, "firehose");
    let payload = format!("\"{}\"", "x".repeat(8 * 1024));
    let mut admin = server.admin();
    let mut published = 0;
    while server.stats()["slow_consumers_closed"] != 1 {
        assert!(published < 5000, "the slow consumer was never closed");
        for _ in 0..50 {
            admin.publish("firehose", "blob", payload.as_bytes()).unwrap();
        }
        published += 50;
    }
    let after = scrape(&server, true);
    assert_eq!(value(&after, "kometa_slow_consumers_closed_total", &[]), 1.0);
    assert!(value(&after, "kometa_deliveries_total", &[]) > 1.0);
    // Its socket counts until it is gone (a closing WebSocket is still open).
    drop(slow);
    common::eventually("the slow consumer's socket to close", || {
        let metrics = scrape(&server, false);
        (value(&metrics, "kometa_connections", &[("transport", "websocket")]) == 1.0).then_some(())
    });
}

#[test]
fn refused_publications_count_by_reason_and_limit() {
    let server = Server::start(1, "[metrics]\nlisten = \"127.0.0.1:0\"\n[limits]\nchannels_max = 1\n");
    server.publish("first", "e", "1");
    let error = server.admin().publish("second", "e", b"1").unwrap_err();
    assert!(error.to_string().contains("limit_reached"), "{error}");
    let mut client = server.client();
    let refused = client.request(serde_json::json!({"op": "subscribe", "channel": "third", "id": 1}));
    assert_eq!(refused["error"]["code"], "server_channel_limit", "{refused}");
    // A limit against abuse, counted by the admin gateway.
    let deep = format!("{}{}", "[".repeat(40), "]".repeat(40));
    assert!(server.admin().publish("first", "e", deep.as_bytes()).is_err());
    let metrics = scrape(&server, false);
    assert_eq!(value(&metrics, "kometa_limit_refusals_total", &[("kind", "json_depth")]), 1.0);
    assert_eq!(value(&metrics, "kometa_publications_refused_total", &[("reason", "channels_max")]), 1.0);
    assert_eq!(value(&metrics, "kometa_publications_refused_total", &[("reason", "overloaded")]), 0.0);
    assert_eq!(value(&metrics, "kometa_limit_refusals_total", &[("kind", "channels_max")]), 2.0);
    assert_eq!(value(&metrics, "kometa_publications_accepted_total", &[]), 1.0);
}

#[test]
fn the_metrics_listener_is_off_by_default_and_serves_only_get_metrics() {
    let plain = Server::start(1, "");
    assert!(!plain.ready.contains("metrics="), "{}", plain.ready);

    let server = Server::start(1, "[metrics]\nlisten = \"127.0.0.1:0\"\n");
    let port = server.listener_port("metrics");
    assert_eq!(http_at(port, "GET", "/other", &[], b"").status, 404);
    let post = http_at(port, "POST", "/metrics", &[], b"");
    assert_eq!(post.status, 405);
    assert_eq!(post.header("Allow").as_deref(), Some("GET"));
    // Not on the public port.
    assert_eq!(common::http(&server, "GET", "/metrics", &[], b"").status, 404);
}

/// `[limits]` for `refuse_admin_connections`: two admin connections at most.
const TWO_ADMIN_CONNECTIONS: &str = "[limits]\nadmin_connections_max = 2\nadmin_unauthenticated_max = 1\n";

/// Opens `count` admin connections past `limits.admin_connections_max`
/// (2, taken by the connections returned); each is refused with a logged
/// warning.
fn refuse_admin_connections(server: &Server, count: usize) -> Vec<kometa_admin_client::AdminClient> {
    let kometa_admin_client::AdminAddress::Unix(path) = &server.admin else { panic!("unix admin socket") };
    let mut held = vec![server.admin(), server.admin()];
    // Accepted before the flood: their PINGs are answered.
    for client in &mut held {
        client.ping().expect("ping");
    }
    for _ in 0..count {
        let mut stream = std::os::unix::net::UnixStream::connect(path).expect("connect");
        stream.set_read_timeout(Some(common::TIMEOUT)).unwrap();
        let mut reply = Vec::new();
        let _ = stream.read_to_end(&mut reply);
        assert!(!reply.is_empty(), "a refused admin connection gets an error frame");
    }
    held
}

#[test]
fn peer_caused_warnings_are_rate_limited_and_summarised_in_json() {
    let config =
        format!("[log]\nformat = \"json\"\nwarnings_per_second_max = 3\n[timeouts]\nsweep_interval_ms = 100\n{TWO_ADMIN_CONNECTIONS}");
    let server = Server::start(1, &config);
    let refused = 40;
    let _held = refuse_admin_connections(&server, refused);
    let mut written = 0;
    let mut suppressed = 0;
    let deadline = Instant::now() + common::TIMEOUT;
    while written + suppressed < refused as u64 {
        assert!(Instant::now() < deadline, "{written} written and {suppressed} suppressed of {refused}");
        let Ok(line) = server.log.recv_timeout(Duration::from_millis(200)) else { continue };
        assert!(!line.contains('\u{1b}'), "no colour in a log that is not a terminal: {line}");
        let event: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        let message = event["fields"]["message"].as_str().unwrap_or_default();
        if message.starts_with("admin connection refused") {
            written += 1;
        } else if message.starts_with("suppressed") {
            suppressed += event["fields"]["suppressed"].as_u64().expect("a count");
        }
    }
    assert_eq!(written + suppressed, refused as u64);
    // 3 a second; the flood may straddle a second boundary or two.
    assert!(written <= 9, "{written} lines written");
    assert!(suppressed >= 31, "{suppressed} suppressed");
}

#[test]
fn text_logs_have_no_colour_when_not_on_a_terminal() {
    let server = Server::start(1, TWO_ADMIN_CONNECTIONS);
    let _held = refuse_admin_connections(&server, 1);
    let line = loop {
        let line = server.log.recv_timeout(common::TIMEOUT).expect("a warning");
        if line.contains("admin connection refused") {
            break line;
        }
    };
    assert!(!line.contains('\u{1b}'), "{line}");
    assert!(serde_json::from_str::<Value>(&line).is_err(), "text, not JSON: {line}");
}

/// `kometa_*` names in a text (docs, dashboard queries).
fn metric_names(text: &str) -> std::collections::BTreeSet<String> {
    let mut names = std::collections::BTreeSet::new();
    for (start, _) in text.match_indices("kometa_") {
        let name: String = text[start..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
        names.insert(name);
    }
    names
}

#[test]
fn the_docs_and_the_dashboard_name_exactly_the_metrics_served() {
    // With the backend thread on, so its families are served too.
    let server = Server::start(1, "[metrics]\nlisten = \"127.0.0.1:0\"\n[rpc]\nadmin_handlers = true\n");
    let metrics = scrape(&server, true);
    let families: Vec<String> = metrics.as_object().unwrap().keys().cloned().collect();
    let mut served: std::collections::BTreeSet<String> = families.iter().cloned().collect();
    for family in metrics.as_object().unwrap().values() {
        for sample in family["samples"].as_array().unwrap() {
            served.insert(sample[0].as_str().unwrap().to_owned());
        }
    }
    let docs = std::fs::read_to_string(repo().join("docs/metrics.md")).unwrap();
    let dashboard = std::fs::read_to_string(repo().join("docs/grafana-dashboard.json")).unwrap();
    serde_json::from_str::<Value>(&dashboard).expect("the dashboard is JSON");
    for (what, text) in [("docs/metrics.md", &docs), ("docs/grafana-dashboard.json", &dashboard)] {
        for name in metric_names(text) {
            assert!(served.contains(&name), "{what} names {name}, which is not served");
        }
    }
    let documented = metric_names(&docs);
    for family in families {
        assert!(
            documented.contains(&family) || documented.contains(&format!("{family}_total")),
            "{family} is served but not in docs/metrics.md"
        );
    }
}

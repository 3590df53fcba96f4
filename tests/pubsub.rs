//! Publish/subscribe over real sockets, connections spread over shards.

mod common;

use std::collections::HashSet;
use std::io::Write;

use common::{Client, Server};
use kometa_protocol::admin::opcode;
use serde_json::{json, Value};

/// Opens `count` clients and checks the kernel spread them over every shard.
fn clients_on_all_shards(server: &Server, count: usize, shards: usize) -> Vec<Client> {
    let clients: Vec<Client> = (0..count).map(|_| server.client()).collect();
    let stats = server.wait_stats("connections registered", |s| s["connections"].as_u64() == Some(count as u64));
    let per_shard: Vec<u64> =
        stats["shards"].as_array().unwrap().iter().map(|s| s["connections"].as_u64().unwrap()).collect();
    assert_eq!(per_shard.len(), shards);
    assert!(per_shard.iter().all(|&n| n > 0), "connections not spread over shards: {per_shard:?}");
    clients
}

#[test]
fn every_subscriber_on_every_shard_gets_every_publication_in_order_exactly_once() {
    let server = Server::start(3, "");
    let mut clients = clients_on_all_shards(&server, 60, 3);
    // Several channels, so owners differ from the subscribers' shards.
    let channels = ["news", "sport", "weather"];
    for (i, client) in clients.iter_mut().enumerate() {
        client.subscribe(channels[i % 3]);
    }
    let mut admin = server.admin();
    for n in 0..40 {
        for channel in channels {
            let published = admin.publish(channel, "update", json!({"n": n}).to_string().as_bytes()).unwrap();
            assert_eq!(published.offset, n + 1);
            assert_eq!(published.subscribers, 20);
        }
    }
    for channel in channels {
        admin.publish(channel, "end", b"null").unwrap();
    }
    for (i, client) in clients.iter_mut().enumerate() {
        let mut seen = Vec::new();
        loop {
            let push = client.recv();
            assert_eq!(push["channel"], channels[i % 3]);
            if push["event"] == "end" {
                assert_eq!(push["offset"], 41);
                break;
            }
            assert_eq!(push["event"], "update");
            seen.push((push["offset"].as_u64().unwrap(), push["data"]["n"].as_u64().unwrap()));
        }
        let expected: Vec<(u64, u64)> = (0..40).map(|n| (n + 1, n)).collect();
        assert_eq!(seen, expected, "client {i}");
    }
}

#[test]
fn unsubscribe_stops_delivery() {
    let server = Server::start(2, "");
    let mut stays = server.client();
    let mut leaves = server.client();
    stays.subscribe("news");
    leaves.subscribe("news");
    server.publish("news", "a", "1");
    assert_eq!(stays.recv()["offset"], 1);
    assert_eq!(leaves.recv()["offset"], 1);

    let reply = leaves.request(json!({"op": "unsubscribe", "channel": "news", "id": 5}));
    assert_eq!(reply, json!({"id": 5, "ok": true}));
    let published = server.publish("news", "b", "2");
    assert_eq!(published.subscribers, 1);
    assert_eq!(stays.recv()["offset"], 2);
    // The next thing `leaves` sees is the reply to a ping, not the publication.
    assert_eq!(leaves.request(json!({"op": "ping", "id": 6})), json!({"id": 6, "ok": true}));

    let reply = leaves.request(json!({"op": "unsubscribe", "channel": "news", "id": 7}));
    assert_eq!(reply["error"]["code"], "not_subscribed");
    let reply = stays.request(json!({"op": "subscribe", "channel": "news", "id": 8}));
    assert_eq!(reply["error"]["code"], "already_subscribed");
}

#[test]
fn closing_a_connection_unsubscribes_it() {
    let server = Server::start(2, "");
    let mut clients: Vec<Client> = (0..10).map(|_| server.client()).collect();
    for client in &mut clients {
        client.subscribe("room");
    }
    assert_eq!(server.publish("room", "x", "1").subscribers, 10);
    clients.truncate(4);
    server.wait_stats("closed connections gone", |s| s["subscriptions"] == 4);
    assert_eq!(server.publish("room", "x", "2").subscribers, 4);
}

#[test]
fn clients_may_publish_only_where_the_namespace_allows() {
    let server = Server::start(2, "");
    let mut publisher = server.client();
    let mut listener = server.client();
    listener.subscribe("web_chat");
    listener.subscribe("news");

    let reply = publisher
        .request(json!({"op": "publish", "channel": "web_chat", "event": "msg", "data": {"text": "hi"}, "id": 1}));
    assert_eq!(reply, json!({"id": 1, "ok": true, "offset": 1}));
    let push = listener.recv();
    assert_eq!(push, json!({"channel": "web_chat", "event": "msg", "offset": 1, "data": {"text": "hi"}}));
    assert!(push.get("user").is_none(), "anonymous publications carry no user");

    let reply = publisher.request(json!({"op": "publish", "channel": "news", "event": "msg", "data": 1, "id": 2}));
    assert_eq!(reply["id"], 2);
    assert_eq!(reply["error"]["code"], "forbidden");
    // Nothing reached the subscriber of `news`.
    assert_eq!(listener.request(json!({"op": "ping", "id": 3})), json!({"id": 3, "ok": true}));

    // A custom namespace list replaces the defaults.
    let custom = Server::start(2, "[[namespaces]]\nprefix = \"chat_\"\nclient_publish = true\n");
    let mut client = custom.client();
    assert_eq!(client.request(json!({"op": "publish", "channel": "chat_1", "data": 1, "id": 1}))["ok"], true);
    assert_eq!(
        client.request(json!({"op": "publish", "channel": "web_1", "data": 1, "id": 2}))["error"]["code"],
        "forbidden"
    );
}

#[test]
fn a_thousand_concurrent_clients() {
    let server = Server::start(2, "");
    let mut clients: Vec<Client> = (0..1000).map(|_| server.client()).collect();
    for client in &mut clients {
        client.send(json!({"op": "subscribe", "channel": "crowd"}));
    }
    for client in &mut clients {
        assert_eq!(client.recv()["ok"], true);
    }
    for n in 0..3 {
        let published = server.publish("crowd", "tick", &n.to_string());
        assert_eq!(published.subscribers, 1000);
    }
    for client in &mut clients {
        let offsets: Vec<Value> = (0..3).map(|_| client.recv()["offset"].clone()).collect();
        assert_eq!(offsets, vec![json!(1), json!(2), json!(3)]);
    }
    let stats = server.stats();
    assert_eq!(stats["websockets"], 1000);
    assert_eq!(stats["subscriptions"], 1000);
}

#[test]
fn subscribe_reports_position_and_resumes_from_history() {
    let server = Server::start(2, "");
    let mut first = server.client();
    let reply = first.subscribe("feed");
    assert_eq!(reply["offset"], 0);
    let epoch = reply["epoch"].as_str().unwrap().to_string();
    for n in 1..=5 {
        server.publish("feed", "e", &n.to_string());
    }
    // A client that saw up to offset 2 resumes and gets 3, 4, 5, then live ones.
    let mut resumer = server.client();
    let reply =
        resumer.request(json!({"op": "subscribe", "channel": "feed", "id": 1, "since": {"epoch": epoch, "offset": 2}}));
    assert_eq!(reply, json!({"id": 1, "ok": true, "channel": "feed", "epoch": epoch, "offset": 5, "recovered": true}));
    for offset in 3..=5 {
        assert_eq!(resumer.recv()["offset"], offset);
    }
    server.publish("feed", "e", "6");
    assert_eq!(resumer.recv()["offset"], 6);

    // An unknown epoch is reported, not silently ignored.
    let mut stale = server.client();
    let reply =
        stale.request(json!({"op": "subscribe", "channel": "feed", "id": 2, "since": {"epoch": "0000", "offset": 2}}));
    assert_eq!(reply["recovered"], false);
    assert_eq!(reply["reason"], "epoch_changed");
}

#[test]
fn admin_requests_pipeline_and_replies_keep_order() {
    let server = Server::start(2, "");
    let mut admin = server.admin();
    let mut ids = Vec::new();
    for n in 0..200 {
        let channel = format!("c{}", n % 7);
        ids.push(
            admin
                .send(opcode::PUBLISH, |w| {
                    w.str16(&channel).str16("e").bytes32(b"1");
                })
                .unwrap(),
        );
    }
    let mut last_offset = std::collections::HashMap::new();
    for (n, id) in ids.into_iter().enumerate() {
        let reply = admin.receive().unwrap();
        assert_eq!(reply.request_id, id);
        let published = kometa_protocol::admin::decode_published(&reply.result.unwrap()).unwrap();
        let previous = last_offset.insert(n % 7, published.offset).unwrap_or(0);
        assert_eq!(published.offset, previous + 1, "offsets per channel increase by one");
    }
    let distinct: HashSet<u64> = last_offset.values().copied().collect();
    assert!(!distinct.is_empty());
}

#[test]
fn cli_publish_and_stats_print_json() {
    let server = Server::start(2, "");
    let mut subscriber = server.client();
    subscriber.subscribe("news");
    let admin = match &server.admin {
        kometa_admin_client::AdminAddress::Unix(path) => format!("unix:{}", path.display()),
        other => panic!("{other}"),
    };
    // Text that is not JSON is refused (a typo in JSON must not become a
    // string), unless --string says it is one.
    let kometa = |args: &[&str]| std::process::Command::new(env!("CARGO_BIN_EXE_kometa")).args(args).output().unwrap();
    let output = kometa(&["publish", "--admin", &admin, "news", "update", "plain text"]);
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("--string"), "{output:?}");
    let output = kometa(&["send-user", "--admin", &admin, "42", "note", "{\"a\":1"]);
    assert_eq!(output.status.code(), Some(2), "{output:?}");
    let output = kometa(&["publish", "--admin", &admin, "--string", "news", "update", "plain text"]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let printed: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(printed, json!({"offset": 1, "subscribers": 1}), "the refused one was not published");
    assert_eq!(subscriber.recv()["data"], "plain text");
    let output = kometa(&["publish", "--admin", &admin, "--string", "news", "update", "{\"a\":1}"]);
    assert!(output.status.success());
    assert_eq!(subscriber.recv()["data"], "{\"a\":1}", "--string sends even JSON text as a string");

    let output =
        std::process::Command::new(env!("CARGO_BIN_EXE_kometa")).args(["stats", "--admin", &admin]).output().unwrap();
    assert!(output.status.success());
    let stats: Value = serde_json::from_slice(&output.stdout).unwrap();
    for key in ["connections", "channels", "subscriptions", "messages_in", "messages_out", "shards"] {
        assert!(stats.get(key).is_some(), "stats lacks {key}: {stats}");
    }
    assert_eq!(stats["shards"].as_array().unwrap().len(), 2);

    let output = std::process::Command::new(env!("CARGO_BIN_EXE_kometa"))
        .args(["publish", "--admin", &admin, "bad channel", "e", "1"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("bad_argument"));
}

/// Publications that queue up behind a fan-out are written together (one
/// gathered write per subscriber): still in order and exactly once.
#[test]
fn queued_publications_arrive_in_order_exactly_once() {
    let server = Server::start(2, "");
    let mut clients = clients_on_all_shards(&server, 200, 2);
    for client in &mut clients {
        client.subscribe("burst");
    }
    let mut admin = server.admin();
    // Pipelined: all 300 reach the owner before the first fan-out is done.
    let ids: Vec<u32> = (0..300)
        .map(|n| {
            admin
                .send(opcode::PUBLISH, |w| {
                    w.str16("burst").str16("e").bytes32(n.to_string().as_bytes());
                })
                .unwrap()
        })
        .collect();
    for id in ids {
        let reply = admin.receive().unwrap();
        assert_eq!(reply.request_id, id);
        reply.result.unwrap();
    }
    for client in &mut clients {
        for offset in 1..=300u64 {
            let push = client.recv();
            assert_eq!((push["offset"].as_u64(), push["data"].as_u64()), (Some(offset), Some(offset - 1)));
        }
    }
}

/// A shard far behind on fan-out makes owners refuse new publications
/// (`overloaded`) instead of queueing without bound; accepted ones all arrive.
#[test]
fn fanout_backlog_sheds_load_at_the_publisher() {
    let server = Server::start(2, "[limits]\nfanout_backlog_max = 1024\n");
    let mut clients = clients_on_all_shards(&server, 1500, 2);
    for client in &mut clients {
        client.send(json!({"op": "subscribe", "channel": "flood"}));
    }
    for client in &mut clients {
        assert_eq!(client.recv()["ok"], true);
    }
    let mut admin = server.admin();
    let ids: Vec<u32> = (0..200)
        .map(|n| {
            admin
                .send(opcode::PUBLISH, |w| {
                    w.str16("flood").str16("e").bytes32(n.to_string().as_bytes());
                })
                .unwrap()
        })
        .collect();
    let mut accepted = 0u64;
    let mut refused = 0u64;
    for id in ids {
        let reply = admin.receive().unwrap();
        assert_eq!(reply.request_id, id);
        match reply.result {
            Ok(payload) => {
                accepted += 1;
                // Refused publications take no offset: accepted ones stay contiguous.
                assert_eq!(kometa_protocol::admin::decode_published(&payload).unwrap().offset, accepted);
            }
            Err(error) => {
                assert_eq!(error.code, kometa_protocol::admin::ErrorCode::Overloaded, "{error}");
                refused += 1;
            }
        }
    }
    assert!(refused > 0, "200 pipelined publications to 1500 subscribers must exceed a backlog of 1024");
    assert!(accepted > 0);
    for client in clients.iter_mut().step_by(50) {
        for offset in 1..=accepted {
            assert_eq!(client.recv()["offset"], offset);
        }
    }
    let stats = server.stats();
    assert_eq!(stats["publications_refused"], refused);
}

/// Messages waiting in outboxes count in the shard's backlog: when many
/// clients stop reading, publications are refused (`overloaded`) before
/// any of them is cut off as a slow consumer, and accepted again once the
/// backlog is gone.
#[test]
fn clients_that_fall_behind_shed_publications_before_they_are_cut_off() {
    let config = "[limits]\nfanout_backlog_max = 1024\noutbox_bytes_max = 268435456\noutbox_messages_max = 4096\n";
    let server = Server::start(1, config);
    let mut stalled: Vec<std::net::TcpStream> = (0..40)
        .map(|_| {
            let mut stream = common::raw_websocket(&server);
            stream.write_all(&common::client_frame(0x81, br#"{"op":"subscribe","channel":"big","id":1}"#)).unwrap();
            let (_, reply) = common::read_server_frame(&mut stream).unwrap();
            assert!(String::from_utf8_lossy(&reply).contains("\"ok\":true"));
            stream
        })
        .collect();
    // 16 KiB publications: kernel buffers fill after some, then outboxes.
    let payload = format!("\"{}\"", "y".repeat(16 * 1024));
    let mut admin = server.admin();
    let mut refused = false;
    for _ in 0..2_000 {
        match admin.publish("big", "e", payload.as_bytes()) {
            Ok(_) => {}
            Err(kometa_admin_client::ClientError::Server(error)) => {
                assert_eq!(error.code, kometa_protocol::admin::ErrorCode::Overloaded, "{error}");
                refused = true;
                break;
            }
            Err(error) => panic!("{error}"),
        }
    }
    assert!(refused, "stalled clients' outboxes must push the backlog past 1024");
    let stats = server.stats();
    assert_eq!(stats["slow_consumers_closed"], 0, "shed before anyone is cut: {stats}");
    assert!(stats["shards"][0]["fanout_backlog"].as_u64().unwrap() >= 1024, "{stats}");
    // The stalled clients leave: their queued messages leave the backlog.
    stalled.clear();
    let deadline = std::time::Instant::now() + common::TIMEOUT;
    loop {
        match admin.publish("big", "e", b"1") {
            Ok(_) => break,
            Err(_) if std::time::Instant::now() < deadline => std::thread::sleep(std::time::Duration::from_millis(50)),
            Err(error) => panic!("the backlog never drained: {error}"),
        }
    }
    assert_eq!(server.stats()["shards"][0]["fanout_backlog"], 0);
}

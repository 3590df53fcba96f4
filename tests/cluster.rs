//! Cluster mode over real sockets and a real redis-server: several nodes
//! share fan-out, history, presence and users (docs/cluster.md).

mod common;

use std::time::Duration;

use common::{cluster_config, eventually, RedisServer, Server};
use serde_json::{json, Value};

const SECRET: &str = "cluster-test-secret-0123456789";

fn node(redis: &RedisServer, id: &str) -> Server {
    node_with(&[redis], id, "")
}

fn node_with(redis: &[&RedisServer], id: &str, extra: &str) -> Server {
    let config = format!("token_secret = \"{SECRET}\"\n{extra}\n{}", cluster_config(redis, id));
    Server::start(2, &config)
}

fn token(user: &str) -> String {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_kometa"))
        .args(["token", "--secret", SECRET, "--sub", user, "--ttl", "600"])
        .output()
        .expect("kometa token");
    String::from_utf8(output.stdout).expect("utf8").trim().to_string()
}

/// Pushes of `channel` received by `client` until `count` publications are in.
fn read_publications(client: &mut common::Client, channel: &str, count: usize) -> Vec<Value> {
    let mut received = Vec::new();
    while received.len() < count {
        let message = client.recv();
        // Publications only: loss notices carry an offset too.
        if message["channel"] == channel && message.get("offset").is_some() && message.get("recovered").is_none() {
            received.push(message);
        }
    }
    received
}

#[test]
fn publications_from_any_node_reach_every_subscriber_once_in_order() {
    let redis = RedisServer::start();
    let nodes: Vec<Server> = ["a", "b", "c"].iter().map(|id| node(&redis, id)).collect();
    let mut subscribers = Vec::new();
    for node in &nodes {
        for _ in 0..3 {
            let mut client = node.client();
            client.subscribe("news");
            subscribers.push(client);
        }
    }
    let mut offsets = Vec::new();
    for round in 0..4 {
        for (index, node) in nodes.iter().enumerate() {
            let published = node.publish("news", "update", &format!("{{\"round\":{round},\"via\":{index}}}"));
            offsets.push(published.offset);
        }
    }
    assert_eq!(offsets, (1..=12).collect::<Vec<u64>>(), "offsets come from Redis, one sequence for the cluster");
    for client in &mut subscribers {
        let received = read_publications(client, "news", 12);
        let got: Vec<u64> = received.iter().map(|m| m["offset"].as_u64().unwrap()).collect();
        assert_eq!(got, (1..=12).collect::<Vec<u64>>());
        assert_eq!(received[0]["data"], json!({"round": 0, "via": 0}));
        assert_eq!(received[11]["data"], json!({"round": 3, "via": 2}));
        // Nothing more: each publication arrived once.
        client.set_timeout(Duration::from_millis(300));
        assert!(client.socket.read().is_err(), "a publication arrived twice");
    }
}

#[test]
fn a_client_publication_on_one_node_reaches_another() {
    let redis = RedisServer::start();
    let b = node(&redis, "b");
    let c = node(&redis, "c");
    let mut listener = c.client();
    listener.subscribe("web_chat");
    let mut talker = b.client_at(&format!("/ws?token={}", token("42")));
    let reply = talker.request(json!({"op": "publish", "channel": "web_chat", "data": "hi", "id": 7}));
    assert_eq!(reply["ok"], true, "{reply}");
    let pushed = read_publications(&mut listener, "web_chat", 1);
    assert_eq!(pushed[0]["data"], "hi");
    assert_eq!(pushed[0]["user"], "42");
    assert_eq!(pushed[0]["offset"], reply["offset"]);
}

#[test]
fn resume_on_another_node_recovers_exactly_what_was_missed() {
    let redis = RedisServer::start();
    let a = node(&redis, "a");
    let b = node(&redis, "b");
    let mut client = a.client();
    let reply = client.subscribe("feed");
    let epoch = reply["epoch"].as_str().unwrap().to_string();
    for i in 1..=3 {
        a.publish("feed", "e", &i.to_string());
    }
    let seen = read_publications(&mut client, "feed", 3);
    assert_eq!(seen[2]["offset"], 3);
    drop(client);
    // Missed while away: published through both nodes.
    a.publish("feed", "e", "4");
    b.publish("feed", "e", "5");
    // Node b has never followed "feed": the resume is read from Redis.
    let mut resumed = b.client();
    let reply =
        resumed.request(json!({"op": "subscribe", "channel": "feed", "id": 1, "since": {"epoch": epoch, "offset": 3}}));
    assert_eq!(reply["recovered"], true, "{reply}");
    assert_eq!(reply["offset"], 5);
    let missed = read_publications(&mut resumed, "feed", 2);
    assert_eq!(missed.iter().map(|m| m["offset"].as_u64().unwrap()).collect::<Vec<_>>(), vec![4, 5]);
    a.publish("feed", "e", "6");
    assert_eq!(read_publications(&mut resumed, "feed", 1)[0]["offset"], 6);

    // A wrong epoch is told plainly.
    let mut stranger = b.client();
    let reply = stranger
        .request(json!({"op": "subscribe", "channel": "feed", "id": 2, "since": {"epoch": "0000", "offset": 3}}));
    assert_eq!(reply["recovered"], false, "{reply}");
    assert_eq!(reply["reason"], "epoch_changed");
}

#[test]
fn history_channel_info_and_channels_are_cluster_wide() {
    let redis = RedisServer::start();
    let a = node(&redis, "a");
    let b = node(&redis, "b");
    let mut on_a = a.client();
    on_a.subscribe("stocks");
    let mut on_b = b.client();
    on_b.subscribe("stocks");
    a.publish("stocks", "tick", "1");
    b.publish("stocks", "tick", "2");
    let history = b.admin().history("stocks", 0, 0).expect("history");
    let offsets: Vec<u64> =
        history["publications"].as_array().unwrap().iter().map(|p| p["offset"].as_u64().unwrap()).collect();
    assert_eq!(offsets, vec![1, 2]);
    // Subscriber counts reach Redis within the counts interval.
    let info = eventually("both subscribers counted", || {
        let info = a.admin().channel_info("stocks").expect("channel info");
        (info["subscribers"] == 2).then_some(info)
    });
    assert_eq!(info["offset"], 2);
    assert_eq!(info["history"], 2);
    let channels = b.admin().channels("sto", "", 0).expect("channels");
    assert_eq!(channels["channels"], json!([{"channel": "stocks", "subscribers": 2}]));
    // Other nodes' figures are at most two heartbeats old.
    let stats = eventually("both nodes' subscriptions in STATS", || {
        let stats = a.stats();
        (stats["subscriptions"] == 2).then_some(stats)
    });
    let nodes: Vec<&str> = stats["nodes"].as_array().unwrap().iter().map(|n| n["node"].as_str().unwrap()).collect();
    assert_eq!(nodes, vec!["a", "b"], "{stats}");
    // `--node`: this node's own figures, no one else's.
    let own = b.admin().stats_node().expect("stats of one node");
    assert_eq!((own["node"].as_str(), own["subscriptions"].as_u64()), (Some("b"), Some(1)), "{own}");
    assert!(own.get("nodes").is_none(), "{own}");
    let single = common::Server::start(1, "");
    let own = single.admin().stats_node().expect("stats of an unclustered node");
    assert_eq!(own["connections"], 0, "{own}");
}

/// The next message that is not a channel publication (user messages, events).
fn next_where(client: &mut common::Client, what: &str, matches: impl Fn(&Value) -> bool) -> Value {
    loop {
        let message = client.recv();
        if matches(&message) {
            return message;
        }
        assert!(message.get("error").is_none(), "waiting for {what}, got an error: {message}");
    }
}

#[test]
fn messages_to_users_reach_every_node_and_inboxes_follow_the_user() {
    let redis = RedisServer::start();
    let nodes: Vec<Server> = ["a", "b", "c"].iter().map(|id| node(&redis, id)).collect();
    let url = format!("/ws?token={}", token("7"));
    let mut on_a = nodes[0].client_at(&url);
    let mut on_b = nodes[1].client_at(&url);
    // Both registrations are in once the status says 2 connections.
    eventually("user 7 online twice", || {
        let status = nodes[2].admin().user_status(&["7"]).expect("status");
        (status["results"][0]["connections"] == 2).then_some(())
    });
    let sent = nodes[2].admin().send_user(&["7"], "notice", b"{\"n\":1}").expect("send");
    let row = &sent["results"][0];
    assert_eq!(row["user"], "7");
    assert_eq!(row["delivered"], 2);
    assert_eq!(row["stored"], true);
    let first = row["inbox"].as_u64().expect("inbox seq");
    for client in [&mut on_a, &mut on_b] {
        let message = next_where(client, "the user message", |m| m.get("inbox").is_some());
        assert_eq!(message["inbox"].as_u64(), Some(first));
        assert_eq!(message["data"], json!({"n": 1}));
    }
    drop(on_a);
    drop(on_b);
    eventually("user 7 offline", || {
        let status = nodes[0].admin().user_status(&["7"]).expect("status");
        (status["results"][0]["status"] == "offline").then_some(())
    });
    let sent = nodes[1].admin().send_user(&["7"], "notice", b"{\"n\":2}").expect("send");
    assert_eq!(sent["results"][0]["delivered"], 0);
    let second = sent["results"][0]["inbox"].as_u64().expect("stored");
    assert!(second > first);

    // Back on a third node: both unacknowledged messages, in order.
    let mut on_c = nodes[2].client_at(&url);
    let replay: Vec<u64> = (0..2)
        .map(|_| next_where(&mut on_c, "the inbox replay", |m| m.get("inbox").is_some())["inbox"].as_u64().unwrap())
        .collect();
    assert_eq!(replay, vec![first, second]);
    let reply = on_c.request(json!({"op": "ack", "inbox": second, "id": 3}));
    assert_eq!(reply["ok"], true);
    drop(on_c);

    // Acknowledged on c: not redelivered on a.
    eventually("user 7 offline again", || {
        let status = nodes[0].admin().user_status(&["7"]).expect("status");
        (status["results"][0]["status"] == "offline").then_some(())
    });
    let mut again = nodes[0].client_at(&url);
    let probe = again.request(json!({"op": "ping", "id": 9}));
    assert_eq!(probe["id"], 9, "a redelivered inbox message came before the ping reply: {probe}");
    again.set_timeout(Duration::from_millis(300));
    assert!(again.socket.read().is_err(), "an acknowledged message came back");
}

#[test]
fn presence_join_leave_and_status_are_cluster_wide_and_a_dead_node_drops_out() {
    let redis = RedisServer::start();
    let a = node(&redis, "a");
    let b = node(&redis, "b");
    let mut c = node(&redis, "c");
    let mut watcher = a.client();
    watcher.subscribe("user_status_8");
    watcher.subscribe("track_room");
    let mut seven = b.client_at(&format!("/ws?token={}", token("7")));
    seven.subscribe("track_room");
    let join = next_where(&mut watcher, "join of 7", |m| m["event"] == "join");
    assert_eq!(join["data"], json!({"user": "7"}));
    let presence = c.admin().presence("track_room", "", 0).expect("presence");
    assert_eq!(presence["members"], json!([{"user": "7", "connections": 1}]), "{presence}");
    assert_eq!(presence["anonymous"], 1);
    let stats = a.admin().presence_stats("track_room").expect("presence stats");
    assert_eq!((stats["users"].as_u64(), stats["connections"].as_u64()), (Some(1), Some(2)), "{stats}");

    drop(seven);
    let leave = next_where(&mut watcher, "leave of 7", |m| m["event"] == "leave");
    assert_eq!(leave["data"], json!({"user": "7"}));

    // A node that dies without a word: its user leaves presence and goes
    // offline within node_timeout_ms (1 s here) plus a heartbeat or two.
    let mut eight = c.client_at(&format!("/ws?token={}", token("8")));
    eight.subscribe("track_room");
    // 8 comes online (at connect) and joins (at subscribe), in that order.
    next_where(&mut watcher, "8 online", |m| m["channel"] == "user_status_8" && m["event"] == "online");
    next_where(&mut watcher, "join of 8", |m| m["event"] == "join" && m["data"]["user"] == "8");
    // SAFETY: signalling our own child process.
    unsafe { libc::kill(c.pid(), libc::SIGKILL) };
    let _ = c.wait_exit();
    let killed = std::time::Instant::now();
    watcher.set_timeout(Duration::from_secs(5));
    let leave = next_where(&mut watcher, "leave of 8", |m| m["event"] == "leave");
    assert_eq!(leave["data"], json!({"user": "8"}));
    let offline = next_where(&mut watcher, "8 offline", |m| m["channel"] == "user_status_8");
    assert_eq!(offline["event"], "offline");
    assert!(killed.elapsed() < Duration::from_secs(4), "took {:?}", killed.elapsed());
    let status = b.admin().user_status(&["8"]).expect("status");
    assert_eq!(status["results"][0]["status"], "offline");
    let presence = b.admin().presence("track_room", "", 0).expect("presence");
    assert_eq!(presence["members"], json!([]), "{presence}");
}

#[test]
fn redis_down_refuses_publications_and_nothing_acknowledged_is_lost_silently() {
    let mut redis = RedisServer::start();
    let port = redis.port;
    let a = node(&redis, "a");
    let b = node(&redis, "b");
    let mut subscriber = b.client();
    subscriber.subscribe("ticks");
    let mut admin = a.admin();
    // Some((epoch, offset)) when acknowledged, None when refused as
    // unavailable, or answered unknown_outcome: a publication written to
    // Redis just as it died (the link learns of the death by that request).
    let try_publish = |admin: &mut kometa_admin_client::AdminClient| match admin.publish("ticks", "t", b"1") {
        Ok(published) => Some((published.epoch.clone(), published.offset)),
        Err(kometa_admin_client::ClientError::Server(error)) => {
            assert!(matches!(error.code.as_str(), "unavailable" | "unknown_outcome"), "{error:?}");
            None
        }
        Err(other) => panic!("admin: {other}"),
    };
    let mut acked: Vec<(String, u64)> = (0..20).filter_map(|_| try_publish(&mut admin)).collect();
    assert_eq!(acked.len(), 20);
    redis.kill();
    let mut refused = 0;
    for _ in 0..20 {
        match try_publish(&mut admin) {
            Some(published) => acked.push(published),
            None => refused += 1,
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(refused > 0, "no publication was refused while Redis was down");
    // The health check says so.
    let health = common::http(&a, "GET", "/health", &[], b"");
    assert_eq!(health.json()["status"], "degraded", "{}", String::from_utf8_lossy(&health.body));
    let _redis = RedisServer::start_on(port);
    acked.push(eventually("publishing works again", || try_publish(&mut admin)));
    acked.extend((0..5).filter_map(|_| try_publish(&mut admin)));
    let last = acked.last().cloned().expect("acknowledged");
    // Every acknowledged publication was delivered, or the subscriber was
    // told plainly what it lost; then it follows the new epoch.
    let mut delivered: Vec<(String, u64)> = Vec::new();
    let mut notices = Vec::new();
    subscriber.set_timeout(Duration::from_secs(5));
    while delivered.last() != Some(&last) {
        let message = subscriber.recv();
        if message["recovered"] == false {
            notices.push(message);
        } else if message["channel"] == "ticks" {
            // Pushes carry no epoch: the epoch is the one announced last.
            let epoch = notices.last().map_or(acked[0].0.clone(), |n| n["epoch"].as_str().unwrap().to_string());
            delivered.push((epoch, message["offset"].as_u64().unwrap()));
        }
    }
    assert!(!notices.is_empty(), "the epoch changed without a word to the subscriber");
    assert_eq!(notices[0]["reason"], "epoch_changed");
    // A notice covers its own epoch up to its offset, and all of an earlier epoch.
    for (epoch, offset) in &acked {
        let announced = notices
            .iter()
            .any(|n| n["epoch"] != epoch.as_str() || n["offset"].as_u64().is_some_and(|covered| covered >= *offset));
        assert!(delivered.contains(&(epoch.clone(), *offset)) || announced, "{epoch}:{offset} lost silently");
    }
    for pair in delivered.windows(2) {
        assert!(pair[0].0 != pair[1].0 || pair[0].1 < pair[1].1, "out of order: {pair:?}");
    }
    for node in [&a, &b] {
        assert!(node.stats()["connections"].as_u64().is_some(), "a node stopped answering");
    }
}

#[test]
fn channels_and_users_spread_over_two_redis_instances() {
    let first = RedisServer::start();
    let second = RedisServer::start();
    let a = node_with(&[&first, &second], "a", "");
    let b = node_with(&[&first, &second], "b", "");
    let channels: Vec<String> = (0..8).map(|i| format!("spread-{i}")).collect();
    let mut client = b.client();
    for channel in &channels {
        client.subscribe(channel);
    }
    for channel in &channels {
        a.publish(channel, "e", "1");
    }
    let mut seen = std::collections::HashSet::new();
    while seen.len() < channels.len() {
        let message = client.recv();
        if message.get("offset").is_some() {
            seen.insert(message["channel"].as_str().unwrap().to_string());
        }
    }
    let holds = |redis: &RedisServer| {
        channels
            .iter()
            .filter(|c| redis.command(&["EXISTS", &format!("kometa:m:{c}")]).is_some_and(|r| r.contains(":1")))
            .count()
    };
    let (on_first, on_second) = (holds(&first), holds(&second));
    assert_eq!(on_first + on_second, channels.len());
    assert!(on_first > 0 && on_second > 0, "all channels on one instance: {on_first}/{on_second}");
}

#[test]
fn with_the_refuse_policy_a_node_without_redis_turns_new_clients_away() {
    let mut redis = RedisServer::start();
    let a = node_with(&[&redis], "a", "");
    let b = {
        let config =
            format!("token_secret = \"{SECRET}\"\n{}on_redis_down = \"refuse\"\n", cluster_config(&[&redis], "b"));
        Server::start(2, &config)
    };
    let mut existing = b.client();
    existing.subscribe("news");
    assert_eq!(common::http(&b, "GET", "/health", &[], b"").status, 200);
    redis.kill();
    eventually("b refuses new clients", || (common::http(&b, "GET", "/health", &[], b"").status == 503).then_some(()));
    let refused = common::http(
        &b,
        "GET",
        "/ws",
        &[
            ("Upgrade", "websocket"),
            ("Connection", "Upgrade"),
            ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
            ("Sec-WebSocket-Version", "13"),
        ],
        b"",
    );
    assert_eq!(refused.status, 503, "{}", refused.head);
    let sse = common::http(&b, "GET", "/sse?channel=news", &[], b"");
    assert_eq!(sse.status, 503);
    assert_eq!(sse.json()["error"]["code"], "unavailable");
    // The default policy keeps serving (what needs Redis says so).
    let mut on_a = a.client();
    let reply = on_a.request(json!({"op": "subscribe", "channel": "fresh", "id": 4}));
    assert_eq!(reply["error"]["code"], "unavailable", "{reply}");
    // Existing connections stay open.
    let pong = existing.request(json!({"op": "ping", "id": 5}));
    assert_eq!(pong["ok"], true);
}

#[test]
fn a_node_that_stops_says_goodbye_at_once() {
    let redis = RedisServer::start();
    let a = node(&redis, "a");
    let mut b = node(&redis, "b");
    let mut watcher = a.client();
    watcher.subscribe("track_lobby");
    let mut nine = b.client_at(&format!("/ws?token={}", token("9")));
    nine.subscribe("track_lobby");
    next_where(&mut watcher, "join of 9", |m| m["event"] == "join");
    let stopping = std::time::Instant::now();
    assert!(b.terminate().success());
    watcher.set_timeout(Duration::from_secs(5));
    next_where(&mut watcher, "leave of 9", |m| m["event"] == "leave");
    let status = a.admin().user_status(&["9"]).expect("status");
    assert_eq!(status["results"][0]["status"], "offline");
    // Well within node_timeout_ms: nobody had to take it for dead.
    let nodes = redis.command(&["ZCARD", "kometa:nodes"]).unwrap_or_default();
    assert!(nodes.contains(":1"), "b is still listed: {nodes}");
    assert!(stopping.elapsed() < Duration::from_secs(3), "{:?}", stopping.elapsed());
}

/// `kometa load` over a real cluster: subscribers spread over two nodes,
/// resuming on the other node when they churn, publications made through a
/// third; the load generator's own exactly-once check must pass.
#[test]
fn load_generator_checks_exactly_once_across_nodes() {
    let redis = RedisServer::start();
    let nodes: Vec<Server> = ["a", "b", "c"].iter().map(|id| node(&redis, id)).collect();
    let admin = nodes[2].admin.to_string();
    let json = nodes[2].dir.join("churn.json");
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_kometa"))
        .args(["load", "churn", "--connections", "200", "--rate", "40", "--churn-rate", "80"])
        .args(["--duration", "2s", "--settle", "200ms", "--channel", "cluster-load", "--check"])
        .arg("--url")
        .arg(format!("{},{}", nodes[0].url("/ws"), nodes[1].url("/ws")))
        .arg("--admin")
        .arg(&admin)
        .arg("--json")
        .arg(&json)
        .output()
        .expect("run kometa load");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "kometa load failed:\n{stdout}\n{}", String::from_utf8_lossy(&output.stderr));
    let report: Value = serde_json::from_slice(&std::fs::read(&json).expect("report")).expect("JSON");
    let accepted = report["publications"]["accepted"].as_u64().expect("accepted");
    assert!(accepted > 0);
    assert_eq!(report["deliveries"]["unique"].as_u64(), Some(accepted * 200), "{stdout}");
    assert_eq!(report["deliveries"]["duplicates"], 0);
    assert!(report["churn"]["recovered"].as_u64().unwrap_or(0) > 0, "{stdout}");
    assert_eq!(report["churn"]["not_recovered"], 0, "{stdout}");
}

#[test]
fn disconnect_and_revocation_reach_every_node() {
    let redis = RedisServer::start();
    let a = node(&redis, "a");
    let b = node(&redis, "b");
    let c = node(&redis, "c");
    let now_s = kometa::util::unix_time_ms() / 1000;
    let old_token = kometa_protocol::token::sign(SECRET, &json!({"sub": "jack", "iat": now_s - 100}));
    let mut on_a = a.client_at(&format!("/ws?token={old_token}"));
    let mut on_b = b.client_at(&format!("/ws?token={old_token}"));
    eventually("jack online twice", || {
        let status = c.admin().user_status(&["jack"]).expect("status");
        (status["results"][0]["connections"] == 2).then_some(())
    });
    let reply = c.admin().disconnect("jack", 0, "banned", now_s - 50).expect("disconnect");
    assert_eq!(reply, json!({"user": "jack", "disconnected": 2}));
    assert_eq!(on_a.close_code(), Some(4003));
    assert_eq!(on_b.close_code(), Some(4003));
    // The revocation holds on every node.
    let mut retry = b.client_at(&format!("/ws?token={old_token}"));
    assert_eq!(retry.close_code(), Some(4001));
    let fresh = kometa_protocol::token::sign(SECRET, &json!({"sub": "jack", "iat": now_s}));
    let mut again = a.client_at(&format!("/ws?token={fresh}"));
    assert_eq!(again.request(json!({"op": "ping", "id": 1})), json!({"id": 1, "ok": true}));
}

#[test]
fn presence_pages_through_members_cluster_wide() {
    let redis = RedisServer::start();
    let a = node(&redis, "a");
    let b = node(&redis, "b");
    let mut clients = Vec::new();
    for (index, user) in ["u1", "u2", "u3", "u4", "u5"].iter().enumerate() {
        let node = if index % 2 == 0 { &a } else { &b };
        let mut client = node.client_at(&format!("/ws?token={}", token(user)));
        client.subscribe("track_page");
        clients.push(client);
    }
    let first = eventually("five members", || {
        let page = a.admin().presence("track_page", "", 2).expect("presence");
        let stats = b.admin().presence_stats("track_page").expect("stats");
        (stats["users"] == 5).then_some(page)
    });
    assert_eq!(first["members"], json!([{"user": "u1", "connections": 1}, {"user": "u2", "connections": 1}]));
    assert_eq!(first["next"], "u2");
    let second = b.admin().presence("track_page", "u2", 2).expect("presence");
    assert_eq!(second["members"], json!([{"user": "u3", "connections": 1}, {"user": "u4", "connections": 1}]));
    let last = a.admin().presence("track_page", "u4", 2).expect("presence");
    assert_eq!(last["members"], json!([{"user": "u5", "connections": 1}]));
    assert_eq!(last["next"], Value::Null);
    // A client's presence query pages like the admin one.
    clients[0].send(json!({"op": "presence", "channel": "track_page", "id": 8}));
    let reply = next_where(&mut clients[0], "the presence reply", |m| m["id"] == 8);
    assert_eq!(reply["members"].as_array().map(Vec::len), Some(5), "{reply}");
}

/// Runs `kometa serve` expecting it to refuse to start; returns its stderr.
fn refused_start(config: &str, listen: &str) -> String {
    let dir = common::temp_dir("refused");
    let config_path = dir.join("kometa.toml");
    std::fs::write(&config_path, config).expect("write config");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_kometa"))
        .arg("serve")
        .arg("--config")
        .arg(&config_path)
        .args(["--listen", listen, "--shards", "1"])
        .arg("--admin")
        .arg(format!("unix:{}", dir.join("admin.sock").display()))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn kometa");
    let deadline = std::time::Instant::now() + common::TIMEOUT;
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            assert!(!status.success(), "a second process started on {listen}");
            let mut stderr = String::new();
            use std::io::Read;
            child.stderr.take().expect("stderr").read_to_string(&mut stderr).expect("read stderr");
            return stderr;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("a second process started on {listen} and kept running");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn nodes_of_one_cluster_may_share_an_address_others_may_not() {
    let redis = RedisServer::start();
    let listen = format!("127.0.0.1:{}", common::free_port());
    let config = |id: &str| format!("token_secret = \"{SECRET}\"\n{}", cluster_config(&[&redis], id));
    let a = Server::start_with(2, &config("a"), &["--listen", &listen]);
    let b = Server::start_with(2, &config("b"), &["--listen", &listen]);
    // The kernel spreads connections over both processes' listeners.
    let mut clients = Vec::new();
    for _ in 0..200 {
        let mut client = a.client();
        client.subscribe("shared");
        clients.push(client);
        let (on_a, on_b) = (a.stats()["connections"].as_u64(), b.stats()["nodes"][0]["connections"].as_u64());
        if clients.len() >= 8 && on_a.unwrap_or(0) > 0 && on_b.unwrap_or(0) > 0 {
            break;
        }
    }
    let on_b = b.stats()["nodes"][0]["connections"].as_u64().unwrap_or(0);
    assert!(on_b > 0 && on_b < clients.len() as u64, "connections did not spread: {on_b} of {}", clients.len());
    let published = b.publish("shared", "e", "1");
    for client in &mut clients {
        let message = read_publications(client, "shared", 1);
        assert_eq!(message[0]["offset"].as_u64(), Some(published.offset));
    }

    // Not a member of this cluster: refused, with the reason.
    let single = refused_start("", &listen);
    assert!(single.contains("already served by a Kometa node of another cluster"), "{single}");
    let other = RedisServer::start();
    let stranger = refused_start(&cluster_config(&[&other], "x"), &listen);
    assert!(stranger.contains("give it the same cluster.redis"), "{stranger}");
}

#[test]
fn a_second_single_node_on_the_same_address_is_refused() {
    let listen = format!("127.0.0.1:{}", common::free_port());
    let _first = Server::start_with(1, "", &["--listen", &listen]);
    let stderr = refused_start("", &listen);
    assert!(stderr.contains("is already served by another process"), "{stderr}");
    assert!(stderr.contains("--redis"), "{stderr}");
}

/// Redis restarted from an older snapshot: its offsets went back. The
/// publications that follow must not pass for ones subscribers already saw
/// (they were dropped as repeats before): the channel gets a new epoch,
/// subscribers are told, and delivery goes on.
#[test]
fn redis_restored_from_an_older_snapshot_changes_the_epoch() {
    let mut redis = RedisServer::start();
    let a = node(&redis, "a");
    let b = node(&redis, "b");
    let mut subscriber = b.client();
    let epoch = subscriber.subscribe("snap")["epoch"].as_str().unwrap().to_string();
    for i in 1..=5 {
        a.publish("snap", "e", &i.to_string());
    }
    assert!(redis.command(&["SAVE"]).is_some_and(|r| r.contains("OK")));
    for i in 6..=10 {
        a.publish("snap", "e", &i.to_string());
    }
    assert_eq!(read_publications(&mut subscriber, "snap", 10)[9]["offset"], 10);
    redis.restart();
    let published = eventually("publishing works again", || a.admin().publish("snap", "e", b"11").ok());
    assert_ne!(published.epoch, epoch, "offsets restarted under the old epoch");
    // The subscriber hears that its position is gone, then gets the new ones.
    subscriber.set_timeout(Duration::from_secs(5));
    let notice = next_where(&mut subscriber, "the loss notice", |m| m["recovered"] == false);
    assert_eq!(notice["reason"], "epoch_changed");
    assert_eq!(notice["epoch"].as_str(), Some(published.epoch.as_str()));
    // Publication 11 is delivered after the notice, or (if it came before
    // node b had caught up with the restarted Redis) covered by it.
    a.publish("snap", "e", "12");
    let mut after: Vec<Value> = Vec::new();
    while after.last().is_none_or(|m| m["data"] != 12) {
        after.extend(read_publications(&mut subscriber, "snap", 1));
    }
    let data: Vec<&Value> = after.iter().map(|m| &m["data"]).collect();
    assert!(data == [&json!(11), &json!(12)] || data == [&json!(12)], "{data:?}");
}

/// History is trimmed approximately in Redis; pages still hold the last
/// `history_size` publications, as on a single node.
#[test]
fn history_pages_hold_the_last_history_size_publications() {
    let redis = RedisServer::start();
    let a = node(&redis, "a");
    for i in 1..=250 {
        a.publish("long", "e", &i.to_string());
    }
    let mut admin = a.admin();
    let page = admin.history("long", 0, 10).expect("history");
    let offsets: Vec<u64> =
        page["publications"].as_array().unwrap().iter().map(|p| p["offset"].as_u64().unwrap()).collect();
    assert_eq!(offsets, (151..=160).collect::<Vec<u64>>(), "{page}");
    assert_eq!(page["next"], 160);
    let last = admin.history("long", 245, 0).expect("history");
    assert_eq!(last["publications"].as_array().map(Vec::len), Some(5));
    let info = admin.channel_info("long").expect("info");
    assert_eq!(info["history"], 100);
}

/// A Redis user without channel rights cannot subscribe: said loudly.
#[test]
fn a_redis_user_without_pubsub_rights_is_reported() {
    let redis = RedisServer::start();
    redis.command(&["ACL", "SETUSER", "nochan", "on", ">secret-pass", "~*", "+@all", "resetchannels"]).expect("ACL");
    let config = format!(
        "token_secret = \"{SECRET}\"\n[cluster]\nredis = \"redis://nochan:secret-pass@127.0.0.1:{}\"\nnode_id = \"x\"\n\
         reconnect_backoff_max_ms = 300\n",
        redis.port
    );
    let node = Server::start(1, &config);
    let mut client = node.client();
    let reply = client.request(json!({"op": "subscribe", "channel": "news", "id": 1}));
    assert!(reply.get("error").is_some(), "{reply}");
    let said = eventually("the ACL error in the log", || {
        node.log.try_iter().find(|line| line.contains("Redis refused SUBSCRIBE"))
    });
    assert!(said.contains("ACL"), "{said}");
}

/// Restarting one of two Redis instances makes the node register again
/// once per restart, not in a loop (heartbeat replies of an earlier
/// incarnation used to look like "this node was dropped").
#[test]
fn restarting_one_of_two_redis_instances_resets_once() {
    let first = RedisServer::start();
    let mut second = RedisServer::start();
    let node = node_with(&[&first, &second], "a", "");
    let mut client = node.client();
    client.subscribe("steady");
    for _ in 0..3 {
        second.restart();
        eventually("the node back on both", || {
            let health = common::http(&node, "GET", "/health", &[], b"");
            (health.json()["cluster"]["state"] == "ok").then_some(())
        });
    }
    std::thread::sleep(Duration::from_millis(600));
    let dropped = node.log.try_iter().filter(|line| line.contains("missing from Redis's node list")).count();
    assert_eq!(dropped, 0, "spurious re-registrations");
    node.publish("steady", "e", "1");
    assert_eq!(read_publications(&mut client, "steady", 1)[0]["data"], 1);
}

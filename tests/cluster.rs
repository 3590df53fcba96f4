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
        if message["channel"] == channel && message.get("offset").is_some() {
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
    let reply = resumed.request(json!({"op": "subscribe", "channel": "feed", "id": 1, "since": {"epoch": epoch, "offset": 3}}));
    assert_eq!(reply["recovered"], true, "{reply}");
    assert_eq!(reply["offset"], 5);
    let missed = read_publications(&mut resumed, "feed", 2);
    assert_eq!(missed.iter().map(|m| m["offset"].as_u64().unwrap()).collect::<Vec<_>>(), vec![4, 5]);
    a.publish("feed", "e", "6");
    assert_eq!(read_publications(&mut resumed, "feed", 1)[0]["offset"], 6);

    // A wrong epoch is told plainly.
    let mut stranger = b.client();
    let reply = stranger.request(json!({"op": "subscribe", "channel": "feed", "id": 2, "since": {"epoch": "0000", "offset": 3}}));
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
    let offsets: Vec<u64> = history["publications"].as_array().unwrap().iter().map(|p| p["offset"].as_u64().unwrap()).collect();
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
}

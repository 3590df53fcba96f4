//! Comet features over real sockets, with connections on different shards:
//! users and tokens, messages to users with an inbox, presence, status,
//! history and resume, namespaces.

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::{Client, Server};
use kometa_protocol::token::sign;
use serde_json::{json, Value};

const SECRET: &str = "test-secret-0123456789";

fn config(extra: &str) -> String {
    format!("token_secret = \"{SECRET}\"\n{extra}")
}

fn now_s() -> u64 {
    kometa::util::unix_time_ms() / 1000
}

fn token(user: &str) -> String {
    sign(SECRET, &json!({"sub": user, "iat": now_s(), "exp": now_s() + 3600}))
}

fn user_client(server: &Server, user: &str) -> Client {
    server.client_at(&format!("/ws?token={}", token(user)))
}

/// Opens `count` clients for `user` that sit on at least two shards. The
/// kernel spreads connections over the shards' listeners by a hash, so all
/// of a few may land on one; the last client is reopened until it lands
/// elsewhere (bounded; each try has even odds with two shards).
fn clients_on_two_shards(server: &Server, user: &str, count: usize) -> Vec<Client> {
    const LAST_CLIENT_TRIES: usize = 64;
    let authenticated =
        |n: usize| server.wait_stats("authenticated connections", |s| s["authenticated"].as_u64() == Some(n as u64));
    let mut clients: Vec<Client> = (0..count - 1).map(|_| user_client(server, user)).collect();
    authenticated(count - 1);
    for _ in 0..LAST_CLIENT_TRIES {
        let client = user_client(server, user);
        let stats = authenticated(count);
        let busy = stats["shards"].as_array().unwrap().iter().filter(|s| s["authenticated"].as_u64() > Some(0)).count();
        if busy >= 2 {
            clients.push(client);
            return clients;
        }
        drop(client);
        authenticated(count - 1);
    }
    panic!("{user}'s connections kept landing on one shard");
}

#[test]
fn a_message_to_a_user_reaches_all_their_connections_and_no_one_else() {
    let server = Server::start(2, &config(""));
    let mut alice = clients_on_two_shards(&server, "alice", 8);
    let mut bob = user_client(&server, "bob");
    let mut anonymous = server.client();
    let reply = server.admin().send_user(&["alice"], "notice", br#"{"text":"hi"}"#).unwrap();
    let seq = reply["results"][0]["inbox"].as_u64().expect("stored with a sequence");
    assert_eq!(
        reply["results"][0],
        json!({"user": "alice", "delivered": 8, "stored": true, "inbox_full": false, "inbox": seq})
    );
    for client in &mut alice {
        assert_eq!(client.recv(), json!({"inbox": seq, "event": "notice", "data": {"text": "hi"}}));
    }
    // The others got nothing: their next message is the reply to a ping.
    for client in [&mut bob, &mut anonymous] {
        assert_eq!(client.request(json!({"op": "ping", "id": 1})), json!({"id": 1, "ok": true}));
    }
    // Several users in one request: results in request order.
    let reply = server.admin().send_user(&["zed", "bob", "alice"], "n", b"2").unwrap();
    let users: Vec<&str> = reply["results"].as_array().unwrap().iter().map(|r| r["user"].as_str().unwrap()).collect();
    assert_eq!(users, vec!["zed", "bob", "alice"]);
    assert_eq!(reply["results"][0]["delivered"], 0);
    assert_eq!(bob.recv()["data"], 2);
}

#[test]
fn an_offline_user_gets_the_inbox_in_order_acked_ones_not_again_expired_ones_gone() {
    let server =
        Server::start(2, &config("[inbox]\nmessages_max = 3\nttl_ms = 1500\n[timeouts]\nsweep_interval_ms = 50\n"));
    let mut admin = server.admin();
    let mut stored = Vec::new();
    for n in 1..=3 {
        let reply = admin.send_user(&["carol"], "m", n.to_string().as_bytes()).unwrap();
        assert_eq!(reply["results"][0]["stored"], true);
        assert_eq!(reply["results"][0]["delivered"], 0);
        stored.push(reply["results"][0]["inbox"].as_u64().expect("a sequence"));
    }
    // Consecutive, and far from 1: numbering starts from the clock, so a
    // client never mistakes new messages for ones it acknowledged before.
    assert_eq!(stored, vec![stored[0], stored[0] + 1, stored[0] + 2]);
    assert!(stored[0] > 1_000_000_000_000_000 && stored[0] < 1 << 53, "{stored:?}");
    // The fourth does not fit: the publisher is told, nothing is dropped silently.
    let reply = admin.send_user(&["carol"], "m", b"4").unwrap();
    assert_eq!(reply["results"][0], json!({"user": "carol", "delivered": 0, "stored": false, "inbox_full": true}));

    let mut carol = user_client(&server, "carol");
    let seqs: Vec<Value> = (0..3).map(|_| carol.recv()).collect();
    assert_eq!(seqs.iter().map(|m| m["inbox"].as_u64().unwrap()).collect::<Vec<_>>(), stored);
    assert_eq!(seqs.iter().map(|m| m["data"].clone()).collect::<Vec<_>>(), vec![json!(1), json!(2), json!(3)]);
    assert_eq!(carol.request(json!({"op": "ack", "inbox": stored[1], "id": 9})), json!({"id": 9, "ok": true}));
    drop(carol);

    let mut again = user_client(&server, "carol");
    assert_eq!(again.recv()["inbox"], stored[2], "acked messages are not re-sent");
    assert_eq!(again.request(json!({"op": "ping", "id": 1})), json!({"id": 1, "ok": true}));
    drop(again);

    std::thread::sleep(Duration::from_millis(1700));
    let mut later = user_client(&server, "carol");
    assert_eq!(
        later.request(json!({"op": "ping", "id": 2})),
        json!({"id": 2, "ok": true}),
        "expired messages are gone"
    );
    // The inbox has room again.
    let reply = admin.send_user(&["carol"], "m", b"5").unwrap();
    assert_eq!(reply["results"][0]["stored"], true);
    assert_eq!(reply["results"][0]["delivered"], 1);
    assert_eq!(later.recv()["data"], 5);
}

#[test]
fn presence_lists_members_across_shards_with_join_and_leave_events() {
    let server = Server::start(2, &config(""));
    let mut watcher = user_client(&server, "watcher");
    watcher.subscribe("track_room");
    assert_eq!(watcher.recv(), json!({"channel": "track_room", "event": "join", "data": {"user": "watcher"}}));

    let mut members: Vec<(String, Client)> = Vec::new();
    for user in ["u1", "u2", "u3"] {
        for _ in 0..3 {
            let mut client = user_client(&server, user);
            client.subscribe("track_room");
            members.push((user.to_string(), client));
        }
    }
    let mut anonymous = server.client();
    anonymous.subscribe("track_room");
    // One join per user, however many connections it has, in order.
    let joins: Vec<Value> = (0..3).map(|_| watcher.recv()).collect();
    assert_eq!(
        joins.iter().map(|j| j["data"]["user"].clone()).collect::<Vec<_>>(),
        vec![json!("u1"), json!("u2"), json!("u3")]
    );

    let presence = server.admin().presence("track_room", "", 0).unwrap();
    assert_eq!(presence["anonymous"], 1);
    let listed: Vec<(String, u64)> = presence["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| (m["user"].as_str().unwrap().to_string(), m["connections"].as_u64().unwrap()))
        .collect();
    assert_eq!(listed, vec![("u1".into(), 3), ("u2".into(), 3), ("u3".into(), 3), ("watcher".into(), 1)]);
    let stats = server.admin().presence_stats("track_room").unwrap();
    assert_eq!(
        (stats["users"].clone(), stats["connections"].clone(), stats["anonymous"].clone()),
        (json!(4), json!(11), json!(1))
    );
    // Paged with a cursor.
    let page = server.admin().presence("track_room", "", 2).unwrap();
    assert_eq!(page["members"].as_array().unwrap().len(), 2);
    assert_eq!(page["next"], "u2");
    let page = server.admin().presence("track_room", "u2", 2).unwrap();
    assert_eq!(page["members"][0]["user"], "u3");
    assert_eq!(page["next"], Value::Null);
    // Clients may ask too, where the namespace keeps presence.
    let reply = watcher.request(json!({"op": "presence_stats", "channel": "track_room", "id": 5}));
    assert_eq!(reply["users"], 4);
    let reply = anonymous.request(json!({"op": "presence", "channel": "news", "id": 6}));
    assert_eq!(reply["error"]["code"], "forbidden");

    // u2 leaves only when its last connection goes.
    let (mut u2, others): (Vec<_>, Vec<_>) = members.into_iter().partition(|(user, _)| user == "u2");
    let last_u2 = u2.pop();
    drop(u2);
    assert_eq!(watcher.request(json!({"op": "ping", "id": 7})), json!({"id": 7, "ok": true}), "no leave yet");
    drop(others);
    let leaves: HashSet<String> =
        (0..2).map(|_| watcher.recv()["data"]["user"].as_str().unwrap().to_string()).collect();
    assert_eq!(leaves, HashSet::from(["u1".to_string(), "u3".to_string()]));
    drop(last_u2);
    assert_eq!(watcher.recv(), json!({"channel": "track_room", "event": "leave", "data": {"user": "u2"}}));

    // An anonymous subscriber cannot become a user afterwards (its presence
    // was counted anonymously): refused, and it leaves as what it joined as.
    anonymous.send(json!({"op": "connect", "token": token("u1"), "id": 8}));
    // Skip the join/leave events it got as a subscriber of the channel.
    let reply = std::iter::repeat_with(|| anonymous.recv()).find(|m| m.get("id").is_some()).unwrap();
    assert_eq!(reply["error"]["code"], "bad_request", "{reply}");
    drop(anonymous);
    let stats = server.wait_stats("the anonymous subscriber gone", |s| s["connections"] == 1);
    let presence = server.admin().presence_stats("track_room").unwrap();
    assert_eq!((presence["users"].clone(), presence["anonymous"].clone()), (json!(1), json!(0)), "{stats}");
    assert_eq!(watcher.request(json!({"op": "ping", "id": 9})), json!({"id": 9, "ok": true}), "no false leave");
}

#[test]
fn user_status_online_then_last_seen() {
    let server = Server::start(2, &config(""));
    let before = now_s();
    let dave = user_client(&server, "dave");
    let mut status_watcher = server.client();
    status_watcher.subscribe("user_status_erin");
    let status = server.admin().user_status(&["dave", "nobody"]).unwrap();
    assert_eq!(status["results"][0], json!({"user": "dave", "status": "online", "connections": 1}));
    assert_eq!(status["results"][1], json!({"user": "nobody", "status": "unknown"}));
    drop(dave);
    let deadline = Instant::now() + common::TIMEOUT;
    loop {
        let status = server.admin().user_status(&["dave"]).unwrap();
        if status["results"][0]["status"] == "offline" {
            let last_seen = status["results"][0]["last_seen"].as_u64().unwrap();
            assert!(last_seen >= before && last_seen <= now_s());
            break;
        }
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(20));
    }
    // Status events go to user_status_<id> while that channel exists.
    let erin = user_client(&server, "erin");
    let online = status_watcher.recv();
    assert_eq!((online["channel"].clone(), online["event"].clone()), (json!("user_status_erin"), json!("online")));
    drop(erin);
    let offline = status_watcher.recv();
    assert_eq!(offline["event"], "offline");
    assert!(offline["data"]["last_seen"].as_u64().unwrap() >= before);
}

/// One subscriber that keeps dropping its connection and resuming, while
/// publications race every resume. It must see every offset exactly once.
fn resume_while_publishing(server: &Server, channel: &str, seed: u64, rounds: usize) {
    let mut rng = seed;
    let mut next = || {
        rng = kometa::util::splitmix64(rng);
        rng
    };
    let mut client = server.client();
    let reply = client.subscribe(channel);
    let epoch = reply["epoch"].as_str().unwrap().to_string();
    let mut last = reply["offset"].as_u64().unwrap();
    for _ in 0..rounds {
        // Read a random number of publications, then drop the connection
        // (often with more in flight), then resume from the last one seen.
        for _ in 0..next() % 5 {
            let push = client.recv();
            let offset = push["offset"].as_u64().unwrap();
            assert_eq!(offset, last + 1, "gap or duplicate (seed {seed})");
            last = offset;
        }
        drop(client);
        std::thread::sleep(Duration::from_millis(next() % 5));
        client = server.client();
        let reply = client.request(
            json!({"op": "subscribe", "channel": channel, "id": 1, "since": {"epoch": epoch, "offset": last}}),
        );
        assert_eq!(reply["recovered"], true, "{reply} (seed {seed})");
        assert!(reply["offset"].as_u64().unwrap() >= last);
    }
}

#[test]
fn resume_is_gapless_and_duplicate_free_with_publications_racing_it() {
    let server = Server::start(2, &config("[[namespaces]]\nprefix = \"\"\nhistory_size = 10000\n"));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let channels: Vec<String> = (0..4).map(|i| format!("race{i}")).collect();
    let publisher = {
        let stop = std::sync::Arc::clone(&stop);
        let admin_address = server.admin.clone();
        let channels = channels.clone();
        std::thread::spawn(move || {
            let mut admin = kometa_admin_client::AdminClient::connect(&admin_address, None, common::TIMEOUT).unwrap();
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                admin.publish(&channels[(n % 4) as usize], "tick", n.to_string().as_bytes()).unwrap();
                n += 1;
                if n % 4 == 0 {
                    std::thread::sleep(Duration::from_micros(300));
                }
            }
            n
        })
    };
    // Many randomized runs: different seeds, channels (owners) and shards.
    let workers: Vec<_> = (0..8u64)
        .map(|worker| {
            let url_port = server.port;
            let admin = server.admin.clone();
            let channel = channels[(worker % 4) as usize].clone();
            std::thread::spawn(move || {
                let view = Server::view(url_port, admin);
                resume_while_publishing(&view, &channel, 0x5eed + worker * 7919, 25);
            })
        })
        .collect();
    for worker in workers {
        worker.join().unwrap();
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let published = publisher.join().unwrap();
    assert!(published > 100, "the publisher must actually race the resumes ({published})");
}

#[test]
fn a_lost_history_is_reported_as_not_recovered() {
    let mut server = Server::start(2, &config(""));
    let mut client = server.client();
    let epoch = client.subscribe("news")["epoch"].as_str().unwrap().to_string();
    server.publish("news", "e", "1");
    assert_eq!(client.recv()["offset"], 1);
    drop(client);
    // A restart loses history: the channel comes back with a new epoch.
    assert_eq!(server.terminate().code(), Some(0));
    let server = Server::start(2, &config(""));
    server.publish("news", "e", "2");
    let mut client = server.client();
    let reply =
        client.request(json!({"op": "subscribe", "channel": "news", "id": 1, "since": {"epoch": epoch, "offset": 1}}));
    assert_eq!(reply["recovered"], false);
    assert_eq!(reply["reason"], "epoch_changed");
    assert_ne!(reply["epoch"], json!(epoch));
    // Live publications still follow.
    server.publish("news", "e", "3");
    assert_eq!(client.recv()["offset"], 2);
    // Too old for the history ring.
    let small = Server::start(2, &config("[[namespaces]]\nprefix = \"\"\nhistory_size = 2\n"));
    let mut first = small.client();
    let epoch = first.subscribe("c")["epoch"].as_str().unwrap().to_string();
    for n in 0..5 {
        small.publish("c", "e", &n.to_string());
    }
    let mut late = small.client();
    let reply =
        late.request(json!({"op": "subscribe", "channel": "c", "id": 1, "since": {"epoch": epoch, "offset": 1}}));
    assert_eq!((reply["recovered"].clone(), reply["reason"].clone()), (json!(false), json!("history_too_short")));
}

#[test]
fn tokens_are_checked_before_and_after_the_upgrade() {
    let server = Server::start(2, &config("[timeouts]\nsweep_interval_ms = 50\n"));
    let upgrade = |query: &str| {
        common::http_exchange(
            &server,
            format!("GET /ws?{query} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n").as_bytes(),
        )
    };
    let forged = sign("not-the-server-secret", &json!({"sub": "mallory"}));
    let response = upgrade(&format!("token={forged}"));
    assert!(response.starts_with("HTTP/1.1 401") && response.contains("signature"), "{response}");
    let expired = sign(SECRET, &json!({"sub": "a", "exp": now_s() - 10}));
    let response = upgrade(&format!("token={expired}"));
    assert!(response.starts_with("HTTP/1.1 401") && response.contains("expired"), "{response}");
    let response = upgrade("token=garbage");
    assert!(response.starts_with("HTTP/1.1 401"), "{response}");

    // After the upgrade, with the connect command: an error reply, then a 4000-range close.
    let mut client = server.client();
    let reply = client.request(json!({"op": "connect", "token": forged, "id": 1}));
    assert_eq!(reply["error"]["code"], "unauthorized");
    assert_eq!(client.close_code(), Some(4001));
    let mut client = server.client();
    let reply = client.request(json!({"op": "connect", "token": expired, "id": 1}));
    assert_eq!(reply["error"]["code"], "token_expired");
    assert_eq!(client.close_code(), Some(4002));
    let mut client = server.client();
    assert_eq!(
        client.request(json!({"op": "connect", "token": token("fred"), "id": 2})),
        json!({"id": 2, "ok": true, "user": "fred"})
    );

    // A token that expires while connected closes the connection with 4002.
    let short = sign(SECRET, &json!({"sub": "gina", "exp": now_s() + 2}));
    let mut client = server.client_at(&format!("/ws?token={short}"));
    client.set_timeout(Duration::from_secs(5));
    assert_eq!(client.close_code(), Some(4002));
}

#[test]
fn private_channels_need_a_granting_token() {
    let server = Server::start(2, &config(""));
    let mut anonymous = server.client();
    let reply = anonymous.request(json!({"op": "subscribe", "channel": "private_room", "id": 1}));
    assert_eq!(reply["error"]["code"], "unauthorized");
    let mut without_grant = user_client(&server, "henry");
    let reply = without_grant.request(json!({"op": "subscribe", "channel": "private_room", "id": 2}));
    assert_eq!(reply["error"]["code"], "forbidden");
    let granted = sign(SECRET, &json!({"sub": "ivy", "channels": ["private_room", "private_team_*"]}));
    let mut with_grant = server.client_at(&format!("/ws?token={granted}"));
    with_grant.subscribe("private_room");
    with_grant.subscribe("private_team_7");
    let reply = with_grant.request(json!({"op": "subscribe", "channel": "private_other", "id": 3}));
    assert_eq!(reply["error"]["code"], "forbidden");
}

#[test]
fn client_publications_carry_the_senders_user_id() {
    let server = Server::start(2, &config(""));
    let mut sender = user_client(&server, "42");
    let mut reader = server.client();
    reader.subscribe("web_chat");
    let reply =
        sender.request(json!({"op": "publish", "channel": "web_chat", "event": "msg", "data": "hello", "id": 1}));
    assert_eq!(reply["ok"], true);
    assert_eq!(
        reader.recv(),
        json!({"channel": "web_chat", "event": "msg", "offset": 1, "data": "hello", "user": "42"})
    );
}

#[test]
fn disconnect_closes_every_connection_and_revokes_older_tokens() {
    let server = Server::start(2, &config("[timeouts]\nclose_timeout_ms = 30000\n"));
    let old_token = sign(SECRET, &json!({"sub": "jack", "iat": now_s() - 100}));
    let mut clients: Vec<Client> = (0..6).map(|_| server.client_at(&format!("/ws?token={old_token}"))).collect();
    let mut bystander = user_client(&server, "kate");
    server.wait_stats("jack connected", |s| s["authenticated"] == 7);
    let reply = server.admin().disconnect("jack", 0, "banned", now_s() - 50).unwrap();
    assert_eq!(reply, json!({"user": "jack", "disconnected": 6}));
    for client in &mut clients {
        assert_eq!(client.close_code(), Some(4003));
    }
    // A token issued before the revocation is refused after the upgrade, and
    // the close handshake completes at once (close_timeout_ms is long here).
    let mut retry = server.client_at(&format!("/ws?token={old_token}"));
    assert_eq!(retry.close_code(), Some(4001));
    let closing_started = std::time::Instant::now();
    assert_eq!(retry.close_code(), None, "the server ends the connection after the close handshake");
    assert!(closing_started.elapsed() < std::time::Duration::from_secs(10), "closed only at the close timeout");
    // A fresh one works; bystanders are untouched.
    let mut fresh = user_client(&server, "jack");
    assert_eq!(fresh.request(json!({"op": "ping", "id": 1})), json!({"id": 1, "ok": true}));
    assert_eq!(bystander.request(json!({"op": "ping", "id": 2})), json!({"id": 2, "ok": true}));
}

#[test]
fn history_channels_and_channel_info() {
    let server = Server::start(2, &config(""));
    let mut subscriber = server.client();
    subscriber.subscribe("feed_a");
    for n in 1..=5 {
        server.publish("feed_a", "e", &n.to_string());
    }
    server.publish("feed_b", "e", "1");
    server.publish("other", "e", "1");
    let history = server.admin().history("feed_a", 2, 2).unwrap();
    let offsets: Vec<u64> =
        history["publications"].as_array().unwrap().iter().map(|p| p["offset"].as_u64().unwrap()).collect();
    assert_eq!(offsets, vec![3, 4]);
    assert_eq!(history["next"], 4);
    assert_eq!(history["offset"], 5);
    // Clients may read history where the namespace allows.
    let mut reader = server.client();
    let reply = reader.request(json!({"op": "history", "channel": "feed_a", "limit": 2, "id": 3}));
    assert_eq!(reply["publications"].as_array().unwrap().len(), 2);
    assert_eq!(reply["publications"][0]["offset"], 1);

    let listed = server.admin().channels("feed_", "", 1).unwrap();
    assert_eq!(listed["channels"], json!([{"channel": "feed_a", "subscribers": 1}]));
    assert_eq!(listed["next"], "feed_a");
    let listed = server.admin().channels("feed_", "feed_a", 10).unwrap();
    assert_eq!(listed["channels"], json!([{"channel": "feed_b", "subscribers": 0}]));
    assert_eq!(listed["next"], Value::Null);

    let info = server.admin().channel_info("feed_a").unwrap();
    assert_eq!(
        (info["subscribers"].clone(), info["offset"].clone(), info["history"].clone()),
        (json!(1), json!(5), json!(5))
    );
    assert_eq!(server.admin().channel_info("missing").unwrap()["exists"], false);
    let stats = server.stats();
    assert_eq!(stats["channels"], 3);
}

#[test]
fn cli_subcommands_print_json() {
    let server = Server::start(2, &config(""));
    let admin = match &server.admin {
        kometa_admin_client::AdminAddress::Unix(path) => format!("unix:{}", path.display()),
        other => panic!("{other}"),
    };
    let mut lena = user_client(&server, "lena");
    lena.subscribe("track_x");
    let run = |args: &[&str]| -> Value {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_kometa"))
            .args(args)
            .args(["--admin", &admin])
            .output()
            .unwrap();
        assert!(output.status.success(), "{args:?}: {}", String::from_utf8_lossy(&output.stderr));
        serde_json::from_slice(&output.stdout).unwrap_or_else(|e| panic!("{args:?}: {e}"))
    };
    assert_eq!(run(&["send-user", "--string", "lena,mia", "hello", "hi"])["results"][0]["delivered"], 1);
    assert_eq!(run(&["presence", "track_x"])["members"][0]["user"], "lena");
    assert_eq!(run(&["presence", "track_x", "--stats"])["users"], 1);
    assert_eq!(run(&["user-status", "lena", "mia"])["results"][1]["status"], "unknown");
    assert_eq!(run(&["publish", "track_x", "e", "1"])["offset"], 1);
    assert_eq!(run(&["history", "track_x"])["publications"][0]["data"], 1);
    assert_eq!(run(&["channels", "track_"])["channels"][0]["channel"], "track_x");
    assert_eq!(run(&["channel-info", "track_x"])["subscribers"], 1);
    assert_eq!(run(&["disconnect", "lena", "--reason", "bye"])["disconnected"], 1);
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_kometa"))
        .args(["token", "--secret", SECRET, "--sub", "nora", "--ttl", "60"])
        .output()
        .unwrap();
    let minted = String::from_utf8(output.stdout).unwrap();
    let identity = kometa_protocol::token::Verifier::new(Some(SECRET), None).verify(minted.trim(), now_s()).unwrap();
    assert_eq!(&*identity.user, "nora");
}

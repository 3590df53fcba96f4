//! SIGHUP reloads the configuration without dropping connections; a bad
//! file is refused and the running configuration stays.

mod common;

use std::time::{Duration, Instant};

use common::{Server, TIMEOUT};
use serde_json::json;

fn sighup(server: &Server) {
    // SAFETY: kill on our own child's pid.
    assert_eq!(unsafe { libc::kill(server.pid(), libc::SIGHUP) }, 0);
}

/// Waits for a log line containing `needle`.
fn wait_log(server: &Server, needle: &str) -> String {
    let deadline = Instant::now() + TIMEOUT;
    while Instant::now() < deadline {
        if let Ok(line) = server.log.recv_timeout(Duration::from_millis(100)) {
            if line.contains(needle) {
                return line;
            }
        }
    }
    panic!("no log line with {needle:?}");
}

fn rewrite_config(server: &Server, config: &str) {
    std::fs::write(server.dir.join("kometa.toml"), config).expect("rewrite config");
}

/// Subscribes to `count` fresh channels; returns how many were refused.
fn refused_subscriptions(client: &mut common::Client, prefix: &str, count: usize) -> usize {
    (0..count)
        .filter(|n| {
            let reply = client.request(json!({"op": "subscribe", "channel": format!("{prefix}{n}"), "id": n}));
            reply["ok"] != true
        })
        .count()
}

#[test]
fn sighup_applies_new_limits_and_keeps_connections() {
    let mut server = Server::start(2, "[limits]\nchannels_per_connection_max = 8\n");
    let mut old = server.client();
    assert_eq!(refused_subscriptions(&mut old, "a", 4), 0);

    rewrite_config(&server, "[limits]\nchannels_per_connection_max = 2\n");
    sighup(&server);
    // The new limit applies to new commands, on every shard; the old
    // connection is still open and still receives.
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let mut fresh = server.client();
        if refused_subscriptions(&mut fresh, "b", 3) == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "the reloaded limit never applied");
        std::thread::sleep(Duration::from_millis(50));
    }
    server.publish("a0", "e", "1");
    assert_eq!(old.recv()["data"], 1);
    assert_eq!(refused_subscriptions(&mut old, "c", 1), 1, "past the new limit");
    // SIGHUP did not stop the server, and the admin socket is still there.
    assert!(server.child.as_mut().unwrap().try_wait().unwrap().is_none());
    assert!(server.stats()["connections"].as_u64().unwrap() >= 1);
}

#[test]
fn a_bad_file_is_refused_and_the_running_config_stays() {
    let server = Server::start(1, "[limits]\nchannels_per_connection_max = 2\n");
    rewrite_config(&server, "[limits]\nchannels_per_connection_max = \"many\"\n");
    sighup(&server);
    let line = wait_log(&server, "reload refused");
    assert!(line.contains("channels_per_connection_max"), "the error names the key: {line}");
    let mut client = server.client();
    assert_eq!(refused_subscriptions(&mut client, "x", 3), 1, "the old limit (2) stays");
}

#[test]
fn restart_only_changes_are_reported_and_not_applied() {
    let server = Server::start(1, "");
    rewrite_config(&server, "connections_max = 10\naccept_backlog = 10\n");
    sighup(&server);
    let line = wait_log(&server, "need a restart");
    assert!(line.contains("connections_max") && line.contains("accept_backlog"), "{line}");
    assert!(!line.contains("cluster"), "nothing changed there: {line}");
    let stats = server.stats();
    assert_eq!(stats["shards"].as_array().map(Vec::len), Some(1));
}

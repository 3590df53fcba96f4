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

/// The admin RELOAD operation (and `kometa reload`): the same reload,
/// answered to the backend with what needs a restart or what is wrong.
#[test]
fn admin_reload_answers_with_the_outcome() {
    let server = Server::start(2, "[limits]\nchannels_per_connection_max = 8\n");
    let mut old = server.client();
    assert_eq!(refused_subscriptions(&mut old, "a", 4), 0);

    // A new limit, and a restart-only key: applied and reported.
    rewrite_config(&server, "accept_backlog = 10\n[limits]\nchannels_per_connection_max = 2\n");
    let answer = server.admin().reload().expect("reload");
    assert_eq!(answer, json!({"reloaded": true, "restart_needed": ["accept_backlog"]}));
    // The reply comes after the new configuration is live: no waiting.
    let mut fresh = server.client();
    assert_eq!(refused_subscriptions(&mut fresh, "b", 3), 1);

    // A bad file: an error naming the key; the running configuration stays.
    rewrite_config(&server, "[limits]\nchannels_per_connection_max = \"many\"\n");
    let error = server.admin().reload().expect_err("refused").to_string();
    assert!(error.contains("channels_per_connection_max"), "{error}");
    let mut after = server.client();
    assert_eq!(refused_subscriptions(&mut after, "c", 3), 1, "the reloaded limit (2) stays");

    // The CLI: the same document on stdout.
    rewrite_config(&server, "[limits]\nchannels_per_connection_max = 3\n");
    let admin = server.admin.to_string();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_kometa"))
        .args(["reload", "--admin", &admin])
        .output()
        .expect("run kometa reload");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let printed: serde_json::Value = serde_json::from_slice(&output.stdout).expect("JSON");
    assert_eq!(printed["reloaded"], true);
    // The old connection kept everything: it still receives.
    server.publish("a0", "e", "1");
    assert_eq!(old.recv()["data"], 1);
}

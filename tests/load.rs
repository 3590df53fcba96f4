//! The load generator end to end: `kometa load` against a real server, over
//! two worker processes and two source addresses, and its JSON report
//! checked for consistency. Counts are asserted, never timings.

mod common;

use std::process::Command;

use common::Server;
use serde_json::Value;

fn admin_arg(server: &Server) -> String {
    server.admin.to_string()
}

/// Runs `kometa load ARGS --json FILE` and returns the report.
fn run_load(server: &Server, args: &[&str]) -> Value {
    let json = server.dir.join(format!("report-{}.json", args[0]));
    let output = Command::new(env!("CARGO_BIN_EXE_kometa"))
        .arg("load")
        .args(args)
        .arg("--url")
        .arg(server.url("/ws"))
        .arg("--admin")
        .arg(admin_arg(server))
        .arg("--json")
        .arg(&json)
        .output()
        .expect("run kometa load");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "kometa load {args:?} failed\nstdout:\n{stdout}\nstderr:\n{stderr}");
    let text = std::fs::read(&json).unwrap_or_else(|e| panic!("no report at {}: {e}\n{stdout}", json.display()));
    serde_json::from_slice(&text).expect("report is JSON")
}

fn u64_at(report: &Value, pointer: &str) -> u64 {
    report.pointer(pointer).and_then(Value::as_u64).unwrap_or_else(|| panic!("{pointer} missing in {report:#}"))
}

fn f64_at(report: &Value, pointer: &str) -> f64 {
    report.pointer(pointer).and_then(Value::as_f64).unwrap_or_else(|| panic!("{pointer} missing in {report:#}"))
}

fn assert_ordered(report: &Value, which: &str) {
    let at = |p: &str| f64_at(report, &format!("/latency_ms/{which}/{p}"));
    let (p50, p90, p99, p999, max) = (at("p50_ms"), at("p90_ms"), at("p99_ms"), at("p999_ms"), at("max_ms"));
    assert!(p50 <= p90 && p90 <= p99 && p99 <= p999 && p999 <= max, "{which} percentiles out of order: {report:#}");
    assert!(max > 0.0, "{which}: no latency recorded");
}

#[test]
fn broadcast_delivers_every_publication_to_every_subscriber_exactly_once() {
    let server = Server::start(2, "");
    let pid = server.pid().to_string();
    let subscribers = 300;
    let report = run_load(
        &server,
        &[
            "broadcast",
            "--connections",
            "300",
            "--workers",
            "2",
            "--source-addresses",
            "127.0.0.2-127.0.0.3",
            "--rate",
            "20",
            "--duration",
            "2s",
            "--settle",
            "200ms",
            "--channel",
            "load-test-broadcast",
            "--server-pid",
            &pid,
            "--check",
        ],
    );
    assert_eq!(report["scenario"], "broadcast");
    assert_eq!(u64_at(&report, "/connections/requested"), subscribers);
    assert_eq!(u64_at(&report, "/connections/established"), subscribers);
    assert_eq!(u64_at(&report, "/connections/connect_errors_total"), 0);
    assert_eq!(u64_at(&report, "/generator/workers"), 2);

    let sent = u64_at(&report, "/publications/sent");
    let accepted = u64_at(&report, "/publications/accepted");
    assert!(sent > 0 && accepted == sent, "{report:#}");
    // The server itself says every publication reached all subscribers.
    assert_eq!(u64_at(&report, "/publications/subscribers_reported_min"), subscribers);
    assert_eq!(u64_at(&report, "/publications/subscribers_reported_max"), subscribers);

    assert_eq!(u64_at(&report, "/deliveries/total"), accepted * subscribers);
    assert_eq!(u64_at(&report, "/deliveries/expected"), accepted * subscribers);
    assert_eq!(u64_at(&report, "/deliveries/missing"), 0);
    assert_eq!(u64_at(&report, "/deliveries/duplicates"), 0);
    assert_eq!(u64_at(&report, "/deliveries/gaps"), 0);
    assert_eq!(u64_at(&report, "/latency_ms/delivery/count"), accepted * subscribers);
    assert_eq!(u64_at(&report, "/latency_ms/last_subscriber/count"), accepted);
    assert_ordered(&report, "delivery");
    assert_ordered(&report, "last_subscriber");
    // The last subscriber of a publication is never earlier than the median delivery.
    assert!(f64_at(&report, "/latency_ms/last_subscriber/max_ms") >= f64_at(&report, "/latency_ms/delivery/p50_ms"));

    for field in ["rss_before_bytes", "rss_after_ramp_bytes", "rss_end_bytes"] {
        assert!(u64_at(&report, &format!("/server/{field}")) > 0, "{field}: {report:#}");
    }
    for field in ["rss_growth_per_connection_bytes", "slab_per_socket_bytes", "cpu_s", "cpu_run_s"] {
        f64_at(&report, &format!("/server/{field}"));
    }
    assert_eq!(u64_at(&report, "/server/pid"), u64::from(server.pid() as u32));
    assert!(report["warnings"].as_array().is_some_and(Vec::is_empty), "{report:#}");
}

#[test]
fn churn_resumes_without_gaps_or_duplicates() {
    let server = Server::start(2, "");
    let report = run_load(
        &server,
        &[
            "churn",
            "--connections",
            "200",
            "--workers",
            "2",
            "--source-addresses",
            "127.0.0.4-127.0.0.5",
            "--rate",
            "50",
            "--churn-rate",
            "40",
            "--duration",
            "2s",
            "--settle",
            "100ms",
            "--channel",
            "load-test-churn",
            "--check",
        ],
    );
    assert_eq!(u64_at(&report, "/connections/established"), 200);
    assert!(u64_at(&report, "/churn/churned") > 0, "{report:#}");
    assert!(u64_at(&report, "/churn/recovered") > 0, "no resume happened: {report:#}");
    assert_eq!(u64_at(&report, "/churn/not_recovered"), 0);
    assert_eq!(u64_at(&report, "/deliveries/gaps"), 0);
    assert_eq!(u64_at(&report, "/deliveries/duplicates"), 0);
    assert_eq!(u64_at(&report, "/deliveries/missing"), 0);
    // Every subscriber was there for every publication, across its reconnects.
    let accepted = u64_at(&report, "/publications/accepted");
    assert_eq!(u64_at(&report, "/deliveries/unique"), accepted * 200);
    assert!(report.get("server").is_none());
}

/// The multi-node path on one node: the same URL twice is two targets, so
/// connections are split round-robin between them and counted per URL, while
/// delivery stays exactly once. A second `--server-pid` (this test process)
/// stands in for a second node's process.
#[test]
fn broadcast_over_the_same_url_twice_splits_connections_per_url() {
    let server = Server::start(2, "");
    let url = server.url("/ws");
    let pids = format!("{},{}", server.pid(), std::process::id());
    let subscribers = 301;
    // run_load adds the second --url.
    let report = run_load(
        &server,
        &[
            "broadcast",
            "--url",
            &url,
            "--connections",
            "301",
            "--workers",
            "2",
            "--rate",
            "20",
            "--duration",
            "1s",
            "--settle",
            "100ms",
            "--channel",
            "load-test-two-urls",
            "--server-pid",
            &pids,
            "--check",
        ],
    );
    assert_eq!(report["parameters"]["url"], serde_json::json!([url, url]));
    let targets = report["targets"].as_array().unwrap_or_else(|| panic!("no targets: {report:#}"));
    assert_eq!(targets.len(), 2);
    for (target, share) in targets.iter().zip([151, 150]) {
        assert_eq!(target["url"], url.as_str());
        assert_eq!(u64_at(target, "/connections"), share);
        assert_eq!(u64_at(target, "/established"), share);
        assert_eq!(u64_at(target, "/connect_errors") + u64_at(target, "/disconnects"), 0);
    }
    assert_eq!(u64_at(&report, "/connections/established"), subscribers);
    let accepted = u64_at(&report, "/publications/accepted");
    assert!(accepted > 0, "{report:#}");
    assert_eq!(u64_at(&report, "/deliveries/total"), accepted * subscribers);
    assert_eq!(u64_at(&report, "/deliveries/expected"), accepted * subscribers);
    assert_eq!(u64_at(&report, "/latency_ms/last_subscriber/count"), accepted);
    assert_ordered(&report, "delivery");

    assert!(report.pointer("/server/pid").is_none(), "{report:#}");
    let processes = report["server"]["processes"].as_array().unwrap_or_else(|| panic!("no processes: {report:#}"));
    assert_eq!(u64_at(&processes[0], "/pid"), u64::from(server.pid() as u32));
    assert_eq!(u64_at(&processes[1], "/pid"), u64::from(std::process::id()));
    let summed: u64 = processes.iter().map(|p| u64_at(p, "/rss_before_bytes")).sum();
    assert_eq!(u64_at(&report, "/server/rss_before_bytes"), summed);
}

/// With two URLs every resume moves to the other one: resumes land on both.
#[test]
fn churn_over_two_urls_resumes_on_the_next_one() {
    let server = Server::start(2, "");
    let url = server.url("/ws");
    let report = run_load(
        &server,
        &[
            "churn",
            "--url",
            &url,
            "--connections",
            "100",
            "--rate",
            "50",
            "--churn-rate",
            "60",
            "--duration",
            "1500ms",
            "--settle",
            "100ms",
            "--channel",
            "load-test-churn-two-urls",
            "--check",
        ],
    );
    let targets = report["targets"].as_array().unwrap_or_else(|| panic!("no targets: {report:#}"));
    let resumed: Vec<u64> = targets.iter().map(|t| u64_at(t, "/resumed")).collect();
    assert!(resumed.iter().all(|&r| r > 0), "resumes did not reach both URLs: {report:#}");
    let resumes = u64_at(&report, "/churn/recovered") + u64_at(&report, "/churn/not_recovered");
    assert_eq!(resumed.iter().sum::<u64>(), resumes);
    assert_eq!(u64_at(&report, "/deliveries/unique"), u64_at(&report, "/publications/accepted") * 100);
}

//! `scripts/bench-million.sh` end to end at a small scale, so the one
//! command behind docs/benchmarks.md ("One million connections") keeps
//! working: two cluster nodes on one listen address, a private
//! redis-server, the ramp, the hold, one publication to everyone and one to
//! each group, checked exactly once by the script's own exit status. Kernel
//! settings are left alone (`--no-tuning`). Needs redis-server, as the
//! cluster tests do. Counts are asserted, never timings.

mod common;

use std::process::Command;

use serde_json::Value;

#[test]
fn bench_million_script_runs_end_to_end_at_small_scale() {
    let out = common::temp_dir("bench-million");
    let output = Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/bench-million.sh"))
        .args(["--connections", "3000", "--nodes", "2", "--groups", "3", "--hold", "2", "--no-tuning"])
        .args(["--kometa", env!("CARGO_BIN_EXE_kometa")])
        .arg("--out")
        .arg(&out)
        .output()
        .expect("run scripts/bench-million.sh");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "bench-million.sh failed\nstdout:\n{stdout}\nstderr:\n{stderr}");

    let text = std::fs::read(out.join("summary.json")).expect("summary.json written");
    let summary: Value = serde_json::from_slice(&text).expect("summary is JSON");
    assert_eq!(summary["connections_established"], 3000, "{summary:#}");
    assert_eq!(summary["connect_errors"], 0);
    // Everyone got the broadcast and their group's publication, once.
    let deliveries = &summary["deliveries"];
    assert_eq!((deliveries["total"].as_u64(), deliveries["expected"].as_u64()), (Some(6000), Some(6000)));
    for key in ["missing", "duplicates", "gaps", "misrouted"] {
        assert_eq!(deliveries[key], 0, "{key}: {summary:#}");
    }
    // Both nodes shared the address and held connections (their own STATS).
    let held: Vec<u64> =
        summary["node_connections"].as_object().expect("node counts").values().filter_map(Value::as_u64).collect();
    assert_eq!(held.len(), 2, "{summary:#}");
    assert!(held.iter().all(|&n| n > 0) && held.iter().sum::<u64>() == 3000, "{held:?}");
    assert!(summary["stuck_nodes"].as_array().is_some_and(Vec::is_empty), "{summary:#}");
    assert!(out.join("memory.svg").exists() && out.join("report.json").exists());
    // Memory as PSS too (the executable's pages counted once over the nodes).
    assert!(summary["server_pss_growth_per_connection_bytes"].as_f64().is_some(), "{summary:#}");
    let _ = std::fs::remove_dir_all(&out);
}

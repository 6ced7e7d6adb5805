//! How a limit feels to the client behind it: for each rate and direction, one client IP limited
//! by the real binary (v2ray as the runtime in a server namespace, the client in another, joined
//! by a veth pair), saturated by a bulk TCP flow.
//!
//!   make bench-accuracy    # cargo bench --bench accuracy
//!
//! Per rate and direction, one row of `<repo>/target/bench-accuracy.json`:
//! - `wire_bytes_per_second`: the class's own byte counter (raylimit status) over the measured
//!   seconds, after one second of warm-up; `goodput_bytes_per_second`: what the receiver read;
//! - `worst_second_ratio`: the largest |one-second wire rate ÷ set rate − 1| over those seconds;
//! - `rtt_idle_ms`, `rtt_loaded_ms`: the mean round trip of small UDP probes whose limited leg
//!   goes through the same class (its reply for download, its request for upload), before the
//!   flow and while it saturates the class;
//! - `flow_fairness`: slower ÷ faster goodput of two TCP flows of the subject at once.
//!
//! Rules use `--scope device`, so the probes and flows need not be the runtime's own traffic.
//! Everything runs in namespaces this bench creates and removes; every flow and probe stops by
//! itself. Environment: RAYLIMIT_ACCURACY_SECONDS (measured seconds per row, default 20),
//! RAYLIMIT_ACCURACY_RATES (bytes/s, comma separated; default 4096,65536,1000000,100000000,
//! 1073741824). Under `cargo test --all-targets` (no `--bench`) it is a smoke run: 1 MB/s
//! download for 2 s, no file written.

#[path = "../tests/common/mod.rs"]
mod common;

use common::accuracy::{measure, Bench};
use serde_json::json;

fn env_list(name: &str) -> Option<Vec<u64>> {
    let v = std::env::var(name).ok()?;
    v.split(',')
        .map(|x| x.trim().replace('_', "").parse().ok())
        .collect()
}

fn main() {
    let smoke = !std::env::args().any(|a| a == "--bench");
    if let Some(why) = common::need::missing(&[
        common::need::NAMESPACE,
        &[common::need::VETH, common::need::V2RAY],
    ]) {
        eprintln!("bench accuracy: {why}");
        std::process::exit(if smoke { 0 } else { 1 });
    }
    let (rates, secs) = match smoke {
        true => (vec![1_000_000], 2),
        false => (
            env_list("RAYLIMIT_ACCURACY_RATES")
                .unwrap_or_else(|| vec![4096, 65_536, 1_000_000, 100_000_000, 1 << 30]),
            env_list("RAYLIMIT_ACCURACY_SECONDS")
                .and_then(|v| v.first().copied())
                .unwrap_or(20),
        ),
    };
    let directions: &[&'static str] = match smoke {
        true => &["download"],
        false => &["download", "upload"],
    };
    let bench = Bench::start("acc");
    let mut rows = Vec::new();
    for &rate in &rates {
        for &direction in directions {
            eprintln!("bench accuracy: {rate} bytes/s {direction}, {secs} s");
            rows.push(measure(&bench, direction, rate, secs));
        }
    }
    println!(
        "\n| rate (bytes/s) | direction | wire | goodput | worst second | RTT idle | RTT loaded | two flows |"
    );
    println!("|---:|---|---:|---:|---:|---:|---:|---:|");
    for r in &rows {
        println!(
            "| {} | {} | {:.0} ({:+.1} %) | {:.0} | {:.1} % | {:.2} ms | {:.1} ms | {:.2} |",
            r.rate,
            r.direction,
            r.wire,
            (r.wire / r.rate as f64 - 1.0) * 100.0,
            r.goodput,
            r.worst_second * 100.0,
            r.rtt_idle_ms,
            r.rtt_loaded_ms,
            r.fairness
        );
    }
    if smoke {
        return;
    }
    let body = json!({
        "seconds_per_row": secs,
        "rows": rows.iter().map(|r| json!({
            "rate_bytes_per_second": r.rate,
            "direction": r.direction,
            "wire_bytes_per_second": r.wire,
            "goodput_bytes_per_second": r.goodput,
            "seconds": r.seconds,
            "worst_second_ratio": r.worst_second,
            "rtt_idle_ms": r.rtt_idle_ms,
            "rtt_loaded_ms": r.rtt_loaded_ms,
            "flow_fairness": r.fairness,
        })).collect::<Vec<_>>(),
    });
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-accuracy.json");
    std::fs::create_dir_all(path.parent().unwrap()).expect("target dir");
    std::fs::write(&path, serde_json::to_string_pretty(&body).unwrap()).expect("write");
    println!("\nwrote {}", path.display());
}

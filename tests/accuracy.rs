//! A limit as its client feels it, with real traffic: the real binary limits one client address
//! (v2ray as the runtime in a server namespace), a bulk TCP flow saturates it for a few seconds,
//! and the class's own counter and small probes through the same class say whether the rate is
//! exact and steady and the queue short. `make bench-accuracy` sweeps every rate for 20 s; this
//! checks one low and one middle rate, bounded in time.

mod common;

use common::accuracy::{measure, Row};
use common::{need, require};

fn check(row: &Row, rtt_bound_ms: Option<f64>) {
    let what = format!("{} bytes/s {}", row.rate, row.direction);
    let error = row.wire / row.rate as f64 - 1.0;
    eprintln!(
        "{what}: wire {:.0} ({error:+.3}), worst second {:.3}, RTT {:.2} ms idle, {:.1} ms loaded",
        row.wire, row.worst_second, row.rtt_idle_ms, row.rtt_loaded_ms
    );
    assert!(
        error.abs() <= 0.05,
        "{what}: wire {:.0} ({error:+.3})",
        row.wire
    );
    // GSO packets cut into frames before HTB charges them: no second far above or below.
    assert!(
        row.worst_second <= 0.25,
        "{what}: a second {:.0} % off the rate",
        row.worst_second * 100.0
    );
    if let Some(bound) = rtt_bound_ms {
        assert!(
            row.rtt_loaded_ms <= row.rtt_idle_ms + bound,
            "{what}: probes took {:.1} ms under load (idle {:.2} ms)",
            row.rtt_loaded_ms,
            row.rtt_idle_ms
        );
    }
}

#[test]
fn a_saturated_limit_holds_its_rate_steadily_behind_a_short_queue() {
    require(&[need::NAMESPACE, &[need::VETH, need::V2RAY]]);
    let bench = common::accuracy::Bench::start("acct");
    // 64 KiB/s: with whole GSO packets charged at once this had seconds with nothing. Eight
    // seconds: at this rate one retransmission timeout is a visible share of four.
    check(&measure(&bench, "download", 65_536, 8), None);
    // 1 MB/s: behind HTB's default FIFO of 1 000 packets probes took 68 ms; the leaf holds 25 ms.
    check(&measure(&bench, "upload", 1_000_000, 4), Some(50.0));
}

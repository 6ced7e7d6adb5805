//! A limit as its client feels it, with real traffic: the real binary limits one client address
//! (v2ray as the runtime in a server namespace), a bulk TCP flow saturates it for a few seconds,
//! and the class's own counter and small probes through the same class say whether the rate is
//! exact and steady, and the receiver whether its goodput is. `make bench-accuracy` sweeps every
//! rate for 20 s; this checks one low and one middle rate, bounded in time.

mod common;

use common::accuracy::{measure, Row};
use common::{need, require};

fn check(row: &Row) {
    let what = format!("{} bytes/s {}", row.rate, row.direction);
    let error = row.wire / row.rate as f64 - 1.0;
    eprintln!(
        "{what}: wire {:.0} ({error:+.3}), goodput {:.0}, worst second {:.3}, RTT {:.2} ms idle, {:.1} ms loaded",
        row.wire, row.goodput, row.worst_second, row.rtt_idle_ms, row.rtt_loaded_ms
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
    // The application gets the rate less headers: retransmissions do not eat the class.
    assert!(
        row.goodput >= 0.85 * row.rate as f64,
        "{what}: goodput {:.0}",
        row.goodput
    );
}

#[test]
fn a_saturated_limit_holds_its_rate_steadily() {
    require(&[need::NAMESPACE, &[need::VETH, need::V2RAY]]);
    let bench = common::accuracy::Bench::start("acct");
    // 64 KiB/s: with whole GSO packets charged at once this had seconds with nothing. Eight
    // seconds: at this rate one retransmission timeout is a visible share of four.
    check(&measure(&bench, "download", 65_536, 8));
    // 1 MB/s upload: GSO packets arrive whole from the veth and are cut on the IFB.
    check(&measure(&bench, "upload", 1_000_000, 4));
}

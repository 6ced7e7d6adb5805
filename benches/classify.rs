//! Per-packet cost of classification: small UDP packets sent to eight limited clients (round
//! robin) through the egress of a veth whose HTB root holds N specific-IP limits at a rate far
//! above what is sent, so nothing queues and the difference between layouts is the u32 walk.
//! Reports nanoseconds per `sendto`, the median of several runs, for:
//!
//! - the HTB root alone (every packet unclassified), for reference;
//! - raylimit's two-level layout with N = 10 and N = 10 000, built by raylimit's own decisions,
//!   device-wide (one node per client) and scoped to a runtime listener (the packets leave from
//!   its port; each node also matches it);
//! - the single-level layout raylimit used before (one 256-bucket table keyed on the last
//!   address byte, ~40 nodes per bucket at N = 10 000), built with `tc -batch`, for contrast.
//!
//!   cargo bench --bench classify
//!
//! Needs root (it makes its own network namespaces and removes them), ip, tc, and the htb and u32
//! modules: it fails with one line naming what is missing. Under
//! `cargo test --all-targets` it runs small and short, as a smoke test.

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::time::Instant;

use common::plans::{limit_all, limit_all_scoped};
use common::{need, require, run, Netns, Pair};
use raylimit::reconcile::RuleScope;
use raylimit::shaping;
use raylimit::shaping::ListenerMatch;

/// Far above what the bench sends: HTB lets every packet straight through.
const RATE: u64 = 10_000_000_000;
const PAYLOAD: [u8; 16] = [0x5a; 16];
/// The runtime listener of the scoped layout: the bench's packets leave from its port.
const LISTENER_PORT: u16 = 10086;

struct Scale {
    large: u32,
    packets: usize,
    runs: usize,
}

/// Client `i` of a set: 40 first-level buckets (10.100.0. to 10.100.39.) of 250 clients, so the
/// single-level layout has 40 nodes behind each last byte at N = 10 000.
fn client(i: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(10, 100, (i / 250) as u8, (i % 250 + 1) as u8))
}

/// The eight clients packets go to, by index: spread over first-level buckets and over the
/// positions of the single-level layout's chains (10.100.0.x first, 10.100.39.x last).
const TARGETS: [u32; 8] = [0, 1, 1751, 3326, 5449, 6254, 8377, 9999];

/// A sender namespace whose `veth-s` routes the clients' /16 toward the peer namespace, under a
/// link-layer address that is not the peer's, so the peer drops them on arrival at the least
/// cost (the same for every layout).
fn path() -> Pair {
    let pair = Pair::new("cl");
    let server = &pair.server;
    server.ip(&["route", "add", "10.100.0.0/16", "via", "10.99.0.2"]);
    server.ip(&[
        "neigh",
        "replace",
        "10.99.0.2",
        "lladdr",
        "02:00:00:00:00:01",
        "dev",
        "veth-s",
        "nud",
        "permanent",
    ]);
    pair
}

/// The `n` clients a layout limits, in index order (so each single-level chain fills in the
/// order a real set would): the targets and the first others.
fn clients(n: u32) -> Vec<IpAddr> {
    let mut indices: BTreeSet<u32> = TARGETS.into_iter().collect();
    let mut i = 0;
    while indices.len() < n as usize {
        indices.insert(i);
        i += 1;
    }
    indices.into_iter().map(client).collect()
}

/// raylimit's layout for `n` clients, built through its own decisions.
fn two_level(pair: &Pair, n: u32) {
    let mut kernel = raylimit::engine::NetlinkKernel::from_socket(pair.server.socket());
    let device = kernel.socket().link_by_name("veth-s").unwrap();
    limit_all(&mut kernel, &device, &clients(n), RATE);
}

/// raylimit's layout for `n` clients scoped to one runtime listener (0.0.0.0:10086).
fn two_level_scoped(pair: &Pair, n: u32) {
    let mut kernel = raylimit::engine::NetlinkKernel::from_socket(pair.server.socket());
    let device = kernel.socket().link_by_name("veth-s").unwrap();
    let scope = RuleScope::Listeners(
        ListenerMatch::of_socket([0, 0, 0, 0].into(), LISTENER_PORT)
            .into_iter()
            .collect(),
    );
    limit_all_scoped(&mut kernel, &device, &clients(n), RATE, &scope);
}

/// The single-level layout raylimit used before, with tc.
fn single_level(pair: &Pair, n: u32) {
    let dev = "dev veth-s parent 524c:";
    let mut lines = vec![
        "qdisc add dev veth-s root handle 524c: htb default 0 direct_qlen 1000".to_string(),
        format!("filter add {dev} protocol ip prio 300 handle 12c: u32 divisor 256"),
        format!("filter add {dev} protocol ip prio 300 handle ::1 u32 match u32 0 0 hashkey mask 0x000000ff at 16 link 12c:"),
    ];
    let mut nodes: BTreeMap<u32, u32> = BTreeMap::new();
    for (i, ip) in clients(n).iter().enumerate() {
        let minor = 0x100 + i as u32;
        let IpAddr::V4(v4) = ip else { unreachable!() };
        let bucket = v4.octets()[3] as u32;
        let node = nodes.entry(bucket).or_default();
        *node += 1;
        lines.push(format!(
            "class add dev veth-s parent 524c: classid 524c:{minor:x} htb rate {RATE}bps ceil {RATE}bps quantum 200000"
        ));
        lines.push(format!(
            "filter add {dev} protocol ip prio 300 handle 12c:{bucket:x}:{node:x} u32 ht 12c:{bucket:x}: match ip dst {ip}/32 classid 524c:{minor:x}"
        ));
    }
    let file = std::env::temp_dir().join(format!("{}-single.tc", pair.server.name));
    std::fs::File::create(&file)
        .unwrap()
        .write_all(lines.join("\n").as_bytes())
        .unwrap();
    run(&[
        "tc",
        "-n",
        &pair.server.name,
        "-batch",
        file.to_str().unwrap(),
    ]);
    let _ = std::fs::remove_file(&file);
}

fn htb_only(pair: &Pair) {
    pair.server.tc(&[
        "qdisc", "add", "dev", "veth-s", "root", "handle", "524c:", "htb", "default", "0",
    ]);
}

/// Nanoseconds per packet sent from `ns` to `targets`, round robin: each run's, sorted.
fn ns_per_packet(ns: &Netns, targets: &[IpAddr], scale: &Scale) -> Vec<f64> {
    let addrs: Vec<SocketAddr> = targets.iter().map(|ip| SocketAddr::new(*ip, 9)).collect();
    let (packets, runs) = (scale.packets, scale.runs);
    ns.spawn(move || {
        let sock = UdpSocket::bind(("0.0.0.0", LISTENER_PORT)).unwrap();
        let send = |count: usize| {
            for i in 0..count {
                let _ = sock.send_to(&PAYLOAD, addrs[i % addrs.len()]);
            }
        };
        send(packets / 4); // neighbours resolved, caches warm
        let mut samples: Vec<f64> = (0..runs)
            .map(|_| {
                let start = Instant::now();
                send(packets);
                start.elapsed().as_nanos() as f64 / packets as f64
            })
            .collect();
        samples.sort_by(f64::total_cmp);
        samples
    })
    .join()
    .unwrap()
}

/// Packets counted by the limited classes: the measured packets really were classified.
fn classified_packets(ns: &Netns) -> u64 {
    let mut sock = ns.socket();
    let index = sock.link_by_name("veth-s").unwrap().index;
    sock.device_tc(index)
        .unwrap()
        .classes
        .iter()
        .filter(|c| c.class.handle.major() == shaping::ROOT_MAJOR)
        .map(|c| c.stats.packets)
        .sum()
}

fn main() {
    require(&[need::NAMESPACE, need::DOWNLOAD, &[need::TC, need::VETH]]);
    let bench = std::env::args().any(|a| a == "--bench");
    let scale = if bench {
        Scale {
            large: 10_000,
            packets: 200_000,
            runs: 9,
        }
    } else {
        Scale {
            large: 300,
            packets: 2_000,
            runs: 1,
        }
    };
    let large = scale.large;
    let targets: Vec<IpAddr> = TARGETS.into_iter().map(client).collect();
    println!(
        "classify: ns per {}-byte UDP packet through an HTB root on a veth, {} clients round robin (median of {} runs of {} packets)",
        PAYLOAD.len(),
        targets.len(),
        scale.runs,
        scale.packets
    );
    type Build = Box<dyn Fn(&Pair)>;
    let layouts: Vec<(String, bool, Build)> = vec![
        ("HTB root, no filters".into(), false, Box::new(htb_only)),
        (
            "two-level, N = 10".into(),
            true,
            Box::new(|p: &Pair| two_level(p, 10)),
        ),
        (
            format!("two-level, N = {large}"),
            true,
            Box::new(move |p: &Pair| two_level(p, large)),
        ),
        (
            format!("two-level scoped, N = {large}"),
            true,
            Box::new(move |p: &Pair| two_level_scoped(p, large)),
        ),
        (
            format!("single-level (before), N = {large}"),
            true,
            Box::new(move |p: &Pair| single_level(p, large)),
        ),
    ];
    for (name, classifies, build) in layouts {
        let pair = path();
        let started = Instant::now();
        build(&pair);
        let built = started.elapsed();
        let runs = ns_per_packet(&pair.server, &targets, &scale);
        let (median, low, high) = (runs[runs.len() / 2], runs[0], runs[runs.len() - 1]);
        if classifies {
            let counted = classified_packets(&pair.server);
            let sent = (scale.packets * scale.runs) as u64;
            assert!(
                counted >= sent,
                "{name}: {counted} of {sent} packets classified"
            );
        }
        println!(
            "  {name:<36} {median:>6.0} ns/packet (runs {low:.0} to {high:.0}; built in {built:.1?})"
        );
    }
}

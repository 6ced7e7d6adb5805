//! Ten thousand specific-IP download limits on one device, built by raylimit's own decisions
//! (each against one observation kept current with `absorb_filter`) and sent as batches of
//! netlink messages. The kernel's state reads back as exactly what was decided, a repeated
//! request is a no-op, and real packets to sampled clients land in their own class and no other.

mod common;

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use common::plans::*;
use common::*;
use raylimit::engine::NetlinkKernel;
use raylimit::netlink::RtSocket;
use raylimit::reconcile::{decide, Context, DecisionKind};
use raylimit::shaping;

const V4_CLIENTS: u32 = 10_000;
const V6_CLIENTS: u32 = 256;
/// Far above what the test sends, so nothing queues and counters settle at once.
const RATE: u64 = 100_000_000;
const PACKETS: u64 = 50;
const PAYLOAD: usize = 1000;

/// 40 first-level buckets (10.100.0. to 10.100.39.) of 250 clients each.
fn v4_client(i: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(10, 100, (i / 250) as u8, (i % 250 + 1) as u8))
}

/// 4 first-level buckets (byte 14) of 64 clients each: fd00:64::BBLL.
fn v6_client(i: u32) -> IpAddr {
    let last_word = ((i / 64) << 8 | (i % 64 + 1)) as u16;
    IpAddr::V6(Ipv6Addr::new(0xfd00, 0x64, 0, 0, 0, 0, 0, last_word))
}

/// Clients that send traffic: different first-level buckets, two sharing one (10.100.0.1 and
/// .2, fd00:64::105 and ::106), two sharing a last byte (10.100.0.2 and 10.100.7.2,
/// fd00:64::105 and ::305).
const SAMPLES: [&str; 11] = [
    "10.100.0.1",
    "10.100.0.2",
    "10.100.7.2",
    "10.100.13.77",
    "10.100.21.200",
    "10.100.25.5",
    "10.100.33.128",
    "10.100.39.250",
    "fd00:64::105",
    "fd00:64::106",
    "fd00:64::305",
];
/// A client no rule names: its packets pass unclassified.
const UNLIMITED: &str = "10.100.200.9";

fn limit(ip: IpAddr) -> Context {
    ip_limit(ip, RATE, "veth-s")
}

/// The class counters (bytes) of a device, by minor.
fn class_bytes(sock: &mut RtSocket, ifindex: u32) -> BTreeMap<u16, u64> {
    let tc = sock.device_tc(ifindex).unwrap();
    tc.classes
        .iter()
        .filter(|c| c.class.handle.major() == shaping::ROOT_MAJOR)
        .map(|c| (c.class.handle.minor(), c.stats.bytes))
        .collect()
}

fn send_udp(server: &Netns, to: IpAddr, packets: u64) {
    server
        .spawn(move || {
            let bind = if to.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" };
            let sock = UdpSocket::bind(bind).unwrap();
            for _ in 0..packets {
                sock.send_to(&[0x5a; PAYLOAD], SocketAddr::new(to, 9))
                    .unwrap();
            }
        })
        .join()
        .unwrap();
}

/// What HTB counts for one of those packets: Ethernet, IP and UDP headers and the payload.
fn wire_bytes(ip: IpAddr) -> u64 {
    let ip_header = if ip.is_ipv4() { 20 } else { 40 };
    (14 + ip_header + 8 + PAYLOAD) as u64
}

/// The server shapes `veth-s`; the client namespace holds the sampled addresses.
fn pair() -> Pair {
    let pair = Pair::new("scale");
    let (server, client) = (&pair.server, &pair.client);
    server.ip(&["addr", "add", "10.100.255.254/16", "dev", "veth-s"]);
    server.ip(&[
        "-6",
        "addr",
        "add",
        "fd00:64::ffff:1/64",
        "dev",
        "veth-s",
        "nodad",
    ]);
    for a in SAMPLES.iter().chain([&UNLIMITED]) {
        match a.contains(':') {
            true => client.ip(&[
                "-6",
                "addr",
                "add",
                &format!("{a}/64"),
                "dev",
                "veth-c",
                "nodad",
            ]),
            false => client.ip(&["addr", "add", &format!("{a}/16"), "dev", "veth-c"]),
        };
    }
    pair
}

#[test]
fn ten_thousand_limits_read_back_as_decided_and_classify_each_client_alone() {
    require(&[need::NAMESPACE, need::DOWNLOAD, &[need::VETH]]);
    let started = Instant::now();
    let pair = pair();
    let server = &pair.server;
    let mut kernel = NetlinkKernel::from_socket(server.socket());
    let device = kernel.socket().link_by_name("veth-s").unwrap();
    let clients: Vec<IpAddr> = (0..V4_CLIENTS)
        .map(v4_client)
        .chain((0..V6_CLIENTS).map(v6_client))
        .collect();
    for s in SAMPLES {
        assert!(clients.contains(&s.parse().unwrap()), "{s} is not limited");
    }

    let (obs, sent) = limit_all(&mut kernel, &device, &clients, RATE);
    eprintln!(
        "{} limits: {sent} steps decided and sent in {:.1?}",
        clients.len(),
        started.elapsed()
    );

    // The kernel's state, read back, is exactly what the decisions tracked.
    let read_at = Instant::now();
    let read = observe(&mut kernel, &device, &limit(clients[0]).request);
    let theirs = read.shaped.as_ref().unwrap();
    eprintln!("read back in {:.1?}", read_at.elapsed());
    let mut ours = obs.shaped.clone().unwrap();
    assert_eq!(theirs.classes.len(), clients.len());
    for (minor, c) in &ours.classes {
        assert_eq!(theirs.classes[minor].class, c.class, "class {minor:x}");
    }
    // Counters aside (the root's move with neighbour discovery).
    ours.classes = theirs.classes.clone();
    ours.root = theirs.root.clone();
    assert!(
        theirs.unrecognised.is_empty(),
        "{:?}",
        theirs.unrecognised.first()
    );
    assert_eq!(theirs.node_count(), clients.len());
    assert_eq!(theirs.bucket_tables.len(), 40 + 4);
    assert_eq!(&ours, theirs);
    for ip in clients
        .iter()
        .step_by(97)
        .chain(SAMPLES.map(|s| s.parse().unwrap()).iter())
    {
        let d = decide(&limit(*ip), &read);
        assert_eq!(d.kind, DecisionKind::NoOp, "{ip}: {:?}", d.reason);
        assert!(d.steps.is_empty());
    }

    // Real packets: each sample's land in its own class, nobody else's, and a client no rule
    // names passes unclassified.
    let class_of = |ip: IpAddr| theirs.ip_node(ip).unwrap().classid.unwrap().minor();
    let mut targets: Vec<IpAddr> = SAMPLES.iter().map(|s| s.parse().unwrap()).collect();
    targets.push(UNLIMITED.parse().unwrap());
    for ip in &targets {
        send_udp(server, *ip, 1); // resolves the neighbour before counting
    }
    std::thread::sleep(Duration::from_millis(300));
    let before = class_bytes(kernel.socket(), device.index);
    for ip in &targets {
        send_udp(server, *ip, PACKETS);
    }
    let mut expected = before.clone();
    for ip in &targets[..SAMPLES.len()] {
        *expected.get_mut(&class_of(*ip)).unwrap() += PACKETS * wire_bytes(*ip);
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut after = class_bytes(kernel.socket(), device.index);
    while after != expected && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        after = class_bytes(kernel.socket(), device.index);
    }
    let moved: Vec<(u16, u64)> = after
        .iter()
        .filter(|(m, b)| before.get(m) != Some(b))
        .map(|(m, b)| (*m, b - before[m]))
        .collect();
    eprintln!("classes whose counters moved: {moved:x?}");
    assert_eq!(moved.len(), SAMPLES.len(), "{moved:x?}");
    assert_eq!(after, expected);
    eprintln!("done in {:.1?}", started.elapsed());
}

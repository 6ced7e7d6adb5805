//! The StatsService client (`raylimit::xray::api`), connecting from inside private network
//! namespaces made by the test.
//!
//! No real Xray binary is available on this machine (the `xray` used elsewhere in the tests is a
//! renamed Debian v2ray 4.34), so the Xray-only calls (GetStatsOnlineIpList, GetAllOnlineUsers)
//! are tested against a small gRPC server written here, with Xray's message shapes and only
//! Xray's service name. QueryStats, the v2ray service name, UNIMPLEMENTED for the Xray-only
//! calls, refused and silent connections are tested against the real v2ray 4.34 runtime.

mod common;

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use common::fake_xray::{alice_online, FakeXray};
use common::{need, require, temp_dir, Launched, Netns, Pair, V2RAY_BIN};
use raylimit::xray::api::{ApiClient, ApiError, UserTraffic, V2RAY_SERVICE, XRAY_SERVICE};
use raylimit::xray::locate::Flavour;

const TIMEOUT: Duration = Duration::from_secs(2);

/// A loopback port nothing in this (the test's) namespace listens on.
fn free_host_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn v4(s: &str) -> IpAddr {
    s.parse().unwrap()
}

#[test]
fn xray_calls_through_the_namespace() {
    require(&[need::NAMESPACE]);
    let ns = Netns::new("xapi");
    let port = free_host_port();
    let server = FakeXray::start(
        &ns,
        SocketAddr::from(([127, 0, 0, 1], port)),
        alice_online(),
    );
    let path = ns.path();

    let mut api = ApiClient::connect(server.addr, Some(&path), Flavour::Xray, TIMEOUT)
        .expect("connect inside the namespace");
    assert_eq!(
        api.user_traffic().unwrap(),
        vec![
            UserTraffic {
                email: "alice@example.com".into(),
                uplink: Some(4064121),
                downlink: Some(20001090),
            },
            UserTraffic {
                email: "bob@example.com".into(),
                uplink: Some(277),
                downlink: Some(18733642),
            },
        ]
    );
    assert_eq!(api.service(), Some(XRAY_SERVICE));
    assert_eq!(
        api.online_ips("alice@example.com").unwrap(),
        vec![
            v4("10.1.2.3"),
            v4("10.9.9.9"),
            IpAddr::V6("2001:db8::7".parse().unwrap())
        ]
    );
    assert_eq!(
        api.online_users().unwrap(),
        vec![
            "alice@example.com".to_string(),
            "bob@example.com".to_string()
        ]
    );
    match api.online_ips("nobody@example.com") {
        Err(ApiError::NotFound(why)) => {
            assert!(why.contains("NOT_FOUND"), "{why}");
            assert!(why.contains("user>>>nobody@example.com>>>online"), "{why}");
        }
        other => panic!("an unknown user: {other:?}"),
    }
    // The xray name first, and only it: it answered.
    let paths = server.paths();
    assert!(
        paths
            .iter()
            .all(|p| p.starts_with(&format!("/{XRAY_SERVICE}/"))),
        "{paths:?}"
    );
    drop(api);

    // As v2ray: the v2ray name is unknown to this server, so the client falls back and keeps
    // the xray name.
    let mut api = ApiClient::connect(server.addr, Some(&path), Flavour::V2ray, TIMEOUT).unwrap();
    assert_eq!(api.user_traffic().unwrap().len(), 2);
    assert_eq!(api.service(), Some(XRAY_SERVICE));
    assert_eq!(api.online_users().unwrap().len(), 2);
    let paths = server.paths();
    let tail: Vec<&str> = paths[paths.len() - 3..]
        .iter()
        .map(String::as_str)
        .collect();
    assert_eq!(
        tail,
        [
            format!("/{V2RAY_SERVICE}/QueryStats"),
            format!("/{XRAY_SERVICE}/QueryStats"),
            format!("/{XRAY_SERVICE}/GetAllOnlineUsers"),
        ]
    );
    drop(api);

    // Outside the namespace nothing listens on that port.
    match ApiClient::connect(server.addr, None, Flavour::Xray, TIMEOUT) {
        Err(ApiError::Unreachable(why)) => assert!(why.contains("refused"), "{why}"),
        other => panic!("connected outside the namespace: {other:?}"),
    }
    // A namespace that cannot be entered.
    match ApiClient::connect(
        server.addr,
        Some("/run/netns/raylimit-no-such-namespace"),
        Flavour::Xray,
        TIMEOUT,
    ) {
        Err(ApiError::Unreachable(why)) => {
            assert!(why.contains("raylimit-no-such-namespace"), "{why}")
        }
        other => panic!("entered a missing namespace: {other:?}"),
    }
}

#[test]
fn ipv6_endpoint() {
    require(&[need::NAMESPACE]);
    let ns = Netns::new("xapi6");
    let server = FakeXray::start(
        &ns,
        SocketAddr::from((Ipv6Addr::LOCALHOST, 0)),
        alice_online(),
    );
    assert!(server.addr.is_ipv6());
    let mut api =
        ApiClient::connect(server.addr, Some(&ns.path()), Flavour::Xray, TIMEOUT).unwrap();
    assert_eq!(
        api.online_users().unwrap(),
        vec!["alice@example.com", "bob@example.com"]
    );
}

#[test]
fn silent_listener_times_out() {
    require(&[need::NAMESPACE]);
    // A listener that never accepts: the kernel completes the TCP handshake, but nothing ever
    // speaks HTTP/2, so the handshake or the first call runs out of time.
    let ns = Netns::new("xapis");
    let (tx, rx) = std::sync::mpsc::channel();
    let (hold_tx, hold_rx) = std::sync::mpsc::channel::<()>();
    let holder = ns.spawn(move || {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        tx.send(l.local_addr().unwrap()).unwrap();
        let _ = hold_rx.recv_timeout(Duration::from_secs(30));
    });
    let addr = rx.recv_timeout(Duration::from_secs(5)).unwrap();
    let timeout = Duration::from_millis(800);
    let start = Instant::now();
    let result = ApiClient::connect(addr, Some(&ns.path()), Flavour::Xray, timeout)
        .and_then(|mut api| api.user_traffic());
    let took = start.elapsed();
    match result {
        Err(ApiError::Timeout(why)) => {
            eprintln!("silent listener after {took:?}: {why}");
            assert!(why.contains("longer than 0.8 s"), "{why}")
        }
        other => panic!("a silent listener: {other:?}"),
    }
    assert!(took < timeout + Duration::from_millis(500), "{took:?}");
    hold_tx.send(()).unwrap();
    holder.join().unwrap();
}

// --- The real v2ray 4.34 runtime ---

const UUID: &str = "11111111-1111-4111-8111-111111111111";
const API_PORT: u16 = 10085;
const VMESS_PORT: u16 = 10086;
const SOCKS_PORT: u16 = 10080;
const SINK_PORT: u16 = 18080;

/// One v2ray process that is its own vmess client: socks-in goes out through vmess as alice to
/// its own vmess-in, which counts alice's bytes and sends them on directly. The API listens on
/// 127.0.0.1 and ::1.
const V2RAY_CONFIG: &str = r#"{"log": {"loglevel": "warning"},
 "api": {"tag": "api", "services": ["StatsService"]},
 "stats": {},
 "policy": {"levels": {"0": {"statsUserUplink": true, "statsUserDownlink": true}}},
 "inbounds": [
  {"tag": "api-in", "listen": "127.0.0.1", "port": API_PORT, "protocol": "dokodemo-door", "settings": {"address": "127.0.0.1"}},
  {"tag": "api6-in", "listen": "::1", "port": API_PORT, "protocol": "dokodemo-door", "settings": {"address": "127.0.0.1"}},
  {"tag": "vmess-in", "listen": "127.0.0.1", "port": VMESS_PORT, "protocol": "vmess",
   "settings": {"clients": [{"id": "UUID", "alterId": 0, "email": "alice@example.com", "level": 0}]}},
  {"tag": "socks-in", "listen": "127.0.0.1", "port": SOCKS_PORT, "protocol": "socks", "settings": {"auth": "noauth", "udp": false}}],
 "outbounds": [
  {"tag": "direct", "protocol": "freedom", "settings": {}},
  {"tag": "vm-alice", "protocol": "vmess", "settings": {"vnext": [{"address": "127.0.0.1", "port": VMESS_PORT,
     "users": [{"id": "UUID", "alterId": 0, "security": "aes-128-gcm"}]}]}}],
 "routing": {"rules": [
  {"type": "field", "inboundTag": ["api-in", "api6-in"], "outboundTag": "api"},
  {"type": "field", "inboundTag": ["socks-in"], "outboundTag": "vm-alice"}]}}"#;

fn start_v2ray(ns: &Netns) -> Launched {
    let dir = temp_dir("xapi-v2ray");
    let config = V2RAY_CONFIG
        .replace("API_PORT", &API_PORT.to_string())
        .replace("VMESS_PORT", &VMESS_PORT.to_string())
        .replace("SOCKS_PORT", &SOCKS_PORT.to_string())
        .replace("UUID", UUID);
    std::fs::write(dir.join("config.json"), config).unwrap();
    let rt = Launched::start(
        ns,
        std::path::Path::new(V2RAY_BIN),
        &["-config", "config.json"],
        &dir,
        &[],
        Some(dir.clone()),
    );
    // Wait until the API inbound listens.
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        let up = ns
            .spawn(|| {
                TcpStream::connect_timeout(
                    &SocketAddr::from(([127, 0, 0, 1], API_PORT)),
                    Duration::from_millis(200),
                )
                .is_ok()
            })
            .join()
            .unwrap();
        if up {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    rt
}

/// Sends `up` bytes as alice (through socks-in and vmess) to a sink in the namespace, which
/// answers with `down` bytes; returns the bytes received. Bounded by socket timeouts.
fn alice_traffic(ns: &Netns, up: usize, down: usize) -> usize {
    let (tx, rx) = std::sync::mpsc::channel();
    let sink = ns.spawn(move || {
        let l = TcpListener::bind(("127.0.0.1", SINK_PORT)).unwrap();
        tx.send(()).unwrap();
        let (mut c, _) = l.accept().unwrap();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut got = vec![0u8; up];
        c.read_exact(&mut got).unwrap();
        c.write_all(&vec![0x6bu8; down]).unwrap();
    });
    rx.recv_timeout(Duration::from_secs(5)).unwrap();
    let client = ns.spawn(move || {
        let mut s = TcpStream::connect(("127.0.0.1", SOCKS_PORT)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
        // SOCKS5, no authentication, CONNECT 127.0.0.1:SINK_PORT.
        s.write_all(&[5, 1, 0]).unwrap();
        let mut hello = [0u8; 2];
        s.read_exact(&mut hello).unwrap();
        assert_eq!(hello, [5, 0]);
        let p = SINK_PORT.to_be_bytes();
        s.write_all(&[5, 1, 0, 1, 127, 0, 0, 1, p[0], p[1]])
            .unwrap();
        let mut reply = [0u8; 10];
        s.read_exact(&mut reply).unwrap();
        assert_eq!(reply[1], 0, "socks reply {reply:?}");
        s.write_all(&vec![0x5au8; up]).unwrap();
        let mut back = Vec::new();
        let _ = s.read_to_end(&mut back);
        back.len()
    });
    let got = client.join().unwrap();
    sink.join().unwrap();
    got
}

#[test]
fn real_v2ray_434() {
    require(&[need::NAMESPACE, &[need::V2RAY]]);
    let ns = Netns::new("xapiv");
    let v2ray = start_v2ray(&ns);
    let proc_ns = format!("/proc/{}/ns/net", v2ray.pid());
    let api_addr = SocketAddr::from(([127, 0, 0, 1], API_PORT));

    // Through the runtime's own /proc/PID/ns/net. No user has connected: no counters yet.
    let mut api = ApiClient::connect(api_addr, Some(&proc_ns), Flavour::V2ray, TIMEOUT)
        .expect("connect to v2ray's API");
    assert_eq!(api.user_traffic().unwrap(), vec![]);
    assert_eq!(api.service(), Some(V2RAY_SERVICE));

    // v2ray 4.34 has StatsService but not Xray's online calls.
    for result in [
        api.online_ips("alice@example.com").map(|_| ()),
        api.online_users().map(|_| ()),
    ] {
        match result {
            Err(ApiError::Unimplemented(why)) => {
                eprintln!("v2ray 4.34: {why}");
                assert!(why.contains("unknown method"), "{why}");
                assert!(why.contains(V2RAY_SERVICE), "{why}");
            }
            other => panic!("v2ray 4.34 online call: {other:?}"),
        }
    }

    // Traffic as alice; her counters appear and cover what was sent and received.
    let (up, down) = (300_000, 120_000);
    assert_eq!(alice_traffic(&ns, up, down), down);
    let deadline = Instant::now() + Duration::from_secs(5);
    let alice = loop {
        let users = api.user_traffic().unwrap();
        if let Some(a) = users.iter().find(|u| u.email == "alice@example.com") {
            if a.uplink >= Some(up as u64) && a.downlink >= Some(down as u64) {
                break a.clone();
            }
        }
        assert!(Instant::now() < deadline, "alice's counters: {users:?}");
        std::thread::sleep(Duration::from_millis(100));
    };
    eprintln!("alice after traffic: {alice:?}");
    assert_eq!(api.user_traffic().unwrap().len(), 1);

    // As Xray: the xray name is unknown to v2ray, so the client falls back to the v2ray name.
    // Over IPv6, through the namespace's bind mount this time.
    let mut api6 = ApiClient::connect(
        SocketAddr::from((Ipv6Addr::LOCALHOST, API_PORT)),
        Some(&ns.path()),
        Flavour::Xray,
        TIMEOUT,
    )
    .expect("connect over IPv6");
    let users = api6.user_traffic().unwrap();
    assert_eq!(users.len(), 1);
    assert!(users[0].uplink >= alice.uplink, "{users:?}");
    assert_eq!(api6.service(), Some(V2RAY_SERVICE));
    assert!(matches!(
        api6.online_users(),
        Err(ApiError::Unimplemented(_))
    ));

    // A closed port in the runtime's namespace.
    match ApiClient::connect(
        SocketAddr::from(([127, 0, 0, 1], API_PORT + 100)),
        Some(&proc_ns),
        Flavour::V2ray,
        TIMEOUT,
    ) {
        Err(ApiError::Unreachable(why)) => assert!(why.contains("refused"), "{why}"),
        other => panic!("a closed port: {other:?}"),
    }
    // The runtime stopped: the open connection breaks, and the client cannot make it again
    // (the process's namespace path is gone; over the bind mount, the port is closed).
    drop(v2ray);
    for (client, needle) in [(&mut api, proc_ns.as_str()), (&mut api6, "refused")] {
        match client.user_traffic() {
            Err(ApiError::Unreachable(why)) => {
                eprintln!("after the runtime stopped: {why}");
                assert!(why.contains(needle), "{why}");
            }
            other => panic!("after the runtime stopped: {other:?}"),
        }
    }
}

#[test]
fn unanswered_connect_times_out() {
    require(&[need::NAMESPACE, &[need::VETH]]);
    // The client's namespace sends to 10.99.0.77 through a permanent neighbour entry with a MAC
    // no one has: the SYN leaves and is dropped on the other side, so nothing ever answers.
    let pair = Pair::new("xapit");
    pair.client.ip(&[
        "neigh",
        "add",
        "10.99.0.77",
        "lladdr",
        "02:00:00:00:00:77",
        "dev",
        "veth-c",
        "nud",
        "permanent",
    ]);
    let timeout = Duration::from_millis(700);
    let start = Instant::now();
    let result = ApiClient::connect(
        SocketAddr::from(([10, 99, 0, 77], API_PORT)),
        Some(&pair.client.path()),
        Flavour::Xray,
        timeout,
    );
    let took = start.elapsed();
    match result {
        Err(ApiError::Timeout(why)) => {
            eprintln!("unanswered connect after {took:?}: {why}");
            assert!(why.contains("connecting to 10.99.0.77:10085"), "{why}");
            assert!(why.contains("took longer than 0.7 s"), "{why}");
        }
        other => panic!("an unanswered connect: {other:?}"),
    }
    assert!(
        took >= timeout && took < timeout + Duration::from_millis(500),
        "{took:?}"
    );
}

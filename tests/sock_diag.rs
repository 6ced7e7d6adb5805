//! sock_diag against the kernel: sockets this test opens in a private namespace are dumped with
//! their addresses and inodes (checked against the sockets themselves, procfs and `ss`), and a
//! namespace entered by path shows its own sockets and no others. Needs root.

mod common;

use std::collections::BTreeSet;
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{need, require, run, Netns};
use raylimit::netlink::sock_diag::{
    self, state_mask, InetSocket, Transport, TCP_CLOSE, TCP_ESTABLISHED,
};
use raylimit::netlink::socket::in_netns;
use raylimit::runtime::procfs::socket_inodes;

/// The inode of a socket descriptor, as `fstat` sees it.
fn inode(fd: &impl AsRawFd) -> u64 {
    std::fs::metadata(format!("/proc/self/fd/{}", fd.as_raw_fd()))
        .unwrap()
        .ino()
}

/// Accepts one connection, giving up after five seconds.
fn accept(listener: &TcpListener) -> TcpStream {
    listener.set_nonblocking(true).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                stream.set_nonblocking(false).unwrap();
                return stream;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10))
            }
            Err(e) => panic!("accept: {e}"),
        }
    }
}

/// A listener on `bind` and one connection to it at `connect`'s address with the listener's port:
/// (listener, client, accepted).
fn connection(bind: &str, connect: &str) -> (TcpListener, TcpStream, TcpStream) {
    let listener = TcpListener::bind(bind).unwrap();
    let mut target: SocketAddr = connect.parse().unwrap();
    target.set_port(listener.local_addr().unwrap().port());
    let client = TcpStream::connect_timeout(&target, Duration::from_secs(5)).unwrap();
    let accepted = accept(&listener);
    (listener, client, accepted)
}

fn dump(netns_path: Option<&str>, transport: Transport, states: u32) -> Vec<InetSocket> {
    let mut sock = sock_diag::open(netns_path).unwrap();
    sock_diag::dump(&mut sock, transport, states).unwrap()
}

fn inodes(sockets: &[InetSocket]) -> BTreeSet<u64> {
    sockets.iter().map(|s| s.inode).collect()
}

/// One line of `ss -Hne`.
struct SsLine {
    /// (local, remote), when both parse (`0.0.0.0:*` does not).
    addrs: Option<(SocketAddr, SocketAddr)>,
    inode: u64,
    cookie: u64,
}

/// `ss -Hne ARGS` run in the namespace.
fn ss(ns: &Netns, args: &[&str]) -> Vec<SsLine> {
    let mut full = vec!["ip", "netns", "exec", &ns.name, "ss", "-Hne"];
    full.extend_from_slice(args);
    run(&full)
        .lines()
        .map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let field = |key: &str| fields.iter().find_map(|f| f.strip_prefix(key));
            let addrs = fields
                .iter()
                .filter_map(|f| f.parse::<SocketAddr>().ok())
                .collect::<Vec<_>>();
            SsLine {
                addrs: (addrs.len() == 2).then(|| (addrs[0], addrs[1])),
                inode: field("ino:").expect("ino:").parse().unwrap(),
                cookie: u64::from_str_radix(field("sk:").expect("sk:"), 16).unwrap(),
            }
        })
        .collect()
}

#[test]
fn established_tcp_sockets_match_the_sockets_procfs_and_ss() {
    require(&[need::NAMESPACE, &[need::SS]]);
    let ns = Netns::new("sd");
    // IPv4, IPv6, and an IPv4 client accepted by a dual-stack IPv6 listener (a v4-mapped socket).
    let conns = in_netns(&ns.name, || {
        Ok([
            connection("127.0.0.1:0", "127.0.0.1:0"),
            connection("[::1]:0", "[::1]:0"),
            connection("[::]:0", "127.0.0.1:0"),
        ])
    })
    .unwrap();
    let dumped = dump(
        Some(&ns.path()),
        Transport::Tcp,
        state_mask(&[TCP_ESTABLISHED]),
    );

    // Both ends of every connection, and nothing else (the namespace is this test's alone).
    assert_eq!(dumped.len(), 2 * conns.len(), "{dumped:#?}");
    let ours = socket_inodes(Path::new("/proc"), std::process::id()).unwrap();
    for (_, client, accepted) in &conns {
        for stream in [client, accepted] {
            let (local, remote) = (stream.local_addr().unwrap(), stream.peer_addr().unwrap());
            let found = dumped
                .iter()
                .find(|s| s.local == local && s.remote == remote)
                .unwrap_or_else(|| panic!("{local} -> {remote} not dumped: {dumped:#?}"));
            assert_eq!(found.transport, Transport::Tcp);
            assert_eq!(found.state, TCP_ESTABLISHED);
            assert_eq!(found.uid, 0);
            assert_eq!(found.inode, inode(stream));
            assert!(ours.contains(&found.inode), "{found:?} not in our fd table");
        }
    }
    // The kernel keeps the v4-mapped peer of the dual-stack listener's socket as IPv6.
    let mapped = conns[2].2.local_addr().unwrap();
    assert!(matches!(mapped, SocketAddr::V6(a) if a.ip().to_ipv4_mapped().is_some()));

    let ss: BTreeSet<_> = ss(&ns, &["-t", "state", "established"])
        .into_iter()
        .map(|l| (l.addrs.expect("addresses"), l.inode, l.cookie))
        .collect();
    let ours: BTreeSet<_> = dumped
        .iter()
        .map(|s| ((s.local, s.remote), s.inode, s.cookie))
        .collect();
    assert_eq!(ours, ss);
}

#[test]
fn udp_sockets_connected_and_not() {
    require(&[need::NAMESPACE, &[need::SS]]);
    let ns = Netns::new("sdu");
    let (unconnected, connected) = in_netns(&ns.name, || {
        let unconnected = UdpSocket::bind("127.0.0.1:0")?;
        let connected = UdpSocket::bind("[::1]:0")?;
        connected.connect(connected.local_addr()?)?;
        Ok((unconnected, connected))
    })
    .unwrap();
    let dumped = dump(
        Some(&ns.path()),
        Transport::Udp,
        state_mask(&[TCP_ESTABLISHED, TCP_CLOSE]),
    );
    let find = |sock: &UdpSocket| {
        dumped
            .iter()
            .find(|s| s.inode == inode(sock))
            .unwrap_or_else(|| panic!("{sock:?} not dumped: {dumped:#?}"))
            .clone()
    };
    let u = find(&unconnected);
    assert_eq!(
        (u.transport, u.state, u.local, u.remote),
        (
            Transport::Udp,
            TCP_CLOSE,
            unconnected.local_addr().unwrap(),
            "0.0.0.0:0".parse().unwrap()
        )
    );
    let c = find(&connected);
    let addr = connected.local_addr().unwrap();
    assert_eq!(
        (c.transport, c.state, c.local, c.remote),
        (Transport::Udp, TCP_ESTABLISHED, addr, addr)
    );
    assert_eq!(dumped.len(), 2);
    let ss: BTreeSet<u64> = ss(&ns, &["-ua"]).into_iter().map(|l| l.inode).collect();
    assert_eq!(inodes(&dumped), ss);
}

#[test]
fn a_namespace_entered_by_path_shows_its_sockets_only() {
    require(&[need::NAMESPACE]);
    let ns = Netns::new("sdp");
    let (_l, inside, _a) =
        in_netns(&ns.name, || Ok(connection("127.0.0.1:0", "127.0.0.1:0"))).unwrap();
    let (_hl, host, _ha) = connection("127.0.0.1:0", "127.0.0.1:0");
    let (inside, host) = (inode(&inside), inode(&host));

    // A thread parked in the namespace: its /proc/PID/task/TID/ns/net is a process-style path.
    let (tid_tx, tid_rx) = std::sync::mpsc::channel();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let parked = ns.spawn(move || {
        // SAFETY: gettid has no preconditions.
        tid_tx.send(unsafe { libc::gettid() }).unwrap();
        let _ = done_rx.recv_timeout(Duration::from_secs(30));
    });
    let tid = tid_rx.recv_timeout(Duration::from_secs(5)).unwrap();
    let task_path = format!("/proc/{}/task/{tid}/ns/net", std::process::id());

    let established = state_mask(&[TCP_ESTABLISHED]);
    let by_name = inodes(&dump(Some(&ns.path()), Transport::Tcp, established));
    let by_task = inodes(&dump(Some(&task_path), Transport::Tcp, established));
    done_tx.send(()).unwrap();
    parked.join().unwrap();
    assert_eq!(by_name, by_task);
    assert!(
        by_task.contains(&inside) && !by_task.contains(&host),
        "{by_task:?}"
    );

    for path in [None, Some("/proc/self/ns/net")] {
        let seen = inodes(&dump(path, Transport::Tcp, established));
        assert!(seen.contains(&host) && !seen.contains(&inside), "{path:?}");
    }
    assert!(sock_diag::open(Some("/proc/self/ns/none")).is_err());
}

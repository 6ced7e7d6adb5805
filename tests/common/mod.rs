//! Test support: private network namespaces (always removed), topology built with `ip` (tests may
//! use iproute2; the product never does), and bounded TCP traffic between namespaces.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use raylimit::netlink::socket::in_netns;
use raylimit::netlink::RtSocket;

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// Runs a command and returns stdout; panics with stderr on failure.
pub fn run(args: &[&str]) -> String {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A network namespace that exists for the life of this value.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(tag: &str) -> Self {
        let name = format!(
            "rlt-{tag}-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst)
        );
        run(&["ip", "netns", "add", &name]);
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    pub fn ip(&self, args: &[&str]) -> String {
        let mut full = vec!["ip", "-n", &self.name];
        full.extend_from_slice(args);
        run(&full)
    }

    pub fn tc(&self, args: &[&str]) -> String {
        let mut full = vec!["tc", "-n", &self.name];
        full.extend_from_slice(args);
        run(&full)
    }

    pub fn socket(&self) -> RtSocket {
        RtSocket::open_in(Some(&self.name)).expect("netlink socket in test namespace")
    }

    pub fn ifindex(&self, dev: &str) -> u32 {
        self.socket().link_by_name(dev).expect("device").index
    }

    /// Runs `f` on a fresh thread inside this namespace (sockets it opens live here).
    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::JoinHandle<T> {
        let name = self.name.clone();
        std::thread::spawn(move || in_netns(&name, || Ok(f())).expect("enter namespace"))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Two namespaces joined by a veth pair: `server` has `veth-s` 10.99.0.1, `client` has `veth-c` 10.99.0.2
/// (and fd00:99::1 / fd00:99::2).
pub struct Pair {
    pub server: Netns,
    pub client: Netns,
}

pub const SERVER_IP: &str = "10.99.0.1";
pub const CLIENT_IP: &str = "10.99.0.2";

impl Pair {
    pub fn new(tag: &str) -> Self {
        let server = Netns::new(&format!("{tag}s"));
        let client = Netns::new(&format!("{tag}c"));
        server.ip(&[
            "link",
            "add",
            "veth-s",
            "type",
            "veth",
            "peer",
            "name",
            "veth-c",
            "netns",
            &client.name,
        ]);
        server.ip(&["addr", "add", "10.99.0.1/24", "dev", "veth-s"]);
        client.ip(&["addr", "add", "10.99.0.2/24", "dev", "veth-c"]);
        server.ip(&[
            "-6",
            "addr",
            "add",
            "fd00:99::1/64",
            "dev",
            "veth-s",
            "nodad",
        ]);
        client.ip(&[
            "-6",
            "addr",
            "add",
            "fd00:99::2/64",
            "dev",
            "veth-c",
            "nodad",
        ]);
        server.ip(&["link", "set", "veth-s", "up"]);
        client.ip(&["link", "set", "veth-c", "up"]);
        Pair { server, client }
    }
}

/// Sends TCP data from `sender` to a listener in `receiver` at `addr` for `secs` seconds and
/// returns the receiver's throughput in bytes/s, measured after the first second (so the
/// initial burst does not count). Bounded in time; stops by itself.
pub fn measure_tcp(sender: &Netns, receiver: &Netns, addr: SocketAddr, secs: u64) -> f64 {
    let (tx, rx) = std::sync::mpsc::channel();
    let server = receiver.spawn(move || {
        let listener = TcpListener::bind(addr).expect("bind");
        tx.send(()).unwrap();
        let (mut conn, _) = listener.accept().expect("accept");
        conn.set_read_timeout(Some(Duration::from_secs(secs + 5)))
            .unwrap();
        let mut buf = vec![0u8; 1 << 16];
        let start = Instant::now();
        let warmup = Duration::from_secs(1);
        let mut counted = 0u64;
        let mut window_start = None;
        loop {
            match conn.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if start.elapsed() >= warmup {
                        window_start.get_or_insert_with(Instant::now);
                        counted += n as u64;
                    }
                }
            }
        }
        let window = window_start
            .map(|w| w.elapsed().as_secs_f64())
            .unwrap_or(0.0);
        if window > 0.0 {
            counted as f64 / window
        } else {
            0.0
        }
    });
    rx.recv_timeout(Duration::from_secs(5))
        .expect("listener ready");
    let client = sender.spawn(move || {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect");
        s.set_write_timeout(Some(Duration::from_secs(2))).unwrap();
        let chunk = vec![0x5au8; 1 << 16];
        let end = Instant::now() + Duration::from_secs(secs);
        while Instant::now() < end {
            if s.write(&chunk).is_err() {
                break;
            }
        }
    });
    client.join().unwrap();
    server.join().unwrap()
}

/// Asserts `measured` is within 10% of `target`.
pub fn assert_within_10_percent(what: &str, measured: f64, target: f64) {
    let ratio = measured / target;
    eprintln!(
        "{what}: measured {:.0} B/s against {target:.0} B/s ({:+.1}%)",
        measured,
        (ratio - 1.0) * 100.0
    );
    assert!(
        (0.9..=1.1).contains(&ratio),
        "{what}: {measured:.0} B/s is not within 10% of {target:.0} B/s"
    );
}

//! Test support: private network namespaces (always removed), topology built with `ip` (tests may
//! use iproute2; the product never does), and bounded TCP traffic between namespaces. The pieces
//! benches share (what a test needs, namespaces, processes, directories) are in [`kit`]; what
//! needs the raylimit library (netlink sockets inside a namespace) is added here.
#![allow(dead_code, unused_imports)]

pub mod accuracy;
mod connect_from;
pub mod container;
pub mod fake_xray;
pub mod host;
pub mod kit;
pub mod plans;
pub mod proxy;

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use raylimit::netlink::socket::in_netns;
use raylimit::netlink::RtSocket;

pub use connect_from::connect_from;
pub use kit::need::{self, require};
pub use kit::process::{Process as Launched, V2RAY_BIN};
pub use kit::{run, Netns, TempDir, V2ray};

/// raylimit's netlink socket and threads inside a test namespace.
impl Netns {
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

/// A namespace with a veth pair `veth-a`/`veth-b` (both up) to shape on, and a real runtime.
pub fn veth_host(tag: &str) -> (Netns, V2ray) {
    require(&[need::NAMESPACE, &[need::VETH, need::V2RAY]]);
    let ns = Netns::new(tag);
    ns.ip(&[
        "link", "add", "veth-a", "type", "veth", "peer", "name", "veth-b",
    ]);
    ns.ip(&["link", "set", "veth-a", "up"]);
    ns.ip(&["link", "set", "veth-b", "up"]);
    let runtime = V2ray::start(&ns);
    (ns, runtime)
}

/// A veth pair from `a` (`a_dev`, address `a_ip`) to `b` (`b_dev`, `b_ip`), both ends up.
pub fn veth(a: &Netns, a_dev: &str, a_ip: &str, b: &Netns, b_dev: &str, b_ip: &str) {
    a.ip(&[
        "link", "add", a_dev, "type", "veth", "peer", "name", b_dev, "netns", &b.name,
    ]);
    a.ip(&["addr", "add", a_ip, "dev", a_dev]);
    b.ip(&["addr", "add", b_ip, "dev", b_dev]);
    a.ip(&["link", "set", a_dev, "up"]);
    b.ip(&["link", "set", b_dev, "up"]);
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
        require(&[need::NAMESPACE, &[need::VETH]]);
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
    measure_tcp_from(sender, receiver, None, addr, secs)
}

/// Like [`measure_tcp`], with the sender bound to `source` when given.
pub fn measure_tcp_from(
    sender: &Netns,
    receiver: &Netns,
    source: Option<IpAddr>,
    addr: SocketAddr,
    secs: u64,
) -> f64 {
    measure_tcp_with(sender, receiver, addr, secs, move || match source {
        Some(src) => connect_from(src, addr, Duration::from_secs(5)),
        None => TcpStream::connect_timeout(&addr, Duration::from_secs(5)),
    })
}

/// Like [`measure_tcp`], the sender's socket made by `connect` (in `sender`'s namespace).
pub fn measure_tcp_with(
    sender: &Netns,
    receiver: &Netns,
    addr: SocketAddr,
    secs: u64,
    connect: impl FnOnce() -> std::io::Result<TcpStream> + Send + 'static,
) -> f64 {
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
        let mut s = connect().expect("connect");
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

/// A private owner-annotation directory for one test (`RAYLIMIT_STATE_DIR`), removed on drop.
pub type StateDir = TempDir;

/// `$TMPDIR/raylimit-state-TAG-PID-N`, not created (raylimit creates it).
pub fn state_dir(tag: &str) -> StateDir {
    TempDir::named(&format!("raylimit-state-{tag}"))
}

/// Runs the real binary with a state directory; returns (exit code, stdout, stderr).
pub fn raylimit_in(state: &StateDir, args: &[&str]) -> (i32, String, String) {
    raylimit_env(args, &[("RAYLIMIT_STATE_DIR", &state.0.to_string_lossy())])
}

/// Runs the real binary with `args` under `strace -f -e trace=execve`, with an empty environment
/// but for an empty PATH and `RAYLIMIT_STATE_DIR` (when given); asserts it succeeded and returns
/// the execve lines of the trace.
pub fn execve_trace(args: &[&str], state: Option<&StateDir>) -> Vec<String> {
    syscall_trace(args, state, &["execve"])
}

/// Runs the real binary with `args` under `strace -f`, tracing `syscalls`, with an empty
/// environment but for an empty PATH and `RAYLIMIT_STATE_DIR` (when given); asserts it succeeded
/// and returns the trace lines of those calls.
pub fn syscall_trace(args: &[&str], state: Option<&StateDir>, syscalls: &[&str]) -> Vec<String> {
    require(&[&[need::STRACE]]);
    let log = std::env::temp_dir().join(format!("{}.log", kit::unique("raylimit-strace")));
    let mut cmd = Command::new(kit::STRACE_BIN);
    cmd.args([
        "-f",
        "-qq",
        "-e",
        &format!("trace={}", syscalls.join(",")),
        "-o",
    ])
    .arg(&log)
    .arg(env!("CARGO_BIN_EXE_raylimit"))
    .args(args)
    .env_clear()
    .env("PATH", "")
    .stdout(std::process::Stdio::null());
    if let Some(state) = state {
        cmd.env("RAYLIMIT_STATE_DIR", &state.0);
    }
    let status = cmd
        .status()
        .unwrap_or_else(|e| panic!("{}: {e}", kit::STRACE_BIN));
    let trace = std::fs::read_to_string(&log).unwrap_or_default();
    let _ = std::fs::remove_file(&log);
    assert!(status.success(), "{args:?} failed: {trace}");
    trace
        .lines()
        .filter(|l| syscalls.iter().any(|c| l.contains(&format!("{c}("))))
        .map(str::to_string)
        .collect()
}

/// A private temporary directory `$TMPDIR/raylimit-TAG-PID-N`, created empty; the caller
/// removes it (a [`Launched`] runtime given it as its `dir` does on drop).
pub fn temp_dir(tag: &str) -> std::path::PathBuf {
    TempDir::fresh(std::env::temp_dir().join(kit::unique(&format!("raylimit-{tag}"))))
        .unwrap_or_else(|e| panic!("{e}"))
        .keep()
}

/// Runs the real binary with extra environment; returns (exit code, stdout, stderr).
pub fn raylimit_env(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_raylimit"))
        .args(args)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

//! Test support: private network namespaces (always removed), topology built with `ip` (tests may
//! use iproute2; the product never does), and bounded TCP traffic between namespaces.
#![allow(dead_code)]

mod connect_from;
pub mod fake_xray;
pub mod plans;
pub mod proxy;

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use raylimit::netlink::socket::in_netns;
use raylimit::netlink::RtSocket;

pub use connect_from::connect_from;

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

/// A namespace with a veth pair `veth-a`/`veth-b` (both up) to shape on, and a real runtime.
pub fn veth_host(tag: &str) -> (Netns, V2ray) {
    let ns = Netns::new(tag);
    ns.ip(&[
        "link", "add", "veth-a", "type", "veth", "peer", "name", "veth-b",
    ]);
    ns.ip(&["link", "set", "veth-a", "up"]);
    ns.ip(&["link", "set", "veth-b", "up"]);
    let runtime = V2ray::start(&ns);
    (ns, runtime)
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

/// A real V2Ray runtime (Debian's `v2ray`, Xray's config format) running inside a namespace for
/// the life of this value, with a private config file.
pub struct V2ray {
    pub child: std::process::Child,
    pub config: std::path::PathBuf,
}

impl V2ray {
    pub fn start(ns: &Netns) -> Self {
        let config = std::env::temp_dir().join(format!(
            "{}-v2ray-{}.json",
            ns.name,
            COUNTER.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::write(
            &config,
            r#"{"log":{"loglevel":"warning"},
                "inbounds":[{"tag":"socks-in","listen":"127.0.0.1","port":PORT,"protocol":"socks","settings":{"udp":false}}],
                "outbounds":[{"tag":"direct","protocol":"freedom"}]}"#
                .replace("PORT", &(10000 + COUNTER.fetch_add(1, Ordering::SeqCst) % 50000).to_string()),
        )
        .unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", &ns.name, "/usr/bin/v2ray", "-config"])
            .arg(&config)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("v2ray is installed by scripts/setup.sh");
        // Wait until the runtime is up (its comm is v2ray once ip netns exec has exec'd it).
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            let comm =
                std::fs::read_to_string(format!("/proc/{}/comm", child.id())).unwrap_or_default();
            if comm.trim() == "v2ray" {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        V2ray { child, config }
    }

    pub fn pid(&self) -> String {
        self.child.id().to_string()
    }
}

impl Drop for V2ray {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.config);
    }
}

/// A private owner-annotation directory for one test (`RAYLIMIT_STATE_DIR`), removed on drop.
pub struct StateDir(pub std::path::PathBuf);

impl StateDir {
    pub fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!(
            "raylimit-state-{tag}-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst)
        ));
        StateDir(p)
    }
}

impl Drop for StateDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs the real binary with a state directory; returns (exit code, stdout, stderr).
pub fn raylimit_in(state: &StateDir, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_raylimit"))
        .args(args)
        .env("RAYLIMIT_STATE_DIR", &state.0)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
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
    let log = std::env::temp_dir().join(format!(
        "raylimit-strace-{}-{}.log",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::SeqCst)
    ));
    let mut cmd = Command::new("/usr/bin/strace");
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
        .expect("strace is installed by scripts/setup.sh");
    let trace = std::fs::read_to_string(&log).unwrap_or_default();
    let _ = std::fs::remove_file(&log);
    assert!(status.success(), "{args:?} failed: {trace}");
    trace
        .lines()
        .filter(|l| syscalls.iter().any(|c| l.contains(&format!("{c}("))))
        .map(str::to_string)
        .collect()
}

/// A runtime started in a namespace from any binary, directory and environment; killed on drop,
/// and its directory (when given) removed.
pub struct Launched {
    pub child: std::process::Child,
    pub dir: Option<std::path::PathBuf>,
}

impl Launched {
    /// Starts `exe args` in `cwd` inside `ns` and waits until it runs under its own name and
    /// has not exited (a config the runtime rejects fails the test here, not later).
    pub fn start(
        ns: &Netns,
        exe: &std::path::Path,
        args: &[&str],
        cwd: &std::path::Path,
        env: &[(&str, &str)],
        dir: Option<std::path::PathBuf>,
    ) -> Launched {
        let mut child = Command::new("ip")
            .args(["netns", "exec", &ns.name])
            .arg(exe)
            .args(args)
            .current_dir(cwd)
            .envs(env.iter().copied())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("ip netns exec");
        let name: String = exe
            .file_name()
            .unwrap()
            .to_string_lossy()
            .chars()
            .take(15)
            .collect();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            let comm =
                std::fs::read_to_string(format!("/proc/{}/comm", child.id())).unwrap_or_default();
            if comm.trim() == name {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis(300));
        assert!(
            child.try_wait().unwrap().is_none(),
            "{} {args:?} exited at start: its config was rejected",
            exe.display()
        );
        Launched { child, dir }
    }

    pub fn pid(&self) -> String {
        self.child.id().to_string()
    }
}

impl Drop for Launched {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(d) = &self.dir {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

/// A private temporary directory, removed on drop.
pub fn temp_dir(tag: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!(
        "raylimit-{tag}-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::SeqCst)
    ));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
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

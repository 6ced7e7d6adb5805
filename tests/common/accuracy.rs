//! The accuracy harness: one client address limited by the real binary (v2ray as the runtime in
//! a server namespace, the client in another, joined by a veth pair), saturated by bulk TCP
//! flows, its class counter sampled every second and its round trip probed. `make
//! bench-accuracy` sweeps it over rates and directions (benches/accuracy.rs); tests/accuracy.rs
//! checks one low and one middle rate in CI.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{Pair, TempDir, V2ray, CLIENT_IP, SERVER_IP};
use serde_json::Value;

pub const BIN: &str = env!("CARGO_BIN_EXE_raylimit");

pub struct Bench {
    pub pair: Pair,
    pub runtime: V2ray,
    pub state: TempDir,
    /// Each flow and probe listens on a port of its own.
    pub port: AtomicU16,
}

impl Bench {
    /// Namespaces named after `tag`, v2ray started in the server's.
    pub fn start(tag: &str) -> Bench {
        let pair = Pair::new(tag);
        let runtime = V2ray::start(&pair.server);
        Bench {
            pair,
            runtime,
            state: TempDir::named(tag),
            port: AtomicU16::new(20000),
        }
    }
}

/// One measured row.
pub struct Row {
    pub rate: u64,
    pub direction: &'static str,
    pub wire: f64,
    pub goodput: f64,
    pub seconds: f64,
    pub worst_second: f64,
    pub rtt_idle_ms: f64,
    pub rtt_loaded_ms: f64,
    pub fairness: f64,
}

impl Bench {
    fn raylimit(&self, args: &[&str]) -> Value {
        let out = Command::new(BIN)
            .args(["--netns", &self.pair.server.name])
            .args(args)
            .env("RAYLIMIT_STATE_DIR", &self.state.0)
            .output()
            .expect("run raylimit");
        assert!(
            out.status.success(),
            "raylimit {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
    }

    fn limit(&self, direction: &str, rate: u64, remove: bool) {
        let pid = self.runtime.pid();
        let rate = rate.to_string();
        let mut args = vec![
            "limit",
            "--pid",
            &pid,
            "--ip",
            CLIENT_IP,
            "--device",
            "veth-s",
            "--direction",
            direction,
            "--scope",
            "device",
            "--execute",
            "--format",
            "json",
        ];
        if remove {
            args.push("--remove");
        } else {
            args.extend(["--rate", &rate]);
        }
        self.raylimit(&args);
    }

    /// The limited client's class byte counter, from `raylimit status`.
    fn class_bytes(&self, direction: &str) -> u64 {
        let status = self.raylimit(&["status", "--format", "json"]);
        status["roots"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|r| r["direction"] == direction)
            .flat_map(|r| r["rules"].as_array().cloned().unwrap_or_default())
            .find(|rule| {
                rule["subject"]
                    .as_str()
                    .is_some_and(|s| s.contains(CLIENT_IP))
            })
            .and_then(|rule| rule["bytes"].as_u64())
            .expect("the client's rule in status")
    }

    fn next_port(&self) -> u16 {
        self.port.fetch_add(1, Ordering::SeqCst)
    }

    /// Bulk TCP flows in the limited direction for `secs`; returns each flow's goodput after
    /// the first second and the per-second class counter samples.
    fn saturate(
        &self,
        direction: &'static str,
        flows: usize,
        secs: u64,
    ) -> (Vec<f64>, Vec<(f64, u64)>) {
        // Download: the server sends to a listener in the client; upload the other way.
        let (sender, receiver, ip) = match direction {
            "download" => (&self.pair.server, &self.pair.client, CLIENT_IP),
            _ => (&self.pair.client, &self.pair.server, SERVER_IP),
        };
        let stop = Instant::now() + Duration::from_secs(secs + 1);
        let mut receivers = Vec::new();
        let mut senders = Vec::new();
        for _ in 0..flows {
            let addr: SocketAddr = format!("{ip}:{}", self.next_port()).parse().unwrap();
            let (tx, rx) = std::sync::mpsc::channel();
            receivers.push(receiver.spawn(move || {
                let listener = TcpListener::bind(addr).expect("bind");
                tx.send(()).unwrap();
                let (mut conn, _) = listener.accept().expect("accept");
                conn.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
                let mut buf = vec![0u8; 1 << 16];
                let started = Instant::now();
                let (mut counted, mut from) = (0u64, None);
                while let Ok(n) = conn.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    if started.elapsed() >= Duration::from_secs(1) {
                        from.get_or_insert_with(Instant::now);
                        counted += n as u64;
                    }
                }
                let secs = from.map_or(0.0, |f: Instant| f.elapsed().as_secs_f64());
                if secs > 0.0 {
                    counted as f64 / secs
                } else {
                    0.0
                }
            }));
            rx.recv_timeout(Duration::from_secs(5)).expect("listener");
            senders.push(sender.spawn(move || {
                let mut s =
                    TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect");
                s.set_write_timeout(Some(Duration::from_millis(500)))
                    .unwrap();
                let chunk = vec![0x5au8; 1 << 16];
                while Instant::now() < stop {
                    match s.write(&chunk) {
                        Ok(_) => {}
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                        Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
                        Err(_) => break,
                    }
                }
            }));
        }
        // The class counter once a second, from the end of the warm-up second.
        let started = Instant::now();
        let mut samples = Vec::new();
        std::thread::sleep(Duration::from_secs(1));
        while started.elapsed() < Duration::from_secs(secs + 1) {
            samples.push((started.elapsed().as_secs_f64(), self.class_bytes(direction)));
            let next = Duration::from_secs(samples.len() as u64 + 1);
            std::thread::sleep(next.saturating_sub(started.elapsed()));
        }
        samples.push((started.elapsed().as_secs_f64(), self.class_bytes(direction)));
        for s in senders {
            s.join().unwrap();
        }
        let goodput = receivers.into_iter().map(|r| r.join().unwrap()).collect();
        (goodput, samples)
    }
}

/// Mean round trip of `count` UDP probes, one every `every`, whose limited leg goes through the
/// class (the reply for download, the request for upload). A lost probe counts as 2 s.
pub fn probe(bench: &Bench, count: usize, every: Duration) -> f64 {
    // The client asks the server: its request is upload, the reply download.
    let (echo_ns, from_ns) = (&bench.pair.server, &bench.pair.client);
    let addr: SocketAddr = format!("{SERVER_IP}:{}", bench.next_port())
        .parse()
        .unwrap();
    let done = Arc::new(AtomicBool::new(false));
    let stop = done.clone();
    let (tx, rx) = std::sync::mpsc::channel();
    let echo = echo_ns.spawn(move || {
        let sock = UdpSocket::bind(addr).expect("bind echo");
        sock.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        tx.send(()).unwrap();
        let mut buf = [0u8; 64];
        while !stop.load(Ordering::SeqCst) {
            if let Ok((n, peer)) = sock.recv_from(&mut buf) {
                let _ = sock.send_to(&buf[..n], peer);
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(5)).expect("echo ready");
    let total_us = Arc::new(AtomicU64::new(0));
    let sum = total_us.clone();
    let prober = from_ns.spawn(move || {
        let sock = UdpSocket::bind("0.0.0.0:0").expect("bind probe");
        sock.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut buf = [0u8; 64];
        for i in 0..count as u64 {
            let sent = Instant::now();
            let _ = sock.send_to(&i.to_be_bytes(), addr);
            // Wait for this probe's own answer (a late answer to an earlier one is skipped).
            let rtt = loop {
                match sock.recv_from(&mut buf) {
                    Ok((8, _)) if buf[..8] == i.to_be_bytes() => break sent.elapsed(),
                    Ok(_) => continue,
                    Err(_) => break Duration::from_secs(2),
                }
            };
            sum.fetch_add(rtt.as_micros() as u64, Ordering::SeqCst);
            std::thread::sleep(every.saturating_sub(sent.elapsed()));
        }
    });
    prober.join().unwrap();
    done.store(true, Ordering::SeqCst);
    echo.join().unwrap();
    total_us.load(Ordering::SeqCst) as f64 / count as f64 / 1000.0
}

pub fn measure(bench: &Bench, direction: &'static str, rate: u64, secs: u64) -> Row {
    bench.limit(direction, rate, false);
    let rtt_idle_ms = probe(bench, 5, Duration::from_millis(200));
    // Probes while one flow saturates the class, from its third second: one a second below
    // 64 KiB/s, where each probe is a noticeable share of the rate.
    let every = match rate < 65_536 {
        true => Duration::from_secs(1),
        false => Duration::from_millis(200),
    };
    let probes = ((secs.saturating_sub(2)).max(1) as f64 / every.as_secs_f64()) as usize;
    let ((goodput, samples), rtt_loaded_ms) = std::thread::scope(|scope| {
        let rtt = scope.spawn(|| {
            std::thread::sleep(Duration::from_secs(2));
            probe(bench, probes.max(1), every)
        });
        let flow = bench.saturate(direction, 1, secs);
        (flow, rtt.join().unwrap())
    });
    let (t0, b0) = samples[0];
    let (t1, b1) = *samples.last().unwrap();
    let wire = (b1 - b0) as f64 / (t1 - t0);
    let worst_second = samples
        .windows(2)
        .map(|w| ((w[1].1 - w[0].1) as f64 / (w[1].0 - w[0].0) / rate as f64 - 1.0).abs())
        .fold(0.0, f64::max);
    let (two, _) = bench.saturate(direction, 2, secs.clamp(2, 10));
    let fairness = match (two[0], two[1]) {
        (a, b) if a.max(b) > 0.0 => a.min(b) / a.max(b),
        _ => 0.0,
    };
    bench.limit(direction, rate, true);
    Row {
        rate,
        direction,
        wire,
        goodput: goodput[0],
        seconds: t1 - t0,
        worst_second,
        rtt_idle_ms,
        rtt_loaded_ms,
        fairness,
    }
}

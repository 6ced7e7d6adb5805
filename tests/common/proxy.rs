//! Traffic through a proxy runtime for tests: a target that sends, receives or holds per
//! connection, client flows that count what they get, and the class counters as an oracle.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::Netns;

/// The target in the server namespace: sends, receives or holds per connection, for a bounded
/// time.
pub struct Target {
    pub received: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl Target {
    /// Listens on `addr` inside `ns` for at most two minutes.
    pub fn start(ns: &Netns, addr: &str) -> Target {
        let addr = addr.to_string();
        let received = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (r, s) = (received.clone(), stop.clone());
        let (tx, rx) = std::sync::mpsc::channel();
        ns.spawn(move || {
            let listener = TcpListener::bind(&addr).expect("bind target");
            listener.set_nonblocking(true).unwrap();
            tx.send(()).unwrap();
            let deadline = Instant::now() + Duration::from_secs(120);
            while !s.load(Ordering::SeqCst) && Instant::now() < deadline {
                match listener.accept() {
                    Ok((conn, _)) => {
                        let (r, s) = (r.clone(), s.clone());
                        std::thread::spawn(move || serve(conn, &r, &s));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        rx.recv_timeout(Duration::from_secs(5)).unwrap();
        Target { received, stop }
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

fn serve(mut conn: TcpStream, received: &AtomicU64, stop: &AtomicBool) {
    conn.set_nonblocking(false).unwrap();
    conn.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    conn.set_write_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let mut cmd = [0u8; 1];
    let deadline = Instant::now() + Duration::from_secs(60);
    while conn.read_exact(&mut cmd).is_err() {
        if stop.load(Ordering::SeqCst) || Instant::now() > deadline {
            return;
        }
    }
    let mut buf = vec![0x5au8; 1 << 16];
    while !stop.load(Ordering::SeqCst) && Instant::now() < deadline {
        let ok = match cmd[0] {
            b'S' => match conn.write(&buf) {
                Ok(_) => true,
                Err(e) => {
                    e.kind() == std::io::ErrorKind::WouldBlock
                        || e.kind() == std::io::ErrorKind::TimedOut
                }
            },
            _ => match conn.read(&mut buf) {
                Ok(0) => false,
                Ok(n) => {
                    received.fetch_add(n as u64, Ordering::SeqCst);
                    true
                }
                Err(e) => {
                    e.kind() == std::io::ErrorKind::WouldBlock
                        || e.kind() == std::io::ErrorKind::TimedOut
                }
            },
        };
        if !ok {
            return;
        }
    }
}

/// One client connection through the client runtime; counts what it receives.
pub struct Flow {
    received: Arc<AtomicU64>,
    /// For upload flows: what the target received (shared by all flows).
    target_received: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl Flow {
    pub fn start(
        ns: &Netns,
        port: u16,
        command: u8,
        secs: u64,
        target_received: Arc<AtomicU64>,
    ) -> Flow {
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        Flow::start_to(ns, addr, command, secs, target_received)
    }

    /// A flow to `addr` itself (a service reached directly, not through a runtime).
    pub fn start_to(
        ns: &Netns,
        addr: SocketAddr,
        command: u8,
        secs: u64,
        target_received: Arc<AtomicU64>,
    ) -> Flow {
        let received = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (r, s) = (received.clone(), stop.clone());
        let handle = ns.spawn(move || {
            let mut conn =
                TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect");
            conn.set_read_timeout(Some(Duration::from_millis(200)))
                .unwrap();
            conn.set_write_timeout(Some(Duration::from_millis(200)))
                .unwrap();
            conn.write_all(&[command]).unwrap();
            let mut buf = vec![0x33u8; 1 << 16];
            let end = Instant::now() + Duration::from_secs(secs);
            while Instant::now() < end && !s.load(Ordering::SeqCst) {
                match command {
                    b'R' => {
                        let _ = conn.write(&buf);
                    }
                    b'S' => {
                        if let Ok(n) = conn.read(&mut buf) {
                            if n == 0 {
                                break;
                            }
                            r.fetch_add(n as u64, Ordering::SeqCst);
                        }
                    }
                    _ => std::thread::sleep(Duration::from_millis(50)),
                }
            }
        });
        Flow {
            received,
            target_received,
            stop,
            handle: Some(handle),
        }
    }

    /// Bytes per second over `secs`, from the client's counter (download) or the target's
    /// (upload).
    pub fn rate(&self, upload: bool, secs: f64) -> f64 {
        let counter = if upload {
            &self.target_received
        } else {
            &self.received
        };
        let before = counter.load(Ordering::SeqCst);
        let start = Instant::now();
        std::thread::sleep(Duration::from_secs_f64(secs));
        (counter.load(Ordering::SeqCst) - before) as f64 / start.elapsed().as_secs_f64()
    }

    pub fn stop(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

impl Drop for Flow {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// Waits until `f` holds, polling (the server drops a closed connection about a second late).
pub fn wait_for(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("timed out waiting for {what}");
}

/// Bytes a class has sent, from `tc -s class show` (an independent oracle of what HTB shaped;
/// this iproute2 has no JSON for classes).
pub fn class_bytes(ns: &Netns, dev: &str, class: &str) -> u64 {
    let text = ns.tc(&["-s", "class", "show", "dev", dev]);
    let mut lines = text.lines();
    while let Some(line) = lines.next() {
        if line.starts_with(&format!("class htb {class} ")) {
            let sent = lines.next().unwrap_or_default();
            return sent
                .split_whitespace()
                .nth(1)
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("no byte count: {sent}"));
        }
    }
    panic!("no class {class} on {dev}: {text}")
}

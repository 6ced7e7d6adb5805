//! rl-traffic: the stock-kernel VM's own TCP traffic tool (tests/stock-kernel/init.sh).
//!
//! ```text
//! rl-traffic serve ADDR:PORT [--for SECS]        accept until SECS have passed (default 300)
//! rl-traffic get   ADDR:PORT BYTES [--bind IP]   the server sends BYTES (download)
//! rl-traffic put   ADDR:PORT BYTES [--bind IP]   the client sends BYTES (upload)
//! rl-traffic for   ADDR:PORT SECS [--bind IP]    the server sends until SECS have passed
//! rl-traffic echo  ADDR:PORT [--for SECS]        answer UDP probes until SECS have passed
//! rl-traffic ping  ADDR:PORT COUNT [--bind IP]   COUNT UDP probes, one each 100 ms
//! ```
//!
//! A client sends a 9-byte header: `G` or `P`, then BYTES as a big-endian u64. For `G` the server
//! writes BYTES and closes; for `P` it reads BYTES (or until end of stream) and answers with the
//! 8-byte count it received, so the client's clock stops only once the last byte has arrived, not
//! when it sits in a socket buffer. Nobody half-closes: v2ray's dokodemo-door does not pass it on.
//! `for` asks for more than it reads and closes after SECS (the server's write then fails and
//! ends). `ping` prints `probes=N lost=L avg_ms=A max_ms=M`; a probe unanswered in 2 s is lost.
//! The client prints one line: `bytes=N seconds=S rate=R` (R in bytes/s). Every socket has 60 s
//! read and write timeouts; the server exits by itself. Std only, but for the libc crate (already
//! raylimit's dependency) to bind the client's source address (`tests/common/connect_from.rs`).

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

#[path = "../common/connect_from.rs"]
mod connect_from;
use connect_from::connect_from;

const USAGE: &str = "usage: rl-traffic serve|echo ADDR:PORT [--for SECS] | get|put ADDR:PORT BYTES [--bind IP] | for ADDR:PORT SECS [--bind IP] | ping ADDR:PORT COUNT [--bind IP]";
/// How long a probe waits for its answer before it counts as lost.
const PROBE_WAIT: Duration = Duration::from_secs(2);
const TIMEOUT: Duration = Duration::from_secs(60);
const CHUNK: usize = 64 * 1024;

type Result<T> = std::result::Result<T, String>;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let Err(e) = run(&args) {
        eprintln!("rl-traffic: {e}");
        std::process::exit(1);
    }
}

fn run(args: &[String]) -> Result<()> {
    let (cmd, rest) = args.split_first().ok_or(USAGE)?;
    let addr: SocketAddr = parse(rest.first(), "ADDR:PORT")?;
    let flag = |name: &str| rest.iter().position(|a| a == name).map(|i| rest.get(i + 1));
    match cmd.as_str() {
        "serve" => serve(addr, flag("--for").map_or(Ok(300), |v| parse(v, "SECS"))?),
        "echo" => echo(addr, flag("--for").map_or(Ok(300), |v| parse(v, "SECS"))?),
        "ping" => {
            let count: u32 = parse(rest.get(1), "COUNT")?;
            let bind: Option<IpAddr> = flag("--bind").map(|v| parse(v, "IP")).transpose()?;
            ping(addr, count, bind)
        }
        "for" => {
            let secs: f64 = parse(rest.get(1), "SECS")?;
            let bind: Option<IpAddr> = flag("--bind").map(|v| parse(v, "IP")).transpose()?;
            let mut stream = connect(addr, bind).map_err(|e| format!("connect {addr}: {e}"))?;
            stream
                .write_all(&header(b'G', u64::MAX))
                .map_err(|e| format!("for {addr}: {e}"))?;
            let start = Instant::now();
            let end = start + Duration::from_secs_f64(secs);
            let mut buf = [0u8; CHUNK];
            let mut count = 0u64;
            while Instant::now() < end {
                match stream
                    .read(&mut buf)
                    .map_err(|e| format!("for {addr}: {e}"))?
                {
                    0 => return Err(format!("for {addr}: the server closed after {count} bytes")),
                    n => count += n as u64,
                }
            }
            let seconds = start.elapsed().as_secs_f64();
            println!(
                "bytes={count} seconds={seconds:.3} rate={:.0}",
                count as f64 / seconds
            );
            Ok(())
        }
        "get" | "put" => {
            let bytes: u64 = parse(rest.get(1), "BYTES")?;
            let bind: Option<IpAddr> = flag("--bind").map(|v| parse(v, "IP")).transpose()?;
            let start = Instant::now();
            let mut stream = connect(addr, bind).map_err(|e| format!("connect {addr}: {e}"))?;
            let got = if cmd == "get" {
                get(&mut stream, bytes)
            } else {
                put(&mut stream, bytes)
            }
            .map_err(|e| format!("{cmd} {addr}: {e}"))?;
            let seconds = start.elapsed().as_secs_f64();
            if got != bytes {
                return Err(format!("{cmd} {addr}: {got} of {bytes} bytes arrived"));
            }
            println!(
                "bytes={bytes} seconds={seconds:.3} rate={:.0}",
                bytes as f64 / seconds
            );
            Ok(())
        }
        _ => Err(USAGE.into()),
    }
}

fn parse<T: std::str::FromStr>(arg: Option<&String>, what: &str) -> Result<T> {
    let arg = arg.ok_or(format!("missing {what}; {USAGE}"))?;
    arg.parse()
        .map_err(|_| format!("not a valid {what}: {arg}"))
}

/// Accepts connections (one thread each) until `secs` have passed, then exits.
fn serve(addr: SocketAddr, secs: u64) -> Result<()> {
    let listener = TcpListener::bind(addr).map_err(|e| format!("bind {addr}: {e}"))?;
    listener.set_nonblocking(true).map_err(|e| e.to_string())?;
    let end = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < end {
        match listener.accept() {
            Ok((stream, peer)) => {
                std::thread::spawn(move || {
                    if let Err(e) = answer(stream) {
                        eprintln!("rl-traffic: {peer}: {e}");
                    }
                });
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(20))
            }
            Err(e) => return Err(format!("accept: {e}")),
        }
    }
    Ok(())
}

/// Sends each UDP datagram back to where it came from until `secs` have passed.
fn echo(addr: SocketAddr, secs: u64) -> Result<()> {
    let socket = std::net::UdpSocket::bind(addr).map_err(|e| format!("bind {addr}: {e}"))?;
    socket
        .set_read_timeout(Some(Duration::from_millis(200)))
        .map_err(|e| e.to_string())?;
    let end = Instant::now() + Duration::from_secs(secs);
    let mut buf = [0u8; 64];
    while Instant::now() < end {
        if let Ok((n, peer)) = socket.recv_from(&mut buf) {
            let _ = socket.send_to(&buf[..n], peer);
        }
    }
    Ok(())
}

/// `count` numbered UDP probes to `addr`, one each 100 ms; prints their round trips.
fn ping(addr: SocketAddr, count: u32, bind: Option<IpAddr>) -> Result<()> {
    let local = SocketAddr::new(
        bind.unwrap_or(match addr {
            SocketAddr::V4(_) => IpAddr::from([0, 0, 0, 0]),
            SocketAddr::V6(_) => IpAddr::from([0u16; 8]),
        }),
        0,
    );
    let socket = std::net::UdpSocket::bind(local).map_err(|e| format!("bind {local}: {e}"))?;
    let (mut rtts, mut lost) = (Vec::new(), 0);
    let mut buf = [0u8; 64];
    for seq in 0..count {
        let sent = Instant::now();
        socket
            .send_to(&seq.to_be_bytes(), addr)
            .map_err(|e| format!("ping {addr}: {e}"))?;
        let answered = loop {
            let left = PROBE_WAIT.saturating_sub(sent.elapsed());
            if left.is_zero() {
                break false;
            }
            socket
                .set_read_timeout(Some(left))
                .map_err(|e| e.to_string())?;
            match socket.recv_from(&mut buf) {
                Ok((4, _)) if buf[..4] == seq.to_be_bytes() => break true,
                Ok(_) => continue,
                Err(_) => break false,
            }
        };
        match answered {
            true => rtts.push(sent.elapsed().as_secs_f64() * 1000.0),
            false => lost += 1,
        }
        std::thread::sleep(Duration::from_millis(100).saturating_sub(sent.elapsed()));
    }
    let avg = rtts.iter().sum::<f64>() / rtts.len().max(1) as f64;
    let max = rtts.iter().cloned().fold(0.0, f64::max);
    println!("probes={count} lost={lost} avg_ms={avg:.2} max_ms={max:.2}");
    Ok(())
}

fn answer(mut stream: TcpStream) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    timeouts(&stream)?;
    let mut header = [0u8; 9];
    stream.read_exact(&mut header)?;
    let n = u64::from_be_bytes(header[1..].try_into().unwrap());
    match header[0] {
        b'G' => send(&mut stream, n),
        b'P' => {
            let count = drain(&mut stream, n)?;
            stream.write_all(&count.to_be_bytes())
        }
        op => Err(std::io::Error::other(format!("unknown op {op:#x}"))),
    }
}

fn get(stream: &mut TcpStream, bytes: u64) -> std::io::Result<u64> {
    stream.write_all(&header(b'G', bytes))?;
    drain(stream, bytes)
}

fn put(stream: &mut TcpStream, bytes: u64) -> std::io::Result<u64> {
    stream.write_all(&header(b'P', bytes))?;
    send(stream, bytes)?;
    let mut count = [0u8; 8];
    stream.read_exact(&mut count)?;
    Ok(u64::from_be_bytes(count))
}

fn header(op: u8, bytes: u64) -> [u8; 9] {
    let mut h = [op; 9];
    h[1..].copy_from_slice(&bytes.to_be_bytes());
    h
}

fn send(stream: &mut TcpStream, mut left: u64) -> std::io::Result<()> {
    let chunk = [0x5au8; CHUNK];
    while left > 0 {
        let n = left.min(CHUNK as u64) as usize;
        stream.write_all(&chunk[..n])?;
        left -= n as u64;
    }
    Ok(())
}

/// Reads `bytes`, or until end of stream if that comes first; returns the byte count. It never
/// waits for the peer to close: a proxy (v2ray's dokodemo-door) may not pass a half-close on.
fn drain(stream: &mut TcpStream, bytes: u64) -> std::io::Result<u64> {
    let mut buf = [0u8; CHUNK];
    let mut count = 0;
    while count < bytes {
        let want = (bytes - count).min(CHUNK as u64) as usize;
        match stream.read(&mut buf[..want])? {
            0 => break,
            n => count += n as u64,
        }
    }
    Ok(count)
}

fn timeouts(stream: &TcpStream) -> std::io::Result<()> {
    stream.set_read_timeout(Some(TIMEOUT))?;
    stream.set_write_timeout(Some(TIMEOUT))
}

/// A TCP connection, from `bind` when given, with the timeouts set.
fn connect(addr: SocketAddr, bind: Option<IpAddr>) -> std::io::Result<TcpStream> {
    let stream = match bind {
        Some(source) => connect_from(source, addr, TIMEOUT)?,
        None => TcpStream::connect_timeout(&addr, TIMEOUT)?,
    };
    timeouts(&stream)?;
    Ok(stream)
}

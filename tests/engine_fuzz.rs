//! The container engine's answers are hostile input. HTTP/1.1 is hyper's; what raylimit does
//! after it (status and JSON, the container fields) never panics on any value, and a whole
//! exchange with an engine that answers garbage, too much, or too slowly ends in an error
//! within the deadline.

use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use proptest::prelude::*;
use raylimit::runtime::engine::{answer, container, get, Brief};
use serde_json::{json, Map, Value};

fn any_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<u64>().prop_map(|n| json!(n)),
        (-1e12f64..1e12).prop_map(|f| json!(f)),
        "\\PC{0,16}".prop_map(Value::String),
        "[0-9a-f]{0,70}".prop_map(Value::String),
        "[0-9]{1,6}/(tcp|udp|sctp)?".prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 48, 5, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
            prop::collection::vec((key(), inner), 0..6)
                .prop_map(|kv| Value::Object(kv.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

/// The keys the engine's answers use, so the generator reaches every field's reader.
fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec![
            "Id",
            "Names",
            "Image",
            "Command",
            "State",
            "Status",
            "Labels",
            "Name",
            "Path",
            "Args",
            "Pid",
            "HostConfig",
            "NetworkMode",
            "NetworkSettings",
            "Ports",
            "HostIp",
            "HostPort",
            "message",
            "10085/tcp",
        ])
        .prop_map(str::to_string),
        "\\PC{0,6}",
    ]
}

/// Serves each connection once with `raw` (after reading the request), on a fresh socket.
fn serve_raw(raw: Vec<u8>, trickle: Option<Duration>) -> (PathBuf, std::thread::JoinHandle<()>) {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let path = std::env::temp_dir().join(format!(
        "raylimit-engine-fuzz-{}-{}.sock",
        std::process::id(),
        N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).unwrap();
    let handle = std::thread::spawn(move || {
        let Ok((mut s, _)) = listener.accept() else {
            return;
        };
        let mut buf = [0u8; 4096];
        let _ = s.read(&mut buf);
        match trickle {
            // One byte at a time, for longer than any deadline here.
            Some(every) => {
                for b in raw.iter().cycle().take(200) {
                    if s.write_all(&[*b]).is_err() {
                        return;
                    }
                    std::thread::sleep(every);
                }
            }
            None => {
                let _ = s.write_all(&raw);
            }
        }
    });
    (path, handle)
}

/// Answers that are almost HTTP: a valid answer cut, spliced or with a field replaced.
fn near_http() -> impl Strategy<Value = Vec<u8>> {
    let body = r#"[{"Id":"abc123","Names":["/edge"],"Image":"xray","Command":"xray run"}]"#;
    let good = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes();
    let chunked = format!(
        "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{body}\r\n0\r\n\r\n",
        body.len()
    )
    .into_bytes();
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..600),
        (prop::sample::select(vec![good.clone(), chunked.clone()]), 0usize..200)
            .prop_map(|(g, cut)| g[..g.len().saturating_sub(cut)].to_vec()),
        (
            prop::sample::select(vec![good, chunked]),
            0usize..150,
            prop::collection::vec(any::<u8>(), 1..12)
        )
            .prop_map(|(mut g, at, noise)| {
                let at = at.min(g.len());
                g.splice(at..at, noise);
                g
            }),
        (
            "[0-9]{1,20}",
            "[0-9a-fA-Fx;= -]{0,24}",
            prop::collection::vec(any::<u8>(), 0..64)
        )
            .prop_map(|(len, chunk, tail)| {
                let mut v = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {len}\r\nTransfer-Encoding: chunked\r\n\r\n{chunk}\r\n"
                )
                .into_bytes();
                v.extend(tail);
                v
            }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// Any status and body: an error for anything but 200, JSON for 200 when it parses, and
    /// an error message of bounded length whatever the engine wrote.
    #[test]
    fn any_answer_is_a_value_or_a_short_error(status in 0u16..1000, body in prop::collection::vec(any::<u8>(), 0..300), message in "\\PC{0,2000}") {
        match answer(status, &body) {
            Ok(v) => prop_assert_eq!((status, v), (200, serde_json::from_slice::<Value>(&body).unwrap())),
            Err(e) => prop_assert!(status != 200 || serde_json::from_slice::<Value>(&body).is_err(), "{e}"),
        }
        let wordy = serde_json::to_vec(&json!({"message": message})).unwrap();
        if let Err(e) = answer(500, &wordy) {
            prop_assert!(e.chars().count() <= 220, "{e}");
        }
    }

    /// Any JSON as a list entry and as a detail: a container or nothing, and an id that goes
    /// into the next request's path is hex digits only.
    #[test]
    fn any_container_json_reads_without_panic(item in any_value(), detail in any_value()) {
        if let Some(brief) = Brief::of(&item) {
            prop_assert!(!brief.id.is_empty() && brief.id.bytes().all(|b| b.is_ascii_hexdigit()));
            let c = container(&item, brief.clone(), &detail, "/x.sock");
            prop_assert_eq!(&c.id, &brief.id);
            prop_assert!(c.pid.is_none_or(|p| p > 0));
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// A whole exchange over a unix socket with an engine that answers garbage or a broken
    /// answer: a value or an error, within the deadline, never a panic or a hang.
    #[test]
    fn a_broken_engine_answer_is_an_error_in_time(raw in near_http()) {
        let (sock, server) = serve_raw(raw, None);
        let started = Instant::now();
        let result = get(&sock, "/containers/json", Instant::now() + Duration::from_secs(2));
        server.join().unwrap();
        let _ = std::fs::remove_file(&sock);
        prop_assert!(started.elapsed() < Duration::from_secs(3));
        if let Err(e) = result {
            prop_assert!(matches!(e.code, "invalid_data" | "unavailable"), "{e:?}");
        }
    }
}

/// An engine that answers without end is cut off at 16 MiB; one that trickles is cut off at
/// the deadline.
#[test]
fn an_endless_or_trickling_engine_is_cut_off() {
    let path = std::env::temp_dir().join(format!(
        "raylimit-engine-endless-{}.sock",
        std::process::id()
    ));
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).unwrap();
    let server = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut buf = [0u8; 4096];
        let _ = s.read(&mut buf);
        let _ = s.write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n");
        let chunk = format!("{:x}\r\n{}\r\n", 1 << 16, "[".repeat(1 << 16));
        // Until the client hangs up, bounded at 256 MiB.
        for _ in 0..4096 {
            if s.write_all(chunk.as_bytes()).is_err() {
                return;
            }
        }
    });
    let started = Instant::now();
    let e = get(
        &path,
        "/containers/json",
        Instant::now() + Duration::from_secs(20),
    )
    .unwrap_err();
    server.join().unwrap();
    let _ = std::fs::remove_file(&path);
    assert_eq!(e.code, "invalid_data", "{e:?}");
    assert!(e.message.contains("more than 16 MiB"), "{e:?}");
    assert!(started.elapsed() < Duration::from_secs(20));

    let (sock, server) = serve_raw(
        b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n[".to_vec(),
        Some(Duration::from_millis(20)),
    );
    let started = Instant::now();
    let e = get(
        &sock,
        "/containers/json",
        Instant::now() + Duration::from_millis(500),
    )
    .unwrap_err();
    let waited = started.elapsed();
    server.join().unwrap();
    let _ = std::fs::remove_file(&sock);
    assert_eq!(e.code, "unavailable", "{e:?}");
    assert!(e.message.contains("did not answer in time"), "{e:?}");
    assert!(waited < Duration::from_secs(2), "{waited:?}");
}

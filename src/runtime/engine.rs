//! The container provider: the Docker Engine API on its unix socket (podman's compatible socket
//! answers the same), with a deadline on every call.
//!
//! The engine's answers are hostile input: HTTP/1.1 is spoken by hyper (already in the tree
//! through tonic), the body is collected under a size cap, and everything after that (status,
//! JSON, the container fields) is plain functions that `tests/engine_fuzz.rs` feeds garbage.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use http_body_util::BodyExt as _;
use serde_json::Value;

/// Answers larger than this are refused: a list of every container on a busy host is far less.
const MAX_RESPONSE_BYTES: usize = 16 << 20;

/// Sockets tried when `DOCKER_HOST` names none.
pub const DEFAULT_SOCKETS: [&str; 2] = ["/var/run/docker.sock", "/run/podman/podman.sock"];

/// A published port of a container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    pub container_port: u16,
    pub protocol: String,
    pub host_ip: String,
    pub host_port: u16,
}

/// One running container as the engine describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Container {
    pub id: String,
    pub name: String,
    pub image: String,
    /// `Path` and `Args` of the container's main process.
    pub command: Vec<String>,
    pub state: String,
    pub status: String,
    pub labels: BTreeMap<String, String>,
    /// The main process's PID on the host, when the engine reports one.
    pub pid: Option<u32>,
    pub network_mode: String,
    pub ports: Vec<Published>,
    /// The socket it was found through.
    pub engine: String,
}

/// Why the engine could not be asked; `code` is one of RayLimit's provider codes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineError {
    pub code: &'static str,
    pub message: String,
}

fn err(code: &'static str, message: String) -> EngineError {
    EngineError { code, message }
}

/// The sockets to ask: `DOCKER_HOST` when it names a unix socket, else the default paths that
/// exist. `Err` explains why there is none.
pub fn sockets(docker_host: Option<&str>) -> Result<Vec<PathBuf>, EngineError> {
    if let Some(host) = docker_host.filter(|h| !h.is_empty()) {
        return match host.strip_prefix("unix://") {
            Some(path) => Ok(vec![PathBuf::from(path)]),
            None => Err(err(
                "unavailable",
                format!(
                    "DOCKER_HOST={host} is not a unix socket; raylimit only asks a local engine"
                ),
            )),
        };
    }
    let found: Vec<PathBuf> = DEFAULT_SOCKETS
        .iter()
        .map(PathBuf::from)
        .filter(|p| p.exists())
        .collect();
    if found.is_empty() {
        return Err(err(
            "not_installed",
            format!(
                "no container engine socket at {}; set DOCKER_HOST=unix://PATH for another",
                DEFAULT_SOCKETS.join(" or ")
            ),
        ));
    }
    Ok(found)
}

/// One GET request; the body decoded as JSON. The deadline covers connect, send and receive.
pub fn get(socket: &Path, path: &str, deadline: Instant) -> Result<Value, EngineError> {
    let late = || {
        err(
            "unavailable",
            format!("{} did not answer in time", socket.display()),
        )
    };
    if deadline <= Instant::now() {
        return Err(late());
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()
        .map_err(|e| err("unavailable", format!("cannot start the I/O runtime: {e}")))?;
    let exchange = async { tokio::time::timeout_at(deadline.into(), exchange(socket, path)).await };
    let (status, body) = rt.block_on(exchange).map_err(|_| late())??;
    answer(status, &body).map_err(|m| err("invalid_data", format!("{}: {m}", socket.display())))
}

/// Connect, send the request, collect at most [`MAX_RESPONSE_BYTES`] of the answer.
async fn exchange(socket: &Path, path: &str) -> Result<(u16, Vec<u8>), EngineError> {
    let stream = tokio::net::UnixStream::connect(socket).await.map_err(|e| {
        let code = match e.kind() {
            std::io::ErrorKind::PermissionDenied => "permission_denied",
            _ => "unavailable",
        };
        err(code, format!("cannot connect to {}: {e}", socket.display()))
    })?;
    let broken = |e: hyper::Error| err("invalid_data", format!("{}: {e}", socket.display()));
    let io = hyper_util::rt::TokioIo::new(stream);
    let (mut sender, connection) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(broken)?;
    // The connection is driven beside the request; it ends with the answer (Connection: close).
    let driver = tokio::spawn(connection);
    let request = http::Request::get(path)
        .header(http::header::HOST, "localhost")
        .header(http::header::USER_AGENT, "raylimit")
        .header(http::header::ACCEPT, "application/json")
        .header(http::header::CONNECTION, "close")
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .map_err(|e| err("invalid_data", format!("bad request path {path:?}: {e}")))?;
    let response = sender.send_request(request).await.map_err(broken)?;
    let status = response.status().as_u16();
    let body = http_body_util::Limited::new(response.into_body(), MAX_RESPONSE_BYTES)
        .collect()
        .await
        .map_err(|e| {
            let message = match e.downcast_ref::<http_body_util::LengthLimitError>() {
                Some(_) => "answered more than 16 MiB".to_string(),
                None => e.to_string(),
            };
            err("invalid_data", format!("{}: {message}", socket.display()))
        })?
        .to_bytes()
        .to_vec();
    driver.abort();
    Ok((status, body))
}

/// An answer's status and body as JSON; a status other than 200 is an error carrying the
/// engine's message.
pub fn answer(status: u16, body: &[u8]) -> Result<Value, String> {
    if status != 200 {
        let message = serde_json::from_slice::<Value>(body)
            .ok()
            .and_then(|v| v.get("message").and_then(Value::as_str).map(str::to_string))
            .unwrap_or_default();
        let message: String = message.chars().take(200).collect();
        return Err(format!("HTTP {status} {message}").trim().to_string());
    }
    serde_json::from_slice(body).map_err(|e| format!("answered with bad JSON: {e}"))
}

/// The running containers of one engine; `inspect` decides which are worth a closer look
/// (inspecting every container of a busy host would be slow).
pub fn list(
    socket: &Path,
    deadline: Instant,
    inspect: &dyn Fn(&str, &str, &str) -> bool,
) -> Result<Vec<Container>, EngineError> {
    let all = get(socket, "/containers/json", deadline)?;
    let Some(items) = all.as_array() else {
        return Err(err(
            "invalid_data",
            format!(
                "{} listed containers as something other than a list",
                socket.display()
            ),
        ));
    };
    let mut out = Vec::new();
    for item in items {
        let Some(brief) = Brief::of(item) else {
            continue;
        };
        if !inspect(&brief.id, &brief.image, &brief.command) {
            continue;
        }
        let detail = get(socket, &format!("/containers/{}/json", brief.id), deadline)?;
        out.push(container(
            item,
            brief,
            &detail,
            &socket.display().to_string(),
        ));
    }
    Ok(out)
}

/// A container as the list shows it: enough to decide whether to inspect it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Brief {
    pub id: String,
    pub name: String,
    pub image: String,
    pub command: String,
}

impl Brief {
    /// One entry of `/containers/json`; `None` when it has no usable id (the id goes into
    /// the next request's path, so only hex digits pass).
    pub fn of(item: &Value) -> Option<Brief> {
        let s = |k: &str| item.get(k).and_then(Value::as_str).unwrap_or_default();
        let id = s("Id");
        if id.is_empty() || id.len() > 128 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        let name = item
            .get("Names")
            .and_then(Value::as_array)
            .and_then(|n| n.first())
            .and_then(Value::as_str)
            .map(|n| n.trim_start_matches('/').to_string())
            .unwrap_or_default();
        Some(Brief {
            id: id.to_string(),
            name,
            image: s("Image").to_string(),
            command: s("Command").to_string(),
        })
    }
}

/// The container from its list entry and its `/containers/ID/json` detail; fields that are
/// missing or of the wrong type read as empty.
pub fn container(item: &Value, brief: Brief, detail: &Value, engine: &str) -> Container {
    let s = |k: &str| {
        item.get(k)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string()
    };
    let text = |v: Option<&Value>| v.and_then(Value::as_str).unwrap_or_default().to_string();
    let mut cmd = vec![text(detail.get("Path"))];
    cmd.extend(
        detail
            .get("Args")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .map(str::to_string),
    );
    cmd.retain(|a| !a.is_empty());
    let state = detail.get("State");
    Container {
        name: Some(text(detail.get("Name")).trim_start_matches('/').to_string())
            .filter(|n| !n.is_empty())
            .unwrap_or(brief.name),
        image: brief.image,
        command: if cmd.is_empty() {
            brief
                .command
                .split_whitespace()
                .map(str::to_string)
                .collect()
        } else {
            cmd
        },
        state: Some(s("State"))
            .filter(|x| !x.is_empty())
            .unwrap_or_else(|| text(state.and_then(|st| st.get("Status")))),
        status: s("Status"),
        labels: item
            .get("Labels")
            .and_then(Value::as_object)
            .map(|m| {
                m.iter()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                    .collect()
            })
            .unwrap_or_default(),
        pid: state
            .and_then(|st| st.get("Pid"))
            .and_then(Value::as_u64)
            .filter(|p| *p > 0 && *p <= u32::MAX as u64)
            .map(|p| p as u32),
        network_mode: text(detail.get("HostConfig").and_then(|h| h.get("NetworkMode"))),
        ports: published(detail.get("NetworkSettings").and_then(|n| n.get("Ports"))),
        engine: engine.to_string(),
        id: brief.id,
    }
}

/// `{"10085/tcp": [{"HostIp": "127.0.0.1", "HostPort": "10085"}]}` as a list.
fn published(ports: Option<&Value>) -> Vec<Published> {
    let Some(map) = ports.and_then(Value::as_object) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for (key, bindings) in map {
        let (port, proto) = key.split_once('/').unwrap_or((key, "tcp"));
        let Ok(container_port) = port.parse::<u16>() else {
            continue;
        };
        for b in bindings.as_array().into_iter().flatten() {
            let host_port = b
                .get("HostPort")
                .and_then(Value::as_str)
                .and_then(|p| p.parse().ok());
            if let Some(host_port) = host_port {
                out.push(Published {
                    container_port,
                    protocol: proto.to_string(),
                    host_ip: b
                        .get("HostIp")
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_string(),
                    host_port,
                });
            }
        }
    }
    out
}

/// The default deadline for one provider run.
pub const TIMEOUT: Duration = Duration::from_secs(3);

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::unix::net::UnixListener;
    use std::thread;

    /// A fake engine answering each request with the next canned response (raw HTTP).
    fn serve(responses: Vec<String>) -> (PathBuf, thread::JoinHandle<Vec<String>>) {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "raylimit-engine-{}-{}.sock",
            std::process::id(),
            N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).unwrap();
        let p = path.clone();
        let handle = thread::spawn(move || {
            let mut requests = Vec::new();
            for r in responses {
                let (mut s, _) = listener.accept().unwrap();
                let mut buf = [0u8; 4096];
                let n = s.read(&mut buf).unwrap();
                requests.push(
                    String::from_utf8_lossy(&buf[..n])
                        .lines()
                        .next()
                        .unwrap_or("")
                        .to_string(),
                );
                s.write_all(r.as_bytes()).unwrap();
            }
            let _ = std::fs::remove_file(&p);
            requests
        });
        (path, handle)
    }

    fn ok(body: &str) -> String {
        format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
    }

    fn chunked(body: &str) -> String {
        let (a, b) = body.split_at(body.len() / 2);
        format!("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{a}\r\n{:x};ext=1\r\n{b}\r\n0\r\n\r\n", a.len(), b.len())
    }

    #[test]
    fn lists_and_inspects_runtime_containers() {
        let id = "a".repeat(64);
        let other = "b".repeat(64);
        let list = format!(
            r#"[{{"Id":"{id}","Names":["/edge"],"Image":"ghcr.io/xtls/xray-core:latest","Command":"xray run","State":"running","Status":"Up 5 minutes","Labels":{{"tier":"edge"}}}},
                {{"Id":"{other}","Names":["/db"],"Image":"postgres","Command":"postgres","State":"running","Status":"Up"}}]"#
        );
        let detail = format!(
            r#"{{"Id":"{id}","Name":"/edge","Path":"xray","Args":["run","-c","/etc/xray/config.json"],"State":{{"Status":"running","Pid":4242}},
                "HostConfig":{{"NetworkMode":"bridge"}},"NetworkSettings":{{"Ports":{{"10085/tcp":[{{"HostIp":"127.0.0.1","HostPort":"20085"}}],"443/tcp":null}}}}}}"#
        );
        let (sock, server) = serve(vec![ok(&list), chunked(&detail)]);
        let deadline = Instant::now() + TIMEOUT;
        let found = list_fn(&sock, deadline);
        let requests = server.join().unwrap();
        assert_eq!(
            requests,
            [
                "GET /containers/json HTTP/1.1",
                format!("GET /containers/{id}/json HTTP/1.1").as_str()
            ]
        );
        let c = &found.unwrap()[0];
        assert_eq!(
            (c.name.as_str(), c.pid, c.network_mode.as_str()),
            ("edge", Some(4242), "bridge")
        );
        assert_eq!(c.command, ["xray", "run", "-c", "/etc/xray/config.json"]);
        assert_eq!(c.labels["tier"], "edge");
        assert_eq!(
            c.ports,
            [Published {
                container_port: 10085,
                protocol: "tcp".into(),
                host_ip: "127.0.0.1".into(),
                host_port: 20085
            }]
        );
    }

    fn list_fn(sock: &Path, deadline: Instant) -> Result<Vec<Container>, EngineError> {
        list(sock, deadline, &|_, image, _| image.contains("xray"))
    }

    #[test]
    fn errors_are_classified() {
        let (sock, server) = serve(vec!["HTTP/1.1 500 Internal Server Error\r\nContent-Length: 22\r\n\r\n{\"message\":\"it broke\"}".into()]);
        let e = get(&sock, "/containers/json", Instant::now() + TIMEOUT).unwrap_err();
        server.join().unwrap();
        assert_eq!(
            (e.code, e.message.ends_with("HTTP 500 it broke")),
            ("invalid_data", true),
            "{e:?}"
        );

        let (sock, server) = serve(vec!["garbage".into()]);
        let e = get(&sock, "/x", Instant::now() + TIMEOUT).unwrap_err();
        server.join().unwrap();
        assert_eq!(e.code, "invalid_data");

        let missing = std::env::temp_dir().join("raylimit-no-such-engine.sock");
        let e = get(&missing, "/x", Instant::now() + TIMEOUT).unwrap_err();
        assert_eq!(e.code, "unavailable");
        assert!(e.message.contains("cannot connect"), "{e:?}");

        assert_eq!(
            sockets(Some("tcp://10.0.0.1:2375")).unwrap_err().code,
            "unavailable"
        );
        assert_eq!(
            sockets(Some("unix:///x.sock")).unwrap(),
            [PathBuf::from("/x.sock")]
        );
    }

    #[test]
    fn a_silent_engine_times_out() {
        let path =
            std::env::temp_dir().join(format!("raylimit-silent-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        // Bound but never accepted: connect succeeds, the answer never comes.
        let _listener = UnixListener::bind(&path).unwrap();
        let started = Instant::now();
        let e = get(
            &path,
            "/containers/json",
            Instant::now() + Duration::from_millis(300),
        )
        .unwrap_err();
        let _ = std::fs::remove_file(&path);
        assert_eq!(e.code, "unavailable");
        assert!(e.message.contains("did not answer in time"), "{e:?}");
        assert!(started.elapsed() < Duration::from_secs(3));
    }
}

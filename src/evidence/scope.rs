//! The runtime's scope: the sockets it listens on for clients, read from the kernel (TCP in
//! LISTEN and unbound-peer UDP sockets, held by the runtime's own process) and joined to the
//! config's client inbounds. A limit on the runtime's clients can only ever be about packets to
//! or from these endpoints; other services on the host share the device but not the endpoints.
//! An inbound that is a transparent proxy receives packets addressed to other hosts, so no
//! endpoint describes its traffic: the scope then says why it cannot be drawn.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;

use serde_json::{json, Value};

use crate::netlink::sock_diag::{self, InetSocket, Transport, TCP_CLOSE, TCP_LISTEN};
use crate::policy::canonical_ip;
use crate::runtime::engine::Published;
use crate::runtime::procfs;
use crate::xray::verdict::Listener;
use crate::xray::Loaded;

/// One socket the runtime listens on for clients.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct ListenEndpoint {
    pub transport: Transport,
    /// The bound address (`0.0.0.0` or `::` for every address) and port.
    pub local: SocketAddr,
    /// The config's inbound it serves.
    pub inbound: String,
    /// For a container's published port: the port the runtime listens on inside the container
    /// (`local` is then the host's side of the binding).
    pub container_port: Option<u16>,
}

impl ListenEndpoint {
    /// Whether it listens on every address of its family.
    pub fn wildcard(&self) -> bool {
        self.local.ip().is_unspecified()
    }
}

impl fmt::Display for ListenEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let transport = match self.transport {
            Transport::Tcp => "tcp",
            Transport::Udp => "udp",
        };
        write!(f, "{}/{transport}", self.local)?;
        match self.container_port {
            Some(p) => write!(f, " (published to the container's port {p})"),
            None => Ok(()),
        }
    }
}

/// Which of the host's traffic belongs to the runtime's clients.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// The runtime's client-facing listening endpoints (at least one).
    Listeners(Vec<ListenEndpoint>),
    /// Why no set of endpoints describes the runtime's client traffic.
    Unscoped(String),
}

impl Scope {
    /// `runtime listeners 10.33.0.1:9000/tcp, [::]:443/udp`, or why there are none.
    pub fn describe(&self) -> String {
        match self {
            Scope::Listeners(l) => {
                let list: Vec<String> = l.iter().map(|e| e.to_string()).collect();
                format!("runtime listeners {}", list.join(", "))
            }
            Scope::Unscoped(why) => format!("none: {why}"),
        }
    }

    pub fn to_json(&self) -> Value {
        match self {
            Scope::Listeners(l) => json!({
                "kind": "runtime_listeners",
                "endpoints": l.iter().map(|e| json!({
                    "transport": match e.transport { Transport::Tcp => "tcp", Transport::Udp => "udp" },
                    "address": e.local.ip().to_string(),
                    "port": e.local.port(),
                    "inbound": e.inbound,
                })).collect::<Vec<_>>(),
            }),
            Scope::Unscoped(why) => json!({"kind": "unscoped", "reason": why}),
        }
    }
}

/// The runtime's scope: its listening sockets joined to the client inbounds of `cfg`
/// (`listeners`, as `client_listeners` gives them), unless an inbound is a transparent proxy.
pub fn scope(
    pid: Option<u32>,
    cfg: &Loaded,
    listeners: &[(String, Listener)],
    proc_root: &Path,
) -> Scope {
    if let Some((tag, why)) = cfg
        .merged
        .inbounds
        .iter()
        .find_map(|ib| Some((&ib.tag, ib.transparent.as_ref()?)))
    {
        return Scope::Unscoped(format!(
            "inbound {tag:?} is a transparent proxy ({why}): its packets carry other hosts' addresses, so no listener of the runtime describes them"
        ));
    }
    let Some(pid) = pid else {
        return Scope::Unscoped(
            "the runtime's process is not visible in this host's /proc, so its sockets cannot be read".into(),
        );
    };
    let sockets = match listening_sockets(pid, proc_root) {
        Ok(s) => s,
        Err(e) => return Scope::Unscoped(e),
    };
    let endpoints = join(&sockets, listeners);
    if endpoints.is_empty() {
        return Scope::Unscoped(format!(
            "none of the runtime's {} listening socket(s) serves a client inbound of its config",
            sockets.len()
        ));
    }
    Scope::Listeners(endpoints)
}

/// The scope as seen from the host, for a container whose ports the engine publishes: each
/// endpoint becomes the host's side of its bindings (packets on a host device carry the host's
/// address and port: ingress runs before the DNAT, egress after the reply is un-NATed).
/// Endpoints the container does not publish are not reachable through a host device and drop
/// out; the container-side ports themselves never match there (another host service may use
/// them).
pub fn published(scope: Scope, ports: &[Published]) -> Scope {
    let Scope::Listeners(endpoints) = scope else {
        return scope;
    };
    let mut host = Vec::new();
    for e in &endpoints {
        let transport = match e.transport {
            Transport::Tcp => "tcp",
            Transport::Udp => "udp",
        };
        for p in ports {
            if p.container_port != e.local.port() || !p.protocol.eq_ignore_ascii_case(transport) {
                continue;
            }
            let address = match p.host_ip.as_str() {
                "" => IpAddr::from([0, 0, 0, 0]),
                ip => match ip.parse::<IpAddr>() {
                    Ok(a) => canonical_ip(a),
                    Err(_) => continue,
                },
            };
            let endpoint = ListenEndpoint {
                transport: e.transport,
                local: SocketAddr::new(address, p.host_port),
                inbound: e.inbound.clone(),
                container_port: Some(p.container_port),
            };
            if !host.contains(&endpoint) {
                host.push(endpoint);
            }
        }
    }
    if host.is_empty() {
        let list: Vec<String> = endpoints.iter().map(|e| e.to_string()).collect();
        return Scope::Unscoped(format!(
            "the container publishes none of the runtime's listeners ({}) on the host",
            list.join(", ")
        ));
    }
    host.sort();
    Scope::Listeners(host)
}

/// The TCP sockets in LISTEN and the unconnected UDP sockets that process `pid` holds, read
/// in its own network namespace.
fn listening_sockets(pid: u32, proc_root: &Path) -> Result<Vec<InetSocket>, String> {
    let inodes = procfs::socket_inodes(proc_root, pid)
        .map_err(|e| format!("the runtime's sockets could not be listed (/proc/{pid}/fd): {e}"))?;
    let netns = proc_root.join(pid.to_string()).join("ns/net");
    let mut sock = sock_diag::open(Some(&netns.to_string_lossy()))
        .map_err(|e| format!("the runtime's network namespace could not be read: {e}"))?;
    let mut out = Vec::new();
    for (transport, state) in [(Transport::Tcp, TCP_LISTEN), (Transport::Udp, TCP_CLOSE)] {
        let found = sock_diag::dump(&mut sock, transport, 1 << state)
            .map_err(|e| format!("sock_diag failed: {e}"))?;
        out.extend(found.into_iter().filter(|s| inodes.contains(&s.inode)));
    }
    Ok(out)
}

/// Each socket that serves a client inbound (same port, and the inbound's address when it has
/// one), as an endpoint; the API's listener and anything else the runtime holds are left out.
pub fn join(sockets: &[InetSocket], listeners: &[(String, Listener)]) -> Vec<ListenEndpoint> {
    let mut out: Vec<ListenEndpoint> = sockets
        .iter()
        .filter_map(|s| {
            let local = SocketAddr::new(canonical_ip(s.local.ip()), s.local.port());
            let (tag, _) = listeners.iter().find(|(_, l)| {
                l.port == local.port()
                    && l.address
                        .is_none_or(|a| serves(canonical_ip(a), local.ip()))
            })?;
            Some(ListenEndpoint {
                transport: s.transport,
                local,
                inbound: tag.clone(),
                container_port: None,
            })
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

/// A socket bound to `bound` serves a listener configured on `configured`: the same address, or
/// every address.
fn serves(configured: IpAddr, bound: IpAddr) -> bool {
    bound == configured || bound.is_unspecified()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::xray::config::L4;

    fn socket(transport: Transport, local: &str, inode: u64) -> InetSocket {
        InetSocket {
            transport,
            state: TCP_LISTEN,
            local: local.parse().unwrap(),
            remote: "0.0.0.0:0".parse().unwrap(),
            inode,
            uid: 0,
            cookie: 0,
        }
    }

    fn listener(address: Option<&str>, port: u16) -> Listener {
        Listener {
            address: address.map(|a| a.parse().unwrap()),
            port,
            l4: vec![L4::Tcp],
            notes: Vec::new(),
        }
    }

    #[test]
    fn sockets_join_the_inbounds_they_serve_and_nothing_else() {
        let sockets = [
            socket(Transport::Tcp, "10.33.0.1:9000", 1),
            socket(Transport::Udp, "10.33.0.1:9000", 2),
            socket(Transport::Tcp, "[::]:443", 3),
            // The API, and a port no client inbound names.
            socket(Transport::Tcp, "127.0.0.1:10085", 4),
            socket(Transport::Tcp, "0.0.0.0:7000", 5),
            // IPv4-mapped is the IPv4 address.
            socket(Transport::Tcp, "[::ffff:10.33.0.1]:8080", 6),
        ];
        let listeners = [
            ("socks".to_string(), listener(Some("10.33.0.1"), 9000)),
            ("vless".to_string(), listener(None, 443)),
            ("http".to_string(), listener(Some("10.33.0.1"), 8080)),
            ("other".to_string(), listener(Some("10.33.0.9"), 7001)),
        ];
        let endpoints = join(&sockets, &listeners);
        let shown: Vec<String> = endpoints
            .iter()
            .map(|e| format!("{e} {}", e.inbound))
            .collect();
        assert_eq!(
            shown,
            [
                "10.33.0.1:8080/tcp http",
                "10.33.0.1:9000/tcp socks",
                "[::]:443/tcp vless",
                "10.33.0.1:9000/udp socks",
            ]
        );
        assert!(endpoints[2].wildcard());
        assert_eq!(
            Scope::Listeners(endpoints[..2].to_vec()).describe(),
            "runtime listeners 10.33.0.1:8080/tcp, 10.33.0.1:9000/tcp"
        );
        // A wildcard socket serves an inbound configured on one address too.
        let wildcard = [socket(Transport::Tcp, "0.0.0.0:9000", 7)];
        assert_eq!(join(&wildcard, &listeners).len(), 1);
    }

    #[test]
    fn a_containers_published_ports_are_its_scope_on_the_host() {
        let endpoint = |transport, local: &str| ListenEndpoint {
            transport,
            local: local.parse().unwrap(),
            inbound: "in".into(),
            container_port: None,
        };
        let publish = |port, protocol: &str, host_ip: &str, host_port| Published {
            container_port: port,
            protocol: protocol.into(),
            host_ip: host_ip.into(),
            host_port,
        };
        let inside = Scope::Listeners(vec![
            endpoint(Transport::Tcp, "0.0.0.0:10086"),
            endpoint(Transport::Udp, "0.0.0.0:443"),
            endpoint(Transport::Tcp, "0.0.0.0:9999"),
        ]);
        let ports = [
            publish(10086, "tcp", "", 20086),
            publish(10086, "tcp", "::", 20086),
            publish(443, "udp", "10.0.0.1", 8443),
            // Same port, other protocol: not the UDP listener's.
            publish(443, "tcp", "", 8444),
        ];
        let Scope::Listeners(host) = published(inside.clone(), &ports) else {
            panic!("scoped")
        };
        let text: Vec<String> = host.iter().map(|e| e.to_string()).collect();
        assert_eq!(
            text,
            [
                "0.0.0.0:20086/tcp (published to the container's port 10086)",
                "[::]:20086/tcp (published to the container's port 10086)",
                "10.0.0.1:8443/udp (published to the container's port 443)",
            ]
        );
        // The unpublished 9999 and the container-side ports never appear on the host.
        assert!(host
            .iter()
            .all(|e| e.local.port() != 9999 && e.local.port() != 10086));
        let none = published(inside, &[publish(80, "tcp", "", 8080)]);
        assert!(
            matches!(&none, Scope::Unscoped(why) if why.contains("publishes none")),
            "{none:?}"
        );
    }
}

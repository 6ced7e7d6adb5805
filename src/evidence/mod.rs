//! Live session evidence: who is connected to a runtime right now, and as which user.
//!
//! Connections come from the kernel: the runtime's own TCP sockets (the `socket:[inode]` links
//! under `/proc/PID/fd`), read with sock_diag in the runtime's network namespace and kept to
//! those whose local end is one of its inbound listeners. That works for every Xray and V2Ray
//! version and is local to the runtime by construction.
//!
//! Users are attributed by Xray's StatsService online-IP call where the runtime has it, and
//! otherwise by the access log joined with the sockets on client address and port. Each piece
//! of evidence says where it came from; one user's empty list never voids the others.

pub mod access_log;
pub mod scope;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};

use crate::netlink::sock_diag::{self, Transport, TCP_ESTABLISHED};
use crate::policy::canonical_ip;
use crate::runtime::{procfs, Runtime};
use crate::xray::api::{ApiClient, ApiError, UserTraffic};
use crate::xray::config::{Listen, User};
use crate::xray::locate::Rooted;
use crate::xray::verdict::{self, ApiStatus, Listener};
use crate::xray::Loaded;

/// How far a piece of evidence can be trusted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Read, and there is something.
    Available,
    /// Read, and there is nothing: nobody is connected.
    NoSessions,
    /// Could not be read at all.
    Unavailable,
    /// Read, but not exact enough to act on (no attribution source, a user without an email).
    Insufficient,
}

impl State {
    pub fn name(self) -> &'static str {
        match self {
            State::Available => "available",
            State::NoSessions => "no_sessions",
            State::Unavailable => "unavailable",
            State::Insufficient => "insufficient",
        }
    }
}

/// One live client connection to an inbound listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connection {
    /// The client's address and port (IPv4-mapped folded to IPv4).
    pub client: SocketAddr,
    pub local: SocketAddr,
    pub inbound: String,
    /// The user's email, when attributed.
    pub user: Option<String>,
    /// Where the user came from: `xray_api` or `access_log`.
    pub user_source: Option<&'static str>,
    pub outbound: Option<String>,
    /// When the runtime accepted it (the access log's time), when known.
    pub accepted: Option<String>,
}

/// One configured user and the live client addresses attributed to them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserEvidence {
    pub email: String,
    pub uuid: String,
    pub state: State,
    pub reason: String,
    /// Live client addresses only this user uses.
    pub ips: BTreeSet<IpAddr>,
    /// Addresses another live user also uses: never limited as this user's.
    pub shared: BTreeSet<IpAddr>,
    pub source: Option<&'static str>,
}

/// Everything known about a runtime's live sessions.
#[derive(Debug, Clone)]
pub struct Evidence {
    /// The socket evidence: `available`, `no_sessions` or `unavailable`.
    pub state: State,
    pub reason: String,
    /// Every source consulted, with what it gave.
    pub sources: Vec<String>,
    pub connections: Vec<Connection>,
    /// User attribution as a whole.
    pub attribution: State,
    pub attribution_reason: String,
    pub users: Vec<UserEvidence>,
    /// Per-user byte counters (StatsService), or why there are none.
    pub traffic: Result<Vec<UserTraffic>, String>,
}

/// Where to look, and how long to wait for the runtime's API.
#[derive(Debug, Clone)]
pub struct Options {
    pub proc_root: PathBuf,
    pub api_timeout: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            proc_root: PathBuf::from("/proc"),
            api_timeout: Duration::from_secs(2),
        }
    }
}

impl Evidence {
    pub fn unavailable(reason: String) -> Self {
        Evidence {
            state: State::Unavailable,
            reason: reason.clone(),
            sources: Vec::new(),
            connections: Vec::new(),
            attribution: State::Unavailable,
            attribution_reason: reason.clone(),
            users: Vec::new(),
            traffic: Err(reason),
        }
    }

    /// The live client addresses, of one inbound or of all.
    pub fn client_ips(&self, inbound: Option<&str>) -> BTreeSet<IpAddr> {
        self.connections
            .iter()
            .filter(|c| inbound.is_none_or(|t| c.inbound == t))
            .map(|c| c.client.ip())
            .collect()
    }

    /// A user by UUID or email (case-insensitive UUID, exact email).
    pub fn user(&self, id: &str) -> Option<&UserEvidence> {
        self.users
            .iter()
            .find(|u| (!u.uuid.is_empty() && u.uuid.eq_ignore_ascii_case(id)) || u.email == id)
    }

    pub fn connection(&self, client: SocketAddr) -> Option<&Connection> {
        self.connections.iter().find(|c| c.client == client)
    }

    pub fn to_json(&self) -> Value {
        json!({
            "state": self.state.name(),
            "reason": self.reason,
            "sources": self.sources,
            "connections": self.connections.iter().map(|c| json!({
                "client": c.client.to_string(),
                "local": c.local.to_string(),
                "inbound": c.inbound,
                "user": c.user,
                "user_source": c.user_source,
                "outbound": c.outbound,
                "accepted": c.accepted,
            })).collect::<Vec<_>>(),
            "attribution": {"state": self.attribution.name(), "reason": self.attribution_reason},
            "users": self.users.iter().map(|u| json!({
                "email": u.email,
                "uuid": u.uuid,
                "state": u.state.name(),
                "reason": u.reason,
                "ips": u.ips.iter().map(|i| i.to_string()).collect::<Vec<_>>(),
                "shared_ips": u.shared.iter().map(|i| i.to_string()).collect::<Vec<_>>(),
                "source": u.source,
            })).collect::<Vec<_>>(),
            "traffic": match &self.traffic {
                Ok(t) => json!(t.iter().map(|u| json!({
                    "email": u.email, "uplink_bytes": u.uplink, "downlink_bytes": u.downlink,
                })).collect::<Vec<_>>()),
                Err(e) => json!({"unavailable": e}),
            },
        })
    }
}

/// The inbound listeners client connections arrive on, by tag; the API's own inbound is left
/// out (every API call, raylimit's included, is a connection to it).
pub fn client_listeners(cfg: &Loaded) -> Vec<(String, Listener)> {
    let api = verdict::api(cfg);
    let api_tags: BTreeSet<&str> = api.endpoints.iter().map(|e| e.name.as_str()).collect();
    cfg.merged
        .inbounds
        .iter()
        .filter(|ib| !ib.tag.is_empty() && !api_tags.contains(ib.tag.as_str()))
        .filter_map(|ib| {
            verdict::inbound(cfg, &ib.tag)
                .ok()
                .map(|l| (ib.tag.clone(), l))
        })
        .collect()
}

/// The runtime's live TCP connections to its listeners, from the kernel.
pub fn sockets(
    pid: u32,
    proc_root: &Path,
    listeners: &[(String, Listener)],
) -> Result<Vec<Connection>, String> {
    let inodes = procfs::socket_inodes(proc_root, pid)
        .map_err(|e| format!("the runtime's sockets could not be listed (/proc/{pid}/fd): {e}"))?;
    let netns = proc_root.join(pid.to_string()).join("ns/net");
    let netns = netns.to_string_lossy();
    let mut sock = sock_diag::open(Some(&netns))
        .map_err(|e| format!("the runtime's network namespace could not be read: {e}"))?;
    let sockets = sock_diag::dump(&mut sock, Transport::Tcp, 1 << TCP_ESTABLISHED)
        .map_err(|e| format!("sock_diag failed: {e}"))?;
    let mut out: Vec<Connection> = sockets
        .into_iter()
        .filter(|s| inodes.contains(&s.inode))
        .filter_map(|s| {
            let local = SocketAddr::new(canonical_ip(s.local.ip()), s.local.port());
            let (tag, _) = listeners.iter().find(|(_, l)| {
                l.port == local.port() && l.address.is_none_or(|a| canonical_ip(a) == local.ip())
            })?;
            Some(Connection {
                client: SocketAddr::new(canonical_ip(s.remote.ip()), s.remote.port()),
                local,
                inbound: tag.clone(),
                user: None,
                user_source: None,
                outbound: None,
                accepted: None,
            })
        })
        .collect();
    out.sort_by_key(|c| (c.client.ip(), c.client.port()));
    Ok(out)
}

/// Gathers everything for one runtime.
pub fn gather(runtime: &Runtime, cfg: &Loaded, opts: &Options) -> Evidence {
    let Some(pid) = runtime.pid() else {
        return Evidence::unavailable(
            "the runtime's process is not visible in this host's /proc, so its sockets cannot be read".into(),
        );
    };
    let listeners = client_listeners(cfg);
    let mut ev = match sockets(pid, &opts.proc_root, &listeners) {
        Ok(connections) => Evidence {
            state: if connections.is_empty() {
                State::NoSessions
            } else {
                State::Available
            },
            reason: format!(
                "{} live client connection(s) to {} listener(s), from the runtime's own sockets",
                connections.len(),
                listeners.len()
            ),
            sources: vec![format!(
                "sock_diag: {} connection(s) on the runtime's sockets",
                connections.len()
            )],
            connections,
            attribution: State::Unavailable,
            attribution_reason: String::new(),
            users: Vec::new(),
            traffic: Err(String::new()),
        },
        Err(e) => Evidence::unavailable(e),
    };
    let users: Vec<&User> = {
        let mut seen = BTreeSet::new();
        cfg.merged
            .inbounds
            .iter()
            .flat_map(|ib| ib.users.iter())
            .filter(|u| seen.insert((u.email.clone(), u.id.clone())))
            .collect()
    };
    let mut api = connect_api(runtime, cfg, pid, opts);
    ev.traffic = match &mut api {
        Ok(client) => client.user_traffic().map_err(|e| e.to_string()),
        Err(e) => Err(e.clone()),
    };
    attribute(&mut ev, &users, api.as_mut().ok(), runtime, cfg, pid, opts);
    ev
}

/// The runtime's per-user byte counters (StatsService), without the rest of the evidence.
pub fn user_traffic(
    runtime: &Runtime,
    cfg: &Loaded,
    opts: &Options,
) -> Result<Vec<UserTraffic>, String> {
    let pid = runtime
        .pid()
        .ok_or("the runtime's process is not visible in this host's /proc")?;
    connect_api(runtime, cfg, pid, opts)?
        .user_traffic()
        .map_err(|e| e.to_string())
}

/// A client for the runtime's API, connected from inside its network namespace.
fn connect_api(
    runtime: &Runtime,
    cfg: &Loaded,
    pid: u32,
    opts: &Options,
) -> Result<ApiClient, String> {
    let view = verdict::api(cfg);
    if view.endpoints.is_empty() || view.status == ApiStatus::NotEvident {
        return Err(format!("the runtime's API is not usable: {}", view.reason));
    }
    let endpoint = view
        .endpoints
        .iter()
        .find_map(|e| {
            let ip = match &e.listen {
                Listen::Unspecified => IpAddr::V4(Ipv4Addr::LOCALHOST),
                Listen::Ip(ip) => *ip,
                _ => return None,
            };
            Some(SocketAddr::new(ip, e.port?))
        })
        .ok_or("the runtime's API has no TCP endpoint raylimit can reach")?;
    let netns = opts.proc_root.join(pid.to_string()).join("ns/net");
    ApiClient::connect(
        endpoint,
        Some(&netns.to_string_lossy()),
        runtime.flavour(),
        opts.api_timeout,
    )
    .map_err(|e| format!("the runtime's API at {endpoint} could not be reached: {e}"))
}

/// Attributes connections to users: Xray's online-IP call when the runtime answers it, else
/// the access log; then each user's live addresses, shared ones set aside.
fn attribute(
    ev: &mut Evidence,
    users: &[&User],
    api: Option<&mut ApiClient>,
    runtime: &Runtime,
    cfg: &Loaded,
    pid: u32,
    opts: &Options,
) {
    let live = ev.client_ips(None);
    // Per user: their addresses, or why there are none.
    let mut found: BTreeMap<String, Result<BTreeSet<IpAddr>, String>> = BTreeMap::new();
    let mut source = None;
    let mut why_not_api = String::new();
    if let Some(client) = api {
        let mut implemented = true;
        for u in users.iter().filter(|u| !u.email.is_empty()) {
            match client.online_ips(&u.email) {
                Ok(ips) => {
                    // Runtime-local and current: only addresses with a live socket.
                    let ips = ips
                        .into_iter()
                        .map(canonical_ip)
                        .filter(|ip| ev.state == State::Unavailable || live.contains(ip))
                        .collect();
                    found.insert(u.email.clone(), Ok(ips));
                }
                // The user's online map exists from their first connection on.
                Err(ApiError::NotFound(_)) => {
                    found.insert(u.email.clone(), Ok(BTreeSet::new()));
                }
                Err(ApiError::Unimplemented(e)) => {
                    implemented = false;
                    why_not_api = format!(
                        "the runtime's StatsService has no GetStatsOnlineIpList (Xray 25.2.18 and later have it): {e}"
                    );
                    break;
                }
                Err(e) => {
                    found.insert(
                        u.email.clone(),
                        Err(format!("the online-IP call failed: {e}")),
                    );
                }
            }
        }
        if implemented {
            source = Some("xray_api");
            ev.sources
                .push("xray_api: GetStatsOnlineIpList per user email".into());
        } else {
            found.clear();
        }
    } else {
        why_not_api = ev
            .traffic
            .as_ref()
            .err()
            .cloned()
            .unwrap_or_else(|| "the runtime's API is not usable".into());
    }
    if source.is_none() {
        match access_log_entries(runtime, cfg, pid, opts) {
            Ok((path, entries)) => {
                source = Some("access_log");
                // The latest line for each client address and port.
                let mut by_client: BTreeMap<SocketAddr, &access_log::Entry> = BTreeMap::new();
                for e in &entries {
                    by_client.insert(e.client, e);
                }
                let mut joined = 0;
                for c in &mut ev.connections {
                    if let Some(e) = by_client.get(&c.client) {
                        joined += 1;
                        c.user = e.email.clone();
                        c.user_source = c.user.as_ref().map(|_| "access_log");
                        c.outbound = e.outbound.clone();
                        c.accepted = Some(e.time.clone());
                    }
                }
                ev.sources.push(format!(
                    "access_log: {path} ({} accepted line(s) read, {joined} joined to live connections)",
                    entries.len()
                ));
                for u in users.iter().filter(|u| !u.email.is_empty()) {
                    let ips = ev
                        .connections
                        .iter()
                        .filter(|c| c.user.as_deref() == Some(&u.email))
                        .map(|c| c.client.ip())
                        .collect();
                    found.insert(u.email.clone(), Ok(ips));
                }
            }
            Err(e) => {
                ev.attribution = State::Insufficient;
                ev.attribution_reason = format!("{why_not_api}; and {e}");
            }
        }
    }
    if let Some(src) = source {
        ev.attribution = State::Available;
        ev.attribution_reason = match src {
            "xray_api" => "users attributed by the runtime's online-IP API".into(),
            _ => format!(
                "users attributed by the access log joined with live sockets ({why_not_api})"
            ),
        };
    }
    // An address two users share belongs to neither.
    let mut owners: BTreeMap<IpAddr, usize> = BTreeMap::new();
    for ips in found.values().flatten() {
        for ip in ips {
            *owners.entry(*ip).or_default() += 1;
        }
    }
    if source == Some("xray_api") {
        for c in &mut ev.connections {
            let holders: Vec<&String> = found
                .iter()
                .filter(|(_, r)| r.as_ref().is_ok_and(|ips| ips.contains(&c.client.ip())))
                .map(|(e, _)| e)
                .collect();
            if let [only] = holders.as_slice() {
                c.user = Some((*only).clone());
                c.user_source = Some("xray_api");
            }
        }
    }
    ev.users = users
        .iter()
        .map(|u| {
            let mut e = UserEvidence {
                email: u.email.clone(),
                uuid: u.id.clone(),
                state: State::Insufficient,
                reason: String::new(),
                ips: BTreeSet::new(),
                shared: BTreeSet::new(),
                source,
            };
            if u.email.is_empty() {
                e.reason =
                    "the user has no email in the config, and runtimes report users by email".into();
                return e;
            }
            if ev.state == State::Unavailable && source != Some("xray_api") {
                e.state = State::Unavailable;
                e.reason = ev.reason.clone();
                return e;
            }
            match found.get(&u.email) {
                None => e.reason = ev.attribution_reason.clone(),
                Some(Err(why)) => e.reason = why.clone(),
                Some(Ok(ips)) => {
                    let (shared, own): (BTreeSet<IpAddr>, BTreeSet<IpAddr>) =
                        ips.iter().partition(|ip| owners[*ip] > 1);
                    e.state = if own.is_empty() {
                        State::NoSessions
                    } else {
                        State::Available
                    };
                    e.reason = match (own.len(), shared.len()) {
                        (0, 0) => "no live connection of this user".into(),
                        (n, 0) => format!("{n} live client address(es)"),
                        (n, s) => format!(
                            "{n} live client address(es); {s} shared with another live user left out"
                        ),
                    };
                    e.ips = own;
                    e.shared = shared;
                }
            }
            e
        })
        .collect();
}

/// The runtime's access log, read through its root (a container's file system included).
fn access_log_entries(
    runtime: &Runtime,
    cfg: &Loaded,
    pid: u32,
    opts: &Options,
) -> Result<(String, Vec<access_log::Entry>), String> {
    let path = match cfg.merged.access_log.as_deref().map(str::trim) {
        None => return Err("the config has no access log (log.access)".into()),
        Some("") => {
            return Err("the access log goes to the runtime's standard output (log.access is empty), which raylimit cannot read".into())
        }
        Some(p) if p.eq_ignore_ascii_case("none") => {
            return Err("the access log is turned off (log.access is none)".into())
        }
        Some(p) => p.to_string(),
    };
    let absolute = if path.starts_with('/') {
        path.clone()
    } else {
        let cwd = runtime
            .process
            .as_ref()
            .and_then(|p| p.cwd.clone())
            .unwrap_or_default();
        format!("{}/{path}", cwd.trim_end_matches('/'))
    };
    let rooted = Rooted {
        root: opts.proc_root.join(pid.to_string()).join("root"),
    };
    let entries = access_log::read_tail(&rooted.host_path(&absolute))
        .map_err(|e| format!("the access log {absolute} could not be read: {e}"))?;
    Ok((absolute, entries))
}

//! A gRPC client for the runtime's StatsService: per-user byte counters (v2ray and Xray) and the
//! online-IP maps (Xray only). The TCP connection is made from inside the runtime's network
//! namespace, because the API usually listens on 127.0.0.1 there, and is then handed to tonic.
//!
//! The interface is synchronous like the rest of raylimit: the client owns a current-thread
//! tokio runtime and blocks on each call. Every connect and every call is bounded by the
//! timeout given to [`ApiClient::connect`].
//!
//! The messages are written by hand from the runtimes' `.proto` files (the field numbers are the
//! wire format), so no protoc or build script is needed.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::uri::PathAndQuery;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::Instant;
use tonic::transport::{Channel, Endpoint, Uri};
use tonic::Code;

use super::locate::Flavour;
use crate::netlink::socket::in_netns_at;

/// Xray's own name for the service. Xray registers it under [`V2RAY_SERVICE`] as well.
pub const XRAY_SERVICE: &str = "xray.app.stats.command.StatsService";
/// The only name v2ray (4.x and v5) knows.
pub const V2RAY_SERVICE: &str = "v2ray.core.app.stats.command.StatsService";

/// Large enough for the counters of tens of thousands of users (tonic's default is 4 MiB).
const MAX_RESPONSE_BYTES: usize = 64 << 20;

/// One user's cumulative byte counters. A counter is `None` when the runtime keeps none for the
/// user (its policy level does not count that direction).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserTraffic {
    pub email: String,
    pub uplink: Option<u64>,
    pub downlink: Option<u64>,
}

/// Why an API call gave no answer. Each carries one line of detail.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    /// The connection could not be made: refused, no route, or the namespace could not be entered.
    #[error("the runtime's API is unreachable: {0}")]
    Unreachable(String),
    /// The connection or the call did not finish within the deadline.
    #[error("the runtime's API did not answer in time: {0}")]
    Timeout(String),
    /// The runtime lacks the method or the whole service (gRPC UNIMPLEMENTED).
    #[error("the runtime's API lacks this call: {0}")]
    Unimplemented(String),
    /// The counter or online map does not exist (yet): runtimes create them on a user's first
    /// connection.
    #[error("the runtime has no such counter: {0}")]
    NotFound(String),
    /// Any other refusal, with the gRPC code and message.
    #[error("the runtime's API call failed: {0}")]
    Failed(String),
}

// The runtime's messages. Field numbers follow app/stats/command/command.proto of v2ray and
// Xray; only the messages raylimit sends or reads are here.

#[derive(Clone, PartialEq, prost::Message)]
struct GetStatsRequest {
    #[prost(string, tag = "1")]
    name: String,
    #[prost(bool, tag = "2")]
    reset: bool,
}

#[derive(Clone, PartialEq, prost::Message)]
struct Stat {
    #[prost(string, tag = "1")]
    name: String,
    #[prost(int64, tag = "2")]
    value: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
struct QueryStatsRequest {
    #[prost(string, tag = "1")]
    pattern: String,
    #[prost(bool, tag = "2")]
    reset: bool,
}

#[derive(Clone, PartialEq, prost::Message)]
struct QueryStatsResponse {
    #[prost(message, repeated, tag = "1")]
    stat: Vec<Stat>,
}

/// Xray >= 25.2.18: the online map's IPs, each with its last-seen time in unix seconds.
#[derive(Clone, PartialEq, prost::Message)]
struct GetStatsOnlineIpListResponse {
    #[prost(string, tag = "1")]
    name: String,
    #[prost(map = "string, int64", tag = "2")]
    ips: HashMap<String, i64>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct GetAllOnlineUsersRequest {}

/// Xray >= 26.1.13: the names (`user>>>E>>>online`) of the online maps with at least one IP.
#[derive(Clone, PartialEq, prost::Message)]
struct GetAllOnlineUsersResponse {
    #[prost(string, repeated, tag = "1")]
    users: Vec<String>,
}

/// How to open a TCP connection to the API: where, from which namespace, within what time.
#[derive(Debug, Clone)]
struct Dialer {
    addr: SocketAddr,
    netns: Option<String>,
    timeout: Duration,
}

impl Dialer {
    fn place(&self) -> String {
        match &self.netns {
            Some(ns) => format!("{} in the network namespace {ns}", self.addr),
            None => self.addr.to_string(),
        }
    }

    /// Creates the socket inside the namespace (it stays there), then connects from this one.
    async fn dial(&self) -> Result<TcpStream, ApiError> {
        let new = || match self.addr {
            SocketAddr::V4(_) => TcpSocket::new_v4(),
            SocketAddr::V6(_) => TcpSocket::new_v6(),
        };
        let socket = match &self.netns {
            Some(path) => in_netns_at(path, path, || Ok(new()))
                .map_err(|e| ApiError::Unreachable(one_line(&e.to_string())))?,
            None => new(),
        }
        .map_err(|e| {
            ApiError::Unreachable(format!("cannot open a socket for {}: {e}", self.place()))
        })?;
        match tokio::time::timeout(self.timeout, socket.connect(self.addr)).await {
            Err(_) => Err(ApiError::Timeout(format!(
                "connecting to {} took longer than {}",
                self.place(),
                secs(self.timeout)
            ))),
            Ok(Err(e)) => Err(ApiError::Unreachable(format!(
                "cannot connect to {}: {e}",
                self.place()
            ))),
            Ok(Ok(stream)) => {
                let _ = stream.set_nodelay(true);
                Ok(stream)
            }
        }
    }
}

/// A connection to one runtime's StatsService. Its methods block on a private runtime, so they
/// must not be called from inside an async task.
pub struct ApiClient {
    // Dropped before the runtime that runs its connection task.
    grpc: tonic::client::Grpc<Channel>,
    rt: tokio::runtime::Runtime,
    dialer: Dialer,
    /// Why tonic's last (re)connection through the connector failed, in raylimit's terms: tonic
    /// reports a failed reconnect as a bare UNAVAILABLE.
    dial_error: Arc<Mutex<Option<ApiError>>>,
    flavour: Flavour,
    /// The service name that answered, once one has.
    service: Option<&'static str>,
}

impl std::fmt::Debug for ApiClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiClient")
            .field("addr", &self.dialer.addr)
            .field("netns", &self.dialer.netns)
            .field("flavour", &self.flavour)
            .field("service", &self.service)
            .finish()
    }
}

/// How one attempt at a call ended, before the service-name fallback is decided.
enum Attempt<T> {
    Done(T),
    /// The runtime answered with an error status.
    Refused(tonic::Status),
    /// The connection failed on this side (closed, reset, or could not be made again).
    Broken(ApiError),
    TimedOut,
}

impl ApiClient {
    /// Connects to the API at `addr`, from inside the network namespace at `netns_path` (e.g.
    /// `/proc/PID/ns/net`) when given. Fails when the TCP connection and the HTTP/2 handshake
    /// take longer than `timeout` together; each later call has `timeout` of its own.
    pub fn connect(
        addr: SocketAddr,
        netns_path: Option<&str>,
        flavour: Flavour,
        timeout: Duration,
    ) -> Result<Self, ApiError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .build()
            .map_err(|e| ApiError::Failed(format!("cannot start the I/O runtime: {e}")))?;
        let dialer = Dialer {
            addr,
            netns: netns_path.map(str::to_string),
            timeout,
        };
        // The first connection is made here so that its failure is reported precisely; tonic
        // takes it through the connector, and dials again only if it must reconnect.
        let deadline = Instant::now() + timeout;
        let first = rt.block_on(dialer.dial())?;
        let slot = Arc::new(Mutex::new(Some(first)));
        let dial_error = Arc::new(Mutex::new(None));
        let (redial, failed) = (dialer.clone(), dial_error.clone());
        let connector = tower::service_fn(move |_: Uri| {
            let ready = slot.lock().ok().and_then(|mut s| s.take());
            let (dialer, failed) = (redial.clone(), failed.clone());
            async move {
                let stream = match ready {
                    Some(s) => s,
                    None => match dialer.dial().await {
                        Ok(s) => s,
                        Err(e) => {
                            if let Ok(mut slot) = failed.lock() {
                                *slot = Some(e.clone());
                            }
                            return Err(std::io::Error::other(e));
                        }
                    },
                };
                Ok::<_, std::io::Error>(TokioIo::new(stream))
            }
        });
        // The URI only names the authority for HTTP/2; the connector decides where to connect.
        let uri = match addr {
            SocketAddr::V4(a) => format!("http://{}:{}", a.ip(), a.port()),
            SocketAddr::V6(a) => format!("http://[{}]:{}", a.ip(), a.port()),
        };
        let endpoint = Endpoint::from_shared(uri)
            .map_err(|e| ApiError::Failed(format!("cannot address {addr}: {e}")))?;
        let channel = rt
            .block_on(async {
                tokio::time::timeout_at(deadline, endpoint.connect_with_connector(connector)).await
            })
            .map_err(|_| {
                ApiError::Timeout(format!(
                    "the HTTP/2 handshake with {} took longer than {}",
                    dialer.place(),
                    secs(timeout)
                ))
            })?
            .map_err(|e| {
                ApiError::Unreachable(format!(
                    "cannot open an HTTP/2 connection to {}: {}",
                    dialer.place(),
                    error_chain(&e)
                ))
            })?;
        let grpc = tonic::client::Grpc::new(channel).max_decoding_message_size(MAX_RESPONSE_BYTES);
        Ok(ApiClient {
            grpc,
            rt,
            dialer,
            dial_error,
            flavour,
            service: None,
        })
    }

    /// The service name that has answered so far, if any.
    pub fn service(&self) -> Option<&'static str> {
        self.service
    }

    /// QueryStats(pattern "user>>>"): per-user uplink/downlink byte counters, one entry per
    /// email, sorted by email.
    pub fn user_traffic(&mut self) -> Result<Vec<UserTraffic>, ApiError> {
        let resp: QueryStatsResponse = self.call(
            "QueryStats",
            QueryStatsRequest {
                pattern: "user>>>".into(),
                reset: false,
            },
        )?;
        Ok(user_traffic_of(
            resp.stat.iter().map(|s| (s.name.as_str(), s.value)),
        ))
    }

    /// Xray >= 25.2.18 GetStatsOnlineIpList(name "user>>>EMAIL>>>online"): the user's online
    /// client IPs, normalised and sorted.
    pub fn online_ips(&mut self, email: &str) -> Result<Vec<IpAddr>, ApiError> {
        let resp: GetStatsOnlineIpListResponse = self.call(
            "GetStatsOnlineIpList",
            GetStatsRequest {
                name: format!("user>>>{email}>>>online"),
                reset: false,
            },
        )?;
        let mut ips: Vec<IpAddr> = resp.ips.keys().filter_map(|k| parse_online_ip(k)).collect();
        ips.sort();
        ips.dedup();
        Ok(ips)
    }

    /// Xray >= 26.1.13 GetAllOnlineUsers: bare emails (names "user>>>E>>>online" unwrapped),
    /// sorted.
    pub fn online_users(&mut self) -> Result<Vec<String>, ApiError> {
        let resp: GetAllOnlineUsersResponse =
            self.call("GetAllOnlineUsers", GetAllOnlineUsersRequest {})?;
        let mut users: Vec<String> = resp
            .users
            .iter()
            .filter_map(|n| unwrap_online_name(n))
            .map(str::to_string)
            .collect();
        users.sort();
        users.dedup();
        Ok(users)
    }

    /// Calls `method`, trying the service names in the flavour's order until one is known to
    /// the runtime, all within one deadline. A connection found broken is made again once.
    fn call<Q, R>(&mut self, method: &str, request: Q) -> Result<R, ApiError>
    where
        Q: prost::Message + Clone + Send + Sync + 'static,
        R: prost::Message + Default + Send + Sync + 'static,
    {
        let deadline = Instant::now() + self.dialer.timeout;
        let names: Vec<&'static str> = match (self.service, self.flavour) {
            (Some(known), _) => vec![known],
            (None, Flavour::Xray) => vec![XRAY_SERVICE, V2RAY_SERVICE],
            (None, Flavour::V2ray) => vec![V2RAY_SERVICE, XRAY_SERVICE],
        };
        let what = format!("{method} at {}", self.dialer.place());
        let mut unknown = Vec::new();
        let mut retried = false;
        let mut next = names.into_iter();
        let mut service = next.next();
        while let Some(name) = service {
            match self.attempt(name, method, request.clone(), deadline)? {
                Attempt::Done(r) => {
                    self.service = Some(name);
                    return Ok(r);
                }
                Attempt::Refused(status) if unknown_service(status.code(), status.message()) => {
                    unknown.push(format!("{name}: {}", status_text(&status)));
                    service = next.next();
                }
                Attempt::Refused(status) => {
                    // The service answered (even if only to say the method is missing).
                    self.service = Some(name);
                    return Err(classify(&what, status.code(), status.message()));
                }
                Attempt::Broken(e) if retried => return Err(e),
                Attempt::Broken(_) => retried = true,
                Attempt::TimedOut => {
                    return Err(ApiError::Timeout(format!(
                        "{what} took longer than {}",
                        secs(self.dialer.timeout)
                    )))
                }
            }
        }
        Err(ApiError::Unimplemented(format!(
            "{what}: no StatsService ({})",
            unknown.join("; ")
        )))
    }

    fn attempt<Q, R>(
        &mut self,
        service: &str,
        method: &str,
        request: Q,
        deadline: Instant,
    ) -> Result<Attempt<R>, ApiError>
    where
        Q: prost::Message + Clone + Send + Sync + 'static,
        R: prost::Message + Default + Send + Sync + 'static,
    {
        let path = PathAndQuery::try_from(format!("/{service}/{method}"))
            .map_err(|e| ApiError::Failed(format!("bad gRPC path for {method}: {e}")))?;
        let mut req = tonic::Request::new(request);
        // Tells the runtime the deadline too (tonic also enforces it on this side).
        req.set_timeout(deadline.saturating_duration_since(Instant::now()));
        if let Ok(mut slot) = self.dial_error.lock() {
            *slot = None;
        }
        let grpc = &mut self.grpc;
        let outcome = self.rt.block_on(async {
            tokio::time::timeout_at(deadline, async {
                if let Err(e) = grpc.ready().await {
                    return Err(Err(error_chain(&e)));
                }
                grpc.unary(req, path, tonic_prost::ProstCodec::<Q, R>::default())
                    .await
                    .map_err(Ok)
            })
            .await
        });
        let what = || format!("{method} at {}", self.dialer.place());
        let dial_error = self.dial_error.lock().ok().and_then(|mut s| s.take());
        Ok(match (outcome, dial_error) {
            (Err(_), _) => Attempt::TimedOut,
            (Ok(Ok(resp)), _) => Attempt::Done(resp.into_inner()),
            (Ok(Err(_)), Some(e)) => Attempt::Broken(e),
            (Ok(Err(Err(lost))), None) => Attempt::Broken(ApiError::Unreachable(format!(
                "{}: connection lost: {lost}",
                what()
            ))),
            // tonic's own deadline, set from the same one.
            (Ok(Err(Ok(status))), None)
                if status.code() == Code::Cancelled && status.message() == "Timeout expired" =>
            {
                Attempt::TimedOut
            }
            // Failures on this side carry their cause; a status sent by the runtime has none.
            (Ok(Err(Ok(status))), None)
                if status.code() == Code::Unavailable
                    || std::error::Error::source(&status).is_some() =>
            {
                Attempt::Broken(ApiError::Unreachable(format!(
                    "{}: connection failed: {}",
                    what(),
                    error_chain(&status)
                )))
            }
            (Ok(Err(Ok(status))), None) => Attempt::Refused(status),
        })
    }
}

/// Whether an UNIMPLEMENTED answer means the *service* name is unknown (so the other name may
/// work) rather than the method. Go's gRPC says "unknown service S" or "unknown method M for
/// service S"; other servers may give no message at all.
fn unknown_service(code: Code, message: &str) -> bool {
    code == Code::Unimplemented && !message.to_ascii_lowercase().contains("unknown method")
}

/// The error for a gRPC refusal of a call described by `what`.
fn classify(what: &str, code: Code, message: &str) -> ApiError {
    let detail = format!("{what}: {} {}", code_name(code), one_line(message));
    let detail = detail.trim_end().to_string();
    match code {
        Code::Unimplemented => ApiError::Unimplemented(detail),
        Code::NotFound => ApiError::NotFound(detail),
        // v2ray answers a missing counter with UNKNOWN "<name> not found.".
        Code::Unknown if message.trim_end().ends_with("not found.") => ApiError::NotFound(detail),
        Code::Unavailable => ApiError::Unreachable(detail),
        Code::DeadlineExceeded => ApiError::Timeout(detail),
        _ => ApiError::Failed(detail),
    }
}

/// The canonical gRPC name of a status code.
fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

fn status_text(status: &tonic::Status) -> String {
    format!(
        "{} {}",
        code_name(status.code()),
        one_line(status.message())
    )
    .trim_end()
    .to_string()
}

/// An error and its sources, on one line.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let more = s.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = s.source();
    }
    one_line(&text)
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn secs(d: Duration) -> String {
    format!("{:.1} s", d.as_secs_f64())
}

/// Per-user counters from `user>>>EMAIL>>>traffic>>>uplink|downlink` stats; other names are
/// ignored, and so is a (nonsensical) negative value.
fn user_traffic_of<'a>(stats: impl IntoIterator<Item = (&'a str, i64)>) -> Vec<UserTraffic> {
    let mut users: BTreeMap<&str, UserTraffic> = BTreeMap::new();
    for (name, value) in stats {
        let Some(rest) = name.strip_prefix("user>>>") else {
            continue;
        };
        let (email, up) = if let Some(e) = rest.strip_suffix(">>>traffic>>>uplink") {
            (e, true)
        } else if let Some(e) = rest.strip_suffix(">>>traffic>>>downlink") {
            (e, false)
        } else {
            continue;
        };
        let Ok(value) = u64::try_from(value) else {
            continue;
        };
        let entry = users.entry(email).or_insert_with(|| UserTraffic {
            email: email.to_string(),
            uplink: None,
            downlink: None,
        });
        if up {
            entry.uplink = Some(value);
        } else {
            entry.downlink = Some(value);
        }
    }
    users.into_values().collect()
}

/// Parses an IP as Xray writes it in an online map: `1.2.3.4`, `[2001:db8::1]`, bare IPv6, and
/// IPv4-mapped IPv6 (`::ffff:1.2.3.4`, folded to IPv4). `None` for anything else.
pub fn parse_online_ip(s: &str) -> Option<IpAddr> {
    let s = s.trim();
    let bare = match s.strip_prefix('[') {
        Some(inner) => inner.strip_suffix(']')?,
        None => s,
    };
    let ip: IpAddr = bare.parse().ok()?;
    Some(ip.to_canonical())
}

/// The email in an online-map name: `user>>>E>>>online` gives `Some("E")`; any other shape
/// (including an empty email or one that would hide another `>>>` field) gives `None`.
pub fn unwrap_online_name(s: &str) -> Option<&str> {
    let email = s.strip_prefix("user>>>")?.strip_suffix(">>>online")?;
    if email.is_empty() || email.contains(">>>") {
        return None;
    }
    Some(email)
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;
    use std::net::{Ipv4Addr, Ipv6Addr};

    #[test]
    fn online_ips_parse_as_xray_writes_them() {
        let v4 = |a, b, c, d| Some(IpAddr::V4(Ipv4Addr::new(a, b, c, d)));
        assert_eq!(parse_online_ip("1.2.3.4"), v4(1, 2, 3, 4));
        assert_eq!(parse_online_ip(" 10.0.0.1 "), v4(10, 0, 0, 1));
        assert_eq!(parse_online_ip("::ffff:1.2.3.4"), v4(1, 2, 3, 4));
        assert_eq!(parse_online_ip("[::ffff:10.1.2.3]"), v4(10, 1, 2, 3));
        let db8: Ipv6Addr = "2001:db8::1".parse().unwrap();
        assert_eq!(parse_online_ip("[2001:db8::1]"), Some(IpAddr::V6(db8)));
        assert_eq!(parse_online_ip("2001:db8::1"), Some(IpAddr::V6(db8)));
        assert_eq!(
            parse_online_ip("2001:0DB8:0:0:0:0:0:1"),
            Some(IpAddr::V6(db8))
        );
        for bad in [
            "",
            "[]",
            "[2001:db8::1",
            "2001:db8::1]",
            "1.2.3.4:5678",
            "[2001:db8::1]:443",
            "1.2.3",
            "256.1.1.1",
            "example.com",
            "[1.2.3.4]x",
        ] {
            assert_eq!(parse_online_ip(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn online_names_unwrap_to_emails() {
        assert_eq!(
            unwrap_online_name("user>>>alice@example.com>>>online"),
            Some("alice@example.com")
        );
        assert_eq!(unwrap_online_name("user>>>bob>>>online"), Some("bob"));
        for bad in [
            "",
            "alice@example.com",
            "user>>>alice@example.com",
            "user>>>>>>online",
            "user>>>alice@example.com>>>traffic>>>uplink",
            "inbound>>>api>>>online",
            "user>>>a>>>traffic>>>online",
            "xuser>>>alice>>>online",
        ] {
            assert_eq!(unwrap_online_name(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn v2ray_unknown_not_found_is_not_found() {
        // v2ray 4.34, before a user's first connection.
        let e = classify(
            "GetStats",
            Code::Unknown,
            "v2ray.com/core/app/stats/command: user>>>bob@example.com>>>traffic>>>uplink not found.",
        );
        assert!(matches!(e, ApiError::NotFound(_)), "{e:?}");
        assert!(e.to_string().contains("UNKNOWN"), "{e}");
        // Xray.
        let e = classify(
            "GetStatsOnlineIpList",
            Code::NotFound,
            "online map not found",
        );
        assert!(matches!(e, ApiError::NotFound(_)), "{e:?}");
        // Any other UNKNOWN stays a failure, with the code and message.
        let e = classify("QueryStats", Code::Unknown, "boom");
        assert_eq!(e, ApiError::Failed("QueryStats: UNKNOWN boom".to_string()));
        assert_eq!(
            e.to_string(),
            "the runtime's API call failed: QueryStats: UNKNOWN boom"
        );
        let e = classify("X", Code::Unimplemented, "unknown method X for service S");
        assert!(matches!(e, ApiError::Unimplemented(_)), "{e:?}");
        let e = classify("X", Code::Unavailable, "");
        assert_eq!(e, ApiError::Unreachable("X: UNAVAILABLE".into()));
        let e = classify("X", Code::PermissionDenied, "line one\nline two");
        assert_eq!(
            e,
            ApiError::Failed("X: PERMISSION_DENIED line one line two".into())
        );
    }

    #[test]
    fn only_an_unknown_service_falls_back() {
        assert!(unknown_service(
            Code::Unimplemented,
            "unknown service xray.app.stats.command.StatsService"
        ));
        // tonic's router says nothing.
        assert!(unknown_service(Code::Unimplemented, ""));
        assert!(!unknown_service(
            Code::Unimplemented,
            "unknown method GetAllOnlineUsers for service v2ray.core.app.stats.command.StatsService"
        ));
        assert!(!unknown_service(Code::NotFound, "unknown service"));
    }

    #[test]
    fn user_counters_group_by_email() {
        let got = user_traffic_of([
            ("user>>>bob@example.com>>>traffic>>>uplink", 277),
            ("inbound>>>vmess-in>>>traffic>>>downlink", 39255253),
            ("user>>>alice@example.com>>>traffic>>>downlink", 20001090),
            ("user>>>bob@example.com>>>traffic>>>downlink", 18733642),
            ("user>>>alice@example.com>>>traffic>>>uplink", 4064121),
            ("user>>>carol>>>traffic>>>downlink", 5),
            ("user>>>dave>>>traffic>>>uplink", -1),
            ("user>>>erin>>>online", 2),
        ]);
        let t = |e: &str, u, d| UserTraffic {
            email: e.into(),
            uplink: u,
            downlink: d,
        };
        assert_eq!(
            got,
            vec![
                t("alice@example.com", Some(4064121), Some(20001090)),
                t("bob@example.com", Some(277), Some(18733642)),
                t("carol", None, Some(5)),
            ]
        );
    }

    #[test]
    fn messages_have_the_runtime_wire_format() {
        // QueryStatsRequest{pattern: "user>>>", reset: true}: field 1 string, field 2 varint.
        let bytes = QueryStatsRequest {
            pattern: "user>>>".into(),
            reset: true,
        }
        .encode_to_vec();
        assert_eq!(bytes, b"\x0a\x07user>>>\x10\x01");
        // GetStatsOnlineIpListResponse{name: "n", ips: {"1.2.3.4": 5}}: a map entry is a
        // nested message with key 1 and value 2.
        let wire = b"\x0a\x01n\x12\x0b\x0a\x071.2.3.4\x10\x05";
        let r = GetStatsOnlineIpListResponse::decode(&wire[..]).unwrap();
        assert_eq!(r.name, "n");
        assert_eq!(r.ips.get("1.2.3.4"), Some(&5));
        let r = QueryStatsResponse::decode(&b"\x0a\x06\x0a\x01a\x10\xac\x02"[..]).unwrap();
        assert_eq!(
            r.stat,
            vec![Stat {
                name: "a".into(),
                value: 300
            }]
        );
    }
}

//! The parts of an Xray config raylimit reasons about, and the merge of several files in
//! Xray's own order (`infra/conf/xray.go`, `Config.Override`).

use std::net::IpAddr;

use serde_json::Value;

/// Where an inbound listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    /// No `listen`, or an empty one: every address (Xray's default).
    Unspecified,
    Ip(IpAddr),
    /// A unix socket path (`/path`, `@abstract`, `unix://...`) or a `domainsocket` transport.
    Unix(String),
    /// A name Xray would resolve itself; raylimit does not guess the address.
    Name(String),
}

/// An inbound's port as written, after `env:` lookups in the runtime's environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Port {
    Missing,
    Single(u16),
    /// A range or a list (`"1000-2000"`, `"80,443"`), as inclusive ranges.
    Ranges(Vec<(u16, u16)>),
    Invalid(String),
}

/// `80`, `1000-2000`, `80,443` as Xray writes them.
pub fn ranges_text(ranges: &[(u16, u16)]) -> String {
    ranges
        .iter()
        .map(|(a, b)| {
            if a == b {
                a.to_string()
            } else {
                format!("{a}-{b}")
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// A layer-4 protocol a listener accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum L4 {
    Tcp,
    Udp,
}

impl L4 {
    pub fn name(self) -> &'static str {
        match self {
            L4::Tcp => "tcp",
            L4::Udp => "udp",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub email: String,
    /// The UUID (vmess, vless); empty for password-based protocols, whose secret is never
    /// read into raylimit's output.
    pub id: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inbound {
    pub tag: String,
    pub protocol: String,
    pub listen: Listen,
    pub port: Port,
    /// `streamSettings.network` as written, `tcp` when absent.
    pub transport: String,
    /// What the listener accepts; `Err` names a transport raylimit does not know.
    pub l4: Result<Vec<L4>, String>,
    pub users: Vec<User>,
    /// Why the inbound is a transparent proxy (`sockopt.tproxy`, dokodemo-door's
    /// `followRedirect`): its packets carry other hosts' addresses, so no listener scopes them.
    pub transparent: Option<String>,
    /// The file it came from, and the earlier files whose same-tag inbound it replaced.
    pub file: String,
    pub replaced: Vec<String>,
}

/// An outbound's `streamSettings.sockopt.mark`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mark {
    None,
    Set(u32),
    Invalid(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outbound {
    pub tag: String,
    pub protocol: String,
    pub mark: Mark,
    /// `proxySettings.tag`: this outbound's traffic is carried by another outbound.
    pub proxy_tag: Option<String>,
    /// `streamSettings.sockopt.dialerProxy`: this outbound dials through another outbound.
    pub dialer_proxy: Option<String>,
    pub file: String,
    pub replaced: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Api {
    pub tag: String,
    pub services: Vec<String>,
    /// Xray's own API listener (`api.listen`), which needs no inbound or routing rule.
    pub listen: Option<String>,
    pub file: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub inbound_tags: Vec<String>,
    pub outbound_tag: Option<String>,
}

/// One file's contribution; `None` means the file does not set that part.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct FileConfig {
    pub inbounds: Vec<Inbound>,
    pub outbounds: Vec<Outbound>,
    pub api: Option<Api>,
    /// `log.access`: where the runtime writes one line per dispatched connection.
    pub access_log: Option<String>,
    pub rules: Option<Vec<Rule>>,
}

/// The config the runtime runs with, after the merge.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Merged {
    pub inbounds: Vec<Inbound>,
    pub outbounds: Vec<Outbound>,
    pub api: Option<Api>,
    /// `log.access`, when it names a file (not `none`, not empty: stdout).
    pub access_log: Option<String>,
    pub rules: Vec<Rule>,
}

/// Reads the parts raylimit needs from one file's JSON value. `env` answers `env:NAME` ports
/// from the runtime's environment. A part of the wrong shape fails the file, as it fails Xray.
pub fn from_value(
    v: &Value,
    file: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<FileConfig, String> {
    let list = |key: &str| -> Result<Vec<&Value>, String> {
        match v.get(key) {
            None | Some(Value::Null) => Ok(Vec::new()),
            Some(Value::Array(a)) => Ok(a.iter().collect()),
            Some(_) => Err(format!("\"{key}\" is not a list")),
        }
    };
    let mut out = FileConfig::default();
    for (i, item) in list("inbounds")?.into_iter().enumerate() {
        if !item.is_object() {
            return Err(format!("inbounds[{i}] is not an object"));
        }
        out.inbounds.push(inbound(item, file, env));
    }
    for (i, item) in list("outbounds")?.into_iter().enumerate() {
        if !item.is_object() {
            return Err(format!("outbounds[{i}] is not an object"));
        }
        out.outbounds.push(outbound(item, file));
    }
    if let Some(log) = v.get("log").filter(|l| l.is_object()) {
        out.access_log = Some(text(log, "access"));
    }
    if let Some(api) = v.get("api").filter(|a| !a.is_null()) {
        if !api.is_object() {
            return Err("\"api\" is not an object".into());
        }
        out.api = Some(Api {
            tag: text(api, "tag"),
            services: strings(api.get("services")),
            listen: Some(text(api, "listen")).filter(|l| !l.is_empty()),
            file: file.to_string(),
        });
    }
    if let Some(routing) = v.get("routing").filter(|r| !r.is_null()) {
        let rules = match routing.get("rules") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(a)) => a
                .iter()
                .map(|r| Rule {
                    inbound_tags: strings(r.get("inboundTag")),
                    outbound_tag: Some(text(r, "outboundTag")).filter(|t| !t.is_empty()),
                })
                .collect(),
            Some(_) => return Err("\"routing.rules\" is not a list".into()),
        };
        out.rules = Some(rules);
    }
    Ok(out)
}

/// A string field, trimmed; empty when absent or not a string.
fn text(v: &Value, key: &str) -> String {
    v.get(key)
        .and_then(Value::as_str)
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// A list of strings, or one string (Xray accepts both in several places).
fn strings(v: Option<&Value>) -> Vec<String> {
    match v {
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(Value::as_str)
            .map(str::to_string)
            .collect(),
        _ => Vec::new(),
    }
}

fn inbound(v: &Value, file: &str, env: &dyn Fn(&str) -> Option<String>) -> Inbound {
    let protocol = text(v, "protocol").to_ascii_lowercase();
    let stream = v.get("streamSettings");
    let transport = stream
        .map(|s| text(s, "network").to_ascii_lowercase())
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| "tcp".into());
    let settings = v.get("settings");
    let mut listen = parse_listen(&text(v, "listen"));
    if matches!(transport.as_str(), "domainsocket" | "ds") {
        let path = stream
            .and_then(|s| s.get("dsSettings"))
            .map(|d| text(d, "path"))
            .unwrap_or_default();
        listen = Listen::Unix(path);
    }
    Inbound {
        tag: text(v, "tag"),
        listen,
        port: parse_port(v.get("port"), env),
        l4: listener_l4(&protocol, &transport, settings),
        users: users(settings),
        transparent: transparent(&protocol, stream, settings),
        protocol,
        transport,
        file: file.to_string(),
        replaced: Vec::new(),
    }
}

/// Why an inbound receives traffic addressed to other hosts, if it does: `sockopt.tproxy` set to
/// `tproxy` or `redirect`, or a dokodemo-door that follows redirects.
fn transparent(protocol: &str, stream: Option<&Value>, settings: Option<&Value>) -> Option<String> {
    let tproxy = stream
        .and_then(|s| s.get("sockopt"))
        .map(|o| text(o, "tproxy").to_ascii_lowercase())
        .filter(|t| t == "tproxy" || t == "redirect");
    if let Some(mode) = tproxy {
        return Some(format!("streamSettings.sockopt.tproxy is {mode:?}"));
    }
    let follows = settings
        .and_then(|s| s.get("followRedirect"))
        .and_then(Value::as_bool)
        .unwrap_or(false);
    (matches!(protocol, "dokodemo-door" | "tunnel") && follows)
        .then(|| format!("{protocol} with followRedirect"))
}

fn parse_listen(s: &str) -> Listen {
    if s.is_empty() {
        return Listen::Unspecified;
    }
    if s.starts_with('/') || s.starts_with('@') {
        return Listen::Unix(s.to_string());
    }
    if let Some(path) = s.strip_prefix("unix://") {
        return Listen::Unix(path.to_string());
    }
    let bare = s
        .strip_prefix('[')
        .and_then(|x| x.strip_suffix(']'))
        .unwrap_or(s);
    match bare.parse::<IpAddr>() {
        Ok(ip) => Listen::Ip(crate::policy::canonical_ip(ip)),
        Err(_) => Listen::Name(s.to_string()),
    }
}

/// Xray's `PortList`: a number, or a string of comma-separated ports and `from-to` ranges, any
/// of which may be `env:NAME`.
pub fn parse_port(v: Option<&Value>, env: &dyn Fn(&str) -> Option<String>) -> Port {
    let s = match v {
        None | Some(Value::Null) => return Port::Missing,
        Some(Value::Number(n)) => {
            return match n.as_u64() {
                Some(0) => Port::Missing,
                Some(p) if p <= 65535 => Port::Single(p as u16),
                _ => Port::Invalid(format!("port {n} is not between 1 and 65535")),
            }
        }
        Some(Value::String(s)) => s.as_str(),
        Some(other) => return Port::Invalid(format!("port {other} is neither a number nor text")),
    };
    let mut ranges = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let resolved = match part.strip_prefix("env:") {
            Some(name) => match env(name) {
                Some(value) => value,
                None => {
                    return Port::Invalid(format!(
                        "port {part:?} names an environment variable the runtime does not have"
                    ))
                }
            },
            None => part.to_string(),
        };
        let one = |p: &str| -> Result<u16, Port> {
            p.trim()
                .parse::<u16>()
                .map_err(|_| Port::Invalid(format!("port {part:?} is not a port number")))
        };
        let range = match resolved.split_once('-') {
            None => one(&resolved).map(|p| (p, p)),
            Some((a, b)) => one(a).and_then(|a| one(b).map(|b| (a, b))),
        };
        match range {
            Ok((a, b)) if a > b => {
                return Port::Invalid(format!("port range {part:?} is reversed"))
            }
            Ok(r) => ranges.push(r),
            Err(p) => return p,
        }
    }
    match ranges.as_slice() {
        [] => Port::Missing,
        [(a, b)] if a == b && *a == 0 => Port::Missing,
        [(a, b)] if a == b => Port::Single(*a),
        _ => Port::Ranges(ranges),
    }
}

/// Which layer-4 protocols a listener accepts, from its transport and, for the protocols that
/// choose their own networks, its settings.
fn listener_l4(
    protocol: &str,
    transport: &str,
    settings: Option<&Value>,
) -> Result<Vec<L4>, String> {
    let from_list = |s: &str| -> Vec<L4> {
        let mut v: Vec<L4> = s
            .split(',')
            .filter_map(|n| match n.trim() {
                "tcp" => Some(L4::Tcp),
                "udp" => Some(L4::Udp),
                _ => None,
            })
            .collect();
        v.sort();
        v.dedup();
        v
    };
    let network_setting = settings
        .and_then(|s| s.get("network"))
        .map(|n| match n {
            Value::Array(a) => a
                .iter()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join(","),
            other => other.as_str().unwrap_or_default().to_string(),
        })
        .filter(|n| !n.is_empty());
    match protocol {
        "dokodemo-door" | "tunnel" | "shadowsocks" => {
            let l4 = from_list(
                &network_setting
                    .unwrap_or_else(|| "tcp".into())
                    .to_ascii_lowercase(),
            );
            if l4.is_empty() {
                return Err("its settings.network names no tcp or udp".into());
            }
            return Ok(l4);
        }
        "wireguard" | "hysteria" => return Ok(vec![L4::Udp]),
        _ => {}
    }
    let mut l4 = match transport {
        "tcp" | "raw" | "ws" | "websocket" | "grpc" | "gun" | "h2" | "http" | "httpupgrade"
        | "xhttp" | "splithttp" => vec![L4::Tcp],
        "kcp" | "mkcp" | "quic" => vec![L4::Udp],
        "domainsocket" | "ds" => Vec::new(),
        other => return Err(format!("transport {other:?} is not one raylimit knows")),
    };
    if protocol == "socks" && settings.and_then(|s| s.get("udp")) == Some(&Value::Bool(true)) {
        l4.push(L4::Udp);
    }
    Ok(l4)
}

fn users(settings: Option<&Value>) -> Vec<User> {
    let Some(clients) = settings
        .and_then(|s| s.get("clients").or_else(|| s.get("users")))
        .and_then(Value::as_array)
    else {
        return Vec::new();
    };
    clients
        .iter()
        .map(|c| User {
            email: text(c, "email"),
            id: text(c, "id"),
        })
        .collect()
}

fn outbound(v: &Value, file: &str) -> Outbound {
    let sockopt = v.get("streamSettings").and_then(|s| s.get("sockopt"));
    let mark = match sockopt.and_then(|s| s.get("mark")) {
        None | Some(Value::Null) => Mark::None,
        Some(Value::Number(n)) => match n.as_u64() {
            Some(0) => Mark::None,
            Some(m) if m <= u32::MAX as u64 => Mark::Set(m as u32),
            _ => Mark::Invalid(format!("mark {n} is not a 32-bit socket mark")),
        },
        Some(other) => Mark::Invalid(format!("mark {other} is not a number")),
    };
    Outbound {
        tag: text(v, "tag"),
        protocol: text(v, "protocol").to_ascii_lowercase(),
        mark,
        proxy_tag: v
            .get("proxySettings")
            .map(|p| text(p, "tag"))
            .filter(|t| !t.is_empty()),
        dialer_proxy: sockopt
            .map(|s| text(s, "dialerProxy"))
            .filter(|t| !t.is_empty()),
        file: file.to_string(),
        replaced: Vec::new(),
    }
}

/// Merges files in load order, exactly as Xray's `Override` does: the first file is taken
/// whole; a later `api` or `routing` replaces the earlier one; a later inbound replaces the
/// first inbound with the same tag (an empty tag included) or is appended; a later outbound
/// replaces the same-tag outbound, and new outbounds go before the earlier ones unless the
/// file's name contains "tail".
pub fn merge(files: Vec<FileConfig>) -> Merged {
    let mut m = Merged::default();
    for (i, f) in files.into_iter().enumerate() {
        if i == 0 {
            m = Merged {
                inbounds: f.inbounds,
                outbounds: f.outbounds,
                api: f.api,
                access_log: f.access_log,
                rules: f.rules.unwrap_or_default(),
            };
            continue;
        }
        if f.access_log.is_some() {
            m.access_log = f.access_log;
        }
        if f.api.is_some() {
            m.api = f.api;
        }
        if let Some(rules) = f.rules {
            m.rules = rules;
        }
        for mut ib in f.inbounds {
            match m.inbounds.iter().position(|x| x.tag == ib.tag) {
                Some(idx) => {
                    let old = &m.inbounds[idx];
                    ib.replaced = old
                        .replaced
                        .iter()
                        .cloned()
                        .chain([old.file.clone()])
                        .collect();
                    m.inbounds[idx] = ib;
                }
                None => m.inbounds.push(ib),
            }
        }
        let mut prepend = Vec::new();
        for mut ob in f.outbounds {
            let tail = ob.file.to_ascii_lowercase().contains("tail");
            match m.outbounds.iter().position(|x| x.tag == ob.tag) {
                Some(idx) => {
                    let old = &m.outbounds[idx];
                    ob.replaced = old
                        .replaced
                        .iter()
                        .cloned()
                        .chain([old.file.clone()])
                        .collect();
                    m.outbounds[idx] = ob;
                }
                None if tail => m.outbounds.push(ob),
                None => prepend.push(ob),
            }
        }
        prepend.append(&mut m.outbounds);
        m.outbounds = prepend;
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    fn file(v: Value, name: &str) -> FileConfig {
        from_value(&v, name, &no_env).unwrap()
    }

    #[test]
    fn transparent_inbounds_are_recognised() {
        let f = file(
            json!({"inbounds": [
                {"tag": "tp", "protocol": "dokodemo-door", "port": 12345,
                 "settings": {"network": "tcp,udp", "followRedirect": true},
                 "streamSettings": {"sockopt": {"tproxy": "tproxy"}}},
                {"tag": "redir", "protocol": "dokodemo-door", "port": 12346,
                 "settings": {"followRedirect": true}},
                {"tag": "forward", "protocol": "dokodemo-door", "port": 12347,
                 "settings": {"address": "10.0.0.1", "port": 53}},
                {"tag": "off", "protocol": "socks", "port": 1080,
                 "streamSettings": {"sockopt": {"tproxy": "off"}}}
            ]}),
            "c.json",
        );
        let why: Vec<Option<&str>> = f
            .inbounds
            .iter()
            .map(|i| i.transparent.as_deref())
            .collect();
        assert_eq!(
            why,
            [
                Some("streamSettings.sockopt.tproxy is \"tproxy\""),
                Some("dokodemo-door with followRedirect"),
                None,
                None
            ]
        );
    }

    #[test]
    fn ports_as_number_string_range_list_and_env() {
        let env = |n: &str| (n == "PORT").then(|| "8443".to_string());
        let p = |v: Value| parse_port(Some(&v), &env);
        assert_eq!(p(json!(443)), Port::Single(443));
        assert_eq!(p(json!("443")), Port::Single(443));
        assert_eq!(p(json!(" 443 ")), Port::Single(443));
        assert_eq!(p(json!("1000-2000")), Port::Ranges(vec![(1000, 2000)]));
        assert_eq!(p(json!("80,443")), Port::Ranges(vec![(80, 80), (443, 443)]));
        assert_eq!(p(json!("env:PORT")), Port::Single(8443));
        assert_eq!(p(json!(0)), Port::Missing);
        assert_eq!(p(json!("")), Port::Missing);
        assert_eq!(parse_port(None, &env), Port::Missing);
        for bad in [
            json!(70000),
            json!(-1),
            json!(1.5),
            json!("http"),
            json!("2000-1000"),
            json!("env:NOPE"),
            json!(true),
            json!("1-2-3"),
        ] {
            assert!(matches!(p(bad.clone()), Port::Invalid(_)), "{bad}");
        }
    }

    #[test]
    fn listen_forms() {
        assert_eq!(parse_listen(""), Listen::Unspecified);
        assert_eq!(
            parse_listen("0.0.0.0"),
            Listen::Ip("0.0.0.0".parse().unwrap())
        );
        assert_eq!(parse_listen("[::1]"), Listen::Ip("::1".parse().unwrap()));
        assert_eq!(
            parse_listen("::ffff:10.0.0.1"),
            Listen::Ip("10.0.0.1".parse().unwrap())
        );
        assert_eq!(
            parse_listen("/run/x.sock"),
            Listen::Unix("/run/x.sock".into())
        );
        assert_eq!(parse_listen("@xray"), Listen::Unix("@xray".into()));
        assert_eq!(
            parse_listen("unix:///run/x.sock"),
            Listen::Unix("/run/x.sock".into())
        );
        assert_eq!(parse_listen("localhost"), Listen::Name("localhost".into()));
    }

    #[test]
    fn transports_decide_tcp_or_udp() {
        let l4 = |v: Value| {
            let f = file(json!({"inbounds": [v]}), "a.json");
            f.inbounds[0].l4.clone()
        };
        let tcp = Ok(vec![L4::Tcp]);
        let udp = Ok(vec![L4::Udp]);
        assert_eq!(l4(json!({"protocol": "vless"})), tcp);
        for n in [
            "raw",
            "tcp",
            "ws",
            "grpc",
            "xhttp",
            "splithttp",
            "httpupgrade",
            "h2",
        ] {
            assert_eq!(
                l4(json!({"protocol": "vless", "streamSettings": {"network": n}})),
                tcp,
                "{n}"
            );
        }
        for n in ["kcp", "mkcp", "quic"] {
            assert_eq!(
                l4(json!({"protocol": "vmess", "streamSettings": {"network": n}})),
                udp,
                "{n}"
            );
        }
        assert_eq!(
            l4(json!({"protocol": "dokodemo-door", "settings": {"network": "tcp,udp"}})),
            Ok(vec![L4::Tcp, L4::Udp])
        );
        assert_eq!(
            l4(json!({"protocol": "shadowsocks", "settings": {"network": "udp"}})),
            udp
        );
        assert_eq!(l4(json!({"protocol": "shadowsocks"})), tcp);
        assert_eq!(
            l4(json!({"protocol": "socks", "settings": {"udp": true}})),
            Ok(vec![L4::Tcp, L4::Udp])
        );
        assert_eq!(l4(json!({"protocol": "wireguard"})), udp);
        assert!(
            l4(json!({"protocol": "vless", "streamSettings": {"network": "carrier-pigeon"}}))
                .is_err()
        );
        let ds = file(
            json!({"inbounds": [{"protocol": "vless", "streamSettings": {"network": "domainsocket", "dsSettings": {"path": "/run/ds"}}}]}),
            "a.json",
        );
        assert_eq!(ds.inbounds[0].listen, Listen::Unix("/run/ds".into()));
    }

    #[test]
    fn users_marks_and_chaining() {
        let f = file(
            json!({
                "inbounds": [{"tag": "in", "protocol": "vless", "settings": {"clients": [
                    {"id": "11111111-1111-4111-8111-111111111111", "email": "a@x"},
                    {"password": "secret", "email": "b@x"}]}}],
                "outbounds": [
                    {"tag": "m", "protocol": "freedom", "streamSettings": {"sockopt": {"mark": 7}}},
                    {"tag": "z", "protocol": "freedom", "streamSettings": {"sockopt": {"mark": 0}}},
                    {"tag": "big", "streamSettings": {"sockopt": {"mark": 4294967296u64}}},
                    {"tag": "s", "streamSettings": {"sockopt": {"mark": "7"}}},
                    {"tag": "p", "proxySettings": {"tag": "m"}},
                    {"tag": "d", "streamSettings": {"sockopt": {"mark": 9, "dialerProxy": "m"}}}]
            }),
            "a.json",
        );
        assert_eq!(f.inbounds[0].users[0].email, "a@x");
        assert_eq!(f.inbounds[0].users[1].id, "");
        let o = &f.outbounds;
        assert_eq!(o[0].mark, Mark::Set(7));
        assert_eq!(o[1].mark, Mark::None);
        assert!(matches!(o[2].mark, Mark::Invalid(_)));
        assert!(matches!(o[3].mark, Mark::Invalid(_)));
        assert_eq!(o[4].proxy_tag.as_deref(), Some("m"));
        assert_eq!(o[5].dialer_proxy.as_deref(), Some("m"));
        assert_eq!(o[5].mark, Mark::Set(9));
    }

    #[test]
    fn wrong_shapes_fail_the_file() {
        for v in [
            json!({"inbounds": {}}),
            json!({"inbounds": [1]}),
            json!({"outbounds": "x"}),
            json!({"api": []}),
            json!({"routing": {"rules": {}}}),
        ] {
            assert!(from_value(&v, "a.json", &no_env).is_err(), "{v}");
        }
    }

    #[test]
    fn merge_follows_xray_override() {
        let a = file(
            json!({
                "api": {"tag": "api", "services": ["StatsService"]},
                "routing": {"rules": [{"inboundTag": ["api-in"], "outboundTag": "api"}]},
                "inbounds": [{"tag": "x", "port": 1}, {"port": 2}],
                "outbounds": [{"tag": "direct"}, {"tag": "block"}]
            }),
            "/c/10-base.json",
        );
        let b = file(
            json!({
                "inbounds": [{"tag": "x", "port": 3}, {"tag": "y", "port": 4}, {"port": 5}],
                "outbounds": [{"tag": "block", "protocol": "blackhole"}, {"tag": "p1"}, {"tag": "p2"}]
            }),
            "/c/20-more.json",
        );
        let c = file(
            json!({"outbounds": [{"tag": "t1"}], "routing": {"rules": []}}),
            "/c/30-tail.json",
        );
        let m = merge(vec![a, b, c]);
        let ports: Vec<(&str, &Port)> = m
            .inbounds
            .iter()
            .map(|i| (i.tag.as_str(), &i.port))
            .collect();
        assert_eq!(
            ports,
            [
                ("x", &Port::Single(3)),
                ("", &Port::Single(5)),
                ("y", &Port::Single(4))
            ]
        );
        assert_eq!(m.inbounds[0].replaced, ["/c/10-base.json"]);
        let tags: Vec<&str> = m.outbounds.iter().map(|o| o.tag.as_str()).collect();
        assert_eq!(tags, ["p1", "p2", "direct", "block", "t1"]);
        assert_eq!(m.outbounds[3].protocol, "blackhole");
        // api survives from the first file; the tail file's empty routing replaced the rules.
        assert_eq!(m.api.as_ref().unwrap().tag, "api");
        assert!(m.rules.is_empty());
    }
}

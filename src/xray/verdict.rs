//! Whether a limit on an inbound or an outbound can be concrete, and where the runtime's API
//! listens. A verdict is either a selector the kernel can match or one reason, in words an
//! operator can act on, why nothing exact can be built. Nothing weaker is guessed.

use std::net::IpAddr;

use super::config::{Inbound, Listen, Mark, Outbound, Port, L4};
use super::{FileStatus, Loaded};

/// An inbound's listener as the kernel can match it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listener {
    /// `None` for a wildcard listener: matched by port on every address.
    pub address: Option<IpAddr>,
    pub port: u16,
    pub l4: Vec<L4>,
    pub notes: Vec<String>,
}

impl Listener {
    pub fn describe(&self) -> String {
        let l4: Vec<&str> = self.l4.iter().map(|p| p.name()).collect();
        match self.address {
            Some(IpAddr::V6(a)) => format!("{} listener [{a}]:{}", l4.join("+"), self.port),
            Some(a) => format!("{} listener {a}:{}", l4.join("+"), self.port),
            None => format!(
                "{} listener on port {} (every address)",
                l4.join("+"),
                self.port
            ),
        }
    }
}

/// An outbound's socket mark as the kernel can match it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SocketMark {
    pub mark: u32,
    pub notes: Vec<String>,
}

impl SocketMark {
    pub fn describe(&self) -> String {
        format!("socket mark {:#x}", self.mark)
    }
}

/// Files read after `file` that could not be read: they could redefine what `file` says.
fn unreadable_after(cfg: &Loaded, file: &str) -> Vec<String> {
    let at = cfg.files.iter().position(|f| f.path == file).unwrap_or(0);
    cfg.files[at + 1..]
        .iter()
        .filter(|f| f.status != FileStatus::Read)
        .map(|f| format!("{} ({})", f.path, f.status.describe()))
        .collect()
}

/// The one definition of `tag`, or why there is not exactly one that can be trusted.
fn find_one<'a, T>(
    cfg: &Loaded,
    kind: &str,
    tag: &str,
    items: &'a [T],
    tag_of: impl Fn(&T) -> &str,
    file_of: impl Fn(&T) -> &str,
) -> Result<&'a T, String> {
    let found: Vec<&T> = items.iter().filter(|x| tag_of(x) == tag).collect();
    let read: Vec<&str> = cfg
        .files
        .iter()
        .filter(|f| f.status == FileStatus::Read)
        .map(|f| f.path.as_str())
        .collect();
    match found.as_slice() {
        [] if read.is_empty() => Err(match cfg.incomplete() {
            Some(why) => format!("no {kind} tagged {tag:?} can be checked: {why}"),
            None => {
                format!("no {kind} tagged {tag:?} can be checked: the runtime has no config file")
            }
        }),
        [] => match cfg.incomplete() {
            Some(why) => Err(format!(
                "no {kind} tagged {tag:?} in the readable config, and {why}"
            )),
            None => {
                // The tags there are, so a typo is one glance away.
                let mut tags: Vec<&str> = items
                    .iter()
                    .map(&tag_of)
                    .filter(|t| !t.is_empty())
                    .collect();
                tags.sort_unstable();
                tags.dedup();
                let listed = match tags.len() {
                    0 => format!("; it has no tagged {kind}"),
                    n if n > 20 => format!("; its {kind}s include {}", tags[..20].join(", ")),
                    _ => format!("; its {kind}s are {}", tags.join(", ")),
                };
                Err(format!(
                    "no {kind} tagged {tag:?} in the runtime's config ({}){listed}",
                    read.join(", ")
                ))
            }
        },
        [one] => {
            let later = unreadable_after(cfg, file_of(one));
            if later.is_empty() {
                Ok(one)
            } else {
                Err(format!(
                    "{kind} {tag:?} is defined in {}, but a later config that could override it could not be read: {}",
                    file_of(one),
                    later.join("; ")
                ))
            }
        }
        many => {
            let files: Vec<&str> = many.iter().map(|x| file_of(x)).collect();
            Err(format!(
                "{kind} tag {tag:?} is ambiguous: {} definitions survive the merge ({}), so which one the runtime uses cannot be known",
                many.len(),
                files.join(", ")
            ))
        }
    }
}

/// The listener of inbound `tag`, or why a limit on it cannot be concrete.
pub fn inbound(cfg: &Loaded, tag: &str) -> Result<Listener, String> {
    let ib: &Inbound = find_one(
        cfg,
        "inbound",
        tag,
        &cfg.merged.inbounds,
        |i| &i.tag,
        |i| &i.file,
    )?;
    let address = match &ib.listen {
        Listen::Unspecified => None,
        Listen::Ip(ip) if ip.is_unspecified() => None,
        Listen::Ip(ip) => Some(*ip),
        Listen::Unix(path) => {
            return Err(format!(
                "inbound {tag:?} listens on the unix socket {path:?}, which has no address or port to match"
            ))
        }
        Listen::Name(name) => {
            return Err(format!(
                "inbound {tag:?} listens on {name:?}, a name rather than an address; write the address in the config"
            ))
        }
    };
    let port = match &ib.port {
        Port::Single(p) => *p,
        Port::Missing => return Err(format!("inbound {tag:?} has no port")),
        Port::Ranges(r) => {
            return Err(format!(
                "inbound {tag:?} listens on several ports ({}); a limit matches one listener port",
                super::config::ranges_text(r)
            ));
        }
        Port::Invalid(why) => return Err(format!("inbound {tag:?}: {why}")),
    };
    let l4 = match &ib.l4 {
        Ok(l4) if !l4.is_empty() => l4.clone(),
        Ok(_) => return Err(format!("inbound {tag:?} accepts neither TCP nor UDP")),
        Err(why) => return Err(format!("inbound {tag:?}: {why}")),
    };
    let mut notes = Vec::new();
    if address.is_none() {
        notes.push(format!(
            "inbound {tag:?} listens on every address, so it is matched by port {port} alone"
        ));
    }
    if !ib.replaced.is_empty() {
        notes.push(format!(
            "defined in {}, which overrides {}",
            ib.file,
            ib.replaced.join(", ")
        ));
    }
    Ok(Listener {
        address,
        port,
        l4,
        notes,
    })
}

/// The socket mark of outbound `tag`, or why a limit on it cannot be concrete.
pub fn outbound(cfg: &Loaded, tag: &str) -> Result<SocketMark, String> {
    let ob: &Outbound = find_one(
        cfg,
        "outbound",
        tag,
        &cfg.merged.outbounds,
        |o| &o.tag,
        |o| &o.file,
    )?;
    if let Some(via) = &ob.proxy_tag {
        return Err(format!(
            "outbound {tag:?} sends its traffic through outbound {via:?} (proxySettings.tag), so its own sockets carry none of it"
        ));
    }
    if let Some(via) = &ob.dialer_proxy {
        return Err(format!(
            "outbound {tag:?} dials through outbound {via:?} (sockopt.dialerProxy), so its own sockets carry none of its traffic"
        ));
    }
    let mark = match &ob.mark {
        Mark::Set(m) => *m,
        Mark::None => {
            return Err(format!(
                "outbound {tag:?} has no socket mark; give it a unique non-zero streamSettings.sockopt.mark"
            ))
        }
        Mark::Invalid(why) => return Err(format!("outbound {tag:?}: {why}")),
    };
    if let Some(why) = cfg.incomplete() {
        return Err(format!(
            "whether socket mark {mark:#x} is unique cannot be checked: {why}"
        ));
    }
    let sharers: Vec<&str> = cfg
        .merged
        .outbounds
        .iter()
        .filter(|o| o.tag != tag && o.mark == Mark::Set(mark))
        .map(|o| o.tag.as_str())
        .collect();
    if !sharers.is_empty() {
        return Err(format!(
            "socket mark {mark:#x} of outbound {tag:?} is shared with outbound {}, so the mark does not tell them apart",
            sharers.join(", ")
        ));
    }
    let notes = cfg
        .merged
        .outbounds
        .iter()
        .filter_map(|o| {
            let how = if o.proxy_tag.as_deref() == Some(tag) {
                "proxySettings.tag"
            } else if o.dialer_proxy.as_deref() == Some(tag) {
                "sockopt.dialerProxy"
            } else {
                return None;
            };
            Some(format!(
                "outbound {:?} chains through {tag:?} ({how}), so its traffic is limited together with {tag:?}",
                o.tag
            ))
        })
        .collect();
    Ok(SocketMark { mark, notes })
}

/// Whether the API is configured, judged from the config alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApiStatus {
    LikelyConfigured,
    NotEvident,
    Unknown,
}

impl ApiStatus {
    pub fn name(self) -> &'static str {
        match self {
            ApiStatus::LikelyConfigured => "likely_configured",
            ApiStatus::NotEvident => "not_evident",
            ApiStatus::Unknown => "unknown",
        }
    }
}

/// Where the API listens, as the runtime sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// `api.listen`, or the tag of the inbound that carries the API.
    pub name: String,
    /// How it was found: `api.listen`, `inbound` (tagged like the API) or `routing` (a rule
    /// sending an inbound to the API).
    pub via: &'static str,
    pub listen: Listen,
    pub port: Option<u16>,
}

impl Endpoint {
    /// `host:port` as the runtime binds it (an unspecified address shown as such).
    pub fn address(&self) -> String {
        let host = match &self.listen {
            Listen::Unspecified => "0.0.0.0".to_string(),
            Listen::Ip(IpAddr::V6(a)) => format!("[{a}]"),
            Listen::Ip(a) => a.to_string(),
            Listen::Unix(p) => return format!("unix:{p}"),
            Listen::Name(n) => n.clone(),
        };
        match self.port {
            Some(p) => format!("{host}:{p}"),
            None => host,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiView {
    pub status: ApiStatus,
    pub reason: String,
    pub tag: Option<String>,
    pub services: Vec<String>,
    pub endpoints: Vec<Endpoint>,
}

/// Parses `api.listen` (`127.0.0.1:10085`, `[::1]:10085`, `:10085`).
fn api_listen(s: &str) -> Endpoint {
    let (host, port) = match s.rsplit_once(':') {
        Some((h, p)) if !s.starts_with('/') => (h, p.parse::<u16>().ok()),
        _ => (s, None),
    };
    let listen = match host {
        "" => Listen::Unspecified,
        h if h.starts_with('/') || h.starts_with('@') => Listen::Unix(s.to_string()),
        h => {
            let bare = h.trim_start_matches('[').trim_end_matches(']');
            match bare.parse::<IpAddr>() {
                Ok(ip) => Listen::Ip(ip),
                Err(_) => Listen::Name(h.to_string()),
            }
        }
    };
    Endpoint {
        name: "api.listen".into(),
        via: "api.listen",
        listen,
        port,
    }
}

pub fn api(cfg: &Loaded) -> ApiView {
    let Some(api) = cfg.merged.api.as_ref().filter(|a| !a.services.is_empty()) else {
        let (status, reason) = match cfg.incomplete() {
            Some(why) => (
                ApiStatus::Unknown,
                format!("no API in the readable config, and {why}"),
            ),
            None => (
                ApiStatus::NotEvident,
                "the config enables no API services".to_string(),
            ),
        };
        return ApiView {
            status,
            reason,
            tag: None,
            services: Vec::new(),
            endpoints: Vec::new(),
        };
    };
    let mut endpoints = Vec::new();
    if let Some(listen) = &api.listen {
        endpoints.push(api_listen(listen));
    }
    let of_inbound = |ib: &Inbound, via| Endpoint {
        name: ib.tag.clone(),
        via,
        listen: ib.listen.clone(),
        port: match ib.port {
            Port::Single(p) => Some(p),
            _ => None,
        },
    };
    for ib in cfg
        .merged
        .inbounds
        .iter()
        .filter(|i| !api.tag.is_empty() && i.tag == api.tag)
    {
        endpoints.push(of_inbound(ib, "inbound"));
    }
    for rule in cfg
        .merged
        .rules
        .iter()
        .filter(|r| !api.tag.is_empty() && r.outbound_tag.as_deref() == Some(api.tag.as_str()))
    {
        for t in &rule.inbound_tags {
            for ib in cfg.merged.inbounds.iter().filter(|i| &i.tag == t) {
                if !endpoints.iter().any(|e| e.name == ib.tag) {
                    endpoints.push(of_inbound(ib, "routing"));
                }
            }
        }
    }
    let reason = match endpoints.first() {
        Some(e) if e.via == "api.listen" => format!("API services on api.listen {}", e.address()),
        Some(e) if e.via == "routing" => format!(
            "API services on inbound {:?}, routed to the API by a routing rule",
            e.name
        ),
        Some(e) => format!("API services on inbound {:?}, tagged like the API", e.name),
        None => "API services are enabled, but no api.listen, API inbound or routing rule to it was found".into(),
    };
    ApiView {
        status: ApiStatus::LikelyConfigured,
        reason,
        tag: Some(api.tag.clone()).filter(|t| !t.is_empty()),
        services: api.services.clone(),
        endpoints,
    }
}

#[cfg(test)]
mod tests {
    use super::super::config::{self, FileConfig};
    use super::super::locate::{Located, Origin};
    use super::super::FileRead;
    use super::*;
    use serde_json::{json, Value};

    /// A config from (path, value or None for an unreadable file) pairs.
    fn loaded(files: &[(&str, Option<Value>)]) -> Loaded {
        let no_env = |_: &str| None;
        let mut reads = Vec::new();
        let mut parsed: Vec<FileConfig> = Vec::new();
        for (path, v) in files {
            let status = match v {
                Some(v) => {
                    parsed.push(config::from_value(v, path, &no_env).unwrap());
                    FileStatus::Read
                }
                None => FileStatus::Denied,
            };
            reads.push(FileRead {
                path: path.to_string(),
                status,
            });
        }
        Loaded {
            located: Located {
                confdir: None,
                origin: Origin::Flags,
                files: files.iter().map(|f| f.0.to_string()).collect(),
                format: None,
            },
            files: reads,
            merged: config::merge(parsed),
        }
    }

    fn one(v: Value) -> Loaded {
        loaded(&[("/etc/xray/config.json", Some(v))])
    }

    fn blocked_inbound(v: Value, tag: &str, needle: &str) {
        let e = inbound(&one(v), tag).unwrap_err();
        assert!(e.contains(needle), "{e:?} lacks {needle:?}");
    }

    #[test]
    fn concrete_inbounds() {
        let cfg = one(json!({"inbounds": [
            {"tag": "a", "listen": "10.0.0.1", "port": 443, "protocol": "vless", "streamSettings": {"network": "raw"}},
            {"tag": "w", "port": "8443", "protocol": "vmess", "streamSettings": {"network": "ws"}},
            {"tag": "k", "listen": "::", "port": 9000, "protocol": "vmess", "streamSettings": {"network": "kcp"}},
            {"tag": "six", "listen": "[fd00::1]", "port": 1, "protocol": "trojan"}]}));
        let a = inbound(&cfg, "a").unwrap();
        assert_eq!(
            (a.address, a.port, a.l4.clone()),
            (Some("10.0.0.1".parse().unwrap()), 443, vec![L4::Tcp])
        );
        assert_eq!(a.describe(), "tcp listener 10.0.0.1:443");
        assert!(a.notes.is_empty());
        let w = inbound(&cfg, "w").unwrap();
        assert_eq!((w.address, w.port), (None, 8443));
        assert_eq!(w.describe(), "tcp listener on port 8443 (every address)");
        assert_eq!(w.notes.len(), 1);
        let k = inbound(&cfg, "k").unwrap();
        assert_eq!((k.address, k.l4.clone()), (None, vec![L4::Udp]));
        assert_eq!(
            inbound(&cfg, "six").unwrap().describe(),
            "tcp listener [fd00::1]:1"
        );
    }

    #[test]
    fn every_inbound_blocked_reason() {
        blocked_inbound(
            json!({"inbounds": [{"tag": "u", "listen": "/run/x.sock", "protocol": "vless"}]}),
            "u",
            "unix socket",
        );
        blocked_inbound(
            json!({"inbounds": [{"tag": "u", "port": 1, "protocol": "vless",
            "streamSettings": {"network": "domainsocket", "dsSettings": {"path": "/run/ds"}}}]}),
            "u",
            "unix socket",
        );
        blocked_inbound(
            json!({"inbounds": [{"tag": "r", "port": "1000-2000"}]}),
            "r",
            "several ports (1000-2000)",
        );
        blocked_inbound(
            json!({"inbounds": [{"tag": "r", "port": "80,443"}]}),
            "r",
            "several ports (80,443)",
        );
        blocked_inbound(json!({"inbounds": [{"tag": "p"}]}), "p", "has no port");
        blocked_inbound(
            json!({"inbounds": [{"tag": "p", "port": "env:NOPE"}]}),
            "p",
            "environment variable",
        );
        blocked_inbound(
            json!({"inbounds": [{"tag": "n", "port": 1, "listen": "localhost"}]}),
            "n",
            "a name rather than an address",
        );
        blocked_inbound(
            json!({"inbounds": [{"tag": "t", "port": 1, "streamSettings": {"network": "foo"}}]}),
            "t",
            "transport \"foo\"",
        );
        blocked_inbound(
            json!({"inbounds": [{"tag": "a", "port": 1}]}),
            "b",
            "no inbound tagged \"b\" in the runtime's config (/etc/xray/config.json); its inbounds are a",
        );
        blocked_inbound(
            json!({"inbounds": [{"tag": "d", "port": 1}, {"tag": "d", "port": 2}]}),
            "d",
            "ambiguous: 2 definitions",
        );
        // Unreadable configs.
        let e = inbound(&loaded(&[("/a.json", None)]), "x").unwrap_err();
        assert!(
            e.contains("can be checked") && e.contains("/a.json (permission denied)"),
            "{e}"
        );
        let e = inbound(
            &loaded(&[("/a.json", Some(json!({}))), ("/b.json", None)]),
            "x",
        )
        .unwrap_err();
        assert!(
            e.contains("no inbound tagged \"x\" in the readable config, and"),
            "{e}"
        );
        // A later unreadable file could override the tag; an earlier one could not.
        let ib = json!({"inbounds": [{"tag": "x", "port": 1, "listen": "10.0.0.1"}]});
        let e = inbound(
            &loaded(&[("/a.json", Some(ib.clone())), ("/b.json", None)]),
            "x",
        )
        .unwrap_err();
        assert!(e.contains("later config that could override it"), "{e}");
        assert!(inbound(&loaded(&[("/a.json", None), ("/b.json", Some(ib))]), "x").is_ok());
        let e = inbound(&loaded(&[]), "x").unwrap_err();
        assert!(e.contains("has no config file"), "{e}");
    }

    #[test]
    fn a_merged_override_is_the_listener_used() {
        let cfg = loaded(&[
            (
                "/c/10.json",
                Some(json!({"inbounds": [{"tag": "x", "port": 1}]})),
            ),
            (
                "/c/20.json",
                Some(json!({"inbounds": [{"tag": "x", "port": 2, "listen": "10.0.0.2"}]})),
            ),
        ]);
        let l = inbound(&cfg, "x").unwrap();
        assert_eq!(l.port, 2);
        assert_eq!(
            l.notes,
            ["defined in /c/20.json, which overrides /c/10.json"]
        );
    }

    #[test]
    fn outbound_verdicts() {
        let cfg = one(json!({"outbounds": [
            {"tag": "m", "protocol": "freedom", "streamSettings": {"sockopt": {"mark": 16}}},
            {"tag": "rider", "protocol": "vless", "streamSettings": {"sockopt": {"dialerProxy": "m"}}},
            {"tag": "chained", "protocol": "vmess", "proxySettings": {"tag": "m"}},
            {"tag": "plain", "protocol": "freedom"},
            {"tag": "zero", "streamSettings": {"sockopt": {"mark": 0}}},
            {"tag": "s1", "streamSettings": {"sockopt": {"mark": 5}}},
            {"tag": "s2", "streamSettings": {"sockopt": {"mark": 5}}},
            {"tag": "dup", "streamSettings": {"sockopt": {"mark": 6}}},
            {"tag": "dup", "streamSettings": {"sockopt": {"mark": 7}}}]}));
        let m = outbound(&cfg, "m").unwrap();
        assert_eq!(m.mark, 16);
        assert_eq!(m.describe(), "socket mark 0x10");
        assert_eq!(m.notes.len(), 2, "{:?}", m.notes);
        for (tag, needle) in [
            ("rider", "sockopt.dialerProxy"),
            ("chained", "proxySettings.tag"),
            ("plain", "has no socket mark"),
            ("zero", "has no socket mark"),
            ("s1", "shared with outbound s2"),
            ("dup", "ambiguous"),
            ("nope", "no outbound tagged \"nope\""),
        ] {
            let e = outbound(&cfg, tag).unwrap_err();
            assert!(e.contains(needle), "{tag}: {e:?}");
        }
        let e = outbound(&loaded(&[("/a.json", Some(json!({"outbounds": [{"tag": "m", "streamSettings": {"sockopt": {"mark": 1}}}]}))), ("/b.json", None)]), "m").unwrap_err();
        assert!(
            e.contains("could not be read") || e.contains("cannot be checked"),
            "{e}"
        );
    }

    #[test]
    fn api_forms() {
        let routed = one(json!({
            "api": {"tag": "api", "services": ["StatsService"]},
            "inbounds": [{"tag": "api-in", "listen": "127.0.0.1", "port": 10085, "protocol": "dokodemo-door"}],
            "routing": {"rules": [{"type": "field", "inboundTag": ["api-in"], "outboundTag": "api"}]}}));
        let v = api(&routed);
        assert_eq!(v.status, ApiStatus::LikelyConfigured);
        assert_eq!(v.endpoints.len(), 1);
        assert_eq!(
            (v.endpoints[0].via, v.endpoints[0].address()),
            ("routing", "127.0.0.1:10085".to_string())
        );
        let direct = api(&one(
            json!({"api": {"tag": "api", "listen": "[::1]:10085", "services": ["HandlerService"]}}),
        ));
        assert_eq!(direct.endpoints[0].address(), "[::1]:10085");
        assert!(direct.reason.contains("api.listen"));
        let none = api(&one(json!({"inbounds": []})));
        assert_eq!(none.status, ApiStatus::NotEvident);
        let unknown = api(&loaded(&[("/a.json", None)]));
        assert_eq!(unknown.status, ApiStatus::Unknown);
        let no_endpoint = api(&one(
            json!({"api": {"tag": "api", "services": ["StatsService"]}}),
        ));
        assert!(no_endpoint.endpoints.is_empty() && no_endpoint.reason.contains("no api.listen"));
    }
}

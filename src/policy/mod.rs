//! What an operator asks for, validated: the subject, the direction, the rate. Pure, no I/O.

mod rate;

use std::collections::BTreeSet;
use std::fmt;
use std::net::{IpAddr, SocketAddr};

pub use rate::{human as human_rate, human_bytes, parse_rate};

/// Direction relative to the client (ARCHITECTURE.md, "Directions"): download leaves the device,
/// upload arrives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Direction {
    Upload,
    Download,
}

impl Direction {
    pub fn parse(s: &str) -> Option<Direction> {
        match s {
            "upload" => Some(Direction::Upload),
            "download" => Some(Direction::Download),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Direction::Upload => "upload",
            Direction::Download => "download",
        }
    }
}

/// What the operator named, before the runtime resolves it: an inbound's tag before its
/// listener is read from the config, a user as given (UUID or email), every live client before
/// they are known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Ip(IpAddr),
    /// Every client IP through one shared baseline class.
    AllShared,
    /// Every live client IP, each with its own class; `inbound` narrows the set to one listener.
    PerIp {
        inbound: Option<String>,
    },
    /// A user's UUID or email, as given.
    User(String),
    Connection(SocketAddr),
    Inbound(String),
    /// An outbound's tag and the mark bits raylimit reads (`--mark-mask`).
    Outbound {
        tag: String,
        mask: u32,
    },
}

impl Target {
    /// The family word reports use.
    pub fn kind(&self) -> &'static str {
        match self {
            Target::Ip(_) | Target::AllShared | Target::PerIp { .. } => "ip",
            Target::User(_) => "uuid",
            Target::Connection(_) => "connection",
            Target::Inbound(_) => "inbound",
            Target::Outbound { .. } => "outbound",
        }
    }

    /// The value as the operator gave it.
    pub fn value(&self) -> String {
        match self {
            Target::Ip(ip) => ip.to_string(),
            Target::AllShared | Target::PerIp { .. } => "all".into(),
            Target::User(id) => id.clone(),
            Target::Connection(c) => c.to_string(),
            Target::Inbound(tag) | Target::Outbound { tag, .. } => tag.clone(),
        }
    }

    /// The subject a target is without anything to resolve (a client address, the shared
    /// baseline, a connection); `None` for the families the runtime resolves.
    pub fn direct(&self) -> Option<Subject> {
        match self {
            Target::Ip(ip) => Some(Subject::Ip(*ip)),
            Target::AllShared => Some(Subject::AllShared),
            Target::Connection(c) => Some(Subject::Connection(*c)),
            _ => None,
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.kind(), self.value())
    }
}

/// An inbound listener's endpoint as its rule matches it: the port, and the address when the
/// listener has a concrete one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Endpoint {
    pub address: Option<IpAddr>,
    pub port: u16,
}

/// Who a limit applies to, resolved against the runtime.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Subject {
    /// One client address; IPv4-mapped IPv6 is folded to IPv4, so textual variants are one subject.
    Ip(IpAddr),
    /// Every client IP through one shared baseline class.
    AllShared,
    /// One user (by UUID): the live client IPs attributed to them, all into one class.
    User { uuid: String, ips: BTreeSet<IpAddr> },
    /// One client connection: its address and port.
    Connection(SocketAddr),
    /// One outbound: the socket mark its connections carry, read under `mask`. The mark is
    /// `None` for a removal, which finds the rule by its class and nft tag, not by the config.
    Outbound {
        tag: String,
        mark: Option<u32>,
        mask: u32,
    },
    /// One inbound: its listener. `None` for a removal, which finds the rule by its class.
    Inbound {
        tag: String,
        listener: Option<Endpoint>,
    },
}

impl Subject {
    /// The value as it is reported back (`--ip`, `--uuid` or `--connection`).
    pub fn value(&self) -> String {
        match self {
            Subject::Ip(ip) => ip.to_string(),
            Subject::AllShared => "all".into(),
            Subject::User { uuid, .. } => uuid.clone(),
            Subject::Connection(c) => c.to_string(),
            Subject::Inbound { tag, .. } | Subject::Outbound { tag, .. } => tag.clone(),
        }
    }

    /// The family word reports and keys use.
    pub fn kind(&self) -> &'static str {
        match self {
            Subject::Ip(_) | Subject::AllShared => "ip",
            Subject::User { .. } => "uuid",
            Subject::Connection(_) => "connection",
            Subject::Inbound { .. } => "inbound",
            Subject::Outbound { .. } => "outbound",
        }
    }

    /// The stable key class minors are derived from: never a PID, never the owner, never the
    /// user's current addresses.
    pub fn key(&self) -> SubjectKey {
        match self {
            Subject::Ip(ip) => SubjectKey::Ip(*ip),
            Subject::AllShared => SubjectKey::All,
            Subject::User { uuid, .. } => SubjectKey::User(uuid.clone()),
            Subject::Connection(c) => SubjectKey::Connection(*c),
            Subject::Inbound { tag, .. } => SubjectKey::Inbound(tag.clone()),
            Subject::Outbound { tag, .. } => SubjectKey::Outbound(tag.clone()),
        }
    }
}

impl fmt::Display for Subject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.kind(), self.value())
    }
}

/// A subject as the annotations and nft tags know it: `ip 10.0.0.1`, `ip all`, `uuid ID`,
/// `connection IP:PORT`, `inbound TAG`, `outbound TAG`. Written and read with `Display` and
/// `FromStr`, so the text form is defined once.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SubjectKey {
    Ip(IpAddr),
    All,
    User(String),
    Connection(SocketAddr),
    Inbound(String),
    Outbound(String),
}

impl SubjectKey {
    /// The target this key names (an outbound's mark read under `mask`): how a prune asks
    /// for its removal.
    pub fn target(&self, mask: u32) -> Target {
        match self {
            SubjectKey::Ip(ip) => Target::Ip(*ip),
            SubjectKey::All => Target::AllShared,
            SubjectKey::User(id) => Target::User(id.clone()),
            SubjectKey::Connection(c) => Target::Connection(*c),
            SubjectKey::Inbound(tag) => Target::Inbound(tag.clone()),
            SubjectKey::Outbound(tag) => Target::Outbound {
                tag: tag.clone(),
                mask,
            },
        }
    }

    /// The client address of an `ip` key.
    pub fn ip(&self) -> Option<IpAddr> {
        match self {
            SubjectKey::Ip(ip) => Some(*ip),
            _ => None,
        }
    }
}

impl fmt::Display for SubjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SubjectKey::Ip(ip) => write!(f, "ip {ip}"),
            SubjectKey::All => write!(f, "ip all"),
            SubjectKey::User(id) => write!(f, "uuid {id}"),
            SubjectKey::Connection(c) => write!(f, "connection {c}"),
            SubjectKey::Inbound(tag) => write!(f, "inbound {tag}"),
            SubjectKey::Outbound(tag) => write!(f, "outbound {tag}"),
        }
    }
}

impl std::str::FromStr for SubjectKey {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("{s:?} is not a subject key");
        let (kind, value) = s.split_once(' ').ok_or_else(bad)?;
        if value.is_empty() {
            return Err(bad());
        }
        Ok(match kind {
            "ip" if value == "all" => SubjectKey::All,
            "ip" => SubjectKey::Ip(value.parse().map_err(|_| bad())?),
            "uuid" => SubjectKey::User(value.into()),
            "connection" => SubjectKey::Connection(value.parse().map_err(|_| bad())?),
            "inbound" => SubjectKey::Inbound(value.into()),
            "outbound" => SubjectKey::Outbound(value.into()),
            _ => return Err(bad()),
        })
    }
}

impl serde::Serialize for SubjectKey {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for SubjectKey {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// The marks raylimit reads and writes unless told otherwise: bits 24–27, which Docker,
/// kube-proxy (bits 14–15), Tailscale (16–23), wg-quick (0xca6c), Istio and Cilium's common
/// modes leave alone. Calico's default mask (0xffff0000) covers them: pick another with
/// `--mark-mask` there.
pub const DEFAULT_MARK_MASK: u32 = 0x0f00_0000;

/// Parses `--mark-mask`: hex (`0x0f000000`) or decimal, not zero.
pub fn parse_mark_mask(value: &str) -> Result<u32, String> {
    let v = value.trim();
    let parsed = match v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => v.parse(),
    };
    match parsed {
        Ok(0) => Err("--mark-mask 0 would read no mark bits at all".into()),
        Ok(m) => Ok(m),
        Err(_) => Err(format!(
            "--mark-mask {v:?} is not a 32-bit mask like 0x0f000000"
        )),
    }
}

/// Parses a `--connection` value: `IP:PORT`, `[IPv6]:PORT`, with IPv4-mapped folded.
pub fn parse_connection(value: &str) -> Result<SocketAddr, String> {
    let value = value.trim();
    let addr: SocketAddr = value.parse().map_err(|_| {
        format!("--connection {value:?} is not a client IP:PORT (write IPv6 as [ADDR]:PORT)")
    })?;
    if addr.port() == 0 {
        return Err(format!(
            "--connection {value:?} has port 0, which no connection uses"
        ));
    }
    Ok(SocketAddr::new(canonical_ip(addr.ip()), addr.port()))
}

/// Parses an `--ip` value: `all` (any case) or one address. Zones are refused: a classifier
/// matches addresses, not scopes.
pub fn parse_ip_target(value: &str, per_ip: bool) -> Result<Target, String> {
    let value = value.trim();
    if value.eq_ignore_ascii_case("all") {
        return Ok(if per_ip {
            Target::PerIp { inbound: None }
        } else {
            Target::AllShared
        });
    }
    let ip: IpAddr = value
        .parse()
        .map_err(|_| format!("--ip {value:?} is neither an IP address nor \"all\""))?;
    Ok(Target::Ip(canonical_ip(ip)))
}

/// IPv4-mapped IPv6 (`::ffff:a.b.c.d`) is the IPv4 client it maps.
pub fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        },
        v4 => v4,
    }
}

/// What the request wants for its subject.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Want {
    /// Shape to this many bytes per second.
    Limit(u64),
    /// Exempt from any baseline: unshaped through HTB's direct queue.
    Unlimited,
    /// Take the subject's objects away.
    Remove,
}

/// One target, one direction, one device, as asked: the target not yet resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wanted {
    pub target: Target,
    pub direction: Direction,
    pub device: String,
    pub want: Want,
}

impl Wanted {
    /// The request for a subject the target resolved to.
    pub fn resolved(&self, subject: Subject) -> Request {
        Request {
            subject,
            direction: self.direction,
            device: self.device.clone(),
            want: self.want,
        }
    }

    /// True when the target's rule shapes packets leaving the device (see [`Request::on_egress`]).
    pub fn on_egress(&self) -> bool {
        egress(
            matches!(self.target, Target::Outbound { .. }),
            self.direction,
        )
    }

    /// `download 1000000 bytes/s on eth0` and its kin.
    pub fn describe(&self) -> String {
        describe(self.direction, self.want, &self.device)
    }
}

/// One subject, one direction, one device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub subject: Subject,
    pub direction: Direction,
    pub device: String,
    pub want: Want,
}

/// Client-facing families shape download on egress; the outbound family faces the remote, so
/// its upload leaves the device.
fn egress(outbound: bool, direction: Direction) -> bool {
    match outbound {
        true => direction == Direction::Upload,
        false => direction == Direction::Download,
    }
}

fn describe(direction: Direction, want: Want, device: &str) -> String {
    let dir = direction.name();
    match want {
        Want::Limit(rate) => format!("{dir} {rate} bytes/s on {device}"),
        Want::Unlimited => format!("{dir} unlimited exception on {device}"),
        Want::Remove => format!("removal of the {dir} rule on {device}"),
    }
}

impl Request {
    /// True when the rule shapes packets leaving the device (its egress root); false when it
    /// shapes arriving packets on the IFB companion.
    pub fn on_egress(&self) -> bool {
        egress(
            matches!(self.subject, Subject::Outbound { .. }),
            self.direction,
        )
    }

    /// `download 1000000 bytes/s on eth0` and its kin.
    pub fn describe(&self) -> String {
        describe(self.direction, self.want, &self.device)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn textual_variants_of_one_address_are_one_subject() {
        let a = parse_ip_target("::ffff:10.0.0.1", false).unwrap();
        let b = parse_ip_target(" 10.0.0.1 ", false).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.value(), "10.0.0.1");
        let c = parse_ip_target("2001:0DB8:0:0::0010", false).unwrap();
        assert_eq!(c.value(), "2001:db8::10");
        assert_eq!(parse_ip_target("ALL", false).unwrap(), Target::AllShared);
        assert_eq!(
            parse_ip_target("all", true).unwrap(),
            Target::PerIp { inbound: None }
        );
        assert!(parse_ip_target("1.2.3", false).is_err());
        assert!(parse_ip_target("fe80::1%eth0", false).is_err());
    }

    #[test]
    fn connections_parse_and_fold() {
        assert_eq!(
            parse_connection("[::ffff:10.0.0.2]:4000")
                .unwrap()
                .to_string(),
            "10.0.0.2:4000"
        );
        assert_eq!(
            parse_connection("[2001:db8::1]:80").unwrap().to_string(),
            "[2001:db8::1]:80"
        );
        assert!(parse_connection("10.0.0.2").is_err());
        assert!(parse_connection("10.0.0.2:0").is_err());
        let c = Subject::Connection(parse_connection("10.0.0.2:4000").unwrap());
        assert_eq!(c.key().to_string(), "connection 10.0.0.2:4000");
    }

    #[test]
    fn subject_keys_read_back_as_written() {
        for text in [
            "ip 10.0.0.1",
            "ip 2001:db8::10",
            "ip all",
            "uuid 6a2f0c1e-0000-4000-8000-000000000001",
            "uuid alice@example.org",
            "connection 10.0.0.2:4000",
            "connection [2001:db8::1]:80",
            "inbound vmess-in",
            "outbound marked",
        ] {
            let key: SubjectKey = text.parse().unwrap();
            assert_eq!(key.to_string(), text);
            let json = serde_json::to_string(&key).unwrap();
            assert_eq!(serde_json::from_str::<SubjectKey>(&json).unwrap(), key);
        }
        for bad in [
            "",
            "ip",
            "ip ",
            "ip 1.2.3",
            "port 80",
            "connection 10.0.0.2",
        ] {
            assert!(bad.parse::<SubjectKey>().is_err(), "{bad:?}");
        }
        let key: SubjectKey = "outbound marked".parse().unwrap();
        assert_eq!(
            key.target(0xff),
            Target::Outbound {
                tag: "marked".into(),
                mask: 0xff
            }
        );
    }
}

//! What an operator asks for, validated: the subject, the direction, the rate. Pure, no I/O.

mod rate;

use std::collections::BTreeSet;
use std::fmt;
use std::net::{IpAddr, SocketAddr};

pub use rate::parse_rate;

/// Direction relative to the client (DESIGN.md §2): download leaves the device, upload arrives.
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

/// Who a limit applies to. (The inbound and outbound families are planned elsewhere.)
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Subject {
    /// One client address; IPv4-mapped IPv6 is folded to IPv4, so textual variants are one subject.
    Ip(IpAddr),
    /// Every client IP through one shared baseline class.
    AllShared,
    /// Every live client IP, each with its own class (expanded from live evidence into `Ip`s).
    AllPerIp,
    /// One user (by UUID): the live client IPs attributed to them, all into one class.
    User { uuid: String, ips: BTreeSet<IpAddr> },
    /// One client connection: its address and port.
    Connection(SocketAddr),
    /// One outbound: the socket mark its connections carry, read under `mask` (from the config
    /// and `--mark-mask`).
    Outbound { tag: String, mark: u32, mask: u32 },
    /// One inbound: its listener's port, and address when concrete (from the config).
    Inbound {
        tag: String,
        address: Option<IpAddr>,
        port: u16,
    },
}

impl Subject {
    /// The value as it is reported back (`--ip`, `--uuid` or `--connection`).
    pub fn value(&self) -> String {
        match self {
            Subject::Ip(ip) => ip.to_string(),
            Subject::AllShared | Subject::AllPerIp => "all".into(),
            Subject::User { uuid, .. } => uuid.clone(),
            Subject::Connection(c) => c.to_string(),
            Subject::Inbound { tag, .. } | Subject::Outbound { tag, .. } => tag.clone(),
        }
    }

    /// The family word reports and keys use.
    pub fn kind(&self) -> &'static str {
        match self {
            Subject::Ip(_) | Subject::AllShared | Subject::AllPerIp => "ip",
            Subject::User { .. } => "uuid",
            Subject::Connection(_) => "connection",
            Subject::Inbound { .. } => "inbound",
            Subject::Outbound { .. } => "outbound",
        }
    }

    /// The stable key class minors are derived from: never a PID, never the owner, never the
    /// user's current addresses.
    pub fn key(&self) -> String {
        format!("{} {}", self.kind(), self.value())
    }
}

impl fmt::Display for Subject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.kind(), self.value())
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
pub fn parse_ip_subject(value: &str, per_ip: bool) -> Result<Subject, String> {
    let value = value.trim();
    if value.eq_ignore_ascii_case("all") {
        return Ok(if per_ip {
            Subject::AllPerIp
        } else {
            Subject::AllShared
        });
    }
    let ip: IpAddr = value
        .parse()
        .map_err(|_| format!("--ip {value:?} is neither an IP address nor \"all\""))?;
    Ok(Subject::Ip(canonical_ip(ip)))
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

/// One subject, one direction, one device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub subject: Subject,
    pub direction: Direction,
    pub device: String,
    pub want: Want,
}

impl Request {
    /// True when the rule shapes packets leaving the device (its egress root); false when it
    /// shapes arriving packets on the IFB companion. Client-facing families shape download on
    /// egress; the outbound family faces the remote, so its upload leaves the device.
    pub fn on_egress(&self) -> bool {
        match self.subject {
            Subject::Outbound { .. } => self.direction == Direction::Upload,
            _ => self.direction == Direction::Download,
        }
    }

    /// `Requested limit: download 1000000 bytes/s on eth0` and its kin, without the label.
    pub fn describe(&self) -> String {
        let dir = self.direction.name();
        match self.want {
            Want::Limit(rate) => format!("{dir} {rate} bytes/s on {}", self.device),
            Want::Unlimited => format!("{dir} unlimited exception on {}", self.device),
            Want::Remove => format!("removal of the {dir} rule on {}", self.device),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn textual_variants_of_one_address_are_one_subject() {
        let a = parse_ip_subject("::ffff:10.0.0.1", false).unwrap();
        let b = parse_ip_subject(" 10.0.0.1 ", false).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.value(), "10.0.0.1");
        let c = parse_ip_subject("2001:0DB8:0:0::0010", false).unwrap();
        assert_eq!(c.value(), "2001:db8::10");
        assert_eq!(parse_ip_subject("ALL", false).unwrap(), Subject::AllShared);
        assert_eq!(parse_ip_subject("all", true).unwrap(), Subject::AllPerIp);
        assert!(parse_ip_subject("1.2.3", false).is_err());
        assert!(parse_ip_subject("fe80::1%eth0", false).is_err());
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
        assert_eq!(c.key(), "connection 10.0.0.2:4000");
    }
}

//! The runtime's access log (`log.access`): one line per dispatched connection, the only place
//! V2Ray and older Xray say which user a client connection belongs to.
//!
//! ```text
//! 2026/11/23 00:34:30 10.66.0.2:55207 accepted tcp:10.66.0.1:5201 [direct] email: alice@example.com
//! 2026/11/23 00:34:30.123456 from [2001:db8::2]:41000 accepted tcp:example.com:443 [in >> out] email: bob
//! ```
//!
//! There is no close event, so a line says who opened a connection, never that it is still
//! open: liveness comes from the kernel's socket table, joined on the client address and port.

use std::io::{Read, Seek, SeekFrom};
use std::net::SocketAddr;
use std::path::Path;

use crate::policy::canonical_ip;

/// Only the end of a long log is read: the lines of connections still open are recent, and a
/// busy server's log may be gigabytes.
pub const TAIL_BYTES: u64 = 16 << 20;

/// One accepted connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Date and time as the runtime wrote them.
    pub time: String,
    /// The client's address and port, IPv4-mapped folded to IPv4.
    pub client: SocketAddr,
    pub target: String,
    /// Xray names the inbound (`[in >> out]`); V2Ray only the outbound (`[out]`).
    pub inbound: Option<String>,
    pub outbound: Option<String>,
    pub email: Option<String>,
}

/// Parses one line; anything that is not an accepted connection (rejections, API calls without
/// a client, noise) is `None`.
pub fn parse_line(line: &str) -> Option<Entry> {
    let words: Vec<&str> = line.split_whitespace().collect();
    let at = words.iter().position(|w| *w == "accepted")?;
    if at < 3 {
        return None;
    }
    let source = words[at - 1];
    let source = source
        .strip_prefix("tcp:")
        .or_else(|| source.strip_prefix("udp:"))
        .unwrap_or(source);
    let client: SocketAddr = source.parse().ok()?;
    let client = SocketAddr::new(canonical_ip(client.ip()), client.port());
    let target = words.get(at + 1)?.to_string();
    let rest = words[at + 2..].join(" ");
    let (mut inbound, mut outbound) = (None, None);
    if let Some(route) = rest
        .strip_prefix('[')
        .and_then(|r| r.split_once(']'))
        .map(|(r, _)| r.trim())
    {
        match route.split_once(">>").or_else(|| route.split_once("->")) {
            Some((i, o)) => {
                inbound = Some(i.trim().to_string()).filter(|s| !s.is_empty());
                outbound = Some(o.trim().to_string()).filter(|s| !s.is_empty());
            }
            None => outbound = Some(route.to_string()).filter(|s| !s.is_empty()),
        }
    }
    let email = rest
        .split_once("email: ")
        .map(|(_, e)| e.split_whitespace().next().unwrap_or("").to_string())
        .filter(|e| !e.is_empty());
    Some(Entry {
        time: format!("{} {}", words[0], words[1]),
        client,
        target,
        inbound,
        outbound,
        email,
    })
}

/// The accepted connections in the last `TAIL_BYTES` of the log, oldest first.
pub fn read_tail(path: &Path) -> std::io::Result<Vec<Entry>> {
    let mut f = crate::files::open_regular(path)?;
    let len = f.metadata()?.len();
    let start = len.saturating_sub(TAIL_BYTES);
    f.seek(SeekFrom::Start(start))?;
    // A log still growing is read up to where it was when opened, never further.
    let mut bytes = Vec::with_capacity((len - start) as usize);
    f.take(len - start).read_to_end(&mut bytes)?;
    let text = String::from_utf8_lossy(&bytes);
    let mut lines = text.lines();
    if start > 0 {
        // The first line is cut.
        lines.next();
    }
    Ok(lines.filter_map(parse_line).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v2ray_and_xray_lines() {
        let v = parse_line("2026/11/23 00:34:30 10.66.0.2:55207 accepted tcp:10.66.0.1:5201 [direct] email: alice@example.com").unwrap();
        assert_eq!(v.client.to_string(), "10.66.0.2:55207");
        assert_eq!(v.target, "tcp:10.66.0.1:5201");
        assert_eq!(v.outbound.as_deref(), Some("direct"));
        assert_eq!(v.inbound, None);
        assert_eq!(v.email.as_deref(), Some("alice@example.com"));
        assert_eq!(v.time, "2026/11/23 00:34:30");

        let x = parse_line("2025/01/02 03:04:05.678901 from [::ffff:10.0.0.9]:41000 accepted tcp:example.com:443 [vless-in >> proxy] email: bob").unwrap();
        assert_eq!(x.client.to_string(), "10.0.0.9:41000");
        assert_eq!(x.inbound.as_deref(), Some("vless-in"));
        assert_eq!(x.outbound.as_deref(), Some("proxy"));
        assert_eq!(x.email.as_deref(), Some("bob"));

        let six = parse_line(
            "2025/01/02 03:04:05 from tcp:[2001:db8::2]:5000 accepted udp:1.1.1.1:53 [dns]",
        )
        .unwrap();
        assert_eq!(six.client.to_string(), "[2001:db8::2]:5000");
        assert_eq!(six.email, None);
    }

    #[test]
    fn other_lines_are_ignored() {
        for line in [
            "",
            "2026/11/23 00:34:32 127.0.0.1:51860 rejected tcp:1.2.3.4:80 [blocked]",
            "2026/11/23 [Info] app/proxyman: something accepted",
            "accepted",
            "2026/11/23 00:34:32 not-an-address accepted tcp:1.2.3.4:80",
        ] {
            assert_eq!(parse_line(line), None, "{line}");
        }
    }

    #[test]
    fn only_the_tail_of_a_long_log_is_read() {
        let dir = std::env::temp_dir().join(format!("rl-alog-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("access.log");
        let line = "2026/11/23 00:34:30 10.0.0.2:1000 accepted tcp:10.0.0.1:80 [direct] email: a\n";
        let count = (TAIL_BYTES as usize / line.len()) + 100;
        let mut text = line.repeat(count);
        text.push_str(
            "2026/11/23 00:34:31 10.0.0.3:2000 accepted tcp:10.0.0.1:80 [direct] email: b\n",
        );
        std::fs::write(&path, text).unwrap();
        let entries = read_tail(&path).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(entries.len() < count);
        assert_eq!(entries.last().unwrap().email.as_deref(), Some("b"));
        assert!(entries
            .iter()
            .all(|e| e.client.port() == 1000 || e.client.port() == 2000));
    }
}

//! Live sockets over sock_diag (inet_diag): which TCP/UDP sockets exist in a network namespace,
//! with their addresses, owner uid and inode, read from the kernel the way `ss` reads them.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use netlink_packet_core::{NLM_F_DUMP, NLM_F_REQUEST};
use netlink_sys::protocols::NETLINK_SOCK_DIAG;

use super::error::{DecodeError, NetlinkError};
use super::socket::{in_netns_at, RtSocket};
use crate::model::attr::StructReader;

/// The message type of inet_diag_req_v2 requests and of their replies.
pub const SOCK_DIAG_BY_FAMILY: u16 = 20;
/// `idiag_state` of a connected socket (TCP, or a UDP socket after `connect`).
pub const TCP_ESTABLISHED: u8 = 1;
/// `idiag_state` of an unconnected UDP socket.
pub const TCP_CLOSE: u8 = 7;
pub const TCP_LISTEN: u8 = 10;
/// nlmsghdr (16) and `struct inet_diag_req_v2`: family, protocol, ext, pad, states, 48-byte sockid.
const REQUEST_LEN: usize = 72;
/// `struct inet_diag_msg`: 4 bytes of family/state/timer/retrans, the 48-byte sockid, 5 u32s.
const MSG_LEN: usize = 72;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Transport {
    Tcp,
    Udp,
}

impl Transport {
    fn protocol(self) -> u8 {
        match self {
            Transport::Tcp => libc::IPPROTO_TCP as u8,
            Transport::Udp => libc::IPPROTO_UDP as u8,
        }
    }
}

/// The `idiag_states` bitmask for a list of states (`1 << state` each).
pub const fn state_mask(states: &[u8]) -> u32 {
    let mut mask = 0;
    let mut i = 0;
    while i < states.len() {
        mask |= 1 << states[i];
        i += 1;
    }
    mask
}

/// One socket as the kernel reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InetSocket {
    pub transport: Transport,
    pub state: u8,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    /// The inode behind `socket:[N]` in a process's fd table (0 for TIME_WAIT and request socks).
    pub inode: u64,
    pub uid: u32,
    /// The kernel's socket cookie (`ss -e` shows it as `sk:`).
    pub cookie: u64,
}

/// A NETLINK_SOCK_DIAG socket in the netns at `netns_path` (e.g. "/proc/1234/ns/net" or
/// "/run/netns/x"), or the current one when None. The kernel answers from the namespace the
/// socket was created in, so entering the namespace only for the `socket()` call is enough.
pub fn open(netns_path: Option<&str>) -> Result<RtSocket, NetlinkError> {
    let open = || RtSocket::open_protocol(NETLINK_SOCK_DIAG);
    match netns_path {
        None => open(),
        Some(path) => in_netns_at(path, path, open),
    }
}

/// Every socket of the transport in the given states (bitmask 1<<state), both AF_INET and
/// AF_INET6.
pub fn dump(
    sock: &mut RtSocket,
    transport: Transport,
    states: u32,
) -> Result<Vec<InetSocket>, NetlinkError> {
    let mut out = Vec::new();
    for family in [libc::AF_INET as u8, libc::AF_INET6 as u8] {
        let operation = format!("sock_diag dump of {transport:?} sockets (family {family})");
        for message in sock.dump(&request(family, transport, states), &operation)? {
            if message.msg_type == SOCK_DIAG_BY_FAMILY {
                // The kernel answers with sockets of the protocol asked for only.
                out.push(InetSocket {
                    transport,
                    ..decode(&message.payload)?
                });
            }
        }
    }
    Ok(out)
}

/// Pure: the SOCK_DIAG_BY_FAMILY dump request (inet_diag_req_v2) for one family
/// (libc::AF_INET/AF_INET6). No extensions are asked for and the socket id is left empty, so
/// every socket of the family, protocol and states is returned.
pub fn request(family: u8, transport: Transport, states: u32) -> Vec<u8> {
    let mut msg = Vec::with_capacity(REQUEST_LEN);
    msg.extend_from_slice(&(REQUEST_LEN as u32).to_ne_bytes());
    msg.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    msg.extend_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    msg.extend_from_slice(&[0; 8]); // sequence number (set by RtSocket) and port id
    msg.extend_from_slice(&[family, transport.protocol(), 0, 0]); // ext 0 and padding
    msg.extend_from_slice(&states.to_ne_bytes());
    msg.extend_from_slice(&[0; 48]); // inet_diag_sockid: any ports, addresses, device, cookie
    msg
}

/// Pure: decode one inet_diag_msg payload (bounds-checked, DecodeError on short/garbled input,
/// never panics). The reply does not name its protocol (the request did, and the kernel adds no
/// INET_DIAG_PROTOCOL attribute for TCP or UDP), so `transport` is Tcp here and [`dump`] sets it
/// from the request. Attributes after the fixed part are not needed and not read.
pub fn decode(payload: &[u8]) -> Result<InetSocket, DecodeError> {
    let r = StructReader::new(payload, MSG_LEN, "inet_diag_msg")?;
    let family = r.u8(0);
    let ip = |at: usize| -> Result<IpAddr, DecodeError> {
        // Addresses are in network order; an AF_INET one fills the first 4 of 16 bytes.
        let word = |i: usize| r.u32_be(at + 4 * i) as u128;
        match i32::from(family) {
            libc::AF_INET => Ok(Ipv4Addr::from(r.u32_be(at)).into()),
            libc::AF_INET6 => {
                Ok(Ipv6Addr::from(word(0) << 96 | word(1) << 64 | word(2) << 32 | word(3)).into())
            }
            _ => Err(DecodeError::new(format!(
                "inet_diag_msg of address family {family}"
            ))),
        }
    };
    Ok(InetSocket {
        transport: Transport::Tcp,
        state: r.u8(1),
        local: SocketAddr::new(ip(8)?, r.u16_be(4)),
        remote: SocketAddr::new(ip(24)?, r.u16_be(6)),
        inode: u64::from(r.u32(68)),
        uid: r.u32(64),
        // Two host-order u32s, low word first (as `ss` joins them for `sk:`).
        cookie: u64::from(r.u32(44)) | u64::from(r.u32(48)) << 32,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The `request:` line of a captured fixture (see netlink-fixtures/README.md).
    fn fixture_request(name: &str) -> Vec<u8> {
        let path = format!(
            "{}/netlink-fixtures/{name}.fixture",
            env!("CARGO_MANIFEST_DIR")
        );
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        let line = text
            .lines()
            .find_map(|l| l.strip_prefix("request: "))
            .expect("request line");
        (0..line.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&line[i..i + 2], 16).unwrap())
            .collect()
    }

    #[test]
    fn requests_match_what_ss_sends() {
        let established = state_mask(&[TCP_ESTABLISHED]);
        for (name, family) in [
            ("sock_diag_tcp4_established", libc::AF_INET),
            ("sock_diag_tcp6_established", libc::AF_INET6),
        ] {
            let ours = request(family as u8, Transport::Tcp, established);
            assert_eq!(ours, fixture_request(name), "{name}");
        }
    }

    #[test]
    fn state_masks() {
        assert_eq!(state_mask(&[]), 0);
        assert_eq!(state_mask(&[TCP_ESTABLISHED]), 0x2);
        assert_eq!(state_mask(&[TCP_ESTABLISHED, TCP_LISTEN]), 0x402);
    }

    /// An inet_diag_msg as the kernel lays it out, with the attributes it adds to every TCP reply.
    fn message(family: u8, src: &[u8], dst: &[u8]) -> Vec<u8> {
        let mut m = vec![family, TCP_ESTABLISHED, 0, 0];
        m.extend_from_slice(&443u16.to_be_bytes());
        m.extend_from_slice(&50000u16.to_be_bytes());
        for addr in [src, dst] {
            let mut a = [0u8; 16];
            a[..addr.len()].copy_from_slice(addr);
            m.extend_from_slice(&a);
        }
        m.extend_from_slice(&0u32.to_ne_bytes()); // idiag_if
        m.extend_from_slice(&0x10c9u32.to_ne_bytes()); // cookie, low word
        m.extend_from_slice(&0x2u32.to_ne_bytes()); // cookie, high word
        m.extend_from_slice(&[0; 12]); // expires, rqueue, wqueue
        m.extend_from_slice(&1000u32.to_ne_bytes()); // uid
        m.extend_from_slice(&316388u32.to_ne_bytes()); // inode
        m.extend_from_slice(&[5, 0, 8, 0, 0, 0, 0, 0]); // INET_DIAG_SHUTDOWN 0, padded
        m
    }

    #[test]
    fn decodes_a_hand_built_ipv4_message() {
        let m = message(libc::AF_INET as u8, &[10, 0, 0, 1], &[192, 0, 2, 7]);
        assert_eq!(
            decode(&m).unwrap(),
            InetSocket {
                transport: Transport::Tcp,
                state: TCP_ESTABLISHED,
                local: "10.0.0.1:443".parse().unwrap(),
                remote: "192.0.2.7:50000".parse().unwrap(),
                inode: 316388,
                uid: 1000,
                cookie: 0x2_0000_10c9,
            }
        );
    }

    #[test]
    fn a_v4_mapped_peer_of_an_ipv6_socket_stays_ipv6() {
        let local = "2001:db8::1".parse::<Ipv6Addr>().unwrap().octets();
        let remote = "::ffff:192.0.2.7".parse::<Ipv6Addr>().unwrap().octets();
        let s = decode(&message(libc::AF_INET6 as u8, &local, &remote)).unwrap();
        assert_eq!(s.local, "[2001:db8::1]:443".parse().unwrap());
        assert_eq!(s.remote, "[::ffff:192.0.2.7]:50000".parse().unwrap());
    }

    #[test]
    fn short_or_garbled_input_is_an_error() {
        let m = message(libc::AF_INET as u8, &[10, 0, 0, 1], &[10, 0, 0, 2]);
        for len in 0..MSG_LEN {
            assert!(decode(&m[..len]).is_err(), "{len} bytes");
        }
        // The fixed part alone (no attributes) is a whole message.
        assert!(decode(&m[..MSG_LEN]).is_ok());
        let mut bad_family = m.clone();
        bad_family[0] = 1; // AF_UNIX
        assert!(decode(&bad_family).is_err());
    }
}

//! Links: the ifindex of a device by name, and the IFB companion devices raylimit creates, sets up
//! and deletes. Messages are built with rtnetlink's link builders and sent on [`RtSocket`].

use netlink_packet_core::Parseable;
use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL,
    NLM_F_REQUEST,
};
use netlink_packet_route::link::{LinkAttribute, LinkFlags, LinkInfo, LinkMessage};
use netlink_packet_route::RouteNetlinkMessage;
use rtnetlink::LinkUnspec;

use super::error::NetlinkError;
use super::socket::RtSocket;
use crate::model::attr::AttrWriter;
use crate::model::device::is_device_name;
use crate::model::Link;

const RTM_NEWLINK: u16 = 16;
fn serialize(message: RouteNetlinkMessage, flags: u16) -> Vec<u8> {
    let mut header = NetlinkHeader::default();
    header.flags = flags;
    let mut msg = NetlinkMessage::new(header, NetlinkPayload::from(message));
    msg.finalize();
    let mut buf = vec![0u8; msg.buffer_len()];
    msg.serialize(&mut buf);
    buf
}

/// Checks a device name the way the kernel will, so a bad name fails before any request.
pub fn check_name(name: &str) -> Result<(), NetlinkError> {
    match is_device_name(name) {
        true => Ok(()),
        false => Err(NetlinkError::NoSuchDevice(name.to_string())),
    }
}

fn decode_link(payload: &[u8]) -> Result<Link, NetlinkError> {
    let msg = LinkMessage::parse(payload)
        .map_err(|e| NetlinkError::Protocol(format!("link message: {e}")))?;
    let mut link = Link {
        index: msg.header.index,
        name: String::new(),
        kind: None,
        up: msg.header.flags.contains(LinkFlags::Up),
        mtu: 0,
    };
    for attr in msg.attributes {
        match attr {
            LinkAttribute::IfName(n) => link.name = n,
            LinkAttribute::Mtu(m) => link.mtu = m,
            LinkAttribute::LinkInfo(infos) => {
                for info in infos {
                    if let LinkInfo::Kind(k) = info {
                        link.kind = Some(k.to_string());
                    }
                }
            }
            _ => {}
        }
    }
    Ok(link)
}

impl RtSocket {
    /// The link called `name`, or `NoSuchDevice`.
    pub fn link_by_name(&mut self, name: &str) -> Result<Link, NetlinkError> {
        check_name(name)?;
        let request = serialize(
            RouteNetlinkMessage::GetLink(LinkUnspec::new_with_name(name).build()),
            NLM_F_REQUEST | NLM_F_ACK,
        );
        // A GETLINK by name answers with one NEWLINK message, then the requested ack (or ENODEV).
        match self.dump(&request, &format!("look up device {name}")) {
            Ok(messages) => messages
                .iter()
                .find(|m| m.msg_type == RTM_NEWLINK)
                .map(|m| decode_link(&m.payload))
                .unwrap_or_else(|| Err(NetlinkError::NoSuchDevice(name.to_string()))),
            Err(e) if e.kernel().is_some_and(|k| k.errno == libc::ENODEV) => {
                Err(NetlinkError::NoSuchDevice(name.to_string()))
            }
            Err(e) => Err(e),
        }
    }

    /// Every link in this socket's namespace.
    pub fn links(&mut self) -> Result<Vec<Link>, NetlinkError> {
        let request = serialize(
            RouteNetlinkMessage::GetLink(LinkMessage::default()),
            NLM_F_REQUEST | NLM_F_DUMP,
        );
        self.dump(&request, "list devices")?
            .iter()
            .filter(|m| m.msg_type == RTM_NEWLINK)
            .map(|m| decode_link(&m.payload))
            .collect()
    }

    /// Creates an IFB device; fails if the name is taken.
    pub fn create_ifb(&mut self, name: &str) -> Result<Link, NetlinkError> {
        check_name(name)?;
        self.request(ifb_create_request(name), &format!("create IFB {name}"))?;
        self.link_by_name(name)
    }

    pub fn set_link_up(&mut self, index: u32) -> Result<(), NetlinkError> {
        self.request(link_up_request(index), &format!("set device {index} up"))?;
        Ok(())
    }

    pub fn delete_link(&mut self, index: u32) -> Result<(), NetlinkError> {
        self.request(
            link_delete_request(index),
            &format!("delete device {index}"),
        )?;
        Ok(())
    }
}

/// `ip link add NAME type ifb`. Built by hand rather than with rtnetlink's builder so that it is
/// byte-identical to iproute2's (which sends the kind without a trailing NUL).
pub fn ifb_create_request(name: &str) -> Vec<u8> {
    const IFLA_IFNAME: u16 = 3;
    const IFLA_LINKINFO: u16 = 18;
    const IFLA_INFO_KIND: u16 = 1;
    let mut w = AttrWriter::new();
    w.raw(&[0u8; 16]).raw(&[0u8; 16]); // nlmsghdr, ifinfomsg
    w.put_str(IFLA_IFNAME, name);
    w.nested(IFLA_LINKINFO, false, |w| {
        w.put(IFLA_INFO_KIND, b"ifb");
    });
    let mut msg = w.into_bytes();
    let len = msg.len() as u32;
    msg[0..4].copy_from_slice(&len.to_ne_bytes());
    msg[4..6].copy_from_slice(&RTM_NEWLINK.to_ne_bytes());
    msg[6..8]
        .copy_from_slice(&(NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL).to_ne_bytes());
    msg
}

/// `ip link set dev INDEX up`.
pub fn link_up_request(index: u32) -> Vec<u8> {
    serialize(
        RouteNetlinkMessage::NewLink(LinkUnspec::new_with_index(index).up().build()),
        NLM_F_REQUEST | NLM_F_ACK,
    )
}

/// `ip link del dev INDEX`.
pub fn link_delete_request(index: u32) -> Vec<u8> {
    serialize(
        RouteNetlinkMessage::DelLink(LinkUnspec::new_with_index(index).build()),
        NLM_F_REQUEST | NLM_F_ACK,
    )
}

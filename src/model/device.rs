//! A network device as raylimit knows it, and everything tc holds for one: plain values, read by
//! the netlink layer and interpreted by the reconciler.

use super::tc::{ClassEntry, FilterEntry, QdiscEntry, TcEntry};

/// Longest interface name the kernel accepts (IFNAMSIZ - 1).
pub const MAX_IFNAME_LEN: usize = 15;

/// Whether the kernel would accept `name` as a device name.
pub fn is_device_name(name: &str) -> bool {
    !(name.is_empty()
        || name.len() > MAX_IFNAME_LEN
        || name.contains(['/', ' ', ':'])
        || name == "."
        || name == "..")
}

/// What raylimit needs to know about a link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    /// `ifb`, `veth`, ... when the link has a kind.
    pub kind: Option<String>,
    pub up: bool,
    /// Largest packet the link sends, without its link-layer header.
    pub mtu: u32,
}

/// A device's qdiscs, classes and filters, decoded.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceTc {
    pub ifindex: u32,
    pub qdiscs: Vec<QdiscEntry>,
    pub classes: Vec<ClassEntry>,
    pub filters: Vec<FilterEntry>,
}

impl DeviceTc {
    /// All objects in dump order: qdiscs, classes, filters.
    pub fn entries(&self) -> Vec<TcEntry> {
        let q = self.qdiscs.iter().cloned().map(TcEntry::Qdisc);
        let c = self.classes.iter().cloned().map(TcEntry::Class);
        let f = self.filters.iter().cloned().map(TcEntry::Filter);
        q.chain(c).chain(f).collect()
    }
}

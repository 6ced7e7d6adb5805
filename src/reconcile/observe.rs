//! Observed state: a device's decoded tc objects interpreted as raylimit's layout, so that they
//! compare with what a request wants. Pure: the dumps are read elsewhere.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use crate::netlink::action::{Action, MirredMode};
use crate::netlink::dump::DeviceTc;
use crate::netlink::link::Link;
use crate::netlink::tc::{ClassEntry, Filter, FilterEntry, FilterKind, QdiscEntry, QdiscKind};
use crate::netlink::u32::{End, Family};
use crate::netlink::{TcHandle, U32Handle};
use crate::shaping::{
    self, Band, ClientMatch, ListenerMatch, BAND_CONNECTION, BAND_INBOUND, BAND_IP_BASELINE,
    PRIO_REDIRECT, ROOT_MAJOR,
};

/// What sits on a device's egress root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RootState {
    /// Nothing, or the kernel's own default (handle 0:, e.g. noqueue, mq, fq_codel).
    Default(Option<String>),
    /// raylimit's HTB root.
    Managed(QdiscEntry),
    /// Someone else's root qdisc: never replaced.
    Foreign(String),
}

/// One client node of a client band (connection, uuid, specific ip).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub band: Band,
    pub matched: ClientMatch,
    pub entry: FilterEntry,
    pub classid: Option<TcHandle>,
}

impl Node {
    pub fn handle(&self) -> U32Handle {
        U32Handle(self.entry.filter.handle)
    }
}

/// One listener node of the inbound band.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerNode {
    pub matched: ListenerMatch,
    pub entry: FilterEntry,
    pub classid: Option<TcHandle>,
}

/// A shaped root (a device's egress) read as raylimit's layout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShapedRoot {
    pub ifindex: u32,
    pub root: RootState,
    /// Leaf classes under the managed root, by minor.
    pub classes: BTreeMap<u16, ClassEntry>,
    /// Client nodes of every band.
    pub nodes: Vec<Node>,
    /// Listener nodes of the inbound band.
    pub listeners: Vec<ListenerNode>,
    /// Client band priorities whose address table exists.
    pub tables: BTreeSet<u16>,
    /// Client band priorities whose link node exists, with it.
    pub links: BTreeMap<u16, FilterEntry>,
    pub baseline: Option<FilterEntry>,
    /// Filters under the managed root that are not raylimit's layout.
    pub unrecognised: Vec<FilterEntry>,
}

impl ShapedRoot {
    /// Interprets one device's objects; `end` says where the client address is on this root.
    pub fn read(tc: &DeviceTc, end: End) -> Self {
        let mut s = ShapedRoot {
            ifindex: tc.ifindex,
            root: RootState::Default(None),
            classes: BTreeMap::new(),
            nodes: Vec::new(),
            listeners: Vec::new(),
            tables: BTreeSet::new(),
            links: BTreeMap::new(),
            baseline: None,
            unrecognised: Vec::new(),
        };
        if let Some(q) = tc.qdiscs.iter().find(|q| q.qdisc.parent == TcHandle::ROOT) {
            s.root = if q.qdisc.handle == shaping::root_handle()
                && matches!(q.qdisc.kind, QdiscKind::Htb(_))
            {
                RootState::Managed(q.clone())
            } else if q.qdisc.handle.major() == 0 {
                RootState::Default(Some(q.qdisc.kind_name().to_string()))
            } else {
                RootState::Foreign(format!("{} {}", q.qdisc.kind_name(), q.qdisc.handle))
            };
        }
        if !matches!(s.root, RootState::Managed(_)) {
            return s;
        }
        for c in &tc.classes {
            if c.class.handle.major() == ROOT_MAJOR {
                s.classes.insert(c.class.handle.minor(), c.clone());
            }
        }
        for f in &tc.filters {
            // Each priority is also dumped once as a bare header (handle 0, no options).
            if f.filter.parent != shaping::root_handle() || f.filter.handle == 0 {
                continue;
            }
            if !s.recognise(f, end) {
                s.unrecognised.push(f.clone());
            }
        }
        s
    }

    fn recognise(&mut self, f: &FilterEntry, end: End) -> bool {
        let prio = f.filter.priority;
        // The root table the kernel makes for every u32 priority is part of the layout.
        if let FilterKind::U32(u) = &f.filter.kind {
            if u.divisor.is_some() && U32Handle(f.filter.handle).table() >= U32Handle::ROOT_TABLE {
                return (BAND_CONNECTION..=BAND_INBOUND + 1).contains(&prio);
            }
        }
        if prio == BAND_IP_BASELINE {
            if classid_of(&f.filter).is_none() {
                return false;
            }
            self.baseline = Some(f.clone());
            return true;
        }
        if let (Some(family), FilterKind::U32(u)) = (
            [Family::V4, Family::V6]
                .into_iter()
                .find(|f| shaping::inbound_priority(*f) == prio),
            &f.filter.kind,
        ) {
            let end = match end {
                End::Source => End::Destination,
                End::Destination => End::Source,
            };
            return match shaping::listener_match(u, family, end) {
                Some(matched) => {
                    self.listeners.push(ListenerNode {
                        matched,
                        entry: f.clone(),
                        classid: u.classid,
                    });
                    true
                }
                None => false,
            };
        }
        let Some((band, family)) = Band::of_priority(prio) else {
            return false;
        };
        let FilterKind::U32(u) = &f.filter.kind else {
            return false;
        };
        let handle = U32Handle(f.filter.handle);
        let table = shaping::table_of_priority(prio);
        if u.divisor.is_some() {
            if handle == table {
                self.tables.insert(prio);
            }
            return handle == table;
        }
        if handle.table() == table.table() {
            if let Some(matched) = shaping::node_match(u, family, end, band.has_port()) {
                self.nodes.push(Node {
                    band,
                    matched,
                    entry: f.clone(),
                    classid: u.classid,
                });
                return true;
            }
            return false;
        }
        if u.link == Some(table) {
            self.links.insert(prio, f.clone());
            return true;
        }
        false
    }

    pub fn is_managed(&self) -> bool {
        matches!(self.root, RootState::Managed(_))
    }

    pub fn node_for(&self, band: Band, matched: ClientMatch) -> Option<&Node> {
        self.nodes
            .iter()
            .find(|n| n.band == band && n.matched == matched)
    }

    /// The specific-IP node of an address.
    pub fn ip_node(&self, ip: IpAddr) -> Option<&Node> {
        self.node_for(Band::Ip, ClientMatch::ip(ip))
    }

    /// Node ids in use in one bucket of a band's table.
    pub fn nodes_in_bucket(&self, prio: u16, bucket: u32) -> BTreeSet<u32> {
        self.nodes
            .iter()
            .filter(|n| n.entry.filter.priority == prio && n.handle().bucket() == bucket)
            .map(|n| n.handle().node())
            .collect()
    }

    /// Unrecognised filters inside raylimit's own priority bands: they make the state not
    /// comparable.
    pub fn foreign_in_bands(&self) -> Vec<&FilterEntry> {
        self.unrecognised
            .iter()
            .filter(|f| (100..700).contains(&f.filter.priority))
            .collect()
    }
}

/// The class a filter sends packets to, if it is a classifying filter.
pub fn classid_of(f: &Filter) -> Option<TcHandle> {
    match &f.kind {
        FilterKind::U32(u) => u.classid,
        FilterKind::MatchAll(m) => m.classid,
        FilterKind::Fw(fw) => fw.classid,
        FilterKind::Other { .. } => None,
    }
}

/// The ingress hook of a device, for upload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hook {
    /// `Some(parent)` when a clsact (ffff:fff2) or ingress (ffff:) qdisc exists.
    pub parent: Option<TcHandle>,
    pub clsact: bool,
    /// raylimit's redirect, with the IFB it sends to.
    pub redirect: Option<(FilterEntry, u32)>,
    /// Something else at raylimit's redirect priority.
    pub conflicting: Option<FilterEntry>,
    /// Other filters on the hook (another tool's): the hook stays while they exist.
    pub others: usize,
}

impl Hook {
    pub fn read(tc: &DeviceTc) -> Self {
        let mut h = Hook {
            parent: None,
            clsact: false,
            redirect: None,
            conflicting: None,
            others: 0,
        };
        for q in &tc.qdiscs {
            match q.qdisc.kind {
                QdiscKind::Clsact => {
                    h.parent = Some(TcHandle::CLSACT_INGRESS);
                    h.clsact = true;
                }
                QdiscKind::Ingress => h.parent = Some(TcHandle::INGRESS_QDISC),
                _ => {}
            }
        }
        let Some(parent) = h.parent else {
            return h;
        };
        for f in tc
            .filters
            .iter()
            .filter(|f| f.filter.parent == parent && f.filter.handle != 0)
        {
            if f.filter.priority != PRIO_REDIRECT {
                h.others += 1;
                continue;
            }
            match redirect_target(f) {
                Some(ifb) => h.redirect = Some((f.clone(), ifb)),
                // A u32 priority has table entries besides the node; only a foreign node counts.
                None if is_u32_table(f) => {}
                None => h.conflicting = Some(f.clone()),
            }
        }
        h
    }
}

fn is_u32_table(f: &FilterEntry) -> bool {
    matches!(&f.filter.kind, FilterKind::U32(u) if u.divisor.is_some())
}

/// The device a redirect filter hands packets to.
pub fn redirect_target(f: &FilterEntry) -> Option<u32> {
    let actions = match &f.filter.kind {
        FilterKind::U32(u) => &u.actions,
        FilterKind::MatchAll(m) => &m.actions,
        _ => return None,
    };
    actions.iter().find_map(|a| match a {
        Action::Mirred {
            mode: MirredMode::EgressRedirect,
            ifindex,
            ..
        } => Some(*ifindex),
        _ => None,
    })
}

/// Everything a request is decided on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observation {
    pub device: Link,
    /// The shaped root (the device for download, the IFB for upload); `None` when the IFB is absent.
    pub shaped: Option<ShapedRoot>,
    /// Upload only: the IFB companion, if it exists.
    pub ifb: Option<Link>,
    /// Upload only: the device's ingress hook.
    pub hook: Option<Hook>,
    /// Why the tc state could not be read, when it could not (the rest is then empty).
    pub error: Option<String>,
    /// raylimit's nft table, when the request needs it (or why it could not be read).
    pub nft: Option<Result<crate::netlink::nft::NftState, String>>,
}

impl ShapedRoot {
    /// An empty root on `ifindex`: what a device without raylimit's objects reads as.
    pub fn empty(ifindex: u32, end: End) -> Self {
        ShapedRoot::read(
            &DeviceTc {
                ifindex,
                ..Default::default()
            },
            end,
        )
    }

    /// Records a filter this run created or replaced, read exactly as a dump would read it.
    pub fn absorb_filter(&mut self, f: &Filter, end: End) {
        self.forget_filter(f.priority, f.handle);
        let entry = FilterEntry {
            filter: f.clone(),
            chain: None,
        };
        if !self.recognise(&entry, end) {
            self.unrecognised.push(entry);
        }
    }

    /// Drops what is recorded at `priority` and `handle`; handle 0 is the whole priority.
    pub fn forget_filter(&mut self, priority: u16, handle: u32) {
        let gone = |f: &Filter| f.priority == priority && (handle == 0 || f.handle == handle);
        self.nodes.retain(|n| !gone(&n.entry.filter));
        self.listeners.retain(|n| !gone(&n.entry.filter));
        self.unrecognised.retain(|e| !gone(&e.filter));
        self.links
            .retain(|p, e| !(*p == priority && gone(&e.filter)));
        if handle == 0 || shaping::table_of_priority(priority).0 == handle {
            self.tables.remove(&priority);
        }
        if self.baseline.as_ref().is_some_and(|b| gone(&b.filter)) {
            self.baseline = None;
        }
    }
}

//! Observed state: a device's decoded tc objects interpreted as raylimit's layout, so that they
//! compare with what a request wants. Pure: the dumps are read elsewhere.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use crate::model::action::{Action, MirredMode};
use crate::model::tc::{ClassEntry, Filter, FilterEntry, FilterKind, Qdisc, QdiscEntry, QdiscKind};
use crate::model::u32::{End, Family};
use crate::model::DeviceTc;
use crate::model::Link;
use crate::model::{TcHandle, U32Handle};
use crate::shaping::{
    self, Band, ClientMatch, ListenerBand, ListenerMatch, BAND_CONNECTION, BAND_INBOUND,
    BAND_IP_BASELINE, BAND_OUTBOUND, PRIO_REDIRECT, ROOT_MAJOR,
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

/// One listener node: of the inbound band, or of the runtime-scoped baseline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerNode {
    pub band: ListenerBand,
    pub matched: ListenerMatch,
    pub entry: FilterEntry,
    pub classid: Option<TcHandle>,
}

/// Where a filter sits on a shaped root: its priority and handle.
pub type FilterKey = (u16, u32);

/// A shaped root (a device's egress) read as raylimit's layout.
///
/// Client nodes are kept in ordered maps with indexes by what they match and by class, so every
/// lookup a decision makes costs O(log N) (or the few nodes of one bucket), and deciding for
/// thousands of subjects against one observation stays fast.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShapedRoot {
    pub ifindex: u32,
    pub root: RootState,
    /// Leaf classes under the managed root, by minor.
    pub classes: BTreeMap<u16, ClassEntry>,
    /// The qdisc under each class that has one other than HTB's default FIFO, by class minor.
    pub leaves: BTreeMap<u16, Qdisc>,
    /// Client nodes of every band.
    nodes: BTreeMap<FilterKey, Node>,
    /// The same nodes by (band, what they match).
    by_match: BTreeSet<(Band, ClientMatch, FilterKey)>,
    /// The same nodes by (band, the class they send to).
    by_class: BTreeSet<(Band, Option<TcHandle>, FilterKey)>,
    /// How many client nodes match each runtime listener (`None`: device-wide nodes).
    listener_uses: BTreeMap<Option<ListenerMatch>, usize>,
    /// Listener nodes of the inbound band and of the runtime-scoped baseline.
    pub listeners: Vec<ListenerNode>,
    /// The root table the kernel made for each u32 priority of raylimit's bands.
    pub root_tables: BTreeMap<u16, u32>,
    /// Client band priorities whose first-level table exists.
    pub tables: BTreeSet<u16>,
    /// Client band priorities whose root link (into the first-level table) exists, with it.
    pub links: BTreeMap<u16, FilterEntry>,
    /// Second-level tables that exist: (priority, first-level bucket).
    pub bucket_tables: BTreeSet<(u16, u32)>,
    /// The first-level link node into each second-level table: (priority, bucket) -> it.
    pub bucket_links: BTreeMap<(u16, u32), FilterEntry>,
    pub baseline: Option<FilterEntry>,
    /// Outbound classifiers (fw) of the outbound band, by the mark they match.
    pub marks: BTreeMap<u32, FilterEntry>,
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
            leaves: BTreeMap::new(),
            nodes: BTreeMap::new(),
            by_match: BTreeSet::new(),
            by_class: BTreeSet::new(),
            listener_uses: BTreeMap::new(),
            listeners: Vec::new(),
            root_tables: BTreeMap::new(),
            tables: BTreeSet::new(),
            links: BTreeMap::new(),
            bucket_tables: BTreeSet::new(),
            bucket_links: BTreeMap::new(),
            baseline: None,
            marks: BTreeMap::new(),
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
        for q in &tc.qdiscs {
            if q.qdisc.parent.major() == ROOT_MAJOR && q.qdisc.parent.minor() != 0 {
                let minor = q.qdisc.parent.minor();
                if let Some(c) = s.classes.get_mut(&minor) {
                    c.stats.drops = with_leaf_drops(c.stats.drops, q.stats.drops);
                }
                s.leaves.insert(minor, q.qdisc.clone());
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

    /// Records a filter this run created or replaced under the managed root, classified as
    /// `read` would classify the kernel's dump of it, in place of whatever was recorded at its
    /// priority and handle. A node created without a table (a root link) lands in the priority's
    /// root table; when that table has not been seen yet its id is unknown and the node keeps
    /// table 0 until the next read.
    pub fn absorb_filter(&mut self, f: &Filter, end: End) {
        let mut filter = f.clone();
        filter.ifindex = self.ifindex;
        let handle = U32Handle(filter.handle);
        if let (FilterKind::U32(u), Some(root)) =
            (&mut filter.kind, self.root_tables.get(&filter.priority))
        {
            if handle.table() == 0 && !handle.is_table() {
                filter.handle = U32Handle::new(*root, 0, handle.node()).0;
                u.hash = Some(U32Handle::new(*root, 0, 0));
            }
        }
        let entry = FilterEntry {
            filter: filter.canonical(),
            chain: Some(0),
        };
        let key = (entry.filter.priority, entry.filter.handle);
        self.forget_span(key.0, key.1..=key.1);
        if !self.recognise(&entry, end) {
            self.unrecognised.push(entry);
        }
    }

    /// Drops what is recorded at `priority` and `handle`, the way the kernel deletes it: handle 0
    /// is the whole priority (its tables, links and nodes), a table's handle is the table with
    /// every node in it, any other handle one node.
    pub fn forget_filter(&mut self, priority: u16, handle: u32) {
        let h = U32Handle(handle);
        let span = match (handle, h.is_table()) {
            (0, _) => 0..=u32::MAX,
            (_, true) => {
                let first = U32Handle::new(h.table(), 0, 0).0;
                first..=first | 0x000f_ffff
            }
            (_, false) => handle..=handle,
        };
        self.forget_span(priority, span);
    }

    /// Drops everything at `priority` whose handle lies in `span`.
    fn forget_span(&mut self, priority: u16, span: std::ops::RangeInclusive<u32>) {
        let keys: Vec<FilterKey> = self
            .nodes
            .range((priority, *span.start())..=(priority, *span.end()))
            .map(|(k, _)| *k)
            .collect();
        for k in keys {
            self.remove_node(k);
        }
        let at = |e: &FilterEntry| e.filter.priority == priority && span.contains(&e.filter.handle);
        let table_in = |t: U32Handle| span.contains(&t.0);
        if let Some((band, family)) = Band::of_priority(priority) {
            if table_in(shaping::first_level_table(band, family)) {
                self.tables.remove(&priority);
            }
            self.bucket_tables.retain(|(p, b)| {
                *p != priority || !table_in(shaping::second_level_table(band, family, *b))
            });
        }
        if let Some(root) = self.root_tables.get(&priority) {
            if table_in(U32Handle::new(*root, 0, 0)) {
                self.root_tables.remove(&priority);
            }
        }
        self.links.retain(|_, e| !at(e));
        self.bucket_links.retain(|_, e| !at(e));
        self.listeners.retain(|n| !at(&n.entry));
        self.marks.retain(|_, e| !at(e));
        self.unrecognised.retain(|e| !at(e));
        if self.baseline.as_ref().is_some_and(at) {
            self.baseline = None;
        }
    }

    fn recognise(&mut self, f: &FilterEntry, end: End) -> bool {
        let prio = f.filter.priority;
        let handle = U32Handle(f.filter.handle);
        // The root table the kernel makes for every u32 priority is part of the layout.
        if let FilterKind::U32(u) = &f.filter.kind {
            if u.divisor.is_some() && handle.table() >= U32Handle::ROOT_TABLE {
                if !(BAND_CONNECTION..=BAND_INBOUND + 1).contains(&prio) {
                    return false;
                }
                self.root_tables.insert(prio, handle.table());
                return true;
            }
        }
        if prio == BAND_OUTBOUND {
            if !matches!(&f.filter.kind, FilterKind::Fw(fw) if fw.classid.is_some()) {
                return false;
            }
            self.marks.insert(f.filter.handle, f.clone());
            return true;
        }
        // The device-wide baseline: one catch-all for every protocol.
        if prio == BAND_IP_BASELINE && f.filter.protocol == crate::model::tc::ETH_P_ALL {
            if classid_of(&f.filter).is_none() {
                return false;
            }
            self.baseline = Some(f.clone());
            return true;
        }
        if let (Some((band, family)), FilterKind::U32(u)) =
            (ListenerBand::of(prio, f.filter.protocol), &f.filter.kind)
        {
            let end = match end {
                End::Source => End::Destination,
                End::Destination => End::Source,
            };
            return match shaping::listener_match(u, family, end) {
                Some(matched) => {
                    self.listeners.push(ListenerNode {
                        band,
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
        let first = shaping::first_level_table(band, family);
        if u.divisor.is_some() {
            if u.divisor != Some(shaping::ADDRESS_BUCKETS) {
                return false;
            }
            if handle == first {
                self.tables.insert(prio);
                return true;
            }
            let second = shaping::second_level_of(handle.table()).filter(|(b, fam, byte)| {
                (*b, *fam) == (band, family)
                    && handle == shaping::second_level_table(band, family, *byte)
            });
            if let Some((_, _, byte)) = second {
                self.bucket_tables.insert((prio, byte));
            }
            return second.is_some();
        }
        // The root link sits in the kernel's root table (table 0 when absorbed before that
        // table was seen).
        // Links count only in exactly the shape raylimit makes: one hashing on another byte or
        // offset would send packets to buckets where their nodes are not.
        let in_root = handle.table() == 0 || handle.table() >= U32Handle::ROOT_TABLE;
        if in_root && u.link == Some(first) {
            let want = shaping::band_link(self.ifindex, band, family, end);
            let ours = super::same_filter(&f.filter, &want);
            if ours {
                self.links.insert(prio, f.clone());
            }
            return ours;
        }
        if handle.table() == first.table() {
            let byte = handle.bucket();
            let want = shaping::bucket_link(self.ifindex, band, family, end, byte);
            let ours = super::same_filter(&f.filter, &want);
            if ours {
                self.bucket_links.insert((prio, byte), f.clone());
            }
            return ours;
        }
        // A client node counts only in the bucket its own address hashes to: anywhere else
        // packets would never reach it.
        let Some(matched) = shaping::node_match(u, family, end, band.has_port()) else {
            return false;
        };
        if handle.table_and_bucket() != shaping::client_place(band, matched.ip) {
            return false;
        }
        self.insert_node(Node {
            band,
            matched,
            entry: f.clone(),
            classid: u.classid,
        });
        true
    }

    fn insert_node(&mut self, node: Node) {
        let key = (node.entry.filter.priority, node.entry.filter.handle);
        self.remove_node(key);
        self.by_match.insert((node.band, node.matched, key));
        self.by_class.insert((node.band, node.classid, key));
        *self.listener_uses.entry(node.matched.listener).or_default() += 1;
        self.nodes.insert(key, node);
    }

    fn remove_node(&mut self, key: FilterKey) {
        if let Some(n) = self.nodes.remove(&key) {
            self.by_match.remove(&(n.band, n.matched, key));
            self.by_class.remove(&(n.band, n.classid, key));
            if let Some(uses) = self.listener_uses.get_mut(&n.matched.listener) {
                *uses -= 1;
                if *uses == 0 {
                    self.listener_uses.remove(&n.matched.listener);
                }
            }
        }
    }

    pub fn is_managed(&self) -> bool {
        matches!(self.root, RootState::Managed(_))
    }

    /// Client nodes of every band, by priority and handle.
    pub fn nodes(&self) -> impl Iterator<Item = &Node> {
        self.nodes.values()
    }

    pub fn node_count(&self) -> usize {
        self.nodes.len()
    }

    pub fn node_for(&self, band: Band, matched: ClientMatch) -> Option<&Node> {
        let (lo, hi) = ((0, 0), (u16::MAX, u32::MAX));
        self.by_match
            .range((band, matched, lo)..=(band, matched, hi))
            .next()
            .and_then(|(_, _, k)| self.nodes.get(k))
    }

    /// The nodes of a band for one client (address, and port for a connection), on any
    /// listener or none.
    pub fn nodes_of_client(&self, band: Band, client: ClientMatch) -> impl Iterator<Item = &Node> {
        let client = client.client();
        self.by_match
            .range((band, client, (0, 0))..)
            .take_while(move |(b, m, _)| *b == band && m.client() == client)
            .filter_map(|(_, _, k)| self.nodes.get(k))
    }

    /// How many client nodes match each runtime listener (`None`: device-wide nodes).
    pub fn listener_uses(&self) -> &BTreeMap<Option<ListenerMatch>, usize> {
        &self.listener_uses
    }

    /// The specific-IP node of an address.
    pub fn ip_node(&self, ip: IpAddr) -> Option<&Node> {
        self.node_for(Band::Ip, ClientMatch::ip(ip))
    }

    /// The nodes of a band that send to `classid` (a user's addresses).
    pub fn nodes_to(&self, band: Band, classid: TcHandle) -> impl Iterator<Item = &Node> {
        let (lo, hi) = ((0, 0), (u16::MAX, u32::MAX));
        self.by_class
            .range((band, Some(classid), lo)..=(band, Some(classid), hi))
            .filter_map(|(_, _, k)| self.nodes.get(k))
    }

    /// Node ids in use in one bucket (`place`: table and bucket) of a band's priority.
    pub fn nodes_in_bucket(&self, prio: u16, place: U32Handle) -> impl Iterator<Item = u32> + '_ {
        let first = place.table_and_bucket().0;
        self.nodes
            .range((prio, first)..=(prio, first | 0xfff))
            .map(|((_, h), _)| U32Handle(*h).node())
    }

    /// True when a client node other than those in `removed` is left at `prio`, within `table`
    /// when given. Stops at the first survivor, so it costs O(log N + removed).
    pub fn nodes_left(&self, prio: u16, table: Option<u32>, removed: &BTreeSet<FilterKey>) -> bool {
        let (lo, hi) = match table {
            Some(t) => (t << 20, (t << 20) | 0x000f_ffff),
            None => (0, u32::MAX),
        };
        self.nodes
            .range((prio, lo)..=(prio, hi))
            .any(|(k, _)| !removed.contains(k))
            || self.foreign_at(prio, table)
    }

    /// Another tool's filter at `prio` (in `table`, when given): the priority, and the table,
    /// stay while it is there.
    pub fn foreign_at(&self, prio: u16, table: Option<u32>) -> bool {
        self.unrecognised.iter().any(|f| {
            f.filter.priority == prio
                && table.is_none_or(|t| U32Handle(f.filter.handle).table() == t)
        })
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
    /// raylimit's catch-all redirect, with the IFB it sends to.
    pub redirect: Option<(FilterEntry, u32)>,
    /// raylimit's scoped redirect: one node per runtime listener, with the IFB it sends to.
    pub listeners: Vec<(ListenerMatch, FilterEntry, u32)>,
    /// Something else at raylimit's redirect priority.
    pub conflicting: Option<FilterEntry>,
    /// Other filters on the hook (another tool's): the hook stays while they exist.
    pub others: usize,
}

impl Hook {
    /// A device without an ingress hook.
    pub fn none() -> Self {
        Hook {
            parent: None,
            clsact: false,
            redirect: None,
            listeners: Vec::new(),
            conflicting: None,
            others: 0,
        }
    }

    pub fn read(tc: &DeviceTc) -> Self {
        let mut h = Hook::none();
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
            let scoped = [Family::V4, Family::V6]
                .into_iter()
                .any(|fam| shaping::redirect_priority(fam) == f.filter.priority);
            if scoped {
                match (shaping::redirect_listener(&f.filter), redirect_target(f)) {
                    (Some(m), Some(ifb)) => h.listeners.push((m, f.clone(), ifb)),
                    _ if is_u32_table(f) => {}
                    _ => h.conflicting = Some(f.clone()),
                }
                continue;
            }
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

fn actions_of(f: &Filter) -> &[Action] {
    match &f.kind {
        FilterKind::U32(u) => &u.actions,
        FilterKind::MatchAll(m) => &m.actions,
        FilterKind::Fw(fw) => &fw.actions,
        FilterKind::Other { .. } => &[],
    }
}

/// The redirect restores the connection's mark before handing packets over (connmark).
pub fn restores_mark(f: &Filter) -> bool {
    actions_of(f)
        .iter()
        .any(|a| matches!(a, Action::Connmark { .. }))
}

/// The device a redirect filter hands packets to.
pub fn redirect_target(f: &FilterEntry) -> Option<u32> {
    if matches!(f.filter.kind, FilterKind::Fw(_)) {
        return None;
    }
    actions_of(&f.filter).iter().find_map(|a| match a {
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
    pub nft: Option<Result<crate::model::nft::NftState, String>>,
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
}

/// A class's drops, counting its leaf's: HTB counts a packet its leaf refused at enqueue, but
/// not one the leaf drops later (fq_codel's CoDel drops at dequeue), and the leaf counts both
/// (fq_codel drops a batch where HTB counts one refusal). So the leaf's count, where larger.
pub fn with_leaf_drops(class_drops: u32, leaf_drops: u32) -> u32 {
    class_drops.max(leaf_drops)
}

//! Desired kernel objects for a subject (pure, no I/O): the managed HTB root, leaf classes, the
//! u32 layout that classifies client addresses, the shared baseline, and the ingress redirect to
//! the IFB companion for upload.
//!
//! The layout on every shaped root (a device's egress for download, its IFB's for upload):
//!
//! ```text
//! qdisc htb 524c: root default 0            (unclassified traffic passes unshaped)
//!   class 524c:<minor> rate=ceil=R           one per limited subject
//!   pref 300 protocol ip   u32, two-level hashed on the client address:
//!                          table 5: (256 buckets), keyed on the address's second-to-last byte
//!                          root link: every IPv4 packet -> 5:<second-to-last byte>
//!                          per occupied bucket B: table 5BB: (256 buckets, id 0x500 + B),
//!                            keyed on the last byte, and the link 5:B:1 -> 5BB:<last byte>
//!                          nodes 5BB:<last byte>:<id>: one per client address -> its class
//!   pref 301 protocol ipv6 the same for IPv6 (bytes 14 and 15), tables 6: and 6BB:
//!   pref 100/101, 200/201  the connection and uuid bands: the same hashed tables; a connection's
//!                          node also matches the client port, a user's nodes share one class
//!   pref 400 protocol all  the `--ip all` baseline: matchall (or a u32 catch-all) -> its class
//!   pref 600 protocol all  outbounds: fw, handle = the outbound's mark under the mark mask ->
//!                          its class (where the kernel has cls_fw; else nft classifies)
//! ```
//!
//! An outbound's download is shaped on the IFB: its packets carry no socket mark on arrival, so
//! the ingress redirect restores the connection's mark (`connmark`, saved on output by nft)
//! before handing them over, and the fw filter on the IFB reads it.
//!
//! Two levels keep the work per packet flat: a packet walks one link per level and then the
//! few nodes of its own (second-to-last, last byte) bucket, however many clients are limited.
//!
//! Priorities come in bands in the precedence order of ARCHITECTURE.md ("Kernel object layout") (lower runs first, first
//! match wins): connection 100, uuid 200, specific ip 300, baseline 400, inbound 500, outbound
//! 600, with IPv4 and IPv6 one apart inside a band. A specific IP therefore always wins over the
//! baseline, and the unlimited exception is a specific-IP node whose class is the root itself
//! (`524c:0`), which HTB sends through its direct queue.

use std::net::IpAddr;

use crate::model::action::Action;
use crate::model::fq_codel::FqCodelQdisc;
use crate::model::fw::Fw;
use crate::model::htb::{ticks_for, HtbClass, HtbQdisc, NSEC_PER_TICK};
use crate::model::matchall::MatchAll;
use crate::model::tbf::TbfQdisc;
use crate::model::tc::{
    Class, ClassKind, Filter, FilterKind, Qdisc, QdiscKind, ETH_P_ALL, ETH_P_IP, ETH_P_IPV6,
};
use crate::model::u32::{End, Family, U32Filter, U32Selector};
use crate::model::{TcHandle, U32Handle};
use crate::policy::Direction;

/// The major handle of every root raylimit manages ("RL"). A root with this handle is ours.
pub const ROOT_MAJOR: u16 = 0x524c;
/// IFB companions are named `rlifb<ifindex of the device>`.
pub const IFB_PREFIX: &str = "rlifb";
/// Priority of the redirect to the IFB on the device's ingress hook: the catch-all form.
pub const PRIO_REDIRECT: u16 = 0x524c;
/// Priorities of the runtime-scoped redirect (one u32 node per listener): IPv4, then IPv6.
pub const PRIO_REDIRECT_LISTENERS: u16 = PRIO_REDIRECT + 1;
/// First priority of each band.
pub const BAND_CONNECTION: u16 = 100;
pub const BAND_USER: u16 = 200;
pub const BAND_IP_SPECIFIC: u16 = 300;
pub const BAND_IP_BASELINE: u16 = 400;
pub const BAND_INBOUND: u16 = 500;
pub const BAND_OUTBOUND: u16 = 600;
/// Buckets of a client-address table: one per value of an address byte.
pub const ADDRESS_BUCKETS: u32 = 256;
/// The node id of a link node: the one in a band's root table, and the one in each occupied
/// bucket of its first-level table.
const LINK_NODE: u32 = 1;
/// Second-level table ids start here (first-level ones are 1..=6, below).
const SECOND_LEVEL_BASE: u32 = 0x100;
/// Class minors raylimit allocates from (below: reserved; above: room for the kernel's own).
const MINOR_FIRST: u16 = 0x0100;
const MINOR_LAST: u16 = 0xfeff;
/// u32 node ids are 12 bits; 0 names the bucket itself.
const NODE_LAST: u32 = 0xfff;

/// Largest packet HTB may see at once: a 64 KiB GSO super-packet on veth and most NICs.
const MAX_PACKET: u64 = 64 * 1024;
/// Smallest burst worth allowing: a few full-size Ethernet frames.
const MIN_BURST: u64 = 4 * 1514;

pub const fn root_handle() -> TcHandle {
    TcHandle::new(ROOT_MAJOR, 0)
}

pub fn ifb_name(device_ifindex: u32) -> String {
    format!("{IFB_PREFIX}{device_ifindex}")
}

/// True for names raylimit gives its IFB companions.
pub fn is_managed_ifb_name(name: &str) -> bool {
    name.strip_prefix(IFB_PREFIX)
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// The address family of a client address.
pub fn family_of(ip: IpAddr) -> Family {
    match ip {
        IpAddr::V4(_) => Family::V4,
        IpAddr::V6(_) => Family::V6,
    }
}

/// Which end of the packet holds the client: its destination when leaving toward it (download),
/// its source when arriving from it (upload, shaped on the IFB).
pub fn client_end(direction: Direction) -> End {
    match direction {
        Direction::Download => End::Destination,
        Direction::Upload => End::Source,
    }
}

/// The bands whose rules match client addresses, each laid out as a hashed address table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Band {
    Connection,
    User,
    Ip,
}

impl Band {
    pub const ALL: [Band; 3] = [Band::Connection, Band::User, Band::Ip];

    pub fn priority(self, family: Family) -> u16 {
        let base = match self {
            Band::Connection => BAND_CONNECTION,
            Band::User => BAND_USER,
            Band::Ip => BAND_IP_SPECIFIC,
        };
        match family {
            Family::V4 => base,
            Family::V6 => base + 1,
        }
    }

    /// The band and family a priority belongs to.
    pub fn of_priority(prio: u16) -> Option<(Band, Family)> {
        Band::ALL.into_iter().find_map(|b| {
            [Family::V4, Family::V6]
                .into_iter()
                .find(|f| b.priority(*f) == prio)
                .map(|f| (b, f))
        })
    }

    /// Connection nodes also match the client port; the others never do.
    pub fn has_port(self) -> bool {
        self == Band::Connection
    }

    /// 0..=5, one per band and family: numbers the band's u32 tables.
    fn slot(self, family: Family) -> u32 {
        let band = Band::ALL.iter().position(|b| *b == self).unwrap_or(0) as u32;
        2 * band + u32::from(family == Family::V6)
    }
}

/// What one node of a client band matches: the client address, for a connection its port, and
/// for a runtime-scoped rule the runtime listener the packet belongs to (its port, and its
/// address when concrete), so that another process's traffic with the same client never matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClientMatch {
    pub ip: IpAddr,
    pub port: Option<u16>,
    pub listener: Option<ListenerMatch>,
}

impl ClientMatch {
    pub fn ip(ip: IpAddr) -> Self {
        ClientMatch {
            ip,
            port: None,
            listener: None,
        }
    }

    /// The same client, without the listener: what the operator named.
    pub fn client(self) -> Self {
        ClientMatch {
            listener: None,
            ..self
        }
    }
}

impl std::fmt::Display for ClientMatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.port {
            Some(p) => write!(f, "{}", std::net::SocketAddr::new(self.ip, p))?,
            None => write!(f, "{}", self.ip)?,
        }
        match self.listener {
            Some(l) => write!(f, " on listener {l}"),
            None => Ok(()),
        }
    }
}

/// Priority of the specific-IP band for a family.
pub fn ip_specific_priority(family: Family) -> u16 {
    Band::Ip.priority(family)
}

fn ethertype(family: Family) -> u16 {
    match family {
        Family::V4 => ETH_P_IP,
        Family::V6 => ETH_P_IPV6,
    }
}

/// u32 table ids are 12 bits, shared by every u32 priority on the qdisc, and the kernel numbers
/// each priority's own root table from 0x800 up. raylimit's tables stay below 0x800, so their
/// handles are known before they exist and never collide: a band's first-level table is
/// 1 + slot (0x001..=0x006).
pub fn first_level_table(band: Band, family: Family) -> U32Handle {
    U32Handle::new(1 + band.slot(family), 0, 0)
}

/// The second-level table behind first-level bucket `byte`: 0x100 + 256 * slot + byte
/// (0x100..=0x6ff).
pub fn second_level_table(band: Band, family: Family, byte: u32) -> U32Handle {
    U32Handle::new(
        SECOND_LEVEL_BASE + ADDRESS_BUCKETS * band.slot(family) + (byte & 0xff),
        0,
        0,
    )
}

/// The band, family and first-level bucket a second-level table id stands for.
pub fn second_level_of(table: u32) -> Option<(Band, Family, u32)> {
    let slot = table.checked_sub(SECOND_LEVEL_BASE)? / ADDRESS_BUCKETS;
    Band::ALL.into_iter().find_map(|b| {
        [Family::V4, Family::V6]
            .into_iter()
            .find(|f| b.slot(*f) == slot)
            .map(|f| (b, f, table % ADDRESS_BUCKETS))
    })
}

/// The two bytes a client address is hashed on: the second-to-last (first level) and the last
/// (second level).
pub fn hash_bytes(ip: IpAddr) -> (u32, u32) {
    let (a, b) = match ip {
        IpAddr::V4(a) => (a.octets()[2], a.octets()[3]),
        IpAddr::V6(a) => (a.octets()[14], a.octets()[15]),
    };
    (a as u32, b as u32)
}

/// Where a client's nodes live in a band: its second-level table and bucket.
pub fn client_place(band: Band, ip: IpAddr) -> U32Handle {
    let (first, last) = hash_bytes(ip);
    let table = second_level_table(band, family_of(ip), first).table();
    U32Handle::new(table, last, 0)
}

/// Packets HTB's direct queue holds: unclassified and unlimited traffic goes there unshaped, and
/// an IFB's own queue length (32) would drop its bursts.
const DIRECT_QUEUE_PACKETS: u32 = 1000;

/// The managed HTB root: no default class, so traffic no filter claims passes unshaped.
pub fn root_qdisc(ifindex: u32) -> Qdisc {
    Qdisc {
        ifindex,
        handle: root_handle(),
        parent: TcHandle::ROOT,
        kind: QdiscKind::Htb(HtbQdisc {
            direct_qlen: Some(DIRECT_QUEUE_PACKETS),
            ..HtbQdisc::default()
        }),
    }
}

/// Ethernet's MTU: the frame size assumed for a link whose MTU is unknown.
pub const ETHERNET_MTU: u32 = 1500;
/// What a link-layer header and two VLAN tags add to a packet of the MTU.
const FRAME_OVERHEAD: u64 = 32;
/// The leaf's bucket is refilled in this many psched ticks (960 ns, what `tc` makes of "1us"):
/// far faster than HTB dequeues from one class, so the leaf practically never holds back what
/// the class lets go.
pub const LEAF_REFILL_TICKS: u32 = 15;
/// The leaf FIFO holds at least this many bytes: more than a TCP sender keeps in flight by
/// default (4 MiB, `tcp_wmem`), so no window is cut short by the queue alone.
const LEAF_QUEUE_FLOOR: u64 = 8 << 20;
/// Above that, this much of the rate (25 ms).
const LEAF_QUEUE_DIVISOR: u64 = 40;

/// fq_codel's flow queues per class: enough that two flows of one client rarely share one (1 in
/// 64), few enough that 10 000 classes cost the kernel ~45 MB (the default 1 024 would be ~700 MB:
/// the queues are allocated when the qdisc is made).
const LEAF_FLOWS: u32 = 64;
/// fq_codel's packet limit (the kernel's default); the byte limit below binds first for bulk.
const LEAF_FQ_PACKETS: u32 = 10_240;
/// CoDel's target at any rate where a frame takes less: the kernel's default, 5 ms.
const CODEL_TARGET_US: u64 = 5_000;
/// CoDel's interval at that target: the kernel's default, 100 ms.
const CODEL_INTERVAL_US: u64 = 100_000;
/// The kernel keeps CoDel times in 1.024 µs units: multiples of this read back as set.
const CODEL_EXACT_US: u64 = 128;

/// The lowest rate given fq_codel (1 Mbit/s). Below it, where the kernel has TBF, the TBF leaf
/// is used: fq_codel does not cut GSO packets, and at 64 KiB/s a probe waited 77-184 ms on
/// average (up to 1.3 s) for packets HTB charged whole, with seconds 30 % off the rate (the
/// stock kernel, `make test-stock-kernel`), where the TBF keeps every second within 2 %.
const FQ_CODEL_FROM: u64 = 125_000;

/// True when fq_codel is the leaf for a class at `rate` (where the kernel has it).
pub fn fq_codel_suits(rate: u64) -> bool {
    rate >= FQ_CODEL_FROM
}

/// What sits under each class, chosen by what the kernel has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Leaf {
    /// fq_codel, where the probe confirms it and the rate suits it ([`fq_codel_suits`]): a
    /// queue per flow served in turn, each kept short by CoDel, so a ping or a second flow of
    /// the same client does not wait behind a bulk download, and the class's queue stays near
    /// CoDel's target instead of growing to what the senders put in flight. It does not cut GSO
    /// packets, so the class's burst holds one.
    FqCodel,
    /// A TBF that never limits: it cuts a GSO super-packet larger than the class's burst into
    /// frames before HTB charges it (a 64 KiB packet charged at once would put a 4 KiB/s class
    /// 16 s into debt), so a slow class sends steadily. Its FIFO holds more than a TCP window
    /// (`leaf_tbf` says why a shorter one is worse).
    Tbf,
    /// HTB's default FIFO (1 000 packets), where the probe does not confirm TBF: the class's
    /// burst must then hold a whole GSO packet.
    Default,
}

impl Leaf {
    pub fn name(self) -> &'static str {
        match self {
            Leaf::FqCodel => "fq_codel",
            Leaf::Tbf => "tbf",
            Leaf::Default => "pfifo",
        }
    }
}

/// The largest frame a link of `mtu` sends, headers included.
pub fn frame_bytes(mtu: u32) -> u64 {
    mtu.max(ETHERNET_MTU) as u64 + FRAME_OVERHEAD
}

/// An HTB leaf at exactly `rate` bytes/s (rate = ceil), with burst and quantum sized for the rate.
///
/// The burst covers 20 ms at the rate, so a 10 GiB/s class is not starved by timer granularity,
/// and never less than one frame. Under the TBF leaf no packet larger than that reaches the
/// class, so a slow class stays smooth; over HTB's own FIFO a GSO packet arrives whole and the
/// burst must hold it. The quantum is explicit (rate/10, clamped to a frame and to 200 000
/// bytes, the kernel's own bounds) so the kernel never has to warn about r2q.
pub fn leaf_class(rate: u64, leaf: Leaf, frame: u64) -> HtbClass {
    let burst = class_burst(rate, leaf, frame);
    let ticks = ticks_for(rate, burst);
    let quantum = (rate / 10).clamp(1514, 200_000) as u32;
    HtbClass::new(rate, rate, ticks, ticks, quantum)
}

fn class_burst(rate: u64, leaf: Leaf, frame: u64) -> u64 {
    match leaf {
        Leaf::Tbf => (rate / 50).max(frame),
        Leaf::FqCodel | Leaf::Default => (rate / 50).max(MIN_BURST).max(MAX_PACKET.min(rate)),
    }
}

pub fn class(ifindex: u32, minor: u16, rate: u64, leaf: Leaf, frame: u64) -> Class {
    Class {
        ifindex,
        handle: TcHandle::new(ROOT_MAJOR, minor),
        parent: root_handle(),
        kind: ClassKind::Htb(leaf_class(rate, leaf, frame)),
    }
}

/// The handle of the leaf qdisc under class `minor`: the minor as major, except the one minor
/// that would name the root itself.
pub fn leaf_handle(minor: u16) -> TcHandle {
    let major = if minor == ROOT_MAJOR { 0xff00 } else { minor };
    TcHandle::new(major, 0)
}

/// The TBF under a class at `rate`: it passes whole any packet up to the class's burst and one
/// frame more (so what HTB may send at once, overdraft included, finds the bucket full), cuts
/// larger GSO packets into frames, and queues 8 MiB, or 25 ms of the rate above 335 MB/s. A
/// shorter FIFO (measured: sixteen frames, half a second of the rate, 1 000 frames) dropped
/// the tail of TCP windows often enough that the senders' retransmissions took 30-87 % of a
/// class's wire rate for seconds at a time (TCP through v2ray at 250-300 KB/s); with 8 MiB the
/// goodput held at the rate less headers in every run. The queue is then as long as the
/// senders make it: 43 ms at 1 MB/s, 0.35 s at 64 KiB/s and 1.7 s at 4 KiB/s for one bulk
/// flow here. Its own rate refills the bucket in 960 ns, so it never limits.
pub fn leaf_tbf(rate: u64, frame: u64) -> TbfQdisc {
    let largest = class_burst(rate, Leaf::Tbf, frame) + frame;
    let refill_ns = LEAF_REFILL_TICKS as u64 * NSEC_PER_TICK;
    let limit = (rate / LEAF_QUEUE_DIVISOR)
        .max(LEAF_QUEUE_FLOOR)
        .max(largest + frame);
    TbfQdisc {
        rate: (largest as u128 * 1_000_000_000).div_ceil(refill_ns as u128) as u64,
        buffer: LEAF_REFILL_TICKS,
        limit: u32::try_from(limit).unwrap_or(u32::MAX),
        peakrate: 0,
        mtu: 0,
    }
}

/// The fq_codel under a class at `rate`. CoDel's target is 5 ms, or one and a half frame times
/// where a frame takes longer (below ~300 kB/s), and its interval grows by as much, so a slow
/// class is not kept below one packet in flight; the times are rounded up to what the kernel
/// stores exactly. The queue holds at most 8 MiB, like the TBF's.
pub fn leaf_fq_codel(rate: u64, frame: u64) -> FqCodelQdisc {
    let frame_us = (frame * 1_000_000).div_ceil(rate.max(1));
    let target = CODEL_TARGET_US.max(frame_us * 3 / 2);
    let interval = CODEL_INTERVAL_US + (target - CODEL_TARGET_US);
    let exact = |us: u64| u32::try_from(us.next_multiple_of(CODEL_EXACT_US)).unwrap_or(u32::MAX);
    FqCodelQdisc {
        limit: LEAF_FQ_PACKETS,
        flows: LEAF_FLOWS,
        quantum: u32::try_from(frame).unwrap_or(u32::MAX),
        target_us: exact(target),
        interval_us: exact(interval),
        ecn: true,
        memory_limit: LEAF_QUEUE_FLOOR as u32,
        drop_batch_size: 64,
        ce_threshold_us: None,
    }
}

/// The leaf qdisc raylimit puts under class `minor`, or none for HTB's default.
pub fn leaf_qdisc(ifindex: u32, minor: u16, rate: u64, leaf: Leaf, frame: u64) -> Option<Qdisc> {
    let kind = match leaf {
        Leaf::FqCodel => QdiscKind::FqCodel(leaf_fq_codel(rate, frame)),
        Leaf::Tbf => QdiscKind::Tbf(leaf_tbf(rate, frame)),
        Leaf::Default => return None,
    };
    Some(Qdisc {
        ifindex,
        handle: leaf_handle(minor),
        parent: TcHandle::new(ROOT_MAJOR, minor),
        kind,
    })
}

/// True when two HTB classes shape the same way (the parameters raylimit sets).
pub fn same_shaping(a: &HtbClass, b: &HtbClass) -> bool {
    (a.rate, a.ceil, a.buffer, a.cbuffer, a.quantum)
        == (b.rate, b.ceil, b.buffer, b.cbuffer, b.quantum)
}

fn band_filter(
    ifindex: u32,
    band: Band,
    family: Family,
    handle: U32Handle,
    u: U32Filter,
) -> Filter {
    Filter {
        ifindex,
        parent: root_handle(),
        priority: band.priority(family),
        protocol: ethertype(family),
        handle: handle.0,
        kind: FilterKind::U32(u),
    }
}

/// The first-level table of a band.
pub fn band_table(ifindex: u32, band: Band, family: Family) -> Filter {
    address_table(ifindex, band, family, first_level_table(band, family))
}

/// The second-level table behind first-level bucket `byte`.
pub fn bucket_table(ifindex: u32, band: Band, family: Family, byte: u32) -> Filter {
    let table = second_level_table(band, family, byte);
    address_table(ifindex, band, family, table)
}

fn address_table(ifindex: u32, band: Band, family: Family, table: U32Handle) -> Filter {
    let u = U32Filter::table(ADDRESS_BUCKETS);
    band_filter(ifindex, band, family, table, u)
}

/// Offset of the 32-bit word holding the last two bytes of the client address.
fn last_address_word(family: Family, end: End) -> i16 {
    match (family, end) {
        (Family::V4, End::Source) => 12,
        (Family::V4, End::Destination) => 16,
        (Family::V6, End::Source) => 20,
        (Family::V6, End::Destination) => 36,
    }
}

/// A node every packet of its bucket matches, sending it on into `link`, hashed on the byte of
/// the address word that `hmask` selects (network order: 0x0000ff00 is the second-to-last byte,
/// 0x000000ff the last; the kernel shifts the masked value down to a bucket number).
fn link_node(
    ifindex: u32,
    band: Band,
    family: Family,
    end: End,
    handle: U32Handle,
    link: U32Handle,
    hmask: u32,
) -> Filter {
    let mut selector = U32Selector::default();
    selector.catch_all();
    selector.hmask = hmask;
    selector.hoff = last_address_word(family, end);
    let hash = (handle.table() != 0).then(|| handle.table_and_bucket());
    let u = U32Filter {
        link: Some(link),
        hash,
        selector: Some(selector),
        ..Default::default()
    };
    band_filter(ifindex, band, family, handle, u)
}

/// The node in the band's root table that sends every packet of the family into the first-level
/// table, at the bucket of its client address's second-to-last byte. Created with node id 1 in
/// whatever root table the kernel gave the band; its full handle is known only from a dump.
pub fn band_link(ifindex: u32, band: Band, family: Family, end: End) -> Filter {
    let handle = U32Handle::new(0, 0, LINK_NODE);
    let link = first_level_table(band, family);
    link_node(ifindex, band, family, end, handle, link, 0x0000_ff00)
}

/// The node in first-level bucket `byte` that sends its packets into that bucket's second-level
/// table, at the bucket of the address's last byte.
pub fn bucket_link(ifindex: u32, band: Band, family: Family, end: End, byte: u32) -> Filter {
    let table = first_level_table(band, family).table();
    let handle = U32Handle::new(table, byte, LINK_NODE);
    let link = second_level_table(band, family, byte);
    link_node(ifindex, band, family, end, handle, link, 0x0000_00ff)
}

/// The selector matching one client (address, and port when given) at `end`, and the runtime
/// listener when given at the other end.
pub fn client_selector(m: ClientMatch, end: End) -> U32Selector {
    let mut s = U32Selector::default();
    match m.ip {
        IpAddr::V4(a) => s.ipv4(end, a, 32),
        IpAddr::V6(a) => s.ipv6(end, a, 128),
    };
    if let Some(port) = m.port {
        s.port(family_of(m.ip), end, port);
    }
    if let Some(l) = m.listener {
        add_listener(&mut s, l, other_end(end));
    }
    s
}

/// The keys of a listener at `end`: its address when concrete, then its port.
fn add_listener(s: &mut U32Selector, l: ListenerMatch, end: End) {
    match l.address {
        Some(IpAddr::V4(a)) => {
            s.ipv4(end, a, 32);
        }
        Some(IpAddr::V6(a)) => {
            s.ipv6(end, a, 128);
        }
        None => {}
    }
    s.port(l.family, end, l.port);
}

fn other_end(end: End) -> End {
    match end {
        End::Source => End::Destination,
        End::Destination => End::Source,
    }
}

/// One client's node in a band: in its second-level bucket, with an explicit node id, to
/// `classid` (a leaf, or the root itself for the unlimited exception).
pub fn client_node(
    ifindex: u32,
    band: Band,
    m: ClientMatch,
    end: End,
    node: u32,
    classid: TcHandle,
) -> Filter {
    let place = client_place(band, m.ip);
    let handle = U32Handle::new(place.table(), place.bucket(), node);
    let mut u = U32Filter::to_class(client_selector(m, end), classid);
    u.hash = Some(place);
    band_filter(ifindex, band, family_of(m.ip), handle, u)
}

/// What a node of a client band matches, if it has exactly that shape: the address keys, the
/// client port key when `with_port`, and the keys of a runtime listener when it has one. The
/// candidate is read from the keys, then rebuilt and compared, so any other shape is refused.
pub fn node_match(
    filter: &U32Filter,
    family: Family,
    end: End,
    with_port: bool,
) -> Option<ClientMatch> {
    let keys = &filter.selector.as_ref()?.keys;
    let word = |offset: i32| keys.iter().find(|k| k.offset == offset && k.offmask == 0);
    let address = |end: End| -> Option<IpAddr> {
        match family {
            Family::V4 => {
                let k = word(if end == End::Source { 12 } else { 16 })?;
                Some(IpAddr::from(std::net::Ipv4Addr::from(k.value)))
            }
            Family::V6 => {
                let base = if end == End::Source { 8 } else { 24 };
                let mut bytes = [0u8; 16];
                for i in 0..4 {
                    let k = word(base + 4 * i as i32)?;
                    bytes[4 * i..4 * i + 4].copy_from_slice(&k.value.to_be_bytes());
                }
                Some(IpAddr::from(bytes))
            }
        }
    };
    // Both ports share the transport header's first word: source high, destination low.
    let ports = word(if family == Family::V4 { 20 } else { 40 });
    let port = |end: End| {
        let (mask, shift) = match end {
            End::Source => (0xffff_0000, 16),
            End::Destination => (0x0000_ffff, 0),
        };
        ports
            .filter(|k| k.mask & mask == mask)
            .map(|k| (k.value >> shift) as u16)
    };
    let far = other_end(end);
    let candidate = ClientMatch {
        ip: address(end)?,
        port: if with_port { Some(port(end)?) } else { None },
        listener: port(far).map(|p| ListenerMatch {
            family,
            address: address(far),
            port: p,
        }),
    };
    (client_selector(candidate, end).keys == *keys).then_some(candidate)
}

/// What an inbound rule matches: the listener's port, and its address when it is concrete. A
/// wildcard listener is matched by port in both families.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ListenerMatch {
    pub family: Family,
    pub address: Option<IpAddr>,
    pub port: u16,
}

impl std::fmt::Display for ListenerMatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.address, self.family) {
            (Some(a), _) => write!(f, "{}", std::net::SocketAddr::new(a, self.port)),
            (None, Family::V4) => write!(f, "0.0.0.0:{}", self.port),
            (None, Family::V6) => write!(f, "[::]:{}", self.port),
        }
    }
}

/// The priority of the inbound band for a family.
pub fn inbound_priority(family: Family) -> u16 {
    ListenerBand::Inbound.priority(family)
}

/// The bands whose nodes match one of the runtime's listeners: an inbound's own listener, and
/// the runtime-scoped `--ip all` baseline (every listener of the runtime -> the baseline class).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ListenerBand {
    Baseline,
    Inbound,
}

impl ListenerBand {
    pub fn priority(self, family: Family) -> u16 {
        let band = match self {
            ListenerBand::Baseline => BAND_IP_BASELINE,
            ListenerBand::Inbound => BAND_INBOUND,
        };
        match family {
            Family::V4 => band,
            Family::V6 => band + 1,
        }
    }

    /// The band and family of a listener node's priority and protocol. The device-wide
    /// baseline (protocol all at the baseline's priority) is not a listener node.
    pub fn of(priority: u16, protocol: u16) -> Option<(ListenerBand, Family)> {
        [ListenerBand::Baseline, ListenerBand::Inbound]
            .into_iter()
            .flat_map(|b| [(b, Family::V4), (b, Family::V6)])
            .find(|(b, f)| b.priority(*f) == priority && protocol == ethertype(*f))
    }
}

impl ListenerMatch {
    /// What a listening socket bound to `address`:`port` is matched by: its address and port,
    /// or, bound to every address, the port in its family (in both, for `::`, which also takes
    /// IPv4 unless the socket is IPv6-only).
    pub fn of_socket(address: IpAddr, port: u16) -> Vec<ListenerMatch> {
        let wildcard = |family| ListenerMatch {
            family,
            address: None,
            port,
        };
        match address {
            IpAddr::V4(a) if a.is_unspecified() => vec![wildcard(Family::V4)],
            IpAddr::V6(a) if a.is_unspecified() => vec![wildcard(Family::V4), wildcard(Family::V6)],
            a => vec![ListenerMatch {
                family: family_of(a),
                address: Some(a),
                port,
            }],
        }
    }
}

/// Where the listener is in a packet: its source when leaving toward the client (download), its
/// destination when arriving from the client (upload).
pub fn listener_end(direction: Direction) -> End {
    match direction {
        Direction::Download => End::Source,
        Direction::Upload => End::Destination,
    }
}

/// A listener's node: in the band's own root table (node id explicit, table chosen by the
/// kernel), to `classid`.
pub fn listener_node(
    ifindex: u32,
    band: ListenerBand,
    m: ListenerMatch,
    end: End,
    node: u32,
    classid: TcHandle,
) -> Filter {
    let mut s = U32Selector::default();
    add_listener(&mut s, m, end);
    Filter {
        ifindex,
        parent: root_handle(),
        priority: band.priority(m.family),
        protocol: ethertype(m.family),
        handle: U32Handle::new(0, 0, node).0,
        kind: FilterKind::U32(U32Filter::to_class(s, classid)),
    }
}

/// What a node of the inbound band matches, if it has that shape.
pub fn listener_match(filter: &U32Filter, family: Family, end: End) -> Option<ListenerMatch> {
    let sel = filter.selector.as_ref()?;
    let with_address = match (family, sel.keys.len()) {
        (_, 1) => false,
        (Family::V4, 2) | (Family::V6, 5) => true,
        _ => return None,
    };
    if with_address {
        let m = node_match(filter, family, end, true)?;
        return Some(ListenerMatch {
            family,
            address: Some(m.ip),
            port: m.port?,
        });
    }
    let k = sel.keys[0];
    let l4 = if family == Family::V4 { 20 } else { 40 };
    let (mask, shift) = if end == End::Source {
        (0xffff_0000, 16)
    } else {
        (0x0000_ffff, 0)
    };
    (k.offset == l4 && k.mask == mask && k.offmask == 0).then_some(ListenerMatch {
        family,
        address: None,
        port: (k.value >> shift) as u16,
    })
}

/// How an "every packet" match is built on this kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CatchAll {
    /// `matchall`, the preferred form.
    MatchAll,
    /// A u32 node with one key every packet matches, where the kernel lacks `matchall`.
    U32,
}

impl CatchAll {
    pub fn choose(has_matchall: bool) -> Self {
        if has_matchall {
            CatchAll::MatchAll
        } else {
            CatchAll::U32
        }
    }

    /// Why this form was chosen, for the plan.
    pub fn reason(self) -> &'static str {
        match self {
            CatchAll::MatchAll => "matchall (this kernel has cls_matchall)",
            CatchAll::U32 => "u32 catch-all key (this kernel has no cls_matchall)",
        }
    }
}

fn catch_all_filter(
    ifindex: u32,
    parent: TcHandle,
    priority: u16,
    form: CatchAll,
    classid: Option<TcHandle>,
    actions: Vec<Action>,
) -> Filter {
    let (handle, kind) = match form {
        CatchAll::MatchAll => (
            1,
            FilterKind::MatchAll(MatchAll {
                classid,
                actions,
                flags: None,
            }),
        ),
        CatchAll::U32 => {
            let mut s = U32Selector::default();
            s.catch_all();
            let mut u = U32Filter::with_actions(s, actions);
            u.classid = classid;
            (U32Handle::new(0, 0, LINK_NODE).0, FilterKind::U32(u))
        }
    };
    Filter {
        ifindex,
        parent,
        priority,
        protocol: ETH_P_ALL,
        handle,
        kind,
    }
}

/// The `--ip all` baseline on a shaped root: every packet to the baseline class.
pub fn baseline(ifindex: u32, classid: TcHandle, form: CatchAll) -> Filter {
    catch_all_filter(
        ifindex,
        root_handle(),
        BAND_IP_BASELINE,
        form,
        Some(classid),
        Vec::new(),
    )
}

/// The redirect on the device's ingress hook that hands every arriving packet to the IFB.
/// `restore_mark`: first copy the connection's mark to the packet (`connmark`), which an
/// outbound's download limit on the IFB classifies by; only while such a limit exists, since it
/// rewrites the mark of every arriving packet.
pub fn redirect(
    ifindex: u32,
    hook: TcHandle,
    ifb_ifindex: u32,
    form: CatchAll,
    restore_mark: bool,
) -> Filter {
    let mut actions = Vec::new();
    if restore_mark {
        actions.push(Action::restore_connmark());
    }
    actions.push(Action::redirect_to(ifb_ifindex));
    catch_all_filter(ifindex, hook, PRIO_REDIRECT, form, None, actions)
}

/// The priority of the scoped redirect's nodes for a family.
pub fn redirect_priority(family: Family) -> u16 {
    match family {
        Family::V4 => PRIO_REDIRECT_LISTENERS,
        Family::V6 => PRIO_REDIRECT_LISTENERS + 1,
    }
}

/// The scoped redirect for one runtime listener: packets arriving for it (its port, and its
/// address when concrete) go to the IFB; everything else arriving stays off it. Node id
/// explicit, table chosen by the kernel.
pub fn listener_redirect(
    ifindex: u32,
    hook: TcHandle,
    ifb_ifindex: u32,
    m: ListenerMatch,
    node: u32,
) -> Filter {
    let mut s = U32Selector::default();
    add_listener(&mut s, m, End::Destination);
    Filter {
        ifindex,
        parent: hook,
        priority: redirect_priority(m.family),
        protocol: ethertype(m.family),
        handle: U32Handle::new(0, 0, node).0,
        kind: FilterKind::U32(U32Filter::with_actions(
            s,
            vec![Action::redirect_to(ifb_ifindex)],
        )),
    }
}

/// The listener a scoped redirect node is for, if the filter is one.
pub fn redirect_listener(f: &Filter) -> Option<ListenerMatch> {
    let family = [Family::V4, Family::V6]
        .into_iter()
        .find(|fam| redirect_priority(*fam) == f.priority && ethertype(*fam) == f.protocol)?;
    let FilterKind::U32(u) = &f.kind else {
        return None;
    };
    listener_match(u, family, End::Destination)
}

/// An outbound's classifier on a shaped root: packets whose mark under `mask` is `value` go to
/// `classid`. One fw filter per outbound at the outbound band's priority; its handle is the mark.
pub fn mark_filter(ifindex: u32, value: u32, mask: u32, classid: TcHandle) -> Filter {
    Filter {
        ifindex,
        parent: root_handle(),
        priority: BAND_OUTBOUND,
        protocol: ETH_P_ALL,
        handle: value,
        kind: FilterKind::Fw(Fw {
            classid: Some(classid),
            mask: (mask != u32::MAX).then_some(mask),
            actions: Vec::new(),
        }),
    }
}

/// A class minor for `key`, stable across runs: a hash of the key, probing upward past minors
/// `used` says are taken. Two subjects can never share one, whatever the hash does. `used` is a
/// test, not a set, so a caller with thousands of classes does not copy them for each subject.
pub fn allocate_minor(key: &str, used: impl Fn(u16) -> bool) -> Option<u16> {
    let span = (MINOR_LAST - MINOR_FIRST) as u32 + 1;
    let start = fnv1a(key) % span;
    (0..span)
        .map(|i| MINOR_FIRST + ((start + i) % span) as u16)
        .find(|m| !used(*m))
}

/// A node id inside a bucket for `key`, the same way.
pub fn allocate_node(key: &str, used: impl Fn(u32) -> bool) -> Option<u32> {
    let start = fnv1a(key) % NODE_LAST;
    (0..NODE_LAST)
        .map(|i| 1 + (start + i) % NODE_LAST)
        .find(|n| !used(*n))
}

fn fnv1a(key: &str) -> u32 {
    key.bytes().fold(0x811c_9dc5u32, |h, b| {
        (h ^ b as u32).wrapping_mul(0x0100_0193)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::htb::bytes_for;
    use std::collections::BTreeSet;

    #[test]
    fn bursts_scale_with_the_rate() {
        let frame = frame_bytes(1500);
        // Over HTB's own FIFO a slow class must hold a GSO packet (or a second of its rate).
        let slow = leaf_class(4096, Leaf::Default, frame);
        assert!((6055..=6056).contains(&bytes_for(4096, slow.buffer)));
        // Under the segmenting TBF it holds one frame.
        let slow = leaf_class(4096, Leaf::Tbf, frame);
        assert!((1531..=1532).contains(&bytes_for(4096, slow.buffer)));
        let fast = leaf_class(10 << 30, Leaf::Tbf, frame);
        // One tick (64 ns) of rounding at 10 GiB/s is under 700 bytes.
        assert!(bytes_for(10 << 30, fast.buffer) >= (10u64 << 30) / 50 - 700);
        assert_eq!(fast.quantum, 200_000);
        assert_eq!(leaf_class(1_000_000, Leaf::Tbf, frame).quantum, 100_000);
    }

    #[test]
    fn the_leaf_passes_the_class_burst_whole_and_queues_more_than_a_tcp_window() {
        let frame = frame_bytes(1500);
        for rate in [4096u64, 65_536, 1_000_000, 100_000_000, 1 << 30, 50 << 30] {
            let t = leaf_tbf(rate, frame);
            let burst = bytes_for(rate, leaf_class(rate, Leaf::Tbf, frame).buffer);
            // Whatever the class may send at once, and a frame more, passes whole (within a
            // tick of the class's rounding).
            assert!(
                t.max_packet() + 64 * rate / 1_000_000_000 + 1 >= burst + frame,
                "{rate}"
            );
            // The FIFO holds that packet and one more frame, a default TCP window (4 MiB)
            // twice, and at speed 25 ms of the rate.
            assert!(
                t.limit as u64 >= t.max_packet().min(burst) + frame,
                "{rate}"
            );
            assert!(t.limit as u64 >= 8 << 20, "{rate}");
            assert!(t.limit as u64 >= (rate / 40).min(u32::MAX as u64), "{rate}");
            // The bucket refills in under 1 µs: its rate is far above the class's.
            assert!(t.rate >= rate * 100, "{rate}");
        }
        // A jumbo-frame link's frames are passed whole.
        assert!(leaf_tbf(4096, frame_bytes(9000)).max_packet() >= 9014);
    }

    #[test]
    fn leaf_handles_never_name_the_root() {
        assert_eq!(leaf_handle(0x0100), TcHandle::new(0x0100, 0));
        assert_ne!(leaf_handle(ROOT_MAJOR), root_handle());
        assert!(leaf_handle(ROOT_MAJOR).major() > MINOR_LAST);
    }

    #[test]
    fn codel_waits_at_least_one_and_a_half_frames_and_its_times_read_back_exactly() {
        use crate::model::fq_codel::codel_round_trip;
        let frame = frame_bytes(1500);
        let fast = leaf_fq_codel(1_000_000, frame);
        assert_eq!((fast.target_us, fast.interval_us), (5120, 100_096));
        // 64 KiB/s: a frame takes 23.4 ms, so CoDel aims at 35 ms over 130 ms.
        let slow = leaf_fq_codel(65_536, frame);
        assert_eq!((slow.target_us, slow.interval_us), (35_072, 130_176));
        for rate in [4096, 65_536, 1_000_000, 100_000_000, 1 << 30] {
            let q = leaf_fq_codel(rate, frame);
            assert_eq!(codel_round_trip(q.target_us), q.target_us);
            assert_eq!(codel_round_trip(q.interval_us), q.interval_us);
            assert!(q.interval_us > q.target_us);
            assert_eq!((q.flows, q.quantum as u64, q.ecn), (64, frame, true));
        }
    }

    #[test]
    fn minors_are_stable_and_never_collide() {
        let mut used = BTreeSet::new();
        let a = allocate_minor("ip 10.0.0.1", |m| used.contains(&m)).unwrap();
        assert_eq!(
            allocate_minor("ip 10.0.0.1", |m| used.contains(&m)),
            Some(a)
        );
        used.insert(a);
        let b = allocate_minor("ip 10.0.0.1", |m| used.contains(&m)).unwrap();
        assert_ne!(a, b);
        assert!((MINOR_FIRST..=MINOR_LAST).contains(&b));
        assert_eq!(allocate_minor("x", |_| true), None);
    }

    #[test]
    fn table_ids_are_distinct_below_the_kernels_own_and_name_their_bucket() {
        let mut seen = BTreeSet::new();
        for band in Band::ALL {
            for family in [Family::V4, Family::V6] {
                assert!(seen.insert(first_level_table(band, family).table()));
                for byte in 0..ADDRESS_BUCKETS {
                    let t = second_level_table(band, family, byte).table();
                    assert!(seen.insert(t), "{t:x} twice");
                    assert_eq!(second_level_of(t), Some((band, family, byte)));
                }
            }
        }
        assert!(seen.iter().all(|t| *t != 0 && *t < U32Handle::ROOT_TABLE));
        assert_eq!(second_level_of(1), None);
        assert_eq!(second_level_of(0x700), None);
        // 10.100.7.2: first-level bucket 7, second-level bucket 2, in the IPv4 ip band (slot 4).
        let ip: IpAddr = "10.100.7.2".parse().unwrap();
        assert_eq!(client_place(Band::Ip, ip), U32Handle::new(0x507, 2, 0));
        let ip6: IpAddr = "fd00::1:a07".parse().unwrap();
        assert_eq!(client_place(Band::User, ip6), U32Handle::new(0x40a, 7, 0));
    }

    #[test]
    fn node_addresses_round_trip() {
        for (ip, end) in [
            ("10.99.0.2", End::Destination),
            ("10.99.0.2", End::Source),
            ("fd00:99::2", End::Destination),
            ("2001:db8::10", End::Source),
        ] {
            let ip: IpAddr = ip.parse().unwrap();
            let f = client_node(
                1,
                Band::Ip,
                ClientMatch::ip(ip),
                end,
                7,
                TcHandle::new(ROOT_MAJOR, 0x100),
            );
            let FilterKind::U32(u) = &f.kind else {
                panic!()
            };
            assert_eq!(
                node_match(u, family_of(ip), end, false),
                Some(ClientMatch::ip(ip))
            );
            assert_eq!(node_match(u, family_of(ip), end, true), None);
            let m = ClientMatch {
                port: Some(40123),
                ..ClientMatch::ip(ip)
            };
            let c = client_node(
                1,
                Band::Connection,
                m,
                end,
                7,
                TcHandle::new(ROOT_MAJOR, 0x100),
            );
            let FilterKind::U32(cu) = &c.kind else {
                panic!()
            };
            assert_eq!(node_match(cu, family_of(ip), end, true), Some(m));
            assert_eq!(node_match(cu, family_of(ip), end, false), None);
            assert_eq!(c.priority, Band::Connection.priority(family_of(ip)));
            let other = if end == End::Source {
                End::Destination
            } else {
                End::Source
            };
            assert_eq!(node_match(u, family_of(ip), other, false), None);
            for address in [Some(ip), None] {
                let m = ListenerMatch {
                    family: family_of(ip),
                    address,
                    port: 10086,
                };
                let f = listener_node(
                    1,
                    ListenerBand::Inbound,
                    m,
                    end,
                    3,
                    TcHandle::new(ROOT_MAJOR, 0x100),
                );
                let FilterKind::U32(u) = &f.kind else {
                    panic!()
                };
                assert_eq!(listener_match(u, family_of(ip), end), Some(m));
                assert_eq!(listener_match(u, family_of(ip), other), None);
            }
            assert_eq!(U32Handle(f.handle).bucket(), hash_bytes(ip).1);
        }
    }

    /// Runtime-scoped client nodes carry the listener at the other end: with and without its
    /// address, with and without the client's port (both ports then share one merged key).
    #[test]
    fn scoped_client_nodes_round_trip() {
        for (ip, listener, end) in [
            ("10.99.0.2", "10.33.0.1", End::Destination),
            ("10.99.0.2", "10.33.0.1", End::Source),
            ("fd00:99::2", "fd00:33::1", End::Destination),
            ("2001:db8::10", "2001:db8::1", End::Source),
        ] {
            let ip: IpAddr = ip.parse().unwrap();
            let family = family_of(ip);
            for address in [Some(listener.parse().unwrap()), None] {
                for (band, port) in [(Band::Ip, None), (Band::Connection, Some(40123))] {
                    let m = ClientMatch {
                        ip,
                        port,
                        listener: Some(ListenerMatch {
                            family,
                            address,
                            port: 9000,
                        }),
                    };
                    let f = client_node(1, band, m, end, 7, TcHandle::new(ROOT_MAJOR, 0x100));
                    let FilterKind::U32(u) = &f.kind else {
                        panic!()
                    };
                    assert_eq!(node_match(u, family, end, port.is_some()), Some(m), "{m}");
                    assert_eq!(node_match(u, family, end, port.is_none()), None, "{m}");
                    // The listener is the client's peer: a node built for the other direction
                    // is not this one.
                    assert_ne!(node_match(u, family, other_end(end), false), Some(m));
                    if port.is_some() {
                        let keys = &u.selector.as_ref().unwrap().keys;
                        let l4 = if family == Family::V4 { 20 } else { 40 };
                        let word = keys.iter().find(|k| k.offset == l4).unwrap();
                        assert_eq!(word.mask, u32::MAX, "both ports in one key");
                    }
                }
            }
        }
    }
}

//! tc objects (qdiscs, classes, filters) as typed values, their request messages, and the decoding
//! of dump replies into the same values plus the kernel's counters.
//!
//! A request is `nlmsghdr | tcmsg | TCA_KIND | TCA_OPTIONS{...}`, laid out exactly as iproute2
//! lays it out. Sequence number and port id are left zero; the socket fills them in.

use std::fmt;

use super::attr::{AttrWriter, Attrs, StructReader};
use super::error::DecodeError;
use super::fq_codel::FqCodelQdisc;
use super::fw::Fw;
use super::handle::{TcHandle, U32Handle};
use super::htb::{HtbClass, HtbClassCounters, HtbQdisc, HtbQdiscCounters};
use super::matchall::MatchAll;
use super::stats::TcStats;
use super::tbf::TbfQdisc;
use super::u32::U32Filter;

pub const RTM_NEWQDISC: u16 = 36;
pub const RTM_DELQDISC: u16 = 37;
pub const RTM_GETQDISC: u16 = 38;
pub const RTM_NEWTCLASS: u16 = 40;
pub const RTM_DELTCLASS: u16 = 41;
pub const RTM_GETTCLASS: u16 = 42;
pub const RTM_NEWTFILTER: u16 = 44;
pub const RTM_DELTFILTER: u16 = 45;
pub const RTM_GETTFILTER: u16 = 46;

const TCA_KIND: u16 = 1;
const TCA_OPTIONS: u16 = 2;
const TCA_STATS: u16 = 3;
const TCA_XSTATS: u16 = 4;
const TCA_STATS2: u16 = 7;
const TCA_CHAIN: u16 = 11;

use netlink_packet_core::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL, NLM_F_REPLACE, NLM_F_REQUEST,
};

/// Ethernet protocol numbers used as filter protocols (host order here; big-endian on the wire).
pub const ETH_P_ALL: u16 = 0x0003;
pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;

/// How a request treats an existing object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Create; fail if it exists (`tc ... add`).
    Create,
    /// Create or replace (`tc ... replace`).
    Replace,
    /// Modify an existing object in place (`tc ... change`).
    Change,
    Delete,
}

impl Op {
    fn flags(self) -> u16 {
        NLM_F_REQUEST
            | NLM_F_ACK
            | match self {
                Op::Create => NLM_F_CREATE | NLM_F_EXCL,
                Op::Replace => NLM_F_CREATE | NLM_F_REPLACE,
                Op::Change | Op::Delete => 0,
            }
    }

    pub fn verb(self) -> &'static str {
        match self {
            Op::Create => "add",
            Op::Replace => "replace",
            Op::Change => "change",
            Op::Delete => "del",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QdiscKind {
    Htb(HtbQdisc),
    /// The leaf under a managed class: it segments GSO packets and bounds the queue.
    Tbf(TbfQdisc),
    /// The leaf under a managed class where the kernel has it: a queue per flow, each kept
    /// short by CoDel.
    FqCodel(FqCodelQdisc),
    Clsact,
    Ingress,
    /// A kind raylimit does not model; its options payload, verbatim.
    Other {
        kind: String,
        options: Option<Vec<u8>>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Qdisc {
    pub ifindex: u32,
    pub handle: TcHandle,
    pub parent: TcHandle,
    pub kind: QdiscKind,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClassKind {
    Htb(HtbClass),
    Other {
        kind: String,
        options: Option<Vec<u8>>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Class {
    pub ifindex: u32,
    pub handle: TcHandle,
    pub parent: TcHandle,
    pub kind: ClassKind,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FilterKind {
    U32(U32Filter),
    MatchAll(MatchAll),
    Fw(Fw),
    Other {
        kind: String,
        options: Option<Vec<u8>>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Filter {
    pub ifindex: u32,
    pub parent: TcHandle,
    /// Lower runs first.
    pub priority: u16,
    /// `ETH_P_*`, host order.
    pub protocol: u16,
    /// Kind-specific: a [`U32Handle`] for u32, the mark for fw, any id for matchall.
    pub handle: u32,
    pub kind: FilterKind,
}

impl Qdisc {
    pub fn kind_name(&self) -> &str {
        match &self.kind {
            QdiscKind::Htb(_) => "htb",
            QdiscKind::Tbf(_) => "tbf",
            QdiscKind::FqCodel(_) => "fq_codel",
            QdiscKind::Clsact => "clsact",
            QdiscKind::Ingress => "ingress",
            QdiscKind::Other { kind, .. } => kind,
        }
    }

    pub fn request(&self, op: Op) -> Vec<u8> {
        let ty = if op == Op::Delete {
            RTM_DELQDISC
        } else {
            RTM_NEWQDISC
        };
        tc_message(
            ty,
            op.flags(),
            self.ifindex,
            self.handle.0,
            self.parent.0,
            0,
            |w| {
                if op == Op::Delete {
                    return;
                }
                w.put_str(TCA_KIND, self.kind_name());
                match &self.kind {
                    QdiscKind::Htb(h) => {
                        w.nested(TCA_OPTIONS, false, |w| h.encode_options(w));
                    }
                    QdiscKind::Tbf(t) => {
                        w.nested(TCA_OPTIONS, false, |w| t.encode_options(w));
                    }
                    QdiscKind::FqCodel(f) => {
                        w.nested(TCA_OPTIONS, false, |w| {
                            f.encode_options(w, op != Op::Change)
                        });
                    }
                    QdiscKind::Clsact | QdiscKind::Ingress => {}
                    QdiscKind::Other { options, .. } => put_opaque(w, options),
                }
            },
        )
    }
}

impl Class {
    pub fn kind_name(&self) -> &str {
        match &self.kind {
            ClassKind::Htb(_) => "htb",
            ClassKind::Other { kind, .. } => kind,
        }
    }

    pub fn request(&self, op: Op) -> Vec<u8> {
        let ty = if op == Op::Delete {
            RTM_DELTCLASS
        } else {
            RTM_NEWTCLASS
        };
        let parent = if op == Op::Delete { 0 } else { self.parent.0 };
        tc_message(
            ty,
            op.flags(),
            self.ifindex,
            self.handle.0,
            parent,
            0,
            |w| {
                if op == Op::Delete {
                    return;
                }
                w.put_str(TCA_KIND, self.kind_name());
                match &self.kind {
                    ClassKind::Htb(h) => {
                        w.nested(TCA_OPTIONS, false, |w| h.encode_options(w));
                    }
                    ClassKind::Other { options, .. } => put_opaque(w, options),
                }
            },
        )
    }
}

impl Class {
    /// The value as the kernel reports it back: a class directly under its qdisc has parent `root`.
    pub fn canonical(&self) -> Class {
        let mut c = self.clone();
        if c.parent == TcHandle::new(c.handle.major(), 0) {
            c.parent = TcHandle::ROOT;
        }
        c
    }
}

impl Filter {
    pub fn kind_name(&self) -> &str {
        match &self.kind {
            FilterKind::U32(_) => "u32",
            FilterKind::MatchAll(_) => "matchall",
            FilterKind::Fw(_) => "fw",
            FilterKind::Other { kind, .. } => kind,
        }
    }

    /// `tcm_info`: priority in the high half, protocol in network order in the low half.
    pub fn info(&self) -> u32 {
        ((self.priority as u32) << 16) | u16::from_ne_bytes(self.protocol.to_be_bytes()) as u32
    }

    /// The kernel module this filter needs, for capability checks (`u32` is assumed present).
    pub fn feature(&self) -> Option<&'static str> {
        match &self.kind {
            FilterKind::MatchAll(_) => Some("matchall"),
            FilterKind::Fw(_) => Some("fw"),
            _ => None,
        }
    }

    pub fn request(&self, op: Op) -> Vec<u8> {
        let ty = if op == Op::Delete {
            RTM_DELTFILTER
        } else {
            RTM_NEWTFILTER
        };
        tc_message(
            ty,
            op.flags(),
            self.ifindex,
            self.handle,
            self.parent.0,
            self.info(),
            |w| {
                w.put_str(TCA_KIND, self.kind_name());
                if op == Op::Delete {
                    return;
                }
                match &self.kind {
                    FilterKind::U32(u) => {
                        w.nested(TCA_OPTIONS, false, |w| u.encode_options(w));
                    }
                    FilterKind::MatchAll(m) => {
                        w.nested(TCA_OPTIONS, false, |w| m.encode_options(w));
                    }
                    FilterKind::Fw(f) => {
                        w.nested(TCA_OPTIONS, false, |w| f.encode_options(w));
                    }
                    FilterKind::Other { options, .. } => put_opaque(w, options),
                }
            },
        )
    }

    /// The value as the kernel reports it back (u32 nodes gain their table and bucket).
    pub fn canonical(&self) -> Filter {
        let mut f = self.clone();
        if let FilterKind::U32(u) = &f.kind {
            f.kind = FilterKind::U32(u.canonical(U32Handle(f.handle)));
        }
        f
    }
}

fn put_opaque(w: &mut AttrWriter, options: &Option<Vec<u8>>) {
    if let Some(o) = options {
        w.put(TCA_OPTIONS, o);
    }
}

/// Builds `nlmsghdr | tcmsg | attributes`.
fn tc_message(
    ty: u16,
    flags: u16,
    ifindex: u32,
    handle: u32,
    parent: u32,
    info: u32,
    attrs: impl FnOnce(&mut AttrWriter),
) -> Vec<u8> {
    let mut w = AttrWriter::new();
    w.raw(&[0u8; 16]);
    w.raw(&[0, 0, 0, 0]); // family AF_UNSPEC and padding
    w.raw(&ifindex.to_ne_bytes());
    w.raw(&handle.to_ne_bytes());
    w.raw(&parent.to_ne_bytes());
    w.raw(&info.to_ne_bytes());
    attrs(&mut w);
    let mut msg = w.into_bytes();
    let len = msg.len() as u32;
    msg[0..4].copy_from_slice(&len.to_ne_bytes());
    msg[4..6].copy_from_slice(&ty.to_ne_bytes());
    msg[6..8].copy_from_slice(&flags.to_ne_bytes());
    msg
}

/// A dump request for one device's qdiscs, classes, or the filters under `parent`.
pub fn dump_request(ty: u16, ifindex: u32, parent: TcHandle) -> Vec<u8> {
    tc_message(
        ty,
        NLM_F_REQUEST | NLM_F_DUMP,
        ifindex,
        0,
        parent.0,
        0,
        |_| {},
    )
}

/// A qdisc as dumped, with its counters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QdiscEntry {
    pub qdisc: Qdisc,
    pub stats: TcStats,
    pub htb: Option<HtbQdiscCounters>,
}

/// A class as dumped, with its counters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClassEntry {
    pub class: Class,
    pub stats: TcStats,
    pub htb: Option<HtbClassCounters>,
}

/// A filter as dumped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FilterEntry {
    pub filter: Filter,
    pub chain: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TcEntry {
    Qdisc(QdiscEntry),
    Class(ClassEntry),
    Filter(FilterEntry),
}

struct Common<'a> {
    ifindex: u32,
    handle: u32,
    parent: u32,
    info: u32,
    kind: Option<String>,
    options: Option<&'a [u8]>,
    stats: TcStats,
    app: Option<Vec<u8>>,
    chain: Option<u32>,
}

fn decode_common(payload: &[u8]) -> Result<Common<'_>, DecodeError> {
    let r = StructReader::new(payload, 20, "tcmsg")?;
    let mut c = Common {
        ifindex: r.u32(4),
        handle: r.u32(8),
        parent: r.u32(12),
        info: r.u32(16),
        kind: None,
        options: None,
        stats: TcStats::default(),
        app: None,
        chain: None,
    };
    let mut have_stats2 = false;
    for a in Attrs::new(r.rest(20)).collect()? {
        match a.kind {
            TCA_KIND => c.kind = Some(a.string()?),
            TCA_OPTIONS => c.options = Some(a.value),
            TCA_STATS2 => {
                let (s, app) = TcStats::decode_stats2(a.nested())?;
                c.stats = s;
                c.app = app.or(c.app.take());
                have_stats2 = true;
            }
            TCA_STATS if !have_stats2 => c.stats = TcStats::decode_legacy(a.value)?,
            TCA_XSTATS => c.app = Some(a.value.to_vec()),
            TCA_CHAIN => c.chain = Some(a.u32()?),
            _ => {}
        }
    }
    Ok(c)
}

/// Decodes one message of a tc dump (or a notification) by its netlink message type.
pub fn decode(msg_type: u16, payload: &[u8]) -> Result<TcEntry, DecodeError> {
    let c = decode_common(payload)?;
    let kind = c
        .kind
        .clone()
        .ok_or_else(|| DecodeError::new("tc object without TCA_KIND"))?;
    let options = c.options.map(Attrs::new).unwrap_or(Attrs::new(&[]));
    match msg_type {
        RTM_NEWQDISC | RTM_DELQDISC => {
            let mut htb = None;
            let kind = match kind.as_str() {
                "htb" => {
                    let (q, counters) = HtbQdisc::decode_options(options)?;
                    htb = Some(counters);
                    QdiscKind::Htb(q)
                }
                "tbf" => QdiscKind::Tbf(TbfQdisc::decode_options(options)?),
                "fq_codel" => QdiscKind::FqCodel(FqCodelQdisc::decode_options(options)?),
                "clsact" => QdiscKind::Clsact,
                "ingress" => QdiscKind::Ingress,
                _ => QdiscKind::Other {
                    kind,
                    options: c.options.map(<[u8]>::to_vec),
                },
            };
            let qdisc = Qdisc {
                ifindex: c.ifindex,
                handle: TcHandle(c.handle),
                parent: TcHandle(c.parent),
                kind,
            };
            Ok(TcEntry::Qdisc(QdiscEntry {
                qdisc,
                stats: c.stats,
                htb,
            }))
        }
        RTM_NEWTCLASS | RTM_DELTCLASS => {
            let mut htb = None;
            let kind = match kind.as_str() {
                "htb" => {
                    let (class, mut counters) = HtbClass::decode_options(options)?;
                    if let Some(app) = &c.app {
                        counters.add_xstats(app)?;
                    }
                    htb = Some(counters);
                    ClassKind::Htb(class)
                }
                _ => ClassKind::Other {
                    kind,
                    options: c.options.map(<[u8]>::to_vec),
                },
            };
            let class = Class {
                ifindex: c.ifindex,
                handle: TcHandle(c.handle),
                parent: TcHandle(c.parent),
                kind,
            };
            Ok(TcEntry::Class(ClassEntry {
                class,
                stats: c.stats,
                htb,
            }))
        }
        RTM_NEWTFILTER | RTM_DELTFILTER => {
            let kind = match kind.as_str() {
                "u32" => FilterKind::U32(U32Filter::decode_options(options)?),
                "matchall" => FilterKind::MatchAll(MatchAll::decode_options(options)?),
                "fw" => FilterKind::Fw(Fw::decode_options(options)?),
                _ => FilterKind::Other {
                    kind,
                    options: c.options.map(<[u8]>::to_vec),
                },
            };
            let protocol = u16::from_be_bytes((c.info as u16).to_ne_bytes());
            let filter = Filter {
                ifindex: c.ifindex,
                parent: TcHandle(c.parent),
                priority: (c.info >> 16) as u16,
                protocol,
                handle: c.handle,
                kind,
            };
            Ok(TcEntry::Filter(FilterEntry {
                filter,
                chain: c.chain,
            }))
        }
        other => Err(DecodeError::new(format!(
            "netlink message type {other} is not a tc object"
        ))),
    }
}

pub fn protocol_name(p: u16) -> String {
    match p {
        ETH_P_ALL => "all".into(),
        ETH_P_IP => "ip".into(),
        ETH_P_IPV6 => "ipv6".into(),
        p => format!("0x{p:04x}"),
    }
}

impl fmt::Display for Qdisc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "qdisc {} {} parent {}",
            self.kind_name(),
            self.handle,
            self.parent
        )?;
        if let QdiscKind::Htb(h) = &self.kind {
            write!(f, " r2q {} default {:x}", h.r2q, h.default_class)?;
            if let Some(q) = h.direct_qlen {
                write!(f, " direct_qlen {q}")?;
            }
        }
        if let QdiscKind::Tbf(t) = &self.kind {
            write!(
                f,
                " rate {}B/s burst {}b limit {}b",
                t.rate,
                t.max_packet(),
                t.limit
            )?;
        }
        if let QdiscKind::FqCodel(q) = &self.kind {
            write!(f, " {}", q.options_text())?;
        }
        Ok(())
    }
}

impl fmt::Display for Class {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "class {} {} parent {}",
            self.kind_name(),
            self.handle,
            self.parent
        )?;
        if let ClassKind::Htb(h) = &self.kind {
            write!(
                f,
                " rate {}B/s ceil {}B/s burst {}b cburst {}b quantum {}",
                h.rate,
                h.ceil,
                super::htb::bytes_for(h.rate, h.buffer),
                super::htb::bytes_for(h.ceil, h.cbuffer),
                h.quantum
            )?;
            if h.prio != 0 {
                write!(f, " prio {}", h.prio)?;
            }
        }
        Ok(())
    }
}

impl fmt::Display for Filter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "filter parent {} protocol {} pref {} {}",
            self.parent,
            protocol_name(self.protocol),
            self.priority,
            self.kind_name()
        )?;
        match &self.kind {
            FilterKind::U32(u) => write!(
                f,
                " handle {} {}",
                U32Handle(self.handle),
                u.to_string().trim_end()
            ),
            FilterKind::MatchAll(m) => {
                write!(f, " handle 0x{:x}", self.handle)?;
                if let Some(c) = m.classid {
                    write!(f, " classid {c}")?;
                }
                for a in &m.actions {
                    write!(f, " action {a}")?;
                }
                Ok(())
            }
            FilterKind::Fw(fw) => {
                write!(f, " handle 0x{:x}", self.handle)?;
                if let Some(m) = fw.mask {
                    write!(f, "/0x{m:x}")?;
                }
                if let Some(c) = fw.classid {
                    write!(f, " classid {c}")?;
                }
                for a in &fw.actions {
                    write!(f, " action {a}")?;
                }
                Ok(())
            }
            FilterKind::Other { .. } => write!(f, " handle 0x{:x}", self.handle),
        }
    }
}

//! Plan steps: kernel operations in execution order, each with the steps that undo it, rendered
//! in tc/ip-like notation for reports.

use std::fmt::Write as _;

use crate::model::action::Action;
use crate::model::htb::{burst_for_tc, HtbQdisc};
use crate::model::nft::{NftOp, NftRule};
use crate::model::tc::{Class, ClassKind, Filter, FilterKind, Op, Qdisc, QdiscKind};
use crate::model::u32::{End, Family, U32Filter};
use crate::model::{TcHandle, U32Handle};
use crate::shaping;

/// A device a step acts on: known by index, or an IFB that may only exist once an earlier step
/// of the same run created it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dev {
    /// The name is shared by every step on the device (a run of 10 000 limits has 30 000).
    Index {
        index: u32,
        name: std::rc::Rc<str>,
    },
    Ifb(std::rc::Rc<str>),
}

impl Dev {
    pub fn name(&self) -> &str {
        match self {
            Dev::Index { name, .. } | Dev::Ifb(name) => name,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TcObject {
    Qdisc(Qdisc),
    Class(Class),
    Filter(Filter),
}

impl From<Qdisc> for TcObject {
    fn from(q: Qdisc) -> Self {
        TcObject::Qdisc(q)
    }
}

impl From<Class> for TcObject {
    fn from(c: Class) -> Self {
        TcObject::Class(c)
    }
}

impl From<Filter> for TcObject {
    fn from(f: Filter) -> Self {
        TcObject::Filter(f)
    }
}

/// One kernel operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Operation {
    CreateIfb(String),
    SetUp(Dev),
    DeleteLink(Dev),
    Tc {
        op: Op,
        dev: Dev,
        object: TcObject,
        /// Where a redirect's mirred action points, resolved when the step runs.
        redirect_to: Option<Box<Dev>>,
    },
    /// Changes to raylimit's nft table, sent as one atomic batch in the namespace at `netns`.
    Nft {
        netns: Option<String>,
        ops: Vec<NftOp>,
    },
    /// Deletes the rules equal to `rule` tagged with `subject`: the undo of adding one, whose
    /// handle is known only once it exists.
    NftRemoveTagged {
        netns: Option<String>,
        rule: NftRule,
        subject: String,
    },
}

/// What reverses a step if a later step fails.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Undo {
    /// These steps, in order (none: nothing to undo, or nothing known).
    Steps(Vec<Step>),
    /// The step's own object the other way: a create's undo deletes it (`create-x` by
    /// `delete-x`), a delete's creates it again (`delete-x` by `restore-x`). Written out only
    /// when a rollback runs: a plan of 10 000 rules would otherwise carry a copy of each object.
    Reverse,
}

/// A named step of a plan and the steps that reverse it if a later step fails.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    /// What the step does, as reports name it: a literal (a run of 10 000 limits keeps no copy),
    /// or made when an undo is written out.
    pub name: std::borrow::Cow<'static, str>,
    pub action: Operation,
    pub undo: Undo,
    /// An object already in the wanted state counts as done: one that exists, for a create run
    /// without observed state; one already gone, for a delete the kernel may have done itself.
    pub exists_ok: bool,
}

impl Step {
    pub fn new(name: impl Into<std::borrow::Cow<'static, str>>, action: Operation) -> Self {
        Step {
            name: name.into(),
            action,
            undo: Undo::Steps(Vec::new()),
            exists_ok: false,
        }
    }

    pub fn undone_by(mut self, undo: Vec<Step>) -> Self {
        self.undo = Undo::Steps(undo);
        self
    }

    /// The steps that undo this one, in the order they run.
    pub fn undo_steps(&self) -> std::borrow::Cow<'_, [Step]> {
        match &self.undo {
            Undo::Steps(steps) => std::borrow::Cow::Borrowed(steps),
            Undo::Reverse => std::borrow::Cow::Owned(self.reversed().into_iter().collect()),
        }
    }

    /// How many steps undo this one.
    pub fn undo_len(&self) -> usize {
        match &self.undo {
            Undo::Steps(steps) => steps.len(),
            Undo::Reverse => 1,
        }
    }

    /// The tc step that reverses this one (see [`Undo::Reverse`]).
    fn reversed(&self) -> Option<Step> {
        let Operation::Tc {
            op, dev, object, ..
        } = &self.action
        else {
            return None;
        };
        let (op, name) = match op {
            Op::Delete => (Op::Create, self.name.replacen("delete-", "restore-", 1)),
            _ => (Op::Delete, self.name.replacen("create-", "delete-", 1)),
        };
        Some(Step::tc(name, op, dev, object.clone()))
    }

    pub fn tc(
        name: impl Into<std::borrow::Cow<'static, str>>,
        op: Op,
        dev: &Dev,
        object: impl Into<TcObject>,
    ) -> Self {
        Step::new(
            name,
            Operation::Tc {
                op,
                dev: dev.clone(),
                object: object.into(),
                redirect_to: None,
            },
        )
    }

    /// Creates `object`; undone by deleting it (`create-x` is undone by `delete-x`).
    pub fn create(name: &'static str, dev: &Dev, object: impl Into<TcObject>) -> Self {
        let mut step = Step::tc(name, Op::Create, dev, object);
        step.undo = Undo::Reverse;
        step
    }

    /// Deletes `object` as observed; undone by creating it again (`delete-x` by `restore-x`).
    pub fn delete(name: &'static str, dev: &Dev, object: impl Into<TcObject>) -> Self {
        let mut step = Step::tc(name, Op::Delete, dev, object);
        step.undo = Undo::Reverse;
        step
    }

    /// True for a tc delete.
    pub fn deletes(&self) -> bool {
        matches!(self.action, Operation::Tc { op: Op::Delete, .. })
    }

    /// The command an operator would type for the same change.
    pub fn command(&self) -> String {
        match &self.action {
            Operation::CreateIfb(name) => format!("ip link add {name} type ifb"),
            Operation::SetUp(dev) => format!("ip link set {} up", dev.name()),
            Operation::DeleteLink(dev) => format!("ip link del {}", dev.name()),
            Operation::Tc {
                op,
                dev,
                object,
                redirect_to,
            } => render_tc(*op, dev.name(), object, redirect_to.as_deref()),
            Operation::Nft { ops, .. } => ops
                .iter()
                .map(NftOp::describe)
                .collect::<Vec<_>>()
                .join("; "),
            Operation::NftRemoveTagged { rule, subject, .. } => format!(
                "nft delete rule inet {} {} handle <{} of {subject}>",
                crate::model::nft::TABLE,
                rule.chain(),
                rule.describe()
            ),
        }
    }
}

fn render_tc(op: Op, dev: &str, object: &TcObject, redirect_to: Option<&Dev>) -> String {
    let verb = op.verb();
    match object {
        TcObject::Qdisc(q) => {
            let (place, kind) = match &q.kind {
                QdiscKind::Clsact => (String::new(), "clsact".to_string()),
                QdiscKind::Ingress => (String::new(), "ingress".to_string()),
                QdiscKind::Htb(h) => {
                    let mut kind = format!("htb default {:x}", h.default_class);
                    if h.r2q != HtbQdisc::default().r2q {
                        let _ = write!(kind, " r2q {}", h.r2q);
                    }
                    if let Some(qlen) = h.direct_qlen {
                        let _ = write!(kind, " direct_qlen {qlen}");
                    }
                    (format!("root handle {} ", q.handle), kind)
                }
                QdiscKind::Tbf(t) => (
                    format!("parent {} handle {} ", q.parent, q.handle),
                    format!(
                        "tbf rate {}bps burst {}b limit {}b",
                        t.rate,
                        tbf_burst_for_tc(t),
                        t.limit
                    ),
                ),
                QdiscKind::FqCodel(f) => (
                    format!("parent {} handle {} ", q.parent, q.handle),
                    format!("fq_codel {}", f.options_text()),
                ),
                QdiscKind::Other { kind, .. } => {
                    (format!("root handle {} ", q.handle), kind.clone())
                }
            };
            if op == Op::Delete {
                let place = if place.is_empty() {
                    kind
                } else {
                    place.trim_end().to_string()
                };
                return format!("tc qdisc del dev {dev} {place}");
            }
            format!("tc qdisc {verb} dev {dev} {place}{kind}")
        }
        TcObject::Class(c) => {
            if op == Op::Delete {
                return format!("tc class del dev {dev} classid {}", c.handle);
            }
            let mut s = format!(
                "tc class {verb} dev {dev} parent {} classid {}",
                c.parent, c.handle
            );
            if let ClassKind::Htb(h) = &c.kind {
                let _ = write!(
                    s,
                    " htb rate {}bps ceil {}bps burst {}b cburst {}b quantum {}",
                    h.rate,
                    h.ceil,
                    burst_for_tc(h.rate, h.buffer),
                    burst_for_tc(h.ceil, h.cbuffer),
                    h.quantum
                );
            }
            s
        }
        TcObject::Filter(f) => render_filter(op, dev, f, redirect_to),
    }
}

/// The burst to give `tc` for a TBF bucket: tc turns it into whole microseconds at the rate and
/// then into ticks, so the bytes of the bucket's time rounded up to a microsecond land on the
/// same ticks (raylimit's leaves refill in 15 ticks, tc's "1us").
fn tbf_burst_for_tc(t: &crate::model::tbf::TbfQdisc) -> u64 {
    let micros = (t.buffer as u64 * crate::model::htb::NSEC_PER_TICK).div_ceil(1000);
    (micros as u128 * t.rate as u128).div_ceil(1_000_000) as u64
}

fn parent_words(parent: TcHandle) -> String {
    match parent {
        TcHandle::CLSACT_INGRESS | TcHandle::INGRESS_QDISC => "ingress".into(),
        p => format!("parent {p}"),
    }
}

fn render_filter(op: Op, dev: &str, f: &Filter, redirect_to: Option<&Dev>) -> String {
    let mut s = format!(
        "tc filter {} dev {dev} {} protocol {} pref {}",
        op.verb(),
        parent_words(f.parent),
        crate::model::tc::protocol_name(f.protocol),
        f.priority
    );
    if op == Op::Delete && f.handle == 0 {
        let _ = write!(s, " {}", f.kind_name());
        return s;
    }
    let target = |a: &Action| match (a, redirect_to) {
        (Action::Mirred { .. }, Some(d)) => format!("mirred egress redirect dev {}", d.name()),
        (Action::Connmark { zone, verdict }, _) => format!("connmark zone {zone} {verdict}"),
        (a, _) => a.to_string(),
    };
    match &f.kind {
        FilterKind::U32(u) => {
            let handle = U32Handle(f.handle);
            let _ = write!(s, " handle {handle} u32");
            if op != Op::Delete {
                s.push_str(&render_u32(u));
                for a in &u.actions {
                    let _ = write!(s, " action {}", target(a));
                }
            }
        }
        FilterKind::MatchAll(m) => {
            let _ = write!(s, " handle 0x{:x} matchall", f.handle);
            if op != Op::Delete {
                if let Some(c) = m.classid {
                    let _ = write!(s, " classid {c}");
                }
                for a in &m.actions {
                    let _ = write!(s, " action {}", target(a));
                }
            }
        }
        FilterKind::Fw(fw) => {
            let _ = write!(s, " handle 0x{:x}", f.handle);
            if let Some(m) = fw.mask {
                let _ = write!(s, "/0x{m:x}");
            }
            s.push_str(" fw");
            if op != Op::Delete {
                if let Some(c) = fw.classid {
                    let _ = write!(s, " classid {c}");
                }
            }
        }
        FilterKind::Other { .. } => {
            let _ = write!(s, " handle 0x{:x} {}", f.handle, f.kind_name());
        }
    }
    s
}

/// u32 options in tc's words, recognising raylimit's shapes (tables, links, address nodes).
fn render_u32(u: &U32Filter) -> String {
    if let Some(d) = u.divisor {
        return format!(" divisor {d}");
    }
    let mut s = String::new();
    if let Some(h) = u.hash {
        let _ = write!(s, " ht {h}");
    }
    if let Some(l) = u.link {
        let _ = write!(s, " link {l}");
    }
    if let Some(sel) = &u.selector {
        if sel.hmask != 0 {
            let _ = write!(s, " hashkey mask 0x{:08x} at {}", sel.hmask, sel.hoff);
        }
        let address = [
            (Family::V4, End::Source),
            (Family::V4, End::Destination),
            (Family::V6, End::Source),
            (Family::V6, End::Destination),
        ]
        .into_iter()
        .find_map(|(fam, end)| {
            [false, true]
                .into_iter()
                .find_map(|port| shaping::node_match(u, fam, end, port))
                .map(|m| (fam, end, m))
        });
        match address {
            Some((fam, end, m)) => {
                let (word, len) = match fam {
                    Family::V4 => ("ip", 32),
                    Family::V6 => ("ip6", 128),
                };
                let side = if end == End::Source { "src" } else { "dst" };
                let _ = write!(s, " match {word} {side} {}/{len}", m.ip);
                if let Some(port) = m.port {
                    let _ = write!(s, " match {word} {}port {port} 0xffff", &side[..1]);
                }
                // A runtime-scoped node: the runtime's listener at the other end.
                if let Some(l) = m.listener {
                    let far = if end == End::Source { "dst" } else { "src" };
                    if let Some(a) = l.address {
                        let _ = write!(s, " match {word} {far} {a}/{len}");
                    }
                    let _ = write!(s, " match {word} {}port {} 0xffff", &far[..1], l.port);
                }
            }
            // A wildcard listener: the port alone.
            None if sel.keys.len() == 1 => {
                let port = [Family::V4, Family::V6].into_iter().find_map(|fam| {
                    [End::Source, End::Destination].into_iter().find_map(|end| {
                        shaping::listener_match(u, fam, end).map(|m| (fam, end, m.port))
                    })
                });
                match port {
                    Some((fam, end, port)) => {
                        let word = if fam == Family::V4 { "ip" } else { "ip6" };
                        let side = if end == End::Source { "s" } else { "d" };
                        let _ = write!(s, " match {word} {side}port {port} 0xffff");
                    }
                    None => {
                        let k = sel.keys[0];
                        let _ = write!(
                            s,
                            " match u32 0x{:x} 0x{:x} at {}",
                            k.value, k.mask, k.offset
                        );
                    }
                }
            }
            None => {
                for k in &sel.keys {
                    let _ = write!(
                        s,
                        " match u32 0x{:x} 0x{:x} at {}",
                        k.value, k.mask, k.offset
                    );
                }
            }
        }
    }
    if let Some(c) = u.classid {
        let _ = write!(s, " classid {c}");
    }
    s
}

//! An in-memory kernel for unit tests: it applies plan steps the way the kernel does for the
//! objects raylimit makes, refuses what the kernel refuses, and answers the engine's reads, so
//! decisions, whole runs, batching and rollback are tested without root or namespaces.

use std::collections::BTreeSet;

use super::kernel::{Kernel, StepOutcome};
use crate::model::stats::TcStats;
use crate::model::tc::{ClassEntry, Filter, FilterEntry, FilterKind, Op, QdiscEntry, QdiscKind};
use crate::model::u32::U32Filter;
use crate::model::DeviceTc;
use crate::model::Link;
use crate::model::U32Handle;
use crate::netlink::nft::NftState;
use crate::netlink::probe::{Availability, Capabilities, Feature};
use crate::netlink::NetlinkError;
use crate::policy::{Direction, Request};
use crate::reconcile::observe::{restores_mark, Hook, Observation, ShapedRoot};
use crate::reconcile::plan::{Dev, Operation, Step, TcObject};
use crate::shaping;

/// The shaped device's index and name.
pub const DEV: u32 = 5;
pub const DEV_NAME: &str = "eth0";
/// The index its IFB gets when created.
pub const IFB: u32 = 9;

/// Returns the kernel's refusal from the enclosing function when `cond` does not hold.
macro_rules! ensure {
    ($cond:expr, $($why:tt)+) => {
        if !$cond {
            return Err(format!($($why)+));
        }
    };
}

/// Applies steps the way the kernel would, for the objects raylimit makes, and refuses what the
/// kernel refuses (a node in a missing table, a linked table's delete, a duplicate).
#[derive(Default)]
pub struct FakeKernel {
    pub device: DeviceTc,
    pub ifb: Option<DeviceTc>,
    /// u32 tables of deleted priorities the kernel keeps (invisible) while another u32 priority
    /// shares the qdisc: (ifindex, table id).
    pub orphans: BTreeSet<(u32, u32)>,
    pub nft: crate::netlink::nft::NftState,
    pub next_handle: u64,
    pub next_root_table: u32,
}

impl FakeKernel {
    fn tc_mut(&mut self, dev: &Dev) -> Result<&mut DeviceTc, String> {
        match dev {
            Dev::Index { index, .. } if *index == DEV => Ok(&mut self.device),
            _ => self
                .ifb
                .as_mut()
                .ok_or_else(|| "ENODEV: no IFB".to_string()),
        }
    }

    /// Applies `steps` in order; panics at the first one the kernel would refuse.
    pub fn apply(&mut self, steps: &[Step]) {
        for s in steps {
            if let Err(e) = self.apply_step(s) {
                panic!("{}: {e}", s.command());
            }
        }
    }

    /// Applies one step, or says why the kernel would refuse it.
    pub fn apply_step(&mut self, s: &Step) -> Result<(), String> {
        {
            match &s.action {
                Operation::Nft { ops, .. } => {
                    for op in ops {
                        self.nft_op(op)?;
                    }
                }
                Operation::NftRemoveTagged { rule, subject, .. } => {
                    self.nft.rules.retain(|r| {
                        !(&r.rule == rule && r.tag.as_ref().is_some_and(|t| &t.subject == subject))
                    });
                }
                Operation::CreateIfb(_) => {
                    self.ifb = Some(DeviceTc {
                        ifindex: IFB,
                        ..Default::default()
                    })
                }
                Operation::SetUp(_) => {}
                Operation::DeleteLink(_) => self.ifb = None,
                Operation::Tc {
                    op,
                    dev,
                    object,
                    redirect_to,
                } => {
                    let mut object = object.clone();
                    // The IFB's index is filled in at execution.
                    if let (Some(_), TcObject::Filter(f)) = (redirect_to, &mut object) {
                        use crate::model::action::Action;
                        let actions = match &mut f.kind {
                            FilterKind::U32(u) => &mut u.actions,
                            FilterKind::MatchAll(m) => &mut m.actions,
                            _ => unreachable!("redirects are u32 or matchall"),
                        };
                        for a in actions.iter_mut() {
                            if let Action::Mirred { .. } = a {
                                *a = Action::redirect_to(IFB);
                            }
                        }
                    }
                    let tc = self.tc_mut(dev)?;
                    let ifindex = tc.ifindex;
                    match object {
                        TcObject::Qdisc(mut q) => {
                            q.ifindex = ifindex;
                            let under_class = q.parent.major() == shaping::ROOT_MAJOR;
                            ensure!(
                                !under_class
                                    || tc.classes.iter().any(|c| c.class.handle == q.parent),
                                "ENOENT: class {} not found",
                                q.parent
                            );
                            // Under its own handle a qdisc changes only into its own kind,
                            // and an fq_codel never names its flow count in a change (the
                            // kernel keeps the one it was made with).
                            let same = tc.qdiscs.iter().find(|e| e.qdisc.handle == q.handle);
                            if matches!(op, Op::Change | Op::Replace) {
                                if let Some(e) = same {
                                    ensure!(
                                        e.qdisc.kind_name() == q.kind_name(),
                                        "EINVAL: Invalid qdisc name: must match existing qdisc"
                                    );
                                    if let (QdiscKind::FqCodel(old), QdiscKind::FqCodel(new)) =
                                        (&e.qdisc.kind, &mut q.kind)
                                    {
                                        ensure!(*op == Op::Change, "EINVAL: fq_codel flows");
                                        new.flows = old.flows;
                                    }
                                }
                            }
                            ensure!(
                                *op != Op::Change || same.is_some(),
                                "ENOENT: qdisc {} not found",
                                q.handle
                            );
                            // A class holds one leaf: a new one is grafted in its place.
                            tc.qdiscs.retain(|e| {
                                e.qdisc.handle != q.handle
                                    && !(under_class && e.qdisc.parent == q.parent)
                            });
                            if *op == Op::Delete {
                                if q.handle == shaping::root_handle() {
                                    tc.classes.clear();
                                    tc.qdiscs
                                        .retain(|e| e.qdisc.parent.major() != shaping::ROOT_MAJOR);
                                    tc.filters.retain(|f| f.filter.parent != q.handle);
                                    self.orphans.retain(|(i, _)| *i != ifindex);
                                }
                            } else {
                                tc.qdiscs.push(QdiscEntry {
                                    qdisc: q,
                                    stats: TcStats::default(),
                                    htb: None,
                                });
                            }
                        }
                        TcObject::Class(mut c) => {
                            c.ifindex = ifindex;
                            tc.classes.retain(|e| e.class.handle != c.handle);
                            if *op == Op::Delete {
                                tc.qdiscs.retain(|e| e.qdisc.parent != c.handle);
                            }
                            if *op != Op::Delete {
                                tc.classes.push(ClassEntry {
                                    class: c.canonical(),
                                    stats: TcStats::default(),
                                    htb: None,
                                });
                            }
                        }
                        TcObject::Filter(mut f) => {
                            f.ifindex = ifindex;
                            self.filter_op(dev, *op, f, s.exists_ok)?;
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// A tc filter operation, with u32's rules for tables, links and root tables.
    fn filter_op(
        &mut self,
        dev: &Dev,
        op: Op,
        mut f: Filter,
        exists_ok: bool,
    ) -> Result<(), String> {
        let ifindex = f.ifindex;
        let root_id = self.next_root_table;
        let tc = self.tc_mut(dev)?;
        let at =
            |e: &FilterEntry, prio: u16, h: u32| e.filter.priority == prio && e.filter.handle == h;
        let is_table =
            |e: &FilterEntry| matches!(&e.filter.kind, FilterKind::U32(u) if u.divisor.is_some());
        let u32_prios = |tc: &DeviceTc| -> BTreeSet<u16> {
            tc.filters
                .iter()
                .filter(|e| matches!(e.filter.kind, FilterKind::U32(_)))
                .map(|e| e.filter.priority)
                .collect()
        };
        if op == Op::Delete && f.handle == 0 {
            let found = tc.filters.iter().any(|e| e.filter.priority == f.priority);
            ensure!(found || exists_ok, "ENOENT: priority {}", f.priority);
            // The priority's own tables stay behind while another u32 priority remains.
            let others = u32_prios(tc).len() > 1;
            let left: Vec<u32> = tc
                .filters
                .iter()
                .filter(|e| e.filter.priority == f.priority && is_table(e))
                .map(|e| U32Handle(e.filter.handle).table())
                .filter(|t| *t < U32Handle::ROOT_TABLE)
                .collect();
            tc.filters.retain(|e| e.filter.priority != f.priority);
            if others {
                self.orphans.extend(left.into_iter().map(|t| (ifindex, t)));
            } else {
                self.orphans.retain(|(i, _)| *i != ifindex);
            }
            return Ok(());
        }
        let FilterKind::U32(u) = &f.kind else {
            tc.filters.retain(|e| !at(e, f.priority, f.handle));
            if op != Op::Delete {
                tc.filters.push(FilterEntry {
                    filter: f,
                    chain: Some(0),
                });
            }
            return Ok(());
        };
        let mut h = U32Handle(f.handle);
        // A node given without a table lands in the priority's root table, made with the priority.
        let root = tc
            .filters
            .iter()
            .find(|e| {
                e.filter.priority == f.priority
                    && is_table(e)
                    && U32Handle(e.filter.handle).table() >= U32Handle::ROOT_TABLE
            })
            .map(|e| U32Handle(e.filter.handle).table());
        if h.table() == 0 && !h.is_table() {
            let Some(root) = root else {
                ensure!(
                    op != Op::Delete || exists_ok,
                    "ENOENT: no priority {}",
                    f.priority
                );
                if op == Op::Delete {
                    return Ok(());
                }
                // Created below, with the priority.
                h = U32Handle::new(0x800 + root_id, 0, h.node());
                f.handle = h.0;
                return self.create_with_root(dev, f, root_id);
            };
            h = U32Handle::new(root, 0, h.node());
            f.handle = h.0;
        }
        let tables: BTreeSet<u32> = tc
            .filters
            .iter()
            .filter(|e| is_table(e))
            .map(|e| U32Handle(e.filter.handle).table())
            .collect();
        let exists = tc.filters.iter().any(|e| at(e, f.priority, h.0));
        match op {
            Op::Delete => {
                ensure!(exists || exists_ok, "ENOENT: {}", f);
                if h.is_table() {
                    let linked = tc
                        .filters
                        .iter()
                        .any(|e| matches!(&e.filter.kind, FilterKind::U32(n) if n.link == Some(h)));
                    ensure!(!linked, "EBUSY: table {h} is linked to");
                    tc.filters.retain(|e| {
                        U32Handle(e.filter.handle).table() != h.table()
                            || e.filter.priority != f.priority
                    });
                } else {
                    tc.filters.retain(|e| !at(e, f.priority, h.0));
                }
                // The kernel drops the only u32 priority of a qdisc with its last node.
                let prios = u32_prios(tc);
                let knodes = tc
                    .filters
                    .iter()
                    .any(|e| !is_table(e) && matches!(e.filter.kind, FilterKind::U32(_)));
                if prios.len() == 1 && !knodes {
                    tc.filters
                        .retain(|e| !matches!(e.filter.kind, FilterKind::U32(_)));
                    self.orphans.retain(|(i, _)| *i != ifindex);
                }
            }
            _ => {
                if h.is_table() {
                    ensure!(
                        !self.orphans.contains(&(ifindex, h.table())),
                        "EEXIST: orphaned table {h}"
                    );
                    ensure!(
                        !tables.contains(&h.table()) || exists_ok,
                        "EEXIST: table {h}"
                    );
                } else {
                    ensure!(tables.contains(&h.table()), "EINVAL: no table for {}", f);
                    if let Some(l) = u.link {
                        ensure!(tables.contains(&l.table()), "EINVAL: link to missing {l}");
                    }
                    ensure!(op != Op::Create || !exists || exists_ok, "EEXIST: {}", f);
                }
                if op == Op::Create && exists {
                    return Ok(());
                }
                if root.is_none() {
                    return self.create_with_root(dev, f, root_id);
                }
                let tc = self.tc_mut(dev)?;
                tc.filters.retain(|e| !at(e, f.priority, h.0));
                tc.filters.push(FilterEntry {
                    filter: f.canonical(),
                    chain: Some(0),
                });
            }
        }
        Ok(())
    }

    /// Creates the first filter of a u32 priority, with the root table the kernel gives it.
    fn create_with_root(&mut self, dev: &Dev, f: Filter, root_id: u32) -> Result<(), String> {
        self.next_root_table += 1;
        let root = Filter {
            handle: U32Handle::new(0x800 + root_id, 0, 0).0,
            kind: FilterKind::U32(U32Filter::table(1)),
            ..f.clone()
        };
        let tc = self.tc_mut(dev)?;
        tc.filters.push(FilterEntry {
            filter: root,
            chain: Some(0),
        });
        tc.filters.push(FilterEntry {
            filter: f.canonical(),
            chain: Some(0),
        });
        Ok(())
    }

    fn nft_op(&mut self, op: &crate::netlink::nft::NftOp) -> Result<(), String> {
        use crate::netlink::nft::{ManagedRule, NftOp};
        match op {
            NftOp::AddTable => self.nft.table = true,
            NftOp::AddChain(c) => self.nft.chains.push(c.to_string()),
            NftOp::AddRule { rule, tag } => {
                ensure!(
                    self.nft.chains.iter().any(|c| c == rule.chain()),
                    "ENOENT: no chain {}",
                    rule.chain()
                );
                self.next_handle += 1;
                self.nft.rules.push(ManagedRule {
                    chain: rule.chain().into(),
                    handle: self.next_handle,
                    rule: rule.clone(),
                    tag: Some(tag.clone()),
                    packets: 0,
                    bytes: 0,
                });
            }
            NftOp::DeleteRule { handle, .. } => self.nft.rules.retain(|r| r.handle != *handle),
            NftOp::DeleteChain(c) => self.nft.chains.retain(|x| x != c),
            NftOp::DeleteTable => self.nft = Default::default(),
        }
        Ok(())
    }

    /// The device's ingress redirect copies the connection's mark first.
    pub fn redirect_restores_mark(&self) -> bool {
        let hook = Hook::read(&self.device);
        let (redirect, _) = hook.redirect.expect("a redirect");
        restores_mark(&redirect.filter)
    }

    /// What a request is decided on: its shaped root, and raylimit's nft table.
    pub fn observe_for(&self, req: &Request) -> Observation {
        let direction = if req.on_egress() {
            Direction::Download
        } else {
            Direction::Upload
        };
        let mut obs = self.observe(direction);
        obs.nft = Some(Ok(self.nft.clone()));
        obs
    }

    pub fn observe(&self, direction: Direction) -> Observation {
        let link = |index: u32, name: &str| Link {
            index,
            name: name.into(),
            kind: None,
            up: true,
            mtu: 1500,
        };
        match direction {
            Direction::Download => Observation {
                device: link(DEV, "eth0"),
                shaped: Some(ShapedRoot::read(
                    &self.device,
                    shaping::client_end(direction),
                )),
                ifb: None,
                hook: None,
                error: None,
                nft: None,
            },
            Direction::Upload => Observation {
                device: link(DEV, "eth0"),
                shaped: self
                    .ifb
                    .as_ref()
                    .map(|t| ShapedRoot::read(t, shaping::client_end(direction))),
                ifb: self.ifb.as_ref().map(|_| link(IFB, "rlifb5")),
                hook: Some(Hook::read(&self.device)),
                error: None,
                nft: None,
            },
        }
    }
}

/// What the fake kernel was asked to do, for tests of batching and rollback.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Calls {
    /// The size of each batch, in the order sent.
    pub batches: Vec<usize>,
    /// The name of each step run, in order.
    pub steps: Vec<String>,
    /// Reads of a device's tc objects.
    pub dumps: usize,
}

/// The fake kernel as the engine uses it, with optional features and an injected failure.
#[derive(Default)]
pub struct Fake {
    pub kernel: FakeKernel,
    /// The optional tc features it offers (matchall, fw, connmark, gact).
    pub features: Vec<Feature>,
    /// The step (counted from 0 over every step run) that the kernel refuses.
    pub fail_at: Option<usize>,
    pub calls: Calls,
}

impl Kernel for Fake {
    fn link_by_name(&mut self, name: &str) -> Result<Link, NetlinkError> {
        let link = |index: u32| Link {
            index,
            name: name.into(),
            kind: None,
            up: true,
            mtu: 1500,
        };
        match name {
            DEV_NAME => Ok(link(DEV)),
            _ if name == shaping::ifb_name(DEV) && self.kernel.ifb.is_some() => Ok(link(IFB)),
            _ => Err(NetlinkError::NoSuchDevice(name.into())),
        }
    }

    fn device_tc(&mut self, ifindex: u32) -> Result<DeviceTc, NetlinkError> {
        self.calls.dumps += 1;
        match ifindex {
            DEV => Ok(self.kernel.device.clone()),
            IFB if self.kernel.ifb.is_some() => Ok(self.kernel.ifb.clone().unwrap_or_default()),
            _ => Err(NetlinkError::NoSuchDevice(format!("ifindex {ifindex}"))),
        }
    }

    fn nft(&mut self) -> Result<NftState, NetlinkError> {
        Ok(self.kernel.nft.clone())
    }

    fn capabilities(&mut self) -> Capabilities {
        Capabilities {
            features: Feature::ALL
                .into_iter()
                .map(|f| {
                    let a = match self.features.contains(&f) {
                        true => Availability::Present("fake kernel".into()),
                        false => Availability::Absent("fake kernel".into()),
                    };
                    (f, a)
                })
                .collect(),
        }
    }

    fn run_batch(&mut self, steps: &[&Step]) -> Vec<StepOutcome> {
        self.calls.batches.push(steps.len());
        steps
            .iter()
            .map(|s| {
                let n = self.calls.steps.len();
                self.calls.steps.push(s.name.to_string());
                if self.fail_at == Some(n) {
                    return Err(format!("{}: injected failure", s.command()));
                }
                self.kernel.apply_step(s).map(|()| None)
            })
            .collect()
    }
}

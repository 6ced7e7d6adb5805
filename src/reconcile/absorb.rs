//! Keeping an observation current while many subjects are decided in one run: each decision's
//! steps are absorbed into the observation the next decision reads, exactly as a fresh dump
//! after executing them would read, so one dump serves a whole run.

use crate::model::nft::{ManagedRule, NftOp, NftState};
use crate::model::tc::{ClassEntry, Op, QdiscEntry, QdiscKind};
use crate::model::u32::End;
use crate::model::Link;
use crate::model::TcHandle;
use crate::shaping::ROOT_MAJOR;

use super::observe::{Hook, Observation, RootState, ShapedRoot};
use super::plan::{Dev, Operation, Step, TcObject};

impl Observation {
    /// Applies a planned step to this observation. `egress`: the observation is of a device's
    /// egress root (download, outbound upload), not of its IFB.
    pub fn absorb(&mut self, step: &Step, egress: bool) {
        let end = if egress {
            End::Destination
        } else {
            End::Source
        };
        match &step.action {
            Operation::CreateIfb(name) => {
                // Its index is known only once it exists: 0 stands for "created in this run".
                self.ifb = Some(Link {
                    index: 0,
                    name: name.clone(),
                    kind: Some("ifb".into()),
                    up: false,
                    mtu: crate::shaping::ETHERNET_MTU,
                });
                self.shaped = Some(ShapedRoot::empty(0, end));
            }
            Operation::SetUp(dev) => {
                if let Some(ifb) = self.ifb.as_mut().filter(|l| l.name == dev.name()) {
                    ifb.up = true;
                }
            }
            Operation::DeleteLink(dev) => {
                if self.ifb.as_ref().is_some_and(|l| l.name == dev.name()) {
                    self.ifb = None;
                    self.shaped = None;
                }
            }
            Operation::Tc {
                op, dev, object, ..
            } => {
                let on_hook = !egress && self.on_device(dev);
                match object {
                    TcObject::Qdisc(q) if on_hook => self.absorb_hook_qdisc(*op, &q.kind),
                    TcObject::Filter(f) if on_hook => {
                        let target = self.ifb.as_ref().map(|l| l.index).unwrap_or(0);
                        let hook = self.hook.get_or_insert_with(Hook::none);
                        let entry = crate::model::tc::FilterEntry {
                            filter: f.clone(),
                            chain: None,
                        };
                        match crate::shaping::redirect_listener(f) {
                            Some(m) => {
                                hook.listeners.retain(|(l, _, _)| *l != m);
                                if *op != Op::Delete {
                                    hook.listeners.push((m, entry, target));
                                }
                            }
                            None => hook.redirect = (*op != Op::Delete).then_some((entry, target)),
                        }
                    }
                    _ => {
                        let ifindex = self.ifb.as_ref().filter(|_| !egress).map(|l| l.index);
                        let shaped = self.shaped.get_or_insert_with(|| {
                            ShapedRoot::empty(ifindex.unwrap_or(self.device.index), end)
                        });
                        shaped.absorb(*op, object, end);
                    }
                }
            }
            Operation::Nft { ops, .. } => {
                let state = match self.nft.take() {
                    Some(Ok(s)) => s,
                    _ => NftState::default(),
                };
                self.nft = Some(Ok(absorb_nft(state, ops)));
            }
            // Only ever an undo step.
            Operation::NftRemoveTagged { .. } => {}
        }
    }

    fn on_device(&self, dev: &Dev) -> bool {
        matches!(dev, Dev::Index { index, .. } if *index == self.device.index)
    }

    fn absorb_hook_qdisc(&mut self, op: Op, kind: &QdiscKind) {
        let hook = self.hook.get_or_insert_with(Hook::none);
        if op == Op::Delete {
            *hook = Hook::none();
            return;
        }
        hook.clsact = matches!(kind, QdiscKind::Clsact);
        hook.parent = Some(if hook.clsact {
            TcHandle::CLSACT_INGRESS
        } else {
            TcHandle::INGRESS_QDISC
        });
    }
}

impl ShapedRoot {
    fn absorb(&mut self, op: Op, object: &TcObject, end: End) {
        match (op, object) {
            (Op::Delete, TcObject::Qdisc(q)) if q.parent == TcHandle::ROOT => {
                *self = ShapedRoot::empty(self.ifindex, end);
            }
            (_, TcObject::Qdisc(q)) if q.parent == TcHandle::ROOT => {
                self.root = RootState::Managed(QdiscEntry {
                    qdisc: q.clone(),
                    stats: Default::default(),
                    htb: None,
                });
            }
            (op, TcObject::Qdisc(q)) if q.parent.major() == ROOT_MAJOR => {
                let minor = q.parent.minor();
                match op {
                    Op::Delete => self.leaves.remove(&minor),
                    _ => self.leaves.insert(minor, q.clone()),
                };
            }
            (_, TcObject::Qdisc(_)) => {}
            (Op::Delete, TcObject::Class(c)) => {
                // The kernel destroys the class's leaf with it.
                self.classes.remove(&c.handle.minor());
                self.leaves.remove(&c.handle.minor());
            }
            (_, TcObject::Class(c)) => {
                // As the kernel reports it: a class right under the root qdisc has parent
                // TC_H_ROOT.
                self.classes.insert(
                    c.handle.minor(),
                    ClassEntry {
                        class: c.canonical(),
                        stats: Default::default(),
                        htb: None,
                    },
                );
            }
            (Op::Delete, TcObject::Filter(f)) => self.forget_filter(f.priority, f.handle),
            (_, TcObject::Filter(f)) => self.absorb_filter(f, end),
        }
    }
}

/// The nft table after a batch of ops. A new rule's handle is known only once it exists.
fn absorb_nft(mut state: NftState, ops: &[NftOp]) -> NftState {
    for op in ops {
        match op {
            NftOp::AddTable => state.table = true,
            NftOp::AddChain(name) => {
                if !state.chains.iter().any(|c| c == name) {
                    state.chains.push(name.to_string());
                }
            }
            NftOp::AddRule { rule, tag } => state.rules.push(ManagedRule {
                chain: rule.chain().to_string(),
                handle: 0,
                rule: rule.clone(),
                tag: Some(tag.clone()),
                packets: 0,
                bytes: 0,
            }),
            NftOp::DeleteRule { chain, handle } => state
                .rules
                .retain(|r| !(r.chain == *chain && r.handle == *handle)),
            NftOp::DeleteChain(name) => {
                state.chains.retain(|c| c != name);
                state.rules.retain(|r| r.chain != *name);
            }
            NftOp::DeleteTable => state = NftState::default(),
        }
    }
    state
}

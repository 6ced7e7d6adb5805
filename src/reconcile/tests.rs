//! Decisions against a small in-memory kernel: plans applied to it must converge (a second
//! decision is `no_op`), keep their order, and remove exactly what they should.

use super::observe::*;
use super::plan::*;
use super::*;
use crate::netlink::dump::DeviceTc;
use crate::netlink::stats::TcStats;
use crate::netlink::tc::{ClassEntry, FilterEntry, QdiscEntry};

const DEV: u32 = 5;
const IFB: u32 = 9;

/// Applies steps the way the kernel would, for the objects raylimit makes.
#[derive(Default)]
struct FakeKernel {
    device: DeviceTc,
    ifb: Option<DeviceTc>,
}

impl FakeKernel {
    fn tc_mut(&mut self, dev: &Dev) -> &mut DeviceTc {
        match dev {
            Dev::Index { index, .. } if *index == DEV => &mut self.device,
            _ => self.ifb.as_mut().expect("IFB exists"),
        }
    }

    fn apply(&mut self, steps: &[Step]) {
        for s in steps {
            match &s.action {
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
                    if let (Some(_), TcObject::Filter(f)) = (redirect_to, &mut object) {
                        if let FilterKind::U32(u) = &mut f.kind {
                            u.actions = vec![crate::netlink::action::Action::redirect_to(IFB)];
                        }
                    }
                    let tc = self.tc_mut(dev);
                    let ifindex = tc.ifindex;
                    match object {
                        TcObject::Qdisc(mut q) => {
                            q.ifindex = ifindex;
                            tc.qdiscs.retain(|e| e.qdisc.handle != q.handle);
                            if *op == Op::Delete {
                                if q.handle == shaping::root_handle() {
                                    tc.classes.clear();
                                    tc.filters.retain(|f| f.filter.parent != q.handle);
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
                            if *op == Op::Delete && f.handle == 0 {
                                tc.filters.retain(|e| e.filter.priority != f.priority);
                                continue;
                            }
                            // A node given without a table lands in the priority's root table.
                            let mut h = U32Handle(f.handle);
                            if matches!(f.kind, FilterKind::U32(_)) && h.table() == 0 {
                                h = U32Handle::new(0x800, 0, h.node());
                                f.handle = h.0;
                            }
                            tc.filters.retain(|e| {
                                !(e.filter.priority == f.priority && e.filter.handle == f.handle)
                            });
                            if *op != Op::Delete {
                                tc.filters.push(FilterEntry {
                                    filter: f.canonical(),
                                    chain: Some(0),
                                });
                            }
                        }
                    }
                }
            }
        }
    }

    fn observe(&self, direction: Direction) -> Observation {
        let link = |index: u32, name: &str| Link {
            index,
            name: name.into(),
            kind: None,
            up: true,
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
            },
        }
    }
}

fn ctx(subject: &str, direction: Direction, want: Want) -> Context {
    Context {
        request: Request {
            subject: crate::policy::parse_ip_subject(subject, false).unwrap(),
            direction,
            device: "eth0".into(),
            want,
        },
        catch_all: CatchAll::U32,
        allow_missing_state: false,
        owned_by_other: None,
        remembered_minor: None,
    }
}

fn run(k: &mut FakeKernel, c: &Context) -> Decision {
    let d = decide(c, &k.observe(c.request.direction));
    assert!(d.blocked.is_none(), "{:?}", d.blocked);
    k.apply(&d.steps);
    d
}

fn names(d: &Decision) -> Vec<&str> {
    d.steps.iter().map(|s| s.name.as_str()).collect()
}

#[test]
fn apply_then_no_op_then_change_in_place_then_remove() {
    for direction in [Direction::Download, Direction::Upload] {
        let mut k = FakeKernel::default();
        let first = run(&mut k, &ctx("10.0.0.2", direction, Want::Limit(1_000_000)));
        assert_eq!(first.kind, DecisionKind::Apply);
        let order = names(&first);
        let pos = |n: &str| order.iter().position(|s| *s == n).unwrap();
        assert!(pos("create-root-qdisc") < pos("create-class"));
        assert!(pos("create-class") < pos("create-filter"), "{order:?}");
        if direction == Direction::Upload {
            assert_eq!(order[0], "create-ifb");
            assert_eq!(*order.last().unwrap(), "create-redirect");
        }
        let again = run(&mut k, &ctx("10.0.0.2", direction, Want::Limit(1_000_000)));
        assert_eq!(again.kind, DecisionKind::NoOp, "{:?}", names(&again));
        assert!(again.matched);

        let change = run(&mut k, &ctx("10.0.0.2", direction, Want::Limit(2_000_000)));
        assert_eq!(change.kind, DecisionKind::Replace);
        assert_eq!(names(&change), ["change-class"]);

        let removed = run(&mut k, &ctx("10.0.0.2", direction, Want::Remove));
        assert_eq!(removed.kind, DecisionKind::Remove);
        assert!(names(&removed).contains(&"delete-root-qdisc"));
        assert!(k.device.qdiscs.is_empty(), "{:?}", k.device.qdiscs);
        assert!(k.ifb.is_none());
        let nothing = run(&mut k, &ctx("10.0.0.2", direction, Want::Remove));
        assert_eq!(nothing.kind, DecisionKind::NoOp);
    }
}

#[test]
fn baseline_and_specific_rules_coexist_and_remove_independently() {
    let mut k = FakeKernel::default();
    let dl = Direction::Download;
    run(&mut k, &ctx("all", dl, Want::Limit(500_000)));
    run(&mut k, &ctx("10.0.0.2", dl, Want::Unlimited));
    run(&mut k, &ctx("fd00::2", dl, Want::Limit(700_000)));
    let obs = k.observe(dl);
    let shaped = obs.shaped.as_ref().unwrap();
    assert!(shaped.baseline.is_some());
    assert_eq!(shaped.ip_nodes.len(), 2);
    let unlimited = shaped.node_for("10.0.0.2".parse().unwrap()).unwrap();
    assert_eq!(unlimited.classid, Some(shaping::root_handle()));

    let d = run(&mut k, &ctx("10.0.0.2", dl, Want::Remove));
    assert!(!names(&d).contains(&"delete-root-qdisc"));
    assert!(names(&d).contains(&"delete-address-band"));
    let after = k.observe(dl);
    let s = after.shaped.as_ref().unwrap();
    assert!(s.baseline.is_some());
    assert_eq!(s.ip_nodes.len(), 1);
    assert_eq!(
        decide(&ctx("all", dl, Want::Limit(500_000)), &after).kind,
        DecisionKind::NoOp
    );
}

#[test]
fn limited_to_unlimited_moves_the_filter_before_deleting_the_class() {
    let mut k = FakeKernel::default();
    let dl = Direction::Download;
    run(&mut k, &ctx("10.0.0.2", dl, Want::Limit(1_000_000)));
    let d = run(&mut k, &ctx("10.0.0.2", dl, Want::Unlimited));
    assert_eq!(d.kind, DecisionKind::Replace);
    assert_eq!(names(&d), ["replace-filter", "delete-class"]);
    assert!(k.device.classes.is_empty());
}

#[test]
fn a_foreign_root_blocks_execution_and_names_it() {
    let mut k = FakeKernel::default();
    k.device.qdiscs.push(QdiscEntry {
        qdisc: Qdisc {
            ifindex: DEV,
            handle: TcHandle::new(1, 0),
            parent: TcHandle::ROOT,
            kind: QdiscKind::Other {
                kind: "fq".into(),
                options: None,
            },
        },
        stats: TcStats::default(),
        htb: None,
    });
    let d = decide(
        &ctx("10.0.0.2", Direction::Download, Want::Limit(1000)),
        &k.observe(Direction::Download),
    );
    assert!(d.blocked.unwrap().contains("fq 1:"));
}

#[test]
fn minors_probe_past_classes_in_use() {
    let mut k = FakeKernel::default();
    let dl = Direction::Download;
    let a = run(&mut k, &ctx("10.0.0.2", dl, Want::Limit(1000)));
    let b = run(&mut k, &ctx("10.0.0.3", dl, Want::Limit(1000)));
    assert_ne!(a.expected_class, b.expected_class);
    assert_eq!(k.device.classes.len(), 2);
}

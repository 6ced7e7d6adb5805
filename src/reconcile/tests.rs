//! Decisions against a small in-memory kernel: plans applied to it must converge (a second
//! decision is `no_op`), keep their order, and remove exactly what they should.

use super::observe::*;
use super::plan::*;
use super::*;
use crate::netlink::dump::DeviceTc;
use crate::netlink::nft::NftRule;
use crate::netlink::stats::TcStats;
use crate::netlink::tc::{ClassEntry, FilterEntry, QdiscEntry};

const DEV: u32 = 5;
const IFB: u32 = 9;

/// Applies steps the way the kernel would, for the objects raylimit makes.
#[derive(Default)]
struct FakeKernel {
    device: DeviceTc,
    ifb: Option<DeviceTc>,
    nft: crate::netlink::nft::NftState,
    next_handle: u64,
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
                Operation::Nft { ops, .. } => {
                    for op in ops {
                        self.nft_op(op);
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

    fn nft_op(&mut self, op: &crate::netlink::nft::NftOp) {
        use crate::netlink::nft::{ManagedRule, NftOp};
        match op {
            NftOp::AddTable => self.nft.table = true,
            NftOp::AddChain(c) => self.nft.chains.push(c.to_string()),
            NftOp::AddRule { rule, tag } => {
                assert!(self.nft.chains.iter().any(|c| c == rule.chain()));
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
    }

    /// What a request is decided on: its shaped root, and raylimit's nft table.
    fn observe_for(&self, req: &Request) -> Observation {
        let direction = if req.on_egress() {
            Direction::Download
        } else {
            Direction::Upload
        };
        let mut obs = self.observe(direction);
        obs.nft = Some(Ok(self.nft.clone()));
        obs
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
        owner: "host:test".into(),
        netns_path: None,
        has_connmark: false,
    }
}

fn run(k: &mut FakeKernel, c: &Context) -> Decision {
    let d = decide(c, &k.observe_for(&c.request));
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
    assert_eq!(shaped.nodes.len(), 2);
    let unlimited = shaped.ip_node("10.0.0.2".parse().unwrap()).unwrap();
    assert_eq!(unlimited.classid, Some(shaping::root_handle()));

    let d = run(&mut k, &ctx("10.0.0.2", dl, Want::Remove));
    assert!(!names(&d).contains(&"delete-root-qdisc"));
    assert!(names(&d).contains(&"delete-address-band"));
    let after = k.observe(dl);
    let s = after.shaped.as_ref().unwrap();
    assert!(s.baseline.is_some());
    assert_eq!(s.nodes.len(), 1);
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

fn user_ctx(uuid: &str, ips: &[&str], want: Want, remembered: Option<u16>) -> Context {
    Context {
        request: Request {
            subject: Subject::User {
                uuid: uuid.into(),
                ips: ips.iter().map(|i| i.parse().unwrap()).collect(),
            },
            direction: Direction::Download,
            device: "eth0".into(),
            want,
        },
        catch_all: CatchAll::U32,
        allow_missing_state: false,
        owned_by_other: None,
        remembered_minor: remembered,
        owner: "host:test".into(),
        netns_path: None,
        has_connmark: false,
    }
}

#[test]
fn a_user_is_one_class_with_a_node_per_address_that_follows_its_clients() {
    let mut k = FakeKernel::default();
    let first = run(
        &mut k,
        &user_ctx("u1", &["10.0.0.2", "fd00::2"], Want::Limit(1000), None),
    );
    assert_eq!(first.kind, DecisionKind::Apply);
    let minor = first.expected_class.unwrap().minor();
    let obs = k.observe(Direction::Download);
    let s = obs.shaped.as_ref().unwrap();
    assert_eq!(s.nodes.len(), 2);
    assert!(s
        .nodes
        .iter()
        .all(|n| n.band == Band::User && n.classid == first.expected_class));
    assert_eq!(k.device.classes.len(), 1);

    let same = run(
        &mut k,
        &user_ctx(
            "u1",
            &["10.0.0.2", "fd00::2"],
            Want::Limit(1000),
            Some(minor),
        ),
    );
    assert_eq!(same.kind, DecisionKind::NoOp, "{:?}", names(&same));

    // The IPv6 client leaves and another IPv4 client arrives: one node each way, and the
    // emptied IPv6 band goes.
    let moved = run(
        &mut k,
        &user_ctx(
            "u1",
            &["10.0.0.2", "10.0.0.9"],
            Want::Limit(1000),
            Some(minor),
        ),
    );
    assert_eq!(moved.kind, DecisionKind::Replace);
    assert_eq!(
        names(&moved),
        ["create-filter", "delete-filter", "delete-address-band"]
    );
    assert!(
        moved.reason.contains("fd00::2 has left"),
        "{}",
        moved.reason
    );

    // Another user may not take an address the first one holds.
    let other = decide(
        &user_ctx("u2", &["10.0.0.9"], Want::Limit(1000), None),
        &k.observe(Direction::Download),
    );
    assert!(other.blocked.unwrap().contains("10.0.0.9"));

    // Removal goes by the class, whatever addresses the request carries now.
    let removed = run(&mut k, &user_ctx("u1", &[], Want::Remove, Some(minor)));
    assert_eq!(removed.kind, DecisionKind::Remove);
    assert!(k.device.qdiscs.is_empty(), "{:?}", names(&removed));
}

#[test]
fn a_user_without_addresses_is_blocked() {
    let mut k = FakeKernel::default();
    let d = decide(
        &user_ctx("u1", &[], Want::Limit(1000), None),
        &k.observe(Direction::Download),
    );
    assert!(d.blocked.unwrap().contains("no live client address"));
    assert!(d.steps.is_empty());
    k.apply(&d.steps);
}

#[test]
fn a_connection_matches_address_and_port_and_wins_over_its_ip() {
    for direction in [Direction::Download, Direction::Upload] {
        let mut k = FakeKernel::default();
        let conn = |want| Context {
            request: Request {
                subject: Subject::Connection("10.0.0.2:40000".parse().unwrap()),
                direction,
                device: "eth0".into(),
                want,
            },
            ..ctx("10.0.0.2", direction, want)
        };
        run(&mut k, &ctx("10.0.0.2", direction, Want::Limit(5000)));
        let c = run(&mut k, &conn(Want::Limit(1000)));
        assert_eq!(c.kind, DecisionKind::Apply);
        let obs = k.observe(direction);
        let s = obs.shaped.as_ref().unwrap();
        let node = s.nodes.iter().find(|n| n.band == Band::Connection).unwrap();
        assert_eq!(node.matched.port, Some(40000));
        assert!(
            node.entry.filter.priority
                < s.ip_node("10.0.0.2".parse().unwrap())
                    .unwrap()
                    .entry
                    .filter
                    .priority
        );
        assert_eq!(
            run(&mut k, &conn(Want::Limit(1000))).kind,
            DecisionKind::NoOp
        );
        let gone = run(&mut k, &conn(Want::Remove));
        assert!(names(&gone).contains(&"delete-address-band"));
        assert!(!names(&gone).contains(&"delete-root-qdisc"));
        let left = k.observe(direction);
        assert_eq!(left.shaped.as_ref().unwrap().nodes.len(), 1);
    }
}

#[test]
fn an_inbound_is_one_class_with_a_listener_node_per_family() {
    for direction in [Direction::Download, Direction::Upload] {
        let mut k = FakeKernel::default();
        let inbound = |address: Option<&str>, want| Context {
            request: Request {
                subject: Subject::Inbound {
                    tag: "vmess-in".into(),
                    address: address.map(|a| a.parse().unwrap()),
                    port: 10086,
                },
                direction,
                device: "eth0".into(),
                want,
            },
            ..ctx("10.0.0.2", direction, want)
        };
        // A wildcard listener: port only, IPv4 and IPv6.
        let first = run(&mut k, &inbound(None, Want::Limit(1000)));
        assert_eq!(first.kind, DecisionKind::Apply);
        let obs = k.observe(direction);
        let s = obs.shaped.as_ref().unwrap();
        assert_eq!(s.listeners.len(), 2, "{:?}", s.unrecognised);
        assert!(s
            .listeners
            .iter()
            .all(|n| n.classid == first.expected_class));
        assert_eq!(
            run(&mut k, &inbound(None, Want::Limit(1000))).kind,
            DecisionKind::NoOp
        );
        // The config now names a concrete address: the IPv6 node goes, the IPv4 one is repaired.
        let minor = first.expected_class.unwrap().minor();
        let mut concrete = inbound(Some("10.0.0.1"), Want::Limit(1000));
        concrete.remembered_minor = Some(minor);
        let moved = run(&mut k, &concrete);
        assert_eq!(moved.kind, DecisionKind::Replace, "{:?}", names(&moved));
        assert!(
            names(&moved).contains(&"delete-priority"),
            "{:?}",
            names(&moved)
        );
        let s2 = k.observe(direction);
        let listeners = &s2.shaped.as_ref().unwrap().listeners;
        assert_eq!(listeners.len(), 1);
        assert_eq!(
            listeners[0].matched.address,
            Some("10.0.0.1".parse().unwrap())
        );
        // An IP rule sits in a lower (earlier) band, so it wins for that client.
        run(&mut k, &ctx("10.0.0.2", direction, Want::Limit(500)));
        let s3 = k.observe(direction);
        let sh = s3.shaped.as_ref().unwrap();
        assert!(
            sh.ip_node("10.0.0.2".parse().unwrap())
                .unwrap()
                .entry
                .filter
                .priority
                < sh.listeners[0].entry.filter.priority
        );
        run(&mut k, &ctx("10.0.0.2", direction, Want::Remove));
        let gone = run(&mut k, &concrete_remove(concrete));
        assert_eq!(gone.kind, DecisionKind::Remove);
        assert!(k.device.qdiscs.is_empty() || direction == Direction::Upload);
        assert!(k.ifb.is_none());
    }
}

fn concrete_remove(mut c: Context) -> Context {
    c.request.want = Want::Remove;
    c
}

#[test]
fn an_outbound_is_a_class_and_an_nft_rule_on_the_remote_facing_egress() {
    let mut k = FakeKernel::default();
    let out = |mark: u32, want| Context {
        request: Request {
            subject: Subject::Outbound {
                tag: "proxy".into(),
                mark,
                mask: 0x0f00_0000,
            },
            direction: Direction::Upload,
            device: "eth0".into(),
            want,
        },
        ..ctx("10.0.0.2", Direction::Upload, want)
    };
    let first = run(&mut k, &out(0x0100_0000, Want::Limit(1000)));
    assert_eq!(
        names(&first),
        ["create-root-qdisc", "create-class", "nft-classify-mark"]
    );
    // Upload of the outbound leaves the device: its egress root, no IFB.
    assert!(k.ifb.is_none());
    assert_eq!(k.device.classes.len(), 1);
    let class = first.expected_class.unwrap();
    assert_eq!(
        k.nft.rules[0].rule,
        NftRule::MarkToPriority {
            oif: DEV,
            mask: 0x0f00_0000,
            value: 0x0100_0000,
            priority: class.0
        }
    );
    assert_eq!(
        run(&mut k, &out(0x0100_0000, Want::Limit(1000))).kind,
        DecisionKind::NoOp
    );
    assert_eq!(
        names(&run(&mut k, &out(0x0100_0000, Want::Limit(2000)))),
        ["change-class"]
    );
    // The config's mark changed: the rule is replaced in one batch.
    let moved = run(&mut k, &out(0x0200_0000, Want::Limit(2000)));
    assert_eq!(names(&moved), ["nft-classify-mark"]);
    assert_eq!(k.nft.rules.len(), 1);
    let gone = run(&mut k, &out(0, Want::Remove));
    assert_eq!(names(&gone)[0], "delete-nft-rule");
    assert!(!k.nft.table && k.device.qdiscs.is_empty());

    // Download needs the connection mark restored before the IFB: blocked, naming what is missing.
    let d = decide(
        &Context {
            request: Request {
                direction: Direction::Download,
                ..out(0x0100_0000, Want::Limit(1000)).request
            },
            ..out(0x0100_0000, Want::Limit(1000))
        },
        &k.observe_for(&out(0x0100_0000, Want::Limit(1000)).request),
    );
    assert!(d.blocked.unwrap().contains("act_connmark"));
    assert!(d.steps.is_empty());
}

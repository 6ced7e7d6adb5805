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

/// Applies steps the way the kernel would, for the objects raylimit makes, and refuses what the
/// kernel refuses (a node in a missing table, a linked table's delete, a duplicate).
#[derive(Default)]
struct FakeKernel {
    device: DeviceTc,
    ifb: Option<DeviceTc>,
    /// u32 tables of deleted priorities the kernel keeps (invisible) while another u32 priority
    /// shares the qdisc: (ifindex, table id).
    orphans: BTreeSet<(u32, u32)>,
    nft: crate::netlink::nft::NftState,
    next_handle: u64,
    next_root_table: u32,
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
                    // The IFB's index is filled in at execution.
                    if let (Some(_), TcObject::Filter(f)) = (redirect_to, &mut object) {
                        use crate::netlink::action::Action;
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
                            self.filter_op(dev, *op, f, s.exists_ok);
                        }
                    }
                }
            }
        }
    }

    /// A tc filter operation, with u32's rules for tables, links and root tables.
    fn filter_op(&mut self, dev: &Dev, op: Op, mut f: Filter, exists_ok: bool) {
        let ifindex = f.ifindex;
        let root_id = self.next_root_table;
        let tc = self.tc_mut(dev);
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
            assert!(found || exists_ok, "ENOENT: priority {}", f.priority);
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
            return;
        }
        let FilterKind::U32(u) = &f.kind else {
            tc.filters.retain(|e| !at(e, f.priority, f.handle));
            if op != Op::Delete {
                tc.filters.push(FilterEntry {
                    filter: f,
                    chain: Some(0),
                });
            }
            return;
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
                assert!(
                    op != Op::Delete || exists_ok,
                    "ENOENT: no priority {}",
                    f.priority
                );
                if op == Op::Delete {
                    return;
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
                assert!(exists || exists_ok, "ENOENT: {}", f);
                if h.is_table() {
                    let linked = tc
                        .filters
                        .iter()
                        .any(|e| matches!(&e.filter.kind, FilterKind::U32(n) if n.link == Some(h)));
                    assert!(!linked, "EBUSY: table {h} is linked to");
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
                    assert!(
                        !self.orphans.contains(&(ifindex, h.table())),
                        "EEXIST: orphaned table {h}"
                    );
                    assert!(
                        !tables.contains(&h.table()) || exists_ok,
                        "EEXIST: table {h}"
                    );
                } else {
                    assert!(tables.contains(&h.table()), "EINVAL: no table for {}", f);
                    if let Some(l) = u.link {
                        assert!(tables.contains(&l.table()), "EINVAL: link to missing {l}");
                    }
                    assert!(op != Op::Create || !exists || exists_ok, "EEXIST: {}", f);
                }
                if op == Op::Create && exists {
                    return;
                }
                if root.is_none() {
                    return self.create_with_root(dev, f, root_id);
                }
                let tc = self.tc_mut(dev);
                tc.filters.retain(|e| !at(e, f.priority, h.0));
                tc.filters.push(FilterEntry {
                    filter: f.canonical(),
                    chain: Some(0),
                });
            }
        }
    }

    /// Creates the first filter of a u32 priority, with the root table the kernel gives it.
    fn create_with_root(&mut self, dev: &Dev, f: Filter, root_id: u32) {
        self.next_root_table += 1;
        let root = Filter {
            handle: U32Handle::new(0x800 + root_id, 0, 0).0,
            kind: FilterKind::U32(U32Filter::table(1)),
            ..f.clone()
        };
        let tc = self.tc_mut(dev);
        tc.filters.push(FilterEntry {
            filter: root,
            chain: Some(0),
        });
        tc.filters.push(FilterEntry {
            filter: f.canonical(),
            chain: Some(0),
        });
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

    /// The device's ingress redirect copies the connection's mark first.
    fn redirect_restores_mark(&self) -> bool {
        let hook = Hook::read(&self.device);
        let (redirect, _) = hook.redirect.expect("a redirect");
        restores_mark(&redirect.filter)
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
        has_fw: false,
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
    assert_eq!(shaped.node_count(), 2);
    let unlimited = shaped.ip_node("10.0.0.2".parse().unwrap()).unwrap();
    assert_eq!(unlimited.classid, Some(shaping::root_handle()));

    let d = run(&mut k, &ctx("10.0.0.2", dl, Want::Remove));
    assert!(!names(&d).contains(&"delete-root-qdisc"));
    assert!(names(&d).contains(&"delete-priority"));
    let after = k.observe(dl);
    let s = after.shaped.as_ref().unwrap();
    assert!(s.baseline.is_some());
    assert_eq!(s.node_count(), 1);
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
        has_fw: false,
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
    assert_eq!(s.node_count(), 2);
    assert!(s
        .nodes()
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
        [
            "create-filter",
            "delete-filter",
            "delete-bucket-link",
            "delete-bucket-table",
            "delete-address-link",
            "delete-address-table",
            "delete-priority"
        ]
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
        let node = s.nodes().find(|n| n.band == Band::Connection).unwrap();
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
        assert!(names(&gone).contains(&"delete-priority"));
        assert!(!names(&gone).contains(&"delete-root-qdisc"));
        let left = k.observe(direction);
        assert_eq!(left.shaped.as_ref().unwrap().node_count(), 1);
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

/// An outbound with mark 0x01000000 under the default mask, on a kernel with cls_fw and
/// act_connmark.
fn fw_outbound(direction: Direction, want: Want) -> Context {
    Context {
        request: Request {
            subject: Subject::Outbound {
                tag: "proxy".into(),
                mark: 0x0100_0000,
                mask: 0x0f00_0000,
            },
            direction,
            device: "eth0".into(),
            want,
        },
        catch_all: CatchAll::MatchAll,
        has_fw: true,
        has_connmark: true,
        ..ctx("10.0.0.2", direction, want)
    }
}

fn fw_filter(tc: &DeviceTc) -> Option<&Filter> {
    tc.filters
        .iter()
        .map(|e| &e.filter)
        .find(|f| matches!(f.kind, FilterKind::Fw(_)))
}

#[test]
fn with_cls_fw_an_outbound_upload_is_an_fw_filter_and_no_nft_rule() {
    let mut k = FakeKernel::default();
    let first = run(&mut k, &fw_outbound(Direction::Upload, Want::Limit(1000)));
    assert_eq!(
        names(&first),
        ["create-root-qdisc", "create-class", "create-filter"]
    );
    assert!(first.forms[0].contains("fw on eth0, mark 0x1000000/0xf000000"));
    let f = fw_filter(&k.device).expect("an fw filter on the device");
    assert_eq!(
        *f,
        shaping::mark_filter(
            f.ifindex,
            0x0100_0000,
            0x0f00_0000,
            first.expected_class.unwrap()
        )
    );
    assert!(k.nft.rules.is_empty() && !k.nft.table);
    let again = run(&mut k, &fw_outbound(Direction::Upload, Want::Limit(1000)));
    assert_eq!(again.kind, DecisionKind::NoOp, "{:?}", names(&again));
    assert!(again.matched);
    // A different mask on the same device cannot share the fw priority: refused before sending.
    let mut other = fw_outbound(Direction::Upload, Want::Limit(1000));
    other.request.subject = Subject::Outbound {
        tag: "other".into(),
        mark: 0x10,
        mask: 0xff,
    };
    let d = decide(&other, &k.observe_for(&other.request));
    assert!(d.blocked.unwrap().contains("under mask 0x0f000000"));
    let gone = run(&mut k, &fw_outbound(Direction::Upload, Want::Remove));
    assert_eq!(
        names(&gone),
        ["delete-filter", "delete-class", "delete-root-qdisc"]
    );
    assert!(k.device.filters.is_empty() && k.device.qdiscs.is_empty());
}

#[test]
fn with_connmark_an_outbound_download_restores_the_mark_before_the_ifb() {
    let mut k = FakeKernel::default();
    let first = run(&mut k, &fw_outbound(Direction::Download, Want::Limit(1000)));
    assert_eq!(
        names(&first),
        [
            "create-ifb",
            "set-ifb-up",
            "create-root-qdisc",
            "create-class",
            "create-filter",
            "nft-save-mark",
            "create-ingress-hook",
            "create-redirect"
        ]
    );
    // Shaped on the IFB by fw; the mark is saved on output for this device.
    let ifb = k.ifb.as_ref().unwrap();
    assert!(fw_filter(ifb).is_some());
    assert_eq!(
        k.nft.rules[0].rule,
        NftRule::SaveMark {
            oif: DEV,
            mask: 0x0f00_0000,
            value: 0x0100_0000
        }
    );
    assert!(k.redirect_restores_mark());
    assert_eq!(
        run(&mut k, &fw_outbound(Direction::Download, Want::Limit(1000))).kind,
        DecisionKind::NoOp
    );

    // A client's upload limit shares the redirect, which keeps restoring marks.
    let ip = ctx("10.0.0.2", Direction::Upload, Want::Limit(1000));
    let ip = Context {
        catch_all: CatchAll::MatchAll,
        ..ip
    };
    assert_eq!(
        names(&run(&mut k, &ip)),
        [
            "create-class",
            "create-address-table",
            "create-address-link",
            "create-bucket-table",
            "create-bucket-link",
            "create-filter"
        ]
    );
    // The outbound goes first: the redirect stops restoring marks, the client's limit stays.
    let gone = run(&mut k, &fw_outbound(Direction::Download, Want::Remove));
    assert_eq!(
        names(&gone),
        [
            "delete-nft-rule",
            "delete-filter",
            "delete-class",
            "delete-redirect",
            "create-redirect"
        ]
    );
    assert!(!k.nft.table);
    assert!(!k.redirect_restores_mark());
    assert_eq!(run(&mut k, &ip).kind, DecisionKind::NoOp);

    // The outbound back while the client's limit exists: the redirect is swapped to restore.
    let back = run(&mut k, &fw_outbound(Direction::Download, Want::Limit(1000)));
    assert!(
        names(&back).ends_with(&["delete-redirect", "create-redirect"]),
        "{:?}",
        names(&back)
    );
    assert!(k.redirect_restores_mark());
}

#[test]
fn an_outbound_download_without_fw_or_connmark_is_refused_naming_them() {
    let k = FakeKernel::default();
    for (fw, connmark, missing) in [
        (false, true, "no cls_fw"),
        (true, false, "no act_connmark"),
        (false, false, "no act_connmark and no cls_fw"),
    ] {
        let c = Context {
            has_fw: fw,
            has_connmark: connmark,
            ..fw_outbound(Direction::Download, Want::Limit(1000))
        };
        let d = decide(&c, &k.observe_for(&c.request));
        assert!(
            d.blocked.as_ref().unwrap().ends_with(missing),
            "{:?}",
            d.blocked
        );
        assert!(d.steps.is_empty());
    }
    // Without nftables (the static build) the mark cannot be saved: refused, saying why.
    let c = fw_outbound(Direction::Download, Want::Limit(1000));
    let mut obs = k.observe_for(&c.request);
    obs.nft = Some(Err("built without the nftables feature".into()));
    let d = decide(&c, &obs);
    assert!(d.blocked.unwrap().contains("without the nftables feature"));
}

fn ip_limit(ip: &str) -> Context {
    ctx(ip, Direction::Download, Want::Limit(1000))
}

fn ip_remove(ip: &str) -> Context {
    ctx(ip, Direction::Download, Want::Remove)
}

#[test]
fn a_client_in_a_new_first_level_bucket_brings_its_table_and_link() {
    let mut k = FakeKernel::default();
    let first = run(&mut k, &ip_limit("10.0.5.2"));
    assert_eq!(
        names(&first),
        [
            "create-root-qdisc",
            "create-class",
            "create-address-table",
            "create-address-link",
            "create-bucket-table",
            "create-bucket-link",
            "create-filter"
        ]
    );
    // The same first-level bucket (second-to-last byte 5): only its class and node.
    let same = run(&mut k, &ip_limit("10.0.5.3"));
    assert_eq!(names(&same), ["create-class", "create-filter"]);
    // The same last byte in another first-level bucket: a table and link of its own.
    let other = run(&mut k, &ip_limit("10.0.6.2"));
    assert_eq!(
        names(&other),
        [
            "create-class",
            "create-bucket-table",
            "create-bucket-link",
            "create-filter"
        ]
    );
    let obs = k.observe(Direction::Download);
    let s = obs.shaped.as_ref().unwrap();
    assert!(s.unrecognised.is_empty(), "{:?}", s.unrecognised);
    let prio = Band::Ip.priority(Family::V4);
    assert_eq!(
        s.bucket_tables,
        [(prio, 5), (prio, 6)].into_iter().collect::<BTreeSet<_>>()
    );
    let handle = |ip: &str| s.ip_node(ip.parse().unwrap()).unwrap().handle();
    assert_eq!(
        handle("10.0.5.2").table_and_bucket(),
        U32Handle::new(0x505, 2, 0)
    );
    assert_eq!(
        handle("10.0.5.3").table_and_bucket(),
        U32Handle::new(0x505, 3, 0)
    );
    assert_eq!(
        handle("10.0.6.2").table_and_bucket(),
        U32Handle::new(0x506, 2, 0)
    );
    for ip in ["10.0.5.2", "10.0.5.3", "10.0.6.2"] {
        assert_eq!(run(&mut k, &ip_limit(ip)).kind, DecisionKind::NoOp);
    }
}

#[test]
fn the_last_client_of_a_bucket_takes_its_link_and_table_and_the_last_of_a_band_the_band() {
    let mut k = FakeKernel::default();
    for ip in ["10.0.5.2", "10.0.5.3", "10.0.6.2"] {
        run(&mut k, &ip_limit(ip));
    }
    let alone = run(&mut k, &ip_remove("10.0.6.2"));
    assert_eq!(
        names(&alone),
        [
            "delete-filter",
            "delete-bucket-link",
            "delete-bucket-table",
            "delete-class"
        ]
    );
    let shared = run(&mut k, &ip_remove("10.0.5.3"));
    assert_eq!(names(&shared), ["delete-filter", "delete-class"]);
    let last = run(&mut k, &ip_remove("10.0.5.2"));
    assert_eq!(
        names(&last),
        [
            "delete-filter",
            "delete-bucket-link",
            "delete-bucket-table",
            "delete-address-link",
            "delete-address-table",
            "delete-priority",
            "delete-class",
            "delete-root-qdisc"
        ]
    );
    assert!(k.device.qdiscs.is_empty() && k.device.filters.is_empty());
}

#[test]
fn a_band_removed_beside_another_leaves_no_table_behind_and_comes_back() {
    // The kernel keeps a deleted u32 priority's tables while another u32 priority shares the
    // qdisc (FakeKernel refuses to create them again): the band's tables are deleted one by one.
    let mut k = FakeKernel::default();
    let conn = Context {
        request: Request {
            subject: Subject::Connection("10.0.0.2:40000".parse().unwrap()),
            ..ip_limit("10.0.0.2").request
        },
        ..ip_limit("10.0.0.2")
    };
    run(&mut k, &conn);
    for _ in 0..2 {
        run(&mut k, &ip_limit("10.0.7.9"));
        run(&mut k, &ip_limit("fd00::1:709"));
        let v6 = run(&mut k, &ip_remove("fd00::1:709"));
        assert!(names(&v6).contains(&"delete-address-table"));
        run(&mut k, &ip_remove("10.0.7.9"));
        assert!(k.orphans.is_empty(), "{:?}", k.orphans);
        let obs = k.observe(Direction::Download);
        let s = obs.shaped.as_ref().unwrap();
        assert_eq!(s.node_count(), 1);
        assert!(s
            .bucket_tables
            .iter()
            .all(|(p, _)| *p == shaping::BAND_CONNECTION));
    }
}

#[test]
fn a_user_spread_over_buckets_keeps_a_bucket_another_of_its_addresses_takes() {
    let mut k = FakeKernel::default();
    let first = run(
        &mut k,
        &user_ctx("u1", &["10.0.1.2", "10.0.2.2"], Want::Limit(1000), None),
    );
    let minor = first.expected_class.map(|c| c.minor());
    // 10.0.2.2 leaves and 10.0.2.3 arrives in the same first-level bucket: no table changes.
    let moved = run(
        &mut k,
        &user_ctx("u1", &["10.0.1.2", "10.0.2.3"], Want::Limit(1000), minor),
    );
    assert_eq!(names(&moved), ["create-filter", "delete-filter"]);
    let removed = run(&mut k, &user_ctx("u1", &[], Want::Remove, minor));
    assert!(names(&removed).contains(&"delete-root-qdisc"));
    assert!(k.device.filters.is_empty());
}

/// Every filter a kernel holds, as `absorb_filter` would be given them.
fn managed_filters(tc: &DeviceTc) -> Vec<Filter> {
    tc.filters
        .iter()
        .filter(|e| e.filter.handle != 0 && e.filter.parent == shaping::root_handle())
        .map(|e| e.filter.clone())
        .collect()
}

fn busy_kernel() -> FakeKernel {
    let mut k = FakeKernel::default();
    let dl = Direction::Download;
    run(&mut k, &ctx("all", dl, Want::Limit(500_000)));
    for ip in ["10.0.5.2", "10.0.5.3", "10.0.6.2", "fd00::1:502"] {
        run(&mut k, &ip_limit(ip));
    }
    run(&mut k, &ctx("10.0.9.9", dl, Want::Unlimited));
    run(
        &mut k,
        &user_ctx("u1", &["10.0.1.2", "fd00::7"], Want::Limit(1000), None),
    );
    let conn = Context {
        request: Request {
            subject: Subject::Connection("10.0.0.2:40000".parse().unwrap()),
            ..ip_limit("10.0.0.2").request
        },
        ..ip_limit("10.0.0.2")
    };
    run(&mut k, &conn);
    let inbound = Context {
        request: Request {
            subject: Subject::Inbound {
                tag: "in".into(),
                address: None,
                port: 10086,
            },
            ..ip_limit("10.0.0.2").request
        },
        ..ip_limit("10.0.0.2")
    };
    run(&mut k, &inbound);
    k
}

#[test]
fn absorbing_the_dumped_filters_gives_what_read_gives() {
    let k = busy_kernel();
    let end = shaping::client_end(Direction::Download);
    let read = ShapedRoot::read(&k.device, end);
    assert!(read.unrecognised.is_empty(), "{:?}", read.unrecognised);
    assert_eq!(read.node_count(), 8);
    let mut bare = k.device.clone();
    bare.filters.clear();
    let mut absorbed = ShapedRoot::read(&bare, end);
    for f in managed_filters(&k.device) {
        absorbed.absorb_filter(&f, end);
    }
    assert_eq!(absorbed, read);
    // Absorbing a filter again replaces it; a foreign one is kept as unrecognised.
    for f in managed_filters(&k.device) {
        absorbed.absorb_filter(&f, end);
    }
    assert_eq!(absorbed, read);
    let mut foreign = managed_filters(&k.device)
        .into_iter()
        .find(|f| classid_of(f).is_some())
        .unwrap();
    foreign.priority = 350;
    absorbed.absorb_filter(&foreign, end);
    assert_eq!(absorbed.foreign_in_bands().len(), 1);
    absorbed.forget_filter(350, foreign.handle);
    assert_eq!(absorbed, read);
}

#[test]
fn absorbing_a_plan_and_forgetting_its_deletes_tracks_the_kernel() {
    let mut k = busy_kernel();
    let end = shaping::client_end(Direction::Download);
    let mut tracked = ShapedRoot::read(&k.device, end);
    // Limits in known and new buckets, a change, removals that empty a bucket and a band.
    for c in [
        ip_limit("10.0.5.4"),
        ip_limit("10.0.8.1"),
        ip_limit("fd00::2:1"),
        ctx("10.0.5.2", Direction::Download, Want::Unlimited),
        ip_remove("10.0.6.2"),
        ip_remove("fd00::1:502"),
        ip_remove("fd00::2:1"),
        user_ctx("u1", &[], Want::Remove, None),
    ] {
        let mut obs = k.observe(Direction::Download);
        obs.shaped = Some(tracked.clone());
        let d = decide(&c, &obs);
        assert!(d.blocked.is_none(), "{:?}", d.blocked);
        k.apply(&d.steps);
        for step in &d.steps {
            if let Operation::Tc {
                op,
                object: TcObject::Filter(f),
                ..
            } = &step.action
            {
                match op {
                    Op::Delete => tracked.forget_filter(f.priority, f.handle),
                    _ => tracked.absorb_filter(f, end),
                }
            }
        }
        let read = ShapedRoot::read(&k.device, end);
        tracked.classes = read.classes.clone();
        assert_eq!(tracked, read, "after {}", c.request.subject);
    }
}

#[test]
fn a_link_hashing_on_another_byte_is_not_raylimits() {
    let mut k = FakeKernel::default();
    run(&mut k, &ip_limit("10.0.5.2"));
    let end = shaping::client_end(Direction::Download);
    for f in &mut k.device.filters {
        if let FilterKind::U32(u) = &mut f.filter.kind {
            if let Some(sel) = u.selector.as_mut().filter(|s| s.hmask == 0xff) {
                sel.hmask = 0xff00;
            }
        }
    }
    let s = ShapedRoot::read(&k.device, end);
    assert!(s.bucket_links.is_empty());
    assert_eq!(s.foreign_in_bands().len(), 1);
    let d = decide(&ip_limit("10.0.5.2"), &k.observe(Direction::Download));
    assert!(d.blocked.unwrap().contains("did not make"));
}

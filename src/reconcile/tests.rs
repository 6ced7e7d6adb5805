//! Decisions against a small in-memory kernel: plans applied to it must converge (a second
//! decision is `no_op`), keep their order, and remove exactly what they should.

use super::observe::*;
use super::plan::*;
use super::*;
use crate::engine::fake::{FakeKernel, DEV};
use crate::model::nft::NftRule;
use crate::model::stats::TcStats;
use crate::model::tc::QdiscEntry;
use crate::model::DeviceTc;
use crate::policy::Endpoint;
use crate::shaping::ListenerBand;
use std::net::IpAddr;

fn ctx(subject: &str, direction: Direction, want: Want) -> Context {
    Context {
        request: Request {
            subject: crate::policy::parse_ip_target(subject, false)
                .unwrap()
                .direct()
                .unwrap(),
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
        scope: Default::default(),
        foreign_classes: Default::default(),
        made_hook: true,
        made_ifb: true,
        leaf: crate::shaping::Leaf::Tbf,
    }
}

fn run(k: &mut FakeKernel, c: &Context) -> Decision {
    let d = decide(c, &k.observe_for(&c.request));
    assert!(d.blocked.is_none(), "{:?}", d.blocked);
    k.apply(&d.steps);
    d
}

fn names(d: &Decision) -> Vec<&str> {
    d.steps.iter().map(|s| s.name.as_ref()).collect()
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
        assert_eq!(names(&change), ["change-class", "replace-leaf"]);

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
    assert!(reason(d.blocked).contains("fq 1:"));
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
        scope: Default::default(),
        foreign_classes: Default::default(),
        made_hook: true,
        made_ifb: true,
        leaf: crate::shaping::Leaf::Tbf,
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
    assert!(reason(other.blocked).contains("10.0.0.9"));

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
    assert!(reason(d.blocked).contains("no live client address"));
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
                    listener: Some(Endpoint {
                        address: address.map(|a| a.parse().unwrap()),
                        port: 10086,
                    }),
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
        assert!(k.device.qdiscs.is_empty(), "{:?}", k.device.qdiscs);
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
                mark: Some(mark),
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
        [
            "create-root-qdisc",
            "create-class",
            "create-leaf",
            "nft-classify-mark"
        ]
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
    assert!(reason(d.blocked).contains("act_connmark"));
    assert!(d.steps.is_empty());
}

/// An outbound with mark 0x01000000 under the default mask, on a kernel with cls_fw and
/// act_connmark.
fn fw_outbound(direction: Direction, want: Want) -> Context {
    Context {
        request: Request {
            subject: Subject::Outbound {
                tag: "proxy".into(),
                mark: Some(0x0100_0000),
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
        [
            "create-root-qdisc",
            "create-class",
            "create-leaf",
            "create-filter"
        ]
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
        mark: Some(0x10),
        mask: 0xff,
    };
    let d = decide(&other, &k.observe_for(&other.request));
    assert!(
        matches!(
            d.blocked,
            Some(Blocked::MaskConflict {
                mask: 0x0f00_0000,
                ..
            })
        ),
        "{:?}",
        d.blocked
    );
    let gone = run(&mut k, &fw_outbound(Direction::Upload, Want::Remove));
    assert_eq!(names(&gone), ["delete-root-qdisc"]);
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
            "create-leaf",
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
            "create-leaf",
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
            reason(d.blocked.clone()).ends_with(missing),
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
    assert!(reason(d.blocked).contains("without the nftables feature"));
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
            "create-leaf",
            "create-address-table",
            "create-address-link",
            "create-bucket-table",
            "create-bucket-link",
            "create-filter"
        ]
    );
    // The same first-level bucket (second-to-last byte 5): only its class and node.
    let same = run(&mut k, &ip_limit("10.0.5.3"));
    assert_eq!(
        names(&same),
        ["create-class", "create-leaf", "create-filter"]
    );
    // The same last byte in another first-level bucket: a table and link of its own.
    let other = run(&mut k, &ip_limit("10.0.6.2"));
    assert_eq!(
        names(&other),
        [
            "create-class",
            "create-leaf",
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
fn an_emptied_bucket_keeps_its_table_and_the_last_rule_takes_the_root_with_everything() {
    let mut k = FakeKernel::default();
    for ip in ["10.0.5.2", "10.0.5.3", "10.0.6.2"] {
        run(&mut k, &ip_limit(ip));
    }
    // Alone in its bucket: its table and link stay for the next address there (deleting the
    // table would wait for the kernel to release it).
    let alone = run(&mut k, &ip_remove("10.0.6.2"));
    assert_eq!(names(&alone), ["delete-filter", "delete-class"]);
    let shared = run(&mut k, &ip_remove("10.0.5.3"));
    assert_eq!(names(&shared), ["delete-filter", "delete-class"]);
    // The last rule: the root goes, and everything under it with it (no table delete that
    // would wait for the kernel to release the table). Its undo restores all of it.
    let count = |d: &crate::model::DeviceTc| (d.qdiscs.len(), d.classes.len(), d.filters.len());
    let before = count(&k.device);
    let last = run(&mut k, &ip_remove("10.0.5.2"));
    assert_eq!(names(&last), ["delete-root-qdisc"]);
    assert!(k.device.qdiscs.is_empty() && k.device.filters.is_empty());
    let undo_steps = last.steps[0].undo_steps();
    let undo: Vec<&str> = undo_steps.iter().map(|s| s.name.as_ref()).collect();
    assert_eq!(
        undo,
        [
            "restore-root-qdisc",
            "restore-class",
            "restore-leaf",
            "restore-address-table",
            "restore-filter",
            "restore-bucket-table",
            "restore-bucket-link",
            "restore-bucket-table",
            "restore-bucket-link",
            "restore-filter"
        ]
    );
    // Undone, the rule is back as it was (the kernel numbers the root table anew).
    k.apply(&last.steps[0].undo_steps());
    assert_eq!(count(&k.device), before);
    assert_eq!(run(&mut k, &ip_limit("10.0.5.2")).kind, DecisionKind::NoOp);
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
                listener: Some(Endpoint {
                    address: None,
                    port: 10086,
                }),
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
            if let Operation::Tc { op, object, .. } = &step.action {
                let TcObject::Filter(f) = object else {
                    continue;
                };
                match op {
                    Op::Delete => tracked.forget_filter(f.priority, f.handle),
                    _ => tracked.absorb_filter(f, end),
                }
            }
        }
        let read = ShapedRoot::read(&k.device, end);
        tracked.classes = read.classes.clone();
        tracked.leaves = read.leaves.clone();
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
    assert!(
        matches!(&d.blocked, Some(Blocked::NotComparable(note)) if note.contains("did not make")),
        "{:?}",
        d.blocked
    );
}

/// The words of a blocked decision's reason.
fn reason(blocked: Option<Blocked>) -> String {
    match blocked {
        Some(Blocked::Reason(text)) => text,
        other => panic!("not blocked for a reason in words: {other:?}"),
    }
}

#[test]
fn an_unresolved_inbound_or_outbound_plans_nothing_but_is_removable() {
    let mut k = FakeKernel::default();
    for subject in [
        Subject::Inbound {
            tag: "nope".into(),
            listener: None,
        },
        Subject::Outbound {
            tag: "nope".into(),
            mark: None,
            mask: 0x0f00_0000,
        },
    ] {
        let mut c = ip_limit("10.0.0.2");
        c.request.subject = subject;
        // Upload: an outbound's egress, where this kernel could classify it.
        c.request.direction = Direction::Upload;
        let d = decide(&c, &k.observe_for(&c.request));
        assert!(d.steps.is_empty(), "{:?}", names(&d));
        assert!(reason(d.blocked).contains("could not be resolved"));
        // A removal needs no listener or mark: with nothing there it is a no_op, not blocked.
        c.request.want = Want::Remove;
        let d = run(&mut k, &c);
        assert_eq!(d.kind, DecisionKind::NoOp);
    }
}

fn scoped(mut c: Context, listeners: &[(Option<&str>, u16)]) -> Context {
    c.scope = RuleScope::Listeners(
        listeners
            .iter()
            .flat_map(|(a, port)| {
                let ip: IpAddr = a.unwrap_or("::").parse().unwrap();
                ListenerMatch::of_socket(ip, *port)
            })
            .collect(),
    );
    c
}

#[test]
fn a_runtime_scoped_baseline_is_a_node_per_listener_and_trades_places_with_the_device_wide_one() {
    for direction in [Direction::Download, Direction::Upload] {
        let mut k = FakeKernel::default();
        let listeners = [(Some("10.9.0.1"), 9000), (None, 443)];
        let first = run(
            &mut k,
            &scoped(ctx("all", direction, Want::Limit(500_000)), &listeners),
        );
        assert_eq!(first.kind, DecisionKind::Apply);
        let obs = k.observe_for(&first_request(direction));
        let s = obs.shaped.as_ref().unwrap();
        assert!(s.baseline.is_none(), "no device-wide catch-all");
        // 10.9.0.1:9000, and the wildcard :443 in both families.
        let mut nodes: Vec<String> = s
            .listeners
            .iter()
            .map(|n| {
                assert_eq!(n.band, ListenerBand::Baseline);
                assert_eq!(n.classid, first.expected_class);
                format!("{} pref {}", n.matched, n.entry.filter.priority)
            })
            .collect();
        nodes.sort();
        assert_eq!(
            nodes,
            [
                "0.0.0.0:443 pref 400",
                "10.9.0.1:9000 pref 400",
                "[::]:443 pref 401"
            ]
        );
        // Again: no_op. A listener gone: its node goes, the class stays.
        let again = run(
            &mut k,
            &scoped(ctx("all", direction, Want::Limit(500_000)), &listeners),
        );
        assert_eq!(again.kind, DecisionKind::NoOp, "{:?}", names(&again));
        let moved = run(
            &mut k,
            &scoped(ctx("all", direction, Want::Limit(500_000)), &listeners[..1]),
        );
        assert_eq!(moved.kind, DecisionKind::Replace);
        assert!(
            !names(&moved).contains(&"create-class"),
            "{:?}",
            names(&moved)
        );
        assert!(
            names(&moved).contains(&"delete-priority"),
            "{:?}",
            names(&moved)
        );
        // Device-wide as asked: the nodes give way to one catch-all, in the same class.
        let device = run(&mut k, &ctx("all", direction, Want::Limit(500_000)));
        assert_eq!(device.expected_class, first.expected_class);
        let obs = k.observe_for(&first_request(direction));
        let s = obs.shaped.as_ref().unwrap();
        assert!(s.baseline.is_some());
        assert!(s.listeners.is_empty());
        // And back; then one removal takes whichever form is there, and the root with it.
        run(
            &mut k,
            &scoped(ctx("all", direction, Want::Limit(500_000)), &listeners),
        );
        let removed = run(&mut k, &ctx("all", direction, Want::Remove));
        assert_eq!(removed.kind, DecisionKind::Remove);
        assert!(k.device.qdiscs.is_empty(), "{:?}", k.device.qdiscs);
        assert!(k.ifb.is_none());
        if direction == Direction::Download {
            assert!(k.device.filters.is_empty(), "{:?}", k.device.filters);
        }
    }
}

fn first_request(direction: Direction) -> Request {
    ctx("all", direction, Want::Limit(1)).request
}

fn leaf_of(k: &FakeKernel) -> Option<crate::model::tc::Qdisc> {
    k.device
        .qdiscs
        .iter()
        .find(|q| q.qdisc.parent.major() == ROOT_MAJOR)
        .map(|q| q.qdisc.clone())
}

#[test]
fn every_class_gets_a_segmenting_tbf_leaf_sized_for_its_rate() {
    let mut k = FakeKernel::default();
    run(&mut k, &ip_limit("10.0.0.2"));
    let leaf = leaf_of(&k).expect("a leaf under the class");
    let class = &k.device.classes[0].class;
    assert_eq!(leaf.parent, class.handle);
    assert_eq!(leaf.handle, shaping::leaf_handle(class.handle.minor()));
    assert_eq!(
        leaf.kind,
        QdiscKind::Tbf(shaping::leaf_tbf(1000, shaping::frame_bytes(1500)))
    );
    // A new rate resizes the leaf with the class, in place.
    let change = run(
        &mut k,
        &ctx("10.0.0.2", Direction::Download, Want::Limit(50_000_000)),
    );
    assert_eq!(names(&change), ["change-class", "replace-leaf"]);
    assert_eq!(
        leaf_of(&k).unwrap().kind,
        QdiscKind::Tbf(shaping::leaf_tbf(50_000_000, shaping::frame_bytes(1500)))
    );
    // The undo of the change puts the old leaf back.
    k.apply(&change.steps[1].undo_steps());
    assert_eq!(leaf_of(&k).unwrap(), leaf);
}

fn with_fq_codel(mut c: Context) -> Context {
    c.leaf = shaping::Leaf::FqCodel;
    c
}

#[test]
fn an_fq_codel_leaf_is_sized_for_its_rate_and_changed_without_its_flow_count() {
    let mut k = FakeKernel::default();
    let first = run(&mut k, &with_fq_codel(ip_limit("10.0.0.2")));
    let leaf = leaf_of(&k).expect("a leaf under the class");
    let class = &k.device.classes[0].class;
    assert_eq!(leaf.handle, shaping::leaf_handle(class.handle.minor()));
    let frame = shaping::frame_bytes(1500);
    assert_eq!(
        leaf.kind,
        QdiscKind::FqCodel(shaping::leaf_fq_codel(1000, frame))
    );
    // fq_codel does not cut GSO packets: the class's burst holds one, as over HTB's FIFO.
    match &class.kind {
        ClassKind::Htb(h) => {
            assert_eq!(h, &shaping::leaf_class(1000, shaping::Leaf::Default, frame))
        }
        other => panic!("{other:?}"),
    }
    let create = first
        .steps
        .iter()
        .find(|s| s.name == "create-leaf")
        .unwrap();
    assert!(
        create.command().contains("fq_codel limit 10240 flows 64"),
        "{}",
        create.command()
    );
    assert_eq!(
        run(&mut k, &with_fq_codel(ip_limit("10.0.0.2"))).kind,
        DecisionKind::NoOp
    );
    // A new rate changes it in place: a change, which the kernel refuses if it names flows.
    let faster = with_fq_codel(ctx(
        "10.0.0.2",
        Direction::Download,
        Want::Limit(50_000_000),
    ));
    let change = run(&mut k, &faster);
    assert_eq!(names(&change), ["change-class", "replace-leaf"]);
    assert!(change.steps[1].command().starts_with("tc qdisc change"));
    assert_eq!(
        leaf_of(&k).unwrap().kind,
        QdiscKind::FqCodel(shaping::leaf_fq_codel(50_000_000, frame))
    );
    k.apply(&change.steps[1].undo_steps());
    assert_eq!(leaf_of(&k).unwrap(), leaf);
}

#[test]
fn a_leaf_of_another_kind_or_flow_count_under_raylimits_handle_is_made_again() {
    let mut k = FakeKernel::default();
    run(&mut k, &ip_limit("10.0.0.2"));
    let tbf = leaf_of(&k).unwrap();
    // TBF where fq_codel is wanted: the kernel will not change one kind into another.
    let moved = run(&mut k, &with_fq_codel(ip_limit("10.0.0.2")));
    assert_eq!(
        names(&moved),
        ["change-class", "delete-leaf", "create-leaf"]
    );
    let fq = leaf_of(&k).unwrap();
    assert!(matches!(fq.kind, QdiscKind::FqCodel(_)));
    // Another flow count, set by hand: made again too.
    for q in k.device.qdiscs.iter_mut() {
        if let QdiscKind::FqCodel(f) = &mut q.qdisc.kind {
            f.flows = 1024;
        }
    }
    let remade = run(&mut k, &with_fq_codel(ip_limit("10.0.0.2")));
    assert_eq!(names(&remade), ["delete-leaf", "create-leaf"]);
    assert_eq!(leaf_of(&k).unwrap(), fq);
    // And back to TBF, undoing to fq_codel the same way.
    let back = run(&mut k, &ip_limit("10.0.0.2"));
    assert_eq!(leaf_of(&k).unwrap(), tbf);
    for step in back.steps.iter().rev() {
        k.apply(&step.undo_steps());
    }
    assert_eq!(leaf_of(&k).unwrap(), fq);
}

#[test]
fn a_class_counts_the_drops_of_its_leaf_where_they_are_more() {
    let mut k = FakeKernel::default();
    let c = ip_limit("10.0.0.2");
    run(&mut k, &c);
    let drops_seen = |k: &FakeKernel| {
        let obs = k.observe_for(&c.request);
        let shaped = obs.shaped.as_ref().unwrap();
        shaped.classes.values().next().unwrap().stats.drops
    };
    k.device.classes[0].stats.drops = 2;
    // CoDel's drops at dequeue are the leaf's alone.
    for q in k.device.qdiscs.iter_mut() {
        if q.qdisc.parent.major() == ROOT_MAJOR {
            q.stats.drops = 7;
        }
    }
    assert_eq!(drops_seen(&k), 7);
    for q in k.device.qdiscs.iter_mut() {
        if q.qdisc.parent.major() == ROOT_MAJOR {
            q.stats.drops = 1;
        }
    }
    assert_eq!(drops_seen(&k), 2);
}

#[test]
fn a_lost_or_foreign_leaf_is_put_back_and_a_matching_one_is_a_no_op() {
    let mut k = FakeKernel::default();
    run(&mut k, &ip_limit("10.0.0.2"));
    let leaf = leaf_of(&k).unwrap();
    assert_eq!(run(&mut k, &ip_limit("10.0.0.2")).kind, DecisionKind::NoOp);
    // Deleted by hand: HTB's default FIFO is back, which the dump does not show.
    k.device.qdiscs.retain(|q| q.qdisc != leaf);
    let repaired = run(&mut k, &ip_limit("10.0.0.2"));
    assert_eq!(repaired.kind, DecisionKind::Replace);
    assert_eq!(names(&repaired), ["create-leaf"]);
    assert_eq!(leaf_of(&k).unwrap(), leaf);
    // Replaced by hand with another kind: raylimit's class gets raylimit's leaf back, and the
    // undo would restore the hand-made one.
    for q in k.device.qdiscs.iter_mut() {
        if q.qdisc == leaf {
            q.qdisc.handle = TcHandle::new(0x8001, 0);
            q.qdisc.kind = QdiscKind::Other {
                kind: "pfifo".into(),
                options: None,
            };
        }
    }
    let foreign = leaf_of(&k).unwrap();
    let replaced = run(&mut k, &ip_limit("10.0.0.2"));
    assert_eq!(names(&replaced), ["replace-leaf"]);
    assert_eq!(leaf_of(&k).unwrap(), leaf);
    k.apply(&replaced.steps[0].undo_steps());
    assert_eq!(leaf_of(&k).unwrap(), foreign);
}

#[test]
fn without_tbf_a_class_keeps_htbs_fifo_with_a_burst_that_holds_a_gso_packet() {
    let mut k = FakeKernel::default();
    let mut c = ip_limit("10.0.0.2");
    c.leaf = shaping::Leaf::Default;
    let d = run(&mut k, &c);
    assert!(!names(&d).contains(&"create-leaf"), "{:?}", names(&d));
    assert!(leaf_of(&k).is_none());
    let ClassKind::Htb(h) = &k.device.classes[0].class.kind else {
        unreachable!()
    };
    assert_eq!(h, &shaping::leaf_class(1000, shaping::Leaf::Default, 1532));
    // A leaf left by a run on a kernel that had TBF goes, and the class is resized.
    let mut k = FakeKernel::default();
    run(&mut k, &ip_limit("10.0.0.2"));
    let d = run(&mut k, &c);
    assert_eq!(names(&d), ["change-class", "delete-leaf"]);
    assert!(leaf_of(&k).is_none());
}

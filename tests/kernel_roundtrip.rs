//! Namespace round trips: each object is created with raylimit's codec in a fresh namespace, read
//! back with raylimit's decoder and with `tc` as an independent oracle, changed in place, and
//! deleted. Kinds this kernel lacks are refused with the missing feature named.

mod common;

use std::net::Ipv4Addr;

use common::*;
use raylimit::model::action::{Action, Verdict};
use raylimit::model::fw::Fw;
use raylimit::model::htb::HtbQdisc;
use raylimit::model::matchall::MatchAll;
use raylimit::model::tc::*;
use raylimit::model::u32::*;
use raylimit::model::{TcHandle, U32Handle};
use raylimit::netlink::probe::{missing_feature, Capabilities, Feature};
use raylimit::netlink::RtSocket;
use raylimit::shaping::{frame_bytes, leaf_class, Leaf, ETHERNET_MTU};

const ROOT: TcHandle = TcHandle::new(0x7a31, 0);

fn dump(sock: &mut RtSocket, ty: u16, ifindex: u32, parent: TcHandle) -> Vec<TcEntry> {
    sock.dump(&dump_request(ty, ifindex, parent), "dump")
        .unwrap()
        .iter()
        .map(|m| decode(m.msg_type, &m.payload).unwrap())
        .filter(|e| match e {
            TcEntry::Qdisc(q) => q.qdisc.ifindex == ifindex,
            TcEntry::Class(c) => c.class.ifindex == ifindex,
            TcEntry::Filter(f) => f.filter.ifindex == ifindex,
        })
        .collect()
}

fn setup() -> (Netns, RtSocket, u32) {
    let ns = Netns::new("rt");
    ns.ip(&[
        "link", "add", "veth-a", "type", "veth", "peer", "name", "veth-b",
    ]);
    ns.ip(&["link", "set", "veth-a", "up"]);
    let mut sock = ns.socket();
    let ifindex = sock.link_by_name("veth-a").unwrap().index;
    (ns, sock, ifindex)
}

fn htb_root(ifindex: u32) -> Qdisc {
    Qdisc {
        ifindex,
        handle: ROOT,
        parent: TcHandle::ROOT,
        kind: QdiscKind::Htb(HtbQdisc {
            direct_qlen: Some(1000),
            ..Default::default()
        }),
    }
}

#[test]
fn htb_qdisc_and_classes_round_trip_and_change_in_place() {
    require(&[need::NAMESPACE, &[need::TC, need::VETH, need::HTB]]);
    let (ns, mut sock, ifindex) = setup();
    let root = htb_root(ifindex);
    sock.request(root.request(Op::Create), "add qdisc").unwrap();
    let qdiscs = dump(&mut sock, RTM_GETQDISC, ifindex, TcHandle(0));
    assert!(
        qdiscs
            .iter()
            .any(|e| matches!(e, TcEntry::Qdisc(q) if q.qdisc == root)),
        "{qdiscs:?}"
    );
    let oracle = ns.tc(&["-j", "qdisc", "show", "dev", "veth-a"]);
    assert!(
        oracle.contains(r#""kind":"htb","handle":"7a31:","root":true"#),
        "{oracle}"
    );

    // A 1 MB/s class, a 4 KiB/s class, and one past 2^32 bytes/s (64-bit attributes).
    let classes: Vec<Class> = [(0x10u16, 1_000_000u64), (0x11, 4096), (0x12, 6_000_000_000)]
        .iter()
        .map(|&(minor, rate)| Class {
            ifindex,
            handle: TcHandle::new(0x7a31, minor),
            parent: ROOT,
            kind: ClassKind::Htb(leaf_class(rate, Leaf::Default, frame_bytes(ETHERNET_MTU))),
        })
        .collect();
    for c in &classes {
        sock.request(c.request(Op::Create), "add class").unwrap();
    }
    let dumped = dump(&mut sock, RTM_GETTCLASS, ifindex, TcHandle(0));
    for c in &classes {
        assert!(
            dumped
                .iter()
                .any(|e| matches!(e, TcEntry::Class(d) if d.class == c.canonical())),
            "{c:?} not in {dumped:?}"
        );
    }
    let text = ns.tc(&["class", "show", "dev", "veth-a"]);
    assert!(
        text.contains("class htb 7a31:10 root prio 0 rate 8Mbit ceil 8Mbit"),
        "{text}"
    );
    assert!(
        text.contains("class htb 7a31:12 root prio 0 rate 48Gbit ceil 48Gbit"),
        "{text}"
    );

    // Change in place: same handle, new rate, counters keep counting.
    let changed = Class {
        kind: ClassKind::Htb(leaf_class(
            2_000_000,
            Leaf::Default,
            frame_bytes(ETHERNET_MTU),
        )),
        ..classes[0].clone()
    };
    sock.request(changed.request(Op::Change), "change class")
        .unwrap();
    let dumped = dump(&mut sock, RTM_GETTCLASS, ifindex, TcHandle(0));
    assert!(dumped
        .iter()
        .any(|e| matches!(e, TcEntry::Class(d) if d.class == changed.canonical())));
    assert!(ns
        .tc(&["class", "show", "dev", "veth-a"])
        .contains("class htb 7a31:10 root prio 0 rate 16Mbit ceil 16Mbit"));

    for c in &classes {
        sock.request(c.request(Op::Delete), "delete class").unwrap();
    }
    assert!(dump(&mut sock, RTM_GETTCLASS, ifindex, TcHandle(0)).is_empty());
    sock.request(root.request(Op::Delete), "delete qdisc")
        .unwrap();
    assert!(!ns.tc(&["qdisc", "show", "dev", "veth-a"]).contains("htb"));
}

/// The leaf raylimit puts under each class: the kernel takes it, dumps it back equal (64-bit
/// rates included), tc reads the same queue limit, and a class delete takes it along.
#[test]
fn tbf_leaves_round_trip_and_go_with_their_class() {
    require(&[need::NAMESPACE, &[need::TC, need::VETH, need::HTB]]);
    let (ns, mut sock, ifindex) = setup();
    let root = htb_root(ifindex);
    sock.request(root.request(Op::Create), "add qdisc").unwrap();
    let frame = frame_bytes(ETHERNET_MTU);
    let mut leaves = Vec::new();
    for (minor, rate) in [(0x10u16, 4096u64), (0x11, 1_000_000), (0x12, 6_000_000_000)] {
        let class = Class {
            ifindex,
            handle: TcHandle::new(0x7a31, minor),
            parent: ROOT,
            kind: ClassKind::Htb(leaf_class(rate, Leaf::Tbf, frame)),
        };
        sock.request(class.request(Op::Create), "add class")
            .unwrap();
        let leaf = Qdisc {
            ifindex,
            handle: TcHandle::new(minor, 0),
            parent: class.handle,
            kind: QdiscKind::Tbf(raylimit::shaping::leaf_tbf(rate, frame)),
        };
        sock.request(leaf.request(Op::Create), "add leaf").unwrap();
        leaves.push(leaf);
    }
    let dumped = dump(&mut sock, RTM_GETQDISC, ifindex, TcHandle(0));
    for leaf in &leaves {
        assert!(
            dumped
                .iter()
                .any(|e| matches!(e, TcEntry::Qdisc(q) if q.qdisc == *leaf)),
            "{leaf:?} not in {dumped:?}"
        );
    }
    // tc's own reading, and the slow (4 KiB/s) leaf's queue: 8 MiB, above a TCP window.
    let text = ns.tc(&["-j", "qdisc", "show", "dev", "veth-a"]);
    assert!(
        text.contains(r#""kind":"tbf","handle":"10:","parent":"7a31:10""#),
        "{text}"
    );
    let QdiscKind::Tbf(slow) = &leaves[0].kind else {
        unreachable!()
    };
    assert_eq!(slow.limit, 8 << 20);
    // Replacing a leaf with other options changes it in place.
    let mut changed = leaves[1].clone();
    changed.kind = QdiscKind::Tbf(raylimit::shaping::leaf_tbf(2_000_000, frame));
    sock.request(changed.request(Op::Replace), "replace leaf")
        .unwrap();
    let dumped = dump(&mut sock, RTM_GETQDISC, ifindex, TcHandle(0));
    assert!(dumped
        .iter()
        .any(|e| matches!(e, TcEntry::Qdisc(q) if q.qdisc == changed)));
    // Deleting a class destroys its leaf.
    sock.request(
        Class {
            ifindex,
            handle: TcHandle::new(0x7a31, 0x10),
            parent: ROOT,
            kind: ClassKind::Htb(leaf_class(4096, Leaf::Tbf, frame)),
        }
        .request(Op::Delete),
        "delete class",
    )
    .unwrap();
    let dumped = dump(&mut sock, RTM_GETQDISC, ifindex, TcHandle(0));
    assert!(!dumped
        .iter()
        .any(|e| matches!(e, TcEntry::Qdisc(q) if q.qdisc.handle == leaves[0].handle)));
    sock.request(root.request(Op::Delete), "delete qdisc")
        .unwrap();
}

fn u32_filter(
    ifindex: u32,
    priority: u16,
    protocol: u16,
    handle: U32Handle,
    u: U32Filter,
) -> Filter {
    Filter {
        ifindex,
        parent: ROOT,
        priority,
        protocol,
        handle: handle.0,
        kind: FilterKind::U32(u),
    }
}

#[test]
fn u32_filters_round_trip_with_tc_as_oracle() {
    require(&[need::NAMESPACE, need::DOWNLOAD, &[need::TC, need::VETH]]);
    let (ns, mut sock, ifindex) = setup();
    sock.request(htb_root(ifindex).request(Op::Create), "qdisc")
        .unwrap();
    let class = TcHandle::new(0x7a31, 0x10);
    sock.request(
        Class {
            ifindex,
            handle: class,
            parent: ROOT,
            kind: ClassKind::Htb(leaf_class(
                1_000_000,
                Leaf::Default,
                frame_bytes(ETHERNET_MTU),
            )),
        }
        .request(Op::Create),
        "class",
    )
    .unwrap();

    let mut v4 = U32Selector::default();
    v4.ipv4(End::Destination, Ipv4Addr::new(10, 99, 0, 2), 32);
    let mut v4_prefix = U32Selector::default();
    v4_prefix.ipv4(End::Source, Ipv4Addr::new(10, 99, 8, 0), 21);
    let mut v6 = U32Selector::default();
    v6.ipv6(End::Destination, "2001:db8::1".parse().unwrap(), 128);
    let mut v6_prefix = U32Selector::default();
    v6_prefix.ipv6(End::Source, "2001:db8:ab00::".parse().unwrap(), 41);
    let mut tcp4 = U32Selector::default();
    tcp4.protocol(Family::V4, 6)
        .port(Family::V4, End::Source, 443);
    let mut udp6 = U32Selector::default();
    udp6.protocol(Family::V6, 17)
        .port(Family::V6, End::Destination, 53);
    let mut all = U32Selector::default();
    all.catch_all();
    let filters = vec![
        u32_filter(
            ifindex,
            10,
            ETH_P_IP,
            U32Handle::new(0x800, 0, 0x801),
            U32Filter::to_class(v4, class),
        ),
        u32_filter(
            ifindex,
            10,
            ETH_P_IP,
            U32Handle::new(0x800, 0, 0x802),
            U32Filter::to_class(v4_prefix, class),
        ),
        u32_filter(
            ifindex,
            11,
            ETH_P_IPV6,
            U32Handle::new(0x801, 0, 1),
            U32Filter::to_class(v6, class),
        ),
        u32_filter(
            ifindex,
            11,
            ETH_P_IPV6,
            U32Handle::new(0x801, 0, 2),
            U32Filter::to_class(v6_prefix, class),
        ),
        u32_filter(
            ifindex,
            12,
            ETH_P_IP,
            U32Handle::new(0x802, 0, 1),
            U32Filter::to_class(tcp4, class),
        ),
        u32_filter(
            ifindex,
            13,
            ETH_P_IPV6,
            U32Handle::new(0x803, 0, 1),
            U32Filter::to_class(udp6, class),
        ),
        // The unlimited exception: classid = the HTB root sends packets to the direct queue.
        u32_filter(
            ifindex,
            14,
            ETH_P_ALL,
            U32Handle::new(0x804, 0, 1),
            U32Filter::to_class(all, ROOT),
        ),
    ];
    for f in &filters {
        sock.request(f.request(Op::Create), "add filter").unwrap();
    }
    let dumped = dump(&mut sock, RTM_GETTFILTER, ifindex, ROOT);
    for f in &filters {
        assert!(
            dumped
                .iter()
                .any(|e| matches!(e, TcEntry::Filter(d) if d.filter == f.canonical())),
            "{f} not in dump"
        );
    }
    let oracle = ns.tc(&["-j", "filter", "show", "dev", "veth-a", "parent", "7a31:"]);
    for needle in [
        r#""fh":"800::801","order":2049,"key_ht":"800","bkt":"0","flowid":"7a31:10""#,
        r#""match":{"value":"a630002","mask":"ffffffff","offmask":"","off":16}"#,
        r#""match":{"value":"a630800","mask":"fffff800","offmask":"","off":12}"#,
        r#""match":{"value":"1bb0000","mask":"ffff0000","offmask":"","off":20}"#,
        r#""fh":"804::1","order":1,"key_ht":"804","bkt":"0","flowid":"7a31:""#,
    ] {
        assert!(
            oracle.contains(needle),
            "tc does not show {needle}:\n{oracle}"
        );
    }

    // Replace in place: the same handle now points at the root (unlimited) instead of the class.
    let mut replaced = filters[0].clone();
    if let FilterKind::U32(u) = &mut replaced.kind {
        u.classid = Some(ROOT);
    }
    sock.request(replaced.request(Op::Replace), "replace filter")
        .unwrap();
    let dumped = dump(&mut sock, RTM_GETTFILTER, ifindex, ROOT);
    assert!(dumped
        .iter()
        .any(|e| matches!(e, TcEntry::Filter(d) if d.filter == replaced.canonical())));

    // Delete exactly one filter; the others stay.
    sock.request(filters[1].request(Op::Delete), "delete filter")
        .unwrap();
    let dumped = dump(&mut sock, RTM_GETTFILTER, ifindex, ROOT);
    assert!(!dumped.iter().any(|e| matches!(e, TcEntry::Filter(d) if d.filter.handle == filters[1].handle && d.filter.priority == 10)));
    assert!(dumped
        .iter()
        .any(|e| matches!(e, TcEntry::Filter(d) if d.filter == replaced.canonical())));
    // Deleting the class while filters point at it is refused with the kernel's reason.
    let err = sock
        .request(
            Class {
                ifindex,
                handle: class,
                parent: ROOT,
                kind: ClassKind::Htb(leaf_class(1, Leaf::Default, frame_bytes(ETHERNET_MTU))),
            }
            .request(Op::Delete),
            "delete class",
        )
        .unwrap_err();
    assert_eq!(err.kernel().map(|k| k.errno), Some(libc::EBUSY), "{err}");
    assert!(err.to_string().contains("HTB class in use"), "{err}");
}

#[test]
fn u32_hash_tables_classify_into_buckets() {
    require(&[need::NAMESPACE, need::DOWNLOAD, &[need::TC, need::VETH]]);
    let (ns, mut sock, ifindex) = setup();
    sock.request(htb_root(ifindex).request(Op::Create), "qdisc")
        .unwrap();
    let class = TcHandle::new(0x7a31, 0x10);
    sock.request(
        Class {
            ifindex,
            handle: class,
            parent: ROOT,
            kind: ClassKind::Htb(leaf_class(
                1_000_000,
                Leaf::Default,
                frame_bytes(ETHERNET_MTU),
            )),
        }
        .request(Op::Create),
        "class",
    )
    .unwrap();
    let table = U32Handle::new(0x10, 0, 0);
    let t = Filter {
        ifindex,
        parent: ROOT,
        priority: 20,
        protocol: ETH_P_IP,
        handle: table.0,
        kind: FilterKind::U32(U32Filter::table(256)),
    };
    sock.request(t.request(Op::Create), "table").unwrap();
    let mut sel = U32Selector::default();
    sel.ipv4(End::Destination, Ipv4Addr::new(10, 99, 0, 0), 16);
    sel.hmask = 0xff;
    sel.hoff = 16;
    let link = u32_filter(
        ifindex,
        20,
        ETH_P_IP,
        U32Handle::new(0x800, 0, 1),
        U32Filter {
            link: Some(table),
            selector: Some(sel),
            ..Default::default()
        },
    );
    sock.request(link.request(Op::Create), "link").unwrap();
    let mut host = U32Selector::default();
    host.ipv4(End::Destination, Ipv4Addr::new(10, 99, 0, 5), 32);
    let mut entry = U32Filter::to_class(host, class);
    entry.hash = Some(U32Handle::new(0x10, 5, 0));
    let entry = u32_filter(ifindex, 20, ETH_P_IP, U32Handle::new(0x10, 5, 1), entry);
    sock.request(entry.request(Op::Create), "entry").unwrap();
    let dumped = dump(&mut sock, RTM_GETTFILTER, ifindex, ROOT);
    for f in [&t, &link.canonical(), &entry] {
        assert!(
            dumped
                .iter()
                .any(|e| matches!(e, TcEntry::Filter(d) if d.filter == *f)),
            "{f} missing from {dumped:#?}"
        );
    }
    let oracle = ns.tc(&["-j", "filter", "show", "dev", "veth-a", "parent", "7a31:"]);
    assert!(
        oracle.contains(r#""fh":"10:","ht_divisor":256"#),
        "{oracle}"
    );
    assert!(oracle.contains(r#""fh":"10:5:1""#), "{oracle}");
}

#[test]
fn clsact_ingress_mirred_and_ifb_links() {
    require(&[
        need::NAMESPACE,
        &[need::TC, need::VETH, need::U32],
        need::REDIRECT,
    ]);
    let (ns, mut sock, ifindex) = setup();
    let ifb = sock.create_ifb("rl-ifb-rt").unwrap();
    assert_eq!(ifb.kind.as_deref(), Some("ifb"));
    assert!(!ifb.up);
    sock.set_link_up(ifb.index).unwrap();
    assert!(sock.link_by_name("rl-ifb-rt").unwrap().up);
    assert!(ns
        .ip(&["-j", "link", "show", "rl-ifb-rt"])
        .contains("\"UP\""));

    for kind in [QdiscKind::Clsact, QdiscKind::Ingress] {
        let q = Qdisc {
            ifindex,
            handle: TcHandle::INGRESS_QDISC,
            parent: TcHandle::INGRESS,
            kind: kind.clone(),
        };
        sock.request(q.request(Op::Create), "hook").unwrap();
        let parent = if kind == QdiscKind::Clsact {
            TcHandle::CLSACT_INGRESS
        } else {
            TcHandle::INGRESS_QDISC
        };
        let mut all = U32Selector::default();
        all.catch_all();
        let f = Filter {
            ifindex,
            parent,
            priority: 1,
            protocol: ETH_P_ALL,
            handle: U32Handle::new(0x800, 0, 1).0,
            kind: FilterKind::U32(U32Filter::with_actions(
                all,
                vec![Action::redirect_to(ifb.index)],
            )),
        };
        sock.request(f.request(Op::Create), "redirect").unwrap();
        let dumped = dump(&mut sock, RTM_GETTFILTER, ifindex, parent);
        assert!(
            dumped
                .iter()
                .any(|e| matches!(e, TcEntry::Filter(d) if d.filter == f.canonical())),
            "{dumped:?}"
        );
        let oracle = ns.tc(&["filter", "show", "dev", "veth-a", "ingress"]);
        assert!(
            oracle.contains("Egress Redirect to device rl-ifb-rt"),
            "{oracle}"
        );
        assert!(dump(&mut sock, RTM_GETQDISC, ifindex, TcHandle(0))
            .iter()
            .any(|e| matches!(e, TcEntry::Qdisc(d) if d.qdisc == q)));
        sock.request(q.request(Op::Delete), "remove hook").unwrap();
        assert!(!ns.tc(&["qdisc", "show", "dev", "veth-a"]).contains("ffff:"));
    }
    sock.delete_link(ifb.index).unwrap();
    assert!(matches!(
        sock.link_by_name("rl-ifb-rt"),
        Err(raylimit::netlink::NetlinkError::NoSuchDevice(_))
    ));
}

/// matchall, fw, gact and connmark: created where the kernel has them, otherwise refused with
/// the feature named, matching what the capability probe predicted.
#[test]
fn optional_kinds_are_confirmed_by_the_kernel() {
    require(&[need::NAMESPACE, need::DOWNLOAD, &[need::VETH]]);
    let (_ns, mut sock, ifindex) = setup();
    sock.request(htb_root(ifindex).request(Op::Create), "qdisc")
        .unwrap();
    let class = TcHandle::new(0x7a31, 0x10);
    sock.request(
        Class {
            ifindex,
            handle: class,
            parent: ROOT,
            kind: ClassKind::Htb(leaf_class(
                1_000_000,
                Leaf::Default,
                frame_bytes(ETHERNET_MTU),
            )),
        }
        .request(Op::Create),
        "class",
    )
    .unwrap();
    let caps = Capabilities::probe();
    let mut dst = U32Selector::default();
    dst.ipv4(End::Destination, Ipv4Addr::new(10, 99, 0, 9), 32);
    let cases = [
        (
            Feature::Matchall,
            FilterKind::MatchAll(MatchAll {
                classid: Some(class),
                ..Default::default()
            }),
            0x1,
        ),
        (
            Feature::Fw,
            FilterKind::Fw(Fw {
                classid: Some(class),
                mask: Some(0xff00),
                actions: vec![],
            }),
            0x100,
        ),
        (
            Feature::Gact,
            FilterKind::U32(U32Filter::with_actions(
                dst.clone(),
                vec![Action::Gact {
                    verdict: Verdict::OK,
                }],
            )),
            U32Handle::new(0, 0, 1).0,
        ),
        (
            Feature::Connmark,
            FilterKind::U32(U32Filter::with_actions(
                dst,
                vec![Action::Connmark {
                    zone: 0,
                    verdict: Verdict::PIPE,
                }],
            )),
            U32Handle::new(0, 0, 1).0,
        ),
    ];
    for (i, (feature, kind, handle)) in cases.into_iter().enumerate() {
        let f = Filter {
            ifindex,
            parent: ROOT,
            priority: 30 + i as u16,
            protocol: ETH_P_IP,
            handle,
            kind,
        };
        match sock.request(f.request(Op::Create), "add") {
            Ok(_) => {
                assert!(
                    caps.has(feature),
                    "{} worked but the probe said {:?}",
                    feature.name(),
                    caps.get(feature)
                );
                let dumped = dump(&mut sock, RTM_GETTFILTER, ifindex, ROOT);
                // u32 nodes given only a node id land in the table the kernel made for the priority.
                assert!(dumped.iter().any(|e| matches!(e, TcEntry::Filter(d)
                    if d.filter.priority == f.priority && d.filter.kind_name() == f.kind_name())));
            }
            Err(e) => {
                let missing = missing_feature(feature, e.kernel().expect("kernel refusal"))
                    .unwrap_or_else(|| {
                        panic!(
                            "{} refusal does not name a missing feature: {e}",
                            feature.name()
                        )
                    });
                eprintln!(
                    "kernel lacks {}: {missing} (covered at the byte level in tests/fixtures.rs)",
                    feature.name()
                );
                assert!(
                    !caps.has(feature),
                    "probe said {} is available: {:?}",
                    feature.name(),
                    caps.get(feature)
                );
            }
        }
    }
}

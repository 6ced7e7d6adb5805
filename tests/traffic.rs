//! First real traffic: HTB classes and u32 filters made by raylimit's codec hold a TCP stream to
//! within 10% of 1 MB/s, on egress (download) and on the ingress path through clsact + mirred +
//! an IFB (upload).

mod common;

use std::net::{IpAddr, SocketAddr};

use common::*;
use raylimit::model::action::Action;
use raylimit::model::tc::*;
use raylimit::model::u32::{End, U32Filter, U32Selector};
use raylimit::model::{TcHandle, U32Handle};
use raylimit::shaping::{frame_bytes, leaf_class, Leaf, ETHERNET_MTU};

const RATE: u64 = 1_000_000;

fn htb_with_class(sock: &mut raylimit::netlink::RtSocket, ifindex: u32, sel: U32Selector) {
    let root = TcHandle::new(0x7a31, 0);
    let class = TcHandle::new(0x7a31, 0x10);
    sock.request(
        Qdisc {
            ifindex,
            handle: root,
            parent: TcHandle::ROOT,
            kind: QdiscKind::Htb(Default::default()),
        }
        .request(Op::Create),
        "qdisc",
    )
    .unwrap();
    sock.request(
        Class {
            ifindex,
            handle: class,
            parent: root,
            kind: ClassKind::Htb(leaf_class(RATE, Leaf::Default, frame_bytes(ETHERNET_MTU))),
        }
        .request(Op::Create),
        "class",
    )
    .unwrap();
    let filter = Filter {
        ifindex,
        parent: root,
        priority: 100,
        protocol: ETH_P_IP,
        handle: U32Handle::new(0x800, 0, 1).0,
        kind: FilterKind::U32(U32Filter::to_class(sel, class)),
    };
    sock.request(filter.request(Op::Create), "filter").unwrap();
}

#[test]
fn egress_class_holds_download_to_1_mb_per_s() {
    require(&[need::NAMESPACE, need::DOWNLOAD, &[need::VETH]]);
    let pair = Pair::new("dl");
    let mut sock = pair.server.socket();
    let ifindex = pair.server.ifindex("veth-s");
    let client: IpAddr = CLIENT_IP.parse().unwrap();
    let unshaped = measure_tcp(&pair.server, &pair.client, SocketAddr::new(client, 5201), 2);
    assert!(
        unshaped > 10.0 * RATE as f64,
        "unshaped link too slow: {unshaped}"
    );
    let mut sel = U32Selector::default();
    sel.ipv4(End::Destination, CLIENT_IP.parse().unwrap(), 32);
    htb_with_class(&mut sock, ifindex, sel);
    let shaped = measure_tcp(&pair.server, &pair.client, SocketAddr::new(client, 5202), 5);
    assert_within_10_percent("download (egress HTB)", shaped, RATE as f64);
}

#[test]
fn ifb_class_holds_upload_to_1_mb_per_s() {
    require(&[need::NAMESPACE, need::UPLOAD, &[need::VETH]]);
    let pair = Pair::new("ul");
    let mut sock = pair.server.socket();
    let veth = pair.server.ifindex("veth-s");
    let ifb = sock.create_ifb("rl-ifb-t").unwrap();
    sock.set_link_up(ifb.index).unwrap();
    sock.request(
        Qdisc {
            ifindex: veth,
            handle: TcHandle::INGRESS_QDISC,
            parent: TcHandle::INGRESS,
            kind: QdiscKind::Clsact,
        }
        .request(Op::Create),
        "clsact",
    )
    .unwrap();
    let mut all = U32Selector::default();
    all.catch_all();
    let redirect = Filter {
        ifindex: veth,
        parent: TcHandle::CLSACT_INGRESS,
        priority: 1,
        protocol: ETH_P_ALL,
        handle: U32Handle::new(0x800, 0, 1).0,
        kind: FilterKind::U32(U32Filter::with_actions(
            all,
            vec![Action::redirect_to(ifb.index)],
        )),
    };
    sock.request(redirect.request(Op::Create), "redirect")
        .unwrap();
    let mut sel = U32Selector::default();
    sel.ipv4(End::Source, CLIENT_IP.parse().unwrap(), 32);
    htb_with_class(&mut sock, ifb.index, sel);
    let server: IpAddr = SERVER_IP.parse().unwrap();
    let shaped = measure_tcp(&pair.client, &pair.server, SocketAddr::new(server, 5203), 5);
    assert_within_10_percent("upload (clsact + mirred + IFB HTB)", shaped, RATE as f64);
}

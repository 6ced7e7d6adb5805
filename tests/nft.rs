//! raylimit's nftables table in private network namespaces: applied as atomic batches over
//! nfnetlink, read back with our own decoder and with `nft -j` as an independent oracle, a failing
//! batch that leaves everything as it was, and real TCP traffic showing that `meta priority set`
//! in postrouting puts socket-marked packets into an HTB class (this kernel has neither `fw` nor
//! u32's mark key, so this is how raylimit classifies by socket mark).
#![cfg(feature = "nftables")]

mod common;

use std::net::{SocketAddrV4, TcpStream};
use std::os::fd::FromRawFd;

use common::{assert_within_10_percent, measure_tcp_with, need, require, Netns, Pair, CLIENT_IP};
use raylimit::model::TcHandle;
use raylimit::netlink::nft::{
    self, ManagedRule, NftOp, NftRule, NftState, Tag, CHAIN_CLASSIFY, CHAIN_SAVE,
};

fn nft_cmd(ns: &Netns, args: &[&str]) -> String {
    let mut full = vec!["ip", "netns", "exec", &ns.name, "nft"];
    full.extend_from_slice(args);
    common::run(&full)
}

fn tag(subject: &str) -> Tag {
    Tag {
        owner: "test:/usr/bin/xray:/etc/xray/config.json".into(),
        subject: subject.into(),
    }
}

fn scaffolding() -> Vec<NftOp> {
    vec![
        NftOp::AddTable,
        NftOp::AddChain(CHAIN_CLASSIFY),
        NftOp::AddChain(CHAIN_SAVE),
    ]
}

#[test]
fn table_chains_and_rules_round_trip_and_batches_are_atomic() {
    require(&[need::NAMESPACE, &[need::NFT, need::VETH, need::NF_TABLES]]);
    let ns = Netns::new("nft");
    ns.ip(&["link", "add", "v0", "type", "veth", "peer", "name", "v1"]);
    let oif = ns.ifindex("v0");
    let p = ns.path();

    // Nothing yet: a missing table is no error.
    assert_eq!(nft::dump(Some(&p)).unwrap(), NftState::default());

    let to_class = NftRule::MarkToPriority {
        oif,
        mask: 0x00ff_0000,
        value: 0x0001_0000,
        priority: 0x524c_0100,
    };
    let save = NftRule::SaveMark {
        oif,
        mask: 0x00ff_0000,
        value: 0x0001_0000,
    };
    let mut ops = scaffolding();
    ops.push(NftOp::AddRule {
        rule: to_class.clone(),
        tag: tag("outbound:proxy upload"),
    });
    ops.push(NftOp::AddRule {
        rule: save.clone(),
        tag: tag("outbound:proxy download"),
    });
    nft::apply(Some(&p), &ops).expect("apply table, chains and rules");

    let state = nft::dump(Some(&p)).unwrap();
    assert!(state.rules.iter().all(|r| r.handle != 0), "{state:?}");
    assert_ne!(state.rules[0].handle, state.rules[1].handle);
    let expected = NftState {
        table: true,
        chains: vec![CHAIN_CLASSIFY.into(), CHAIN_SAVE.into()],
        rules: vec![
            ManagedRule {
                chain: CHAIN_CLASSIFY.into(),
                handle: state.rules[0].handle,
                rule: to_class.clone(),
                tag: Some(tag("outbound:proxy upload")),
                packets: 0,
                bytes: 0,
            },
            ManagedRule {
                chain: CHAIN_SAVE.into(),
                handle: state.rules[1].handle,
                rule: save.clone(),
                tag: Some(tag("outbound:proxy download")),
                packets: 0,
                bytes: 0,
            },
        ],
        foreign: vec![],
    };
    assert_eq!(state, expected);

    // The oracle: nft's own reading of the table.
    let json: serde_json::Value =
        serde_json::from_str(&nft_cmd(&ns, &["-j", "list", "table", "inet", "raylimit"])).unwrap();
    let items = json["nftables"].as_array().unwrap();
    let chains: Vec<&serde_json::Value> = items.iter().filter_map(|i| i.get("chain")).collect();
    assert_eq!(chains.len(), 2);
    for c in &chains {
        let (hook, name) = (c["hook"].as_str().unwrap(), c["name"].as_str().unwrap());
        assert_eq!(
            hook,
            if name == CHAIN_CLASSIFY {
                "postrouting"
            } else {
                "output"
            }
        );
        assert_eq!(c["prio"], -150);
        assert_eq!(c["type"], "filter");
        assert_eq!(c["policy"], "accept");
    }
    let rules: Vec<&serde_json::Value> = items.iter().filter_map(|i| i.get("rule")).collect();
    assert_eq!(rules.len(), 2, "{json}");
    for (r, ours) in rules.iter().zip(&state.rules) {
        assert_eq!(r["chain"], ours.chain.as_str());
        assert_eq!(r["handle"], ours.handle);
        assert!(r.get("comment").is_none(), "the tag is no comment: {r}");
        let text = r["expr"].to_string();
        for needle in ["{\"meta\":{\"key\":\"mark\"}},16711680]", "\"right\":65536"] {
            assert!(text.contains(needle), "{needle} not in {text}");
        }
        if ours.chain == CHAIN_CLASSIFY {
            assert!(text.contains("\"right\":\"v0\""), "{text}");
            assert!(
                text.contains("\"key\":\"priority\"}},\"value\":\"524c:100\""),
                "{text}"
            );
        } else {
            // ct mark set ct mark & 0xff00ffff | 0x00010000, as nft renders it.
            assert!(text.contains("\"ct\":{\"key\":\"mark\"}"), "{text}");
            assert!(text.contains("65536"), "{text}");
        }
    }

    // Adding the table and chains again changes nothing (no EEXIST): a repeat is harmless.
    nft::apply(Some(&p), &scaffolding()).expect("repeat the scaffolding");
    assert_eq!(nft::dump(Some(&p)).unwrap(), expected);

    // Someone else's rule in raylimit's table is reported, never decoded as ours.
    nft_cmd(
        &ns,
        &["add", "rule", "inet", "raylimit", "classify", "counter"],
    );
    let with_foreign = nft::dump(Some(&p)).unwrap();
    assert_eq!(with_foreign.rules, expected.rules);
    assert_eq!(with_foreign.foreign.len(), 1, "{with_foreign:?}");
    assert!(
        with_foreign.foreign[0].starts_with("rule classify handle ")
            && with_foreign.foreign[0].ends_with("[ counter pkts 0 bytes 0 ]"),
        "{:?}",
        with_foreign.foreign
    );

    // One rule deleted by handle.
    let gone = state.rules[0].handle;
    nft::apply(
        Some(&p),
        &[NftOp::DeleteRule {
            chain: CHAIN_CLASSIFY.into(),
            handle: gone,
        }],
    )
    .unwrap();
    let after_delete = nft::dump(Some(&p)).unwrap();
    assert_eq!(after_delete.rules, expected.rules[1..]);

    // A batch with one failing operation applies nothing and names the operation.
    let failing = [
        NftOp::AddRule {
            rule: to_class.clone(),
            tag: tag("would be added"),
        },
        NftOp::DeleteRule {
            chain: CHAIN_CLASSIFY.into(),
            handle: 999_999,
        },
    ];
    let err = nft::apply(Some(&p), &failing).unwrap_err();
    let text = err.to_string();
    eprintln!("failing batch: {text}");
    assert!(
        text.contains("nft delete rule inet raylimit classify handle 999999"),
        "{text}"
    );
    assert_eq!(err.kernel().map(|k| k.errno), Some(libc::ENOENT), "{text}");
    assert_eq!(
        nft::dump(Some(&p)).unwrap(),
        after_delete,
        "nothing applied"
    );

    // A chain goes once empty: its last rule and the chain in one batch.
    nft::apply(
        Some(&p),
        &[
            NftOp::DeleteRule {
                chain: CHAIN_SAVE.into(),
                handle: after_delete.rules[0].handle,
            },
            NftOp::DeleteChain(CHAIN_SAVE.into()),
        ],
    )
    .unwrap();
    let one_chain = nft::dump(Some(&p)).unwrap();
    assert_eq!(one_chain.chains, [CHAIN_CLASSIFY]);
    assert!(one_chain.rules.is_empty(), "{one_chain:?}");

    // The whole table goes, with everything in it.
    nft::apply(Some(&p), &[NftOp::DeleteTable]).unwrap();
    assert_eq!(nft::dump(Some(&p)).unwrap(), NftState::default());
    assert_eq!(nft_cmd(&ns, &["list", "tables"]).trim(), "");
}

/// A TCP connection whose socket carries `mark` (SO_MARK), as a runtime's `sockopt.mark` does.
fn connect_marked(addr: SocketAddrV4, mark: Option<u32>) -> std::io::Result<TcpStream> {
    let sockaddr = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: addr.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*addr.ip()).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: plain socket calls on a descriptor owned by the TcpStream from the start.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let stream = TcpStream::from_raw_fd(fd);
        if let Some(mark) = mark {
            if libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_MARK,
                &mark as *const u32 as *const libc::c_void,
                4,
            ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
        }
        if libc::connect(
            fd,
            &sockaddr as *const libc::sockaddr_in as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        ) != 0
        {
            return Err(std::io::Error::last_os_error());
        }
        Ok(stream)
    }
}

#[test]
fn meta_priority_in_postrouting_puts_marked_packets_in_the_htb_class() {
    require(&[
        need::NAMESPACE,
        &[need::TC, need::NFT, need::VETH, need::HTB, need::NF_TABLES],
    ]);
    const RATE: u64 = 250_000;
    const MARK: u32 = 0x2a;
    let pair = Pair::new("nftq");
    let sender = &pair.server;
    // The class, built with tc here (test only): HTB root 524c: (no default: unclaimed traffic is
    // unshaped) and one class at RATE bytes/s.
    sender.tc(&[
        "qdisc", "add", "dev", "veth-s", "root", "handle", "524c:", "htb",
    ]);
    let rate = format!("{RATE}bps");
    sender.tc(&[
        "class", "add", "dev", "veth-s", "parent", "524c:", "classid", "524c:1", "htb", "rate",
        &rate, "ceil", &rate,
    ]);
    let oif = sender.ifindex("veth-s");
    let mut ops = scaffolding();
    ops.push(NftOp::AddRule {
        rule: NftRule::MarkToPriority {
            oif,
            mask: 0xff,
            value: MARK,
            priority: 0x524c_0001,
        },
        tag: tag("traffic"),
    });
    ops.push(NftOp::AddRule {
        rule: NftRule::SaveMark {
            oif,
            mask: 0xff,
            value: MARK,
        },
        tag: tag("traffic"),
    });
    let p = sender.path();
    nft::apply(Some(&p), &ops).expect("apply");
    // Test-only oracle for the saved conntrack mark: the receiver's ACKs belong to the same
    // connection, so on input they carry the ct mark that save_mark wrote on output.
    nft_cmd(sender, &["add", "table", "inet", "rltest"]);
    nft_cmd(
        sender,
        &[
            "add",
            "chain",
            "inet",
            "rltest",
            "in",
            "{ type filter hook input priority 0 ; }",
        ],
    );
    nft_cmd(
        sender,
        &[
            "add", "rule", "inet", "rltest", "in", "ct", "mark", "and", "0xff", "==", "0x2a",
            "counter",
        ],
    );

    let addr: SocketAddrV4 = format!("{CLIENT_IP}:5201").parse().unwrap();
    let shaped = measure_tcp_with(sender, &pair.client, addr.into(), 4, move || {
        connect_marked(addr, Some(MARK))
    });
    assert_within_10_percent("marked socket through meta priority", shaped, RATE as f64);

    let state = nft::dump(Some(&p)).unwrap();
    let (classify, save) = (&state.rules[0], &state.rules[1]);
    // Counted per skb: TCP hands down GSO super-packets, so bytes say more than packets.
    assert!(
        classify.bytes as f64 >= shaped * 3.0 && save.bytes >= classify.bytes,
        "counters: {state:?}"
    );
    // The class's own counters (read with raylimit's tc decoder): the bytes went through 524c:1.
    let tc = sender.socket().device_tc(oif).unwrap();
    let class_bytes = tc
        .classes
        .iter()
        .find(|c| c.class.handle == TcHandle::new(0x524c, 1))
        .map(|c| c.stats.bytes)
        .expect("class 524c:1");
    assert!(
        class_bytes as f64 >= shaped * 3.0,
        "class 524c:1 sent only {class_bytes} bytes"
    );
    let ct_marked = || -> u64 {
        let json = nft_cmd(sender, &["-j", "list", "table", "inet", "rltest"]);
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        v["nftables"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|i| i.get("rule"))
            .flat_map(|r| r["expr"].as_array().unwrap().clone())
            .find_map(|e| e["counter"]["packets"].as_u64())
            .unwrap_or_else(|| panic!("no counter in {json}"))
    };
    let marked_acks = ct_marked();
    assert!(
        marked_acks >= 10,
        "ACKs with the saved ct mark: {marked_acks}"
    );

    // Without the mark the same path is not shaped, and its connection's ct mark stays clear.
    let addr: SocketAddrV4 = format!("{CLIENT_IP}:5202").parse().unwrap();
    let free = measure_tcp_with(sender, &pair.client, addr.into(), 3, move || {
        connect_marked(addr, None)
    });
    eprintln!(
        "unmarked socket: {free:.0} B/s; ACKs with ct mark 0x2a: {marked_acks} marked, {} more \
         after the unmarked run",
        ct_marked() - marked_acks
    );
    assert!(
        free > 8.0 * RATE as f64,
        "an unmarked socket ran at {free:.0} B/s"
    );
    assert!(
        ct_marked() - marked_acks < 10,
        "unmarked ACKs carried the mark"
    );
    nft::apply(Some(&p), &[NftOp::DeleteTable]).unwrap();
}

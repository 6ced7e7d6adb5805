//! Codec throughput: encoding and decoding the per-subject objects raylimit sends and reads most
//! (an HTB leaf class and a u32 specific-IP filter). Reports nanoseconds per object.
//!
//!   cargo bench --bench codec
//!
//! Under `cargo test --all-targets` it runs a few iterations only, as a smoke test.

use std::hint::black_box;
use std::net::Ipv4Addr;
use std::time::Instant;

use raylimit::model::tc::*;
use raylimit::model::u32::{End, U32Filter, U32Selector};
use raylimit::model::{TcHandle, U32Handle};
use raylimit::shaping::{frame_bytes, leaf_class, Leaf, ETHERNET_MTU};

fn main() {
    let iterations: u32 = if std::env::args().any(|a| a == "--bench") {
        200_000
    } else {
        100
    };
    let root = TcHandle::new(0x7a31, 0);
    let filters: Vec<Filter> = (0..1000u32)
        .map(|i| {
            let mut sel = U32Selector::default();
            sel.ipv4(End::Destination, Ipv4Addr::from(0x0a00_0000 + i), 32);
            Filter {
                ifindex: 3,
                parent: root,
                priority: 100,
                protocol: ETH_P_IP,
                handle: U32Handle::new(0x800, 0, i + 1).0,
                kind: FilterKind::U32(U32Filter::to_class(
                    sel,
                    TcHandle::new(0x7a31, (i + 16) as u16),
                )),
            }
        })
        .collect();
    let class = Class {
        ifindex: 3,
        handle: TcHandle::new(0x7a31, 0x10),
        parent: root,
        kind: ClassKind::Htb(leaf_class(
            1_000_000,
            Leaf::Default,
            frame_bytes(ETHERNET_MTU),
        )),
    };

    let start = Instant::now();
    let mut bytes = 0usize;
    for i in 0..iterations {
        bytes += black_box(filters[(i % 1000) as usize].request(Op::Create)).len();
        bytes += black_box(class.request(Op::Create)).len();
    }
    let encode = start.elapsed().as_nanos() as f64 / (2.0 * iterations as f64);

    let filter_msg = filters[7].request(Op::Create);
    let class_msg = class.request(Op::Create);
    let start = Instant::now();
    for _ in 0..iterations {
        black_box(decode(RTM_NEWTFILTER, black_box(&filter_msg[16..])).unwrap());
        black_box(decode(RTM_NEWTCLASS, black_box(&class_msg[16..])).unwrap());
    }
    let decode_ns = start.elapsed().as_nanos() as f64 / (2.0 * iterations as f64);
    println!("codec: encode {encode:.0} ns/object, decode {decode_ns:.0} ns/object ({iterations} iterations, {bytes} bytes)");
}

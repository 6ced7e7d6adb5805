//! No input makes a decoder panic: arbitrary bytes, and captured kernel messages with random
//! corruption (truncation, flipped bytes, lengths that lie), all either decode or return an error.
//! That holds for the tc decoder and for sock_diag's inet_diag_msg decoder.

use proptest::prelude::*;
use raylimit::model::tc::{decode, RTM_NEWQDISC, RTM_NEWTCLASS, RTM_NEWTFILTER};
use raylimit::netlink::sock_diag;

fn captured_payloads() -> &'static [(u16, Vec<u8>)] {
    static SAMPLES: std::sync::OnceLock<Vec<(u16, Vec<u8>)>> = std::sync::OnceLock::new();
    SAMPLES.get_or_init(load_samples)
}

fn load_samples() -> Vec<(u16, Vec<u8>)> {
    let dir = format!("{}/netlink-fixtures", env!("CARGO_MANIFEST_DIR"));
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("fixture") {
            continue;
        }
        let text = std::fs::read_to_string(path).unwrap();
        for line in text.lines().filter_map(|l| {
            l.strip_prefix("dump: ")
                .or_else(|| l.strip_prefix("request: "))
        }) {
            let bytes: Vec<u8> = (0..line.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&line[i..i + 2], 16).unwrap())
                .collect();
            let ty = u16::from_ne_bytes([bytes[4], bytes[5]]);
            if bytes.len() > 16 && [RTM_NEWQDISC, RTM_NEWTCLASS, RTM_NEWTFILTER].contains(&ty) {
                out.push((ty, bytes[16..].to_vec()));
            }
        }
    }
    assert!(out.len() > 40);
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 4000, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(ty in prop_oneof![Just(RTM_NEWQDISC), Just(RTM_NEWTCLASS), Just(RTM_NEWTFILTER), 0u16..100], bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = decode(ty, &bytes);
    }

    #[test]
    fn sock_diag_arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..160)) {
        let _ = sock_diag::decode(&bytes);
    }

    #[test]
    fn corrupted_kernel_messages_never_panic(pick in any::<prop::sample::Index>(), cut in any::<prop::sample::Index>(), flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8)) {
        let samples = captured_payloads();
        let (ty, mut bytes) = samples[pick.index(samples.len())].clone();
        for (at, value) in flips {
            let i = at.index(bytes.len());
            bytes[i] = value;
        }
        let len = cut.index(bytes.len() + 1);
        let _ = decode(ty, &bytes[..len]);
    }
}

#[test]
fn every_captured_message_decodes_intact() {
    for (ty, bytes) in captured_payloads() {
        decode(*ty, bytes).unwrap_or_else(|e| panic!("type {ty}: {e}"));
    }
}

//! fq_codel qdisc options (`linux/pkt_sched.h`: `TCA_FQ_CODEL_*`): flow queueing with CoDel
//! on each queue. Times are microseconds as the kernel takes and dumps them; it keeps them in
//! 1.024 µs units, so only multiples of 128 µs read back exactly as set.

use super::attr::{AttrWriter, Attrs};
use super::error::DecodeError;

const TCA_FQ_CODEL_TARGET: u16 = 1;
const TCA_FQ_CODEL_LIMIT: u16 = 2;
const TCA_FQ_CODEL_INTERVAL: u16 = 3;
const TCA_FQ_CODEL_ECN: u16 = 4;
const TCA_FQ_CODEL_FLOWS: u16 = 5;
const TCA_FQ_CODEL_QUANTUM: u16 = 6;
const TCA_FQ_CODEL_CE_THRESHOLD: u16 = 7;
const TCA_FQ_CODEL_DROP_BATCH_SIZE: u16 = 8;
const TCA_FQ_CODEL_MEMORY_LIMIT: u16 = 9;

/// The kernel's time unit for CoDel, in nanoseconds (`CODEL_SHIFT` 10).
const CODEL_UNIT_NS: u64 = 1 << 10;

/// fq_codel options, every one raylimit sets (the kernel dumps them all back).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FqCodelQdisc {
    /// Packets the qdisc holds at most.
    pub limit: u32,
    /// Flow queues; fixed when the qdisc is made (the kernel refuses to change it).
    pub flows: u32,
    /// Bytes a flow may send per round.
    pub quantum: u32,
    /// Sojourn time CoDel aims at, µs.
    pub target_us: u32,
    /// The window CoDel watches the sojourn time over, µs.
    pub interval_us: u32,
    /// Mark ECN-capable packets instead of dropping them.
    pub ecn: bool,
    /// Bytes the qdisc holds at most.
    pub memory_limit: u32,
    /// Packets dropped at once when the qdisc is full.
    pub drop_batch_size: u32,
    /// CE marking threshold, µs (`None`: off); kept so a hand-set one reads as a change.
    pub ce_threshold_us: Option<u32>,
}

impl FqCodelQdisc {
    /// The options in iproute2's order. `with_flows` is for creation only: the kernel refuses a
    /// change that names the flow count at all.
    pub fn encode_options(&self, w: &mut AttrWriter, with_flows: bool) {
        w.put_u32(TCA_FQ_CODEL_LIMIT, self.limit);
        if with_flows {
            w.put_u32(TCA_FQ_CODEL_FLOWS, self.flows);
        }
        w.put_u32(TCA_FQ_CODEL_QUANTUM, self.quantum);
        w.put_u32(TCA_FQ_CODEL_INTERVAL, self.interval_us);
        w.put_u32(TCA_FQ_CODEL_TARGET, self.target_us);
        if let Some(ce) = self.ce_threshold_us {
            w.put_u32(TCA_FQ_CODEL_CE_THRESHOLD, ce);
        }
        w.put_u32(TCA_FQ_CODEL_ECN, self.ecn as u32);
        w.put_u32(TCA_FQ_CODEL_MEMORY_LIMIT, self.memory_limit);
        w.put_u32(TCA_FQ_CODEL_DROP_BATCH_SIZE, self.drop_batch_size);
    }

    /// The options as `tc qdisc add ... fq_codel` takes them.
    pub fn options_text(&self) -> String {
        let mut text = format!(
            "limit {} flows {} quantum {} target {}us interval {}us memory_limit {} drop_batch {}",
            self.limit,
            self.flows,
            self.quantum,
            self.target_us,
            self.interval_us,
            self.memory_limit,
            self.drop_batch_size
        );
        if let Some(ce) = self.ce_threshold_us {
            text.push_str(&format!(" ce_threshold {ce}us"));
        }
        text.push_str(if self.ecn { " ecn" } else { " noecn" });
        text
    }

    pub fn decode_options(attrs: Attrs<'_>) -> Result<Self, DecodeError> {
        let mut q = FqCodelQdisc {
            limit: 0,
            flows: 0,
            quantum: 0,
            target_us: 0,
            interval_us: 0,
            ecn: false,
            memory_limit: 0,
            drop_batch_size: 0,
            ce_threshold_us: None,
        };
        let mut seen_target = false;
        for a in attrs.collect()? {
            match a.kind {
                TCA_FQ_CODEL_TARGET => {
                    q.target_us = a.u32()?;
                    seen_target = true;
                }
                TCA_FQ_CODEL_LIMIT => q.limit = a.u32()?,
                TCA_FQ_CODEL_INTERVAL => q.interval_us = a.u32()?,
                TCA_FQ_CODEL_ECN => q.ecn = a.u32()? != 0,
                TCA_FQ_CODEL_FLOWS => q.flows = a.u32()?,
                TCA_FQ_CODEL_QUANTUM => q.quantum = a.u32()?,
                TCA_FQ_CODEL_CE_THRESHOLD => q.ce_threshold_us = Some(a.u32()?),
                TCA_FQ_CODEL_DROP_BATCH_SIZE => q.drop_batch_size = a.u32()?,
                TCA_FQ_CODEL_MEMORY_LIMIT => q.memory_limit = a.u32()?,
                _ => {}
            }
        }
        if !seen_target {
            return Err(DecodeError::new(
                "fq_codel qdisc without TCA_FQ_CODEL_TARGET",
            ));
        }
        Ok(q)
    }
}

/// `us` as the kernel dumps it back after storing it in CoDel's units (rounded down).
pub fn codel_round_trip(us: u32) -> u32 {
    let units = us as u64 * 1000 / CODEL_UNIT_NS;
    (units * CODEL_UNIT_NS / 1000) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> FqCodelQdisc {
        FqCodelQdisc {
            limit: 1000,
            flows: 64,
            quantum: 1532,
            target_us: 4992,
            interval_us: 99968,
            ecn: true,
            memory_limit: 8 << 20,
            drop_batch_size: 64,
            ce_threshold_us: None,
        }
    }

    #[test]
    fn options_are_the_bytes_iproute2_sends() {
        // `tc qdisc add ... fq_codel limit 1000 flows 64 target 4992us interval 99968us
        // quantum 1532 memory_limit 8388608 drop_batch 64 ecn`, TCA_OPTIONS' payload (strace).
        let iproute2: &[u8] = &[
            0x08, 0x00, 0x02, 0x00, 0xe8, 0x03, 0x00, 0x00, 0x08, 0x00, 0x05, 0x00, 0x40, 0x00,
            0x00, 0x00, 0x08, 0x00, 0x06, 0x00, 0xfc, 0x05, 0x00, 0x00, 0x08, 0x00, 0x03, 0x00,
            0x80, 0x86, 0x01, 0x00, 0x08, 0x00, 0x01, 0x00, 0x80, 0x13, 0x00, 0x00, 0x08, 0x00,
            0x04, 0x00, 0x01, 0x00, 0x00, 0x00, 0x08, 0x00, 0x09, 0x00, 0x00, 0x00, 0x80, 0x00,
            0x08, 0x00, 0x08, 0x00, 0x40, 0x00, 0x00, 0x00,
        ];
        let mut w = AttrWriter::new();
        sample().encode_options(&mut w, true);
        assert_eq!(w.bytes(), iproute2);
        assert_eq!(
            FqCodelQdisc::decode_options(Attrs::new(iproute2)).unwrap(),
            sample()
        );
    }

    #[test]
    fn a_change_never_names_the_flow_count() {
        let mut w = AttrWriter::new();
        sample().encode_options(&mut w, false);
        let kinds: Vec<u16> = Attrs::new(w.bytes())
            .collect()
            .unwrap()
            .iter()
            .map(|a| a.kind)
            .collect();
        assert!(!kinds.contains(&TCA_FQ_CODEL_FLOWS));
        assert!(kinds.contains(&TCA_FQ_CODEL_TARGET));
    }

    #[test]
    fn a_dump_without_a_target_is_refused_and_a_ce_threshold_is_kept() {
        let mut w = AttrWriter::new();
        w.put_u32(TCA_FQ_CODEL_LIMIT, 10);
        assert!(FqCodelQdisc::decode_options(Attrs::new(w.bytes())).is_err());
        let with_ce = FqCodelQdisc {
            ce_threshold_us: Some(2048),
            ..sample()
        };
        let mut w = AttrWriter::new();
        with_ce.encode_options(&mut w, true);
        assert_eq!(
            FqCodelQdisc::decode_options(Attrs::new(w.bytes())).unwrap(),
            with_ce
        );
    }

    #[test]
    fn multiples_of_128_us_read_back_exactly_and_others_round_down() {
        for us in [128, 4992, 99968, 640_000] {
            assert_eq!(codel_round_trip(us), us);
        }
        // 5 ms is 4882.8 units: the kernel dumps 4999 µs.
        assert_eq!(codel_round_trip(5000), 4999);
    }
}

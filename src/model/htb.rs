//! HTB qdisc and class options (`linux/pkt_sched.h`: `tc_htb_glob`, `tc_htb_opt`, `tc_ratespec`,
//! `tc_htb_xstats`). Rates are bytes per second; rates of 2^32 bytes/s and more travel in the 64-bit
//! attributes with the 32-bit field saturated, as the kernel expects.
//!
//! raylimit sends no rate tables (`TCA_HTB_RTAB`/`CTAB`): with an explicit link layer the kernel
//! computes rates itself and ignores them (see netlink-fixtures/README.md).

use super::attr::{AttrWriter, Attrs, StructReader};
use super::error::DecodeError;

const TCA_HTB_PARMS: u16 = 1;
const TCA_HTB_INIT: u16 = 2;
const TCA_HTB_CTAB: u16 = 3;
const TCA_HTB_RTAB: u16 = 4;
const TCA_HTB_DIRECT_QLEN: u16 = 5;
const TCA_HTB_RATE64: u16 = 6;
const TCA_HTB_CEIL64: u16 = 7;

/// `TC_HTB_PROTOVER`: the version a request must carry.
const HTB_PROTOCOL_VERSION: u32 = 3;
/// `TC_LINKLAYER_ETHERNET`.
pub const LINKLAYER_ETHERNET: u8 = 1;
/// The kernel's scheduler clock: one psched tick is 64 ns (`PSCHED_SHIFT` = 6).
pub const NSEC_PER_TICK: u64 = 64;

/// Time to send `bytes` at `rate` bytes/s, in psched ticks, saturating at `u32::MAX`.
/// Computed in nanoseconds, so fast rates do not round to zero as iproute2's microseconds do.
pub fn ticks_for(rate: u64, bytes: u64) -> u32 {
    if rate == 0 {
        return u32::MAX;
    }
    let ns = (bytes as u128 * 1_000_000_000) / rate as u128;
    u32::try_from(ns / NSEC_PER_TICK as u128).unwrap_or(u32::MAX)
}

/// Bytes that `ticks` allow at `rate` bytes/s (the inverse of [`ticks_for`]).
pub fn bytes_for(rate: u64, ticks: u32) -> u64 {
    ((ticks as u128 * NSEC_PER_TICK as u128 * rate as u128) / 1_000_000_000) as u64
}

/// [`bytes_for`] rounded up: the burst to give `tc`, which turns it back into ticks at its own
/// microsecond resolution, so that it lands within a microsecond of `ticks`.
pub fn burst_for_tc(rate: u64, ticks: u32) -> u64 {
    (ticks as u128 * NSEC_PER_TICK as u128 * rate as u128).div_ceil(1_000_000_000) as u64
}

/// HTB qdisc options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HtbQdisc {
    /// Rate-to-quantum divisor for classes that do not set a quantum.
    pub r2q: u32,
    /// Minor of the class unclassified traffic goes to; 0 sends it to the direct queue, unshaped.
    pub default_class: u16,
    /// Length of the direct queue; `None` leaves the kernel default (the device's txqueuelen).
    pub direct_qlen: Option<u32>,
}

impl Default for HtbQdisc {
    fn default() -> Self {
        Self {
            r2q: 10,
            default_class: 0,
            direct_qlen: None,
        }
    }
}

/// Counters the kernel reports with an HTB qdisc, outside its configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct HtbQdiscCounters {
    pub direct_packets: u32,
}

impl HtbQdisc {
    pub fn encode_options(&self, w: &mut AttrWriter) {
        let mut glob = Vec::with_capacity(20);
        for v in [
            HTB_PROTOCOL_VERSION,
            self.r2q,
            self.default_class as u32,
            0,
            0,
        ] {
            glob.extend_from_slice(&v.to_ne_bytes());
        }
        w.put(TCA_HTB_INIT, &glob);
        if let Some(qlen) = self.direct_qlen {
            w.put_u32(TCA_HTB_DIRECT_QLEN, qlen);
        }
    }

    pub fn decode_options(attrs: Attrs<'_>) -> Result<(Self, HtbQdiscCounters), DecodeError> {
        let mut out = HtbQdisc {
            r2q: 0,
            default_class: 0,
            direct_qlen: None,
        };
        let mut counters = HtbQdiscCounters::default();
        let mut seen_init = false;
        for a in attrs.collect()? {
            match a.kind {
                TCA_HTB_INIT => {
                    let r = StructReader::new(a.value, 20, "tc_htb_glob")?;
                    out.r2q = r.u32(4);
                    out.default_class = r.u32(8) as u16;
                    counters.direct_packets = r.u32(16);
                    seen_init = true;
                }
                TCA_HTB_DIRECT_QLEN => out.direct_qlen = Some(a.u32()?),
                _ => {}
            }
        }
        if !seen_init {
            return Err(DecodeError::new("htb qdisc without TCA_HTB_INIT"));
        }
        Ok((out, counters))
    }
}

/// HTB class options. Buffers are in psched ticks, as the kernel stores them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HtbClass {
    /// Guaranteed rate, bytes/s.
    pub rate: u64,
    /// Maximum rate, bytes/s.
    pub ceil: u64,
    /// Burst at `rate`, in ticks.
    pub buffer: u32,
    /// Burst at `ceil`, in ticks.
    pub cbuffer: u32,
    /// DRR quantum in bytes; 0 lets the kernel derive it from r2q.
    pub quantum: u32,
    pub prio: u32,
    /// Link layer for size calculation (`LINKLAYER_ETHERNET`).
    pub linklayer: u8,
    pub overhead: u16,
    pub mpu: u16,
}

/// What the kernel reports with an HTB class beyond its configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct HtbClassCounters {
    /// 0 for a leaf; the kernel's depth marker for inner classes.
    pub level: u32,
    pub lends: u32,
    pub borrows: u32,
    pub giants: u32,
    pub tokens: i32,
    pub ctokens: i32,
}

impl HtbClass {
    /// A class at `rate` = `ceil` with explicit buffers and quantum.
    pub fn new(rate: u64, ceil: u64, buffer: u32, cbuffer: u32, quantum: u32) -> Self {
        Self {
            rate,
            ceil,
            buffer,
            cbuffer,
            quantum,
            prio: 0,
            linklayer: LINKLAYER_ETHERNET,
            overhead: 0,
            mpu: 0,
        }
    }

    fn ratespec(&self, rate: u64) -> [u8; 12] {
        let mut b = [0u8; 12];
        b[1] = self.linklayer;
        b[2..4].copy_from_slice(&self.overhead.to_ne_bytes());
        b[6..8].copy_from_slice(&self.mpu.to_ne_bytes());
        b[8..12].copy_from_slice(&saturate_u32(rate).to_ne_bytes());
        b
    }

    pub fn encode_options(&self, w: &mut AttrWriter) {
        if self.rate > u32::MAX as u64 {
            w.put_u64(TCA_HTB_RATE64, self.rate);
        }
        if self.ceil > u32::MAX as u64 {
            w.put_u64(TCA_HTB_CEIL64, self.ceil);
        }
        let mut opt = Vec::with_capacity(44);
        opt.extend_from_slice(&self.ratespec(self.rate));
        opt.extend_from_slice(&self.ratespec(self.ceil));
        for v in [self.buffer, self.cbuffer, self.quantum, 0, self.prio] {
            opt.extend_from_slice(&v.to_ne_bytes());
        }
        w.put(TCA_HTB_PARMS, &opt);
    }

    pub fn decode_options(attrs: Attrs<'_>) -> Result<(Self, HtbClassCounters), DecodeError> {
        let mut class = None;
        let mut counters = HtbClassCounters::default();
        let (mut rate64, mut ceil64) = (None, None);
        for a in attrs.collect()? {
            match a.kind {
                TCA_HTB_PARMS => {
                    let r = StructReader::new(a.value, 44, "tc_htb_opt")?;
                    counters.level = r.u32(36);
                    class = Some(HtbClass {
                        rate: r.u32(8) as u64,
                        ceil: r.u32(20) as u64,
                        buffer: r.u32(24),
                        cbuffer: r.u32(28),
                        quantum: r.u32(32),
                        prio: r.u32(40),
                        linklayer: r.u8(1) & 0x0f,
                        overhead: r.u16(2),
                        mpu: r.u16(6),
                    });
                }
                TCA_HTB_RATE64 => rate64 = Some(a.u64()?),
                TCA_HTB_CEIL64 => ceil64 = Some(a.u64()?),
                TCA_HTB_RTAB | TCA_HTB_CTAB => {}
                _ => {}
            }
        }
        let mut class = class.ok_or_else(|| DecodeError::new("htb class without TCA_HTB_PARMS"))?;
        if let Some(r) = rate64 {
            class.rate = r;
        }
        if let Some(c) = ceil64 {
            class.ceil = c;
        }
        Ok((class, counters))
    }
}

impl HtbClassCounters {
    /// Decodes `tc_htb_xstats` (from `TCA_XSTATS` or `TCA_STATS_APP`) into these counters.
    pub fn add_xstats(&mut self, bytes: &[u8]) -> Result<(), DecodeError> {
        let r = StructReader::new(bytes, 20, "tc_htb_xstats")?;
        self.lends = r.u32(0);
        self.borrows = r.u32(4);
        self.giants = r.u32(8);
        self.tokens = r.i32(12);
        self.ctokens = r.i32(16);
        Ok(())
    }
}

fn saturate_u32(v: u64) -> u32 {
    u32::try_from(v).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_match_iproute2_where_it_does_not_truncate() {
        // 1600 bytes at 1mbit (125000 B/s) is 12.8 ms: 200000 ticks, as tc sends.
        assert_eq!(ticks_for(125_000, 1600), 200_000);
        // burst 15k at 1mbit, cburst 15k at 2mbit.
        assert_eq!(ticks_for(125_000, 15 * 1024), 1_920_000);
        assert_eq!(ticks_for(250_000, 15 * 1024), 960_000);
        // 40gbit: tc truncates to 0; nanoseconds keep it non-zero.
        assert_eq!(ticks_for(5_000_000_000, 1600), 5);
        assert_eq!(bytes_for(125_000, 200_000), 1600);
    }

    #[test]
    fn class_round_trips_including_64_bit_rates() {
        for rate in [
            4096u64,
            125_000,
            u32::MAX as u64,
            1 << 32,
            5_000_000_000,
            10 << 30,
        ] {
            let c = HtbClass::new(
                rate,
                rate,
                ticks_for(rate, 1600),
                ticks_for(rate, 1600),
                1600,
            );
            let mut w = AttrWriter::new();
            c.encode_options(&mut w);
            let (back, _) = HtbClass::decode_options(Attrs::new(w.bytes())).unwrap();
            assert_eq!(back, c, "rate {rate}");
        }
    }
}

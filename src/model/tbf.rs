//! TBF qdisc options (`linux/pkt_sched.h`: `tc_tbf_qopt`, `TCA_TBF_*`). Rates are bytes per
//! second; a rate of 2^32 bytes/s or more travels in `TCA_TBF_RATE64` with the 32-bit field
//! saturated. The bucket (`buffer`) is in psched ticks, as the kernel stores and dumps it: the
//! largest packet TBF passes whole is what the bucket holds at the rate.

use super::attr::{AttrWriter, Attrs, StructReader};
use super::error::DecodeError;
use super::htb::{LINKLAYER_ETHERNET, NSEC_PER_TICK};

const TCA_TBF_PARMS: u16 = 1;
const TCA_TBF_RATE64: u16 = 4;
const TCA_TBF_PRATE64: u16 = 5;
/// `sizeof(struct tc_tbf_qopt)`: two `tc_ratespec`s, limit, buffer, mtu.
const QOPT_LEN: usize = 36;

/// TBF options as raylimit sets them (no peak rate; the kernel's own byte FIFO as its child).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TbfQdisc {
    /// Token rate, bytes/s.
    pub rate: u64,
    /// Bucket size, in ticks at `rate`.
    pub buffer: u32,
    /// Bytes its FIFO holds.
    pub limit: u32,
    /// Peak rate (0: none) and its bucket in ticks; kept so a hand-set peak reads as a change.
    pub peakrate: u64,
    pub mtu: u32,
}

impl TbfQdisc {
    /// The largest packet this bucket passes whole (`psched_ns_t2l` of the bucket at the rate).
    /// A GSO packet larger than this is segmented before it is queued; any other is dropped.
    pub fn max_packet(&self) -> u64 {
        (self.buffer as u128 * NSEC_PER_TICK as u128 * self.rate as u128 / 1_000_000_000) as u64
    }

    pub fn encode_options(&self, w: &mut AttrWriter) {
        if self.rate > u32::MAX as u64 {
            w.put_u64(TCA_TBF_RATE64, self.rate);
        }
        if self.peakrate > u32::MAX as u64 {
            w.put_u64(TCA_TBF_PRATE64, self.peakrate);
        }
        let mut opt = Vec::with_capacity(QOPT_LEN);
        opt.extend_from_slice(&ratespec(self.rate));
        opt.extend_from_slice(&ratespec(self.peakrate));
        for v in [self.limit, self.buffer, self.mtu] {
            opt.extend_from_slice(&v.to_ne_bytes());
        }
        w.put(TCA_TBF_PARMS, &opt);
    }

    pub fn decode_options(attrs: Attrs<'_>) -> Result<Self, DecodeError> {
        let mut out = None;
        let (mut rate64, mut peak64) = (None, None);
        for a in attrs.collect()? {
            match a.kind {
                TCA_TBF_PARMS => {
                    let r = StructReader::new(a.value, QOPT_LEN, "tc_tbf_qopt")?;
                    out = Some(TbfQdisc {
                        rate: r.u32(8) as u64,
                        peakrate: r.u32(20) as u64,
                        limit: r.u32(24),
                        buffer: r.u32(28),
                        mtu: r.u32(32),
                    });
                }
                TCA_TBF_RATE64 => rate64 = Some(a.u64()?),
                TCA_TBF_PRATE64 => peak64 = Some(a.u64()?),
                _ => {}
            }
        }
        let mut out = out.ok_or_else(|| DecodeError::new("tbf qdisc without TCA_TBF_PARMS"))?;
        if let Some(r) = rate64 {
            out.rate = r;
        }
        if let Some(p) = peak64 {
            out.peakrate = p;
        }
        Ok(out)
    }
}

/// A `tc_ratespec` for `rate` bytes/s on Ethernet (so the kernel needs no rate table); zero is
/// all zeroes, TBF's "no peak rate".
fn ratespec(rate: u64) -> [u8; 12] {
    let mut b = [0u8; 12];
    if rate != 0 {
        b[1] = LINKLAYER_ETHERNET;
        b[8..12].copy_from_slice(&u32::try_from(rate).unwrap_or(u32::MAX).to_ne_bytes());
    }
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_round_trip_including_64_bit_rates() {
        for rate in [
            4096u64,
            1_000_000,
            u32::MAX as u64,
            1 << 32,
            20_000_000_000_000,
        ] {
            let q = TbfQdisc {
                rate,
                buffer: 16,
                limit: 3028,
                peakrate: 0,
                mtu: 0,
            };
            let mut w = AttrWriter::new();
            q.encode_options(&mut w);
            assert_eq!(TbfQdisc::decode_options(Attrs::new(w.bytes())).unwrap(), q);
        }
    }

    #[test]
    fn a_saturated_32_bit_rate_reads_back_from_the_64_bit_attribute_only() {
        let q = TbfQdisc {
            rate: 5_000_000_000,
            buffer: 16,
            limit: 1 << 20,
            peakrate: 0,
            mtu: 0,
        };
        let mut w = AttrWriter::new();
        q.encode_options(&mut w);
        let bytes = w.bytes();
        // RATE64 first (8-byte value), then PARMS whose rate field is u32::MAX.
        assert_eq!(u16::from_ne_bytes([bytes[2], bytes[3]]), TCA_TBF_RATE64);
        let parms = &bytes[12 + 4..];
        assert_eq!(&parms[8..12], &u32::MAX.to_ne_bytes());
        assert_eq!(parms[1], LINKLAYER_ETHERNET);
        // Without its RATE64 the same PARMS decode as the saturated rate: never silently lower.
        let mut w = AttrWriter::new();
        w.put(TCA_TBF_PARMS, &bytes[16..16 + QOPT_LEN]);
        assert_eq!(
            TbfQdisc::decode_options(Attrs::new(w.bytes()))
                .unwrap()
                .rate,
            u32::MAX as u64
        );
    }

    #[test]
    fn the_bucket_sets_the_largest_packet_passed_whole() {
        // 16 ticks (1024 ns) at 1.5 GB/s hold 1536 bytes, as the kernel's psched_ns_t2l says.
        let q = TbfQdisc {
            rate: 1_500_000_000,
            buffer: 16,
            limit: 0,
            peakrate: 0,
            mtu: 0,
        };
        assert_eq!(q.max_packet(), 1536);
    }

    #[test]
    fn truncated_options_are_an_error_not_a_panic() {
        let mut w = AttrWriter::new();
        w.put(TCA_TBF_PARMS, &[0u8; 20]);
        assert!(TbfQdisc::decode_options(Attrs::new(w.bytes())).is_err());
        assert!(TbfQdisc::decode_options(Attrs::new(&[])).is_err());
    }
}

//! Desired kernel objects for a subject (pure, no I/O). For now: how an HTB leaf class is sized
//! for its rate.

use crate::netlink::htb::{ticks_for, HtbClass};

/// Largest packet HTB may see at once: a 64 KiB GSO super-packet on veth and most NICs.
const MAX_PACKET: u64 = 64 * 1024;
/// Smallest burst worth allowing: a few full-size Ethernet frames.
const MIN_BURST: u64 = 4 * 1514;

/// An HTB leaf at exactly `rate` bytes/s (rate = ceil), with burst and quantum sized for the rate.
///
/// The burst covers 20 ms at the rate but never less than a few frames, so a 4 KiB/s class still
/// passes whole packets and a 10 GiB/s class is not starved by timer granularity. The quantum is
/// explicit (rate/10, clamped to a frame and to 200 000 bytes, the kernel's own bounds) so the
/// kernel never has to warn about r2q.
pub fn leaf_class(rate: u64) -> HtbClass {
    let burst = (rate / 50).max(MIN_BURST).max(MAX_PACKET.min(rate));
    let ticks = ticks_for(rate, burst);
    let quantum = (rate / 10).clamp(1514, 200_000) as u32;
    HtbClass::new(rate, rate, ticks, ticks, quantum)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::netlink::htb::bytes_for;

    #[test]
    fn bursts_scale_with_the_rate() {
        let slow = leaf_class(4096);
        assert!((6055..=6056).contains(&bytes_for(4096, slow.buffer)));
        let fast = leaf_class(10 << 30);
        // One tick (64 ns) of rounding at 10 GiB/s is under 700 bytes.
        assert!(bytes_for(10 << 30, fast.buffer) >= (10u64 << 30) / 50 - 700);
        assert_eq!(fast.quantum, 200_000);
        assert_eq!(leaf_class(1_000_000).quantum, 100_000);
    }
}

//! Statistics the kernel attaches to dumped qdiscs and classes (`TCA_STATS2`, with the legacy
//! `TCA_STATS` as a fallback).

use super::attr::{Attrs, StructReader};
use super::error::DecodeError;

const TCA_STATS_BASIC: u16 = 1;
const TCA_STATS_QUEUE: u16 = 3;
const TCA_STATS_APP: u16 = 4;
const TCA_STATS_PKT64: u16 = 8;

/// Counters of one qdisc or class.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TcStats {
    pub bytes: u64,
    pub packets: u64,
    pub drops: u32,
    pub overlimits: u32,
    pub requeues: u32,
    pub qlen: u32,
    pub backlog: u32,
}

impl TcStats {
    /// Decodes `TCA_STATS2`; returns the counters and the kind-specific `TCA_STATS_APP` bytes.
    pub fn decode_stats2(attrs: Attrs<'_>) -> Result<(Self, Option<Vec<u8>>), DecodeError> {
        let mut s = TcStats::default();
        let mut app = None;
        let mut packets64 = None;
        for a in attrs.collect()? {
            match a.kind {
                TCA_STATS_BASIC => {
                    let r = StructReader::new(a.value, 12, "gnet_stats_basic")?;
                    s.bytes = r.u64(0);
                    s.packets = r.u32(8) as u64;
                }
                TCA_STATS_PKT64 => packets64 = Some(a.u64()?),
                TCA_STATS_QUEUE => {
                    let r = StructReader::new(a.value, 20, "gnet_stats_queue")?;
                    s.qlen = r.u32(0);
                    s.backlog = r.u32(4);
                    s.drops = r.u32(8);
                    s.requeues = r.u32(12);
                    s.overlimits = r.u32(16);
                }
                TCA_STATS_APP => app = Some(a.value.to_vec()),
                _ => {}
            }
        }
        if let Some(p) = packets64 {
            s.packets = p;
        }
        Ok((s, app))
    }

    /// Decodes the legacy `struct tc_stats`.
    pub fn decode_legacy(bytes: &[u8]) -> Result<Self, DecodeError> {
        let r = StructReader::new(bytes, 36, "tc_stats")?;
        Ok(TcStats {
            bytes: r.u64(0),
            packets: r.u32(8) as u64,
            drops: r.u32(12),
            overlimits: r.u32(16),
            qlen: r.u32(28),
            backlog: r.u32(32),
            requeues: 0,
        })
    }
}

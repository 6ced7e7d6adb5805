//! tc handles. Qdisc and class handles split 16:16 (`1:10`, hexadecimal as tc prints them); u32
//! filter handles split 12:8:12 bits (`800:0:801`, table:bucket:node).

use std::fmt;

/// A qdisc or class handle, `major:minor`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct TcHandle(pub u32);

impl TcHandle {
    pub const ROOT: TcHandle = TcHandle(0xffff_ffff);
    /// The parent of `ingress` and `clsact` qdiscs.
    pub const INGRESS: TcHandle = TcHandle(0xffff_fff1);
    /// The handle of `ingress` and `clsact` qdiscs, and the parent of an ingress qdisc's filters.
    pub const INGRESS_QDISC: TcHandle = TcHandle(0xffff_0000);
    /// Filter parent for clsact's ingress hook.
    pub const CLSACT_INGRESS: TcHandle = TcHandle(0xffff_fff2);
    /// Filter parent for clsact's egress hook.
    pub const CLSACT_EGRESS: TcHandle = TcHandle(0xffff_fff3);

    pub const fn new(major: u16, minor: u16) -> Self {
        TcHandle(((major as u32) << 16) | minor as u32)
    }
    pub const fn major(self) -> u16 {
        (self.0 >> 16) as u16
    }
    pub const fn minor(self) -> u16 {
        self.0 as u16
    }

    /// Parses tc notation: `root`, `ingress`, `none`, `1:`, `1:10`, `ffff:fff2` (hexadecimal parts).
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "root" => return Some(Self::ROOT),
            "ingress" => return Some(Self::INGRESS),
            "none" => return Some(Self(0)),
            _ => {}
        }
        let (major, minor) = s.split_once(':')?;
        let major = u16::from_str_radix(major, 16).ok()?;
        let minor = if minor.is_empty() {
            0
        } else {
            u16::from_str_radix(minor, 16).ok()?
        };
        Some(Self::new(major, minor))
    }
}

impl fmt::Display for TcHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            TcHandle::ROOT => f.write_str("root"),
            TcHandle::INGRESS => f.write_str("ingress"),
            TcHandle(0) => f.write_str("none"),
            h if h.minor() == 0 => write!(f, "{:x}:", h.major()),
            h => write!(f, "{:x}:{:x}", h.major(), h.minor()),
        }
    }
}

/// A u32 filter handle: hash table id (12 bits), bucket (8 bits), node (12 bits).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct U32Handle(pub u32);

impl U32Handle {
    /// The table every u32 filter list starts with when no handle is given (`800:`).
    pub const ROOT_TABLE: u32 = 0x800;

    pub const fn new(table: u32, bucket: u32, node: u32) -> Self {
        U32Handle(((table & 0xfff) << 20) | ((bucket & 0xff) << 12) | (node & 0xfff))
    }
    pub const fn table(self) -> u32 {
        self.0 >> 20
    }
    pub const fn bucket(self) -> u32 {
        (self.0 >> 12) & 0xff
    }
    pub const fn node(self) -> u32 {
        self.0 & 0xfff
    }
    /// The table and bucket this handle lives in (node zeroed): what the kernel dumps as `TCA_U32_HASH`.
    pub const fn table_and_bucket(self) -> U32Handle {
        U32Handle(self.0 & 0xffff_f000)
    }
    /// Is this the handle of a hash table itself (no node)?
    pub const fn is_table(self) -> bool {
        self.node() == 0
    }
}

/// As tc prints it: `800::801` for a node, `12c:2` for a bucket, `12c:` for a table; a node with
/// no table yet (the kernel picks the priority's root table) is `::1`, which tc reads back as
/// node 1 (its own `:1` would be bucket 1).
impl fmt::Display for U32Handle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.table() != 0 {
            write!(f, "{:x}", self.table())?;
        }
        f.write_str(":")?;
        if self.bucket() != 0 {
            write!(f, "{:x}", self.bucket())?;
        }
        if self.node() != 0 {
            write!(f, ":{:x}", self.node())?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handles_print_and_parse_like_tc() {
        assert_eq!(TcHandle::parse("1:10"), Some(TcHandle(0x0001_0010)));
        assert_eq!(TcHandle::parse("7a31:"), Some(TcHandle(0x7a31_0000)));
        assert_eq!(TcHandle(0x0001_0010).to_string(), "1:10");
        assert_eq!(TcHandle::CLSACT_INGRESS.to_string(), "ffff:fff2");
        let h = U32Handle::new(0x800, 0, 0x801);
        assert_eq!(h.0, 0x8000_0801);
        assert_eq!(h.to_string(), "800::801");
        assert_eq!(U32Handle::new(0x12c, 2, 0).to_string(), "12c:2");
        assert_eq!(U32Handle::new(0x12c, 0, 0).to_string(), "12c:");
        assert_eq!(U32Handle::new(0, 0, 1).to_string(), "::1");
        assert_eq!(U32Handle::new(5, 3, 1).to_string(), "5:3:1");
        assert_eq!(TcHandle::new(0x524c, 0).to_string(), "524c:");
        assert_eq!(U32Handle::new(2, 5, 1).0, 0x0020_5001);
        assert_eq!(
            U32Handle(0x0020_5001).table_and_bucket(),
            U32Handle(0x0020_5000)
        );
    }
}

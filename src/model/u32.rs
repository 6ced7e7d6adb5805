//! The u32 classifier: selectors of 32-bit keys at packet offsets, hash tables, links between
//! them, a mark match, a class or actions. Keys are built the way iproute2 builds them (same
//! offsets, same merging of keys at one offset), so raylimit's filters are byte-identical to
//! `tc filter add ... u32 match ...`.

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};

use super::action::{self, Action};
use super::attr::{AttrWriter, Attrs, StructReader};
use super::error::DecodeError;
use super::handle::{TcHandle, U32Handle};

const TCA_U32_CLASSID: u16 = 1;
const TCA_U32_HASH: u16 = 2;
const TCA_U32_LINK: u16 = 3;
const TCA_U32_DIVISOR: u16 = 4;
const TCA_U32_SEL: u16 = 5;
const TCA_U32_ACT: u16 = 7;
const TCA_U32_MARK: u16 = 10;
const TCA_U32_FLAGS: u16 = 11;

/// `TC_U32_TERMINAL`: a match ends classification (set whenever a class or action is given).
pub const SEL_TERMINAL: u8 = 1;
/// `TCA_CLS_FLAGS_NOT_IN_HW`: status the kernel adds to dumps, not configuration.
const CLS_FLAGS_NOT_IN_HW: u32 = 1 << 3;

/// One 32-bit key: `(packet[offset..offset+4] & mask) == value`, both in network byte order read
/// as a number (10.99.0.2 is `0x0a630002`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct U32Key {
    pub mask: u32,
    pub value: u32,
    pub offset: i32,
    pub offmask: i32,
}

/// `struct tc_u32_sel` with its keys.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct U32Selector {
    pub flags: u8,
    pub offshift: u8,
    pub offmask: u16,
    pub off: u16,
    pub offoff: i16,
    /// Offset of the 32-bit word hashed to pick a bucket when this node links to a table.
    pub hoff: i16,
    /// Mask applied to that word (network order read as a number, like key masks).
    pub hmask: u32,
    pub keys: Vec<U32Key>,
}

/// What the L3 header is, for offsets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Family {
    V4,
    V6,
}

/// Source or destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    Source,
    Destination,
}

impl U32Selector {
    /// Adds a key the way iproute2's `pack_key` does: keys at the same offset merge.
    pub fn add_key(&mut self, mask: u32, value: u32, offset: i32) -> &mut Self {
        let value = value & mask;
        if let Some(k) = self
            .keys
            .iter_mut()
            .find(|k| k.offset == offset && k.offmask == 0)
        {
            k.value |= value;
            k.mask |= mask;
        } else {
            self.keys.push(U32Key {
                mask,
                value,
                offset,
                offmask: 0,
            });
        }
        self
    }

    /// A value of `width` bytes (1 or 2) at byte `offset`, placed in its aligned 32-bit word.
    fn add_field(&mut self, value: u32, mask: u32, offset: i32, width: i32) -> &mut Self {
        let shift = 8 * (4 - width - (offset & 3)) as u32;
        self.add_key(mask << shift, value << shift, offset & !3)
    }

    /// `match ip src|dst ADDR/PREFIX`.
    pub fn ipv4(&mut self, end: End, addr: Ipv4Addr, prefix: u8) -> &mut Self {
        let mask = if prefix == 0 {
            0
        } else {
            u32::MAX << (32 - prefix.min(32) as u32)
        };
        let offset = if end == End::Source { 12 } else { 16 };
        if prefix == 0 {
            return self;
        }
        self.add_key(mask, u32::from(addr), offset)
    }

    /// `match ip6 src|dst ADDR/PREFIX`: one key per 32 bits the prefix covers.
    pub fn ipv6(&mut self, end: End, addr: Ipv6Addr, prefix: u8) -> &mut Self {
        let prefix = prefix.min(128) as u32;
        let base = if end == End::Source { 8 } else { 24 };
        let words = u128::from(addr).to_be_bytes();
        let mut i = 0;
        while i < prefix {
            let word = u32::from_be_bytes(
                words[(i / 8) as usize..(i / 8) as usize + 4]
                    .try_into()
                    .unwrap_or_default(),
            );
            let bits = (prefix - i).min(32);
            let mask = u32::MAX << (32 - bits);
            self.add_key(mask, word, base + (i / 8) as i32);
            i += 32;
        }
        self
    }

    /// `match ip protocol N 0xff` / `match ip6 protocol N 0xff`.
    pub fn protocol(&mut self, family: Family, proto: u8) -> &mut Self {
        let offset = if family == Family::V4 { 9 } else { 6 };
        self.add_field(proto as u32, 0xff, offset, 1)
    }

    /// `match ip sport|dport N 0xffff` (IPv4 without options) or `ip6 sport|dport` (no
    /// extension headers), as iproute2 assumes.
    pub fn port(&mut self, family: Family, end: End, port: u16) -> &mut Self {
        let l4 = if family == Family::V4 { 20 } else { 40 };
        let offset = if end == End::Source { l4 } else { l4 + 2 };
        self.add_field(port as u32, 0xffff, offset, 2)
    }

    /// `match u32 0 0`: a key every packet matches.
    pub fn catch_all(&mut self) -> &mut Self {
        self.keys.push(U32Key {
            mask: 0,
            value: 0,
            offset: 0,
            offmask: 0,
        });
        self
    }

    fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(16 + 16 * self.keys.len());
        b.push(self.flags);
        b.push(self.offshift);
        b.push(self.keys.len() as u8);
        b.push(0);
        b.extend_from_slice(&self.offmask.to_be_bytes());
        b.extend_from_slice(&self.off.to_ne_bytes());
        b.extend_from_slice(&self.offoff.to_ne_bytes());
        b.extend_from_slice(&self.hoff.to_ne_bytes());
        b.extend_from_slice(&self.hmask.to_be_bytes());
        for k in &self.keys {
            b.extend_from_slice(&k.mask.to_be_bytes());
            b.extend_from_slice(&k.value.to_be_bytes());
            b.extend_from_slice(&k.offset.to_ne_bytes());
            b.extend_from_slice(&k.offmask.to_ne_bytes());
        }
        b
    }

    fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let r = StructReader::new(bytes, 16, "tc_u32_sel")?;
        let nkeys = r.u8(2) as usize;
        let keys_bytes = r.rest(16);
        if keys_bytes.len() < nkeys * 16 {
            return Err(DecodeError::new(format!(
                "tc_u32_sel says {nkeys} keys but has {} bytes",
                keys_bytes.len()
            )));
        }
        let keys = (0..nkeys)
            .map(|i| {
                let k = StructReader::new(&keys_bytes[i * 16..], 16, "tc_u32_key")?;
                Ok(U32Key {
                    mask: k.u32_be(0),
                    value: k.u32_be(4),
                    offset: k.i32(8),
                    offmask: k.i32(12),
                })
            })
            .collect::<Result<_, DecodeError>>()?;
        Ok(U32Selector {
            flags: r.u8(0),
            offshift: r.u8(1),
            offmask: r.u16_be(4),
            off: r.u16(6),
            offoff: r.i16(8),
            hoff: r.i16(10),
            hmask: r.u32_be(12),
            keys,
        })
    }
}

/// `match mark VALUE MASK`: the skb mark under a mask.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct U32Mark {
    pub value: u32,
    pub mask: u32,
}

/// u32 filter options. A hash table is a u32 "filter" with only a divisor; a node has a selector.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct U32Filter {
    pub mark: Option<U32Mark>,
    /// The hash table matching packets continue in.
    pub link: Option<U32Handle>,
    pub classid: Option<TcHandle>,
    pub actions: Vec<Action>,
    /// Number of buckets when this object is a hash table.
    pub divisor: Option<u32>,
    /// The table and bucket a node is placed in (`ht 2:5:`). The kernel always reports it; it is
    /// implied by an explicit handle.
    pub hash: Option<U32Handle>,
    pub selector: Option<U32Selector>,
    /// Classifier flags (`skip_hw`, `skip_sw`), without status bits the kernel adds.
    pub flags: Option<u32>,
}

impl U32Filter {
    /// A terminal match that sends packets to `classid`.
    pub fn to_class(selector: U32Selector, classid: TcHandle) -> Self {
        let selector = U32Selector {
            flags: selector.flags | SEL_TERMINAL,
            ..selector
        };
        U32Filter {
            classid: Some(classid),
            selector: Some(selector),
            ..Default::default()
        }
    }

    /// A terminal match that runs `actions`.
    pub fn with_actions(selector: U32Selector, actions: Vec<Action>) -> Self {
        let selector = U32Selector {
            flags: selector.flags | SEL_TERMINAL,
            ..selector
        };
        U32Filter {
            actions,
            selector: Some(selector),
            ..Default::default()
        }
    }

    /// A hash table with `divisor` buckets.
    pub fn table(divisor: u32) -> Self {
        U32Filter {
            divisor: Some(divisor),
            ..Default::default()
        }
    }

    /// The value as the kernel will report it for a node at `handle`: the table and bucket filled in.
    pub fn canonical(&self, handle: U32Handle) -> Self {
        let mut c = self.clone();
        if c.divisor.is_none() && c.hash.is_none() && !handle.is_table() {
            c.hash = Some(handle.table_and_bucket());
        }
        c
    }

    /// Field order follows iproute2's (marks and links as parsed, then the table, then the selector).
    pub fn encode_options(&self, w: &mut AttrWriter) {
        if let Some(m) = self.mark {
            let mut b = Vec::with_capacity(12);
            for v in [m.value, m.mask, 0] {
                b.extend_from_slice(&v.to_ne_bytes());
            }
            w.put(TCA_U32_MARK, &b);
        }
        if let Some(link) = self.link {
            w.put_u32(TCA_U32_LINK, link.0);
        }
        if let Some(c) = self.classid {
            w.put_u32(TCA_U32_CLASSID, c.0);
        }
        action::encode_list(w, TCA_U32_ACT, &self.actions);
        if let Some(d) = self.divisor {
            w.put_u32(TCA_U32_DIVISOR, d);
        }
        if let Some(h) = self.hash {
            w.put_u32(TCA_U32_HASH, h.0);
        }
        if let Some(sel) = &self.selector {
            w.put(TCA_U32_SEL, &sel.encode());
        }
        if let Some(f) = self.flags {
            w.put_u32(TCA_U32_FLAGS, f);
        }
    }

    pub fn decode_options(attrs: Attrs<'_>) -> Result<Self, DecodeError> {
        let mut f = U32Filter::default();
        for a in attrs.collect()? {
            match a.kind {
                TCA_U32_CLASSID => f.classid = Some(TcHandle(a.u32()?)),
                TCA_U32_HASH => f.hash = Some(U32Handle(a.u32()?)),
                TCA_U32_LINK => f.link = Some(U32Handle(a.u32()?)),
                TCA_U32_DIVISOR => f.divisor = Some(a.u32()?),
                TCA_U32_SEL => f.selector = Some(U32Selector::decode(a.value)?),
                TCA_U32_ACT => f.actions = action::decode_list(a.value)?,
                TCA_U32_MARK => {
                    let r = StructReader::new(a.value, 8, "tc_u32_mark")?;
                    f.mark = Some(U32Mark {
                        value: r.u32(0),
                        mask: r.u32(4),
                    });
                }
                TCA_U32_FLAGS => {
                    let flags = a.u32()? & !CLS_FLAGS_NOT_IN_HW;
                    f.flags = (flags != 0).then_some(flags);
                }
                _ => {}
            }
        }
        Ok(f)
    }
}

impl fmt::Display for U32Filter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(d) = self.divisor {
            return write!(f, "divisor {d}");
        }
        if let Some(m) = self.mark {
            write!(f, "match mark 0x{:x} 0x{:x} ", m.value, m.mask)?;
        }
        if let Some(sel) = &self.selector {
            for k in &sel.keys {
                write!(f, "match {:08x}/{:08x} at {} ", k.value, k.mask, k.offset)?;
            }
            if sel.hmask != 0 {
                write!(f, "hashkey mask 0x{:08x} at {} ", sel.hmask, sel.hoff)?;
            }
        }
        if let Some(l) = self.link {
            write!(f, "link {l} ")?;
        }
        if let Some(c) = self.classid {
            write!(f, "classid {c} ")?;
        }
        for a in &self.actions {
            write!(f, "action {a} ")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_built_like_iproute2() {
        let mut s = U32Selector::default();
        s.protocol(Family::V4, 6)
            .port(Family::V4, End::Source, 80)
            .port(Family::V4, End::Destination, 443);
        assert_eq!(
            s.keys[0],
            U32Key {
                mask: 0x00ff_0000,
                value: 0x0006_0000,
                offset: 8,
                offmask: 0
            }
        );
        // sport and dport share the word at offset 20 and merge.
        assert_eq!(
            s.keys[1],
            U32Key {
                mask: 0xffff_ffff,
                value: 0x0050_01bb,
                offset: 20,
                offmask: 0
            }
        );
        let mut s = U32Selector::default();
        s.ipv6(End::Source, "2001:db8:ab00::".parse().unwrap(), 41);
        assert_eq!(s.keys.len(), 2);
        assert_eq!(
            s.keys[1],
            U32Key {
                mask: 0xff80_0000,
                value: 0xab00_0000,
                offset: 12,
                offmask: 0
            }
        );
        let mut s = U32Selector::default();
        s.protocol(Family::V6, 17)
            .port(Family::V6, End::Destination, 53);
        assert_eq!(
            s.keys[0],
            U32Key {
                mask: 0x0000_ff00,
                value: 0x0000_1100,
                offset: 4,
                offmask: 0
            }
        );
        assert_eq!(
            s.keys[1],
            U32Key {
                mask: 0x0000_ffff,
                value: 53,
                offset: 40,
                offmask: 0
            }
        );
    }

    #[test]
    fn filter_round_trips() {
        let mut sel = U32Selector::default();
        sel.ipv4(End::Destination, Ipv4Addr::new(10, 0, 0, 0), 16);
        sel.hmask = 0xff;
        sel.hoff = 16;
        let f = U32Filter {
            link: Some(U32Handle::new(2, 0, 0)),
            hash: Some(U32Handle::new(0x800, 0, 0)),
            selector: Some(sel),
            mark: Some(U32Mark {
                value: 0x10,
                mask: 0xff,
            }),
            actions: vec![Action::redirect_to(9)],
            ..Default::default()
        };
        let mut w = AttrWriter::new();
        f.encode_options(&mut w);
        assert_eq!(U32Filter::decode_options(Attrs::new(w.bytes())).unwrap(), f);
    }
}

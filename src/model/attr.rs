//! Netlink attributes (TLVs): a writer that builds them in iproute2's layout, and a bounds-checked
//! reader on top of netlink-packet-core's `NlasIterator`. Every decoder in this module tree reads
//! through [`Attrs`], so malformed input becomes a [`DecodeError`], never a panic.

use netlink_packet_core::{NlaBuffer, NlasIterator, NLA_F_NESTED};

use super::error::DecodeError;

/// Pads `len` up to the 4-byte netlink alignment.
pub const fn align4(len: usize) -> usize {
    (len + 3) & !3
}

/// Appends attributes to a message buffer. Nested attributes get their length patched on close.
#[derive(Debug, Default)]
pub struct AttrWriter {
    buf: Vec<u8>,
}

impl AttrWriter {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn into_bytes(self) -> Vec<u8> {
        self.buf
    }

    pub fn bytes(&self) -> &[u8] {
        &self.buf
    }

    /// Raw bytes that are not an attribute (a fixed struct header before the attributes).
    pub fn raw(&mut self, bytes: &[u8]) -> &mut Self {
        self.buf.extend_from_slice(bytes);
        self
    }

    pub fn put(&mut self, kind: u16, value: &[u8]) -> &mut Self {
        let len = 4 + value.len();
        self.buf.extend_from_slice(&(len as u16).to_ne_bytes());
        self.buf.extend_from_slice(&kind.to_ne_bytes());
        self.buf.extend_from_slice(value);
        self.buf.resize(self.buf.len() + align4(len) - len, 0);
        self
    }

    pub fn put_u32(&mut self, kind: u16, value: u32) -> &mut Self {
        self.put(kind, &value.to_ne_bytes())
    }

    pub fn put_u64(&mut self, kind: u16, value: u64) -> &mut Self {
        self.put(kind, &value.to_ne_bytes())
    }

    /// A NUL-terminated string, as iproute2 sends `TCA_KIND`.
    pub fn put_str(&mut self, kind: u16, value: &str) -> &mut Self {
        let mut bytes = Vec::with_capacity(value.len() + 1);
        bytes.extend_from_slice(value.as_bytes());
        bytes.push(0);
        self.put(kind, &bytes)
    }

    /// A nested attribute whose content `fill` writes. `flagged` sets `NLA_F_NESTED`, which some
    /// iproute2 call sites do (`addattr_nest(..., TCA_ACT_OPTIONS | NLA_F_NESTED)`) and others do not.
    pub fn nested(
        &mut self,
        kind: u16,
        flagged: bool,
        fill: impl FnOnce(&mut AttrWriter),
    ) -> &mut Self {
        let start = self.buf.len();
        let kind = if flagged { kind | NLA_F_NESTED } else { kind };
        self.buf.extend_from_slice(&[0, 0]);
        self.buf.extend_from_slice(&kind.to_ne_bytes());
        let mut inner = AttrWriter {
            buf: std::mem::take(&mut self.buf),
        };
        fill(&mut inner);
        self.buf = inner.buf;
        let len = (self.buf.len() - start) as u16;
        self.buf[start..start + 2].copy_from_slice(&len.to_ne_bytes());
        self
    }
}

/// One decoded attribute: its type (flags masked off) and its payload.
#[derive(Debug, Clone, Copy)]
pub struct Attr<'a> {
    pub kind: u16,
    pub value: &'a [u8],
}

impl<'a> Attr<'a> {
    pub fn u16(&self) -> Result<u16, DecodeError> {
        Ok(u16::from_ne_bytes(self.array::<2>()?))
    }

    pub fn u32(&self) -> Result<u32, DecodeError> {
        Ok(u32::from_ne_bytes(self.array::<4>()?))
    }

    pub fn u64(&self) -> Result<u64, DecodeError> {
        Ok(u64::from_ne_bytes(self.array::<8>()?))
    }

    /// A NUL-terminated (or unterminated) string.
    pub fn string(&self) -> Result<String, DecodeError> {
        let end = self
            .value
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(self.value.len());
        String::from_utf8(self.value[..end].to_vec())
            .map_err(|_| DecodeError::new(format!("attribute {} is not UTF-8", self.kind)))
    }

    pub fn nested(&self) -> Attrs<'a> {
        Attrs::new(self.value)
    }

    fn array<const N: usize>(&self) -> Result<[u8; N], DecodeError> {
        self.value
            .get(..N)
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| {
                DecodeError::new(format!(
                    "attribute {} has {} bytes, expected at least {N}",
                    self.kind,
                    self.value.len()
                ))
            })
    }
}

/// A sequence of attributes, iterated with bounds checks.
#[derive(Debug, Clone, Copy)]
pub struct Attrs<'a> {
    bytes: &'a [u8],
}

impl<'a> Attrs<'a> {
    pub fn new(bytes: &'a [u8]) -> Self {
        Self { bytes }
    }

    /// All attributes, or the first malformed one's error.
    pub fn collect(&self) -> Result<Vec<Attr<'a>>, DecodeError> {
        NlasIterator::new(self.bytes)
            .map(|nla| {
                let nla: NlaBuffer<&'a [u8]> =
                    nla.map_err(|e| DecodeError::new(format!("malformed attribute: {e}")))?;
                let len = nla.length() as usize;
                let raw: &'a [u8] = nla.into_inner();
                Ok(Attr {
                    kind: u16::from_ne_bytes([raw[2], raw[3]]) & netlink_packet_core::NLA_TYPE_MASK,
                    value: &raw[4..len],
                })
            })
            .collect()
    }
}

/// A reader over a fixed-layout C struct, with every read bounds-checked.
pub struct StructReader<'a> {
    bytes: &'a [u8],
    what: &'static str,
}

impl<'a> StructReader<'a> {
    /// Fails unless at least `min_len` bytes are present.
    pub fn new(bytes: &'a [u8], min_len: usize, what: &'static str) -> Result<Self, DecodeError> {
        if bytes.len() < min_len {
            return Err(DecodeError::new(format!(
                "{what} has {} bytes, expected {min_len}",
                bytes.len()
            )));
        }
        Ok(Self { bytes, what })
    }

    fn get<const N: usize>(&self, at: usize) -> [u8; N] {
        // `new` checked the minimum length and callers only read inside it.
        let mut out = [0u8; N];
        if let Some(src) = self.bytes.get(at..at + N) {
            out.copy_from_slice(src);
        }
        out
    }

    pub fn u8(&self, at: usize) -> u8 {
        self.get::<1>(at)[0]
    }
    pub fn u16(&self, at: usize) -> u16 {
        u16::from_ne_bytes(self.get(at))
    }
    pub fn i16(&self, at: usize) -> i16 {
        i16::from_ne_bytes(self.get(at))
    }
    pub fn u16_be(&self, at: usize) -> u16 {
        u16::from_be_bytes(self.get(at))
    }
    pub fn u32(&self, at: usize) -> u32 {
        u32::from_ne_bytes(self.get(at))
    }
    pub fn i32(&self, at: usize) -> i32 {
        i32::from_ne_bytes(self.get(at))
    }
    pub fn u32_be(&self, at: usize) -> u32 {
        u32::from_be_bytes(self.get(at))
    }
    pub fn u64(&self, at: usize) -> u64 {
        u64::from_ne_bytes(self.get(at))
    }
    pub fn rest(&self, at: usize) -> &'a [u8] {
        self.bytes.get(at..).unwrap_or(&[])
    }
    pub fn what(&self) -> &'static str {
        self.what
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writer_pads_and_nests_like_iproute2() {
        let mut w = AttrWriter::new();
        w.put_str(1, "clsact");
        assert_eq!(
            w.bytes(),
            &[11, 0, 1, 0, b'c', b'l', b's', b'a', b'c', b't', 0, 0]
        );
        let mut w = AttrWriter::new();
        w.nested(2, true, |w| {
            w.put_u32(1, 7);
        });
        assert_eq!(w.bytes(), &[12, 0, 2, 0x80, 8, 0, 1, 0, 7, 0, 0, 0]);
    }

    #[test]
    fn reader_rejects_truncation_without_panicking() {
        assert!(Attrs::new(&[8, 0, 1, 0, 1]).collect().is_err());
        assert!(Attrs::new(&[2, 0, 1, 0]).collect().is_err());
        let attrs = Attrs::new(&[8, 0, 1, 0x80, 1, 2, 3, 4]).collect().unwrap();
        assert_eq!(attrs[0].kind, 1);
        assert_eq!(attrs[0].u32().unwrap(), u32::from_ne_bytes([1, 2, 3, 4]));
        assert!(attrs[0].u64().is_err());
    }
}

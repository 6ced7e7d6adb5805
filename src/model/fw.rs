//! The fw classifier: matches the skb mark. The filter's handle is the mark value; an optional
//! mask limits the bits compared, so marks owned by other software survive.

use super::action::{self, Action};
use super::attr::{AttrWriter, Attrs};
use super::error::DecodeError;
use super::handle::TcHandle;

const TCA_FW_CLASSID: u16 = 1;
const TCA_FW_ACT: u16 = 4;
const TCA_FW_MASK: u16 = 5;

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Fw {
    pub classid: Option<TcHandle>,
    /// Bits of the mark compared; `None` is the kernel's default, all bits.
    pub mask: Option<u32>,
    pub actions: Vec<Action>,
}

impl Fw {
    /// iproute2 order: the mask (parsed with the handle) first.
    pub fn encode_options(&self, w: &mut AttrWriter) {
        if let Some(m) = self.mask {
            w.put_u32(TCA_FW_MASK, m);
        }
        if let Some(c) = self.classid {
            w.put_u32(TCA_FW_CLASSID, c.0);
        }
        action::encode_list(w, TCA_FW_ACT, &self.actions);
    }

    pub fn decode_options(attrs: Attrs<'_>) -> Result<Self, DecodeError> {
        let mut f = Fw::default();
        for a in attrs.collect()? {
            match a.kind {
                TCA_FW_CLASSID => f.classid = Some(TcHandle(a.u32()?)),
                TCA_FW_MASK => f.mask = Some(a.u32()?).filter(|&m| m != u32::MAX),
                TCA_FW_ACT => f.actions = action::decode_list(a.value)?,
                _ => {}
            }
        }
        Ok(f)
    }
}

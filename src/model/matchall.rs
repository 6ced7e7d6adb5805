//! The matchall classifier: every packet, to a class or through actions.

use super::action::{self, Action};
use super::attr::{AttrWriter, Attrs};
use super::error::DecodeError;
use super::handle::TcHandle;

const TCA_MATCHALL_CLASSID: u16 = 1;
const TCA_MATCHALL_ACT: u16 = 2;
const TCA_MATCHALL_FLAGS: u16 = 3;
/// `TCA_CLS_FLAGS_NOT_IN_HW`: status the kernel adds to dumps, not configuration.
const CLS_FLAGS_NOT_IN_HW: u32 = 1 << 3;

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MatchAll {
    pub classid: Option<TcHandle>,
    pub actions: Vec<Action>,
    pub flags: Option<u32>,
}

impl MatchAll {
    pub fn encode_options(&self, w: &mut AttrWriter) {
        if let Some(c) = self.classid {
            w.put_u32(TCA_MATCHALL_CLASSID, c.0);
        }
        action::encode_list(w, TCA_MATCHALL_ACT, &self.actions);
        if let Some(f) = self.flags {
            w.put_u32(TCA_MATCHALL_FLAGS, f);
        }
    }

    pub fn decode_options(attrs: Attrs<'_>) -> Result<Self, DecodeError> {
        let mut m = MatchAll::default();
        for a in attrs.collect()? {
            match a.kind {
                TCA_MATCHALL_CLASSID => m.classid = Some(TcHandle(a.u32()?)),
                TCA_MATCHALL_ACT => m.actions = action::decode_list(a.value)?,
                TCA_MATCHALL_FLAGS => {
                    let flags = a.u32()? & !CLS_FLAGS_NOT_IN_HW;
                    m.flags = (flags != 0).then_some(flags);
                }
                _ => {}
            }
        }
        Ok(m)
    }
}

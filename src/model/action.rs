//! tc actions: mirred (redirect to another device), gact (pass, drop) and connmark (restore a
//! connection mark into the packet mark), and any other kind kept as opaque bytes. Actions travel
//! as a list nested in a filter attribute, one entry per position (`TCA_ACT_*` inside).

use std::fmt;

use super::attr::{AttrWriter, Attrs, StructReader};
use super::error::DecodeError;

const TCA_ACT_KIND: u16 = 1;
const TCA_ACT_OPTIONS: u16 = 2;

const TCA_MIRRED_PARMS: u16 = 2;
const TCA_GACT_PARMS: u16 = 2;
const TCA_CONNMARK_PARMS: u16 = 1;

/// What happens to the packet after an action: `TC_ACT_*`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Verdict(pub i32);

impl Verdict {
    pub const OK: Verdict = Verdict(0);
    pub const SHOT: Verdict = Verdict(2);
    pub const PIPE: Verdict = Verdict(3);
    pub const STOLEN: Verdict = Verdict(4);
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Verdict::OK => f.write_str("pass"),
            Verdict::SHOT => f.write_str("drop"),
            Verdict::PIPE => f.write_str("pipe"),
            Verdict::STOLEN => f.write_str("stolen"),
            Verdict(v) => write!(f, "verdict {v}"),
        }
    }
}

/// `TCA_EGRESS_REDIR` and friends: where mirred sends the packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MirredMode {
    EgressRedirect,
    EgressMirror,
    IngressRedirect,
    IngressMirror,
    Other(i32),
}

impl MirredMode {
    fn code(self) -> i32 {
        match self {
            MirredMode::EgressRedirect => 1,
            MirredMode::EgressMirror => 2,
            MirredMode::IngressRedirect => 3,
            MirredMode::IngressMirror => 4,
            MirredMode::Other(c) => c,
        }
    }
    fn from_code(c: i32) -> Self {
        match c {
            1 => MirredMode::EgressRedirect,
            2 => MirredMode::EgressMirror,
            3 => MirredMode::IngressRedirect,
            4 => MirredMode::IngressMirror,
            c => MirredMode::Other(c),
        }
    }
}

/// One action, as configured (kernel-assigned index and reference counts are not part of it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Mirred {
        mode: MirredMode,
        ifindex: u32,
        verdict: Verdict,
    },
    Gact {
        verdict: Verdict,
    },
    Connmark {
        zone: u16,
        verdict: Verdict,
    },
    /// A kind raylimit does not model: its `TCA_ACT_OPTIONS` payload, verbatim.
    Other {
        kind: String,
        options: Vec<u8>,
    },
}

impl Action {
    /// `action mirred egress redirect dev IFINDEX`.
    pub fn redirect_to(ifindex: u32) -> Self {
        Action::Mirred {
            mode: MirredMode::EgressRedirect,
            ifindex,
            verdict: Verdict::STOLEN,
        }
    }

    /// `action connmark` (zone 0, pipe): the packet's mark becomes its connection's mark, and
    /// the next action runs.
    pub fn restore_connmark() -> Self {
        Action::Connmark {
            zone: 0,
            verdict: Verdict::PIPE,
        }
    }

    pub fn kind(&self) -> &str {
        match self {
            Action::Mirred { .. } => "mirred",
            Action::Gact { .. } => "gact",
            Action::Connmark { .. } => "connmark",
            Action::Other { kind, .. } => kind,
        }
    }

    /// The kernel modules (`act_*`) this action needs, for capability checks.
    pub fn feature(&self) -> Option<&'static str> {
        match self {
            Action::Gact { .. } => Some("gact"),
            Action::Connmark { .. } => Some("connmark"),
            _ => None,
        }
    }

    fn encode(&self, w: &mut AttrWriter) {
        w.put_str(TCA_ACT_KIND, self.kind());
        w.nested(TCA_ACT_OPTIONS, true, |w| match self {
            Action::Mirred {
                mode,
                ifindex,
                verdict,
            } => {
                let mut p = tc_gen(*verdict);
                p.extend_from_slice(&mode.code().to_ne_bytes());
                p.extend_from_slice(&ifindex.to_ne_bytes());
                w.put(TCA_MIRRED_PARMS, &p);
            }
            Action::Gact { verdict } => {
                w.put(TCA_GACT_PARMS, &tc_gen(*verdict));
            }
            Action::Connmark { zone, verdict } => {
                let mut p = tc_gen(*verdict);
                p.extend_from_slice(&zone.to_ne_bytes());
                p.extend_from_slice(&[0, 0]);
                w.put(TCA_CONNMARK_PARMS, &p);
            }
            Action::Other { options, .. } => {
                w.raw(options);
            }
        });
    }

    fn decode(attrs: Attrs<'_>) -> Result<Self, DecodeError> {
        let mut kind = None;
        let mut options: &[u8] = &[];
        for a in attrs.collect()? {
            match a.kind {
                TCA_ACT_KIND => kind = Some(a.string()?),
                TCA_ACT_OPTIONS => options = a.value,
                _ => {}
            }
        }
        let kind = kind.ok_or_else(|| DecodeError::new("action without TCA_ACT_KIND"))?;
        let find = |ty: u16| -> Result<Option<&[u8]>, DecodeError> {
            Ok(Attrs::new(options)
                .collect()?
                .into_iter()
                .find(|a| a.kind == ty)
                .map(|a| a.value))
        };
        let missing = |what: &str| DecodeError::new(format!("{kind} action without {what}"));
        Ok(match kind.as_str() {
            "mirred" => {
                let r = StructReader::new(
                    find(TCA_MIRRED_PARMS)?.ok_or_else(|| missing("parameters"))?,
                    28,
                    "tc_mirred",
                )?;
                Action::Mirred {
                    mode: MirredMode::from_code(r.i32(20)),
                    ifindex: r.u32(24),
                    verdict: Verdict(r.i32(8)),
                }
            }
            "gact" => {
                let r = StructReader::new(
                    find(TCA_GACT_PARMS)?.ok_or_else(|| missing("parameters"))?,
                    20,
                    "tc_gact",
                )?;
                Action::Gact {
                    verdict: Verdict(r.i32(8)),
                }
            }
            "connmark" => {
                let r = StructReader::new(
                    find(TCA_CONNMARK_PARMS)?.ok_or_else(|| missing("parameters"))?,
                    22,
                    "tc_connmark",
                )?;
                Action::Connmark {
                    zone: r.u16(20),
                    verdict: Verdict(r.i32(8)),
                }
            }
            _ => Action::Other {
                kind,
                options: options.to_vec(),
            },
        })
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Action::Mirred {
                mode,
                ifindex,
                verdict,
            } => {
                let mode = match mode {
                    MirredMode::EgressRedirect => "egress redirect".to_string(),
                    MirredMode::EgressMirror => "egress mirror".to_string(),
                    MirredMode::IngressRedirect => "ingress redirect".to_string(),
                    MirredMode::IngressMirror => "ingress mirror".to_string(),
                    MirredMode::Other(c) => format!("mode {c}"),
                };
                write!(f, "mirred {mode} ifindex {ifindex} ({verdict})")
            }
            Action::Gact { verdict } => write!(f, "gact {verdict}"),
            Action::Connmark { zone, verdict } => write!(f, "connmark zone {zone} ({verdict})"),
            Action::Other { kind, options } => write!(f, "{kind} ({} option bytes)", options.len()),
        }
    }
}

/// `struct tc_gen` with only the verdict set: index, capab, refcnt and bindcnt are the kernel's.
fn tc_gen(verdict: Verdict) -> Vec<u8> {
    let mut p = Vec::with_capacity(28);
    for v in [0i32, 0, verdict.0, 0, 0] {
        p.extend_from_slice(&v.to_ne_bytes());
    }
    p
}

/// Writes an action list as the attribute `list_attr` of a filter's options.
pub fn encode_list(w: &mut AttrWriter, list_attr: u16, actions: &[Action]) {
    if actions.is_empty() {
        return;
    }
    w.nested(list_attr, false, |w| {
        for (i, action) in actions.iter().enumerate() {
            w.nested(i as u16 + 1, false, |w| action.encode(w));
        }
    });
}

/// Reads an action list, in the kernel's order of positions.
pub fn decode_list(value: &[u8]) -> Result<Vec<Action>, DecodeError> {
    let mut entries = Attrs::new(value).collect()?;
    entries.sort_by_key(|a| a.kind);
    entries
        .into_iter()
        .map(|a| Action::decode(a.nested()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_action_round_trips() {
        let actions = vec![
            Action::Connmark {
                zone: 0,
                verdict: Verdict::PIPE,
            },
            Action::redirect_to(4),
            Action::Gact {
                verdict: Verdict::SHOT,
            },
            Action::Other {
                kind: "skbedit".into(),
                options: vec![8, 0, 2, 0, 1, 0, 0, 0],
            },
        ];
        let mut w = AttrWriter::new();
        encode_list(&mut w, 7, &actions);
        let list = Attrs::new(w.bytes()).collect().unwrap();
        assert_eq!(list[0].kind, 7);
        assert_eq!(decode_list(list[0].value).unwrap(), actions);
    }
}

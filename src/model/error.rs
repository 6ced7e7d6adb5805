//! Bytes that do not decode: the one error of the pure model.

/// Input bytes that do not decode. Carries a human-readable reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot decode netlink data: {0}")]
pub struct DecodeError(String);

impl DecodeError {
    pub fn new(reason: impl Into<String>) -> Self {
        Self(reason.into())
    }
}

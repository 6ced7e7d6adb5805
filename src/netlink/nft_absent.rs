//! Built without the `nftables` feature (the static musl build): the table's values exist, but
//! nothing can be sent or read, and every attempt says why.

use super::NetlinkError;
pub use crate::model::nft::*;

fn absent() -> NetlinkError {
    NetlinkError::Protocol(
        "this raylimit was built without the nftables feature, so it cannot read or change nftables".into(),
    )
}

pub fn apply(_netns_path: Option<&str>, _ops: &[NftOp]) -> Result<(), NetlinkError> {
    Err(absent())
}

pub fn dump(_netns_path: Option<&str>) -> Result<NftState, NetlinkError> {
    Err(absent())
}

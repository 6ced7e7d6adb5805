//! All kernel I/O: sockets in named network namespaces, tc dumps, links and IFB devices,
//! capability probing, live TCP/UDP sockets over sock_diag; with the `nftables` feature,
//! raylimit's nftables table over nfnetlink. The values sent and read are `model`'s.

pub mod dump;
pub mod error;
pub mod link;
#[cfg(feature = "nftables")]
pub mod nft;
#[cfg(not(feature = "nftables"))]
#[path = "nft_absent.rs"]
pub mod nft;
pub mod probe;
pub mod sock_diag;
pub mod socket;

pub use error::{KernelError, NetlinkError};
pub use socket::RtSocket;

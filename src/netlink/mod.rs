//! All kernel I/O: the tc codec (one module per object kind), dumps and their decoding, links and
//! IFB devices, capability probing, sockets in named network namespaces, and live TCP/UDP sockets
//! over sock_diag; with the `nftables` feature, raylimit's nftables table over nfnetlink.

pub mod action;
pub mod attr;
pub mod dump;
pub mod error;
pub mod fw;
pub mod handle;
pub mod htb;
pub mod link;
pub mod matchall;
#[cfg(feature = "nftables")]
pub mod nft;
#[cfg(not(feature = "nftables"))]
#[path = "nft_absent.rs"]
pub mod nft;
pub mod nft_model;
pub mod probe;
pub mod sock_diag;
pub mod socket;
pub mod stats;
pub mod tc;
pub mod u32;

pub use error::{DecodeError, KernelError, NetlinkError};
pub use handle::{TcHandle, U32Handle};
pub use socket::RtSocket;

//! The kernel's objects as typed values, and their netlink encodings: qdiscs, classes, filters
//! and actions (one module per kind, each encoding and decoding symmetrically), handles, counters,
//! raylimit's nftables rules, devices. Pure: no sockets, no files. Sending and reading them is
//! `netlink`'s job.

pub mod action;
pub mod attr;
pub mod device;
pub mod error;
pub mod fq_codel;
pub mod fw;
pub mod handle;
pub mod htb;
pub mod matchall;
pub mod nft;
pub mod stats;
pub mod tbf;
pub mod tc;
pub mod u32;

pub use device::{DeviceTc, Link};
pub use error::DecodeError;
pub use handle::{TcHandle, U32Handle};

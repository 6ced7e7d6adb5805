//! raylimit: bandwidth limits for one Xray/V2Ray runtime, built and read back directly over
//! rtnetlink and nfnetlink. ARCHITECTURE.md in the repository describes the layers and how a
//! run flows through them.

pub mod cli;
pub mod engine;
pub mod evidence;
pub mod netlink;
pub mod ownership;
pub mod policy;
pub mod reconcile;
pub mod runtime;
pub mod shaping;
pub mod xray;

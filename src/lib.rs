//! raylimit: bandwidth limits for one Xray/V2Ray runtime, built and read back directly over
//! rtnetlink and nfnetlink. See DESIGN.md for the architecture; the modules follow its layout.

pub mod apply;
pub mod cli;
pub mod evidence;
pub mod netlink;
pub mod ownership;
pub mod policy;
pub mod reconcile;
pub mod runtime;
pub mod shaping;
pub mod xray;

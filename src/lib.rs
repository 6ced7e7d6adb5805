//! raylimit: bandwidth limits for one Xray/V2Ray runtime, built and read back directly over
//! rtnetlink and nfnetlink. It keeps the command-line contract of RayLimit, the Go tool it
//! re-imagines (flag names, report and JSON field names, exit codes), and where comments say
//! "RayLimit's" they mean that tool's. ARCHITECTURE.md in the repository describes the layers
//! and how a run flows through them.

pub mod cli;
pub mod engine;
pub mod evidence;
pub mod files;
pub mod model;
pub mod netlink;
pub mod ownership;
pub mod policy;
pub mod reconcile;
pub mod runtime;
pub mod shaping;
pub mod time;
pub mod xray;

//! The test kit shared by `tests/` (through `tests/common`) and `benches/` (by
//! `#[path = "../tests/common/kit/mod.rs"] mod kit;`): what a privileged test needs and the one
//! line it fails with when something is missing ([`need`]), network namespaces that remove
//! themselves ([`netns`]), and processes, commands and directories ([`process`]). It uses std,
//! libc and flate2 only, never the raylimit library, so any target can include it.
#![allow(dead_code, unused_imports)]

pub mod need;
pub mod netns;
pub mod process;

pub use need::{missing, require, Need};
pub use netns::{Netns, NetnsOptions};
pub use process::{output, run, unique, Process, TempDir, V2ray, STRACE_BIN, V2RAY_BIN};

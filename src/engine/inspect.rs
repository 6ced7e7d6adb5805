//! What `inspect` reads about one runtime: its config as the runtime reads it, its live
//! sessions and its client-facing sockets. The CLI renders it.

use crate::evidence::scope::{self, Scope};
use crate::evidence::{self, Evidence};
use crate::runtime::Runtime;
use crate::xray::Loaded;

/// One runtime, inspected.
pub struct Inspected<'a> {
    pub runtime: &'a Runtime,
    pub config: Result<Loaded, String>,
    /// Live sessions, when the config could be read (the listeners and users come from it).
    pub sessions: Option<Evidence>,
    /// The runtime's client-facing listening sockets, when the config could be read.
    pub scope: Option<Scope>,
}

/// Reads the runtime's config, then its sessions and sockets through it.
pub fn inspect(runtime: &Runtime) -> Inspected<'_> {
    let opts = evidence::Options::default();
    let config = runtime.load_config();
    let sessions = config
        .as_ref()
        .ok()
        .map(|c| evidence::gather(runtime, c, &opts));
    let scope = config.as_ref().ok().map(|c| {
        let listeners = evidence::client_listeners(c);
        scope::scope(runtime.pid(), c, &listeners, &opts.proc_root)
    });
    Inspected {
        runtime,
        config,
        sessions,
        scope,
    }
}

//! SIGINT and SIGTERM as a flag, for the commands that run until stopped (`watch`, `top`): they
//! stop at a point of their choosing rather than wherever the signal lands.

use std::sync::atomic::{AtomicBool, Ordering};

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

/// From now on SIGINT and SIGTERM set the flag instead of ending the process. A blocking call
/// (poll, sleep) returns early with EINTR.
pub fn catch() {
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
}

/// A signal has asked the process to stop.
pub fn stopping() -> bool {
    STOP.load(Ordering::SeqCst)
}

//! Progress of a long run (`apply --file` with thousands of limits, `reset`) on a terminal: one
//! line on stderr, redrawn at most ten times a second, only once the run has taken a moment,
//! and erased when it is done. Nothing is drawn when stderr is not a terminal.

use std::io::Write;
use std::time::{Duration, Instant};

/// How long a run goes before its progress is worth drawing.
const QUIET_FOR: Duration = Duration::from_millis(300);
const REDRAW_EVERY: Duration = Duration::from_millis(100);

pub struct Progress {
    label: String,
    out: Option<Box<dyn Write>>,
    started: Instant,
    quiet_for: Duration,
    drawn: Option<Instant>,
}

impl Progress {
    /// Progress on stderr, when stderr is a terminal.
    pub fn on_terminal(label: &str) -> Self {
        // SAFETY: isatty only inspects the descriptor.
        let tty = unsafe { libc::isatty(libc::STDERR_FILENO) } == 1;
        let out: Option<Box<dyn Write>> = match tty {
            true => Some(Box::new(std::io::stderr())),
            false => None,
        };
        Progress::to(label, out, QUIET_FOR)
    }

    fn to(label: &str, out: Option<Box<dyn Write>>, quiet_for: Duration) -> Self {
        Progress {
            label: label.to_string(),
            out,
            started: Instant::now(),
            quiet_for,
            drawn: None,
        }
    }

    /// `done` of `total`; erased when they meet.
    pub fn update(&mut self, done: usize, total: usize) {
        if done >= total {
            self.clear();
            return;
        }
        let now = Instant::now();
        let due = now.duration_since(self.started) >= self.quiet_for
            && self
                .drawn
                .is_none_or(|t| now.duration_since(t) >= REDRAW_EVERY);
        let Some(out) = self.out.as_mut().filter(|_| due) else {
            return;
        };
        let percent = done * 100 / total.max(1);
        let _ = write!(out, "\r\x1b[K{}: {done}/{total} ({percent}%)", self.label);
        let _ = out.flush();
        self.drawn = Some(now);
    }

    /// Erases the line, when one was drawn.
    pub fn clear(&mut self) {
        if let (Some(out), Some(_)) = (self.out.as_mut(), self.drawn.take()) {
            let _ = write!(out, "\r\x1b[K");
            let _ = out.flush();
        }
    }
}

/// What an executing engine reports its batches to: progress on a terminal, and from now on
/// SIGINT and SIGTERM stop the run at the next batch, which undoes what it did (the kernel and
/// the annotations end as they began) instead of leaving it half-applied.
pub fn for_engine(label: &str) -> impl FnMut(usize, usize) -> bool {
    super::signals::catch();
    let mut p = Progress::on_terminal(label);
    move |done, all| {
        p.update(done, all);
        !super::signals::stopping()
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);

    impl Write for Shared {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn draws_one_line_then_erases_it_and_stays_quiet_for_short_runs() {
        let seen = Shared::default();
        let mut p = Progress::to(
            "apply: kernel steps",
            Some(Box::new(seen.clone())),
            Duration::ZERO,
        );
        p.update(250, 1000);
        p.update(251, 1000); // within the redraw interval: not drawn
        p.update(1000, 1000);
        let text = String::from_utf8(seen.0.lock().unwrap().clone()).unwrap();
        assert_eq!(text, "\r\x1b[Kapply: kernel steps: 250/1000 (25%)\r\x1b[K");

        let quiet = Shared::default();
        let mut p = Progress::to(
            "reset",
            Some(Box::new(quiet.clone())),
            Duration::from_secs(60),
        );
        p.update(1, 2);
        drop(p);
        assert!(quiet.0.lock().unwrap().is_empty());
    }
}

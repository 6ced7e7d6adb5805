//! `raylimit top`: every limited subject's throughput against its limit, drops and backlog, by
//! namespace, device and direction, refreshed every interval on a terminal until `q` or Ctrl-C;
//! one snapshot (over one interval) when stdout is not a terminal.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::time::{Duration, Instant};

use clap::Args;

use super::signals;
use super::status::{read_all, sample, Sample};
use crate::engine::status::{self, Rule, Status};
use crate::netlink::NetlinkError;
use crate::policy::{human_bytes, human_rate};
use crate::shaping;

#[derive(Args, Debug)]
pub struct TopArgs {
    /// Only this device's limits.
    #[arg(long, value_name = "DEV")]
    pub device: Option<String>,
    /// Milliseconds between refreshes (and the window throughput is measured over).
    #[arg(long, value_name = "MS", default_value_t = 1000,
          value_parser = clap::value_parser!(u64).range(100..=60_000))]
    pub interval_ms: u64,
    /// Print one snapshot and exit, even on a terminal.
    #[arg(long)]
    pub once: bool,
}

pub fn run(netns: Option<&str>, args: &TopArgs) -> i32 {
    if let Some(d) = &args.device {
        if !crate::model::device::is_device_name(d) {
            let m = format!("no network device named {d:?}");
            return super::fail(super::Format::Text, super::Failure::Usage, m);
        }
    }
    let interval = Duration::from_millis(args.interval_ms);
    // SAFETY: isatty only inspects the descriptor.
    let tty = unsafe { libc::isatty(libc::STDOUT_FILENO) } == 1;
    signals::catch();
    let result = if tty && !args.once {
        live(netns, args.device.as_deref(), interval)
    } else {
        snapshot(netns, args.device.as_deref(), interval)
    };
    match result {
        Ok(()) => 0,
        Err(e @ NetlinkError::NoSuchDevice(_)) => {
            super::fail(super::Format::Text, super::Failure::Usage, e)
        }
        Err(e) => super::fail(super::Format::Text, super::Failure::Failed, e),
    }
}

/// One frame, measured over one interval.
fn snapshot(
    netns: Option<&str>,
    device: Option<&str>,
    interval: Duration,
) -> Result<(), NetlinkError> {
    let mut read = read_all(netns, device, false)?;
    let before = sample(&read);
    let started = Instant::now();
    pause(interval);
    let after = sample(&read);
    measure(&mut read, &before, &after, started.elapsed());
    print!("{}", frame(&read, interval, false, None));
    Ok(())
}

/// Refreshes every interval until `q`, Ctrl-C or SIGTERM; the terminal is put back as it was.
fn live(netns: Option<&str>, device: Option<&str>, interval: Duration) -> Result<(), NetlinkError> {
    let _raw = RawInput::new();
    let mut previous: Option<(Sample, Instant)> = None;
    let mut stdout = std::io::stdout();
    // Hide the cursor while frames repaint; shown again on the way out.
    let _ = write!(stdout, "\x1b[?25l");
    let result = (|| loop {
        let mut read = read_all(netns, device, false)?;
        let now = sample(&read);
        let taken = Instant::now();
        if let Some((before, at)) = &previous {
            measure(&mut read, before, &now, taken - *at);
        }
        let width = terminal_width();
        let _ = write!(
            stdout,
            "\x1b[H\x1b[2J{}",
            frame(&read, interval, true, width)
        );
        let _ = stdout.flush();
        previous = Some((now, taken));
        if wait_for_quit(interval) || signals::stopping() {
            return Ok(());
        }
    })();
    let _ = writeln!(stdout, "\x1b[?25h");
    let _ = stdout.flush();
    result
}

/// Sets each rule's throughput from two samples (they match when the set of roots did not
/// change between them; a root that appeared shows no throughput until the next frame).
fn measure(
    read: &mut [(Option<String>, Status)],
    before: &Sample,
    after: &Sample,
    elapsed: Duration,
) {
    let empty = BTreeMap::new();
    for (i, (_, s)) in read.iter_mut().enumerate() {
        let b = before.get(i).unwrap_or(&empty);
        let a = after.get(i).unwrap_or(&empty);
        status::apply_sample(s, b, a, elapsed.as_secs_f64());
    }
}

/// Sleeps for the interval, or until a signal.
fn pause(interval: Duration) {
    let until = Instant::now() + interval;
    while !signals::stopping() {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        std::thread::sleep(left.min(Duration::from_millis(100)));
    }
}

/// Waits up to `interval` for a key on stdin; true when it was `q` (or stdin closed).
fn wait_for_quit(interval: Duration) -> bool {
    let until = Instant::now() + interval;
    loop {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() || signals::stopping() {
            return signals::stopping();
        }
        let mut fd = libc::pollfd {
            fd: libc::STDIN_FILENO,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call.
        let n = unsafe { libc::poll(&mut fd, 1, left.as_millis().min(i32::MAX as u128) as i32) };
        if n <= 0 {
            continue;
        }
        let mut byte = [0u8; 64];
        // SAFETY: reads into a buffer of the length given.
        let got = unsafe { libc::read(libc::STDIN_FILENO, byte.as_mut_ptr().cast(), byte.len()) };
        if got == 0 {
            // stdin is closed: nothing can ask to quit; keep refreshing until a signal.
            pause(left);
            continue;
        }
        if got > 0
            && byte[..got as usize]
                .iter()
                .any(|b| matches!(b, b'q' | b'Q' | 3))
        {
            return true;
        }
    }
}

/// The terminal's width in columns, when stdout is a terminal that says.
fn terminal_width() -> Option<usize> {
    let mut ws = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes one winsize into the struct given.
    let ok = unsafe { libc::ioctl(libc::STDOUT_FILENO, libc::TIOCGWINSZ, &mut ws) } == 0;
    (ok && ws.ws_col > 0).then_some(ws.ws_col as usize)
}

/// stdin without line buffering or echo while top runs (keys arrive one by one; Ctrl-C still
/// sends SIGINT); restored when dropped.
struct RawInput(Option<libc::termios>);

impl RawInput {
    fn new() -> Self {
        // SAFETY: tcgetattr fills the termios given; tcsetattr reads it.
        unsafe {
            let mut saved: libc::termios = std::mem::zeroed();
            if libc::tcgetattr(libc::STDIN_FILENO, &mut saved) != 0 {
                return RawInput(None);
            }
            let mut raw = saved;
            raw.c_lflag &= !(libc::ICANON | libc::ECHO);
            raw.c_cc[libc::VMIN] = 1;
            raw.c_cc[libc::VTIME] = 0;
            libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &raw);
            RawInput(Some(saved))
        }
    }
}

impl Drop for RawInput {
    fn drop(&mut self) {
        if let Some(saved) = &self.0 {
            // SAFETY: restores the attributes read in new().
            unsafe {
                libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, saved);
            }
        }
    }
}

/// One screen: a heading per namespace, device and direction, a row per rule in precedence
/// order. Lines are cut to `width` on a terminal.
fn frame(
    read: &[(Option<String>, Status)],
    interval: Duration,
    live: bool,
    width: Option<usize>,
) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "raylimit top: every {} ms{}",
        interval.as_millis(),
        if live { "; q or Ctrl-C quits" } else { "" }
    );
    let mut any = false;
    for (ns, s) in read {
        for root in &s.roots {
            for direction in ["download", "upload"] {
                let rules: Vec<&Rule> = root
                    .rules
                    .iter()
                    .filter(|r| r.direction == direction)
                    .collect();
                if rules.is_empty() {
                    continue;
                }
                any = true;
                let place = ns
                    .as_deref()
                    .map(|n| format!(" (netns {n})"))
                    .unwrap_or_default();
                let _ = writeln!(
                    out,
                    "\n{} {direction}{place}: root {} on {}{}",
                    root.device,
                    shaping::root_handle(),
                    root.shaped_device,
                    root.not_in_force
                        .as_deref()
                        .map(|w| format!("; NOT IN FORCE: {w}"))
                        .unwrap_or_default()
                );
                let subject_width = rules
                    .iter()
                    .map(|r| r.subject.len())
                    .max()
                    .unwrap_or(7)
                    .max(7);
                let _ = writeln!(
                    out,
                    "  {:<subject_width$}  {:>12}  {:>12}  {:>5}  {:>8}  {:>9}  OWNER",
                    "SUBJECT", "LIMIT", "NOW", "USE", "DROPS/S", "BACKLOG"
                );
                for rule in rules {
                    let limit = match (rule.class, rule.rate) {
                        (_, Some(rate)) => human_rate(rate),
                        (Some(c), None) if c.minor() == 0 => "unlimited".into(),
                        _ => "-".into(),
                    };
                    let now = rule
                        .throughput
                        .map(human_rate)
                        .unwrap_or_else(|| "...".into());
                    let usage = match (rule.throughput, rule.rate) {
                        (Some(t), Some(r)) if r > 0 => {
                            format!("{:.0}%", t as f64 * 100.0 / r as f64)
                        }
                        _ => "-".into(),
                    };
                    let seconds = interval.as_secs_f64().max(1e-3);
                    let drops = rule
                        .recent_drops
                        .map(|d| format!("{:.0}", d as f64 / seconds))
                        .unwrap_or_else(|| "...".into());
                    let line = format!(
                        "  {:<subject_width$}  {:>12}  {:>12}  {:>5}  {:>8}  {:>9}  {}",
                        rule.subject,
                        limit,
                        now,
                        usage,
                        drops,
                        human_bytes(u64::from(rule.stats.backlog)),
                        rule.owner.as_deref().unwrap_or("unknown")
                    );
                    let line = match width {
                        Some(w) => line.chars().take(w).collect(),
                        None => line,
                    };
                    let _ = writeln!(out, "{line}");
                }
            }
        }
    }
    if !any {
        out.push_str("\nNo managed limits.\n");
    }
    out
}

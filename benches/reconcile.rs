//! Reconcile latency: `raylimit apply --file` with N specific-IP download limits on one device,
//! against iproute2 building the same objects (`tc -batch`, and one `tc` process per object as
//! the original tool does). Everything happens in a private network namespace (`rlb-<pid>`) with a
//! veth device and Debian's v2ray as the runtime; both are removed on exit, on a panic and on
//! Ctrl-C, and leftovers of a killed run are removed by the next one (or `make clean-netns`).
//!
//!   make bench-quick    # cargo bench --bench reconcile -- --quick   (3 runs per N)
//!   make bench          # 5 runs per N, then the codec bench
//!
//! Per N (medians over the runs, seconds): dry_run_s (plan against the empty device), apply_s
//! (`--execute` from empty), status_s (`status --format json` of what was applied), noop_s (the
//! apply again: every limit no_op), change_one_s (one rate changed), remove_s (every limit
//! `"remove": true`, back to an empty device), tc_batch_apply_s, tc_spawn_apply_s;
//! peak_rss_bytes (largest peak RSS of any raylimit child at that N, its VmHWM read at its exit
//! stop), apply_peak_rss_bytes and status_peak_rss_bytes (those of the apply and of status), and
//! noop_speedup_over_tc_batch (tc_batch_apply_s ÷ noop_s).
//! Every run's JSON report is checked (exit code, summary counts, decisions) and every baseline's
//! result is compared with what raylimit built, so a broken run is never reported as a fast one.
//! The table goes to stdout, the rows to `<repo>/target/bench-summary.json`.
//!
//! Environment: RAYLIMIT_BENCH_N (default 1,100,1000,10000), RAYLIMIT_BENCH_RUNS (3 quick, 5
//! full), RAYLIMIT_BENCH_TIMEOUT_S (one run, default 120: killed and reported past it),
//! RAYLIMIT_BENCH_BUDGET_S (quick only, default 170: an N whose projected time does not fit what
//! is left is skipped and reported), RAYLIMIT_BENCH_BIN (the binary; default the one cargo built).
//!
//! Under `cargo test --all-targets` (no `--bench` argument) it is a smoke test: N = 1, one run,
//! no summary file.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

#[path = "../tests/common/kit/mod.rs"]
mod kit;

use kit::{need, Netns, NetnsOptions, TempDir, V2ray};

const NS_PREFIX: &str = "rlb-";
const DEVICE: &str = "bench0";
const PEER: &str = "bench1";
/// One spawned `tc` per object at N ≥ 10 000: measured by the full bench only.
const SPAWN_FULL_ONLY_FROM: usize = 10_000;
/// The full bench's limit for one spawned-per-object run (the others have RAYLIMIT_BENCH_TIMEOUT_S).
const SPAWN_TIMEOUT: Duration = Duration::from_secs(900);

static INTERRUPTED: AtomicBool = AtomicBool::new(false);
static ALARMED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(sig: libc::c_int) {
    if sig == libc::SIGALRM {
        ALARMED.store(true, Ordering::SeqCst);
    } else {
        INTERRUPTED.store(true, Ordering::SeqCst);
    }
}

/// SIGINT/SIGTERM/SIGHUP set a flag (the guards then clean up); SIGALRM bounds one child's
/// run. No SA_RESTART, so a blocked wait4 returns EINTR and the child can be killed.
fn install_handlers() {
    // SAFETY: the handler only stores to atomics; sigaction is given initialised structures.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
        sa.sa_flags = 0;
        libc::sigemptyset(&mut sa.sa_mask);
        for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGALRM] {
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }
}

fn set_timer(d: Duration) {
    let it = libc::itimerval {
        it_interval: libc::timeval {
            tv_sec: 0,
            tv_usec: 0,
        },
        it_value: libc::timeval {
            tv_sec: d.as_secs() as libc::time_t,
            tv_usec: d.subsec_micros() as libc::suseconds_t,
        },
    };
    // SAFETY: plain setitimer with a valid structure.
    unsafe { libc::setitimer(libc::ITIMER_REAL, &it, std::ptr::null_mut()) };
}

/// Why a measurement is missing.
#[derive(Debug)]
enum Failure {
    /// Ctrl-C or a termination signal: stop, clean up, exit.
    Interrupted,
    /// One run went past the timeout and was killed (reported, not fatal).
    Timeout(String),
    /// A run that failed or whose result is wrong (reported; the bench exits 1).
    Broken(String),
}

type Res<T> = Result<T, Failure>;

fn broken<T>(m: impl Into<String>) -> Res<T> {
    Err(Failure::Broken(m.into()))
}

fn check_interrupt() -> Res<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        return Err(Failure::Interrupted);
    }
    Ok(())
}

/// A short helper command (ip, tc show): its stdout, or the failure with its stderr.
fn sh(cmd: &mut Command) -> Res<String> {
    check_interrupt()?;
    let out = kit::output(cmd).map_err(Failure::Broken)?;
    check_interrupt()?;
    Ok(out)
}

/// One finished child: exit code (negative: killed by that signal), wall time from spawn to
/// reaping, and its own peak RSS (VmHWM at its exit).
struct Ran {
    code: i32,
    secs: f64,
    maxrss: u64,
}

/// Runs `cmd` to completion with stdout to `out` and stderr to `err`, reaping it with wait4 for
/// its own rusage; killed past `timeout` (a Timeout) or on Ctrl-C (Interrupted).
fn run_timed(cmd: &mut Command, out: Stdio, err: &Path, timeout: Duration, what: &str) -> Res<Ran> {
    check_interrupt()?;
    let err = File::create(err).map_err(|e| Failure::Broken(format!("{what}: {e}")))?;
    cmd.stdin(Stdio::null()).stdout(out).stderr(err);
    kit::process::die_with_parent(cmd);
    ALARMED.store(false, Ordering::SeqCst);
    let start = Instant::now();
    let child = cmd
        .spawn()
        .map_err(|e| Failure::Broken(format!("{what}: cannot start: {e}")))?;
    let pid = child.id() as libc::pid_t;
    // The child's own peak RSS is read at its exit stop: its rusage would also count the pages
    // of this bench it was forked from (exec records the old mm's high-water mark).
    // SAFETY: seizes our own child (already exec'd) with the exit stop only.
    let traced = unsafe {
        libc::ptrace(
            libc::PTRACE_SEIZE,
            pid,
            std::ptr::null_mut::<libc::c_void>(),
            libc::PTRACE_O_TRACEEXIT as usize as *mut libc::c_void,
        )
    } == 0;
    let mut peak_rss = 0;
    let mut paused = Duration::ZERO;
    set_timer(timeout.max(Duration::from_millis(1)));
    let mut status: libc::c_int = 0;
    // SAFETY: zeroed rusage is a valid value; wait4 fills it.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    let mut killed: Option<Failure> = None;
    loop {
        // SAFETY: waits for our own unreaped child; until it is reaped its pid cannot be reused,
        // so the kill below can only reach it.
        let r = unsafe { libc::wait4(pid, &mut status, 0, &mut ru) };
        if r == pid && libc::WIFSTOPPED(status) {
            let exiting = status >> 8 == libc::SIGTRAP | (libc::PTRACE_EVENT_EXIT << 8);
            // A stop for a signal passes the signal on; the exit stop is where the peak is read.
            let stopped = Instant::now();
            let signal = match exiting {
                true => {
                    peak_rss = vm_hwm(pid).unwrap_or(0);
                    0
                }
                false => libc::WSTOPSIG(status),
            };
            // The time it spends stopped for this bench is not its own.
            paused += stopped.elapsed();
            // SAFETY: resumes our own traced, stopped child.
            unsafe {
                libc::ptrace(
                    libc::PTRACE_CONT,
                    pid,
                    std::ptr::null_mut::<libc::c_void>(),
                    signal as usize as *mut libc::c_void,
                )
            };
            continue;
        }
        if r == pid {
            break;
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINTR) {
            set_timer(Duration::ZERO);
            return broken(format!("{what}: wait4: {e}"));
        }
        if killed.is_none() {
            if INTERRUPTED.load(Ordering::SeqCst) {
                killed = Some(Failure::Interrupted);
            } else if ALARMED.swap(false, Ordering::SeqCst) {
                killed = Some(Failure::Timeout(format!(
                    "{what} ran past {} s and was killed",
                    timeout.as_secs()
                )));
            }
            if killed.is_some() {
                // SAFETY: see above.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
    let secs = start.elapsed().saturating_sub(paused).as_secs_f64();
    set_timer(Duration::ZERO);
    drop(child);
    if let Some(f) = killed {
        return Err(f);
    }
    let code = if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        -libc::WTERMSIG(status)
    };
    Ok(Ran {
        code,
        secs,
        maxrss: match traced {
            true => peak_rss,
            false => ru.ru_maxrss.max(0) as u64 * 1024,
        },
    })
}

/// A process's peak resident set (`VmHWM`), in bytes.
fn vm_hwm(pid: libc::pid_t) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// The namespace, its device, the runtime and a private state directory. Fields drop in order:
/// the runtime first, then the namespace (what still runs inside killed), then the files. Every
/// child the bench starts dies with it (a SIGKILLed bench leaves nothing changing the namespace or
/// keeping the runtime alive); what a killed run leaves is removed by the next one.
struct Host {
    runtime: V2ray,
    ns: Netns,
    dir: TempDir,
    bin: PathBuf,
    timeout: Duration,
}

impl Host {
    fn new(bin: PathBuf, timeout: Duration) -> Res<Host> {
        let name = format!("{NS_PREFIX}{}", std::process::id());
        let dir = TempDir::fresh(std::env::temp_dir().join(&name)).map_err(Failure::Broken)?;
        std::fs::create_dir_all(dir.0.join("state"))
            .map_err(|e| Failure::Broken(format!("{}: {e}", dir.0.display())))?;
        check_interrupt()?;
        let options = NetnsOptions {
            kill_inside: true,
            die_with_parent: true,
        };
        let ns = Netns::create(name, options).map_err(Failure::Broken)?;
        sh(&mut ns.ip_command(&["link", "add", DEVICE, "type", "veth", "peer", "name", PEER]))?;
        sh(&mut ns.ip_command(&["link", "set", DEVICE, "up"]))?;
        sh(&mut ns.ip_command(&["link", "set", PEER, "up"]))?;
        let interrupted = || INTERRUPTED.load(Ordering::SeqCst);
        let runtime = V2ray::start_with(&ns, dir.0.join("v2ray.json"), 10808, &interrupted);
        check_interrupt()?;
        Ok(Host {
            runtime: runtime.map_err(Failure::Broken)?,
            ns,
            dir,
            bin,
            timeout,
        })
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.0.join(name)
    }

    fn tc(&self, args: &[&str]) -> Res<String> {
        sh(&mut self.ns.tc_command(args))
    }

    /// Deletes the device's root qdisc (and with it every class and filter) and forgets the
    /// annotations, so the next run starts from an empty device.
    fn reset(&self) -> Res<()> {
        if self
            .tc(&["qdisc", "show", "dev", DEVICE])?
            .contains("qdisc htb")
        {
            self.tc(&["qdisc", "del", "dev", DEVICE, "root"])?;
        }
        let state = self.path("state");
        let _ = std::fs::remove_dir_all(&state);
        std::fs::create_dir_all(&state).map_err(|e| Failure::Broken(e.to_string()))?;
        self.expect_empty("reset")
    }

    fn expect_empty(&self, after: &str) -> Res<()> {
        let q = self.tc(&["qdisc", "show", "dev", DEVICE])?;
        if q.contains("qdisc htb") {
            return broken(format!("{after}: {DEVICE} still has {}", q.trim()));
        }
        Ok(())
    }

    /// `raylimit --netns NS apply --file POLICY --format json [--execute]`: the run and its report
    /// (exit code 0 required).
    fn raylimit(&self, policy: &str, execute: bool, what: &str) -> Res<(Ran, Value)> {
        let out_path = self.path(&format!("{what}.out.json"));
        let err_path = self.path(&format!("{what}.err"));
        let out = File::create(&out_path).map_err(|e| Failure::Broken(e.to_string()))?;
        let mut cmd = Command::new(&self.bin);
        cmd.args(["--netns", &self.ns.name, "apply", "--file"])
            .arg(self.path(policy))
            .args(["--format", "json"])
            .env("RAYLIMIT_STATE_DIR", self.path("state"));
        if execute {
            cmd.arg("--execute");
        }
        let ran = run_timed(&mut cmd, Stdio::from(out), &err_path, self.timeout, what)?;
        let stderr = std::fs::read_to_string(&err_path).unwrap_or_default();
        if ran.code != 0 {
            return broken(format!(
                "{what}: exit {}: {}",
                ran.code,
                first_lines(&stderr)
            ));
        }
        let body = std::fs::read(&out_path).map_err(|e| Failure::Broken(e.to_string()))?;
        let v: Value = serde_json::from_slice(&body)
            .map_err(|e| Failure::Broken(format!("{what}: the report is not JSON: {e}")))?;
        Ok((ran, v))
    }

    /// `raylimit status --format json`, checked to list the `n` rules applied.
    fn status(&self, n: usize) -> Res<Ran> {
        let out_path = self.path("status.out.json");
        let err_path = self.path("status.err");
        let out = File::create(&out_path).map_err(|e| Failure::Broken(e.to_string()))?;
        let mut cmd = Command::new(&self.bin);
        cmd.args(["--netns", &self.ns.name, "status", "--format", "json"])
            .env("RAYLIMIT_STATE_DIR", self.path("state"));
        let ran = run_timed(
            &mut cmd,
            Stdio::from(out),
            &err_path,
            self.timeout,
            "status",
        )?;
        if ran.code != 0 {
            let stderr = std::fs::read_to_string(&err_path).unwrap_or_default();
            return broken(format!(
                "status: exit {}: {}",
                ran.code,
                first_lines(&stderr)
            ));
        }
        let body = std::fs::read(&out_path).map_err(|e| Failure::Broken(e.to_string()))?;
        let v: Value = serde_json::from_slice(&body)
            .map_err(|e| Failure::Broken(format!("status: not JSON: {e}")))?;
        let rules: usize = v["roots"].as_array().map_or(0, |roots| {
            roots
                .iter()
                .map(|r| r["rules"].as_array().map_or(0, Vec::len))
                .sum()
        });
        if rules != n || v["drift"].as_array().is_none_or(|d| !d.is_empty()) {
            return broken(format!(
                "status N={n}: {rules} rules listed, drift {}",
                v["drift"]
            ));
        }
        Ok(ran)
    }

    /// What the kernel holds on the device, in tc's words: the classes (buffer ticks apart, kept
    /// separately) and the filters, each sorted, so two ways of building them compare equal.
    fn objects(&self) -> Res<Objects> {
        let qdisc = self.tc(&["qdisc", "show", "dev", DEVICE])?;
        // Each class's leaf (TBF) by its parent and options; TBF's own class is not a subject's.
        let mut leaves: Vec<String> = qdisc
            .lines()
            .filter(|l| l.starts_with("qdisc tbf "))
            .map(|l| l.trim().to_string())
            .collect();
        leaves.sort();
        let mut classes = Vec::new();
        let mut buffers = BTreeMap::new();
        for line in self
            .tc(&["-d", "-raw", "class", "show", "dev", DEVICE])?
            .lines()
            .filter(|l| l.starts_with("class htb "))
        {
            let (shape, ticks) = match line.find(" buffer [") {
                Some(i) => (&line[..i], &line[i..]),
                None => (line, ""),
            };
            let id = line.split_whitespace().nth(2).unwrap_or("").to_string();
            buffers.insert(id, ticks.trim().to_string());
            classes.push(shape.trim().to_string());
        }
        classes.sort();
        let mut filters: Vec<String> = Vec::new();
        for line in self
            .tc(&["-d", "-raw", "filter", "show", "dev", DEVICE])?
            .lines()
        {
            match filters.last_mut() {
                Some(last) if !line.starts_with("filter ") => {
                    last.push('\n');
                    last.push_str(line.trim_end());
                }
                _ => filters.push(line.trim_end().to_string()),
            }
        }
        filters.sort();
        Ok(Objects {
            // raylimit's HTB root (its handle comes from the library, not from a guess).
            root: qdisc.contains(&format!(
                "qdisc htb {} root",
                raylimit::shaping::root_handle()
            )),
            classes,
            buffers,
            leaves,
            filters,
        })
    }
}

struct Objects {
    root: bool,
    classes: Vec<String>,
    buffers: BTreeMap<String, String>,
    leaves: Vec<String>,
    filters: Vec<String>,
}

impl Objects {
    /// Every shaped subject has one class, its leaf, and one filter that sends to it.
    fn count_ok(&self, n: usize) -> bool {
        self.root
            && self.classes.len() == n
            && self.leaves.len() == n
            && self.filters.iter().filter(|f| f.contains("flowid")).count() == n
    }

    /// How `self` (built by tc) differs from `reference` (built by raylimit): None when the
    /// same, else a short description. Buffer ticks are compared apart (see `buffer_diffs`).
    fn differs(&self, reference: &Objects) -> Option<String> {
        if self.root != reference.root {
            return Some("the HTB root differs".into());
        }
        if self.classes != reference.classes {
            let first = self
                .classes
                .iter()
                .zip(&reference.classes)
                .find(|(a, b)| a != b)
                .map(|(a, b)| format!(": tc built `{a}`, raylimit `{b}`"))
                .unwrap_or_default();
            return Some(format!(
                "{} classes against raylimit's {}{first}",
                self.classes.len(),
                reference.classes.len()
            ));
        }
        if self.leaves != reference.leaves {
            let first = self
                .leaves
                .iter()
                .find(|l| !reference.leaves.contains(l))
                .map(|l| format!(": tc built `{l}`"))
                .unwrap_or_default();
            return Some(format!(
                "{} leaf qdiscs against raylimit's {}{first}",
                self.leaves.len(),
                reference.leaves.len()
            ));
        }
        if self.filters != reference.filters {
            let first = self
                .filters
                .iter()
                .find(|f| !reference.filters.contains(f))
                .map(|f| format!(": tc built `{}`", f.replace('\n', " ")))
                .unwrap_or_default();
            return Some(format!(
                "{} filters against raylimit's {}{first}",
                self.filters.len(),
                reference.filters.len()
            ));
        }
        None
    }

    fn buffer_diffs(&self, reference: &Objects) -> usize {
        self.buffers
            .iter()
            .filter(|(id, t)| reference.buffers.get(*id) != Some(*t))
            .count()
    }
}

fn first_lines(s: &str) -> String {
    s.lines().take(3).collect::<Vec<_>>().join(" | ")
}

/// The counts of an apply report's summary line, in its order: limits, pruned, no changes,
/// planned, executed, blocked, failed.
fn counts(v: &Value) -> Option<[u64; 7]> {
    let s = v["summary"].as_str()?;
    let nums: Vec<u64> = s
        .split(|c: char| !c.is_ascii_digit())
        .filter(|t| !t.is_empty())
        .filter_map(|t| t.parse().ok())
        .collect();
    nums.try_into().ok()
}

fn decisions(v: &Value) -> Vec<String> {
    v["limits"]
        .as_array()
        .map(|l| {
            l.iter()
                .map(|x| {
                    x["report"]["decision"]["kind"]
                        .as_str()
                        .unwrap_or("?")
                        .to_string()
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Checks a report's summary (N limits, nothing pruned, blocked or failed, and the given counts
/// of no changes, planned and executed) and that exactly planned + executed decisions are not
/// no_op, each of them `kind`.
fn validate(
    v: &Value,
    what: &str,
    n: usize,
    [no_changes, planned, executed]: [usize; 3],
    kind: &str,
) -> Res<()> {
    let n = n as u64;
    let want = [
        n,
        0,
        no_changes as u64,
        planned as u64,
        executed as u64,
        0,
        0,
    ];
    let got = counts(v);
    if got != Some(want) {
        return broken(format!(
            "{what}: summary {:?}, expected {n} limit(s), 0 pruned: {no_changes} no changes, \
             {planned} planned, {executed} executed, 0 blocked, 0 failed",
            v["summary"]
        ));
    }
    let kinds = decisions(v);
    let other = kinds.iter().filter(|k| *k != "no_op").count();
    let wrong = kinds
        .iter()
        .filter(|k| *k != "no_op" && *k != kind)
        .collect::<BTreeSet<_>>();
    if kinds.len() as u64 != n || other != planned + executed || !wrong.is_empty() {
        return broken(format!(
            "{what}: decisions {} not no_op (expected {}), unexpected kinds {wrong:?}",
            other,
            planned + executed
        ));
    }
    Ok(())
}

fn plan_commands(v: &Value) -> Vec<String> {
    let mut out = Vec::new();
    for l in v["limits"].as_array().into_iter().flatten() {
        for s in l["report"]["plan"]["steps"]
            .as_array()
            .into_iter()
            .flatten()
        {
            if let Some(c) = s["command"].as_str() {
                out.push(without_netns(c));
            }
        }
    }
    out
}

fn executed_commands(v: &Value) -> Vec<String> {
    let mut out = Vec::new();
    for l in v["limits"].as_array().into_iter().flatten() {
        for r in l["report"]["results"].as_array().into_iter().flatten() {
            if r["status"] == "ok" {
                if let Some(c) = r["command"].as_str() {
                    out.push(without_netns(c));
                }
            }
        }
    }
    out
}

/// The kernel object a `tc ... add` command creates, for spotting two different commands
/// for one object.
fn object_key(cmd: &str) -> String {
    let words: Vec<&str> = cmd.split_whitespace().collect();
    let after = |w: &str| {
        words
            .iter()
            .position(|x| *x == w)
            .and_then(|i| words.get(i + 1))
            .copied()
            .unwrap_or("")
    };
    match words.get(1).copied() {
        Some("class") => format!("class {}", after("classid")),
        Some("qdisc") if words.contains(&"parent") => {
            format!("qdisc {} {}", after("parent"), after("handle"))
        }
        Some("filter") => format!(
            "filter {} {} {} {}",
            after("parent"),
            after("protocol"),
            after("pref"),
            after("handle")
        ),
        _ => format!("qdisc {}", words.get(5).copied().unwrap_or("")),
    }
}

/// tc's arguments for one rendered command: `tc ` dropped.
fn tc_words(cmd: &str) -> Vec<String> {
    cmd.strip_prefix("tc ")
        .unwrap_or(cmd)
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

/// A rendered command without its namespace (`tc -n NS ...`, there for pasting): the bench
/// runs its baselines inside the namespace already.
fn without_netns(cmd: &str) -> String {
    match cmd.strip_prefix("tc -n ") {
        Some(rest) => format!("tc {}", rest.split_once(' ').map_or("", |(_, r)| r)),
        None => cmd.to_string(),
    }
}

/// The commands for the baselines: the dry-run plan, duplicates (the shared root and tables,
/// planned once per limit) dropped. When the plan names one object with two different
/// commands (two limits decided alone against the same empty device can be given one handle),
/// the objects raylimit really created are used instead: the commands of the `--execute` run.
fn baseline_commands(
    n: usize,
    dry: &[String],
    executed: Option<&[String]>,
    notes: &mut Vec<String>,
) -> Res<Vec<String>> {
    let mut seen = BTreeSet::new();
    let plan: Vec<String> = dry
        .iter()
        .filter(|c| seen.insert(c.as_str()))
        .cloned()
        .collect();
    if let Some(c) = plan.iter().find(|c| !c.starts_with("tc ")) {
        return broken(format!("N={n}: the plan has a step tc cannot run: `{c}`"));
    }
    let mut by_object: BTreeMap<String, Vec<&String>> = BTreeMap::new();
    for c in &plan {
        by_object.entry(object_key(c)).or_default().push(c);
    }
    let conflicts: Vec<_> = by_object.iter().filter(|(_, v)| v.len() > 1).collect();
    if conflicts.is_empty() {
        return Ok(plan);
    }
    let (key, cmds) = conflicts[0];
    let note = format!(
        "the dry-run plan names {} object(s) twice with different commands (first: {key}: `{}` and `{}`), so tc cannot build it as planned",
        conflicts.len(),
        cmds[0],
        cmds[1]
    );
    match executed {
        Some(e) => {
            notes.push(format!(
                "N={n}: {note}; the baselines use the {} commands of the --execute run instead",
                e.len()
            ));
            Ok(e.to_vec())
        }
        // The --execute run did not finish (reported with its own cause).
        None => Err(Failure::Timeout(format!(
            "{note}, and no --execute run finished to take the commands from"
        ))),
    }
}

fn median(v: &[f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let m = s.len() / 2;
    Some(if s.len() % 2 == 1 {
        s[m]
    } else {
        (s[m - 1] + s[m]) / 2.0
    })
}

/// The first this many of METRICS are raylimit's own runs, in the order they run.
const RAYLIMIT_METRICS: usize = 6;

const METRICS: [&str; 8] = [
    "dry_run_s",
    "apply_s",
    "noop_s",
    "status_s",
    "change_one_s",
    "remove_s",
    "tc_batch_apply_s",
    "tc_spawn_apply_s",
];

#[derive(Default)]
struct Row {
    n: usize,
    samples: BTreeMap<&'static str, Vec<f64>>,
    /// A metric some run of which failed or timed out: reported as null.
    missing: BTreeSet<&'static str>,
    peak_rss: u64,
    /// The largest peak RSS of an `apply --execute` from an empty device, and of `status`.
    apply_peak_rss: u64,
    status_peak_rss: u64,
    /// How many tc commands the baselines ran.
    objects: usize,
}

impl Row {
    fn get(&self, m: &str) -> Option<f64> {
        if self.missing.contains(m) {
            return None;
        }
        median(self.samples.get(m).map(Vec::as_slice).unwrap_or(&[]))
    }

    fn push(&mut self, m: &'static str, secs: f64) {
        self.samples.entry(m).or_default().push(secs);
    }

    fn json(&self) -> Value {
        let mut v = json!({"n": self.n});
        for m in METRICS {
            v[m] = json!(self.get(m));
        }
        let bytes = |b: u64| if b > 0 { json!(b) } else { Value::Null };
        v["peak_rss_bytes"] = bytes(self.peak_rss);
        v["apply_peak_rss_bytes"] = bytes(self.apply_peak_rss);
        v["status_peak_rss_bytes"] = bytes(self.status_peak_rss);
        // How many times faster a no-op run is than tc -batch building the same set.
        v["noop_speedup_over_tc_batch"] = match (self.get("tc_batch_apply_s"), self.get("noop_s")) {
            (Some(tc), Some(noop)) if noop > 0.0 => json!(tc / noop),
            _ => Value::Null,
        };
        v
    }
}

struct Config {
    ns: Vec<usize>,
    runs: usize,
    quick: bool,
    smoke: bool,
    timeout: Duration,
    /// Quick mode: when the bench should be done.
    deadline: Option<Instant>,
    bin: PathBuf,
}

impl Config {
    /// Whether `secs` more fit before the deadline.
    fn fits(&self, secs: f64) -> bool {
        self.deadline
            .is_none_or(|d| Instant::now() + Duration::from_secs_f64(secs.max(0.0)) <= d)
    }

    fn left(&self) -> f64 {
        self.deadline.map_or(f64::INFINITY, |d| {
            d.saturating_duration_since(Instant::now()).as_secs_f64()
        })
    }
}

fn env_num(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.trim().parse().ok())
}

fn config() -> Result<Config, String> {
    let args: Vec<String> = std::env::args().collect();
    let smoke = !args.iter().any(|a| a == "--bench");
    let quick = args.iter().any(|a| a == "--quick");
    let ns = match std::env::var("RAYLIMIT_BENCH_N") {
        Ok(v) if !smoke => v
            .split(',')
            .map(|x| x.trim().replace('_', "").parse::<usize>())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("RAYLIMIT_BENCH_N={v:?}: {e}"))?,
        _ if smoke => vec![1],
        _ => vec![1, 100, 1000, 10_000],
    };
    if ns.is_empty() || ns.contains(&0) {
        return Err("RAYLIMIT_BENCH_N lists sizes of at least 1".into());
    }
    let runs = match (smoke, env_num("RAYLIMIT_BENCH_RUNS")) {
        (true, _) => 1,
        (false, Some(r)) if r > 0 => r as usize,
        _ if quick => 3,
        _ => 5,
    };
    let bin = std::env::var_os("RAYLIMIT_BENCH_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_raylimit")));
    Ok(Config {
        ns,
        runs,
        quick,
        smoke,
        timeout: Duration::from_secs(env_num("RAYLIMIT_BENCH_TIMEOUT_S").unwrap_or(120)),
        deadline: quick.then(|| {
            Instant::now() + Duration::from_secs(env_num("RAYLIMIT_BENCH_BUDGET_S").unwrap_or(170))
        }),
        bin,
    })
}

fn ip_of(i: usize) -> std::net::Ipv4Addr {
    std::net::Ipv4Addr::from(0x0a40_0000u32 + i as u32)
}

/// Writes the three policies for N: the limits, the same with one rate changed, and removal.
fn write_policies(host: &Host, n: usize) -> Res<()> {
    let pid = host.runtime.process.child.id();
    let limit = |i: usize, rate: u64| json!({"ip": ip_of(i + 1).to_string(), "device": DEVICE, "direction": "download", "rate": rate});
    let rate = |i: usize| 125_000 + i as u64;
    let changed = n / 2;
    let write = |name: &str, limits: Vec<Value>| {
        let body = json!({"runtime": {"pid": pid}, "limits": limits});
        std::fs::write(host.path(name), body.to_string())
            .map_err(|e| Failure::Broken(format!("{name}: {e}")))
    };
    write("apply.json", (0..n).map(|i| limit(i, rate(i))).collect())?;
    write(
        "change.json",
        (0..n)
            .map(|i| limit(i, rate(i) + if i == changed { 1000 } else { 0 }))
            .collect(),
    )?;
    write(
        "remove.json",
        (0..n)
            .map(|i| json!({"ip": ip_of(i + 1).to_string(), "device": DEVICE, "direction": "download", "remove": true}))
            .collect(),
    )
}

/// What one N's raylimit runs leave for the baselines.
#[derive(Default)]
struct Seen {
    dry: Option<Vec<String>>,
    executed: Option<Vec<String>>,
    reference: Option<Objects>,
}

/// Records a failure of `metric` (and of the metrics after it in the run, which cannot be
/// measured then); Interrupted is passed on.
fn record(
    row: &mut Row,
    failures: &mut Vec<String>,
    notes: &mut Vec<String>,
    metrics: &[&'static str],
    f: Failure,
) -> Res<()> {
    for m in metrics {
        row.missing.insert(m);
    }
    match f {
        Failure::Interrupted => return Err(Failure::Interrupted),
        Failure::Timeout(m) => notes.push(format!(
            "N={}: {m}; {} not measured",
            row.n,
            metrics.join(", ")
        )),
        Failure::Broken(m) => failures.push(format!("N={}: {m}", row.n)),
    }
    Ok(())
}

/// One raylimit run sequence: dry-run, apply, no-op, change one, remove.
fn raylimit_runs(host: &Host, row: &mut Row, first: bool, seen: &mut Seen) -> Res<()> {
    let n = row.n;
    host.reset()?;
    let (ran, dry) = host.raylimit("apply.json", false, "dry-run")?;
    validate(&dry, &format!("dry-run N={n}"), n, [0, n, 0], "apply")?;
    host.expect_empty("dry-run")?;
    row.peak_rss = row.peak_rss.max(ran.maxrss);
    row.push("dry_run_s", ran.secs);
    if first {
        seen.dry = Some(plan_commands(&dry));
    }
    drop(dry);

    let (ran, applied) = host.raylimit("apply.json", true, "apply")?;
    validate(&applied, &format!("apply N={n}"), n, [0, 0, n], "apply")?;
    row.peak_rss = row.peak_rss.max(ran.maxrss);
    row.apply_peak_rss = row.apply_peak_rss.max(ran.maxrss);
    row.push("apply_s", ran.secs);
    let objects = host.objects()?;
    if !objects.count_ok(n) {
        return broken(format!(
            "apply N={n}: the device holds {} classes, {} leaves and {} filters to classes, not {n}",
            objects.classes.len(),
            objects.leaves.len(),
            objects
                .filters
                .iter()
                .filter(|f| f.contains("flowid"))
                .count()
        ));
    }
    if first {
        seen.executed = Some(executed_commands(&applied));
        seen.reference = Some(objects);
    }
    drop(applied);

    let ran = host.status(n)?;
    row.peak_rss = row.peak_rss.max(ran.maxrss);
    row.status_peak_rss = row.status_peak_rss.max(ran.maxrss);
    row.push("status_s", ran.secs);

    let (ran, again) = host.raylimit("apply.json", true, "no-op")?;
    validate(&again, &format!("no-op N={n}"), n, [n, 0, 0], "no_op")?;
    row.peak_rss = row.peak_rss.max(ran.maxrss);
    row.push("noop_s", ran.secs);

    let (ran, changed) = host.raylimit("change.json", true, "change-one")?;
    validate(
        &changed,
        &format!("change-one N={n}"),
        n,
        [n - 1, 0, 1],
        "replace",
    )?;
    row.peak_rss = row.peak_rss.max(ran.maxrss);
    row.push("change_one_s", ran.secs);

    let (ran, removed) = host.raylimit("remove.json", true, "remove")?;
    validate(&removed, &format!("remove N={n}"), n, [0, 0, n], "remove")?;
    host.expect_empty(&format!("remove N={n}"))?;
    row.peak_rss = row.peak_rss.max(ran.maxrss);
    row.push("remove_s", ran.secs);
    Ok(())
}

/// Checks what a baseline built against raylimit's own objects (or, without them, the counts).
fn check_built(host: &Host, n: usize, what: &str, seen: &Seen) -> Res<Objects> {
    let built = host.objects()?;
    match &seen.reference {
        Some(r) => {
            if let Some(d) = built.differs(r) {
                return broken(format!("{what} N={n}: not the objects raylimit built: {d}"));
            }
        }
        None if !built.count_ok(n) => {
            return broken(format!(
                "{what} N={n}: {} classes, {} leaves and {} filters to classes, not {n}",
                built.classes.len(),
                built.leaves.len(),
                built
                    .filters
                    .iter()
                    .filter(|f| f.contains("flowid"))
                    .count()
            ))
        }
        None => {}
    }
    Ok(built)
}

fn tc_batch(host: &Host, n: usize, seen: &Seen, timeout: Duration) -> Res<(f64, Objects)> {
    host.reset()?;
    let mut cmd = host.ns.tc_command(&["-batch"]);
    cmd.arg(host.path("batch.tc"));
    let err = host.path("batch.err");
    let ran = run_timed(&mut cmd, Stdio::null(), &err, timeout, "tc -batch")?;
    if ran.code != 0 {
        let stderr = std::fs::read_to_string(&err).unwrap_or_default();
        return broken(format!(
            "tc -batch N={n}: exit {}: tc rejected a rendered command: {}",
            ran.code,
            first_lines(&stderr)
        ));
    }
    let built = check_built(host, n, "tc -batch", seen)?;
    Ok((ran.secs, built))
}

fn tc_spawn(
    host: &Host,
    n: usize,
    cmds: &[Vec<String>],
    seen: &Seen,
    timeout: Duration,
) -> Res<f64> {
    host.reset()?;
    let err = host.path("spawn.err");
    let start = Instant::now();
    for words in cmds {
        let left = timeout.saturating_sub(start.elapsed());
        if left.is_zero() {
            return Err(Failure::Timeout(format!(
                "one tc per object ran past {} s",
                timeout.as_secs()
            )));
        }
        let mut cmd = host.ns.tc_command(&[]);
        cmd.args(words);
        let ran = run_timed(&mut cmd, Stdio::null(), &err, left, "one tc per object").map_err(
            |f| match f {
                Failure::Timeout(_) => Failure::Timeout(format!(
                    "one tc per object ran past {} s and was killed",
                    timeout.as_secs()
                )),
                f => f,
            },
        )?;
        if ran.code != 0 {
            let stderr = std::fs::read_to_string(&err).unwrap_or_default();
            return broken(format!(
                "tc N={n}: `tc {}` failed: {}",
                words.join(" "),
                first_lines(&stderr)
            ));
        }
    }
    let secs = start.elapsed().as_secs_f64();
    check_built(host, n, "one tc per object", seen)?;
    Ok(secs)
}

/// raylimit's own view of what tc built: its dry-run of the same policy, by decision.
fn raylimit_view(host: &Host, n: usize, notes: &mut Vec<String>) -> Res<()> {
    let (_, v) = host.raylimit("apply.json", false, "view")?;
    let mut by: BTreeMap<String, usize> = BTreeMap::new();
    for k in decisions(&v) {
        *by.entry(k).or_default() += 1;
    }
    let no_op = by.get("no_op").copied().unwrap_or(0);
    if no_op != n {
        let reason = v["limits"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|l| &l["report"]["decision"])
            .find(|d| d["kind"] != "no_op")
            .map(|d| {
                format!(
                    "{}: {}",
                    d["kind"].as_str().unwrap_or("?"),
                    d["reason"].as_str().unwrap_or("?")
                )
            })
            .unwrap_or_default();
        notes.push(format!(
            "N={n}: raylimit's dry-run on the objects tc -batch built decides {by:?} (e.g. {reason})"
        ));
    }
    Ok(())
}

/// The baselines' commands for N, as tc's words (made once, after the first raylimit run).
fn prepare_baselines(
    host: &Host,
    row: &mut Row,
    seen: &Seen,
    failures: &mut Vec<String>,
    notes: &mut Vec<String>,
) -> Res<Option<Vec<Vec<String>>>> {
    let n = row.n;
    let metrics = ["tc_batch_apply_s", "tc_spawn_apply_s"];
    let Some(dry) = &seen.dry else {
        notes.push(format!(
            "N={n}: no dry-run finished, so no commands for the baselines"
        ));
        row.missing.extend(metrics);
        return Ok(None);
    };
    let cmds = match baseline_commands(n, dry, seen.executed.as_deref(), notes) {
        Ok(c) => c,
        Err(f) => {
            record(row, failures, notes, &metrics, f)?;
            return Ok(None);
        }
    };
    let words: Vec<Vec<String>> = cmds.iter().map(|c| tc_words(c)).collect();
    let batch: String = words.iter().map(|w| w.join(" ") + "\n").collect();
    std::fs::write(host.path("batch.tc"), batch).map_err(|e| Failure::Broken(e.to_string()))?;
    Ok(Some(words))
}

/// One run of both baselines (each skipped once it has failed at this N).
#[allow(clippy::too_many_arguments)]
fn baseline_run(
    host: &Host,
    cfg: &Config,
    row: &mut Row,
    seen: &Seen,
    words: &[Vec<String>],
    run: usize,
    spawn_per_object: Option<f64>,
    failures: &mut Vec<String>,
    notes: &mut Vec<String>,
) -> Res<()> {
    let n = row.n;
    if !row.missing.contains("tc_batch_apply_s") {
        match tc_batch(host, n, seen, cfg.timeout) {
            Ok((secs, built)) => {
                row.push("tc_batch_apply_s", secs);
                if run == 0 {
                    if let Some(r) = &seen.reference {
                        let d = built.buffer_diffs(r);
                        if d > 0 {
                            notes.push(format!(
                                "N={n}: {d} of {n} classes tc built from the rendered `burst`/`cburst` differ from raylimit's in buffer ticks only"
                            ));
                        }
                    }
                    // raylimit's own dry-run on what tc built: the same objects?
                    if !cfg.smoke {
                        raylimit_view(host, n, notes)?;
                    }
                }
            }
            Err(f) => record(row, failures, notes, &["tc_batch_apply_s"], f)?,
        }
    }
    if row.missing.contains("tc_spawn_apply_s") {
        return Ok(());
    }
    if cfg.quick && n >= SPAWN_FULL_ONLY_FROM {
        if run == 0 {
            row.missing.insert("tc_spawn_apply_s");
            notes.push(format!(
                "N={n}: one tc per object is measured by `make bench` only (it takes minutes here: a process per object, and the kernel's per-class cost grows with N)"
            ));
        }
        return Ok(());
    }
    let estimate = row
        .samples
        .get("tc_spawn_apply_s")
        .and_then(|v| v.last().copied())
        .or(spawn_per_object.map(|p| p * words.len() as f64))
        .unwrap_or(0.0);
    if !cfg.fits(estimate) {
        if !row.samples.contains_key("tc_spawn_apply_s") {
            row.missing.insert("tc_spawn_apply_s");
            let why = if estimate > 0.0 {
                format!("about {estimate:.0} s does not fit what is left of the quick budget")
            } else {
                "the quick budget is used up".to_string()
            };
            notes.push(format!("N={n}: one tc per object not measured: {why}"));
        }
        return Ok(());
    }
    let timeout = if cfg.quick {
        cfg.timeout
    } else {
        cfg.timeout.max(SPAWN_TIMEOUT)
    };
    match tc_spawn(host, n, words, seen, timeout) {
        Ok(secs) => row.push("tc_spawn_apply_s", secs),
        Err(f) => record(row, failures, notes, &["tc_spawn_apply_s"], f)?,
    }
    Ok(())
}

/// Every measurement at N: per run, raylimit's five runs, then tc -batch, then one tc per
/// object. In quick mode a run that would not fit the budget is not started (the medians are
/// then over fewer runs, and a note says so).
fn bench_n(
    host: &Host,
    cfg: &Config,
    n: usize,
    spawn_per_object: Option<f64>,
    failures: &mut Vec<String>,
    notes: &mut Vec<String>,
) -> Res<Row> {
    write_policies(host, n)?;
    let mut row = Row {
        n,
        ..Row::default()
    };
    let mut seen = Seen::default();
    let mut words: Option<Vec<Vec<String>>> = None;
    let mut last_run = 0.0;
    for run in 0..cfg.runs {
        if run > 0 && !cfg.fits(last_run) {
            notes.push(format!(
                "N={n}: {run} of {} runs (the next would not fit the quick budget)",
                cfg.runs
            ));
            break;
        }
        let t = Instant::now();
        // After a failed or killed raylimit run, the rest of raylimit's runs at N are skipped.
        if !METRICS[..RAYLIMIT_METRICS]
            .iter()
            .any(|m| row.missing.contains(m))
        {
            eprintln!("bench: N={n} run {}/{}: raylimit", run + 1, cfg.runs);
            if let Err(f) = raylimit_runs(host, &mut row, run == 0, &mut seen) {
                // The metrics this run did not reach are not measured at this N.
                let reached: Vec<&'static str> = METRICS[..RAYLIMIT_METRICS]
                    .iter()
                    .copied()
                    .filter(|m| row.samples.get(m).map_or(0, Vec::len) <= run)
                    .collect();
                record(&mut row, failures, notes, &reached, f)?;
                if run + 1 < cfg.runs && reached.len() < RAYLIMIT_METRICS {
                    notes.push(format!(
                        "N={n}: raylimit's later runs skipped, so {} come from {} run(s)",
                        METRICS[..RAYLIMIT_METRICS - reached.len()].join(", "),
                        run + 1
                    ));
                }
            }
        }
        if run == 0 {
            words = prepare_baselines(host, &mut row, &seen, failures, notes)?;
        }
        if let Some(w) = &words {
            eprintln!("bench: N={n} run {}/{}: tc baselines", run + 1, cfg.runs);
            baseline_run(
                host,
                cfg,
                &mut row,
                &seen,
                w,
                run,
                spawn_per_object,
                failures,
                notes,
            )?;
        }
        host.reset()?;
        last_run = t.elapsed().as_secs_f64();
    }
    row.objects = words.map_or(0, |w| w.len());
    Ok(row)
}

fn fmt_s(v: Option<f64>) -> String {
    match v {
        Some(s) if s < 10.0 => format!("{s:.4}"),
        Some(s) => format!("{s:.2}"),
        None => "—".into(),
    }
}

fn table(rows: &[Row]) -> String {
    let mut s = String::from(
        "| N | dry-run | apply | no-op | status | change one | remove | tc -batch | tc per object | peak RSS (apply, status) |\n\
         |---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in rows {
        let mib = |b: u64| match b {
            0 => "—".to_string(),
            b => format!("{:.1}", b as f64 / 1048576.0),
        };
        let rss = format!(
            "{} MiB ({}, {})",
            mib(r.peak_rss),
            mib(r.apply_peak_rss),
            mib(r.status_peak_rss)
        );
        s += &format!("| {} |", r.n);
        for m in METRICS {
            s += &format!(" {} |", fmt_s(r.get(m)));
        }
        s += &format!(" {rss} |\n");
    }
    s
}

fn ratios(rows: &[Row]) -> Vec<String> {
    let mut out = Vec::new();
    let at = |n: usize| rows.iter().find(|r| r.n == n);
    let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}×", a / b),
        _ => "n/a".into(),
    };
    if let Some(r) = at(1000) {
        out.push(format!(
            "N=1000: apply / tc -batch = {}, apply / one tc per object = {}, no-op / tc -batch = {}",
            ratio(r.get("apply_s"), r.get("tc_batch_apply_s")),
            ratio(r.get("apply_s"), r.get("tc_spawn_apply_s")),
            ratio(r.get("noop_s"), r.get("tc_batch_apply_s")),
        ));
    }
    for r in rows {
        if let Some(p) = rows.iter().find(|p| p.n * 10 == r.n) {
            out.push(format!(
                "growth N={} over N={}: dry-run {}, no-op {} (linear ≈ 10×, quadratic ≈ 100×)",
                r.n,
                p.n,
                ratio(r.get("dry_run_s"), p.get("dry_run_s")),
                ratio(r.get("noop_s"), p.get("noop_s")),
            ));
        }
    }
    out
}

/// In quick mode: whether one run at N (all of raylimit's runs and both baselines) is projected
/// to fit what is left of the budget, from the time per run at the last two sizes (growth
/// exponent clamped between linear and quadratic).
fn projection(spent: &[(usize, f64)], n: usize, cfg: &Config) -> Result<(), String> {
    let Some(&(pn, pt)) = spent.last() else {
        return Ok(());
    };
    let exponent = match spent.len() {
        1 => 1.0,
        k => {
            let (qn, qt) = spent[k - 2];
            ((pt / qt).ln() / (pn as f64 / qn as f64).ln()).clamp(1.0, 2.0)
        }
    };
    let projected = pt * (n as f64 / pn as f64).powf(exponent);
    if !cfg.fits(projected) {
        return Err(format!(
            "N={n} skipped: one run is projected at {projected:.0} s (one run at N={pn} took {pt:.1} s, growth exponent {exponent:.2}), more than the {:.0} s left of the quick budget; run `RAYLIMIT_BENCH_N={n} make bench-quick` or `make bench`",
            cfg.left()
        ));
    }
    Ok(())
}

fn run(cfg: &Config) -> Res<(Vec<Row>, Vec<String>, Vec<String>)> {
    let host = Host::new(cfg.bin.clone(), cfg.timeout)?;
    let mut rows: Vec<Row> = Vec::new();
    let mut failures = Vec::new();
    let mut notes = Vec::new();
    // Time per run at each size done, for the quick budget.
    let mut spent: Vec<(usize, f64)> = Vec::new();
    for &n in &cfg.ns {
        if let Err(m) = projection(&spent, n, cfg) {
            eprintln!("bench: {m}");
            notes.push(m);
            continue;
        }
        // Seconds per spawned tc at the last size, to tell whether one such run fits.
        let spawn_per_object = rows.last().and_then(|r| {
            let s = r.get("tc_spawn_apply_s")?;
            (r.objects > 0).then(|| s / r.objects as f64)
        });
        let t = Instant::now();
        let row = bench_n(&host, cfg, n, spawn_per_object, &mut failures, &mut notes)?;
        let took = t.elapsed().as_secs_f64();
        let runs = row.samples.values().map(Vec::len).max().unwrap_or(1).max(1);
        eprintln!("bench: N={n} took {took:.1} s");
        spent.push((n, took / runs as f64));
        rows.push(row);
    }
    Ok((rows, failures, notes))
}

fn main() {
    let cfg = match config() {
        Ok(c) => c,
        Err(m) => {
            eprintln!("bench: {m}");
            std::process::exit(2);
        }
    };
    if let Some(line) = kit::missing(&[need::RUNTIME_HOST, need::DOWNLOAD]) {
        eprintln!("bench: {line}");
        std::process::exit(1);
    }
    install_handlers();
    for name in Netns::remove_leftovers(NS_PREFIX, "reconcile") {
        eprintln!("bench: removed leftover namespace {name}");
    }
    let wall = Instant::now();
    let mode = if cfg.smoke {
        "smoke (cargo test)"
    } else if cfg.quick {
        "quick"
    } else {
        "full"
    };
    eprintln!(
        "bench: reconcile, {mode}: N = {:?}, {} run(s) each, timeout {} s per run, binary {}",
        cfg.ns,
        cfg.runs,
        cfg.timeout.as_secs(),
        cfg.bin.display()
    );
    let (rows, failures, notes) = match run(&cfg) {
        Ok(r) => r,
        Err(Failure::Interrupted) => {
            eprintln!("bench: interrupted; namespace and runtime removed");
            std::process::exit(130);
        }
        Err(Failure::Timeout(m)) | Err(Failure::Broken(m)) => {
            eprintln!("bench: {m}");
            std::process::exit(1);
        }
    };
    println!(
        "\nreconcile bench ({mode}, {} run(s) per N, medians, seconds; {:.0} s in all)\n",
        cfg.runs,
        wall.elapsed().as_secs_f64()
    );
    print!("{}", table(&rows));
    let ratio_lines = ratios(&rows);
    if !ratio_lines.is_empty() {
        println!();
    }
    for r in &ratio_lines {
        println!("{r}");
    }
    if !notes.is_empty() {
        println!("\nnotes:");
        for n in &notes {
            println!("- {n}");
        }
    }
    if !cfg.smoke {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-summary.json");
        let body = json!({
            "rows": rows.iter().map(Row::json).collect::<Vec<_>>(),
            "mode": mode,
            "runs": cfg.runs,
            "notes": notes,
            "failures": failures,
        });
        let written = std::fs::create_dir_all(path.parent().expect("has a parent"))
            .and_then(|_| std::fs::write(&path, serde_json::to_string_pretty(&body).unwrap()));
        match written {
            Ok(()) => println!("\nwrote {}", path.display()),
            Err(e) => {
                eprintln!("bench: {}: {e}", path.display());
                std::process::exit(1);
            }
        }
    }
    if !failures.is_empty() {
        eprintln!("\nbench: broken runs (not reported as numbers):");
        for f in &failures {
            eprintln!("- {f}");
        }
        std::process::exit(1);
    }
}

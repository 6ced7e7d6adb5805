//! `raylimit watch`: keeps a per_ip set or a user's addresses in line with live evidence.
//!
//! Every interval it reads the evidence once and reconciles the whole change in one round under
//! the lock: new clients get their rule, clients gone for longer than the grace period lose it
//! (a client that reconnects within the grace period keeps its rule untouched). Evidence that
//! cannot be read changes nothing. SIGINT and SIGTERM stop it between rounds, so the kernel and
//! the annotations are always left consistent.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::Args;

use super::limit::{self, LimitArgs, LimitError, Session, Validated};
use super::live::{self, PER_IP};
use super::report::{LimitReport, Outcome};
use super::UsageError;
use crate::evidence::State;
use crate::policy::{self, Subject, Want};
use crate::reconcile::DecisionKind;

#[derive(Args, Debug)]
pub struct WatchArgs {
    #[command(flatten)]
    pub limit: LimitArgs,
    /// How often to read the evidence: 2s, 500ms, 1m.
    #[arg(long, value_name = "DURATION", default_value = "2s")]
    pub interval: String,
    /// How long a departed client keeps its rule, in case it comes back.
    #[arg(long, value_name = "DURATION", default_value = "30s")]
    pub grace: String,
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

/// `500ms`, `2s`, `1m`, or a bare number of seconds.
pub fn parse_duration(flag: &str, s: &str) -> Result<Duration, UsageError> {
    let s = s.trim();
    let (number, unit) = match s.find(|c: char| !c.is_ascii_digit() && c != '.') {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: f64 = number.parse().map_err(|_| {
        UsageError(format!(
            "{flag} {s:?} is not a duration like 500ms, 2s or 1m"
        ))
    })?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        _ => {
            return Err(UsageError(format!(
                "{flag} {s:?} has an unknown unit; use ms, s or m"
            )))
        }
    };
    if !(0.05..=86_400.0).contains(&secs) {
        return Err(UsageError(format!(
            "{flag} {s:?} is out of range (50ms to 24h)"
        )));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// What is being kept in line.
enum Target {
    PerIp { inbound: Option<String> },
    User { id: String },
}

pub fn run(netns: Option<&str>, args: &WatchArgs) -> i32 {
    let checked = (|| -> Result<(Validated, Target, Duration, Duration), UsageError> {
        let v = limit::validate(&args.limit)?;
        if !matches!(v.request.want, Want::Limit(_)) {
            return Err(UsageError(
                "watch keeps a --rate in place; use limit for --unlimited and --remove".into(),
            ));
        }
        let target = match &v.request.subject {
            Subject::AllPerIp => Target::PerIp {
                inbound: v.inbound.clone(),
            },
            Subject::User { uuid, .. } => Target::User { id: uuid.clone() },
            _ => {
                return Err(UsageError(
                    "watch keeps --ip all --ip-aggregation per_ip or --uuid in line; a fixed --ip or --connection needs no watching".into(),
                ))
            }
        };
        let interval = parse_duration("--interval", &args.interval)?;
        let grace = parse_duration("--grace", &args.grace)?;
        Ok((v, target, interval, grace))
    })();
    let (v, target, interval, grace) = match checked {
        Ok(x) => x,
        Err(UsageError(m)) => {
            eprintln!("raylimit: {m}");
            return 2;
        }
    };
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    let mut watch = Watch {
        netns,
        v,
        target,
        grace,
        last_seen: BTreeMap::new(),
        execute: args.limit.execute,
    };
    log(&format!(
        "watching {} {} on {} every {:?} (grace {:?}){}",
        watch.v.request.subject,
        watch.v.request.direction.name(),
        watch.v.request.device,
        interval,
        grace,
        if watch.execute {
            ""
        } else {
            "; dry-run: nothing is changed (add --execute)"
        }
    ));
    let mut code = 0;
    while !STOP.load(Ordering::SeqCst) {
        match watch.round() {
            Ok(()) => {}
            Err(LimitError::Usage(UsageError(m))) => {
                eprintln!("raylimit: {m}");
                code = 2;
                break;
            }
            Err(LimitError::Refused(m)) => log(&format!("round skipped: {m}")),
        }
        let until = Instant::now() + interval;
        while Instant::now() < until && !STOP.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(50).min(interval));
        }
    }
    log("stopped; every change so far is complete and annotated");
    code
}

struct Watch<'a> {
    netns: Option<&'a str>,
    v: Validated,
    target: Target,
    grace: Duration,
    /// When each client address was last seen live (or first missed, for one inherited).
    last_seen: BTreeMap<IpAddr, Instant>,
    execute: bool,
}

impl Watch<'_> {
    /// One round: read the evidence, reconcile every change under one lock.
    fn round(&mut self) -> Result<(), LimitError> {
        let mut session = Session::open(
            self.netns,
            &self.v.selection,
            &self.v.request.device,
            self.execute,
            false,
        )?;
        match &self.target {
            Target::PerIp { inbound } => {
                let inbound = inbound.clone();
                self.per_ip(&mut session, inbound.as_deref())
            }
            Target::User { id } => {
                let id = id.clone();
                self.user(&mut session, &id)
            }
        }
        Ok(())
    }

    fn per_ip(&mut self, session: &mut Session, inbound: Option<&str>) {
        let ev = live::gather(session);
        if ev.state == State::Unavailable {
            log(&format!(
                "evidence unavailable, nothing changed: {}",
                ev.reason
            ));
            return;
        }
        let now = Instant::now();
        let live = ev.client_ips(inbound);
        let set = live::PerIpSet::read(session, &self.v.request);
        for ip in &live {
            self.last_seen.insert(*ip, now);
        }
        let mut added = Vec::new();
        for ip in &live {
            if set.explicit_owner(*ip).is_some() {
                continue;
            }
            let r = session.one(&live::ip_request(&self.v, *ip), Some(PER_IP), None);
            added.push((format!("+ {ip}"), r));
        }
        let mut departed = Vec::new();
        for ip in set.managed.difference(&live) {
            let seen = *self.last_seen.entry(*ip).or_insert(now);
            if now.duration_since(seen) < self.grace {
                continue;
            }
            let mut one = live::ip_request(&self.v, *ip);
            one.request.want = Want::Remove;
            let r = session.one(&one, Some(PER_IP), None);
            departed.push((
                *ip,
                format!("- {ip} (gone {:?})", now.duration_since(seen)),
                r,
            ));
        }
        // The round's changes go to the kernel together.
        session.commit(
            added
                .iter_mut()
                .map(|(_, r)| r)
                .chain(departed.iter_mut().map(|(_, _, r)| r)),
        );
        for (what, r) in &added {
            report(what, r);
        }
        for (ip, what, r) in &departed {
            report(what, r);
            if r.outcome != Outcome::Failed {
                self.last_seen.remove(ip);
            }
        }
    }

    fn user(&mut self, session: &mut Session, id: &str) {
        let ev = live::gather(session);
        let Some(user) = ev.user(id).cloned() else {
            log(&format!(
                "user {id} not found in the evidence, nothing changed: {}",
                ev.attribution_reason
            ));
            return;
        };
        if matches!(user.state, State::Unavailable | State::Insufficient) {
            log(&format!(
                "user evidence {}, nothing changed: {}",
                user.state.name(),
                user.reason
            ));
            return;
        }
        let now = Instant::now();
        for ip in &user.ips {
            self.last_seen.insert(*ip, now);
        }
        // Addresses seen within the grace period stay; a shared one leaves at once.
        self.last_seen
            .retain(|ip, seen| !user.shared.contains(ip) && now.duration_since(*seen) < self.grace);
        let ips: BTreeSet<IpAddr> = self.last_seen.keys().copied().collect();
        let key = if user.uuid.is_empty() {
            user.email.clone()
        } else {
            user.uuid.to_ascii_lowercase()
        };
        let mut one = self.v.clone();
        if ips.is_empty() {
            one.request.want = Want::Remove;
        }
        one.request.subject = Subject::User { uuid: key, ips };
        let mut r = session.one(&one, None, None);
        session.commit([&mut r]);
        report(&format!("{} {}", user.email, policy_ips(&one)), &r);
    }
}

fn policy_ips(v: &Validated) -> String {
    match &v.request.subject {
        Subject::User { ips, .. } if ips.is_empty() => "[no addresses]".into(),
        Subject::User { ips, .. } => {
            let list: Vec<String> = ips.iter().map(|i| i.to_string()).collect();
            format!("[{}]", list.join(", "))
        }
        s => policy::Subject::value(s),
    }
}

/// One log line per change; a round that changes nothing stays quiet.
fn report(what: &str, r: &LimitReport) {
    let d = &r.decision;
    if d.kind == DecisionKind::NoOp && r.outcome != Outcome::Failed {
        return;
    }
    let mut line = format!("{what}: {} ({})", d.kind.name(), d.reason);
    if let Some(c) = d.expected_class {
        line.push_str(&format!(" class {c}"));
    }
    line.push_str(&format!(" -> {}", r.outcome.name()));
    if let Some(b) = &d.blocked {
        line.push_str(&format!(": {b}"));
    }
    if let Some(e) = &r.execution {
        if let Some(err) = e.results.iter().find_map(|x| x.error.as_ref()) {
            line.push_str(&format!(": {err}"));
        }
    }
    log(&line);
}

/// A line on stdout with a UTC timestamp, flushed at once (it is read by journald or a test).
fn log(line: &str) {
    use std::io::Write as _;
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{} watch: {line}", utc(secs));
    let _ = out.flush();
}

/// `YYYY-MM-DDTHH:MM:SSZ` from Unix seconds (civil-from-days, proleptic Gregorian).
fn utc(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_timestamps() {
        assert_eq!(
            parse_duration("--x", "500ms").unwrap(),
            Duration::from_millis(500)
        );
        assert_eq!(parse_duration("--x", "2").unwrap(), Duration::from_secs(2));
        assert_eq!(
            parse_duration("--x", "1m").unwrap(),
            Duration::from_secs(60)
        );
        assert!(parse_duration("--x", "0s").is_err());
        assert!(parse_duration("--x", "5h").is_err());
        assert!(parse_duration("--x", "soon").is_err());
        assert_eq!(utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc(1_795_000_000), "2026-11-18T11:06:40Z");
        assert_eq!(utc(951_782_400), "2000-02-29T00:00:00Z");
    }
}

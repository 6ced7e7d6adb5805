//! `raylimit watch`: keeps a per_ip set or a user's addresses in line with live evidence.
//!
//! Every interval the engine runs one round under the lock (`engine::watch`); this loop opens
//! it, logs one line per change, and stops between rounds on SIGINT or SIGTERM, so the kernel
//! and the annotations are always left consistent.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::Args;

use super::limit::{self, LimitArgs, LimitError, Validated};
use super::{signals, Failure, UsageError};
use crate::engine::watch::{Round, Watcher};
use crate::engine::{Decided, Outcome};
use crate::policy::{Target, Want};
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

pub fn run(netns: Option<&str>, args: &WatchArgs) -> i32 {
    let checked = (|| -> Result<(Validated, Duration, Duration), UsageError> {
        let v = limit::validate(&args.limit)?;
        if !matches!(v.wanted.want, Want::Limit(_)) {
            return Err(UsageError(
                "watch keeps a --rate in place; use limit for --unlimited and --remove".into(),
            ));
        }
        if !matches!(v.wanted.target, Target::PerIp { .. } | Target::User(_)) {
            return Err(UsageError(
                "watch keeps --ip all --ip-aggregation per_ip or --uuid in line; a fixed --ip or --connection needs no watching".into(),
            ));
        }
        let interval = parse_duration("--interval", &args.interval)?;
        let grace = parse_duration("--grace", &args.grace)?;
        Ok((v, interval, grace))
    })();
    let format = args.limit.run.format;
    let (v, interval, grace) = match checked {
        Ok(x) => x,
        Err(UsageError(m)) => return super::fail(format, Failure::Usage, m),
    };
    signals::catch();
    let execute = args.limit.run.execute;
    let w = &v.wanted;
    log(&format!(
        "watching {} {} on {} every {:?} (grace {:?}){}",
        w.target,
        w.direction.name(),
        w.device,
        interval,
        grace,
        if execute {
            ""
        } else {
            "; dry-run: nothing is changed (add --execute)"
        }
    ));
    let mut watcher = Watcher::new(w.clone(), grace);
    let mut code = 0;
    while !signals::stopping() {
        let run = limit::RunArgs {
            execute,
            ..Default::default()
        };
        match limit::open(netns, &v.selection, &w.device, run, false) {
            Ok(mut engine) => {
                let evidence = engine.gather();
                let round = watcher.round(&mut engine, &evidence, Instant::now());
                log_round(&round);
            }
            Err(LimitError::Usage(UsageError(m))) => {
                code = super::fail(format, Failure::Usage, m);
                break;
            }
            Err(e) => log(&format!("round skipped: {e}")),
        }
        let until = Instant::now() + interval;
        while Instant::now() < until && !signals::stopping() {
            std::thread::sleep(Duration::from_millis(50).min(interval));
        }
    }
    log("stopped; every change so far is complete and annotated");
    code
}

/// One log line per change of a round; a round that changes nothing stays quiet.
fn log_round(round: &Round) {
    match round {
        Round::Skipped(why) => log(&why.to_string()),
        Round::PerIp {
            live,
            departed,
            repaired,
        } => {
            for (ip, d) in live {
                report(&format!("+ {ip}"), d);
            }
            for (ip, gone, d) in departed {
                report(&format!("- {ip} (gone {gone:?})"), d);
            }
            log_repairs(repaired);
        }
        Round::User {
            email,
            ips,
            decided,
            repaired,
        } => {
            report(&format!("{email} {}", addresses(ips)), decided);
            log_repairs(repaired);
        }
    }
}

/// Drift the round repaired: rules of this runtime the kernel had lost.
fn log_repairs(repaired: &[Decided]) {
    for d in repaired {
        let r = &d.request;
        report(&format!("repair {} {}", r.subject, r.direction.name()), d);
    }
}

fn addresses(ips: &BTreeSet<IpAddr>) -> String {
    if ips.is_empty() {
        return "[no addresses]".into();
    }
    let list: Vec<String> = ips.iter().map(|i| i.to_string()).collect();
    format!("[{}]", list.join(", "))
}

/// The line of one change.
fn report(what: &str, r: &Decided) {
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
        line.push_str(&format!(": {}", super::report::blocked_text(b)));
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
    let _ = writeln!(out, "{} watch: {line}", crate::time::utc(secs));
    let _ = out.flush();
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
    }
}

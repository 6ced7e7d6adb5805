//! `raylimit apply --file POLICY`: a declarative set of limits for one runtime (JSON or TOML),
//! validated whole before anything is decided, then, per device and under one lock, every
//! limit is decided against one observation and the changes are applied together (batched
//! netlink, one nft transaction; a failure undoes the device's whole change set). `--prune` removes the runtime's managed limits that the file no longer lists. A dry-run
//! unless `--execute`; a second run of the same file is `no_op` throughout.
//!
//! ```toml
//! [runtime]
//! name = "xray"                      # or pid = 4242, container = "edge"
//!
//! [[limits]]
//! ip = "203.0.113.10"
//! device = "eth0"
//! direction = "download"
//! rate = "10mbit"
//!
//! [[limits]]
//! inbound = "vmess-in"
//! device = "eth0"
//! direction = "upload"
//! rate = 500000
//! ```

use std::collections::BTreeSet;
use std::io::Write;
use std::path::PathBuf;

use clap::Args;
use serde_json::{json, Value};

use super::limit::{self, LimitArgs, LimitError, RuntimeArgs, Session, Validated};
use super::live::PER_IP;
use super::report::{Outcome, Report};
use super::{Format, UsageError};
use crate::policy::{Subject, Want};

#[derive(Args, Debug)]
pub struct ApplyArgs {
    /// The policy: JSON, or TOML when the name ends in .toml.
    #[arg(long, value_name = "POLICY")]
    pub file: PathBuf,
    /// Also remove the runtime's managed limits that the file does not list.
    #[arg(long)]
    pub prune: bool,
    /// Change the kernel (the default is a dry-run that only plans).
    #[arg(long)]
    pub execute: bool,
    /// Execute even when the current tc state cannot be observed or compared.
    #[arg(long)]
    pub allow_missing_tc_state: bool,
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub format: Format,
}

/// The keys one limit may have: `limit`'s flags without the dashes.
const KEYS: [&str; 13] = [
    "ip",
    "ip_aggregation",
    "inbound",
    "outbound",
    "uuid",
    "connection",
    "mark_mask",
    "device",
    "direction",
    "rate",
    "unlimited",
    "remove",
    "runtime",
];

/// A value as the flag's text: strings as they are, numbers written out.
fn text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

fn read(path: &PathBuf) -> Result<Value, UsageError> {
    let body = std::fs::read_to_string(path)
        .map_err(|e| UsageError(format!("cannot read {}: {e}", path.display())))?;
    let is_toml = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("toml"));
    if is_toml {
        let t: toml::Value = toml::from_str(&body)
            .map_err(|e| UsageError(format!("{} is not valid TOML: {e}", path.display())))?;
        serde_json::to_value(t).map_err(|e| UsageError(format!("{}: {e}", path.display())))
    } else {
        serde_json::from_str(&body)
            .map_err(|e| UsageError(format!("{} is not valid JSON: {e}", path.display())))
    }
}

/// Every limit of the file, validated exactly as `limit` validates its flags; the first
/// problem, named by its place in the file, is the one reported.
fn validate(policy: &Value, a: &ApplyArgs) -> Result<Vec<Validated>, UsageError> {
    let runtime = policy.get("runtime").cloned().unwrap_or(json!({}));
    let field = |k: &str| runtime.get(k).and_then(text);
    let selection = RuntimeArgs {
        pid: field("pid"),
        container: field("container"),
        name: field("name"),
        source: field("source"),
    };
    let limits = match policy.get("limits") {
        Some(Value::Array(l)) if !l.is_empty() => l,
        _ => {
            return Err(UsageError(
                "the policy lists no limits: give a non-empty \"limits\" list".into(),
            ))
        }
    };
    let mut out = Vec::new();
    for (i, entry) in limits.iter().enumerate() {
        let at = |m: String| UsageError(format!("limits[{i}]: {m}"));
        let Some(obj) = entry.as_object() else {
            return Err(at("is not a table of keys".into()));
        };
        if let Some(k) = obj.keys().find(|k| !KEYS.contains(&k.as_str())) {
            return Err(at(format!("unknown key {k:?}")));
        }
        let s = |k: &str| obj.get(k).and_then(text);
        let flag = |k: &str| obj.get(k).and_then(Value::as_bool).unwrap_or(false);
        let args = LimitArgs {
            ip: s("ip"),
            ip_aggregation: s("ip_aggregation"),
            inbound: s("inbound"),
            outbound: s("outbound"),
            uuid: s("uuid"),
            connection: s("connection"),
            mark_mask: s("mark_mask"),
            device: s("device"),
            direction: s("direction"),
            rate: s("rate"),
            unlimited: flag("unlimited"),
            remove: flag("remove"),
            runtime: RuntimeArgs {
                pid: selection.pid.clone(),
                container: selection.container.clone(),
                name: selection.name.clone(),
                source: selection.source.clone(),
            },
            execute: a.execute,
            allow_missing_tc_state: a.allow_missing_tc_state,
            format: a.format,
        };
        out.push(limit::validate(&args).map_err(|UsageError(m)| at(m))?);
    }
    Ok(out)
}

/// The key a limit is known by in the annotations, per shaped device.
fn listed(v: &Validated) -> (String, String, String) {
    (
        v.request.device.clone(),
        v.request.direction.name().to_string(),
        v.request.subject.key(),
    )
}

/// A removal request for an annotated subject key (`ip 10.0.0.2`, `uuid …`, `inbound …`).
fn removal(template: &Validated, device: &str, direction: &str, key: &str) -> Option<Validated> {
    let (kind, value) = key.split_once(' ')?;
    let subject = match kind {
        "ip" if value == "all" => Subject::AllShared,
        "ip" => Subject::Ip(value.parse().ok()?),
        "uuid" => Subject::User {
            uuid: value.to_string(),
            ips: BTreeSet::new(),
        },
        "connection" => Subject::Connection(value.parse().ok()?),
        "inbound" => Subject::Inbound {
            tag: value.to_string(),
            address: None,
            port: 0,
        },
        "outbound" => Subject::Outbound {
            tag: value.to_string(),
            mark: 0,
            mask: crate::policy::DEFAULT_MARK_MASK,
        },
        _ => return None,
    };
    let mut v = template.clone();
    v.request.device = device.to_string();
    v.request.direction = crate::policy::Direction::parse(direction)?;
    v.request.subject = subject;
    v.request.want = Want::Remove;
    v.per_ip = false;
    v.inbound = None;
    Some(v)
}

pub fn run(netns: Option<&str>, a: &ApplyArgs) -> i32 {
    let validated = match read(&a.file).and_then(|p| validate(&p, a)) {
        Ok(v) => v,
        Err(UsageError(m)) => {
            eprintln!("raylimit: {m}");
            return 2;
        }
    };
    let mut reports: Vec<(String, Report)> = Vec::new();
    let mut pruned: Vec<(String, Report)> = Vec::new();
    // One session (and lock) per device, in the file's order of first appearance.
    let mut devices: Vec<String> = Vec::new();
    for v in &validated {
        if !devices.contains(&v.request.device) {
            devices.push(v.request.device.clone());
        }
    }
    let wanted: BTreeSet<(String, String, String)> = validated.iter().map(listed).collect();
    for device in &devices {
        let first = validated
            .iter()
            .find(|v| &v.request.device == device)
            .expect("every device comes from a limit");
        let mut session = match Session::open(
            netns,
            &first.selection,
            device,
            a.execute,
            a.allow_missing_tc_state,
        ) {
            Ok(s) => s,
            Err(LimitError::Usage(UsageError(m))) => {
                eprintln!("raylimit: {m}");
                return 2;
            }
            Err(LimitError::Refused(m)) => {
                eprintln!("raylimit: {m}");
                return 1;
            }
        };
        let (first_report, first_pruned) = (reports.len(), pruned.len());
        for v in validated.iter().filter(|v| &v.request.device == device) {
            let (_, _, key) = listed(v);
            reports.push((
                format!("{key} {} on {device}", v.request.direction.name()),
                limit::decide(&mut session, v),
            ));
        }
        if a.prune {
            let owner = session.runtime.owner();
            let stale: Vec<(String, String, Option<String>)> = session
                .annotations()
                .iter()
                .filter(|x| {
                    x.owner == owner && x.device == *device && x.netns == session.netns_key()
                })
                .map(|x| (x.direction.clone(), x.subject.clone(), x.set.clone()))
                .collect();
            let mut seen = BTreeSet::new();
            for (direction, key, set) in stale {
                // A per_ip set is listed as a whole by its `ip all` per_ip limit.
                let listed_key = if set.as_deref() == Some(PER_IP) {
                    "ip all".to_string()
                } else {
                    key.clone()
                };
                if wanted.contains(&(device.clone(), direction.clone(), listed_key)) {
                    continue;
                }
                if !seen.insert((direction.clone(), key.clone())) {
                    continue;
                }
                if let Some(r) = removal(first, device, &direction, &key) {
                    pruned.push((
                        format!("{key} {direction} on {device} (not in the file)"),
                        limit::decide(&mut session, &r),
                    ));
                }
            }
        }
        // The device's whole change set goes to the kernel together.
        session.commit(
            reports[first_report..]
                .iter_mut()
                .chain(pruned[first_pruned..].iter_mut())
                .flat_map(|(_, r)| r.limits_mut()),
        );
    }
    render(a, &reports, &pruned)
}

fn render(a: &ApplyArgs, reports: &[(String, Report)], pruned: &[(String, Report)]) -> i32 {
    let all = || reports.iter().chain(pruned.iter());
    let code = all().map(|(_, r)| r.exit_code()).max().unwrap_or(0);
    let count = |o: Outcome| all().filter(|(_, r)| r.outcome() == o).count();
    let summary = format!(
        "{} limit(s), {} pruned: {} no changes, {} planned, {} executed, {} blocked, {} failed",
        reports.len(),
        pruned.len(),
        count(Outcome::NoChanges),
        count(Outcome::PlanReady),
        count(Outcome::Executed),
        count(Outcome::Blocked),
        count(Outcome::Failed)
    );
    // Written as it is rendered, one limit at a time: a policy may list thousands.
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let written = match a.format {
        Format::Json => write_json(&mut out, a, reports, pruned, &summary),
        Format::Text => write_text(&mut out, reports, pruned, &summary),
    };
    if let Err(e) = written.and_then(|_| out.flush()) {
        eprintln!("raylimit: apply: cannot write the report: {e}");
    }
    if code != 0 {
        if let Some((name, r)) = all().find(|(_, r)| r.exit_code() != 0) {
            eprintln!("raylimit: apply: {name}: {}", r.why());
        }
    }
    code
}

/// The JSON report: the limits and pruned lists are written item by item, so memory does not
/// grow with the size of the policy.
fn write_json(
    out: &mut impl Write,
    a: &ApplyArgs,
    reports: &[(String, Report)],
    pruned: &[(String, Report)],
    summary: &str,
) -> std::io::Result<()> {
    let text = |v: &Value| serde_json::to_string(v).unwrap_or_default();
    write!(
        out,
        "{{\n\"mode\": {},\n\"operation\": \"apply\",\n\"file\": {}",
        text(&json!(if a.execute { "execute" } else { "dry-run" })),
        text(&json!(a.file.display().to_string()))
    )?;
    // One runtime for the whole file: given once, not in every limit's report.
    if let Some((_, r)) = reports.first() {
        write!(out, ",\n\"runtime\": {}", text(&r.runtime_json()))?;
    }
    for (key, list) in [("limits", reports), ("pruned", pruned)] {
        write!(out, ",\n\"{key}\": [")?;
        for (i, (name, r)) in list.iter().enumerate() {
            let sep = if i == 0 { "\n" } else { ",\n" };
            let item = json!({"limit": name, "report": r.json_without_runtime()});
            out.write_all(sep.as_bytes())?;
            serde_json::to_writer(&mut *out, &item)?;
        }
        write!(out, "\n]")?;
    }
    writeln!(out, ",\n\"summary\": {}\n}}", text(&json!(summary)))
}

fn write_text(
    out: &mut impl Write,
    reports: &[(String, Report)],
    pruned: &[(String, Report)],
    summary: &str,
) -> std::io::Result<()> {
    for (i, (name, r)) in reports.iter().enumerate() {
        writeln!(out, "=== {}/{}: {name}", i + 1, reports.len())?;
        write!(out, "{}", r.text())?;
    }
    for (name, r) in pruned {
        writeln!(out, "=== prune: {name}")?;
        write!(out, "{}", r.text())?;
    }
    writeln!(out, "\nApply summary: {summary}")
}

//! `raylimit apply --file POLICY`: a declarative set of limits for one runtime (JSON or TOML),
//! validated whole before anything is decided, then, per device and under one lock, every
//! limit is decided against one observation and the changes are applied together (batched
//! netlink, one nft transaction; a failure undoes the device's whole change set). `--prune` removes the runtime's managed limits that the file no longer lists. A dry-run
//! unless `--execute`; a second run of the same file is `no_op` throughout.
//!
//! ```toml
//! [runtime]
//! name = "xray"                      # or pid = 4242, container = "edge"
//! netns = "edge"                     # optional: the limits' network namespace (--netns)
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

use super::limit::{self, LimitArgs, RunArgs, RuntimeArgs, Validated};
use super::progress::{self, Progress};
use super::report::Report;
use super::{Failure, Format, UsageError};
use crate::engine::prune::{self, Listed};
use crate::engine::Outcome;
use crate::ownership::StateDir;
use crate::policy::Want;

#[derive(Args, Debug)]
pub struct ApplyArgs {
    /// The policy: JSON, or TOML when the name ends in .toml.
    #[arg(long, value_name = "POLICY")]
    pub file: PathBuf,
    /// Also remove the runtime's managed limits that the file does not list.
    #[arg(long)]
    pub prune: bool,
    #[command(flatten)]
    pub run: RunArgs,
}

/// The keys one limit may have: `limit`'s flags without the dashes.
const KEYS: [&str; 14] = [
    "ip",
    "ip_aggregation",
    "inbound",
    "outbound",
    "uuid",
    "connection",
    "mark_mask",
    "scope",
    "device",
    "direction",
    "rate",
    "unlimited",
    "remove",
    "runtime",
];

/// The keys of the `runtime` table: the runtime selection flags, and the network namespace
/// the limits are in (`--netns`).
const RUNTIME_KEYS: [&str; 5] = ["pid", "name", "container", "source", "netns"];

/// The namespace the file names (`runtime.netns`), reconciled with `--netns`.
fn policy_netns(policy: &Value, flag: Option<&str>) -> Result<Option<String>, UsageError> {
    let named = match policy.get("runtime").and_then(|r| r.get("netns")) {
        None => None,
        Some(Value::String(n)) if !n.is_empty() && !n.contains('/') => Some(n.clone()),
        Some(v) => {
            return Err(UsageError(format!(
                "runtime: netns {v} is not a network namespace name"
            )))
        }
    };
    match (flag, named) {
        (Some(f), Some(n)) if f != n => Err(UsageError(format!(
            "--netns {f} and the policy's runtime.netns {n} disagree; give one"
        ))),
        (Some(f), _) => Ok(Some(f.to_string())),
        (None, n) => Ok(n),
    }
}

/// A value as the flag's text: strings as they are, numbers written out.
fn text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// Policies larger than this are refused (a policy of 100 000 limits is a few MiB).
const MAX_POLICY_BYTES: u64 = 64 << 20;

fn read(path: &std::path::Path) -> Result<Value, UsageError> {
    let cannot = |e: std::io::Error| match e.kind() {
        // Already names the path and what it is.
        std::io::ErrorKind::InvalidInput | std::io::ErrorKind::InvalidData => {
            UsageError(format!("cannot read the policy: {e}"))
        }
        _ => UsageError(format!("cannot read {}: {e}", path.display())),
    };
    let bytes = crate::files::read_bounded(path, MAX_POLICY_BYTES).map_err(cannot)?;
    let body = String::from_utf8(bytes)
        .map_err(|_| UsageError(format!("{} is not UTF-8 text", path.display())))?;
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
fn validate(
    policy: &Value,
    a: &ApplyArgs,
) -> Result<(crate::runtime::Selection, Vec<Validated>), UsageError> {
    let Some(top) = policy.as_object() else {
        return Err(UsageError(
            "the policy is not a table with \"runtime\" and \"limits\"".into(),
        ));
    };
    if let Some(k) = top
        .keys()
        .find(|k| !["runtime", "limits"].contains(&k.as_str()))
    {
        return Err(UsageError(format!(
            "unknown key {k:?} (a policy has \"runtime\" and \"limits\")"
        )));
    }
    let runtime = policy.get("runtime").cloned().unwrap_or(json!({}));
    match runtime.as_object() {
        Some(t) => {
            if let Some(k) = t.keys().find(|k| !RUNTIME_KEYS.contains(&k.as_str())) {
                return Err(UsageError(format!(
                    "runtime: unknown key {k:?} (use {})",
                    RUNTIME_KEYS.join(", ")
                )));
            }
        }
        None => return Err(UsageError("runtime: is not a table of keys".into())),
    }
    let field = |k: &str| runtime.get(k).and_then(text);
    let selection = RuntimeArgs {
        pid: field("pid"),
        container: field("container"),
        name: field("name"),
        source: field("source"),
    };
    let limits = match policy.get("limits") {
        Some(Value::Array(l)) if !l.is_empty() => l,
        // With --prune, an empty policy removes every limit the runtime has.
        Some(Value::Array(_)) | None if a.prune => {
            let parsed = limit::parse_selection(
                &selection.pid,
                &selection.name,
                &selection.container,
                selection.source.as_deref(),
                true,
            )?;
            return Ok((parsed, Vec::new()));
        }
        _ => {
            return Err(UsageError(
                "the policy lists no limits: give a non-empty \"limits\" list (or --prune, to remove them all)".into(),
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
            scope: s("scope"),
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
            run: a.run,
        };
        out.push(limit::validate(&args).map_err(|UsageError(m)| at(m))?);
    }
    // Every limit carries the same selection, from the runtime table.
    let selection = out[0].selection.clone();
    Ok((selection, out))
}

/// Limits that name one subject in one direction on one device, merged as the product's rule
/// selection says: an `unlimited` entry suppresses the limits, else the tightest rate wins; a
/// subject listed both for removal and for a limit is an error. Each merged limit keeps the
/// file's order of its first entry and says which entries it stands for.
fn merge(validated: Vec<Validated>) -> Result<Vec<(Merged, Option<String>)>, UsageError> {
    let mut out: Vec<(Validated, Vec<usize>)> = Vec::new();
    let mut index: std::collections::HashMap<(String, &'static str, String), usize> =
        Default::default();
    for (i, v) in validated.into_iter().enumerate() {
        let w = &v.wanted;
        let key = (
            w.device.clone(),
            w.direction.name(),
            format!("{:?}", w.target),
        );
        let Some(&at) = index.get(&key) else {
            index.insert(key, out.len());
            out.push((v, vec![i]));
            continue;
        };
        let (kept, entries) = &mut out[at];
        let (old, new) = (kept.wanted.want, v.wanted.want);
        if (old == Want::Remove) != (new == Want::Remove) {
            return Err(UsageError(format!(
                "limits[{}] and limits[{}] both name {} {} on {}: one removes it and one limits it; keep one",
                entries[0],
                i,
                prune::listed_key(&w.target),
                w.direction.name(),
                w.device
            )));
        }
        kept.wanted.want = match (old, new) {
            (Want::Unlimited, _) | (_, Want::Unlimited) => Want::Unlimited,
            (Want::Limit(a), Want::Limit(b)) => Want::Limit(a.min(b)),
            _ => old,
        };
        entries.push(i);
    }
    // Into a list of its own size: collected in place, the smaller entries would keep the
    // validated list's whole allocation for the run.
    let mut merged = Vec::with_capacity(out.len());
    merged.extend(out.into_iter().map(|(v, entries)| {
        let note = (entries.len() > 1).then(|| {
            let list: Vec<String> = entries.iter().map(|e| e.to_string()).collect();
            let chosen = match v.wanted.want {
                Want::Unlimited => "unlimited suppresses the limits".to_string(),
                Want::Limit(rate) => format!("the tightest, {rate} bytes/s, wins"),
                Want::Remove => "one removal".to_string(),
            };
            format!("limits[{}] merged: {chosen}", list.join("], limits["))
        });
        let merged = Merged {
            wanted: v.wanted,
            device_scope: v.device_scope,
        };
        (merged, note)
    }));
    Ok(merged)
}

/// What the run keeps of a merged limit (the runtime selection, the same for every limit,
/// is kept once).
struct Merged {
    wanted: crate::policy::Wanted,
    device_scope: bool,
}

/// How a limit is listed for prune: device, direction, subject key.
fn listed(v: &Merged) -> Listed {
    let w = &v.wanted;
    (w.device.clone(), w.direction, prune::listed_key(&w.target))
}

pub fn run(netns: Option<&str>, a: &ApplyArgs) -> i32 {
    let loaded = read(&a.file).and_then(|p| {
        let netns = policy_netns(&p, netns)?;
        let (selection, limits) = validate(&p, a)?;
        Ok((netns, selection, merge(limits)?))
    });
    let format = a.run.format;
    let (netns, selection, validated) = match loaded {
        Ok(loaded) => loaded,
        Err(UsageError(m)) => return super::fail(format, Failure::Usage, m),
    };
    let mut reports: Vec<(String, Report)> = Vec::new();
    let mut pruned: Vec<(String, Report)> = Vec::new();
    // One run (and lock) per device, in the file's order of first appearance.
    let mut devices: Vec<String> = Vec::new();
    for (v, _) in &validated {
        if !devices.contains(&v.wanted.device) {
            devices.push(v.wanted.device.clone());
        }
    }
    if validated.is_empty() {
        // An empty policy with --prune: every device the runtime has limits on.
        match crate::runtime::select(&selection) {
            Ok(rt) => {
                let owner = rt.owner();
                let key = netns.clone().unwrap_or_default();
                let annotations = match StateDir::from_env().load() {
                    Ok(a) => a,
                    Err(e) => return super::fail(format, Failure::Refused, e),
                };
                for x in annotations.iter() {
                    if x.owner == owner && x.netns == key && !devices.iter().any(|d| *d == x.device)
                    {
                        devices.push(x.device.to_string());
                    }
                }
            }
            Err(e) => return super::fail(format, Failure::Refused, e),
        }
    }
    // Every device the file names exists before the first one is changed: a typo in the last
    // limit must not leave the first device changed and the rest not.
    let listed_devices: BTreeSet<&String> =
        validated.iter().map(|(v, _)| &v.wanted.device).collect();
    match crate::netlink::RtSocket::open_in(netns.as_deref()) {
        Ok(mut sock) => {
            for d in listed_devices {
                if let Err(e) = sock.link_by_name(d) {
                    let kind = match e {
                        crate::netlink::NetlinkError::NoSuchDevice(_) => Failure::Usage,
                        _ => Failure::Failed,
                    };
                    return super::fail(format, kind, format!("{e}; nothing was changed"));
                }
            }
        }
        Err(e) => return super::fail(format, Failure::Failed, e),
    }
    let listed_all: BTreeSet<Listed> = validated.iter().map(|(v, _)| listed(v)).collect();
    for device in &devices {
        // One baseline per runtime and device: its scope is the device's.
        let device_scope = validated
            .iter()
            .any(|(v, _)| &v.wanted.device == device && v.device_scope);
        let opened = limit::open(netns.as_deref(), &selection, device, a.run, device_scope);
        let mut engine = match opened {
            Ok(e) => e,
            Err(e) => return super::fail(format, e.failure(), e),
        };
        let on_device: Vec<_> = validated
            .iter()
            .filter(|(v, _)| &v.wanted.device == device)
            .collect();
        let mut staged = Vec::with_capacity(on_device.len());
        let mut planning = Progress::on_terminal(&format!("apply: planning {device}"));
        engine.on_progress(progress::for_engine(&format!(
            "apply: kernel steps on {device}"
        )));
        let total = on_device.len();
        for (i, (v, merged)) in on_device.into_iter().enumerate() {
            planning.update(i, total);
            let (_, direction, key) = listed(v);
            let name = match merged {
                Some(note) => format!("{key} {} on {device} ({note})", direction.name()),
                None => format!("{key} {} on {device}", direction.name()),
            };
            staged.push((name, &v.wanted, engine.resolve(&v.wanted)));
        }
        let mut staged_prune = Vec::new();
        if a.prune {
            let owner = engine.runtime.owner();
            let stale = prune::stale(
                engine.annotations(),
                engine.netns_key(),
                &owner,
                device,
                &listed_all,
            );
            for s in stale {
                let wanted = s.removal(device);
                let name = format!(
                    "{} {} on {device} (not in the file)",
                    s.key,
                    s.direction.name()
                );
                staged_prune.push((name, wanted.clone(), engine.resolve(&wanted)));
            }
        }
        planning.clear();
        let repairs = engine.stage_repairs();
        // The device's whole change set goes to the kernel together.
        let mut run = engine.commit();
        let (limits_before, pruned_before) = (reports.len(), pruned.len());
        for (name, wanted, s) in staged {
            reports.push((name, Report::build(&engine, wanted, s, &mut run)));
        }
        for (name, wanted, s) in staged_prune {
            pruned.push((name, Report::build(&engine, &wanted, s, &mut run)));
        }
        // The device's repairs go with its last report.
        let last = match pruned.len() > pruned_before {
            true => pruned.last_mut(),
            false => reports[limits_before..].last_mut(),
        };
        if let Some((_, r)) = last {
            r.attach_repairs(&engine, &repairs, &mut run);
        }
    }
    let batch = Batch {
        operation: "apply",
        file: Some(&a.file),
        run: &a.run,
    };
    render(&batch, &reports, &pruned)
}

/// What a batch of reports came from: the command (`apply`, `reset`), its file, its flags.
pub(super) struct Batch<'a> {
    pub operation: &'static str,
    pub file: Option<&'a std::path::Path>,
    pub run: &'a RunArgs,
}

pub(super) fn render(b: &Batch, reports: &[(String, Report)], pruned: &[(String, Report)]) -> i32 {
    let all = || reports.iter().chain(pruned.iter());
    let code = all().map(|(_, r)| r.exit_code()).max().unwrap_or(0);
    // The first limit that did not succeed is the run's error (in the JSON report too).
    let error = all().find_map(|(name, r)| {
        let kind = r.failure()?;
        Some((kind, format!("{}: {name}: {}", b.operation, r.why())))
    });
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
    // Large writes: a report of a thousand limits is about a megabyte.
    let mut out = std::io::BufWriter::with_capacity(256 << 10, std::io::stdout().lock());
    let written = match b.run.format {
        Format::Json => write_json(&mut out, b, reports, pruned, &summary, error.as_ref()),
        Format::Text => write_text(&mut out, b, reports, pruned, &summary),
    };
    if let Err(e) = written.and_then(|_| out.flush()) {
        eprintln!("raylimit: {}: cannot write the report: {e}", b.operation);
    }
    if let Some((_, message)) = &error {
        eprintln!("raylimit: {message}");
    }
    code
}

/// The JSON report: the limits and pruned lists are written item by item, so memory does not
/// grow with the size of the policy.
fn write_json(
    out: &mut impl Write,
    b: &Batch,
    reports: &[(String, Report)],
    pruned: &[(String, Report)],
    summary: &str,
    error: Option<&(super::Failure, String)>,
) -> std::io::Result<()> {
    let text = |v: &Value| serde_json::to_string(v).unwrap_or_default();
    write!(
        out,
        "{{\n\"mode\": {},\n\"operation\": {}",
        text(&json!(if b.run.execute { "execute" } else { "dry-run" })),
        text(&json!(b.operation)),
    )?;
    if let Some(file) = b.file {
        write!(
            out,
            ",\n\"file\": {}",
            text(&json!(file.display().to_string()))
        )?;
    }
    // One runtime for the whole file: given once, not in every limit's report.
    if let Some((_, r)) = reports.first() {
        write!(out, ",\n\"runtime\": {}", text(&r.runtime_json()))?;
    }
    for (key, list) in [("limits", reports), ("pruned", pruned)] {
        write!(out, ",\n\"{key}\": [")?;
        for (i, (name, r)) in list.iter().enumerate() {
            let sep = if i == 0 { "\n" } else { ",\n" };
            out.write_all(sep.as_bytes())?;
            write!(out, "{{\"limit\":{},\"report\":", text(&json!(name)))?;
            r.write_json_without_runtime(&mut *out)?;
            out.write_all(b"}")?;
        }
        write!(out, "\n]")?;
    }
    if plan_ready(reports, pruned) {
        write!(
            out,
            ",\n\"execute_command\": {}",
            text(&json!(super::execute_command()))
        )?;
    }
    if let Some((kind, message)) = error {
        write!(out, ",\n\"error\": {}", text(&kind.json(message)))?;
    }
    writeln!(out, ",\n\"summary\": {}\n}}", text(&json!(summary)))
}

fn write_text(
    out: &mut impl Write,
    b: &Batch,
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
    let mut title = b.operation.to_string();
    title[..1].make_ascii_uppercase();
    writeln!(out, "\n{title} summary: {summary}")?;
    if plan_ready(reports, pruned) {
        writeln!(out, "To execute it: {}", super::execute_command())?;
    }
    Ok(())
}

/// Whether a limit or prune of the file has a plan that a run with `--execute` would carry out.
fn plan_ready(reports: &[(String, Report)], pruned: &[(String, Report)]) -> bool {
    reports
        .iter()
        .chain(pruned)
        .any(|(_, r)| r.outcome() == Outcome::PlanReady)
}

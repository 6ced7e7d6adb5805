//! `raylimit status`, rendered: every managed root with its rules, owners and live counters.

use std::fmt::Write as _;

use serde::Serialize;
use serde_json::{json, Value};

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use crate::engine::status::{self, Drift, Root, Rule, Status};
use crate::model::nft::{self, NftState};
use crate::model::stats::TcStats;
use crate::netlink::NetlinkError;
use crate::policy::{human_bytes, human_rate};
use crate::shaping;

/// How `status` prints.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum StatusFormat {
    #[default]
    Text,
    Json,
    /// node_exporter's textfile format (Prometheus exposition), for graphing limits.
    Prometheus,
}

impl StatusFormat {
    /// How an error is reported: a JSON object with `--format json`, else one line.
    pub fn errors(self) -> super::Format {
        match self {
            StatusFormat::Json => super::Format::Json,
            _ => super::Format::Text,
        }
    }
}

/// The namespaces `status` reads: the one `--netns` names, or else the current one and every
/// namespace the owner annotations name (limits made with `--netns` live there).
fn namespaces(netns: Option<&str>) -> Vec<Option<String>> {
    match netns {
        Some(n) => vec![Some(n.to_string())],
        None => std::iter::once(None)
            .chain(status::annotated_namespaces().into_iter().map(Some))
            .collect(),
    }
}

/// Reads the status of each namespace (see `namespaces`), with the runtimes' own view when
/// `ask_runtimes` (listeners, user counters).
pub fn read_all(
    netns: Option<&str>,
    device: Option<&str>,
    ask_runtimes: bool,
) -> Result<Vec<(Option<String>, Status)>, NetlinkError> {
    let mut read = Vec::new();
    let mut missing_device = None;
    for ns in &namespaces(netns) {
        let result = match ask_runtimes {
            true => status::read(ns.as_deref(), device),
            false => status::read_kernel(ns.as_deref(), device),
        };
        match result {
            Ok(s) => read.push((ns.clone(), s)),
            // An annotated namespace without the device, or that no longer exists, has nothing
            // of raylimit's to show.
            Err(e @ NetlinkError::NoSuchDevice(_)) => missing_device = Some(e),
            Err(_) if ns.is_some() && netns.is_none() => {}
            Err(e) => return Err(e),
        }
    }
    if read.is_empty() {
        if let Some(e) = missing_device {
            return Err(e);
        }
    }
    Ok(read)
}

/// Counters of every namespace's managed roots, for a throughput sample.
pub type Sample = Vec<BTreeMap<(String, u16), TcStats>>;

pub fn sample(read: &[(Option<String>, Status)]) -> Sample {
    read.iter()
        .map(|(ns, s)| {
            status::counters(ns.as_deref(), &status::shaped_devices(s)).unwrap_or_default()
        })
        .collect()
}

/// Reads and renders the status; `window` samples the counters twice that far apart for each
/// rule's current throughput.
pub fn run(
    netns: Option<&str>,
    device: Option<&str>,
    format: StatusFormat,
    window: Duration,
) -> Result<String, NetlinkError> {
    let mut read = read_all(netns, device, format != StatusFormat::Prometheus)?;
    if !window.is_zero() {
        let before = sample(&read);
        let started = Instant::now();
        std::thread::sleep(window);
        let after = sample(&read);
        let seconds = started.elapsed().as_secs_f64();
        for (((_, s), b), a) in read.iter_mut().zip(&before).zip(&after) {
            status::apply_sample(s, b, a, seconds);
        }
    }
    Ok(match format {
        StatusFormat::Json => json_text(&read),
        StatusFormat::Prometheus => prometheus(&read),
        StatusFormat::Text => {
            let mut out = String::new();
            let any = read
                .iter()
                .any(|(_, s)| !s.roots.is_empty() || !s.drift.is_empty());
            for (ns, s) in &read {
                let shown = !s.roots.is_empty()
                    || !s.drift.is_empty()
                    || s.nft.as_ref().is_ok_and(|n| n.table);
                match ns {
                    // Asked for by name: shown as the current one would be.
                    Some(_) if netns.is_some() => {}
                    Some(name) if shown => {
                        let _ =
                            writeln!(out, "network namespace {name} (raylimit --netns {name}):");
                    }
                    Some(_) => continue,
                    None => {}
                }
                if !s.roots.is_empty() || !s.drift.is_empty() || !any {
                    out.push_str(&text(s, ns.as_deref()));
                }
                nft_text(&mut out, &s.nft);
            }
            out
        }
    })
}

/// The whole status as JSON. The roots (a rule each, thousands on a busy host) are written from
/// typed values straight into the text rather than built as a `Value` tree first: the tree
/// costs several times the text.
fn json_text(read: &[(Option<String>, Status)]) -> String {
    let roots: Vec<RootJson> = read
        .iter()
        .flat_map(|(ns, s)| s.roots.iter().map(move |r| root_json(r, ns.as_deref())))
        .collect();
    let namespaces: Vec<Value> = read
        .iter()
        .map(|(ns, s)| {
            json!({
                "netns": ns,
                "nft": nft_json(&s.nft),
                "drift": s.drift.iter().map(|d| drift_json(d, ns.as_deref())).collect::<Vec<_>>(),
                "state_error": s.state_error,
            })
        })
        .collect();
    let nft = read
        .first()
        .map(|(_, s)| nft_json(&s.nft))
        .unwrap_or(Value::Null);
    let drift: Vec<Value> = read
        .iter()
        .flat_map(|(ns, s)| s.drift.iter().map(|d| drift_json(d, ns.as_deref())))
        .collect();
    let status = StatusJson {
        drift,
        namespaces,
        nft,
        roots,
        state_error: read.first().and_then(|(_, s)| s.state_error.as_deref()),
    };
    let mut out = serde_json::to_vec_pretty(&status).unwrap_or_default();
    out.push(b'\n');
    String::from_utf8(out).unwrap_or_default()
}

// The JSON shapes below list their fields in alphabetical order, the order serde_json's maps
// have always given this output.

#[derive(Serialize)]
struct StatusJson<'a> {
    drift: Vec<Value>,
    namespaces: Vec<Value>,
    nft: Value,
    roots: Vec<RootJson<'a>>,
    state_error: Option<&'a str>,
}

#[derive(Serialize)]
struct RootJson<'a> {
    backlog_bytes: u32,
    bytes: u64,
    device: &'a str,
    direction: &'a str,
    drops: u32,
    netns: Option<&'a str>,
    not_in_force: Option<&'a str>,
    orphan_classes: Vec<String>,
    packets: u64,
    root_handle: String,
    rules: Vec<RuleJson<'a>>,
    shaped_device: &'a str,
    unrecognised_filters: &'a [String],
}

#[derive(Serialize)]
struct RuleJson<'a> {
    backlog_bytes: u32,
    bytes: u64,
    class_id: Option<String>,
    clients: &'a [String],
    direction: &'a str,
    drops: u32,
    leaf: Option<&'a str>,
    leaf_queue_bytes: Option<u32>,
    listeners: &'a [String],
    owner: Option<&'a str>,
    packets: u64,
    priority: Option<u16>,
    rate_bytes_per_second: Option<u64>,
    scope_drift: Option<&'a str>,
    subject: &'a str,
    throughput_bytes_per_second: Option<u64>,
    unlimited: bool,
    user_traffic: Option<&'a str>,
}

/// The commands that repair a drift, as they can be pasted (in its namespace).
fn repairs(d: &Drift, netns: Option<&str>) -> Vec<String> {
    let raylimit = d.raylimit.as_ref().map(|args| {
        let mut words = vec!["raylimit".to_string()];
        if let Some(ns) = netns {
            words.extend(["--netns".to_string(), ns.to_string()]);
        }
        words.extend(args.iter().map(|w| super::shell_word(w)));
        words.join(" ")
    });
    raylimit
        .into_iter()
        .chain(
            d.tc.iter()
                .map(|c| super::report::in_netns(c.clone(), netns)),
        )
        .collect()
}

fn drift_json(d: &Drift, netns: Option<&str>) -> Value {
    json!({
        "netns": netns,
        "device": d.device,
        "direction": d.direction,
        "subject": d.subject,
        "owner": d.owner,
        "problem": d.problem,
        "repair": repairs(d, netns),
    })
}

/// A Prometheus label value: backslash, double quote and newline escaped.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// node_exporter's textfile format: one series per rule and metric, labelled by namespace,
/// device, direction, subject and owner; counters stay counters (graph them with rate()).
fn prometheus(read: &[(Option<String>, Status)]) -> String {
    type Series = Vec<(String, String)>;
    let metrics: [(&str, &str, &str); 6] = [
        (
            "raylimit_limit_bytes_per_second",
            "gauge",
            "The rate the rule holds its subject to, in bytes per second.",
        ),
        (
            "raylimit_sent_bytes_total",
            "counter",
            "Bytes the rule's class has sent.",
        ),
        (
            "raylimit_sent_packets_total",
            "counter",
            "Packets the rule's class has sent.",
        ),
        (
            "raylimit_dropped_packets_total",
            "counter",
            "Packets the rule's class has dropped.",
        ),
        (
            "raylimit_backlog_bytes",
            "gauge",
            "Bytes queued in the rule's class.",
        ),
        (
            "raylimit_drift",
            "gauge",
            "Differences between the kernel and raylimit's records, by namespace.",
        ),
    ];
    let mut series: Vec<Series> = vec![Vec::new(); metrics.len()];
    for (ns, s) in read {
        let ns = ns.as_deref().unwrap_or("");
        for root in &s.roots {
            for rule in &root.rules {
                let labels = format!(
                    "netns=\"{}\",device=\"{}\",direction=\"{}\",subject=\"{}\",owner=\"{}\"",
                    label(ns),
                    label(&root.device),
                    rule.direction,
                    label(&rule.subject),
                    label(rule.owner.as_deref().unwrap_or("")),
                );
                let values = [
                    rule.rate,
                    Some(rule.stats.bytes),
                    Some(rule.stats.packets),
                    Some(u64::from(rule.stats.drops)),
                    Some(u64::from(rule.stats.backlog)),
                ];
                for (i, v) in values.into_iter().enumerate() {
                    if let Some(v) = v {
                        series[i].push((labels.clone(), v.to_string()));
                    }
                }
            }
        }
        series[5].push((
            format!("netns=\"{}\"", label(ns)),
            s.drift.len().to_string(),
        ));
    }
    let mut out = String::new();
    for ((name, kind, help), rows) in metrics.iter().zip(series) {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        for (labels, value) in rows {
            let _ = writeln!(out, "{name}{{{labels}}} {value}");
        }
    }
    out
}

/// raylimit's nft table, rule by rule with its owner and counters.
fn nft_text(s: &mut String, nft: &Result<NftState, NetlinkError>) {
    match nft {
        Err(e) => {
            let _ = writeln!(s, "nft table inet {}: unreadable: {e}", nft::TABLE);
        }
        Ok(state) if !state.table => {}
        Ok(state) => {
            let _ = writeln!(s, "nft table inet {}:", nft::TABLE);
            for r in &state.rules {
                let _ = writeln!(
                    s,
                    "  {} handle {}: {}; {} packets, {} bytes; {}",
                    r.chain,
                    r.handle,
                    r.rule.describe(),
                    r.packets,
                    r.bytes,
                    r.tag
                        .as_ref()
                        .map(|t| format!("{} owner {}", t.subject, t.owner))
                        .unwrap_or_else(|| "untagged".into())
                );
            }
            for f in &state.foreign {
                let _ = writeln!(s, "  not raylimit's: {f}");
            }
        }
    }
}

fn nft_json(nft: &Result<NftState, NetlinkError>) -> Value {
    match nft {
        Err(e) => json!({"error": e.to_string()}),
        Ok(state) => json!({
            "table": state.table,
            "rules": state.rules.iter().map(|r| json!({
                "chain": r.chain, "handle": r.handle, "rule": r.rule.describe(),
                "subject": r.tag.as_ref().map(|t| &t.subject),
                "owner": r.tag.as_ref().map(|t| &t.owner),
                "packets": r.packets, "bytes": r.bytes,
            })).collect::<Vec<_>>(),
            "foreign": state.foreign,
        }),
    }
}

/// The limit a rule holds, in words.
fn shape(rule: &Rule) -> String {
    match (rule.class, rule.rate) {
        (Some(c), Some(rate)) => {
            let mut s = format!("class {c} rate {rate} bytes/s ({})", human_rate(rate));
            match (&rule.leaf, rule.leaf_queue_bytes) {
                (Some(leaf), Some(q)) => s.push_str(&format!(", leaf {leaf} queue {q} B")),
                (Some(leaf), None) => s.push_str(&format!(", leaf {leaf}")),
                (None, _) => {}
            }
            s
        }
        (Some(c), None) if c.minor() == 0 => "unlimited (HTB direct queue)".to_string(),
        (Some(c), None) => format!("class {c} (missing)"),
        (None, _) => "no class".to_string(),
    }
}

/// Throughput now against the limit, when a sample was taken.
fn now(rule: &Rule) -> Option<String> {
    let t = rule.throughput?;
    Some(match rule.rate {
        Some(rate) if rate > 0 => format!(
            "now {} ({}%)",
            human_rate(t),
            (t as f64 * 100.0 / rate as f64).round()
        ),
        _ => format!("now {}", human_rate(t)),
    })
}

/// Counters in human units.
fn counters_text(stats: &TcStats, recent_drops: Option<u64>) -> String {
    let recent = recent_drops
        .filter(|d| *d > 0)
        .map(|d| format!(" ({d} just now)"))
        .unwrap_or_default();
    format!(
        "{} sent, {} packets, {} dropped{recent}, backlog {}",
        human_bytes(stats.bytes),
        stats.packets,
        stats.drops,
        human_bytes(u64::from(stats.backlog))
    )
}

/// Where a root's packets are shaped, in words.
fn place(root: &Root, direction: &str) -> String {
    match (root.direction, direction) {
        ("upload", _) => format!(
            "arriving on {}, shaped on {}'s egress",
            root.device, root.shaped_device
        ),
        (_, "upload") => format!("outbound marks, leaving {}", root.device),
        _ => format!("leaving {}", root.device),
    }
}

/// One namespace's status, grouped by device, direction and owner, rules in precedence order,
/// then the drift with what repairs it.
fn text(s: &Status, netns: Option<&str>) -> String {
    let mut out = String::new();
    if let Some(e) = &s.state_error {
        let _ = writeln!(out, "Owner annotations UNREADABLE: {e}");
    }
    if s.roots.is_empty() && s.drift.is_empty() {
        out.push_str("No managed limits.\n");
        return out;
    }
    let devices: BTreeSet<&str> = s.roots.iter().map(|r| r.device.as_str()).collect();
    for device in devices {
        let _ = writeln!(out, "{device}:");
        for direction in ["download", "upload"] {
            for root in s.roots.iter().filter(|r| r.device == device) {
                let rules: Vec<&Rule> = root
                    .rules
                    .iter()
                    .filter(|r| r.direction == direction)
                    .collect();
                let own_root = root.direction == direction;
                if rules.is_empty() && !own_root {
                    continue;
                }
                let _ = write!(
                    out,
                    "  {direction} ({}; root {} on {}",
                    place(root, direction),
                    shaping::root_handle(),
                    root.shaped_device
                );
                if own_root {
                    let _ = write!(out, ": {}", counters_text(&root.stats, None));
                }
                let _ = writeln!(out, ")");
                if let Some(why) = &root.not_in_force {
                    let _ = writeln!(out, "    NOT IN FORCE: {why}");
                }
                let width = rules.iter().map(|r| r.subject.len()).max().unwrap_or(0);
                // By owner, each in precedence order (the rules' own order).
                let mut owners: Vec<Option<&str>> = Vec::new();
                for r in &rules {
                    if !owners.contains(&r.owner.as_deref()) {
                        owners.push(r.owner.as_deref());
                    }
                }
                owners.sort_by_key(|o| (o.is_none(), *o));
                for owner in owners {
                    let _ = writeln!(
                        out,
                        "    owner {}",
                        owner.unwrap_or("unknown (no annotation)")
                    );
                    for rule in rules.iter().filter(|r| r.owner.as_deref() == owner) {
                        let mut line = format!(
                            "      {:<width$} {:<9} {}",
                            rule.subject,
                            rule.priority
                                .map(|p| format!("pref {p}"))
                                .unwrap_or_else(|| "nft mark".into()),
                            shape(rule)
                        );
                        if let Some(n) = now(rule) {
                            line.push_str("; ");
                            line.push_str(&n);
                        }
                        let _ = writeln!(
                            out,
                            "{line}; {}",
                            counters_text(&rule.stats, rule.recent_drops)
                        );
                        if !rule.clients.is_empty() {
                            let what = if rule.subject.starts_with("inbound") {
                                "listener"
                            } else {
                                "client addresses"
                            };
                            let _ = writeln!(out, "        {what}: {}", rule.clients.join(", "));
                        }
                        if !rule.listeners.is_empty() {
                            let _ = writeln!(
                                out,
                                "        scope: runtime listeners {}",
                                rule.listeners.join(", ")
                            );
                        }
                        if let Some(d) = &rule.scope_drift {
                            let _ = writeln!(out, "        scope: stale: {d}");
                        }
                        if let Some(t) = &rule.user_traffic {
                            let _ = writeln!(out, "        user traffic (StatsService): {t}");
                        }
                    }
                }
                if own_root {
                    for f in &root.unrecognised {
                        let _ = writeln!(out, "    not raylimit's: {f}");
                    }
                }
            }
        }
    }
    if s.drift.is_empty() {
        out.push_str("Drift: none (the kernel holds what raylimit recorded).\n");
        return out;
    }
    let _ = writeln!(
        out,
        "Drift: {} difference(s) between the kernel and raylimit's records:",
        s.drift.len()
    );
    for d in &s.drift {
        let owner = d
            .owner
            .as_deref()
            .map(|o| format!(" (owner {o})"))
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "  {} {} {}{owner}: {}",
            d.device, d.direction, d.subject, d.problem
        );
        for r in repairs(d, netns) {
            let _ = writeln!(out, "    repair: {r}");
        }
    }
    out
}

fn root_json<'a>(r: &'a Root, netns: Option<&'a str>) -> RootJson<'a> {
    RootJson {
        backlog_bytes: r.stats.backlog,
        bytes: r.stats.bytes,
        device: &r.device,
        direction: r.direction,
        drops: r.stats.drops,
        netns,
        not_in_force: r.not_in_force.as_deref(),
        orphan_classes: r.orphan_classes.iter().map(|c| c.to_string()).collect(),
        packets: r.stats.packets,
        root_handle: shaping::root_handle().to_string(),
        rules: r
            .rules
            .iter()
            .map(|x| RuleJson {
                backlog_bytes: x.stats.backlog,
                bytes: x.stats.bytes,
                class_id: x.class.map(|c| c.to_string()),
                clients: &x.clients,
                direction: x.direction,
                drops: x.stats.drops,
                leaf: x.leaf.as_deref(),
                leaf_queue_bytes: x.leaf_queue_bytes,
                listeners: &x.listeners,
                owner: x.owner.as_deref(),
                packets: x.stats.packets,
                priority: x.priority,
                rate_bytes_per_second: x.rate,
                scope_drift: x.scope_drift.as_deref(),
                subject: &x.subject,
                throughput_bytes_per_second: x.throughput,
                unlimited: x.class.is_some_and(|c| c.minor() == 0),
                user_traffic: x.user_traffic.as_deref(),
            })
            .collect(),
        shaped_device: &r.shaped_device,
        unrecognised_filters: &r.unrecognised,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prometheus_label_values_escape_what_the_format_reserves() {
        assert_eq!(
            label("host:/usr/bin/xray config=/etc/x.json"),
            "host:/usr/bin/xray config=/etc/x.json"
        );
        assert_eq!(label("a\\b\"c\nd"), "a\\\\b\\\"c\\nd");
    }
}

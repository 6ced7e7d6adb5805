//! `raylimit status`, rendered: every managed root with its rules, owners and live counters.

use std::fmt::Write as _;

use serde_json::{json, Value};

use crate::engine::status::{self, Root};
use crate::model::nft::{self, NftState};
use crate::netlink::NetlinkError;
use crate::shaping;

/// Reads and renders the status: of the namespace `--netns` names, or else of the current one
/// and of every namespace the owner annotations name (limits made with `--netns` live there);
/// `device` narrows it to one device.
pub fn run(
    netns: Option<&str>,
    device: Option<&str>,
    json_out: bool,
) -> Result<String, NetlinkError> {
    let namespaces: Vec<Option<String>> = match netns {
        Some(n) => vec![Some(n.to_string())],
        None => std::iter::once(None)
            .chain(status::annotated_namespaces().into_iter().map(Some))
            .collect(),
    };
    let mut read = Vec::new();
    let mut missing_device = None;
    for ns in &namespaces {
        match status::read(ns.as_deref(), device) {
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
    Ok(if json_out {
        let roots: Vec<Value> = read
            .iter()
            .flat_map(|(ns, s)| {
                s.roots.iter().map(move |r| {
                    let mut v = root_json(r);
                    v["netns"] = json!(ns);
                    v
                })
            })
            .collect();
        let spaces: Vec<Value> = read
            .iter()
            .map(|(ns, s)| json!({"netns": ns, "nft": nft_json(&s.nft)}))
            .collect();
        let nft = read
            .first()
            .map(|(_, s)| nft_json(&s.nft))
            .unwrap_or(Value::Null);
        format!(
            "{}\n",
            serde_json::to_string_pretty(
                &json!({"roots": roots, "nft": nft, "namespaces": spaces})
            )
            .unwrap_or_default()
        )
    } else {
        let mut out = String::new();
        let any = read.iter().any(|(_, s)| !s.roots.is_empty());
        for (ns, s) in &read {
            let shown = !s.roots.is_empty() || s.nft.as_ref().is_ok_and(|n| n.table);
            match ns {
                // Asked for by name: shown as the current one would be.
                Some(_) if netns.is_some() => {}
                Some(name) if shown => {
                    let _ = writeln!(out, "network namespace {name} (raylimit --netns {name}):");
                }
                Some(_) => continue,
                None => {}
            }
            if !s.roots.is_empty() || !any {
                out.push_str(&text(&s.roots));
            }
            nft_text(&mut out, &s.nft);
        }
        out
    })
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

fn text(roots: &[Root]) -> String {
    let mut s = String::new();
    if roots.is_empty() {
        s.push_str("No managed limits.\n");
        return s;
    }
    for r in roots {
        let _ = writeln!(
            s,
            "{} {}: root {} on {} (sent {} bytes, {} packets, {} dropped)",
            r.device,
            r.direction,
            shaping::root_handle(),
            r.shaped_device,
            r.bytes,
            r.packets,
            r.drops
        );
        for rule in &r.rules {
            let shape = match (rule.class, rule.rate) {
                (Some(c), Some(rate)) => format!(
                    "class {c} rate {rate} bytes/s ({})",
                    crate::policy::human_rate(rate)
                ),
                (Some(c), None) if c.minor() == 0 => "unlimited (HTB direct queue)".to_string(),
                (Some(c), None) => format!("class {c} (missing)"),
                (None, _) => "no class".to_string(),
            };
            let _ = writeln!(
                s,
                "  {:<28} {:<9} {shape}; sent {} bytes, {} packets, {} dropped; owner {}",
                rule.subject,
                rule.priority
                    .map(|p| format!("pref {p}"))
                    .unwrap_or_else(|| "nft mark".into()),
                rule.bytes,
                rule.packets,
                rule.drops,
                rule.owner.as_deref().unwrap_or("unknown")
            );
            if !rule.clients.is_empty() {
                let _ = writeln!(s, "    clients: {}", rule.clients.join(", "));
            }
            if !rule.listeners.is_empty() {
                let _ = writeln!(
                    s,
                    "    scope: runtime listeners {}",
                    rule.listeners.join(", ")
                );
            }
            if let Some(d) = &rule.scope_drift {
                let _ = writeln!(s, "    scope: stale: {d}");
            }
            if let Some(t) = &rule.user_traffic {
                let _ = writeln!(s, "    user traffic (StatsService): {t}");
            }
        }
        for c in &r.orphan_classes {
            let _ = writeln!(s, "  class {c} has no filter (orphan)");
        }
        for f in &r.unrecognised {
            let _ = writeln!(s, "  not raylimit's: {f}");
        }
    }
    s
}

fn root_json(r: &Root) -> Value {
    json!({
        "device": r.device,
        "direction": r.direction,
        "shaped_device": r.shaped_device,
        "root_handle": shaping::root_handle().to_string(),
        "bytes": r.bytes, "packets": r.packets, "drops": r.drops,
        "rules": r.rules.iter().map(|x| json!({
            "subject": x.subject,
            "clients": x.clients,
            "listeners": x.listeners,
            "user_traffic": x.user_traffic,
            "scope_drift": x.scope_drift,
            "priority": x.priority,
            "class_id": x.class.map(|c| c.to_string()),
            "unlimited": x.class.is_some_and(|c| c.minor() == 0),
            "rate_bytes_per_second": x.rate,
            "bytes": x.bytes, "packets": x.packets, "drops": x.drops,
            "owner": x.owner,
        })).collect::<Vec<_>>(),
        "orphan_classes": r.orphan_classes.iter().map(|c| c.to_string()).collect::<Vec<_>>(),
        "unrecognised_filters": r.unrecognised,
    })
}

//! `raylimit discover` and `raylimit inspect`: the runtimes on this host, and for the selected
//! ones, their config and what a limit on each inbound and outbound could match.

use std::fmt::Write as _;
use std::net::IpAddr;

use clap::Args;
use serde_json::{json, Value};

use super::{Failure, Format, UsageError};
use crate::engine::{self, inspect::Inspected};
use crate::evidence::Evidence;
use crate::runtime::{self, Discovery, Options, Runtime, Selection};
use crate::xray::config::{Listen, Mark, Port};
use crate::xray::verdict::{self, ApiView, Endpoint};
use crate::xray::Loaded;

#[derive(Args, Debug)]
pub struct InspectArgs {
    #[command(flatten)]
    pub runtime: super::limit::RuntimeArgs,
    /// Inspect every runtime the selection matches (without it, a selection must match one).
    #[arg(long)]
    pub all: bool,
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub format: Format,
}

/// Exit code for a discovery: 1 when a provider failed outright.
fn exit_code(d: &Discovery) -> i32 {
    if d.issues.iter().any(|i| i.fatal()) {
        1
    } else {
        0
    }
}

fn issues_text(out: &mut String, d: &Discovery) {
    if d.issues.is_empty() {
        return;
    }
    let _ = writeln!(out, "\nProvider issues:");
    for i in &d.issues {
        let _ = writeln!(
            out,
            "- {} ({}): {} [{}]",
            i.provider,
            i.source.name(),
            i.message,
            i.code
        );
    }
}

fn summary_text(out: &mut String, n: usize, r: &Runtime) {
    let _ = writeln!(out, "  {n}. {}", r.name);
    let _ = writeln!(out, "     source: {}", r.source.name());
    let _ = writeln!(out, "     binary: {}", r.binary);
    if let Some(p) = &r.process {
        let started = match p.started_at() {
            Some(date) => format!("started {date}"),
            None => format!("start time {} ticks after boot", p.start_time),
        };
        let _ = writeln!(out, "     pid: {} ({started})", p.pid);
        let _ = writeln!(out, "     executable: {}", p.exe);
        let _ = writeln!(out, "     command: {}", p.args.join(" "));
        if let Some(cwd) = &p.cwd {
            let _ = writeln!(out, "     working directory: {cwd}");
        }
    }
    if let Some(c) = &r.container {
        let _ = writeln!(
            out,
            "     container: {} ({}), image {}, {}",
            c.name,
            &c.id[..c.id.len().min(12)],
            c.image,
            if c.status.is_empty() {
                &c.state
            } else {
                &c.status
            }
        );
    } else if let Some(id) = r.container_id() {
        let _ = writeln!(out, "     container id (from cgroup): {id}");
    }
    if let Some(n) = &r.netns {
        let _ = writeln!(out, "     network namespace: {}", n.describe());
    }
    match &r.config {
        Some(l) => {
            let _ = writeln!(out, "     config ({}):", l.origin.describe());
            for f in &l.files {
                let _ = writeln!(out, "       {f}");
            }
        }
        None => {
            let _ = writeln!(out, "     config: unknown (the process is not visible)");
        }
    }
    let _ = writeln!(out, "     owner: {}", r.owner());
}

pub fn discover(format: Format) -> i32 {
    let d = runtime::discover(&Options::from_env(&Selection::default()));
    match format {
        Format::Json => println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "targets": d.runtimes.iter().map(Runtime::to_json).collect::<Vec<_>>(),
                "provider_errors": d.issues.iter().map(|i| i.to_json()).collect::<Vec<_>>(),
            }))
            .unwrap_or_default()
        ),
        Format::Text => {
            let mut out = String::new();
            match d.runtimes.len() {
                0 => out.push_str("No Xray or V2Ray runtime found.\n"),
                1 => out.push_str("Found 1 runtime.\n\nTargets:\n"),
                n => {
                    let _ = write!(out, "Found {n} runtimes.\n\nTargets:\n");
                }
            }
            for (i, r) in d.runtimes.iter().enumerate() {
                summary_text(&mut out, i + 1, r);
            }
            issues_text(&mut out, &d);
            print!("{out}");
        }
    }
    exit_code(&d)
}

pub fn inspect(a: &InspectArgs) -> i32 {
    let sel = match super::limit::parse_selection(
        &a.runtime.pid,
        &a.runtime.name,
        &a.runtime.container,
        a.runtime.source.as_deref(),
        false,
    ) {
        Ok(s) => s,
        Err(UsageError(m)) => return super::fail(a.format, Failure::Usage, m),
    };
    let d = runtime::discover(&Options::from_env(&sel));
    let matched: Vec<&Runtime> = d
        .runtimes
        .iter()
        .filter(|r| runtime::matches(&sel, r))
        .collect();
    if matched.is_empty() {
        if sel.is_empty() {
            print_empty(a.format, &d, "No Xray or V2Ray runtime found.", None);
            return exit_code(&d);
        }
        let error = "no Xray or V2Ray runtime matches the selection";
        print_empty(
            a.format,
            &d,
            "No Xray or V2Ray runtime matches the selection.",
            Some((Failure::Refused, error)),
        );
        eprintln!("raylimit: {error}");
        return Failure::Refused.exit_code();
    }
    if matched.len() > 1 && !sel.is_empty() && !a.all {
        let names: Vec<String> = matched.iter().map(|r| r.describe()).collect();
        let message = format!(
            "{} runtimes match the selection ({}); narrow it down, or give --all to inspect them all",
            matched.len(),
            names.join("; ")
        );
        return super::fail(a.format, Failure::Refused, message);
    }
    let inspected: Vec<Inspected> = matched.into_iter().map(engine::inspect::inspect).collect();
    match a.format {
        Format::Json => println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "targets": inspected.iter().map(inspected_json).collect::<Vec<_>>(),
                "provider_errors": d.issues.iter().map(|i| i.to_json()).collect::<Vec<_>>(),
            }))
            .unwrap_or_default()
        ),
        Format::Text => {
            let mut out = String::new();
            let n = inspected.len();
            let _ = write!(
                out,
                "Inspected {n} runtime{}.\n\nTargets:\n",
                if n == 1 { "" } else { "s" }
            );
            for (i, x) in inspected.iter().enumerate() {
                summary_text(&mut out, i + 1, x.runtime);
                inspected_text(&mut out, x);
            }
            issues_text(&mut out, &d);
            print!("{out}");
        }
    }
    exit_code(&d)
}

/// No runtime to list; `error`, when that is an error, goes into the JSON report.
fn print_empty(format: Format, d: &Discovery, message: &str, error: Option<(Failure, &str)>) {
    match format {
        Format::Json => {
            let mut v = json!({
                "targets": [],
                "provider_errors": d.issues.iter().map(|i| i.to_json()).collect::<Vec<_>>(),
            });
            if let Some((kind, error)) = error {
                v["error"] = kind.json(error);
            }
            println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default())
        }
        Format::Text => {
            let mut out = format!("{message}\n");
            issues_text(&mut out, d);
            print!("{out}");
        }
    }
}

fn listen_text(l: &Listen) -> String {
    match l {
        Listen::Unspecified => "(every address)".into(),
        Listen::Ip(IpAddr::V6(a)) => format!("[{a}]"),
        Listen::Ip(a) => a.to_string(),
        Listen::Unix(p) => format!("unix:{p}"),
        Listen::Name(n) => n.clone(),
    }
}

fn port_text(p: &Port) -> String {
    match p {
        Port::Missing => "-".into(),
        Port::Single(p) => p.to_string(),
        Port::Ranges(r) => crate::xray::config::ranges_text(r),
        Port::Invalid(why) => format!("invalid ({why})"),
    }
}

/// Where the API can be reached from the host's own network namespace.
fn reachable(r: &Runtime, api: &ApiView) -> Result<Vec<String>, String> {
    let tcp: Vec<&Endpoint> = api
        .endpoints
        .iter()
        .filter(|e| e.port.is_some() && !matches!(e.listen, Listen::Unix(_)))
        .collect();
    if tcp.is_empty() {
        return Err("no TCP API endpoint".into());
    }
    let host_ip = |l: &Listen| match l {
        Listen::Unspecified => "127.0.0.1".to_string(),
        Listen::Ip(ip) if ip.is_unspecified() => {
            if ip.is_ipv6() {
                "[::1]".into()
            } else {
                "127.0.0.1".into()
            }
        }
        Listen::Ip(IpAddr::V6(a)) => format!("[{a}]"),
        Listen::Ip(a) => a.to_string(),
        Listen::Name(n) => n.clone(),
        Listen::Unix(p) => p.clone(),
    };
    let in_host_netns = r.netns.as_ref().is_none_or(|n| n.host);
    if in_host_netns {
        return Ok(tcp
            .iter()
            .map(|e| format!("{}:{}", host_ip(&e.listen), e.port.unwrap_or(0)))
            .collect());
    }
    let Some(c) = &r.container else {
        return Err(format!(
            "only inside network namespace {}",
            r.netns.as_ref().map(|n| n.describe()).unwrap_or_default()
        ));
    };
    let mut out = Vec::new();
    for e in tcp {
        let loopback = matches!(&e.listen, Listen::Ip(ip) if ip.is_loopback());
        for p in c
            .ports
            .iter()
            .filter(|p| Some(p.container_port) == e.port && p.protocol == "tcp")
        {
            if loopback {
                continue; // a published port cannot reach the container's loopback
            }
            let ip = match p.host_ip.as_str() {
                "" | "0.0.0.0" => "127.0.0.1".to_string(),
                "::" | "[::]" => "[::1]".to_string(),
                other => other.to_string(),
            };
            out.push(format!(
                "{ip}:{} (published port of {})",
                p.host_port,
                e.address()
            ));
        }
    }
    if out.is_empty() {
        return Err(format!(
            "only inside container {}'s network namespace (no published port reaches it)",
            c.name
        ));
    }
    Ok(out)
}

fn verdict_json<T>(v: &Result<T, String>, describe: impl Fn(&T) -> (String, Vec<String>)) -> Value {
    match v {
        Ok(s) => {
            let (selector, notes) = describe(s);
            json!({"concrete": true, "selector": selector, "notes": notes})
        }
        Err(why) => json!({"concrete": false, "blocked": why}),
    }
}

fn inbound_verdict(cfg: &Loaded, tag: &str) -> Result<verdict::Listener, String> {
    if tag.is_empty() {
        return Err("the inbound has no tag, and a limit names its inbound by tag".into());
    }
    verdict::inbound(cfg, tag)
}

fn outbound_verdict(cfg: &Loaded, tag: &str) -> Result<verdict::SocketMark, String> {
    if tag.is_empty() {
        return Err("the outbound has no tag, and a limit names its outbound by tag".into());
    }
    verdict::outbound(cfg, tag)
}

fn inspected_json(x: &Inspected) -> Value {
    let mut v = x.runtime.to_json();
    let cfg = match &x.config {
        Ok(c) => c,
        Err(why) => {
            v["config"] = json!({"readable": false, "reason": why});
            v["api_capability"] = json!({"status": "unknown", "reason": why});
            return v;
        }
    };
    v["config"] = json!({
        "origin": cfg.located.origin.describe(),
        "files": cfg.files.iter().map(|f| {
            let mut j = json!({"path": f.path, "status": f.status.name()});
            if f.status != crate::xray::FileStatus::Read {
                j["reason"] = json!(f.status.describe());
            }
            j
        }).collect::<Vec<_>>(),
    });
    let api = verdict::api(cfg);
    v["api_capability"] = json!({
        "status": api.status.name(), "reason": api.reason, "tag": api.tag, "services": api.services,
    });
    v["api_endpoints"] = json!(api
        .endpoints
        .iter()
        .map(|e| json!({
            "name": e.name, "via": e.via,
            "network": if matches!(e.listen, Listen::Unix(_)) { "unix" } else { "tcp" },
            "address": e.address(),
        }))
        .collect::<Vec<_>>());
    match reachable(x.runtime, &api) {
        Ok(list) => v["reachable_api_endpoints"] = json!(list),
        Err(why) => v["api_reachability"] = json!(why),
    }
    v["inbounds"] = json!(cfg.merged.inbounds.iter().map(|i| json!({
        "tag": i.tag, "protocol": i.protocol, "listen": listen_text(&i.listen), "port": port_text(&i.port),
        "transport": i.transport,
        "network": i.l4.as_ref().map(|l| l.iter().map(|p| p.name()).collect::<Vec<_>>()).unwrap_or_default(),
        "users": i.users.iter().map(|u| json!({"email": u.email, "id": u.id})).collect::<Vec<_>>(),
        "file": i.file,
        "limit": verdict_json(&inbound_verdict(cfg, &i.tag), |l| (l.describe(), l.notes.clone())),
    })).collect::<Vec<_>>());
    v["outbounds"] = json!(cfg.merged.outbounds.iter().map(|o| json!({
        "tag": o.tag, "protocol": o.protocol,
        "mark": match o.mark { Mark::Set(m) => json!(m), _ => Value::Null },
        "proxy_tag": o.proxy_tag, "dialer_proxy": o.dialer_proxy, "file": o.file,
        "limit": verdict_json(&outbound_verdict(cfg, &o.tag), |m| (m.describe(), m.notes.clone())),
    })).collect::<Vec<_>>());
    if let Some(s) = &x.scope {
        v["scope"] = s.to_json();
    }
    if let Some(e) = &x.sessions {
        v["sessions"] = e.to_json();
    }
    v
}

/// Live sessions: connections, users and their byte counters.
fn sessions_text(out: &mut String, e: &Evidence) {
    let _ = writeln!(out, "     live sessions: {}: {}", e.state.name(), e.reason);
    for s in &e.sources {
        let _ = writeln!(out, "       source: {s}");
    }
    for c in &e.connections {
        let _ = writeln!(
            out,
            "       - {} -> {} (inbound {}){}{}",
            c.client,
            c.local,
            c.inbound,
            c.user
                .as_ref()
                .map(|u| format!(", user {u} via {}", c.user_source.unwrap_or("?")))
                .unwrap_or_default(),
            c.accepted
                .as_ref()
                .map(|t| format!(", accepted {t}"))
                .unwrap_or_default()
        );
    }
    let _ = writeln!(
        out,
        "     user attribution: {}: {}",
        e.attribution.name(),
        e.attribution_reason
    );
    for u in &e.users {
        let ips: Vec<String> = u.ips.iter().map(|i| i.to_string()).collect();
        let _ = writeln!(
            out,
            "       - {}: {} ({}){}",
            if u.email.is_empty() {
                &u.uuid
            } else {
                &u.email
            },
            u.state.name(),
            u.reason,
            if ips.is_empty() {
                String::new()
            } else {
                format!(": {}", ips.join(", "))
            }
        );
    }
    match &e.traffic {
        Ok(t) if !t.is_empty() => {
            let _ = writeln!(out, "     user traffic (StatsService):");
            for u in t {
                let _ = writeln!(
                    out,
                    "       - {}: uplink {} bytes, downlink {} bytes",
                    u.email,
                    u.uplink.unwrap_or(0),
                    u.downlink.unwrap_or(0)
                );
            }
        }
        Ok(_) => {
            let _ = writeln!(
                out,
                "     user traffic (StatsService): no user counter yet (they appear with a user's first connection)"
            );
        }
        Err(why) => {
            let _ = writeln!(out, "     user traffic: unavailable: {why}");
        }
    }
}

fn verdict_text<T>(
    out: &mut String,
    v: &Result<T, String>,
    describe: impl Fn(&T) -> (String, Vec<String>),
) {
    match v {
        Ok(s) => {
            let (selector, notes) = describe(s);
            let _ = writeln!(out, "         limit: concrete: {selector}");
            for n in notes {
                let _ = writeln!(out, "           note: {n}");
            }
        }
        Err(why) => {
            let _ = writeln!(out, "         limit: blocked: {why}");
        }
    }
}

fn inspected_text(out: &mut String, x: &Inspected) {
    let cfg = match &x.config {
        Ok(c) => c,
        Err(why) => {
            let _ = writeln!(out, "     config files: none read: {why}");
            return;
        }
    };
    let _ = writeln!(out, "     config files:");
    for f in &cfg.files {
        let _ = writeln!(out, "       {}: {}", f.path, f.status.describe());
    }
    let api = verdict::api(cfg);
    let _ = writeln!(out, "     api: {}: {}", api.status.name(), api.reason);
    if !api.services.is_empty() {
        let _ = writeln!(out, "       services: {}", api.services.join(", "));
    }
    for e in &api.endpoints {
        let _ = writeln!(
            out,
            "       endpoint: {} {} (via {})",
            e.name,
            e.address(),
            e.via
        );
    }
    if !api.endpoints.is_empty() {
        match reachable(x.runtime, &api) {
            Ok(list) => {
                for r in list {
                    let _ = writeln!(out, "       from the host: {r}");
                }
            }
            Err(why) => {
                let _ = writeln!(out, "       from the host: {why}");
            }
        }
    }
    let _ = writeln!(out, "     inbounds:");
    if cfg.merged.inbounds.is_empty() {
        let _ = writeln!(out, "       (none)");
    }
    for i in &cfg.merged.inbounds {
        let net =
            i.l4.as_ref()
                .map(|l| l.iter().map(|p| p.name()).collect::<Vec<_>>().join("+"))
                .unwrap_or_else(|e| e.clone());
        let _ = writeln!(
            out,
            "       - {} ({}) on {} port {}, transport {} ({net})",
            if i.tag.is_empty() {
                "(untagged)"
            } else {
                &i.tag
            },
            i.protocol,
            listen_text(&i.listen),
            port_text(&i.port),
            i.transport
        );
        for u in &i.users {
            let _ = writeln!(
                out,
                "         user: {}{}",
                if u.email.is_empty() {
                    "(no email)"
                } else {
                    &u.email
                },
                if u.id.is_empty() {
                    String::new()
                } else {
                    format!(" {}", u.id)
                }
            );
        }
        verdict_text(out, &inbound_verdict(cfg, &i.tag), |l| {
            (l.describe(), l.notes.clone())
        });
    }
    let _ = writeln!(out, "     outbounds:");
    if cfg.merged.outbounds.is_empty() {
        let _ = writeln!(out, "       (none)");
    }
    for o in &cfg.merged.outbounds {
        let mut extra = String::new();
        if let Mark::Set(m) = o.mark {
            let _ = write!(extra, ", mark {m:#x}");
        }
        if let Some(t) = &o.proxy_tag {
            let _ = write!(extra, ", proxySettings.tag {t}");
        }
        if let Some(t) = &o.dialer_proxy {
            let _ = write!(extra, ", dialerProxy {t}");
        }
        let _ = writeln!(
            out,
            "       - {} ({}){extra}",
            if o.tag.is_empty() {
                "(untagged)"
            } else {
                &o.tag
            },
            o.protocol
        );
        verdict_text(out, &outbound_verdict(cfg, &o.tag), |m| {
            (m.describe(), m.notes.clone())
        });
    }
    if let Some(s) = &x.scope {
        let _ = writeln!(out, "     client-facing sockets: {}", s.describe());
    }
    if let Some(e) = &x.sessions {
        sessions_text(out, e);
    }
}

//! `limit --inbound TAG` and `limit --outbound TAG`: the runtime's config decides whether the
//! subject can be matched exactly, and the dry-run report says what would be built. Executing
//! these families comes with their kernel objects; until then `--execute` is refused, and the
//! report says so.

use std::fmt::Write as _;

use serde_json::{json, Value};

use super::limit::{Family, LimitArgs, Session, Tagged, Validated};
use super::report::{EvidenceView, LimitReport};
use super::Format;
use crate::netlink::{NetlinkError, RtSocket};
use crate::policy::Subject;
use crate::policy::{Direction, Want};
use crate::runtime::{self, Runtime};
use crate::shaping;
use crate::xray::config::L4;
use crate::xray::verdict;

/// A tagged subject the kernel can match exactly: the selector, its notes, and the kernel
/// match for the requested direction.
struct Concrete {
    selector: String,
    notes: Vec<String>,
    classify: String,
}

/// The evidence for a tagged subject, or why nothing exact can be matched.
fn evidence(rt: &Runtime, t: &Tagged, device: &str, ifindex: u32) -> Result<Concrete, String> {
    let cfg = rt.load_config()?;
    let ifb = shaping::ifb_name(ifindex);
    Ok(match t.family {
        Family::Inbound => {
            let l = verdict::inbound(&cfg, &t.tag)?;
            let l4: Vec<&str> = l.l4.iter().map(|p: &L4| p.name()).collect();
            // Client-facing leg: download leaves from the listener, upload arrives at it.
            let (port, addr, how) = match t.direction {
                Direction::Download => ("sport", "saddr", format!("packets leaving {device}")),
                Direction::Upload => (
                    "dport",
                    "daddr",
                    format!("packets arriving on {device}, redirected to {ifb}"),
                ),
            };
            let mut m = format!("{} {port} {}", l4.join("/"), l.port);
            if let Some(a) = l.address {
                let _ = write!(m, " and {addr} {a}");
            }
            Concrete {
                selector: l.describe(),
                notes: l.notes,
                classify: format!("match {m} ({how})"),
            }
        }
        Family::Outbound => {
            let m = verdict::outbound(&cfg, &t.tag)?;
            // Remote-facing leg: upload leaves with the socket's mark; download arrives and
            // carries the connection's mark only once restored.
            let classify = match t.direction {
                Direction::Upload => format!(
                    "match socket mark {:#x} on packets leaving {device}",
                    m.mark
                ),
                Direction::Download => format!(
                    "save mark {:#x} to the connection (nft output rule), restore it on packets arriving on {device} before the redirect to {ifb}, and match it there",
                    m.mark
                ),
            };
            Concrete {
                selector: m.describe(),
                notes: m.notes,
                classify,
            }
        }
    })
}

pub fn run(netns: Option<&str>, a: &LimitArgs, t: Tagged) -> i32 {
    let rt = match runtime::select(&t.selection) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("raylimit: {e}");
            return 1;
        }
    };
    let link = match RtSocket::open_in(netns).and_then(|mut s| s.link_by_name(&t.device)) {
        Ok(l) => l,
        Err(NetlinkError::NoSuchDevice(_)) => {
            eprintln!(
                "raylimit: no network device named {:?}{}",
                t.device,
                netns
                    .map(|n| format!(" in network namespace {n}"))
                    .unwrap_or_default()
            );
            return 2;
        }
        Err(e) => {
            eprintln!("raylimit: {e}");
            return 1;
        }
    };
    let ev = evidence(&rt, &t, &link.name, link.index);
    let family = t.family.name();
    let (kind, reason) = match (&t.want, &ev) {
        (Want::Remove, _) => (
            "remove",
            format!("remove the {family} limit on {:?}", t.tag),
        ),
        (_, Ok(c)) => ("apply", format!("the {family} is concrete: {}", c.selector)),
        (_, Err(_)) => (
            "apply",
            format!("the {family} is not concrete, so nothing exact can be built"),
        ),
    };
    let blocked = match &ev {
        Err(why) if t.want != Want::Remove => why.clone(),
        _ => format!(
            "executing {family} limits is not in this build yet; this dry-run shows what they will build"
        ),
    };
    let shaped = match t.direction {
        Direction::Download if t.family == Family::Inbound => link.name.clone(),
        Direction::Upload if t.family == Family::Outbound => link.name.clone(),
        _ => shaping::ifb_name(link.index),
    };
    let mut plan = Vec::new();
    if let Ok(Concrete { classify, .. }) = &ev {
        match t.want {
            Want::Limit(rate) => {
                plan.push(format!(
                    "HTB class for {family} {:?} at {rate} bytes/s under {} on {shaped}",
                    t.tag,
                    shaping::root_handle()
                ));
                plan.push(format!("{classify}, into that class"));
            }
            Want::Remove => plan.push(format!(
                "delete the class and the match of {family} {:?} on {shaped}",
                t.tag
            )),
            Want::Unlimited => {}
        }
    }
    let rate = match t.want {
        Want::Limit(r) => Some(r),
        _ => None,
    };
    match a.format {
        Format::Json => {
            let mut v = json!({
                "mode": if a.execute { "execute" } else { "dry-run" },
                "operation": if t.want == Want::Remove { "remove" } else { "limit" },
                "runtime": {"source": rt.source.name(), "owner": rt.owner(), "identity": {"name": rt.name},
                            "host_process": {"pid": rt.pid()}, "container_id": rt.container_id()},
                "target": {"kind": family, "value": t.tag},
                "scope": {"device": link.name, "ifindex": link.index, "direction": t.direction.name(),
                          "shaped_device": shaped},
                "evidence": match &ev {
                    Ok(c) => json!({"concrete": true, "selector": c.selector, "notes": c.notes}),
                    Err(why) => json!({"concrete": false, "blocked": why}),
                },
                "decision": {"kind": kind, "reason": reason},
                "execution_blocked": true,
                "execution_note": blocked,
                "plan": {"executable": false, "steps": plan},
                "results": Value::Array(Vec::new()),
                "per_ip_expansion": Value::Null,
                "outcome": "blocked",
            });
            if let Some(r) = rate {
                v["rate_bytes_per_second"] = json!(r);
            }
            println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        }
        Format::Text => {
            let mut s = String::new();
            let w = &mut s;
            let _ = writeln!(w, "Request:");
            let _ = writeln!(w, "Mode: {}", if a.execute { "execute" } else { "dry-run" });
            let _ = writeln!(
                w,
                "Operation: {}",
                if t.want == Want::Remove {
                    "remove"
                } else {
                    "limit"
                }
            );
            let _ = writeln!(w, "Runtime: {}", rt.describe());
            let _ = writeln!(w, "Owner: {}", rt.owner());
            let _ = writeln!(w, "Target: {family} {}", t.tag);
            let _ = writeln!(w, "\nRequested state:");
            let dir = t.direction.name();
            let _ = match rate {
                Some(r) => writeln!(w, "Requested limit: {dir} {r} bytes/s on {}", link.name),
                None => writeln!(w, "Requested removal: the {dir} rule on {}", link.name),
            };
            let _ = writeln!(w, "\nEvidence:");
            match &ev {
                Ok(c) => {
                    let _ = writeln!(w, "Selector: {}", c.selector);
                    for n in &c.notes {
                        let _ = writeln!(w, "Note: {n}");
                    }
                }
                Err(why) => {
                    let _ = writeln!(w, "Selector: none: {why}");
                }
            }
            let _ = writeln!(w, "\nDecision:\nKind: {kind}\nReason: {reason}");
            let _ = writeln!(w, "Execution blocked: yes: {blocked}");
            let _ = writeln!(w, "\nPlan (not executable in this build):");
            if plan.is_empty() {
                let _ = writeln!(w, "  (nothing exact to build)");
            }
            for (i, p) in plan.iter().enumerate() {
                let _ = writeln!(w, "  {}. {p}", i + 1);
            }
            let _ = writeln!(
                w,
                "\nExecution:\nOutcome: {}",
                if a.execute {
                    "blocked"
                } else {
                    "blocked (execute would refuse)"
                }
            );
            print!("{s}");
        }
    }
    if a.execute {
        eprintln!("raylimit: limit blocked: {blocked}");
        1
    } else {
        0
    }
}

/// `--inbound TAG`: the listener from the runtime's config, decided like any other subject.
pub fn inbound(session: &mut Session, v: &Validated) -> LimitReport {
    let Subject::Inbound { tag, .. } = &v.request.subject else {
        unreachable!("called for --inbound only")
    };
    let listener = session
        .runtime
        .load_config()
        .and_then(|cfg| verdict::inbound(&cfg, tag));
    let mut view = EvidenceView::default();
    let mut request = v.clone();
    let blocked = match &listener {
        Ok(l) => {
            let l4: Vec<&str> = l.l4.iter().map(|p: &L4| p.name()).collect();
            view.line("Selector", l.describe());
            view.line("Transports", l4.join(", "));
            for n in &l.notes {
                view.line("Note", n);
            }
            view.json = json!({"concrete": true, "selector": l.describe(), "notes": l.notes,
                               "address": l.address.map(|a| a.to_string()), "port": l.port});
            request.request.subject = Subject::Inbound {
                tag: tag.clone(),
                address: l.address,
                port: l.port,
            };
            None
        }
        Err(why) => {
            view.line("Selector", format!("none: {why}"));
            view.json = json!({"concrete": false, "blocked": why});
            // A removal finds the rule by its annotated class; nothing else is needed.
            (v.request.want != Want::Remove).then(|| why.clone())
        }
    };
    let mut report = session.one(&request, None, blocked);
    report.evidence = Some(view);
    report
}

//! How a resolution is shown in a report: the evidence and config lines each family read.

use std::fmt::Write as _;

use serde_json::{json, Value};

use crate::engine::resolve::Resolution;
use crate::evidence::Evidence;
use crate::xray::config::L4;

/// Evidence as a report shows it: labelled lines for text, a value for JSON.
#[derive(Debug, Clone, Default)]
pub struct EvidenceView {
    pub lines: Vec<(String, String)>,
    pub json: Value,
}

impl EvidenceView {
    pub fn line(&mut self, label: &str, value: impl Into<String>) {
        self.lines.push((label.to_string(), value.into()));
    }

    pub fn text(&self, w: &mut String) {
        let _ = writeln!(w, "\nEvidence:");
        for (label, value) in &self.lines {
            let _ = writeln!(w, "{label}: {value}");
        }
    }
}

/// The evidence section for a resolution; none when nothing was resolved.
pub fn view(resolution: &Resolution) -> Option<EvidenceView> {
    match resolution {
        Resolution::Direct => None,
        Resolution::NotNeeded(why) => Some(not_needed(why)),
        Resolution::User {
            evidence: ev,
            configured,
            user,
        } => {
            let mut v = evidence(ev);
            if let Some(u) = user.as_ref().filter(|_| *configured) {
                v.line("User", format!("{} ({})", u.email, u.uuid));
                v.line("User evidence state", u.state.name());
                v.line("User evidence", &u.reason);
                if let Some(src) = u.source {
                    v.line("User evidence source", src);
                }
                let ips: Vec<String> = u.ips.iter().map(|i| i.to_string()).collect();
                v.line(
                    "Live client IPs",
                    if ips.is_empty() {
                        "none".into()
                    } else {
                        ips.join(", ")
                    },
                );
                if !u.shared.is_empty() {
                    let shared: Vec<String> = u.shared.iter().map(|i| i.to_string()).collect();
                    v.line(
                        "Left out (shared with another live user)",
                        shared.join(", "),
                    );
                }
            }
            let counters = ev.traffic.as_ref().ok().and_then(|traffic| {
                traffic
                    .iter()
                    .find(|t| user.as_ref().is_some_and(|u| u.email == t.email))
            });
            if let Some(t) = counters {
                v.line(
                    "Traffic counters (StatsService)",
                    format!(
                        "uplink {} bytes, downlink {} bytes",
                        t.uplink.unwrap_or(0),
                        t.downlink.unwrap_or(0)
                    ),
                );
            }
            Some(v)
        }
        Resolution::Connection {
            evidence: ev,
            connection,
        } => {
            let mut v = evidence(ev);
            if let Some(c) = connection {
                v.line(
                    "Connection",
                    format!("{} -> {} (inbound {})", c.client, c.local, c.inbound),
                );
                if let Some(u) = &c.user {
                    v.line("Connection user", u);
                }
                if let Some(t) = &c.accepted {
                    v.line("Accepted", t);
                }
            }
            Some(v)
        }
        Resolution::Inbound(Ok(l)) => {
            let mut v = EvidenceView::default();
            let l4: Vec<&str> = l.l4.iter().map(|p: &L4| p.name()).collect();
            v.line("Selector", l.describe());
            v.line("Transports", l4.join(", "));
            for n in &l.notes {
                v.line("Note", n);
            }
            v.json = json!({"concrete": true, "selector": l.describe(), "notes": l.notes,
                            "address": l.address.map(|a| a.to_string()), "port": l.port});
            Some(v)
        }
        Resolution::Outbound { mask, mark: Ok(m) } => {
            let mut v = EvidenceView::default();
            v.line("Selector", m.describe());
            v.line("Mark mask", format!("{mask:#010x}"));
            for n in &m.notes {
                v.line("Note", n);
            }
            v.json = json!({"concrete": true, "selector": m.describe(), "mark": m.mark,
                            "mark_mask": mask, "notes": m.notes});
            Some(v)
        }
        Resolution::Inbound(Err(why)) | Resolution::Outbound { mark: Err(why), .. } => {
            let mut v = EvidenceView::default();
            v.line("Selector", format!("none: {why}"));
            v.json = json!({"concrete": false, "blocked": why});
            Some(v)
        }
    }
}

/// The evidence common to every family that reads it, as report lines.
pub fn evidence(ev: &Evidence) -> EvidenceView {
    let mut v = EvidenceView {
        json: ev.to_json(),
        ..Default::default()
    };
    v.line("Session evidence state", ev.state.name());
    v.line("Session evidence", &ev.reason);
    for s in &ev.sources {
        v.line("Source", s);
    }
    v.line("User attribution", ev.attribution.name());
    if !ev.attribution_reason.is_empty() {
        v.line("User attribution note", &ev.attribution_reason);
    }
    v
}

/// The evidence section of a request that needs none.
pub fn not_needed(why: &str) -> EvidenceView {
    let mut view = EvidenceView {
        json: json!({"state": "not_needed", "reason": why}),
        ..Default::default()
    };
    view.line("Session evidence", format!("not needed: {why}"));
    view
}

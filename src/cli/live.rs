//! The families that depend on who is connected now: `--ip all --ip-aggregation per_ip`,
//! `--uuid` and `--connection`. Each resolves its subject from live evidence, then decides like
//! any other subject.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use serde_json::json;

use super::limit::{Session, Validated};
use super::report::{EvidenceView, LimitReport, PerIpReport};
use crate::evidence::{self, Evidence, State};
use crate::policy::{Request, Subject, Want};

/// The set name per_ip rules are annotated with.
pub const PER_IP: &str = "per_ip";

/// The runtime's live evidence (config read first: the listeners and users come from it).
pub fn gather(session: &Session) -> Evidence {
    match session.runtime.load_config() {
        Ok(cfg) => evidence::gather(&session.runtime, &cfg, &evidence::Options::default()),
        Err(e) => Evidence::unavailable(format!("the runtime's config could not be read: {e}")),
    }
}

/// The evidence common to every family, as report lines.
fn view(ev: &Evidence) -> EvidenceView {
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

/// The evidence section of a removal, which needs none.
fn not_needed(why: &str) -> EvidenceView {
    let mut view = EvidenceView {
        json: json!({"state": "not_needed", "reason": why}),
        ..Default::default()
    };
    view.line("Session evidence", format!("not needed: {why}"));
    view
}

/// A live client address as a per_ip subject's request.
pub fn ip_request(v: &Validated, ip: IpAddr) -> Validated {
    let mut one = v.clone();
    one.request.subject = Subject::Ip(ip);
    one.per_ip = false;
    one.inbound = None;
    one
}

/// The runtime's per_ip set on the request's shaped device, and the addresses with an `--ip`
/// rule of their own (which per_ip leaves alone), as the annotations know them.
pub struct PerIpSet {
    pub managed: BTreeSet<IpAddr>,
    /// Addresses with their own rule, and its owner.
    explicit: BTreeMap<IpAddr, String>,
}

impl PerIpSet {
    pub fn read(session: &Session, request: &Request) -> Self {
        let shaped = session.shaped_device(request);
        let owner = session.runtime.owner();
        let netns = session.netns_key();
        let annotations = session.annotations();
        let ip_of = |subject: &str| subject.strip_prefix("ip ")?.parse::<IpAddr>().ok();
        PerIpSet {
            managed: annotations
                .in_set(netns, &shaped, &owner, PER_IP)
                .filter_map(|a| ip_of(&a.subject))
                .collect(),
            explicit: annotations
                .iter()
                .filter(|a| a.netns == netns && a.shaped_device == shaped && a.set.is_none())
                .filter_map(|a| Some((ip_of(&a.subject)?, a.owner.clone())))
                .collect(),
        }
    }

    /// The owner of the address's own `--ip` rule, if it has one.
    pub fn explicit_owner(&self, ip: IpAddr) -> Option<&str> {
        self.explicit.get(&ip).map(String::as_str)
    }
}

pub fn per_ip(session: &mut Session, v: &Validated) -> PerIpReport {
    let shaped = session.shaped_device(&v.request);
    let owner = session.runtime.owner();
    let set = PerIpSet::read(session, &v.request);
    let managed = &set.managed;
    let mut report = PerIpReport {
        execute: session.execute,
        request: v.request.clone(),
        runtime: session.runtime.clone(),
        evidence: EvidenceView::default(),
        provider: "sock_diag",
        state: "available",
        reconcile_state: if managed.is_empty() {
            "no_observed_managed_state"
        } else {
            "managed_set_known"
        },
        ips: Vec::new(),
        note: String::new(),
        targets: Vec::new(),
        skipped: Vec::new(),
        blocked: None,
    };
    if v.request.want == Want::Remove {
        // Every address of the set, departed clients included: the annotations know them all.
        report.provider = "owner_annotations";
        report.evidence = not_needed(
            "removal covers every client IP raylimit manages in this runtime's per_ip set",
        );
        report.ips = managed.iter().copied().collect();
        report.note = format!(
            "removing the {} client IP(s) of {owner}'s per_ip set on {shaped}{}",
            managed.len(),
            if v.inbound.is_some() {
                " (--inbound does not narrow a removal: the set is removed whole)"
            } else {
                ""
            }
        );
        for ip in managed.iter().copied() {
            report
                .targets
                .push(session.one(&ip_request(v, ip), Some(PER_IP), None));
        }
        return report;
    }
    let ev = gather(session);
    report.evidence = view(&ev);
    report.state = ev.state.name();
    if ev.state == State::Unavailable {
        report.reconcile_state = "unavailable_evidence";
        report.blocked = Some(format!(
            "per_ip needs the runtime's live client IPs, and they could not be read: {}",
            ev.reason
        ));
        report.note = "nothing was expanded".into();
        return report;
    }
    if let Some(tag) = &v.inbound {
        if !ev.connections.iter().any(|c| &c.inbound == tag)
            && !session.runtime.load_config().is_ok_and(|cfg| {
                evidence::client_listeners(&cfg)
                    .iter()
                    .any(|(t, _)| t == tag)
            })
        {
            report.reconcile_state = "unavailable_evidence";
            report.blocked = Some(format!(
                "--inbound {tag:?} is not a client listener of this runtime, so it cannot narrow the per_ip set"
            ));
            report.note = "nothing was expanded".into();
            return report;
        }
    }
    let live = ev.client_ips(v.inbound.as_deref());
    report.ips = live.iter().copied().collect();
    report.note = format!(
        "expanded into {} live client IP(s){} from the runtime's own sockets; each is decided on its own",
        live.len(),
        v.inbound
            .as_ref()
            .map(|t| format!(" of inbound {t}"))
            .unwrap_or_default()
    );
    for ip in &live {
        if set.explicit_owner(*ip) == Some(owner.as_str()) {
            report.skipped.push((
                *ip,
                "has its own --ip rule, which per_ip leaves as it is".into(),
            ));
            continue;
        }
        report
            .targets
            .push(session.one(&ip_request(v, *ip), Some(PER_IP), None));
    }
    for ip in managed.difference(&live) {
        report.skipped.push((
            *ip,
            "in the managed set but no longer connected; kept (watch drops departed clients after its grace period, --remove drops the set)".into(),
        ));
    }
    report
}

/// `--uuid ID`: the user's live client IPs into one class.
pub fn user(session: &mut Session, v: &Validated) -> LimitReport {
    let Subject::User { uuid: id, .. } = &v.request.subject else {
        unreachable!("called for --uuid only")
    };
    let cfg = session.runtime.load_config();
    // The stable key is the config's UUID, whether the operator gave it or the email.
    let configured = cfg.as_ref().ok().and_then(|c| {
        c.merged
            .inbounds
            .iter()
            .flat_map(|ib| ib.users.iter())
            .find(|u| (!u.id.is_empty() && u.id.eq_ignore_ascii_case(id)) || u.email == *id)
            .cloned()
    });
    let key = configured
        .as_ref()
        .map(|u| {
            if u.id.is_empty() {
                u.email.clone()
            } else {
                u.id.to_ascii_lowercase()
            }
        })
        .unwrap_or_else(|| id.to_ascii_lowercase());
    let mut request = v.clone();
    if v.request.want == Want::Remove {
        request.request.subject = Subject::User {
            uuid: key,
            ips: BTreeSet::new(),
        };
        let mut report = session.one(&request, None, None);
        report.evidence = Some(not_needed(
            "the user's rule is found by its class, whatever addresses it holds",
        ));
        return report;
    }
    let ev = match &cfg {
        Ok(c) => evidence::gather(&session.runtime, c, &evidence::Options::default()),
        Err(e) => Evidence::unavailable(format!("the runtime's config could not be read: {e}")),
    };
    let mut view = view(&ev);
    let found = ev.user(id).cloned();
    let blocked = match (&configured, &found) {
        (None, _) if cfg.is_ok() => Some(format!(
            "no user {id:?} (UUID or email) in the runtime's config"
        )),
        (None, _) => Some(ev.reason.clone()),
        (Some(_), None) => Some(ev.attribution_reason.clone()),
        (Some(_), Some(u)) => {
            view.line("User", format!("{} ({})", u.email, u.uuid));
            view.line("User evidence state", u.state.name());
            view.line("User evidence", &u.reason);
            if let Some(src) = u.source {
                view.line("User evidence source", src);
            }
            let ips: Vec<String> = u.ips.iter().map(|i| i.to_string()).collect();
            view.line(
                "Live client IPs",
                if ips.is_empty() {
                    "none".into()
                } else {
                    ips.join(", ")
                },
            );
            if !u.shared.is_empty() {
                let shared: Vec<String> = u.shared.iter().map(|i| i.to_string()).collect();
                view.line(
                    "Left out (shared with another live user)",
                    shared.join(", "),
                );
            }
            match u.state {
                State::Available => None,
                State::NoSessions if !u.shared.is_empty() => Some(format!(
                    "every live client IP of {} is shared with another live user, so none can be limited as theirs alone",
                    u.email
                )),
                State::NoSessions => Some(format!(
                    "{} has no live connection, so there is no client IP to limit",
                    u.email
                )),
                _ => Some(format!("the user's sessions cannot be attributed: {}", u.reason)),
            }
        }
    };
    if let Ok(traffic) = &ev.traffic {
        if let Some(t) = traffic
            .iter()
            .find(|t| found.as_ref().is_some_and(|u| u.email == t.email))
        {
            view.line(
                "Traffic counters (StatsService)",
                format!(
                    "uplink {} bytes, downlink {} bytes",
                    t.uplink.unwrap_or(0),
                    t.downlink.unwrap_or(0)
                ),
            );
        }
    }
    request.request.subject = Subject::User {
        uuid: key,
        ips: found.map(|u| u.ips).unwrap_or_default(),
    };
    let mut report = session.one(&request, None, blocked);
    report.evidence = Some(view);
    report
}

/// `--connection IP:PORT`: one live connection as one class.
pub fn connection(session: &mut Session, v: &Validated) -> LimitReport {
    let Subject::Connection(addr) = v.request.subject else {
        unreachable!("called for --connection only")
    };
    if v.request.want == Want::Remove {
        let mut report = session.one(v, None, None);
        report.evidence = Some(not_needed(
            "the rule is found by its address and port, even after the connection has gone",
        ));
        return report;
    }
    let ev = gather(session);
    let mut view = view(&ev);
    let blocked = if ev.state == State::Unavailable {
        Some(format!(
            "a connection limit needs the runtime's live sockets: {}",
            ev.reason
        ))
    } else {
        match ev.connection(addr) {
            Some(c) => {
                view.line(
                    "Connection",
                    format!("{} -> {} (inbound {})", c.client, c.local, c.inbound),
                );
                if let Some(u) = &c.user {
                    view.line("Connection user", u);
                }
                if let Some(t) = &c.accepted {
                    view.line("Accepted", t);
                }
                None
            }
            None => Some(format!(
                "{addr} is not a live client connection to an inbound listener of this runtime (raylimit inspect lists them)"
            )),
        }
    };
    let mut report = session.one(v, None, blocked);
    report.evidence = Some(view);
    report
}

//! The `limit` report: one value, rendered as text (sections an operator reads top to bottom) or
//! JSON (RayLimit's top-level names, so scripts keep working).

use std::fmt::Write as _;
use std::rc::Rc;

use serde::Serialize;
use serde_json::{json, Value};

use super::resolution::{self, EvidenceView};
use crate::engine::resolve::{PerIpExpansion, Staged};
use crate::engine::{
    Committed, Decided, Engine, Kernel, Outcome, RootSeen, ScopeUsed, Status, StepResult, Ticket,
};
use crate::model::Link;
use crate::policy::{Subject, Want, Wanted};
use crate::reconcile::Blocked;
use crate::runtime::Runtime;
use crate::shaping;

/// One limit decision as reported: the engine's result, with the run's context.
pub struct LimitReport {
    pub execute: bool,
    pub runtime: Rc<Runtime>,
    pub device: Link,
    pub decided: Decided,
    /// The live evidence or config the subject was resolved with.
    pub evidence: Option<EvidenceView>,
    /// The network namespace the run acted in (`--netns`), for commands that can be pasted.
    pub netns: Option<String>,
}

impl LimitReport {
    /// A step as the command that does the same by hand, in the run's namespace.
    fn command(&self, step: &crate::reconcile::plan::Step) -> String {
        in_netns(step.command(), self.netns.as_deref())
    }
}

/// `cmd` run in namespace `netns`: `tc -n NS ...`, `ip -n NS ...`, `ip netns exec NS nft ...`.
pub(super) fn in_netns(cmd: String, netns: Option<&str>) -> String {
    let Some(ns) = netns else {
        return cmd;
    };
    for tool in ["tc ", "ip "] {
        if let Some(rest) = cmd.strip_prefix(tool) {
            return format!("{tool}-n {ns} {rest}");
        }
    }
    // nft commands come as `nft ...; nft ...`: each runs in the namespace.
    format!("ip netns exec {ns} {cmd}").replace("; nft ", &format!("; ip netns exec {ns} nft "))
}

/// What the observation found of the subject's rule, in the terms of the request: for a
/// removal, whether there is one to remove; else whether it already matches.
fn rule_line(d: &crate::reconcile::Decision, removing: bool) -> String {
    match (removing, d.kind) {
        (true, crate::reconcile::DecisionKind::Remove) => {
            "Observed rule: present (it is removed)".into()
        }
        (true, _) => "Observed rule: absent".into(),
        (false, _) => format!("Matching rule: {}", if d.matched { "yes" } else { "no" }),
    }
}

/// The decision, and when execution is blocked, that nothing of it will run.
fn decision_text(d: &crate::reconcile::Decision) -> String {
    match d.blocked {
        Some(_) => format!("{} (blocked: nothing runs)", d.kind.name()),
        None => d.kind.name().to_string(),
    }
}

fn describe_root(root: &RootSeen, shaped_device: &str) -> String {
    match root {
        RootSeen::Unknown => "unknown".into(),
        RootSeen::Absent => format!("{shaped_device} does not exist yet"),
        RootSeen::Managed => {
            format!("managed root {} on {shaped_device}", shaping::root_handle())
        }
        RootSeen::Default(None) => format!("no root qdisc on {shaped_device}"),
        RootSeen::Default(Some(kind)) => format!("kernel default ({kind}) on {shaped_device}"),
        RootSeen::Foreign(desc) => format!("foreign root qdisc {desc} on {shaped_device}"),
    }
}

impl LimitReport {
    fn request(&self) -> &crate::policy::Request {
        &self.decided.request
    }

    pub fn outcome(&self) -> Outcome {
        self.decided.outcome
    }

    fn operation(&self) -> &'static str {
        if self.request().want == Want::Remove {
            "remove"
        } else {
            "limit"
        }
    }

    fn mode(&self) -> &'static str {
        if self.execute {
            "execute"
        } else {
            "dry-run"
        }
    }

    fn requested(&self) -> String {
        let r = self.request();
        let dir = r.direction.name();
        match r.want {
            Want::Limit(rate) => format!(
                "Requested limit: {dir} {rate} bytes/s on {} ({})",
                r.device,
                crate::policy::human_rate(rate)
            ),
            Want::Unlimited => {
                format!("Requested state: {dir} unlimited exception on {}", r.device)
            }
            Want::Remove => format!("Requested removal: the {dir} rule on {}", r.device),
        }
    }

    fn summary(&self) -> String {
        let ran = self
            .decided
            .execution
            .as_ref()
            .map(|e| {
                e.results
                    .iter()
                    .filter(|r| r.status != Status::NotRun)
                    .count()
            })
            .unwrap_or(0);
        match self.decided.outcome {
            Outcome::Blocked if self.execute => "No operations were run.".into(),
            Outcome::Blocked | Outcome::PlanReady => "No system changes were made.".into(),
            Outcome::NoChanges => {
                "The kernel already matches the request; nothing was changed.".into()
            }
            Outcome::Executed => format!("Executed {ran} operation(s)."),
            Outcome::Failed => {
                let rolled_back = self
                    .decided
                    .execution
                    .as_ref()
                    .is_some_and(|e| !e.rollback.is_empty());
                match self.decided.execution.as_ref() {
                    Some(e) if e.rollback_failed() => format!(
                        "Stopped after {ran} operation(s); undoing them also failed, so the kernel may differ from how it began (see Rollback)."
                    ),
                    _ if rolled_back => format!(
                        "Stopped after {ran} operation(s); the ones that had succeeded were undone, so the kernel is as it began."
                    ),
                    _ => "The first operation failed; nothing was changed.".into(),
                }
            }
        }
    }

    pub fn text(&self) -> String {
        let d = &self.decided.decision;
        let mut s = String::new();
        let w = &mut s;
        let _ = writeln!(w, "Request:");
        let _ = writeln!(w, "Mode: {}", self.mode());
        let _ = writeln!(w, "Operation: {}", self.operation());
        let _ = writeln!(w, "Runtime: {}", self.runtime.describe());
        let _ = writeln!(w, "Owner: {}", self.runtime.owner());
        let _ = writeln!(w, "Target: {}", self.request().subject);
        if self.request().subject == Subject::AllShared {
            let _ = writeln!(w, "IP aggregation: shared");
        }
        if let Some(scope) = &self.decided.scope {
            let _ = writeln!(w, "Scope: {}", scope_text(scope, &self.request().device));
        }
        let _ = writeln!(w, "\nRequested state:\n{}", self.requested());
        if let Some(e) = &self.evidence {
            e.text(w);
        }
        let _ = writeln!(w, "\nObservation:");
        let _ = writeln!(w, "Observed tc state: {}", d.observed_state);
        let _ = writeln!(
            w,
            "Shaped root: {}",
            describe_root(&self.decided.root, &self.decided.shaped_device)
        );
        let _ = writeln!(w, "{}", rule_line(d, self.request().want == Want::Remove));
        if let Some(c) = d.expected_class {
            let _ = writeln!(w, "Expected class ID: {c}");
        }
        if let Some(c) = d.observed_class {
            let _ = writeln!(w, "Observed class ID: {c}");
        }
        if let Some(r) = d.observed_rate {
            let _ = writeln!(
                w,
                "Observed rate: {r} bytes/s ({})",
                crate::policy::human_rate(r)
            );
        }
        if let Some(n) = &d.observation_note {
            let _ = writeln!(w, "Observation note: {n}");
        }
        let _ = writeln!(w, "\nDecision:");
        let _ = writeln!(w, "Reconcile decision: {}", decision_text(d));
        let _ = writeln!(w, "Decision reason: {}", d.reason);
        if !d.steps.is_empty() {
            let _ = writeln!(w, "\nPlan:");
            let _ = writeln!(w, "Planned action: {}", d.kind.name());
            if let Some(c) = d.expected_class.or(d.observed_class) {
                let _ = writeln!(w, "Class ID: {c}");
            }
            for f in &d.forms {
                let _ = writeln!(w, "Kernel form: {f}");
            }
            let _ = writeln!(w, "Planned operations:");
            for (i, step) in d.steps.iter().enumerate() {
                let _ = writeln!(w, "  {}. {}", i + 1, self.command(step));
            }
        }
        let _ = writeln!(w, "\nExecution:");
        if let Some(b) = &d.blocked {
            let _ = writeln!(
                w,
                "Execution status: {}",
                if self.execute {
                    "blocked"
                } else {
                    "blocked (--execute would refuse)"
                }
            );
            let _ = writeln!(w, "Execution note: {}", blocked_text(b));
        }
        match &self.decided.execution {
            Some(e) if !e.results.is_empty() => {
                if e.failed() {
                    let _ = writeln!(w, "Execution status: failed");
                }
                let _ = writeln!(w, "Execution results:");
                for (i, (s, r)) in d.steps.iter().zip(&e.results).enumerate() {
                    let _ = writeln!(w, "  {}. {}: {}", i + 1, s.name, r.status.name());
                    if let Some(err) = &r.error {
                        let _ = writeln!(w, "     error: {err}");
                    }
                    if let Some(warn) = &r.warning {
                        let _ = writeln!(w, "     kernel warning: {warn}");
                    }
                }
                if !e.rollback.is_empty() {
                    let _ = writeln!(w, "Rollback:");
                    for (i, r) in e.rollback.iter().enumerate() {
                        let _ = writeln!(
                            w,
                            "  {}. {}: {} ({})",
                            i + 1,
                            r.step,
                            r.result.status.name(),
                            r.command
                        );
                        if let Some(err) = &r.result.error {
                            let _ = writeln!(w, "     error: {err}");
                        }
                    }
                }
            }
            _ if !d.steps.is_empty() && self.decided.outcome != Outcome::Blocked => {
                let _ = writeln!(
                    w,
                    "Execution results: not run (dry-run): {} planned operation(s)",
                    d.steps.len()
                );
            }
            _ => {}
        }
        for warning in &self.decided.warnings {
            let _ = writeln!(w, "Warning: {warning}");
        }
        let outcome = match (self.decided.outcome, self.execute) {
            (Outcome::Blocked, false) => "blocked (execute would refuse)".to_string(),
            (o, _) => o.name().to_string(),
        };
        let _ = writeln!(w, "Outcome: {outcome}");
        let _ = writeln!(w, "{}", self.summary());
        s
    }

    pub fn json(&self) -> Value {
        let mut v = self.json_body();
        v["runtime"] = self.runtime_json();
        v
    }

    /// The report without its runtime block (a run of many reports gives it once).
    pub fn json_body(&self) -> Value {
        serde_json::to_value(self.body()).unwrap_or_default()
    }

    /// The report without its runtime block, as a value that serializes itself: `apply`
    /// writes thousands of them, and building each as a JSON tree first cost a third of a
    /// no-op run. Fields in alphabetical order, as a JSON object of them has always listed
    /// them.
    pub fn body(&self) -> BodyJson<'_> {
        let d = &self.decided.decision;
        let r = self.request();
        let commands: Vec<String> = d.steps.iter().map(|s| self.command(s)).collect();
        let scope = self.decided.scope.as_ref();
        BodyJson {
            decision: DecisionJson {
                kind: d.kind.name(),
                reason: &d.reason,
            },
            evidence: self.evidence.as_ref().map(|e| &e.json),
            execution_blocked: d.blocked.is_some(),
            execution_note: d.blocked.as_ref().map(blocked_text),
            mode: self.mode(),
            observation: ObservationJson {
                available: d.observed_state != "unavailable",
                error: d.observation_note.as_deref(),
                expected_class_id: d.expected_class.map(|c| c.to_string()),
                matched: d.matched,
                observed_class_id: d.observed_class.map(|c| c.to_string()),
                observed_rate_bytes_per_second: d.observed_rate,
                reconcilable: d.observed_state == "available",
                root: describe_root(&self.decided.root, &self.decided.shaped_device),
                state: d.observed_state,
            },
            operation: self.operation(),
            outcome: self.decided.outcome.name(),
            plan: (!d.steps.is_empty()).then(|| PlanJson {
                action: d.kind.name(),
                class_id: d.expected_class.or(d.observed_class).map(|c| c.to_string()),
                forms: &d.forms,
                steps: d
                    .steps
                    .iter()
                    .zip(&commands)
                    .map(|(s, c)| PlannedJson {
                        command: c.clone(),
                        name: &s.name,
                    })
                    .collect(),
            }),
            rate_bytes_per_second: match r.want {
                Want::Limit(rate) => Some(rate),
                _ => None,
            },
            results: match &self.decided.execution {
                Some(e) => d
                    .steps
                    .iter()
                    .zip(&commands)
                    .zip(&e.results)
                    .map(|((s, command), r)| result_json(&s.name, command.clone(), r))
                    .collect(),
                None => d
                    .steps
                    .iter()
                    .zip(commands)
                    .map(|(s, command)| ResultJson {
                        command,
                        error: None,
                        skipped: Some(true),
                        status: None,
                        step: &s.name,
                        warning: None,
                    })
                    .collect(),
            },
            rollback: self
                .decided
                .execution
                .as_ref()
                .filter(|e| !e.rollback.is_empty())
                .map(|e| {
                    e.rollback
                        .iter()
                        .map(|r| {
                            let command = in_netns(r.command.clone(), self.netns.as_deref());
                            result_json(&r.step, command, &r.result)
                        })
                        .collect()
                }),
            scope: ScopeJson {
                description: scope.map(|s| scope_text(s, &r.device)),
                device: &r.device,
                direction: r.direction.name(),
                ifindex: self.device.index,
                listeners: match scope {
                    Some(ScopeUsed::Runtime(endpoints)) => {
                        Some(endpoints.iter().map(|e| e.to_string()).collect())
                    }
                    _ => None,
                },
                match_: scope.map(|s| match s {
                    ScopeUsed::Device => "device",
                    ScopeUsed::Runtime(_) => "runtime_listeners",
                    ScopeUsed::ClientAddress => "client_address",
                    ScopeUsed::InboundListener => "inbound_listener",
                    ScopeUsed::SocketMark => "socket_mark",
                }),
                root_handle: shaping::root_handle().to_string(),
                shaped_device: &self.decided.shaped_device,
            },
            target: TargetJson {
                ip_aggregation: (r.subject == Subject::AllShared).then_some("shared"),
                kind: r.subject.kind(),
                value: r.subject.value(),
            },
            unlimited: (r.want == Want::Unlimited).then_some(true),
            warnings: (!self.decided.warnings.is_empty()).then(|| {
                self.decided
                    .warnings
                    .iter()
                    .map(|w| w.to_string())
                    .collect()
            }),
        }
    }

    pub fn runtime_json(&self) -> Value {
        let rt = &self.runtime;
        json!({
            "source": rt.source.name(),
            "owner": rt.owner(),
            "identity": {"name": rt.name},
            "host_process": {
                "pid": rt.pid(),
                "exe": rt.process.as_ref().map(|p| p.exe.as_str()),
                "config_paths": rt.config.as_ref().map(|l| &l.files),
            },
            "container_id": rt.container_id(),
        })
    }
}

/// Which packets a rule matches, in words.
fn scope_text(scope: &ScopeUsed, device: &str) -> String {
    match scope {
        ScopeUsed::Device => {
            format!(
                "device-wide (--scope device): every packet on {device}, whatever it belongs to"
            )
        }
        ScopeUsed::Runtime(endpoints) => {
            let list: Vec<String> = endpoints.iter().map(|e| e.to_string()).collect();
            format!("runtime listeners {}", list.join(", "))
        }
        ScopeUsed::ClientAddress => format!(
            "device-wide (--scope device): every packet to or from the client's address on {device}, whatever it belongs to"
        ),
        ScopeUsed::InboundListener => "the inbound's own listener".into(),
        ScopeUsed::SocketMark => "the outbound's socket mark".into(),
    }
}

/// Why a decision was blocked, in words that name the flag that changes it.
pub fn blocked_text(b: &Blocked) -> String {
    match b {
        Blocked::Unobserved(e) => format!(
            "real execution requires observed tc state; tc state could not be read ({e}); rerun with --allow-missing-tc-state to execute without observation"
        ),
        Blocked::NotComparable(note) => format!(
            "real execution requires comparable tc state; {note}; rerun with --allow-missing-tc-state to execute anyway (those filters are left alone)"
        ),
        Blocked::MaskConflict {
            device,
            mask,
            filter,
        } => format!(
            "the outbound band of {device} already reads marks under mask {mask:#010x} ({filter}), and one fw priority holds one mask; use the same --mark-mask for every outbound on a device"
        ),
        Blocked::Unscoped { device, why } => format!(
            "a client limit matches only the runtime's own traffic, and {why}; rerun with --scope device to match on {device} whatever the packets belong to"
        ),
        Blocked::Reason(text) => text.clone(),
    }
}

fn result_json<'a>(step: &'a str, command: String, r: &'a StepResult) -> ResultJson<'a> {
    ResultJson {
        command,
        error: r.error.as_deref(),
        skipped: None,
        status: Some(r.status.name()),
        step,
        warning: r.warning.as_deref(),
    }
}

/// One limit's report as JSON (see [`LimitReport::body`]).
#[derive(Serialize)]
pub struct BodyJson<'a> {
    decision: DecisionJson<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    evidence: Option<&'a Value>,
    execution_blocked: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    execution_note: Option<String>,
    mode: &'static str,
    observation: ObservationJson<'a>,
    operation: &'static str,
    outcome: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    plan: Option<PlanJson<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    rate_bytes_per_second: Option<u64>,
    results: Vec<ResultJson<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    rollback: Option<Vec<ResultJson<'a>>>,
    scope: ScopeJson<'a>,
    target: TargetJson,
    #[serde(skip_serializing_if = "Option::is_none")]
    unlimited: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    warnings: Option<Vec<String>>,
}

#[derive(Serialize)]
struct DecisionJson<'a> {
    kind: &'static str,
    reason: &'a str,
}

#[derive(Serialize)]
struct ObservationJson<'a> {
    available: bool,
    error: Option<&'a str>,
    expected_class_id: Option<String>,
    matched: bool,
    observed_class_id: Option<String>,
    observed_rate_bytes_per_second: Option<u64>,
    reconcilable: bool,
    root: String,
    state: &'static str,
}

#[derive(Serialize)]
struct PlanJson<'a> {
    action: &'static str,
    class_id: Option<String>,
    forms: &'a [String],
    steps: Vec<PlannedJson<'a>>,
}

#[derive(Serialize)]
struct PlannedJson<'a> {
    command: String,
    name: &'a str,
}

/// A step as run (`status`), or as planned and not run (`skipped`).
#[derive(Serialize)]
struct ResultJson<'a> {
    command: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    skipped: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    status: Option<&'static str>,
    step: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    warning: Option<&'a str>,
}

#[derive(Serialize)]
struct ScopeJson<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    description: Option<String>,
    device: &'a str,
    direction: &'static str,
    ifindex: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    listeners: Option<Vec<String>>,
    #[serde(rename = "match", skip_serializing_if = "Option::is_none")]
    match_: Option<&'static str>,
    root_handle: String,
    shaped_device: &'a str,
}

#[derive(Serialize)]
struct TargetJson {
    #[serde(skip_serializing_if = "Option::is_none")]
    ip_aggregation: Option<&'static str>,
    kind: &'static str,
    value: String,
}

/// `--ip all --ip-aggregation per_ip`: the live client set and one report per client IP.
pub struct PerIpReport {
    pub execute: bool,
    pub request: Wanted,
    pub runtime: Rc<Runtime>,
    pub evidence: EvidenceView,
    /// Where the client set came from, and how trustworthy it is.
    pub provider: &'static str,
    pub state: &'static str,
    pub reconcile_state: &'static str,
    /// The client IPs the request expanded into.
    pub ips: Vec<std::net::IpAddr>,
    pub note: String,
    pub targets: Vec<LimitReport>,
    /// Client IPs left alone, and why.
    pub skipped: Vec<(std::net::IpAddr, String)>,
    /// Why nothing could be expanded, when nothing could.
    pub blocked: Option<String>,
}

impl PerIpReport {
    fn new<K: Kernel>(
        engine: &Engine<K>,
        wanted: &Wanted,
        x: PerIpExpansion,
        targets: Vec<LimitReport>,
    ) -> Self {
        PerIpReport {
            execute: engine.execute,
            request: wanted.clone(),
            runtime: engine.runtime.clone(),
            evidence: match &x.evidence {
                Ok(ev) => resolution::evidence(ev),
                Err(why) => resolution::not_needed(why),
            },
            provider: x.provider,
            state: x.state,
            reconcile_state: x.reconcile_state,
            ips: x.ips,
            note: x.expansion.to_string(),
            targets,
            skipped: x
                .left_alone
                .into_iter()
                .map(|(ip, why)| (ip, why.to_string()))
                .collect(),
            blocked: x.blocked,
        }
    }

    fn runtime_json(&self) -> Value {
        match self.targets.first() {
            Some(t) => t.runtime_json(),
            None => json!({
                "source": self.runtime.source.name(),
                "owner": self.runtime.owner(),
                "identity": {"name": self.runtime.name},
                "host_process": {"pid": self.runtime.pid()},
            }),
        }
    }

    fn count(&self, kind: crate::reconcile::DecisionKind) -> usize {
        self.targets
            .iter()
            .filter(|t| t.decided.decision.kind == kind)
            .count()
    }

    fn summary(&self) -> String {
        use crate::reconcile::DecisionKind as K;
        format!(
            "{} no-op, {} apply, {} replace, {} remove",
            self.count(K::NoOp),
            self.count(K::Apply),
            self.count(K::Replace),
            self.count(K::Remove)
        )
    }

    pub fn outcome(&self) -> Outcome {
        if self.blocked.is_some()
            || self
                .targets
                .iter()
                .any(|t| t.decided.outcome == Outcome::Blocked)
        {
            return Outcome::Blocked;
        }
        if self
            .targets
            .iter()
            .any(|t| t.decided.outcome == Outcome::Failed)
        {
            return Outcome::Failed;
        }
        if self
            .targets
            .iter()
            .any(|t| t.decided.outcome == Outcome::Executed)
        {
            return Outcome::Executed;
        }
        if self
            .targets
            .iter()
            .any(|t| t.decided.outcome == Outcome::PlanReady)
        {
            return Outcome::PlanReady;
        }
        Outcome::NoChanges
    }

    pub fn text(&self) -> String {
        let mut s = String::new();
        let w = &mut s;
        let _ = writeln!(w, "Request:");
        let _ = writeln!(
            w,
            "Mode: {}",
            if self.execute { "execute" } else { "dry-run" }
        );
        let op = if self.request.want == Want::Remove {
            "remove"
        } else {
            "limit"
        };
        let _ = writeln!(w, "Operation: {op}");
        let _ = writeln!(w, "Runtime: {}", self.runtime.describe());
        let _ = writeln!(w, "Owner: {}", self.runtime.owner());
        let _ = writeln!(w, "Target: ip all");
        let _ = writeln!(w, "IP aggregation: per_ip");
        let _ = writeln!(w, "\nRequested state:\n{}", self.request.describe());
        self.evidence.text(w);
        let _ = writeln!(w, "\nPer-IP expansion:");
        let _ = writeln!(w, "Per-IP evidence provider: {}", self.provider);
        let _ = writeln!(w, "Per-IP evidence state: {}", self.state);
        let _ = writeln!(w, "Per-IP reconcile state: {}", self.reconcile_state);
        let _ = writeln!(w, "Visible client IPs: {}", self.ips.len());
        for (i, ip) in self.ips.iter().enumerate() {
            let _ = writeln!(w, "  {}. {ip}", i + 1);
        }
        let _ = writeln!(w, "Per-IP expansion note: {}", self.note);
        for (ip, why) in &self.skipped {
            let _ = writeln!(w, "Left alone: {ip}: {why}");
        }
        let _ = writeln!(w, "Decision summary: {}", self.summary());
        if !self.targets.is_empty() {
            let _ = writeln!(w, "Expanded targets:");
        }
        for (i, t) in self.targets.iter().enumerate() {
            let d = &t.decided.decision;
            let _ = writeln!(w, "  {}. {}", i + 1, t.request().subject);
            let _ = writeln!(w, "     Observed tc state: {}", d.observed_state);
            let _ = writeln!(w, "     Reconcile decision: {}", decision_text(d));
            let _ = writeln!(w, "     Decision reason: {}", d.reason);
            if let Some(c) = d.expected_class.or(d.observed_class) {
                let _ = writeln!(w, "     Class ID: {c}");
            }
            if let Some(b) = &d.blocked {
                let _ = writeln!(w, "     Execution note: {}", blocked_text(b));
            }
            if !d.steps.is_empty() {
                let _ = writeln!(w, "     Planned operations:");
                for (j, step) in d.steps.iter().enumerate() {
                    let _ = writeln!(w, "       {}. {}", j + 1, t.command(step));
                }
            }
            if let Some(e) = &t.decided.execution {
                for (s, r) in d.steps.iter().zip(&e.results) {
                    let _ = writeln!(w, "       {}: {}", s.name, r.status.name());
                    if let Some(err) = &r.error {
                        let _ = writeln!(w, "         error: {err}");
                    }
                }
            }
            let _ = writeln!(w, "     Outcome: {}", t.decided.outcome.name());
        }
        let _ = writeln!(w, "\nExecution:");
        if let Some(b) = &self.blocked {
            let _ = writeln!(w, "Execution note: {b}");
        }
        let outcome = self.outcome();
        let _ = writeln!(
            w,
            "Outcome: {}",
            match (outcome, self.execute) {
                (Outcome::Blocked, false) => "blocked (execute would refuse)".to_string(),
                (o, _) => o.name().to_string(),
            }
        );
        let _ = writeln!(
            w,
            "{}",
            match outcome {
                Outcome::Executed | Outcome::Failed => format!(
                    "{} of {} client IP(s) changed.",
                    self.targets
                        .iter()
                        .filter(|t| t.decided.outcome == Outcome::Executed)
                        .count(),
                    self.targets.len()
                ),
                Outcome::NoChanges => {
                    "The kernel already matches the request; nothing was changed.".into()
                }
                _ => "No system changes were made.".into(),
            }
        );
        s
    }

    pub fn json(&self) -> Value {
        let targets: Vec<Value> = self.targets.iter().map(LimitReport::json).collect();
        let mut v = json!({
            "mode": if self.execute { "execute" } else { "dry-run" },
            "operation": if self.request.want == Want::Remove { "remove" } else { "limit" },
            "runtime": self.runtime_json(),
            "target": {"kind": "ip", "value": "all", "ip_aggregation": "per_ip"},
            "scope": {"device": self.request.device, "direction": self.request.direction.name()},
            "evidence": self.evidence.json,
            "decision": {"kind": "per_ip", "reason": self.summary()},
            "execution_blocked": self.outcome() == Outcome::Blocked,
            "outcome": self.outcome().name(),
            "per_ip_expansion": {
                "provider": self.provider,
                "state": self.state,
                "reconcile_state": self.reconcile_state,
                "client_ips": self.ips.iter().map(|i| i.to_string()).collect::<Vec<_>>(),
                "note": self.note,
                "left_alone": self.skipped.iter().map(|(ip, why)| json!({"ip": ip.to_string(), "reason": why})).collect::<Vec<_>>(),
                "decision_summary": {
                    "no_op": self.count(crate::reconcile::DecisionKind::NoOp),
                    "apply": self.count(crate::reconcile::DecisionKind::Apply),
                    "replace": self.count(crate::reconcile::DecisionKind::Replace),
                    "remove": self.count(crate::reconcile::DecisionKind::Remove),
                },
            },
        });
        v["results"] = json!(targets
            .iter()
            .flat_map(|t| t["results"].as_array().cloned().unwrap_or_default())
            .collect::<Vec<_>>());
        v["per_ip_expansion"]["targets"] = json!(targets);
        if let Want::Limit(rate) = self.request.want {
            v["rate_bytes_per_second"] = json!(rate);
        }
        if let Some(b) = &self.blocked {
            v["execution_note"] = json!(b);
        }
        v
    }
}

/// What `limit` reports: one decision, or a per_ip expansion of many; and the drift on the
/// same device that the run repaired beside it (see `engine::repair`).
pub struct Report {
    body: Body,
    repairs: Vec<LimitReport>,
}

enum Body {
    One(Box<LimitReport>),
    PerIp(Box<PerIpReport>),
}

impl Report {
    /// The report of what the engine staged for `wanted`, with the results of its run.
    pub fn build<K: Kernel>(
        engine: &Engine<K>,
        wanted: &Wanted,
        staged: Staged,
        run: &mut Committed,
    ) -> Report {
        let netns = Some(engine.netns_key().to_string()).filter(|n| !n.is_empty());
        let limit = |decided: Decided, evidence| LimitReport {
            execute: engine.execute,
            runtime: engine.runtime.clone(),
            device: engine.device.clone(),
            decided,
            evidence,
            netns: netns.clone(),
        };
        let body = match staged {
            Staged::One { ticket, resolution } => {
                let evidence = resolution::view(&resolution);
                Body::One(Box::new(limit(run.take(ticket), evidence)))
            }
            Staged::PerIp(x) => {
                let targets = x
                    .targets
                    .iter()
                    .map(|t| limit(run.take(*t), None))
                    .collect();
                Body::PerIp(Box::new(PerIpReport::new(engine, wanted, *x, targets)))
            }
        };
        Report {
            body,
            repairs: Vec::new(),
        }
    }

    /// Adds the repairs the engine staged beside this report's request (`stage_repairs`).
    pub fn attach_repairs<K: Kernel>(
        &mut self,
        engine: &Engine<K>,
        tickets: &[Ticket],
        run: &mut Committed,
    ) {
        let netns = Some(engine.netns_key().to_string()).filter(|n| !n.is_empty());
        self.repairs.extend(tickets.iter().map(|t| LimitReport {
            execute: engine.execute,
            runtime: engine.runtime.clone(),
            device: engine.device.clone(),
            decided: run.take(*t),
            evidence: None,
            netns: netns.clone(),
        }));
    }

    pub fn text(&self) -> String {
        let mut text = match &self.body {
            Body::One(r) => r.text(),
            Body::PerIp(r) => r.text(),
        };
        for (i, r) in self.repairs.iter().enumerate() {
            let _ = write!(
                text,
                "\n--- drift repair {}/{}: {} {} on {}, as its annotation records it (the kernel had lost it)\n{}",
                i + 1,
                self.repairs.len(),
                r.decided.request.subject,
                r.decided.request.direction.name(),
                r.device.name,
                r.text()
            );
        }
        text
    }

    pub fn json(&self) -> Value {
        let mut v = match &self.body {
            Body::One(r) => r.json(),
            Body::PerIp(r) => r.json(),
        };
        self.repairs_json(&mut v);
        v
    }

    fn repairs_json(&self, v: &mut Value) {
        if !self.repairs.is_empty() {
            v["drift_repairs"] = json!(self
                .repairs
                .iter()
                .map(LimitReport::json_body)
                .collect::<Vec<_>>());
        }
    }

    /// The report without its runtime block, for a run that gives it once for all reports.
    pub fn json_without_runtime(&self) -> Value {
        let mut v = match &self.body {
            Body::One(r) => r.json_body(),
            Body::PerIp(r) => {
                let mut v = r.json();
                if let Some(o) = v.as_object_mut() {
                    o.remove("runtime");
                }
                v
            }
        };
        self.repairs_json(&mut v);
        v
    }

    /// Writes [`Report::json_without_runtime`]; a single limit without repairs (every entry of
    /// a large policy) is serialized directly, with no JSON tree built first.
    pub fn write_json_without_runtime(
        &self,
        w: &mut impl std::io::Write,
    ) -> serde_json::Result<()> {
        match &self.body {
            Body::One(r) if self.repairs.is_empty() => serde_json::to_writer(w, &r.body()),
            _ => serde_json::to_writer(w, &self.json_without_runtime()),
        }
    }

    /// The runtime block of the report.
    pub fn runtime_json(&self) -> Value {
        match &self.body {
            Body::One(r) => r.runtime_json(),
            Body::PerIp(r) => r.runtime_json(),
        }
    }

    /// The request's outcome; when the request itself needed nothing, a repair's (a run
    /// that changed the kernel, or would, says so).
    pub fn outcome(&self) -> Outcome {
        let own = match &self.body {
            Body::One(r) => r.outcome(),
            Body::PerIp(r) => r.outcome(),
        };
        let repaired = self
            .repairs
            .iter()
            .map(LimitReport::outcome)
            .find(|o| matches!(o, Outcome::PlanReady | Outcome::Executed | Outcome::Failed));
        match (own, repaired) {
            (Outcome::NoChanges, Some(o)) => o,
            (_, Some(Outcome::Failed)) => Outcome::Failed,
            _ => own,
        }
    }

    /// 0 planned or done; 1 refused (blocked with --execute) or failed.
    pub fn exit_code(&self) -> i32 {
        let execute = match &self.body {
            Body::One(r) => r.execute,
            Body::PerIp(r) => r.execute,
        };
        match self.outcome() {
            Outcome::Failed => 1,
            Outcome::Blocked if execute => 1,
            _ if self.unrecorded().is_some() => 1,
            _ => 0,
        }
    }

    /// Why the annotations could not be saved after the kernel changed, when they could not.
    fn unrecorded(&self) -> Option<String> {
        let mut decided: Vec<&Decided> = match &self.body {
            Body::One(r) => vec![&r.decided],
            Body::PerIp(r) => r.targets.iter().map(|t| &t.decided).collect(),
        };
        decided.extend(self.repairs.iter().map(|r| &r.decided));
        decided
            .iter()
            .flat_map(|d| &d.warnings)
            .find_map(|w| match w {
                crate::engine::Warning::NotAnnotated(e) => Some(e.clone()),
                _ => None,
            })
    }

    /// How the run did not succeed, if it did not: refused (blocked with --execute) or failed.
    pub fn failure(&self) -> Option<super::Failure> {
        match (self.exit_code(), self.outcome()) {
            (0, _) => None,
            (_, Outcome::Failed) => Some(super::Failure::Failed),
            _ => Some(super::Failure::Refused),
        }
    }

    /// The one line for stderr when the run did not succeed.
    pub fn why(&self) -> String {
        let blocked = match &self.body {
            Body::One(r) => r.decided.decision.blocked.as_ref().map(blocked_text),
            Body::PerIp(r) => r.blocked.clone().or_else(|| {
                r.targets.iter().find_map(|t| {
                    t.decided
                        .decision
                        .blocked
                        .as_ref()
                        .map(|b| format!("{}: {}", t.request().subject, blocked_text(b)))
                })
            }),
        };
        blocked
            .or_else(|| {
                self.unrecorded().map(|e| {
                    format!("the kernel changed, but the owner annotations could not be saved: {e}")
                })
            })
            .unwrap_or_else(|| "an operation failed; see the report".into())
    }
}

//! Observed versus desired: the decision (`apply`, `no_op`, `replace`, `remove`) and the ordered
//! plan that gets the kernel from one to the other. Pure, no I/O.
//!
//! Plans are ordered so traffic is never sent to a class that does not exist: scaffolding (IFB,
//! root), then the class, then the filters that point at it; removal runs the other way. Every
//! step carries the steps that undo it, computed from what was observed, so a failed run can put
//! the kernel back as it was.

mod absorb;
mod apply;
mod bands;
mod held;
mod listeners;
mod marks;
pub mod observe;
pub mod plan;
mod remove;
mod upload;

use std::collections::BTreeSet;

use crate::model::nft::{ManagedRule, NftOp, NftRule, NftState, Tag, CHAIN_CLASSIFY, CHAIN_SAVE};
use crate::model::tc::{ClassKind, Filter, FilterKind, Op, Qdisc, QdiscKind};
use crate::model::u32::{End, Family, U32Filter};
use crate::model::Link;
use crate::model::{TcHandle, U32Handle};
use crate::policy::{Direction, Endpoint, Request, Subject, Want};
use crate::shaping::{self, Band, CatchAll, ClientMatch, ListenerBand, ListenerMatch, ROOT_MAJOR};
use observe::{classid_of, restores_mark, Node, Observation, RootState, ShapedRoot};
use plan::{Dev, Operation, Step, TcObject};

use apply::plan_apply;
use held::{held, Held};
use listeners::{
    delete_in_root_table, delete_priority, emptied_listener_priorities, plan_listeners,
};
use marks::{delete_nft_rules, fw_mask, plan_nft_rule};
use remove::plan_remove;
use upload::{
    ifb_dev, plan_listener_redirects, plan_redirect, remove_upload_scaffolding, swap_redirect,
    RedirectNeeds,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecisionKind {
    Apply,
    NoOp,
    Replace,
    Remove,
}

impl DecisionKind {
    pub fn name(self) -> &'static str {
        match self {
            DecisionKind::Apply => "apply",
            DecisionKind::NoOp => "no_op",
            DecisionKind::Replace => "replace",
            DecisionKind::Remove => "remove",
        }
    }
}

/// What decide() needs besides the observation.
#[derive(Debug, Clone)]
pub struct Context {
    pub request: Request,
    pub catch_all: CatchAll,
    /// `--allow-missing-tc-state`: go ahead when the state could not be observed or compared.
    pub allow_missing_state: bool,
    /// Another runtime owns this subject's rule (from the owner annotations).
    pub owned_by_other: Option<String>,
    /// A class minor the annotations remember for this subject (found even if its filter is gone).
    pub remembered_minor: Option<u16>,
    /// The runtime's owner identity, written into the nft rules' userdata.
    pub owner: String,
    /// The namespace nft steps run in (`/run/netns/NAME`), none for the current one.
    pub netns_path: Option<String>,
    /// The kernel has `act_connmark` (outbound download restores the connection mark with it).
    pub has_connmark: bool,
    /// The kernel has `cls_fw` (outbounds are classified by their mark in tc, not in nft).
    pub has_fw: bool,
    /// Which packets the runtime's rule may match (client rules and the `--ip all` baseline).
    pub scope: RuleScope,
    /// Class minors on the shaped root that other runtimes' rules own (from the annotations):
    /// their filters are never taken for this rule's.
    pub foreign_classes: std::rc::Rc<BTreeSet<u16>>,
    /// raylimit's records say it created the device's ingress hook, and its IFB: shared objects
    /// are deleted with the last rule only when raylimit made them (never one it adopted).
    pub made_hook: bool,
    pub made_ifb: bool,
    /// The qdisc each class gets as its leaf (by what the kernel has).
    pub leaf: shaping::Leaf,
}

/// Which of a device's packets a runtime's rule may match.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum RuleScope {
    /// Every packet on the device (the operator asked for it).
    #[default]
    Device,
    /// Only packets of the runtime's listeners (to them on upload, from them on download).
    Listeners(BTreeSet<ListenerMatch>),
}

/// A client's nodes under a rule's scope: one per runtime listener of the client's family (none
/// when the runtime has none there), or the client alone when the rule is device-wide.
fn scoped(client: ClientMatch, scope: &RuleScope) -> BTreeSet<ClientMatch> {
    match scope {
        RuleScope::Device => [client].into(),
        RuleScope::Listeners(listeners) => listeners
            .iter()
            .filter(|l| l.family == shaping::family_of(client.ip))
            .map(|l| ClientMatch {
                listener: Some(*l),
                ..client
            })
            .collect(),
    }
}

/// Why a decision must not be executed. The reasons that the operator can override, or that
/// name an option, are typed so that the command line names its own flags.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Blocked {
    /// The tc state could not be read (the error); executing without it needs the operator's
    /// explicit override.
    Unobserved(String),
    /// raylimit's bands hold filters it did not make (the note says which); executing anyway
    /// needs the override, and leaves them alone.
    NotComparable(String),
    /// Another outbound on `device` already reads marks under `mask` (its filter): one fw
    /// priority holds one mask.
    MaskConflict {
        device: String,
        mask: u32,
        filter: String,
    },
    /// The runtime's traffic cannot be told apart from the rest of the device (why); a
    /// device-wide rule needs the operator's explicit choice.
    Unscoped { device: String, why: String },
    /// Any other reason, in words an operator can act on.
    Reason(String),
}

impl Blocked {
    /// The reason in words, for a reason given as text.
    pub fn reason(text: impl Into<String>) -> Self {
        Blocked::Reason(text.into())
    }
}

/// The outcome of comparing: what to do, why, and the plan.
#[derive(Debug, Clone)]
pub struct Decision {
    pub kind: DecisionKind,
    pub reason: std::borrow::Cow<'static, str>,
    /// Set when execution must not go ahead, with why.
    pub blocked: Option<Blocked>,
    /// `available`, `available (not comparable)` or `unavailable`.
    pub observed_state: &'static str,
    pub observation_note: Option<String>,
    /// The observed rule for the subject matches the request exactly.
    pub matched: bool,
    pub expected_class: Option<TcHandle>,
    pub observed_class: Option<TcHandle>,
    pub observed_rate: Option<u64>,
    /// Form choices made for this kernel (matchall or u32 catch-all, clsact or ingress).
    pub forms: Vec<String>,
    pub steps: Vec<Step>,
}

/// The subject's rule on a shaped root.
#[derive(Debug, Clone)]
enum Rule {
    /// Nodes of a client band (one for an IP or a connection, one per address for a user), all
    /// sending to the subject's one class.
    Nodes {
        band: Band,
        matches: BTreeSet<ClientMatch>,
    },
    /// Listener nodes of the inbound band (one per family a wildcard listener covers).
    Listener { matches: BTreeSet<ListenerMatch> },
    /// An outbound's socket mark (under the mask): an fw filter on the shaped root where the
    /// kernel has cls_fw, else (upload only) an nft rule that sets the packet's priority.
    Mark {
        /// `None` for a removal, which finds the rule by its class and nft tag.
        value: Option<u32>,
        mask: u32,
    },
    /// The `--ip all` baseline: device-wide (one catch-all) when `scope` is `None`, else one
    /// node per runtime listener in the baseline's priorities.
    Baseline {
        scope: Option<BTreeSet<ListenerMatch>>,
    },
}

/// Decides for one request.
pub fn decide(ctx: &Context, obs: &Observation) -> Decision {
    let req = &ctx.request;
    let mut d = Decision {
        kind: DecisionKind::NoOp,
        reason: std::borrow::Cow::Borrowed(""),
        blocked: None,
        observed_state: "available",
        observation_note: None,
        matched: false,
        expected_class: None,
        observed_class: None,
        observed_rate: None,
        forms: Vec::new(),
        steps: Vec::new(),
    };
    let rule = match &req.subject {
        Subject::Ip(ip) => Rule::Nodes {
            band: Band::Ip,
            matches: scoped(ClientMatch::ip(*ip), &ctx.scope),
        },
        Subject::Connection(c) => Rule::Nodes {
            band: Band::Connection,
            matches: scoped(
                ClientMatch {
                    port: Some(c.port()),
                    ..ClientMatch::ip(c.ip())
                },
                &ctx.scope,
            ),
        },
        Subject::User { ips, .. } => Rule::Nodes {
            band: Band::User,
            matches: ips
                .iter()
                .flat_map(|ip| scoped(ClientMatch::ip(*ip), &ctx.scope))
                .collect(),
        },
        // An unresolved listener (a removal) matches nothing: the rule is found by its class.
        Subject::Inbound { listener, .. } => Rule::Listener {
            matches: match listener {
                Some(Endpoint {
                    address: Some(a),
                    port,
                }) => [ListenerMatch {
                    family: shaping::family_of(*a),
                    address: Some(*a),
                    port: *port,
                }]
                .into(),
                Some(Endpoint {
                    address: None,
                    port,
                }) => [Family::V4, Family::V6]
                    .into_iter()
                    .map(|family| ListenerMatch {
                        family,
                        address: None,
                        port: *port,
                    })
                    .collect(),
                None => BTreeSet::new(),
            },
        },
        Subject::Outbound { mark, mask, .. } => {
            let missing: Vec<&str> = [(!ctx.has_connmark, "act_connmark"), (!ctx.has_fw, "cls_fw")]
                .into_iter()
                .filter_map(|(absent, name)| absent.then_some(name))
                .collect();
            if req.direction == Direction::Download
                && req.want != Want::Remove
                && !missing.is_empty()
            {
                d.kind = DecisionKind::Apply;
                d.reason = "outbound download is identified by the connection's mark, restored before the redirect to the IFB".into();
                d.observed_state = "not needed (this kernel cannot carry the rule)";
                d.blocked = Some(Blocked::Reason(format!(
                    "outbound download needs the connmark action (act_connmark) to restore the connection's mark on arriving packets before they are redirected to the IFB, and the fw classifier (cls_fw) to read it there; this kernel has no {}",
                    missing.join(" and no ")
                )));
                return d;
            }
            // Download always keeps its mark in nft (saved on output); upload only without fw.
            let needs_nft =
                req.want != Want::Remove && (req.direction == Direction::Download || !ctx.has_fw);
            if let Some(Err(e)) = obs.nft.as_ref().filter(|_| needs_nft) {
                d.kind = DecisionKind::Apply;
                d.reason = "the outbound's mark is kept in raylimit's nftables table".into();
                d.observed_state = "unavailable";
                d.blocked = Some(Blocked::Reason(format!("nftables could not be read: {e}")));
                return d;
            }
            Rule::Mark {
                value: mark.map(|m| m & mask),
                mask: *mask,
            }
        }
        Subject::AllShared => Rule::Baseline {
            scope: match &ctx.scope {
                RuleScope::Device => None,
                RuleScope::Listeners(set) => Some(set.clone()),
            },
        },
    };
    if let (Rule::Nodes { matches, .. }, RuleScope::Listeners(listeners)) = (&rule, &ctx.scope) {
        let has_clients = !matches!(&req.subject, Subject::User { ips, .. } if ips.is_empty());
        if matches.is_empty() && req.want != Want::Remove && has_clients {
            // The runtime cannot be reached at these addresses: no listener of their family.
            d.kind = DecisionKind::Apply;
            d.reason = "the rule matches the client's packets on the runtime's listeners".into();
            let list: Vec<String> = listeners.iter().map(|l| l.to_string()).collect();
            d.blocked = Some(Blocked::Reason(format!(
                "the runtime listens on {} only, so {} never reaches it",
                list.join(", "),
                req.subject
            )));
            return d;
        }
    }
    let unresolved = matches!(
        req.subject,
        Subject::Inbound { listener: None, .. } | Subject::Outbound { mark: None, .. }
    );
    if unresolved && req.want != Want::Remove {
        // Nothing to plan without the listener or the mark; the caller says why it is missing.
        d.kind = DecisionKind::Apply;
        d.reason = std::borrow::Cow::Owned(format!(
            "{} is not resolved from the runtime's config, so no rule can be planned",
            req.subject
        ));
        d.blocked = Some(Blocked::Reason(format!(
            "{} could not be resolved",
            req.subject
        )));
        return d;
    }
    if let Some(e) = &obs.error {
        d.observed_state = "unavailable";
        d.observation_note = Some(format!("tc state could not be read: {e}"));
        if !ctx.allow_missing_state {
            d.blocked = Some(Blocked::Unobserved(e.clone()));
        }
        plan_without_state(ctx, &rule, obs, &mut d);
        return d;
    }
    if let Some(other) = &ctx.owned_by_other {
        d.blocked = Some(Blocked::Reason(format!(
            "{} {} on {} is managed for another runtime ({other}); remove it with that runtime selected first",
            req.subject,
            req.direction.name(),
            req.device
        )));
    }
    if let Some(RootState::Foreign(desc)) = obs.shaped.as_ref().map(|s| &s.root) {
        d.blocked = Some(Blocked::Reason(format!(
            "the root qdisc of {} is {desc}, which raylimit does not own; raylimit never replaces another tool's root qdisc (delete it first if it is not needed)",
            shaped_name(req, obs)
        )));
    }
    if let Some(hook) = &obs.hook {
        if let Some(f) = &hook.conflicting {
            d.blocked = Some(Blocked::Reason(format!(
                "the ingress hook of {} already has a filter at raylimit's priority {} ({}); raylimit will not replace it",
                req.device,
                shaping::PRIO_REDIRECT,
                f.filter
            )));
        }
    }
    if let Some(shaped) = &obs.shaped {
        let foreign = shaped.foreign_in_bands();
        if !foreign.is_empty() {
            d.observed_state = "available (not comparable)";
            let list: Vec<String> = foreign.iter().map(|f| f.filter.to_string()).collect();
            let note = format!(
                "the managed root holds filters raylimit did not make in its priority bands: {}",
                list.join("; ")
            );
            if !ctx.allow_missing_state && d.blocked.is_none() {
                d.blocked = Some(Blocked::NotComparable(note.clone()));
            }
            d.observation_note = Some(note);
        }
    }
    match req.want {
        Want::Remove => plan_remove(ctx, &rule, obs, &mut d),
        Want::Limit(_) | Want::Unlimited => plan_apply(ctx, &rule, obs, &mut d),
    }
    d
}

fn shaped_name(req: &Request, obs: &Observation) -> String {
    if req.on_egress() {
        req.device.clone()
    } else {
        shaping::ifb_name(obs.device.index)
    }
}

fn device_dev(link: &Link) -> Dev {
    Dev::Index {
        index: link.index,
        name: link.name.as_str().into(),
    }
}

/// The device whose egress root is shaped, and its Dev for steps.
fn shaped_dev(req: &Request, obs: &Observation) -> Dev {
    if req.on_egress() {
        device_dev(&obs.device)
    } else {
        ifb_dev(obs)
    }
}

fn dev_index(dev: &Dev) -> u32 {
    match dev {
        Dev::Index { index, .. } => *index,
        Dev::Ifb(_) => 0,
    }
}

/// Replaces an observed filter that differs from the wanted one in place (undone by putting the
/// observed one back), and says what changed; `what` names the filter in that sentence.
fn replace_filter(
    dev: &Dev,
    ifindex: u32,
    old: &Filter,
    want: Filter,
    what: &str,
) -> (Step, String) {
    let mut before = old.clone();
    before.ifindex = ifindex;
    let change = match (classid_of(old), classid_of(&want)) {
        (Some(a), Some(b)) if a != b => format!("the filter{what} now sends to {b} instead of {a}"),
        _ => format!("the filter{what} differed from the requested one and is repaired"),
    };
    let step = Step::tc("replace-filter", Op::Replace, dev, want).undone_by(vec![Step::tc(
        "restore-filter",
        Op::Replace,
        dev,
        before,
    )]);
    (step, change)
}

fn same_filter(observed: &Filter, desired: &Filter) -> bool {
    let mut o = observed.clone();
    let mut d = desired.canonical();
    o.ifindex = d.ifindex;
    if let (FilterKind::U32(ou), FilterKind::U32(du)) = (&mut o.kind, &mut d.kind) {
        // A node created without a table lands in the root table the kernel chose.
        if U32Handle(d.handle).table() == 0 {
            d.handle = o.handle;
            du.hash = ou.hash;
        }
    }
    o == d
}

/// Deleting a whole u32 priority (its table, link and any nodes): handle 0.
fn whole_priority(ifindex: u32, prio: u16, protocol: u16) -> Filter {
    Filter {
        ifindex,
        parent: shaping::root_handle(),
        priority: prio,
        protocol,
        handle: 0,
        kind: FilterKind::U32(U32Filter::default()),
    }
}

/// `--allow-missing-tc-state` without a readable state: the rule is put in place as if nothing
/// existed, with create-or-replace semantics, and scaffolding that already exists counts as done.
/// A removal cannot be exact without state, so it stays blocked.
fn plan_without_state(ctx: &Context, rule: &Rule, obs: &Observation, d: &mut Decision) {
    let req = &ctx.request;
    if req.want == Want::Remove {
        d.kind = DecisionKind::Remove;
        d.reason =
            "tc state could not be compared; a removal needs it to know what to delete".into();
        d.blocked.get_or_insert_with(|| {
            Blocked::reason("real remove execution requires observed tc state; raylimit cannot tell which objects are the subject's without it")
        });
        return;
    }
    plan_apply(ctx, rule, obs, d);
    d.kind = DecisionKind::Apply;
    d.reason =
        "tc state could not be compared; proceeding with an apply plan without observed state"
            .into();
    for step in &mut d.steps {
        if let Operation::Tc { op, object, .. } = &mut step.action {
            let leaf = matches!(object, TcObject::Class(_))
                || matches!(object, TcObject::Filter(f) if U32Handle(f.handle).node() != 0 && U32Handle(f.handle).table() != 0);
            if *op == Op::Create && leaf {
                *op = Op::Replace;
                continue;
            }
        }
        if matches!(
            step.action,
            Operation::CreateIfb(_) | Operation::Tc { op: Op::Create, .. }
        ) {
            step.exists_ok = true;
            // What existed before is unknown, so nothing is undone.
            step.undo = plan::Undo::Steps(Vec::new());
        }
    }
}

#[cfg(test)]
mod tests;

/// Deletes class `minor` as observed; the kernel destroys its leaf with it, so the undo puts
/// both back.
fn delete_class(dev: &Dev, shaped: &ShapedRoot, minor: u16) -> Step {
    let mut class = shaped.classes[&minor].class.clone();
    class.parent = shaping::root_handle();
    let Some(leaf) = shaped.leaves.get(&minor) else {
        return Step::delete("delete-class", dev, class);
    };
    let mut leaf = leaf.clone();
    leaf.ifindex = class.ifindex;
    Step::tc("delete-class", Op::Delete, dev, class.clone()).undone_by(vec![
        Step::tc("restore-class", Op::Create, dev, class),
        Step::tc("restore-leaf", Op::Replace, dev, leaf),
    ])
}

//! Observed versus desired: the decision (`apply`, `no_op`, `replace`, `remove`) and the ordered
//! plan that gets the kernel from one to the other. Pure, no I/O.
//!
//! Plans are ordered so traffic is never sent to a class that does not exist: scaffolding (IFB,
//! root), then the class, then the filters that point at it; removal runs the other way. Every
//! step carries the steps that undo it, computed from what was observed, so a failed run can put
//! the kernel back as it was.

mod absorb;
mod bands;
pub mod observe;
pub mod plan;

use std::collections::BTreeSet;

use crate::model::nft::{ManagedRule, NftOp, NftRule, NftState, Tag, CHAIN_CLASSIFY, CHAIN_SAVE};
use crate::model::tc::{ClassKind, Filter, FilterKind, Op, Qdisc, QdiscKind};
use crate::model::u32::{End, Family, U32Filter};
use crate::model::Link;
use crate::model::{TcHandle, U32Handle};
use crate::policy::{Direction, Endpoint, Request, Subject, Want};
use crate::shaping::{self, Band, CatchAll, ClientMatch, ListenerMatch, ROOT_MAJOR};
use observe::{classid_of, restores_mark, Node, Observation, RootState, ShapedRoot};
use plan::{Dev, Operation, Step, TcObject};

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
}

/// The outcome of comparing: what to do, why, and the plan.
#[derive(Debug, Clone)]
pub struct Decision {
    pub kind: DecisionKind,
    pub reason: String,
    /// Set when execution must not go ahead; says why, in words an operator can act on.
    pub blocked: Option<String>,
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
    Listener {
        matches: BTreeSet<ListenerMatch>,
    },
    /// An outbound's socket mark (under the mask): an fw filter on the shaped root where the
    /// kernel has cls_fw, else (upload only) an nft rule that sets the packet's priority.
    Mark {
        /// `None` for a removal, which finds the rule by its class and nft tag.
        value: Option<u32>,
        mask: u32,
    },
    Baseline,
}

/// What the kernel holds of a subject's rule.
#[derive(Debug, Default)]
struct Held {
    /// The subject's filters: what each matches (none for the baseline), and the filter.
    filters: Vec<(Option<ClientMatch>, Filter)>,
    /// An inbound's listener nodes.
    listeners: Vec<(ListenerMatch, Filter)>,
    /// The subject's leaf class, when it has one.
    class: Option<TcHandle>,
    /// Addresses the subject wants that another rule of its band already holds.
    conflicts: Vec<String>,
}

fn leaf(c: Option<TcHandle>) -> Option<TcHandle> {
    c.filter(|c| c.major() == ROOT_MAJOR && c.minor() != 0)
}

/// Reads the subject's rule from a managed root. A user's rule is known by its class (from the
/// annotations); an IP's or a connection's by what its node matches.
fn held(shaped: &ShapedRoot, rule: &Rule, remembered: Option<u16>) -> Held {
    let remembered = remembered
        .filter(|m| shaped.classes.contains_key(m))
        .map(|m| TcHandle::new(ROOT_MAJOR, m));
    let mut h = Held::default();
    match rule {
        Rule::Baseline => {
            if let Some(f) = &shaped.baseline {
                h.class = leaf(classid_of(&f.filter));
                h.filters.push((None, f.filter.clone()));
            }
            h.class = h.class.or(remembered);
        }
        Rule::Nodes { band, matches } if *band == Band::User => {
            h.class = remembered;
            if let Some(class) = h.class {
                for n in shaped.nodes_to(*band, class) {
                    h.filters.push((Some(n.matched), n.entry.filter.clone()));
                }
            }
            let ours = |n: &&Node| h.class.is_some() && n.classid == h.class;
            for m in matches {
                let Some(n) = shaped.node_for(*band, *m).filter(|n| !ours(n)) else {
                    continue;
                };
                h.conflicts.push(format!(
                    "{} (sent to {})",
                    n.matched,
                    n.classid.map(|c| c.to_string()).unwrap_or("nothing".into())
                ));
            }
        }
        Rule::Nodes { band, matches } => {
            for m in matches {
                if let Some(n) = shaped.node_for(*band, *m) {
                    h.class = h.class.or(leaf(n.classid));
                    h.filters.push((Some(*m), n.entry.filter.clone()));
                }
            }
            h.class = h.class.or(remembered);
        }
        // An outbound's class is known from its fw filter, its nft rule (see `held_marks`) or
        // the annotations.
        Rule::Mark { value, .. } => {
            if let Some(f) = value.and_then(|v| shaped.marks.get(&v)) {
                h.class = leaf(classid_of(&f.filter));
                h.filters.push((None, f.filter.clone()));
            }
            h.class = h.class.or(remembered);
        }
        // An inbound's nodes: those matching its listener now, and those still sending to its
        // class (a listener whose port changed in the config).
        Rule::Listener { matches } => {
            h.class = shaped
                .listeners
                .iter()
                .filter(|n| matches.contains(&n.matched))
                .find_map(|n| leaf(n.classid))
                .or(remembered);
            for n in &shaped.listeners {
                if matches.contains(&n.matched) || (h.class.is_some() && n.classid == h.class) {
                    h.listeners.push((n.matched, n.entry.filter.clone()));
                }
            }
        }
    }
    h
}

/// The subject's rules in raylimit's nft table, tagged with its key, for this device: the mark
/// classification for upload (`egress`), the mark saving for download.
fn held_marks(obs: &Observation, key: &str, egress: bool) -> Vec<ManagedRule> {
    let Some(Ok(state)) = &obs.nft else {
        return Vec::new();
    };
    let device = obs.device.index;
    state
        .rules
        .iter()
        .filter(|r| r.tag.as_ref().is_some_and(|t| t.subject == key))
        .filter(|r| match r.rule {
            NftRule::MarkToPriority { oif, .. } => egress && oif == device,
            NftRule::SaveMark { oif, .. } => !egress && oif == device,
        })
        .cloned()
        .collect()
}

impl Held {
    /// An outbound's mark rules in the nft table; its class is the one they name, when that
    /// class exists on the root.
    fn add_marks(
        &mut self,
        rule: &Rule,
        obs: &Observation,
        (key, egress): (&str, bool),
        shaped: Option<&ShapedRoot>,
    ) -> Vec<ManagedRule> {
        let marks = held_marks(obs, key, egress);
        if let Rule::Mark { .. } = rule {
            self.class = marks
                .iter()
                .find_map(mark_class)
                .filter(|c| shaped.is_some_and(|s| s.classes.contains_key(&c.minor())))
                .or(self.class);
        }
        marks
    }
}

/// The class a mark rule sends to, if it is one of raylimit's leaves.
fn mark_class(r: &ManagedRule) -> Option<TcHandle> {
    match r.rule {
        NftRule::MarkToPriority { priority, .. } => leaf(Some(TcHandle(priority))),
        _ => None,
    }
}

/// The nft steps of an outbound limit (`want`: its classification or its mark saving): table
/// and chain when missing, then the rule (a changed rule is deleted and added again in the same
/// atomic batch).
fn plan_nft_rule(
    ctx: &Context,
    obs: &Observation,
    want: NftRule,
    held: &[ManagedRule],
    steps: &mut Vec<Step>,
    changes: &mut Vec<String>,
) {
    if held.len() == 1 && held[0].rule == want {
        return;
    }
    let name = match want {
        NftRule::MarkToPriority { .. } => "nft-classify-mark",
        NftRule::SaveMark { .. } => "nft-save-mark",
    };
    let state = match &obs.nft {
        Some(Ok(s)) => s.clone(),
        _ => NftState::default(),
    };
    let mut ops = Vec::new();
    let mut undo = Vec::new();
    if !state.table {
        ops.push(NftOp::AddTable);
    }
    if !state.chains.iter().any(|c| c == want.chain()) {
        ops.push(NftOp::AddChain(want.chain()));
    }
    for old in held {
        changes.push(format!(
            "the nft rule differed ({}) and is replaced",
            old.rule.describe()
        ));
        ops.push(NftOp::DeleteRule {
            chain: old.chain.clone(),
            handle: old.handle,
        });
        if let Some(tag) = &old.tag {
            undo.push(NftOp::AddRule {
                rule: old.rule.clone(),
                tag: tag.clone(),
            });
        }
    }
    let tag = Tag {
        owner: ctx.owner.clone(),
        subject: ctx.request.subject.key().to_string(),
    };
    ops.push(NftOp::AddRule {
        rule: want.clone(),
        tag: tag.clone(),
    });
    let netns = ctx.netns_path.clone();
    let mut undo_steps = vec![Step::new(
        "delete-nft-rule",
        Operation::NftRemoveTagged {
            netns: netns.clone(),
            rule: want,
            subject: tag.subject,
        },
    )];
    if !undo.is_empty() {
        undo_steps.push(Step::new(
            "restore-nft-rules",
            Operation::Nft {
                netns: netns.clone(),
                ops: undo,
            },
        ));
    }
    if !state.table {
        undo_steps.push(Step::new(
            "delete-nft-table",
            Operation::Nft {
                netns: netns.clone(),
                ops: vec![NftOp::DeleteTable],
            },
        ));
    }
    steps.push(Step::new(name, Operation::Nft { netns, ops }).undone_by(undo_steps));
}

/// Decides for one request.
pub fn decide(ctx: &Context, obs: &Observation) -> Decision {
    let req = &ctx.request;
    let mut d = Decision {
        kind: DecisionKind::NoOp,
        reason: String::new(),
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
            matches: [ClientMatch::ip(*ip)].into(),
        },
        Subject::Connection(c) => Rule::Nodes {
            band: Band::Connection,
            matches: [ClientMatch {
                ip: c.ip(),
                port: Some(c.port()),
            }]
            .into(),
        },
        Subject::User { ips, .. } => Rule::Nodes {
            band: Band::User,
            matches: ips.iter().map(|ip| ClientMatch::ip(*ip)).collect(),
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
                d.observed_state = "unavailable";
                d.blocked = Some(format!(
                    "outbound download needs the connmark action (act_connmark) to restore the connection's mark on arriving packets before they are redirected to the IFB, and the fw classifier (cls_fw) to read it there; this kernel has no {}",
                    missing.join(" and no ")
                ));
                return d;
            }
            // Download always keeps its mark in nft (saved on output); upload only without fw.
            let needs_nft =
                req.want != Want::Remove && (req.direction == Direction::Download || !ctx.has_fw);
            if let Some(Err(e)) = obs.nft.as_ref().filter(|_| needs_nft) {
                d.kind = DecisionKind::Apply;
                d.reason = "the outbound's mark is kept in raylimit's nftables table".into();
                d.observed_state = "unavailable";
                d.blocked = Some(format!("nftables could not be read: {e}"));
                return d;
            }
            Rule::Mark {
                value: mark.map(|m| m & mask),
                mask: *mask,
            }
        }
        Subject::AllShared => Rule::Baseline,
    };
    let unresolved = matches!(
        req.subject,
        Subject::Inbound { listener: None, .. } | Subject::Outbound { mark: None, .. }
    );
    if unresolved && req.want != Want::Remove {
        d.kind = DecisionKind::Apply;
        d.reason = "the subject was not resolved from the runtime's config".into();
        d.blocked = Some(format!("{} could not be resolved", req.subject));
        d.observed_state = "unavailable";
        return d;
    }
    if let Some(e) = &obs.error {
        d.observed_state = "unavailable";
        d.observation_note = Some(format!("tc state could not be read: {e}"));
        if !ctx.allow_missing_state {
            d.blocked = Some(format!(
                "real execution requires observed tc state; tc state could not be read ({e}); rerun with --allow-missing-tc-state to execute without observation"
            ));
        }
        plan_without_state(ctx, &rule, obs, &mut d);
        return d;
    }
    if let Some(other) = &ctx.owned_by_other {
        d.blocked = Some(format!(
            "{} {} on {} is managed for another runtime ({other}); remove it with that runtime selected first",
            req.subject,
            req.direction.name(),
            req.device
        ));
    }
    if let Some(RootState::Foreign(desc)) = obs.shaped.as_ref().map(|s| &s.root) {
        d.blocked = Some(format!(
            "the root qdisc of {} is {desc}, which raylimit does not own; raylimit never replaces another tool's root qdisc (delete it first if it is not needed)",
            shaped_name(req, obs)
        ));
    }
    if let Some(hook) = &obs.hook {
        if let Some(f) = &hook.conflicting {
            d.blocked = Some(format!(
                "the ingress hook of {} already has a filter at raylimit's priority {} ({}); raylimit will not replace it",
                req.device,
                shaping::PRIO_REDIRECT,
                f.filter
            ));
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
                d.blocked = Some(format!(
                    "real execution requires comparable tc state; {note}; rerun with --allow-missing-tc-state to execute anyway (those filters are left alone)"
                ));
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
        name: link.name.clone(),
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

fn plan_apply(ctx: &Context, rule: &Rule, obs: &Observation, d: &mut Decision) {
    let req = &ctx.request;
    let dev = shaped_dev(req, obs);
    let ifindex = dev_index(&dev);
    let end = shaping::client_end(req.direction);
    let shaped = obs.shaped.as_ref().filter(|s| s.is_managed());
    let mut steps = Vec::new();
    let mut changes: Vec<String> = Vec::new();

    if let Rule::Nodes { matches, .. } = rule {
        if matches.is_empty() {
            d.kind = DecisionKind::Apply;
            d.reason = "the subject has no client address to classify".into();
            d.blocked = Some(format!(
                "{} has no live client address to limit",
                req.subject
            ));
            return;
        }
    }
    let mut held = shaped
        .map(|s| held(s, rule, ctx.remembered_minor))
        .unwrap_or_default();
    let marks = held.add_marks(
        rule,
        obs,
        (&req.subject.key().to_string(), req.on_egress()),
        shaped,
    );
    if !held.conflicts.is_empty() && d.blocked.is_none() {
        d.blocked = Some(format!(
            "another rule of the {} band on {} already classifies {}; remove that rule first",
            req.subject.kind(),
            dev.name(),
            held.conflicts.join(", ")
        ));
    }

    // Scaffolding for upload: the IFB companion, up.
    if !req.on_egress() {
        match &obs.ifb {
            None => {
                let name = shaping::ifb_name(obs.device.index);
                steps.push(
                    Step::new("create-ifb", Operation::CreateIfb(name.clone())).undone_by(vec![
                        Step::new("delete-ifb", Operation::DeleteLink(Dev::Ifb(name.clone()))),
                    ]),
                );
                steps.push(Step::new("set-ifb-up", Operation::SetUp(Dev::Ifb(name))));
            }
            Some(ifb) if !ifb.up => {
                steps.push(Step::new("set-ifb-up", Operation::SetUp(device_dev(ifb))));
            }
            Some(_) => {}
        }
    }
    if shaped.is_none() {
        let root = shaping::root_qdisc(ifindex);
        steps.push(Step::create("create-root-qdisc", &dev, root));
    }

    // The class: kept at its minor when the subject has one, else a fresh stable minor.
    let observed_class_entry = held
        .class
        .and_then(|c| shaped.and_then(|s| s.classes.get(&c.minor())));
    d.observed_class = observed_class_entry.map(|c| c.class.handle);
    d.observed_rate = observed_class_entry.and_then(|c| match &c.class.kind {
        ClassKind::Htb(h) => Some(h.rate),
        _ => None,
    });
    let target_class = match req.want {
        Want::Limit(rate) => {
            let minor = match observed_class_entry {
                Some(c) => Some(c.class.handle.minor()),
                None => shaping::allocate_minor(&req.subject.key().to_string(), |m| {
                    shaped.is_some_and(|s| s.classes.contains_key(&m))
                }),
            };
            let Some(minor) = minor else {
                d.blocked = Some(format!(
                    "every class minor under {} is in use",
                    shaping::root_handle()
                ));
                return;
            };
            let class = shaping::class(ifindex, minor, rate);
            let ClassKind::Htb(want) = &class.kind else {
                unreachable!("leaf classes are HTB")
            };
            match observed_class_entry {
                Some(old) => {
                    let same = matches!(&old.class.kind, ClassKind::Htb(h) if shaping::same_shaping(h, want));
                    if !same {
                        changes.push(format!(
                            "class {} changes in place from {} to {rate} bytes/s",
                            class.handle,
                            d.observed_rate.unwrap_or(0)
                        ));
                        let mut before = old.class.clone();
                        before.parent = shaping::root_handle();
                        steps.push(
                            Step::tc("change-class", Op::Change, &dev, class.clone()).undone_by(
                                vec![Step::tc("restore-class", Op::Change, &dev, before)],
                            ),
                        );
                    }
                }
                None => {
                    steps.push(Step::create("create-class", &dev, class.clone()));
                }
            }
            class.handle
        }
        // The root itself: HTB sends it through its direct queue, unshaped.
        _ => shaping::root_handle(),
    };
    d.expected_class = (target_class.minor() != 0).then_some(target_class);

    match rule {
        Rule::Baseline => {
            let want = shaping::baseline(ifindex, target_class, ctx.catch_all);
            match held.filters.first() {
                Some((_, old)) if same_filter(old, &want) => {}
                Some((_, old)) => {
                    let (replace, change) = replace_filter(&dev, ifindex, old, want.clone(), "");
                    changes.push(change);
                    // matchall and u32 forms cannot replace each other in place.
                    if std::mem::discriminant(&old.kind) == std::mem::discriminant(&want.kind) {
                        steps.push(replace);
                    } else {
                        let mut before = old.clone();
                        before.ifindex = ifindex;
                        steps.push(Step::delete("delete-filter", &dev, before));
                        steps.push(Step::create("create-filter", &dev, want));
                    }
                }
                None => steps.push(Step::create("create-filter", &dev, want)),
            }
            d.forms
                .push(format!("baseline filter: {}", ctx.catch_all.reason()));
        }
        Rule::Mark { value: None, .. } => {
            unreachable!("an unresolved outbound is blocked before it is planned")
        }
        Rule::Mark {
            value: Some(value),
            mask,
        } if ctx.has_fw => {
            let want = shaping::mark_filter(ifindex, *value, *mask, target_class);
            if let Some(other) = shaped.and_then(|s| {
                s.marks
                    .values()
                    .find(|f| fw_mask(&f.filter) != fw_mask(&want))
            }) {
                d.blocked = Some(format!(
                    "the outbound band of {} already reads marks under mask {:#010x} ({}), and one fw priority holds one mask; use the same --mark-mask for every outbound on a device",
                    dev.name(),
                    fw_mask(&other.filter),
                    other.filter
                ));
            }
            match held.filters.first() {
                Some((_, old)) if same_filter(old, &want) => {}
                Some((_, old)) => {
                    let (replace, change) = replace_filter(&dev, ifindex, old, want, "");
                    changes.push(change);
                    steps.push(replace);
                }
                None => steps.push(Step::create("create-filter", &dev, want)),
            }
            if req.on_egress() {
                // An nft classification from a run without cls_fw is replaced by the filter.
                if !marks.is_empty() {
                    changes.push("the nft classification gives way to the fw filter".into());
                    steps.push(delete_nft_rules(ctx, obs, &marks));
                }
                d.forms.push(format!(
                    "upload classification: fw on {}, mark {value:#x}/{mask:#x} (this kernel has cls_fw)",
                    dev.name()
                ));
            } else {
                let save = NftRule::SaveMark {
                    oif: obs.device.index,
                    mask: *mask,
                    value: *value,
                };
                plan_nft_rule(ctx, obs, save, &marks, &mut steps, &mut changes);
                d.forms.push(format!(
                    "download classification: the connection's mark, saved on output by nft (table inet {}, chain {}), restored by connmark on {}'s ingress redirect (this kernel has act_connmark), read by fw on {} (this kernel has cls_fw)",
                    crate::model::nft::TABLE,
                    crate::model::nft::CHAIN_SAVE,
                    obs.device.name,
                    dev.name()
                ));
            }
        }
        Rule::Mark {
            value: Some(value),
            mask,
        } => {
            let want = NftRule::MarkToPriority {
                oif: obs.device.index,
                mask: *mask,
                value: *value,
                priority: target_class.0,
            };
            plan_nft_rule(ctx, obs, want, &marks, &mut steps, &mut changes);
            d.forms.push(format!(
                "upload classification: nft `meta priority set` in table inet {} (this kernel has no cls_fw, and its u32 cannot read marks); HTB honours a packet's priority before its filters, so on {} the outbound rule wins over ip rules for the same packets",
                crate::model::nft::TABLE,
                obs.device.name
            ));
        }
        Rule::Listener { matches } => plan_listeners(
            matches,
            &held,
            shaped,
            (&dev, ifindex, shaping::listener_end(req.direction)),
            target_class,
            &mut steps,
            &mut changes,
        ),
        Rule::Nodes { band, matches } => {
            bands::plan_nodes(
                ctx,
                *band,
                matches,
                &held,
                shaped,
                (&dev, ifindex, end),
                target_class,
                &mut steps,
                &mut changes,
            );
        }
    }

    // A class the subject no longer uses (limit -> unlimited) goes after the filter moved off it.
    if let Some(old) = observed_class_entry {
        if old.class.handle != target_class {
            let mut before = old.class.clone();
            before.parent = shaping::root_handle();
            changes.push(format!("class {} is no longer needed", old.class.handle));
            steps.push(Step::delete("delete-class", &dev, before));
        }
    }

    // Upload: the hook on the device and the redirect into the IFB, last, once the tree exists.
    if !req.on_egress() {
        let restore_mark = matches!(rule, Rule::Mark { .. });
        plan_redirect(ctx, obs, restore_mark, &mut steps, &mut changes, d);
    }

    let held_any = !held.filters.is_empty() || !held.listeners.is_empty() || !marks.is_empty();
    let had_rule = held_any || observed_class_entry.is_some();
    d.matched = held_any && changes.is_empty() && steps.is_empty();
    d.kind = if steps.is_empty() {
        DecisionKind::NoOp
    } else if had_rule {
        DecisionKind::Replace
    } else {
        DecisionKind::Apply
    };
    d.reason = match d.kind {
        DecisionKind::NoOp => "the observed rule already matches the requested state".into(),
        DecisionKind::Apply => "no rule for this subject was observed".into(),
        _ if changes.is_empty() => {
            "scaffolding the rule depends on was missing and is restored".into()
        }
        _ => changes.join("; "),
    };
    d.steps = steps;
}

/// An inbound's listener nodes: each wanted one kept, repaired or created (node ids free in the
/// band's priority), nodes no longer wanted deleted, and a priority left empty deleted whole.
fn plan_listeners(
    matches: &BTreeSet<ListenerMatch>,
    held: &Held,
    shaped: Option<&ShapedRoot>,
    (dev, ifindex, end): (&Dev, u32, End),
    target_class: TcHandle,
    steps: &mut Vec<Step>,
    changes: &mut Vec<String>,
) {
    let mut used: BTreeSet<(u16, u32)> = shaped
        .map(|s| {
            s.listeners
                .iter()
                .map(|n| {
                    (
                        n.entry.filter.priority,
                        U32Handle(n.entry.filter.handle).node(),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    for m in matches {
        let prio = shaping::inbound_priority(m.family);
        let node = match held.listeners.iter().find(|(hm, _)| hm == m) {
            Some((_, f)) => U32Handle(f.handle).node(),
            None => shaping::allocate_node(&format!("inbound {m}"), |n| used.contains(&(prio, n)))
                .unwrap_or(1),
        };
        used.insert((prio, node));
        let want = shaping::listener_node(ifindex, *m, end, node, target_class);
        match held.listeners.iter().find(|(hm, _)| hm == m) {
            Some((_, old)) if same_filter(old, &want) => {}
            Some((_, old)) => {
                let mut want = want;
                want.handle = old.handle;
                let (replace, change) =
                    replace_filter(dev, ifindex, old, want, &format!(" for listener {m}"));
                changes.push(change);
                steps.push(replace);
            }
            None => steps.push(Step::create("create-filter", dev, want)),
        }
    }
    let mut removed = BTreeSet::new();
    for (m, old) in held.listeners.iter().filter(|(m, _)| !matches.contains(m)) {
        let mut before = old.clone();
        before.ifindex = ifindex;
        changes.push(format!("listener {m} is no longer the inbound's"));
        removed.insert((old.priority, old.handle));
        steps.push(delete_in_root_table("delete-filter", dev, before));
    }
    if let Some(shaped) = shaped {
        let wanted: BTreeSet<u16> = matches
            .iter()
            .map(|m| shaping::inbound_priority(m.family))
            .collect();
        for prio in emptied_listener_priorities(shaped, &removed, &wanted) {
            steps.push(delete_priority(ifindex, prio, dev));
        }
    }
}

/// Inbound-band priorities left with no node once `removed` are gone.
fn emptied_listener_priorities(
    shaped: &ShapedRoot,
    removed: &BTreeSet<(u16, u32)>,
    kept: &BTreeSet<u16>,
) -> Vec<u16> {
    [Family::V4, Family::V6]
        .into_iter()
        .map(shaping::inbound_priority)
        .filter(|prio| {
            removed.iter().any(|(p, _)| p == prio)
                && !kept.contains(prio)
                && !shaped.listeners.iter().any(|n| {
                    n.entry.filter.priority == *prio
                        && !removed.contains(&(*prio, n.entry.filter.handle))
                })
        })
        .collect()
}

/// Deleting what is left of a priority (the kernel's own root table of it).
/// The kernel removes a priority whose own root table loses its last node, so the priority may
/// already be gone: that counts as done.
fn delete_priority(ifindex: u32, prio: u16, dev: &Dev) -> Step {
    let protocol = if prio % 2 == 0 {
        crate::model::tc::ETH_P_IP
    } else {
        crate::model::tc::ETH_P_IPV6
    };
    let mut step = Step::tc(
        "delete-priority",
        Op::Delete,
        dev,
        whole_priority(ifindex, prio, protocol),
    );
    step.exists_ok = true;
    step
}

/// Deletes a node of a priority's root table (a listener node, a band's root link); undone by
/// creating it again in whatever root table the priority has then (the kernel may have removed
/// the old one with its last node).
fn delete_in_root_table(name: &str, dev: &Dev, mut before: Filter) -> Step {
    let node = U32Handle(before.handle).node();
    let mut step = Step::delete(name, dev, before.clone());
    before.handle = U32Handle::new(0, 0, node).0;
    if let FilterKind::U32(u) = &mut before.kind {
        u.hash = None;
    }
    step.undo = vec![Step::tc("restore-filter", Op::Create, dev, before)];
    step
}

/// The hook and the redirect an upload-side limit needs. `restore_mark`: this limit needs the
/// connection's mark restored first (an outbound's download); a redirect that already restores
/// it keeps doing so.
fn plan_redirect(
    ctx: &Context,
    obs: &Observation,
    restore_mark: bool,
    steps: &mut Vec<Step>,
    changes: &mut Vec<String>,
    d: &mut Decision,
) {
    let device = device_dev(&obs.device);
    let hook = obs.hook.as_ref();
    let parent = hook
        .and_then(|h| h.parent)
        .unwrap_or(TcHandle::CLSACT_INGRESS);
    if hook.and_then(|h| h.parent).is_none() {
        let clsact = Qdisc {
            ifindex: obs.device.index,
            handle: TcHandle::INGRESS_QDISC,
            parent: TcHandle::INGRESS,
            kind: QdiscKind::Clsact,
        };
        steps.push(Step::create("create-ingress-hook", &device, clsact));
    }
    d.forms.push(format!(
        "upload redirect to {}: {}{}, on the {} hook",
        ifb_dev(obs).name(),
        ctx.catch_all.reason(),
        if restore_mark {
            ", after connmark restores the connection's mark"
        } else {
            ""
        },
        if parent == TcHandle::INGRESS_QDISC {
            "existing ingress qdisc"
        } else {
            "clsact ingress"
        }
    ));
    let ifb_index = obs.ifb.as_ref().map(|l| l.index).unwrap_or(0);
    let observed = hook.and_then(|h| h.redirect.as_ref());
    let restore_mark = restore_mark || observed.is_some_and(|(f, _)| restores_mark(&f.filter));
    let want = shaping::redirect(
        obs.device.index,
        parent,
        ifb_index,
        ctx.catch_all,
        restore_mark,
    );
    match observed {
        Some((f, target)) if *target == ifb_index && obs.ifb.is_some() => {
            if restore_mark && !restores_mark(&f.filter) {
                changes.push(format!(
                    "the ingress redirect on {} now restores connection marks first",
                    obs.device.name
                ));
                steps.extend(swap_redirect(obs, &f.filter, true));
            }
        }
        Some((f, _)) => {
            changes.push(format!(
                "the ingress redirect on {} pointed elsewhere",
                obs.device.name
            ));
            let before = f.filter.clone();
            steps.push(
                redirect_step(obs, "delete-stale-redirect", Op::Delete, before.clone()).undone_by(
                    vec![Step::tc("restore-redirect", Op::Create, &device, before)],
                ),
            );
            let delete = redirect_step(obs, "delete-redirect", Op::Delete, want.clone());
            steps.push(
                redirect_step(obs, "create-redirect", Op::Create, want).undone_by(vec![delete]),
            );
        }
        None => {
            let delete = redirect_step(obs, "delete-redirect", Op::Delete, want.clone());
            steps.push(
                redirect_step(obs, "create-redirect", Op::Create, want).undone_by(vec![delete]),
            );
        }
    }
}

/// A step on the device's ingress redirect, sending to the IFB (its index filled in at
/// execution when the IFB is created in the same run).
fn redirect_step(obs: &Observation, name: &str, op: Op, f: Filter) -> Step {
    Step {
        name: name.to_string(),
        action: Operation::Tc {
            op,
            dev: device_dev(&obs.device),
            object: TcObject::Filter(f),
            redirect_to: Some(ifb_dev(obs)),
        },
        undo: Vec::new(),
        exists_ok: false,
    }
}

/// The IFB companion: by index when it exists; by name when this run creates it (index 0 until
/// then), found when its step runs.
fn ifb_dev(obs: &Observation) -> Dev {
    match &obs.ifb {
        Some(l) if l.index != 0 => device_dev(l),
        _ => Dev::Ifb(shaping::ifb_name(obs.device.index)),
    }
}

/// Puts a redirect that does (`restore_mark`) or does not restore the connection's mark in place
/// of the observed one, in the same form. matchall filters cannot be changed in place, so the
/// old one goes and the new one comes; arriving packets pass unshaped in between.
fn swap_redirect(obs: &Observation, old: &Filter, restore_mark: bool) -> Vec<Step> {
    let form = CatchAll::choose(matches!(old.kind, FilterKind::MatchAll(_)));
    let target = obs.ifb.as_ref().map_or(0, |l| l.index);
    let want = shaping::redirect(obs.device.index, old.parent, target, form, restore_mark);
    vec![
        redirect_step(obs, "delete-redirect", Op::Delete, old.clone()).undone_by(vec![
            redirect_step(obs, "restore-redirect", Op::Create, old.clone()),
        ]),
        redirect_step(obs, "create-redirect", Op::Create, want.clone()).undone_by(vec![
            redirect_step(obs, "delete-redirect", Op::Delete, want),
        ]),
    ]
}

/// The mask an fw filter compares under (all bits when it names none).
fn fw_mask(f: &Filter) -> u32 {
    match &f.kind {
        FilterKind::Fw(fw) => fw.mask.unwrap_or(u32::MAX),
        _ => u32::MAX,
    }
}

/// Deletes the subject's nft rules; the table goes with the last rule in it. Undone by putting
/// the table, its chains and the rules back.
fn delete_nft_rules(ctx: &Context, obs: &Observation, rules: &[ManagedRule]) -> Step {
    let mut ops: Vec<NftOp> = rules
        .iter()
        .map(|r| NftOp::DeleteRule {
            chain: r.chain.clone(),
            handle: r.handle,
        })
        .collect();
    let others = match &obs.nft {
        Some(Ok(s)) => s.rules.len() - rules.len() + s.foreign.len(),
        _ => 1,
    };
    let mut undo_ops = Vec::new();
    if others == 0 {
        ops.push(NftOp::DeleteTable);
        undo_ops.push(NftOp::AddTable);
        if let Some(Ok(s)) = &obs.nft {
            for chain in [CHAIN_CLASSIFY, CHAIN_SAVE] {
                if s.chains.iter().any(|c| c == chain) {
                    undo_ops.push(NftOp::AddChain(chain));
                }
            }
        }
    }
    undo_ops.extend(rules.iter().filter_map(|r| {
        r.tag.clone().map(|tag| NftOp::AddRule {
            rule: r.rule.clone(),
            tag,
        })
    }));
    let netns = ctx.netns_path.clone();
    Step::new(
        "delete-nft-rule",
        Operation::Nft {
            netns: netns.clone(),
            ops,
        },
    )
    .undone_by(vec![Step::new(
        "restore-nft-rule",
        Operation::Nft {
            netns,
            ops: undo_ops,
        },
    )])
}

fn plan_remove(ctx: &Context, rule: &Rule, obs: &Observation, d: &mut Decision) {
    let req = &ctx.request;
    let dev = shaped_dev(req, obs);
    let ifindex = dev_index(&dev);
    d.kind = DecisionKind::Remove;
    let Some(shaped) = obs.shaped.as_ref().filter(|s| s.is_managed()) else {
        d.kind = DecisionKind::NoOp;
        d.reason = format!(
            "no managed root exists on {}, so there is nothing to remove",
            dev.name()
        );
        return;
    };
    // A removal takes the subject's own filters only: a user's by its class, never by the
    // addresses it has now (another user may hold one of them).
    let mut held = held(shaped, rule, ctx.remembered_minor);
    held.conflicts.clear();
    let marks = held.add_marks(
        rule,
        obs,
        (&req.subject.key().to_string(), req.on_egress()),
        Some(shaped),
    );
    let class_minor = held.class.map(|c| c.minor());
    if held.filters.is_empty()
        && held.listeners.is_empty()
        && marks.is_empty()
        && class_minor.is_none()
    {
        d.kind = DecisionKind::NoOp;
        d.reason = format!(
            "no rule for {} {} was observed on {}",
            req.subject,
            req.direction.name(),
            dev.name()
        );
        return;
    }
    d.observed_class = held.class;
    let mut steps = Vec::new();
    if !marks.is_empty() {
        // The rule goes before its class.
        steps.push(delete_nft_rules(ctx, obs, &marks));
    }
    let mut removed = BTreeSet::new();
    for (_, f) in &held.filters {
        let mut before = f.clone();
        before.ifindex = ifindex;
        removed.insert((f.priority, f.handle));
        // The baseline is alone in its priority: the priority goes with it, kernel table too.
        // The delete names the observed kind (matchall or u32): the kernel refuses another.
        let delete = match rule {
            Rule::Baseline => Filter {
                handle: 0,
                ..before.clone()
            },
            Rule::Nodes { .. } | Rule::Listener { .. } | Rule::Mark { .. } => before.clone(),
        };
        steps.push(
            Step::tc("delete-filter", Op::Delete, &dev, delete).undone_by(vec![Step::tc(
                "restore-filter",
                Op::Create,
                &dev,
                before,
            )]),
        );
    }
    for (_, f) in &held.listeners {
        let mut before = f.clone();
        before.ifindex = ifindex;
        removed.insert((f.priority, f.handle));
        steps.push(delete_in_root_table("delete-filter", &dev, before));
    }
    // The last node of a bucket or a band takes their tables and links with it.
    if let Rule::Nodes { band, .. } = rule {
        let emptied =
            bands::delete_emptied(shaped, *band, &removed, &BTreeSet::new(), (&dev, ifindex));
        steps.extend(emptied);
    }
    for prio in emptied_listener_priorities(shaped, &removed, &BTreeSet::new()) {
        steps.push(delete_priority(ifindex, prio, &dev));
    }
    if let Some(minor) = class_minor {
        let mut before = shaped.classes[&minor].class.clone();
        before.parent = shaping::root_handle();
        steps.push(Step::delete("delete-class", &dev, before));
    }
    // Shared scaffolding goes only when nothing managed is left on it.
    let classes_left = shaped.classes.len() - usize::from(class_minor.is_some());
    let nodes_left = shaped.node_count()
        + shaped.listeners.len()
        + shaped.marks.len()
        + usize::from(shaped.baseline.is_some())
        - removed.len();
    let empty = classes_left == 0 && nodes_left == 0 && shaped.unrecognised.is_empty();
    if empty {
        let root = shaping::root_qdisc(ifindex);
        steps.push(Step::delete("delete-root-qdisc", &dev, root));
        if !req.on_egress() {
            remove_upload_scaffolding(obs, &mut steps);
        }
    } else if !req.on_egress() {
        // The last outbound download on the IFB: arriving packets keep their own marks again.
        let marks_left = shaped
            .marks
            .keys()
            .any(|v| !removed.contains(&(shaping::BAND_OUTBOUND, *v)));
        let redirect = obs.hook.as_ref().and_then(|h| h.redirect.as_ref());
        if let Some((f, _)) = redirect.filter(|(f, _)| restores_mark(&f.filter) && !marks_left) {
            steps.extend(swap_redirect(obs, &f.filter, false));
        }
    }
    d.reason = match (
        held.filters.is_empty() && held.listeners.is_empty() && marks.is_empty(),
        empty,
    ) {
        (false, true) => {
            "the rule was observed; it was the last managed rule here, so the shared root goes too"
                .into()
        }
        (false, false) => "the rule was observed; other managed rules stay".into(),
        (true, _) => {
            "only the subject's class was left (its filter was gone); it is removed".into()
        }
    };
    d.steps = steps;
}

fn remove_upload_scaffolding(obs: &Observation, steps: &mut Vec<Step>) {
    let device = device_dev(&obs.device);
    if let Some(hook) = &obs.hook {
        if let Some((f, _)) = &hook.redirect {
            steps.push(Step::delete("delete-redirect", &device, f.filter.clone()));
        }
        // The hook goes only if nothing else (another tool's filter) lives on it.
        if hook.others == 0 && hook.conflicting.is_none() && hook.parent.is_some() {
            let kind = if hook.clsact {
                QdiscKind::Clsact
            } else {
                QdiscKind::Ingress
            };
            let q = Qdisc {
                ifindex: obs.device.index,
                handle: TcHandle::INGRESS_QDISC,
                parent: TcHandle::INGRESS,
                kind,
            };
            steps.push(Step::delete("delete-ingress-hook", &device, q));
        }
    }
    if let Some(ifb) = &obs.ifb {
        let name = ifb.name.clone();
        steps.push(
            Step::new("delete-ifb", Operation::DeleteLink(device_dev(ifb))).undone_by(vec![
                Step::new("restore-ifb", Operation::CreateIfb(name.clone())),
                Step::new("set-ifb-up", Operation::SetUp(Dev::Ifb(name))),
            ]),
        );
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
            "real remove execution requires observed tc state; raylimit cannot tell which objects are the subject's without it".into()
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
            step.undo.clear();
        }
    }
}

#[cfg(test)]
mod tests;

//! Upload scaffolding: the device's ingress hook, the redirect into the IFB companion (with the
//! connection's mark restored first while an outbound download needs it), and their removal.

use super::*;

/// What the device's upload redirect must send to the IFB.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum RedirectNeeds {
    /// Every arriving packet: some rule matches beyond the runtimes' listeners (a device-wide
    /// rule, or an outbound's connection mark).
    CatchAll,
    /// Only packets for these runtime listeners; everything else arriving stays off the IFB.
    Listeners(BTreeSet<ListenerMatch>),
}

impl RedirectNeeds {
    /// What one rule needs redirected, as planned.
    pub(super) fn of(rule: &Rule) -> RedirectNeeds {
        let mut set = BTreeSet::new();
        match rule {
            Rule::Nodes { matches, .. } => {
                for m in matches {
                    match m.listener {
                        Some(l) => set.insert(l),
                        None => return RedirectNeeds::CatchAll,
                    };
                }
            }
            Rule::Listener { matches } => set.extend(matches.iter().copied()),
            Rule::Baseline { scope: Some(s) } => set.extend(s.iter().copied()),
            Rule::Baseline { scope: None } | Rule::Mark { .. } => return RedirectNeeds::CatchAll,
        }
        RedirectNeeds::Listeners(set)
    }

    /// What the redirect must carry once the rule whose filters are `held` needs `own`: its
    /// own needs, and those of every other rule on the IFB (`shaped`).
    pub(super) fn with_others(
        self,
        held: &Held,
        shaped: Option<&ShapedRoot>,
        obs: &Observation,
    ) -> RedirectNeeds {
        let RedirectNeeds::Listeners(mut set) = self else {
            return RedirectNeeds::CatchAll;
        };
        let restores = obs
            .hook
            .as_ref()
            .and_then(|h| h.redirect.as_ref())
            .is_some_and(|(f, _)| restores_mark(&f.filter));
        let Some(shaped) = shaped else {
            return RedirectNeeds::Listeners(set);
        };
        let held_here = |f: &Filter| {
            held.filters
                .iter()
                .map(|(_, h)| h)
                .chain(held.listeners.iter().map(|(_, h)| h))
                .any(|h| h.priority == f.priority && h.handle == f.handle)
        };
        let others_device_wide = shaped
            .baseline
            .as_ref()
            .is_some_and(|b| !held_here(&b.filter))
            || shaped.marks.values().any(|m| !held_here(&m.filter));
        if restores || others_device_wide {
            return RedirectNeeds::CatchAll;
        }
        for (listener, uses) in shaped.listener_uses() {
            let mine = held
                .filters
                .iter()
                .filter(|(m, _)| m.is_some_and(|m| m.listener == *listener))
                .count();
            if *uses > mine {
                match listener {
                    Some(l) => {
                        set.insert(*l);
                    }
                    None => return RedirectNeeds::CatchAll,
                }
            }
        }
        for n in &shaped.listeners {
            if !held_here(&n.entry.filter) {
                set.insert(n.matched);
            }
        }
        RedirectNeeds::Listeners(set)
    }
}

/// The device's ingress hook (clsact), created when missing; the parent its filters go under.
fn ensure_hook(obs: &Observation, steps: &mut Vec<Step>) -> TcHandle {
    let hook = obs.hook.as_ref();
    if let Some(parent) = hook.and_then(|h| h.parent) {
        return parent;
    }
    let clsact = Qdisc {
        ifindex: obs.device.index,
        handle: TcHandle::INGRESS_QDISC,
        parent: TcHandle::INGRESS,
        kind: QdiscKind::Clsact,
    };
    steps.push(Step::create(
        "create-ingress-hook",
        &device_dev(&obs.device),
        clsact,
    ));
    TcHandle::CLSACT_INGRESS
}

fn hook_name(parent: TcHandle) -> &'static str {
    if parent == TcHandle::INGRESS_QDISC {
        "existing ingress qdisc"
    } else {
        "clsact ingress"
    }
}

/// The scoped redirect: one node per listener in `set` (kept, repointed or created), then the
/// catch-all and the nodes of listeners no rule needs any more deleted.
pub(super) fn plan_listener_redirects(
    obs: &Observation,
    set: &BTreeSet<ListenerMatch>,
    steps: &mut Vec<Step>,
    changes: &mut Vec<String>,
    d: &mut Decision,
) {
    let parent = ensure_hook(obs, steps);
    let ifb = ifb_dev(obs);
    d.forms.push(format!(
        "upload redirect to {}: one u32 node per runtime listener (other arriving traffic stays off the IFB), on the {} hook",
        ifb.name(),
        hook_name(parent)
    ));
    let ifb_index = obs.ifb.as_ref().map(|l| l.index).unwrap_or(0);
    let empty = Vec::new();
    let hook = obs.hook.as_ref();
    let observed = hook.map_or(&empty, |h| &h.listeners);
    let device = obs.device.index;
    let mut used: BTreeSet<(u16, u32)> = observed
        .iter()
        .map(|(_, f, _)| (f.filter.priority, U32Handle(f.filter.handle).node()))
        .collect();
    for l in set {
        match observed.iter().find(|(m, _, _)| m == l) {
            Some((_, _, target)) if *target == ifb_index && obs.ifb.is_some() => {}
            Some((_, f, _)) => {
                changes.push(format!(
                    "the ingress redirect for listener {l} pointed elsewhere"
                ));
                let node = U32Handle(f.filter.handle).node();
                let mut want = shaping::listener_redirect(device, parent, ifb_index, *l, node);
                want.handle = f.filter.handle;
                let before = f.filter.clone();
                steps.push(
                    redirect_step(obs, "replace-redirect", Op::Replace, want).undone_by(vec![
                        redirect_step(obs, "restore-redirect", Op::Replace, before),
                    ]),
                );
            }
            None => {
                let prio = shaping::redirect_priority(l.family);
                let node =
                    shaping::allocate_node(&format!("redirect {l}"), |n| used.contains(&(prio, n)))
                        .unwrap_or(1);
                used.insert((prio, node));
                let want = shaping::listener_redirect(device, parent, ifb_index, *l, node);
                let delete = redirect_step(obs, "delete-redirect", Op::Delete, want.clone());
                steps.push(
                    redirect_step(obs, "create-redirect", Op::Create, want).undone_by(vec![delete]),
                );
            }
        }
    }
    let stale = observed.iter().filter(|(m, _, _)| !set.contains(m));
    let catch_all = hook.and_then(|h| h.redirect.as_ref()).map(|(f, _)| f);
    for f in stale.map(|(_, f, _)| f).chain(catch_all) {
        let before = f.filter.clone();
        steps.push(
            redirect_step(obs, "delete-redirect", Op::Delete, before.clone()).undone_by(vec![
                redirect_step(obs, "restore-redirect", Op::Create, before),
            ]),
        );
    }
}

/// The hook and the redirect an upload-side limit needs. `restore_mark`: this limit needs the
/// connection's mark restored first (an outbound's download); a redirect that already restores
/// it keeps doing so.
pub(super) fn plan_redirect(
    ctx: &Context,
    obs: &Observation,
    restore_mark: bool,
    steps: &mut Vec<Step>,
    changes: &mut Vec<String>,
    d: &mut Decision,
) {
    let device = device_dev(&obs.device);
    let hook = obs.hook.as_ref();
    let parent = ensure_hook(obs, steps);
    d.forms.push(format!(
        "upload redirect to {}: {}{}, on the {} hook",
        ifb_dev(obs).name(),
        ctx.catch_all.reason(),
        if restore_mark {
            ", after connmark restores the connection's mark"
        } else {
            ""
        },
        hook_name(parent)
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
    // The catch-all carries everything: scoped nodes left from before are not needed.
    for (_, f, _) in hook.map_or(&[][..], |h| &h.listeners[..]) {
        let before = f.filter.clone();
        steps.push(
            redirect_step(obs, "delete-redirect", Op::Delete, before.clone()).undone_by(vec![
                redirect_step(obs, "restore-redirect", Op::Create, before),
            ]),
        );
    }
}

/// A step on the device's ingress redirect, sending to the IFB (its index filled in at
/// execution when the IFB is created in the same run).
pub(super) fn redirect_step(obs: &Observation, name: &'static str, op: Op, f: Filter) -> Step {
    Step {
        name: name.into(),
        action: Operation::Tc {
            op,
            dev: device_dev(&obs.device),
            object: TcObject::Filter(f),
            redirect_to: Some(Box::new(ifb_dev(obs))),
        },
        undo: plan::Undo::Steps(Vec::new()),
        exists_ok: false,
    }
}

/// The IFB companion: by index when it exists; by name when this run creates it (index 0 until
/// then), found when its step runs.
pub(super) fn ifb_dev(obs: &Observation) -> Dev {
    match &obs.ifb {
        Some(l) if l.index != 0 => device_dev(l),
        _ => Dev::Ifb(shaping::ifb_name(obs.device.index).into()),
    }
}

/// Puts a redirect that does (`restore_mark`) or does not restore the connection's mark in place
/// of the observed one, in the same form. matchall filters cannot be changed in place, so the
/// old one goes and the new one comes; arriving packets pass unshaped in between.
pub(super) fn swap_redirect(obs: &Observation, old: &Filter, restore_mark: bool) -> Vec<Step> {
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

pub(super) fn remove_upload_scaffolding(ctx: &Context, obs: &Observation, steps: &mut Vec<Step>) {
    let device = device_dev(&obs.device);
    if let Some(hook) = &obs.hook {
        if let Some((f, _)) = &hook.redirect {
            steps.push(Step::delete("delete-redirect", &device, f.filter.clone()));
        }
        for (_, f, _) in &hook.listeners {
            steps.push(Step::delete("delete-redirect", &device, f.filter.clone()));
        }
        // The hook goes only if raylimit made it and nothing else (another tool's filter) lives
        // on it.
        if ctx.made_hook && hook.others == 0 && hook.conflicting.is_none() && hook.parent.is_some()
        {
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
    if let Some(ifb) = obs.ifb.as_ref().filter(|_| ctx.made_ifb) {
        let name = ifb.name.clone();
        steps.push(
            Step::new("delete-ifb", Operation::DeleteLink(device_dev(ifb))).undone_by(vec![
                Step::new("restore-ifb", Operation::CreateIfb(name.clone())),
                Step::new("set-ifb-up", Operation::SetUp(Dev::Ifb(name.into()))),
            ]),
        );
    }
}

//! The plan that takes a subject's rule away, and the shared scaffolding with the last rule.

use super::*;

pub(super) fn plan_remove(ctx: &Context, rule: &Rule, obs: &Observation, d: &mut Decision) {
    let req = &ctx.request;
    let dev = shaped_dev(req, obs);
    let ifindex = dev_index(&dev);
    d.kind = DecisionKind::Remove;
    let Some(shaped) = obs.shaped.as_ref().filter(|s| s.is_managed()) else {
        // The IFB and its root are gone (deleted by hand): a redirect left on the device sends
        // arriving packets nowhere, so it goes, with the scaffolding raylimit made.
        let redirects = obs
            .hook
            .as_ref()
            .is_some_and(|h| h.redirect.is_some() || !h.listeners.is_empty());
        if !req.on_egress() && redirects {
            let mut steps = Vec::new();
            remove_upload_scaffolding(ctx, obs, &mut steps);
            d.reason = std::borrow::Cow::Owned(format!(
                "no managed root exists on {}: the ingress redirect of {} that sent to it (dropping what it matched) goes",
                dev.name(),
                obs.device.name
            ));
            d.steps = steps;
            return;
        }
        d.kind = DecisionKind::NoOp;
        d.reason = std::borrow::Cow::Owned(format!(
            "no managed root exists on {}, so there is nothing to remove",
            dev.name()
        ));
        return;
    };
    // A removal takes the subject's own filters only: a user's by its class, never by the
    // addresses it has now (another user may hold one of them).
    let mut held = held(shaped, rule, ctx);
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
        d.reason = std::borrow::Cow::Owned(format!(
            "no rule for {} {} was observed on {}",
            req.subject,
            req.direction.name(),
            dev.name()
        ));
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
            // Another tool's filter in the priority keeps it: then only the node goes.
            Rule::Baseline { .. } if shaped.foreign_at(f.priority, None) => before.clone(),
            Rule::Baseline { .. } => Filter {
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
        steps.push(delete_class(&dev, shaped, minor));
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
        // Deleting the root takes everything under it at once, so the separate deletes go:
        // none of them then waits for the kernel to release a u32 table (an RCU grace period
        // after its link goes). Undoing it restores what they would have, in their order.
        let (tc, mut kept): (Vec<Step>, Vec<Step>) = steps
            .into_iter()
            .partition(|s| matches!(s.action, Operation::Tc { .. }));
        let root = Step::delete("delete-root-qdisc", &dev, shaping::root_qdisc(ifindex));
        let undo = root
            .undo_steps()
            .iter()
            .cloned()
            .chain(tc.iter().rev().flat_map(|s| s.undo_steps().into_owned()))
            .collect();
        kept.push(root.undone_by(undo));
        steps = kept;
        if !req.on_egress() {
            remove_upload_scaffolding(ctx, obs, &mut steps);
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
        } else if let RedirectNeeds::Listeners(set) =
            RedirectNeeds::Listeners(BTreeSet::new()).with_others(&held, Some(shaped), obs)
        {
            // What the other rules still need redirected: listeners only this rule used go.
            let hook = obs.hook.as_ref();
            let observed: BTreeSet<ListenerMatch> = hook
                .map(|h| h.listeners.iter().map(|(m, _, _)| *m).collect())
                .unwrap_or_default();
            if observed != set || redirect.is_some() {
                let mut changes = Vec::new();
                plan_listener_redirects(obs, &set, &mut steps, &mut changes, d);
            }
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

//! The plan that puts a subject's rule in place, or repairs it: scaffolding, the class (kept,
//! changed in place or created), then the family's filters, then (upload) the redirect.

use super::*;

pub(super) fn plan_apply(ctx: &Context, rule: &Rule, obs: &Observation, d: &mut Decision) {
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
            d.blocked = Some(Blocked::Reason(format!(
                "{} has no live client address to limit",
                req.subject
            )));
            return;
        }
    }
    let mut held = shaped.map(|s| held(s, rule, ctx)).unwrap_or_default();
    let marks = held.add_marks(
        rule,
        obs,
        (&req.subject.key().to_string(), req.on_egress()),
        shaped,
    );
    if !held.conflicts.is_empty() && d.blocked.is_none() {
        d.blocked = Some(Blocked::Reason(format!(
            "another rule of the {} band on {} already classifies {}; remove that rule first",
            req.subject.kind(),
            dev.name(),
            held.conflicts.join(", ")
        )));
    }

    // Scaffolding for upload: the IFB companion, up.
    if !req.on_egress() {
        match &obs.ifb {
            None => {
                let name = shaping::ifb_name(obs.device.index);
                steps.push(
                    Step::new("create-ifb", Operation::CreateIfb(name.clone())).undone_by(vec![
                        Step::new(
                            "delete-ifb",
                            Operation::DeleteLink(Dev::Ifb(name.as_str().into())),
                        ),
                    ]),
                );
                steps.push(Step::new(
                    "set-ifb-up",
                    Operation::SetUp(Dev::Ifb(name.into())),
                ));
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
                d.blocked = Some(Blocked::Reason(format!(
                    "every class minor under {} is in use",
                    shaping::root_handle()
                )));
                return;
            };
            let frame = shaping::frame_bytes(obs.device.mtu);
            let class = shaping::class(ifindex, minor, rate, ctx.leaf, frame);
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
            let leaf = shaping::leaf_qdisc(ifindex, minor, rate, ctx.leaf, frame);
            let old_leaf =
                observed_class_entry.and_then(|_| shaped.and_then(|s| s.leaves.get(&minor)));
            plan_leaf(&dev, leaf, old_leaf, &mut steps, &mut changes);
            class.handle
        }
        // The root itself: HTB sends it through its direct queue, unshaped.
        _ => shaping::root_handle(),
    };
    d.expected_class = (target_class.minor() != 0).then_some(target_class);

    match rule {
        Rule::Baseline { scope: None } => {
            // Device-wide: the runtime-scoped nodes, if any, give way to the catch-all.
            delete_listener_nodes(&held, shaped, (&dev, ifindex), &mut steps, &mut changes);
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
            d.forms.push(format!(
                "baseline filter: {}, device-wide as asked",
                ctx.catch_all.reason()
            ));
        }
        Rule::Baseline {
            scope: Some(matches),
        } => {
            // Scoped: a device-wide catch-all goes first (it would match everything before the
            // nodes), then one node per runtime listener.
            if let Some((_, old)) = held.filters.first() {
                let mut before = old.clone();
                before.ifindex = ifindex;
                let delete = Filter {
                    handle: 0,
                    ..before.clone()
                };
                changes
                    .push("the device-wide baseline gives way to the runtime's listeners".into());
                steps.push(
                    Step::tc("delete-filter", Op::Delete, &dev, delete).undone_by(vec![Step::tc(
                        "restore-filter",
                        Op::Create,
                        &dev,
                        before,
                    )]),
                );
            }
            plan_listeners(
                (ListenerBand::Baseline, matches),
                &held,
                shaped,
                (&dev, ifindex, shaping::listener_end(req.direction)),
                target_class,
                &mut steps,
                &mut changes,
            );
            d.forms.push(
                "baseline filter: one u32 node per runtime listener (its port, and its address when concrete)"
                    .into(),
            );
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
                d.blocked = Some(Blocked::MaskConflict {
                    device: dev.name().to_string(),
                    mask: fw_mask(&other.filter),
                    filter: other.filter.to_string(),
                });
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
            (ListenerBand::Inbound, matches),
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
            changes.push(format!("class {} is no longer needed", old.class.handle));
            let shaped = shaped.expect("an observed class is on a shaped root");
            steps.push(delete_class(&dev, shaped, old.class.handle.minor()));
        }
    }

    // Upload: the hook on the device and the redirect into the IFB, last, once the tree exists.
    // Scoped to the runtimes' listeners while every rule on the IFB is; else every packet.
    if !req.on_egress() {
        let restore_mark = matches!(rule, Rule::Mark { .. });
        match RedirectNeeds::of(rule).with_others(&held, shaped, obs) {
            RedirectNeeds::Listeners(set) if !restore_mark => {
                plan_listener_redirects(obs, &set, &mut steps, &mut changes, d)
            }
            _ => plan_redirect(ctx, obs, restore_mark, &mut steps, &mut changes, d),
        }
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
        _ => changes.join("; ").into(),
    };
    d.steps = steps;
}

/// Deletes every listener node `held` has (a scoped baseline's, when it becomes device-wide),
/// and the priorities they leave empty.
fn delete_listener_nodes(
    held: &Held,
    shaped: Option<&ShapedRoot>,
    (dev, ifindex): (&Dev, u32),
    steps: &mut Vec<Step>,
    changes: &mut Vec<String>,
) {
    let mut removed = BTreeSet::new();
    for (m, old) in &held.listeners {
        let mut before = old.clone();
        before.ifindex = ifindex;
        changes.push(format!(
            "listener {m} gives way to the device-wide baseline"
        ));
        removed.insert((old.priority, old.handle));
        steps.push(delete_in_root_table("delete-filter", dev, before));
    }
    if let Some(shaped) = shaped {
        for prio in emptied_listener_priorities(shaped, &removed, &BTreeSet::new()) {
            steps.push(delete_priority(ifindex, prio, dev));
        }
    }
}

/// Puts the class's leaf qdisc in place: created with a new class, replaced when the observed
/// one differs (a hand edit, an older layout, a new rate), removed when the kernel has no leaf
/// raylimit could use and an old one is still there.
fn plan_leaf(
    dev: &Dev,
    want: Option<Qdisc>,
    old: Option<&Qdisc>,
    steps: &mut Vec<Step>,
    changes: &mut Vec<String>,
) {
    match (want, old) {
        (Some(want), Some(old)) if leaf_matches(old, &want) => {}
        // Under its own handle the kernel changes a qdisc in place only into its own kind, and
        // an fq_codel never into another flow count: otherwise the old one goes and the wanted
        // one is made. Under another handle the wanted one is made over it (below).
        (Some(want), Some(old)) if old.handle == want.handle && !changes_in_place(old, &want) => {
            changes.push(format!("the leaf under {} is replaced", want.parent));
            let mut old = old.clone();
            old.parent = want.parent;
            steps.push(Step::delete("delete-leaf", dev, old));
            steps.push(Step::create("create-leaf", dev, want));
        }
        (Some(want), Some(old)) => {
            changes.push(format!("the leaf under {} is replaced", want.parent));
            let mut before = old.clone();
            before.parent = want.parent;
            // In place, a change (which never names an fq_codel's flow count); over another
            // handle, a replace that makes the wanted leaf whole.
            let op = match old.handle == want.handle {
                true => Op::Change,
                false => Op::Replace,
            };
            steps.push(
                Step::tc("replace-leaf", op, dev, want).undone_by(vec![Step::tc(
                    "restore-leaf",
                    op,
                    dev,
                    before,
                )]),
            );
        }
        (Some(want), None) => steps.push(Step::create("create-leaf", dev, want)),
        (None, Some(old)) => {
            let mut old = old.clone();
            old.parent = TcHandle::new(ROOT_MAJOR, old.parent.minor());
            steps.push(Step::delete("delete-leaf", dev, old));
        }
        (None, None) => {}
    }
}

/// The observed leaf is the wanted one: same handle, kind and options.
fn leaf_matches(old: &Qdisc, want: &Qdisc) -> bool {
    old.handle == want.handle && old.kind == want.kind
}

/// The kernel can change `old` into `want` in place: the same kind (it refuses another kind
/// under one handle), and for fq_codel the same flow count (fixed when it is made).
fn changes_in_place(old: &Qdisc, want: &Qdisc) -> bool {
    match (&old.kind, &want.kind) {
        (QdiscKind::FqCodel(a), QdiscKind::FqCodel(b)) => a.flows == b.flows,
        (a, b) => std::mem::discriminant(a) == std::mem::discriminant(b),
    }
}

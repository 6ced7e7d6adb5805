//! Listener nodes (an inbound's, or the runtime-scoped baseline's), and deleting what is left of
//! a priority.

use super::*;

/// The listener nodes of `band`: each wanted one kept, repaired or created (node ids free in the
/// band's priority), nodes no longer wanted deleted, and a priority left empty deleted whole.
pub(super) fn plan_listeners(
    (band, matches): (ListenerBand, &BTreeSet<ListenerMatch>),
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
        let prio = band.priority(m.family);
        let key = match band {
            ListenerBand::Inbound => format!("inbound {m}"),
            ListenerBand::Baseline => format!("baseline {m}"),
        };
        let node = match held.listeners.iter().find(|(hm, _)| hm == m) {
            Some((_, f)) => U32Handle(f.handle).node(),
            None => shaping::allocate_node(&key, |n| used.contains(&(prio, n))).unwrap_or(1),
        };
        used.insert((prio, node));
        let want = shaping::listener_node(ifindex, band, *m, end, node, target_class);
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
        changes.push(match band {
            ListenerBand::Inbound => format!("listener {m} is no longer the inbound's"),
            ListenerBand::Baseline => format!("listener {m} is no longer the runtime's"),
        });
        removed.insert((old.priority, old.handle));
        steps.push(delete_in_root_table("delete-filter", dev, before));
    }
    if let Some(shaped) = shaped {
        let wanted: BTreeSet<u16> = matches.iter().map(|m| band.priority(m.family)).collect();
        for prio in emptied_listener_priorities(shaped, &removed, &wanted) {
            steps.push(delete_priority(ifindex, prio, dev));
        }
    }
}

/// Listener-band priorities left with no node once `removed` are gone.
pub(super) fn emptied_listener_priorities(
    shaped: &ShapedRoot,
    removed: &BTreeSet<(u16, u32)>,
    kept: &BTreeSet<u16>,
) -> Vec<u16> {
    [ListenerBand::Baseline, ListenerBand::Inbound]
        .into_iter()
        .flat_map(|b| [b.priority(Family::V4), b.priority(Family::V6)])
        .filter(|prio| {
            removed.iter().any(|(p, _)| p == prio)
                && !kept.contains(prio)
                && !shaped.foreign_at(*prio, None)
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
pub(super) fn delete_priority(ifindex: u32, prio: u16, dev: &Dev) -> Step {
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
pub(super) fn delete_in_root_table(name: &'static str, dev: &Dev, mut before: Filter) -> Step {
    let node = U32Handle(before.handle).node();
    let step = Step::delete(name, dev, before.clone());
    before.handle = U32Handle::new(0, 0, node).0;
    if let FilterKind::U32(u) = &mut before.kind {
        u.hash = None;
    }
    step.undone_by(vec![Step::tc("restore-filter", Op::Create, dev, before)])
}

//! Upload scaffolding: the device's ingress hook, the redirect into the IFB companion (with the
//! connection's mark restored first while an outbound download needs it), and their removal.

use super::*;

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
pub(super) fn redirect_step(obs: &Observation, name: &str, op: Op, f: Filter) -> Step {
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
pub(super) fn ifb_dev(obs: &Observation) -> Dev {
    match &obs.ifb {
        Some(l) if l.index != 0 => device_dev(l),
        _ => Dev::Ifb(shaping::ifb_name(obs.device.index)),
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

pub(super) fn remove_upload_scaffolding(obs: &Observation, steps: &mut Vec<Step>) {
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

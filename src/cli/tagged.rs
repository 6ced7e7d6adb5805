//! `limit --inbound TAG` and `limit --outbound TAG`: the runtime's config gives the listener or
//! the socket mark, and the subject is then decided like any other.

use serde_json::json;

use super::limit::{Session, Validated};
use super::report::{EvidenceView, LimitReport};
use crate::policy::{Subject, Want};
use crate::xray::config::{Mark, L4};
use crate::xray::verdict;

/// `--inbound TAG`: the listener from the runtime's config, decided like any other subject.
pub fn inbound(session: &mut Session, v: &Validated) -> LimitReport {
    let Subject::Inbound { tag, .. } = &v.request.subject else {
        unreachable!("called for --inbound only")
    };
    let listener = session
        .runtime
        .load_config()
        .and_then(|cfg| verdict::inbound(&cfg, tag));
    let mut view = EvidenceView::default();
    let resolved = listener.map(|l| {
        let l4: Vec<&str> = l.l4.iter().map(|p: &L4| p.name()).collect();
        view.line("Selector", l.describe());
        view.line("Transports", l4.join(", "));
        for n in &l.notes {
            view.line("Note", n);
        }
        view.json = json!({"concrete": true, "selector": l.describe(), "notes": l.notes,
                               "address": l.address.map(|a| a.to_string()), "port": l.port});
        Subject::Inbound {
            tag: tag.clone(),
            address: l.address,
            port: l.port,
        }
    });
    decide(session, v, resolved, view)
}

/// Decides the subject the config resolved, or blocks with why it could not be resolved. A
/// removal needs no config: the rule is found by its annotated class or its nft tag.
fn decide(
    session: &mut Session,
    v: &Validated,
    resolved: Result<Subject, String>,
    mut view: EvidenceView,
) -> LimitReport {
    let mut request = v.clone();
    let blocked = match resolved {
        Ok(subject) => {
            request.request.subject = subject;
            None
        }
        Err(why) => {
            view.line("Selector", format!("none: {why}"));
            view.json = json!({"concrete": false, "blocked": why});
            (v.request.want != Want::Remove).then_some(why)
        }
    };
    let mut report = session.one(&request, None, blocked);
    report.evidence = Some(view);
    report
}

/// `--outbound TAG`: the outbound's socket mark from the config, read under `--mark-mask`.
pub fn outbound(session: &mut Session, v: &Validated) -> LimitReport {
    let Subject::Outbound { tag, mask, .. } = &v.request.subject else {
        unreachable!("called for --outbound only")
    };
    let mask = *mask;
    let cfg = session.runtime.load_config();
    let mark = cfg.as_ref().map_err(String::clone).and_then(|cfg| {
        let m = verdict::outbound(cfg, tag)?;
        if m.mark & !mask != 0 {
            return Err(format!(
                "socket mark {:#x} of outbound {tag:?} has bits outside the mark mask {mask:#010x}; give the outbound a mark inside the mask, or a --mark-mask that covers it",
                m.mark
            ));
        }
        // Under the mask, the mark must still tell this outbound apart from the others.
        if let Some(other) = cfg.merged.outbounds.iter().find(|o| {
            o.tag != *tag && matches!(o.mark, Mark::Set(x) if x & mask == m.mark & mask)
        }) {
            return Err(format!(
                "under the mark mask {mask:#010x}, socket mark {:#x} of outbound {tag:?} equals outbound {:?}'s, so it does not tell them apart",
                m.mark, other.tag
            ));
        }
        Ok(m)
    });
    let mut view = EvidenceView::default();
    let resolved = mark.map(|m| {
        view.line("Selector", m.describe());
        view.line("Mark mask", format!("{mask:#010x}"));
        for n in &m.notes {
            view.line("Note", n);
        }
        view.json = json!({"concrete": true, "selector": m.describe(), "mark": m.mark,
                               "mark_mask": mask, "notes": m.notes});
        Subject::Outbound {
            tag: tag.clone(),
            mark: m.mark,
            mask,
        }
    });
    decide(session, v, resolved, view)
}

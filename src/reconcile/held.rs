//! What the kernel holds of a subject's rule on a managed root: its filters, listener nodes,
//! class and nft mark rules, and addresses another rule of its band already holds.

use super::*;

/// What the kernel holds of a subject's rule.
#[derive(Debug, Default)]
pub(super) struct Held {
    /// The subject's filters: what each matches (none for the baseline), and the filter.
    pub(super) filters: Vec<(Option<ClientMatch>, Filter)>,
    /// An inbound's listener nodes.
    pub(super) listeners: Vec<(ListenerMatch, Filter)>,
    /// The subject's leaf class, when it has one.
    pub(super) class: Option<TcHandle>,
    /// Addresses the subject wants that another rule of its band already holds.
    pub(super) conflicts: Vec<String>,
}

pub(super) fn leaf(c: Option<TcHandle>) -> Option<TcHandle> {
    c.filter(|c| c.major() == ROOT_MAJOR && c.minor() != 0)
}

/// Reads the subject's rule from a managed root. A user's rule is known by its class (from the
/// annotations); an IP's or a connection's by what its node matches.
pub(super) fn held(shaped: &ShapedRoot, rule: &Rule, remembered: Option<u16>) -> Held {
    let remembered = remembered
        .filter(|m| shaped.classes.contains_key(m))
        .map(|m| TcHandle::new(ROOT_MAJOR, m));
    let mut h = Held::default();
    match rule {
        // The baseline in either form: the device-wide catch-all, and the nodes of the
        // runtime-scoped baseline band (a scope change moves from one to the other).
        Rule::Baseline { .. } => {
            if let Some(f) = &shaped.baseline {
                h.class = leaf(classid_of(&f.filter));
                h.filters.push((None, f.filter.clone()));
            }
            for n in shaped
                .listeners
                .iter()
                .filter(|n| n.band == ListenerBand::Baseline)
            {
                h.class = h.class.or(leaf(n.classid));
                h.listeners.push((n.matched, n.entry.filter.clone()));
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
            let inbound = || {
                shaped
                    .listeners
                    .iter()
                    .filter(|n| n.band == ListenerBand::Inbound)
            };
            h.class = inbound()
                .filter(|n| matches.contains(&n.matched))
                .find_map(|n| leaf(n.classid))
                .or(remembered);
            for n in inbound() {
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
pub(super) fn held_marks(obs: &Observation, key: &str, egress: bool) -> Vec<ManagedRule> {
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
    pub(super) fn add_marks(
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
pub(super) fn mark_class(r: &ManagedRule) -> Option<TcHandle> {
    match r.rule {
        NftRule::MarkToPriority { priority, .. } => leaf(Some(TcHandle(priority))),
        _ => None,
    }
}

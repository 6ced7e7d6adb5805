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
/// Filters that send to a class another runtime's rule owns are never this rule's.
pub(super) fn held(shaped: &ShapedRoot, rule: &Rule, ctx: &Context) -> Held {
    let remembered = ctx
        .remembered_minor
        .filter(|m| shaped.classes.contains_key(m))
        .map(|m| TcHandle::new(ROOT_MAJOR, m));
    let foreign = |c: Option<TcHandle>| c.is_some_and(|c| ctx.foreign_classes.contains(&c.minor()));
    let mut h = Held::default();
    match rule {
        // The baseline in either form: the device-wide catch-all, and the nodes of the
        // runtime-scoped baseline band (a scope change moves from one to the other). Another
        // runtime's baseline in the other form would share the priority with another protocol,
        // which the kernel refuses.
        Rule::Baseline { scope } => {
            let baseline_nodes = || {
                shaped
                    .listeners
                    .iter()
                    .filter(|n| n.band == ListenerBand::Baseline)
            };
            match &shaped.baseline {
                Some(f) if !foreign(classid_of(&f.filter)) => {
                    h.class = leaf(classid_of(&f.filter));
                    h.filters.push((None, f.filter.clone()));
                }
                Some(f) if scope.is_some() => h.conflicts.push(format!(
                    "everything, device-wide, for another runtime ({})",
                    f.filter
                )),
                _ => {}
            }
            for n in baseline_nodes() {
                if !foreign(n.classid) {
                    h.class = h.class.or(leaf(n.classid));
                    h.listeners.push((n.matched, n.entry.filter.clone()));
                } else if scope.is_none() {
                    h.conflicts.push(format!(
                        "listener {} for another runtime's baseline",
                        n.matched
                    ));
                }
            }
            h.class = h.class.or(remembered);
        }
        // A user's rule is known by its class, whichever addresses it had.
        Rule::Nodes { band, matches } if *band == Band::User => {
            h.class = remembered;
            if let Some(class) = h.class {
                for n in shaped.nodes_to(*band, class) {
                    h.filters.push((Some(n.matched), n.entry.filter.clone()));
                }
            }
            h.conflicts = conflicts(shaped, *band, matches, h.class);
        }
        // An IP's or a connection's nodes: those matching what the rule wants, and those of the
        // same client still sending to its class (a listener that moved). Without a class of its
        // own (a removal after the annotations were lost), the client's nodes are the rule's
        // when they all send to one class.
        Rule::Nodes { band, matches } => {
            h.class = remembered.or_else(|| {
                matches
                    .iter()
                    .filter_map(|m| shaped.node_for(*band, *m))
                    .find(|n| !foreign(n.classid))
                    .and_then(|n| leaf(n.classid))
            });
            let clients: BTreeSet<ClientMatch> = matches.iter().map(|m| m.client()).collect();
            for c in clients {
                let nodes: Vec<&Node> = shaped
                    .nodes_of_client(*band, c)
                    .filter(|n| !foreign(n.classid))
                    .collect();
                if h.class.is_none() && matches.iter().all(|m| m.listener.is_none()) {
                    let classes: BTreeSet<_> = nodes.iter().map(|n| n.classid).collect();
                    if let [only] = classes.into_iter().collect::<Vec<_>>()[..] {
                        h.class = leaf(only);
                    }
                }
                for n in nodes {
                    if matches.contains(&n.matched) || (h.class.is_some() && n.classid == h.class) {
                        h.filters.push((Some(n.matched), n.entry.filter.clone()));
                    }
                }
            }
            h.conflicts = conflicts(shaped, *band, matches, h.class);
        }
        // An outbound's class is known from its fw filter, its nft rule (see `held_marks`) or
        // the annotations.
        Rule::Mark { value, .. } => {
            // A removal without the config (a prune, a reset) knows the class, not the mark.
            let by_class = || {
                remembered.and_then(|c| {
                    shaped
                        .marks
                        .values()
                        .find(|f| classid_of(&f.filter) == Some(c))
                })
            };
            if let Some(f) = value.and_then(|v| shaped.marks.get(&v)).or_else(by_class) {
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
                .filter(|n| matches.contains(&n.matched) && !foreign(n.classid))
                .find_map(|n| leaf(n.classid))
                .or(remembered);
            for n in inbound().filter(|n| !foreign(n.classid)) {
                if matches.contains(&n.matched) || (h.class.is_some() && n.classid == h.class) {
                    h.listeners.push((n.matched, n.entry.filter.clone()));
                }
            }
        }
    }
    h
}

/// Nodes of another rule in the band that would catch packets the rule wants (`ours`: its
/// class): the same client on an overlapping listener, or on every listener.
fn conflicts(
    shaped: &ShapedRoot,
    band: Band,
    matches: &BTreeSet<ClientMatch>,
    ours: Option<TcHandle>,
) -> Vec<String> {
    let mut found = Vec::new();
    for m in matches {
        for n in shaped.nodes_of_client(band, *m) {
            let mine = ours.is_some() && n.classid == ours;
            if mine || !overlap(n.matched, *m) || found.iter().any(|(k, _)| *k == n.handle()) {
                continue;
            }
            let to = n.classid.map(|c| c.to_string());
            found.push((
                n.handle(),
                format!(
                    "{} (sent to {})",
                    n.matched,
                    to.as_deref().unwrap_or("nothing")
                ),
            ));
        }
    }
    found.into_iter().map(|(_, text)| text).collect()
}

/// Two nodes of one client catch some of the same packets: either has no listener, or their
/// listeners share a port and an address (or a wildcard).
fn overlap(a: ClientMatch, b: ClientMatch) -> bool {
    match (a.listener, b.listener) {
        (Some(x), Some(y)) => {
            x.port == y.port
                && (x.address.is_none() || y.address.is_none() || x.address == y.address)
        }
        _ => true,
    }
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

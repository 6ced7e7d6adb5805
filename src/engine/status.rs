//! What `raylimit status` shows, read from the kernel: every managed root, class and filter in
//! the namespace, IFBs included, with subject, owner, direction, rate and live counters, and
//! raylimit's nft table.

use crate::evidence;
use crate::evidence::scope::Scope;
use crate::model::stats::TcStats;
use crate::model::tc::{ClassKind, TcEntry};
use crate::model::tc::{Filter, FilterEntry};
use crate::model::u32::End;
use crate::model::Link;
use crate::model::TcHandle;
use crate::netlink::nft::{self, NftRule, NftState};
use crate::netlink::{NetlinkError, RtSocket};
use crate::ownership::Annotation;
use crate::ownership::StateDir;
use crate::policy::SubjectKey;
use crate::reconcile::observe::Hook;
use crate::reconcile::observe::{classid_of, RootState, ShapedRoot};
use crate::reconcile::plan::{Dev, Step};
use crate::runtime::{self, Selection};
use crate::shaping::{self, Band, ListenerBand, ListenerMatch, IFB_PREFIX, ROOT_MAJOR};
use crate::xray::api::UserTraffic;
use std::collections::{BTreeMap, BTreeSet};

/// One managed rule as the kernel holds it.
pub struct Rule {
    pub subject: String,
    /// The direction the rule limits (an outbound's upload sits on the device's own egress,
    /// beside the download rules).
    pub direction: &'static str,
    /// A user's client addresses (an inbound's: its listener).
    pub clients: Vec<String>,
    /// The runtime listeners a runtime-scoped rule matches; none when it is device-wide.
    pub listeners: Vec<String>,
    /// A user's byte counters from the runtime's StatsService, or why there are none.
    pub user_traffic: Option<String>,
    /// A runtime-scoped rule whose listeners are no longer the runtime's: what they are now.
    pub scope_drift: Option<String>,
    /// The tc filter priority; none for a rule classified by nft.
    pub priority: Option<u16>,
    pub class: Option<TcHandle>,
    pub rate: Option<u64>,
    /// The class's leaf qdisc: `fq_codel` (flow queues with CoDel), `tbf` (segmenting,
    /// byte-limited FIFO), `pfifo` (HTB's default), or another kind put there by hand; none
    /// without a class.
    pub leaf: Option<String>,
    /// The bytes the leaf holds at most (TBF's limit, fq_codel's memory limit).
    pub leaf_queue_bytes: Option<u32>,
    /// The class's counters, its drops counting its leaf's (the unlimited exception has none of
    /// its own).
    pub stats: TcStats,
    /// Bytes per second over the sampling window, when status sampled one.
    pub throughput: Option<u64>,
    /// Drops during the sampling window.
    pub recent_drops: Option<u64>,
    pub owner: Option<String>,
    /// A rule no annotation records: its filters, so that status can say how to remove them.
    pub unowned_filters: Vec<Filter>,
}

impl Rule {
    /// A rule with its class's rate and live counters (none for the root itself: the unlimited
    /// exception has no leaf class).
    fn new(shaped: &ShapedRoot, subject: String, direction: &'static str) -> Rule {
        Rule {
            subject,
            direction,
            clients: Vec::new(),
            listeners: Vec::new(),
            user_traffic: None,
            scope_drift: None,
            priority: None,
            class: None,
            rate: None,
            leaf: None,
            leaf_queue_bytes: None,
            stats: TcStats::default(),
            throughput: None,
            recent_drops: None,
            owner: None,
            unowned_filters: Vec::new(),
        }
        .with_class(shaped, None)
    }

    fn with_class(mut self, shaped: &ShapedRoot, class: Option<TcHandle>) -> Rule {
        let entry = class
            .filter(|c| c.minor() != 0)
            .and_then(|c| shaped.classes.get(&c.minor()));
        self.class = class;
        self.rate = entry.and_then(|c| match &c.class.kind {
            ClassKind::Htb(h) => Some(h.rate),
            _ => None,
        });
        self.stats = entry.map(|c| c.stats).unwrap_or_default();
        let leaf = entry.map(|c| shaped.leaves.get(&c.class.handle.minor()));
        self.leaf = leaf.map(|l| match l {
            Some(q) => q.kind_name().to_string(),
            None => shaping::Leaf::Default.name().to_string(),
        });
        self.leaf_queue_bytes = leaf.flatten().and_then(|q| match &q.kind {
            crate::model::tc::QdiscKind::Tbf(t) => Some(t.limit),
            crate::model::tc::QdiscKind::FqCodel(f) => Some(f.memory_limit),
            _ => None,
        });
        self
    }

    /// HTB takes a packet whose skb priority names one of its classes before it runs any
    /// filter, so nft-classified rules come first, then filters by priority.
    fn precedence(&self) -> (u16, &str) {
        (self.priority.unwrap_or(0), &self.subject)
    }
}

/// One managed root: a device's egress (download) or its IFB's (upload).
pub struct Root {
    pub device: String,
    pub direction: &'static str,
    pub shaped_device: String,
    pub stats: TcStats,
    /// Rules in precedence order: the first that matches a packet takes it.
    pub rules: Vec<Rule>,
    /// Classes no filter points at (a crashed run, or a rule whose filter was removed by hand).
    pub orphan_classes: Vec<TcHandle>,
    pub unrecognised: Vec<String>,
    /// Why the root's limits are not in force, when they are not (upload without its redirect).
    pub not_in_force: Option<String>,
}

/// Something the kernel and the owner annotations disagree on, with what repairs it.
pub struct Drift {
    pub device: String,
    pub direction: String,
    pub subject: String,
    pub owner: Option<String>,
    pub problem: String,
    /// raylimit's arguments (after `raylimit [--netns NS]`) that repair it, when it can.
    pub raylimit: Option<Vec<String>>,
    /// The tc commands that repair it by hand (without `-n NS`).
    pub tc: Vec<String>,
}

/// A device and every qdisc, class and filter on it, as `raylimit show` lists them.
pub fn device_objects(
    netns: Option<&str>,
    device: &str,
) -> Result<(Link, Vec<TcEntry>), NetlinkError> {
    let mut sock = RtSocket::open_in(netns)?;
    let link = sock.link_by_name(device)?;
    let entries = sock.device_tc(link.index)?.entries();
    Ok((link, entries))
}

/// The optional tc features this kernel offers (`raylimit probe`).
pub fn probe() -> crate::netlink::probe::Capabilities {
    crate::netlink::probe::Capabilities::probe()
}

/// Everything `status` shows.
pub struct Status {
    pub roots: Vec<Root>,
    pub nft: Result<NftState, NetlinkError>,
    pub drift: Vec<Drift>,
    /// Why the owner annotations could not be read, when they could not.
    pub state_error: Option<String>,
}

/// The named network namespaces the owner annotations record limits in, that still exist.
pub fn annotated_namespaces() -> Vec<String> {
    let annotations = StateDir::from_env().load().unwrap_or_default();
    let names: std::collections::BTreeSet<String> = annotations
        .iter()
        .map(|a| a.netns.to_string())
        .filter(|n| !n.is_empty())
        .collect();
    // A name is one path component under /run/netns (the state file is not trusted further).
    names
        .into_iter()
        .filter(|n| !n.contains('/') && n != "." && n != "..")
        .filter(|n| std::path::Path::new("/run/netns").join(n).exists())
        .collect()
}

/// Reads every managed root in the namespace (or those of one device), compares it with the
/// owner annotations, and asks the runtimes for what only they know (listeners, user counters).
pub fn read(netns: Option<&str>, device: Option<&str>) -> Result<Status, NetlinkError> {
    let mut status = read_kernel(netns, device)?;
    add_user_traffic(&mut status.roots);
    check_scopes(&mut status.roots);
    Ok(status)
}

/// Where a device's ingress hook sends packets: the IFBs of its redirect filters.
struct Redirects {
    device: String,
    targets: Vec<(u32, FilterEntry)>,
}

/// The kernel's side of `status` with the annotations compared, without asking any runtime.
pub fn read_kernel(netns: Option<&str>, device: Option<&str>) -> Result<Status, NetlinkError> {
    let mut sock = RtSocket::open_in(netns)?;
    if let Some(d) = device {
        sock.link_by_name(d)?;
    }
    let links = sock.links()?;
    let nft = nft::dump(netns.map(|n| format!("/run/netns/{n}")).as_deref());
    // Unreadable annotations are reported, and the kernel is shown as if none were recorded.
    let (all_annotations, state_error) = match StateDir::from_env().load() {
        Ok(a) => (a, None),
        Err(e) => (Default::default(), Some(e.to_string())),
    };
    let netns_key = netns.unwrap_or("");
    // This namespace's annotations, by class (one lookup per rule, however many there are).
    let mut by_class: BTreeMap<(&str, u16), &Annotation> = BTreeMap::new();
    for a in all_annotations.iter().filter(|a| a.netns == netns_key) {
        if let Some(m) = a.class_minor.filter(|m| *m != 0) {
            by_class.insert((a.shaped_device.as_str(), m), a);
        }
    }
    let mut roots = Vec::new();
    let mut hooks = Vec::new();
    for link in &links {
        let (owner_device, direction) = owner_device(link, &links);
        if device.is_some_and(|d| d != owner_device) {
            continue;
        }
        let end = if direction == "upload" {
            End::Source
        } else {
            End::Destination
        };
        let tc = sock.device_tc(link.index)?;
        let hook = Hook::read(&tc);
        let targets: Vec<(u32, FilterEntry)> = hook
            .redirect
            .iter()
            .map(|(f, ifb)| (*ifb, f.clone()))
            .chain(hook.listeners.iter().map(|(_, f, ifb)| (*ifb, f.clone())))
            .collect();
        if !targets.is_empty() {
            hooks.push(Redirects {
                device: link.name.clone(),
                targets,
            });
        }
        let shaped = ShapedRoot::read(&tc, end);
        let RootState::Managed(root_entry) = &shaped.root else {
            continue;
        };
        let annotation_of = |class: Option<TcHandle>| {
            class.and_then(|c| by_class.get(&(link.name.as_str(), c.minor())).copied())
        };
        let mut rules = Vec::new();
        let mut referenced = BTreeSet::new();
        // A rule's nodes (one per client and runtime listener) share one class: one rule per
        // class, listing its clients (a user's addresses) and the listeners it is scoped to.
        type Group<'a> = (Vec<String>, BTreeSet<String>, Vec<&'a FilterEntry>);
        let mut groups: BTreeMap<(String, Option<TcHandle>), Group> = BTreeMap::new();
        for n in shaped.nodes() {
            let client = n.matched.client().to_string();
            let subject = match n.band {
                Band::User => "uuid".to_string(),
                Band::Connection => format!("connection {client}"),
                Band::Ip => format!("ip {client}"),
            };
            let g = groups.entry((subject, n.classid)).or_default();
            g.2.push(&n.entry);
            if n.band == Band::User && !g.0.contains(&client) {
                g.0.push(client);
            }
            g.1.extend(n.matched.listener.map(|l| l.to_string()));
        }
        // So do an inbound's listener nodes ("clients" lists its listener), and a
        // runtime-scoped baseline's.
        for n in &shaped.listeners {
            let (subject, g) = match n.band {
                ListenerBand::Inbound => ("inbound", 0),
                ListenerBand::Baseline => ("ip", 1),
            };
            let e = groups.entry((subject.to_string(), n.classid)).or_default();
            e.2.push(&n.entry);
            if g == 0 {
                e.0.push(n.matched.to_string());
            } else {
                e.1.insert(n.matched.to_string());
            }
        }
        let mut subjects = Vec::new();
        for ((subject, class), (clients, listeners, entries)) in groups {
            // A user, an inbound and the baseline are named by their class's annotation.
            let subject = if subject.contains(' ') {
                subject
            } else {
                annotation_of(class)
                    .map(|a| a.subject.to_string())
                    .unwrap_or_else(|| format!("{subject} (unknown)"))
            };
            subjects.push((
                subject,
                direction,
                clients,
                listeners.into_iter().collect(),
                entries,
            ));
        }
        if let Some(f) = &shaped.baseline {
            subjects.push((
                "ip all".to_string(),
                direction,
                Vec::new(),
                Vec::new(),
                vec![f],
            ));
        }
        // An outbound's rule shapes the other direction than the root's: its upload leaves
        // the device itself; its download comes back through the IFB.
        let outbound_direction = if direction == "upload" {
            "download"
        } else {
            "upload"
        };
        // An outbound's fw filter (where the kernel has cls_fw) is known by its class.
        for entry in shaped.marks.values() {
            let subject = annotation_of(classid_of(&entry.filter))
                .map(|a| a.subject.to_string())
                .unwrap_or_else(|| "outbound (unknown)".into());
            subjects.push((
                subject,
                outbound_direction,
                Vec::new(),
                Vec::new(),
                vec![entry],
            ));
        }
        // Without cls_fw, outbound rules classify in nft (meta priority), not in a tc filter.
        for r in nft.iter().flat_map(|n| &n.rules) {
            let NftRule::MarkToPriority { oif, priority, .. } = r.rule else {
                continue;
            };
            if oif != link.index {
                continue;
            }
            let class = TcHandle(priority);
            referenced.insert(class.minor());
            let subject = r
                .tag
                .as_ref()
                .map(|t| t.subject.clone())
                .unwrap_or_else(|| "outbound (unknown)".into());
            let mut rule = Rule::new(&shaped, subject, "upload").with_class(&shaped, Some(class));
            rule.owner = r.tag.as_ref().map(|t| t.owner.clone());
            rules.push(rule);
        }
        for (subject, rule_direction, clients, listeners, entries) in subjects {
            let entry = entries[0];
            let class = classid_of(&entry.filter);
            if let Some(c) = class {
                referenced.insert(c.minor());
            }
            // The class names the rule's owner (two runtimes may hold the same subject).
            let annotation = annotation_of(class).or_else(|| {
                let k = subject.parse::<SubjectKey>().ok()?;
                all_annotations
                    .for_subject(netns_key, &link.name, &k)
                    .next()
            });
            let mut rule = Rule::new(&shaped, subject, rule_direction).with_class(&shaped, class);
            if let Some(a) = annotation {
                rule.owner = Some(a.owner.to_string());
                if a.direction == "upload" || a.direction == "download" {
                    rule.direction = if a.direction == "upload" {
                        "upload"
                    } else {
                        "download"
                    };
                }
            }
            if annotation.is_none() {
                rule.unowned_filters = entries.iter().map(|e| e.filter.clone()).collect();
            }
            rule.priority = Some(entry.filter.priority);
            rule.clients = clients;
            rule.listeners = listeners;
            rules.push(rule);
        }
        rules.sort_by(|a, b| a.precedence().cmp(&b.precedence()));
        roots.push(Root {
            device: owner_device.to_string(),
            direction,
            shaped_device: link.name.clone(),
            stats: root_entry.stats,
            orphan_classes: shaped
                .classes
                .values()
                .map(|c| c.class.handle)
                .filter(|h| !referenced.contains(&h.minor()))
                .collect(),
            unrecognised: shaped
                .unrecognised
                .iter()
                .map(|f| f.filter.to_string())
                .collect(),
            rules,
            not_in_force: None,
        });
    }
    let drift = compare(
        &mut roots,
        &hooks,
        &links,
        all_annotations
            .iter()
            .filter(|a| a.netns == netns_key)
            .filter(|a| device.is_none_or(|d| a.device == d)),
    );
    Ok(Status {
        roots,
        nft,
        drift,
        state_error,
    })
}

/// Compares the kernel's roots with the annotations: what is recorded but gone or changed,
/// what is in raylimit's bands but not recorded, upload roots without their redirect, and
/// redirects to a device that no longer exists.
fn compare<'a>(
    roots: &mut [Root],
    hooks: &[Redirects],
    links: &[Link],
    annotations: impl Iterator<Item = &'a Annotation>,
) -> Vec<Drift> {
    let mut drift = Vec::new();
    let forget = |a: &Annotation| {
        [
            "reset",
            "--owner",
            &a.owner,
            "--device",
            &a.device,
            "--subject",
            &a.subject.to_string(),
            "--direction",
            &a.direction,
            "--execute",
        ]
        .map(str::to_string)
        .to_vec()
    };
    // Devices with recorded upload limits: removing those also removes their redirect.
    let mut recorded_upload = BTreeSet::new();
    for a in annotations {
        if a.direction == "upload" {
            recorded_upload.insert(a.device.clone());
        }
        let subject = a.subject.to_string();
        let root = roots.iter().find(|r| r.shaped_device == a.shaped_device);
        let rule = root.and_then(|r| {
            r.rules
                .iter()
                .find(|x| x.subject == subject && x.owner.as_deref() == Some(a.owner.as_str()))
        });
        let problem = match (root, rule) {
            _ if !links.iter().any(|l| l.name == a.device) => {
                let left = match links.iter().any(|l| l.name == a.shaped_device) {
                    true if a.shaped_device != a.device => {
                        format!(" (its IFB {} is left behind)", a.shaped_device)
                    }
                    _ => String::new(),
                };
                drift.push(Drift {
                    device: a.device.to_string(),
                    direction: a.direction.to_string(),
                    subject,
                    owner: Some(a.owner.to_string()),
                    problem: format!("recorded on {}, which no longer exists{left}", a.device),
                    raylimit: Some(forget(a)),
                    tc: Vec::new(),
                });
                continue;
            }
            _ if a.shaped_device != a.device
                && links
                    .iter()
                    .find(|l| l.name == a.device)
                    .is_some_and(|d| shaping::ifb_name(d.index) != a.shaped_device) =>
            {
                let left = links.iter().any(|l| l.name == a.shaped_device);
                drift.push(Drift {
                    device: a.device.to_string(),
                    direction: a.direction.to_string(),
                    subject,
                    owner: Some(a.owner.to_string()),
                    problem: format!(
                        "recorded on {}, the IFB of an earlier {} (the device was made again, with another ifindex){}",
                        a.shaped_device,
                        a.device,
                        if left { "; that IFB is left behind" } else { "" }
                    ),
                    raylimit: Some(forget(a)),
                    tc: left
                        .then(|| format!("ip link del {}", a.shaped_device))
                        .into_iter()
                        .collect(),
                });
                continue;
            }
            _ if !links.iter().any(|l| l.name == a.shaped_device) => {
                format!("recorded on {}, which no longer exists", a.shaped_device)
            }
            (None, _) => format!(
                "recorded, but raylimit's root on {} is gone (deleted by hand?)",
                a.shaped_device
            ),
            (Some(_), None) => "recorded, but its filter is gone (deleted by hand?)".into(),
            (Some(_), Some(r)) => match (a.class_minor, r.class) {
                (Some(m), Some(c)) if m != 0 && c.minor() != m => format!(
                    "recorded with class {}, but its filter now sends to {c} (changed by hand?)",
                    TcHandle((u32::from(ROOT_MAJOR) << 16) | u32::from(m))
                ),
                _ => continue,
            },
        };
        drift.push(Drift {
            device: a.device.to_string(),
            direction: a.direction.to_string(),
            subject,
            owner: Some(a.owner.to_string()),
            problem: match a.subject {
                SubjectKey::Ip(_) | SubjectKey::All | SubjectKey::Connection(_) => format!(
                    "{problem}: its runtime's next run on {} restores it, or forget it",
                    a.device
                ),
                _ => format!("{problem}: repeat its limit to restore it, or forget it"),
            },
            raylimit: Some(forget(a)),
            tc: Vec::new(),
        });
    }
    for root in roots.iter_mut() {
        let dev = Dev::Ifb(root.shaped_device.as_str().into());
        for rule in root.rules.iter().filter(|r| r.owner.is_none()) {
            drift.push(Drift {
                device: root.device.clone(),
                direction: rule.direction.into(),
                subject: rule.subject.clone(),
                owner: None,
                problem: "in raylimit's bands, but no annotation records it: a request for \
                          its subject adopts it, or remove it by hand"
                    .into(),
                raylimit: None,
                tc: rule
                    .unowned_filters
                    .iter()
                    .map(|f| Step::delete("delete-filter", &dev, f.clone()).command())
                    .chain(
                        rule.class.filter(|c| c.minor() != 0).map(|c| {
                            format!("tc class del dev {} classid {c}", root.shaped_device)
                        }),
                    )
                    .collect(),
            });
        }
        for c in &root.orphan_classes {
            drift.push(Drift {
                device: root.device.clone(),
                direction: root.direction.into(),
                subject: format!("class {c}"),
                owner: None,
                problem: "no filter sends to it (an interrupted run, or its filter was \
                          deleted by hand)"
                    .into(),
                raylimit: None,
                tc: vec![format!(
                    "tc class del dev {} classid {c}",
                    root.shaped_device
                )],
            });
        }
        if root.direction == "upload" {
            let ifindex = links
                .iter()
                .find(|l| l.name == root.shaped_device)
                .map(|l| l.index);
            let redirected = hooks.iter().any(|h| {
                h.device == root.device && h.targets.iter().any(|(t, _)| Some(*t) == ifindex)
            });
            if !redirected {
                let why = format!(
                    "{}'s ingress is not redirected to {}: these upload limits are not in force",
                    root.device, root.shaped_device
                );
                drift.push(Drift {
                    device: root.device.clone(),
                    direction: "upload".into(),
                    subject: "ingress redirect".into(),
                    owner: None,
                    problem: format!("{why}; the next upload run on the device restores it"),
                    raylimit: None,
                    tc: Vec::new(),
                });
                root.not_in_force = Some(why);
            }
        }
    }
    // A redirect to a device that is gone drops every packet it matches.
    for h in hooks {
        for (target, f) in &h.targets {
            if links.iter().any(|l| l.index == *target) {
                continue;
            }
            let problem = format!(
                "redirects to ifindex {target}, which no longer exists: the packets it matches \
                 are dropped"
            );
            let (problem, tc) = match recorded_upload.contains(h.device.as_str()) {
                true => (
                    format!("{problem}; removing the upload limits recorded here removes it"),
                    Vec::new(),
                ),
                false => (
                    problem,
                    vec![Step::delete(
                        "delete-redirect",
                        &Dev::Ifb(h.device.as_str().into()),
                        f.filter.clone(),
                    )
                    .command()],
                ),
            };
            drift.push(Drift {
                device: h.device.clone(),
                direction: "upload".into(),
                subject: "ingress redirect".into(),
                owner: None,
                problem,
                raylimit: None,
                tc,
            });
        }
    }
    drift
}

/// Class counters of every managed root in the namespace, by (shaped device, class minor),
/// and the roots' own (minor 0): what a throughput sample compares.
pub fn counters(
    netns: Option<&str>,
    shaped_devices: &BTreeSet<String>,
) -> Result<BTreeMap<(String, u16), TcStats>, NetlinkError> {
    let mut sock = RtSocket::open_in(netns)?;
    let mut out = BTreeMap::new();
    let mut leaf_drops = Vec::new();
    for link in sock.links()? {
        if !shaped_devices.contains(&link.name) {
            continue;
        }
        for e in sock.device_tc(link.index)?.entries() {
            match e {
                TcEntry::Class(c) if c.class.handle.major() == ROOT_MAJOR => {
                    out.insert((link.name.clone(), c.class.handle.minor()), c.stats);
                }
                TcEntry::Qdisc(q) if q.qdisc.handle.major() == ROOT_MAJOR => {
                    out.insert((link.name.clone(), 0), q.stats);
                }
                TcEntry::Qdisc(q) if q.qdisc.parent.major() == ROOT_MAJOR => {
                    let key = (link.name.clone(), q.qdisc.parent.minor());
                    leaf_drops.push((key, q.stats.drops));
                }
                _ => {}
            }
        }
    }
    for (key, drops) in leaf_drops {
        if let Some(class) = out.get_mut(&key) {
            class.drops = crate::reconcile::observe::with_leaf_drops(class.drops, drops);
        }
    }
    Ok(out)
}

/// The counters a status read holds, keyed as `counters` keys them (a live view compares one
/// read with the next without dumping twice).
pub fn counters_in(status: &Status) -> BTreeMap<(String, u16), TcStats> {
    let mut out = BTreeMap::new();
    for root in &status.roots {
        out.insert((root.shaped_device.clone(), 0), root.stats);
        for rule in &root.rules {
            if let Some(m) = rule.class.map(|c| c.minor()).filter(|m| *m != 0) {
                out.insert((root.shaped_device.clone(), m), rule.stats);
            }
        }
    }
    out
}

/// The shaped devices of a status's roots: what a throughput sample reads.
pub fn shaped_devices(status: &Status) -> BTreeSet<String> {
    status
        .roots
        .iter()
        .map(|r| r.shaped_device.clone())
        .collect()
}

/// Sets each rule's throughput and drops between two counter samples `seconds` apart, and the
/// latest counters.
pub fn apply_sample(
    status: &mut Status,
    before: &BTreeMap<(String, u16), TcStats>,
    after: &BTreeMap<(String, u16), TcStats>,
    seconds: f64,
) {
    let seconds = seconds.max(1e-3);
    for root in &mut status.roots {
        let key = |minor| (root.shaped_device.clone(), minor);
        if let Some(s) = after.get(&key(0)) {
            root.stats = *s;
        }
        for rule in &mut root.rules {
            let Some(minor) = rule.class.map(|c| c.minor()).filter(|m| *m != 0) else {
                continue;
            };
            let (Some(b), Some(a)) = (before.get(&key(minor)), after.get(&key(minor))) else {
                continue;
            };
            rule.stats = *a;
            rule.throughput = Some((a.bytes.saturating_sub(b.bytes) as f64 / seconds) as u64);
            rule.recent_drops = Some(u64::from(a.drops.saturating_sub(b.drops)));
        }
    }
}

/// A runtime's users (lower-case UUID, email) and their byte counters.
type RuntimeUsers = (Vec<(String, String)>, Vec<UserTraffic>);

/// The user a rule limits, when it is a uuid rule.
fn user_of(rule: &Rule) -> Option<String> {
    match rule.subject.parse() {
        Ok(SubjectKey::User(uuid)) => Some(uuid),
        _ => None,
    }
}

/// For each runtime-scoped baseline, whether its listener nodes are still the owning runtime's
/// listening sockets (a runtime restarted on another port, say); a rule whose runtime is not
/// running is left as it is.
fn check_scopes(roots: &mut [Root]) {
    let scoped = |r: &Rule| !r.listeners.is_empty() && r.owner.is_some();
    if !roots.iter().flat_map(|r| &r.rules).any(scoped) {
        return;
    }
    let found = runtime::discover(&runtime::Options::from_env(&Selection::default()));
    let mut now: BTreeMap<String, Option<BTreeSet<String>>> = BTreeMap::new();
    for rule in roots.iter_mut().flat_map(|r| r.rules.iter_mut()) {
        if !scoped(rule) {
            continue;
        }
        let owner = rule.owner.clone().unwrap_or_default();
        let listening = now.entry(owner.clone()).or_insert_with(|| {
            let rt = found.runtimes.iter().find(|r| r.owner() == owner)?;
            let cfg = rt.load_config().ok()?;
            let listeners = evidence::client_listeners(&cfg);
            let proc_root = evidence::Options::default().proc_root;
            match evidence::scope::scope(rt.pid(), &cfg, &listeners, &proc_root) {
                Scope::Listeners(endpoints) => Some(
                    endpoints
                        .iter()
                        .flat_map(|e| ListenerMatch::of_socket(e.local.ip(), e.local.port()))
                        .map(|m| m.to_string())
                        .collect(),
                ),
                Scope::Unscoped(_) => None,
            }
        });
        let Some(listening) = listening else {
            continue;
        };
        let held: BTreeSet<String> = rule.listeners.iter().cloned().collect();
        // A client rule holds the listeners of its client's family only.
        let family_of = |l: &str| l.starts_with('[');
        let families: BTreeSet<bool> = held.iter().map(|l| family_of(l)).collect();
        let wanted: BTreeSet<String> = listening
            .iter()
            .filter(|l| rule.subject == "ip all" || families.contains(&family_of(l)))
            .cloned()
            .collect();
        if held != wanted {
            let list: Vec<&str> = listening.iter().map(String::as_str).collect();
            rule.scope_drift = Some(format!(
                "the runtime now listens on {}; repeat its {} limit to repair",
                list.join(", "),
                rule.subject
            ));
        }
    }
}

/// For each uuid rule, the user's byte counters from the owning runtime's StatsService.
fn add_user_traffic(roots: &mut [Root]) {
    let wanted = roots
        .iter()
        .flat_map(|r| &r.rules)
        .any(|r| user_of(r).is_some() && r.owner.is_some());
    if !wanted {
        return;
    }
    let found = runtime::discover(&runtime::Options::from_env(&Selection::default()));
    // One API call per runtime, however many of its users are limited.
    let mut by_owner: BTreeMap<String, Result<RuntimeUsers, String>> = BTreeMap::new();
    for rule in roots.iter_mut().flat_map(|r| r.rules.iter_mut()) {
        let (Some(uuid), Some(owner)) = (user_of(rule), rule.owner.clone()) else {
            continue;
        };
        let uuid = uuid.as_str();
        let counters = by_owner.entry(owner.clone()).or_insert_with(|| {
            let rt = found
                .runtimes
                .iter()
                .find(|r| r.owner() == owner)
                .ok_or("its runtime is not running")?;
            let cfg = rt.load_config()?;
            let users = cfg
                .merged
                .inbounds
                .iter()
                .flat_map(|i| &i.users)
                .map(|u| (u.id.to_ascii_lowercase(), u.email.clone()))
                .collect();
            Ok((
                users,
                evidence::user_traffic(rt, &cfg, &evidence::Options::default())?,
            ))
        });
        rule.user_traffic = Some(match counters {
            Err(e) => format!("unavailable: {e}"),
            Ok((users, traffic)) => {
                let email = users
                    .iter()
                    .find(|(id, email)| id == uuid || email == uuid)
                    .map(|x| x.1.clone());
                match traffic.iter().find(|t| Some(&t.email) == email.as_ref()) {
                    Some(t) => format!(
                        "{}: uplink {} bytes, downlink {} bytes",
                        t.email,
                        t.uplink.unwrap_or(0),
                        t.downlink.unwrap_or(0)
                    ),
                    None => "no counter yet (it appears with the user's first connection)".into(),
                }
            }
        });
    }
}

/// The device a root belongs to: an IFB `rlifbN` shapes upload for device N (when device N is
/// gone, the IFB is named as its own device, still upload).
fn owner_device<'a>(link: &'a Link, links: &'a [Link]) -> (&'a str, &'static str) {
    if shaping::is_managed_ifb_name(&link.name) {
        let index: Option<u32> = link.name[IFB_PREFIX.len()..].parse().ok();
        return match links.iter().find(|l| Some(l.index) == index) {
            Some(dev) => (&dev.name, "upload"),
            None => (&link.name, "upload"),
        };
    }
    (&link.name, "download")
}

//! What `raylimit status` shows, read from the kernel: every managed root, class and filter in
//! the namespace, IFBs included, with subject, owner, direction, rate and live counters, and
//! raylimit's nft table.

use crate::evidence;
use crate::evidence::scope::Scope;
use crate::model::tc::{ClassKind, TcEntry};
use crate::model::u32::End;
use crate::model::Link;
use crate::model::TcHandle;
use crate::netlink::nft::{self, NftRule, NftState};
use crate::netlink::{NetlinkError, RtSocket};
use crate::ownership::StateDir;
use crate::policy::SubjectKey;
use crate::reconcile::observe::{classid_of, RootState, ShapedRoot};
use crate::runtime::{self, Selection};
use crate::shaping::{self, Band, ListenerBand, ListenerMatch, IFB_PREFIX};
use crate::xray::api::UserTraffic;
use std::collections::{BTreeMap, BTreeSet};

/// One managed rule as the kernel holds it.
pub struct Rule {
    pub subject: String,
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
    pub bytes: u64,
    pub packets: u64,
    pub drops: u32,
    pub owner: Option<String>,
}

impl Rule {
    /// A rule with its class's rate and live counters (none for the root itself: the unlimited
    /// exception has no leaf class).
    fn new(
        shaped: &ShapedRoot,
        subject: String,
        clients: Vec<String>,
        priority: Option<u16>,
        class: Option<TcHandle>,
        owner: Option<String>,
    ) -> Rule {
        let class_entry = class
            .filter(|c| c.minor() != 0)
            .and_then(|c| shaped.classes.get(&c.minor()));
        Rule {
            subject,
            clients,
            listeners: Vec::new(),
            user_traffic: None,
            scope_drift: None,
            priority,
            class,
            rate: class_entry.and_then(|c| match &c.class.kind {
                ClassKind::Htb(h) => Some(h.rate),
                _ => None,
            }),
            bytes: class_entry.map(|c| c.stats.bytes).unwrap_or(0),
            packets: class_entry.map(|c| c.stats.packets).unwrap_or(0),
            drops: class_entry.map(|c| c.stats.drops).unwrap_or(0),
            owner,
        }
    }
}

/// One managed root: a device's egress (download) or its IFB's (upload).
pub struct Root {
    pub device: String,
    pub direction: &'static str,
    pub shaped_device: String,
    pub bytes: u64,
    pub packets: u64,
    pub drops: u32,
    pub rules: Vec<Rule>,
    /// Classes no filter points at (a crashed run, or a rule whose filter was removed by hand).
    pub orphan_classes: Vec<TcHandle>,
    pub unrecognised: Vec<String>,
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
}

/// The named network namespaces the owner annotations record limits in, that still exist.
pub fn annotated_namespaces() -> Vec<String> {
    let annotations = StateDir::from_env().load();
    let names: std::collections::BTreeSet<String> = annotations
        .iter()
        .map(|a| a.netns.clone())
        .filter(|n| !n.is_empty())
        .collect();
    // A name is one path component under /run/netns (the state file is not trusted further).
    names
        .into_iter()
        .filter(|n| !n.contains('/') && n != "." && n != "..")
        .filter(|n| std::path::Path::new("/run/netns").join(n).exists())
        .collect()
}

/// Reads every managed root in the namespace (or those of one device).
pub fn read(netns: Option<&str>, device: Option<&str>) -> Result<Status, NetlinkError> {
    let mut sock = RtSocket::open_in(netns)?;
    if let Some(d) = device {
        sock.link_by_name(d)?;
    }
    let links = sock.links()?;
    let nft = nft::dump(netns.map(|n| format!("/run/netns/{n}")).as_deref());
    let annotations = StateDir::from_env().load();
    let netns_key = netns.unwrap_or("");
    let mut roots = Vec::new();
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
        let shaped = ShapedRoot::read(&tc, end);
        let RootState::Managed(root_entry) = &shaped.root else {
            continue;
        };
        let mut rules = Vec::new();
        let mut referenced = std::collections::BTreeSet::new();
        // A rule's nodes (one per client and runtime listener) share one class: one rule per
        // class, listing its clients (a user's addresses) and the listeners it is scoped to.
        type Group<'a> = (
            Vec<String>,
            BTreeSet<String>,
            &'a crate::model::tc::FilterEntry,
        );
        let mut groups: BTreeMap<(String, Option<TcHandle>), Group> = BTreeMap::new();
        for n in shaped.nodes() {
            let client = n.matched.client().to_string();
            let subject = match n.band {
                Band::User => "uuid".to_string(),
                Band::Connection => format!("connection {client}"),
                Band::Ip => format!("ip {client}"),
            };
            let g = groups.entry((subject, n.classid)).or_insert((
                Vec::new(),
                BTreeSet::new(),
                &n.entry,
            ));
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
            let e = groups.entry((subject.to_string(), n.classid)).or_insert((
                Vec::new(),
                BTreeSet::new(),
                &n.entry,
            ));
            if g == 0 {
                e.0.push(n.matched.to_string());
            } else {
                e.1.insert(n.matched.to_string());
            }
        }
        let mut subjects = Vec::new();
        for ((subject, class), (clients, listeners, entry)) in groups {
            // A user, an inbound and the baseline are named by their class's annotation.
            let subject = if subject.contains(' ') {
                subject
            } else {
                class
                    .and_then(|c| annotations.by_class(netns_key, &link.name, c.minor()))
                    .map(|a| a.subject.to_string())
                    .unwrap_or_else(|| format!("{subject} (unknown)"))
            };
            subjects.push((subject, clients, listeners.into_iter().collect(), entry));
        }
        if let Some(f) = &shaped.baseline {
            subjects.push(("ip all".to_string(), Vec::new(), Vec::new(), f));
        }
        // An outbound's fw filter (where the kernel has cls_fw) is known by its class.
        for entry in shaped.marks.values() {
            let subject = classid_of(&entry.filter)
                .and_then(|c| annotations.by_class(netns_key, &link.name, c.minor()))
                .map(|a| a.subject.to_string())
                .unwrap_or_else(|| "outbound (unknown)".into());
            subjects.push((subject, Vec::new(), Vec::new(), entry));
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
            let owner = r.tag.as_ref().map(|t| t.owner.clone());
            rules.push(Rule::new(
                &shaped,
                subject,
                Vec::new(),
                None,
                Some(class),
                owner,
            ));
        }
        for (subject, clients, listeners, entry) in subjects {
            let class = classid_of(&entry.filter);
            if let Some(c) = class {
                referenced.insert(c.minor());
            }
            // The class names the rule's owner (two runtimes may hold the same subject).
            let owner = class
                .and_then(|c| annotations.by_class(netns_key, &link.name, c.minor()))
                .or_else(|| {
                    let k = subject.parse::<SubjectKey>().ok()?;
                    annotations.for_subject(netns_key, &link.name, &k).next()
                })
                .map(|a| a.owner.clone());
            let mut rule = Rule::new(
                &shaped,
                subject,
                clients,
                Some(entry.filter.priority),
                class,
                owner,
            );
            rule.listeners = listeners;
            rules.push(rule);
        }
        roots.push(Root {
            device: owner_device.to_string(),
            direction,
            shaped_device: link.name.clone(),
            bytes: root_entry.stats.bytes,
            packets: root_entry.stats.packets,
            drops: root_entry.stats.drops,
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
        });
    }
    add_user_traffic(&mut roots);
    check_scopes(&mut roots);
    Ok(Status { roots, nft })
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

/// The device a root belongs to: an IFB `rlifbN` shapes upload for device N.
fn owner_device<'a>(link: &'a Link, links: &'a [Link]) -> (&'a str, &'static str) {
    if shaping::is_managed_ifb_name(&link.name) {
        let index: Option<u32> = link.name[IFB_PREFIX.len()..].parse().ok();
        if let Some(dev) = links.iter().find(|l| Some(l.index) == index) {
            return (&dev.name, "upload");
        }
    }
    (&link.name, "download")
}

//! Resolving what the operator named into the subjects the engine decides on: a per_ip set into
//! the live client addresses, a user into their live addresses, a connection checked against the
//! live sockets, an inbound into its listener and an outbound into its socket mark (from the
//! config). Each resolution is typed, so the CLI can show it and the tests can check it.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::{IpAddr, SocketAddr};

use super::{Engine, Kernel, Ticket, PER_IP};
use crate::evidence::{self, Connection, Evidence, State, UserEvidence};
use crate::policy::{Endpoint, Subject, Target, Want, Wanted};
use crate::xray::config::Mark;
use crate::xray::verdict::{self, Listener, SocketMark};

/// How a target was staged.
#[derive(Debug)]
pub enum Staged {
    /// One subject, with how it was resolved.
    One {
        ticket: Ticket,
        resolution: Resolution,
    },
    /// Every live client IP of a per_ip set, each staged on its own.
    PerIp(Box<PerIpExpansion>),
}

/// What resolving one subject found.
#[derive(Debug)]
pub enum Resolution {
    /// Nothing to resolve: a client address, the shared baseline.
    Direct,
    /// A removal finds its rule without evidence: why.
    NotNeeded(&'static str),
    // Boxed: most resolutions of a large policy are Direct, and the enum is as large as its
    // largest variant.
    User {
        evidence: Box<Evidence>,
        /// The user in the config (UUID or email matched).
        configured: bool,
        /// The user as the evidence knows them.
        user: Option<UserEvidence>,
    },
    Connection {
        evidence: Box<Evidence>,
        /// The live connection, when it is one of the runtime's.
        connection: Option<Connection>,
    },
    /// The inbound's listener, or why the config does not give one.
    Inbound(Result<Listener, String>),
    /// The outbound's socket mark under `mask`, or why it cannot be used.
    Outbound {
        mask: u32,
        mark: Result<SocketMark, String>,
    },
}

/// Where a per_ip set's client list came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expansion {
    /// A removal covers every address the annotations know for the set.
    Removal {
        count: usize,
        owner: String,
        shaped_device: String,
        /// `--inbound` was given; it does not narrow a removal.
        narrowed: bool,
    },
    /// The live client addresses (of one inbound listener).
    Live {
        count: usize,
        inbound: Option<String>,
    },
    /// Nothing could be expanded.
    Nothing,
}

impl fmt::Display for Expansion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Expansion::Removal {
                count,
                owner,
                shaped_device,
                narrowed,
            } => write!(
                f,
                "removing the {count} client IP(s) of {owner}'s per_ip set on {shaped_device}{}",
                if *narrowed {
                    " (--inbound does not narrow a removal: the set is removed whole)"
                } else {
                    ""
                }
            ),
            Expansion::Live { count, inbound } => write!(
                f,
                "expanded into {count} live client IP(s){} from the runtime's own sockets; each is decided on its own",
                inbound
                    .as_ref()
                    .map(|t| format!(" of inbound {t}"))
                    .unwrap_or_default()
            ),
            Expansion::Nothing => f.write_str("nothing was expanded"),
        }
    }
}

/// Why a client address of a per_ip set was left alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeftAlone {
    /// It has an `--ip` rule of its own.
    OwnRule,
    /// It is in the managed set but no longer connected.
    Departed,
}

impl fmt::Display for LeftAlone {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LeftAlone::OwnRule => "has its own --ip rule, which per_ip leaves as it is",
            LeftAlone::Departed => "in the managed set but no longer connected; kept (watch drops departed clients after its grace period, --remove drops the set)",
        })
    }
}

/// A per_ip set expanded into client addresses.
#[derive(Debug)]
pub struct PerIpExpansion {
    /// Where the client set came from: `sock_diag`, or `owner_annotations` for a removal.
    pub provider: &'static str,
    /// The evidence read, or why none was needed.
    pub evidence: Result<Evidence, &'static str>,
    /// `available`, `no_sessions` or `unavailable`.
    pub state: &'static str,
    pub reconcile_state: &'static str,
    /// The client addresses the request expanded into.
    pub ips: Vec<IpAddr>,
    pub expansion: Expansion,
    pub left_alone: Vec<(IpAddr, LeftAlone)>,
    /// Why nothing could be expanded, when nothing could.
    pub blocked: Option<String>,
    pub targets: Vec<Ticket>,
}

/// The runtime's per_ip set on one shaped device, and the addresses with an `--ip` rule of
/// their own (which per_ip leaves alone), as the annotations know them.
pub struct PerIpSet {
    pub managed: BTreeSet<IpAddr>,
    /// Addresses with their own rule, and its owner.
    explicit: BTreeMap<IpAddr, String>,
}

impl PerIpSet {
    pub fn read<K: Kernel>(engine: &Engine<K>, on_egress: bool) -> Self {
        let shaped = engine.shaped_device(on_egress);
        let owner = engine.runtime.owner();
        let netns = engine.netns_key();
        let annotations = engine.annotations();
        PerIpSet {
            managed: annotations
                .in_set(netns, &shaped, &owner, PER_IP)
                .filter_map(|a| a.subject.ip())
                .collect(),
            // Another runtime's rule for the same address is on its own listeners.
            explicit: annotations
                .iter()
                .filter(|a| a.netns == netns && a.shaped_device == shaped && a.set.is_none())
                .filter(|a| a.owner == owner)
                .filter_map(|a| Some((a.subject.ip()?, a.owner.to_string())))
                .collect(),
        }
    }

    /// The owner of the address's own `--ip` rule, if it has one.
    pub fn explicit_owner(&self, ip: IpAddr) -> Option<&str> {
        self.explicit.get(&ip).map(String::as_str)
    }
}

impl<K: Kernel> Engine<K> {
    /// The runtime's live evidence (its config read first: the listeners and users come from it).
    pub fn gather(&self) -> Evidence {
        match self.live().config() {
            Ok(cfg) => self.live().evidence(&cfg),
            Err(e) => Evidence::unavailable(format!("the runtime's config could not be read: {e}")),
        }
    }

    /// Resolves the target the way its family needs (live evidence, the config, or nothing)
    /// and stages what it resolved to.
    pub fn resolve(&mut self, wanted: &Wanted) -> Staged {
        let one = |(ticket, resolution)| Staged::One { ticket, resolution };
        match &wanted.target {
            Target::PerIp { inbound } => {
                let ev = (wanted.want != Want::Remove).then(|| self.gather());
                Staged::PerIp(Box::new(self.per_ip(wanted, inbound.as_deref(), ev)))
            }
            Target::User(id) => one(self.user(wanted, id)),
            Target::Connection(addr) => one(self.connection(wanted, *addr)),
            Target::Inbound(tag) => one(self.inbound(wanted, tag)),
            Target::Outbound { tag, mask } => one(self.outbound(wanted, tag, *mask)),
            Target::Ip(_) | Target::AllShared => {
                let subject = wanted.target.direct().expect("an address or the baseline");
                let ticket = self.stage(wanted.resolved(subject), None, None);
                one((ticket, Resolution::Direct))
            }
        }
    }

    /// `--ip all --ip-aggregation per_ip`: one `ip` rule per live client address (`evidence`;
    /// none for a removal, which covers every address the annotations know).
    pub fn per_ip(
        &mut self,
        wanted: &Wanted,
        inbound: Option<&str>,
        evidence: Option<Evidence>,
    ) -> PerIpExpansion {
        let shaped = self.shaped_device(wanted.on_egress());
        let owner = self.runtime.owner();
        let set = PerIpSet::read(self, wanted.on_egress());
        let managed = &set.managed;
        let ip_request = |ip| wanted.resolved(Subject::Ip(ip));
        let mut x = PerIpExpansion {
            provider: "sock_diag",
            evidence: Err(""),
            state: "available",
            reconcile_state: if managed.is_empty() {
                "no_observed_managed_state"
            } else {
                "managed_set_known"
            },
            ips: Vec::new(),
            expansion: Expansion::Nothing,
            left_alone: Vec::new(),
            blocked: None,
            targets: Vec::new(),
        };
        let Some(ev) = evidence.filter(|_| wanted.want != Want::Remove) else {
            // Every address of the set, departed clients included: the annotations know them all.
            x.provider = "owner_annotations";
            x.evidence =
                Err("removal covers every client IP raylimit manages in this runtime's per_ip set");
            x.ips = managed.iter().copied().collect();
            x.expansion = Expansion::Removal {
                count: managed.len(),
                owner,
                shaped_device: shaped,
                narrowed: inbound.is_some(),
            };
            let mut removal = wanted.clone();
            removal.want = Want::Remove;
            for ip in managed.iter().copied() {
                x.targets
                    .push(self.stage(removal.resolved(Subject::Ip(ip)), Some(PER_IP), None));
            }
            return x;
        };
        x.state = ev.state.name();
        if ev.state == State::Unavailable {
            x.reconcile_state = "unavailable_evidence";
            x.blocked = Some(format!(
                "per_ip needs the runtime's live client IPs, and they could not be read: {}",
                ev.reason
            ));
            x.evidence = Ok(ev);
            return x;
        }
        if let Some(tag) = inbound {
            let listed = ev.connections.iter().any(|c| c.inbound == tag)
                || self.live().config().is_ok_and(|cfg| {
                    evidence::client_listeners(&cfg)
                        .iter()
                        .any(|(t, _)| t == tag)
                });
            if !listed {
                x.reconcile_state = "unavailable_evidence";
                x.blocked = Some(format!(
                    "--inbound {tag:?} is not a client listener of this runtime, so it cannot narrow the per_ip set"
                ));
                x.evidence = Ok(ev);
                return x;
            }
        }
        let live = ev.client_ips(inbound);
        x.ips = live.iter().copied().collect();
        x.expansion = Expansion::Live {
            count: live.len(),
            inbound: inbound.map(str::to_string),
        };
        for ip in &live {
            if set.explicit_owner(*ip) == Some(owner.as_str()) {
                x.left_alone.push((*ip, LeftAlone::OwnRule));
                continue;
            }
            x.targets
                .push(self.stage(ip_request(*ip), Some(PER_IP), None));
        }
        for ip in managed.difference(&live) {
            x.left_alone.push((*ip, LeftAlone::Departed));
        }
        x.evidence = Ok(ev);
        x
    }

    /// `--uuid ID`: the user's live client IPs into one class.
    fn user(&mut self, wanted: &Wanted, id: &str) -> (Ticket, Resolution) {
        let cfg = self.live().config();
        // The stable key is the config's UUID, whether the operator gave it or the email.
        let configured = cfg.as_ref().ok().and_then(|c| {
            c.merged
                .inbounds
                .iter()
                .flat_map(|ib| ib.users.iter())
                .find(|u| (!u.id.is_empty() && u.id.eq_ignore_ascii_case(id)) || u.email == id)
                .cloned()
        });
        let key = configured
            .as_ref()
            .map(|u| user_key(&u.id, &u.email))
            .unwrap_or_else(|| id.to_ascii_lowercase());
        if wanted.want == Want::Remove {
            let subject = Subject::User {
                uuid: key,
                ips: BTreeSet::new(),
            };
            let ticket = self.stage(wanted.resolved(subject), None, None);
            let why = "the user's rule is found by its class, whatever addresses it holds";
            return (ticket, Resolution::NotNeeded(why));
        }
        let ev = match &cfg {
            Ok(c) => self.live().evidence(c),
            Err(e) => Evidence::unavailable(format!("the runtime's config could not be read: {e}")),
        };
        let found = ev.user(id).cloned();
        let blocked = match (&configured, &found) {
            (None, _) if cfg.is_ok() => Some(format!(
                "no user {id:?} (UUID or email) in the runtime's config"
            )),
            (None, _) => Some(ev.reason.clone()),
            (Some(_), None) => Some(ev.attribution_reason.clone()),
            (Some(_), Some(u)) => match u.state {
                State::Available => None,
                State::NoSessions if !u.shared.is_empty() => Some(format!(
                    "every live client IP of {} is shared with another live user, so none can be limited as theirs alone",
                    u.email
                )),
                State::NoSessions => Some(format!(
                    "{} has no live connection, so there is no client IP to limit",
                    u.email
                )),
                _ => Some(format!("the user's sessions cannot be attributed: {}", u.reason)),
            },
        };
        let subject = Subject::User {
            uuid: key,
            ips: found.as_ref().map(|u| u.ips.clone()).unwrap_or_default(),
        };
        let ticket = self.stage(wanted.resolved(subject), None, blocked);
        let resolution = Resolution::User {
            evidence: Box::new(ev),
            configured: configured.is_some(),
            user: found,
        };
        (ticket, resolution)
    }

    /// `--connection IP:PORT`: one live connection as one class.
    fn connection(&mut self, wanted: &Wanted, addr: SocketAddr) -> (Ticket, Resolution) {
        let request = wanted.resolved(Subject::Connection(addr));
        if wanted.want == Want::Remove {
            let ticket = self.stage(request, None, None);
            let why =
                "the rule is found by its address and port, even after the connection has gone";
            return (ticket, Resolution::NotNeeded(why));
        }
        let ev = self.gather();
        let connection = ev.connection(addr).cloned();
        let blocked = if ev.state == State::Unavailable {
            Some(format!(
                "a connection limit needs the runtime's live sockets: {}",
                ev.reason
            ))
        } else if connection.is_none() {
            Some(format!(
                "{addr} is not a live client connection to an inbound listener of this runtime (raylimit inspect lists them)"
            ))
        } else {
            None
        };
        let connection = connection.filter(|_| ev.state != State::Unavailable);
        let ticket = self.stage(request, None, blocked);
        let resolution = Resolution::Connection {
            evidence: Box::new(ev),
            connection,
        };
        (ticket, resolution)
    }

    /// `--inbound TAG`: the listener from the runtime's config. A removal needs no config: the
    /// rule is found by its annotated class.
    fn inbound(&mut self, wanted: &Wanted, tag: &str) -> (Ticket, Resolution) {
        let listener = self
            .live()
            .config()
            .and_then(|cfg| verdict::inbound(&cfg, tag));
        let subject = Subject::Inbound {
            tag: tag.to_string(),
            listener: listener.as_ref().ok().map(|l| Endpoint {
                address: l.address,
                port: l.port,
            }),
        };
        let blocked = listener.as_ref().err().cloned();
        let ticket = self.stage_resolved(wanted, subject, blocked);
        (ticket, Resolution::Inbound(listener))
    }

    /// `--outbound TAG`: the outbound's socket mark from the config, read under `mask`. A
    /// removal needs no config: the rule is found by its class and nft tag.
    fn outbound(&mut self, wanted: &Wanted, tag: &str, mask: u32) -> (Ticket, Resolution) {
        let cfg = self.live().config();
        let mark = cfg.as_ref().map_err(String::clone).and_then(|cfg| {
            let m = verdict::outbound(cfg, tag)?;
            if m.mark & !mask != 0 {
                // Only download gets here with the default mask: it writes the connection's
                // mark, so raylimit keeps to bits the host's other marks leave alone.
                // The narrowest run of whole bytes that covers the mark.
                let cover = (1..=4u32)
                    .flat_map(|w| (0..=4 - w).map(move |at| (u64::MAX >> (64 - 8 * w)) << (8 * at)))
                    .map(|c| c as u32)
                    .filter(|c| m.mark & !c == 0)
                    .min_by_key(|c| c.count_ones())
                    .unwrap_or(u32::MAX);
                return Err(format!(
                    "socket mark {:#x} of outbound {tag:?} has bits outside the mark mask {mask:#010x}; download writes the connection's mark under the mask (to restore it on arriving packets), so the mask must cover the outbound's mark and no bit the host's other marks use: give --mark-mask {cover:#010x} if nothing else on the host marks with those bits",
                    m.mark
                ));
            }
            // Under the mask, the mark must still tell this outbound apart from the others.
            if let Some(other) = cfg.merged.outbounds.iter().find(|o| {
                o.tag != tag && matches!(o.mark, Mark::Set(x) if x & mask == m.mark & mask)
            }) {
                return Err(format!(
                    "under the mark mask {mask:#010x}, socket mark {:#x} of outbound {tag:?} equals outbound {:?}'s, so it does not tell them apart",
                    m.mark, other.tag
                ));
            }
            Ok(m)
        });
        let subject = Subject::Outbound {
            tag: tag.to_string(),
            mark: mark.as_ref().ok().map(|m| m.mark),
            mask,
        };
        let blocked = mark.as_ref().err().cloned();
        let ticket = self.stage_resolved(wanted, subject, blocked);
        (ticket, Resolution::Outbound { mask, mark })
    }

    /// Stages a subject the config resolved, or blocks with why it could not be resolved; a
    /// removal goes ahead either way.
    fn stage_resolved(
        &mut self,
        wanted: &Wanted,
        subject: Subject,
        unresolved: Option<String>,
    ) -> Ticket {
        let blocked = unresolved.filter(|_| wanted.want != Want::Remove);
        self.stage(wanted.resolved(subject), None, blocked)
    }
}

/// The key a user's rule is known by: the config's UUID (lower case), else the email.
pub fn user_key(uuid: &str, email: &str) -> String {
    if uuid.is_empty() {
        email.to_string()
    } else {
        uuid.to_ascii_lowercase()
    }
}

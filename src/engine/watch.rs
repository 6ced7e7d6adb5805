//! One `watch` round: the live evidence read once, every change staged and committed together.
//! New clients get their rule; clients gone for longer than the grace period lose it (a client
//! that reconnects within the grace period keeps its rule untouched). Evidence that cannot be
//! read changes nothing. Time comes from the caller, so rounds are tested without waiting.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use super::resolve::{user_key, PerIpSet};
use super::{Decided, Engine, Kernel, Outcome, PER_IP};
use crate::evidence::{Evidence, State};
use crate::policy::{Subject, Target, Want, Wanted};

/// What a watch keeps in line, with when each client address was last seen live.
pub struct Watcher {
    wanted: Wanted,
    grace: Duration,
    /// When each client address was last seen live (or first missed, for one inherited).
    last_seen: BTreeMap<IpAddr, Instant>,
}

/// Why a round changed nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Skipped {
    EvidenceUnavailable(String),
    UserNotFound { id: String, reason: String },
    UserEvidence { state: &'static str, reason: String },
}

impl fmt::Display for Skipped {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Skipped::EvidenceUnavailable(r) => {
                write!(f, "evidence unavailable, nothing changed: {r}")
            }
            Skipped::UserNotFound { id, reason } => write!(
                f,
                "user {id} not found in the evidence, nothing changed: {reason}"
            ),
            Skipped::UserEvidence { state, reason } => {
                write!(f, "user evidence {state}, nothing changed: {reason}")
            }
        }
    }
}

/// What one round did.
#[derive(Debug)]
pub enum Round {
    Skipped(Skipped),
    PerIp {
        /// Every live client's decision (most are no_op).
        live: Vec<(IpAddr, Decided)>,
        /// Clients gone past the grace period, how long ago, and their removal.
        departed: Vec<(IpAddr, Duration, Decided)>,
        /// Drift the round repaired on the device (`Engine::stage_repairs`).
        repaired: Vec<Decided>,
    },
    User {
        email: String,
        /// The addresses the user's rule holds now (none: the rule is removed).
        ips: BTreeSet<IpAddr>,
        decided: Box<Decided>,
        repaired: Vec<Decided>,
    },
}

impl Watcher {
    /// A watch of `wanted` (a per_ip set or a user, at a rate).
    pub fn new(wanted: Wanted, grace: Duration) -> Self {
        Watcher {
            wanted,
            grace,
            last_seen: BTreeMap::new(),
        }
    }

    /// One round against `evidence`, read at `now`.
    pub fn round<K: Kernel>(
        &mut self,
        engine: &mut Engine<K>,
        evidence: &Evidence,
        now: Instant,
    ) -> Round {
        match self.wanted.target.clone() {
            Target::User(id) => self.user(engine, evidence, &id, now),
            Target::PerIp { inbound } => self.per_ip(engine, evidence, inbound.as_deref(), now),
            _ => unreachable!("watch keeps a per_ip set or a user in line"),
        }
    }

    fn per_ip<K: Kernel>(
        &mut self,
        engine: &mut Engine<K>,
        ev: &Evidence,
        inbound: Option<&str>,
        now: Instant,
    ) -> Round {
        if ev.state == State::Unavailable {
            return Round::Skipped(Skipped::EvidenceUnavailable(ev.reason.clone()));
        }
        let live = ev.client_ips(inbound);
        let set = PerIpSet::read(engine, self.wanted.on_egress());
        for ip in &live {
            self.last_seen.insert(*ip, now);
        }
        let mut added = Vec::new();
        for ip in &live {
            if set.explicit_owner(*ip).is_some() {
                continue;
            }
            let request = self.wanted.resolved(Subject::Ip(*ip));
            added.push((*ip, engine.stage(request, Some(PER_IP), None)));
        }
        let mut departed = Vec::new();
        for ip in set.managed.difference(&live) {
            let seen = *self.last_seen.entry(*ip).or_insert(now);
            let gone = now.duration_since(seen);
            if gone < self.grace {
                continue;
            }
            let mut request = self.wanted.resolved(Subject::Ip(*ip));
            request.want = Want::Remove;
            departed.push((*ip, gone, engine.stage(request, Some(PER_IP), None)));
        }
        let repairs = engine.stage_repairs();
        // The round's changes go to the kernel together.
        let mut run = engine.commit();
        let repaired = repairs.into_iter().map(|t| run.take(t)).collect();
        let live = added.into_iter().map(|(ip, t)| (ip, run.take(t))).collect();
        let departed: Vec<(IpAddr, Duration, Decided)> = departed
            .into_iter()
            .map(|(ip, gone, t)| (ip, gone, run.take(t)))
            .collect();
        for (ip, _, d) in &departed {
            if d.outcome != Outcome::Failed {
                self.last_seen.remove(ip);
            }
        }
        Round::PerIp {
            live,
            departed,
            repaired,
        }
    }

    fn user<K: Kernel>(
        &mut self,
        engine: &mut Engine<K>,
        ev: &Evidence,
        id: &str,
        now: Instant,
    ) -> Round {
        let Some(user) = ev.user(id) else {
            return Round::Skipped(Skipped::UserNotFound {
                id: id.to_string(),
                reason: ev.attribution_reason.clone(),
            });
        };
        if matches!(user.state, State::Unavailable | State::Insufficient) {
            return Round::Skipped(Skipped::UserEvidence {
                state: user.state.name(),
                reason: user.reason.clone(),
            });
        }
        for ip in &user.ips {
            self.last_seen.insert(*ip, now);
        }
        // Addresses seen within the grace period stay; a shared one leaves at once.
        self.last_seen
            .retain(|ip, seen| !user.shared.contains(ip) && now.duration_since(*seen) < self.grace);
        let ips: BTreeSet<IpAddr> = self.last_seen.keys().copied().collect();
        let mut request = self.wanted.resolved(Subject::User {
            uuid: user_key(&user.uuid, &user.email),
            ips: ips.clone(),
        });
        if ips.is_empty() {
            request.want = Want::Remove;
        }
        let ticket = engine.stage(request, None, None);
        let repairs = engine.stage_repairs();
        let mut run = engine.commit();
        Round::User {
            email: user.email.clone(),
            ips,
            decided: Box::new(run.take(ticket)),
            repaired: repairs.into_iter().map(|t| run.take(t)).collect(),
        }
    }
}

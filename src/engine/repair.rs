//! Drift repair. The annotations are what the runtime asked for; the kernel can lose it (a root,
//! class or filter deleted by hand, a filter re-pointed).
//! Every run that reads a side of the device (`limit`, `apply`, a `watch` round) also restores
//! what its own runtime's annotations record there and the kernel no longer has, in the same
//! commit and report. Another runtime's rules are left to that runtime's runs (their scope is
//! its listeners, which this run does not know); `status` shows them.

use std::collections::BTreeSet;

use crate::ownership::Annotation;
use crate::policy::{Direction, Request, Subject, SubjectKey, Want};
use crate::reconcile::observe::{classid_of, Observation, ShapedRoot};
use crate::shaping::{Band, ClientMatch};

use super::{Engine, Kernel, Ticket};

impl<K: Kernel> Engine<K> {
    /// Stages a repair for each of this runtime's annotated rules, on the sides this run has
    /// read, whose objects the kernel no longer holds as recorded (an upload root's redirect
    /// needs no repair of its own: every upload decision puts a missing one back). Call it after
    /// the run's own requests (their steps count as done) and before [`Engine::commit`]. Rules whose subject cannot be rebuilt from the annotation
    /// alone (users, inbounds, outbounds, records without a rate) are restored by their next
    /// request, and shown by `status` until then.
    pub fn stage_repairs(&mut self) -> Vec<Ticket> {
        let owner = self.owner.clone();
        // What this run decided already holds (or was refused for a reason of its own).
        let decided: BTreeSet<(bool, SubjectKey)> = self
            .staged
            .iter()
            .map(|d| (d.request.on_egress(), d.request.subject.key()))
            .collect();
        let mut wanted: Vec<(Request, Option<String>)> = Vec::new();
        for (egress, observation) in &self.observed {
            if observation.error.is_some() {
                continue;
            }
            let shaped_device = self.shaped_device(*egress);
            let candidates: Vec<(&Annotation, Request)> = self
                .annotations
                .iter()
                .filter(|a| {
                    a.netns == self.netns_key
                        && a.shaped_device == shaped_device
                        && a.owner == owner
                        && !decided.contains(&(*egress, a.subject.clone()))
                })
                .filter_map(|a| Some((a, rebuild(a, &self.device.name)?)))
                .filter(|(_, r)| r.on_egress() == *egress)
                .collect();
            if candidates.is_empty() {
                continue;
            }
            let held = Held::of(observation);
            for (a, request) in candidates {
                if !held.holds(a) {
                    wanted.push((request, a.set.clone()));
                }
            }
        }
        wanted
            .into_iter()
            .map(|(request, set)| self.stage(request, set.as_deref(), None))
            .collect()
    }
}

/// The request that makes an annotated rule again, when the annotation says enough.
fn rebuild(a: &Annotation, device: &str) -> Option<Request> {
    let subject = match a.subject {
        SubjectKey::Ip(ip) => Subject::Ip(ip),
        SubjectKey::All => Subject::AllShared,
        SubjectKey::Connection(c) => Subject::Connection(c),
        _ => return None,
    };
    let want = match (a.rate, a.class_minor) {
        (Some(rate), _) => Want::Limit(rate),
        (None, None | Some(0)) if matches!(subject, Subject::Ip(_)) => Want::Unlimited,
        _ => return None,
    };
    Some(Request {
        subject,
        direction: Direction::parse(&a.direction)?,
        device: device.to_string(),
        want,
    })
}

/// What a side holds of raylimit's layout, for a cheap check of each annotation (a full
/// decision per annotated rule would cost as much as an apply of all of them).
struct Held<'a> {
    /// raylimit's root on the side, when it is there.
    shaped: Option<&'a ShapedRoot>,
    /// Class minors that exist and that a node, listener node, baseline or mark sends to.
    sent_to: BTreeSet<u16>,
}

impl<'a> Held<'a> {
    fn of(observation: &'a Observation) -> Self {
        let shaped = observation.shaped.as_ref().filter(|s| s.is_managed());
        let mut sent_to = BTreeSet::new();
        if let Some(s) = shaped {
            let classes = s
                .nodes()
                .map(|n| n.classid)
                .chain(s.listeners.iter().map(|n| n.classid))
                .chain(s.baseline.iter().map(|b| classid_of(&b.filter)))
                .chain(s.marks.values().map(|m| classid_of(&m.filter)));
            sent_to.extend(
                classes
                    .flatten()
                    .map(|c| c.minor())
                    .filter(|m| s.classes.contains_key(m)),
            );
        }
        Held { shaped, sent_to }
    }

    /// The annotated rule is in the kernel as recorded: its class exists and is sent to, and
    /// an address's node sends to that class (the unlimited exception: to the root itself).
    fn holds(&self, a: &Annotation) -> bool {
        let Some(s) = self.shaped else {
            return false;
        };
        let minor = a.class_minor.unwrap_or(0);
        if minor != 0 && !self.sent_to.contains(&minor) {
            return false;
        }
        let node_minor = |band: Band, client: ClientMatch| {
            s.nodes_of_client(band, client)
                .next()
                .map(|n| n.classid.map_or(0, |c| c.minor()))
        };
        match a.subject {
            SubjectKey::Ip(ip) => node_minor(Band::Ip, ClientMatch::ip(ip)) == Some(minor),
            SubjectKey::Connection(c) => {
                let client = ClientMatch {
                    port: Some(c.port()),
                    ..ClientMatch::ip(c.ip())
                };
                node_minor(Band::Connection, client) == Some(minor)
            }
            _ => true,
        }
    }
}

//! Prune: the runtime's annotated limits that a policy no longer lists, as a typed diff.

use std::collections::BTreeSet;

use crate::ownership::Annotations;
use crate::policy::{Direction, SubjectKey, Target};

use super::PER_IP;

/// A limit as a policy lists it: device, direction and the subject's key.
pub type Listed = (String, Direction, SubjectKey);

/// The key a target is listed under: a per_ip set as a whole by `ip all`, a user by the UUID or
/// email as given.
pub fn listed_key(target: &Target) -> SubjectKey {
    match target {
        Target::Ip(ip) => SubjectKey::Ip(*ip),
        Target::AllShared | Target::PerIp { .. } => SubjectKey::All,
        Target::User(id) => SubjectKey::User(id.clone()),
        Target::Connection(c) => SubjectKey::Connection(*c),
        Target::Inbound(tag) => SubjectKey::Inbound(tag.clone()),
        Target::Outbound { tag, .. } => SubjectKey::Outbound(tag.clone()),
    }
}

/// One annotated limit the policy does not list.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Stale {
    pub direction: Direction,
    pub key: SubjectKey,
    /// The expanded set it belongs to (`per_ip`).
    pub set: Option<String>,
}

impl Stale {
    /// Its removal on `device`, as `limit --remove` asks for it (an outbound is found by its
    /// class and nft tag, so the mark mask does not matter).
    pub fn removal(&self, device: &str) -> crate::policy::Wanted {
        crate::policy::Wanted {
            target: self.key.target(crate::policy::DEFAULT_MARK_MASK),
            direction: self.direction,
            device: device.to_string(),
            want: crate::policy::Want::Remove,
        }
    }
}

/// The owner's annotated limits on `device` (in namespace `netns`) that `listed` does not
/// hold, once each, in the annotations' order.
pub fn stale(
    annotations: &Annotations,
    netns: &str,
    owner: &str,
    device: &str,
    listed: &BTreeSet<Listed>,
) -> Vec<Stale> {
    let mut seen = BTreeSet::new();
    annotations
        .iter()
        .filter(|a| a.owner == owner && a.device == device && a.netns == netns)
        .filter_map(|a| {
            let direction = Direction::parse(&a.direction)?;
            // A per_ip set is listed as a whole by its `ip all` per_ip limit.
            let listed_as = match a.set.as_deref() {
                Some(PER_IP) => SubjectKey::All,
                _ => a.subject.clone(),
            };
            if listed.contains(&(device.to_string(), direction, listed_as)) {
                return None;
            }
            seen.insert((direction, a.subject.clone())).then(|| Stale {
                direction,
                key: a.subject.clone(),
                set: a.set.clone(),
            })
        })
        .collect()
}

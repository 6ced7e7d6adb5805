//! The plan for a client band's two-level layout (see `shaping`): the scaffolding a client
//! needs before its node (first-level table and root link for the band, second-level table and
//! its link for the client's first-level bucket), the node itself, and the scaffolding that
//! deleted nodes leave empty.

use std::collections::BTreeSet;

use super::observe::{FilterKey, ShapedRoot};
use super::plan::{Dev, Step};
use super::{delete_in_root_table, delete_priority, replace_filter, same_filter, Context, Held};
use crate::model::tc::{Filter, Op};
use crate::model::u32::{End, Family};
use crate::model::{TcHandle, U32Handle};
use crate::shaping::{self, Band, ClientMatch};

/// The nodes of a client-band rule: band scaffolding, then each wanted client's node (kept,
/// repaired or created, after its bucket's scaffolding), then nodes of clients that are no
/// longer wanted (a user's departed addresses), and the scaffolding they leave empty.
#[allow(clippy::too_many_arguments)]
pub(super) fn plan_nodes(
    ctx: &Context,
    band: Band,
    matches: &BTreeSet<ClientMatch>,
    held: &Held,
    shaped: Option<&ShapedRoot>,
    (dev, ifindex, end): (&Dev, u32, End),
    target_class: TcHandle,
    steps: &mut Vec<Step>,
    changes: &mut Vec<String>,
) {
    // Where the wanted clients live: (priority, first-level bucket).
    let kept: BTreeSet<(u16, u32)> = matches.iter().map(|m| bucket_of(band, m)).collect();
    for family in [Family::V4, Family::V6] {
        let prio = band.priority(family);
        if kept.iter().any(|(p, _)| *p == prio) {
            plan_band(band, family, shaped, (dev, ifindex, end), steps, changes);
        }
    }
    // Held nodes the rule no longer wants; one of the same client is reused in place for a
    // wanted node it lacks (a listener that moved), keeping its handle.
    let mut unwanted: Vec<&(Option<ClientMatch>, Filter)> = held
        .filters
        .iter()
        .filter(|(hm, _)| hm.is_some_and(|m| !matches.contains(&m)))
        .collect();
    let mut planned = BTreeSet::new();
    let mut scaffolded = BTreeSet::new();
    for m in matches {
        if scaffolded.insert(bucket_of(band, m)) {
            plan_bucket(band, m, shaped, (dev, ifindex, end), steps, changes);
        }
        let exact = held.filters.iter().find(|(hm, _)| *hm == Some(*m));
        let reused = match exact {
            Some(_) => None,
            None => unwanted
                .iter()
                .position(|(hm, _)| hm.is_some_and(|h| h.client() == m.client()))
                .map(|i| unwanted.remove(i)),
        };
        let old = exact.or(reused).map(|(_, f)| f);
        let node = old.map(|f| U32Handle(f.handle).node());
        let want = node_filter(
            ctx,
            band,
            *m,
            ifindex,
            (shaped, node),
            &planned,
            target_class,
        );
        planned.insert((want.priority, want.handle));
        match (old, reused) {
            (Some(old), _) if same_filter(old, &want) => {}
            (Some(old), Some((Some(was), _))) => {
                let (replace, _) = replace_filter(dev, ifindex, old, want, "");
                changes.push(format!("{} is now matched as {m}", was));
                steps.push(replace);
            }
            (Some(old), _) => {
                let (replace, change) =
                    replace_filter(dev, ifindex, old, want, &format!(" for {m}"));
                changes.push(change);
                steps.push(replace);
            }
            (None, _) => {
                if !held.filters.is_empty() {
                    changes.push(format!("client {m} joins the rule"));
                }
                steps.push(Step::create("create-filter", dev, want));
            }
        }
    }
    let mut removed = BTreeSet::new();
    for (hm, old) in unwanted {
        let Some(m) = hm else { continue };
        let mut before = old.clone();
        before.ifindex = ifindex;
        changes.push(format!("client {m} has left the rule"));
        removed.insert((old.priority, old.handle));
        steps.push(Step::delete("delete-filter", dev, before));
    }
    if let Some(shaped) = shaped {
        steps.extend(delete_emptied(
            shaped,
            band,
            &removed,
            &kept,
            (dev, ifindex),
        ));
    }
}

/// A client's priority and first-level bucket.
fn bucket_of(band: Band, m: &ClientMatch) -> (u16, u32) {
    let family = shaping::family_of(m.ip);
    (band.priority(family), shaping::hash_bytes(m.ip).0)
}

/// A band's first-level table and the root link into it, when missing. Undoing a new table
/// deletes it and the priority (both may be gone already: the kernel drops a u32 priority with
/// its last node when it is the only one on the qdisc).
fn plan_band(
    band: Band,
    family: Family,
    shaped: Option<&ShapedRoot>,
    (dev, ifindex, end): (&Dev, u32, End),
    steps: &mut Vec<Step>,
    changes: &mut Vec<String>,
) {
    let prio = band.priority(family);
    let has_table = shaped.is_some_and(|s| s.tables.contains(&prio));
    let has_link = shaped.is_some_and(|s| s.links.contains_key(&prio));
    let table = shaping::band_table(ifindex, band, family);
    if !has_table {
        let undo = vec![
            gone_ok(Step::tc(
                "delete-address-table",
                Op::Delete,
                dev,
                table.clone(),
            )),
            delete_priority(ifindex, prio, dev),
        ];
        steps.push(Step::tc("create-address-table", Op::Create, dev, table).undone_by(undo));
    }
    if !has_link {
        let link = shaping::band_link(ifindex, band, family, end);
        steps.push(Step::create("create-address-link", dev, link));
        if has_table {
            changes.push(format!(
                "the link into address table {} was missing",
                shaping::first_level_table(band, family)
            ));
        }
    }
}

/// The second-level table of a client's first-level bucket and the link node into it, when
/// missing.
fn plan_bucket(
    band: Band,
    m: &ClientMatch,
    shaped: Option<&ShapedRoot>,
    (dev, ifindex, end): (&Dev, u32, End),
    steps: &mut Vec<Step>,
    changes: &mut Vec<String>,
) {
    let family = shaping::family_of(m.ip);
    let key = bucket_of(band, m);
    let byte = key.1;
    let has_table = shaped.is_some_and(|s| s.bucket_tables.contains(&key));
    let has_link = shaped.is_some_and(|s| s.bucket_links.contains_key(&key));
    if !has_table {
        let table = shaping::bucket_table(ifindex, band, family, byte);
        steps.push(Step::create("create-bucket-table", dev, table));
    }
    if !has_link {
        let link = shaping::bucket_link(ifindex, band, family, end, byte);
        steps.push(Step::create("create-bucket-link", dev, link));
        if has_table {
            changes.push(format!(
                "the link into address table {} was missing",
                shaping::second_level_table(band, family, byte)
            ));
        }
    }
}

/// The node a client match wants on `ifindex`, with the node id it already has (`node`), else a
/// free stable one in its bucket (`planned` holds nodes this plan has already placed).
fn node_filter(
    ctx: &Context,
    band: Band,
    m: ClientMatch,
    ifindex: u32,
    (shaped, node): (Option<&ShapedRoot>, Option<u32>),
    planned: &BTreeSet<FilterKey>,
    classid: TcHandle,
) -> Filter {
    let end = shaping::client_end(ctx.request.direction);
    let prio = band.priority(shaping::family_of(m.ip));
    let place = shaping::client_place(band, m.ip);
    let node = node
        .or_else(|| {
            let used = |id: u32| {
                let handle = U32Handle::new(place.table(), place.bucket(), id).0;
                planned.contains(&(prio, handle))
                    || shaped.is_some_and(|s| s.nodes_in_bucket(prio, place).any(|n| n == id))
            };
            shaping::allocate_node(&format!("{} {m}", ctx.request.subject.key()), used)
        })
        .unwrap_or(1);
    shaping::client_node(ifindex, band, m, end, node, classid)
}

/// The scaffolding that deleting the client nodes in `removed` leaves empty, deleted after them
/// (`kept`: buckets this plan still puts clients in): an emptied band with every table and link
/// it has, then its priority. A bucket emptied while its band keeps other clients keeps its
/// second-level table and link: deleting the table right after its link is refused (EBUSY)
/// until the kernel releases it, an RCU grace period later, and waiting for that made removing
/// one client cost tens of milliseconds. The next address in that bucket reuses them, and they
/// go with the band (at most 256 per band and family).
///
/// Tables go one by one, each after the link that points at it (u32 refuses to delete a table
/// still linked to), rather than with the priority alone: the kernel keeps a deleted priority's
/// own tables while another u32 priority shares the qdisc, and they would block creating the
/// same table ids again.
pub(super) fn delete_emptied(
    shaped: &ShapedRoot,
    band: Band,
    removed: &BTreeSet<FilterKey>,
    kept: &BTreeSet<(u16, u32)>,
    (dev, ifindex): (&Dev, u32),
) -> Vec<Step> {
    let mut steps = Vec::new();
    for family in [Family::V4, Family::V6] {
        let prio = band.priority(family);
        if !removed.iter().any(|(p, _)| *p == prio) {
            continue;
        }
        let band_emptied =
            !kept.iter().any(|(p, _)| *p == prio) && !shaped.nodes_left(prio, None, removed);
        if !band_emptied {
            continue;
        }
        // Every bucket of the band, including those left empty by earlier removals.
        let in_band = |(p, _): &&(u16, u32)| *p == prio;
        let tables = shaped.bucket_tables.iter().filter(in_band);
        let links = shaped.bucket_links.keys().filter(in_band);
        let emptied: BTreeSet<u32> = tables.chain(links).map(|(_, b)| *b).collect();
        for byte in emptied {
            if let Some(link) = shaped.bucket_links.get(&(prio, byte)) {
                let mut before = link.filter.clone();
                before.ifindex = ifindex;
                steps.push(Step::delete("delete-bucket-link", dev, before));
            }
            if shaped.bucket_tables.contains(&(prio, byte)) {
                let table = shaping::bucket_table(ifindex, band, family, byte);
                steps.push(Step::delete("delete-bucket-table", dev, table));
            }
        }
        steps.extend(delete_band(shaped, band, family, (dev, ifindex)));
    }
    steps
}

/// An emptied band's root link, first-level table and priority, in that order. Once the root
/// link (the priority's last node) is gone the kernel may drop the priority itself, so the rest
/// may already be gone.
fn delete_band(
    shaped: &ShapedRoot,
    band: Band,
    family: Family,
    (dev, ifindex): (&Dev, u32),
) -> Vec<Step> {
    let prio = band.priority(family);
    let mut steps = Vec::new();
    if let Some(link) = shaped.links.get(&prio) {
        let mut before = link.filter.clone();
        before.ifindex = ifindex;
        steps.push(delete_in_root_table("delete-address-link", dev, before));
    }
    if shaped.tables.contains(&prio) {
        let table = shaping::band_table(ifindex, band, family);
        steps.push(gone_ok(Step::delete("delete-address-table", dev, table)));
    }
    steps.push(delete_priority(ifindex, prio, dev));
    steps
}

/// A delete that counts as done when the object is already gone.
fn gone_ok(mut step: Step) -> Step {
    step.exists_ok = true;
    step
}

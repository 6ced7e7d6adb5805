//! The engine against the in-memory kernel: one observation per run, batching, whole-run
//! rollback, per_ip expansion with departures, prune, watch rounds on an injected clock, and
//! blocked requests. No root, no namespaces.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use super::fake::{Fake, DEV_NAME};
use super::prune::{self, Stale};
use super::resolve::{Expansion, LeftAlone};
use super::watch::{Round, Watcher};
use super::*;
use crate::evidence::{Connection, State};
use crate::policy::{Direction, Target, Wanted};
use crate::reconcile::DecisionKind;
use crate::runtime::Source;

/// A state directory of its own, removed when the test ends.
struct TempState(PathBuf);

impl TempState {
    fn new() -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!(
            "raylimit-engine-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        TempState(path)
    }

    fn dir(&self) -> StateDir {
        StateDir {
            path: self.0.clone(),
        }
    }
}

impl Drop for TempState {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn runtime() -> Runtime {
    Runtime {
        source: Source::HostProcess,
        name: "xray".into(),
        binary: "xray".into(),
        process: None,
        container: None,
        netns: None,
        config: None,
        recorded_owner: None,
    }
}

fn engine(kernel: Fake, state: &TempState, execute: bool) -> Engine<Fake> {
    let options = Options {
        netns: None,
        execute,
        allow_missing_state: false,
        device_scope: false,
        state_dir: state.dir(),
    };
    Engine::open(kernel, runtime(), DEV_NAME, options)
        .expect("the fake device exists")
        .with_live(Box::new(Scripted::listening(&["[::]:9000"])))
}

/// An executing engine whose client rules are device-wide (`--scope device`).
fn device_wide_engine(kernel: Fake, state: &TempState) -> Engine<Fake> {
    let options = Options {
        netns: None,
        execute: true,
        allow_missing_state: false,
        device_scope: true,
        state_dir: state.dir(),
    };
    Engine::open(kernel, runtime(), DEV_NAME, options).expect("the fake device exists")
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn wanted(target: Target, want: Want) -> Wanted {
    Wanted {
        target,
        direction: Direction::Download,
        device: DEV_NAME.into(),
        want,
    }
}

fn limit(addr: &str, rate: u64) -> Request {
    wanted(Target::Ip(ip(addr)), Want::Limit(rate)).resolved(Subject::Ip(ip(addr)))
}

/// Evidence of live connections from `clients` to one listener.
fn evidence(clients: &[&str]) -> Evidence {
    Evidence {
        state: if clients.is_empty() {
            State::NoSessions
        } else {
            State::Available
        },
        reason: "test".into(),
        sources: Vec::new(),
        connections: clients
            .iter()
            .enumerate()
            .map(|(i, c)| Connection {
                client: SocketAddr::new(ip(c), 40_000 + i as u16),
                local: "10.9.0.1:443".parse().unwrap(),
                inbound: "in".into(),
                user: None,
                user_source: None,
                outbound: None,
                accepted: None,
            })
            .collect(),
        attribution: State::Unavailable,
        attribution_reason: String::new(),
        users: Vec::new(),
        traffic: Ok(Vec::new()),
    }
}

#[test]
fn a_run_observes_once_and_sends_its_steps_in_few_batches() {
    let state = TempState::new();
    let mut e = engine(Fake::default(), &state, true);
    let clients: Vec<String> = (1..=50).map(|i| format!("10.0.0.{i}")).collect();
    let tickets: Vec<Ticket> = clients
        .iter()
        .map(|c| e.stage(limit(c, 100_000), None, None))
        .collect();
    let planned: usize = tickets
        .iter()
        .map(|t| e.decided(*t).decision.steps.len())
        .sum();
    let mut run = e.commit();
    for t in &tickets {
        let d = run.take(*t);
        assert_eq!(d.outcome, Outcome::Executed, "{:?}", d.decision.reason);
    }
    let calls = &e.kernel.calls;
    // One dump of the device for 50 decisions.
    assert_eq!(calls.dumps, 1);
    assert_eq!(calls.batches.iter().sum::<usize>(), planned);
    // A batch ends only where a container is made: the root, the band's first-level table and
    // the one second-level table all 50 clients share (10.0.0.x: one first-level bucket).
    assert_eq!(calls.batches.len(), 4, "{:?}", calls.batches);
    assert_eq!(calls.steps[0], "create-root-qdisc");
    assert_eq!(e.kernel.kernel.device.classes.len(), 50);

    // The same run again changes nothing and sends nothing.
    let sent = e.kernel.calls.steps.len();
    let again: Vec<Ticket> = clients
        .iter()
        .map(|c| e.stage(limit(c, 100_000), None, None))
        .collect();
    let mut run = e.commit();
    for t in again {
        assert_eq!(run.take(t).decision.kind, DecisionKind::NoOp);
    }
    assert_eq!(e.kernel.calls.steps.len(), sent);
}

#[test]
fn a_failure_at_any_step_undoes_the_whole_run() {
    // Find how many steps the run has, then fail it at each of them in turn.
    let requests = || {
        vec![
            limit("10.0.0.1", 1_000),
            limit("10.0.1.2", 2_000),
            limit("2001:db8::3", 3_000),
        ]
    };
    let total = {
        let state = TempState::new();
        let mut e = engine(Fake::default(), &state, true);
        for r in requests() {
            e.stage(r, None, None);
        }
        e.commit();
        e.kernel.calls.steps.len()
    };
    assert!(total > 10, "{total} steps");
    for k in 0..total {
        let state = TempState::new();
        let fake = Fake {
            fail_at: Some(k),
            ..Fake::default()
        };
        let mut e = engine(fake, &state, true);
        let tickets: Vec<Ticket> = requests()
            .into_iter()
            .map(|r| e.stage(r, None, None))
            .collect();
        let mut run = e.commit();
        let decided: Vec<Decided> = tickets.iter().map(|t| run.take(*t)).collect();
        assert!(
            decided.iter().all(|d| d.outcome == Outcome::Failed),
            "at {k}"
        );
        // Exactly one decision owns the failed step; the others say the run was undone.
        let own = decided
            .iter()
            .filter(|d| d.execution.as_ref().is_some_and(|x| x.failed()))
            .count();
        assert_eq!(own, 1, "at {k}");
        for d in decided
            .iter()
            .filter(|d| !d.execution.as_ref().unwrap().failed())
        {
            assert!(d.warnings.contains(&Warning::RunUndone), "at {k}");
        }
        let failed = decided
            .iter()
            .find_map(|d| d.execution.as_ref().filter(|x| x.failed()))
            .unwrap();
        assert!(!failed.rollback_failed(), "at {k}: {:#?}", failed.rollback);
        // The kernel is as it began, and nothing was annotated.
        let k_state = &e.kernel.kernel;
        assert!(k_state.device.qdiscs.is_empty(), "at {k}");
        assert!(k_state.device.classes.is_empty(), "at {k}");
        assert!(k_state.device.filters.is_empty(), "at {k}");
        assert_eq!(e.annotations().iter().count(), 0, "at {k}");
        // The intent was written before the kernel changed, and taken back after.
        let on_disk = crate::ownership::StateDir {
            path: state.0.clone(),
        }
        .load()
        .unwrap();
        assert_eq!(on_disk.iter().count(), 0, "at {k}");
    }
}

#[test]
fn a_blocked_request_absorbs_nothing() {
    let state = TempState::new();
    let mut e = engine(Fake::default(), &state, true);
    let blocked = e.stage(limit("10.0.0.1", 1_000), None, Some("no evidence".into()));
    let next = e.stage(limit("10.0.0.2", 1_000), None, None);
    // The blocked decision's root, table and class never counted as done: the next one makes
    // them itself.
    let steps: Vec<&str> = e
        .decided(next)
        .decision
        .steps
        .iter()
        .map(|s| s.name.as_ref())
        .collect();
    assert_eq!(steps[0], "create-root-qdisc", "{steps:?}");
    let mut run = e.commit();
    let b = run.take(blocked);
    assert_eq!(b.outcome, Outcome::Blocked);
    assert!(b.execution.is_none());
    assert_eq!(run.take(next).outcome, Outcome::Executed);
    assert_eq!(e.kernel.kernel.device.classes.len(), 1);
    let keys: Vec<String> = e
        .annotations()
        .iter()
        .map(|a| a.subject.to_string())
        .collect();
    assert_eq!(keys, ["ip 10.0.0.2"]);
}

#[test]
fn per_ip_expands_live_clients_and_keeps_departed_ones_until_removed() {
    let state = TempState::new();
    let per_ip = wanted(Target::PerIp { inbound: None }, Want::Limit(5_000));
    let mut e = engine(Fake::default(), &state, true);
    let x = e.per_ip(&per_ip, None, Some(evidence(&["10.0.0.1", "10.0.0.2"])));
    assert_eq!(x.targets.len(), 2);
    e.commit();
    let kernel = std::mem::take(&mut e.kernel);
    drop(e);

    // A later run: 10.0.0.1 has gone, 10.0.0.3 has come.
    let mut e = engine(kernel, &state, true);
    let x = e.per_ip(&per_ip, None, Some(evidence(&["10.0.0.2", "10.0.0.3"])));
    assert_eq!(x.reconcile_state, "managed_set_known");
    assert_eq!(
        x.expansion,
        Expansion::Live {
            count: 2,
            inbound: None
        }
    );
    assert_eq!(x.left_alone, [(ip("10.0.0.1"), LeftAlone::Departed)]);
    let kinds: Vec<DecisionKind> = x
        .targets
        .iter()
        .map(|t| e.decided(*t).decision.kind)
        .collect();
    assert_eq!(kinds, [DecisionKind::NoOp, DecisionKind::Apply]);
    e.commit();
    assert_eq!(e.kernel.kernel.device.classes.len(), 3);

    // Unavailable evidence expands nothing and blocks.
    let x = e.per_ip(
        &per_ip,
        None,
        Some(Evidence::unavailable("no sock_diag".into())),
    );
    assert!(x.targets.is_empty());
    assert!(x.blocked.as_deref().unwrap().contains("no sock_diag"));

    // A removal covers every address the annotations know, departed ones included.
    let remove = wanted(Target::PerIp { inbound: None }, Want::Remove);
    let x = e.per_ip(&remove, None, None);
    assert_eq!(x.provider, "owner_annotations");
    assert_eq!(x.ips, [ip("10.0.0.1"), ip("10.0.0.2"), ip("10.0.0.3")]);
    e.commit();
    assert!(e.kernel.kernel.device.qdiscs.is_empty());
    assert_eq!(e.annotations().iter().count(), 0);
}

#[test]
fn prune_lists_what_the_policy_no_longer_names() {
    let state = TempState::new();
    let mut e = engine(Fake::default(), &state, true);
    for r in [limit("10.0.0.1", 1_000), limit("10.0.0.2", 1_000)] {
        e.stage(r, None, None);
    }
    e.per_ip(
        &wanted(Target::PerIp { inbound: None }, Want::Limit(5_000)),
        None,
        Some(evidence(&["10.0.0.7"])),
    );
    e.commit();
    let owner = e.runtime.owner();
    let listed = |keys: &[&str]| -> BTreeSet<prune::Listed> {
        keys.iter()
            .map(|k| {
                (
                    DEV_NAME.to_string(),
                    Direction::Download,
                    k.parse().unwrap(),
                )
            })
            .collect()
    };
    let stale = |keys: &[&str]| prune::stale(e.annotations(), "", &owner, DEV_NAME, &listed(keys));
    // The policy still lists 10.0.0.1 and the per_ip set (as `ip all`): 10.0.0.2 goes.
    assert_eq!(
        stale(&["ip 10.0.0.1", "ip all"]),
        [Stale {
            direction: Direction::Download,
            key: "ip 10.0.0.2".parse().unwrap(),
            set: None,
        }]
    );
    // Without `ip all`, the set's member goes too, marked as one.
    let gone = stale(&["ip 10.0.0.1"]);
    assert_eq!(gone.len(), 2);
    assert_eq!(gone[1].set.as_deref(), Some(PER_IP));
    // Another device, direction or owner is not this policy's business.
    assert!(prune::stale(e.annotations(), "", "host:other", DEV_NAME, &listed(&[])).is_empty());
    assert!(prune::stale(e.annotations(), "", &owner, "eth9", &listed(&[])).is_empty());
}

#[test]
fn watch_adds_at_once_and_drops_after_the_grace_period() {
    let state = TempState::new();
    let per_ip = wanted(Target::PerIp { inbound: None }, Want::Limit(5_000));
    let mut watcher = Watcher::new(per_ip, Duration::from_secs(30));
    let t0 = Instant::now();
    let mut kernel = Fake::default();
    let mut round = |clients: &[&str], at: u64| {
        let mut e = engine(std::mem::take(&mut kernel), &state, true);
        let r = watcher.round(&mut e, &evidence(clients), t0 + Duration::from_secs(at));
        kernel = std::mem::take(&mut e.kernel);
        r
    };
    let Round::PerIp { live, departed, .. } = round(&["10.0.0.1", "10.0.0.2"], 0) else {
        panic!("a per_ip round")
    };
    assert_eq!(live.len(), 2);
    assert!(live.iter().all(|(_, d)| d.outcome == Outcome::Executed));
    assert!(departed.is_empty());
    // 10.0.0.1 leaves; within the grace period its rule stays.
    let Round::PerIp { departed, .. } = round(&["10.0.0.2"], 10) else {
        panic!("a per_ip round")
    };
    assert!(departed.is_empty());
    // It comes back at 20 s and leaves again: the clock starts over.
    round(&["10.0.0.1", "10.0.0.2"], 20);
    let Round::PerIp { departed, .. } = round(&["10.0.0.2"], 45) else {
        panic!("a per_ip round")
    };
    assert!(departed.is_empty(), "gone 25 s, within 30 s");
    let Round::PerIp { live, departed, .. } = round(&["10.0.0.2"], 51) else {
        panic!("a per_ip round")
    };
    assert_eq!(live.len(), 1);
    assert_eq!(departed.len(), 1);
    let (gone_ip, gone_for, d) = &departed[0];
    assert_eq!(*gone_ip, ip("10.0.0.1"));
    assert_eq!(*gone_for, Duration::from_secs(31));
    assert_eq!(d.decision.kind, DecisionKind::Remove);
    assert_eq!(d.outcome, Outcome::Executed);
    assert_eq!(kernel.kernel.device.classes.len(), 1);
    // Unreadable evidence changes nothing.
    let mut e = engine(kernel, &state, true);
    let r = watcher.round(
        &mut e,
        &Evidence::unavailable("gone".into()),
        t0 + Duration::from_secs(90),
    );
    assert!(matches!(r, Round::Skipped(_)));
    assert_eq!(e.kernel.kernel.device.classes.len(), 1);
}

#[test]
fn a_dry_run_plans_and_changes_nothing() {
    let state = TempState::new();
    let mut e = engine(Fake::default(), &state, false);
    let t = e.stage(limit("10.0.0.1", 1_000), None, None);
    let mut run = e.commit();
    let d = run.take(t);
    assert_eq!(d.outcome, Outcome::PlanReady);
    assert!(!d.decision.steps.is_empty());
    assert!(d.execution.is_none());
    assert!(e.kernel.calls.steps.is_empty());
    assert!(
        !state.0.exists(),
        "a dry-run takes no lock and writes no state"
    );
}

/// A runtime whose config and scope are given: no process, no sockets.
struct Scripted {
    scope: crate::evidence::scope::Scope,
    reads: std::rc::Rc<std::cell::Cell<u32>>,
}

impl Scripted {
    /// A runtime listening (TCP) on `addresses`.
    fn listening(addresses: &[&str]) -> Self {
        use crate::evidence::scope::{ListenEndpoint, Scope};
        Scripted {
            scope: Scope::Listeners(
                addresses
                    .iter()
                    .map(|a| ListenEndpoint {
                        transport: crate::netlink::sock_diag::Transport::Tcp,
                        local: a.parse().unwrap(),
                        inbound: "in".into(),
                        container_port: None,
                    })
                    .collect(),
            ),
            reads: Default::default(),
        }
    }
}

impl Live for Scripted {
    fn config(&self) -> Result<Loaded, String> {
        Ok(Loaded {
            located: crate::xray::locate::Located {
                confdir: None,
                origin: crate::xray::locate::Origin::Flags,
                files: Vec::new(),
                format: None,
            },
            files: Vec::new(),
            merged: Default::default(),
        })
    }

    fn evidence(&self, _: &Loaded) -> Evidence {
        evidence(&[])
    }

    fn scope(&self, _: &Loaded) -> crate::evidence::scope::Scope {
        self.reads.set(self.reads.get() + 1);
        self.scope.clone()
    }
}

#[test]
fn the_baseline_takes_the_runtimes_scope_or_blocks_when_there_is_none() {
    use crate::evidence::scope::{ListenEndpoint, Scope};
    use crate::netlink::sock_diag::Transport;
    let state = TempState::new();
    let reads = std::rc::Rc::new(std::cell::Cell::new(0));
    let endpoints = vec![ListenEndpoint {
        transport: Transport::Tcp,
        local: "10.9.0.1:9000".parse().unwrap(),
        inbound: "in".into(),
        container_port: None,
    }];
    let live = Scripted {
        scope: Scope::Listeners(endpoints.clone()),
        reads: reads.clone(),
    };
    let mut e = engine(Fake::default(), &state, true).with_live(Box::new(live));
    let all = |want| wanted(Target::AllShared, want).resolved(Subject::AllShared);
    let t = e.stage(all(Want::Limit(1_000)), None, None);
    let d = e.decided(t);
    assert_eq!(d.scope, Some(ScopeUsed::Runtime(endpoints.clone())));
    assert!(d.decision.blocked.is_none());
    // An address limit is scoped the same way, and the scope is read once per run.
    e.stage(limit("10.0.0.2", 1_000), None, None);
    e.stage(all(Want::Limit(2_000)), None, None);
    assert_eq!(reads.get(), 1);
    e.commit();
    let nodes = &e.kernel.kernel.device.filters;
    assert!(
        nodes
            .iter()
            .any(|f| f.filter.priority == shaping::BAND_IP_BASELINE),
        "{nodes:?}"
    );

    // A runtime whose traffic cannot be told apart: blocked, naming why.
    let state = TempState::new();
    let live = Scripted {
        scope: Scope::Unscoped("inbound \"tp\" is a transparent proxy".into()),
        reads,
    };
    let mut e = engine(Fake::default(), &state, true).with_live(Box::new(live));
    let t = e.stage(all(Want::Limit(1_000)), None, None);
    let d = e.decided(t);
    assert!(
        matches!(&d.decision.blocked, Some(crate::reconcile::Blocked::Unscoped { why, .. }) if why.contains("transparent")),
        "{:?}",
        d.decision.blocked
    );
    assert_eq!(d.outcome, Outcome::Blocked);
    // A removal needs no scope.
    let t = e.stage(all(Want::Remove), None, None);
    assert!(e.decided(t).decision.blocked.is_none());
}

/// The client nodes on the fake device, read back as raylimit reads them.
fn client_nodes(e: &Engine<Fake>) -> Vec<crate::reconcile::observe::Node> {
    let end = shaping::client_end(Direction::Download);
    let shaped = crate::reconcile::observe::ShapedRoot::read(&e.kernel.kernel.device, end);
    shaped.nodes().cloned().collect()
}

#[test]
fn a_client_rule_matches_only_the_runtimes_listeners_and_follows_them_when_they_move() {
    let state = TempState::new();
    let live = Scripted::listening(&["10.9.0.1:9000", "[::]:443"]);
    let mut e = engine(Fake::default(), &state, true).with_live(Box::new(live));
    let t = e.stage(limit("10.0.0.2", 1_000), None, None);
    let mut run = e.commit();
    let d = run.take(t);
    assert_eq!(d.outcome, Outcome::Executed, "{:?}", d.decision.blocked);
    assert!(matches!(d.scope, Some(ScopeUsed::Runtime(ref l)) if l.len() == 2));
    // One node per listener of the client's family (the IPv6 wildcard takes IPv4 too), each
    // with the listener's port (and address when concrete), all to one class.
    let nodes = client_nodes(&e);
    let listeners: BTreeSet<String> = nodes
        .iter()
        .map(|n| n.matched.listener.unwrap().to_string())
        .collect();
    assert_eq!(
        listeners,
        ["0.0.0.0:443", "10.9.0.1:9000"].map(String::from).into()
    );
    let classes: BTreeSet<_> = nodes.iter().map(|n| n.classid).collect();
    assert_eq!(classes.len(), 1);
    let handles: BTreeSet<u32> = nodes.iter().map(|n| n.entry.filter.handle).collect();

    // The runtime restarts listening on 9001 instead of 9000: the node moves in place.
    let mut e = e.with_live(Box::new(Scripted::listening(&[
        "10.9.0.1:9001",
        "[::]:443",
    ])));
    let sent = e.kernel.calls.steps.len();
    let t = e.stage(limit("10.0.0.2", 1_000), None, None);
    let mut run = e.commit();
    let d = run.take(t);
    assert_eq!(
        d.decision.kind,
        DecisionKind::Replace,
        "{}",
        d.decision.reason
    );
    assert!(
        d.decision.reason.contains("10.9.0.1:9001"),
        "{}",
        d.decision.reason
    );
    assert_eq!(e.kernel.calls.steps[sent..], ["replace-filter"]);
    let moved = client_nodes(&e);
    let now: BTreeSet<u32> = moved.iter().map(|n| n.entry.filter.handle).collect();
    assert_eq!(now, handles, "the same node handles");
    assert_eq!(
        moved.iter().map(|n| n.classid).collect::<BTreeSet<_>>(),
        classes,
        "the same class"
    );
    assert!(moved
        .iter()
        .any(|n| n.matched.listener.unwrap().to_string() == "10.9.0.1:9001"));

    // A client of a family the runtime does not listen in is refused, naming its listeners.
    let mut e = e.with_live(Box::new(Scripted::listening(&["10.9.0.1:9001"])));
    let t = e.stage(limit("2001:db8::7", 1_000), None, None);
    let d = e.decided(t);
    assert!(
        matches!(&d.decision.blocked, Some(crate::reconcile::Blocked::Reason(r)) if r.contains("10.9.0.1:9001 only")),
        "{:?}",
        d.decision.blocked
    );

    // Removal finds the rule's nodes whatever their listeners.
    let t = e.stage(
        {
            let mut r = limit("10.0.0.2", 1_000);
            r.want = Want::Remove;
            r
        },
        None,
        None,
    );
    let mut run = e.commit();
    assert_eq!(run.take(t).outcome, Outcome::Executed);
    assert!(client_nodes(&e).is_empty());
    assert!(e.kernel.kernel.device.classes.is_empty());
}

#[test]
fn a_device_scoped_client_rule_matches_the_address_alone() {
    let state = TempState::new();
    let mut e = device_wide_engine(Fake::default(), &state);
    let t = e.stage(limit("10.0.0.2", 1_000), None, None);
    let mut run = e.commit();
    let d = run.take(t);
    assert_eq!(d.outcome, Outcome::Executed);
    assert_eq!(d.scope, Some(ScopeUsed::ClientAddress));
    let nodes = client_nodes(&e);
    assert_eq!(nodes.len(), 1);
    assert_eq!(nodes[0].matched, shaping::ClientMatch::ip(ip("10.0.0.2")));
}

/// The device's ingress redirect, read back as raylimit reads it.
fn hook(e: &Engine<Fake>) -> crate::reconcile::observe::Hook {
    crate::reconcile::observe::Hook::read(&e.kernel.kernel.device)
}

#[test]
fn the_upload_redirect_carries_only_the_runtimes_listeners_while_every_rule_is_scoped() {
    let state = TempState::new();
    let live = Scripted::listening(&["10.9.0.1:9000", "[::]:443"]);
    let mut e = engine(Fake::default(), &state, true).with_live(Box::new(live));
    let upload = |addr: &str, want| {
        let mut r = limit(addr, 1_000);
        r.direction = Direction::Upload;
        r.want = want;
        r
    };
    let t = e.stage(upload("10.0.0.2", Want::Limit(1_000)), None, None);
    let mut run = e.commit();
    let d = run.take(t);
    assert_eq!(d.outcome, Outcome::Executed, "{:?}", d.decision.blocked);
    assert!(d
        .decision
        .forms
        .iter()
        .any(|f| f.contains("one u32 node per runtime listener")));
    // One redirect node per listener the client's rule uses, no catch-all.
    let h = hook(&e);
    assert!(h.redirect.is_none(), "{h:?}");
    let listeners: BTreeSet<String> = h.listeners.iter().map(|(m, _, _)| m.to_string()).collect();
    assert_eq!(
        listeners,
        ["0.0.0.0:443", "10.9.0.1:9000"].map(String::from).into()
    );

    // A device-wide rule on the same IFB needs every packet: the catch-all replaces the nodes.
    let fake = std::mem::take(&mut e.kernel);
    drop(e);
    let mut wide = device_wide_engine(fake, &state);
    let t = wide.stage(upload("10.0.0.3", Want::Limit(2_000)), None, None);
    let mut run = wide.commit();
    assert_eq!(run.take(t).outcome, Outcome::Executed);
    let h = hook(&wide);
    assert!(h.redirect.is_some() && h.listeners.is_empty(), "{h:?}");
    let t = wide.stage(upload("10.0.0.3", Want::Remove), None, None);
    let mut run = wide.commit();
    assert_eq!(run.take(t).outcome, Outcome::Executed);

    // Once it is gone, the redirect is scoped again; the last rule takes it all away.
    let h = hook(&wide);
    assert!(h.redirect.is_none() && h.listeners.len() == 2, "{h:?}");
    let fake = std::mem::take(&mut wide.kernel);
    drop(wide);
    let mut e = engine(fake, &state, true).with_live(Box::new(Scripted::listening(&[
        "10.9.0.1:9000",
        "[::]:443",
    ])));
    let t = e.stage(upload("10.0.0.2", Want::Remove), None, None);
    let mut run = e.commit();
    assert_eq!(run.take(t).outcome, Outcome::Executed);
    let h = hook(&e);
    assert!(h.parent.is_none() && h.listeners.is_empty(), "{h:?}");
}

/// The minor of the class the annotation of this runtime's rule for `addr` records.
fn recorded_minor(e: &Engine<Fake>, shaped_device: &str, addr: &str) -> u16 {
    e.annotations()
        .find(
            "",
            shaped_device,
            &crate::policy::SubjectKey::Ip(ip(addr)),
            &runtime().owner(),
        )
        .and_then(|a| a.class_minor)
        .expect("annotated with a class")
}

/// The addresses a run's repairs are for, with the rate each asks for.
fn repaired(e: &Engine<Fake>, repairs: &[Ticket]) -> Vec<(String, Want)> {
    repairs
        .iter()
        .map(|t| {
            let d = e.decided(*t);
            (d.request.subject.value(), d.request.want)
        })
        .collect()
}

#[test]
fn a_run_repairs_what_the_kernel_lost_of_its_runtimes_rules() {
    use crate::reconcile::observe::classid_of;
    let state = TempState::new();
    let mut e = engine(Fake::default(), &state, true);
    e.stage(limit("10.0.0.1", 100_000), None, None);
    e.stage(limit("10.0.0.2", 200_000), None, None);
    let mut unlimited = limit("10.0.0.4", 1);
    unlimited.want = Want::Unlimited;
    e.stage(unlimited, None, None);
    e.commit();

    // By hand: 10.0.0.2's filter nodes are deleted; its class stays, sent to by nothing.
    let minor = recorded_minor(&e, DEV_NAME, "10.0.0.2");
    let sends_to_it = |f: &crate::model::tc::FilterEntry| {
        classid_of(&f.filter).is_some_and(|c| c.minor() == minor)
    };
    e.kernel.kernel.device.filters.retain(|f| !sends_to_it(f));
    // A run for another client repairs it in the same commit.
    let t = e.stage(limit("10.0.0.3", 300_000), None, None);
    let repairs = e.stage_repairs();
    assert_eq!(
        repaired(&e, &repairs),
        [("10.0.0.2".to_string(), Want::Limit(200_000))]
    );
    let mut run = e.commit();
    assert_eq!(run.take(t).outcome, Outcome::Executed);
    assert_eq!(run.take(repairs[0]).outcome, Outcome::Executed);
    assert!(e.kernel.kernel.device.filters.iter().any(sends_to_it));
    // Nothing is left to repair.
    e.stage(limit("10.0.0.3", 300_000), None, None);
    assert!(e.stage_repairs().is_empty());
    e.commit();

    // By hand: the whole root is deleted. Every rule of the runtime comes back as recorded,
    // the unlimited exception too.
    e.kernel.kernel.device = crate::model::DeviceTc {
        ifindex: super::fake::DEV,
        ..Default::default()
    };
    let t = e.stage(limit("10.0.0.3", 300_000), None, None);
    let repairs = e.stage_repairs();
    let mut got = repaired(&e, &repairs);
    got.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        got,
        [
            ("10.0.0.1".to_string(), Want::Limit(100_000)),
            ("10.0.0.2".to_string(), Want::Limit(200_000)),
            ("10.0.0.4".to_string(), Want::Unlimited),
        ]
    );
    let mut run = e.commit();
    assert_eq!(run.take(t).outcome, Outcome::Executed);
    for r in repairs {
        assert_eq!(run.take(r).outcome, Outcome::Executed);
    }
    assert_eq!(e.kernel.kernel.device.classes.len(), 3);
    for addr in ["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4"] {
        let t = e.stage(
            match addr {
                "10.0.0.4" => {
                    let mut r = limit(addr, 1);
                    r.want = Want::Unlimited;
                    r
                }
                "10.0.0.1" => limit(addr, 100_000),
                "10.0.0.2" => limit(addr, 200_000),
                _ => limit(addr, 300_000),
            },
            None,
            None,
        );
        assert_eq!(e.decided(t).decision.kind, DecisionKind::NoOp, "{addr}");
    }
    assert!(e.stage_repairs().is_empty());
    e.commit();
}

#[test]
fn an_upload_root_whose_hook_was_deleted_is_put_back_in_force() {
    let state = TempState::new();
    let mut e = engine(Fake::default(), &state, true);
    let upload = |addr: &str, rate| {
        let mut r = limit(addr, rate);
        r.direction = Direction::Upload;
        r
    };
    e.stage(upload("10.0.0.1", 100_000), None, None);
    e.stage(upload("10.0.0.2", 100_000), None, None);
    e.commit();
    assert!(!hook(&e).listeners.is_empty());
    // By hand: `tc qdisc del dev eth0 clsact` takes the hook and its redirect filters.
    let device = &mut e.kernel.kernel.device;
    device
        .qdiscs
        .retain(|q| q.qdisc.kind != crate::model::tc::QdiscKind::Clsact);
    device.filters.clear();
    assert!(hook(&e).parent.is_none());
    // Every upload decision checks the hook: even the removal of another client puts the
    // redirect back for the rule left on the IFB.
    let mut removal = upload("10.0.0.2", 1);
    removal.want = Want::Remove;
    let t = e.stage(removal, None, None);
    assert!(e.stage_repairs().is_empty());
    let mut run = e.commit();
    let d = run.take(t);
    assert_eq!(d.outcome, Outcome::Executed, "{:?}", d.decision.reason);
    let h = hook(&e);
    assert!(h.clsact && !h.listeners.is_empty(), "{h:?}");
}

#[test]
fn removing_every_rule_is_one_root_delete_that_undoes_to_all_of_them() {
    let state = TempState::new();
    let mut e = engine(Fake::default(), &state, true);
    let addrs = ["10.0.0.1", "10.0.1.2", "10.0.2.3"];
    for a in addrs {
        e.stage(limit(a, 1_000), None, None);
    }
    e.commit();
    let count = |e: &Engine<Fake>| {
        let d = &e.kernel.kernel.device;
        (d.qdiscs.len(), d.classes.len(), d.filters.len())
    };
    let before = count(&e);
    let removal = |a: &str| {
        let mut r = limit(a, 1_000);
        r.want = Want::Remove;
        r
    };

    // A later step of the same run fails after the root went: the root's undo rebuilds all
    // the rules, and every decision says the run was undone.
    let tickets: Vec<Ticket> = addrs
        .iter()
        .map(|a| e.stage(removal(a), None, None))
        .collect();
    let mut upload = limit("10.0.9.9", 1_000);
    upload.direction = Direction::Upload;
    e.stage(upload, None, None);
    e.kernel.fail_at = Some(e.kernel.calls.steps.len() + 1);
    let sent = e.kernel.calls.steps.len();
    let mut run = e.commit();
    assert_eq!(e.kernel.calls.steps[sent], "delete-root-qdisc");
    for t in &tickets {
        assert_eq!(run.take(*t).outcome, Outcome::Failed);
    }
    assert_eq!(count(&e), before);
    for a in addrs {
        let t = e.stage(limit(a, 1_000), None, None);
        assert_eq!(e.decided(t).decision.kind, DecisionKind::NoOp, "{a}");
    }
    e.commit();

    // Alone, the removals send one step: the root's delete, which stands for every delete
    // under it in each decision's results.
    e.kernel.fail_at = None;
    let tickets: Vec<Ticket> = addrs
        .iter()
        .map(|a| e.stage(removal(a), None, None))
        .collect();
    let planned: usize = tickets
        .iter()
        .map(|t| e.decided(*t).decision.steps.len())
        .sum();
    assert!(planned > 3, "{planned}");
    let sent = e.kernel.calls.steps.len();
    let mut run = e.commit();
    assert_eq!(e.kernel.calls.steps[sent..], ["delete-root-qdisc"]);
    assert_eq!(count(&e), (0, 0, 0));
    for t in tickets {
        let d = run.take(t);
        assert_eq!(d.outcome, Outcome::Executed);
        let results = &d.execution.as_ref().unwrap().results;
        // One result per step of the decision's own plan, in its order.
        assert_eq!(results.len(), d.decision.steps.len());
        for (s, r) in d.decision.steps.iter().zip(results) {
            assert_eq!(r.status, super::execute::Status::Ok);
            assert_eq!(r.warning.is_some(), s.name != "delete-root-qdisc", "{r:?}");
        }
    }
}

/// The kind of every leaf qdisc under raylimit's classes.
fn leaf_kinds(e: &Engine<Fake>) -> Vec<&str> {
    e.kernel
        .kernel
        .device
        .qdiscs
        .iter()
        .filter(|q| q.qdisc.parent.major() == crate::shaping::ROOT_MAJOR)
        .map(|q| q.qdisc.kind_name())
        .collect()
}

/// The next run on the same kernel and state, as a new process would open it.
fn reopen(mut e: Engine<Fake>, state: &TempState) -> Engine<Fake> {
    let kernel = std::mem::take(&mut e.kernel);
    drop(e);
    engine(kernel, state, true)
}

#[test]
fn the_leaf_is_fq_codel_where_the_kernel_has_it_and_the_rate_suits_and_tbf_sides_move_to_it() {
    use crate::netlink::probe::Feature;
    let with = |features: Vec<Feature>| Fake {
        features,
        ..Fake::default()
    };
    let (fast, slow) = (1_000_000, 64_000);
    let state = TempState::new();
    let mut e = engine(with(vec![Feature::Tbf, Feature::FqCodel]), &state, true);
    e.stage(limit("10.0.0.1", fast), None, None);
    e.commit();
    assert_eq!(leaf_kinds(&e), ["fq_codel"]);
    // A slow class on the same side gets the TBF, which cuts GSO packets into frames.
    let mut e = reopen(e, &state);
    e.stage(limit("10.0.0.2", slow), None, None);
    e.commit();
    assert_eq!(leaf_kinds(&e), ["fq_codel", "tbf"]);

    // Without TBF, fq_codel at any rate.
    let state = TempState::new();
    let mut e = engine(with(vec![Feature::FqCodel]), &state, true);
    e.stage(limit("10.0.0.2", slow), None, None);
    e.commit();
    assert_eq!(leaf_kinds(&e), ["fq_codel"]);

    let state = TempState::new();
    let mut e = engine(with(vec![Feature::Tbf]), &state, true);
    e.stage(limit("10.0.0.1", fast), None, None);
    e.commit();
    assert_eq!(leaf_kinds(&e), ["tbf"]);
    // Without fq_codel the side keeps its TBF leaves, for a new fast class too.
    let mut e = reopen(e, &state);
    e.stage(limit("10.0.0.2", fast), None, None);
    e.commit();
    assert_eq!(leaf_kinds(&e), ["tbf", "tbf"]);
    // On a kernel with fq_codel (its module confirmed without reading the configuration), the
    // next run that stages them moves the fast classes to it: the TBF goes, fq_codel is made.
    e.kernel.features.push(Feature::FqCodel);
    let mut e = reopen(e, &state);
    let moved = e.stage(limit("10.0.0.1", fast), None, None);
    let steps: Vec<&str> = e
        .decided(moved)
        .decision
        .steps
        .iter()
        .map(|s| s.name.as_ref())
        .collect();
    assert_eq!(steps, ["change-class", "delete-leaf", "create-leaf"]);
    e.stage(limit("10.0.0.2", fast), None, None);
    e.commit();
    assert_eq!(leaf_kinds(&e), ["fq_codel", "fq_codel"]);
}

//! The reconcile engine every command drives: `limit`, a per_ip expansion, each `watch` round and
//! `apply --file` (with `--prune`).
//!
//! One run: [`Engine::open`] takes the lock (when executing), reads the annotations and finds the
//! device; requests are staged one by one ([`Engine::stage`], or [`Engine::resolve`] for a target
//! the runtime must resolve first), each decided against one observation per shaped side that is
//! kept current as decisions are made; [`Engine::commit`] then applies every change together
//! (batched tc, one nft transaction, the whole run undone on any failure), saves the annotations
//! once and hands back a typed [`Decided`] per staged request. The kernel is reached only
//! through the [`Kernel`] trait, so all of this runs against an in-memory kernel in unit tests.

pub mod execute;
pub mod inspect;
pub mod kernel;
pub mod prune;
pub mod repair;
pub mod resolve;
pub mod status;
pub mod watch;

#[cfg(test)]
pub mod fake;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::rc::Rc;

pub use execute::{execute, execute_with_progress, Execution, RunItem, Status, StepResult};
pub use kernel::{Kernel, NetlinkKernel};

use crate::evidence::scope::{ListenEndpoint, Scope};
use crate::evidence::{self, Evidence};
use crate::model::tc::Op;
use crate::model::u32::End;
use crate::model::Link;
use crate::netlink::probe::{Capabilities, Feature};
use crate::netlink::NetlinkError;
use crate::ownership::{Annotation, Annotations, Lock, StateDir};
use crate::policy::{Request, Subject, SubjectKey, Want};
use crate::reconcile::observe::{Hook, Observation, RootState, ShapedRoot};
use crate::reconcile::plan::{Operation, Step, TcObject};
use crate::reconcile::{self, Context, Decision};
use crate::runtime::Runtime;
use crate::shaping::{self, CatchAll, ListenerMatch};
use crate::xray::Loaded;

/// The set name per_ip rules are annotated with.
pub const PER_IP: &str = "per_ip";

/// Why a run could not start.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The device is not in the namespace: a mistake in the request.
    #[error("no network device named {device:?}{}", netns.as_ref().map(|n| format!(" in network namespace {n}")).unwrap_or_default())]
    NoDevice {
        device: String,
        netns: Option<String>,
    },
    #[error(transparent)]
    Kernel(#[from] NetlinkError),
    /// The lock could not be taken (another run holds it, or the state directory is unusable).
    #[error("{0}")]
    Lock(String),
    /// The owner annotations cannot be read: nothing is planned on them.
    #[error(transparent)]
    State(#[from] crate::ownership::StateError),
}

/// The names of the shared objects raylimit records creating.
const MADE_HOOK: &str = "ingress-hook";
const MADE_IFB: &str = "ifb";

/// Where a runtime's config and live evidence come from: the runtime itself, or a test's script.
pub trait Live {
    /// The runtime's config, as it reads it.
    fn config(&self) -> Result<Loaded, String>;
    /// The runtime's live sessions, read with its config.
    fn evidence(&self, cfg: &Loaded) -> Evidence;
    /// The runtime's client-facing listening sockets, read with its config.
    fn scope(&self, cfg: &Loaded) -> Scope;
}

/// The running runtime, read through procfs, sock_diag and its API; `device_netns` is the inode
/// of the network namespace the shaped device is in.
struct RuntimeLive(Rc<Runtime>, Option<u64>);

impl Live for RuntimeLive {
    fn config(&self) -> Result<Loaded, String> {
        self.0.load_config()
    }

    fn evidence(&self, cfg: &Loaded) -> Evidence {
        evidence::gather(&self.0, cfg, &evidence::Options::default())
    }

    fn scope(&self, cfg: &Loaded) -> Scope {
        let listeners = evidence::client_listeners(cfg);
        let proc_root = evidence::Options::default().proc_root;
        let scope = evidence::scope::scope(self.0.pid(), cfg, &listeners, &proc_root);
        // A container seen from another namespace (the host's devices): its clients arrive at
        // the ports the engine publishes.
        let elsewhere = self.0.netns.as_ref().map(|n| n.inode) != self.1 || self.1.is_none();
        match &self.0.container {
            Some(c) if !c.ports.is_empty() && elsewhere => {
                evidence::scope::published(scope, &c.ports)
            }
            _ => scope,
        }
    }
}

/// How a run is made.
#[derive(Debug, Clone)]
pub struct Options {
    /// The named network namespace (`/run/netns/NAME`), none for the current one.
    pub netns: Option<String>,
    /// Change the kernel; otherwise only plan.
    pub execute: bool,
    /// Go ahead when the tc state could not be observed or compared.
    pub allow_missing_state: bool,
    /// Client rules and `--ip all` match every packet on the device (`--scope device`), not
    /// only the runtime's.
    pub device_scope: bool,
    pub state_dir: StateDir,
}

/// A staged request's place in the run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Ticket(usize);

/// Where a decision stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    PlanReady,
    NoChanges,
    Executed,
    Blocked,
    Failed,
}

impl Outcome {
    pub fn name(self) -> &'static str {
        match self {
            Outcome::PlanReady => "plan ready",
            Outcome::NoChanges => "no changes",
            Outcome::Executed => "executed",
            Outcome::Blocked => "blocked",
            Outcome::Failed => "failed",
        }
    }
}

/// The shaped root as the decision found it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RootSeen {
    /// The tc state could not be read.
    Unknown,
    /// The shaped device (an IFB) does not exist yet.
    Absent,
    Managed,
    /// The kernel's own default (its kind), or no root qdisc at all.
    Default(Option<String>),
    /// Another tool's root qdisc.
    Foreign(String),
}

impl RootSeen {
    fn of(obs: &Observation) -> Self {
        if obs.error.is_some() {
            return RootSeen::Unknown;
        }
        match obs.shaped.as_ref().map(|s| &s.root) {
            None => RootSeen::Absent,
            Some(RootState::Managed(_)) => RootSeen::Managed,
            Some(RootState::Default(kind)) => RootSeen::Default(kind.clone()),
            Some(RootState::Foreign(desc)) => RootSeen::Foreign(desc.clone()),
        }
    }
}

/// Which of the device's packets a rule matches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScopeUsed {
    /// Every packet on the device, as the operator asked.
    Device,
    /// Only the packets of these runtime listeners.
    Runtime(Vec<ListenEndpoint>),
    /// Every packet to or from the client's address on the device, as the operator asked.
    ClientAddress,
    /// The inbound's own listener.
    InboundListener,
    /// The outbound's socket mark.
    SocketMark,
}

/// Something a report should say beside its decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Warning {
    /// An inbound rule under a baseline that is evaluated before it.
    Shadowed {
        shaped_device: String,
        kind: &'static str,
    },
    /// The decision's own steps were fine, but another change of the run failed.
    RunUndone,
    /// The kernel changed, but the annotations could not be written.
    NotAnnotated(String),
}

impl fmt::Display for Warning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Warning::Shadowed { shaped_device, kind } => write!(
                f,
                "{shaped_device} has an --ip all baseline (band {}), which is evaluated first: traffic it matches never reaches the {kind} rule",
                shaping::BAND_IP_BASELINE
            ),
            Warning::RunUndone => f.write_str(
                "not applied: another change of this run failed, so the whole run was undone",
            ),
            Warning::NotAnnotated(e) => write!(
                f,
                "the kernel was changed, but the owner annotation could not be written: {e}"
            ),
        }
    }
}

/// One staged request: what was decided, and (after the commit) what running it did.
#[derive(Debug, Clone)]
pub struct Decided {
    pub request: Request,
    /// Which packets the rule may match, for the families that choose it (`--ip all`).
    pub scope: Option<ScopeUsed>,
    pub shaped_device: String,
    pub root: RootSeen,
    pub decision: Decision,
    pub warnings: Vec<Warning>,
    pub execution: Option<Execution>,
    pub outcome: Outcome,
}

/// A run's decisions, boxed: a run of 10 000 keeps each until its report takes it, and a box
/// moves out without the list's room for all of them staying behind.
#[allow(clippy::vec_box)]
type StagedList = Vec<Box<Decided>>;

/// Every staged request of a run, as the commit left them.
#[derive(Debug, Default)]
pub struct Committed {
    decided: Vec<Option<Box<Decided>>>,
}

impl Committed {
    /// Takes one staged request's result (each is taken once).
    pub fn take(&mut self, ticket: Ticket) -> Decided {
        *self.decided[ticket.0]
            .take()
            .expect("each ticket's result is taken once")
    }

    pub fn get(&self, ticket: Ticket) -> &Decided {
        self.decided[ticket.0]
            .as_ref()
            .expect("a ticket's result is read before it is taken")
    }
}

/// A change the run makes to the annotations.
enum AnnotationChange {
    Upsert(Annotation),
    Remove {
        shaped_device: String,
        subject: SubjectKey,
        owner: String,
    },
}

/// One run against one device: the runtime, the kernel, the lock and the owner annotations.
pub struct Engine<K: Kernel> {
    pub runtime: Rc<Runtime>,
    /// The runtime's owner string and description, made once (every staged rule records them).
    owner: String,
    description: String,
    pub device: Link,
    pub execute: bool,
    allow_missing_state: bool,
    device_scope: bool,
    /// The runtime's scope, read when a request first needs it.
    scope: Option<Scope>,
    /// Per shaped device, the class minors other runtimes' rules own.
    foreign_classes: BTreeMap<String, Rc<BTreeSet<u16>>>,
    /// The kernel (the engine tests read the in-memory one's state through it).
    pub(crate) kernel: K,
    live: Box<dyn Live>,
    state_dir: StateDir,
    netns_key: String,
    /// `/run/netns/NAME` for a named namespace: where nft steps run.
    netns_path: Option<String>,
    /// What the kernel offers, probed when a request first needs it.
    capabilities: Option<Capabilities>,
    /// The leaf qdisc this run gives classes, by side (egress or not) and by whether fq_codel
    /// suits their rate, once known.
    leaf: BTreeMap<(bool, bool), shaping::Leaf>,
    /// The annotations as this run leaves them (saved at commit when it succeeds).
    annotations: Annotations,
    /// The IFBs of earlier devices of this name that annotations still name (read once, when a
    /// removal first needs them).
    earlier_ifbs: Option<BTreeSet<String>>,
    annotations_changed: bool,
    /// The observation of each shaped side (true: the device's egress), once read.
    observed: BTreeMap<bool, Observation>,
    staged: StagedList,
    /// Staged decisions whose steps run at the commit.
    pending: Vec<usize>,
    /// Told (steps done, steps in all) as a commit's batches are acknowledged.
    progress: Option<Box<dyn FnMut(usize, usize) -> bool>>,
    lock: Option<Lock>,
}

impl<K: Kernel> Engine<K> {
    /// Finds the device and, when executing, takes the lock that keeps other runs out from
    /// observation to annotation.
    pub fn open(
        mut kernel: K,
        runtime: Runtime,
        device: &str,
        options: Options,
    ) -> Result<Self, OpenError> {
        let device = match kernel.link_by_name(device) {
            Ok(l) => l,
            Err(NetlinkError::NoSuchDevice(_)) => {
                return Err(OpenError::NoDevice {
                    device: device.to_string(),
                    netns: options.netns.clone(),
                })
            }
            Err(e) => return Err(e.into()),
        };
        let lock = match options.execute {
            true => Some(options.state_dir.lock().map_err(OpenError::Lock)?),
            false => None,
        };
        let runtime = Rc::new(runtime);
        let device_netns = std::fs::metadata(match &options.netns {
            Some(n) => format!("/run/netns/{n}"),
            None => "/proc/self/ns/net".into(),
        })
        .ok()
        .map(|m| std::os::unix::fs::MetadataExt::ino(&m));
        Ok(Engine {
            live: Box::new(RuntimeLive(runtime.clone(), device_netns)),
            owner: runtime.owner(),
            description: runtime.describe(),
            runtime,
            device,
            execute: options.execute,
            allow_missing_state: options.allow_missing_state,
            device_scope: options.device_scope,
            scope: None,
            foreign_classes: BTreeMap::new(),
            kernel,
            annotations: options.state_dir.load()?,
            earlier_ifbs: None,
            annotations_changed: false,
            progress: None,
            state_dir: options.state_dir,
            netns_key: options.netns.clone().unwrap_or_default(),
            netns_path: options.netns.map(|n| format!("/run/netns/{n}")),
            capabilities: None,
            leaf: BTreeMap::new(),
            observed: BTreeMap::new(),
            staged: Vec::new(),
            pending: Vec::new(),
            lock,
        })
    }

    /// Reads the runtime's config and evidence from `live` instead of the runtime itself.
    pub fn with_live(mut self, live: Box<dyn Live>) -> Self {
        self.live = live;
        self.scope = None;
        self
    }

    /// The runtime's config and live evidence.
    pub fn live(&self) -> &dyn Live {
        self.live.as_ref()
    }

    /// The device whose root shapes the request: the device itself, or its IFB.
    pub fn shaped_device(&self, on_egress: bool) -> String {
        match on_egress {
            true => self.device.name.clone(),
            false => shaping::ifb_name(self.device.index),
        }
    }

    /// The annotations as this run has them so far.
    pub fn annotations(&self) -> &Annotations {
        &self.annotations
    }

    pub fn netns_key(&self) -> &str {
        &self.netns_key
    }

    /// A staged request's decision, before the commit.
    pub fn decided(&self, ticket: Ticket) -> &Decided {
        &self.staged[ticket.0]
    }

    /// The leaf qdisc a class at `rate` gets: fq_codel where the rate suits it and the kernel is
    /// known to have it (present or an installed module), else TBF, else fq_codel at any rate,
    /// else HTB's default where nothing says. A side that holds the kind a class wants says so
    /// without a probe; one that holds TBF leaves and no fq_codel (made before raylimit used
    /// fq_codel, or on a kernel without it) moves a fast class to fq_codel only where the
    /// module checks alone confirm it, so a run that changes nothing reads no kernel config.
    /// Decided once per side and speed in a run.
    fn leaf(&mut self, egress: bool, rate: u64) -> shaping::Leaf {
        use crate::model::tc::QdiscKind;
        use shaping::Leaf;
        let fast = shaping::fq_codel_suits(rate);
        if let Some(leaf) = self.leaf.get(&(egress, fast)) {
            return *leaf;
        }
        let seen = self.observed.get(&egress).and_then(|o| o.shaped.as_ref());
        let holds = |kind: fn(&QdiscKind) -> bool| {
            seen.is_some_and(|s| s.leaves.values().any(|q| kind(&q.kind)))
        };
        let holds_fq_codel = holds(|k| matches!(k, QdiscKind::FqCodel(_)));
        let holds_tbf = holds(|k| matches!(k, QdiscKind::Tbf(_)));
        let leaf = match (fast, holds_fq_codel, holds_tbf) {
            (false, _, true) => Leaf::Tbf,
            (true, true, _) => Leaf::FqCodel,
            (true, false, true) => match self.kernel.module_confirmed(Feature::FqCodel) {
                true => Leaf::FqCodel,
                false => Leaf::Tbf,
            },
            _ => {
                let kernel = &mut self.kernel;
                let caps = self
                    .capabilities
                    .get_or_insert_with(|| kernel.capabilities());
                let fq_codel = caps.get(Feature::FqCodel).confirmed();
                let tbf = caps.get(Feature::Tbf).confirmed();
                match (fast && fq_codel, tbf, fq_codel) {
                    (true, _, _) => Leaf::FqCodel,
                    (_, true, _) => Leaf::Tbf,
                    (_, _, true) => Leaf::FqCodel,
                    _ => Leaf::Default,
                }
            }
        };
        self.leaf.insert((egress, fast), leaf);
        leaf
    }

    /// Reads what a request is decided on, once per shaped side (kept current afterwards).
    fn observe_once(&mut self, request: &Request) {
        let egress = request.on_egress();
        let obs = self
            .observed
            .entry(egress)
            .or_insert_with(|| observe(&mut self.kernel, &self.device, request));
        if matches!(request.subject, Subject::Outbound { .. }) && obs.nft.is_none() {
            obs.nft = Some(self.kernel.nft().map_err(|e| e.to_string()));
        }
    }

    /// Decides one request against the current observation; its steps count as done for the
    /// requests decided after it, and run at [`Engine::commit`]. `set` names the expanded set
    /// (`per_ip`) the rule belongs to; `blocked` is a reason the evidence gives not to execute,
    /// whatever the kernel says.
    pub fn stage(
        &mut self,
        request: Request,
        set: Option<&str>,
        blocked: Option<String>,
    ) -> Ticket {
        let shaped_device = self.shaped_device(request.on_egress());
        let subject_key = request.subject.key();
        let owner = self.owner.clone();
        let annotation = self
            .annotations
            .find(&self.netns_key, &shaped_device, &subject_key, &owner)
            .cloned();
        // Two runtimes' rules for one subject are told apart by their listeners; a device-wide
        // rule or an outbound's mark cannot be, so another runtime's rule there is a conflict.
        let exclusive = self.device_scope || matches!(request.subject, Subject::Outbound { .. });
        let owned_by_other = exclusive
            .then(|| {
                self.annotations
                    .for_subject(&self.netns_key, &shaped_device, &subject_key)
                    .find(|a| a.owner != owner)
                    .map(|a| a.owner.to_string())
            })
            .flatten();
        // Only a catch-all (the baseline, the upload redirect) or an outbound depends on
        // optional kernel features; a specific client's rule does not, and skips the probe.
        let needs_features = !request.on_egress()
            || matches!(
                request.subject,
                Subject::AllShared | Subject::Outbound { .. }
            );
        let (catch_all, has_connmark, has_fw) = if needs_features {
            let kernel = &mut self.kernel;
            let caps = self
                .capabilities
                .get_or_insert_with(|| kernel.capabilities());
            (
                CatchAll::choose(caps.has(Feature::Matchall)),
                caps.has(Feature::Connmark),
                caps.has(Feature::Fw),
            )
        } else {
            (CatchAll::choose(false), false, false)
        };
        let (rule_scope, scope_used, unscoped) = self.rule_scope(&request);
        self.observe_once(&request);
        let leaf = match request.want {
            Want::Limit(rate) => self.leaf(request.on_egress(), rate),
            _ => shaping::Leaf::Default,
        };
        let ctx = Context {
            request: request.clone(),
            catch_all,
            allow_missing_state: self.allow_missing_state,
            owned_by_other,
            remembered_minor: annotation.as_ref().and_then(|x| x.class_minor),
            owner: owner.clone(),
            netns_path: self.netns_path.clone(),
            has_connmark,
            has_fw,
            scope: rule_scope,
            foreign_classes: self.foreign_classes(&shaped_device, &owner),
            made_hook: self
                .annotations
                .made(&self.netns_key, &self.device.name, MADE_HOOK),
            made_ifb: self.annotations.made(
                &self.netns_key,
                &shaping::ifb_name(self.device.index),
                MADE_IFB,
            ),
            leaf,
        };
        let egress = request.on_egress();
        let observation = &self.observed[&egress];
        let shadowed = matches!(request.subject, Subject::Inbound { .. })
            && request.want != Want::Remove
            && observation.shaped.as_ref().is_some_and(|s| {
                s.baseline.is_some()
                    || s.listeners
                        .iter()
                        .any(|n| n.band == shaping::ListenerBand::Baseline)
            });
        let root = RootSeen::of(observation);
        let mut decision = reconcile::decide(&ctx, observation);
        if let Some(why) = blocked {
            decision.blocked = Some(reconcile::Blocked::Reason(why));
        }
        if let Some(why) = unscoped {
            decision.blocked = Some(reconcile::Blocked::Unscoped {
                device: self.device.name.clone(),
                why,
            });
        }
        // The decision describes what was observed before it; then its steps count as done for
        // the decisions after it.
        if decision.blocked.is_none() {
            let observation = self.observed.get_mut(&egress).expect("observed above");
            for step in &decision.steps {
                observation.absorb(step, egress);
            }
        }
        let mut warnings = Vec::new();
        if shadowed {
            warnings.push(Warning::Shadowed {
                shaped_device: shaped_device.clone(),
                kind: request.subject.kind(),
            });
        }
        let outcome = if decision.blocked.is_some() {
            Outcome::Blocked
        } else if decision.steps.is_empty() {
            Outcome::NoChanges
        } else {
            Outcome::PlanReady
        };
        let ticket = Ticket(self.staged.len());
        if decision.blocked.is_none() {
            let change = match request.want {
                Want::Remove => AnnotationChange::Remove {
                    shaped_device: shaped_device.clone(),
                    subject: subject_key,
                    owner,
                },
                _ => AnnotationChange::Upsert(Annotation {
                    netns: self.netns_key.as_str().into(),
                    device: self.device.name.as_str().into(),
                    direction: request.direction.name().into(),
                    subject: subject_key,
                    shaped_device: shaped_device.as_str().into(),
                    class_minor: decision.expected_class.map(|c| c.minor()),
                    rate: match request.want {
                        Want::Limit(rate) => Some(rate),
                        _ => None,
                    },
                    owner: owner.as_str().into(),
                    runtime: self.description.as_str().into(),
                    set: set.map(str::to_string),
                }),
            };
            self.record(change);
            self.record_made(&decision.steps);
            if self.execute {
                self.pending.push(ticket.0);
            }
        }
        // A plan grows by pushes; a run keeps thousands of them until its report is written.
        decision.steps.shrink_to_fit();
        self.staged.push(Box::new(Decided {
            request,
            scope: scope_used,
            shaped_device,
            root,
            decision,
            warnings,
            execution: None,
            outcome,
        }));
        ticket
    }

    /// Which packets a request's rule may match: a client rule's (and the `--ip all` baseline's)
    /// the runtime's listeners (or, with `--scope device`, every packet of the client on the
    /// device), with what the report shows and, when the runtime's traffic cannot be scoped,
    /// why. An inbound or outbound matches as its subject says.
    fn rule_scope(
        &mut self,
        request: &Request,
    ) -> (reconcile::RuleScope, Option<ScopeUsed>, Option<String>) {
        use reconcile::RuleScope;
        if request.want == Want::Remove {
            return (RuleScope::Device, None, None);
        }
        match request.subject {
            Subject::Inbound { .. } => {
                return (RuleScope::Device, Some(ScopeUsed::InboundListener), None)
            }
            Subject::Outbound { .. } => {
                return (RuleScope::Device, Some(ScopeUsed::SocketMark), None)
            }
            Subject::AllShared if self.device_scope => {
                return (RuleScope::Device, Some(ScopeUsed::Device), None)
            }
            _ if self.device_scope => {
                return (RuleScope::Device, Some(ScopeUsed::ClientAddress), None)
            }
            _ => {}
        }
        let scope = match &self.scope {
            Some(s) => s.clone(),
            None => {
                let s = match self.live.config() {
                    Ok(cfg) => self.live.scope(&cfg),
                    Err(e) => {
                        Scope::Unscoped(format!("the runtime's config could not be read: {e}"))
                    }
                };
                self.scope = Some(s.clone());
                s
            }
        };
        match scope {
            Scope::Listeners(endpoints) => {
                let matches = endpoints
                    .iter()
                    .flat_map(|e| ListenerMatch::of_socket(e.local.ip(), e.local.port()))
                    .collect();
                (
                    RuleScope::Listeners(matches),
                    Some(ScopeUsed::Runtime(endpoints)),
                    None,
                )
            }
            Scope::Unscoped(why) => (RuleScope::Device, None, Some(why)),
        }
    }

    /// The class minors on `shaped_device` that other runtimes' rules own.
    fn foreign_classes(&mut self, shaped_device: &str, owner: &str) -> Rc<BTreeSet<u16>> {
        let (annotations, netns) = (&self.annotations, &self.netns_key);
        self.foreign_classes
            .entry(shaped_device.to_string())
            .or_insert_with(|| {
                Rc::new(
                    annotations
                        .iter()
                        .filter(|a| a.netns == *netns && a.shaped_device == shaped_device)
                        .filter(|a| a.owner != owner)
                        .filter_map(|a| a.class_minor)
                        .collect(),
                )
            })
            .clone()
    }

    /// Records the shared objects a decision creates (raylimit may delete them later) and
    /// forgets those it deletes.
    fn record_made(&mut self, steps: &[Step]) {
        let ifb = shaping::ifb_name(self.device.index);
        for step in steps {
            let (device, object, made) = match step.name.as_ref() {
                "create-ingress-hook" => (self.device.name.as_str(), MADE_HOOK, true),
                "delete-ingress-hook" => (self.device.name.as_str(), MADE_HOOK, false),
                "create-ifb" => (ifb.as_str(), MADE_IFB, true),
                "delete-ifb" => (ifb.as_str(), MADE_IFB, false),
                _ => continue,
            };
            if self
                .annotations
                .set_made(&self.netns_key, device, object, made)
            {
                self.annotations_changed = true;
            }
        }
    }

    fn record(&mut self, change: AnnotationChange) {
        match change {
            AnnotationChange::Upsert(a) => {
                let known = self
                    .annotations
                    .find(&a.netns, &a.shaped_device, &a.subject, &a.owner);
                if known != Some(&a) {
                    self.annotations.upsert(a);
                    self.annotations_changed = true;
                }
            }
            AnnotationChange::Remove {
                shaped_device,
                subject,
                owner,
            } => {
                // The rule as recorded on this shaped device, and as recorded on the IFB of an
                // earlier device of the same name (deleted and made again, with another
                // ifindex): that one's objects went with the old device.
                let earlier_ifbs = self.earlier_ifbs.get_or_insert_with(|| {
                    let current_ifb = shaping::ifb_name(self.device.index);
                    self.annotations
                        .iter()
                        .filter(|a| {
                            a.netns == self.netns_key
                                && a.device == self.device.name
                                && a.shaped_device != self.device.name
                                && a.shaped_device != current_ifb
                        })
                        .map(|a| a.shaped_device.to_string())
                        .collect()
                });
                for shaped in std::iter::once(&shaped_device).chain(earlier_ifbs.iter()) {
                    if self
                        .annotations
                        .remove(&self.netns_key, shaped, &subject, &owner)
                    {
                        self.annotations_changed = true;
                    }
                }
            }
        }
    }

    /// Reports the progress of each commit's steps (a long run on a terminal shows it); when
    /// it answers false (a signal asked the run to stop), the commit stops at the next batch
    /// and undoes what it did.
    pub fn on_progress(&mut self, progress: impl FnMut(usize, usize) -> bool + 'static) {
        self.progress = Some(Box::new(progress));
    }

    /// Applies every pending decision as one run: tc steps batched, the nft changes as one
    /// transaction at the end, every acknowledgement checked; when any step fails, all of them
    /// are undone and each decision says so. The annotations are saved before the kernel
    /// changes (the intent: every object the run may create is recorded, every removal still
    /// is) and once more after (what is left), so a run killed midway leaves nothing
    /// unrecorded; the next decision observes the kernel afresh. Returns every decision staged
    /// since the last commit.
    pub fn commit(&mut self) -> Committed {
        self.observed.clear();
        // The next run (a watch round) reads the runtime's listeners again: they may move.
        self.scope = None;
        let mut staged = std::mem::take(&mut self.staged);
        let pending = std::mem::take(&mut self.pending);
        if pending.is_empty() {
            return Committed {
                decided: staged.into_iter().map(Some).collect(),
            };
        }
        if pending.iter().all(|i| staged[*i].decision.steps.is_empty()) {
            return self.commit_without_steps(staged, &pending);
        }
        // The intent, on disk before the kernel changes.
        let on_disk = self.state_dir.load().unwrap_or_default();
        let intent_recorded = self.annotations_changed && self.annotations.adds_to(&on_disk);
        if intent_recorded {
            if let Err(e) = self.state_dir.save_intent(&self.annotations, &on_disk) {
                self.annotations = on_disk;
                self.annotations_changed = false;
                return Committed {
                    decided: not_run(staged, &pending, &e),
                };
            }
        }
        let (execution, per) = {
            let decisions: Vec<&[Step]> = pending
                .iter()
                .map(|i| staged[*i].decision.steps.as_slice())
                .collect();
            let (steps, owners) = run_order(&decisions);
            let (steps, owners, subsumed) = subsume_under_root_deletes(steps, owners);
            let progress = &mut self.progress;
            let lock = &self.lock;
            let execution = execute_with_progress(&mut self.kernel, &steps, &mut |done, all| {
                if let Some(l) = lock {
                    l.heartbeat();
                }
                progress.as_mut().is_none_or(|p| p(done, all))
            });
            // Each decision gets the results of its own steps, in its plan's order.
            let mut placed: Vec<Vec<(usize, StepResult)>> = vec![Vec::new(); pending.len()];
            for (result, owned) in execution.results.iter().zip(&owners) {
                for (p, i) in owned {
                    let mut result = result.clone();
                    if subsumed.contains(&(*p, *i)) {
                        // Its own step, done (or not, or undone) with the root's delete.
                        result.warning = Some(SUBSUMED.into());
                    }
                    placed[*p].push((*i, result));
                }
            }
            let per: Vec<Execution> = placed
                .into_iter()
                .map(|mut results| {
                    results.sort_by_key(|(i, _)| *i);
                    Execution {
                        results: results.into_iter().map(|(_, r)| r).collect(),
                        rollback: Vec::new(),
                    }
                })
                .collect();
            (execution, per)
        };
        let failed = execution.failed();
        let save = if failed {
            // A failed run changes nothing, so the annotations go back to what they were.
            self.annotations = on_disk;
            intent_recorded.then(|| self.state_dir.save(&self.annotations))
        } else if self.annotations_changed && self.annotations.lack_any_of(&on_disk) {
            // What the intent kept for the removals goes now that they are done.
            Some(self.state_dir.save(&self.annotations))
        } else {
            None
        };
        self.annotations_changed = false;
        for (i, mut mine) in pending.into_iter().zip(per) {
            let d = &mut staged[i];
            let own_failure = mine.failed();
            if own_failure {
                mine.rollback = execution.rollback.clone();
            }
            d.outcome = if failed {
                Outcome::Failed
            } else if d.decision.steps.is_empty() {
                Outcome::NoChanges
            } else {
                Outcome::Executed
            };
            if failed && !own_failure {
                d.warnings.push(Warning::RunUndone);
            }
            if let Some(Err(e)) = &save {
                d.warnings.push(Warning::NotAnnotated(e.clone()));
            }
            d.execution = Some(mine);
        }
        Committed {
            decided: staged.into_iter().map(Some).collect(),
        }
    }

    /// A commit whose decisions change nothing in the kernel (every one a no_op, as most of a
    /// repeated apply or a watch round are): no intent to record and nothing to run, only the
    /// annotations to save when they changed.
    fn commit_without_steps(&mut self, mut staged: StagedList, pending: &[usize]) -> Committed {
        let save = match std::mem::take(&mut self.annotations_changed) {
            true => self.state_dir.save(&self.annotations).err(),
            false => None,
        };
        for i in pending {
            let d = &mut staged[*i];
            d.outcome = Outcome::NoChanges;
            d.execution = Some(Execution::default());
            if let Some(e) = &save {
                d.warnings.push(Warning::NotAnnotated(e.clone()));
            }
        }
        Committed {
            decided: staged.into_iter().map(Some).collect(),
        }
    }
}

/// The decisions of a commit that could not record its intent: nothing ran, and each says why.
fn not_run(mut staged: StagedList, pending: &[usize], why: &str) -> Vec<Option<Box<Decided>>> {
    for i in pending {
        let d = &mut staged[*i];
        d.outcome = Outcome::Failed;
        d.warnings.push(Warning::NotAnnotated(why.to_string()));
        d.execution = Some(Execution {
            results: vec![execute::result(Status::NotRun, None, None); d.decision.steps.len()],
            rollback: Vec::new(),
        });
    }
    staged.into_iter().map(Some).collect()
}

/// The (decision, step) places one executed step stands for.
type Owners = Vec<(usize, usize)>;
type Places = BTreeSet<(usize, usize)>;

/// A step of a run: one of a decision's, one the run made of several (the nft transaction), or
/// a root delete that stands for the deletes under it. A run of 20 000 planned steps lists
/// references to them, not copies.
#[derive(Clone)]
enum RunStep<'a> {
    Planned(&'a Step),
    Made(Box<Step>),
    /// Undone by its own undo, then by theirs (from the latest delete back), each written out
    /// only if a rollback runs.
    RootDelete {
        root: Box<RunStep<'a>>,
        under: Vec<RunStep<'a>>,
    },
}

impl std::ops::Deref for RunStep<'_> {
    type Target = Step;
    fn deref(&self) -> &Step {
        match self {
            RunStep::Planned(s) => s,
            RunStep::Made(s) => s,
            RunStep::RootDelete { root, .. } => root,
        }
    }
}

impl RunItem for RunStep<'_> {
    fn step(&self) -> &Step {
        self
    }

    fn undo_len(&self) -> usize {
        match self {
            RunStep::RootDelete { root, under } => {
                root.undo_len() + under.iter().map(RunItem::undo_len).sum::<usize>()
            }
            other => other.step().undo_len(),
        }
    }

    fn undo_step(&self, mut u: usize) -> Step {
        let RunStep::RootDelete { root, under } = self else {
            return self.step().undo_steps()[u].clone();
        };
        for part in std::iter::once(root.as_ref()).chain(under) {
            if u < part.undo_len() {
                return part.undo_step(u);
            }
            u -= part.undo_len();
        }
        unreachable!("an undo step past the root delete's undo")
    }
}

/// The run's steps in execution order, each with the (decision, step) places it stands for:
/// every decision's tc and link steps in decision order, then all nft changes as one atomic
/// transaction (a new rule's class exists by then; a removed rule's class may already be gone,
/// which sends its packets to the filters for that instant, as if unlimited).
fn run_order<'a>(decisions: &[&'a [Step]]) -> (Vec<RunStep<'a>>, Vec<Owners>) {
    let is_nft = |s: &Step| matches!(s.action, Operation::Nft { .. });
    let all: Vec<(usize, usize, &Step)> = decisions
        .iter()
        .enumerate()
        .flat_map(|(d, steps)| steps.iter().enumerate().map(move |(i, s)| (d, i, s)))
        .collect();
    let mut steps: Vec<RunStep> = Vec::with_capacity(all.len());
    let mut owners = Vec::with_capacity(all.len());
    for (d, i, step) in all.iter().filter(|(_, _, s)| !is_nft(s)) {
        steps.push(RunStep::Planned(step));
        owners.push(vec![(*d, *i)]);
    }
    let mut nft_ops = Vec::new();
    let mut nft_undo = Vec::new();
    let mut nft_owners = Vec::new();
    let mut netns = None;
    for (d, i, step) in all.iter().filter(|(_, _, s)| is_nft(s)) {
        if let Operation::Nft { netns: n, ops } = &step.action {
            netns = n.clone();
            nft_ops.extend(ops.iter().cloned());
            // A later decision's undo runs before an earlier one's.
            nft_undo.splice(0..0, step.undo_steps().iter().cloned());
            nft_owners.push((*d, *i));
        }
    }
    if !nft_owners.is_empty() {
        steps.push(RunStep::Made(Box::new(
            Step::new(
                "nft-transaction",
                Operation::Nft {
                    netns,
                    ops: nft_ops,
                },
            )
            .undone_by(nft_undo),
        )));
        owners.push(nft_owners);
    }
    (steps, owners)
}

/// What a delete the root's delete took over says in its result.
const SUBSUMED: &str = "done by deleting raylimit's root qdisc later in this run, which takes \
                        everything under it";

/// Deletes of classes and filters under a root that the same run deletes later are done by
/// that delete: the kernel drops a qdisc's classes and filters with it, while deleting them one
/// by one walks every class of the qdisc for each (a prune of 10 000 rules took seconds). Only
/// the deletes after the last other change on that device go (nothing made there in between
/// depends on them). The root's delete stands for them in the results and, for its undo, runs
/// their undo steps (last first) after its own. Returns which (decision, step) places it took.
fn subsume_under_root_deletes<'a>(
    steps: Vec<RunStep<'a>>,
    owners: Vec<Owners>,
) -> (Vec<RunStep<'a>>, Vec<Owners>, Places) {
    let root = shaping::root_qdisc(0);
    fn on(s: &Step) -> Option<(Op, &str, &TcObject)> {
        match &s.action {
            Operation::Tc {
                op, dev, object, ..
            } => Some((*op, dev.name(), object)),
            _ => None,
        }
    }
    let is_root_delete = |s: &Step| {
        matches!(on(s), Some((Op::Delete, _, TcObject::Qdisc(q)))
            if q.parent == root.parent && q.handle == root.handle)
    };
    let under_root = |object: &TcObject| match object {
        TcObject::Class(c) => c.handle.major() == shaping::ROOT_MAJOR,
        TcObject::Filter(f) => f.parent == root.handle,
        TcObject::Qdisc(_) => false,
    };
    let mut taken: BTreeSet<usize> = BTreeSet::new();
    let mut extra: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for r in (0..steps.len()).filter(|r| is_root_delete(&steps[*r])) {
        let Some((_, device, _)) = on(&steps[r]) else {
            continue;
        };
        for i in (0..r).rev() {
            match on(&steps[i]) {
                Some((Op::Delete, d, object)) if d == device && under_root(object) => {
                    taken.insert(i);
                    extra.entry(r).or_default().push(i);
                }
                Some((_, d, _)) if d == device => break,
                _ => {}
            }
        }
    }
    if taken.is_empty() {
        return (steps, owners, BTreeSet::new());
    }
    let mut subsumed = BTreeSet::new();
    let mut kept_steps = Vec::with_capacity(steps.len() - taken.len());
    let mut kept_owners = Vec::with_capacity(steps.len() - taken.len());
    for (r, (step, mut owned)) in steps.iter().zip(owners.iter().cloned()).enumerate() {
        if taken.contains(&r) {
            continue;
        }
        let Some(inner) = extra.get(&r) else {
            kept_steps.push(step.clone());
            kept_owners.push(owned);
            continue;
        };
        // `inner` runs from the latest delete back: their undo in that order.
        for i in inner {
            owned.extend(owners[*i].iter().copied());
            subsumed.extend(owners[*i].iter().copied());
        }
        kept_steps.push(RunStep::RootDelete {
            root: Box::new(step.clone()),
            under: inner.iter().map(|i| steps[*i].clone()).collect(),
        });
        kept_owners.push(owned);
    }
    (kept_steps, kept_owners, subsumed)
}

/// Reads what a request is decided on: the shaped root, and for upload the IFB and the hook.
pub fn observe(kernel: &mut impl Kernel, device: &Link, request: &Request) -> Observation {
    // Where client addresses sit on the root read: destination on egress, source on the IFB.
    let egress = request.on_egress();
    let end = if egress {
        End::Destination
    } else {
        End::Source
    };
    let mut obs = Observation {
        device: device.clone(),
        shaped: None,
        ifb: None,
        hook: None,
        error: None,
        nft: None,
    };
    let result = (|| -> Result<(), NetlinkError> {
        let device_tc = kernel.device_tc(device.index)?;
        match egress {
            true => obs.shaped = Some(ShapedRoot::read(&device_tc, end)),
            false => {
                obs.hook = Some(Hook::read(&device_tc));
                match kernel.link_by_name(&shaping::ifb_name(device.index)) {
                    Ok(ifb) => {
                        let ifb_tc = kernel.device_tc(ifb.index)?;
                        obs.shaped = Some(ShapedRoot::read(&ifb_tc, end));
                        obs.ifb = Some(ifb);
                    }
                    Err(NetlinkError::NoSuchDevice(_)) => {}
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(())
    })();
    if let Err(e) = result {
        obs = Observation {
            device: device.clone(),
            shaped: None,
            ifb: None,
            hook: None,
            error: Some(e.to_string()),
            nft: None,
        };
    }
    obs
}

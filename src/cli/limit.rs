//! `raylimit limit`: validate, select the runtime, observe, decide, execute, annotate, report.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::rc::Rc;

use clap::Args;

use super::live;
use super::report::{LimitReport, Outcome, Report};
use super::tagged;
use super::{Format, UsageError};
use crate::apply;
use crate::apply::{Execution, StepResult};
use crate::netlink::link::{check_name, Link, MAX_IFNAME_LEN};
use crate::netlink::probe::{Capabilities, Feature};
use crate::netlink::u32::End;
use crate::netlink::{NetlinkError, RtSocket};
use crate::ownership::{Annotation, Annotations, StateDir};
use crate::policy::{self, Direction, Request, Subject, Want};
use crate::reconcile::observe::{Hook, Observation, ShapedRoot};
use crate::reconcile::plan::{Operation, Step};
use crate::reconcile::{self, Context};
use crate::runtime::Runtime;
use crate::runtime::{self, Selection, Source};
use crate::shaping::{self, CatchAll};

/// Flags are read as text and validated here, so every mistake gets raylimit's own one-line
/// message (and exit 2) in a fixed order.
#[derive(Args, Debug, Default)]
pub struct LimitArgs {
    /// A client IP address, or `all` for every client.
    #[arg(long, value_name = "IP|all")]
    pub ip: Option<String>,
    /// With `--ip all`: `shared` (one baseline class) or `per_ip` (one class per live client IP).
    #[arg(long, value_name = "shared|per_ip")]
    pub ip_aggregation: Option<String>,
    /// An inbound tag of the runtime's config.
    #[arg(long, value_name = "TAG")]
    pub inbound: Option<String>,
    /// An outbound tag of the runtime's config.
    #[arg(long, value_name = "TAG")]
    pub outbound: Option<String>,
    /// A user's UUID or email.
    #[arg(long, value_name = "UUID")]
    pub uuid: Option<String>,
    /// One client connection, as IP:PORT.
    #[arg(long, value_name = "IP:PORT")]
    pub connection: Option<String>,
    /// The mark bits raylimit reads and writes for --outbound (default 0x0f000000); other
    /// software's mark bits are left intact.
    #[arg(long, value_name = "MASK")]
    pub mark_mask: Option<String>,
    /// The network device whose traffic is shaped.
    #[arg(long, value_name = "DEV")]
    pub device: Option<String>,
    /// `download` (toward the client, leaving DEV) or `upload` (from the client, arriving on DEV).
    #[arg(long, value_name = "upload|download", allow_hyphen_values = true)]
    pub direction: Option<String>,
    /// Bytes per second, or with a unit: 10mbit, 5MB/s, 512KiB/s.
    #[arg(long, value_name = "RATE", allow_hyphen_values = true)]
    pub rate: Option<String>,
    /// Exempt the IP from any baseline (unshaped).
    #[arg(long)]
    pub unlimited: bool,
    /// Remove the rule instead of setting it.
    #[arg(long)]
    pub remove: bool,
    #[command(flatten)]
    pub runtime: RuntimeArgs,
    /// Change the kernel (the default is a dry-run that only plans).
    #[arg(long)]
    pub execute: bool,
    /// Execute even when the current tc state cannot be observed or compared.
    #[arg(long)]
    pub allow_missing_tc_state: bool,
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub format: Format,
}

/// The flags that select a runtime (limit and inspect).
#[derive(Args, Debug, Default)]
pub struct RuntimeArgs {
    /// The runtime's process id.
    #[arg(long, value_name = "PID", allow_hyphen_values = true)]
    pub pid: Option<String>,
    /// The runtime's container (id, id prefix or name).
    #[arg(long, value_name = "ID")]
    pub container: Option<String>,
    /// The runtime's name: container name, process name or binary name.
    #[arg(long, value_name = "NAME")]
    pub name: Option<String>,
    /// Only consider runtimes from this source: host_process or docker_container.
    #[arg(long, value_name = "SOURCE")]
    pub source: Option<String>,
}

/// A validated `limit` request.
#[derive(Debug, Clone)]
pub struct Validated {
    pub selection: Selection,
    pub request: Request,
    pub per_ip: bool,
    /// per_ip only: narrow the live client set to one inbound listener.
    pub inbound: Option<String>,
}

fn given(v: &Option<String>) -> Option<&str> {
    v.as_deref().map(str::trim).filter(|s| !s.is_empty())
}

/// The runtime selection flags, checked in the original's order. `required`: one of --pid,
/// --container or --name must be given (limit); inspect may select everything.
pub fn parse_selection(
    pid_flag: &Option<String>,
    name_flag: &Option<String>,
    container_flag: &Option<String>,
    source_flag: Option<&str>,
    required: bool,
) -> Result<Selection, UsageError> {
    let usage = |m: String| Err(UsageError(m));
    let source = match source_flag {
        None | Some("") => None,
        Some(s) => match Source::parse(s) {
            Some(src) => Some(src),
            None => {
                return usage(format!(
                    "unknown --source {s:?}; use host_process or docker_container"
                ))
            }
        },
    };
    let pid = match given(pid_flag) {
        None => None,
        Some(p) => match p.parse::<i64>() {
            Ok(0) => None,
            Ok(n) if n < 0 => {
                return usage(format!(
                    "--pid {n} is not a process id; give a number above zero"
                ))
            }
            Ok(n) if n > u32::MAX as i64 => {
                return usage(format!("--pid {n} is beyond any process id"))
            }
            Ok(n) => Some(n as u32),
            Err(_) => return usage(format!("--pid {p:?} is not a number")),
        },
    };
    let name = given(name_flag).map(str::to_string);
    let container = given(container_flag).map(str::to_string);
    if required && pid.is_none() && name.is_none() && container.is_none() {
        return usage("choose the runtime with one of --pid, --container or --name".into());
    }
    if pid.is_some() && container.is_some() {
        return usage("--pid and --container each select a runtime; give only one".into());
    }
    if pid.is_some() && source == Some(Source::DockerContainer) {
        return usage(
            "--pid selects a host process, so it cannot be combined with --source docker_container"
                .into(),
        );
    }
    if container.is_some() && source == Some(Source::HostProcess) {
        return usage(
            "--container selects a container, so it cannot be combined with --source host_process"
                .into(),
        );
    }
    if [pid.is_some(), name.is_some(), container.is_some()]
        .iter()
        .filter(|b| **b)
        .count()
        > 1
    {
        return usage("give exactly one of --pid, --container or --name".into());
    }
    Ok(Selection {
        pid,
        name,
        container,
        source,
    })
}

/// Checks the flags in a fixed order; the first problem is the one reported.
pub fn validate(a: &LimitArgs) -> Result<Validated, UsageError> {
    let usage = |m: String| Err(UsageError(m));
    let selection = parse_selection(
        &a.runtime.pid,
        &a.runtime.name,
        &a.runtime.container,
        a.runtime.source.as_deref(),
        true,
    )?;

    let targets: Vec<(&str, &str)> = [
        ("--ip", &a.ip),
        ("--inbound", &a.inbound),
        ("--outbound", &a.outbound),
        ("--uuid", &a.uuid),
        ("--connection", &a.connection),
    ]
    .into_iter()
    .filter_map(|(flag, v)| given(v).map(|v| (flag, v)))
    .collect();
    let aggregation = match given(&a.ip_aggregation).map(str::to_ascii_lowercase) {
        None => None,
        Some(g) if g == "shared" || g == "per_ip" => Some(g),
        Some(g) => {
            return usage(format!(
                "--ip-aggregation must be shared or per_ip, not {g:?}"
            ))
        }
    };
    let per_ip = aggregation.as_deref() == Some("per_ip");
    // `--inbound TAG` narrows a per_ip set to one listener instead of being a target itself.
    let narrowing = per_ip
        && targets.len() == 2
        && targets[0].0 == "--ip"
        && targets[1].0 == "--inbound"
        && targets[0].1.eq_ignore_ascii_case("all");
    let inbound_filter = narrowing.then(|| targets[1].1.to_string());
    match targets.len() {
        0 => {
            return usage(
                "choose what to limit with --ip, --inbound, --outbound, --uuid or --connection"
                    .into(),
            )
        }
        1 => {}
        2 if narrowing => {}
        _ => {
            let flags: Vec<&str> = targets.iter().map(|t| t.0).collect();
            return usage(format!(
                "give exactly one target; got {}",
                flags.join(" and ")
            ));
        }
    }
    let (flag, value) = targets[0];
    if aggregation.is_some() && !(flag == "--ip" && value.eq_ignore_ascii_case("all")) {
        return usage("--ip-aggregation only applies to --ip all".into());
    }
    let subject = match flag {
        "--ip" => Some(policy::parse_ip_subject(value, per_ip).map_err(UsageError)?),
        "--uuid" => Some(Subject::User {
            uuid: value.to_string(),
            ips: Default::default(),
        }),
        "--connection" => Some(Subject::Connection(
            policy::parse_connection(value).map_err(UsageError)?,
        )),
        // The mark comes from the runtime's config once the runtime is selected.
        "--outbound" => Some(Subject::Outbound {
            tag: value.to_string(),
            mark: 0,
            mask: match given(&a.mark_mask) {
                Some(m) => policy::parse_mark_mask(m).map_err(UsageError)?,
                None => policy::DEFAULT_MARK_MASK,
            },
        }),
        // The listener comes from the runtime's config once the runtime is selected.
        "--inbound" => Some(Subject::Inbound {
            tag: value.to_string(),
            address: None,
            port: 0,
        }),
        _ => None,
    };

    let Some(device) = given(&a.device) else {
        return usage("--device is required: the network device whose traffic is shaped".into());
    };
    if device.len() > MAX_IFNAME_LEN {
        return usage(format!(
            "device name {device:?} is {} bytes; Linux device names have at most {MAX_IFNAME_LEN} (IFNAMSIZ)",
            device.len()
        ));
    }
    if check_name(device).is_err() {
        return usage(format!("{device:?} is not a valid device name"));
    }
    let direction = match a.direction.as_deref() {
        None => return usage("--direction is required: upload or download".into()),
        Some(d) => Direction::parse(d).ok_or_else(|| {
            UsageError(format!("--direction must be upload or download, not {d:?}"))
        })?,
    };
    if a.unlimited && a.remove {
        return usage("--unlimited and --remove contradict each other; give one".into());
    }
    if a.unlimited && !matches!(subject, Some(Subject::Ip(_))) {
        return usage(
            "--unlimited exempts one client address; it needs --ip ADDRESS, not another target"
                .into(),
        );
    }
    let rate = given(&a.rate);
    let want = if a.remove {
        if rate.is_some() {
            return usage("--rate has no meaning with --remove".into());
        }
        Want::Remove
    } else if a.unlimited {
        if rate.is_some() {
            return usage("--rate and --unlimited contradict each other; give one".into());
        }
        Want::Unlimited
    } else {
        match rate {
            None => return usage("give --rate (bytes per second), --unlimited or --remove".into()),
            Some(r) => Want::Limit(policy::parse_rate(r).map_err(UsageError)?),
        }
    };
    if a.allow_missing_tc_state && !a.execute {
        return usage("--allow-missing-tc-state only matters with --execute".into());
    }
    let subject = subject.expect("every target flag gives a subject");
    if a.mark_mask.is_some() && !matches!(subject, Subject::Outbound { .. }) {
        return usage("--mark-mask only applies to --outbound".into());
    }
    Ok(Validated {
        selection,
        request: Request {
            subject,
            direction,
            device: device.to_string(),
            want,
        },
        per_ip,
        inbound: inbound_filter,
    })
}

/// Why `limit` stopped before it could build a report.
#[derive(Debug)]
pub enum LimitError {
    Usage(UsageError),
    Refused(String),
}

impl From<UsageError> for LimitError {
    fn from(e: UsageError) -> Self {
        LimitError::Usage(e)
    }
}

/// What one run works with: the runtime, the device, the kernel socket, the lock and the
/// owner annotations. Requests are decided one by one against one observation per shaped side,
/// kept current as each decision is made, and [`Session::commit`] then applies every change
/// together: one dump per object kind and one batched execution, however many subjects.
pub struct Session {
    pub runtime: Rc<Runtime>,
    pub device: Link,
    pub execute: bool,
    allow_missing_state: bool,
    sock: RtSocket,
    state_dir: StateDir,
    netns_key: String,
    /// What the kernel offers (matchall, cls_fw, act_connmark), probed when a request first needs it.
    capabilities: Option<Capabilities>,
    /// `/run/netns/NAME` for `--netns`: where nft steps run.
    netns_path: Option<String>,
    /// The annotations as this run leaves them (saved at commit when it succeeds).
    annotations: Annotations,
    /// This run changed the annotations (a run of no_op decisions writes nothing).
    annotations_changed: bool,
    /// The observation of each shaped side (true: the device's egress), once read.
    observed: BTreeMap<bool, Observation>,
    /// Decisions whose steps wait for the commit.
    pending: Vec<Pending>,
    _lock: Option<crate::ownership::Lock>,
}

/// The (decision, step) places one executed step stands for.
type Owners = Vec<(usize, usize)>;

/// A decided request waiting for the commit.
struct Pending {
    steps: Vec<Step>,
}

enum AnnotationChange {
    Upsert(Annotation),
    Remove {
        shaped_device: String,
        subject: String,
    },
}

impl Session {
    /// Selects the runtime, finds the device, and (when executing) takes the lock that keeps
    /// other runs out from observation to annotation.
    pub fn open(
        netns: Option<&str>,
        selection: &Selection,
        device: &str,
        execute: bool,
        allow_missing_state: bool,
    ) -> Result<Self, LimitError> {
        let runtime = runtime::select(selection).map_err(|e| LimitError::Refused(e.to_string()))?;
        let mut sock = RtSocket::open_in(netns).map_err(|e| LimitError::Refused(e.to_string()))?;
        let device = match sock.link_by_name(device) {
            Ok(l) => l,
            Err(NetlinkError::NoSuchDevice(_)) => {
                return Err(UsageError(format!(
                    "no network device named {device:?}{}",
                    netns
                        .map(|n| format!(" in network namespace {n}"))
                        .unwrap_or_default()
                ))
                .into())
            }
            Err(e) => return Err(LimitError::Refused(e.to_string())),
        };
        let state_dir = StateDir::from_env();
        let lock = if execute {
            Some(state_dir.lock().map_err(LimitError::Refused)?)
        } else {
            None
        };
        Ok(Session {
            runtime: Rc::new(runtime),
            device,
            execute,
            allow_missing_state,
            sock,
            annotations: state_dir.load(),
            annotations_changed: false,
            state_dir,
            netns_key: netns.unwrap_or("").to_string(),
            capabilities: None,
            netns_path: netns.map(|n| format!("/run/netns/{n}")),
            observed: BTreeMap::new(),
            pending: Vec::new(),
            _lock: lock,
        })
    }

    pub fn shaped_device(&self, request: &Request) -> String {
        if request.on_egress() {
            self.device.name.clone()
        } else {
            shaping::ifb_name(self.device.index)
        }
    }

    /// The annotations as this run has them so far.
    pub fn annotations(&self) -> &Annotations {
        &self.annotations
    }

    pub fn netns_key(&self) -> &str {
        &self.netns_key
    }

    /// Reads what a request is decided on, once per shaped side (kept current afterwards).
    fn observe_once(&mut self, request: &Request) {
        let egress = request.on_egress();
        let obs = self
            .observed
            .entry(egress)
            .or_insert_with(|| observe(&mut self.sock, &self.device, request));
        if matches!(request.subject, Subject::Outbound { .. }) && obs.nft.is_none() {
            obs.nft = Some(
                crate::netlink::nft::dump(self.netns_path.as_deref()).map_err(|e| e.to_string()),
            );
        }
    }

    /// Decides one request against the current observation. Its steps count as done for the
    /// requests decided after it; when executing, they run at [`Session::commit`]. `set` names
    /// the expanded set (`per_ip`) the rule belongs to; `blocked` is a reason the evidence gives
    /// not to execute, whatever the kernel says.
    pub fn one(
        &mut self,
        v: &Validated,
        set: Option<&str>,
        blocked: Option<String>,
    ) -> LimitReport {
        let request = &v.request;
        let shaped_device = self.shaped_device(request);
        let subject_key = request.subject.key();
        let annotation = self
            .annotations
            .find(&self.netns_key, &shaped_device, &subject_key)
            .cloned();
        let owner = self.runtime.owner();
        // Only a catch-all (the baseline, the upload redirect) or an outbound download depends
        // on optional kernel features; a specific client's rule does not, and skips the probe.
        let needs_features = !request.on_egress()
            || matches!(
                request.subject,
                Subject::AllShared | Subject::Outbound { .. }
            );
        let (catch_all, has_connmark, has_fw) = if needs_features {
            let caps = self.capabilities.get_or_insert_with(Capabilities::probe);
            (
                CatchAll::choose(caps.has(Feature::Matchall)),
                caps.has(Feature::Connmark),
                caps.has(Feature::Fw),
            )
        } else {
            (CatchAll::choose(false), false, false)
        };
        let ctx = Context {
            request: request.clone(),
            catch_all,
            allow_missing_state: self.allow_missing_state,
            owned_by_other: annotation
                .as_ref()
                .filter(|x| x.owner != owner)
                .map(|x| x.owner.clone()),
            remembered_minor: annotation.as_ref().and_then(|x| x.class_minor),
            owner: owner.clone(),
            netns_path: self.netns_path.clone(),
            has_connmark,
            has_fw,
        };
        self.observe_once(request);
        let egress = request.on_egress();
        let observation = &self.observed[&egress];
        let shadowed = matches!(request.subject, Subject::Inbound { .. })
            && request.want != Want::Remove
            && observation
                .shaped
                .as_ref()
                .is_some_and(|s| s.baseline.is_some());
        let mut decision = reconcile::decide(&ctx, observation);
        if blocked.is_some() {
            decision.blocked = blocked;
        }
        // The report describes what was observed before this decision; then its steps count
        // as done for the decisions after it.
        let mut report = LimitReport::new(
            self.execute,
            v,
            &self.runtime,
            &self.device,
            &shaped_device,
            observation,
            decision,
        );
        if report.decision.blocked.is_none() {
            let observation = self.observed.get_mut(&egress).expect("observed above");
            for step in &report.decision.steps {
                observation.absorb(step, egress);
            }
        }
        if shadowed {
            report.warnings.push(format!(
                "{} has a device-wide --ip all baseline (band {}), which is evaluated first: traffic it matches never reaches the {} rule",
                shaped_device,
                shaping::BAND_IP_BASELINE,
                request.subject.kind()
            ));
        }
        report.outcome = if report.decision.blocked.is_some() {
            Outcome::Blocked
        } else if report.decision.steps.is_empty() {
            Outcome::NoChanges
        } else {
            Outcome::PlanReady
        };
        if report.decision.blocked.is_some() {
            return report;
        }
        let change = match request.want {
            Want::Remove => AnnotationChange::Remove {
                shaped_device,
                subject: subject_key,
            },
            _ => AnnotationChange::Upsert(Annotation {
                netns: self.netns_key.clone(),
                device: self.device.name.clone(),
                direction: request.direction.name().into(),
                subject: subject_key,
                shaped_device,
                class_minor: report.decision.expected_class.map(|c| c.minor()),
                owner,
                runtime: self.runtime.describe(),
                set: set.map(str::to_string),
            }),
        };
        self.record(&change);
        if self.execute {
            report.pending = Some(self.pending.len());
            // The steps wait in the session and come back to the report at the commit.
            self.pending.push(Pending {
                steps: std::mem::take(&mut report.decision.steps),
            });
        }
        report
    }

    fn record(&mut self, change: &AnnotationChange) {
        match change {
            AnnotationChange::Upsert(a) => {
                let known = self
                    .annotations
                    .find(&a.netns, &a.shaped_device, &a.subject);
                if known != Some(a) {
                    self.annotations.upsert(a.clone());
                    self.annotations_changed = true;
                }
            }
            AnnotationChange::Remove {
                shaped_device,
                subject,
            } => {
                if self
                    .annotations
                    .find(&self.netns_key, shaped_device, subject)
                    .is_some()
                {
                    self.annotations
                        .remove(&self.netns_key, shaped_device, subject);
                    self.annotations_changed = true;
                }
            }
        }
    }

    /// Applies every pending decision as one run: tc steps batched, the nft changes as one
    /// transaction at the end, every acknowledgement checked; when any step fails, all of them
    /// are undone and each report says so. Then the annotations are saved once, and the next
    /// decision observes the kernel afresh.
    pub fn commit<'a>(&mut self, reports: impl IntoIterator<Item = &'a mut LimitReport>) {
        self.observed.clear();
        let pending = std::mem::take(&mut self.pending);
        if pending.is_empty() {
            return;
        }
        let (steps, owners) = run_order(&pending);
        let execution = apply::execute(&mut self.sock, &steps);
        drop(steps);
        let mut pending = pending;
        let failed = execution.failed();
        // Each report gets the results of its own steps, in its plan's order.
        let mut placed: Vec<Vec<(usize, StepResult)>> = vec![Vec::new(); pending.len()];
        for (result, owned) in execution.results.iter().zip(&owners) {
            for (ticket, i) in owned {
                placed[*ticket].push((*i, result.clone()));
            }
        }
        let mut per: Vec<Execution> = placed
            .into_iter()
            .map(|mut results| {
                results.sort_by_key(|(i, _)| *i);
                Execution {
                    results: results.into_iter().map(|(_, r)| r).collect(),
                    rollback: Vec::new(),
                }
            })
            .collect();
        let save = if failed {
            // A failed run changes nothing, so the annotations stay as they are on disk.
            self.annotations = self.state_dir.load();
            None
        } else if self.annotations_changed {
            Some(self.state_dir.save(&self.annotations))
        } else {
            None
        };
        self.annotations_changed = false;
        for report in reports {
            let Some(ticket) = report.pending.take() else {
                continue;
            };
            report.decision.steps = std::mem::take(&mut pending[ticket].steps);
            let mut mine = std::mem::take(&mut per[ticket]);
            let own_failure = mine.failed();
            if own_failure {
                mine.rollback = execution.rollback.clone();
            }
            report.outcome = if failed {
                Outcome::Failed
            } else if report.decision.steps.is_empty() {
                Outcome::NoChanges
            } else {
                Outcome::Executed
            };
            if failed && !own_failure {
                report.warnings.push(
                    "not applied: another change of this run failed, so the whole run was undone"
                        .into(),
                );
            }
            if let Some(Err(e)) = &save {
                report.warnings.push(format!(
                    "the kernel was changed, but the owner annotation could not be written: {e}"
                ));
            }
            report.execution = Some(mine);
        }
    }
}

/// The run's steps in execution order, each with the (decision, step) places it stands for:
/// every decision's tc and link steps in decision order, then all nft changes as one atomic
/// transaction (a new rule's class exists by then; a removed rule's class may already be gone,
/// which sends its packets to the filters for that instant, as if unlimited).
fn run_order(pending: &[Pending]) -> (Vec<Cow<'_, Step>>, Vec<Owners>) {
    let is_nft = |s: &Step| matches!(s.action, Operation::Nft { .. });
    let all: Vec<(usize, usize, &Step)> = pending
        .iter()
        .enumerate()
        .flat_map(|(ticket, p)| p.steps.iter().enumerate().map(move |(i, s)| (ticket, i, s)))
        .collect();
    let mut steps: Vec<Cow<Step>> = Vec::with_capacity(all.len());
    let mut owners = Vec::with_capacity(all.len());
    for (ticket, i, step) in all.iter().filter(|(_, _, s)| !is_nft(s)) {
        steps.push(Cow::Borrowed(*step));
        owners.push(vec![(*ticket, *i)]);
    }
    let mut nft_ops = Vec::new();
    let mut nft_undo = Vec::new();
    let mut nft_owners = Vec::new();
    let mut netns = None;
    for (ticket, i, step) in all.iter().filter(|(_, _, s)| is_nft(s)) {
        if let Operation::Nft { netns: n, ops } = &step.action {
            netns = n.clone();
            nft_ops.extend(ops.iter().cloned());
            // A later decision's undo runs before an earlier one's.
            nft_undo.splice(0..0, step.undo.iter().cloned());
            nft_owners.push((*ticket, *i));
        }
    }
    if !nft_owners.is_empty() {
        steps.push(Cow::Owned(
            Step::new(
                "nft-transaction",
                Operation::Nft {
                    netns,
                    ops: nft_ops,
                },
            )
            .undone_by(nft_undo),
        ));
        owners.push(nft_owners);
    }
    (steps, owners)
}

/// Runs `limit` up to a report (which the caller renders).
pub fn run(netns: Option<&str>, a: &LimitArgs, v: Validated) -> Result<Report, LimitError> {
    let mut session = Session::open(
        netns,
        &v.selection,
        &v.request.device,
        a.execute,
        a.allow_missing_tc_state,
    )?;
    let mut report = decide(&mut session, &v);
    session.commit(report.limits_mut());
    Ok(report)
}

/// Resolves the request's subject the way its family needs (live evidence, the config, or
/// nothing), then decides and, when the session executes, applies it.
pub fn decide(session: &mut Session, v: &Validated) -> Report {
    match &v.request.subject {
        Subject::AllPerIp => Report::PerIp(live::per_ip(session, v)),
        Subject::User { .. } => Report::One(live::user(session, v)),
        Subject::Connection(_) => Report::One(live::connection(session, v)),
        Subject::Inbound { .. } => Report::One(tagged::inbound(session, v)),
        Subject::Outbound { .. } => Report::One(tagged::outbound(session, v)),
        _ => Report::One(session.one(v, None, None)),
    }
}

/// Reads what the request is decided on: the shaped root, and for upload the IFB and the hook.
pub fn observe(sock: &mut RtSocket, device: &Link, request: &Request) -> Observation {
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
        let device_tc = sock.device_tc(device.index)?;
        match egress {
            true => obs.shaped = Some(ShapedRoot::read(&device_tc, end)),
            false => {
                obs.hook = Some(Hook::read(&device_tc));
                match sock.link_by_name(&shaping::ifb_name(device.index)) {
                    Ok(ifb) => {
                        let ifb_tc = sock.device_tc(ifb.index)?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::netlink::nft::{NftOp, NftRule, Tag};

    fn nft_step(subject: &str, undo: &str) -> Step {
        let rule = NftRule::MarkToPriority {
            oif: 2,
            mask: 0x0f00_0000,
            value: 0x0100_0000,
            priority: 0x524c_0001,
        };
        let tag = Tag {
            owner: "o".into(),
            subject: subject.into(),
        };
        Step::new(
            "nft-classify-mark",
            Operation::Nft {
                netns: None,
                ops: vec![NftOp::AddRule { rule, tag }],
            },
        )
        .undone_by(vec![Step::new(undo, Operation::SetUp(dev()))])
    }

    fn dev() -> crate::reconcile::plan::Dev {
        crate::reconcile::plan::Dev::Index {
            index: 2,
            name: "eth0".into(),
        }
    }

    fn link_step(name: &str) -> Step {
        Step::new(name, Operation::SetUp(dev()))
    }

    #[test]
    fn the_runs_nft_changes_are_one_transaction_after_every_tc_step() {
        let pending = vec![
            Pending {
                steps: vec![link_step("a1"), nft_step("outbound a", "undo-a")],
            },
            Pending {
                steps: vec![link_step("b1")],
            },
            Pending {
                steps: vec![link_step("c1"), nft_step("outbound c", "undo-c")],
            },
        ];
        let (steps, owners) = run_order(&pending);
        let names: Vec<&str> = steps.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["a1", "b1", "c1", "nft-transaction"]);
        assert_eq!(
            owners,
            [
                vec![(0, 0)],
                vec![(1, 0)],
                vec![(2, 0)],
                vec![(0, 1), (2, 1)]
            ]
        );
        let Operation::Nft { ops, .. } = &steps[3].action else {
            panic!("the last step is the nft transaction")
        };
        assert_eq!(ops.len(), 2);
        // The later decision's undo first, as each decision's own step would have been undone.
        let undo: Vec<&str> = steps[3].undo.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(undo, ["undo-c", "undo-a"]);
    }
}

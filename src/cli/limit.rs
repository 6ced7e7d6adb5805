//! `raylimit limit`: the flags validated into one request, run by the engine, reported.

use clap::Args;

use super::report::Report;
use super::{Failure, Format, UsageError};
use crate::engine::{self, Engine, NetlinkKernel, OpenError};
use crate::model::device::{is_device_name, MAX_IFNAME_LEN};
use crate::ownership::StateDir;
use crate::policy::{self, Direction, Target, Want, Wanted};
use crate::runtime::{self, Selection, Source};

/// Flags are read as text and validated here, so every mistake gets raylimit's own one-line
/// message (and exit 2) in a fixed order.
#[derive(Args, Debug, Default)]
pub struct LimitArgs {
    /// A client IP address, or `all` for every client.
    #[arg(
        long,
        value_name = "IP|all",
        help_heading = "Subject (exactly one required)"
    )]
    pub ip: Option<String>,
    /// With `--ip all`: `shared` (one baseline class) or `per_ip` (one class per live client IP).
    #[arg(long, value_name = "shared|per_ip", help_heading = "Subject options")]
    pub ip_aggregation: Option<String>,
    /// An inbound tag of the runtime's config.
    #[arg(
        long,
        value_name = "TAG",
        help_heading = "Subject (exactly one required)"
    )]
    pub inbound: Option<String>,
    /// An outbound tag of the runtime's config.
    #[arg(
        long,
        value_name = "TAG",
        help_heading = "Subject (exactly one required)"
    )]
    pub outbound: Option<String>,
    /// A user's UUID or email.
    #[arg(
        long,
        value_name = "UUID",
        help_heading = "Subject (exactly one required)"
    )]
    pub uuid: Option<String>,
    /// One client connection, as IP:PORT.
    #[arg(
        long,
        value_name = "IP:PORT",
        help_heading = "Subject (exactly one required)"
    )]
    pub connection: Option<String>,
    /// For client rules (`--ip`, `--uuid`, `--connection`): `runtime` (the default) matches only
    /// packets of the runtime's own listeners; `device` matches every packet of the client (or,
    /// for `--ip all`, every packet) on the device, whatever it belongs to.
    #[arg(long, value_name = "runtime|device", help_heading = "Subject options")]
    pub scope: Option<String>,
    /// The mark bits raylimit reads and writes for --outbound (default 0x0f000000); other
    /// software's mark bits are left intact.
    #[arg(long, value_name = "MASK", help_heading = "Subject options")]
    pub mark_mask: Option<String>,
    /// The network device whose traffic is shaped.
    #[arg(long, value_name = "DEV", help_heading = "Where (required)")]
    pub device: Option<String>,
    /// `download` (toward the client, leaving DEV) or `upload` (from the client, arriving on DEV).
    #[arg(
        long,
        value_name = "upload|download",
        allow_hyphen_values = true,
        help_heading = "Where (required)"
    )]
    pub direction: Option<String>,
    /// Bytes per second, or with a unit: 10mbit, 5MB/s, 512KiB/s (10mbps is refused: bits or
    /// bytes?).
    #[arg(
        long,
        value_name = "RATE",
        allow_hyphen_values = true,
        help_heading = "Limit (exactly one required)"
    )]
    pub rate: Option<String>,
    /// Exempt the IP from any baseline (unshaped).
    #[arg(long, help_heading = "Limit (exactly one required)")]
    pub unlimited: bool,
    /// Remove the rule instead of setting it.
    #[arg(long, help_heading = "Limit (exactly one required)")]
    pub remove: bool,
    #[command(
        flatten,
        next_help_heading = "Runtime (exactly one of --pid, --container, --name)"
    )]
    pub runtime: RuntimeArgs,
    #[command(flatten, next_help_heading = "Run")]
    pub run: RunArgs,
}

/// How a run is made and reported (limit, apply and watch).
#[derive(Args, Debug, Default, Clone, Copy)]
pub struct RunArgs {
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
    pub wanted: Wanted,
    /// `--scope device`: the client rule matches every packet on the device, not only the
    /// runtime's.
    pub device_scope: bool,
}

fn given(v: &Option<String>) -> Option<&str> {
    v.as_deref().map(str::trim).filter(|s| !s.is_empty())
}

/// The runtime selection flags, checked in RayLimit's order. `required`: one of --pid,
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
            Ok(n) if n <= 0 => {
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
    let target = match flag {
        "--ip" => match policy::parse_ip_target(value, per_ip).map_err(UsageError)? {
            Target::PerIp { .. } => Some(Target::PerIp {
                inbound: inbound_filter,
            }),
            t => Some(t),
        },
        "--uuid" => Some(Target::User(value.to_string())),
        "--connection" => Some(Target::Connection(
            policy::parse_connection(value).map_err(UsageError)?,
        )),
        // The mark comes from the runtime's config once the runtime is selected.
        "--outbound" => Some(Target::Outbound {
            tag: value.to_string(),
            mask: match given(&a.mark_mask) {
                Some(m) => policy::parse_mark_mask(m).map_err(UsageError)?,
                None => policy::DEFAULT_MARK_MASK,
            },
        }),
        // The listener comes from the runtime's config once the runtime is selected.
        "--inbound" => Some(Target::Inbound(value.to_string())),
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
    if !is_device_name(device) {
        return usage(format!("{device:?} is not a valid device name"));
    }
    let direction = match a.direction.as_deref() {
        None => return usage("--direction is required: upload or download".into()),
        Some(d) => Direction::parse(d).ok_or_else(|| {
            UsageError(format!("--direction must be upload or download, not {d:?}"))
        })?,
    };
    // Upload only reads the outbound's marks: by default it matches the mark exactly. Download
    // writes the connection's mark, so it keeps to the mask's bits.
    let mut target = target;
    if let Some(Target::Outbound { mask, .. }) = &mut target {
        if given(&a.mark_mask).is_none() && direction == Direction::Upload {
            *mask = u32::MAX;
        }
    }
    if a.unlimited && a.remove {
        return usage("--unlimited and --remove contradict each other; give one".into());
    }
    if a.unlimited && !matches!(target, Some(Target::Ip(_))) {
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
    if a.run.allow_missing_tc_state && !a.run.execute {
        return usage("--allow-missing-tc-state only matters with --execute".into());
    }
    let target = target.expect("every target flag gives a target");
    let device_scope = match given(&a.scope).map(str::to_ascii_lowercase).as_deref() {
        None | Some("runtime") => false,
        Some("device") => true,
        Some(other) => return usage(format!("--scope must be runtime or device, not {other:?}")),
    };
    if a.scope.is_some() && matches!(target, Target::Inbound(_) | Target::Outbound { .. }) {
        return usage(
            "--scope applies to client rules (--ip, --uuid, --connection); an inbound or outbound is its own scope".into(),
        );
    }
    if a.mark_mask.is_some() && !matches!(target, Target::Outbound { .. }) {
        return usage("--mark-mask only applies to --outbound".into());
    }
    Ok(Validated {
        selection,
        wanted: Wanted {
            target,
            direction,
            device: device.to_string(),
            want,
        },
        device_scope,
    })
}

/// Why `limit` stopped before it could build a report.
#[derive(Debug, thiserror::Error)]
pub enum LimitError {
    #[error("{}", .0 .0)]
    Usage(UsageError),
    /// The runtime could not be selected.
    #[error(transparent)]
    Runtime(#[from] runtime::SelectError),
    /// The run could not start (kernel, lock).
    #[error(transparent)]
    Open(OpenError),
    /// `--execute` without the capability that changing traffic control needs.
    #[error("--execute changes the kernel's traffic control, which needs root (CAP_NET_ADMIN); run it as root, or leave out --execute for a dry-run")]
    NotPermitted,
}

impl LimitError {
    /// The kind of error, and so the exit code.
    pub fn failure(&self) -> Failure {
        match self {
            LimitError::Usage(_) => Failure::Usage,
            LimitError::Runtime(_) | LimitError::NotPermitted => Failure::Refused,
            LimitError::Open(_) => Failure::Failed,
        }
    }
}

impl From<UsageError> for LimitError {
    fn from(e: UsageError) -> Self {
        LimitError::Usage(e)
    }
}

impl From<OpenError> for LimitError {
    fn from(e: OpenError) -> Self {
        match e {
            // A device that is not there is a mistake in the command line.
            OpenError::NoDevice { .. } => LimitError::Usage(UsageError(e.to_string())),
            other => LimitError::Open(other),
        }
    }
}

/// Opens the engine on the real kernel for one device: selects the runtime, opens the
/// netlink socket, finds the device and (when executing) takes the lock.
pub fn open(
    netns: Option<&str>,
    selection: &Selection,
    device: &str,
    run: RunArgs,
    device_scope: bool,
) -> Result<Engine<NetlinkKernel>, LimitError> {
    let proc_root = std::path::Path::new("/proc");
    if run.execute && runtime::procfs::has_net_admin(proc_root) == Some(false) {
        return Err(LimitError::NotPermitted);
    }
    let runtime = runtime::select(selection)?;
    // The runtime's own named namespace, when the device is looked for elsewhere.
    let runtime_netns = runtime
        .netns
        .as_ref()
        .filter(|n| !n.host)
        .and_then(|n| n.name.clone())
        .filter(|n| Some(n.as_str()) != netns);
    let kernel = NetlinkKernel::open(netns).map_err(OpenError::from)?;
    let options = engine::Options {
        netns: netns.map(str::to_string),
        execute: run.execute,
        allow_missing_state: run.allow_missing_tc_state,
        device_scope,
        state_dir: StateDir::from_env(),
    };
    match Engine::open(kernel, runtime, device, options) {
        Err(e @ OpenError::NoDevice { .. }) if runtime_netns.is_some() => {
            let name = runtime_netns.unwrap_or_default();
            Err(LimitError::Usage(UsageError(format!(
                "{e}; the runtime runs in network namespace {name}: add --netns {name}"
            ))))
        }
        other => {
            let mut engine = other?;
            if run.execute {
                engine.on_progress(super::progress::for_engine(&format!(
                    "kernel steps on {device}"
                )));
            }
            Ok(engine)
        }
    }
}

/// Runs `limit` up to a report (which the caller renders).
pub fn run(netns: Option<&str>, a: &LimitArgs, v: Validated) -> Result<Report, LimitError> {
    let mut engine = open(netns, &v.selection, &v.wanted.device, a.run, v.device_scope)?;
    let staged = engine.resolve(&v.wanted);
    let repairs = engine.stage_repairs();
    let mut run = engine.commit();
    let mut report = Report::build(&engine, &v.wanted, staged, &mut run);
    report.attach_repairs(&engine, &repairs, &mut run);
    Ok(report)
}

//! Command line: clap definitions and rendering (the only place that prints).

mod discover;
mod limit;
mod policy_file;
mod progress;
mod report;
mod reset;
mod resolution;
mod signals;
mod status;
mod top;
mod watch;

use clap::{Parser, Subcommand, ValueEnum};
use serde_json::{json, Value};

use crate::model::tc::{self, TcEntry};
use crate::netlink::probe::{Availability, Capabilities};
use crate::netlink::NetlinkError;

#[derive(Parser, Debug)]
#[command(
    name = "raylimit",
    about = "Bandwidth limits for one Xray/V2Ray runtime, over rtnetlink",
    version
)]
pub struct Cli {
    /// Act inside the named network namespace (/run/netns/NAME).
    #[arg(long, global = true, value_name = "NAME")]
    pub netns: Option<String>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Plan (and with --execute, apply) one limit for one subject, direction and device.
    #[command(after_help = "Examples:
  raylimit limit --pid 4242 --ip 203.0.113.10 --device eth0 --direction download --rate 10mbit
  raylimit limit --name xray --ip all --device eth0 --direction upload --rate 5MB/s --execute
  raylimit limit --name xray --ip all --ip-aggregation per_ip --device eth0 --direction download --rate 2mbit
  raylimit limit --name xray --uuid alice@example.com --device eth0 --direction download --rate 1MB/s
  raylimit limit --name xray --inbound vless-in --device eth0 --direction upload --rate 50mbit
  raylimit limit --name xray --ip 198.51.100.7 --unlimited --device eth0 --direction download
  raylimit limit --name xray --ip 203.0.113.10 --device eth0 --direction download --remove --execute
  raylimit --netns edge limit --name xray --ip all --device veth0 --direction download --rate 1MB/s")]
    #[command(
        override_usage = "raylimit limit <--ip IP|all | --inbound TAG | --outbound TAG | --uuid UUID | --connection IP:PORT>
                      --device DEV --direction <upload|download>
                      <--rate RATE | --unlimited | --remove>
                      <--pid PID | --container ID | --name NAME> [OPTIONS]"
    )]
    Limit(Box<limit::LimitArgs>),
    /// List the Xray and V2Ray runtimes on this host: processes, and containers through the
    /// container engine's API.
    #[command(after_help = "Examples:
  raylimit discover
  raylimit discover --format json")]
    Discover {
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
    },
    /// A runtime's config as it reads it: files, API, inbounds and outbounds, and whether a
    /// limit on each can be concrete. Without a selector, every runtime.
    #[command(after_help = "Examples:
  raylimit inspect
  raylimit inspect --name xray
  raylimit inspect --container edge-proxy --format json")]
    Inspect(Box<discover::InspectArgs>),
    /// Every limit raylimit manages on this host (or one device), by namespace, device,
    /// direction and owner in precedence order, with throughput, drops and drift.
    #[command(after_help = "Examples:
  raylimit status                          # every namespace raylimit manages limits in
  raylimit --netns edge status --device veth0
  raylimit status --format prometheus > /var/lib/node_exporter/textfile/raylimit.prom
  raylimit status --format json --sample-ms 1000")]
    Status {
        #[arg(long, value_name = "DEV")]
        device: Option<String>,
        #[arg(long, value_enum, default_value_t = status::StatusFormat::Text)]
        format: status::StatusFormat,
        /// Measure each rule's current throughput over this many milliseconds (default: 500
        /// for text, 0 for json and prometheus, whose readers have the counters).
        #[arg(long, value_name = "MS", value_parser = clap::value_parser!(u64).range(0..=60_000))]
        sample_ms: Option<u64>,
    },
    /// A live view of every limited subject: throughput against its limit, drops and backlog,
    /// refreshed every second until q or Ctrl-C (one snapshot when not on a terminal).
    #[command(after_help = "Examples:
  raylimit top
  raylimit --netns edge top --device veth0 --interval-ms 500
  raylimit top | tee snapshot.txt      # not a terminal: one snapshot, then exit")]
    Top(Box<top::TopArgs>),
    /// Reconcile a declarative set of limits for one runtime from a JSON or TOML file (dry-run
    /// unless --execute; --prune removes the runtime's limits the file no longer lists).
    #[command(after_help = "Examples:
  raylimit apply --file /etc/raylimit/policy.toml            # the plan
  raylimit apply --file /etc/raylimit/policy.toml --execute
  raylimit apply --file /etc/raylimit/policy.json --prune --execute   # and remove what it no longer lists")]
    Apply(Box<policy_file::ApplyArgs>),
    /// Keep a per_ip set or a user's addresses in line with live evidence, until SIGINT or
    /// SIGTERM (dry-run unless --execute).
    #[command(after_help = "Examples:
  raylimit watch --name xray --ip all --ip-aggregation per_ip --device eth0 --direction download --rate 2mbit --execute
  raylimit watch --name xray --uuid alice@example.com --device eth0 --direction upload --rate 1MB/s --interval 5s --execute")]
    #[command(
        override_usage = "raylimit watch <--ip all --ip-aggregation per_ip | --uuid UUID>
                      --device DEV --direction <upload|download> --rate RATE
                      <--pid PID | --container ID | --name NAME> [OPTIONS]"
    )]
    Watch(Box<watch::WatchArgs>),
    /// Remove every limit raylimit recorded (or one owner's or device's; --netns narrows to a
    /// namespace), whether or not its runtime still runs (dry-run unless --execute).
    #[command(after_help = "Examples:
  raylimit reset                                        # what would be removed
  raylimit reset --execute
  raylimit reset --owner 'host:/usr/local/bin/xray config=/etc/xray/config.json' --execute
  raylimit reset --device eth0 --subject 'ip 203.0.113.10' --direction download --execute")]
    Reset(Box<reset::ResetArgs>),
    /// Print the shell completions for SHELL (bash, zsh, fish, elvish, powershell).
    #[command(after_help = "Examples:
  raylimit completions bash > /etc/bash_completion.d/raylimit
  raylimit completions fish > ~/.config/fish/completions/raylimit.fish")]
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Write a man page per command into DIR (what `make install` installs).
    #[command(hide = true)]
    Manpages {
        #[arg(value_name = "DIR")]
        dir: std::path::PathBuf,
    },
    /// Print the version.
    Version,
    /// Report which optional tc features this kernel has (reads only; changes nothing).
    #[command(after_help = "Examples:
  raylimit probe
  raylimit probe --format json")]
    Probe {
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
    },
    /// Show a device's qdiscs, classes and filters as raylimit decodes them, with counters.
    #[command(after_help = "Examples:
  raylimit show --device eth0
  raylimit --netns edge show --device rlifb7 --format json")]
    Show {
        #[arg(long, value_name = "DEV")]
        device: String,
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
    },
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum Format {
    #[default]
    Text,
    Json,
}

/// Writes `raylimit.1` and `raylimit-COMMAND.1` for each visible command into `dir` (never
/// through a symlink); returns how many.
fn manpages(dir: &std::path::Path) -> std::io::Result<usize> {
    use clap::CommandFactory;
    use std::os::unix::fs::OpenOptionsExt;
    let write = |name: &str, cmd: clap::Command| -> std::io::Result<()> {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .custom_flags(libc::O_NOFOLLOW)
            .mode(0o644)
            .open(dir.join(name))?;
        clap_mangen::Man::new(cmd).render(&mut file)
    };
    let root = Cli::command().version(env!("CARGO_PKG_VERSION"));
    let mut n = 0;
    for sub in root.get_subcommands().filter(|c| !c.is_hide_set()) {
        let name = format!("raylimit-{}", sub.get_name());
        write(&format!("{name}.1"), sub.clone().name(name.clone()))?;
        n += 1;
    }
    write("raylimit.1", root)?;
    Ok(n + 1)
}

/// A word as a shell reads it: single-quoted when it holds anything a shell would interpret.
pub fn shell_word(w: &str) -> String {
    let plain = !w.is_empty()
        && w.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./:=@,+%".contains(c));
    if plain {
        w.to_string()
    } else {
        format!("'{}'", w.replace('\'', "'\\''"))
    }
}

/// The command line this process was run with, and `--execute`: what carries out a dry-run's
/// plan.
pub fn execute_command() -> String {
    let mut words: Vec<String> = std::env::args().map(|w| shell_word(&w)).collect();
    if let Some(first) = words.first_mut() {
        // The program as the operator would type it.
        if let Some(name) = first.rsplit('/').next().filter(|n| *n == "raylimit") {
            *first = name.to_string();
        }
    }
    words.push("--execute".into());
    words.join(" ")
}

/// clap's error on one line: its first line with what follows it up to the usage (the missing
/// arguments, clap's "a similar argument exists" tip).
fn one_line(rendered: &str) -> String {
    let mut parts: Vec<String> = Vec::new();
    for line in rendered.lines() {
        let line = line.trim();
        if line.starts_with("Usage:") || line.starts_with("For more information") {
            break;
        }
        if line.is_empty() {
            continue;
        }
        let line = line.strip_prefix("error: ").unwrap_or(line);
        match parts.last_mut() {
            Some(last) if last.ends_with(':') => {
                last.push(' ');
                last.push_str(line);
            }
            Some(last) if !line.starts_with("tip:") => {
                last.push_str(", ");
                last.push_str(line);
            }
            _ => parts.push(line.to_string()),
        }
    }
    match parts.is_empty() {
        true => "invalid command line".into(),
        false => parts.join("; "),
    }
}

/// A mistake in the command line: one line on stderr, exit 2.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageError(pub String);

/// What ended a command without its result, and so its exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// A mistake in the command line (exit 2).
    Usage,
    /// Something raylimit will not do as things stand: no permission, no such runtime or
    /// device, execution blocked (exit 1).
    Refused,
    /// Something raylimit tried did not work: a netlink or kernel error, the lock, the state
    /// directory (exit 1).
    Failed,
}

impl Failure {
    pub fn name(self) -> &'static str {
        match self {
            Failure::Usage => "usage",
            Failure::Refused => "refused",
            Failure::Failed => "failed",
        }
    }

    pub fn exit_code(self) -> i32 {
        match self {
            Failure::Usage => 2,
            Failure::Refused | Failure::Failed => 1,
        }
    }

    /// The error as JSON: `{"message": ..., "kind": ..., "exit_code": ...}`; `message` is the
    /// stderr line without its `raylimit: ` prefix.
    pub fn json(self, message: &str) -> Value {
        json!({"message": message, "kind": self.name(), "exit_code": self.exit_code()})
    }
}

/// Reports an error that ends a command before it printed anything on stdout, and returns the
/// exit code: the line `raylimit: MESSAGE` on stderr and, with `--format json`, the one JSON
/// document on stdout, `{"error": {...}}` (see [`Failure::json`]). A command that has already
/// printed its JSON report puts the error in that report instead.
pub fn fail(format: Format, kind: Failure, message: impl std::fmt::Display) -> i32 {
    let message = message.to_string();
    eprintln!("raylimit: {message}");
    if format == Format::Json {
        let v = json!({ "error": kind.json(&message) });
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
    }
    kind.exit_code()
}

/// The format the raw command line asks for (its last `--format json`, `--format=json`), for
/// errors found before clap has parsed it.
fn raw_format(args: &[std::ffi::OsString]) -> Format {
    let mut format = Format::Text;
    let mut words = args.iter().skip(1).map(|a| a.to_str());
    while let Some(word) = words.next() {
        match word {
            Some("--") => break,
            Some("--format") => {
                format = match words.next() {
                    Some(Some("json")) => Format::Json,
                    _ => Format::Text,
                }
            }
            Some(w) if w.starts_with("--format=") => {
                format = match w {
                    "--format=json" => Format::Json,
                    _ => Format::Text,
                }
            }
            _ => {}
        }
    }
    format
}

/// Parses the command line; a clap error becomes one line (help and version print as usual).
pub fn parse(args: impl IntoIterator<Item = std::ffi::OsString>) -> Result<Cli, i32> {
    let args: Vec<std::ffi::OsString> = args.into_iter().collect();
    match Cli::try_parse_from(&args) {
        Ok(cli) => Ok(cli),
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(
                e.kind(),
                ErrorKind::DisplayHelp
                    | ErrorKind::DisplayVersion
                    | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            ) {
                let _ = e.print();
                return Err(
                    if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
                        2
                    } else {
                        0
                    },
                );
            }
            Err(fail(
                raw_format(&args),
                Failure::Usage,
                format!("{} (see raylimit help)", one_line(&e.render().to_string())),
            ))
        }
    }
}

/// Runs the parsed command; returns the process exit code.
pub fn run(cli: Cli) -> i32 {
    if let Command::Limit(args) = &cli.command {
        return run_limit(cli.netns.as_deref(), args);
    }
    if let Command::Status {
        device,
        format,
        sample_ms,
    } = &cli.command
    {
        if let Some(d) = device {
            if !crate::model::device::is_device_name(d) {
                return fail(
                    format.errors(),
                    Failure::Usage,
                    format!("no network device named {d:?}"),
                );
            }
        }
        let default_ms = match format {
            status::StatusFormat::Text => 500,
            _ => 0,
        };
        let window = std::time::Duration::from_millis(sample_ms.unwrap_or(default_ms));
        return match status::run(cli.netns.as_deref(), device.as_deref(), *format, window) {
            Ok(out) => {
                print!("{out}");
                0
            }
            Err(e @ NetlinkError::NoSuchDevice(_)) => fail(format.errors(), Failure::Usage, e),
            Err(e) => fail(format.errors(), Failure::Failed, e),
        };
    }
    match &cli.command {
        Command::Discover { format } => return discover::discover(*format),
        Command::Inspect(args) => return discover::inspect(args),
        Command::Watch(args) => return watch::run(cli.netns.as_deref(), args),
        Command::Apply(args) => return policy_file::run(cli.netns.as_deref(), args),
        Command::Reset(args) => return reset::run(cli.netns.as_deref(), args),
        Command::Top(args) => return top::run(cli.netns.as_deref(), args),
        _ => {}
    }
    let result: Result<(), String> = match &cli.command {
        Command::Limit(_)
        | Command::Status { .. }
        | Command::Discover { .. }
        | Command::Watch(_)
        | Command::Apply(_)
        | Command::Reset(_)
        | Command::Top(_)
        | Command::Inspect(_) => Ok(()),
        Command::Version => {
            println!("raylimit {}", env!("CARGO_PKG_VERSION"));
            Ok(())
        }
        Command::Completions { shell } => {
            use clap::CommandFactory;
            let mut cmd = Cli::command();
            clap_complete::generate(*shell, &mut cmd, "raylimit", &mut std::io::stdout());
            Ok(())
        }
        Command::Manpages { dir } => match manpages(dir) {
            Ok(n) => {
                println!("wrote {n} man pages to {}", dir.display());
                Ok(())
            }
            Err(e) => {
                eprintln!("raylimit: manpages: {e}");
                return 1;
            }
        },
        Command::Probe { format } => {
            print_probe(&crate::engine::status::probe(), *format);
            Ok(())
        }
        Command::Show { device, format } => {
            return match show(cli.netns.as_deref(), device, *format) {
                Ok(()) => 0,
                Err(e @ NetlinkError::NoSuchDevice(_)) => fail(*format, Failure::Refused, e),
                Err(e) => fail(*format, Failure::Failed, e),
            }
        }
    };
    match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("raylimit: {e}");
            1
        }
    }
}

fn run_limit(netns: Option<&str>, args: &limit::LimitArgs) -> i32 {
    let format = args.run.format;
    let v = match limit::validate(args) {
        Ok(v) => v,
        Err(UsageError(m)) => return fail(format, Failure::Usage, m),
    };
    match limit::run(netns, args, v) {
        Ok(report) => {
            let ready = report.outcome() == crate::engine::Outcome::PlanReady;
            // A run that did not succeed: the report, then its error (in the report's JSON).
            let error = report.failure().map(|kind| {
                let message = format!("limit {}: {}", report.outcome().name(), report.why());
                (kind, message)
            });
            match format {
                Format::Text => {
                    print!("{}", report.text());
                    if ready {
                        println!("To execute it: {}", execute_command());
                    }
                }
                Format::Json => {
                    let mut v = report.json();
                    if ready {
                        v["execute_command"] = json!(execute_command());
                    }
                    if let Some((kind, message)) = &error {
                        v["error"] = kind.json(message);
                    }
                    println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default())
                }
            }
            match error {
                Some((kind, message)) => {
                    eprintln!("raylimit: {message}");
                    kind.exit_code()
                }
                None => 0,
            }
        }
        Err(e) => fail(format, e.failure(), e),
    }
}

fn print_probe(caps: &Capabilities, format: Format) {
    let describe = |a: &Availability| match a {
        Availability::Present(why) => ("present", why.clone()),
        Availability::Loadable(why) => ("loadable", why.clone()),
        Availability::Absent(why) => ("absent", why.clone()),
        Availability::Unknown => (
            "unknown",
            "the kernel exposes no configuration or module list".to_string(),
        ),
    };
    match format {
        Format::Text => {
            for (feature, a) in &caps.features {
                let (state, why) = describe(a);
                println!("{:<15} {:<9} {}", feature.name(), state, why);
            }
        }
        Format::Json => {
            let v: Vec<Value> = caps
                .features
                .iter()
                .map(|(f, a)| {
                    let (state, why) = describe(a);
                    json!({"feature": f.name(), "state": state, "evidence": why})
                })
                .collect();
            println!("{}", json!({ "features": v }));
        }
    }
}

fn show(netns: Option<&str>, device: &str, format: Format) -> Result<(), NetlinkError> {
    let (link, entries) = crate::engine::status::device_objects(netns, device)?;
    match format {
        Format::Text => {
            for e in &entries {
                match e {
                    TcEntry::Qdisc(q) => println!(
                        "{}\n  sent {} bytes {} pkts (dropped {}, overlimits {})",
                        q.qdisc, q.stats.bytes, q.stats.packets, q.stats.drops, q.stats.overlimits
                    ),
                    TcEntry::Class(c) => println!(
                        "{}\n  sent {} bytes {} pkts (dropped {}, overlimits {})",
                        c.class, c.stats.bytes, c.stats.packets, c.stats.drops, c.stats.overlimits
                    ),
                    TcEntry::Filter(f) => println!("{}", f.filter),
                }
            }
        }
        Format::Json => {
            let v: Vec<Value> = entries
                .iter()
                .map(|e| match e {
                    TcEntry::Qdisc(q) => json!({"object": "qdisc", "kind": q.qdisc.kind_name(), "handle": q.qdisc.handle.to_string(), "parent": q.qdisc.parent.to_string(), "text": q.qdisc.to_string(), "bytes": q.stats.bytes, "packets": q.stats.packets, "drops": q.stats.drops}),
                    TcEntry::Class(c) => json!({"object": "class", "kind": c.class.kind_name(), "handle": c.class.handle.to_string(), "parent": c.class.parent.to_string(), "text": c.class.to_string(), "bytes": c.stats.bytes, "packets": c.stats.packets, "drops": c.stats.drops}),
                    TcEntry::Filter(f) => json!({"object": "filter", "kind": f.filter.kind_name(), "parent": f.filter.parent.to_string(), "priority": f.filter.priority, "protocol": tc::protocol_name(f.filter.protocol), "text": f.filter.to_string()}),
                })
                .collect();
            println!(
                "{}",
                json!({"device": device, "ifindex": link.index, "objects": v})
            );
        }
    }
    Ok(())
}

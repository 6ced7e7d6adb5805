//! Finding the runtime an operator means: host processes from procfs (`procfs`) and containers
//! from the container engine's API (`engine`), joined so that a containerised runtime is listed
//! once, with its config located the way the runtime itself located it.
//!
//! Nothing here starts a process. The owner identity a limit is recorded under survives a
//! restart of the runtime: the container's name, or the binary plus its config paths, never
//! the PID.

pub mod engine;
pub mod procfs;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

pub use engine::Container;
pub use procfs::Process;

use crate::xray::locate::{self, Flavour, Located, Rooted};
use crate::xray::{self, Loaded};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    HostProcess,
    DockerContainer,
}

impl Source {
    pub fn name(self) -> &'static str {
        match self {
            Source::HostProcess => "host_process",
            Source::DockerContainer => "docker_container",
        }
    }

    pub fn parse(s: &str) -> Option<Source> {
        match s {
            "host_process" => Some(Source::HostProcess),
            "docker_container" => Some(Source::DockerContainer),
            _ => None,
        }
    }
}

/// What the operator selected with `--pid`, `--name`, `--container` and `--source`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selection {
    pub pid: Option<u32>,
    pub name: Option<String>,
    pub container: Option<String>,
    pub source: Option<Source>,
}

impl Selection {
    pub fn is_empty(&self) -> bool {
        *self == Selection::default()
    }
}

/// A network namespace, by inode, with its `ip netns` name when it has one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Netns {
    pub inode: u64,
    pub name: Option<String>,
    /// The namespace of PID 1: the host's own.
    pub host: bool,
}

impl Netns {
    pub fn describe(&self) -> String {
        match (&self.name, self.host) {
            (_, true) => format!("host (net:[{}])", self.inode),
            (Some(n), _) => format!("{n} (net:[{}])", self.inode),
            (None, _) => format!("net:[{}]", self.inode),
        }
    }
}

/// One runtime: a host process, a container, or both joined.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Runtime {
    pub source: Source,
    /// The container's name, else the process name.
    pub name: String,
    pub binary: String,
    /// The runtime's process, when procfs shows it.
    pub process: Option<Process>,
    /// The container, when the engine reports one.
    pub container: Option<Container>,
    pub netns: Option<Netns>,
    /// The config sources, when the process is visible.
    pub config: Option<Located>,
    /// For a runtime known only from the owner annotations (it may no longer run): the owner
    /// its limits were recorded under.
    pub recorded_owner: Option<String>,
}

impl Runtime {
    /// A runtime known only by the owner its limits were recorded under: enough to find and
    /// remove them, whether or not it still runs.
    pub fn recorded(owner: &str) -> Runtime {
        Runtime {
            source: if owner.starts_with("container:") {
                Source::DockerContainer
            } else {
                Source::HostProcess
            },
            name: format!("recorded owner {owner}"),
            binary: String::new(),
            process: None,
            container: None,
            netns: None,
            config: None,
            recorded_owner: Some(owner.to_string()),
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.process.as_ref().map(|p| p.pid)
    }

    /// The container id: the engine's, else the one the cgroup names.
    pub fn container_id(&self) -> Option<&str> {
        self.container
            .as_ref()
            .map(|c| c.id.as_str())
            .or_else(|| self.process.as_ref()?.container_id.as_deref())
    }

    pub fn flavour(&self) -> Flavour {
        Flavour::of_binary(&self.binary)
    }

    /// The stable owner identity: never the PID, so a restarted runtime keeps its limits.
    pub fn owner(&self) -> String {
        if let Some(o) = &self.recorded_owner {
            return o.clone();
        }
        if let Some(c) = &self.container {
            return format!("container:{}", c.name);
        }
        if let Some(id) = self.container_id() {
            return format!("container:{id}");
        }
        let exe = self
            .process
            .as_ref()
            .map(|p| p.exe.as_str())
            .unwrap_or_default();
        let mut s = format!("host:{exe}");
        if let Some(l) = self
            .config
            .as_ref()
            .filter(|l| l.origin != locate::Origin::Stdin)
        {
            s.push_str(" config=");
            s.push_str(&l.identity().join(","));
        }
        s
    }

    pub fn describe(&self) -> String {
        match (&self.container, &self.process) {
            (Some(c), Some(p)) => format!("docker container {} (pid {})", c.name, p.pid),
            (Some(c), None) => format!("docker container {}", c.name),
            (None, Some(p)) => match &p.container_id {
                Some(id) => format!("container {} (pid {})", &id[..12], p.pid),
                None => format!("host process {} ({}, {})", p.pid, p.comm, p.exe),
            },
            (None, None) => self.name.clone(),
        }
    }

    /// Reads the runtime's config through its root directory and environment.
    pub fn load_config(&self) -> Result<Loaded, String> {
        let (Some(p), Some(located)) = (&self.process, &self.config) else {
            return Err(match &self.container {
                Some(c) => format!(
                    "the process of container {} is not visible in this host's /proc, so its config cannot be read",
                    c.name
                ),
                None => "the runtime's process could not be read".into(),
            });
        };
        let env = |k: &str| p.env_var(k);
        Ok(xray::load(located.clone(), &Rooted::of_pid(p.pid), &env))
    }

    /// The discover/inspect record: RayLimit's field names, plus raylimit's additions.
    pub fn to_json(&self) -> Value {
        let mut v = json!({
            "source": self.source.name(),
            "identity": {"name": self.name, "binary": self.binary},
            "owner": self.owner(),
        });
        if let Some(p) = &self.process {
            let mut hp = json!({
                "pid": p.pid,
                "start_time": p.start_time,
                "started_at": p.started_at(),
                "executable_path": p.exe,
                "command_line": p.args,
                "working_directory": p.cwd,
                "detection_reasons": p.reasons,
            });
            if let Some(id) = &p.container_id {
                hp["container_id"] = json!(id);
            }
            if let Some(l) = &self.config {
                hp["config_paths"] = json!(l.files);
                hp["config_origin"] = json!(l.origin.describe());
                hp["resolved_config_paths"] = json!(l
                    .files
                    .iter()
                    .filter(|f| f.starts_with('/'))
                    .map(|f| Rooted::of_pid(p.pid).host_path(f).display().to_string())
                    .collect::<Vec<_>>());
            }
            v["host_process"] = hp;
        }
        if let Some(c) = &self.container {
            v["docker_container"] = json!({
                "id": c.id,
                "name": c.name,
                "image": c.image,
                "command_line": c.command,
                "state": c.state,
                "status": c.status,
                "labels": c.labels,
                "network_mode": c.network_mode,
                "engine": c.engine,
                "published_ports": c.ports.iter().map(|p| json!({
                    "container_port": p.container_port, "protocol": p.protocol,
                    "host_ip": p.host_ip, "host_port": p.host_port})).collect::<Vec<_>>(),
            });
        }
        if let Some(n) = &self.netns {
            v["network_namespace"] = json!({"inode": n.inode, "name": n.name, "host": n.host});
        }
        v
    }
}

/// A provider that could not list everything: reported, while the others still list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProviderIssue {
    pub provider: &'static str,
    pub source: Source,
    pub code: &'static str,
    pub message: String,
}

impl ProviderIssue {
    /// Only a broken procfs scan or bad engine data is fatal; an absent or silent engine is a
    /// limitation.
    pub fn fatal(&self) -> bool {
        matches!(self.code, "execution_failed" | "invalid_data")
    }

    pub fn to_json(&self) -> Value {
        json!({"provider": self.provider, "source": self.source.name(), "code": self.code,
               "message": self.message, "fatal": self.fatal()})
    }
}

#[derive(Debug, Clone, Default)]
pub struct Discovery {
    pub runtimes: Vec<Runtime>,
    pub issues: Vec<ProviderIssue>,
}

/// Where to look; `from_env` gives the real host.
#[derive(Debug, Clone)]
pub struct Options {
    pub proc_root: PathBuf,
    pub run_netns: PathBuf,
    pub docker_host: Option<String>,
    pub timeout: Duration,
    /// Only this source's provider runs (`--source`).
    pub only: Option<Source>,
    /// Read just this PID from procfs rather than scanning (`--pid`).
    pub pid: Option<u32>,
}

impl Options {
    /// `DOCKER_HOST` picks the engine socket; `RAYLIMIT_ENGINE_TIMEOUT_MS` the deadline.
    pub fn from_env(sel: &Selection) -> Options {
        let timeout = std::env::var("RAYLIMIT_ENGINE_TIMEOUT_MS")
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .map(Duration::from_millis)
            .unwrap_or(engine::TIMEOUT);
        Options {
            proc_root: PathBuf::from("/proc"),
            run_netns: PathBuf::from("/run/netns"),
            docker_host: std::env::var("DOCKER_HOST").ok(),
            timeout,
            only: sel.source,
            pid: sel.pid,
        }
    }
}

/// Looks for a container image or command that names a runtime.
fn looks_like_runtime(image: &str, command: &str) -> bool {
    let repo = image.split('@').next().unwrap_or(image);
    let repo = procfs::basename(repo);
    let repo = repo.split(':').next().unwrap_or(repo);
    let cmd = command.split_whitespace().next().unwrap_or("");
    procfs::is_runtime_name(repo) || procfs::is_runtime_name(procfs::basename(cmd))
}

pub fn discover(opts: &Options) -> Discovery {
    let mut d = Discovery::default();
    let netns_names = procfs::netns_names(&opts.run_netns);
    let host_netns = procfs::netns_inode(&opts.proc_root, 1);
    let processes: Vec<Process> = match opts.pid {
        Some(pid) => procfs::read_process(&opts.proc_root, pid)
            .into_iter()
            .collect(),
        None => match procfs::scan(&opts.proc_root) {
            Ok(p) => p,
            Err(message) => {
                d.issues.push(ProviderIssue {
                    provider: "host",
                    source: Source::HostProcess,
                    code: "execution_failed",
                    message,
                });
                Vec::new()
            }
        },
    };
    // Containers: asked only when wanted, and only about candidates.
    let container_ids: Vec<String> = processes
        .iter()
        .filter_map(|p| p.container_id.clone())
        .collect();
    let want_engine =
        opts.only != Some(Source::HostProcess) && (opts.pid.is_none() || !container_ids.is_empty());
    let mut containers = Vec::new();
    if want_engine {
        let deadline = Instant::now() + opts.timeout;
        match engine::sockets(opts.docker_host.as_deref()) {
            Err(e) => d.issues.push(engine_issue(e)),
            Ok(sockets) => {
                for socket in sockets {
                    let inspect = |id: &str, image: &str, command: &str| {
                        container_ids.iter().any(|c| c == id)
                            || (opts.pid.is_none() && looks_like_runtime(image, command))
                    };
                    match engine::list(&socket, deadline, &inspect) {
                        Ok(mut found) => containers.append(&mut found),
                        Err(e) => d.issues.push(engine_issue(e)),
                    }
                }
            }
        }
    }
    let netns_of = |p: &Process| {
        p.netns.map(|inode| Netns {
            inode,
            name: netns_names
                .iter()
                .find(|(i, _)| *i == inode)
                .map(|(_, n)| n.clone()),
            host: Some(inode) == host_netns,
        })
    };
    let mut used = vec![false; containers.len()];
    for p in processes {
        let at = p
            .container_id
            .as_ref()
            .and_then(|id| containers.iter().position(|c| &c.id == id));
        if let Some(i) = at {
            // A second runtime process in the same container (a child) is the same runtime.
            if used[i] {
                continue;
            }
            used[i] = true;
        }
        let container = at.map(|i| containers[i].clone());
        d.runtimes
            .push(runtime_of(Some(p), container, &netns_of, opts));
    }
    for (i, c) in containers.into_iter().enumerate() {
        if used[i] {
            continue;
        }
        // The engine's PID may be a shell that started the runtime; procfs did not find a
        // runtime in that container, so the process is shown only when it is one.
        let p = c
            .pid
            .and_then(|pid| procfs::read_process(&opts.proc_root, pid));
        d.runtimes.push(runtime_of(p, Some(c), &netns_of, opts));
    }
    if let Some(only) = opts.only {
        d.runtimes.retain(|r| r.source == only);
    }
    d
}

fn engine_issue(e: engine::EngineError) -> ProviderIssue {
    ProviderIssue {
        provider: "docker",
        source: Source::DockerContainer,
        code: e.code,
        message: e.message,
    }
}

fn runtime_of(
    p: Option<Process>,
    c: Option<Container>,
    netns_of: &dyn Fn(&Process) -> Option<Netns>,
    opts: &Options,
) -> Runtime {
    let binary = match (&p, &c) {
        (Some(p), _) => p.binary(),
        (None, Some(c)) => c
            .command
            .first()
            .map(|a| procfs::basename(a).to_string())
            .unwrap_or_else(|| "xray".into()),
        (None, None) => String::new(),
    };
    let config = p.as_ref().map(|p| {
        let env = |k: &str| p.env_var(k);
        let root = Rooted {
            root: opts.proc_root.join(p.pid.to_string()).join("root"),
        };
        locate::locate(
            &locate::Process {
                args: &p.args,
                env: &env,
                cwd: p.cwd.as_deref(),
                exe: &p.exe,
                flavour: Flavour::of_binary(&p.binary()),
            },
            &root,
        )
    });
    Runtime {
        source: if c.is_some() {
            Source::DockerContainer
        } else {
            Source::HostProcess
        },
        name: match (&c, &p) {
            (Some(c), _) => c.name.clone(),
            (None, Some(p)) => p.comm.clone(),
            (None, None) => String::new(),
        },
        binary,
        netns: p.as_ref().and_then(netns_of),
        config,
        process: p,
        container: c,
        recorded_owner: None,
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SelectError {
    #[error("no Xray or V2Ray runtime matches the selection")]
    NoMatch,
    #[error("{count} runtimes match the selection ({which}); narrow it down with --pid, --container, --name or --source")]
    Ambiguous { count: usize, which: String },
    #[error("process {0} is not an Xray or V2Ray runtime")]
    NotARuntime(u32),
}

/// Whether `r` satisfies every criterion given.
pub fn matches(sel: &Selection, r: &Runtime) -> bool {
    let pid_ok = sel.pid.is_none_or(|pid| r.pid() == Some(pid));
    let name_ok = sel.name.as_ref().is_none_or(|n| {
        *n == r.name
            || r.process
                .as_ref()
                .is_some_and(|p| *n == p.comm || procfs::basename(&p.exe) == n)
    });
    // An empty prefix would match every container, which is a guess, not a selection.
    let container_ok = sel.container.as_ref().is_none_or(|c| {
        !c.is_empty()
            && (r
                .container
                .as_ref()
                .is_some_and(|k| k.name == *c || k.id.starts_with(c.as_str()))
                || r.container_id()
                    .is_some_and(|id| id.starts_with(c.as_str())))
    });
    let source_ok = sel.source.is_none_or(|s| s == r.source);
    pid_ok && name_ok && container_ok && source_ok
}

/// Exactly one runtime must satisfy every criterion given; nothing is guessed.
pub fn select_from(
    d: &Discovery,
    sel: &Selection,
    proc_root: &Path,
) -> Result<Runtime, SelectError> {
    let mut matched: Vec<&Runtime> = d.runtimes.iter().filter(|r| matches(sel, r)).collect();
    match matched.len() {
        0 => match sel.pid {
            // The process is there but is not a runtime: say so rather than "no match".
            Some(pid)
                if proc_root.join(pid.to_string()).exists()
                    && !d.runtimes.iter().any(|r| r.pid() == Some(pid)) =>
            {
                Err(SelectError::NotARuntime(pid))
            }
            _ => Err(SelectError::NoMatch),
        },
        1 => Ok(matched.remove(0).clone()),
        n => Err(SelectError::Ambiguous {
            count: n,
            which: matched
                .iter()
                .map(|r| r.describe())
                .collect::<Vec<_>>()
                .join("; "),
        }),
    }
}

/// Discovers (as narrowly as the selection allows) and selects one runtime.
pub fn select(sel: &Selection) -> Result<Runtime, SelectError> {
    let opts = Options::from_env(sel);
    select_from(&discover(&opts), sel, &opts.proc_root)
}

#[cfg(test)]
mod tests {
    use super::procfs::tests::{hex, FakeProc, Proc};
    use super::*;

    fn opts(fp: &FakeProc) -> Options {
        Options {
            proc_root: fp.root.clone(),
            run_netns: PathBuf::from("/nonexistent"),
            docker_host: Some("unix:///nonexistent/raylimit-test.sock".into()),
            timeout: Duration::from_millis(200),
            only: None,
            pid: None,
        }
    }

    /// Host xray (pid 10), host v2ray (11), two xray containers seen by cgroup only (20, 21),
    /// nginx (30).
    fn mixed_tree() -> FakeProc {
        let fp = FakeProc::new();
        fp.add(Proc {
            pid: 10,
            ..Proc::default()
        })
        .add(Proc {
            pid: 11,
            comm: "v2ray",
            args: &["/usr/bin/v2ray", "-config", "/etc/v2ray/config.json"],
            exe: Some("/usr/bin/v2ray"),
            ..Proc::default()
        })
        .add(Proc {
            pid: 20,
            cgroup: format!("0::/system.slice/docker-{}.scope\n", hex('a')),
            ..Proc::default()
        })
        .add(Proc {
            pid: 21,
            cgroup: format!("12:cpu:/docker/ab{}\n", &hex('c')[2..]),
            ..Proc::default()
        })
        .add(Proc {
            pid: 30,
            comm: "nginx",
            args: &["nginx"],
            exe: Some("/usr/sbin/nginx"),
            ..Proc::default()
        });
        fp
    }

    fn ambiguous(count: usize) -> SelectError {
        SelectError::Ambiguous {
            count,
            which: String::new(),
        }
    }

    #[test]
    fn selection_rules() {
        let fp = mixed_tree();
        let d = discover(&opts(&fp));
        // The engine socket is missing: reported, not fatal, and the host still lists.
        assert_eq!(d.issues.len(), 1);
        assert_eq!(d.issues[0].code, "unavailable");
        assert!(!d.issues[0].fatal());
        assert_eq!(d.runtimes.len(), 4);
        // Ambiguity compared by count (the descriptions of what matched are for operators).
        let pick = |s: Selection| {
            select_from(&d, &s, &fp.root)
                .map(|r| r.pid().unwrap())
                .map_err(|e| match e {
                    SelectError::Ambiguous { count, .. } => ambiguous(count),
                    e => e,
                })
        };
        let sel = Selection::default;
        assert_eq!(pick(sel()), Err(ambiguous(4)));
        // The operator reads which ones matched.
        let e = select_from(&d, &sel(), &fp.root).unwrap_err().to_string();
        assert!(
            e.starts_with("4 runtimes match the selection (host process 10 (xray")
                && e.contains("container abcccccccccc (pid 21)"),
            "{e}"
        );
        assert_eq!(
            pick(Selection {
                pid: Some(11),
                ..sel()
            }),
            Ok(11)
        );
        assert_eq!(
            pick(Selection {
                pid: Some(30),
                ..sel()
            }),
            Err(SelectError::NotARuntime(30))
        );
        assert_eq!(
            pick(Selection {
                pid: Some(31),
                ..sel()
            }),
            Err(SelectError::NoMatch)
        );
        assert_eq!(
            pick(Selection {
                pid: Some(11),
                name: Some("xray".into()),
                ..sel()
            }),
            Err(SelectError::NoMatch)
        );
        assert_eq!(
            pick(Selection {
                name: Some("v2ray".into()),
                ..sel()
            }),
            Ok(11)
        );
        assert_eq!(
            pick(Selection {
                name: Some("xray".into()),
                ..sel()
            }),
            Err(ambiguous(3))
        );
        assert_eq!(
            pick(Selection {
                name: Some("xra".into()),
                ..sel()
            }),
            Err(SelectError::NoMatch)
        );
        assert_eq!(
            pick(Selection {
                container: Some("aaaa".into()),
                ..sel()
            }),
            Ok(20)
        );
        assert_eq!(
            pick(Selection {
                container: Some("ab".into()),
                ..sel()
            }),
            Ok(21)
        );
        assert_eq!(
            pick(Selection {
                container: Some("a".into()),
                ..sel()
            }),
            Err(ambiguous(2))
        );
        assert_eq!(
            pick(Selection {
                container: Some(String::new()),
                ..sel()
            }),
            Err(SelectError::NoMatch)
        );
        assert_eq!(
            pick(Selection {
                name: Some("xray".into()),
                source: Some(Source::HostProcess),
                ..sel()
            }),
            Err(ambiguous(3))
        );
        // Without the engine, a cgroup-only container is still a host process record.
        let r = select_from(
            &d,
            &Selection {
                pid: Some(21),
                ..sel()
            },
            &fp.root,
        )
        .unwrap();
        assert_eq!(
            r.container_id(),
            Some(format!("ab{}", &hex('c')[2..])).as_deref()
        );
        assert_eq!(r.owner(), format!("container:ab{}", &hex('c')[2..]));
        assert_eq!(
            r.describe(),
            format!("container ab{} (pid 21)", &hex('c')[2..12])
        );
    }

    #[test]
    fn owner_ignores_pid_and_start_time() {
        let fp = FakeProc::new();
        fp.add(Proc {
            pid: 10,
            start_time: 5,
            ..Proc::default()
        });
        fp.add(Proc {
            pid: 99,
            start_time: 77,
            ..Proc::default()
        });
        let d = discover(&Options {
            only: Some(Source::HostProcess),
            ..opts(&fp)
        });
        // --source host_process skips the engine entirely.
        assert!(d.issues.is_empty());
        let (a, b) = (&d.runtimes[0], &d.runtimes[1]);
        assert_ne!(a, b);
        assert_eq!(a.owner(), b.owner());
        // The fake's cwd is /etc/xray and the command line says `-c config.json`.
        assert_eq!(
            a.owner(),
            "host:/usr/local/bin/xray config=/etc/xray/config.json"
        );
        assert_eq!(a.describe(), "host process 10 (xray, /usr/local/bin/xray)");
        assert_eq!(a.to_json()["host_process"]["start_time"], 5);
        assert_eq!(
            a.to_json()["host_process"]["config_paths"][0],
            "/etc/xray/config.json"
        );
    }

    #[test]
    fn container_images_and_commands_that_name_a_runtime() {
        assert!(looks_like_runtime(
            "ghcr.io/xtls/xray-core:latest",
            "xray run"
        ));
        assert!(looks_like_runtime("teddysun/xray", "/bin/sh -c x"));
        assert!(looks_like_runtime("v2fly/v2fly-core@sha256:abc", ""));
        assert!(looks_like_runtime(
            "custom:1",
            "/usr/local/bin/xray run -c /c.json"
        ));
        assert!(!looks_like_runtime("postgres:16", "postgres"));
        assert!(!looks_like_runtime("xray-ui", "node server.js"));
    }

    #[test]
    fn source_names_round_trip() {
        for s in [Source::HostProcess, Source::DockerContainer] {
            assert_eq!(Source::parse(s.name()), Some(s));
        }
        assert_eq!(Source::parse("Host_Process"), None);
        assert_eq!(Source::parse("docker"), None);
    }
}

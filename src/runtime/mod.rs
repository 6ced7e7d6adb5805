//! Finding the runtime an operator means: a minimal procfs scan for Xray and V2Ray processes.
//! (Full discovery, containers through the engine's API and config resolution come later.)
//!
//! The owner identity a limit is recorded under is stable across restarts of the runtime: the
//! binary and its config paths for a host process, the container for a containerised one, never
//! the PID.

use std::fs;
use std::path::{Path, PathBuf};

/// Basenames raylimit recognises as a runtime.
const RUNTIME_NAMES: [&str; 4] = ["xray", "v2ray", "xray-core", "v2ray-core"];

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
#[derive(Debug, Clone, Default)]
pub struct Selection {
    pub pid: Option<u32>,
    pub name: Option<String>,
    pub container: Option<String>,
    pub source: Option<Source>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Runtime {
    pub source: Source,
    pub pid: u32,
    /// `comm`.
    pub name: String,
    pub exe: String,
    pub args: Vec<String>,
    pub config_paths: Vec<String>,
    pub container_id: Option<String>,
    /// Clock ticks since boot (field 22 of `stat`): a reused PID has another.
    pub start_time: u64,
}

impl Runtime {
    /// The stable owner identity: never the PID.
    pub fn owner(&self) -> String {
        if let Some(id) = &self.container_id {
            return format!("container:{id}");
        }
        let mut s = format!("host:{}", self.exe);
        if !self.config_paths.is_empty() {
            s.push_str(" config=");
            s.push_str(&self.config_paths.join(","));
        }
        s
    }

    pub fn describe(&self) -> String {
        match &self.container_id {
            Some(id) => format!(
                "docker container {} (pid {})",
                &id[..id.len().min(12)],
                self.pid
            ),
            None => format!("host process {} ({}, {})", self.pid, self.name, self.exe),
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SelectError {
    #[error("no Xray or V2Ray runtime matches the selection")]
    NoMatch,
    #[error(
        "{0} runtimes match the selection; narrow it down with --pid, --container or --source"
    )]
    Ambiguous(usize),
    #[error("process {0} is not an Xray or V2Ray runtime")]
    NotARuntime(u32),
    #[error("cannot read /proc: {0}")]
    Proc(String),
}

pub fn select(sel: &Selection) -> Result<Runtime, SelectError> {
    select_in(Path::new("/proc"), sel)
}

pub fn select_in(proc_root: &Path, sel: &Selection) -> Result<Runtime, SelectError> {
    let candidates = match sel.pid {
        Some(pid) => match read_process(proc_root, pid) {
            Some(r) => vec![r],
            None if proc_root.join(pid.to_string()).exists() => {
                return Err(SelectError::NotARuntime(pid))
            }
            None => Vec::new(),
        },
        None => scan(proc_root)?,
    };
    let mut matched: Vec<Runtime> = candidates
        .into_iter()
        .filter(|r| {
            sel.name
                .as_ref()
                .is_none_or(|n| *n == r.name || basename(&r.exe) == n)
                && sel.container.as_ref().is_none_or(|c| {
                    !c.is_empty()
                        && r.container_id
                            .as_ref()
                            .is_some_and(|id| id.starts_with(c.as_str()))
                })
                && sel.source.is_none_or(|s| s == r.source)
        })
        .collect();
    match matched.len() {
        0 => Err(SelectError::NoMatch),
        1 => Ok(matched.remove(0)),
        n => Err(SelectError::Ambiguous(n)),
    }
}

pub fn scan(proc_root: &Path) -> Result<Vec<Runtime>, SelectError> {
    let dir = fs::read_dir(proc_root).map_err(|e| SelectError::Proc(e.to_string()))?;
    let mut out: Vec<Runtime> = dir
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| read_process(proc_root, pid))
        .collect();
    out.sort_by_key(|r| r.pid);
    Ok(out)
}

fn basename(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

pub fn read_process(proc_root: &Path, pid: u32) -> Option<Runtime> {
    let dir = proc_root.join(pid.to_string());
    let cmdline = fs::read(dir.join("cmdline")).ok()?;
    let args: Vec<String> = cmdline
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    // Kernel threads have no command line.
    if args.is_empty() {
        return None;
    }
    let name = fs::read_to_string(dir.join("comm"))
        .ok()?
        .trim()
        .to_string();
    let exe = fs::read_link(dir.join("exe"))
        .map(|p| {
            p.to_string_lossy()
                .trim_end_matches(" (deleted)")
                .to_string()
        })
        .unwrap_or_default();
    let is_runtime = [name.as_str(), basename(&exe), basename(&args[0])]
        .iter()
        .any(|n| RUNTIME_NAMES.contains(n));
    if !is_runtime {
        return None;
    }
    let stat = fs::read_to_string(dir.join("stat")).ok()?;
    let cwd = fs::read_link(dir.join("cwd")).ok();
    let container_id = fs::read_to_string(dir.join("cgroup"))
        .ok()
        .and_then(|c| container_id(&c));
    Some(Runtime {
        source: if container_id.is_some() {
            Source::DockerContainer
        } else {
            Source::HostProcess
        },
        pid,
        name,
        exe,
        config_paths: config_paths(&args, cwd.as_deref()),
        args,
        container_id,
        start_time: start_time(&stat)?,
    })
}

/// Field 22 of `stat`, counted after the last `)` because `comm` may hold spaces and parentheses.
fn start_time(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Config paths from `-c`, `-config`, `--config`, `-confdir`, `--confdir` (space or `=`).
fn config_paths(args: &[String], cwd: Option<&Path>) -> Vec<String> {
    const FLAGS: [&str; 5] = ["-c", "-config", "--config", "-confdir", "--confdir"];
    let mut out = Vec::new();
    let mut i = 1;
    while i < args.len() {
        let a = &args[i];
        let value = if FLAGS.contains(&a.as_str()) {
            i += 1;
            args.get(i).cloned()
        } else {
            a.split_once('=')
                .filter(|(f, _)| FLAGS.contains(f))
                .map(|(_, v)| v.to_string())
        };
        if let Some(v) = value.filter(|v| !v.is_empty()) {
            let p = PathBuf::from(&v);
            let full = match (p.is_relative(), cwd) {
                (true, Some(c)) => c.join(p),
                _ => p,
            };
            out.push(full.to_string_lossy().into_owned());
        }
        i += 1;
    }
    out
}

/// A 64-hex container id named by a cgroup path (docker, podman, containerd).
fn container_id(cgroup: &str) -> Option<String> {
    cgroup.lines().find_map(|line| {
        let path = line.splitn(3, ':').nth(2)?;
        path.split(['/', '-', '.'])
            .find(|part| part.len() == 64 && part.bytes().all(|b| b.is_ascii_hexdigit()))
            .map(str::to_string)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_flags_in_every_form() {
        let args: Vec<String> = [
            "xray",
            "run",
            "-c",
            "a.json",
            "-config=/etc/b.json",
            "--config",
            "c.json",
            "--confdir=/etc/xray/conf.d",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        assert_eq!(
            config_paths(&args, Some(Path::new("/srv"))),
            [
                "/srv/a.json",
                "/etc/b.json",
                "/srv/c.json",
                "/etc/xray/conf.d"
            ]
        );
    }

    #[test]
    fn container_ids_from_cgroup_paths() {
        let id = "a".repeat(64);
        for cg in [
            format!("0::/system.slice/docker-{id}.scope\n"),
            format!("12:cpu:/docker/{id}\n"),
            format!("0::/machine.slice/libpod-{id}.scope/container\n"),
        ] {
            assert_eq!(container_id(&cg).as_deref(), Some(id.as_str()), "{cg}");
        }
        assert_eq!(container_id("0::/user.slice/session-3.scope\n"), None);
    }

    #[test]
    fn stat_start_time_survives_odd_comm() {
        let stat = "42 (x) (y z) S 1 42 42 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 10";
        assert_eq!(start_time(stat), Some(987654));
    }

    #[test]
    fn owner_ignores_pid() {
        let a = Runtime {
            source: Source::HostProcess,
            pid: 10,
            name: "xray".into(),
            exe: "/usr/bin/xray".into(),
            args: vec![],
            config_paths: vec!["/etc/xray/config.json".into()],
            container_id: None,
            start_time: 5,
        };
        let b = Runtime {
            pid: 99,
            start_time: 77,
            ..a.clone()
        };
        assert_eq!(a.owner(), b.owner());
        assert_eq!(a.owner(), "host:/usr/bin/xray config=/etc/xray/config.json");
    }
}

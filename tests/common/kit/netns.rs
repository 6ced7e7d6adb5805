//! A network namespace that exists for the life of a value: deleted on drop (and on a panic),
//! with what still runs inside killed first where asked, and the namespaces a dead run left
//! behind removed by the next one.

use std::ffi::OsStr;
use std::process::{Command, Stdio};

use super::need::{self, require};
use super::process::{die_with_parent, output, unique};

/// How a namespace treats the processes tied to it.
#[derive(Debug, Clone, Copy, Default)]
pub struct NetnsOptions {
    /// On drop, SIGKILL every process still inside before deleting it (the bench: only ever
    /// processes it started).
    pub kill_inside: bool,
    /// Every command made by [`Netns::command`], [`Netns::ip_command`], [`Netns::tc_command`]
    /// and [`Netns::exec`] dies with the thread that starts it (PR_SET_PDEATHSIG).
    pub die_with_parent: bool,
}

/// A network namespace that exists for the life of this value.
pub struct Netns {
    pub name: String,
    options: NetnsOptions,
}

impl Netns {
    /// A test's namespace, `rlt-TAG-PID-N`, with `lo` up; fails the test with one line when
    /// root or `ip` is missing.
    #[track_caller]
    pub fn new(tag: &str) -> Netns {
        require(&[need::NAMESPACE]);
        Netns::create(format!("rlt-{}", unique(tag)), NetnsOptions::default())
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// Adds the namespace `name` and sets its `lo` up; the value deletes it.
    pub fn create(name: String, options: NetnsOptions) -> Result<Netns, String> {
        let mut add = Command::new("ip");
        add.args(["netns", "add", &name]);
        if options.die_with_parent {
            die_with_parent(&mut add);
        }
        output(&mut add)?;
        let ns = Netns { name, options };
        output(&mut ns.ip_command(&["link", "set", "lo", "up"]))?;
        Ok(ns)
    }

    /// The namespace's path, for raylimit's `--netns`-by-path and setns.
    pub fn path(&self) -> String {
        format!("/run/netns/{}", self.name)
    }

    /// `program` with this namespace's options (see [`NetnsOptions::die_with_parent`]).
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new(program);
        if self.options.die_with_parent {
            die_with_parent(&mut cmd);
        }
        cmd
    }

    /// `ip -n NAME ARGS`.
    pub fn ip_command(&self, args: &[&str]) -> Command {
        let mut cmd = self.command("ip");
        cmd.args(["-n", &self.name]).args(args);
        cmd
    }

    /// `tc -n NAME ARGS`.
    pub fn tc_command(&self, args: &[&str]) -> Command {
        let mut cmd = self.command("tc");
        cmd.args(["-n", &self.name]).args(args);
        cmd
    }

    /// `ip netns exec NAME PROGRAM`: arguments follow.
    pub fn exec(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = self.command("ip");
        cmd.args(["netns", "exec", &self.name]).arg(program);
        cmd
    }

    /// `ip -n NAME ARGS`: stdout; panics with the command and its stderr on failure.
    #[track_caller]
    pub fn ip(&self, args: &[&str]) -> String {
        output(&mut self.ip_command(args)).unwrap_or_else(|e| panic!("{e}"))
    }

    /// `tc -n NAME ARGS`: stdout; panics with the command and its stderr on failure.
    #[track_caller]
    pub fn tc(&self, args: &[&str]) -> String {
        output(&mut self.tc_command(args)).unwrap_or_else(|e| panic!("{e}"))
    }

    /// The processes inside the namespace `name` (`ip netns pids`).
    pub fn pids(name: &str) -> Vec<libc::pid_t> {
        let out = Command::new("ip")
            .args(["netns", "pids", name])
            .stderr(Stdio::null())
            .output();
        out.map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect()
        })
        .unwrap_or_default()
    }

    /// Deletes the namespace `name`, first killing what runs inside when `kill_inside` (never
    /// this process itself).
    pub fn remove(name: &str, kill_inside: bool) {
        if kill_inside {
            let me = std::process::id() as libc::pid_t;
            for pid in Self::pids(name).into_iter().filter(|p| *p != me) {
                // SAFETY: plain kill of a process inside a namespace this process made.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        let _ = Command::new("ip")
            .args(["netns", "del", name])
            .stderr(Stdio::null())
            .status();
    }

    /// Removes what earlier runs named `PREFIX<pid>` left behind when that pid is no longer a
    /// live process whose name starts with `comm`: namespaces starting with `PREFIX` (what runs
    /// inside killed) and entries `PREFIX<pid>` of the temporary directory. Returns the
    /// namespaces removed.
    pub fn remove_leftovers(prefix: &str, comm: &str) -> Vec<String> {
        let owner = |name: &str| name.strip_prefix(prefix)?.parse::<u32>().ok();
        let alive = |pid: u32| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let zombie = stat
                .rsplit_once(") ")
                .map(|(_, rest)| rest.starts_with('Z'));
            stat.contains(&format!("({comm}")) && zombie == Some(false)
        };
        let mut removed = Vec::new();
        if let Ok(out) = Command::new("ip").args(["netns", "list"]).output() {
            for line in String::from_utf8_lossy(&out.stdout).lines() {
                let name = line.split_whitespace().next().unwrap_or("");
                if name.starts_with(prefix) && !owner(name).is_some_and(alive) {
                    Netns::remove(name, true);
                    removed.push(name.to_string());
                }
            }
        }
        for entry in std::fs::read_dir(std::env::temp_dir())
            .into_iter()
            .flatten()
            .flatten()
        {
            if owner(&entry.file_name().to_string_lossy()).is_some_and(|pid| !alive(pid)) {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
        removed
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        Netns::remove(&self.name, self.options.kill_inside);
    }
}

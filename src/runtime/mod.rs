//! Finding the runtime an operator means: a minimal procfs scan for Xray and V2Ray processes.
//! (Full discovery, containers through the engine's API and config resolution come later.)
//!
//! Only procfs is read; nothing here starts a process. The owner identity a limit is recorded
//! under is stable across restarts of the runtime: the binary and its config paths for a host
//! process, the container for a containerised one, never the PID.

use std::fs;
use std::path::{Path, PathBuf};

/// Basenames raylimit recognises as a runtime (case-sensitive).
const RUNTIME_NAMES: [&str; 4] = ["xray", "v2ray", "xray-core", "v2ray-core"];

/// Flags through which Xray and V2Ray take a config file or directory.
const CONFIG_FLAGS: [&str; 5] = ["-c", "-config", "--config", "-confdir", "--confdir"];

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
    /// `DockerContainer` when the cgroup names a container id.
    pub source: Source,
    pub pid: u32,
    /// `comm`, trimmed.
    pub name: String,
    /// Target of `exe`, without a trailing ` (deleted)`; empty when unreadable.
    pub exe: String,
    pub args: Vec<String>,
    /// Absolute where the cwd was readable, in order of appearance.
    pub config_paths: Vec<String>,
    pub container_id: Option<String>,
    /// Clock ticks since boot (field 22 of `stat`): a reused PID has another.
    pub start_time: u64,
}

impl Runtime {
    /// The stable owner identity: never the PID, so a restarted runtime keeps its limits' owner.
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

    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "source": self.source.name(),
            "pid": self.pid,
            "name": self.name,
            "exe": self.exe,
            "args": self.args,
            "config_paths": self.config_paths,
            "container_id": self.container_id,
            "start_time": self.start_time,
            "owner": self.owner(),
        })
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

/// Exactly one runtime must satisfy every criterion given; nothing is guessed.
pub fn select_in(proc_root: &Path, sel: &Selection) -> Result<Runtime, SelectError> {
    let candidates = match sel.pid {
        Some(pid) => match read_process(proc_root, pid) {
            Some(r) => vec![r],
            // The process is there but is not a runtime: say so rather than "no match".
            None if proc_root.join(pid.to_string()).exists() => {
                return Err(SelectError::NotARuntime(pid))
            }
            None => Vec::new(),
        },
        None => scan(proc_root)?,
    };
    let mut matched: Vec<Runtime> = candidates
        .into_iter()
        .filter(|r| satisfies(sel, r))
        .collect();
    match matched.len() {
        0 => Err(SelectError::NoMatch),
        1 => Ok(matched.remove(0)),
        n => Err(SelectError::Ambiguous(n)),
    }
}

fn satisfies(sel: &Selection, r: &Runtime) -> bool {
    let name_ok = sel
        .name
        .as_ref()
        .is_none_or(|n| *n == r.name || basename(&r.exe) == n);
    // An empty prefix would match every container, which is a guess, not a selection.
    let container_ok = sel.container.as_ref().is_none_or(|c| {
        !c.is_empty()
            && r.container_id
                .as_ref()
                .is_some_and(|id| id.starts_with(c.as_str()))
    });
    let source_ok = sel.source.is_none_or(|s| s == r.source);
    name_ok && container_ok && source_ok
}

/// Every runtime candidate under `proc_root`, by ascending PID.
pub fn scan(proc_root: &Path) -> Result<Vec<Runtime>, SelectError> {
    let dir = fs::read_dir(proc_root).map_err(|e| SelectError::Proc(e.to_string()))?;
    let mut out: Vec<Runtime> = dir
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| read_process(proc_root, pid))
        .collect();
    out.sort_by_key(|r| r.pid);
    Ok(out)
}

/// One process as a runtime; `None` when it is not a candidate or vanished while being read.
pub fn read_process(proc_root: &Path, pid: u32) -> Option<Runtime> {
    let dir = proc_root.join(pid.to_string());
    let args = split_cmdline(&fs::read(dir.join("cmdline")).ok()?);
    // Kernel threads have no command line.
    if args.is_empty() {
        return None;
    }
    let name = fs::read_to_string(dir.join("comm"))
        .ok()?
        .trim()
        .to_string();
    // Unreadable for another user's process without privileges; that alone does not disqualify.
    let exe = fs::read_link(dir.join("exe"))
        .map(|p| {
            let s = p.to_string_lossy();
            s.strip_suffix(" (deleted)").unwrap_or(&s).to_string()
        })
        .unwrap_or_default();
    let is_runtime = [name.as_str(), basename(&exe), basename(&args[0])]
        .iter()
        .any(|n| RUNTIME_NAMES.contains(n));
    if !is_runtime {
        return None;
    }
    let start_time = start_time(&fs::read_to_string(dir.join("stat")).ok()?)?;
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
        start_time,
    })
}

fn basename(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

/// `cmdline` is NUL-terminated arguments; empty arguments in the middle are kept so that
/// `-c ""` does not swallow the next flag.
fn split_cmdline(raw: &[u8]) -> Vec<String> {
    let raw = raw.strip_suffix(&[0]).unwrap_or(raw);
    if raw.is_empty() {
        return Vec::new();
    }
    raw.split(|b| *b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect()
}

/// Field 22 of `stat`, counted after the last `)` because `comm` may hold spaces and parentheses.
fn start_time(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    // `rest` starts at field 3 (state), so field 22 is the 20th token.
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Config paths from `-c`, `-config`, `--config`, `-confdir`, `--confdir` (space or `=` form).
/// Relative paths are joined with the process's cwd so the owner does not depend on it.
fn config_paths(args: &[String], cwd: Option<&Path>) -> Vec<String> {
    let mut out = Vec::new();
    let mut i = 1;
    while i < args.len() {
        let a = args[i].as_str();
        let value = if CONFIG_FLAGS.contains(&a) {
            i += 1;
            args.get(i).map(String::as_str)
        } else {
            a.split_once('=')
                .filter(|(flag, _)| CONFIG_FLAGS.contains(flag))
                .map(|(_, v)| v)
        };
        if let Some(v) = value.filter(|v| !v.is_empty()) {
            let p = Path::new(v);
            let full = match cwd {
                Some(c) if p.is_relative() => c.join(p),
                _ => p.to_path_buf(),
            };
            // Collecting components drops `.` segments: `./a.json` and `a.json` are one owner.
            let full: PathBuf = full.components().collect();
            out.push(full.to_string_lossy().into_owned());
        }
        i += 1;
    }
    out
}

/// A 64-hex container id named by a cgroup path (docker, podman, containerd, CRI-O).
fn container_id(cgroup: &str) -> Option<String> {
    cgroup.lines().find_map(|line| {
        // "hierarchy-ID:controllers:path"; the path itself may contain ':'.
        let path = line.splitn(3, ':').nth(2)?;
        path.split(['/', '-', '.', ':'])
            .find(|part| part.len() == 64 && part.bytes().all(|b| b.is_ascii_hexdigit()))
            .map(str::to_string)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A fake procfs tree in a temp dir, removed on drop.
    struct FakeProc {
        root: PathBuf,
    }

    struct Proc<'a> {
        pid: u32,
        comm: &'a str,
        args: &'a [&'a str],
        exe: Option<&'a str>,
        cwd: &'a str,
        cgroup: String,
        start_time: u64,
    }

    impl Default for Proc<'_> {
        fn default() -> Self {
            Proc {
                pid: 100,
                comm: "xray",
                args: &["/usr/local/bin/xray", "run", "-c", "config.json"],
                exe: Some("/usr/local/bin/xray"),
                cwd: "/etc/xray",
                cgroup: "0::/system.slice/xray.service\n".into(),
                start_time: 5000,
            }
        }
    }

    impl FakeProc {
        fn new() -> FakeProc {
            static N: AtomicUsize = AtomicUsize::new(0);
            let root = std::env::temp_dir().join(format!(
                "raylimit-runtime-test-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            let _ = fs::remove_dir_all(&root);
            fs::create_dir_all(&root).unwrap();
            FakeProc { root }
        }

        fn add(&self, p: Proc) -> &Self {
            let dir = self.root.join(p.pid.to_string());
            fs::create_dir_all(&dir).unwrap();
            fs::write(dir.join("comm"), format!("{}\n", p.comm)).unwrap();
            let mut cmdline = Vec::new();
            for a in p.args {
                cmdline.extend_from_slice(a.as_bytes());
                cmdline.push(0);
            }
            fs::write(dir.join("cmdline"), cmdline).unwrap();
            let stat = format!(
                "{} ({}) S 1 {} {} 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 8 0 {} 1000 10\n",
                p.pid, p.comm, p.pid, p.pid, p.start_time
            );
            fs::write(dir.join("stat"), stat).unwrap();
            fs::write(dir.join("cgroup"), &p.cgroup).unwrap();
            if let Some(exe) = p.exe {
                symlink(exe, dir.join("exe")).unwrap();
            }
            symlink(p.cwd, dir.join("cwd")).unwrap();
            self
        }
    }

    impl Drop for FakeProc {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.root);
        }
    }

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    fn hex(c: char) -> String {
        c.to_string().repeat(64)
    }

    #[test]
    fn config_flags_in_every_form() {
        let args = strings(&[
            "xray",
            "run",
            "-c",
            "a.json",
            "-c=./b.json",
            "-config",
            "/etc/c.json",
            "-config=d.json",
            "--config",
            "sub/e.json",
            "--config=/etc/f.json",
            "-confdir",
            "conf.d",
            "--confdir=/etc/xray/conf.d",
            "-format=json",
            "--confdir",
        ]);
        assert_eq!(
            config_paths(&args, Some(Path::new("/srv"))),
            [
                "/srv/a.json",
                "/srv/b.json",
                "/etc/c.json",
                "/srv/d.json",
                "/srv/sub/e.json",
                "/etc/f.json",
                "/srv/conf.d",
                "/etc/xray/conf.d",
            ]
        );
        // Without a readable cwd a relative path stays as given.
        assert_eq!(config_paths(&args[..4], None), ["a.json"]);
    }

    #[test]
    fn cmdline_keeps_empty_arguments() {
        assert_eq!(
            split_cmdline(b"xray\0-c\0\0run\0"),
            ["xray", "-c", "", "run"]
        );
        assert!(split_cmdline(b"").is_empty());
        let args = split_cmdline(b"xray\0-c\0\0-confdir\0/d\0");
        assert_eq!(config_paths(&args, None), ["/d"]);
    }

    #[test]
    fn container_ids_from_cgroup_paths() {
        let id = hex('a');
        for cg in [
            format!("0::/system.slice/docker-{id}.scope\n"),
            format!("12:cpu,cpuacct:/docker/{id}\n11:memory:/docker/{id}\n"),
            format!("0::/machine.slice/libpod-{id}.scope/container\n"),
            format!("0::/kubepods.slice/kubepods-pod1.slice/cri-containerd-{id}.scope\n"),
            format!("1:name=systemd:/\n0::/system.slice/containerd.service/k8s.io:cri-containerd:{id}\n"),
        ] {
            assert_eq!(container_id(&cg).as_deref(), Some(id.as_str()), "{cg}");
        }
        assert_eq!(container_id("0::/user.slice/session-3.scope\n"), None);
        assert_eq!(container_id("0::/\n"), None);
        // 63 hex digits is not an id.
        assert_eq!(container_id(&format!("0::/docker/{}\n", &id[1..])), None);
    }

    #[test]
    fn stat_start_time_survives_odd_comm() {
        let stat = "42 (x) (y z) S 1 42 42 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 10";
        assert_eq!(start_time(stat), Some(987654));
        assert_eq!(start_time("42 (xray S 1"), None);
        assert_eq!(start_time("42 (xray) S 1 42"), None);
    }

    #[test]
    fn read_process_from_fake_proc() {
        let fp = FakeProc::new();
        fp.add(Proc {
            pid: 42,
            comm: "x) (y",
            args: &["/opt/xray/xray", "run", "-c", "./config.json"],
            exe: Some("/opt/xray/xray (deleted)"),
            cwd: "/opt/xray",
            start_time: 987654,
            ..Proc::default()
        });
        let r = read_process(&fp.root, 42).unwrap();
        assert_eq!(
            r,
            Runtime {
                source: Source::HostProcess,
                pid: 42,
                name: "x) (y".into(),
                exe: "/opt/xray/xray".into(),
                args: strings(&["/opt/xray/xray", "run", "-c", "./config.json"]),
                config_paths: strings(&["/opt/xray/config.json"]),
                container_id: None,
                start_time: 987654,
            }
        );
        assert_eq!(r.describe(), "host process 42 (x) (y, /opt/xray/xray)");
        assert_eq!(
            r.to_json()["owner"],
            "host:/opt/xray/xray config=/opt/xray/config.json"
        );
        assert_eq!(read_process(&fp.root, 43), None);
    }

    #[test]
    fn candidates_by_comm_exe_or_argv0() {
        let fp = FakeProc::new();
        // Only comm names a runtime (exe unreadable).
        fp.add(Proc {
            pid: 1,
            comm: "v2ray",
            args: &["/x/bin", "run"],
            exe: None,
            ..Proc::default()
        })
        // Only the exe basename.
        .add(Proc {
            pid: 2,
            comm: "worker",
            args: &["w"],
            exe: Some("/usr/bin/xray-core"),
            ..Proc::default()
        })
        // Only argv[0]'s basename.
        .add(Proc {
            pid: 3,
            comm: "w",
            args: &["/usr/bin/v2ray-core"],
            exe: Some("/usr/bin/w"),
            ..Proc::default()
        })
        // Case-sensitive: not a runtime.
        .add(Proc {
            pid: 4,
            comm: "Xray",
            args: &["/usr/bin/Xray"],
            exe: Some("/usr/bin/Xray"),
            ..Proc::default()
        })
        // Kernel thread: empty cmdline.
        .add(Proc {
            pid: 5,
            comm: "xray",
            args: &[],
            exe: None,
            ..Proc::default()
        })
        .add(Proc {
            pid: 6,
            comm: "nginx",
            args: &["nginx"],
            exe: Some("/usr/sbin/nginx"),
            ..Proc::default()
        });
        // Non-PID entries in /proc are ignored.
        fs::create_dir_all(fp.root.join("self")).unwrap();
        fs::write(fp.root.join("uptime"), "1 1\n").unwrap();
        let pids: Vec<u32> = scan(&fp.root).unwrap().iter().map(|r| r.pid).collect();
        assert_eq!(pids, [1, 2, 3]);
        assert_eq!(read_process(&fp.root, 1).unwrap().exe, "");
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
        let a = read_process(&fp.root, 10).unwrap();
        let b = read_process(&fp.root, 99).unwrap();
        assert_ne!(a, b);
        assert_eq!(a.owner(), b.owner());
        assert_eq!(
            a.owner(),
            "host:/usr/local/bin/xray config=/etc/xray/config.json"
        );

        let c = Runtime {
            config_paths: vec![],
            ..a.clone()
        };
        assert_eq!(c.owner(), "host:/usr/local/bin/xray");
        let id = hex('b');
        let d = Runtime {
            source: Source::DockerContainer,
            container_id: Some(id.clone()),
            ..a
        };
        assert_eq!(d.owner(), format!("container:{id}"));
        assert_eq!(d.describe(), "docker container bbbbbbbbbbbb (pid 10)");
    }

    #[test]
    fn source_names_round_trip() {
        for s in [Source::HostProcess, Source::DockerContainer] {
            assert_eq!(Source::parse(s.name()), Some(s));
        }
        assert_eq!(Source::parse("Host_Process"), None);
        assert_eq!(Source::parse("docker"), None);
    }

    /// Host xray (pid 10), host v2ray (11), two xray containers (20, 21), nginx (30).
    fn mixed_tree() -> FakeProc {
        let fp = FakeProc::new();
        fp.add(Proc {
            pid: 10,
            ..Proc::default()
        })
        .add(Proc {
            pid: 11,
            comm: "v2ray",
            args: &["/usr/bin/v2ray", "run"],
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

    fn sel() -> Selection {
        Selection::default()
    }

    #[test]
    fn selection_rules() {
        let fp = mixed_tree();
        let pick = |s: Selection| select_in(&fp.root, &s).map(|r| r.pid);

        // Nothing given: four runtimes, nothing guessed.
        assert_eq!(pick(sel()), Err(SelectError::Ambiguous(4)));
        // By pid.
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
        // Pid and another criterion must both hold.
        assert_eq!(
            pick(Selection {
                pid: Some(11),
                name: Some("xray".into()),
                ..sel()
            }),
            Err(SelectError::NoMatch)
        );
        // By name: comm or exe basename, exactly.
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
            Err(SelectError::Ambiguous(3))
        );
        assert_eq!(
            pick(Selection {
                name: Some("xra".into()),
                ..sel()
            }),
            Err(SelectError::NoMatch)
        );
        // By container prefix.
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
            Err(SelectError::Ambiguous(2))
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
                container: Some("dd".into()),
                ..sel()
            }),
            Err(SelectError::NoMatch)
        );
        // Source filter.
        assert_eq!(
            pick(Selection {
                name: Some("xray".into()),
                source: Some(Source::HostProcess),
                ..sel()
            }),
            Ok(10)
        );
        assert_eq!(
            pick(Selection {
                source: Some(Source::DockerContainer),
                ..sel()
            }),
            Err(SelectError::Ambiguous(2))
        );
        assert_eq!(
            pick(Selection {
                container: Some("ab".into()),
                source: Some(Source::HostProcess),
                ..sel()
            }),
            Err(SelectError::NoMatch)
        );

        let r = select_in(
            &fp.root,
            &Selection {
                pid: Some(21),
                ..sel()
            },
        )
        .unwrap();
        assert_eq!(r.source, Source::DockerContainer);
        assert_eq!(
            r.container_id.as_deref(),
            Some(format!("ab{}", &hex('c')[2..])).as_deref()
        );
    }

    #[test]
    fn unreadable_proc_root_is_an_error() {
        let missing = std::env::temp_dir().join(format!("raylimit-no-proc-{}", std::process::id()));
        assert!(matches!(scan(&missing), Err(SelectError::Proc(_))));
        assert!(matches!(
            select_in(&missing, &sel()),
            Err(SelectError::Proc(_))
        ));
    }

    #[test]
    fn selects_against_the_real_proc() {
        // Whatever runs here, the scan itself must succeed and find only candidates.
        for r in scan(Path::new("/proc")).unwrap() {
            assert!(!r.args.is_empty());
            assert_eq!(
                r.source == Source::DockerContainer,
                r.container_id.is_some()
            );
        }
    }
}

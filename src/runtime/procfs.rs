//! The host provider: Xray and V2Ray processes found in procfs. Only files are read.

use std::collections::BTreeSet;
use std::fs;
use std::io::ErrorKind;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// Basenames raylimit recognises as a runtime (case-sensitive), including the names
/// distributions and images package them under.
pub const RUNTIME_NAMES: [&str; 6] = [
    "xray",
    "v2ray",
    "xray-core",
    "v2ray-core",
    "v2fly",
    "v2fly-core",
];

/// One runtime process as procfs shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Process {
    pub pid: u32,
    /// `comm`, trimmed.
    pub comm: String,
    /// Target of `exe` as the process sees it, without ` (deleted)`; empty when unreadable.
    pub exe: String,
    pub args: Vec<String>,
    /// The working directory as the process sees it.
    pub cwd: Option<String>,
    /// The environment the process started with (read for config resolution only; never shown).
    pub env: Vec<(String, String)>,
    /// A 64-hex container id named by the process's cgroup.
    pub container_id: Option<String>,
    /// Clock ticks since boot (field 22 of `stat`): a reused PID has another.
    pub start_time: u64,
    /// The inode of the process's network namespace.
    pub netns: Option<u64>,
    /// Why the process matched.
    pub reasons: Vec<String>,
}

impl Process {
    /// When the process started, as a UTC date (`2026-12-04T21:22:58Z`), from its start time
    /// and the host's boot time; none when the boot time cannot be read.
    pub fn started_at(&self) -> Option<String> {
        let boot = crate::time::boot_time(std::path::Path::new("/proc"))?;
        let secs = crate::time::started_at(self.start_time, boot, crate::time::ticks_per_second());
        Some(crate::time::utc(secs))
    }
}

impl Process {
    pub fn env_var(&self, name: &str) -> Option<String> {
        self.env
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    }

    /// The binary's name: the exe's basename, else argv[0]'s, else comm.
    pub fn binary(&self) -> String {
        [
            basename(&self.exe),
            basename(&self.args[0]),
            self.comm.as_str(),
        ]
        .into_iter()
        .find(|n| !n.is_empty())
        .unwrap_or_default()
        .to_string()
    }
}

pub fn basename(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

pub fn is_runtime_name(name: &str) -> bool {
    RUNTIME_NAMES.contains(&name)
}

/// Every runtime process under `proc_root`, by ascending PID.
pub fn scan(proc_root: &Path) -> Result<Vec<Process>, String> {
    let dir =
        fs::read_dir(proc_root).map_err(|e| format!("cannot read {}: {e}", proc_root.display()))?;
    let mut out: Vec<Process> = dir
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| read_process(proc_root, pid))
        .collect();
    out.sort_by_key(|r| r.pid);
    Ok(out)
}

/// One process as a runtime; `None` when it is not a candidate or vanished while being read.
pub fn read_process(proc_root: &Path, pid: u32) -> Option<Process> {
    let dir = proc_root.join(pid.to_string());
    let args = split_nul(&fs::read(dir.join("cmdline")).ok()?);
    // Kernel threads have no command line.
    if args.is_empty() {
        return None;
    }
    let comm = fs::read_to_string(dir.join("comm"))
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
    let mut reasons = Vec::new();
    if is_runtime_name(basename(&exe)) {
        reasons.push(format!("executable {exe}"));
    }
    if is_runtime_name(basename(&args[0])) {
        reasons.push(format!("command {}", args[0]));
    }
    if is_runtime_name(&comm) {
        reasons.push(format!("process name {comm}"));
    }
    if reasons.is_empty() {
        return None;
    }
    let start_time = start_time(&fs::read_to_string(dir.join("stat")).ok()?)?;
    let env = fs::read(dir.join("environ"))
        .map(|raw| {
            split_nul(&raw)
                .into_iter()
                .filter_map(|kv| {
                    kv.split_once('=')
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                })
                .collect()
        })
        .unwrap_or_default();
    Some(Process {
        pid,
        comm,
        exe,
        args,
        cwd: fs::read_link(dir.join("cwd"))
            .ok()
            .map(|p| p.to_string_lossy().into_owned()),
        env,
        container_id: fs::read_to_string(dir.join("cgroup"))
            .ok()
            .and_then(|c| container_id(&c)),
        start_time,
        netns: netns_inode(proc_root, pid),
        reasons,
    })
}

/// The inode of a process's network namespace (PID 1's is the host's).
/// Whether this process holds CAP_NET_ADMIN (bit 12 of `CapEff` in /proc/self/status), which
/// changing traffic control needs; None when the status cannot be read.
pub fn has_net_admin(proc_root: &Path) -> Option<bool> {
    let status = std::fs::read_to_string(proc_root.join("self/status")).ok()?;
    let hex = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))?
        .trim();
    let caps = u64::from_str_radix(hex, 16).ok()?;
    const CAP_NET_ADMIN: u32 = 12;
    Some(caps & (1 << CAP_NET_ADMIN) != 0)
}

pub fn netns_inode(proc_root: &Path, pid: u32) -> Option<u64> {
    fs::metadata(proc_root.join(pid.to_string()).join("ns/net"))
        .ok()
        .map(|m| m.ino())
}

/// The inodes of a process's sockets: the `socket:[N]` targets under `<proc_root>/<pid>/fd`. An fd
/// closed between listing and reading its link is skipped; the process keeps running meanwhile.
pub fn socket_inodes(proc_root: &Path, pid: u32) -> std::io::Result<BTreeSet<u64>> {
    let mut out = BTreeSet::new();
    for entry in fs::read_dir(proc_root.join(pid.to_string()).join("fd"))? {
        let target = match entry.and_then(|e| fs::read_link(e.path())) {
            Ok(target) => target,
            Err(e) if e.kind() == ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        let inode: Option<u64> = target
            .to_str()
            .and_then(|t| t.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok());
        out.extend(inode);
    }
    Ok(out)
}

/// Named network namespaces (`ip netns` bind mounts under /run/netns), by inode.
pub fn netns_names(run_netns: &Path) -> Vec<(u64, String)> {
    let Ok(dir) = fs::read_dir(run_netns) else {
        return Vec::new();
    };
    dir.filter_map(|e| {
        let e = e.ok()?;
        let ino = fs::metadata(e.path()).ok()?.ino();
        Some((ino, e.file_name().to_string_lossy().into_owned()))
    })
    .collect()
}

/// NUL-separated fields (`cmdline`, `environ`); empty fields in the middle are kept so that
/// `-c ""` does not swallow the next flag.
fn split_nul(raw: &[u8]) -> Vec<String> {
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
pub mod tests {
    use super::*;
    use std::os::unix::fs::symlink;
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A fake procfs tree in a temp dir, removed on drop.
    pub struct FakeProc {
        pub root: PathBuf,
    }

    pub struct Proc<'a> {
        pub pid: u32,
        pub comm: &'a str,
        pub args: &'a [&'a str],
        pub exe: Option<&'a str>,
        pub cwd: &'a str,
        pub cgroup: String,
        pub start_time: u64,
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
        #[allow(clippy::new_without_default)]
        pub fn new() -> FakeProc {
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

        pub fn add(&self, p: Proc) -> &Self {
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
            fs::write(
                dir.join("environ"),
                b"HOME=/root\0XRAY_LOCATION_CONFDIR=/etc/xray/conf.d\0",
            )
            .unwrap();
            self
        }
    }

    impl Drop for FakeProc {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.root);
        }
    }

    pub fn hex(c: char) -> String {
        c.to_string().repeat(64)
    }

    #[test]
    fn cmdline_keeps_empty_arguments() {
        assert_eq!(split_nul(b"xray\0-c\0\0run\0"), ["xray", "-c", "", "run"]);
        assert!(split_nul(b"").is_empty());
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
        let p = read_process(&fp.root, 42).unwrap();
        assert_eq!(p.exe, "/opt/xray/xray");
        assert_eq!(p.cwd.as_deref(), Some("/opt/xray"));
        assert_eq!(p.start_time, 987654);
        assert_eq!(p.binary(), "xray");
        assert_eq!(
            p.env_var("XRAY_LOCATION_CONFDIR").as_deref(),
            Some("/etc/xray/conf.d")
        );
        assert_eq!(
            p.reasons,
            ["executable /opt/xray/xray", "command /opt/xray/xray"]
        );
        assert_eq!(read_process(&fp.root, 43), None);
    }

    #[test]
    fn candidates_by_comm_exe_or_argv0() {
        let fp = FakeProc::new();
        fp.add(Proc {
            pid: 1,
            comm: "v2ray",
            args: &["/x/bin", "run"],
            exe: None,
            ..Proc::default()
        })
        .add(Proc {
            pid: 2,
            comm: "worker",
            args: &["w"],
            exe: Some("/usr/bin/xray-core"),
            ..Proc::default()
        })
        .add(Proc {
            pid: 3,
            comm: "w",
            args: &["/usr/bin/v2fly"],
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
        assert_eq!(read_process(&fp.root, 1).unwrap().binary(), "bin");
        let missing = std::env::temp_dir().join(format!("raylimit-no-proc-{}", std::process::id()));
        assert!(scan(&missing).is_err());
    }

    #[test]
    fn socket_inodes_from_fd_links() {
        let fp = FakeProc::new();
        let fd = fp.root.join("7/fd");
        fs::create_dir_all(&fd).unwrap();
        for (n, target) in [
            ("0", "/dev/null"),
            ("1", "socket:[316388]"),
            ("2", "pipe:[5]"),
            ("3", "socket:[42]"),
            ("4", "anon_inode:[eventfd]"),
            ("5", "socket:[oops]"),
        ] {
            symlink(target, fd.join(n)).unwrap();
        }
        let inodes = socket_inodes(&fp.root, 7).unwrap();
        assert_eq!(inodes.into_iter().collect::<Vec<_>>(), [42, 316388]);
        assert!(socket_inodes(&fp.root, 8).is_err());
    }

    #[test]
    fn socket_inodes_of_this_process() {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        // A socket's inode is what fstat reports for its descriptor.
        let path = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&socket));
        let inode = fs::metadata(path).unwrap().ino();
        let inodes = socket_inodes(Path::new("/proc"), std::process::id()).unwrap();
        assert!(inodes.contains(&inode), "{inode} not in {inodes:?}");
    }

    #[test]
    fn the_real_proc_scans() {
        for p in scan(Path::new("/proc")).unwrap() {
            assert!(!p.args.is_empty() && !p.reasons.is_empty());
        }
        let own = fs::metadata("/proc/self/ns/net").unwrap().ino();
        assert!(netns_names(Path::new("/nonexistent")).is_empty());
        assert_ne!(own, 0);
    }
}

//! Commands and processes: unique names, a command's output or one line saying why it failed,
//! processes inside a namespace that are killed and reaped on drop (Debian's v2ray among them),
//! and directories removed on drop.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use super::need::{self, require};
use super::netns::Netns;

/// Debian's v2ray (scripts/setup.sh installs it): the real runtime of tests and benches.
pub const V2RAY_BIN: &str = "/usr/bin/v2ray";
pub const STRACE_BIN: &str = "/usr/bin/strace";

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A number no earlier call in this process returned.
pub fn next() -> u32 {
    COUNTER.fetch_add(1, Ordering::SeqCst)
}

/// `TAG-PID-N`: a name no other test of this process, nor any other process, uses at once.
pub fn unique(tag: &str) -> String {
    format!("{tag}-{}-{}", std::process::id(), next())
}

/// A command as one line: its program and arguments.
pub fn describe(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(OsStr::to_string_lossy)
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs `cmd` to completion (no stdin): its stdout, or one line naming the command and its
/// stderr (its exit status when stderr is empty).
pub fn output(cmd: &mut Command) -> Result<String, String> {
    let what = describe(cmd);
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{what}: {e}"))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let why = match err.trim() {
            "" => out.status.to_string(),
            e => e.to_string(),
        };
        return Err(format!("{what}: {why}"));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `args` and returns stdout; panics with the command and its stderr on failure.
#[track_caller]
pub fn run(args: &[&str]) -> String {
    output(Command::new(args[0]).args(&args[1..])).unwrap_or_else(|e| panic!("{e}"))
}

/// The kernel kills the child `cmd` starts when the thread that started it ends (a bench killed
/// with SIGKILL leaves nothing running that would go on changing a namespace).
pub fn die_with_parent(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: prctl is async-signal-safe and touches nothing of the parent's.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// A directory removed, with everything in it, on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    /// `$TMPDIR/TAG-PID-N`, not created yet (the program under test may create it).
    pub fn named(tag: &str) -> TempDir {
        TempDir(std::env::temp_dir().join(unique(tag)))
    }

    /// `path`, emptied of anything an earlier run left there and created.
    pub fn fresh(path: PathBuf) -> Result<TempDir, String> {
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(TempDir(path))
    }

    /// The path, no longer removed on drop.
    pub fn keep(self) -> PathBuf {
        std::mem::ManuallyDrop::new(self).0.clone()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A process started by this kit: killed and reaped on drop, then `remove` (a file or a
/// directory), when set, deleted.
pub struct Process {
    pub child: Child,
    pub remove: Option<PathBuf>,
}

impl Process {
    /// Starts `cmd` with its standard streams on /dev/null and waits up to 10 s until it runs
    /// as `comm` (its name in /proc once `ip netns exec` has exec'd it). An exit before that, or
    /// no start within 10 s, is an error; `abort` (checked while waiting) ends the wait too.
    pub fn spawn(
        cmd: &mut Command,
        comm: &str,
        abort: &dyn Fn() -> bool,
    ) -> Result<Process, String> {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let child = cmd
            .spawn()
            .map_err(|e| format!("{}: cannot start: {e}", describe(cmd)))?;
        let mut process = Process {
            child,
            remove: None,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if abort() {
                return Err(format!("{comm}: interrupted while starting"));
            }
            if let Ok(Some(status)) = process.child.try_wait() {
                return Err(format!("{comm} exited at start: {status}"));
            }
            if process.comm() == comm {
                return Ok(process);
            }
            if Instant::now() > deadline {
                return Err(format!("{comm} did not start within 10 s"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts `exe args` in `cwd` inside `ns` with `env` added, and waits until it runs under its
    /// own name and has not exited 300 ms later (a config the runtime rejects fails the test
    /// here, not later). `dir`, when given, is removed on drop.
    #[track_caller]
    pub fn start(
        ns: &Netns,
        exe: &Path,
        args: &[&str],
        cwd: &Path,
        env: &[(&str, &str)],
        dir: Option<PathBuf>,
    ) -> Process {
        let mut cmd = ns.exec(exe);
        cmd.args(args).current_dir(cwd).envs(env.iter().copied());
        let comm: String = exe
            .file_name()
            .unwrap()
            .to_string_lossy()
            .chars()
            .take(15)
            .collect();
        let mut process = Process::spawn(&mut cmd, &comm, &|| false)
            .unwrap_or_else(|e| panic!("{} {args:?}: {e}", exe.display()));
        process.remove = dir;
        std::thread::sleep(Duration::from_millis(300));
        assert!(
            process.child.try_wait().unwrap().is_none(),
            "{} {args:?} exited at start: its config was rejected",
            exe.display()
        );
        process
    }

    pub fn pid(&self) -> String {
        self.child.id().to_string()
    }

    /// Waits (up to 5 s) until the process's namespace has a TCP socket listening on `port`:
    /// a rule scoped to the runtime's listeners needs them to exist.
    pub fn wait_listening(&self, port: u16, abort: &dyn Fn() -> bool) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(5);
        let wanted = format!(":{port:04X} ");
        loop {
            let listening = ["tcp", "tcp6"].iter().any(|table| {
                let path = format!("/proc/{}/net/{table}", self.child.id());
                std::fs::read_to_string(path)
                    .unwrap_or_default()
                    .lines()
                    .any(|l| {
                        let fields: Vec<&str> = l.split_whitespace().collect();
                        fields.len() > 3
                            && format!("{} ", fields[1]).ends_with(&wanted)
                            && fields[3] == "0A"
                    })
            });
            if listening {
                return Ok(());
            }
            if abort() || Instant::now() >= deadline {
                return Err(format!("{} is not listening on port {port}", self.comm()));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn comm(&self) -> String {
        std::fs::read_to_string(format!("/proc/{}/comm", self.child.id()))
            .unwrap_or_default()
            .trim()
            .to_string()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(path) = &self.remove {
            if path.is_dir() {
                let _ = std::fs::remove_dir_all(path);
            } else {
                let _ = std::fs::remove_file(path);
            }
        }
    }
}

/// Debian's v2ray inside a namespace with a socks inbound on 127.0.0.1 and a freedom outbound,
/// from a private config file; killed and reaped on drop, and its config removed.
pub struct V2ray {
    pub process: Process,
    pub config: PathBuf,
}

impl V2ray {
    /// A test's runtime: its config in the temporary directory, its socks port one of this
    /// process's own.
    #[track_caller]
    pub fn start(ns: &Netns) -> V2ray {
        require(&[&[need::V2RAY]]);
        let config = std::env::temp_dir().join(format!("{}-v2ray-{}.json", ns.name, next()));
        let port = 10000 + next() % 50000;
        V2ray::start_with(ns, config, port as u16, &|| false).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Writes the config to `config` with the socks inbound on `port` and starts v2ray on it in
    /// `ns` (with the namespace's [`super::NetnsOptions`]); `abort` ends the wait for its start.
    pub fn start_with(
        ns: &Netns,
        config: PathBuf,
        port: u16,
        abort: &dyn Fn() -> bool,
    ) -> Result<V2ray, String> {
        std::fs::write(
            &config,
            r#"{"log":{"loglevel":"warning"},
                "inbounds":[{"tag":"socks-in","listen":"127.0.0.1","port":PORT,"protocol":"socks","settings":{"udp":false}}],
                "outbounds":[{"tag":"direct","protocol":"freedom"}]}"#
                .replace("PORT", &port.to_string()),
        )
        .map_err(|e| format!("{}: {e}", config.display()))?;
        let mut cmd = ns.exec(V2RAY_BIN);
        cmd.arg("-config").arg(&config);
        let mut process = Process::spawn(&mut cmd, "v2ray", abort).inspect_err(|_| {
            let _ = std::fs::remove_file(&config);
        })?;
        process.remove = Some(config.clone());
        process.wait_listening(port, abort)?;
        Ok(V2ray { process, config })
    }

    pub fn pid(&self) -> String {
        self.process.pid()
    }
}

//! What a privileged test or bench needs from the machine, checked at its start: a test that
//! cannot run fails with one line naming what is missing (it is never skipped), instead of
//! panicking deep inside with an obscure error.
//!
//! ```ignore
//! require(&[need::NAMESPACE, need::DOWNLOAD, &[need::VETH]]);
//! ```

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use super::process::{STRACE_BIN, V2RAY_BIN};

/// One thing a test needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// Root with CAP_NET_ADMIN and CAP_SYS_ADMIN, effective and in the bounding set (so the
    /// programs it runs, `ip` and `tc`, have them too).
    Root,
    /// Network namespaces (`ip netns add`).
    Netns,
    /// A program: a bare name is looked up on PATH, a path must be an executable file.
    Program(&'static str),
    /// A kernel module, by its module name, loaded, loadable or built in.
    Module(&'static str),
    /// A mounted cgroup v1 hierarchy of this controller.
    CgroupV1(&'static str),
}

pub const ROOT: Need = Need::Root;
pub const NETNS: Need = Need::Netns;
pub const IP: Need = Need::Program("ip");
pub const TC: Need = Need::Program("tc");
pub const SS: Need = Need::Program("ss");
pub const NFT: Need = Need::Program("nft");
pub const V2RAY: Need = Need::Program(V2RAY_BIN);
pub const STRACE: Need = Need::Program(STRACE_BIN);
pub const SETPRIV: Need = Need::Program("setpriv");
pub const VETH: Need = Need::Module("veth");
pub const HTB: Need = Need::Module("sch_htb");
pub const U32: Need = Need::Module("cls_u32");
pub const MIRRED: Need = Need::Module("act_mirred");
/// clsact (and ingress) live in sch_ingress.
pub const CLSACT: Need = Need::Module("sch_ingress");
pub const IFB: Need = Need::Module("ifb");
pub const NF_TABLES: Need = Need::Module("nf_tables");
pub const NFT_NAT: Need = Need::Module("nft_nat");
pub const PIDS_CGROUP: Need = Need::CgroupV1("pids");

/// A private network namespace (`Netns::new`).
pub const NAMESPACE: &[Need] = &[ROOT, NETNS, IP];
/// Namespaces with veth devices, Debian's v2ray as the runtime, and tc as the oracle.
pub const RUNTIME_HOST: &[Need] = &[ROOT, NETNS, IP, TC, VETH, V2RAY];
/// Download shaping as raylimit does it: HTB classes chosen by u32 filters.
pub const DOWNLOAD: &[Need] = &[HTB, U32];
/// The ingress redirect upload shaping starts with: clsact, a u32 filter's mirred into an IFB.
pub const REDIRECT: &[Need] = &[CLSACT, MIRRED, IFB];
/// Upload shaping as raylimit does it: the redirect, then HTB and u32 on the IFB.
pub const UPLOAD: &[Need] = &[HTB, U32, CLSACT, MIRRED, IFB];

/// The kernel modules a test may name: module, configuration key, what it provides.
const MODULES: &[(&str, &str, &str)] = &[
    ("veth", "CONFIG_VETH", "veth pairs"),
    ("sch_htb", "CONFIG_NET_SCH_HTB", "the htb qdisc"),
    ("cls_u32", "CONFIG_NET_CLS_U32", "the u32 classifier"),
    ("act_mirred", "CONFIG_NET_ACT_MIRRED", "the mirred action"),
    (
        "sch_ingress",
        "CONFIG_NET_SCH_INGRESS",
        "the clsact and ingress qdiscs",
    ),
    ("ifb", "CONFIG_IFB", "IFB devices"),
    ("nf_tables", "CONFIG_NF_TABLES", "nftables"),
    ("nft_nat", "CONFIG_NFT_NAT", "nftables NAT (dnat)"),
];

/// Panics with one line naming everything in `needs` (sets of them, e.g. `&[NAMESPACE, &[TC]]`)
/// this machine lacks; returns when nothing is missing.
#[track_caller]
pub fn require(needs: &[&[Need]]) {
    if let Some(line) = missing(needs) {
        panic!("{line}");
    }
}

/// One line naming everything in `needs` this machine lacks (`; ` between them), or `None`.
pub fn missing(needs: &[&[Need]]) -> Option<String> {
    let mut seen: Vec<Need> = Vec::new();
    let mut lines: Vec<String> = Vec::new();
    for need in needs.iter().copied().flatten() {
        if seen.contains(need) {
            continue;
        }
        seen.push(*need);
        if let Some(line) = check(*need) {
            lines.push(line);
        }
    }
    (!lines.is_empty()).then(|| lines.join("; "))
}

fn check(need: Need) -> Option<String> {
    match need {
        Need::Root => root(),
        Need::Netns => netns(),
        Need::Program(p) => program(p),
        Need::Module(m) => module(m),
        Need::CgroupV1(c) => {
            let dir = format!("/sys/fs/cgroup/{c}");
            (!Path::new(&dir).join("cgroup.procs").exists())
                .then(|| format!("needs the cgroup v1 \"{c}\" hierarchy mounted at {dir}"))
        }
    }
}

const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;

/// A capability set of this process from /proc/self/status (`CapEff`, `CapBnd`).
fn capabilities(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0)
}

fn root() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("needs root (CAP_NET_ADMIN, CAP_SYS_ADMIN): run as root".into());
    }
    let held = capabilities("CapEff") & capabilities("CapBnd");
    let lacking: Vec<&str> = [
        (CAP_NET_ADMIN, "CAP_NET_ADMIN"),
        (CAP_SYS_ADMIN, "CAP_SYS_ADMIN"),
    ]
    .iter()
    .filter(|(bit, _)| held & (1 << bit) == 0)
    .map(|(_, name)| *name)
    .collect();
    (!lacking.is_empty()).then(|| {
        format!(
            "needs root with {}, which this process lacks (capabilities dropped): run as root with all capabilities",
            lacking.join(" and ")
        )
    })
}

fn netns() -> Option<String> {
    let off = config().is_some_and(|(_, c)| config_value(c, "CONFIG_NET_NS").is_none());
    (off || !Path::new("/proc/self/ns/net").exists())
        .then(|| "needs network namespaces: this kernel has none (CONFIG_NET_NS)".into())
}

fn executable(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

fn program(p: &str) -> Option<String> {
    let found = if p.contains('/') {
        executable(Path::new(p))
    } else {
        std::env::var_os("PATH")
            .is_some_and(|path| std::env::split_paths(&path).any(|d| executable(&d.join(p))))
    };
    if found {
        return None;
    }
    let name = p.rsplit('/').next().unwrap_or(p);
    let package = match name {
        "ip" | "tc" | "ss" => "iproute2",
        "nft" => "nftables",
        other => other,
    };
    let place = if p.contains('/') {
        format!(" at {p}")
    } else {
        " on PATH".into()
    };
    Some(format!(
        "needs the program \"{name}\"{place} (apt-get install {package}; scripts/setup.sh installs it)"
    ))
}

/// The running kernel's configuration and where it was read: /proc/config.gz, else
/// /boot/config-RELEASE.
fn config() -> Option<&'static (PathBuf, String)> {
    static CONFIG: OnceLock<Option<(PathBuf, String)>> = OnceLock::new();
    CONFIG
        .get_or_init(|| {
            let gz = PathBuf::from("/proc/config.gz");
            let mut text = String::new();
            if let Ok(f) = std::fs::File::open(&gz) {
                if flate2::read::GzDecoder::new(f)
                    .read_to_string(&mut text)
                    .is_ok()
                {
                    return Some((gz, text));
                }
            }
            let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").ok()?;
            let boot = PathBuf::from(format!("/boot/config-{}", release.trim()));
            Some((boot.clone(), std::fs::read_to_string(boot).ok()?))
        })
        .as_ref()
}

/// `y` or `m` for a key the configuration sets, `None` for one it does not.
fn config_value<'a>(config: &'a str, key: &str) -> Option<&'a str> {
    config
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
        .filter(|v| *v != "n")
}

/// A module is there when /sys/module has it (loaded, or built in with parameters) or when the
/// kernel's configuration builds it (y) or as a module the kernel loads on first use (m). Where
/// no configuration can be read, nothing says it is missing: the kernel's own answer decides.
fn module(m: &str) -> Option<String> {
    let (_, key, what) = MODULES
        .iter()
        .find(|(name, _, _)| *name == m)
        .unwrap_or_else(|| panic!("kit::need: no configuration key known for module {m}"));
    if Path::new("/sys/module").join(m).exists() {
        return None;
    }
    let (path, text) = config()?;
    config_value(text, key).is_none().then(|| {
        format!(
            "needs the kernel module {m} ({what}): {key} is not set in {}",
            path.display()
        )
    })
}

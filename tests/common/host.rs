//! A namespace with a veth pair and a real runtime, driven through the real binary, and the
//! kernel state as tc and ip show it (the oracle a test compares before and after).

use serde_json::Value;

use super::*;

/// A namespace with a veth device and a real V2Ray runtime in it.
pub struct Host {
    pub ns: Netns,
    pub runtime: V2ray,
    pub state: StateDir,
}

impl Host {
    pub fn new(tag: &str) -> Self {
        let (ns, runtime) = veth_host(tag);
        Host {
            ns,
            runtime,
            state: state_dir(tag),
        }
    }

    pub fn run(&self, args: &[&str]) -> (i32, String, String) {
        let mut full = vec!["--netns", &self.ns.name];
        full.extend_from_slice(args);
        raylimit_in(&self.state, &full)
    }

    /// `limit --pid <runtime> --device veth-a` plus `args`.
    pub fn limit(&self, args: &[&str]) -> (i32, String, String) {
        let pid = self.runtime.pid();
        let mut full = vec!["limit", "--pid", &pid, "--device", "veth-a"];
        full.extend_from_slice(args);
        self.run(&full)
    }

    /// `limit ... --execute` with `args`, which must succeed.
    pub fn executed(&self, args: &[&str]) {
        let mut full = args.to_vec();
        full.push("--execute");
        let (code, out, err) = self.limit(&full);
        assert_eq!(code, 0, "{args:?}: {err}\n{out}");
    }

    pub fn limit_json(&self, args: &[&str]) -> Value {
        let mut full = args.to_vec();
        full.extend_from_slice(&["--format", "json"]);
        let (code, out, err) = self.limit(&full);
        assert_eq!(code, 0, "{args:?}: {err}\n{out}");
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
    }

    /// Everything tc shows for the namespace's devices (the oracle for "unchanged").
    pub fn kernel_state(&self) -> String {
        let mut s = self.ns.tc(&["qdisc", "show"]);
        for dev in ["veth-a", "veth-b"] {
            s += &self.ns.tc(&["class", "show", "dev", dev]);
            s += &self.ns.tc(&["filter", "show", "dev", dev]);
            s += &self.ns.tc(&["filter", "show", "dev", dev, "ingress"]);
        }
        s += &self.ns.ip(&["-br", "link", "show"]);
        // HTB counts packets it passes unshaped even in `tc qdisc show`; that is traffic, not state.
        s.lines()
            .map(|l| match l.find(" direct_packets_stat ") {
                Some(i) => {
                    let rest = &l[i + 21..];
                    let after = rest.find(' ').map(|j| &rest[j..]).unwrap_or("");
                    format!("{}{after}\n", &l[..i])
                }
                None => format!("{l}\n"),
            })
            .collect()
    }
}

/// Asserts two kernel states are equal, showing only the first difference.
pub fn same_state(now: &str, before: &str, what: &str) {
    if let Some((a, b)) = now.lines().zip(before.lines()).find(|(a, b)| a != b) {
        panic!("{what} changed the kernel: {b:?} became {a:?}");
    }
    assert_eq!(
        now.lines().count(),
        before.lines().count(),
        "{what} changed the kernel"
    );
}

/// Runs every `repair:` command a status printed, as an operator would paste it.
pub fn run_repairs(state: &StateDir, status: &str) {
    let bin = std::path::Path::new(env!("CARGO_BIN_EXE_raylimit"));
    let path = format!(
        "{}:{}",
        bin.parent().unwrap().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    for cmd in status
        .lines()
        .filter_map(|l| l.trim().strip_prefix("repair: "))
    {
        let out = std::process::Command::new("sh")
            .args(["-c", cmd])
            .env("PATH", &path)
            .env("RAYLIMIT_STATE_DIR", &state.0)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{cmd}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

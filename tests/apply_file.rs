//! `raylimit apply --file`: a declarative policy for one real runtime, in JSON and TOML, dry-run
//! first, executed, repeated as `no_op`, pruned, and refused whole when one limit is invalid.

mod common;

use common::*;

struct Host {
    ns: Netns,
    runtime: V2ray,
    state: StateDir,
    dir: std::path::PathBuf,
}

impl Host {
    fn new(tag: &str) -> Self {
        let (ns, runtime) = veth_host(tag);
        Host {
            ns,
            runtime,
            state: StateDir::new(tag),
            dir: temp_dir(&format!("{tag}-policy")),
        }
    }

    /// Writes `body` as `name` and runs `apply --file` on it with `extra` flags.
    fn apply(&self, name: &str, body: &str, extra: &[&str]) -> (i32, String, String) {
        let path = self.dir.join(name);
        std::fs::write(&path, body.replace("PID", &self.runtime.pid())).unwrap();
        let path = path.to_string_lossy().into_owned();
        let mut args = vec!["--netns", &self.ns.name, "apply", "--file", &path];
        args.extend_from_slice(extra);
        raylimit_in(&self.state, &args)
    }

    fn kernel(&self) -> String {
        let mut s = self.ns.tc(&["qdisc", "show"]);
        s += &self.ns.tc(&["filter", "show", "dev", "veth-a"]);
        s += &self.ns.ip(&["link", "show"]);
        s
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

const THREE: &str = r#"{"runtime": {"pid": PID}, "limits": [
  {"ip": "10.9.0.7", "device": "veth-a", "direction": "download", "rate": "1mbit"},
  {"ip": "10.9.0.8", "device": "veth-a", "direction": "upload", "rate": 50000},
  {"inbound": "socks-in", "device": "veth-a", "direction": "download", "rate": 80000}]}"#;

const TWO_TOML: &str = r#"[runtime]
pid = PID

[[limits]]
ip = "10.9.0.7"
device = "veth-a"
direction = "download"
rate = "1mbit"

[[limits]]
inbound = "socks-in"
device = "veth-a"
direction = "download"
rate = 80000
"#;

#[test]
fn a_policy_is_planned_applied_repeated_as_no_op_and_pruned() {
    let h = Host::new("apf");
    let before = h.kernel();
    let (code, out, err) = h.apply("p.json", THREE, &[]);
    assert_eq!(code, 0, "{err}\n{out}");
    assert!(
        out.contains("3 limit(s), 0 pruned: 0 no changes, 3 planned"),
        "{out}"
    );
    assert_eq!(h.kernel(), before, "a dry-run changes nothing");

    let (code, out, err) = h.apply("p.json", THREE, &["--execute"]);
    assert_eq!(code, 0, "{err}\n{out}");
    assert!(out.contains("3 executed"), "{out}");
    assert!(h.ns.ip(&["link", "show"]).contains("rlifb"));

    let (code, out, _) = h.apply("p.json", THREE, &["--execute", "--format", "json"]);
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    for l in v["limits"].as_array().unwrap() {
        assert_eq!(l["report"]["decision"]["kind"], "no_op", "{l}");
    }

    // The same limits but the upload one, in TOML, with --prune: that one goes, IFB included.
    let (code, out, err) = h.apply("p.toml", TWO_TOML, &["--execute", "--prune"]);
    assert_eq!(code, 0, "{err}\n{out}");
    assert!(out.contains("2 limit(s), 1 pruned: 2 no changes"), "{out}");
    assert!(
        out.contains("=== prune: ip 10.9.0.8 upload on veth-a"),
        "{out}"
    );
    assert!(!h.ns.ip(&["link", "show"]).contains("rlifb"));
    let (_, again, _) = h.apply("p.toml", TWO_TOML, &["--execute", "--prune"]);
    assert!(
        again.contains("2 limit(s), 0 pruned: 2 no changes"),
        "{again}"
    );

    // An invalid limit anywhere refuses the whole file before anything changes.
    let kernel = h.kernel();
    let bad = THREE.replace("\"rate\": 50000", "\"rate\": \"fast\"");
    let (code, out, err) = h.apply("bad.json", &bad, &["--execute"]);
    assert_eq!((code, out.as_str()), (2, ""), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("limits[1]"), "{err}");
    let (code, _, err) = h.apply("bad.json", r#"{"limits": [{"ipp": "1.2.3.4"}]}"#, &[]);
    assert_eq!(code, 2);
    assert!(err.contains("unknown key \"ipp\""), "{err}");
    let (code, _, err) = h.apply("bad.toml", "limits = [", &[]);
    assert_eq!(code, 2);
    assert!(err.contains("not valid TOML"), "{err}");
    assert_eq!(h.kernel(), kernel);

    let empty = r#"{"runtime": {"pid": PID}, "limits": [
      {"ip": "10.9.0.7", "device": "veth-a", "direction": "download", "remove": true},
      {"inbound": "socks-in", "device": "veth-a", "direction": "download", "remove": true}]}"#;
    let (code, out, err) = h.apply("rm.json", empty, &["--execute"]);
    assert_eq!(code, 0, "{err}\n{out}");
    assert!(!h.ns.tc(&["qdisc", "show", "dev", "veth-a"]).contains("htb"));
}

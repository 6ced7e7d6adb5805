//! `raylimit limit` and `status` through the real binary, without traffic: validation and exit
//! codes, both report formats, subjects, ownership, rollback, the lock, scale, and never spawning.

mod common;

use std::collections::BTreeSet;
use std::os::fd::AsRawFd;
use std::process::Command;
use std::time::Duration;

use common::host::{run_repairs, same_state, Host};
use common::*;
use serde_json::Value;

fn usage_error(host: &Host, args: &[&str], expected: &str) {
    let before = host.kernel_state();
    let (code, out, err) = host.run(args);
    assert_eq!(code, 2, "{args:?}: {err}");
    assert_eq!(err.lines().count(), 1, "{args:?}: not one line: {err}");
    assert!(
        err.contains(expected),
        "{args:?}: {err:?} lacks {expected:?}"
    );
    assert!(out.is_empty(), "{out}");
    same_state(&host.kernel_state(), &before, &format!("{args:?}"));
}

#[test]
fn every_invalid_request_is_one_line_exit_2_and_changes_nothing() {
    require(&[need::RUNTIME_HOST]);
    let h = Host::new("val");
    let pid = h.runtime.pid();
    let p = pid.as_str();
    let base = |extra: &[&'static str]| -> Vec<String> {
        let mut v: Vec<String> = [
            "limit",
            "--pid",
            p,
            "--device",
            "veth-a",
            "--direction",
            "download",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            base(&["--ip", "10.0.0.1", "--rate", "1", "--format", "yaml"]),
            "yaml",
        ),
        (
            base(&["--ip", "10.0.0.1", "--rate", "1", "--source", "kubernetes"]),
            "unknown --source",
        ),
        (
            vec![
                "limit".into(),
                "--pid".into(),
                "-3".into(),
                "--ip".into(),
                "10.0.0.1".into(),
                "--device".into(),
                "veth-a".into(),
                "--direction".into(),
                "download".into(),
                "--rate".into(),
                "1".into(),
            ],
            "not a process id",
        ),
        (
            vec![
                "limit".into(),
                "--ip".into(),
                "10.0.0.1".into(),
                "--device".into(),
                "veth-a".into(),
                "--direction".into(),
                "download".into(),
                "--rate".into(),
                "1".into(),
            ],
            "choose the runtime",
        ),
        (
            base(&["--container", "abc", "--ip", "10.0.0.1", "--rate", "1"]),
            "--pid and --container",
        ),
        (
            base(&[
                "--source",
                "docker_container",
                "--ip",
                "10.0.0.1",
                "--rate",
                "1",
            ]),
            "--source docker_container",
        ),
        (
            vec![
                "limit".into(),
                "--container".into(),
                "abc".into(),
                "--source".into(),
                "host_process".into(),
                "--ip".into(),
                "10.0.0.1".into(),
                "--device".into(),
                "veth-a".into(),
                "--direction".into(),
                "download".into(),
                "--rate".into(),
                "1".into(),
            ],
            "--source host_process",
        ),
        (
            base(&["--name", "v2ray", "--ip", "10.0.0.1", "--rate", "1"]),
            "exactly one of --pid, --container or --name",
        ),
        (base(&["--rate", "1"]), "choose what to limit"),
        (base(&["--ip", "  ", "--rate", "1"]), "choose what to limit"),
        (
            base(&["--ip", "10.0.0.1", "--inbound", "in", "--rate", "1"]),
            "exactly one target",
        ),
        (
            base(&["--ip", "all", "--ip-aggregation", "foo", "--rate", "1"]),
            "shared or per_ip",
        ),
        (
            base(&["--outbound", "o", "--mark-mask", "0", "--rate", "1"]),
            "would read no mark bits",
        ),
        (
            base(&["--outbound", "o", "--mark-mask", "0xzz", "--rate", "1"]),
            "not a 32-bit mask",
        ),
        (
            base(&["--ip", "10.0.0.1", "--mark-mask", "0xff", "--rate", "1"]),
            "--mark-mask only applies to --outbound",
        ),
        (
            base(&["--connection", "10.0.0.1", "--rate", "1"]),
            "not a client IP:PORT",
        ),
        (base(&["--uuid", "u", "--unlimited"]), "needs --ip ADDRESS"),
        (
            base(&[
                "--ip",
                "10.0.0.1",
                "--ip-aggregation",
                "shared",
                "--rate",
                "1",
            ]),
            "only applies to --ip all",
        ),
        (
            base(&["--ip", "1.2.3", "--rate", "1"]),
            "neither an IP address",
        ),
        (
            base(&["--ip", "fe80::1%eth0", "--rate", "1"]),
            "neither an IP address",
        ),
        (
            vec![
                "limit".into(),
                "--pid".into(),
                p.into(),
                "--ip".into(),
                "10.0.0.1".into(),
                "--direction".into(),
                "download".into(),
                "--rate".into(),
                "1".into(),
            ],
            "--device is required",
        ),
        (
            vec![
                "limit".into(),
                "--pid".into(),
                p.into(),
                "--ip".into(),
                "10.0.0.1".into(),
                "--device".into(),
                "veth-a".into(),
                "--rate".into(),
                "1".into(),
            ],
            "--direction is required",
        ),
        (
            vec![
                "limit".into(),
                "--pid".into(),
                p.into(),
                "--ip".into(),
                "10.0.0.1".into(),
                "--device".into(),
                "veth-a".into(),
                "--direction".into(),
                "both".into(),
                "--rate".into(),
                "1".into(),
            ],
            "upload or download, not \"both\"",
        ),
        (
            base(&["--ip", "10.0.0.1", "--unlimited", "--remove"]),
            "contradict",
        ),
        (base(&["--ip", "all", "--unlimited"]), "needs --ip ADDRESS"),
        (
            base(&["--ip", "all", "--scope", "wide", "--rate", "5"]),
            "--scope must be runtime or device, not \"wide\"",
        ),
        (
            base(&["--inbound", "socks-in", "--scope", "device", "--rate", "5"]),
            "--scope applies to client rules",
        ),
        (
            base(&["--ip", "10.0.0.1", "--remove", "--rate", "5"]),
            "no meaning with --remove",
        ),
        (
            base(&["--ip", "10.0.0.1", "--unlimited", "--rate", "5"]),
            "--rate and --unlimited",
        ),
        (base(&["--ip", "10.0.0.1"]), "give --rate"),
        (base(&["--ip", "10.0.0.1", "--rate", "0"]), "below 1 byte/s"),
        (
            base(&["--ip", "10.0.0.1", "--rate", "10mbps"]),
            "ambiguous: bits or bytes per second? Write 10mbit for bits or 10MB/s for bytes",
        ),
        (base(&["--ip", "10.0.0.1", "--rate", "-5"]), "negative"),
        (
            base(&["--ip", "10.0.0.1", "--rate", "fast"]),
            "not a number",
        ),
        (
            base(&["--ip", "10.0.0.1", "--rate", "18446744073709551616"]),
            "beyond 2^64-1",
        ),
        (
            base(&["--ip", "10.0.0.1", "--rate", "5 furlongs"]),
            "unknown unit",
        ),
        (
            base(&[
                "--ip",
                "10.0.0.1",
                "--rate",
                "1",
                "--allow-missing-tc-state",
            ]),
            "only matters with --execute",
        ),
        (
            base(&["--ip", "10.0.0.1", "--rate", "1", "--direction", "upload"]),
            "cannot be used multiple times",
        ),
        (
            base(&["--ip", "10.0.0.1", "--rate", "1", "--bogus"]),
            "--bogus",
        ),
        (
            vec![
                "limit".into(),
                "--pid".into(),
                p.into(),
                "--ip".into(),
                "10.0.0.1".into(),
                "--device".into(),
                "a-name-longer-than-ifnamsiz".into(),
                "--direction".into(),
                "download".into(),
                "--rate".into(),
                "1".into(),
            ],
            "at most 15",
        ),
        (
            vec![
                "limit".into(),
                "--pid".into(),
                p.into(),
                "--ip".into(),
                "10.0.0.1".into(),
                "--device".into(),
                "rl-nosuch0".into(),
                "--direction".into(),
                "download".into(),
                "--rate".into(),
                "1".into(),
            ],
            "no network device named \"rl-nosuch0\" in network namespace",
        ),
        (
            base(&[
                "--ip",
                "10.0.0.1",
                "--rate",
                "1",
                "--execute",
                "--device",
                "veth-a",
            ]),
            "cannot be used multiple times",
        ),
    ];
    for (args, expected) in &cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        usage_error(&h, &args, expected);
    }
    // The device is looked up in the selected namespace: veth-a does not exist outside it.
    let (code, _, err) = raylimit_in(
        &h.state,
        &[
            "limit",
            "--pid",
            p,
            "--device",
            "veth-a",
            "--direction",
            "download",
            "--ip",
            "10.0.0.1",
            "--rate",
            "1",
        ],
    );
    assert_eq!((code, err.lines().count()), (2, 1), "{err}");
    // A runtime that is not there is a refusal, not a usage error.
    let (code, _, err) = h.run(&[
        "limit",
        "--pid",
        "999999999",
        "--device",
        "veth-a",
        "--direction",
        "download",
        "--ip",
        "10.0.0.1",
        "--rate",
        "1",
    ]);
    assert_eq!((code, err.lines().count()), (1, 1), "{err}");
    assert!(err.contains("no Xray or V2Ray runtime"), "{err}");
}

#[test]
fn text_and_json_reports_carry_every_section() {
    require(&[need::RUNTIME_HOST]);
    let h = Host::new("rep");
    let (code, out, err) = h.limit(&[
        "--ip",
        "10.9.0.7",
        "--direction",
        "upload",
        "--rate",
        "512KiB/s",
    ]);
    assert_eq!(code, 0, "{err}");
    let mut last = 0;
    for section in [
        "Request:",
        "Requested state:",
        "Observation:",
        "Decision:",
        "Plan:",
        "Execution:",
        "Outcome: plan ready",
    ] {
        let at = out
            .find(section)
            .unwrap_or_else(|| panic!("{section} missing:\n{out}"));
        assert!(at >= last, "{section} out of order:\n{out}");
        last = at;
    }
    // A dry-run says in one line that nothing ran, and ends with the command that executes it.
    assert!(
        out.contains("Execution results: not run (dry-run): ") && !out.contains(": skipped"),
        "{out}"
    );
    let execute = format!(
        "To execute it: raylimit --netns {} limit --pid {} --device veth-a --ip 10.9.0.7 --direction upload --rate 512KiB/s --execute",
        h.ns.name,
        h.runtime.pid()
    );
    assert_eq!(out.lines().last(), Some(execute.as_str()), "{out}");
    assert!(
        out.contains("Requested limit: upload 524288 bytes/s on veth-a (4.19 Mbit/s)"),
        "{out}"
    );
    assert!(out.contains("Mode: dry-run"));
    assert!(
        out.contains(&format!("Runtime: host process {}", h.runtime.pid())),
        "{out}"
    );
    assert!(out.contains("Reconcile decision: apply"));
    // The plan in tc/ip notation, in an order that never sends traffic to a missing class.
    let mut last_step = 0;
    // The commands carry the namespace, so they can be pasted.
    assert!(
        out.contains(&format!("1. ip -n {} link add rlifb", h.ns.name)),
        "{out}"
    );
    assert!(
        out.contains(&format!(". tc -n {} qdisc add dev rlifb", h.ns.name)),
        "{out}"
    );
    for (i, op) in [
        "link add rlifb",
        "qdisc add dev rlifb",
        "class add dev rlifb",
        "u32 divisor 256",
        "link 5:",
        "link 500:",
        "match ip src 10.9.0.7/32",
        "qdisc add dev veth-a clsact",
        "action mirred egress redirect dev rlifb",
    ]
    .iter()
    .enumerate()
    {
        let line = out
            .lines()
            .find(|l| l.contains(op))
            .unwrap_or_else(|| panic!("{op} missing:\n{out}"));
        let number: usize = line
            .trim_start()
            .split('.')
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("not a numbered step: {line}"));
        assert!(
            (i == 0 && number == 1) || number > last_step,
            "{op} out of order: {line}"
        );
        last_step = number;
    }

    let v = h.limit_json(&[
        "--ip",
        "10.9.0.7",
        "--direction",
        "upload",
        "--rate",
        "512KiB/s",
    ]);
    for key in [
        "mode",
        "operation",
        "runtime",
        "target",
        "scope",
        "rate_bytes_per_second",
        "observation",
        "decision",
        "execution_blocked",
        "plan",
        "results",
    ] {
        assert!(v.get(key).is_some(), "{key} missing: {v}");
    }
    assert_eq!(v["mode"], "dry-run");
    assert_eq!(v["operation"], "limit");
    assert_eq!(
        v["target"],
        serde_json::json!({"kind": "ip", "value": "10.9.0.7"})
    );
    assert_eq!(v["scope"]["direction"], "upload");
    // An address rule matches the client's packets on the runtime's listeners, and the report
    // names them.
    assert_eq!(v["scope"]["match"], "runtime_listeners");
    assert!(
        v["scope"]["description"]
            .as_str()
            .is_some_and(|d| d.starts_with("runtime listeners 127.0.0.1:")),
        "{}",
        v["scope"]
    );
    assert_eq!(v["rate_bytes_per_second"], 524288);
    assert_eq!(v["decision"]["kind"], "apply");
    assert_eq!(v["runtime"]["source"], "host_process");
    assert_eq!(
        v["runtime"]["host_process"]["pid"],
        h.runtime.process.child.id()
    );
    assert!(v["runtime"]["owner"]
        .as_str()
        .unwrap()
        .starts_with("host:/usr/bin/v2ray config="));
    assert!(v["results"]
        .as_array()
        .unwrap()
        .iter()
        .all(|r| r["skipped"] == true));

    let (code, out, _) = h.limit(&[
        "--ip",
        "all",
        "--ip-aggregation",
        "per_ip",
        "--direction",
        "download",
        "--rate",
        "1000",
    ]);
    // The runtime has no client connected: nothing to expand, which is not an error.
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("Per-IP evidence state: no_sessions"), "{out}");
    assert!(out.contains("Session evidence state: no_sessions"), "{out}");
    assert!(out.contains("Visible client IPs: 0"), "{out}");
    assert!(out.contains("Outcome: no changes"), "{out}");
    let v = h.limit_json(&[
        "--ip",
        "all",
        "--ip-aggregation",
        "per_ip",
        "--direction",
        "download",
        "--rate",
        "1000",
    ]);
    assert_eq!(v["per_ip_expansion"]["state"], "no_sessions");
    assert_eq!(v["per_ip_expansion"]["client_ips"], serde_json::json!([]));
    assert_eq!(v["execution_blocked"], false);
    let (code, _, err) = h.limit(&[
        "--ip",
        "all",
        "--ip-aggregation",
        "per_ip",
        "--direction",
        "download",
        "--rate",
        "1000",
        "--execute",
    ]);
    assert_eq!((code, err.as_str()), (0, ""));
}

#[test]
fn textual_variants_of_one_address_are_one_rule() {
    require(&[need::RUNTIME_HOST, need::DOWNLOAD]);
    let h = Host::new("var");
    let v = h.limit_json(&[
        "--ip",
        "::ffff:10.9.0.7",
        "--direction",
        "download",
        "--rate",
        "1000",
        "--execute",
    ]);
    assert_eq!(v["target"]["value"], "10.9.0.7");
    assert_eq!(v["decision"]["kind"], "apply");
    assert_eq!(
        h.limit_json(&[
            "--ip",
            "10.9.0.7",
            "--direction",
            "download",
            "--rate",
            "1000"
        ])["decision"]["kind"],
        "no_op"
    );
    // The runtime listens on 127.0.0.1 only: an IPv6 client reaches it on no listener, so its
    // rule is device-wide here.
    h.limit_json(&[
        "--ip",
        "fd00:99::7",
        "--direction",
        "download",
        "--rate",
        "1000",
        "--scope",
        "device",
        "--execute",
    ]);
    let v = h.limit_json(&[
        "--ip",
        "FD00:0099:0:0::7",
        "--direction",
        "download",
        "--rate",
        "1000",
        "--scope",
        "device",
    ]);
    assert_eq!(v["decision"]["kind"], "no_op", "{v}");
    // The IPv6 rule sits in its own priority (301) next to IPv4's (300).
    let filters = h.ns.tc(&["filter", "show", "dev", "veth-a"]);
    assert!(
        filters.contains("protocol ipv6 pref 301") && filters.contains("protocol ip pref 300"),
        "{filters}"
    );
    assert!(
        filters.contains("match fd000099/ffffffff at 24"),
        "{filters}"
    );
}

#[test]
fn another_runtimes_rule_is_not_touched() {
    require(&[need::RUNTIME_HOST, need::DOWNLOAD]);
    let h = Host::new("own");
    h.limit_json(&[
        "--ip",
        "10.9.0.7",
        "--direction",
        "download",
        "--rate",
        "1000",
        "--execute",
    ]);
    let other = V2ray::start(&h.ns);
    let before = h.kernel_state();
    let (code, out, err) = h.run(&[
        "limit",
        "--pid",
        &other.pid(),
        "--device",
        "veth-a",
        "--ip",
        "10.9.0.7",
        "--direction",
        "download",
        "--remove",
        "--execute",
    ]);
    // The other runtime has no rule of its own for the address: nothing to remove, and the
    // first runtime's rule (on its own listener) is left as it was.
    assert_eq!(code, 0, "{err}\n{out}");
    assert!(
        out.contains("no rule for ip 10.9.0.7 download was observed"),
        "{out}"
    );
    same_state(&h.kernel_state(), &before, "another runtime's remove");
    // Device-wide, the same address cannot be told apart by listener: refused.
    let (code, out, err) = h.run(&[
        "limit",
        "--pid",
        &other.pid(),
        "--device",
        "veth-a",
        "--ip",
        "10.9.0.7",
        "--direction",
        "download",
        "--rate",
        "2000",
        "--scope",
        "device",
        "--execute",
    ]);
    assert_eq!(code, 1, "{out}");
    assert!(err.contains("managed for another runtime"), "{err}");
    same_state(&h.kernel_state(), &before, "refused device-wide limit");
    // The owner shows in status.
    let (_, out, _) = h.run(&["status"]);
    assert!(
        out.contains(&format!(
            "owner host:/usr/bin/v2ray config={}",
            h.runtime.config.display()
        )),
        "{out}"
    );
}

#[test]
fn a_failed_step_is_undone_and_the_kernel_ends_as_it_began() {
    require(&[need::RUNTIME_HOST, need::DOWNLOAD]);
    let h = Host::new("rb");
    // A managed root holding a u32 table raylimit did not make, with the id of raylimit's IPv4
    // band's first-level table, in the IPv6 band: observation is "not comparable", and creating
    // the table fails.
    h.ns.tc(&[
        "qdisc", "add", "dev", "veth-a", "root", "handle", "524c:", "htb", "default", "0",
    ]);
    h.ns.tc(&[
        "filter", "add", "dev", "veth-a", "parent", "524c:", "protocol", "ipv6", "prio", "301",
        "handle", "5:", "u32", "divisor", "256",
    ]);
    let before = h.kernel_state();
    let args = [
        "--ip",
        "10.9.0.7",
        "--direction",
        "download",
        "--rate",
        "1000",
        "--execute",
    ];
    let (code, out, err) = h.limit(&args);
    assert_eq!(code, 1);
    assert!(
        out.contains("Observed tc state: available (not comparable)"),
        "{out}"
    );
    assert!(err.contains("--allow-missing-tc-state"), "{err}");
    same_state(&h.kernel_state(), &before, "blocked run");

    let mut with_flag = args.to_vec();
    with_flag.extend_from_slice(&["--allow-missing-tc-state", "--format", "json"]);
    let (code, out, _) = h.limit(&with_flag);
    assert_eq!(code, 1, "{out}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["outcome"], "failed");
    let statuses: Vec<(&str, &str)> = v["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["step"].as_str().unwrap(), r["status"].as_str().unwrap()))
        .collect();
    assert_eq!(
        statuses,
        [
            ("create-class", "undone"),
            ("create-leaf", "undone"),
            ("create-address-table", "failed"),
            ("create-address-link", "not run"),
            ("create-bucket-table", "not run"),
            ("create-bucket-link", "not run"),
            ("create-filter", "not run")
        ],
        "{out}"
    );
    assert_eq!(v["rollback"][0]["step"], "delete-leaf");
    assert_eq!(v["rollback"][1]["step"], "delete-class");
    assert_eq!(v["rollback"][1]["status"], "ok");
    assert_eq!(
        h.kernel_state(),
        before,
        "the rollback left the kernel changed"
    );
}

#[test]
fn a_second_run_waits_for_the_lock() {
    require(&[need::RUNTIME_HOST, need::DOWNLOAD]);
    let h = Host::new("lock");
    std::fs::create_dir_all(&h.state.0).unwrap();
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(h.state.0.join("lock"))
        .unwrap();
    // SAFETY: flock on a descriptor this test owns.
    assert_eq!(unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) }, 0);
    let pid = h.runtime.pid();
    let mut child = Command::new(env!("CARGO_BIN_EXE_raylimit"))
        .args([
            "--netns",
            &h.ns.name,
            "limit",
            "--pid",
            &pid,
            "--device",
            "veth-a",
            "--ip",
            "10.9.0.7",
            "--direction",
            "download",
            "--rate",
            "1000",
            "--execute",
        ])
        .env("RAYLIMIT_STATE_DIR", &h.state.0)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(700));
    assert!(
        child.try_wait().unwrap().is_none(),
        "ran while another run held the lock"
    );
    assert!(!h.ns.tc(&["qdisc", "show"]).contains("524c:"));
    drop(lock);
    assert!(child.wait().unwrap().success());
    assert!(h.ns.tc(&["qdisc", "show"]).contains("524c:"));
}

#[test]
fn two_hundred_ips_apply_repeat_as_no_op_and_remove_cleanly() {
    require(&[need::RUNTIME_HOST, need::UPLOAD]);
    let h = Host::new("200");
    let ips: Vec<String> = (0..200)
        .map(|i| format!("10.{}.{}.{}", 20 + i % 3, i / 7, i % 250 + 1))
        .collect();
    for direction in ["download", "upload"] {
        for ip in &ips {
            let v = h.limit_json(&[
                "--ip",
                ip,
                "--direction",
                direction,
                "--rate",
                "100000",
                "--execute",
            ]);
            assert_eq!(v["decision"]["kind"], "apply", "{ip}: {v}");
        }
    }
    let full = h.kernel_state();
    let (_, status, _) = h.run(&["status", "--format", "json"]);
    let status: Value = serde_json::from_str(&status).unwrap();
    for root in status["roots"].as_array().unwrap() {
        assert_eq!(root["rules"].as_array().unwrap().len(), 200, "{root}");
        let classes: std::collections::BTreeSet<&str> = root["rules"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["class_id"].as_str().unwrap())
            .collect();
        assert_eq!(classes.len(), 200, "class minors collided");
    }
    for direction in ["download", "upload"] {
        for ip in &ips {
            let v = h.limit_json(&[
                "--ip",
                ip,
                "--direction",
                direction,
                "--rate",
                "100000",
                "--execute",
            ]);
            assert_eq!(v["decision"]["kind"], "no_op", "{ip}: {v}");
        }
    }
    same_state(&h.kernel_state(), &full, "no_op runs");
    for direction in ["download", "upload"] {
        for ip in &ips {
            let v = h.limit_json(&[
                "--ip",
                ip,
                "--direction",
                direction,
                "--remove",
                "--execute",
            ]);
            assert_eq!(v["decision"]["kind"], "remove", "{ip}: {v}");
        }
    }
    let (_, out, _) = h.run(&["status"]);
    assert_eq!(out.trim(), "No managed limits.");
    let qdiscs = h.ns.tc(&["qdisc", "show"]);
    assert!(
        !qdiscs.contains("524c:") && !qdiscs.contains("clsact"),
        "{qdiscs}"
    );
    assert!(!h.ns.ip(&["link", "show"]).contains("rlifb"));
}

/// With an empty PATH under `strace -f -e trace=execve`, applying and removing a limit starts no
/// process but raylimit itself.
#[test]
fn limit_never_starts_another_process() {
    require(&[need::RUNTIME_HOST, need::UPLOAD, &[need::STRACE]]);
    let h = Host::new("nospawn");
    let pid = h.runtime.pid();
    for action in ["--rate=1000", "--remove"] {
        let execs = execve_trace(
            &[
                "--netns",
                &h.ns.name,
                "limit",
                "--pid",
                &pid,
                "--device",
                "veth-a",
                "--ip",
                "10.9.0.7",
                "--direction",
                "upload",
                action,
                "--execute",
            ],
            Some(&h.state),
        );
        assert_eq!(execs.len(), 1, "{execs:?}");
        assert!(
            execs[0].contains(env!("CARGO_BIN_EXE_raylimit")),
            "{execs:?}"
        );
    }
    assert!(!h.ns.tc(&["qdisc", "show"]).contains("524c:"));
}

#[test]
fn a_foreign_root_blocks_and_is_not_listed_as_managed() {
    require(&[need::RUNTIME_HOST, &[need::HTB]]);
    let h = Host::new("foreign");
    h.ns.tc(&[
        "qdisc", "add", "dev", "veth-a", "root", "handle", "1:", "htb", "default", "0",
    ]);
    let before = h.kernel_state();
    let (code, out, err) = h.limit(&[
        "--ip",
        "10.9.0.7",
        "--direction",
        "download",
        "--rate",
        "1000",
        "--execute",
    ]);
    assert_eq!(code, 1, "{out}");
    assert!(
        err.contains("htb 1:") && err.contains("does not own"),
        "{err}"
    );
    same_state(&h.kernel_state(), &before, "blocked by a foreign root");
    let (_, out, _) = h.run(&["status"]);
    assert_eq!(out.trim(), "No managed limits.");
}

#[test]
fn a_missing_filter_is_repaired_in_place() {
    require(&[need::RUNTIME_HOST, need::DOWNLOAD]);
    let h = Host::new("repair");
    let first = h.limit_json(&[
        "--ip",
        "10.9.0.7",
        "--direction",
        "download",
        "--rate",
        "1000",
        "--execute",
    ]);
    let class = first["observation"]["expected_class_id"].clone();
    // Someone deletes the client's filter node by hand; the class and the table stay.
    let filters = h.ns.tc(&["filter", "show", "dev", "veth-a"]);
    let handle = filters
        .split_whitespace()
        .find(|w| w.starts_with("500:7:"))
        .unwrap_or_else(|| panic!("{filters}"));
    h.ns.tc(&[
        "filter", "del", "dev", "veth-a", "parent", "524c:", "protocol", "ip", "prio", "300",
        "handle", handle, "u32",
    ]);
    let repaired = h.limit_json(&[
        "--ip",
        "10.9.0.7",
        "--direction",
        "download",
        "--rate",
        "1000",
        "--execute",
    ]);
    assert_eq!(repaired["decision"]["kind"], "replace", "{repaired}");
    let steps: Vec<&str> = repaired["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["step"].as_str().unwrap())
        .collect();
    assert_eq!(steps, ["create-filter"]);
    assert_eq!(repaired["observation"]["expected_class_id"], class);
    let again = h.limit_json(&[
        "--ip",
        "10.9.0.7",
        "--direction",
        "download",
        "--rate",
        "1000",
    ]);
    assert_eq!(again["decision"]["kind"], "no_op");
}

/// A runtime restarted on another port: `status` says its scoped baseline no longer matches its
/// sockets, and repeating the limit repairs it in place (same class).
#[test]
fn a_moved_listener_is_flagged_by_status_and_repaired_in_place() {
    require(&[need::RUNTIME_HOST, need::DOWNLOAD]);
    let (ns, runtime) = veth_host("moved");
    let state = state_dir("moved");
    let config = runtime.config.clone();
    let old_port = serde_json::from_str::<Value>(&std::fs::read_to_string(&config).unwrap())
        .unwrap()["inbounds"][0]["port"]
        .as_u64()
        .unwrap();
    let limit = |pid: &str| -> Value {
        let (code, out, err) = raylimit_in(
            &state,
            &[
                "--netns",
                &ns.name,
                "limit",
                "--pid",
                pid,
                "--ip",
                "all",
                "--device",
                "veth-a",
                "--direction",
                "download",
                "--rate",
                "100000",
                "--execute",
                "--format",
                "json",
            ],
        );
        assert_eq!(code, 0, "{err}\n{out}");
        serde_json::from_str(&out).unwrap()
    };
    // v2ray opens its listener a moment after it starts.
    let listening = |port: u64| {
        let want = format!("127.0.0.1:{port}");
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !ns
            .exec("ss")
            .args(["-ltn"])
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(&want))
        {
            assert!(
                std::time::Instant::now() < deadline,
                "{want} never listened"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    let status = || -> Value {
        let (code, out, err) =
            raylimit_in(&state, &["--netns", &ns.name, "status", "--format", "json"]);
        assert_eq!(code, 0, "{err}");
        let v: Value = serde_json::from_str(&out).unwrap();
        v["roots"][0]["rules"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["subject"] == "ip all")
            .cloned()
            .unwrap_or_else(|| panic!("no ip all rule: {v}"))
    };
    listening(old_port);
    let first = limit(&runtime.pid());
    assert_eq!(first["scope"]["match"], "runtime_listeners", "{first}");
    let class = first["plan"]["class_id"].clone();
    let rule = status();
    assert_eq!(
        rule["listeners"],
        serde_json::json!([format!("127.0.0.1:{old_port}")])
    );
    assert!(rule["scope_drift"].is_null(), "{rule}");

    // The same runtime (binary and config path), restarted on another port.
    drop(runtime);
    let new_port = old_port as u16 + 1;
    let runtime = V2ray::start_with(&ns, config, new_port, &|| false).unwrap();
    listening(u64::from(new_port));
    let drift = status()["scope_drift"].as_str().map(str::to_string);
    assert!(
        drift
            .as_deref()
            .is_some_and(|d| d.contains(&format!("127.0.0.1:{new_port}"))),
        "{drift:?}"
    );
    let repaired = limit(&runtime.pid());
    assert_eq!(repaired["decision"]["kind"], "replace", "{repaired}");
    assert_eq!(repaired["plan"]["class_id"], class);
    let rule = status();
    assert_eq!(
        rule["listeners"],
        serde_json::json!([format!("127.0.0.1:{new_port}")])
    );
    assert!(rule["scope_drift"].is_null(), "{rule}");
}

/// Limits made with `--netns` in two namespaces are all listed by `status` without `--netns`
/// (the owner annotations record the namespaces), each under its own heading; a device that is
/// not in the current namespace, for a runtime that runs in another, names the `--netns` to use.
#[test]
fn status_finds_every_namespace_and_a_missing_device_names_the_runtimes() {
    require(&[need::RUNTIME_HOST, need::DOWNLOAD]);
    let (a, b) = (Host::new("nsa"), Host::new("nsb"));
    let state = &a.state;
    for h in [&a, &b] {
        let pid = h.runtime.pid();
        let (code, out, err) = raylimit_in(
            state,
            &[
                "--netns",
                &h.ns.name,
                "limit",
                "--pid",
                &pid,
                "--device",
                "veth-a",
                "--ip",
                "10.9.0.7",
                "--direction",
                "download",
                "--rate",
                "1000",
                "--execute",
            ],
        );
        assert_eq!(code, 0, "{err}\n{out}");
    }
    let (code, out, err) = raylimit_in(state, &["status"]);
    assert_eq!(code, 0, "{err}");
    for h in [&a, &b] {
        let heading = format!("network namespace {0} (raylimit --netns {0}):", h.ns.name);
        assert!(out.contains(&heading), "{out}");
    }
    assert_eq!(out.matches("ip 10.9.0.7").count(), 2, "{out}");
    assert_eq!(
        out.matches("rate 1000 bytes/s (8 kbit/s)").count(),
        2,
        "{out}"
    );
    let (_, json, _) = raylimit_in(state, &["status", "--format", "json"]);
    let v: Value = serde_json::from_str(&json).unwrap();
    let spaces: BTreeSet<String> = v["roots"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| r["netns"].as_str().map(String::from))
        .collect();
    assert_eq!(spaces, [a.ns.name.clone(), b.ns.name.clone()].into());
    // `--netns` narrows it to one.
    let (_, out, _) = raylimit_in(state, &["--netns", &a.ns.name, "status"]);
    assert_eq!(out.matches("ip 10.9.0.7").count(), 1, "{out}");

    // veth-a is not in the current namespace; the runtime's namespace is named.
    let pid = a.runtime.pid();
    let (code, out, err) = raylimit_in(
        state,
        &[
            "limit",
            "--pid",
            &pid,
            "--device",
            "veth-a",
            "--ip",
            "10.9.0.7",
            "--direction",
            "download",
            "--rate",
            "1000",
        ],
    );
    assert_eq!((code, out.as_str()), (2, ""), "{err}");
    assert_eq!(
        err.trim(),
        format!(
            "raylimit: no network device named \"veth-a\"; the runtime runs in network namespace {0}: add --netns {0}",
            a.ns.name
        )
    );
}

/// `reset --owner` removes a stopped runtime's limits (dry-run first) and leaves another
/// runtime's; a plain `reset` then takes the rest, and the kernel ends as it began.
#[test]
fn reset_removes_a_stopped_runtimes_limits_and_then_everything() {
    require(&[need::RUNTIME_HOST, need::DOWNLOAD]);
    let h = Host::new("rst");
    let before = h.kernel_state();
    let stopped = V2ray::start(&h.ns);
    let owner = format!("host:/usr/bin/v2ray config={}", stopped.config.display());
    for (runtime, ip) in [(&stopped, "10.9.0.7"), (&h.runtime, "10.9.0.8")] {
        let (code, out, err) = h.run(&[
            "limit",
            "--pid",
            &runtime.pid(),
            "--device",
            "veth-a",
            "--ip",
            ip,
            "--direction",
            "download",
            "--rate",
            "1000",
            "--execute",
        ]);
        assert_eq!(code, 0, "{err}\n{out}");
    }
    drop(stopped);
    let limited = h.kernel_state();
    let (code, out, err) = h.run(&["reset", "--owner", &owner]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("=== 1/1: ip 10.9.0.7 download on veth-a in"),
        "{out}"
    );
    assert!(out.contains("To execute it: raylimit --netns"), "{out}");
    same_state(&h.kernel_state(), &limited, "a dry-run reset");
    let (code, out, err) = h.run(&["reset", "--owner", &owner, "--execute"]);
    assert_eq!(code, 0, "{err}\n{out}");
    assert!(out.contains("1 executed"), "{out}");
    let (_, status, _) = h.run(&["status"]);
    assert!(
        !status.contains("ip 10.9.0.7") && status.contains("ip 10.9.0.8"),
        "{status}"
    );
    let (code, out, err) = h.run(&["reset", "--execute"]);
    assert_eq!(code, 0, "{err}\n{out}");
    assert!(out.contains("1 executed"), "{out}");
    same_state(&h.kernel_state(), &before, "reset");
    let (_, out, _) = h.run(&["reset"]);
    assert_eq!(
        out.trim(),
        "Nothing to reset: raylimit records no limits here."
    );
}

/// `status` compares the kernel with raylimit's records both ways and prints what repairs each
/// difference: a root deleted by hand (recorded, not in the kernel), a class added by hand
/// (no filter), and a rule whose annotation is gone (in raylimit's bands, not recorded). Each
/// printed repair, run as printed, makes its difference go away.
#[test]
fn status_shows_drift_both_ways_with_the_commands_that_repair_it() {
    require(&[need::RUNTIME_HOST, need::DOWNLOAD]);
    let h = Host::new("dri");
    let ns = h.ns.name.as_str();
    for ip in ["10.9.0.7", "10.9.0.8"] {
        let (code, out, err) = h.limit(&[
            "--ip",
            ip,
            "--direction",
            "download",
            "--rate",
            "250000",
            "--execute",
        ]);
        assert_eq!(code, 0, "{err}\n{out}");
    }
    let (_, out, _) = raylimit_in(&h.state, &["status"]);
    assert!(out.contains("Drift: none"), "{out}");
    assert!(
        out.contains("rate 250000 bytes/s (2 Mbit/s)")
            && out.contains("  download (leaving veth-a; root 524c: on veth-a"),
        "{out}"
    );
    // The two rules, in precedence order, under their owner.
    let owner = format!(
        "    owner host:/usr/bin/v2ray config={}",
        h.runtime.config.display()
    );
    let at = |s: &str| out.find(s).unwrap_or_else(|| panic!("{s} missing: {out}"));
    assert!(at(&owner) < at("ip 10.9.0.7") && at("ip 10.9.0.7") < at("ip 10.9.0.8"));

    // A class added by hand in raylimit's root: an orphan, with the tc command that removes it.
    h.ns.tc(&[
        "class", "add", "dev", "veth-a", "parent", "524c:", "classid", "524c:77", "htb", "rate",
        "1000",
    ]);
    // The root deleted by hand: both recorded rules are gone from the kernel.
    let (_, out, _) = raylimit_in(&h.state, &["status"]);
    assert!(out.contains("class 524c:77"), "{out}");
    let repair = format!("repair: tc -n {ns} class del dev veth-a classid 524c:77");
    assert!(out.contains(&repair), "{out}");
    run_repairs(&h.state, &out);
    let (_, out, _) = raylimit_in(&h.state, &["status"]);
    assert!(out.contains("Drift: none"), "{out}");

    h.ns.tc(&["qdisc", "del", "dev", "veth-a", "root"]);
    let (_, out, _) = raylimit_in(&h.state, &["status"]);
    assert!(
        out.contains(&format!("network namespace {ns} (raylimit --netns {ns}):"))
            && out.contains("Drift: 2 difference(s)")
            && out.contains("veth-a download ip 10.9.0.7 (owner host:")
            && out.contains("raylimit's root on veth-a is gone"),
        "{out}"
    );
    let forget = format!(
        "repair: raylimit --netns {ns} reset --owner 'host:/usr/bin/v2ray config={}' --device veth-a --subject 'ip 10.9.0.7' --direction download --execute",
        h.runtime.config.display()
    );
    assert!(out.contains(&forget), "{out}");
    let (_, json, _) = raylimit_in(&h.state, &["status", "--format", "json"]);
    let v: Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["drift"].as_array().unwrap().len(), 2, "{v}");
    run_repairs(&h.state, &out);
    let (_, out, _) = raylimit_in(&h.state, &["--netns", ns, "status"]);
    assert_eq!(out.trim(), "No managed limits.", "{out}");

    // A rule no annotation records (the state file lost): shown with an unknown owner, and the
    // tc commands that remove its filters and class.
    h.executed(&[
        "--ip",
        "10.9.0.7",
        "--direction",
        "download",
        "--rate",
        "250000",
    ]);
    std::fs::remove_file(h.state.0.join("owners.json")).unwrap();
    let (_, out, _) = h.run(&["status"]);
    assert!(
        out.contains("    owner unknown (no annotation)")
            && out.contains("no annotation records it")
            && out.contains(&format!(
                "repair: tc -n {ns} filter del dev veth-a parent 524c: protocol ip pref 300 handle"
            )),
        "{out}"
    );
    run_repairs(&h.state, &out);
    let (_, out, _) = h.run(&["status", "--format", "json"]);
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["drift"], serde_json::json!([]), "{v}");
    assert_eq!(v["roots"][0]["rules"], serde_json::json!([]), "{v}");
}

/// `top` as a pipe prints one snapshot and exits; on a terminal (script(1)'s pseudo-terminal)
/// it repaints every interval until `q`, or Ctrl-C, and exits 0 either way.
#[test]
fn top_is_live_on_a_terminal_and_one_snapshot_in_a_pipe() {
    require(&[need::RUNTIME_HOST, need::DOWNLOAD]);
    let h = Host::new("top");
    h.executed(&[
        "--ip",
        "10.9.0.7",
        "--direction",
        "download",
        "--rate",
        "250000",
    ]);
    // The Prometheus textfile: one series per rule and metric, labelled, counters as counters.
    let (code, prom, err) = raylimit_in(&h.state, &["status", "--format", "prometheus"]);
    assert_eq!(code, 0, "{err}");
    let labels = format!(
        "{{netns=\"{}\",device=\"veth-a\",direction=\"download\",subject=\"ip 10.9.0.7\",owner=\"host:/usr/bin/v2ray config={}\"}}",
        h.ns.name,
        h.runtime.config.display()
    );
    assert!(
        prom.contains(&format!("raylimit_limit_bytes_per_second{labels} 250000\n"))
            && prom.contains("# TYPE raylimit_sent_bytes_total counter\n")
            && prom.contains(&format!("raylimit_sent_bytes_total{labels} "))
            && prom.contains(&format!("raylimit_drift{{netns=\"{}\"}} 0\n", h.ns.name)),
        "{prom}"
    );
    // Every line is a comment or `name{labels} value`.
    for line in prom.lines().filter(|l| !l.starts_with('#')) {
        let (series, value) = line.rsplit_once(' ').unwrap();
        assert!(
            series.starts_with("raylimit_") && series.ends_with('}'),
            "{line}"
        );
        value.parse::<f64>().unwrap();
    }
    let (code, out, err) = h.run(&["top", "--interval-ms", "200"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.starts_with("raylimit top: every 200 ms\n")
            && out.contains(&format!(
                "veth-a download (netns {}): root 524c: on veth-a",
                h.ns.name
            ))
            && out.contains("ip 10.9.0.7")
            && out.contains("2 Mbit/s")
            && !out.contains('\x1b'),
        "{out}"
    );
    for (key, what) in [("q", "q"), ("\x03", "Ctrl-C")] {
        // `exec`: the pty's Ctrl-C reaches the whole foreground group, and a shell left waiting
        // (dash, when SHELL is unset) would die of it and turn top's exit 0 into 130.
        let command = format!(
            "exec {} --netns {} top --interval-ms 200",
            env!("CARGO_BIN_EXE_raylimit"),
            h.ns.name
        );
        let mut child = std::process::Command::new("timeout")
            .args(["20", "script", "-qfec", &command, "/dev/null"])
            .env("RAYLIMIT_STATE_DIR", &h.state.0)
            .env("SHELL", "/bin/sh")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(1500));
        use std::io::Write as _;
        child
            .stdin
            .as_mut()
            .unwrap()
            .write_all(key.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{what}: {:?}\n{text}", out.status);
        assert!(
            text.matches("\x1b[H\x1b[2J").count() >= 3
                && text.contains("q or Ctrl-C quits")
                && text.contains("ip 10.9.0.7")
                && text.ends_with("\x1b[?25h\r\n"),
            "{what}: {text:?}"
        );
    }
}

/// An upload root whose ingress redirect was deleted by hand is reported as not in force, and a
/// redirect left pointing at a deleted IFB (which drops what it matches) is shown with the tc
/// command that removes it.
#[test]
fn status_flags_upload_limits_that_are_not_in_force() {
    require(&[need::RUNTIME_HOST, need::UPLOAD]);
    let h = Host::new("nif");
    h.executed(&[
        "--ip",
        "10.9.0.7",
        "--direction",
        "upload",
        "--rate",
        "250000",
    ]);
    let (_, out, _) = h.run(&["status"]);
    assert!(
        out.contains("Drift: none") && !out.contains("NOT IN FORCE"),
        "{out}"
    );

    // The IFB deleted by hand: the redirect on veth-a now sends to nothing.
    let ifb = format!("rlifb{}", h.ns.ifindex("veth-a"));
    h.ns.ip(&["link", "del", &ifb]);
    let (_, out, _) = h.run(&["status"]);
    assert!(
        out.contains("veth-a upload ingress redirect: redirects to ifindex")
            && out.contains("which no longer exists: the packets it matches are dropped")
            && out.contains("removing the upload limits recorded here removes it")
            && out.contains(&format!("repair: raylimit --netns {} reset", h.ns.name)),
        "{out}"
    );
    run_repairs(&h.state, &out);
    // Unrecorded (the state file lost), the redirect's own tc command removes it.
    h.executed(&[
        "--ip",
        "10.9.0.7",
        "--direction",
        "upload",
        "--rate",
        "250000",
    ]);
    std::fs::remove_file(h.state.0.join("owners.json")).unwrap();
    let ifb = format!("rlifb{}", h.ns.ifindex("veth-a"));
    h.ns.ip(&["link", "del", &ifb]);
    let (_, out, _) = h.run(&["status"]);
    assert!(
        out.contains(&format!(
            "repair: tc -n {} filter del dev veth-a ingress",
            h.ns.name
        )),
        "{out}"
    );
    run_repairs(&h.state, &out);
    h.ns.tc(&["qdisc", "del", "dev", "veth-a", "clsact"]);
    let filters = h.ns.tc(&["filter", "show", "dev", "veth-a", "ingress"]);
    assert!(!filters.contains("mirred"), "{filters}");

    // The printed repairs (the redirect's removal, and forgetting the rule whose IFB is gone)
    // leave nothing to report.
    let (_, out, _) = h.run(&["status"]);
    assert_eq!(out.trim(), "No managed limits.", "{out}");

    // Limits again, then the clsact hook deleted by hand: the IFB's root is there, but the
    // upload limits on it are not in force.
    h.executed(&[
        "--ip",
        "10.9.0.7",
        "--direction",
        "upload",
        "--rate",
        "250000",
    ]);
    h.ns.tc(&["qdisc", "del", "dev", "veth-a", "clsact"]);
    let (_, out, _) = h.run(&["status"]);
    assert!(
        out.contains(&format!(
            "    NOT IN FORCE: veth-a's ingress is not redirected to {ifb}: these upload limits are not in force"
        )),
        "{out}"
    );
    let (_, json, _) = h.run(&["status", "--format", "json"]);
    let v: Value = serde_json::from_str(&json).unwrap();
    assert!(v["roots"][0]["not_in_force"].is_string(), "{v}");
    let (code, out, err) = h.run(&["reset", "--execute"]);
    assert_eq!(code, 0, "{err}\n{out}");
}

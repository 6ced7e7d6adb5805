//! The real binary: `--netns` selects the namespace its sockets open in; errors are one line with
//! exit 1; usage errors exit 2; it never starts another process.

mod common;

use common::*;
use raylimit::model::tc::*;
use raylimit::model::u32::{End, U32Filter, U32Selector};
use raylimit::model::{TcHandle, U32Handle};
use raylimit::shaping::{frame_bytes, leaf_class, Leaf, ETHERNET_MTU};
use std::process::Command;

fn raylimit(args: &[&str]) -> (i32, String, String) {
    raylimit_env(args, &[])
}

#[test]
fn netns_option_reads_objects_inside_the_namespace() {
    require(&[need::NAMESPACE, need::DOWNLOAD, &[need::VETH]]);
    let ns = Netns::new("cli");
    ns.ip(&[
        "link", "add", "veth-a", "type", "veth", "peer", "name", "veth-b",
    ]);
    let mut sock = ns.socket();
    let ifindex = sock.link_by_name("veth-a").unwrap().index;
    let root = TcHandle::new(0x7a31, 0);
    sock.request(
        Qdisc {
            ifindex,
            handle: root,
            parent: TcHandle::ROOT,
            kind: QdiscKind::Htb(Default::default()),
        }
        .request(Op::Create),
        "q",
    )
    .unwrap();
    let class = TcHandle::new(0x7a31, 0x10);
    sock.request(
        Class {
            ifindex,
            handle: class,
            parent: root,
            kind: ClassKind::Htb(leaf_class(
                1_000_000,
                Leaf::Default,
                frame_bytes(ETHERNET_MTU),
            )),
        }
        .request(Op::Create),
        "c",
    )
    .unwrap();
    let mut sel = U32Selector::default();
    sel.ipv4(End::Destination, "10.99.0.2".parse().unwrap(), 32);
    let f = Filter {
        ifindex,
        parent: root,
        priority: 100,
        protocol: ETH_P_IP,
        handle: U32Handle::new(0x800, 0, 1).0,
        kind: FilterKind::U32(U32Filter::to_class(sel, class)),
    };
    sock.request(f.request(Op::Create), "f").unwrap();

    let (code, out, err) = raylimit(&[
        "--netns", &ns.name, "show", "--device", "veth-a", "--format", "json",
    ]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let objects = v["objects"].as_array().unwrap();
    assert!(
        objects
            .iter()
            .any(|o| o["object"] == "qdisc" && o["handle"] == "7a31:"),
        "{out}"
    );
    assert!(
        objects
            .iter()
            .any(|o| o["object"] == "class"
                && o["text"].as_str().unwrap().contains("rate 1000000B/s")),
        "{out}"
    );
    assert!(
        objects.iter().any(|o| o["object"] == "filter"
            && o["text"]
                .as_str()
                .unwrap()
                .contains("match 0a630002/ffffffff at 16")),
        "{out}"
    );

    let (code, out, _) = raylimit(&["--netns", &ns.name, "show", "--device", "veth-a"]);
    assert_eq!(code, 0);
    assert!(
        out.contains("class htb 7a31:10 parent root rate 1000000B/s ceil 1000000B/s"),
        "{out}"
    );
}

#[test]
fn errors_are_one_line_and_exit_codes_follow_the_contract() {
    let (code, _, err) = raylimit(&["--netns", "rlt-no-such-namespace", "show", "--device", "lo"]);
    assert_eq!(code, 1);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("network namespace \"rlt-no-such-namespace\""),
        "{err}"
    );
    let (code, _, err) = raylimit(&["show", "--device", "rl-missing0"]);
    assert_eq!(
        (code, err.trim()),
        (1, "raylimit: no network device named \"rl-missing0\"")
    );
    let (code, _, err) = raylimit(&["show", "--device", "a-name-longer-than-ifnamsiz"]);
    assert_eq!(code, 1, "{err}");
    let (code, _, _) = raylimit(&["no-such-command"]);
    assert_eq!(code, 2);
    for version in ["version", "--version", "-V"] {
        let (code, out, _) = raylimit(&[version]);
        assert_eq!(
            (code, out.trim()),
            (0, concat!("raylimit ", env!("CARGO_PKG_VERSION"))),
            "{version}"
        );
    }
    // A usage error names what is missing or mistyped, on one line.
    for (args, message) in [
        (
            &["show"][..],
            "raylimit: the following required arguments were not provided: --device <DEV> (see raylimit help)",
        ),
        (
            &["apply"][..],
            "raylimit: the following required arguments were not provided: --file <POLICY> (see raylimit help)",
        ),
        (
            &["show", "--devce", "lo"][..],
            "raylimit: unexpected argument '--devce' found; tip: a similar argument exists: '--device' (see raylimit help)",
        ),
        (
            &["statu"][..],
            "raylimit: unrecognized subcommand 'statu'; tip: a similar subcommand exists: 'status' (see raylimit help)",
        ),
        (
            &["inspect", "--pid", "0"][..],
            "raylimit: --pid 0 is not a process id; give a number above zero",
        ),
    ] {
        let (code, out, err) = raylimit(args);
        assert_eq!((code, out.as_str(), err.trim()), (2, "", message), "{args:?}");
    }
}

/// `--execute` without CAP_NET_ADMIN (root with every capability dropped) says what it needs,
/// before anything is read or changed; a dry-run needs no capability to plan.
#[test]
fn execute_without_cap_net_admin_says_root_is_needed() {
    require(&[&[need::SETPRIV]]);
    let out = std::process::Command::new("setpriv")
        .args(["--bounding-set=-all", "--inh-caps=-all"])
        .arg(env!("CARGO_BIN_EXE_raylimit"))
        .args([
            "limit",
            "--pid",
            "1",
            "--ip",
            "10.0.0.1",
            "--device",
            "lo",
            "--direction",
            "download",
            "--rate",
            "1000",
            "--execute",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim(),
        "raylimit: --execute changes the kernel's traffic control, which needs root (CAP_NET_ADMIN); run it as root, or leave out --execute for a dry-run"
    );
}

/// With an empty PATH under `strace -f -e trace=execve`, the only execve is raylimit's own.
#[test]
fn never_starts_another_process() {
    require(&[need::NAMESPACE, &[need::STRACE]]);
    let ns = Netns::new("exec");
    let execs = execve_trace(&["--netns", &ns.name, "show", "--device", "lo"], None);
    assert_eq!(execs.len(), 1, "{execs:?}");
    assert!(
        execs[0].contains(env!("CARGO_BIN_EXE_raylimit")),
        "{execs:?}"
    );
}

/// Every command's `--help` ends with examples, and `limit`'s marks what is required.
#[test]
fn help_teaches_with_examples_and_marks_what_is_required() {
    for command in [
        "limit",
        "discover",
        "inspect",
        "status",
        "top",
        "apply",
        "watch",
        "reset",
        "probe",
        "show",
        "completions",
    ] {
        let (code, out, _) = raylimit(&[command, "--help"]);
        assert_eq!(code, 0, "{command}");
        let examples = out.split_once("Examples:\n").map(|x| x.1).unwrap_or("");
        assert!(
            examples
                .lines()
                .next()
                .is_some_and(|l| l.starts_with("  raylimit ")),
            "{command}: {out}"
        );
    }
    let (_, out, _) = raylimit(&["limit", "--help"]);
    for heading in [
        "Subject (exactly one required):",
        "Where (required):",
        "Limit (exactly one required):",
        "Runtime (exactly one of --pid, --container, --name):",
    ] {
        assert!(out.contains(heading), "{heading}: {out}");
    }
    assert!(
        out.contains("Usage: raylimit limit <--ip IP|all | --inbound TAG"),
        "{out}"
    );
}

/// With `--format json`, an error is one JSON object on stdout (`error.message`, `kind`,
/// `exit_code`) beside the usual stderr line; without it, stdout stays empty.
#[test]
fn errors_are_a_json_object_with_format_json() {
    let cases: [(&[&str], &str, i32, &str); 5] = [
        (
            &[
                "limit",
                "--pid",
                "1",
                "--ip",
                "10.0.0.1",
                "--device",
                "lo",
                "--direction",
                "download",
                "--rate",
                "10mbps",
                "--format",
                "json",
            ],
            "usage",
            2,
            "10mbps",
        ),
        (
            &["status", "--devce", "lo", "--format=json"],
            "usage",
            2,
            "--devce",
        ),
        (
            &["show", "--device", "rl-missing0", "--format", "json"],
            "refused",
            1,
            "rl-missing0",
        ),
        (
            &["status", "--device", "rl-missing0", "--format", "json"],
            "usage",
            2,
            "rl-missing0",
        ),
        (
            &["reset", "--subject", "nonsense", "--format", "json"],
            "usage",
            2,
            "--subject",
        ),
    ];
    for (args, kind, code, names) in cases {
        let (got, out, err) = raylimit(args);
        assert_eq!(got, code, "{args:?}: {err}");
        let v: serde_json::Value =
            serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?}: {e}: {out:?}"));
        assert_eq!(v["error"]["kind"], kind, "{args:?}: {v}");
        assert_eq!(v["error"]["exit_code"], code, "{args:?}: {v}");
        let message = v["error"]["message"].as_str().unwrap();
        assert!(message.contains(names), "{args:?}: {v}");
        assert_eq!(err.trim(), format!("raylimit: {message}"), "{args:?}");
        let text: Vec<&str> = args
            .iter()
            .copied()
            .filter(|a| !a.starts_with("--format") && *a != "json")
            .collect();
        let (_, out, _) = raylimit(&text);
        assert_eq!(out, "", "{text:?}");
    }
}

/// A policy file that is a FIFO no one writes, or a device, is refused at once, naming it.
#[test]
fn a_policy_that_is_not_a_regular_file_is_refused_at_once() {
    let dir = std::env::temp_dir().join(format!("raylimit-cli-fifo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let fifo = dir.join("policy.json");
    assert!(Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    for (path, what) in [
        (fifo.to_str().unwrap(), "a FIFO"),
        ("/dev/zero", "a character device"),
    ] {
        let out = Command::new("timeout")
            .args([
                "10",
                env!("CARGO_BIN_EXE_raylimit"),
                "apply",
                "--file",
                path,
            ])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{path}: {err}");
        assert!(err.contains(&format!("{path} is {what}")), "{err}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

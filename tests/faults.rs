//! Faults an operator's host throws at raylimit, reproduced against the real binary in a network
//! namespace, with tc and ip as the oracle: unreadable owner annotations, a state directory
//! under a careless umask, a lock another user could hold or a symlink could redirect.

mod common;

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::process::Command;

use common::host::{run_repairs, same_state, Host};
use common::*;

const LIMIT: [&str; 8] = [
    "--ip",
    "10.9.0.8",
    "--direction",
    "download",
    "--rate",
    "250000",
    "--execute",
    "--format=text",
];

/// A state file that is truncated, empty, not JSON, of another schema or version, a FIFO, a
/// symlink, a directory or huge is never taken for "no annotations": every run refuses with one
/// message naming the file (it would otherwise overwrite the rules it records), the file stays
/// as it was, the kernel is unchanged, and `status` says the annotations are unreadable.
#[test]
fn unreadable_owner_annotations_are_refused_kept_and_reported() {
    require(&[need::RUNTIME_HOST, need::DOWNLOAD]);
    let h = Host::new("cst");
    h.executed(&[
        "--ip",
        "10.9.0.7",
        "--direction",
        "download",
        "--rate",
        "250000",
    ]);
    let file = h.state.0.join("owners.json");
    let good = std::fs::read(&file).unwrap();
    type Corrupt<'a> = Box<dyn Fn() + 'a>;
    let corruptions: Vec<(&str, Corrupt)> = vec![
        (
            "truncated",
            Box::new(|| std::fs::write(&file, &good[..good.len() / 2]).unwrap()),
        ),
        ("empty", Box::new(|| std::fs::write(&file, b"").unwrap())),
        (
            "not JSON",
            Box::new(|| std::fs::write(&file, b"{").unwrap()),
        ),
        (
            "another schema",
            Box::new(|| std::fs::write(&file, br#"{"version":1,"rules":{"a":1}}"#).unwrap()),
        ),
        (
            "another version",
            Box::new(|| std::fs::write(&file, br#"{"version":9,"rules":[]}"#).unwrap()),
        ),
        (
            "a FIFO",
            Box::new(|| {
                std::fs::remove_file(&file).unwrap();
                run(&["mkfifo", file.to_str().unwrap()]);
            }),
        ),
        (
            "a symlink",
            Box::new(|| {
                let real = h.state.0.join("elsewhere.json");
                std::fs::write(&real, &good).unwrap();
                std::fs::remove_file(&file).unwrap();
                std::os::unix::fs::symlink(&real, &file).unwrap();
            }),
        ),
        (
            "a directory",
            Box::new(|| {
                std::fs::remove_file(&file).unwrap();
                std::fs::create_dir(&file).unwrap();
            }),
        ),
        (
            "huge",
            Box::new(|| {
                let f = std::fs::File::create(&file).unwrap();
                f.set_len(64 << 20).unwrap();
            }),
        ),
    ];
    for (what, corrupt) in corruptions {
        corrupt();
        let kind = std::fs::symlink_metadata(&file).unwrap().file_type();
        let content = kind.is_file().then(|| std::fs::read(&file).unwrap());
        let before = h.kernel_state();
        // Bounded: a run that blocked on the file would be killed, and fail here.
        let mut args = vec![
            "timeout",
            "10",
            env!("CARGO_BIN_EXE_raylimit"),
            "--netns",
            &h.ns.name,
        ];
        args.extend(["limit", "--pid"]);
        let pid = h.runtime.pid();
        args.push(&pid);
        args.extend(["--device", "veth-a"]);
        args.extend(LIMIT);
        let out = Command::new(args[0])
            .args(&args[1..])
            .env("RAYLIMIT_STATE_DIR", &h.state.0)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{what}: {err}");
        assert_eq!(err.lines().count(), 1, "{what}: {err}");
        assert!(
            err.contains(&format!(
                "the owner annotations in {} cannot be read",
                file.display()
            )) && err.contains("the file is kept as it is"),
            "{what}: {err}"
        );
        same_state(&h.kernel_state(), &before, what);
        let now = std::fs::symlink_metadata(&file).unwrap().file_type();
        assert_eq!(
            (now.is_file(), now.is_fifo(), now.is_symlink(), now.is_dir()),
            (
                kind.is_file(),
                kind.is_fifo(),
                kind.is_symlink(),
                kind.is_dir()
            ),
            "{what}"
        );
        if let Some(c) = content {
            assert!(
                std::fs::read(&file).unwrap() == c,
                "{what}: the file changed"
            );
        }
        let (code, status, err) = h.run(&["status", "--sample-ms", "0"]);
        assert_eq!(code, 0, "{what}: {err}");
        assert!(
            status.starts_with("Owner annotations UNREADABLE: the owner annotations in")
                && status.contains("ip 10.9.0.7"),
            "{what}: {status}"
        );
        // Put the good file back for the next corruption.
        match std::fs::symlink_metadata(&file).unwrap().is_dir() {
            true => std::fs::remove_dir(&file).unwrap(),
            false => std::fs::remove_file(&file).unwrap(),
        }
        std::fs::write(&file, &good).unwrap();
    }
    let (code, out, err) = h.run(&["reset", "--execute"]);
    assert_eq!(code, 0, "{err}\n{out}");
}

/// The state directory and its files are root's alone whatever the umask (0700 and 0600), so
/// no local user can read the annotations or take the lock; a lock that is a symlink is
/// refused, and nothing is created at its target.
#[test]
fn state_is_root_only_and_the_lock_is_never_followed() {
    require(&[need::RUNTIME_HOST, need::DOWNLOAD]);
    let h = Host::new("prm");
    let pid = h.runtime.pid();
    let mut args = vec![
        "-c",
        "umask 000; exec \"$0\" \"$@\"",
        env!("CARGO_BIN_EXE_raylimit"),
        "--netns",
        &h.ns.name,
        "limit",
        "--pid",
        &pid,
        "--device",
        "veth-a",
    ];
    args.extend(LIMIT);
    let out = Command::new("sh")
        .args(&args)
        .env("RAYLIMIT_STATE_DIR", &h.state.0)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&h.state.0), 0o700);
    assert_eq!(mode(&h.state.0.join("lock")), 0o600);
    assert_eq!(mode(&h.state.0.join("owners.json")), 0o600);
    // Another user cannot even open the lock to hold it.
    let nobody = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "flock",
            "-n",
        ])
        .arg(h.state.0.join("lock"))
        .arg("true")
        .output()
        .unwrap();
    assert!(
        !nobody.status.success(),
        "an unprivileged user took the lock"
    );

    // A directory left open to everyone is closed again by the next run.
    std::fs::set_permissions(&h.state.0, std::fs::Permissions::from_mode(0o777)).unwrap();
    let (code, _, err) = h.run(&["reset", "--execute"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(mode(&h.state.0), 0o700);

    // A dangling symlink in the lock's place: refused, and its target never created.
    let target = std::env::temp_dir().join(kit::unique("raylimit-lock-target"));
    std::fs::remove_file(h.state.0.join("lock")).unwrap();
    std::os::unix::fs::symlink(&target, h.state.0.join("lock")).unwrap();
    let before = h.kernel_state();
    let (code, out, err) = h.limit(&LIMIT);
    assert_eq!(code, 1, "{out}\n{err}");
    assert!(err.contains("cannot open") && err.contains("lock"), "{err}");
    assert!(
        !target.exists(),
        "the lock was followed to {}",
        target.display()
    );
    same_state(&h.kernel_state(), &before, "a run with a symlinked lock");
}

/// A runtime started with `-confdir` is identified by the directory, not by the files in it: a
/// file added to the directory leaves its owner, and so its limits, unchanged.
#[test]
fn a_file_added_to_the_config_directory_keeps_the_owner() {
    require(&[need::RUNTIME_HOST, need::DOWNLOAD]);
    let (ns, _other) = veth_host("cfd");
    let state = state_dir("cfd");
    let dir = temp_dir("confdir");
    let port = 20000 + std::process::id() % 20000;
    std::fs::write(
        dir.join("10-main.json"),
        format!(
            r#"{{"inbounds":[{{"tag":"socks-in","listen":"127.0.0.1","port":{port},"protocol":"socks"}}],
                "outbounds":[{{"tag":"direct","protocol":"freedom"}}]}}"#
        ),
    )
    .unwrap();
    let runtime = Launched::start(
        &ns,
        std::path::Path::new(V2RAY_BIN),
        &["-confdir", dir.to_str().unwrap()],
        &dir,
        &[],
        Some(dir.clone()),
    );
    runtime.wait_listening(port as u16, &|| false).unwrap();
    let pid = runtime.pid();
    let limit = |extra: &[&str]| {
        let mut args = vec![
            "--netns",
            &ns.name,
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
            "250000",
            "--format",
            "json",
        ];
        args.extend_from_slice(extra);
        let (code, out, err) = raylimit_in(&state, &args);
        assert_eq!(code, 0, "{err}\n{out}");
        serde_json::from_str::<serde_json::Value>(&out).unwrap()
    };
    let made = limit(&["--execute"]);
    let owner = made["runtime"]["owner"].as_str().unwrap().to_string();
    assert_eq!(
        owner,
        format!("host:{V2RAY_BIN} config={}/", dir.display()),
        "{made}"
    );
    std::fs::write(dir.join("50-extra.json"), "{}").unwrap();
    let again = limit(&[]);
    assert_eq!(again["runtime"]["owner"], owner.as_str(), "{again}");
    assert_eq!(again["decision"]["kind"], "no_op", "{again}");
    let (code, out, err) = raylimit_in(&state, &["--netns", &ns.name, "reset", "--execute"]);
    assert_eq!(code, 0, "{err}\n{out}");
}

/// A runtime's config file, or its access log, replaced after it started by something that is
/// not a regular file (a FIFO no one writes, /dev/zero, a directory) or by a huge file: every
/// command that reads them answers promptly (killed after 10 s otherwise), within 128 MiB of
/// data (RLIMIT_DATA), naming what the path is.
#[test]
fn hostile_config_and_access_log_paths_never_hang_or_fill_memory() {
    require(&[need::RUNTIME_HOST, need::DOWNLOAD]);
    let (ns, _other) = veth_host("hfs");
    let state = state_dir("hfs");
    let dir = temp_dir("hostile");
    let port = 20000 + (std::process::id() + 7) % 20000;
    let config = dir.join("config.json");
    let log = dir.join("access.log");
    std::fs::write(
        &config,
        format!(
            r#"{{"log":{{"loglevel":"warning","access":"{}"}},
                "inbounds":[{{"tag":"socks-in","listen":"127.0.0.1","port":{port},"protocol":"socks"}}],
                "outbounds":[{{"tag":"direct","protocol":"freedom"}}]}}"#,
            log.display()
        ),
    )
    .unwrap();
    let runtime = Launched::start(
        &ns,
        std::path::Path::new(V2RAY_BIN),
        &["-config", config.to_str().unwrap()],
        &dir,
        &[],
        Some(dir.clone()),
    );
    runtime.wait_listening(port as u16, &|| false).unwrap();
    let pid = runtime.pid();
    let good = std::fs::read(&config).unwrap();
    let bounded = |args: &[&str]| {
        let out = Command::new("prlimit")
            .arg(format!("--data={}", 128 << 20))
            .args([
                "timeout",
                "10",
                env!("CARGO_BIN_EXE_raylimit"),
                "--netns",
                &ns.name,
            ])
            .args(args)
            .env("RAYLIMIT_STATE_DIR", &state.0)
            .output()
            .unwrap();
        let code = out.status.code();
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        // 124: killed by timeout; none: killed by a signal (an allocation over the limit).
        assert!(code.is_some_and(|c| c != 124), "{args:?}: {code:?} {text}");
        text
    };
    let per_ip: Vec<&str> = vec![
        "limit",
        "--pid",
        &pid,
        "--device",
        "veth-a",
        "--ip",
        "all",
        "--ip-aggregation",
        "per_ip",
        "--direction",
        "download",
        "--rate",
        "250000",
    ];
    let replace = |path: &std::path::Path, with: &str| {
        let _ = std::fs::remove_file(path);
        let _ = std::fs::remove_dir(path);
        match with {
            "a FIFO" => run(&["mkfifo", path.to_str().unwrap()]),
            "a character device" => {
                std::os::unix::fs::symlink("/dev/zero", path).unwrap();
                String::new()
            }
            "a directory" => {
                std::fs::create_dir(path).unwrap();
                String::new()
            }
            _ => {
                std::fs::File::create(path)
                    .unwrap()
                    .set_len(1 << 30)
                    .unwrap();
                String::new()
            }
        };
    };
    for kind in ["a FIFO", "a character device", "a directory", "huge"] {
        replace(&log, kind);
        let out = bounded(&["inspect", "--pid", &pid]);
        assert!(out.contains("socks-in"), "access log {kind}: {out}");
        bounded(&per_ip);
        replace(&config, kind);
        let out = bounded(&["inspect", "--pid", &pid]);
        let said = match kind {
            "huge" => "is larger than".to_string(),
            k => format!("{} is {k}", config.display()),
        };
        assert!(out.contains(&said), "config {kind}: {out}");
        bounded(&per_ip);
        let _ = std::fs::remove_file(&config);
        let _ = std::fs::remove_dir(&config);
        std::fs::write(&config, &good).unwrap();
    }
}

/// raylimit deletes only what it made: an empty clsact and an IFB named like its own that were
/// there before the first upload limit stay after the last one goes; another tool's filter in
/// raylimit's priority band stays after a removal with --allow-missing-tc-state.
#[test]
fn objects_raylimit_did_not_make_are_never_deleted() {
    require(&[need::RUNTIME_HOST, need::UPLOAD]);
    let h = Host::new("frn");
    let ifb = format!("rlifb{}", h.ns.ifindex("veth-a"));
    h.ns.tc(&["qdisc", "add", "dev", "veth-a", "clsact"]);
    h.ns.ip(&["link", "add", &ifb, "type", "ifb"]);
    let upload = [
        "--ip",
        "10.9.0.7",
        "--direction",
        "upload",
        "--rate",
        "250000",
    ];
    h.executed(&upload);
    let filters = h.ns.tc(&["filter", "show", "dev", "veth-a", "ingress"]);
    assert!(filters.contains("mirred"), "{filters}");
    let mut remove = upload[..4].to_vec();
    remove.push("--remove");
    h.executed(&remove);
    let qdiscs = h.ns.tc(&["qdisc", "show", "dev", "veth-a"]);
    assert!(
        qdiscs.contains("clsact"),
        "the clsact that was there went: {qdiscs}"
    );
    assert!(
        h.ns.ip(&["link", "show"]).contains(&ifb),
        "the {ifb} that was there went"
    );
    assert!(!h
        .ns
        .tc(&["filter", "show", "dev", "veth-a", "ingress"])
        .contains("mirred"));
    assert!(!h.ns.tc(&["qdisc", "show", "dev", &ifb]).contains("524c:"));

    // Another tool's filter in band 300 (where specific IPs live): a removal that goes ahead
    // with --allow-missing-tc-state takes raylimit's node and leaves it.
    let download = [
        "--ip",
        "10.9.0.7",
        "--direction",
        "download",
        "--rate",
        "250000",
    ];
    h.executed(&download);
    h.ns.tc(&[
        "filter",
        "add",
        "dev",
        "veth-a",
        "parent",
        "524c:",
        "protocol",
        "ip",
        "pref",
        "300",
        "u32",
        "match",
        "ip",
        "dst",
        "10.9.0.99/32",
        "flowid",
        "524c:1",
    ]);
    let (code, out, err) = h.limit(&[
        "--ip",
        "10.9.0.7",
        "--direction",
        "download",
        "--remove",
        "--execute",
        "--allow-missing-tc-state",
    ]);
    assert_eq!(code, 0, "{err}\n{out}");
    let filters = h.ns.tc(&["filter", "show", "dev", "veth-a"]);
    assert!(
        filters.contains("0a090063/ffffffff"),
        "the foreign filter went: {filters}"
    );
    assert!(
        !filters.contains("0a090007/ffffffff"),
        "raylimit's node stayed: {filters}"
    );
}

/// The IFB deleted by hand leaves the device's ingress redirect sending to nothing (every
/// packet it matches is dropped): removing the upload limit removes that redirect and the hook
/// raylimit made, and the kernel ends as it began.
#[test]
fn a_redirect_to_a_deleted_ifb_is_removed_with_the_limit() {
    require(&[need::RUNTIME_HOST, need::UPLOAD]);
    let h = Host::new("gif");
    let before = h.kernel_state();
    let upload = [
        "--ip",
        "10.9.0.7",
        "--direction",
        "upload",
        "--rate",
        "250000",
    ];
    h.executed(&upload);
    h.ns.ip(&["link", "del", &format!("rlifb{}", h.ns.ifindex("veth-a"))]);
    assert!(h
        .ns
        .tc(&["filter", "show", "dev", "veth-a", "ingress"])
        .contains("mirred"));
    let mut remove = upload[..4].to_vec();
    remove.push("--remove");
    let v = h.limit_json(&remove);
    assert_eq!(v["decision"]["kind"], "remove", "{v}");
    let v = h.limit_json(&[&remove[..], &["--execute"]].concat());
    assert_eq!(v["outcome"], "executed", "{v}");
    same_state(
        &h.kernel_state(),
        &before,
        "the removal after the IFB was deleted",
    );
    let (_, out, _) = h.run(&["status"]);
    assert_eq!(out.trim(), "No managed limits.", "{out}");
}

/// A 2 000-limit `apply --execute` stopped by SIGINT, SIGTERM or SIGKILL at several points:
/// SIGINT and SIGTERM end it at a batch boundary with everything undone (the kernel and the
/// annotations as they began); after SIGKILL, whatever exists is recorded (the annotations are
/// written before the kernel changes). Either way the next run converges: every limit once, no
/// drift (no orphan class, no unrecorded object), and a third run changes nothing.
#[test]
fn interrupted_applies_converge_without_duplicates_or_orphans() {
    require(&[need::RUNTIME_HOST, need::DOWNLOAD]);
    let h = Host::new("sig");
    let dir = temp_dir("sig-policy");
    let _cleanup = TempDir(dir.clone());
    let limits: Vec<String> = (0..2000)
        .map(|i| {
            format!(
                r#"{{"ip": "10.{}.{}.{}", "device": "veth-a", "direction": "download", "rate": 250000}}"#,
                20 + i / 60000,
                (i / 250) % 250,
                1 + i % 250
            )
        })
        .collect();
    let policy = dir.join("policy.json");
    std::fs::write(
        &policy,
        format!(
            r#"{{"runtime": {{"pid": {}}}, "limits": [{}]}}"#,
            h.runtime.pid(),
            limits.join(",")
        ),
    )
    .unwrap();
    let apply = |extra: &[&str]| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_raylimit"));
        cmd.args([
            "--netns",
            &h.ns.name,
            "apply",
            "--file",
            policy.to_str().unwrap(),
        ])
        .args(extra)
        .env("RAYLIMIT_STATE_DIR", &h.state.0);
        cmd
    };
    let classes = || {
        h.ns.tc(&["class", "show", "dev", "veth-a"])
            .lines()
            .filter(|l| l.contains("524c:"))
            .count()
    };
    let empty = h.kernel_state();
    for (signal, after_ms) in [
        (libc::SIGINT, 150),
        (libc::SIGTERM, 400),
        (libc::SIGKILL, 150),
        (libc::SIGKILL, 400),
        (libc::SIGKILL, 800),
    ] {
        let mut child = apply(&["--execute"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(after_ms));
        // SAFETY: signals a child this test started and has not yet reaped.
        unsafe { libc::kill(child.id() as i32, signal) };
        let status = child.wait().unwrap();
        let left = classes();
        eprintln!("signal {signal} after {after_ms} ms: {status:?}, {left} classes left");
        if signal != libc::SIGKILL && status.code() != Some(0) {
            // Stopped at a batch boundary: everything undone.
            same_state(&h.kernel_state(), &empty, "an interrupted apply");
        }
        let out = apply(&["--execute"]).output().unwrap();
        assert!(out.status.success(), "the run after signal {signal}");
        assert_eq!(classes(), 2000, "after signal {signal} at {after_ms} ms");
        let (_, status, _) = h.run(&["status", "--format", "json"]);
        let v: serde_json::Value = serde_json::from_str(&status).unwrap();
        assert_eq!(v["drift"], serde_json::json!([]), "after signal {signal}");
        assert_eq!(v["roots"][0]["rules"].as_array().unwrap().len(), 2000);
        let again = apply(&["--execute", "--format", "json"]).output().unwrap();
        let v: serde_json::Value = serde_json::from_slice(&again.stdout).unwrap_or_else(|e| {
            panic!(
                "{e}: {:?} {}",
                again.status,
                String::from_utf8_lossy(&again.stderr)
            )
        });
        let changed = v["limits"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|l| l["report"]["decision"]["kind"] != "no_op")
            .count();
        assert_eq!(
            changed, 0,
            "a third run after signal {signal} changed something"
        );
        let (code, _, err) = h.run(&["reset", "--execute"]);
        assert_eq!(code, 0, "{err}");
        same_state(&h.kernel_state(), &empty, "reset");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// The shaped device deleted, then made again under the same name (another ifindex): status
/// names the limit recorded on the old device's IFB, which is left behind, and the repairs it
/// prints (forget the rule, delete that IFB) leave nothing managed.
#[test]
fn limits_on_a_vanished_device_are_shown_and_removable() {
    require(&[need::RUNTIME_HOST, need::UPLOAD]);
    let h = Host::new("van");
    let old_ifb = format!("rlifb{}", h.ns.ifindex("veth-a"));
    h.executed(&[
        "--ip",
        "10.9.0.7",
        "--direction",
        "upload",
        "--rate",
        "250000",
    ]);
    h.ns.ip(&["link", "del", "veth-a"]);
    let (_, out, _) = h.run(&["status"]);
    assert!(
        out.contains(&format!(
            "recorded on veth-a, which no longer exists (its IFB {old_ifb} is left behind)"
        )),
        "{out}"
    );
    h.ns.ip(&[
        "link", "add", "veth-a", "type", "veth", "peer", "name", "veth-b",
    ]);
    h.ns.ip(&["link", "set", "veth-a", "up"]);
    let (_, out, _) = h.run(&["status"]);
    assert!(
        out.contains(&format!(
            "recorded on {old_ifb}, the IFB of an earlier veth-a"
        )) && out.contains(&format!("repair: ip -n {} link del {old_ifb}", h.ns.name)),
        "{out}"
    );
    run_repairs(&h.state, &out);
    let (_, out, _) = h.run(&["status"]);
    assert_eq!(out.trim(), "No managed limits.", "{out}");
    assert!(!h.ns.ip(&["link", "show"]).contains(&old_ifb));
}

/// A policy naming two devices, the second missing, changes neither: every device is checked
/// before the first change.
#[test]
fn a_policy_with_a_missing_device_changes_nothing() {
    require(&[need::RUNTIME_HOST, need::DOWNLOAD]);
    let h = Host::new("nod");
    let dir = temp_dir("nod-policy");
    let _cleanup = TempDir(dir.clone());
    let policy = dir.join("policy.json");
    std::fs::write(
        &policy,
        format!(
            r#"{{"runtime": {{"pid": {}}}, "limits": [
              {{"ip": "10.9.0.7", "device": "veth-a", "direction": "download", "rate": 250000}},
              {{"ip": "10.9.0.8", "device": "rel-nodev", "direction": "download", "rate": 250000}}]}}"#,
            h.runtime.pid()
        ),
    )
    .unwrap();
    let before = h.kernel_state();
    let (code, out, err) = h.run(&["apply", "--file", policy.to_str().unwrap(), "--execute"]);
    assert_eq!(code, 2, "{out}\n{err}");
    assert_eq!(
        err.trim(),
        "raylimit: no network device named \"rel-nodev\"; nothing was changed"
    );
    same_state(&h.kernel_state(), &before, "a policy with a missing device");
    assert!(!h.state.0.join("owners.json").exists());
}

/// Drift repaired by the next run on the device, whatever that run asks for: raylimit's root
/// deleted by hand (every rule of the runtime gone while the annotations list them) comes back
/// with every recorded rule at its rate when another client is limited; a rule whose filter was
/// deleted by hand comes back when a third is removed. `status` then shows no drift, and a
/// repeat changes nothing.
#[test]
fn the_next_run_on_a_device_repairs_its_drift() {
    require(&[need::RUNTIME_HOST, need::DOWNLOAD]);
    let h = Host::new("rep");
    let limit = |ip: &'static str, rate: &'static str| {
        ["--ip", ip, "--direction", "download", "--rate", rate]
    };
    h.executed(&limit("10.9.0.7", "250000"));
    h.executed(&limit("10.9.0.8", "500000"));
    let rates = || {
        let classes = h.ns.tc(&["class", "show", "dev", "veth-a"]);
        let mut r: Vec<String> = classes
            .lines()
            .filter_map(|l| l.split(" rate ").nth(1))
            .map(|r| r.split_whitespace().next().unwrap_or("").to_string())
            .collect();
        r.sort();
        r
    };
    let before = rates();
    assert_eq!(before, ["2Mbit", "4Mbit"], "{before:?}");
    let nodes = |ip: &str| {
        let hex = ip
            .split('.')
            .map(|o| format!("{:02x}", o.parse::<u8>().unwrap()))
            .collect::<String>();
        h.ns.tc(&["filter", "show", "dev", "veth-a"])
            .lines()
            .filter(|l| l.contains(&format!("match {hex}/ffffffff")))
            .count()
    };
    assert!(nodes("10.9.0.7") > 0 && nodes("10.9.0.8") > 0);

    // By hand: raylimit's root is deleted. status shows the drift.
    h.ns.tc(&["qdisc", "del", "dev", "veth-a", "root"]);
    let (_, out, _) = h.run(&["status"]);
    assert!(out.contains("raylimit's root on veth-a is gone"), "{out}");
    // The next limit on the device, for another client, puts both rules back.
    let (code, out, err) = h.limit(&[&limit("10.9.0.9", "125000")[..], &["--execute"]].concat());
    assert_eq!(code, 0, "{err}\n{out}");
    assert!(
        out.contains("drift repair 1/2: ip 10.9.0.7 download on veth-a")
            && out.contains("drift repair 2/2: ip 10.9.0.8 download on veth-a"),
        "{out}"
    );
    assert_eq!(rates(), ["1Mbit", "2Mbit", "4Mbit"]);
    assert!(nodes("10.9.0.7") > 0 && nodes("10.9.0.8") > 0 && nodes("10.9.0.9") > 0);
    let (_, out, _) = h.run(&["status", "--format", "json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["drift"], serde_json::json!([]), "{v}");

    // By hand: 10.9.0.8's filter nodes are deleted (its class stays). Removing 10.9.0.9 also
    // puts them back; the dry-run shows it first, as a plan.
    let filters = h.ns.tc(&["filter", "show", "dev", "veth-a"]);
    let mut handle = None;
    let mut prio = None;
    for line in filters.lines() {
        if line.contains("fh ") && line.contains("flowid 524c:") {
            let words: Vec<&str> = line.split_whitespace().collect();
            let at = |k: &str| words.iter().position(|w| *w == k).map(|i| words[i + 1]);
            handle = at("fh").map(str::to_string);
            prio = at("pref").map(str::to_string);
        }
        if line.contains("match 0a090008/ffffffff") {
            break;
        }
    }
    let (handle, prio) = (handle.unwrap(), prio.unwrap());
    h.ns.tc(&[
        "filter", "del", "dev", "veth-a", "parent", "524c:", "pref", &prio, "handle", &handle,
        "protocol", "ip", "u32",
    ]);
    assert_eq!(nodes("10.9.0.8"), 0);
    let remove = ["--ip", "10.9.0.9", "--direction", "download", "--remove"];
    let v = h.limit_json(&remove);
    assert_eq!(v["outcome"], "plan ready", "{v}");
    assert_eq!(v["drift_repairs"][0]["target"]["value"], "10.9.0.8", "{v}");
    assert_eq!(v["drift_repairs"][0]["decision"]["kind"], "replace", "{v}");
    let v = h.limit_json(&[&remove[..], &["--execute"]].concat());
    assert_eq!(v["outcome"], "executed", "{v}");
    assert!(nodes("10.9.0.8") > 0 && nodes("10.9.0.9") == 0);
    assert_eq!(rates(), before);
    let (_, out, _) = h.run(&["status", "--format", "json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["drift"], serde_json::json!([]), "{v}");
    // Nothing is left to repair.
    let v = h.limit_json(&limit("10.9.0.7", "250000"));
    assert_eq!(v["outcome"], "no changes", "{v}");
    assert!(v.get("drift_repairs").is_none(), "{v}");
}

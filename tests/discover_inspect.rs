//! `discover`, `inspect` and the inbound/outbound verdicts against real runtimes: Debian's
//! `v2ray` and copies of it named `xray`, started inside private network namespaces with
//! configs that cover each case. The container engine is a fake Docker Engine API on a unix
//! socket served by the test (this machine runs no engine), so the HTTP client, the join of a
//! container with its process, and the timeout are exercised for real.

mod common;

use std::fs;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::time::Duration;

use common::container::{ContainerCgroup, FakeEngine};
use common::{need, raylimit_env, require, state_dir, temp_dir, Launched, Netns, V2RAY_BIN};
use serde_json::Value;

const NO_ENGINE: (&str, &str) = (
    "DOCKER_HOST",
    "unix:///nonexistent/raylimit-test-engine.sock",
);

/// The main config: YAML by name (JSON is YAML, and V2Ray reads any file as JSON), with the
/// API routed from a dokodemo inbound and a marked outbound.
const MAIN_YAML: &str = r#"{"api": {"tag": "api", "services": ["StatsService", "HandlerService"]},
 "inbounds": [{"tag": "api-in", "listen": "LISTEN", "port": 21085, "protocol": "dokodemo-door", "settings": {"address": "127.0.0.1"}}],
 "routing": {"rules": [{"type": "field", "inboundTag": ["api-in"], "outboundTag": "api"}]},
 "outbounds": [{"tag": "direct", "protocol": "freedom", "streamSettings": {"sockopt": {"mark": 16}}}]}"#;

const INBOUNDS_JSONC: &str = r#"// inbounds, with the comments Xray allows
{
  "inbounds": [
    {"tag": "vmess-in", "listen": "127.0.0.1", "port": 21086, "protocol": "vmess", # a hash comment
     "settings": {"clients": [{"id": "11111111-1111-4111-8111-111111111111", "alterId": 0, "email": "alice@example.com"}]}},
    {"tag": "ws-in", "port": "21087", "protocol": "vmess", "settings": {"clients": []}, "streamSettings": {"network": "ws"}},
    /* a port range */
    {"tag": "range-in", "listen": "127.0.0.1", "port": "21090-21091", "protocol": "socks", "settings": {}},
    {"tag": "env-in", "listen": "127.0.0.1", "port": "env:RL_TEST_PORT", "protocol": "socks", "settings": {}},
    {"tag": "kcp-in", "listen": "127.0.0.1", "port": 21092, "protocol": "vmess", "settings": {"clients": []}, "streamSettings": {"network": "kcp"}},
    {"tag": "unix-in", "listen": "SOCK", "protocol": "socks", "settings": {}}
  ]
}"#;

const OUTBOUNDS_JSON: &str = r#"{"outbounds": [
  {"tag": "shared-a", "protocol": "freedom", "streamSettings": {"sockopt": {"mark": 5}}},
  {"tag": "shared-b", "protocol": "freedom", "streamSettings": {"sockopt": {"mark": 5}}},
  {"tag": "chained", "protocol": "freedom", "proxySettings": {"tag": "direct"}},
  {"tag": "plain", "protocol": "freedom"}]}"#;

/// A copy of Debian's v2ray named `xray`, started as `xray -config main.yaml -confdir conf.d`
/// from its own directory.
fn start_xray(ns: &Netns, api_listen: &str) -> (Launched, PathBuf) {
    let dir = temp_dir("xray");
    fs::create_dir_all(dir.join("bin")).unwrap();
    fs::create_dir_all(dir.join("conf.d")).unwrap();
    fs::copy(V2RAY_BIN, dir.join("bin/xray")).unwrap();
    fs::write(
        dir.join("main.yaml"),
        MAIN_YAML.replace("LISTEN", api_listen),
    )
    .unwrap();
    let sock = dir.join("in.sock");
    fs::write(
        dir.join("conf.d/10-in.json"),
        INBOUNDS_JSONC.replace("SOCK", sock.to_str().unwrap()),
    )
    .unwrap();
    fs::write(dir.join("conf.d/20-out.json"), OUTBOUNDS_JSON).unwrap();
    let rt = Launched::start(
        ns,
        &dir.join("bin/xray"),
        &["-config", "main.yaml", "-confdir", "conf.d"],
        &dir,
        &[("RL_TEST_PORT", "21093")],
        Some(dir.clone()),
    );
    (rt, dir)
}

fn json(out: &str) -> Value {
    serde_json::from_str(out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
}

fn target<'a>(v: &'a Value, pid: &str) -> &'a Value {
    v["targets"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["host_process"]["pid"].as_u64() == pid.parse().ok())
        .unwrap_or_else(|| panic!("pid {pid} not listed: {v}"))
}

fn by_tag<'a>(list: &'a Value, tag: &str) -> &'a Value {
    list.as_array()
        .unwrap()
        .iter()
        .find(|x| x["tag"] == tag)
        .unwrap_or_else(|| panic!("{tag} not in {list}"))
}

fn concrete(list: &Value, tag: &str) -> String {
    let l = &by_tag(list, tag)["limit"];
    assert_eq!(l["concrete"], true, "{tag}: {l}");
    l["selector"].as_str().unwrap().to_string()
}

fn blocked(list: &Value, tag: &str, needle: &str) {
    let l = &by_tag(list, tag)["limit"];
    assert_eq!(l["concrete"], false, "{tag}: {l}");
    let why = l["blocked"].as_str().unwrap();
    assert!(why.contains(needle), "{tag}: {why:?} lacks {needle:?}");
}

#[test]
fn discover_and_inspect_real_runtimes() {
    require(&[need::NAMESPACE, &[need::VETH, need::V2RAY]]);
    let ns = Netns::new("disc");
    let (xray, dir) = start_xray(&ns, "127.0.0.1");
    // A second copy named xray, found through config.json in its working directory.
    let dir2 = temp_dir("xray-cwd");
    fs::copy(V2RAY_BIN, dir2.join("xray")).unwrap();
    fs::write(
        dir2.join("config.json"),
        r#"{"inbounds": [{"tag": "socks-in", "listen": "127.0.0.1", "port": 22080, "protocol": "socks", "settings": {}}],
            "outbounds": [{"tag": "direct", "protocol": "freedom"}]}"#,
    )
    .unwrap();
    let xray2 = Launched::start(&ns, &dir2.join("xray"), &[], &dir2, &[], Some(dir2.clone()));
    // Debian's v2ray itself, with -config.
    let v2 = common::V2ray::start(&ns);
    let (p1, p2, p3) = (xray.pid(), xray2.pid(), v2.pid());

    // discover: every runtime, with its namespace, config, start time and owner.
    let (code, out, err) = raylimit_env(&["discover", "--format", "json"], &[NO_ENGINE]);
    assert_eq!(code, 0, "{err}");
    let d = json(&out);
    let t1 = target(&d, &p1);
    assert_eq!(t1["source"], "host_process");
    assert_eq!(t1["identity"]["binary"], "xray");
    assert_eq!(t1["network_namespace"]["name"], ns.name.as_str());
    assert_eq!(t1["network_namespace"]["host"], false);
    let d1 = dir.to_str().unwrap();
    assert_eq!(
        t1["host_process"]["config_paths"],
        serde_json::json!([
            format!("{d1}/main.yaml"),
            format!("{d1}/conf.d/10-in.json"),
            format!("{d1}/conf.d/20-out.json")
        ])
    );
    let stat = fs::read_to_string(format!("/proc/{p1}/stat")).unwrap();
    let start: u64 = stat[stat.rfind(')').unwrap() + 1..]
        .split_whitespace()
        .nth(19)
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(t1["host_process"]["start_time"], start);
    // And as a date: boot time plus the start ticks, within the last hour.
    let boot = raylimit::time::boot_time(std::path::Path::new("/proc")).unwrap();
    let secs = raylimit::time::started_at(start, boot, raylimit::time::ticks_per_second());
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(secs <= now + 1 && secs + 3600 > now, "{secs} vs {now}");
    assert_eq!(t1["host_process"]["started_at"], raylimit::time::utc(secs));
    assert_eq!(
        t1["owner"],
        // The config directory as a directory: a file added to it keeps the owner.
        format!("host:{d1}/bin/xray config={d1}/main.yaml,{d1}/conf.d/")
    );
    let t2 = target(&d, &p2);
    assert_eq!(
        t2["host_process"]["config_paths"],
        serde_json::json!([format!("{}/config.json", dir2.display())])
    );
    assert_eq!(
        t2["host_process"]["config_origin"],
        "the default config in the working directory"
    );
    let t3 = target(&d, &p3);
    assert_eq!(t3["identity"]["binary"], "v2ray");
    assert_eq!(
        t3["host_process"]["config_paths"][0],
        v2.config.to_str().unwrap()
    );
    // The missing engine is reported, and the host provider listed regardless.
    let issue = &d["provider_errors"][0];
    assert_eq!(
        (issue["provider"].as_str(), issue["code"].as_str()),
        (Some("docker"), Some("unavailable"))
    );
    let (_, text, _) = raylimit_env(&["discover"], &[NO_ENGINE]);
    assert!(
        text.contains(&format!("network namespace: {} (net:[", ns.name)),
        "{text}"
    );
    assert!(
        text.contains("Provider issues:\n- docker (docker_container): cannot connect"),
        "{text}"
    );

    // inspect: files, API, inbounds, outbounds and every verdict.
    let (code, out, err) =
        raylimit_env(&["inspect", "--pid", &p1, "--format", "json"], &[NO_ENGINE]);
    assert_eq!(code, 0, "{err}");
    let v = json(&out);
    let t = &v["targets"][0];
    assert_eq!(v["targets"].as_array().unwrap().len(), 1);
    for f in t["config"]["files"].as_array().unwrap() {
        assert_eq!(f["status"], "read", "{f}");
    }
    let ib = &t["inbounds"];
    assert_eq!(concrete(ib, "vmess-in"), "tcp listener 127.0.0.1:21086");
    assert_eq!(
        concrete(ib, "ws-in"),
        "tcp listener on port 21087 (every address)"
    );
    assert_eq!(concrete(ib, "env-in"), "tcp listener 127.0.0.1:21093");
    assert_eq!(concrete(ib, "kcp-in"), "udp listener 127.0.0.1:21092");
    blocked(ib, "range-in", "several ports (21090-21091)");
    blocked(ib, "unix-in", "unix socket");
    let alice = &by_tag(ib, "vmess-in")["users"][0];
    assert_eq!(
        (alice["email"].as_str(), alice["id"].as_str()),
        (
            Some("alice@example.com"),
            Some("11111111-1111-4111-8111-111111111111")
        )
    );
    assert_eq!(by_tag(ib, "ws-in")["transport"], "ws");
    let ob = &t["outbounds"];
    assert_eq!(concrete(ob, "direct"), "socket mark 0x10");
    assert!(by_tag(ob, "direct")["limit"]["notes"][0]
        .as_str()
        .unwrap()
        .contains("\"chained\" chains through \"direct\""));
    blocked(ob, "shared-a", "shared with outbound shared-b");
    blocked(ob, "chained", "proxySettings.tag");
    blocked(ob, "plain", "no socket mark");
    // Outbounds of later files go first, as in Xray.
    let order: Vec<&str> = ob
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["tag"].as_str().unwrap())
        .collect();
    assert_eq!(
        order,
        ["shared-a", "shared-b", "chained", "plain", "direct"]
    );
    assert_eq!(t["api_capability"]["status"], "likely_configured");
    assert_eq!(t["api_endpoints"][0]["address"], "127.0.0.1:21085");
    assert_eq!(t["api_endpoints"][0]["via"], "routing");
    assert!(
        t["api_reachability"].as_str().unwrap().contains(&ns.name),
        "{t}"
    );

    let (_, text, _) = raylimit_env(&["inspect", "--pid", &p1], &[NO_ENGINE]);
    for line in [
        "       - vmess-in (vmess) on 127.0.0.1 port 21086, transport tcp (tcp)",
        "         user: alice@example.com 11111111-1111-4111-8111-111111111111",
        "         limit: concrete: tcp listener 127.0.0.1:21086",
        "         limit: blocked: inbound \"range-in\" listens on several ports (21090-21091)",
        "       endpoint: api-in 127.0.0.1:21085 (via routing)",
    ] {
        assert!(text.contains(line), "{line:?} not in:\n{text}");
    }

    // No selector: every runtime. A selector matching two needs --all.
    let (_, out, _) = raylimit_env(&["inspect", "--format", "json"], &[NO_ENGINE]);
    let all = json(&out);
    for p in [&p1, &p2, &p3] {
        target(&all, p);
    }
    let (code, out, err) = raylimit_env(&["inspect", "--name", "xray"], &[NO_ENGINE]);
    assert_eq!((code, out.as_str()), (1, ""), "{err}");
    assert!(
        err.contains("runtimes match the selection") && err.contains("--all"),
        "{err}"
    );
    let (code, out, _) = raylimit_env(
        &["inspect", "--name", "xray", "--all", "--format", "json"],
        &[NO_ENGINE],
    );
    assert_eq!(code, 0);
    let both = json(&out);
    assert!(both["targets"].as_array().unwrap().len() >= 2);
    target(&both, &p1);
    target(&both, &p2);
    let (code, _, err) = raylimit_env(&["inspect", "--pid", "0x1"], &[NO_ENGINE]);
    assert_eq!(code, 2, "{err}");

    // limit --inbound: a plan from the listener; --outbound: dry-run plans from the verdicts.
    ns.ip(&["link", "add", "rl0", "type", "veth", "peer", "name", "rl1"]);
    let netns = ns.name.as_str();
    let tagged_limit = |flag: &str, tag: &str, direction: &str, rate: &str, extra: &[&str]| {
        let mut args = vec![
            "--netns",
            netns,
            "limit",
            flag,
            tag,
            "--device",
            "rl0",
            "--direction",
            direction,
            "--rate",
            rate,
            "--pid",
            &p1,
        ];
        args.extend_from_slice(extra);
        raylimit_env(&args, &[NO_ENGINE])
    };
    let (code, out, err) = tagged_limit("--inbound", "vmess-in", "download", "1MB/s", &[]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("Selector: tcp listener 127.0.0.1:21086"),
        "{out}"
    );
    assert!(
        out.contains("match ip src 127.0.0.1/32 match ip sport 21086 0xffff"),
        "{out}"
    );
    assert!(out.contains("Outcome: plan ready"), "{out}");
    let (code, out, _) = tagged_limit(
        "--outbound",
        "plain",
        "upload",
        "1000",
        &["--format", "json"],
    );
    assert_eq!(code, 0);
    let r = json(&out);
    assert_eq!(r["evidence"]["concrete"], false);
    assert!(r["execution_note"]
        .as_str()
        .unwrap()
        .contains("has no socket mark"));
    assert_eq!(r["target"]["kind"], "outbound");
    // A mistyped tag is refused, listing the tags there are.
    let (code, out, _) = tagged_limit("--inbound", "vmess-inn", "upload", "1000", &[]);
    assert_eq!(code, 0);
    assert!(
        out.contains("no inbound tagged \"vmess-inn\" in the runtime's config (")
            && out.contains("; its inbounds are ")
            && out.contains("vmess-in"),
        "{out}"
    );
    // Upload only reads marks: mark 0x10 is matched exactly, whatever raylimit's mask.
    let (code, out, err) = tagged_limit("--outbound", "direct", "upload", "1000", &[]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("meta mark & 0xffffffff == 0x00000010"),
        "{out}"
    );
    // Download writes the connection's mark under the mask: 0x10 is outside the default mask
    // (0x0f000000), refused, naming why and a mask that covers it.
    let (code, _, err) = tagged_limit("--outbound", "direct", "download", "1000", &["--execute"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("outside the mark mask 0x0f000000")
            && err.contains("give --mark-mask 0x000000ff"),
        "{err}"
    );
    let (code, out, err) = tagged_limit(
        "--outbound",
        "direct",
        "upload",
        "1000",
        &["--mark-mask", "0xff"],
    );
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("meta mark & 0x000000ff == 0x00000010"),
        "{out}"
    );

    // A -config file removed after start: reported missing; what it defined is gone from the
    // readable config, what later files define stays concrete, and a mark's uniqueness can no
    // longer be checked.
    fs::remove_file(dir.join("main.yaml")).unwrap();
    let (_, out, _) = raylimit_env(&["inspect", "--pid", &p1, "--format", "json"], &[NO_ENGINE]);
    let t = json(&out)["targets"][0].clone();
    assert_eq!(t["config"]["files"][0]["status"], "missing");
    assert_eq!(t["api_capability"]["status"], "unknown");
    assert_eq!(
        concrete(&t["inbounds"], "vmess-in"),
        "tcp listener 127.0.0.1:21086"
    );
    let (code, out, _) = tagged_limit("--outbound", "direct", "upload", "1000", &[]);
    assert_eq!(code, 0);
    assert!(out.contains("no outbound tagged \"direct\" in the readable config, and the runtime's config could not be read in full"), "{out}");
    blocked(&t["outbounds"], "shared-a", "cannot be checked");
}

#[test]
fn a_container_runtime_is_listed_once_under_its_name() {
    require(&[
        need::NAMESPACE,
        &[need::VETH, need::V2RAY, need::PIDS_CGROUP],
    ]);
    let ns = Netns::new("ctr");
    let id = "c0ffee".repeat(10) + "c0ff";
    assert_eq!(id.len(), 64);
    let cgroup;
    let (xray, _dir) = start_xray(&ns, "0.0.0.0");
    cgroup = ContainerCgroup::enter(&id, &xray.pid());
    let pid = xray.pid();
    let engine = FakeEngine::start(
        &id,
        "edge-test",
        xray.child.id(),
        r#"{"21085/tcp":[{"HostIp":"","HostPort":"31085"}]}"#,
    );
    let host = engine.docker_host();
    let env = [("DOCKER_HOST", host.as_str())];

    let (code, out, err) = raylimit_env(&["discover", "--format", "json"], &env);
    assert_eq!(code, 0, "{err}");
    let d = json(&out);
    let listed: Vec<&Value> = d["targets"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["host_process"]["pid"].as_u64() == pid.parse().ok())
        .collect();
    assert_eq!(listed.len(), 1, "listed once: {d}");
    let t = listed[0];
    assert_eq!(t["source"], "docker_container");
    assert_eq!(t["identity"]["name"], "edge-test");
    assert_eq!(t["docker_container"]["id"], id.as_str());
    assert_eq!(t["host_process"]["container_id"], id.as_str());
    assert_eq!(t["owner"], "container:edge-test");
    assert_eq!(d["provider_errors"], serde_json::json!([]));

    // Selected by name or id prefix; the API is reachable through the published port.
    for sel in [
        ["--container", "edge-test"],
        ["--container", &id[..8]],
        ["--name", "edge-test"],
    ] {
        let (code, out, err) = raylimit_env(&["inspect", sel[0], sel[1], "--format", "json"], &env);
        assert_eq!(code, 0, "{sel:?}: {err}");
        let t = &json(&out)["targets"][0];
        assert_eq!(t["identity"]["name"], "edge-test", "{sel:?}");
        assert_eq!(
            t["reachable_api_endpoints"],
            serde_json::json!(["127.0.0.1:31085 (published port of 0.0.0.0:21085)"])
        );
    }
    // --source host_process skips the engine, and the record stays a process with its cgroup id.
    let (code, out, _) = raylimit_env(
        &[
            "inspect",
            "--source",
            "host_process",
            "--pid",
            &pid,
            "--format",
            "json",
        ],
        &env,
    );
    assert_eq!(code, 0);
    let t = &json(&out)["targets"][0];
    assert_eq!(t["source"], "host_process");
    assert_eq!(t["owner"], format!("container:{id}"));

    // The limit report carries the container's name as the owner.
    ns.ip(&["link", "add", "rl0", "type", "veth", "peer", "name", "rl1"]);
    let state = state_dir("ctr");
    let (code, out, err) = common::raylimit_in(
        &state,
        &[
            "--netns",
            &ns.name,
            "limit",
            "--ip",
            "10.9.9.9",
            "--device",
            "rl0",
            "--direction",
            "download",
            "--rate",
            "1000000",
            "--container",
            "edge-test",
            "--format",
            "json",
        ],
    );
    // Without the engine, the name is unknown: the cgroup's id still selects it, and owns it.
    assert_eq!(code, 1, "{out}");
    assert!(err.contains("no Xray or V2Ray runtime matches"), "{err}");
    let (code, out, err) = common::raylimit_in(
        &state,
        &[
            "--netns",
            &ns.name,
            "limit",
            "--ip",
            "10.9.9.9",
            "--device",
            "rl0",
            "--direction",
            "download",
            "--rate",
            "1000000",
            "--container",
            &id[..12],
            "--format",
            "json",
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(json(&out)["runtime"]["owner"], format!("container:{id}"));
    let (code, out, err) = raylimit_env(
        &[
            "--netns",
            &ns.name,
            "limit",
            "--ip",
            "10.9.9.9",
            "--device",
            "rl0",
            "--direction",
            "download",
            "--rate",
            "1000000",
            "--container",
            "edge-test",
            "--format",
            "json",
        ],
        &env,
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(json(&out)["runtime"]["owner"], "container:edge-test");

    // A silent engine: reported after the deadline, and the host provider still lists.
    let silent_dir = temp_dir("silent");
    let silent = silent_dir.join("docker.sock");
    let _listener = UnixListener::bind(&silent).unwrap();
    let silent_host = format!("unix://{}", silent.display());
    let (code, out, err) = raylimit_env(
        &["discover", "--format", "json"],
        &[
            ("DOCKER_HOST", silent_host.as_str()),
            ("RAYLIMIT_ENGINE_TIMEOUT_MS", "300"),
        ],
    );
    assert_eq!(code, 0, "{err}");
    let d = json(&out);
    assert!(
        d["provider_errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("did not answer in time"),
        "{d}"
    );
    assert_eq!(target(&d, &pid)["source"], "host_process");
    let _ = fs::remove_dir_all(&silent_dir);
    drop(engine);
    drop(xray);
    drop(cgroup);
}

#[test]
fn a_restarted_runtime_keeps_its_limits() {
    require(&[need::NAMESPACE, need::DOWNLOAD, &[need::VETH, need::V2RAY]]);
    let ns = Netns::new("restart");
    ns.ip(&["link", "add", "rl0", "type", "veth", "peer", "name", "rl1"]);
    let state = state_dir("restart");
    let dir = temp_dir("restart");
    fs::copy(V2RAY_BIN, dir.join("xray")).unwrap();
    fs::write(
        dir.join("config.jsonc"),
        "// jsonc\n{\"inbounds\": [{\"tag\": \"s\", \"listen\": \"127.0.0.1\", \"port\": 22081, \"protocol\": \"socks\", \"settings\": {}}], \"outbounds\": [{\"protocol\": \"freedom\"}]}",
    )
    .unwrap();
    let start = || {
        Launched::start(
            &ns,
            &dir.join("xray"),
            &["-c", "config.jsonc"],
            &dir,
            &[],
            None,
        )
    };
    let limit = |pid: &str, extra: &[&str]| {
        let mut args = vec![
            "--netns",
            ns.name.as_str(),
            "limit",
            "--ip",
            "10.9.9.8",
            "--device",
            "rl0",
            "--direction",
            "download",
            "--pid",
            pid,
            "--execute",
            "--format",
            "json",
        ];
        args.extend_from_slice(extra);
        let (code, out, err) = common::raylimit_in(&state, &args);
        assert_eq!(code, 0, "{err}\n{out}");
        json(&out)
    };
    let first = start();
    let a = limit(&first.pid(), &["--rate", "1000000"]);
    assert_eq!(a["decision"]["kind"], "apply");
    let owner = a["runtime"]["owner"].clone();
    assert_eq!(
        owner,
        format!(
            "host:{}/xray config={}/config.jsonc",
            dir.display(),
            dir.display()
        )
    );
    drop(first);
    let second = start();
    let b = limit(&second.pid(), &["--rate", "1000000"]);
    assert_eq!(b["decision"]["kind"], "no_op", "{b}");
    assert_eq!(b["runtime"]["owner"], owner);
    let (code, status, _) = common::raylimit_in(&state, &["--netns", ns.name.as_str(), "status"]);
    assert_eq!(code, 0);
    assert!(
        status.contains(&format!("owner {}", owner.as_str().unwrap())),
        "{status}"
    );
    let c = limit(&second.pid(), &["--remove"]);
    assert_eq!(c["decision"]["kind"], "remove", "{c}");
    drop(second);
    let _ = fs::remove_dir_all(&dir);
}

/// Runs `inspect --pid PID --format json` in `ns` until `ready` holds for the runtime's entry
/// (v2ray opens its listeners a moment after it starts), at most 5 s.
fn inspect_until(ns: &Netns, pid: &str, ready: impl Fn(&Value) -> bool) -> Value {
    let state = state_dir("scope");
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let (code, out, err) = raylimit_env(
            &[
                "--netns", &ns.name, "inspect", "--pid", pid, "--format", "json",
            ],
            &[NO_ENGINE, ("RAYLIMIT_STATE_DIR", state.0.to_str().unwrap())],
        );
        assert_eq!(code, 0, "{err}");
        let v = json(&out);
        let t = target(&v, pid).clone();
        if ready(&t) || std::time::Instant::now() > deadline {
            return t;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn inspect_shows_the_client_facing_sockets_the_runtime_holds() {
    require(&[need::NAMESPACE, &[need::V2RAY]]);
    let ns = Netns::new("scope");
    let dir = temp_dir("scope");
    // A socks inbound on one address with UDP, a wildcard vmess inbound, and the API's own
    // inbound, which is not client-facing.
    fs::write(
        dir.join("config.json"),
        r#"{"api": {"tag": "api", "services": ["StatsService"]},
            "inbounds": [
              {"tag": "socks-in", "listen": "127.0.0.1", "port": 23080, "protocol": "socks", "settings": {"udp": true}},
              {"tag": "vmess-in", "port": 23081, "protocol": "vmess", "settings": {"clients": []}},
              {"tag": "api-in", "listen": "127.0.0.1", "port": 23085, "protocol": "dokodemo-door", "settings": {"address": "127.0.0.1"}}],
            "routing": {"rules": [{"type": "field", "inboundTag": ["api-in"], "outboundTag": "api"}]},
            "outbounds": [{"tag": "direct", "protocol": "freedom"}]}"#,
    )
    .unwrap();
    let rt = Launched::start(
        &ns,
        std::path::Path::new(V2RAY_BIN),
        &["-config", "config.json"],
        &dir,
        &[],
        None,
    );
    let pid = rt.pid();
    let endpoints = |t: &Value| -> Vec<String> {
        t["scope"]["endpoints"]
            .as_array()
            .map(|l| {
                l.iter()
                    .map(|e| format!("{} {} {}", e["transport"], e["port"], e["inbound"]))
                    .collect()
            })
            .unwrap_or_default()
    };
    let t = inspect_until(&ns, &pid, |t| endpoints(t).len() >= 3);
    assert_eq!(t["scope"]["kind"], "runtime_listeners", "{}", t["scope"]);
    let mut got = endpoints(&t);
    got.sort();
    assert_eq!(
        got,
        [
            r#""tcp" 23080 "socks-in""#,
            r#""tcp" 23081 "vmess-in""#,
            r#""udp" 23080 "socks-in""#
        ],
        "{}",
        t["scope"]
    );
    drop(rt);

    // A transparent proxy's packets carry other hosts' addresses: no scope, and why.
    fs::write(
        dir.join("tproxy.json"),
        r#"{"inbounds": [{"tag": "tp", "port": 23090, "protocol": "dokodemo-door",
              "settings": {"network": "tcp", "followRedirect": true}}],
            "outbounds": [{"tag": "direct", "protocol": "freedom"}]}"#,
    )
    .unwrap();
    let rt = Launched::start(
        &ns,
        std::path::Path::new(V2RAY_BIN),
        &["-config", "tproxy.json"],
        &dir,
        &[],
        None,
    );
    let pid = rt.pid();
    let t = inspect_until(&ns, &pid, |t| !t["scope"].is_null());
    assert_eq!(t["scope"]["kind"], "unscoped", "{}", t["scope"]);
    let why = t["scope"]["reason"].as_str().unwrap();
    assert!(
        why.contains("\"tp\" is a transparent proxy (dokodemo-door with followRedirect)"),
        "{why}"
    );
    // A limit on its clients is refused, naming why; `--scope device` is the explicit way out.
    let state = state_dir("tproxy");
    let limit = |extra: &[&str]| {
        let mut args = vec![
            "--netns",
            &ns.name,
            "limit",
            "--pid",
            &pid,
            "--device",
            "lo",
            "--ip",
            "10.0.0.9",
            "--direction",
            "download",
            "--execute",
        ];
        args.extend_from_slice(extra);
        let state_path = state.0.to_string_lossy().into_owned();
        raylimit_env(&args, &[("RAYLIMIT_STATE_DIR", state_path.as_str())])
    };
    let (code, out, err) = limit(&["--rate", "1000"]);
    assert_eq!(code, 1, "{out}");
    assert!(
        err.contains("transparent proxy") && err.contains("--scope device"),
        "{err}"
    );
    assert!(!ns.tc(&["qdisc", "show", "dev", "lo"]).contains("htb"));
    let (code, out, err) = limit(&["--rate", "1000", "--scope", "device"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("Scope: device-wide (--scope device): every packet to or from the client's address on lo"), "{out}");
    let (code, _, err) = limit(&["--remove"]);
    assert_eq!(code, 0, "{err}");
}

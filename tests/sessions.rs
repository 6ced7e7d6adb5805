//! Live session evidence against a real runtime: Debian's `v2ray` as the server in one namespace
//! and as a VMess client in another, two users sending from two client addresses
//! (`sendThrough`), real traffic through both. per_ip, uuid, connection and watch are driven
//! through the real binary and measured.

mod common;

use std::time::{Duration, Instant};

use common::proxy::*;
use common::*;
use serde_json::Value;

const ALICE: &str = "11111111-1111-4111-8111-111111111111";
const BOB: &str = "22222222-2222-4222-8222-222222222222";
const ALICE_IP: &str = "10.99.0.2";
const BOB_IP: &str = "10.99.0.3";
/// The target every proxied connection reaches, in the server namespace.
const TARGET: &str = "10.99.0.1:5201";
const ALICE_PORT: u16 = 15201;
const BOB_PORT: u16 = 15202;

/// The server runtime, the client runtime, and the target behind the server.
struct Setup {
    pair: Pair,
    server: Launched,
    _client: Launched,
    target: Target,
    state: StateDir,
}

impl Setup {
    fn new(tag: &str) -> Setup {
        Setup::with_api_listen(tag, None)
    }

    /// `api_listen`: an `api.listen` address for the config (Xray serves it; v2ray 4.34 ignores
    /// it and keeps its API on the `api-in` inbound).
    fn with_api_listen(tag: &str, api_listen: Option<&str>) -> Setup {
        let pair = Pair::new(tag);
        pair.client
            .ip(&["addr", "add", "10.99.0.3/24", "dev", "veth-c"]);
        let dir = temp_dir(&format!("{tag}-srv"));
        let server_cfg = r#"{"log":{"loglevel":"warning","access":"DIR/access.log"},
 "api":{"tag":"api","services":["StatsService"]LISTEN},
 "stats":{},
 "policy":{"levels":{"0":{"statsUserUplink":true,"statsUserDownlink":true}}},
 "inbounds":[
  {"tag":"api-in","listen":"127.0.0.1","port":10085,"protocol":"dokodemo-door","settings":{"address":"127.0.0.1"}},
  {"tag":"vmess-in","listen":"10.99.0.1","port":10086,"protocol":"vmess","settings":{"clients":[
     {"id":"ALICE","alterId":0,"email":"alice@example.com","level":0},
     {"id":"BOB","alterId":0,"email":"bob@example.com","level":0}]}}],
 "outbounds":[{"tag":"direct","protocol":"freedom","settings":{}}],
 "routing":{"rules":[{"type":"field","inboundTag":["api-in"],"outboundTag":"api"}]}}"#
            .replace("DIR", &dir.to_string_lossy())
            .replace(
                "LISTEN",
                &api_listen
                    .map(|l| format!(r#","listen":"{l}""#))
                    .unwrap_or_default(),
            )
            .replace("ALICE", ALICE)
            .replace("BOB", BOB);
        std::fs::write(dir.join("server.json"), server_cfg).unwrap();
        let client_cfg = r#"{"log":{"loglevel":"warning"},
 "inbounds":[
  {"tag":"fwd-alice","listen":"127.0.0.1","port":15201,"protocol":"dokodemo-door","settings":{"address":"10.99.0.1","port":5201,"network":"tcp"}},
  {"tag":"fwd-bob","listen":"127.0.0.1","port":15202,"protocol":"dokodemo-door","settings":{"address":"10.99.0.1","port":5201,"network":"tcp"}}],
 "outbounds":[
  {"tag":"vm-alice","protocol":"vmess","sendThrough":"10.99.0.2","settings":{"vnext":[{"address":"10.99.0.1","port":10086,"users":[{"id":"ALICE","alterId":0,"security":"aes-128-gcm"}]}]}},
  {"tag":"vm-bob","protocol":"vmess","sendThrough":"10.99.0.3","settings":{"vnext":[{"address":"10.99.0.1","port":10086,"users":[{"id":"BOB","alterId":0,"security":"aes-128-gcm"}]}]}}],
 "routing":{"rules":[{"type":"field","inboundTag":["fwd-alice"],"outboundTag":"vm-alice"},
                     {"type":"field","inboundTag":["fwd-bob"],"outboundTag":"vm-bob"}]}}"#
            .replace("ALICE", ALICE)
            .replace("BOB", BOB);
        std::fs::write(dir.join("client.json"), client_cfg).unwrap();
        let v2ray = std::path::Path::new(V2RAY_BIN);
        let server_path = dir.join("server.json");
        let client_path = dir.join("client.json");
        let client = Launched::start(
            &pair.client,
            v2ray,
            &["-config", &client_path.to_string_lossy()],
            &dir,
            &[],
            None,
        );
        let server = Launched::start(
            &pair.server,
            v2ray,
            &["-config", &server_path.to_string_lossy()],
            &dir,
            &[],
            Some(dir.clone()),
        );
        let target = Target::start(&pair.server, TARGET);
        Setup {
            pair,
            server,
            _client: client,
            target,
            state: state_dir(tag),
        }
    }

    fn raylimit(&self, args: &[&str]) -> (i32, String, String) {
        let mut full: Vec<&str> = vec!["--netns", &self.pair.server.name];
        full.extend_from_slice(args);
        raylimit_in(&self.state, &full)
    }

    /// `raylimit limit --pid <server> ARGS` in the server namespace.
    fn limit(&self, args: &[&str]) -> (i32, String, String) {
        let pid = self.server.pid();
        let mut full = vec!["limit", "--pid", &pid];
        full.extend_from_slice(args);
        self.raylimit(&full)
    }

    fn limit_json(&self, args: &[&str]) -> Value {
        let pid = self.server.pid();
        let mut full = vec!["limit", "--pid", &pid, "--format", "json"];
        full.extend_from_slice(args);
        let (code, out, err) = self.raylimit(&full);
        assert_eq!(code, 0, "{args:?}: {err}\n{out}");
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
    }

    /// A flow through the client runtime as a user: `S` has the target send (download), `R`
    /// has it receive (upload), `H` holds the connection idle. Stops after `secs`.
    fn flow(&self, port: u16, command: u8, secs: u64) -> Flow {
        Flow::start(
            &self.pair.client,
            port,
            command,
            secs,
            self.target.received.clone(),
        )
    }
}

/// `--ip all --ip-aggregation per_ip --device veth-s --direction DIRECTION` and the rest.
fn per_ip<'a>(direction: &'a str, rest: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec![
        "--ip",
        "all",
        "--ip-aggregation",
        "per_ip",
        "--device",
        "veth-s",
        "--direction",
        direction,
    ];
    v.extend_from_slice(rest);
    v
}

/// `--uuid ID --device veth-s --direction download` and the rest.
fn uuid<'a>(id: &'a str, rest: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec![
        "--uuid",
        id,
        "--device",
        "veth-s",
        "--direction",
        "download",
    ];
    v.extend_from_slice(rest);
    v
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap_or_else(|| panic!("not a list: {v}"))
        .iter()
        .map(|x| x.as_str().unwrap().to_string())
        .collect()
}

fn per_ip_ips(s: &Setup) -> Vec<String> {
    let v = s.limit_json(&per_ip("download", &["--rate", "100000"]));
    strings(&v["per_ip_expansion"]["client_ips"])
}

#[test]
fn per_ip_expands_to_exactly_the_live_clients_and_removal_covers_departed_ones() {
    require(&[need::RUNTIME_HOST, need::DOWNLOAD]);
    let s = Setup::new("pip");
    // Nobody yet: the expansion is empty and says so.
    assert!(per_ip_ips(&s).is_empty());

    let alice = s.flow(ALICE_PORT, b'H', 30);
    let bob = s.flow(BOB_PORT, b'H', 30);
    wait_for("both clients", 10, || per_ip_ips(&s).len() == 2);
    let v = s.limit_json(&per_ip("download", &["--rate", "100000"]));
    assert_eq!(
        strings(&v["per_ip_expansion"]["client_ips"]),
        [ALICE_IP, BOB_IP]
    );
    assert_eq!(v["per_ip_expansion"]["state"], "available");
    assert_eq!(
        v["per_ip_expansion"]["targets"].as_array().unwrap().len(),
        2
    );
    // Evidence: each connection attributed to its user from the access log, the API excluded.
    let conns = v["evidence"]["connections"].as_array().unwrap();
    assert_eq!(conns.len(), 2, "{conns:?}");
    for c in conns {
        let (ip, email) = if c["client"].as_str().unwrap().starts_with(ALICE_IP) {
            (ALICE_IP, "alice@example.com")
        } else {
            (BOB_IP, "bob@example.com")
        };
        assert!(c["client"].as_str().unwrap().starts_with(ip));
        assert_eq!(c["inbound"], "vmess-in");
        assert_eq!(c["user"], email);
        assert_eq!(c["user_source"], "access_log");
    }

    // inspect shows the same sessions, attributed, with the users' byte counters.
    let pid = s.server.pid();
    let (code, out, err) = s.raylimit(&["inspect", "--pid", &pid]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("live sessions: available"), "{out}");
    assert!(
        out.contains("(inbound vmess-in), user alice@example.com via access_log"),
        "{out}"
    );
    assert!(
        out.contains("(inbound vmess-in), user bob@example.com via access_log"),
        "{out}"
    );
    assert!(
        out.contains("- alice@example.com: available (1 live client address(es)): 10.99.0.2"),
        "{out}"
    );
    assert!(out.contains("user traffic (StatsService):"), "{out}");

    // --inbound narrows to one listener; an unknown tag blocks.
    let narrowed = s.limit_json(&[
        "--ip",
        "all",
        "--ip-aggregation",
        "per_ip",
        "--inbound",
        "vmess-in",
        "--device",
        "veth-s",
        "--direction",
        "download",
        "--rate",
        "100000",
    ]);
    assert_eq!(
        strings(&narrowed["per_ip_expansion"]["client_ips"]).len(),
        2
    );
    let unknown = s.limit_json(&[
        "--ip",
        "all",
        "--ip-aggregation",
        "per_ip",
        "--inbound",
        "api-in",
        "--device",
        "veth-s",
        "--direction",
        "download",
        "--rate",
        "100000",
    ]);
    assert_eq!(unknown["execution_blocked"], true);

    // Execute: one class per client, in the kernel.
    let (code, out, err) = s.limit(&per_ip("download", &["--rate", "100000", "--execute"]));
    assert_eq!(code, 0, "{err}\n{out}");
    let tc = s.pair.server.tc(&["filter", "show", "dev", "veth-s"]);
    assert!(tc.contains("0a630002") && tc.contains("0a630003"), "{tc}");

    // Alice leaves; her rule stays until removed, and removal covers her too.
    alice.stop();
    wait_for("alice gone", 10, || per_ip_ips(&s) == [BOB_IP]);
    let (code, out, err) = s.limit(&per_ip("download", &["--remove", "--execute"]));
    assert_eq!(code, 0, "{err}\n{out}");
    assert!(out.contains("Visible client IPs: 2"), "{out}");
    let qdisc = s.pair.server.tc(&["qdisc", "show", "dev", "veth-s"]);
    assert!(!qdisc.contains("htb"), "{qdisc}");
    bob.stop();
}

#[test]
fn a_uuid_limit_holds_that_user_while_the_other_runs_unshaped() {
    require(&[need::RUNTIME_HOST, need::DOWNLOAD]);
    let s = Setup::new("uid");
    let rate = 300_000.0;
    let alice = s.flow(ALICE_PORT, b'S', 25);
    let bob = s.flow(BOB_PORT, b'S', 25);
    wait_for("both users attributed", 10, || {
        let v = s.limit_json(&uuid(ALICE, &["--rate", "300000"]));
        v["execution_blocked"] == false
    });
    // By email too, resolved through the config to the same user.
    let by_email = s.limit_json(&uuid("alice@example.com", &["--rate", "300000"]));
    assert_eq!(by_email["target"]["value"], ALICE);
    let ev = &by_email["evidence"];
    let alice_ev = ev["users"]
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["email"] == "alice@example.com")
        .unwrap();
    assert_eq!(strings(&alice_ev["ips"]), [ALICE_IP]);
    assert_eq!(alice_ev["state"], "available");
    assert_eq!(alice_ev["source"], "access_log");
    // StatsService counters for both users, read over gRPC inside the runtime's namespace.
    let traffic = ev["traffic"].as_array().unwrap_or_else(|| panic!("{ev}"));
    assert!(traffic
        .iter()
        .any(|t| t["email"] == "alice@example.com" && t["downlink_bytes"].as_u64() > Some(0)));

    let (code, out, err) = s.limit(&uuid(
        ALICE,
        &["--rate", "300000", "--execute", "--format", "json"],
    ));
    assert_eq!(code, 0, "{err}\n{out}");
    let v: Value = serde_json::from_str(&out).unwrap();
    let class = v["plan"]["class_id"].as_str().unwrap().to_string();
    std::thread::sleep(Duration::from_millis(1500));
    let before = class_bytes(&s.pair.server, "veth-s", &class);
    let start = Instant::now();
    let alice_rate = alice.rate(false, 4.0);
    let wire = (class_bytes(&s.pair.server, "veth-s", &class) - before) as f64
        / start.elapsed().as_secs_f64();
    let bob_rate = bob.rate(false, 2.0);
    // On the wire (L2 bytes, what the rate means) within 10%; the application's goodput is that
    // less TCP/IP and VMess framing.
    assert_within_10_percent("alice (uuid limit, download, on the wire)", wire, rate);
    let ratio = alice_rate / rate;
    eprintln!(
        "alice goodput {alice_rate:.0} B/s ({:+.1}%)",
        (ratio - 1.0) * 100.0
    );
    assert!((0.8..=1.1).contains(&ratio), "goodput {alice_rate:.0} B/s");
    assert!(
        bob_rate > 3.0 * rate,
        "bob should run unshaped: {bob_rate:.0} B/s"
    );
    // Repeat is no_op; status names the user; remove leaves nothing.
    let again = s.limit_json(&uuid(ALICE, &["--rate", "300000"]));
    assert_eq!(again["decision"]["kind"], "no_op");
    let (_, status, _) = s.raylimit(&["status"]);
    assert!(
        status.contains(&format!("uuid {ALICE}")) && status.contains(ALICE_IP),
        "{status}"
    );
    assert!(
        status.contains("user traffic (StatsService): alice@example.com: uplink"),
        "{status}"
    );
    let (code, out, err) = s.limit(&uuid(ALICE, &["--remove", "--execute"]));
    assert_eq!(code, 0, "{err}\n{out}");
    assert!(!s
        .pair
        .server
        .tc(&["qdisc", "show", "dev", "veth-s"])
        .contains("htb"));
    alice.stop();
    bob.stop();
    // A user with no live connection is blocked with a reason.
    wait_for("alice gone", 10, || {
        let v = s.limit_json(&uuid(ALICE, &["--rate", "300000"]));
        v["execution_blocked"] == true
            && v["execution_note"]
                .as_str()
                .unwrap()
                .contains("no live connection")
    });
}

fn live_connection(s: &Setup, direction: &str) -> String {
    let mut client = String::new();
    wait_for("the connection in the evidence", 10, || {
        let v = s.limit_json(&per_ip(direction, &["--rate", "1000"]));
        match v["evidence"]["connections"]
            .as_array()
            .map(|c| c.as_slice())
        {
            Some([c]) => {
                client = c["client"].as_str().unwrap().to_string();
                true
            }
            _ => false,
        }
    });
    assert!(client.starts_with(ALICE_IP), "{client}");
    client
}

#[test]
fn a_connection_limit_holds_one_connection_and_remove_cleans_up_after_it() {
    require(&[need::RUNTIME_HOST, need::UPLOAD]);
    let s = Setup::new("con");
    for (direction, command, dev) in [
        ("download", b'S', "veth-s".to_string()),
        ("upload", b'R', String::new()),
    ] {
        let rate = 250_000.0;
        let flow = s.flow(ALICE_PORT, command, 25);
        let client = live_connection(&s, direction);
        let (code, out, err) = s.limit(&[
            "--connection",
            &client,
            "--device",
            "veth-s",
            "--direction",
            direction,
            "--rate",
            "250000",
            "--execute",
            "--format",
            "json",
        ]);
        assert_eq!(code, 0, "{err}\n{out}");
        let v: Value = serde_json::from_str(&out).unwrap();
        assert!(v["evidence"]["connections"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["client"] == client.as_str() && c["inbound"] == "vmess-in"));
        let class = v["plan"]["class_id"].as_str().unwrap().to_string();
        let shaped = if dev.is_empty() {
            v["scope"]["shaped_device"].as_str().unwrap().to_string()
        } else {
            dev.clone()
        };
        std::thread::sleep(Duration::from_millis(1500));
        // What HTB let through for this connection, on the wire (rates are L2 bytes, as in tc).
        let before = class_bytes(&s.pair.server, &shaped, &class);
        let start = Instant::now();
        let goodput = flow.rate(command == b'R', 4.0);
        let wire = (class_bytes(&s.pair.server, &shaped, &class) - before) as f64
            / start.elapsed().as_secs_f64();
        assert_within_10_percent(
            &format!("one connection ({direction}, on the wire)"),
            wire,
            rate,
        );
        // What the application got: the wire rate less TCP/IP and VMess framing.
        let ratio = goodput / rate;
        eprintln!(
            "one connection ({direction}): goodput {goodput:.0} B/s ({:+.1}%)",
            (ratio - 1.0) * 100.0
        );
        assert!((0.8..=1.1).contains(&ratio), "goodput {goodput:.0} B/s");

        // A connection that is not live is refused.
        let (code, _, err) = s.limit(&[
            "--connection",
            "10.99.0.2:1",
            "--device",
            "veth-s",
            "--direction",
            direction,
            "--rate",
            "250000",
            "--execute",
        ]);
        assert_eq!(code, 1);
        assert!(err.contains("not a live client connection"), "{err}");

        // The connection goes (download; the upload leg drains its shaped backlog for longer
        // than is worth waiting); its rule is still removed exactly, scaffolding with it.
        flow.stop();
        if direction == "download" {
            wait_for("the connection gone", 10, || {
                s.limit_json(&[
                    "--connection",
                    &client,
                    "--device",
                    "veth-s",
                    "--direction",
                    direction,
                    "--rate",
                    "1000",
                ])["execution_blocked"]
                    == true
            });
        }
        let (code, out, err) = s.limit(&[
            "--connection",
            &client,
            "--device",
            "veth-s",
            "--direction",
            direction,
            "--remove",
            "--execute",
        ]);
        assert_eq!(code, 0, "{err}\n{out}");
        assert!(out.contains("Reconcile decision: remove"), "{out}");
        assert!(!s
            .pair
            .server
            .tc(&["qdisc", "show", "dev", "veth-s"])
            .contains("htb"));
        let links = s.pair.server.ip(&["link", "show"]);
        assert!(!links.contains("rlifb"), "{links}");
    }
}

#[test]
fn watch_adds_a_new_client_and_drops_a_departed_one_after_the_grace_period() {
    require(&[need::RUNTIME_HOST, need::DOWNLOAD]);
    let s = Setup::new("wat");
    let alice = s.flow(ALICE_PORT, b'H', 40);
    wait_for("alice live", 10, || per_ip_ips(&s) == [ALICE_IP]);
    let pid = s.server.pid();
    let log = s.state.0.with_extension("watch.log");
    let mut watch = std::process::Command::new(env!("CARGO_BIN_EXE_raylimit"))
        .args([
            "--netns",
            &s.pair.server.name,
            "watch",
            "--pid",
            &pid,
            "--ip",
            "all",
            "--ip-aggregation",
            "per_ip",
            "--device",
            "veth-s",
            "--direction",
            "download",
            "--rate",
            "100000",
            "--execute",
            "--interval",
            "300ms",
            "--grace",
            "2s",
        ])
        .env("RAYLIMIT_STATE_DIR", &s.state.0)
        .stdout(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let filters = || s.pair.server.tc(&["filter", "show", "dev", "veth-s"]);
    wait_for("alice's rule", 10, || filters().contains("0a630002"));
    let bob = s.flow(BOB_PORT, b'H', 40);
    wait_for("bob's rule", 10, || filters().contains("0a630003"));
    alice.stop();
    let left = Instant::now();
    wait_for("alice's rule gone", 15, || !filters().contains("0a630002"));
    // Not before the grace period (2 s) has passed since she was last seen.
    assert!(
        left.elapsed() >= Duration::from_secs(2),
        "{:?}",
        left.elapsed()
    );
    assert!(filters().contains("0a630003"));

    // SIGTERM: a clean stop, with the state consistent (bob's rule and its annotation).
    unsafe { libc::kill(watch.id() as i32, libc::SIGTERM) };
    let status = watch.wait().unwrap();
    assert!(status.success(), "{status:?}");
    let text = std::fs::read_to_string(&log).unwrap();
    let _ = std::fs::remove_file(&log);
    assert!(text.contains("+ 10.99.0.2: apply"), "{text}");
    assert!(text.contains("+ 10.99.0.3: apply"), "{text}");
    assert!(text.contains("- 10.99.0.2"), "{text}");
    assert!(text.contains("stopped"), "{text}");
    let (_, status, _) = s.raylimit(&["status", "--format", "json"]);
    let v: Value = serde_json::from_str(&status).unwrap();
    let rules = v["roots"][0]["rules"].as_array().unwrap();
    assert_eq!(rules.len(), 1, "{rules:?}");
    assert_eq!(rules[0]["subject"], "ip 10.99.0.3");
    assert!(rules[0]["owner"].as_str().unwrap().starts_with("host:"));
    let (code, out, err) = s.limit(&per_ip("download", &["--remove", "--execute"]));
    assert_eq!(code, 0, "{err}\n{out}");
    bob.stop();
}

fn user<'a>(v: &'a Value, email: &str) -> &'a Value {
    v["evidence"]["users"]
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["email"] == email)
        .unwrap_or_else(|| panic!("no {email} in {v}"))
}

#[test]
fn xray_online_ip_api_attributes_users_and_shared_addresses_are_left_out() {
    require(&[need::RUNTIME_HOST, need::DOWNLOAD, &[need::STRACE]]);
    // No real Xray binary is available here: the API is a fake with Xray's messages and service
    // name (tests/common/fake_xray.rs) on the api.listen address the config names.
    use common::fake_xray::FakeXray;
    use std::collections::HashMap;
    let listen = "127.0.0.1:10099";
    let s = Setup::with_api_listen("xon", Some(listen));
    let alice = s.flow(ALICE_PORT, b'H', 30);
    let bob = s.flow(BOB_PORT, b'H', 30);
    wait_for("both clients", 10, || per_ip_ips(&s).len() == 2);
    let online = |bob_keys: &[&str]| -> HashMap<String, Vec<String>> {
        HashMap::from([
            (
                "user>>>alice@example.com>>>online".to_string(),
                // 10.9.9.9 has no live socket on this runtime: it must not count.
                vec!["10.99.0.2".to_string(), "10.9.9.9".to_string()],
            ),
            (
                "user>>>bob@example.com>>>online".to_string(),
                bob_keys.iter().map(|k| k.to_string()).collect(),
            ),
        ])
    };
    {
        let _api = FakeXray::start(
            &s.pair.server,
            listen.parse().unwrap(),
            online(&["[::ffff:10.99.0.3]"]),
        );
        let v = s.limit_json(&uuid(ALICE, &["--rate", "300000"]));
        let a = user(&v, "alice@example.com");
        assert_eq!(a["source"], "xray_api", "{v}");
        assert_eq!(strings(&a["ips"]), [ALICE_IP]);
        assert_eq!(strings(&user(&v, "bob@example.com")["ips"]), [BOB_IP]);
        assert_eq!(v["execution_blocked"], false, "{v}");
        for c in v["evidence"]["connections"].as_array().unwrap() {
            assert_eq!(c["user_source"], "xray_api", "{c}");
        }
        assert!(v["evidence"]["sources"]
            .to_string()
            .contains("GetStatsOnlineIpList"));
    }
    {
        // Bob is now also seen on alice's address: it belongs to neither.
        let _api = FakeXray::start(
            &s.pair.server,
            listen.parse().unwrap(),
            online(&["10.99.0.3", "10.99.0.2"]),
        );
        let v = s.limit_json(&uuid(ALICE, &["--rate", "300000"]));
        let a = user(&v, "alice@example.com");
        assert_eq!(a["state"], "no_sessions");
        assert_eq!(strings(&a["shared_ips"]), [ALICE_IP]);
        assert_eq!(v["execution_blocked"], true);
        assert!(v["execution_note"]
            .as_str()
            .unwrap()
            .contains("shared with another live user"));
        let b = user(&v, "bob@example.com");
        assert_eq!(strings(&b["ips"]), [BOB_IP]);
        assert_eq!(strings(&b["shared_ips"]), [ALICE_IP]);
        let (code, _, err) = s.limit(&uuid(ALICE, &["--rate", "300000", "--execute"]));
        assert_eq!(code, 1);
        assert!(err.contains("shared with another live user"), "{err}");
        // Evidence (sock_diag, the gRPC API, the access log) starts no process: with an empty
        // PATH under strace, only raylimit itself is executed.
        let pid = s.server.pid();
        let ns = s.pair.server.name.clone();
        let mut limit = vec!["--netns", &ns, "limit", "--pid", &pid];
        limit.extend(uuid(BOB, &["--rate", "300000", "--execute"]));
        for args in [limit, vec!["inspect", "--pid", &pid]] {
            let execs = execve_trace(&args, Some(&s.state));
            assert_eq!(execs.len(), 1, "{args:?}: {execs:?}");
        }
        let (code, out, err) = s.limit(&uuid(BOB, &["--remove", "--execute"]));
        assert_eq!(code, 0, "{err}\n{out}");
    }
    alice.stop();
    bob.stop();
}

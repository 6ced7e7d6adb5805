//! The inbound and outbound families against a real runtime: clients in one namespace, Debian's
//! `v2ray` in a second, a remote server in a third. Traffic flows client -> the runtime's inbound
//! -> its marked outbound -> the remote, and back.

mod common;

use std::time::{Duration, Instant};

use common::proxy::*;
use common::*;
use serde_json::Value;

const ALICE: &str = "11111111-1111-4111-8111-111111111111";
const CLIENT_PORT: u16 = 15201;
/// The outbound's `sockopt.mark`, inside raylimit's default mark mask (0x0f000000).
const MARK: u32 = 0x0100_0000;

/// client (10.98.0.2) -- veth -- server v2ray (10.98.0.1 | 10.97.0.1) -- veth -- remote (10.97.0.2)
struct Chain {
    client: Netns,
    server: Netns,
    remote: Netns,
    runtime: Launched,
    _client_runtime: Launched,
    target: Target,
    state: StateDir,
    dir: std::path::PathBuf,
}

/// A second runtime on the same server (vmess on 10.98.0.1:10087, UDP on 10091) with its own client-side
/// forwarder on 127.0.0.1:15202.
struct Second {
    runtime: Launched,
    _client_runtime: Launched,
}

const SECOND_CLIENT_PORT: u16 = 15202;

impl Chain {
    fn new(tag: &str) -> Chain {
        let client = Netns::new(&format!("{tag}c"));
        let server = Netns::new(&format!("{tag}s"));
        let remote = Netns::new(&format!("{tag}r"));
        veth(
            &server,
            "veth-s",
            "10.98.0.1/24",
            &client,
            "veth-c",
            "10.98.0.2/24",
        );
        veth(
            &server,
            "veth-o",
            "10.97.0.1/24",
            &remote,
            "veth-r",
            "10.97.0.2/24",
        );
        let dir = temp_dir(&format!("{tag}-chain"));
        let server_cfg = r#"{"log":{"loglevel":"warning"},
 "inbounds":[{"tag":"vmess-in","listen":"0.0.0.0","port":10086,"protocol":"vmess",
   "settings":{"clients":[{"id":"ALICE","alterId":0,"email":"alice@example.com"}]}},
  {"tag":"udp-in","listen":"10.98.0.1","port":10090,"protocol":"dokodemo-door",
   "settings":{"address":"10.97.0.2","port":5300,"network":"udp"}}],
 "outbounds":[{"tag":"marked","protocol":"freedom","settings":{},
   "streamSettings":{"sockopt":{"mark":MARK}}}]}"#
            .replace("ALICE", ALICE)
            .replace("MARK", &MARK.to_string());
        let client_cfg = r#"{"log":{"loglevel":"warning"},
 "inbounds":[{"tag":"fwd","listen":"127.0.0.1","port":15201,"protocol":"dokodemo-door",
   "settings":{"address":"10.97.0.2","port":5201,"network":"tcp"}}],
 "outbounds":[{"tag":"vm","protocol":"vmess","settings":{"vnext":[{"address":"10.98.0.1","port":10086,
   "users":[{"id":"ALICE","alterId":0,"security":"aes-128-gcm"}]}]}}]}"#
            .replace("ALICE", ALICE);
        std::fs::write(dir.join("server.json"), server_cfg).unwrap();
        std::fs::write(dir.join("client.json"), client_cfg).unwrap();
        let v2ray = std::path::Path::new(V2RAY_BIN);
        let client_path = dir.join("client.json").to_string_lossy().into_owned();
        let server_path = dir.join("server.json").to_string_lossy().into_owned();
        let client_runtime =
            Launched::start(&client, v2ray, &["-config", &client_path], &dir, &[], None);
        let runtime = Launched::start(
            &server,
            v2ray,
            &["-config", &server_path],
            &dir,
            &[],
            Some(dir.clone()),
        );
        let target = Target::start(&remote, "10.97.0.2:5201");
        Chain {
            client,
            server,
            remote,
            runtime,
            _client_runtime: client_runtime,
            target,
            state: state_dir(tag),
            dir,
        }
    }

    /// Starts a second runtime: the same configs on ports 10087 (and UDP 10091) and, client-side,
    /// 15202.
    fn second(&self) -> Second {
        let v2ray = std::path::Path::new(V2RAY_BIN);
        let mut paths = Vec::new();
        for name in ["server", "client"] {
            let text = std::fs::read_to_string(self.dir.join(format!("{name}.json")))
                .unwrap()
                .replace("10086", "10087")
                .replace("10090", "10091")
                .replace("15201", &SECOND_CLIENT_PORT.to_string());
            let path = self.dir.join(format!("{name}-b.json"));
            std::fs::write(&path, text).unwrap();
            paths.push(path.to_string_lossy().into_owned());
        }
        let client_runtime = Launched::start(
            &self.client,
            v2ray,
            &["-config", &paths[1]],
            &self.dir,
            &[],
            None,
        );
        let runtime = Launched::start(
            &self.server,
            v2ray,
            &["-config", &paths[0]],
            &self.dir,
            &[],
            None,
        );
        runtime.wait_listening(10087, &|| false).unwrap();
        Second {
            runtime,
            _client_runtime: client_runtime,
        }
    }

    /// `raylimit --netns <server> limit --pid <runtime> ARGS`.
    fn limit(&self, args: &[&str]) -> (i32, String, String) {
        let pid = self.runtime.pid();
        let mut full = vec!["--netns", &self.server.name, "limit", "--pid", &pid];
        full.extend_from_slice(args);
        raylimit_in(&self.state, &full)
    }

    fn limit_json(&self, args: &[&str]) -> Value {
        let mut full = args.to_vec();
        full.extend(["--format", "json"]);
        let (code, out, err) = self.limit(&full);
        assert_eq!(code, 0, "{args:?}: {err}\n{out}");
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
    }

    fn server_nft(&self, args: &[&str]) -> String {
        let mut full = vec!["ip", "netns", "exec", &self.server.name, "nft"];
        full.extend_from_slice(args);
        run(&full)
    }

    fn flow(&self, command: u8, secs: u64) -> Flow {
        Flow::start(
            &self.client,
            CLIENT_PORT,
            command,
            secs,
            self.target.received.clone(),
        )
    }
}

/// Measures a class's wire rate and the flow's goodput over the same window, after the limit
/// has settled; asserts the wire rate within 10% and the goodput within 80–110%.
fn assert_shaped(
    ns: &Netns,
    dev: &str,
    class: &str,
    flow: &Flow,
    upload: bool,
    rate: f64,
    what: &str,
) {
    std::thread::sleep(Duration::from_millis(1500));
    let before = class_bytes(ns, dev, class);
    let start = Instant::now();
    let goodput = flow.rate(upload, 4.0);
    let wire = (class_bytes(ns, dev, class) - before) as f64 / start.elapsed().as_secs_f64();
    assert_within_10_percent(&format!("{what}, on the wire"), wire, rate);
    let ratio = goodput / rate;
    eprintln!(
        "{what}: goodput {goodput:.0} B/s ({:+.1}%)",
        (ratio - 1.0) * 100.0
    );
    assert!(
        (0.8..=1.1).contains(&ratio),
        "{what}: goodput {goodput:.0} B/s"
    );
}

/// Bytes sent by the root qdisc of `dev` in `ns` (`tc -s qdisc show`).
fn qdisc_sent_bytes(ns: &Netns, dev: &str) -> u64 {
    let text = ns.tc(&["-s", "qdisc", "show", "dev", dev, "root"]);
    text.split_whitespace()
        .skip_while(|w| *w != "Sent")
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no byte count: {text}"))
}

/// `limit` arguments for one subject (`[flag, value]`) on `device` in `direction`, then `rest`.
fn limit_args<'a>(
    [flag, value]: [&'a str; 2],
    device: &'a str,
    direction: &'a str,
    rest: &[&'a str],
) -> Vec<&'a str> {
    let mut v = vec![flag, value, "--device", device, "--direction", direction];
    v.extend_from_slice(rest);
    v
}

fn inbound_args<'a>(direction: &'a str, rest: &[&'a str]) -> Vec<&'a str> {
    limit_args(["--inbound", "vmess-in"], "veth-s", direction, rest)
}

#[test]
fn inbound_limits_hold_in_both_directions_on_a_wildcard_listener() {
    require(&[need::RUNTIME_HOST, need::UPLOAD]);
    let c = Chain::new("inb");
    let rate = 300_000.0;
    for (direction, command) in [("download", b'S'), ("upload", b'R')] {
        let plan = c.limit_json(&inbound_args(direction, &["--rate", "300000"]));
        assert_eq!(plan["evidence"]["concrete"], true, "{plan}");
        assert_eq!(plan["scope"]["match"], "inbound_listener", "{plan}");
        assert_eq!(plan["decision"]["kind"], "apply");
        let steps = plan["plan"]["steps"].to_string();
        let port = if direction == "download" {
            "sport"
        } else {
            "dport"
        };
        // A wildcard listener: the port, in both families.
        assert!(
            steps.contains(&format!("match ip {port} 10086 0xffff")),
            "{steps}"
        );
        assert!(
            steps.contains(&format!("match ip6 {port} 10086 0xffff")),
            "{steps}"
        );

        let flow = c.flow(command, 25);
        let v = c.limit_json(&inbound_args(direction, &["--rate", "300000", "--execute"]));
        assert_eq!(v["outcome"], "executed", "{v}");
        let class = v["plan"]["class_id"].as_str().unwrap().to_string();
        let shaped = v["scope"]["shaped_device"].as_str().unwrap().to_string();
        assert_shaped(
            &c.server,
            &shaped,
            &class,
            &flow,
            command == b'R',
            rate,
            &format!("inbound {direction}"),
        );
        let again = c.limit_json(&inbound_args(direction, &["--rate", "300000"]));
        assert_eq!(again["decision"]["kind"], "no_op");
        flow.stop();
        let (_, status, _) = raylimit_in(&c.state, &["--netns", &c.server.name, "status"]);
        assert!(status.contains("inbound vmess-in"), "{status}");
        let gone = c.limit_json(&inbound_args(direction, &["--remove", "--execute"]));
        assert_eq!(gone["decision"]["kind"], "remove");
    }
    assert!(!c
        .server
        .tc(&["qdisc", "show", "dev", "veth-s"])
        .contains("htb"));
    assert!(!c.server.ip(&["link", "show"]).contains("rlifb"));
}

/// `--ip all` limits the runtime's own clients: its flow through the runtime's listener holds the
/// rate in both directions, while another service on the same device, reached from the same
/// client address, runs unshaped. `--scope device` is the explicit opt-in to shape everything.
#[test]
fn client_rules_shape_the_runtimes_traffic_and_not_another_service() {
    require(&[need::RUNTIME_HOST, need::UPLOAD]);
    let c = Chain::new("scope");
    // Another service on the server, not the runtime: a plain TCP target on 10.98.0.1:5202,
    // reached from the same client address as the runtime.
    let other = Target::start(&c.server, "10.98.0.1:5202");
    let other_addr = "10.98.0.1:5202".parse().unwrap();
    let rate = 250_000.0;
    for subject in ["all", "10.98.0.2"] {
        for (direction, command) in [("download", b'S'), ("upload", b'R')] {
            let args = |rest: &[&'static str]| -> Vec<&'static str> {
                let dir: &'static str = if direction == "download" {
                    "download"
                } else {
                    "upload"
                };
                let subject: &'static str = if subject == "all" { "all" } else { "10.98.0.2" };
                limit_args(["--ip", subject], "veth-s", dir, rest)
            };
            let what = format!("--ip {subject} {direction}");
            let v = c.limit_json(&args(&["--rate", "250000", "--execute"]));
            assert_eq!(v["decision"]["kind"], "apply", "{v}");
            assert_eq!(v["scope"]["match"], "runtime_listeners", "{}", v["scope"]);
            let listeners = v["scope"]["listeners"].to_string();
            assert!(listeners.contains(":10086/tcp"), "{listeners}");
            let steps = v["plan"]["steps"].to_string();
            assert!(!steps.contains("matchall"), "{steps}");
            let class = v["plan"]["class_id"].as_str().unwrap().to_string();
            let dev = if direction == "download" {
                "veth-s".to_string()
            } else {
                v["scope"]["shaped_device"].as_str().unwrap().to_string()
            };
            let upload = direction == "upload";
            let through = c.flow(command, 12);
            assert_shaped(
                &c.server,
                &dev,
                &class,
                &through,
                upload,
                rate,
                &format!("{what} through the runtime"),
            );
            through.stop();
            let ifb_sent = || upload.then(|| qdisc_sent_bytes(&c.server, &dev));
            let before = ifb_sent();
            let direct = Flow::start_to(&c.client, other_addr, command, 6, other.received.clone());
            std::thread::sleep(Duration::from_millis(500));
            let unshaped = direct.rate(upload, 2.0);
            eprintln!("{what} of the other service: {unshaped:.0} B/s");
            assert!(
                unshaped > 10.0 * rate,
                "{what}: the other service was shaped: {unshaped:.0} B/s"
            );
            direct.stop();
            // Arriving packets of the other service are not even redirected to the IFB: it
            // carries at most what the runtime's stopped flow had queued (its leaf holds up to
            // 8 MiB), not the gigabytes the other service sent meanwhile.
            if let (Some(before), Some(after)) = (before, ifb_sent()) {
                eprintln!("{what}: the IFB carried {} bytes meanwhile", after - before);
                assert!(
                    after - before < 10_000_000,
                    "{what}: {} bytes",
                    after - before
                );
            }
            let v = c.limit_json(&args(&["--remove", "--execute"]));
            assert_eq!(v["decision"]["kind"], "remove", "{v}");
        }
    }
    // The opt-in: one catch-all for the whole device, and the report says so.
    let (code, out, err) = c.limit(&limit_args(
        ["--ip", "all"],
        "veth-s",
        "download",
        &["--rate", "250000", "--scope", "device"],
    ));
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("Scope: device-wide (--scope device): every packet on veth-s"),
        "{out}"
    );
    assert!(out.contains("baseline filter: u32 catch-all key"), "{out}");
}

/// UDP through the runtime's UDP listener (dokodemo-door to an echo server on the remote), with
/// the client sending well above the limit: `--ip` shapes it in both directions, at the rate.
#[test]
fn udp_through_a_udp_listener_is_shaped() {
    require(&[need::RUNTIME_HOST, need::UPLOAD]);
    let c = Chain::new("udp");
    // The remote echoes every datagram back until told to stop, for at most 60 s.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stopped = stop.clone();
    let echo = c.remote.spawn(move || {
        let sock = std::net::UdpSocket::bind("10.97.0.2:5300").unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut buf = [0u8; 2048];
        while Instant::now() < deadline && !stopped.load(std::sync::atomic::Ordering::SeqCst) {
            if let Ok((n, from)) = sock.recv_from(&mut buf) {
                let _ = sock.send_to(&buf[..n], from);
            }
        }
    });
    let rate = 250_000.0;
    for direction in ["download", "upload"] {
        let v = c.limit_json(&limit_args(
            ["--ip", "10.98.0.2"],
            "veth-s",
            direction,
            &["--rate", "250000", "--execute"],
        ));
        let listeners = v["scope"]["listeners"].to_string();
        assert!(listeners.contains("10.98.0.1:10090/udp"), "{listeners}");
        let class = v["plan"]["class_id"].as_str().unwrap().to_string();
        let dev = if direction == "download" {
            "veth-s".to_string()
        } else {
            v["scope"]["shaped_device"].as_str().unwrap().to_string()
        };
        // 1 MB/s of 1000-byte datagrams for 8 s: four times the limit.
        let sender = c.client.spawn(|| {
            let sock = std::net::UdpSocket::bind("10.98.0.2:0").unwrap();
            sock.connect("10.98.0.1:10090").unwrap();
            let payload = [0x5au8; 1000];
            let start = Instant::now();
            let mut sent = 0u64;
            while start.elapsed() < Duration::from_secs(8) {
                let due = start.elapsed().as_secs_f64() * 1_000_000.0;
                if (sent as f64) < due {
                    let _ = sock.send(&payload);
                    sent += payload.len() as u64;
                } else {
                    std::thread::sleep(Duration::from_micros(200));
                }
            }
        });
        std::thread::sleep(Duration::from_secs(2));
        let before = class_bytes(&c.server, &dev, &class);
        let start = Instant::now();
        std::thread::sleep(Duration::from_secs(4));
        let wire =
            (class_bytes(&c.server, &dev, &class) - before) as f64 / start.elapsed().as_secs_f64();
        assert_within_10_percent(&format!("UDP {direction} through the runtime"), wire, rate);
        sender.join().unwrap();
        let v = c.limit_json(&limit_args(
            ["--ip", "10.98.0.2"],
            "veth-s",
            direction,
            &["--remove", "--execute"],
        ));
        assert_eq!(v["decision"]["kind"], "remove", "{v}");
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    echo.join().unwrap();
}

/// Two runtimes on one device, each with its own rule for the same client address: each holds
/// its own rate, and removing one leaves the other's class, filters and counters.
#[test]
fn two_runtimes_hold_their_own_limits_for_the_same_client() {
    require(&[need::RUNTIME_HOST, need::UPLOAD]);
    let c = Chain::new("two");
    c.runtime.wait_listening(10086, &|| false).unwrap();
    let b = c.second();
    let b_pid = b.runtime.pid();
    let limit_b = |args: &[&str]| {
        let mut full = vec!["--netns", &c.server.name, "limit", "--pid", &b_pid];
        full.extend_from_slice(args);
        full.extend(["--format", "json"]);
        let (code, out, err) = raylimit_in(&c.state, &full);
        assert_eq!(code, 0, "{args:?}: {err}\n{out}");
        serde_json::from_str::<Value>(&out).unwrap()
    };
    for (direction, command) in [("download", b'S'), ("upload", b'R')] {
        let ip = |rate: &'static str| -> Vec<&str> {
            limit_args(
                ["--ip", "10.98.0.2"],
                "veth-s",
                direction,
                &["--rate", rate, "--execute"],
            )
        };
        let a = c.limit_json(&ip("250000"));
        let bv = limit_b(&ip("500000"));
        assert_eq!(a["decision"]["kind"], "apply", "{a}");
        assert_eq!(bv["decision"]["kind"], "apply", "{bv}");
        assert!(bv["scope"]["listeners"].to_string().contains(":10087/tcp"));
        let (class_a, class_b) = (
            a["plan"]["class_id"].as_str().unwrap().to_string(),
            bv["plan"]["class_id"].as_str().unwrap().to_string(),
        );
        assert_ne!(class_a, class_b);
        let dev = a["scope"]["shaped_device"].as_str().unwrap().to_string();
        let flow_a = c.flow(command, 12);
        let flow_b = Flow::start(
            &c.client,
            SECOND_CLIENT_PORT,
            command,
            12,
            c.target.received.clone(),
        );
        std::thread::sleep(Duration::from_millis(2000));
        let (a0, b0, start) = (
            class_bytes(&c.server, &dev, &class_a),
            class_bytes(&c.server, &dev, &class_b),
            Instant::now(),
        );
        std::thread::sleep(Duration::from_secs(4));
        let secs = start.elapsed().as_secs_f64();
        let a_rate = (class_bytes(&c.server, &dev, &class_a) - a0) as f64 / secs;
        let b_rate = (class_bytes(&c.server, &dev, &class_b) - b0) as f64 / secs;
        assert_within_10_percent(&format!("runtime A {direction}"), a_rate, 250_000.0);
        assert_within_10_percent(&format!("runtime B {direction}"), b_rate, 500_000.0);
        flow_a.stop();
        flow_b.stop();

        // Removing A's rule leaves B's class (and its counters) and filters as they were.
        let b_filters = |text: String| -> Vec<String> {
            text.lines()
                .filter(|l| l.contains(&format!("flowid {class_b}")))
                .map(String::from)
                .collect()
        };
        let filters_before = b_filters(c.server.tc(&["filter", "show", "dev", &dev]));
        assert!(!filters_before.is_empty());
        let bytes_before = class_bytes(&c.server, &dev, &class_b);
        let removed = c.limit_json(&limit_args(
            ["--ip", "10.98.0.2"],
            "veth-s",
            direction,
            &["--remove", "--execute"],
        ));
        assert_eq!(removed["decision"]["kind"], "remove", "{removed}");
        assert_eq!(
            b_filters(c.server.tc(&["filter", "show", "dev", &dev])),
            filters_before
        );
        assert!(class_bytes(&c.server, &dev, &class_b) >= bytes_before);
        assert!(!c
            .server
            .tc(&["class", "show", "dev", &dev])
            .contains(&format!("class htb {class_a} ")));
        let again = limit_b(&ip("500000"));
        assert_eq!(again["decision"]["kind"], "no_op", "{again}");
        limit_b(&limit_args(
            ["--ip", "10.98.0.2"],
            "veth-s",
            direction,
            &["--remove", "--execute"],
        ));
    }
}

#[test]
fn an_ip_rule_wins_over_an_inbound_rule_and_a_baseline_is_warned_about() {
    require(&[need::RUNTIME_HOST, need::DOWNLOAD]);
    let c = Chain::new("prec");
    let inbound = c.limit_json(&inbound_args(
        "download",
        &["--rate", "600000", "--execute"],
    ));
    let ip = c.limit_json(&[
        "--ip",
        "10.98.0.2",
        "--device",
        "veth-s",
        "--direction",
        "download",
        "--rate",
        "200000",
        "--execute",
    ]);
    let ip_class = ip["plan"]["class_id"].as_str().unwrap().to_string();
    let inbound_class = inbound["plan"]["class_id"].as_str().unwrap().to_string();
    // The same packets match both; the specific IP's band is evaluated first. The flow starts
    // once both rules are in place: moved from one class to the other mid-flow, it would leave
    // the inbound class's queue behind (up to the leaf's 8 MiB), and TCP recovering from that
    // is not what this measures.
    let flow = c.flow(b'S', 20);
    let before = class_bytes(&c.server, "veth-s", &inbound_class);
    assert_shaped(
        &c.server,
        "veth-s",
        &ip_class,
        &flow,
        false,
        200_000.0,
        "ip over inbound",
    );
    let through_inbound = class_bytes(&c.server, "veth-s", &inbound_class) - before;
    assert!(
        through_inbound < 10_000,
        "{through_inbound} bytes went through the inbound class"
    );
    flow.stop();

    // The baseline (here: the runtime's listeners, which include the inbound's) is evaluated
    // before the inbound band: the report says so.
    c.limit_json(&[
        "--ip",
        "all",
        "--device",
        "veth-s",
        "--direction",
        "download",
        "--rate",
        "1000000",
        "--execute",
    ]);
    let (code, out, _) = c.limit(&inbound_args("download", &["--rate", "500000"]));
    assert_eq!(code, 0);
    assert!(
        out.contains("Warning: veth-s has an --ip all baseline"),
        "{out}"
    );
    for args in [
        inbound_args("download", &["--remove", "--execute"]),
        vec![
            "--ip",
            "10.98.0.2",
            "--device",
            "veth-s",
            "--direction",
            "download",
            "--remove",
            "--execute",
        ],
        vec![
            "--ip",
            "all",
            "--device",
            "veth-s",
            "--direction",
            "download",
            "--remove",
            "--execute",
        ],
    ] {
        let (code, out, err) = c.limit(&args);
        assert_eq!(code, 0, "{err}\n{out}");
    }
    assert!(!c
        .server
        .tc(&["qdisc", "show", "dev", "veth-s"])
        .contains("htb"));
}

fn outbound_args<'a>(direction: &'a str, rest: &[&'a str]) -> Vec<&'a str> {
    limit_args(["--outbound", "marked"], "veth-o", direction, rest)
}

#[test]
fn outbound_upload_holds_by_socket_mark_and_download_is_blocked_naming_connmark() {
    require(&[
        need::RUNTIME_HOST,
        need::DOWNLOAD,
        &[need::NFT, need::NF_TABLES],
    ]);
    let c = Chain::new("outb");
    let rate = 300_000.0;
    let flow = c.flow(b'R', 25);
    let plan = c.limit_json(&outbound_args("upload", &["--rate", "300000"]));
    assert_eq!(plan["evidence"]["concrete"], true, "{plan}");
    // Upload of the outbound leaves the remote-facing device: its own egress root, no IFB.
    assert_eq!(plan["scope"]["shaped_device"], "veth-o");
    // Upload only reads marks: the outbound's exact mark, whatever raylimit's mask.
    let steps = plan["plan"]["steps"].to_string();
    assert!(
        steps.contains("meta mark & 0xffffffff == 0x01000000"),
        "{steps}"
    );

    let v = c.limit_json(&outbound_args("upload", &["--rate", "300000", "--execute"]));
    assert_eq!(v["outcome"], "executed", "{v}");
    let class = v["plan"]["class_id"].as_str().unwrap().to_string();
    assert_shaped(
        &c.server,
        "veth-o",
        &class,
        &flow,
        true,
        rate,
        "outbound upload",
    );
    assert_eq!(
        c.limit_json(&outbound_args("upload", &["--rate", "300000"]))["decision"]["kind"],
        "no_op"
    );
    // nft itself (the oracle) sees the rule, tagged, counting the outbound's packets.
    let listed = c.server_nft(&["-j", "list", "table", "inet", "raylimit"]);
    assert!(listed.contains("\"priority\""), "{listed}");
    let (_, status, _) = raylimit_in(&c.state, &["--netns", &c.server.name, "status"]);
    assert!(status.contains("nft table inet raylimit:"), "{status}");
    assert!(status.contains("outbound marked owner host:"), "{status}");
    // The outbound's upload is listed as upload, although it sits on veth-o's own egress.
    let heading = "  upload (outbound marks, leaving veth-o; root 524c: on veth-o)\n";
    let listed = status
        .split_once(heading)
        .map(|(_, rest)| rest)
        .unwrap_or("");
    assert!(
        listed
            .lines()
            .nth(1)
            .is_some_and(|l| l.trim_start().starts_with("outbound ")),
        "{status}"
    );
    assert!(status.contains("Drift: none"), "{status}");
    flow.stop();

    // Download needs the connection's mark restored before the IFB; this kernel has no
    // act_connmark, so it is refused, naming it.
    let (code, out, _) = c.limit(&outbound_args("download", &["--rate", "300000"]));
    assert_eq!(code, 0);
    assert!(out.contains("act_connmark"), "{out}");
    // Blocked before the kernel is read: the report does not claim a decision that runs.
    assert!(
        out.contains("Observed tc state: not needed (this kernel cannot carry the rule)")
            && out.contains("Reconcile decision: apply (blocked: nothing runs)"),
        "{out}"
    );
    let (code, _, err) = c.limit(&outbound_args(
        "download",
        &["--rate", "300000", "--execute"],
    ));
    assert_eq!(code, 1);
    assert!(err.contains("act_connmark"), "{err}");

    let gone = c.limit_json(&outbound_args("upload", &["--remove", "--execute"]));
    assert_eq!(gone["decision"]["kind"], "remove");
    assert!(!c.server_nft(&["list", "tables"]).contains("raylimit"));
    assert!(!c
        .server
        .tc(&["qdisc", "show", "dev", "veth-o"])
        .contains("htb"));
}

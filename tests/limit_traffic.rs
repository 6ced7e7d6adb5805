//! `raylimit limit` end to end with real traffic: the real binary, a real V2Ray runtime found by
//! PID, two namespaces joined by a veth pair, TCP streams measured in both directions.
//!
//! download = server -> client (leaves veth-s: egress HTB); upload = client -> server (arrives on
//! veth-s: clsact + mirred into raylimit's IFB, HTB there).

mod common;

use std::net::{IpAddr, SocketAddr};

use common::*;
use serde_json::Value;

const RATE: f64 = 1_000_000.0;
/// A client address no rule names, on the same device.
const OTHER_CLIENT: &str = "10.99.0.3";
/// Well above every limit used here: an unshaped veth stream runs at hundreds of MB/s.
const UNSHAPED_FLOOR: f64 = 20_000_000.0;

struct Setup {
    pair: Pair,
    runtime: V2ray,
    state: StateDir,
}

impl Setup {
    fn new(tag: &str) -> Self {
        let pair = Pair::new(tag);
        pair.client.ip(&[
            "addr",
            "add",
            &format!("{OTHER_CLIENT}/24"),
            "dev",
            "veth-c",
        ]);
        let runtime = V2ray::start(&pair.server);
        Setup {
            pair,
            runtime,
            state: state_dir(tag),
        }
    }

    /// Runs `limit` with `--format json` and returns the report; asserts exit 0.
    fn limit(&self, args: &[&str]) -> Value {
        let pid = self.runtime.pid();
        let mut full = vec![
            "--netns",
            &self.pair.server.name,
            "limit",
            "--pid",
            &pid,
            "--device",
            "veth-s",
            "--format",
            "json",
        ];
        full.extend_from_slice(args);
        // The streams here go to a plain server on the runtime's host, not through the
        // runtime: an address rule matches them only device-wide (`--scope device`). Scoping to
        // the runtime's own traffic is proven in tests/families.rs.
        if args.contains(&"--ip") && !args.contains(&"--scope") {
            full.extend(["--scope", "device"]);
        }
        let (code, out, err) = raylimit_in(&self.state, &full);
        assert_eq!(code, 0, "{full:?}: {err}\n{out}");
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
    }

    fn status(&self) -> Value {
        let (code, out, err) = raylimit_in(
            &self.state,
            &[
                "--netns",
                &self.pair.server.name,
                "status",
                "--format",
                "json",
            ],
        );
        assert_eq!(code, 0, "{err}");
        serde_json::from_str(&out).unwrap()
    }

    /// Throughput toward (download) or from (upload) one client address, in bytes/s.
    fn measure(&self, direction: &str, client: &str) -> f64 {
        let client_ip: IpAddr = client.parse().unwrap();
        match direction {
            "download" => measure_tcp(
                &self.pair.server,
                &self.pair.client,
                SocketAddr::new(client_ip, 5201),
                3,
            ),
            _ => measure_tcp_from(
                &self.pair.client,
                &self.pair.server,
                Some(client_ip),
                SocketAddr::new(SERVER_IP.parse().unwrap(), 5201),
                3,
            ),
        }
    }

    /// The kernel's own view (tc as an independent oracle) of raylimit's root on the device.
    fn managed_qdiscs(&self) -> String {
        self.pair.server.tc(&["qdisc", "show"])
    }
}

fn decision(report: &Value) -> &str {
    report["decision"]["kind"].as_str().unwrap()
}

/// The status rule of one subject in one direction.
fn status_rule<'a>(status: &'a Value, direction: &str, subject: &str) -> Option<&'a Value> {
    status["roots"]
        .as_array()?
        .iter()
        .filter(|r| r["direction"] == direction)
        .flat_map(|r| r["rules"].as_array().unwrap())
        .find(|r| r["subject"] == subject)
}

fn specific_ip_lifecycle(direction: &str) {
    let s = Setup::new(&format!("ip{}", &direction[..2]));
    let client = CLIENT_IP;

    let dry = s.limit(&["--ip", client, "--direction", direction, "--rate", "1MB/s"]);
    assert_eq!(decision(&dry), "apply");
    assert_eq!(dry["mode"], "dry-run");
    assert!(
        !s.managed_qdiscs().contains("524c:"),
        "a dry-run changed the kernel"
    );

    let applied = s.limit(&[
        "--ip",
        client,
        "--direction",
        direction,
        "--rate",
        "1MB/s",
        "--execute",
    ]);
    assert_eq!(decision(&applied), "apply");
    assert_eq!(applied["outcome"], "executed");
    assert_eq!(applied["rate_bytes_per_second"], 1_000_000);
    assert_within_10_percent(
        &format!("{direction} of {client} at 1 MB/s"),
        s.measure(direction, client),
        RATE,
    );
    let other = s.measure(direction, OTHER_CLIENT);
    eprintln!("{direction} of unlimited {OTHER_CLIENT}: {other:.0} B/s");
    assert!(
        other > UNSHAPED_FLOOR,
        "{OTHER_CLIENT} was shaped: {other:.0} B/s"
    );

    // The same request again changes nothing: same class, counters keep counting.
    let before = s.status();
    let rule_before = status_rule(&before, direction, &format!("ip {client}"))
        .unwrap()
        .clone();
    assert!(
        rule_before["bytes"].as_u64().unwrap() > 1_000_000,
        "{rule_before}"
    );
    // status names the leaf the kernel holds under the class: a TBF queueing 8 MiB.
    assert_eq!(rule_before["leaf"], "tbf", "{rule_before}");
    assert_eq!(rule_before["leaf_queue_bytes"], 8 << 20, "{rule_before}");
    let again = s.limit(&[
        "--ip",
        client,
        "--direction",
        direction,
        "--rate",
        "1000000",
        "--execute",
    ]);
    assert_eq!(decision(&again), "no_op");
    assert!(again["results"].as_array().unwrap().is_empty(), "{again}");
    let after = s.status();
    let rule_after = status_rule(&after, direction, &format!("ip {client}")).unwrap();
    assert_eq!(rule_after["class_id"], rule_before["class_id"]);
    assert!(rule_after["bytes"].as_u64() >= rule_before["bytes"].as_u64());

    // A rate change is made in place: the class stays, its counters too.
    let changed = s.limit(&[
        "--ip",
        client,
        "--direction",
        direction,
        "--rate",
        "2MB/s",
        "--execute",
    ]);
    assert_eq!(decision(&changed), "replace");
    let steps: Vec<&str> = changed["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["step"].as_str().unwrap())
        .collect();
    // The class changes in place, and its leaf is resized for the new rate.
    assert_eq!(steps, ["change-class", "replace-leaf"], "{changed}");
    assert_within_10_percent(
        &format!("{direction} of {client} at 2 MB/s"),
        s.measure(direction, client),
        2.0 * RATE,
    );
    let rule_changed = status_rule(&s.status(), direction, &format!("ip {client}"))
        .unwrap()
        .clone();
    assert_eq!(rule_changed["class_id"], rule_before["class_id"]);
    assert_eq!(rule_changed["rate_bytes_per_second"], 2_000_000);
    assert!(rule_changed["bytes"].as_u64() > rule_after["bytes"].as_u64());

    // Remove restores full speed and leaves nothing managed behind.
    let removed = s.limit(&[
        "--ip",
        client,
        "--direction",
        direction,
        "--remove",
        "--execute",
    ]);
    assert_eq!(decision(&removed), "remove");
    // The report describes the kernel as it was found, before the removal.
    let shaped = removed["scope"]["shaped_device"].as_str().unwrap();
    assert_eq!(
        removed["observation"]["root"],
        format!("managed root 524c: on {shaped}")
    );
    let full = s.measure(direction, client);
    eprintln!("{direction} of {client} after remove: {full:.0} B/s");
    assert!(
        full > UNSHAPED_FLOOR,
        "still shaped after remove: {full:.0} B/s"
    );
    assert_eq!(s.status()["roots"], serde_json::json!([]));
    let qdiscs = s.managed_qdiscs();
    assert!(
        !qdiscs.contains("524c:") && !qdiscs.contains("clsact"),
        "{qdiscs}"
    );
    assert!(!s.pair.server.ip(&["link", "show"]).contains("rlifb"));
}

#[test]
fn specific_ip_download_limit_change_and_remove() {
    require(&[need::RUNTIME_HOST, need::DOWNLOAD]);
    specific_ip_lifecycle("download");
}

#[test]
fn specific_ip_upload_limit_change_and_remove() {
    require(&[need::RUNTIME_HOST, need::UPLOAD]);
    specific_ip_lifecycle("upload");
}

/// `--ip all --scope device` shapes every client on the device (the traffic here does not pass
/// through the runtime); `--ip X --unlimited` exempts one; removing either one leaves the other
/// in place.
fn baseline_with_exception(direction: &str) {
    let s = Setup::new(&format!("all{}", &direction[..2]));
    let baseline = s.limit(&[
        "--ip",
        "all",
        "--scope",
        "device",
        "--direction",
        direction,
        "--rate",
        "8mbit",
        "--execute",
    ]);
    assert_eq!(decision(&baseline), "apply");
    assert_eq!(baseline["rate_bytes_per_second"], 1_000_000);
    let exempt = s.limit(&[
        "--ip",
        OTHER_CLIENT,
        "--direction",
        direction,
        "--unlimited",
        "--execute",
    ]);
    assert_eq!(decision(&exempt), "apply");
    assert_within_10_percent(
        &format!("{direction} of {CLIENT_IP} under the baseline"),
        s.measure(direction, CLIENT_IP),
        RATE,
    );
    let unshaped = s.measure(direction, OTHER_CLIENT);
    eprintln!("{direction} of exempt {OTHER_CLIENT}: {unshaped:.0} B/s");
    assert!(
        unshaped > UNSHAPED_FLOOR,
        "the exception was shaped: {unshaped:.0} B/s"
    );

    // Removing the exception leaves the baseline exactly as it was.
    let status = s.status();
    let base_before = status_rule(&status, direction, "ip all").unwrap().clone();
    s.limit(&[
        "--ip",
        OTHER_CLIENT,
        "--direction",
        direction,
        "--remove",
        "--execute",
    ]);
    let status = s.status();
    let base_after = status_rule(&status, direction, "ip all").unwrap();
    assert_eq!(base_after["class_id"], base_before["class_id"]);
    assert!(status_rule(&status, direction, &format!("ip {OTHER_CLIENT}")).is_none());
    s.limit(&[
        "--ip",
        "all",
        "--direction",
        direction,
        "--remove",
        "--execute",
    ]);
    assert_eq!(s.status()["roots"], serde_json::json!([]));
}

#[test]
fn baseline_and_unlimited_exception_download() {
    require(&[need::RUNTIME_HOST, need::DOWNLOAD]);
    baseline_with_exception("download");
}

#[test]
fn baseline_and_unlimited_exception_upload() {
    require(&[need::RUNTIME_HOST, need::UPLOAD]);
    baseline_with_exception("upload");
}

//! A containerised runtime behind a published port, limited on the host's client-facing device:
//! the runtime (v2ray, a dokodemo-door inbound on port 10086) runs in a "container" namespace, the
//! "host" namespace publishes it as 10.96.0.1:20086 with a DNAT rule, and a fake Docker Engine
//! API answers the container's port bindings. On the host device the client's packets carry the
//! host's address and port (ingress runs before the DNAT, egress after the reply is un-NATed), so
//! the limit must be scoped to the published port, never to the container's own port.
//!
//! client 10.96.0.2 -- veth -- host 10.96.0.1 (veth-h) | 10.95.0.1 -- veth -- container 10.95.0.2

mod common;

use std::time::{Duration, Instant};

use common::container::{ContainerCgroup, FakeEngine};
use common::kit::output;
use common::proxy::*;
use common::*;
use serde_json::Value;

const RATE: f64 = 250_000.0;

#[test]
fn a_limit_on_the_host_device_is_scoped_to_the_published_port() {
    require(&[
        need::RUNTIME_HOST,
        need::UPLOAD,
        &[need::NFT, need::NFT_NAT, need::PIDS_CGROUP],
    ]);
    let client = Netns::new("pubc");
    let host = Netns::new("pubh");
    let ctr = Netns::new("pubr");
    veth(
        &host,
        "veth-h",
        "10.96.0.1/24",
        &client,
        "veth-c",
        "10.96.0.2/24",
    );
    veth(
        &host,
        "veth-x",
        "10.95.0.1/24",
        &ctr,
        "veth-y",
        "10.95.0.2/24",
    );
    ctr.ip(&["link", "set", "lo", "up"]);
    ctr.ip(&["route", "add", "default", "via", "10.95.0.1"]);
    let forward = output(host.exec("sysctl").args(["-qw", "net.ipv4.ip_forward=1"]));
    forward.unwrap_or_else(|e| panic!("{e}"));
    for rule in [
        "add table ip rltest",
        "add chain ip rltest pre { type nat hook prerouting priority dstnat ; }",
        "add rule ip rltest pre iif veth-h tcp dport 20086 dnat to 10.95.0.2:10086",
    ] {
        let mut cmd = host.exec("nft");
        cmd.args(rule.split(' '));
        output(&mut cmd).unwrap_or_else(|e| panic!("nft {rule}: {e}"));
    }

    // The container: v2ray forwarding its inbound to a target inside the container.
    let dir = temp_dir("pub-ctr");
    let config = dir.join("config.json");
    std::fs::write(
        &config,
        r#"{"log":{"loglevel":"warning"},
 "inbounds":[{"tag":"door","listen":"0.0.0.0","port":10086,"protocol":"dokodemo-door",
   "settings":{"address":"127.0.0.1","port":5201,"network":"tcp"}}],
 "outbounds":[{"tag":"direct","protocol":"freedom"}]}"#,
    )
    .unwrap();
    let target = Target::start(&ctr, "127.0.0.1:5201");
    let id = "feed".repeat(16);
    let cgroup;
    let runtime = Launched::start(
        &ctr,
        std::path::Path::new(V2RAY_BIN),
        &["-config", &config.to_string_lossy()],
        &dir,
        &[],
        Some(dir.clone()),
    );
    runtime.wait_listening(10086, &|| false).unwrap();
    cgroup = ContainerCgroup::enter(&id, &runtime.pid());
    let engine = FakeEngine::start(
        &id,
        "edge-pub",
        runtime.child.id(),
        r#"{"10086/tcp":[{"HostIp":"0.0.0.0","HostPort":"20086"}]}"#,
    );
    // Another service on the host, reached by the same client: never the runtime's.
    let other = Target::start(&host, "10.96.0.1:10086");
    let state = state_dir("pub");
    let docker_host = engine.docker_host();
    let state_path = state.0.to_string_lossy().into_owned();
    let env = [
        ("DOCKER_HOST", docker_host.as_str()),
        ("RAYLIMIT_STATE_DIR", state_path.as_str()),
    ];
    let limit = |direction: &str, rest: &[&str]| -> Value {
        let mut args = vec![
            "--netns",
            &host.name,
            "limit",
            "--container",
            "edge-pub",
            "--device",
            "veth-h",
            "--ip",
            "10.96.0.2",
            "--direction",
            direction,
            "--format",
            "json",
        ];
        args.extend_from_slice(rest);
        let (code, out, err) = raylimit_env(&args, &env);
        assert_eq!(code, 0, "{args:?}: {err}\n{out}");
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
    };

    for (direction, command) in [("download", b'S'), ("upload", b'R')] {
        let v = limit(direction, &["--rate", "250000", "--execute"]);
        assert_eq!(v["decision"]["kind"], "apply", "{v}");
        assert_eq!(
            v["runtime"]["source"], "docker_container",
            "{}",
            v["runtime"]
        );
        let listeners = v["scope"]["listeners"].to_string();
        assert!(
            listeners.contains("0.0.0.0:20086/tcp (published to the container's port 10086)"),
            "{listeners}"
        );
        let class = v["plan"]["class_id"].as_str().unwrap().to_string();
        let dev = if direction == "download" {
            "veth-h".to_string()
        } else {
            v["scope"]["shaped_device"].as_str().unwrap().to_string()
        };
        let upload = direction == "upload";
        let through = Flow::start_to(
            &client,
            "10.96.0.1:20086".parse().unwrap(),
            command,
            10,
            target.received.clone(),
        );
        std::thread::sleep(Duration::from_millis(2000));
        let before = class_bytes(&host, &dev, &class);
        let start = Instant::now();
        std::thread::sleep(Duration::from_secs(4));
        let wire =
            (class_bytes(&host, &dev, &class) - before) as f64 / start.elapsed().as_secs_f64();
        assert_within_10_percent(
            &format!("{direction} through the published port"),
            wire,
            RATE,
        );
        through.stop();
        // The host's own service on the container's port number is not the runtime.
        let direct = Flow::start_to(
            &client,
            "10.96.0.1:10086".parse().unwrap(),
            command,
            6,
            other.received.clone(),
        );
        std::thread::sleep(Duration::from_millis(500));
        let unshaped = direct.rate(upload, 2.0);
        eprintln!("{direction} of the host's service on port 10086: {unshaped:.0} B/s");
        assert!(
            unshaped > 10.0 * RATE,
            "{direction}: the host's own service was shaped: {unshaped:.0} B/s"
        );
        direct.stop();
        let v = limit(direction, &["--remove", "--execute"]);
        assert_eq!(v["decision"]["kind"], "remove", "{v}");
    }
    drop(engine);
    drop(runtime);
    drop(cgroup);
}

//! The plan a dry-run prints is tc's own syntax: every command of whole plans (the two-level
//! client layout's tables, links and nodes, classes, the root, the upload scaffolding, and the
//! removals), run through `tc -batch` in one namespace, builds exactly what raylimit builds
//! executing the same plans in another.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::plans::*;
use common::*;
use raylimit::engine::NetlinkKernel;
use raylimit::model::htb::NSEC_PER_TICK;
use raylimit::model::tc::{ClassEntry, ClassKind};
use raylimit::model::DeviceTc;
use raylimit::model::Link;
use raylimit::netlink::RtSocket;
use raylimit::policy::{Direction, Endpoint, Subject, Want};
use raylimit::reconcile::Context;
use raylimit::shaping;

fn host(tag: &str) -> (Netns, NetlinkKernel, Link) {
    let ns = Netns::new(tag);
    ns.ip(&[
        "link", "add", "veth-a", "type", "veth", "peer", "name", "veth-b",
    ]);
    ns.ip(&["link", "set", "veth-a", "up"]);
    ns.ip(&["link", "set", "veth-b", "up"]);
    let mut kernel = NetlinkKernel::from_socket(ns.socket());
    let device = kernel.socket().link_by_name("veth-a").unwrap();
    (ns, kernel, device)
}

/// Runs a plan's commands in `ns`: `ip` lines one by one, runs of `tc` lines as one `tc -batch`.
/// Two refusals resume the batch, as raylimit's executor goes on: a step that may find its
/// object already gone (`gone_ok`: the kernel drops a u32 priority with its last node when it
/// is alone on the qdisc) is skipped, and a table delete right after its link's, refused as "in
/// use" until the kernel lets go of the link after an RCU grace period, is tried again.
fn run_commands(ns: &Netns, commands: &[(String, bool)]) {
    let mut i = 0;
    while i < commands.len() {
        if let Some(ip) = commands[i].0.strip_prefix("ip ") {
            ns.ip(&ip.split_whitespace().collect::<Vec<_>>());
            i += 1;
            continue;
        }
        let end = (i..commands.len())
            .find(|j| !commands[*j].0.starts_with("tc "))
            .unwrap_or(commands.len());
        tc_batch(ns, &commands[i..end]);
        i = end;
    }
}

fn tc_batch(ns: &Netns, lines: &[(String, bool)]) {
    let mut done = 0;
    let deadline = Instant::now() + Duration::from_secs(10);
    while done < lines.len() {
        let mut child = Command::new("tc")
            .args(["-n", &ns.name, "-batch", "-"])
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let input: String = lines[done..]
            .iter()
            .map(|(c, _)| format!("{}\n", c.strip_prefix("tc ").unwrap()))
            .collect();
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(input.as_bytes()).unwrap();
        drop(stdin);
        let out = child.wait_with_output().unwrap();
        if out.status.success() {
            return;
        }
        let err = String::from_utf8_lossy(&out.stderr);
        let failed: usize = err
            .rsplit("Command failed -:")
            .next()
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or_else(|| panic!("tc -batch: {err}"));
        let (line, gone_ok) = &lines[done + failed - 1];
        let gone = err.contains("Cannot find") || err.contains("not found");
        if *gone_ok && gone {
            done += failed;
            continue;
        }
        assert!(
            err.contains("in-use") && Instant::now() < deadline,
            "tc refused {line:?}: {err}"
        );
        done += failed - 1;
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// What a device holds, without counters and with no device index (the namespaces differ).
fn state(sock: &mut RtSocket, name: &str) -> Option<DeviceTc> {
    let index = sock.link_by_name(name).ok()?.index;
    let mut tc = sock.device_tc(index).unwrap();
    tc.ifindex = 0;
    for q in &mut tc.qdiscs {
        q.qdisc.ifindex = 0;
        q.stats = Default::default();
        q.htb = None;
    }
    for c in &mut tc.classes {
        c.class.ifindex = 0;
        c.stats = Default::default();
        c.htb = None;
    }
    for f in &mut tc.filters {
        f.filter.ifindex = 0;
    }
    Some(tc)
}

fn subjects() -> Vec<Context> {
    let dl = Direction::Download;
    let ip = |s: &str, want| context(ip_subject(s), dl, want, "veth-a");
    let user = context(
        Subject::User {
            uuid: "u1".into(),
            ips: ["10.1.4.4", "fd00::4:4"]
                .iter()
                .map(|a| a.parse().unwrap())
                .collect(),
        },
        dl,
        Want::Limit(3000),
        "veth-a",
    );
    vec![
        ip("all", Want::Limit(900_000)),
        ip("10.1.5.2", Want::Limit(1000)),
        ip("10.1.5.3", Want::Limit(5_000_000_000)),
        ip("10.1.6.2", Want::Unlimited),
        ip("fd00::5:2", Want::Limit(2000)),
        ip("fd00::6:2", Want::Limit(2000)),
        context(
            Subject::Connection("10.1.5.2:40000".parse().unwrap()),
            dl,
            Want::Limit(500),
            "veth-a",
        ),
        user,
        context(
            Subject::Inbound {
                tag: "in".into(),
                listener: Some(Endpoint {
                    address: None,
                    port: 10086,
                }),
            },
            dl,
            Want::Limit(7000),
            "veth-a",
        ),
        context(
            ip_subject("10.1.7.7"),
            Direction::Upload,
            Want::Limit(4000),
            "veth-a",
        ),
        context(
            ip_subject("fd00::7:7"),
            Direction::Upload,
            Want::Limit(4000),
            "veth-a",
        ),
    ]
}

/// raylimit runs each plan in `ours`; tc runs the printed commands in `theirs`. Returns the
/// class the subject got.
fn both_run(ours: (&mut NetlinkKernel, &Link), theirs: &Netns, ctx: &Context) -> Option<u16> {
    let d = decide_and_run(ours.0, ours.1, ctx);
    let commands: Vec<(String, bool)> =
        d.steps.iter().map(|s| (s.command(), s.exists_ok)).collect();
    assert!(!commands.is_empty(), "{}", ctx.request.subject);
    run_commands(theirs, &commands);
    d.expected_class.map(|c| c.minor())
}

/// Two classes are the same when their bursts are within a microsecond: tc turns a burst in
/// bytes into time at that resolution, raylimit computes it in nanoseconds.
fn same_classes(ours: &[ClassEntry], theirs: &[ClassEntry]) -> bool {
    let tick_us = 1000 / NSEC_PER_TICK as u32 + 1;
    let close = |a: u32, b: u32| a.abs_diff(b) <= tick_us;
    ours.len() == theirs.len()
        && ours.iter().zip(theirs).all(|(o, t)| {
            let mut o = o.clone();
            if let (ClassKind::Htb(a), ClassKind::Htb(b)) = (&mut o.class.kind, &t.class.kind) {
                if close(a.buffer, b.buffer) && close(a.cbuffer, b.cbuffer) {
                    (a.buffer, a.cbuffer) = (b.buffer, b.cbuffer);
                }
            }
            o == *t
        })
}

fn same_kernel(a: &mut RtSocket, b: &mut RtSocket, ifb: &str, what: &str) {
    for dev in ["veth-a", ifb] {
        let (ours, theirs) = (state(a, dev), state(b, dev));
        if let (Some(o), Some(t)) = (&ours, &theirs) {
            assert_eq!(o.qdiscs, t.qdiscs, "{what}: qdiscs of {dev}");
            assert!(
                same_classes(&o.classes, &t.classes),
                "{what}: classes of {dev}: {:#?} {:#?}",
                o.classes,
                t.classes
            );
            for f in &o.filters {
                assert!(
                    t.filters.contains(f),
                    "{what}: tc did not make {} on {dev}",
                    f.filter
                );
            }
            assert_eq!(o.filters.len(), t.filters.len(), "{what}: filters of {dev}");
        }
        assert_eq!(ours.is_some(), theirs.is_some(), "{what}: {dev}");
    }
}

#[test]
fn tc_batch_builds_and_removes_what_raylimit_does_from_the_printed_plans() {
    require(&[need::NAMESPACE, need::UPLOAD, &[need::TC, need::VETH]]);
    let (ours_ns, mut ours, device) = host("tcours");
    let (theirs_ns, mut theirs, their_device) = host("tctheirs");
    assert_eq!(device.index, their_device.index, "IFB names follow ifindex");
    let ifb = shaping::ifb_name(device.index);
    let mut subjects = subjects();
    for ctx in &mut subjects {
        // A user's rule is known by its class, which the CLI would remember.
        ctx.remembered_minor = both_run((&mut ours, &device), &theirs_ns, ctx);
    }
    same_kernel(ours.socket(), theirs.socket(), &ifb, "after the limits");
    let filters = theirs_ns.tc(&["filter", "show", "dev", "veth-a"]);
    for shape in [
        "fh 5:",
        "fh 505:",
        "fh 5:5:1",
        "link 505:",
        "hash mask 0000ff00 at 16",
    ] {
        assert!(filters.contains(shape), "{shape} missing:\n{filters}");
    }
    for ctx in subjects.iter().rev() {
        let mut remove = ctx.clone();
        remove.request.want = Want::Remove;
        both_run((&mut ours, &device), &theirs_ns, &remove);
        same_kernel(
            ours.socket(),
            theirs.socket(),
            &ifb,
            &format!("after removing {}", ctx.request.subject),
        );
    }
    assert!(!ours_ns.tc(&["qdisc", "show"]).contains("524c:"));
}

#[test]
fn a_failed_plan_is_undone_in_order_and_leaves_no_table_behind() {
    require(&[need::NAMESPACE, need::DOWNLOAD, &[need::VETH]]);
    let (_ns, mut kernel, device) = host("tcundo");
    let dl = Direction::Download;
    let conn = context(
        Subject::Connection("10.2.0.2:40000".parse().unwrap()),
        dl,
        Want::Limit(1000),
        "veth-a",
    );
    decide_and_run(&mut kernel, &device, &conn);
    let before = state(kernel.socket(), "veth-a");
    // A new band beside the connection band, whose last step fails: every step is undone, in
    // order (the root link by the handle the kernel gave it, then the band's table), so the
    // kernel ends as it began and the same band can be made again.
    let ctx = context(ip_subject("10.2.3.4"), dl, Want::Limit(1000), "veth-a");
    let obs = observe(&mut kernel, &device, &ctx.request);
    let d = raylimit::reconcile::decide(&ctx, &obs);
    let mut steps = d.steps.clone();
    let class = steps
        .iter()
        .find(|s| s.name == "create-class")
        .unwrap()
        .clone();
    steps.push(class);
    let exec = raylimit::engine::execute(&mut kernel, &steps);
    assert!(exec.failed());
    assert!(!exec.rollback_failed(), "{:#?}", exec.rollback);
    assert_eq!(state(kernel.socket(), "veth-a"), before);
    let again = raylimit::engine::execute(&mut kernel, &d.steps);
    assert!(!again.failed(), "{:#?}", again.results);
}

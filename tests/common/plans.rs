//! Deciding and running plans through the library, without the CLI: requests, observations
//! read from a namespace, and steps sent as batches of netlink messages.

use std::net::IpAddr;

pub use raylimit::cli::observe;
use raylimit::netlink::link::Link;
use raylimit::netlink::tc::ClassEntry;
use raylimit::netlink::RtSocket;
use raylimit::policy::{Direction, Request, Subject, Want};
use raylimit::reconcile::observe::{Observation, ShapedRoot};
use raylimit::reconcile::plan::{Operation, Step, TcObject};
use raylimit::reconcile::{decide, Context, Decision, DecisionKind};
use raylimit::shaping::{self, CatchAll};

/// A request on `device` with the defaults the CLI would use on this kernel (no matchall).
pub fn context(subject: Subject, direction: Direction, want: Want, device: &str) -> Context {
    Context {
        request: Request {
            subject,
            direction,
            device: device.into(),
            want,
        },
        catch_all: CatchAll::U32,
        allow_missing_state: false,
        owned_by_other: None,
        remembered_minor: None,
        owner: "host:test".into(),
        netns_path: None,
        has_connmark: false,
        has_fw: false,
    }
}

/// Decides `ctx` against the kernel's current state and runs the plan; panics when it is
/// blocked or fails.
pub fn decide_and_run(sock: &mut RtSocket, device: &Link, ctx: &Context) -> Decision {
    let obs = observe(sock, device, &ctx.request);
    let d = decide(ctx, &obs);
    assert!(
        d.blocked.is_none(),
        "{}: {:?}",
        ctx.request.subject,
        d.blocked
    );
    let exec = raylimit::apply::execute(sock, &d.steps);
    assert!(
        !exec.failed(),
        "{}: {:?}",
        ctx.request.subject,
        exec.results
    );
    d
}

/// The netlink request of a tc step on the device `ifindex`.
pub fn tc_message(step: &Step, ifindex: u32) -> Vec<u8> {
    let Operation::Tc { op, object, .. } = &step.action else {
        panic!("not a tc step: {}", step.command());
    };
    raylimit::apply::tc_request(*op, object, ifindex)
}

/// A download limit for one address.
pub fn ip_limit(ip: IpAddr, rate: u64, device: &str) -> Context {
    let want = Want::Limit(rate);
    context(Subject::Ip(ip), Direction::Download, want, device)
}

/// Keeps an observation in line with a tc step sent in a batch (a class or a filter).
pub fn track(shaped: &mut ShapedRoot, step: &Step) {
    let Operation::Tc { object, .. } = &step.action else {
        panic!("not a tc step: {}", step.command());
    };
    match object {
        TcObject::Class(c) => {
            let entry = ClassEntry {
                class: c.canonical(),
                stats: Default::default(),
                htb: None,
            };
            shaped.classes.insert(c.handle.minor(), entry);
        }
        TcObject::Filter(f) => shaped.absorb_filter(f, shaping::client_end(Direction::Download)),
        TcObject::Qdisc(q) => panic!("the root exists already: {q:?}"),
    }
}

/// Limits the download of every address in `ips` on `device` at `rate`: the first of each
/// family through the ordinary path (it makes the root and the band), the others decided against
/// one observation kept current with [`track`] and sent as netlink batches. Returns that
/// observation and how many messages were sent.
pub fn limit_all(
    sock: &mut RtSocket,
    device: &Link,
    ips: &[IpAddr],
    rate: u64,
) -> (Observation, usize) {
    let first_v4 = ips.iter().find(|ip| ip.is_ipv4());
    let first_v6 = ips.iter().find(|ip| ip.is_ipv6());
    let firsts: Vec<IpAddr> = first_v4.into_iter().chain(first_v6).copied().collect();
    for ip in &firsts {
        decide_and_run(sock, device, &ip_limit(*ip, rate, &device.name));
    }
    let mut obs = observe(sock, device, &ip_limit(ips[0], rate, &device.name).request);
    let mut messages = Vec::new();
    for ip in ips.iter().filter(|ip| !firsts.contains(ip)) {
        let d = decide(&ip_limit(*ip, rate, &device.name), &obs);
        assert_eq!(d.kind, DecisionKind::Apply, "{ip}: {:?}", d.blocked);
        let shaped = obs.shaped.as_mut().expect("a managed root");
        for step in &d.steps {
            messages.push(tc_message(step, device.index));
            track(shaped, step);
        }
    }
    let sent = messages.len();
    let acks = sock.batch(messages).expect("batch sent");
    let refused: Vec<_> = acks.iter().filter_map(|a| a.as_ref().err()).collect();
    assert!(
        refused.is_empty(),
        "{} of {sent} refused: {:?}",
        refused.len(),
        refused.first()
    );
    (obs, sent)
}

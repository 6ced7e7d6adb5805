//! Deciding and running plans through the library, without the CLI: requests, observations
//! read from a namespace, and the library's own absorption and batched execution.

use std::net::IpAddr;

pub use raylimit::engine::observe;
use raylimit::engine::{execute, NetlinkKernel};
use raylimit::model::Link;
use raylimit::policy::{Direction, Request, Subject, Want};
use raylimit::reconcile::observe::Observation;
use raylimit::reconcile::{decide, Context, Decision, DecisionKind, RuleScope};
use raylimit::shaping::CatchAll;

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
        scope: Default::default(),
        foreign_classes: Default::default(),
        made_hook: true,
        made_ifb: true,
        leaf: raylimit::shaping::Leaf::Tbf,
    }
}

/// The subject `--ip VALUE` names (an address, or `all` for the shared baseline).
pub fn ip_subject(value: &str) -> Subject {
    raylimit::policy::parse_ip_target(value, false)
        .unwrap()
        .direct()
        .unwrap()
}

/// Decides `ctx` against the kernel's current state and runs the plan; panics when it is
/// blocked or fails.
pub fn decide_and_run(kernel: &mut NetlinkKernel, device: &Link, ctx: &Context) -> Decision {
    let obs = observe(kernel, device, &ctx.request);
    let d = decide(ctx, &obs);
    assert!(
        d.blocked.is_none(),
        "{}: {:?}",
        ctx.request.subject,
        d.blocked
    );
    let exec = execute(kernel, &d.steps);
    assert!(
        !exec.failed(),
        "{}: {:?}",
        ctx.request.subject,
        exec.results
    );
    d
}

/// A download limit for one address.
pub fn ip_limit(ip: IpAddr, rate: u64, device: &str) -> Context {
    let want = Want::Limit(rate);
    context(Subject::Ip(ip), Direction::Download, want, device)
}

/// Limits the download of every address in `ips` on `device` at `rate`: the first of each
/// family through the ordinary path (it makes the root and the band), the others decided against
/// one observation kept current by the library's absorption and run as one batched execution.
/// Returns that observation and how many steps were run.
pub fn limit_all(
    kernel: &mut NetlinkKernel,
    device: &Link,
    ips: &[IpAddr],
    rate: u64,
) -> (Observation, usize) {
    limit_all_scoped(kernel, device, ips, rate, &RuleScope::Device)
}

/// [`limit_all`] with each limit scoped as given (a runtime's listeners: one node per client
/// and listener of its family).
pub fn limit_all_scoped(
    kernel: &mut NetlinkKernel,
    device: &Link,
    ips: &[IpAddr],
    rate: u64,
    scope: &RuleScope,
) -> (Observation, usize) {
    let ip_limit = |ip: IpAddr, rate: u64, device: &str| Context {
        scope: scope.clone(),
        ..ip_limit(ip, rate, device)
    };
    let first_v4 = ips.iter().find(|ip| ip.is_ipv4());
    let first_v6 = ips.iter().find(|ip| ip.is_ipv6());
    let firsts: Vec<IpAddr> = first_v4.into_iter().chain(first_v6).copied().collect();
    for ip in &firsts {
        decide_and_run(kernel, device, &ip_limit(*ip, rate, &device.name));
    }
    let mut obs = observe(
        kernel,
        device,
        &ip_limit(ips[0], rate, &device.name).request,
    );
    let mut steps = Vec::new();
    for ip in ips.iter().filter(|ip| !firsts.contains(ip)) {
        let d = decide(&ip_limit(*ip, rate, &device.name), &obs);
        assert_eq!(d.kind, DecisionKind::Apply, "{ip}: {:?}", d.blocked);
        for step in d.steps {
            obs.absorb(&step, true);
            steps.push(step);
        }
    }
    let exec = execute(kernel, &steps);
    let refused: Vec<_> = exec
        .results
        .iter()
        .filter(|r| r.status != raylimit::engine::Status::Ok)
        .collect();
    assert!(
        refused.is_empty(),
        "{} of {} refused: {:?}",
        refused.len(),
        steps.len(),
        refused.first()
    );
    (obs, steps.len())
}

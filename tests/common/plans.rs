//! Deciding and running plans through the library, without the CLI: requests, observations
//! read from a namespace, and steps sent as batches of netlink messages.

use raylimit::netlink::link::Link;
use raylimit::netlink::tc::Op;
use raylimit::netlink::u32::End;
use raylimit::netlink::{NetlinkError, RtSocket};
use raylimit::policy::{Direction, Request, Subject, Want};
use raylimit::reconcile::observe::{Hook, Observation, ShapedRoot};
use raylimit::reconcile::plan::{Operation, Step, TcObject};
use raylimit::reconcile::{decide, Context, Decision};
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
    }
}

/// Where client addresses sit on the root a request shapes.
pub fn end_of(request: &Request) -> End {
    shaping::client_end(request.direction)
}

/// What the request is decided on, read from the kernel: the shaped root, and for upload the
/// IFB companion and the device's ingress hook.
pub fn observe(sock: &mut RtSocket, device: &Link, request: &Request) -> Observation {
    let device_tc = sock.device_tc(device.index).expect("device tc state");
    let mut obs = Observation {
        device: device.clone(),
        shaped: None,
        ifb: None,
        hook: None,
        error: None,
        nft: None,
    };
    if request.on_egress() {
        obs.shaped = Some(ShapedRoot::read(&device_tc, end_of(request)));
        return obs;
    }
    obs.hook = Some(Hook::read(&device_tc));
    match sock.link_by_name(&shaping::ifb_name(device.index)) {
        Ok(ifb) => {
            let ifb_tc = sock.device_tc(ifb.index).expect("IFB tc state");
            obs.shaped = Some(ShapedRoot::read(&ifb_tc, end_of(request)));
            obs.ifb = Some(ifb);
        }
        Err(NetlinkError::NoSuchDevice(_)) => {}
        Err(e) => panic!("{e}"),
    }
    obs
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

/// The netlink request of a tc step on the device `ifindex`, and whether it deletes.
pub fn tc_message(step: &Step, ifindex: u32) -> (Vec<u8>, bool) {
    let Operation::Tc { op, object, .. } = &step.action else {
        panic!("not a tc step: {}", step.command());
    };
    let message = match object.clone() {
        TcObject::Qdisc(mut q) => {
            q.ifindex = ifindex;
            q.request(*op)
        }
        TcObject::Class(mut c) => {
            c.ifindex = ifindex;
            c.request(*op)
        }
        TcObject::Filter(mut f) => {
            f.ifindex = ifindex;
            f.request(*op)
        }
    };
    (message, *op == Op::Delete)
}

//! Runs a plan against the kernel, every step acknowledged. When a step fails, the steps
//! this run already did are undone in reverse order, so the kernel ends as it began.

use std::borrow::Borrow;
use std::collections::HashMap;

use crate::netlink::action::Action;
use crate::netlink::nft::{self, NftOp};
use crate::netlink::tc::{self, Filter, FilterKind, Op, TcEntry};
use crate::netlink::{NetlinkError, RtSocket, U32Handle};
use crate::reconcile::plan::{Dev, Operation, Step, TcObject};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Ok,
    Failed,
    /// Done, then undone because a later step failed.
    Undone,
    /// Never run because an earlier step failed.
    NotRun,
}

impl Status {
    pub fn name(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Failed => "failed",
            Status::Undone => "undone",
            Status::NotRun => "not run",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepResult {
    pub step: String,
    pub command: String,
    pub status: Status,
    pub error: Option<String>,
    /// A warning the kernel attached to its acknowledgement.
    pub warning: Option<String>,
}

/// What running a plan did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Execution {
    pub results: Vec<StepResult>,
    /// The undo steps run after a failure, in the order they ran.
    pub rollback: Vec<StepResult>,
}

impl Execution {
    pub fn failed(&self) -> bool {
        self.results.iter().any(|r| r.status == Status::Failed)
    }

    /// True when a failure was followed by an undo that itself failed: the kernel may differ
    /// from how it began.
    pub fn rollback_failed(&self) -> bool {
        self.rollback.iter().any(|r| r.status == Status::Failed)
    }
}

/// Runs `steps` on `sock`. Consecutive tc steps go to the kernel as one batch (many messages
/// per `sendmsg`, every acknowledgement checked); a failure stops the run after the batch it
/// was in, and everything done so far is undone, last first.
pub fn execute<S: Borrow<Step>>(sock: &mut RtSocket, steps: &[S]) -> Execution {
    let steps: Vec<&Step> = steps.iter().map(Borrow::borrow).collect();
    let mut devices = HashMap::new();
    let mut exec = Execution::default();
    // The undo steps of what is done: (the step, its undo step).
    let mut undo_stack: Vec<(usize, &Step)> = Vec::new();
    let mut next = 0;
    while next < steps.len() {
        let end = batch_end(&steps, next);
        let outcomes = run_batch(sock, &mut devices, &steps[next..end]);
        let mut failed = false;
        for (i, outcome) in (next..end).zip(outcomes) {
            match outcome {
                Ok(warning) => {
                    exec.results
                        .push(result(steps[i], Status::Ok, None, warning));
                    // A step's undo steps run in the order written, after those of later steps.
                    undo_stack.extend(steps[i].undo.iter().rev().map(|u| (i, u)));
                }
                Err(e) => {
                    failed = true;
                    exec.results
                        .push(result(steps[i], Status::Failed, Some(e), None));
                }
            }
        }
        next = end;
        if failed {
            for later in &steps[next..] {
                exec.results.push(result(later, Status::NotRun, None, None));
            }
            undo_stack.reverse();
            rollback(sock, &mut devices, &undo_stack, &mut exec);
            break;
        }
    }
    exec
}

/// Runs the undo steps in the order given, each one whatever happened to the others, and marks
/// the steps they undid.
fn rollback(
    sock: &mut RtSocket,
    devices: &mut HashMap<String, u32>,
    undo: &[(usize, &Step)],
    exec: &mut Execution,
) {
    let steps: Vec<&Step> = undo.iter().map(|(_, s)| *s).collect();
    let mut next = 0;
    while next < steps.len() {
        let end = batch_end(&steps, next);
        let outcomes = run_batch(sock, devices, &steps[next..end]);
        for ((done, step), outcome) in undo[next..end].iter().zip(outcomes) {
            exec.results[*done].status = Status::Undone;
            exec.rollback.push(match outcome {
                Ok(w) => result(step, Status::Ok, None, w),
                Err(e) => result(step, Status::Failed, Some(e), None),
            });
        }
        next = end;
    }
}

/// The end of the batch starting at `start`: the following tc steps up to and including one
/// that makes a container (a qdisc or a u32 table), or the one other step. The kernel handles
/// every message of a batch even after one fails, so nothing is sent into a container before
/// its creation is acknowledged.
fn batch_end(steps: &[&Step], start: usize) -> usize {
    let mut end = start;
    while end < steps.len() && is_tc(steps[end]) {
        end += 1;
        if makes_container(steps[end - 1]) {
            break;
        }
    }
    end.max(start + 1)
}

fn makes_container(step: &Step) -> bool {
    match &step.action {
        Operation::Tc {
            op: Op::Create | Op::Replace,
            object,
            ..
        } => match object {
            TcObject::Qdisc(_) => true,
            TcObject::Filter(f) => matches!(&f.kind, FilterKind::U32(u) if u.divisor.is_some()),
            TcObject::Class(_) => false,
        },
        _ => false,
    }
}

/// A tc step that can share a batch: all but a table delete, which runs alone so it can wait
/// out the kernel's hold on it (see `request_until_unlinked`).
fn is_tc(step: &Step) -> bool {
    matches!(&step.action, Operation::Tc { op, object, .. } if !is_table_delete(*op, object))
}

/// Runs one batch: a run of tc steps as many messages per `sendmsg`, or one other step.
fn run_batch(
    sock: &mut RtSocket,
    devices: &mut HashMap<String, u32>,
    steps: &[&Step],
) -> Vec<Result<Option<String>, String>> {
    if !steps.iter().all(|s| is_tc(s)) {
        return steps.iter().map(|s| run(sock, devices, s)).collect();
    }
    let mut outcomes: Vec<Option<Result<Option<String>, String>>> = vec![None; steps.len()];
    let mut messages = Vec::new();
    let mut sent = Vec::new();
    for (i, step) in steps.iter().enumerate() {
        match tc_message(sock, devices, step) {
            Ok(m) => {
                messages.push(m);
                sent.push(i);
            }
            Err(e) => outcomes[i] = Some(Err(e.to_string())),
        }
    }
    match sock.batch(messages) {
        Ok(acks) => {
            for (i, ack) in sent.into_iter().zip(acks) {
                outcomes[i] = Some(match ack {
                    Ok(a) => Ok(a.warning),
                    Err(k) if tolerated(steps[i], k.errno) => Ok(None),
                    Err(error) => Err(NetlinkError::Kernel {
                        operation: steps[i].command(),
                        error,
                    }
                    .to_string()),
                });
            }
        }
        Err(e) => {
            for i in sent {
                outcomes[i] = Some(Err(e.to_string()));
            }
        }
    }
    outcomes
        .into_iter()
        .map(|o| o.unwrap_or_else(|| Err("not sent".into())))
        .collect()
}

/// An error that means the step's object is already as wanted: created by someone before us,
/// or deleted with its parent.
fn tolerated(step: &Step, errno: i32) -> bool {
    step.exists_ok && (errno == libc::EEXIST || (errno == libc::ENOENT && step.deletes()))
}

fn result(
    step: &Step,
    status: Status,
    error: Option<String>,
    warning: Option<String>,
) -> StepResult {
    StepResult {
        step: step.name.clone(),
        command: step.command(),
        status,
        error,
        warning,
    }
}

/// The ifindex of a step's device; IFBs are looked up by name (they may be new in this run).
fn resolve(
    sock: &mut RtSocket,
    devices: &mut HashMap<String, u32>,
    dev: &Dev,
) -> Result<u32, NetlinkError> {
    match dev {
        Dev::Index { index, .. } => Ok(*index),
        Dev::Ifb(name) => {
            if let Some(i) = devices.get(name) {
                return Ok(*i);
            }
            let index = sock.link_by_name(name)?.index;
            devices.insert(name.clone(), index);
            Ok(index)
        }
    }
}

fn run(
    sock: &mut RtSocket,
    devices: &mut HashMap<String, u32>,
    step: &Step,
) -> Result<Option<String>, String> {
    match run_operation(sock, devices, step) {
        Err(e) if e.kernel().is_some_and(|k| tolerated(step, k.errno)) => Ok(None),
        other => other.map_err(|e| e.to_string()),
    }
}

fn run_operation(
    sock: &mut RtSocket,
    devices: &mut HashMap<String, u32>,
    step: &Step,
) -> Result<Option<String>, NetlinkError> {
    match &step.action {
        Operation::CreateIfb(name) => {
            devices.remove(name);
            let link = sock.create_ifb(name)?;
            devices.insert(name.clone(), link.index);
            Ok(None)
        }
        Operation::SetUp(dev) => {
            let index = resolve(sock, devices, dev)?;
            sock.set_link_up(index)?;
            Ok(None)
        }
        Operation::DeleteLink(dev) => {
            let index = resolve(sock, devices, dev)?;
            sock.delete_link(index)?;
            devices.remove(dev.name());
            Ok(None)
        }
        Operation::Tc { op, object, .. } => {
            let message = tc_message(sock, devices, step)?;
            let ack = if is_table_delete(*op, object) {
                request_until_unlinked(sock, message, &step.command())?
            } else {
                sock.request(message, &step.command())?
            };
            Ok(ack.warning)
        }
        Operation::Nft { .. } | Operation::NftRemoveTagged { .. } => {
            run_nft(&step.action)?;
            Ok(None)
        }
    }
}

/// The netlink request of a tc step, its devices resolved (and, deleting a node made without a
/// table, the table the kernel gave it).
fn tc_message(
    sock: &mut RtSocket,
    devices: &mut HashMap<String, u32>,
    step: &Step,
) -> Result<Vec<u8>, NetlinkError> {
    let Operation::Tc {
        op,
        dev,
        object,
        redirect_to,
    } = &step.action
    else {
        unreachable!("only tc steps have a tc message")
    };
    let ifindex = resolve(sock, devices, dev)?;
    let target = match redirect_to {
        Some(d) => Some(resolve(sock, devices, d)?),
        None => None,
    };
    let mut object = object.clone();
    if let TcObject::Filter(f) = &mut object {
        f.ifindex = ifindex;
        if let Some(t) = target {
            point_redirects_at(&mut f.kind, t);
        }
        if *op == Op::Delete {
            find_root_table(sock, f)?;
        }
    }
    Ok(tc_request(*op, &object, ifindex))
}

/// Runs an nft step in the namespace at `netns`.
fn run_nft(action: &Operation) -> Result<(), NetlinkError> {
    match action {
        Operation::Nft { netns, ops } => nft::apply(netns.as_deref(), ops),
        Operation::NftRemoveTagged {
            netns,
            rule,
            subject,
        } => {
            let state = nft::dump(netns.as_deref())?;
            let ops: Vec<NftOp> = state
                .rules
                .iter()
                .filter(|r| {
                    &r.rule == rule && r.tag.as_ref().is_some_and(|t| &t.subject == subject)
                })
                .map(|r| NftOp::DeleteRule {
                    chain: r.chain.clone(),
                    handle: r.handle,
                })
                .collect();
            if ops.is_empty() {
                return Ok(());
            }
            nft::apply(netns.as_deref(), &ops)
        }
        _ => unreachable!("only nft operations"),
    }
}

/// The netlink request of a tc step's object on the device `ifindex`.
pub fn tc_request(op: Op, object: &TcObject, ifindex: u32) -> Vec<u8> {
    match object.clone() {
        TcObject::Qdisc(mut q) => {
            q.ifindex = ifindex;
            q.request(op)
        }
        TcObject::Class(mut c) => {
            c.ifindex = ifindex;
            c.request(op)
        }
        TcObject::Filter(mut f) => {
            f.ifindex = ifindex;
            f.request(op)
        }
    }
}

/// How long a u32 table delete waits for the kernel to let go of a link just deleted.
const UNLINK_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

fn is_table_delete(op: Op, object: &TcObject) -> bool {
    let TcObject::Filter(f) = object else {
        return false;
    };
    let table = matches!(f.kind, FilterKind::U32(_)) && U32Handle(f.handle).is_table();
    op == Op::Delete && f.handle != 0 && table
}

/// Sends a u32 table delete, retrying while the kernel calls the table in use: a deleted link
/// node drops its hold on the table it pointed at only after an RCU grace period, so the delete
/// that follows it in a plan can briefly be refused (EBUSY).
fn request_until_unlinked(
    sock: &mut RtSocket,
    message: Vec<u8>,
    operation: &str,
) -> Result<crate::netlink::socket::Ack, NetlinkError> {
    let deadline = std::time::Instant::now() + UNLINK_WAIT;
    loop {
        match sock.request(message.clone(), operation) {
            Err(e)
                if e.kernel().is_some_and(|k| k.errno == libc::EBUSY)
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            other => return other,
        }
    }
}

/// A u32 node created without a table (a band's root link, a listener, a u32 catch-all) went
/// into the root table the kernel gave its priority, and is deleted by its full handle: when
/// the step does not know that table (undoing a create), it is looked up.
fn find_root_table(sock: &mut RtSocket, f: &mut Filter) -> Result<(), NetlinkError> {
    let h = U32Handle(f.handle);
    if !matches!(f.kind, FilterKind::U32(_)) || h.table() != 0 || h.node() == 0 {
        return Ok(());
    }
    let request = tc::dump_request(tc::RTM_GETTFILTER, f.ifindex, f.parent);
    for m in sock.dump(&request, "dump filters")? {
        let Ok(TcEntry::Filter(e)) = tc::decode(m.msg_type, &m.payload) else {
            continue;
        };
        let table = U32Handle(e.filter.handle).table();
        let is_table = matches!(&e.filter.kind, FilterKind::U32(u) if u.divisor.is_some());
        if e.filter.priority == f.priority && is_table && table >= U32Handle::ROOT_TABLE {
            f.handle = U32Handle::new(table, 0, h.node()).0;
            break;
        }
    }
    Ok(())
}

fn point_redirects_at(kind: &mut FilterKind, ifindex: u32) {
    let actions = match kind {
        FilterKind::U32(u) => &mut u.actions,
        FilterKind::MatchAll(m) => &mut m.actions,
        FilterKind::Fw(f) => &mut f.actions,
        FilterKind::Other { .. } => return,
    };
    for a in actions {
        if let Action::Mirred { ifindex: i, .. } = a {
            *i = ifindex;
        }
    }
}

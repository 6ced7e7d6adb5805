//! Runs a plan against the kernel, one acknowledged step at a time. When a step fails, the steps
//! this run already did are undone in reverse order, so the kernel ends as it began.

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

/// Runs `steps` on `sock`.
pub fn execute(sock: &mut RtSocket, steps: &[Step]) -> Execution {
    let mut devices = HashMap::new();
    let mut exec = Execution::default();
    let mut undo_stack: Vec<(usize, Step)> = Vec::new();
    for (i, step) in steps.iter().enumerate() {
        match run(sock, &mut devices, step) {
            Ok(warning) => {
                exec.results.push(result(step, Status::Ok, None, warning));
                // A step's undo steps run in the order written, after those of later steps.
                undo_stack.extend(step.undo.iter().rev().cloned().map(|u| (i, u)));
            }
            Err(e) => {
                exec.results
                    .push(result(step, Status::Failed, Some(e), None));
                for later in &steps[i + 1..] {
                    exec.results.push(result(later, Status::NotRun, None, None));
                }
                while let Some((done, undo)) = undo_stack.pop() {
                    let outcome = run(sock, &mut devices, &undo);
                    exec.results[done].status = Status::Undone;
                    exec.rollback.push(match outcome {
                        Ok(w) => result(&undo, Status::Ok, None, w),
                        Err(e) => result(&undo, Status::Failed, Some(e), None),
                    });
                }
                break;
            }
        }
    }
    exec
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
    let outcome = run_operation(sock, devices, step);
    match outcome {
        // Already in the wanted state: created by someone before us, or deleted with its parent.
        Err(e)
            if step.exists_ok
                && e.kernel().is_some_and(|k| {
                    k.errno == libc::EEXIST || (k.errno == libc::ENOENT && step.deletes())
                }) =>
        {
            Ok(None)
        }
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
        Operation::Tc {
            op,
            dev,
            object,
            redirect_to,
        } => {
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
            let message = tc_request(*op, &object, ifindex);
            let ack = if is_table_delete(*op, &object) {
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

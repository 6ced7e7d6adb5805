//! Runs a run's steps against a [`Kernel`], every step acknowledged. Consecutive tc steps go as
//! one batch; when a step fails, the steps this run already did are undone in reverse order, so
//! the kernel ends as it began.

use super::kernel::Kernel;
use crate::model::tc::{FilterKind, Op};
use crate::model::U32Handle;
use crate::reconcile::plan::{Operation, Step, TcObject};

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

/// What became of one step. It is the step's by position: a decision's results are its plan's
/// steps in order, so names and commands are rendered from the plan when reported, not kept
/// twice (a run of 10 000 limits has 20 000 of them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepResult {
    pub status: Status,
    pub error: Option<String>,
    /// A warning the kernel attached to its acknowledgement.
    pub warning: Option<String>,
}

/// An undo step run after a failure: it may be any decision's, so it carries its name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UndoResult {
    pub step: String,
    pub command: String,
    pub result: StepResult,
}

/// What running a plan did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Execution {
    /// One per step, in the order of the steps run.
    pub results: Vec<StepResult>,
    /// The undo steps run after a failure, in the order they ran.
    pub rollback: Vec<UndoResult>,
}

impl Execution {
    pub fn failed(&self) -> bool {
        self.results.iter().any(|r| r.status == Status::Failed)
    }

    /// True when a failure was followed by an undo that itself failed: the kernel may differ
    /// from how it began.
    pub fn rollback_failed(&self) -> bool {
        self.rollback
            .iter()
            .any(|r| r.result.status == Status::Failed)
    }
}

/// A step as a run executes it: its kernel operation, and the steps that undo it, written out
/// one at a time and only when a rollback runs.
pub trait RunItem {
    fn step(&self) -> &Step;

    fn undo_len(&self) -> usize {
        self.step().undo_len()
    }

    fn undo_step(&self, u: usize) -> Step {
        self.step().undo_steps()[u].clone()
    }
}

impl RunItem for Step {
    fn step(&self) -> &Step {
        self
    }
}

impl RunItem for &Step {
    fn step(&self) -> &Step {
        self
    }
}

/// Runs `steps` on `kernel`. A failure stops the run after the batch it was in, and everything
/// done so far is undone, last first.
pub fn execute<S: RunItem>(kernel: &mut impl Kernel, steps: &[S]) -> Execution {
    execute_with_progress(kernel, steps, &mut |_, _| true)
}

/// `execute`, telling `progress` (steps done, steps in all) after each batch; when it answers
/// false (the run was interrupted), no further batch runs and what was done is undone.
pub fn execute_with_progress<S: RunItem>(
    kernel: &mut impl Kernel,
    items: &[S],
    progress: &mut dyn FnMut(usize, usize) -> bool,
) -> Execution {
    let steps: Vec<&Step> = items.iter().map(RunItem::step).collect();
    let mut exec = Execution::default();
    // The undo steps of what is done: (the step, which of its undo steps), written out only
    // if a rollback runs.
    let mut undo_stack: Vec<(usize, usize)> = Vec::new();
    let mut next = 0;
    while next < steps.len() {
        let end = batch_end(&steps, next);
        let outcomes = kernel.run_batch(&steps[next..end]);
        let mut failed = false;
        for (i, outcome) in (next..end).zip(outcomes) {
            match outcome {
                Ok(warning) => {
                    exec.results.push(result(Status::Ok, None, warning));
                    // A step's undo steps run in the order written, after those of later steps.
                    undo_stack.extend((0..items[i].undo_len()).rev().map(|u| (i, u)));
                }
                Err(e) => {
                    failed = true;
                    exec.results.push(result(Status::Failed, Some(e), None));
                }
            }
        }
        next = end;
        if !failed && next < steps.len() && !progress(next, steps.len()) {
            failed = true;
            exec.results.push(result(
                Status::Failed,
                Some("interrupted by a signal before this step; the steps done are undone".into()),
                None,
            ));
            next += 1;
        }
        if failed {
            exec.results
                .resize(steps.len(), result(Status::NotRun, None, None));
            undo_stack.reverse();
            let undo: Vec<(usize, Step)> = undo_stack
                .iter()
                .map(|(i, u)| (*i, items[*i].undo_step(*u)))
                .collect();
            rollback(kernel, &undo, &mut exec);
            break;
        }
    }
    exec
}

/// Runs the undo steps in the order given, each one whatever happened to the others, and marks
/// the steps they undid.
fn rollback(kernel: &mut impl Kernel, undo: &[(usize, Step)], exec: &mut Execution) {
    let steps: Vec<&Step> = undo.iter().map(|(_, s)| s).collect();
    let mut next = 0;
    while next < steps.len() {
        let end = batch_end(&steps, next);
        let outcomes = kernel.run_batch(&steps[next..end]);
        for ((done, step), outcome) in undo[next..end].iter().zip(outcomes) {
            exec.results[*done].status = Status::Undone;
            exec.rollback.push(UndoResult {
                step: step.name.to_string(),
                command: step.command(),
                result: match outcome {
                    Ok(w) => result(Status::Ok, None, w),
                    Err(e) => result(Status::Failed, Some(e), None),
                },
            });
        }
        next = end;
    }
}

/// The end of the batch starting at `start`: the following tc steps up to and including one
/// that makes a container (a qdisc or a u32 table), or the one other step. The kernel handles
/// every message of a batch even after one fails, so nothing is sent into a container before
/// its creation is acknowledged.
pub fn batch_end(steps: &[&Step], start: usize) -> usize {
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
            // A class's leaf qdisc holds nothing raylimit sends later: it need not end a batch.
            TcObject::Qdisc(q) => q.parent.major() != crate::shaping::ROOT_MAJOR,
            TcObject::Filter(f) => matches!(&f.kind, FilterKind::U32(u) if u.divisor.is_some()),
            TcObject::Class(_) => false,
        },
        _ => false,
    }
}

/// A tc step that can share a batch: all but a table delete, which runs alone so it can wait
/// out the kernel's hold on it.
pub fn is_tc(step: &Step) -> bool {
    matches!(&step.action, Operation::Tc { op, object, .. } if !is_table_delete(*op, object))
}

/// A delete of a whole u32 table (not a node, not a priority).
pub fn is_table_delete(op: Op, object: &TcObject) -> bool {
    let TcObject::Filter(f) = object else {
        return false;
    };
    let table = matches!(f.kind, FilterKind::U32(_)) && U32Handle(f.handle).is_table();
    op == Op::Delete && f.handle != 0 && table
}

pub fn result(status: Status, error: Option<String>, warning: Option<String>) -> StepResult {
    StepResult {
        status,
        error,
        warning,
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

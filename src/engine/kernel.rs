//! The kernel as the engine sees it: read a device's tc objects and raylimit's nft table, probe
//! optional features, run batches of plan steps. [`NetlinkKernel`] does it over rtnetlink and
//! nfnetlink; the unit tests use an in-memory kernel (`engine::fake`).

use std::collections::HashMap;

use crate::model::action::Action;
use crate::model::tc::{self, Filter, FilterKind, Op, TcEntry};
use crate::model::DeviceTc;
use crate::model::Link;
use crate::model::U32Handle;
use crate::netlink::nft::{self, NftOp, NftState};
use crate::netlink::probe::{Capabilities, Feature, ProbeRoots};
use crate::netlink::socket::Ack;
use crate::netlink::{NetlinkError, RtSocket};
use crate::reconcile::plan::{Dev, Operation, Step, TcObject};

/// What one step of a batch came to: done (with the kernel's warning, if any), or why not.
pub type StepOutcome = Result<Option<String>, String>;

/// Kernel access: observation and execution.
pub trait Kernel {
    /// A network device by name.
    fn link_by_name(&mut self, name: &str) -> Result<Link, NetlinkError>;
    /// Every qdisc, class and filter of one device.
    fn device_tc(&mut self, ifindex: u32) -> Result<DeviceTc, NetlinkError>;
    /// raylimit's nftables table.
    fn nft(&mut self) -> Result<NftState, NetlinkError>;
    /// The optional tc features the kernel offers.
    fn capabilities(&mut self) -> Capabilities;
    /// Whether `feature`'s module is there, by the cheap checks alone (no kernel configuration
    /// read): for a run that may change nothing.
    fn module_confirmed(&mut self, feature: Feature) -> bool {
        self.capabilities().get(feature).confirmed()
    }
    /// Runs one batch as [`super::execute`] cuts them: a run of tc steps (many messages, one
    /// send, every acknowledgement checked), or one other step. One outcome per step.
    fn run_batch(&mut self, steps: &[&Step]) -> Vec<StepOutcome>;
}

/// The real kernel, over one rtnetlink socket (in a named network namespace, or the current
/// one) and nfnetlink for the nft table.
pub struct NetlinkKernel {
    sock: RtSocket,
    /// `/run/netns/NAME`, where nft runs; none for the current namespace.
    netns_path: Option<String>,
    /// IFB indexes by name, learned when a step first needs one (it may be new in this run).
    devices: HashMap<String, u32>,
}

impl NetlinkKernel {
    /// A kernel in the named network namespace (`--netns`), or the current one.
    pub fn open(netns: Option<&str>) -> Result<Self, NetlinkError> {
        Ok(NetlinkKernel {
            sock: RtSocket::open_in(netns)?,
            netns_path: netns.map(|n| format!("/run/netns/{n}")),
            devices: HashMap::new(),
        })
    }

    /// A kernel over a socket already open (nft in the current namespace).
    pub fn from_socket(sock: RtSocket) -> Self {
        NetlinkKernel {
            sock,
            netns_path: None,
            devices: HashMap::new(),
        }
    }

    /// The socket, for reads the trait does not cover (status, show).
    pub fn socket(&mut self) -> &mut RtSocket {
        &mut self.sock
    }

    /// The ifindex of a step's device; IFBs are looked up by name (they may be new in this run).
    fn resolve(&mut self, dev: &Dev) -> Result<u32, NetlinkError> {
        match dev {
            Dev::Index { index, .. } => Ok(*index),
            Dev::Ifb(name) => {
                if let Some(i) = self.devices.get(&**name) {
                    return Ok(*i);
                }
                let index = self.sock.link_by_name(name)?.index;
                self.devices.insert(name.to_string(), index);
                Ok(index)
            }
        }
    }

    fn run_one(&mut self, step: &Step) -> StepOutcome {
        match self.run_operation(step) {
            Err(e) if e.kernel().is_some_and(|k| tolerated(step, k.errno)) => Ok(None),
            other => other.map_err(|e| e.to_string()),
        }
    }

    fn run_operation(&mut self, step: &Step) -> Result<Option<String>, NetlinkError> {
        match &step.action {
            Operation::CreateIfb(name) => {
                self.devices.remove(name);
                let link = self.sock.create_ifb(name)?;
                self.devices.insert(name.clone(), link.index);
                Ok(None)
            }
            Operation::SetUp(dev) => {
                let index = self.resolve(dev)?;
                self.sock.set_link_up(index)?;
                Ok(None)
            }
            Operation::DeleteLink(dev) => {
                let index = self.resolve(dev)?;
                self.sock.delete_link(index)?;
                self.devices.remove(dev.name());
                Ok(None)
            }
            Operation::Tc { op, object, .. } => {
                let message = self.tc_message(step)?;
                let ack = if super::execute::is_table_delete(*op, object) {
                    self.request_until_unlinked(message, &step.command())?
                } else {
                    self.sock.request(message, &step.command())?
                };
                Ok(ack.warning)
            }
            Operation::Nft { .. } | Operation::NftRemoveTagged { .. } => {
                run_nft(&step.action)?;
                Ok(None)
            }
        }
    }

    /// The netlink request of a tc step, its devices resolved (and, deleting a node made
    /// without a table, the table the kernel gave it).
    fn tc_message(&mut self, step: &Step) -> Result<Vec<u8>, NetlinkError> {
        let Operation::Tc {
            op,
            dev,
            object,
            redirect_to,
        } = &step.action
        else {
            unreachable!("only tc steps have a tc message")
        };
        let ifindex = self.resolve(dev)?;
        let target = match redirect_to {
            Some(d) => Some(self.resolve(d)?),
            None => None,
        };
        let mut object = object.clone();
        if let TcObject::Filter(f) = &mut object {
            f.ifindex = ifindex;
            if let Some(t) = target {
                point_redirects_at(&mut f.kind, t);
            }
            if *op == Op::Delete {
                self.find_root_table(f)?;
            }
        }
        Ok(super::execute::tc_request(*op, &object, ifindex))
    }

    /// Sends a u32 table delete, retrying while the kernel calls the table in use: a deleted
    /// link node drops its hold on the table it pointed at only after an RCU grace period, so
    /// the delete that follows it in a plan can briefly be refused (EBUSY).
    fn request_until_unlinked(
        &mut self,
        message: Vec<u8>,
        operation: &str,
    ) -> Result<Ack, NetlinkError> {
        let deadline = std::time::Instant::now() + UNLINK_WAIT;
        loop {
            match self.sock.request(message.clone(), operation) {
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

    /// A u32 node created without a table (a band's root link, a listener, a u32 catch-all)
    /// went into the root table the kernel gave its priority, and is deleted by its full handle:
    /// when the step does not know that table (undoing a create), it is looked up.
    fn find_root_table(&mut self, f: &mut Filter) -> Result<(), NetlinkError> {
        let h = U32Handle(f.handle);
        if !matches!(f.kind, FilterKind::U32(_)) || h.table() != 0 || h.node() == 0 {
            return Ok(());
        }
        let request = tc::dump_request(tc::RTM_GETTFILTER, f.ifindex, f.parent);
        for m in self.sock.dump(&request, "dump filters")? {
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
}

impl Kernel for NetlinkKernel {
    fn link_by_name(&mut self, name: &str) -> Result<Link, NetlinkError> {
        self.sock.link_by_name(name)
    }

    fn device_tc(&mut self, ifindex: u32) -> Result<DeviceTc, NetlinkError> {
        self.sock.device_tc(ifindex)
    }

    fn nft(&mut self) -> Result<NftState, NetlinkError> {
        nft::dump(self.netns_path.as_deref())
    }

    fn capabilities(&mut self) -> Capabilities {
        Capabilities::probe()
    }

    fn module_confirmed(&mut self, feature: Feature) -> bool {
        crate::netlink::probe::module_confirmed(feature, &ProbeRoots::default())
    }

    fn run_batch(&mut self, steps: &[&Step]) -> Vec<StepOutcome> {
        if !steps.iter().all(|s| super::execute::is_tc(s)) {
            return steps.iter().map(|s| self.run_one(s)).collect();
        }
        let mut outcomes: Vec<Option<StepOutcome>> = vec![None; steps.len()];
        let mut messages = Vec::new();
        let mut sent = Vec::new();
        for (i, step) in steps.iter().enumerate() {
            match self.tc_message(step) {
                Ok(m) => {
                    messages.push(m);
                    sent.push(i);
                }
                Err(e) => outcomes[i] = Some(Err(e.to_string())),
            }
        }
        match self.sock.batch(messages) {
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
}

/// How long a u32 table delete waits for the kernel to let go of a link just deleted.
const UNLINK_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// An error that means the step's object is already as wanted: created by someone before us,
/// or deleted with its parent.
pub fn tolerated(step: &Step, errno: i32) -> bool {
    step.exists_ok && (errno == libc::EEXIST || (errno == libc::ENOENT && step.deletes()))
}

/// Runs an nft step in the namespace it names.
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

//! Everything tc holds for one device, read with one dump per object kind (filters per parent).

use super::error::NetlinkError;
use super::socket::{Message, RtSocket};
use crate::model::tc::{self, QdiscKind, TcEntry, RTM_GETQDISC, RTM_GETTCLASS, RTM_GETTFILTER};
use crate::model::{DeviceTc, TcHandle};

fn decode_all(messages: Vec<Message>) -> Result<Vec<TcEntry>, NetlinkError> {
    messages
        .iter()
        .map(|m| tc::decode(m.msg_type, &m.payload).map_err(NetlinkError::from))
        .collect()
}

impl RtSocket {
    /// Reads every qdisc, class and filter of one device.
    pub fn device_tc(&mut self, ifindex: u32) -> Result<DeviceTc, NetlinkError> {
        let mut out = DeviceTc {
            ifindex,
            ..Default::default()
        };
        let qdiscs = self.dump(
            &tc::dump_request(RTM_GETQDISC, ifindex, TcHandle(0)),
            "dump qdiscs",
        )?;
        for e in decode_all(qdiscs)? {
            // The kernel ignores the device in qdisc dumps; keep only this one's.
            if let TcEntry::Qdisc(q) = e {
                if q.qdisc.ifindex == ifindex {
                    out.qdiscs.push(q);
                }
            }
        }
        // Filters and classes are read where they classify: on the root qdisc and the ingress
        // hook. A leaf qdisc under a class (one per limit) has neither filters nor classes of
        // interest, and asking each for its filters would cost a request per limit.
        let mut parents = Vec::new();
        let mut root = None;
        for q in &out.qdiscs {
            match q.qdisc.kind {
                QdiscKind::Clsact => {
                    parents.extend([TcHandle::CLSACT_INGRESS, TcHandle::CLSACT_EGRESS])
                }
                QdiscKind::Ingress => parents.push(q.qdisc.handle),
                _ if q.qdisc.parent == TcHandle::ROOT && q.qdisc.handle.major() != 0 => {
                    root = Some(q.qdisc.handle);
                    parents.push(q.qdisc.handle);
                }
                _ => {}
            }
        }
        if let Some(root) = root {
            let classes = self.dump(
                &tc::dump_request(RTM_GETTCLASS, ifindex, root),
                "dump classes",
            )?;
            for e in decode_all(classes)? {
                if let TcEntry::Class(c) = e {
                    out.classes.push(c);
                }
            }
        }
        for parent in parents {
            let filters = self.dump(
                &tc::dump_request(RTM_GETTFILTER, ifindex, parent),
                "dump filters",
            )?;
            for e in decode_all(filters)? {
                if let TcEntry::Filter(mut f) = e {
                    // Ingress-qdisc filters may be reported under ffff:0; keep the parent asked for.
                    f.filter.parent = parent;
                    out.filters.push(f);
                }
            }
        }
        Ok(out)
    }
}

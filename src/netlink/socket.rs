//! A synchronous rtnetlink socket: requests with acknowledgements (many per `sendmsg`), dumps,
//! extended-ack error text, and sockets opened inside a named network namespace.

use std::fs::File;
use std::os::fd::AsRawFd;

use netlink_packet_core::{NetlinkBuffer, NLM_F_DUMP_INTR};
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};

use super::error::{KernelError, NetlinkError};
use crate::model::attr::Attrs;

const NLMSG_NOOP: u16 = 1;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_CAPPED: u16 = 0x100;
const NLM_F_ACK_TLVS: u16 = 0x200;
const NLMSGERR_ATTR_MSG: u16 = 1;

/// Largest burst of requests put in one `sendmsg` before their acknowledgements are read.
const SEND_CHUNK_BYTES: usize = 64 * 1024;
/// Each message is answered by its own acknowledgement skb (about 1 KiB of receive buffer
/// each), so a chunk is also bounded in messages to keep every answer within the buffer.
const SEND_CHUNK_MESSAGES: usize = 256;
const RECV_BUFFER_BYTES: usize = 1 << 20;
const DUMP_RETRIES: usize = 5;
/// The kernel answers in microseconds; a reply this late means something is wrong, not slow.
const RECV_TIMEOUT_SECS: u32 = 30;

/// A successful acknowledgement; the kernel may attach a warning ("quantum of class 10002 is big").
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Ack {
    pub warning: Option<String>,
}

/// One message of a dump reply: its type and its payload after the netlink header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub msg_type: u16,
    pub payload: Vec<u8>,
}

pub struct RtSocket {
    socket: Socket,
    next_seq: u32,
    buf: Vec<u8>,
}

impl RtSocket {
    /// A route socket in the current network namespace.
    pub fn open() -> Result<Self, NetlinkError> {
        Self::open_protocol(NETLINK_ROUTE)
    }

    /// A route socket in the named network namespace (`/run/netns/NAME`), or the current one.
    pub fn open_in(netns: Option<&str>) -> Result<Self, NetlinkError> {
        match netns {
            None => Self::open(),
            Some(name) => in_netns(name, Self::open),
        }
    }

    /// A socket of another netlink protocol (sock_diag, say) with the same request and dump logic.
    pub fn open_protocol(protocol: isize) -> Result<Self, NetlinkError> {
        let mut socket = Socket::new(protocol)?;
        socket.bind_auto()?;
        socket.set_ext_ack(true)?;
        socket.set_cap_ack(true)?;
        // A larger receive buffer keeps acknowledgements of big batches from being dropped
        // (root may go past net.core.rmem_max).
        if set_buffer(&socket, libc::SO_RCVBUFFORCE, RECV_BUFFER_BYTES).is_err() {
            let _ = socket.set_rx_buf_sz(RECV_BUFFER_BYTES);
        }
        socket.connect(&SocketAddr::new(0, 0))?;
        set_receive_timeout(&socket, RECV_TIMEOUT_SECS)?;
        Ok(Self {
            socket,
            next_seq: 1,
            // Capacity only: recv writes into the spare capacity, so no megabyte is zeroed (and
            // faulted in) for the few kilobytes a small run receives.
            buf: Vec::with_capacity(RECV_BUFFER_BYTES),
        })
    }

    /// Sends one request and waits for its acknowledgement. `operation` names it in errors.
    pub fn request(&mut self, message: Vec<u8>, operation: &str) -> Result<Ack, NetlinkError> {
        let mut results = self.batch(vec![message])?;
        let result = results
            .pop()
            .ok_or_else(|| NetlinkError::Protocol("no acknowledgement".into()))?;
        result.map_err(|error| NetlinkError::Kernel {
            operation: operation.to_string(),
            error,
        })
    }

    /// Sends requests, many per `sendmsg`, and returns each one's answer in order. The kernel
    /// handles every message even when an earlier one fails.
    pub fn batch(
        &mut self,
        messages: Vec<Vec<u8>>,
    ) -> Result<Vec<Result<Ack, KernelError>>, NetlinkError> {
        let mut results = Vec::with_capacity(messages.len());
        let mut chunk: Vec<u8> = Vec::new();
        let mut seqs: Vec<u32> = Vec::new();
        for mut message in messages {
            if message.len() < 16 {
                return Err(NetlinkError::Protocol(
                    "request shorter than a netlink header".into(),
                ));
            }
            let full =
                chunk.len() + message.len() > SEND_CHUNK_BYTES || seqs.len() >= SEND_CHUNK_MESSAGES;
            if !chunk.is_empty() && full {
                self.flush(&mut chunk, &mut seqs, &mut results)?;
            }
            let seq = self.take_seq();
            message[8..12].copy_from_slice(&seq.to_ne_bytes());
            chunk.extend_from_slice(&message);
            seqs.push(seq);
        }
        self.flush(&mut chunk, &mut seqs, &mut results)?;
        Ok(results)
    }

    /// Reserves `count` consecutive sequence numbers for messages the caller numbers itself (an
    /// nfnetlink batch) and returns the first.
    pub fn reserve_seqs(&mut self, count: u32) -> u32 {
        if self.next_seq.checked_add(count).is_none() {
            self.next_seq = 1;
        }
        let first = self.next_seq;
        self.next_seq += count;
        first
    }

    /// Sends `buffer` (messages already numbered, from [`RtSocket::reserve_seqs`]) in ONE
    /// `sendmsg`, as an nfnetlink batch must be, and returns the answer to each of `acked` in
    /// order. A refusal answering any other message of the buffer (the batch header, when the
    /// kernel rejects the batch as a whole) ends the wait and is returned as the error, with
    /// `operation` naming the batch.
    pub fn transaction(
        &mut self,
        buffer: &[u8],
        acked: &[u32],
        operation: &str,
    ) -> Result<Vec<Result<Ack, KernelError>>, NetlinkError> {
        let own: Vec<u32> = split_messages(buffer)?.iter().map(|(h, _)| h.seq).collect();
        if buffer.len() > SEND_CHUNK_BYTES {
            // Netlink refuses a message larger than the send buffer (EMSGSIZE); root may raise it.
            let bytes = 2 * buffer.len() + 4096;
            if set_buffer(&self.socket, libc::SO_SNDBUFFORCE, bytes).is_err() {
                let _ = set_buffer(&self.socket, libc::SO_SNDBUF, bytes);
            }
        }
        self.socket.send(buffer, 0)?;
        let mut results: Vec<Option<Result<Ack, KernelError>>> = vec![None; acked.len()];
        let mut pending = acked.len();
        while pending > 0 {
            self.buf.clear();
            let n = self.socket.recv(&mut self.buf, 0)?;
            for (header, payload) in split_messages(&self.buf[..n])? {
                if header.msg_type != NLMSG_ERROR {
                    continue;
                }
                if let Some(pos) = acked.iter().position(|&s| s == header.seq) {
                    if results[pos].is_none() {
                        results[pos] = Some(parse_ack(header.flags, payload)?);
                        pending -= 1;
                    }
                } else if own.contains(&header.seq) {
                    if let Err(error) = parse_ack(header.flags, payload)? {
                        return Err(NetlinkError::Kernel {
                            operation: operation.to_string(),
                            error,
                        });
                    }
                }
            }
        }
        Ok(results.into_iter().flatten().collect())
    }

    fn take_seq(&mut self) -> u32 {
        let s = self.next_seq;
        self.next_seq = self.next_seq.wrapping_add(1).max(1);
        s
    }

    fn flush(
        &mut self,
        chunk: &mut Vec<u8>,
        seqs: &mut Vec<u32>,
        results: &mut Vec<Result<Ack, KernelError>>,
    ) -> Result<(), NetlinkError> {
        if seqs.is_empty() {
            return Ok(());
        }
        self.socket.send(chunk, 0)?;
        let first = results.len();
        results.extend(seqs.iter().map(|_| {
            Err(KernelError {
                errno: 0,
                message: None,
            })
        }));
        let mut pending = seqs.len();
        while pending > 0 {
            self.buf.clear();
            let n = self.socket.recv(&mut self.buf, 0)?;
            for (header, payload) in split_messages(&self.buf[..n])? {
                if header.msg_type != NLMSG_ERROR {
                    continue;
                }
                let Some(pos) = seqs.iter().position(|&s| s == header.seq) else {
                    continue;
                };
                results[first + pos] = parse_ack(header.flags, payload)?;
                pending -= 1;
            }
        }
        chunk.clear();
        seqs.clear();
        Ok(())
    }

    /// Runs a dump request and returns every object message, retrying when the kernel reports
    /// that the dump was interrupted by a concurrent change.
    pub fn dump(&mut self, request: &[u8], operation: &str) -> Result<Vec<Message>, NetlinkError> {
        for _ in 0..DUMP_RETRIES {
            if let Some(messages) = self.dump_once(request, operation)? {
                return Ok(messages);
            }
        }
        Err(NetlinkError::Protocol(format!(
            "{operation}: the dump kept changing under concurrent updates"
        )))
    }

    fn dump_once(
        &mut self,
        request: &[u8],
        operation: &str,
    ) -> Result<Option<Vec<Message>>, NetlinkError> {
        let mut request = request.to_vec();
        let seq = self.take_seq();
        request[8..12].copy_from_slice(&seq.to_ne_bytes());
        self.socket.send(&request, 0)?;
        let mut out = Vec::new();
        let mut interrupted = false;
        loop {
            self.buf.clear();
            let n = self.socket.recv(&mut self.buf, 0)?;
            for (header, payload) in split_messages(&self.buf[..n])? {
                if header.seq != seq {
                    continue;
                }
                interrupted |= header.flags & NLM_F_DUMP_INTR != 0;
                match header.msg_type {
                    NLMSG_DONE => return Ok((!interrupted).then_some(out)),
                    NLMSG_ERROR => {
                        return match parse_ack(header.flags, payload)? {
                            Ok(_) => Ok((!interrupted).then_some(out)),
                            Err(error) => Err(NetlinkError::Kernel {
                                operation: operation.to_string(),
                                error,
                            }),
                        }
                    }
                    NLMSG_NOOP => {}
                    ty => out.push(Message {
                        msg_type: ty,
                        payload: payload.to_vec(),
                    }),
                }
            }
        }
    }
}

/// Sets a socket buffer size option (SO_SNDBUF, SO_RCVBUFFORCE, ...).
fn set_buffer(socket: &Socket, option: libc::c_int, bytes: usize) -> std::io::Result<()> {
    let value = bytes.min(i32::MAX as usize) as libc::c_int;
    // SAFETY: a valid socket fd and a correctly sized int.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            option,
            &value as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn set_receive_timeout(socket: &Socket, secs: u32) -> std::io::Result<()> {
    let tv = libc::timeval {
        tv_sec: secs as _,
        tv_usec: 0,
    };
    // SAFETY: a valid socket fd and a correctly sized timeval.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            &tv as *const libc::timeval as *const libc::c_void,
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct Header {
    pub msg_type: u16,
    pub flags: u16,
    pub seq: u32,
}

/// Splits a receive buffer into netlink messages, checking every length.
pub(crate) fn split_messages(mut bytes: &[u8]) -> Result<Vec<(Header, &[u8])>, NetlinkError> {
    let mut out = Vec::new();
    while !bytes.is_empty() {
        let buf = NetlinkBuffer::new_checked(bytes)
            .map_err(|e| NetlinkError::Protocol(format!("malformed netlink reply: {e}")))?;
        let len = buf.length() as usize;
        let header = Header {
            msg_type: buf.message_type(),
            flags: buf.flags(),
            seq: buf.sequence_number(),
        };
        out.push((header, &bytes[16..len]));
        bytes = bytes.get(crate::model::attr::align4(len)..).unwrap_or(&[]);
    }
    Ok(out)
}

/// Reads an `NLMSG_ERROR` payload: errno 0 is an acknowledgement, anything else a refusal.
pub(crate) fn parse_ack(
    flags: u16,
    payload: &[u8],
) -> Result<Result<Ack, KernelError>, NetlinkError> {
    let code = payload
        .get(..4)
        .map(|b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
        .ok_or_else(|| NetlinkError::Protocol("truncated netlink error message".into()))?;
    let mut message = None;
    if flags & NLM_F_ACK_TLVS != 0 {
        // The original request's header (and, unless capped, its payload) comes before the TLVs.
        let orig_len = payload
            .get(4..8)
            .map(|b| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]) as usize)
            .unwrap_or(16);
        let skip = 4 + if flags & NLM_F_CAPPED != 0 {
            16
        } else {
            crate::model::attr::align4(orig_len)
        };
        if let Some(tlvs) = payload.get(skip..) {
            if let Ok(attrs) = Attrs::new(tlvs).collect() {
                message = attrs
                    .iter()
                    .find(|a| a.kind == NLMSGERR_ATTR_MSG)
                    .and_then(|a| a.string().ok())
                    .filter(|s| !s.is_empty());
            }
        }
    }
    Ok(if code == 0 {
        Ok(Ack { warning: message })
    } else {
        Err(KernelError {
            errno: -code,
            message,
        })
    })
}

/// Runs `f` with the calling thread inside the named network namespace, then returns to the
/// original one. Sockets created by `f` stay in the named namespace.
pub fn in_netns<T>(
    name: &str,
    f: impl FnOnce() -> Result<T, NetlinkError>,
) -> Result<T, NetlinkError> {
    if name.is_empty() || name.contains('/') || name == "." || name == ".." {
        return Err(NetlinkError::Namespace {
            name: name.to_string(),
            reason: "not a valid namespace name".into(),
        });
    }
    in_netns_at(&format!("/run/netns/{name}"), name, f)
}

/// Runs `f` inside the network namespace at `path` (a bind mount under /run/netns, or a process's
/// `/proc/PID/ns/net`), then returns. `label` names the namespace in errors.
pub fn in_netns_at<T>(
    path: &str,
    label: &str,
    f: impl FnOnce() -> Result<T, NetlinkError>,
) -> Result<T, NetlinkError> {
    let fail = |reason: String| NetlinkError::Namespace {
        name: label.to_string(),
        reason,
    };
    let target = File::open(path).map_err(|e| fail(format!("cannot open {path}: {e}")))?;
    let original = File::open("/proc/thread-self/ns/net")
        .map_err(|e| fail(format!("cannot open the current namespace: {e}")))?;
    // SAFETY: setns on valid namespace file descriptors only changes this thread's namespace.
    if unsafe { libc::setns(target.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(fail(format!(
            "cannot enter: {}",
            std::io::Error::last_os_error()
        )));
    }
    let result = f();
    // SAFETY: as above, returning to the namespace the thread started in.
    if unsafe { libc::setns(original.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        // Staying in the wrong namespace would misdirect every later operation.
        panic!(
            "cannot return to the original network namespace: {}",
            std::io::Error::last_os_error()
        );
    }
    result
}

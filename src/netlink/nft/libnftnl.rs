//! The one place raylimit calls libnftnl (through the nftnl crate and its `nftnl_sys` re-export),
//! behind a safe interface: build nfnetlink messages for tables, chains and rules, and parse the
//! kernel's table, chain and rule messages into plain Rust values.
//!
//! Why not only the nftnl crate: its `Rule` can carry a comment but no other userdata, its `Meta`
//! has no `priority` key, its `Bitwise` leaves out the operation that nft sends, its rule flags add
//! `NLM_F_EXCL` (nft does not), and its `Batch` decides the flags of the batch messages from the
//! running kernel's version, which would make [`super::batch`] impure. Tables and chains are
//! built with its `Table` and `Chain` (a base chain's type, policy and hook are appended by hand,
//! where nft puts them); rules, expressions, the table deletion, the batch delimiters and every parse go
//! through `nftnl_sys` here.
//!
//! Every pointer below is owned by a guard that frees it; every buffer handed to libnftnl is
//! sized for the largest nftables message and every message handed to its parsers carries an
//! `nlmsg_len` that is exactly the bytes behind it, so libmnl's bounds checks hold. libnftnl's
//! parsers trust the kernel beyond that: an attribute of the wrong size for its type ends the
//! process (`abi_breakage()`: "nf_tables kernel ABI is broken"), as it would end nft. So only the
//! kernel's own messages, and only those of raylimit's table, are handed to them.

use std::ffi::{c_char, c_void, CStr, CString};
use std::ptr::NonNull;

use nftnl::nftnl_sys as sys;
use nftnl::{Chain, Hook, MsgType, NlMsg, ProtoFamily, Table};

use crate::model::attr::AttrWriter;
use crate::netlink::error::DecodeError;

pub(super) const NFNL_SUBSYS_NFTABLES: u16 = 10;
pub(super) const NFT_MSG_NEWTABLE: u16 = 0;
pub(super) const NFT_MSG_GETTABLE: u16 = 1;
pub(super) const NFT_MSG_DELTABLE: u16 = 2;
pub(super) const NFT_MSG_NEWCHAIN: u16 = 3;
pub(super) const NFT_MSG_GETCHAIN: u16 = 4;
pub(super) const NFT_MSG_NEWRULE: u16 = 6;
pub(super) const NFT_MSG_GETRULE: u16 = 7;
pub(super) const NFT_MSG_DELRULE: u16 = 8;
pub(super) const NFT_MSG_GETGEN: u16 = 16;
pub(super) const NFT_MSG_NEWGEN: u16 = 15;

const NLM_F_REQUEST: u16 = 0x1;
pub(super) const NLM_F_ACK: u16 = 0x4;
const NLM_F_DUMP: u16 = 0x300;
const NLM_F_CREATE: u16 = 0x400;
const NLM_F_APPEND: u16 = 0x800;

/// The largest nftables message libnftnl builds: 64 KiB of attributes and a page of slack, as
/// `nft_nlmsg_maxsize()` says.
const MAX_MESSAGE: usize = 65536 + 4096;

/// The full message type of an nftables message.
pub(super) const fn nft_type(msg: u16) -> u16 {
    (NFNL_SUBSYS_NFTABLES << 8) | msg
}

/// An expression as raylimit writes and reads it: the attributes libnftnl knows for the kinds
/// raylimit uses, and the name of anything else.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Expr {
    /// `meta load KEY => reg DREG` (dreg set) or `meta set KEY with reg SREG` (sreg set).
    Meta {
        key: u32,
        dreg: Option<u32>,
        sreg: Option<u32>,
    },
    Cmp {
        sreg: u32,
        op: u32,
        data: Vec<u8>,
    },
    Bitwise {
        sreg: u32,
        dreg: u32,
        /// `NFT_BITWISE_BOOL` (0) when set: `(reg & mask) ^ xor`.
        op: Option<u32>,
        len: u32,
        mask: Vec<u8>,
        xor: Vec<u8>,
    },
    /// Written without values (as nft does: the kernel starts at zero); read with the kernel's.
    Counter {
        packets: u64,
        bytes: u64,
    },
    /// A data immediate; a verdict immediate reads back as [`Expr::Other`].
    Immediate {
        dreg: u32,
        data: Vec<u8>,
    },
    Ct {
        key: u32,
        dreg: Option<u32>,
        sreg: Option<u32>,
        dir: Option<u8>,
    },
    Other {
        name: String,
    },
}

/// Frees an expression that was never handed to a rule.
struct ExprGuard(NonNull<sys::nftnl_expr>);

impl Drop for ExprGuard {
    fn drop(&mut self) {
        // SAFETY: allocated by nftnl_expr_alloc and not owned by a rule (see `into_raw`).
        unsafe { sys::nftnl_expr_free(self.0.as_ptr()) }
    }
}

impl ExprGuard {
    fn alloc(name: &CStr) -> Self {
        // SAFETY: a valid C string; NULL only on allocation failure or an unknown name.
        let ptr = unsafe { sys::nftnl_expr_alloc(name.as_ptr()) };
        Self(NonNull::new(ptr).expect("libnftnl knows meta, cmp, bitwise, counter, immediate, ct"))
    }

    fn u32(&mut self, attr: u32, value: u32) {
        // SAFETY: a live expression; libnftnl copies the value.
        unsafe { sys::nftnl_expr_set_u32(self.0.as_ptr(), attr as u16, value) }
    }

    fn data(&mut self, attr: u32, value: &[u8]) {
        // SAFETY: a live expression; libnftnl copies `value.len()` bytes (at most 16 here).
        unsafe {
            sys::nftnl_expr_set(
                self.0.as_ptr(),
                attr as u16,
                value.as_ptr() as *const c_void,
                value.len() as u32,
            );
        }
    }

    fn into_raw(self) -> *mut sys::nftnl_expr {
        let ptr = self.0.as_ptr();
        std::mem::forget(self);
        ptr
    }
}

fn build_expr(expr: &Expr) -> Option<ExprGuard> {
    Some(match expr {
        Expr::Meta { key, dreg, sreg } => {
            let mut e = ExprGuard::alloc(c"meta");
            e.u32(sys::NFTNL_EXPR_META_KEY, *key);
            if let Some(r) = dreg {
                e.u32(sys::NFTNL_EXPR_META_DREG, *r);
            }
            if let Some(r) = sreg {
                e.u32(sys::NFTNL_EXPR_META_SREG, *r);
            }
            e
        }
        Expr::Cmp { sreg, op, data } => {
            let mut e = ExprGuard::alloc(c"cmp");
            e.u32(sys::NFTNL_EXPR_CMP_SREG, *sreg);
            e.u32(sys::NFTNL_EXPR_CMP_OP, *op);
            e.data(sys::NFTNL_EXPR_CMP_DATA, data);
            e
        }
        Expr::Bitwise {
            sreg,
            dreg,
            op,
            len,
            mask,
            xor,
        } => {
            let mut e = ExprGuard::alloc(c"bitwise");
            e.u32(sys::NFTNL_EXPR_BITWISE_SREG, *sreg);
            e.u32(sys::NFTNL_EXPR_BITWISE_DREG, *dreg);
            if let Some(op) = op {
                e.u32(sys::NFTNL_EXPR_BITWISE_OP, *op);
            }
            e.u32(sys::NFTNL_EXPR_BITWISE_LEN, *len);
            e.data(sys::NFTNL_EXPR_BITWISE_MASK, mask);
            e.data(sys::NFTNL_EXPR_BITWISE_XOR, xor);
            e
        }
        Expr::Counter { .. } => ExprGuard::alloc(c"counter"),
        Expr::Immediate { dreg, data } => {
            let mut e = ExprGuard::alloc(c"immediate");
            e.u32(sys::NFTNL_EXPR_IMM_DREG, *dreg);
            e.data(sys::NFTNL_EXPR_IMM_DATA, data);
            e
        }
        Expr::Ct {
            key,
            dreg,
            sreg,
            dir,
        } => {
            let mut e = ExprGuard::alloc(c"ct");
            e.u32(sys::NFTNL_EXPR_CT_KEY, *key);
            if let Some(r) = dreg {
                e.u32(sys::NFTNL_EXPR_CT_DREG, *r);
            }
            if let Some(r) = sreg {
                e.u32(sys::NFTNL_EXPR_CT_SREG, *r);
            }
            if let Some(d) = dir {
                // SAFETY: a live expression; the direction is a u8 attribute.
                unsafe { sys::nftnl_expr_set_u8(e.0.as_ptr(), sys::NFTNL_EXPR_CT_DIR as u16, *d) }
            }
            e
        }
        Expr::Other { .. } => return None,
    })
}

/// A rule object; frees itself (and the expressions added to it).
struct RuleGuard(NonNull<sys::nftnl_rule>);

impl Drop for RuleGuard {
    fn drop(&mut self) {
        // SAFETY: allocated by nftnl_rule_alloc; frees its expressions too.
        unsafe { sys::nftnl_rule_free(self.0.as_ptr()) }
    }
}

impl RuleGuard {
    fn alloc() -> Self {
        // SAFETY: plain allocation; NULL only when out of memory.
        Self(NonNull::new(unsafe { sys::nftnl_rule_alloc() }).expect("out of memory"))
    }

    fn str(&mut self, attr: u32, value: &str) {
        let value = c_string(value);
        // SAFETY: a live rule and a valid C string, which libnftnl copies.
        unsafe { sys::nftnl_rule_set_str(self.0.as_ptr(), attr as u16, value.as_ptr()) };
    }
}

/// Interior NULs cannot be sent; raylimit's names never have them, user text is cut there.
fn c_string(s: &str) -> CString {
    CString::new(s.split('\0').next().unwrap_or("")).unwrap_or_default()
}

/// Runs `fill` on a zeroed, 4-byte aligned buffer large enough for any nftables message and
/// returns the message it wrote (its `nlmsg_len` bytes).
fn build(fill: impl FnOnce(*mut c_char)) -> Vec<u8> {
    let mut words = vec![0u32; MAX_MESSAGE / 4];
    fill(words.as_mut_ptr() as *mut c_char);
    let bytes: &[u8] =
        // SAFETY: the u32 buffer viewed as bytes, same length in bytes.
        unsafe { std::slice::from_raw_parts(words.as_ptr() as *const u8, MAX_MESSAGE) };
    let len = u32::from_ne_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) as usize;
    assert!(
        (16..=MAX_MESSAGE).contains(&len),
        "libnftnl built a {len}-byte message"
    );
    bytes[..len].to_vec()
}

/// A message header (and nfgenmsg) followed by what `payload` adds to it.
fn message(
    msg: u16,
    family: u16,
    flags: u16,
    seq: u32,
    payload: impl FnOnce(*mut sys::libc::nlmsghdr),
) -> Vec<u8> {
    build(|buf| {
        // SAFETY: `buf` has room for a header; libnftnl sets NLM_F_REQUEST and the nfgenmsg.
        let header = unsafe { sys::nftnl_nlmsg_build_hdr(buf, msg, family, flags, seq) };
        payload(header);
    })
}

const INET: u16 = ProtoFamily::Inet as u16;

/// `NFNL_MSG_BATCH_BEGIN` or `_END` (res_id = the nftables subsystem), as nft sends them: no
/// acknowledgement asked.
pub(super) fn batch_delimiter(begin: bool, seq: u32) -> Vec<u8> {
    build(|buf| {
        // SAFETY: `buf` has room for the 20-byte message.
        unsafe {
            if begin {
                sys::nftnl_batch_begin(buf, seq);
            } else {
                sys::nftnl_batch_end(buf, seq);
            }
        }
    })
}

/// `NFT_MSG_NEWTABLE` with the name and flags 0: the nftnl crate's table, which asks for an ack.
pub(super) fn add_table(name: &str, seq: u32) -> Vec<u8> {
    let table = Table::new(c_string(name), ProtoFamily::Inet);
    // SAFETY: `buf` is sized for any nftables message.
    build(|buf| unsafe { table.write(buf as *mut c_void, seq, MsgType::Add) })
}

/// `NFT_MSG_DELTABLE` with only the name (the crate's table would add its flags).
pub(super) fn delete_table(name: &str, seq: u32) -> Vec<u8> {
    message(nft_type(NFT_MSG_DELTABLE), INET, NLM_F_ACK, seq, |header| {
        // SAFETY: a fresh table object, freed below; libnftnl copies the name.
        unsafe {
            let t = sys::nftnl_table_alloc();
            assert!(!t.is_null(), "out of memory");
            let name = c_string(name);
            sys::nftnl_table_set_str(t, sys::NFTNL_TABLE_NAME as u16, name.as_ptr());
            sys::nftnl_table_nlmsg_build_payload(header, t);
            sys::nftnl_table_free(t);
        }
    })
}

/// The hook of a base chain: where and when it runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct BaseChain {
    pub hook: Hook,
    pub priority: i32,
}

const NFTA_CHAIN_HOOK: u16 = 4;
const NFTA_CHAIN_POLICY: u16 = 5;
const NFTA_CHAIN_TYPE: u16 = 7;
const NFTA_HOOK_HOOKNUM: u16 = 1;
const NFTA_HOOK_PRIORITY: u16 = 2;
const NF_ACCEPT: u32 = 1;

/// `NFT_MSG_NEWCHAIN` (a filter base chain, policy accept) or `NFT_MSG_DELCHAIN`, from the nftnl
/// crate's chain (table and name; create and ack asked, as raylimit wants). For a base chain nft
/// writes the type, the policy and the hook nest itself, in that order after the name (libnftnl
/// would put the policy first and the hook before the type), so they are appended here the same
/// way.
pub(super) fn chain(table: &str, name: &str, base: Option<BaseChain>, seq: u32) -> Vec<u8> {
    let t = Table::new(c_string(table), ProtoFamily::Inet);
    let chain = Chain::new(c_string(name), &t);
    let kind = if base.is_some() {
        MsgType::Add
    } else {
        MsgType::Del
    };
    // SAFETY: `buf` is sized for any nftables message.
    let mut msg = build(|buf| unsafe { chain.write(buf as *mut c_void, seq, kind) });
    if let Some(base) = base {
        let mut w = AttrWriter::new();
        w.put_str(NFTA_CHAIN_TYPE, "filter")
            .put(NFTA_CHAIN_POLICY, &NF_ACCEPT.to_be_bytes())
            .nested(NFTA_CHAIN_HOOK, true, |w| {
                w.put(NFTA_HOOK_HOOKNUM, &(base.hook as u32).to_be_bytes())
                    .put(NFTA_HOOK_PRIORITY, &base.priority.to_be_bytes());
            });
        msg.extend_from_slice(w.bytes());
        let len = msg.len() as u32;
        msg[0..4].copy_from_slice(&len.to_ne_bytes());
    }
    msg
}

/// `NFT_MSG_NEWRULE` appended to `chain`, with `exprs` and `userdata`.
pub(super) fn add_rule(
    table: &str,
    chain: &str,
    exprs: &[Expr],
    userdata: &[u8],
    seq: u32,
) -> Vec<u8> {
    let mut rule = RuleGuard::alloc();
    rule.str(sys::NFTNL_RULE_TABLE, table);
    rule.str(sys::NFTNL_RULE_CHAIN, chain);
    for e in exprs.iter().filter_map(build_expr) {
        // SAFETY: the rule takes ownership of the expression.
        unsafe { sys::nftnl_rule_add_expr(rule.0.as_ptr(), e.into_raw()) }
    }
    if !userdata.is_empty() {
        // SAFETY: a live rule; libnftnl copies the bytes.
        unsafe {
            sys::nftnl_rule_set_data(
                rule.0.as_ptr(),
                sys::NFTNL_RULE_USERDATA as u16,
                userdata.as_ptr() as *const c_void,
                userdata.len() as u32,
            );
        }
    }
    message(
        nft_type(NFT_MSG_NEWRULE),
        INET,
        NLM_F_CREATE | NLM_F_APPEND | NLM_F_ACK,
        seq,
        // SAFETY: a live rule and a header in a buffer sized for any nftables message.
        |header| unsafe { sys::nftnl_rule_nlmsg_build_payload(header, rule.0.as_ptr()) },
    )
}

/// `NFT_MSG_DELRULE` by handle.
pub(super) fn delete_rule(table: &str, chain: &str, handle: u64, seq: u32) -> Vec<u8> {
    let mut rule = RuleGuard::alloc();
    rule.str(sys::NFTNL_RULE_TABLE, table);
    rule.str(sys::NFTNL_RULE_CHAIN, chain);
    // SAFETY: a live rule.
    unsafe { sys::nftnl_rule_set_u64(rule.0.as_ptr(), sys::NFTNL_RULE_HANDLE as u16, handle) };
    message(
        nft_type(NFT_MSG_DELRULE),
        INET,
        NLM_F_ACK,
        seq,
        // SAFETY: as in `add_rule`.
        |header| unsafe { sys::nftnl_rule_nlmsg_build_payload(header, rule.0.as_ptr()) },
    )
}

/// Dump requests for the inet family: every table, every chain, and the rules of `table`.
pub(super) fn dump_request(msg: u16, table: Option<&str>) -> Vec<u8> {
    let mut rule = RuleGuard::alloc();
    if let Some(t) = table {
        rule.str(sys::NFTNL_RULE_TABLE, t);
    }
    message(nft_type(msg), INET, NLM_F_DUMP, 0, |header| {
        if msg == NFT_MSG_GETRULE && table.is_some() {
            // SAFETY: as in `add_rule`; only the table attribute is set (the kernel filters).
            unsafe { sys::nftnl_rule_nlmsg_build_payload(header, rule.0.as_ptr()) }
        }
    })
}

/// `NFT_MSG_GETGEN` with an ack, so a plain request ends like a dump.
pub(super) fn getgen_request() -> Vec<u8> {
    message(
        nft_type(NFT_MSG_GETGEN),
        0,
        NLM_F_REQUEST | NLM_F_ACK,
        0,
        |_| {},
    )
}

/// A kernel message rebuilt around its payload in an aligned buffer whose `nlmsg_len` is exactly
/// the bytes present, so libnftnl's parsers cannot read past it.
struct Incoming(Vec<u32>);

impl Incoming {
    fn new(msg_type: u16, payload: &[u8]) -> Result<Self, DecodeError> {
        if payload.len() < 4 {
            return Err(DecodeError::new("nftables message shorter than nfgenmsg"));
        }
        let len = 16 + payload.len();
        if len > u32::MAX as usize {
            return Err(DecodeError::new("nftables message too long"));
        }
        let mut words = vec![0u32; len.div_ceil(4)];
        // SAFETY: `words` holds at least `len` bytes.
        let bytes = unsafe { std::slice::from_raw_parts_mut(words.as_mut_ptr() as *mut u8, len) };
        bytes[0..4].copy_from_slice(&(len as u32).to_ne_bytes());
        bytes[4..6].copy_from_slice(&msg_type.to_ne_bytes());
        bytes[16..].copy_from_slice(payload);
        Ok(Self(words))
    }

    fn header(&self) -> *const sys::libc::nlmsghdr {
        self.0.as_ptr() as *const sys::libc::nlmsghdr
    }
}

/// Copies a C string libnftnl owns; `None` for NULL or text that is not UTF-8.
///
/// SAFETY: `ptr` is NULL or a NUL-terminated string alive for the call.
unsafe fn owned_str(ptr: *const c_char) -> Option<String> {
    if ptr.is_null() {
        return None;
    }
    // SAFETY: per the contract above.
    unsafe { CStr::from_ptr(ptr) }
        .to_str()
        .ok()
        .map(String::from)
}

/// A rule from the kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct ParsedRule {
    pub table: String,
    pub chain: String,
    pub handle: u64,
    pub exprs: Vec<Expr>,
    pub userdata: Vec<u8>,
}

/// Parses an `NFT_MSG_NEWRULE` payload (after the netlink header) with
/// `nftnl_rule_nlmsg_parse`.
pub(super) fn parse_rule(payload: &[u8]) -> Result<ParsedRule, DecodeError> {
    let msg = Incoming::new(nft_type(NFT_MSG_NEWRULE), payload)?;
    let rule = RuleGuard::alloc();
    let r = rule.0.as_ptr();
    // SAFETY: a live rule and a message whose length is exactly its buffer.
    if unsafe { sys::nftnl_rule_nlmsg_parse(msg.header(), r) } < 0 {
        return Err(DecodeError::new("libnftnl cannot parse the rule"));
    }
    let is_set = |attr: u32| unsafe { sys::nftnl_rule_is_set(r, attr as u16) };
    // SAFETY (all reads below): attributes of a live rule, copied before it is freed.
    let table = unsafe { owned_str(sys::nftnl_rule_get_str(r, sys::NFTNL_RULE_TABLE as u16)) };
    let chain = unsafe { owned_str(sys::nftnl_rule_get_str(r, sys::NFTNL_RULE_CHAIN as u16)) };
    let handle = is_set(sys::NFTNL_RULE_HANDLE)
        .then(|| unsafe { sys::nftnl_rule_get_u64(r, sys::NFTNL_RULE_HANDLE as u16) });
    let mut userdata = Vec::new();
    if is_set(sys::NFTNL_RULE_USERDATA) {
        let mut len = 0u32;
        let data =
            unsafe { sys::nftnl_rule_get_data(r, sys::NFTNL_RULE_USERDATA as u16, &mut len) };
        if !data.is_null() {
            userdata =
                unsafe { std::slice::from_raw_parts(data as *const u8, len as usize) }.to_vec();
        }
    }
    let mut exprs = Vec::new();
    // SAFETY: an iterator over the live rule's expressions, destroyed before the rule.
    unsafe {
        let iter = sys::nftnl_expr_iter_create(r);
        if iter.is_null() {
            return Err(DecodeError::new("out of memory"));
        }
        loop {
            let e = sys::nftnl_expr_iter_next(iter);
            if e.is_null() {
                break;
            }
            exprs.push(read_expr(e));
        }
        sys::nftnl_expr_iter_destroy(iter);
    }
    Ok(ParsedRule {
        table: table.ok_or_else(|| DecodeError::new("rule without a table"))?,
        chain: chain.ok_or_else(|| DecodeError::new("rule without a chain"))?,
        handle: handle.ok_or_else(|| DecodeError::new("rule without a handle"))?,
        exprs,
        userdata,
    })
}

/// Reads one expression's attributes.
///
/// SAFETY: `e` is an expression of a live rule.
unsafe fn read_expr(e: *mut sys::nftnl_expr) -> Expr {
    let set = |attr: u32| unsafe { sys::nftnl_expr_is_set(e, attr as u16) };
    let u32_of = |attr: u32| set(attr).then(|| unsafe { sys::nftnl_expr_get_u32(e, attr as u16) });
    let data_of = |attr: u32| -> Option<Vec<u8>> {
        if !set(attr) {
            return None;
        }
        let mut len = 0u32;
        let p = unsafe { sys::nftnl_expr_get(e, attr as u16, &mut len) };
        (!p.is_null())
            .then(|| unsafe { std::slice::from_raw_parts(p as *const u8, len as usize) }.to_vec())
    };
    let name = unsafe { owned_str(sys::nftnl_expr_get_str(e, sys::NFTNL_EXPR_NAME as u16)) }
        .unwrap_or_default();
    let other = |name: &str| Expr::Other {
        name: name.to_string(),
    };
    match name.as_str() {
        "meta" => match u32_of(sys::NFTNL_EXPR_META_KEY) {
            Some(key) => Expr::Meta {
                key,
                dreg: u32_of(sys::NFTNL_EXPR_META_DREG),
                sreg: u32_of(sys::NFTNL_EXPR_META_SREG),
            },
            None => other(&name),
        },
        "cmp" => match (
            u32_of(sys::NFTNL_EXPR_CMP_SREG),
            u32_of(sys::NFTNL_EXPR_CMP_OP),
            data_of(sys::NFTNL_EXPR_CMP_DATA),
        ) {
            (Some(sreg), Some(op), Some(data)) => Expr::Cmp { sreg, op, data },
            _ => other(&name),
        },
        "bitwise" => match (
            u32_of(sys::NFTNL_EXPR_BITWISE_SREG),
            u32_of(sys::NFTNL_EXPR_BITWISE_DREG),
            u32_of(sys::NFTNL_EXPR_BITWISE_LEN),
            data_of(sys::NFTNL_EXPR_BITWISE_MASK),
            data_of(sys::NFTNL_EXPR_BITWISE_XOR),
        ) {
            (Some(sreg), Some(dreg), Some(len), Some(mask), Some(xor))
                if !set(sys::NFTNL_EXPR_BITWISE_DATA) =>
            {
                Expr::Bitwise {
                    sreg,
                    dreg,
                    op: u32_of(sys::NFTNL_EXPR_BITWISE_OP),
                    len,
                    mask,
                    xor,
                }
            }
            _ => other("bitwise (shift)"),
        },
        "counter" => Expr::Counter {
            packets: unsafe { sys::nftnl_expr_get_u64(e, sys::NFTNL_EXPR_CTR_PACKETS as u16) },
            bytes: unsafe { sys::nftnl_expr_get_u64(e, sys::NFTNL_EXPR_CTR_BYTES as u16) },
        },
        "immediate" => match (
            u32_of(sys::NFTNL_EXPR_IMM_DREG),
            data_of(sys::NFTNL_EXPR_IMM_DATA),
        ) {
            (Some(dreg), Some(data)) if !set(sys::NFTNL_EXPR_IMM_VERDICT) => {
                Expr::Immediate { dreg, data }
            }
            _ => other("immediate (verdict)"),
        },
        "ct" => match u32_of(sys::NFTNL_EXPR_CT_KEY) {
            Some(key) => Expr::Ct {
                key,
                dreg: u32_of(sys::NFTNL_EXPR_CT_DREG),
                sreg: u32_of(sys::NFTNL_EXPR_CT_SREG),
                dir: set(sys::NFTNL_EXPR_CT_DIR)
                    .then(|| unsafe { sys::nftnl_expr_get_u8(e, sys::NFTNL_EXPR_CT_DIR as u16) }),
            },
            None => other(&name),
        },
        _ => other(&name),
    }
}

/// A chain from the kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct ParsedChain {
    pub table: String,
    pub name: String,
    pub kind: Option<String>,
    pub hook: Option<u32>,
    pub priority: Option<i32>,
    pub policy: Option<u32>,
}

/// Parses an `NFT_MSG_NEWCHAIN` payload with `nftnl_chain_nlmsg_parse`.
pub(super) fn parse_chain(payload: &[u8]) -> Result<ParsedChain, DecodeError> {
    let msg = Incoming::new(nft_type(NFT_MSG_NEWCHAIN), payload)?;
    // SAFETY: a fresh chain object, read and freed here; strings are copied before the free.
    unsafe {
        let c = sys::nftnl_chain_alloc();
        if c.is_null() {
            return Err(DecodeError::new("out of memory"));
        }
        let parsed = if sys::nftnl_chain_nlmsg_parse(msg.header(), c) < 0 {
            Err(DecodeError::new("libnftnl cannot parse the chain"))
        } else {
            let set = |attr: u32| sys::nftnl_chain_is_set(c, attr as u16);
            let text = |attr: u32| owned_str(sys::nftnl_chain_get_str(c, attr as u16));
            Ok(ParsedChain {
                table: text(sys::NFTNL_CHAIN_TABLE).unwrap_or_default(),
                name: text(sys::NFTNL_CHAIN_NAME).unwrap_or_default(),
                kind: text(sys::NFTNL_CHAIN_TYPE),
                hook: set(sys::NFTNL_CHAIN_HOOKNUM)
                    .then(|| sys::nftnl_chain_get_u32(c, sys::NFTNL_CHAIN_HOOKNUM as u16)),
                priority: set(sys::NFTNL_CHAIN_PRIO)
                    .then(|| sys::nftnl_chain_get_s32(c, sys::NFTNL_CHAIN_PRIO as u16)),
                policy: set(sys::NFTNL_CHAIN_POLICY)
                    .then(|| sys::nftnl_chain_get_u32(c, sys::NFTNL_CHAIN_POLICY as u16)),
            })
        };
        sys::nftnl_chain_free(c);
        parsed
    }
}

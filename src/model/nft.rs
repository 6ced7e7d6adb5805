//! raylimit's nftables table as values: its rules, their owner tags, the table as observed and
//! the changes to it. Pure and always built; sending and reading them is `nft` (the `nftables`
//! feature).

/// raylimit's table, family inet, owned entirely by raylimit.
pub const TABLE: &str = "raylimit";
/// Filter chain on postrouting, priority mangle (-150), policy accept: mark -> HTB class.
pub const CHAIN_CLASSIFY: &str = "classify";
/// Filter chain on output, priority mangle (-150), policy accept: skb mark -> conntrack mark.
pub const CHAIN_SAVE: &str = "save_mark";
/// `NF_IP_PRI_MANGLE`, nft's `priority mangle`.
pub const PRIORITY_MANGLE: i32 = -150;
/// The userdata TLV type that carries a [`Tag`]. nft's own rule TLVs are 0 (comment) and 1
/// (ebtables policy); nft skips types it does not know, so `nft list` still works.
pub const USERDATA_TAG_TYPE: u8 = 0xf0;
/// `NFT_USERDATA_MAXLEN`: the kernel refuses longer rule userdata.
pub const USERDATA_MAX: usize = 256;

/// The hook of raylimit's base chain `name`, in nft's words.
pub fn chain_hook(name: &str) -> Option<&'static str> {
    match name {
        CHAIN_CLASSIFY => Some("postrouting"),
        CHAIN_SAVE => Some("output"),
        _ => None,
    }
}

/// One rule in raylimit's table.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum NftRule {
    /// Packets leaving device `oif` whose skb mark & mask == value get skb->priority = `priority`
    /// (a tc class id MAJ:MIN as u32; HTB then puts them in that class). With a counter.
    MarkToPriority {
        oif: u32,
        mask: u32,
        value: u32,
        priority: u32,
    },
    /// Locally generated packets leaving device `oif` whose skb mark & mask == value: conntrack
    /// mark bits under `mask` set to `value`, the other ct mark bits kept: ct mark = (ct mark &
    /// !mask) | value. With a counter. Per device, like the limit it serves, so removing one
    /// device's limit never stops another device's.
    SaveMark { oif: u32, mask: u32, value: u32 },
}

impl NftRule {
    /// The chain the rule lives in.
    pub fn chain(&self) -> &'static str {
        match self {
            NftRule::MarkToPriority { .. } => CHAIN_CLASSIFY,
            NftRule::SaveMark { .. } => CHAIN_SAVE,
        }
    }

    /// nft's notation, e.g. `oif 7 meta mark & 0x00ff0000 == 0x00010000 counter meta priority
    /// set 524c:0100`.
    pub fn describe(&self) -> String {
        match *self {
            NftRule::MarkToPriority {
                oif,
                mask,
                value,
                priority,
            } => format!(
                "oif {oif} meta mark & {mask:#010x} == {value:#010x} counter meta priority set \
                 {:04x}:{:04x}",
                priority >> 16,
                priority & 0xffff
            ),
            NftRule::SaveMark { oif, mask, value } => format!(
                "oif {oif} meta mark & {mask:#010x} == {value:#010x} counter ct mark set ct mark & \
                 {:#010x} | {value:#010x}",
                !mask
            ),
        }
    }
}

/// Who a rule belongs to, carried in the rule's userdata (never a comment string): a TLV of type
/// [`USERDATA_TAG_TYPE`] holding JSON `{"owner":..,"subject":..}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tag {
    pub owner: String,
    pub subject: String,
}

impl Tag {
    /// The rule userdata for this tag: one TLV (type, length, JSON). Refused when it would not
    /// fit the kernel's [`USERDATA_MAX`] (a TLV value holds at most 255 bytes besides).
    pub fn userdata(&self) -> Result<Vec<u8>, String> {
        let json = serde_json::json!({"owner": self.owner, "subject": self.subject}).to_string();
        let max = (USERDATA_MAX - 2).min(u8::MAX as usize);
        if json.len() > max {
            return Err(format!(
                "the tag of owner {:?} and subject {:?} is {} bytes of JSON; nftables rule \
                 userdata holds at most {max}",
                self.owner,
                self.subject,
                json.len()
            ));
        }
        let mut out = vec![USERDATA_TAG_TYPE, json.len() as u8];
        out.extend_from_slice(json.as_bytes());
        Ok(out)
    }

    /// The tag in rule userdata, if it holds one: other TLVs (nft's comment) are skipped;
    /// malformed bytes are no tag.
    pub fn from_userdata(mut bytes: &[u8]) -> Option<Tag> {
        while let [kind, len, rest @ ..] = bytes {
            let len = *len as usize;
            let value = rest.get(..len)?;
            if *kind == USERDATA_TAG_TYPE {
                let v: serde_json::Value = serde_json::from_slice(value).ok()?;
                return Some(Tag {
                    owner: v.get("owner")?.as_str()?.to_string(),
                    subject: v.get("subject")?.as_str()?.to_string(),
                });
            }
            bytes = &rest[len..];
        }
        None
    }
}

/// A rule of raylimit's shapes found in the kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManagedRule {
    pub chain: String,
    pub handle: u64,
    pub rule: NftRule,
    /// `None` when the rule has raylimit's shape but no readable tag (written by hand, say).
    pub tag: Option<Tag>,
    pub packets: u64,
    pub bytes: u64,
}

/// raylimit's table as the kernel has it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NftState {
    pub table: bool,
    pub chains: Vec<String>,
    pub rules: Vec<ManagedRule>,
    /// Rules in raylimit's table it cannot decode (someone else's), and chains that are not
    /// raylimit's definition: described, never touched silently.
    pub foreign: Vec<String>,
}

/// One change to raylimit's table; a batch of them is applied atomically.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NftOp {
    AddTable,
    /// [`CHAIN_CLASSIFY`] or [`CHAIN_SAVE`], with their hook and priority.
    AddChain(&'static str),
    AddRule {
        rule: NftRule,
        tag: Tag,
    },
    DeleteRule {
        chain: String,
        handle: u64,
    },
    DeleteChain(String),
    DeleteTable,
}

impl NftOp {
    /// nft's command for the operation, e.g. `nft add rule inet raylimit classify ...`.
    pub fn describe(&self) -> String {
        match self {
            NftOp::AddTable => format!("nft add table inet {TABLE}"),
            NftOp::AddChain(name) => match chain_hook(name) {
                Some(hook) => format!(
                    "nft add chain inet {TABLE} {name} {{ type filter hook {hook} priority mangle; \
                     policy accept; }}"
                ),
                None => format!("nft add chain inet {TABLE} {name} (not a raylimit chain)"),
            },
            NftOp::AddRule { rule, tag } => format!(
                "nft add rule inet {TABLE} {} {} # owner {:?} subject {:?}",
                rule.chain(),
                rule.describe(),
                tag.owner,
                tag.subject
            ),
            NftOp::DeleteRule { chain, handle } => {
                format!("nft delete rule inet {TABLE} {chain} handle {handle}")
            }
            NftOp::DeleteChain(name) => format!("nft delete chain inet {TABLE} {name}"),
            NftOp::DeleteTable => format!("nft delete table inet {TABLE}"),
        }
    }
}

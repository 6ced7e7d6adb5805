#!/usr/bin/env bash
# Capture the netlink requests iproute2 sends for the tc/ip commands raylimit
# re-implements, plus the kernel's answer and (on success) the kernel's dump
# reply, the sock_diag dump requests of ss, and the nfnetlink batches nft sends
# for raylimit's nftables table (with the kernel's answer to nft's listing), into
# netlink-fixtures/<name>.fixture.  See README.md for the format.
#
# Usage (as root, from any directory):  bash netlink-fixtures/capture.sh [all|nft]
#   all (default): every fixture;  nft: only the nft_* fixtures (the others stay as they are).
#
# Everything happens inside a private, throw-away network namespace that is
# removed on exit.  IPv6 is disabled in it and no addresses are configured, so
# no packet is ever sent (this also keeps qdisc/class counters at zero).
set -euo pipefail

OUT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

if [[ $(id -u) -ne 0 ]]; then
    echo "capture.sh: must run as root" >&2
    exit 1
fi
MODE="${1:-all}"
case $MODE in all|nft) ;; *) echo "capture.sh: unknown mode $MODE (all|nft)" >&2; exit 2 ;; esac
for tool in ip tc strace python3 nft; do
    command -v "$tool" >/dev/null || { echo "capture.sh: $tool not found" >&2; exit 1; }
done

NS="rlfx-$$"
WORK="$(mktemp -d /tmp/rlfx-XXXXXX)"
NEW_DIR="$WORK/fixtures"
mkdir -p "$NEW_DIR"

cleanup() {
    ip netns del "$NS" 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM HUP

nsx() { ip netns exec "$NS" "$@"; }

# --------------------------------------------------------------------------
# strace log parser (python3).  Modes:
#   request LOG KIND   -> prints "result: ..." / "request: ..." / "note: ..." lines
#   dump LOG           -> prints "dump: ..." lines
# --------------------------------------------------------------------------
PARSER="$WORK/parse.py"
cat >"$PARSER" <<'PYEOF'
import errno
import re
import struct
import sys

SYSCALL_RE = re.compile(r'^(\d+)\s+(sendmsg|sendto|recvmsg|recvfrom)\((\d+),')
HEX_RE = re.compile(r'^ \| ([0-9a-f]+)  ')

TC_REQ = {36, 37, 40, 41, 44, 45}      # NEW/DEL QDISC, TCLASS, TFILTER
LINK_REQ = {16, 17, 19}                # NEWLINK, DELLINK, SETLINK
DUMP_REQ = {38, 42, 46}                # GETQDISC, GETTCLASS, GETTFILTER
DUMP_REPLY = {36, 40, 44, 3, 2}        # NEW{QDISC,TCLASS,TFILTER}, DONE, ERROR
NLMSG_ERROR, NLMSG_DONE = 2, 3
SOCK_DIAG_BY_FAMILY = 20               # inet_diag_req_v2 dump (NETLINK_SOCK_DIAG)
NLM_F_DUMP = 0x300
NLM_F_CAPPED, NLM_F_ACK_TLVS = 0x100, 0x200
NLMSGERR_ATTR_MSG = 1


def die(msg):
    print("parse.py: " + msg, file=sys.stderr)
    sys.exit(2)


def events(path):
    """Yield dicts {fd, dir, peek, data} for every traced syscall, in order."""
    evs = []
    cur = None
    with open(path, encoding="latin-1") as f:
        for line in f:
            line = line.rstrip("\n")
            m = SYSCALL_RE.match(line)
            if m:
                name = m.group(2)
                cur = {
                    "fd": int(m.group(3)),
                    "dir": "send" if name.startswith("send") else "recv",
                    "peek": "MSG_PEEK" in line,
                    "data": bytearray(),
                }
                evs.append(cur)
                continue
            if "resumed>" in line or "unfinished" in line:
                die("interleaved syscalls in strace log, cannot attribute data: " + line)
            h = HEX_RE.match(line)
            if h and cur is not None:
                chunk = line[h.end():h.end() + 48]
                cur["data"] += bytes.fromhex("".join(chunk.split()))
    return evs


def split_nlmsgs(data):
    msgs = []
    off = 0
    while off + 16 <= len(data):
        (length,) = struct.unpack_from("<I", data, off)
        if length < 16 or off + length > len(data):
            die("bad nlmsg_len %d at offset %d (buffer %d bytes)" % (length, off, len(data)))
        msgs.append(bytes(data[off:off + length]))
        off += (length + 3) & ~3
    return msgs


def hdr(msg):
    length, typ, flags, seq, pid = struct.unpack_from("<IHHII", msg, 0)
    return typ, flags, seq


def messages(evs, direction):
    out = []
    for ev in evs:
        if ev["dir"] != direction or ev["peek"] or not ev["data"]:
            continue
        for msg in split_nlmsgs(ev["data"]):
            out.append((ev["fd"], msg))
    return out


def is_newlink_probe(msg):
    # iproute2's iplink_have_newlink(): bare RTM_NEWLINK, seq 0, ifindex 0, no attrs.
    typ, flags, seq = hdr(msg)
    return typ == 16 and seq == 0 and len(msg) == 32 and msg[20:24] == b"\0\0\0\0"


def parse_error(msg):
    """Return (errno_value, extack_text or None) from an NLMSG_ERROR message."""
    length = len(msg)
    typ, flags, seq = hdr(msg)
    (err,) = struct.unpack_from("<i", msg, 16)
    off = 20
    if flags & NLM_F_CAPPED:
        off += 16
    else:
        (inner_len,) = struct.unpack_from("<I", msg, 20)
        off += (inner_len + 3) & ~3
    text = None
    if flags & NLM_F_ACK_TLVS:
        while off + 4 <= length:
            alen, atype = struct.unpack_from("<HH", msg, off)
            if alen < 4:
                break
            if (atype & 0x3FFF) == NLMSGERR_ATTR_MSG:
                text = msg[off + 4:off + alen].split(b"\0", 1)[0].decode("utf-8", "replace")
            off += (alen + 3) & ~3
    return -err, text


def errname(code):
    return errno.errorcode.get(code, "E%d" % code)


def do_request(path, kind):
    wanted = TC_REQ if kind == "tc" else LINK_REQ
    evs = events(path)
    reqs = [(fd, m) for fd, m in messages(evs, "send")
            if hdr(m)[0] in wanted and not is_newlink_probe(m)]
    if len(reqs) != 1:
        die("expected exactly 1 %s request message, found %d" % (kind, len(reqs)))
    fd, req = reqs[0]
    seq = hdr(req)[2]
    answers = [m for f, m in messages(evs, "recv")
               if f == fd and hdr(m)[0] == NLMSG_ERROR and hdr(m)[2] == seq]
    if len(answers) != 1:
        die("expected exactly 1 NLMSG_ERROR answer for seq %d, found %d" % (seq, len(answers)))
    code, text = parse_error(answers[0])
    if code == 0:
        print("result: 0")
    else:
        print("result: " + errname(code) + (" " + text if text else ""))
    print("request: " + req.hex())
    if code == 0 and text:
        print("note: kernel extack warning on success: " + text)


def do_dump(path):
    evs = events(path)
    dumps = [(fd, hdr(m)[2]) for fd, m in messages(evs, "send")
             if hdr(m)[0] in DUMP_REQ and (hdr(m)[1] & NLM_F_DUMP) == NLM_F_DUMP]
    if len(dumps) != 1:
        die("expected exactly 1 tc dump request, found %d" % len(dumps))
    fd, seq = dumps[0]
    replies = [m for f, m in messages(evs, "recv")
               if f == fd and hdr(m)[2] == seq and hdr(m)[0] in DUMP_REPLY]
    if not replies or hdr(replies[-1])[0] != NLMSG_DONE:
        die("dump reply does not end with NLMSG_DONE")
    for m in replies:
        if hdr(m)[0] == NLMSG_ERROR:
            die("dump answered with NLMSG_ERROR")
        print("dump: " + m.hex())


def do_sockdiag(path, family):
    """The one SOCK_DIAG_BY_FAMILY dump request for `family`, sequence number and port id zeroed,
    and how the kernel answered it (ss sends one request per family on one fd, same seq)."""
    evs = [ev for ev in events(path) if not ev["peek"] and ev["data"]]
    found = [(i, ev["fd"], m) for i, ev in enumerate(evs) if ev["dir"] == "send"
             for m in split_nlmsgs(ev["data"])
             if hdr(m)[0] == SOCK_DIAG_BY_FAMILY and m[16] == family]
    if len(found) != 1:
        die("expected exactly 1 sock_diag request for family %d, found %d" % (family, len(found)))
    i, fd, req = found[0]
    replies = []
    for ev in evs[i + 1:]:
        if ev["fd"] != fd:
            continue
        if ev["dir"] == "send":
            break
        replies += [m for m in split_nlmsgs(ev["data"]) if hdr(m)[2] == hdr(req)[2]]
    if not replies or hdr(replies[-1])[0] not in (NLMSG_DONE, NLMSG_ERROR):
        die("sock_diag dump reply does not end with NLMSG_DONE")
    if hdr(replies[-1])[0] == NLMSG_ERROR:
        code, text = parse_error(replies[-1])
        print("result: " + errname(code) + (" " + text if text else ""))
    else:
        print("result: 0")
    print("request: " + (req[:8] + bytes(8) + req[16:]).hex())


NFNL_MSG_BATCH_BEGIN, NFNL_MSG_BATCH_END = 16, 17
NFT_SUBSYS = 10 << 8


def do_nftbatch(path):
    """The one nfnetlink batch nft sent: its single nftables message as `request`, every message of
    the batch (BEGIN .. END) as `batch` lines, and the kernel's answer to the request (nft asks for
    no acknowledgement: no NLMSG_ERROR for its sequence number means success)."""
    evs = [ev for ev in events(path) if not ev["peek"] and ev["data"]]
    found = [(i, ev["fd"], split_nlmsgs(ev["data"])) for i, ev in enumerate(evs)
             if ev["dir"] == "send" and hdr(split_nlmsgs(ev["data"])[0])[0] == NFNL_MSG_BATCH_BEGIN]
    if len(found) != 1:
        die("expected exactly 1 nfnetlink batch, found %d" % len(found))
    i, fd, msgs = found[0]
    if hdr(msgs[-1])[0] != NFNL_MSG_BATCH_END:
        die("the batch does not end with NFNL_MSG_BATCH_END")
    inner = [m for m in msgs[1:-1] if hdr(m)[0] & 0xff00 == NFT_SUBSYS]
    if len(inner) != 1 or len(msgs) != 3:
        die("expected exactly 1 nftables message in the batch, found %d" % len(msgs[1:-1]))
    req = inner[0]
    seq = hdr(req)[2]
    code, text = 0, None
    for ev in evs[i + 1:]:
        if ev["fd"] != fd or ev["dir"] != "recv":
            continue
        for m in split_nlmsgs(ev["data"]):
            if hdr(m)[0] == NLMSG_ERROR and hdr(m)[2] == seq:
                code, text = parse_error(m)
    if code == 0:
        print("result: 0")
    else:
        print("result: " + errname(code) + (" " + text if text else ""))
    print("request: " + req.hex())
    for m in msgs:
        print("batch: " + m.hex())


def do_nftdump(path, get_type):
    """The kernel's answer to nft's one request of nftables type `get_type` (GETTABLE, GETCHAIN,
    GETRULE; a dump or, for the table, a plain get): its object messages, then the terminator.
    nft numbers all its cache requests alike, so the answer is what the socket received between
    this request and nft's next send on it."""
    get_type = NFT_SUBSYS | int(get_type)
    new_type = get_type - 1
    evs = [ev for ev in events(path) if not ev["peek"] and ev["data"]]
    found = [(i, ev["fd"]) for i, ev in enumerate(evs) if ev["dir"] == "send"
             for m in split_nlmsgs(ev["data"]) if hdr(m)[0] == get_type]
    if len(found) != 1:
        die("expected exactly 1 request of type %#x, found %d" % (get_type, len(found)))
    i, fd = found[0]
    replies = []
    for ev in evs[i + 1:]:
        if ev["fd"] != fd:
            continue
        if ev["dir"] == "send":
            break
        replies += [m for m in split_nlmsgs(ev["data"])
                    if hdr(m)[0] in (new_type, NLMSG_DONE, NLMSG_ERROR)]
    if not replies or hdr(replies[-1])[0] not in (NLMSG_DONE, NLMSG_ERROR):
        die("the reply to %#x does not end with NLMSG_DONE or an acknowledgement" % get_type)
    if hdr(replies[-1])[0] == NLMSG_ERROR and parse_error(replies[-1])[0] != 0:
        die("the request %#x was refused" % get_type)
    for m in replies:
        print("dump: " + m.hex())


if __name__ == "__main__":
    if sys.argv[1] == "nftbatch":
        do_nftbatch(sys.argv[2])
        sys.exit(0)
    if sys.argv[1] == "nftdump":
        do_nftdump(sys.argv[2], sys.argv[3])
        sys.exit(0)
    if sys.argv[1] == "request":
        do_request(sys.argv[2], sys.argv[3])
    elif sys.argv[1] == "dump":
        do_dump(sys.argv[2])
    elif sys.argv[1] == "sockdiag":
        do_sockdiag(sys.argv[2], int(sys.argv[3]))
    else:
        die("unknown mode " + sys.argv[1])
PYEOF

STRACE=(strace -f -s 1000000 -xx
        -e trace=sendmsg,sendto,recvmsg,recvfrom
        -e write=all -e read=all)

# --------------------------------------------------------------------------
# Namespace setup
# --------------------------------------------------------------------------
ip netns add "$NS"
nsx sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1
ip -n "$NS" link add veth0 type veth peer name veth1
ip -n "$NS" link add ifb0 type ifb
for dev in lo veth0 veth1 ifb0; do
    ip -n "$NS" link set dev "$dev" up
done

ifindex_of() { nsx cat "/sys/class/net/$1/ifindex"; }

# --------------------------------------------------------------------------
# Helpers for prerequisites (never captured)
# --------------------------------------------------------------------------
q() { nsx "$@" >/dev/null; }   # run a prerequisite; failures abort the script

reset_tc() {
    local dev
    for dev in veth0 veth1; do
        nsx tc qdisc del dev "$dev" root    >/dev/null 2>&1 || true
        nsx tc qdisc del dev "$dev" ingress >/dev/null 2>&1 || true
        nsx tc qdisc del dev "$dev" clsact  >/dev/null 2>&1 || true
    done
    nsx ip link del dev rlifb9 >/dev/null 2>&1 || true
}
pre_htb()      { q tc qdisc add dev veth0 root handle 1: htb; }
pre_class1()   { q tc class add dev veth0 parent 1: classid 1:1 htb rate 1mbit; }
pre_class10()  { q tc class add dev veth0 parent 1: classid 1:10 htb rate 1mbit; }
pre_filter()   { pre_htb; pre_class10; }
pre_ingress0() { q tc qdisc add dev veth0 ingress; }
pre_clsact1()  { q tc qdisc add dev veth1 clsact; }
pre_hashtab()  { q tc filter add dev veth0 parent 1: protocol ip prio 20 handle 2: u32 divisor 256; }
pre_ifb9()     { q ip link add rlifb9 type ifb; }

# --------------------------------------------------------------------------
# capture NAME KIND(tc|link) "COMMAND" "DUMP COMMAND or empty" [note...]
# Prerequisites must already be in place.
# --------------------------------------------------------------------------
COUNT=0
capture() {
    local name="$1" kind="$2" cmd="$3" dump="$4"
    shift 4
    local file="$NEW_DIR/$name.fixture" log="$WORK/$name.req.log" dlog="$WORK/$name.dump.log"
    local -a argv dargv
    read -r -a argv <<<"$cmd"

    local ifline
    ifline="ifindex: veth0=$(ifindex_of veth0) veth1=$(ifindex_of veth1) ifb0=$(ifindex_of ifb0)"
    # for link fixtures rlifb9 may exist only before (del) or after (add) the command
    local ifb9_before=""
    if [[ $kind == link ]] && nsx test -e /sys/class/net/rlifb9; then
        ifb9_before="$(ifindex_of rlifb9)"
    fi

    local rc=0
    nsx "${STRACE[@]}" -o "$log" "${argv[@]}" >"$WORK/$name.out" 2>"$WORK/$name.err" || rc=$?

    local parsed
    if ! parsed="$(python3 "$PARSER" request "$log" "$kind")"; then
        echo "capture.sh: $name: no usable request captured (exit $rc):" >&2
        cat "$WORK/$name.err" >&2
        exit 1
    fi
    local result
    result="$(grep '^result: ' <<<"$parsed")"

    if [[ $kind == link ]]; then
        local ifb9="$ifb9_before"
        if [[ -z $ifb9 ]] && nsx test -e /sys/class/net/rlifb9; then
            ifb9="$(ifindex_of rlifb9)"
        fi
        [[ -n $ifb9 ]] && ifline+=" rlifb9=$ifb9"
    fi

    {
        echo "command: $cmd"
        echo "$result"
        echo "$ifline"
        grep '^request: ' <<<"$parsed"
        if [[ $result == "result: 0" && -n $dump ]]; then
            read -r -a dargv <<<"$dump"
            nsx "${STRACE[@]}" -o "$dlog" "${dargv[@]}" >"$WORK/$name.dump.out" 2>&1 || {
                echo "capture.sh: $name: dump command failed" >&2
                cat "$WORK/$name.dump.out" >&2
                exit 1
            }
            echo "dump_command: $dump"
            python3 "$PARSER" dump "$dlog"
        fi
        grep '^note: ' <<<"$parsed" || true
        local n
        for n in "$@"; do
            echo "note: $n"
        done
    } >"$file"
    COUNT=$((COUNT + 1))
    printf '%-28s %s\n' "$name" "${result#result: }"
}

# --------------------------------------------------------------------------
# capture_sockdiag NAME FAMILY(2|10) "COMMAND": the sock_diag dump request of one address family
# (ss sends one per family). Sequence number and port id are zeroed: ss always sends seq 123456.
# --------------------------------------------------------------------------
capture_sockdiag() {
    local name="$1" family="$2" cmd="$3"
    local file="$NEW_DIR/$name.fixture" log="$WORK/$name.req.log"
    local -a argv
    read -r -a argv <<<"$cmd"
    nsx "${STRACE[@]}" -o "$log" "${argv[@]}" >"$WORK/$name.out" 2>"$WORK/$name.err" || {
        echo "capture.sh: $name: command failed" >&2
        cat "$WORK/$name.err" >&2
        exit 1
    }
    local parsed
    if ! parsed="$(python3 "$PARSER" sockdiag "$log" "$family")"; then
        echo "capture.sh: $name: no usable sock_diag request captured" >&2
        exit 1
    fi
    {
        echo "command: $cmd"
        echo "$parsed"
        echo "note: the request for address family $family; sequence number and port id zeroed"
    } >"$file"
    COUNT=$((COUNT + 1))
    printf '%-28s %s\n' "$name" "$(grep '^result: ' <<<"$parsed" | cut -d' ' -f2-)"
}

# --------------------------------------------------------------------------
# capture_nft NAME "NFT COMMAND" "LIST COMMAND or empty" GET_TYPE [note...]: the one nfnetlink batch
# nft sends, the kernel's answer to it, and the kernel's answer to the listing's request of
# nftables type GET_TYPE (1 GETTABLE, 4 GETCHAIN, 7 GETRULE). Prerequisites already in place.
# --------------------------------------------------------------------------
capture_nft() {
    local name="$1" cmd="$2" dump="$3" get_type="$4"
    shift 4
    local file="$NEW_DIR/$name.fixture" log="$WORK/$name.req.log" dlog="$WORK/$name.dump.log"
    local -a argv dargv
    read -r -a argv <<<"$cmd"
    local ifline
    ifline="ifindex: veth0=$(ifindex_of veth0) veth1=$(ifindex_of veth1) ifb0=$(ifindex_of ifb0)"
    local rc=0
    nsx "${STRACE[@]}" -o "$log" "${argv[@]}" >"$WORK/$name.out" 2>"$WORK/$name.err" || rc=$?
    local parsed
    if ! parsed="$(python3 "$PARSER" nftbatch "$log")"; then
        echo "capture.sh: $name: no usable batch captured (exit $rc):" >&2
        cat "$WORK/$name.err" >&2
        exit 1
    fi
    local result
    result="$(grep '^result: ' <<<"$parsed")"
    {
        echo "command: $cmd"
        echo "$result"
        echo "$ifline"
        grep -E '^(request|batch): ' <<<"$parsed"
        if [[ $result == "result: 0" && -n $dump ]]; then
            read -r -a dargv <<<"$dump"
            nsx "${STRACE[@]}" -o "$dlog" "${dargv[@]}" >"$WORK/$name.dump.out" 2>&1 || {
                echo "capture.sh: $name: list command failed" >&2
                cat "$WORK/$name.dump.out" >&2
                exit 1
            }
            echo "dump_command: $dump"
            python3 "$PARSER" nftdump "$dlog" "$get_type"
        fi
        local n
        for n in "$@"; do
            echo "note: $n"
        done
    } >"$file"
    COUNT=$((COUNT + 1))
    printf '%-28s %s\n' "$name" "${result#result: }"
}

QSHOW0="tc -s qdisc show dev veth0"
QSHOW1="tc -s qdisc show dev veth1"
CSHOW="tc -s class show dev veth0"
FSHOW="tc -s filter show dev veth0 parent 1:"
FSHOW_ING0="tc -s filter show dev veth0 parent ffff:"
FSHOW_ING1="tc -s filter show dev veth1 ingress"
FSHOW_EGR1="tc -s filter show dev veth1 egress"
NOTE_NOGACT="this kernel lacks the gact action (CONFIG_NET_ACT_GACT unset): request and refusal only, no dump"
NOTE_NOCONNMARK="this kernel lacks the connmark action (CONFIG_NET_ACT_CONNMARK unset): request and refusal only, no dump"
NOTE_NOMATCHALL="this kernel lacks the matchall classifier (CONFIG_NET_CLS_MATCHALL unset): request and refusal only, no dump"
NOTE_NOFW="this kernel lacks the fw classifier (CONFIG_NET_CLS_FW unset): request and refusal only, no dump"

if [[ $MODE == all ]]; then
# ---- qdiscs ---------------------------------------------------------------
reset_tc
capture qdisc_htb tc "tc qdisc add dev veth0 root handle 1: htb default 30" "$QSHOW0"
reset_tc
capture qdisc_htb_direct_qlen tc "tc qdisc add dev veth0 root handle 7a31: htb r2q 20 direct_qlen 500" "$QSHOW0"
reset_tc; pre_htb
capture qdisc_htb_delete tc "tc qdisc del dev veth0 root handle 1:" ""
reset_tc
capture qdisc_clsact tc "tc qdisc add dev veth1 clsact" "$QSHOW1"
reset_tc
capture qdisc_ingress tc "tc qdisc add dev veth0 ingress" "$QSHOW0"

# ---- HTB classes ------------------------------------------------------------
reset_tc; pre_htb
capture class_htb_basic tc "tc class add dev veth0 parent 1: classid 1:1 htb rate 1mbit" "$CSHOW"
reset_tc; pre_htb; pre_class1
capture class_htb_leaf tc "tc class add dev veth0 parent 1:1 classid 1:10 htb rate 1mbit ceil 2mbit burst 15k cburst 15k prio 1 quantum 1500" "$CSHOW"
reset_tc; pre_htb
capture class_htb_rate64 tc "tc class add dev veth0 parent 1: classid 1:2 htb rate 40gbit" "$CSHOW"
reset_tc; pre_htb
capture class_htb_ceil64 tc "tc class add dev veth0 parent 1: classid 1:3 htb rate 1gbit ceil 50gbit" "$CSHOW"
reset_tc; pre_htb; pre_class1
capture class_htb_change tc "tc class change dev veth0 parent 1: classid 1:1 htb rate 2mbit" "$CSHOW"
reset_tc; pre_htb; pre_class1
capture class_htb_delete tc "tc class del dev veth0 classid 1:1" ""

# ---- u32 filters on the HTB root -------------------------------------------
f() { reset_tc; pre_filter; }
f; capture u32_ipv4_dst tc "tc filter add dev veth0 parent 1: protocol ip prio 1 u32 match ip dst 10.99.0.2/32 flowid 1:10" "$FSHOW"
f; capture u32_ipv4_src_prefix tc "tc filter add dev veth0 parent 1: protocol ip prio 1 u32 match ip src 10.99.0.0/21 flowid 1:10" "$FSHOW"
f; capture u32_ipv6_dst tc "tc filter add dev veth0 parent 1: protocol ipv6 prio 2 u32 match ip6 dst 2001:db8::1/128 flowid 1:10" "$FSHOW"
f; capture u32_ipv6_src_prefix tc "tc filter add dev veth0 parent 1: protocol ipv6 prio 2 u32 match ip6 src 2001:db8:ab00::/41 flowid 1:10" "$FSHOW"
f; capture u32_ipv4_tcp_sport tc "tc filter add dev veth0 parent 1: protocol ip prio 5 u32 match ip protocol 6 0xff match ip sport 80 0xffff flowid 1:10" "$FSHOW"
f; capture u32_ipv4_udp_dport tc "tc filter add dev veth0 parent 1: protocol ip prio 5 u32 match ip protocol 17 0xff match ip dport 53 0xffff flowid 1:10" "$FSHOW"
f; capture u32_ipv6_tcp_dport tc "tc filter add dev veth0 parent 1: protocol ipv6 prio 6 u32 match ip6 protocol 6 0xff match ip6 dport 443 0xffff flowid 1:10" "$FSHOW"
f; capture u32_ipv6_udp_sport tc "tc filter add dev veth0 parent 1: protocol ipv6 prio 6 u32 match ip6 protocol 17 0xff match ip6 sport 5353 0xffff flowid 1:10" "$FSHOW"
f; capture u32_mark tc "tc filter add dev veth0 parent 1: protocol all prio 7 u32 match mark 0x10 0xff flowid 1:10" "$FSHOW"
f; capture u32_catchall tc "tc filter add dev veth0 parent 1: protocol all prio 8 u32 match u32 0 0 flowid 1:10" "$FSHOW"
f; capture u32_combo tc "tc filter add dev veth0 parent 1: protocol ip prio 9 u32 match ip dst 10.99.0.2/32 match ip protocol 6 0xff match ip dport 8443 0xffff flowid 1:10" "$FSHOW"
f; capture u32_explicit_handle tc "tc filter add dev veth0 parent 1: protocol ip prio 10 handle 800::801 u32 match ip dst 10.99.0.3/32 flowid 1:10" "$FSHOW"
f; capture u32_hash_table tc "tc filter add dev veth0 parent 1: protocol ip prio 20 handle 2: u32 divisor 256" "$FSHOW"
f; pre_hashtab
capture u32_hash_link tc "tc filter add dev veth0 parent 1: protocol ip prio 20 handle 800::1 u32 ht 800:: match ip dst 10.99.0.0/16 hashkey mask 0x000000ff at 16 link 2:" "$FSHOW"
f; pre_hashtab
capture u32_hash_bucket_entry tc "tc filter add dev veth0 parent 1: protocol ip prio 20 handle 2:5:1 u32 ht 2:5: match ip dst 10.99.0.5/32 flowid 1:10" "$FSHOW"
# Runtime-scoped client nodes: the client's address, then the runtime listener at the other end
# (its address when concrete, its port); a connection's two ports merge into one key.
f; pre_hashtab
capture u32_scoped_client tc "tc filter add dev veth0 parent 1: protocol ip prio 20 handle 2:5:1 u32 ht 2:5: match ip dst 10.99.0.5/32 match ip src 10.99.0.1/32 match ip sport 10086 0xffff flowid 1:10" "$FSHOW"
f; pre_hashtab
capture u32_scoped_connection tc "tc filter add dev veth0 parent 1: protocol ip prio 20 handle 2:5:2 u32 ht 2:5: match ip dst 10.99.0.5/32 match ip dport 40123 0xffff match ip sport 443 0xffff flowid 1:10" "$FSHOW"
f; q tc filter add dev veth0 parent 1: protocol ipv6 prio 21 handle 3: u32 divisor 256
capture u32_scoped_client_ipv6 tc "tc filter add dev veth0 parent 1: protocol ipv6 prio 21 handle 3:7:1 u32 ht 3:7: match ip6 src 2001:db8::7/128 match ip6 dport 443 0xffff flowid 1:10" "$FSHOW"
f; q tc filter add dev veth0 parent 1: protocol ip prio 10 handle 800::801 u32 match ip dst 10.99.0.3/32 flowid 1:10
capture u32_delete tc "tc filter del dev veth0 parent 1: protocol ip prio 10 handle 800::801 u32" "$FSHOW"

# ---- u32 filters with actions (ingress / clsact) ---------------------------
f; pre_ingress0
capture u32_mirred_ingress tc "tc filter add dev veth0 parent ffff: protocol all prio 1 u32 match u32 0 0 action mirred egress redirect dev ifb0" "$FSHOW_ING0"
f; pre_clsact1
capture u32_mirred_clsact_ipv4_src tc "tc filter add dev veth1 ingress protocol ip prio 3 u32 match ip src 10.99.0.2/32 action mirred egress redirect dev ifb0" "$FSHOW_ING1"
# The runtime-scoped upload redirect: one node per listener (its address and port).
f; pre_clsact1
capture u32_mirred_clsact_listener tc "tc filter add dev veth1 ingress protocol ip prio 21069 handle ::25b u32 match ip dst 10.99.0.1/32 match ip dport 10086 0xffff action mirred egress redirect dev ifb0" "$FSHOW_ING1"
f; pre_clsact1
capture u32_gact_drop tc "tc filter add dev veth1 egress protocol ip prio 1 u32 match ip dst 10.99.0.9/32 action drop" "$FSHOW_EGR1" "$NOTE_NOGACT"
f; pre_clsact1
capture u32_gact_pass tc "tc filter add dev veth1 egress protocol ip prio 1 u32 match ip dst 10.99.0.9/32 action pass" "$FSHOW_EGR1" "$NOTE_NOGACT"
f; pre_ingress0
capture u32_connmark_mirred tc "tc filter add dev veth0 parent ffff: protocol all prio 4 u32 match u32 0 0 action connmark action mirred egress redirect dev ifb0" "$FSHOW_ING0" "$NOTE_NOCONNMARK"

# ---- matchall / fw ----------------------------------------------------------
f; capture matchall_classid tc "tc filter add dev veth0 parent 1: protocol all prio 4 matchall classid 1:10" "$FSHOW" "$NOTE_NOMATCHALL"
f; pre_clsact1
capture matchall_mirred_clsact tc "tc filter add dev veth1 ingress protocol all prio 2 matchall action mirred egress redirect dev ifb0" "$FSHOW_ING1" "$NOTE_NOMATCHALL"
f; capture fw_classid tc "tc filter add dev veth0 parent 1: protocol ip prio 3 handle 10 fw classid 1:10" "$FSHOW" "$NOTE_NOFW"
f; capture fw_mask tc "tc filter add dev veth0 parent 1: protocol ip prio 3 handle 0x10/0xff fw classid 1:10" "$FSHOW" "$NOTE_NOFW"

# ---- links ------------------------------------------------------------------
reset_tc
capture link_ifb_create link "ip link add rlifb9 type ifb" ""
reset_tc; pre_ifb9
capture link_set_up link "ip link set dev rlifb9 up" ""
reset_tc; pre_ifb9
capture link_delete link "ip link del dev rlifb9" ""
reset_tc

# ---- sock_diag (ss) ---------------------------------------------------------
capture_sockdiag sock_diag_tcp4_established 2 "ss -tn state established"
capture_sockdiag sock_diag_tcp6_established 10 "ss -tn state established"

fi  # MODE == all

# ---- nftables (nft) ---------------------------------------------------------
# raylimit's table: two base chains and its two rule shapes. nft cannot write raylimit's userdata
# TLV, so its rules carry a comment instead (the codec test compares with userdata removed).
reset_nft()   { nsx nft delete table inet raylimit >/dev/null 2>&1 || true; }
pre_table()   { q nft add table inet raylimit; }
pre_chains()  {
    q nft add chain inet raylimit classify "{ type filter hook postrouting priority mangle ; policy accept ; }"
    q nft add chain inet raylimit save_mark "{ type filter hook output priority mangle ; policy accept ; }"
}
V0="$(ifindex_of veth0)"
RULE_M2P="classify oif $V0 meta mark and 0x00ff0000 == 0x00010000 counter meta priority set 524c:0100 comment \"raylimit-fixture\""
RULE_SAVE="save_mark oif $V0 meta mark and 0x00ff0000 == 0x00010000 counter ct mark set ct mark and 0xff00ffff or 0x00010000 comment \"raylimit-fixture\""
LIST="nft list table inet raylimit"
NOTE_COMMENT="nft cannot write raylimit's userdata TLV: this rule carries a comment (userdata type 0) instead"
NOTE_NOACK="nft 1.0.6 asks for no acknowledgements (flags NLM_F_REQUEST only); raylimit adds NLM_F_ACK to every operation"

reset_nft
capture_nft nft_add_table "nft add table inet raylimit" "$LIST" 1 "$NOTE_NOACK"
reset_nft; pre_table
capture_nft nft_add_chain_classify "nft add chain inet raylimit classify { type filter hook postrouting priority mangle ; policy accept ; }" "$LIST" 4 "$NOTE_NOACK"
reset_nft; pre_table
capture_nft nft_add_chain_save_mark "nft add chain inet raylimit save_mark { type filter hook output priority mangle ; policy accept ; }" "$LIST" 4 "$NOTE_NOACK"
reset_nft; pre_table; pre_chains
capture_nft nft_add_rule_mark_to_priority "nft add rule inet raylimit $RULE_M2P" "$LIST" 7 "$NOTE_COMMENT" "$NOTE_NOACK"
reset_nft; pre_table; pre_chains
capture_nft nft_add_rule_save_mark "nft add rule inet raylimit $RULE_SAVE" "$LIST" 7 "$NOTE_COMMENT" "$NOTE_NOACK"
reset_nft; pre_table; pre_chains; q nft add rule inet raylimit $RULE_M2P
H="$(nsx nft -a list chain inet raylimit classify | sed -n 's/.*# handle \([0-9]*\)$/\1/p' | tail -1)"
capture_nft nft_delete_rule "nft delete rule inet raylimit classify handle $H" "$LIST" 7 "$NOTE_NOACK"
capture_nft nft_delete_rule_missing "nft delete rule inet raylimit classify handle 4242" "" 7 "the handle does not exist: the kernel's refusal"
reset_nft; pre_table; pre_chains; q nft add rule inet raylimit $RULE_M2P
capture_nft nft_delete_table "nft delete table inet raylimit" "" 1 "$NOTE_NOACK"
reset_nft

# --------------------------------------------------------------------------
# All captured: replace the old fixture files atomically-ish.
# --------------------------------------------------------------------------
if [[ $MODE == all ]]; then
    rm -f "$OUT_DIR"/*.fixture
else
    rm -f "$OUT_DIR"/nft_*.fixture
fi
cp "$NEW_DIR"/*.fixture "$OUT_DIR"/
echo "capture.sh: wrote $COUNT fixtures to $OUT_DIR (kernel $(uname -r))"

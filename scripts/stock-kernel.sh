#!/usr/bin/env bash
# make test-stock-kernel: first checks on this machine's kernel that raylimit's probe answers as the
# kernel does for matchall, fw, gact and connmark, and that its plans use the u32 catch-all where
# matchall is absent; then boots Debian's stock kernel (linux-image-amd64) under qemu (TCG) with an
# initramfs holding busybox, the tc and nftables modules, the static raylimit and rl-traffic, v2ray
# and the test script tests/stock-kernel/init.sh. Both print one `pass`/`FAIL` line per check.
# Exits non-zero on any failure. The kernel package and its extracted tree are cached under
# target/stock-kernel/.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
for p in qemu-system-x86_64:qemu-system-x86 busybox:busybox-static depmod:kmod cpio:cpio tc:iproute2 \
         file:file; do
    command -v "${p%%:*}" >/dev/null || need+=("${p##*:}")
done
if [ ${#need[@]} -gt 0 ]; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

OUT=target/stock-kernel
PKG=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-/ {print $2; exit}')
VER=${PKG#linux-image-}
mkdir -p "$OUT"
if [ ! -f "$OUT/$PKG.deb" ]; then
    (cd "$OUT" && apt-get download -q "$PKG" 2>/dev/null && mv "${PKG}"_*.deb "$PKG.deb")
fi
if [ ! -d "$OUT/kernel/lib/modules/$VER" ]; then
    rm -rf "$OUT/kernel"
    dpkg-deb -x "$OUT/$PKG.deb" "$OUT/kernel"
    depmod -b "$OUT/kernel" "$VER"
fi

BIN=target/x86_64-unknown-linux-musl/release/raylimit
TRAFFIC=target/x86_64-unknown-linux-musl/release/examples/rl-traffic
for b in "$BIN" "$TRAFFIC"; do
    file "$b" 2>/dev/null | grep -Eq 'static(-pie)? linked' ||
        { echo "$b is not a static binary: make test-stock-kernel builds both" >&2; exit 1; }
done
# The default build (with nftables, linked to libnftnl and libmnl): an outbound's download keeps
# its mark in raylimit's nft table, which the static build cannot reach.
NFTBIN=target/release/raylimit
[ -x "$NFTBIN" ] || { echo "$NFTBIN is missing: make test-stock-kernel builds it" >&2; exit 1; }

# Host checks, on this machine's kernel, in a private namespace with a veth pair and v2ray (both
# removed on exit, whatever happens): the probe's verdict on each optional feature must be the
# kernel's own answer (tc asks it for one object of the kind), the dry-run plans of a shared
# baseline and of an upload redirect must use the catch-all form that verdict allows, and those of
# an outbound the mark classification it allows (fw, else nft) or name what download lacks.
HNS=rlt-sk-$$-$RANDOM
HTMP=$(mktemp -d)
HV2RAY=
host_cleanup() {
    if [ -n "$HV2RAY" ]; then kill "$HV2RAY" 2>/dev/null || true; wait "$HV2RAY" 2>/dev/null || true; fi
    HV2RAY=
    ip netns del "$HNS" 2>/dev/null || true
    rm -rf "$HTMP"
}
trap host_cleanup EXIT
trap 'exit 130' INT TERM HUP
host_failed=0
check() { # name feature command... (as tests/stock-kernel/init.sh prints them)
    local name=$1 feature=$2
    shift 2
    if "$@" >"$HTMP/out" 2>&1; then
        echo "pass $name ($feature)"
        grep '^measured' "$HTMP/out" | sed 's/^/    /' || true
    else
        echo "FAIL $name ($feature)"
        grep '^measured' "$HTMP/out" | sed 's/^/    /' || true
        grep -v '^measured' "$HTMP/out" | tail -15 | sed 's/^/    /' || true
        host_failed=$((host_failed + 1))
    fi
}
ip netns add "$HNS"
ip -n "$HNS" link add rl-cl type veth peer name rl-cp
ip -n "$HNS" link set rl-cl up
ip -n "$HNS" link set lo up
echo '{"inbounds":[{"tag":"socks-in","listen":"127.0.0.1","port":10808,"protocol":"socks","settings":{}}],
       "outbounds":[{"protocol":"freedom"},
                    {"tag":"marked","protocol":"freedom","streamSettings":{"sockopt":{"mark":16777216}}}]}' \
    > "$HTMP/v2ray.json"
ip netns exec "$HNS" v2ray -config "$HTMP/v2ray.json" >/dev/null 2>&1 &
HV2RAY=$!
for _ in $(seq 100); do [ "$(cat /proc/$HV2RAY/comm 2>/dev/null)" = v2ray ] && break; sleep 0.05; done
"$BIN" probe > "$HTMP/probe"

kernel_builds() { # FEATURE: the kernel accepts one object of the kind, in the private namespace
    case $1 in
    matchall) tc -n "$HNS" filter add dev rl-cl ingress protocol all pref 1 matchall classid 1:1 ;;
    fw) tc -n "$HNS" filter add dev rl-cl ingress protocol all pref 2 handle 1 fw classid 1:1 ;;
    gact) tc -n "$HNS" actions add action gact pass index 1 ;;
    connmark) tc -n "$HNS" actions add action connmark index 1 ;;
    esac
}
probe_answers_as_the_kernel() { # FEATURE
    local line kernel
    line=$(grep -E "^$1 " "$HTMP/probe" | tr -s ' ')
    if kernel=$(kernel_builds "$1" 2>&1); then kernel="built one"; else kernel=$(echo "$kernel" | head -1); fi
    echo "measured: probe: $line; kernel: $kernel"
    case $line in
    *" present "* | *" loadable "*) [ "$kernel" = "built one" ] ;;
    *" absent "*) [ "$kernel" != "built one" ] ;;
    *) false ;;
    esac
}
tc -n "$HNS" qdisc add dev rl-cl clsact
for f in matchall fw gact connmark; do
    state=$(awk -v f="$f" '$1 == f { print $2 }' "$HTMP/probe")
    check "host probe says $f ${state:-(no line)}, as the kernel answers" "$f" probe_answers_as_the_kernel "$f"
done
tc -n "$HNS" qdisc del dev rl-cl clsact

# The catch-all the plans must use: matchall where the probe allows it, else u32's empty key.
if grep -Eq '^matchall +(present|loadable)' "$HTMP/probe"; then
    form=matchall key=matchall feature=matchall
else
    form="u32 catch-all key" key="u32 match u32 0x0 0x0 at 0" feature="u32 fallback"
fi
plans() { # DIRECTION FORM-LINE FILTER-LINE: the dry-run's kernel form and filter operation
    local plan=$HTMP/plan.$1
    RAYLIMIT_STATE_DIR=$HTMP/state "$BIN" --netns "$HNS" limit --pid "$HV2RAY" --device rl-cl \
        --ip all --ip-aggregation shared --scope device --rate 1mbit --direction "$1" --format text > "$plan" || return 1
    grep -E "^Kernel form: $2" "$plan" | sed 's/^/measured: /'
    # The plan's commands carry the namespace (tc -n NS ...), so they can be pasted.
    local add="tc -n $HNS filter add"
    grep -E "$add .*$3" "$plan" | sed 's/^ */measured: /'
    grep -Eq "^Kernel form: $2: $form" "$plan" && grep -Eq "$add .*$3" "$plan" &&
        { [ "$form" = matchall ] || ! grep "$add" "$plan" | grep -q matchall; } &&
        # a dry-run: no IFB, no qdisc on the device
        ! ip -n "$HNS" link | grep rlifb && ! tc -n "$HNS" qdisc show dev rl-cl | grep -E 'htb|clsact'
}
check "host baseline plan uses $form" "$feature" \
    plans download "baseline filter" "dev rl-cl parent 524c: .*$key.* classid 524c:"
check "host upload redirect plan uses $form" "$feature, mirred" \
    plans upload "upload redirect to rlifb[0-9]+" "dev rl-cl ingress .*$key.* action mirred egress redirect dev rlifb"

# An outbound's plans (the default build: the nft fallback reads raylimit's table).
has() { grep -Eq "^$1 +(present|loadable)" "$HTMP/probe"; }
outbound_plan() { # DIRECTION PATTERN: the dry-run's output for --outbound marked matches PATTERN
    RAYLIMIT_STATE_DIR=$HTMP/state "$NFTBIN" --netns "$HNS" limit --pid "$HV2RAY" --device rl-cl \
        --outbound marked --rate 1mbit --direction "$1" --format text > "$HTMP/plan.outbound" 2>&1
    grep -E '^(Kernel form|Execution note): ' "$HTMP/plan.outbound" | sed 's/^/measured: /'
    grep -Eq "$2" "$HTMP/plan.outbound" && ! ip -n "$HNS" link | grep rlifb &&
        ! tc -n "$HNS" qdisc show dev rl-cl | grep -E 'htb|clsact'
}
if has fw; then
    check "host outbound upload plan uses fw" fw outbound_plan upload 'Kernel form: upload classification: fw on rl-cl'
else
    check "host outbound upload plan uses nft meta priority" "nft fallback for fw" \
        outbound_plan upload 'Kernel form: upload classification: nft `meta priority set`'
fi
if has fw && has connmark; then
    check "host outbound download plan restores the connection's mark" "connmark, fw" \
        outbound_plan download 'action connmark zone 0 pipe action mirred'
else
    missing=$( (has connmark || echo act_connmark; has fw || echo cls_fw) | sed ':a;N;s/\n/ and no /;ba')
    check "host outbound download is refused, naming $missing" "no fallback for connmark" \
        outbound_plan download "Execution note: .*this kernel has no $missing\$"
fi
host_cleanup

ROOT="$OUT/initramfs"
rm -rf "$ROOT"
mkdir -p "$ROOT"/{bin,proc,sys,dev,boot,run,tmp,etc,lib/modules/"$VER"}
cp /usr/bin/busybox "$ROOT/bin/"
ln -s busybox "$ROOT/bin/sh"
cp "$BIN" "$ROOT/bin/raylimit"
cp "$TRAFFIC" "$ROOT/bin/rl-traffic"
cp "$OUT/kernel/boot/config-$VER" "$ROOT/boot/"
cp tests/stock-kernel/init.sh "$ROOT/init"
chmod +x "$ROOT/init"
# v2ray and raylimit-nft, with the shared libraries they need, at the paths they ask for.
cp /usr/bin/v2ray "$ROOT/bin/"
cp "$NFTBIN" "$ROOT/bin/raylimit-nft"
for lib in $(for b in /usr/bin/v2ray "$NFTBIN"; do ldd "$b"; done | grep -o '/[^ ]*' | sort -u); do
    mkdir -p "$ROOT$(dirname "$lib")"
    cp -L "$lib" "$ROOT$lib"
done
# The modules the tests need, with their dependencies, in load order.
: > "$ROOT/modules.order"
for m in sch_htb sch_tbf sch_fq_codel sch_ingress cls_u32 cls_matchall cls_fw act_gact act_mirred act_connmark ifb veth \
         nf_tables nft_ct nf_conntrack inet_diag tcp_diag udp_diag; do
    for ko in $(modprobe -d "$OUT/kernel" -S "$VER" --show-depends "$m" | awk '$1 == "insmod" {print $2}'); do
        rel=/lib/modules/${ko#*/lib/modules/} # modprobe prints absolute paths
        grep -qx "$rel" "$ROOT/modules.order" && continue
        mkdir -p "$ROOT$(dirname "$rel")"
        cp "$ko" "$ROOT$rel"
        echo "$rel" >> "$ROOT/modules.order"
    done
done
cp "$OUT/kernel/lib/modules/$VER"/modules.* "$ROOT/lib/modules/$VER/"
(cd "$ROOT" && find . | cpio -o -H newc --quiet | gzip -1) > "$OUT/initrd.gz"

echo "booting $PKG ($VER) under qemu"
timeout 600 qemu-system-x86_64 -machine accel=tcg -m 768 -smp 1 -nographic -no-reboot \
    -kernel "$OUT/kernel/boot/vmlinuz-$VER" -initrd "$OUT/initrd.gz" \
    -append "console=ttyS0 panic=-1 quiet loglevel=3" | sed -u 's/\r//g' | tee "$OUT/console.log" |
    grep --line-buffered -E '^(pass|FAIL|stock-kernel:|    )' || true
grep -q '^stock-kernel: 0 failed' "$OUT/console.log" && [ "$host_failed" = 0 ]

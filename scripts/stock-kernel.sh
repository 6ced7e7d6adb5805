#!/usr/bin/env bash
# make test-stock-kernel: boots Debian's stock kernel (linux-image-amd64) under qemu (TCG) with an
# initramfs holding busybox, the tc and nftables modules, the static raylimit and rl-traffic, v2ray
# and the test script tests/stock-kernel/init.sh, which prints one `pass`/`FAIL` line per check.
# Exits non-zero on any failure. The kernel package and its extracted tree are cached under
# target/stock-kernel/.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
for p in qemu-system-x86_64:qemu-system-x86 busybox:busybox-static depmod:kmod cpio:cpio file:file; do
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
# v2ray and the shared libraries it needs, at the paths it asks for.
cp /usr/bin/v2ray "$ROOT/bin/"
for lib in $(ldd /usr/bin/v2ray | grep -o '/[^ ]*'); do
    mkdir -p "$ROOT$(dirname "$lib")"
    cp -L "$lib" "$ROOT$lib"
done
# The modules the tests need, with their dependencies, in load order.
: > "$ROOT/modules.order"
for m in sch_htb sch_ingress cls_u32 cls_matchall cls_fw act_gact act_mirred act_connmark ifb veth \
         nf_tables nft_ct nf_conntrack; do
    for ko in $(modprobe -d "$OUT/kernel" -S "$VER" --show-depends "$m" | awk '$1 == "insmod" {print $2}'); do
        rel=${ko#"$OUT/kernel"}
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
    -append "console=ttyS0 panic=-1 quiet loglevel=3" | tr -d '\r' | tee "$OUT/console.log" |
    grep -E '^(pass|FAIL|stock-kernel:|    measured)' || true
grep -q '^stock-kernel: 0 failed' "$OUT/console.log"

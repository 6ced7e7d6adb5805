#!/usr/bin/env bash
# Installs what raylimit needs to build and test on Debian 12, as root. Idempotent.
#   build:  pkg-config, libnftnl-dev, libmnl-dev (the default `nftables` feature), musl-tools
#   tests:  iproute2 (topology and oracle), nftables, strace, iperf3, v2ray (a real runtime),
#           man-db (the installed man pages render)
set -euo pipefail
packages=(file pkg-config libnftnl-dev libmnl-dev musl-tools iproute2 nftables strace iperf3 v2ray man-db)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# Debian's v2ray package enables a system service; raylimit's tests start their own runtimes.
systemctl disable --now v2ray >/dev/null 2>&1 || true
# The musl target for `make static` (a fully static binary without libnftnl).
if command -v rustup >/dev/null && ! rustup target list --installed | grep -q x86_64-unknown-linux-musl; then
  rustup target add x86_64-unknown-linux-musl >/dev/null 2>&1 || echo "note: musl target unavailable; 'make static' will not build"
fi
echo "setup: ok"

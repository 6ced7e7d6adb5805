#!/usr/bin/env bash
# The built-in demonstration: two private network namespaces joined by a veth pair; raylimit's own
# netlink codec puts a 1 MB/s HTB class with a u32 filter on the server's egress (download) and,
# through clsact + mirred + an IFB, on its ingress (upload); real TCP streams are measured before
# and after. The namespaces are removed at the end, whatever happens.
set -euo pipefail
cd "$(dirname "$0")/.."
echo "== building raylimit"
cargo build --release --quiet
echo "== raylimit probes the kernel (reads only)"
./target/release/raylimit probe
echo
echo "== shaping real traffic between two namespaces (egress HTB, then clsact+mirred+IFB)"
cargo test --release --quiet --test traffic -- --nocapture --test-threads 1 2>&1 | grep -E "measured|test result"

#!/usr/bin/env bash
# The built-in demonstration, told as a short story: a server namespace runs a real V2Ray runtime,
# a client namespace reaches it over a veth pair, and raylimit (finding the runtime by its PID)
# limits what the client may download and upload through it, measured with iperf3 before and after;
# the same client's traffic to another service on the server (iperf3 reached directly, standing in
# for sshd) is never limited.
# Everything lives in two private namespaces that are removed at the end, whatever happens.
set -euo pipefail
cd "$(dirname "$0")/.."

SRV=rl-demo-server
CLI=rl-demo-client
SERVER_IP=10.77.0.1
CLIENT_IP=10.77.0.2
WORK=$(mktemp -d)
export RAYLIMIT_STATE_DIR=$WORK/state
PIDS=()

cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    ip netns del "$SRV" 2>/dev/null || true
    ip netns del "$CLI" 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

say() { printf '\n\033[1m%s\033[0m\n' "$*"; }
# Bytes per second of a 3-second iperf3 stream between the namespaces (after a 1 s warm-up), to
# PORT: 5202 goes through V2Ray (its dokodemo-door inbound forwards to the iperf3 server on 5201),
# 5203 reaches a second iperf3 server directly (another service on the server).
measure() {
    local json port=$1
    shift
    json=$(ip netns exec "$CLI" iperf3 -c "$SERVER_IP" -p "$port" -t 3 -O 1 -J "$@")
    echo "$json" | tr -d ' \t\n' | grep -o '"sum_received":{[^}]*}' |
        grep -o '"bits_per_second":[0-9.e+]*' | cut -d: -f2 |
        awk '{ printf "%.2f MB/s", $1 / 8 / 1000000 }'
}

echo "== building raylimit"
cargo build --release --quiet
RL="$PWD/target/release/raylimit"

say "1. A server and a client, each in its own network namespace, joined by a veth pair."
ip netns add "$SRV"
ip netns add "$CLI"
ip -n "$SRV" link add veth-s type veth peer name veth-c netns "$CLI"
ip -n "$SRV" addr add "$SERVER_IP/24" dev veth-s
ip -n "$CLI" addr add "$CLIENT_IP/24" dev veth-c
ip -n "$SRV" link set veth-s up
ip -n "$CLI" link set veth-c up
ip -n "$SRV" link set lo up
echo "   server $SERVER_IP (veth-s), client $CLIENT_IP (veth-c)"

say "2. The server runs V2Ray, a real Xray-compatible runtime."
cat >"$WORK/config.json" <<EOF
{"log": {"loglevel": "warning"},
 "inbounds": [{"tag": "socks-in", "listen": "$SERVER_IP", "port": 1080, "protocol": "socks"},
              {"tag": "iperf-in", "listen": "$SERVER_IP", "port": 5202, "protocol": "dokodemo-door",
               "settings": {"address": "127.0.0.1", "port": 5201, "network": "tcp"}}],
 "outbounds": [{"tag": "direct", "protocol": "freedom"}]}
EOF
ip netns exec "$SRV" v2ray -config "$WORK/config.json" >"$WORK/v2ray.log" 2>&1 &
V2RAY=$!
PIDS+=("$V2RAY")
ip netns exec "$SRV" iperf3 -s -p 5201 >/dev/null 2>&1 &
PIDS+=("$!")
ip netns exec "$SRV" iperf3 -s -p 5203 >/dev/null 2>&1 &
PIDS+=("$!")
sleep 1
echo "   v2ray is pid $V2RAY; raylimit will find it by that pid and read its config as v2ray does:"
"$RL" inspect --pid "$V2RAY" | sed -n '/config files:/,$p' | sed 's/^/   /'

show_speeds() {
    echo "   through v2ray:        download $(measure 5202 -R)   upload $(measure 5202)"
    echo "   another service:      download $(measure 5203 -R)   upload $(measure 5203)"
}

say "3. Before any limit, the client downloads and uploads at full veth speed, through V2Ray and to another service on the server:"
show_speeds

LIMIT=("$RL" --netns "$SRV" limit --pid "$V2RAY" --ip "$CLIENT_IP" --device veth-s)

say "4. Plan first: a dry-run of a 1 MB/s download limit for the client (changes nothing):"
"${LIMIT[@]}" --direction download --rate 1MB/s | sed 's/^/   /'

say "5. Execute it, and an 8 Mbit/s (1 MB/s) upload limit too:"
"${LIMIT[@]}" --direction download --rate 1MB/s --execute | grep -E '^(Reconcile decision|Outcome|Executed)' | sed 's/^/   /'
"${LIMIT[@]}" --direction upload --rate 8mbit --execute | grep -E '^(Reconcile decision|Outcome|Executed)' | sed 's/^/   /'

say "6. Measured again: the client's traffic through V2Ray is held (HTB counts Ethernet and IP headers, so TCP payload lands a few % below); its traffic to the other service is not the runtime's and stays at full speed:"
show_speeds

say "7. Repeating the request changes nothing in the kernel:"
"${LIMIT[@]}" --direction download --rate 1MB/s --execute | grep -E '^(Reconcile decision|Outcome)' | sed 's/^/   /'

say "8. raylimit status while the client downloads through V2Ray: grouped by device, direction and owner, with the throughput measured now against each limit, and drift (none):"
ip netns exec "$CLI" iperf3 -c "$SERVER_IP" -p 5202 -t 4 -R >/dev/null 2>&1 &
LOAD=$!
sleep 1.5
"$RL" --netns "$SRV" status --sample-ms 1000 | sed 's/^/   /'
say "   And as one snapshot of raylimit top (live on a terminal; q quits):"
"$RL" --netns "$SRV" top --once | sed 's/^/   /'
wait "$LOAD"

say "9. Remove both limits; the root qdisc, the IFB and the ingress hook go with the last rule:"
"${LIMIT[@]}" --direction download --remove --execute | grep -E '^(Reconcile decision|Outcome)' | sed 's/^/   /'
"${LIMIT[@]}" --direction upload --remove --execute | grep -E '^(Reconcile decision|Outcome)' | sed 's/^/   /'
"$RL" --netns "$SRV" status | sed 's/^/   /'
show_speeds

say "Done. The namespaces are removed on exit."

#!/bin/sh
# PID 1 of the stock-kernel VM (scripts/stock-kernel.sh): load the modules, then check that
# raylimit's probe finds the optional tc features and that the preferred forms are chosen and built.
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mkdir -p /run/netns /tmp/state
export RAYLIMIT_STATE_DIR=/tmp/state PATH=/bin
for ko in $(cat /modules.order); do insmod "$ko" 2>/dev/null || echo "insmod $ko failed"; done
ip link set lo up

fails=0
check() { # name feature command...
    name=$1 feature=$2
    shift 2
    if "$@" >/tmp/out 2>&1; then
        echo "pass $name ($feature)"
        grep '^measured' /tmp/out | sed 's/^/    /'
    else
        echo "FAIL $name ($feature)"
        tail -15 /tmp/out | sed 's/^/    /'
        fails=$((fails + 1))
    fi
}

raylimit probe > /tmp/probe
for f in matchall fw gact connmark; do
    check "probe finds $f" "$f" grep -Eq "^$f +(present|loadable)" /tmp/probe
done

cat > /tmp/v2ray.json <<'JSON'
{"inbounds":[{"tag":"socks-in","listen":"127.0.0.1","port":10808,"protocol":"socks","settings":{}}],
 "outbounds":[{"protocol":"freedom"}]}
JSON
v2ray -config /tmp/v2ray.json >/tmp/v2ray.log 2>&1 &
V2RAY=$!
sleep 1
baseline() { raylimit limit --pid "$V2RAY" --device lo --ip all --ip-aggregation shared "$@"; }
plans_matchall() { baseline --direction download --rate 1mbit | tee /dev/stderr | grep -q 'baseline filter: matchall'; }
builds_baseline() { baseline --direction download --rate 1mbit --execute && raylimit show --device lo | grep -q matchall; }
builds_redirect() { baseline --direction upload --rate 1mbit --execute && raylimit show --device lo | grep -q mirred; }
removes_both() {
    baseline --direction download --remove --execute &&
        baseline --direction upload --remove --execute &&
        raylimit show --device lo > /tmp/show &&
        cat /tmp/show && ! grep -Eq 'htb|matchall|mirred' /tmp/show
}
# Real traffic through the matchall baseline: 2.5 MB over loopback HTTP at 500 000 bytes/s must
# take 5 s within 10 % (loopback's own egress carries it, so the baseline on lo shapes it).
mkdir -p /www && dd if=/dev/zero of=/www/blob bs=100000 count=25 2>/dev/null
httpd -p 127.0.0.1:8080 -h /www
uptime_cs() { awk '{ printf "%d", $1 * 100 }' /proc/uptime; }
fetch_cs() { # centiseconds to fetch the blob
    t0=$(uptime_cs)
    wget -q -O /dev/null http://127.0.0.1:8080/blob || return 1
    echo $(($(uptime_cs) - t0))
}
unshaped_is_fast() { cs=$(fetch_cs) && echo "measured: $cs cs unshaped" && [ "$cs" -lt 250 ]; }
shaped_holds_the_rate() {
    baseline --direction download --rate 500000 --execute >/dev/null || return 1
    cs=$(fetch_cs) || return 1
    echo "measured: $cs cs for 2500000 bytes at 500000 bytes/s (500 expected)"
    baseline --direction download --remove --execute >/dev/null
    [ "$cs" -ge 450 ] && [ "$cs" -le 550 ]
}

check "baseline plan picks matchall" matchall plans_matchall
check "unshaped loopback transfer is fast" control unshaped_is_fast
check "matchall baseline holds 500 kB/s within 10 %" matchall shaped_holds_the_rate
check "matchall baseline built" matchall builds_baseline
check "matchall upload redirect built" "matchall, mirred" builds_redirect
check "both removed, scaffolding too" matchall removes_both

kill "$V2RAY" 2>/dev/null
echo "stock-kernel: $fails failed"
poweroff -f

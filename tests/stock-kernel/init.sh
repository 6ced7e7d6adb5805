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
check "baseline plan picks matchall" matchall plans_matchall
check "matchall baseline built" matchall builds_baseline
check "matchall upload redirect built" "matchall, mirred" builds_redirect
check "both removed, scaffolding too" matchall removes_both

kill "$V2RAY" 2>/dev/null
echo "stock-kernel: $fails failed"
poweroff -f

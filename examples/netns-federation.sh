#!/usr/bin/env bash
# A three-machine federation on one Linux box: three network namespaces on a private bridge,
# real mDNS between them, nothing on the host's own interfaces. Needs root (ip netns).
#
#   sudo bash examples/netns-federation.sh [MODEL_DIR]     # Ctrl-C stops and removes everything
#
# Each node's API is reachable from the host at http://10.231.10<i>.2:8470 (a point-to-point
# control link per node); try:  .venv/bin/chorus-node status --node http://10.231.100.2:8470 \
#                                   --data-dir /tmp/chorus-netns/d0
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
WORK=${WORK:-/tmp/chorus-netns}
MODEL=${1:-$WORK/tiny-model}
NET=231
BR=chorus-br
mkdir -p "$WORK"

cleanup() {
    trap - EXIT INT TERM
    for i in 0 1 2; do
        [ -f "$WORK/node$i.pid" ] && kill "$(cat "$WORK/node$i.pid")" 2>/dev/null || true
        ip netns del "chorus-n$i" 2>/dev/null || true
        ip link del "chorus-c$i" 2>/dev/null || true
    done
    ip netns del "$BR" 2>/dev/null || true
}
trap cleanup EXIT INT TERM

if [ ! -d "$MODEL" ]; then
    "$PY" -c "from chorus_p2p.tiny import save_tiny_model; save_tiny_model('$MODEL')"
fi

ip netns add "$BR"
ip -n "$BR" link add br0 type bridge && ip -n "$BR" link set br0 up
for i in 0 1 2; do
    ns="chorus-n$i"
    ip netns add "$ns" && ip -n "$ns" link set lo up
    ip link add lan0 netns "$ns" type veth peer name "p$i" netns "$BR"
    ip -n "$ns" addr add "10.$NET.0.1$i/24" dev lan0 && ip -n "$ns" link set lan0 up
    ip -n "$BR" link set "p$i" master br0 && ip -n "$BR" link set "p$i" up
    ip -n "$ns" route add 224.0.0.0/4 dev lan0
    ip link add ctl0 netns "$ns" type veth peer name "chorus-c$i"
    ip addr add "10.$NET.10$i.1/30" dev "chorus-c$i" && ip link set "chorus-c$i" up
    ip -n "$ns" addr add "10.$NET.10$i.2/30" dev ctl0 && ip -n "$ns" link set ctl0 up
done

# Machine 0 creates the federation; the others join with its token.
"$PY" -m chorus_p2p.cli.main init --federation netns-demo --data-dir "$WORK/d0" --force --json \
    > "$WORK/init.json"
TOKEN=$("$PY" -c "import json; print(json.load(open('$WORK/init.json'))['join_token'])")
for i in 0 1 2; do
    extra=()
    if [ "$i" != 0 ]; then rm -rf "$WORK/d$i"; extra=(--join "$TOKEN"); fi
    ip netns exec "chorus-n$i" "$PY" -m chorus_p2p.cli.main up --model "$MODEL" \
        --data-dir "$WORK/d$i" --host 0.0.0.0 --interface "10.$NET.0.1$i" \
        --rank 4 --alpha 8 "${extra[@]}" > "$WORK/node$i.log" 2>&1 &
    echo $! > "$WORK/node$i.pid"
done
echo "three nodes starting; logs in $WORK/node*.log; APIs at http://10.$NET.10{0,1,2}.2:8470"
# Wait (60 s at most) until node 0 lists all three and a coordinator; a node that exits is
# named with its log.
members() {
    "$PY" -m chorus_p2p.cli.main members --node "http://10.$NET.100.2:8470" --data-dir "$WORK/d0" "$@"
}
ready='import json, sys
try:
    roles = [m["role"] for m in json.load(sys.stdin)]
except ValueError:
    sys.exit(1)
sys.exit(not (len(roles) == 3 and "coordinator" in roles))'
for _ in $(seq 120); do
    if members --json 2>/dev/null | "$PY" -c "$ready"; then break; fi
    for i in 0 1 2; do
        kill -0 "$(cat "$WORK/node$i.pid")" 2>/dev/null \
            || { echo "node $i exited; its log: $WORK/node$i.log" >&2; exit 1; }
    done
    sleep 0.5
done
members || echo "node 0 does not answer yet; see $WORK/node0.log" >&2
echo "Ctrl-C to stop"
wait

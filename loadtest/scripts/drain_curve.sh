#!/usr/bin/env bash
# The graceful drain's curve: N services on a controller, SIGTERM, and the
# closes per second the services saw (the swarm's closed_by_controller,
# sampled each second). Only loopback; bounded by the drain period.
#
# Usage: loadtest/scripts/drain_curve.sh [SERVICES] [DRAIN_PERIOD]
#   (defaults 20000 and 10s; builds nothing: uses target/release/tether)
set -euo pipefail
cd "$(dirname "$0")/../.."
n="${1:-20000}"
period="${2:-10s}"
bin=target/release/tether
port=18538
admin=18539
out="$(mktemp -d)"
trap 'kill $ctl $swarm 2>/dev/null || true; rm -rf "$out"' EXIT

"$bin" controller --listen 127.0.0.1:$port --admin 127.0.0.1:$admin --shards 2 \
    --drain-period "$period" >"$out/ctl.out" 2>"$out/ctl.err" &
ctl=$!
for _ in $(seq 50); do grep -q ready "$out/ctl.out" 2>/dev/null && break; sleep 0.1; done
"$bin" agent --controller ws://127.0.0.1:$port/ws/microservice --service-id drain \
    --swarm "$n" --source-ips 127.0.0.2-127.0.0.5 --exit-after 120s >"$out/swarm.out" 2>&1 &
swarm=$!
for _ in $(seq 600); do grep -q "all $n registered" "$out/swarm.out" && break; sleep 0.1; done
grep "all $n registered" "$out/swarm.out"
sleep 1
before=$(grep -o 'closed_by_controller=[0-9]*' "$out/swarm.out" | tail -1 | cut -d= -f2)
start=$(date +%s.%N)
kill -TERM $ctl
wait $ctl || true
end=$(date +%s.%N)
sleep 1.5
echo "drain of $n services with --drain-period $period: controller exited after $(echo "$end - $start" | bc) s"
echo "second  closes_in_that_second  closed_so_far"
grep -o 'closed_by_controller=[0-9]* elapsed_ms=[0-9]*' "$out/swarm.out" |
    awk -v base="$before" -F'[= ]' '{c=$2-base; if (c<0) next; if (!seen && c==0) {prev=0; next} seen=1; s++; printf "%6d  %21d  %13d\n", s, c-prev, c; prev=c}' |
    awk -v n="$n" '{print} $3>=n {exit}'

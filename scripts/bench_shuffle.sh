#!/usr/bin/env bash
# Shuffle throughput side by side, in one run on this machine:
#   iperf3 over loopback, strata's TCP shuffle, strata over emulated verbs
#   (in-process and over the emulation's TCP link), strata's local exchange,
#   and a single-thread memcpy of the same bytes; then the ratios
#   strata-TCP / iperf3 and local / memcpy.
#
#   scripts/bench_shuffle.sh [SIZE]        (default 2G of Arrow IPC payload)
set -euo pipefail
cd "$(dirname "$0")/.."
size="${1:-2G}"

if ! command -v iperf3 >/dev/null 2>&1; then
  echo "== installing iperf3 (apt)"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq iperf3 >/dev/null
fi

echo "== building the benchmark (release)"
cargo build --release --example shuffle_bench -q

port=15201
iperf3 -s -p "$port" -1 >/dev/null 2>&1 &
server=$!
sleep 0.5
iperf_gbps=$(iperf3 -c 127.0.0.1 -p "$port" -t 5 -J | python3 -c \
  'import json,sys; d=json.load(sys.stdin); print(d["end"]["sum_received"]["bits_per_second"]/8e9)')
wait "$server" 2>/dev/null || true
printf '%-20s %8.3f GB/s  (5 s, one stream)\n' "iperf3 loopback" "$iperf_gbps"

out=$(target/release/examples/shuffle_bench --size "$size")
echo "$out"
get() { echo "$out" | awk -v n="$1" '$1 == n { print $2 }'; }
python3 - "$iperf_gbps" "$(get tcp)" "$(get local)" "$(get memcpy)" "$(get rdma-emulated)" "$(get rdma-emulated-link)" <<'PY'
import sys
iperf, tcp, local, memcpy, verbs, link = map(float, sys.argv[1:])
print()
print(f"strata tcp / iperf3              {tcp / iperf:6.2f}x  (target >= 0.8)")
print(f"strata local / memcpy            {local / memcpy:6.2f}x  (target >= 0.5)")
print(f"strata rdma-emulated / memcpy    {verbs / memcpy:6.2f}x")
print(f"rdma-emulated-link / iperf3      {link / iperf:6.2f}x")
PY

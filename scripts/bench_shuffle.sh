#!/usr/bin/env bash
# Shuffle throughput side by side, in one run on this machine:
#   iperf3 over loopback, strata's TCP shuffle, strata over emulated verbs
#   (in-process and over the emulation's TCP link), strata's local exchange,
#   and a single-thread memcpy of the same bytes; then the ratios
#   strata-TCP / iperf3 and local / memcpy.
#
# strata runs with its defaults: 64 KiB segments, Flink's buffer counts
# (2 exclusive per channel, 8 floating per gate). The tcp-32k-segments line
# is Flink's segment size, whose 320 KiB credit window per channel is below
# this loopback's bandwidth-delay product.
#
# iperf3 and strata's TCP shuffle run alternately, ROUNDS times (default 3),
# and the ratio is taken between their medians: on a shared VM the loopback
# speed drifts by tens of percent within a minute, and one run of each would
# compare different machines.
#
#   scripts/bench_shuffle.sh [SIZE]        (default 2G of Arrow IPC payload)
#
# Without iperf3, `strata bench --only network` puts the same TCP shuffle
# beside a raw TcpStream of the same bytes, per message size, and measures
# against another machine with `--peer` (that machine runs `strata bench --serve`).
set -euo pipefail
cd "$(dirname "$0")/.."
size="${1:-2G}"
rounds="${ROUNDS:-3}"

if ! command -v iperf3 >/dev/null 2>&1; then
  echo "== installing iperf3 (apt)"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq iperf3 >/dev/null
fi

echo "== building the benchmark (release)"
cargo build --release --example shuffle_bench -q
bench=target/release/examples/shuffle_bench

port=15201
iperf_once() {
  iperf3 -s -p "$port" -1 >/dev/null 2>&1 &
  local server=$!
  sleep 0.5
  iperf3 -c 127.0.0.1 -p "$port" -t 3 -J | python3 -c \
    'import json,sys; d=json.load(sys.stdin); print(d["end"]["sum_received"]["bits_per_second"]/8e9)'
  wait "$server" 2>/dev/null || true
}
gbps() { awk -v n="$1" '$1 == n { print $2 }'; }

iperf_all=()
tcp_all=()
for r in $(seq "$rounds"); do
  i=$(iperf_once)
  t=$("$bench" --size "$size" --only tcp | gbps tcp)
  printf 'round %d: iperf3 loopback %6.3f GB/s   strata tcp %6.3f GB/s\n' "$r" "$i" "$t"
  iperf_all+=("$i")
  tcp_all+=("$t")
done

echo
out=$("$bench" --size "$size")
echo "$out"
checksummed=$("$bench" --size "$size" --only tcp --checksum | gbps tcp)
shared=$("$bench" --size "$size" --only tcp --shared-runtime | gbps tcp)
flink=$("$bench" --size "$size" --only tcp --shared-connection | gbps tcp)
flink_segment=$("$bench" --size "$size" --only tcp --segment 32K | gbps tcp)
printf '%-20s %8.3f GB/s  (taskmanager.network.checksum.enabled = true)\n' "tcp+crc" "$checksummed"
printf '%-20s %8.3f GB/s  (both TaskManagers on one tokio runtime)\n' "tcp-shared-runtime" "$shared"
printf '%-20s %8.3f GB/s  (taskmanager.network.tcp.task-reads = false: one shared connection per peer, read by the network runtime)\n' "tcp-shared-conn" "$flink"
printf '%-20s %8.3f GB/s  (taskmanager.memory.segment-size = 32kb, Flink'"'"'s: a 320 KiB credit window per channel)\n' "tcp-32k-segments" "$flink_segment"
get() { echo "$out" | gbps "$1"; }
python3 - "${iperf_all[*]}" "${tcp_all[*]}" "$(get local)" "$(get memcpy)" "$(get rdma-emulated)" "$(get rdma-emulated-link)" <<'PY'
import statistics, sys
iperf = statistics.median(map(float, sys.argv[1].split()))
tcp = statistics.median(map(float, sys.argv[2].split()))
local, memcpy, verbs, link = map(float, sys.argv[3:])
print()
rounds = [t / i for i, t in zip(map(float, sys.argv[1].split()), map(float, sys.argv[2].split()))]
print(f"median iperf3 {iperf:.3f} GB/s, median strata tcp {tcp:.3f} GB/s")
print("per-round tcp / iperf3: " + ", ".join(f"{r:.2f}" for r in rounds)
      + f" (median {statistics.median(rounds):.2f})")
print(f"strata tcp / iperf3              {tcp / iperf:6.2f}x  (target >= 0.8)")
print(f"strata local / memcpy            {local / memcpy:6.2f}x  (target >= 0.5)")
print(f"strata rdma-emulated / memcpy    {verbs / memcpy:6.2f}x")
print(f"rdma-emulated-link / iperf3      {link / iperf:6.2f}x")
PY

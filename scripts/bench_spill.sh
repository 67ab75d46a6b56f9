#!/usr/bin/env bash
# Spill throughput beside fio, in one go on one directory: fio write and read
# (io_uring, O_DIRECT, 1 MiB blocks, iodepth 32), then strata's spill writer
# and reader (same block size and depth, through examples/spill_bench.rs).
# Prints each throughput in MB/s (10^6 bytes/s), the median over RUNS runs,
# and the ratios strata/fio (target: >= 0.9 for both).
#
#   scripts/bench_spill.sh [DIR] [SIZE]        (defaults: /tmp/strata-bench-spill, 1G, RUNS=5)
#   RUNS=9 scripts/bench_spill.sh /mnt/nvme 4G
#
# Reads need no cache drop: both fio (direct=1) and strata (O_DIRECT) bypass
# the page cache. strata falls back to buffered I/O only where the file system
# refuses O_DIRECT, and its summary line says so; fio fails there instead.
#
# `strata bench --only storage --dir DIR` measures the same spill files through
# both backends beside a raw O_DIRECT write/read of the same size per block
# size (and fio, when on PATH) in one run, without this script's medians.
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-/tmp/strata-bench-spill}
size=${2:-1G}
runs=${RUNS:-5}

if ! command -v fio >/dev/null; then
  echo "installing fio (apt-get)" >&2
  apt-get install -y -qq fio >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq fio; }
fi
mkdir -p "$dir"
cargo build --release --quiet --example spill_bench

fio_mb_s() { # rw field
  fio --name="strata-$1" --filename="$dir/fio.dat" --rw="$1" --ioengine=io_uring --direct=1 \
    --bs=1M --iodepth=32 --size="$size" --output-format=json |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["jobs"][0][sys.argv[1]]["bw_bytes"] / 1e6)' "$2"
}

results=$(mktemp)
trap 'rm -f "$results" "$dir/fio.dat"' EXIT
for run in $(seq "$runs"); do
  rm -f "$dir/fio.dat"
  fio_write=$(fio_mb_s write write)
  fio_read=$(fio_mb_s read read)
  rm -f "$dir/fio.dat"
  out=$(cargo run --release --quiet --example spill_bench -- --dir "$dir" --size "$size")
  [ "$run" = 1 ] && echo "$out" | head -1
  strata=$(echo "$out" | grep -o 'write_mb_s=[0-9.]* read_mb_s=[0-9.]*')
  strata_write=${strata#write_mb_s=}; strata_write=${strata_write%% *}
  strata_read=${strata##*read_mb_s=}
  printf 'run %s: fio write %.0f read %.0f | strata write %.0f read %.0f MB/s\n' \
    "$run" "$fio_write" "$fio_read" "$strata_write" "$strata_read"
  echo "$fio_write $fio_read $strata_write $strata_read" >>"$results"
done

python3 - "$results" "$size" "$dir" <<'PY'
import statistics, sys
rows = [list(map(float, line.split())) for line in open(sys.argv[1])]
fw, fr, sw, sr = (statistics.median(col) for col in zip(*rows))
print(f"\nmedian of {len(rows)} run(s), {sys.argv[2]} in {sys.argv[3]}, 1 MiB blocks, depth 32:")
print(f"  {'':8} {'fio':>10} {'strata':>10} {'strata/fio':>11}")
print(f"  {'write':8} {fw:>7.0f} MB/s {sw:>5.0f} MB/s {sw / fw:>10.2f}")
print(f"  {'read':8} {fr:>7.0f} MB/s {sr:>5.0f} MB/s {sr / fr:>10.2f}")
ok = sw / fw >= 0.9 and sr / fr >= 0.9
print(f"  target strata/fio >= 0.9: {'met' if ok else 'NOT met'}")
PY

#!/usr/bin/env bash
# End-to-end throughput of the main example (50M-row keyed aggregation) on
# the embedded mini-cluster, side by side with a single-threaded reference
# pass over the same datagen rows (the work any engine has to do at least).
#
#   scripts/bench_pipeline.sh [TASKMANAGERS] [SLOTS]
set -euo pipefail
cd "$(dirname "$0")/.."
tms=${1:-2}
slots=${2:-2}
cargo build --release --quiet
start=$(date +%s.%N)
target/release/strata run examples/keyed_aggregation.toml \
  --taskmanagers "$tms" --slots "$slots" --no-progress | tee /tmp/strata-bench-summary.txt
end=$(date +%s.%N)
rows=$(grep -o 'rows in [0-9,]*' /tmp/strata-bench-summary.txt | head -1 | tr -dc 0-9)
python3 - "$rows" "$start" "$end" <<'PY'
import sys
rows, start, end = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
wall = end - start
print(f"end-to-end (process start to exit): {rows:,} rows in {wall:.2f} s = {rows / wall / 1e6:.2f} M rows/s")
PY

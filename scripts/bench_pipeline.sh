#!/usr/bin/env bash
# End-to-end throughput of the main example (50M-row keyed aggregation) on
# the embedded mini-cluster, side by side with a hand-written single-threaded
# loop over the same datagen rows (examples/reference_agg.rs), in one run.
#
#   scripts/bench_pipeline.sh [TASKMANAGERS] [SLOTS]
set -euo pipefail
cd "$(dirname "$0")/.."
tms=${1:-2}
slots=${2:-2}
cargo build --release --quiet --bin strata --example reference_agg
summary=$(mktemp)
start=$(date +%s.%N)
target/release/strata run examples/keyed_aggregation.toml \
  --taskmanagers "$tms" --slots "$slots" --no-progress 2>/dev/null | tee "$summary"
end=$(date +%s.%N)
rows=$(grep -o 'rows in [0-9,]*' "$summary" | head -1 | tr -dc 0-9)
job_rate=$(grep -o 'throughput [0-9.]* M rows/s' "$summary" | tr -dc 0-9.)
reference=$(target/release/examples/reference_agg 50000000 100000 42)
echo "$reference"
python3 - "$rows" "$start" "$end" "$job_rate" "$reference" <<'PY'
import re, sys
rows, start, end, job = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
ref = float(re.search(r"= ([0-9.]+) M rows/s", sys.argv[5]).group(1))
e2e = rows / (end - start) / 1e6
print(f"strata job (deploy to finish):        {job:.2f} M rows/s")
print(f"strata end to end (process lifetime): {e2e:.2f} M rows/s")
print(f"single-thread reference loop:         {ref:.2f} M rows/s")
print(f"ratio strata job / reference:         {job / ref:.2f}x")
print(f"ratio strata end-to-end / reference:  {e2e / ref:.2f}x")
PY
rm -f "$summary"

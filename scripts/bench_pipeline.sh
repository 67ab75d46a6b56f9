#!/usr/bin/env bash
# Per-core speed of strata on the three benchmark jobs, beside a hand-written
# single-thread loop over the same rows (examples/reference_agg.rs), in one
# run on this machine:
#
#   J1          datagen 50M -> filter -> key_by -> aggregate (5 aggs, 100k keys)
#               -> CSV (examples/keyed_aggregation.toml)
#   J2-Parquet  the same query over one 20M-row Parquet file (snappy, 20 row
#               groups; examples/bench/j2_parquet.toml)
#   J2-CSV      the same query over the same rows as one CSV file
#               (examples/bench/j2_csv.toml)
#
# The J2 files are made once by scripts/gen_bench_data.sh (fixed seed).
# Printed per job (medians of RUNS round-robin runs): the process's wall time,
# the job's own time (the summary's deploy-to-finish), rows per CPU-second
# (rows / (user + sys) of the whole process), peak RSS, and the time from
# process start to the first row a source produced.
#
#   scripts/bench_pipeline.sh
#
# Environment:
#   RUNS=3                  runs per job, round-robin; medians are printed
#   STRATA_BIN=target/release/strata
#   BASELINE_BIN=PATH       another strata binary (e.g. an older commit's),
#                           run in the same rounds; ratios new / baseline
#   BASELINE_ARGS="..."     extra `strata run` arguments for the baseline only
#                           (e.g. "--taskmanagers 2 --slots 2", the layout
#                           `strata run` used before it defaulted to one)
#   JOBS="J1 J2-Parquet J2-CSV"
#   EXTRA="-D key=value ..." passed to every `strata run`
set -euo pipefail
cd "$(dirname "$0")/.."
target=${CARGO_TARGET_DIR:-target}
runs=${RUNS:-3}
jobs=${JOBS:-J1 J2-Parquet J2-CSV}
strata=${STRATA_BIN:-$target/release/strata}
baseline=${BASELINE_BIN:-}
extra=${EXTRA:-}
baseline_args=${BASELINE_ARGS:-}

[ -x /usr/bin/time ] || { echo "bench_pipeline: installing GNU time"; apt-get install -y -qq time >/dev/null; }
cargo build --release --quiet --bin strata --example reference_agg --example gen_bench_data
scripts/gen_bench_data.sh >/dev/null

job_file() {
  case "$1" in
    J1) echo examples/keyed_aggregation.toml ;;
    J2-Parquet) echo examples/bench/j2_parquet.toml ;;
    J2-CSV) echo examples/bench/j2_csv.toml ;;
    *) echo "bench_pipeline: unknown job $1" >&2; exit 2 ;;
  esac
}

results=$(mktemp)
trap 'rm -f "$results" "$results".*' EXIT

# run LABEL BIN JOB [ARGS]: one run; appends "label job wall job_s cpu rss_kb first_ms rows"
run() {
  local label=$1 bin=$2 job=$3 args=${4:-} out="$results.out" tm="$results.time"
  # shellcheck disable=SC2086
  if ! /usr/bin/time -o "$tm" -f '%e %U %S %M' "$bin" run "$(job_file "$job")" --no-progress $extra $args \
      >"$out" 2>"$results.err"; then
    echo "bench_pipeline: $label $job failed:" >&2
    tail -5 "$results.err" >&2
    exit 1
  fi
  read -r wall user sys rss <"$tm"
  local job_s first rows
  job_s=$(grep -o 'FINISHED in [0-9.]*' "$out" | grep -o '[0-9.]*$')
  first=$(grep -o 'time to first row: [0-9.]*' "$out" | grep -o '[0-9.]*$' || echo nan)
  rows=$(grep -o 'rows in [0-9,]*' "$out" | head -1 | tr -dc 0-9)
  echo "$label $job $wall $job_s $(awk "BEGIN { print $user + $sys }") $rss ${first:-nan} $rows" >>"$results"
}

for round in $(seq "$runs"); do
  for job in $jobs; do
    run strata "$strata" "$job"
    if [ -n "$baseline" ]; then run baseline "$baseline" "$job" "$baseline_args"; fi
  done
  echo "round $round of $runs done" >&2
done

echo "== reference: one thread, std HashMap, the same filter and aggregation"
refs=$(mktemp)
for job in $jobs; do
  case "$job" in
    J1) "$target/release/examples/reference_agg" 50000000 100000 42 ;;
    J2-Parquet) "$target/release/examples/reference_agg" --parquet target/bench-data/j2-parquet/j2.parquet ;;
    J2-CSV) "$target/release/examples/reference_agg" --csv target/bench-data/j2-csv/j2.csv ;;
  esac | sed "s/^/$job /" | tee -a "$refs"
done

python3 - "$results" "$refs" <<'PY'
import re, statistics, sys
rows = [l.split() for l in open(sys.argv[1])]
refs = {}
for line in open(sys.argv[2]):
    m = re.search(r"= ([0-9.]+) M rows/s", line)
    if m:
        refs[line.split()[0]] = float(m.group(1))
med = lambda xs: statistics.median(xs)
table = {}
for label, job, wall, job_s, cpu, rss, first, n in rows:
    table.setdefault((label, job), []).append(
        (float(wall), float(job_s), float(cpu), int(rss) / 1024, float(first), int(n)))
print()
print(f"{'job':<11} {'binary':<9} {'wall s':>7} {'job s':>7} {'M rows/CPU-s':>13} {'peak RSS MiB':>13} {'first row ms':>13} {'wall/job':>9} {'ref M rows/s':>13}")
summary = {}
for (label, job), xs in table.items():
    wall, job_s, cpu, rss, first = (med([x[i] for x in xs]) for i in range(5))
    n = xs[0][5]
    per_cpu = n / cpu / 1e6
    summary[(label, job)] = (wall, per_cpu, rss)
    print(f"{job:<11} {label:<9} {wall:7.2f} {job_s:7.2f} {per_cpu:13.2f} {rss:13.0f} {first:13.1f} {wall / job_s:9.2f} {refs.get(job, float('nan')):13.2f}")
for job in dict.fromkeys(j for _, j in table):
    if ("baseline", job) in summary:
        new, old = summary[("strata", job)], summary[("baseline", job)]
        print(f"{job}: strata / baseline: rows per CPU-second {new[1] / old[1]:.2f}x, wall {old[0] / new[0]:.2f}x faster, peak RSS {new[2] / old[2]:.2f}x")
PY

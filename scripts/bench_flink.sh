#!/usr/bin/env bash
# strata against Apache Flink 2.x (PyFlink, Table API, local mini-cluster) on
# the same two jobs, on this machine, in one run:
#
#   J1      datagen (ROWS_J1 rows: key BIGINT uniform 0..99999, value BIGINT
#           uniform 0..999, price DOUBLE uniform 0..100, ts BIGINT)
#           WHERE value >= 10 GROUP BY key: COUNT(*), SUM(value), MIN(value),
#           MAX(value), AVG(price); strata: examples/keyed_aggregation.toml
#   J2-CSV  the same query over one CSV file (target/bench-data/j2-csv/*.csv,
#           made by scripts/gen_bench_data.sh when missing)
#
# Both engines run at parallelism 4. Flink runs in batch mode (result to a
# CSV filesystem sink) and in streaming mode; a streaming GROUP BY emits
# updates, which an append-only filesystem sink refuses, so streaming writes
# to the `blackhole` connector. strata has a single execution mode (bounded
# input, final results at end of input, CSV sink): its one run per job is the
# numerator of both the batch and the streaming ratio. Flink's datagen runs
# with rows-per-second 1,000,000,000 (its default is 10,000); Flink reads a
# headerless copy of the CSV file (its CSV format has no header option),
# made once and cached under target/bench-data/flink-j2-noheader/.
#
# Measured per run, per process (python start to exit for Flink, including
# the JVM it launches, which the driver shuts down and reaps; strata start to
# exit): wall time, user+sys CPU time of the process tree and peak RSS of its
# largest process (/usr/bin/time); the job's own time (Flink: around
# execute_sql(INSERT ...).wait(), including the mini-cluster start; strata:
# the summary's deploy-to-finish time). Printed: a table and the ratios
# strata ÷ Flink — throughput (Flink wall ÷ strata wall), job throughput
# (Flink job s ÷ strata job s), rows per CPU-second, and peak RSS.
#
# A benchmark, not a CI step: the first run creates target/flink-venv and
# installs apache-flink 2.x from PyPI into it (~850 MB), and installs
# openjdk-17-jre-headless and time with apt-get when Java 11/17/21 or
# /usr/bin/time is missing.
#
#   scripts/bench_flink.sh
#
# Environment:
#   ROWS_J1=50000000        datagen rows of J1 (both engines)
#   ROWS_J2=20000000        documentation only: J2 reads whatever the file holds
#   J2_CSV=PATH             J2's input file (header key,value,price,ts); default
#                           the one *.csv in target/bench-data/j2-csv/
#   RUNS=1                  runs of each measurement; medians when > 1
#   MODES="batch streaming" Flink runtime modes
#   JOBS="J1 J2"            jobs to run
#   STRATA_BIN=target/release/strata   (built with cargo when the default is missing)
#   FLINK_VENV=target/flink-venv
#   FLINK_PIP_SPEC='apache-flink>=2.0,<3'
#   FLINK_HEAP=4g           the Flink JVM's -Xmx (JVM_ARGS)
#   FLINK_MANAGED=1g        taskmanager.memory.managed.size of the mini-cluster
#   FLINK_MINIBATCH=0       1: table.exec.mini-batch.* on (streaming only;
#                           Flink's default is off)
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

rows_j1=${ROWS_J1:-50000000}
rows_j2=${ROWS_J2:-20000000}
runs=${RUNS:-1}
modes=${MODES:-batch streaming}
jobs=${JOBS:-J1 J2}
strata=${STRATA_BIN:-target/release/strata}
venv=${FLINK_VENV:-target/flink-venv}
pip_spec=${FLINK_PIP_SPEC:-apache-flink>=2.0,<3}
flink_heap=${FLINK_HEAP:-4g}
flink_managed=${FLINK_MANAGED:-1g}
minibatch=${FLINK_MINIBATCH:-0}
parallelism=4

die() {
  echo "bench_flink: $*" >&2
  exit 1
}

for m in $modes; do
  case "$m" in batch | streaming) ;; *) die "MODES: unknown mode '$m' (batch, streaming)" ;; esac
done
for j in $jobs; do
  case "$j" in J1 | J2) ;; *) die "JOBS: unknown job '$j' (J1, J2)" ;; esac
done
[[ "$rows_j1" =~ ^[0-9]+$ ]] || die "ROWS_J1 must be a number, not '$rows_j1'"
[[ "$runs" =~ ^[1-9][0-9]*$ ]] || die "RUNS must be a positive number, not '$runs'"

if [ -n "${STRATA_BIN:-}" ] && [ ! -x "$strata" ]; then
  die "STRATA_BIN=$strata is not an executable"
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

apt_install() {
  command -v apt-get >/dev/null 2>&1 || die "$1 is missing and there is no apt-get to install it ($2)"
  [ "$(id -u)" = 0 ] || die "$1 is missing; install it ($2) or run as root so that apt-get can"
  echo "== installing $2 (apt)"
  if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$2" >"$tmp/apt.log" 2>&1; then
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >>"$tmp/apt.log" 2>&1 || true
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$2" >>"$tmp/apt.log" 2>&1 ||
      { tail -20 "$tmp/apt.log" >&2; die "apt-get install $2 failed (see above)"; }
  fi
}

# ---- tools ---------------------------------------------------------------
[ -x /usr/bin/time ] || apt_install /usr/bin/time time
command -v python3 >/dev/null 2>&1 || die "python3 is missing"

# Java: Flink 2.x runs on Java 11, 17 or 21.
java_major() {
  "$1" -version 2>&1 | awk -F'"' '/version/ { print $2; exit }' |
    awk -F'[.+-]' '{ if ($1 == "1") print $2; else print $1 }'
}
java_ok() { case "$(java_major "$1" 2>/dev/null)" in 11 | 17 | 21) return 0 ;; *) return 1 ;; esac; }
java_bin=""
for candidate in ${JAVA_HOME:+"$JAVA_HOME/bin/java"} "$(command -v java || true)" \
  /usr/lib/jvm/java-17-openjdk-*/bin/java /usr/lib/jvm/java-21-openjdk-*/bin/java \
  /usr/lib/jvm/java-11-openjdk-*/bin/java; do
  if [ -n "$candidate" ] && [ -x "$candidate" ] && java_ok "$candidate"; then
    java_bin=$candidate
    break
  fi
done
if [ -z "$java_bin" ]; then
  if command -v java >/dev/null 2>&1; then
    echo "== $(command -v java) is Java $(java_major java), which Flink 2.x does not support (11, 17, 21)"
  fi
  apt_install "Java 11/17/21" openjdk-17-jre-headless
  for candidate in /usr/lib/jvm/java-17-openjdk-*/bin/java; do
    [ -x "$candidate" ] && java_ok "$candidate" && java_bin=$candidate && break
  done
  [ -n "$java_bin" ] || die "openjdk-17-jre-headless is installed but no Java 17 was found under /usr/lib/jvm"
fi
java_bin=$(readlink -f "$java_bin")
export JAVA_HOME=${java_bin%/bin/java}
java_version=$("$java_bin" -version 2>&1 | head -1)

# PyFlink in a virtualenv.
if ! "$venv/bin/python" -c 'import pyflink.version, sys; sys.exit(0 if pyflink.version.__version__.startswith("2.") else 1)' 2>/dev/null; then
  echo "== installing $pip_spec from PyPI into $venv"
  if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv" ||
      die "python3 -m venv $venv failed (on Debian/Ubuntu: apt-get install python3-venv)"
  fi
  if ! "$venv/bin/pip" install --disable-pip-version-check --retries 2 --timeout 30 \
    "$pip_spec" >"$tmp/pip.log" 2>&1; then
    tail -20 "$tmp/pip.log" >&2
    die "pip install '$pip_spec' failed: PyPI unreachable, or no apache-flink 2.x for $("$venv/bin/python" --version 2>&1)? (log above)"
  fi
fi
flink_version=$("$venv/bin/python" -c 'import pyflink.version; print(pyflink.version.__version__)')

# strata.
if [ ! -x "$strata" ]; then
  echo "== building strata (cargo build --release --bin strata)"
  cargo build --release --quiet --bin strata
fi

# ---- J2 input --------------------------------------------------------------
j2_csv="" j2_flink="" j2_rows=0
if [[ " $jobs " == *" J2 "* ]]; then
  if [ -n "${J2_CSV:-}" ]; then
    j2_csv=$J2_CSV
    [ -f "$j2_csv" ] || die "J2_CSV=$j2_csv is not a file"
  else
    if [ ! -d target/bench-data/j2-csv ]; then
      [ -x scripts/gen_bench_data.sh ] || die "target/bench-data/j2-csv is missing and scripts/gen_bench_data.sh cannot make it"
      echo "== generating target/bench-data/j2-csv (scripts/gen_bench_data.sh)"
      scripts/gen_bench_data.sh
    fi
    shopt -s nullglob
    files=(target/bench-data/j2-csv/*.csv)
    shopt -u nullglob
    [ "${#files[@]}" = 1 ] || die "target/bench-data/j2-csv holds ${#files[@]} *.csv files, not 1"
    j2_csv=${files[0]}
  fi
  j2_csv=$(readlink -f "$j2_csv")
  header=$(head -1 "$j2_csv")
  [ "$header" = "key,value,price,ts" ] || die "$j2_csv: header is '$header', not 'key,value,price,ts'"
  # The headerless copy for Flink, remade when the source changes.
  cache=target/bench-data/flink-j2-noheader
  j2_flink="$root/$cache/$(basename "$j2_csv")"
  stamp="$j2_csv $(stat -c '%s %Y' "$j2_csv")"
  if [ ! -f "$j2_flink" ] || [ "$(cat "$j2_flink.src" 2>/dev/null)" != "$stamp" ]; then
    echo "== writing the headerless copy for Flink: $cache/$(basename "$j2_csv")"
    mkdir -p "$cache"
    rm -f "$j2_flink.src"
    tail -n +2 "$j2_csv" >"$j2_flink.part"
    mv "$j2_flink.part" "$j2_flink"
    wc -l <"$j2_flink" | tr -d ' ' >"$j2_flink.rows"
    echo "$stamp" >"$j2_flink.src"
  fi
  j2_rows=$(cat "$j2_flink.rows")
  if [ "$j2_rows" != "$rows_j2" ]; then
    echo "== note: $j2_csv holds $j2_rows rows (ROWS_J2=$rows_j2 is documentation only)"
  fi
fi

# ---- job files -----------------------------------------------------------
grep -q '^rows = ' examples/keyed_aggregation.toml || die "examples/keyed_aggregation.toml has no 'rows = ' line"
sed -E "s/^rows = .*/rows = $rows_j1/" examples/keyed_aggregation.toml >"$tmp/j1.toml"
# J2-CSV: examples/bench/j2_csv.toml (the same query as J1) over $j2_csv.
grep -q '^path = "target/bench-data/j2-csv"' examples/bench/j2_csv.toml ||
  die "examples/bench/j2_csv.toml has no source 'path' line"
sed -E -e "s#^path = \"target/bench-data/j2-csv\"#path = \"$j2_csv\"#" \
  -e "s#^path = \"target/out/j2-csv\"#path = \"target/out/bench-flink/strata-j2\"#" \
  -e "s/^parallelism = .*/parallelism = $parallelism/" \
  examples/bench/j2_csv.toml >"$tmp/j2.toml"

cat >"$tmp/flink_job.py" <<'PY'
"""One Flink job (J1 or J2-CSV) in batch or streaming mode on PyFlink's
local mini-cluster. Prints 'RESULT job_s=<s> rows_out=<n>'."""
import argparse, glob, os, shutil, sys, time

import pyflink.java_gateway as jg

# Keep the gateway JVM's Popen so that it can be shut down and reaped at the
# end: its CPU time and RSS then count in this process's rusage (time(1)).
_launch, _procs = jg.launch_gateway_server_process, []
def _keep(env, args):
    p = _launch(env, args)
    _procs.append(p)
    return p
jg.launch_gateway_server_process = _keep

from pyflink.common import Configuration
from pyflink.table import EnvironmentSettings, TableEnvironment

ap = argparse.ArgumentParser()
ap.add_argument("--job", choices=["J1", "J2"], required=True)
ap.add_argument("--mode", choices=["batch", "streaming"], required=True)
ap.add_argument("--rows", type=int, default=0)
ap.add_argument("--csv", default="")
ap.add_argument("--out", required=True)
ap.add_argument("--parallelism", type=int, default=4)
ap.add_argument("--managed", default="1g")
ap.add_argument("--minibatch", default="0")
a = ap.parse_args()

conf = Configuration()
conf.set_string("parallelism.default", str(a.parallelism))
conf.set_string("taskmanager.numberOfTaskSlots", str(a.parallelism))
conf.set_string("taskmanager.memory.managed.size", a.managed)
if a.mode == "streaming" and a.minibatch == "1":
    conf.set_string("table.exec.mini-batch.enabled", "true")
    conf.set_string("table.exec.mini-batch.allow-latency", "1 s")
    conf.set_string("table.exec.mini-batch.size", "5000")
builder = EnvironmentSettings.new_instance()
builder = builder.in_batch_mode() if a.mode == "batch" else builder.in_streaming_mode()
t_env = TableEnvironment.create(builder.with_configuration(conf).build())

columns = "`key` BIGINT, `value` BIGINT, price DOUBLE, ts BIGINT"
if a.job == "J1":
    source = f"""'connector' = 'datagen',
      'number-of-rows' = '{a.rows}',
      'rows-per-second' = '1000000000',
      'fields.key.kind' = 'random', 'fields.key.min' = '0', 'fields.key.max' = '99999',
      'fields.value.kind' = 'random', 'fields.value.min' = '0', 'fields.value.max' = '999',
      'fields.price.kind' = 'random', 'fields.price.min' = '0', 'fields.price.max' = '100',
      'fields.ts.kind' = 'random', 'fields.ts.min' = '0', 'fields.ts.max' = '{max(a.rows - 1, 0)}'"""
else:
    source = f"""'connector' = 'filesystem', 'path' = '{a.csv}', 'format' = 'csv'"""
t_env.execute_sql(f"CREATE TEMPORARY TABLE events ({columns}) WITH ({source})")

if a.mode == "batch":
    shutil.rmtree(a.out, ignore_errors=True)
    sink = f"'connector' = 'filesystem', 'path' = '{a.out}', 'format' = 'csv'"
else:
    sink = "'connector' = 'blackhole'"
t_env.execute_sql(
    "CREATE TEMPORARY TABLE results (`key` BIGINT, cnt BIGINT, total BIGINT, lo BIGINT,"
    f" hi BIGINT, avg_price DOUBLE) WITH ({sink})")

query = """INSERT INTO results
  SELECT `key`, COUNT(*) AS cnt, SUM(`value`) AS total, MIN(`value`) AS lo,
         MAX(`value`) AS hi, AVG(price) AS avg_price
  FROM events WHERE `value` >= 10 GROUP BY `key`"""
start = time.perf_counter()
t_env.execute_sql(query).wait()
job_s = time.perf_counter() - start

rows_out = -1
if a.mode == "batch":
    rows_out = 0
    for f in glob.glob(os.path.join(a.out, "**", "*"), recursive=True):
        if os.path.isfile(f) and not os.path.basename(f).startswith((".", "_")):
            with open(f, "rb") as fh:
                rows_out += sum(1 for _ in fh)
print(f"RESULT job_s={job_s:.3f} rows_out={rows_out}", flush=True)

# Shut the JVM down (PythonGatewayServer exits at EOF on its stdin) and reap
# it; then leave without interpreter teardown, whose py4j finalizers would
# retry their connections to the gone JVM.
try:
    jg.get_gateway().shutdown()
except Exception:
    pass
for p in _procs:
    try:
        p.stdin.close()
        p.wait(timeout=60)
    except Exception:
        p.kill()
        p.wait()
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)
PY

# ---- measurements --------------------------------------------------------
results=$tmp/results.tsv
: >"$results"

# measure ENGINE JOB MODE ROWS COMMAND...: runs COMMAND under /usr/bin/time
# and appends a line to $results.
measure() {
  local engine=$1 job=$2 mode=$3 rows=$4
  shift 4
  local log="$tmp/$engine-$job-$mode"
  if ! /usr/bin/time -f '%e %U %S %M' -o "$log.time" "$@" >"$log.out" 2>"$log.err"; then
    echo "---- $engine $job $mode failed: $*" >&2
    tail -30 "$log.out" >&2
    tail -30 "$log.err" >&2
    die "$engine $job ($mode) failed (output above)"
  fi
  local wall user sys rss job_s rows_out
  read -r wall user sys rss <<<"$(tail -1 "$log.time")"
  if [ "$engine" = strata ]; then
    job_s=$(sed -nE "s/^Job '.*' \([0-9a-f]+\) FINISHED in ([0-9.]+) s.*/\1/p" "$log.out" | head -1)
    rows_out=$(grep -o 'rows out [0-9,]*' "$log.out" | head -1 | tr -dc 0-9)
    local rows_in
    rows_in=$(grep -o 'rows in [0-9,]*' "$log.out" | head -1 | tr -dc 0-9)
    [ -n "$job_s" ] || { cat "$log.out" >&2; die "strata $job: no 'FINISHED in ... s' in its summary"; }
    [ "$rows_in" = "$rows" ] || echo "== warning: strata $job read $rows_in rows, expected $rows" >&2
  else
    job_s=$(sed -nE 's/^RESULT job_s=([0-9.]+) .*/\1/p' "$log.out")
    rows_out=$(sed -nE 's/^RESULT .* rows_out=(-?[0-9]+).*/\1/p' "$log.out")
    [ -n "$job_s" ] || { tail -30 "$log.err" >&2; die "flink $job ($mode): the driver printed no RESULT line"; }
  fi
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' \
    "$engine" "$job" "$mode" "$rows" "$wall" "$user" "$sys" "$rss" "$job_s" "$rows_out" >>"$results"
  printf '   %-6s %-2s %-9s wall %7.2f s  job %7.2f s  cpu %7.2f s  peak RSS %6d MiB  rows out %s\n' \
    "$engine" "$job" "$mode" "$wall" "$job_s" "$(echo "$user $sys" | awk '{ print $1 + $2 }')" \
    "$((rss / 1024))" "$rows_out"
}

echo "== Flink $flink_version (PyFlink, $venv), $java_version, JAVA_HOME=$JAVA_HOME"
echo "== strata $strata; parallelism $parallelism; runs $runs; modes: $modes; jobs: $jobs"
echo "== J1: $rows_j1 datagen rows${j2_csv:+; J2-CSV: $j2_rows rows from $j2_csv}"
echo "== Flink JVM -Xmx$flink_heap, managed memory $flink_managed, mini-batch $([ "$minibatch" = 1 ] && echo on || echo off)"
export JVM_ARGS="-Xmx$flink_heap ${JVM_ARGS:-}"
echo "== Flink streaming mode writes to the blackhole connector (a GROUP BY's updates cannot go to an append-only filesystem sink)"
flink_run() {
  local job=$1 mode=$2 rows=$3
  measure flink "$job" "$mode" "$rows" \
    "$venv/bin/python" "$tmp/flink_job.py" --job "$job" --mode "$mode" --rows "$rows" \
    --csv "$j2_flink" --out "$root/target/out/bench-flink/flink-$job-$mode" \
    --parallelism "$parallelism" --managed "$flink_managed" --minibatch "$minibatch"
}
for r in $(seq "$runs"); do
  echo "== run $r of $runs"
  for job in $jobs; do
    if [ "$job" = J1 ]; then rows=$rows_j1; else rows=$j2_rows; fi
    measure strata "$job" - "$rows" "$strata" run "$tmp/$(echo "$job" | tr J j).toml" --no-progress
    for mode in $modes; do
      flink_run "$job" "$mode" "$rows"
    done
  done
done

# ---- report --------------------------------------------------------------
python3 - "$results" "$modes" "$jobs" <<'PY'
import statistics, sys
from collections import defaultdict

runs = defaultdict(list)
for line in open(sys.argv[1]):
    engine, job, mode, rows, wall, user, sys_, rss, job_s, rows_out = line.rstrip("\n").split("\t")
    runs[(engine, job, mode)].append(dict(
        rows=int(rows), wall=float(wall), cpu=float(user) + float(sys_),
        rss=int(rss) / 1024, job=float(job_s), out=int(rows_out)))
modes, jobs = sys.argv[2].split(), sys.argv[3].split()

def med(key, name):
    return statistics.median(r[name] for r in runs[key])

names = {"J1": "J1", "J2": "J2-CSV"}
print()
print(f"{'job':<7} {'engine':<7} {'mode':<10} {'rows':>11} {'wall s':>8} {'job s':>8} "
      f"{'M rows/s':>9} {'(job)':>8} {'CPU s':>8} {'M rows/CPU-s':>13} {'peak RSS':>10} {'rows out':>9}")
rows_for = []
for job in jobs:
    keys = [("strata", job, "-")] + [("flink", job, m) for m in modes]
    for key in keys:
        if key not in runs:
            continue
        rows = runs[key][0]["rows"]
        wall, job_s, cpu, rss = med(key, "wall"), med(key, "job"), med(key, "cpu"), med(key, "rss")
        out = runs[key][-1]["out"]
        mode = key[2] if key[0] == "flink" else "(one mode)"
        print(f"{names[job]:<7} {key[0]:<7} {mode:<10} {rows:>11,} {wall:>8.2f} {job_s:>8.2f} "
              f"{rows / wall / 1e6:>9.2f} {rows / job_s / 1e6:>8.2f} {cpu:>8.2f} "
              f"{rows / cpu / 1e6:>13.2f} {rss:>7.0f} MiB {out if out >= 0 else '-':>9}")
n = len(next(iter(runs.values())))
print(f"(medians of {n} runs; M rows/s = rows ÷ wall time of the process, (job) = rows ÷ the job's own time;"
      " rows out '-' = blackhole)")
print()
print("ratios strata ÷ Flink (throughput = Flink wall ÷ strata wall; > 1 means strata is faster,"
      " uses less CPU per row; peak RSS < 1 means strata uses less memory)")
print(f"{'':<18} {'throughput':>10} {'job thrpt':>10} {'rows/CPU-s':>11} {'peak RSS':>9}")
for job in jobs:
    s = ("strata", job, "-")
    for mode in modes:
        f = ("flink", job, mode)
        if s not in runs or f not in runs:
            continue
        label = f"{names[job]} {mode}"
        print(f"{label:<18} {med(f, 'wall') / med(s, 'wall'):>9.2f}x {med(f, 'job') / med(s, 'job'):>9.2f}x "
              f"{med(f, 'cpu') / med(s, 'cpu'):>10.2f}x {med(s, 'rss') / med(f, 'rss'):>8.2f}x")
PY

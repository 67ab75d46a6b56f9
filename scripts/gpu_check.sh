#!/usr/bin/env bash
# The GPU tier's device check, prepared here and run on a GPU machine.
#
#   scripts/gpu_check.sh build        # here: builds, strips and packs the binaries
#                                     # into target/gpu-check/ (~15 MB, xz)
#   scripts/gpu_check.sh run [OUT]    # on the GPU machine, from the repository root
#                                     # (carry target/gpu-check): writes OUT/gpu-check.log
#                                     # and OUT/calibration.json (OUT default: $OUT, else
#                                     # target/gpu-check/out)
#
# `run` does, in order, each step under its own timeout, and skips what is
# left once 7 minutes have passed (the whole check must fit in 8):
#   1. detection: nvidia-smi, the driver and NVRTC that strata finds, and
#      NVRTC compiling every kernel to PTX and to sm_80/sm_90 cubins;
#   2. every GPU equality test (tests/gpu_kernels.rs) alone, one at a time;
#   3. the same tests at 3,000,017 rows per column (STRATA_GPU_TEST_ROWS);
#   4. all of them at once, in parallel, on a cold kernel cache;
#   5. `strata bench --calibrate` (kernel rates, launch latency, link bandwidth);
#   6. examples/gpu_pipeline.toml with placement.mode=cpu and =gpu, timed
#      side by side, and =gpu again with one device batch in flight (what
#      overlapping the next batch's upload with this one's work buys);
#   7. compute-sanitizer memcheck over the filter and aggregation tests,
#      where the tool exists and the runtime lets it see the device.
# Each step's pass/fail goes into the log, with a summary at the end.
#
# NVRTC: strata finds libnvrtc.so.13 or .so.12 itself (the loader path,
# the CUDA toolkit, NVIDIA's Python wheels; see src/kernels/gpu/cuda/nvrtc.rs);
# the detection step prints which one it loaded.
set -euo pipefail
cd "$(dirname "$0")/.."
bundle=target/gpu-check
mode=${1:-}

case "$mode" in
build)
  target=${CARGO_TARGET_DIR:-target}
  cargo build --release --bin strata
  # The test binaries' paths, from cargo's JSON messages.
  tests=$(cargo test --release --test gpu_kernels --no-run --message-format json 2>/dev/null |
    python3 -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("profile", {}).get("test") and m.get("executable"):
        print(m["executable"])')
  rm -rf "$bundle"
  mkdir -p "$bundle/bin"
  cp "$target/release/strata" "$bundle/bin/strata"
  for t in $tests; do cp "$t" "$bundle/bin/gpu_kernels"; done
  strip "$bundle"/bin/*
  tar -C "$bundle" -cJf "$bundle/bin.tar.xz" bin
  rm -rf "$bundle/bin"
  ls -la "$bundle"
  echo "carry $bundle to the GPU machine and run: scripts/gpu_check.sh run"
  ;;
run)
  out=${2:-${OUT:-$bundle/out}}
  mkdir -p "$out"
  log="$out/gpu-check.log"
  : >"$log"
  work=$(mktemp -d)
  tar -C "$work" -xJf "$bundle/bin.tar.xz"
  bin="$work/bin"
  started=$(date +%s)
  results=()
  say() { echo "$*" | tee -a "$log"; }
  # step NAME TIMEOUT CMD...: runs CMD under TIMEOUT seconds unless the
  # check's time is up; records pass/fail.
  step() {
    local name=$1 limit=$2
    shift 2
    if (($(date +%s) - started > 420)); then
      say "== $name: SKIPPED (7 minutes spent)"
      results+=("SKIP $name")
      return 0
    fi
    say "== $name (timeout ${limit}s)"
    local t0 rc
    t0=$(date +%s.%N)
    set +e
    timeout "$limit" "$@" >>"$log" 2>&1
    rc=$?
    set -e
    local secs
    secs=$(python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.2f}')" "$t0" "$(date +%s.%N)")
    if ((rc == 0)); then
      results+=("PASS $name (${secs} s)")
    else
      results+=("FAIL $name (rc $rc, ${secs} s)")
    fi
    say "-- $name: rc $rc in ${secs} s"
  }

  export XDG_CACHE_HOME="$work/cache"

  step "detection" 60 bash -ec "nvidia-smi -L; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; \
    $bin/gpu_kernels --exact gpu_detection_never_panics_and_explains_an_absent_gpu --nocapture; \
    $bin/gpu_kernels --exact nvrtc_compiles_the_embedded_kernels_to_ptx_and_caches_them --nocapture; \
    $bin/gpu_kernels --exact nvrtc_compiles_the_embedded_kernels_to_cubins_and_caches_them --nocapture"
  for test in $("$bin/gpu_kernels" --list 2>/dev/null | sed -n 's/: test$//p' | grep '^gpu_'); do
    step "test $test" 60 "$bin/gpu_kernels" --exact "$test" --nocapture --test-threads 1
  done
  step "tests at 3,000,017 rows" 150 env STRATA_GPU_TEST_ROWS=3000017 "$bin/gpu_kernels" --nocapture --test-threads 1
  step "all tests in parallel, cold cache" 90 env XDG_CACHE_HOME="$work/cold" TMPDIR="$(mktemp -d)" \
    "$bin/gpu_kernels" --test-threads 16
  step "strata bench --calibrate" 120 "$bin/strata" bench --calibrate --output "$out/calibration.json"
  for placement in cpu gpu; do
    step "gpu_pipeline.toml, placement.mode=$placement" 90 "$bin/strata" run examples/gpu_pipeline.toml \
      --no-progress -D placement.mode="$placement" -D placement.calibration-file="$out/calibration.json"
  done
  # The same GPU run waiting for each device batch before the next: what
  # submitting the next batch before waiting (the default, 2) buys.
  step "gpu_pipeline.toml, placement.mode=gpu, batches-in-flight=1" 90 "$bin/strata" run \
    examples/gpu_pipeline.toml --no-progress -D placement.mode=gpu \
    -D taskmanager.gpu.batches-in-flight=1 -D placement.calibration-file="$out/calibration.json"
  if command -v compute-sanitizer >/dev/null 2>&1; then
    step "compute-sanitizer memcheck" 150 compute-sanitizer --tool memcheck --error-exitcode 9 \
      "$bin/gpu_kernels" --exact gpu_filter_equals_the_cpu_twin --exact gpu_aggregation_equals_the_cpu_twin \
      --exact gpu_fused_chains_equal_the_host_twin --exact gpu_chain_batches_in_flight_equal_the_host_twin \
      --exact gpu_aggregation_table_equals_the_host_twin --test-threads 1
  else
    results+=("SKIP compute-sanitizer (not installed)")
  fi
  say ""
  say "== summary ($(($(date +%s) - started)) s)"
  for r in "${results[@]}"; do say "$r"; done
  runs=$(grep -E "^Job |throughput|gpu offload|gpu chains|fused chain at|GPU copies at" "$log" || true)
  [[ -n "$runs" ]] && say "$runs"
  rm -rf "$work"
  ! printf '%s\n' "${results[@]}" | grep -q '^FAIL'
  ;;
*)
  echo "usage: scripts/gpu_check.sh build | run [OUT]" >&2
  exit 2
  ;;
esac

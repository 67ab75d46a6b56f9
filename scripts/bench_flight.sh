#!/usr/bin/env bash
# Flight output vs Parquet (strata's parquet_sink, then pyarrow.dataset),
# and the memory of a job whose trainer is slow: examples/ml/bench_flight.py.
set -euo pipefail
cd "$(dirname "$0")/.."
python="$(scripts/install_python_deps.sh | tail -n 1)"
cargo build --release --quiet
target_dir="${CARGO_TARGET_DIR:-target}"
exec "$python" examples/ml/bench_flight.py --strata "$target_dir/release/strata" "$@"

#!/usr/bin/env bash
# Makes the input files of the J2 benchmarks, from a fixed seed: 20M datagen
# rows (key, value, price, ts) as one CSV file with a header line and as one
# Parquet file (snappy, 20 row groups), under target/bench-data/:
#
#   target/bench-data/j2-csv/j2.csv
#   target/bench-data/j2-parquet/j2.parquet
#
#   scripts/gen_bench_data.sh [ROWS] [KEYS] [SEED]   (defaults 20000000 100000 7)
#
# Files that already hold the same rows are kept (a stamp file beside each).
set -euo pipefail
cd "$(dirname "$0")/.."
target=${CARGO_TARGET_DIR:-target}
cargo build --release --quiet --example gen_bench_data
"$target/release/examples/gen_bench_data" target/bench-data "${1:-20000000}" "${2:-100000}" "${3:-7}"

#!/usr/bin/env bash
# Runs the whole test suite: unit tests, integration tests through the CLI,
# and benchmarks compiled as tests. Uses cargo-nextest when installed.
set -euo pipefail
cd "$(dirname "$0")/.."
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --no-fail-fast "$@"
else
  cargo test --all-targets "$@"
fi

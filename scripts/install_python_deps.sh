#!/usr/bin/env bash
# Python for the ML example's and the web UI's CI tests: a virtual
# environment in target/py with examples/ml/requirements.txt (pyarrow,
# numpy) and tests/web_ui/requirements.txt (playwright, which drives the
# system's Chromium) from PyPI. Prints the interpreter's path on its last
# line.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=target/py
if ! "$venv/bin/python" -c "import pyarrow.flight, numpy, playwright" >/dev/null 2>&1; then
  if ! python3 -m venv --help >/dev/null 2>&1; then
    if command -v apt-get >/dev/null 2>&1; then
      apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null
    fi
  fi
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check \
    -r examples/ml/requirements.txt -r tests/web_ui/requirements.txt
fi
"$venv/bin/python" -c "import pyarrow, numpy; from importlib.metadata import version; print('pyarrow', pyarrow.__version__, 'numpy', numpy.__version__, 'playwright', version('playwright'))" >&2
echo "$PWD/$venv/bin/python"

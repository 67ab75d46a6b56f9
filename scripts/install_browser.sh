#!/usr/bin/env bash
# A headless browser for the web UI test (tests/web_ui.rs): Debian's
# `chromium` package, installed with apt when it is missing. Playwright
# drives it through `executable_path` (it cannot download its own browsers
# here). Idempotent: a machine that has it only prints its version.
# Prints the browser's path on its last line.
set -euo pipefail
browser="$(command -v chromium || true)"
if [[ -z "$browser" ]]; then
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "no chromium and no apt-get to install it" >&2
    exit 1
  fi
  sudo=""
  if [[ "$(id -u)" != 0 ]]; then sudo="sudo"; fi
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends \
    chromium fonts-dejavu-core >/dev/null
  browser="$(command -v chromium)"
fi
"$browser" --version >&2
echo "$browser"

#!/usr/bin/env bash
# Installs what `--features rdma` (the hardware verbs transport) needs to
# build: the libibverbs and librdmacm headers (rdma-sys generates its
# bindings from them and links both libraries), libclang for bindgen, and
# pkg-config, which rdma-sys' build script uses to find the libraries.
# libibverbs1 (the runtime library a --features rdma binary loads) comes
# with libibverbs-dev. The default build needs none of this.
#
# Idempotent and non-interactive: it touches the network only when a package
# is missing. Debian/Ubuntu (apt) only; run as root.
set -euo pipefail

PACKAGES=(
  libibverbs-dev
  librdmacm-dev
  libclang1-14
  libclang-common-14-dev
  pkg-config
)

missing=()
for pkg in "${PACKAGES[@]}"; do
  status="$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)"
  [[ "$status" == "install ok installed" ]] || missing+=("$pkg")
done

if ((${#missing[@]} > 0)); then
  echo "installing: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# bindgen finds libclang through LIBCLANG_PATH or the usual llvm directories;
# the Debian package puts it in /usr/lib/llvm-14/lib, which bindgen searches.
pkg-config --exists 'libibverbs >= 1.8.28' 'librdmacm >= 1.2.28'
echo "rdma build dependencies present: libibverbs $(pkg-config --modversion libibverbs), librdmacm $(pkg-config --modversion librdmacm)"

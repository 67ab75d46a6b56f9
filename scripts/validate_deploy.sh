#!/usr/bin/env bash
# Validates deploy/ and the Dockerfile without a cluster (deploy/README.md):
#
# - the Kubernetes manifests: the kustomize base and every overlay rendered
#   (by kustomize or `kubectl kustomize` when installed, and by the
#   fallback renderer in validate_deploy.py, which must agree), each
#   resource validated in strict mode against the Kubernetes schemas that
#   kubernetes-validate (PyPI) bundles, for the versions pinned below, plus
#   strata's own checks: known configuration keys, ports, probes, mounts,
#   the cluster secret;
# - the systemd units: `systemd-analyze verify` (any warning fails) and
#   their exposure scores, when systemd-analyze exists;
# - the container image: built only with STRATA_DEPLOY_BUILD_IMAGE=1 (it
#   compiles strata inside the image) and a container engine; otherwise the
#   Dockerfile is parsed with BuildKit's parser and linted only.
#
# The first run installs kubernetes-validate, PyYAML and dockerfile into
# target/deploy-venv; later runs need no network. Exits non-zero on any
# invalid manifest or unit.
set -euo pipefail
cd "$(dirname "$0")/.."

KUBERNETES_VALIDATE_VERSION=1.37.0
PYYAML_VERSION=6.0.3
# BuildKit's Dockerfile parser (Go, in the wheel).
DOCKERFILE_PARSER_VERSION=3.4.0
# Kubernetes versions whose schemas every resource must pass.
K8S_VERSIONS="${STRATA_K8S_VERSIONS:-1.32.0 1.37.0}"

venv=target/deploy-venv
py="$venv/bin/python"
installed() {
  "$py" -c "import yaml, dockerfile, importlib.metadata as m, kubernetes_validate.version as v
raise SystemExit((v.__version__, yaml.__version__, m.version('dockerfile'))
                 != ('$KUBERNETES_VALIDATE_VERSION', '$PYYAML_VERSION', '$DOCKERFILE_PARSER_VERSION'))" \
    >/dev/null 2>&1
}
if ! installed; then
  if ! python3 -m venv --help >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null
  fi
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check \
    "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION" "PyYAML==$PYYAML_VERSION" \
    "dockerfile==$DOCKERFILE_PARSER_VERSION"
  installed
fi

# kustomize renders what `kubectl apply -k` would apply; without one, the
# fallback renderer alone.
kustomize=""
if command -v kustomize >/dev/null 2>&1; then
  kustomize="kustomize build"
elif command -v kubectl >/dev/null 2>&1 && kubectl kustomize --help >/dev/null 2>&1; then
  kustomize="kubectl kustomize"
fi

# A strata binary, when one was built, also loads every configuration
# (`strata config`), which checks values as well as key names.
strata_bin="${STRATA_BIN:-}"
if [[ -z "$strata_bin" ]]; then
  for candidate in "${CARGO_TARGET_DIR:-target}"/{debug,release}/strata; do
    [[ -x "$candidate" ]] && strata_bin="$candidate" && break
  done
fi

echo "-- Kubernetes manifests"
"$py" scripts/validate_deploy.py --kustomize "$kustomize" --k8s-versions "$K8S_VERSIONS" --strata "$strata_bin"

echo "-- systemd units"
if command -v systemd-analyze >/dev/null 2>&1; then
  # verify checks that ExecStart's binary exists, so the units are verified
  # in a scratch root holding them, a stand-in /usr/local/bin/strata and
  # the host's own unit files (for the targets they name).
  root="$(mktemp -d)"
  trap 'rm -rf "$root"' EXIT
  mkdir -p "$root/usr/local/bin" "$root/etc/systemd/system" "$root/usr/lib/systemd"
  printf '#!/bin/sh\n' >"$root/usr/local/bin/strata"
  chmod 0755 "$root/usr/local/bin/strata"
  cp -a /usr/lib/systemd/system "$root/usr/lib/systemd/" 2>/dev/null || true
  cp deploy/systemd/*.service "$root/etc/systemd/system/"
  units=()
  for unit in deploy/systemd/*.service; do
    units+=("/etc/systemd/system/$(basename "$unit")")
  done
  # verify exits 0 on an unknown key or a value it could not parse (it
  # ignores the line), so anything it says is a failure.
  set +e
  said="$(systemd-analyze verify --root="$root" "${units[@]}" 2>&1)"
  status=$?
  set -e
  if [[ $status -ne 0 || -n "$said" ]]; then
    echo "$said" >&2
    echo "systemd-analyze verify failed on deploy/systemd" >&2
    exit 1
  fi
  echo "systemd-analyze verify ($(systemd-analyze --version | head -n 1)): ${#units[@]} units ok"
  for unit in "${units[@]}"; do
    systemd-analyze security --offline=yes --root="$root" "$unit" 2>/dev/null | tail -n 1 || true
  done
else
  echo "skipped: no systemd-analyze"
fi

echo "-- container image"
builder=""
for candidate in docker podman buildah; do
  if command -v "$candidate" >/dev/null 2>&1; then
    case "$candidate" in
      docker | podman) "$candidate" info >/dev/null 2>&1 && builder="$candidate" ;;
      buildah) builder=buildah ;;
    esac
  fi
  [[ -n "$builder" ]] && break
done
if [[ -z "$builder" ]]; then
  if command -v docker >/dev/null 2>&1; then
    echo "skipped: no container builder (a docker client, but no engine answers)"
  else
    echo "skipped: no container builder"
  fi
elif [[ "${STRATA_DEPLOY_BUILD_IMAGE:-0}" != 1 ]]; then
  echo "skipped: $builder is there; STRATA_DEPLOY_BUILD_IMAGE=1 builds the image (compiles strata inside it)"
else
  case "$builder" in
    buildah) buildah bud --layers -t strata:validate --target runtime . ;;
    *) DOCKER_BUILDKIT=1 "$builder" build -t strata:validate --target runtime . ;;
  esac
  "$builder" run --rm strata:validate --version
  echo "image strata:validate built and runs"
fi

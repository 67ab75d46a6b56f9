#!/usr/bin/env bash
# Installs the two CUDA tools that CI needs to compile the kernels in
# kernels/*.cu without a GPU or a CUDA toolkit: NVRTC (CUDA C++ → PTX, loaded
# by tests/kernels_nvrtc.rs through ctypes and by strata itself) and ptxas
# (PTX → sm_80/sm_90 cubins). NVRTC 13 comes too: strata finds and loads
# libnvrtc.so.13 on CUDA 13 machines, and a unit test compiles with both.
# Both come from NVIDIA's PyPI wheels. Versions are pinned so that the PTX ISA
# CI checks is the one the runtime compiles; the script is idempotent and
# touches the network only when a pinned version is missing.
set -euo pipefail

NVRTC_VERSION="12.9.86"
NVCC_VERSION="12.9.86"
NVRTC13_VERSION="13.0.88"
PYTHON="${PYTHON:-python3}"

installed_version() {
  "$PYTHON" -c 'import sys
from importlib.metadata import version, PackageNotFoundError
try:
    print(version(sys.argv[1]))
except PackageNotFoundError:
    pass' "$1"
}

wanted=()
[[ "$(installed_version nvidia-cuda-nvrtc-cu12)" == "$NVRTC_VERSION" ]] ||
  wanted+=("nvidia-cuda-nvrtc-cu12==$NVRTC_VERSION")
[[ "$(installed_version nvidia-cuda-nvrtc)" == "$NVRTC13_VERSION" ]] ||
  wanted+=("nvidia-cuda-nvrtc==$NVRTC13_VERSION")
[[ "$(installed_version nvidia-cuda-nvcc-cu12)" == "$NVCC_VERSION" ]] ||
  wanted+=("nvidia-cuda-nvcc-cu12==$NVCC_VERSION")

if ((${#wanted[@]} > 0)); then
  # CI runs as root; pip's warning about that is noise here.
  PIP_ROOT_USER_ACTION=ignore "$PYTHON" -m pip install --quiet \
    --disable-pip-version-check "${wanted[@]}"
fi

"$PYTHON" - <<'PY'
import glob, os
import nvidia.cuda_nvrtc, nvidia.cuda_nvcc
# The wheels install namespace packages: no __file__, only __path__.
nvrtc = glob.glob(os.path.join(list(nvidia.cuda_nvrtc.__path__)[0], "lib", "libnvrtc.so*"))
ptxas = os.path.join(list(nvidia.cuda_nvcc.__path__)[0], "bin", "ptxas")
assert nvrtc, "libnvrtc.so not found in the nvidia-cuda-nvrtc-cu12 wheel"
import nvidia.cu13
nvrtc13 = glob.glob(os.path.join(list(nvidia.cu13.__path__)[0], "lib", "libnvrtc.so.13"))
assert nvrtc13, "libnvrtc.so.13 not found in the nvidia-cuda-nvrtc wheel"
assert os.access(ptxas, os.X_OK), f"ptxas not executable at {ptxas}"
print(f"cuda tools: nvrtc {sorted(nvrtc)[0]} and {nvrtc13[0]}, ptxas {ptxas}")
PY

#!/usr/bin/env bash
# Installs the pinned CUDA 13.0 compiler wheels into .toolchain/ (git-ignored): nvcc, ptxas,
# cicc (nvvm), the CUDA runtime headers, CCCL, and cuobjdump and nvdisasm 13.2.51 (no 13.0
# build of those wheels exists; 13.2.51 reads 13.0 fatbins; cuobjdump runs nvdisasm to print
# SASS). 13.0 matches the driver (580) of the project's
# GPU machines: a newer nvcc makes PTX that driver cannot load.
#
# Idempotent: a stamp records the versions installed; a second run with the same pins returns
# at once. build.rs finds nvcc at .toolchain/nvidia/cu13/bin/nvcc.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=.toolchain
PINS=(
  nvidia-cuda-nvcc==13.0.88
  nvidia-cuda-crt==13.0.88
  nvidia-nvvm==13.0.88
  nvidia-cuda-runtime==13.0.96
  nvidia-cuda-cccl==13.0.85
  nvidia-cuda-cuobjdump==13.2.51
  nvidia-cuda-nvdisasm==13.2.51
)
STAMP="$DEST/.installed"
WANT="${PINS[*]}"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ] && [ -x "$DEST/nvidia/cu13/bin/nvcc" ]; then
  echo "cuda toolchain: already installed in $DEST"
  exit 0
fi
rm -rf "$DEST"
mkdir -p "$DEST"
PY=$(command -v python3 || command -v python)
"$PY" -m pip install --quiet --disable-pip-version-check --no-deps --target "$DEST" "${PINS[@]}"
"$DEST/nvidia/cu13/bin/nvcc" --version | tail -2
echo "$WANT" > "$STAMP"
echo "cuda toolchain: installed in $DEST"

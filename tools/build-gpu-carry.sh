#!/usr/bin/env bash
# Builds what tools/gpu-check.sh needs on the GPU machine (which has no cargo) into carry/
# (git-ignored): the stripped `reel` binary and the stripped test binary of tests/cpu (the
# kernel tests, the hardware self-test). Run on the development machine with the CUDA
# toolchain installed (tools/install-cuda-toolchain.sh), then take carry/ to the GPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
export REEL_REQUIRE_NVCC=1
cargo build --release --bin reel
test_bin=$(cargo test --release --test cpu --no-run --message-format=json 2>/dev/null |
  python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "cpu":
        print(m["executable"])')
rm -rf carry
mkdir -p carry
cp target/release/reel carry/reel
cp "$test_bin" carry/cpu-tests
strip carry/reel carry/cpu-tests
git rev-parse --short=12 HEAD > carry/COMMIT
du -ch carry/* | tail -1

#!/usr/bin/env bash
# Builds what tools/gpu-check.sh needs on the GPU machine (which has no cargo) into carry/
# (git-ignored): the stripped `reel` binary and the stripped test binary of tests/cpu (the
# kernel tests, the hardware self-test), gzipped (reel.gz, cpu-tests.gz). Run on the development machine with the CUDA
# toolchain installed (tools/install-cuda-toolchain.sh), then take carry/ to the GPU machine
# (the device tool: carry ["carry"]).
#
# Fails, naming the sizes, when what would travel (the working tree's tracked and untracked,
# not ignored files, plus carry/) exceeds the 64 MiB the device tool takes. Compile errors
# are shown as cargo prints them.
set -euo pipefail
cd "$(dirname "$0")/.."
LIMIT=$((64 * 1024 * 1024))
export REEL_REQUIRE_NVCC=${REEL_REQUIRE_NVCC:-1}
cargo build --release --bin reel
# Diagnostics go to stderr as cargo renders them; stdout carries the artifacts as JSON.
test_bin=$(cargo test --release --test cpu --no-run --message-format=json-render-diagnostics |
  python3 -c 'import json,sys
for l in sys.stdin:
    try:
        m = json.loads(l)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "cpu":
        print(m["executable"])')
if [ -z "$test_bin" ] || [ ! -x "$test_bin" ]; then
  echo "build-gpu-carry: cargo made no test binary for tests/cpu" >&2
  exit 1
fi
rm -rf carry
mkdir -p carry
cp target/release/reel carry/reel
cp "$test_bin" carry/cpu-tests
strip carry/reel carry/cpu-tests
# Compressed (about 2.2x: the binaries embed the fatbins and the demo model):
# tools/gpu-check.sh unpacks them into a temporary folder before it starts.
gzip -6 carry/reel carry/cpu-tests
git rev-parse --short=12 HEAD > carry/COMMIT
git diff --quiet HEAD 2>/dev/null || echo "(with uncommitted changes)" >> carry/COMMIT
python3 - "$LIMIT" <<'PY'
import os, subprocess, sys
limit = int(sys.argv[1])
files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                       capture_output=True, check=True).stdout.split(b"\0")
tree = sum(os.path.getsize(f) for f in files if f and os.path.isfile(f))
carry = sum(os.path.getsize(os.path.join("carry", f)) for f in os.listdir("carry"))
mib = lambda b: b / 2**20
print(f"carry/: {mib(carry):.1f} MiB; working tree: {mib(tree):.1f} MiB; together {mib(carry + tree):.1f} MiB of {mib(limit):.0f}")
if carry + tree > limit:
    for f in sorted(os.listdir("carry")):
        print(f"  carry/{f}: {mib(os.path.getsize(os.path.join('carry', f))):.1f} MiB", file=sys.stderr)
    sys.exit(f"build-gpu-carry: {mib(carry + tree):.1f} MiB would travel, more than the device tool's {mib(limit):.0f} MiB")
PY

#!/usr/bin/env python3
"""Times reel's CPU DiT forward beside diffusers' on the same machine, same weights, same
inputs, in one run (the issue's config: dim 256 = 4 heads of 64, 4 layers, ffn 1024,
text 64x256, latents [1, 16, 5, 32, 32] = 1,280 tokens).

Both are timed the same way: an in-process forward, warmed up, wall clock around the
forward alone. diffusers runs in this process with torch at 2 threads; reel runs as
`reel component dit --repeat 2` (model loaded once, one warm-up forward, then the timed
one, which it reports). Rounds alternate diffusers and reel; the medians are reported.

    cargo build --release
    /tmp/reel-golden/bin/python tools/bench_dit_cpu.py [--rounds 9] [--threads 2]
"""
import argparse
import json
import os
import statistics
import subprocess
import tempfile
import time

import torch
from safetensors.torch import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
REEL = os.path.join(HERE, "..", "target", "release", "reel")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=6, help="diffusers forwards before timing")
    ap.add_argument("--reel", default=REEL)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    cfg = dict(num_attention_heads=4, attention_head_dim=64, in_channels=16, out_channels=16,
               text_dim=256, freq_dim=256, ffn_dim=1024, num_layers=4)
    model = WanTransformer3DModel(**cfg).eval()
    work = tempfile.mkdtemp(prefix="reel-bench-")
    model.save_pretrained(os.path.join(work, "transformer"), safe_serialization=True)
    x = torch.randn(1, 16, 5, 32, 32)
    t = torch.tensor([500.0])
    ctx = torch.randn(1, 64, 256)
    inp = os.path.join(work, "input.safetensors")
    save_file({"hidden_states": x, "timestep": t, "encoder_hidden_states": ctx}, inp)

    def torch_forward():
        with torch.no_grad():
            start = time.perf_counter()
            model(hidden_states=x, timestep=t, encoder_hidden_states=ctx, return_dict=False)
            return time.perf_counter() - start

    def reel_forward():
        cmd = [args.reel, "--threads", str(args.threads), "component", "dit", "--model", work,
               "--input", inp, "--output", os.path.join(work, "out.safetensors"), "--repeat", "2"]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        return json.loads(out.strip().splitlines()[-1])["forward_seconds"][-1]

    # torch keeps speeding up over its first few forwards (allocator, oneDNN primitive
    # caches): measured 175-185 ms for the first runs, then ~125 ms. Warm it up fully.
    for _ in range(args.warmup):
        torch_forward()
    ours, theirs = [], []
    for _ in range(args.rounds):
        theirs.append(torch_forward())
        ours.append(reel_forward())
    mt, mr = statistics.median(theirs), statistics.median(ours)
    if os.environ.get("REEL_BENCH_VERBOSE"):
        print("diffusers ms:", [round(v * 1e3, 1) for v in theirs])
        print("reel ms:     ", [round(v * 1e3, 1) for v in ours])
    print(f"diffusers {torch.__version__}/{__import__('diffusers').__version__}, {args.threads} threads: "
          f"median {mt * 1e3:.1f} ms over {args.rounds} runs")
    print(f"reel cpu, {args.threads} threads: median {mr * 1e3:.1f} ms over {args.rounds} runs")
    print(f"speed-up: {mt / mr:.2f}x")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""The same denoising step timed by diffusers and by `reel bench`, on one machine in one run,
so the ratio is measured rather than quoted.

diffusers: the pipeline's WanTransformer3DModel run in this process, two forward passes per
step (conditional and unconditional, as WanPipeline does with guidance > 1) on the same
latent shape and 512 text tokens; torch on the GPU when there is one (SDPA), else the CPU
with --threads threads. reel: `reel bench --model DIR --json -` with the same size, frames
and step count. Both report the median step after warm-up.

    /tmp/reel-golden/bin/python tools/compare_torch.py --model tests/data/pipeline_tiny --size 48x32 --frames 5
"""
import argparse
import json
import os
import statistics
import subprocess
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
REEL = os.path.join(HERE, "..", "target", "release", "reel")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True, help="pipeline folder (transformer/ and vae/)")
    ap.add_argument("--size", default="832x480")
    ap.add_argument("--frames", type=int, default=81)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reel", default=REEL)
    ap.add_argument("--reel-device", default="cpu")
    args = ap.parse_args()
    from diffusers import WanTransformer3DModel

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    torch.set_num_threads(args.threads)
    # Built from config.json and loaded from the safetensors directly (from_pretrained needs
    # accelerate for this model's fp32-kept modules).
    from safetensors.torch import load_file
    tdir = os.path.join(args.model, "transformer")
    with open(os.path.join(tdir, "config.json")) as f:
        config = {k: v for k, v in json.load(f).items() if not k.startswith("_")}
    model = WanTransformer3DModel(**config)
    state = {}
    for name in sorted(os.listdir(tdir)):
        if name.endswith(".safetensors"):
            state.update(load_file(os.path.join(tdir, name)))
    model.load_state_dict(state, strict=True)
    model = model.to(device=device, dtype=dtype).eval()
    cfg = model.config
    w, h = (int(v) for v in args.size.lower().split("x"))
    w16, h16 = -(-w // 16) * 16, -(-h // 16) * 16
    t = (args.frames - 1) // 4 + 1
    x = torch.randn(1, cfg.in_channels, t, h16 // 8, w16 // 8, device=device, dtype=dtype)
    ctx = torch.randn(1, 512, cfg.text_dim, device=device, dtype=dtype)
    neg = torch.randn(1, 512, cfg.text_dim, device=device, dtype=dtype)
    ts = torch.tensor([500], device=device)

    def step():
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.no_grad():
            model(hidden_states=x, timestep=ts, encoder_hidden_states=ctx, return_dict=False)
            model(hidden_states=x, timestep=ts, encoder_hidden_states=neg, return_dict=False)
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start

    for _ in range(args.warmup):
        step()
    theirs = statistics.median(step() for _ in range(args.steps))
    cmd = [args.reel, "-q", "--threads", str(args.threads), "bench", "--model", args.model, "--size", args.size,
           "--frames", str(args.frames), "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--device", args.reel_device, "--json", "-"]
    report = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    ours = report["step_seconds"]["median"]
    flops = report["flops_per_step"]
    print(f"diffusers {torch.__version__}/{__import__('diffusers').__version__} on {device} ({dtype}): "
          f"{theirs * 1e3:.2f} ms/step, {flops / theirs / 1e12:.4f} TFLOP/s")
    print(f"reel on {report['device']}: {ours * 1e3:.2f} ms/step, {report['achieved_tflops']:.4f} TFLOP/s "
          f"({report['tokens_per_second']:.0f} tokens/s)")
    print(f"reel / diffusers speed: {theirs / ours:.2f}x")


if __name__ == "__main__":
    main()

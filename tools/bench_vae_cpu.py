#!/usr/bin/env python3
"""Times reel's CPU VAE decode beside diffusers' on the same machine, model and latents, in
one run: the golden tiny VAE tests/data/vae_a decoding latents [1, 4, 3, 8, 12] (9 frames of
64x96), the config of bench/cpu_vae.rs.

Both are timed the same way: an in-process decode, warmed up, wall clock around the decode
alone. diffusers runs in this process (torch at 2 threads); reel runs as
`reel component vae-decode --repeat 2` (model loaded once, one warm-up decode, then the timed
one, which it reports). Rounds alternate diffusers and reel; the medians are reported.

    cargo build --release
    /tmp/reel-golden/bin/python tools/bench_vae_cpu.py [--rounds 9] [--threads 2]
"""
import argparse
import json
import os
import statistics
import subprocess
import tempfile
import time

import torch
from safetensors.torch import load_file, save_file

HERE = os.path.dirname(os.path.abspath(__file__))
REEL = os.path.join(HERE, "..", "target", "release", "reel")
MODEL = os.path.join(HERE, "..", "tests", "data", "vae_a")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--reel", default=REEL)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from diffusers import AutoencoderKLWan

    vdir = os.path.join(MODEL, "vae")
    with open(os.path.join(vdir, "config.json")) as f:
        cfg = {k: v for k, v in json.load(f).items() if not k.startswith("_")}
    model = AutoencoderKLWan(**cfg).eval()
    model.load_state_dict(load_file(os.path.join(vdir, "diffusion_pytorch_model.safetensors")), strict=True)
    torch.manual_seed(0)
    z = torch.randn(1, 4, 3, 8, 12)
    work = tempfile.mkdtemp(prefix="reel-bench-vae-")
    inp = os.path.join(work, "latents.safetensors")
    save_file({"latents": z}, inp)

    def torch_decode():
        with torch.no_grad():
            start = time.perf_counter()
            model.decode(z)
            return time.perf_counter() - start

    def reel_decode():
        cmd = [args.reel, "--threads", str(args.threads), "component", "vae-decode", "--model", MODEL,
               "--input", inp, "--output", os.path.join(work, "out.safetensors"), "--repeat", "2"]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        return json.loads(out.strip().splitlines()[-1])["forward_seconds"][-1]

    for _ in range(args.warmup):
        torch_decode()
    ours, theirs = [], []
    for _ in range(args.rounds):
        theirs.append(torch_decode())
        ours.append(reel_decode())
    mt, mr = statistics.median(theirs), statistics.median(ours)
    if os.environ.get("REEL_BENCH_VERBOSE"):
        print("diffusers ms:", [round(v * 1e3, 2) for v in theirs])
        print("reel ms:     ", [round(v * 1e3, 2) for v in ours])
    print(f"diffusers {torch.__version__}/{__import__('diffusers').__version__}, {args.threads} threads: "
          f"median {mt * 1e3:.2f} ms over {args.rounds} runs")
    print(f"reel cpu, {args.threads} threads: median {mr * 1e3:.2f} ms over {args.rounds} runs")
    print(f"speed-up: {mt / mr:.2f}x")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""reel's CPU device beside PyTorch (diffusers / transformers) at Wan2.1's real dimensions,
on the same machine, weights and inputs, in one run.

Random weights at the real configs are made once by PyTorch under a cache folder (default
~/.cache/reel/bench-real, or --cache / $REEL_BENCH_CACHE) and reused by later runs:

    dit      Wan2.1-T2V-1.3B's transformer (30 layers, dim 1536, 12 heads of 128, ffn 8960,
             text 4096), f32, 5.7 GB
    dit1     the same with one layer (for 480p's 32,760 tokens)
    vae      AutoencoderKLWan with its defaults, which are Wan2.1's (base 96, mults 1,2,4,4)
    umt5     umT5 at XXL width (d_model 4096, 64 heads of 64, d_ff 10240) with two layers and
             a 32,128-token vocabulary (the vocabulary changes nothing but the table's size)

Rows (--rows, comma separated; default all but dit1:32760):

    dit:N        one DiT forward, N video tokens + 512 text tokens (N: 256, 2304, ...)
    step:N       one guided denoising step at N video tokens: diffusers' WanPipeline runs two
                 batch-1 forwards (prompt, negative prompt); reel one batch-2 forward with the
                 text's cross-attention K/V made once per generation (`--text-once`)
    dit1:N       one forward of the one-layer model (dit1:32760 is 480p x 81 frames)
    vae-decode   latents [1,16,3,12,16] -> 9 frames of 96x128
    vae-encode   9 frames of 96x128 -> latents
    umt5         batch 2 x 512 tokens, padded (valid lengths 120 and 40)

Both sides are timed the same way: an in-process forward, warmed up, wall clock around the
forward alone, --threads threads. PyTorch runs in this process; reel runs as
`reel component KIND --repeat 2` (model loaded once, one warm-up forward, then the timed one).
Rounds alternate the two; medians are reported, and a JSON line per row with --json FILE.
Each row also reports how far reel's output is from PyTorch's (relative L2 and max |diff|),
so a speed-up that costs accuracy shows.
--breakdown adds where the time goes: reel's per-op timers of its last run (`--profile`: op
classes, and every GEMM, attention and VAE convolution by shape) and PyTorch's time per
leaf-module class (forward hooks) over one more forward.

    cargo build --release
    /tmp/reel-golden/bin/python tools/bench_real_cpu.py [--rows dit:256,vae-decode] [--rounds 3]
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
from safetensors.torch import load_file, save_file

HERE = os.path.dirname(os.path.abspath(__file__))
REEL = os.path.join(HERE, "..", "target", "release", "reel")
TEXT_LEN = 512

DIT_CFG = dict(num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
               text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
               qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024, patch_size=(1, 2, 2))
UMT5_CFG = dict(vocab_size=32128, d_model=4096, d_kv=64, num_heads=64, d_ff=10240, num_layers=2,
                relative_attention_num_buckets=32, relative_attention_max_distance=128,
                layer_norm_epsilon=1e-6)
# latents [1, 16, F, H, W] for a number of video tokens (patch 1x2x2)
DIT_LATENTS = {256: (1, 32, 32), 1024: (1, 64, 64), 2304: (4, 48, 48), 32760: (21, 60, 104)}


def cache_dir(args, name, cfg):
    """The folder of one model; made (by PyTorch, random weights) when missing or stale."""
    path = os.path.join(args.cache, name)
    stamp = os.path.join(path, "bench-config.json")
    want = json.dumps(cfg, sort_keys=True, default=str)
    if os.path.exists(stamp) and open(stamp).read() == want:
        return path
    print(f"making random weights for {name} under {path} (once)", file=sys.stderr, flush=True)
    torch.manual_seed(0)
    if name.startswith("dit"):
        from diffusers import WanTransformer3DModel
        model = WanTransformer3DModel(**cfg)
        sub = "transformer"
    elif name == "vae":
        from diffusers import AutoencoderKLWan
        model = AutoencoderKLWan(**cfg)
        sub = "vae"
    else:
        from transformers import UMT5Config, UMT5EncoderModel
        model = UMT5EncoderModel(UMT5Config(feed_forward_proj="gated-gelu", dropout_rate=0.0,
                                            is_encoder_decoder=False, **cfg))
        sub = "text_encoder"
    model.save_pretrained(os.path.join(path, sub), safe_serialization=True)
    del model
    with open(stamp, "w") as f:
        f.write(want)
    return path


def load(args, name):
    """(cache folder, component folder, PyTorch model in eval mode) of one cached model."""
    if name in ("dit", "dit1"):
        from diffusers import WanTransformer3DModel as cls
        cfg, sub = dict(DIT_CFG, num_layers=1 if name == "dit1" else DIT_CFG["num_layers"]), "transformer"
    elif name == "vae":
        from diffusers import AutoencoderKLWan as cls
        cfg, sub = {}, "vae"
    else:
        from transformers import UMT5EncoderModel
        root = cache_dir(args, name, UMT5_CFG)
        folder = os.path.join(root, "text_encoder")
        return root, folder, UMT5EncoderModel.from_pretrained(folder, torch_dtype=torch.float32).eval()
    root = cache_dir(args, name, cfg)
    folder = os.path.join(root, sub)
    # from_config + load_state_dict(assign): diffusers' from_pretrained wants `accelerate`
    # for models with float32-kept modules.
    model = cls.from_config(cls.load_config(folder))
    model.load_state_dict(load_file(os.path.join(folder, "diffusion_pytorch_model.safetensors")),
                          strict=True, assign=True)
    return root, folder, model.float().eval()


def row_setup(args, row, models, work):
    """(PyTorch forward returning its output, reel component kind, reel's extra flags, input
    file, reel's model folder, PyTorch module, the name of reel's output tensor) of one row."""
    kind, _, n = row.partition(":")
    gen = torch.Generator().manual_seed(1)
    inp = os.path.join(work, row.replace(":", "_") + ".safetensors")
    if kind in ("dit", "step", "dit1"):
        name = "dit1" if kind == "dit1" else "dit"
        n = int(n)
        if n not in DIT_LATENTS:
            raise SystemExit(f"{row}: video tokens must be one of {sorted(DIT_LATENTS)}")
        f, h, w = DIT_LATENTS[n]
        root, folder, model = models(name)
        batch = 2 if kind == "step" else 1
        x = torch.randn(1, 16, f, h, w, generator=gen)
        t = torch.tensor([500.0])
        ctx = torch.randn(batch, TEXT_LEN, 4096, generator=gen)
        save_file({"hidden_states": x.expand(batch, -1, -1, -1, -1).contiguous(),
                   "timestep": t.expand(batch).contiguous(), "encoder_hidden_states": ctx}, inp)

        def fwd():
            with torch.no_grad():  # WanPipeline: one call per guidance pass
                return torch.cat([model(hidden_states=x, timestep=t,
                                        encoder_hidden_states=ctx[b:b + 1], return_dict=False)[0]
                                  for b in range(batch)])
        extra = ["--text-once"] if kind == "step" else []
        return fwd, "dit", extra, inp, folder, model, "sample"
    if kind in ("vae-decode", "vae-encode"):
        root, folder, model = models("vae")
        if kind == "vae-decode":
            z = torch.randn(1, 16, 3, 12, 16, generator=gen)
            save_file({"latents": z}, inp)

            def fwd():
                with torch.no_grad():
                    return model.decode(z).sample
        else:
            s = torch.rand(1, 3, 9, 96, 128, generator=gen) * 2 - 1
            save_file({"sample": s}, inp)

            def fwd():
                with torch.no_grad():
                    return model.encode(s).latent_dist.mean
        key = "decoded" if kind == "vae-decode" else "latent_mean"
        return fwd, kind, [], inp, folder, model, key
    if kind == "umt5":
        root, folder, model = models("umt5")
        ids = torch.randint(3, UMT5_CFG["vocab_size"], (2, TEXT_LEN), generator=gen)
        mask = torch.zeros(2, TEXT_LEN, dtype=torch.int64)
        for b, valid in enumerate((120, 40)):
            mask[b, :valid] = 1
            ids[b, valid - 1] = 1
            ids[b, valid:] = 0
        save_file({"input_ids": ids, "attention_mask": mask}, inp)

        def fwd():
            with torch.no_grad():
                return model(input_ids=ids, attention_mask=mask).last_hidden_state
        return fwd, "text-encoder", [], inp, folder, model, "last_hidden_state"
    raise SystemExit(f"unknown row {row!r}")


def timed(f):
    start = time.perf_counter()
    f()
    return time.perf_counter() - start


def torch_breakdown(model, fwd):
    """Seconds per leaf-module class over one forward (forward hooks on every leaf module;
    time outside leaves, e.g. functional attention and elementwise ops, is "other")."""
    spent, started, hooks = {}, {}, []
    for name, mod in model.named_modules():
        if any(True for _ in mod.children()):
            continue
        cls = type(mod).__name__

        def pre(_m, _i, name=name):
            started[name] = time.perf_counter()

        def post(_m, _i, _o, name=name, cls=cls):
            spent[cls] = spent.get(cls, 0.0) + time.perf_counter() - started[name]
        hooks.append(mod.register_forward_pre_hook(pre))
        hooks.append(mod.register_forward_hook(post))
    total = timed(fwd)
    for h in hooks:
        h.remove()
    spent["other"] = total - sum(spent.values())
    return {k: round(v, 3) for k, v in sorted(spent.items(), key=lambda kv: -kv[1])}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", default="dit:256,step:256,dit:2304,vae-decode,vae-encode,umt5")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=2, help="PyTorch forwards before timing")
    ap.add_argument("--cache", default=os.environ.get(
        "REEL_BENCH_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "reel", "bench-real")))
    ap.add_argument("--reel", default=REEL)
    ap.add_argument("--json", help="append one JSON line per row to this file")
    ap.add_argument("--breakdown", action="store_true")
    ap.add_argument("--breakdown-top", type=int, default=12, help="reel's slowest labelled calls shown")
    ap.add_argument("--prepare", action="store_true", help="make the cached models, then exit")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.makedirs(args.cache, exist_ok=True)
    work = os.path.join(args.cache, "inputs")
    os.makedirs(work, exist_ok=True)
    loaded = {}
    if args.prepare:
        cache_dir(args, "vae", {})
        cache_dir(args, "umt5", UMT5_CFG)
        cache_dir(args, "dit1", dict(DIT_CFG, num_layers=1))
        cache_dir(args, "dit", DIT_CFG)
        return

    def models(name):
        if name not in loaded:
            loaded.clear()  # one model in memory at a time
            loaded[name] = load(args, name)
        return loaded[name]

    print(f"torch {torch.__version__}, {args.threads} threads, {args.rounds} alternating rounds, "
          f"medians", flush=True)
    for row in args.rows.split(","):
        fwd, kind, extra, inp, folder, model, key = row_setup(args, row, models, work)

        def reel():
            cmd = [args.reel, "--threads", str(args.threads), "component", kind, "--model", folder,
                   "--input", inp, "--output", os.path.join(work, "out.safetensors"),
                   "--repeat", "2", *extra, *(["--profile"] if args.breakdown else [])]
            run = subprocess.run(cmd, capture_output=True, text=True)
            if run.returncode != 0:
                raise SystemExit(f"{' '.join(cmd)} failed:\n{run.stderr}")
            lines = run.stdout.strip().splitlines()
            line = json.loads(lines[-1])
            return line["forward_seconds"][-1], line.get("profile")

        want = fwd()  # the first warm-up forward; reel's output is checked against it
        for _ in range(args.warmup - 1):
            fwd()
        theirs, ours, prof = [], [], None
        for _ in range(args.rounds):
            theirs.append(timed(fwd))
            s, prof = reel()
            ours.append(s)
        mt, mr = statistics.median(theirs), statistics.median(ours)
        print(f"{row:12} torch {mt:8.3f} s   reel {mr:8.3f} s   torch/reel {mt / mr:5.2f}   "
              f"(torch {[round(v, 3) for v in theirs]}, reel {[round(v, 3) for v in ours]})",
              flush=True)
        rec = {"row": row, "torch_s": theirs, "reel_s": ours, "torch_median_s": mt,
               "reel_median_s": mr, "ratio": mt / mr, "threads": args.threads,
               "torch": torch.__version__}
        # The same output from both: reel's last run against PyTorch's warm-up forward.
        got = load_file(os.path.join(work, "out.safetensors"))[key].reshape(want.shape)
        rec["rel_l2"] = float((got.double() - want.double()).norm() / want.double().norm())
        rec["max_abs"] = float((got - want).abs().max())
        print(f"  accuracy: rel L2 {rec['rel_l2']:.2e}, max |diff| {rec['max_abs']:.2e}", flush=True)
        if args.breakdown:
            rec["torch_modules_s"] = torch_breakdown(model, fwd)
            rec["reel_profile"] = prof
            print("  torch, s per leaf-module class:", rec["torch_modules_s"])
            print("  reel, s per op:", {o["op"]: round(o["seconds"], 3) for o in prof["ops"]})
            for lab in prof["labels"][:args.breakdown_top]:
                print(f"    reel {lab['label']:44} {lab['calls']:5} calls {lab['seconds']:8.3f} s "
                      f"{lab['gflops']:7.1f} GFLOP/s")
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""reel's kernels beside torch's, on the same GPU, the same inputs, in the same run
(tools/gpu-check.sh runs it on the GPU machine).

Attention: for each shape (head_dim 128; L = 4,096, 16,384, 32,760, 75,600; 12 and 40 heads;
batch 1 and 2; the issue's goal shape, L = 32,760 with 12 heads, first after the smallest)
it runs `reel kernel-bench attention` twice, with the kernel the runtime picks (on sm_90 the
Hopper kernel, kernels/attention.sm90.cu) and with the mma.sync kernel (kernels/attention.cu)
(the inputs made on the device by fill_hash_bf16, the kernel timed alone, a sample of the
output at hashed positions in its JSON), builds the same inputs in torch with the same hash,
times SDPA (it picks cuDNN or flash attention on an H100) on contiguous [B, H, L, d]
tensors, and reports the three times, TFLOP/s from 4·Lq·Lk·d per (sample, head), the
ratios, and the relative L2 difference of each of reel's sampled outputs from torch's at
the same positions.

GEMM: the Wan2.1 DiT's GEMMs (1.3B at 480p, 14B at 720p, one guidance pass of tokens) through
reel's runtime GEMM (cuBLASLt where loaded) and reel's own kernel, beside torch.matmul on
the same inputs, TFLOP/s from 2·M·N·K.

Conv3d: the 480p Wan VAE decoder's largest causal convolutions (one decode chunk: 2 cached +
4 frames, 3x3x3, spatial padding 1) through `reel kernel-bench conv3d` beside torch's conv3d
(cuDNN, bf16; the faster of the NCDHW and channels-last-3d layouts), TFLOP/s from
2·T_out·H·W·co·ci·27.

    python3 bench/kernels_gpu.py --reel carry/reel [--op attention|gemm|conv|all] [--skip OP] [--max-seconds 150]
"""
import argparse
import json
import struct
import subprocess
import sys
import time

MASK = 0xFFFFFFFF
SHAPES = [(b, h, l) for l in (4096, 16384, 32760, 75600) for h in (12, 40) for b in (1, 2)]
SHAPES.insert(1, SHAPES.pop(SHAPES.index((1, 12, 32760))))
HEAD_DIM = 128


def lowbias32_int(x):
    """lowbias32 on a Python int (kernels/elementwise.cu)."""
    x ^= x >> 16
    x = (x * 0x7FEB352D) & MASK
    x ^= x >> 15
    x = (x * 0x846CA68B) & MASK
    x ^= x >> 16
    return x


def mul32(x, c):
    """x·c mod 2³² for int64 arrays with x < 2³², without overflowing int64."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & MASK


def lowbias32_array(x):
    """lowbias32 elementwise on an int64 torch tensor (or numpy array) of values < 2³²."""
    x = x ^ (x >> 16)
    x = mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def fill_hash(torch, n, seed, device, scale=1.0):
    """What fill_hash_bf16 writes: bf16((u·2 − 1)·scale), u = (h(i ⊕ h(seed)) >> 8)·2⁻²⁴."""
    hs = lowbias32_int(seed)
    out = torch.empty(n, dtype=torch.bfloat16, device=device)
    chunk = 1 << 26
    for s in range(0, n, chunk):
        i = torch.arange(s, min(n, s + chunk), dtype=torch.int64, device=device)
        u = (lowbias32_array(i ^ hs) >> 8).to(torch.float32) * (1.0 / 16777216.0)
        out[s : s + i.numel()] = ((u * 2.0 - 1.0) * scale).to(torch.bfloat16)
    return out


def sample_positions(length, samples):
    return [lowbias32_int(i ^ 0x5EED) % length for i in range(samples)]


def reel_json(cmd):
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: exit {p.returncode}: {p.stderr.strip()}")
    return json.loads(p.stdout)


def reel_run(reel, b, h, l, repeat, warmup, kernel="auto"):
    return reel_json([reel, "kernel-bench", "attention", "--device", "cuda", "--batch", str(b), "--heads", str(h),
                      "--tokens", str(l), "--head-dim", str(HEAD_DIM), "--repeat", str(repeat), "--warmup",
                      str(warmup), "--attention-kernel", kernel, "--json", "-"])


def timed(torch, fn, repeat, warmup):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    out = None
    for _ in range(repeat):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        out = fn()
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    times.sort()
    return times[len(times) // 2], out


def torch_run(torch, b, h, l, seed, repeat, warmup, positions):
    dev = torch.device("cuda")
    n = b * l * h * HEAD_DIM
    q, k, v = (fill_hash(torch, n, (seed + i) & MASK, dev).view(b, l, h, HEAD_DIM) for i in range(3))
    first = q.flatten()[:8].float().tolist()
    qt, kt, vt = (x.permute(0, 2, 1, 3).contiguous() for x in (q, k, v))
    del q, k, v
    sdpa = torch.nn.functional.scaled_dot_product_attention
    t, out = timed(torch, lambda: sdpa(qt, kt, vt), repeat, warmup)
    flat = out.permute(0, 2, 1, 3).reshape(-1)
    sample = flat[torch.tensor(positions, device=dev)].float().tolist()
    del qt, kt, vt, out, flat
    torch.cuda.empty_cache()
    return t, first, sample


def f32(x):
    """x rounded to float32 (the JSON carries shortest float32 representations)."""
    return struct.unpack("f", struct.pack("f", x))[0]


def rel_l2(a, b):
    num = sum((x - y) ** 2 for x, y in zip(a, b))
    den = sum(y * y for y in b)
    return (num / den) ** 0.5 if den > 0 else float("nan")


# (M, N, K) of the Wan2.1 DiT's GEMMs, one guidance pass: 1.3B at 480p × 81 frames (32,760
# tokens, D 1,536, FFN 8,960; QKV fused: N = 3·D) and 14B at 720p (75,600 tokens, D 5,120,
# FFN 13,824).
GEMM_SHAPES = [
    (32760, 4608, 1536), (32760, 1536, 1536), (32760, 8960, 1536), (32760, 1536, 8960),
    (75600, 15360, 5120), (75600, 5120, 5120), (75600, 13824, 5120), (75600, 5120, 13824),
]


# (H, W, ci, co) of the 480p decoder's causal 3x3x3 convolutions, largest first: the
# full-resolution resnets (96 channels), half (192), quarter (384) and the latent-size
# mid-block (384 at 60x104).
CONV_SHAPES = [(480, 832, 96, 96), (240, 416, 192, 192), (120, 208, 384, 384), (60, 104, 384, 384)]
CONV_FRAMES, CONV_KT = 6, 3


def conv_section(torch, args, start):
    print("| H x W | ci -> co | reel kernel | reel ms | reel TFLOP/s | torch ms | torch TFLOP/s | reel / torch speed | rel. diff |")
    print("|---|---|---|---|---|---|---|---|---|")
    failed = False
    torch.backends.cudnn.benchmark = True
    for h, w, ci, co in CONV_SHAPES:
        if time.time() - start > args.max_seconds:
            print(f"(stopped before {w}x{h} {ci}->{co}: --max-seconds {args.max_seconds})")
            break
        t_out = CONV_FRAMES - CONV_KT + 1
        flops = 2 * t_out * h * w * co * ci * CONV_KT * 9
        try:
            r = reel_json([args.reel, "kernel-bench", "conv3d", "--device", "cuda", "--height", str(h), "--width", str(w),
                           "--ci", str(ci), "--co", str(co), "--frames", str(CONV_FRAMES), "--kt", str(CONV_KT),
                           "--repeat", str(args.repeat), "--warmup", str(args.warmup), "--json", "-"])
            dev = torch.device("cuda")
            x = fill_hash(torch, CONV_FRAMES * h * w * ci, r["seed"], dev).view(CONV_FRAMES, h, w, ci)
            if [f32(v) for v in x.flatten()[:8].float().tolist()] != [f32(v) for v in r["q_first"]]:
                raise RuntimeError("inputs differ from reel's")
            wt = fill_hash(torch, co * CONV_KT * 9 * ci, (r["seed"] + 1) & MASK, dev,
                           scale=1.0 / (ci * CONV_KT * 9) ** 0.5).view(co, CONV_KT, 3, 3, ci)
            wt = wt.permute(0, 4, 1, 2, 3).contiguous()  # [co, ci, kt, 3, 3]
            xt = x.permute(3, 0, 1, 2).unsqueeze(0).contiguous()  # [1, ci, T, H, W]
            del x
            conv = torch.nn.functional.conv3d
            best, out = None, None
            for fmt in (torch.contiguous_format, torch.channels_last_3d):
                xf, wf = xt.contiguous(memory_format=fmt), wt.contiguous(memory_format=fmt)
                t, o = timed(torch, lambda: conv(xf, wf, padding=(0, 1, 1)), args.repeat, args.warmup)
                if best is None or t < best:
                    best, out = t, o
                del xf, wf
            flat = out[0].permute(1, 2, 3, 0).reshape(-1)  # [T_out, H, W, co] like reel's
            pos = sample_positions(flat.numel(), len(r["sample"]))
            sample = flat[torch.tensor(pos, device=dev)].float().tolist()
            del xt, wt, out, flat
            torch.cuda.empty_cache()
        except Exception as e:
            print(f"| {w}x{h} | {ci} -> {co} | error: {e} |")
            failed = True
            continue
        tr = r["seconds"]["median"]
        print(f"| {w}x{h} | {ci} -> {co} | {r['kernel']} | {tr * 1e3:.2f} | {flops / tr / 1e12:.1f} | {best * 1e3:.2f} | "
              f"{flops / best / 1e12:.1f} | {best / tr:.2f} | {rel_l2(r['sample'], sample):.2e} |", flush=True)
    return failed


def gemm_section(torch, args, start):
    print("| M | N | K | reel GEMM | reel ms | reel TFLOP/s | reel kernel ms | reel kernel TFLOP/s | torch ms | torch TFLOP/s | rel. diff |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    failed = False
    for m, n, k in GEMM_SHAPES:
        if time.time() - start > args.max_seconds:
            print(f"(stopped before {m}x{n}x{k}: --max-seconds {args.max_seconds})")
            break
        flops = 2 * m * n * k
        try:
            base = [args.reel, "kernel-bench", "gemm", "--device", "cuda", "--m", str(m), "--n", str(n), "--k", str(k),
                    "--repeat", str(args.repeat), "--warmup", str(args.warmup), "--json", "-"]
            r = reel_json(base)
            rk = reel_json(base + ["--reel-kernel"])
            dev = torch.device("cuda")
            a = fill_hash(torch, m * k, r["seed"], dev).view(m, k)
            w = fill_hash(torch, n * k, (r["seed"] + 1) & MASK, dev).view(n, k)
            if [f32(x) for x in a.flatten()[:8].float().tolist()] != [f32(x) for x in r["q_first"]]:
                raise RuntimeError("inputs differ from reel's")
            t, c = timed(torch, lambda: torch.matmul(a, w.t()), args.repeat, args.warmup)
            pos = sample_positions(m * n, len(r["sample"]))
            sample = c.flatten()[torch.tensor(pos, device=dev)].float().tolist()
            del a, w, c
            torch.cuda.empty_cache()
        except Exception as e:
            print(f"| {m} | {n} | {k} | error: {e} |")
            failed = True
            continue
        tr, tk = r["seconds"]["median"], rk["seconds"]["median"]
        print(f"| {m} | {n} | {k} | {r['kernel']} | {tr * 1e3:.2f} | {flops / tr / 1e12:.1f} | {tk * 1e3:.2f} | "
              f"{flops / tk / 1e12:.1f} | {t * 1e3:.2f} | {flops / t / 1e12:.1f} | {rel_l2(r['sample'], sample):.2e} |",
              flush=True)
    return failed


def attention_section(torch, args, start):
    print("| B | H | L | reel kernel | reel ms | reel TFLOP/s | mma.sync ms | mma.sync TFLOP/s | torch ms "
          "| torch TFLOP/s | reel / torch speed | reel / mma.sync speed | rel. diff reel | rel. diff mma.sync |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    shapes = [s for s in SHAPES if args.shapes == "all" or s[2] == 4096]
    failed = False
    for b, h, l in shapes:
        if time.time() - start > args.max_seconds:
            print(f"(stopped before B={b} H={h} L={l}: --max-seconds {args.max_seconds})")
            break
        flops = 4 * b * h * l * l * HEAD_DIM
        try:
            r = reel_run(args.reel, b, h, l, args.repeat, args.warmup)
            # The same call on the mma.sync kernel (the runtime's choice off sm_90 already).
            m = r if "sm90" not in r["kernel"] else reel_run(args.reel, b, h, l, args.repeat, args.warmup, "mma")
            positions = sample_positions(b * l * h * HEAD_DIM, len(r["sample"]))
            t_torch, first, sample = torch_run(torch, b, h, l, r["seed"], args.repeat, args.warmup, positions)
        except Exception as e:  # report the shape and go on with the next
            print(f"| {b} | {h} | {l} | error: {e} |")
            failed = True
            continue
        if [f32(x) for x in first] != [f32(x) for x in r["q_first"]]:
            print(f"| {b} | {h} | {l} | inputs differ: torch {first} vs reel {r['q_first']} |")
            failed = True
            continue
        t_reel, t_mma = r["seconds"]["median"], m["seconds"]["median"]
        print(f"| {b} | {h} | {l} | {r['kernel']} | {t_reel * 1e3:.2f} | {flops / t_reel / 1e12:.1f} | "
              f"{t_mma * 1e3:.2f} | {flops / t_mma / 1e12:.1f} | "
              f"{t_torch * 1e3:.2f} | {flops / t_torch / 1e12:.1f} | {t_torch / t_reel:.2f} | {t_mma / t_reel:.2f} | "
              f"{rel_l2(r['sample'], sample):.2e} | {rel_l2(m['sample'], sample):.2e} |", flush=True)
    return failed


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reel", default="carry/reel")
    ap.add_argument("--op", choices=["attention", "gemm", "conv", "all"], default="all")
    ap.add_argument("--skip", action="append", default=[], choices=["attention", "gemm", "conv"],
                    help="with --op all: leave this section out (repeatable)")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--max-seconds", type=float, default=150.0, help="start no shape after this")
    ap.add_argument("--shapes", choices=["all", "small"], default="all", help="attention: small = L 4,096 only")
    args = ap.parse_args()
    import torch

    if not torch.cuda.is_available():
        sys.exit("kernels_gpu: torch sees no CUDA device")
    print(f"torch {torch.__version__} on {torch.cuda.get_device_name(0)}")
    start = time.time()
    failed = False
    if args.op == "attention" or (args.op == "all" and "attention" not in args.skip):
        print("\nFlash attention (head_dim 128):\n")
        failed |= attention_section(torch, args, start)
    if args.op == "conv" or (args.op == "all" and "conv" not in args.skip):
        print("\nConv3d (the 480p VAE decoder's causal 3x3x3 convolutions, bf16):\n")
        failed |= conv_section(torch, args, start)
    if args.op == "gemm" or (args.op == "all" and "gemm" not in args.skip):
        print("\nGEMM (bf16 in and out, C = A·Wᵀ):\n")
        failed |= gemm_section(torch, args, start)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()

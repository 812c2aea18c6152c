#!/usr/bin/env python3
"""torch's own numbers on this GPU, the baselines reel's kernels are measured against in
the same run (tools/gpu-check.sh): scaled-dot-product attention (flash) and a bf16 GEMM at
Wan2.1 shapes, TFLOP/s from counted FLOPs (attention 4·B·H·Lq·Lk·d, GEMM 2·M·N·K)."""
import statistics
import time

import torch


def timed(fn, iters=20, warmup=5):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(iters):
        s = torch.cuda.Event(enable_timing=True)
        e = torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        torch.cuda.synchronize()
        ts.append(s.elapsed_time(e) / 1e3)
    return statistics.median(ts)


def main():
    dev = torch.device("cuda")
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name(0)}")
    # Wan2.1 1.3B: 12 heads of 128; 14B: 40 heads of 128. 480p 81 frames: 32,760 tokens.
    for heads, tokens in [(12, 32760), (40, 32760), (12, 8190)]:
        q, k, v = (torch.randn(1, heads, tokens, 128, device=dev, dtype=torch.bfloat16) for _ in range(3))
        t = timed(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v))
        flops = 4 * heads * tokens * tokens * 128
        print(f"SDPA bf16 heads={heads} L={tokens} d=128: {t * 1e3:.2f} ms, {flops / t / 1e12:.1f} TFLOP/s")
    for m, n, k in [(32760, 1536, 1536), (32760, 8960, 1536), (32760, 5120, 5120), (32760, 13824, 5120)]:
        a = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
        b = torch.randn(k, n, device=dev, dtype=torch.bfloat16)
        t = timed(lambda: a @ b)
        print(f"GEMM bf16 {m}x{n}x{k}: {t * 1e3:.2f} ms, {2 * m * n * k / t / 1e12:.1f} TFLOP/s")


if __name__ == "__main__":
    main()

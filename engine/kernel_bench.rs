//! `reel kernel-bench attention|gemm|conv3d`: one kernel timed alone on a kernel device, for the GPU benchmarks
//! that put reel's kernels beside torch's on the same GPU in the same run
//! (bench/kernels_gpu.py, run by tools/gpu-check.sh). The inputs are made on the device
//! by a hash any other program can reproduce (`fill_hash_bf16`), and the report carries a
//! sample of the output at hashed positions, so the other program can measure the
//! difference without moving gigabytes between processes.
//!
//! On emu the times are the emulator's (correctness and emulator time only; no speed claim).

use std::time::Instant;

use serde::Serialize;

use crate::bench::{percentile, Percentiles};
use crate::error::{Error, Result};
use crate::kernels::{self as k, AttnView, Buf, FlashShape, KernelDevice};

/// What `reel kernel-bench attention` measures.
#[derive(Debug, Clone, Copy)]
pub struct AttnBenchArgs {
    pub batch: usize,
    pub heads: usize,
    pub tokens: usize,
    /// Key/value tokens (default: `tokens`, self-attention).
    pub kv_tokens: Option<usize>,
    pub head_dim: usize,
    /// Which kernel (Auto: the runtime's choice).
    pub kernel: k::FlashKernel,
    pub warmup: usize,
    pub repeat: usize,
    pub seed: u32,
    /// Output values reported at hashed positions.
    pub samples: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct AttnBenchReport {
    pub op: &'static str,
    pub kernel: &'static str,
    pub device: String,
    pub batch: usize,
    pub heads: usize,
    pub lq: usize,
    pub lk: usize,
    pub head_dim: usize,
    pub warmup: usize,
    pub repeat: usize,
    /// Per call (on cuda each launch is followed by a synchronisation).
    pub seconds: Percentiles,
    /// 4·Lq·Lk·head_dim per (sample, head): Q·Kᵀ and P·V.
    pub flops: u64,
    /// From the median time.
    pub tflops: f64,
    /// How the inputs were made: q, k, v are fill_hash_bf16 with seeds seed, seed + 1,
    /// seed + 2 and scale 1, each packed [batch, tokens, heads·head_dim].
    pub seed: u32,
    /// q's first 8 values, for the other program's check that it built the same inputs.
    pub q_first: Vec<f32>,
    /// The output (packed like q) at positions lowbias32(i ^ 0x5eed) mod len, i < samples.
    pub sample: Vec<f32>,
    pub commit: &'static str,
}

/// Median, p10 and p90 of sorted seconds.
fn percentiles(sorted: &[f64]) -> Percentiles {
    Percentiles {
        median: percentile(sorted, 50.0),
        p10: percentile(sorted, 10.0),
        p90: percentile(sorted, 90.0),
    }
}

/// Runs `run` `warmup` times, then `repeat` timed times: the kernel that ran and the
/// sorted seconds.
fn time_runs(
    warmup: usize,
    repeat: usize,
    mut run: impl FnMut() -> Result<&'static str>,
) -> Result<(&'static str, Vec<f64>)> {
    let mut kernel = "";
    for _ in 0..warmup {
        kernel = run()?;
    }
    let mut times = Vec::with_capacity(repeat);
    for _ in 0..repeat {
        let t = Instant::now();
        kernel = run()?;
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    Ok((kernel, times))
}

/// The output positions reported in [`AttnBenchReport::sample`].
pub fn sample_positions(len: usize, samples: usize) -> Vec<usize> {
    (0..samples as u32)
        .map(|i| k::lowbias32(i ^ 0x5eed) as usize % len)
        .collect()
}

/// Times flash attention on `dev` (see the module docs).
pub fn attention(dev: &KernelDevice, a: &AttnBenchArgs) -> Result<AttnBenchReport> {
    let lk = a.kv_tokens.unwrap_or(a.tokens);
    let w = a.heads * a.head_dim;
    if a.repeat == 0 {
        return Err(Error::invalid("kernel-bench: --repeat must be at least 1"));
    }
    let (nq, nk) = (a.batch * a.tokens * w, a.batch * lk * w);
    if nq == 0 || nk == 0 {
        return Err(Error::invalid(
            "kernel-bench: batch, heads, tokens and head_dim must be positive",
        ));
    }
    let alloc = |n: usize, seed: u32| -> Result<Buf<half::bf16>> {
        let b = Buf::uninit(dev, n)?;
        k::fill_hash_bf16(dev, &b, seed, 1.0)?;
        Ok(b)
    };
    let q = alloc(nq, a.seed)?;
    let kk = alloc(nk, a.seed.wrapping_add(1))?;
    let v = alloc(nk, a.seed.wrapping_add(2))?;
    let mut o = Buf::filled(dev, nq, half::bf16::from_bits(0x7fc1))?;
    let shape = FlashShape {
        batch: a.batch,
        heads: a.heads,
        head_dim: a.head_dim,
        lq: a.tokens,
        lk,
        scale: 1.0 / (a.head_dim as f32).sqrt(),
    };
    let run = |o: &mut Buf<half::bf16>| {
        k::flash_attention_with(
            dev,
            a.kernel,
            (&q, AttnView::packed(0, w, a.tokens)),
            (&kk, AttnView::packed(0, w, lk)),
            (&v, AttnView::packed(0, w, lk)),
            (&*o, AttnView::packed(0, w, a.tokens)),
            None,
            shape,
        )
    };
    let (kernel, times) = time_runs(a.warmup, a.repeat, || run(&mut o))?;
    let median = percentile(&times, 50.0);
    let flops = 4 * (a.batch * a.heads * a.tokens * lk * a.head_dim) as u64;
    let out = o.download()?;
    let q_first = q.download()?.iter().take(8).map(|x| x.to_f32()).collect();
    Ok(AttnBenchReport {
        op: "attention",
        kernel,
        device: dev.describe(),
        batch: a.batch,
        heads: a.heads,
        lq: a.tokens,
        lk,
        head_dim: a.head_dim,
        warmup: a.warmup,
        repeat: a.repeat,
        seconds: percentiles(&times),
        flops,
        tflops: flops as f64 / median / 1e12,
        seed: a.seed,
        q_first,
        sample: sample_positions(out.len(), a.samples)
            .into_iter()
            .map(|i| out[i].to_f32())
            .collect(),
        commit: env!("REEL_GIT_COMMIT"),
    })
}

/// What `reel kernel-bench gemm` measures: C[M, N] = A[M, K]·W[N, K]ᵀ, bf16 in and out.
#[derive(Debug, Clone, Copy)]
pub struct GemmBenchArgs {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    /// Force reel's kernel even where cuBLASLt is loaded.
    pub reel_kernel: bool,
    pub warmup: usize,
    pub repeat: usize,
    pub seed: u32,
    pub samples: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct GemmBenchReport {
    pub op: &'static str,
    pub kernel: &'static str,
    pub device: String,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub warmup: usize,
    pub repeat: usize,
    pub seconds: Percentiles,
    /// 2·M·N·K.
    pub flops: u64,
    pub tflops: f64,
    /// A and W are fill_hash_bf16 with seeds seed and seed + 1, scale 1, row-major.
    pub seed: u32,
    /// A's first 8 values.
    pub q_first: Vec<f32>,
    /// C at positions lowbias32(i ^ 0x5eed) mod M·N, i < samples.
    pub sample: Vec<f32>,
    pub commit: &'static str,
}

/// Times the runtime's GEMM (cuBLASLt where loaded, else reel's kernel) on `dev`.
pub fn gemm(dev: &KernelDevice, a: &GemmBenchArgs) -> Result<GemmBenchReport> {
    let (m, n, k) = (a.m, a.n, a.k);
    if a.repeat == 0 || m == 0 || n == 0 || k == 0 {
        return Err(Error::invalid(
            "kernel-bench gemm: --m, --n, --k and --repeat must be positive",
        ));
    }
    let alloc = |len: usize, seed: u32| -> Result<Buf<half::bf16>> {
        let b = Buf::uninit(dev, len)?;
        k::fill_hash_bf16(dev, &b, seed, 1.0)?;
        Ok(b)
    };
    let (x, w) = (alloc(m * k, a.seed)?, alloc(n * k, a.seed.wrapping_add(1))?);
    let c = Buf::filled(dev, m * n, half::bf16::from_bits(0x7fc1))?;
    let run = || {
        let mats = ((x.slice(), k), (w.slice(), k), (c.slice(), n));
        if a.reel_kernel {
            k::gemm(dev, mats.0, mats.1, None, mats.2, (m, n, k), k::Act::None)
        } else {
            crate::gpu::gemm::gemm(dev, mats.0, mats.1, None, mats.2, (m, n, k), k::Act::None)
        }
    };
    let (kernel, times) = time_runs(a.warmup, a.repeat, run)?;
    let median = percentile(&times, 50.0);
    let flops = 2 * (m * n * k) as u64;
    let out = c.download()?;
    Ok(GemmBenchReport {
        op: "gemm",
        kernel,
        device: dev.describe(),
        m,
        n,
        k,
        warmup: a.warmup,
        repeat: a.repeat,
        seconds: percentiles(&times),
        flops,
        tflops: flops as f64 / median / 1e12,
        seed: a.seed,
        q_first: x.download()?.iter().take(8).map(|v| v.to_f32()).collect(),
        sample: sample_positions(out.len(), a.samples)
            .into_iter()
            .map(|i| out[i].to_f32())
            .collect(),
        commit: env!("REEL_GIT_COMMIT"),
    })
}

/// One line for people: shape, kernel, time and TFLOP/s.
pub fn render_gemm(r: &GemmBenchReport) -> String {
    format!(
        "gemm {}x{}x{} on {} ({}): median {:.3} ms (p10 {:.3}, p90 {:.3}), {:.1} TFLOP/s\n",
        r.m,
        r.n,
        r.k,
        r.device,
        r.kernel,
        r.seconds.median * 1e3,
        r.seconds.p10 * 1e3,
        r.seconds.p90 * 1e3,
        r.tflops
    )
}

/// One line for people: shape, kernel, time and TFLOP/s.
pub fn render(r: &AttnBenchReport) -> String {
    format!(
        "attention B={} H={} Lq={} Lk={} d={} on {} ({}): median {:.3} ms (p10 {:.3}, p90 {:.3}), {:.1} TFLOP/s\n",
        r.batch,
        r.heads,
        r.lq,
        r.lk,
        r.head_dim,
        r.device,
        r.kernel,
        r.seconds.median * 1e3,
        r.seconds.p10 * 1e3,
        r.seconds.p90 * 1e3,
        r.tflops
    )
}

/// What `reel kernel-bench conv3d` measures: the VAE's causal convolution over `frames`
/// channel-last bf16 frames of height × width × ci (no null frames: a chunk with its cache),
/// a kt × 3 × 3 kernel, spatial padding 1, to frames − kt + 1 output frames of co channels.
#[derive(Debug, Clone, Copy)]
pub struct ConvBenchArgs {
    pub height: usize,
    pub width: usize,
    pub ci: usize,
    pub co: usize,
    pub frames: usize,
    pub kt: usize,
    pub warmup: usize,
    pub repeat: usize,
    pub seed: u32,
    pub samples: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct ConvBenchReport {
    pub op: &'static str,
    pub kernel: &'static str,
    pub device: String,
    pub height: usize,
    pub width: usize,
    pub ci: usize,
    pub co: usize,
    pub frames: usize,
    pub kt: usize,
    pub warmup: usize,
    pub repeat: usize,
    pub seconds: Percentiles,
    /// 2·T_out·H·W·co·ci·kt·9.
    pub flops: u64,
    pub tflops: f64,
    /// The input is fill_hash_bf16 (seed, scale 1), [frames, H, W, ci] channel-last; the
    /// weights fill_hash_bf16 (seed + 1, scale 1/√(ci·kt·9)) in the kernel's layout
    /// [co][kt][3][3][ci]; the bias zero.
    pub seed: u32,
    /// The input's first 8 values.
    pub q_first: Vec<f32>,
    /// The output [T_out, H, W, co] at positions lowbias32(i ^ 0x5eed) mod len, i < samples.
    pub sample: Vec<f32>,
    pub commit: &'static str,
}

/// Times conv3d on `dev` (see [`ConvBenchArgs`]).
pub fn conv3d(dev: &KernelDevice, a: &ConvBenchArgs) -> Result<ConvBenchReport> {
    use crate::kernels::conv3d::{conv3d as conv, ConvShape};
    if a.repeat == 0 || a.height == 0 || a.width == 0 || a.ci == 0 || a.co == 0 {
        return Err(Error::invalid(
            "kernel-bench conv3d: --height, --width, --ci, --co and --repeat must be positive",
        ));
    }
    if !(a.kt == 1 || a.kt == 3) || a.frames < a.kt || a.frames > 8 {
        return Err(Error::invalid(format!(
            "kernel-bench conv3d: --kt {} must be 1 or 3 and --frames {} between it and 8",
            a.kt, a.frames
        )));
    }
    let fl = a.height * a.width * a.ci;
    let kvol = a.kt * 9;
    let x = Buf::uninit(dev, a.frames * fl)?;
    k::fill_hash_bf16(dev, &x, a.seed, 1.0)?;
    let w = Buf::uninit(dev, a.co * kvol * a.ci)?;
    k::fill_hash_bf16(
        dev,
        &w,
        a.seed.wrapping_add(1),
        1.0 / ((a.ci * kvol) as f32).sqrt(),
    )?;
    let bias = Buf::filled(dev, a.co, 0.0f32)?;
    let shape = ConvShape::new(
        (a.height, a.width, a.ci, a.co),
        [a.kt, 3, 3],
        [1, 1, 1],
        [1, 1, 1, 1],
    );
    let (t_out, ho, wo) = shape
        .out_size(a.frames)
        .map_err(|e| Error::invalid(format!("kernel-bench conv3d: {e}")))?;
    let out = Buf::filled(dev, t_out * ho * wo * a.co, half::bf16::from_bits(0x7fc1))?;
    let frames: Vec<Option<_>> = (0..a.frames)
        .map(|i| x.slice().sub(i * fl, fl).map(Some))
        .collect::<Result<_>>()?;
    let run = || {
        conv(
            dev,
            &frames,
            w.slice(),
            bias.slice(),
            None,
            out.slice(),
            shape,
        )
    };
    let (kernel, times) = time_runs(a.warmup, a.repeat, || run().map(|r| r.1))?;
    let median = percentile(&times, 50.0);
    let flops = 2 * (t_out * ho * wo * a.co * a.ci * kvol) as u64;
    let o = out.download()?;
    Ok(ConvBenchReport {
        op: "conv3d",
        kernel,
        device: dev.describe(),
        height: a.height,
        width: a.width,
        ci: a.ci,
        co: a.co,
        frames: a.frames,
        kt: a.kt,
        warmup: a.warmup,
        repeat: a.repeat,
        seconds: percentiles(&times),
        flops,
        tflops: flops as f64 / median / 1e12,
        seed: a.seed,
        q_first: x.download()?.iter().take(8).map(|v| v.to_f32()).collect(),
        sample: sample_positions(o.len(), a.samples)
            .into_iter()
            .map(|i| o[i].to_f32())
            .collect(),
        commit: env!("REEL_GIT_COMMIT"),
    })
}

/// One line for people.
pub fn render_conv(r: &ConvBenchReport) -> String {
    format!(
        "conv3d {}x3x3 {}x{} {}→{} channels, {} frames in, on {} ({}): median {:.3} ms (p10 {:.3}, p90 {:.3}), {:.1} TFLOP/s\n",
        r.kt,
        r.width,
        r.height,
        r.ci,
        r.co,
        r.frames,
        r.device,
        r.kernel,
        r.seconds.median * 1e3,
        r.seconds.p10 * 1e3,
        r.seconds.p90 * 1e3,
        r.tflops
    )
}

//! Criterion benches of the CPU device's heavy ops at the shapes of the issue-2 DiT bench
//! (1,280 tokens, dim 256 = 4 heads of 64, ffn 1024) and of a VAE decoder convolution.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use reel::cpu::conv::{conv3d, ConvWeights};
use reel::cpu::{attention, matmul_wt, AttnShape};

fn vals(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = reel::models::random::Normal::new(seed);
    (0..n).map(|_| rng.sample()).collect()
}

fn ops(c: &mut Criterion) {
    let mut g = c.benchmark_group("cpu_ops");
    g.sample_size(20);

    let (m, k, n) = (1280, 256, 1024);
    let (x, w) = (vals(m * k, 1), vals(n * k, 2));
    let mut out = vec![0.0f32; m * n];
    g.throughput(Throughput::Elements((2 * m * n * k) as u64)); // FLOPs
    g.bench_function("gemm_1280x256x1024", |b| {
        b.iter(|| matmul_wt(&x, &w, m, k, n, &mut out))
    });

    let (l, heads, hd) = (1280, 4, 64);
    let d = heads * hd;
    let (q, kk, v) = (vals(l * d, 3), vals(l * d, 4), vals(l * d, 5));
    let mut o = vec![0.0f32; l * d];
    let s = AttnShape {
        batch: 1,
        heads,
        head_dim: hd,
        lq: l,
        lk: l,
        q_stride: d,
        kv_stride: d,
        out_stride: d,
        scale: 1.0 / (hd as f32).sqrt(),
    };
    g.throughput(Throughput::Elements((4 * l * l * d) as u64));
    g.bench_function("attention_1280_tokens_4x64", |b| {
        b.iter(|| attention(&q, &kk, &v, &mut o, s))
    });

    let (ci, co, t, h, wd) = (32, 32, 4, 32, 48);
    let frames = vals(t * h * wd * ci, 6);
    let cw = ConvWeights::new(&vals(co * ci * 27, 7), &vals(co, 8), co, ci, [3, 3, 3]);
    let inputs: Vec<Option<&[f32]>> = std::iter::repeat_n(None, 2)
        .chain((0..t).map(|i| Some(&frames[i * h * wd * ci..(i + 1) * h * wd * ci])))
        .collect();
    g.throughput(Throughput::Elements((2 * t * h * wd * co * ci * 27) as u64));
    g.bench_function("conv3d_3x3x3_32ch_4x32x48", |b| {
        b.iter(|| conv3d(&inputs, h, wd, &cw, [1, 1, 1], [1, 1, 1, 1]).unwrap())
    });
    g.finish();
}

criterion_group!(benches, ops);
criterion_main!(benches);

//! Criterion bench of the CPU DiT forward at the config: dim 256 (4 heads of 64),
//! 4 layers, ffn 1024, text 64×256, latents [1, 16, 5, 32, 32] (1,280 tokens).
//! Deterministic random weights written to a temp folder and memory-mapped as usual.
//! tools/bench_dit_cpu.py times diffusers on the same config in the same run.

use criterion::{criterion_group, criterion_main, Criterion};
use reel::models::wan_dit::{write_random, WanDit, WanDitConfig};
use reel::Tensor;

pub fn bench_config() -> WanDitConfig {
    WanDitConfig {
        num_attention_heads: 4,
        attention_head_dim: 64,
        text_dim: 256,
        ffn_dim: 1024,
        num_layers: 4,
        ..Default::default()
    }
}

fn dit_forward(c: &mut Criterion) {
    let dir = std::env::temp_dir().join(format!("reel-bench-dit-{}", std::process::id()));
    write_random(&dir, &bench_config(), 7).expect("write bench model");
    let dit = WanDit::load(&dir).expect("load bench model");
    let mut rng = reel::models::random::Normal::new(11);
    let mut randn = |shape: &[usize]| {
        let n = shape.iter().product();
        Tensor::new(shape.to_vec(), (0..n).map(|_| rng.sample()).collect()).unwrap()
    };
    let x = randn(&[1, 16, 5, 32, 32]);
    let ctx = randn(&[1, 64, 256]);
    let t = Tensor::new(vec![1], vec![500.0]).unwrap();
    let mut g = c.benchmark_group("cpu");
    g.sample_size(10);
    g.bench_function("dit_forward_1280_tokens", |b| {
        b.iter(|| dit.forward(&x, &t, &ctx).unwrap())
    });
    g.finish();
    let _ = std::fs::remove_dir_all(&dir);
}

criterion_group!(benches, dit_forward);
criterion_main!(benches);

//! Criterion bench of the CPU VAE decode on a small config: the golden tiny VAE
//! tests/data/vae_a (base_dim 8, dim_mult [1,2,2,2], one residual block per stage, the
//! Wan2.1 temporal layout) decoding latents [1, 4, 3, 8, 12] into 9 frames of 64x96.
//! tools/bench_vae_cpu.py times diffusers on the same model and shape in the same run.

use std::path::PathBuf;

use criterion::{criterion_group, criterion_main, Criterion};
use reel::models::wan_vae::WanVae;
use reel::Tensor;

fn vae_decode(c: &mut Criterion) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/vae_a");
    let vae = WanVae::load(&dir).expect("load tests/data/vae_a");
    let mut rng = reel::models::random::Normal::new(5);
    let shape = [1usize, 4, 3, 8, 12];
    let z = Tensor::new(
        shape.to_vec(),
        (0..shape.iter().product()).map(|_| rng.sample()).collect(),
    )
    .unwrap();
    let mut g = c.benchmark_group("cpu");
    g.sample_size(20);
    g.bench_function("vae_decode_9x64x96", |b| b.iter(|| vae.decode(&z).unwrap()));
    g.finish();
}

criterion_group!(benches, vae_decode);
criterion_main!(benches);

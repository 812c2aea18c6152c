//! The SIMT emulator's costs, with reel's own context switch beside the swapcontext path
//! measured in the same run (kernels/README.md reports the numbers):
//! - a block barrier round trip at 256 threads (each thread switches out and back once:
//!   the cost of a switch plus the scheduler's bookkeeping),
//! - a warp shuffle (one warp exchange of 32 lanes),
//! - an m16n8k16 bf16 mma (a warp exchange and the emulated fragment arithmetic),
//! - a 64-row layernorm_modulate_bf16 launch at d = 1536 (Wan2.1-1.3B's width) and d = 48
//!   (the demo model's), the whole launcher path.
//!
//! Each kernel loops `ITERS` times inside one launch, so the per-iteration time excludes
//! the launch; criterion's throughput is set to thread-iterations, so "elem/s" reads as
//! fiber switches per second for the barrier.
//!
//! Run: cargo bench --bench emu

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use reel::kernels::{self as k, emu_checks as chk, Buf, EmuSwitch, KernelDevice};

const ITERS: u32 = 200;

fn switches() -> [(&'static str, EmuSwitch); 2] {
    [("own", EmuSwitch::Own), ("ucontext", EmuSwitch::Ucontext)]
}

fn emu(c: &mut Criterion) {
    let dev = KernelDevice::Emu;
    k::set_emu_shuffle(Some(None));
    let mut g = c.benchmark_group("emu");
    g.sample_size(20);
    for (name, s) in switches() {
        k::set_emu_switch(s);
        let mut out = Buf::filled(&dev, 256, 0.0f32).unwrap();
        g.throughput(Throughput::Elements(256 * ITERS as u64));
        g.bench_function(format!("barrier_256_threads/{name}"), |b| {
            b.iter(|| chk::microbench(&dev, &mut out, chk::MicroOp::Barrier, ITERS).unwrap())
        });
        let mut out = Buf::filled(&dev, 32, 0.0f32).unwrap();
        g.throughput(Throughput::Elements(32 * ITERS as u64));
        g.bench_function(format!("warp_shuffle/{name}"), |b| {
            b.iter(|| chk::microbench(&dev, &mut out, chk::MicroOp::Shuffle, ITERS).unwrap())
        });
        g.bench_function(format!("mma_m16n8k16/{name}"), |b| {
            b.iter(|| chk::microbench(&dev, &mut out, chk::MicroOp::Mma, ITERS).unwrap())
        });
        for d in [1536usize, 48] {
            let rows = 64;
            let x: Vec<half::bf16> = (0..rows * d)
                .map(|i| half::bf16::from_f32(((i * 7919) % 1000) as f32 / 500.0 - 1.0))
                .collect();
            let (xb, mul, add) = (
                Buf::upload(&dev, &x).unwrap(),
                Buf::filled(&dev, d, 1.0f32).unwrap(),
                Buf::filled(&dev, d, 0.0f32).unwrap(),
            );
            let mut y = Buf::filled(&dev, rows * d, half::bf16::ZERO).unwrap();
            g.throughput(Throughput::Elements((rows * d) as u64));
            g.bench_function(format!("layernorm_64_rows_d{d}/{name}"), |b| {
                b.iter(|| {
                    k::layernorm_modulate_bf16(&dev, &xb, &mut y, d, &mul, &add, rows, 1e-6)
                        .unwrap()
                })
            });
        }
    }
    k::set_emu_switch(EmuSwitch::Env);
    k::set_emu_shuffle(None);
    g.finish();
}

criterion_group!(benches, emu);
criterion_main!(benches);

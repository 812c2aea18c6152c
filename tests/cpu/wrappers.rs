//! The wrappers and warp operations the kernels are built on (kernels/selftest.cu), on the
//! device REEL_TEST_DEVICE names: against host references of CUDA's and the PTX ISA's
//! semantics, and, on a GPU, the hardware self-test (emulator and hardware bit for bit).

use reel::kernels::{self as k, Buf, KernelDevice};

use crate::kernels::{bf16s, dev, down, small_ints, up, vals};

/// What warp_ops_selftest computes, per CUDA's semantics, for one thread.
fn warp_ops_expected(x: &[i32], t: usize, block: usize) -> [i32; k::WARP_OPS_OUTPUTS] {
    let lane = (t % block) % 32;
    let w0 = t - lane; // first thread of the warp
    let warp = &x[w0..w0 + 32];
    let sum: i32 = warp.iter().sum();
    let scan: i32 = warp[..=lane].iter().sum();
    let down = if lane + 3 < 32 {
        warp[lane + 3]
    } else {
        warp[lane]
    };
    let idx8 = warp[(lane & !7) + 5];
    let ballot = warp
        .iter()
        .enumerate()
        .fold(0u32, |m, (l, &v)| if v > 0 { m | (1 << l) } else { m });
    let any = warp.iter().any(|&v| v > 10) as i32;
    let all = warp.iter().all(|&v| v > -50) as i32;
    let s16: i32 = warp[lane & !15..(lane & !15) + 16].iter().sum();
    // xor by 16 within segments of 8: lane ^ 16 leaves the segment. PTX's bfly rule takes
    // the source when it is at most the segment's last lane: lanes 16-31 read lane − 16,
    // lanes 0-15 (whose lane ^ 16 lies above their segment) keep their own value.
    let xor16w8 = if lane >= 16 {
        warp[lane - 16]
    } else {
        warp[lane]
    };
    // A source lane of 37 with width 16: 37 mod 16 = 5 within the lane's segment of 16.
    let idx37w16 = warp[(lane & !15) + 5];
    // up by 2 / down by 5 within segments: lanes whose source leaves the segment keep theirs.
    let up2w8 = if lane % 8 >= 2 {
        warp[lane - 2]
    } else {
        warp[lane]
    };
    let down5w16 = if lane % 16 + 5 < 16 {
        warp[lane + 5]
    } else {
        warp[lane]
    };
    [
        sum,
        scan,
        down,
        idx8,
        ballot as i32,
        any,
        all,
        s16,
        xor16w8,
        idx37w16,
        up2w8,
        down5w16,
    ]
}

#[test]
fn warp_shuffles_and_votes_follow_cuda_semantics() {
    let d = dev();
    let n_out = k::WARP_OPS_OUTPUTS;
    for (block, blocks, seed) in [(32usize, 1usize, 1u64), (96, 2, 2), (1024, 1, 3)] {
        let n = block * blocks;
        let mut x = small_ints(n, seed, -40, 40);
        x[5] = -60; // one warp where all(x > -50) is false
        for shuffle in [None, Some(7u64)] {
            k::set_emu_shuffle(Some(shuffle));
            let mut out = Buf::filled(&d, n_out * n, i32::MIN).unwrap();
            k::warp_ops_selftest(&d, &up(&d, &x), &mut out, block).unwrap();
            let got = down(&out);
            for t in 0..n {
                assert_eq!(
                    got[n_out * t..n_out * (t + 1)],
                    warp_ops_expected(&x, t, block),
                    "block {block}, thread {t}, shuffle {shuffle:?}"
                );
            }
        }
        k::set_emu_shuffle(None);
    }
    assert!(k::warp_ops_selftest(&d, &up(&d, &[0; 40]), &mut up(&d, &[0; 480]), 40).is_err());
}

/// What warp_masks_selftest computes for thread t of its block of 40.
fn warp_masks_expected(x: &[i32], t: usize) -> [i32; k::WARP_MASKS_OUTPUTS] {
    let (lane, warp) = (t % 32, t / 32);
    // The thread's group: a half of warp 0, or the 8 lanes of warp 1.
    let (first, len, mask) = match (warp, lane < 16) {
        (1, _) => (32, 8, 0xffu32),
        (_, true) => (0, 16, 0x0000_ffff),
        (_, false) => (16, 16, 0xffff_0000),
    };
    let group = &x[first..first + len];
    let sum: i32 = group.iter().sum();
    let ballot = group
        .iter()
        .enumerate()
        .filter(|(_, &v)| v > 0)
        .fold(0u32, |m, (i, _)| m | 1 << ((first % 32) + i));
    // Fibers do not model divergence: emu reports every lane that has not exited.
    let _ = mask;
    let active = if warp == 1 { 0xffu32 } else { 0xffff_ffff };
    [
        sum,
        2 * x[t ^ 1],
        ballot as i32,
        ballot.count_ones() as i32,
        active as i32,
    ]
}

#[test]
fn warp_operations_on_partial_warps_and_disjoint_masks() {
    let d = dev();
    let n = k::WARP_MASKS_THREADS;
    for seed in 0..4u64 {
        let x = small_ints(n, 50 + seed, -20, 20);
        for shuffle in [None, Some(seed)] {
            k::set_emu_shuffle(Some(shuffle));
            let mut out = Buf::filled(&d, k::WARP_MASKS_OUTPUTS * n, i32::MIN).unwrap();
            k::warp_masks_selftest(&d, &up(&d, &x), &mut out).unwrap();
            let got = down(&out);
            for t in 0..n {
                let want = warp_masks_expected(&x, t);
                let case = format!("thread {t}, seed {seed}, shuffle {shuffle:?}");
                assert_eq!(got[5 * t..5 * t + 4], want[..4], "{case}");
                // __activemask: exact on emu; on hardware, which lanes run converged is the
                // scheduler's choice, but the thread's own group is there.
                if d.is_cuda() {
                    let group = match (t / 32, t % 32 < 16) {
                        (1, _) => 0xffu32,
                        (_, true) => 0x0000_ffff,
                        (_, false) => 0xffff_0000,
                    };
                    assert_eq!(got[5 * t + 4] as u32 & group, group, "{case}");
                } else {
                    assert_eq!(got[5 * t + 4], want[4], "{case}");
                }
            }
        }
    }
    k::set_emu_shuffle(None);
}

#[test]
fn syncthreads_count_and_or_and_named_barriers() {
    let d = dev();
    let n = k::BARRIER_THREADS;
    for seed in 0..4u64 {
        let mut x = small_ints(n, 70 + seed, -40, 40);
        if seed == 1 {
            x.iter_mut().for_each(|v| *v = v.abs() + 1); // all positive: and = 1
        }
        if seed == 2 {
            x[100] = -60; // one below -50: and = 0
        }
        for shuffle in [None, Some(seed)] {
            k::set_emu_shuffle(Some(shuffle));
            let mut out = Buf::filled(&d, k::BARRIER_OUTPUTS * n, i32::MIN).unwrap();
            k::barrier_selftest(&d, &up(&d, &x), &mut out).unwrap();
            let got = down(&out);
            let count = x.iter().filter(|&&v| v > 0).count() as i32;
            let and = x.iter().all(|&v| v > -50) as i32;
            let or = x.iter().any(|&v| v > 35) as i32;
            for t in 0..n {
                let partner = if t < 128 { 127 - t } else { 383 - t };
                assert_eq!(
                    got[4 * t..4 * t + 4],
                    [count, and, or, 3 * x[partner]],
                    "thread {t}, seed {seed}, shuffle {shuffle:?}"
                );
            }
        }
    }
    k::set_emu_shuffle(None);
}

/// What cp_async_selftest leaves in the staging area for the groups that landed: group g's
/// 128 floats copied from src, the zero-fill group (3) with only the first `zfill` bytes of
/// each 16 and zeros after. None for groups still in flight.
fn cp_async_expected(src: &[f32], groups: usize, wait: usize, zfill: usize) -> Vec<Option<u32>> {
    let landed = groups.saturating_sub(wait);
    let bytes: Vec<u8> = bytemuck::cast_slice(src).to_vec();
    (0..128 * groups)
        .map(|i| {
            let g = i / 128;
            if g >= landed {
                return None;
            }
            let mut w = [0u8; 4];
            for (b, slot) in w.iter_mut().enumerate() {
                let byte = 4 * i + b;
                if g < 3 || byte % 16 < zfill {
                    *slot = bytes[byte];
                }
            }
            Some(u32::from_le_bytes(w))
        })
        .collect()
}

#[test]
fn cp_async_copies_zero_fill_and_waits_for_the_right_groups() {
    let d = dev();
    let src = vals(k::CP_ASYNC_FLOATS, 3);
    let src_buf = up(&d, &src);
    for (groups, wait, zfill) in [
        (4usize, 0usize, 6usize),
        (4, 0, 0),
        (4, 0, 16),
        (4, 1, 8),
        (3, 2, 0),
        (2, 1, 0),
        (1, 0, 0),
        (2, 3, 0),
    ] {
        let mut out =
            Buf::filled(&d, 32 * k::CP_ASYNC_FLOATS, f32::from_bits(0x7fc0_1234)).unwrap();
        k::cp_async_selftest(&d, &src_buf, &mut out, groups, wait, zfill).unwrap();
        let got = down(&out);
        let want = cp_async_expected(&src, groups, wait, zfill);
        for lane in 0..32 {
            let view = &got[k::CP_ASYNC_FLOATS * lane..][..128 * groups];
            for (i, (g, w)) in view.iter().zip(&want).enumerate() {
                let case =
                    format!("groups {groups} wait {wait} zfill {zfill}: lane {lane} float {i}");
                match w {
                    Some(bits) => assert_eq!(g.to_bits(), *bits, "{case}"),
                    // Still in flight: on emu the destination reads as poison, so a wait that
                    // covers too few groups is caught; hardware may have landed it or not.
                    None if !d.is_cuda() => assert_eq!(g.to_bits(), 0xffff_ffff, "{case}"),
                    None => {}
                }
            }
        }
    }
    assert!(k::cp_async_selftest(&d, &src_buf, &mut up(&d, &[0.0; 32 * 512]), 5, 0, 0).is_err());
}

#[test]
fn vector_types_bf16_pairs_and_integer_intrinsics() {
    let d = dev();
    let mut x = vals(4096, 12);
    x[..4].copy_from_slice(&[0.0, -0.0, f32::from_bits(0x3F80_8000), 1e-40]);
    let mut y = Buf::filled(&d, x.len(), half::bf16::from_bits(0x7fc1)).unwrap();
    let mut back = Buf::filled(&d, x.len(), f32::NAN).unwrap();
    let mut bits = Buf::filled(&d, x.len() / 4, i32::MIN).unwrap();
    k::vector_types_selftest(&d, &up(&d, &x), &mut y, &mut back, &mut bits).unwrap();
    let (y, back, bits) = (down(&y), down(&back), down(&bits));
    let want = bf16s(&x);
    for i in 0..x.len() {
        assert_eq!(y[i].to_bits(), want[i].to_bits(), "[{i}] {}", x[i]);
        assert_eq!(back[i].to_bits(), want[i].to_f32().to_bits(), "[{i}]");
    }
    for (i, q) in x.chunks(4).enumerate() {
        let b = |v: f32| v.to_bits();
        let clz = |v: f32| b(v).leading_zeros() as i32;
        let want =
            b(q[0]).count_ones() as i32 + clz(q[1]) + b(q[2]).count_ones() as i32 + clz(q[3]);
        assert_eq!(bits[i], want, "float4 {i}");
    }
}

#[test]
fn an_sm90a_only_module_runs_on_hopper_and_is_refused_elsewhere() {
    let d = dev();
    match &d {
        KernelDevice::Emu => assert_eq!(k::probe::arch_probe(&d).unwrap(), -1),
        KernelDevice::Cuda(c) if c.compute_capability() == (9, 0) => {
            assert_eq!(k::probe::arch_probe(&d).unwrap(), 900)
        }
        KernelDevice::Measure(_) => unreachable!("REEL_TEST_DEVICE names emu or cuda"),
        KernelDevice::Cuda(c) => {
            let e = k::probe::arch_probe(&d).unwrap_err().to_string();
            assert!(e.contains("probe.sm90.cu") && e.contains("no code"), "{e}");
            assert!(c.skipped_modules().iter().any(|(s, _)| *s == "probe.sm90"));
        }
    }
}

#[test]
fn f16_conversion_rounds_like_half() {
    let d = dev();
    let mut x = vals(4099, 11);
    x.extend([
        0.0,
        -0.0,
        65504.0,
        65519.0,
        65520.0, // rounds to infinity
        -1e9,
        f32::INFINITY,
        6.0e-8,             // the smallest subnormal, about
        2.9e-8,             // below half of it: to zero
        6.1e-5,             // near the smallest normal
        1.0 + 1.0 / 2048.0, // a tie: to even
        f32::from_bits(0x3380_0001),
    ]);
    x.extend((0..200).map(|i| (i as f32 - 100.0) * 3.1e-7)); // subnormal range
    let mut h = Buf::filled(&d, x.len(), half::f16::from_bits(0x7e01)).unwrap();
    let mut back = Buf::filled(&d, x.len(), f32::NAN).unwrap();
    k::f16_roundtrip_selftest(&d, &up(&d, &x), &mut h, &mut back).unwrap();
    let (h, back) = (down(&h), down(&back));
    for (i, &v) in x.iter().enumerate() {
        let want = half::f16::from_f32(v);
        assert_eq!(h[i].to_bits(), want.to_bits(), "[{i}] {v:e}");
        assert_eq!(back[i].to_bits(), want.to_f32().to_bits(), "[{i}] {v:e}");
    }
    let mut h1 = Buf::filled(&d, 1, half::f16::ZERO).unwrap();
    let mut b1 = Buf::filled(&d, 1, 0.0f32).unwrap();
    k::f16_roundtrip_selftest(&d, &up(&d, &[f32::NAN]), &mut h1, &mut b1).unwrap();
    assert!(down(&h1)[0].is_nan() && down(&b1)[0].is_nan());
}

/// Operands of the mma self-test, from A [16][16] and B [16][8] given as f32 (exact in bf16).
pub struct MmaCase {
    a: Vec<half::bf16>,
    b: Vec<half::bf16>,
    c: Vec<f32>,
}

impl MmaCase {
    fn new(a: &[f32], b: &[f32], c: &[f32]) -> Self {
        MmaCase {
            a: bf16s(a),
            b: bf16s(b),
            c: c.to_vec(),
        }
    }

    pub fn integers(seed: u64) -> Self {
        let f = |n, s| -> Vec<f32> { small_ints(n, s, -8, 8).iter().map(|&v| v as f32).collect() };
        Self::new(&f(256, seed), &f(128, seed + 1), &f(128, seed + 2))
    }

    pub fn random(seed: u64) -> Self {
        Self::new(&vals(256, seed), &vals(128, seed + 1), &vals(128, seed + 2))
    }

    /// D on `dev` through fragment-loading `mode`.
    pub fn run(&self, dev: &KernelDevice, mode: i32) -> Vec<f32> {
        let t = |m: &[half::bf16], rows: usize, cols: usize| -> Vec<half::bf16> {
            (0..cols * rows)
                .map(|i| m[(i % rows) * cols + i / rows])
                .collect()
        };
        let (a, at) = (up(dev, &self.a), up(dev, &t(&self.a, 16, 16)));
        let (b, bt) = (up(dev, &self.b), up(dev, &t(&self.b, 16, 8)));
        let c = up(dev, &self.c);
        let mut d = Buf::filled(dev, 128, f32::NAN).unwrap();
        let ops = k::MmaOperands {
            a: &a,
            at: &at,
            bt: &bt,
            b: &b,
            c: &c,
        };
        k::mma_selftest(dev, &ops, &mut d, mode).unwrap();
        down(&d)
    }

    /// A·B + C in f64, and Σ|a·b| per element (for the accumulation-order bound).
    pub fn reference(&self) -> (Vec<f64>, Vec<f64>) {
        let (mut d, mut mag) = (vec![0.0; 128], vec![0.0; 128]);
        for i in 0..16 {
            for j in 0..8 {
                let mut acc = self.c[i * 8 + j] as f64;
                let mut m = self.c[i * 8 + j].abs() as f64;
                for kk in 0..16 {
                    let p = self.a[i * 16 + kk].to_f64() * self.b[kk * 8 + j].to_f64();
                    acc += p;
                    m += p.abs();
                }
                d[i * 8 + j] = acc;
                mag[i * 8 + j] = m;
            }
        }
        (d, mag)
    }
}

/// |got − want| ≤ 2·K·2⁻²⁴·Σ|aᵢbᵢ| per element (K = 16 products plus C).
pub fn within_accumulation_bound(got: &[f32], want: &[f64], mag: &[f64]) -> Option<usize> {
    (0..got.len()).find(|&i| {
        let err = (got[i] as f64 - want[i]).abs();
        err.is_nan() || err > 2.0 * 17.0 * 2f64.powi(-24) * mag[i]
    })
}

#[test]
fn mma_ldmatrix_cp_async_wrappers_compute_a_b_plus_c() {
    let d = dev();
    for seed in [1u64, 2, 3] {
        // Integer-valued inputs: every partial sum is exact, so D must equal A·B + C exactly
        // whatever the accumulation order, through every way of loading the fragments.
        let case = MmaCase::integers(seed);
        let (want, _) = case.reference();
        for mode in 0..4 {
            for shuffle in [None, Some(seed)] {
                k::set_emu_shuffle(Some(shuffle));
                let got = case.run(&d, mode);
                let exact: Vec<f32> = want.iter().map(|&v| v as f32).collect();
                assert_eq!(
                    got, exact,
                    "integers seed {seed} mode {mode} shuffle {shuffle:?}"
                );
            }
        }
        k::set_emu_shuffle(None);
        let case = MmaCase::random(seed + 10);
        let (want, mag) = case.reference();
        for mode in 0..4 {
            let got = case.run(&d, mode);
            assert_eq!(
                within_accumulation_bound(&got, &want, &mag),
                None,
                "random seed {seed} mode {mode}"
            );
        }
    }
}

/// The hardware self-test (tools/gpu-check.sh runs it with REEL_TEST_DEVICE=cuda): each
/// emulated wrapper on the GPU and on the emulator with the same inputs. Integer-valued
/// inputs must agree bit for bit (which proves the emulated fragment layouts); random ones
/// within the accumulation-order bound. Warp operations and f16 conversion must agree
/// exactly.
#[test]
fn hw_selftest_wrappers_agree_with_emulation() {
    let gpu = dev();
    if !gpu.is_cuda() {
        eprintln!("hw_selftest: REEL_TEST_DEVICE is not cuda; nothing to compare (tools/gpu-check.sh runs it)");
        return;
    }
    let emu = KernelDevice::Emu;
    let mut report = Vec::new();
    for seed in 1..=8u64 {
        let case = MmaCase::integers(seed);
        for mode in 0..4 {
            let (hw, em) = (case.run(&gpu, mode), case.run(&emu, mode));
            let same = hw.iter().zip(&em).all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(
                same,
                "mma integers seed {seed} mode {mode}: hw {hw:?} emu {em:?}"
            );
        }
        let case = MmaCase::random(100 + seed);
        let (_, mag) = case.reference();
        for mode in 0..4 {
            let (hw, em) = (case.run(&gpu, mode), case.run(&emu, mode));
            let em64: Vec<f64> = em.iter().map(|&v| v as f64).collect();
            let worst = hw
                .iter()
                .zip(&em)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0f32, f32::max);
            assert_eq!(
                within_accumulation_bound(&hw, &em64, &mag),
                None,
                "mma random seed {seed} mode {mode}"
            );
            report.push(worst);
        }
    }
    for block in [32usize, 256] {
        let x = small_ints(4 * block, block as u64, -40, 40);
        let run = |d: &KernelDevice| {
            let mut out = Buf::filled(d, k::WARP_OPS_OUTPUTS * x.len(), 0).unwrap();
            k::warp_ops_selftest(d, &up(d, &x), &mut out, block).unwrap();
            down(&out)
        };
        assert_eq!(run(&gpu), run(&emu), "warp ops, block {block}");
    }
    let x = small_ints(k::BARRIER_THREADS, 77, -40, 40);
    let barriers = |d: &KernelDevice| {
        let mut out = Buf::filled(d, k::BARRIER_OUTPUTS * x.len(), 0).unwrap();
        k::barrier_selftest(d, &up(d, &x), &mut out).unwrap();
        down(&out)
    };
    assert_eq!(barriers(&gpu), barriers(&emu), "barriers");
    // cp.async with every group waited for: every byte, zero fill included, alike.
    let src = vals(k::CP_ASYNC_FLOATS, 8);
    let cp = |d: &KernelDevice| {
        let mut out = Buf::filled(d, 32 * k::CP_ASYNC_FLOATS, 0.0f32).unwrap();
        k::cp_async_selftest(d, &up(d, &src), &mut out, 4, 0, 6).unwrap();
        down(&out).iter().map(|v| v.to_bits()).collect::<Vec<_>>()
    };
    assert_eq!(cp(&gpu), cp(&emu), "cp.async");
    let x = vals(4096, 13);
    let vector = |d: &KernelDevice| {
        let mut y = Buf::filled(d, x.len(), half::bf16::ZERO).unwrap();
        let mut back = Buf::filled(d, x.len(), 0.0f32).unwrap();
        let mut bits = Buf::filled(d, x.len() / 4, 0).unwrap();
        k::vector_types_selftest(d, &up(d, &x), &mut y, &mut back, &mut bits).unwrap();
        let y: Vec<u16> = down(&y).iter().map(|v| v.to_bits()).collect();
        (y, down(&bits))
    };
    assert_eq!(vector(&gpu), vector(&emu), "vector types and bf16 pairs");
    let x = vals(100_000, 5);
    let f16 = |d: &KernelDevice| {
        let mut h = Buf::filled(d, x.len(), half::f16::ZERO).unwrap();
        let mut b = Buf::filled(d, x.len(), 0.0f32).unwrap();
        k::f16_roundtrip_selftest(d, &up(d, &x), &mut h, &mut b).unwrap();
        down(&h).iter().map(|v| v.to_bits()).collect::<Vec<_>>()
    };
    assert_eq!(f16(&gpu), f16(&emu), "f16 conversion");
    eprintln!(
        "hw_selftest on {}: mma integer inputs bit-exact in 4 load modes x 8 seeds; random inputs max |hw-emu| = {:.3e}; warp ops, barriers, cp.async, bf16 pairs and f16 exact",
        gpu.describe(),
        report.iter().fold(0.0f32, |a, &b| a.max(b))
    );
}

#[test]
fn dynamic_shared_memory_within_the_opt_in_and_the_architecture() {
    use reel::kernels::emu_checks::dyn_shared;
    let d = dev();
    let arch = d.arch().unwrap();
    let run = |floats: usize, shared: u32, opt_in: u32| {
        let mut out = Buf::filled(&d, floats, f32::NAN).unwrap();
        dyn_shared(&d, &mut out, shared, opt_in).map(|()| down(&out))
    };
    let reversed = |n: usize| (0..n).rev().map(|i| i as f32).collect::<Vec<_>>();
    // 40 KiB dynamic + 4 KiB static: within 48 KiB, no opt-in needed.
    assert_eq!(run(10_240, 40 * 1024, 0).unwrap(), reversed(10_240));
    // 64 KiB needs an opt-in: refused without, run with (the cuda device sets the attribute).
    let e = run(16_384, 64 * 1024, 0).unwrap_err().to_string();
    assert!(
        e.contains("dyn_shared_check") && e.contains("without an opt-in"),
        "{e}"
    );
    assert_eq!(run(16_384, 64 * 1024, 64 * 1024).unwrap(), reversed(16_384));
    // Over the opt-in.
    let e = run(16_384, 64 * 1024, 60 * 1024).unwrap_err().to_string();
    assert!(e.contains("exceed the kernel's opt-in"), "{e}");
    // 46 KiB dynamic + 4 KiB static exceeds 48 KiB without an opt-in: the emulator sees the
    // static part only when the kernel declares it; the driver refuses the launch.
    let e = run(11_776, 46 * 1024, 0).unwrap_err().to_string();
    if !d.is_cuda() {
        assert!(
            e.contains("bytes of static shared memory") && e.contains("thread (0,0,0)"),
            "{e}"
        );
    }
    // The whole block's worth: the architecture's maximum minus the 4 KiB of static.
    let most = arch.max_shared_per_block - 4096;
    let n = most as usize / 4;
    assert_eq!(run(n, most, most).unwrap(), reversed(n));
    let e = run(n, most, most + 4096 + 1).unwrap_err().to_string();
    assert!(e.contains("opt-in") && e.contains("exceeds"), "{e}");
}

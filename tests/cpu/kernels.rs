//! Kernels against the CPU reference on the kernel device REEL_TEST_DEVICE names (the SIMT
//! emulator by default; `cuda` on a GPU machine, see tools/gpu-check.sh), the emulator's
//! own tests (barriers, warp operations, the mma/ldmatrix/cp.async wrappers), the hardware
//! self-test (GPU only) and static checks of the nvcc build (ptxas spills, sm_90a code).

use reel::kernels::{self as k, Buf, Elem, KernelDevice, FATBINS, PTXAS_REPORTS};

/// The device under test.
fn dev() -> KernelDevice {
    KernelDevice::from_test_env().expect("REEL_TEST_DEVICE")
}

fn up<T: Elem>(d: &KernelDevice, v: &[T]) -> Buf<T> {
    Buf::upload(d, v).unwrap()
}

fn down<T: Elem>(b: &Buf<T>) -> Vec<T> {
    b.download().unwrap()
}

fn vals(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = reel::models::random::Normal::new(seed);
    (0..n).map(|_| 3.0 * rng.sample()).collect()
}

#[test]
fn emu_gelu_matches_cpu_reference() {
    for n in [1usize, 255, 257, 100_003] {
        let x = vals(n, n as u64);
        let d = dev();
        let mut yb = Buf::filled(&d, n, f32::NAN).unwrap(); // poisoned: every element must be written
        k::gelu_tanh_f32(&d, &up(&d, &x), &mut yb).unwrap();
        let y = down(&yb);
        let mut want = x.clone();
        reel::cpu::gelu(&mut want);
        for (i, (&a, &b)) in y.iter().zip(&want).enumerate() {
            assert!(a.is_finite(), "n={n}: element {i} not written");
            assert!(
                (a - b).abs() <= 2e-6 * (1.0 + b.abs()),
                "n={n} [{i}]: emu {a} vs cpu {b}"
            );
        }
    }
    let d = dev();
    let mut two = Buf::filled(&d, 2, 0.0f32).unwrap();
    assert!(k::gelu_tanh_f32(&d, &up(&d, &[1.0]), &mut two).is_err());
}

#[test]
fn emu_shuffle_catches_a_missing_syncthreads() {
    let d = KernelDevice::Emu; // the shuffle mode is the emulator's
    let shift = |x: &[f32], sync: bool| {
        let mut y = Buf::filled(&d, x.len(), f32::NAN).unwrap();
        k::shift_shared(&d, &up(&d, x), &mut y, sync).unwrap();
        down(&y)
    };
    let n = 200;
    let expect =
        |x: &[f32]| -> Vec<f32> { (0..n).map(|t| x[if t == 0 { 0 } else { t - 1 }]).collect() };
    // In thread order the racy kernel happens to pass: that is why the shuffle mode exists.
    k::set_emu_shuffle(Some(None));
    let x = vals(n, 1);
    assert_eq!(shift(&x, false), expect(&x));
    // With the barrier, every shuffled order is right.
    for seed in 0..8 {
        k::set_emu_shuffle(Some(Some(seed)));
        let x = vals(n, 100 + seed);
        assert_eq!(shift(&x, true), expect(&x), "seed {seed}");
    }
    // Without it, shuffled orders read neighbours that have not written yet.
    let mut caught = 0;
    for seed in 0..8 {
        k::set_emu_shuffle(Some(Some(seed)));
        let x = vals(n, 200 + seed);
        if shift(&x, false) != expect(&x) {
            caught += 1;
        }
    }
    k::set_emu_shuffle(None);
    assert_eq!(
        caught,
        8,
        "the shuffle mode missed the race in {} of 8 runs",
        8 - caught
    );
}

#[test]
fn nvcc_build_has_sm90a_code_and_no_spills() {
    if env!("REEL_NVCC").is_empty() {
        // Only a build without nvcc gets here; CI sets REEL_REQUIRE_NVCC=1, so it never does.
        eprintln!("no nvcc in this build: static checks skipped");
        return;
    }
    assert!(
        !FATBINS.is_empty(),
        "nvcc was found but no fatbin was embedded"
    );
    for (name, report) in PTXAS_REPORTS {
        let spills: Vec<&str> = report
            .lines()
            .filter(|l| {
                l.contains("spill") && !l.contains(" 0 bytes spill stores, 0 bytes spill loads")
            })
            .collect();
        assert!(
            spills.is_empty(),
            "{name}: ptxas reports spills: {spills:?}"
        );
        assert!(
            report.contains("sm_90a") && report.contains("sm_80"),
            "{name}: {report}"
        );
    }
    let cuobjdump = env!("REEL_CUOBJDUMP");
    let dir = crate::scratch("fatbins");
    for (name, bytes) in FATBINS {
        let path = dir.join(format!("{name}.fatbin"));
        std::fs::write(&path, bytes).unwrap();
        let o = std::process::Command::new(cuobjdump)
            .arg("--list-elf")
            .arg(&path)
            .output()
            .unwrap();
        let listing = String::from_utf8_lossy(&o.stdout);
        assert!(
            o.status.success() && listing.contains("sm_90a"),
            "{name}: {listing}"
        );
        let o = std::process::Command::new(cuobjdump)
            .arg("--list-ptx")
            .arg(&path)
            .output()
            .unwrap();
        assert!(
            String::from_utf8_lossy(&o.stdout).contains("sm_80"),
            "{name}: no compute_80 PTX"
        );
    }
}

#[test]
fn emu_bf16_conversions_match_half() {
    let mut x = vals(10_007, 9);
    x.extend([
        0.0,
        -0.0,
        f32::INFINITY,
        f32::NEG_INFINITY,
        1e-40,
        3.4e38,
        f32::from_bits(0x3F80_8000), // 1 + 2^-8: a tie, rounds to even (down)
        f32::from_bits(0x3F81_8000), // 1 + 3·2^-8: a tie, rounds to even (up)
    ]);
    let d = dev();
    let mut bb = Buf::filled(&d, x.len(), half::bf16::from_bits(0x7fc1)).unwrap();
    k::f32_to_bf16(&d, &up(&d, &x), &mut bb).unwrap();
    let b = down(&bb);
    for (i, (&got, &v)) in b.iter().zip(&x).enumerate() {
        assert_eq!(
            got.to_bits(),
            half::bf16::from_f32(v).to_bits(),
            "[{i}] {v}"
        );
    }
    let mut backb = Buf::filled(&d, x.len(), f32::NAN).unwrap();
    k::bf16_to_f32(&d, &bb, &mut backb).unwrap();
    let back = down(&backb);
    assert!(back
        .iter()
        .zip(&b)
        .all(|(&f, &h)| f.to_bits() == h.to_f32().to_bits()));
    let mut nan = Buf::filled(&d, 1, half::bf16::ZERO).unwrap();
    k::f32_to_bf16(&d, &up(&d, &[f32::NAN]), &mut nan).unwrap();
    assert!(down(&nan)[0].is_nan());
}

#[test]
fn emu_layernorm_modulate_bf16_matches_cpu_within_bf16_rounding() {
    use half::bf16;
    for (rows_per_group, groups, d) in [(5usize, 3usize, 333usize), (2, 2, 1536), (1, 1, 7)] {
        let rows = rows_per_group * groups;
        let x: Vec<bf16> = vals(rows * d, d as u64)
            .iter()
            .map(|&v| bf16::from_f32(v + 0.5))
            .collect();
        let mul: Vec<f32> = vals(groups * d, 7).iter().map(|v| 1.0 + 0.1 * v).collect();
        let add: Vec<f32> = vals(groups * d, 8).iter().map(|v| 0.1 * v).collect();
        let dv = dev();
        let mut yb = Buf::filled(&dv, rows * d, bf16::from_bits(0x7fc1)).unwrap(); // poisoned with NaN
        k::layernorm_modulate_bf16(
            &dv,
            &up(&dv, &x),
            &mut yb,
            d,
            &up(&dv, &mul),
            &up(&dv, &add),
            rows_per_group,
            1e-6,
        )
        .unwrap();
        let y = down(&yb);
        // The f32 oracle on the same (bf16) inputs, and the naive bf16 reference: the oracle
        // rounded to bf16.
        let xf: Vec<f32> = x.iter().map(|v| v.to_f32()).collect();
        let mut want = vec![0.0f32; rows * d];
        reel::cpu::layer_norm(
            &xf,
            &mut want,
            d,
            1e-6,
            Some(&mul),
            Some(&add),
            rows_per_group,
        );
        let want64: Vec<f64> = want.iter().map(|&v| v as f64).collect();
        let got: Vec<f32> = y.iter().map(|v| v.to_f32()).collect();
        assert!(
            got.iter().all(|v| v.is_finite()),
            "d={d}: unwritten or non-finite outputs"
        );
        let naive: Vec<f32> = want.iter().map(|&v| bf16::from_f32(v).to_f32()).collect();
        let err = reel::tensor::rel_l2(&got, &want64);
        let naive_err = reel::tensor::rel_l2(&naive, &want64);
        assert!(
            err <= 1e-2 && err <= 2.0 * naive_err,
            "d={d}: rel L2 {err:.3e} (naive bf16 {naive_err:.3e})"
        );
    }
}

/// bf16 kernel vs the f32 CPU oracle on the same (bf16) inputs: relative L2 ≤ 1e-2 and no
/// worse than 2× the naive bf16 reference (the oracle rounded to bf16).
fn check_bf16(name: &str, got: &[half::bf16], want: &[f32]) {
    let g: Vec<f32> = got.iter().map(|v| v.to_f32()).collect();
    assert!(
        g.iter().all(|v| v.is_finite()),
        "{name}: unwritten or non-finite outputs"
    );
    let w64: Vec<f64> = want.iter().map(|&v| v as f64).collect();
    let naive: Vec<f32> = want
        .iter()
        .map(|&v| half::bf16::from_f32(v).to_f32())
        .collect();
    let (err, naive_err) = (
        reel::tensor::rel_l2(&g, &w64),
        reel::tensor::rel_l2(&naive, &w64),
    );
    assert!(
        err <= 1e-2 && err <= 2.0 * naive_err.max(1e-7),
        "{name}: rel L2 {err:.3e} (naive bf16 {naive_err:.3e})"
    );
}

fn bf16s(v: &[f32]) -> Vec<half::bf16> {
    v.iter().map(|&x| half::bf16::from_f32(x)).collect()
}

fn f32s(v: &[half::bf16]) -> Vec<f32> {
    v.iter().map(|x| x.to_f32()).collect()
}

#[test]
fn emu_rms_norm_rope_bf16_matches_cpu() {
    for (heads, hd, grid) in [
        (2usize, 16usize, [2usize, 3, 2]),
        (3, 24, [1, 2, 5]),
        (1, 128, [3, 2, 2]),
    ] {
        let d = heads * hd;
        let rope = reel::cpu::wan_rope_tables(hd, grid[0], grid[1], grid[2], 10000.0);
        let rows = 2 * rope.tokens; // batch 2: rows wrap around the tables
        let x = bf16s(&vals(rows * d, d as u64));
        let bias: Vec<f32> = vals(d, 3).iter().map(|v| 0.1 * v).collect();
        let w: Vec<f32> = vals(d, 4).iter().map(|v| 1.0 + 0.1 * v).collect();
        for with_rope in [true, false] {
            let r = with_rope.then_some(&rope);
            let dv = dev();
            let (cos, sin) = (up(&dv, &rope.cos), up(&dv, &rope.sin));
            let rb = with_rope.then_some(k::Rope {
                cos: &cos,
                sin: &sin,
                head_dim: rope.head_dim,
                tokens: rope.tokens,
            });
            let mut gb = up(&dv, &x);
            k::rms_norm_rope_bf16(
                &dv,
                &mut gb,
                d,
                Some(&up(&dv, &bias)),
                &up(&dv, &w),
                1e-6,
                rb,
            )
            .unwrap();
            let got = down(&gb);
            let mut want = f32s(&x);
            reel::cpu::rms_norm_rope(&mut want, d, Some(&bias), &w, 1e-6, r);
            check_bf16(
                &format!("rms_norm_rope hd={hd} rope={with_rope}"),
                &got,
                &want,
            );
        }
    }
}

#[test]
fn emu_channel_rms_silu_bf16_matches_cpu() {
    for (rows, c) in [(37usize, 8usize), (5, 96), (3, 384)] {
        let x = bf16s(&vals(rows * c, c as u64));
        let gamma: Vec<f32> = vals(c, 5).iter().map(|v| 1.0 + 0.1 * v).collect();
        for silu in [true, false] {
            let dv = dev();
            let mut gb = up(&dv, &x);
            k::channel_rms_silu_bf16(&dv, &mut gb, c, &up(&dv, &gamma), silu).unwrap();
            let got = down(&gb);
            let mut want = f32s(&x);
            reel::cpu::channel_rms_norm(&mut want, c, &gamma, silu);
            check_bf16(&format!("channel_rms c={c} silu={silu}"), &got, &want);
        }
    }
}

#[test]
fn emu_residual_gate_and_gelu_bf16_match_cpu() {
    let (per, groups, d) = (7usize, 3usize, 40usize);
    let rows = per * groups;
    let x = bf16s(&vals(rows * d, 1));
    let y = bf16s(&vals(rows * d, 2));
    let bias = vals(d, 3);
    let gate = vals(groups * d, 4);
    for (b, g) in [
        (Some(&bias[..]), Some(&gate[..])),
        (None, Some(&gate[..])),
        (Some(&bias[..]), None),
        (None, None),
    ] {
        let dv = dev();
        let (bb, gg) = (b.map(|v| up(&dv, v)), g.map(|v| up(&dv, v)));
        let mut gb = up(&dv, &x);
        k::residual_gate_bf16(&dv, &mut gb, &up(&dv, &y), d, bb.as_ref(), gg.as_ref(), per)
            .unwrap();
        let got = down(&gb);
        let mut want = f32s(&x);
        reel::cpu::residual_add(&mut want, &f32s(&y), d, b, g, per);
        check_bf16(
            &format!("residual bias={} gate={}", b.is_some(), g.is_some()),
            &got,
            &want,
        );
    }
    let x = bf16s(&vals(10_001, 6));
    let dv = dev();
    let mut gb = Buf::filled(&dv, x.len(), half::bf16::from_bits(0x7fc1)).unwrap();
    k::gelu_tanh_bf16(&dv, &up(&dv, &x), &mut gb).unwrap();
    let got = down(&gb);
    let mut want = f32s(&x);
    reel::cpu::gelu(&mut want);
    check_bf16("gelu_tanh_bf16", &got, &want);
}

/// What warp_ops_selftest computes, per CUDA's semantics, for one thread.
fn warp_ops_expected(x: &[i32], t: usize, block: usize) -> [i32; 8] {
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
    [sum, scan, down, idx8, ballot as i32, any, all, s16]
}

fn small_ints(n: usize, seed: u64, lo: i32, hi: i32) -> Vec<i32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            lo + (s % (hi - lo + 1) as u64) as i32
        })
        .collect()
}

#[test]
fn emu_warp_shuffles_and_votes_follow_cuda_semantics() {
    let d = dev();
    for (block, blocks, seed) in [(32usize, 1usize, 1u64), (96, 2, 2), (1024, 1, 3)] {
        let n = block * blocks;
        let mut x = small_ints(n, seed, -40, 40);
        x[5] = -60; // one warp where all(x > -50) is false
        for shuffle in [None, Some(7u64)] {
            k::set_emu_shuffle(Some(shuffle));
            let mut out = Buf::filled(&d, 8 * n, i32::MIN).unwrap();
            k::warp_ops_selftest(&d, &up(&d, &x), &mut out, block).unwrap();
            let got = down(&out);
            for t in 0..n {
                assert_eq!(
                    got[8 * t..8 * t + 8],
                    warp_ops_expected(&x, t, block),
                    "block {block}, thread {t}, shuffle {shuffle:?}"
                );
            }
        }
        k::set_emu_shuffle(None);
    }
    assert!(k::warp_ops_selftest(&d, &up(&d, &[0; 40]), &mut up(&d, &[0; 320]), 40).is_err());
}

#[test]
fn emu_f16_host_type_rounds_like_half() {
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
struct MmaCase {
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

    fn integers(seed: u64) -> Self {
        let f = |n, s| -> Vec<f32> { small_ints(n, s, -8, 8).iter().map(|&v| v as f32).collect() };
        Self::new(&f(256, seed), &f(128, seed + 1), &f(128, seed + 2))
    }

    fn random(seed: u64) -> Self {
        Self::new(&vals(256, seed), &vals(128, seed + 1), &vals(128, seed + 2))
    }

    /// D on `dev` through fragment-loading `mode`.
    fn run(&self, dev: &KernelDevice, mode: i32) -> Vec<f32> {
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
    fn reference(&self) -> (Vec<f64>, Vec<f64>) {
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
fn within_accumulation_bound(got: &[f32], want: &[f64], mag: &[f64]) -> Option<usize> {
    (0..got.len()).find(|&i| {
        let err = (got[i] as f64 - want[i]).abs();
        err.is_nan() || err > 2.0 * 17.0 * 2f64.powi(-24) * mag[i]
    })
}

#[test]
fn emu_mma_ldmatrix_cp_async_wrappers_compute_a_b_plus_c() {
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
    if !d.is_cuda() {
        // The kernel that skips cp.async's wait reads shared memory before the copies land:
        // the emulator defers copies to the wait, so the result is wrong.
        let case = MmaCase::integers(9);
        let want: Vec<f32> = case.reference().0.iter().map(|&v| v as f32).collect();
        assert_ne!(
            case.run(&d, 4),
            want,
            "a missing cp.async wait went unnoticed"
        );
    }
}

#[test]
fn cuda_device_without_a_driver_is_a_clear_error() {
    if reel::cuda::driver_present() && !FATBINS.is_empty() {
        eprintln!("libcuda is present: the no-driver error cannot be observed here");
        return;
    }
    let e = KernelDevice::cuda(0).unwrap_err().to_string();
    assert!(e.contains("libcuda") || e.contains("without nvcc"), "{e}");
    let e = KernelDevice::parse("bogus").unwrap_err().to_string();
    assert!(e.contains("\"bogus\"") && e.contains("cuda:N"), "{e}");
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
            let mut out = Buf::filled(d, 8 * x.len(), 0).unwrap();
            k::warp_ops_selftest(d, &up(d, &x), &mut out, block).unwrap();
            down(&out)
        };
        assert_eq!(run(&gpu), run(&emu), "warp ops, block {block}");
    }
    let x = vals(100_000, 5);
    let f16 = |d: &KernelDevice| {
        let mut h = Buf::filled(d, x.len(), half::f16::ZERO).unwrap();
        let mut b = Buf::filled(d, x.len(), 0.0f32).unwrap();
        k::f16_roundtrip_selftest(d, &up(d, &x), &mut h, &mut b).unwrap();
        down(&h).iter().map(|v| v.to_bits()).collect::<Vec<_>>()
    };
    assert_eq!(f16(&gpu), f16(&emu), "f16 conversion");
    eprintln!(
        "hw_selftest on {}: mma integer inputs bit-exact in 4 load modes x 8 seeds; random inputs max |hw-emu| = {:.3e}; warp ops and f16 exact",
        gpu.describe(),
        report.iter().fold(0.0f32, |a, &b| a.max(b))
    );
}

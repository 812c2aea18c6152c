//! reel's tensor-core GEMM (kernels/gemm.cu) on the device REEL_TEST_DEVICE names, against
//! the CPU f32 reference: M, N and K off the tiles, every variant, bias and GELU epilogues,
//! bf16 and f32 outputs, strided operands (slices of fused buffers), under REEL_EMU_SHUFFLE.

use half::bf16;
use reel::kernels::{self as k, Act, Buf, DevSlice};
use reel::tensor::rel_l2;

use crate::kernels::{bf16s, dev, down, f32s, up, vals};

#[derive(Clone, Copy, Debug)]
struct Case {
    m: usize,
    n: usize,
    k: usize,
    bias: bool,
    act: Act,
    /// Extra columns around A's rows (A a slice of a wider buffer, at this offset).
    a_pad: usize,
    /// Extra columns after C's rows (left untouched).
    c_pad: usize,
    /// Elements before each operand (2: not 16-byte aligned, the generic path).
    offset: usize,
}

fn case(m: usize, n: usize, k: usize) -> Case {
    Case {
        m,
        n,
        k,
        bias: true,
        act: Act::None,
        a_pad: 0,
        c_pad: 0,
        offset: 0,
    }
}

impl Case {
    /// Runs with output type O; returns C packed [M, N] as f32 and the variant.
    fn run<O: k::gemm::GemmOut + AsF32>(
        &self,
        seed: u64,
        poison: O,
    ) -> (Vec<f32>, Vec<f32>, &'static str) {
        let d = dev();
        let (m, n, kk) = (self.m, self.n, self.k);
        let a = bf16s(&vals(m * kk, seed));
        let w = bf16s(
            &vals(n * kk, seed + 1)
                .iter()
                .map(|v| v * 0.1)
                .collect::<Vec<_>>(),
        );
        let bias: Vec<f32> = vals(n, seed + 2);
        // A inside rows of lda = k + a_pad, starting a_pad / 2 columns in.
        let lda = kk + self.a_pad;
        let a_col = self.a_pad / 2;
        let mut a_buf = vec![bf16::from_f32(7.0); self.offset + m * lda];
        for r in 0..m {
            a_buf[self.offset + r * lda + a_col..][..kk].copy_from_slice(&a[r * kk..][..kk]);
        }
        let mut w_buf = vec![bf16::ZERO; self.offset];
        w_buf.extend_from_slice(&w);
        let ldc = n + self.c_pad;
        let (ab, wb, bb) = (up(&d, &a_buf), up(&d, &w_buf), up(&d, &bias));
        let cb: Buf<O> = Buf::filled(&d, self.offset + m * ldc, poison).unwrap();
        fn sub(s: DevSlice<'_, bf16>, off: usize) -> DevSlice<'_, bf16> {
            s.sub(off, s.len() - off).unwrap()
        }
        let variant = k::gemm(
            &d,
            (sub(ab.slice(), self.offset + a_col), lda),
            (sub(wb.slice(), self.offset), kk),
            self.bias.then(|| bb.slice()),
            (cb.slice().sub(self.offset, m * ldc).unwrap(), ldc),
            (m, n, kk),
            self.act,
        )
        .unwrap_or_else(|e| panic!("{self:?}: {e}"));
        let c = down(&cb);
        let mut got = Vec::with_capacity(m * n);
        for r in 0..m {
            let row = &c[self.offset + r * ldc..][..ldc];
            got.extend(row[..n].iter().map(|&v| v.as_f32()));
            for p in &row[n..] {
                assert_eq!(
                    bytemuck::bytes_of(p),
                    bytemuck::bytes_of(&poison),
                    "{self:?}: wrote past row {r}"
                );
            }
        }
        let mut want = vec![0.0f32; m * n];
        reel::cpu::linear(
            &f32s(&a),
            &f32s(&w),
            self.bias.then_some(&bias[..]),
            m,
            kk,
            n,
            &mut want,
        );
        if self.act == Act::GeluTanh {
            reel::cpu::gelu(&mut want);
        }
        (got, want, variant)
    }

    fn check_bf16(&self, seed: u64) -> &'static str {
        let (got, want, variant) = self.run::<bf16>(seed, bf16::from_bits(0x7fc1));
        let w64: Vec<f64> = want.iter().map(|&v| v as f64).collect();
        let naive: Vec<f32> = want.iter().map(|&v| bf16::from_f32(v).to_f32()).collect();
        assert!(
            got.iter().all(|v| v.is_finite()),
            "{self:?} ({variant}): unwritten outputs"
        );
        let (err, naive_err) = (rel_l2(&got, &w64), rel_l2(&naive, &w64));
        assert!(
            err <= 1e-2 && err <= 2.0 * naive_err.max(1e-7),
            "{self:?} ({variant}): rel L2 {err:.3e} (naive bf16 {naive_err:.3e})"
        );
        variant
    }

    fn check_f32(&self, seed: u64) -> &'static str {
        let (got, want, variant) = self.run::<f32>(seed, f32::NAN);
        let w64: Vec<f64> = want.iter().map(|&v| v as f64).collect();
        assert!(
            got.iter().all(|v| v.is_finite()),
            "{self:?} ({variant}): unwritten outputs"
        );
        // Exact bf16 products summed in f32 in another order than the CPU's.
        let err = rel_l2(&got, &w64);
        assert!(err <= 2e-5, "{self:?} ({variant}): rel L2 {err:.3e}");
        variant
    }
}

/// A GEMM output element as f32.
trait AsF32: Copy {
    fn as_f32(self) -> f32;
}
impl AsF32 for f32 {
    fn as_f32(self) -> f32 {
        self
    }
}
impl AsF32 for bf16 {
    fn as_f32(self) -> f32 {
        self.to_f32()
    }
}

#[test]
fn gemm_matches_cpu_off_the_tiles_in_every_variant() {
    let checks: [(Case, bool, &str); 8] = [
        (case(37, 53, 40), true, "gemm_f32_64x64"),
        (
            Case {
                act: Act::GeluTanh,
                ..case(130, 257, 72)
            },
            false,
            "gemm_bf16_64x64",
        ),
        (
            Case {
                bias: false,
                ..case(1, 300, 256)
            },
            true,
            "gemm_f32_64x64",
        ),
        (case(200, 96, 30), false, "gemm_bf16_any"), // K not a multiple of 8
        (
            Case {
                offset: 2,
                ..case(65, 70, 48)
            },
            true,
            "gemm_f32_any",
        ), // unaligned
        (
            Case {
                a_pad: 16,
                c_pad: 8,
                ..case(50, 40, 32)
            },
            false,
            "gemm_bf16_64x64",
        ),
        (
            Case {
                act: Act::GeluTanh,
                ..case(1100, 1030, 64)
            },
            false,
            "gemm_bf16_128x128",
        ),
        (
            Case {
                c_pad: 4,
                ..case(1030, 1100, 40)
            },
            true,
            "gemm_f32_128x128",
        ),
    ];
    for (i, (c, f32_out, variant)) in checks.iter().enumerate() {
        let got = if *f32_out {
            c.check_f32(i as u64)
        } else {
            c.check_bf16(i as u64)
        };
        assert_eq!(got, *variant, "{c:?}");
    }
}

#[test]
fn gemm_under_shuffled_schedules() {
    for seed in 0..3u64 {
        k::set_emu_shuffle(Some(Some(seed)));
        case(70, 90, 96).check_bf16(20 + seed);
        Case {
            act: Act::GeluTanh,
            ..case(33, 65, 64)
        }
        .check_f32(30 + seed);
    }
    k::set_emu_shuffle(None);
}

#[test]
fn gemm_rejects_what_it_cannot_run() {
    let d = dev();
    let a = up(&d, &[bf16::ZERO; 64]);
    let c: Buf<f32> = Buf::filled(&d, 64, 0.0).unwrap();
    let run = |m, n, kk, lda| {
        k::gemm(
            &d,
            (a.slice(), lda),
            (a.slice(), kk),
            None,
            (c.slice(), n),
            (m, n, kk),
            Act::None,
        )
        .unwrap_err()
        .to_string()
    };
    assert!(run(8, 8, 7, 7).contains("even"));
    assert!(run(9, 8, 8, 8).contains("do not fit"));
    assert!(
        run(8, 8, 8, 6).contains("do not fit"),
        "a row stride below K"
    );
    assert!(run(0, 8, 8, 8).contains("empty"));
}

#[test]
fn gemm_builds_to_tensor_core_code_without_spills_or_stack() {
    crate::kernels::tensor_core_code(
        "gemm",
        "gemm_",
        24, // 6 bf16 + 6 f16 variants × 2 targets
        &[
            "gemm_bf16_128x128",
            "gemm_f32_64x64",
            "gemm_bf16_any",
            "gemm_f16f32_128x128",
        ],
    );
}

/// On a GPU with cuBLASLt (tools/gpu-check.sh), the runtime's GEMM runs cuBLASLt: it must
/// agree with the CPU reference as reel's kernel does, epilogues included (cuBLASLt's GELU
/// must be the tanh approximation Wan uses).
#[test]
fn gemm_through_cublaslt_matches_cpu() {
    let d = dev();
    if reel::gpu::cublaslt::CublasLt::for_device(&d).is_none() {
        eprintln!(
            "no cuBLASLt on {}: reel's kernel is the GEMM here (tested above)",
            d.describe()
        );
        return;
    }
    for (m, n, kk, act, bias) in [
        (300usize, 520usize, 256usize, Act::GeluTanh, true),
        (65, 96, 64, Act::None, true),
        (128, 384, 128, Act::None, false),
    ] {
        let a = bf16s(&vals(m * kk, 1));
        let w = bf16s(&vals(n * kk, 2).iter().map(|v| v * 0.1).collect::<Vec<_>>());
        let b = vals(n, 3);
        let (ab, wb, bb) = (up(&d, &a), up(&d, &w), up(&d, &b));
        let mut want = vec![0.0f32; m * n];
        reel::cpu::linear(
            &f32s(&a),
            &f32s(&w),
            bias.then_some(&b[..]),
            m,
            kk,
            n,
            &mut want,
        );
        if act == Act::GeluTanh {
            reel::cpu::gelu(&mut want);
        }
        let w64: Vec<f64> = want.iter().map(|&v| v as f64).collect();
        let c16: Buf<bf16> = Buf::filled(&d, m * n, bf16::NAN).unwrap();
        let ran = reel::gpu::gemm::gemm(
            &d,
            (ab.slice(), kk),
            (wb.slice(), kk),
            bias.then(|| bb.slice()),
            (c16.slice(), n),
            (m, n, kk),
            act,
        )
        .unwrap();
        let got = f32s(&down(&c16));
        let naive: Vec<f32> = want.iter().map(|&v| bf16::from_f32(v).to_f32()).collect();
        let (err, naive_err) = (rel_l2(&got, &w64), rel_l2(&naive, &w64));
        assert!(
            err <= 1e-2 && err <= 2.0 * naive_err,
            "{m}x{n}x{kk} {act:?} via {ran}: rel L2 {err:.3e} (naive {naive_err:.3e})"
        );
        let c32: Buf<f32> = Buf::filled(&d, m * n, f32::NAN).unwrap();
        reel::gpu::gemm::gemm(
            &d,
            (ab.slice(), kk),
            (wb.slice(), kk),
            bias.then(|| bb.slice()),
            (c32.slice(), n),
            (m, n, kk),
            act,
        )
        .unwrap();
        let err = rel_l2(&down(&c32), &w64);
        assert!(
            err <= 1e-4,
            "{m}x{n}x{kk} f32 out via {ran}: rel L2 {err:.3e}"
        );
    }
}

#[test]
fn kernel_bench_gemm_samples_follow_the_documented_rules() {
    // bench/kernels_gpu.py rebuilds A and W from the hash and compares sampled outputs.
    let d = dev();
    let a = reel::kernel_bench::GemmBenchArgs {
        m: 70,
        n: 90,
        k: 40,
        reel_kernel: true,
        warmup: 0,
        repeat: 1,
        seed: 5,
        samples: 50,
    };
    let r = reel::kernel_bench::gemm(&d, &a).unwrap();
    let input = |n: usize, seed: u32| -> Vec<f32> {
        (0..n)
            .map(|i| k::hash_value(i as u32, seed, 1.0).to_f32())
            .collect()
    };
    let (x, w) = (input(70 * 40, 5), input(90 * 40, 6));
    assert_eq!(r.q_first, x[..8]);
    let mut want = vec![0.0f32; 70 * 90];
    reel::cpu::linear(&x, &w, None, 70, 40, 90, &mut want);
    let pos = reel::kernel_bench::sample_positions(want.len(), 50);
    let want: Vec<f64> = pos.iter().map(|&p| want[p] as f64).collect();
    let err = rel_l2(&r.sample, &want);
    assert!(err <= 1e-2, "{err:.3e}");
    assert_eq!((r.flops, r.kernel), (2 * 70 * 90 * 40, "gemm_bf16_64x64"));
}

//! The VAE's convolution kernel (kernels/conv3d.cu) on the device REEL_TEST_DEVICE names,
//! against the CPU reference (reel::cpu::conv::conv3d) on the same bf16-rounded inputs:
//! every variant, the Wan VAE's kernel shapes (3×3×3 causal, 3×1×1 temporal stride 2, 3×3
//! spatial stride 2 with the asymmetric padding, 1×1×1), null frames (causal zeros) at any
//! position, channels and pixels off the tiles, and the launcher's errors.

use half::bf16;
use reel::cpu::conv::{conv3d, upsample2x, ConvWeights, Frames};
use reel::kernels::{self as k, Buf, DevSlice, Half};
use reel::tensor::rel_l2;

use crate::kernels::{dev, down, up, vals};

fn hs<T: Half>(v: &[f32]) -> Vec<T> {
    v.iter().map(|&x| T::from_f32(x)).collect()
}

fn fs<T: Half>(v: &[T]) -> Vec<f32> {
    v.iter().map(|x| x.to_f32()).collect()
}

#[derive(Clone, Copy, Debug)]
struct Case {
    h: usize,
    w: usize,
    ci: usize,
    co: usize,
    k: [usize; 3],
    stride: [usize; 3],
    pad: [usize; 4],
    /// Input frames; those whose bit is set in `zeros` are passed as None.
    frames: usize,
    zeros: u32,
    /// Elements before every operand (odd: only the any-alignment variant applies).
    offset: usize,
    /// The frames read 2× upsampled (h and w are the stored frames').
    up: bool,
    /// The frames stored as the second half of pixels of 2·ci channels (ld = 2·ci: the
    /// temporal upsample's interleaved output).
    interleaved: bool,
    /// A residual added to the output.
    res: bool,
}

fn case(h: usize, w: usize, ci: usize, co: usize) -> Case {
    Case {
        h,
        w,
        ci,
        co,
        k: [3, 3, 3],
        stride: [1, 1, 1],
        pad: [1, 1, 1, 1],
        frames: 4,
        zeros: 0b11, // the causal padding of a first chunk
        offset: 0,
        up: false,
        interleaved: false,
        res: false,
    }
}

impl Case {
    fn check<T: Half>(&self, seed: u64) -> &'static str {
        let d = dev();
        let (h, w, ci, co) = (self.h, self.w, self.ci, self.co);
        let kvol: usize = self.k.iter().product();
        let fl = h * w * ci;
        let inputs: Vec<Option<Vec<T>>> = (0..self.frames)
            .map(|i| (self.zeros >> i & 1 == 0).then(|| hs::<T>(&vals(fl, seed + i as u64))))
            .collect();
        // Weights scaled so outputs are O(1) whatever the fan-in.
        let scale = 1.0 / ((ci * kvol) as f32).sqrt() / 3.0;
        let wt = hs::<T>(
            &vals(co * ci * kvol, seed + 100)
                .iter()
                .map(|v| v * scale)
                .collect::<Vec<_>>(),
        );
        let bias = vals(co, seed + 101);
        let pre = vec![T::from_f32(5.0); self.offset];
        let with_pre = |v: &[T]| [&pre[..], v].concat();
        // Interleaved: pixel p of the frame at [p][ci..2ci) of a [h·w][2ci] buffer whose
        // first halves are junk (the frame's slice starts ci elements in).
        let stored = |f: &[T]| -> Vec<T> {
            if !self.interleaved {
                return with_pre(f);
            }
            let junk = T::from_f32(-9.0);
            let mut v = pre.clone();
            for px in f.chunks(ci) {
                v.extend(std::iter::repeat_n(junk, ci));
                v.extend_from_slice(px);
            }
            v
        };
        let lead = if self.interleaved { ci } else { 0 };
        let bufs: Vec<Option<Buf<T>>> = inputs
            .iter()
            .map(|f| f.as_ref().map(|f| up(&d, &stored(f))))
            .collect();
        let dw = hs::<T>(&k::conv3d::device_weights(&fs(&wt), co, ci, self.k));
        let (wb, bb) = (up(&d, &with_pre(&dw)), up(&d, &bias));
        let shape = k::conv3d::ConvShape {
            ld: if self.interleaved { 2 * ci } else { ci },
            up: self.up,
            ..k::conv3d::ConvShape::new((h, w, ci, co), self.k, self.stride, self.pad)
        };
        let (t_out, h_out, w_out) = shape.out_size(self.frames).unwrap();
        let out_len = t_out * h_out * w_out * co;
        let res = hs::<T>(&vals(out_len, seed + 102));
        let rb = up(&d, &res);
        let poison = T::from_f32(f32::NAN);
        let ob = Buf::filled(&d, self.offset + out_len + 7, poison).unwrap();
        fn sub<T: Half>(s: DevSlice<'_, T>, off: usize) -> DevSlice<'_, T> {
            s.sub(off, s.len() - off).unwrap()
        }
        let frames: Vec<Option<DevSlice<'_, T>>> = bufs
            .iter()
            .map(|b| b.as_ref().map(|b| sub(b.slice(), self.offset + lead)))
            .collect();
        let (dims, variant) = k::conv3d::conv3d(
            &d,
            &frames,
            sub(wb.slice(), self.offset),
            bb.slice(),
            self.res.then(|| rb.slice()),
            ob.slice().sub(self.offset, out_len).unwrap(),
            shape,
        )
        .unwrap_or_else(|e| panic!("{self:?}: {e}"));
        assert_eq!(dims, (t_out, h_out, w_out));
        let all = down(&ob);
        for (i, v) in all[..self.offset]
            .iter()
            .chain(&all[self.offset + out_len..])
            .enumerate()
        {
            assert!(v.to_f32().is_nan(), "{self:?}: wrote outside out ({i})");
        }
        let got = fs(&all[self.offset..][..out_len]);
        assert!(
            got.iter().all(|v| v.is_finite()),
            "{self:?} ({variant}): unwritten outputs"
        );
        let (hs, ws) = shape.seen();
        let f32_inputs: Vec<Option<Vec<f32>>> = inputs
            .iter()
            .map(|f| {
                f.as_ref().map(|f| {
                    let fr = Frames {
                        t: 1,
                        h,
                        w,
                        c: ci,
                        data: fs(f),
                    };
                    if self.up {
                        upsample2x(&fr).unwrap().data
                    } else {
                        fr.data
                    }
                })
            })
            .collect();
        let refs: Vec<Option<&[f32]>> = f32_inputs.iter().map(|f| f.as_deref()).collect();
        let cw = ConvWeights::new(&fs(&wt), &bias, co, ci, self.k);
        let mut want = conv3d(&refs, hs, ws, &cw, self.stride, self.pad).unwrap();
        assert_eq!((want.t, want.h, want.w), (t_out, h_out, w_out));
        if self.res {
            for (o, r) in want.data.iter_mut().zip(&res) {
                *o += r.to_f32();
            }
        }
        let w64: Vec<f64> = want.data.iter().map(|&v| v as f64).collect();
        let naive: Vec<f32> = want.data.iter().map(|&v| T::from_f32(v).to_f32()).collect();
        let (err, naive_err) = (rel_l2(&got, &w64), rel_l2(&naive, &w64));
        assert!(
            err <= 2.0 * naive_err.max(1e-7),
            "{self:?} ({variant}): rel L2 {err:.3e} (rounding to storage {naive_err:.3e})"
        );
        variant
    }
}

#[test]
fn conv3d_matches_cpu_in_every_variant_and_vae_shape() {
    let checks: Vec<(Case, &str)> = vec![
        // Causal 3×3×3 on a first chunk (two zero frames), channels off the tile: K steps
        // with a partial tail, pixels 5·7 = 35 < 64.
        (case(5, 7, 40, 24), "conv3d_bf16_c8"),
        // The tiny VAE's 12 channels: 4-byte copies; outputs past 64 channels and pixels.
        (
            Case {
                zeros: 0b1,
                ..case(9, 11, 12, 70)
            },
            "conv3d_bf16_c2",
        ),
        // The encoder's first conv on RGB (3 channels), no zero frames, 8 frames in.
        (
            Case {
                frames: 8,
                zeros: 0,
                ..case(6, 5, 3, 16)
            },
            "conv3d_bf16_c1",
        ),
        // A zero frame in the middle (a null cache entry), ci a multiple of BK.
        (
            Case {
                zeros: 0b100,
                frames: 5,
                ..case(4, 4, 64, 32)
            },
            "conv3d_bf16_c8",
        ),
        // The downsampler's spatial conv: 3×3, stride 2, padding bottom/right only.
        (
            Case {
                k: [1, 3, 3],
                stride: [1, 2, 2],
                pad: [0, 1, 0, 1],
                frames: 2,
                zeros: 0,
                ..case(9, 10, 24, 24)
            },
            "conv3d_bf16_c8",
        ),
        // The downsampler's time conv: 3×1×1, stride 2 in time.
        (
            Case {
                k: [3, 1, 1],
                stride: [2, 1, 1],
                pad: [0; 4],
                frames: 7,
                zeros: 0,
                ..case(3, 5, 16, 32)
            },
            "conv3d_bf16_c8",
        ),
        // A 1×1×1 shortcut with 96 → 40 channels over 70 pixels.
        (
            Case {
                k: [1, 1, 1],
                pad: [0; 4],
                frames: 3,
                zeros: 0,
                ..case(7, 10, 96, 40)
            },
            "conv3d_bf16_c8",
        ),
        // Operands off 4-byte alignment: the plain-load variant whatever the channels.
        (
            Case {
                offset: 1,
                ..case(5, 6, 32, 8)
            },
            "conv3d_bf16_c1",
        ),
        // Off 16 bytes but on 4: the 4-byte variant.
        (
            Case {
                offset: 2,
                ..case(5, 6, 32, 8)
            },
            "conv3d_bf16_c2",
        ),
        // The decoder's upsampling conv: 3×3 on 2× nearest-upsampled frames, read from
        // interleaved frames (the temporal upsample's output), with a residual.
        (
            Case {
                k: [1, 3, 3],
                frames: 4,
                zeros: 0,
                up: true,
                interleaved: true,
                res: true,
                ..case(5, 7, 16, 8)
            },
            "conv3d_bf16_c8",
        ),
        (
            Case {
                k: [1, 3, 3],
                frames: 2,
                zeros: 0,
                up: true,
                ..case(6, 3, 12, 20)
            },
            "conv3d_bf16_c2",
        ),
        // A resnet's second conv with the shortcut fused.
        (
            Case {
                res: true,
                ..case(7, 5, 24, 24)
            },
            "conv3d_bf16_c8",
        ),
    ];
    for (i, (c, want)) in checks.iter().enumerate() {
        let got = c.check::<bf16>(i as u64 * 1000);
        assert_eq!(got, *want, "{c:?}: variant");
    }
}

/// The f16 build of every variant (the VAE's default storage) on the same shapes' kinds.
#[test]
fn conv3d_f16_matches_cpu_in_every_variant() {
    let checks: Vec<(Case, &str)> = vec![
        (case(5, 7, 40, 24), "conv3d_f16_c8"),
        (
            Case {
                zeros: 0b1,
                ..case(9, 11, 12, 70)
            },
            "conv3d_f16_c2",
        ),
        (
            Case {
                frames: 8,
                zeros: 0,
                ..case(6, 5, 3, 16)
            },
            "conv3d_f16_c1",
        ),
        (
            Case {
                k: [1, 3, 3],
                frames: 4,
                zeros: 0,
                up: true,
                interleaved: true,
                res: true,
                ..case(5, 7, 16, 8)
            },
            "conv3d_f16_c8",
        ),
        (
            Case {
                k: [3, 1, 1],
                stride: [2, 1, 1],
                pad: [0; 4],
                frames: 7,
                zeros: 0,
                offset: 1,
                ..case(3, 5, 16, 32)
            },
            "conv3d_f16_c1",
        ),
    ];
    for (i, (c, want)) in checks.iter().enumerate() {
        let got = c.check::<half::f16>(i as u64 * 1000 + 7);
        assert_eq!(got, *want, "{c:?}: variant");
    }
}

/// Blocks in shuffled orders (REEL_EMU_SHUFFLE): a causal conv with a null frame and an
/// upsampling conv with a residual, bf16 and f16.
#[test]
fn conv3d_under_shuffled_schedules() {
    for seed in 0..2u64 {
        k::set_emu_shuffle(Some(Some(seed)));
        case(9, 11, 24, 70).check::<bf16>(500 + seed);
        Case {
            k: [1, 3, 3],
            frames: 2,
            zeros: 0,
            up: true,
            res: true,
            ..case(6, 5, 16, 24)
        }
        .check::<half::f16>(600 + seed);
    }
    k::set_emu_shuffle(None);
}

#[test]
fn conv3d_rejects_bad_shapes_by_name() {
    let d = dev();
    let f: Buf<bf16> = Buf::filled(&d, 4 * 4 * 8, bf16::ZERO).unwrap();
    let wb: Buf<bf16> = Buf::filled(&d, 8 * 27 * 8, bf16::ZERO).unwrap();
    let bb: Buf<f32> = Buf::filled(&d, 8, 0.0).unwrap();
    let ob: Buf<bf16> = Buf::filled(&d, 4 * 4 * 8 * 8, bf16::ZERO).unwrap();
    let shape = k::conv3d::ConvShape::new((4, 4, 8, 8), [3, 3, 3], [1, 1, 1], [1; 4]);
    let run = |frames: Vec<Option<DevSlice<'_, bf16>>>, s: k::conv3d::ConvShape| {
        k::conv3d::conv3d(&d, &frames, wb.slice(), bb.slice(), None, ob.slice(), s)
            .unwrap_err()
            .to_string()
    };
    let e = run(vec![Some(f.slice()); 2], shape);
    assert!(e.contains("smaller than the kernel"), "{e}");
    let e = run(vec![Some(f.slice()); 9], shape);
    assert!(e.contains("at most 8"), "{e}");
    let e = run(
        vec![Some(f.slice()), None, Some(f.slice().sub(0, 10).unwrap())],
        shape,
    );
    assert!(e.contains("4x4x8"), "{e}");
    let e = run(
        vec![None; 4],
        k::conv3d::ConvShape {
            k: [4, 1, 1],
            ..shape
        },
    );
    assert!(e.contains("depth 4"), "{e}");
    let e = run(vec![None; 3], k::conv3d::ConvShape { co: 9, ..shape });
    assert!(e.contains("weights"), "{e}");
    let e = k::conv3d::conv3d(
        &d,
        &[None; 3],
        wb.slice(),
        bb.slice(),
        None,
        ob.slice().sub(0, 100).unwrap(),
        shape,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("out holds 100"), "{e}");
    let e = k::conv3d::conv3d(
        &d,
        &[None; 3],
        wb.slice(),
        bb.slice(),
        Some(f.slice().sub(0, 100).unwrap()),
        ob.slice(),
        shape,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("residual holds 100"), "{e}");
    let e = run(vec![None; 3], k::conv3d::ConvShape { ld: 4, ..shape });
    assert!(e.contains("pixel stride 4"), "{e}");
}

#[test]
fn conv3d_code_is_tensor_core_code_without_spills() {
    crate::kernels::tensor_core_code(
        "conv3d",
        "conv3d_",
        12, // 3 variants × 2 types × 2 targets
        &["conv3d_bf16_c8", "conv3d_bf16_c2", "conv3d_f16_c8"],
    );
}

/// `reel kernel-bench conv3d` builds its inputs by the rule bench/kernels_gpu.py repeats
/// (input and weights from the hash, weights in the kernel's layout) and samples its output
/// at the documented positions: checked against the CPU convolution of the same values.
#[test]
fn conv3d_kernel_bench_follows_the_documented_rules() {
    let d = dev();
    let a = reel::kernel_bench::ConvBenchArgs {
        height: 5,
        width: 9,
        ci: 16,
        co: 24,
        frames: 5,
        kt: 3,
        warmup: 0,
        repeat: 1,
        seed: 7,
        samples: 64,
    };
    let r = reel::kernel_bench::conv3d(&d, &a).unwrap();
    let (fl, kvol) = (a.height * a.width * a.ci, a.kt * 9);
    let hashed = |n: usize, seed: u32, scale: f32| -> Vec<f32> {
        (0..n)
            .map(|i| k::hash_value(i as u32, seed, scale).to_f32())
            .collect()
    };
    let x = hashed(a.frames * fl, 7, 1.0);
    assert_eq!(r.q_first, x[..8]);
    // The kernel's layout [co][kt][3][3][ci] back to PyTorch's [co][ci][kt][3][3].
    let wk = hashed(a.co * kvol * a.ci, 8, 1.0 / ((a.ci * kvol) as f32).sqrt());
    let mut wt = vec![0.0f32; wk.len()];
    for o in 0..a.co {
        for tap in 0..kvol {
            for i in 0..a.ci {
                wt[(o * a.ci + i) * kvol + tap] = wk[(o * kvol + tap) * a.ci + i];
            }
        }
    }
    let frames: Vec<Option<&[f32]>> = x.chunks(fl).map(Some).collect();
    let cw = ConvWeights::new(&wt, &vec![0.0; a.co], a.co, a.ci, [a.kt, 3, 3]);
    let want = conv3d(&frames, a.height, a.width, &cw, [1, 1, 1], [1, 1, 1, 1]).unwrap();
    let pos = reel::kernel_bench::sample_positions(want.data.len(), 64);
    let want: Vec<f64> = pos.iter().map(|&p| want.data[p] as f64).collect();
    let err = rel_l2(&r.sample, &want);
    assert!(err < 1e-2, "sampled outputs: rel L2 {err:.3e}");
    assert_eq!(r.flops, 2 * 3 * 5 * 9 * 24 * 16 * 27);
}

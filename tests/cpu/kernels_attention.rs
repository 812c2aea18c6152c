//! Flash attention (kernels/attention.cu) on the device REEL_TEST_DEVICE names, against the
//! CPU f32 reference: odd shapes (L and Lk not multiples of the tiles, Lk ≠ Lq, Lk = 1,
//! batch 2, every head_dim the models use), the fused QKV layout, scores up to ±30,
//! cross-attention to zero-padded text, the row log-sum-exp, under REEL_EMU_SHUFFLE, one
//! realistic shape, and the golden DiT cases with every attention through the kernel.

use half::bf16;
use reel::cpu::AttnShape;
use reel::kernels::{self as k, AttnView, Buf, FlashKernel, FlashShape, KernelDevice};
use reel::tensor::rel_l2;

use crate::kernels::{bf16s, dev, down, f32s, up, vals};

/// How Q, K, V and O are laid out in memory.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Layout {
    /// Four buffers [B, L, H·hd].
    Separate,
    /// Q, K, V in one [B·L, 3·H·hd] buffer (as a fused projection writes it; Lq = Lk), O in
    /// a [B, Lq, H·hd + 8] buffer whose last 8 columns must stay untouched.
    Fused,
    /// Separate, every operand starting 2 elements into its buffer (not 16-byte aligned:
    /// the generic path).
    Offset,
}

#[derive(Clone, Copy, Debug)]
struct Case {
    batch: usize,
    heads: usize,
    hd: usize,
    lq: usize,
    lk: usize,
    layout: Layout,
    /// Standard deviation of q and k entries (3: scores reach ±30 for head_dim ≥ 16).
    sigma: f32,
    /// Key/value rows from this one on are zero (zero-padded text).
    pad_from: Option<usize>,
}

struct Inputs {
    /// Packed [B, L, H·hd], rounded to bf16.
    q: Vec<bf16>,
    k: Vec<bf16>,
    v: Vec<bf16>,
}

impl Case {
    fn inputs(&self, seed: u64) -> Inputs {
        let w = self.heads * self.hd;
        let scaled = |n: usize, seed: u64, s: f32| -> Vec<f32> {
            vals(n, seed).iter().map(|x| x / 3.0 * s).collect()
        };
        let mut k = scaled(self.batch * self.lk * w, seed + 1, self.sigma);
        let mut v = scaled(self.batch * self.lk * w, seed + 2, 1.0);
        if let Some(p) = self.pad_from {
            for b in 0..self.batch {
                for j in p..self.lk {
                    let r = (b * self.lk + j) * w;
                    k[r..r + w].fill(0.0);
                    v[r..r + w].fill(0.0);
                }
            }
        }
        Inputs {
            q: bf16s(&scaled(self.batch * self.lq * w, seed, self.sigma)),
            k: bf16s(&k),
            v: bf16s(&v),
        }
    }

    fn scale(&self) -> f32 {
        1.0 / (self.hd as f32).sqrt()
    }

    /// The f32 CPU reference on the same (bf16) inputs, and each row's log-sum-exp in f64.
    fn reference(&self, x: &Inputs) -> (Vec<f32>, Vec<f64>) {
        let w = self.heads * self.hd;
        let mut out = vec![0.0f32; self.batch * self.lq * w];
        reel::cpu::attention(
            &f32s(&x.q),
            &f32s(&x.k),
            &f32s(&x.v),
            &mut out,
            AttnShape {
                batch: self.batch,
                heads: self.heads,
                head_dim: self.hd,
                lq: self.lq,
                lk: self.lk,
                q_stride: w,
                kv_stride: w,
                out_stride: w,
                scale: self.scale(),
            },
        );
        let mut lse = Vec::with_capacity(self.batch * self.heads * self.lq);
        for b in 0..self.batch {
            for h in 0..self.heads {
                for i in 0..self.lq {
                    let qi = &x.q[(b * self.lq + i) * w + h * self.hd..][..self.hd];
                    let s: Vec<f64> = (0..self.lk)
                        .map(|j| {
                            let kj = &x.k[(b * self.lk + j) * w + h * self.hd..][..self.hd];
                            let dot: f64 = qi
                                .iter()
                                .zip(kj)
                                .map(|(a, c)| a.to_f64() * c.to_f64())
                                .sum();
                            dot * self.scale() as f64
                        })
                        .collect();
                    let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    lse.push(m + s.iter().map(|v| (v - m).exp()).sum::<f64>().ln());
                }
            }
        }
        (out, lse)
    }

    /// Runs the kernel the runtime picks; returns O packed [B, Lq, H·hd], the LSE and the
    /// variant.
    fn run(&self, d: &KernelDevice, x: &Inputs) -> (Vec<bf16>, Vec<f32>, &'static str) {
        self.run_with(d, x, FlashKernel::Auto)
    }

    /// [`Case::run`] on the kernel `kernel` names.
    fn run_with(
        &self,
        d: &KernelDevice,
        x: &Inputs,
        kernel: FlashKernel,
    ) -> (Vec<bf16>, Vec<f32>, &'static str) {
        let w = self.heads * self.hd;
        let shape = FlashShape {
            batch: self.batch,
            heads: self.heads,
            head_dim: self.hd,
            lq: self.lq,
            lk: self.lk,
            scale: self.scale(),
        };
        let poison = bf16::from_bits(0x7fc1);
        let lse = Buf::filled(d, self.batch * self.heads * self.lq, f32::NAN).unwrap();
        match self.layout {
            Layout::Separate | Layout::Offset => {
                let off = if self.layout == Layout::Offset { 2 } else { 0 };
                let with_off = |v: &[bf16]| {
                    let mut b = vec![poison; off];
                    b.extend_from_slice(v);
                    up(d, &b)
                };
                let (qb, kb, vb) = (with_off(&x.q), with_off(&x.k), with_off(&x.v));
                let mut ob = Buf::filled(d, off + self.batch * self.lq * w, poison).unwrap();
                let view = |rows| AttnView::packed(off, w, rows);
                let variant = k::flash_attention_with(
                    d,
                    kernel,
                    (&qb, view(self.lq)),
                    (&kb, view(self.lk)),
                    (&vb, view(self.lk)),
                    (&mut ob, view(self.lq)),
                    Some(lse.slice()),
                    shape,
                )
                .unwrap_or_else(|e| panic!("{self:?}: {e}"));
                let o = down(&ob);
                assert!(
                    o[..off].iter().all(|v| v.to_bits() == 0x7fc1),
                    "wrote before o"
                );
                (o[off..].to_vec(), down(&lse), variant)
            }
            Layout::Fused => {
                assert_eq!(self.lq, self.lk, "a fused projection has Lq = Lk");
                let l = self.lq;
                let mut qkv = Vec::with_capacity(self.batch * l * 3 * w);
                for r in 0..self.batch * l {
                    qkv.extend_from_slice(&x.q[r * w..][..w]);
                    qkv.extend_from_slice(&x.k[r * w..][..w]);
                    qkv.extend_from_slice(&x.v[r * w..][..w]);
                }
                let qkv = up(d, &qkv);
                let ow = w + 8;
                let mut ob = Buf::filled(d, self.batch * l * ow, poison).unwrap();
                let variant = k::flash_attention_with(
                    d,
                    kernel,
                    (&qkv, AttnView::packed(0, 3 * w, l)),
                    (&qkv, AttnView::packed(w, 3 * w, l)),
                    (&qkv, AttnView::packed(2 * w, 3 * w, l)),
                    (&mut ob, AttnView::packed(0, ow, l)),
                    Some(lse.slice()),
                    shape,
                )
                .unwrap_or_else(|e| panic!("{self:?}: {e}"));
                let o = down(&ob);
                let mut packed = Vec::with_capacity(self.batch * l * w);
                for r in 0..self.batch * l {
                    packed.extend_from_slice(&o[r * ow..][..w]);
                    assert!(
                        o[r * ow + w..][..8].iter().all(|v| v.to_bits() == 0x7fc1),
                        "{self:?}: wrote past the heads of row {r}"
                    );
                }
                (packed, down(&lse), variant)
            }
        }
    }

    /// Runs and checks against the reference; returns the variant.
    fn check(&self, d: &KernelDevice, seed: u64) -> &'static str {
        self.check_with(d, seed, FlashKernel::Auto)
    }

    /// [`Case::check`] on the kernel `kernel` names.
    fn check_with(&self, d: &KernelDevice, seed: u64, kernel: FlashKernel) -> &'static str {
        let x = self.inputs(seed);
        let (want, want_lse) = self.reference(&x);
        let (got, lse, variant) = self.run_with(d, &x, kernel);
        let got = f32s(&got);
        assert!(
            got.iter().all(|v| v.is_finite()),
            "{self:?} ({variant}): unwritten or non-finite outputs"
        );
        let w64: Vec<f64> = want.iter().map(|&v| v as f64).collect();
        let naive: Vec<f32> = want.iter().map(|&v| bf16::from_f32(v).to_f32()).collect();
        let (err, naive_err) = (rel_l2(&got, &w64), rel_l2(&naive, &w64));
        assert!(
            err <= 1e-2 && err <= 2.0 * naive_err.max(1e-6),
            "{self:?} ({variant}): rel L2 {err:.3e} (naive bf16 {naive_err:.3e})"
        );
        for (i, (&g, &w)) in lse.iter().zip(&want_lse).enumerate() {
            assert!(
                (g as f64 - w).abs() <= 1e-4 * (1.0 + w.abs()),
                "{self:?} ({variant}): lse[{i}] = {g}, want {w}"
            );
        }
        variant
    }
}

impl Case {
    /// The f16 build (separate buffers): the bf16 inputs converted (exact in f16 at these
    /// magnitudes but for values under 6e-5), O back as f32, and the variant.
    fn check_f16(&self, d: &KernelDevice, seed: u64) -> &'static str {
        use half::f16;
        assert_eq!(self.layout, Layout::Separate);
        let x = self.inputs(seed);
        let (want, _) = self.reference(&x);
        let w = self.heads * self.hd;
        let to16 =
            |v: &[bf16]| -> Vec<f16> { v.iter().map(|b| f16::from_f32(b.to_f32())).collect() };
        let (qb, kb, vb) = (up(d, &to16(&x.q)), up(d, &to16(&x.k)), up(d, &to16(&x.v)));
        let mut ob = Buf::filled(d, self.batch * self.lq * w, f16::NAN).unwrap();
        let view = |rows| AttnView::packed(0, w, rows);
        let variant = k::flash_attention(
            d,
            (&qb, view(self.lq)),
            (&kb, view(self.lk)),
            (&vb, view(self.lk)),
            (&mut ob, view(self.lq)),
            None,
            FlashShape {
                batch: self.batch,
                heads: self.heads,
                head_dim: self.hd,
                lq: self.lq,
                lk: self.lk,
                scale: self.scale(),
            },
        )
        .unwrap_or_else(|e| panic!("{self:?} f16: {e}"));
        let got: Vec<f32> = down(&ob).iter().map(|v| v.to_f32()).collect();
        assert!(
            got.iter().all(|v| v.is_finite()),
            "{self:?} ({variant}): unwritten or non-finite outputs"
        );
        let w64: Vec<f64> = want.iter().map(|&v| v as f64).collect();
        let naive: Vec<f32> = want.iter().map(|&v| f16::from_f32(v).to_f32()).collect();
        let (err, naive_err) = (rel_l2(&got, &w64), rel_l2(&naive, &w64));
        assert!(
            err <= 2e-3 && err <= 3.0 * naive_err.max(1e-6),
            "{self:?} ({variant}): rel L2 {err:.3e} (naive f16 {naive_err:.3e})"
        );
        variant
    }
}

fn case(batch: usize, heads: usize, hd: usize, lq: usize, lk: usize, layout: Layout) -> Case {
    Case {
        batch,
        heads,
        hd,
        lq,
        lk,
        layout,
        sigma: 1.0,
        pad_from: None,
    }
}

#[test]
fn flash_attention_matches_cpu_on_odd_shapes_and_every_head_dim() {
    let d = dev();
    use Layout::*;
    let cases = [
        // Every head_dim of the golden and demo models, generic path.
        (case(2, 3, 24, 37, 53, Separate), "flash_attn_any_hd32"),
        (
            Case {
                sigma: 3.0,
                ..case(1, 2, 12, 70, 70, Fused)
            },
            "flash_attn_any_hd16",
        ),
        (case(2, 1, 16, 65, 1, Separate), "flash_attn_any_hd16"), // a single key
        (case(1, 2, 32, 100, 129, Separate), "flash_attn_any_hd32"),
        (
            Case {
                sigma: 3.0,
                ..case(1, 3, 48, 33, 200, Separate)
            },
            "flash_attn_any_hd64",
        ),
        // The specialised variants (16-byte aligned operands), Lq and Lk off the tiles.
        (
            Case {
                sigma: 3.0,
                ..case(2, 2, 64, 130, 130, Fused)
            },
            "flash_attn_hd64_bn128",
        ),
        (case(1, 2, 128, 150, 96, Separate), "flash_attn_hd128_bn64"),
        (
            Case {
                sigma: 3.0,
                ..case(1, 1, 128, 40, 300, Separate)
            },
            "flash_attn_hd128_bn64",
        ),
        // The same head_dims unaligned: the generic path.
        (case(1, 2, 128, 40, 70, Offset), "flash_attn_any_hd128"),
        (case(1, 1, 64, 33, 17, Offset), "flash_attn_any_hd64"),
        // Up to 256.
        (case(1, 1, 200, 20, 33, Separate), "flash_attn_any_hd256"),
        (case(1, 2, 256, 17, 40, Separate), "flash_attn_any_hd256"),
        // Above 256 (the VAE mid-block's single head of 384): V and O in two halves.
        (
            Case {
                sigma: 3.0,
                ..case(2, 1, 384, 70, 45, Separate)
            },
            "flash_attn_qk384_v192_bn32",
        ),
        (case(1, 2, 320, 40, 40, Fused), "flash_attn_qk384_v192_bn32"),
    ];
    let arch = d.arch().unwrap();
    for (i, (c, variant)) in cases.iter().enumerate() {
        let seed = 10 + i as u64;
        let got = c.check(&d, seed);
        if hopper_takes(&d, c) {
            // The runtime's choice on sm_90; the mma.sync kernel must hold there too.
            assert_eq!(got, format!("flash_attn_sm90_hd{}", c.hd), "{c:?}");
            let got = c.check_with(&d, seed, FlashKernel::MmaSync);
            assert_eq!(got, *variant, "{c:?}");
        } else if arch.max_shared_per_block >= 104_448 {
            assert_eq!(got, *variant, "{c:?}");
        }
    }
}

/// Whether the runtime gives `c` to the Hopper kernel on `d` (sm_90, head_dim 64 or 128,
/// 16-byte-strided operands at 128-byte aligned starts: every layout here but Offset).
fn hopper_takes(d: &KernelDevice, c: &Case) -> bool {
    let arch = d.arch().unwrap();
    (arch.major, arch.minor) == (9, 0)
        && (c.hd == 64 || c.hd == 128)
        && c.layout != Layout::Offset
        && std::env::var("REEL_ATTENTION").map_or(true, |v| v != "mma" && v != "mma.sync")
}

/// The f16 variants (the VAE's storage type): the generic path at every head_dim bucket and
/// the split variant above 256.
#[test]
fn flash_attention_f16_matches_cpu() {
    let d = dev();
    use Layout::*;
    let cases = [
        (case(2, 3, 24, 37, 53, Separate), "flash_attn_f16_any_hd32"),
        (
            Case {
                sigma: 3.0,
                ..case(1, 2, 128, 70, 45, Separate)
            },
            "flash_attn_f16_any_hd128",
        ),
        (
            case(1, 1, 200, 20, 33, Separate),
            "flash_attn_f16_any_hd256",
        ),
        (
            Case {
                sigma: 3.0,
                ..case(1, 1, 384, 70, 45, Separate)
            },
            "flash_attn_f16_qk384_v192_bn32",
        ),
    ];
    for (i, (c, variant)) in cases.iter().enumerate() {
        let got = c.check_f16(&d, 50 + i as u64);
        if d.arch().unwrap().max_shared_per_block >= 104_448 {
            assert_eq!(got, *variant, "{c:?}");
        }
    }
}

#[test]
fn flash_attention_under_shuffled_schedules() {
    let d = dev();
    for seed in 0..3u64 {
        k::set_emu_shuffle(Some(Some(seed)));
        case(2, 2, 24, 45, 70, Layout::Separate).check(&d, 40 + seed);
        Case {
            sigma: 3.0,
            ..case(1, 2, 128, 70, 70, Layout::Fused)
        }
        .check(&d, 50 + seed);
    }
    k::set_emu_shuffle(None);
}

#[test]
fn flash_attention_cross_attention_to_zero_padded_text() {
    // Video queries against 512 text tokens of which the last 492 are zero padding, attended
    // without a mask as diffusers does (zero keys score 0, zero values add nothing but
    // weight).
    let d = dev();
    let c = Case {
        pad_from: Some(20),
        ..case(2, 2, 128, 150, 512, Layout::Separate)
    };
    c.check(&d, 60);
    let c = Case {
        pad_from: Some(7),
        ..case(1, 3, 24, 61, 512, Layout::Separate)
    };
    c.check(&d, 61);
}

#[test]
fn flash_attention_at_a_realistic_shape() {
    // 1,024 tokens, head_dim 128 (Wan2.1's), scores up to about ±30: 16 K/V tiles, the
    // online softmax rescaling on every one.
    let d = dev();
    let t = std::time::Instant::now();
    let v = Case {
        sigma: 3.0,
        ..case(1, 1, 128, 1024, 1024, Layout::Fused)
    }
    .check(&d, 70);
    eprintln!(
        "1024 x 1024 x 128 on {}: {v}, {:.2?}",
        d.describe(),
        t.elapsed()
    );
}

#[test]
fn flash_attention_variants_agree() {
    // The specialised and generic kernels on the same data (head_dim 64 and 128).
    let d = dev();
    for hd in [64usize, 128] {
        let aligned = case(1, 2, hd, 90, 110, Layout::Separate);
        let x = aligned.inputs(80);
        let (a, _, va) = aligned.run(&d, &x);
        let (b, _, vb) = Case {
            layout: Layout::Offset,
            ..aligned
        }
        .run(&d, &x);
        assert_ne!(va, vb);
        let diff = f32s(&a)
            .iter()
            .zip(f32s(&b))
            .map(|(p, q)| (p - q).abs())
            .fold(0.0f32, f32::max);
        // Same tiles of 16 keys, other tile widths: the sums differ by f32 rounding only
        // before the bf16 output rounding.
        assert!(diff <= 2e-2, "hd {hd}: {va} vs {vb} differ by {diff}");
    }
}

#[test]
fn flash_attention_rejects_what_it_cannot_run() {
    let d = dev();
    let s = FlashShape {
        batch: 1,
        heads: 2,
        head_dim: 16,
        lq: 10,
        lk: 10,
        scale: 0.25,
    };
    let x = up(&d, &vec![bf16::ZERO; 320]);
    let mut o = Buf::filled(&d, 320, bf16::ZERO).unwrap();
    let view = AttnView::packed(0, 32, 10);
    let mut run = |q: AttnView, o_view: AttnView, s: FlashShape| {
        k::flash_attention(
            &d,
            (&x, q),
            (&x, view),
            (&x, view),
            (&mut o, o_view),
            None,
            s,
        )
        .map(|_| ())
        .unwrap_err()
        .to_string()
    };
    let e = run(AttnView::packed(2, 32, 10), view, s);
    assert!(e.contains("does not hold"), "{e}");
    let e = run(AttnView::packed(0, 33, 10), view, FlashShape { lq: 1, ..s });
    assert!(e.contains("must be even"), "{e}");
    let e = run(
        view,
        view,
        FlashShape {
            head_dim: 15,
            heads: 1,
            ..s
        },
    );
    assert!(e.contains("head_dim 15"), "{e}");
    let e = run(
        view,
        view,
        FlashShape {
            head_dim: 258,
            heads: 1,
            lq: 1,
            lk: 1,
            ..s
        },
    );
    assert!(e.contains("head_dim 258"), "{e}");
    // Above 256 only with 16-byte aligned operands.
    let xw = up(&d, &vec![bf16::ZERO; 400]);
    let ow = Buf::filled(&d, 400, bf16::ZERO).unwrap();
    let wide = AttnView::packed(2, 384, 1);
    let e = k::flash_attention(
        &d,
        (&xw, wide),
        (&xw, wide),
        (&xw, wide),
        (&ow, wide),
        None,
        FlashShape {
            head_dim: 384,
            heads: 1,
            lq: 1,
            lk: 1,
            ..s
        },
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("16-byte aligned"), "{e}");
    let e = run(view, AttnView::packed(0, 16, 10), FlashShape { lq: 5, ..s });
    assert!(e.contains("overlapping"), "{e}");
    let e = run(view, view, FlashShape { lk: 0, ..s });
    assert!(e.contains("empty"), "{e}");
}

/// The golden DiT cases with every self- and cross-attention through the kernel (Q, K, V
/// rounded to bf16, O back to f32), the rest on the CPU: within the kernel-device tolerance
/// of diffusers' float64 output.
#[test]
fn golden_dits_with_flash_attention_match_diffusers() {
    use reel::io::TensorFile;
    let d = dev();
    for (case, model) in [
        ("dit_hd128", ""),
        ("dit_hd48", "transformer"),
        ("dit_batch2", "transformer"),
        ("dit_odd", ""),
        ("dit_patch222", "transformer"),
    ] {
        let dir = crate::data(case);
        let dit = reel::models::wan_dit::WanDit::load(&dir.join(model))
            .unwrap_or_else(|e| panic!("{case}: {e}"));
        let input = TensorFile::open(&dir.join("input.safetensors")).unwrap();
        let t = |n: &str| input.tensor(n).unwrap();
        let mut variants = std::collections::BTreeSet::new();
        let out = dit
            .forward_with_attention(
                &t("hidden_states"),
                &t("timestep"),
                &t("encoder_hidden_states"),
                &mut |q, kk, v, o, s| {
                    let w = s.heads * s.head_dim;
                    let pack = |x: &[f32], rows: usize, stride: usize| -> Vec<bf16> {
                        (0..rows)
                            .flat_map(|r| x[r * stride..][..w].iter().map(|&v| bf16::from_f32(v)))
                            .collect()
                    };
                    let (qb, kb, vb) = (
                        up(&d, &pack(q, s.batch * s.lq, s.q_stride)),
                        up(&d, &pack(kk, s.batch * s.lk, s.kv_stride)),
                        up(&d, &pack(v, s.batch * s.lk, s.kv_stride)),
                    );
                    let mut ob =
                        Buf::filled(&d, s.batch * s.lq * w, bf16::from_bits(0x7fc1)).unwrap();
                    let variant = k::flash_attention(
                        &d,
                        (&qb, AttnView::packed(0, w, s.lq)),
                        (&kb, AttnView::packed(0, w, s.lk)),
                        (&vb, AttnView::packed(0, w, s.lk)),
                        (&mut ob, AttnView::packed(0, w, s.lq)),
                        None,
                        FlashShape {
                            batch: s.batch,
                            heads: s.heads,
                            head_dim: s.head_dim,
                            lq: s.lq,
                            lk: s.lk,
                            scale: s.scale,
                        },
                    )?;
                    variants.insert(variant);
                    for (r, row) in down(&ob).chunks(w).enumerate() {
                        for (c, v) in row.iter().enumerate() {
                            o[r * s.out_stride + c] = v.to_f32();
                        }
                    }
                    Ok(())
                },
            )
            .unwrap_or_else(|e| panic!("{case}: {e}"));
        let (shape, want) = TensorFile::open(&dir.join("output.safetensors"))
            .unwrap()
            .tensor_f64("sample")
            .unwrap();
        assert_eq!(out.shape(), &shape[..]);
        let err = rel_l2(out.data(), &want);
        eprintln!("{case} with {variants:?}: rel L2 {err:.3e}");
        assert!(err <= 2e-2, "{case}: rel L2 {err:.3e} > 2e-2");
    }
}

#[test]
fn flash_attention_builds_to_tensor_core_code_without_spills_or_stack() {
    crate::kernels::tensor_core_code(
        "attention",
        "flash_attn_",
        50, // 10 bf16 + 5 f16 + 10 biased (bf16, f16) variants × 2 targets
        &[
            "flash_attn_hd128_bn64",
            "flash_attn_hd128_bn32",
            "flash_attn_hd64_bn128",
            "flash_attn_any_hd32",
            "flash_attn_qk384_v192_bn32",
            "flash_attn_f16_any_hd128",
            "flash_attn_bias_hd64_bn128",
            "flash_attn_f16_bias_hd64_bn128",
        ],
    );
}

#[test]
fn kernel_bench_inputs_and_samples_follow_the_documented_rules() {
    // bench/kernels_gpu.py rebuilds the inputs from the hash and reads the sampled
    // outputs at hashed positions: both rules must hold exactly.
    let d = dev();
    let mut x = Buf::filled(&d, 5000, bf16::ZERO).unwrap();
    k::fill_hash_bf16(&d, &mut x, 3, 1.0).unwrap();
    let got = down(&x);
    for (i, g) in got.iter().enumerate() {
        assert_eq!(
            g.to_bits(),
            k::hash_value(i as u32, 3, 1.0).to_bits(),
            "[{i}]"
        );
    }
    assert!(got.iter().all(|v| v.to_f32().abs() <= 1.0) && got.iter().any(|v| v.to_f32() < -0.9));
    let a = reel::kernel_bench::AttnBenchArgs {
        batch: 2,
        heads: 2,
        tokens: 70,
        kv_tokens: Some(45),
        head_dim: 32,
        kernel: k::FlashKernel::Auto,
        warmup: 0,
        repeat: 1,
        seed: 11,
        samples: 64,
    };
    let r = reel::kernel_bench::attention(&d, &a).unwrap();
    let w = a.heads * a.head_dim;
    let input = |n: usize, seed: u32| -> Vec<f32> {
        (0..n)
            .map(|i| k::hash_value(i as u32, seed, 1.0).to_f32())
            .collect()
    };
    let (q, kk, v) = (
        input(2 * 70 * w, 11),
        input(2 * 45 * w, 12),
        input(2 * 45 * w, 13),
    );
    assert_eq!(r.q_first, q[..8]);
    let mut want = vec![0.0f32; q.len()];
    reel::cpu::attention(
        &q,
        &kk,
        &v,
        &mut want,
        AttnShape {
            batch: 2,
            heads: 2,
            head_dim: 32,
            lq: 70,
            lk: 45,
            q_stride: w,
            kv_stride: w,
            out_stride: w,
            scale: 1.0 / (32f32).sqrt(),
        },
    );
    let pos = reel::kernel_bench::sample_positions(want.len(), 64);
    let want: Vec<f64> = pos.iter().map(|&p| want[p] as f64).collect();
    let err = rel_l2(&r.sample, &want);
    assert!(
        err <= 1e-2,
        "sampled outputs differ from the reference by {err:.3e}"
    );
    assert_eq!(r.flops, 4 * 2 * 2 * 70 * 45 * 32);
}

/// The additive-bias variants (umT5's self-attention) against cpu::attention_biased: a
/// relative-position bias per head and offset, padding keys masked, scale 1 and T5-sized
/// logits, in the fused layout; odd lengths, one sample whose keys are all masked but one,
/// and the specialised head_dim 64 variant.
#[test]
fn flash_attention_biased_matches_cpu() {
    use reel::cpu::AttnBias as CpuBias;
    use reel::kernels::attention::MASKED;
    let d = dev();
    for (i, (heads, hd, l, valid, want_variant)) in [
        (
            3usize,
            8usize,
            37usize,
            [30usize, 37],
            "flash_attn_bias_any_hd16",
        ),
        (2, 16, 70, [1, 55], "flash_attn_bias_any_hd16"),
        (2, 64, 150, [150, 97], "flash_attn_bias_hd64_bn128"),
        (1, 32, 20, [20, 3], "flash_attn_bias_any_hd32"),
    ]
    .into_iter()
    .enumerate()
    {
        let batch = 2;
        let w = heads * hd;
        let seed = 300 + i as u64;
        let q = bf16s(&vals(batch * l * w, seed));
        let k = bf16s(&vals(batch * l * w, seed + 1));
        let v = bf16s(&vals(batch * l * w, seed + 2));
        // A table over 16 buckets of relative position (clamped offsets), values up to ±4.
        let nb = 16usize;
        let table: Vec<f32> = vals(nb * heads, seed + 3).iter().map(|x| 4.0 * x).collect();
        let bucket = |rel: i64| (rel.clamp(-7, 8) + 7) as usize;
        let buckets: Vec<u16> = (0..l)
            .flat_map(|qi| (0..l).map(move |kj| bucket(kj as i64 - qi as i64) as u16))
            .collect();
        let key: Vec<f32> = (0..batch)
            .flat_map(|b| (0..l).map(move |j| if j < valid[b] { 0.0 } else { MASKED }))
            .collect();
        let mut rel = Vec::with_capacity(heads * (2 * l - 1));
        for h in 0..heads {
            for o in 0..2 * l - 1 {
                rel.push(table[bucket(o as i64 - (l as i64 - 1)) * heads + h]);
            }
        }
        let mut want = vec![0.0f32; batch * l * w];
        reel::cpu::attention_biased(
            &f32s(&q),
            &f32s(&k),
            &f32s(&v),
            &mut want,
            AttnShape {
                batch,
                heads,
                head_dim: hd,
                lq: l,
                lk: l,
                q_stride: w,
                kv_stride: w,
                out_stride: w,
                scale: 1.0,
            },
            &CpuBias {
                buckets: &buckets,
                table: &table,
                key_mask: Some(&key),
            },
        );
        // Fused [B·L, 3w] QKV as the projection writes it.
        let mut qkv = Vec::with_capacity(batch * l * 3 * w);
        for r in 0..batch * l {
            qkv.extend_from_slice(&q[r * w..][..w]);
            qkv.extend_from_slice(&k[r * w..][..w]);
            qkv.extend_from_slice(&v[r * w..][..w]);
        }
        let qkv = up(&d, &qkv);
        let mut ob = Buf::filled(&d, batch * l * w, bf16::from_bits(0x7fc1)).unwrap();
        let (rb, kb) = (up(&d, &rel), up(&d, &key));
        let view = |col| AttnView::packed(col, 3 * w, l);
        let variant = k::flash_attention_biased(
            &d,
            (&qkv, view(0)),
            (&qkv, view(w)),
            (&qkv, view(2 * w)),
            (&mut ob, AttnView::packed(0, w, l)),
            FlashShape {
                batch,
                heads,
                head_dim: hd,
                lq: l,
                lk: l,
                scale: 1.0,
            },
            k::AttnBias {
                rel: rb.slice(),
                key: kb.slice(),
            },
        )
        .unwrap_or_else(|e| panic!("case {i}: {e}"));
        let got = f32s(&down(&ob));
        assert!(
            got.iter().all(|x| x.is_finite()),
            "case {i}: unwritten outputs"
        );
        let w64: Vec<f64> = want.iter().map(|&x| x as f64).collect();
        let naive: Vec<f32> = want.iter().map(|&x| bf16::from_f32(x).to_f32()).collect();
        let (err, naive_err) = (rel_l2(&got, &w64), rel_l2(&naive, &w64));
        eprintln!("biased case {i} ({variant}): rel L2 {err:.3e} (bf16 rounding {naive_err:.3e})");
        assert!(
            err <= 1e-2 && err <= 2.0 * naive_err.max(1e-6),
            "case {i} ({variant}): rel L2 {err:.3e} (bf16 rounding {naive_err:.3e})"
        );
        if d.arch().unwrap().max_shared_per_block >= 104_448 {
            assert_eq!(variant, want_variant, "case {i}");
        }
    }
}

/// Whether `d` runs the Hopper kernel (sm_90: emu by default, an H100/H200); else why not.
fn sm90_device(d: &KernelDevice) -> bool {
    let arch = d.arch().unwrap();
    if (arch.major, arch.minor) != (9, 0) {
        eprintln!("{arch}: the sm_90 kernel does not run here");
        return false;
    }
    true
}

/// The Hopper kernel (kernels/attention.sm90.cu) against the CPU and against the mma.sync
/// kernel on the same data: both head_dims, the K/V ring wrapping (six tiles through two and
/// three stages), one query row and one key, Lq and Lk off the tiles and on them, a block
/// whose second consumer has no rows, the fused layout, batch 2 and zero-padded text.
#[test]
fn sm90_attention_matches_cpu_and_the_mma_sync_kernel() {
    let d = dev();
    if !sm90_device(&d) {
        return;
    }
    use Layout::*;
    let mut cases = Vec::new();
    for hd in [64usize, 128] {
        cases.extend([
            Case {
                sigma: 3.0,
                ..case(2, 3, hd, 200, 700, Separate)
            },
            case(1, 1, hd, 1, 1, Separate),
            case(1, 2, hd, 64, 128, Separate),
            case(2, 1, hd, 128, 256, Separate),
            Case {
                sigma: 3.0,
                ..case(1, 2, hd, 129, 129, Fused)
            },
            Case {
                pad_from: Some(20),
                ..case(2, 2, hd, 150, 512, Separate)
            },
        ]);
    }
    for (i, c) in cases.iter().enumerate() {
        let seed = 200 + i as u64;
        let v = c.check_with(&d, seed, FlashKernel::Sm90);
        assert_eq!(v, format!("flash_attn_sm90_hd{}", c.hd));
        let x = c.inputs(seed);
        let (a, la, _) = c.run_with(&d, &x, FlashKernel::Sm90);
        let (b, lb, vb) = c.run_with(&d, &x, FlashKernel::MmaSync);
        assert!(!vb.contains("sm90"), "{vb}");
        let diff = f32s(&a)
            .iter()
            .zip(f32s(&b))
            .map(|(p, q)| (p - q).abs())
            .fold(0.0f32, f32::max);
        // The same products in other tile widths and orders: f32 rounding before the bf16
        // output rounding.
        assert!(diff <= 2e-2, "{c:?}: sm90 vs {vb} differ by {diff}");
        for (j, (p, q)) in la.iter().zip(&lb).enumerate() {
            assert!(
                (p - q).abs() <= 1e-4 * (1.0 + q.abs()),
                "{c:?}: lse[{j}] {p} vs {q}"
            );
        }
    }
}

#[test]
fn sm90_attention_under_shuffled_schedules() {
    let d = dev();
    if !sm90_device(&d) {
        return;
    }
    for seed in 0..2u64 {
        k::set_emu_shuffle(Some(Some(seed)));
        for hd in [64usize, 128] {
            Case {
                sigma: 3.0,
                ..case(1, 2, hd, 150, 530, Layout::Separate)
            }
            .check_with(&d, 300 + seed, FlashKernel::Sm90);
        }
    }
    k::set_emu_shuffle(None);
}

#[test]
fn sm90_attention_names_what_it_cannot_take() {
    let d = dev();
    let run = |c: &Case| {
        let x = c.inputs(1);
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            c.run_with(&d, &x, FlashKernel::Sm90)
        }))
        .err()
        .and_then(|e| e.downcast_ref::<String>().cloned())
        .unwrap_or_default()
    };
    let hd32 = run(&case(1, 2, 32, 10, 10, Layout::Separate));
    let unaligned = run(&case(1, 2, 64, 10, 10, Layout::Offset));
    if sm90_device(&d) {
        assert!(
            hd32.contains("sm_90 kernel cannot") && hd32.contains("head_dim 32"),
            "{hd32}"
        );
        assert!(unaligned.contains("128-byte aligned"), "{unaligned}");
        // f16 and biased calls never reach it.
        use half::f16;
        let x = up(&d, &vec![f16::ZERO; 2 * 10 * 64]);
        let view = AttnView::packed(0, 128, 10);
        let s = FlashShape {
            batch: 1,
            heads: 2,
            head_dim: 64,
            lq: 10,
            lk: 10,
            scale: 0.125,
        };
        let e = k::flash_attention_with(
            &d,
            FlashKernel::Sm90,
            (&x, view),
            (&x, view),
            (&x, view),
            (&Buf::filled(&d, 1280, f16::ZERO).unwrap(), view),
            None,
            s,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("bf16"), "{e}");
    } else {
        assert!(hd32.contains("is not sm_90"), "{hd32}");
    }
}

#[test]
fn sm90_attention_builds_to_wgmma_and_tma_code_without_spills() {
    use crate::kernels::{dump_sass, ptxas_clean, sass_section};
    if !ptxas_clean("attention.sm90", "flash_attn_sm90_", 2) {
        return;
    }
    for (name, n) in [("flash_attn_sm90_hd128", 128), ("flash_attn_sm90_hd64", 64)] {
        let Some(sass) = dump_sass("attention.sm90", name) else {
            return;
        };
        let sm90 = sass_section(&sass, name, "sm_90a");
        // S = Q·Kᵀ: m64n128k16 per 16 of head_dim; O += P·V: m64n{hd}k16 per 16 keys.
        let qk = sm90.matches("HGMMA.64x128x16.F32.BF16").count();
        let pv = sm90.matches(&format!("HGMMA.64x{n}x16.F32.BF16")).count();
        let tma = sm90.matches("UTMALDG").count();
        let regs = sm90.matches("USETMAXREG").count();
        assert!(
            qk >= n / 16 && pv >= 8 && tma > 0 && regs >= 2,
            "{name}: {qk} QK and {pv} PV HGMMA, {tma} UTMALDG, {regs} USETMAXREG"
        );
        assert!(
            !sm90.contains("HMMA.16816"),
            "{name}: mma.sync in the sm_90 kernel"
        );
    }
}

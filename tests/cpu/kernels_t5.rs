//! The kernels umT5 runs on a device (REEL_TEST_DEVICE: emu by default) against CPU
//! references: the fused residual add + T5 layer norm (bf16, f16 and f32 outputs), the
//! gated GELU, the f16 GEMM variants and the f16 biased flash attention.

use half::{bf16, f16};
use reel::kernels::{self as k, Act, AttnView, Buf, DevSlice, FlashShape, Half};
use reel::tensor::rel_l2;

use crate::kernels::{dev, down, up, vals};

fn hs<T: Half>(v: &[f32]) -> Vec<T> {
    v.iter().map(|&x| T::from_f32(x)).collect()
}

fn fs<T: Half>(v: &[T]) -> Vec<f32> {
    v.iter().map(|x| x.to_f32()).collect()
}

/// got within twice the error of rounding want to T (and 1e-2).
fn close<T: Half>(name: &str, got: &[f32], want: &[f32]) {
    assert!(got.iter().all(|v| v.is_finite()), "{name}: non-finite");
    let w64: Vec<f64> = want.iter().map(|&v| v as f64).collect();
    let naive: Vec<f32> = want.iter().map(|&v| T::from_f32(v).to_f32()).collect();
    let (err, naive_err) = (rel_l2(got, &w64), rel_l2(&naive, &w64));
    assert!(
        err <= 1e-2 && err <= 2.0 * naive_err.max(1e-7),
        "{name}: rel L2 {err:.3e} (rounding {naive_err:.3e})"
    );
}

/// x += y, then the T5 norm of x into out: against cpu::rms_norm_rope (no bias, no rope).
fn add_norm_case<O: k::NormOut + Copy>(
    to_f32: fn(O) -> f32,
    tol_of: fn(&str, &[f32], &[f32]),
    poison: O,
) {
    let d_ = dev();
    for (rows, d, with_y) in [(7usize, 48usize, true), (3, 1000, false), (5, 4096, true)] {
        let x = vals(rows * d, d as u64);
        let y: Vec<f32> = vals(rows * d, d as u64 + 1)
            .iter()
            .map(|v| 3.0 * v)
            .collect();
        let wt: Vec<f32> = vals(d, 9).iter().map(|v| 1.0 + 0.2 * v).collect();
        let xb = up(&d_, &x);
        let yb = up(&d_, &y);
        let ob: Buf<O> = Buf::filled(&d_, rows * d, poison).unwrap();
        k::t5_add_norm(
            &d_,
            &xb,
            with_y.then(|| yb.slice()),
            &up(&d_, &wt),
            &ob,
            d,
            1e-6,
        )
        .unwrap();
        let mut want_x = x.clone();
        if with_y {
            for (a, b) in want_x.iter_mut().zip(&y) {
                *a += b;
            }
        }
        let got_x = down(&xb);
        assert!(
            got_x.iter().zip(&want_x).all(|(a, b)| a == b),
            "the residual written back must be x + y exactly (f32)"
        );
        let mut want = want_x.clone();
        reel::cpu::rms_norm_rope(&mut want, d, None, &wt, 1e-6, None);
        let got: Vec<f32> = down(&ob).into_iter().map(to_f32).collect();
        tol_of(
            &format!("t5_add_norm rows={rows} d={d} y={with_y}"),
            &got,
            &want,
        );
    }
}

#[test]
fn t5_add_norm_matches_cpu_for_every_output_type() {
    add_norm_case::<bf16>(|v| v.to_f32(), close::<bf16>, bf16::NAN);
    add_norm_case::<f16>(|v| v.to_f32(), close::<f16>, f16::NAN);
    add_norm_case::<f32>(
        |v| v,
        |name, got, want| {
            let w64: Vec<f64> = want.iter().map(|&v| v as f64).collect();
            let err = rel_l2(got, &w64);
            assert!(err <= 1e-6, "{name}: rel L2 {err:.3e}");
        },
        f32::NAN,
    );
}

fn gated_gelu_case<T: Half>() {
    let d = dev();
    let (rows, f) = (9usize, 70usize);
    let h: Vec<f32> = vals(rows * 2 * f, 4).iter().map(|v| 2.0 * v).collect();
    let ob: Buf<T> = Buf::filled(&d, rows * f, T::from_f32(f32::NAN)).unwrap();
    k::t5_gated_gelu(&d, &up(&d, &h), &ob, f).unwrap();
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for r in 0..rows {
        a.extend_from_slice(&h[r * 2 * f..][..f]);
        b.extend_from_slice(&h[r * 2 * f + f..][..f]);
    }
    reel::cpu::gelu_mul(&mut a, &b);
    close::<T>("t5_gated_gelu", &fs(&down(&ob)), &a);
    // A shape that does not split is an error naming the kernel.
    let e = k::t5_gated_gelu(&d, &up(&d, &h[..10]), &ob, f)
        .unwrap_err()
        .to_string();
    assert!(e.contains("t5_gated_gelu"), "{e}");
}

#[test]
fn t5_gated_gelu_matches_cpu() {
    gated_gelu_case::<bf16>();
    gated_gelu_case::<f16>();
}

/// f16 A and W, f16 or f32 C, against a float64 product of the same f16 values.
#[test]
fn gemm_f16_matches_a_float64_product() {
    let d = dev();
    for (m, n, kk, offset, want16, want32) in [
        (
            70usize,
            50usize,
            40usize,
            0usize,
            "gemm_f16_64x64",
            "gemm_f16f32_64x64",
        ),
        (33, 17, 22, 2, "gemm_f16_any", "gemm_f16f32_any"),
    ] {
        let a: Vec<f16> = hs(&vals(m * kk, 1));
        let w: Vec<f16> = hs(&vals(n * kk, 2).iter().map(|v| 0.1 * v).collect::<Vec<_>>());
        let bias = vals(n, 3);
        let mut want = vec![0.0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                let s: f64 = (0..kk)
                    .map(|t| a[i * kk + t].to_f64() * w[j * kk + t].to_f64())
                    .sum();
                want[i * n + j] = (s + bias[j] as f64) as f32;
            }
        }
        let pre = vec![f16::ZERO; offset];
        let (ab, wb, bb) = (
            up(&d, &[&pre[..], &a[..]].concat()),
            up(&d, &[&pre[..], &w[..]].concat()),
            up(&d, &bias),
        );
        fn sub(s: DevSlice<'_, f16>, off: usize) -> DevSlice<'_, f16> {
            s.sub(off, s.len() - off).unwrap()
        }
        let c16: Buf<f16> = Buf::filled(&d, m * n, f16::NAN).unwrap();
        let v16 = k::gemm(
            &d,
            (sub(ab.slice(), offset), kk),
            (sub(wb.slice(), offset), kk),
            Some(bb.slice()),
            (c16.slice(), n),
            (m, n, kk),
            Act::None,
        )
        .unwrap();
        close::<f16>(&format!("gemm f16 {m}x{n}x{kk}"), &fs(&down(&c16)), &want);
        let c32: Buf<f32> = Buf::filled(&d, m * n, f32::NAN).unwrap();
        let v32 = k::gemm(
            &d,
            (sub(ab.slice(), offset), kk),
            (sub(wb.slice(), offset), kk),
            Some(bb.slice()),
            (c32.slice(), n),
            (m, n, kk),
            Act::None,
        )
        .unwrap();
        let w64: Vec<f64> = want.iter().map(|&v| v as f64).collect();
        let err = rel_l2(&down(&c32), &w64);
        assert!(err <= 1e-5, "gemm f16 → f32 {m}x{n}x{kk}: rel L2 {err:.3e}");
        assert_eq!((v16, v32), (want16, want32));
    }
    // A 16-bit C of the other type is refused.
    let a: Buf<f16> = Buf::filled(&d, 64, f16::ONE).unwrap();
    let c: Buf<bf16> = Buf::filled(&d, 64, bf16::ZERO).unwrap();
    let e = k::gemm(
        &d,
        (a.slice(), 8),
        (a.slice(), 8),
        None,
        (c.slice(), 8),
        (8, 8, 8),
        Act::None,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("inputs' type"), "{e}");
}

/// The f16 biased variants on umT5-like inputs against cpu::attention_biased.
#[test]
fn flash_attention_biased_f16_matches_cpu() {
    biased_f16_cases();
}

/// The umT5 kernels with the emulator's blocks in shuffled orders.
#[test]
fn t5_kernels_under_shuffled_schedules() {
    for seed in 0..2u64 {
        k::set_emu_shuffle(Some(Some(seed)));
        add_norm_case::<f16>(|v| v.to_f32(), close::<f16>, f16::NAN);
        gated_gelu_case::<bf16>();
        biased_f16_cases();
    }
    k::set_emu_shuffle(None);
}

fn biased_f16_cases() {
    use reel::cpu::{AttnBias as CpuBias, AttnShape};
    use reel::kernels::attention::MASKED;
    let d = dev();
    for (heads, hd, l, valid, want_variant) in [
        (
            2usize,
            16usize,
            45usize,
            [45usize, 12],
            "flash_attn_f16_bias_any_hd16",
        ),
        (1, 64, 130, [100, 130], "flash_attn_f16_bias_hd64_bn128"),
    ] {
        let (batch, w) = (2, heads * hd);
        let q: Vec<f16> = hs(&vals(batch * l * w, 1));
        let kx: Vec<f16> = hs(&vals(batch * l * w, 2));
        let v: Vec<f16> = hs(&vals(batch * l * w, 3));
        let table: Vec<f32> = vals(8 * heads, 4).iter().map(|x| 3.0 * x).collect();
        let bucket = |rel: i64| (rel.clamp(-3, 4) + 3) as usize;
        let buckets: Vec<u16> = (0..l)
            .flat_map(|i| (0..l).map(move |j| bucket(j as i64 - i as i64) as u16))
            .collect();
        let key: Vec<f32> = (0..batch)
            .flat_map(|b| (0..l).map(move |j| if j < valid[b] { 0.0 } else { MASKED }))
            .collect();
        let rel: Vec<f32> = (0..heads)
            .flat_map(|h| {
                let table = &table;
                (0..2 * l - 1).map(move |o| table[bucket(o as i64 - (l as i64 - 1)) * heads + h])
            })
            .collect();
        let mut want = vec![0.0f32; batch * l * w];
        reel::cpu::attention_biased(
            &fs(&q),
            &fs(&kx),
            &fs(&v),
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
        let (qb, kb, vb) = (up(&d, &q), up(&d, &kx), up(&d, &v));
        let ob: Buf<f16> = Buf::filled(&d, batch * l * w, f16::NAN).unwrap();
        let view = AttnView::packed(0, w, l);
        let variant = k::flash_attention_biased(
            &d,
            (&qb, view),
            (&kb, view),
            (&vb, view),
            (&ob, view),
            FlashShape {
                batch,
                heads,
                head_dim: hd,
                lq: l,
                lk: l,
                scale: 1.0,
            },
            k::AttnBias {
                rel: up(&d, &rel).slice(),
                key: up(&d, &key).slice(),
            },
        )
        .unwrap();
        close::<f16>(&format!("biased f16 hd={hd}"), &fs(&down(&ob)), &want);
        if d.arch().unwrap().max_shared_per_block >= 104_448 {
            assert_eq!(variant, want_variant);
        }
    }
}

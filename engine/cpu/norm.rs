//! LayerNorm (plain, affine, or adaLN-modulated) and the Wan QK RMSNorm fused with 3D RoPE.

use rayon::prelude::*;

use super::embed::RopeTables;
use super::{group_chunks, rows_per_task, simd};
use crate::multiversion;

multiversion! {
    fn ln_rows(
        x: &[f32],
        out: &mut [f32],
        d: usize,
        eps: f32,
        mul: Option<&[f32]>,
        add: Option<&[f32]>,
    ) {
        for (xr, or) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
            // Two passes in f32 (mean, then centred squares), as PyTorch's CPU layer_norm.
            let mean = simd::sum_by(xr, |v| v) / d as f32;
            let q = simd::sum_by(xr, |v| (v - mean) * (v - mean));
            let rstd = 1.0 / (q / d as f32 + eps).sqrt();
            match (mul, add) {
                (Some(m), Some(a)) => {
                    for i in 0..d {
                        or[i] = (xr[i] - mean) * rstd * m[i] + a[i];
                    }
                }
                (Some(m), None) => {
                    for i in 0..d {
                        or[i] = (xr[i] - mean) * rstd * m[i];
                    }
                }
                (None, Some(a)) => {
                    for i in 0..d {
                        or[i] = (xr[i] - mean) * rstd + a[i];
                    }
                }
                (None, None) => {
                    for i in 0..d {
                        or[i] = (xr[i] - mean) * rstd;
                    }
                }
            }
        }
    }
}

/// LayerNorm over the last dimension (biased variance, as torch), then an optional
/// per-group multiply and add: out[r] = LN(x[r])·mul[g] + add[g] with
/// g = r / rows_per_group.
///
/// - nn.LayerNorm without affine: `mul`, `add` = None.
/// - with affine: `mul` = weight, `add` = bias, rows_per_group = usize::MAX.
/// - Wan's adaLN `LN(x)·(1 + scale) + shift`: `mul` = 1 + scale, `add` = shift, one group
///   per batch element (rows_per_group = tokens per sample).
///
/// x, out: [rows, d]; mul, add: [groups, d].
pub fn layer_norm(
    x: &[f32],
    out: &mut [f32],
    d: usize,
    eps: f32,
    mul: Option<&[f32]>,
    add: Option<&[f32]>,
    rows_per_group: usize,
) {
    let _t = crate::profile::labelled(crate::profile::Op::Elementwise, 0, || "layer_norm".into());
    assert_eq!(x.len(), out.len(), "layer_norm shapes");
    assert!(
        d > 0 && x.len() % d == 0,
        "layer_norm: length {} not a multiple of {d}",
        x.len()
    );
    let rows = x.len() / d;
    let group = |r: usize| r / rows_per_group.max(1);
    let groups = if rows == 0 { 0 } else { group(rows - 1) + 1 };
    for p in [mul, add].into_iter().flatten() {
        assert!(
            p.len() >= groups * d,
            "layer_norm: {} parameters for {groups} groups of {d}",
            p.len()
        );
    }
    group_chunks(out, d, rows_per_group)
        .into_par_iter()
        .for_each(|(a, g, o)| {
            let m = mul.map(|m| &m[g * d..(g + 1) * d]);
            let ad = add.map(|p| &p[g * d..(g + 1) * d]);
            ln_rows(&x[a * d..a * d + o.len()], o, d, eps, m, ad);
        });
}

multiversion! {
    fn rms_rope_rows(
        x: &mut [f32],
        first_row: usize,
        d: usize,
        bias: Option<&[f32]>,
        weight: &[f32],
        eps: f32,
        rope: Option<&RopeTables>,
    ) {
        for (i, xr) in x.chunks_exact_mut(d).enumerate() {
            if let Some(b) = bias {
                for j in 0..d {
                    xr[j] += b[j];
                }
            }
            let q = simd::sum_by(xr, |v| v * v);
            let r = 1.0 / (q / d as f32 + eps).sqrt();
            for j in 0..d {
                xr[j] = xr[j] * r * weight[j];
            }
            if let Some(t) = rope {
                let tok = (first_row + i) % t.tokens;
                let half = t.head_dim / 2;
                let cos = &t.cos[tok * half..(tok + 1) * half];
                let sin = &t.sin[tok * half..(tok + 1) * half];
                for head in xr.chunks_exact_mut(t.head_dim) {
                    for p in 0..half {
                        let (a, b) = (head[2 * p], head[2 * p + 1]);
                        head[2 * p] = a * cos[p] - b * sin[p];
                        head[2 * p + 1] = a * sin[p] + b * cos[p];
                    }
                }
            }
        }
    }
}

/// In place on x: [rows, d] (rows = batch × tokens, d = heads × head_dim):
/// x ← x + bias (optional, the projection's bias fused here), then torch.nn.RMSNorm over
/// the whole row ("rms_norm_across_heads": one RMS across all heads) times `weight`, then,
/// with `rope`, the 3D rotary embedding of each head (pairs (2p, 2p+1) rotated by the
/// token's angle p), token = row mod rope.tokens.
pub fn rms_norm_rope(
    x: &mut [f32],
    d: usize,
    bias: Option<&[f32]>,
    weight: &[f32],
    eps: f32,
    rope: Option<&RopeTables>,
) {
    let _t = crate::profile::labelled(crate::profile::Op::Elementwise, 0, || {
        "rms_norm_rope".into()
    });
    assert!(
        d > 0 && x.len() % d == 0 && weight.len() == d,
        "rms_norm_rope shapes"
    );
    if let Some(t) = rope {
        assert!(t.head_dim > 0 && d % t.head_dim == 0 && t.cos.len() == t.tokens * t.head_dim / 2);
    }
    let rows = x.len() / d;
    let per = rows_per_task(rows, d);
    x.par_chunks_mut(per * d)
        .enumerate()
        .for_each(|(c, xs)| rms_rope_rows(xs, c * per, d, bias, weight, eps, rope));
}

multiversion! {
    fn channel_rms_rows(x: &mut [f32], c: usize, scale: f32, gamma: &[f32], silu: bool) {
        for row in x.chunks_exact_mut(c) {
            let n = simd::sum_by(row, |v| v * v).sqrt().max(1e-12);
            for (v, &g) in row.iter_mut().zip(gamma) {
                let y = *v / n * scale * g;
                *v = if silu { simd::silu(y) } else { y };
            }
        }
    }
}

/// The Wan VAE's RMS norm over channels, in place on channel-last x: [rows, c]:
/// x / max(‖x‖₂, 1e-12) · √c · γ (F.normalize, then diffusers' scale and gamma, in that
/// order), fused with the SiLU that follows it in every residual block when `silu`.
pub fn channel_rms_norm(x: &mut [f32], c: usize, gamma: &[f32], silu: bool) {
    let _t = crate::profile::labelled(crate::profile::Op::Elementwise, 0, || {
        "channel_rms_norm".into()
    });
    assert!(
        c > 0 && x.len() % c == 0 && gamma.len() == c,
        "channel_rms_norm shapes"
    );
    let scale = (c as f64).sqrt() as f32;
    let per = rows_per_task(x.len() / c, c) * c;
    x.par_chunks_mut(per)
        .for_each(|xs| channel_rms_rows(xs, c, scale, gamma, silu));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::{residual_add, wan_rope_tables};

    fn vals(n: usize, seed: usize) -> Vec<f32> {
        (0..n)
            .map(|i| (((i * 7919 + seed * 104_729) % 2003) as f32 / 1001.0) - 1.0)
            .collect()
    }

    #[test]
    fn layer_norm_groups_match_naive() {
        // 3 samples of 37 tokens, d = 24: adaLN per sample, odd sizes.
        let (groups, per, d) = (3usize, 37usize, 24usize);
        let x = vals(groups * per * d, 1);
        let mul = vals(groups * d, 2);
        let add = vals(groups * d, 3);
        let mut out = vec![f32::NAN; x.len()];
        layer_norm(&x, &mut out, d, 1e-6, Some(&mul), Some(&add), per);
        for r in 0..groups * per {
            let row = &x[r * d..(r + 1) * d];
            let mean = row.iter().map(|&v| v as f64).sum::<f64>() / d as f64;
            let var = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / d as f64;
            let g = r / per;
            for i in 0..d {
                let want = (row[i] as f64 - mean) / (var + 1e-6).sqrt() * mul[g * d + i] as f64
                    + add[g * d + i] as f64;
                assert!(
                    (out[r * d + i] as f64 - want).abs() < 1e-5,
                    "row {r} col {i}"
                );
            }
        }
    }

    #[test]
    fn residual_add_gates_per_group() {
        let (groups, per, d) = (2usize, 5usize, 8usize);
        let x0 = vals(groups * per * d, 4);
        let y = vals(groups * per * d, 5);
        let bias = vals(d, 6);
        let gate = vals(groups * d, 7);
        let mut x = x0.clone();
        residual_add(&mut x, &y, d, Some(&bias), Some(&gate), per);
        for r in 0..groups * per {
            for i in 0..d {
                let want = x0[r * d + i] + (y[r * d + i] + bias[i]) * gate[(r / per) * d + i];
                assert!((x[r * d + i] - want).abs() < 1e-6);
            }
        }
    }

    #[test]
    fn rms_norm_rope_matches_naive() {
        // 2 heads of 16, grid 2x3x2 = 12 tokens, batch 2 (rows wrap around the table).
        let (heads, hd) = (2usize, 16usize);
        let d = heads * hd;
        let rope = wan_rope_tables(hd, 2, 3, 2, 10000.0);
        let rows = 2 * rope.tokens;
        let x0 = vals(rows * d, 8);
        let bias = vals(d, 9);
        let w = vals(d, 10);
        let mut x = x0.clone();
        rms_norm_rope(&mut x, d, Some(&bias), &w, 1e-6, Some(&rope));
        for r in 0..rows {
            let row: Vec<f64> = (0..d)
                .map(|i| x0[r * d + i] as f64 + bias[i] as f64)
                .collect();
            let ms = row.iter().map(|v| v * v).sum::<f64>() / d as f64;
            let n: Vec<f64> = (0..d)
                .map(|i| row[i] / (ms + 1e-6).sqrt() * w[i] as f64)
                .collect();
            let tok = r % rope.tokens;
            for h in 0..heads {
                for p in 0..hd / 2 {
                    let (c, s) = (
                        rope.cos[tok * hd / 2 + p] as f64,
                        rope.sin[tok * hd / 2 + p] as f64,
                    );
                    let (a, b) = (n[h * hd + 2 * p], n[h * hd + 2 * p + 1]);
                    let got = (
                        x[r * d + h * hd + 2 * p] as f64,
                        x[r * d + h * hd + 2 * p + 1] as f64,
                    );
                    assert!(
                        (got.0 - (a * c - b * s)).abs() < 1e-5
                            && (got.1 - (a * s + b * c)).abs() < 1e-5
                    );
                }
            }
        }
    }
}

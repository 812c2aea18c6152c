//! LayerNorm (plain, affine, or adaLN-modulated) and the Wan QK RMSNorm fused with 3D RoPE.

use rayon::prelude::*;

use super::embed::RopeTables;
use super::{rows_per_task, simd};
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
    let per = rows_per_task(rows, d).min(rows_per_group.max(1));
    // Split into tasks that stay within one group.
    let mut starts = Vec::new();
    let mut r = 0;
    while r < rows {
        let end = ((group(r) + 1).saturating_mul(rows_per_group.max(1)))
            .min(rows)
            .min(r + per);
        starts.push((r, end));
        r = end;
    }
    let mut outs: Vec<&mut [f32]> = Vec::with_capacity(starts.len());
    let mut rest = out;
    for &(a, b) in &starts {
        let (h, t) = rest.split_at_mut((b - a) * d);
        outs.push(h);
        rest = t;
    }
    starts.into_par_iter().zip(outs).for_each(|((a, b), o)| {
        let g = group(a);
        let m = mul.map(|m| &m[g * d..(g + 1) * d]);
        let ad = add.map(|p| &p[g * d..(g + 1) * d]);
        ln_rows(&x[a * d..b * d], o, d, eps, m, ad);
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

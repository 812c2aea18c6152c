//! The CPU device: a float32 reference of every op, fast enough to run small models and to
//! be the oracle for the GPU kernels. GEMMs go to the `gemm` crate (which dispatches on CPU
//! features at run time); everything else is fused, row-parallel Rust (rayon) with hot
//! loops stamped out for AVX2+FMA by [`multiversion!`](crate::multiversion).
//!
//! Tensors are plain row-major slices; each function states its shapes.

pub mod attention;
pub mod conv;
pub mod embed;
pub mod linear;
pub mod norm;
pub mod simd;
#[cfg(target_arch = "x86_64")]
mod tiles;

pub use attention::{attention, attention_biased, AttnBias, AttnShape};
pub use embed::{
    patchify, timestep_embedding, unpatchify, wan_rope_split, wan_rope_tables, wan_rope_tables_at,
    RopeTables,
};
pub use linear::{linear, matmul_wt};
pub use norm::{channel_rms_norm, layer_norm, rms_norm_rope};

use rayon::prelude::*;

use crate::multiversion;

/// Splits x: [rows, d] into rayon tasks of whole rows that never straddle a group of
/// `rows_per_group` rows (one sample's tokens), so each task uses one row of per-group
/// parameters. Returns (first row, group, rows) per task.
pub(crate) fn group_chunks(
    x: &mut [f32],
    d: usize,
    rows_per_group: usize,
) -> Vec<(usize, usize, &mut [f32])> {
    let rows = x.len() / d.max(1);
    let rpg = rows_per_group.max(1);
    let per = rows_per_task(rows, d).min(rpg);
    let mut tasks = Vec::new();
    let mut rest = x;
    let mut row = 0;
    while row < rows {
        let group = row / rpg;
        let end = (group + 1).saturating_mul(rpg).min(rows).min(row + per);
        let (head, tail) = rest.split_at_mut((end - row) * d);
        tasks.push((row, group, head));
        rest = tail;
        row = end;
    }
    tasks
}

/// Rows per rayon task for row-wise ops: enough work per task to amortise scheduling.
pub(crate) fn rows_per_task(rows: usize, d: usize) -> usize {
    let target = 1 << 15; // ~32k elements per task
    (target / d.max(1)).clamp(1, rows.max(1))
}

multiversion! {
    fn bias_gelu_rows(y: &mut [f32], bias: &[f32]) {
        let n = bias.len();
        for row in y.chunks_exact_mut(n) {
            for (v, &b) in row.iter_mut().zip(bias) {
                *v = simd::gelu_tanh(*v + b);
            }
        }
    }
}

/// y[m, n] ← gelu_tanh(y + bias[n]) in place (the FFN's first layer, fused).
pub fn bias_gelu(y: &mut [f32], bias: &[f32]) {
    let _t = crate::profile::labelled(crate::profile::Op::Elementwise, 0, || "bias_gelu".into());
    let n = bias.len();
    let per = rows_per_task(y.len() / n.max(1), n) * n;
    y.par_chunks_mut(per.max(1))
        .for_each(|c| bias_gelu_rows(c, bias));
}

multiversion! {
    fn gelu_mul_rows(a: &mut [f32], b: &[f32]) {
        for (x, &y) in a.iter_mut().zip(b) {
            *x = simd::gelu_tanh(*x) * y;
        }
    }
}

/// a ← gelu_tanh(a) ⊙ b in place (T5's gated-GELU: gelu_new(x·W0ᵀ) ⊙ x·W1ᵀ).
pub fn gelu_mul(a: &mut [f32], b: &[f32]) {
    let _t = crate::profile::labelled(crate::profile::Op::Elementwise, 0, || "gelu_mul".into());
    assert_eq!(a.len(), b.len(), "gelu_mul shapes");
    a.par_chunks_mut(1 << 15)
        .zip(b.par_chunks(1 << 15))
        .for_each(|(x, y)| gelu_mul_rows(x, y));
}

multiversion! {
    fn gelu_rows(y: &mut [f32]) {
        for v in y.iter_mut() {
            *v = simd::gelu_tanh(*v);
        }
    }
}

/// y ← gelu_tanh(y) in place.
pub fn gelu(y: &mut [f32]) {
    let _t = crate::profile::labelled(crate::profile::Op::Elementwise, 0, || "gelu".into());
    y.par_chunks_mut(1 << 15).for_each(gelu_rows);
}

multiversion! {
    fn silu_rows(y: &mut [f32]) {
        for v in y.iter_mut() {
            *v = simd::silu(*v);
        }
    }
}

/// y ← silu(y) in place.
pub fn silu(y: &mut [f32]) {
    let _t = crate::profile::labelled(crate::profile::Op::Elementwise, 0, || "silu".into());
    y.par_chunks_mut(1 << 15).for_each(silu_rows);
}

multiversion! {
    fn residual_rows(x: &mut [f32], y: &[f32], bias: Option<&[f32]>, gate: Option<&[f32]>) {
        let n = x.len().min(y.len());
        let d = bias.map(|b| b.len()).or(gate.map(|g| g.len())).unwrap_or(n).max(1);
        for (xr, yr) in x[..n].chunks_exact_mut(d).zip(y[..n].chunks_exact(d)) {
            match (bias, gate) {
                (Some(b), Some(g)) => {
                    for i in 0..d {
                        xr[i] += (yr[i] + b[i]) * g[i];
                    }
                }
                (Some(b), None) => {
                    for i in 0..d {
                        xr[i] += yr[i] + b[i];
                    }
                }
                (None, Some(g)) => {
                    for i in 0..d {
                        xr[i] += yr[i] * g[i];
                    }
                }
                (None, None) => {
                    for i in 0..d {
                        xr[i] += yr[i];
                    }
                }
            }
        }
    }
}

/// x[r, :] += (y[r, :] + bias) · gate[r / rows_per_group, :]: the residual of a Wan block,
/// fused with the bias of the projection before it and the adaLN gate (either optional).
/// x, y: [rows, d]; bias: [d]; gate: [groups, d].
pub fn residual_add(
    x: &mut [f32],
    y: &[f32],
    d: usize,
    bias: Option<&[f32]>,
    gate: Option<&[f32]>,
    rows_per_group: usize,
) {
    let _t = crate::profile::labelled(crate::profile::Op::Elementwise, 0, || "residual_add".into());
    assert_eq!(x.len(), y.len());
    group_chunks(x, d, rows_per_group)
        .into_par_iter()
        .for_each(|(row, g, xs)| {
            let g = gate.map(|gate| &gate[g * d..(g + 1) * d]);
            residual_rows(xs, &y[row * d..row * d + xs.len()], bias, g);
        });
}

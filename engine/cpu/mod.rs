//! The CPU device: a float32 reference of every op, fast enough to run small models and to
//! be the oracle for the GPU kernels. GEMMs go to the `gemm` crate (which dispatches on CPU
//! features at run time); everything else is fused, row-parallel Rust (rayon) with hot
//! loops stamped out for AVX2+FMA by [`multiversion!`](crate::multiversion).
//!
//! Tensors are plain row-major slices; each function states its shapes.

pub mod attention;
pub mod embed;
pub mod linear;
pub mod norm;
pub mod simd;

pub use attention::{attention, AttnShape};
pub use embed::{
    patchify, timestep_embedding, unpatchify, wan_rope_split, wan_rope_tables, RopeTables,
};
pub use linear::{linear, matmul_wt};
pub use norm::{layer_norm, rms_norm_rope};

use rayon::prelude::*;

use crate::multiversion;

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
    let n = bias.len();
    let per = rows_per_task(y.len() / n.max(1), n) * n;
    y.par_chunks_mut(per.max(1))
        .for_each(|c| bias_gelu_rows(c, bias));
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
    assert_eq!(x.len(), y.len());
    let rows = x.len() / d;
    let per = rows_per_task(rows, d).min(rows_per_group.max(1));
    // Tasks never straddle a group boundary, so each task sees one gate row.
    let groups_of = |start_row: usize| start_row / rows_per_group.max(1);
    let mut tasks: Vec<(usize, &mut [f32])> = Vec::new();
    let mut rest = x;
    let mut row = 0;
    while !rest.is_empty() {
        let group_end = (groups_of(row) + 1)
            .saturating_mul(rows_per_group)
            .min(rows);
        let take = per.min(group_end - row);
        let (head, tail) = rest.split_at_mut(take * d);
        tasks.push((row, head));
        rest = tail;
        row += take;
    }
    tasks.into_par_iter().for_each(|(row, xs)| {
        let g = gate.map(|g| &g[groups_of(row) * d..(groups_of(row) + 1) * d]);
        residual_rows(xs, &y[row * d..row * d + xs.len()], bias, g);
    });
}

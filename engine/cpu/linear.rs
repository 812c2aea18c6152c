//! GEMMs through the `gemm` crate (run-time dispatch to AVX2/AVX-512 micro-kernels).

use gemm::Parallelism;
use rayon::prelude::*;

/// Multi-threaded only when there is enough work to split (~1 MFLOP per thread).
fn parallelism(m: usize, n: usize, k: usize) -> Parallelism {
    let threads = rayon::current_num_threads();
    if threads > 1 && m.saturating_mul(n).saturating_mul(k) >= (1 << 20) * threads {
        Parallelism::Rayon(threads)
    } else {
        Parallelism::None
    }
}

/// out[m, n] = x[m, k] · w[n, k]ᵀ, with `w` in nn.Linear's [out, in] layout, used in
/// place: the transpose is expressed with strides (rhs (l, j) at j·k + l). Overwrites `out`.
///
/// Tried and measured: transposing w to a row-major [k, n] copy first. The gemm crate packs
/// that layout faster in isolation (1280×1024×256: 176 → 216 GFLOP/s), but over the whole
/// DiT forward at 1,280 tokens the copy cost as much as it saved (median 108.3 ms with it,
/// 106.1 ms without, 8 alternating runs on the 2-core dev machine), so w stays in place.
pub fn matmul_wt(x: &[f32], w: &[f32], m: usize, k: usize, n: usize, out: &mut [f32]) {
    let _t = crate::profile::labelled(crate::profile::Op::Gemm, 2 * (m * n * k) as u64, || {
        format!("gemm m{m} n{n} k{k}")
    });
    assert!(
        x.len() >= m * k && w.len() >= n * k && out.len() >= m * n,
        "matmul_wt shapes"
    );
    gemm_strided(m, n, k, out, n, false, x, k, 1, w, 1, k, true);
}

/// nn.Linear: out[m, n] = x[m, k] · w[n, k]ᵀ + bias[n].
pub fn linear(
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    m: usize,
    k: usize,
    n: usize,
    out: &mut [f32],
) {
    matmul_wt(x, w, m, k, n, out);
    if let Some(b) = bias {
        assert_eq!(b.len(), n, "linear bias length");
        out[..m * n].par_chunks_mut(n * 64).for_each(|rows| {
            for row in rows.chunks_exact_mut(n) {
                for (v, &bb) in row.iter_mut().zip(b) {
                    *v += bb;
                }
            }
        });
    }
}

/// dst[i, j] (+)= Σ_l lhs[i, l] · rhs[l, j] with (row, col) strides for lhs and rhs and a
/// row stride for dst. `accumulate` false overwrites dst; `parallel` splits large products
/// over the rayon pool.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_strided(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    dst_rs: usize,
    accumulate: bool,
    lhs: &[f32],
    lhs_rs: usize,
    lhs_cs: usize,
    rhs: &[f32],
    rhs_rs: usize,
    rhs_cs: usize,
    parallel: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                dst[i * dst_rs..i * dst_rs + n].fill(0.0);
            }
        }
        return;
    }
    let last = |rs: usize, cs: usize, r: usize, c: usize| (r - 1) * rs + (c - 1) * cs;
    assert!(last(dst_rs, 1, m, n) < dst.len(), "gemm_tile dst");
    assert!(last(lhs_rs, lhs_cs, m, k) < lhs.len(), "gemm_tile lhs");
    assert!(last(rhs_rs, rhs_cs, k, n) < rhs.len(), "gemm_tile rhs");
    // SAFETY: the asserts bound the largest index each operand's strides reach.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            accumulate,
            lhs.as_ptr(),
            lhs_cs as isize,
            lhs_rs as isize,
            rhs.as_ptr(),
            rhs_cs as isize,
            rhs_rs as isize,
            1.0f32,
            1.0f32,
            false,
            false,
            false,
            if parallel {
                parallelism(m, n, k)
            } else {
                Parallelism::None
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(x: &[f32], w: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
        let mut o = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                o[i * n + j] = (0..k)
                    .map(|l| x[i * k + l] as f64 * w[j * k + l] as f64)
                    .sum::<f64>() as f32;
            }
        }
        o
    }

    #[test]
    fn linear_matches_naive() {
        for &(m, k, n) in &[
            (1, 1, 1),
            (7, 13, 5),
            (130, 67, 33),
            (257, 256, 96),
            (300, 40, 70),
        ] {
            let x: Vec<f32> = (0..m * k)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0)
                .collect();
            let w: Vec<f32> = (0..n * k)
                .map(|i| ((i * 53 % 97) as f32 - 48.0) / 48.0)
                .collect();
            let b: Vec<f32> = (0..n).map(|i| i as f32 * 0.1).collect();
            let mut out = vec![f32::NAN; m * n];
            linear(&x, &w, Some(&b), m, k, n, &mut out);
            let want = naive(&x, &w, m, k, n);
            for i in 0..m * n {
                let e = want[i] + b[i % n];
                assert!(
                    (out[i] - e).abs() <= 1e-4 * (1.0 + e.abs()),
                    "({m},{k},{n}) at {i}: {} vs {e}",
                    out[i]
                );
            }
        }
    }
}

//! Register-tiled products on AVX2 + FMA over operands packed once, so that no product
//! packs anything per tile: the CPU flash attention's two products (K and V packed once per
//! (sample, head)) and the VAE's convolutions ([`pv`] over weights packed once per
//! convolution, with input pixels read in place; see conv.rs).
//!
//! Measured with the gemm crate doing both products (`perf`, 12 heads of 128, 4,096
//! tokens, 2 threads): 61% of the time in its micro-kernel and 25% packing operands, which
//! it repacks for every 128×512 tile. Here the layouts are made once:
//!
//! - K as panels of 16 keys: `[panel][d][16]` (the last panel zero-padded), so that
//!   S = Q·Kᵀ loads two 8-lane vectors of 16 consecutive keys per head dimension;
//! - V as panels of 16 head dimensions: `[dpanel][key][16]` (zero-padded), so that
//!   O += P·V loads two vectors of one key's 16 dimensions per key.
//!
//! Both kernels keep a tile of up to 6 rows × 16 columns in 12 accumulators (BLIS's
//! Haswell shape: 2 loads and 6 broadcasts per 12 FMAs) and take Q and P rows in place.

use std::arch::x86_64::*;

/// Keys per K panel and head dimensions per V panel.
pub const PANEL: usize = 16;

/// Rows of one register tile.
const MR: usize = 6;

/// (first row, rows) of each register tile over `rows` rows: MR at a time, the rest last.
fn row_tiles(rows: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..rows).step_by(MR).map(move |r0| (r0, MR.min(rows - r0)))
}

/// Stores the first `n` (≤ PANEL) lanes of a tile row's two vectors at `dst`.
#[target_feature(enable = "avx2,fma")]
unsafe fn store_row(dst: *mut f32, a: &[__m256; 2], n: usize) {
    if n == PANEL {
        _mm256_storeu_ps(dst, a[0]);
        _mm256_storeu_ps(dst.add(8), a[1]);
    } else {
        let mut tmp = [0.0f32; PANEL];
        _mm256_storeu_ps(tmp.as_mut_ptr(), a[0]);
        _mm256_storeu_ps(tmp.as_mut_ptr().add(8), a[1]);
        std::ptr::copy_nonoverlapping(tmp.as_ptr(), dst, n);
    }
}

/// Calls `$f::<M>(args)` for the tile's row count `$m` in 1..=MR (the accumulators are an
/// array of M rows, so each count is its own function).
macro_rules! by_rows {
    ($m:expr, $f:ident($($a:expr),* $(,)?)) => {
        match $m {
            6 => $f::<6>($($a),*),
            5 => $f::<5>($($a),*),
            4 => $f::<4>($($a),*),
            3 => $f::<3>($($a),*),
            2 => $f::<2>($($a),*),
            _ => $f::<1>($($a),*),
        }
    };
}

/// Packs the keys of one (sample, head): k rows j at `j·stride` (hd values each) into
/// `[panel][d][PANEL]`. `dst` holds `lk.div_ceil(PANEL)·hd·PANEL` values.
pub fn pack_k(k: &[f32], stride: usize, lk: usize, hd: usize, dst: &mut [f32]) {
    assert_eq!(
        dst.len(),
        lk.div_ceil(PANEL) * hd * PANEL,
        "pack_k: dst size"
    );
    for (p, panel) in dst.chunks_exact_mut(hd * PANEL).enumerate() {
        for c in 0..PANEL {
            let j = p * PANEL + c;
            if j < lk {
                let src = &k[j * stride..][..hd];
                for (d, &x) in src.iter().enumerate() {
                    panel[d * PANEL + c] = x;
                }
            } else {
                for d in 0..hd {
                    panel[d * PANEL + c] = 0.0;
                }
            }
        }
    }
}

/// Packs the values of one (sample, head) into `[dpanel][key][PANEL]`; `dst` holds
/// `hd.div_ceil(PANEL)·lk·PANEL` values.
pub fn pack_v(v: &[f32], stride: usize, lk: usize, hd: usize, dst: &mut [f32]) {
    assert_eq!(
        dst.len(),
        hd.div_ceil(PANEL) * lk * PANEL,
        "pack_v: dst size"
    );
    for (dp, panel) in dst.chunks_exact_mut(lk * PANEL).enumerate() {
        let d0 = dp * PANEL;
        let n = PANEL.min(hd - d0);
        for (j, row) in panel.chunks_exact_mut(PANEL).enumerate() {
            row[..n].copy_from_slice(&v[j * stride + d0..][..n]);
            row[n..].fill(0.0);
        }
    }
}

/// s[r·ss + c] = Σ_d q[r·qs + d] · k[c, d] for r < rows, c < cols, with k the packed keys
/// from key `k0` (a multiple of PANEL) on: `kp` is the head's whole packed K.
#[allow(clippy::too_many_arguments)]
pub fn qk(
    q: &[f32],
    qs: usize,
    kp: &[f32],
    k0: usize,
    hd: usize,
    s: &mut [f32],
    ss: usize,
    rows: usize,
    cols: usize,
) {
    if rows == 0 || cols == 0 {
        return;
    }
    assert!(k0 % PANEL == 0, "qk: k0 must start a panel");
    assert!((rows - 1) * qs + hd <= q.len(), "qk: q too short");
    assert!(
        (k0 + cols).div_ceil(PANEL) * hd * PANEL <= kp.len(),
        "qk: packed k too short"
    );
    assert!((rows - 1) * ss + cols <= s.len(), "qk: s too short");
    assert!(crate::cpu::simd::avx2_fma(), "qk: needs AVX2 and FMA");
    let kp = &kp[k0 / PANEL * hd * PANEL..];
    for (r0, m) in row_tiles(rows) {
        let (q, s) = (&q[r0 * qs..], &mut s[r0 * ss..]);
        // SAFETY: AVX2 and FMA are present (asserted); every index the kernels form is
        // inside the bounds asserted above (rows r0..r0+m < rows, columns < cols, panels
        // < (k0 + cols)/PANEL rounded up).
        unsafe { by_rows!(m, qk_rows(q, qs, kp, hd, s, ss, cols)) }
    }
}

#[target_feature(enable = "avx2,fma")]
unsafe fn qk_rows<const M: usize>(
    q: &[f32],
    qs: usize,
    kp: &[f32],
    hd: usize,
    s: &mut [f32],
    ss: usize,
    cols: usize,
) {
    let (qp, kpp, sp) = (q.as_ptr(), kp.as_ptr(), s.as_mut_ptr());
    for p in 0..cols.div_ceil(PANEL) {
        let panel = kpp.add(p * hd * PANEL);
        let mut acc = [[_mm256_setzero_ps(); 2]; M];
        for d in 0..hd {
            let k0 = _mm256_loadu_ps(panel.add(d * PANEL));
            let k1 = _mm256_loadu_ps(panel.add(d * PANEL + 8));
            for (r, a) in acc.iter_mut().enumerate() {
                let qv = _mm256_set1_ps(*qp.add(r * qs + d));
                a[0] = _mm256_fmadd_ps(qv, k0, a[0]);
                a[1] = _mm256_fmadd_ps(qv, k1, a[1]);
            }
        }
        let c0 = p * PANEL;
        let n = PANEL.min(cols - c0);
        for (r, a) in acc.iter().enumerate() {
            store_row(sp.add(r * ss + c0), a, n);
        }
    }
}

/// o[r·os + d] += Σ_j p[r·ps + j] · v[k0 + j, d] for r < rows, d < hd, j < kb, with `vp`
/// the head's whole packed V over `lk` keys (`[dpanel][key][PANEL]`, as [`pack_v`] makes).
#[allow(clippy::too_many_arguments)]
pub fn pv(
    p: &[f32],
    ps: usize,
    vp: &[f32],
    lk: usize,
    k0: usize,
    kb: usize,
    hd: usize,
    o: &mut [f32],
    os: usize,
    rows: usize,
) {
    if rows == 0 || kb == 0 {
        return;
    }
    assert!((rows - 1) * ps + kb <= p.len(), "pv: p too short");
    assert!(k0 + kb <= lk, "pv: keys out of range");
    assert!(
        hd.div_ceil(PANEL) * lk * PANEL <= vp.len(),
        "pv: packed v too short"
    );
    assert!(
        os >= hd && (rows - 1) * os + hd <= o.len(),
        "pv: o too short"
    );
    assert!(crate::cpu::simd::avx2_fma(), "pv: needs AVX2 and FMA");
    for (r0, m) in row_tiles(rows) {
        let (pr, or) = (&p[r0 * ps..], &mut o[r0 * os..]);
        // SAFETY: AVX2 and FMA are present (asserted); rows r0..r0+m < rows, keys
        // k0..k0+kb < lk and dimensions < hd are inside the bounds asserted above.
        unsafe { by_rows!(m, pv_rows(pr, ps, vp, lk, k0, kb, hd, or, os)) }
    }
}

#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn pv_rows<const M: usize>(
    p: &[f32],
    ps: usize,
    vp: &[f32],
    lk: usize,
    k0: usize,
    kb: usize,
    hd: usize,
    o: &mut [f32],
    os: usize,
) {
    let (pp, vpp, op) = (p.as_ptr(), vp.as_ptr(), o.as_mut_ptr());
    for dp in 0..hd.div_ceil(PANEL) {
        let d0 = dp * PANEL;
        let n = PANEL.min(hd - d0);
        // The sum starts from zero and is added to o at the end: o's running value (the
        // bias and earlier taps, in a convolution) is not in the rounding of every term.
        let mut acc = [[_mm256_setzero_ps(); 2]; M];
        let panel = vpp.add((dp * lk + k0) * PANEL);
        for j in 0..kb {
            let v0 = _mm256_loadu_ps(panel.add(j * PANEL));
            let v1 = _mm256_loadu_ps(panel.add(j * PANEL + 8));
            for (r, a) in acc.iter_mut().enumerate() {
                let pv = _mm256_set1_ps(*pp.add(r * ps + j));
                a[0] = _mm256_fmadd_ps(pv, v0, a[0]);
                a[1] = _mm256_fmadd_ps(pv, v1, a[1]);
            }
        }
        let mut tmp = [0.0f32; PANEL];
        for (r, a) in acc.iter_mut().enumerate() {
            let at = op.add(r * os + d0);
            let src = if n == PANEL {
                at as *const f32
            } else {
                std::ptr::copy_nonoverlapping(at, tmp.as_mut_ptr(), n);
                tmp.as_ptr()
            };
            a[0] = _mm256_add_ps(a[0], _mm256_loadu_ps(src));
            a[1] = _mm256_add_ps(a[1], _mm256_loadu_ps(src.add(8)));
            store_row(at, a, n);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiles_match_plain_products_on_edges() {
        if !crate::cpu::simd::avx2_fma() {
            return; // the attention keeps the gemm path on such CPUs
        }
        let val = |n: usize, s: usize| -> Vec<f32> {
            (0..n)
                .map(|i| (((i * 7919 + s * 31) % 1001) as f32 / 500.0) - 1.0)
                .collect()
        };
        // (rows, keys, hd, k0, kb): row edges 1..5, key/dim edges, a block from a panel start
        for (rows, lk, hd, k0, kb) in [
            (13, 37, 24, 16, 21),
            (6, 16, 16, 0, 16),
            (1, 5, 8, 0, 5),
            (20, 600, 40, 512, 88),
        ] {
            let (qs, ks, ps) = (hd + 3, hd + 1, kb + 2);
            let (q, k, v) = (val(rows * qs, 1), val(lk * ks, 2), val(lk * ks, 3));
            let mut kp = vec![f32::NAN; lk.div_ceil(PANEL) * hd * PANEL];
            pack_k(&k, ks, lk, hd, &mut kp);
            let mut vp = vec![f32::NAN; hd.div_ceil(PANEL) * lk * PANEL];
            pack_v(&v, ks, lk, hd, &mut vp);
            let mut s = vec![f32::NAN; rows * ps];
            qk(&q, qs, &kp, k0, hd, &mut s, ps, rows, kb);
            for r in 0..rows {
                for c in 0..kb {
                    let want: f64 = (0..hd)
                        .map(|d| q[r * qs + d] as f64 * k[(k0 + c) * ks + d] as f64)
                        .sum();
                    let got = s[r * ps + c] as f64;
                    assert!(
                        (got - want).abs() < 1e-4,
                        "qk {rows}x{kb}x{hd}: {got} vs {want}"
                    );
                }
            }
            // Output rows wider than hd (as the convolutions' pixels are): the lanes past
            // hd must come back untouched.
            let os = hd + 5;
            let o0 = val(rows * os, 4);
            let mut o = o0.clone();
            pv(&s, ps, &vp, lk, k0, kb, hd, &mut o, os, rows);
            for r in 0..rows {
                for d in hd..os {
                    assert_eq!(o[r * os + d], o0[r * os + d], "pv wrote past hd");
                }
                for d in 0..hd {
                    let want = o0[r * os + d] as f64
                        + (0..kb)
                            .map(|j| s[r * ps + j] as f64 * v[(k0 + j) * ks + d] as f64)
                            .sum::<f64>();
                    let got = o[r * os + d] as f64;
                    assert!(
                        (got - want).abs() < 1e-3 * (1.0 + want.abs()),
                        "pv {rows}x{kb}x{hd}: {got} vs {want}"
                    );
                }
            }
        }
    }
}

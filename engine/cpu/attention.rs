//! Scaled dot-product attention with memory linear in sequence length.
//!
//! Flash-attention's schedule on the CPU: each task owns a block of QB query rows of one
//! sample, and for each head streams over the keys in blocks of KB, keeping a running row
//! max `m`, a running denominator `l` and an unnormalised output accumulator. No L×L
//! matrix ever exists: the working set is QB×KB scores plus QB×head_dim outputs per task.
//! Both products (Q·Kᵀ and P·V) are strided GEMM tiles, so heads are read in place from
//! [tokens, heads·head_dim] projections without a transpose.

use rayon::prelude::*;

use super::linear::gemm_strided;
use super::simd;
use crate::multiversion;

/// Query rows per task, and keys per step of the online softmax. The score tile is
/// QB×KB×4 B = 256 KiB, inside L2. Measured at 1,280 tokens on the 2-core dev machine
/// (whole DiT forward, medians): 64×512 ~3% slower; 64×1024, 64×2048, 128×1024 and
/// 256×512 within noise (±3%) of this choice.
const QB: usize = 128;
const KB: usize = 512;

/// A key-mask value at or below this is −∞ for the softmax: with any finite score its
/// weight underflows (transformers' padding mask is f32::MIN).
const MASKED: f32 = -1e30;

/// Shapes and strides of one attention call. Head h of a row occupies columns
/// h·head_dim .. (h+1)·head_dim of that row.
#[derive(Debug, Clone, Copy)]
pub struct AttnShape {
    pub batch: usize,
    pub heads: usize,
    pub head_dim: usize,
    /// Query tokens per sample.
    pub lq: usize,
    /// Key/value tokens per sample.
    pub lk: usize,
    /// Row stride (elements) of q.
    pub q_stride: usize,
    /// Row stride of k and v.
    pub kv_stride: usize,
    /// Row stride of out.
    pub out_stride: usize,
    /// Multiplies q·k: 1/√head_dim for the DiT, 1 for T5.
    pub scale: f32,
}

/// Additive terms of T5-style attention: scores become scale·q·k + bias + mask.
#[derive(Debug, Clone, Copy)]
pub struct AttnBias<'a> {
    /// Relative position bucket of (query i, key j): [lq, lk].
    pub buckets: &'a [u16],
    /// The learned bias per (bucket, head): [num_buckets, heads] (nn.Embedding layout).
    pub table: &'a [f32],
    /// Additive key mask per sample: [B, lk] (0 for tokens, a large negative for padding).
    pub key_mask: Option<&'a [f32]>,
}

multiversion! {
    /// One step of the online softmax over a score tile s: [qb, kb] (row stride KB),
    /// updating the running max m and denominator l: [qb] and rescaling o: [qb, head_dim].
    /// Leaves exp((s − m_new)·scale) in s.
    fn softmax_step(
        s: &mut [f32],
        qb: usize,
        kb: usize,
        scale: f32,
        m: &mut [f32],
        l: &mut [f32],
        o: &mut [f32],
        head_dim: usize,
    ) {
        // exp((s − m)·scale) = 2^(s·c − m·c) with c = scale·log2(e): one FMA per score.
        let c = scale * std::f32::consts::LOG2_E;
        for r in 0..qb {
            let row = &mut s[r * KB..r * KB + kb];
            let m_blk = simd::max(row);
            let m_old = m[r];
            let m_new = if m_blk > m_old { m_blk } else { m_old };
            let corr = if m_old == f32::NEG_INFINITY { 0.0 } else { simd::exp2((m_old - m_new) * c) };
            let mc = m_new * c;
            for v in row.iter_mut() {
                *v = simd::exp2(v.mul_add(c, -mc));
            }
            let sum = simd::sum_by(row, |p| p);
            l[r] = l[r] * corr + sum;
            m[r] = m_new;
            if corr != 1.0 {
                for v in &mut o[r * head_dim..(r + 1) * head_dim] {
                    *v *= corr;
                }
            }
        }
    }
}

/// out[b, i, head h] = Σ_j softmax_j(scale·q_i·k_j) v_j for every sample b and head h,
/// no mask. q: [B, lq, q_stride]; k, v: [B, lk, kv_stride]; out: [B, lq, out_stride].
pub fn attention(q: &[f32], k: &[f32], v: &[f32], out: &mut [f32], s: AttnShape) {
    attention_impl(q, k, v, out, s, None)
}

/// Times the call for `reel bench --profile`: 4·lq·lk·head_dim FLOPs per (sample, head).
fn attention_impl(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &mut [f32],
    s: AttnShape,
    bias: Option<&AttnBias>,
) {
    let flops = 4 * (s.batch * s.heads * s.lq * s.lk * s.head_dim) as u64;
    let _t = crate::profile::labelled(crate::profile::Op::Attention, flops, || {
        format!(
            "attention b{} h{} d{} lq{} lk{}{}",
            s.batch,
            s.heads,
            s.head_dim,
            s.lq,
            s.lk,
            if bias.is_some() { " bias" } else { "" }
        )
    });
    attention_blocks(q, k, v, out, s, bias, true)
}

/// [`attention`] with T5's additive relative-position bias and key mask:
/// softmax_j(scale·q_i·k_j + table[bucket(i, j), h] + key_mask[b, j]).
pub fn attention_biased(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &mut [f32],
    s: AttnShape,
    bias: &AttnBias,
) {
    assert!(
        bias.buckets.len() >= s.lq * s.lk,
        "attention bias: buckets shape"
    );
    if let Some(m) = bias.key_mask {
        assert!(m.len() >= s.batch * s.lk, "attention bias: key mask shape");
    }
    let n_buckets = bias.table.len() / s.heads.max(1);
    assert!(
        bias.buckets[..s.lq * s.lk]
            .iter()
            .all(|&b| (b as usize) < n_buckets),
        "attention bias: bucket out of range"
    );
    attention_impl(q, k, v, out, s, Some(bias))
}

#[allow(clippy::too_many_arguments)]
fn add_bias_tile(
    sbuf: &mut [f32],
    qb: usize,
    kb: usize,
    r0: usize,
    k0: usize,
    b: usize,
    h: usize,
    s: &AttnShape,
    bias: &AttnBias,
) {
    for r in 0..qb {
        let row = &mut sbuf[r * KB..r * KB + kb];
        let buckets = &bias.buckets[(r0 + r) * s.lk + k0..][..kb];
        for (c, x) in row.iter_mut().enumerate() {
            *x = *x * s.scale + bias.table[buckets[c] as usize * s.heads + h];
        }
        if let Some(m) = bias.key_mask {
            for (x, &mv) in row.iter_mut().zip(&m[b * s.lk + k0..][..kb]) {
                *x += mv;
            }
        }
    }
}

/// The flash-style loop itself (see the module docs); `tiles` false keeps both products
/// on the gemm crate even where the register tiles could run (tests compare the two).
fn attention_blocks(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &mut [f32],
    s: AttnShape,
    bias: Option<&AttnBias>,
    tiles: bool,
) {
    let AttnShape {
        batch,
        heads,
        head_dim: hd,
        lq,
        lk,
        q_stride,
        kv_stride,
        out_stride,
        scale,
    } = s;
    let width = heads * hd;
    assert!(
        q_stride >= width && kv_stride >= width && out_stride >= width,
        "attention strides"
    );
    assert!(
        out.len() >= batch * lq * out_stride,
        "attention: out too short"
    );
    if batch == 0 || lq == 0 || width == 0 {
        return;
    }
    assert!(lk > 0, "attention over zero keys");
    // The last row needs only `width` elements, so q, k and v may be views at an offset
    // into one fused [rows, 3·width] projection.
    let need = |rows: usize, stride: usize| (rows - 1) * stride + width;
    assert!(
        q.len() >= need(batch * lq, q_stride),
        "attention: q too short"
    );
    assert!(
        k.len() >= need(batch * lk, kv_stride) && v.len() >= need(batch * lk, kv_stride),
        "attention: k/v too short"
    );
    // With a bias the tile is scaled while the bias is added; the softmax then runs at 1.
    let softmax_scale = if bias.is_some() { 1.0 } else { scale };
    // On AVX2 + FMA both products run on register tiles over K and V packed once per
    // (sample, head) (tiles.rs); elsewhere (or when a test asks) on the gemm
    // crate with Kᵀ per (sample, head): [B, heads, hd, lk], so that Q·Kᵀ reads a row-major
    // right-hand side (costs lk·width once).
    #[cfg(target_arch = "x86_64")]
    let tiles = tiles && super::simd::avx2_fma();
    #[cfg(not(target_arch = "x86_64"))]
    let tiles = false;
    #[cfg(target_arch = "x86_64")]
    use super::tiles::{self as t, PANEL};
    #[cfg(not(target_arch = "x86_64"))]
    const PANEL: usize = 16;
    let (k_len, v_len) = if tiles {
        (
            lk.div_ceil(PANEL) * hd * PANEL,
            hd.div_ceil(PANEL) * lk * PANEL,
        )
    } else {
        (hd * lk, 0)
    };
    let mut kt = vec![0.0f32; batch * heads * k_len];
    let mut vp = vec![0.0f32; batch * heads * v_len];
    kt.par_chunks_mut(k_len).enumerate().for_each(|(bh, dst)| {
        let (b, h) = (bh / heads, bh % heads);
        let src = &k[b * lk * kv_stride + h * hd..];
        #[cfg(target_arch = "x86_64")]
        if tiles {
            return t::pack_k(src, kv_stride, lk, hd, dst);
        }
        for j in 0..lk {
            for (i, &x) in src[j * kv_stride..][..hd].iter().enumerate() {
                dst[i * lk + j] = x;
            }
        }
    });
    #[cfg(target_arch = "x86_64")]
    if tiles {
        vp.par_chunks_mut(v_len).enumerate().for_each(|(bh, dst)| {
            let (b, h) = (bh / heads, bh % heads);
            t::pack_v(&v[b * lk * kv_stride + h * hd..], kv_stride, lk, hd, dst);
        });
    }
    // Keys at the end of a sample whose mask is (practically) −∞ get a softmax weight of 0
    // in PyTorch's float32 whatever the query: T5's padding. They are left out of both
    // products (before, exp2's clamp gave each a weight of 2^-126 of the row's largest,
    // absorbed by every sum it entered). A sample whose keys are all masked attends
    // uniformly to all of them, as in PyTorch's float32 (where adding f32::MIN absorbs
    // every score into one value). keys_of(b) = (keys used, every key masked).
    let keys_of = |b: usize| -> (usize, bool) {
        let Some(mask) = bias.and_then(|x| x.key_mask) else {
            return (lk, false);
        };
        let row = &mask[b * lk..(b + 1) * lk];
        match row.iter().rposition(|&x| x > MASKED) {
            Some(last) => (last + 1, false),
            None => (lk, true),
        }
    };
    // A cancelled render (crate::cancel) skips the tiles not yet started: what is left in
    // `out` is then garbage, and the caller stops at its next check.
    let cancel = crate::cancel::current();
    out[..batch * lq * out_stride]
        .par_chunks_mut(lq * out_stride)
        .enumerate()
        .for_each(|(b, out_b)| {
            let qb_all = &q[b * lq * q_stride..];
            let kt_b = &kt[b * heads * k_len..(b + 1) * heads * k_len];
            let vp_b = &vp[b * heads * v_len..(b + 1) * heads * v_len];
            let vb_all = &v[b * lk * kv_stride..];
            let (lk_used, all_masked) = keys_of(b);
            out_b
                .par_chunks_mut(QB * out_stride)
                .enumerate()
                .for_each(|(blk, out_blk)| {
                    if cancel.is_cancelled() {
                        return;
                    }
                    let r0 = blk * QB;
                    let qb = out_blk.len().div_ceil(out_stride).min(lq - r0);
                    let mut sbuf = vec![0.0f32; QB * KB];
                    let mut o = vec![0.0f32; QB * hd];
                    let mut m = [f32::NEG_INFINITY; QB];
                    let mut l = [0.0f32; QB];
                    for h in 0..heads {
                        o.fill(0.0);
                        m.fill(f32::NEG_INFINITY);
                        l.fill(0.0);
                        let qh = &qb_all[r0 * q_stride + h * hd..];
                        for k0 in (0..lk_used).step_by(KB) {
                            let kb = KB.min(lk_used - k0);
                            let kh = &kt_b[h * k_len..(h + 1) * k_len];
                            // S[qb, kb] = Q[qb, hd] · K[kb, hd]ᵀ
                            #[cfg(target_arch = "x86_64")]
                            if tiles {
                                t::qk(qh, q_stride, kh, k0, hd, &mut sbuf, KB, qb, kb);
                            }
                            if !tiles {
                                gemm_strided(
                                    qb,
                                    kb,
                                    hd,
                                    &mut sbuf,
                                    KB,
                                    false,
                                    qh,
                                    q_stride,
                                    1,
                                    &kh[k0..],
                                    lk,
                                    1,
                                    false,
                                );
                            }
                            if all_masked {
                                for row in sbuf.chunks_exact_mut(KB).take(qb) {
                                    row[..kb].fill(0.0);
                                }
                            } else if let Some(bias) = bias {
                                add_bias_tile(&mut sbuf, qb, kb, r0, k0, b, h, &s, bias);
                            }
                            softmax_step(
                                &mut sbuf,
                                qb,
                                kb,
                                softmax_scale,
                                &mut m,
                                &mut l,
                                &mut o,
                                hd,
                            );
                            // O[qb, hd] += P[qb, kb] · V[kb, hd]
                            #[cfg(target_arch = "x86_64")]
                            if tiles {
                                let vh = &vp_b[h * v_len..(h + 1) * v_len];
                                t::pv(&sbuf, KB, vh, lk, k0, kb, hd, &mut o, hd, qb);
                            }
                            if !tiles {
                                let vh = &vb_all[k0 * kv_stride + h * hd..];
                                gemm_strided(
                                    qb, hd, kb, &mut o, hd, true, &sbuf, KB, 1, vh, kv_stride, 1,
                                    false,
                                );
                            }
                        }
                        for r in 0..qb {
                            let inv = 1.0 / l[r];
                            let dst = &mut out_blk
                                [r * out_stride + h * hd..r * out_stride + (h + 1) * hd];
                            for (d, &x) in dst.iter_mut().zip(&o[r * hd..(r + 1) * hd]) {
                                *d = x * inv;
                            }
                        }
                    }
                });
        });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Naive f64 attention materialising the score matrix.
    fn naive(q: &[f32], k: &[f32], v: &[f32], s: AttnShape) -> Vec<f64> {
        let mut out = vec![0.0f64; s.batch * s.lq * s.heads * s.head_dim];
        let scale = 1.0 / (s.head_dim as f64).sqrt();
        for b in 0..s.batch {
            for h in 0..s.heads {
                for i in 0..s.lq {
                    let qi = &q[(b * s.lq + i) * s.q_stride + h * s.head_dim..][..s.head_dim];
                    let scores: Vec<f64> = (0..s.lk)
                        .map(|j| {
                            let kj =
                                &k[(b * s.lk + j) * s.kv_stride + h * s.head_dim..][..s.head_dim];
                            qi.iter()
                                .zip(kj)
                                .map(|(&a, &c)| a as f64 * c as f64)
                                .sum::<f64>()
                                * scale
                        })
                        .collect();
                    let mx = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let e: Vec<f64> = scores.iter().map(|x| (x - mx).exp()).collect();
                    let z: f64 = e.iter().sum();
                    for d in 0..s.head_dim {
                        let acc: f64 = (0..s.lk)
                            .map(|j| {
                                e[j] * v[(b * s.lk + j) * s.kv_stride + h * s.head_dim + d] as f64
                            })
                            .sum();
                        out[((b * s.lq + i) * s.heads + h) * s.head_dim + d] = acc / z;
                    }
                }
            }
        }
        out
    }

    fn rand(n: usize, seed: u64) -> Vec<f32> {
        let mut x = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                ((x >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
            })
            .collect()
    }

    #[test]
    fn attention_matches_naive_on_odd_shapes() {
        for &(batch, heads, hd, lq, lk) in &[
            (1, 1, 8, 1, 1),
            (2, 3, 16, 70, 33),
            (1, 2, 24, 130, 600),
            (2, 1, 48, 5, 1030),
        ] {
            let width = heads * hd;
            let s = AttnShape {
                batch,
                heads,
                head_dim: hd,
                lq,
                lk,
                q_stride: width + 3,
                kv_stride: width + 1,
                out_stride: width,
                scale: 1.0 / (hd as f32).sqrt(),
            };
            let q = rand(batch * lq * s.q_stride, 1);
            let k = rand(batch * lk * s.kv_stride, 2);
            let v = rand(batch * lk * s.kv_stride, 3);
            let want = naive(&q, &k, &v, s);
            // The register tiles (where the CPU has AVX2 + FMA) and the gemm crate.
            for tiles in [true, false] {
                let mut out = vec![f32::NAN; batch * lq * width];
                attention_blocks(&q, &k, &v, &mut out, s, None, tiles);
                let err = crate::tensor::rel_l2(&out, &want);
                assert!(
                    err < 1e-5,
                    "{batch} {heads} {hd} {lq} {lk} tiles {tiles}: rel l2 {err}"
                );
            }
        }
    }

    /// T5's attention with a bias table and a key mask, in f64 with the whole score row.
    fn naive_biased(q: &[f32], k: &[f32], v: &[f32], s: AttnShape, bias: &AttnBias) -> Vec<f64> {
        let hd = s.head_dim;
        let mut out = vec![0.0f64; s.batch * s.lq * s.heads * hd];
        for b in 0..s.batch {
            for h in 0..s.heads {
                for i in 0..s.lq {
                    let qi = &q[(b * s.lq + i) * s.q_stride + h * hd..][..hd];
                    let scores: Vec<f64> = (0..s.lk)
                        .map(|j| {
                            let kj = &k[(b * s.lk + j) * s.kv_stride + h * hd..][..hd];
                            let dot: f64 =
                                qi.iter().zip(kj).map(|(&a, &c)| a as f64 * c as f64).sum();
                            dot * s.scale as f64
                                + bias.table[bias.buckets[i * s.lk + j] as usize * s.heads + h]
                                    as f64
                                + bias.key_mask.map_or(0.0, |m| m[b * s.lk + j] as f64)
                        })
                        .collect();
                    let mx = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let e: Vec<f64> = scores.iter().map(|x| (x - mx).exp()).collect();
                    let z: f64 = e.iter().sum();
                    for d in 0..hd {
                        let acc: f64 = (0..s.lk)
                            .map(|j| e[j] * v[(b * s.lk + j) * s.kv_stride + h * hd + d] as f64)
                            .sum();
                        out[((b * s.lq + i) * s.heads + h) * hd + d] = acc / z;
                    }
                }
            }
        }
        out
    }

    /// Masked keys at the end of a sample are left out of the products; masked keys before
    /// a real one, and a sample with every key masked, are kept.
    #[test]
    fn biased_attention_with_key_padding_matches_naive() {
        let (batch, heads, hd, lq, lk) = (4, 3, 16, 37, 600);
        let width = heads * hd;
        let s = AttnShape {
            batch,
            heads,
            head_dim: hd,
            lq,
            lk,
            q_stride: width,
            kv_stride: width,
            out_stride: width,
            scale: 1.0,
        };
        let q = rand(batch * lq * width, 4);
        let k = rand(batch * lk * width, 5);
        let v = rand(batch * lk * width, 6);
        let table = rand(8 * heads, 7);
        let buckets: Vec<u16> = (0..lq * lk).map(|i| ((i * 7) % 8) as u16).collect();
        // valid prefixes of 600 (none masked), 17, a hole at 3..9 before 40 valid, none.
        let mut mask = vec![0.0f32; batch * lk];
        mask[lk + 17..2 * lk].fill(f32::MIN);
        mask[2 * lk + 3..2 * lk + 9].fill(f32::MIN);
        mask[2 * lk + 40..3 * lk].fill(f32::MIN);
        mask[3 * lk..].fill(f32::MIN);
        let bias = AttnBias {
            buckets: &buckets,
            table: &table,
            key_mask: Some(&mask),
        };
        let mut want = naive_biased(&q, &k, &v, s, &bias);
        // Every key masked: PyTorch's float32 scores all round to f32::MIN, so the weights
        // are uniform (the f64 reference would still rank the keys).
        for i in 0..lq {
            for c in 0..width {
                let mean = (0..lk)
                    .map(|j| v[(3 * lk + j) * width + c] as f64)
                    .sum::<f64>();
                want[(3 * lq + i) * width + c] = mean / lk as f64;
            }
        }
        for tiles in [true, false] {
            let mut out = vec![f32::NAN; batch * lq * width];
            attention_blocks(&q, &k, &v, &mut out, s, Some(&bias), tiles);
            for b in 0..batch {
                let n = lq * width;
                let (got, want) = (&out[b * n..(b + 1) * n], &want[b * n..(b + 1) * n]);
                let err = crate::tensor::rel_l2(got, want);
                assert!(err < 1e-5, "sample {b} tiles {tiles}: rel l2 {err}");
            }
        }
    }
}

//! Convolutions of the causal video VAE on channel-last frames.
//!
//! Activations are [T, H, W, C] per sample (channels contiguous), so the channel RMS norm,
//! SiLU and 1×1 convolutions read contiguous rows. On AVX2 + FMA a k_t×k_h×k_w convolution
//! runs as register tiles over the input in place ([`conv_tiles`]): per tap, each output
//! row's run of pixels whose input pixel is inside the frame is a product of [pixels,
//! C_in] (rows at stride s_w·C_in, read where they lie) by the tap's weights packed once
//! into panels of 16 output channels, accumulated into the output. Nothing is gathered or
//! packed per call. Other CPUs gather im2col blocks and call the gemm crate
//! ([`conv_im2col`]).

use rayon::prelude::*;

use crate::error::Result;
use crate::tensor::zeroed;

use super::linear::gemm_strided;

/// Frames of one sample, channel-last: data is [t, h, w, c].
#[derive(Debug, Clone, PartialEq)]
pub struct Frames {
    pub t: usize,
    pub h: usize,
    pub w: usize,
    pub c: usize,
    pub data: Vec<f32>,
}

impl Frames {
    /// Zero frames; [`Error::OutOfMemory`] when the host cannot hold them (at 1080p a
    /// decoder frame of 96 channels is 0.8 GB).
    pub fn zeros(t: usize, h: usize, w: usize, c: usize) -> Result<Self> {
        Ok(Frames {
            t,
            h,
            w,
            c,
            data: zeroed(t * h * w * c, "VAE frames")?,
        })
    }

    /// Elements per frame.
    pub fn frame_len(&self) -> usize {
        self.h * self.w * self.c
    }

    pub fn frame(&self, i: usize) -> &[f32] {
        &self.data[i * self.frame_len()..(i + 1) * self.frame_len()]
    }

    /// The last `n` frames (all of them if there are fewer).
    pub fn last(&self, n: usize) -> Frames {
        let n = n.min(self.t);
        Frames {
            t: n,
            data: self.data[(self.t - n) * self.frame_len()..].to_vec(),
            ..*self
        }
    }

    /// `self` followed by `next` in time (same h, w, c).
    pub fn concat(&self, next: &Frames) -> Frames {
        assert!(
            self.h == next.h && self.w == next.w && self.c == next.c,
            "concat of unlike frames"
        );
        let mut data = Vec::with_capacity(self.data.len() + next.data.len());
        data.extend_from_slice(&self.data);
        data.extend_from_slice(&next.data);
        Frames {
            t: self.t + next.t,
            data,
            ..*self
        }
    }
}

/// A convolution's weights, rearranged once for the CPU's products.
pub struct ConvWeights {
    /// Tap-major [k_t·k_h·k_w, C_in, C_out] for the im2col GEMM; with `tiles`, each tap's
    /// C_out in panels of [`PANEL`](super::tiles::PANEL) (the last zero-padded):
    /// [tap][C_out panel][C_in][PANEL], as `tiles::pv` reads them.
    pub w: Vec<f32>,
    /// Whether `w` is in panels for the register tiles (AVX2 + FMA) or tap-major.
    pub tiles: bool,
    pub bias: Vec<f32>,
    pub ci: usize,
    pub co: usize,
    pub k: [usize; 3],
}

impl ConvWeights {
    /// From PyTorch's [C_out, C_in, k_t, k_h, k_w] layout (Conv2d weights: k_t = 1), for
    /// the register tiles where the CPU has AVX2 and FMA and the im2col GEMM elsewhere.
    pub fn new(weight: &[f32], bias: &[f32], co: usize, ci: usize, k: [usize; 3]) -> Self {
        Self::with_layout(weight, bias, co, ci, k, true)
    }

    /// [`ConvWeights::new`] with the layout chosen: `tiles` asks for the register tiles,
    /// which are given only where the CPU has AVX2 and FMA.
    pub fn with_layout(
        weight: &[f32],
        bias: &[f32],
        co: usize,
        ci: usize,
        k: [usize; 3],
        tiles: bool,
    ) -> Self {
        let kvol = k[0] * k[1] * k[2];
        assert_eq!(weight.len(), co * ci * kvol, "conv weight shape");
        assert_eq!(bias.len(), co, "conv bias shape");
        let tiles = tiles && cfg!(target_arch = "x86_64") && super::simd::avx2_fma();
        // Where each (tap, C_in, C_out) weight goes.
        const P: usize = TILE_PANEL;
        let panels = co.div_ceil(P);
        let len = if tiles {
            kvol * panels * ci * P
        } else {
            kvol * ci * co
        };
        let at = |tap: usize, i: usize, o: usize| {
            if tiles {
                ((tap * panels + o / P) * ci + i) * P + o % P
            } else {
                (tap * ci + i) * co + o
            }
        };
        let mut w = vec![0.0f32; len];
        for o in 0..co {
            for i in 0..ci {
                for tap in 0..kvol {
                    w[at(tap, i, o)] = weight[(o * ci + i) * kvol + tap];
                }
            }
        }
        ConvWeights {
            w,
            tiles,
            bias: bias.to_vec(),
            ci,
            co,
            k,
        }
    }
}

/// C_out per weight panel of the register-tile layout.
#[cfg(target_arch = "x86_64")]
const TILE_PANEL: usize = super::tiles::PANEL;
#[cfg(not(target_arch = "x86_64"))]
const TILE_PANEL: usize = 16;

/// Spatial zero padding: [top, bottom, left, right].
pub type Pad2 = [usize; 4];

/// Bytes of one task's im2col buffer (rows × k_t·k_h·k_w·C_in floats): a few MB, so the
/// buffer and the GEMM's packing of it stay near the caches while each task still does
/// enough work to amortise its call. Measured on Wan2.1's decoder (latents [1,16,3,12,16],
/// 2 threads, Zen 3): 12.1 s with 1 MB, 7.6–8.0 s with 4 MB, 9.7 s with 8 MB, 9.6 s with
/// 16 MB.
const COL_BYTES: usize = 4 << 20;

thread_local! {
    /// Each rayon worker's im2col buffer, reused across calls.
    static COLS: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// A 3D convolution over a time sequence of frames given as slices ([h, w, C_in] each;
/// `None` is a frame of zeros, how causal padding and caches are expressed). No padding in
/// time: output frame j reads input frames j·s_t .. j·s_t + k_t. Spatial zero padding `pad`,
/// strides `stride` = [s_t, s_h, s_w]. Returns [T_out, H_out, W_out, C_out].
///
/// Measured on Wan2.1's VAE convolutions at 96–384 channels (2 threads, Zen 3): one GEMM
/// per tap with K = C_in, accumulating into the output 27 times, ran at 70–120 GFLOP/s;
/// im2col blocks with one GEMM of K = the whole receptive field at 101–126; the register
/// tiles at 134–149. README's CPU table has the whole VAE beside PyTorch.
pub fn conv3d(
    frames: &[Option<&[f32]>],
    h: usize,
    w: usize,
    cw: &ConvWeights,
    stride: [usize; 3],
    pad: Pad2,
) -> Result<Frames> {
    conv3d_blocks(frames, h, w, cw, stride, pad, None)
}

/// [`conv3d`] with `block` per task (im2col: output pixels; tiles: output rows; None: the
/// budget's choice).
fn conv3d_blocks(
    frames: &[Option<&[f32]>],
    h: usize,
    w: usize,
    cw: &ConvWeights,
    stride: [usize; 3],
    pad: Pad2,
    block: Option<usize>,
) -> Result<Frames> {
    let [kt, kh, kw] = cw.k;
    let (ci, co) = (cw.ci, cw.co);
    let [st, sh, sw] = stride;
    let (hp, wp) = (h + pad[0] + pad[1], w + pad[2] + pad[3]);
    assert!(
        frames.len() >= kt && hp >= kh && wp >= kw,
        "conv3d: input smaller than the kernel"
    );
    let t_out = (frames.len() - kt) / st + 1;
    let (h_out, w_out) = ((hp - kh) / sh + 1, (wp - kw) / sw + 1);
    let flops = 2 * (t_out * h_out * w_out * co * ci * kt * kh * kw) as u64;
    let _t = crate::profile::labelled(crate::profile::Op::VaeConv, flops, || {
        format!("conv {kt}x{kh}x{kw} s{st}{sh}{sw} {ci}->{co} {t_out}x{h_out}x{w_out}")
    });
    for f in frames.iter().flatten() {
        assert_eq!(f.len(), h * w * ci, "conv3d: frame size");
    }
    let mut out = Frames::zeros(t_out, h_out, w_out, co)?;
    if cw.tiles {
        #[cfg(target_arch = "x86_64")]
        conv_tiles(frames, h, w, cw, stride, pad, &mut out, block);
    } else {
        conv_im2col(frames, h, w, cw, stride, pad, &mut out, block);
    }
    Ok(out)
}

/// Input bytes one task of [`conv_tiles`] reads per tap and weight panel (rows of output ×
/// their input pixels × C_in): kept in L2 while the task's weight panel, C_in·PANEL floats,
/// stays in L1.
const TASK_INPUT_BYTES: usize = 256 << 10;

/// The convolution as register tiles over the input in place: for each tap and panel of 16
/// output channels, each output row's pixels whose input pixel is inside the frame
/// accumulate `tiles::pv` (6 pixels × 16 channels in registers, the K loop over C_in with
/// the tap's packed weights) into the output, which starts as the bias. Padding and `None`
/// frames are skipped, not gathered: nothing is copied. One rayon task per block of output
/// rows of one frame (`block` rows, or the budget's choice).
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
fn conv_tiles(
    frames: &[Option<&[f32]>],
    h: usize,
    w: usize,
    cw: &ConvWeights,
    stride: [usize; 3],
    pad: Pad2,
    out: &mut Frames,
    block: Option<usize>,
) {
    use super::tiles::{pv, PANEL};
    let [kt, kh, kw] = cw.k;
    let (ci, co) = (cw.ci, cw.co);
    let [st, sh, sw] = stride;
    let w_out = out.w;
    let panels = co.div_ceil(PANEL);
    let tap_len = panels * ci * PANEL;
    let budget = TASK_INPUT_BYTES / 4 / (w_out * sw * ci);
    par_blocks(out, w_out * co, block, budget, |j, y0, dst| {
        for px in dst.chunks_exact_mut(co) {
            px.copy_from_slice(&cw.bias);
        }
        let n_rows = dst.len() / (w_out * co);
        for (dt, f) in frames[j * st..j * st + kt].iter().enumerate() {
            let Some(f) = f else { continue };
            for dy in 0..kh {
                for dx in 0..kw {
                    let tap = (dt * kh + dy) * kw + dx;
                    let wt = &cw.w[tap * tap_len..][..tap_len];
                    // The output columns whose input column x·s_w + dx − pad_left is
                    // inside the frame.
                    let xa = pad[2].saturating_sub(dx).div_ceil(sw);
                    let xb = (w + pad[2]).saturating_sub(dx).div_ceil(sw).min(w_out);
                    if xa >= xb {
                        continue;
                    }
                    for p in 0..panels {
                        let vp = &wt[p * ci * PANEL..][..ci * PANEL];
                        let n = PANEL.min(co - p * PANEL);
                        for r in 0..n_rows {
                            let yy = ((y0 + r) * sh + dy).wrapping_sub(pad[0]);
                            if yy >= h {
                                continue;
                            }
                            let src = &f[(yy * w + xa * sw + dx - pad[2]) * ci..];
                            let o = &mut dst[(r * w_out + xa) * co + p * PANEL..];
                            pv(src, sw * ci, vp, ci, 0, ci, n, o, co, xb - xa);
                        }
                    }
                }
            }
        }
    });
}

/// The convolution as im2col + GEMM (CPUs without AVX2 and FMA): each output frame is cut
/// into blocks of output pixels, one rayon task each. A task gathers its pixels' receptive
/// fields into an im2col buffer [pixels, k_t·k_h·k_w·C_in] (tap-major, channels
/// contiguous: one copy of C_in floats per pixel and tap, zeros where the tap falls in the
/// padding or on a `None` frame) and runs one GEMM with K = the whole receptive field
/// against the tap-major weights [K, C_out]. A 1×1×1 convolution without stride or padding
/// is one GEMM over the frame itself. `block`: output pixels per task.
#[allow(clippy::too_many_arguments)]
fn conv_im2col(
    frames: &[Option<&[f32]>],
    h: usize,
    w: usize,
    cw: &ConvWeights,
    stride: [usize; 3],
    pad: Pad2,
    out: &mut Frames,
    block: Option<usize>,
) {
    let [kt, kh, kw] = cw.k;
    let (ci, co) = (cw.ci, cw.co);
    let [st, sh, sw] = stride;
    let w_out = out.w;
    let kdim = kt * kh * kw * ci;
    let pointwise = kt == 1 && kh == 1 && kw == 1 && stride == [1, 1, 1] && pad == [0; 4];
    let budget = (COL_BYTES / 4 / kdim).max(16);
    par_blocks(out, co, block, budget, |j, p0, dst| {
        let rows = dst.len() / co;
        if pointwise {
            let src = frames[j].map(|f| &f[p0 * ci..(p0 + rows) * ci]);
            match src {
                Some(src) => gemm_strided(
                    rows, co, ci, dst, co, false, src, ci, 1, &cw.w, co, 1, false,
                ),
                None => dst.fill(0.0),
            }
        } else {
            // Time taps on `None` frames (causal zero padding) in front of the real
            // ones add nothing: leave them out of K (the first latent frame's
            // convolutions read two zero frames of three).
            let window = &frames[j * st..j * st + kt];
            let dt0 = window.iter().take_while(|f| f.is_none()).count();
            let plane = kh * kw * ci;
            let k_used = (kt - dt0) * plane;
            if k_used == 0 {
                dst.fill(0.0);
            } else {
                COLS.with(|cols| {
                    let mut cols = cols.borrow_mut();
                    if cols.len() < rows * k_used {
                        cols.resize(rows * k_used, 0.0);
                    }
                    let col = &mut cols[..rows * k_used];
                    for (r, dst_row) in col.chunks_exact_mut(k_used).enumerate() {
                        let (y, x) = ((p0 + r) / w_out, (p0 + r) % w_out);
                        let mut taps = dst_row.chunks_exact_mut(ci);
                        for src in &window[dt0..] {
                            for dy in 0..kh {
                                let yy = (y * sh + dy).wrapping_sub(pad[0]);
                                for dx in 0..kw {
                                    let xx = (x * sw + dx).wrapping_sub(pad[2]);
                                    let d = taps.next().expect("k_used taps");
                                    match src {
                                        Some(f) if yy < h && xx < w => d.copy_from_slice(
                                            &f[(yy * w + xx) * ci..(yy * w + xx + 1) * ci],
                                        ),
                                        _ => d.fill(0.0),
                                    }
                                }
                            }
                        }
                    }
                    let rhs = &cw.w[dt0 * plane * co..];
                    gemm_strided(
                        rows, co, k_used, dst, co, false, col, k_used, 1, rhs, co, 1, false,
                    );
                });
            }
        }
        for px in dst.chunks_exact_mut(co) {
            for (d, &b) in px.iter_mut().zip(&cw.bias) {
                *d += b;
            }
        }
    });
}

/// Cuts every frame of `out` into blocks of `block` units (`unit` floats each: an output row
/// or pixel) and runs `f(frame, first unit, block's floats)` on each, one rayon task per
/// block. `block` None: `budget` units, fewer when there would not be two tasks per thread.
fn par_blocks(
    out: &mut Frames,
    unit: usize,
    block: Option<usize>,
    budget: usize,
    f: impl Fn(usize, usize, &mut [f32]) + Sync + Send,
) {
    let units = out.frame_len() / unit;
    let tasks = 2 * rayon::current_num_threads().max(1);
    let mut chosen = budget.clamp(1, units);
    if out.t * units.div_ceil(chosen) < tasks {
        chosen = units.div_ceil(tasks.div_ceil(out.t)).max(1);
    }
    let block = block.unwrap_or(chosen).clamp(1, units);
    let frame_len = out.frame_len();
    out.data
        .par_chunks_mut(frame_len)
        .enumerate()
        .flat_map(|(j, frame)| {
            frame
                .par_chunks_mut(block * unit)
                .enumerate()
                .map(move |(b, dst)| (j, b * block, dst))
        })
        .for_each(|(j, u0, dst)| f(j, u0, dst));
}

/// Nearest-neighbour 2× spatial upsampling of every frame (PyTorch's "nearest-exact" at an
/// exact scale of 2 copies each pixel into a 2×2 block).
pub fn upsample2x(x: &Frames) -> Result<Frames> {
    let (h2, w2, c) = (x.h * 2, x.w * 2, x.c);
    let mut out = Frames::zeros(x.t, h2, w2, c)?;
    let fl = h2 * w2 * c;
    out.data
        .par_chunks_mut(w2 * c)
        .enumerate()
        .for_each(|(r, row)| {
            let (t, y) = (r / h2, r % h2);
            let src = &x.data[t * x.frame_len() + (y / 2) * x.w * c..][..x.w * c];
            for xx in 0..w2 {
                row[xx * c..(xx + 1) * c].copy_from_slice(&src[(xx / 2) * c..(xx / 2 + 1) * c]);
            }
        });
    debug_assert_eq!(out.data.len(), x.t * fl);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Direct convolution in f64 on channel-last frames.
    #[allow(clippy::too_many_arguments)]
    fn naive(
        frames: &[Option<&[f32]>],
        h: usize,
        w: usize,
        wt: &[f32],
        b: &[f32],
        ci: usize,
        co: usize,
        k: [usize; 3],
        s: [usize; 3],
        pad: Pad2,
    ) -> Frames {
        let [kt, kh, kw] = k;
        let (hp, wp) = (h + pad[0] + pad[1], w + pad[2] + pad[3]);
        let t_out = (frames.len() - kt) / s[0] + 1;
        let (ho, wo) = ((hp - kh) / s[1] + 1, (wp - kw) / s[2] + 1);
        let mut out = Frames::zeros(t_out, ho, wo, co).unwrap();
        for t in 0..t_out {
            for y in 0..ho {
                for x in 0..wo {
                    for o in 0..co {
                        let mut acc = b[o] as f64;
                        for dt in 0..kt {
                            let Some(f) = frames[t * s[0] + dt] else {
                                continue;
                            };
                            for dy in 0..kh {
                                for dx in 0..kw {
                                    let (yy, xx) = (
                                        (y * s[1] + dy) as isize - pad[0] as isize,
                                        (x * s[2] + dx) as isize - pad[2] as isize,
                                    );
                                    if yy < 0 || xx < 0 || yy >= h as isize || xx >= w as isize {
                                        continue;
                                    }
                                    for i in 0..ci {
                                        let wv = wt[(((o * ci + i) * kt + dt) * kh + dy) * kw + dx]
                                            as f64;
                                        acc += wv
                                            * f[((yy as usize) * w + xx as usize) * ci + i] as f64;
                                    }
                                }
                            }
                        }
                        out.data[((t * ho + y) * wo + x) * co + o] = acc as f32;
                    }
                }
            }
        }
        out
    }

    #[test]
    fn conv3d_matches_naive() {
        let val = |n: usize, s: usize| -> Vec<f32> {
            (0..n)
                .map(|i| (((i * 7919 + s * 31) % 1001) as f32 / 500.0) - 1.0)
                .collect()
        };
        // (ci, co, k, stride, pad, frames, h, w)
        let cases = [
            (3, 5, [3, 3, 3], [1, 1, 1], [1, 1, 1, 1], 4, 5, 7),
            (4, 4, [1, 3, 3], [1, 2, 2], [0, 1, 0, 1], 2, 6, 8),
            (6, 3, [3, 1, 1], [2, 1, 1], [0, 0, 0, 0], 5, 3, 4),
            (2, 7, [1, 1, 1], [1, 1, 1], [0, 0, 0, 0], 2, 3, 3),
            // Three weight panels, the last of 5 channels; rows of 6 + 3 pixels.
            (5, 37, [3, 3, 3], [1, 1, 1], [1, 1, 1, 1], 3, 4, 9),
            (3, 20, [1, 3, 3], [1, 2, 2], [0, 1, 0, 1], 1, 7, 13),
        ];
        for (ci, co, k, s, pad, t, h, w) in cases {
            let data = val(t * h * w * ci, 1);
            let wt = val(co * ci * k[0] * k[1] * k[2], 2);
            let b = val(co, 3);
            // Zero frames as causal padding (a prefix: left out of the GEMM), a whole window
            // of them, and one between real frames (gathered as zeros).
            for zero in [&[0][..], &[0, 1], &[0, 1, 2], &[1]] {
                let frames: Vec<Option<&[f32]>> = (0..t)
                    .map(|i| {
                        (!zero.contains(&i)).then(|| &data[i * h * w * ci..(i + 1) * h * w * ci])
                    })
                    .collect();
                let want = naive(&frames, h, w, &wt, &b, ci, co, k, s, pad);
                // Both layouts (the tiles where this CPU has AVX2 and FMA; CI's has); the
                // budget's blocks, then blocks of 1 and 5 (im2col: pixels; tiles: rows), for
                // short last blocks and several tasks per frame.
                for (tiles, block) in [false, true]
                    .into_iter()
                    .flat_map(|t| [None, Some(1), Some(5)].map(|b| (t, b)))
                {
                    let cw = ConvWeights::with_layout(&wt, &b, co, ci, k, tiles);
                    let got = conv3d_blocks(&frames, h, w, &cw, s, pad, block).unwrap();
                    assert_eq!(
                        (got.t, got.h, got.w, got.c),
                        (want.t, want.h, want.w, want.c)
                    );
                    for (a, b) in got.data.iter().zip(&want.data) {
                        assert!(
                            (a - b).abs() < 1e-4,
                            "{a} vs {b} in case ci={ci} k={k:?} s={s:?} zero frames {zero:?} \
                         block {block:?} tiles {}",
                            cw.tiles
                        );
                    }
                }
            }
        }
    }
}

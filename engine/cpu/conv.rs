//! Convolutions of the causal video VAE on channel-last frames.
//!
//! Activations are [T, H, W, C] per sample (channels contiguous), so the channel RMS norm,
//! SiLU and 1×1 convolutions read contiguous rows. A k_t×k_h×k_w convolution is a sum of
//! k_t·k_h·k_w GEMMs, one per tap, over zero-padded input frames ("implicit GEMM"): with
//! stride 1 each tap's input is one contiguous window of the padded frame, read as a
//! [H_out·W_pad, C_in] matrix, so no im2col buffer exists; the W_pad − W_out columns of
//! junk this computes per row are dropped when the output is written. Strided convolutions
//! (the 2× downsampling) run one GEMM per output row and tap with a strided left-hand side.

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

/// A convolution's weights rearranged for the tap GEMMs: [k_t·k_h·k_w, C_in, C_out].
pub struct ConvWeights {
    pub taps: Vec<f32>,
    pub bias: Vec<f32>,
    pub ci: usize,
    pub co: usize,
    pub k: [usize; 3],
}

impl ConvWeights {
    /// From PyTorch's [C_out, C_in, k_t, k_h, k_w] layout (Conv2d weights: k_t = 1).
    pub fn new(weight: &[f32], bias: &[f32], co: usize, ci: usize, k: [usize; 3]) -> Self {
        let kvol = k[0] * k[1] * k[2];
        assert_eq!(weight.len(), co * ci * kvol, "conv weight shape");
        assert_eq!(bias.len(), co, "conv bias shape");
        let mut taps = vec![0.0f32; kvol * ci * co];
        for o in 0..co {
            for i in 0..ci {
                for tap in 0..kvol {
                    taps[(tap * ci + i) * co + o] = weight[(o * ci + i) * kvol + tap];
                }
            }
        }
        ConvWeights {
            taps,
            bias: bias.to_vec(),
            ci,
            co,
            k,
        }
    }
}

/// Spatial zero padding: [top, bottom, left, right].
pub type Pad2 = [usize; 4];

/// Zero-pads one [h, w, c] frame to [h + top + bottom + 1, w + left + right, c] (one slack
/// row, so the last tap's window of the stride-1 path stays inside the buffer).
fn pad_frame(f: Option<&[f32]>, h: usize, w: usize, c: usize, pad: Pad2) -> Result<Vec<f32>> {
    let wp = w + pad[2] + pad[3];
    let hp = h + pad[0] + pad[1] + 1;
    let mut out = zeroed(hp * wp * c, "a padded VAE frame")?;
    if let Some(f) = f {
        for y in 0..h {
            let dst = ((y + pad[0]) * wp + pad[2]) * c;
            out[dst..dst + w * c].copy_from_slice(&f[y * w * c..(y + 1) * w * c]);
        }
    }
    Ok(out)
}

/// A 3D convolution over a time sequence of frames given as slices ([h, w, C_in] each;
/// `None` is a frame of zeros, how causal padding and caches are expressed). No padding in
/// time: output frame j reads input frames j·s_t .. j·s_t + k_t. Spatial zero padding `pad`,
/// strides `stride` = [s_t, s_h, s_w]. Returns [T_out, H_out, W_out, C_out].
pub fn conv3d(
    frames: &[Option<&[f32]>],
    h: usize,
    w: usize,
    cw: &ConvWeights,
    stride: [usize; 3],
    pad: Pad2,
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
    let _t = crate::profile::time(crate::profile::Op::VaeConv, flops);
    for f in frames.iter().flatten() {
        assert_eq!(f.len(), h * w * ci, "conv3d: frame size");
    }
    // Pad every input frame that some output reads, once.
    let used: Vec<usize> = (0..frames.len())
        .filter(|&i| i < (t_out - 1) * st + kt)
        .collect();
    let padded: Vec<Vec<f32>> = used
        .par_iter()
        .map(|&i| pad_frame(frames[i], h, w, ci, pad))
        .collect::<Result<_>>()?;
    let frame_stride = (hp + 1) * wp * ci;
    let mut out = Frames::zeros(t_out, h_out, w_out, co)?;
    let out_len = h_out * w_out * co;
    for (j, dst) in out.data.chunks_mut(out_len).enumerate() {
        if sh == 1 && sw == 1 {
            // [H_out·W_pad, C_out] on the padded-width grid, then drop the junk columns.
            let rows = h_out * wp;
            let mut full = zeroed(rows * co, "a VAE convolution's output frame")?;
            let mut first = true;
            for dt in 0..kt {
                let src = &padded[j * st + dt];
                debug_assert_eq!(src.len(), frame_stride);
                for dy in 0..kh {
                    for dx in 0..kw {
                        let tap = (dt * kh + dy) * kw + dx;
                        let lhs = &src[(dy * wp + dx) * ci..];
                        let rhs = &cw.taps[tap * ci * co..(tap + 1) * ci * co];
                        gemm_strided(
                            rows, co, ci, &mut full, co, !first, lhs, ci, 1, rhs, co, 1, true,
                        );
                        first = false;
                    }
                }
            }
            dst.par_chunks_mut(w_out * co)
                .enumerate()
                .for_each(|(y, row)| {
                    for x in 0..w_out {
                        let s = &full[(y * wp + x) * co..(y * wp + x + 1) * co];
                        for ((d, &v), &b) in
                            row[x * co..(x + 1) * co].iter_mut().zip(s).zip(&cw.bias)
                        {
                            *d = v + b;
                        }
                    }
                });
        } else {
            dst.par_chunks_mut(w_out * co)
                .enumerate()
                .for_each(|(y, row)| {
                    let mut first = true;
                    for dt in 0..kt {
                        let src = &padded[j * st + dt];
                        for dy in 0..kh {
                            for dx in 0..kw {
                                let tap = (dt * kh + dy) * kw + dx;
                                let lhs = &src[((y * sh + dy) * wp + dx) * ci..];
                                let rhs = &cw.taps[tap * ci * co..(tap + 1) * ci * co];
                                gemm_strided(
                                    w_out,
                                    co,
                                    ci,
                                    row,
                                    co,
                                    !first,
                                    lhs,
                                    sw * ci,
                                    1,
                                    rhs,
                                    co,
                                    1,
                                    false,
                                );
                                first = false;
                            }
                        }
                    }
                    for px in row.chunks_exact_mut(co) {
                        for (d, &b) in px.iter_mut().zip(&cw.bias) {
                            *d += b;
                        }
                    }
                });
        }
    }
    Ok(out)
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
        ];
        for (ci, co, k, s, pad, t, h, w) in cases {
            let data = val(t * h * w * ci, 1);
            let frames: Vec<Option<&[f32]>> = (0..t)
                .map(|i| {
                    if i == 0 {
                        None
                    } else {
                        Some(&data[i * h * w * ci..(i + 1) * h * w * ci])
                    }
                })
                .collect();
            let wt = val(co * ci * k[0] * k[1] * k[2], 2);
            let b = val(co, 3);
            let got = conv3d(&frames, h, w, &ConvWeights::new(&wt, &b, co, ci, k), s, pad).unwrap();
            let want = naive(&frames, h, w, &wt, &b, ci, co, k, s, pad);
            assert_eq!(
                (got.t, got.h, got.w, got.c),
                (want.t, want.h, want.w, want.c)
            );
            for (a, b) in got.data.iter().zip(&want.data) {
                assert!(
                    (a - b).abs() < 1e-4,
                    "{a} vs {b} in case ci={ci} k={k:?} s={s:?}"
                );
            }
        }
    }
}

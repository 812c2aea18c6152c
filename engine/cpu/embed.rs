//! Embeddings: sinusoidal timesteps, Wan's 3D RoPE tables, the (p_t, p_h, p_w) patch
//! embedding's im2col and its inverse.

use crate::error::Result;
use crate::tensor::zeroed;

/// The cos/sin tables of Wan's 3D RoPE for one latent grid: for token
/// l = (f·H + h)·W + w and pair p of a head, the angle of that token's position on the
/// axis the pair belongs to. cos, sin: [tokens, head_dim / 2].
#[derive(Debug, Clone)]
pub struct RopeTables {
    pub tokens: usize,
    pub head_dim: usize,
    pub cos: Vec<f32>,
    pub sin: Vec<f32>,
}

/// How diffusers' WanRotaryPosEmbed splits a head: h and w get 2·⌊head_dim/6⌋ channels
/// each, t the rest. Returns (t_dim, h_dim, w_dim).
pub fn wan_rope_split(head_dim: usize) -> (usize, usize, usize) {
    let hw = 2 * (head_dim / 6);
    (head_dim - 2 * hw, hw, hw)
}

/// Frequencies of one axis of `dim` channels: θ^(−2i/dim) for i < dim/2, in f64 as
/// diffusers' get_1d_rotary_pos_embed computes them (freqs_dtype=float64).
fn axis_freqs(dim: usize, theta: f64) -> Vec<f64> {
    (0..dim / 2)
        .map(|i| 1.0 / theta.powf((2 * i) as f64 / dim as f64))
        .collect()
}

/// RoPE tables for a post-patch grid of `frames × height × width` tokens. Angles and their
/// cos/sin are computed in f64 and rounded to f32 once, exactly as diffusers builds its
/// buffers (cos/sin in float64, then `.float()`).
pub fn wan_rope_tables(
    head_dim: usize,
    frames: usize,
    height: usize,
    width: usize,
    theta: f64,
) -> RopeTables {
    wan_rope_tables_at(head_dim, 0, frames, height, width, theta)
}

/// [`wan_rope_tables`] for frames `first_frame .. first_frame + frames` of a longer video:
/// a block-causal chunk's tokens sit at their frames' absolute indices.
pub fn wan_rope_tables_at(
    head_dim: usize,
    first_frame: usize,
    frames: usize,
    height: usize,
    width: usize,
    theta: f64,
) -> RopeTables {
    let (t_dim, h_dim, w_dim) = wan_rope_split(head_dim);
    let (ft, fh, fw) = (
        axis_freqs(t_dim, theta),
        axis_freqs(h_dim, theta),
        axis_freqs(w_dim, theta),
    );
    let half = head_dim / 2;
    let tokens = frames * height * width;
    let mut cos = Vec::with_capacity(tokens * half);
    let mut sin = Vec::with_capacity(tokens * half);
    for f in first_frame..first_frame + frames {
        for h in 0..height {
            for w in 0..width {
                let angles = ft
                    .iter()
                    .map(|&q| f as f64 * q)
                    .chain(fh.iter().map(|&q| h as f64 * q))
                    .chain(fw.iter().map(|&q| w as f64 * q));
                for a in angles {
                    cos.push(a.cos() as f32);
                    sin.push(a.sin() as f32);
                }
            }
        }
    }
    RopeTables {
        tokens,
        head_dim,
        cos,
        sin,
    }
}

/// diffusers' get_timestep_embedding with flip_sin_to_cos: [cos(t·ω_i), sin(t·ω_i)],
/// ω_i = exp(−ln(max_period)·i / (half − shift)), i < half. Out: [len(t), dim].
///
/// torch evaluates this in float32 even for a float64 model (`timesteps.float()`), and
/// with t ≈ 1000 an ulp of ω moves the angle by ~6e-5, so we reproduce its f32 roundings
/// step by step: the exponent and the product t·ω are rounded to f32 as torch rounds them,
/// and exp/sin/cos are evaluated in f64 and rounded once (correctly rounded, as torch's
/// f32 kernels are to within an ulp).
pub fn timestep_embedding(
    t: &[f32],
    dim: usize,
    flip_sin_to_cos: bool,
    shift: f32,
    max_period: f32,
) -> Vec<f32> {
    let half = dim / 2;
    let neg_log = -(max_period as f64).ln() as f32;
    let freqs: Vec<f32> = (0..half)
        .map(|i| {
            let e = (neg_log * i as f32) / (half as f32 - shift);
            (e as f64).exp() as f32
        })
        .collect();
    let mut out = vec![0.0f32; t.len() * dim];
    for (row, &tv) in out.chunks_exact_mut(dim).zip(t) {
        let (first, second) = row[..2 * half].split_at_mut(half);
        for i in 0..half {
            let a = (tv * freqs[i]) as f64;
            let (s, c) = (a.sin() as f32, a.cos() as f32);
            if flip_sin_to_cos {
                first[i] = c;
                second[i] = s;
            } else {
                first[i] = s;
                second[i] = c;
            }
        }
        // Odd dims are zero-padded at the end, as diffusers pads.
    }
    out
}

/// im2col of a Conv3d whose kernel equals its stride (p_t, p_h, p_w):
/// x: [B, C, T, H, W] → out: [B, L, C·p_t·p_h·p_w], L = (T/p_t)(H/p_h)(W/p_w), tokens in
/// (t, h, w) order, patch features in the weight's (c, kt, kh, kw) order. Shapes must be
/// multiples of the patch (callers check).
pub fn patchify(
    x: &[f32],
    b: usize,
    c: usize,
    t: usize,
    h: usize,
    w: usize,
    p: [usize; 3],
) -> Result<Vec<f32>> {
    let [pt, ph, pw] = p;
    let (tt, hh, ww) = (t / pt, h / ph, w / pw);
    let k = c * pt * ph * pw;
    let mut out = zeroed(b * tt * hh * ww * k, "the DiT's patches")?;
    let mut o = 0;
    for bi in 0..b {
        for ti in 0..tt {
            for hi in 0..hh {
                for wi in 0..ww {
                    for ci in 0..c {
                        for kt in 0..pt {
                            for kh in 0..ph {
                                let base = (((bi * c + ci) * t + ti * pt + kt) * h + hi * ph + kh)
                                    * w
                                    + wi * pw;
                                out[o..o + pw].copy_from_slice(&x[base..base + pw]);
                                o += pw;
                            }
                        }
                    }
                }
            }
        }
    }
    Ok(out)
}

/// Inverse of Wan's output head layout: y: [B, L, p_t·p_h·p_w·C] with features in
/// (kt, kh, kw, c) order (diffusers reshapes to (..., p_t, p_h, p_w, C)) → [B, C, T, H, W].
pub fn unpatchify(
    y: &[f32],
    b: usize,
    c: usize,
    grid: [usize; 3],
    p: [usize; 3],
) -> Result<Vec<f32>> {
    let [tt, hh, ww] = grid;
    let [pt, ph, pw] = p;
    let (t, h, w) = (tt * pt, hh * ph, ww * pw);
    let mut out = zeroed(b * c * t * h * w, "the DiT's output")?;
    let mut i = 0;
    for bi in 0..b {
        for ti in 0..tt {
            for hi in 0..hh {
                for wi in 0..ww {
                    for kt in 0..pt {
                        for kh in 0..ph {
                            for kw in 0..pw {
                                for ci in 0..c {
                                    let dst =
                                        (((bi * c + ci) * t + ti * pt + kt) * h + hi * ph + kh) * w
                                            + wi * pw
                                            + kw;
                                    out[dst] = y[i];
                                    i += 1;
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rope_split_matches_diffusers() {
        assert_eq!(wan_rope_split(128), (44, 42, 42));
        assert_eq!(wan_rope_split(16), (8, 4, 4));
        assert_eq!(wan_rope_split(24), (8, 8, 8));
    }

    #[test]
    fn patchify_roundtrip_layouts() {
        // A 1x1 conv-like patch (C=2, p=(1,2,2)) of known values.
        let (b, c, t, h, w) = (1, 2, 1, 2, 4);
        let x: Vec<f32> = (0..b * c * t * h * w).map(|i| i as f32).collect();
        let p = patchify(&x, b, c, t, h, w, [1, 2, 2]).unwrap();
        // token 0 = (t0, h0, w0): channel 0 patch [0,1,4,5], channel 1 patch [8,9,12,13]
        assert_eq!(&p[..8], &[0., 1., 4., 5., 8., 9., 12., 13.]);
        // unpatchify expects (kt, kh, kw, c) order: build it from x and invert.
        let mut y = Vec::new();
        for wi in 0..2 {
            for kh in 0..2 {
                for kw in 0..2 {
                    for ci in 0..c {
                        y.push(x[((ci * t) * h + kh) * w + wi * 2 + kw]);
                    }
                }
            }
        }
        assert_eq!(unpatchify(&y, b, c, [1, 1, 2], [1, 2, 2]).unwrap(), x);
    }
}

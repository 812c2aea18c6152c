//! Launcher of kernels/conv3d.cu: the Wan VAE's convolutions as an implicit GEMM on tensor
//! cores, over a table of channel-last bf16 frames (None: a frame of zeros), bias fused.
//! CPU reference: [`crate::cpu::conv::conv3d`].

use super::{kernels, DevPtr, DevSlice, Half, Kernel, KernelDevice, Launch};
use crate::error::{Error, Result};

/// conv::SMEM_BYTES: 3 stages of (64 + 64) rows of 40 bf16.
const SMEM: u32 = 3 * (64 + 64) * (32 + 8) * 2;

kernels! {
    module "conv3d";
    @args ConvArgs {
        f0: DevPtr, f1: DevPtr, f2: DevPtr, f3: DevPtr, f4: DevPtr, f5: DevPtr, f6: DevPtr, f7: DevPtr,
        w: DevPtr, bias: DevPtr, res: DevPtr, out: DevPtr, out_frame: i64,
        h: i32, wd: i32, ci: i32, co: i32, ld: i32, up: i32,
        kt: i32, kh: i32, kw: i32, st: i32, sh: i32, sw: i32,
        pad_top: i32, pad_left: i32, h_out: i32, w_out: i32,
    }
    C8 = conv3d_bf16_c8 (ConvArgs);
    C2 = conv3d_bf16_c2 (ConvArgs);
    C1 = conv3d_bf16_c1 (ConvArgs);
    F16_C8 = conv3d_f16_c8 (ConvArgs);
    F16_C2 = conv3d_f16_c2 (ConvArgs);
    F16_C1 = conv3d_f16_c1 (ConvArgs);
}

/// A convolution's geometry: input frames of h × w pixels of ci channels, `ld` elements
/// apart (ci, or more for frames interleaved in a wider buffer), read 2× upsampled when `up`
/// (nearest: the convolution sees 2h × 2w), co outputs, kernel (kt, kh, kw), strides (st,
/// sh, sw), spatial padding [top, bottom, left, right] of the (upsampled) frame (no padding
/// in time: causal zeros and cache frames are entries of the frame table).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvShape {
    pub h: usize,
    pub w: usize,
    pub ci: usize,
    pub co: usize,
    pub k: [usize; 3],
    pub stride: [usize; 3],
    pub pad: [usize; 4],
    pub ld: usize,
    pub up: bool,
}

impl ConvShape {
    /// Packed frames (ld = ci), no upsampling.
    pub fn new(
        (h, w, ci, co): (usize, usize, usize, usize),
        k: [usize; 3],
        stride: [usize; 3],
        pad: [usize; 4],
    ) -> Self {
        ConvShape {
            h,
            w,
            ci,
            co,
            k,
            stride,
            pad,
            ld: ci,
            up: false,
        }
    }

    /// The frame the convolution sees: (h, w), doubled when upsampling.
    pub fn seen(&self) -> (usize, usize) {
        let f = if self.up { 2 } else { 1 };
        (self.h * f, self.w * f)
    }

    /// Elements a stored input frame spans.
    pub fn frame_span(&self) -> usize {
        (self.h * self.w).saturating_sub(1) * self.ld + self.ci
    }

    /// (t_out, h_out, w_out) for `frames` input frames.
    pub fn out_size(&self, frames: usize) -> Result<(usize, usize, usize)> {
        let [kt, kh, kw] = self.k;
        let [st, sh, sw] = self.stride;
        let (h, w) = self.seen();
        let (hp, wp) = (h + self.pad[0] + self.pad[1], w + self.pad[2] + self.pad[3]);
        if [kt, kh, kw, st, sh, sw, self.ci, self.co, h, w].contains(&0)
            || frames < kt
            || hp < kh
            || wp < kw
        {
            return Err(Error::invalid(format!(
                "conv3d: {frames} frames of {self:?} are smaller than the kernel"
            )));
        }
        Ok((
            (frames - kt) / st + 1,
            (hp - kh) / sh + 1,
            (wp - kw) / sw + 1,
        ))
    }
}

/// The device layout of a convolution's weights, [co][kt·kh·kw][ci], from PyTorch's
/// [co, ci, kt, kh, kw].
pub fn device_weights(weight: &[f32], co: usize, ci: usize, k: [usize; 3]) -> Vec<f32> {
    let kvol = k[0] * k[1] * k[2];
    let mut out = vec![0.0f32; co * kvol * ci];
    for o in 0..co {
        for i in 0..ci {
            for tap in 0..kvol {
                out[(o * kvol + tap) * ci + i] = weight[(o * ci + i) * kvol + tap];
            }
        }
    }
    out
}

/// out (frame t at t·h_out·w_out·co, channel-last) = conv(frames) + bias (+ res, in out's
/// layout), with the device weights of [`device_weights`]. Returns (t_out, h_out, w_out)
/// and the variant.
pub fn conv3d<'a, T: Half>(
    dev: &KernelDevice,
    frames: &[Option<DevSlice<'a, T>>],
    weights: DevSlice<'a, T>,
    bias: DevSlice<'a, f32>,
    res: Option<DevSlice<'a, T>>,
    out: DevSlice<'a, T>,
    s: ConvShape,
) -> Result<((usize, usize, usize), &'static str)> {
    const K: &str = "conv3d";
    let bad = |m: String| Err(Error::invalid(format!("{K}: {m}")));
    if frames.len() > 8 {
        return bad(format!(
            "{} input frames; at most 8 per launch",
            frames.len()
        ));
    }
    if s.k[0] > 3 {
        return bad(format!(
            "kernel depth {} > 3 (the kernel holds 3 frames per output frame)",
            s.k[0]
        ));
    }
    if s.ld < s.ci {
        return bad(format!("pixel stride {} below the {} channels", s.ld, s.ci));
    }
    let (t_out, h_out, w_out) = s.out_size(frames.len())?;
    let kvol = s.k.iter().product::<usize>();
    let span = s.frame_span();
    if frames.iter().flatten().any(|f| f.len() < span) {
        return bad(format!(
            "every frame must hold {}x{}x{} values ({span} elements at pixel stride {})",
            s.h, s.w, s.ci, s.ld
        ));
    }
    if weights.len() != s.co * kvol * s.ci || bias.len() != s.co {
        return bad(format!(
            "weights [{}, {kvol}·{}] and bias [{}] expected",
            s.co, s.ci, s.co
        ));
    }
    let out_frame = h_out * w_out * s.co;
    let out_len = t_out * out_frame;
    if out.len() < out_len {
        return bad(format!(
            "out holds {} values, {t_out} frames of {h_out}x{w_out}x{} need {out_len}",
            out.len(),
            s.co
        ));
    }
    let rp = match res {
        Some(r) if r.len() < out_len => {
            return bad(format!(
                "the residual holds {} values, the output {out_len}",
                r.len()
            ))
        }
        Some(r) => r.addr(dev, K)?,
        None => DevPtr::NULL,
    };
    let mut ptrs = [DevPtr::NULL; 8];
    for (p, f) in ptrs.iter_mut().zip(frames) {
        if let Some(f) = f {
            *p = f.addr(dev, K)?;
        }
    }
    let (wp, bp, op) = (weights.addr(dev, K)?, bias.addr(dev, K)?, out.addr(dev, K)?);
    let all = ptrs
        .iter()
        .chain([&wp])
        .filter(|p| p.0 != 0)
        .map(|p| p.0)
        .collect::<Vec<_>>();
    let aligned = |elems: usize| {
        s.ci % elems == 0 && s.ld % elems == 0 && all.iter().all(|p| p % (2 * elems as u64) == 0)
    };
    let [c8, c2, c1]: [&Kernel<ConvArgs>; 3] = if T::F16 {
        [&F16_C8, &F16_C2, &F16_C1]
    } else {
        [&C8, &C2, &C1]
    };
    let kernel = if aligned(8) {
        c8
    } else if aligned(2) {
        c2
    } else {
        c1
    };
    let i = |v: usize, what: &str| {
        i32::try_from(v).map_err(|_| Error::invalid(format!("{K}: {what} = {v} too large")))
    };
    let (h_seen, w_seen) = s.seen();
    let mut a = ConvArgs {
        f0: ptrs[0],
        f1: ptrs[1],
        f2: ptrs[2],
        f3: ptrs[3],
        f4: ptrs[4],
        f5: ptrs[5],
        f6: ptrs[6],
        f7: ptrs[7],
        w: wp,
        bias: bp,
        res: rp,
        out: op,
        out_frame: out_frame as i64,
        h: i(h_seen, "h")?,
        wd: i(w_seen, "w")?,
        ci: i(s.ci, "ci")?,
        co: i(s.co, "co")?,
        ld: i(s.ld, "ld")?,
        up: s.up as i32,
        kt: i(s.k[0], "kt")?,
        kh: i(s.k[1], "kh")?,
        kw: i(s.k[2], "kw")?,
        st: i(s.stride[0], "st")?,
        sh: i(s.stride[1], "sh")?,
        sw: i(s.stride[2], "sw")?,
        pad_top: i(s.pad[0], "pad")?,
        pad_left: i(s.pad[2], "pad")?,
        h_out: i(h_out, "h_out")?,
        w_out: i(w_out, "w_out")?,
    };
    let l = Launch {
        grid: super::Dim3::new(
            s.co.div_ceil(64) as u32,
            u32::try_from((h_out * w_out).div_ceil(64))
                .map_err(|_| Error::invalid(format!("{K}: frames too large")))?,
            t_out as u32,
        ),
        block: super::Dim3::x(128),
        shared: SMEM,
    };
    let flops = 2 * (out_len * kvol * s.ci) as u64;
    // SAFETY: every frame spans (h·w − 1)·ld + ci values (checked; the upsampled read maps
    // pixel (y, x) of the 2h × 2w frame to (y/2, x/2) of the stored one), the launch reads
    // frames t·st .. t·st + kt − 1 < frames.len() ≤ 8 (out_size), weights, bias and the
    // residual as checked, and writes t_out frames of out (checked); the copies' alignment
    // holds for the variant chosen.
    unsafe { dev.launch_counted(kernel, l, &mut a, crate::profile::Op::VaeConv, flops)? };
    Ok(((t_out, h_out, w_out), kernel.name))
}

//! Launcher of kernels/conv3d.cu: the Wan VAE's convolutions as an implicit GEMM on tensor
//! cores, over a table of channel-last bf16 frames (None: a frame of zeros), bias fused.
//! CPU reference: [`crate::cpu::conv::conv3d`].

use super::{kernels, DevPtr, DevSlice, Kernel, KernelDevice, Launch};
use crate::error::{Error, Result};

type Bf = half::bf16;

/// conv::SMEM_BYTES: 3 stages of (64 + 64) rows of 40 bf16.
const SMEM: u32 = 3 * (64 + 64) * (32 + 8) * 2;

kernels! {
    module "conv3d";
    @args ConvArgs {
        f0: DevPtr, f1: DevPtr, f2: DevPtr, f3: DevPtr, f4: DevPtr, f5: DevPtr, f6: DevPtr, f7: DevPtr,
        w: DevPtr, bias: DevPtr, out: DevPtr, out_frame: i64,
        h: i32, wd: i32, ci: i32, co: i32, kt: i32, kh: i32, kw: i32, st: i32, sh: i32, sw: i32,
        pad_top: i32, pad_left: i32, h_out: i32, w_out: i32,
    }
    C8 = conv3d_bf16_c8 (ConvArgs);
    C2 = conv3d_bf16_c2 (ConvArgs);
    C1 = conv3d_bf16_c1 (ConvArgs);
}

/// A convolution's geometry: input frames h × w × ci, co outputs, kernel (kt, kh, kw),
/// strides (st, sh, sw), spatial padding [top, bottom, left, right] (no padding in time:
/// causal zeros and cache frames are entries of the frame table).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvShape {
    pub h: usize,
    pub w: usize,
    pub ci: usize,
    pub co: usize,
    pub k: [usize; 3],
    pub stride: [usize; 3],
    pub pad: [usize; 4],
}

impl ConvShape {
    /// (t_out, h_out, w_out) for `frames` input frames.
    pub fn out_size(&self, frames: usize) -> Result<(usize, usize, usize)> {
        let [kt, kh, kw] = self.k;
        let [st, sh, sw] = self.stride;
        let (hp, wp) = (
            self.h + self.pad[0] + self.pad[1],
            self.w + self.pad[2] + self.pad[3],
        );
        if [kt, kh, kw, st, sh, sw, self.ci, self.co, self.h, self.w].contains(&0)
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

/// out (frame t at t·h_out·w_out·co, channel-last) = conv(frames) + bias, with the device
/// weights of [`device_weights`]. Returns (t_out, h_out, w_out) and the variant.
pub fn conv3d_bf16<'a>(
    dev: &KernelDevice,
    frames: &[Option<DevSlice<'a, Bf>>],
    weights: DevSlice<'a, Bf>,
    bias: DevSlice<'a, f32>,
    out: DevSlice<'a, Bf>,
    s: ConvShape,
) -> Result<((usize, usize, usize), &'static str)> {
    const K: &str = "conv3d";
    if frames.len() > 8 {
        return Err(Error::invalid(format!(
            "{K}: {} input frames; at most 8 per launch",
            frames.len()
        )));
    }
    if s.k[0] > 3 {
        return Err(Error::invalid(format!(
            "{K}: kernel depth {} > 3 (the kernel holds 3 frames per output frame)",
            s.k[0]
        )));
    }
    let (t_out, h_out, w_out) = s.out_size(frames.len())?;
    let kvol = s.k.iter().product::<usize>();
    let frame_len = s.h * s.w * s.ci;
    if frames.iter().flatten().any(|f| f.len() != frame_len) {
        return Err(Error::invalid(format!(
            "{K}: every frame must hold {}x{}x{} values",
            s.h, s.w, s.ci
        )));
    }
    if weights.len() != s.co * kvol * s.ci || bias.len() != s.co {
        return Err(Error::invalid(format!(
            "{K}: weights [{}, {kvol}·{}] and bias [{}] expected",
            s.co, s.ci, s.co
        )));
    }
    let out_frame = h_out * w_out * s.co;
    if out.len() < t_out * out_frame {
        return Err(Error::invalid(format!(
            "{K}: out holds {} values, {t_out} frames of {h_out}x{w_out}x{} need {}",
            out.len(),
            s.co,
            t_out * out_frame
        )));
    }
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
    let kernel: &Kernel<ConvArgs> = if s.ci % 8 == 0 && all.iter().all(|p| p % 16 == 0) {
        &C8
    } else if s.ci % 2 == 0 && all.iter().all(|p| p % 4 == 0) {
        &C2
    } else {
        &C1
    };
    let i = |v: usize, what: &str| {
        i32::try_from(v).map_err(|_| Error::invalid(format!("{K}: {what} = {v} too large")))
    };
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
        out: op,
        out_frame: out_frame as i64,
        h: i(s.h, "h")?,
        wd: i(s.w, "w")?,
        ci: i(s.ci, "ci")?,
        co: i(s.co, "co")?,
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
    let flops = 2 * (t_out * h_out * w_out * s.co * kvol * s.ci) as u64;
    // SAFETY: every frame holds h·w·ci values (checked), the launch reads frames
    // t·st .. t·st + kt − 1 < frames.len() ≤ 8 (out_size), weights and bias as checked, and
    // writes t_out frames of out (checked).
    unsafe { dev.launch_counted(kernel, l, &mut a, crate::profile::Op::VaeConv, flops)? };
    Ok(((t_out, h_out, w_out), kernel.name))
}

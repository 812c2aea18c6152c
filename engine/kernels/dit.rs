//! Launchers of kernels/dit.cu: the Wan DiT's glue kernels (patchify, unpatchify,
//! modulation, activations into bf16).

use super::{kernels, DevPtr, DevSlice, KernelDevice, Launch};
use crate::error::{Error, Result};

type Bf = half::bf16;

kernels! {
    module "dit";
    PATCHIFY = patchify_bf16(PatchifyArgs {
        x: DevPtr, out: DevPtr, b: i32, c: i32, t: i32, h: i32, w: i32, pt: i32, ph: i32, pw: i32,
    });
    UNPATCHIFY = unpatchify_f32(UnpatchifyArgs {
        y: DevPtr, out: DevPtr, b: i32, c: i32, tt: i32, hh: i32, ww: i32, pt: i32, ph: i32, pw: i32,
    });
    MODULATION = modulation_f32(ModulationArgs {
        table: DevPtr, proj: DevPtr, out: DevPtr, rows: i32, batch: i32, d: i32,
        proj_stride: i32, proj_row: i32, plus_one: i32,
    });
    ACT = act_f32_bf16(ActArgs { x: DevPtr, y: DevPtr, n: i32, act: i32 });
}

/// Blocks of 256 threads for a grid-stride loop over n elements (at most 65,535 blocks).
fn grid_stride(n: usize) -> Launch {
    Launch::x((n as u64).div_ceil(256).clamp(1, 65_535) as u32, 256)
}

fn i32_of(v: usize, what: &str) -> Result<i32> {
    i32::try_from(v)
        .map_err(|_| Error::invalid(format!("{what} = {v} does not fit a kernel's int")))
}

/// A video [B, C, T, H, W] and its patch (pt, ph, pw).
#[derive(Debug, Clone, Copy)]
pub struct PatchShape {
    pub b: usize,
    pub c: usize,
    pub t: usize,
    pub h: usize,
    pub w: usize,
    pub p: [usize; 3],
}

impl PatchShape {
    fn check(&self, what: &str) -> Result<(usize, usize)> {
        let [pt, ph, pw] = self.p;
        if [self.b, self.c, pt, ph, pw].contains(&0)
            || self.t % pt != 0
            || self.h % ph != 0
            || self.w % pw != 0
            || self.t == 0
            || self.h == 0
            || self.w == 0
        {
            return Err(Error::invalid(format!(
                "{what}: {self:?} is not whole patches"
            )));
        }
        let tokens = self.b * (self.t / pt) * (self.h / ph) * (self.w / pw);
        Ok((tokens, self.c * pt * ph * pw))
    }

    fn args(&self) -> Result<[i32; 8]> {
        Ok([
            i32_of(self.b, "B")?,
            i32_of(self.c, "C")?,
            i32_of(self.t, "T")?,
            i32_of(self.h, "H")?,
            i32_of(self.w, "W")?,
            i32_of(self.p[0], "pt")?,
            i32_of(self.p[1], "ph")?,
            i32_of(self.p[2], "pw")?,
        ])
    }
}

/// out [B·L, C·pt·ph·pw] bf16 = im2col of x [B, C, T, H, W] f32 (features in (c, kt, kh, kw)
/// order). The device twin of [`crate::cpu::patchify`].
pub fn patchify_bf16<'a>(
    dev: &KernelDevice,
    x: DevSlice<'a, f32>,
    out: DevSlice<'a, Bf>,
    s: PatchShape,
) -> Result<()> {
    const K: &str = "patchify_bf16";
    let (rows, k) = s.check(K)?;
    if x.len() != s.b * s.c * s.t * s.h * s.w || out.len() != rows * k {
        return Err(Error::invalid(format!(
            "{K}: x or out does not match {s:?}"
        )));
    }
    let [b, c, t, h, w, pt, ph, pw] = s.args()?;
    let mut a = PatchifyArgs {
        x: x.addr(dev, K)?,
        out: out.addr(dev, K)?,
        b,
        c,
        t,
        h,
        w,
        pt,
        ph,
        pw,
    };
    // SAFETY: x holds the video and out the rows × features (checked).
    unsafe { dev.launch(&PATCHIFY, grid_stride(out.len()), &mut a) }
}

/// out [B, C, T, H, W] f32 from y [B·L, pt·ph·pw·C] f32 (features in (kt, kh, kw, c) order);
/// `s` describes out. The device twin of [`crate::cpu::unpatchify`].
pub fn unpatchify_f32<'a>(
    dev: &KernelDevice,
    y: DevSlice<'a, f32>,
    out: DevSlice<'a, f32>,
    s: PatchShape,
) -> Result<()> {
    const K: &str = "unpatchify_f32";
    let (rows, k) = s.check(K)?;
    if out.len() != s.b * s.c * s.t * s.h * s.w || y.len() != rows * k {
        return Err(Error::invalid(format!(
            "{K}: y or out does not match {s:?}"
        )));
    }
    let [b, c, t, h, w, pt, ph, pw] = s.args()?;
    let mut a = UnpatchifyArgs {
        y: y.addr(dev, K)?,
        out: out.addr(dev, K)?,
        b,
        c,
        tt: t / pt,
        hh: h / ph,
        ww: w / pw,
        pt,
        ph,
        pw,
    };
    // SAFETY: as for patchify, the other way.
    unsafe { dev.launch(&UNPATCHIFY, grid_stride(y.len()), &mut a) }
}

/// adaLN tables out [rows, batch, d] = table [rows, d] + proj (sample b's row j at
/// b·proj_stride + j·proj_row) + 1 on the rows of `plus_one` (a bit mask).
#[allow(clippy::too_many_arguments)]
pub fn modulation_f32<'a>(
    dev: &KernelDevice,
    table: DevSlice<'a, f32>,
    proj: DevSlice<'a, f32>,
    out: DevSlice<'a, f32>,
    (rows, batch, d): (usize, usize, usize),
    proj_stride: usize,
    proj_row: usize,
    plus_one: u32,
) -> Result<()> {
    const K: &str = "modulation_f32";
    let proj_need = (batch - 1) * proj_stride + (rows - 1) * proj_row + d;
    if rows == 0 || batch == 0 || d == 0 || rows > 31 {
        return Err(Error::invalid(format!(
            "{K}: rows {rows}, batch {batch}, d {d}"
        )));
    }
    if table.len() < rows * d || proj.len() < proj_need || out.len() != rows * batch * d {
        return Err(Error::invalid(format!(
            "{K}: table [{rows}, {d}], proj {proj_need} elements, out [{rows}, {batch}, {d}]"
        )));
    }
    let mut a = ModulationArgs {
        table: table.addr(dev, K)?,
        proj: proj.addr(dev, K)?,
        out: out.addr(dev, K)?,
        rows: rows as i32,
        batch: i32_of(batch, "batch")?,
        d: i32_of(d, "d")?,
        proj_stride: i32_of(proj_stride, "proj_stride")?,
        proj_row: i32_of(proj_row, "proj_row")?,
        plus_one: plus_one as i32,
    };
    // SAFETY: the three cover what the kernel reads and writes (checked).
    unsafe { dev.launch(&MODULATION, grid_stride(out.len()), &mut a) }
}

/// What [`act_f32_bf16`] applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum F32Act {
    None = 0,
    Silu = 1,
}

/// y = act(x) rounded to bf16.
pub fn act_f32_bf16<'a>(
    dev: &KernelDevice,
    x: DevSlice<'a, f32>,
    y: DevSlice<'a, Bf>,
    act: F32Act,
) -> Result<()> {
    const K: &str = "act_f32_bf16";
    if x.len() != y.len() {
        return Err(Error::invalid(format!(
            "{K}: x {} vs y {}",
            x.len(),
            y.len()
        )));
    }
    let mut a = ActArgs {
        x: x.addr(dev, K)?,
        y: y.addr(dev, K)?,
        n: i32_of(x.len(), K)?,
        act: act as i32,
    };
    // SAFETY: both hold n elements.
    unsafe { dev.launch(&ACT, grid_stride(x.len()), &mut a) }
}

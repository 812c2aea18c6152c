//! Launchers of kernels/selftest.cu: the self-tests of the emulator's warp operations,
//! barriers and wrappers (mma, ldmatrix, cp.async, bf16 pairs, f16). The kernel tests check
//! them against host references on emu; on a GPU, the hardware self-test
//! (tools/gpu-check.sh) requires the hardware and the emulator to agree bit for bit.

use super::{
    grid_for, kernels, len_i32, same_len, Buf, DevPtr, DevSlice, Kernel, KernelArgs, KernelDevice,
    Launch,
};
use crate::error::{Error, Result};

type Bf = half::bf16;

kernels! {
    module "selftest";
    WARP_OPS = warp_ops_selftest(WarpOpsArgs { x: DevPtr, out: DevPtr });
    WARP_MASKS = warp_masks_selftest(WarpMasksArgs { x: DevPtr, out: DevPtr });
    BARRIERS = barrier_selftest(BarrierArgs { x: DevPtr, out: DevPtr });
    CP_ASYNC = cp_async_selftest(CpAsyncArgs { src: DevPtr, out: DevPtr, groups: i32, wait: i32, zfill: i32 });
    MMA = mma_selftest(MmaArgs { a: DevPtr, at: DevPtr, bt: DevPtr, bkn: DevPtr, c: DevPtr, d: DevPtr, mode: i32 });
    F16 = f16_roundtrip_selftest(F16Args { x: DevPtr, h: DevPtr, back: DevPtr, n: i32 });
    VECTOR_TYPES = vector_types_selftest(VectorArgs { x: DevPtr, y: DevPtr, back: DevPtr, bits: DevPtr, n4: i32 });
}

/// Outputs per thread of [`warp_ops_selftest`].
pub const WARP_OPS_OUTPUTS: usize = 12;

/// The warp-operation self-test (kernels/selftest.cu): x has one int per thread, in
/// blocks of `block` threads (a multiple of 32, at most 1024); out gets 12 ints per thread.
pub fn warp_ops_selftest<'a>(
    dev: &KernelDevice,
    x: impl Into<DevSlice<'a, i32>>,
    out: impl Into<DevSlice<'a, i32>>,
    block: usize,
) -> Result<()> {
    let x = x.into();
    let out = out.into();
    const K: &str = "warp_ops_selftest";
    if block == 0 || block % 32 != 0 || block > 1024 || x.len() % block != 0 || x.is_empty() {
        return Err(Error::invalid(format!(
            "{K}: blocks of a multiple of 32 threads (≤ 1024) covering x exactly"
        )));
    }
    if out.len() != WARP_OPS_OUTPUTS * x.len() {
        return Err(Error::invalid(format!(
            "{K}: out needs {WARP_OPS_OUTPUTS} ints per thread"
        )));
    }
    let grid = u32::try_from(x.len() / block).map_err(|_| Error::invalid("too many blocks"))?;
    let mut a = WarpOpsArgs {
        x: x.addr(dev, K)?,
        out: out.addr(dev, K)?,
    };
    // SAFETY: thread t reads x[t] and writes out[12t..12t+12] (checked sizes).
    unsafe { dev.launch(&WARP_OPS, Launch::x(grid, block as u32), &mut a) }
}

/// Threads and outputs per thread of [`warp_masks_selftest`].
pub const WARP_MASKS_THREADS: usize = 40;
pub const WARP_MASKS_OUTPUTS: usize = 5;

/// Warp operations on parts of warps (kernels/selftest.cu): one block of 40 threads, x one
/// int each, out 5 ints each.
pub fn warp_masks_selftest<'a>(
    dev: &KernelDevice,
    x: impl Into<DevSlice<'a, i32>>,
    out: impl Into<DevSlice<'a, i32>>,
) -> Result<()> {
    let x = x.into();
    let out = out.into();
    one_block(
        dev,
        &WARP_MASKS,
        x,
        out,
        WARP_MASKS_THREADS,
        WARP_MASKS_OUTPUTS,
        |x, out| WarpMasksArgs { x, out },
    )
}

/// Threads and outputs per thread of [`barrier_selftest`].
pub const BARRIER_THREADS: usize = 256;
pub const BARRIER_OUTPUTS: usize = 4;

/// __syncthreads_count/and/or and named barriers (kernels/selftest.cu): one block of 256
/// threads, x one int each, out 4 ints each.
pub fn barrier_selftest<'a>(
    dev: &KernelDevice,
    x: impl Into<DevSlice<'a, i32>>,
    out: impl Into<DevSlice<'a, i32>>,
) -> Result<()> {
    let x = x.into();
    let out = out.into();
    one_block(
        dev,
        &BARRIERS,
        x,
        out,
        BARRIER_THREADS,
        BARRIER_OUTPUTS,
        |x, out| BarrierArgs { x, out },
    )
}

/// One block of `threads` threads where thread t reads x[t] and writes
/// out[outputs·t .. outputs·(t+1)].
fn one_block<A: KernelArgs>(
    dev: &KernelDevice,
    k: &Kernel<A>,
    x: DevSlice<'_, i32>,
    out: DevSlice<'_, i32>,
    threads: usize,
    outputs: usize,
    args: impl FnOnce(DevPtr, DevPtr) -> A,
) -> Result<()> {
    if x.len() != threads || out.len() != outputs * threads {
        return Err(Error::invalid(format!(
            "{}: x holds {threads} ints, out {outputs} per thread",
            k.name
        )));
    }
    let mut a = args(x.addr(dev, k.name)?, out.addr(dev, k.name)?);
    // SAFETY: thread t reads x[t] and writes out[outputs·t..outputs·(t+1)] (checked sizes).
    unsafe { dev.launch(k, Launch::x(1, threads as u32), &mut a) }
}

/// Floats of the staging area of [`cp_async_selftest`], and of each lane's copy of it.
pub const CP_ASYNC_FLOATS: usize = 512;

/// cp.async in its 16-, 8- and 4-byte and zero-fill forms (kernels/selftest.cu): `groups`
/// (1..=4) groups from src (512 floats, 16-byte aligned), then a wait for all but `wait`
/// (0..=3) of them; out gets each of the 32 lanes' view of the staging area (32 × 512).
pub fn cp_async_selftest<'a>(
    dev: &KernelDevice,
    src: impl Into<DevSlice<'a, f32>>,
    out: impl Into<DevSlice<'a, f32>>,
    groups: usize,
    wait: usize,
    zfill: usize,
) -> Result<()> {
    let src = src.into();
    let out = out.into();
    const K: &str = "cp_async_selftest";
    if !(1..=4).contains(&groups) || wait > 3 || zfill > 16 {
        return Err(Error::invalid(format!(
            "{K}: groups 1..=4, wait 0..=3, zfill 0..=16 bytes"
        )));
    }
    if src.len() != CP_ASYNC_FLOATS || out.len() != 32 * CP_ASYNC_FLOATS {
        return Err(Error::invalid(format!(
            "{K}: src holds 512 floats, out 32 × 512"
        )));
    }
    let mut a = CpAsyncArgs {
        src: src.addr(dev, K)?,
        out: out.addr(dev, K)?,
        groups: groups as i32,
        wait: wait as i32,
        zfill: zfill as i32,
    };
    if a.src.0 % 16 != 0 {
        return Err(Error::invalid(format!("{K}: src must be 16-byte aligned")));
    }
    // SAFETY: one warp reads the 512 floats of src and writes 32 × 512 of out (checked).
    unsafe { dev.launch(&CP_ASYNC, Launch::x(1, 32), &mut a) }
}

/// Operands of [`mma_selftest`]: A [16][16] and its transpose, B^T [8][16] and B [16][8]
/// (bf16), C [16][8] (f32).
pub struct MmaOperands<'a> {
    pub a: &'a Buf<Bf>,
    pub at: &'a Buf<Bf>,
    pub bt: &'a Buf<Bf>,
    pub b: &'a Buf<Bf>,
    pub c: &'a Buf<f32>,
}

/// The tensor-core self-test: d = A·B + C through mma_m16n8k16_bf16 with fragments loaded
/// in `mode` 0..=3 (see kernels/selftest.cu); mode 4 omits the cp.async wait on purpose and
/// runs on emu only.
pub fn mma_selftest<'a>(
    dev: &KernelDevice,
    ops: &MmaOperands<'_>,
    d: impl Into<DevSlice<'a, f32>>,
    mode: i32,
) -> Result<()> {
    let d = d.into();
    const K: &str = "mma_selftest";
    if ![ops.a.len(), ops.at.len()].iter().all(|&n| n == 256)
        || ![ops.bt.len(), ops.b.len(), ops.c.len(), d.len()]
            .iter()
            .all(|&n| n == 128)
    {
        return Err(Error::invalid(format!(
            "{K}: A and A^T need 256 elements, B^T, B, C and D 128"
        )));
    }
    if !(0..=4).contains(&mode) || (mode == 4 && dev.is_cuda()) {
        return Err(Error::invalid(format!(
            "{K}: mode {mode}: 0..=3 (4, the deliberately racy one, on emu only)"
        )));
    }
    let mut a = MmaArgs {
        a: ops.a.addr(dev, K)?,
        at: ops.at.addr(dev, K)?,
        bt: ops.bt.addr(dev, K)?,
        bkn: ops.b.addr(dev, K)?,
        c: ops.c.addr(dev, K)?,
        d: d.addr(dev, K)?,
        mode,
    };
    // cp.async copies 16-byte chunks of A and B^T: they must be 16-byte aligned (device
    // allocations are 256-byte aligned; host vectors are checked).
    if a.a.0 % 16 != 0 || a.bt.0 % 16 != 0 {
        return Err(Error::invalid(format!(
            "{K}: A and B^T must be 16-byte aligned"
        )));
    }
    // SAFETY: one warp reads the five operands and writes d, all of the checked sizes and
    // alignment.
    unsafe { dev.launch(&MMA, Launch::x(1, 32), &mut a) }
}

/// The f16 self-test: h = x rounded to f16, back = h as f32.
pub fn f16_roundtrip_selftest<'a>(
    dev: &KernelDevice,
    x: impl Into<DevSlice<'a, f32>>,
    h: impl Into<DevSlice<'a, half::f16>>,
    back: impl Into<DevSlice<'a, f32>>,
) -> Result<()> {
    let x = x.into();
    let h = h.into();
    let back = back.into();
    const K: &str = "f16_roundtrip_selftest";
    same_len(K, x.len(), h.len())?;
    same_len(K, x.len(), back.len())?;
    let mut a = F16Args {
        x: x.addr(dev, K)?,
        h: h.addr(dev, K)?,
        back: back.addr(dev, K)?,
        n: len_i32(x.len(), K)?,
    };
    // SAFETY: the three buffers hold n elements; the kernel touches indices < n.
    unsafe { dev.launch(&F16, grid_for(x.len()), &mut a) }
}

/// Vector types and bf16 pairs: x holds float4s (4n floats, 16-byte aligned); y gets 2n bf16
/// pairs (4n bf16), back the pairs as floats (4n), bits n ints (see kernels/selftest.cu).
pub fn vector_types_selftest<'a>(
    dev: &KernelDevice,
    x: impl Into<DevSlice<'a, f32>>,
    y: impl Into<DevSlice<'a, Bf>>,
    back: impl Into<DevSlice<'a, f32>>,
    bits: impl Into<DevSlice<'a, i32>>,
) -> Result<()> {
    let x = x.into();
    let y = y.into();
    let back = back.into();
    let bits = bits.into();
    const K: &str = "vector_types_selftest";
    let n4 = x.len() / 4;
    if x.len() % 4 != 0 || y.len() != x.len() || back.len() != x.len() || bits.len() != n4 {
        return Err(Error::invalid(format!(
            "{K}: x of 4n floats, y and back alike, bits n"
        )));
    }
    let mut a = VectorArgs {
        x: x.addr(dev, K)?,
        y: y.addr(dev, K)?,
        back: back.addr(dev, K)?,
        bits: bits.addr(dev, K)?,
        n4: len_i32(n4, K)?,
    };
    if a.x.0 % 16 != 0 || a.back.0 % 16 != 0 {
        return Err(Error::invalid(format!(
            "{K}: x and back must be 16-byte aligned (float4)"
        )));
    }
    // SAFETY: thread i reads float4 i of x and writes pair 2i, 2i+1 of y, float4 i of back
    // and bits[i], for i < n4 (checked sizes and alignment).
    unsafe { dev.launch(&VECTOR_TYPES, grid_for(n4), &mut a) }
}

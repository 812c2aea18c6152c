//! The GPU kernels of kernels/*.cu and their typed launchers, shared by the two kernel
//! devices: `cuda` (the fatbins build.rs embedded, through [`crate::cuda`]) and `emu` (the
//! same .cu sources compiled for the host, run by the SIMT emulator of kernels/emu on host
//! memory). A launcher checks shapes, dtypes (by type) and that every buffer lives on the
//! launching device before any unsafe call, packs the arguments once as a #[repr(C)] struct
//! that mirrors the kernel's parameters, and hands them either to cuLaunchKernel (an array of
//! pointers to the fields) or to the emulator's trampoline for that kernel (a pointer to the
//! struct; see REEL_EMU_EXPORT in kernels/common/reel_cuda.cuh).

use std::ffi::c_void;
use std::sync::Arc;

use crate::cuda::Cuda;
use crate::error::{Error, Result};

include!(concat!(env!("OUT_DIR"), "/kernels.rs"));

/// A CUDA launch geometry.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct Dim3 {
    pub x: u32,
    pub y: u32,
    pub z: u32,
}

impl Dim3 {
    pub const fn x(x: u32) -> Self {
        Dim3 { x, y: 1, z: 1 }
    }
}

/// Where kernels run.
#[derive(Clone)]
pub enum KernelDevice {
    /// The SIMT emulator on host memory.
    Emu,
    /// A GPU.
    Cuda(Arc<Cuda>),
}

impl std::fmt::Debug for KernelDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

impl KernelDevice {
    /// GPU `ordinal` (a clear error without a GPU, libcuda, or kernels in this build).
    pub fn cuda(ordinal: usize) -> Result<Self> {
        Ok(KernelDevice::Cuda(Cuda::open(ordinal)?))
    }

    /// The device kernel tests run on: `REEL_TEST_DEVICE` = `emu` (default) or `cuda`
    /// (`cuda:N` for GPU N).
    pub fn from_test_env() -> Result<Self> {
        let spec = std::env::var("REEL_TEST_DEVICE").unwrap_or_default();
        Self::parse(&spec).map_err(|e| Error::invalid(format!("REEL_TEST_DEVICE={spec}: {e}")))
    }

    /// `emu` (or empty), `cuda`, or `cuda:N`.
    pub fn parse(spec: &str) -> Result<Self> {
        match spec {
            "" | "emu" => Ok(KernelDevice::Emu),
            "cuda" => Self::cuda(0),
            s => match s.strip_prefix("cuda:").and_then(|n| n.parse().ok()) {
                Some(n) => Self::cuda(n),
                None => Err(Error::invalid(format!(
                    "kernel device {s:?}: expected emu, cuda or cuda:N"
                ))),
            },
        }
    }

    pub fn describe(&self) -> String {
        match self {
            KernelDevice::Emu => "emu (SIMT emulator)".into(),
            KernelDevice::Cuda(c) => format!("cuda:{} ({})", c.ordinal(), c.name()),
        }
    }

    pub fn is_cuda(&self) -> bool {
        matches!(self, KernelDevice::Cuda(_))
    }

    /// Runs kernel `name` with arguments `args` (whose fields are the kernel's parameters).
    ///
    /// # Safety
    /// Every address in `args` must belong to this device and cover what the kernel touches
    /// for these sizes and this geometry.
    unsafe fn launch<A: KernelArgs>(
        &self,
        name: &'static str,
        grid: Dim3,
        block: Dim3,
        shared: usize,
        args: &mut A,
    ) -> Result<()> {
        if grid.x == 0 || grid.y == 0 || grid.z == 0 || block.x * block.y * block.z == 0 {
            return Err(Error::invalid(format!("{name}: empty launch geometry")));
        }
        if block.x * block.y * block.z > 1024 {
            return Err(Error::invalid(format!(
                "{name}: more than 1024 threads per block"
            )));
        }
        match self {
            KernelDevice::Emu => {
                let entry = emu_entry(name)
                    .ok_or_else(|| Error::invalid(format!("{name}: no emulator entry point")))?;
                // SAFETY: the caller's contract; the trampoline reads A, which mirrors the
                // kernel's parameters, and runs the grid to completion before returning.
                unsafe { entry(grid, block, shared, args as *const A as *const c_void) };
                Ok(())
            }
            KernelDevice::Cuda(c) => {
                let mut params = args.params();
                // SAFETY: the caller's contract.
                unsafe { c.launch(name, grid, block, shared, &mut params) }
            }
        }
    }
}

/// A kernel's arguments: a #[repr(C)] struct whose fields are the kernel's parameters.
trait KernelArgs {
    /// Pointers to each field, in order, as cuLaunchKernel takes them.
    fn params(&mut self) -> Vec<*mut c_void>;
}

/// Declares an argument struct (buffer addresses as u64, scalars as i32/f32) and its
/// parameter array; the C++ side declares the same fields in the same order.
macro_rules! kernel_args {
    ($($(#[$m:meta])* struct $name:ident { $($field:ident : $ty:ty),* $(,)? })*) => {$(
        $(#[$m])*
        #[repr(C)]
        struct $name { $($field: $ty),* }
        impl KernelArgs for $name {
            fn params(&mut self) -> Vec<*mut c_void> {
                vec![$((&mut self.$field) as *mut $ty as *mut c_void),*]
            }
        }
    )*};
}

type EmuEntry = unsafe extern "C" fn(Dim3, Dim3, usize, *const c_void);

/// The emulator's trampolines (`reel_emu_<kernel>`, made by REEL_EMU_EXPORT).
macro_rules! emu_kernels {
    ($($name:ident),* $(,)?) => {
        mod emu_sym {
            use super::Dim3;
            extern "C" {
                $(
                    #[link_name = concat!("reel_emu_", stringify!($name))]
                    pub fn $name(grid: Dim3, block: Dim3, shared: usize, a: *const std::ffi::c_void);
                )*
            }
        }
        fn emu_entry(name: &str) -> Option<EmuEntry> {
            match name {
                $(stringify!($name) => Some(emu_sym::$name as EmuEntry),)*
                _ => None,
            }
        }
    };
}

emu_kernels!(
    gelu_tanh_f32,
    shift_shared,
    shift_shared_nosync,
    layernorm_modulate_bf16,
    bf16_to_f32,
    f32_to_bf16,
    rms_norm_rope_bf16,
    channel_rms_silu_bf16,
    residual_gate_bf16,
    gelu_tanh_bf16,
    warp_ops_selftest,
    mma_selftest,
    f16_roundtrip_selftest,
);

extern "C" {
    fn reel_emu_set_shuffle(mode: i32, seed: u64);
}

/// Overrides REEL_EMU_SHUFFLE for emulated launches from this thread: None restores the
/// environment's setting, Some(None) turns shuffling off, Some(Some(seed)) on.
pub fn set_emu_shuffle(mode: Option<Option<u64>>) {
    let (m, seed) = match mode {
        None => (-1, 0),
        Some(None) => (0, 0),
        Some(Some(s)) => (1, s),
    };
    // SAFETY: sets two thread-local variables of the emulator.
    unsafe { reel_emu_set_shuffle(m, seed) }
}

/// Element types of kernel buffers.
pub trait Elem: bytemuck::Pod + Send + Sync {}
impl Elem for f32 {}
impl Elem for i32 {}
impl Elem for u32 {}
impl Elem for half::bf16 {}
impl Elem for half::f16 {}

/// A buffer on a kernel device: host memory for emu, device memory for cuda.
pub enum Buf<T: Elem> {
    Host(Vec<T>),
    Cuda {
        ptr: u64,
        len: usize,
        gpu: Arc<Cuda>,
    },
}

impl<T: Elem> Buf<T> {
    /// A buffer on `dev` holding a copy of `data`.
    pub fn upload(dev: &KernelDevice, data: &[T]) -> Result<Self> {
        match dev {
            KernelDevice::Emu => Ok(Buf::Host(data.to_vec())),
            KernelDevice::Cuda(c) => {
                let ptr = c.alloc(std::mem::size_of_val(data))?;
                let buf = Buf::Cuda {
                    ptr,
                    len: data.len(),
                    gpu: c.clone(),
                };
                if !data.is_empty() {
                    c.upload(ptr, data)?;
                }
                Ok(buf)
            }
        }
    }

    /// `n` copies of `v` (a poison value for outputs, or zeros).
    pub fn filled(dev: &KernelDevice, n: usize, v: T) -> Result<Self> {
        Self::upload(dev, &vec![v; n])
    }

    /// The contents, copied to the host.
    pub fn download(&self) -> Result<Vec<T>> {
        match self {
            Buf::Host(v) => Ok(v.clone()),
            Buf::Cuda { ptr, len, gpu } => {
                let mut out = vec![T::zeroed(); *len];
                if *len > 0 {
                    gpu.download(&mut out, *ptr)?;
                }
                Ok(out)
            }
        }
    }

    pub fn len(&self) -> usize {
        match self {
            Buf::Host(v) => v.len(),
            Buf::Cuda { len, .. } => *len,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The address a kernel on `dev` uses, or an error if the buffer lives elsewhere.
    fn addr(&self, dev: &KernelDevice, what: &str) -> Result<u64> {
        match (self, dev) {
            (Buf::Host(v), KernelDevice::Emu) => Ok(v.as_ptr() as u64),
            (Buf::Cuda { ptr, gpu, .. }, KernelDevice::Cuda(c)) if Arc::ptr_eq(gpu, c) => Ok(*ptr),
            _ => Err(Error::invalid(format!(
                "{what}: the buffer is not on {}",
                dev.describe()
            ))),
        }
    }
}

impl<T: Elem> Drop for Buf<T> {
    fn drop(&mut self) {
        if let Buf::Cuda { ptr, gpu, .. } = self {
            gpu.free(*ptr);
        }
    }
}

fn addr_or_null<T: Elem>(b: Option<&Buf<T>>, dev: &KernelDevice, what: &str) -> Result<u64> {
    b.map(|b| b.addr(dev, what)).unwrap_or(Ok(0))
}

fn len_i32(n: usize, what: &str) -> Result<i32> {
    i32::try_from(n).map_err(|_| Error::invalid(format!("{what}: {n} does not fit a kernel's int")))
}

/// Blocks of 256 threads for a grid-stride loop over n elements (at most 1024).
fn grid_for(n: usize) -> u32 {
    (n as u64).div_ceil(256).clamp(1, 1024) as u32
}

fn rows_of(len: usize, d: usize, what: &str) -> Result<(usize, u32)> {
    if d == 0 || len % d != 0 {
        return Err(Error::invalid(format!(
            "{what}: {len} elements are not rows of {d}"
        )));
    }
    let rows = len / d;
    let grid =
        u32::try_from(rows.max(1)).map_err(|_| Error::invalid(format!("{what}: too many rows")))?;
    Ok((rows, grid))
}

fn same_len(what: &str, a: usize, b: usize) -> Result<()> {
    if a != b {
        return Err(Error::invalid(format!(
            "{what}: input has {a} elements, output {b}"
        )));
    }
    Ok(())
}

kernel_args! {
    /// gelu_tanh_f32, kernels/elementwise.cu.
    struct GeluArgs { y: u64, x: u64, n: i32 }
    /// shift_shared(_nosync).
    struct ShiftArgs { y: u64, x: u64, n: i32 }
    /// layernorm_modulate_bf16, kernels/norm.cu.
    struct LayerNormArgs { x: u64, y: u64, mul: u64, add: u64, rows: i32, d: i32, rows_per_group: i32, eps: f32 }
    struct ToF32Args { x: u64, y: u64, n: i32 }
    struct ToBf16Args { x: u64, y: u64, n: i32 }
    struct RmsRopeArgs {
        x: u64, bias: u64, weight: u64, cos_t: u64, sin_t: u64,
        rows: i32, d: i32, head_dim: i32, tokens: i32, eps: f32,
    }
    struct ChannelRmsArgs { x: u64, gamma: u64, rows: i32, c: i32, silu: i32 }
    struct ResidualArgs { x: u64, y: u64, bias: u64, gate: u64, rows: i32, d: i32, rows_per_group: i32 }
    struct GeluBf16Args { x: u64, y: u64, n: i32 }
    /// warp_ops_selftest, kernels/selftest.cu.
    struct WarpOpsArgs { x: u64, out: u64 }
    /// mma_selftest.
    struct MmaArgs { a: u64, at: u64, bt: u64, bkn: u64, c: u64, d: u64, mode: i32 }
    /// f16_roundtrip_selftest.
    struct F16Args { x: u64, h: u64, back: u64, n: i32 }
}

type Bf = half::bf16;

/// y = gelu_tanh(x) elementwise (f32).
pub fn gelu_tanh_f32(dev: &KernelDevice, x: &Buf<f32>, y: &mut Buf<f32>) -> Result<()> {
    same_len("gelu_tanh_f32", x.len(), y.len())?;
    let mut a = GeluArgs {
        y: y.addr(dev, "gelu_tanh_f32 y")?,
        x: x.addr(dev, "gelu_tanh_f32 x")?,
        n: len_i32(x.len(), "gelu_tanh_f32")?,
    };
    // SAFETY: x and y live on dev and hold n elements each (checked); the kernel touches
    // indices < n only.
    unsafe {
        dev.launch(
            "gelu_tanh_f32",
            Dim3::x(grid_for(x.len())),
            Dim3::x(256),
            0,
            &mut a,
        )
    }
}

/// y[t] = x[t − 1] (y[0] = x[0]) through shared memory, one block of x.len() ≤ 1024
/// threads; `sync` false runs the variant that omits its barrier (the test of the
/// emulator's shuffle mode; racy on hardware too).
pub fn shift_shared(dev: &KernelDevice, x: &Buf<f32>, y: &mut Buf<f32>, sync: bool) -> Result<()> {
    if x.len() != y.len() || x.is_empty() || x.len() > 1024 {
        return Err(Error::invalid(
            "shift_shared: 1..=1024 elements, x and y alike",
        ));
    }
    let n = x.len() as u32;
    let mut a = ShiftArgs {
        y: y.addr(dev, "shift_shared y")?,
        x: x.addr(dev, "shift_shared x")?,
        n: n as i32,
    };
    let name = if sync {
        "shift_shared"
    } else {
        "shift_shared_nosync"
    };
    // SAFETY: one block of n threads touches indices < n of x and y.
    unsafe { dev.launch(name, Dim3::x(1), Dim3::x(n), 0, &mut a) }
}

/// LayerNorm of each row of x: [rows, d] (bf16) with the adaLN modulation
/// y = LN(x)·mul[g] + add[g], g = row / rows_per_group; mul, add: [groups, d] f32.
#[allow(clippy::too_many_arguments)]
pub fn layernorm_modulate_bf16(
    dev: &KernelDevice,
    x: &Buf<Bf>,
    y: &mut Buf<Bf>,
    d: usize,
    mul: &Buf<f32>,
    add: &Buf<f32>,
    rows_per_group: usize,
    eps: f32,
) -> Result<()> {
    const K: &str = "layernorm_modulate_bf16";
    if d == 0 || x.len() % d != 0 || y.len() != x.len() || rows_per_group == 0 {
        return Err(Error::invalid(format!(
            "{K}: x {} and y {} must be [rows, {d}], rows_per_group > 0",
            x.len(),
            y.len()
        )));
    }
    let (rows, grid) = rows_of(x.len(), d, K)?;
    let groups = rows.div_ceil(rows_per_group);
    if mul.len() < groups * d || add.len() < groups * d {
        return Err(Error::invalid(format!(
            "{K}: mul/add need [{groups}, {d}] for {rows} rows"
        )));
    }
    let mut a = LayerNormArgs {
        x: x.addr(dev, K)?,
        y: y.addr(dev, K)?,
        mul: mul.addr(dev, K)?,
        add: add.addr(dev, K)?,
        rows: len_i32(rows, "rows")?,
        d: len_i32(d, "d")?,
        rows_per_group: len_i32(rows_per_group.min(rows.max(1)), "rows_per_group")?,
        eps,
    };
    // SAFETY: every buffer covers what the kernel reads or writes (checked above): row r of
    // x and y, group r / rows_per_group of mul and add; one block per row.
    unsafe { dev.launch(K, Dim3::x(grid), Dim3::x(256), 0, &mut a) }
}

/// y = x as f32.
pub fn bf16_to_f32(dev: &KernelDevice, x: &Buf<Bf>, y: &mut Buf<f32>) -> Result<()> {
    same_len("bf16_to_f32", x.len(), y.len())?;
    let mut a = ToF32Args {
        x: x.addr(dev, "bf16_to_f32")?,
        y: y.addr(dev, "bf16_to_f32")?,
        n: len_i32(x.len(), "bf16_to_f32")?,
    };
    // SAFETY: both hold n elements; the kernel touches indices < n.
    unsafe {
        dev.launch(
            "bf16_to_f32",
            Dim3::x(grid_for(x.len())),
            Dim3::x(256),
            0,
            &mut a,
        )
    }
}

/// y = x rounded to bf16 (nearest even).
pub fn f32_to_bf16(dev: &KernelDevice, x: &Buf<f32>, y: &mut Buf<Bf>) -> Result<()> {
    same_len("f32_to_bf16", x.len(), y.len())?;
    let mut a = ToBf16Args {
        x: x.addr(dev, "f32_to_bf16")?,
        y: y.addr(dev, "f32_to_bf16")?,
        n: len_i32(x.len(), "f32_to_bf16")?,
    };
    // SAFETY: both hold n elements; the kernel touches indices < n.
    unsafe {
        dev.launch(
            "f32_to_bf16",
            Dim3::x(grid_for(x.len())),
            Dim3::x(256),
            0,
            &mut a,
        )
    }
}

/// 3D-RoPE tables on a kernel device: cos/sin [tokens, head_dim / 2].
pub struct Rope<'a> {
    pub cos: &'a Buf<f32>,
    pub sin: &'a Buf<f32>,
    pub head_dim: usize,
    pub tokens: usize,
}

/// In place on x: [rows, d] bf16: (x + bias) RMS-normalised across the whole row, times
/// `weight`, then each head's pairs rotated by the row's token angles (token = row mod
/// rope.tokens). The bf16 twin of [`crate::cpu::rms_norm_rope`].
pub fn rms_norm_rope_bf16(
    dev: &KernelDevice,
    x: &mut Buf<Bf>,
    d: usize,
    bias: Option<&Buf<f32>>,
    weight: &Buf<f32>,
    eps: f32,
    rope: Option<Rope<'_>>,
) -> Result<()> {
    const K: &str = "rms_norm_rope_bf16";
    let (rows, grid) = rows_of(x.len(), d, K)?;
    if weight.len() != d || bias.is_some_and(|b| b.len() != d) || d % 2 != 0 {
        return Err(Error::invalid(format!(
            "{K}: weight/bias must have {d} (even) entries"
        )));
    }
    let (cos_t, sin_t, hd, tokens) = match &rope {
        Some(t) => {
            if t.head_dim == 0
                || t.tokens == 0
                || d % t.head_dim != 0
                || t.head_dim % 2 != 0
                || t.cos.len() != t.tokens * t.head_dim / 2
                || t.sin.len() != t.cos.len()
            {
                return Err(Error::invalid(format!(
                    "{K}: rope tables do not fit the rows"
                )));
            }
            (
                t.cos.addr(dev, K)?,
                t.sin.addr(dev, K)?,
                t.head_dim,
                t.tokens,
            )
        }
        None => (0, 0, d, 1),
    };
    let mut a = RmsRopeArgs {
        x: x.addr(dev, K)?,
        bias: addr_or_null(bias, dev, K)?,
        weight: weight.addr(dev, K)?,
        cos_t,
        sin_t,
        rows: len_i32(rows, "rows")?,
        d: len_i32(d, "d")?,
        head_dim: len_i32(hd, "head_dim")?,
        tokens: len_i32(tokens, "tokens")?,
        eps,
    };
    // SAFETY: x holds rows·d elements, weight/bias d, the tables tokens·head_dim/2 (all
    // checked above); one block per row touches that row only.
    unsafe { dev.launch(K, Dim3::x(grid), Dim3::x(256), 0, &mut a) }
}

/// In place on channel-last x: [rows, c] bf16: x / max(‖x‖, 1e-12)·√c·γ, then SiLU when
/// `silu`. The bf16 twin of [`crate::cpu::channel_rms_norm`].
pub fn channel_rms_silu_bf16(
    dev: &KernelDevice,
    x: &mut Buf<Bf>,
    c: usize,
    gamma: &Buf<f32>,
    silu: bool,
) -> Result<()> {
    const K: &str = "channel_rms_silu_bf16";
    let (rows, grid) = rows_of(x.len(), c, K)?;
    if gamma.len() != c {
        return Err(Error::invalid(format!("{K}: gamma must have {c} entries")));
    }
    let mut a = ChannelRmsArgs {
        x: x.addr(dev, K)?,
        gamma: gamma.addr(dev, K)?,
        rows: len_i32(rows, "rows")?,
        c: len_i32(c, "c")?,
        silu: silu as i32,
    };
    // SAFETY: x holds rows·c elements and gamma c (checked); one block per row.
    unsafe { dev.launch(K, Dim3::x(grid), Dim3::x(256), 0, &mut a) }
}

/// x += (y + bias)·gate[row / rows_per_group] on [rows, d] bf16. The bf16 twin of
/// [`crate::cpu::residual_add`].
pub fn residual_gate_bf16(
    dev: &KernelDevice,
    x: &mut Buf<Bf>,
    y: &Buf<Bf>,
    d: usize,
    bias: Option<&Buf<f32>>,
    gate: Option<&Buf<f32>>,
    rows_per_group: usize,
) -> Result<()> {
    const K: &str = "residual_gate_bf16";
    let (rows, _) = rows_of(x.len(), d, K)?;
    let groups = rows.div_ceil(rows_per_group.max(1));
    if y.len() != x.len()
        || bias.is_some_and(|b| b.len() != d)
        || gate.is_some_and(|g| g.len() < groups * d)
    {
        return Err(Error::invalid(format!(
            "{K}: y like x, bias [d], gate [groups, d]"
        )));
    }
    let mut a = ResidualArgs {
        x: x.addr(dev, K)?,
        y: y.addr(dev, K)?,
        bias: addr_or_null(bias, dev, K)?,
        gate: addr_or_null(gate, dev, K)?,
        rows: len_i32(rows, "rows")?,
        d: len_i32(d, "d")?,
        rows_per_group: len_i32(rows_per_group.clamp(1, rows.max(1)), "rows_per_group")?,
    };
    // SAFETY: x, y hold rows·d elements, bias d, gate groups·d (checked).
    unsafe { dev.launch(K, Dim3::x(grid_for(x.len())), Dim3::x(256), 0, &mut a) }
}

/// y = gelu_tanh(x) on bf16.
pub fn gelu_tanh_bf16(dev: &KernelDevice, x: &Buf<Bf>, y: &mut Buf<Bf>) -> Result<()> {
    same_len("gelu_tanh_bf16", x.len(), y.len())?;
    let mut a = GeluBf16Args {
        x: x.addr(dev, "gelu_tanh_bf16")?,
        y: y.addr(dev, "gelu_tanh_bf16")?,
        n: len_i32(x.len(), "gelu_tanh_bf16")?,
    };
    // SAFETY: both hold n elements.
    unsafe {
        dev.launch(
            "gelu_tanh_bf16",
            Dim3::x(grid_for(x.len())),
            Dim3::x(256),
            0,
            &mut a,
        )
    }
}

/// The warp-operation self-test (kernels/selftest.cu): x has one int per thread, in
/// blocks of `block` threads (a multiple of 32, at most 1024); out gets 8 ints per thread.
pub fn warp_ops_selftest(
    dev: &KernelDevice,
    x: &Buf<i32>,
    out: &mut Buf<i32>,
    block: usize,
) -> Result<()> {
    const K: &str = "warp_ops_selftest";
    if block == 0 || block % 32 != 0 || block > 1024 || x.len() % block != 0 || x.is_empty() {
        return Err(Error::invalid(format!(
            "{K}: blocks of a multiple of 32 threads (≤ 1024) covering x exactly"
        )));
    }
    if out.len() != 8 * x.len() {
        return Err(Error::invalid(format!("{K}: out needs 8 ints per thread")));
    }
    let grid = u32::try_from(x.len() / block).map_err(|_| Error::invalid("too many blocks"))?;
    let mut a = WarpOpsArgs {
        x: x.addr(dev, K)?,
        out: out.addr(dev, K)?,
    };
    // SAFETY: thread t reads x[t] and writes out[8t..8t+8] (checked sizes).
    unsafe { dev.launch(K, Dim3::x(grid), Dim3::x(block as u32), 0, &mut a) }
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
pub fn mma_selftest(
    dev: &KernelDevice,
    ops: &MmaOperands<'_>,
    d: &mut Buf<f32>,
    mode: i32,
) -> Result<()> {
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
    if a.a % 16 != 0 || a.bt % 16 != 0 {
        return Err(Error::invalid(format!(
            "{K}: A and B^T must be 16-byte aligned"
        )));
    }
    // SAFETY: one warp reads the five operands and writes d, all of the checked sizes and
    // alignment.
    unsafe { dev.launch(K, Dim3::x(1), Dim3::x(32), 0, &mut a) }
}

/// The f16 self-test: h = x rounded to f16, back = h as f32.
pub fn f16_roundtrip_selftest(
    dev: &KernelDevice,
    x: &Buf<f32>,
    h: &mut Buf<half::f16>,
    back: &mut Buf<f32>,
) -> Result<()> {
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
    unsafe { dev.launch(K, Dim3::x(grid_for(x.len())), Dim3::x(256), 0, &mut a) }
}

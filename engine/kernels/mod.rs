//! The GPU kernels of kernels/*.cu and their typed launchers, shared by the two kernel
//! devices: `cuda` (the fatbins build.rs embedded, through [`crate::cuda`]) and `emu` (the
//! same .cu sources compiled for the host, run by the SIMT emulator of kernels/emu on host
//! memory).
//!
//! Launchers are split by kernel family, one file per `kernels/<family>*.cu`: [`attention`], [`norm`],
//! [`elementwise`], [`selftest`], [`emu_checks`], [`probe`]. Each family declares its
//! kernels with [`kernels!`]: a #[repr(C)] argument struct mirroring the kernel's parameters
//! (checked against the C++ signature by a test: [`param_layouts`]) and a typed handle, so a
//! launcher cannot pass another kernel's arguments or misspell a name. A launcher checks
//! shapes, dtypes (by type) and that every buffer lives on the launching device before its
//! one unsafe call; [`KernelDevice::launch`] checks the geometry against the hardware's
//! per-axis limits and the dynamic shared memory against the kernel's opt-in and the
//! architecture's maximum, then hands an array of pointers to the fields (as cuLaunchKernel
//! takes them) to the GPU or to the emulator's entry point for that kernel (made by
//! REEL_EMU_EXPORT in kernels/common/reel_cuda.cuh).

use std::ffi::{c_char, c_void, CStr};
use std::marker::PhantomData;
use std::sync::{Arc, OnceLock};

use crate::cuda::Cuda;
use crate::error::{Error, Result};

pub mod attention;
mod attention_sm90;
pub mod conv3d;
pub mod dit;
pub mod elementwise;
pub mod emu_checks;
pub mod gemm;
pub mod hopper;
mod mem;
pub mod norm;
pub mod probe;
pub mod selftest;
pub mod t5;

pub use self::gemm::{gemm, Act};
pub use attention::{
    flash_attention, flash_attention_biased, flash_attention_with, AttnBias, AttnView, FlashKernel,
    FlashShape,
};
pub use elementwise::*;
pub(crate) use mem::MEASURE_KEY;
pub use mem::{opt, Buf, DevSlice, DeviceMem, Elem, Half, MemTracker, TrackGuard, ALIGN};
pub use norm::*;
pub use selftest::*;
pub use t5::{t5_add_norm, t5_gated_gelu, NormOut};

/// A kernels/*.cu file built by nvcc (build.rs).
pub struct Fatbin {
    /// The file stem: `norm` for kernels/norm.cu, `probe.sm90` for kernels/probe.sm90.cu.
    pub stem: &'static str,
    pub image: &'static [u8],
    /// What it holds: `sm_90a sm_80 compute_80`, or `sm_90a` for a `.sm90.cu` file.
    pub targets: &'static str,
    /// ptxas's -v report (registers, spills, shared memory per kernel and target).
    pub ptxas_report: &'static str,
}

// FATBINS: &[Fatbin] (empty without nvcc); EXPORTED: &[(kernel, file stem)] for every
// REEL_EMU_EXPORT in kernels/; NVCC_VERSION: what `nvcc --version` said ("" without nvcc).
include!(concat!(env!("OUT_DIR"), "/kernels.rs"));

/// A CUDA launch geometry.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dim3 {
    pub x: u32,
    pub y: u32,
    pub z: u32,
}

impl Dim3 {
    pub const fn x(x: u32) -> Self {
        Dim3 { x, y: 1, z: 1 }
    }

    pub const fn new(x: u32, y: u32, z: u32) -> Self {
        Dim3 { x, y, z }
    }
}

/// A launch: grid, block and dynamic shared memory in bytes.
#[derive(Debug, Clone, Copy)]
pub struct Launch {
    pub grid: Dim3,
    pub block: Dim3,
    pub shared: u32,
}

impl Launch {
    /// `grid` blocks of `block` threads along x, no dynamic shared memory.
    pub const fn x(grid: u32, block: u32) -> Self {
        Launch {
            grid: Dim3::x(grid),
            block: Dim3::x(block),
            shared: 0,
        }
    }
}

/// Static shared memory every architecture allows, and the dynamic shared memory a kernel
/// may use without an opt-in (static + dynamic ≤ 48 KiB).
pub const SHARED_DEFAULT: u32 = 48 * 1024;

/// What the launch checks need to know of an architecture.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Arch {
    /// Compute capability (9, 0) for an H100.
    pub major: u32,
    pub minor: u32,
    /// Shared memory a block may have with an opt-in (cudaDevAttrMaxSharedMemoryPerBlockOptin).
    pub max_shared_per_block: u32,
}

impl Arch {
    /// sm_80 (A100): 163 KiB of shared memory per block.
    pub const SM80: Arch = Arch {
        major: 8,
        minor: 0,
        max_shared_per_block: 163 * 1024,
    };
    /// sm_86 / sm_89: 99 KiB.
    pub const SM86: Arch = Arch {
        major: 8,
        minor: 6,
        max_shared_per_block: 99 * 1024,
    };
    /// sm_90 (H100, H200): 227 KiB.
    pub const SM90: Arch = Arch {
        major: 9,
        minor: 0,
        max_shared_per_block: 227 * 1024,
    };

    /// `sm_80`, `80`, `sm_86`, `sm_89`, `sm_90`, `sm_90a`.
    pub fn parse(s: &str) -> Option<Arch> {
        match s.trim().trim_start_matches("sm_").trim_end_matches('a') {
            "80" => Some(Arch::SM80),
            "86" => Some(Arch::SM86),
            "89" => Some(Arch {
                minor: 9,
                ..Arch::SM86
            }),
            "90" => Some(Arch::SM90),
            _ => None,
        }
    }
}

impl std::fmt::Display for Arch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "sm_{}{}", self.major, self.minor)
    }
}

/// The architecture the emulator enforces the limits of: `REEL_EMU_ARCH` (sm_80, sm_86,
/// sm_89, sm_90), sm_90 by default (the project's GPUs).
pub fn emu_arch() -> Result<Arch> {
    static ARCH: OnceLock<std::result::Result<Arch, String>> = OnceLock::new();
    ARCH.get_or_init(|| match std::env::var("REEL_EMU_ARCH") {
        Err(_) => Ok(Arch::SM90),
        Ok(s) if s.is_empty() => Ok(Arch::SM90),
        Ok(s) => Arch::parse(&s)
            .ok_or_else(|| format!("REEL_EMU_ARCH={s}: expected sm_80, sm_86, sm_89 or sm_90")),
    })
    .clone()
    .map_err(Error::invalid)
}

/// Where kernels run.
#[derive(Clone)]
pub enum KernelDevice {
    /// The SIMT emulator on host memory.
    Emu,
    /// A GPU.
    Cuda(Arc<Cuda>),
    /// The GPU runtime's planning pass: launches are checked and recorded, nothing runs.
    Measure(Arc<Recorder>),
}

/// What a measuring pass saw: each launch's kernel and the buffers its pointer parameters
/// point into (addresses of the [`Recorder::address`] encoding).
pub struct Recorder {
    arch: Arch,
    launches: std::sync::Mutex<Vec<(&'static str, Vec<u32>)>>,
}

impl Recorder {
    /// A recorder checking launches against `arch`'s limits.
    pub fn new(arch: Arch) -> Self {
        Recorder {
            arch,
            launches: std::sync::Mutex::new(Vec::new()),
        }
    }

    /// The measuring-mode address of byte `offset` of buffer `id`.
    pub fn address(id: u32, offset: usize) -> DevPtr {
        DevPtr(((id as u64 + 1) << mem::MEASURE_SHIFT) | offset as u64)
    }

    /// The buffer a measuring-mode address points into.
    pub fn buffer_of(p: DevPtr) -> Option<u32> {
        let id = p.0 >> mem::MEASURE_SHIFT;
        (id > 0).then(|| (id - 1) as u32)
    }

    /// A slice of buffer `id` in measuring mode.
    pub fn slice<'a, T>(id: u32, offset_elems: usize, len: usize) -> DevSlice<'a, T> {
        // SAFETY: a measuring-mode slice is never dereferenced: launches on a Measure device
        // only decode its address.
        unsafe {
            DevSlice::from_raw(
                Self::address(id, offset_elems * std::mem::size_of::<T>()),
                len,
                mem::MEASURE_KEY,
            )
        }
    }

    /// Records a use of `buffers` by an operation that is not a kernel launch (a cuBLASLt
    /// GEMM, a copy).
    pub fn record(&self, what: &'static str, buffers: Vec<u32>) {
        self.launches
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((what, buffers));
    }

    /// Launches (and other uses) recorded so far.
    pub fn len(&self) -> usize {
        self.launches
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The architecture whose limits launches are checked against.
    pub fn arch(&self) -> Arch {
        self.arch
    }

    /// The launches so far, in order.
    pub fn take(&self) -> Vec<(&'static str, Vec<u32>)> {
        std::mem::take(&mut *self.launches.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

impl std::fmt::Debug for KernelDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

impl KernelDevice {
    /// GPU `ordinal` (a clear error without a GPU, libcuda, or kernels in this build).
    pub fn cuda(ordinal: usize) -> Result<Self> {
        if FATBINS.is_empty() {
            return Err(Error::invalid(
                "--device cuda: this reel was built without nvcc, so it has no GPU kernels; run \
                 tools/install-cuda-toolchain.sh and rebuild",
            ));
        }
        let modules: Vec<(&'static str, &'static [u8])> =
            FATBINS.iter().map(|f| (f.stem, f.image)).collect();
        Ok(KernelDevice::Cuda(
            Cuda::open(ordinal, &modules).map_err(|e| Error::Device(e.to_string()))?,
        ))
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

    /// Identifies the device a [`DevSlice`] belongs to.
    pub fn key(&self) -> usize {
        match self {
            KernelDevice::Emu => mem::EMU_KEY,
            KernelDevice::Cuda(c) => Arc::as_ptr(c) as usize,
            KernelDevice::Measure(_) => mem::MEASURE_KEY,
        }
    }

    pub fn describe(&self) -> String {
        match self {
            KernelDevice::Measure(r) => format!("measuring pass ({} limits)", r.arch),
            KernelDevice::Emu => match emu_arch() {
                Ok(a) => format!("emu (SIMT emulator, {a} limits)"),
                Err(_) => "emu (SIMT emulator)".into(),
            },
            KernelDevice::Cuda(c) => format!(
                "cuda:{} ({}, sm_{}{})",
                c.ordinal(),
                c.name(),
                c.compute_capability().0,
                c.compute_capability().1
            ),
        }
    }

    pub fn is_cuda(&self) -> bool {
        matches!(self, KernelDevice::Cuda(_))
    }

    /// The architecture whose limits launches are checked against.
    pub fn arch(&self) -> Result<Arch> {
        match self {
            KernelDevice::Emu => emu_arch(),
            KernelDevice::Measure(r) => Ok(r.arch),
            KernelDevice::Cuda(c) => {
                let (major, minor) = c.compute_capability();
                Ok(Arch {
                    major,
                    minor,
                    max_shared_per_block: c.max_shared_per_block_optin(),
                })
            }
        }
    }

    /// Runs kernel `k` with arguments `args` (whose fields are the kernel's parameters),
    /// counted as norm/elementwise work by `reel bench --profile`.
    ///
    /// # Safety
    /// Every address in `args` must belong to this device and cover what the kernel touches
    /// for these sizes and this geometry.
    pub(crate) unsafe fn launch<A: KernelArgs>(
        &self,
        k: &Kernel<A>,
        l: Launch,
        args: &mut A,
    ) -> Result<()> {
        // SAFETY: the caller's contract.
        unsafe { self.launch_counted(k, l, args, crate::profile::Op::Elementwise, 0) }
    }

    /// [`launch`](Self::launch) counted under `op` with `flops` for `reel bench --profile`:
    /// timed on the host on emu, by CUDA events on cuda.
    ///
    /// # Safety
    /// As for [`launch`](Self::launch).
    pub(crate) unsafe fn launch_counted<A: KernelArgs>(
        &self,
        k: &Kernel<A>,
        l: Launch,
        args: &mut A,
        op: crate::profile::Op,
        flops: u64,
    ) -> Result<()> {
        check_geometry(k.name, l.grid, l.block)?;
        check_shared(k.name, l.shared, k.shared_opt_in, self.arch()?)?;
        let profiling = crate::profile::enabled();
        let mut params = args.params();
        match self {
            KernelDevice::Measure(r) => {
                // Nothing runs: record which buffers the pointer parameters point into.
                let buffers = A::layout()
                    .iter()
                    .zip(&params)
                    .filter_map(|(p, &q)| match p.kind as u8 {
                        // SAFETY: a pointer parameter is a DevPtr field of `args`, alive here.
                        b'p' => Recorder::buffer_of(unsafe { *(q as *const DevPtr) }),
                        // A tensor map (reel's encoding off cuda) names its tensor's address.
                        // SAFETY: a struct parameter of 128 bytes is a TensorMap field.
                        b's' if p.size == 128 => {
                            hopper::map_address(unsafe { &*(q as *const hopper::TensorMap) })
                                .and_then(Recorder::buffer_of)
                        }
                        _ => None,
                    })
                    .collect();
                r.record(k.name, buffers);
                Ok(())
            }
            KernelDevice::Emu => {
                let cfg = EmuLaunch {
                    grid: l.grid,
                    block: l.block,
                    dynamic_shared: l.shared,
                    shared_opt_in: k.shared_opt_in,
                    max_shared_per_block: emu_arch()?.max_shared_per_block,
                };
                let start = std::time::Instant::now();
                // SAFETY: the caller's contract; the entry point reads the parameters through
                // `params` (pointers into `args`, alive for the call), whose types the layout
                // test checks against the kernel's, and runs the grid to completion.
                let rc = unsafe { (k.emu)(&cfg, params.as_mut_ptr()) };
                if rc != 0 {
                    return Err(Error::Device(emu_last_error()));
                }
                if profiling {
                    crate::profile::record(op, start.elapsed().as_secs_f64(), flops);
                }
                Ok(())
            }
            KernelDevice::Cuda(c) => {
                crate::cuda::nvtx_push(k.name);
                let grid = (l.grid.x, l.grid.y, l.grid.z);
                let block = (l.block.x, l.block.y, l.block.z);
                // SAFETY: the caller's contract.
                let mut go = || unsafe {
                    c.launch(
                        k.module,
                        k.name,
                        grid,
                        block,
                        l.shared,
                        k.shared_opt_in,
                        &mut params,
                    )
                };
                let r = if profiling {
                    c.timed(go)
                        .map(|((), secs)| crate::profile::record(op, secs, flops))
                } else {
                    go()
                };
                crate::cuda::nvtx_pop();
                r.map_err(|e| Error::Device(e.to_string()))
            }
        }
    }
}

/// The hardware's launch limits (every architecture since sm_30): block ≤ (1024, 1024, 64)
/// and ≤ 1024 threads, grid ≤ (2³¹ − 1, 65535, 65535), nothing empty.
pub fn check_geometry(name: &str, grid: Dim3, block: Dim3) -> Result<()> {
    let bad = |what: String| Err(Error::invalid(format!("{name}: {what}")));
    if [grid.x, grid.y, grid.z, block.x, block.y, block.z].contains(&0) {
        return bad(format!(
            "empty launch geometry: grid {grid:?}, block {block:?}"
        ));
    }
    if block.x > 1024 || block.y > 1024 || block.z > 64 {
        return bad(format!(
            "block ({}, {}, {}) exceeds the per-axis limits (1024, 1024, 64)",
            block.x, block.y, block.z
        ));
    }
    let threads = block.x as u64 * block.y as u64 * block.z as u64;
    if threads > 1024 {
        return bad(format!("a block of {threads} threads exceeds 1024"));
    }
    if grid.x > i32::MAX as u32 || grid.y > 65535 || grid.z > 65535 {
        return bad(format!(
            "grid ({}, {}, {}) exceeds the limits (2^31 - 1, 65535, 65535)",
            grid.x, grid.y, grid.z
        ));
    }
    Ok(())
}

/// Dynamic shared memory: within the kernel's opt-in (or 48 KiB without one), and the
/// opt-in within what the architecture allows a block.
pub fn check_shared(name: &str, shared: u32, opt_in: u32, arch: Arch) -> Result<()> {
    if opt_in > arch.max_shared_per_block {
        return Err(Error::invalid(format!(
            "{name}: its dynamic shared memory opt-in of {opt_in} bytes exceeds {arch}'s {} bytes per block",
            arch.max_shared_per_block
        )));
    }
    let limit = if opt_in > 0 { opt_in } else { SHARED_DEFAULT };
    if shared > limit {
        return Err(Error::invalid(format!(
            "{name}: {shared} bytes of dynamic shared memory exceed the kernel's {} of {limit} bytes",
            if opt_in > 0 {
                "opt-in"
            } else {
                "limit without an opt-in"
            }
        )));
    }
    Ok(())
}

/// A device address as a kernel parameter (a pointer in the C++ signature).
#[repr(transparent)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DevPtr(pub u64);

impl DevPtr {
    pub const NULL: DevPtr = DevPtr(0);

    /// The address `bytes` further on.
    pub fn offset(self, bytes: usize) -> DevPtr {
        DevPtr(self.0 + bytes as u64)
    }
}

/// A kernel parameter type, with the kind the C++ side reports for it.
pub trait Param {
    /// 'p' pointer, 'i' signed integer, 'u' unsigned integer, 'f' floating point.
    const KIND: u8;
}
impl Param for DevPtr {
    const KIND: u8 = b'p';
}
impl Param for i32 {
    const KIND: u8 = b'i';
}
impl Param for u32 {
    const KIND: u8 = b'u';
}
impl Param for i64 {
    const KIND: u8 = b'i';
}
impl Param for f32 {
    const KIND: u8 = b'f';
}
impl Param for u64 {
    const KIND: u8 = b'u';
}

/// One parameter's place in the parameter buffer (the ABI of a C struct), as the C++ side
/// exports it for each kernel (reel_emu::ParamInfo).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ParamInfo {
    pub size: u32,
    pub align: u32,
    pub offset: u32,
    pub kind: u32,
}

/// A kernel's arguments: a #[repr(C)] struct whose fields are the kernel's parameters.
pub(crate) trait KernelArgs {
    /// Pointers to each field, in order, as cuLaunchKernel takes them.
    fn params(&mut self) -> Vec<*mut c_void>;
    /// Each field's size, alignment, offset and kind.
    fn layout() -> Vec<ParamInfo>;
}

/// reel_emu::LaunchConfig (kernels/emu/emu.h).
#[repr(C)]
pub(crate) struct EmuLaunch {
    grid: Dim3,
    block: Dim3,
    dynamic_shared: u32,
    shared_opt_in: u32,
    max_shared_per_block: u32,
}

pub(crate) type EmuEntry = unsafe extern "C" fn(*const EmuLaunch, *mut *mut c_void) -> i32;
pub(crate) type EmuParams = unsafe extern "C" fn(*mut ParamInfo, i32) -> i32;

/// A typed kernel handle: its name, the kernels/<module>.cu it lives in, its dynamic
/// shared memory opt-in (bytes; 0 = none, which allows 48 KiB less static shared memory)
/// and its emulator entry points. Made by [`kernels!`].
pub struct Kernel<A> {
    pub name: &'static str,
    pub module: &'static str,
    pub shared_opt_in: u32,
    pub(crate) emu: EmuEntry,
    pub(crate) emu_params: EmuParams,
    pub(crate) _args: PhantomData<fn(A)>,
}

impl<A> Kernel<A> {
    /// The same kernel with another dynamic shared memory opt-in (the cuda device sets the
    /// function attribute before a launch that needs it).
    pub const fn with_opt_in(&self, bytes: u32) -> Kernel<A> {
        Kernel {
            name: self.name,
            module: self.module,
            shared_opt_in: bytes,
            emu: self.emu,
            emu_params: self.emu_params,
            _args: PhantomData,
        }
    }
}

/// A kernel without its argument type, for the layout check.
pub(crate) trait AnyKernel: Sync {
    fn name(&self) -> &'static str;
    fn module(&self) -> &'static str;
    fn rust_layout(&self) -> Vec<ParamInfo>;
    fn cpp_layout(&self) -> Vec<ParamInfo>;
}

impl<A: KernelArgs> AnyKernel for Kernel<A> {
    fn name(&self) -> &'static str {
        self.name
    }
    fn module(&self) -> &'static str {
        self.module
    }
    fn rust_layout(&self) -> Vec<ParamInfo> {
        A::layout()
    }
    fn cpp_layout(&self) -> Vec<ParamInfo> {
        let mut out = vec![ParamInfo::default(); 64];
        // SAFETY: the entry point writes at most `cap` entries and returns the count.
        let n = unsafe { (self.emu_params)(out.as_mut_ptr(), out.len() as i32) };
        out.truncate(n.clamp(0, 64) as usize);
        out
    }
}

/// Declares a family's kernels: for each, an argument struct (buffer addresses as
/// [`DevPtr`], scalars as i32/i64/u32/f32, in the order of the C++ parameters), a typed
/// handle const, and the emulator entry points; plus `ALL`, the family's handles. Kernels
/// that share a signature share a struct declared once with `@args`.
///
/// ```ignore
/// kernels! {
///     module "norm";
///     @args Shared { x: DevPtr, n: i32 }
///     /// doc
///     LAYERNORM = layernorm_modulate_bf16(LayerNormArgs { x: DevPtr, rows: i32 });
///     BIG = big_tile_kernel [opt_in = 96 * 1024] (Shared);
/// }
/// ```
macro_rules! kernels {
    (@args $args:ident { $($field:ident : $ty:ty),* $(,)? }) => {
        #[repr(C)]
        pub(crate) struct $args { $(pub(crate) $field: $ty),* }
        impl $crate::kernels::KernelArgs for $args {
            fn params(&mut self) -> Vec<*mut std::ffi::c_void> {
                vec![$((&mut self.$field) as *mut $ty as *mut std::ffi::c_void),*]
            }
            fn layout() -> Vec<$crate::kernels::ParamInfo> {
                vec![$($crate::kernels::ParamInfo {
                    size: std::mem::size_of::<$ty>() as u32,
                    align: std::mem::align_of::<$ty>() as u32,
                    offset: std::mem::offset_of!($args, $field) as u32,
                    kind: <$ty as $crate::kernels::Param>::KIND as u32,
                }),*]
            }
        }
    };
    (module $module:literal;
        $( @args $sname:ident { $($sfield:ident : $sty:ty),* $(,)? } )*
        $(
            $(#[$m:meta])*
            $handle:ident = $name:ident $([opt_in = $opt:expr])?
                ($args:ident $({ $($field:ident : $ty:ty),* $(,)? })?);
        )*
    ) => {
        $( $crate::kernels::kernels!(@args $sname { $($sfield : $sty),* }); )*
        $( $( $crate::kernels::kernels!(@args $args { $($field : $ty),* }); )? )*
        mod emu_sym {
            $(
                #[allow(non_snake_case)]
                pub mod $name {
                    extern "C" {
                        #[link_name = concat!("reel_emu_", stringify!($name))]
                        pub fn launch(
                            cfg: *const $crate::kernels::EmuLaunch,
                            params: *mut *mut std::ffi::c_void,
                        ) -> i32;
                        #[link_name = concat!("reel_emu_params_", stringify!($name))]
                        pub fn params(out: *mut $crate::kernels::ParamInfo, cap: i32) -> i32;
                    }
                }
            )*
        }
        $(
            $(#[$m])*
            pub(crate) const $handle: $crate::kernels::Kernel<$args> = $crate::kernels::Kernel {
                name: stringify!($name),
                module: $module,
                shared_opt_in: 0 $(+ $opt)?,
                emu: emu_sym::$name::launch,
                emu_params: emu_sym::$name::params,
                _args: std::marker::PhantomData,
            };
        )*
        /// Every kernel of this family.
        pub(crate) const ALL: &[&dyn $crate::kernels::AnyKernel] = &[$(&$handle),*];
    };
}
pub(crate) use kernels;

/// A kernel that kernels/*.cu exports (REEL_EMU_EXPORT), and what its launcher declares.
#[derive(Debug)]
pub struct KernelLayout {
    pub name: &'static str,
    /// The file stem it is defined in.
    pub file: &'static str,
    /// The module its launcher names (None: no launcher declares the kernel).
    pub launcher_module: Option<&'static str>,
    /// The parameters of the launcher's argument struct.
    pub rust: Vec<ParamInfo>,
    /// The parameters of the C++ signature.
    pub cpp: Vec<ParamInfo>,
}

/// Every exported kernel with its launcher's declaration; a test requires a launcher for
/// each, in the right module, with the C++ signature's parameter layout.
pub fn param_layouts() -> Vec<KernelLayout> {
    let all: Vec<&dyn AnyKernel> = [
        attention::ALL,
        attention_sm90::ALL,
        conv3d::ALL,
        dit::ALL,
        elementwise::ALL,
        self::gemm::ALL,
        norm::ALL,
        selftest::ALL,
        emu_checks::ALL,
        t5::ALL,
        probe::ALL,
        hopper::ALL,
    ]
    .concat();
    EXPORTED
        .iter()
        .map(|&(name, file)| {
            let k = all.iter().find(|k| k.name() == name);
            KernelLayout {
                name,
                file,
                launcher_module: k.map(|k| k.module()),
                rust: k.map(|k| k.rust_layout()).unwrap_or_default(),
                cpp: k.map(|k| k.cpp_layout()).unwrap_or_default(),
            }
        })
        .collect()
}

extern "C" {
    fn reel_emu_set_shuffle(mode: i32, seed: u64);
    fn reel_emu_set_switch(mode: i32);
    fn reel_emu_last_error() -> *const c_char;
}

fn emu_last_error() -> String {
    // SAFETY: a NUL-terminated string owned by the emulator's thread state, valid until the
    // next launch on this thread; copied at once.
    let p = unsafe { reel_emu_last_error() };
    if p.is_null() {
        return "reel emulator: launch failed".into();
    }
    // SAFETY: as above.
    unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
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

/// The emulator's context switch, for emulated launches from this thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EmuSwitch {
    /// REEL_EMU_SWITCH decides (`ucontext`, or reel's own by default).
    Env,
    /// reel's own (x86-64; elsewhere ucontext).
    Own,
    /// swapcontext, which saves the signal mask with a system call per switch (kept for the
    /// comparison in bench/emu.rs).
    Ucontext,
}

pub fn set_emu_switch(s: EmuSwitch) {
    let m = match s {
        EmuSwitch::Env => -1,
        EmuSwitch::Own => 0,
        EmuSwitch::Ucontext => 1,
    };
    // SAFETY: sets a thread-local variable of the emulator.
    unsafe { reel_emu_set_switch(m) }
}

pub(crate) fn addr_or_null<T>(
    b: Option<DevSlice<'_, T>>,
    dev: &KernelDevice,
    what: &str,
) -> Result<DevPtr> {
    b.map(|b| b.addr(dev, what)).unwrap_or(Ok(DevPtr::NULL))
}

pub(crate) fn len_i32(n: usize, what: &str) -> Result<i32> {
    i32::try_from(n).map_err(|_| Error::invalid(format!("{what}: {n} does not fit a kernel's int")))
}

/// Blocks of 256 threads for a grid-stride loop over n elements (at most 1024).
pub(crate) fn grid_for(n: usize) -> Launch {
    Launch::x((n as u64).div_ceil(256).clamp(1, 1024) as u32, 256)
}

/// The block width of a one-block-per-row kernel whose rows hold `units` work items: a
/// power of two from 32 to 256, about 4 items per thread, so a short row does not keep
/// hundreds of idle threads (on emu each is a fiber to switch through; on a GPU, idle lanes).
pub(crate) fn row_block(units: usize) -> u32 {
    units.div_ceil(4).next_power_of_two().clamp(32, 256) as u32
}

pub(crate) fn rows_of(len: usize, d: usize, what: &str) -> Result<(usize, u32)> {
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

pub(crate) fn same_len(what: &str, a: usize, b: usize) -> Result<()> {
    if a != b {
        return Err(Error::invalid(format!(
            "{what}: input has {a} elements, output {b}"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn geometry_limits_per_axis_and_in_total() {
        let ok = |g: Dim3, b: Dim3| check_geometry("k", g, b).is_ok();
        assert!(ok(Dim3::x(1), Dim3::x(1024)));
        assert!(ok(
            Dim3::new(i32::MAX as u32, 65535, 65535),
            Dim3::new(16, 16, 4)
        ));
        assert!(!ok(Dim3::x(1), Dim3::x(1025)));
        assert!(!ok(Dim3::x(1), Dim3::new(1, 1, 65)));
        assert!(!ok(Dim3::x(1), Dim3::new(64, 32, 1)), "2048 threads");
        // 2^16 · 2^16 · 1 wraps to 0 in u32: the product is taken in u64.
        assert!(!ok(Dim3::x(1), Dim3::new(65536, 65536, 1)));
        assert!(!ok(Dim3::new(1, 65536, 1), Dim3::x(32)));
        assert!(!ok(Dim3::x(1 << 31), Dim3::x(32)));
        assert!(!ok(Dim3::x(0), Dim3::x(32)));
    }

    #[test]
    fn shared_memory_within_opt_in_and_architecture() {
        let c = |s, o, a| check_shared("k", s, o, a).is_ok();
        assert!(c(SHARED_DEFAULT, 0, Arch::SM80));
        assert!(!c(SHARED_DEFAULT + 1, 0, Arch::SM90));
        assert!(c(96 * 1024, 96 * 1024, Arch::SM86));
        assert!(!c(96 * 1024 + 1, 96 * 1024, Arch::SM90));
        assert!(c(227 * 1024, 227 * 1024, Arch::SM90));
        assert!(
            !c(200 * 1024, 200 * 1024, Arch::SM80),
            "sm_80 allows 163 KiB"
        );
        assert!(Arch::parse("sm_90a") == Some(Arch::SM90) && Arch::parse("75").is_none());
    }

    #[test]
    fn row_blocks_are_powers_of_two_from_32_to_256() {
        assert_eq!(row_block(7), 32);
        assert_eq!(row_block(333), 128);
        assert_eq!(row_block(1536), 256);
    }
}

//! Launchers of kernels/hopper.sm90.cu, the checks of the Hopper wrappers
//! (kernels/common/reel_hopper.cuh), and TMA tensor maps.
//!
//! A [`TmaDesc`] describes a tiled tensor map (rank 1..5, bf16/f16/f32, a box, a swizzle,
//! out-of-bounds fill) and [`TmaDesc::encode`] makes the 128 bytes a kernel takes as a
//! `const __grid_constant__ TensorMap`: cuTensorMapEncodeTiled on cuda, reel's own encoding
//! (kernels/emu/emu.h `TmaMap`) on emu. The checks run the same inputs on both: the raw
//! shared-memory bytes after a TMA load, the raw accumulator registers of m64n64k16 wgmmas for
//! every operand layout ([`WgmmaLayout`]), and the mbarrier phases after a fixed sequence.

use super::{kernels, Buf, DevPtr, DevSlice, Elem, KernelDevice, Launch, Param};
use crate::error::{Error, Result};

kernels! {
    module "hopper.sm90";
    TMA_CHECK = tma_check[opt_in = 64 * 1024](TmaCheckArgs {
        in_map: TensorMap, out_map: TensorMap, raw: DevPtr, rank: i32,
        c0: i32, c1: i32, c2: i32, c3: i32, c4: i32, bytes: u32, bad: i32,
    });
    WGMMA_CHECK = wgmma_check[opt_in = 64 * 1024](WgmmaCheckArgs {
        a_map: TensorMap, b_map: TensorMap, plan: DevPtr, a_frag: DevPtr, d_out: DevPtr, bad: i32,
    });
    MBARRIER_CHECK = mbarrier_check(MbarrierCheckArgs { map: TensorMap, out: DevPtr, bad: i32 });
}

/// A CUtensorMap: 128 opaque bytes, passed by value as a kernel parameter.
#[repr(C, align(64))]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TensorMap(pub [u64; 16]);

impl Param for TensorMap {
    const KIND: u8 = b's';
}

/// The first word of reel's own tensor-map encoding ("Tmam", kernels/emu/emu.h `kTmaMagic`).
const TMA_MAGIC: u32 = 0x6d61_6d54;

/// The global address of a tensor map in reel's encoding (emu and measuring passes); None
/// for a driver-encoded map.
pub(crate) fn map_address(m: &TensorMap) -> Option<DevPtr> {
    (m.0[0] as u32 == TMA_MAGIC).then_some(DevPtr(m.0[2]))
}

/// Element type of a tensor map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TmaType {
    Bf16,
    F16,
    F32,
}

impl TmaType {
    pub fn bytes(self) -> usize {
        match self {
            TmaType::F32 => 4,
            _ => 2,
        }
    }
}

/// The swizzle of a TMA box or wgmma operand in shared memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Swizzle {
    None,
    B32,
    B64,
    B128,
}

impl Swizzle {
    /// The span in bytes (0: none).
    pub fn bytes(self) -> u32 {
        match self {
            Swizzle::None => 0,
            Swizzle::B32 => 32,
            Swizzle::B64 => 64,
            Swizzle::B128 => 128,
        }
    }

    /// Where the byte at `addr` (a shared address) lands: 16-byte chunk bits [4, 4+b) XOR
    /// address bits [7, 7+b), b = log2(span / 16) (PTX ISA "Swizzling Modes").
    pub fn apply(self, addr: u32) -> u32 {
        let bits = match self {
            Swizzle::None => 0,
            Swizzle::B32 => 1,
            Swizzle::B64 => 2,
            Swizzle::B128 => 3,
        };
        addr ^ (((addr >> 7) & ((1 << bits) - 1)) << 4)
    }
}

/// A tiled tensor map: `dims` elements per dimension (innermost first), `strides` the bytes
/// between consecutive indices of dimensions 1.. (rank − 1 of them), a box of `box_dims`,
/// the shared-memory swizzle, and out-of-bounds elements read as zero (or NaN).
#[derive(Clone, Debug)]
pub struct TmaDesc {
    pub dtype: TmaType,
    pub dims: Vec<u64>,
    pub strides: Vec<u64>,
    pub box_dims: Vec<u32>,
    pub swizzle: Swizzle,
    pub oob_nan: bool,
}

impl TmaDesc {
    /// A row-major tensor of `dims` (innermost first), densely packed.
    pub fn dense(dtype: TmaType, dims: &[u64], box_dims: &[u32], swizzle: Swizzle) -> TmaDesc {
        let mut strides = Vec::new();
        let mut s = dtype.bytes() as u64;
        for d in &dims[..dims.len().saturating_sub(1)] {
            s *= d;
            strides.push(s);
        }
        TmaDesc {
            dtype,
            dims: dims.to_vec(),
            strides,
            box_dims: box_dims.to_vec(),
            swizzle,
            oob_nan: false,
        }
    }

    pub fn rank(&self) -> usize {
        self.dims.len()
    }

    /// Bytes of one box in shared memory (what a load adds to its mbarrier's count).
    pub fn box_bytes(&self) -> usize {
        self.box_dims.iter().map(|&b| b as usize).product::<usize>() * self.dtype.bytes()
    }

    /// The driver's rules (cuTensorMapEncodeTiled) and reel's: each violation names the field.
    pub fn check(&self) -> Result<()> {
        let bad = |m: String| Err(Error::invalid(format!("tensor map: {m}")));
        let r = self.rank();
        if !(1..=5).contains(&r) {
            return bad(format!("rank {r} (1..5)"));
        }
        if self.box_dims.len() != r || self.strides.len() != r - 1 {
            return bad(format!(
                "box_dims has {} entries and strides {} for rank {r} (want {r} and {})",
                self.box_dims.len(),
                self.strides.len(),
                r - 1
            ));
        }
        for (i, &d) in self.dims.iter().enumerate() {
            if d == 0 || d > 1 << 32 {
                return bad(format!("dims[{i}] = {d} (1..2^32)"));
            }
        }
        for (i, &s) in self.strides.iter().enumerate() {
            if s % 16 != 0 || s >= 1 << 40 {
                return bad(format!(
                    "strides[{i}] = {s} bytes (a multiple of 16 below 2^40)"
                ));
            }
        }
        for (i, &b) in self.box_dims.iter().enumerate() {
            if !(1..=256).contains(&b) {
                return bad(format!("box_dims[{i}] = {b} (1..256)"));
            }
        }
        let inner = self.box_dims[0] as usize * self.dtype.bytes();
        if inner % 16 != 0 {
            return bad(format!(
                "the box's inner dimension is {inner} bytes, not a multiple of 16"
            ));
        }
        let span = self.swizzle.bytes() as usize;
        if span != 0 && inner != span {
            return bad(format!(
                "the box's inner dimension is {inner} bytes; with a {span}-byte swizzle reel requires exactly {span}"
            ));
        }
        Ok(())
    }

    /// The tensor map of this description over `data` (on `dev`, of this element size, and
    /// holding the whole tensor).
    pub fn map<'a, T: Elem>(
        &self,
        dev: &KernelDevice,
        data: impl Into<DevSlice<'a, T>>,
    ) -> Result<TensorMap> {
        let data = data.into();
        self.check()?;
        if std::mem::size_of::<T>() != self.dtype.bytes() {
            return Err(Error::invalid(format!(
                "tensor map: {:?} elements over a buffer of {}-byte elements",
                self.dtype,
                std::mem::size_of::<T>()
            )));
        }
        let mut extent = self.dtype.bytes() as u64 * self.dims[0];
        for (s, d) in self.strides.iter().zip(&self.dims[1..]) {
            extent = extent.max(s * d);
        }
        let have = (data.len() * std::mem::size_of::<T>()) as u64;
        if extent > have {
            return Err(Error::invalid(format!(
                "tensor map: the tensor spans {extent} bytes, the buffer holds {have}"
            )));
        }
        let addr = data.addr(dev, "tensor map")?;
        self.encode_at(dev, addr)
    }

    /// The tensor map of this description over the tensor at `global` on `dev` (the caller
    /// vouches that the tensor is there; [`map`](Self::map) checks it against a buffer).
    pub(crate) fn encode_at(&self, dev: &KernelDevice, global: DevPtr) -> Result<TensorMap> {
        self.check()?;
        let align = if self.swizzle == Swizzle::None {
            16
        } else {
            128
        };
        if global.0 % align != 0 {
            return Err(Error::invalid(format!(
                "tensor map: the global address {:#x} is not {align}-byte aligned",
                global.0
            )));
        }
        if dev.is_cuda() {
            return encode_cuda(self, global);
        }
        // reel_emu::TmaMap (kernels/emu/emu.h).
        let mut w = [0u64; 16];
        let rank = self.rank();
        w[0] = TMA_MAGIC as u64 | ((rank as u64) << 32);
        w[1] = self.dtype.bytes() as u64 | ((self.swizzle.bytes() as u64) << 32);
        w[2] = global.0;
        w[3..3 + rank].copy_from_slice(&self.dims);
        w[8..8 + rank - 1].copy_from_slice(&self.strides);
        let mut boxes = [1u32; 6];
        boxes[..rank].copy_from_slice(&self.box_dims);
        boxes[5] = self.oob_nan as u32;
        for i in 0..3 {
            w[12 + i] = boxes[2 * i] as u64 | ((boxes[2 * i + 1] as u64) << 32);
        }
        Ok(TensorMap(w))
    }
}

fn encode_cuda(d: &TmaDesc, global: DevPtr) -> Result<TensorMap> {
    use cudarc::driver::sys;
    let dtype = match d.dtype {
        TmaType::Bf16 => sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
        TmaType::F16 => sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_FLOAT16,
        TmaType::F32 => sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_FLOAT32,
    };
    let swizzle = match d.swizzle {
        Swizzle::None => sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_NONE,
        Swizzle::B32 => sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_32B,
        Swizzle::B64 => sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_64B,
        Swizzle::B128 => sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B,
    };
    let oob = if d.oob_nan {
        sys::CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NAN_REQUEST_ZERO_FMA
    } else {
        sys::CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE
    };
    let elem_strides = [1u32; 5];
    let mut map = sys::CUtensorMap { opaque: [0; 16] };
    // SAFETY: every array holds rank (strides rank − 1) entries, checked by TmaDesc::check;
    // the driver writes the 128-byte map and reads nothing at `global`.
    let r = unsafe {
        sys::cuTensorMapEncodeTiled(
            &mut map,
            dtype,
            d.rank() as u32,
            global.0 as *mut std::ffi::c_void,
            d.dims.as_ptr(),
            d.strides.as_ptr(),
            d.box_dims.as_ptr(),
            elem_strides.as_ptr(),
            sys::CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
            swizzle,
            sys::CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_128B,
            oob,
        )
    };
    if r != sys::CUresult::CUDA_SUCCESS {
        return Err(Error::Device(format!(
            "cuTensorMapEncodeTiled: {r:?} for {d:?}"
        )));
    }
    Ok(TensorMap(map.opaque))
}

/// One TMA load of `map`'s box at `coords` into shared memory: returns its raw bytes there,
/// and stores the box back into `out_global` (described by `out_map`, same geometry).
/// `bad` breaks a rule on purpose (emu: 1 = an unfenced generic store before the TMA store,
/// 2 = a destination off the 128-byte alignment).
pub fn tma_check(
    dev: &KernelDevice,
    map: &TensorMap,
    out_map: &TensorMap,
    desc: &TmaDesc,
    coords: &[i32],
    bad: i32,
) -> Result<Vec<u8>> {
    const K: &str = "tma_check";
    desc.check()?;
    if coords.len() != desc.rank() {
        return Err(Error::invalid(format!(
            "{K}: {} coordinates for rank {}",
            coords.len(),
            desc.rank()
        )));
    }
    let bytes = desc.box_bytes();
    if bytes + 1024 > 64 * 1024 {
        return Err(Error::invalid(format!(
            "{K}: a box of {bytes} bytes (at most 64 KiB)"
        )));
    }
    let raw = Buf::<u8>::filled(dev, bytes, 0xaa)?;
    let mut c = [0i32; 5];
    c[..coords.len()].copy_from_slice(coords);
    let mut a = TmaCheckArgs {
        in_map: *map,
        out_map: *out_map,
        raw: raw.addr(dev, K)?,
        rank: desc.rank() as i32,
        c0: c[0],
        c1: c[1],
        c2: c[2],
        c3: c[3],
        c4: c[4],
        bytes: bytes as u32,
        bad,
    };
    let l = Launch {
        shared: (bytes + 1024) as u32,
        ..Launch::x(1, 128)
    };
    // SAFETY: the maps describe device tensors the caller owns; the kernel writes raw[..bytes]
    // and the box's in-bounds elements of the output tensor.
    unsafe { dev.launch(&TMA_CHECK, l, &mut a)? };
    raw.download()
}

/// How one operand of [`wgmma_check`] sits in shared memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OperandLayout {
    pub swizzle: Swizzle,
    /// Stored with M (A) or N (B) contiguous: the transposed wgmma operand.
    pub mn_major: bool,
}

/// The layouts of a [`wgmma_check`]: A from shared memory (K-major) or from registers, and B.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WgmmaLayout {
    /// None: A from registers.
    pub a: Option<OperandLayout>,
    pub b: OperandLayout,
}

/// kernels/hopper.sm90.cu `WgmmaPlan`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, bytemuck::Pod, bytemuck::Zeroable)]
struct WgmmaPlan {
    loads_a: i32,
    loads_b: i32,
    load_a: [[i32; 3]; 8],
    load_b: [[i32; 3]; 8],
    desc_a: [[i32; 3]; 4],
    desc_b: [[i32; 3]; 4],
    swizzle_a: i32,
    swizzle_b: i32,
    trans_b: i32,
    a_regs: i32,
    bytes: u32,
}

/// The TMA loads (shared offset, c0, c1) and the four k16 steps' descriptors (start offset,
/// LBO, SBO) of a 64×64 operand at shared offset `base`, stored as `l` from a row-major
/// 64×64 global matrix (for K-major: rows are M or N, columns K; for MN-major: rows K,
/// columns M or N). Returns (the map's box, loads, steps).
#[allow(clippy::type_complexity)]
fn operand_plan(l: OperandLayout, base: i32) -> ([u32; 2], Vec<[i32; 3]>, [[i32; 3]; 4]) {
    let span = l.swizzle.bytes() as i32;
    // Elements per box row: the swizzle span, or one 16-byte core-matrix row without swizzle.
    let inner = if span == 0 { 8 } else { span / 2 };
    let boxes = 64 / inner; // boxes along the contiguous dimension
    let box_bytes = 64 * inner * 2;
    let loads = (0..boxes)
        .map(|i| [base + i * box_bytes, i * inner, 0])
        .collect();
    let mut steps = [[0i32; 3]; 4];
    for (j, s) in steps.iter_mut().enumerate() {
        let j = j as i32;
        *s = match (l.mn_major, span) {
            // K-major, no swizzle: core matrices 8 rows × 16 B; k chunks are whole boxes.
            (false, 0) => [base + 2 * j * box_bytes, box_bytes, 128],
            // K-major, swizzled: rows of `span` bytes; a k16 step is 32 bytes further, and
            // steps past the span go to the next box.
            (false, _) => {
                let k0 = 16 * j;
                [
                    base + (k0 / inner) * box_bytes + (k0 % inner) * 2,
                    16,
                    8 * span,
                ]
            }
            // MN-major, no swizzle: 8 MN elements × 8 k rows core matrices; k rows are 16 B
            // apart in a box, MN chunks a box apart.
            (true, 0) => [base + 16 * j * 16, 128, box_bytes],
            // MN-major, swizzled: k rows of `span` bytes; LBO: the next span of MN (a box),
            // SBO: the next 8 k rows.
            (true, _) => [base + 16 * j * span, box_bytes, 8 * span],
        };
    }
    ([inner as u32, 64], loads, steps)
}

/// D = A·B (64×64×64, bf16 in, f32 out) by four m64n64k16 wgmmas with the operands laid out
/// as `layout` says; `a` and `b` row-major 64×64 (A: [m][k], B: [k][n]). Returns the 128
/// threads' raw accumulator registers ([thread][32]). `bad` (emu): 1 = an unfenced generic
/// store into B, 2 = no wgmma.fence, 3 = the accumulators read before the wait.
pub fn wgmma_check(
    dev: &KernelDevice,
    layout: WgmmaLayout,
    a: &[half::bf16],
    b: &[half::bf16],
    bad: i32,
) -> Result<Vec<f32>> {
    const K: &str = "wgmma_check";
    if a.len() != 64 * 64 || b.len() != 64 * 64 {
        return Err(Error::invalid(format!("{K}: A and B are 64×64")));
    }
    // Global operands in the order their maps read: K-major A is [m][k] (A as given);
    // K-major B is [n][k] (B transposed); MN-major B is [k][n] (B as given).
    let bt: Vec<half::bf16> = (0..64 * 64).map(|i| b[(i % 64) * 64 + i / 64]).collect();
    let b_global = if layout.b.mn_major { b.to_vec() } else { bt };
    let ga = Buf::upload(dev, a)?;
    let gb = Buf::upload(dev, &b_global)?;
    let mut plan = WgmmaPlan::default();
    let mut a_map = TensorMap([0; 16]);
    let mut frag = vec![0u32; 4 * 128 * 4];
    let b_base = 8192;
    if let Some(al) = layout.a {
        if al.mn_major {
            return Err(Error::invalid(format!(
                "{K}: reel's A operands are K-major"
            )));
        }
        let (bx, loads, steps) = operand_plan(al, 0);
        let d = TmaDesc::dense(TmaType::Bf16, &[64, 64], &bx, al.swizzle);
        a_map = d.map(dev, ga.slice())?;
        plan.loads_a = loads.len() as i32;
        plan.load_a[..loads.len()].copy_from_slice(&loads);
        plan.bytes += loads.len() as u32 * d.box_bytes() as u32;
        plan.desc_a = steps;
        plan.swizzle_a = al.swizzle.bytes() as i32;
    } else {
        // The A fragment of each k16 step (reel_hopper.cuh): register r of thread i holds
        // A[16w + g + 8(r & 1)][16j + 8(r >> 1) + 2t + {0, 1}].
        for j in 0..4 {
            for i in 0..128 {
                let (w, lane) = (i / 32, i % 32);
                let (g, t) = (lane / 4, lane % 4);
                for r in 0..4 {
                    let row = 16 * w + g + 8 * (r & 1);
                    let k = 16 * j + 8 * (r >> 1) + 2 * t;
                    let lo = a[row * 64 + k].to_bits() as u32;
                    let hi = a[row * 64 + k + 1].to_bits() as u32;
                    frag[(j * 128 + i) * 4 + r] = lo | (hi << 16);
                }
            }
        }
        plan.a_regs = 1;
    }
    let (bx, loads, steps) = operand_plan(layout.b, b_base);
    let d = TmaDesc::dense(TmaType::Bf16, &[64, 64], &bx, layout.b.swizzle);
    let b_map = d.map(dev, gb.slice())?;
    plan.loads_b = loads.len() as i32;
    plan.load_b[..loads.len()].copy_from_slice(&loads);
    plan.bytes += loads.len() as u32 * d.box_bytes() as u32;
    plan.desc_b = steps;
    plan.swizzle_b = layout.b.swizzle.bytes() as i32;
    plan.trans_b = layout.b.mn_major as i32;
    let plan_buf = Buf::<u8>::upload(dev, bytemuck::bytes_of(&plan))?;
    let frag_buf = Buf::upload(dev, &frag)?;
    let out = Buf::<f32>::filled(dev, 128 * 32, f32::NAN)?;
    let mut args = WgmmaCheckArgs {
        a_map,
        b_map,
        plan: plan_buf.addr(dev, K)?,
        a_frag: frag_buf.addr(dev, K)?,
        d_out: out.addr(dev, K)?,
        bad,
    };
    let l = Launch {
        shared: 17 * 1024,
        ..Launch::x(1, 128)
    };
    // SAFETY: the maps cover ga and gb (64×64 bf16 each), which outlive the launch; the
    // kernel reads the plan and fragments and writes out[..128 × 32].
    unsafe { dev.launch(&WGMMA_CHECK, l, &mut args)? };
    out.download()
}

/// The accumulator element (row, column) that register `r` of warpgroup thread `i` holds
/// (m64nNk16, f32): reel_hopper.cuh's layout.
pub fn accumulator_at(i: usize, r: usize) -> (usize, usize) {
    let (w, lane) = (i / 32, i % 32);
    let (g, t) = (lane / 4, lane % 4);
    (
        16 * w + g + 8 * ((r >> 1) & 1),
        8 * (r >> 2) + 2 * t + (r & 1),
    )
}

/// The mbarrier sequence of kernels/hopper.sm90.cu: nine values (eight test_wait results and
/// the landed load's first and last byte). `bad` (emu): 1 = a wait that never completes, 2 =
/// setmaxnreg counts that differ in a warpgroup, 3 = a count not a multiple of 8, 4 = one
/// arrival too many.
pub fn mbarrier_check(dev: &KernelDevice, bad: i32) -> Result<Vec<i32>> {
    const K: &str = "mbarrier_check";
    let src: Vec<half::bf16> = (0..32)
        .map(|i| half::bf16::from_bits(0x0101 * (i as u16 + 1)))
        .collect();
    let g = Buf::upload(dev, &src)?;
    let map = TmaDesc::dense(TmaType::Bf16, &[32], &[32], Swizzle::None).map(dev, g.slice())?;
    let out = Buf::<i32>::filled(dev, 9, -1)?;
    let mut a = MbarrierCheckArgs {
        map,
        out: out.addr(dev, K)?,
        bad,
    };
    let l = Launch {
        shared: 2048,
        ..Launch::x(1, 128)
    };
    // SAFETY: the map covers g (32 bf16); thread 0 writes out[..9].
    unsafe { dev.launch(&MBARRIER_CHECK, l, &mut a)? };
    out.download()
}

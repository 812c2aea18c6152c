//! Launcher of kernels/attention.sm90.cu: the FlashAttention-3-class forward for Hopper
//! (wgmma, TMA, mbarriers, a producer warpgroup and two ping-ponging consumers). Reached
//! through [`super::attention::flash_attention`], which takes it on sm_90 when
//! [`eligible`] says the call suits it and the mma.sync kernel otherwise.

use super::attention::{AttnView, FlashShape};
use super::hopper::{Swizzle, TensorMap, TmaDesc, TmaType};
use super::{kernels, Arch, DevPtr, KernelDevice, Launch};
use crate::error::{Error, Result};

/// Query rows per block (two consumer warpgroups of 64) and keys per K/V tile.
const BM: u32 = 128;
const BN: u32 = 128;

/// Dynamic shared memory: Q, STAGES × (K, V) tiles, 1 KiB to align them to 1024 bytes.
const fn smem(hd: u32, stages: u32) -> u32 {
    BM * hd * 2 + 2 * stages * BN * hd * 2 + 1024
}

kernels! {
    module "attention.sm90";
    @args Sm90Args {
        q_map: TensorMap, k_map: TensorMap, v_map: TensorMap, o: DevPtr, lse: DevPtr,
        o_row: i64, o_batch: i64, lq: i32, lk: i32, head_dim: i32, scale_log2: f32,
    }
    HD128 = flash_attn_sm90_hd128 [opt_in = smem(128, 2)] (Sm90Args);
    HD64 = flash_attn_sm90_hd64 [opt_in = smem(64, 3)] (Sm90Args);
}

/// Why the Hopper kernel cannot run this call (None: it can): an sm_90 device, bf16 without
/// biases, head_dim 64 or 128, and Q, K, V that TMA can address (128-byte aligned starts,
/// row and batch strides of whole 16 bytes).
pub(super) fn ineligible(
    arch: Arch,
    f16: bool,
    biased: bool,
    s: &FlashShape,
    qkv: [(DevPtr, AttnView); 3],
) -> Option<String> {
    if (arch.major, arch.minor) != (9, 0) {
        return Some(format!("{arch} is not sm_90"));
    }
    if f16 || biased {
        return Some("it takes bf16 without biases".into());
    }
    if s.head_dim != 64 && s.head_dim != 128 {
        return Some(format!("head_dim {} (64 or 128)", s.head_dim));
    }
    for ((p, v), name) in qkv.iter().zip(["q", "k", "v"]) {
        if p.0 % 128 != 0 || v.row_stride % 8 != 0 || (s.batch > 1 && v.batch_stride % 8 != 0) {
            return Some(format!(
                "{name} ({v:?}) is not 128-byte aligned with strides of whole 16 bytes"
            ));
        }
    }
    None
}

/// The tensor map of Q, K or V: (head_dim, heads, rows, batch), boxes of 64 columns × `rows`
/// (BM or BN) in 128-byte swizzle.
fn operand_map(
    dev: &KernelDevice,
    p: DevPtr,
    v: AttnView,
    s: &FlashShape,
    rows: usize,
    box_rows: u32,
) -> Result<TensorMap> {
    let row = 2 * v.row_stride as u64;
    // One sample: the batch coordinate is always 0 and its stride unused (any legal value).
    let batch = if s.batch > 1 {
        2 * v.batch_stride as u64
    } else {
        (row * rows as u64).next_multiple_of(16)
    };
    TmaDesc {
        dtype: TmaType::Bf16,
        dims: vec![
            s.head_dim as u64,
            s.heads as u64,
            rows as u64,
            s.batch as u64,
        ],
        strides: vec![2 * s.head_dim as u64, row, batch],
        box_dims: vec![64, 1, box_rows, 1],
        swizzle: Swizzle::B128,
        oob_nan: false,
    }
    .encode_at(dev, p)
}

/// Runs the Hopper kernel (the caller checked the operands and [`ineligible`]).
#[allow(clippy::too_many_arguments)]
pub(super) fn launch(
    dev: &KernelDevice,
    q: (DevPtr, AttnView),
    k: (DevPtr, AttnView),
    v: (DevPtr, AttnView),
    o: (DevPtr, AttnView),
    lse: DevPtr,
    s: &FlashShape,
) -> Result<&'static str> {
    const K: &str = "flash_attention (sm_90)";
    let kernel = if s.head_dim == 128 { &HD128 } else { &HD64 };
    let mut a = Sm90Args {
        q_map: operand_map(dev, q.0, q.1, s, s.lq, BM)?,
        k_map: operand_map(dev, k.0, k.1, s, s.lk, BN)?,
        v_map: operand_map(dev, v.0, v.1, s, s.lk, BN)?,
        o: o.0,
        lse,
        o_row: o.1.row_stride as i64,
        o_batch: o.1.batch_stride as i64,
        lq: s.lq as i32,
        lk: s.lk as i32,
        head_dim: s.head_dim as i32,
        scale_log2: s.scale * std::f32::consts::LOG2_E,
    };
    let grid_x = u32::try_from(s.lq.div_ceil(BM as usize))
        .map_err(|_| Error::invalid(format!("{K}: lq = {} too large", s.lq)))?;
    let l = Launch {
        grid: super::Dim3::new(
            grid_x,
            u32::try_from(s.heads).unwrap_or(u32::MAX),
            u32::try_from(s.batch).unwrap_or(u32::MAX),
        ),
        block: super::Dim3::x(384),
        shared: kernel.shared_opt_in,
    };
    let flops = 4 * (s.batch * s.heads * s.lq * s.lk * s.head_dim) as u64;
    // SAFETY: the caller checked that Q, K and V hold batch × rows × heads × head_dim
    // elements where their views say (the maps describe exactly that, rows past the end read
    // as zeros by TMA), that O's rows are disjoint and inside its buffer, and that lse (when
    // not null) holds batch × heads × lq floats; the kernel writes O's head columns of rows
    // < lq and lse[b, h, row].
    unsafe {
        dev.launch_counted(kernel, l, &mut a, crate::profile::Op::Attention, flops)?;
    }
    Ok(kernel.name)
}

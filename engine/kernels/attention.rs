//! Launcher of kernels/attention.cu: flash attention forward (bf16 Q/K/V/O, f32
//! accumulation), reading Q, K and V in the layout the projections write (row and batch
//! strides, head h at columns h·head_dim.. of a row). The kernel's header documents the
//! algorithm, the variants and why QK-RMSNorm + RoPE stays a separate pass
//! ([`super::rms_norm_rope_bf16`]). CPU reference: [`crate::cpu::attention`].

use super::{kernels, DevPtr, DevSlice, Half, Kernel, KernelDevice, Launch};
use crate::error::{Error, Result};

/// Shared memory of a variant: a Q tile of 16·warps rows and two stages of K and V tiles
/// of `bn` rows, each row of Q and K hd + 8 bf16 (16 bytes of padding against bank
/// conflicts), each row of V hdv + 8.
const fn smem(hd: u32, hdv: u32, warps: u32, bn: u32) -> u32 {
    ((16 * warps + 2 * bn) * (hd + 8) + 2 * bn * (hdv + 8)) * 2
}

kernels! {
    module "attention";
    @args FlashArgs {
        q: DevPtr, k: DevPtr, v: DevPtr, o: DevPtr, lse: DevPtr,
        q_row: i64, k_row: i64, v_row: i64, o_row: i64,
        q_batch: i64, k_batch: i64, v_batch: i64, o_batch: i64,
        lq: i32, lk: i32, head_dim: i32, v_dim: i32, scale_log2: f32,
        rel_bias: DevPtr, key_bias: DevPtr,
    }
    HD128_BN64 = flash_attn_hd128_bn64 [opt_in = smem(128, 128, 8, 64)] (FlashArgs);
    HD128_BN32 = flash_attn_hd128_bn32 [opt_in = smem(128, 128, 8, 32)] (FlashArgs);
    HD64_BN128 = flash_attn_hd64_bn128 [opt_in = smem(64, 64, 8, 128)] (FlashArgs);
    ANY16 = flash_attn_any_hd16 [opt_in = smem(16, 16, 4, 64)] (FlashArgs);
    ANY32 = flash_attn_any_hd32 [opt_in = smem(32, 32, 4, 64)] (FlashArgs);
    ANY64 = flash_attn_any_hd64 [opt_in = smem(64, 64, 4, 64)] (FlashArgs);
    ANY128 = flash_attn_any_hd128 [opt_in = smem(128, 128, 4, 64)] (FlashArgs);
    ANY256 = flash_attn_any_hd256 [opt_in = smem(256, 256, 4, 32)] (FlashArgs);
    QK384_BN32 = flash_attn_qk384_v192_bn32 [opt_in = smem(384, 192, 4, 32)] (FlashArgs);
    QK384_BN16 = flash_attn_qk384_v192_bn16 [opt_in = smem(384, 192, 4, 16)] (FlashArgs);
    F16_ANY32 = flash_attn_f16_any_hd32 [opt_in = smem(32, 32, 4, 64)] (FlashArgs);
    F16_ANY128 = flash_attn_f16_any_hd128 [opt_in = smem(128, 128, 4, 64)] (FlashArgs);
    F16_ANY256 = flash_attn_f16_any_hd256 [opt_in = smem(256, 256, 4, 32)] (FlashArgs);
    F16_QK384_BN32 = flash_attn_f16_qk384_v192_bn32 [opt_in = smem(384, 192, 4, 32)] (FlashArgs);
    F16_QK384_BN16 = flash_attn_f16_qk384_v192_bn16 [opt_in = smem(384, 192, 4, 16)] (FlashArgs);
    BIAS_HD64_BN128 = flash_attn_bias_hd64_bn128 [opt_in = smem(64, 64, 8, 128)] (FlashArgs);
    BIAS_ANY16 = flash_attn_bias_any_hd16 [opt_in = smem(16, 16, 4, 64)] (FlashArgs);
    BIAS_ANY32 = flash_attn_bias_any_hd32 [opt_in = smem(32, 32, 4, 64)] (FlashArgs);
    BIAS_ANY64 = flash_attn_bias_any_hd64 [opt_in = smem(64, 64, 4, 64)] (FlashArgs);
    BIAS_ANY128 = flash_attn_bias_any_hd128 [opt_in = smem(128, 128, 4, 64)] (FlashArgs);
    F16_BIAS_HD64_BN128 = flash_attn_f16_bias_hd64_bn128 [opt_in = smem(64, 64, 8, 128)] (FlashArgs);
    F16_BIAS_ANY16 = flash_attn_f16_bias_any_hd16 [opt_in = smem(16, 16, 4, 64)] (FlashArgs);
    F16_BIAS_ANY32 = flash_attn_f16_bias_any_hd32 [opt_in = smem(32, 32, 4, 64)] (FlashArgs);
    F16_BIAS_ANY64 = flash_attn_f16_bias_any_hd64 [opt_in = smem(64, 64, 4, 64)] (FlashArgs);
    F16_BIAS_ANY128 = flash_attn_f16_bias_any_hd128 [opt_in = smem(128, 128, 4, 64)] (FlashArgs);
}

/// Additive biases (head_dim ≤ 128): umT5's self-attention.
const BIAS_SPECIAL: [Variant; 1] = [variant(&BIAS_HD64_BN128, 64, 64, 8, 128)];
const F16_BIAS_SPECIAL: [Variant; 1] = [variant(&F16_BIAS_HD64_BN128, 64, 64, 8, 128)];
const F16_BIAS_GENERIC: [Variant; 4] = [
    variant(&F16_BIAS_ANY16, 16, 16, 4, 64),
    variant(&F16_BIAS_ANY32, 32, 32, 4, 64),
    variant(&F16_BIAS_ANY64, 64, 64, 4, 64),
    variant(&F16_BIAS_ANY128, 128, 128, 4, 64),
];
const BIAS_GENERIC: [Variant; 4] = [
    variant(&BIAS_ANY16, 16, 16, 4, 64),
    variant(&BIAS_ANY32, 32, 32, 4, 64),
    variant(&BIAS_ANY64, 64, 64, 4, 64),
    variant(&BIAS_ANY128, 128, 128, 4, 64),
];

/// Additive score biases for [`flash_attention_biased`]: score(b, h, i, j) =
/// scale·q_i·k_j + rel[h, j − i + lq − 1] + key[b, j].
#[derive(Debug, Clone, Copy)]
pub struct AttnBias<'a> {
    /// f32 [heads, lq + lk − 1]: a bias per head and relative position j − i (T5's
    /// bucketed table, expanded on the host).
    pub rel: DevSlice<'a, f32>,
    /// f32 [batch, lk]: a bias per key (0 for tokens, [`MASKED`] for padding).
    pub key: DevSlice<'a, f32>,
}

/// The key bias of a masked key: large enough that its weight is exactly 0 next to any
/// unmasked key, finite so that a row whose keys are all masked averages them (as
/// transformers' finfo.min mask does) instead of dividing 0 by 0.
pub const MASKED: f32 = -1.0e30;

const fn variant(
    kernel: &'static Kernel<FlashArgs>,
    hd: u32,
    hdv: u32,
    warps: u32,
    bn: u32,
) -> Variant {
    Variant {
        kernel,
        hd,
        hdv,
        warps,
        bn,
    }
}

/// f16 storage (the VAE): the generic path and the split path only.
const F16_GENERIC: [Variant; 3] = [
    variant(&F16_ANY32, 32, 32, 4, 64),
    variant(&F16_ANY128, 128, 128, 4, 64),
    variant(&F16_ANY256, 256, 256, 4, 32),
];
const F16_SPLIT: [Variant; 2] = [
    variant(&F16_QK384_BN32, 384, 192, 4, 32),
    variant(&F16_QK384_BN16, 384, 192, 4, 16),
];

/// A variant: its kernel, padded head dim, padded V/O columns per launch, warps (16 query
/// rows each) and keys per tile.
struct Variant {
    kernel: &'static Kernel<FlashArgs>,
    hd: u32,
    hdv: u32,
    warps: u32,
    bn: u32,
}

/// head_dim 257..=384 with V and O in two launches of half the columns (≤ 192 each).
const SPLIT: [Variant; 2] = [
    Variant {
        kernel: &QK384_BN32,
        hd: 384,
        hdv: 192,
        warps: 4,
        bn: 32,
    },
    Variant {
        kernel: &QK384_BN16,
        hd: 384,
        hdv: 192,
        warps: 4,
        bn: 16,
    },
];

const SPECIAL: [Variant; 3] = [
    Variant {
        kernel: &HD128_BN64,
        hd: 128,
        hdv: 128,
        warps: 8,
        bn: 64,
    },
    Variant {
        kernel: &HD128_BN32,
        hd: 128,
        hdv: 128,
        warps: 8,
        bn: 32,
    },
    Variant {
        kernel: &HD64_BN128,
        hd: 64,
        hdv: 64,
        warps: 8,
        bn: 128,
    },
];

const GENERIC: [Variant; 5] = [
    Variant {
        kernel: &ANY16,
        hd: 16,
        hdv: 16,
        warps: 4,
        bn: 64,
    },
    Variant {
        kernel: &ANY32,
        hd: 32,
        hdv: 32,
        warps: 4,
        bn: 64,
    },
    Variant {
        kernel: &ANY64,
        hd: 64,
        hdv: 64,
        warps: 4,
        bn: 64,
    },
    Variant {
        kernel: &ANY128,
        hd: 128,
        hdv: 128,
        warps: 4,
        bn: 64,
    },
    Variant {
        kernel: &ANY256,
        hd: 256,
        hdv: 256,
        warps: 4,
        bn: 32,
    },
];

/// Where Q, K, V or O lie in their buffer (in elements): the offset of (sample 0, row 0,
/// head 0), the row stride and the batch stride. Head h of a row occupies head_dim
/// elements from column h·head_dim.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttnView {
    pub offset: usize,
    pub row_stride: usize,
    pub batch_stride: usize,
}

impl AttnView {
    /// Rows of `row_stride` elements, `rows` per sample, from `offset`: e.g. K of a fused
    /// [B·L, 3·D] QKV projection is `AttnView::packed(d, 3 * d, l)`.
    pub fn packed(offset: usize, row_stride: usize, rows: usize) -> Self {
        AttnView {
            offset,
            row_stride,
            batch_stride: rows * row_stride,
        }
    }
}

/// An attention call's sizes.
#[derive(Debug, Clone, Copy)]
pub struct FlashShape {
    pub batch: usize,
    pub heads: usize,
    /// Even, at most 384 (above 256: a multiple of 16, operands 16-byte aligned).
    pub head_dim: usize,
    pub lq: usize,
    pub lk: usize,
    /// Multiplies q·k (1/√head_dim for Wan).
    pub scale: f32,
}

/// The last element `view` touches for `rows` rows of `heads` heads (None on overflow).
fn last_element(view: AttnView, s: &FlashShape, rows: usize) -> Option<usize> {
    view.offset
        .checked_add((s.batch - 1).checked_mul(view.batch_stride)?)?
        .checked_add((rows - 1).checked_mul(view.row_stride)?)?
        .checked_add(s.heads.checked_mul(s.head_dim)?)?
        .checked_sub(1)
}

/// Which kernel a flash-attention call runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FlashKernel {
    /// The Hopper kernel (kernels/attention.sm90.cu: wgmma, TMA, warp specialisation) on
    /// sm_90 when the call suits it (bf16 without biases, head_dim 64 or 128, Q, K and V
    /// 128-byte aligned with strides of whole 16 bytes), else the mma.sync kernel.
    /// `REEL_ATTENTION=mma` in the environment keeps every call on the mma.sync kernel.
    #[default]
    Auto,
    /// The mma.sync kernel (kernels/attention.cu), on every architecture.
    MmaSync,
    /// The Hopper kernel, or an error saying why it cannot take the call.
    Sm90,
}

impl FlashKernel {
    /// What `REEL_ATTENTION` asks of [`FlashKernel::Auto`]: `mma` (or `mma.sync`) keeps the
    /// mma.sync kernel, `auto` or unset chooses; anything else is an error naming it.
    fn from_env() -> Result<FlashKernel> {
        static CHOICE: std::sync::OnceLock<std::result::Result<FlashKernel, String>> =
            std::sync::OnceLock::new();
        CHOICE
            .get_or_init(|| match std::env::var("REEL_ATTENTION").as_deref() {
                Err(_) | Ok("") | Ok("auto") => Ok(FlashKernel::Auto),
                Ok("mma") | Ok("mma.sync") => Ok(FlashKernel::MmaSync),
                Ok(other) => Err(format!(
                    "REEL_ATTENTION={other}: expected auto or mma (the mma.sync kernel everywhere)"
                )),
            })
            .clone()
            .map_err(Error::invalid)
    }
}

/// out = softmax(scale·Q·Kᵀ)·V per (sample, head), no mask; `lse` (when given, f32
/// [batch, heads, lq]) gets each row's log-sum-exp of scale·q·k in natural log. Returns the
/// kernel variant that ran (specialised head_dim 64/128 when every operand is 16-byte
/// aligned, else the generic path for any even head_dim ≤ 256; above 256 the split path).
/// bf16 or f16 storage (f16: the generic and split paths).
pub fn flash_attention<'a, T: Half>(
    dev: &KernelDevice,
    q: (impl Into<DevSlice<'a, T>>, AttnView),
    k: (impl Into<DevSlice<'a, T>>, AttnView),
    v: (impl Into<DevSlice<'a, T>>, AttnView),
    o: (impl Into<DevSlice<'a, T>>, AttnView),
    lse: Option<DevSlice<'a, f32>>,
    s: FlashShape,
) -> Result<&'static str> {
    flash_attention_with(dev, FlashKernel::Auto, q, k, v, o, lse, s)
}

/// [`flash_attention`] on the kernel `kernel` names (benchmarks and tests compare them on
/// one device).
#[allow(clippy::too_many_arguments)]
pub fn flash_attention_with<'a, T: Half>(
    dev: &KernelDevice,
    kernel: FlashKernel,
    q: (impl Into<DevSlice<'a, T>>, AttnView),
    k: (impl Into<DevSlice<'a, T>>, AttnView),
    v: (impl Into<DevSlice<'a, T>>, AttnView),
    o: (impl Into<DevSlice<'a, T>>, AttnView),
    lse: Option<DevSlice<'a, f32>>,
    s: FlashShape,
) -> Result<&'static str> {
    let ops = [q.0.into(), k.0.into(), v.0.into(), o.0.into()];
    launch(dev, ops, [q.1, k.1, v.1, o.1], lse, s, None, kernel)
}

/// [`flash_attention`] with additive score biases (see [`AttnBias`]), bf16 or f16,
/// head_dim ≤ 128: the specialised head_dim 64 variant when every operand is 16-byte
/// aligned, else the generic path. umT5's self-attention (scale 1, a relative-position bias
/// per head, the padding mask as a key bias).
pub fn flash_attention_biased<'a, T: Half>(
    dev: &KernelDevice,
    q: (impl Into<DevSlice<'a, T>>, AttnView),
    k: (impl Into<DevSlice<'a, T>>, AttnView),
    v: (impl Into<DevSlice<'a, T>>, AttnView),
    o: (impl Into<DevSlice<'a, T>>, AttnView),
    s: FlashShape,
    bias: AttnBias<'a>,
) -> Result<&'static str> {
    let ops = [q.0.into(), k.0.into(), v.0.into(), o.0.into()];
    launch(
        dev,
        ops,
        [q.1, k.1, v.1, o.1],
        None,
        s,
        Some(bias),
        FlashKernel::MmaSync,
    )
}

fn launch<'a, T: Half>(
    dev: &KernelDevice,
    [qb, kb, vb, ob]: [DevSlice<'a, T>; 4],
    [qv, kv, vv, ov]: [AttnView; 4],
    lse: Option<DevSlice<'a, f32>>,
    s: FlashShape,
    bias: Option<AttnBias<'a>>,
    kernel: FlashKernel,
) -> Result<&'static str> {
    const K: &str = "flash_attention";
    let bad = |m: String| Err(Error::invalid(format!("{K}: {m}")));
    if s.batch == 0 || s.heads == 0 || s.lq == 0 || s.lk == 0 {
        return bad(format!("empty shape {s:?}"));
    }
    if s.head_dim == 0 || s.head_dim % 2 != 0 || s.head_dim > 384 {
        return bad(format!(
            "head_dim {} must be even and at most 384",
            s.head_dim
        ));
    }
    let split = s.head_dim > 256;
    if split && s.head_dim % 16 != 0 {
        return bad(format!(
            "head_dim {} above 256 must be a multiple of 16 (V and O run in two halves of whole 16-byte copies)",
            s.head_dim
        ));
    }
    if !s.scale.is_finite() {
        return bad(format!("scale {} is not finite", s.scale));
    }
    if let Some(bias) = &bias {
        if s.head_dim > 128 {
            return bad(format!(
                "biased attention takes head_dim ≤ 128, not {}",
                s.head_dim
            ));
        }
        let rel = s.heads * (s.lq + s.lk - 1);
        if bias.rel.len() < rel || bias.key.len() < s.batch * s.lk {
            return bad(format!(
                "bias: rel holds {} floats (needs [{}, {}]), key {} (needs [{}, {}])",
                bias.rel.len(),
                s.heads,
                s.lq + s.lk - 1,
                bias.key.len(),
                s.batch,
                s.lk
            ));
        }
    }
    let ops: [(&str, usize, AttnView, usize); 4] = [
        ("q", qb.len(), qv, s.lq),
        ("k", kb.len(), kv, s.lk),
        ("v", vb.len(), vv, s.lk),
        ("o", ob.len(), ov, s.lq),
    ];
    for (name, len, view, rows) in ops {
        match last_element(view, &s, rows) {
            Some(last) if last < len => {}
            _ => {
                return bad(format!(
                    "{name} ({view:?}) does not hold {} samples × {rows} rows × {} heads of {} in its {len} elements",
                    s.batch, s.heads, s.head_dim
                ))
            }
        }
        // The generic path copies pairs of bf16: 4-byte alignment.
        if view.offset % 2 != 0 || view.row_stride % 2 != 0 || view.batch_stride % 2 != 0 {
            return bad(format!(
                "{name} ({view:?}): offsets and strides must be even (4-byte aligned)"
            ));
        }
    }
    // Blocks write disjoint parts of O only if its rows and samples do not overlap.
    if ov.row_stride < s.heads * s.head_dim
        || (s.batch > 1 && ov.batch_stride < s.lq * ov.row_stride)
    {
        return bad(format!(
            "o ({ov:?}) has overlapping rows or samples for {} heads of {} × {} rows",
            s.heads, s.head_dim, s.lq
        ));
    }
    if let Some(l) = &lse {
        if l.len() < s.batch * s.heads * s.lq {
            return bad(format!(
                "lse holds {} floats, needs [{}, {}, {}]",
                l.len(),
                s.batch,
                s.heads,
                s.lq
            ));
        }
    }
    let ptr = |b: DevSlice<'a, T>, view: AttnView, name: &str| -> Result<DevPtr> {
        Ok(b.addr(dev, &format!("{K} {name}"))?.offset(2 * view.offset))
    };
    let (qp, kp, vp, op) = (
        ptr(qb, qv, "q")?,
        ptr(kb, kv, "k")?,
        ptr(vb, vv, "v")?,
        ptr(ob, ov, "o")?,
    );
    let lse_ptr = match lse {
        Some(l) => l.addr(dev, "flash_attention lse")?,
        None => DevPtr::NULL,
    };
    if [qp, kp, vp, op].iter().any(|p| p.0 % 4 != 0) {
        return bad("q, k, v and o must be 4-byte aligned".into());
    }
    let aligned16 = [(qp, qv), (kp, kv), (vp, vv), (op, ov)]
        .iter()
        .all(|(p, v)| p.0 % 16 == 0 && v.row_stride % 8 == 0 && v.batch_stride % 8 == 0);
    let arch = dev.arch()?;
    let kernel = match kernel {
        FlashKernel::Auto => FlashKernel::from_env()?,
        k => k,
    };
    if kernel != FlashKernel::MmaSync {
        let qkv = [(qp, qv), (kp, kv), (vp, vv)];
        match super::attention_sm90::ineligible(arch, T::F16, bias.is_some(), &s, qkv) {
            None => {
                return super::attention_sm90::launch(
                    dev,
                    (qp, qv),
                    (kp, kv),
                    (vp, vv),
                    (op, ov),
                    lse_ptr,
                    &s,
                )
            }
            Some(why) if kernel == FlashKernel::Sm90 => {
                return bad(format!("the sm_90 kernel cannot take this call: {why}"))
            }
            Some(_) => {}
        }
    }
    let fits = |v: &&Variant| v.kernel.shared_opt_in <= arch.max_shared_per_block;
    if split && !aligned16 {
        return bad(format!(
            "head_dim {} above 256 needs q, k, v and o 16-byte aligned with strides of multiples of 8 elements",
            s.head_dim
        ));
    }
    let (special, generic, splits): (&[Variant], &[Variant], &[Variant]) = if bias.is_some() {
        if T::F16 {
            (&F16_BIAS_SPECIAL, &F16_BIAS_GENERIC, &[])
        } else {
            (&BIAS_SPECIAL, &BIAS_GENERIC, &[])
        }
    } else if T::F16 {
        (&[], &F16_GENERIC, &F16_SPLIT)
    } else {
        (&SPECIAL, &GENERIC, &SPLIT)
    };
    let special = special
        .iter()
        .chain(splits)
        .filter(|v| aligned16 && (v.hd as usize == s.head_dim || (split && v.hd == 384)))
        .find(fits);
    let variant = match special {
        Some(v) => v,
        None if split => {
            return bad(format!(
                "no variant for head_dim {} fits {arch}'s shared memory",
                s.head_dim
            ))
        }
        None => generic
            .iter()
            .filter(|v| v.hd as usize >= s.head_dim)
            .find(fits)
            .ok_or_else(|| {
                Error::invalid(format!(
                    "{K}: no variant for head_dim {} fits {arch}'s shared memory",
                    s.head_dim
                ))
            })?,
    };
    let i64_of = |n: usize| {
        i64::try_from(n).map_err(|_| Error::invalid(format!("{K}: stride {n} too large")))
    };
    let i32_of = |n: usize, what: &str| {
        i32::try_from(n).map_err(|_| Error::invalid(format!("{K}: {what} = {n} too large")))
    };
    let mut a = FlashArgs {
        q: qp,
        k: kp,
        v: vp,
        o: op,
        lse: lse_ptr,
        q_row: i64_of(qv.row_stride)?,
        k_row: i64_of(kv.row_stride)?,
        v_row: i64_of(vv.row_stride)?,
        o_row: i64_of(ov.row_stride)?,
        q_batch: i64_of(qv.batch_stride)?,
        k_batch: i64_of(kv.batch_stride)?,
        v_batch: i64_of(vv.batch_stride)?,
        o_batch: i64_of(ov.batch_stride)?,
        lq: i32_of(s.lq, "lq")?,
        lk: i32_of(s.lk, "lk")?,
        head_dim: s.head_dim as i32,
        v_dim: if split { s.head_dim / 2 } else { s.head_dim } as i32,
        scale_log2: s.scale * std::f32::consts::LOG2_E,
        rel_bias: match &bias {
            Some(b) => b.rel.addr(dev, "flash_attention rel bias")?,
            None => DevPtr::NULL,
        },
        key_bias: match &bias {
            Some(b) => b.key.addr(dev, "flash_attention key bias")?,
            None => DevPtr::NULL,
        },
    };
    let bm = 16 * variant.warps as usize;
    let grid_x = u32::try_from(s.lq.div_ceil(bm))
        .map_err(|_| Error::invalid(format!("{K}: lq = {} too large", s.lq)))?;
    let l = Launch {
        grid: super::Dim3::new(
            grid_x,
            u32::try_from(s.heads).unwrap_or(u32::MAX),
            u32::try_from(s.batch).unwrap_or(u32::MAX),
        ),
        block: super::Dim3::x(32 * variant.warps),
        shared: variant.kernel.shared_opt_in,
    };
    debug_assert_eq!(
        variant.kernel.shared_opt_in,
        smem(variant.hd, variant.hdv, variant.warps, variant.bn)
    );
    // The useful FLOPs (a split launch recomputes S: its Q·Kᵀ is not counted twice).
    let flops = 4 * (s.batch * s.heads * s.lq * s.lk * s.head_dim) as u64;
    let halves = if split { 2 } else { 1 };
    for half in 0..halves {
        if half == 1 {
            // V and O columns head_dim/2.. of every head (16-byte aligned: head_dim % 16 == 0).
            let off = 2 * (s.head_dim / 2);
            a.v = vp.offset(off);
            a.o = op.offset(off);
            a.lse = DevPtr::NULL; // written by the first half
        }
        // SAFETY: every operand covers what the kernel touches (last_element checked against
        // each buffer's length; a split launch reads V and writes O at columns
        // half·v_dim .. (half + 1)·v_dim ≤ head_dim of each head), O's blocks write disjoint
        // rows (checked), lse holds batch·heads·lq floats (checked), and the alignment the
        // variant's copies need holds (checked: aligned16 for SPECIAL and SPLIT); a biased
        // variant reads rel [heads, lq + lk − 1] and key [batch, lk] (lengths checked).
        unsafe {
            dev.launch_counted(
                variant.kernel,
                l,
                &mut a,
                crate::profile::Op::Attention,
                flops / halves,
            )?
        };
    }
    Ok(variant.kernel.name)
}

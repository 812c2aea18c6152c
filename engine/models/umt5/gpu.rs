//! The umT5 encoder on a kernel device (cuda or emu), through the GPU runtime
//! ([`crate::gpu`]). It follows the CPU forward (mod.rs) layer by layer; what differs:
//!
//! - the residual stream is f32 on the device from the embedding to the final norm (T5's
//!   activations grow through the layers; transformers keeps them f32 in an f32
//!   checkpoint); every GEMM accumulates in f32 and writes f32 where its output joins the
//!   residual or the gate; the matrices and the GEMM inputs (the normed rows, the attention
//!   output, the gated activation) are 16-bit: f16 by default ([`DEFAULT_DTYPE`] says
//!   why), bf16 selectable;
//! - q, k and v come from one GEMM against the concatenated [3I, D] weights, wi_0 and wi_1
//!   from one against [2F, D] (its f32 output gated by `t5_gated_gelu`);
//! - each residual add is fused with the next sub-layer's T5 layer norm (`t5_add_norm`);
//! - attention is the flash kernel's additive-bias variant: the layer's relative-position
//!   table is expanded on the host once per session into a bias per head and offset
//!   ([heads, 2L − 1] f32: 262 KB per layer for XXL at 512 tokens), and the padding mask is a
//!   per-key bias. Why not a kernel of its own: at L ≤ 512 a biased score is one load and one
//!   add inside the flash kernel's tile loop, which already has tensor-core Q·Kᵀ and P·V, the
//!   online softmax and the variants by head_dim; a separate kernel would repeat all of it
//!   (or write the [B, H, L, L] scores: 64 MB per layer for XXL at batch 2).
//! - the embedding rows of the prompt's tokens are gathered on the host from the memory
//!   map (the 1 GB table never goes to the device).
//!
//! Phases (see [`crate::gpu::ctx`]): "bias" (the relative-position biases, persistent,
//! once per session) and "encode" (one forward).

use half::f16;

use super::{relative_position_bucket, Umt5Config, Umt5Encoder};
use crate::error::{Error, Result};
use crate::gpu::{Ctx, DeviceWeights, MemoryPlan, View, WDtype, WeightSpec};
use crate::kernels::attention::MASKED;
use crate::kernels::{self as k, Act, Arch, AttnBias, AttnView, FlashShape, Half, KernelDevice};

/// The 16-bit type of umT5's matrices and GEMM inputs on a device unless asked otherwise:
/// f16. With bf16 matrices alone (f32 math on the CPU) the golden umT5 cases move by 1.2e-2
/// and 2.7e-2 from transformers' f32 output, past the 2e-2 reel holds the device to; f16's
/// three more mantissa bits stay near 3e-3. f16's range is the risk T5 is known for, and it
/// is kept away from: the residual stream and every GEMM output that joins it stay f32,
/// and the 16-bit values are RMS-normalised rows, attention outputs (averages of V) and
/// the gated activation. Should that last one ever overflow, the infinity reaches the
/// output and the encode fails with a message naming REEL_TEXT_DTYPE=bf16.
pub const DEFAULT_DTYPE: WDtype = WDtype::F16;

/// The storage type from `REEL_TEXT_DTYPE` (`f16` or `bf16`), else [`DEFAULT_DTYPE`].
pub fn dtype_from_env() -> Result<WDtype> {
    match std::env::var("REEL_TEXT_DTYPE") {
        Err(_) => Ok(DEFAULT_DTYPE),
        Ok(v) => match v.trim().to_ascii_lowercase().as_str() {
            "" => Ok(DEFAULT_DTYPE),
            "f16" | "fp16" | "float16" => Ok(WDtype::F16),
            "bf16" | "bfloat16" => Ok(WDtype::Bf16),
            other => Err(Error::invalid(format!(
                "REEL_TEXT_DTYPE={other}: the text encoder on a device stores f16 or bf16"
            ))),
        },
    }
}

/// The sizes of one device forward: batch and tokens (padded: 512 in Wan's pipeline).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TextShape {
    pub batch: usize,
    pub len: usize,
}

/// The device tensors of a config: per layer the concatenated qkv [3I, D], o [D, I], the
/// concatenated wi [2F, D], wo [D, F] (in `dtype`: f16 or bf16) and the two norm weights
/// (f32); the final norm.
pub fn device_weight_specs(c: &Umt5Config, dtype: WDtype) -> Vec<WeightSpec> {
    let (d, i, f) = (c.d_model, c.inner_dim(), c.d_ff);
    let spec = |name: String, len: usize, dtype: WDtype| WeightSpec { name, len, dtype };
    let mut v = Vec::new();
    for l in 0..c.num_layers {
        v.push(spec(format!("l{l}.qkv"), 3 * i * d, dtype));
        v.push(spec(format!("l{l}.o"), d * i, dtype));
        v.push(spec(format!("l{l}.wi"), 2 * f * d, dtype));
        v.push(spec(format!("l{l}.wo"), d * f, dtype));
    }
    for l in 0..c.num_layers {
        v.push(spec(format!("l{l}.ln_attn"), d, WDtype::F32));
        v.push(spec(format!("l{l}.ln_ff"), d, WDtype::F32));
    }
    v.push(spec("final_ln".into(), d, WDtype::F32));
    v
}

impl Umt5Encoder {
    /// Uploads the weights (see [`device_weight_specs`]; matrices in `dtype`, f16 or bf16)
    /// to `dev`, one tensor at a time from the memory map.
    pub fn upload(&self, dev: &KernelDevice, dtype: WDtype) -> Result<DeviceWeights> {
        if dtype == WDtype::F32 {
            return Err(Error::invalid(
                "the text encoder on a kernel device stores f16 or bf16, not f32",
            ));
        }
        let specs = device_weight_specs(&self.config, dtype);
        DeviceWeights::upload(dev, &specs, |s| self.device_tensor(&s.name))
    }

    fn device_tensor(&self, name: &str) -> Result<Vec<f32>> {
        if name == "final_ln" {
            return Ok(self.w(&self.final_ln)?.into_owned());
        }
        let bad = || Error::invalid(format!("unknown umT5 device tensor {name}"));
        let (layer, field) = name.split_once('.').ok_or_else(bad)?;
        let l: usize = layer
            .strip_prefix('l')
            .and_then(|n| n.parse().ok())
            .ok_or_else(bad)?;
        let ly = self.layers.get(l).ok_or_else(bad)?;
        let cat = |es: &[&crate::weights::TensorEntry]| -> Result<Vec<f32>> {
            let mut v = Vec::new();
            for e in es {
                v.extend_from_slice(&self.w(e)?);
            }
            Ok(v)
        };
        match field {
            "qkv" => cat(&[&ly.q, &ly.k, &ly.v]),
            "o" => cat(&[&ly.o]),
            "wi" => cat(&[&ly.wi_0, &ly.wi_1]),
            "wo" => cat(&[&ly.wo]),
            "ln_attn" => cat(&[&ly.ln_attn]),
            "ln_ff" => cat(&[&ly.ln_ff]),
            _ => Err(bad()),
        }
    }

    /// last_hidden_state [B, L, D] on `dev` with weights from [`Umt5Encoder::upload`], like
    /// [`Umt5Encoder::forward`]. Plans and allocates a session for the call.
    pub fn forward_on(
        &self,
        dev: &KernelDevice,
        w: &DeviceWeights,
        ids: &[i64],
        mask: &[i64],
        batch: usize,
        len: usize,
    ) -> Result<crate::Tensor> {
        self.check_inputs(ids, mask, batch, len)?;
        let mut session = Umt5Session::new(dev, self, TextShape { batch, len })?;
        session.encode(self, w, ids, mask)
    }

    /// Relative-position biases of every layer for `len` tokens: [layers][heads, 2·len − 1],
    /// entry (h, j − i + len − 1) = table[bucket(j − i), h].
    fn rel_biases(&self, len: usize) -> Result<Vec<Vec<f32>>> {
        let c = &self.config;
        let span = 2 * len - 1;
        let buckets: Vec<usize> = (0..span)
            .map(|o| {
                relative_position_bucket(
                    o as i64 - (len as i64 - 1),
                    c.relative_attention_num_buckets,
                    c.relative_attention_max_distance,
                )
            })
            .collect();
        self.layers
            .iter()
            .map(|ly| {
                let table = self.w(&ly.rel_bias)?; // [num_buckets, heads]
                let mut v = Vec::with_capacity(c.num_heads * span);
                for h in 0..c.num_heads {
                    v.extend(buckets.iter().map(|&b| table[b * c.num_heads + h]));
                }
                Ok(v)
            })
            .collect()
    }
}

/// C = act(A·Wᵀ) for a context view and a device weight.
fn linear<T: Half, O: k::gemm::GemmOut>(
    ctx: &Ctx,
    w: &DeviceWeights,
    name: &str,
    a: View<T>,
    out: View<O>,
    (m, n, kk): (usize, usize, usize),
) -> Result<()> {
    crate::gpu::gemm::gemm(
        ctx.dev(),
        (ctx.slice(a), kk),
        (w.half::<T>(name)?, kk),
        None,
        (ctx.slice(out), n),
        (m, n, kk),
        Act::None,
    )?;
    Ok(())
}

/// Phase "bias": the persistent relative-position biases of every layer (`rel`: their
/// values, or None while measuring).
fn bias_phase(
    ctx: &mut Ctx,
    c: &Umt5Config,
    s: TextShape,
    rel: Option<&[Vec<f32>]>,
) -> Result<Vec<View<f32>>> {
    ctx.phase("bias")?;
    let span = 2 * s.len - 1;
    let mut views = Vec::with_capacity(c.num_layers);
    for l in 0..c.num_layers {
        let v = ctx.persistent::<f32>(&format!("l{l}.rel_bias"), c.num_heads * span)?;
        match rel {
            Some(r) => ctx.upload(v, &r[l])?,
            None => ctx.upload(v, &vec![0.0; c.num_heads * span])?,
        }
        views.push(v);
    }
    Ok(views)
}

/// Phase "encode": hidden [B·L, D] f32 (the embedded tokens) and the key biases [B, L] →
/// last_hidden_state [B·L, D] f32 on the host.
fn encode_phase<T: Half + k::NormOut + k::gemm::GemmOut>(
    ctx: &mut Ctx,
    c: &Umt5Config,
    w: &DeviceWeights,
    s: TextShape,
    rel: &[View<f32>],
    embedded: &[f32],
    key_bias: &[f32],
) -> Result<Vec<f32>> {
    let (d, inner, f) = (c.d_model, c.inner_dim(), c.d_ff);
    let bl = s.batch * s.len;
    let eps = c.layer_norm_epsilon as f32;
    ctx.phase("encode")?;
    let h = ctx.temp::<f32>("hidden", bl * d)?;
    ctx.upload(h, embedded)?;
    let kb = ctx.temp::<f32>("key_bias", s.batch * s.len)?;
    ctx.upload(kb, key_bias)?;
    let dev = ctx.dev().clone();
    let n = ctx.temp::<T>("norm", bl * d)?;
    if !rel.is_empty() {
        k::t5_add_norm(
            &dev,
            ctx.slice(h),
            None,
            w.f32("l0.ln_attn")?,
            ctx.slice(n),
            d,
            eps,
        )?;
    }
    let shape = FlashShape {
        batch: s.batch,
        heads: c.num_heads,
        head_dim: c.d_kv,
        lq: s.len,
        lk: s.len,
        scale: 1.0, // T5 does not scale its logits
    };
    let out = ctx.temp::<f32>("last_hidden_state", bl * d)?;
    for (l, &rb) in rel.iter().enumerate() {
        let _range = ctx.range(&format!("umT5 layer {l}"));
        let p = |n: &str| format!("l{l}.{n}");
        let qkv = ctx.temp::<T>(&p("qkv"), bl * 3 * inner)?;
        linear(ctx, w, &p("qkv"), n, qkv, (bl, 3 * inner, d))?;
        let o = ctx.temp::<T>(&p("attn"), bl * inner)?;
        let view = |col: usize| AttnView::packed(col, 3 * inner, s.len);
        k::flash_attention_biased(
            &dev,
            (ctx.slice(qkv), view(0)),
            (ctx.slice(qkv), view(inner)),
            (ctx.slice(qkv), view(2 * inner)),
            (ctx.slice(o), AttnView::packed(0, inner, s.len)),
            shape,
            AttnBias {
                rel: ctx.slice(rb),
                key: ctx.slice(kb),
            },
        )?;
        let y = ctx.temp::<f32>(&p("attn_out"), bl * d)?;
        linear(ctx, w, &p("o"), o, y, (bl, d, inner))?;
        k::t5_add_norm(
            &dev,
            ctx.slice(h),
            Some(ctx.slice(y)),
            w.f32(&p("ln_ff"))?,
            ctx.slice(n),
            d,
            eps,
        )?;
        let g = ctx.temp::<f32>(&p("wi"), bl * 2 * f)?;
        linear(ctx, w, &p("wi"), n, g, (bl, 2 * f, d))?;
        let gg = ctx.temp::<T>(&p("gated"), bl * f)?;
        k::t5_gated_gelu(&dev, ctx.slice(g), ctx.slice(gg), f)?;
        let y = ctx.temp::<f32>(&p("ffn_out"), bl * d)?;
        linear(ctx, w, &p("wo"), gg, y, (bl, d, f))?;
        // The residual, then the next layer's attention norm (or the final norm, f32).
        if l + 1 < rel.len() {
            k::t5_add_norm(
                &dev,
                ctx.slice(h),
                Some(ctx.slice(y)),
                w.f32(&format!("l{}.ln_attn", l + 1))?,
                ctx.slice(n),
                d,
                eps,
            )?;
        } else {
            k::t5_add_norm(
                &dev,
                ctx.slice(h),
                Some(ctx.slice(y)),
                w.f32("final_ln")?,
                ctx.slice(out),
                d,
                eps,
            )?;
        }
    }
    if rel.is_empty() {
        // No layers: the final norm of the embeddings.
        k::t5_add_norm(
            &dev,
            ctx.slice(h),
            None,
            w.f32("final_ln")?,
            ctx.slice(out),
            d,
            eps,
        )?;
    }
    ctx.download(out)
}

fn check_shape(c: &Umt5Config, s: TextShape) -> Result<()> {
    if s.batch == 0 || s.len == 0 || s.len > u16::MAX as usize {
        return Err(Error::invalid(format!(
            "umT5 shape {s:?}: batch and tokens must be 1 or more (tokens at most 65535)"
        )));
    }
    if c.d_kv % 2 != 0 || c.d_kv > 128 {
        return Err(Error::invalid(format!(
            "umT5 on a device: d_kv = {} must be even and at most 128",
            c.d_kv
        )));
    }
    Ok(())
}

/// The memory plan of an encode at `s` on `arch` (weights as addresses only; f16 and bf16
/// take the same bytes).
pub fn plan(c: &Umt5Config, s: TextShape, arch: Arch) -> Result<MemoryPlan> {
    plan_as::<f16>(c, s, arch)
}

fn plan_as<T: Half + k::NormOut + k::gemm::GemmOut>(
    c: &Umt5Config,
    s: TextShape,
    arch: Arch,
) -> Result<MemoryPlan> {
    check_shape(c, s)?;
    let w = DeviceWeights::measure(&device_weight_specs(c, WDtype::half::<T>()))?;
    let mut ctx = Ctx::measure(arch);
    let rel = bias_phase(&mut ctx, c, s, None)?;
    let bl = s.batch * s.len;
    encode_phase::<T>(
        &mut ctx,
        c,
        &w,
        s,
        &rel,
        &vec![0.0; bl * c.d_model],
        &vec![0.0; bl],
    )?;
    ctx.finish()
}

/// Bytes of the device weights of a config (16-bit matrices, f32 norms).
pub fn weight_bytes(c: &Umt5Config) -> Result<usize> {
    DeviceWeights::bytes_of(&device_weight_specs(c, DEFAULT_DTYPE))
}

/// umT5 on a device for one shape: the plan, its allocations and the relative-position
/// biases (made once).
pub struct Umt5Session {
    config: Umt5Config,
    shape: TextShape,
    plan: MemoryPlan,
    ctx: Ctx,
    rel: Vec<View<f32>>,
}

impl Umt5Session {
    /// Plans `shape` for `dev`, allocates what the plan says and uploads the encoder's
    /// relative-position biases.
    pub fn new(dev: &KernelDevice, enc: &Umt5Encoder, shape: TextShape) -> Result<Self> {
        check_shape(&enc.config, shape)?;
        Self::with_biases(dev, &enc.config, shape, &enc.rel_biases(shape.len)?)
    }

    /// [`Umt5Session::new`] from a config and the relative-position biases of every layer,
    /// [heads, 2·len − 1] each (a benchmark's random ones, without a checkpoint).
    pub fn with_biases(
        dev: &KernelDevice,
        c: &Umt5Config,
        shape: TextShape,
        biases: &[Vec<f32>],
    ) -> Result<Self> {
        let plan = plan(c, shape, dev.arch()?)?;
        let span = c.num_heads * (2 * shape.len - 1);
        if biases.len() != c.num_layers || biases.iter().any(|b| b.len() != span) {
            return Err(Error::invalid(format!(
                "umT5 session: {} bias tables, want {} of [{}, {}]",
                biases.len(),
                c.num_layers,
                c.num_heads,
                2 * shape.len - 1
            )));
        }
        let mut ctx = Ctx::run(dev.clone(), plan.clone())?;
        let rel = bias_phase(&mut ctx, c, shape, Some(biases))?;
        Ok(Umt5Session {
            config: c.clone(),
            shape,
            plan,
            ctx,
            rel,
        })
    }

    pub fn plan(&self) -> &MemoryPlan {
        &self.plan
    }

    /// Bytes the session allocated (the plan's arena + persistent bytes).
    pub fn allocated_bytes(&self) -> usize {
        self.ctx.allocated_bytes()
    }

    /// last_hidden_state [B, L, D] of ids, mask: [B, L] (the session's shape) with weights
    /// from [`Umt5Encoder::upload`] (their dtype decides the activations'); `enc` is the
    /// encoder the session was made for (its embedding rows are read on the host).
    pub fn encode(
        &mut self,
        enc: &Umt5Encoder,
        w: &DeviceWeights,
        ids: &[i64],
        mask: &[i64],
    ) -> Result<crate::Tensor> {
        let TextShape { batch, len } = self.shape;
        if enc.config != self.config {
            return Err(Error::invalid(
                "umT5 session: the encoder's config is not the session's",
            ));
        }
        let rows = enc.check_inputs(ids, mask, batch, len)?;
        let embedded = enc.store.f32_rows(&enc.embed, &rows)?;
        let out = self.encode_embedded(w, &embedded, mask)?;
        crate::Tensor::new(vec![batch, len, self.config.d_model], out)
    }

    /// The forward from embedded tokens [B·L, D] (f32) and the mask [B, L] (1 = token):
    /// last_hidden_state [B·L, D] on the host.
    pub fn encode_embedded(
        &mut self,
        w: &DeviceWeights,
        embedded: &[f32],
        mask: &[i64],
    ) -> Result<Vec<f32>> {
        let TextShape { batch, len } = self.shape;
        if embedded.len() != batch * len * self.config.d_model || mask.len() != batch * len {
            return Err(Error::invalid(format!(
                "umT5 encode: {} embedded values and {} mask values for [{batch}, {len}, {}]",
                embedded.len(),
                mask.len(),
                self.config.d_model
            )));
        }
        let key_bias: Vec<f32> = mask
            .iter()
            .map(|&m| if m > 0 { 0.0 } else { MASKED })
            .collect();
        let dtype = w.dtype_of("final_ln").and(w.dtype_of("l0.qkv"));
        let _range = self.ctx.range("umT5 encode");
        let (ctx, c, s, rel) = (&mut self.ctx, &self.config, self.shape, &self.rel);
        let out = match dtype {
            Some(WDtype::Bf16) => {
                encode_phase::<half::bf16>(ctx, c, w, s, rel, embedded, &key_bias)?
            }
            Some(WDtype::F16) => encode_phase::<f16>(ctx, c, w, s, rel, embedded, &key_bias)?,
            _ if c.num_layers == 0 => encode_phase::<f16>(ctx, c, w, s, rel, embedded, &key_bias)?,
            _ => {
                return Err(Error::invalid(
                    "these device weights are not umT5's (upload them with Umt5Encoder::upload)",
                ))
            }
        };
        if out.iter().any(|v| !v.is_finite()) {
            return Err(Error::invalid(format!(
                "umT5 on {}: the output holds non-finite values (a 16-bit activation overflowed{}); \
                 REEL_TEXT_DTYPE=bf16 trades precision for range",
                self.ctx.dev().describe(),
                if dtype == Some(WDtype::F16) { " f16" } else { "" }
            )));
        }
        Ok(out)
    }
}

//! The Wan DiT on a kernel device (cuda or emu), through the GPU runtime ([`crate::gpu`]).
//! It reads top to bottom like the CPU forward (cpu.rs) with the same shapes; what differs:
//!
//! - storage is bf16 (activations, matrices) with f32 accumulation; the modulation tables,
//!   the timestep embedding, the norms' statistics, the RoPE tables and the output head's
//!   result are f32, as diffusers keeps them;
//! - q, k and v come from one GEMM against the concatenated weights ([3D, D], biases
//!   included), and attention reads them in place from that [B·L, 3D] buffer;
//! - the text's cross-attention K/V of every block are projected once per prompt (phase
//!   "text", persistent buffers), not once per step;
//! - batched samples (the conditional and unconditional passes of guidance as B = 2) run
//!   in one pass.
//!
//! Phases (see [`crate::gpu::ctx`]): "text" uploads the prompt embeddings and the RoPE
//! tables and makes the cross-attention K/V; "step" uploads the latents and the timestep
//! embedding, runs the blocks and writes the flow prediction. The device weights are named
//! by [`device_weight_specs`].

use half::bf16;

use super::causal::{CausalWindow, ChunkModel};
use super::{Linear, WanDit, WanDitConfig};
use crate::cpu;
use crate::error::{Error, Result};
use crate::gpu::{Ctx, DeviceWeights, MemoryPlan, View, WDtype, WeightSpec};
use crate::kernels::dit::{self as kd, F32Act, PatchShape};
use crate::kernels::{self as k, Act, Arch, AttnView, FlashShape, KernelDevice, Rope};

/// The sizes of one device forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DitShape {
    pub batch: usize,
    /// Latent frames, height and width (multiples of the patch).
    pub frames: usize,
    pub height: usize,
    pub width: usize,
    /// Text tokens (512 in the pipeline).
    pub text_len: usize,
}

impl DitShape {
    /// The post-patch grid (frames, height, width).
    pub fn grid(&self, c: &WanDitConfig) -> [usize; 3] {
        let [pt, ph, pw] = c.patch_size;
        [self.frames / pt, self.height / ph, self.width / pw]
    }

    /// Video tokens of one sample.
    pub fn tokens(&self, c: &WanDitConfig) -> usize {
        self.grid(c).iter().product()
    }

    fn check(&self, c: &WanDitConfig) -> Result<()> {
        let [pt, ph, pw] = c.patch_size;
        if self.batch == 0
            || self.text_len == 0
            || self.frames == 0
            || self.height == 0
            || self.width == 0
            || self.frames % pt != 0
            || self.height % ph != 0
            || self.width % pw != 0
        {
            return Err(Error::invalid(format!(
                "DiT shape {self:?} is not whole patches of {:?}",
                c.patch_size
            )));
        }
        Ok(())
    }
}

/// The device tensors of a config: name, elements, dtype (matrices bf16, vectors f32).
pub fn device_weight_specs(c: &WanDitConfig) -> Vec<WeightSpec> {
    let d = c.inner_dim();
    let mut v = Vec::new();
    let mut m = |name: String, len: usize| {
        v.push(WeightSpec {
            name,
            len,
            dtype: WDtype::Bf16,
        })
    };
    let mut specs_f32: Vec<(String, usize)> = Vec::new();
    let cp = c.in_channels * c.patch_volume();
    let cout = c.out_channels() * c.patch_volume();
    m("patch.w".into(), d * cp);
    m("time1.w".into(), d * c.freq_dim);
    m("time2.w".into(), d * d);
    m("tproj.w".into(), 6 * d * d);
    m("text1.w".into(), d * c.text_dim);
    m("text2.w".into(), d * d);
    for i in 0..c.num_layers {
        m(format!("b{i}.qkv.w"), 3 * d * d);
        m(format!("b{i}.o.w"), d * d);
        for n in ["cq", "ck", "cv", "co"] {
            m(format!("b{i}.{n}.w"), d * d);
        }
        m(format!("b{i}.up.w"), c.ffn_dim * d);
        m(format!("b{i}.down.w"), d * c.ffn_dim);
    }
    m("out.w".into(), cout * d);
    for (n, len) in [
        ("patch.b", d),
        ("time1.b", d),
        ("time2.b", d),
        ("tproj.b", 6 * d),
        ("text1.b", d),
        ("text2.b", d),
    ] {
        specs_f32.push((n.into(), len));
    }
    for i in 0..c.num_layers {
        specs_f32.push((format!("b{i}.table"), 6 * d));
        specs_f32.push((format!("b{i}.qkv.b"), 3 * d));
        for n in [
            "norm_q", "norm_k", "o.b", "cq.b", "ck.b", "cv.b", "co.b", "cnorm_q", "cnorm_k",
            "down.b",
        ] {
            specs_f32.push((format!("b{i}.{n}"), d));
        }
        if c.cross_attn_norm {
            specs_f32.push((format!("b{i}.norm2.w"), d));
            specs_f32.push((format!("b{i}.norm2.b"), d));
        }
        specs_f32.push((format!("b{i}.up.b"), c.ffn_dim));
    }
    specs_f32.push(("head.table".into(), 2 * d));
    specs_f32.push(("out.b".into(), cout));
    v.extend(specs_f32.into_iter().map(|(name, len)| WeightSpec {
        name,
        len,
        dtype: WDtype::F32,
    }));
    v
}

impl WanDit {
    /// Uploads the weights to `dev` (bf16 matrices, f32 vectors; q/k/v concatenated),
    /// converting one tensor at a time from the memory map.
    pub fn upload(&self, dev: &KernelDevice) -> Result<DeviceWeights> {
        let specs = device_weight_specs(&self.config);
        let l = &self.layers;
        DeviceWeights::upload(dev, &specs, |s| self.device_tensor(l, &s.name))
    }

    /// The f32 values of device tensor `name` (see [`device_weight_specs`]).
    fn device_tensor(&self, l: &super::Layers, name: &str) -> Result<Vec<f32>> {
        let w = |lin: &Linear, bias: bool| -> Result<Vec<f32>> {
            Ok(if bias {
                self.w(&lin.b)?
            } else {
                self.w(&lin.w)?
            }
            .into_owned())
        };
        let (part, field) = name.split_once('.').unwrap_or((name, ""));
        let lin = |part: &str| -> Option<&Linear> {
            Some(match part {
                "patch" => &l.patch,
                "time1" => &l.time_1,
                "time2" => &l.time_2,
                "tproj" => &l.time_proj,
                "text1" => &l.text_1,
                "text2" => &l.text_2,
                "out" => &l.proj_out,
                _ => return None,
            })
        };
        if let Some(lin) = lin(part) {
            return w(lin, field == "b");
        }
        if name == "head.table" {
            return Ok(self.w(&l.scale_shift_table)?.into_owned());
        }
        let bad = || Error::invalid(format!("unknown device tensor {name}"));
        let i: usize = part
            .strip_prefix('b')
            .and_then(|n| n.parse().ok())
            .ok_or_else(bad)?;
        let blk = l.blocks.get(i).ok_or_else(bad)?;
        let (a1, a2) = (&blk.attn1, &blk.attn2);
        Ok(match field {
            "table" => self.w(&blk.scale_shift_table)?.into_owned(),
            "qkv.w" | "qkv.b" => {
                let bias = field == "qkv.b";
                let mut v = w(&a1.q, bias)?;
                v.extend(w(&a1.k, bias)?);
                v.extend(w(&a1.v, bias)?);
                v
            }
            "norm_q" => self.w(&a1.norm_q)?.into_owned(),
            "norm_k" => self.w(&a1.norm_k)?.into_owned(),
            "o.w" | "o.b" => w(&a1.o, field == "o.b")?,
            "cq.w" | "cq.b" => w(&a2.q, field == "cq.b")?,
            "ck.w" | "ck.b" => w(&a2.k, field == "ck.b")?,
            "cv.w" | "cv.b" => w(&a2.v, field == "cv.b")?,
            "co.w" | "co.b" => w(&a2.o, field == "co.b")?,
            "cnorm_q" => self.w(&a2.norm_q)?.into_owned(),
            "cnorm_k" => self.w(&a2.norm_k)?.into_owned(),
            "norm2.w" | "norm2.b" => {
                let (nw, nb) = blk.norm2.as_ref().ok_or_else(bad)?;
                self.w(if field == "norm2.w" { nw } else { nb })?
                    .into_owned()
            }
            "up.w" | "up.b" => w(&blk.ffn_up, field == "up.b")?,
            "down.w" | "down.b" => w(&blk.ffn_down, field == "down.b")?,
            _ => return Err(bad()),
        })
    }
}

/// The persistent buffers of a generation.
struct Views {
    x: View<f32>,
    t_freq: View<bf16>,
    text: View<bf16>,
    out: View<f32>,
    cos: View<f32>,
    sin: View<f32>,
    /// Cross-attention K and V of every block: [B·Lt, D] each.
    kv: Vec<(View<bf16>, View<bf16>)>,
}

/// C = act(A·Wᵀ + bias) for views of the context and a device weight.
#[allow(clippy::too_many_arguments)]
fn linear<O: k::gemm::GemmOut>(
    ctx: &Ctx,
    w: &DeviceWeights,
    name: &str,
    bias: bool,
    a: View<bf16>,
    out: View<O>,
    (m, n, kk): (usize, usize, usize),
    act: Act,
) -> Result<()> {
    let b = if bias {
        Some(w.f32(&format!("{name}.b"))?)
    } else {
        None
    };
    crate::gpu::gemm::gemm(
        ctx.dev(),
        (ctx.slice(a), kk),
        (w.bf16(&format!("{name}.w"))?, kk),
        b,
        (ctx.slice(out), n),
        (m, n, kk),
        act,
    )?;
    Ok(())
}

/// Phase "text": uploads the prompt embeddings [B, Lt, text_dim] and the RoPE tables,
/// embeds the text and projects every block's cross-attention K/V.
/// `prompts` texts of `s.text_len` tokens (the batch's samples; a block-causal session's
/// prompt and negative prompt, one sample each).
fn text_phase(
    ctx: &mut Ctx,
    c: &WanDitConfig,
    w: &DeviceWeights,
    s: DitShape,
    text: &[f32],
    prompts: usize,
) -> Result<Views> {
    let (d, hd) = (c.inner_dim(), c.attention_head_dim);
    let grid = s.grid(c);
    let (l, blt) = (s.tokens(c), prompts * s.text_len);
    if text.len() != blt * c.text_dim {
        return Err(Error::invalid(format!(
            "prompt embeddings: {} values for [{prompts}, {}, {}]",
            text.len(),
            s.text_len,
            c.text_dim
        )));
    }
    ctx.phase("text")?;
    let video = s.batch * c.in_channels * s.frames * s.height * s.width;
    let v = Views {
        x: ctx.persistent("x", video)?,
        t_freq: ctx.persistent("t_freq", s.batch * c.freq_dim)?,
        text: ctx.persistent("text", blt * c.text_dim)?,
        out: ctx.persistent(
            "sample",
            s.batch * c.out_channels() * s.frames * s.height * s.width,
        )?,
        cos: ctx.persistent("rope.cos", l * hd / 2)?,
        sin: ctx.persistent("rope.sin", l * hd / 2)?,
        kv: (0..c.num_layers)
            .map(|i| {
                Ok((
                    ctx.persistent(&format!("b{i}.cross_k"), blt * d)?,
                    ctx.persistent(&format!("b{i}.cross_v"), blt * d)?,
                ))
            })
            .collect::<Result<_>>()?,
    };
    let t16: Vec<bf16> = text.iter().map(|&x| bf16::from_f32(x)).collect();
    ctx.upload(v.text, &t16)?;
    let rope = cpu::wan_rope_tables(hd, grid[0], grid[1], grid[2], 10000.0);
    ctx.upload(v.cos, &rope.cos)?;
    ctx.upload(v.sin, &rope.sin)?;

    // ctx = Linear2(GELU-tanh(Linear1(text))): [B·Lt, D].
    let t1 = ctx.temp::<bf16>("text.hidden", blt * d)?;
    linear(
        ctx,
        w,
        "text1",
        true,
        v.text,
        t1,
        (blt, d, c.text_dim),
        Act::GeluTanh,
    )?;
    let emb = ctx.temp::<bf16>("text.emb", blt * d)?;
    linear(ctx, w, "text2", true, t1, emb, (blt, d, d), Act::None)?;
    let eps = c.eps as f32;
    for (i, &(kc, vc)) in v.kv.iter().enumerate() {
        // K: RMSNorm(emb·Wkᵀ + bk) (bias added inside the norm, as on the CPU); V: emb·Wvᵀ + bv.
        linear(
            ctx,
            w,
            &format!("b{i}.ck"),
            false,
            emb,
            kc,
            (blt, d, d),
            Act::None,
        )?;
        k::rms_norm_rope_bf16(
            ctx.dev(),
            ctx.slice(kc),
            d,
            Some(w.f32(&format!("b{i}.ck.b"))?),
            w.f32(&format!("b{i}.cnorm_k"))?,
            eps,
            None,
        )?;
        linear(
            ctx,
            w,
            &format!("b{i}.cv"),
            true,
            emb,
            vc,
            (blt, d, d),
            Act::None,
        )?;
    }
    Ok(v)
}

/// Phase "step", its inputs: the latents x [B, C, T, H, W] and the timestep embedding of
/// `timesteps` [B] into their persistent buffers (copies: outside the step's graph).
fn step_inputs(
    ctx: &mut Ctx,
    c: &WanDitConfig,
    s: DitShape,
    v: &Views,
    x: &[f32],
    timesteps: &[f32],
    first_frame: Option<usize>,
) -> Result<()> {
    if x.len() != v.x.len() || timesteps.len() != s.batch {
        return Err(Error::invalid(format!(
            "DiT step: {} latent values and {} timesteps for {s:?}",
            x.len(),
            timesteps.len()
        )));
    }
    ctx.phase("step")?;
    ctx.upload(v.x, x)?;
    let freq = cpu::timestep_embedding(timesteps, c.freq_dim, true, 0.0, 10000.0);
    let freq: Vec<bf16> = freq.iter().map(|&x| bf16::from_f32(x)).collect();
    ctx.upload(v.t_freq, &freq)?;
    if let Some(f0) = first_frame {
        // A block-causal chunk: its tokens' angles at their frames' absolute indices.
        let [t, h, wd] = s.grid(c);
        let rope = cpu::wan_rope_tables_at(c.attention_head_dim, f0, t, h, wd, 10000.0);
        ctx.upload(v.cos, &rope.cos)?;
        ctx.upload(v.sin, &rope.sin)?;
    }
    Ok(())
}

/// A block-causal chunk's self-attention inside [`step_body`]: per block, persistent K and
/// V buffers [rows, D] whose first `cached` rows hold the cached frames' K/V (after QK-norm
/// and RoPE); the chunk's K/V are projected straight into the rows after them and the
/// chunk's queries attend to all `cached + L` rows. `prompt` picks the cross-attention K/V
/// (0: the prompt, 1: the negative prompt). Batch 1.
#[derive(Clone, Copy)]
struct Chunk<'a> {
    cache: &'a [(View<bf16>, View<bf16>)],
    cached: usize,
    prompt: usize,
}

/// Phase "step", its launches (no copies, no synchronisation: a CUDA graph on cuda): the
/// flow prediction of the inputs lands in the persistent "sample" buffer.
fn step_body(
    ctx: &mut Ctx,
    c: &WanDitConfig,
    w: &DeviceWeights,
    s: DitShape,
    v: &Views,
    chunk: Option<Chunk<'_>>,
) -> Result<()> {
    let (d, f, hd) = (c.inner_dim(), c.ffn_dim, c.attention_head_dim);
    let (b, l, lt) = (s.batch, s.tokens(c), s.text_len);
    let bl = b * l;
    let eps = c.eps as f32;
    let dev = ctx.dev().clone();
    let patch = PatchShape {
        b,
        c: c.in_channels,
        t: s.frames,
        h: s.height,
        w: s.width,
        p: c.patch_size,
    };

    // Patch embedding: im2col + linear. h: [B·L, D], the residual stream.
    let cp = c.in_channels * c.patch_volume();
    let cols = ctx.temp::<bf16>("patch.cols", bl * cp)?;
    kd::patchify_bf16(&dev, ctx.slice(v.x), ctx.slice(cols), patch)?;
    let h = ctx.temp::<bf16>("hidden", bl * d)?;
    linear(ctx, w, "patch", true, cols, h, (bl, d, cp), Act::None)?;

    // Timestep: temb = Linear2(SiLU(Linear1(freq))) [B, D] f32; tproj = Linear(SiLU(temb))
    // [B, 6D] f32.
    let t1 = ctx.temp::<f32>("time.hidden", b * d)?;
    linear(
        ctx,
        w,
        "time1",
        true,
        v.t_freq,
        t1,
        (b, d, c.freq_dim),
        Act::None,
    )?;
    let t1a = ctx.temp::<bf16>("time.hidden_act", b * d)?;
    kd::act_f32_bf16(&dev, ctx.slice(t1), ctx.slice(t1a), F32Act::Silu)?;
    let temb = ctx.temp::<f32>("time.emb", b * d)?;
    linear(ctx, w, "time2", true, t1a, temb, (b, d, d), Act::None)?;
    let tact = ctx.temp::<bf16>("time.emb_act", b * d)?;
    kd::act_f32_bf16(&dev, ctx.slice(temb), ctx.slice(tact), F32Act::Silu)?;
    let tproj = ctx.temp::<f32>("time.proj", b * 6 * d)?;
    linear(ctx, w, "tproj", true, tact, tproj, (b, 6 * d, d), Act::None)?;

    let attn_shape = FlashShape {
        batch: b,
        heads: c.num_attention_heads,
        head_dim: hd,
        lq: l,
        lk: l,
        scale: 1.0 / (hd as f32).sqrt(),
    };
    // The cross-attention K/V of this pass's prompt(s).
    let (text_rows, prompt) = (b * lt * d, chunk.map_or(0, |ch| ch.prompt));
    for (i, &(kc, vc)) in v.kv.iter().enumerate() {
        let (kc, vc) = (
            kc.sub(prompt * text_rows, text_rows)?,
            vc.sub(prompt * text_rows, text_rows)?,
        );
        let _range = ctx.range(&format!("block {i}"));
        let p = |n: &str| format!("b{i}.{n}");
        // Modulation rows [6, B, D]: shift, 1 + scale, gate (attention), then the FFN's.
        let m = ctx.temp::<f32>(&p("modulation"), 6 * b * d)?;
        kd::modulation_f32(
            &dev,
            w.f32(&p("table"))?,
            ctx.slice(tproj),
            ctx.slice(m),
            (6, b, d),
            6 * d,
            d,
            0b10010,
        )?;
        let row = |j: usize| m.sub(j * b * d, b * d);

        // 1. Self-attention.
        let n = ctx.temp::<bf16>(&p("norm1"), bl * d)?;
        k::layernorm_modulate_bf16(
            &dev,
            ctx.slice(h),
            ctx.slice(n),
            d,
            ctx.slice(row(1)?),
            ctx.slice(row(0)?),
            l,
            eps,
        )?;
        // Q, K and V: one fused projection, or (a chunk) Q alone, K and V into the cache.
        let qkv = match chunk {
            Some(_) => ctx.temp::<bf16>(&p("q"), l * d)?,
            None => ctx.temp::<bf16>(&p("qkv"), bl * 3 * d)?,
        };
        let o = ctx.temp::<bf16>(&p("attn"), bl * d)?;
        let rope = Rope {
            cos: ctx.slice(v.cos),
            sin: ctx.slice(v.sin),
            head_dim: hd,
            tokens: l,
        };
        if let Some(ch) = chunk {
            // Q into a temporary, K and V into the cache rows after the cached frames.
            let (ck, cv) = ch.cache[i];
            let rows = ch.cached + l;
            let q = qkv;
            let (wqkv, bqkv) = (w.bf16(&p("qkv.w"))?, w.f32(&p("qkv.b"))?);
            let dests = [
                ctx.slice(q),
                ctx.slice(ck.sub(ch.cached * d, l * d)?),
                ctx.slice(cv.sub(ch.cached * d, l * d)?),
            ];
            for (part, out) in dests.into_iter().enumerate() {
                crate::gpu::gemm::gemm(
                    &dev,
                    (ctx.slice(n), d),
                    (wqkv.sub(part * d * d, d * d)?, d),
                    Some(bqkv.sub(part * d, d)?),
                    (out, d),
                    (l, d, d),
                    Act::None,
                )?;
            }
            for (x, norm) in [(dests[0], "norm_q"), (dests[1], "norm_k")] {
                k::norm::rms_norm_rope_rows_bf16(
                    &dev,
                    x,
                    (l, d, d),
                    None,
                    w.f32(&p(norm))?,
                    eps,
                    Some(Rope { ..rope }),
                )?;
            }
            let view = AttnView::packed(0, d, rows);
            k::flash_attention(
                &dev,
                (ctx.slice(q), AttnView::packed(0, d, l)),
                (ctx.slice(ck), view),
                (ctx.slice(cv), view),
                (ctx.slice(o), AttnView::packed(0, d, l)),
                None,
                FlashShape {
                    lk: rows,
                    ..attn_shape
                },
            )?;
        } else {
            linear(ctx, w, &p("qkv"), true, n, qkv, (bl, 3 * d, d), Act::None)?;
            for (part, norm) in [(0, "norm_q"), (1, "norm_k")] {
                k::norm::rms_norm_rope_rows_bf16(
                    &dev,
                    ctx.slice(qkv).sub(part * d, bl * 3 * d - part * d)?,
                    (bl, d, 3 * d),
                    None,
                    w.f32(&p(norm))?,
                    eps,
                    Some(Rope { ..rope }),
                )?;
            }
            let view = |col: usize| AttnView::packed(col, 3 * d, l);
            k::flash_attention(
                &dev,
                (ctx.slice(qkv), view(0)),
                (ctx.slice(qkv), view(d)),
                (ctx.slice(qkv), view(2 * d)),
                (ctx.slice(o), AttnView::packed(0, d, l)),
                None,
                attn_shape,
            )?;
        }
        let y = ctx.temp::<bf16>(&p("attn_out"), bl * d)?;
        linear(ctx, w, &p("o"), false, o, y, (bl, d, d), Act::None)?;
        k::residual_gate_bf16(
            &dev,
            ctx.slice(h),
            ctx.slice(y),
            d,
            Some(w.f32(&p("o.b"))?),
            Some(ctx.slice(row(2)?)),
            l,
        )?;

        // 2. Cross-attention to the text: LayerNorm (affine) or h itself; q RMS-normalised.
        let nc = if c.cross_attn_norm {
            let nc = ctx.temp::<bf16>(&p("norm2"), bl * d)?;
            k::layernorm_modulate_bf16(
                &dev,
                ctx.slice(h),
                ctx.slice(nc),
                d,
                w.f32(&p("norm2.w"))?,
                w.f32(&p("norm2.b"))?,
                bl,
                eps,
            )?;
            nc
        } else {
            h
        };
        let q = ctx.temp::<bf16>(&p("cross_q"), bl * d)?;
        linear(ctx, w, &p("cq"), false, nc, q, (bl, d, d), Act::None)?;
        k::rms_norm_rope_bf16(
            &dev,
            ctx.slice(q),
            d,
            Some(w.f32(&p("cq.b"))?),
            w.f32(&p("cnorm_q"))?,
            eps,
            None,
        )?;
        let oc = ctx.temp::<bf16>(&p("cross_attn"), bl * d)?;
        k::flash_attention(
            &dev,
            (ctx.slice(q), AttnView::packed(0, d, l)),
            (ctx.slice(kc), AttnView::packed(0, d, lt)),
            (ctx.slice(vc), AttnView::packed(0, d, lt)),
            (ctx.slice(oc), AttnView::packed(0, d, l)),
            None,
            FlashShape {
                lk: lt,
                ..attn_shape
            },
        )?;
        let yc = ctx.temp::<bf16>(&p("cross_out"), bl * d)?;
        linear(ctx, w, &p("co"), false, oc, yc, (bl, d, d), Act::None)?;
        k::residual_gate_bf16(
            &dev,
            ctx.slice(h),
            ctx.slice(yc),
            d,
            Some(w.f32(&p("co.b"))?),
            None,
            l,
        )?;

        // 3. FFN: GELU-tanh(LN(h)·(1 + scale) + shift)·W1ᵀ + b1)·W2ᵀ, gated.
        let n2 = ctx.temp::<bf16>(&p("norm3"), bl * d)?;
        k::layernorm_modulate_bf16(
            &dev,
            ctx.slice(h),
            ctx.slice(n2),
            d,
            ctx.slice(row(4)?),
            ctx.slice(row(3)?),
            l,
            eps,
        )?;
        let ff = ctx.temp::<bf16>(&p("ffn"), bl * f)?;
        linear(ctx, w, &p("up"), true, n2, ff, (bl, f, d), Act::GeluTanh)?;
        let yf = ctx.temp::<bf16>(&p("ffn_out"), bl * d)?;
        linear(ctx, w, &p("down"), false, ff, yf, (bl, d, f), Act::None)?;
        k::residual_gate_bf16(
            &dev,
            ctx.slice(h),
            ctx.slice(yf),
            d,
            Some(w.f32(&p("down.b"))?),
            Some(ctx.slice(row(5)?)),
            l,
        )?;
    }

    // Output head: LN(h)·(1 + scale) + shift with (shift, scale) = table + temb, proj_out
    // (f32), unpatchify.
    let hm = ctx.temp::<f32>("head.modulation", 2 * b * d)?;
    kd::modulation_f32(
        &dev,
        w.f32("head.table")?,
        ctx.slice(temb),
        ctx.slice(hm),
        (2, b, d),
        d,
        0,
        0b10,
    )?;
    let nh = ctx.temp::<bf16>("head.norm", bl * d)?;
    k::layernorm_modulate_bf16(
        &dev,
        ctx.slice(h),
        ctx.slice(nh),
        d,
        ctx.slice(hm.sub(b * d, b * d)?),
        ctx.slice(hm.sub(0, b * d)?),
        l,
        eps,
    )?;
    let cout = c.out_channels() * c.patch_volume();
    let yo = ctx.temp::<f32>("head.out", bl * cout)?;
    linear(ctx, w, "out", true, nh, yo, (bl, cout, d), Act::None)?;
    kd::unpatchify_f32(
        &dev,
        ctx.slice(yo),
        ctx.slice(v.out),
        PatchShape {
            c: c.out_channels(),
            ..patch
        },
    )?;
    Ok(())
}

/// A DiT on a device for one shape: the measured plan, its allocations, and the persistent
/// buffers of the current prompt.
pub struct DitSession {
    config: WanDitConfig,
    shape: DitShape,
    plan: MemoryPlan,
    ctx: Ctx,
    views: Option<Views>,
    eager: bool,
}

/// The memory plan of a generation at `shape` on `arch`: one text phase and one step,
/// measured without running anything (weights included only as addresses).
pub fn plan(c: &WanDitConfig, s: DitShape, arch: Arch) -> Result<MemoryPlan> {
    s.check(c)?;
    let w = DeviceWeights::measure(&device_weight_specs(c))?;
    let mut ctx = Ctx::measure(arch);
    let text = vec![0.0f32; s.batch * s.text_len * c.text_dim];
    let v = text_phase(&mut ctx, c, &w, s, &text, s.batch)?;
    let x = vec![0.0f32; v.x.len()];
    step_inputs(&mut ctx, c, s, &v, &x, &vec![0.0; s.batch], None)?;
    step_body(&mut ctx, c, &w, s, &v, None)?;
    ctx.finish()
}

impl DitSession {
    /// Plans `shape` for `dev` and allocates what the plan says.
    pub fn new(dev: &KernelDevice, c: &WanDitConfig, shape: DitShape) -> Result<Self> {
        let plan = plan(c, shape, dev.arch()?)?;
        let ctx = Ctx::run(dev.clone(), plan.clone())?;
        Ok(DitSession {
            config: c.clone(),
            shape,
            plan,
            ctx,
            views: None,
            eager: false,
        })
    }

    /// Runs every step's launches one by one instead of replaying the step's CUDA graph
    /// (for per-op timing; cuda only: emu always runs them one by one).
    pub fn set_eager(&mut self, eager: bool) {
        self.eager = eager;
    }

    pub fn plan(&self) -> &MemoryPlan {
        &self.plan
    }

    /// Bytes the session allocated (must equal the plan's arena + persistent bytes).
    pub fn allocated_bytes(&self) -> usize {
        self.ctx.allocated_bytes()
    }

    /// Sets the prompt embeddings [B, Lt, text_dim] (f32 on the host): uploads them and
    /// projects the cross-attention K/V of every block.
    pub fn set_text(&mut self, w: &DeviceWeights, text: &[f32]) -> Result<()> {
        self.views = Some(text_phase(
            &mut self.ctx,
            &self.config,
            w,
            self.shape,
            text,
            self.shape.batch,
        )?);
        Ok(())
    }

    /// One forward: latents x [B, C, T, H, W] at `timesteps` [B] → the flow prediction
    /// [B, C_out, T, H, W] (f32, copied to the host).
    pub fn step(&mut self, w: &DeviceWeights, x: &[f32], timesteps: &[f32]) -> Result<Vec<f32>> {
        let v = self
            .views
            .as_ref()
            .ok_or_else(|| Error::invalid("DiT step before set_text"))?;
        let _range = self.ctx.range("DiT step");
        step_inputs(
            &mut self.ctx,
            &self.config,
            self.shape,
            v,
            x,
            timesteps,
            None,
        )?;
        let (c, s) = (&self.config, self.shape);
        self.ctx.graph("step", w.stamp(), self.eager, |ctx| {
            step_body(ctx, c, w, s, v, None)
        })?;
        let out = v.out;
        self.ctx.download(out)
    }
}

impl WanDit {
    /// One forward on a kernel device with uploaded weights `w`: x [B, C, T, H, W],
    /// timestep [B], text [B, Lt, text_dim] → [B, C_out, T, H, W]. Plans and allocates a
    /// session for the call (a pipeline keeps one [`DitSession`] across steps instead).
    pub fn forward_on(
        &self,
        dev: &KernelDevice,
        w: &DeviceWeights,
        x: &crate::Tensor,
        timestep: &crate::Tensor,
        text: &crate::Tensor,
    ) -> Result<crate::Tensor> {
        let (batch, _) = self.check_inputs(x.shape(), timestep.shape(), text.shape())?;
        let s = x.shape();
        let shape = DitShape {
            batch,
            frames: s[2],
            height: s[3],
            width: s[4],
            text_len: text.shape()[1],
        };
        let mut session = DitSession::new(dev, &self.config, shape)?;
        session.set_text(w, text.data())?;
        let out = session.step(w, x.data(), timestep.data())?;
        crate::Tensor::new(
            vec![batch, self.config.out_channels(), s[2], s[3], s[4]],
            out,
        )
    }
}

/// The self-attention K/V buffers of a block-causal session, in their own phase: per block,
/// K and V of `local_frames` frames (the sink, the window and the chunk's own), whatever
/// the video's length.
fn cache_phase(
    ctx: &mut Ctx,
    c: &WanDitConfig,
    s: DitShape,
    window: &CausalWindow,
) -> Result<Vec<(View<bf16>, View<bf16>)>> {
    ctx.phase("cache")?;
    let [_, h, w] = s.grid(c);
    let rows = window.local_frames * h * w;
    let d = c.inner_dim();
    (0..c.num_layers)
        .map(|i| {
            Ok((
                ctx.persistent(&format!("b{i}.self_k"), rows * d)?,
                ctx.persistent(&format!("b{i}.self_v"), rows * d)?,
            ))
        })
        .collect()
}

/// Checks a block-causal session's sizes: batch 1, a chunk's frames, a temporal patch of 1,
/// one or two prompts.
fn check_causal(
    c: &WanDitConfig,
    window: &CausalWindow,
    s: DitShape,
    prompts: usize,
) -> Result<()> {
    s.check(c)?;
    window.check().map_err(Error::invalid)?;
    if c.patch_size[0] != 1 {
        return Err(Error::invalid(format!(
            "block-causal generation needs a temporal patch of 1, the model's is {}",
            c.patch_size[0]
        )));
    }
    if s.batch != 1 || s.frames != window.chunk_frames || !(1..=2).contains(&prompts) {
        return Err(Error::invalid(format!(
            "a block-causal session runs one sample of {} latent frames with 1 or 2 prompts, not {s:?} with {prompts}",
            window.chunk_frames
        )));
    }
    Ok(())
}

/// The memory plan of a block-causal generation on `arch` (see [`CausalSession`]): the
/// caches, one text phase for `prompts` prompts and one chunk step with the cache full.
/// The video's length is not an input: memory is the same for a second or an hour.
pub fn plan_causal(
    c: &WanDitConfig,
    window: &CausalWindow,
    s: DitShape,
    prompts: usize,
    arch: Arch,
) -> Result<MemoryPlan> {
    check_causal(c, window, s, prompts)?;
    let w = DeviceWeights::measure(&device_weight_specs(c))?;
    let mut ctx = Ctx::measure(arch);
    let cache = cache_phase(&mut ctx, c, s, window)?;
    let text = vec![0.0f32; prompts * s.text_len * c.text_dim];
    let v = text_phase(&mut ctx, c, &w, s, &text, prompts)?;
    let x = vec![0.0f32; v.x.len()];
    step_inputs(&mut ctx, c, s, &v, &x, &[0.0], Some(0))?;
    let [_, h, wd] = s.grid(c);
    let chunk = Chunk {
        cache: &cache,
        cached: window.cached_frames() * h * wd,
        prompt: prompts - 1,
    };
    step_body(&mut ctx, c, &w, s, &v, Some(chunk))?;
    ctx.finish()
}

/// A block-causal DiT on a device ([`super::causal`]'s model): one chunk of latent frames
/// at a time (batch 1), each block's self-attention K/V of the cached frames in persistent
/// buffers of `local_frames` frames ([`plan_causal`]). Attention does not depend on the
/// order of its keys, so the cache is a set of frame slots: a chunk's K/V are projected
/// into the slots after the cached ones, and after the context pass the frames that leave
/// the window are overwritten by the new ones that stay (a device copy per frame moved).
pub struct CausalSession {
    config: WanDitConfig,
    window: CausalWindow,
    shape: DitShape,
    prompts: usize,
    plan: MemoryPlan,
    ctx: Ctx,
    cache: Vec<(View<bf16>, View<bf16>)>,
    views: Option<Views>,
    /// The absolute frame each cache slot holds (slot i: rows i·tokens per frame ..).
    slots: Vec<usize>,
    eager: bool,
}

impl CausalSession {
    /// Plans a session for chunks of `shape` (batch 1, `window.chunk_frames` frames) with
    /// `prompts` prompts (2 for guidance: the prompt and the negative prompt) and allocates
    /// what the plan says.
    pub fn new(
        dev: &KernelDevice,
        c: &WanDitConfig,
        window: CausalWindow,
        shape: DitShape,
        prompts: usize,
    ) -> Result<Self> {
        let plan = plan_causal(c, &window, shape, prompts, dev.arch()?)?;
        let mut ctx = Ctx::run(dev.clone(), plan.clone())?;
        let cache = cache_phase(&mut ctx, c, shape, &window)?;
        Ok(CausalSession {
            config: c.clone(),
            window,
            shape,
            prompts,
            plan,
            ctx,
            cache,
            views: None,
            slots: Vec::new(),
            eager: false,
        })
    }

    /// See [`DitSession::set_eager`].
    pub fn set_eager(&mut self, eager: bool) {
        self.eager = eager;
    }

    pub fn plan(&self) -> &MemoryPlan {
        &self.plan
    }

    /// Bytes the session allocated (the plan's arena + persistent bytes).
    pub fn allocated_bytes(&self) -> usize {
        self.ctx.allocated_bytes()
    }

    /// The frames whose K/V the cache holds, in slot order.
    pub fn cached_frames(&self) -> &[usize] {
        &self.slots
    }

    /// Sets the prompts' embeddings [prompts, Lt, text_dim] (the prompt first) and projects
    /// every block's cross-attention K/V. Forgets the cache: a new video starts.
    pub fn set_text(&mut self, w: &DeviceWeights, text: &[f32]) -> Result<()> {
        self.views = Some(text_phase(
            &mut self.ctx,
            &self.config,
            w,
            self.shape,
            text,
            self.prompts,
        )?);
        self.slots.clear();
        Ok(())
    }

    /// Runs chunk x [1, C, c, H, W] (f32) starting at latent frame `first_frame` at
    /// timestep `t` with prompt `prompt`: its K/V land in the slots after the cached ones.
    fn run(
        &mut self,
        w: &DeviceWeights,
        x: &[f32],
        t: f32,
        first_frame: usize,
        prompt: usize,
    ) -> Result<()> {
        let Self {
            config: c,
            shape: s,
            ctx,
            cache,
            views,
            slots,
            eager,
            ..
        } = self;
        let v = views
            .as_ref()
            .ok_or_else(|| Error::invalid("DiT chunk before set_text"))?;
        if prompt >= self.prompts {
            return Err(Error::invalid(format!(
                "prompt {prompt} of a session made for {}",
                self.prompts
            )));
        }
        if let Some(&f) = slots.iter().find(|&&f| f >= first_frame) {
            return Err(Error::invalid(format!(
                "chunk at frame {first_frame}: the cache already holds frame {f}"
            )));
        }
        if first_frame + s.frames > c.rope_max_seq_len {
            return Err(Error::invalid(format!(
                "latent frame {} is past the model's rope_max_seq_len = {} positions",
                first_frame + s.frames,
                c.rope_max_seq_len
            )));
        }
        let _range = ctx.range("DiT chunk");
        step_inputs(ctx, c, *s, v, x, &[t], Some(first_frame))?;
        let [_, h, wd] = s.grid(c);
        let chunk = Chunk {
            cache,
            cached: slots.len() * h * wd,
            prompt,
        };
        // One graph per cache fill and prompt (the attention's length and the text K/V
        // differ); once the window is full, the same ones replay for the rest of the video.
        let key = format!("chunk {} {prompt}", slots.len());
        let (c, s) = (&*c, *s);
        ctx.graph(&key, w.stamp(), *eager, |ctx| {
            step_body(ctx, c, w, s, v, Some(chunk))
        })
    }

    /// The flow prediction [1, C_out, c, H, W] (f32, on the host) of chunk x [1, C, c, H, W]
    /// starting at latent frame `first_frame`, at timestep `t`, with prompt `prompt`
    /// (0: the prompt, 1: the negative prompt), over the cached frames.
    pub fn flow(
        &mut self,
        w: &DeviceWeights,
        x: &[f32],
        t: f32,
        first_frame: usize,
        prompt: usize,
    ) -> Result<Vec<f32>> {
        self.run(w, x, t, first_frame, prompt)?;
        let out = self
            .views
            .as_ref()
            .map(|v| v.out)
            .ok_or_else(|| Error::invalid("DiT chunk before set_text"))?;
        self.ctx.download(out)
    }

    /// Runs the clean chunk x at timestep `t` with the prompt, keeps its K/V and evicts the
    /// frames no later chunk attends to (as [`super::KvCache`] does on the CPU).
    pub fn cache_chunk(
        &mut self,
        w: &DeviceWeights,
        x: &[f32],
        t: f32,
        first_frame: usize,
    ) -> Result<()> {
        self.run(w, x, t, first_frame, 0)?;
        let c = self.window.chunk_frames;
        let mut all = self.slots.clone();
        all.extend(first_frame..first_frame + c);
        let keep: Vec<usize> = self.window.attended(first_frame + c).collect();
        let n = keep.len();
        // Kept frames in slots past the first n move into the slots of evicted ones.
        let holes: Vec<usize> = (0..n).filter(|&p| !keep.contains(&all[p])).collect();
        let movers: Vec<usize> = (n..all.len()).filter(|&p| keep.contains(&all[p])).collect();
        let [_, h, wd] = self.shape.grid(&self.config);
        let frame = h * wd * self.config.inner_dim();
        for (&hole, &from) in holes.iter().zip(&movers) {
            for &(k_buf, v_buf) in &self.cache {
                for buf in [k_buf, v_buf] {
                    crate::kernels::copy(
                        self.ctx.dev(),
                        self.ctx.slice(buf.sub(from * frame, frame)?),
                        self.ctx.slice(buf.sub(hole * frame, frame)?),
                    )?;
                }
            }
            all[hole] = all[from];
        }
        all.truncate(n);
        self.slots = all;
        Ok(())
    }
}

/// A [`CausalSession`] with its weights as a [`ChunkModel`] for [`super::stream_with`].
pub struct DeviceChunks<'a> {
    pub session: &'a mut CausalSession,
    pub weights: &'a DeviceWeights,
}

impl ChunkModel for DeviceChunks<'_> {
    fn flow(
        &mut self,
        x: &crate::Tensor,
        t: f32,
        first_frame: usize,
        negative: bool,
    ) -> Result<crate::Tensor> {
        let out = self
            .session
            .flow(self.weights, x.data(), t, first_frame, negative as usize)?;
        let s = self.session.shape;
        crate::Tensor::new(
            vec![
                1,
                self.session.config.out_channels(),
                s.frames,
                s.height,
                s.width,
            ],
            out,
        )
    }

    fn cache(&mut self, x: &crate::Tensor, t: f32, first_frame: usize) -> Result<()> {
        self.session
            .cache_chunk(self.weights, x.data(), t, first_frame)
    }
}

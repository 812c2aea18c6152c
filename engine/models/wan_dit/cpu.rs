//! The Wan DiT on the cpu device: the float32 reference forward (diffusers parity).

use std::borrow::Cow;

use super::causal::{concat_rows, Causal};
use super::{Block, Linear, TensorEntry, WanDit};
use crate::cpu::{self, AttnShape, RopeTables};
use crate::error::Result;
use crate::tensor::{zeroed, Tensor};

impl WanDit {
    pub(super) fn w(&self, e: &TensorEntry) -> Result<Cow<'_, [f32]>> {
        Ok(self.store.f32(e)?)
    }

    /// out[m, n_out] = x[m, n_in] · Wᵀ (+ bias when `with_bias`).
    fn linear(
        &self,
        l: &Linear,
        x: &[f32],
        m: usize,
        out: &mut [f32],
        with_bias: bool,
    ) -> Result<()> {
        let w = self.w(&l.w)?;
        let b = if with_bias { Some(self.w(&l.b)?) } else { None };
        cpu::linear(
            x,
            &w,
            b.as_deref(),
            m,
            l.n_in,
            l.n_out,
            &mut out[..m * l.n_out],
        );
        Ok(())
    }

    /// One forward pass. x: [B, C_in, T, H, W] latents; timestep: [B]; text: [B, Lt, text_dim]
    /// prompt embeddings (zero-padded rows included: they are attended, as in diffusers).
    /// Returns the flow prediction [B, C_out, T, H, W].
    pub fn forward(&self, x: &Tensor, timestep: &Tensor, text: &Tensor) -> Result<Tensor> {
        let kv = self.text_kv(text)?;
        self.forward_kv(x, timestep, &kv)
    }

    /// The text's part of a forward, the same at every denoising step: the embedded prompt
    /// and each block's cross-attention K (RMS-normalised) and V. A pipeline makes it once
    /// per generation and passes it to [`forward_kv`](Self::forward_kv) at every step.
    pub fn text_kv(&self, text: &Tensor) -> Result<TextKv> {
        let c = &self.config;
        let s = text.shape();
        if s.len() != 3 || s[0] == 0 || s[1] == 0 || s[2] != c.text_dim {
            return Err(crate::Error::invalid(format!(
                "encoder_hidden_states must be [B, L, {}] with L > 0, got {s:?}",
                c.text_dim
            )));
        }
        let (d, eps) = (c.inner_dim(), c.eps as f32);
        let blt = s[0] * s[1];
        // ctx = Linear2(GELU-tanh(Linear1(text))): [B·Lt, D].
        let mut ctx1 = vec![0.0f32; blt * d];
        self.linear(&self.layers.text_1, text.data(), blt, &mut ctx1, false)?;
        cpu::bias_gelu(&mut ctx1, &self.w(&self.layers.text_1.b)?);
        let mut ctx = vec![0.0f32; blt * d];
        self.linear(&self.layers.text_2, &ctx1, blt, &mut ctx, true)?;
        drop(ctx1);
        let mut blocks = Vec::with_capacity(self.layers.blocks.len());
        for blk in &self.layers.blocks {
            let a = &blk.attn2;
            let (mut kc, mut vc) = (vec![0.0f32; blt * d], vec![0.0f32; blt * d]);
            self.linear(&a.k, &ctx, blt, &mut kc, false)?;
            self.linear(&a.v, &ctx, blt, &mut vc, true)?;
            cpu::rms_norm_rope(
                &mut kc,
                d,
                Some(&self.w(&a.k.b)?),
                &self.w(&a.norm_k)?,
                eps,
                None,
            );
            blocks.push((kc, vc));
        }
        Ok(TextKv {
            shape: [s[0], s[1], s[2]],
            blocks,
        })
    }

    /// [`forward`](Self::forward) with the text's K/V already made ([`text_kv`](Self::text_kv)).
    pub fn forward_kv(&self, x: &Tensor, timestep: &Tensor, kv: &TextKv) -> Result<Tensor> {
        self.forward_kv_with_attention(x, timestep, kv, &mut cpu_attention)
    }

    /// [`forward`](Self::forward) with every self- and cross-attention computed by `attn`
    /// (q, k, v, out, shape: the arguments of [`cpu::attention`]), so a device's attention
    /// kernel can run inside the f32 reference and be checked against the golden data.
    pub fn forward_with_attention(
        &self,
        x: &Tensor,
        timestep: &Tensor,
        text: &Tensor,
        attn: &mut AttentionFn<'_>,
    ) -> Result<Tensor> {
        let kv = self.text_kv(text)?;
        self.forward_kv_with_attention(x, timestep, &kv, attn)
    }

    fn forward_kv_with_attention(
        &self,
        x: &Tensor,
        timestep: &Tensor,
        kv: &TextKv,
        attn: &mut AttentionFn<'_>,
    ) -> Result<Tensor> {
        self.run(x, timestep, kv, attn, None)?
            .ok_or_else(|| crate::Error::invalid("the DiT made no output"))
    }

    /// The forward of a whole sequence (`causal` None), or of one block-causal chunk
    /// attending to a K/V cache of earlier frames as well as to itself. Without a head
    /// (a chunk run only to fill the cache) it returns None after the last block.
    pub(super) fn run(
        &self,
        x: &Tensor,
        timestep: &Tensor,
        kv: &TextKv,
        attn: &mut AttentionFn<'_>,
        mut causal: Option<Causal<'_>>,
    ) -> Result<Option<Tensor>> {
        let (batch, grid) = self.check_inputs(x.shape(), timestep.shape(), &kv.shape)?;
        let c = &self.config;
        let (d, f, hd) = (c.inner_dim(), c.ffn_dim, c.attention_head_dim);
        let eps = c.eps as f32;
        let l = grid.iter().product::<usize>();
        let lt = kv.shape[1];
        let bl = batch * l;
        let s = x.shape();
        let first_frame = match &causal {
            Some(cz) => {
                cz.cache.check(batch, grid, d, self.layers.blocks.len())?;
                cz.first_frame
            }
            None => 0,
        };
        let rope = cpu::wan_rope_tables_at(hd, first_frame, grid[0], grid[1], grid[2], 10000.0);

        // Patch embedding: a Conv3d with stride = kernel is im2col + linear.
        let cols = cpu::patchify(x.data(), batch, s[1], s[2], s[3], s[4], c.patch_size)?; // [B·L, C·pt·ph·pw]
        let mut h = zeroed(bl * d, "the DiT's residual stream")?; // [B·L, D]
        self.linear(&self.layers.patch, &cols, bl, &mut h, true)?;
        drop(cols);

        // Condition embedder. temb: [B, D]; tproj: [B, 6D]; ctx: [B·Lt, D].
        let t_freq = cpu::timestep_embedding(timestep.data(), c.freq_dim, true, 0.0, 10000.0);
        let mut t1 = vec![0.0f32; batch * d];
        self.linear(&self.layers.time_1, &t_freq, batch, &mut t1, true)?;
        cpu::silu(&mut t1);
        let mut temb = vec![0.0f32; batch * d];
        self.linear(&self.layers.time_2, &t1, batch, &mut temb, true)?;
        let mut temb_act = temb.clone();
        cpu::silu(&mut temb_act);
        let mut tproj = vec![0.0f32; batch * 6 * d];
        self.linear(&self.layers.time_proj, &temb_act, batch, &mut tproj, true)?;

        let mut bufs = Buffers::new(bl, d, f)?;
        for (i, (block, (kc, vc))) in self.layers.blocks.iter().zip(&kv.blocks).enumerate() {
            // A cancelled render stops between blocks (the attention skips its remaining
            // tiles once cancelled, so a block ends early too).
            crate::cancel::check()?;
            self.block(
                block,
                &mut h,
                (kc, vc),
                &tproj,
                &rope,
                &mut bufs,
                batch,
                l,
                lt,
                eps,
                attn,
                causal.as_mut().map(|cz| (&mut *cz, i)),
            )?;
        }
        if causal.as_ref().is_some_and(|cz| cz.collect.is_some()) {
            return Ok(None);
        }

        // Output head: LN(h)·(1 + scale) + shift with (shift, scale) = table + temb (not the
        // projection), then proj_out and unpatchify.
        let table = self.w(&self.layers.scale_shift_table)?; // [2, D]
        let mut mul = vec![0.0f32; batch * d];
        let mut add = vec![0.0f32; batch * d];
        for b in 0..batch {
            for i in 0..d {
                add[b * d + i] = table[i] + temb[b * d + i];
                mul[b * d + i] = 1.0 + (table[d + i] + temb[b * d + i]);
            }
        }
        cpu::layer_norm(&h, &mut bufs.n, d, eps, Some(&mul), Some(&add), l);
        let out_f = self.layers.proj_out.n_out;
        let mut y = zeroed(bl * out_f, "the DiT's output")?;
        self.linear(&self.layers.proj_out, &bufs.n, bl, &mut y, true)?;
        let out = cpu::unpatchify(&y, batch, c.out_channels(), grid, c.patch_size)?;
        Tensor::new(vec![batch, c.out_channels(), s[2], s[3], s[4]], out).map(Some)
    }

    #[allow(clippy::too_many_arguments)]
    fn block(
        &self,
        blk: &Block,
        h: &mut [f32],
        (kc, vc): (&[f32], &[f32]),
        tproj: &[f32],
        rope: &RopeTables,
        bufs: &mut Buffers,
        batch: usize,
        l: usize,
        lt: usize,
        eps: f32,
        attn: &mut AttentionFn<'_>,
        causal: Option<(&mut Causal<'_>, usize)>,
    ) -> Result<()> {
        let c = &self.config;
        let (d, heads, hd) = (c.inner_dim(), c.num_attention_heads, c.attention_head_dim);
        let bl = batch * l;
        let Buffers {
            n,
            q,
            k,
            v,
            o,
            y,
            ff,
        } = bufs;

        // Modulation in f32, as diffusers: row j of (table + tproj[b]) for every sample b,
        // each [B, D]; the scale rows (1 and 4) become 1 + scale, rounded after the sum as
        // torch rounds `1 + scale_msa`.
        let table = self.w(&blk.scale_shift_table)?; // [6, D]
        let modulation = |j: usize| -> Vec<f32> {
            let mut out = Vec::with_capacity(batch * d);
            for b in 0..batch {
                let t = &tproj[b * 6 * d + j * d..b * 6 * d + (j + 1) * d];
                out.extend(table[j * d..(j + 1) * d].iter().zip(t).map(|(&s, &p)| {
                    let v = s + p;
                    if j == 1 || j == 4 {
                        1.0 + v
                    } else {
                        v
                    }
                }));
            }
            out
        };
        let (shift1, mul1, gate1) = (modulation(0), modulation(1), modulation(2));
        let (shift2, mul2, gate2) = (modulation(3), modulation(4), modulation(5));

        // 1. Self-attention: LN(h)·(1+scale)+shift → q, k, v; RMSNorm(q), RMSNorm(k) across
        //    heads then RoPE; attention; h += (o·Woᵀ + b)·gate.
        cpu::layer_norm(h, n, d, eps, Some(&mul1), Some(&shift1), l);
        let a = &blk.attn1;
        self.linear(&a.q, n, bl, q, false)?;
        self.linear(&a.k, n, bl, k, false)?;
        self.linear(&a.v, n, bl, v, true)?;
        cpu::rms_norm_rope(
            q,
            d,
            Some(&self.w(&a.q.b)?),
            &self.w(&a.norm_q)?,
            eps,
            Some(rope),
        );
        cpu::rms_norm_rope(
            k,
            d,
            Some(&self.w(&a.k.b)?),
            &self.w(&a.norm_k)?,
            eps,
            Some(rope),
        );
        let shape = AttnShape {
            batch,
            heads,
            head_dim: hd,
            lq: l,
            lk: l,
            q_stride: d,
            kv_stride: d,
            out_stride: d,
            scale: 1.0 / (hd as f32).sqrt(),
        };
        match causal {
            None => attn(q, k, v, o, shape)?,
            Some((cz, index)) => {
                // The chunk attends to the cached frames, then to itself (bidirectionally).
                let (ck, cv) = &cz.cache.blocks[index];
                let lc = ck.len() / (batch * d);
                let (kcat, vcat) = (concat_rows(ck, k, batch, d), concat_rows(cv, v, batch, d));
                attn(
                    q,
                    &kcat,
                    &vcat,
                    o,
                    AttnShape {
                        lk: lc + l,
                        ..shape
                    },
                )?;
                if let Some(out) = cz.collect.as_deref_mut() {
                    out.push((k.to_vec(), v.to_vec()));
                }
            }
        }
        self.linear(&a.o, o, bl, y, false)?;
        cpu::residual_add(h, y, d, Some(&self.w(&a.o.b)?), Some(&gate1), l);

        // 2. Cross-attention to the text: norm2 (affine LayerNorm, no modulation) or identity;
        //    RMSNorm on q and k, no RoPE; h += o·Woᵀ + b (no gate).
        let a = &blk.attn2;
        match &blk.norm2 {
            Some((w, b)) => cpu::layer_norm(
                h,
                n,
                d,
                eps,
                Some(&self.w(w)?),
                Some(&self.w(b)?),
                usize::MAX,
            ),
            None => n.copy_from_slice(h),
        }
        self.linear(&a.q, n, bl, q, false)?;
        cpu::rms_norm_rope(q, d, Some(&self.w(&a.q.b)?), &self.w(&a.norm_q)?, eps, None);
        attn(q, kc, vc, o, AttnShape { lk: lt, ..shape })?;
        self.linear(&a.o, o, bl, y, false)?;
        cpu::residual_add(h, y, d, Some(&self.w(&a.o.b)?), None, l);

        // 3. FFN: LN(h)·(1+c_scale)+c_shift → GELU-tanh(·W1ᵀ + b1) → ·W2ᵀ; h += (· + b2)·c_gate.
        cpu::layer_norm(h, n, d, eps, Some(&mul2), Some(&shift2), l);
        self.linear(&blk.ffn_up, n, bl, ff, false)?;
        cpu::bias_gelu(ff, &self.w(&blk.ffn_up.b)?);
        self.linear(&blk.ffn_down, ff, bl, y, false)?;
        cpu::residual_add(h, y, d, Some(&self.w(&blk.ffn_down.b)?), Some(&gate2), l);
        Ok(())
    }
}

/// The text's K/V of every block ([`WanDit::text_kv`]): made once per prompt.
pub struct TextKv {
    /// The prompt embeddings' shape [B, Lt, text_dim].
    shape: [usize; 3],
    /// Per block: K (RMS-normalised) and V, [B·Lt, D] each.
    blocks: Vec<(Vec<f32>, Vec<f32>)>,
}

/// The f32 reference attention as an [`AttentionFn`].
pub(super) fn cpu_attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    o: &mut [f32],
    s: AttnShape,
) -> Result<()> {
    cpu::attention(q, k, v, o, s);
    Ok(())
}

/// An attention implementation: (q, k, v, out, shape) as [`cpu::attention`] takes them.
pub type AttentionFn<'a> =
    dyn FnMut(&[f32], &[f32], &[f32], &mut [f32], AttnShape) -> Result<()> + 'a;

/// Activations reused by every block (llm.c style: allocated once per forward).
struct Buffers {
    n: Vec<f32>,  // [B·L, D] normalised input of the current sub-layer
    q: Vec<f32>,  // [B·L, D]
    k: Vec<f32>,  // [B·L, D]
    v: Vec<f32>,  // [B·L, D]
    o: Vec<f32>,  // [B·L, D] attention output
    y: Vec<f32>,  // [B·L, D] projection output before the residual
    ff: Vec<f32>, // [B·L, F] FFN hidden
}

impl Buffers {
    fn new(bl: usize, d: usize, f: usize) -> Result<Self> {
        let z = |n: usize| zeroed(n, "the DiT's activations");
        Ok(Buffers {
            n: z(bl * d)?,
            q: z(bl * d)?,
            k: z(bl * d)?,
            v: z(bl * d)?,
            o: z(bl * d)?,
            y: z(bl * d)?,
            ff: z(bl * f)?,
        })
    }
}

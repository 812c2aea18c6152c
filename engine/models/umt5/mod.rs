//! The umT5 text encoder (transformers' UMT5EncoderModel), as Wan uses it.
//!
//! Embedding lookup, then `num_layers` blocks of: T5 RMS layer norm (no mean, no bias,
//! f32), self-attention without 1/√d scaling plus a learned relative-position bias (umT5
//! has one table per layer; T5 shares the first) and the additive key mask, residual;
//! T5 layer norm, gated-GELU feed-forward gelu_new(x·W0ᵀ) ⊙ (x·W1ᵀ) ·Woᵀ, residual; and a
//! final layer norm. Shapes: B batch, L tokens, D = d_model, I = heads × d_kv, F = d_ff.
//! Weights stay in the memory map (the XXL encoder is 22.7 GB of F32): matrices are used in
//! place, and only the embedding rows of the prompt's tokens are read.

use std::borrow::Cow;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::cpu::{self, AttnBias, AttnShape};
use crate::error::{Error, Result};
use crate::models::{read_json, resolve_component};
use crate::tensor::Tensor;
use crate::weights::{TensorEntry, WeightStore};

pub mod gpu;

pub const CLASS_NAME: &str = "UMT5EncoderModel";

/// config.json of a UMT5EncoderModel (transformers' UMT5Config defaults).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Umt5Config {
    pub vocab_size: usize,
    pub d_model: usize,
    pub d_kv: usize,
    pub d_ff: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub relative_attention_num_buckets: usize,
    pub relative_attention_max_distance: usize,
    pub layer_norm_epsilon: f64,
    pub feed_forward_proj: String,
}

impl Default for Umt5Config {
    fn default() -> Self {
        Umt5Config {
            vocab_size: 250_112,
            d_model: 512,
            d_kv: 64,
            d_ff: 1024,
            num_layers: 8,
            num_heads: 6,
            relative_attention_num_buckets: 32,
            relative_attention_max_distance: 128,
            layer_norm_epsilon: 1e-6,
            feed_forward_proj: "gated-gelu".into(),
        }
    }
}

impl Umt5Config {
    /// umT5-XXL as shipped in Wan2.1's text_encoder/.
    pub fn umt5_xxl() -> Self {
        Umt5Config {
            vocab_size: 256_384,
            d_model: 4096,
            d_kv: 64,
            d_ff: 10240,
            num_layers: 24,
            num_heads: 64,
            ..Default::default()
        }
    }

    pub fn inner_dim(&self) -> usize {
        self.num_heads * self.d_kv
    }

    pub fn validate(&self, origin: &Path) -> Result<()> {
        let bad = |reason: String| Error::Config {
            path: origin.to_path_buf(),
            reason,
        };
        const MAX: usize = 1 << 20;
        for (name, v) in [
            ("vocab_size", self.vocab_size),
            ("d_model", self.d_model),
            ("d_kv", self.d_kv),
            ("d_ff", self.d_ff),
            ("num_heads", self.num_heads),
            (
                "relative_attention_max_distance",
                self.relative_attention_max_distance,
            ),
        ] {
            if v == 0 || v > MAX {
                return Err(bad(format!("{name} = {v} is out of range (1..={MAX})")));
            }
        }
        if self.num_layers > 1000 {
            return Err(bad(format!(
                "num_layers = {} is out of range",
                self.num_layers
            )));
        }
        let nb = self.relative_attention_num_buckets;
        if !(4..=u16::MAX as usize).contains(&nb) {
            return Err(bad(format!(
                "relative_attention_num_buckets = {nb} must be in 4..=65535"
            )));
        }
        if self.relative_attention_max_distance <= nb / 4 {
            return Err(bad(format!(
                "relative_attention_max_distance = {} must exceed num_buckets / 4 = {}",
                self.relative_attention_max_distance,
                nb / 4
            )));
        }
        if self.feed_forward_proj != "gated-gelu" {
            return Err(bad(format!(
                "feed_forward_proj = {:?}: reel implements umT5's `gated-gelu` (gelu_new) only",
                self.feed_forward_proj
            )));
        }
        if !(self.layer_norm_epsilon.is_finite() && self.layer_norm_epsilon >= 0.0) {
            return Err(bad(format!(
                "layer_norm_epsilon = {} is not valid",
                self.layer_norm_epsilon
            )));
        }
        Ok(())
    }
}

/// T5's bidirectional relative-position bucket of `rel` = key position − query position,
/// computed as transformers does: exact buckets for |rel| < max_exact, then logarithmic
/// ones in float32 truncated toward zero, capped at the last bucket; positive offsets use
/// the upper half of the buckets.
pub fn relative_position_bucket(rel: i64, num_buckets: usize, max_distance: usize) -> usize {
    let half = num_buckets / 2;
    let base = if rel > 0 { half } else { 0 };
    let n = rel.unsigned_abs() as usize;
    let max_exact = half / 2;
    if n < max_exact {
        return base + n;
    }
    // torch: log(n.float() / max_exact) / math.log(max_distance / max_exact) * (half − max_exact)
    let denom = (max_distance as f64 / max_exact as f64).ln() as f32;
    let v = ((n as f32 / max_exact as f32).ln() / denom) * (half - max_exact) as f32;
    base + (max_exact + v as usize).min(half - 1)
}

#[derive(Debug, Clone)]
struct Layer {
    ln_attn: TensorEntry,
    q: TensorEntry,
    k: TensorEntry,
    v: TensorEntry,
    o: TensorEntry,
    /// [num_buckets, heads]
    rel_bias: TensorEntry,
    ln_ff: TensorEntry,
    wi_0: TensorEntry,
    wi_1: TensorEntry,
    wo: TensorEntry,
}

/// A loaded UMT5EncoderModel.
pub struct Umt5Encoder {
    pub config: Umt5Config,
    dir: PathBuf,
    store: WeightStore,
    embed: TensorEntry,
    layers: Vec<Layer>,
    final_ln: TensorEntry,
}

impl Umt5Encoder {
    /// Loads a text_encoder folder, or the `text_encoder/` folder of a pipeline root.
    pub fn load(path: &Path) -> Result<Self> {
        let dir = resolve_component(path, "text_encoder", &[CLASS_NAME])?;
        let config_path = dir.join("config.json");
        let config: Umt5Config = read_json(&config_path)?;
        config.validate(&config_path)?;
        let store = WeightStore::open_component(&dir)?;
        let mut seen = Vec::new();
        let (embed, layers, final_ln) = Self::build(&config, Some(&store), &mut seen)?;
        let tied = ["shared.weight", "encoder.embed_tokens.weight"];
        store.reject_unexpected(seen.iter().map(|(n, _)| n.as_str()).chain(tied), CLASS_NAME)?;
        Ok(Umt5Encoder {
            config,
            dir,
            store,
            embed,
            layers,
            final_ln,
        })
    }

    /// Every weight a config needs, (name, shape); the embedding as `shared.weight`.
    pub fn weight_specs(config: &Umt5Config) -> Vec<(String, Vec<usize>)> {
        let mut seen = Vec::new();
        // Cannot fail without a store: every lookup returns a placeholder.
        let _ = Self::build(config, None, &mut seen);
        seen
    }

    /// The layer list; checks each tensor against `store` when there is one, and records
    /// every (name, shape) in `seen`.
    fn build(
        config: &Umt5Config,
        store: Option<&WeightStore>,
        seen: &mut Vec<(String, Vec<usize>)>,
    ) -> Result<(TensorEntry, Vec<Layer>, TensorEntry)> {
        let (d, i, f) = (config.d_model, config.inner_dim(), config.d_ff);
        let mut get = |name: String, shape: &[usize]| -> Result<TensorEntry> {
            let e = match store {
                Some(s) => s.weight(&name, shape)?.clone(),
                None => TensorEntry::placeholder(&name, shape),
            };
            seen.push((name, shape.to_vec()));
            Ok(e)
        };
        // The embedding is tied: checkpoints hold `shared.weight`, `encoder.embed_tokens.weight`
        // or both (identical); reel reads the first one present.
        let embed_name = ["shared.weight", "encoder.embed_tokens.weight"]
            .into_iter()
            .find(|n| store.is_some_and(|s| s.get(n).is_some()))
            .unwrap_or("shared.weight");
        let embed = get(embed_name.to_string(), &[config.vocab_size, d])?;
        let mut layers = Vec::with_capacity(config.num_layers);
        for l in 0..config.num_layers {
            let p = format!("encoder.block.{l}.layer");
            layers.push(Layer {
                ln_attn: get(format!("{p}.0.layer_norm.weight"), &[d])?,
                q: get(format!("{p}.0.SelfAttention.q.weight"), &[i, d])?,
                k: get(format!("{p}.0.SelfAttention.k.weight"), &[i, d])?,
                v: get(format!("{p}.0.SelfAttention.v.weight"), &[i, d])?,
                o: get(format!("{p}.0.SelfAttention.o.weight"), &[d, i])?,
                rel_bias: get(
                    format!("{p}.0.SelfAttention.relative_attention_bias.weight"),
                    &[config.relative_attention_num_buckets, config.num_heads],
                )?,
                ln_ff: get(format!("{p}.1.layer_norm.weight"), &[d])?,
                wi_0: get(format!("{p}.1.DenseReluDense.wi_0.weight"), &[f, d])?,
                wi_1: get(format!("{p}.1.DenseReluDense.wi_1.weight"), &[f, d])?,
                wo: get(format!("{p}.1.DenseReluDense.wo.weight"), &[d, f])?,
            });
        }
        let final_ln = get("encoder.final_layer_norm.weight".into(), &[d])?;
        Ok((embed, layers, final_ln))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn w(&self, e: &TensorEntry) -> Result<Cow<'_, [f32]>> {
        Ok(self.store.f32(e)?)
    }

    /// T5 layer norm in place into `out`: x / √(mean(x²) + eps) · weight.
    fn t5_norm(&self, x: &[f32], out: &mut [f32], weight: &TensorEntry) -> Result<()> {
        let d = self.config.d_model;
        let w = self.w(weight)?;
        out.copy_from_slice(x);
        cpu::rms_norm_rope(
            out,
            d,
            None,
            &w,
            self.config.layer_norm_epsilon as f32,
            None,
        );
        Ok(())
    }

    /// The embedding rows of ids, mask: [B, L], after checking them (sizes, vocabulary).
    fn check_inputs(
        &self,
        ids: &[i64],
        mask: &[i64],
        batch: usize,
        len: usize,
    ) -> Result<Vec<usize>> {
        let c = &self.config;
        if batch == 0 || len == 0 || ids.len() != batch * len || mask.len() != batch * len {
            return Err(Error::invalid(format!(
                "input_ids and attention_mask must both be [B, L] with B, L > 0 (got {} and {} values for [{batch}, {len}])",
                ids.len(),
                mask.len()
            )));
        }
        if len > u16::MAX as usize {
            return Err(Error::invalid(format!(
                "sequence of {len} tokens is too long"
            )));
        }
        ids.iter()
            .map(|&t| {
                usize::try_from(t)
                    .ok()
                    .filter(|&t| t < c.vocab_size)
                    .ok_or_else(|| {
                        Error::invalid(format!(
                            "input_ids holds token {t}, outside the vocabulary of {}",
                            c.vocab_size
                        ))
                    })
            })
            .collect()
    }

    /// last_hidden_state [B, L, D] for ids, mask: [B, L] (mask 1 = token, 0 = padding).
    pub fn forward(&self, ids: &[i64], mask: &[i64], batch: usize, len: usize) -> Result<Tensor> {
        let c = &self.config;
        let (d, inner, f, heads) = (c.d_model, c.inner_dim(), c.d_ff, c.num_heads);
        let rows = self.check_inputs(ids, mask, batch, len)?;
        let bl = batch * len;
        let mut h = self.store.f32_rows(&self.embed, &rows)?; // [B·L, D]

        // Relative-position buckets, shared by every layer and head: [L, L].
        let buckets: Vec<u16> = (0..len)
            .flat_map(|i| (0..len).map(move |j| j as i64 - i as i64))
            .map(|rel| {
                relative_position_bucket(
                    rel,
                    c.relative_attention_num_buckets,
                    c.relative_attention_max_distance,
                ) as u16
            })
            .collect();
        // transformers' additive mask: 0 for tokens, finfo(float32).min for padding.
        let key_mask: Vec<f32> = mask
            .iter()
            .map(|&m| if m > 0 { 0.0 } else { f32::MIN })
            .collect();

        let mut n = vec![0.0f32; bl * d];
        let (mut q, mut k, mut v, mut o) = (
            vec![0.0f32; bl * inner],
            vec![0.0f32; bl * inner],
            vec![0.0f32; bl * inner],
            vec![0.0f32; bl * inner],
        );
        let mut y = vec![0.0f32; bl * d];
        let (mut g0, mut g1) = (vec![0.0f32; bl * f], vec![0.0f32; bl * f]);
        let shape = AttnShape {
            batch,
            heads,
            head_dim: c.d_kv,
            lq: len,
            lk: len,
            q_stride: inner,
            kv_stride: inner,
            out_stride: inner,
            scale: 1.0, // T5 does not scale its attention logits
        };
        for layer in &self.layers {
            // Self-attention sub-layer.
            self.t5_norm(&h, &mut n, &layer.ln_attn)?;
            cpu::matmul_wt(&n, &self.w(&layer.q)?, bl, d, inner, &mut q);
            cpu::matmul_wt(&n, &self.w(&layer.k)?, bl, d, inner, &mut k);
            cpu::matmul_wt(&n, &self.w(&layer.v)?, bl, d, inner, &mut v);
            let table = self.w(&layer.rel_bias)?;
            let bias = AttnBias {
                buckets: &buckets,
                table: &table,
                key_mask: Some(&key_mask),
            };
            cpu::attention_biased(&q, &k, &v, &mut o, shape, &bias);
            cpu::matmul_wt(&o, &self.w(&layer.o)?, bl, inner, d, &mut y);
            cpu::residual_add(&mut h, &y, d, None, None, bl);
            // Gated-GELU feed-forward sub-layer.
            self.t5_norm(&h, &mut n, &layer.ln_ff)?;
            cpu::matmul_wt(&n, &self.w(&layer.wi_0)?, bl, d, f, &mut g0);
            cpu::matmul_wt(&n, &self.w(&layer.wi_1)?, bl, d, f, &mut g1);
            cpu::gelu_mul(&mut g0, &g1);
            cpu::matmul_wt(&g0, &self.w(&layer.wo)?, bl, f, d, &mut y);
            cpu::residual_add(&mut h, &y, d, None, None, bl);
        }
        self.t5_norm(&h.clone(), &mut h, &self.final_ln)?;
        Tensor::new(vec![batch, len, d], h)
    }
}

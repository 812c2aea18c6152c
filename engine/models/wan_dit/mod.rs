//! The Wan2.1 diffusion transformer (diffusers' WanTransformer3DModel, text-to-video).
//!
//! Reads top to bottom like the checkpoint: patch embedding, condition embedder (timestep
//! and text), `num_layers` blocks of adaLN self-attention with QK RMSNorm and 3D RoPE,
//! cross-attention to the text, GELU-tanh FFN, then the modulated output head and
//! unpatchify. Shapes use B = batch, L = video tokens, Lt = text tokens, D = inner dim
//! (heads × head_dim), F = ffn_dim.
//!
//! Precision, as diffusers: everything in f32 here; the modulation vectors
//! (scale_shift_table + time projection) and the norms are f32 in diffusers too, and the
//! RoPE tables are computed in f64 and rounded to f32 (see [`crate::cpu::wan_rope_tables`]).
//! Weights stay in the memory map: F32 ones are used in place, BF16/F16 ones are converted
//! for one layer at a time while that layer runs.
//!
//! The two forwards sit side by side: `cpu.rs` (the f32 reference) and `gpu.rs` (the device
//! forward on a kernel device, through the GPU runtime).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::models::{read_json, resolve_component};
use crate::weights::{TensorEntry, WeightStore};

mod causal;
mod cpu;
pub mod gpu;

pub use causal::{
    stream, stream_with, CausalConfig, CausalWindow, ChunkModel, ChunkSampler, CpuChunks, KvCache,
    StreamShape,
};
pub use cpu::{AttentionFn, TextKv};

pub const CLASS_NAME: &str = "WanTransformer3DModel";

/// config.json of a WanTransformer3DModel. Defaults are diffusers' constructor defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct WanDitConfig {
    pub patch_size: [usize; 3],
    pub num_attention_heads: usize,
    pub attention_head_dim: usize,
    pub in_channels: usize,
    /// null means in_channels.
    pub out_channels: Option<usize>,
    pub text_dim: usize,
    pub freq_dim: usize,
    pub ffn_dim: usize,
    pub num_layers: usize,
    pub cross_attn_norm: bool,
    pub qk_norm: Option<String>,
    pub eps: f64,
    pub image_dim: Option<usize>,
    pub added_kv_proj_dim: Option<usize>,
    pub rope_max_seq_len: usize,
    pub pos_embed_seq_len: Option<usize>,
}

impl Default for WanDitConfig {
    fn default() -> Self {
        WanDitConfig {
            patch_size: [1, 2, 2],
            num_attention_heads: 40,
            attention_head_dim: 128,
            in_channels: 16,
            out_channels: Some(16),
            text_dim: 4096,
            freq_dim: 256,
            ffn_dim: 13824,
            num_layers: 40,
            cross_attn_norm: true,
            qk_norm: Some("rms_norm_across_heads".into()),
            eps: 1e-6,
            image_dim: None,
            added_kv_proj_dim: None,
            rope_max_seq_len: 1024,
            pos_embed_seq_len: None,
        }
    }
}

impl WanDitConfig {
    /// Wan2.1-T2V-1.3B.
    pub fn wan21_t2v_1_3b() -> Self {
        WanDitConfig {
            num_attention_heads: 12,
            ffn_dim: 8960,
            num_layers: 30,
            ..Default::default()
        }
    }

    /// Wan2.1-T2V-14B.
    pub fn wan21_t2v_14b() -> Self {
        WanDitConfig {
            num_attention_heads: 40,
            ffn_dim: 13824,
            num_layers: 40,
            ..Default::default()
        }
    }

    pub fn inner_dim(&self) -> usize {
        self.num_attention_heads * self.attention_head_dim
    }

    pub fn out_channels(&self) -> usize {
        self.out_channels.unwrap_or(self.in_channels)
    }

    pub fn patch_volume(&self) -> usize {
        self.patch_size.iter().product()
    }

    /// Checks what this implementation supports; `origin` is named in errors.
    pub fn validate(&self, origin: &Path) -> Result<()> {
        let bad = |reason: String| Error::Config {
            path: origin.to_path_buf(),
            reason,
        };
        const MAX: usize = 1 << 20;
        for (name, v) in [
            ("num_attention_heads", self.num_attention_heads),
            ("attention_head_dim", self.attention_head_dim),
            ("in_channels", self.in_channels),
            ("out_channels", self.out_channels()),
            ("text_dim", self.text_dim),
            ("freq_dim", self.freq_dim),
            ("ffn_dim", self.ffn_dim),
            ("rope_max_seq_len", self.rope_max_seq_len),
            ("patch_size[0]", self.patch_size[0]),
            ("patch_size[1]", self.patch_size[1]),
            ("patch_size[2]", self.patch_size[2]),
        ] {
            if v == 0 || v > MAX {
                return Err(bad(format!("{name} = {v} is out of range (1..={MAX})")));
            }
        }
        if self.num_layers > 10_000 {
            return Err(bad(format!(
                "num_layers = {} is out of range",
                self.num_layers
            )));
        }
        if self.inner_dim() > MAX {
            return Err(bad(format!(
                "inner dim {} is out of range",
                self.inner_dim()
            )));
        }
        if self.attention_head_dim % 2 != 0 {
            return Err(bad(format!(
                "attention_head_dim = {} must be even for the rotary embedding",
                self.attention_head_dim
            )));
        }
        if self.patch_size.iter().any(|&p| p > 16) {
            return Err(bad(format!(
                "patch_size {:?} is out of range",
                self.patch_size
            )));
        }
        if self.freq_dim % 2 != 0 {
            return Err(bad(format!("freq_dim = {} must be even", self.freq_dim)));
        }
        if !(self.eps.is_finite() && self.eps >= 0.0) {
            return Err(bad(format!(
                "eps = {} must be a finite non-negative number",
                self.eps
            )));
        }
        if self.image_dim.is_some() || self.added_kv_proj_dim.is_some() {
            return Err(bad(
                "image_dim / added_kv_proj_dim are set: this is an image-to-video model, and reel serves text-to-video Wan2.1 only"
                    .into(),
            ));
        }
        if let Some(q) = &self.qk_norm {
            if q != "rms_norm_across_heads" {
                // diffusers builds RMSNorm over all heads whatever this says; so do we.
                tracing::warn!("{}: qk_norm = {q:?}; diffusers ignores it and normalises across heads, as reel does", origin.display());
            }
        }
        Ok(())
    }
}

/// A linear layer's weight [out, in] and bias [out].
#[derive(Debug, Clone)]
struct Linear {
    w: TensorEntry,
    b: TensorEntry,
    n_in: usize,
    n_out: usize,
}

#[derive(Debug, Clone)]
struct Attention {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    norm_q: TensorEntry,
    norm_k: TensorEntry,
}

#[derive(Debug, Clone)]
struct Block {
    /// [1, 6, D]: shift, scale, gate (self-attention), shift, scale, gate (FFN).
    scale_shift_table: TensorEntry,
    attn1: Attention,
    attn2: Attention,
    /// (weight, bias) of the affine LayerNorm before cross-attention (cross_attn_norm).
    norm2: Option<(TensorEntry, TensorEntry)>,
    ffn_up: Linear,
    ffn_down: Linear,
}

/// Validates names, shapes and dtypes against the config while building the layer list,
/// and records every (name, shape) so that unexpected tensors can be rejected. Without a
/// store it only records: that is how [`WanDit::weight_specs`] lists a config's weights
/// from the same code that loads them.
struct Loader<'a> {
    store: Option<&'a WeightStore>,
    seen: Vec<(String, Vec<usize>)>,
}

impl Loader<'_> {
    fn tensor(&mut self, name: &str, shape: &[usize]) -> Result<TensorEntry> {
        self.seen.push((name.to_string(), shape.to_vec()));
        match self.store {
            Some(store) => Ok(store.weight(name, shape)?.clone()),
            None => Ok(TensorEntry::placeholder(name, shape)),
        }
    }

    fn linear(&mut self, prefix: &str, n_in: usize, n_out: usize) -> Result<Linear> {
        Ok(Linear {
            w: self.tensor(&format!("{prefix}.weight"), &[n_out, n_in])?,
            b: self.tensor(&format!("{prefix}.bias"), &[n_out])?,
            n_in,
            n_out,
        })
    }

    fn attention(&mut self, prefix: &str, d: usize) -> Result<Attention> {
        Ok(Attention {
            q: self.linear(&format!("{prefix}.to_q"), d, d)?,
            k: self.linear(&format!("{prefix}.to_k"), d, d)?,
            v: self.linear(&format!("{prefix}.to_v"), d, d)?,
            o: self.linear(&format!("{prefix}.to_out.0"), d, d)?,
            norm_q: self.tensor(&format!("{prefix}.norm_q.weight"), &[d])?,
            norm_k: self.tensor(&format!("{prefix}.norm_k.weight"), &[d])?,
        })
    }
}

/// The layer list of a model: handles into its store, checked against the config.
struct Layers {
    patch: Linear,
    time_1: Linear,
    time_2: Linear,
    time_proj: Linear,
    text_1: Linear,
    text_2: Linear,
    blocks: Vec<Block>,
    /// [1, 2, D]: shift, scale of the output head.
    scale_shift_table: TensorEntry,
    proj_out: Linear,
}

/// A loaded WanTransformer3DModel: config, mapped weights and the validated layer list.
pub struct WanDit {
    pub config: WanDitConfig,
    dir: PathBuf,
    store: WeightStore,
    layers: Layers,
}

impl WanDit {
    /// Loads a transformer folder, or the `transformer/` folder of a pipeline root.
    pub fn load(path: &Path) -> Result<Self> {
        let dir = resolve_component(path, "transformer", &[CLASS_NAME])?;
        let config_path = dir.join("config.json");
        let config: WanDitConfig = read_json(&config_path)?;
        let store = WeightStore::open_component(&dir)?;
        Self::from_store(config, store, dir)
    }

    /// Every weight a config needs, (name, shape) in checkpoint order.
    pub fn weight_specs(config: &WanDitConfig) -> Vec<(String, Vec<usize>)> {
        let mut ld = Loader {
            store: None,
            seen: Vec::new(),
        };
        // Cannot fail without a store: every lookup returns a placeholder.
        let _ = Self::layers(config, &mut ld);
        ld.seen
    }

    /// Builds the model over already mapped weights, checking every tensor.
    pub fn from_store(config: WanDitConfig, store: WeightStore, dir: PathBuf) -> Result<Self> {
        config.validate(&dir.join("config.json"))?;
        let mut ld = Loader {
            store: Some(&store),
            seen: Vec::new(),
        };
        let layers = Self::layers(&config, &mut ld)?;
        // diffusers ignores `norm_added_q` on load (_keys_to_ignore_on_load_unexpected).
        let expected = ld.seen.iter().map(|(n, _)| n.as_str());
        let ignored = store
            .entries()
            .filter(|e| e.name.contains("norm_added_q"))
            .map(|e| e.name.as_str());
        store.reject_unexpected(expected.chain(ignored), CLASS_NAME)?;
        Ok(WanDit {
            config,
            dir,
            store,
            layers,
        })
    }

    fn layers(c: &WanDitConfig, ld: &mut Loader) -> Result<Layers> {
        let d = c.inner_dim();
        let [pt, ph, pw] = c.patch_size;
        let patch_w = ld.tensor("patch_embedding.weight", &[d, c.in_channels, pt, ph, pw])?;
        let patch = Linear {
            w: patch_w,
            b: ld.tensor("patch_embedding.bias", &[d])?,
            n_in: c.in_channels * pt * ph * pw,
            n_out: d,
        };
        let time_1 = ld.linear("condition_embedder.time_embedder.linear_1", c.freq_dim, d)?;
        let time_2 = ld.linear("condition_embedder.time_embedder.linear_2", d, d)?;
        let time_proj = ld.linear("condition_embedder.time_proj", d, 6 * d)?;
        let text_1 = ld.linear("condition_embedder.text_embedder.linear_1", c.text_dim, d)?;
        let text_2 = ld.linear("condition_embedder.text_embedder.linear_2", d, d)?;
        let mut blocks = Vec::with_capacity(c.num_layers);
        for i in 0..c.num_layers {
            let p = format!("blocks.{i}");
            let norm2 = if c.cross_attn_norm {
                Some((
                    ld.tensor(&format!("{p}.norm2.weight"), &[d])?,
                    ld.tensor(&format!("{p}.norm2.bias"), &[d])?,
                ))
            } else {
                None
            };
            blocks.push(Block {
                scale_shift_table: ld.tensor(&format!("{p}.scale_shift_table"), &[1, 6, d])?,
                attn1: ld.attention(&format!("{p}.attn1"), d)?,
                attn2: ld.attention(&format!("{p}.attn2"), d)?,
                norm2,
                ffn_up: ld.linear(&format!("{p}.ffn.net.0.proj"), d, c.ffn_dim)?,
                ffn_down: ld.linear(&format!("{p}.ffn.net.2"), c.ffn_dim, d)?,
            });
        }
        let scale_shift_table = ld.tensor("scale_shift_table", &[1, 2, d])?;
        let proj_out = ld.linear("proj_out", d, c.out_channels() * c.patch_volume())?;
        Ok(Layers {
            patch,
            time_1,
            time_2,
            time_proj,
            text_1,
            text_2,
            blocks,
            scale_shift_table,
            proj_out,
        })
    }

    /// FLOPs of one forward pass, counted from the architecture: 2·M·N·K per GEMM
    /// (patch embedding, condition embedder, the q/k/v/o projections of both attentions,
    /// the FFN, the output head) and 4·Lq·Lk·head_dim per attention head (Q·Kᵀ and P·V).
    /// Norms, RoPE, activations and the softmax are not counted. `grid` is the post-patch
    /// (frames, height, width), `text_len` the prompt length (512 in the pipeline).
    pub fn flops(&self, batch: usize, grid: [usize; 3], text_len: usize) -> u64 {
        Self::flops_of(&self.config, batch, grid, text_len)
    }

    /// [`flops`](Self::flops) for a config.
    pub fn flops_of(c: &WanDitConfig, batch: usize, grid: [usize; 3], text_len: usize) -> u64 {
        let (b, l, lt) = (
            batch as u64,
            grid.iter().product::<usize>() as u64,
            text_len as u64,
        );
        let (d, f) = (c.inner_dim() as u64, c.ffn_dim as u64);
        let gemm = |m: u64, n: u64, k: u64| 2 * m * n * k;
        let patch = gemm(b * l, d, (c.in_channels * c.patch_volume()) as u64);
        let cond = gemm(b, d, c.freq_dim as u64)
            + gemm(b, d, d)
            + gemm(b, 6 * d, d)
            + gemm(b * lt, d, c.text_dim as u64)
            + gemm(b * lt, d, d);
        let block = 4 * gemm(b * l, d, d) // self-attention q, k, v, o
            + 4 * b * l * l * d // self-attention: 4·L·L·head_dim per head, heads·head_dim = D
            + 2 * gemm(b * l, d, d) // cross-attention q, o
            + 2 * gemm(b * lt, d, d) // cross-attention k, v
            + 4 * b * l * lt * d // cross-attention
            + gemm(b * l, f, d)
            + gemm(b * l, d, f); // FFN
        let head = gemm(b * l, (c.out_channels() * c.patch_volume()) as u64, d);
        patch + cond + c.num_layers as u64 * block + head
    }

    /// The component folder this model was loaded from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Checks the inputs of [`forward`](Self::forward) and returns (B, post-patch grid).
    pub fn check_inputs(
        &self,
        x: &[usize],
        timestep: &[usize],
        text: &[usize],
    ) -> Result<(usize, [usize; 3])> {
        let c = &self.config;
        let bad = |m: String| Err(Error::invalid(m));
        if x.len() != 5 {
            return bad(format!(
                "hidden_states must be [B, C, T, H, W], got shape {x:?}"
            ));
        }
        let (b, ch) = (x[0], x[1]);
        if b == 0 {
            return bad("hidden_states has batch size 0".into());
        }
        if ch != c.in_channels {
            return bad(format!(
                "hidden_states has {ch} channels, the model takes {}",
                c.in_channels
            ));
        }
        let mut grid = [0; 3];
        for (i, axis) in ["frames (T)", "height (H)", "width (W)"].iter().enumerate() {
            let (n, p) = (x[2 + i], c.patch_size[i]);
            if n == 0 || n % p != 0 {
                return bad(format!(
                    "hidden_states {axis} = {n} is not a positive multiple of the patch size {p}"
                ));
            }
            grid[i] = n / p;
            if grid[i] > c.rope_max_seq_len {
                return bad(format!(
                    "hidden_states {axis} = {n} gives {} positions, more than rope_max_seq_len = {}",
                    grid[i], c.rope_max_seq_len
                ));
            }
        }
        if timestep != [b] {
            return bad(format!(
                "timestep must have shape [{b}] (one per sample), got {timestep:?}"
            ));
        }
        if text.len() != 3 || text[0] != b || text[2] != c.text_dim || text[1] == 0 {
            return bad(format!(
                "encoder_hidden_states must be [{b}, L, {}] with L > 0, got {text:?}",
                c.text_dim
            ));
        }
        Ok((b, grid))
    }
}

/// Writes a WanTransformer3DModel folder with deterministic random weights for `config`
/// (benchmarks at real shapes; not a trained model).
pub fn write_random(dir: &Path, config: &WanDitConfig, seed: u64) -> Result<()> {
    let mut json = serde_json::to_value(config).map_err(|e| Error::invalid(e.to_string()))?;
    if let Some(obj) = json.as_object_mut() {
        obj.insert("_class_name".into(), CLASS_NAME.into());
    }
    let tensors = crate::models::random::random_weights(&WanDit::weight_specs(config), seed);
    crate::models::random::write_component(dir, &json, &tensors)
}

//! The Wan2.1 causal 3D VAE (diffusers' AutoencoderKLWan), encode and decode on the CPU.
//!
//! Video is processed in time chunks as diffusers does: encode takes the first frame, then
//! chunks of 4; decode takes one latent frame at a time. Causal convolutions see the frames
//! before a chunk through a per-convolution cache. Where Wan's code keeps that cache in a
//! list indexed by a mutable counter with a "Rep" string sentinel, reel gives every causal
//! convolution a named [`Slot`] in a [`ConvCache`], an explicit state machine.
//!
//! Activations are channel-last [T, H, W, C] frames of one sample ([`Frames`]); batches run
//! sample by sample. Decoded frames are handed to a [`FrameSink`] as each latent frame
//! finishes, so memory does not grow with the length of the video.

use std::borrow::Cow;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::cpu::conv::{conv3d, upsample2x, ConvWeights, Frames, Pad2};
use crate::cpu::{self, AttnShape};
use crate::error::{Error, Result};
use crate::models::{read_json, resolve_component};
use crate::tensor::Tensor;
use crate::weights::{TensorEntry, WeightStore};

pub mod gpu;

pub const CLASS_NAME: &str = "AutoencoderKLWan";

/// Frames a causal convolution keeps from the previous chunk (diffusers' CACHE_T).
const CACHE_T: usize = 2;

/// config.json of an AutoencoderKLWan (diffusers' defaults: the Wan2.1 VAE).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct WanVaeConfig {
    pub base_dim: usize,
    pub decoder_base_dim: Option<usize>,
    pub z_dim: usize,
    pub dim_mult: Vec<usize>,
    pub num_res_blocks: usize,
    pub attn_scales: Vec<f64>,
    pub temperal_downsample: Vec<bool>,
    pub latents_mean: Vec<f32>,
    pub latents_std: Vec<f32>,
    pub is_residual: bool,
    pub in_channels: usize,
    pub out_channels: usize,
    pub patch_size: Option<usize>,
}

impl Default for WanVaeConfig {
    fn default() -> Self {
        WanVaeConfig {
            base_dim: 96,
            decoder_base_dim: None,
            z_dim: 16,
            dim_mult: vec![1, 2, 4, 4],
            num_res_blocks: 2,
            attn_scales: vec![],
            temperal_downsample: vec![false, true, true],
            latents_mean: vec![
                -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508, 0.4134,
                -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
            ],
            latents_std: vec![
                2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743, 3.2687, 2.1526,
                2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
            ],
            is_residual: false,
            in_channels: 3,
            out_channels: 3,
            patch_size: None,
        }
    }
}

impl WanVaeConfig {
    /// Pixels per latent pixel along H and W: 2 per downsampling stage.
    pub fn spatial_factor(&self) -> usize {
        1 << self.dim_mult.len().saturating_sub(1)
    }

    /// Frames per latent frame (after the first): 2 per temporal downsampling stage.
    pub fn temporal_factor(&self) -> usize {
        1 << self.temperal_downsample.iter().filter(|&&t| t).count()
    }

    pub fn validate(&self, origin: &Path) -> Result<()> {
        let bad = |reason: String| Error::Config {
            path: origin.to_path_buf(),
            reason,
        };
        if self.is_residual || self.patch_size.is_some() {
            return Err(bad(
                "is_residual / patch_size are set: this is the Wan2.2 VAE; reel serves the Wan2.1 VAE".into(),
            ));
        }
        let n = self.dim_mult.len();
        if !(1..=8).contains(&n) || self.temperal_downsample.len() + 1 != n {
            return Err(bad(format!(
                "dim_mult has {n} entries and temperal_downsample {}: expected 1..=8 and one fewer",
                self.temperal_downsample.len()
            )));
        }
        let dec = self.decoder_base_dim.unwrap_or(self.base_dim);
        for (name, v) in [
            ("base_dim", self.base_dim),
            ("decoder_base_dim", dec),
            ("z_dim", self.z_dim),
            ("in_channels", self.in_channels),
            ("out_channels", self.out_channels),
        ] {
            if v == 0 || v > 1 << 16 {
                return Err(bad(format!("{name} = {v} is out of range")));
            }
        }
        if self.dim_mult.iter().any(|&m| m == 0 || m > 64) || self.num_res_blocks > 64 {
            return Err(bad("dim_mult / num_res_blocks out of range".into()));
        }
        // Every upsampling conv halves the channels of its block (dim // 2): they must stay
        // positive.
        if dec * self.dim_mult.iter().max().copied().unwrap_or(1) < 2 && n > 1 {
            return Err(bad(
                "decoder_base_dim too small for the upsampling layers".into()
            ));
        }
        if self.latents_mean.len() != self.z_dim || self.latents_std.len() != self.z_dim {
            return Err(bad(format!(
                "latents_mean / latents_std have {} / {} entries, z_dim is {}",
                self.latents_mean.len(),
                self.latents_std.len(),
                self.z_dim
            )));
        }
        Ok(())
    }
}

/// The state of one causal convolution's cache between chunks.
#[derive(Debug, Clone, Default)]
pub enum Slot {
    /// No chunk seen yet.
    #[default]
    Empty,
    /// Temporal upsampling only: the first chunk passed (it is not doubled in time), and
    /// nothing is cached yet (Wan's "Rep" sentinel).
    FirstChunkSeen,
    /// The last frames of this convolution's input from the previous chunk.
    Frames(Frames),
}

/// Moves frames into a slot's buffer, which always has room for CACHE_T frames: a cache
/// then holds the same memory from the first chunk on (one frame fewer in the first chunk
/// would make the second chunk's peak lower than the steady state's, and the peak of a
/// decode would depend on its length).
fn slot_frames(f: Frames) -> Frames {
    let mut data = Vec::with_capacity(f.t.max(CACHE_T) * f.frame_len());
    data.extend_from_slice(&f.data);
    Frames { data, ..f }
}

/// One slot per causal convolution of an encoder or decoder, named after the module.
#[derive(Debug, Clone, Default)]
pub struct ConvCache {
    pub names: Vec<String>,
    pub slots: Vec<Slot>,
}

impl ConvCache {
    fn new(names: &[String]) -> Self {
        ConvCache {
            names: names.to_vec(),
            slots: vec![Slot::Empty; names.len()],
        }
    }

    /// Bytes held by cached frames.
    pub fn bytes(&self) -> usize {
        self.slots
            .iter()
            .map(|s| match s {
                Slot::Frames(f) => f.data.len() * 4,
                _ => 0,
            })
            .sum()
    }
}

/// A convolution's tensors and geometry.
#[derive(Debug, Clone)]
struct Conv {
    w: TensorEntry,
    b: TensorEntry,
    ci: usize,
    co: usize,
    k: [usize; 3],
    stride: [usize; 3],
    pad: Pad2,
    /// Zero frames before the input (2·padding_t), or frames of the cache in their stead.
    time_pad: usize,
    /// Index of this convolution's slot, for causal convolutions called with a cache.
    slot: Option<usize>,
    /// The weights rearranged for the cpu (register-tile panels or im2col GEMM), made at
    /// the first cpu call.
    cpu: CpuWeights,
}

/// [`ConvWeights`] made once per convolution (the rearrangement reads the whole tensor, and
/// a decode calls each convolution once per latent frame).
#[derive(Clone, Default)]
struct CpuWeights(std::sync::OnceLock<std::sync::Arc<ConvWeights>>);

impl std::fmt::Debug for CpuWeights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.get().is_some() {
            "CpuWeights(made)"
        } else {
            "CpuWeights(not yet)"
        })
    }
}

#[derive(Debug, Clone)]
struct ResBlock {
    norm1: TensorEntry,
    conv1: Conv,
    norm2: TensorEntry,
    conv2: Conv,
    shortcut: Option<Conv>,
}

#[derive(Debug, Clone)]
struct AttnBlock {
    norm: TensorEntry,
    qkv: Conv,
    proj: Conv,
}

#[derive(Debug, Clone)]
enum Resample {
    Up2d { conv: Conv },
    Up3d { time_conv: Conv, conv: Conv },
    Down2d { conv: Conv },
    Down3d { conv: Conv, time_conv: Conv },
}

// Built once per model: the size difference of the variants costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
enum Layer {
    Res(ResBlock),
    Attn(AttnBlock),
    Resample(Resample),
}

/// Encoder or decoder: conv_in, layers (the down blocks, or mid + up blocks), norm_out, conv_out.
#[derive(Debug, Clone)]
struct Coder {
    conv_in: Conv,
    layers: Vec<Layer>,
    norm_out: TensorEntry,
    conv_out: Conv,
    slots: Vec<String>,
}

/// Receives decoded frames as they are produced: frames [n, H, W, C_out] channel-last, in
/// [-1, 1], for sample `batch_index`.
pub trait FrameSink {
    fn push(&mut self, batch_index: usize, frames: &Frames) -> Result<()>;
}

/// A decoder that takes a video's latents a piece at a time ([`StreamDecoder`] on the cpu,
/// [`gpu::DeviceStreamDecoder`] on a kernel device).
pub trait LatentStream {
    /// Decodes the next latent frames [1, z, T, h, w] (not normalized) into `sink`.
    fn push(&mut self, latents: &Tensor, sink: &mut dyn FrameSink) -> Result<()>;
}

impl LatentStream for StreamDecoder<'_> {
    fn push(&mut self, latents: &Tensor, sink: &mut dyn FrameSink) -> Result<()> {
        StreamDecoder::push(self, latents, sink)
    }
}

impl LatentStream for gpu::DeviceStreamDecoder<'_> {
    fn push(&mut self, latents: &Tensor, sink: &mut dyn FrameSink) -> Result<()> {
        gpu::DeviceStreamDecoder::push(self, latents, sink)
    }
}

/// Collects decoded frames into a [B, C, F, H, W] tensor (the component command's output).
pub struct CollectSink {
    frames: Vec<Vec<Frames>>,
}

impl CollectSink {
    pub fn new(batch: usize) -> Self {
        CollectSink {
            frames: vec![Vec::new(); batch],
        }
    }

    /// [B, C, F, H, W] in PyTorch's channel-first layout.
    pub fn into_tensor(self) -> Result<Tensor> {
        let first = self
            .frames
            .first()
            .and_then(|f| f.first())
            .ok_or_else(|| Error::invalid("no frames decoded"))?;
        let (h, w, c) = (first.h, first.w, first.c);
        let f: usize = self.frames[0].iter().map(|x| x.t).sum();
        let b = self.frames.len();
        let mut out = crate::tensor::zeroed(b * c * f * h * w, "the decoded video")?;
        for (bi, chunks) in self.frames.iter().enumerate() {
            let mut t0 = 0;
            for chunk in chunks {
                for t in 0..chunk.t {
                    let fr = chunk.frame(t);
                    for p in 0..h * w {
                        for ch in 0..c {
                            out[(((bi * c + ch) * f) + t0 + t) * h * w + p] = fr[p * c + ch];
                        }
                    }
                }
                t0 += chunk.t;
            }
        }
        Tensor::new(vec![b, c, f, h, w], out)
    }
}

impl FrameSink for CollectSink {
    fn push(&mut self, batch_index: usize, frames: &Frames) -> Result<()> {
        self.frames[batch_index].push(frames.clone());
        Ok(())
    }
}

/// Builds the layer list, checking every tensor against the store; without a store it only
/// records (name, shape), which is how [`WanVae::weight_specs`] lists a config's weights.
struct Builder<'a> {
    store: Option<&'a WeightStore>,
    seen: Vec<(String, Vec<usize>)>,
    slots: Vec<String>,
}

/// The encoder, decoder, quant_conv and post_quant_conv of a config.
type Parts = (Coder, Coder, Conv, Conv);

impl Builder<'_> {
    fn tensor(&mut self, name: String, shape: &[usize]) -> Result<TensorEntry> {
        let e = match self.store {
            Some(s) => s.weight(&name, shape)?.clone(),
            None => TensorEntry::placeholder(&name, shape),
        };
        self.seen.push((name, shape.to_vec()));
        Ok(e)
    }

    /// A causal Conv3d `prefix` (k³ kernel, padding k/2, or 1×1×1): cached when `cached`.
    #[allow(clippy::too_many_arguments)]
    fn conv3d(
        &mut self,
        prefix: &str,
        ci: usize,
        co: usize,
        k: [usize; 3],
        pad: [usize; 3],
        stride: [usize; 3],
        cached: bool,
    ) -> Result<Conv> {
        let slot = cached.then(|| {
            self.slots.push(prefix.to_string());
            self.slots.len() - 1
        });
        Ok(Conv {
            w: self.tensor(format!("{prefix}.weight"), &[co, ci, k[0], k[1], k[2]])?,
            b: self.tensor(format!("{prefix}.bias"), &[co])?,
            ci,
            co,
            k,
            stride,
            pad: [pad[1], pad[1], pad[2], pad[2]],
            time_pad: 2 * pad[0],
            slot,
            cpu: CpuWeights::default(),
        })
    }

    /// A Conv2d applied frame by frame.
    fn conv2d(
        &mut self,
        prefix: &str,
        ci: usize,
        co: usize,
        k: usize,
        stride: usize,
        pad: Pad2,
    ) -> Result<Conv> {
        Ok(Conv {
            w: self.tensor(format!("{prefix}.weight"), &[co, ci, k, k])?,
            b: self.tensor(format!("{prefix}.bias"), &[co])?,
            ci,
            co,
            k: [1, k, k],
            stride: [1, stride, stride],
            pad,
            time_pad: 0,
            slot: None,
            cpu: CpuWeights::default(),
        })
    }

    fn gamma(&mut self, name: String, c: usize, images: bool) -> Result<TensorEntry> {
        let shape: &[usize] = if images { &[c, 1, 1] } else { &[c, 1, 1, 1] };
        self.tensor(name, shape)
    }

    fn res(&mut self, p: &str, ci: usize, co: usize) -> Result<ResBlock> {
        Ok(ResBlock {
            norm1: self.gamma(format!("{p}.norm1.gamma"), ci, false)?,
            conv1: self.conv3d(
                &format!("{p}.conv1"),
                ci,
                co,
                [3, 3, 3],
                [1, 1, 1],
                [1, 1, 1],
                true,
            )?,
            norm2: self.gamma(format!("{p}.norm2.gamma"), co, false)?,
            conv2: self.conv3d(
                &format!("{p}.conv2"),
                co,
                co,
                [3, 3, 3],
                [1, 1, 1],
                [1, 1, 1],
                true,
            )?,
            shortcut: if ci != co {
                Some(self.conv3d(
                    &format!("{p}.conv_shortcut"),
                    ci,
                    co,
                    [1, 1, 1],
                    [0, 0, 0],
                    [1, 1, 1],
                    false,
                )?)
            } else {
                None
            },
        })
    }

    fn attn(&mut self, p: &str, c: usize) -> Result<AttnBlock> {
        Ok(AttnBlock {
            norm: self.gamma(format!("{p}.norm.gamma"), c, true)?,
            qkv: self.conv2d(&format!("{p}.to_qkv"), c, 3 * c, 1, 1, [0; 4])?,
            proj: self.conv2d(&format!("{p}.proj"), c, c, 1, 1, [0; 4])?,
        })
    }

    fn mid(&mut self, p: &str, c: usize, layers: &mut Vec<Layer>) -> Result<()> {
        layers.push(Layer::Res(self.res(&format!("{p}.resnets.0"), c, c)?));
        layers.push(Layer::Attn(self.attn(&format!("{p}.attentions.0"), c)?));
        layers.push(Layer::Res(self.res(&format!("{p}.resnets.1"), c, c)?));
        Ok(())
    }

    fn coder_end(&mut self, p: &str, c: usize, co: usize) -> Result<(TensorEntry, Conv)> {
        Ok((
            self.gamma(format!("{p}.norm_out.gamma"), c, false)?,
            self.conv3d(
                &format!("{p}.conv_out"),
                c,
                co,
                [3, 3, 3],
                [1, 1, 1],
                [1, 1, 1],
                true,
            )?,
        ))
    }
}

/// A loaded AutoencoderKLWan.
pub struct WanVae {
    pub config: WanVaeConfig,
    dir: PathBuf,
    store: WeightStore,
    encoder: Coder,
    decoder: Coder,
    quant_conv: Conv,
    post_quant_conv: Conv,
}

impl WanVae {
    /// Loads a vae folder, or the `vae/` folder of a pipeline root.
    pub fn load(path: &Path) -> Result<Self> {
        let dir = resolve_component(path, "vae", &[CLASS_NAME])?;
        let config_path = dir.join("config.json");
        let config: WanVaeConfig = read_json(&config_path)?;
        config.validate(&config_path)?;
        let store = WeightStore::open_component(&dir)?;
        let mut b = Builder {
            store: Some(&store),
            seen: Vec::new(),
            slots: Vec::new(),
        };
        let (encoder, decoder, quant_conv, post_quant_conv) = Self::build(&config, &mut b)?;
        store.reject_unexpected(b.seen.iter().map(|(n, _)| n.as_str()), CLASS_NAME)?;
        drop(b);
        Ok(WanVae {
            config,
            dir,
            store,
            encoder,
            decoder,
            quant_conv,
            post_quant_conv,
        })
    }

    /// The layer structure of a config with placeholder tensors (names and shapes, no
    /// data): what the device forward walks, also for weights that exist only on a device.
    fn parts_of(config: &WanVaeConfig) -> Result<Parts> {
        let mut b = Builder {
            store: None,
            seen: Vec::new(),
            slots: Vec::new(),
        };
        Self::build(config, &mut b)
    }

    /// Every weight a config needs, (name, shape).
    pub fn weight_specs(config: &WanVaeConfig) -> Vec<(String, Vec<usize>)> {
        let mut b = Builder {
            store: None,
            seen: Vec::new(),
            slots: Vec::new(),
        };
        // Cannot fail without a store: every lookup returns a placeholder.
        let _ = Self::build(config, &mut b);
        b.seen
    }

    fn build(c: &WanVaeConfig, b: &mut Builder) -> Result<Parts> {
        let z = c.z_dim;

        // Encoder: dims = base·[1] + dim_mult.
        let dims: Vec<usize> = std::iter::once(1)
            .chain(c.dim_mult.iter().copied())
            .map(|m| c.base_dim * m)
            .collect();
        let conv_in = b.conv3d(
            "encoder.conv_in",
            c.in_channels,
            dims[0],
            [3, 3, 3],
            [1, 1, 1],
            [1, 1, 1],
            true,
        )?;
        let mut layers = Vec::new();
        let mut idx = 0;
        let mut scale = 1.0f64;
        for i in 0..c.dim_mult.len() {
            let (mut ci, co) = (dims[i], dims[i + 1]);
            for _ in 0..c.num_res_blocks {
                layers.push(Layer::Res(b.res(
                    &format!("encoder.down_blocks.{idx}"),
                    ci,
                    co,
                )?));
                idx += 1;
                if c.attn_scales.contains(&scale) {
                    layers.push(Layer::Attn(
                        b.attn(&format!("encoder.down_blocks.{idx}"), co)?,
                    ));
                    idx += 1;
                }
                ci = co;
            }
            if i + 1 != c.dim_mult.len() {
                let p = format!("encoder.down_blocks.{idx}");
                let conv = b.conv2d(&format!("{p}.resample.1"), co, co, 3, 2, [0, 1, 0, 1])?;
                layers.push(Layer::Resample(if c.temperal_downsample[i] {
                    let time_conv = b.conv3d(
                        &format!("{p}.time_conv"),
                        co,
                        co,
                        [3, 1, 1],
                        [0, 0, 0],
                        [2, 1, 1],
                        true,
                    )?;
                    Resample::Down3d { conv, time_conv }
                } else {
                    Resample::Down2d { conv }
                }));
                idx += 1;
                scale /= 2.0;
            }
        }
        let top = *dims.last().unwrap_or(&c.base_dim);
        b.mid("encoder.mid_block", top, &mut layers)?;
        let (norm_out, conv_out) = b.coder_end("encoder", top, 2 * z)?;
        let encoder = Coder {
            conv_in,
            layers,
            norm_out,
            conv_out,
            slots: std::mem::take(&mut b.slots),
        };
        let quant_conv = b.conv3d(
            "quant_conv",
            2 * z,
            2 * z,
            [1, 1, 1],
            [0, 0, 0],
            [1, 1, 1],
            false,
        )?;
        let post_quant_conv = b.conv3d(
            "post_quant_conv",
            z,
            z,
            [1, 1, 1],
            [0, 0, 0],
            [1, 1, 1],
            false,
        )?;

        // Decoder: dims = dec·([dim_mult[-1]] + reversed dim_mult); blocks after the first
        // take half the channels (the upsampling conv halves them).
        let dec = c.decoder_base_dim.unwrap_or(c.base_dim);
        let n = c.dim_mult.len();
        let ddims: Vec<usize> = std::iter::once(c.dim_mult[n - 1])
            .chain(c.dim_mult.iter().rev().copied())
            .map(|m| dec * m)
            .collect();
        let conv_in = b.conv3d(
            "decoder.conv_in",
            z,
            ddims[0],
            [3, 3, 3],
            [1, 1, 1],
            [1, 1, 1],
            true,
        )?;
        let mut layers = Vec::new();
        b.mid("decoder.mid_block", ddims[0], &mut layers)?;
        let temporal_up: Vec<bool> = c.temperal_downsample.iter().rev().copied().collect();
        for i in 0..n {
            let (mut ci, co) = (ddims[i], ddims[i + 1]);
            if i > 0 {
                ci /= 2;
            }
            let p = format!("decoder.up_blocks.{i}");
            for j in 0..=c.num_res_blocks {
                layers.push(Layer::Res(b.res(&format!("{p}.resnets.{j}"), ci, co)?));
                ci = co;
            }
            if i + 1 != n {
                let up = format!("{p}.upsamplers.0");
                let conv = b.conv2d(&format!("{up}.resample.1"), co, co / 2, 3, 1, [1, 1, 1, 1])?;
                layers.push(Layer::Resample(if temporal_up[i] {
                    let time_conv = b.conv3d(
                        &format!("{up}.time_conv"),
                        co,
                        2 * co,
                        [3, 1, 1],
                        [1, 0, 0],
                        [1, 1, 1],
                        true,
                    )?;
                    Resample::Up3d { time_conv, conv }
                } else {
                    Resample::Up2d { conv }
                }));
            }
        }
        let last = ddims[n];
        let (norm_out, conv_out) = b.coder_end("decoder", last, c.out_channels)?;
        let decoder = Coder {
            conv_in,
            layers,
            norm_out,
            conv_out,
            slots: std::mem::take(&mut b.slots),
        };
        Ok((encoder, decoder, quant_conv, post_quant_conv))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The cache slots of the decoder, by module name (what the memory planner sizes).
    pub fn decoder_slots(&self) -> &[String] {
        &self.decoder.slots
    }

    fn w(&self, e: &TensorEntry) -> Result<Cow<'_, [f32]>> {
        Ok(self.store.f32(e)?)
    }

    fn weights(&self, conv: &Conv) -> Result<std::sync::Arc<ConvWeights>> {
        if let Some(w) = conv.cpu.0.get() {
            return Ok(w.clone());
        }
        let w = std::sync::Arc::new(ConvWeights::new(
            &self.w(&conv.w)?,
            &self.w(&conv.b)?,
            conv.co,
            conv.ci,
            conv.k,
        ));
        Ok(conv.cpu.0.get_or_init(|| w).clone())
    }

    /// Runs `conv` on x with `prev` frames (a cache) or zeros in front, as WanCausalConv3d:
    /// the cache replaces as many of the time_pad zero frames as it has frames.
    fn conv(&self, conv: &Conv, x: &Frames, prev: Option<&Frames>) -> Result<Frames> {
        let cw = self.weights(conv)?;
        let mut inputs: Vec<Option<&[f32]>> = Vec::new();
        if conv.time_pad > 0 {
            let cached = prev.map(|p| p.t).unwrap_or(0).min(conv.time_pad);
            inputs.extend(std::iter::repeat_n(None, conv.time_pad - cached));
            if let Some(p) = prev {
                inputs.extend((p.t - cached..p.t).map(|i| Some(p.frame(i))));
            }
        }
        inputs.extend((0..x.t).map(|i| Some(x.frame(i))));
        conv3d(&inputs, x.h, x.w, &cw, conv.stride, conv.pad)
    }

    /// A cached causal convolution (conv_in, the residual convs, conv_out): the slot keeps
    /// the last two input frames, borrowing the previous chunk's last frame when this chunk
    /// has a single frame.
    fn cached_conv(&self, conv: &Conv, x: &Frames, cache: &mut ConvCache) -> Result<Frames> {
        let idx = conv
            .slot
            .ok_or_else(|| Error::invalid("internal: conv without a cache slot"))?;
        let prev = match &cache.slots[idx] {
            Slot::Frames(f) => Some(f),
            _ => None,
        };
        let keep = match prev {
            Some(p) if x.t < CACHE_T => p.last(1).concat(&x.last(CACHE_T)),
            _ => x.last(CACHE_T),
        };
        let out = self.conv(conv, x, prev)?;
        cache.slots[idx] = Slot::Frames(slot_frames(keep));
        Ok(out)
    }

    fn norm(&self, x: &mut Frames, gamma: &TensorEntry, silu: bool) -> Result<()> {
        cpu::channel_rms_norm(&mut x.data, x.c, &self.w(gamma)?, silu);
        Ok(())
    }

    fn res_block(&self, r: &ResBlock, x: Frames, cache: &mut ConvCache) -> Result<Frames> {
        let shortcut = match &r.shortcut {
            Some(s) => self.conv(s, &x, None)?,
            None => x.clone(),
        };
        let mut y = x;
        self.norm(&mut y, &r.norm1, true)?;
        let mut y = self.cached_conv(&r.conv1, &y, cache)?;
        self.norm(&mut y, &r.norm2, true)?;
        let mut y = self.cached_conv(&r.conv2, &y, cache)?;
        for (a, b) in y.data.iter_mut().zip(&shortcut.data) {
            *a += b;
        }
        Ok(y)
    }

    /// Single-head self-attention over the pixels of each frame (no causal state).
    fn attn_block(&self, a: &AttnBlock, x: Frames) -> Result<Frames> {
        let c = x.c;
        let mut n = x.clone();
        self.norm(&mut n, &a.norm, false)?;
        let qkv = self.conv(&a.qkv, &n, None)?; // [T, H, W, 3C]: q, k, v per pixel
        let px = x.h * x.w;
        let mut o = Frames::zeros(x.t, x.h, x.w, c)?;
        let shape = AttnShape {
            batch: x.t,
            heads: 1,
            head_dim: c,
            lq: px,
            lk: px,
            q_stride: 3 * c,
            kv_stride: 3 * c,
            out_stride: c,
            scale: 1.0 / (c as f32).sqrt(),
        };
        cpu::attention(
            &qkv.data,
            &qkv.data[c..],
            &qkv.data[2 * c..],
            &mut o.data,
            shape,
        );
        let mut y = self.conv(&a.proj, &o, None)?;
        for (v, &i) in y.data.iter_mut().zip(&x.data) {
            *v += i;
        }
        Ok(y)
    }

    fn resample(&self, r: &Resample, x: Frames, cache: &mut ConvCache) -> Result<Frames> {
        match r {
            Resample::Up2d { conv } => self.conv(conv, &upsample2x(&x)?, None),
            Resample::Down2d { conv } => self.conv(conv, &x, None),
            Resample::Up3d { time_conv, conv } => {
                let idx = time_conv
                    .slot
                    .ok_or_else(|| Error::invalid("internal: upsample without a slot"))?;
                let x = match std::mem::take(&mut cache.slots[idx]) {
                    // The first chunk is not doubled in time.
                    Slot::Empty => {
                        cache.slots[idx] = Slot::FirstChunkSeen;
                        x
                    }
                    state => {
                        let prev = match &state {
                            Slot::Frames(f) => Some(f),
                            _ => None,
                        };
                        let keep = if x.t < CACHE_T {
                            let before = match prev {
                                Some(p) => p.last(1),
                                None => Frames::zeros(1, x.h, x.w, x.c)?,
                            };
                            before.concat(&x.last(CACHE_T))
                        } else {
                            x.last(CACHE_T)
                        };
                        let y = self.conv(time_conv, &x, prev)?; // [T, H, W, 2C]
                        cache.slots[idx] = Slot::Frames(slot_frames(keep));
                        // Channels (2, C) become time: frame 2t from the first half, 2t+1
                        // from the second.
                        let c = x.c;
                        let mut out = Frames::zeros(2 * y.t, y.h, y.w, c)?;
                        let fl = y.h * y.w * c;
                        for t in 0..y.t {
                            let src = y.frame(t);
                            for p in 0..y.h * y.w {
                                for half in 0..2 {
                                    out.data[(2 * t + half) * fl + p * c..][..c]
                                        .copy_from_slice(&src[p * 2 * c + half * c..][..c]);
                                }
                            }
                        }
                        out
                    }
                };
                self.conv(conv, &upsample2x(&x)?, None)
            }
            Resample::Down3d { conv, time_conv } => {
                let x = self.conv(conv, &x, None)?;
                let idx = time_conv
                    .slot
                    .ok_or_else(|| Error::invalid("internal: downsample without a slot"))?;
                match std::mem::take(&mut cache.slots[idx]) {
                    // The first chunk passes through and is remembered whole.
                    Slot::Empty | Slot::FirstChunkSeen => {
                        cache.slots[idx] = Slot::Frames(slot_frames(x.clone()));
                        Ok(x)
                    }
                    Slot::Frames(prev) => {
                        let keep = x.last(1);
                        let input = prev.last(1).concat(&x);
                        let y = self.conv(time_conv, &input, None)?;
                        cache.slots[idx] = Slot::Frames(slot_frames(keep));
                        Ok(y)
                    }
                }
            }
        }
    }

    fn run_coder(&self, coder: &Coder, x: &Frames, cache: &mut ConvCache) -> Result<Frames> {
        let mut x = self.cached_conv(&coder.conv_in, x, cache)?;
        for layer in &coder.layers {
            x = match layer {
                Layer::Res(r) => self.res_block(r, x, cache)?,
                Layer::Attn(a) => self.attn_block(a, x)?,
                Layer::Resample(r) => self.resample(r, x, cache)?,
            };
        }
        self.norm(&mut x, &coder.norm_out, true)?;
        self.cached_conv(&coder.conv_out, &x, cache)
    }

    fn check_video(
        &self,
        shape: &[usize],
        channels: usize,
        what: &str,
        name: &str,
    ) -> Result<[usize; 4]> {
        if shape.len() != 5 || shape[0] == 0 {
            return Err(Error::invalid(format!(
                "{name} must be [B, C, T, H, W], got {shape:?}"
            )));
        }
        if shape[1] != channels {
            return Err(Error::invalid(format!(
                "{name} has {} channels, the VAE {what} takes {channels}",
                shape[1]
            )));
        }
        if shape[2..].contains(&0) {
            return Err(Error::invalid(format!(
                "{name} has an empty dimension: {shape:?}"
            )));
        }
        Ok([shape[0], shape[2], shape[3], shape[4]])
    }

    /// Posterior mean of a video. sample: [B, C_in, F, H, W] in [-1, 1], F = 1 + 4k, H and W
    /// multiples of the spatial factor. Returns latent_mean [B, z, 1 + k·4/temporal, H/s, W/s].
    pub fn encode(&self, sample: &Tensor) -> Result<Tensor> {
        let c = &self.config;
        let [b, f, h, w] = self.check_video(sample.shape(), c.in_channels, "encoder", "sample")?;
        check_encode_size(c, f, h, w)?;
        let z = c.z_dim;
        let mut outs = Vec::with_capacity(b);
        for bi in 0..b {
            let mut cache = ConvCache::new(&self.encoder.slots);
            let mut latent: Option<Frames> = None;
            let chunks = std::iter::once((0, 1)).chain((1..f).step_by(4).map(|s| (s, s + 4)));
            for (start, end) in chunks {
                let chunk = to_frames_range(sample, bi, start, end)?;
                let out = self.run_coder(&self.encoder, &chunk, &mut cache)?;
                latent = Some(match latent {
                    Some(l) => l.concat(&out),
                    None => out,
                });
            }
            let latent = latent.ok_or_else(|| Error::invalid("no frames to encode"))?;
            let moments = self.conv(&self.quant_conv, &latent, None)?; // [T', h, w, 2z]
                                                                       // The posterior mean is the first z channels.
            let mut mean = Frames::zeros(moments.t, moments.h, moments.w, z)?;
            for (dst, src) in mean
                .data
                .chunks_exact_mut(z)
                .zip(moments.data.chunks_exact(2 * z))
            {
                dst.copy_from_slice(&src[..z]);
            }
            outs.push(mean);
        }
        frames_to_tensor(&outs)
    }

    /// Decodes latents [B, z, T, h, w] (not normalized) one latent frame at a time, handing
    /// the frames of each ([1 or 4 frames, H, W, C_out], clamped to [-1, 1]) to `sink`.
    pub fn decode_to(&self, latents: &Tensor, sink: &mut dyn FrameSink) -> Result<()> {
        // The whole tensor checked first (a batch of 0 included), as each sample's decoder
        // checks it again.
        self.check_video(latents.shape(), self.config.z_dim, "decoder", "latents")?;
        let b = latents.shape()[0];
        for bi in 0..b {
            self.stream_decoder(bi).push(latents, sink)?;
        }
        Ok(())
    }

    /// A decoder for one video whose latents come a few frames at a time (block-causal
    /// streaming): its causal caches carry over from one [`StreamDecoder::push`] to the
    /// next, so the frames are those of one decode of all the latents. Frames go to the
    /// sink as sample `batch_index`.
    pub fn stream_decoder(&self, batch_index: usize) -> StreamDecoder<'_> {
        StreamDecoder {
            vae: self,
            cache: ConvCache::new(&self.decoder.slots),
            batch_index,
        }
    }
}

/// See [`WanVae::stream_decoder`].
pub struct StreamDecoder<'a> {
    vae: &'a WanVae,
    cache: ConvCache,
    batch_index: usize,
}

impl StreamDecoder<'_> {
    /// Decodes sample `batch_index` of latents [B, z, T, h, w] (not normalized) one latent
    /// frame at a time, handing the frames of each ([1 or 4 frames, H, W, C_out], clamped to
    /// [-1, 1]) to `sink`.
    pub fn push(&mut self, latents: &Tensor, sink: &mut dyn FrameSink) -> Result<()> {
        let vae = self.vae;
        let [b, t, _, _] =
            vae.check_video(latents.shape(), vae.config.z_dim, "decoder", "latents")?;
        let bi = self.batch_index;
        if bi >= b {
            return Err(Error::invalid(format!(
                "latents have {b} samples, the decoder is for sample {bi}"
            )));
        }
        for i in 0..t {
            crate::cancel::check()?;
            // post_quant_conv is 1×1×1: applying it frame by frame is exact, and nothing
            // of the latent sequence is copied whole.
            let frame = to_frames_range(latents, bi, i, i + 1)?;
            let frame = vae.conv(&vae.post_quant_conv, &frame, None)?;
            let mut out = vae.run_coder(&vae.decoder, &frame, &mut self.cache)?;
            for v in out.data.iter_mut() {
                *v = v.clamp(-1.0, 1.0);
            }
            sink.push(bi, &out)?;
        }
        Ok(())
    }

    /// Bytes the causal caches hold.
    pub fn cache_bytes(&self) -> usize {
        self.cache.bytes()
    }
}

impl WanVae {
    /// Decodes into one tensor [B, C_out, F, H, W], F = 1 + temporal·(T − 1).
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        let b = latents.shape().first().copied().unwrap_or(0);
        let mut sink = CollectSink::new(b);
        self.decode_to(latents, &mut sink)?;
        sink.into_tensor()
    }
}

/// What the encoder takes: 1 + 4k frames whose sides are multiples of the spatial factor.
fn check_encode_size(c: &WanVaeConfig, f: usize, h: usize, w: usize) -> Result<()> {
    if (f - 1) % 4 != 0 {
        return Err(Error::invalid(format!(
            "sample has {f} frames; the VAE encodes 1 + 4k frames (1, 5, 9, ..., 81)"
        )));
    }
    let s = c.spatial_factor();
    if h % s != 0 || w % s != 0 {
        return Err(Error::invalid(format!(
            "sample is {h}x{w} (HxW); both must be multiples of {s}"
        )));
    }
    Ok(())
}

/// Frames t0..t1 of sample `b` of a [B, C, T, H, W] tensor, channel-last.
pub(crate) fn to_frames_range(x: &Tensor, b: usize, t0: usize, t1: usize) -> Result<Frames> {
    let s = x.shape();
    let (c, t, h, w) = (s[1], s[2], s[3], s[4]);
    let mut out = Frames::zeros(t1 - t0, h, w, c)?;
    let src = &x.data()[b * c * t * h * w..(b + 1) * c * t * h * w];
    for ch in 0..c {
        for ti in t0..t1 {
            for p in 0..h * w {
                out.data[((ti - t0) * h * w + p) * c + ch] = src[(ch * t + ti) * h * w + p];
            }
        }
    }
    Ok(out)
}

/// Channel-last frames of each sample → [B, C, T, H, W].
fn frames_to_tensor(samples: &[Frames]) -> Result<Tensor> {
    let f0 = samples
        .first()
        .ok_or_else(|| Error::invalid("empty batch"))?;
    let (c, t, h, w) = (f0.c, f0.t, f0.h, f0.w);
    let mut out = crate::tensor::zeroed(samples.len() * c * t * h * w, "VAE frames")?;
    for (b, s) in samples.iter().enumerate() {
        for ti in 0..t {
            for p in 0..h * w {
                for ch in 0..c {
                    out[(((b * c + ch) * t + ti) * h * w) + p] = s.data[(ti * h * w + p) * c + ch];
                }
            }
        }
    }
    Tensor::new(vec![samples.len(), c, t, h, w], out)
}

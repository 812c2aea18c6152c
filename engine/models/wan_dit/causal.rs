//! Block-causal Wan (streaming video): the video is made a chunk of latent frames at a
//! time. A chunk attends bidirectionally to itself and to the cached K/V of earlier
//! frames: `sink_frames` first frames kept for the whole video, plus a rolling window of
//! the most recent ones. Every token's RoPE sits at its frame's absolute index. After a
//! chunk is denoised, the clean chunk is run once more (at the context timestep) to put its
//! K/V in the cache, and frames that left the window are evicted: the cache, and so the
//! memory, stays the same size however long the video.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::tensor::Tensor;

use super::cpu::{cpu_attention, AttentionFn, TextKv};
use super::WanDit;

/// The attention span of a block-causal model, in latent frames (LongLive's
/// `num_frame_per_block`, `sink_size` and `local_attn_size`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CausalWindow {
    /// Latent frames denoised together.
    pub chunk_frames: usize,
    /// The video's first frames, attended by every later chunk.
    pub sink_frames: usize,
    /// Frames a chunk attends to in all: the sink, the most recent earlier frames and its
    /// own. The cache keeps `local_frames - chunk_frames` earlier frames, the sink among
    /// them.
    pub local_frames: usize,
}

impl CausalWindow {
    /// Err(why) unless every chunk can see itself and the sink.
    pub fn check(&self) -> std::result::Result<(), String> {
        if self.chunk_frames == 0 {
            return Err("chunk_frames must be at least 1".into());
        }
        if self.local_frames < self.sink_frames + self.chunk_frames {
            return Err(format!(
                "local_attn_frames = {} must hold the sink ({}) and a chunk ({})",
                self.local_frames, self.sink_frames, self.chunk_frames
            ));
        }
        Ok(())
    }

    /// The earlier frames a chunk starting at `first_frame` attends to: the sink, then the
    /// latest ones that, with the sink and the chunk, fill `local_frames`.
    pub fn attended(&self, first_frame: usize) -> impl Iterator<Item = usize> + '_ {
        let recent = (first_frame + self.chunk_frames)
            .saturating_sub(self.local_frames - self.sink_frames)
            .max(self.sink_frames);
        (0..first_frame).filter(move |&f| f < self.sink_frames || f >= recent)
    }

    /// The most frames the cache ever holds.
    pub fn cached_frames(&self) -> usize {
        self.local_frames - self.chunk_frames
    }
}

/// The K/V of earlier frames, per block (after QK-norm and RoPE), for one sample batch.
pub struct KvCache {
    batch: usize,
    grid_hw: [usize; 2],
    dim: usize,
    /// Absolute indices of the cached frames, ascending.
    frames: Vec<usize>,
    /// Per block: K and V, [B, frames · tokens per frame, D] each.
    pub(super) blocks: Vec<(Vec<f32>, Vec<f32>)>,
}

impl KvCache {
    /// An empty cache for `batch` samples of a post-patch grid `grid_hw` (latent size / patch).
    pub fn new(model: &WanDit, batch: usize, grid_hw: [usize; 2]) -> KvCache {
        KvCache {
            batch,
            grid_hw,
            dim: model.config.inner_dim(),
            frames: Vec::new(),
            blocks: vec![(Vec::new(), Vec::new()); model.layers.blocks.len()],
        }
    }

    /// Absolute indices of the frames held.
    pub fn frames(&self) -> &[usize] {
        &self.frames
    }

    /// Bytes of K/V held.
    pub fn bytes(&self) -> usize {
        self.blocks
            .iter()
            .map(|(k, v)| (k.len() + v.len()) * 4)
            .sum()
    }

    fn tokens_per_frame(&self) -> usize {
        self.grid_hw[0] * self.grid_hw[1]
    }

    pub(super) fn check(
        &self,
        batch: usize,
        grid: [usize; 3],
        d: usize,
        blocks: usize,
    ) -> Result<()> {
        if batch != self.batch
            || [grid[1], grid[2]] != self.grid_hw
            || d != self.dim
            || blocks != self.blocks.len()
        {
            return Err(Error::invalid(format!(
                "the K/V cache was made for batch {} and a {}x{} token grid, the chunk is batch {batch} of {}x{}",
                self.batch, self.grid_hw[0], self.grid_hw[1], grid[1], grid[2]
            )));
        }
        Ok(())
    }

    /// Appends a chunk's K/V ([B · chunk tokens, D] per block) for frames
    /// `first_frame ..`, then keeps only what a chunk after it attends to.
    fn push(
        &mut self,
        first_frame: usize,
        chunk: Vec<(Vec<f32>, Vec<f32>)>,
        window: &CausalWindow,
    ) {
        let (b, d, tpf) = (self.batch, self.dim, self.tokens_per_frame());
        let n_new = chunk.first().map_or(0, |(k, _)| k.len() / (b * tpf * d));
        let mut frames = self.frames.clone();
        frames.extend(first_frame..first_frame + n_new);
        let next = first_frame + n_new;
        let keep: Vec<usize> = window.attended(next).collect();
        let rows = |fs: &[usize]| fs.len() * tpf;
        for ((ck, cv), (nk, nv)) in self.blocks.iter_mut().zip(chunk) {
            let (old_rows, new_rows) = (rows(&self.frames), n_new * tpf);
            let pick = |old: &[f32], new: &[f32]| {
                let mut out = Vec::with_capacity(b * keep.len() * tpf * d);
                for s in 0..b {
                    for (i, f) in frames.iter().enumerate() {
                        if !keep.contains(f) {
                            continue;
                        }
                        let rows_of = |src: &[f32], per: usize, at: usize| {
                            let base = (s * per + at * tpf) * d;
                            src[base..base + tpf * d].to_vec()
                        };
                        if i < self.frames.len() {
                            out.extend(rows_of(old, old_rows, i));
                        } else {
                            out.extend(rows_of(new, new_rows, i - self.frames.len()));
                        }
                    }
                }
                out
            };
            let (k, v) = (pick(ck, &nk), pick(cv, &nv));
            *ck = k;
            *cv = v;
        }
        self.frames = frames.into_iter().filter(|f| keep.contains(f)).collect();
    }
}

/// A chunk's view of the cache inside the forward ([`WanDit::forward_chunk`]).
pub(super) struct Causal<'a> {
    pub(super) cache: &'a KvCache,
    pub(super) first_frame: usize,
    /// Where each block's chunk K/V go when the pass fills the cache (no output head then).
    pub(super) collect: Option<&'a mut Vec<(Vec<f32>, Vec<f32>)>>,
}

/// [B, la, D] then [B, lb, D] → [B, la + lb, D].
pub(super) fn concat_rows(a: &[f32], b: &[f32], batch: usize, d: usize) -> Vec<f32> {
    let (ra, rb) = (a.len() / (batch * d), b.len() / (batch * d));
    let mut out = Vec::with_capacity(a.len() + b.len());
    for s in 0..batch {
        out.extend_from_slice(&a[s * ra * d..(s + 1) * ra * d]);
        out.extend_from_slice(&b[s * rb * d..(s + 1) * rb * d]);
    }
    out
}

impl WanDit {
    fn check_chunk(&self, x: &Tensor, first_frame: usize) -> Result<()> {
        let c = &self.config;
        if c.patch_size[0] != 1 {
            return Err(Error::invalid(format!(
                "block-causal generation needs a temporal patch of 1, the model's is {}",
                c.patch_size[0]
            )));
        }
        let frames = x.shape().get(2).copied().unwrap_or(0);
        if first_frame + frames > c.rope_max_seq_len {
            return Err(Error::invalid(format!(
                "latent frame {} is past the model's rope_max_seq_len = {} positions",
                first_frame + frames,
                c.rope_max_seq_len
            )));
        }
        Ok(())
    }

    /// The flow prediction for one chunk x: [B, C, c, H, W] whose first latent frame is
    /// `first_frame` of the video, attending to the cached earlier frames.
    pub fn forward_chunk(
        &self,
        x: &Tensor,
        timestep: &Tensor,
        text: &TextKv,
        cache: &KvCache,
        first_frame: usize,
    ) -> Result<Tensor> {
        self.forward_chunk_with_attention(x, timestep, text, cache, first_frame, &mut cpu_attention)
    }

    /// [`forward_chunk`](Self::forward_chunk) with every attention computed by `attn`.
    pub fn forward_chunk_with_attention(
        &self,
        x: &Tensor,
        timestep: &Tensor,
        text: &TextKv,
        cache: &KvCache,
        first_frame: usize,
        attn: &mut AttentionFn<'_>,
    ) -> Result<Tensor> {
        self.check_chunk(x, first_frame)?;
        let causal = Causal {
            cache,
            first_frame,
            collect: None,
        };
        self.run(x, timestep, text, attn, Some(causal))?
            .ok_or_else(|| Error::invalid("the DiT made no output"))
    }

    /// Runs the clean chunk `x` (at the context timestep) through the blocks and puts its
    /// K/V in the cache, evicting what no later chunk attends to.
    pub fn cache_chunk(
        &self,
        x: &Tensor,
        timestep: &Tensor,
        text: &TextKv,
        cache: &mut KvCache,
        first_frame: usize,
        window: &CausalWindow,
    ) -> Result<()> {
        self.check_chunk(x, first_frame)?;
        if cache.frames.last().is_some_and(|&f| f >= first_frame) {
            return Err(Error::invalid(format!(
                "chunk at frame {first_frame}: the cache already holds frame {}",
                cache.frames.last().unwrap()
            )));
        }
        let mut collected = Vec::with_capacity(cache.blocks.len());
        let causal = Causal {
            cache,
            first_frame,
            collect: Some(&mut collected),
        };
        self.run(x, timestep, text, &mut cpu_attention, Some(causal))?;
        cache.push(first_frame, collected, window);
        Ok(())
    }
}

/// `causal_config.json` beside a block-causal transformer's config.json: how it makes a
/// video chunk by chunk. The published models (both Wan2.1-T2V-1.3B fine-tunes, converted
/// with `reel convert`):
///
/// | model | chunk_frames | sink_frames | local_attn_frames | denoising_steps | timestep_shift | context_timestep | sampler |
/// |---|---|---|---|---|---|---|---|
/// | Self-Forcing (DMD) | 3 | 0 | 21 | 1000, 750, 500, 250 | 5.0 | 0 | renoise |
/// | LongLive | 3 | 3 | 12 | 1000, 750, 500, 250 | 5.0 | 0 | renoise |
///
/// Self-Forcing attends to every earlier frame of its 21-frame videos; with 21 it rolls
/// beyond them (frames older than the last 18 leave the window).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CausalConfig {
    /// Latent frames denoised together (`num_frame_per_block`).
    pub chunk_frames: usize,
    /// The video's first latent frames, attended to by every chunk (`sink_size`).
    #[serde(default)]
    pub sink_frames: usize,
    /// Latent frames a chunk attends to, the sink and its own frames included
    /// (`local_attn_size`).
    pub local_attn_frames: usize,
    /// The denoising steps on the 1000-step training grid, first to last
    /// (`denoising_step_list`), warped by `timestep_shift` as `warp_denoising_step` does.
    pub denoising_steps: Vec<f64>,
    /// The flow-matching shift that warps the steps (1 = none).
    #[serde(default = "default_shift")]
    pub timestep_shift: f64,
    /// The timestep at which a finished chunk is run again to fill the cache
    /// (`context_noise`).
    #[serde(default)]
    pub context_timestep: f64,
    /// How a chunk is denoised: `renoise` (Self-Forcing's few-step sampler, for distilled
    /// models) or `euler` (the flow ODE, for models trained by plain flow matching).
    #[serde(default)]
    pub sampler: ChunkSampler,
    /// Classifier-free guidance at every step (1 = none, as the distilled models run) unless
    /// `guidance_steps` gives each step its own: the flow is u + g·(c − u), u from the
    /// negative prompt over the same cache.
    #[serde(default = "one")]
    pub guidance: f32,
    /// A guidance scale for each of `denoising_steps`, in place of `guidance` (empty: `guidance`
    /// at every step). A step at ≤ 1 skips the negative prompt's pass.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub guidance_steps: Vec<f32>,
    /// Each chunk after the first starts from the last latent frame of the chunk before
    /// (repeated over the chunk's frames) as (1 − σ)·frame + σ·noise, σ that of the first step
    /// at or below this value, and runs from that step (the ones before it are skipped): its
    /// denoising starts where the video is, which otherwise it only attends to. Absent: every
    /// chunk starts from pure noise, as Self-Forcing and LongLive do. On the demo (README):
    /// fewer shapes drawn at once and no jumps between chunks, but shapes that slow down.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_frame_sigma: Option<f64>,
}

fn one() -> f32 {
    1.0
}

/// See [`CausalConfig::sampler`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ChunkSampler {
    /// x0 = x − σ·flow at every step, then x0 noised afresh to the next step's σ; the last
    /// x0 is the chunk.
    #[default]
    Renoise,
    /// x ← x + (σ_next − σ)·flow, with σ = 0 after the last step.
    Euler,
}

fn default_shift() -> f64 {
    5.0
}

impl CausalConfig {
    pub const FILE: &'static str = "causal_config.json";

    /// The config beside a transformer's weights, or None for a bidirectional model.
    pub fn load(transformer_dir: &std::path::Path) -> Result<Option<CausalConfig>> {
        let path = transformer_dir.join(Self::FILE);
        if !path.is_file() {
            return Ok(None);
        }
        let c: CausalConfig = crate::models::read_json(&path)?;
        c.validate(&path)?;
        Ok(Some(c))
    }

    pub fn validate(&self, origin: &std::path::Path) -> Result<()> {
        let bad = |reason: String| Error::Config {
            path: origin.to_path_buf(),
            reason,
        };
        self.window().check().map_err(bad)?;
        if self.chunk_frames > 64 || self.local_attn_frames > 1024 {
            return Err(bad(format!(
                "chunk_frames = {} / local_attn_frames = {} out of range (64 / 1024 at most)",
                self.chunk_frames, self.local_attn_frames
            )));
        }
        if self.denoising_steps.is_empty() || self.denoising_steps.len() > 1000 {
            return Err(bad("denoising_steps must list 1 to 1000 steps".into()));
        }
        for (i, &t) in self.denoising_steps.iter().enumerate() {
            if !(t.is_finite() && t > 0.0 && t <= 1000.0) {
                return Err(bad(format!(
                    "denoising_steps[{i}] = {t} is not in (0, 1000]"
                )));
            }
            if i > 0 && t >= self.denoising_steps[i - 1] {
                return Err(bad(format!(
                    "denoising_steps must decrease, but [{i}] = {t} follows {}",
                    self.denoising_steps[i - 1]
                )));
            }
        }
        if !(self.timestep_shift.is_finite()
            && self.timestep_shift > 0.0
            && self.timestep_shift <= 100.0)
        {
            return Err(bad(format!(
                "timestep_shift = {} is not in (0, 100]",
                self.timestep_shift
            )));
        }
        if !(self.guidance.is_finite() && (0.0..=100.0).contains(&self.guidance)) {
            return Err(bad(format!(
                "guidance = {} is not in [0, 100]",
                self.guidance
            )));
        }
        if !self.guidance_steps.is_empty() {
            if self.guidance_steps.len() != self.denoising_steps.len() {
                return Err(bad(format!(
                    "guidance_steps lists {} scales for {} denoising_steps (one per step, or none)",
                    self.guidance_steps.len(),
                    self.denoising_steps.len()
                )));
            }
            if let Some((i, g)) = self
                .guidance_steps
                .iter()
                .enumerate()
                .find(|(_, g)| !(g.is_finite() && (0.0..=100.0).contains(*g)))
            {
                return Err(bad(format!("guidance_steps[{i}] = {g} is not in [0, 100]")));
            }
        }
        if let Some(s) = self.previous_frame_sigma {
            let last = self.sigmas().last().copied().unwrap_or(1.0) as f64;
            if !(s.is_finite() && s <= 1.0 && s >= last) {
                return Err(bad(format!(
                    "previous_frame_sigma = {s} is not in [{last:.4}, 1] (the last step's σ, so that a step is left)"
                )));
            }
        }
        if !(self.context_timestep.is_finite() && (0.0..=1000.0).contains(&self.context_timestep)) {
            return Err(bad(format!(
                "context_timestep = {} is not in [0, 1000]",
                self.context_timestep
            )));
        }
        Ok(())
    }

    /// The guidance scale of denoising step `step`.
    pub fn guidance_at(&self, step: usize) -> f32 {
        self.guidance_steps
            .get(step)
            .copied()
            .unwrap_or(self.guidance)
    }

    /// The step a chunk starting at `first_frame` begins at: 0, or for a chunk after the
    /// first with `previous_frame_sigma`, the first step whose σ is at or below it.
    pub fn first_step(&self, first_frame: usize) -> usize {
        match self.previous_frame_sigma {
            Some(s) if first_frame > 0 => {
                let sigmas = self.sigmas();
                let i = sigmas.iter().position(|&v| v as f64 <= s);
                i.unwrap_or(sigmas.len() - 1)
            }
            _ => 0,
        }
    }

    /// The steps of a chunk, for logs and reports: "8", or with `previous_frame_sigma`,
    /// "8 (5 after the first chunk)".
    pub fn steps_label(&self) -> String {
        let n = self.denoising_steps.len();
        match self.first_step(self.chunk_frames) {
            0 => n.to_string(),
            first => format!("{n} ({} after the first chunk)", n - first),
        }
    }

    /// The largest step's guidance scale.
    pub fn peak_guidance(&self) -> f32 {
        (0..self.denoising_steps.len())
            .map(|i| self.guidance_at(i))
            .fold(f32::MIN, f32::max)
    }

    /// Whether any step is guided (> 1), so that the negative prompt is needed.
    pub fn guided(&self) -> bool {
        self.peak_guidance() > 1.0
    }

    /// The guidance as written for people: "3", or the per-step scales "3, 3, 7, 7".
    pub fn guidance_label(&self) -> String {
        if self.guidance_steps.is_empty() {
            return self.guidance.to_string();
        }
        let each: Vec<String> = self.guidance_steps.iter().map(f32::to_string).collect();
        each.join(", ")
    }

    pub fn window(&self) -> CausalWindow {
        CausalWindow {
            chunk_frames: self.chunk_frames,
            sink_frames: self.sink_frames,
            local_frames: self.local_attn_frames,
        }
    }

    /// The noise level of each step: σ = shift·s / (1 + (shift − 1)·s) with s = t / 1000;
    /// the DiT sees 1000·σ.
    pub fn sigmas(&self) -> Vec<f32> {
        let k = self.timestep_shift;
        self.denoising_steps
            .iter()
            .map(|&t| {
                let s = t / 1000.0;
                (k * s / (1.0 + (k - 1.0) * s)) as f32
            })
            .collect()
    }
}

/// What a block-causal generation makes: `frames` latent frames of `channels` × `height` ×
/// `width` (one sample; no guidance).
#[derive(Debug, Clone, Copy)]
pub struct StreamShape {
    pub channels: usize,
    pub frames: usize,
    pub height: usize,
    pub width: usize,
}

/// A block-causal model as [`stream_with`] drives it: the CPU reference ([`CpuChunks`]) or
/// a device session ([`super::gpu::DeviceChunks`]).
pub trait ChunkModel {
    /// The flow prediction [1, C_out, c, H, W] for chunk x [1, C, c, H, W] whose first
    /// latent frame is `first_frame`, at timestep `t`, with the prompt (`negative` false) or
    /// the negative prompt, over the cached K/V of earlier frames.
    fn flow(&mut self, x: &Tensor, t: f32, first_frame: usize, negative: bool) -> Result<Tensor>;
    /// Runs the clean chunk x at timestep `t` with the prompt and puts its K/V in the cache,
    /// evicting what no later chunk attends to.
    fn cache(&mut self, x: &Tensor, t: f32, first_frame: usize) -> Result<()>;
}

/// The CPU reference as a [`ChunkModel`]: the DiT, the prompts' text K/V and a [`KvCache`].
pub struct CpuChunks<'a> {
    pub dit: &'a WanDit,
    pub text: &'a TextKv,
    pub uncond: Option<&'a TextKv>,
    pub cache: KvCache,
    pub window: CausalWindow,
}

impl ChunkModel for CpuChunks<'_> {
    fn flow(&mut self, x: &Tensor, t: f32, first_frame: usize, negative: bool) -> Result<Tensor> {
        let text = match (negative, self.uncond) {
            (false, _) => self.text,
            (true, Some(u)) => u,
            (true, None) => return Err(Error::invalid("no negative prompt for guidance")),
        };
        let t = Tensor::new(vec![1], vec![t])?;
        self.dit
            .forward_chunk(x, &t, text, &self.cache, first_frame)
    }

    fn cache(&mut self, x: &Tensor, t: f32, first_frame: usize) -> Result<()> {
        let t = Tensor::new(vec![1], vec![t])?;
        self.dit
            .cache_chunk(x, &t, self.text, &mut self.cache, first_frame, &self.window)
    }
}

/// [`stream_with`] on the CPU reference: the DiT with the prompt's text K/V and, for
/// guidance, the negative prompt's.
pub fn stream(
    dit: &WanDit,
    cfg: &CausalConfig,
    text: &TextKv,
    uncond: Option<&TextKv>,
    shape: StreamShape,
    noise: &mut dyn FnMut(usize, usize, usize) -> Vec<f32>,
    on_chunk: &mut dyn FnMut(usize, &Tensor) -> Result<()>,
) -> Result<()> {
    let mut model = CpuChunks::new(dit, cfg, text, uncond, shape)?;
    stream_with(&mut model, cfg, shape, noise, on_chunk)
}

impl<'a> CpuChunks<'a> {
    /// The CPU reference for a video of `shape` with an empty cache (checked: the latents
    /// are whole patches; guidance has the negative prompt's K/V).
    pub fn new(
        dit: &'a WanDit,
        cfg: &CausalConfig,
        text: &'a TextKv,
        uncond: Option<&'a TextKv>,
        shape: StreamShape,
    ) -> Result<Self> {
        let [_, ph, pw] = dit.config.patch_size;
        if shape.height % ph != 0 || shape.width % pw != 0 || shape.height == 0 || shape.width == 0
        {
            return Err(Error::invalid(format!(
                "latents of {}x{} are not a positive multiple of the patch {ph}x{pw}",
                shape.height, shape.width
            )));
        }
        if cfg.guided() && uncond.is_none() {
            return Err(Error::invalid(format!(
                "guidance {} needs the negative prompt's embeddings",
                cfg.guidance_label()
            )));
        }
        Ok(CpuChunks {
            dit,
            text,
            uncond,
            cache: KvCache::new(dit, 1, [shape.height / ph, shape.width / pw]),
            window: cfg.window(),
        })
    }
}

/// Makes a video chunk by chunk: a chunk starts from noise and is denoised by the config's
/// sampler (Self-Forcing's re-noising one: at each step x0 = x − σ·flow, then x is x0 noised
/// afresh to the next step's σ; or Euler steps); the result is handed to
/// `on_chunk(first_frame, x0)` as [1, C, c, H, W], then run at the context timestep to fill
/// the cache (skipped after the last chunk; with the prompt's text only). With guidance the
/// flow at a step is u + g·(c − u), u from the negative prompt over the same cache, g the
/// step's scale ([`CausalConfig::guidance_at`]; a step at g ≤ 1 has no negative pass).
/// With `previous_frame_sigma`, a chunk after the first starts at [`CausalConfig::first_step`]
/// from the last latent frame of the chunk before, mixed with its noise at that step's σ.
/// `noise(chunk, step, n)` draws the noise of a chunk's step (step 0: its start). The latent
/// frames are rounded up to whole chunks.
pub fn stream_with(
    model: &mut dyn ChunkModel,
    cfg: &CausalConfig,
    shape: StreamShape,
    noise: &mut dyn FnMut(usize, usize, usize) -> Vec<f32>,
    on_chunk: &mut dyn FnMut(usize, &Tensor) -> Result<()>,
) -> Result<()> {
    let chunks = shape.frames.div_ceil(cfg.chunk_frames);
    let sigmas = cfg.sigmas();
    let dims = vec![
        1,
        shape.channels,
        cfg.chunk_frames,
        shape.height,
        shape.width,
    ];
    let n: usize = dims.iter().product();
    let (c, plane) = (cfg.chunk_frames, shape.height * shape.width);
    // The step every chunk after the first begins at, and (with `previous_frame_sigma`) the
    // last latent frame of the chunk before, [C, H, W].
    let restart = cfg.first_step(c);
    let mut last: Option<Vec<f32>> = None;
    for k in 0..chunks {
        let f0 = k * c;
        let first = if k == 0 { 0 } else { restart };
        let mut x = Tensor::new(dims.clone(), noise(k, 0, n))?;
        if let Some(prev) = &last {
            let s = sigmas[first];
            for (i, v) in x.data_mut().iter_mut().enumerate() {
                let (ch, p) = (i / (c * plane), i % plane);
                *v = (1.0 - s) * prev[ch * plane + p] + s * *v;
            }
        }
        let mut x0 = vec![0.0f32; n];
        for (i, &sigma) in sigmas.iter().enumerate().skip(first) {
            let t = sigma * 1000.0;
            let mut flow = model.flow(&x, t, f0, false)?;
            let g = cfg.guidance_at(i);
            if g > 1.0 {
                let un = model.flow(&x, t, f0, true)?;
                for (c, &u) in flow.data_mut().iter_mut().zip(un.data()) {
                    *c = u + g * (*c - u);
                }
            }
            if cfg.sampler == ChunkSampler::Euler {
                let dt = sigmas.get(i + 1).copied().unwrap_or(0.0) - sigma;
                for (xv, &fv) in x.data_mut().iter_mut().zip(flow.data()) {
                    *xv += dt * fv;
                }
                if i + 1 == sigmas.len() {
                    x0.copy_from_slice(x.data());
                }
                continue;
            }
            for ((o, &xv), &fv) in x0.iter_mut().zip(x.data()).zip(flow.data()) {
                *o = xv - sigma * fv;
            }
            if let Some(&next) = sigmas.get(i + 1) {
                let z = noise(k, i + 1, n);
                let data = x0
                    .iter()
                    .zip(&z)
                    .map(|(&a, &e)| (1.0 - next) * a + next * e)
                    .collect();
                x = Tensor::new(dims.clone(), data)?;
            }
        }
        if cfg.previous_frame_sigma.is_some() {
            let frame = last.get_or_insert_with(|| Vec::with_capacity(shape.channels * plane));
            frame.clear();
            for ch in 0..shape.channels {
                frame.extend_from_slice(&x0[(ch * c + c - 1) * plane..][..plane]);
            }
        }
        let clean = Tensor::new(dims.clone(), x0)?;
        on_chunk(f0, &clean)?;
        if k + 1 < chunks {
            model.cache(&clean, cfg.context_timestep as f32, f0)?;
        }
    }
    Ok(())
}

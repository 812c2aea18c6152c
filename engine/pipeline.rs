//! The text-to-video pipeline (diffusers' WanPipeline): prompt embeddings, seeded noise,
//! the denoising loop with classifier-free guidance, de-normalization, and the streaming VAE
//! decode into a frame sink.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::cpu::conv::Frames;
use crate::error::{Error, Result};
use crate::gpu::DeviceWeights;
use crate::kernels::{KernelDevice, MemTracker, TrackGuard};
use crate::models::wan_dit::gpu::{CausalSession, DeviceChunks, DitShape};
use crate::models::wan_dit::{
    stream_with, CausalConfig, ChunkModel, CpuChunks, StreamShape, WanDit,
};
use crate::models::wan_vae::{FrameSink, LatentStream, WanVae};
use crate::sampler::{Sampler, SchedulerConfig};
use crate::tensor::Tensor;
use crate::text::TextEncoder;

/// A loaded pipeline folder: transformer/, vae/, scheduler/ and, when present,
/// text_encoder/ + tokenizer/ (without them, prompt embeddings must be given).
pub struct Pipeline {
    pub root: PathBuf,
    pub dit: WanDit,
    pub vae: WanVae,
    pub text: Option<TextEncoder>,
    pub scheduler: SchedulerConfig,
    /// A block-causal transformer's causal_config.json: videos are then made chunk by
    /// chunk ([`Pipeline::stream_to`]).
    pub causal: Option<CausalConfig>,
    /// Set by [`Pipeline::to_device`]: every stage then runs on that kernel device.
    pub device: Option<OnDevice>,
}

/// A pipeline's weights on a kernel device (cuda or emu): the DiT's, the VAE decoder's and
/// the text encoder's when there is one. Which of them are on the device follows the plan's
/// decision ([`crate::plan::PlanReport::text_encoder_resident`]): resident, all three stay
/// up together; otherwise the text encoder goes up for the prompts and is freed before the
/// DiT's and the VAE's weights go up (and they are freed before it goes up again for the
/// next video's prompts), so that the peak is the plan's.
pub struct OnDevice {
    pub dev: KernelDevice,
    /// The device memory the pipeline holds (weights, sessions), counted apart from the
    /// rest of the process.
    pub memory: Arc<MemTracker>,
    state: std::sync::Mutex<DeviceState>,
}

struct DeviceState {
    text_resident: bool,
    dit: Option<Arc<DeviceWeights>>,
    vae: Option<Arc<DeviceWeights>>,
    text: Option<Arc<DeviceWeights>>,
}

/// The two groups of weights a stage needs on the device.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Stage {
    Text,
    /// The DiT and the VAE decoder (denoising, then decoding).
    Video,
}

/// Conditioning for one batch: [B, L, text_dim] each.
pub struct Conditioning {
    pub prompt_embeds: Tensor,
    /// None when guidance is off (≤ 1): the unconditional pass is skipped.
    pub negative_prompt_embeds: Option<Tensor>,
}

impl Pipeline {
    pub fn load(root: &Path) -> Result<Self> {
        let dit = WanDit::load(root)?;
        let vae = WanVae::load(root)?;
        if dit.config.in_channels != vae.config.z_dim
            || dit.config.out_channels() != vae.config.z_dim
        {
            return Err(Error::Config {
                path: root.to_path_buf(),
                reason: format!(
                    "the transformer takes {} latent channels but the VAE has z_dim {}",
                    dit.config.in_channels, vae.config.z_dim
                ),
            });
        }
        if vae.config.out_channels != 3 {
            return Err(Error::Config {
                path: root.join("vae").join("config.json"),
                reason: format!(
                    "out_channels = {}: video needs 3 (RGB)",
                    vae.config.out_channels
                ),
            });
        }
        let text = if root.join("text_encoder").join("config.json").is_file() {
            Some(TextEncoder::load(root)?)
        } else {
            None
        };
        let sched_file = root.join("scheduler").join("scheduler_config.json");
        let scheduler = if sched_file.is_file() {
            SchedulerConfig::load(&sched_file)?
        } else {
            tracing::warn!(
                "{}: no scheduler/scheduler_config.json; using Wan2.1's UniPC defaults",
                root.display()
            );
            SchedulerConfig::default()
        };
        let causal = CausalConfig::load(dit.dir())?;
        Ok(Pipeline {
            root: root.to_path_buf(),
            dit,
            vae,
            text,
            scheduler,
            causal,
            device: None,
        })
    }

    /// Puts the pipeline on `dev` (the DiT's weights in bf16, the VAE decoder's and umT5's
    /// in their device dtypes); from then on every stage runs there. `text_resident`: the
    /// plan's decision (see [`OnDevice`]); the weights the first stage needs go up now.
    pub fn to_device(&mut self, dev: KernelDevice, text_resident: bool) -> Result<()> {
        self.device = Some(OnDevice {
            dev,
            memory: MemTracker::new(),
            state: std::sync::Mutex::new(DeviceState {
                text_resident,
                dit: None,
                vae: None,
                text: None,
            }),
        });
        if self.text.is_some() {
            self.weights_for(Stage::Text)?;
        }
        if text_resident || self.text.is_none() {
            self.weights_for(Stage::Video)?;
        }
        Ok(())
    }

    /// Changes the text encoder's residency (the server plans each request): resident, the
    /// missing weights go up at the next stage; not, the text encoder is freed now.
    pub fn set_text_resident(&self, resident: bool) {
        if let Some(d) = &self.device {
            let mut st = d.state.lock().unwrap_or_else(|e| e.into_inner());
            st.text_resident = resident;
            if !resident {
                st.text = None;
            }
        }
    }

    /// Whether the text encoder stays on the device beside the DiT and the VAE.
    pub fn text_resident(&self) -> Option<bool> {
        let d = self.device.as_ref()?;
        Some(
            d.state
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .text_resident,
        )
    }

    /// The device weights `stage` needs, uploaded if they are not there (after freeing the
    /// other group's when the text encoder is not resident): (DiT, VAE) or (text, text).
    fn weights_for(&self, stage: Stage) -> Result<(Arc<DeviceWeights>, Arc<DeviceWeights>)> {
        use crate::models::umt5::gpu as tg;
        use crate::models::wan_vae::gpu as vg;
        let d = self
            .device
            .as_ref()
            .ok_or_else(|| Error::invalid("internal: the pipeline is not on a device"))?;
        let _track = d.memory.enter();
        let mut st = d.state.lock().unwrap_or_else(|e| e.into_inner());
        match stage {
            Stage::Text => {
                let text = self
                    .text
                    .as_ref()
                    .ok_or_else(|| Error::invalid("internal: the pipeline has no text encoder"))?;
                if !st.text_resident {
                    // Freed first: the plan's peak has the text encoder alone.
                    st.dit = None;
                    st.vae = None;
                }
                let t = match &st.text {
                    Some(t) => t.clone(),
                    None => {
                        let t = Arc::new(text.encoder.upload(&d.dev, tg::dtype_from_env()?)?);
                        st.text = Some(t.clone());
                        t
                    }
                };
                Ok((t.clone(), t))
            }
            Stage::Video => {
                if !st.text_resident {
                    st.text = None;
                }
                let dit = match &st.dit {
                    Some(w) => w.clone(),
                    None => {
                        let w = Arc::new(self.dit.upload(&d.dev)?);
                        st.dit = Some(w.clone());
                        w
                    }
                };
                let vae = match &st.vae {
                    Some(w) => w.clone(),
                    None => {
                        let dtype = vg::dtype_from_env()?;
                        let w = Arc::new(self.vae.upload(&d.dev, vg::Coding::Decode, dtype)?);
                        st.vae = Some(w.clone());
                        w
                    }
                };
                Ok((dit, vae))
            }
        }
    }

    /// Charges this thread's device allocations to the pipeline's tracker (on a device).
    fn track(&self) -> Option<TrackGuard> {
        self.device.as_ref().map(|d| d.memory.enter())
    }

    /// The device memory the pipeline holds (None: on the cpu).
    pub fn device_memory(&self) -> Option<&Arc<MemTracker>> {
        self.device.as_ref().map(|d| &d.memory)
    }

    /// The device the stages run on (None: the cpu).
    pub fn kernel_device(&self) -> Option<&KernelDevice> {
        self.device.as_ref().map(|d| &d.dev)
    }

    /// Prompt embeddings for `prompts` and, with guidance, `negative` (one per prompt; ""
    /// is encoded like any prompt), zero-padded to `max_len` as WanPipeline does.
    pub fn encode_prompts(
        &self,
        prompts: &[&str],
        negative: &[&str],
        guidance: f32,
        max_len: usize,
    ) -> Result<Conditioning> {
        let _track = self.track();
        let text = self.text.as_ref().ok_or_else(|| {
            Error::invalid(format!(
                "{} has no text_encoder/: pass --prompt-embeds with `prompt_embeds` and `negative_prompt_embeds`",
                self.root.display()
            ))
        })?;
        let encode = |p: &[&str]| -> Result<Tensor> {
            match &self.device {
                None => text.encode_prompts(p, max_len),
                Some(d) => {
                    let (w, _) = self.weights_for(Stage::Text)?;
                    text.encode_prompts_with(p, max_len, &mut |ids, mask, b, l| {
                        text.encoder.forward_on(&d.dev, &w, ids, mask, b, l)
                    })
                }
            }
        };
        let prompt_embeds = encode(prompts)?;
        let negative_prompt_embeds = if guidance > 1.0 {
            Some(encode(negative)?)
        } else {
            None
        };
        Ok(Conditioning {
            prompt_embeds,
            negative_prompt_embeds,
        })
    }

    /// Latent shape [B, z, T, h, w] for a video of `frames` frames of `height`×`width`.
    pub fn latent_shape(
        &self,
        batch: usize,
        frames: usize,
        height: usize,
        width: usize,
    ) -> [usize; 5] {
        let c = &self.vae.config;
        let (s, t) = (c.spatial_factor(), c.temporal_factor());
        [batch, c.z_dim, (frames - 1) / t + 1, height / s, width / s]
    }

    /// The denoising loop: for each step, the DiT's flow prediction on the conditional
    /// embeddings and (with guidance) the unconditional ones, combined as
    /// uncond + g·(cond − uncond), then one sampler step. `on_step(i, n)` runs after every
    /// step; returning an error stops the loop (cancellation). Returns the final latents,
    /// not de-normalized.
    pub fn denoise(
        &self,
        mut latents: Tensor,
        cond: &Conditioning,
        guidance: f32,
        sampler: &mut dyn Sampler,
        on_step: &mut dyn FnMut(usize, usize) -> Result<()>,
    ) -> Result<Tensor> {
        let _track = self.track();
        let b = latents.shape()[0];
        if cond.prompt_embeds.shape().first() != Some(&b) {
            return Err(Error::invalid(format!(
                "prompt_embeds has batch {:?}, the latents {b}",
                cond.prompt_embeds.shape().first()
            )));
        }
        let uncond = if guidance > 1.0 {
            let n = cond.negative_prompt_embeds.as_ref().ok_or_else(|| {
                Error::invalid(
                    "guidance > 1 needs negative prompt embeddings (the empty prompt by default)",
                )
            })?;
            if n.shape() != cond.prompt_embeds.shape() {
                return Err(Error::invalid(format!(
                    "negative_prompt_embeds {:?} must have the shape of prompt_embeds {:?}",
                    n.shape(),
                    cond.prompt_embeds.shape()
                )));
            }
            Some(n)
        } else {
            None
        };
        // Both passes in one batch of 2B: per-sample math is unchanged and the GEMMs grow.
        let ctx = match uncond {
            Some(n) => concat_batch(&cond.prompt_embeds, n)?,
            None => cond.prompt_embeds.clone(),
        };
        let passes = if uncond.is_some() { 2 } else { 1 };
        // The text's cross-attention K/V are the same at every step: made once (on a device:
        // the session's text phase, its K/V persistent).
        let mut forward = self.dit_stepper(&ctx, latents.shape(), passes)?;
        let steps = sampler.timesteps().to_vec();
        for (i, &t) in steps.iter().enumerate() {
            let x = if passes == 2 {
                concat_batch(&latents, &latents)?
            } else {
                latents.clone()
            };
            let out = forward(&x, &vec![t; passes * b])?;
            let n = latents.numel();
            let pred: Vec<f32> = if passes == 2 {
                let (c, u) = out.split_at(n);
                u.iter()
                    .zip(c)
                    .map(|(&u, &c)| u + guidance * (c - u))
                    .collect()
            } else {
                out
            };
            sampler.step(&pred, latents.data_mut())?;
            on_step(i + 1, steps.len())?;
        }
        Ok(latents)
    }

    /// The DiT's forward for one step on `passes`·B samples of `shape` with the text `ctx`
    /// [passes·B, L, text_dim]: x, timesteps → the flow prediction (f32, as x).
    #[allow(clippy::type_complexity)]
    fn dit_stepper<'a>(
        &'a self,
        ctx: &Tensor,
        shape: &[usize],
        passes: usize,
    ) -> Result<Box<dyn FnMut(&Tensor, &[f32]) -> Result<Vec<f32>> + 'a>> {
        match &self.device {
            None => {
                let text_kv = self.dit.text_kv(ctx)?;
                Ok(Box::new(move |x: &Tensor, ts: &[f32]| {
                    let ts = Tensor::new(vec![ts.len()], ts.to_vec())?;
                    Ok(self.dit.forward_kv(x, &ts, &text_kv)?.into_data())
                }))
            }
            Some(d) => {
                use crate::models::wan_dit::gpu::{DitSession, DitShape};
                let dshape = DitShape {
                    batch: passes * shape[0],
                    frames: shape[2],
                    height: shape[3],
                    width: shape[4],
                    text_len: ctx.shape()[1],
                };
                let (dit, _) = self.weights_for(Stage::Video)?;
                let mut session = DitSession::new(&d.dev, &self.dit.config, dshape)?;
                session.set_text(&dit, ctx.data())?;
                Ok(Box::new(move |x: &Tensor, ts: &[f32]| {
                    session.step(&dit, x.data(), ts)
                }))
            }
        }
    }

    /// De-normalizes latents with the VAE's latents_mean/std (latents / (1/std) + mean, as
    /// diffusers computes it) and decodes them, streaming frames in [-1, 1] to `sink`.
    pub fn decode_to(&self, latents: &Tensor, sink: &mut dyn FrameSink) -> Result<()> {
        let _track = self.track();
        let c = &self.vae.config;
        let s = latents.shape();
        let per_channel = s[2] * s[3] * s[4];
        let mut z = latents.clone();
        for (i, v) in z.data_mut().iter_mut().enumerate() {
            let ch = (i / per_channel) % s[1];
            let inv_std = 1.0 / c.latents_std[ch];
            *v = *v / inv_std + c.latents_mean[ch];
        }
        match &self.device {
            None => self.vae.decode_to(&z, sink),
            Some(d) => {
                let (_, vae) = self.weights_for(Stage::Video)?;
                self.vae.decode_on(&d.dev, &vae, &z, sink)
            }
        }
    }
}

impl Pipeline {
    /// A block-causal video of `frames` frames at `height`×`width` (multiples of the VAE's
    /// and the patch's factors), made chunk by chunk and decoded as it goes: each chunk's
    /// latents pass through the streaming VAE decoder into `sink` before the next chunk is
    /// denoised. The noise of chunk k's step i is Philox noise for a seed of its own, made
    /// from `seed`, k and i. `on_chunk(k + 1, chunks)` runs after each chunk is written;
    /// an error there stops the video. Memory does not grow with `frames`: the K/V cache
    /// and the decoder's caches have fixed sizes.
    #[allow(clippy::too_many_arguments)]
    pub fn stream_to(
        &self,
        cond: &Conditioning,
        frames: usize,
        height: usize,
        width: usize,
        seed: u64,
        sink: &mut dyn FrameSink,
        on_chunk: &mut dyn FnMut(usize, usize) -> Result<()>,
    ) -> Result<()> {
        let cfg = self.causal.as_ref().ok_or_else(|| {
            Error::invalid(format!(
                "{}: the transformer is not block-causal (no {} beside its config.json)",
                self.root.display(),
                CausalConfig::FILE
            ))
        })?;
        if cond.prompt_embeds.shape().first() != Some(&1) {
            return Err(Error::invalid(
                "streaming makes one video at a time (batch 1)",
            ));
        }
        let _track = self.track();
        let [_, z, t, h, w] = self.latent_shape(1, frames, height, width);
        let chunks = t.div_ceil(cfg.chunk_frames);
        let negative = match (cfg.guided(), &cond.negative_prompt_embeds) {
            (true, Some(n)) => Some(n),
            (true, None) => {
                return Err(Error::invalid(format!(
                    "the model's causal_config.json asks for guidance {}: give the negative prompt's embeddings",
                    cfg.guidance_label()
                )))
            }
            (false, _) => None,
        };
        let shape = StreamShape {
            channels: z,
            frames: t,
            height: h,
            width: w,
        };
        let vc = &self.vae.config;
        let mut done = 0;
        let mut noise = |k, i, n| crate::rng::gaussian(stream_seed(seed, k, i), n);
        // Each chunk's latent frames of the video (the last chunk may run past them),
        // de-normalized as decode_to does (the same roundings).
        let latents_of = |f0: usize, x0: &Tensor| -> Result<Tensor> {
            let keep = x0.shape()[2].min(t - f0);
            let plane = h * w;
            let mut lat = Vec::with_capacity(z * keep * plane);
            for ch in 0..z {
                let (inv_std, mean) = (1.0 / vc.latents_std[ch], vc.latents_mean[ch]);
                let src = &x0.data()[ch * x0.shape()[2] * plane..][..keep * plane];
                lat.extend(src.iter().map(|&v| v / inv_std + mean));
            }
            Tensor::new(vec![1, z, keep, h, w], lat)
        };
        // The model (the CPU reference or a device session) and the decoder it feeds.
        let (kv, uncond, dit_w, vae_w, mut session, mut cpu, mut on_device);
        let (model, mut decoder): (&mut dyn ChunkModel, Box<dyn LatentStream + '_>) =
            match &self.device {
                None => {
                    kv = self.dit.text_kv(&cond.prompt_embeds)?;
                    uncond = negative.map(|n| self.dit.text_kv(n)).transpose()?;
                    cpu = CpuChunks::new(&self.dit, cfg, &kv, uncond.as_ref(), shape)?;
                    (&mut cpu, Box::new(self.vae.stream_decoder(0)))
                }
                Some(d) => {
                    (dit_w, vae_w) = self.weights_for(Stage::Video)?;
                    let mut texts = cond.prompt_embeds.data().to_vec();
                    if let Some(n) = negative {
                        if n.shape() != cond.prompt_embeds.shape() {
                            return Err(Error::invalid(format!(
                            "negative_prompt_embeds {:?} must have the shape of prompt_embeds {:?}",
                            n.shape(),
                            cond.prompt_embeds.shape()
                        )));
                        }
                        texts.extend_from_slice(n.data());
                    }
                    session = CausalSession::new(
                        &d.dev,
                        &self.dit.config,
                        cfg.window(),
                        DitShape {
                            batch: 1,
                            frames: cfg.chunk_frames,
                            height: h,
                            width: w,
                            text_len: cond.prompt_embeds.shape()[1],
                        },
                        1 + negative.is_some() as usize,
                    )?;
                    session.set_text(&dit_w, &texts)?;
                    on_device = DeviceChunks {
                        session: &mut session,
                        weights: &dit_w,
                    };
                    let decoder = self.vae.stream_decoder_on(&d.dev, &vae_w, (h, w))?;
                    (&mut on_device, Box::new(decoder))
                }
            };
        stream_with(model, cfg, shape, &mut noise, &mut |f0, x0| {
            decoder.push(&latents_of(f0, x0)?, sink)?;
            done += 1;
            on_chunk(done, chunks)
        })
    }
}

/// The seed of chunk `k`'s step `i` (SplitMix64 of the three).
fn stream_seed(seed: u64, k: usize, i: usize) -> u64 {
    let mut z = seed
        .wrapping_add((k as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15))
        .wrapping_add((i as u64 + 1).wrapping_mul(0xD1B5_4A32_D192_ED03));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// [a; b] along the batch dimension.
fn concat_batch(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if a.shape()[1..] != b.shape()[1..] {
        return Err(Error::invalid(format!(
            "cannot batch {:?} with {:?}",
            a.shape(),
            b.shape()
        )));
    }
    let mut shape = a.shape().to_vec();
    shape[0] += b.shape()[0];
    let mut data = a.data().to_vec();
    data.extend_from_slice(b.data());
    Tensor::new(shape, data)
}

/// diffusers' video postprocessing for output_type "pt": x·0.5 + 0.5 clamped to [0, 1].
pub fn to_unit_range(frames: &mut Frames) {
    for v in frames.data.iter_mut() {
        *v = (*v * 0.5 + 0.5).clamp(0.0, 1.0);
    }
}

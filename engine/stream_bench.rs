//! `reel bench --stream`: block-causal streaming on a kernel device, timed as a user sees
//! it. For each length asked (seconds of 16 FPS video), a new video: the DiT's chunk session
//! and the VAE's stream decoder are made, every chunk is denoised with the config's steps
//! (and guidance), decoded and handed to a sink that keeps nothing, and its K/V go into the
//! cache. Reported per length: frames per second of video made (wall clock, the decode
//! included, the sessions' set-up included), seconds until the first frames reached the
//! sink, seconds per chunk, and the device memory held: reel's allocations (weights
//! included, from the allocation counters) and, on cuda, what the driver reports in use.
//! Prompt embeddings are random (umT5 runs once per video and is not timed here).

use std::time::Instant;

use serde::Serialize;

use crate::bench::{percentile, Percentiles};
use crate::convert::CausalPreset;
use crate::error::{Error, Result};
use crate::generate::{parse_size, PRESETS};
use crate::gpu::DeviceWeights;
use crate::kernels::{KernelDevice, MemTracker};
use crate::models::embedded;
use crate::models::wan_dit::gpu::{
    device_weight_specs, plan_causal, CausalSession, DeviceChunks, DitShape,
};
use crate::models::wan_dit::{stream_with, CausalConfig, StreamShape, WanDit, WanDitConfig};
use crate::models::wan_vae::gpu::{self as vg, Coding};
use crate::models::wan_vae::{FrameSink, WanVae, WanVaeConfig};
use crate::tensor::Tensor;
use crate::text::MAX_SEQUENCE_LENGTH;

/// What `reel bench --stream` was asked.
#[derive(Debug, Clone)]
pub struct StreamBenchArgs {
    /// A block-causal pipeline folder, a preset (with `random_weights`), or None: the
    /// embedded block-causal demo.
    pub model: Option<String>,
    pub random_weights: bool,
    pub size: Option<String>,
    /// Video lengths to make, in seconds of 16 FPS video (default 10 and 60).
    pub seconds: Vec<usize>,
    /// The published model whose streaming config a preset runs with (default LongLive);
    /// a folder's causal_config.json otherwise.
    pub causal: Option<CausalPreset>,
    pub device: KernelDevice,
}

#[derive(Debug, Clone, Serialize)]
pub struct StreamRun {
    pub seconds: usize,
    pub frames: usize,
    pub chunks: usize,
    pub wall_seconds: f64,
    /// Frames of video made per second of wall clock.
    pub fps: f64,
    /// From the start (sessions made) until the first chunk's frames reached the sink.
    pub first_frame_seconds: f64,
    /// Each chunk: its steps, its decode and its context pass.
    pub chunk_seconds: Percentiles,
    /// The most device memory reel held (allocation counters; weights included).
    pub device_peak_bytes: usize,
    /// cuda: total − free as the driver reports it after the video (every allocation of
    /// the process, the CUDA context and libraries included).
    pub driver_used_bytes: Option<u64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct StreamBenchReport {
    pub model: String,
    pub device: String,
    pub size: String,
    pub generated: String,
    pub causal: CausalConfig,
    /// Video tokens of one chunk.
    pub tokens_per_chunk: usize,
    /// The plan of the DiT's chunk session (arena + persistent: the K/V cache) and the
    /// VAE decoder's (arena + causal caches); neither depends on the length.
    pub dit_plan_bytes: usize,
    pub vae_plan_bytes: usize,
    pub weights_bytes: usize,
    pub runs: Vec<StreamRun>,
    pub commit: String,
}

/// Counts frames and notes when the first ones arrive.
struct Clock {
    start: Instant,
    first: Option<f64>,
    frames: usize,
}

impl FrameSink for Clock {
    fn push(&mut self, _: usize, f: &crate::cpu::conv::Frames) -> Result<()> {
        if self.first.is_none() {
            self.first = Some(self.start.elapsed().as_secs_f64());
        }
        self.frames += f.t;
        Ok(())
    }
}

/// The DiT's and the VAE decoder's configs and device weights, the streaming config, and
/// the model's name.
fn load(
    a: &StreamBenchArgs,
    dev: &KernelDevice,
) -> Result<(
    WanDitConfig,
    WanVaeConfig,
    DeviceWeights,
    DeviceWeights,
    CausalConfig,
    String,
)> {
    let vae_dtype = vg::dtype_from_env()?;
    match a.model.as_deref() {
        Some(p) if PRESETS.contains(&p) && !std::path::Path::new(p).exists() => {
            if !a.random_weights {
                return Err(Error::invalid(format!(
                    "--model {p} names an architecture preset: pass --random-weights (made on the device)"
                )));
            }
            let c = crate::generate::preset_configs(p).0;
            let vc = WanVaeConfig::default();
            let preset = a.causal.unwrap_or(CausalPreset::Longlive);
            let dit_w = DeviceWeights::random(dev, &device_weight_specs(&c), 0)?;
            let vae_w = DeviceWeights::random(
                dev,
                &vg::device_weight_specs(&vc, Coding::Decode, vae_dtype)?,
                2,
            )?;
            let name = format!("{p} (random weights on the device), {preset:?} streaming");
            Ok((c, vc, dit_w, vae_w, preset.config(), name))
        }
        other => {
            let (dir, name) = match other {
                None => (
                    embedded::ensure_causal()?,
                    embedded::CAUSAL_NAME.to_string(),
                ),
                Some(d) => (std::path::PathBuf::from(d), d.to_string()),
            };
            let dit = WanDit::load(&dir)?;
            let vae = WanVae::load(&dir)?;
            let cfg = match a.causal {
                Some(p) => p.config(),
                None => CausalConfig::load(dit.dir())?.ok_or_else(|| {
                    Error::invalid(format!(
                        "--stream: {} has no transformer/{} (pass --causal longlive|self-forcing to stream it anyway)",
                        dir.display(),
                        CausalConfig::FILE
                    ))
                })?,
            };
            let (dit_w, vae_w) = if a.random_weights {
                (
                    DeviceWeights::random(dev, &device_weight_specs(&dit.config), 0)?,
                    DeviceWeights::random(
                        dev,
                        &vg::device_weight_specs(&vae.config, Coding::Decode, vae_dtype)?,
                        2,
                    )?,
                )
            } else {
                (
                    dit.upload(dev)?,
                    vae.upload(dev, Coding::Decode, vae_dtype)?,
                )
            };
            Ok((
                dit.config.clone(),
                vae.config.clone(),
                dit_w,
                vae_w,
                cfg,
                name,
            ))
        }
    }
}

/// A progress line every this many chunks (a minute of a 3-frame-chunk model is 81).
const PROGRESS_CHUNKS: usize = 20;

/// Runs the benchmark (see the module docs).
pub fn bench_stream(a: &StreamBenchArgs) -> Result<StreamBenchReport> {
    let dev = &a.device;
    if a.seconds.is_empty() || a.seconds.iter().any(|&s| s == 0 || s > 3600) {
        return Err(Error::invalid(format!(
            "--seconds {:?}: lengths of 1 to 3600 seconds",
            a.seconds
        )));
    }
    let memory = MemTracker::new();
    let _track = memory.enter();
    let (c, vc, dit_w, vae_w, cfg, model) = load(a, dev)?;
    let demo = a.model.is_none();
    let (w, h) = match &a.size {
        Some(s) => parse_size(s)?,
        None if demo => embedded::DEFAULT_SIZE,
        None => (832, 480),
    };
    let (s, tf) = (vc.spatial_factor(), vc.temporal_factor());
    let m = s * c.patch_size[1].max(c.patch_size[2]);
    let (gw, gh) = (w.div_ceil(m) * m, h.div_ceil(m) * m);
    let prompts = 1 + cfg.guided() as usize;
    let shape = DitShape {
        batch: 1,
        frames: cfg.chunk_frames,
        height: gh / s,
        width: gw / s,
        text_len: MAX_SEQUENCE_LENGTH,
    };
    let arch = dev.arch()?;
    let dit_plan = plan_causal(&c, &cfg.window(), shape, prompts, arch)?;
    let vae_plan = vg::plan(&vc, Coding::Decode, (shape.height, shape.width), arch)?;
    let text = crate::rng::gaussian(1, prompts * MAX_SEQUENCE_LENGTH * c.text_dim);
    let mut runs = Vec::new();
    for &seconds in &a.seconds {
        let frames = 16 * seconds + 1;
        let latent_frames = (frames - 1) / tf + 1;
        let chunks = latent_frames.div_ceil(cfg.chunk_frames);
        let start = Instant::now();
        let mut session = CausalSession::new(dev, &c, cfg.window(), shape, prompts)?;
        session.set_text(&dit_w, &text)?;
        let mut decoder = vg::stream_decoder(dev, &vc, &vae_w, (shape.height, shape.width))?;
        let mut clock = Clock {
            start,
            first: None,
            frames: 0,
        };
        let mut chunk_secs = Vec::new();
        let mut last = Instant::now();
        let mut finite = true;
        stream_with(
            &mut DeviceChunks {
                session: &mut session,
                weights: &dit_w,
            },
            &cfg,
            StreamShape {
                channels: c.in_channels,
                frames: latent_frames,
                height: shape.height,
                width: shape.width,
            },
            &mut |k, i, n| crate::rng::gaussian(((k as u64) << 16) + i as u64, n),
            &mut |f0, x0| {
                finite &= x0.data().iter().all(|v| v.is_finite());
                // The video's latent frames of the chunk (the last one may run past them).
                let keep = x0.shape()[2].min(latent_frames - f0);
                let plane = shape.height * shape.width;
                let mut lat = Vec::with_capacity(c.in_channels * keep * plane);
                for ch in 0..c.in_channels {
                    lat.extend_from_slice(&x0.data()[ch * x0.shape()[2] * plane..][..keep * plane]);
                }
                decoder.push(
                    &Tensor::new(vec![1, c.in_channels, keep, shape.height, shape.width], lat)?,
                    &mut clock,
                )?;
                // A chunk's time runs from the end of the previous one's decode: its steps,
                // the previous chunk's context pass and its own decode.
                chunk_secs.push(last.elapsed().as_secs_f64());
                last = Instant::now();
                // Progress, so that a run cut short (a time limit) still says how fast it was.
                let done = chunk_secs.len();
                if done % PROGRESS_CHUNKS == 0 && done < chunks {
                    let t = start.elapsed().as_secs_f64();
                    tracing::info!(
                        "{seconds} s of video: chunk {done} of {chunks}, {} frames in {t:.2} s ({:.1} FPS so far)",
                        clock.frames,
                        clock.frames as f64 / t
                    );
                }
                Ok(())
            },
        )?;
        let wall = start.elapsed().as_secs_f64();
        if !finite {
            return Err(Error::Device(format!(
                "streaming on {} gave non-finite latents",
                dev.describe()
            )));
        }
        let driver_used_bytes = match dev {
            KernelDevice::Cuda(cu) => cu
                .memory_info()
                .ok()
                .map(|(free, total)| (total - free) as u64),
            _ => None,
        };
        chunk_secs.sort_by(|a, b| a.total_cmp(b));
        let run = StreamRun {
            seconds,
            frames: clock.frames,
            chunks: chunk_secs.len(),
            wall_seconds: wall,
            fps: clock.frames as f64 / wall,
            first_frame_seconds: clock.first.unwrap_or(f64::NAN),
            chunk_seconds: Percentiles {
                median: percentile(&chunk_secs, 50.0),
                p10: percentile(&chunk_secs, 10.0),
                p90: percentile(&chunk_secs, 90.0),
            },
            device_peak_bytes: memory.peak(),
            driver_used_bytes,
        };
        tracing::info!(
            "{seconds} s of video: {} frames in {wall:.2} s ({:.1} FPS), first frames after {:.2} s, \
             reel's device peak {}, driver used {}",
            run.frames,
            run.fps,
            run.first_frame_seconds,
            mib(run.device_peak_bytes),
            run.driver_used_bytes
                .map_or_else(|| "-".into(), |b| mib(b as usize))
        );
        runs.push(run);
    }
    Ok(StreamBenchReport {
        model,
        device: dev.describe(),
        size: format!("{w}x{h}"),
        generated: format!("{gw}x{gh}"),
        causal: cfg,
        tokens_per_chunk: shape.tokens(&c),
        dit_plan_bytes: dit_plan.arena_bytes + dit_plan.persistent_bytes,
        vae_plan_bytes: vae_plan.arena_bytes + vae_plan.persistent_bytes,
        weights_bytes: dit_w.bytes() + vae_w.bytes(),
        runs,
        commit: env!("REEL_GIT_COMMIT").into(),
    })
}

fn mib(b: usize) -> String {
    format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64)
}

/// The human-readable table.
pub fn render(r: &StreamBenchReport) -> String {
    let c = &r.causal;
    let mut s = format!(
        "reel bench --stream  {}  on {}  {} (generated {})\n  chunks of {} latent frames ({} tokens), sink {}, {} frames attended, {} steps, guidance {}\n  plan: DiT chunk session {} + VAE decoder {} + weights {} (no length input)\n",
        r.model,
        r.device,
        r.size,
        r.generated,
        c.chunk_frames,
        r.tokens_per_chunk,
        c.sink_frames,
        c.local_attn_frames,
        c.steps_label(),
        c.guidance_label(),
        mib(r.dit_plan_bytes),
        mib(r.vae_plan_bytes),
        mib(r.weights_bytes),
    );
    s += "  video    frames  chunks   wall s     FPS  first frame s  s/chunk (p10 / median / p90)  reel peak    driver used\n";
    for run in &r.runs {
        s += &format!(
            "  {:>4} s  {:>6}  {:>6}  {:>7.2}  {:>6.2}  {:>13.3}  {:.3} / {:.3} / {:.3}  {:>12}  {}\n",
            run.seconds,
            run.frames,
            run.chunks,
            run.wall_seconds,
            run.fps,
            run.first_frame_seconds,
            run.chunk_seconds.p10,
            run.chunk_seconds.median,
            run.chunk_seconds.p90,
            mib(run.device_peak_bytes),
            run.driver_used_bytes.map(|b| mib(b as usize)).unwrap_or_else(|| "-".into()),
        );
    }
    if r.device.contains("emu") {
        s += "  (emulator: times are the emulator's, no GPU speed)\n";
    }
    s
}

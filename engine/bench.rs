//! `reel bench`: denoising-step throughput reported the way GPU engineers report it:
//! median/p10/p90 step time, tokens per second (every DiT pass of a step, both CFG passes),
//! FLOPs counted from the architecture ([`WanDit::flops`]), achieved TFLOP/s, MFU against
//! the device's dense bf16 peak, peak memory, and a per-op breakdown (`--profile`).
//!
//! The report's shape is device-independent: the cuda and emu devices plug in by filling
//! `gpu`, `mfu` and the nvml fields; on the cpu those are null.

use std::time::Instant;

use serde::Serialize;

use crate::error::{Error, Result};
use crate::generate::{load_model_with, parse_size, GenerateArgs};
use crate::models::embedded;
use crate::models::wan_dit::WanDit;
use crate::models::wan_vae::FrameSink;
use crate::pipeline::Conditioning;
use crate::sampler;
use crate::tensor::Tensor;
use crate::text::MAX_SEQUENCE_LENGTH;

/// Dense bf16 peak TFLOP/s of the GPUs reel targets (the MFU denominator).
pub const PEAK_TFLOPS: [(&str, f64); 3] = [("H100", 989.0), ("H200", 989.0), ("A100", 312.0)];

#[derive(Debug, Clone, Default)]
pub struct BenchArgs {
    pub model: Option<String>,
    pub random_weights: bool,
    pub size: Option<String>,
    pub frames: Option<usize>,
    pub steps: usize,
    pub warmup: usize,
    pub no_cfg: bool,
    pub vae: bool,
    pub text: bool,
    /// On a kernel device: one timed end-to-end generation (text, guided steps, decode).
    pub generation: bool,
    pub profile: bool,
    /// Overrides the peak TFLOP/s the MFU is measured against.
    pub peak_tflops: Option<f64>,
    /// A kernel device (emu or cuda) for the DiT step; None: the cpu pipeline.
    pub device: Option<crate::kernels::KernelDevice>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Percentiles {
    pub median: f64,
    pub p10: f64,
    pub p90: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct OpReport {
    pub name: String,
    pub calls: u64,
    pub seconds: f64,
    /// Achieved TFLOP/s of the op's counted FLOPs (null for uncounted elementwise work).
    pub tflops: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub model: String,
    pub device: String,
    pub gpu: Option<String>,
    pub driver: Option<String>,
    pub cpu_threads: usize,
    pub size: String,
    pub frames: usize,
    /// Video tokens of one DiT pass (post-patch T·H·W).
    pub tokens: usize,
    pub text_tokens: usize,
    pub steps: usize,
    pub warmup: usize,
    pub passes_per_step: usize,
    pub step_seconds: Percentiles,
    pub tokens_per_second: f64,
    pub flops_per_step: u64,
    pub achieved_tflops: f64,
    pub peak_tflops: Option<f64>,
    pub mfu: Option<f64>,
    /// cpu: the process's peak resident set (VmHWM).
    pub peak_memory_bytes: Option<u64>,
    pub ops: Vec<OpReport>,
    pub text_seconds: Option<f64>,
    pub vae_decode_seconds: Option<f64>,
    /// On a kernel device: the text encoder's and the VAE decode's TFLOP/s (FLOPs counted
    /// by the launchers in an untimed run, over the median time).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub text_tflops: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vae_decode_tflops: Option<f64>,
    /// With --text and --vae on a kernel device: text + steps × the median step + decode
    /// for one generation of `generation_steps` steps (50; the demo model: its 20), from
    /// the parts measured here (not a timed end-to-end run).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub generation_estimate_seconds: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub generation_steps: Option<usize>,
    /// With --generation: the measured seconds of the whole generation (text encoder, every
    /// step, decode; the weights made before the clock starts). step_seconds are then its
    /// steps after the first `warmup`, and peak_memory_bytes the device memory it held.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub generation_seconds: Option<f64>,
    pub commit: String,
}

/// Nearest-rank percentile of sorted values.
pub(crate) fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil().max(1.0) as usize;
    sorted[rank.min(sorted.len()) - 1]
}

/// The process's peak resident set size (Linux VmHWM).
pub fn peak_rss() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    Some(line.split_whitespace().nth(1)?.parse::<u64>().ok()? * 1024)
}

struct Discard;
impl FrameSink for Discard {
    fn push(&mut self, _: usize, _: &crate::cpu::conv::Frames) -> Result<()> {
        Ok(())
    }
}

impl Discard {
    /// Takes frames as a writer would (their count back), keeping nothing.
    fn take(&mut self, f: &crate::cpu::conv::Frames) -> Result<usize> {
        self.push(0, f)?;
        Ok(f.t)
    }
}

/// Runs the benchmark.
pub fn bench(args: &BenchArgs) -> Result<BenchReport> {
    if args.steps == 0 {
        return Err(Error::invalid("--steps must be at least 1"));
    }
    if args.generation && args.device.is_none() {
        return Err(Error::invalid(
            "--generation times a generation on a kernel device: pass --device cuda (or emu)",
        ));
    }
    if let Some(dev) = &args.device {
        return bench_device(args, dev);
    }
    let gen_args = GenerateArgs {
        model: args.model.clone(),
        random_weights: args.random_weights,
        ..Default::default()
    };
    // Make, load and count only what is measured: the text encoder with --text.
    let (pipe, model_name, embedded_model) = load_model_with(&gen_args, args.text)?;
    let (w, h) = match &args.size {
        Some(s) => parse_size(s)?,
        None if embedded_model => embedded::DEFAULT_SIZE,
        None => (832, 480),
    };
    let frames = args.frames.unwrap_or(if embedded_model {
        embedded::DEFAULT_FRAMES
    } else {
        81
    });
    let tf = pipe.vae.config.temporal_factor();
    if frames == 0 || (frames - 1) % tf != 0 {
        return Err(Error::invalid(format!(
            "--frames {frames}: must be 1 + {tf}k"
        )));
    }
    let m = pipe.vae.config.spatial_factor()
        * pipe.dit.config.patch_size[1].max(pipe.dit.config.patch_size[2]);
    let (gw, gh) = (w.div_ceil(m) * m, h.div_ceil(m) * m);
    let shape = pipe.latent_shape(1, frames, gh, gw);
    let p = pipe.dit.config.patch_size;
    let grid = [shape[2] / p[0], shape[3] / p[1], shape[4] / p[2]];
    let tokens: usize = grid.iter().product();
    let passes = if args.no_cfg { 1 } else { 2 };
    let guidance = if args.no_cfg { 1.0 } else { 5.0 };

    // Conditioning: the real text encoder when there is one (timed with --text), else
    // random prompt embeddings of the pipeline's length.
    let mut text_seconds = None;
    let cond = if pipe.text.is_some() {
        let t = Instant::now();
        let c = pipe.encode_prompts(
            &["a red circle moving right"],
            &[""],
            guidance,
            MAX_SEQUENCE_LENGTH,
        )?;
        if args.text {
            text_seconds = Some(t.elapsed().as_secs_f64());
        }
        c
    } else {
        if args.text {
            return Err(Error::invalid("--text: this model has no text encoder"));
        }
        let shape = [1, MAX_SEQUENCE_LENGTH, pipe.dit.config.text_dim];
        let e = || {
            Tensor::new(
                shape.to_vec(),
                crate::rng::gaussian(1, shape.iter().product()),
            )
        };
        Conditioning {
            prompt_embeds: e()?,
            negative_prompt_embeds: if passes == 2 { Some(e()?) } else { None },
        }
    };
    let latents = Tensor::new(
        shape.to_vec(),
        crate::rng::gaussian(0, shape.iter().product()),
    )?;
    let total = args.warmup + args.steps;
    let mut sampler = sampler::build(&pipe.scheduler, pipe.scheduler.kind(), total, None)?;
    let mut marks = Vec::with_capacity(total + 1);
    marks.push(Instant::now());
    crate::profile::enable(args.profile && args.warmup == 0);
    let final_latents = pipe.denoise(latents, &cond, guidance, sampler.as_mut(), &mut |i, _| {
        marks.push(Instant::now());
        if i == args.warmup && args.profile {
            crate::profile::enable(true);
        }
        Ok(())
    })?;
    let mut secs: Vec<f64> = marks
        .windows(2)
        .skip(args.warmup)
        .map(|w| (w[1] - w[0]).as_secs_f64())
        .collect();
    secs.sort_by(|a, b| a.total_cmp(b));
    let median = percentile(&secs, 50.0);
    let flops = WanDit::flops_of(&pipe.dit.config, passes, grid, MAX_SEQUENCE_LENGTH);
    let achieved = flops as f64 / median / 1e12;
    let vae_decode_seconds = if args.vae {
        let t = Instant::now();
        pipe.decode_to(&final_latents, &mut Discard)?;
        Some(t.elapsed().as_secs_f64())
    } else {
        None
    };
    let ops_snapshot = crate::profile::snapshot();
    crate::profile::enable(false);
    let ops = if args.profile {
        ops_snapshot
            .into_iter()
            .map(|(name, calls, seconds, fl)| OpReport {
                name: name.into(),
                calls,
                seconds,
                tflops: (fl > 0 && seconds > 0.0).then(|| fl as f64 / seconds / 1e12),
            })
            .collect()
    } else {
        Vec::new()
    };
    // On the cpu there is no dense-bf16 peak to compare with unless one is given.
    let peak = args.peak_tflops;
    Ok(BenchReport {
        model: model_name,
        device: "cpu".into(),
        gpu: None,
        driver: None,
        cpu_threads: rayon::current_num_threads(),
        size: format!("{w}x{h}"),
        frames,
        tokens,
        text_tokens: MAX_SEQUENCE_LENGTH,
        steps: args.steps,
        warmup: args.warmup,
        passes_per_step: passes,
        step_seconds: Percentiles {
            median,
            p10: percentile(&secs, 10.0),
            p90: percentile(&secs, 90.0),
        },
        tokens_per_second: (passes * tokens) as f64 / median,
        flops_per_step: flops,
        achieved_tflops: achieved,
        peak_tflops: peak,
        mfu: peak.map(|p| achieved / p),
        peak_memory_bytes: peak_rss(),
        ops,
        text_seconds,
        vae_decode_seconds,
        text_tflops: None,
        vae_decode_tflops: None,
        generation_estimate_seconds: None,
        generation_steps: None,
        generation_seconds: None,
        commit: env!("REEL_GIT_COMMIT").into(),
    })
}

/// The DiT step on a kernel device: weights uploaded from the model folder, or made on the
/// device (`--random-weights`, Philox: the 14B preset needs no download and no host copy),
/// random prompt embeddings (`--text` times the text encoder on its own), latents through
/// one planned [`DitSession`] per shape (on cuda its step replayed as a CUDA graph);
/// `--profile` runs the step launch by launch and times each: CUDA events on cuda, the
/// host clock on emu.
fn bench_device(args: &BenchArgs, dev: &crate::kernels::KernelDevice) -> Result<BenchReport> {
    use crate::gpu::DeviceWeights;
    use crate::models::wan_dit::gpu::{device_weight_specs, DitSession, DitShape};
    use crate::models::wan_dit::WanDitConfig;
    let presets = crate::generate::PRESETS;
    let (config, name, demo, weights): (WanDitConfig, String, bool, DeviceWeights) = match args
        .model
        .as_deref()
    {
        Some(p) if presets.contains(&p) && !std::path::Path::new(p).exists() => {
            if !args.random_weights {
                return Err(Error::invalid(format!(
                        "--model {p} names an architecture preset: pass --random-weights (made on the device)"
                    )));
            }
            let c = crate::generate::preset_configs(p).0;
            let w = DeviceWeights::random(dev, &device_weight_specs(&c), 0)?;
            (c, format!("{p} (random weights on the device)"), false, w)
        }
        other => {
            let (dir, name, demo) = match other {
                None => (embedded::ensure()?, embedded::NAME.to_string(), true),
                Some(d) => (std::path::PathBuf::from(d), d.to_string(), false),
            };
            let dit = WanDit::load(&dir)?;
            let w = if args.random_weights {
                DeviceWeights::random(dev, &device_weight_specs(&dit.config), 0)?
            } else {
                dit.upload(dev)?
            };
            (dit.config.clone(), name, demo, w)
        }
    };
    let (w, h) = match &args.size {
        Some(s) => parse_size(s)?,
        None if demo => embedded::DEFAULT_SIZE,
        None => (832, 480),
    };
    let frames = args
        .frames
        .unwrap_or(if demo { embedded::DEFAULT_FRAMES } else { 81 });
    if frames == 0 || (frames - 1) % 4 != 0 {
        return Err(Error::invalid(format!("--frames {frames}: must be 1 + 4k")));
    }
    // Wan2.1's VAE: 8× spatial, 4× temporal compression; the DiT's patch on top.
    let m = 8 * config.patch_size[1].max(config.patch_size[2]);
    let (gw, gh) = (w.div_ceil(m) * m, h.div_ceil(m) * m);
    let passes = if args.no_cfg { 1 } else { 2 };
    let shape = DitShape {
        batch: passes,
        frames: (frames - 1) / 4 + 1,
        height: gh / 8,
        width: gw / 8,
        text_len: MAX_SEQUENCE_LENGTH,
    };
    let grid = shape.grid(&config);
    let tokens = shape.tokens(&config);
    let total = args.warmup + args.steps;
    let mut secs = Vec::with_capacity(total);
    let mut ops_snapshot = Vec::new();
    let mut generation_seconds = None;
    // The device memory a generation holds beside the DiT's weights (made above).
    let memory = crate::kernels::MemTracker::new();
    let (text, vae, planned_bytes) = if args.generation {
        let _track = memory.enter();
        let (tc, vc) = crate::plan::side_configs(args.model.as_deref())?;
        let (tc, vc) = match (tc, vc) {
            (Some(t), Some(v)) => (t, v),
            _ => {
                return Err(Error::invalid(
                    "--generation needs a model with a text encoder and a vae/",
                ))
            }
        };
        if args.no_cfg {
            return Err(Error::invalid(
                "--generation runs with guidance (two passes a step): drop --no-cfg",
            ));
        }
        let g = bench_generation_device(dev, &config, &weights, &tc, &vc, shape, args.steps)?;
        generation_seconds = Some(g.total);
        secs = g.steps[args.warmup.min(g.steps.len() - 1)..].to_vec();
        (Some((g.text, f64::NAN)), Some((g.decode, f64::NAN)), None)
    } else {
        let mut session = DitSession::new(dev, &config, shape)?;
        // Per-op times need the launches one by one: --profile runs the step without its graph.
        session.set_eager(args.profile);
        let text = crate::rng::gaussian(1, passes * MAX_SEQUENCE_LENGTH * config.text_dim);
        session.set_text(&weights, &text)?;
        let x = crate::rng::gaussian(
            0,
            passes * config.in_channels * shape.frames * shape.height * shape.width,
        );
        crate::profile::enable(false);
        for i in 0..total {
            if i == args.warmup && args.profile {
                crate::profile::enable(true);
            }
            let t = 999.0 * (1.0 - i as f32 / total as f32);
            let start = Instant::now();
            let out = session.step(&weights, &x, &vec![t; passes])?;
            if i >= args.warmup {
                secs.push(start.elapsed().as_secs_f64());
            }
            if !out.iter().all(|v| v.is_finite()) {
                return Err(Error::Device(format!(
                    "the DiT step on {} gave non-finite values",
                    dev.describe()
                )));
            }
        }
        ops_snapshot = crate::profile::snapshot();
        crate::profile::enable(false);
        // The device memory the plan allocated, weights included (exact: nothing else is
        // allocated on the device during a step).
        let planned =
            weights.bytes() + session.plan().arena_bytes + session.plan().persistent_bytes;
        drop(session);
        // --text, --vae: the text encoder (both prompts) and the decode of this video, on
        // the device, the presets' real configs with random weights (or the folder's).
        let (text, vae) = if args.text || args.vae {
            let (tc, vc) = crate::plan::side_configs(args.model.as_deref())?;
            let text = match (args.text, &tc) {
                (true, Some(tc)) => Some(bench_text_device(dev, tc, args.steps)?),
                (true, None) => {
                    return Err(Error::invalid("--text: this model has no text encoder"))
                }
                (false, _) => None,
            };
            let vae = match (args.vae, &vc) {
                (true, Some(vc)) => Some(bench_vae_device(
                    dev,
                    vc,
                    (shape.frames, shape.height, shape.width),
                    args.steps,
                )?),
                (true, None) => return Err(Error::invalid("--vae: this model has no vae/")),
                (false, _) => None,
            };
            (text, vae)
        } else {
            (None, None)
        };
        (text, vae, Some(planned))
    };
    secs.sort_by(|a, b| a.total_cmp(b));
    let median = percentile(&secs, 50.0);
    let flops = WanDit::flops_of(&config, passes, grid, MAX_SEQUENCE_LENGTH);
    let achieved = flops as f64 / median / 1e12;
    let gen_steps = if demo { embedded::DEFAULT_STEPS } else { 50 };
    let (gpu, driver) = match dev {
        crate::kernels::KernelDevice::Cuda(c) => (
            Some(c.name().to_string()),
            crate::cuda::driver_version().map(|(a, b)| format!("CUDA {a}.{b}")),
        ),
        _ => (None, None),
    };
    let peak = args.peak_tflops.or_else(|| {
        let g = gpu.as_deref()?;
        PEAK_TFLOPS.iter().find(|(n, _)| g.contains(n)).map(|p| p.1)
    });
    let ops = if args.profile {
        ops_snapshot
            .into_iter()
            .filter(|o| o.1 > 0)
            .map(|(name, calls, seconds, fl)| OpReport {
                name: name.into(),
                calls,
                seconds,
                tflops: (fl > 0 && seconds > 0.0).then(|| fl as f64 / seconds / 1e12),
            })
            .collect()
    } else {
        Vec::new()
    };
    Ok(BenchReport {
        model: name,
        device: dev.describe(),
        gpu,
        driver,
        cpu_threads: rayon::current_num_threads(),
        size: format!("{w}x{h}"),
        frames,
        tokens,
        text_tokens: MAX_SEQUENCE_LENGTH,
        steps: args.steps,
        warmup: args.warmup,
        passes_per_step: passes,
        step_seconds: Percentiles {
            median,
            p10: percentile(&secs, 10.0),
            p90: percentile(&secs, 90.0),
        },
        tokens_per_second: (passes * tokens) as f64 / median,
        flops_per_step: flops,
        achieved_tflops: achieved,
        peak_tflops: peak,
        mfu: peak.map(|p| achieved / p),
        // Steps alone: what the plan allocated, weights included; --generation: the most
        // device memory the generation held (weights, sessions; counted allocations).
        peak_memory_bytes: Some(
            planned_bytes.unwrap_or_else(|| weights.bytes() + memory.peak()) as u64,
        ),
        ops,
        text_seconds: text.map(|t| t.0),
        vae_decode_seconds: vae.map(|t| t.0),
        text_tflops: text.map(|t| t.1).filter(|t| t.is_finite()),
        vae_decode_tflops: vae.map(|t| t.1).filter(|t| t.is_finite()),
        generation_estimate_seconds: match (text, vae, generation_seconds) {
            (Some(t), Some(v), None) => Some(t.0 + gen_steps as f64 * median + v.0),
            _ => None,
        },
        generation_steps: match generation_seconds {
            Some(_) => Some(args.steps),
            None => (text.is_some() && vae.is_some()).then_some(gen_steps),
        },
        generation_seconds,
        commit: env!("REEL_GIT_COMMIT").into(),
    })
}

/// What one timed generation on a device took.
struct GenerationTimes {
    total: f64,
    text: f64,
    /// Every step, in order.
    steps: Vec<f64>,
    decode: f64,
}

/// One generation on a device, timed end to end as `reel generate` runs it: umT5 on the
/// prompt and the negative prompt (random weights and tokens; 512 tokens each, the second
/// half padding), the DiT's text phase, `steps` UniPC steps with guidance 5 (both passes in
/// one batch; the sampler's state in f32 on the host), then the VAE decode of the final
/// latents, de-normalised, latent frame by latent frame, each chunk's frames brought back to
/// the host as a writer takes them. Weights are made on the device before the clock starts
/// (loading is not part of a generation); sessions are made inside it, as each generation
/// makes its own.
fn bench_generation_device(
    dev: &crate::kernels::KernelDevice,
    config: &crate::models::wan_dit::WanDitConfig,
    dit: &crate::gpu::DeviceWeights,
    tc: &crate::models::umt5::Umt5Config,
    vc: &crate::models::wan_vae::WanVaeConfig,
    shape: crate::models::wan_dit::gpu::DitShape,
    steps: usize,
) -> Result<GenerationTimes> {
    use crate::models::umt5::gpu::{self as tg, TextShape, Umt5Session};
    use crate::models::wan_dit::gpu::DitSession;
    use crate::models::wan_vae::gpu::{self as vg, Coding, VaeSession};
    let guidance = 5.0f32;
    let text_shape = TextShape {
        batch: 2,
        len: MAX_SEQUENCE_LENGTH,
    };
    let text_specs = tg::device_weight_specs(tc, tg::dtype_from_env()?);
    let text_w = crate::gpu::DeviceWeights::random(dev, &text_specs, 1)?;
    let vae_dtype = vg::dtype_from_env()?;
    let vae_specs = vg::device_weight_specs(vc, Coding::Decode, vae_dtype)?;
    let vae_w = crate::gpu::DeviceWeights::random(dev, &vae_specs, 2)?;
    let span = tc.num_heads * (2 * text_shape.len - 1);
    let biases: Vec<Vec<f32>> = (0..tc.num_layers)
        .map(|l| crate::rng::gaussian(10 + l as u64, span))
        .collect();
    let emb = crate::rng::gaussian(2, text_shape.batch * text_shape.len * tc.d_model);
    let mask: Vec<i64> = (0..text_shape.batch * text_shape.len)
        .map(|i| (i % text_shape.len < text_shape.len / 2) as i64)
        .collect();
    let latent_len = config.in_channels * shape.frames * shape.height * shape.width;
    let mut latents = crate::rng::gaussian(0, latent_len);
    let mut sampler = sampler::build(
        &crate::sampler::SchedulerConfig::default(),
        sampler::SamplerKind::Unipc,
        steps,
        Some(3.0),
    )?;
    let timesteps = sampler.timesteps().to_vec();

    let start = Instant::now();
    let mut text_session = Umt5Session::with_biases(dev, tc, text_shape, &biases)?;
    let ctx = text_session.encode_embedded(&text_w, &emb, &mask)?;
    drop(text_session);
    let text = start.elapsed().as_secs_f64();
    let mut session = DitSession::new(dev, config, shape)?;
    session.set_text(dit, &ctx)?;
    let mut step_secs = Vec::with_capacity(steps);
    let mut x = vec![0.0f32; 2 * latent_len];
    for &t in &timesteps {
        let t0 = Instant::now();
        x[..latent_len].copy_from_slice(&latents);
        x[latent_len..].copy_from_slice(&latents);
        let out = session.step(dit, &x, &[t, t])?;
        let (c, u) = out.split_at(latent_len);
        let pred: Vec<f32> = u
            .iter()
            .zip(c)
            .map(|(&u, &c)| u + guidance * (c - u))
            .collect();
        sampler.step(&pred, &mut latents)?;
        step_secs.push(t0.elapsed().as_secs_f64());
    }
    drop(session);
    if !latents.iter().all(|v| v.is_finite()) {
        return Err(Error::Device(format!(
            "the generation on {} gave non-finite latents",
            dev.describe()
        )));
    }
    let t_decode = Instant::now();
    let per_channel = shape.frames * shape.height * shape.width;
    for (i, v) in latents.iter_mut().enumerate() {
        let ch = i / per_channel;
        *v = *v * vc.latents_std[ch] + vc.latents_mean[ch];
    }
    let z = Tensor::new(
        vec![1, vc.z_dim, shape.frames, shape.height, shape.width],
        latents,
    )?;
    macro_rules! decode {
        ($t:ty) => {{
            let hw = (shape.height, shape.width);
            let mut vae = VaeSession::<$t>::new(dev, vc, Coding::Decode, hw)?;
            let mut frames = 0;
            for i in 0..shape.frames {
                let chunk = crate::models::wan_vae::to_frames_range(&z, 0, i, i + 1)?;
                frames += Discard.take(&vae.chunk(&vae_w, &chunk)?)?;
            }
            frames
        }};
    }
    let frames = if vae_dtype == crate::gpu::WDtype::Bf16 {
        decode!(half::bf16)
    } else {
        decode!(half::f16)
    };
    let decode = t_decode.elapsed().as_secs_f64();
    let total = start.elapsed().as_secs_f64();
    tracing::info!(
        "generation on {}: {frames} frames in {total:.2} s",
        dev.describe()
    );
    Ok(GenerationTimes {
        total,
        text,
        steps: step_secs,
        decode,
    })
}

/// Times `run` on a kernel device: one untimed run with the launchers' FLOP counters on,
/// then `repeat` timed runs; (median seconds, TFLOP/s).
fn time_device(repeat: usize, mut run: impl FnMut() -> Result<()>) -> Result<(f64, f64)> {
    crate::profile::enable(true);
    let counted = run();
    let flops: u64 = crate::profile::snapshot().iter().map(|o| o.3).sum();
    crate::profile::enable(false);
    counted?;
    let mut secs = Vec::with_capacity(repeat);
    for _ in 0..repeat.max(1) {
        let t = Instant::now();
        run()?;
        secs.push(t.elapsed().as_secs_f64());
    }
    secs.sort_by(|a, b| a.total_cmp(b));
    let median = percentile(&secs, 50.0);
    Ok((median, flops as f64 / median / 1e12))
}

/// umT5 on the device for both prompts (2 × 512 tokens, the second half padding): random
/// weights and relative-position biases made here, so a preset needs no checkpoint.
fn bench_text_device(
    dev: &crate::kernels::KernelDevice,
    c: &crate::models::umt5::Umt5Config,
    repeat: usize,
) -> Result<(f64, f64)> {
    use crate::models::umt5::gpu::{self as tg, TextShape, Umt5Session};
    let shape = TextShape {
        batch: 2,
        len: MAX_SEQUENCE_LENGTH,
    };
    let w = crate::gpu::DeviceWeights::random(
        dev,
        &tg::device_weight_specs(c, tg::dtype_from_env()?),
        1,
    )?;
    let span = c.num_heads * (2 * shape.len - 1);
    let biases: Vec<Vec<f32>> = (0..c.num_layers)
        .map(|l| crate::rng::gaussian(10 + l as u64, span))
        .collect();
    let mut session = Umt5Session::with_biases(dev, c, shape, &biases)?;
    let emb = crate::rng::gaussian(2, shape.batch * shape.len * c.d_model);
    let mask: Vec<i64> = (0..shape.batch * shape.len)
        .map(|i| (i % shape.len < shape.len / 2) as i64)
        .collect();
    time_device(repeat, || {
        session.encode_embedded(&w, &emb, &mask).map(|_| ())
    })
}

/// The VAE decode of `latent_frames` latent frames of h × w on the device, chunk by chunk
/// as a generation decodes (random weights made on the device, random latents).
fn bench_vae_device(
    dev: &crate::kernels::KernelDevice,
    c: &crate::models::wan_vae::WanVaeConfig,
    (latent_frames, h, w): (usize, usize, usize),
    repeat: usize,
) -> Result<(f64, f64)> {
    use crate::models::wan_vae::gpu::{self as vg, Coding, VaeSession};
    let dtype = vg::dtype_from_env()?;
    let weights = crate::gpu::DeviceWeights::random(
        dev,
        &vg::device_weight_specs(c, Coding::Decode, dtype)?,
        2,
    )?;
    let frame = crate::cpu::conv::Frames {
        t: 1,
        h,
        w,
        c: c.z_dim,
        data: crate::rng::gaussian(3, h * w * c.z_dim),
    };
    macro_rules! run {
        ($t:ty) => {{
            let mut session = VaeSession::<$t>::new(dev, c, Coding::Decode, (h, w))?;
            time_device(repeat, || {
                session.reset();
                for _ in 0..latent_frames {
                    session.chunk(&weights, &frame)?;
                }
                Ok(())
            })
        }};
    }
    if dtype == crate::gpu::WDtype::Bf16 {
        run!(half::bf16)
    } else {
        run!(half::f16)
    }
}

/// The human-readable table.
pub fn render(r: &BenchReport) -> String {
    let mut s = String::new();
    let opt = |v: Option<f64>, unit: &str| {
        v.map(|x| format!("{x:.4} {unit}"))
            .unwrap_or_else(|| "-".into())
    };
    s += &format!(
        "reel bench  {}  on {} ({} threads)  commit {}\n",
        r.model, r.device, r.cpu_threads, r.commit
    );
    let steps = match r.generation_seconds {
        Some(_) => format!(
            "one generation of {} steps (the first {} left out of the step times)",
            r.steps, r.warmup
        ),
        None => format!("{} steps after {} warm-up", r.steps, r.warmup),
    };
    s += &format!(
        "  {} x {} frames: {} video tokens x {} passes, {} text tokens; {steps}\n",
        r.size, r.frames, r.tokens, r.passes_per_step, r.text_tokens
    );
    s += &format!(
        "  step      median {:.4} s   p10 {:.4} s   p90 {:.4} s\n",
        r.step_seconds.median, r.step_seconds.p10, r.step_seconds.p90
    );
    s += &format!("  tokens/s  {:.1}\n", r.tokens_per_second);
    s += &format!(
        "  compute   {:.3} GFLOP/step, {:.4} TFLOP/s achieved, MFU {}\n",
        r.flops_per_step as f64 / 1e9,
        r.achieved_tflops,
        r.mfu
            .map(|m| format!("{:.2}%", m * 100.0))
            .unwrap_or_else(|| "- (no peak for the cpu; --peak-tflops)".into())
    );
    s += &format!(
        "  memory    peak {}\n",
        r.peak_memory_bytes
            .map(|b| format!("{:.1} MiB", b as f64 / (1 << 20) as f64))
            .unwrap_or_else(|| "-".into())
    );
    if r.text_seconds.is_some() || r.vae_decode_seconds.is_some() {
        let tf = |t: Option<f64>| t.map(|t| format!(" ({t:.2} TFLOP/s)")).unwrap_or_default();
        s += &format!(
            "  text encode {}{}   vae decode {}{}\n",
            opt(r.text_seconds, "s"),
            tf(r.text_tflops),
            opt(r.vae_decode_seconds, "s"),
            tf(r.vae_decode_tflops)
        );
    }
    if let (Some(g), Some(n)) = (r.generation_seconds, r.generation_steps) {
        s += &format!(
            "  one {n}-step generation: {g:.2} s measured end to end (text, steps, decode)\n"
        );
    }
    if let (Some(e), Some(n)) = (r.generation_estimate_seconds, r.generation_steps) {
        s += &format!(
            "  one {n}-step generation ≈ {e:.2} s (text + {n} × step + decode, from the parts above)\n"
        );
    }
    if !r.ops.is_empty() {
        s += "  op                       calls    seconds   TFLOP/s\n";
        for o in &r.ops {
            s += &format!(
                "  {:<24} {:>6} {:>10.4} {:>9}\n",
                o.name,
                o.calls,
                o.seconds,
                o.tflops
                    .map(|t| format!("{t:.4}"))
                    .unwrap_or_else(|| "-".into())
            );
        }
    }
    s
}

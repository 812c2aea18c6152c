//! The `reel` command line (DESIGN.md, "Command-line contract").

use std::path::{Path, PathBuf};

use clap::{Parser, Subcommand, ValueEnum};

use crate::error::{Error, Result};
use crate::io::{write_f32, TensorFile};
use crate::models::wan_dit::WanDit;
use crate::models::wan_vae::gpu::{self as vae_gpu, Coding};
use crate::models::wan_vae::CollectSink;

#[derive(Debug, Parser)]
#[command(name = "reel", version = concat!(env!("CARGO_PKG_VERSION"), " (", env!("REEL_GIT_COMMIT"), ")"), about = "Text-to-video diffusion transformer inference (Wan2.1)")]
pub struct Cli {
    /// More logging (-v info, -vv debug); RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    /// Only errors.
    #[arg(short, long, global = true)]
    pub quiet: bool,
    /// CPU threads (default: all cores).
    #[arg(long, global = true)]
    pub threads: Option<usize>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Device {
    Cpu,
    Cuda,
    Emu,
}

/// Which flash-attention kernel `kernel-bench attention` times.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AttnKernelArg {
    /// What the runtime picks (the sm_90 kernel on a Hopper GPU where it applies).
    Auto,
    /// The mma.sync kernel (kernels/attention.cu).
    Mma,
    /// The Hopper kernel (kernels/attention.sm90.cu), or an error off sm_90.
    Sm90,
}

impl From<AttnKernelArg> for crate::kernels::FlashKernel {
    fn from(a: AttnKernelArg) -> Self {
        match a {
            AttnKernelArg::Auto => crate::kernels::FlashKernel::Auto,
            AttnKernelArg::Mma => crate::kernels::FlashKernel::MmaSync,
            AttnKernelArg::Sm90 => crate::kernels::FlashKernel::Sm90,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum KernelOp {
    /// Flash attention forward (kernels/attention.cu, kernels/attention.sm90.cu).
    Attention,
    /// The runtime's GEMM (cuBLASLt where loaded, else kernels/gemm.cu).
    Gemm,
    /// The VAE's causal convolution (kernels/conv3d.cu), bf16.
    Conv3d,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SamplerArg {
    Unipc,
    Euler,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ComponentKind {
    /// The diffusion transformer (WanTransformer3DModel).
    Dit,
    /// VAE encoder (posterior mean).
    VaeEncode,
    /// VAE decoder.
    VaeDecode,
    /// umT5 text encoder.
    TextEncoder,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Generate videos from text (or prompt embeddings).
    Generate {
        /// A pipeline folder (diffusers layout) or a preset (wan2.1-t2v-1.3b, wan2.1-t2v-14b);
        /// default: the embedded tiny model with random weights (a smoke test).
        #[arg(long)]
        model: Option<String>,
        /// Run a preset with deterministic random weights (no download).
        #[arg(long)]
        random_weights: bool,
        #[arg(long)]
        prompt: Option<String>,
        /// A file with one prompt per line.
        #[arg(long)]
        prompts: Option<PathBuf>,
        #[arg(long, default_value = "")]
        negative_prompt: String,
        /// WxH, even sides, long side ≤ 1920, short side ≤ 1080 (default 832x480; the
        /// embedded model: 64x64).
        #[arg(long)]
        size: Option<String>,
        /// 1 + 4k frames (default 81; the embedded model: 17).
        #[arg(long)]
        frames: Option<usize>,
        /// Whole seconds at 16 fps instead of --frames (frames = 16·N + 1: 60 → 961).
        #[arg(long, conflicts_with = "frames")]
        seconds: Option<usize>,
        /// Denoising steps (default 50; the embedded model: 8).
        #[arg(long)]
        steps: Option<usize>,
        /// Classifier-free guidance scale (default 5; ≤ 1 skips the unconditional pass).
        #[arg(long)]
        guidance: Option<f32>,
        /// Flow shift (default: the scheduler config's).
        #[arg(long)]
        shift: Option<f64>,
        #[arg(long, value_enum)]
        sampler: Option<SamplerArg>,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Videos per prompt, with seeds seed, seed+1, ...
        #[arg(long, default_value_t = 1)]
        count: usize,
        /// auto (cuda when a GPU and driver are usable, else cpu; the log says which), cpu,
        /// cuda, cuda:N or emu (the SIMT emulator: slow, for checking).
        #[arg(long, default_value = "cpu")]
        device: String,
        /// Start from `latents` in this safetensors file instead of seeded noise.
        #[arg(long)]
        init_latents: Option<PathBuf>,
        /// Use `prompt_embeds` / `negative_prompt_embeds` from this file (no text encoder).
        #[arg(long)]
        prompt_embeds: Option<PathBuf>,
        #[arg(long, default_value_t = 16)]
        fps: u32,
        /// Make the video chunk by chunk with a block-causal model (causal_config.json
        /// beside its transformer), each chunk's frames written while the next is denoised;
        /// memory stays flat however long the video (the demo's variant was trained on the
        /// frame positions of a minute).
        #[arg(long)]
        stream: bool,
        /// Output: .mp4, .gif, .y4m, .safetensors, or a folder ending in / for PNG frames.
        #[arg(short, long)]
        output: String,
    },
    /// Run one model component on tensors from a safetensors file.
    Component {
        kind: ComponentKind,
        /// The component folder or the pipeline root.
        #[arg(long)]
        model: PathBuf,
        /// Input safetensors (tensor names per component; extra tensors are ignored).
        #[arg(long)]
        input: PathBuf,
        /// Output safetensors.
        #[arg(long)]
        output: PathBuf,
        #[arg(long, value_enum, default_value = "cpu")]
        device: Device,
        /// Run the forward N times in-process (the model loaded once) and print the wall
        /// time of each run as JSON on stdout: {"forward_seconds": [...]}. For benchmarks
        /// and profilers; the output file holds the last run.
        #[arg(long, default_value_t = 1)]
        repeat: usize,
        /// dit on the cpu: make the text's cross-attention K/V once, before the timed runs,
        /// as a generation does (what one denoising step costs). A kernel device always does.
        #[arg(long)]
        text_once: bool,
        /// Time the ops of the last run (per op class, and per labelled call: each GEMM,
        /// attention and VAE convolution by its shape) into the JSON line as "profile".
        #[arg(long)]
        profile: bool,
    },
    /// Time denoising steps (and optionally the VAE decode and text encoding).
    Bench {
        /// A pipeline folder or a preset; default: the embedded model.
        #[arg(long)]
        model: Option<String>,
        #[arg(long)]
        random_weights: bool,
        #[arg(long)]
        size: Option<String>,
        #[arg(long)]
        frames: Option<usize>,
        /// Timed denoising steps.
        #[arg(long, default_value_t = 5)]
        steps: usize,
        /// Untimed steps first.
        #[arg(long, default_value_t = 1)]
        warmup: usize,
        /// auto, cpu, cuda, cuda:N or emu (see generate).
        #[arg(long, default_value = "cpu")]
        device: String,
        /// One DiT pass per step (no classifier-free guidance).
        #[arg(long)]
        no_cfg: bool,
        /// Also time the VAE decode.
        #[arg(long)]
        vae: bool,
        /// Also time the text encoder.
        #[arg(long)]
        text: bool,
        /// On a kernel device: one timed generation end to end instead (umT5 on the prompt
        /// and the negative prompt, --steps guided DiT steps with the UniPC sampler, the VAE
        /// decode of the result; random weights made on the device), with its total and
        /// per-stage seconds and the device memory it held.
        #[arg(long)]
        generation: bool,
        /// Per-op breakdown (GEMM, attention, norm/RoPE/elementwise, VAE conv).
        #[arg(long)]
        profile: bool,
        /// Peak TFLOP/s for the MFU (default: the GPU's dense bf16 peak; none on the cpu).
        #[arg(long)]
        peak_tflops: Option<f64>,
        /// On a kernel device: block-causal streaming instead, one new video per --seconds
        /// (the DiT chunk by chunk, each chunk decoded as it is made): frames per second,
        /// time to the first frames, device memory. A preset runs with --causal's config
        /// (default longlive), a folder with its causal_config.json; no --model: the
        /// embedded block-causal demo.
        #[arg(long)]
        stream: bool,
        /// --stream: video lengths in seconds (repeatable; default 10 and 60).
        #[arg(long = "seconds")]
        seconds: Vec<usize>,
        /// --stream: the published model whose streaming config to use.
        #[arg(long, value_enum)]
        causal: Option<crate::convert::CausalPreset>,
        /// Write the report as JSON to FILE (`-` for stdout).
        #[arg(long)]
        json: Option<String>,
    },
    /// Time one GPU kernel alone on a kernel device (inputs made on the device by a
    /// reproducible hash; a sample of the output in the report), for benchmarks beside
    /// torch's on the same GPU (bench/kernels_gpu.py).
    KernelBench {
        op: KernelOp,
        #[arg(long, default_value_t = 1)]
        batch: usize,
        #[arg(long, default_value_t = 12)]
        heads: usize,
        /// Query tokens (and key tokens unless --kv-tokens).
        #[arg(long, default_value_t = 4096)]
        tokens: usize,
        #[arg(long)]
        kv_tokens: Option<usize>,
        #[arg(long, default_value_t = 128)]
        head_dim: usize,
        /// Attention: which kernel.
        #[arg(long, value_enum, default_value_t = AttnKernelArg::Auto)]
        attention_kernel: AttnKernelArg,
        /// GEMM rows of A and C.
        #[arg(long, default_value_t = 4096)]
        m: usize,
        /// GEMM rows of W (columns of C).
        #[arg(long, default_value_t = 4096)]
        n: usize,
        /// GEMM inner dimension.
        #[arg(long, default_value_t = 4096)]
        k: usize,
        /// GEMM: reel's kernel even where cuBLASLt is loaded.
        #[arg(long)]
        reel_kernel: bool,
        /// conv3d: frame height and width (pixels; padding 1 keeps them).
        #[arg(long, default_value_t = 480)]
        height: usize,
        #[arg(long, default_value_t = 832)]
        width: usize,
        /// conv3d: input and output channels.
        #[arg(long, default_value_t = 96)]
        ci: usize,
        #[arg(long, default_value_t = 96)]
        co: usize,
        /// conv3d: input frames (a decode chunk: 2 cached + 4) and the kernel's depth (3 or
        /// 1; 3×3 spatial either way).
        #[arg(long, default_value_t = 6)]
        frames: usize,
        #[arg(long, default_value_t = 3)]
        kt: usize,
        /// Untimed runs first.
        #[arg(long, default_value_t = 2)]
        warmup: usize,
        /// Timed runs.
        #[arg(long, default_value_t = 10)]
        repeat: usize,
        #[arg(long, default_value_t = 1)]
        seed: u32,
        /// Output values to report at hashed positions.
        #[arg(long, default_value_t = 4096)]
        samples: usize,
        /// emu, cuda or cuda:N.
        #[arg(long, default_value = "cuda")]
        device: String,
        /// Write the report as JSON to FILE (`-` for stdout).
        #[arg(long)]
        json: Option<String>,
    },
    /// Serve an OpenAI-style video API over HTTP.
    Serve {
        /// A pipeline folder or a preset; default: the embedded model.
        #[arg(long)]
        model: Option<String>,
        #[arg(long)]
        random_weights: bool,
        #[arg(long, default_value = "127.0.0.1:8000")]
        addr: String,
        /// Where jobs, videos and thumbnails are kept (survives restarts).
        #[arg(long, default_value = "reel-data")]
        data_dir: PathBuf,
        /// Queued jobs before POST /v1/videos answers 429.
        #[arg(long, default_value_t = 16)]
        max_queue: usize,
        /// Evict finished jobs older than this.
        #[arg(long)]
        keep_hours: Option<f64>,
        /// Evict the oldest finished jobs while videos take more than this.
        #[arg(long)]
        max_disk_gb: Option<f64>,
        /// Require `Authorization: Bearer KEY` on /v1 routes.
        #[arg(long, env = "REEL_API_KEY", hide_env_values = true)]
        api_key: Option<String>,
        /// auto, cpu, cuda, cuda:N or emu (see generate): one worker owns it and the loaded
        /// model; each request's plan is checked at submission.
        #[arg(long, default_value = "cpu")]
        device: String,
        /// GiB of device memory each job's plan must fit (default: the GPU's free memory at
        /// start; 80 on emu).
        #[arg(long)]
        device_memory: Option<f64>,
        /// Seconds a connection may stay silent (no byte read or written), and the most a
        /// request body may take to arrive (408 after it).
        #[arg(long, default_value_t = crate::server::IDLE_TIMEOUT_SECS)]
        idle_timeout: f64,
        /// Connections served at once (more wait in the listen backlog).
        #[arg(long, default_value_t = crate::server::MAX_CONNECTIONS)]
        max_connections: usize,
        /// Many workers behind one API: jobs on this Redis (redis://HOST:PORT/DB), outputs in
        /// --store. Without it, one process serves and runs everything as before.
        #[arg(long)]
        queue: Option<String>,
        /// With --queue: api (validate, record, serve), worker (run jobs on --device; only
        /// /health and /metrics over HTTP) or both.
        #[arg(long, default_value = "both", requires = "queue")]
        role: String,
        /// With --queue: where outputs go, shared by every API and worker: file:///DIR or
        /// s3://BUCKET/PREFIX (AWS_* variables: credentials, region, AWS_ENDPOINT for an
        /// S3-compatible service); required with --role api or worker, default
        /// file://<data-dir>/store with both.
        #[arg(long, requires = "queue")]
        store: Option<String>,
        /// With --queue: seconds without a heartbeat before another worker takes a running
        /// job over.
        #[arg(long, default_value_t = crate::cluster::RECLAIM_AFTER_SECS)]
        reclaim_after: f64,
        /// With --queue: times a job is started again after its worker was lost, before it
        /// fails with code worker_lost.
        #[arg(long, default_value_t = crate::cluster::RETRIES)]
        retries: u32,
        /// With --queue: this worker's name (default: host name and process id).
        #[arg(long, requires = "queue")]
        worker_name: Option<String>,
    },
    /// Convert a Wan DiT checkpoint in Wan's original key layout (the Wan2.1 release,
    /// Self-Forcing, LongLive; safetensors, see tools/pt_to_safetensors.py for .pt) into a
    /// diffusers transformer folder, merging a LoRA.
    Convert {
        /// A .safetensors file, or a folder of shards.
        input: PathBuf,
        /// The transformer folder to write (config.json + weights).
        #[arg(short, long)]
        output: PathBuf,
        /// A LoRA in peft's layout (lora_A / lora_B), merged as W + scale·B·A.
        #[arg(long)]
        lora: Option<PathBuf>,
        /// The LoRA's scale: peft's alpha / rank (LongLive: 256 / 256 = 1).
        #[arg(long, default_value_t = 1.0, requires = "lora")]
        lora_scale: f32,
        /// Attention heads (default: inner dim / 128, as every Wan2.1 model).
        #[arg(long)]
        heads: Option<usize>,
        /// Store the weights as f32, bf16 or f16 (default: each tensor's own dtype).
        #[arg(long)]
        dtype: Option<String>,
        /// Also write the causal_config.json of a published block-causal model.
        #[arg(long, value_enum)]
        causal: Option<crate::convert::CausalPreset>,
    },
    /// Describe a model folder: components, config, parameters, dtypes, tensors.
    Inspect {
        /// A model folder; without it, the embedded demo model.
        dir: Option<PathBuf>,
        /// Write the report as JSON to FILE (`-` for stdout).
        #[arg(long)]
        json: Option<String>,
    },
    /// The static memory plan of a generation on a GPU, computed before anything runs:
    /// weights, persistent buffers, the arena of a denoising step, the largest buffers.
    Plan {
        /// A pipeline folder or a preset; default: the embedded model.
        #[arg(long)]
        model: Option<String>,
        /// WIDTHxHEIGHT (default 832x480; 64x64 for the embedded model).
        #[arg(long)]
        size: Option<String>,
        /// Video frames, 1 + 4k (default 81; 17 for the embedded model).
        #[arg(long)]
        frames: Option<usize>,
        /// Whole seconds at 16 fps instead of --frames (frames = 16·N + 1).
        #[arg(long, conflicts_with = "frames")]
        seconds: Option<usize>,
        /// GiB of device memory to fit in (default: the GPU's free memory; 80 without a GPU).
        #[arg(long)]
        device_memory: Option<f64>,
        /// sm_80, sm_86, sm_89 or sm_90: the launch limits to plan for (default: the GPU's;
        /// sm_90 without one).
        #[arg(long)]
        arch: Option<String>,
        /// Plan block-causal streaming with a published model's config (a folder with a
        /// causal_config.json is planned that way without it).
        #[arg(long, value_enum)]
        causal: Option<crate::convert::CausalPreset>,
        /// Write the plan as JSON to FILE (`-` for stdout).
        #[arg(long)]
        json: Option<String>,
    },
}

/// `--device auto|cpu|cuda|cuda:N|emu` → the kernel device (None: the cpu). auto takes
/// cuda:0 when the driver loads, kernels were built for it and a GPU answers, else the cpu,
/// and says which.
pub fn resolve_device(spec: &str) -> Result<Option<crate::kernels::KernelDevice>> {
    match spec.trim() {
        "cpu" => Ok(None),
        "auto" => {
            if crate::cuda::driver_present() && !crate::kernels::FATBINS.is_empty() {
                match crate::kernels::KernelDevice::cuda(0) {
                    Ok(d) => {
                        tracing::info!("--device auto: {}", d.describe());
                        return Ok(Some(d));
                    }
                    Err(e) => tracing::info!("--device auto: no usable GPU ({e}): the cpu"),
                }
            } else {
                tracing::info!(
                    "--device auto: no CUDA driver{}: the cpu",
                    if crate::kernels::FATBINS.is_empty() {
                        " or no kernels built for it"
                    } else {
                        ""
                    }
                );
            }
            Ok(None)
        }
        // A cuda spec that names a GPU the machine cannot give says why (no driver, no such
        // GPU); anything else is not a device.
        other if other == "emu" || other == "cuda" || other.starts_with("cuda:") => {
            crate::kernels::KernelDevice::parse(other)
                .map(Some)
                .map_err(|e| Error::invalid(format!("--device {other}: {e}")))
        }
        other => Err(Error::invalid(format!(
            "--device {other}: expected auto, cpu, cuda, cuda:N or emu"
        ))),
    }
}

/// The kernel device for `--device` (None: the cpu).
fn kernel_device(device: Device) -> Result<Option<crate::kernels::KernelDevice>> {
    Ok(match device {
        Device::Cpu => None,
        Device::Emu => Some(crate::kernels::KernelDevice::Emu),
        Device::Cuda => Some(crate::kernels::KernelDevice::cuda(0)?),
    })
}

/// Runs `forward` `repeat` times, timing each run; returns the last output and the seconds.
fn timed<T>(
    what: &str,
    runs: Runs,
    mut forward: impl FnMut() -> Result<T>,
) -> Result<(T, Vec<f64>)> {
    if runs.repeat == 0 {
        return Err(Error::invalid("--repeat must be at least 1"));
    }
    let mut seconds = Vec::with_capacity(runs.repeat);
    let mut out = None;
    for i in 0..runs.repeat {
        crate::profile::enable(runs.profile && i + 1 == runs.repeat);
        let started = std::time::Instant::now();
        out = Some(forward()?);
        seconds.push(started.elapsed().as_secs_f64());
        tracing::info!("{what} in {:.4} s", seconds.last().copied().unwrap_or(0.0));
    }
    if runs.profile {
        // Keep the counters (read by the caller) but stop counting.
        crate::profile::pause();
    }
    let out = out.ok_or_else(|| Error::invalid("no forward ran"))?;
    Ok((out, seconds))
}

/// How `reel component` runs: `repeat` forwards; `text_once`: the DiT's text K/V made
/// before them (cpu); `profile`: the last run's ops timed ([`crate::profile`]).
#[derive(Debug, Clone, Copy)]
pub struct Runs {
    pub repeat: usize,
    pub text_once: bool,
    pub profile: bool,
}

impl From<usize> for Runs {
    fn from(repeat: usize) -> Self {
        Runs {
            repeat,
            text_once: false,
            profile: false,
        }
    }
}

/// `reel component KIND`: loads the component once, runs it `repeat` times on the tensors
/// of `input` (DESIGN.md's names; extra tensors are ignored), writes the last output to
/// `output`, and returns the seconds of each run.
///
/// - dit: `hidden_states` [B,16,T,h,w], `timestep` [B], `encoder_hidden_states` [B,L,text_dim]
///   → `sample`
/// - text-encoder: `input_ids`, `attention_mask` [B,L] (int64) → `last_hidden_state`
///   [B,L,d_model]; needs no tokenizer
/// - vae-encode: `sample` [B,3,F,H,W] in [-1,1] → `latent_mean` (posterior mean, not
///   normalized)
/// - vae-decode: `latents` [B,16,T,h,w] (not normalized) → `decoded` [B,3,F,H,W]
pub fn component(
    kind: ComponentKind,
    model: &Path,
    input: &Path,
    output: &Path,
    repeat: usize,
) -> Result<Vec<f64>> {
    component_on(kind, None, model, input, output, repeat)
}

/// The JSON `reel component --profile` prints: per op class, then per labelled call.
pub fn profile_json() -> serde_json::Value {
    let ops: Vec<_> = crate::profile::snapshot()
        .into_iter()
        .filter(|&(_, calls, _, _)| calls > 0)
        .map(|(name, calls, s, flops)| {
            serde_json::json!({"op": name, "calls": calls, "seconds": s,
                "gflops": if s > 0.0 { flops as f64 / s * 1e-9 } else { 0.0 }})
        })
        .collect();
    let labels: Vec<_> = crate::profile::labels()
        .into_iter()
        .map(|(label, calls, s, flops)| {
            serde_json::json!({"label": label, "calls": calls, "seconds": s,
                "gflops": if s > 0.0 { flops as f64 / s * 1e-9 } else { 0.0 }})
        })
        .collect();
    serde_json::json!({"ops": ops, "labels": labels})
}

/// [`component`] on a kernel device (`dev` Some: emu or cuda) or the cpu (None). On a
/// kernel device the weights are uploaded and the session planned once; `repeat` times the
/// forward alone (for the DiT: one step; the prompt's cross-attention K/V are made once).
pub fn component_on(
    kind: ComponentKind,
    dev: Option<&crate::kernels::KernelDevice>,
    model: &Path,
    input: &Path,
    output: &Path,
    runs: impl Into<Runs>,
) -> Result<Vec<f64>> {
    let runs = runs.into();
    // The model is loaded before the input is opened, so a bad --model is reported first.
    let open = || TensorFile::open(input);
    let (name, (out, seconds)) = match kind {
        ComponentKind::Dit if dev.is_some() => {
            let dev = dev.expect("matched Some");
            let dit = WanDit::load(model)?;
            let file = open()?;
            let x = file.tensor("hidden_states")?;
            let t = file.tensor("timestep")?;
            let ctx = file.tensor("encoder_hidden_states")?;
            let (batch, _) = dit.check_inputs(x.shape(), t.shape(), ctx.shape())?;
            let s = x.shape().to_vec();
            let w = dit.upload(dev)?;
            let mut session = crate::models::wan_dit::gpu::DitSession::new(
                dev,
                &dit.config,
                crate::models::wan_dit::gpu::DitShape {
                    batch,
                    frames: s[2],
                    height: s[3],
                    width: s[4],
                    text_len: ctx.shape()[1],
                },
            )?;
            session.set_text(&w, ctx.data())?;
            let out_shape = vec![batch, dit.config.out_channels(), s[2], s[3], s[4]];
            (
                "sample",
                timed("dit forward", runs, || {
                    crate::Tensor::new(out_shape.clone(), session.step(&w, x.data(), t.data())?)
                })?,
            )
        }
        ComponentKind::Dit => {
            let dit = WanDit::load(model)?;
            let file = open()?;
            let x = file.tensor("hidden_states")?;
            let t = file.tensor("timestep")?;
            let ctx = file.tensor("encoder_hidden_states")?;
            let out = if runs.text_once {
                let kv = dit.text_kv(&ctx)?;
                timed("dit forward", runs, || dit.forward_kv(&x, &t, &kv))?
            } else {
                timed("dit forward", runs, || dit.forward(&x, &t, &ctx))?
            };
            ("sample", out)
        }
        ComponentKind::TextEncoder => {
            let encoder = crate::models::umt5::Umt5Encoder::load(model)?;
            let file = open()?;
            let (shape, ids) = file.tensor_i64("input_ids")?;
            let (mshape, mask) = file.tensor_i64("attention_mask")?;
            if shape.len() != 2 || mshape != shape {
                return Err(Error::invalid(format!(
                    "{}: input_ids {shape:?} and attention_mask {mshape:?} must both be [B, L]",
                    input.display()
                )));
            }
            let out = match dev {
                Some(dev) => {
                    let w = encoder.upload(dev, crate::models::umt5::gpu::dtype_from_env()?)?;
                    let shape = crate::models::umt5::gpu::TextShape {
                        batch: shape[0],
                        len: shape[1],
                    };
                    let mut session =
                        crate::models::umt5::gpu::Umt5Session::new(dev, &encoder, shape)?;
                    timed("text encoder forward", runs, || {
                        session.encode(&encoder, &w, &ids, &mask)
                    })?
                }
                None => timed("text encoder forward", runs, || {
                    encoder.forward(&ids, &mask, shape[0], shape[1])
                })?,
            };
            ("last_hidden_state", out)
        }
        ComponentKind::VaeEncode => {
            let vae = crate::models::wan_vae::WanVae::load(model)?;
            let x = open()?.tensor("sample")?;
            let out = match dev {
                Some(dev) => {
                    let w = vae.upload(dev, Coding::Encode, vae_gpu::dtype_from_env()?)?;
                    timed("vae encode", runs, || vae.encode_on(dev, &w, &x))?
                }
                None => timed("vae encode", runs, || vae.encode(&x))?,
            };
            ("latent_mean", out)
        }
        ComponentKind::VaeDecode => {
            let vae = crate::models::wan_vae::WanVae::load(model)?;
            let z = open()?.tensor("latents")?;
            let b = z.shape().first().copied().unwrap_or(0);
            let out = match dev {
                Some(dev) => {
                    let w = vae.upload(dev, Coding::Decode, vae_gpu::dtype_from_env()?)?;
                    timed("vae decode", runs, || {
                        let mut sink = CollectSink::new(b);
                        vae.decode_on(dev, &w, &z, &mut sink)?;
                        sink.into_tensor()
                    })?
                }
                None => timed("vae decode", runs, || vae.decode(&z))?,
            };
            ("decoded", out)
        }
    };
    write_f32(output, &[(name, &out)])?;
    Ok(seconds)
}

/// `reel component dit` once (see [`component`]).
pub fn component_dit(model: &Path, input: &Path, output: &Path) -> Result<()> {
    component(ComponentKind::Dit, model, input, output, 1).map(|_| ())
}

/// `reel component text-encoder` once (see [`component`]).
pub fn component_text_encoder(model: &Path, input: &Path, output: &Path) -> Result<()> {
    component(ComponentKind::TextEncoder, model, input, output, 1).map(|_| ())
}

/// `reel component vae-encode` once (see [`component`]).
pub fn component_vae_encode(model: &Path, input: &Path, output: &Path) -> Result<()> {
    component(ComponentKind::VaeEncode, model, input, output, 1).map(|_| ())
}

/// `reel component vae-decode` once (see [`component`]).
pub fn component_vae_decode(model: &Path, input: &Path, output: &Path) -> Result<()> {
    component(ComponentKind::VaeDecode, model, input, output, 1).map(|_| ())
}

/// Runs a parsed command line. Returns what the command prints on stdout (the binary
/// prints it; the library never writes to stdout itself).
pub fn run(cli: Cli) -> Result<String> {
    if let Some(n) = cli.threads {
        if n == 0 {
            return Err(Error::invalid("--threads must be at least 1"));
        }
        // Fails only if the pool already exists, which it cannot at this point.
        let _ = rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global();
    }
    match cli.command {
        Command::Generate {
            model,
            random_weights,
            prompt,
            prompts,
            negative_prompt,
            size,
            frames,
            seconds,
            steps,
            guidance,
            shift,
            sampler,
            seed,
            count,
            device,
            init_latents,
            prompt_embeds,
            fps,
            stream,
            output,
        } => {
            let device = resolve_device(&device)?;
            let args = crate::generate::GenerateArgs {
                model,
                random_weights,
                prompt,
                prompts_file: prompts,
                negative_prompt,
                size,
                frames: match seconds {
                    Some(0) => return Err(Error::invalid("--seconds must be at least 1")),
                    Some(n) => Some(16 * n + 1),
                    None => frames,
                },
                steps,
                guidance,
                shift,
                sampler: sampler.map(|s| match s {
                    SamplerArg::Unipc => crate::sampler::SamplerKind::Unipc,
                    SamplerArg::Euler => crate::sampler::SamplerKind::Euler,
                }),
                seed,
                count,
                init_latents,
                prompt_embeds,
                output,
                fps,
                quiet: cli.quiet,
                stream,
                device,
            };
            let written = crate::generate::generate(&args)?;
            Ok(written.iter().map(|s| format!("{}\n", s.output)).collect())
        }
        Command::Component {
            kind,
            model,
            input,
            output,
            device,
            repeat,
            text_once,
            profile,
        } => {
            let dev = kernel_device(device)?;
            let runs = Runs {
                repeat,
                text_once,
                profile,
            };
            let seconds = component_on(kind, dev.as_ref(), &model, &input, &output, runs)?;
            let mut line = serde_json::json!({ "forward_seconds": seconds });
            if profile {
                line["profile"] = profile_json();
            }
            Ok(if repeat > 1 || profile {
                format!("{line}\n")
            } else {
                String::new()
            })
        }
        Command::Bench {
            model,
            random_weights,
            size,
            frames,
            steps,
            warmup,
            device,
            no_cfg,
            vae,
            text,
            generation,
            profile,
            peak_tflops,
            stream,
            seconds,
            causal,
            json,
        } => {
            if stream {
                let Some(device) = resolve_device(&device)? else {
                    return Err(Error::invalid(
                        "bench --stream runs on a kernel device (--device cuda or emu); on the cpu, reel generate --stream reports its timings in the sidecar",
                    ));
                };
                let report =
                    crate::stream_bench::bench_stream(&crate::stream_bench::StreamBenchArgs {
                        model,
                        random_weights,
                        size,
                        seconds: if seconds.is_empty() {
                            vec![10, 60]
                        } else {
                            seconds
                        },
                        causal,
                        device,
                    })?;
                let text = crate::stream_bench::render(&report);
                return Ok(match json.as_deref() {
                    Some(dest) => {
                        let j = serde_json::to_string_pretty(&report)
                            .map_err(|e| Error::invalid(e.to_string()))?;
                        let mut out = write_text(dest, &j)?;
                        if dest != "-" {
                            out += &text;
                        }
                        out
                    }
                    None => text,
                });
            }
            if !seconds.is_empty() || causal.is_some() {
                return Err(Error::invalid("--seconds and --causal go with --stream"));
            }
            let report = crate::bench::bench(&crate::bench::BenchArgs {
                device: resolve_device(&device)?,
                model,
                random_weights,
                size,
                frames,
                steps,
                warmup,
                no_cfg,
                vae,
                text,
                generation,
                profile,
                peak_tflops,
            })?;
            let mut out = String::new();
            match json.as_deref() {
                Some(dest) => {
                    let text = serde_json::to_string_pretty(&report)
                        .map_err(|e| Error::invalid(e.to_string()))?;
                    out += &write_text(dest, &text)?;
                    if dest != "-" {
                        out += &crate::bench::render(&report);
                    }
                }
                None => out += &crate::bench::render(&report),
            }
            Ok(out)
        }
        Command::KernelBench {
            op,
            batch,
            heads,
            tokens,
            kv_tokens,
            head_dim,
            attention_kernel,
            m,
            n,
            k,
            reel_kernel,
            height,
            width,
            ci,
            co,
            frames,
            kt,
            warmup,
            repeat,
            seed,
            samples,
            device,
            json,
        } => {
            let dev = crate::kernels::KernelDevice::parse(&device)?;
            let (value, line) = match op {
                KernelOp::Attention => {
                    let r = crate::kernel_bench::attention(
                        &dev,
                        &crate::kernel_bench::AttnBenchArgs {
                            batch,
                            heads,
                            tokens,
                            kv_tokens,
                            head_dim,
                            kernel: attention_kernel.into(),
                            warmup,
                            repeat,
                            seed,
                            samples,
                        },
                    )?;
                    (serde_json::to_value(&r), crate::kernel_bench::render(&r))
                }
                KernelOp::Gemm => {
                    let r = crate::kernel_bench::gemm(
                        &dev,
                        &crate::kernel_bench::GemmBenchArgs {
                            m,
                            n,
                            k,
                            reel_kernel,
                            warmup,
                            repeat,
                            seed,
                            samples,
                        },
                    )?;
                    (
                        serde_json::to_value(&r),
                        crate::kernel_bench::render_gemm(&r),
                    )
                }
                KernelOp::Conv3d => {
                    let r = crate::kernel_bench::conv3d(
                        &dev,
                        &crate::kernel_bench::ConvBenchArgs {
                            height,
                            width,
                            ci,
                            co,
                            frames,
                            kt,
                            warmup,
                            repeat,
                            seed,
                            samples,
                        },
                    )?;
                    (
                        serde_json::to_value(&r),
                        crate::kernel_bench::render_conv(&r),
                    )
                }
            };
            let mut out = String::new();
            if let Some(dest) = json.as_deref() {
                let text = serde_json::to_string_pretty(
                    &value.map_err(|e| Error::invalid(e.to_string()))?,
                )
                .map_err(|e| Error::invalid(e.to_string()))?;
                out += &write_text(dest, &text)?;
                if dest == "-" {
                    return Ok(out);
                }
            }
            out += &line;
            Ok(out)
        }
        Command::Serve {
            model,
            random_weights,
            addr,
            data_dir,
            max_queue,
            keep_hours,
            max_disk_gb,
            api_key,
            device,
            device_memory,
            idle_timeout,
            max_connections,
            queue,
            role,
            store,
            reclaim_after,
            retries,
            worker_name,
        } => {
            let device = resolve_device(&device)?;
            let cluster = match queue {
                Some(queue) => Some(crate::cluster::ClusterArgs {
                    queue,
                    role: crate::cluster::Role::parse(&role)?,
                    store,
                    reclaim_after_secs: reclaim_after,
                    retries,
                    worker_name,
                }),
                None => None,
            };
            crate::server::serve(&crate::server::ServeArgs {
                idle_timeout_secs: Some(idle_timeout),
                max_connections: Some(max_connections),
                model,
                random_weights,
                addr,
                data_dir,
                max_queue,
                keep_hours,
                max_disk_gb,
                api_key,
                device,
                device_memory_gib: device_memory,
                cluster,
            })?;
            Ok(String::new())
        }
        Command::Convert {
            input,
            output,
            lora,
            lora_scale,
            heads,
            dtype,
            causal,
        } => {
            let dtype = match dtype.as_deref().map(str::to_ascii_lowercase).as_deref() {
                None => None,
                Some("f32") => Some(crate::weights::Dtype::F32),
                Some("bf16") => Some(crate::weights::Dtype::BF16),
                Some("f16") => Some(crate::weights::Dtype::F16),
                Some(other) => {
                    return Err(Error::invalid(format!(
                        "--dtype {other}: expected f32, bf16 or f16"
                    )))
                }
            };
            let done = crate::convert::convert(&crate::convert::ConvertArgs {
                input,
                lora,
                lora_scale,
                heads,
                dtype,
                causal,
                out: output.clone(),
            })?;
            let c = &done.config;
            Ok(format!(
                "{}: {} tensors ({} layers, {} heads of {}, ffn {}), {} merged with the LoRA\n",
                output.display(),
                done.tensors,
                c.num_layers,
                c.num_attention_heads,
                c.attention_head_dim,
                c.ffn_dim,
                done.lora_merged
            ))
        }
        Command::Inspect { dir, json } => {
            let dir = match dir {
                Some(d) => d,
                None => crate::models::embedded::ensure()?,
            };
            let reports = crate::inspect::inspect(&dir)?;
            match json.as_deref() {
                Some(dest) => {
                    let text = serde_json::to_string_pretty(&reports)
                        .map_err(|e| Error::invalid(e.to_string()))?;
                    write_text(dest, &text)
                }
                None => Ok(crate::inspect::render(&reports)),
            }
        }
        Command::Plan {
            model,
            size,
            frames,
            seconds,
            device_memory,
            arch,
            causal,
            json,
        } => {
            let report = crate::plan::plan(&crate::plan::PlanArgs {
                model,
                size,
                frames: frames.or(seconds.map(|s| 16 * s + 1)),
                device_memory_gib: device_memory,
                arch,
                causal: causal.map(|p| p.config()),
            })?;
            let mut out = String::new();
            if let Some(dest) = json.as_deref() {
                let text = serde_json::to_string_pretty(&report)
                    .map_err(|e| Error::invalid(e.to_string()))?;
                out += &write_text(dest, &text)?;
                if dest == "-" {
                    return Ok(out);
                }
            }
            out += &crate::plan::render(&report);
            Ok(out)
        }
    }
}

/// Writes `text` to a file and returns nothing to print, or returns it for stdout (`-`).
pub fn write_text(dest: &str, text: &str) -> Result<String> {
    if dest == "-" {
        return Ok(format!("{text}\n"));
    }
    std::fs::write(dest, text).map_err(|source| Error::Io {
        path: PathBuf::from(dest),
        source,
    })?;
    Ok(String::new())
}

//! `reel plan`: the static memory plan of a generation on a kernel device, computed before
//! anything is allocated (the DiT's device forward run in measuring mode, see
//! [`crate::gpu::ctx`]): weights on the device, the persistent buffers of a prompt, the arena
//! of one denoising step with both guidance passes batched (B = 2: one read of the weights
//! per step and larger GEMMs, for the activations of one more sample), the ten largest
//! buffers, and whether it fits the device memory. The umT5 text encoder (both prompts, 512
//! tokens each) and the VAE decoder (chunk by chunk, its causal caches persistent) are
//! planned the same way, and the plan decides whether the text encoder stays resident
//! beside the DiT and the VAE or is freed before the DiT's weights are uploaded.
//!
//! Stages of a generation: text (umT5 encodes, its arena), denoise (the DiT's persistent
//! buffers and arena), decode (the DiT's latents kept, the VAE's arena and caches). With the
//! encoder resident the peak is every weight plus the largest stage; freed, it is the
//! larger of (umT5 weights + its arena) and (DiT + VAE weights + the larger later stage).

use serde::Serialize;

use crate::error::{Error, Result};
use crate::generate::{parse_size, PRESETS};
use crate::gpu::{DeviceWeights, MemoryPlan};
use crate::kernels::{Arch, KernelDevice};
use crate::models::umt5::gpu::{self as text_gpu, TextShape};
use crate::models::umt5::Umt5Config;
use crate::models::wan_dit::gpu::{device_weight_specs, plan as dit_plan, plan_causal, DitShape};
use crate::models::wan_dit::{CausalConfig, WanDitConfig};
use crate::models::wan_vae::gpu::{self as vae_gpu, Coding};
use crate::models::wan_vae::WanVaeConfig;
use crate::models::{embedded, read_json, resolve_component};

/// What `reel plan` was asked.
#[derive(Debug, Clone)]
pub struct PlanArgs {
    pub model: Option<String>,
    pub size: Option<String>,
    pub frames: Option<usize>,
    /// GiB of device memory (default: the GPU's free memory, or 80 without one).
    pub device_memory_gib: Option<f64>,
    /// The architecture whose launch limits the plan checks (default: the GPU's, or sm_90).
    pub arch: Option<String>,
    /// Plan block-causal streaming with this config (default: the model folder's
    /// transformer/causal_config.json, when it has one).
    pub causal: Option<CausalConfig>,
}

/// A block-causal plan's extra lines.
#[derive(Debug, Clone, Serialize)]
pub struct StreamingLine {
    pub chunk_frames: usize,
    pub sink_frames: usize,
    pub local_attn_frames: usize,
    /// Both prompts' cross-attention K/V (guidance) or the prompt's.
    pub prompts: usize,
    /// Every block's self-attention K/V of local_attn_frames frames.
    pub kv_cache_bytes: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct BufferLine {
    pub name: String,
    pub phase: String,
    pub kind: crate::gpu::Kind,
    pub bytes: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct PlanReport {
    pub model: String,
    pub size: String,
    /// The size generated (sides rounded up to multiples of 16).
    pub generated: String,
    pub frames: usize,
    pub latent: [usize; 3],
    pub tokens: usize,
    pub batch: usize,
    pub text_tokens: usize,
    pub arch: String,
    pub device_memory_bytes: u64,
    /// Where device_memory_bytes comes from.
    pub device_memory_source: String,
    pub dit_weights_bytes: usize,
    pub dit_persistent_bytes: usize,
    pub dit_text_arena_bytes: usize,
    pub dit_step_arena_bytes: usize,
    pub dit_arena_bytes: usize,
    /// reel's GEMM needs none; cuBLASLt's is planned with its issue.
    pub gemm_workspace_bytes: usize,
    /// umT5 on the device: 16-bit matrices and f32 norms (the embedding stays on the host).
    pub text_encoder_weights_bytes: usize,
    /// Its arena and persistent bytes for both prompts of 512 tokens.
    pub text_encoder_run_bytes: usize,
    /// The VAE decoder's weights, and its arena plus persistent causal caches.
    pub vae_weights_bytes: usize,
    pub vae_run_bytes: usize,
    /// Whether the text encoder stays on the device for the whole generation (else it is
    /// freed before the DiT's weights are uploaded).
    pub text_encoder_resident: bool,
    pub peak_bytes: usize,
    pub fits: bool,
    pub largest: Vec<BufferLine>,
    pub launches_per_step: usize,
    /// Block-causal streaming (a chunk at a time; tokens and batch are a chunk's): the DiT
    /// session and the VAE decoder are alive together, and nothing depends on the length.
    pub streaming: Option<StreamingLine>,
}

const GIB: f64 = (1u64 << 30) as f64;

/// The umT5 and VAE configs beside the DiT's: the presets' real ones, else the folder's
/// (None: a folder without text_encoder/ (run with given prompt embeddings) or without
/// vae/ (a transformer folder planned alone)).
pub(crate) fn side_configs(
    model: Option<&str>,
) -> Result<(Option<Umt5Config>, Option<WanVaeConfig>)> {
    let dir = match model {
        None => embedded::ensure()?,
        Some(name) if PRESETS.contains(&name) && !std::path::Path::new(name).exists() => {
            return Ok((Some(Umt5Config::umt5_xxl()), Some(WanVaeConfig::default())))
        }
        Some(dir) => std::path::PathBuf::from(dir),
    };
    let tc = if dir.join("text_encoder").join("config.json").is_file() {
        let text = resolve_component(&dir, "text_encoder", &[crate::models::umt5::CLASS_NAME])?;
        let tc: Umt5Config = read_json(&text.join("config.json"))?;
        tc.validate(&text.join("config.json"))?;
        Some(tc)
    } else {
        None
    };
    let vc = if dir.join("vae").join("config.json").is_file() {
        let vae = resolve_component(&dir, "vae", &[crate::models::wan_vae::CLASS_NAME])?;
        let vc: WanVaeConfig = read_json(&vae.join("config.json"))?;
        vc.validate(&vae.join("config.json"))?;
        Some(vc)
    } else {
        None
    };
    Ok((tc, vc))
}

/// The DiT's config, the model's name, whether it is the embedded demo, and the folder's
/// block-causal config if it has one.
fn dit_config(model: Option<&str>) -> Result<(WanDitConfig, String, bool, Option<CausalConfig>)> {
    match model {
        None => {
            let dir = embedded::ensure()?;
            let path = resolve_component(&dir, "transformer", &["WanTransformer3DModel"])?;
            Ok((
                read_json(&path.join("config.json"))?,
                embedded::NAME.into(),
                true,
                CausalConfig::load(&path)?,
            ))
        }
        Some(name) if PRESETS.contains(&name) && !std::path::Path::new(name).exists() => Ok((
            crate::generate::preset_configs(name).0,
            name.into(),
            false,
            None,
        )),
        Some(dir) => {
            let path = resolve_component(
                std::path::Path::new(dir),
                "transformer",
                &["WanTransformer3DModel"],
            )?;
            let c: WanDitConfig = read_json(&path.join("config.json"))?;
            c.validate(&path.join("config.json"))?;
            Ok((c, dir.into(), false, CausalConfig::load(&path)?))
        }
    }
}

/// The plan of one generation (see the module docs).
pub fn plan(a: &PlanArgs) -> Result<PlanReport> {
    let (c, name, demo, folder_causal) = dit_config(a.model.as_deref())?;
    let causal = a.causal.clone().or(folder_causal);
    let (w, h) = parse_size(
        a.size
            .as_deref()
            .unwrap_or(if demo { "64x64" } else { "832x480" }),
    )?;
    let frames = a.frames.unwrap_or(if demo { 17 } else { 81 });
    if frames == 0 || (frames - 1) % 4 != 0 {
        return Err(Error::invalid(format!(
            "--frames {frames}: the causal VAE takes 1 + 4k frames (81, 961, ...)"
        )));
    }
    let (gw, gh) = (w.div_ceil(16) * 16, h.div_ceil(16) * 16);
    let mut shape = DitShape {
        batch: 2,
        frames: (frames - 1) / 4 + 1,
        height: gh / 8,
        width: gw / 8,
        text_len: crate::text::MAX_SEQUENCE_LENGTH,
    };
    let (arch, mem, source) = device_facts(a)?;
    let latent = [shape.frames, shape.height, shape.width];
    let (p, streaming): (MemoryPlan, _) = match &causal {
        None => (dit_plan(&c, shape, arch)?, None),
        Some(cc) => {
            // One sample of one chunk; the prompt and, with guidance, the negative prompt.
            let prompts = 1 + cc.guided() as usize;
            let chunk = DitShape {
                batch: 1,
                frames: cc.chunk_frames,
                ..shape
            };
            let p = plan_causal(&c, &cc.window(), chunk, prompts, arch)?;
            let kv_cache_bytes = p
                .buffers
                .iter()
                .filter(|b| b.name.ends_with(".self_k") || b.name.ends_with(".self_v"))
                .map(|b| b.bytes)
                .sum();
            shape = chunk;
            let line = StreamingLine {
                chunk_frames: cc.chunk_frames,
                sink_frames: cc.sink_frames,
                local_attn_frames: cc.local_attn_frames,
                prompts,
                kv_cache_bytes,
            };
            (p, Some(line))
        }
    };
    let weights = DeviceWeights::bytes_of(&device_weight_specs(&c))?;
    let (tc, vc) = side_configs(a.model.as_deref())?;
    let (text_w, text_run) = match &tc {
        Some(tc) => {
            let tp = text_gpu::plan(
                tc,
                TextShape {
                    batch: 2,
                    len: crate::text::MAX_SEQUENCE_LENGTH,
                },
                arch,
            )?;
            (
                text_gpu::weight_bytes(tc)?,
                tp.arena_bytes + tp.persistent_bytes,
            )
        }
        None => (0, 0),
    };
    let (vae_w, vae_run) = match &vc {
        Some(vc) => {
            let vp = vae_gpu::plan(vc, Coding::Decode, (shape.height, shape.width), arch)?;
            (
                DeviceWeights::bytes_of(&vae_gpu::device_weight_specs(
                    vc,
                    Coding::Decode,
                    vae_gpu::DEFAULT_DTYPE,
                )?)?,
                vp.arena_bytes + vp.persistent_bytes,
            )
        }
        None => (0, 0),
    };
    let phase = |n: &str| {
        p.phases
            .iter()
            .position(|x| x == n)
            .map(|i| p.phase_peaks[i])
            .unwrap_or(0)
    };
    // The stages (see the module docs); the DiT's persistent buffers stay through the decode.
    // Streaming decodes each chunk as it is made: the DiT's session and the VAE's together.
    let denoise = p.persistent_bytes + p.arena_bytes;
    let later = match streaming {
        Some(_) => denoise + vae_run,
        None => denoise.max(p.persistent_bytes + vae_run),
    };
    let resident = text_w + weights + vae_w + text_run.max(later);
    let freed = (text_w + text_run).max(weights + vae_w + later);
    let text_encoder_resident = (resident as u64) <= mem;
    let peak = if text_encoder_resident {
        resident
    } else {
        freed
    };
    let step_index = p.phases.iter().position(|x| x == "step").unwrap_or(0);
    Ok(PlanReport {
        model: name,
        size: format!("{w}x{h}"),
        generated: format!("{gw}x{gh}"),
        frames,
        latent,
        tokens: shape.tokens(&c),
        batch: shape.batch,
        text_tokens: shape.text_len,
        arch: arch.to_string(),
        device_memory_bytes: mem,
        device_memory_source: source,
        dit_weights_bytes: weights,
        dit_persistent_bytes: p.persistent_bytes,
        dit_text_arena_bytes: phase("text"),
        dit_step_arena_bytes: phase("step"),
        dit_arena_bytes: p.arena_bytes,
        gemm_workspace_bytes: 0,
        text_encoder_weights_bytes: text_w,
        text_encoder_run_bytes: text_run,
        vae_weights_bytes: vae_w,
        vae_run_bytes: vae_run,
        text_encoder_resident,
        peak_bytes: peak,
        fits: (peak as u64) <= mem,
        largest: p
            .largest(10)
            .into_iter()
            .map(|b| BufferLine {
                name: b.name.clone(),
                phase: b.phase.clone(),
                kind: b.kind,
                bytes: b.bytes,
            })
            .collect(),
        launches_per_step: p.launches.get(step_index).copied().unwrap_or(0),
        streaming,
    })
}

/// The architecture and device memory to plan for: flags, else the GPU's, else sm_90 and
/// 80 GiB.
fn device_facts(a: &PlanArgs) -> Result<(Arch, u64, String)> {
    let flag_arch = match &a.arch {
        Some(s) => Some(Arch::parse(s).ok_or_else(|| {
            Error::invalid(format!("--arch {s}: expected sm_80, sm_86, sm_89 or sm_90"))
        })?),
        None => None,
    };
    if let Some(g) = a.device_memory_gib {
        if !(g.is_finite() && g > 0.0) {
            return Err(Error::invalid(format!(
                "--device-memory {g}: a positive number of GiB"
            )));
        }
        return Ok((
            flag_arch.unwrap_or(Arch::SM90),
            (g * GIB) as u64,
            "--device-memory".into(),
        ));
    }
    if crate::cuda::driver_present() && !crate::kernels::FATBINS.is_empty() {
        if let Ok(KernelDevice::Cuda(c)) = KernelDevice::cuda(0) {
            if let Ok((free, _)) = c.memory_info() {
                let arch = KernelDevice::Cuda(c.clone()).arch()?;
                return Ok((
                    flag_arch.unwrap_or(arch),
                    free as u64,
                    format!("free on {}", c.name()),
                ));
            }
        }
    }
    Ok((
        flag_arch.unwrap_or(Arch::SM90),
        (80.0 * GIB) as u64,
        "assumed: no GPU here (pass --device-memory)".into(),
    ))
}

fn gib(b: usize) -> String {
    let b = b as f64;
    if b >= GIB {
        format!("{:.2} GiB", b / GIB)
    } else if b >= (1 << 20) as f64 {
        format!("{:.1} MiB", b / (1 << 20) as f64)
    } else {
        format!("{:.1} KiB", b / 1024.0)
    }
}

/// The plan for people.
pub fn render(r: &PlanReport) -> String {
    let mut s = format!(
        "reel plan  {}  {} (generated {}), {} frames -> latents {}x{}x{}, {} tokens x {} ({})\n",
        r.model,
        r.size,
        r.generated,
        r.frames,
        r.latent[0],
        r.latent[1],
        r.latent[2],
        r.tokens,
        r.batch,
        if r.streaming.is_some() {
            "a chunk at a time"
        } else {
            "both guidance passes batched"
        }
    );
    if let Some(st) = &r.streaming {
        s += &format!(
            "  block-causal       chunks of {} latent frames ({} tokens, batch 1, {} prompt{}); a sink of {} and {} frames attended: every block's K/V cache {} (the same for any length; the VAE decodes each chunk alongside)\n",
            st.chunk_frames,
            r.tokens,
            st.prompts,
            if st.prompts == 1 { "" } else { "s" },
            st.sink_frames,
            st.local_attn_frames,
            gib(st.kv_cache_bytes)
        );
    }
    s += &format!(
        "  device memory      {} ({}), launch limits of {}\n",
        gib(r.device_memory_bytes as usize),
        r.device_memory_source,
        r.arch
    );
    s += &format!(
        "  DiT weights        {} (bf16 matrices, f32 vectors)\n",
        gib(r.dit_weights_bytes)
    );
    s += &format!(
        "  DiT persistent     {} (latents, prediction, RoPE tables, cross-attention K/V of every block)\n",
        gib(r.dit_persistent_bytes)
    );
    s += &format!(
        "  DiT arena          {} (one step: {}; text phase: {}; {} launches per step)\n",
        gib(r.dit_arena_bytes),
        gib(r.dit_step_arena_bytes),
        gib(r.dit_text_arena_bytes),
        r.launches_per_step
    );
    s += &format!(
        "  GEMM workspace     {} (reel's GEMM needs none)\n",
        gib(r.gemm_workspace_bytes)
    );
    if r.text_encoder_weights_bytes == 0 {
        s += "  text encoder       none in this folder (prompt embeddings given)\n";
    } else {
        s += &format!(
            "  text encoder       {} of weights (f16 matrices; the embedding stays on the host) + {} to encode both prompts: {}\n",
            gib(r.text_encoder_weights_bytes),
            gib(r.text_encoder_run_bytes),
            if r.text_encoder_resident {
                "stays resident"
            } else {
                "freed before the DiT's weights are uploaded"
            }
        );
    }
    if r.vae_weights_bytes == 0 {
        s += "  VAE decode         no vae/ in this folder\n";
    } else {
        s += &format!(
            "  VAE decode         {} of weights + {} (one latent frame's arena and every causal cache: the same for any length)\n",
            gib(r.vae_weights_bytes),
            gib(r.vae_run_bytes)
        );
    }
    s += &format!(
        "  peak               {}: {}\n",
        gib(r.peak_bytes),
        if r.fits {
            "fits".to_string()
        } else {
            format!("does NOT fit in {}", gib(r.device_memory_bytes as usize))
        }
    );
    s += "  largest buffers:\n";
    for b in &r.largest {
        s += &format!(
            "    {:<24} {:>12}  {:?}, phase {}\n",
            b.name,
            gib(b.bytes),
            b.kind,
            b.phase
        );
    }
    s
}

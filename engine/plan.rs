//! `reel plan`: the static memory plan of a generation on a kernel device, computed before
//! anything is allocated (the DiT's device forward run in measuring mode, see
//! [`crate::gpu::ctx`]): weights on the device, the persistent buffers of a prompt, the arena
//! of one denoising step with both guidance passes batched (B = 2: one read of the weights
//! per step and larger GEMMs, for the activations of one more sample), the ten largest
//! buffers, and whether it fits the device memory.
//!
//! The text encoder and the VAE run on the cpu until their device forwards land (issue 16);
//! their device weights are listed, not yet planned.

use serde::Serialize;

use crate::error::{Error, Result};
use crate::generate::{parse_size, PRESETS};
use crate::gpu::{DeviceWeights, MemoryPlan};
use crate::kernels::{Arch, KernelDevice};
use crate::models::umt5::{Umt5Config, Umt5Encoder};
use crate::models::wan_dit::gpu::{device_weight_specs, plan as dit_plan, DitShape};
use crate::models::wan_dit::WanDitConfig;
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
    /// umT5 weights in bf16 (its device forward arrives with issue 16: not in the peak).
    pub text_encoder_weights_bytes: usize,
    pub peak_bytes: usize,
    pub fits: bool,
    pub largest: Vec<BufferLine>,
    pub launches_per_step: usize,
}

const GIB: f64 = (1u64 << 30) as f64;

fn dit_config(model: Option<&str>) -> Result<(WanDitConfig, String, bool)> {
    match model {
        None => {
            let dir = embedded::ensure()?;
            let path = resolve_component(&dir, "transformer", &["WanTransformer3DModel"])?;
            Ok((
                read_json(&path.join("config.json"))?,
                embedded::NAME.into(),
                true,
            ))
        }
        Some(name) if PRESETS.contains(&name) && !std::path::Path::new(name).exists() => Ok((
            if name.ends_with("14b") {
                WanDitConfig::wan21_t2v_14b()
            } else {
                WanDitConfig::wan21_t2v_1_3b()
            },
            name.into(),
            false,
        )),
        Some(dir) => {
            let path = resolve_component(
                std::path::Path::new(dir),
                "transformer",
                &["WanTransformer3DModel"],
            )?;
            let c: WanDitConfig = read_json(&path.join("config.json"))?;
            c.validate(&path.join("config.json"))?;
            Ok((c, dir.into(), false))
        }
    }
}

/// The plan of one generation (see the module docs).
pub fn plan(a: &PlanArgs) -> Result<PlanReport> {
    let (c, name, demo) = dit_config(a.model.as_deref())?;
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
    let shape = DitShape {
        batch: 2,
        frames: (frames - 1) / 4 + 1,
        height: gh / 8,
        width: gw / 8,
        text_len: crate::text::MAX_SEQUENCE_LENGTH,
    };
    let (arch, mem, source) = device_facts(a)?;
    let p: MemoryPlan = dit_plan(&c, shape, arch)?;
    let weights = DeviceWeights::bytes_of(&device_weight_specs(&c))?;
    let umt5: usize = Umt5Encoder::weight_specs(&Umt5Config::umt5_xxl())
        .iter()
        .map(|(_, s)| s.iter().product::<usize>() * 2)
        .sum();
    let phase = |n: &str| {
        p.phases
            .iter()
            .position(|x| x == n)
            .map(|i| p.phase_peaks[i])
            .unwrap_or(0)
    };
    let peak = weights + p.persistent_bytes + p.arena_bytes;
    let step_index = p.phases.iter().position(|x| x == "step").unwrap_or(0);
    Ok(PlanReport {
        model: name,
        size: format!("{w}x{h}"),
        generated: format!("{gw}x{gh}"),
        frames,
        latent: [shape.frames, shape.height, shape.width],
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
        text_encoder_weights_bytes: umt5,
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
        "reel plan  {}  {} (generated {}), {} frames -> latents {}x{}x{}, {} tokens x {} (both guidance passes batched)\n",
        r.model, r.size, r.generated, r.frames, r.latent[0], r.latent[1], r.latent[2], r.tokens, r.batch
    );
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
    s += &format!(
        "  text encoder       {} of bf16 weights, freed before the DiT loads (its device plan arrives with issue 16)\n",
        gib(r.text_encoder_weights_bytes)
    );
    s += "  VAE decode chunk   runs on the cpu until its device forward lands (issue 16)\n";
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

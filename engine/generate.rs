//! `reel generate`: text (or prompt embeddings) to video files, end to end.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;
use std::time::Instant;

use crate::cpu::conv::Frames;
use crate::error::{Error, Result};
use crate::io::TensorFile;
use crate::models::embedded;
use crate::models::wan_vae::FrameSink;
use crate::pipeline::{Conditioning, Pipeline};
use crate::sampler::{self, SamplerKind};
use crate::tensor::Tensor;
use crate::text::MAX_SEQUENCE_LENGTH;
use crate::video::{self, RgbFrame, VideoWriter};

/// Everything `reel generate` takes (the CLI fills it; library users may too).
#[derive(Debug, Clone, Default)]
pub struct GenerateArgs {
    /// A pipeline folder or a preset name; None = the embedded default.
    pub model: Option<String>,
    pub random_weights: bool,
    pub prompt: Option<String>,
    /// One prompt per line.
    pub prompts_file: Option<PathBuf>,
    pub negative_prompt: String,
    /// "WxH".
    pub size: Option<String>,
    pub frames: Option<usize>,
    pub steps: Option<usize>,
    pub guidance: Option<f32>,
    pub shift: Option<f64>,
    pub sampler: Option<SamplerKind>,
    pub seed: u64,
    pub count: usize,
    pub init_latents: Option<PathBuf>,
    pub prompt_embeds: Option<PathBuf>,
    pub output: String,
    pub fps: u32,
    pub quiet: bool,
    /// Insist on block-causal streaming (an error unless the model has causal_config.json;
    /// such a model streams either way).
    pub stream: bool,
    /// The kernel device every stage runs on (None: the cpu).
    pub device: Option<crate::kernels::KernelDevice>,
}

pub const PRESETS: [&str; 2] = ["wan2.1-t2v-1.3b", "wan2.1-t2v-14b"];

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Installs the Ctrl-C handler once: the denoising loop stops at the next step boundary
/// and partial outputs are removed.
fn install_ctrlc() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        if let Err(e) = ctrlc::set_handler(|| INTERRUPTED.store(true, Ordering::SeqCst)) {
            tracing::debug!("no Ctrl-C handler: {e}");
        }
    });
}

/// Parses "WxH": even sides from 16, long side ≤ 1920, short side ≤ 1080.
pub fn parse_size(s: &str) -> Result<(usize, usize)> {
    let bad = |why: &str| Error::invalid(format!("--size {s}: {why}"));
    let (w, h) = s
        .split_once(['x', 'X'])
        .ok_or_else(|| bad("expected WIDTHxHEIGHT, e.g. 832x480"))?;
    let w: usize = w.trim().parse().map_err(|_| bad("width is not a number"))?;
    let h: usize = h
        .trim()
        .parse()
        .map_err(|_| bad("height is not a number"))?;
    if w < 16 || h < 16 {
        return Err(bad("sides must be at least 16"));
    }
    if w % 2 != 0 || h % 2 != 0 {
        return Err(bad("sides must be even"));
    }
    if w.max(h) > 1920 || w.min(h) > 1080 {
        return Err(bad(
            "at most 1920 on the long side and 1080 on the short side",
        ));
    }
    Ok((w, h))
}

/// "42 s", "3 min 20 s", "1 h 05 min".
pub fn human_seconds(s: f64) -> String {
    let s = s.max(0.0).round() as u64;
    match s {
        0..=59 => format!("{s} s"),
        60..=3599 => format!("{} min {:02} s", s / 60, s % 60),
        _ => format!("{} h {:02} min", s / 3600, (s % 3600) / 60),
    }
}

/// The next multiple of `m` at or above `v`.
fn round_up(v: usize, m: usize) -> usize {
    v.div_ceil(m) * m
}

/// Memory the machine has for this run, if it can be read: Linux's MemAvailable, or less
/// when the process's cgroup (v2: a container's limit) leaves less, or when its
/// address-space limit (`ulimit -v`) leaves less room to map than that;
/// `REEL_AVAILABLE_GB` overrides them all (a deployment that knows better, and the tests).
pub fn available_memory() -> Option<u64> {
    if let Ok(v) = std::env::var("REEL_AVAILABLE_GB") {
        if let Some(gb) = v
            .trim()
            .parse::<f64>()
            .ok()
            .filter(|g| g.is_finite() && *g >= 0.0)
        {
            return Some((gb * 1e9) as u64);
        }
        tracing::warn!("REEL_AVAILABLE_GB={v}: not a number of GB; ignored");
    }
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    let read = |f: &str| -> Option<u64> {
        std::fs::read_to_string(format!("/sys/fs/cgroup/{f}"))
            .ok()?
            .trim()
            .parse()
            .ok()
    };
    let cgroup = match (read("memory.max"), read("memory.current")) {
        (Some(max), Some(cur)) => Some(max.saturating_sub(cur)),
        _ => None,
    };
    let have = cgroup.map_or(kb * 1024, |c| c.min(kb * 1024));
    Some(address_space_left().map_or(have, |a| a.min(have)))
}

/// Bytes the process may still map under its address-space limit (RLIMIT_AS, `ulimit -v`):
/// the soft limit less the address space mapped now. None without a limit.
fn address_space_left() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    // "Max address space   unlimited   unlimited   bytes": the soft limit is the first.
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max address space"))?;
    let soft: u64 = line["Max address space".len()..]
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb: u64 = status
        .lines()
        .find(|l| l.starts_with("VmSize:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(soft.saturating_sub(kb * 1024))
}

/// Bytes of the weight files under `dir`.
fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| {
                    let p = e.path();
                    if p.is_dir() {
                        dir_bytes(&p)
                    } else {
                        e.metadata().map(|m| m.len()).unwrap_or(0)
                    }
                })
                .sum()
        })
        .unwrap_or(0)
}

/// A rough upper estimate of a run's peak memory: the weights (mapped and used in place,
/// so resident while they run) plus the DiT's activations for both guidance passes and
/// the VAE decoder's working frames.
pub fn estimate_bytes(
    weights: u64,
    pipe_dims: (usize, usize, usize),
    tokens: usize,
    passes: usize,
    frame_px: usize,
) -> u64 {
    let (d, ffn, vae_ch) = pipe_dims;
    let dit = (tokens * passes) as u64 * (8 * d + ffn) as u64 * 4;
    let vae = frame_px as u64 * vae_ch as u64 * 4 * 12;
    weights + dit + vae
}

/// What the cpu memory estimate of a run needs to know of a loaded pipeline: `reel generate`
/// checks every run with it before the first step, and `reel serve` every request at
/// submission (the same numbers, so the server never accepts what the CLI refuses).
#[derive(Debug, Clone)]
pub struct CpuEstimate {
    /// The resident weights: mapped and used in place; the text encoder runs first and its
    /// clean pages can be dropped before denoising, so the larger of the two phases.
    weights: u64,
    /// (DiT width, FFN width, VAE decoder base channels).
    dims: (usize, usize, usize),
    /// Sizes are generated at multiples of this (VAE factor × patch).
    multiple: usize,
    spatial: usize,
    temporal: usize,
    patch_volume: usize,
}

impl CpuEstimate {
    pub fn of(pipe: &Pipeline) -> Self {
        let (dc, vc) = (&pipe.dit.config, &pipe.vae.config);
        CpuEstimate {
            weights: dir_bytes(&pipe.root.join("text_encoder"))
                .max(dir_bytes(&pipe.root.join("transformer")) + dir_bytes(&pipe.root.join("vae"))),
            dims: (
                dc.inner_dim(),
                dc.ffn_dim,
                vc.decoder_base_dim.unwrap_or(vc.base_dim),
            ),
            multiple: vc.spatial_factor() * dc.patch_size[1].max(dc.patch_size[2]),
            spatial: vc.spatial_factor(),
            temporal: vc.temporal_factor(),
            patch_volume: dc.patch_volume(),
        }
    }

    /// Bytes a w×h video of `frames` frames at `guidance` needs on the cpu.
    pub fn bytes(&self, w: usize, h: usize, frames: usize, guidance: f32) -> u64 {
        let (gw, gh) = (round_up(w, self.multiple), round_up(h, self.multiple));
        let t = frames.saturating_sub(1) / self.temporal + 1;
        let tokens = t * (gh / self.spatial) * (gw / self.spatial) / self.patch_volume.max(1);
        let passes = if guidance > 1.0 { 2 } else { 1 };
        estimate_bytes(self.weights, self.dims, tokens, passes, gw * gh)
    }

    /// Err(why) when the run needs more than the machine has available now.
    pub fn check(
        &self,
        w: usize,
        h: usize,
        frames: usize,
        guidance: f32,
    ) -> std::result::Result<(), String> {
        let need = self.bytes(w, h, frames, guidance);
        match available_memory() {
            Some(have) if need > have => Err(format!(
                "{w}x{h} x {frames} frames needs about {:.1} GB and the machine has {:.1} GB available",
                need as f64 / 1e9,
                have as f64 / 1e9
            )),
            _ => Ok(()),
        }
    }
}

/// Sink: crops each decoded frame to the requested size, maps [-1, 1] to [0, 1] and
/// writes it.
struct CropSink<'a> {
    writer: &'a mut dyn VideoWriter,
    crop: (usize, usize, usize, usize), // x0, y0, w, h
    frames: usize,
    progress: &'a indicatif::ProgressBar,
    /// Where to write the first frame as a PNG, once.
    thumbnail: Option<PathBuf>,
}

impl FrameSink for CropSink<'_> {
    fn push(&mut self, _b: usize, f: &Frames) -> Result<()> {
        crate::cancel::check()?;
        let (x0, y0, w, h) = self.crop;
        let mut buf = vec![0.0f32; w * h * 3];
        for t in 0..f.t {
            let src = f.frame(t);
            for y in 0..h {
                for x in 0..w {
                    for c in 0..3 {
                        let v = src[((y0 + y) * f.w + x0 + x) * f.c + c];
                        buf[(y * w + x) * 3 + c] = (v * 0.5 + 0.5).clamp(0.0, 1.0);
                    }
                }
            }
            let frame = RgbFrame { w, h, data: &buf };
            if let Some(path) = self.thumbnail.take() {
                crate::io::write_atomic(&path, &video::png_bytes(w, h, &frame.to_u8())?)?;
            }
            self.writer.write(&frame)?;
            self.frames += 1;
        }
        self.progress.inc(1);
        Ok(())
    }
}

/// One video's settings and results, written as the JSON sidecar.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Sidecar {
    pub output: String,
    pub prompt: Option<String>,
    pub negative_prompt: String,
    pub seed: u64,
    pub model: String,
    pub sampler: String,
    pub steps: usize,
    pub guidance: f32,
    /// A block-causal model's scale for each step (causal_config.json's `guidance_steps`),
    /// when it lists them; `guidance` is then the largest.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guidance_steps: Option<Vec<f32>>,
    pub shift: f64,
    pub size: String,
    pub generated_size: String,
    pub frames: usize,
    pub fps: u32,
    pub reel_version: String,
    pub timings: Timings,
    /// Where it ran: "cpu", or the kernel device (with the GPU's name on cuda).
    pub device: String,
    /// On a kernel device: the driver and the plan's peak bytes (weights, arenas, caches).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub driver: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub plan_peak_bytes: Option<u64>,
    /// On a kernel device: the most device memory reel held at once while making this video
    /// (weights included; what reel allocated, without the CUDA context's overhead).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device_peak_bytes: Option<u64>,
}

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Timings {
    pub load_seconds: f64,
    pub text_seconds: f64,
    pub denoise_seconds: f64,
    pub seconds_per_step: f64,
    pub decode_seconds: f64,
    /// Block-causal streaming: seconds from the start of denoising until the first chunk's
    /// frames were written (decode time is inside denoise_seconds then).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_chunk_seconds: Option<f64>,
}

fn output_name(out: &str, index: usize, total: usize) -> String {
    if total == 1 {
        return out.to_string();
    }
    let suffix = format!("-{index:04}");
    if let Some(stripped) = out.strip_suffix('/') {
        return format!("{stripped}{suffix}/");
    }
    let p = Path::new(out);
    match (p.file_stem(), p.extension()) {
        (Some(stem), Some(ext)) => p
            .with_file_name(format!(
                "{}{suffix}.{}",
                stem.to_string_lossy(),
                ext.to_string_lossy()
            ))
            .to_string_lossy()
            .into_owned(),
        _ => format!("{out}{suffix}"),
    }
}

fn sidecar_path(out: &str) -> PathBuf {
    PathBuf::from(format!(
        "{}.json",
        out.trim_end_matches(['/', std::path::MAIN_SEPARATOR])
    ))
}

/// Loads the model `args.model` names (a folder, a preset, or the embedded default).
pub(crate) fn load_model(args: &GenerateArgs) -> Result<(Pipeline, String, bool)> {
    load_model_with(args, true)
}

/// The DiT and text-encoder configs of a preset (a name in [`PRESETS`]).
pub(crate) fn preset_configs(
    name: &str,
) -> (
    crate::models::wan_dit::WanDitConfig,
    crate::models::umt5::Umt5Config,
) {
    use crate::models::wan_dit::WanDitConfig;
    let dit = if name.ends_with("14b") {
        WanDitConfig::wan21_t2v_14b()
    } else {
        WanDitConfig::wan21_t2v_1_3b()
    };
    (dit, crate::models::umt5::Umt5Config::umt5_xxl())
}

/// (bytes of f32 weights, bytes needed to make them) for preset `name` with random weights:
/// the DiT and the VAE, and umT5-XXL only `with_text` (a bench of the DiT needs none). The
/// weights are made in memory and serialised before they are mapped: twice at the peak.
pub fn random_preset_bytes(name: &str, with_text: bool) -> (u64, u64) {
    let (dit, text) = preset_configs(name);
    let params = |specs: Vec<(String, Vec<usize>)>| -> u64 {
        specs
            .iter()
            .map(|(_, s)| s.iter().product::<usize>() as u64)
            .sum()
    };
    let mut n = params(crate::models::wan_dit::WanDit::weight_specs(&dit))
        + params(crate::models::wan_vae::WanVae::weight_specs(
            &crate::models::wan_vae::WanVaeConfig::default(),
        ));
    if with_text {
        n += params(crate::models::umt5::Umt5Encoder::weight_specs(&text));
    }
    (4 * n, 8 * n)
}

/// [`load_model`], making a random-weights preset's text encoder only `with_text`.
pub(crate) fn load_model_with(
    args: &GenerateArgs,
    with_text: bool,
) -> Result<(Pipeline, String, bool)> {
    match args.model.as_deref() {
        None if args.stream => {
            tracing::info!(
                "no --model: using the block-causal variant of reel's embedded demo model (a coloured circle, square \
                 or triangle bouncing around a 64x64 frame, made chunk by chunk). Pass --model DIR for a block-causal \
                 Wan2.1 model (reel convert)."
            );
            let dir = embedded::ensure_causal()?;
            Ok((
                Pipeline::load(&dir)?,
                embedded::CAUSAL_NAME.to_string(),
                true,
            ))
        }
        None => {
            tracing::info!(
                "no --model: using reel's embedded demo model, a tiny Wan2.1-architecture pipeline trained on coloured \
                 shapes (red/green/blue/yellow circle/square/triangle moving left/right/up/down), 64x64, 17 frames. \
                 Pass --model DIR for Wan2.1 weights."
            );
            let dir = embedded::ensure()?;
            Ok((Pipeline::load(&dir)?, embedded::NAME.to_string(), true))
        }
        Some(name) if PRESETS.contains(&name) && !Path::new(name).exists() => {
            if !args.random_weights {
                return Err(Error::invalid(format!(
                    "--model {name} names an architecture preset: pass --random-weights to run it with random weights, \
                     or --model DIR with downloaded weights (see the README)"
                )));
            }
            let (dit, text) = preset_configs(name);
            let (weights, need) = random_preset_bytes(name, with_text);
            let have = available_memory().unwrap_or(0);
            if need > have {
                return Err(Error::invalid(format!(
                    "--model {name} --random-weights needs about {:.1} GB ({:.1} GB of f32 weights for the DiT, the VAE{}, \
                     made in memory and written once); this machine has {:.1} GB available. The cpu device keeps \
                     weights in f32; `reel bench --device cuda --random-weights` makes bf16 weights on a GPU instead.",
                    need as f64 / 1e9,
                    weights as f64 / 1e9,
                    if with_text { " and umT5-XXL" } else { "" },
                    have as f64 / 1e9
                )));
            }
            let text = with_text.then_some(&text);
            let dir = embedded::write_random_pipeline(name, &dit, text)?;
            Ok((
                Pipeline::load(&dir)?,
                format!("{name} (random weights)"),
                false,
            ))
        }
        Some(dir) => {
            let path = PathBuf::from(dir);
            Ok((Pipeline::load(&path)?, dir.to_string(), false))
        }
    }
}

/// Classifier-free guidance scales a run may use (≤ 1 skips the unconditional pass; Wan's
/// own default is 5). The CLI and the server check the same ranges.
pub const GUIDANCE_RANGE: std::ops::RangeInclusive<f64> = 0.0..=100.0;
/// Flow shifts (Wan uses 3 at 480p and 5 at 720p; 1 is no shift).
pub const SHIFT_RANGE: std::ops::RangeInclusive<f64> = 0.01..=100.0;
/// Denoising steps.
pub const STEPS_RANGE: std::ops::RangeInclusive<usize> = 1..=1000;
/// Frames per second of the written video.
pub const FPS_RANGE: std::ops::RangeInclusive<u32> = 1..=240;

/// Checks a run's parameters against the documented ranges (a missing one takes its
/// default, which is in range). Err((parameter, reason)) names the parameter without any
/// CLI or API decoration, so each front end words it its own way.
pub fn check_ranges(
    guidance: Option<f64>,
    shift: Option<f64>,
    steps: Option<usize>,
    fps: Option<u32>,
) -> std::result::Result<(), (&'static str, String)> {
    fn range<T: PartialOrd + std::fmt::Display>(r: &std::ops::RangeInclusive<T>) -> String {
        format!("from {} to {}", r.start(), r.end())
    }
    if let Some(g) = guidance.filter(|g| !GUIDANCE_RANGE.contains(g)) {
        return Err((
            "guidance",
            format!("{g} is not a guidance scale {}", range(&GUIDANCE_RANGE)),
        ));
    }
    if let Some(v) = shift.filter(|v| !SHIFT_RANGE.contains(v)) {
        return Err((
            "shift",
            format!("{v} is not a flow shift {}", range(&SHIFT_RANGE)),
        ));
    }
    if let Some(n) = steps.filter(|n| !STEPS_RANGE.contains(n)) {
        return Err((
            "steps",
            format!("{n} is not a step count {}", range(&STEPS_RANGE)),
        ));
    }
    if let Some(f) = fps.filter(|f| !FPS_RANGE.contains(f)) {
        return Err((
            "fps",
            format!("{f} is not a frame rate {}", range(&FPS_RANGE)),
        ));
    }
    Ok(())
}

/// Runs `reel generate`. Returns the sidecars of the videos written.
pub fn generate(args: &GenerateArgs) -> Result<Vec<Sidecar>> {
    install_ctrlc();
    INTERRUPTED.store(false, Ordering::SeqCst);
    // Cheap checks before any loading.
    video::Format::from_path(&args.output)?;
    if args.count == 0 {
        return Err(Error::invalid("--count must be at least 1"));
    }
    check_ranges(
        args.guidance.map(f64::from),
        args.shift,
        args.steps,
        Some(args.fps),
    )
    .map_err(|(name, reason)| Error::invalid(format!("--{name}: {reason}")))?;
    let requested = args.size.as_deref().map(parse_size).transpose()?;
    let mut prompts: Vec<Option<String>> = Vec::new();
    if let Some(file) = &args.prompts_file {
        let text = std::fs::read_to_string(file).map_err(|source| Error::Io {
            path: file.clone(),
            source,
        })?;
        prompts.extend(
            text.lines()
                .filter(|l| !l.trim().is_empty())
                .map(|l| Some(l.to_string())),
        );
        if prompts.is_empty() {
            return Err(Error::invalid(format!(
                "--prompts {}: no prompts in the file",
                file.display()
            )));
        }
    }
    if let Some(p) = &args.prompt {
        prompts.insert(0, Some(p.clone()));
    }
    if prompts.is_empty() {
        if args.prompt_embeds.is_none() {
            return Err(Error::invalid(
                "--prompt (or --prompts FILE, or --prompt-embeds F) is required",
            ));
        }
        prompts.push(None);
    }

    let started = Instant::now();
    let (mut pipe, model_name, embedded_model) = load_model(args)?;
    match &pipe.causal {
        None if args.stream => {
            return Err(Error::invalid(format!(
                "--stream needs a block-causal model: {} has no transformer/{} (reel convert --causal writes one)",
                pipe.root.display(),
                crate::models::wan_dit::CausalConfig::FILE
            )))
        }
        Some(c)
            if args.steps.is_some()
                || args.guidance.is_some()
                || args.sampler.is_some()
                || args.shift.is_some() =>
        {
            tracing::warn!(
                "a block-causal model makes each chunk in its own {} steps at guidance {} (causal_config.json): --steps, --guidance, --sampler and --shift do not apply",
                c.steps_label(),
                c.guidance_label()
            );
        }
        _ => {}
    }
    let size = requested.unwrap_or(if embedded_model {
        embedded::DEFAULT_SIZE
    } else {
        (832, 480)
    });
    let frames = args.frames.unwrap_or(if embedded_model {
        embedded::DEFAULT_FRAMES
    } else {
        81
    });
    let steps = args.steps.unwrap_or(if embedded_model {
        embedded::DEFAULT_STEPS
    } else {
        50
    });
    let guidance = args.guidance.unwrap_or(if embedded_model {
        embedded::default_guidance()
    } else {
        5.0
    });
    // On a kernel device: the plan first (refused with its numbers before any GPU work),
    // then the weights go up once for every video of the command.
    let mut plan_peak_bytes = None;
    if let Some(dev) = &args.device {
        let (w, h) = size;
        let report = crate::plan::plan(&crate::plan::PlanArgs {
            model: Some(pipe.root.display().to_string()),
            size: Some(format!("{w}x{h}")),
            frames: Some(frames),
            device_memory_gib: None,
            arch: None,
            causal: None,
        })?;
        if !report.fits {
            return Err(Error::invalid(format!(
                "--device {}: {w}x{h} x {frames} frames needs {:.2} GiB on the device (DiT {:.2} + umT5 {:.2} + VAE {:.2} GiB of weights, arenas and caches) and {:.2} GiB are {}; use a smaller --size or --frames (reel plan shows the breakdown)",
                dev.describe(),
                report.peak_bytes as f64 / (1u64 << 30) as f64,
                report.dit_weights_bytes as f64 / (1u64 << 30) as f64,
                report.text_encoder_weights_bytes as f64 / (1u64 << 30) as f64,
                report.vae_weights_bytes as f64 / (1u64 << 30) as f64,
                report.device_memory_bytes as f64 / (1u64 << 30) as f64,
                report.device_memory_source
            )));
        }
        tracing::info!(
            "running on {} (plan peak {:.2} GiB of {:.2} GiB, {})",
            dev.describe(),
            report.peak_bytes as f64 / (1u64 << 30) as f64,
            report.device_memory_bytes as f64 / (1u64 << 30) as f64,
            report.device_memory_source
        );
        plan_peak_bytes = Some(report.peak_bytes as u64);
        if !report.text_encoder_resident {
            tracing::info!(
                "the text encoder does not fit beside the DiT and the VAE: it goes up for each video's prompts and is freed before their weights go up"
            );
        }
        pipe.to_device(dev.clone(), report.text_encoder_resident)?;
    }
    let load_seconds = started.elapsed().as_secs_f64();
    let embeds_file = args
        .prompt_embeds
        .as_ref()
        .map(|p| TensorFile::open(p))
        .transpose()?;
    let init_latents = args
        .init_latents
        .as_ref()
        .map(|p| TensorFile::open(p).and_then(|f| f.tensor("latents")))
        .transpose()?;
    let jobs: Vec<(Option<String>, u64)> = prompts
        .iter()
        .flat_map(|p| (0..args.count as u64).map(move |i| (p.clone(), args.seed.wrapping_add(i))))
        .collect();
    let mut written = Vec::new();
    for (index, (prompt, seed)) in jobs.iter().enumerate() {
        let cond = match &embeds_file {
            Some(f) => {
                let pe = f.tensor("prompt_embeds")?;
                if pe.shape().len() != 3 || pe.shape()[0] != 1 {
                    return Err(Error::invalid(format!(
                        "--prompt-embeds: prompt_embeds must be [1, L, D], got {:?}",
                        pe.shape()
                    )));
                }
                let ne = if guidance > 1.0 {
                    Some(f.tensor("negative_prompt_embeds")?)
                } else {
                    None
                };
                Some(Conditioning {
                    prompt_embeds: pe,
                    negative_prompt_embeds: ne,
                })
            }
            None => None,
        };
        let job = Render {
            prompt: prompt.clone(),
            negative_prompt: args.negative_prompt.clone(),
            seed: *seed,
            size,
            frames,
            steps,
            guidance,
            shift: args.shift,
            sampler: args.sampler,
            fps: args.fps,
            output: output_name(&args.output, index, jobs.len()),
            cond,
            init_latents: init_latents.clone(),
            thumbnail: None,
            plan_peak_bytes,
            cancel: Some(std::sync::Arc::new(|| INTERRUPTED.load(Ordering::SeqCst))),
        };
        let progress = if args.quiet {
            indicatif::ProgressBar::hidden()
        } else {
            indicatif::ProgressBar::new(0)
        };
        let side = render(
            &pipe,
            &model_name,
            &job,
            load_seconds,
            &progress,
            &mut |_, _| {
                if INTERRUPTED.load(Ordering::SeqCst) {
                    Err(Error::Interrupted)
                } else {
                    Ok(())
                }
            },
        )?;
        written.push(side);
    }
    Ok(written)
}

/// One video to make with a loaded pipeline (what `reel generate` and `reel serve` share).
pub struct Render {
    pub prompt: Option<String>,
    pub negative_prompt: String,
    pub seed: u64,
    /// Requested (width, height).
    pub size: (usize, usize),
    pub frames: usize,
    pub steps: usize,
    pub guidance: f32,
    /// None: the scheduler config's.
    pub shift: Option<f64>,
    pub sampler: Option<SamplerKind>,
    pub fps: u32,
    pub output: String,
    /// Given prompt embeddings; None: encode `prompt` and `negative_prompt`.
    pub cond: Option<Conditioning>,
    /// Given initial latents; None: Philox noise for `seed`.
    pub init_latents: Option<Tensor>,
    /// Also write the first frame as a PNG here.
    pub thumbnail: Option<PathBuf>,
    /// On a kernel device: the plan's peak (recorded in the sidecar).
    pub plan_peak_bytes: Option<u64>,
    /// What cancels the render, checked inside steps and between decoded chunks too (None:
    /// only `on_step`'s answer stops it).
    pub cancel: Option<crate::cancel::Flag>,
}

/// Makes one video: checks the request against the model, estimates memory, conditions,
/// denoises (calling `on_step(step, steps)` after each step; an error there cancels),
/// decodes into the writer, and writes the JSON sidecar.
pub fn render(
    pipe: &Pipeline,
    model_name: &str,
    job: &Render,
    load_seconds: f64,
    progress: &indicatif::ProgressBar,
    on_step: &mut dyn FnMut(usize, usize) -> Result<()>,
) -> Result<Sidecar> {
    let (w, h) = job.size;
    let causal = pipe.causal.as_ref();
    // A block-causal model makes its video chunk by chunk with its own steps and guidance
    // (causal_config.json); the request's steps, guidance and sampler do not apply.
    let (frames, steps, guidance) = match causal {
        Some(c) => (job.frames, c.denoising_steps.len(), c.peak_guidance()),
        None => (job.frames, job.steps, job.guidance),
    };
    if causal.is_some() && job.output.ends_with(".safetensors") {
        return Err(Error::invalid(
            "a block-causal model streams frames: write .mp4, .gif, .y4m or PNG frames, not .safetensors latents",
        ));
    }
    if causal.is_some() && job.init_latents.is_some() {
        return Err(Error::invalid(
            "--init-latents: a block-causal model draws each chunk's noise as it goes",
        ));
    }
    let tf = pipe.vae.config.temporal_factor();
    if frames == 0 || (frames - 1) % tf != 0 {
        return Err(Error::invalid(format!(
            "--frames {frames}: must be 1 + {tf}k (e.g. 1, {}, {}, 81)",
            1 + tf,
            1 + 4 * tf
        )));
    }
    if steps == 0 {
        return Err(Error::invalid("--steps must be at least 1"));
    }
    let kind = job.sampler.unwrap_or(pipe.scheduler.kind());
    let shift = job.shift.unwrap_or(pipe.scheduler.default_shift());
    if let Some(m) = pipe.device_memory() {
        m.reset_peak();
    }
    let _cancel = crate::cancel::scope(job.cancel.clone());
    let multiple = pipe.vae.config.spatial_factor()
        * pipe.dit.config.patch_size[1].max(pipe.dit.config.patch_size[2]);
    let (gw, gh) = (round_up(w, multiple), round_up(h, multiple));
    if (gw, gh) != (w, h) {
        tracing::info!(
            "{w}x{h} is not a multiple of {multiple}: generating {gw}x{gh} and center-cropping"
        );
    }
    if let Some(note) = embedded::size_note(&pipe.root, w, h, frames) {
        tracing::warn!("{note}");
    }
    let shape = pipe.latent_shape(1, frames, gh, gw);
    // Streaming memory does not grow with the length: no whole-video estimate to check.
    if pipe.kernel_device().is_none() && causal.is_none() {
        CpuEstimate::of(pipe)
            .check(w, h, frames, guidance)
            .map_err(|m| Error::invalid(format!("{m}; use a smaller --size or --frames")))?;
    }
    let mut timings = Timings {
        load_seconds,
        ..Default::default()
    };
    let t0 = Instant::now();
    let encoded;
    let cond = match &job.cond {
        Some(c) => c,
        None => {
            let p = job.prompt.as_deref().unwrap_or("");
            if let Some(note) = embedded::vocabulary_note(&pipe.root, p) {
                tracing::warn!("{note}");
            }
            encoded = pipe.encode_prompts(
                &[p],
                &[job.negative_prompt.as_str()],
                guidance,
                MAX_SEQUENCE_LENGTH,
            )?;
            &encoded
        }
    };
    timings.text_seconds = t0.elapsed().as_secs_f64();
    if let Some(cfg) = causal {
        let chunks = shape[2].div_ceil(cfg.chunk_frames);
        progress.set_length(chunks as u64);
        progress.set_style(
            indicatif::ProgressStyle::with_template(
                "{msg} [{bar:30}] {pos}/{len} chunks {elapsed_precise} eta {eta}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        progress.set_message("streaming");
        let t1 = Instant::now();
        let mut writer = video::open(&job.output, w, h, job.fps)?;
        let mut sink = CropSink {
            writer: writer.as_mut(),
            crop: ((gw - w) / 2, (gh - h) / 2, w, h),
            frames: 0,
            progress: &indicatif::ProgressBar::hidden(),
            thumbnail: job.thumbnail.clone(),
        };
        let mut first_chunk = None;
        let made = pipe.stream_to(cond, frames, gh, gw, job.seed, &mut sink, &mut |k, n| {
            progress.inc(1);
            if k == 1 {
                first_chunk = Some(t1.elapsed().as_secs_f64());
            }
            on_step(k, n)
        });
        let n_frames = sink.frames;
        match made {
            Ok(()) => writer.finish(&Tensor::zeros(&[0]))?,
            Err(e) => {
                writer.abort();
                return Err(e);
            }
        }
        timings.denoise_seconds = t1.elapsed().as_secs_f64();
        timings.seconds_per_step = timings.denoise_seconds / (chunks * steps) as f64;
        timings.first_chunk_seconds = first_chunk;
        progress.finish_and_clear();
        let how = Made {
            sampler: "block-causal".into(),
            steps,
            guidance,
            shift: cfg.timestep_shift,
            frames: n_frames,
        };
        return finish_sidecar(pipe, model_name, job, (gw, gh), how, timings);
    }
    let latents = match &job.init_latents {
        Some(l) if l.shape() != shape => {
            return Err(Error::invalid(format!(
                "--init-latents: latents are {:?}, this run needs {:?}",
                l.shape(),
                shape
            )))
        }
        Some(l) => l.clone(),
        None => Tensor::new(
            shape.to_vec(),
            crate::rng::gaussian(job.seed, shape.iter().product()),
        )?,
    };
    let mut sampler = sampler::build(&pipe.scheduler, kind, steps, Some(shift))?;
    progress.set_length((steps + shape[2]) as u64);
    progress.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg} [{bar:30}] {pos}/{len} {elapsed_precise} eta {eta}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    progress.set_message("denoising");
    let t1 = Instant::now();
    let final_latents = pipe.denoise(latents, cond, guidance, sampler.as_mut(), &mut |i, n| {
        progress.inc(1);
        // From the mean step time so far (the first step's alone after one): the bar's own
        // estimate mixes steps with the decoder's frames.
        let left = t1.elapsed().as_secs_f64() / i as f64 * (n - i) as f64;
        progress.set_message(if i < n {
            format!("denoising, about {} left", human_seconds(left))
        } else {
            "denoising".to_string()
        });
        on_step(i, n)
    })?;
    timings.denoise_seconds = t1.elapsed().as_secs_f64();
    timings.seconds_per_step = timings.denoise_seconds / steps as f64;
    progress.set_message("decoding");
    let t2 = Instant::now();
    let mut writer = video::open(&job.output, w, h, job.fps)?;
    let mut sink = CropSink {
        writer: writer.as_mut(),
        crop: ((gw - w) / 2, (gh - h) / 2, w, h),
        frames: 0,
        progress,
        thumbnail: job.thumbnail.clone(),
    };
    let decoded = pipe.decode_to(&final_latents, &mut sink);
    let n_frames = sink.frames;
    match decoded {
        Ok(()) => writer.finish(&final_latents)?,
        Err(e) => {
            writer.abort();
            return Err(e);
        }
    }
    timings.decode_seconds = t2.elapsed().as_secs_f64();
    progress.finish_and_clear();
    let how = Made {
        sampler: kind.name().into(),
        steps,
        guidance,
        shift,
        frames: n_frames,
    };
    finish_sidecar(pipe, model_name, job, (gw, gh), how, timings)
}

/// How a video was made, for its sidecar.
struct Made {
    sampler: String,
    steps: usize,
    guidance: f32,
    shift: f64,
    frames: usize,
}

/// Writes the JSON sidecar of a finished video (removing the video when that fails: the
/// sidecar is part of the output) and returns it.
fn finish_sidecar(
    pipe: &Pipeline,
    model_name: &str,
    job: &Render,
    (gw, gh): (usize, usize),
    how: Made,
    timings: Timings,
) -> Result<Sidecar> {
    let (w, h) = job.size;
    let n_frames = how.frames;
    let side = Sidecar {
        output: job.output.clone(),
        prompt: job.prompt.clone(),
        negative_prompt: job.negative_prompt.clone(),
        seed: job.seed,
        model: model_name.to_string(),
        sampler: how.sampler,
        steps: how.steps,
        guidance: how.guidance,
        guidance_steps: pipe
            .causal
            .as_ref()
            .filter(|c| !c.guidance_steps.is_empty())
            .map(|c| c.guidance_steps.clone()),
        shift: how.shift,
        size: format!("{w}x{h}"),
        generated_size: format!("{gw}x{gh}"),
        frames: n_frames,
        fps: job.fps,
        reel_version: format!(
            "{} ({})",
            env!("CARGO_PKG_VERSION"),
            env!("REEL_GIT_COMMIT")
        ),
        timings,
        device: match pipe.kernel_device() {
            Some(d) => d.describe(),
            None => "cpu".into(),
        },
        driver: match pipe.kernel_device() {
            Some(crate::kernels::KernelDevice::Cuda(_)) => {
                crate::cuda::driver_version().map(|(a, b)| format!("CUDA {a}.{b}"))
            }
            _ => None,
        },
        plan_peak_bytes: job.plan_peak_bytes,
        device_peak_bytes: pipe.device_memory().map(|m| m.peak() as u64),
    };
    let text = serde_json::to_string_pretty(&side).map_err(|e| Error::invalid(e.to_string()))?;
    let sp = sidecar_path(&job.output);
    if let Err(e) = crate::io::write_atomic(&sp, text.as_bytes()) {
        // The sidecar is part of the output: without it, nothing is published.
        let out = Path::new(&job.output);
        let _ = if job.output.ends_with('/') {
            std::fs::remove_dir_all(out)
        } else {
            std::fs::remove_file(out)
        };
        if let Some(t) = &job.thumbnail {
            let _ = std::fs::remove_file(t);
        }
        return Err(e);
    }
    tracing::info!("wrote {} ({n_frames} frames)", job.output);
    Ok(side)
}
